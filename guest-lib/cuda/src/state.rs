// SPDX-License-Identifier: Apache-2.0
//! The library's state: devices, contexts and what programs make in them, by handle.
//!
//! Handles given to the caller are ids looked up in registries (a stale or made-up handle
//! is an error, never a dangling pointer). The registries' locks are held only to look
//! up, insert or remove; no global lock is held across a device request. Per-device
//! locks (attribute cache, primary context) are held while that device answers.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::time::Instant;

use log::{debug, warn};
use vgpu::{DeviceConfig, ExecutorKind, FunctionInfo, HostBuffer, Session, Status};

use crate::errors::{from_error, Load};
use crate::image::Source;
use crate::types::*;
use crate::{Fail, Res};

/// Device attributes asked for: `CUdevice_attribute` 1..=147 (CUDA 13.0).
pub const ATTRIBUTES: u32 = 147;
/// The `CUlimit`s of CUDA 13.0: `CU_LIMIT_STACK_SIZE` .. `CU_LIMIT_CIG_SHMEM_FALLBACK_ENABLED`.
pub const LIMITS: usize = 10;
/// What a context's limits start as, as NVIDIA's driver sets them (those a device does
/// not support, and the query-only ones, are answered by `api::context` instead): stack
/// 1 KiB, printf FIFO 1 MiB, malloc heap 8 MiB, sync depth 2, 2048 pending launches, L2
/// fetch granularity 64 bytes, no persisting L2, the CIG fallback on.
const LIMIT_DEFAULTS: [usize; LIMITS] = [1024, 1 << 20, 8 << 20, 2, 2048, 64, 0, 0, 0, 1];
/// Device addresses made up for a host that answers none (built-in kernels only take
/// buffers; nothing else can use them): above user space, so never a host pointer.
const SYNTHETIC_BASE: u64 = 0xfffe_0000_0000_0000;

/// Where devices come from: `/dev/vgpuN`, or (for tests) a transport in the process.
#[doc(hidden)]
pub trait Backend: Send + Sync {
    /// How many devices there are; ordinals are 0..devices.
    fn devices(&self) -> usize;
    /// The device's config space.
    fn config(&self, ordinal: usize) -> vgpu::Result<DeviceConfig>;
    /// A new session on the device.
    fn open(&self, ordinal: usize) -> vgpu::Result<Session>;
    /// The device's PCI address in the guest ("0000:00:05.0"), if known.
    fn pci_bus_id(&self, ordinal: usize) -> Option<String> {
        let _ = ordinal;
        None
    }
}

/// The guest driver's device nodes, in order.
struct CharDevBackend {
    nodes: Vec<u32>,
}

fn sysfs_dir(node: u32) -> String {
    format!("/sys/class/vgpu/vgpu{node}")
}

fn sysfs(node: u32, attr: &str) -> Option<String> {
    let v = std::fs::read_to_string(format!("{}/{attr}", sysfs_dir(node))).ok()?;
    Some(v.trim_end_matches('\n').to_owned())
}

fn sysfs_num<T: std::str::FromStr>(node: u32, attr: &str) -> Option<T> {
    sysfs(node, attr)?.trim().parse().ok()
}

/// The config space as the driver shows it in sysfs, without opening a session.
fn sysfs_config(node: u32) -> Option<DeviceConfig> {
    let cc = sysfs(node, "cc")?;
    let (major, minor) = cc.trim().split_once('.')?;
    Some(DeviceConfig {
        version: sysfs_num(node, "version")?,
        num_queues: 1,
        max_request_bytes: sysfs_num(node, "max_request_bytes")?,
        executor: match sysfs(node, "executor")?.trim() {
            "cpu" => ExecutorKind::Cpu,
            "cuda" => ExecutorKind::Cuda,
            _ => return None,
        },
        cc_major: major.parse().ok()?,
        cc_minor: minor.parse().ok()?,
        mem_quota: sysfs_num(node, "mem_quota")?,
        device_memory: sysfs_num(node, "device_memory")?,
        multiprocessors: sysfs_num(node, "multiprocessors")?,
        max_sessions: sysfs_num(node, "max_sessions")?,
        name: sysfs(node, "name")?,
        // Drivers before the attribute: the host's first GPU.
        gpu: sysfs_num(node, "gpu").unwrap_or(0),
    })
}

/// "0000:00:05.0" when the node's device sits on a PCI function.
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

