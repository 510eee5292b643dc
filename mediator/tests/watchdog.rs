// SPDX-License-Identifier: Apache-2.0
//! The watchdog, with CPU executors in worker processes: a kernel that runs past the
//! kernel timeout ends its session's worker (`DEVICE_LOST`, detail 702) and nothing else,
//! a killer ends a worker while its executor's thread is blocked on it, and a VM reset or
//! removal never waits for a kernel that does not end.

use std::sync::{mpsc, Arc, Once};
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;
use vgpu_mediator::executor::{
    BufferId, ExecError, ExecParam, Executor, KernelRef, StreamId, TIMEOUT_DETAIL,
};
use vgpu_mediator::process::{ProcessExecutor, ProcessExecutorFactory, WORKER_ENV};
use vgpu_mediator::{CompletionSink, Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

const WORKER: &str = env!("CARGO_BIN_EXE_vgpu-executor-worker");

/// A kernel that outlasts every test: an hour of `spin_us`.
const HOUR_US: u32 = 3_600_000_000;

fn cpu_workers() -> ProcessExecutorFactory {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(WORKER_ENV, WORKER));
    ProcessExecutorFactory::cpu().expect("worker binary")
}

/// True once `pid` is no child of this process any more: it exited and was reaped.
fn reaped(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: WNOHANG never blocks; `status` is an out-parameter.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

// ---- the executor ----------------------------------------------------------------------

/// Launches `spin_us` for `us` microseconds on a fresh 4-byte buffer.
fn spin(exec: &mut dyn Executor, s: StreamId, us: u32) -> BufferId {
    let b = exec.alloc(4).unwrap();
    let shape = LaunchShape {
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
    };
    let params = [
        ExecParam::Buffer(b),
        ExecParam::Value(us.to_le_bytes().to_vec()),
    ];
    let kernel = KernelRef::Builtin(vgpu_kernels::find("spin_us").unwrap());
    exec.launch(s, kernel, &shape, &params).unwrap();
    b
}

/// Drops the executor and checks that it did not wait for its worker.
fn drop_promptly(exec: ProcessExecutor) {
    let pid = exec.pid();
    let started = Instant::now();
    drop(exec);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "dropping a killed executor took {:?}",
        started.elapsed()
    );
    assert!(reaped(pid), "worker {pid} not reaped");
}

fn lost(e: &ExecError, detail: u32) {
    assert_eq!((e.status, e.detail), (Status::DeviceLost, detail), "{e}");
}

#[test]
fn a_killer_ends_a_call_blocked_on_a_kernel_that_does_not_end() {
    let factory = cpu_workers();
    let mut exec = factory.spawn().unwrap();
    let s = exec.open_stream().unwrap();
    spin(&mut exec, s, HOUR_US);
    let killer = exec.killer().expect("a worker process can be killed");
    let (tx, rx) = mpsc::channel();
    let kill = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let at = Instant::now();
        killer.kill(false);
        tx.send(at).unwrap();
        killer
    });
    let e = exec.sync(s).unwrap_err();
    let woke = rx.recv().unwrap().elapsed();
    assert!(
        woke < Duration::from_secs(1),
        "woke {woke:?} after the kill"
    );
    lost(&e, 0);
    assert!(exec.poisoned());
    lost(&exec.alloc(4).unwrap_err(), 0);
    let mut out = [0u8; 4];
    lost(&exec.dtoh(s, BufferId(1), 0, &mut out).unwrap_err(), 0);
    let killer = kill.join().unwrap();
    drop_promptly(exec);
    // The worker is reaped: a late kill signals nobody.
    killer.kill(true);
}

