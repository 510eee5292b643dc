// SPDX-License-Identifier: Apache-2.0
//! The NFS file transport on a local directory, with the CPU executor: both layouts,
//! both commands, everything a guest may leave in `command.txt`, and two VMs hammering
//! their own directories at once. Waits are on what the files read or on the transport's
//! completed scans, never on the clock. The attacks of the security review (directories
//! made to become tenants, special files swapped in for `command.txt`, hard links to host
//! files) are performed here against the real transport.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use vgpu_mediator::cpu::CpuExecutorFactory;
use vgpu_mediator::executor::ExecResult;
use vgpu_mediator::{selftest, DeviceInfo, Executor, ExecutorFactory, Mediator, TenantId};
use vgpu_nfs::{NfsError, NfsOptions, NfsServer};

const VECTOR_ADD: &str = "1:Vector add PASSED: 1024 elements, 0 errors (CPU reference executor)";
const READY: &str = "0:Ready";
const HELP: &str = "write 1 (vector-add validation) or 2 (device information)";
/// Only a guard against a hang; nothing here depends on it.
const GIVE_UP: Duration = Duration::from_secs(120);

/// A fresh directory under the system's temporary directory, removed at the end.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new(tag: &str) -> TempRoot {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vgpu-nfs-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempRoot(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cpu_mediator() -> Arc<Mediator> {
    Mediator::new(Arc::new(CpuExecutorFactory::new()))
}

fn options(root: &TempRoot, vms: &[&str]) -> NfsOptions {
    NfsOptions {
        vms: vms.iter().map(|v| v.to_string()).collect(),
        poll_interval: Duration::from_millis(5),
        settle: Duration::from_millis(5),
        ..NfsOptions::new(root.path())
    }
}

fn start(mediator: &Arc<Mediator>, opts: NfsOptions) -> NfsServer {
    NfsServer::start(mediator.clone(), opts).expect("the transport starts")
}

fn device_line(m: &Mediator) -> String {
    format!("1:{}", selftest::device_line(m.device()))
}

/// The answer to an unknown word: echoed only when it is a short run of digits.
fn unknown(word: &str) -> String {
    if !word.is_empty() && word.len() <= 10 && word.bytes().all(|b| b.is_ascii_digit()) {
        format!("2:unknown command '{word}': {HELP}")
    } else {
        format!("2:unknown command: {HELP}")
    }
}

fn not_regular() -> String {
    format!("2:command.txt is not a regular file: {HELP}")
}

/// The response line, or "" while the file does not exist.
fn response(dir: &Path) -> String {
    match std::fs::read_to_string(dir.join("response.txt")) {
        Ok(s) => {
            assert!(s.ends_with('\n') && s.lines().count() == 1, "{s:?}");
            s.trim_end().to_owned()
        }
        Err(_) => String::new(),
    }
}

fn status(line: &str) -> Option<u32> {
    line.split_once(':').and_then(|(s, _)| s.parse().ok())
}

