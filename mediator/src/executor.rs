//! The `Executor` trait: what runs a tenant's GPU work, on CUDA or on the CPU.
//!
//! One executor instance serves one tenant (one VM) and lives on that tenant's worker
//! thread: it is created there and every call comes from there, so a CUDA executor can
//! keep its own context current for its whole life. The mediator above it owns the
//! policy (sessions, handles, quotas, validation); an executor only performs operations
//! on objects it created, with arguments the mediator has already checked. Moving a
//! tenant's executor into its own worker process changes the factory, not this trait.

use std::fmt;
use std::sync::Arc;

use vgpu_kernels::LaunchShape;
use vgpu_protocol::{ExecutorKind, Status};

/// Device memory owned by an executor (a CUDA device pointer, or a CPU buffer id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u64);

/// A loaded PTX module.
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
    fn unload_module(&mut self, module: ModuleId);
    fn launch(
        &mut self,
        stream: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()>;
    fn sync(&mut self, stream: StreamId) -> ExecResult<()>;
    /// True once the execution context is unusable (a CUDA sticky error): the mediator
    /// then drops this executor, creates a new one and reports DEVICE_LOST to the
    /// tenant's other sessions.
    fn poisoned(&self) -> bool {
        false
    }
}

/// Creates one executor per tenant and describes the device they share.
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
}

/// `--executor` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorChoice {
    /// CUDA when a driver and a device are usable, otherwise the CPU with a warning.
    Auto,
    Cuda,
    Cpu,
}

impl std::str::FromStr for ExecutorChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ExecutorChoice::Auto),
            "cuda" => Ok(ExecutorChoice::Cuda),
            "cpu" => Ok(ExecutorChoice::Cpu),
            _ => Err(format!(
                "unknown executor '{s}' (expected auto, cuda or cpu)"
            )),
        }
    }
}

/// Builds the executor factory for a choice. `Cuda` fails with a one-line reason when
/// no usable driver or device exists; `Auto` falls back to the CPU with one warning.
///
/// CUDA executors run each in its own worker process
/// ([`crate::process::ProcessExecutorFactory`]), so one tenant's faulting kernel cannot
/// take the others down. Without a worker binary (see [`crate::process::find_worker`])
/// or when a worker does not start, they run in this process, with one warning that
/// tenants are then not isolated from each other's device faults.
pub fn select(choice: ExecutorChoice) -> Result<Arc<dyn ExecutorFactory>, String> {
    match choice {
        ExecutorChoice::Cpu => Ok(Arc::new(crate::cpu::CpuExecutorFactory::new())),
        ExecutorChoice::Cuda => crate::cuda::CudaExecutorFactory::new(0)
            .map(isolated_cuda)
            .map_err(|e| format!("CUDA executor unavailable: {e}")),
        ExecutorChoice::Auto => match crate::cuda::CudaExecutorFactory::new(0) {
            Ok(f) => Ok(isolated_cuda(f)),
            Err(e) => {
                log::warn!("CUDA unavailable ({e}); using the CPU reference executor");
                Ok(Arc::new(crate::cpu::CpuExecutorFactory::new()))
            }
        },
    }
}

/// The process-isolated factory for CUDA device 0, or `cuda` itself when no worker starts.
fn isolated_cuda(cuda: crate::cuda::CudaExecutorFactory) -> Arc<dyn ExecutorFactory> {
    let isolated =
        crate::process::ProcessExecutorFactory::cuda(0, &cuda).and_then(|f| f.probe().map(|()| f));
    match isolated {
        Ok(f) => {
            log::info!(
                "each tenant's CUDA work runs in its own executor worker process ({})",
                f.worker_path().display()
            );
            Arc::new(f)
        }
        Err(e) => {
            log::warn!(
                "{e}; running every tenant's CUDA work in this process instead: tenants are \
                 NOT isolated from each other's device faults (one faulting kernel fails all)"
            );
            Arc::new(cuda)
        }
    }
}
