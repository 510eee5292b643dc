// SPDX-License-Identifier: Apache-2.0
//! Remote executors against the real `vgpu-worker` binary (`--executor cpu`, so no GPU is
//! needed), started per test on 127.0.0.1 with its own key file:
//!
//! - a mediator on `--executor remote:...` answers every request exactly as one on the
//!   local CPU executor, and an error the executor finds in an operation nobody waits for
//!   surfaces at the next call that waits, as with local worker processes;
//! - wrong keys, unknown names, other link versions and key files others can read are
//!   refused, with messages that say why;
//! - a worker that is killed, or a connection that is cut in the middle of a request,
//!   costs the sessions it carried `DEVICE_LOST` (never a hang, never a silent retry),
//!   and the worker, or a new one on the same port, serves on;
//! - hostile peers: an oversized message or garbage instead of a hello ends only that
//!   connection at the worker; a worker that answers what nobody asked, or sends bytes
//!   that are no reply, ends only that executor at the mediator;
//! - everything a connection held is freed at the worker when it ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;
use vgpu_mediator::cpu::{CpuExecutor, CpuExecutorFactory};
use vgpu_mediator::executor::{BufferId, ExecParam, Executor, KernelRef};
use vgpu_mediator::process::{ProcessExecutorFactory, WORKER_ENV};
use vgpu_mediator::remote::link::{self, Conn, Endpoint, HandshakeError, Key, KeyFile};
use vgpu_mediator::remote::wire::{MAX_REPLY, MAX_REQUEST, PIECE};
use vgpu_mediator::remote::{client, Credentials, RemoteExecutorFactory, RemoteSpec};
use vgpu_mediator::{
    select_with, ExecutorChoice, ExecutorFactory, ExecutorOptions, Mediator, TenantConfig, TenantId,
};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

const WORKER: &str = env!("CARGO_BIN_EXE_vgpu-worker");
const EXECUTOR_WORKER: &str = env!("CARGO_BIN_EXE_vgpu-executor-worker");
/// The mediator the workers serve.
const NAME: &str = "mediator-a";
/// Longest any one step may take before the test calls it a hang (generous: debug builds
/// on a busy machine).
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Fixtures: key files, the worker process, mediators

/// A directory of its own, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vgpu-remote-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_file(path: &Path, text: &str, mode: u32) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    // Whatever the umask took away.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A key line from `vgpu-worker keygen NAME`, and its key.
fn keygen(name: &str) -> (String, Key) {
    let out = Process::new(WORKER)
        .args(["keygen", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "keygen: {out:?}");
    let line = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (got, key) = KeyFile::parse(&line).unwrap().identity().unwrap();
    assert_eq!(got, name);
    (line, key)
}

/// Keys for one test: the worker serves [`NAME`] and a second mediator.
struct Keys {
    dir: TempDir,
    /// The worker's key file (0600).
    worker: PathBuf,
    /// [`NAME`]'s key file (0600).
    mediator: PathBuf,
    key: Key,
}

impl Keys {
    fn new(tag: &str) -> Keys {
        let dir = TempDir::new(tag);
        let (line, key) = keygen(NAME);
        let (other, _) = keygen("mediator-b");
        let worker = dir.path("worker.keys");
        write_file(&worker, &format!("# served\n{line}\n{other}\n"), 0o600);
        let mediator = dir.path("remote.key");
        write_file(&mediator, &format!("{line}\n"), 0o600);
        Keys {
            dir,
            worker,
            mediator,
            key,
        }
    }

    fn creds(&self) -> Credentials {
        Credentials {
            name: NAME.into(),
            key: self.key.clone(),
        }
    }

    /// Another mediator key file (for refusals).
    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = self.dir.path(name);
        write_file(&p, text, mode);
        p
    }
}

/// A `vgpu-worker --executor cpu` process; killed when dropped.
struct Worker {
    child: Child,
    endpoint: Endpoint,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    /// Starts a worker on 127.0.0.1:`port` (0: a free port) and waits until it serves.
    fn start(keys: &Path, port: u16) -> Worker {
        if port != 0 {
            return Worker::try_start(keys, port).unwrap_or_else(|log| panic!("{log}"));
        }
        // `--listen` takes no port 0: a port that was free a moment ago, and another if
        // someone took it meanwhile.
        let mut tries = 0;
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            match Worker::try_start(keys, port) {
                Ok(w) => return w,
                Err(log) if tries < 5 && log.contains("in use") => tries += 1,
                Err(log) => panic!("{log}"),
            }
        }
    }

    fn try_start(keys: &Path, port: u16) -> Result<Worker, String> {
        let mut child = Process::new(WORKER)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--keys")
            .arg(keys)
            .args(["--executor", "cpu"])
            .env(WORKER_ENV, EXECUTOR_WORKER)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + HANG;
        let at = loop {
            let found = log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("serving ") && l.contains(" on 127.0.0.1:"))
                .cloned();
            if let Some(line) = found {
                break line.rsplit(" on ").next().unwrap().trim().to_string();
            }
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "vgpu-worker exited ({status}):\n{}",
                    log.lock().unwrap().join("\n")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "vgpu-worker did not start:\n{}",
                    log.lock().unwrap().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let endpoint: Endpoint = at.parse().unwrap();
        let Endpoint::Tcp { port, .. } = endpoint else {
            panic!("{at}")
        };
        Ok(Worker {
            child,
            endpoint,
            port,
            log,
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL, and reaped: its sockets are closed once this returns.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_has(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.log.lock().unwrap().iter().any(|l| pred(l))
    }

    /// Waits until a log line satisfies `pred`.
    fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) {
        eventually(what, HANG, || self.log_has(&pred));
        // Shown with the test's output, as the worker's own account.
        let log = self.log.lock().unwrap();
        if let Some(line) = log.iter().find(|l| pred(l)) {
            eprintln!("worker: {line}");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- vgpu-worker log ---\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
    }
}

fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sessions the worker serves now, besides the connection that asks.
fn sessions(endpoint: &Endpoint, creds: &Credentials) -> u32 {
    client::hello(endpoint, creds).unwrap().sessions
}

fn wait_sessions(endpoint: &Endpoint, creds: &Credentials, n: u32) {
    let deadline = Instant::now() + HANG;
    loop {
        let now = sessions(endpoint, creds);
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker serves {now} session(s), not {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes `pid` started that still run.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, then the parent's pid.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(1) == Some(&pid.to_string().as_str()) {
            out.push(p);
        }
    }
    out
}

fn remote_options(key: &Path) -> ExecutorOptions {
    ExecutorOptions {
        remote_key: Some(key.to_path_buf()),
        remote_wait: Some(Duration::from_secs(10)),
        kernel_timeout: Some(HANG),
        ..ExecutorOptions::default()
    }
}

fn spec(endpoint: &Endpoint) -> RemoteSpec {
    RemoteSpec::one_gpu(vec![endpoint.clone()])
}

/// What a mediator started with `--executor remote:ENDPOINT --remote-key KEY` runs on.
fn remote_factory(endpoint: &Endpoint, key: &Path) -> Arc<dyn ExecutorFactory> {
    select_with(ExecutorChoice::Remote(spec(endpoint)), &remote_options(key)).unwrap()
}

fn tenant(m: &Mediator, name: &str) -> TenantId {
    m.add_tenant(TenantConfig {
        name: name.into(),
        mem_quota: 256 << 20,
        weight: 100,
    })
    .unwrap()
}

/// A command for messages: its data's length, not its data.
fn describe(command: &Command) -> String {
    match command {
        Command::Htod { dst, offset, data } => {
            format!(
                "Htod {{ dst: {dst}, offset: {offset}, len: {} }}",
                data.len()
            )
        }
        other => format!("{other:?}"),
    }
}

/// `Mediator::call` that fails the test instead of hanging.
fn call(m: &Arc<Mediator>, t: TenantId, s: u64, command: Command) -> Response {
    let (tx, rx) = mpsc::channel();
    let m2 = m.clone();
    let what = describe(&command);
    std::thread::spawn(move || {
        let _ = tx.send(m2.call(t, Request::new(s, command)));
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("no answer within {HANG:?} to {what:.80}"))
}

fn ok(m: &Arc<Mediator>, t: TenantId, s: u64, command: Command) -> Response {
    let what = describe(&command);
    let r = call(m, t, s, command);
    assert_eq!(r.status, Status::Ok, "{what:.80}");
    r
}

fn lost(m: &Arc<Mediator>, t: TenantId, s: u64, command: Command) {
    let what = describe(&command);
    let r = call(m, t, s, command);
    assert_eq!(r.status, Status::DeviceLost, "{what:.80}");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn launch(kernel: &str, elements: u32, params: Vec<Param>) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: kernel.into(),
        grid: [elements.div_ceil(256), 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
        params,
    })
}

fn fill(buf: u64, value: u32, count: u32) -> Command {
    launch(
        "fill_u32",
        count,
        vec![Param::Buffer(buf), Param::u32(value), Param::u32(count)],
    )
}

fn spin(buf: u64, us: u32) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "spin_us".into(),
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(buf), Param::u32(us)],
    })
}

