//! Executors in worker processes: each tenant's executor runs in its own
//! `vgpu-executor-worker` process, so a kernel that faults takes down that process's
//! CUDA context only. (Separate contexts in one process do not contain a fault: after a
//! kernel traps, every context of the process fails.)
//!
//! [`ProcessExecutorFactory::create`] starts a worker and returns a [`ProcessExecutor`]
//! that forwards every [`Executor`] call to it and waits for the answer:
//!
//! - **Channel.** A unix stream socketpair; the worker inherits its end. Messages are
//!   frames (a little-endian `u32` length, then the payload: an opcode and fixed-width
//!   little-endian fields; byte strings carry a `u32` length). Every request gets one
//!   reply: a poisoned flag (the worker's [`Executor::poisoned`]), then either a `u64`
//!   value or the [`ExecError`] (status, detail, message) exactly as the executor made it.
//! - **Staging.** Copy data does not go through the socket: the parent creates a memfd
//!   (64 MiB by default), both processes map it `MAP_SHARED`, an HTOD writes the bytes
//!   there before its request and a DTOH reads them after its reply. Larger copies are
//!   split into staging-sized pieces, one request each. The CUDA worker page-locks the
//!   area (`cuMemHostRegister`), so those copies run at pinned speed; if the driver
//!   refuses, it logs that and copies from pageable memory.
//! - **Start.** The parent sends the executor kind and, for CUDA, the catalog PTX it
//!   compiled, so a worker needs no NVRTC; the worker answers with the device it opened.
//!   The worker is killed if the thread that started it dies (`PR_SET_PDEATHSIG`), and
//!   exits when its socket closes.
//! - **Loss.** When the worker dies or the channel breaks, every call returns
//!   `DEVICE_LOST` and [`Executor::poisoned`] turns true; the mediator then drops the
//!   executor and the tenant's next session starts a new worker. A worker whose
//!   executor reports itself poisoned (a sticky CUDA error) is dropped the same way.
//! - **Stop.** Dropping a [`ProcessExecutor`] asks a healthy worker to exit, waits up to
//!   [`EXIT_GRACE`], then kills it; a lost or poisoned one is killed at once. The child
//!   is always reaped.
//!
//! A kernel that never finishes blocks its worker, and with it the calling tenant's
//! thread, in the call that waits for it; other tenants are not affected. There is no
//! watchdog.
//!
//! The worker binary is found by [`find_worker`].

use std::ffi::{c_void, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;
use vgpu_protocol::{Status, MAX_PTX_BYTES};

use crate::cpu::{CpuExecutor, CpuExecutorFactory};
use crate::cuda::{CudaExecutor, CudaExecutorFactory};
use crate::executor::{
    BufferId, DeviceInfo, ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, KernelRef,
    ModuleId, StreamId,
};
use crate::sandbox::{Sandbox, WorkerUser};

/// Environment variable naming the worker binary.
pub const WORKER_ENV: &str = "VGPU_EXECUTOR_WORKER";
/// The only environment variables a worker inherits.
const WORKER_ENV_KEPT: &[&str] = &[
    "RUST_LOG",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    crate::cuda::PTX_SIGNATURES_ONLY_ENV,
];
/// The worker binary's file name.
pub const WORKER_BINARY: &str = "vgpu-executor-worker";
/// Default size of a worker's staging area for copies.
pub const DEFAULT_STAGING_BYTES: usize = 64 << 20;
/// How long a starting worker may take to open its device and answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a healthy worker may take to exit when its executor is dropped.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Version of the parent-worker messages; a worker refuses a parent of another version.
const WIRE_VERSION: u32 = 1;
/// Largest frame either side accepts (the largest is a module load of the largest PTX).
const MAX_FRAME: usize = MAX_PTX_BYTES as usize + (64 << 10);
/// Smallest staging area (one page).
const MIN_STAGING_BYTES: usize = 4096;

/// The CUDA error number a simulated device fault reports (`CUDA_ERROR_LAUNCH_FAILED`).
const SIMULATED_FAULT_DETAIL: u32 = 719;
/// The `fill_u32` value that makes the fault-simulating CPU executor fault.
pub const SIMULATED_FAULT_VALUE: u32 = 0xdead;

// ---------------------------------------------------------------------------------------
// Finding the worker

/// The worker binary: `$VGPU_EXECUTOR_WORKER` if set (it must exist), else
/// `vgpu-executor-worker` beside the running executable (for a cargo test binary in
/// `target/<profile>/deps/`, also in `target/<profile>/`), else the first on `$PATH`.
pub fn find_worker() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().ok();
    locate_worker(
        std::env::var_os(WORKER_ENV),
        exe.as_deref(),
        std::env::var_os("PATH"),
    )
}

fn locate_worker(
    env: Option<OsString>,
    exe: Option<&Path>,
    path: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(value);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "{WORKER_ENV}={} is not an executable file",
                p.display()
            ))
        };
    }
    let mut candidates = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        candidates.push(dir.join(WORKER_BINARY));
        if dir.file_name() == Some(OsStr::new("deps")) {
            if let Some(up) = dir.parent() {
                candidates.push(up.join(WORKER_BINARY));
            }
        }
    }
    if let Some(path) = path {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(WORKER_BINARY)));
    }
    candidates
        .into_iter()
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!(
                "no {WORKER_BINARY} found (beside the executable, on PATH, or named by {WORKER_ENV})"
            )
        })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// ---------------------------------------------------------------------------------------
