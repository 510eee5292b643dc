// SPDX-License-Identifier: Apache-2.0
//! The `Executor` trait: what runs a tenant's GPU work, on CUDA or on the CPU.
//!
//! One executor instance serves one session (one guest process) and lives on its tenant's
//! worker thread: it is created there and every call comes from there, so a CUDA executor
//! can keep its own context current for its whole life. The mediator above it owns the
//! policy (tenants, sessions, handles, quotas, validation); an executor only performs
//! operations on objects it created, with arguments the mediator has already checked.
//! Running each executor in its own worker process changes the factory, not this trait.

use std::fmt;
use std::sync::Arc;

use vgpu_kernels::{LaunchShape, ParamKind};
use vgpu_protocol::{ExecutorKind, FunctionInfo, Status, FUNCTION_ATTRIBUTES};

use crate::hostmap::HostMapping;

/// Device memory owned by an executor: its device address in the executor's context,
/// exactly what a kernel sees for it (a CUDA device pointer; the CPU executor's buffers
/// have synthetic addresses, see [`crate::cpu`]). A module's variable
/// ([`Executor::module_global`]) is one too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u64);

/// A loaded module (PTX, or a binary image).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModuleId(pub u64);

/// An ordered queue of work (a CUDA stream); one per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId(pub u64);

/// Which kernel a launch runs.
#[derive(Clone, Copy, Debug)]
pub enum KernelRef<'a> {
    /// An entry of the built-in catalog, already validated against its signature.
    Builtin(&'static vgpu_kernels::KernelSpec),
    /// A function of a loaded PTX module, by name.
    Module(ModuleId, &'a str),
}

/// A kernel parameter with handles already resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecParam {
    /// Bytes passed by value.
    Value(Vec<u8>),
    /// The device address of a buffer.
    Buffer(BufferId),
}

/// What the physical device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub kind: ExecutorKind,
    pub name: String,
    pub total_memory: u64,
    pub cc_major: u16,
    pub cc_minor: u16,
    pub multiprocessors: u32,
}

/// An executor's failure, already mapped to the protocol status a guest sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecError {
    pub status: Status,
    /// Executor-specific code (the CUDA error number, the parameter index, ...).
    pub detail: u32,
    pub message: String,
}

impl ExecError {
    pub fn new(status: Status, detail: u32, message: impl Into<String>) -> ExecError {
        ExecError {
            status,
            detail,
            message: message.into(),
        }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.detail, self.message)
    }
}

impl std::error::Error for ExecError {}

pub type ExecResult<T> = Result<T, ExecError>;

/// The detail of the `DEVICE_LOST` a session gets when the watchdog ended its work for
/// running past the kernel timeout: CUDA's own number for a launch that timed out
/// (`CUDA_ERROR_LAUNCH_TIMEOUT`).
pub const TIMEOUT_DETAIL: u32 = 702;

/// Ends an executor from another thread, whatever it is doing: its worker process is
/// killed, a call waiting on it returns at once, and it and every later call fail with
/// `DEVICE_LOST` (detail [`TIMEOUT_DETAIL`] when `timed_out`).
#[derive(Clone)]
pub struct Killer(Arc<dyn Fn(bool) + Send + Sync>);

impl Killer {
    pub fn new(kill: impl Fn(bool) + Send + Sync + 'static) -> Killer {
        Killer(Arc::new(kill))
    }

    /// Kills the executor; `timed_out` when the watchdog ends it.
    pub fn kill(&self, timed_out: bool) {
        (self.0)(timed_out)
    }
}

impl fmt::Debug for Killer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Killer")
    }
}

/// Why executors could not be set up: nothing has run yet, so there is no status for a
/// guest, only a reason for the operator.
///
/// Its `Display` is the whole reason on one line, the inner error's included (it is
/// printed as it is, and `vhost-vgpu` prints each `source()` after it: the inner errors
/// are therefore fields, not sources, so that the reason is not repeated).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No usable CUDA driver, device or NVRTC.
    #[error("CUDA executor unavailable: {0}")]
    Cuda(crate::cuda::CudaError),
    /// The worker binary is missing, or a worker does not start.
    #[error("{0}")]
    Worker(String),
    /// The user the workers are to run as cannot be used (`--worker-user`).
    #[error("--worker-user: {0}")]
    WorkerUser(crate::sandbox::SandboxError),
    /// The GPUs asked for are not there (`--gpus`).
    #[error("{0}")]
    Gpus(String),
    /// One of the GPUs asked for cannot be driven (`error` is shown inline, not as a
    /// source, so the line does not repeat it).
    #[error("GPU {index}: {error} (leave it out with --gpus)")]
    Gpu { index: u32, error: Box<SetupError> },
}

