// SPDX-License-Identifier: Apache-2.0
//! Executors in worker processes, with the CPU executor so no GPU is needed: the RPC and
//! the staging area carry data and errors unchanged, requests that are not waited for are
//! pipelined and their failures reported by the next call that waits, a dead or faulted
//! worker costs only its own tenant, no worker outlives its executor, and the pool hands
//! out live, started workers and stops them with its factory. Every case of
//! `mediator.rs` and `driver_api.rs` also runs here, through workers (modules `suite` and
//! `driver_api_suite`).

use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;
use vgpu_mediator::cpu::CpuExecutor;
use vgpu_mediator::executor::{
    BufferId, ExecParam, ExecResult, Executor, KernelRef, ModuleId, StreamId,
};
use vgpu_mediator::process::{ProcessExecutorFactory, SIMULATED_FAULT_VALUE, WORKER_ENV};
use vgpu_mediator::{ExecutorFactory, GuestAccessError, Mediator, TenantConfig, TenantId};
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

/// The driver-API cases, run on CPU executors in worker processes.
#[path = "driver_api.rs"]
mod driver_api_suite;

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

    // Empty copies are requests too, checked like any other; a host-to-device copy is
    // not waited for, so its failure is reported by the next call that waits.
    exec.htod(s, a, size, &[]).unwrap();
    exec.dtoh(s, a, size, &mut []).unwrap();
    exec.htod(s, a, size + 1, &[]).unwrap();
    assert_eq!(exec.sync(s).unwrap_err().status, Status::OutOfRange);
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

