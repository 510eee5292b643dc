// SPDX-License-Identifier: Apache-2.0
//! Quotas that count everything a VM's work holds on the device: contexts, buffers as the
//! allocator takes them, modules, and the local memory the driver reserves for kernels.
//!
//! The executor here stands in for a GPU with the costs a CUDA device has (a context of
//! 100 MiB, 2 MiB pages, 4 MiB per module, local memory per kernel), keeps its own count
//! of what it holds, and is checked against the tenant's accounting after every step.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vgpu_kernels::LaunchShape;
use vgpu_mediator::cpu::{CpuExecutor, CpuExecutorFactory};
use vgpu_mediator::executor::{
    BufferId, DeviceInfo, ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, KernelRef,
    ModuleId, StreamId,
};
use vgpu_mediator::{Limits, Mediator, TenantConfig, TenantId, TenantUsage};
use vgpu_protocol::{
    Command, InfoReply, Launch, Param, Request, Response, SelftestKind, Status, BUILTIN_MODULE,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Each context's device memory.
const CONTEXT: u64 = 100 * MIB;
/// The allocator's page: every allocation takes whole pages.
const PAGE: u64 = 2 * MIB;
/// Each module's device memory.
const MODULE: u64 = 4 * MIB;

/// A module with one kernel of each kind of local memory use.
const PTX: &str = ".version 8.0\n.target sm_90\n.address_size 64\n\
                   .visible .entry plain() { ret; }\n\
                   .visible .entry small_local() { ret; }\n\
                   .visible .entry big_local() { ret; }\n\
                   .visible .entry trap() { ret; }\n";

/// The local memory the driver reserves for a kernel of [`PTX`].
fn local_of(kernel: &str) -> u64 {
    match kernel {
        "small_local" => 8 * MIB,
        "big_local" => GIB,
        _ => 0,
    }
}

/// What the mock device holds, counted by the executors themselves.
#[derive(Default)]
struct Device {
    used: AtomicU64,
    contexts_made: AtomicU64,
    modules_loaded: AtomicU64,
    launched: Mutex<Vec<String>>,
}

impl Device {
    fn take(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::SeqCst);
    }
    fn give(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }
    fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
    fn launched(&self, kernel: &str) -> bool {
        self.launched.lock().unwrap().iter().any(|k| k == kernel)
    }
}

/// A CPU executor with a GPU's device memory costs.
struct Mock {
    inner: CpuExecutor,
    device: Arc<Device>,
    /// Buffer -> its footprint.
    buffers: HashMap<u64, u64>,
    modules: HashSet<u64>,
    next_module: u64,
    /// The local memory reserved so far: the largest of the kernels launched.
    local: u64,
    /// A `trap` kernel ran: the next sync fails and the context is unusable.
    trapped: bool,
    poisoned: bool,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let held = CONTEXT
            + self.buffers.values().sum::<u64>()
            + self.modules.len() as u64 * MODULE
            + self.local;
        self.device.give(held);
    }
}