impl SetupError {
    /// Whether CUDA itself is unusable (no driver, device or NVRTC), as opposed to a
    /// worker, a setting or one of several GPUs that is wrong: what `--executor auto` falls
    /// back to the CPU for.
    pub fn cuda_unusable(&self) -> bool {
        matches!(self, SetupError::Cuda(_))
    }
}

impl From<crate::cuda::CudaError> for SetupError {
    fn from(e: crate::cuda::CudaError) -> SetupError {
        SetupError::Cuda(e)
    }
}

/// A guest's buffers could not be read or written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestAccessError {
    /// The guest reset its device or stopped its queue: its pages are its own again.
    #[error("the guest reset the device or stopped its queue")]
    Revoked,
    /// The range lies outside the buffers the guest handed over.
    #[error("{len} bytes at offset {offset} exceed the {total} bytes of guest buffers")]
    OutOfRange { offset: u64, len: u64, total: u64 },
    /// The guest's memory could not be accessed (its memory table changed).
    #[error("guest memory: {0}")]
    Memory(String),
}

/// Host-to-device data that stays where the transport found it (a guest's buffers) until
/// an executor copies it: no intermediate copy in host memory.
pub trait GuestSource: Send + Sync {
    /// The bytes of the copy.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies bytes `[offset, offset + out.len())` of the data into `out`.
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), GuestAccessError>;
    /// Where the data lies in guest-physical memory, piece by piece in order (for a
    /// copy from a registered host buffer); `None` when unknown.
    fn guest_ranges(&self) -> Option<Vec<(u64, u64)>> {
        None
    }
}

/// Where device-to-host data goes (a guest's writable buffers), written in place.
pub trait GuestSink: Send + Sync {
    /// Room for data, in bytes.
    fn capacity(&self) -> u64;
    /// Copies `data` to bytes `[offset, offset + data.len())`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), GuestAccessError>;
    /// See [`GuestSource::guest_ranges`]: where the room lies, first `capacity()` bytes.
    fn guest_ranges(&self) -> Option<Vec<(u64, u64)>> {
        None
    }
}

/// Guest buffers a request's data stays in: its source, or the destination of its answer.
#[derive(Clone)]
pub enum GuestIo {
    Source(Arc<dyn GuestSource>),
    Sink(Arc<dyn GuestSink>),
    /// A host buffer being registered: the files that hold its bytes.
    Map(HostMapping),
}

impl fmt::Debug for GuestIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestIo::Source(s) => write!(f, "GuestIo::Source({} bytes)", s.len()),
            GuestIo::Sink(s) => write!(f, "GuestIo::Sink({} bytes)", s.capacity()),
            GuestIo::Map(m) => write!(f, "GuestIo::Map({} bytes)", m.len()),
        }
    }
}

/// The error for a host buffer the executor does not have.
pub(crate) fn no_host_buffer(id: u64) -> ExecError {
    ExecError::new(Status::Internal, 0, format!("no host buffer {id}"))
}

/// The error for a copy that does not fit its host buffer.
pub(crate) fn outside_host_buffer(id: u64, offset: u64, len: u64) -> ExecError {
    ExecError::new(
        Status::OutOfRange,
        0,
        format!("{len} bytes at {offset} are outside host buffer {id}"),
    )
}

/// A guest's buffers could not be read or written (its memory changed under the copy).
pub(crate) fn guest_fault(e: GuestAccessError) -> ExecError {
    ExecError::new(Status::InvalidRequest, 0, e.to_string())
}