/// A session that works: a round trip through a fresh buffer (of more than one of the
/// link's records).
fn works(m: &Arc<Mediator>, t: TenantId, s: u64, seed: u8) {
    let len = (64 << 10) + 4099;
    let b = ok(m, t, s, Command::Alloc { size: len as u64 }).value0;
    let data = pattern(len, seed);
    ok(
        m,
        t,
        s,
        Command::Htod {
            dst: b,
            offset: 0,
            data: data.clone(),
        },
    );
    ok(m, t, s, fill(b, u32::from(seed), 3));
    ok(m, t, s, Command::Sync);
    let back = ok(
        m,
        t,
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len: len as u64,
        },
    )
    .data;
    let mut want = data;
    for w in want[..12].chunks_exact_mut(4) {
        w.copy_from_slice(&u32::from(seed).to_le_bytes());
    }
    assert!(back == want, "the round trip came back different");
    ok(m, t, s, Command::Free { handle: b });
}

/// Panics on threads of the product (the mediator's tenant threads, the remote
/// executor's reader), which a `DEVICE_LOST` answer could otherwise hide.
static PANICKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            PANICKED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name);
            default(info);
        }));
    });
}

fn assert_no_product_thread_panicked() {
    let panicked = PANICKED.lock().unwrap_or_else(|e| e.into_inner());
    let product: Vec<&String> = panicked
        .iter()
        .filter(|n| n.starts_with("vgpu-") || n.starts_with("tenant-"))
        .collect();
    assert!(product.is_empty(), "threads panicked: {product:?}");
}

// ---------------------------------------------------------------------------------------
// 1. The whole operation set, as on the local CPU executor

/// Every operation the CPU executor offers, through a mediator; the answers in order.
fn workload(m: &Arc<Mediator>) -> Vec<(String, Response)> {
    let t = tenant(m, "vm-workload");
    let mut answers: Vec<(String, Response)> = Vec::new();
    let mut run = |s: u64, command: Command| -> Response {
        let what = describe(&command);
        let r = call(m, t, s, command);
        answers.push((what, r.clone()));
        r
    };
    let s = run(0, Command::SessionOpen).value0;
    run(s, Command::Info);

    // Copies that cross the link's pieces at odd offsets and lengths.
    let size = 2 * PIECE as u64 + 3;
    let a = run(s, Command::Alloc { size }).value0;
    let b = run(s, Command::Alloc { size }).value0;
    run(
        s,
        Command::Htod {
            dst: a,
            offset: 5,
            data: pattern(PIECE + 12_345, 1),
        },
    );
    run(
        s,
        Command::Htod {
            dst: a,
            offset: PIECE as u64 + 20_000,
            data: pattern(PIECE / 2 + 1, 2),
        },
    );
    run(
        s,
        Command::Dtoh {
            src: a,
            offset: 1,
            len: 2 * PIECE as u64 + 1,
        },
    );
    run(
        s,
        Command::Memset {
            dst: b,
            offset: 3,
            len: PIECE as u64 / 2 + 5,
            value: 0x5a,
            width: 1,
        },
    );
    run(
        s,
        Command::Memset {
            dst: b,
            offset: PIECE as u64,
            len: PIECE as u64 / 2 + 4,
            value: 0xdead_beef,
            width: 4,
        },
    );
    run(
        s,
        Command::Dtod {
            dst: b,
            dst_offset: PIECE as u64 / 4 + 7,
            src: a,
            src_offset: 1000,
            len: PIECE as u64 / 2 + 3,
        },
    );
    run(
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len: size,
        },
    );

    // Built-in kernels on vectors larger than a piece.
    let n = 70_001u32;
    let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
    let ys: Vec<f32> = (0..n).map(|i| 3.0 - i as f32 * 0.25).collect();
    let bytes = u64::from(n) * 4;
    let x = run(s, Command::Alloc { size: bytes }).value0;
    let y = run(s, Command::Alloc { size: bytes }).value0;
    let z = run(s, Command::Alloc { size: bytes }).value0;
    run(
        s,
        Command::Htod {
            dst: x,
            offset: 0,
            data: f32s(&xs),
        },
    );
    run(
        s,
        Command::Htod {
            dst: y,
            offset: 0,
            data: f32s(&ys),
        },
    );
    run(
        s,
        launch(
            "vector_add_f32",
            n,
            vec![
                Param::Buffer(x),
                Param::Buffer(y),
                Param::Buffer(z),
                Param::u32(n),
            ],
        ),
    );
    run(
        s,
        launch(
            "saxpy_f32",
            n,
            vec![
                Param::Buffer(x),
                Param::Buffer(y),
                Param::f32(1.5),
                Param::u32(n),
            ],
        ),
    );
    run(s, fill(b, 0x0102_0304, 1000));
    run(s, Command::Sync);
    run(
        s,
        Command::Dtoh {
            src: z,
            offset: 0,
            len: bytes,
        },
    );
    run(
        s,
        Command::Dtoh {
            src: y,
            offset: 0,
            len: bytes,
        },
    );
    run(
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len: 4096,
        },
    );
    // Refused requests answer the same, and the session serves on: what a hostile guest
    // sends (sizes past any quota, kernels and modules that do not exist, garbage for
    // PTX, parameters and ranges that do not fit) is an error, here as on the local path.
    let r = run(s, Command::Alloc { size: u64::MAX });
    assert_ne!(r.status, Status::Ok);
    let r = run(s, launch("no_such_kernel", n, vec![Param::Buffer(x)]));
    assert_ne!(r.status, Status::Ok);
    let r = run(
        s,
        Command::Launch(Launch {
            module: 0xdead,
            kernel: "vector_add_f32".into(),
            grid: [1, 1, 1],
            block: [1, 1, 1],
            shared_bytes: 0,
            params: vec![],
        }),
    );
    assert_ne!(r.status, Status::Ok);
    let r = run(
        s,
        Command::ModuleLoad {
            ptx: "\u{7f}ELF not PTX at all".into(),
        },
    );
    assert_ne!(r.status, Status::Ok);
    run(s, launch("vector_add_f32", n, vec![Param::Buffer(x)]));
    run(
        s,
        Command::Dtoh {
            src: a,
            offset: size - 2,
            len: 3,
        },
    );
    run(s, Command::Free { handle: a });
    run(
        s,
        Command::Dtoh {
            src: a,
            offset: 0,
            len: 1,
        },
    );
    run(s, Command::Free { handle: x });
    run(s, Command::Sync);
    run(0, Command::Info);
    run(s, Command::SessionClose);
    run(s, Command::Sync);
    answers
}