// Messages

const OP_INIT: u8 = 1;
const OP_OPEN_STREAM: u8 = 2;
const OP_CLOSE_STREAM: u8 = 3;
const OP_ALLOC: u8 = 4;
const OP_FREE: u8 = 5;
const OP_HTOD: u8 = 6;
const OP_DTOH: u8 = 7;
const OP_DTOD: u8 = 8;
const OP_MEMSET: u8 = 9;
const OP_LOAD_MODULE: u8 = 10;
const OP_UNLOAD_MODULE: u8 = 11;
const OP_LAUNCH: u8 = 12;
const OP_SYNC: u8 = 13;
const OP_EXIT: u8 = 14;

const KIND_CPU: u8 = 1;
const KIND_CUDA: u8 = 2;
const KIND_CPU_FAULT_SIM: u8 = 3;

const KERNEL_BUILTIN: u8 = 0;
const KERNEL_MODULE: u8 = 1;
const PARAM_VALUE: u8 = 0;
const PARAM_BUFFER: u8 = 1;

/// Builds one frame: a length placeholder, then the payload.
struct Enc(Vec<u8>);

impl Enc {
    fn new(first: u8) -> Enc {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(first);
        Enc(v)
    }

    fn u8(mut self, v: u8) -> Enc {
        self.0.push(v);
        self
    }

    fn u32(mut self, v: u32) -> Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(mut self, v: u64) -> Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(mut self, v: &[u8]) -> Enc {
        self = self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }

    fn str(self, v: &str) -> Enc {
        self.bytes(v.as_bytes())
    }

    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed executor message")
}

/// Reads the fields of one payload.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(malformed());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> io::Result<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| malformed())
    }
}

/// Sends a whole frame; never raises SIGPIPE.
fn send_frame(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < frame.len() {
        let rest = &frame[sent..];
        // SAFETY: `rest` is valid for reads of its length.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Receives one frame's payload into `buf`.
fn recv_frame(sock: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(malformed());
    }
    buf.clear();
    buf.resize(len, 0);
    sock.read_exact(buf)
}

fn encode_reply(poisoned: bool, result: &ExecResult<u64>) -> Enc {
    let e = Enc::new(u8::from(poisoned));
    match result {
        Ok(v) => e.u8(1).u64(*v),
        Err(err) => e
            .u8(0)
            .u32(err.status as u32)
            .u32(err.detail)
            .str(&err.message),
    }
}

/// A reply's poisoned flag and result; `rest` holds what follows (the ready message's
/// device description).
fn decode_reply<'a>(payload: &'a [u8]) -> io::Result<(bool, ExecResult<u64>, Dec<'a>)> {
    let mut d = Dec(payload);
    let poisoned = d.u8()? != 0;
    let result = if d.u8()? == 1 {
        Ok(d.u64()?)
    } else {
        let status = Status::from_u32(d.u32()?).unwrap_or(Status::Internal);
        let detail = d.u32()?;
        let message = d.str()?.to_string();
        Err(ExecError::new(status, detail, message))
    };
    Ok((poisoned, result, d))
}

// ---------------------------------------------------------------------------------------
// Shared staging memory

/// A `MAP_SHARED` mapping of the staging memfd, unmapped on drop.
struct Staging {
    ptr: NonNull<u8>,
    len: usize,
}

impl Staging {
    fn map(fd: RawFd, len: usize) -> io::Result<Staging> {
        // SAFETY: a fresh shared mapping of `len` bytes of `fd`; nothing else is touched.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Staging { ptr, len })
    }

    fn as_ptr(&self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }

    fn slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.len);
        // SAFETY: the mapping is `self.len` bytes, readable, alive while `self` is. The
        // other process touches it only while this one waits for its message.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.len);
        // SAFETY: as in `slice`, and writable; `&mut self` makes this the only slice here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: mapped in `map`, unmapped once; no slice outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A memfd of `len` bytes for the staging area.
fn staging_memfd(len: usize) -> io::Result<OwnedFd> {
    // The system call, not glibc's wrapper: that one needs glibc 2.27, and the mediator
    // also runs on hosts with glibc 2.17 (XCP-ng dom0; memfd_create is in Linux 3.17).
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_memfd_create,
            c"vgpu-staging".as_ptr(),
            libc::MFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("memfd_create: bad fd"))?;
    // SAFETY: a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(|_| io::Error::other("staging too large"))?;
    // SAFETY: sets the size of our own memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `fd` moved above the standard streams if it is one of them (the child's stdio setup
/// would otherwise replace it), close-on-exec either way.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: duplicates a valid fd; the copy is owned below.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

// ---------------------------------------------------------------------------------------
// Parent side

#[derive(Clone, Debug)]
enum WorkerKind {
    Cpu,
    CpuFaultSim,
    Cuda { ordinal: u32, catalog_ptx: Arc<str> },
}

/// Makes one [`ProcessExecutor`] (one worker process) per tenant.
pub struct ProcessExecutorFactory {
    info: DeviceInfo,
    kind: WorkerKind,
    worker: PathBuf,
    staging_bytes: usize,
    sandbox: Sandbox,
    live: Arc<Mutex<Vec<u32>>>,
    /// The outcome of the first [`ExecutorFactory::check`], kept so that a start-up
    /// check and a later `info` start one worker, not two.
    checked: std::sync::OnceLock<Result<(), String>>,
}