impl Backend for CharDevBackend {
    fn devices(&self) -> usize {
        self.nodes.len()
    }

    fn config(&self, ordinal: usize) -> vgpu::Result<DeviceConfig> {
        let node = self.nodes[ordinal];
        sysfs_config(node).ok_or_else(|| vgpu::Error::InvalidArgument("no sysfs config".into()))
    }

    fn open(&self, ordinal: usize) -> vgpu::Result<Session> {
        vgpu::Device::open(self.nodes[ordinal])?.session()
    }

    fn pci_bus_id(&self, ordinal: usize) -> Option<String> {
        // /sys/class/vgpu/vgpuN/device is the virtio device; its parent the PCI function.
        let dev =
            std::fs::canonicalize(format!("{}/device", sysfs_dir(self.nodes[ordinal]))).ok()?;
        let pci = dev.parent().and_then(Path::file_name)?.to_str()?;
        is_pci_address(pci).then(|| pci.to_owned())
    }
}

static HOOK: OnceLock<Box<dyn Backend>> = OnceLock::new();

/// Puts the library over `backend` instead of `/dev/vgpuN`; false once `cuInit` ran or
/// a backend was set. For tests that drive a device in the same process.
#[cfg(any(test, feature = "test-hook"))]
#[doc(hidden)]
pub fn set_backend(backend: Box<dyn Backend>) -> bool {
    DRIVER.get().is_none() && HOOK.set(backend).is_ok()
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new handle: unique in the process, pointer-like, never 0, 1 or 2 (the default
/// streams' values).
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0x5647_0000_1000);
    NEXT.fetch_add(0x10, Ordering::Relaxed)
}

/// Objects of one kind by handle.
pub struct Registry<T>(RwLock<HashMap<u64, Arc<T>>>);

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry(RwLock::new(HashMap::new()))
    }
}

impl<T> Registry<T> {
    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        read(&self.0).get(&id).cloned()
    }

    pub fn insert(&self, id: u64, value: Arc<T>) {
        write(&self.0).insert(id, value);
    }

    pub fn remove(&self, id: u64) -> Option<Arc<T>> {
        write(&self.0).remove(&id)
    }

    pub fn values(&self) -> Vec<Arc<T>> {
        read(&self.0).values().cloned().collect()
    }
}

/// One device: its config, cached attributes and primary context.
pub struct DeviceSlot {
    pub ordinal: usize,
    pub config: DeviceConfig,
    pub pci_bus_id: Option<String>,
    attributes: Mutex<Option<Arc<Vec<i32>>>>,
    /// A session opened before any context needed it (to read the config or the
    /// attributes); the next context takes it.
    spare: Mutex<Option<Session>>,
    pub primary: Mutex<Primary>,
    /// The primary context's handle, the same whenever it is active.
    pub primary_id: u64,
}

/// The primary context's retain count and flags.
#[derive(Debug, Default)]
pub struct Primary {
    pub refs: u32,
    pub flags: u32,
}

/// A device allocation or module variable of a context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    pub handle: u64,
    pub size: u64,
    /// A module's variable: freed with its module, never by `cuMemFree`.
    pub global: bool,
}

/// A context: one session of the device.
pub struct Context {
    pub id: u64,
    pub device: usize,
    pub session: Session,
    pub primary: bool,
    pub flags: AtomicU32,
    pub limits: Mutex<[usize; LIMITS]>,
    pub cache_config: AtomicU32,
    pub shmem_config: AtomicU32,
    mem: RwLock<BTreeMap<u64, MemEntry>>,
    /// Requests handed to the device so far, and how many of them a SYNC (or a copy to
    /// the host) is known to have seen finish. The session's work runs in order.
    submitted: AtomicU64,
    synced: AtomicU64,
    synthetic: AtomicU64,
    owned: Mutex<Owned>,
}

/// What dies with a context.
#[derive(Default)]
struct Owned {
    modules: HashSet<u64>,
    streams: HashSet<u64>,
    hosts: HashSet<usize>,
}

impl Context {
    fn new(id: u64, device: usize, session: Session, primary: bool, flags: u32) -> Context {
        Context {
            id,
            device,
            session,
            primary,
            flags: AtomicU32::new(flags),
            limits: Mutex::new(LIMIT_DEFAULTS),
            cache_config: AtomicU32::new(0),
            shmem_config: AtomicU32::new(1),
            mem: RwLock::new(BTreeMap::new()),
            submitted: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            synthetic: AtomicU64::new(SYNTHETIC_BASE),
            owned: Mutex::new(Owned::default()),
        }
    }