/// A zeroed host buffer of `len` bytes, allocated fallibly: OUT_OF_MEMORY when the host
/// cannot make it.
pub fn host_buffer(len: u64) -> ExecResult<Vec<u8>> {
    let len = usize::try_from(len)
        .map_err(|_| ExecError::new(Status::OutOfMemory, 0, "copy too large"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| ExecError::new(Status::OutOfMemory, 0, "no host memory for the copy"))?;
    v.resize(len, 0);
    Ok(v)
}

/// Runs one tenant's work. Calls on a stream are ordered; `htod`, `dtod`, `memset` and
/// `launch` may return before the device finishes (their source bytes are no longer
/// needed when they return); `dtoh` and `sync` wait for the stream. An asynchronous
/// failure surfaces as an `Err` from a later call on any stream.
pub trait Executor {
    fn open_stream(&mut self) -> ExecResult<StreamId>;
    /// Waits for the stream's work and releases it.
    fn close_stream(&mut self, stream: StreamId);
    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId>;
    /// Frees after all work queued so far that may use the buffer.
    fn free(&mut self, buffer: BufferId);
    fn htod(&mut self, stream: StreamId, dst: BufferId, offset: u64, data: &[u8])
        -> ExecResult<()>;
    fn dtoh(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        out: &mut [u8],
    ) -> ExecResult<()>;
    #[allow(clippy::too_many_arguments)]
    fn dtod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        dst_offset: u64,
        src: BufferId,
        src_offset: u64,
        len: u64,
    ) -> ExecResult<()>;
    /// Fills `len` bytes with `value` repeated at `width` (1 or 4) bytes.
    fn memset(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    ) -> ExecResult<()>;
    fn load_module(&mut self, ptx: &str) -> ExecResult<ModuleId>;
    /// Unloads the module; its variables ([`Executor::module_global`]) go with it.
    fn unload_module(&mut self, module: ModuleId);
    /// Loads a binary module image (cubin, fatbin) as `cuModuleLoadData` takes it. The
    /// bytes are the guest's: the driver parses them, so this runs only where a crash
    /// costs the session alone (a worker process). The default: `UNSUPPORTED`.
    fn load_module_image(&mut self, image: &[u8]) -> ExecResult<ModuleId> {
        let _ = image;
        Err(unsupported("binary module images"))
    }
    /// The device's attributes 1..=`count` (`CUdevice_attribute` numbering); 0 for those
    /// the device does not know. The default: `UNSUPPORTED`.
    fn device_attributes(&mut self, count: u32) -> ExecResult<Vec<i32>> {
        let _ = count;
        Err(unsupported("device attributes"))
    }
    /// A kernel's attributes (`CUfunction_attribute` 0 to 9) and parameter layout. The
    /// default: `UNSUPPORTED`.
    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        let _ = kernel;
        Err(unsupported("function information"))
    }
    /// The variable `name` of `module` (`__device__`, `__constant__`): its memory, which
    /// copies and launches then accept like a buffer's (never freed by [`Executor::free`];
    /// it goes with the module), and its size in bytes. The default: `UNSUPPORTED`.
    fn module_global(&mut self, module: ModuleId, name: &str) -> ExecResult<(BufferId, u64)> {
        let _ = (module, name);
        Err(unsupported("module variables"))
    }
    /// Compiles CUDA C++ `source` to PTX with NVRTC, with `options` as given (the caller
    /// has refused those that read files) and the device's architecture unless they name
    /// one. Output that would not fit `out_len` bytes is not returned, only its size. The
    /// source is the guest's: this runs only where a crash or a runaway compilation costs
    /// the session alone (a worker process). The default: `UNSUPPORTED`.
    fn compile(
        &mut self,
        source: &str,
        options: &[String],
        out_len: u32,
    ) -> ExecResult<CompileOutput> {
        let _ = (source, options, out_len);
        Err(unsupported("compiling CUDA C++"))
    }
    fn launch(
        &mut self,
        stream: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()>;
    fn sync(&mut self, stream: StreamId) -> ExecResult<()>;
    /// `htod` from memory that the caller keeps valid and unchanged until [`Executor::fence`]
    /// returns (a page-locked staging area): the copy may still be running when this
    /// returns, ordered in the stream like any other work. The default: `htod`.
    fn htod_staged(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        data: &[u8],
    ) -> ExecResult<()> {
        self.htod(stream, dst, offset, data)
    }
    /// Waits until every [`Executor::htod_staged`] copy so far has read its source (and
    /// nothing after it in the streams). The default: nothing to wait for.
    fn fence(&mut self) -> ExecResult<()> {
        Ok(())
    }
    /// `htod` of data that is read from `src` as the copy goes. The default reads it
    /// into one host buffer first; an executor with a staging area reads it straight
    /// into that.
    fn htod_from(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        src: &dyn GuestSource,
    ) -> ExecResult<()> {
        let mut data = host_buffer(src.len())?;
        src.read(0, &mut data).map_err(guest_fault)?;
        self.htod(stream, dst, offset, &data)
    }
    /// `dtoh` of `len` bytes written to `dst` as the copy goes (`dst` has room for them).
    fn dtoh_into(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        len: u64,
        dst: &dyn GuestSink,
    ) -> ExecResult<()> {
        let mut data = host_buffer(len)?;
        self.dtoh(stream, src, offset, &mut data)?;
        dst.write(0, &data).map_err(guest_fault)
    }
    /// Maps a host buffer of the session (see [`crate::hostmap`]) under `id`, page-locked
    /// where the executor can, so that [`Executor::htod_host`] and
    /// [`Executor::dtoh_host`] copy straight between it and device memory. The default:
    /// `UNSUPPORTED` (copies then take the ordinary path).
    fn register_host(&mut self, id: u64, mapping: &HostMapping) -> ExecResult<()> {
        let _ = (id, mapping);
        Err(ExecError::new(
            Status::Unsupported,
            0,
            "host buffers are not registered by this executor",
        ))
    }
    /// Unmaps host buffer `id` once no queued work uses it.
    fn unregister_host(&mut self, id: u64) {
        let _ = id;
    }
    /// `htod` of `len` bytes at `host_offset` of host buffer `host`.
    #[allow(clippy::too_many_arguments)]
    fn htod_host(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let _ = (stream, dst, offset, host, host_offset, len);
        Err(no_host_buffer(host))
    }
    /// `dtoh` of `len` bytes into host buffer `host` at `host_offset`.
    #[allow(clippy::too_many_arguments)]
    fn dtoh_host(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let _ = (stream, src, offset, host, host_offset, len);
        Err(no_host_buffer(host))
    }
    /// True once the execution context is unusable (a CUDA sticky error): the mediator
    /// then drops this executor, creates a new one and reports DEVICE_LOST to the
    /// tenant's other sessions.
    fn poisoned(&self) -> bool {
        false
    }
    /// How far this executor's device work has got, for the scheduler; `None` when its
    /// calls do all their work before they return (their duration is then their device
    /// time, measured by the caller).
    fn meter(&self) -> Option<Arc<dyn DeviceMeter>> {
        None
    }
    /// A handle that ends this executor from another thread (the watchdog, a VM reset);
    /// `None` when it cannot be ended from outside.
    fn killer(&self) -> Option<Killer> {
        None
    }

    // What the executor's work holds on the device, for quotas that count everything a
    // VM causes there. The defaults suit an executor whose buffers are exactly their
    // bytes and which has no context, modules or local memory of its own (the CPU).

    /// Device bytes an allocation of `bytes` really takes (the allocator rounds); known
    /// before the allocation is made. The default: `bytes`.
    fn alloc_footprint(&self, bytes: u64) -> u64 {
        bytes
    }
    /// Device bytes the loaded `module` holds (its globals, constants and code), as
    /// measured when it was loaded. The default: 0.
    fn module_bytes(&self, module: ModuleId) -> u64 {
        let _ = module;
        0
    }
    /// Device bytes the driver reserves for `kernel`'s local memory when it is launched,
    /// and keeps for the life of the context: a session holds the largest of these over
    /// the kernels it launched. The default: 0.
    fn local_reservation(&mut self, kernel: KernelRef<'_>) -> ExecResult<u64> {
        let _ = kernel;
        Ok(0)
    }
    /// Device bytes the executor's own context holds before any work (with the built-in
    /// catalog loaded). The default: 0.
    fn context_bytes(&self) -> u64 {
        0
    }
}