#[test]
fn a_mediator_on_a_remote_worker_answers_exactly_as_on_the_local_cpu_executor() {
    watch_panics();
    let keys = Keys::new("workload");
    let worker = Worker::start(&keys.worker, 0);
    let remote = Mediator::new(remote_factory(&worker.endpoint, &keys.mediator));
    let local = Mediator::new(Arc::new(CpuExecutorFactory::new()));
    assert_eq!(remote.device(), local.device());

    let got = workload(&remote);
    let want = workload(&local);
    assert_eq!(got.len(), want.len());
    for ((what, g), (_, w)) in got.iter().zip(&want) {
        assert!(
            g == w,
            "{what}: remote {:?}/{} ({} bytes), local {:?}/{} ({} bytes)",
            g.status,
            g.detail,
            g.data.len(),
            w.status,
            w.detail,
            w.data.len()
        );
    }

    // And the answers are the right ones, not merely the same ones.
    let by = |prefix: &str| -> Vec<&Response> {
        got.iter()
            .filter(|(w, _)| w.starts_with(prefix))
            .map(|(_, r)| r)
            .collect()
    };
    let dtoh = by("Dtoh");
    let mut a = vec![0u8; 2 * PIECE + 3];
    a[5..5 + PIECE + 12_345].copy_from_slice(&pattern(PIECE + 12_345, 1));
    let at = PIECE + 20_000;
    a[at..at + PIECE / 2 + 1].copy_from_slice(&pattern(PIECE / 2 + 1, 2));
    assert!(dtoh[0].data[..] == a[1..2 * PIECE + 2], "HTOD/DTOH");
    let mut b = vec![0u8; 2 * PIECE + 3];
    b[3..3 + PIECE / 2 + 5].fill(0x5a);
    for w in b[PIECE..PIECE + PIECE / 2 + 4].chunks_exact_mut(4) {
        w.copy_from_slice(&0xdead_beefu32.to_le_bytes());
    }
    let at = PIECE / 4 + 7;
    b[at..at + PIECE / 2 + 3].copy_from_slice(&a[1000..1000 + PIECE / 2 + 3]);
    assert!(dtoh[1].data == b, "MEMSET/DTOD");
    let sum: Vec<f32> = dtoh[2]
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(sum
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i as f32 * 0.5 - 7.0) + (3.0 - i as f32 * 0.25)));
    assert!(dtoh[4].data[..4000]
        .chunks_exact(4)
        .all(|w| w == 0x0102_0304u32.to_le_bytes()));
    assert_eq!(
        dtoh[5..].iter().map(|r| r.status).collect::<Vec<_>>(),
        [Status::OutOfRange, Status::InvalidHandle]
    );
    let syncs = by("Sync");
    assert_eq!(
        syncs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [Status::Ok, Status::Ok, Status::InvalidSession]
    );

    // The closed session's executor is gone at the worker, too.
    wait_sessions(&worker.endpoint, &keys.creds(), 0);
    assert_no_product_thread_panicked();
}

/// Launch shape for `count` elements of `fill_u32`.
fn shape(count: u32) -> LaunchShape {
    LaunchShape {
        grid: [1, 1, 1],
        block: [count, 1, 1],
        shared_bytes: 0,
    }
}

fn fill_params(b: BufferId, value: u32, count: u32) -> Vec<ExecParam> {
    vec![
        ExecParam::Buffer(b),
        ExecParam::Value(value.to_le_bytes().to_vec()),
        ExecParam::Value(count.to_le_bytes().to_vec()),
    ]
}