impl Executor for Mock {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.inner.open_stream()
    }
    fn close_stream(&mut self, s: StreamId) {
        self.inner.close_stream(s)
    }
    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        let id = self.inner.alloc(bytes)?;
        let footprint = self.alloc_footprint(bytes);
        self.buffers.insert(id.0, footprint);
        self.device.take(footprint);
        Ok(id)
    }
    fn free(&mut self, b: BufferId) {
        if let Some(footprint) = self.buffers.remove(&b.0) {
            self.device.give(footprint);
        }
        self.inner.free(b)
    }
    fn htod(&mut self, s: StreamId, d: BufferId, o: u64, data: &[u8]) -> ExecResult<()> {
        self.inner.htod(s, d, o, data)
    }
    fn dtoh(&mut self, s: StreamId, b: BufferId, o: u64, out: &mut [u8]) -> ExecResult<()> {
        self.inner.dtoh(s, b, o, out)
    }
    fn dtod(
        &mut self,
        s: StreamId,
        d: BufferId,
        dof: u64,
        b: BufferId,
        so: u64,
        l: u64,
    ) -> ExecResult<()> {
        self.inner.dtod(s, d, dof, b, so, l)
    }
    fn memset(
        &mut self,
        s: StreamId,
        d: BufferId,
        o: u64,
        l: u64,
        v: u32,
        w: u32,
    ) -> ExecResult<()> {
        self.inner.memset(s, d, o, l, v, w)
    }
    fn load_module(&mut self, _ptx: &str) -> ExecResult<ModuleId> {
        self.next_module += 1;
        self.modules.insert(self.next_module);
        self.device.take(MODULE);
        self.device.modules_loaded.fetch_add(1, Ordering::SeqCst);
        Ok(ModuleId(self.next_module))
    }
    fn load_module_image(&mut self, _image: &[u8]) -> ExecResult<ModuleId> {
        self.load_module("")
    }
    fn unload_module(&mut self, m: ModuleId) {
        if self.modules.remove(&m.0) {
            self.device.give(MODULE);
        }
    }
    fn launch(
        &mut self,
        s: StreamId,
        k: KernelRef<'_>,
        shape: &LaunchShape,
        p: &[ExecParam],
    ) -> ExecResult<()> {
        match k {
            KernelRef::Builtin(_) => self.inner.launch(s, k, shape, p),
            KernelRef::Module(m, name) => {
                if !self.modules.contains(&m.0) {
                    return Err(ExecError::new(Status::InvalidHandle, 0, "no module"));
                }
                self.device.launched.lock().unwrap().push(name.to_string());
                let wanted = local_of(name);
                if wanted > self.local {
                    self.device.take(wanted - self.local);
                    self.local = wanted;
                }
                if name == "trap" {
                    self.trapped = true;
                }
                Ok(())
            }
        }
    }
    fn sync(&mut self, s: StreamId) -> ExecResult<()> {
        if self.trapped || self.poisoned {
            self.poisoned = true;
            return Err(ExecError::new(Status::LaunchFailed, 719, "trap"));
        }
        self.inner.sync(s)
    }
    fn poisoned(&self) -> bool {
        self.poisoned
    }
    fn alloc_footprint(&self, bytes: u64) -> u64 {
        bytes.next_multiple_of(PAGE)
    }
    fn module_bytes(&self, m: ModuleId) -> u64 {
        if self.modules.contains(&m.0) {
            MODULE
        } else {
            0
        }
    }
    fn local_reservation(&mut self, k: KernelRef<'_>) -> ExecResult<u64> {
        Ok(match k {
            KernelRef::Builtin(_) => 0,
            KernelRef::Module(_, name) => local_of(name),
        })
    }
    fn context_bytes(&self) -> u64 {
        CONTEXT
    }
}

struct MockFactory {
    cpu: CpuExecutorFactory,
    device: Arc<Device>,
}

impl ExecutorFactory for MockFactory {
    fn device(&self) -> &DeviceInfo {
        self.cpu.device()
    }
    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        self.device.take(CONTEXT);
        self.device.contexts_made.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Mock {
            inner: CpuExecutor::default(),
            device: self.device.clone(),
            buffers: HashMap::new(),
            modules: HashSet::new(),
            next_module: 0,
            local: 0,
            trapped: false,
            poisoned: false,
        }))
    }
}

/// A mediator on the mock device with one tenant of `quota` bytes.
fn setup_with(quota: u64, limits: Limits) -> (Arc<Mediator>, TenantId, Arc<Device>) {
    let device = Arc::new(Device::default());
    let factory = MockFactory {
        cpu: CpuExecutorFactory::new(),
        device: device.clone(),
    };
    let m = Mediator::with_limits(Arc::new(factory), limits);
    let t = m
        .add_tenant(TenantConfig {
            name: "vm-quota".into(),
            mem_quota: quota,
            weight: 1,
        })
        .unwrap();
    (m, t, device)
}

