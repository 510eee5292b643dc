// SPDX-License-Identifier: Apache-2.0
//! Several GPUs in one mediator, on simulated devices (the CPU executor as N GPUs): VMs
//! are placed on one GPU each (by name, or automatically by unpromised memory and then by
//! count), their sessions run on that GPU's executors only, quotas count against their
//! GPU, each GPU's scheduler shares only that GPU, and a storm of faults on one GPU leaves
//! the VMs of another untouched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread;
use std::time::Duration;

use vgpu_mediator::cpu::CpuExecutorFactory;
use vgpu_mediator::executor::ExecResult;
use vgpu_mediator::process::{ProcessExecutorFactory, SIMULATED_FAULT_VALUE, WORKER_ENV};
use vgpu_mediator::{
    plan_placement, DeviceInfo, Executor, ExecutorFactory, GpuUsage, Limits, Mediator, Placement,
    SchedConfig, TenantConfig, TenantId,
};
use vgpu_protocol::{Command, InfoReply, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

const WORKER: &str = env!("CARGO_BIN_EXE_vgpu-executor-worker");

fn use_built_worker() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(WORKER_ENV, WORKER));
}

/// A simulated GPU that counts the executors made on it.
struct Counted {
    inner: CpuExecutorFactory,
    created: AtomicU64,
}

impl ExecutorFactory for Counted {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }
    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.inner.create()
    }
}

fn counted(count: u32) -> Arc<Counted> {
    Arc::new(Counted {
        inner: CpuExecutorFactory::simulated(count),
        created: AtomicU64::new(0),
    })
}

/// Two simulated GPUs, 0 and 1, each counting its executors.
fn two_gpus() -> (Arc<Mediator>, [Arc<Counted>; 2]) {
    let (a, b) = (counted(2), counted(2));
    let m = Mediator::with_gpus(
        vec![(0, a.clone()), (1, b.clone())],
        Limits::default(),
        SchedConfig::default(),
    );
    (m, [a, b])
}

fn config(name: &str, quota: u64, weight: u32) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        mem_quota: quota,
        weight,
    }
}

fn call(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    m.call(t, Request::new(session, command))
}