#[test]
fn a_wait_past_the_kernel_timeout_kills_the_worker_with_detail_702() {
    let factory = cpu_workers().with_kernel_timeout(Duration::from_secs(1));
    assert_eq!(factory.kernel_timeout(), Duration::from_secs(1));
    let mut exec = factory.spawn().unwrap();
    let s = exec.open_stream().unwrap();
    // Work shorter than the timeout is not touched.
    let b = spin(&mut exec, s, 100_000);
    exec.sync(s).unwrap();
    let mut out = [0u8; 4];
    exec.dtoh(s, b, 0, &mut out).unwrap();
    assert_eq!(u32::from_le_bytes(out), 100_000);

    spin(&mut exec, s, HOUR_US);
    let started = Instant::now();
    let e = exec.sync(s).unwrap_err();
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&took),
        "the sync returned after {took:?}"
    );
    lost(&e, TIMEOUT_DETAIL);
    assert!(e.message.contains("kernel timeout"), "{e}");
    assert!(exec.poisoned());
    lost(&exec.alloc(4).unwrap_err(), TIMEOUT_DETAIL);
    drop_promptly(exec);
}

#[test]
fn a_full_pipeline_behind_a_stuck_kernel_times_out_too() {
    let factory = cpu_workers().with_kernel_timeout(Duration::from_millis(500));
    let mut exec = factory.spawn().unwrap();
    let s = exec.open_stream().unwrap();
    let b = spin(&mut exec, s, HOUR_US);
    // Requests that are not waited for go on until too many are unanswered: the call
    // that has to read a reply to make room times out like a sync.
    let started = Instant::now();
    let e = (0..100_000)
        .find_map(|_| exec.memset(s, b, 0, 4, 7, 4).err())
        .expect("a memset must wait for room");
    assert!(started.elapsed() < Duration::from_secs(3));
    lost(&e, TIMEOUT_DETAIL);
    drop_promptly(exec);
}

#[test]
fn an_idle_executor_killed_from_outside_is_lost_at_its_next_call() {
    let factory = cpu_workers();
    let mut exec = factory.spawn().unwrap();
    let s = exec.open_stream().unwrap();
    let b = exec.alloc(16).unwrap();
    exec.killer().unwrap().kill(true);
    assert!(exec.poisoned());
    // Not waited for, yet refused at once: the worker is known to be gone.
    lost(&exec.memset(s, b, 0, 16, 1, 1).unwrap_err(), TIMEOUT_DETAIL);
    lost(&exec.sync(s).unwrap_err(), TIMEOUT_DETAIL);
    drop_promptly(exec);
}

// ---- the mediator ----------------------------------------------------------------------

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

/// Allocates 64 bytes, fills them with `value` (memset), reads them back, frees them.
fn works(m: &Mediator, t: TenantId, s: u64, value: u32) {
    let b = call(m, t, s, Command::Alloc { size: 64 });
    assert_eq!(b.status, Status::Ok, "ALLOC");
    let set = Command::Memset {
        dst: b.value0,
        offset: 0,
        len: 64,
        value,
        width: 4,
    };
    assert_eq!(call(m, t, s, set).status, Status::Ok, "MEMSET");
    let read = Command::Dtoh {
        src: b.value0,
        offset: 0,
        len: 64,
    };
    let out = call(m, t, s, read);
    assert_eq!(out.status, Status::Ok, "DTOH");
    assert!(out.data.chunks_exact(4).all(|w| w == value.to_le_bytes()));
    let free = call(m, t, s, Command::Free { handle: b.value0 });
    assert_eq!(free.status, Status::Ok, "FREE");
}

/// Launches an hour of `spin_us` in session `s`; the launch itself is accepted at once.
fn launch_hour(m: &Mediator, t: TenantId, s: u64) {
    let b = call(m, t, s, Command::Alloc { size: 4 });
    assert_eq!(b.status, Status::Ok);
    let launch = Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "spin_us".into(),
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(b.value0), Param::u32(HOUR_US)],
    });
    assert_eq!(call(m, t, s, launch).status, Status::Ok, "LAUNCH");
}

/// Answers with the time they came.
struct Answers(std::sync::Mutex<mpsc::Sender<(Response, Instant)>>);

impl CompletionSink for Answers {
    fn complete(&self, _token: u64, response: Response) {
        let _ = self.0.lock().unwrap().send((response, Instant::now()));
    }
}