/// What [`Executor::compile`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompileOutput {
    /// The PTX (no NUL) and the compiler's log.
    Ptx { ptx: Vec<u8>, log: Vec<u8> },
    /// The source did not compile: NVRTC's result code (`nvrtcResult`), its log cut to
    /// the room there was, and the whole log's length.
    Failed {
        code: u32,
        log: Vec<u8>,
        log_len: u64,
    },
    /// The PTX and the log together need `needed` bytes, more than there was room for.
    TooLarge { needed: u64 },
}

/// The error of an operation an executor does not offer.
pub(crate) fn unsupported(what: &str) -> ExecError {
    ExecError::new(
        Status::Unsupported,
        0,
        format!("{what}: not offered by this executor"),
    )
}

/// Byte offsets and sizes of a built-in kernel's parameters as its CUDA signature lays
/// them out: buffers are 8-byte pointers, values their size, each at an offset aligned
/// to its size.
pub fn builtin_param_layout(params: &[ParamKind]) -> Vec<(u32, u32)> {
    let mut end = 0u32;
    params
        .iter()
        .map(|k| {
            let size = k.size() as u32;
            let at = end.next_multiple_of(size);
            end = at + size;
            (at, size)
        })
        .collect()
}

/// FUNCTION_INFO's answer for a built-in kernel: `attributes` with the catalog's
/// parameter layout ([`builtin_param_layout`]).
pub fn builtin_function_info(
    spec: &vgpu_kernels::KernelSpec,
    attributes: [i32; FUNCTION_ATTRIBUTES],
) -> FunctionInfo {
    FunctionInfo {
        attributes,
        params: builtin_param_layout(spec.params),
    }
}

/// A snapshot of an executor's device work: operations handed to the device (launches,
/// copies, memsets), those finished (successfully or not), and the device time the
/// finished ones took, measured on the device (CUDA events), in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeterReading {
    pub sent: u64,
    pub done: u64,
    pub busy_ns: u64,
}

impl MeterReading {
    /// Operations on the device or queued for it.
    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.done)
    }
}

/// Reads how far an executor's device work has got, from any thread.
pub trait DeviceMeter: Send + Sync {
    fn read(&self) -> MeterReading;
}