fn wait_response(dir: &Path, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let line = response(dir);
        if done(&line) {
            return line;
        }
        assert!(
            start.elapsed() < GIVE_UP,
            "{} still reads {line:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Returns once the transport has completed `n` whole scans that began after this call.
fn wait_passes(server: &NfsServer, n: u64) {
    let target = server.passes() + n + 1;
    let start = Instant::now();
    while server.passes() < target {
        assert!(start.elapsed() < GIVE_UP, "the transport stopped scanning");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn write_command(dir: &Path, contents: &str) {
    std::fs::write(dir.join("command.txt"), contents).unwrap();
}

/// One command the way vgpu-nfs-client issues it: reset unless idle, write, wait.
fn issue(dir: &Path, word: &str) -> String {
    let pending = std::fs::read_to_string(dir.join("command.txt")).unwrap_or_default();
    let pending = pending.trim();
    if status(&response(dir)) != Some(0) || !(pending.is_empty() || pending == "0") {
        write_command(dir, "0\n");
        wait_response(dir, |l| status(l) == Some(0));
    }
    write_command(dir, &format!("{word}\n"));
    wait_response(dir, |l| status(l).is_some_and(|s| s != 0))
}

/// Writes the reset and waits for `0:Ready`.
fn reset(dir: &Path) {
    write_command(dir, "0\n");
    assert_eq!(wait_response(dir, |l| status(l) == Some(0)), "0:Ready");
}

fn requests(m: &Mediator, tenant: TenantId) -> u64 {
    m.usage(tenant).expect("tenant exists").requests
}

#[test]
fn root_pair_answers_both_commands_and_the_same_command_again_after_a_reset() {
    let root = TempRoot::new("root-pair");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &[]));
    let dir = root.path();
    assert_eq!(response(dir), "0:Ready");
    let tenant = server.tenant("root").unwrap();

    assert_eq!(issue(dir, "1"), VECTOR_ADD);
    assert_eq!(issue(dir, "2"), device_line(&m));
    assert_eq!(issue(dir, "2"), device_line(&m));
    assert_eq!(issue(dir, "1"), VECTOR_ADD);
    assert_eq!(requests(&m, tenant), 4);
    assert_eq!(
        std::fs::read_to_string(dir.join("command.txt")).unwrap(),
        "1\n"
    );
    server.stop();
}

#[test]
fn listed_vm_directories_are_created_and_answered_separately() {
    let root = TempRoot::new("listed");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1", "vm2"]));
    let (vm1, vm2) = (root.join("vm1"), root.join("vm2"));
    assert!(vm1.is_dir() && vm2.is_dir());
    assert_eq!(response(&vm1), "0:Ready");
    assert_eq!(response(&vm2), "0:Ready");
    assert!(
        !root.join("response.txt").exists(),
        "no root pair with --vm"
    );
    assert_eq!(
        server
            .tenants()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["vm1", "vm2"]
    );

    assert_eq!(issue(&vm1, "1"), VECTOR_ADD);
    assert_eq!(response(&vm2), "0:Ready", "vm2 untouched by vm1's command");
    assert_eq!(issue(&vm2, "2"), device_line(&m));
    assert_eq!(response(&vm1), VECTOR_ADD);
    let (t1, t2) = (server.tenant("vm1").unwrap(), server.tenant("vm2").unwrap());
    assert_ne!(t1, t2);
    assert_eq!((requests(&m, t1), requests(&m, t2)), (1, 1));
    server.stop();
}

#[test]
fn nfs_vms_are_placed_on_the_gpu_named_for_them_or_automatically() {
    use vgpu_mediator::{Limits, Placement, SchedConfig};
    let root = TempRoot::new("gpus");
    let gpu = || -> Arc<dyn ExecutorFactory> { Arc::new(CpuExecutorFactory::simulated(2)) };
    let m = Mediator::with_gpus(
        vec![(0, gpu()), (1, gpu())],
        Limits::default(),
        SchedConfig::default(),
    );
    let opts = NfsOptions {
        placements: [("vm1".to_string(), Placement::Gpu(1))].into(),
        ..options(&root, &["vm1", "vm2", "vm3"])
    };
    let server = start(&m, opts);
    let gpu_of = |vm: &str| m.tenant_gpu(server.tenant(vm).unwrap());
    // vm1 named for GPU 1; then vm2 where most memory is unpromised (GPU 0), vm3 on the
    // tie of memory and VMs, the lowest index.
    assert_eq!(
        (gpu_of("vm1"), gpu_of("vm2"), gpu_of("vm3")),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(issue(&root.join("vm1"), "1"), VECTOR_ADD);
    server.stop();
}

#[test]
fn vm_directories_are_discovered_as_they_appear_and_dropped_when_gone() {
    let root = TempRoot::new("discover");
    let outside = TempRoot::new("outside");
    let m = cpu_mediator();
    let opts = NfsOptions {
        discover: true,
        ..options(&root, &[])
    };
    let server = start(&m, opts);

    std::fs::create_dir(root.join("vm5")).unwrap();
    std::fs::create_dir(root.join("data")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("vm6")).unwrap();
    let vm5 = root.join("vm5");
    assert_eq!(wait_response(&vm5, |l| !l.is_empty()), "0:Ready");
    assert_eq!(issue(&vm5, "2"), device_line(&m));
    wait_passes(&server, 2);
    assert!(
        !root.join("data/response.txt").exists(),
        "not a vm* directory"
    );
    assert!(
        !outside.join("response.txt").exists(),
        "a link is not followed"
    );
    assert_eq!(
        server
            .tenants()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["root", "vm5"]
    );
    let tenant = server.tenant("vm5").unwrap();

    std::fs::remove_dir_all(&vm5).unwrap();
    wait_passes(&server, 2);
    assert_eq!(server.tenant("vm5"), None);
    assert!(m.usage(tenant).is_none(), "its tenant left the mediator");
    server.stop();
}

#[test]
fn unknown_words_get_a_clear_error_and_serving_goes_on() {
    let root = TempRoot::new("garbage");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    // Digits are echoed; any other text is not (it could be anything a file holds).
    assert_eq!(issue(&dir, "hello"), format!("2:unknown command: {HELP}"));
    assert_eq!(issue(&dir, "3"), format!("2:unknown command '3': {HELP}"));
    assert_eq!(issue(&dir, "01"), unknown("01"));
    assert_eq!(issue(&dir, "1 2"), unknown("1 2"));
    assert_eq!(issue(&dir, "1\n2"), unknown("1\n2"));
    assert_eq!(issue(&dir, "\u{ff}'x"), unknown("\u{ff}'x"));
    assert_eq!(
        issue(&dir, &"x".repeat(300)),
        format!("2:command.txt is longer than 256 bytes: {HELP}")
    );
    // Bytes that are not UTF-8 at all.
    reset(&dir);
    std::fs::write(dir.join("command.txt"), b"\xff\xfe\n").unwrap();
    assert_eq!(
        wait_response(&dir, |l| status(l) == Some(2)),
        format!("2:unknown command: {HELP}")
    );
    // A link planted in place of the command file is never followed.
    reset(&dir);
    std::fs::remove_file(dir.join("command.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("command.txt")).unwrap();
    assert_eq!(wait_response(&dir, |l| status(l) == Some(2)), not_regular());
    std::fs::remove_file(dir.join("command.txt")).unwrap();

    assert_eq!(requests(&m, tenant), 0, "nothing reached the executor");
    assert_eq!(issue(&dir, "1"), VECTOR_ADD);
    assert_eq!(requests(&m, tenant), 1);
    server.stop();
}

#[test]
fn an_empty_or_blank_command_file_is_no_command() {
    let root = TempRoot::new("empty");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    write_command(&dir, "");
    wait_passes(&server, 2);
    assert_eq!(response(&dir), "0:Ready");
    write_command(&dir, " \n\r\n");
    wait_passes(&server, 2);
    assert_eq!(response(&dir), "0:Ready");
    assert_eq!(requests(&m, tenant), 0);

    write_command(&dir, "2\n");
    assert_eq!(wait_response(&dir, |l| l != "0:Ready"), device_line(&m));
    server.stop();
}

#[test]
fn a_partially_written_command_waits_for_its_newline() {
    let root = TempRoot::new("partial");
    let m = cpu_mediator();
    let opts = NfsOptions {
        settle: Duration::from_secs(3600),
        ..options(&root, &["vm1"])
    };
    let server = start(&m, opts);
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    // A writer that has written "1" of "12\n" so far, and is still holding the file.
    let mut file = std::fs::File::create(dir.join("command.txt")).unwrap();
    file.write_all(b"1").unwrap();
    wait_passes(&server, 3);
    assert_eq!(response(&dir), "0:Ready");
    file.write_all(b"2\n").unwrap();
    drop(file);
    assert_eq!(wait_response(&dir, |l| l != "0:Ready"), unknown("12"));
    assert_eq!(requests(&m, tenant), 0, "'1' alone never ran");
    server.stop();
}

#[test]
fn a_command_without_newline_is_taken_once_it_stops_changing() {
    let root = TempRoot::new("unterminated");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    write_command(&dir, "2");
    assert_eq!(wait_response(&dir, |l| l != "0:Ready"), device_line(&m));
    server.stop();
}

#[test]
fn the_same_command_rewritten_runs_once() {
    let root = TempRoot::new("once");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    assert_eq!(issue(&dir, "1"), VECTOR_ADD);
    for _ in 0..20 {
        write_command(&dir, "1\n");
    }
    let tmp = dir.join("replacement");
    std::fs::write(&tmp, "1\n").unwrap();
    std::fs::rename(&tmp, dir.join("command.txt")).unwrap();
    wait_passes(&server, 3);
    assert_eq!(requests(&m, tenant), 1);
    assert_eq!(response(&dir), VECTOR_ADD);

    // The reset is what makes it a new command.
    write_command(&dir, "0\n");
    assert_eq!(wait_response(&dir, |l| status(l) == Some(0)), "0:Ready");
    write_command(&dir, "1\n");
    assert_eq!(wait_response(&dir, |l| status(l) == Some(1)), VECTOR_ADD);
    assert_eq!(requests(&m, tenant), 2);
    server.stop();
}

#[test]
fn a_command_file_replaced_while_it_is_read_runs_once() {
    let root = TempRoot::new("replaced");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    // Rename-replaced and rewritten in place as fast as possible while the transport
    // scans; every version reads "2\n" (or, mid-rewrite, nothing).
    let writer_dir = dir.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..3000 {
            if i % 2 == 0 {
                let tmp = writer_dir.join(format!("next-{i}"));
                std::fs::write(&tmp, "2\n").unwrap();
                std::fs::rename(&tmp, writer_dir.join("command.txt")).unwrap();
            } else {
                std::fs::write(writer_dir.join("command.txt"), "2\n").unwrap();
            }
        }
    });
    writer.join().unwrap();
    assert_eq!(wait_response(&dir, |l| l != "0:Ready"), device_line(&m));
    wait_passes(&server, 2);
    assert_eq!(requests(&m, tenant), 1, "executed once");
    assert_eq!(response(&dir), device_line(&m));
    server.stop();
}

/// Executors that cannot be created until the test opens the gate: a vector add submitted
/// meanwhile stays running for as long as the test needs.
struct GatedFactory {
    inner: CpuExecutorFactory,
    open: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<mpsc::Sender<()>>,
}

impl GatedFactory {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl ExecutorFactory for GatedFactory {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }

    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        let _ = self.entered.lock().unwrap().send(());
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        self.inner.create()
    }
}

fn gated() -> (Arc<GatedFactory>, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let factory = Arc::new(GatedFactory {
        inner: CpuExecutorFactory::new(),
        open: Mutex::new(false),
        opened: Condvar::new(),
        entered: Mutex::new(tx),
    });
    (factory, rx)
}

#[test]
fn a_different_command_written_while_one_runs_is_not_lost() {
    let root = TempRoot::new("rewritten");
    let (factory, entered) = gated();
    let m = Mediator::new(factory.clone());
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    write_command(&dir, "1\n");
    entered.recv().unwrap(); // the vector add is running
    write_command(&dir, "2\n");
    wait_passes(&server, 2);
    assert_eq!(response(&dir), "0:Ready", "nothing answered while it runs");
    factory.open();
    assert_eq!(wait_response(&dir, |l| l != "0:Ready"), device_line(&m));
    // The vector add's result was dropped and the device information ran after it.
    wait_passes(&server, 2);
    assert_eq!(requests(&m, tenant), 2);
    assert_eq!(response(&dir), device_line(&m));
    server.stop();
}

#[test]
fn the_same_command_written_while_it_runs_is_answered_by_that_run() {
    let root = TempRoot::new("rewritten-same");
    let (factory, entered) = gated();
    let m = Mediator::new(factory.clone());
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    let tenant = server.tenant("vm1").unwrap();

    write_command(&dir, "1\n");
    entered.recv().unwrap();
    write_command(&dir, "1\n");
    wait_passes(&server, 2);
    factory.open();
    assert_eq!(wait_response(&dir, |l| l != "0:Ready"), VECTOR_ADD);
    wait_passes(&server, 2);
    assert_eq!(requests(&m, tenant), 1);
    server.stop();
}

#[test]
fn a_response_file_changed_by_someone_else_is_restored() {
    let root = TempRoot::new("restore");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    assert_eq!(issue(&dir, "1"), VECTOR_ADD);
    std::fs::write(dir.join("response.txt"), "1:forged\n").unwrap();
    assert_eq!(wait_response(&dir, |l| l != "1:forged"), VECTOR_ADD);
    // Deleted, it stays deleted until the next answer.
    std::fs::remove_file(dir.join("response.txt")).unwrap();
    wait_passes(&server, 2);
    assert_eq!(response(&dir), "");
    assert_eq!(issue(&dir, "2"), device_line(&m));
    server.stop();
}

#[test]
fn two_vms_hammering_their_own_directories_get_every_answer_right() {
    const COMMANDS: usize = 1000;
    let root = TempRoot::new("hammer");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1", "vm2"]));
    let device = device_line(&m);

    let vms: Vec<_> = ["vm1", "vm2"]
        .into_iter()
        .map(|vm| {
            let dir = root.join(vm);
            let device = device.clone();
            std::thread::spawn(move || {
                let mut valid = 0u64;
                for i in 0..COMMANDS {
                    // A word unique to this VM and command every fourth time, so that an
                    // answer crossing over, or an old one read again, cannot go unnoticed
                    // (digits: the only unknown words echoed back).
                    let (word, expected) = match i % 4 {
                        3 => {
                            let w = format!("{}{i:04}", if vm == "vm1" { 7 } else { 8 });
                            let e = unknown(&w);
                            (w, e)
                        }
                        1 => ("2".to_owned(), device.clone()),
                        _ => ("1".to_owned(), VECTOR_ADD.to_owned()),
                    };
                    let got = issue(&dir, &word);
                    assert_eq!(got, expected, "{vm} command {i} ({word})");
                    if i % 4 != 3 {
                        valid += 1;
                    }
                }
                valid
            })
        })
        .collect();
    let valid: Vec<u64> = vms.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(valid, [750, 750]);
    for vm in ["vm1", "vm2"] {
        let tenant = server.tenant(vm).unwrap();
        assert_eq!(
            requests(&m, tenant),
            750,
            "{vm}: each command ran exactly once"
        );
    }
    server.stop();
}

#[test]
fn the_root_must_exist_be_a_directory_and_be_writable() {
    let root = TempRoot::new("refuse");
    let m = cpu_mediator();
    let missing = root.join("missing");
    match NfsServer::start(m.clone(), NfsOptions::new(&missing)) {
        Err(NfsError::RootMissing(p)) => assert_eq!(p, missing),
        other => panic!("{other:?}"),
    }
    std::fs::write(root.join("file"), "").unwrap();
    assert!(matches!(
        NfsServer::start(m.clone(), NfsOptions::new(root.join("file"))),
        Err(NfsError::RootNotDirectory(_))
    ));
    // Not writable even for root.
    let e = NfsServer::start(m.clone(), NfsOptions::new("/proc")).unwrap_err();
    assert!(matches!(e, NfsError::RootNotWritable { .. }), "{e:?}");
    assert_eq!(e.to_string(), "NFS root /proc is not writable");

    for bad in ["../etc", ".hidden", "a/b", ""] {
        let e = NfsServer::start(m.clone(), options(&root, &[bad])).unwrap_err();
        assert!(matches!(e, NfsError::InvalidVmName(_)), "{bad}: {e:?}");
    }
    let e = NfsServer::start(m.clone(), options(&root, &["vm1", "vm1"])).unwrap_err();
    assert!(matches!(e, NfsError::DuplicateVm(_)), "{e:?}");
    std::os::unix::fs::symlink("/tmp", root.join("vm7")).unwrap();
    let e = NfsServer::start(m.clone(), options(&root, &["vm7"])).unwrap_err();
    assert!(matches!(e, NfsError::VmDirectory { .. }), "{e:?}");

    let server = start(&m, options(&root, &["vm1"]));
    let e = NfsServer::start(m.clone(), options(&root, &["vm2"])).unwrap_err();
    assert!(matches!(e, NfsError::RootBusy(_)), "{e:?}");
    assert!(
        !root.join("vm2").exists(),
        "a refused start creates nothing"
    );
    server.stop();
    assert!(m.tenants().is_empty(), "no tenant left behind");
}

#[test]
fn stop_removes_its_tenants_and_deletes_nothing() {
    let root = TempRoot::new("stop");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1"]));
    let dir = root.join("vm1");
    std::fs::write(dir.join("notes.txt"), "the guest's").unwrap();
    std::fs::write(dir.join(".response.txt.1.1.tmp"), "someone else's").unwrap();
    assert_eq!(issue(&dir, "2"), device_line(&m));
    server.stop();
    assert!(m.tenants().is_empty());

    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".response.txt.1.1.tmp",
            "command.txt",
            "notes.txt",
            "response.txt"
        ]
    );
    assert_eq!(response(&dir), device_line(&m), "the last answer stays");
}

