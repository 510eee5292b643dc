//! Executors in worker processes, with the CPU executor so no GPU is needed: the RPC and
//! the staging area carry data and errors unchanged, a dead or faulted worker costs only
//! its own tenant, and no worker outlives its executor. Every case of `mediator.rs` also
//! runs here, through workers (module `suite`).

use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;
use vgpu_mediator::cpu::CpuExecutor;
use vgpu_mediator::executor::{BufferId, ExecParam, Executor, KernelRef, ModuleId};
use vgpu_mediator::process::{ProcessExecutorFactory, SIMULATED_FAULT_VALUE, WORKER_ENV};
use vgpu_mediator::{ExecutorFactory, Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

const WORKER: &str = env!("CARGO_BIN_EXE_vgpu-executor-worker");

/// Points the worker lookup at the binary cargo built for these tests.
fn use_built_worker() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(WORKER_ENV, WORKER));
}

fn cpu_workers() -> ProcessExecutorFactory {
    use_built_worker();
    let f = ProcessExecutorFactory::cpu().expect("worker binary");
    assert_eq!(f.worker_path(), std::path::Path::new(WORKER));
    f
}

/// The mediator cases, run on CPU executors in worker processes.
#[path = "mediator.rs"]
mod suite;

fn executor_factory() -> Arc<dyn ExecutorFactory> {
    Arc::new(cpu_workers())
}