fn setup(quota: u64) -> (Arc<Mediator>, TenantId, Arc<Device>) {
    setup_with(quota, Limits::default())
}

fn call(m: &Mediator, t: TenantId, s: u64, c: Command) -> Response {
    m.call(t, Request::new(s, c))
}

fn open(m: &Mediator, t: TenantId) -> u64 {
    let r = call(m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::Ok, "SESSION_OPEN");
    r.value0
}

fn load(m: &Mediator, t: TenantId, s: u64, ptx: &str) -> Response {
    call(m, t, s, Command::ModuleLoad { ptx: ptx.into() })
}

fn launch(module: u64, kernel: &str) -> Command {
    Command::Launch(Launch {
        module,
        kernel: kernel.into(),
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
        params: vec![],
    })
}

/// The tenant's accounting adds up, agrees with what the device holds, and stays within
/// the quota.
fn consistent(m: &Mediator, t: TenantId, device: &Device, quota: u64) -> TenantUsage {
    let u = m.usage(t).unwrap();
    assert_eq!(
        u.mem_used,
        u.buffer_bytes + u.context_bytes + u.module_bytes + u.local_bytes,
        "{u:?}"
    );
    assert!(u.mem_used <= quota, "{} over the quota {quota}", u.mem_used);
    assert_eq!(u.mem_used, device.used(), "tenant {u:?}");
    u
}

fn info(m: &Mediator, t: TenantId) -> InfoReply {
    let r = call(m, t, 0, Command::Info);
    assert_eq!(r.status, Status::Ok);
    InfoReply::decode(&r.data).unwrap()
}

#[test]
fn module_loads_past_the_quota_are_refused_and_never_kept() {
    let quota = 256 * MIB;
    let (m, t, device) = setup(quota);
    let s = open(&m, t);
    consistent(&m, t, &device, quota);
    // The context takes 100 MiB; 39 modules of 4 MiB fit in the 156 MiB left.
    let mut loaded = Vec::new();
    let refused = loop {
        let r = load(&m, t, s, PTX);
        consistent(&m, t, &device, quota);
        if r.status != Status::Ok {
            break r;
        }
        loaded.push(r.value0);
        assert!(loaded.len() < 64, "no module was ever refused");
    };
    assert_eq!(refused.status, Status::QuotaExceeded);
    assert_eq!(loaded.len() as u64, (quota - CONTEXT) / MODULE);
    let u = consistent(&m, t, &device, quota);
    assert_eq!(
        (u.modules, u.module_bytes, u.context_bytes),
        (39, 39 * MODULE, CONTEXT)
    );
    // The refused module was loaded, measured and unloaded again.
    assert_eq!(device.modules_loaded.load(Ordering::SeqCst), 40);
    // Unloading gives back exactly what it took, and makes room again.
    let r = call(&m, t, s, Command::ModuleUnload { module: loaded[0] });
    assert_eq!(r.status, Status::Ok);
    assert_eq!(consistent(&m, t, &device, quota).module_bytes, 38 * MODULE);
    assert_eq!(load(&m, t, s, PTX).status, Status::Ok);
    assert_eq!(info(&m, t).mem_used, quota);

    assert_eq!(call(&m, t, s, Command::SessionClose).status, Status::Ok);
    let u = consistent(&m, t, &device, quota);
    assert_eq!(
        (
            u.sessions,
            u.mem_used,
            u.modules,
            u.module_bytes,
            u.context_bytes
        ),
        (0, 0, 0, 0, 0)
    );
}