#[test]
fn an_error_in_an_operation_nobody_waits_for_surfaces_at_the_next_sync() {
    watch_panics();
    let keys = Keys::new("deferred");
    let worker = Worker::start(&keys.worker, 0);
    // The mediator checks a launch's arguments before an executor sees them, so the
    // executor's own refusals are driven through the executor interface the mediator
    // uses: remote, local worker process, and in this process.
    let factory =
        RemoteExecutorFactory::connect(spec(&worker.endpoint), keys.creds(), HANG).unwrap();
    let mut remote = factory.create_executor().unwrap();
    std::env::set_var(WORKER_ENV, EXECUTOR_WORKER);
    let mut local = ProcessExecutorFactory::cpu().unwrap().spawn().unwrap();
    let mut inproc = CpuExecutor::default();
    let fill_kernel = KernelRef::Builtin(vgpu_kernels::find("fill_u32").unwrap());

    let s = inproc.open_stream().unwrap();
    let b = inproc.alloc(64).unwrap();
    // A 2-byte value where the kernel takes a u32.
    let bad_launch = [
        ExecParam::Buffer(b),
        ExecParam::Value(vec![0; 2]),
        ExecParam::Value(16u32.to_le_bytes().to_vec()),
    ];
    // In this process each call reports its own error at once.
    let first = inproc.htod(s, BufferId(999), 0, &[1, 2, 3]).unwrap_err();
    let second = inproc
        .launch(s, fill_kernel, &shape(16), &bad_launch)
        .unwrap_err();
    assert_ne!(first.status, second.status);

    for (which, exec) in [
        ("remote", &mut remote as &mut dyn Executor),
        ("local worker", &mut local),
    ] {
        assert_eq!(exec.open_stream().unwrap(), s, "{which}");
        assert_eq!(exec.alloc(64).unwrap(), b, "{which}");
        // Accepted once sent; the first failure is the sync's answer.
        exec.htod(s, BufferId(999), 0, &[1, 2, 3]).unwrap();
        exec.launch(s, fill_kernel, &shape(16), &bad_launch)
            .unwrap();
        for i in 0..20 {
            exec.launch(s, fill_kernel, &shape(16), &fill_params(b, i, 16))
                .unwrap();
        }
        let e = exec.sync(s).unwrap_err();
        assert_eq!(
            (e.status, e.detail),
            (first.status, first.detail),
            "{which}"
        );
        // Reported once: the later work was done.
        exec.sync(s).unwrap();
        let mut out = [0u8; 64];
        exec.dtoh(s, b, 0, &mut out).unwrap();
        assert!(
            out.chunks_exact(4).all(|w| w == 19u32.to_le_bytes()),
            "{which}"
        );
        // A DTOH reports an earlier failure too; an alloc reports it and allocates
        // nothing.
        exec.dtod(s, b, 0, b, 32, 64).unwrap();
        let e = exec.dtoh(s, b, 0, &mut out).unwrap_err();
        assert_eq!(e.status, Status::OutOfRange, "{which}");
        exec.launch(s, fill_kernel, &shape(16), &bad_launch)
            .unwrap();
        let e = exec.alloc(64).unwrap_err();
        assert_eq!(
            (e.status, e.detail),
            (second.status, second.detail),
            "{which}"
        );
        assert!(!exec.poisoned(), "{which}");
    }
    assert_eq!(remote.alloc(64).unwrap(), local.alloc(64).unwrap());
    drop(remote);
    wait_sessions(&worker.endpoint, &keys.creds(), 0);
    assert_no_product_thread_panicked();
}

// ---------------------------------------------------------------------------------------
// 2. Refusals

