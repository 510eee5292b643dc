//! The NFS file transport on a local directory, with the CPU executor: both layouts,
//! both commands, everything a guest may leave in `command.txt`, and two VMs hammering
//! their own directories at once. Waits are on what the files read or on the transport's
//! completed scans, never on the clock.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vgpu_mediator::cpu::CpuExecutorFactory;
use vgpu_mediator::executor::ExecResult;
use vgpu_mediator::nfs::{NfsError, NfsOptions, NfsServer};
use vgpu_mediator::{selftest, DeviceInfo, Executor, ExecutorFactory, Mediator, TenantId};

const VECTOR_ADD: &str = "1:Vector add PASSED: 1024 elements, 0 errors (CPU reference executor)";
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

fn unknown(word: &str) -> String {
    format!("2:unknown command '{word}': {HELP}")
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
fn vm_directories_are_discovered_as_they_appear_and_dropped_when_gone() {
    let root = TempRoot::new("discover");
    let outside = TempRoot::new("outside");
    let m = cpu_mediator();
    let server = start(&m, options(&root, &[]));

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

    assert_eq!(issue(&dir, "hello"), unknown("hello"));
    assert_eq!(issue(&dir, "3"), unknown("3"));
    assert_eq!(issue(&dir, "01"), unknown("01"));
    assert_eq!(issue(&dir, "1 2"), unknown("1 2"));
    assert_eq!(issue(&dir, "1\n2"), unknown("1\\n2"));
    assert_eq!(issue(&dir, "\u{ff}'x"), unknown("\u{ff}\\'x"));
    assert_eq!(
        issue(&dir, &"x".repeat(300)),
        format!("2:command.txt is longer than 256 bytes: {HELP}")
    );
    // Bytes that are not UTF-8 at all.
    reset(&dir);
    std::fs::write(dir.join("command.txt"), b"\xff\xfe\n").unwrap();
    assert_eq!(
        wait_response(&dir, |l| status(l) == Some(2)),
        unknown("\u{fffd}\u{fffd}")
    );
    // A link planted in place of the command file is never followed.
    reset(&dir);
    std::fs::remove_file(dir.join("command.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("command.txt")).unwrap();
    assert_eq!(
        wait_response(&dir, |l| status(l) == Some(2)),
        format!("2:command.txt is not a regular file: {HELP}")
    );
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
                    // answer crossing over, or an old one read again, cannot go unnoticed.
                    let (word, expected) = match i % 4 {
                        3 => {
                            let w = format!("{vm}-{i}");
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