impl ProcessExecutorFactory {
    /// CUDA device `ordinal` in workers, described by and loading the catalog of `cuda`
    /// (a factory for the same device); the worker binary from [`find_worker`].
    pub fn cuda(ordinal: usize, cuda: &CudaExecutorFactory) -> Result<Self, String> {
        let ordinal = u32::try_from(ordinal).map_err(|_| "device ordinal too large")?;
        let kind = WorkerKind::Cuda {
            ordinal,
            catalog_ptx: cuda.catalog_ptx().into(),
        };
        Self::with_kind(cuda.device().clone(), kind)
    }

    /// The CPU reference executor in workers: the whole process path without a GPU.
    pub fn cpu() -> Result<Self, String> {
        Self::with_kind(CpuExecutorFactory::new().device().clone(), WorkerKind::Cpu)
    }

    /// The CPU executor in workers, with one difference: a `fill_u32` launch whose value
    /// is [`SIMULATED_FAULT_VALUE`] is accepted and then fails the next synchronising
    /// call with `LAUNCH_FAILED` (detail 719) and poisons the executor, the way a kernel
    /// that traps does on CUDA. For tests of the fault path without a GPU.
    pub fn cpu_fault_sim() -> Result<Self, String> {
        Self::with_kind(
            CpuExecutorFactory::new().device().clone(),
            WorkerKind::CpuFaultSim,
        )
    }

    fn with_kind(info: DeviceInfo, kind: WorkerKind) -> Result<Self, String> {
        Ok(ProcessExecutorFactory {
            info,
            kind,
            worker: find_worker()?,
            staging_bytes: DEFAULT_STAGING_BYTES,
            sandbox: Sandbox {
                user: WorkerUser::default_for_this_process(),
                ..Sandbox::default()
            },
            live: Arc::default(),
            checked: std::sync::OnceLock::new(),
        })
    }

    /// Confines workers as `sandbox` says instead of the default (the dedicated user when
    /// running as root, seccomp on, default limits).
    pub fn with_sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = sandbox;
        self.checked = std::sync::OnceLock::new();
        self
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Uses this worker binary instead of the one [`find_worker`] found.
    pub fn with_worker(mut self, worker: impl Into<PathBuf>) -> Self {
        self.worker = worker.into();
        self.checked = std::sync::OnceLock::new();
        self
    }

    /// Sets the staging area's size (rounded up to whole pages).
    pub fn with_staging_bytes(mut self, bytes: usize) -> Self {
        self.staging_bytes = bytes.max(MIN_STAGING_BYTES).next_multiple_of(4096);
        self.checked = std::sync::OnceLock::new();
        self
    }

    pub fn worker_path(&self) -> &Path {
        &self.worker
    }

    pub fn staging_bytes(&self) -> usize {
        self.staging_bytes
    }

    /// Process ids of the workers running now.
    pub fn workers(&self) -> Vec<u32> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a worker and stops it again: the binary runs and opens the device.
    pub fn probe(&self) -> Result<(), String> {
        self.spawn().map(drop).map_err(|e| {
            format!(
                "executor worker {} did not start: {}",
                self.worker.display(),
                e.message
            )
        })
    }

    /// Starts a worker and waits until its executor is ready.
    pub fn spawn(&self) -> ExecResult<ProcessExecutor> {
        let internal = |what: &str, e: io::Error| {
            ExecError::new(Status::Internal, 0, format!("executor worker: {what}: {e}"))
        };
        let (parent_sock, child_sock) =
            UnixStream::pair().map_err(|e| internal("socketpair", e))?;
        let child_sock = above_stdio(OwnedFd::from(child_sock)).map_err(|e| internal("fd", e))?;
        let memfd = staging_memfd(self.staging_bytes)
            .and_then(above_stdio)
            .map_err(|e| internal("staging memfd", e))?;
        let staging = Staging::map(memfd.as_raw_fd(), self.staging_bytes)
            .map_err(|e| internal("staging mmap", e))?;

        let (sock_fd, mem_fd) = (child_sock.as_raw_fd(), memfd.as_raw_fd());
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(&self.worker);
        command
            .arg("--socket-fd")
            .arg(sock_fd.to_string())
            .arg("--staging-fd")
            .arg(mem_fd.to_string())
            .arg("--staging-bytes")
            .arg(self.staging_bytes.to_string())
            .args(self.sandbox.args())
            .env_clear()
            .envs(
                WORKER_ENV_KEPT
                    .iter()
                    .filter_map(|&k| std::env::var_os(k).map(|v| (k, v))),
            )
            // No JIT cache: the worker creates no files.
            .env("CUDA_CACHE_DISABLE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (fcntl, prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                // Both fds are close-on-exec in the parent, so no other child inherits
                // them; this child keeps them across its exec.
                for fd in [sock_fd, mem_fd] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Killed when the thread that started it ends (with the mediator).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| internal(&format!("cannot start {}", self.worker.display()), e))?;
        // Only the child holds its ends now: its exit closes the channel.
        drop(child_sock);
        drop(memfd);
        let pid = child.id();
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid);
        let mut exec = ProcessExecutor {
            child,
            pid,
            sock: parent_sock,
            staging,
            poisoned: false,
            lost: None,
            live: self.live.clone(),
            reply: Vec::new(),
            pinned: false,
        };
        exec.start(&self.kind)?;
        log::debug!(
            "executor worker {pid} ready ({}; staging {} MiB{})",
            self.info.name,
            self.staging_bytes >> 20,
            if exec.pinned { ", pinned" } else { "" }
        );
        Ok(exec)
    }
}