#[test]
fn variables_a_module_declares_past_the_quota_never_reach_the_device() {
    let quota = 256 * MIB;
    let (m, t, device) = setup(quota);
    let s = open(&m, t);
    // 200 MiB of `__device__` arrays on top of a 100 MiB context: refused from the PTX.
    let ptx = format!("{PTX}.global .align 4 .b8 big[{}];\n", 200 * MIB);
    assert_eq!(load(&m, t, s, &ptx).status, Status::QuotaExceeded);
    assert_eq!(device.modules_loaded.load(Ordering::SeqCst), 0);
    // One that declares what fits is loaded.
    let ptx = format!("{PTX}.global .align 4 .b8 big[{}];\n", 4 * MIB);
    assert_eq!(load(&m, t, s, &ptx).status, Status::Ok);
    consistent(&m, t, &device, quota);
}

/// A fatbin holding one PTX entry.
fn fatbin_of(ptx: &str) -> Vec<u8> {
    let mut entry = [0u8; 64];
    entry[..2].copy_from_slice(&1u16.to_le_bytes());
    entry[4..8].copy_from_slice(&64u32.to_le_bytes());
    entry[8..16].copy_from_slice(&(ptx.len() as u64).to_le_bytes());
    let mut b = 0xBA55_ED50u32.to_le_bytes().to_vec();
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(&(64 + ptx.len() as u64).to_le_bytes());
    b.extend_from_slice(&entry);
    b.extend_from_slice(ptx.as_bytes());
    b
}

#[test]
fn module_images_are_charged_like_ptx_modules() {
    let quota = 256 * MIB;
    let (m, t, device) = setup(quota);
    let s = open(&m, t);
    let image = |declared: u64| Command::ModuleLoadImage {
        image: fatbin_of(&format!("{PTX}.global .align 4 .b8 big[{declared}];\n")),
    };
    // 200 MiB of variables on top of a 100 MiB context: refused from the image.
    assert_eq!(
        call(&m, t, s, image(200 * MIB)).status,
        Status::QuotaExceeded
    );
    assert_eq!(device.modules_loaded.load(Ordering::SeqCst), 0);
    // One that declares what fits is loaded and charged what the module holds.
    let first = call(&m, t, s, image(4 * MIB));
    assert_eq!(first.status, Status::Ok);
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.modules, u.module_bytes), (1, MODULE));
    // PTX text sent as an image is a PTX module; both count against the module limits.
    let text = Command::ModuleLoadImage {
        image: PTX.as_bytes().to_vec(),
    };
    assert_eq!(call(&m, t, s, text).status, Status::Ok);
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.modules, u.module_bytes), (2, 2 * MODULE));
    // Unloading gives its bytes back.
    let unload = Command::ModuleUnload {
        module: first.value0,
    };
    assert_eq!(call(&m, t, s, unload).status, Status::Ok);
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.modules, u.module_bytes), (1, MODULE));
}

#[test]
fn a_quota_changed_at_run_time_applies_to_every_check_and_to_info() {
    let quota = CONTEXT + 8 * PAGE;
    let (m, t, device) = setup(quota);
    assert_eq!(m.quota(t), Some(quota));
    let s = open(&m, t);
    let a = call(&m, t, s, Command::Alloc { size: 4 * PAGE });
    assert_eq!(a.status, Status::Ok);
    let held = consistent(&m, t, &device, quota).mem_used;
    assert_eq!(held, CONTEXT + 4 * PAGE);

    // Lowered below what the VM holds: nothing is freed, nothing more fits.
    let lower = CONTEXT + 2 * PAGE;
    assert!(m.set_quota(t, lower));
    assert_eq!(m.quota(t), Some(lower));
    assert_eq!(m.tenant_config(t).unwrap().mem_quota, lower);
    assert_eq!(m.device_config(t).unwrap().mem_quota, lower);
    let i = info(&m, t);
    assert_eq!((i.config.mem_quota, i.mem_used), (lower, held));
    let r = call(&m, t, s, Command::Alloc { size: 1 });
    assert_eq!(r.status, Status::QuotaExceeded);
    assert_eq!(load(&m, t, s, PTX).status, Status::QuotaExceeded);
    let r = call(&m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::QuotaExceeded);
    let u = m.usage(t).unwrap();
    assert_eq!((u.mem_used, u.allocations, u.sessions), (held, 1, 1));
    assert_eq!(device.used(), held);

    // Under it again once the VM frees: work fits again within the new quota.
    let r = call(&m, t, s, Command::Free { handle: a.value0 });
    assert_eq!(r.status, Status::Ok);
    assert_eq!(
        call(&m, t, s, Command::Alloc { size: 2 * PAGE }).status,
        Status::Ok
    );
    assert_eq!(
        call(&m, t, s, Command::Alloc { size: 1 }).status,
        Status::QuotaExceeded
    );
    consistent(&m, t, &device, lower);

    // Raised: room again.
    assert!(m.set_quota(t, quota));
    assert_eq!(info(&m, t).config.mem_quota, quota);
    assert_eq!(
        call(&m, t, s, Command::Alloc { size: 1 }).status,
        Status::Ok
    );
    consistent(&m, t, &device, quota);

    // No such tenant.
    m.remove_tenant(t);
    assert!(!m.set_quota(t, quota));
    assert_eq!(m.quota(t), None);
}