/// Creates one executor per session and describes the device they share.
pub trait ExecutorFactory: Send + Sync {
    fn device(&self) -> &DeviceInfo;
    /// Called on the tenant's worker thread.
    fn create(&self) -> ExecResult<Box<dyn Executor>>;
    /// The worker binary each executor runs in when every executor has its own process
    /// (a device fault in one tenant's work then cannot reach another tenant's); `None`
    /// when the executors share this process.
    fn worker_process(&self) -> Option<&std::path::Path> {
        None
    }
    /// Where the executors run when that is not this machine (remote executors), for
    /// logs and `info`; `None` here.
    fn placement(&self) -> Option<String> {
        None
    }
    /// Starts what a VM's executor needs once and stops it again: for `info`-style
    /// checks that must fail when a VM could not be served.
    fn check(&self) -> Result<(), SetupError> {
        Ok(())
    }
}

/// `--executor` choices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorChoice {
    /// CUDA when a driver and a device are usable, otherwise the CPU with a warning.
    Auto,
    Cuda,
    Cpu,
    /// `cpu:N`: the CPU reference executor presented as N simulated devices (see
    /// [`crate::cpu::CpuExecutorFactory::simulated`]).
    SimulatedCpu(u32),
    /// Executors on worker hosts (`remote:HOST:PORT[,HOST:PORT...]`, see
    /// [`crate::remote`]), tried in order: a session opens on the first that answers.
    /// Several GPUs: each GPU's workers, separated by `+` (see
    /// [`crate::remote::RemoteSpec`]).
    Remote(crate::remote::RemoteSpec),
}

/// An `--executor` that is none of the choices.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown executor '{0}' (expected auto, cuda, cpu, cpu:N or remote:HOST:PORT[,HOST:PORT...])"
)]
pub struct UnknownExecutor(pub String);

impl std::str::FromStr for ExecutorChoice {
    type Err = UnknownExecutor;
    fn from_str(s: &str) -> Result<Self, UnknownExecutor> {
        match s {
            "auto" => Ok(ExecutorChoice::Auto),
            "cuda" => Ok(ExecutorChoice::Cuda),
            "cpu" => Ok(ExecutorChoice::Cpu),
            _ if s.starts_with("cpu:") => match s["cpu:".len()..].parse::<u32>() {
                Ok(n) if (1..=MAX_GPUS).contains(&n) => Ok(ExecutorChoice::SimulatedCpu(n)),
                _ => Err(UnknownExecutor(format!(
                    "{s}: N must be a number of simulated devices from 1 to {MAX_GPUS}"
                ))),
            },
            _ => match s.strip_prefix("remote:") {
                Some(list) => list
                    .parse()
                    .map(ExecutorChoice::Remote)
                    .map_err(|e| UnknownExecutor(format!("{s}: {e}"))),
                None => Err(UnknownExecutor(s.to_string())),
            },
        }
    }
}

/// Where CUDA executors run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Each session's executor (one per guest process) in its own worker process: its own
    /// CUDA context in its own address space, so no kernel can read or write another
    /// session's or VM's device memory and a fault takes down only its own session.
    /// Without a worker that starts, a session is not served (`DEVICE_LOST`; the next one
    /// tries a new worker).
    #[default]
    Process,
    /// Every executor in this process, for a single VM: CUDA contexts of one process
    /// share one address space, so a kernel of one VM could read and write another's
    /// device memory by address. No memory isolation.
    SharedProcess,
}

/// How CUDA executors are run: [`select_with`]'s options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecutorOptions {
    pub isolation: Isolation,
    /// The user worker processes run as (see [`crate::sandbox`]); `None`: the default,
    /// [`crate::sandbox::DEFAULT_WORKER_USER`] when running as root.
    pub worker_user: Option<String>,
    /// Each worker's cap on private host memory (`RLIMIT_DATA`); `None`:
    /// [`DEFAULT_WORKER_MAX_MEMORY`].
    pub worker_max_memory: Option<u64>,
    /// How long one wait for a worker may last before the worker is killed and its
    /// session gets `DEVICE_LOST` with detail [`TIMEOUT_DETAIL`] (see
    /// [`crate::process::ProcessExecutorFactory::with_kernel_timeout`]); at least
    /// [`MIN_KERNEL_TIMEOUT`]. `None`: [`crate::process::DEFAULT_KERNEL_TIMEOUT`].
    /// Executors that run in this process have no kernel timeout.
    pub kernel_timeout: Option<std::time::Duration>,
    /// The mediator's key file for remote executors (one `NAME KEY` line); `None`:
    /// [`crate::remote::link::DEFAULT_MEDIATOR_KEY`].
    pub remote_key: Option<std::path::PathBuf>,
    /// How long to keep trying to reach a remote worker at start; `None`:
    /// [`DEFAULT_REMOTE_WAIT`].
    pub remote_wait: Option<std::time::Duration>,
    /// The GPUs to drive, by index (CUDA's device ordinal, after `CUDA_VISIBLE_DEVICES`;
    /// the simulated devices' index with `cpu:N`); `None`: every one there is. See
    /// [`select_gpus`].
    pub gpus: Option<Vec<u32>>,
}