fn setup_error(key: &Path, endpoint: &Endpoint) -> String {
    match select_with(ExecutorChoice::Remote(spec(endpoint)), &remote_options(key)) {
        Ok(_) => panic!("a mediator with {} was served", key.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_keys_unknown_names_other_versions_and_open_key_files_are_refused() {
    watch_panics();
    let keys = Keys::new("refusals");
    let worker = Worker::start(&keys.worker, 0);
    let ep = worker.endpoint.clone();

    // A key the worker does not hold for this name.
    let (_, wrong) = keygen(NAME);
    let file = keys.file("wrong.key", &format!("{NAME} {}\n", wrong.to_hex()), 0o600);
    let why = setup_error(&file, &ep);
    assert!(
        why.contains(&format!(
            "authentication failed for mediator '{NAME}' (wrong key)"
        )),
        "{why}"
    );
    // A name the worker does not list.
    let file = keys.file(
        "stranger.key",
        &format!("stranger {}\n", keys.key.to_hex()),
        0o600,
    );
    let why = setup_error(&file, &ep);
    assert!(
        why.contains("mediator 'stranger' is not among those this worker serves"),
        "{why}"
    );
    // Another link version, named with this worker's.
    let conn = Conn::connect(&ep).unwrap();
    match link::initiate_version(conn, NAME, &keys.key, link::LINK_VERSION + 1) {
        Err(HandshakeError::Refused(why)) => {
            assert!(
                why.contains(&format!("protocol version {}", link::LINK_VERSION + 1))
                    && why.contains(&format!("speaks version {}", link::LINK_VERSION)),
                "{why}"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // The raw handshake with a wrong key is refused the same way.
    let conn = Conn::connect(&ep).unwrap();
    match link::initiate(conn, NAME, &wrong) {
        Err(HandshakeError::Refused(why)) => assert!(why.contains("wrong key"), "{why}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Nothing of it got as far as a session: no connection was admitted.
    worker.wait_log("the refusals logged", |l| {
        l.contains("refused: protocol version")
    });
    assert!(!worker.log_has(|l| l.contains("connected from")));

    // A mediator key file others can read is not used.
    let open = keys.file(
        "open.key",
        &format!("{NAME} {}\n", keys.key.to_hex()),
        0o644,
    );
    let why = setup_error(&open, &ep);
    assert!(
        why.contains("mode 644") && why.contains("chmod 600"),
        "{why}"
    );
    // Nor a worker key file others can read: the worker does not start.
    let open_keys = keys.file(
        "open.keys",
        &format!("{NAME} {}\n", keys.key.to_hex()),
        0o644,
    );
    let out = Process::new(WORKER)
        .args(["--listen", "127.0.0.1:7", "--executor", "cpu", "--keys"])
        .arg(&open_keys)
        .env(WORKER_ENV, EXECUTOR_WORKER)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mode 644") && err.contains("chmod 600"),
        "{err}"
    );

    // The worker serves the mediator it knows, after all that.
    let m = Mediator::new(remote_factory(&ep, &keys.mediator));
    let t = tenant(&m, "vm1");
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 1);
    assert_no_product_thread_panicked();
}

// ---------------------------------------------------------------------------------------
// 3. A worker killed under a session

#[test]
fn a_killed_worker_costs_its_sessions_device_lost_and_a_restarted_one_serves_new_ones() {
    watch_panics();
    let keys = Keys::new("killed");
    let creds = keys.creds();
    let mut worker = Worker::start(&keys.worker, 0);
    let port = worker.port;
    let m = Mediator::new(remote_factory(&worker.endpoint, &keys.mediator));
    let t = tenant(&m, "vm1");
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 2);
    let b = ok(&m, t, s, Command::Alloc { size: 1 << 20 }).value0;
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: b,
            offset: 0,
            data: pattern(1 << 20, 3),
        },
    );
    // Work in flight when the worker dies: a kernel that keeps the device busy.
    ok(&m, t, s, spin(b, 20_000_000));
    ok(&m, t, s, fill(b, 7, 64));
    worker.kill();

    lost(&m, t, s, Command::Sync);
    // Sticky, and nothing is sent anywhere again for this session.
    lost(
        &m,
        t,
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len: 16,
        },
    );
    // No worker: a new session cannot open (and the factory waits before it tries the
    // address again).
    lost(&m, t, 0, Command::SessionOpen);

    let worker = Worker::start(&keys.worker, port);
    assert_eq!(worker.port, port);
    lost(&m, t, s, Command::Sync);
    // The lost session never reached the new worker.
    assert_eq!(sessions(&worker.endpoint, &creds), 0);

    // A new session opens once the factory tries again.
    let deadline = Instant::now() + HANG;
    let fresh = loop {
        let r = call(&m, t, 0, Command::SessionOpen);
        if r.status == Status::Ok {
            break r.value0;
        }
        assert_eq!(r.status, Status::DeviceLost);
        assert!(
            Instant::now() < deadline,
            "no new session on the new worker"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    works(&m, t, fresh, 4);
    wait_sessions(&worker.endpoint, &creds, 1);
    ok(&m, t, s, Command::SessionClose);
    ok(&m, t, fresh, Command::SessionClose);
    wait_sessions(&worker.endpoint, &creds, 0);
    assert_no_product_thread_panicked();
}

// ---------------------------------------------------------------------------------------
// 4. A connection cut in the middle of a request

/// A TCP proxy between mediators and a worker that a test can cut.
struct Proxy {
    endpoint: Endpoint,
    conns: Arc<Mutex<Vec<Arc<Relay>>>>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

/// One relayed connection.
struct Relay {
    /// Its two sockets until it is cut (each pump has its own descriptors, closed when
    /// the pump ends).
    sockets: Mutex<Vec<TcpStream>>,
    /// This side's address at the worker: what the worker's log names.
    upstream_local: SocketAddr,
    /// Bytes relayed each way.
    up: AtomicU64,
    down: AtomicU64,
    /// The connection is cut once this many bytes went down to the mediator.
    cut_at: AtomicU64,
}

impl Relay {
    /// Ends both connections, as a proxy that dies would: the pumps stop, and once they
    /// have, every descriptor of both sockets is closed.
    fn cut(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Cuts the connection after `more` further bytes from the worker.
    fn cut_after(&self, more: u64) {
        self.cut_at
            .store(self.down.load(Ordering::SeqCst) + more, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64, cut_at: Option<&AtomicU64>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let done = count.load(Ordering::SeqCst);
        let limit = cut_at.map_or(u64::MAX, |c| c.load(Ordering::SeqCst));
        let keep = limit.saturating_sub(done).min(n as u64) as usize;
        if to.write_all(&buf[..keep]).is_err() {
            return;
        }
        count.fetch_add(keep as u64, Ordering::SeqCst);
        if done + keep as u64 >= limit {
            return;
        }
    }
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Relay>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let dup = |s: &TcpStream| s.try_clone().unwrap();
                let (c_up, u_up) = (dup(&client), dup(&upstream));
                let (c_down, u_down) = (dup(&client), dup(&upstream));
                let relay = Arc::new(Relay {
                    upstream_local: upstream.local_addr().unwrap(),
                    sockets: Mutex::new(vec![client, upstream]),
                    up: AtomicU64::new(0),
                    down: AtomicU64::new(0),
                    cut_at: AtomicU64::new(u64::MAX),
                });
                c2.lock().unwrap().push(relay.clone());
                let r = relay.clone();
                std::thread::spawn(move || {
                    pump(c_up, u_up, &r.up, None);
                    r.cut();
                });
                std::thread::spawn(move || {
                    pump(u_down, c_down, &relay.down, Some(&relay.cut_at));
                    relay.cut();
                });
            }
        });
        Proxy {
            endpoint: format!("127.0.0.1:{}", addr.port()).parse().unwrap(),
            conns,
            stop,
            addr,
        }
    }

    /// The newest relayed connection.
    fn newest(&self) -> Arc<Relay> {
        self.conns.lock().unwrap().last().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for r in self.conns.lock().unwrap().iter() {
            r.cut();
        }
    }
}

#[test]
fn a_connection_cut_in_the_middle_of_a_request_is_device_lost_and_the_worker_serves_on() {
    watch_panics();
    let keys = Keys::new("cut");
    let creds = keys.creds();
    let worker = Worker::start(&keys.worker, 0);
    let proxy = Proxy::start(worker.addr());
    let m = Mediator::new(remote_factory(&proxy.endpoint, &keys.mediator));
    let t = tenant(&m, "vm1");

    // Cut in the middle of a large DTOH's answer.
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    let relay = proxy.newest();
    let bystander = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 5);
    let len = 5 * PIECE as u64 + 13;
    let b = ok(&m, t, s, Command::Alloc { size: len }).value0;
    ok(&m, t, s, fill(b, 9, 1000));
    ok(&m, t, s, Command::Sync);
    relay.cut_after(2 * PIECE as u64);
    lost(
        &m,
        t,
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len,
        },
    );
    // Cut by the proxy after 2 MiB, in the middle of the 5 MiB answer.
    assert_eq!(
        relay.down.load(Ordering::SeqCst),
        relay.cut_at.load(Ordering::SeqCst)
    );
    lost(&m, t, s, Command::Sync);
    let peer = format!("from {}: ", relay.upstream_local);
    worker.wait_log("the worker to log the cut connection's end", |l| {
        l.contains(&peer)
    });

    // Cut while a SYNC waits for a kernel: the worker ends that executor at once.
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    let relay = proxy.newest();
    let b = ok(&m, t, s, Command::Alloc { size: 64 }).value0;
    let answers = relay.down.load(Ordering::SeqCst);
    ok(&m, t, s, spin(b, 25_000_000));
    // Once its answer comes back, the launch has passed the proxy: what goes up from
    // here is the SYNC.
    eventually("the launch to reach the worker", HANG, || {
        relay.down.load(Ordering::SeqCst) > answers
    });
    let sent = relay.up.load(Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    let m2 = m.clone();
    std::thread::spawn(move || {
        let _ = tx.send(m2.call(t, Request::new(s, Command::Sync)));
    });
    eventually("the SYNC to reach the worker", HANG, || {
        relay.up.load(Ordering::SeqCst) > sent
    });
    relay.cut();
    let r = rx.recv_timeout(HANG).expect("the SYNC hung");
    assert_eq!(r.status, Status::DeviceLost);
    let peer = format!("from {}: ", relay.upstream_local);
    worker.wait_log("the worker to log the second cut", |l| l.contains(&peer));

    // Other connections, old and new, are served as before.
    works(&m, t, bystander, 6);
    let fresh = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, fresh, 7);
    // The spinning kernel's executor was ended, not waited for: only the bystander and
    // the new session remain (well before the kernel's 25 s are up).
    wait_sessions(&worker.endpoint, &creds, 2);
    ok(&m, t, bystander, Command::SessionClose);
    ok(&m, t, fresh, Command::SessionClose);
    wait_sessions(&worker.endpoint, &creds, 0);
    assert_no_product_thread_panicked();
}

// ---------------------------------------------------------------------------------------
// 5. Hostile peers

/// Reads until the other side closes (EOF or reset); fails if it keeps the connection
/// open for [`HANG`] (the caller set that read timeout).
fn assert_closed(mut conn: impl Read) {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "the worker kept the connection open"
                );
                return;
            }
        }
    }
}