#[test]
fn serve_runs_until_sigterm_and_refuses_a_missing_root() {
    let root = TempRoot::new("cli");
    let bin = env!("CARGO_BIN_EXE_vgpu-mediator");
    let mut child = std::process::Command::new(bin)
        .args([
            "--executor",
            "cpu",
            "serve",
            "--poll-ms",
            "5",
            "--vm",
            "vm1",
        ])
        .arg("--nfs-root")
        .arg(root.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = root.join("vm1");
    assert_eq!(wait_response(&dir, |l| !l.is_empty()), "0:Ready");
    assert_eq!(issue(&dir, "1"), VECTOR_ADD);
    assert_eq!(
        issue(&dir, "2"),
        format!("1:{}", selftest::device_line(cpu_mediator().device()))
    );
    // SAFETY: signals a child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());

    let out = std::process::Command::new(bin)
        .args(["--executor", "cpu", "serve", "--nfs-root"])
        .arg(root.join("absent"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l
            == format!(
                "vgpu-mediator: NFS root {} does not exist (create and export it first)",
                root.join("absent").display()
            )),
        "{stderr}"
    );
}

// ---- The security review's attacks ------------------------------------------------------

/// The names the transport serves.
fn served(server: &NfsServer) -> Vec<String> {
    server.tenants().into_iter().map(|(n, _)| n).collect()
}

/// Warnings the code under test logs, kept by this test binary's logger.
struct Warnings(Mutex<Vec<String>>);

static WARNINGS: Warnings = Warnings(Mutex::new(Vec::new()));

impl log::Log for Warnings {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }

    fn flush(&self) {}
}