#[test]
fn allocations_are_charged_as_the_allocator_takes_them() {
    let n = 20_000u64;
    let quota = CONTEXT + n * PAGE;
    let limits = Limits {
        max_buffers_per_session: n as u32 + 10,
        max_allocations: n as u32 + 10,
        ..Limits::default()
    };
    let (m, t, device) = setup_with(quota, limits);
    let s = open(&m, t);
    let mut handles = Vec::new();
    for _ in 0..n {
        let r = call(&m, t, s, Command::Alloc { size: 1 });
        assert_eq!(r.status, Status::Ok);
        handles.push(r.value0);
    }
    let u = consistent(&m, t, &device, quota);
    // 20,000 bytes asked for, 20,000 pages charged: the quota is full.
    assert_eq!((u.allocations, u.buffer_bytes), (n as u32, n * PAGE));
    assert_eq!(u.mem_used, quota);
    assert_eq!(info(&m, t).mem_used, quota);
    let r = call(&m, t, s, Command::Alloc { size: 1 });
    assert_eq!((r.status, r.detail), (Status::QuotaExceeded, 0));
    for h in handles {
        assert_eq!(
            call(&m, t, s, Command::Free { handle: h }).status,
            Status::Ok
        );
    }
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.allocations, u.buffer_bytes, u.mem_used), (0, 0, CONTEXT));
}

#[test]
fn a_launch_whose_local_memory_would_pass_the_quota_is_refused_before_the_device() {
    let quota = 256 * MIB;
    let (m, t, device) = setup(quota);
    let s = open(&m, t);
    let module = load(&m, t, s, PTX).value0;
    assert_eq!(call(&m, t, s, launch(module, "plain")).status, Status::Ok);
    assert_eq!(consistent(&m, t, &device, quota).local_bytes, 0);
    // 8 MiB of local memory: reserved once, kept, not charged again.
    for _ in 0..3 {
        assert_eq!(
            call(&m, t, s, launch(module, "small_local")).status,
            Status::Ok
        );
        assert_eq!(consistent(&m, t, &device, quota).local_bytes, 8 * MIB);
    }
    // 1 GiB does not fit a 256 MiB quota: refused, and the device never sees it.
    let r = call(&m, t, s, launch(module, "big_local"));
    assert_eq!((r.status, r.detail), (Status::QuotaExceeded, 0));
    assert!(!device.launched("big_local"));
    let u = consistent(&m, t, &device, quota);
    assert_eq!(u.local_bytes, 8 * MIB);
    // Not sticky: the session works on.
    assert_eq!(call(&m, t, s, launch(module, "plain")).status, Status::Ok);
    assert_eq!(call(&m, t, s, Command::Sync).status, Status::Ok);
    // A second session has its own context and its own reservation.
    let s2 = open(&m, t);
    let module2 = load(&m, t, s2, PTX).value0;
    assert_eq!(
        call(&m, t, s2, launch(module2, "small_local")).status,
        Status::Ok
    );
    assert_eq!(consistent(&m, t, &device, quota).local_bytes, 16 * MIB);
    assert_eq!(call(&m, t, s, Command::SessionClose).status, Status::Ok);
    assert_eq!(consistent(&m, t, &device, quota).local_bytes, 8 * MIB);
    assert_eq!(call(&m, t, s2, Command::SessionClose).status, Status::Ok);
    assert_eq!(consistent(&m, t, &device, quota).mem_used, 0);
}