/// Submits `c` to session `s` without waiting: a receiver of its answer.
fn submit(m: &Mediator, t: TenantId, s: u64, c: Command) -> mpsc::Receiver<(Response, Instant)> {
    let (tx, rx) = mpsc::channel();
    let sink = Arc::new(Answers(std::sync::Mutex::new(tx)));
    m.submit(t, Request::new(s, c), 0, sink);
    rx
}

/// The answer of a submitted request and how long after `since` it came.
fn answer(rx: &mpsc::Receiver<(Response, Instant)>, since: Instant) -> (Response, Duration) {
    let (r, at) = rx.recv_timeout(Duration::from_secs(30)).expect("an answer");
    (r, at.saturating_duration_since(since))
}

/// The worker that appeared since `before`.
fn new_worker(factory: &ProcessExecutorFactory, before: &[u32]) -> u32 {
    let fresh: Vec<u32> = factory
        .workers()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(fresh.len(), 1, "one new worker expected, got {fresh:?}");
    fresh[0]
}

#[test]
fn a_kernel_past_the_timeout_loses_its_session_and_nothing_else() {
    let factory = Arc::new(cpu_workers().with_kernel_timeout(Duration::from_secs(2)));
    let m = Mediator::new(factory.clone());
    let t = tenant(&m, "vm1");
    let stuck = open(&m, t);
    let w_stuck = new_worker(&factory, &[]);
    let sibling = open(&m, t);
    let other_vm = tenant(&m, "vm2");
    let other = open(&m, other_vm);
    works(&m, t, sibling, 1);

    launch_hour(&m, t, stuck);
    let sync_sent = Instant::now();
    let sync = submit(&m, t, stuck, Command::Sync);
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile the VM's other session sends work (it runs once the tenant's worker is
    // free again), and the other VM is served at once.
    let meanwhile = {
        let m = m.clone();
        std::thread::spawn(move || works(&m, t, sibling, 2))
    };
    let started = Instant::now();
    works(&m, other_vm, other, 3);
    assert!(started.elapsed() < Duration::from_secs(1));

    let (r, took) = answer(&sync, sync_sent);
    assert_eq!((r.status, r.detail), (Status::DeviceLost, TIMEOUT_DETAIL));
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(4)).contains(&took),
        "the SYNC was answered after {took:?}"
    );
    meanwhile.join().unwrap();
    // Sticky for the session whose kernel ran too long; its worker is gone.
    let next = call(&m, t, stuck, Command::Alloc { size: 4 });
    assert_eq!(
        (next.status, next.detail),
        (Status::DeviceLost, TIMEOUT_DETAIL)
    );
    assert!(reaped(w_stuck), "the timed-out worker was not reaped");
    assert_eq!(m.usage(t).unwrap().restarts, 1);

    works(&m, t, sibling, 4);
    works(&m, other_vm, other, 5);
    let fresh = open(&m, t);
    works(&m, t, fresh, 6);
    assert_eq!(call(&m, t, stuck, Command::SessionClose).status, Status::Ok);
}

#[test]
fn a_reset_does_not_wait_for_a_kernel_that_does_not_end() {
    let factory = Arc::new(cpu_workers());
    let m = Mediator::new(factory.clone());
    let t = tenant(&m, "vm1");
    let stuck = open(&m, t);
    let w_stuck = new_worker(&factory, &[]);
    let other_vm = tenant(&m, "vm2");
    let other = open(&m, other_vm);
    launch_hour(&m, t, stuck);
    let sync = submit(&m, t, stuck, Command::Sync);
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    m.reset_tenant(t);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the reset took {took:?}");
    let (r, _) = answer(&sync, started);
    assert_eq!((r.status, r.detail), (Status::DeviceLost, 0));
    assert!(reaped(w_stuck), "the stuck worker was not reaped");
    let u = m.usage(t).unwrap();
    assert_eq!((u.sessions, u.mem_used), (0, 0));

    // The VM starts over; the other VM never noticed.
    assert_eq!(
        call(&m, t, stuck, Command::Sync).status,
        Status::InvalidSession
    );
    let fresh = open(&m, t);
    works(&m, t, fresh, 1);
    works(&m, other_vm, other, 2);
}