impl ExecutorFactory for ProcessExecutorFactory {
    fn device(&self) -> &DeviceInfo {
        &self.info
    }

    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        self.spawn().map(|e| Box::new(e) as Box<dyn Executor>)
    }

    fn worker_process(&self) -> Option<&Path> {
        Some(&self.worker)
    }

    fn check(&self) -> Result<(), String> {
        self.checked.get_or_init(|| self.probe()).clone()
    }
}

/// An executor in a worker process; see the module documentation.
pub struct ProcessExecutor {
    child: Child,
    pid: u32,
    sock: UnixStream,
    staging: Staging,
    /// The worker's executor reported itself poisoned.
    poisoned: bool,
    /// Why the worker is gone, once it is.
    lost: Option<String>,
    live: Arc<Mutex<Vec<u32>>>,
    reply: Vec<u8>,
    pinned: bool,
}

fn exit_description(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

impl ProcessExecutor {
    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the worker page-locked its staging area.
    pub fn staging_pinned(&self) -> bool {
        self.pinned
    }

    /// Sends the start message and reads the ready reply.
    fn start(&mut self, kind: &WorkerKind) -> ExecResult<()> {
        let init = Enc::new(OP_INIT).u32(WIRE_VERSION);
        let init = match kind {
            WorkerKind::Cpu => init.u8(KIND_CPU).u32(0).bytes(&[]),
            WorkerKind::CpuFaultSim => init.u8(KIND_CPU_FAULT_SIM).u32(0).bytes(&[]),
            WorkerKind::Cuda {
                ordinal,
                catalog_ptx,
            } => init.u8(KIND_CUDA).u32(*ordinal).str(catalog_ptx),
        };
        let _ = self.sock.set_read_timeout(Some(START_TIMEOUT));
        let sent = send_frame(self.sock.as_raw_fd(), &init.finish());
        let received = sent.and_then(|()| recv_frame(&mut self.sock, &mut self.reply));
        let _ = self.sock.set_read_timeout(None);
        if let Err(e) = received {
            let e = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                io::Error::new(e.kind(), format!("no answer in {START_TIMEOUT:?}"))
            } else {
                e
            };
            return Err(self.lose("start", e));
        }
        let (_, result, mut rest) = match decode_reply(&self.reply) {
            Ok(r) => r,
            Err(e) => return Err(self.lose("start", e)),
        };
        let pinned = result.map_err(|mut e| {
            e.message = format!("executor worker {}: {}", self.pid, e.message);
            e
        })?;
        self.pinned = pinned != 0;
        if let Ok(name) = rest.str() {
            log::debug!("executor worker {} opened {name}", self.pid);
        }
        Ok(())
    }

    /// Marks the worker lost and returns the `DEVICE_LOST` error for it.
    fn lose(&mut self, during: &str, e: io::Error) -> ExecError {
        if self.lost.is_none() {
            // A worker that closed its end is usually exiting: give it a moment so the
            // report can say how it ended.
            let deadline = Instant::now() + Duration::from_millis(200);
            let status = loop {
                match self.child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    _ => break None,
                }
            };
            let how = status.map_or_else(|| "stopped answering".to_string(), exit_description);
            let why = format!(
                "executor worker {} lost during {during}: {e}; the worker {how}",
                self.pid
            );
            log::error!("{why}");
            self.lost = Some(why);
        }
        self.lost_error()
    }

    fn lost_error(&self) -> ExecError {
        ExecError::new(Status::DeviceLost, 0, self.lost.clone().unwrap_or_default())
    }

    /// One request and its reply.
    fn call(&mut self, what: &str, request: Enc) -> ExecResult<u64> {
        if self.lost.is_some() {
            return Err(self.lost_error());
        }
        let frame = request.finish();
        if frame.len() - 4 > MAX_FRAME {
            // Only a launch with absurdly many or large parameters gets here; every
            // executor refuses those as an invalid argument too.
            return Err(ExecError::new(
                Status::InvalidArgument,
                0,
                format!("{what}: request of {} bytes is too large", frame.len()),
            ));
        }
        if let Err(e) = send_frame(self.sock.as_raw_fd(), &frame) {
            return Err(self.lose(what, e));
        }
        if let Err(e) = recv_frame(&mut self.sock, &mut self.reply) {
            return Err(self.lose(what, e));
        }
        match decode_reply(&self.reply) {
            Ok((poisoned, result, _)) => {
                self.poisoned |= poisoned;
                result
            }
            Err(e) => Err(self.lose(what, e)),
        }
    }

    /// A call whose failure the trait cannot report: the loss or poison still shows in
    /// [`Executor::poisoned`].
    fn call_quiet(&mut self, what: &str, request: Enc) {
        if let Err(e) = self.call(what, request) {
            log::debug!("executor worker {}: {what}: {e}", self.pid);
        }
    }
}

