// SPDX-License-Identifier: Apache-2.0
//! Executors in worker processes: each executor runs in its own `vgpu-executor-worker`
//! process, so a kernel that faults takes down that process's CUDA context only.
//! (Separate contexts in one process do not contain a fault: after a kernel traps, every
//! context of the process fails.)
//!
//! [`ProcessExecutorFactory::create`] hands out a [`ProcessExecutor`] whose worker is
//! already running (from the pool, below) or starts one. The executor forwards every
//! [`Executor`] call to its worker:
//!
//! - **Channel.** A unix stream socketpair; the worker inherits its end. Each message is a
//!   frame: a little-endian `u32` length (at most `MAX_FRAME`, the largest PTX plus
//!   64 KiB), then the message encoded with postcard. The parent sends `ToWorker`
//!   messages (`Init`, then one per executor operation, and `Exit`); the worker answers
//!   `Init` with `Ready` (or `StartFailed`) and every later request with exactly one
//!   `Reply`, in request order: the worker's [`Executor::poisoned`] flag and either a
//!   `u64` value or the [`ExecError`] (status, detail, message) exactly as the executor
//!   made it. A frame that does not decode, or has bytes left over, is an
//!   `io::ErrorKind::InvalidData` error. `Init` is always variant 0 with the message
//!   version (`WIRE_VERSION`) as its first field, so a worker tells a parent of another
//!   version apart from a malformed message and refuses it.
//! - **Device memory.** What the worker's executor holds on the device comes back with
//!   the answers, so that the mediator charges it without extra round trips: `Ready`
//!   carries the context's bytes ([`Executor::context_bytes`]; for CUDA what the parent
//!   measured and sent in `Init`) and the local memory reservation of every built-in
//!   kernel; a module load is answered with a `Module` reply (in request order like any
//!   `Reply`) carrying the module's bytes and its kernels' local memory reservations. A
//!   kernel not reported there is asked about once, with a `LocalReservation` request
//!   that waits ([`Executor::local_reservation`]); launches never wait. Allocation
//!   footprints follow from the executor kind ([`crate::cuda::alloc_footprint`] for CUDA).
//! - **Pipelining.** Requests whose result the caller does not need at once — `launch`,
//!   `memset`, `dtod`, `htod`, `free`, `unload_module`, `close_stream` — are sent and the
//!   call returns without waiting for the reply. The parent keeps the unanswered requests
//!   in a FIFO and reads their replies lazily, in order:
//!   - A call that needs a value waits. `alloc`, `open_stream` and `load_module` first
//!     read every earlier reply and, if one of those reported an error, return that error
//!     without sending their own request (so nothing is created that the caller would
//!     never learn of); `sync` and `dtoh` send their request at once and then read every
//!     reply up to their own.
//!   - The first error of a request that was not waited for is kept and returned as the
//!     `Err` of the next call that waits, in preference to that call's own result: "an
//!     asynchronous failure surfaces as an `Err` from a later call". Later errors of
//!     requests not waited for, before that call, are only logged (at debug level).
//!   - The poisoned flag is taken from every reply read, so [`Executor::poisoned`] turns
//!     true once the reply that says so has been read (at the latest by the next call
//!     that waits).
//!   - At most [`MAX_IN_FLIGHT`] requests are unanswered; a call that would exceed that
//!     first reads the oldest replies.
//!   - A lost worker turns every call into `DEVICE_LOST`, the calls that do not wait
//!     included, from the moment the loss is seen: a send that fails, or the channel
//!     ending while a reply is read.
//!
//!   Neither side can block the other forever. The worker reads requests in bulk (as many
//!   as have arrived, with the files that came with them), runs them in order, and writes
//!   replies with a blocking send: at once after a request someone may wait for, and for
//!   `launch`, `memset`, `dtod`, `free`, `unload_module` and `close_stream` together,
//!   before it would block for more requests (or once 64 KiB of them wait), so a burst
//!   of launches costs one system call per batch, not three per launch. The parent writes without
//!   blocking: when the socket is full it waits until it is writable *or* readable, and
//!   reads whatever replies have arrived into its own buffer (bounded by
//!   [`MAX_IN_FLIGHT`] replies) before trying again. So the worker's reply writes always
//!   drain while the parent sends, the worker keeps reading requests, and the parent's
//!   send completes. The parent blocks on the socket only to read a reply to a request
//!   it has sent in full, and the worker answers every request it receives.
//! - **Staging.** Copy data does not go through the socket: the parent creates a memfd
//!   (64 MiB by default), both processes map it `MAP_SHARED`, and requests name a region
//!   of it (offset and length). The area is a ring of regions handed out in request order
//!   and released in the same order: a copy is split into pieces of at most 1/8 of the
//!   area (region starts aligned to 256 bytes), and consecutive pieces take consecutive
//!   regions, wrapping at the end. An HTOD piece is written into its region before its
//!   request is sent, and the call returns once every piece is sent, so the parent copies
//!   piece k+1 while the worker copies piece k to the device. The worker replies to an
//!   HTOD only once the bytes have left staging (the CPU executor copies at once; from
//!   page-locked staging the CUDA executor enqueues the copy, records a CUDA event after
//!   it and goes on with the next requests, and the worker waits for those events —
//!   not for the whole stream — before it sends the HTODs' replies), so a region is free again once
//!   the reply of the request that used it has been read; when the ring is full the
//!   parent reads replies until the oldest region is free. A DTOH sends piece requests
//!   into distinct regions for as long as the ring has room, before reading any reply;
//!   as each reply arrives (in order) it copies that piece out of staging, which frees
//!   the region for the next piece, and it returns after the last. The CUDA worker page-locks
//!   the area (`cuMemHostRegister`), so those copies run at pinned speed; if the driver
//!   refuses, it logs that and copies from pageable memory.
//! - **Start.** The parent sends the executor kind and, for CUDA, the catalog PTX it
//!   compiled, so a worker needs no NVRTC; the worker answers with the executor it
//!   opened. The worker is killed if the thread that started it ends
//!   (`PR_SET_PDEATHSIG`), and exits when its socket closes.
//! - **Pool.** [`ProcessExecutorFactory::with_pool`] keeps up to `n` workers started
//!   (process running, executor open, `Ready` read) so that `create` takes one at once;
//!   CUDA factories keep [`DEFAULT_CUDA_POOL`], the CPU ones none. One long-lived thread
//!   of the factory starts them all — because `PR_SET_PDEATHSIG` fires when the thread
//!   that started a worker ends, a worker from the pool lives at most as long as that
//!   thread, which is as long as the factory. The thread starts at the first `create`
//!   (or [`ProcessExecutorFactory::start_pool`]), refills the pool whenever `create`
//!   takes a worker, and retries a worker that does not start with a growing delay
//!   (100 ms up to 30 s). Before handing a pooled worker out, `create` checks that the
//!   process is still running and that its socket is quiet (no hang-up, nothing unasked);
//!   a dead one is discarded (killed and reaped) and the next one taken, and with the
//!   pool empty `create` starts a worker on the calling thread exactly as without a pool.
//!   Dropping the factory (or reconfiguring it) stops the thread, which first gives up a
//!   worker it is starting, then stops and reaps every idle worker of the pool.
//! - **Loss.** When the worker dies or the channel breaks, every call returns
//!   `DEVICE_LOST` and [`Executor::poisoned`] turns true; the mediator then drops the
//!   executor and the next session starts a new worker. A worker whose executor reports
//!   itself poisoned (a sticky CUDA error) is dropped the same way.
//! - **Stop.** Dropping a [`ProcessExecutor`] asks a healthy worker to exit (the worker
//!   finishes the requests before that first), reads and drops the replies still coming
//!   while it waits up to [`EXIT_GRACE`], then kills it; a lost or poisoned one is killed
//!   at once. The child is always reaped.
//! - **Watchdog.** Every wait for the worker — for a reply, or for room in the socket to
//!   send — has a deadline: the kernel timeout
//!   ([`ProcessExecutorFactory::with_kernel_timeout`], [`DEFAULT_KERNEL_TIMEOUT`]) from
//!   when the wait began. A kernel that runs past it (its launch unanswered, or the SYNC
//!   or DTOH after it) gets its worker killed: the call and every later one return
//!   `DEVICE_LOST` with detail [`TIMEOUT_DETAIL`], and [`Executor::poisoned`] turns true.
//!   The deadline bounds one wait, so the work a SYNC waits for (everything queued on
//!   the stream before it, for CUDA) must finish within it.
//! - **Killer.** [`Executor::killer`] hands out a [`Killer`] that ends the worker from
//!   any thread, while the executor's own thread is blocked in a call on it (a VM reset
//!   does this): it sends `SIGKILL` to the worker and shuts the parent's end of the
//!   socket down, so the blocked call returns at once with `DEVICE_LOST` (detail
//!   [`TIMEOUT_DETAIL`] for a timeout, 0 otherwise), as does every later call. The pid is
//!   signalled only while the child has not been reaped: reaping and killing take the
//!   same lock, so a pid the system may have reused is never signalled.
//!
//! A kernel that never finishes blocks its worker, and with it the thread that calls into
//! it: at the next call that waits, or at the first call once the socket is full or
//! [`MAX_IN_FLIGHT`] requests are unanswered, until the kernel timeout (or a
//! [`Killer`]) ends the worker. Other executors are not affected. Dropping an executor
//! whose worker is stuck gives up after [`EXIT_GRACE`] and kills the worker; dropping one
//! that was killed does not wait.
//!
//! The worker binary is found by [`find_worker`].

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_void, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vgpu_kernels::LaunchShape;
use vgpu_protocol::{
    FunctionInfo, Status, MAX_COMPILE_OPTIONS_BYTES, MAX_COMPILE_OUTPUT_BYTES,
    MAX_MODULE_IMAGE_BYTES, MAX_PTX_BYTES,
};

use crate::cpu::{CpuExecutor, CpuExecutorFactory};
use crate::cuda::{CudaExecutor, CudaExecutorFactory, DeviceTimer};
use crate::executor::{
    guest_fault, BufferId, CompileOutput, DeviceInfo, DeviceMeter, ExecError, ExecParam,
    ExecResult, Executor, ExecutorFactory, GuestSink, GuestSource, KernelRef, Killer, MeterReading,
    ModuleId, SetupError, StreamId, TIMEOUT_DETAIL,
};
use crate::hostmap::{FilePiece, HostMapping};
use crate::messages::{as_bytes, WireAnswer, WireError, WireKernel, WireParam};
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
    "VGPU_UNIT_LINGER_US",
];
/// The worker binary's file name.
pub const WORKER_BINARY: &str = "vgpu-executor-worker";
/// Default size of a worker's staging area for copies.
pub const DEFAULT_STAGING_BYTES: usize = 64 << 20;
/// How long a starting worker may take to open its device and answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a healthy worker may take to exit when its executor is dropped.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Default of [`ProcessExecutorFactory::with_kernel_timeout`]: the longest a call waits
/// for its worker (a reply, or room to send) before the worker is killed.
pub const DEFAULT_KERNEL_TIMEOUT: Duration = Duration::from_secs(600);
/// Most requests an executor has sent without having read their replies.
pub const MAX_IN_FLIGHT: usize = 256;
/// How many started workers a CUDA factory keeps ready by default.
pub const DEFAULT_CUDA_POOL: usize = 2;

/// Version of the parent-worker messages; a worker refuses a parent of another version.
const WIRE_VERSION: u32 = 4;
/// Largest frame either side accepts: a module load of the largest PTX or binary image,
/// a compilation's source and options, or its output, with room for the rest of the
/// message.
const MAX_FRAME: usize = max_usize(
    max_usize(MAX_PTX_BYTES as usize, MAX_MODULE_IMAGE_BYTES as usize),
    max_usize(
        MAX_PTX_BYTES as usize + MAX_COMPILE_OPTIONS_BYTES as usize,
        MAX_COMPILE_OUTPUT_BYTES as usize,
    ),
) + (64 << 10);

const fn max_usize(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}
/// Smallest staging area (one page).
const MIN_STAGING_BYTES: usize = 4096;
/// A copy is split into pieces of at most this fraction of the staging area.
const STAGING_PIECES: usize = 8;
/// Staging regions start at multiples of this many bytes.
const STAGING_ALIGN: usize = 256;
/// First and longest wait before the pool tries again to start a worker that failed.
const POOL_RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

/// `CUDA_ERROR_NOT_FOUND`: what a launch of a kernel a module lacks reports.
const CUDA_ERROR_NOT_FOUND: u32 = 500;
/// The CUDA error number a simulated device fault reports (`CUDA_ERROR_LAUNCH_FAILED`).
const SIMULATED_FAULT_DETAIL: u32 = 719;
/// The `fill_u32` value that makes the fault-simulating CPU executor fault.
pub const SIMULATED_FAULT_VALUE: u32 = 0xdead;

// ---------------------------------------------------------------------------------------
// Finding the worker

/// The worker binary: `$VGPU_EXECUTOR_WORKER` if set (it must exist), else
/// `vgpu-executor-worker` beside the running executable (for a cargo test binary in
/// `target/<profile>/deps/`, also in `target/<profile>/`), else the first on `$PATH`.
pub fn find_worker() -> Result<PathBuf, SetupError> {
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
) -> Result<PathBuf, SetupError> {
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(value);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(SetupError::Worker(format!(
                "{WORKER_ENV}={} is not an executable file",
                p.display()
            )))
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
            SetupError::Worker(format!(
                "no {WORKER_BINARY} found (beside the executable, on PATH, or named by {WORKER_ENV})"
            ))
        })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// ---------------------------------------------------------------------------------------
// Messages

/// Which executor a worker opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum WireKind {
    Cpu,
    CpuFaultSim,
    Cuda,
}

/// Where a copy's bytes lie in the staging area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    at: u64,
    len: u64,
}