#[test]
fn removing_a_tenant_does_not_wait_for_a_kernel_that_does_not_end() {
    let factory = Arc::new(cpu_workers());
    let m = Mediator::new(factory.clone());
    let t = tenant(&m, "vm1");
    let stuck = open(&m, t);
    let w_stuck = new_worker(&factory, &[]);
    let other_vm = tenant(&m, "vm2");
    let other = open(&m, other_vm);
    launch_hour(&m, t, stuck);
    let sync = submit(&m, t, stuck, Command::Sync);
    std::thread::sleep(Duration::from_millis(200));
    // Queued behind the stuck SYNC: cancelled by the removal, not run.
    let queued = submit(&m, t, stuck, Command::Alloc { size: 8 });

    let started = Instant::now();
    m.remove_tenant(t);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the removal took {took:?}");
    assert_eq!(answer(&sync, started).0.status, Status::DeviceLost);
    assert_eq!(answer(&queued, started).0.status, Status::DeviceLost);
    assert_eq!(m.usage(t), None);
    assert!(reaped(w_stuck), "the stuck worker was not reaped");
    works(&m, other_vm, other, 1);

    // Stopping the mediator with a stuck kernel does not wait for it either.
    launch_hour(&m, other_vm, other);
    let sync = submit(&m, other_vm, other, Command::Sync);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    drop(m);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
    assert_eq!(answer(&sync, started).0.status, Status::DeviceLost);
    assert!(factory.workers().is_empty());
}

// ---- in the daemon's process -----------------------------------------------------------

/// The CPU executor in this process (`--executor cpu`) with the scheduler's watchdog.
fn in_process(kernel_timeout: Duration) -> Arc<Mediator> {
    Mediator::with_config(
        Arc::new(vgpu_mediator::cpu::CpuExecutorFactory::new()),
        vgpu_mediator::Limits::default(),
        vgpu_mediator::SchedConfig {
            kernel_timeout,
            ..Default::default()
        },
    )
}

#[test]
fn the_watchdog_ends_a_kernel_of_the_in_process_cpu_executor_and_nothing_else() {
    let m = in_process(Duration::from_secs(1));
    let (stuck, other) = (tenant(&m, "stuck"), tenant(&m, "other"));
    let s = open(&m, stuck);
    let sibling = open(&m, stuck);
    let o = open(&m, other);
    let b = call(&m, stuck, s, Command::Alloc { size: 4 });
    let launch = Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "spin_us".into(),
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(b.value0), Param::u32(HOUR_US)],
    });
    // This executor runs the kernel inside the call: the answer comes when it ends.
    let started = Instant::now();
    let rx = submit(&m, stuck, s, launch);
    std::thread::sleep(Duration::from_millis(300));
    // Another VM is served meanwhile (the stuck one stopped keeping it off the device).
    let t0 = Instant::now();
    works(&m, other, o, 7);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let (r, after) = answer(&rx, started);
    assert_eq!((r.status, r.detail), (Status::DeviceLost, TIMEOUT_DETAIL));
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_secs(4),
        "ended after {after:?}"
    );
    assert_eq!(m.usage(stuck).unwrap().timeouts, 1);
    // The session keeps answering its loss; the VM's other session and a new one work.
    assert_eq!(call(&m, stuck, s, Command::Sync).status, Status::DeviceLost);
    works(&m, stuck, sibling, 8);
    let fresh = open(&m, stuck);
    works(&m, stuck, fresh, 9);
}

#[test]
fn a_reset_ends_a_kernel_of_the_in_process_cpu_executor_at_once() {
    let m = in_process(Duration::from_secs(600));
    let t = tenant(&m, "vm");
    let s = open(&m, t);
    let b = call(&m, t, s, Command::Alloc { size: 4 });
    let launch = Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "spin_us".into(),
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(b.value0), Param::u32(HOUR_US)],
    });
    let _rx = submit(&m, t, s, launch);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    m.reset_tenant(t);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let s = open(&m, t);
    works(&m, t, s, 3);
    let started = Instant::now();
    drop(m);
    assert!(started.elapsed() < Duration::from_secs(1));
}