/// Runs `call`, then a sync: the call's own error, or the one the sync reports for it.
fn settled(
    e: &mut dyn Executor,
    s: StreamId,
    call: impl FnOnce(&mut dyn Executor) -> ExecResult<()>,
) -> ExecResult<()> {
    call(&mut *e).and_then(|()| e.sync(s))
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
        // Requests that are not waited for report their failure at the next call that
        // waits: each is followed by a sync, so both executors answer alike.
        results.push(vec![
            settled(e, s, |e| e.htod(s, BufferId(999), 0, &[1, 2, 3])),
            settled(e, s, |e| e.htod(s, b, 60, &[0; 8])),
            e.dtoh(s, b, 64, &mut out),
            settled(e, s, |e| e.dtod(s, b, 0, b, 32, 64)),
            settled(e, s, |e| e.memset(s, b, 0, 65, 0, 1)),
            e.load_module(".version 8.0").map(drop),
            settled(e, s, |e| {
                e.launch(s, KernelRef::Module(ModuleId(1), "k"), &shape, &[])
            }),
            settled(e, s, |e| {
                e.launch(
                    s,
                    KernelRef::Builtin(fill),
                    &shape,
                    &[
                        ExecParam::Value(vec![0; 8]),
                        ExecParam::Value(vec![0; 4]),
                        ExecParam::Value(vec![0; 4]),
                    ],
                )
            }),
            settled(e, s, |e| {
                e.launch(
                    s,
                    KernelRef::Builtin(fill),
                    &shape,
                    &[
                        ExecParam::Buffer(b),
                        ExecParam::Value(vec![0; 2]),
                        ExecParam::Value(vec![0; 4]),
                    ],
                )
            }),
            settled(e, s, |e| {
                e.launch(
                    s,
                    KernelRef::Builtin(fill),
                    &shape,
                    &[
                        ExecParam::Buffer(b),
                        ExecParam::Value(7u32.to_le_bytes().to_vec()),
                        ExecParam::Value(16u32.to_le_bytes().to_vec()),
                    ],
                )
            }),
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
fn each_session_has_its_own_worker_and_a_killed_one_loses_only_its_session() {
    let factory = Arc::new(cpu_workers());
    let m = Mediator::new(factory.clone());
    let t1 = tenant(&m, "vm1");
    let s1 = open(&m, t1);
    let w1 = new_worker(&factory, &[]);
    let sibling = open(&m, t1);
    let w_sibling = new_worker(&factory, &[w1]);
    let t2 = tenant(&m, "vm2");
    let s2 = open(&m, t2);
    let w2 = new_worker(&factory, &[w1, w_sibling]);
    works(&m, t1, s1, 1);
    works(&m, t1, sibling, 6);
    works(&m, t2, s2, 2);

    // SAFETY: signals a child this test started.
    assert_eq!(unsafe { libc::kill(w1 as libc::pid_t, libc::SIGKILL) }, 0);

    let lost = call(&m, t1, s1, Command::Sync);
    assert_eq!(lost.status, Status::DeviceLost);
    // Sticky for the session whose worker died.
    assert_eq!(
        call(&m, t1, s1, Command::Alloc { size: 4 }).status,
        Status::DeviceLost
    );
    assert!(reaped(w1), "the killed worker was not reaped");
    assert_eq!(m.usage(t1).unwrap().restarts, 1);

    // The same VM's other session, and the other VM, never noticed.
    works(&m, t1, sibling, 7);
    works(&m, t2, s2, 3);
    assert!(factory.workers().contains(&w2));
    assert!(factory.workers().contains(&w_sibling));

    // A new session gets a new worker.
    let fresh = open(&m, t1);
    works(&m, t1, fresh, 4);
    let w3 = new_worker(&factory, &[w_sibling, w2]);
    assert_ne!(w3, w1);
    assert_eq!(call(&m, t1, s1, Command::SessionClose).status, Status::Ok);
    // Closing a session stops its worker.
    assert_eq!(
        call(&m, t1, sibling, Command::SessionClose).status,
        Status::Ok
    );
    assert!(
        reaped(w_sibling),
        "a closed session's worker was not stopped"
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
    let w_fault = new_worker(&factory, &[]);
    let sibling = open(&m, fault);
    let w_sibling = new_worker(&factory, &[w_fault]);
    let sibling_buf = call(&m, fault, sibling, Command::Alloc { size: 64 }).value0;
    assert_eq!(
        call(&m, fault, sibling, fill(sibling_buf, 9)).status,
        Status::Ok
    );
    let good = tenant(&m, "vm-good");
    let other = open(&m, good);
    let w_good = new_worker(&factory, &[w_fault, w_sibling]);
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
    // The same VM's other session has its own context: its data is intact.
    let kept = call(
        &m,
        fault,
        sibling,
        Command::Dtoh {
            src: sibling_buf,
            offset: 0,
            len: 64,
        },
    );
    assert_eq!(kept.status, Status::Ok);
    assert!(kept.data.chunks_exact(4).all(|w| w == 9u32.to_le_bytes()));
    assert!(reaped(w_fault), "the poisoned worker was not stopped");
    let u = m.usage(fault).unwrap();
    assert_eq!((u.restarts, u.mem_used, u.allocations), (1, 64, 1));

    let fresh = open(&m, fault);
    works(&m, fault, fresh, 4);
    assert_ne!(new_worker(&factory, &[w_good, w_sibling]), w_fault);
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
        ExecParam::Value(vec![0; 65 << 20]),
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
    let missing = vgpu_mediator::executor::process_isolated(Err(
        vgpu_mediator::executor::SetupError::Worker("no worker found".into()),
    ));
    let e = missing.err().expect("an error, not an in-process factory");
    assert!(e.to_string().contains("worker processes"), "{e}");

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

// ---------------------------------------------------------------------------------------
// The pipelined channel and the staging ring

fn shape(threads: u32) -> LaunchShape {
    LaunchShape {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
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
fn many_requests_in_a_row_then_one_sync_give_the_reference_bytes() {
    let factory = cpu_workers().with_staging_bytes(64 << 10);
    let mut remote = factory.spawn().expect("worker");
    let mut local = CpuExecutor::default();
    let fill = vgpu_kernels::find("fill_u32").unwrap();
    let size = 256u64 << 10;
    let mut out = Vec::new();
    for e in [&mut remote as &mut dyn Executor, &mut local] {
        let s = e.open_stream().unwrap();
        let a = e.alloc(size).unwrap();
        let b = e.alloc(size).unwrap();
        // More requests than may be in flight at once, none of them waited for.
        for i in 0..700u32 {
            let at = u64::from(i) * 347 % (size - 5000);
            match i % 5 {
                0 => e
                    .launch(
                        s,
                        KernelRef::Builtin(fill),
                        &shape(64),
                        &fill_params(a, i, i * 3),
                    )
                    .unwrap(),
                1 => e.memset(s, a, at, 999, i & 0xff, 1).unwrap(),
                2 => e.htod(s, a, at + 1, &pattern(3001, i as u8)).unwrap(),
                3 => e.dtod(s, b, at, a, at / 2, 4096).unwrap(),
                _ => e.memset(s, b, at & !3, 2048, 0x0102_0304 ^ i, 4).unwrap(),
            }
        }
        // A copy over several staging pieces in the middle of it all.
        e.htod(s, b, 7, &pattern(100_001, 9)).unwrap();
        e.dtod(s, a, size - 4096, b, 100, 4096).unwrap();
        e.sync(s).unwrap();
        let mut bytes = vec![0u8; 2 * size as usize];
        let (first, second) = bytes.split_at_mut(size as usize);
        e.dtoh(s, a, 0, first).unwrap();
        e.dtoh(s, b, 0, second).unwrap();
        out.push(bytes);
    }
    assert!(
        out[0] == out[1],
        "the worker's bytes differ from the reference"
    );
    // Spot checks of the reference itself: the last fill, memset and htod landed.
    let a = &out[1][..size as usize];
    let b = &out[1][size as usize..];
    assert_eq!(&b[7..7 + 100_001], &pattern(100_001, 9)[..]);
    assert_eq!(&a[size as usize - 4096..], &b[100..4196]);
    assert!(!remote.poisoned());
    assert_eq!(remote.in_flight(), 0);
}

#[test]
fn requests_that_are_not_waited_for_stay_in_flight_until_a_call_waits() {
    let factory = cpu_workers();
    let mut exec = factory.spawn().expect("worker");
    let s = exec.open_stream().unwrap();
    let b = exec.alloc(4096).unwrap();
    for i in 0..10 {
        exec.memset(s, b, i * 4, 4, i as u32, 1).unwrap();
    }
    assert!(exec.in_flight() > 0, "memset waited for its reply");
    assert!(exec.in_flight() <= 10);
    exec.sync(s).unwrap();
    assert_eq!(exec.in_flight(), 0);
    for _ in 0..3 * vgpu_mediator::process::MAX_IN_FLIGHT {
        exec.memset(s, b, 0, 4096, 1, 1).unwrap();
        assert!(exec.in_flight() <= vgpu_mediator::process::MAX_IN_FLIGHT);
    }
    let mut out = [0u8; 8];
    exec.dtoh(s, b, 0, &mut out).unwrap();
    assert_eq!(out, [1; 8]);
    assert_eq!(exec.in_flight(), 0);
}

#[test]
fn an_htod_larger_than_the_staging_area_round_trips_at_an_odd_offset() {
    let factory = cpu_workers().with_staging_bytes(64 << 10);
    let mut exec = factory.spawn().expect("worker");
    let s = exec.open_stream().unwrap();
    let (offset, len) = (13usize, 1_000_003usize);
    let size = offset + len + 29;
    let buf = exec.alloc(size as u64).unwrap();
    let data = pattern(len, 41);
    exec.htod(s, buf, offset as u64, &data).unwrap();
    // The last pieces are still being copied when htod returns: the parent only filled
    // the staging ring ahead of the worker.
    assert!(exec.in_flight() > 0);
    let mut out = vec![0xaau8; size];
    exec.dtoh(s, buf, 0, &mut out).unwrap();
    assert!(out[..offset].iter().all(|&b| b == 0));
    assert!(
        out[offset..offset + len] == data[..],
        "the copy came back different"
    );
    assert!(out[offset + len..].iter().all(|&b| b == 0));
    // Overwrites at other odd places, back to back, then read at an odd offset.
    let second = pattern(200_001, 3);
    exec.htod(s, buf, 101, &second).unwrap();
    exec.htod(s, buf, 300_007, &data[..65_537]).unwrap();
    let mut part = vec![0u8; 400_000];
    exec.dtoh(s, buf, 99, &mut part).unwrap();
    let mut expect = out[99..400_099].to_vec();
    expect[2..2 + second.len()].copy_from_slice(&second);
    expect[300_007 - 99..300_007 - 99 + 65_537].copy_from_slice(&data[..65_537]);
    assert!(
        part == expect,
        "overlapping copies landed in the wrong order"
    );
}

#[test]
fn a_large_dtoh_is_pipelined_through_the_staging_ring() {
    let factory = cpu_workers().with_staging_bytes(64 << 10);
    let mut exec = factory.spawn().expect("worker");
    let s = exec.open_stream().unwrap();
    let size = (3 << 20) + 77;
    let buf = exec.alloc(size as u64).unwrap();
    let data = pattern(size, 5);
    // Written in uneven slices, so the ring wraps at many places.
    let mut at = 0;
    for (i, chunk) in data.chunks(12_345).enumerate() {
        exec.htod(s, buf, at as u64, chunk).unwrap();
        at += chunk.len();
        if i % 50 == 0 {
            exec.memset(s, buf, 0, 0, 0, 1).unwrap();
        }
    }
    let mut out = vec![0u8; size - 8];
    exec.dtoh(s, buf, 5, &mut out).unwrap();
    assert!(
        out[..] == data[5..size - 3],
        "the large dtoh came back different"
    );
    assert_eq!(exec.in_flight(), 0);
    // A failing piece fails the whole copy, and the worker serves on.
    let mut past = vec![0u8; 200_000];
    let e = exec
        .dtoh(s, buf, size as u64 - 100_000, &mut past)
        .unwrap_err();
    assert_eq!(e.status, Status::OutOfRange);
    assert_eq!(exec.in_flight(), 0);
    let mut tail = [0u8; 3];
    exec.dtoh(s, buf, size as u64 - 3, &mut tail).unwrap();
    assert_eq!(&tail[..], &data[size - 3..]);
}

#[test]
fn a_deferred_error_is_reported_by_the_next_call_that_waits_and_not_lost() {
    let factory = cpu_workers();
    let mut exec = factory.spawn().expect("worker");
    let mut local = CpuExecutor::default();
    let s = exec.open_stream().unwrap();
    let ls = local.open_stream().unwrap();
    let b = exec.alloc(64).unwrap();
    assert_eq!(local.alloc(64).unwrap(), b);
    let fill = vgpu_kernels::find("fill_u32").unwrap();

    // Two failures, then work that succeeds: the sync reports the first failure.
    let bad_launch = [
        ExecParam::Buffer(b),
        ExecParam::Value(vec![0; 2]),
        ExecParam::Value(16u32.to_le_bytes().to_vec()),
    ];
    let first = local.htod(ls, BufferId(999), 0, &[1, 2, 3]).unwrap_err();
    let second = local
        .launch(ls, KernelRef::Builtin(fill), &shape(16), &bad_launch)
        .unwrap_err();
    assert_ne!(first.status, second.status);
    exec.htod(s, BufferId(999), 0, &[1, 2, 3]).unwrap();
    exec.launch(s, KernelRef::Builtin(fill), &shape(16), &bad_launch)
        .unwrap();
    for i in 0..20 {
        exec.launch(
            s,
            KernelRef::Builtin(fill),
            &shape(16),
            &fill_params(b, i, 16),
        )
        .unwrap();
    }
    assert_eq!(exec.sync(s).unwrap_err(), first);
    // Reported once: the executor works on, with the later work done.
    exec.sync(s).unwrap();
    let mut out = [0u8; 64];
    exec.dtoh(s, b, 0, &mut out).unwrap();
    assert!(out.chunks_exact(4).all(|w| w == 19u32.to_le_bytes()));

    // A dtoh reports it too; an alloc reports it and allocates nothing.
    exec.dtod(s, b, 0, b, 32, 64).unwrap();
    let e = exec.dtoh(s, b, 0, &mut out).unwrap_err();
    assert_eq!(e.status, Status::OutOfRange);
    exec.launch(s, KernelRef::Builtin(fill), &shape(16), &bad_launch)
        .unwrap();
    assert_eq!(exec.alloc(64).unwrap_err(), second);
    assert_eq!(exec.alloc(64).unwrap(), local.alloc(64).unwrap());
    assert!(!exec.poisoned());

    // A simulated device fault behind later requests: reported by the sync, poisoned.
    use_built_worker();
    let faulty = ProcessExecutorFactory::cpu_fault_sim().unwrap();
    let mut exec = faulty.spawn().expect("worker");
    let s = exec.open_stream().unwrap();
    let b = exec.alloc(64).unwrap();
    exec.launch(
        s,
        KernelRef::Builtin(fill),
        &shape(16),
        &fill_params(b, SIMULATED_FAULT_VALUE, 16),
    )
    .unwrap();
    exec.memset(s, b, 0, 64, 0, 1).unwrap();
    exec.htod(s, b, 0, &[1; 64]).unwrap();
    exec.launch(
        s,
        KernelRef::Builtin(fill),
        &shape(16),
        &fill_params(b, 1, 16),
    )
    .unwrap();
    let e = exec.sync(s).unwrap_err();
    assert_eq!((e.status, e.detail), (Status::LaunchFailed, 719), "{e}");
    assert!(exec.poisoned());
    let pid = exec.pid();
    drop(exec);
    assert!(reaped(pid));
}

#[test]
fn a_worker_killed_with_requests_in_flight_gives_device_lost_without_hanging() {
    let factory = Arc::new(cpu_workers());
    let f = factory.clone();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut exec = f.spawn().expect("worker");
        let s = exec.open_stream().unwrap();
        let n = 1u32 << 20;
        let b = exec.alloc(u64::from(n) * 4).unwrap();
        let fill = vgpu_kernels::find("fill_u32").unwrap();
        for i in 0..200 {
            exec.launch(
                s,
                KernelRef::Builtin(fill),
                &shape(256),
                &fill_params(b, i, n),
            )
            .unwrap();
        }
        let in_flight = exec.in_flight();
        // SAFETY: signals a child this test started.
        let killed = unsafe { libc::kill(exec.pid() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(killed, 0);
        let mut statuses = Vec::new();
        for i in 0..2000 {
            let r = exec.launch(
                s,
                KernelRef::Builtin(fill),
                &shape(256),
                &fill_params(b, i, 16),
            );
            if let Err(e) = r {
                statuses.push(e.status);
                break;
            }
        }
        statuses.push(exec.sync(s).unwrap_err().status);
        statuses.push(exec.dtoh(s, b, 0, &mut [0; 16]).unwrap_err().status);
        statuses.push(exec.alloc(16).unwrap_err().status);
        statuses.push(exec.memset(s, b, 0, 16, 0, 1).unwrap_err().status);
        statuses.push(exec.htod(s, b, 0, &[0; 16]).unwrap_err().status);
        exec.free(b);
        exec.close_stream(s);
        let poisoned = exec.poisoned();
        let pid = exec.pid();
        drop(exec);
        let _ = done.send((in_flight, statuses, poisoned, pid));
    });
    let (in_flight, statuses, poisoned, pid) = result
        .recv_timeout(Duration::from_secs(60))
        .expect("the executor hung after its worker was killed");
    assert!(in_flight > 0, "nothing was in flight");
    assert!(
        statuses.iter().all(|&s| s == Status::DeviceLost),
        "{statuses:?}"
    );
    assert!(statuses.len() >= 5);
    assert!(poisoned);
    assert!(reaped(pid));
    assert!(factory.workers().is_empty());
}

// ---------------------------------------------------------------------------------------
// The pool of ready workers

/// Waits up to `limit` for `done`.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// True once `pid` has exited (a zombie not yet reaped, or gone).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// True when no process `pid` exists any more (it was reaped).
fn gone(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// An executor that allocates, copies and reads back correctly.
fn serves(exec: &mut dyn Executor) {
    let s = exec.open_stream().unwrap();
    let b = exec.alloc(4099).unwrap();
    let data = pattern(4099, 77);
    exec.htod(s, b, 0, &data).unwrap();
    let mut out = vec![0u8; 4099];
    exec.dtoh(s, b, 0, &mut out).unwrap();
    assert_eq!(out, data);
    exec.free(b);
    exec.close_stream(s);
}

#[test]
fn a_pool_hands_out_started_workers_and_refills() {
    let factory = Arc::new(cpu_workers().with_pool(2));
    assert_eq!(factory.pool_size(), 2);
    assert_eq!(cpu_workers().pool_size(), 0);
    assert_eq!(factory.pool_ready(), 0, "the pool starts on demand");
    factory.start_pool();
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 2));
    let pooled = factory.workers();
    assert_eq!(pooled.len(), 2);

    let started = Instant::now();
    let mut exec = factory.create_executor().unwrap();
    let took = started.elapsed();
    assert!(pooled.contains(&exec.pid()), "not from the pool");
    assert!(took < Duration::from_secs(1), "create took {took:?}");
    assert!(
        wait_for(Duration::from_secs(10), || factory.pool_ready() == 2),
        "the pool did not refill"
    );
    assert_eq!(factory.workers().len(), 3);
    serves(&mut exec);

    // Through the trait too.
    let mut boxed = factory.create().unwrap();
    serves(boxed.as_mut());
    drop(boxed);
    // A pooled worker outlives the thread that took it: the pool's thread started it.
    let f = factory.clone();
    let mut taken = std::thread::spawn(move || f.create_executor().unwrap())
        .join()
        .unwrap();
    serves(&mut taken);
    drop(taken);
    drop(exec);
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 2));
    assert_eq!(factory.workers().len(), 2);
}

#[test]
fn a_pooled_worker_that_died_while_idle_is_not_handed_out() {
    let factory = cpu_workers().with_pool(2);
    factory.start_pool();
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 2));
    let killed = factory.workers();
    for &pid in &killed {
        // SAFETY: signals a child this test started.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    }
    assert!(wait_for(Duration::from_secs(10), || killed
        .iter()
        .all(|&p| exited(p))));
    let mut exec = factory.create_executor().unwrap();
    assert!(
        !killed.contains(&exec.pid()),
        "a dead worker was handed out"
    );
    serves(&mut exec);
    for pid in killed {
        assert!(reaped(pid), "the dead worker {pid} was not reaped");
    }
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 2));
}

#[test]
fn dropping_the_factory_stops_and_reaps_its_pool() {
    let factory = cpu_workers().with_pool(2);
    let mut exec = factory.create_executor().unwrap(); // the pool was empty: started now
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 2));
    serves(&mut exec);
    let pids = factory.workers();
    assert_eq!(pids.len(), 3);
    drop(exec);
    drop(factory);
    for pid in pids {
        assert!(gone(pid), "worker {pid} outlived its factory");
    }
}