/// What the parent sends. Byte strings are borrowed from the frame they arrive in.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum ToWorker<'a> {
    /// The first message. Stays variant 0 with `version` as its first field in every
    /// version (see `serve`).
    Init {
        version: u32,
        kind: WireKind,
        ordinal: u32,
        catalog_ptx: &'a str,
        /// Device memory each CUDA context is charged, as the parent measured it.
        context_bytes: u64,
    },
    OpenStream,
    CloseStream {
        stream: u64,
    },
    Alloc {
        bytes: u64,
    },
    Free {
        buffer: u64,
    },
    Htod {
        stream: u64,
        dst: u64,
        offset: u64,
        staged: Staged,
    },
    Dtoh {
        stream: u64,
        src: u64,
        offset: u64,
        staged: Staged,
    },
    Dtod {
        stream: u64,
        dst: u64,
        dst_offset: u64,
        src: u64,
        src_offset: u64,
        len: u64,
    },
    Memset {
        stream: u64,
        dst: u64,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    },
    LoadModule {
        ptx: &'a str,
    },
    UnloadModule {
        module: u64,
    },
    Launch {
        stream: u64,
        #[serde(borrow)]
        kernel: WireKernel<'a>,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        #[serde(borrow)]
        params: Vec<WireParam<'a>>,
    },
    Sync {
        stream: u64,
    },
    /// Answered, then the worker exits.
    Exit,
    /// Maps host buffer `id`: `files` memory files arrive with this message
    /// (`SCM_RIGHTS`), and `pieces` say which bytes of which file hold it, in order:
    /// (file index, offset, length).
    RegisterHost {
        id: u64,
        files: u32,
        pieces: Vec<(u32, u64, u64)>,
    },
    UnregisterHost {
        id: u64,
    },
    HtodHost {
        stream: u64,
        dst: u64,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    },
    DtohHost {
        stream: u64,
        src: u64,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    },
    /// The device bytes a launch of `kernel` makes the driver reserve for local memory
    /// ([`Executor::local_reservation`]), for a kernel the parent has no number for.
    LocalReservation {
        #[serde(borrow)]
        kernel: WireKernel<'a>,
    },
    /// [`Executor::load_module_image`]; answered with `Module`.
    LoadModuleImage {
        #[serde(serialize_with = "as_bytes", borrow)]
        image: &'a [u8],
    },
    /// [`Executor::device_attributes`]; answered with `Answer`.
    DeviceAttributes {
        count: u32,
    },
    /// [`Executor::function_info`]; answered with `Answer`.
    FunctionInfo {
        #[serde(borrow)]
        kernel: WireKernel<'a>,
    },
    /// [`Executor::module_global`]; answered with `Answer`.
    ModuleGlobal {
        module: u64,
        name: &'a str,
    },
    /// [`Executor::compile`]; answered with `Answer`.
    Compile {
        source: &'a str,
        #[serde(borrow)]
        options: Vec<&'a str>,
        out_len: u32,
    },
}

/// What the worker sends.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum FromWorker {
    /// The answer to `Init`: the executor is open.
    Ready {
        /// The driver page-locked the staging area.
        pinned: bool,
        /// Which executor the worker opened, for the log.
        executor: String,
        /// [`Executor::context_bytes`].
        context_bytes: u64,
        /// [`Executor::local_reservation`] of each built-in kernel, by name.
        builtin_locals: Vec<(String, u64)>,
    },
    /// The answer to `Init`: no executor could be opened; the worker exits.
    StartFailed { error: WireError },
    /// The answer to any later request, in request order.
    Reply {
        poisoned: bool,
        result: Result<u64, WireError>,
    },
    /// The answer to `LoadModule` and `LoadModuleImage` (in request order like `Reply`):
    /// the module with what it holds on the device.
    Module {
        poisoned: bool,
        result: Result<WireModule, WireError>,
    },
    /// The answer to a request that asks for more than a number (in request order like
    /// `Reply`).
    Answer {
        poisoned: bool,
        result: Result<WireAnswer, WireError>,
    },
}

/// A loaded module: its id, [`Executor::module_bytes`], and
/// [`Executor::local_reservation`] of each of its kernels the worker could read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct WireModule {
    id: u64,
    bytes: u64,
    locals: Vec<(String, u64)>,
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed executor message")
}

/// Replaces `frame` with the frame of `msg`: its length (filled in even when it exceeds
/// `MAX_FRAME`; the caller checks), then its bytes.
fn encode<T: Serialize>(msg: &T, frame: &mut Vec<u8>) -> io::Result<()> {
    let mut out = std::mem::take(frame);
    out.clear();
    out.extend_from_slice(&[0; 4]);
    let mut out =
        postcard::to_extend(msg, out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_le_bytes());
    *frame = out;
    Ok(())
}

/// The message in one frame's payload, which it must fill exactly.
fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> io::Result<T> {
    match postcard::take_from_bytes(payload) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(malformed()),
    }
}

/// Sends a whole frame, blocking; never raises SIGPIPE. (The worker's way of sending.)
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

/// `poll` on one fd; the events that occurred, 0 on timeout (`timeout_ms` < 0: none).
fn poll_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            return Ok(if r == 0 { 0 } else { p.revents });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The `poll` timeout until `deadline`: -1 for none, at least 1 ms before it, and a
/// `TimedOut` error once it has passed.
fn timeout_ms(deadline: Option<Instant>) -> io::Result<i32> {
    let Some(deadline) = deadline else {
        return Ok(-1);
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::from(io::ErrorKind::TimedOut));
    }
    Ok(i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1))
}

/// A frame could not be sent.
enum SendError {
    /// Larger than `MAX_FRAME` (this many payload bytes); nothing was sent.
    TooLarge(usize),
    Io(io::Error),
}

/// The parent's end of the socket. Sends never block while the worker waits for the
/// parent to read: see "Pipelining" in the module documentation.
struct Channel {
    sock: UnixStream,
    /// Bytes received and not yet taken as messages, from `rx_start`.
    rx: Vec<u8>,
    rx_start: usize,
    /// The last frame sent, kept for its allocation.
    tx: Vec<u8>,
}

impl Channel {
    fn new(sock: UnixStream) -> Channel {
        Channel {
            sock,
            rx: Vec::new(),
            rx_start: 0,
            tx: Vec::new(),
        }
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one message; gives up with a `TimedOut` error at `deadline` (`None`: never).
    fn send(&mut self, msg: &ToWorker<'_>, deadline: Option<Instant>) -> Result<(), SendError> {
        self.send_with_fds(msg, &[], deadline)
    }

    /// Sends one message with `fds` attached to its first byte (`SCM_RIGHTS`).
    fn send_with_fds(
        &mut self,
        msg: &ToWorker<'_>,
        fds: &[RawFd],
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let mut frame = std::mem::take(&mut self.tx);
        encode(msg, &mut frame).map_err(SendError::Io)?;
        let len = frame.len() - 4;
        if len > MAX_FRAME {
            return Err(SendError::TooLarge(len));
        }
        let mut first = 0;
        if !fds.is_empty() {
            first = self
                .send_fds(&frame, fds, deadline)
                .map_err(SendError::Io)?;
        }
        let sent = self.write_all(&frame[first..], deadline);
        if frame.capacity() <= 1 << 20 {
            self.tx = frame;
        }
        sent.map_err(SendError::Io)
    }

    /// Sends the start of `frame` with `fds` attached; returns how many bytes went.
    fn send_fds(
        &mut self,
        frame: &[u8],
        fds: &[RawFd],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} files to send, at most {MAX_FDS}", fds.len()),
            ));
        }
        let fd = self.fd();
        loop {
            match sendmsg_fds(fd, frame, fds, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let timeout = timeout_ms(deadline)?;
                    let events = poll_fd(fd, libc::POLLIN | libc::POLLOUT, timeout)?;
                    if events & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                        self.fill()?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes without blocking; while the socket is full, waits until it is writable or
    /// readable and reads what arrived into `rx`.
    fn write_all(&mut self, frame: &[u8], deadline: Option<Instant>) -> io::Result<()> {
        let fd = self.fd();
        let mut sent = 0;
        while sent < frame.len() {
            let rest = &frame[sent..];
            // SAFETY: `rest` is valid for reads of its length.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                sent += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    let timeout = timeout_ms(deadline)?;
                    let events = poll_fd(fd, libc::POLLIN | libc::POLLOUT, timeout)?;
                    if events & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                        self.fill()?;
                    }
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the socket holds now into `rx`, without blocking: false when nothing
    /// was there. The end of the channel is an `UnexpectedEof` error.
    fn fill(&mut self) -> io::Result<bool> {
        if self.rx_start == self.rx.len() {
            self.rx.clear();
            self.rx_start = 0;
        } else if self.rx_start >= 64 << 10 {
            self.rx.drain(..self.rx_start);
            self.rx_start = 0;
        }
        self.rx.reserve(64 << 10);
        let spare = self.rx.spare_capacity_mut();
        let (ptr, room) = (spare.as_mut_ptr(), spare.len());
        loop {
            // SAFETY: `ptr` is valid for writes of `room` bytes (the vector's spare
            // capacity), and recv writes at most that many.
            let n = unsafe { libc::recv(self.fd(), ptr.cast(), room, libc::MSG_DONTWAIT) };
            if n > 0 {
                // SAFETY: recv initialised `n` bytes of the spare capacity.
                unsafe { self.rx.set_len(self.rx.len() + n as usize) };
                return Ok(true);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the worker closed the channel",
                ));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(false),
                _ => return Err(e),
            }
        }
    }

    /// The next whole message in `rx`, if one has arrived.
    fn parse(&mut self) -> io::Result<Option<FromWorker>> {
        let buf = &self.rx[self.rx_start..];
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(malformed());
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode(&buf[4..4 + len])?;
        self.rx_start += 4 + len;
        Ok(Some(msg))
    }

    /// The next message: waits until `deadline` (`None`: for as long as it takes), and
    /// gives up early, with an `Interrupted` error, once `cancel` is set.
    fn recv(
        &mut self,
        deadline: Option<Instant>,
        cancel: Option<&AtomicBool>,
    ) -> io::Result<FromWorker> {
        loop {
            if let Some(msg) = self.parse()? {
                return Ok(msg);
            }
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let mut timeout = timeout_ms(deadline)?;
            if cancel.is_some() {
                timeout = if timeout < 0 { 100 } else { timeout.min(100) };
            }
            if poll_fd(self.fd(), libc::POLLIN, timeout)? != 0 {
                self.fill()?;
            }
        }
    }

    /// True while nothing arrived and the worker has not closed its end: what an idle
    /// worker's channel looks like.
    fn quiet(&self) -> bool {
        self.rx_start == self.rx.len() && matches!(poll_fd(self.fd(), libc::POLLIN, 0), Ok(0))
    }

    /// Waits up to `wait` for something to arrive and drops it; false once the worker
    /// closed its end (or the socket failed).
    fn discard(&mut self, wait: Duration) -> bool {
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
        match poll_fd(self.fd(), libc::POLLIN, ms) {
            Ok(0) => true,
            Ok(_) => {
                let open = self.fill().is_ok();
                self.rx.clear();
                self.rx_start = 0;
                open
            }
            Err(_) => false,
        }
    }
}

/// Most files one message carries.
const MAX_FDS: usize = 64;

/// `sendmsg` of `data` with `fds` as `SCM_RIGHTS`; the bytes sent.
fn sendmsg_fds(fd: RawFd, data: &[u8], fds: &[RawFd], flags: libc::c_int) -> io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `control` holds CMSG_SPACE(fd_bytes) bytes, so the first header and its
    // data fit; the pointers come from the CMSG macros on this msghdr.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
    }
    // SAFETY: `msg` points at live buffers for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Blocking `recvmsg` into `buf`, keeping the files that arrive (`SCM_RIGHTS`); the
/// bytes received, 0 at the end of the stream.
fn recvmsg_fds(fd: RawFd, buf: &mut [u8], files: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers for the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: walks the control headers the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    files.push(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more files arrived than a message may carry",
        ));
    }
    Ok(n)
}