impl Executor for ProcessExecutor {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.call("open_stream", Enc::new(OP_OPEN_STREAM))
            .map(StreamId)
    }

    fn close_stream(&mut self, stream: StreamId) {
        self.call_quiet("close_stream", Enc::new(OP_CLOSE_STREAM).u64(stream.0));
    }

    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        self.call("alloc", Enc::new(OP_ALLOC).u64(bytes))
            .map(BufferId)
    }

    fn free(&mut self, buffer: BufferId) {
        self.call_quiet("free", Enc::new(OP_FREE).u64(buffer.0));
    }

    fn htod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        data: &[u8],
    ) -> ExecResult<()> {
        let mut done = 0;
        loop {
            let n = (data.len() - done).min(self.staging.len);
            self.staging
                .slice_mut(n)
                .copy_from_slice(&data[done..done + n]);
            let request = Enc::new(OP_HTOD)
                .u64(stream.0)
                .u64(dst.0)
                .u64(offset + done as u64)
                .u64(n as u64);
            self.call("htod", request)?;
            done += n;
            if done == data.len() {
                return Ok(());
            }
        }
    }

    fn dtoh(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        out: &mut [u8],
    ) -> ExecResult<()> {
        let mut done = 0;
        loop {
            let n = (out.len() - done).min(self.staging.len);
            let request = Enc::new(OP_DTOH)
                .u64(stream.0)
                .u64(src.0)
                .u64(offset + done as u64)
                .u64(n as u64);
            self.call("dtoh", request)?;
            out[done..done + n].copy_from_slice(self.staging.slice(n));
            done += n;
            if done == out.len() {
                return Ok(());
            }
        }
    }

    fn dtod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        dst_offset: u64,
        src: BufferId,
        src_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let request = Enc::new(OP_DTOD)
            .u64(stream.0)
            .u64(dst.0)
            .u64(dst_offset)
            .u64(src.0)
            .u64(src_offset)
            .u64(len);
        self.call("dtod", request).map(drop)
    }

    fn memset(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    ) -> ExecResult<()> {
        let request = Enc::new(OP_MEMSET)
            .u64(stream.0)
            .u64(dst.0)
            .u64(offset)
            .u64(len)
            .u32(value)
            .u32(width);
        self.call("memset", request).map(drop)
    }

    fn load_module(&mut self, ptx: &str) -> ExecResult<ModuleId> {
        // The worker's executor applies its own size limit; this one keeps the frame
        // within what the worker reads.
        if ptx.len() > MAX_PTX_BYTES as usize {
            return Err(ExecError::new(
                Status::InvalidArgument,
                0,
                format!(
                    "PTX of {} bytes exceeds the {MAX_PTX_BYTES}-byte limit",
                    ptx.len()
                ),
            ));
        }
        self.call("load_module", Enc::new(OP_LOAD_MODULE).str(ptx))
            .map(ModuleId)
    }

    fn unload_module(&mut self, module: ModuleId) {
        self.call_quiet("unload_module", Enc::new(OP_UNLOAD_MODULE).u64(module.0));
    }

    fn launch(
        &mut self,
        stream: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()> {
        let mut request = Enc::new(OP_LAUNCH).u64(stream.0);
        request = match kernel {
            KernelRef::Builtin(spec) => request.u8(KERNEL_BUILTIN).str(spec.name),
            KernelRef::Module(module, name) => request.u8(KERNEL_MODULE).u64(module.0).str(name),
        };
        for v in shape.grid.into_iter().chain(shape.block) {
            request = request.u32(v);
        }
        request = request.u32(shape.shared_bytes).u32(params.len() as u32);
        for p in params {
            request = match p {
                ExecParam::Value(v) => request.u8(PARAM_VALUE).bytes(v),
                ExecParam::Buffer(b) => request.u8(PARAM_BUFFER).u64(b.0),
            };
        }
        self.call("launch", request).map(drop)
    }

    fn sync(&mut self, stream: StreamId) -> ExecResult<()> {
        self.call("sync", Enc::new(OP_SYNC).u64(stream.0)).map(drop)
    }

    fn poisoned(&self) -> bool {
        self.poisoned || self.lost.is_some()
    }
}

impl Drop for ProcessExecutor {
    fn drop(&mut self) {
        let healthy = self.lost.is_none() && !self.poisoned;
        let asked =
            healthy && send_frame(self.sock.as_raw_fd(), &Enc::new(OP_EXIT).finish()).is_ok();
        let mut status = None;
        if asked {
            let deadline = Instant::now() + EXIT_GRACE;
            let mut nap = Duration::from_micros(100);
            loop {
                match self.child.try_wait() {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(nap);
                        nap = (nap * 2).min(Duration::from_millis(10));
                    }
                    _ => {
                        log::warn!(
                            "executor worker {} did not exit within {EXIT_GRACE:?}; killing it",
                            self.pid
                        );
                        break;
                    }
                }
            }
        }
        if status.is_none() {
            // Already exited: kill does nothing harmful; wait reaps it either way.
            let _ = self.child.kill();
            status = self.child.wait().ok();
        }
        if let Some(s) = status {
            log::debug!("executor worker {} {}", self.pid, exit_description(s));
        }
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != self.pid);
    }
}

// ---------------------------------------------------------------------------------------
// Worker side

/// The executor a worker serves.
enum Hosted {
    Plain(Box<dyn Executor>),
    Cuda {
        exec: Box<CudaExecutor>,
        registered: Option<*mut c_void>,
    },
}

impl Hosted {
    fn exec(&mut self) -> &mut dyn Executor {
        match self {
            Hosted::Plain(e) => e.as_mut(),
            Hosted::Cuda { exec, .. } => exec.as_mut(),
        }
    }