#[test]
fn a_reconfigured_factory_restarts_its_pool_with_the_new_settings() {
    let factory = cpu_workers().with_pool(1);
    factory.start_pool();
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 1));
    let old = factory.workers();
    let factory = factory.with_staging_bytes(64 << 10);
    assert_eq!(factory.pool_ready(), 0);
    for &pid in &old {
        assert!(gone(pid), "a worker with the old settings is left");
    }
    let mut exec = factory.create_executor().unwrap();
    serves(&mut exec);
    assert!(wait_for(Duration::from_secs(10), || factory.pool_ready() == 1));
}

fn out_of_range(data: &[u8]) -> GuestAccessError {
    GuestAccessError::Memory(format!("out of range of {} bytes", data.len()))
}

/// Guest buffers as a transport hands them over: read and written in place.
struct Guest(std::sync::Mutex<Vec<u8>>);

impl vgpu_mediator::GuestSource for Guest {
    fn len(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), GuestAccessError> {
        let data = self.0.lock().unwrap();
        let at = offset as usize;
        out.copy_from_slice(data.get(at..at + out.len()).ok_or(out_of_range(&data))?);
        Ok(())
    }
}

impl vgpu_mediator::GuestSink for Guest {
    fn capacity(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), GuestAccessError> {
        let mut out = self.0.lock().unwrap();
        let at = offset as usize;
        let total = out.len() as u64;
        out.get_mut(at..at + data.len())
            .ok_or(GuestAccessError::OutOfRange {
                offset,
                len: data.len() as u64,
                total,
            })?
            .copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn guest_data_goes_straight_between_guest_buffers_and_the_staging_ring() {
    let factory = cpu_workers().with_staging_bytes(64 << 10);
    let mut e = factory.create_executor().unwrap();
    let s = e.open_stream().unwrap();
    let len = (300 << 10) + 77;
    let b = e.alloc(len as u64 + 13).unwrap();
    let data = pattern(len, 5);
    let src = Guest(std::sync::Mutex::new(data.clone()));
    e.htod_from(s, b, 13, &src).unwrap();
    let dst = Guest(std::sync::Mutex::new(vec![0; len]));
    e.dtoh_into(s, b, 13, len as u64, &dst).unwrap();
    assert!(dst.0.lock().unwrap().as_slice() == data.as_slice());
    // A guest buffer that fails to read is an error of the copy, not of the worker.
    let short = Guest(std::sync::Mutex::new(vec![0; 10]));
    let short_sink = Guest(std::sync::Mutex::new(vec![0; 10]));
    assert!(e.dtoh_into(s, b, 0, 4096, &short_sink).is_err());
    assert!(!e.poisoned());
    drop(short);
    e.sync(s).unwrap();
}

fn memfd(len: u64) -> std::fs::File {
    vgpu_mediator::hostmap::memfd(c"vm-ram", len).unwrap()
}

#[test]
fn a_host_buffer_is_mapped_in_the_worker_from_the_vms_memory_files() {
    use std::os::unix::fs::FileExt;
    use vgpu_mediator::hostmap::{FilePiece, HostMapping};
    let page = 4096u64;
    // Two "memory regions" of a VM, each its own file.
    let (low, high) = (memfd(8 * page), memfd(8 * page));
    let data = pattern(5 * page as usize, 9);
    // The buffer: 3 pages at page 5 of `high`, then 2 pages at page 1 of `low`.
    high.write_all_at(&data[..3 * page as usize], 5 * page)
        .unwrap();
    low.write_all_at(&data[3 * page as usize..], page).unwrap();
    let (low, high) = (Arc::new(low), Arc::new(high));
    let mapping = HostMapping {
        pieces: vec![
            FilePiece {
                file: high.clone(),
                offset: 5 * page,
                len: 3 * page,
            },
            FilePiece {
                file: low.clone(),
                offset: page,
                len: 2 * page,
            },
        ],
    };
    let factory = cpu_workers();
    let mut e = factory.create_executor().unwrap();
    let s = e.open_stream().unwrap();
    let b = e.alloc(5 * page).unwrap();
    e.register_host(1, &mapping).unwrap();
    // From the buffer to the device and back into another part of it.
    e.htod_host(s, b, 0, 1, 100, 4 * page).unwrap();
    let mut out = vec![0u8; 4 * page as usize];
    e.dtoh(s, b, 0, &mut out).unwrap();
    assert!(out == data[100..100 + 4 * page as usize]);
    e.dtoh_host(s, b, 0, 1, 0, page).unwrap();
    let mut back = vec![0u8; page as usize];
    high.read_exact_at(&mut back, 5 * page).unwrap();
    assert!(
        back == data[100..100 + page as usize],
        "the write did not reach the VM's memory"
    );
    // Past its end, or an unknown buffer: errors; the worker serves on.
    assert!(e.htod_host(s, b, 0, 1, 4 * page + 1, page).is_err());
    assert!(e.htod_host(s, b, 0, 2, 0, 16).is_err());
    // A piece past the end of its file is refused before anything is mapped.
    let bad = HostMapping {
        pieces: vec![FilePiece {
            file: low,
            offset: 7 * page,
            len: 2 * page,
        }],
    };
    assert_eq!(
        e.register_host(3, &bad).unwrap_err().status,
        Status::InvalidArgument
    );
    e.unregister_host(1);
    assert!(e.htod_host(s, b, 0, 1, 0, 16).is_err());
    assert!(!e.poisoned());
    e.sync(s).unwrap();
}

#[test]
fn a_cpu_worker_reports_no_device_memory_beyond_its_buffers() {
    let mut exec = cpu_workers().spawn().expect("worker");
    // Reported with the worker's start: nothing asked of it since.
    assert_eq!(exec.context_bytes(), 0);
    for spec in vgpu_kernels::CATALOG {
        assert_eq!(exec.local_reservation(KernelRef::Builtin(spec)), Ok(0));
    }
    assert_eq!(exec.in_flight(), 0);
    assert_eq!(exec.alloc_footprint(1), 1);
    assert_eq!(exec.alloc_footprint(3 << 20), 3 << 20);
    let s = exec.open_stream().unwrap();
    let b = exec.alloc(64).unwrap();
    exec.free(b);
    exec.close_stream(s);
    // A kernel the worker reported nothing about: asked of it (the CPU reserves none).
    assert_eq!(
        exec.local_reservation(KernelRef::Module(ModuleId(99), "k")),
        Ok(0)
    );
    assert_eq!(exec.in_flight(), 0);
    assert!(!exec.poisoned());
}