fn closed_tcp(conn: &TcpStream) {
    conn.set_read_timeout(Some(HANG)).unwrap();
    assert_closed(conn);
}

#[test]
fn a_client_that_claims_an_oversized_request_or_sends_garbage_is_cut_off_alone() {
    watch_panics();
    let keys = Keys::new("hostile-client");
    let creds = keys.creds();
    let worker = Worker::start(&keys.worker, 0);
    let m = Mediator::new(remote_factory(&worker.endpoint, &keys.mediator));
    let t = tenant(&m, "vm1");
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 1);

    // An authenticated peer that announces a message over the limit: refused on the
    // length its first record states, before the worker allocates anything for it (the
    // link's sender states the true length, so this one is just over the limit and sent
    // whole; the worker reads only its first record).
    let conn = Conn::connect(&worker.endpoint).unwrap();
    let (mut l, _hello) = link::initiate(conn, NAME, &keys.key).unwrap();
    let over = MAX_REQUEST + 1;
    // The worker may reset the connection while the rest is still being written.
    let _ = l.tx.send_with(|mut v| {
        v.resize(v.len() + over, 0);
        Ok(v)
    });
    l.rx.conn().set_timeout(Some(HANG));
    assert_closed(l.rx.conn());
    worker.wait_log("the oversized request logged", |l| {
        l.contains(&format!("a message of {over} bytes exceeds the limit"))
    });
    works(&m, t, s, 2);

    // Garbage instead of a hello.
    let mut g = TcpStream::connect(worker.addr()).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: worker\r\n\r\nand then some more bytes\r\n")
        .unwrap();
    closed_tcp(&g);
    worker.wait_log("the garbage logged", |l| l.contains("bad magic"));
    // A hello cut short: closed too, once the peer goes.
    let mut short = TcpStream::connect(worker.addr()).unwrap();
    short.write_all(&link::MAGIC).unwrap();
    short.shutdown(Shutdown::Write).unwrap();
    closed_tcp(&short);

    works(&m, t, s, 3);
    let other = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, other, 4);
    ok(&m, t, s, Command::SessionClose);
    ok(&m, t, other, Command::SessionClose);
    wait_sessions(&worker.endpoint, &creds, 0);
    assert_no_product_thread_panicked();
}

/// A worker that is not one: it authenticates a mediator with the real key, relays to
/// the real worker, and lets the test add messages of its own towards the mediator.
struct FakeWorker {
    endpoint: Endpoint,
    state: Arc<FakeState>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

#[derive(Default)]
struct FakeState {
    /// The newest connection's records towards the mediator.
    current: Mutex<Option<Arc<Mutex<RecordTx>>>>,
    /// The last reply relayed (not a meter reading).
    last_reply: Mutex<Vec<u8>>,
    /// Connections the mediator ended.
    hung_up: AtomicU32,
}

/// The first byte of a `Reply::Meter` (postcard: the variant's index).
const METER_VARIANT: u8 = 6;

/// One direction's AES-GCM under the link's keys: (nonce, input, output) to the output's
/// length.
type Cipher = Box<dyn Fn(u64, &[u8], &mut [u8]) -> Option<usize> + Send + Sync>;

/// The link's records written out here (a `u16` LE length, then the ciphertext and its
/// tag under a counter nonce; a message is a `u32` LE length and its bytes, cut into
/// records), so that the fake can send what the link's own sender never would.
struct RecordTx {
    conn: Conn,
    seal: Cipher,
    nonce: u64,
}

struct RecordRx {
    conn: Conn,
    open: Cipher,
    nonce: u64,
}

/// Largest plaintext of one record.
const RECORD_PLAIN: usize = 65_535 - 16;

impl RecordTx {
    /// One record of `plain`.
    fn record(&mut self, plain: &[u8]) -> std::io::Result<()> {
        let mut out = vec![0u8; 2 + plain.len() + 16];
        let n = (self.seal)(self.nonce, plain, &mut out[2..]).expect("sealing a record");
        self.nonce += 1;
        out[..2].copy_from_slice(&(n as u16).to_le_bytes());
        (&self.conn).write_all(&out[..2 + n])
    }

    fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        let mut plain = (message.len() as u32).to_le_bytes().to_vec();
        plain.extend_from_slice(message);
        plain
            .chunks(RECORD_PLAIN)
            .try_for_each(|chunk| self.record(chunk))
    }
}

impl RecordRx {
    fn recv(&mut self) -> std::io::Result<Vec<u8>> {
        let mut message = Vec::new();
        let mut want = None;
        loop {
            let mut conn = &self.conn;
            let mut len = [0u8; 2];
            conn.read_exact(&mut len)?;
            let mut sealed = vec![0u8; u16::from_le_bytes(len) as usize];
            conn.read_exact(&mut sealed)?;
            let mut plain = vec![0u8; sealed.len()];
            let n = (self.open)(self.nonce, &sealed, &mut plain)
                .ok_or_else(|| std::io::Error::other("a record failed authentication"))?;
            self.nonce += 1;
            let body = match want {
                None if n >= 4 => {
                    want = Some(u32::from_le_bytes(plain[..4].try_into().unwrap()) as usize);
                    &plain[4..n]
                }
                None => return Err(std::io::Error::other("short message")),
                Some(_) => &plain[..n],
            };
            message.extend_from_slice(body);
            if Some(message.len()) >= want {
                return Ok(message);
            }
        }
    }
}