    /// Releases the staging registration (before the mapping goes), then the executor.
    fn shut_down(self) {
        if let Hosted::Cuda {
            mut exec,
            registered: Some(ptr),
        } = self
        {
            // SAFETY: `ptr` is what register_host registered in this executor.
            if let Err(e) = unsafe { exec.unregister_host(ptr) } {
                log::debug!("staging area: {e}");
            }
        }
    }
}

/// Opens the executor the start message asks for.
fn open_executor(kind: u8, ordinal: u32, ptx: &str, staging: &Staging) -> ExecResult<Hosted> {
    match kind {
        KIND_CPU => Ok(Hosted::Plain(Box::new(CpuExecutor::default()))),
        KIND_CPU_FAULT_SIM => Ok(Hosted::Plain(Box::new(FaultSim::default()))),
        KIND_CUDA => {
            let factory = CudaExecutorFactory::from_ptx(ordinal as usize, ptx)
                .map_err(|e| ExecError::new(Status::Internal, 0, e))?;
            let mut exec = factory.create_executor()?;
            // SAFETY: the staging mapping outlives the executor: `serve` shuts the
            // executor down (unregistering first) before the mapping is dropped.
            let registered = match unsafe { exec.register_host(staging.as_ptr(), staging.len) } {
                Ok(()) => Some(staging.as_ptr()),
                Err(e) => {
                    log::warn!(
                        "executor worker {}: staging area not page-locked ({e}); copies use pageable memory",
                        std::process::id()
                    );
                    None
                }
            };
            Ok(Hosted::Cuda {
                exec: Box::new(exec),
                registered,
            })
        }
        other => Err(ExecError::new(
            Status::Internal,
            0,
            format!("unknown executor kind {other}"),
        )),
    }
}

/// What a worker does to itself once its executor is open (see [`crate::sandbox`]).
#[derive(Clone, Debug)]
pub struct WorkerConfinement {
    pub seccomp: bool,
    pub jit_cpu_seconds: u64,
}

/// Serves one executor to the parent over the inherited socket `socket_fd`, with the
/// inherited staging memfd `staging_fd` of `staging_bytes`. Returns when the parent asks
/// the worker to exit or closes the socket. This is `vgpu-executor-worker`'s body.
pub fn serve(
    socket_fd: RawFd,
    staging_fd: RawFd,
    staging_bytes: usize,
    confinement: &WorkerConfinement,
) -> Result<(), String> {
    for (fd, what) in [(socket_fd, "--socket-fd"), (staging_fd, "--staging-fd")] {
        // SAFETY: only queries the fd's flags.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("{what} {fd} is not an open file descriptor"));
        }
    }
    if socket_fd == staging_fd {
        return Err("--socket-fd and --staging-fd are the same".into());
    }
    // SAFETY: both fds were inherited for this process alone and are owned from here on.
    let (mut sock, memfd) = unsafe {
        (
            UnixStream::from_raw_fd(socket_fd),
            OwnedFd::from_raw_fd(staging_fd),
        )
    };
    if staging_bytes < MIN_STAGING_BYTES {
        return Err(format!("--staging-bytes {staging_bytes} is too small"));
    }
    let mut staging = Staging::map(memfd.as_raw_fd(), staging_bytes)
        .map_err(|e| format!("cannot map the staging area: {e}"))?;
    drop(memfd);
    let fd = sock.as_raw_fd();
    let mut frame = Vec::new();

    recv_frame(&mut sock, &mut frame).map_err(|e| format!("no start message: {e}"))?;
    let opened = (|| {
        let mut d = Dec(&frame);
        let bad = |_| ExecError::new(Status::Internal, 0, "malformed start message");
        if d.u8().map_err(bad)? != OP_INIT {
            return Err(ExecError::new(
                Status::Internal,
                0,
                "expected a start message",
            ));
        }
        let version = d.u32().map_err(bad)?;
        if version != WIRE_VERSION {
            return Err(ExecError::new(
                Status::Internal,
                0,
                format!("message version {version}, this worker speaks {WIRE_VERSION}"),
            ));
        }
        let kind = d.u8().map_err(bad)?;
        let ordinal = d.u32().map_err(bad)?;
        let ptx = d.str().map_err(bad)?;
        open_executor(kind, ordinal, ptx, &staging)
    })();
    // The executor is open (the driver initialised with trusted input); from here on
    // everything is the guest's, so the allow-list goes on before the first request.
    let opened = opened.and_then(|h| {
        if confinement.seccomp {
            crate::sandbox::install_seccomp()
                .map_err(|e| ExecError::new(Status::Internal, 0, e))?;
        }
        Ok(h)
    });
    let mut hosted = match opened {
        Ok(h) => h,
        Err(e) => {
            let _ = send_frame(fd, &encode_reply(false, &Err(e.clone())).finish());
            return Err(format!("cannot open the executor: {e}"));
        }
    };
    let pinned = matches!(
        hosted,
        Hosted::Cuda {
            registered: Some(_),
            ..
        }
    );
    let info = match &hosted {
        Hosted::Cuda { .. } => "CUDA",
        Hosted::Plain(_) => "CPU",
    };
    let ready = encode_reply(false, &Ok(u64::from(pinned))).str(info);
    send_frame(fd, &ready.finish()).map_err(|e| format!("cannot answer the parent: {e}"))?;

    let result = loop {
        if let Err(e) = recv_frame(&mut sock, &mut frame) {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(()) // the parent closed the channel: nothing left to serve
            } else {
                Err(format!("receiving: {e}"))
            };
        }
        let (result, exit) = match handle(hosted.exec(), &mut staging, &frame, confinement) {
            Ok(Some(result)) => (result, false),
            Ok(None) => (Ok(0), true),
            Err(e) => (
                Err(ExecError::new(
                    Status::Internal,
                    0,
                    format!("executor worker: {e}"),
                )),
                false,
            ),
        };
        let reply = encode_reply(hosted.exec().poisoned(), &result);
        if let Err(e) = send_frame(fd, &reply.finish()) {
            break Err(format!("answering: {e}"));
        }
        if exit {
            break Ok(());
        }
    };
    hosted.shut_down();
    drop(staging);
    result
}