    /// Runs device request(s) of this context; counted once handed to the device.
    pub fn submit<T>(&self, f: impl FnOnce(&Session) -> vgpu::Result<T>) -> Res<T> {
        self.submit_as(None, f)
    }

    /// [`Context::submit`] for a module load of kind `load`.
    pub fn submit_as<T>(
        &self,
        load: Option<Load>,
        f: impl FnOnce(&Session) -> vgpu::Result<T>,
    ) -> Res<T> {
        let r = f(&self.session);
        self.submitted.fetch_add(1, Ordering::SeqCst);
        r.map_err(|e| Fail(from_error(&e, load)))
    }

    /// A copy to the host that returned: everything submitted before it has finished.
    pub fn finished_through(&self, upto: u64) {
        self.synced.fetch_max(upto, Ordering::SeqCst);
    }

    /// The number of requests handed to the device so far.
    pub fn sequence(&self) -> u64 {
        self.submitted.load(Ordering::SeqCst)
    }

    /// Whether everything up to request `seq` is known to have finished.
    pub fn finished(&self, seq: u64) -> bool {
        self.synced.load(Ordering::SeqCst) >= seq
    }

    /// Waits for the context's work (SYNC); reports an asynchronous failure.
    pub fn sync(&self) -> Res<()> {
        let upto = self.sequence();
        self.session.sync()?;
        self.finished_through(upto);
        Ok(())
    }

    /// Waits for work up to request `seq` unless that is known to have finished.
    pub fn sync_through(&self, seq: u64) -> Res<()> {
        if self.finished(seq) {
            return Ok(());
        }
        self.sync()
    }

    fn address(&self, reported: u64, size: u64) -> u64 {
        if reported != 0 {
            return reported;
        }
        debug!("the device answers no device addresses: making one up");
        let step = size.div_ceil(256).max(1) * 256;
        self.synthetic.fetch_add(step, Ordering::Relaxed)
    }