#[test]
fn a_session_whose_context_does_not_fit_is_refused() {
    let quota = 250 * MIB;
    let (m, t, device) = setup(quota);
    let a = open(&m, t);
    let b = open(&m, t);
    assert_eq!(consistent(&m, t, &device, quota).context_bytes, 2 * CONTEXT);
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 2);
    // 50 MiB left: a third context does not fit. Known from the contexts before, so no
    // executor is even made for it.
    let r = call(&m, t, 0, Command::SessionOpen);
    assert_eq!((r.status, r.detail), (Status::QuotaExceeded, 0));
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 2);
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.sessions, u.mem_used), (2, 2 * CONTEXT));
    // Buffers fill the rest; closing a session makes room for a new one.
    let h = call(&m, t, a, Command::Alloc { size: 40 * MIB }).value0;
    assert_ne!(h, 0);
    assert_eq!(info(&m, t).mem_used, 2 * CONTEXT + 40 * MIB);
    assert_eq!(call(&m, t, b, Command::SessionClose).status, Status::Ok);
    let c = open(&m, t);
    assert_eq!(consistent(&m, t, &device, quota).sessions, 2);
    for s in [a, c] {
        assert_eq!(call(&m, t, s, Command::SessionClose).status, Status::Ok);
    }
    assert_eq!(consistent(&m, t, &device, quota).mem_used, 0);
}

#[test]
fn the_first_context_that_does_not_fit_is_measured_then_refused() {
    // Nothing known yet: the executor is made, its context measured and dropped.
    let quota = 64 * MIB;
    let (m, t, device) = setup(quota);
    let r = call(&m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::QuotaExceeded);
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 1);
    assert_eq!(consistent(&m, t, &device, quota).mem_used, 0);
    let r = call(&m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::QuotaExceeded);
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 1);
}

#[test]
fn vm_wide_limits_count_allocations_and_modules_over_all_sessions() {
    let limits = Limits {
        max_allocations: 3,
        max_modules: 2,
        ..Limits::default()
    };
    let quota = GIB;
    let (m, t, device) = setup_with(quota, limits);
    let (a, b) = (open(&m, t), open(&m, t));
    for s in [a, a, b] {
        assert_eq!(
            call(&m, t, s, Command::Alloc { size: 64 }).status,
            Status::Ok
        );
    }
    let r = call(&m, t, b, Command::Alloc { size: 64 });
    assert_eq!((r.status, r.detail), (Status::LimitExceeded, 3));
    assert_eq!(load(&m, t, a, PTX).status, Status::Ok);
    assert_eq!(load(&m, t, b, PTX).status, Status::Ok);
    let r = load(&m, t, a, PTX);
    assert_eq!((r.status, r.detail), (Status::LimitExceeded, 2));
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.allocations, u.modules), (3, 2));
    // Closing one session frees its share of the limits.
    assert_eq!(call(&m, t, b, Command::SessionClose).status, Status::Ok);
    assert_eq!(
        call(&m, t, a, Command::Alloc { size: 64 }).status,
        Status::Ok
    );
    assert_eq!(load(&m, t, a, PTX).status, Status::Ok);
    consistent(&m, t, &device, quota);
}