fn ok(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    let r = call(m, t, session, command.clone());
    assert_eq!(r.status, Status::Ok, "{command:?}");
    r
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

#[test]
fn auto_placement_takes_the_gpu_with_most_unpromised_memory_then_fewest_vms() {
    let (m, _) = two_gpus();
    assert_eq!(m.gpus(), [0, 1]);
    let total = m.gpu_device(1).unwrap().total_memory;
    let q = total / 8;
    let add = |name: &str, quota: u64| m.add_tenant(config(name, quota, 100)).unwrap();
    // Equal GPUs: the lowest index first, then the other one.
    let a = add("a", q);
    let b = add("b", q);
    assert_eq!((m.tenant_gpu(a), m.tenant_gpu(b)), (Some(0), Some(1)));
    // A big quota on GPU 0 leaves GPU 1 with more unpromised memory, though it then has
    // more VMs.
    let big = m
        .add_tenant_on(config("big", 4 * q, 100), Placement::Gpu(0))
        .unwrap();
    assert_eq!(m.tenant_gpu(big), Some(0));
    let c = add("c", q);
    let d = add("d", q);
    assert_eq!((m.tenant_gpu(c), m.tenant_gpu(d)), (Some(1), Some(1)));
    // Now GPU 0 has 5q promised, GPU 1 3q: GPU 1 still has more free, twice.
    let e = add("e", q);
    let f = add("f", q);
    assert_eq!((m.tenant_gpu(e), m.tenant_gpu(f)), (Some(1), Some(1)));
    // 5q each: a tie in memory, GPU 0 has fewer VMs (2 against 5).
    let g = add("g", 0);
    assert_eq!(m.tenant_gpu(g), Some(0));
    let usage = m.gpu_usage();
    assert_eq!(
        usage
            .iter()
            .map(|u| (u.index, u.tenants, u.quota_committed))
            .collect::<Vec<_>>(),
        [(0, 3, 5 * q), (1, 5, 5 * q)]
    );
    // A GPU that is not driven is refused, naming the ones that are.
    let e = m
        .add_tenant_on(config("lost", q, 100), Placement::Gpu(7))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(e.to_string(), "no GPU 7 (GPUs: 0, 1)");
    assert_eq!(m.tenants().len(), 8);
}

fn usage(index: u32, total: u64, tenants: u32, committed: u64) -> GpuUsage {
    GpuUsage {
        index,
        device: DeviceInfo {
            total_memory: total,
            ..CpuExecutorFactory::new().device().clone()
        },
        tenants,
        quota_committed: committed,
        mem_used: 0,
    }
}

#[test]
fn a_batch_is_placed_named_first_then_by_quota_then_evenly() {
    const G: u64 = 1 << 30;
    let gpus = [usage(0, 80 * G, 0, 0), usage(2, 80 * G, 0, 0)];
    // Four sockets, no quota: two per GPU, each half its GPU.
    let even = plan_placement(&gpus, &[(Placement::Auto, None); 4]).unwrap();
    assert_eq!(even, [(0, 40 * G), (2, 40 * G), (0, 40 * G), (2, 40 * G)]);
    // Named ones first, wherever they are in the list; then the rest fills up the other.
    let named = plan_placement(
        &gpus,
        &[
            (Placement::Auto, None),
            (Placement::Gpu(0), None),
            (Placement::Gpu(0), None),
            (Placement::Auto, None),
        ],
    )
    .unwrap();
    assert_eq!(named, [(2, 40 * G), (0, 40 * G), (0, 40 * G), (2, 40 * G)]);
    // Quotas go where most memory is unpromised (here GPU 2, already holding 60 GiB less).
    let busy = [usage(0, 80 * G, 1, 60 * G), usage(2, 80 * G, 3, 10 * G)];
    let quotas = plan_placement(
        &busy,
        &[
            (Placement::Auto, Some(8 * G)),
            (Placement::Auto, Some(8 * G)),
        ],
    )
    .unwrap();
    assert_eq!(quotas, [(2, 8 * G), (2, 8 * G)]);
    assert_eq!(
        plan_placement(&gpus, &[(Placement::Gpu(1), None)]).unwrap_err(),
        "no GPU 1 (GPUs: 0, 2)"
    );
}

#[test]
fn a_vms_sessions_run_on_its_gpus_executors_and_its_device_names_that_gpu() {
    let (m, [gpu0, gpu1]) = two_gpus();
    let t = m
        .add_tenant_on(config("vm1", 64 << 20, 100), Placement::Gpu(1))
        .unwrap();
    let sessions: Vec<u64> = (0..3)
        .map(|_| ok(&m, t, 0, Command::SessionOpen).value0)
        .collect();
    for &s in &sessions {
        let b = ok(&m, t, s, Command::Alloc { size: 64 }).value0;
        ok(&m, t, s, fill(b, 5));
        ok(&m, t, s, Command::Sync);
    }
    assert_eq!(gpu1.created.load(Ordering::Relaxed), 3);
    assert_eq!(gpu0.created.load(Ordering::Relaxed), 0);
    let info = InfoReply::decode(&ok(&m, t, 0, Command::Info).data).unwrap();
    assert_eq!(info.config.gpu, 1);
    assert_eq!(info.config.mem_quota, 64 << 20);
    assert_eq!(
        info.config.device_memory,
        m.gpu_device(1).unwrap().total_memory
    );
    assert_eq!(m.device_config(t).unwrap().gpu, 1);
}

#[test]
fn quotas_count_against_each_vms_own_gpu() {
    let (m, _) = two_gpus();
    const Q: u64 = 1 << 20;
    let a = m
        .add_tenant_on(config("a", Q, 100), Placement::Gpu(0))
        .unwrap();
    let b = m
        .add_tenant_on(config("b", 2 * Q, 100), Placement::Gpu(1))
        .unwrap();
    let (sa, sb) = (
        ok(&m, a, 0, Command::SessionOpen).value0,
        ok(&m, b, 0, Command::SessionOpen).value0,
    );
    ok(&m, a, sa, Command::Alloc { size: Q });
    assert_eq!(
        call(&m, a, sa, Command::Alloc { size: 4096 }).status,
        Status::QuotaExceeded
    );
    // A full VM on GPU 0 takes nothing from the VM on GPU 1.
    ok(&m, b, sb, Command::Alloc { size: 2 * Q });
    assert_eq!(
        call(&m, b, sb, Command::Alloc { size: 4096 }).status,
        Status::QuotaExceeded
    );
    let usage = m.gpu_usage();
    assert_eq!(
        usage
            .iter()
            .map(|u| (u.index, u.quota_committed, u.mem_used))
            .collect::<Vec<_>>(),
        [(0, Q, Q), (1, 2 * Q, 2 * Q)]
    );
    // A quota changed at run time stays on the VM's GPU.
    assert!(m.set_quota(b, 3 * Q));
    ok(&m, b, sb, Command::Alloc { size: Q });
    assert_eq!(m.gpu_usage()[1].quota_committed, 3 * Q);
}

/// Device time of a tenant, in nanoseconds.
fn device_ns(m: &Mediator, t: TenantId) -> u64 {
    m.usage(t).unwrap().device_ns
}

#[test]
fn each_gpu_is_shared_by_weight_between_its_own_vms_only() {
    use_built_worker();
    let gpu = || -> Arc<dyn ExecutorFactory> { Arc::new(ProcessExecutorFactory::cpu().unwrap()) };
    let m = Mediator::with_gpus(
        vec![(0, gpu()), (1, gpu())],
        Limits::default(),
        SchedConfig::default(),
    );
    let on = |name: &str, weight: u32, gpu: u32| {
        m.add_tenant_on(config(name, 1 << 30, weight), Placement::Gpu(gpu))
            .unwrap()
    };
    let (light, heavy, alone) = (on("light", 1, 0), on("heavy", 3, 0), on("alone", 1, 1));
    // Each GPU's scheduler knows only its own VMs.
    let (s0, s1) = (m.gpu_scheduler(0).unwrap(), m.gpu_scheduler(1).unwrap());
    assert!(s0.stats(alone).is_none() && s1.stats(light).is_none() && s1.stats(heavy).is_none());
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = [light, heavy, alone]
        .into_iter()
        .map(|t| {
            let (m, stop) = (m.clone(), stop.clone());
            let s = ok(&m, t, 0, Command::SessionOpen).value0;
            let out = ok(&m, t, s, Command::Alloc { size: 4 }).value0;
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    ok(&m, t, s, spin(out, 500));
                }
                ok(&m, t, s, Command::Sync);
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let before = [light, heavy, alone].map(|t| device_ns(&m, t));
    thread::sleep(Duration::from_millis(2500));
    let after = [light, heavy, alone].map(|t| device_ns(&m, t));
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        d.join().unwrap();
    }
    let [tl, th, ta] = [0, 1, 2].map(|i| after[i] - before[i]);
    let ratio = th as f64 / tl as f64;
    assert!(
        (2.7..=3.3).contains(&ratio),
        "GPU 0: device time {tl} ns : {th} ns = 1 : {ratio:.2}"
    );
    // The VM alone on GPU 1 is not held back by GPU 0's VMs: its GPU is busy with its
    // work nearly all the while, weight 1 or not.
    let busy = ta as f64 / 2.5e9;
    assert!(busy > 0.8, "GPU 1 busy {:.0}% of the time", busy * 100.0);
}

#[test]
fn a_fault_storm_on_one_gpu_leaves_the_vms_of_another_untouched() {
    use_built_worker();
    let faulty: Arc<dyn ExecutorFactory> =
        Arc::new(ProcessExecutorFactory::cpu_fault_sim().unwrap());
    let good: Arc<dyn ExecutorFactory> = Arc::new(ProcessExecutorFactory::cpu().unwrap());
    let m = Mediator::with_gpus(
        vec![(0, faulty), (1, good)],
        Limits::default(),
        SchedConfig::default(),
    );
    let storm = m
        .add_tenant_on(config("storm", 1 << 30, 100), Placement::Gpu(0))
        .unwrap();
    let calm = m
        .add_tenant_on(config("calm", 1 << 30, 100), Placement::Gpu(1))
        .unwrap();
    let cs = ok(&m, calm, 0, Command::SessionOpen).value0;
    let kept = ok(&m, calm, cs, Command::Alloc { size: 64 }).value0;
    ok(&m, calm, cs, fill(kept, 42));
    let stop = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(AtomicU64::new(0));
    let stormer = {
        let (m, stop, faults) = (m.clone(), stop.clone(), faults.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) || faults.load(Ordering::Relaxed) < 5 {
                let s = ok(&m, storm, 0, Command::SessionOpen).value0;
                let b = ok(&m, storm, s, Command::Alloc { size: 64 }).value0;
                ok(&m, storm, s, fill(b, SIMULATED_FAULT_VALUE));
                let r = call(&m, storm, s, Command::Sync);
                assert_eq!((r.status, r.detail), (Status::LaunchFailed, 719));
                ok(&m, storm, s, Command::SessionClose);
                faults.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for round in 0..200u32 {
        let b = ok(&m, calm, cs, Command::Alloc { size: 64 }).value0;
        ok(&m, calm, cs, fill(b, round));
        ok(&m, calm, cs, Command::Sync);
        let out = ok(
            &m,
            calm,
            cs,
            Command::Dtoh {
                src: b,
                offset: 0,
                len: 64,
            },
        );
        assert!(out.data.chunks_exact(4).all(|w| w == round.to_le_bytes()));
        ok(&m, calm, cs, Command::Free { handle: b });
    }
    stop.store(true, Ordering::Relaxed);
    stormer.join().unwrap();
    let out = ok(
        &m,
        calm,
        cs,
        Command::Dtoh {
            src: kept,
            offset: 0,
            len: 64,
        },
    );
    assert!(out.data.chunks_exact(4).all(|w| w == 42u32.to_le_bytes()));
    let (storm_usage, calm_usage) = (m.usage(storm).unwrap(), m.usage(calm).unwrap());
    assert!(storm_usage.restarts >= 5, "{storm_usage:?}");
    assert_eq!(calm_usage.restarts, 0);
    assert_eq!(calm_usage.sessions, 1);
}
