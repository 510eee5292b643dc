// SPDX-License-Identifier: Apache-2.0
//! The scheduler end to end, on CPU executors in worker processes (each session's work
//! queued in its own process, like a CUDA context on a GPU) with the built-in `spin_us`
//! kernel standing in for kernels of known duration: weights divide device time, and one
//! VM's flood of queued launches barely delays another's requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use vgpu_mediator::process::{ProcessExecutorFactory, WORKER_ENV};
use vgpu_mediator::{CompletionSink, Limits, Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

const WORKER: &str = env!("CARGO_BIN_EXE_vgpu-executor-worker");

fn mediator() -> Arc<Mediator> {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(WORKER_ENV, WORKER));
    let factory = ProcessExecutorFactory::cpu().expect("worker binary");
    Mediator::with_limits(Arc::new(factory), Limits::default())
}

fn tenant(m: &Mediator, name: &str, weight: u32) -> TenantId {
    m.add_tenant(TenantConfig {
        name: name.into(),
        mem_quota: 1 << 30,
        weight,
    })
    .unwrap()
}

fn ok(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    let r = m.call(t, Request::new(session, command.clone()));
    assert_eq!(r.status, Status::Ok, "{command:?}");
    r
}

/// A session with a 4-byte buffer for `spin_us` to write.
fn session(m: &Mediator, t: TenantId) -> (u64, u64) {
    let s = ok(m, t, 0, Command::SessionOpen).value0;
    let out = ok(m, t, s, Command::Alloc { size: 4 }).value0;
    (s, out)
}

fn spin(out: u64, us: u32) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "spin_us".into(),
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(out), Param::Value(us.to_le_bytes().to_vec())],
    })
}

fn device_ns(m: &Mediator, t: TenantId) -> u64 {
    m.usage(t).unwrap().device_ns
}

/// Counts answers, and the ones that were not OK.
#[derive(Default)]
struct Count {
    answered: AtomicU64,
    failed: AtomicU64,
}

impl CompletionSink for Count {
    fn complete(&self, _: u64, r: Response) {
        if r.status != Status::Ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.answered.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn weights_one_to_three_divide_device_time_one_to_three_under_saturation() {
    let m = mediator();
    let (a, b) = (tenant(&m, "light", 1), tenant(&m, "heavy", 3));
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = [a, b]
        .into_iter()
        .map(|t| {
            let (m, stop) = (m.clone(), stop.clone());
            let (s, out) = session(&m, t);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    ok(&m, t, s, spin(out, 500));
                }
                ok(&m, t, s, Command::Sync);
            })
        })
        .collect();
    // Measured once both are busy.
    thread::sleep(Duration::from_millis(300));
    let before = [device_ns(&m, a), device_ns(&m, b)];
    thread::sleep(Duration::from_millis(2500));
    let after = [device_ns(&m, a), device_ns(&m, b)];
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        d.join().unwrap();
    }
    let (ta, tb) = (after[0] - before[0], after[1] - before[1]);
    let ratio = tb as f64 / ta as f64;
    assert!(
        (2.7..=3.3).contains(&ratio),
        "device time {ta} ns : {tb} ns = 1 : {ratio:.2}"
    );
    // Work-conserving: the device (one at a time) was busy nearly all the while.
    let busy = (ta + tb) as f64 / 2.5e9;
    assert!(busy > 0.8, "device busy {:.0}% of the time", busy * 100.0);
}

/// Latencies of `n` requests of `victim`: each a 4 ms kernel and a SYNC, 3 ms apart.
fn victim_latencies(m: &Mediator, t: TenantId, s: u64, out: u64, n: usize) -> Vec<Duration> {
    let mut waits = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        ok(m, t, s, spin(out, 4000));
        ok(m, t, s, Command::Sync);
        waits.push(started.elapsed());
        thread::sleep(Duration::from_millis(3));
    }
    waits.sort();
    waits
}

fn p99(waits: &[Duration]) -> Duration {
    waits[(waits.len() * 99).div_ceil(100) - 1]
}

#[test]
fn a_flood_of_ten_thousand_queued_launches_does_not_double_another_vms_p99() {
    let m = mediator();
    let (flood, victim) = (tenant(&m, "flood", 100), tenant(&m, "victim", 100));
    let (fs, fout) = session(&m, flood);
    let (vs, vout) = session(&m, victim);
    let alone = victim_latencies(&m, victim, vs, vout, 100);

    let count = Arc::new(Count::default());
    for i in 0..10_000 {
        m.submit(flood, Request::new(fs, spin(fout, 100)), i, count.clone());
    }
    // The flood is queued and running (10,000 x 100 µs outlasts the measurement).
    thread::sleep(Duration::from_millis(50));
    let flooded = victim_latencies(&m, victim, vs, vout, 100);
    let flood_done = count.answered.load(Ordering::Relaxed);
    m.cancel_queued(flood);
    let (p_alone, p_flooded) = (p99(&alone), p99(&flooded));
    assert!(
        p_flooded <= 2 * p_alone,
        "victim p99 {p_flooded:?} with the flood, {p_alone:?} alone: {flooded:?}"
    );
    // The flood ran meanwhile: the device was shared, not handed over whole.
    assert!(flood_done > 100, "only {flood_done} flood launches ran");
    assert!(device_ns(&m, flood) > 0);
    // The flooder's session still works after its queue was cancelled.
    ok(&m, flood, fs, Command::Sync);
}

#[test]
fn a_sessions_flood_does_not_hold_up_the_other_sessions_of_its_vm() {
    // The CPU executor in this process: each launch runs in the VM's worker thread.
    let m = Mediator::new(Arc::new(vgpu_mediator::cpu::CpuExecutorFactory::new()));
    let t = tenant(&m, "vm", 100);
    let (flood, fout) = session(&m, t);
    let (other, out) = session(&m, t);
    // 2,000 launches of 200 µs queued by one session: 400 ms of work in the VM's queue.
    let count = Arc::new(Count::default());
    for i in 0..2_000 {
        m.submit(t, Request::new(flood, spin(fout, 200)), i, count.clone());
    }
    thread::sleep(Duration::from_millis(20));
    let mut waits = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        ok(&m, t, other, spin(out, 1000));
        ok(&m, t, other, Command::Sync);
        waits.push(started.elapsed());
    }
    let done = count.answered.load(Ordering::Relaxed);
    m.cancel_queued(t);
    let worst = waits.iter().max().copied().unwrap_or_default();
    // Each takes 1 ms and waits for at most the flood's launch that runs (and its turn
    // by device time), never for the 2,000 queued ahead of it.
    assert!(
        worst < Duration::from_millis(50),
        "the other session waited up to {worst:?}: {waits:?}"
    );
    assert!(done < 1_500, "{done} of the flood ran first");
}