/// True once `pid` is no child of this process any more: it exited and was reaped.
fn reaped(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: WNOHANG never blocks; `status` is an out-parameter.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

#[test]
fn copies_larger_than_the_staging_area_round_trip_in_pieces() {
    let factory = cpu_workers().with_staging_bytes(16 << 10);
    assert_eq!(factory.staging_bytes(), 16 << 10);
    let mut exec = factory.spawn().expect("worker");
    let pid = exec.pid();
    assert_eq!(factory.workers(), vec![pid]);

    let s = exec.open_stream().unwrap();
    let size = 200_000u64;
    let a = exec.alloc(size).unwrap();
    let b = exec.alloc(size).unwrap();
    let data = pattern(100_003, 7);
    exec.htod(s, a, 17, &data).unwrap();
    let mut out = vec![0xffu8; size as usize];
    exec.dtoh(s, a, 0, &mut out).unwrap();
    assert!(out[..17].iter().all(|&b| b == 0));
    assert_eq!(&out[17..17 + data.len()], &data[..]);
    assert!(out[17 + data.len()..].iter().all(|&b| b == 0));

    // The same work on an in-process CPU executor gives the same bytes.
    let mut local = CpuExecutor::default();
    let ls = local.open_stream().unwrap();
    let (la, lb) = (local.alloc(size).unwrap(), local.alloc(size).unwrap());
    assert_eq!((la, lb), (a, b));
    local.htod(ls, la, 17, &data).unwrap();
    for e in [&mut exec as &mut dyn Executor, &mut local] {
        e.dtod(s, b, 1000, a, 0, 150_000).unwrap();
        e.memset(s, b, 40_000, 40_000, 0xdead_beef, 4).unwrap();
        e.memset(s, b, 90_001, 33_333, 0x5a, 1).unwrap();
    }
    let mut remote_b = vec![0u8; size as usize];
    let mut local_b = vec![0u8; size as usize];
    exec.dtoh(s, b, 0, &mut remote_b).unwrap();
    local.dtoh(ls, b, 0, &mut local_b).unwrap();
    assert!(remote_b == local_b, "dtod/memset results differ");

    // Empty copies are requests too, checked like any other.
    exec.htod(s, a, size, &[]).unwrap();
    exec.dtoh(s, a, size, &mut []).unwrap();
    assert_eq!(
        exec.htod(s, a, size + 1, &[]).unwrap_err().status,
        Status::OutOfRange
    );
    exec.free(a);
    exec.free(b);
    exec.close_stream(s);
    assert!(!exec.poisoned());
    drop(exec);
    assert!(factory.workers().is_empty());
    assert!(reaped(pid), "worker {pid} not reaped");
}

#[test]
fn a_copy_over_the_default_staging_area_round_trips() {
    let factory = cpu_workers();
    assert_eq!(
        factory.staging_bytes(),
        vgpu_mediator::process::DEFAULT_STAGING_BYTES
    );
    let mut exec = factory.spawn().expect("worker");
    let s = exec.open_stream().unwrap();
    let len = factory.staging_bytes() + 4099;
    let buf = exec.alloc(len as u64).unwrap();
    let data = pattern(len, 3);
    exec.htod(s, buf, 0, &data).unwrap();
    let mut out = vec![0u8; len];
    exec.dtoh(s, buf, 0, &mut out).unwrap();
    assert!(out == data, "a {len}-byte copy came back different");
}

#[test]
fn executor_errors_cross_the_rpc_unchanged() {
    let factory = cpu_workers();
    let mut remote = factory.spawn().expect("worker");
    let mut local = CpuExecutor::default();
    let fill = vgpu_kernels::find("fill_u32").unwrap();
    let shape = LaunchShape {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
    };
    let mut results = Vec::new();
    for e in [&mut remote as &mut dyn Executor, &mut local] {
        let s = e.open_stream().unwrap();
        let b = e.alloc(64).unwrap();
        let mut out = [0u8; 8];
        results.push(vec![
            e.htod(s, BufferId(999), 0, &[1, 2, 3]),
            e.htod(s, b, 60, &[0; 8]),
            e.dtoh(s, b, 64, &mut out),
            e.dtod(s, b, 0, b, 32, 64),
            e.memset(s, b, 0, 65, 0, 1),
            e.load_module(".version 8.0").map(drop),
            e.launch(s, KernelRef::Module(ModuleId(1), "k"), &shape, &[]),
            e.launch(
                s,
                KernelRef::Builtin(fill),
                &shape,
                &[
                    ExecParam::Value(vec![0; 8]),
                    ExecParam::Value(vec![0; 4]),
                    ExecParam::Value(vec![0; 4]),
                ],
            ),
            e.launch(
                s,
                KernelRef::Builtin(fill),
                &shape,
                &[
                    ExecParam::Buffer(b),
                    ExecParam::Value(vec![0; 2]),
                    ExecParam::Value(vec![0; 4]),
                ],
            ),
            e.launch(
                s,
                KernelRef::Builtin(fill),
                &shape,
                &[
                    ExecParam::Buffer(b),
                    ExecParam::Value(7u32.to_le_bytes().to_vec()),
                    ExecParam::Value(16u32.to_le_bytes().to_vec()),
                ],
            ),
            e.sync(s),
        ]);
        e.free(BufferId(12345)); // unknown: ignored, like in process
        let mut words = [0u8; 64];
        e.dtoh(s, b, 0, &mut words).unwrap();
        assert!(words.chunks_exact(4).all(|w| w == 7u32.to_le_bytes()));
    }
    let (r, l) = (&results[0], &results[1]);
    assert_eq!(r, l);
    assert!(r.iter().filter(|x| x.is_err()).count() >= 8, "{r:?}");
    assert_eq!(r[5].as_ref().unwrap_err().status, Status::Unsupported);
    assert_eq!(r[7].as_ref().unwrap_err().status, Status::InvalidArgument);
    assert!(!remote.poisoned());
}

fn tenant(m: &Mediator, name: &str) -> TenantId {
    m.add_tenant(TenantConfig {
        name: name.into(),
        mem_quota: 1 << 20,
        weight: 1,
    })
    .unwrap()
}

fn call(m: &Mediator, t: TenantId, s: u64, c: Command) -> Response {
    m.call(t, Request::new(s, c))
}

fn open(m: &Mediator, t: TenantId) -> u64 {
    let r = call(m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::Ok, "SESSION_OPEN");
    r.value0
}

fn fill(buf: u64, value: u32) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "fill_u32".into(),
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(buf), Param::u32(value), Param::u32(16)],
    })
}

/// Fills a fresh 64-byte buffer with `value` and reads it back: the tenant works.
fn works(m: &Mediator, t: TenantId, s: u64, value: u32) {
    let b = call(m, t, s, Command::Alloc { size: 64 });
    assert_eq!(b.status, Status::Ok, "ALLOC");
    assert_eq!(call(m, t, s, fill(b.value0, value)).status, Status::Ok);
    let out = call(
        m,
        t,
        s,
        Command::Dtoh {
            src: b.value0,
            offset: 0,
            len: 64,
        },
    );
    assert_eq!(out.status, Status::Ok, "DTOH");
    assert!(out.data.chunks_exact(4).all(|w| w == value.to_le_bytes()));
    assert_eq!(
        call(m, t, s, Command::Free { handle: b.value0 }).status,
        Status::Ok
    );
}

/// The worker that appeared since `before`.
fn new_worker(factory: &ProcessExecutorFactory, before: &[u32]) -> u32 {
    let now = factory.workers();
    let fresh: Vec<u32> = now.into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(fresh.len(), 1, "one new worker expected, got {fresh:?}");
    fresh[0]
}