/// The warnings logged so far that contain `needle`.
fn warnings_about(needle: &str) -> Vec<String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&WARNINGS).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Warn);
    });
    let all = WARNINGS.0.lock().unwrap_or_else(|e| e.into_inner());
    all.iter().filter(|l| l.contains(needle)).cloned().collect()
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn mkfifo(path: &Path) {
    // SAFETY: a NUL-terminated path.
    let rc = unsafe { libc::mkfifo(cpath(path).as_ptr(), 0o666) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A character device node with /dev/null's numbers (harmless whoever opens it).
fn mknod_null(path: &Path) {
    let dev = libc::makedev(1, 3);
    // SAFETY: a NUL-terminated path.
    let rc = unsafe { libc::mknod(cpath(path).as_ptr(), libc::S_IFCHR | 0o666, dev) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Puts what `make` creates (given a path) in place of `dir/command.txt`, by a rename.
fn plant(dir: &Path, make: impl FnOnce(&Path)) {
    let tmp = dir.join(".planted");
    make(&tmp);
    std::fs::rename(&tmp, dir.join("command.txt")).unwrap();
}

fn is_root() -> bool {
    // SAFETY: no arguments, no failure.
    unsafe { libc::geteuid() == 0 }
}

/// Watches a FIFO for anyone opening it for reading, for as long as it lives:
/// - a writer blocked in `open(O_WRONLY)` returns as soon as a reader has opened the FIFO,
///   even for an instant, so whether it has returned says whether that ever happened;
/// - a prober opening it with `O_WRONLY | O_NONBLOCK` must get ENXIO (no reader) every
///   time.
struct FifoWatch {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    opened: mpsc::Receiver<()>,
    writer: Option<std::thread::JoinHandle<()>>,
    prober: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl FifoWatch {
    fn new(path: &Path) -> FifoWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, opened) = mpsc::channel();
        let p = path.to_path_buf();
        let writer = std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&p);
            if file.is_ok() {
                let _ = tx.send(());
            }
        });
        let (p, s) = (cpath(path), stop.clone());
        let prober = std::thread::spawn(move || {
            let mut probes = 0u64;
            let mut readers = Vec::new();
            // At least one probe, however soon the watch ends.
            loop {
                // SAFETY: a NUL-terminated path; the descriptor is closed at once.
                let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK) };
                let e = std::io::Error::last_os_error();
                if fd >= 0 {
                    // SAFETY: a descriptor this thread just opened.
                    unsafe { libc::close(fd) };
                    readers.push("opened: the FIFO had a reader".to_owned());
                } else if e.raw_os_error() != Some(libc::ENXIO) {
                    readers.push(format!("unexpected error {e}"));
                }
                probes += 1;
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            (probes, readers)
        });
        FifoWatch {
            path: path.to_path_buf(),
            stop,
            opened,
            writer: Some(writer),
            prober: Some(prober),
        }
    }

    /// Whether a reader has opened the FIFO so far.
    fn opened_yet(&self) -> bool {
        self.writer.as_ref().is_some_and(|w| w.is_finished())
    }

    /// Panics if anyone opened the FIFO for reading; stops watching.
    fn assert_never_opened(mut self) {
        let opened = self.opened.try_recv().is_ok();
        self.stop.store(true, Ordering::Relaxed);
        let (probes, readers) = self.prober.take().unwrap().join().unwrap();
        assert!(
            !opened,
            "{} was opened for reading: a writer blocked on it got through",
            self.path.display()
        );
        assert!(probes > 0);
        assert!(readers.is_empty(), "{} probes: {readers:?}", probes);
        self.release();
    }

    /// Lets the blocked writer go (by opening the FIFO ourselves).
    fn release(&mut self) {
        if let Some(writer) = self.writer.take() {
            let reader = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.path);
            writer.join().unwrap();
            drop(reader);
        }
    }
}