/// The worker's receiving end: bytes read in bulk, whole frames taken from them.
#[derive(Default)]
struct WorkerRx {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl WorkerRx {
    /// Where the next whole frame's payload lies in `data`, once it has arrived.
    fn next_frame(&mut self) -> io::Result<Option<std::ops::Range<usize>>> {
        let have = &self.data[self.start..self.end];
        if have.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(have[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(malformed());
        }
        if have.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.start + 4..self.start + 4 + len;
        self.start += 4 + len;
        Ok(Some(payload))
    }

    /// Blocks until more bytes arrive and reads what the socket holds (files that come
    /// with them go to `files`); the end of the stream is an `UnexpectedEof` error.
    fn fill(&mut self, fd: RawFd, files: &mut Vec<OwnedFd>) -> io::Result<()> {
        self.data.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        // Room for the frame that has begun to arrive, and for more.
        let partial = match self.data.get(..4.min(self.end)) {
            Some(b) if b.len() == 4 => {
                4 + u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize
            }
            _ => 0,
        };
        let want = (self.end + (256 << 10)).max(partial.min(MAX_FRAME + 4));
        if self.data.len() < want {
            self.data.resize(want, 0);
        }
        let n = recvmsg_fds(fd, &mut self.data[self.end..], files)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        self.end += n;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Shared staging memory

/// Where the meter page lies in the staging memfd: the page after the staging area.
fn meter_offset(staging_bytes: usize) -> usize {
    staging_bytes.div_ceil(METER_BYTES) * METER_BYTES
}

/// Size of the meter page.
const METER_BYTES: usize = 4096;

/// The page of the staging memfd in which a worker publishes how far its device work has
/// got: device operations finished, and the device time they took in nanoseconds. The
/// worker writes it, the parent reads it.
struct MeterPage {
    ptr: NonNull<AtomicU64>,
}

// SAFETY: the page holds atomics only, shared by design; the mapping lives until drop.
unsafe impl Send for MeterPage {}
// SAFETY: as above: every access goes through the atomics.
unsafe impl Sync for MeterPage {}

impl MeterPage {
    fn map(fd: RawFd, staging_bytes: usize) -> io::Result<MeterPage> {
        let offset = libc::off_t::try_from(meter_offset(staging_bytes))
            .map_err(|_| io::Error::other("staging area too large"))?;
        // SAFETY: a fresh shared mapping of one page of `fd`; nothing else is touched.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                METER_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(MeterPage { ptr })
    }

    fn counter(&self, index: usize) -> &AtomicU64 {
        assert!(index < 2);
        // SAFETY: the page is mapped, page-aligned and large enough for two atomics,
        // which are only ever accessed as atomics.
        unsafe { &*self.ptr.as_ptr().add(index) }
    }

    /// Device operations finished.
    fn done(&self) -> &AtomicU64 {
        self.counter(0)
    }

    /// Device time the finished operations took, in nanoseconds.
    fn busy_ns(&self) -> &AtomicU64 {
        self.counter(1)
    }

    /// Counts `ops` finished operations that took `ns` on the device.
    fn finish(&self, ops: u64, ns: u64) {
        self.busy_ns().fetch_add(ns, Ordering::Release);
        self.done().fetch_add(ops, Ordering::Release);
    }
}

impl Drop for MeterPage {
    fn drop(&mut self) {
        // SAFETY: mapped in `map`, unmapped once; no reference outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), METER_BYTES);
        }
    }
}

/// The parent's view of a worker's device work: the operations it sent, and the meter
/// page for those the worker finished. A lost worker has nothing in flight.
struct ProcessMeter {
    page: MeterPage,
    sent: AtomicU64,
    lost: AtomicBool,
}

impl DeviceMeter for ProcessMeter {
    fn read(&self) -> MeterReading {
        let sent = self.sent.load(Ordering::Acquire);
        let done = self.page.done().load(Ordering::Acquire).min(sent);
        let busy_ns = self.page.busy_ns().load(Ordering::Acquire);
        let done = if self.lost.load(Ordering::Acquire) {
            sent
        } else {
            done
        };
        MeterReading {
            sent,
            done,
            busy_ns,
        }
    }
}

/// Whether a request is a device operation (counted by the meter on both sides): those
/// that run on a stream.
fn is_device_op(msg: &ToWorker<'_>) -> bool {
    op_stream(msg).is_some()
}

/// The stream a device operation runs on; `None` for every other request.
fn op_stream(msg: &ToWorker<'_>) -> Option<u64> {
    match *msg {
        ToWorker::Launch { stream, .. }
        | ToWorker::Memset { stream, .. }
        | ToWorker::Dtod { stream, .. }
        | ToWorker::Htod { stream, .. }
        | ToWorker::Dtoh { stream, .. }
        | ToWorker::HtodHost { stream, .. }
        | ToWorker::DtohHost { stream, .. } => Some(stream),
        _ => None,
    }
}

/// A `MAP_SHARED` mapping of the staging memfd, unmapped on drop.
struct Staging {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping belongs to the process, not to a thread, and `Staging` hands out
// slices only through `&self` / `&mut self`, so moving it to another thread is sound.
unsafe impl Send for Staging {}

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

    /// The region a request names, checked against the area: `(at, len)`.
    fn region(&self, staged: Staged) -> io::Result<(usize, usize)> {
        let at = usize::try_from(staged.at).ok();
        let len = usize::try_from(staged.len).ok();
        match (at, len) {
            (Some(at), Some(len)) if at <= self.len && len <= self.len - at => Ok((at, len)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "copy outside the staging area",
            )),
        }
    }

    fn slice(&self, at: usize, len: usize) -> &[u8] {
        assert!(at <= self.len && len <= self.len - at);
        // SAFETY: the range lies in the mapping, readable and alive while `self` is. The
        // other process writes a region only between the request that names it and its
        // reply; this one reads a region only outside that window.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), len) }
    }

    fn slice_mut(&mut self, at: usize, len: usize) -> &mut [u8] {
        assert!(at <= self.len && len <= self.len - at);
        // SAFETY: as in `slice`, and writable; `&mut self` makes this the only slice here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: mapped in `map`, unmapped once; no slice outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The largest piece a copy is split into, for a staging area of `capacity` bytes.
fn piece_bytes(capacity: usize) -> usize {
    (capacity / STAGING_PIECES / STAGING_ALIGN * STAGING_ALIGN).max(STAGING_ALIGN)
}

/// The staging area as a ring: regions are handed out in order, each contiguous (one that
/// does not fit before the end starts again at 0), and released in the same order.
#[derive(Debug)]
struct Ring {
    capacity: usize,
    /// Where the next region may start.
    head: usize,
    /// The regions in use, oldest first: `(start, end)`.
    live: VecDeque<(usize, usize)>,
}

impl Ring {
    fn new(capacity: usize) -> Ring {
        Ring {
            capacity,
            head: 0,
            live: VecDeque::new(),
        }
    }

    /// A region of `len` bytes (`0 < len <= capacity`), or `None` while the regions in
    /// use leave no room for it.
    fn alloc(&mut self, len: usize) -> Option<usize> {
        let need = len.next_multiple_of(STAGING_ALIGN).min(self.capacity);
        let start = match self.live.front() {
            None => 0,
            // In use: [tail, head) without a wrap; free: [head, capacity) and [0, tail).
            Some(&(tail, _)) if self.head > tail => {
                if self.capacity - self.head >= need {
                    self.head
                } else if tail >= need {
                    0
                } else {
                    return None;
                }
            }
            // Wrapped: free is [head, tail).
            Some(&(tail, _)) if self.head < tail => {
                if tail - self.head >= need {
                    self.head
                } else {
                    return None;
                }
            }
            // head == tail with regions in use: full.
            Some(_) => return None,
        };
        self.live.push_back((start, start + need));
        self.head = start + need;
        Some(start)
    }

    /// Releases the oldest region.
    fn release_oldest(&mut self) {
        self.live.pop_front();
    }
}

/// A memfd of `len` bytes for the staging area.
fn staging_memfd(len: usize) -> io::Result<OwnedFd> {
    crate::hostmap::memfd(c"vgpu-staging", len as u64).map(OwnedFd::from)
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
    Cuda {
        ordinal: u32,
        /// The device's UUID: the worker then sees this device alone (as device 0,
        /// through `CUDA_VISIBLE_DEVICES`), like a guest process that has one vGPU.
        uuid: Option<Arc<str>>,
        catalog_ptx: Arc<str>,
        context_bytes: u64,
    },
}

/// Everything needed to start a worker; shared by the factory and its pool thread.
#[derive(Clone)]
struct Spawner {
    info: DeviceInfo,
    kind: WorkerKind,
    worker: PathBuf,
    staging_bytes: usize,
    sandbox: Sandbox,
    live: Arc<Mutex<Vec<u32>>>,
}

impl Spawner {
    /// Starts a worker on the calling thread and waits until its executor is ready, or
    /// until `cancel` is set.
    fn spawn(&self, cancel: Option<&AtomicBool>) -> ExecResult<ProcessExecutor> {
        let internal = |what: &str, e: io::Error| {
            ExecError::new(Status::Internal, 0, format!("executor worker: {what}: {e}"))
        };
        let (parent_sock, child_sock) =
            UnixStream::pair().map_err(|e| internal("socketpair", e))?;
        let child_sock = above_stdio(OwnedFd::from(child_sock)).map_err(|e| internal("fd", e))?;
        let memfd = staging_memfd(meter_offset(self.staging_bytes) + METER_BYTES)
            .and_then(above_stdio)
            .map_err(|e| internal("staging memfd", e))?;
        let staging = Staging::map(memfd.as_raw_fd(), self.staging_bytes)
            .map_err(|e| internal("staging mmap", e))?;
        let meter = MeterPage::map(memfd.as_raw_fd(), self.staging_bytes)
            .map_err(|e| internal("meter mmap", e))?;

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
            // Its own GPU only: a context on one GPU of a process that sees several takes
            // more device memory than the mediator measured for it, and a session has no
            // business with the host's other GPUs.
            .envs(match &self.kind {
                WorkerKind::Cuda {
                    uuid: Some(uuid), ..
                } => Some(("CUDA_VISIBLE_DEVICES", &**uuid)),
                _ => None,
            })
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
        // A failed dup leaves a killer that only signals: a blocked call then wakes when
        // the dying worker's end of the socket closes.
        let kill_sock = parent_sock.try_clone().ok();
        let kill = Arc::new(KillSwitch::new(pid, kill_sock));
        let mut exec = ProcessExecutor {
            child,
            pid,
            chan: Channel::new(parent_sock),
            ring: Ring::new(staging.len),
            piece: piece_bytes(staging.len),
            staging,
            pending: VecDeque::new(),
            deferred: None,
            piece_error: None,
            poisoned: false,
            lost: None,
            live: self.live.clone(),
            pinned: false,
            modules: HashMap::new(),
            meter: Arc::new(ProcessMeter {
                page: meter,
                sent: AtomicU64::new(0),
                lost: AtomicBool::new(false),
            }),
            kill,
            kernel_timeout: DEFAULT_KERNEL_TIMEOUT,
            lost_detail: 0,
            footprint: match self.kind {
                WorkerKind::Cuda { .. } => crate::cuda::alloc_footprint,
                WorkerKind::Cpu | WorkerKind::CpuFaultSim => std::convert::identity,
            },
            context_bytes: 0,
            builtin_locals: HashMap::new(),
            module_costs: HashMap::new(),
            loaded: None,
            answer: None,
            attributes: Vec::new(),
        };
        exec.start(&self.kind, cancel)?;
        log::debug!(
            "executor worker {pid} ready ({}; staging {} MiB{})",
            self.info.name,
            self.staging_bytes >> 20,
            if exec.pinned { ", pinned" } else { "" }
        );
        Ok(exec)
    }
}

/// Started workers waiting for `create`, and the thread that starts them.
struct Pool {
    /// How many to keep ready; 0: no pool.
    size: usize,
    shared: Arc<PoolShared>,
    filler: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct PoolShared {
    state: Mutex<PoolState>,
    /// Wakes the filler: a worker was taken, or the pool stops.
    wake: Condvar,
    /// Set when the pool stops: the filler gives up a worker it is starting.
    stopping: AtomicBool,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<ProcessExecutor>,
    stop: bool,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pool {
    fn new(size: usize) -> Pool {
        Pool {
            size,
            shared: Arc::default(),
            filler: Mutex::new(None),
        }
    }

    /// Starts the filler thread unless it runs already (or there is no pool).
    fn start(&self, spawner: &Arc<Spawner>) {
        if self.size == 0 {
            return;
        }
        let mut filler = self.filler.lock().unwrap_or_else(|e| e.into_inner());
        if filler.is_some() {
            return;
        }
        let (spawner, shared, size) = (spawner.clone(), self.shared.clone(), self.size);
        match std::thread::Builder::new()
            .name("vgpu-worker-pool".into())
            .spawn(move || fill_pool(&spawner, &shared, size))
        {
            Ok(handle) => *filler = Some(handle),
            Err(e) => log::warn!("executor worker pool: no thread ({e}); workers start on demand"),
        }
    }

    /// A started worker, if one is ready; the filler starts another.
    fn take(&self) -> Option<ProcessExecutor> {
        let exec = self.shared.lock().ready.pop_front();
        if exec.is_some() {
            self.shared.wake.notify_all();
        }
        exec
    }

    fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// Stops the filler (which stops its idle workers) and leaves a pool that starts
    /// again on demand.
    fn stop(&mut self) {
        let filler = self
            .filler
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(filler) = filler {
            self.shared.lock().stop = true;
            self.shared.stopping.store(true, Ordering::Relaxed);
            self.shared.wake.notify_all();
            if filler.join().is_err() {
                log::error!("executor worker pool: the filler thread panicked");
            }
        }
        let idle = std::mem::take(&mut self.shared.lock().ready);
        drop(idle);
        self.shared = Arc::default();
    }
}

/// The pool's filler thread: keeps `size` workers ready until the pool stops, then stops
/// and reaps the idle ones. Every pooled worker is started here, so they all share this
/// thread's lifetime (`PR_SET_PDEATHSIG`).
fn fill_pool(spawner: &Spawner, shared: &PoolShared, size: usize) {
    let mut retry = POOL_RETRY.0;
    loop {
        {
            let mut state = shared.lock();
            while !state.stop && state.ready.len() >= size {
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.stop {
                break;
            }
        }
        let started = Instant::now();
        match spawner.spawn(Some(&shared.stopping)) {
            Ok(exec) => {
                retry = POOL_RETRY.0;
                log::debug!(
                    "executor worker {} started for the pool in {:?}",
                    exec.pid,
                    started.elapsed()
                );
                let mut state = shared.lock();
                if state.stop {
                    drop(state);
                    drop(exec);
                    break;
                }
                state.ready.push_back(exec);
            }
            Err(e) => {
                let state = shared.lock();
                if state.stop {
                    break;
                }
                log::warn!("executor worker pool: {e}; trying again in {retry:?}");
                drop(
                    shared
                        .wake
                        .wait_timeout_while(state, retry, |s| !s.stop)
                        .unwrap_or_else(|e| e.into_inner()),
                );
                retry = (retry * 2).min(POOL_RETRY.1);
            }
        }
    }
    let idle = std::mem::take(&mut shared.lock().ready);
    drop(idle);
}

/// Makes one [`ProcessExecutor`] (one worker process) per executor; see the module
/// documentation for the pool of ready workers.
pub struct ProcessExecutorFactory {
    spawner: Arc<Spawner>,
    pool: Pool,
    /// The outcome of the first [`ExecutorFactory::check`], kept so that a start-up
    /// check and a later `info` start one worker, not two.
    checked: OnceLock<ExecResult<()>>,
    /// Given to every executor handed out (see "Watchdog" in the module documentation).
    kernel_timeout: Duration,
}

impl ProcessExecutorFactory {
    /// CUDA device `ordinal` in workers, described by and loading the catalog of `cuda`
    /// (a factory for the same device); the worker binary from [`find_worker`]. Keeps
    /// [`DEFAULT_CUDA_POOL`] workers ready.
    pub fn cuda(ordinal: usize, cuda: &CudaExecutorFactory) -> Result<Self, SetupError> {
        let ordinal = u32::try_from(ordinal)
            .map_err(|_| SetupError::Cuda(crate::cuda::CudaError::OrdinalTooLarge(ordinal)))?;
        let kind = WorkerKind::Cuda {
            ordinal,
            uuid: cuda.uuid().map(Arc::from),
            catalog_ptx: cuda.catalog_ptx().into(),
            context_bytes: cuda.context_bytes(),
        };
        Ok(Self::with_kind(cuda.device().clone(), kind)?.with_pool(DEFAULT_CUDA_POOL))
    }

    /// The CPU reference executor in workers: the whole process path without a GPU. No
    /// pool unless [`ProcessExecutorFactory::with_pool`] asks for one.
    pub fn cpu() -> Result<Self, SetupError> {
        Self::with_kind(CpuExecutorFactory::new().device().clone(), WorkerKind::Cpu)
    }

    /// The CPU executor in workers, with one difference: a `fill_u32` launch whose value
    /// is [`SIMULATED_FAULT_VALUE`] is accepted and then fails the next synchronising
    /// call with `LAUNCH_FAILED` (detail 719) and poisons the executor, the way a kernel
    /// that traps does on CUDA. For tests of the fault path without a GPU.
    pub fn cpu_fault_sim() -> Result<Self, SetupError> {
        Self::with_kind(
            CpuExecutorFactory::new().device().clone(),
            WorkerKind::CpuFaultSim,
        )
    }

    fn with_kind(info: DeviceInfo, kind: WorkerKind) -> Result<Self, SetupError> {
        Ok(ProcessExecutorFactory {
            spawner: Arc::new(Spawner {
                info,
                kind,
                worker: find_worker()?,
                staging_bytes: DEFAULT_STAGING_BYTES,
                sandbox: Sandbox {
                    user: WorkerUser::default_for_this_process(),
                    ..Sandbox::default()
                },
                live: Arc::default(),
            }),
            pool: Pool::new(0),
            checked: OnceLock::new(),
            kernel_timeout: DEFAULT_KERNEL_TIMEOUT,
        })
    }

    /// Changes how workers start: the pool's workers (started the old way) are stopped.
    fn reconfigure(&mut self, change: impl FnOnce(&mut Spawner)) {
        self.pool.stop();
        change(Arc::make_mut(&mut self.spawner));
        self.checked = OnceLock::new();
    }

    /// Confines workers as `sandbox` says instead of the default (the dedicated user when
    /// running as root, seccomp on, default limits).
    pub fn with_sandbox(mut self, sandbox: Sandbox) -> Self {
        self.reconfigure(|s| s.sandbox = sandbox);
        self
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.spawner.sandbox
    }

    /// Uses this worker binary instead of the one [`find_worker`] found.
    pub fn with_worker(mut self, worker: impl Into<PathBuf>) -> Self {
        let worker = worker.into();
        self.reconfigure(|s| s.worker = worker);
        self
    }

    /// Sets the staging area's size (rounded up to whole pages).
    pub fn with_staging_bytes(mut self, bytes: usize) -> Self {
        let bytes = bytes.max(MIN_STAGING_BYTES).next_multiple_of(4096);
        self.reconfigure(|s| s.staging_bytes = bytes);
        self
    }

    /// Keeps up to `n` started workers ready for [`ExecutorFactory::create`] (0: none).
    /// They are started by one thread of this factory, from the first `create` (or
    /// [`ProcessExecutorFactory::start_pool`]) on, and stopped when it is dropped.
    pub fn with_pool(mut self, n: usize) -> Self {
        self.pool.stop();
        self.pool.size = n;
        self
    }

    /// Sets the kernel timeout of the executors handed out from now on: the longest one
    /// wait for a worker (a reply, or room to send a request) lasts before the worker is
    /// killed and the call returns `DEVICE_LOST` with detail [`TIMEOUT_DETAIL`]. Default
    /// [`DEFAULT_KERNEL_TIMEOUT`]; at least 1 ms (zero is taken as 1 ms). Workers that
    /// wait in the pool are kept: the timeout does not change how they start.
    pub fn with_kernel_timeout(mut self, timeout: Duration) -> Self {
        self.kernel_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The kernel timeout of the executors handed out.
    pub fn kernel_timeout(&self) -> Duration {
        self.kernel_timeout
    }

    /// Starts filling the pool now rather than at the first `create`.
    pub fn start_pool(&self) {
        self.pool.start(&self.spawner);
    }

    /// How many started workers wait in the pool now.
    pub fn pool_ready(&self) -> usize {
        self.pool.ready()
    }

    /// How many started workers the pool keeps.
    pub fn pool_size(&self) -> usize {
        self.pool.size
    }

    pub fn worker_path(&self) -> &Path {
        &self.spawner.worker
    }

    pub fn staging_bytes(&self) -> usize {
        self.spawner.staging_bytes
    }

    /// Process ids of the workers running now (those waiting in the pool included).
    pub fn workers(&self) -> Vec<u32> {
        self.spawner
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts a worker and stops it again: the binary runs and opens the device.
    pub fn probe(&self) -> Result<(), SetupError> {
        self.spawn().map(drop).map_err(|e| self.did_not_start(&e))
    }

    fn did_not_start(&self, e: &ExecError) -> SetupError {
        SetupError::Worker(format!(
            "executor worker {} did not start: {}",
            self.spawner.worker.display(),
            e.message
        ))
    }

    /// Starts a worker on the calling thread (never from the pool) and waits until its
    /// executor is ready.
    pub fn spawn(&self) -> ExecResult<ProcessExecutor> {
        let mut exec = self.spawner.spawn(None)?;
        exec.kernel_timeout = self.kernel_timeout;
        Ok(exec)
    }

    /// What [`ExecutorFactory::create`] returns, as its own type: a worker from the pool
    /// when one is ready and alive, else one started on the calling thread.
    pub fn create_executor(&self) -> ExecResult<ProcessExecutor> {
        let started = Instant::now();
        if self.pool.size > 0 {
            self.pool.start(&self.spawner);
            while let Some(mut exec) = self.pool.take() {
                if exec.idle_and_alive() {
                    exec.kernel_timeout = self.kernel_timeout;
                    log::debug!(
                        "executor worker {} taken from the pool in {:?}",
                        exec.pid,
                        started.elapsed()
                    );
                    return Ok(exec);
                }
                log::warn!(
                    "executor worker {} ended while waiting in the pool; discarded",
                    exec.pid
                );
                exec.lost = Some("ended while waiting in the pool".into());
            }
        }
        let exec = self.spawn()?;
        log::debug!(
            "executor worker {} started for create in {:?} ({})",
            exec.pid,
            started.elapsed(),
            if self.pool.size > 0 {
                "pool empty"
            } else {
                "no pool"
            }
        );
        Ok(exec)
    }
}

impl Drop for ProcessExecutorFactory {
    fn drop(&mut self) {
        self.pool.stop();
    }
}

impl ExecutorFactory for ProcessExecutorFactory {
    fn device(&self) -> &DeviceInfo {
        &self.spawner.info
    }

    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        self.create_executor()
            .map(|e| Box::new(e) as Box<dyn Executor>)
    }

    fn worker_process(&self) -> Option<&Path> {
        Some(&self.spawner.worker)
    }

    fn check(&self) -> Result<(), SetupError> {
        match self.checked.get_or_init(|| self.spawn().map(drop)) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.did_not_start(e)),
        }
    }
}

/// A request whose reply has not been read yet.
#[derive(Debug)]
enum Pending {
    /// A request the caller did not wait for; `staged` when it holds a ring region.
    Deferred { what: &'static str, staged: bool },
    /// A piece of the DTOH being served: `len` bytes at `at` in staging (a ring region
    /// unless empty), for `into` onwards in the caller's buffer.
    Piece { at: usize, len: usize, into: usize },
    /// The request the caller waits for.
    Waited,
}

/// Why a worker was killed from outside its executor's calls (see [`KillSwitch`]).
const NOT_KILLED: u8 = 0;
const KILLED: u8 = 1;
const KILLED_TIMED_OUT: u8 = 2;

/// Ends a worker from any thread: what a [`Killer`] holds. Reaping the child and
/// signalling it take the same lock, so a pid is signalled only while it is still this
/// worker's (a reaped pid may belong to another process by now).
struct KillSwitch {
    state: Mutex<KillTarget>,
    /// `NOT_KILLED`, or why the first kill came: `KILLED` or `KILLED_TIMED_OUT`.
    why: AtomicU8,
}

struct KillTarget {
    /// The worker's pid until the child is reaped (or about to be, by a thread that
    /// holds this lock).
    pid: Option<libc::pid_t>,
    /// A duplicate of the parent's end of the channel, shut down by a kill so that a call
    /// blocked on the socket wakes at once, however long the worker takes to die; dropped
    /// with the executor.
    sock: Option<UnixStream>,
}

/// A worker that could not be killed: said loudly, since the call that waits for it
/// may then wait for its kernel.
fn kill_failed(pid: libc::pid_t) {
    log::error!(
        "cannot kill executor worker {pid}: {} (a daemon that starts workers as another \
         user needs CAP_KILL)",
        io::Error::last_os_error()
    );
}

impl KillSwitch {
    fn new(pid: u32, sock: Option<UnixStream>) -> KillSwitch {
        KillSwitch {
            state: Mutex::new(KillTarget {
                pid: libc::pid_t::try_from(pid).ok(),
                sock,
            }),
            why: AtomicU8::new(NOT_KILLED),
        }
    }

    fn lock(&self) -> MutexGuard<'_, KillTarget> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kills the worker (if it has not been reaped) and wakes whoever waits on its
    /// channel. The first kill's reason is kept.
    fn kill(&self, timed_out: bool) {
        let why = if timed_out { KILLED_TIMED_OUT } else { KILLED };
        let _ = self
            .why
            .compare_exchange(NOT_KILLED, why, Ordering::AcqRel, Ordering::Acquire);
        let target = self.lock();
        if let Some(pid) = target.pid {
            // SAFETY: sends a signal to our own child, which has not been reaped (the
            // lock is held by whoever reaps it), so the pid is still that child's.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                kill_failed(pid);
            }
        }
        if let Some(sock) = &target.sock {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
    }

    /// `Some(timed_out)` once the worker was killed through this switch.
    fn killed(&self) -> Option<bool> {
        match self.why.load(Ordering::Acquire) {
            NOT_KILLED => None,
            why => Some(why == KILLED_TIMED_OUT),
        }
    }

    /// `Child::try_wait`, with the pid forgotten once the child is reaped.
    fn try_wait(&self, child: &mut Child) -> io::Result<Option<ExitStatus>> {
        let mut target = self.lock();
        let status = child.try_wait();
        if matches!(status, Ok(Some(_))) {
            target.pid = None;
        }
        status
    }

    /// Kills the child unless it was reaped, forgets its pid and the channel, and reaps
    /// it.
    fn kill_and_reap(&self, child: &mut Child) -> Option<ExitStatus> {
        {
            let mut target = self.lock();
            if let Some(pid) = target.pid.take() {
                // SAFETY: as in `kill`: our child, not reaped yet.
                if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                    kill_failed(pid);
                }
            }
            target.sock = None;
        }
        // Nobody signals the pid any more: reaping outside the lock is safe.
        child.wait().ok()
    }
}

/// An executor in a worker process; see the module documentation.
pub struct ProcessExecutor {
    child: Child,
    pid: u32,
    chan: Channel,
    staging: Staging,
    ring: Ring,
    /// The largest piece of a copy.
    piece: usize,
    /// The requests sent and not answered yet, oldest first.
    pending: VecDeque<Pending>,
    /// The first error of a request nobody waited for, until a call that waits returns it.
    deferred: Option<ExecError>,
    /// The first error of a piece of the DTOH being served.
    piece_error: Option<ExecError>,
    /// The worker's executor reported itself poisoned.
    poisoned: bool,
    /// Why the worker is gone, once it is.
    lost: Option<String>,
    live: Arc<Mutex<Vec<u32>>>,
    pinned: bool,
    /// The kernels of each loaded module with their parameter sizes (from its PTX).
    modules: HashMap<u64, HashMap<String, Option<Vec<usize>>>>,
    /// Device operations sent, and finished as the worker reports them.
    meter: Arc<ProcessMeter>,
    /// What [`Executor::killer`] hands out; also reaps the child.
    kill: Arc<KillSwitch>,
    /// The longest one wait for the worker lasts before it is killed.
    kernel_timeout: Duration,
    /// The detail of the `DEVICE_LOST` that `lost` stands for.
    lost_detail: u32,
    /// [`Executor::alloc_footprint`] of the worker's executor.
    footprint: fn(u64) -> u64,
    /// What the worker said its executor's context holds.
    context_bytes: u64,
    /// Local memory reservations of the built-in kernels, and of guest kernels by module:
    /// reported by the worker (with `Ready`, with each module) or asked for once.
    builtin_locals: HashMap<String, u64>,
    module_costs: HashMap<u64, ModuleCost>,
    /// What the worker said about the module it loaded last, until `load_module` takes it.
    loaded: Option<WireModule>,
    /// The worker's last `Answer`, until the call that asked takes it.
    answer: Option<WireAnswer>,
    /// The device attributes the worker reported, kept: they do not change.
    attributes: Vec<i32>,
}

/// What a loaded module holds on the device, as its worker reported it.
#[derive(Debug, Default)]
struct ModuleCost {
    bytes: u64,
    locals: HashMap<String, u64>,
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

    /// How many requests have been sent and not answered yet (read lazily; see the module
    /// documentation).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sends the start message and reads the ready reply; gives up once `cancel` is set.
    fn start(&mut self, kind: &WorkerKind, cancel: Option<&AtomicBool>) -> ExecResult<()> {
        let (kind, ordinal, catalog_ptx, context_bytes) = match kind {
            WorkerKind::Cpu => (WireKind::Cpu, 0, "", 0),
            WorkerKind::CpuFaultSim => (WireKind::CpuFaultSim, 0, "", 0),
            WorkerKind::Cuda {
                ordinal,
                uuid,
                catalog_ptx,
                context_bytes,
            } => {
                // A worker that sees its GPU alone opens it as device 0.
                let ordinal = if uuid.is_some() { 0 } else { *ordinal };
                (WireKind::Cuda, ordinal, &**catalog_ptx, *context_bytes)
            }
        };
        let init = ToWorker::Init {
            version: WIRE_VERSION,
            kind,
            ordinal,
            catalog_ptx,
            context_bytes,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        match self.chan.send(&init, Some(deadline)) {
            Ok(()) => {}
            Err(SendError::TooLarge(n)) => {
                let e = io::Error::other(format!("start message of {n} bytes is too large"));
                return Err(self.lose("start", e));
            }
            Err(SendError::Io(e)) => return Err(self.lose("start", e)),
        }
        let ready = match self.chan.recv(Some(deadline), cancel) {
            Ok(msg) => msg,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                // The pool stops: not a failure of the worker, which is killed on drop.
                self.lost = Some(format!("executor worker {}: start cancelled", self.pid));
                return Err(self.lost_error());
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let e = io::Error::new(e.kind(), format!("no answer in {START_TIMEOUT:?}"));
                return Err(self.lose("start", e));
            }
            Err(e) => return Err(self.lose("start", e)),
        };
        match ready {
            FromWorker::Ready {
                pinned,
                executor,
                context_bytes,
                builtin_locals,
            } => {
                self.pinned = pinned;
                self.context_bytes = context_bytes;
                self.builtin_locals = builtin_locals.into_iter().collect();
                log::debug!(
                    "executor worker {} opened {executor} ({} MiB of device memory)",
                    self.pid,
                    context_bytes >> 20
                );
                Ok(())
            }
            FromWorker::StartFailed { error } => {
                let mut e = ExecError::from(error);
                e.message = format!("executor worker {}: {}", self.pid, e.message);
                Err(e)
            }
            FromWorker::Reply { .. } | FromWorker::Module { .. } | FromWorker::Answer { .. } => {
                let e = io::Error::new(io::ErrorKind::InvalidData, "a reply before the start");
                Err(self.lose("start", e))
            }
        }
    }

    /// Marks the worker lost and returns the `DEVICE_LOST` error for it.
    fn lose(&mut self, during: &str, e: io::Error) -> ExecError {
        self.meter.lost.store(true, Ordering::Release);
        if self.lost.is_none() && self.take_kill(during) {
            return self.lost_error();
        }
        if self.lost.is_none() {
            // A worker that closed its end is usually exiting: give it a moment so the
            // report can say how it ended.
            let deadline = Instant::now() + Duration::from_millis(200);
            let status = loop {
                match self.kill.try_wait(&mut self.child) {
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
        ExecError::new(
            Status::DeviceLost,
            self.lost_detail,
            self.lost.clone().unwrap_or_default(),
        )
    }

    /// Once a [`Killer`] (or the kernel timeout) ended the worker: marks it lost for that
    /// reason and returns true.
    fn take_kill(&mut self, during: &str) -> bool {
        let Some(timed_out) = self.kill.killed() else {
            return false;
        };
        if timed_out {
            let why = format!(
                "executor worker {}: its device work finished nothing for the kernel timeout \
                 and was ended (during {during})",
                self.pid
            );
            log::warn!("{why}");
            self.lost = Some(why);
            self.lost_detail = TIMEOUT_DETAIL;
        } else {
            let why = format!(
                "executor worker {} was ended from outside (a reset) during {during}",
                self.pid
            );
            log::info!("{why}");
            self.lost = Some(why);
            self.lost_detail = 0;
        }
        true
    }

    /// Kills the worker because a wait for it ran past the kernel timeout.
    fn time_out(&mut self, during: &str) -> ExecError {
        self.kill.kill(true);
        self.lose(
            during,
            io::Error::new(io::ErrorKind::TimedOut, "kernel timeout"),
        )
    }

    /// The deadline of a wait for the worker that begins now.
    fn deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.kernel_timeout)
    }

    fn check_live(&mut self) -> ExecResult<()> {
        if self.lost.is_none() {
            self.take_kill("a call");
        }
        match self.lost {
            Some(_) => Err(self.lost_error()),
            None => Ok(()),
        }
    }

    /// True for a worker that can be handed out: not lost or poisoned, nothing in
    /// flight, the process running and its channel quiet.
    fn idle_and_alive(&mut self) -> bool {
        self.lost.is_none()
            && !self.poisoned
            && self.kill.killed().is_none()
            && self.pending.is_empty()
            && matches!(self.kill.try_wait(&mut self.child), Ok(None))
            && self.chan.quiet()
    }

    /// Sends one request (the caller records it in `pending`).
    fn send(&mut self, what: &str, msg: &ToWorker<'_>) -> ExecResult<()> {
        self.send_fds(what, msg, &[])
    }

    /// Sends one request with `fds` attached.
    fn send_fds(&mut self, what: &str, msg: &ToWorker<'_>, fds: &[RawFd]) -> ExecResult<()> {
        // A worker stuck in a kernel reads nothing: the send waits for room at most as
        // long as a reply is waited for.
        let deadline = self.deadline();
        match self.chan.send_with_fds(msg, fds, deadline) {
            Ok(()) => {
                if is_device_op(msg) {
                    self.meter.sent.fetch_add(1, Ordering::AcqRel);
                }
                Ok(())
            }
            // Only a launch with absurdly many or large parameters, or a host buffer of
            // too many pieces, gets here; every executor refuses those as an invalid
            // argument too.
            Err(SendError::TooLarge(n)) => Err(ExecError::new(
                Status::InvalidArgument,
                0,
                format!("{what}: request of {n} bytes is too large"),
            )),
            // More files than a message carries: nothing was sent.
            Err(SendError::Io(e)) if e.kind() == io::ErrorKind::InvalidInput => Err(
                ExecError::new(Status::InvalidArgument, 0, format!("{what}: {e}")),
            ),
            Err(SendError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                Err(self.time_out(what))
            }
            Err(SendError::Io(e)) => Err(self.lose(what, e)),
        }
    }

    /// Reads the oldest unanswered reply and settles it: a deferred request's error is
    /// kept for the next call that waits, a DTOH piece is copied into `out`, a staging
    /// region is released. Returns the result of the request the caller waits for.
    fn settle_one(&mut self, what: &str, out: Drain<'_>) -> ExecResult<Option<ExecResult<u64>>> {
        // The wait ends the worker once its device work finished nothing for a whole
        // kernel timeout: a long queue of work that keeps finishing is waited for.
        let mut done = self.meter.page.done().load(Ordering::Acquire);
        let msg = loop {
            match self.chan.recv(self.deadline(), None) {
                Ok(msg) => break msg,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    let now = self.meter.page.done().load(Ordering::Acquire);
                    if now == done {
                        return Err(self.time_out(what));
                    }
                    done = now;
                }
                Err(e) => return Err(self.lose(what, e)),
            }
        };
        let (poisoned, result) = match msg {
            FromWorker::Reply { poisoned, result } => (poisoned, result),
            FromWorker::Module { poisoned, result } => {
                // Only a waited-for `load_module` gets this answer; it takes the module.
                let id = result.as_ref().map(|m| m.id).map_err(Clone::clone);
                self.loaded = result.ok();
                (poisoned, id)
            }
            FromWorker::Answer { poisoned, result } => {
                // Only a waited-for request gets this answer; it takes it.
                let done = result.as_ref().map(|_| 0).map_err(Clone::clone);
                self.answer = result.ok();
                (poisoned, done)
            }
            _ => {
                let e = io::Error::new(io::ErrorKind::InvalidData, "an unexpected message");
                return Err(self.lose(what, e));
            }
        };
        let Some(pending) = self.pending.pop_front() else {
            let e = io::Error::new(io::ErrorKind::InvalidData, "a reply to no request");
            return Err(self.lose(what, e));
        };
        self.poisoned |= poisoned;
        let result = result.map_err(ExecError::from);
        match pending {
            Pending::Deferred { what, staged } => {
                if staged {
                    self.ring.release_oldest();
                }
                if let Err(e) = result {
                    if self.deferred.is_none() {
                        log::debug!(
                            "executor worker {}: {what} failed: {e}; reported by the next call that waits",
                            self.pid
                        );
                        self.deferred = Some(e);
                    } else {
                        log::debug!("executor worker {}: {what} also failed: {e}", self.pid);
                    }
                }
                Ok(None)
            }
            Pending::Piece { at, len, into } => {
                let taken = result.and_then(|_| out(into, self.staging.slice(at, len)));
                if let Err(e) = taken {
                    self.piece_error.get_or_insert(e);
                }
                if len > 0 {
                    self.ring.release_oldest();
                }
                Ok(None)
            }
            Pending::Waited => Ok(Some(result)),
        }
    }

    /// Makes room for one more request, reading the oldest replies while
    /// [`MAX_IN_FLIGHT`] are unanswered or the ring has no region of `staged` bytes
    /// free; returns the region (0 when `staged` is 0).
    fn room(&mut self, what: &str, staged: usize, out: Drain<'_>) -> ExecResult<usize> {
        loop {
            if self.pending.len() < MAX_IN_FLIGHT {
                if staged == 0 {
                    return Ok(0);
                }
                if let Some(at) = self.ring.alloc(staged) {
                    return Ok(at);
                }
            }
            if self.pending.is_empty() {
                // Every region in use belongs to an unanswered request.
                return Err(ExecError::new(
                    Status::Internal,
                    0,
                    format!("{what}: staging ring full with nothing in flight"),
                ));
            }
            self.settle_one(what, out)?;
        }
    }

    /// Reads every unanswered reply.
    fn drain(&mut self, what: &str) -> ExecResult<()> {
        while !self.pending.is_empty() {
            self.settle_one(what, &mut discard)?;
        }
        Ok(())
    }

    /// A request the caller does not wait for.
    fn defer(&mut self, what: &'static str, msg: &ToWorker<'_>) -> ExecResult<()> {
        self.check_live()?;
        self.room(what, 0, &mut discard)?;
        self.send(what, msg)?;
        self.pending.push_back(Pending::Deferred {
            what,
            staged: false,
        });
        Ok(())
    }

    /// A request whose failure the trait cannot report: a loss or poison still shows in
    /// [`Executor::poisoned`], an error from the worker at the next call that waits.
    fn defer_quiet(&mut self, what: &'static str, msg: &ToWorker<'_>) {
        if let Err(e) = self.defer(what, msg) {
            log::debug!("executor worker {}: {what}: {e}", self.pid);
        }
    }

    /// A request the caller waits for, sent at once: then every reply up to its own is
    /// read, and an earlier deferred error takes precedence over its result.
    fn wait(&mut self, what: &str, msg: &ToWorker<'_>) -> ExecResult<u64> {
        self.wait_fds(what, msg, &[])
    }

    /// [`ProcessExecutor::wait`], with `fds` attached to the request.
    fn wait_fds(&mut self, what: &str, msg: &ToWorker<'_>, fds: &[RawFd]) -> ExecResult<u64> {
        self.check_live()?;
        self.room(what, 0, &mut discard)?;
        self.send_fds(what, msg, fds)?;
        self.pending.push_back(Pending::Waited);
        let result = loop {
            if let Some(result) = self.settle_one(what, &mut discard)? {
                break result;
            }
        };
        match self.deferred.take() {
            Some(e) => Err(e),
            None => result,
        }
    }

    /// A request answered with `Answer`, waited for: the answer.
    fn ask(&mut self, what: &str, msg: &ToWorker<'_>) -> ExecResult<WireAnswer> {
        self.answer = None;
        self.wait(what, msg)?;
        self.answer.take().ok_or_else(|| {
            ExecError::new(
                Status::Internal,
                0,
                format!("executor worker {}: {what}: no answer", self.pid),
            )
        })
    }

    /// The worker's answer was not of the kind asked for.
    fn wrong_answer(&self, what: &str) -> ExecError {
        ExecError::new(
            Status::Internal,
            0,
            format!(
                "executor worker {}: {what}: an answer of another kind",
                self.pid
            ),
        )
    }

    /// A request that creates something: sent only once every earlier reply was read and
    /// none reported an error (which is returned instead).
    fn wait_creating(&mut self, what: &str, msg: &ToWorker<'_>) -> ExecResult<u64> {
        self.wait_creating_fds(what, msg, &[])
    }

    /// [`ProcessExecutor::wait_creating`], with `fds` attached to the request.
    fn wait_creating_fds(
        &mut self,
        what: &str,
        msg: &ToWorker<'_>,
        fds: &[RawFd],
    ) -> ExecResult<u64> {
        self.check_live()?;
        self.drain(what)?;
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        self.wait_fds(what, msg, fds)
    }
}

/// Pieces at least this large are copied by several threads.
const PARALLEL_COPY_BYTES: usize = 2 << 20;
/// Most threads one copy uses.
const COPY_THREADS: usize = 4;

/// Runs `copy(offset, len)` over `[0, total)`: in one call for small copies, else in
/// disjoint parts on up to [`COPY_THREADS`] threads. One memcpy stream cannot fill the
/// bandwidth of a large server's memory; a few can.
fn copy_in_parallel(
    total: usize,
    copy: impl Fn(usize, usize) -> ExecResult<()> + Sync,
) -> ExecResult<()> {
    let threads = COPY_THREADS.min(total / (PARALLEL_COPY_BYTES / 2)).max(1);
    if total < PARALLEL_COPY_BYTES || threads == 1 {
        return copy(0, total);
    }
    let part = total.div_ceil(threads).next_multiple_of(4096);
    std::thread::scope(|scope| {
        let copy = &copy;
        let workers: Vec<_> = (1..threads)
            .filter(|i| i * part < total)
            .map(|i| {
                let from = i * part;
                let n = part.min(total - from);
                scope.spawn(move || copy(from, n))
            })
            .collect();
        let mut result = copy(0, part.min(total));
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err(ExecError::new(
                    Status::Internal,
                    0,
                    "a copy thread panicked",
                ))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Where the bytes of a copy come from or go to, `at` bytes into it.
type Fill<'a> = &'a mut dyn FnMut(usize, &mut [u8]) -> ExecResult<()>;
type Drain<'a> = &'a mut dyn FnMut(usize, &[u8]) -> ExecResult<()>;

/// A [`Drain`] for replies that carry no bytes.
fn discard(_: usize, _: &[u8]) -> ExecResult<()> {
    Ok(())
}

impl ProcessExecutor {
    /// An HTOD of `len` bytes that `fill` writes into staging pieces, one piece each;
    /// not waited for.
    fn htod_with(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        len: usize,
        fill: Fill<'_>,
    ) -> ExecResult<()> {
        self.check_live()?;
        let mut done = 0;
        loop {
            let n = (len - done).min(self.piece);
            let at = self.room("htod", n, &mut discard)?;
            fill(done, self.staging.slice_mut(at, n))?;
            let msg = ToWorker::Htod {
                stream: stream.0,
                dst: dst.0,
                offset: offset + done as u64,
                staged: Staged {
                    at: at as u64,
                    len: n as u64,
                },
            };
            self.send("htod", &msg)?;
            self.pending.push_back(Pending::Deferred {
                what: "htod",
                staged: n > 0,
            });
            done += n;
            if done == len {
                return Ok(());
            }
        }
    }

    /// A DTOH of `len` bytes, handed to `drain` piece by piece in order; waited for.
    fn dtoh_with(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        len: usize,
        drain: Drain<'_>,
    ) -> ExecResult<()> {
        self.check_live()?;
        self.piece_error = None;
        let mut done = 0;
        loop {
            let n = (len - done).min(self.piece);
            let at = self.room("dtoh", n, drain)?;
            let msg = ToWorker::Dtoh {
                stream: stream.0,
                src: src.0,
                offset: offset + done as u64,
                staged: Staged {
                    at: at as u64,
                    len: n as u64,
                },
            };
            self.send("dtoh", &msg)?;
            self.pending.push_back(Pending::Piece {
                at,
                len: n,
                into: done,
            });
            done += n;
            // After a failure the pieces sent are still answered, but no more are sent.
            if done == len || self.deferred.is_some() || self.piece_error.is_some() {
                break;
            }
        }
        while !self.pending.is_empty() {
            self.settle_one("dtoh", drain)?;
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        self.piece_error.take().map_or(Ok(()), Err)
    }
}

impl ProcessExecutor {
    /// Takes what the worker said about module `id`, just loaded: what it holds on the
    /// device and, from its PTX where it has some, its kernels and their parameters, so
    /// that a launch is checked here, at once, rather than failing later in the worker.
    fn loaded_module(&mut self, id: ModuleId, ptx: Option<&str>) {
        if let Some(entries) = ptx.and_then(crate::ptx::entries) {
            self.modules.insert(id.0, entries);
        }
        let cost = match self.loaded.take() {
            Some(m) if m.id == id.0 => ModuleCost {
                bytes: m.bytes,
                locals: m.locals.into_iter().collect(),
            },
            _ => ModuleCost::default(),
        };
        self.module_costs.insert(id.0, cost);
    }
}

impl Executor for ProcessExecutor {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.wait_creating("open_stream", &ToWorker::OpenStream)
            .map(StreamId)
    }

    fn close_stream(&mut self, stream: StreamId) {
        self.defer_quiet("close_stream", &ToWorker::CloseStream { stream: stream.0 });
    }

    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        self.wait_creating("alloc", &ToWorker::Alloc { bytes })
            .map(BufferId)
    }

    fn free(&mut self, buffer: BufferId) {
        self.defer_quiet("free", &ToWorker::Free { buffer: buffer.0 });
    }

    fn htod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        data: &[u8],
    ) -> ExecResult<()> {
        self.htod_with(stream, dst, offset, data.len(), &mut |at, out| {
            out.copy_from_slice(&data[at..at + out.len()]);
            Ok(())
        })
    }

    fn htod_from(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        src: &dyn GuestSource,
    ) -> ExecResult<()> {
        let len = usize::try_from(src.len())
            .map_err(|_| ExecError::new(Status::InvalidArgument, 0, "copy too large"))?;
        // Straight from the guest's pages into the staging ring: no copy in between;
        // large pieces by several threads, as a driver's pageable copy is.
        self.htod_with(stream, dst, offset, len, &mut |at, out| {
            // The parts are written from several threads: share the address, not `out`.
            let base = out.as_mut_ptr() as usize;
            copy_in_parallel(out.len(), |from, n| {
                // SAFETY: `out` is valid for writes of its length for the whole call, and
                // `copy_in_parallel` hands out disjoint ranges of it.
                let part = unsafe { std::slice::from_raw_parts_mut((base + from) as *mut u8, n) };
                src.read((at + from) as u64, part).map_err(guest_fault)
            })
        })
    }

    fn dtoh(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        out: &mut [u8],
    ) -> ExecResult<()> {
        let len = out.len();
        self.dtoh_with(stream, src, offset, len, &mut |at, bytes| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })
    }

    fn dtoh_into(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        len: u64,
        dst: &dyn GuestSink,
    ) -> ExecResult<()> {
        let len = usize::try_from(len)
            .map_err(|_| ExecError::new(Status::InvalidArgument, 0, "copy too large"))?;
        // Straight from the staging ring into the guest's pages.
        self.dtoh_with(stream, src, offset, len, &mut |at, bytes| {
            copy_in_parallel(bytes.len(), |from, n| {
                dst.write((at + from) as u64, &bytes[from..from + n])
                    .map_err(guest_fault)
            })
        })
    }

    fn register_host(&mut self, id: u64, mapping: &HostMapping) -> ExecResult<()> {
        // Each memory file once; the pieces name them by index.
        let mut files: Vec<&Arc<std::fs::File>> = Vec::new();
        let mut pieces = Vec::with_capacity(mapping.pieces.len());
        for piece in &mapping.pieces {
            let index = match files.iter().position(|f| Arc::ptr_eq(f, &piece.file)) {
                Some(i) => i,
                None => {
                    files.push(&piece.file);
                    files.len() - 1
                }
            };
            pieces.push((index as u32, piece.offset, piece.len));
        }
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let msg = ToWorker::RegisterHost {
            id,
            files: fds.len() as u32,
            pieces,
        };
        self.wait_creating_fds("register_host", &msg, &fds)
            .map(drop)
    }

    fn unregister_host(&mut self, id: u64) {
        self.defer_quiet("unregister_host", &ToWorker::UnregisterHost { id });
    }

    fn htod_host(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        // Waited for: the guest may reuse its buffer once this returns.
        let msg = ToWorker::HtodHost {
            stream: stream.0,
            dst: dst.0,
            offset,
            host,
            host_offset,
            len,
        };
        self.wait("htod_host", &msg).map(drop)
    }

    fn dtoh_host(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let msg = ToWorker::DtohHost {
            stream: stream.0,
            src: src.0,
            offset,
            host,
            host_offset,
            len,
        };
        self.wait("dtoh_host", &msg).map(drop)
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
        let msg = ToWorker::Dtod {
            stream: stream.0,
            dst: dst.0,
            dst_offset,
            src: src.0,
            src_offset,
            len,
        };
        self.defer("dtod", &msg)
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
        let msg = ToWorker::Memset {
            stream: stream.0,
            dst: dst.0,
            offset,
            len,
            value,
            width,
        };
        self.defer("memset", &msg)
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
        self.loaded = None;
        let id = self
            .wait_creating("load_module", &ToWorker::LoadModule { ptx })
            .map(ModuleId)?;
        self.loaded_module(id, Some(ptx));
        Ok(id)
    }

    fn load_module_image(&mut self, image: &[u8]) -> ExecResult<ModuleId> {
        if image.len() > MAX_MODULE_IMAGE_BYTES as usize {
            return Err(ExecError::new(
                Status::InvalidArgument,
                0,
                format!(
                    "a module image of {} bytes exceeds the {MAX_MODULE_IMAGE_BYTES}-byte limit",
                    image.len()
                ),
            ));
        }
        self.loaded = None;
        let id = self
            .wait_creating("load_module_image", &ToWorker::LoadModuleImage { image })
            .map(ModuleId)?;
        self.loaded_module(id, crate::image::as_ptx(image));
        Ok(id)
    }

    /// The parent keeps a cache of what the worker knows; see `attributes`.
    fn device_attributes(&mut self, count: u32) -> ExecResult<Vec<i32>> {
        if self.attributes.len() < count as usize {
            match self.ask("device_attributes", &ToWorker::DeviceAttributes { count })? {
                WireAnswer::Attributes(a) if a.len() == count as usize => self.attributes = a,
                _ => return Err(self.wrong_answer("device_attributes")),
            }
        }
        Ok(self.attributes[..count as usize].to_vec())
    }

    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        let kernel = WireKernel::from(&kernel);
        match self.ask("function_info", &ToWorker::FunctionInfo { kernel })? {
            WireAnswer::Function { attributes, params } => Ok(FunctionInfo { attributes, params }),
            _ => Err(self.wrong_answer("function_info")),
        }
    }

    fn module_global(&mut self, module: ModuleId, name: &str) -> ExecResult<(BufferId, u64)> {
        let msg = ToWorker::ModuleGlobal {
            module: module.0,
            name,
        };
        match self.ask("module_global", &msg)? {
            WireAnswer::Global { address, size } => Ok((BufferId(address), size)),
            _ => Err(self.wrong_answer("module_global")),
        }
    }

    fn compile(
        &mut self,
        source: &str,
        options: &[String],
        out_len: u32,
    ) -> ExecResult<CompileOutput> {
        let msg = ToWorker::Compile {
            source,
            options: options.iter().map(String::as_str).collect(),
            out_len,
        };
        let answer = self.ask("compile", &msg)?;
        answer
            .into_compile_output()
            .ok_or_else(|| self.wrong_answer("compile"))
    }

    fn unload_module(&mut self, module: ModuleId) {
        self.modules.remove(&module.0);
        self.module_costs.remove(&module.0);
        self.defer_quiet(
            "unload_module",
            &ToWorker::UnloadModule { module: module.0 },
        );
    }

    fn launch(
        &mut self,
        stream: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()> {
        // Launches are not waited for: what can be checked before is checked here, as
        // the executor would at launch time (a kernel the module lacks, parameters of the
        // wrong number or size).
        if let KernelRef::Module(module, name) = kernel {
            match self.modules.get(&module.0).map(|m| m.get(name)) {
                Some(None) => {
                    return Err(ExecError::new(
                        Status::KernelNotFound,
                        CUDA_ERROR_NOT_FOUND,
                        format!("the module has no kernel '{name}'"),
                    ))
                }
                Some(Some(Some(sizes))) => crate::cuda::check_params(params, sizes)?,
                _ => {}
            }
        }
        let kernel = WireKernel::from(&kernel);
        let params = params
            .iter()
            .map(|p| match p {
                ExecParam::Value(v) => WireParam::Value(v),
                ExecParam::Buffer(b) => WireParam::Buffer(b.0),
            })
            .collect();
        let msg = ToWorker::Launch {
            stream: stream.0,
            kernel,
            grid: shape.grid,
            block: shape.block,
            shared_bytes: shape.shared_bytes,
            params,
        };
        self.defer("launch", &msg)
    }

    fn sync(&mut self, stream: StreamId) -> ExecResult<()> {
        self.wait("sync", &ToWorker::Sync { stream: stream.0 })
            .map(drop)
    }

    fn poisoned(&self) -> bool {
        self.poisoned || self.lost.is_some() || self.kill.killed().is_some()
    }

    fn killer(&self) -> Option<Killer> {
        let kill = self.kill.clone();
        Some(Killer::new(move |timed_out| kill.kill(timed_out)))
    }

    fn meter(&self) -> Option<Arc<dyn DeviceMeter>> {
        Some(self.meter.clone())
    }

    fn alloc_footprint(&self, bytes: u64) -> u64 {
        (self.footprint)(bytes)
    }

    fn module_bytes(&self, module: ModuleId) -> u64 {
        self.module_costs.get(&module.0).map_or(0, |c| c.bytes)
    }

    /// From what the worker reported at start and with each module; for a kernel it did
    /// not report, asked once (a request that waits) and remembered. Launches never wait.
    fn local_reservation(&mut self, kernel: KernelRef<'_>) -> ExecResult<u64> {
        let known = match kernel {
            KernelRef::Builtin(spec) => self.builtin_locals.get(spec.name).copied(),
            KernelRef::Module(module, name) => {
                if let Some(None) = self.modules.get(&module.0).map(|m| m.get(name)) {
                    return Err(ExecError::new(
                        Status::KernelNotFound,
                        CUDA_ERROR_NOT_FOUND,
                        format!("the module has no kernel '{name}'"),
                    ));
                }
                self.module_costs
                    .get(&module.0)
                    .and_then(|c| c.locals.get(name).copied())
            }
        };
        if let Some(bytes) = known {
            return Ok(bytes);
        }
        let wire = WireKernel::from(&kernel);
        let bytes = self.wait(
            "local_reservation",
            &ToWorker::LocalReservation { kernel: wire },
        )?;
        match kernel {
            KernelRef::Builtin(spec) => {
                self.builtin_locals.insert(spec.name.to_string(), bytes);
            }
            KernelRef::Module(module, name) => {
                if let Some(c) = self.module_costs.get_mut(&module.0) {
                    c.locals.insert(name.to_string(), bytes);
                }
            }
        }
        Ok(bytes)
    }

    fn context_bytes(&self) -> u64 {
        self.context_bytes
    }
}

impl Drop for ProcessExecutor {
    fn drop(&mut self) {
        // A killed worker is not asked to exit: it is being killed already.
        let healthy = self.lost.is_none() && !self.poisoned && self.kill.killed().is_none();
        // A worker stuck in a kernel reads nothing: the request is given up at the
        // deadline like the wait for the exit.
        let deadline = Instant::now() + EXIT_GRACE;
        let asked = healthy && self.chan.send(&ToWorker::Exit, Some(deadline)).is_ok();
        let mut status = None;
        if asked {
            // The worker answers what is still in flight, then the exit request, then
            // exits; replies are read and dropped meanwhile so that it never waits to
            // write them.
            let mut nap = Duration::from_micros(100);
            let mut open = true;
            loop {
                match self.kill.try_wait(&mut self.child) {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        if open {
                            open = self.chan.discard(nap);
                        } else {
                            std::thread::sleep(nap);
                        }
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
            status = self.kill.kill_and_reap(&mut self.child);
        }
        self.kill.lock().sock = None;
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
            // SAFETY: `ptr` is what pin_host_memory registered in this executor.
            if let Err(e) = unsafe { exec.unpin_host_memory(ptr) } {
                log::debug!("staging area: {e}");
            }
        }
    }
}
/// The worker's side of the device meter: each device operation, once finished, is
/// counted in the meter page with its device time. A CUDA executor's operations are timed
/// on the device by a [`DeviceTimer`]; the CPU executor's by the clock around each one
/// (it does the work inside the call).
struct Progress {
    page: Arc<MeterPage>,
    timer: Option<DeviceTimer>,
    /// Device operations served one after another since the last request of another
    /// kind: a parent streaming launches has a streak; one that waits for each (launch,
    /// SYNC, launch...) does not.
    streak: u32,
}

impl Progress {
    fn new(page: MeterPage, hosted: &Hosted) -> Progress {
        let page = Arc::new(page);
        let timer = match hosted {
            Hosted::Cuda { exec, .. } => {
                let counts = page.clone();
                match DeviceTimer::new(exec, move |ops, ns| counts.finish(ops, ns)) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        log::warn!("device work is timed by the host clock: {e}");
                        None
                    }
                }
            }
            Hosted::Plain(_) => None,
        };
        Progress {
            page,
            timer,
            streak: 0,
        }
    }

    /// Before a request: for a device operation, the time it starts (and a timed unit
    /// opened on its stream); any other request ends the open unit first.
    fn before(&mut self, hosted: &Hosted, msg: &ToWorker<'_>) -> Option<Instant> {
        if !is_device_op(msg) {
            self.streak = 0;
            self.idle();
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        if let (Some(timer), Hosted::Cuda { exec, .. }, Some(stream)) =
            (&mut self.timer, hosted, op_stream(msg))
        {
            timer.before(exec, StreamId(stream));
        }
        Some(Instant::now())
    }

    /// After a request; `started` is what [`Progress::before`] returned.
    fn after(&mut self, started: Option<Instant>) {
        let Some(started) = started else {
            return;
        };
        match &mut self.timer {
            Some(timer) => timer.after(),
            None => self.page.finish(
                1,
                started.elapsed().as_nanos().try_into().unwrap_or(u64::MAX),
            ),
        }
    }

    /// Ends the open unit.
    fn idle(&mut self) {
        if let Some(timer) = &mut self.timer {
            timer.close();
        }
    }

    /// Before the worker blocks for more requests: a unit that is open stays open while
    /// more arrive within [`UNIT_LINGER`] when the parent is streaming device operations
    /// (a stream of launches then fills one unit rather than timing each launch alone,
    /// which would cost the timer's thread more than the launches), and is ended at once
    /// otherwise, or once none arrives. A parent that waits for each operation (a launch,
    /// then SYNC) has no streak, so its unit ends at once and nothing it waits for is held
    /// by the linger.
    fn before_blocking(&mut self, fd: RawFd) {
        if !self.timer.as_ref().is_some_and(DeviceTimer::is_open) {
            return;
        }
        let wait = if self.streak >= STREAK_TO_LINGER {
            unit_linger()
        } else {
            Duration::ZERO
        };
        let linger = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as libc::c_long,
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd and a valid timeout; no signal mask is changed.
        let ready = unsafe { libc::ppoll(&mut p, 1, &linger, ptr::null()) };
        if ready <= 0 {
            self.idle();
        }
    }
}

/// How long a timed unit stays open for more operations once the worker has read all it
/// was sent, when the parent streams them.
const UNIT_LINGER: Duration = Duration::from_micros(50);

/// Device operations in a row that make a stream worth lingering for.
const STREAK_TO_LINGER: u32 = 2;

/// [`UNIT_LINGER`], or `VGPU_UNIT_LINGER_US` microseconds (0 to 999,999) from the
/// environment, for benchmarks that compare settings.
fn unit_linger() -> Duration {
    static LINGER: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LINGER.get_or_init(|| {
        std::env::var("VGPU_UNIT_LINGER_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us < 1_000_000)
            .map_or(UNIT_LINGER, Duration::from_micros)
    })
}

/// Opens the executor the start message asks for.
fn open_executor(init: &Init<'_>, staging: &Staging) -> ExecResult<Hosted> {
    match init.kind {
        WireKind::Cpu => Ok(Hosted::Plain(Box::new(CpuExecutor::default()))),
        WireKind::CpuFaultSim => Ok(Hosted::Plain(Box::new(FaultSim::default()))),
        WireKind::Cuda => {
            let factory = CudaExecutorFactory::from_ptx(init.ordinal as usize, init.catalog_ptx)
                .map_err(|e| ExecError::new(Status::Internal, 0, e.to_string()))?
                .with_context_bytes(init.context_bytes);
            let mut exec = factory.create_executor()?;
            // This process is the session's own: the guest's sources may be compiled here.
            exec.enable_compile();
            // SAFETY: the staging mapping outlives the executor: `serve` shuts the
            // executor down (unregistering first) before the mapping is dropped.
            let registered = match unsafe { exec.pin_host_memory(staging.as_ptr(), staging.len) } {
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
    }
}

/// What a worker does to itself once its executor is open (see [`crate::sandbox`]).
#[derive(Clone, Debug)]
pub struct WorkerConfinement {
    pub seccomp: bool,
    pub jit_cpu_seconds: u64,
}

/// What the start message asks for.
#[derive(Debug)]
struct Init<'a> {
    kind: WireKind,
    ordinal: u32,
    catalog_ptx: &'a str,
    context_bytes: u64,
}

/// Reads the start message: the executor to open, or why the parent cannot be served.
fn read_init(frame: &[u8]) -> ExecResult<Init<'_>> {
    let bad = || ExecError::new(Status::Internal, 0, "malformed start message");
    // `Init` is variant 0 with the version first in every version of the messages.
    let (variant, rest) = postcard::take_from_bytes::<u32>(frame).map_err(|_| bad())?;
    if variant != 0 {
        return Err(ExecError::new(
            Status::Internal,
            0,
            "expected a start message",
        ));
    }
    let (version, _) = postcard::take_from_bytes::<u32>(rest).map_err(|_| bad())?;
    if version != WIRE_VERSION {
        return Err(ExecError::new(
            Status::Internal,
            0,
            format!("message version {version}, this worker speaks {WIRE_VERSION}"),
        ));
    }
    match decode(frame).map_err(|_| bad())? {
        ToWorker::Init {
            kind,
            ordinal,
            catalog_ptx,
            context_bytes,
            ..
        } => Ok(Init {
            kind,
            ordinal,
            catalog_ptx,
            context_bytes,
        }),
        _ => Err(bad()),
    }
}

/// Why a worker stopped serving its parent other than by being asked to (or by the parent
/// closing the channel): what `vgpu-executor-worker` prints before it exits with a failure.
///
/// Its `Display` is one line, the system's reason included: the `io::Error`s and the
/// executor error are fields rather than sources, so that the reason is not repeated by a
/// printer that walks `source()`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An inherited descriptor (`flag` names the option that passed it) is not open.
    #[error("{flag} {fd} is not an open file descriptor")]
    NotOpen { flag: &'static str, fd: RawFd },
    #[error("--socket-fd and --staging-fd are the same")]
    SameFd,
    #[error("--staging-bytes {0} is too small")]
    StagingTooSmall(usize),
    #[error("cannot map the staging area: {0}")]
    MapStaging(io::Error),
    #[error("cannot map the meter page: {0}")]
    MapMeter(io::Error),
    /// The parent's start message did not arrive.
    #[error("no start message: {0}")]
    NoStartMessage(io::Error),
    /// The executor the start message asks for did not open (the parent was told why).
    #[error("cannot open the executor: {0}")]
    OpenExecutor(ExecError),
    /// The parent could not be told that the executor is ready.
    #[error("cannot answer the parent: {0}")]
    Ready(io::Error),
    /// Replies could not be sent.
    #[error("answering: {0}")]
    Answer(io::Error),
    /// Requests could not be read.
    #[error("receiving: {0}")]
    Receive(io::Error),
}

/// Serves one executor to the parent over the inherited socket `socket_fd`, with the
/// inherited staging memfd `staging_fd` of `staging_bytes`. Returns when the parent asks
/// the worker to exit or closes the socket. This is `vgpu-executor-worker`'s body.
///
/// Requests are served one at a time, in order, each answered before the next is read;
/// an HTOD is answered once its bytes have left the staging area, a DTOH once they are
/// in it.
pub fn serve(
    socket_fd: RawFd,
    staging_fd: RawFd,
    staging_bytes: usize,
    confinement: &WorkerConfinement,
) -> Result<(), ServeError> {
    for (fd, flag) in [(socket_fd, "--socket-fd"), (staging_fd, "--staging-fd")] {
        // SAFETY: only queries the fd's flags.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ServeError::NotOpen { flag, fd });
        }
    }
    if socket_fd == staging_fd {
        return Err(ServeError::SameFd);
    }
    // SAFETY: both fds were inherited for this process alone and are owned from here on.
    let (sock, memfd) = unsafe {
        (
            UnixStream::from_raw_fd(socket_fd),
            OwnedFd::from_raw_fd(staging_fd),
        )
    };
    if staging_bytes < MIN_STAGING_BYTES {
        return Err(ServeError::StagingTooSmall(staging_bytes));
    }
    let mut staging =
        Staging::map(memfd.as_raw_fd(), staging_bytes).map_err(ServeError::MapStaging)?;
    let meter = MeterPage::map(memfd.as_raw_fd(), staging_bytes).map_err(ServeError::MapMeter)?;
    drop(memfd);
    let fd = sock.as_raw_fd();
    let mut out = Vec::new();
    // Requests are read in bulk, as many as have arrived, with the files that came with
    // them (host buffers' memory files), in order: the start message first.
    let mut rx = WorkerRx::default();
    let mut files = Vec::new();
    let init = loop {
        match rx.next_frame() {
            Ok(Some(range)) => break range,
            Ok(None) => rx
                .fill(fd, &mut files)
                .map_err(ServeError::NoStartMessage)?,
            Err(e) => return Err(ServeError::NoStartMessage(e)),
        }
    };
    let opened = read_init(&rx.data[init]).and_then(|init| open_executor(&init, &staging));
    // The executor is open (the driver initialised with trusted input); from here on
    // everything is the guest's, so the allow-list goes on before the first request.
    let opened = opened.and_then(|h| {
        if confinement.seccomp {
            crate::sandbox::install_seccomp()
                .map_err(|e| ExecError::new(Status::Internal, 0, e.to_string()))?;
        }
        Ok(h)
    });
    let mut hosted = match opened {
        Ok(h) => h,
        Err(e) => {
            let failed = FromWorker::StartFailed { error: (&e).into() };
            if encode(&failed, &mut out).is_ok() {
                let _ = send_frame(fd, &out);
            }
            return Err(ServeError::OpenExecutor(e));
        }
    };
    let ready = FromWorker::Ready {
        pinned: matches!(
            hosted,
            Hosted::Cuda {
                registered: Some(_),
                ..
            }
        ),
        executor: match &hosted {
            Hosted::Cuda { .. } => "CUDA".into(),
            Hosted::Plain(_) => "CPU".into(),
        },
        context_bytes: hosted.exec().context_bytes(),
        builtin_locals: builtin_locals(hosted.exec()),
    };
    // Before the first request: the timer's thread starts while threads may still start.
    let mut progress = Progress::new(meter, &hosted);
    encode(&ready, &mut out)
        .and_then(|()| send_frame(fd, &out))
        .map_err(ServeError::Ready)?;

    // Replies to requests nobody waits for (launch, memset, ...) are sent together:
    // before the worker would block for more requests, after any other request, and
    // whenever 1,024 of them wait.
    let pinned = matches!(
        hosted,
        Hosted::Cuda {
            registered: Some(_),
            ..
        }
    );
    // Replies not sent yet, each marked when it answers an HTOD whose copy may still run.
    let mut replies: Vec<(bool, FromWorker)> = Vec::new();
    let result = loop {
        let range = match rx.next_frame() {
            Ok(Some(range)) => range,
            Ok(None) => {
                // Nothing more to run for now: the answers go, and the operations so far
                // are timed as a unit unless more come at once.
                if let Err(e) = send_replies(fd, hosted.exec(), &mut replies, &mut out) {
                    break Err(ServeError::Answer(e));
                }
                progress.before_blocking(fd);
                match rx.fill(fd, &mut files) {
                    Ok(()) => continue,
                    // The parent closed the channel: nothing left to serve.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                    Err(e) => break Err(ServeError::Receive(e)),
                }
            }
            Err(e) => break Err(ServeError::Receive(e)),
        };
        let msg = decode::<ToWorker<'_>>(&rx.data[range]);
        let is_htod = matches!(msg, Ok(ToWorker::Htod { .. }));
        let batched = is_htod
            || matches!(
                msg,
                Ok(ToWorker::Launch { .. }
                    | ToWorker::Memset { .. }
                    | ToWorker::Dtod { .. }
                    | ToWorker::Free { .. }
                    | ToWorker::UnloadModule { .. }
                    | ToWorker::CloseStream { .. })
            );
        let started = match &msg {
            Ok(m) => progress.before(&hosted, m),
            Err(_) => None,
        };
        // A module load is answered with what the module holds on the device.
        let module_kernels = match &msg {
            Ok(ToWorker::LoadModule { ptx }) => Some(
                crate::ptx::entries(ptx)
                    .map(|e| e.into_keys().collect::<Vec<_>>())
                    .unwrap_or_default(),
            ),
            Ok(ToWorker::LoadModuleImage { image }) => Some(crate::image::symbols(image).functions),
            _ => None,
        };
        let handled = msg.and_then(|msg| match answer(hosted.exec(), &msg, confinement) {
            Some(answered) => Ok(Served::Answer(answered)),
            None => handle(
                hosted.exec(),
                &mut staging,
                msg,
                confinement,
                &mut files,
                pinned,
            )
            .map(|r| r.map_or(Served::Exit, Served::Value)),
        });
        progress.after(started);
        if handled.is_err() {
            // A message that did not make sense: files waiting for it mean nothing now.
            files.clear();
        }
        let (served, exit) = match handled {
            Ok(Served::Exit) => (Served::Value(Ok(0)), true),
            Ok(served) => (served, false),
            Err(e) => (
                Served::Value(Err(ExecError::new(
                    Status::Internal,
                    0,
                    format!("executor worker: {e}"),
                ))),
                false,
            ),
        };
        let poisoned = hosted.exec().poisoned();
        let reply = match (served, module_kernels) {
            (Served::Answer(result), _) => FromWorker::Answer {
                poisoned,
                result: result.map_err(|e| WireError::from(&e)),
            },
            (Served::Value(result), Some(kernels)) => {
                let result = result.map(|id| module_reply(hosted.exec(), id, kernels));
                FromWorker::Module {
                    poisoned: hosted.exec().poisoned(),
                    result: result.map_err(|e| WireError::from(&e)),
                }
            }
            (Served::Value(result), None) => FromWorker::Reply {
                poisoned,
                result: result.map_err(|e| WireError::from(&e)),
            },
            (Served::Exit, _) => unreachable!("turned into a reply above"),
        };
        replies.push((is_htod, reply));
        if !batched || exit || replies.len() >= 1024 {
            if let Err(e) = send_replies(fd, hosted.exec(), &mut replies, &mut out) {
                break Err(ServeError::Answer(e));
            }
        }
        if exit {
            break Ok(());
        }
    };
    drop(progress);
    hosted.shut_down();
    drop(staging);
    result
}

/// [`Executor::local_reservation`] of every built-in kernel the executor can say.
fn builtin_locals(exec: &mut dyn Executor) -> Vec<(String, u64)> {
    vgpu_kernels::CATALOG
        .iter()
        .filter_map(|spec| {
            let bytes = exec.local_reservation(KernelRef::Builtin(spec)).ok()?;
            Some((spec.name.to_string(), bytes))
        })
        .collect()
}

/// The answer to a module load: the module's id, its device bytes, and the local memory
/// reservation of each of `kernels` the executor can say.
fn module_reply(exec: &mut dyn Executor, id: u64, kernels: Vec<String>) -> WireModule {
    let module = ModuleId(id);
    let locals = kernels
        .into_iter()
        .filter_map(|name| {
            let bytes = exec
                .local_reservation(KernelRef::Module(module, &name))
                .ok()?;
            Some((name, bytes))
        })
        .collect();
    WireModule {
        id,
        bytes: exec.module_bytes(module),
        locals,
    }
}

/// Sends the replies waiting in `replies`, in one write, once the staged copies they
/// answer have read their source ([`Executor::fence`]): the parent reuses an HTOD's
/// staging region as soon as it reads the reply. If the fence fails, those HTODs are
/// answered with its error and every reply says the executor is poisoned if it is.
fn send_replies(
    fd: RawFd,
    exec: &mut dyn Executor,
    replies: &mut Vec<(bool, FromWorker)>,
    frame: &mut Vec<u8>,
) -> io::Result<()> {
    if replies.is_empty() {
        return Ok(());
    }
    if replies.iter().any(|(htod, _)| *htod) {
        if let Err(e) = exec.fence() {
            let poisoned_now = exec.poisoned();
            for (htod, reply) in replies.iter_mut() {
                if let FromWorker::Reply { poisoned, result } = reply {
                    *poisoned |= poisoned_now;
                    if *htod && result.is_ok() {
                        *result = Err(WireError::from(&e));
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    for (_, reply) in replies.drain(..) {
        encode(&reply, frame)?;
        bytes.extend_from_slice(frame);
    }
    send_frame(fd, &bytes)
}

/// What serving one request gave.
enum Served {
    /// A number (or nothing) for `Reply`, or a module's id for `Module`.
    Value(ExecResult<u64>),
    /// Data for `Answer`.
    Answer(ExecResult<WireAnswer>),
    /// The exit request.
    Exit,
}

/// Runs a request answered with `Answer`; `None` for any other request.
fn answer(
    exec: &mut dyn Executor,
    msg: &ToWorker<'_>,
    confinement: &WorkerConfinement,
) -> Option<ExecResult<WireAnswer>> {
    Some(match *msg {
        ToWorker::DeviceAttributes { count } => {
            exec.device_attributes(count).map(WireAnswer::Attributes)
        }
        ToWorker::FunctionInfo { kernel } => {
            let kernel = kernel.resolve();
            kernel
                .and_then(|k| exec.function_info(k))
                .map(|info| WireAnswer::Function {
                    attributes: info.attributes,
                    params: info.params,
                })
        }
        ToWorker::ModuleGlobal { module, name } => exec
            .module_global(ModuleId(module), name)
            .map(|(b, size)| WireAnswer::Global { address: b.0, size }),
        ToWorker::Compile {
            source,
            ref options,
            out_len,
        } => {
            // NVRTC reads the guest's source here: its CPU time is bounded like a JIT
            // compilation's (the kernel timeout bounds the wait for it too).
            let _limit = crate::sandbox::JitCpuLimit::arm(confinement.jit_cpu_seconds);
            let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            exec.compile(source, &options, out_len)
                .map(WireAnswer::from)
        }
        _ => return None,
    })
}

/// Runs one request; `Ok(None)` for the exit request.
fn handle(
    exec: &mut dyn Executor,
    staging: &mut Staging,
    msg: ToWorker<'_>,
    confinement: &WorkerConfinement,
    files: &mut Vec<OwnedFd>,
    pinned: bool,
) -> io::Result<Option<ExecResult<u64>>> {
    let result = match msg {
        ToWorker::Init { .. } => return Err(malformed()),
        ToWorker::OpenStream => exec.open_stream().map(|s| s.0),
        ToWorker::CloseStream { stream } => {
            exec.close_stream(StreamId(stream));
            Ok(0)
        }
        ToWorker::Alloc { bytes } => exec.alloc(bytes).map(|b| b.0),
        ToWorker::Free { buffer } => {
            exec.free(BufferId(buffer));
            Ok(0)
        }
        ToWorker::Htod {
            stream,
            dst,
            offset,
            staged,
        } => {
            let (at, n) = staging.region(staged)?;
            // From page-locked staging the copy may run on: its reply is sent only after a
            // fence (see `serve`), and the parent reuses the region only after the reply.
            let data = staging.slice(at, n);
            let (stream, dst) = (StreamId(stream), BufferId(dst));
            if pinned {
                exec.htod_staged(stream, dst, offset, data)
            } else {
                exec.htod(stream, dst, offset, data)
            }
            .map(|()| 0)
        }
        ToWorker::Dtoh {
            stream,
            src,
            offset,
            staged,
        } => {
            let (at, n) = staging.region(staged)?;
            exec.dtoh(
                StreamId(stream),
                BufferId(src),
                offset,
                staging.slice_mut(at, n),
            )
            .map(|()| 0)
        }
        ToWorker::Dtod {
            stream,
            dst,
            dst_offset,
            src,
            src_offset,
            len,
        } => exec
            .dtod(
                StreamId(stream),
                BufferId(dst),
                dst_offset,
                BufferId(src),
                src_offset,
                len,
            )
            .map(|()| 0),
        ToWorker::Memset {
            stream,
            dst,
            offset,
            len,
            value,
            width,
        } => exec
            .memset(StreamId(stream), BufferId(dst), offset, len, value, width)
            .map(|()| 0),
        ToWorker::LoadModule { ptx } => {
            let _limit = crate::sandbox::JitCpuLimit::arm(confinement.jit_cpu_seconds);
            exec.load_module(ptx).map(|m| m.0)
        }
        ToWorker::LoadModuleImage { image } => {
            // The driver parses the guest's image (and JIT-compiles any PTX in it) here.
            let _limit = crate::sandbox::JitCpuLimit::arm(confinement.jit_cpu_seconds);
            exec.load_module_image(image).map(|m| m.0)
        }
        ToWorker::DeviceAttributes { .. }
        | ToWorker::FunctionInfo { .. }
        | ToWorker::ModuleGlobal { .. }
        | ToWorker::Compile { .. } => return Err(malformed()),
        ToWorker::UnloadModule { module } => {
            exec.unload_module(ModuleId(module));
            Ok(0)
        }
        ToWorker::Launch {
            stream,
            kernel,
            grid,
            block,
            shared_bytes,
            params,
        } => {
            let kernel = kernel.resolve();
            let shape = LaunchShape {
                grid,
                block,
                shared_bytes,
            };
            let params: Vec<ExecParam> = params
                .into_iter()
                .map(|p| match p {
                    WireParam::Value(v) => ExecParam::Value(v.to_vec()),
                    WireParam::Buffer(b) => ExecParam::Buffer(BufferId(b)),
                })
                .collect();
            kernel.and_then(|k| {
                exec.launch(StreamId(stream), k, &shape, &params)
                    .map(|()| 0)
            })
        }
        ToWorker::Sync { stream } => exec.sync(StreamId(stream)).map(|()| 0),
        ToWorker::Exit => return Ok(None),
        ToWorker::RegisterHost {
            id,
            files: count,
            pieces,
        } => {
            // The files came with this request, after those of earlier ones.
            if files.len() < count as usize {
                return Err(malformed());
            }
            let files: Vec<Arc<std::fs::File>> = files
                .drain(..count as usize)
                .map(|f| Arc::new(std::fs::File::from(f)))
                .collect();
            let mut mapping = HostMapping::default();
            for (file, offset, len) in pieces {
                let file = files.get(file as usize).ok_or_else(malformed)?.clone();
                mapping.pieces.push(FilePiece { file, offset, len });
            }
            exec.register_host(id, &mapping).map(|()| 0)
        }
        ToWorker::UnregisterHost { id } => {
            exec.unregister_host(id);
            Ok(0)
        }
        ToWorker::HtodHost {
            stream,
            dst,
            offset,
            host,
            host_offset,
            len,
        } => exec
            .htod_host(
                StreamId(stream),
                BufferId(dst),
                offset,
                host,
                host_offset,
                len,
            )
            .map(|()| 0),
        ToWorker::DtohHost {
            stream,
            src,
            offset,
            host,
            host_offset,
            len,
        } => exec
            .dtoh_host(
                StreamId(stream),
                BufferId(src),
                offset,
                host,
                host_offset,
                len,
            )
            .map(|()| 0),
        ToWorker::LocalReservation { kernel } => {
            kernel.resolve().and_then(|k| exec.local_reservation(k))
        }
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
    fn device_attributes(&mut self, count: u32) -> ExecResult<Vec<i32>> {
        self.check()?;
        self.inner.device_attributes(count)
    }
    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        self.check()?;
        self.inner.function_info(kernel)
    }
    fn poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Bytes;

    fn payload(frame: &[u8]) -> &[u8] {
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn messages_round_trip_in_frames_and_damage_is_malformed() {
        let value = [1u8, 2, 3];
        let msg = ToWorker::Launch {
            stream: 7,
            kernel: WireKernel::Module {
                module: 3,
                name: "k",
            },
            grid: [1, 2, 3],
            block: [32, 1, 1],
            shared_bytes: 9,
            params: vec![WireParam::Value(&value), WireParam::Buffer(1 << 40)],
        };
        let mut frame = Vec::new();
        encode(&msg, &mut frame).unwrap();
        let body = payload(&frame);
        assert_eq!(decode::<ToWorker<'_>>(body).unwrap(), msg);
        // The value is one byte string: its length, then its bytes.
        assert!(body.windows(4).any(|w| w == [3, 1, 2, 3]), "{body:?}");
        // Truncated, or with bytes left over: malformed.
        for bad in [&body[..body.len() - 1], &[body, &[0]].concat()[..]] {
            let e = decode::<ToWorker<'_>>(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
        let e = decode::<ToWorker<'_>>(&[200]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn replies_carry_the_error_and_the_poisoned_flag() {
        let e = ExecError::new(Status::OutOfRange, 3, "past the end");
        let reply = FromWorker::Reply {
            poisoned: true,
            result: Err((&e).into()),
        };
        let mut frame = Vec::new();
        encode(&reply, &mut frame).unwrap();
        match decode(payload(&frame)).unwrap() {
            FromWorker::Reply {
                poisoned: true,
                result: Err(w),
            } => assert_eq!(ExecError::from(w), e),
            other => panic!("{other:?}"),
        }
        let unknown = WireError {
            status: 0xffff,
            detail: 1,
            message: "?".into(),
        };
        assert_eq!(ExecError::from(unknown).status, Status::Internal);
        let ready = FromWorker::Ready {
            pinned: true,
            executor: "CUDA".into(),
            context_bytes: 500 << 20,
            builtin_locals: vec![("fill_u32".into(), 0), ("matmul_f32".into(), 1 << 20)],
        };
        encode(&ready, &mut frame).unwrap();
        assert_eq!(decode::<FromWorker>(payload(&frame)).unwrap(), ready);
        let loaded = FromWorker::Module {
            poisoned: false,
            result: Ok(WireModule {
                id: 7,
                bytes: 4 << 20,
                locals: vec![("big_local".into(), 66 << 30)],
            }),
        };
        encode(&loaded, &mut frame).unwrap();
        assert_eq!(decode::<FromWorker>(payload(&frame)).unwrap(), loaded);
        let asked = ToWorker::LocalReservation {
            kernel: WireKernel::Module {
                module: 7,
                name: "big_local",
            },
        };
        encode(&asked, &mut frame).unwrap();
        assert_eq!(decode::<ToWorker<'_>>(payload(&frame)).unwrap(), asked);
    }

    #[test]
    fn driver_api_requests_and_answers_round_trip() {
        let image = [0x7f, b'E', b'L', b'F', 2, 1, 0, 9];
        let requests = [
            ToWorker::LoadModuleImage { image: &image },
            ToWorker::DeviceAttributes { count: 1024 },
            ToWorker::FunctionInfo {
                kernel: WireKernel::Builtin {
                    name: "vector_add_f32",
                },
            },
            ToWorker::ModuleGlobal {
                module: 3,
                name: "table",
            },
            ToWorker::Compile {
                source: "__global__ void k() {}",
                options: vec!["-std=c++17", "-DN=4"],
                out_len: 1 << 20,
            },
        ];
        let mut frame = Vec::new();
        for msg in requests {
            encode(&msg, &mut frame).unwrap();
            assert_eq!(decode::<ToWorker<'_>>(payload(&frame)).unwrap(), msg);
        }
        // The image is one byte string, borrowed from the frame.
        encode(&ToWorker::LoadModuleImage { image: &image }, &mut frame).unwrap();
        assert!(payload(&frame).ends_with(&[8, 0x7f, b'E', b'L', b'F', 2, 1, 0, 9]));
        let answers = [
            WireAnswer::Attributes(vec![1024, -1, 0]),
            WireAnswer::Function {
                attributes: [1024, 0, 0, 0, 32, 90, 90, 0, 49152, -1],
                params: vec![(0, 8), (8, 4)],
            },
            WireAnswer::Global {
                address: 0x7f00_0000_1000,
                size: 64,
            },
            WireAnswer::Compiled {
                ptx: Bytes(b".version 8.0".to_vec()),
                log: Bytes(vec![]),
            },
            WireAnswer::CompileFailed {
                code: 6,
                log: Bytes(b"error".to_vec()),
                log_len: 900,
            },
            WireAnswer::CompileTooLarge { needed: 70000 },
        ];
        for a in answers {
            let reply = FromWorker::Answer {
                poisoned: false,
                result: Ok(a),
            };
            encode(&reply, &mut frame).unwrap();
            assert_eq!(decode::<FromWorker>(payload(&frame)).unwrap(), reply);
        }
        let failed = FromWorker::Answer {
            poisoned: true,
            result: Err((&ExecError::new(Status::KernelNotFound, 500, "no")).into()),
        };
        encode(&failed, &mut frame).unwrap();
        assert_eq!(decode::<FromWorker>(payload(&frame)).unwrap(), failed);
    }

    #[test]
    fn a_frame_holds_the_largest_image_and_compiler_output() {
        assert!(MAX_FRAME > MAX_MODULE_IMAGE_BYTES as usize + 1024);
        assert!(MAX_FRAME > MAX_COMPILE_OUTPUT_BYTES as usize + 1024);
        assert!(MAX_FRAME > (MAX_PTX_BYTES + MAX_COMPILE_OPTIONS_BYTES) as usize + 1024);
    }

    #[test]
    fn the_start_message_begins_with_its_variant_and_the_version() {
        let init = ToWorker::Init {
            version: WIRE_VERSION,
            kind: WireKind::Cuda,
            ordinal: 1,
            catalog_ptx: ".version 8.0",
            context_bytes: 500 << 20,
        };
        let mut frame = Vec::new();
        encode(&init, &mut frame).unwrap();
        let read = read_init(payload(&frame)).unwrap();
        assert_eq!((read.ordinal, read.context_bytes), (1, 500 << 20));
        let old = ToWorker::Init {
            version: WIRE_VERSION - 1,
            kind: WireKind::Cpu,
            ordinal: 0,
            catalog_ptx: "",
            context_bytes: 0,
        };
        encode(&old, &mut frame).unwrap();
        let e = read_init(payload(&frame)).unwrap_err();
        assert!(
            e.message
                .contains(&format!("message version {}", WIRE_VERSION - 1)),
            "{e}"
        );
        encode(&ToWorker::OpenStream, &mut frame).unwrap();
        let e = read_init(payload(&frame)).unwrap_err();
        assert!(e.message.contains("expected a start message"), "{e}");
    }

    #[test]
    fn the_staging_ring_hands_out_regions_in_order_and_wraps() {
        let mut ring = Ring::new(4096);
        assert_eq!(piece_bytes(4096), 512);
        assert_eq!(piece_bytes(64 << 20), 8 << 20);
        assert_eq!(ring.alloc(1000), Some(0)); // [0, 1024)
        assert_eq!(ring.alloc(2048), Some(1024)); // [1024, 3072)
        assert_eq!(ring.alloc(1), Some(3072)); // [3072, 3328)
        assert_eq!(ring.alloc(1024), None); // 768 left at the end, none at the start
        ring.release_oldest();
        assert_eq!(ring.alloc(1024), Some(0)); // wraps: [0, 1024)
        assert_eq!(ring.alloc(256), None); // [1024, ...) is still in use
        ring.release_oldest();
        assert_eq!(ring.alloc(2048), Some(1024));
        assert_eq!(ring.alloc(1), None); // full: head meets tail
        ring.release_oldest();
        ring.release_oldest();
        ring.release_oldest();
        assert_eq!(ring.alloc(4096), Some(0)); // empty again: from the start
    }

    /// A worker that answers its requests one by one, each with a large reply, before it
    /// reads more: the parent sends far more than the socket holds without reading a
    /// reply, and neither side blocks the other.
    #[test]
    fn sends_never_deadlock_against_replies() {
        let (parent, child) = UnixStream::pair().unwrap();
        let requests = 3000;
        let worker = std::thread::spawn(move || {
            let (mut rx, mut files) = (WorkerRx::default(), Vec::new());
            let mut out = Vec::new();
            let message = "x".repeat(4000);
            for _ in 0..requests {
                while rx.next_frame().unwrap().is_none() {
                    rx.fill(child.as_raw_fd(), &mut files).unwrap();
                }
                let reply = FromWorker::Reply {
                    poisoned: false,
                    result: Err(WireError {
                        status: Status::Internal as u32,
                        detail: 0,
                        message: message.clone(),
                    }),
                };
                encode(&reply, &mut out).unwrap();
                send_frame(child.as_raw_fd(), &out).unwrap();
            }
        });
        let mut chan = Channel::new(parent);
        let ptx = "p".repeat(1000);
        for _ in 0..requests {
            let msg = ToWorker::LoadModule { ptx: &ptx };
            assert!(chan.send(&msg, None).is_ok());
        }
        for _ in 0..requests {
            let reply = chan.recv(Some(Instant::now() + Duration::from_secs(30)), None);
            assert!(matches!(reply, Ok(FromWorker::Reply { .. })));
        }
        worker.join().unwrap();
        assert!(matches!(
            chan.recv(None, None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
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
        assert!(
            matches!(&e, SetupError::Worker(m) if m.starts_with(WORKER_ENV)),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