impl FakeWorker {
    fn start(real: Endpoint, key: Key) -> FakeWorker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<FakeState> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, s2) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (st, real, key) = (st.clone(), real.clone(), key.clone());
                std::thread::spawn(move || Self::relay(stream, &real, &key, &st));
            }
        });
        FakeWorker {
            endpoint: format!("127.0.0.1:{}", addr.port()).parse().unwrap(),
            state,
            stop,
            addr,
        }
    }

    fn relay(stream: TcpStream, real: &Endpoint, key: &Key, state: &FakeState) {
        let peer = stream.peer_addr().unwrap();
        let conn = Conn::from_tcp(stream, peer);
        let admit = |_: u32, name: &str| {
            if name == NAME {
                Ok(key.clone())
            } else {
                Err(format!("unknown mediator '{name}'"))
            }
        };
        let Ok((mut hs, _)) = link::accept(&conn, &admit) else {
            return;
        };
        let (up, payload) = link::initiate(Conn::connect(real).unwrap(), NAME, key).unwrap();
        // What `link::respond` does, keeping the keys: the second handshake message with
        // the real worker's hello as this one's.
        let mut msg = vec![0u8; 4096 + payload.len()];
        let n = hs.write_message(&payload, &mut msg).unwrap();
        let mut answer = vec![0u8];
        answer.extend_from_slice(&(n as u16).to_le_bytes());
        answer.extend_from_slice(&msg[..n]);
        (&conn).write_all(&answer).unwrap();
        conn.set_timeout(None);
        let keys = Arc::new(hs.into_stateless_transport_mode().unwrap());
        let k2 = keys.clone();
        let to_mediator = Arc::new(Mutex::new(RecordTx {
            conn: conn.try_clone().unwrap(),
            seal: Box::new(move |nonce, plain, out| keys.write_message(nonce, plain, out).ok()),
            nonce: 0,
        }));
        let mut from_mediator = RecordRx {
            conn,
            open: Box::new(move |nonce, sealed, out| k2.read_message(nonce, sealed, out).ok()),
            nonce: 0,
        };
        *state.current.lock().unwrap() = Some(to_mediator.clone());
        let (mut up_tx, mut up_rx) = (up.tx, up.rx);
        let up_conn = up_tx.conn().try_clone().unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = Vec::new();
                while up_rx.recv(MAX_REPLY, &mut buf).is_ok() {
                    if buf.first() != Some(&METER_VARIANT) {
                        *state.last_reply.lock().unwrap() = buf.clone();
                    }
                    if to_mediator.lock().unwrap().send(&buf).is_err() {
                        break;
                    }
                }
                to_mediator.lock().unwrap().conn.shutdown();
            });
            loop {
                let Ok(request) = from_mediator.recv() else {
                    state.hung_up.fetch_add(1, Ordering::SeqCst);
                    break;
                };
                let sent = up_tx.send_with(|mut v| {
                    v.extend_from_slice(&request);
                    Ok(v)
                });
                if sent.is_err() {
                    break;
                }
            }
            up_conn.shutdown();
        });
    }

    fn hung_up(&self) -> u32 {
        self.state.hung_up.load(Ordering::SeqCst)
    }

    fn current(&self) -> Arc<Mutex<RecordTx>> {
        self.state.current.lock().unwrap().clone().unwrap()
    }

    /// Sends `bytes` `times` times as messages to the newest connection's mediator, from
    /// another thread (the mediator may stop reading); whether all went out.
    fn inject(&self, bytes: Vec<u8>, times: usize) -> mpsc::Receiver<bool> {
        let tx = self.current();
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let sent = (0..times).all(|_| tx.lock().unwrap().send(&bytes).is_ok());
            let _ = done.send(sent);
        });
        result
    }

    /// Sends the first record of a message that claims `len` bytes, and no more.
    fn claim(&self, len: u32) {
        let mut first = len.to_le_bytes().to_vec();
        first.extend_from_slice(&[2, 0, 0, 0]);
        self.current().lock().unwrap().record(&first).unwrap();
    }

    fn last_reply(&self) -> Vec<u8> {
        self.state.last_reply.lock().unwrap().clone()
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

#[test]
fn a_worker_that_answers_what_nobody_asked_or_sends_no_reply_costs_only_that_executor() {
    watch_panics();
    let keys = Keys::new("hostile-worker");
    let creds = keys.creds();
    let worker = Worker::start(&keys.worker, 0);
    let fake = FakeWorker::start(worker.endpoint.clone(), keys.key.clone());
    let m = Mediator::new(remote_factory(&fake.endpoint, &keys.mediator));
    let t = tenant(&m, "vm1");
    // The mediator's first connection (its check) is over once the factory exists.
    eventually("the factory's check connection to end", HANG, || {
        fake.hung_up() >= 1
    });

    // A reply while nothing is asked: the connection is cut at once, and the session's
    // next call is DEVICE_LOST (not answered with the stray reply).
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 1);
    let b = ok(&m, t, s, Command::Alloc { size: 4096 }).value0;
    let before = fake.hung_up();
    fake.inject(fake.last_reply(), 1);
    eventually("the mediator to cut the connection", HANG, || {
        fake.hung_up() > before
    });
    lost(&m, t, s, Command::Alloc { size: 4096 });
    lost(&m, t, s, Command::Free { handle: b });

    // A flood of them.
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 2);
    ok(&m, t, s, Command::Sync);
    let before = fake.hung_up();
    let flood = fake.inject(fake.last_reply(), 1000);
    eventually("the mediator to cut the flooding connection", HANG, || {
        fake.hung_up() > before
    });
    lost(&m, t, s, Command::Sync);
    flood.recv_timeout(HANG).expect("the flood's sender hung");

    // A message that is no reply at all.
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 3);
    let sent = fake.inject(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3], 1);
    assert!(sent.recv_timeout(HANG).unwrap(), "sending the garbage");
    lost(&m, t, s, Command::Sync);

    // A reply that claims more than any the mediator accepts (in a record like every
    // relayed one): refused on its length, before anything is allocated for it; the
    // rest never comes, and nobody waits for it.
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 4);
    fake.claim(u32::MAX - 1);
    lost(&m, t, s, Command::Sync);
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 5);
    fake.claim(MAX_REPLY as u32 + 1);
    lost(&m, t, s, Command::Sync);

    // The mediator serves on, through the same fake and straight from the worker.
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 6);
    ok(&m, t, s, Command::SessionClose);
    let direct = Mediator::new(remote_factory(&worker.endpoint, &keys.mediator));
    let t2 = tenant(&direct, "vm2");
    let s2 = ok(&direct, t2, 0, Command::SessionOpen).value0;
    works(&direct, t2, s2, 7);
    ok(&direct, t2, s2, Command::SessionClose);
    // Every lost session's executor was ended at the worker.
    wait_sessions(&worker.endpoint, &creds, 0);
    assert_no_product_thread_panicked();
}

// ---------------------------------------------------------------------------------------
// 6. The worker frees what a connection held