/// The most GPUs (or simulated devices) one mediator drives.
pub const MAX_GPUS: u32 = 64;

/// Parses a list of GPU indices such as `0,2` (`--gpus`): each at most once.
pub fn parse_gpu_list(s: &str) -> Result<Vec<u32>, String> {
    let gpus = s
        .split(',')
        .map(str::trim)
        .map(|part| {
            part.parse()
                .map_err(|_| format!("'{part}' is not a GPU index (0 to {})", MAX_GPUS - 1))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    check_gpu_list(&gpus)?;
    Ok(gpus)
}

/// A list of GPU indices is usable: each below [`MAX_GPUS`], each at most once.
pub fn check_gpu_list(gpus: &[u32]) -> Result<(), String> {
    for (i, &gpu) in gpus.iter().enumerate() {
        if gpu >= MAX_GPUS {
            return Err(format!(
                "'{gpu}' is not a GPU index (0 to {})",
                MAX_GPUS - 1
            ));
        }
        if gpus[..i].contains(&gpu) {
            return Err(format!("GPU {gpu} is named twice"));
        }
    }
    Ok(())
}

/// Default of [`ExecutorOptions::remote_wait`].
pub const DEFAULT_REMOTE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Shortest kernel timeout [`ExecutorOptions`] accepts.
pub const MIN_KERNEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl ExecutorOptions {
    /// The mediator's name and key for remote executors, from
    /// [`ExecutorOptions::remote_key`] (or its default).
    pub fn remote_credentials(&self) -> Result<crate::remote::Credentials, SetupError> {
        let path = self
            .remote_key
            .clone()
            .unwrap_or_else(|| crate::remote::link::DEFAULT_MEDIATOR_KEY.into());
        crate::remote::Credentials::load(&path)
    }

    /// Checks what can be checked before anything starts (the worker user exists, the
    /// GPU list names each GPU once).
    pub fn validate(&self) -> Result<(), SetupError> {
        if let Some(gpus) = &self.gpus {
            check_gpu_list(gpus).map_err(|e| SetupError::Gpus(format!("--gpus: {e}")))?;
        }
        if self.kernel_timeout.is_some_and(|t| t < MIN_KERNEL_TIMEOUT) {
            return Err(SetupError::Worker(
                "--kernel-timeout must be at least 1 second".into(),
            ));
        }
        if let Some(name) = &self.worker_user {
            crate::sandbox::WorkerUser::lookup(name).map_err(SetupError::WorkerUser)?;
        }
        Ok(())
    }
}

/// Default cap on a CUDA worker's private host memory: the driver's own bookkeeping and
/// the JIT need far less, and device memory and the staging area are not counted.
pub const DEFAULT_WORKER_MAX_MEMORY: u64 = 16 << 30;

/// Builds the executor factory for a choice, with each VM's CUDA work in its own worker
/// process ([`Isolation::Process`]). See [`select_with`].
pub fn select(choice: ExecutorChoice) -> Result<Arc<dyn ExecutorFactory>, SetupError> {
    select_with(choice, &ExecutorOptions::default())
}

/// Builds the executor factory for a choice. `Cuda` fails with a one-line reason when no
/// usable driver or device exists, or when CUDA executors should run in worker processes
/// and no worker binary is installed ([`crate::process::find_worker`]): it never falls
/// back to running VMs' CUDA work in this process. `Auto` takes CUDA when a driver and a
/// device are usable (under the same rule) and otherwise the CPU, and says which and why
/// in the log. The CPU executor runs in this process: its buffers are host memory that
/// only the mediator addresses (no guest code runs on the CPU), so VMs stay apart. One GPU:
/// the first of [`ExecutorOptions::gpus`], or GPU 0 ([`select_gpus`] gives every one).
pub fn select_with(
    choice: ExecutorChoice,
    options: &ExecutorOptions,
) -> Result<Arc<dyn ExecutorFactory>, SetupError> {
    // The first GPU only (the first of `gpus` when given): the others are not started.
    let first = options.gpus.as_ref().and_then(|g| g.first().copied());
    let one = ExecutorOptions {
        gpus: Some(vec![first.unwrap_or(0)]),
        ..options.clone()
    };
    let mut gpus = select_gpus(choice, &one)?;
    // `select_gpus` never answers an empty list.
    Ok(gpus.swap_remove(0).1)
}

/// A GPU a mediator drives: its index as the host names it, and what runs work on it.
pub type GpuFactory = (u32, Arc<dyn ExecutorFactory>);

/// Builds an executor factory for every GPU to drive, in index order: each one
/// [`ExecutorOptions::gpus`] names, or every device there is. As [`select_with`] for one;
/// a named GPU that is not there, or does not start, is an error (leave it out with
/// `--gpus`). `Auto` takes CUDA when it starts on the first GPU, and otherwise the CPU
/// (one device). Remote executors present one device per `+`-separated group of workers
/// (a worker serves one GPU).
pub fn select_gpus(
    choice: ExecutorChoice,
    options: &ExecutorOptions,
) -> Result<Vec<GpuFactory>, SetupError> {
    let cpu = |count: u32, what: &str| -> Result<Vec<GpuFactory>, SetupError> {
        let indices = wanted_gpus(options, count, what, "; cpu:N presents N")?;
        Ok(indices
            .into_iter()
            .map(|i| -> GpuFactory {
                (
                    i,
                    Arc::new(crate::cpu::CpuExecutorFactory::simulated(count)),
                )
            })
            .collect())
    };
    match choice {
        ExecutorChoice::Remote(spec) => {
            let indices = wanted_gpus(
                options,
                spec.gpu_count(),
                "this remote executor",
                "; each GPU's workers are separated by +",
            )?;
            let creds = options.remote_credentials()?;
            let mut gpus: Vec<GpuFactory> = Vec::new();
            for index in indices {
                let one = spec.gpu(index);
                let what = one.to_string();
                let factory = crate::remote::RemoteExecutorFactory::connect(
                    one,
                    creds.clone(),
                    options.remote_wait.unwrap_or(DEFAULT_REMOTE_WAIT),
                )?
                .with_kernel_timeout(
                    options
                        .kernel_timeout
                        .unwrap_or(crate::process::DEFAULT_KERNEL_TIMEOUT),
                );
                let gpu = match spec.gpu_count() {
                    1 => String::new(),
                    _ => format!("GPU {index}: "),
                };
                log::info!(
                    "executor: {gpu}{} on worker hosts ({what}); each session in its own \
                     executor there",
                    factory.device().name
                );
                gpus.push((index, Arc::new(factory)));
            }
            Ok(gpus)
        }
        ExecutorChoice::Cpu => {
            log::info!("executor: the CPU reference executor (--executor cpu)");
            cpu(1, "the CPU reference executor")
        }
        ExecutorChoice::SimulatedCpu(n) => {
            log::info!(
                "executor: the CPU reference executor as {n} simulated devices (--executor cpu:{n})"
            );
            cpu(n, &format!("cpu:{n}"))
        }
        ExecutorChoice::Cuda => cuda_gpus(options),
        ExecutorChoice::Auto => match cuda_gpus(options) {
            Ok(gpus) => {
                log::info!(
                    "executor: CUDA on {} GPU(s) (--executor auto found a usable driver and device)",
                    gpus.len()
                );
                Ok(gpus)
            }
            Err(e) if e.cuda_unusable() => {
                log::warn!(
                    "executor: the CPU reference executor, NOT a GPU: --executor auto found no \
                     usable CUDA ({e}); pass --executor cuda to refuse to start without one"
                );
                cpu(1, "the CPU reference executor")
            }
            Err(e) => Err(e),
        },
    }
}

/// The indices to drive out of `count` devices: [`ExecutorOptions::gpus`], each checked,
/// or all of them. `what` names the devices' source in an error, `hint` follows it.
fn wanted_gpus(
    options: &ExecutorOptions,
    count: u32,
    what: &str,
    hint: &str,
) -> Result<Vec<u32>, SetupError> {
    match &options.gpus {
        None => Ok((0..count).collect()),
        Some(list) if list.is_empty() => Err(SetupError::Gpus("--gpus names no GPU".into())),
        Some(list) => {
            check_gpu_list(list).map_err(|e| SetupError::Gpus(format!("--gpus: {e}")))?;
            if let Some(missing) = list.iter().find(|&&g| g >= count) {
                let range = match count {
                    1 => "GPU 0 only".to_string(),
                    n => format!("GPUs 0 to {}", n - 1),
                };
                return Err(SetupError::Gpus(format!(
                    "--gpus: no GPU {missing} ({what} has {range}{hint})"
                )));
            }
            let mut sorted = list.clone();
            sorted.sort_unstable();
            Ok(sorted)
        }
    }
}

/// A factory per CUDA device to drive (see [`select_gpus`]).
fn cuda_gpus(options: &ExecutorOptions) -> Result<Vec<GpuFactory>, SetupError> {
    let count = crate::cuda::visible_devices().map_err(SetupError::Cuda)?;
    if count == 0 {
        return Err(SetupError::Cuda(crate::cuda::CudaError::NoDevice));
    }
    let count = u32::try_from(count).unwrap_or(MAX_GPUS).min(MAX_GPUS);
    let mut gpus = Vec::new();
    for index in wanted_gpus(options, count, "the CUDA driver", "")? {
        let factory = crate::cuda::CudaExecutorFactory::new(index as usize)
            .map_err(SetupError::Cuda)
            .and_then(|f| cuda_factory(f, index, options));
        match factory {
            Ok(factory) => gpus.push((index, factory)),
            // The first GPU fails as a single GPU does (CUDA unusable, no worker, ...).
            Err(e) if gpus.is_empty() => return Err(e),
            // A later GPU that does not start is named: the others work.
            Err(e) => {
                return Err(SetupError::Gpu {
                    index,
                    error: Box::new(e),
                })
            }
        }
    }
    Ok(gpus)
}

fn cuda_factory(
    cuda: crate::cuda::CudaExecutorFactory,
    ordinal: u32,
    options: &ExecutorOptions,
) -> Result<Arc<dyn ExecutorFactory>, SetupError> {
    match options.isolation {
        Isolation::SharedProcess => {
            log::warn!(
                "every CUDA executor runs in this process: NO MEMORY ISOLATION between its \
                 contexts (a kernel can reach any buffer of the process by address), and no \
                 kernel timeout; for one VM only"
            );
            Ok(Arc::new(cuda))
        }
        Isolation::Process => {
            let workers = crate::process::ProcessExecutorFactory::cuda(ordinal as usize, &cuda)
                .and_then(|f| {
                    let mut sandbox = f.sandbox().clone();
                    if let Some(name) = &options.worker_user {
                        let user = crate::sandbox::WorkerUser::lookup(name)
                            .map_err(SetupError::WorkerUser)?;
                        sandbox.user = Some(user);
                    }
                    sandbox.max_data_bytes = Some(
                        options
                            .worker_max_memory
                            .unwrap_or(DEFAULT_WORKER_MAX_MEMORY),
                    );
                    let timeout = options
                        .kernel_timeout
                        .unwrap_or(crate::process::DEFAULT_KERNEL_TIMEOUT);
                    Ok(f.with_sandbox(sandbox).with_kernel_timeout(timeout))
                });
            process_isolated(workers)
        }
    }
}

/// Fails closed: the worker-process factory or an error, never the in-process one. A
/// worker that does not start now is reported; each VM's next session tries again.
pub fn process_isolated(
    workers: Result<crate::process::ProcessExecutorFactory, SetupError>,
) -> Result<Arc<dyn ExecutorFactory>, SetupError> {
    let workers = workers.map_err(|e| {
        SetupError::Worker(format!(
            "CUDA executors run only in executor worker processes, and {e}"
        ))
    })?;
    match workers.check() {
        Ok(()) => log::info!(
            "each session's CUDA work runs in its own executor worker process ({}; {}; \
             kernel timeout {} s)",
            workers.worker_path().display(),
            workers.sandbox().describe(),
            workers.kernel_timeout().as_secs_f64()
        ),
        Err(e) => log::error!(
            "{e}; each VM's sessions get DEVICE_LOST until a worker starts (tried again at \
             every session)"
        ),
    }
    Ok(Arc::new(workers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_n_presents_n_simulated_devices_and_gpus_picks_among_them() {
        assert_eq!("cpu:3".parse(), Ok(ExecutorChoice::SimulatedCpu(3)));
        for bad in ["cpu:0", "cpu:65", "cpu:x", "cpu:"] {
            assert!(bad.parse::<ExecutorChoice>().is_err(), "{bad}");
        }
        let all =
            select_gpus(ExecutorChoice::SimulatedCpu(3), &ExecutorOptions::default()).unwrap();
        assert_eq!(all.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1, 2]);
        let total = crate::cpu::cpu_device_info().total_memory;
        assert_eq!(all[2].1.device().total_memory, total / 3);
        let options = ExecutorOptions {
            gpus: Some(vec![2, 0]),
            ..ExecutorOptions::default()
        };
        let some = select_gpus(ExecutorChoice::SimulatedCpu(3), &options).unwrap();
        assert_eq!(some.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 2]);
        // select_with: the first named only.
        assert_eq!(
            select_with(ExecutorChoice::SimulatedCpu(3), &options)
                .unwrap()
                .device()
                .total_memory,
            total / 3
        );
        let missing = ExecutorOptions {
            gpus: Some(vec![1]),
            ..ExecutorOptions::default()
        };
        let e = select_gpus(ExecutorChoice::Cpu, &missing).err().unwrap();
        assert_eq!(
            e.to_string(),
            "--gpus: no GPU 1 (the CPU reference executor has GPU 0 only; cpu:N presents N)"
        );
    }

    #[test]
    fn gpu_lists_name_each_gpu_once() {
        assert_eq!(parse_gpu_list("0,2"), Ok(vec![0, 2]));
        assert_eq!(parse_gpu_list(" 1 "), Ok(vec![1]));
        assert_eq!(parse_gpu_list("1,1"), Err("GPU 1 is named twice".into()));
        assert!(parse_gpu_list("").is_err());
        assert!(parse_gpu_list("a").is_err());
        assert!(parse_gpu_list("64").is_err());
    }
}