#[test]
fn a_killed_worker_loses_its_tenants_sessions_only() {
    let factory = Arc::new(cpu_workers());
    let m = Mediator::new(factory.clone());
    let t1 = tenant(&m, "vm1");
    let s1 = open(&m, t1);
    let sibling = open(&m, t1);
    let w1 = new_worker(&factory, &[]);
    let t2 = tenant(&m, "vm2");
    let s2 = open(&m, t2);
    let w2 = new_worker(&factory, &[w1]);
    works(&m, t1, s1, 1);
    works(&m, t2, s2, 2);

    // SAFETY: signals a child this test started.
    assert_eq!(unsafe { libc::kill(w1 as libc::pid_t, libc::SIGKILL) }, 0);

    let lost = call(&m, t1, s1, Command::Sync);
    assert_eq!(lost.status, Status::DeviceLost);
    // Sticky for the session that found out, and lost for its sibling.
    assert_eq!(
        call(&m, t1, s1, Command::Alloc { size: 4 }).status,
        Status::DeviceLost
    );
    assert_eq!(
        call(&m, t1, sibling, Command::Sync).status,
        Status::DeviceLost
    );
    assert!(reaped(w1), "the killed worker was not reaped");
    assert_eq!(m.usage(t1).unwrap().restarts, 1);

    // The other tenant never noticed.
    works(&m, t2, s2, 3);
    assert!(factory.workers().contains(&w2));

    // A new session gets a new worker.
    let fresh = open(&m, t1);
    works(&m, t1, fresh, 4);
    let w3 = new_worker(&factory, &[w2]);
    assert_ne!(w3, w1);
    assert_eq!(call(&m, t1, s1, Command::SessionClose).status, Status::Ok);
    assert_eq!(
        call(&m, t1, sibling, Command::SessionClose).status,
        Status::Ok
    );
    works(&m, t1, fresh, 5);
}

#[test]
fn a_worker_that_dies_while_idle_is_replaced_for_the_next_session() {
    let factory = Arc::new(cpu_workers());
    let m = Mediator::new(factory.clone());
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let w = new_worker(&factory, &[]);
    // SAFETY: signals a child this test started.
    assert_eq!(unsafe { libc::kill(w as libc::pid_t, libc::SIGKILL) }, 0);
    // Closing the session finds the worker gone; the next session starts a new one.
    assert_eq!(call(&m, t, s, Command::SessionClose).status, Status::Ok);
    let s = open(&m, t);
    works(&m, t, s, 9);
    assert!(reaped(w));
    assert_ne!(factory.workers(), vec![w]);
}

#[test]
fn a_device_fault_in_one_worker_is_sticky_there_and_invisible_elsewhere() {
    use_built_worker();
    let factory = Arc::new(ProcessExecutorFactory::cpu_fault_sim().unwrap());
    let m = Mediator::new(factory.clone());
    let fault = tenant(&m, "vm-fault");
    let faulting = open(&m, fault);
    let sibling = open(&m, fault);
    let sibling_buf = call(&m, fault, sibling, Command::Alloc { size: 64 }).value0;
    let w_fault = new_worker(&factory, &[]);
    let good = tenant(&m, "vm-good");
    let other = open(&m, good);
    let w_good = new_worker(&factory, &[w_fault]);
    works(&m, good, other, 1);

    let buf = call(&m, fault, faulting, Command::Alloc { size: 64 }).value0;
    assert_eq!(
        call(&m, fault, faulting, fill(buf, SIMULATED_FAULT_VALUE)).status,
        Status::Ok,
        "the launch is accepted; the fault is asynchronous"
    );
    works(&m, good, other, 2);
    let sync = call(&m, fault, faulting, Command::Sync);
    assert_eq!((sync.status, sync.detail), (Status::LaunchFailed, 719));
    let next = call(&m, fault, faulting, Command::Alloc { size: 4 });
    assert_eq!((next.status, next.detail), (Status::LaunchFailed, 719));
    works(&m, good, other, 3);
    let lost = call(
        &m,
        fault,
        sibling,
        Command::Dtoh {
            src: sibling_buf,
            offset: 0,
            len: 16,
        },
    );
    assert_eq!(lost.status, Status::DeviceLost);
    assert!(reaped(w_fault), "the poisoned worker was not stopped");
    let u = m.usage(fault).unwrap();
    assert_eq!((u.restarts, u.mem_used, u.allocations), (1, 0, 0));

    let fresh = open(&m, fault);
    works(&m, fault, fresh, 4);
    assert_ne!(new_worker(&factory, &[w_good]), w_fault);
    works(&m, good, other, 5);
}