#[test]
fn the_worker_frees_everything_a_connection_held_when_it_ends() {
    watch_panics();
    let keys = Keys::new("frees");
    let creds = keys.creds();
    let worker = Worker::start(&keys.worker, 0);
    let ep = worker.endpoint.clone();
    assert_eq!(sessions(&ep, &creds), 0);
    eventually("no executor worker processes at the start", HANG, || {
        children(worker.pid()).is_empty()
    });

    // Closed through the mediator.
    let m = Mediator::new(remote_factory(&ep, &keys.mediator));
    let t = tenant(&m, "vm1");
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    for i in 0..3 {
        let b = ok(&m, t, s, Command::Alloc { size: 3 << 20 }).value0;
        ok(&m, t, s, fill(b, i, 16));
    }
    assert_eq!(children(worker.pid()).len(), 1);
    wait_sessions(&ep, &creds, 1);
    ok(&m, t, s, Command::SessionClose);
    wait_sessions(&ep, &creds, 0);
    eventually("the session's executor process to end", HANG, || {
        children(worker.pid()).is_empty()
    });

    // A tenant removed with its sessions open, and a mediator that goes away.
    let s1 = ok(&m, t, 0, Command::SessionOpen).value0;
    let s2 = ok(&m, t, 0, Command::SessionOpen).value0;
    ok(&m, t, s1, Command::Alloc { size: 1 << 20 });
    ok(&m, t, s2, Command::Alloc { size: 1 << 20 });
    let t2 = tenant(&m, "vm2");
    let s3 = ok(&m, t2, 0, Command::SessionOpen).value0;
    ok(&m, t2, s3, Command::Alloc { size: 1 << 20 });
    wait_sessions(&ep, &creds, 3);
    m.remove_tenant(t);
    wait_sessions(&ep, &creds, 1);
    drop(m);
    wait_sessions(&ep, &creds, 0);

    // Executors ended by their killer (a watchdog's or a reset's) or just dropped.
    let factory = RemoteExecutorFactory::connect(spec(&ep), creds.clone(), HANG).unwrap();
    let mut killed = factory.create_executor().unwrap();
    let mut dropped = factory.create_executor().unwrap();
    for e in [&mut killed, &mut dropped] {
        let s = e.open_stream().unwrap();
        let b = e.alloc(2 << 20).unwrap();
        e.memset(s, b, 0, 2 << 20, 1, 1).unwrap();
        e.sync(s).unwrap();
    }
    wait_sessions(&ep, &creds, 2);
    killed.killer().unwrap().kill(false);
    let e = killed
        .sync(vgpu_mediator::executor::StreamId(0))
        .unwrap_err();
    assert_eq!(e.status, Status::DeviceLost);
    wait_sessions(&ep, &creds, 1);
    drop(dropped);
    wait_sessions(&ep, &creds, 0);
    eventually("every executor process to end", HANG, || {
        children(worker.pid()).is_empty()
    });
    drop(killed);
    assert_no_product_thread_panicked();
}

/// Reads one hello (magic, version, name, first Noise message) from `from`, as sent.
fn read_hello(from: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 13];
    from.read_exact(&mut head).unwrap();
    let mut rest = vec![0u8; head[12] as usize + 2];
    from.read_exact(&mut rest).unwrap();
    let n = u16::from_le_bytes([rest[rest.len() - 2], rest[rest.len() - 1]]) as usize;
    let mut msg = vec![0u8; n];
    from.read_exact(&mut msg).unwrap();
    [head.to_vec(), rest, msg].concat()
}

#[test]
fn a_replayed_hello_gets_no_session_and_no_executor() {
    let keys = Keys::new("replay");
    let w = Worker::start(&keys.worker, 0);
    // A mediator's real hello, recorded on its way to the worker.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let target = w.port;
    let recorder = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", target)).unwrap();
        let hello = read_hello(&mut c);
        s.write_all(&hello).unwrap();
        let mut head = [0u8; 3];
        s.read_exact(&mut head).unwrap();
        let mut body = vec![0u8; u16::from_le_bytes([head[1], head[2]]) as usize];
        s.read_exact(&mut body).unwrap();
        c.write_all(&head).unwrap();
        c.write_all(&body).unwrap();
        (hello, c, s)
    });
    let conn = Conn::connect(&Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    })
    .unwrap();
    let (_real, _) = link::initiate(conn, NAME, &keys.key).unwrap();
    let (hello, _c, _s) = recorder.join().unwrap();

    // Replayed by someone without the key: the worker answers the handshake (it cannot
    // tell yet), but the replayer can produce no request, so it holds no session.
    let mut replay = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    replay.write_all(&hello).unwrap();
    let mut status = [0u8; 1];
    replay.read_exact(&mut status).unwrap();
    assert_eq!(status[0], 0);
    // Neither the replay nor the real connection (no request sent yet) is a session.
    assert_eq!(sessions(&w.endpoint, &keys.creds()), 0);
    // A forged record ends the replayed connection.
    let mut forged = vec![40u8, 0];
    forged.extend_from_slice(&[0x5a; 40]);
    replay.write_all(&forged).unwrap();
    replay
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = replay.read_to_end(&mut rest);
    assert_eq!(sessions(&w.endpoint, &keys.creds()), 0);
    // Real mediators are served meanwhile.
    let factory = remote_factory(&w.endpoint, &keys.mediator);
    let m = Arc::new(Mediator::new(factory));
    let t = tenant(&m, "vm-after-replay");
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    works(&m, t, s, 3);
}

/// `--executor remote:A+B`: two GPUs, each on its own worker; a VM placed on GPU 1 opens
/// its sessions on B only, and one on GPU 0 on A only.
#[test]
fn remote_workers_separated_by_plus_are_gpus_of_their_own() {
    let keys = Keys::new("two-gpus");
    let (a, b) = (
        Worker::start(&keys.worker, 0),
        Worker::start(&keys.worker, 0),
    );
    let spec: RemoteSpec = format!("{}+{}", a.endpoint, b.endpoint).parse().unwrap();
    assert_eq!(spec.gpu_count(), 2);
    assert_eq!(
        spec.to_string(),
        format!("remote:{}+{}", a.endpoint, b.endpoint)
    );
    let gpus = vgpu_mediator::select_gpus(
        ExecutorChoice::Remote(spec.clone()),
        &remote_options(&keys.mediator),
    )
    .unwrap();
    assert_eq!(gpus.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1]);
    let m = Mediator::with_gpus(
        gpus,
        vgpu_mediator::Limits::default(),
        vgpu_mediator::SchedConfig::default(),
    );
    let on = |name: &str, gpu: u32| {
        m.add_tenant_on(
            TenantConfig {
                name: name.into(),
                mem_quota: 256 << 20,
                weight: 100,
            },
            vgpu_mediator::Placement::Gpu(gpu),
        )
        .unwrap()
    };
    let (vm0, vm1) = (on("vm0", 0), on("vm1", 1));
    let s1 = ok(&m, vm1, 0, Command::SessionOpen).value0;
    works(&m, vm1, s1, 3);
    wait_sessions(&b.endpoint, &keys.creds(), 1);
    assert_eq!(sessions(&a.endpoint, &keys.creds()), 0);
    let s0 = ok(&m, vm0, 0, Command::SessionOpen).value0;
    works(&m, vm0, s0, 4);
    wait_sessions(&a.endpoint, &keys.creds(), 1);
    assert_eq!(sessions(&b.endpoint, &keys.creds()), 1);
    // --gpus picks among them; one that is not named is refused.
    let only = ExecutorOptions {
        gpus: Some(vec![1]),
        ..remote_options(&keys.mediator)
    };
    let one = vgpu_mediator::select_gpus(ExecutorChoice::Remote(spec.clone()), &only).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].0, 1);
    let none = ExecutorOptions {
        gpus: Some(vec![2]),
        ..remote_options(&keys.mediator)
    };
    let e = vgpu_mediator::select_gpus(ExecutorChoice::Remote(spec), &none)
        .err()
        .unwrap();
    assert!(e.to_string().starts_with("--gpus: no GPU 2"), "{e}");
    assert!("127.0.0.1:1++127.0.0.1:2".parse::<RemoteSpec>().is_err());
}