/// Runs one request; `Ok(None)` for the exit request.
fn handle(
    exec: &mut dyn Executor,
    staging: &mut Staging,
    frame: &[u8],
    confinement: &WorkerConfinement,
) -> io::Result<Option<ExecResult<u64>>> {
    let mut d = Dec(frame);
    let op = d.u8()?;
    let capacity = staging.len;
    let staged = |len: u64| -> io::Result<usize> {
        usize::try_from(len)
            .ok()
            .filter(|&n| n <= capacity)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "copy larger than the staging area",
                )
            })
    };
    let result = match op {
        OP_OPEN_STREAM => exec.open_stream().map(|s| s.0),
        OP_CLOSE_STREAM => {
            exec.close_stream(StreamId(d.u64()?));
            Ok(0)
        }
        OP_ALLOC => exec.alloc(d.u64()?).map(|b| b.0),
        OP_FREE => {
            exec.free(BufferId(d.u64()?));
            Ok(0)
        }
        OP_HTOD => {
            let (stream, dst, offset) = (StreamId(d.u64()?), BufferId(d.u64()?), d.u64()?);
            let n = staged(d.u64()?)?;
            exec.htod(stream, dst, offset, staging.slice(n)).map(|()| 0)
        }
        OP_DTOH => {
            let (stream, src, offset) = (StreamId(d.u64()?), BufferId(d.u64()?), d.u64()?);
            let n = staged(d.u64()?)?;
            exec.dtoh(stream, src, offset, staging.slice_mut(n))
                .map(|()| 0)
        }
        OP_DTOD => {
            let (stream, dst, dst_offset) = (StreamId(d.u64()?), BufferId(d.u64()?), d.u64()?);
            let (src, src_offset, len) = (BufferId(d.u64()?), d.u64()?, d.u64()?);
            exec.dtod(stream, dst, dst_offset, src, src_offset, len)
                .map(|()| 0)
        }
        OP_MEMSET => {
            let (stream, dst, offset, len) =
                (StreamId(d.u64()?), BufferId(d.u64()?), d.u64()?, d.u64()?);
            let (value, width) = (d.u32()?, d.u32()?);
            exec.memset(stream, dst, offset, len, value, width)
                .map(|()| 0)
        }
        OP_LOAD_MODULE => {
            let ptx = d.str()?;
            let _limit = crate::sandbox::JitCpuLimit::arm(confinement.jit_cpu_seconds);
            exec.load_module(ptx).map(|m| m.0)
        }
        OP_UNLOAD_MODULE => {
            exec.unload_module(ModuleId(d.u64()?));
            Ok(0)
        }
        OP_LAUNCH => {
            let stream = StreamId(d.u64()?);
            let kernel = match d.u8()? {
                KERNEL_BUILTIN => {
                    let name = d.str()?;
                    match vgpu_kernels::find(name) {
                        Some(spec) => Ok(KernelRef::Builtin(spec)),
                        None => Err(ExecError::new(
                            Status::KernelNotFound,
                            0,
                            format!("no built-in kernel '{name}'"),
                        )),
                    }
                }
                KERNEL_MODULE => {
                    let module = ModuleId(d.u64()?);
                    Ok(KernelRef::Module(module, d.str()?))
                }
                _ => return Err(malformed()),
            };
            let mut dims = [0u32; 6];
            for v in &mut dims {
                *v = d.u32()?;
            }
            let shape = LaunchShape {
                grid: [dims[0], dims[1], dims[2]],
                block: [dims[3], dims[4], dims[5]],
                shared_bytes: d.u32()?,
            };
            let count = d.u32()? as usize;
            let mut params = Vec::with_capacity(count.min(1024));
            for _ in 0..count {
                params.push(match d.u8()? {
                    PARAM_VALUE => ExecParam::Value(d.bytes()?.to_vec()),
                    PARAM_BUFFER => ExecParam::Buffer(BufferId(d.u64()?)),
                    _ => return Err(malformed()),
                });
            }
            kernel.and_then(|k| exec.launch(stream, k, &shape, &params).map(|()| 0))
        }
        OP_SYNC => exec.sync(StreamId(d.u64()?)).map(|()| 0),
        OP_EXIT => return Ok(None),
        _ => return Err(malformed()),
    };
    Ok(Some(result))
}

/// The CPU executor with a simulated device fault; see
/// [`ProcessExecutorFactory::cpu_fault_sim`].
#[derive(Default)]
struct FaultSim {
    inner: CpuExecutor,
    pending: bool,
    poisoned: bool,
}