    /// Allocates `size` bytes: the device address.
    pub fn alloc(&self, size: u64) -> Res<u64> {
        if size == 0 {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        let (handle, reported) = self.submit(|s| s.raw_alloc(size))?;
        let address = self.address(reported, size);
        write(&self.mem).insert(
            address,
            MemEntry {
                handle,
                size,
                global: false,
            },
        );
        Ok(address)
    }

    /// Frees the allocation that starts at `address`.
    pub fn free(&self, address: u64) -> Res<()> {
        let entry = match read(&self.mem).get(&address) {
            Some(e) if !e.global => *e,
            _ => return Err(Fail(CUDA_ERROR_INVALID_VALUE)),
        };
        write(&self.mem).remove(&address);
        self.submit(|s| s.raw_free(entry.handle))
    }

    /// The allocation or variable holding `address`: its base and entry.
    pub fn find(&self, address: u64) -> Option<(u64, MemEntry)> {
        let mem = read(&self.mem);
        let (&base, &e) = mem.range(..=address).next_back()?;
        (address - base < e.size).then_some((base, e))
    }

    /// The buffer handle of the allocation or variable that starts at `address`.
    pub fn buffer_at(&self, address: u64) -> Option<u64> {
        read(&self.mem).get(&address).map(|e| e.handle)
    }

    fn add_global(&self, reported: u64, handle: u64, size: u64) -> u64 {
        let address = self.address(reported, size);
        write(&self.mem).insert(
            address,
            MemEntry {
                handle,
                size,
                global: true,
            },
        );
        address
    }

    fn remove_globals(&self, addresses: &[u64]) {
        let mut mem = write(&self.mem);
        for a in addresses {
            mem.remove(a);
        }
    }
}

/// A loaded module (or the built-in catalog) of a context.
pub struct Module {
    pub id: u64,
    pub ctx: Arc<Context>,
    /// The device's handle; `vgpu::BUILTIN_MODULE` for the catalog.
    pub handle: u64,
    functions: Mutex<HashMap<String, u64>>,
    /// Variables by name: (address, size).
    globals: Mutex<HashMap<String, (u64, u64)>>,
}

impl Module {
    pub fn is_builtin(&self) -> bool {
        self.handle == vgpu::BUILTIN_MODULE
    }
}

/// A kernel of a module.
pub struct Function {
    pub id: u64,
    pub module: Arc<Module>,
    pub name: CString,
    /// Attributes and parameter layout; None from a host without FUNCTION_INFO.
    pub info: Option<FunctionInfo>,
    pub max_dynamic_shared: AtomicI32,
    pub carveout: AtomicI32,
    /// `cuFuncSetCacheConfig`'s preference (`CU_FUNC_CACHE_PREFER_*`; none by default).
    pub cache_config: AtomicU32,
}

impl Function {
    pub fn name(&self) -> &str {
        self.name.to_str().unwrap_or("")
    }
}

/// A stream: work goes to its context, in order.
pub struct Stream {
    pub id: u64,
    pub ctx: Arc<Context>,
    pub flags: u32,
    pub priority: i32,
}

/// An event and where it was last recorded.
pub struct Event {
    pub flags: u32,
    pub recorded: Mutex<Option<Recorded>>,
}

impl Event {
    pub fn timing(&self) -> bool {
        self.flags & CU_EVENT_DISABLE_TIMING == 0
    }
}

/// A record of an event: the context's request count then, and for a timing event the
/// time its stream was seen to reach it.
#[derive(Clone)]
pub struct Recorded {
    pub ctx: Weak<Context>,
    pub seq: u64,
    pub at: Option<Instant>,
}

/// A library: a module image, loaded into each context that uses it.
pub struct Library {
    pub id: u64,
    pub source: Source,
    /// Context id -> module id.
    modules: Mutex<HashMap<u64, u64>>,
    kernels: Mutex<HashMap<String, u64>>,
}

/// A kernel of a library, in whatever context is current.
pub struct Kernel {
    pub library: Arc<Library>,
    pub name: CString,
}

/// Host memory from `cuMemAllocHost`: the driver's DMA buffer of a context's session.
pub struct HostAlloc {
    pub buffer: HostBuffer,
    pub ctx: u64,
    pub flags: u32,
}

impl HostAlloc {
    pub fn start(&self) -> usize {
        self.buffer.as_slice().as_ptr() as usize
    }
}

/// A device pointer resolved: its context, buffer and offset.
pub struct DevicePtr {
    pub ctx: Arc<Context>,
    pub base: u64,
    pub entry: MemEntry,
    pub offset: u64,
}

pub struct Driver {
    backend: &'static dyn Backend,
    pub devices: Vec<DeviceSlot>,
    pub contexts: Registry<Context>,
    pub modules: Registry<Module>,
    pub functions: Registry<Function>,
    pub streams: Registry<Stream>,
    pub events: Registry<Event>,
    pub libraries: Registry<Library>,
    pub kernels: Registry<Kernel>,
    hosts: RwLock<BTreeMap<usize, Arc<HostAlloc>>>,
    /// Memory registered with `cuMemHostRegister`: start -> length.
    pub registered: Mutex<BTreeMap<usize, usize>>,
}

static DRIVER: OnceLock<Result<Driver, CUresult>> = OnceLock::new();

/// `cuInit`: finds the devices once; later calls answer the same.
pub fn init() -> Res<()> {
    match DRIVER.get_or_init(Driver::new) {
        Ok(_) => Ok(()),
        Err(code) => Err(Fail(*code)),
    }
}

/// The driver, once `cuInit` succeeded.
pub fn driver() -> Res<&'static Driver> {
    match DRIVER.get() {
        Some(Ok(d)) => Ok(d),
        _ => Err(Fail(CUDA_ERROR_NOT_INITIALIZED)),
    }
}