#[test]
fn no_worker_outlives_the_mediator() {
    let factory = Arc::new(cpu_workers());
    let m = Mediator::new(factory.clone());
    for name in ["vm1", "vm2", "vm3"] {
        let t = tenant(&m, name);
        let s = open(&m, t);
        call(&m, t, s, Command::Alloc { size: 4096 });
    }
    let pids = factory.workers();
    assert_eq!(pids.len(), 3);
    drop(m);
    assert!(factory.workers().is_empty());
    for pid in pids {
        assert!(reaped(pid), "worker {pid} left behind");
    }
}

#[test]
fn a_worker_dies_with_the_thread_that_started_it() {
    let factory = Arc::new(cpu_workers());
    let f = factory.clone();
    // The executor is leaked, so only PR_SET_PDEATHSIG can stop its worker.
    let pid = std::thread::spawn(move || {
        let exec = f.spawn().expect("worker");
        let pid = exec.pid();
        std::mem::forget(exec);
        pid
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    loop {
        // SAFETY: WNOHANG never blocks; `status` is an out-parameter.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == pid as libc::pid_t {
            break;
        }
        assert_eq!(r, 0, "waitpid");
        assert!(Instant::now() < deadline, "worker {pid} still running");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
}

#[test]
fn the_worker_binary_explains_itself_and_refuses_bad_invocations() {
    let help = std::process::Command::new(WORKER)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Not meant to be run by hand"), "{text}");
    assert!(text.contains(WORKER_ENV), "{text}");

    let bad = std::process::Command::new(WORKER)
        .args([
            "--socket-fd",
            "250",
            "--staging-fd",
            "251",
            "--staging-bytes",
            "4096",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let text = String::from_utf8_lossy(&bad.stderr);
    assert!(
        text.contains("--socket-fd 250 is not an open file descriptor"),
        "{text}"
    );
}

#[test]
fn a_missing_worker_binary_fails_the_executor_not_the_mediator() {
    let factory = Arc::new(cpu_workers().with_worker("/nonexistent/vgpu-executor-worker"));
    assert!(factory.probe().is_err());
    let m = Mediator::new(factory);
    let t = tenant(&m, "vm1");
    let r = call(&m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::DeviceLost);
    // INFO needs no worker.
    assert_eq!(call(&m, t, 0, Command::Info).status, Status::Ok);
}

#[test]
fn an_oversized_launch_is_refused_and_the_worker_serves_on() {
    let factory = cpu_workers();
    let mut exec = factory.spawn().expect("worker");
    let s = exec.open_stream().unwrap();
    let b = exec.alloc(64).unwrap();
    let fill = vgpu_kernels::find("fill_u32").unwrap();
    let shape = LaunchShape {
        grid: [1, 1, 1],
        block: [16, 1, 1],
        shared_bytes: 0,
    };
    let huge = [
        ExecParam::Buffer(b),
        ExecParam::Value(vec![0; 9 << 20]),
        ExecParam::Value(vec![0; 4]),
    ];
    let e = exec
        .launch(s, KernelRef::Builtin(fill), &shape, &huge)
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidArgument, "{e}");
    assert!(!exec.poisoned());
    exec.sync(s).unwrap();
    assert_eq!(factory.workers(), vec![exec.pid()]);
}

/// The review's finding: without a worker that starts, every VM's CUDA work used to run
/// in the mediator's own process, where any VM's kernel reaches every other VM's device
/// memory by address. Now a missing worker binary is an error, and a worker that does not
/// start leaves the VM unserved (`DEVICE_LOST`, tried again at its next session) instead
/// of downgrading the isolation.
#[test]
fn without_a_worker_that_starts_vms_are_refused_never_run_in_process() {
    let missing = vgpu_mediator::executor::process_isolated(Err("no worker found".into()));
    let e = missing.err().expect("an error, not an in-process factory");
    assert!(e.contains("worker processes"), "{e}");

    let failing = cpu_workers().with_worker("/bin/false");
    let factory = vgpu_mediator::executor::process_isolated(Ok(failing)).expect("a factory");
    assert_eq!(
        factory.worker_process(),
        Some(std::path::Path::new("/bin/false"))
    );
    let m = Mediator::new(factory);
    let t = m
        .add_tenant(TenantConfig {
            name: "vm-no-worker".into(),
            mem_quota: 1 << 20,
            weight: 100,
        })
        .unwrap();
    for _ in 0..2 {
        let r = m.call(t, Request::new(0, Command::SessionOpen));
        assert_eq!(r.status, Status::DeviceLost);
    }
}