impl Drop for FifoWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(prober) = self.prober.take() {
            let _ = prober.join();
        }
        self.release();
    }
}

/// Review finding "NFS discovery creates a tenant per directory": 1,000 `mkdir`s made
/// 1,000 tenants. Without --discover a directory a guest creates is no tenant.
#[test]
fn directories_a_guest_creates_are_no_tenants_by_default() {
    let root = TempRoot::new("mkdir-flood");
    let m = cpu_mediator();

    // No list: the single-VM layout, the pair at the root.
    let server = start(&m, options(&root, &[]));
    for i in 0..200 {
        std::fs::create_dir(root.join(&format!("vm{i}"))).unwrap();
    }
    wait_passes(&server, 3);
    assert_eq!(
        served(&server),
        ["root"],
        "no tenant for any of 200 vm* directories"
    );
    assert_eq!(m.tenants().len(), 1);
    assert!(!root.join("vm7/response.txt").exists());
    let tenant = server.tenant("root").unwrap();
    assert_eq!(
        m.device_config(tenant).unwrap().mem_quota,
        vgpu_nfs::DEFAULT_MEM_QUOTA,
        "the small default"
    );
    assert_eq!(issue(root.path(), "1"), VECTOR_ADD);
    server.stop();

    // A list: exactly those.
    let server = start(&m, options(&root, &["vm1", "vm2"]));
    for i in 200..400 {
        std::fs::create_dir(root.join(&format!("vm{i}"))).unwrap();
    }
    wait_passes(&server, 3);
    assert_eq!(served(&server), ["vm1", "vm2"]);
    assert_eq!(m.tenants().len(), 2);
    assert_eq!(issue(&root.join("vm2"), "2"), device_line(&m));
    server.stop();
    assert!(m.tenants().is_empty());
}