thread_local! {
    /// The calling thread's context stack; the top is current.
    static CURRENT: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context's handle.
pub fn current_id() -> Option<u64> {
    CURRENT.with(|c| c.borrow().last().copied())
}

/// Replaces the current context (None: pops it).
pub fn set_current(id: Option<u64>) {
    CURRENT.with(|c| {
        let mut stack = c.borrow_mut();
        stack.pop();
        if let Some(id) = id {
            stack.push(id);
        }
    })
}

pub fn push_current(id: u64) {
    CURRENT.with(|c| c.borrow_mut().push(id));
}

pub fn pop_current() -> Option<u64> {
    CURRENT.with(|c| c.borrow_mut().pop())
}

/// Removes `id` from the calling thread's stack (a destroyed context).
fn forget_current(id: u64) {
    CURRENT.with(|c| c.borrow_mut().retain(|&x| x != id));
}

impl Driver {
    fn new() -> Result<Driver, CUresult> {
        let backend: &'static dyn Backend = match HOOK.get() {
            Some(b) => b.as_ref(),
            None => Box::leak(Box::new(CharDevBackend {
                nodes: vgpu::Device::list(),
            })),
        };
        let n = backend.devices();
        if n == 0 {
            warn!("no vGPU device (/dev/vgpuN): is the vgpu driver loaded?");
            return Err(CUDA_ERROR_NO_DEVICE);
        }
        let mut devices = Vec::with_capacity(n);
        for ordinal in 0..n {
            let (config, spare) = match backend.config(ordinal) {
                Ok(c) => (c, None),
                Err(e) => {
                    debug!("device {ordinal}: {}; asking a session", e.report());
                    let s = backend.open(ordinal).map_err(|e| {
                        warn!("device {ordinal}: {}", e.report());
                        from_error(&e, None)
                    })?;
                    (s.config().map_err(|e| from_error(&e, None))?, Some(s))
                }
            };
            devices.push(DeviceSlot {
                ordinal,
                pci_bus_id: backend.pci_bus_id(ordinal),
                config,
                attributes: Mutex::new(None),
                spare: Mutex::new(spare),
                primary: Mutex::new(Primary::default()),
                primary_id: next_id(),
            });
        }
        Ok(Driver {
            backend,
            devices,
            contexts: Registry::default(),
            modules: Registry::default(),
            functions: Registry::default(),
            streams: Registry::default(),
            events: Registry::default(),
            libraries: Registry::default(),
            kernels: Registry::default(),
            hosts: RwLock::new(BTreeMap::new()),
            registered: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn device(&self, dev: CUdevice) -> Res<&DeviceSlot> {
        usize::try_from(dev)
            .ok()
            .and_then(|i| self.devices.get(i))
            .ok_or(Fail(CUDA_ERROR_INVALID_DEVICE))
    }

    /// A session for a new context: the device's spare, or a new one.
    fn take_session(&self, slot: &DeviceSlot) -> Res<Session> {
        if let Some(s) = lock(&slot.spare).take() {
            return Ok(s);
        }
        Ok(self.backend.open(slot.ordinal)?)
    }

    /// A session to ask the device something outside any context's work: a context's
    /// of the device, or the spare (opened if need be).
    fn query_session(&self, slot: &DeviceSlot) -> Res<Session> {
        if let Some(ctx) = self
            .contexts
            .values()
            .into_iter()
            .find(|c| c.device == slot.ordinal)
        {
            return Ok(ctx.session.clone());
        }
        let mut spare = lock(&slot.spare);
        if let Some(s) = spare.as_ref() {
            return Ok(s.clone());
        }
        let s = self.backend.open(slot.ordinal)?;
        *spare = Some(s.clone());
        Ok(s)
    }

    /// The device's attributes 1..=[`ATTRIBUTES`], asked once.
    pub fn attributes(&self, slot: &DeviceSlot) -> Res<Arc<Vec<i32>>> {
        let mut cached = lock(&slot.attributes);
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let session = self.query_session(slot)?;
        let host = match session.device_attributes(ATTRIBUTES) {
            Ok(v) => Some(v),
            Err(e) if e.status() == Some(Status::Unsupported) => {
                warn!("the host does not answer device attributes: deriving them from the config space");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let a = Arc::new(crate::api::device::attributes(
            &slot.config,
            slot.pci_bus_id.as_deref(),
            host,
        ));
        *cached = Some(a.clone());
        Ok(a)
    }

    /// A new context on `slot` (the primary one when `primary`), made current by nobody.
    fn new_context(
        &self,
        slot: &DeviceSlot,
        id: u64,
        primary: bool,
        flags: u32,
    ) -> Res<Arc<Context>> {
        let session = self.take_session(slot)?;
        let ctx = Arc::new(Context::new(id, slot.ordinal, session, primary, flags));
        self.contexts.insert(id, ctx.clone());
        debug!(
            "context {id:#x} on device {} (primary: {primary})",
            slot.ordinal
        );
        Ok(ctx)
    }

    pub fn create_context(&self, slot: &DeviceSlot, flags: u32) -> Res<Arc<Context>> {
        self.new_context(slot, next_id(), false, flags)
    }

    /// Retains the primary context of `slot`, making it if need be.
    pub fn retain_primary(&self, slot: &DeviceSlot) -> Res<u64> {
        let mut p = lock(&slot.primary);
        if self.contexts.get(slot.primary_id).is_none() {
            self.new_context(slot, slot.primary_id, true, p.flags)?;
        }
        p.refs += 1;
        Ok(slot.primary_id)
    }

    /// Releases the primary context; the last release destroys it.
    pub fn release_primary(&self, slot: &DeviceSlot) -> Res<()> {
        let mut p = lock(&slot.primary);
        if p.refs == 0 {
            return Err(Fail(CUDA_ERROR_INVALID_CONTEXT));
        }
        p.refs -= 1;
        if p.refs == 0 {
            if let Some(ctx) = self.contexts.get(slot.primary_id) {
                self.destroy_context(&ctx);
            }
        }
        Ok(())
    }

    /// Destroys the primary context's state whatever its retain count.
    pub fn reset_primary(&self, slot: &DeviceSlot) {
        let mut p = lock(&slot.primary);
        p.refs = 0;
        if let Some(ctx) = self.contexts.get(slot.primary_id) {
            self.destroy_context(&ctx);
        }
    }

    /// Forgets a context and everything made in it; its session closes once the last
    /// call still using it returns.
    pub fn destroy_context(&self, ctx: &Arc<Context>) {
        self.contexts.remove(ctx.id);
        forget_current(ctx.id);
        crate::export_tables::context_destroyed(ctx.id);
        let owned = std::mem::take(&mut *lock(&ctx.owned));
        for m in owned.modules {
            if let Some(m) = self.modules.remove(m) {
                self.forget_module(&m);
            }
        }
        for s in owned.streams {
            self.streams.remove(s);
        }
        let mut hosts = write(&self.hosts);
        for h in owned.hosts {
            hosts.remove(&h);
        }
        debug!("context {:#x} destroyed", ctx.id);
    }

    /// The calling thread's current context.
    pub fn current(&self) -> Res<Arc<Context>> {
        current_id()
            .and_then(|id| self.contexts.get(id))
            .ok_or(Fail(CUDA_ERROR_INVALID_CONTEXT))
    }

    /// A context by handle (NULL: the current one).
    pub fn context(&self, handle: CUcontext) -> Res<Arc<Context>> {
        if handle.is_null() {
            return self.current();
        }
        self.contexts
            .get(handle as usize as u64)
            .ok_or(Fail(CUDA_ERROR_INVALID_CONTEXT))
    }

    /// The stream by handle; the default streams are the current context's.
    pub fn stream(&self, handle: CUstream) -> Res<StreamRef> {
        match handle as usize {
            0 | CU_STREAM_LEGACY | CU_STREAM_PER_THREAD => Ok(StreamRef {
                ctx: self.current()?,
                stream: None,
            }),
            id => {
                let s = self
                    .streams
                    .get(id as u64)
                    .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
                Ok(StreamRef {
                    ctx: s.ctx.clone(),
                    stream: Some(s),
                })
            }
        }
    }

    pub fn add_stream(&self, ctx: &Arc<Context>, flags: u32, priority: i32) -> u64 {
        let id = next_id();
        self.streams.insert(
            id,
            Arc::new(Stream {
                id,
                ctx: ctx.clone(),
                flags,
                priority,
            }),
        );
        lock(&ctx.owned).streams.insert(id);
        id
    }

    pub fn remove_stream(&self, id: u64) -> Res<()> {
        let s = self
            .streams
            .remove(id)
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        lock(&s.ctx.owned).streams.remove(&id);
        Ok(())
    }

    /// The device allocation or variable holding `[ptr, ptr + len)`: None when `ptr` is
    /// in none; `CUDA_ERROR_INVALID_VALUE` when the range leaves it. The preferred
    /// context is searched first, then the current one, then every other.
    pub fn find_device(
        &self,
        ptr: u64,
        len: u64,
        prefer: Option<&Arc<Context>>,
    ) -> Option<Res<DevicePtr>> {
        let mut order: Vec<Arc<Context>> = prefer.into_iter().cloned().collect();
        order.extend(self.current().ok());
        let found = order
            .into_iter()
            .chain(self.contexts.values())
            .find_map(|ctx| ctx.find(ptr).map(|(base, entry)| (ctx, base, entry)))?;
        let (ctx, base, entry) = found;
        let offset = ptr - base;
        if offset.checked_add(len).map_or(true, |end| end > entry.size) {
            return Some(Err(Fail(CUDA_ERROR_INVALID_VALUE)));
        }
        Some(Ok(DevicePtr {
            ctx,
            base,
            entry,
            offset,
        }))
    }

    /// [`Driver::find_device`] where only a device pointer will do.
    pub fn device_ptr(&self, ptr: u64, len: u64, prefer: Option<&Arc<Context>>) -> Res<DevicePtr> {
        self.find_device(ptr, len, prefer)
            .unwrap_or(Err(Fail(CUDA_ERROR_INVALID_VALUE)))
    }

    pub fn add_host(&self, ctx: &Context, buffer: HostBuffer, flags: u32) -> usize {
        let alloc = Arc::new(HostAlloc {
            buffer,
            ctx: ctx.id,
            flags,
        });
        let start = alloc.start();
        write(&self.hosts).insert(start, alloc);
        lock(&ctx.owned).hosts.insert(start);
        start
    }

    pub fn remove_host(&self, start: usize) -> Res<()> {
        let alloc = write(&self.hosts)
            .remove(&start)
            .ok_or(Fail(CUDA_ERROR_INVALID_VALUE))?;
        if let Some(ctx) = self.contexts.get(alloc.ctx) {
            lock(&ctx.owned).hosts.remove(&start);
        }
        Ok(())
    }

    /// The host allocation holding `[ptr, ptr + len)` and the offset in it.
    pub fn find_host(&self, ptr: usize, len: usize) -> Option<(Arc<HostAlloc>, usize)> {
        let hosts = read(&self.hosts);
        let (&start, alloc) = hosts.range(..=ptr).next_back()?;
        let at = ptr - start;
        let end = at.checked_add(len)?;
        (at < alloc.buffer.len() && end <= alloc.buffer.len()).then(|| (alloc.clone(), at))
    }

    /// Loads `source` into `ctx`.
    pub fn load_module(&self, ctx: &Arc<Context>, source: &Source) -> Res<Arc<Module>> {
        let handle = match source {
            Source::Builtin => vgpu::BUILTIN_MODULE,
            Source::Ptx(ptx) => ctx.submit_as(Some(Load::Ptx), |s| s.raw_load_ptx(ptx))?,
            Source::Image(image) => {
                ctx.submit_as(Some(Load::Image), |s| s.raw_load_image(image))?
            }
        };
        let m = Arc::new(Module {
            id: next_id(),
            ctx: ctx.clone(),
            handle,
            functions: Mutex::new(HashMap::new()),
            globals: Mutex::new(HashMap::new()),
        });
        self.modules.insert(m.id, m.clone());
        lock(&ctx.owned).modules.insert(m.id);
        Ok(m)
    }

    /// Drops a module's functions and variables from the registries.
    fn forget_module(&self, m: &Module) {
        for (_, f) in lock(&m.functions).drain() {
            self.functions.remove(f);
        }
        let globals: Vec<u64> = lock(&m.globals).drain().map(|(_, (a, _))| a).collect();
        m.ctx.remove_globals(&globals);
    }

    /// Unloads a module.
    pub fn unload_module(&self, id: u64) -> Res<()> {
        let m = self
            .modules
            .remove(id)
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        lock(&m.ctx.owned).modules.remove(&id);
        self.forget_module(&m);
        if m.is_builtin() {
            return Ok(());
        }
        m.ctx.submit(|s| s.raw_unload(m.handle))
    }

    /// The function `name` of a module: asked of the device once (FUNCTION_INFO), which
    /// also says whether the kernel exists.
    pub fn function(&self, m: &Arc<Module>, name: &str) -> Res<u64> {
        if let Some(&f) = lock(&m.functions).get(name) {
            return Ok(f);
        }
        let c_name = CString::new(name).map_err(|_| Fail(CUDA_ERROR_INVALID_VALUE))?;
        let info = match m.ctx.submit(|s| s.function_info(m.handle, name)) {
            Ok(info) => Some(info),
            Err(Fail(CUDA_ERROR_NOT_SUPPORTED)) => {
                warn!("the host does not describe kernels: {name} cannot be launched");
                None
            }
            Err(e) => return Err(e),
        };
        let max_dynamic = info.as_ref().map_or(0, |i| i.attributes[8]);
        let carveout = info.as_ref().map_or(-1, |i| i.attributes[9]);
        let mut functions = lock(&m.functions);
        if let Some(&f) = functions.get(name) {
            return Ok(f);
        }
        let f = Arc::new(Function {
            id: next_id(),
            module: m.clone(),
            name: c_name,
            info,
            max_dynamic_shared: AtomicI32::new(max_dynamic),
            carveout: AtomicI32::new(carveout),
            cache_config: AtomicU32::new(0),
        });
        functions.insert(name.to_owned(), f.id);
        self.functions.insert(f.id, f.clone());
        Ok(f.id)
    }

    /// The variable `name` of a module: (address, size), asked of the device once.
    pub fn global(&self, m: &Arc<Module>, name: &str) -> Res<(u64, u64)> {
        if let Some(&g) = lock(&m.globals).get(name) {
            return Ok(g);
        }
        if m.is_builtin() {
            return Err(Fail(CUDA_ERROR_NOT_FOUND));
        }
        let g = m.ctx.submit(|s| s.module_global(m.handle, name))?;
        let mut globals = lock(&m.globals);
        if let Some(&known) = globals.get(name) {
            return Ok(known);
        }
        let address = m.ctx.add_global(g.address, g.handle, g.size);
        globals.insert(name.to_owned(), (address, g.size));
        Ok((address, g.size))
    }

    /// A function by handle: a `CUfunction`, or a `CUkernel` (of a library) resolved in
    /// `ctx`, loading the library there first if need be.
    pub fn function_like(
        &self,
        handle: *mut std::ffi::c_void,
        ctx: Option<&Arc<Context>>,
    ) -> Res<Arc<Function>> {
        let id = handle as usize as u64;
        if let Some(f) = self.functions.get(id) {
            return Ok(f);
        }
        let k = self
            .kernels
            .get(id)
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        let ctx = match ctx {
            Some(c) => c.clone(),
            None => self.current()?,
        };
        let m = self.library_module(&k.library, &ctx)?;
        let f = self.function(&m, k.name.to_str().unwrap_or(""))?;
        self.functions.get(f).ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))
    }

    pub fn add_library(&self, source: Source) -> u64 {
        let id = next_id();
        self.libraries.insert(
            id,
            Arc::new(Library {
                id,
                source,
                modules: Mutex::new(HashMap::new()),
                kernels: Mutex::new(HashMap::new()),
            }),
        );
        id
    }

    /// The library's module in `ctx`, loaded there on first use.
    pub fn library_module(&self, lib: &Arc<Library>, ctx: &Arc<Context>) -> Res<Arc<Module>> {
        let mut modules = lock(&lib.modules);
        if let Some(m) = modules.get(&ctx.id).and_then(|&m| self.modules.get(m)) {
            return Ok(m);
        }
        let m = self.load_module(ctx, &lib.source)?;
        modules.insert(ctx.id, m.id);
        Ok(m)
    }

    pub fn unload_library(&self, id: u64) -> Res<()> {
        let lib = self
            .libraries
            .remove(id)
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        for (_, k) in lock(&lib.kernels).drain() {
            self.kernels.remove(k);
        }
        let modules: Vec<u64> = lock(&lib.modules).drain().map(|(_, m)| m).collect();
        let mut result = Ok(());
        for m in modules {
            if self.modules.get(m).is_some() {
                if let Err(e) = self.unload_module(m) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// The kernel `name` of a library (checked in the current context, when there is one).
    pub fn kernel(&self, lib: &Arc<Library>, name: &str) -> Res<u64> {
        if let Some(&k) = lock(&lib.kernels).get(name) {
            return Ok(k);
        }
        if let Ok(ctx) = self.current() {
            let m = self.library_module(lib, &ctx)?;
            self.function(&m, name)?;
        }
        let c_name = CString::new(name).map_err(|_| Fail(CUDA_ERROR_INVALID_VALUE))?;
        let mut kernels = lock(&lib.kernels);
        let id = *kernels.entry(name.to_owned()).or_insert_with(next_id);
        if self.kernels.get(id).is_none() {
            self.kernels.insert(
                id,
                Arc::new(Kernel {
                    library: lib.clone(),
                    name: c_name,
                }),
            );
        }
        Ok(id)
    }
}

/// A stream as a call names it: its context, and the stream unless a default one.
pub struct StreamRef {
    pub ctx: Arc<Context>,
    pub stream: Option<Arc<Stream>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_recognised() {
        assert!(is_pci_address("0000:00:05.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        assert!(!is_pci_address("virtio3"));
        assert!(!is_pci_address("0000:00:05"));
        assert!(!is_pci_address("pci0000:00"));
    }

    #[test]
    fn handles_are_unique_and_never_a_default_stream() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
        assert!(a > 2 && b > 2);
    }
}