#[test]
fn a_lost_session_gives_back_everything_it_held() {
    let quota = GIB;
    let (m, t, device) = setup(quota);
    let (a, b) = (open(&m, t), open(&m, t));
    let module = load(&m, t, a, PTX).value0;
    call(&m, t, a, Command::Alloc { size: 5 * MIB });
    call(&m, t, b, Command::Alloc { size: 1 });
    assert_eq!(
        call(&m, t, a, launch(module, "small_local")).status,
        Status::Ok
    );
    assert_eq!(call(&m, t, a, launch(module, "trap")).status, Status::Ok);
    assert_eq!(call(&m, t, a, Command::Sync).status, Status::LaunchFailed);
    // Its context is gone, and everything in it with the charge for it.
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.sessions, u.mem_used, u.restarts), (2, CONTEXT + PAGE, 1));
    assert_eq!(call(&m, t, a, Command::SessionClose).status, Status::Ok);
    assert_eq!(consistent(&m, t, &device, quota).mem_used, CONTEXT + PAGE);
    m.reset_tenant(t);
    assert_eq!(consistent(&m, t, &device, quota).mem_used, 0);
}

#[test]
fn the_self_test_context_is_charged_while_it_exists() {
    let selftest = |m: &Mediator, t: TenantId| {
        call(
            m,
            t,
            0,
            Command::Selftest {
                test: SelftestKind::VectorAdd,
            },
        )
    };
    // Room for it: charged while the self-test executor is kept, freed with the VM's
    // reset.
    let quota = 128 * MIB;
    let (m, t, device) = setup(quota);
    let r = selftest(&m, t);
    assert_eq!(r.status, Status::Ok, "{}", String::from_utf8_lossy(&r.data));
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.context_bytes, u.mem_used), (CONTEXT, CONTEXT));
    assert_eq!(selftest(&m, t).status, Status::Ok);
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 1);
    // Its context and a session's do not both fit: the idle self-test executor gives way
    // to the session, and a self-test then has no room.
    let s = open(&m, t);
    let u = consistent(&m, t, &device, quota);
    assert_eq!((u.sessions, u.context_bytes), (1, CONTEXT));
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 2);
    let r = selftest(&m, t);
    assert_eq!(r.status, Status::QuotaExceeded);
    assert_eq!(device.contexts_made.load(Ordering::SeqCst), 2);
    assert_eq!(call(&m, t, s, Command::SessionClose).status, Status::Ok);
    assert_eq!(selftest(&m, t).status, Status::Ok);
    m.reset_tenant(t);
    assert_eq!(consistent(&m, t, &device, quota).mem_used, 0);

    // No room: refused with a message that says why.
    let quota = 64 * MIB;
    let (m, t, device) = setup(quota);
    let r = selftest(&m, t);
    assert_eq!(r.status, Status::QuotaExceeded);
    let message = String::from_utf8_lossy(&r.data);
    assert!(message.starts_with("Vector add FAILED"), "{message}");
    assert!(message.contains("quota (64 MiB)"), "{message}");
    assert_eq!(consistent(&m, t, &device, quota).mem_used, 0);
}

#[test]
fn the_cpu_executor_charges_exactly_the_bytes_asked_for() {
    let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
    let t = m
        .add_tenant(TenantConfig {
            name: "vm-cpu".into(),
            mem_quota: 64 * MIB,
            weight: 1,
        })
        .unwrap();
    let s = open(&m, t);
    assert_eq!(
        call(&m, t, s, Command::Alloc { size: 1 }).status,
        Status::Ok
    );
    let b = call(&m, t, s, Command::Alloc { size: 4096 }).value0;
    let fill = Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: "fill_u32".into(),
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_bytes: 0,
        params: vec![Param::Buffer(b), Param::u32(1), Param::u32(16)],
    });
    assert_eq!(call(&m, t, s, fill).status, Status::Ok);
    let u = m.usage(t).unwrap();
    assert_eq!(
        (u.mem_used, u.buffer_bytes, u.context_bytes, u.local_bytes),
        (4097, 4097, 0, 0)
    );
}