/// With discovery asked for, at most `max_vms` discovered directories are tenants; the
/// rest are ignored with one warning each, however many scans see them.
#[test]
fn discovery_when_asked_for_is_capped_and_warns_once_per_directory() {
    let root = TempRoot::new("discover-cap");
    let m = cpu_mediator();
    let key = root.path().display().to_string();
    assert!(warnings_about(&key).is_empty());
    for i in 10..20 {
        std::fs::create_dir(root.join(&format!("vm{i}"))).unwrap();
    }
    let opts = NfsOptions {
        discover: true,
        max_vms: 4,
        ..options(&root, &["vm1"])
    };
    let server = start(&m, opts);
    for i in 20..30 {
        std::fs::create_dir(root.join(&format!("vm{i}"))).unwrap();
    }
    wait_passes(&server, 10);
    // The listed VM is not counted against the cap; discovery picks in name order.
    assert_eq!(served(&server), ["vm1", "vm10", "vm11", "vm12", "vm13"]);
    assert_eq!(m.tenants().len(), 5);
    // Warnings that a directory is ignored (a directory removed while a scan serves it
    // may add one that it cannot be opened: not counted).
    let ignored = || {
        let all = warnings_about(&key);
        all.into_iter()
            .filter(|w| w.contains("ignoring VM directory") || w.contains("beyond the cap"))
            .count()
    };
    assert_eq!(ignored(), 16, "{:?}", warnings_about(&key));
    for i in 14..30 {
        let name = format!("{key}/vm{i}");
        let named = warnings_about(&name);
        assert_eq!(
            named
                .iter()
                .filter(|w| w.contains(&format!("{name}:")))
                .count(),
            1
        );
    }
    assert_eq!(issue(&root.join("vm11"), "2"), device_line(&m));

    // One goes away: its place is taken, and nothing is warned again.
    std::fs::remove_dir_all(root.join("vm10")).unwrap();
    wait_passes(&server, 5);
    assert_eq!(served(&server), ["vm1", "vm11", "vm12", "vm13", "vm14"]);
    assert_eq!(ignored(), 16, "{:?}", warnings_about(&key));
    server.stop();
    assert!(m.tenants().is_empty());

    let e = NfsServer::start(
        m.clone(),
        NfsOptions {
            discover: true,
            max_vms: 0,
            ..options(&root, &[])
        },
    )
    .unwrap_err();
    assert!(matches!(e, NfsError::InvalidMaxVms), "{e:?}");
}