impl FaultSim {
    fn check(&mut self) -> ExecResult<()> {
        if self.pending || self.poisoned {
            self.pending = false;
            self.poisoned = true;
            return Err(ExecError::new(
                Status::LaunchFailed,
                SIMULATED_FAULT_DETAIL,
                "simulated device fault: CUDA_ERROR_LAUNCH_FAILED",
            ));
        }
        Ok(())
    }
}

impl Executor for FaultSim {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.check()?;
        self.inner.open_stream()
    }
    fn close_stream(&mut self, stream: StreamId) {
        self.inner.close_stream(stream)
    }
    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        self.check()?;
        self.inner.alloc(bytes)
    }
    fn free(&mut self, buffer: BufferId) {
        self.inner.free(buffer)
    }
    fn htod(&mut self, s: StreamId, dst: BufferId, offset: u64, data: &[u8]) -> ExecResult<()> {
        self.check()?;
        self.inner.htod(s, dst, offset, data)
    }
    fn dtoh(&mut self, s: StreamId, src: BufferId, offset: u64, out: &mut [u8]) -> ExecResult<()> {
        self.check()?;
        self.inner.dtoh(s, src, offset, out)
    }
    fn dtod(
        &mut self,
        s: StreamId,
        dst: BufferId,
        dst_offset: u64,
        src: BufferId,
        src_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        self.check()?;
        self.inner.dtod(s, dst, dst_offset, src, src_offset, len)
    }
    fn memset(
        &mut self,
        s: StreamId,
        dst: BufferId,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    ) -> ExecResult<()> {
        self.check()?;
        self.inner.memset(s, dst, offset, len, value, width)
    }
    fn load_module(&mut self, ptx: &str) -> ExecResult<ModuleId> {
        self.check()?;
        self.inner.load_module(ptx)
    }
    fn unload_module(&mut self, module: ModuleId) {
        self.inner.unload_module(module)
    }
    fn launch(
        &mut self,
        s: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()> {
        self.check()?;
        let trap = matches!(kernel, KernelRef::Builtin(spec) if spec.name == "fill_u32")
            && params.get(1)
                == Some(&ExecParam::Value(
                    SIMULATED_FAULT_VALUE.to_le_bytes().to_vec(),
                ));
        if trap {
            self.pending = true;
            return Ok(());
        }
        self.inner.launch(s, kernel, shape, params)
    }
    fn sync(&mut self, s: StreamId) -> ExecResult<()> {
        self.check()?;
        self.inner.sync(s)
    }
    fn poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_truncation_is_malformed() {
        let frame = Enc::new(OP_LAUNCH)
            .u64(7)
            .str("k")
            .bytes(&[1, 2])
            .u32(9)
            .finish();
        assert_eq!(
            u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        let mut d = Dec(&frame[4..]);
        assert_eq!(d.u8().unwrap(), OP_LAUNCH);
        assert_eq!(d.u64().unwrap(), 7);
        assert_eq!(d.str().unwrap(), "k");
        assert_eq!(d.bytes().unwrap(), &[1, 2]);
        assert_eq!(d.u32().unwrap(), 9);
        assert!(d.u8().is_err());
        let mut short = Dec(&frame[4..8]);
        short.u8().unwrap();
        assert!(short.u64().is_err());
    }

    #[test]
    fn replies_carry_the_error_and_the_poisoned_flag() {
        let e = ExecError::new(Status::OutOfRange, 3, "past the end");
        let frame = encode_reply(true, &Err(e.clone())).finish();
        let (poisoned, result, _) = decode_reply(&frame[4..]).unwrap();
        assert!(poisoned);
        assert_eq!(result, Err(e));
        let frame = encode_reply(false, &Ok(42)).str("x").finish();
        let (poisoned, result, mut rest) = decode_reply(&frame[4..]).unwrap();
        assert_eq!((poisoned, result), (false, Ok(42)));
        assert_eq!(rest.str().unwrap(), "x");
    }

    #[test]
    fn the_worker_is_found_by_env_then_beside_the_exe_then_on_path() {
        let dir = std::env::temp_dir().join(format!("vgpu-locate-{}", std::process::id()));
        let deps = dir.join("target/debug/deps");
        let bin = dir.join("bin");
        std::fs::create_dir_all(&deps).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let make = |p: &Path| {
            std::fs::write(p, b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let exe = deps.join("tests-123");
        let path = Some(bin.clone().into_os_string());
        assert!(locate_worker(None, Some(&exe), path.clone()).is_err());

        make(&bin.join(WORKER_BINARY));
        assert_eq!(
            locate_worker(None, Some(&exe), path.clone()).unwrap(),
            bin.join(WORKER_BINARY)
        );
        let built = dir.join("target/debug").join(WORKER_BINARY);
        make(&built);
        assert_eq!(
            locate_worker(None, Some(&exe), path.clone()).unwrap(),
            built
        );
        make(&deps.join(WORKER_BINARY));
        assert_eq!(
            locate_worker(None, Some(&exe), path.clone()).unwrap(),
            deps.join(WORKER_BINARY)
        );
        let named = bin.join(WORKER_BINARY).into_os_string();
        assert_eq!(
            locate_worker(Some(named), Some(&exe), path.clone()).unwrap(),
            bin.join(WORKER_BINARY)
        );
        let missing = dir.join("nope").into_os_string();
        let e = locate_worker(Some(missing), Some(&exe), path).unwrap_err();
        assert!(e.starts_with(WORKER_ENV), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