/// Review finding "NFS stat-then-open race", the plain form: a FIFO, a symbolic link and
/// (as root) a device node in place of `command.txt`, each answered with an error and
/// never opened; the lock file too.
#[test]
fn special_files_in_place_of_the_command_file_are_refused_and_never_opened() {
    let root = TempRoot::new("special");
    let outside = TempRoot::new("special-outside");
    let m = cpu_mediator();
    // The lock file in the root, a FIFO planted before the start: not opened, and the
    // start fails with one clear error.
    let lock = root.join(".vgpu-nfs.lock");
    mkfifo(&lock);
    let watch_lock = FifoWatch::new(&lock);
    let e = NfsServer::start(m.clone(), options(&root, &["vm1"])).unwrap_err();
    assert!(
        e.to_string().contains("not writable") && format!("{e:?}").contains("not a regular file"),
        "{e:?}"
    );
    watch_lock.assert_never_opened();
    std::fs::remove_file(&lock).unwrap();

    let server = start(&m, options(&root, &["vm1", "vm2"]));
    let (vm1, vm2) = (root.join("vm1"), root.join("vm2"));
    let command = vm1.join("command.txt");
    let tenant = server.tenant("vm1").unwrap();

    mkfifo(&command);
    let watch = FifoWatch::new(&command);
    assert_eq!(wait_response(&vm1, |l| status(l) == Some(2)), not_regular());
    wait_passes(&server, 5);
    assert_eq!(
        issue(&vm2, "1"),
        VECTOR_ADD,
        "the other VM is served meanwhile"
    );
    watch.assert_never_opened();
    std::fs::remove_file(&command).unwrap();
    reset(&vm1);

    // A symbolic link to a FIFO outside: the link is not followed.
    let fifo = outside.join("fifo");
    mkfifo(&fifo);
    let watch = FifoWatch::new(&fifo);
    plant(&vm1, |p| std::os::unix::fs::symlink(&fifo, p).unwrap());
    assert_eq!(wait_response(&vm1, |l| status(l) == Some(2)), not_regular());
    wait_passes(&server, 5);
    watch.assert_never_opened();
    std::fs::remove_file(&command).unwrap();
    reset(&vm1);

    if is_root() {
        plant(&vm1, mknod_null);
        assert_eq!(wait_response(&vm1, |l| status(l) == Some(2)), not_regular());
        wait_passes(&server, 5);
        assert_eq!(issue(&vm2, "2"), device_line(&m));
        std::fs::remove_file(&command).unwrap();
        reset(&vm1);
    } else {
        eprintln!("not root: the device-node case is skipped");
    }

    assert_eq!(requests(&m, tenant), 0, "nothing reached the executor");
    assert_eq!(issue(&vm1, "1"), VECTOR_ADD);
    server.stop();
}

/// Review finding "NFS stat-then-open race", the attack: `command.txt` swapped as fast as
/// possible between a regular file and a FIFO (a hard link of one outside the VM
/// directory), a symbolic link to it and (as root) a device node. The unfixed transport
/// checked the name, then opened the name, and so opened the FIFO thousands of times.
#[test]
fn swapping_special_files_in_for_the_command_file_never_gets_one_opened() {
    let root = TempRoot::new("swap");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1", "vm2"]));
    let (vm1, vm2) = (root.join("vm1"), root.join("vm2"));
    let fifo = root.join("fifo");
    mkfifo(&fifo);
    let watch = FifoWatch::new(&fifo);

    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let (dir, fifo, stop) = (vm1.clone(), fifo.clone(), stop.clone());
        std::thread::spawn(move || {
            let command = dir.join("command.txt");
            let regular = dir.join(".regular");
            // Mostly links of one regular file (fast: no data written), now and then a
            // fresh file of its own, a symbolic link and a device node.
            let master = dir.join(".master");
            std::fs::write(&master, "2\n").unwrap();
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if swaps % 16 == 0 {
                    std::fs::write(&regular, "2\n").unwrap();
                } else {
                    std::fs::hard_link(&master, &regular).unwrap();
                }
                std::fs::rename(&regular, &command).unwrap();
                let tmp = dir.join(".fifo");
                std::fs::hard_link(&fifo, &tmp).unwrap();
                std::fs::rename(&tmp, &command).unwrap();
                if swaps % 16 == 8 {
                    let tmp = dir.join(".link");
                    std::os::unix::fs::symlink(&fifo, &tmp).unwrap();
                    std::fs::rename(&tmp, &command).unwrap();
                    if is_root() {
                        let tmp = dir.join(".device");
                        mknod_null(&tmp);
                        std::fs::rename(&tmp, &command).unwrap();
                    }
                }
                swaps += 1;
            }
            swaps
        })
    };
    // The other VM is served all along; the attack lasts while it issues its commands
    // and for 5,000 scans of the attacked directory (thousands of swaps).
    let started = Instant::now();
    let first = server.passes();
    for i in 0..10 {
        let (word, expected) = if i % 2 == 0 {
            ("1", VECTOR_ADD.to_owned())
        } else {
            ("2", device_line(&m))
        };
        assert_eq!(issue(&vm2, word), expected);
    }
    while server.passes() < first + 5000 && started.elapsed() < Duration::from_secs(20) {
        if watch.opened_yet() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = attacker.join().unwrap();
    eprintln!(
        "{swaps} swap cycles, {} scans in {:?}",
        server.passes() - first,
        started.elapsed()
    );
    watch.assert_never_opened();
    // Whatever the attacked directory was answered, it is one of these.
    let line = response(&vm1);
    let linked = format!("2:command.txt has more than one link, so it is not read: {HELP}");
    assert!(
        [device_line(&m), not_regular(), linked, READY.to_owned()].contains(&line),
        "{line}"
    );
    // And the attacked VM is served again once it behaves.
    std::fs::remove_file(vm1.join("command.txt")).unwrap();
    reset(&vm1);
    assert_eq!(issue(&vm1, "1"), VECTOR_ADD);
    assert_eq!(issue(&vm2, "1"), VECTOR_ADD);
    server.stop();
}

/// Review finding "Hard links leak": a `command.txt` hard-linked to a host file holding
/// a secret was read and its first 40 characters echoed into `response.txt`.
#[test]
fn a_hard_linked_command_file_is_never_read_or_echoed() {
    let root = TempRoot::new("hardlink");
    let host = TempRoot::new("hardlink-host");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &["vm1", "vm2"]));
    let (vm1, vm2) = (root.join("vm1"), root.join("vm2"));
    let command = vm1.join("command.txt");
    let tenant = server.tenant("vm1").unwrap();
    let secret = host.join("secret");
    std::fs::write(&secret, "host secret: 12345\n").unwrap();

    std::fs::hard_link(&secret, &command).unwrap();
    let line = wait_response(&vm1, |l| status(l) == Some(2));
    assert!(
        !line.contains("secret") && !line.contains("12345"),
        "{line}"
    );
    assert_eq!(
        line,
        format!("2:command.txt has more than one link, so it is not read: {HELP}")
    );
    assert_eq!(
        issue(&vm2, "2"),
        device_line(&m),
        "the other VM is served meanwhile"
    );
    std::fs::remove_file(&command).unwrap();
    reset(&vm1);

    // A valid command behind a hard link is refused all the same.
    let other = vm1.join("other");
    std::fs::write(&other, "1\n").unwrap();
    std::fs::hard_link(&other, vm1.join("link")).unwrap();
    std::fs::rename(vm1.join("link"), &command).unwrap();
    let line = wait_response(&vm1, |l| status(l) == Some(2));
    assert!(line.contains("more than one link"), "{line}");
    assert_eq!(requests(&m, tenant), 0);
    std::fs::remove_file(&command).unwrap();
    std::fs::remove_file(&other).unwrap();
    reset(&vm1);

    // The same text in a file of the VM's own: an unknown command, not echoed.
    std::fs::write(&command, "host secret: 12345\n").unwrap();
    let line = wait_response(&vm1, |l| status(l) == Some(2));
    assert_eq!(line, format!("2:unknown command: {HELP}"));

    assert_eq!(issue(&vm1, "1"), VECTOR_ADD);
    assert_eq!(requests(&m, tenant), 1);
    server.stop();
}

#[test]
fn serve_help_describes_the_vm_list_discovery_and_the_cap() {
    let bin = env!("CARGO_BIN_EXE_vgpu-mediator");
    let out = std::process::Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--vm <NAME>",
        "--discover",
        "--max-vms <N>",
        "[default: 16]",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(help.contains("[default: 1G]"), "{help}");
    // The cap means nothing without discovery: refused, in one line.
    let root = TempRoot::new("cli-cap");
    let out = std::process::Command::new(bin)
        .args(["--executor", "cpu", "serve", "--max-vms", "3", "--nfs-root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--discover"), "{stderr}");
}
