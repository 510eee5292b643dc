// SPDX-License-Identifier: Apache-2.0
//! How requests reach the device: the [`Transport`] trait, the guest driver's char device
//! ([`CharDevTransport`]) and an in-process transport for tests and host-side tools
//! ([`InProcessTransport`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use vgpu_protocol::{
    Command, DeviceConfig, Header, InfoReply, Op, Opcode, Request, Response, ResponseHeader,
    Status, CONFIG_SIZE, REQUEST_HEADER_SIZE, RESPONSE_HEADER_SIZE,
};

use crate::error::{Error, Result};

/// Most readable payload one asynchronous request may carry (`VGPU_ASYNC_MAX_BYTES`).
pub const ASYNC_MAX_BYTES: usize = 64 << 10;

/// Longest a synchronous request polls for its answer, in microseconds
/// (`VGPU_POLL_MAX_US`); longer settings are taken as this.
pub const POLL_MAX_US: u32 = 1000;

/// An asynchronous request of the session that failed, reported with a later
/// synchronous one (the way CUDA reports an earlier asynchronous error at the next call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncFailure {
    /// The failed request's operation, as the protocol names it (`"LAUNCH"`).
    pub op: &'static str,
    pub status: Status,
    pub detail: u32,
}

/// The answer to a synchronous request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's own response: it ran, whatever `earlier` says.
    pub response: ResponseHeader,
    /// The first failure of the session's asynchronous requests since the last report.
    pub earlier: Option<AsyncFailure>,
}

/// One session's path to the device.
///
/// A transport is one session: it opens it when created and closes it when dropped, and
/// it fills in the session of every header it sends (callers leave it 0). Object safe,
/// so a [`crate::Session`] can run over the guest driver or over an in-process device.
pub trait Transport: Send + Sync {
    /// Sends one request: `header`, then the readable payload `input` (the slices in
    /// order), and lets the device write the writable payload into `output` (in order).
    /// Returns the response header, whatever its status; an earlier asynchronous
    /// failure reported with it takes the place of its status and detail.
    fn submit(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader>;

    /// [`Transport::submit`], with an earlier asynchronous failure kept apart from the
    /// request's own response. The default reports none.
    fn submit_reply(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<Reply> {
        Ok(Reply {
            response: self.submit(header, input, output)?,
            earlier: None,
        })
    }

    /// Queues a LAUNCH, MEMSET, DTOD or HTOD (at most [`ASYNC_MAX_BYTES`] of `input`)
    /// without waiting for its answer: `Ok(None)` once queued, and `input` may be reused
    /// at once. A failure is reported by a later synchronous request
    /// ([`Reply::earlier`]). A transport that cannot queue sends the request
    /// synchronously and returns its reply: the default.
    fn submit_async(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
    ) -> Result<Option<Reply>> {
        self.submit_reply(header, input, &mut []).map(Some)
    }

    /// Has every later synchronous request poll for its answer for up to `us`
    /// microseconds (at most [`POLL_MAX_US`]) before it sleeps until the device's
    /// interrupt; 0 turns polling off. A transport that cannot poll ignores it: the
    /// default.
    fn set_poll_us(&self, us: u32) {
        let _ = us;
    }

    /// The polling set with [`Transport::set_poll_us`]; 0 when off or not supported.
    fn poll_us(&self) -> u32 {
        0
    }

    /// The device's config space.
    fn config(&self) -> Result<DeviceConfig>;

    /// Host memory that large copies can use with few descriptors. The default is
    /// ordinary zeroed, page-aligned memory.
    fn host_memory(&self, bytes: usize) -> Result<HostMemory> {
        HostMemory::anonymous(bytes)
    }
}

/// A page-aligned, zeroed mapping of host memory, unmapped on drop.
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
    contiguous: bool,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through &/&mut.
unsafe impl Send for HostMemory {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for HostMemory {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

impl HostMemory {
    /// Ordinary anonymous memory.
    pub fn anonymous(bytes: usize) -> Result<HostMemory> {
        Self::map(bytes, None)
    }

    /// Maps `bytes` from `fd` (shared) or anonymous memory (private).
    fn map(bytes: usize, fd: Option<&File>) -> Result<HostMemory> {
        if bytes == 0 {
            return Err(Error::invalid("a host buffer of 0 bytes"));
        }
        let page = page_size();
        let map_len = bytes
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::invalid(format!("a host buffer of {bytes} bytes")))?;
        let (flags, raw_fd) = match fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping chosen by the kernel; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io {
                what: "mmap of a host buffer",
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).expect("mmap returned a null mapping");
        Ok(HostMemory {
            ptr,
            len: bytes,
            map_len,
            contiguous: fd.is_some(),
        })
    }

    /// Test transports stand in for the driver's contiguous memory with ordinary memory.
    #[cfg(test)]
    pub(crate) fn assume_contiguous(mut self) -> HostMemory {
        self.contiguous = true;
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the memory comes from the device in physically contiguous chunks.
    pub fn is_contiguous(&self) -> bool {
        self.contiguous
    }

    /// The start of the mapping, for views of parts of it.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `map_len >= len` readable bytes, alive while self is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing borrows now.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) } != 0 {
            warn!(
                "munmap of a host buffer failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

// ---- the guest driver's ioctl interface (include/vgpu_ioctl.h) ----

#[repr(C)]
struct VgpuSeg {
    addr: u64,
    len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VgpuSubmit {
    header: u64,
    response: u64,
    in_segs: u64,
    out_segs: u64,
    num_in: u32,
    num_out: u32,
}

#[repr(C)]
struct VgpuSubmitPoll {
    submit: VgpuSubmit,
    poll_us: u32,
    reserved: u32,
}

#[repr(C)]
struct VgpuInfo {
    config: [u8; CONFIG_SIZE],
    queue_size: u32,
    reserved: u32,
}

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'V' as u32) << 8) | nr
}

pub(crate) const VGPU_IOC_SUBMIT: u32 =
    ioc(IOC_READ | IOC_WRITE, 1, std::mem::size_of::<VgpuSubmit>());
pub(crate) const VGPU_IOC_INFO: u32 = ioc(IOC_READ, 2, std::mem::size_of::<VgpuInfo>());
pub(crate) const VGPU_IOC_SESSION: u32 = ioc(IOC_READ, 3, std::mem::size_of::<u64>());
pub(crate) const VGPU_IOC_SUBMIT_ASYNC: u32 = ioc(IOC_WRITE, 4, std::mem::size_of::<VgpuSubmit>());
pub(crate) const VGPU_IOC_SUBMIT_POLL: u32 = ioc(
    IOC_READ | IOC_WRITE,
    5,
    std::mem::size_of::<VgpuSubmitPoll>(),
);

/// The response's `VGPU_RESP_FLAGS` (offset 28): status and detail are an earlier
/// asynchronous request's, whose opcode is in bits 16..32; the request's own status is
/// in bits 8..16.
const RESP_FLAGS: usize = 28;
const RESP_F_ASYNC_ERROR: u32 = 1;

/// Splits a response of the driver into the request's own answer and an earlier
/// asynchronous failure (`VGPU_RESP_F_ASYNC_ERROR`).
fn decode_reply(raw: &[u8; RESPONSE_HEADER_SIZE]) -> Result<Reply> {
    let mut response = ResponseHeader::decode(raw)?;
    let flags = u32::from_le_bytes(raw[RESP_FLAGS..].try_into().expect("4 bytes"));
    if flags & RESP_F_ASYNC_ERROR == 0 {
        return Ok(Reply {
            response,
            earlier: None,
        });
    }
    let earlier = AsyncFailure {
        op: Opcode::from_u16((flags >> 16) as u16).map_or("asynchronous request", opcode_name),
        status: response.status,
        detail: response.detail,
    };
    response.status = Status::from_u32((flags >> 8) & 0xff).unwrap_or(Status::Internal);
    response.detail = 0;
    Ok(Reply {
        response,
        earlier: Some(earlier),
    })
}

/// What to do after `VGPU_IOC_SUBMIT_ASYNC` answered with an errno.
#[derive(Debug, PartialEq, Eq)]
enum AsyncFallback {
    /// Nothing was queued (a signal): ask again.
    Retry,
    /// A driver without async submission: synchronous from now on.
    Unsupported,
    /// Too large to copy: this one synchronously.
    Synchronous,
    /// A real error.
    Fail,
}

fn async_fallback(err: &io::Error) -> AsyncFallback {
    match err.raw_os_error() {
        Some(libc::EINTR) => AsyncFallback::Retry,
        Some(libc::ENOTTY) | Some(libc::EINVAL) => AsyncFallback::Unsupported,
        Some(libc::E2BIG) => AsyncFallback::Synchronous,
        _ => AsyncFallback::Fail,
    }
}

/// `VGPU_IOC_SUBMIT_ASYNC` through `queue`, with the fallbacks to `sync`: for the rest
/// of the session when the driver does not know it (`unsupported` remembers), for one
/// request when it is too large to copy.
fn submit_async_or_sync(
    unsupported: &AtomicBool,
    mut queue: impl FnMut() -> io::Result<()>,
    sync: impl FnOnce() -> Result<Reply>,
) -> Result<Option<Reply>> {
    if unsupported.load(Ordering::Relaxed) {
        return sync().map(Some);
    }
    loop {
        let err = match queue() {
            Ok(()) => return Ok(None),
            Err(e) => e,
        };
        match async_fallback(&err) {
            AsyncFallback::Retry => continue,
            AsyncFallback::Unsupported => {
                if !unsupported.swap(true, Ordering::Relaxed) {
                    debug!("VGPU_IOC_SUBMIT_ASYNC: {err}; submitting synchronously");
                }
                return sync().map(Some);
            }
            AsyncFallback::Synchronous => return sync().map(Some),
            AsyncFallback::Fail => {
                return Err(Error::from_errno("VGPU_IOC_SUBMIT_ASYNC", err));
            }
        }
    }
}

/// Polling of synchronous requests (`VGPU_IOC_SUBMIT_POLL`).
#[derive(Debug, Default)]
struct SubmitPoll {
    /// Microseconds, at most [`POLL_MAX_US`]; 0 is off.
    us: AtomicU32,
    /// The driver refused `VGPU_IOC_SUBMIT_POLL` (an older one): plain submits from now on.
    unsupported: AtomicBool,
}

impl SubmitPoll {
    fn set(&self, us: u32) {
        self.us.store(us.min(POLL_MAX_US), Ordering::Relaxed);
    }

    fn get(&self) -> u32 {
        self.us.load(Ordering::Relaxed)
    }

    /// The polling requests get: 0 once the driver has refused it.
    fn in_effect(&self) -> u32 {
        if self.unsupported.load(Ordering::Relaxed) {
            0
        } else {
            self.get()
        }
    }

    /// Sends `submit` through `ioctl(request, arg)`: as `VGPU_IOC_SUBMIT_POLL` while
    /// polling is on and the driver has it, else as `VGPU_IOC_SUBMIT`. A driver that
    /// answers the polling form with ENOTTY does not know it; one that answers EINVAL
    /// refuses it if the plain form then accepts the same request (both check a request
    /// before they queue it, so nothing ran twice). Either way the request goes plain,
    /// and so does every later one.
    fn submit(
        &self,
        submit: VgpuSubmit,
        mut ioctl: impl FnMut(u32, *mut libc::c_void) -> io::Result<()>,
    ) -> Result<()> {
        let us = self.get();
        if us == 0 || self.unsupported.load(Ordering::Relaxed) {
            return plain_submit(&mut ioctl, submit);
        }
        let mut polled = VgpuSubmitPoll {
            submit,
            poll_us: us,
            reserved: 0,
        };
        let err = match ioctl(
            VGPU_IOC_SUBMIT_POLL,
            (&mut polled as *mut VgpuSubmitPoll).cast(),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match err.raw_os_error() {
            Some(libc::ENOTTY) => {
                self.refused(&err);
                plain_submit(&mut ioctl, submit)
            }
            Some(libc::EINVAL) => {
                let r = plain_submit(&mut ioctl, submit);
                if r.is_ok() {
                    self.refused(&err);
                }
                r
            }
            _ => Err(Error::from_errno("VGPU_IOC_SUBMIT_POLL", err)),
        }
    }

    fn refused(&self, err: &io::Error) {
        if !self.unsupported.swap(true, Ordering::Relaxed) {
            debug!("VGPU_IOC_SUBMIT_POLL: {err}; requests wait without polling");
        }
    }
}

/// `VGPU_IOC_SUBMIT` of `submit` through `ioctl(request, arg)`.
fn plain_submit(
    ioctl: &mut impl FnMut(u32, *mut libc::c_void) -> io::Result<()>,
    mut submit: VgpuSubmit,
) -> Result<()> {
    ioctl(VGPU_IOC_SUBMIT, (&mut submit as *mut VgpuSubmit).cast())
        .map_err(|e| Error::from_errno("VGPU_IOC_SUBMIT", e))
}

/// The path of the `index`th device node.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/vgpu{index}"))
}

/// A session on `/dev/vgpuN`: the driver opened it with the file and closes it with it.
pub struct CharDevTransport {
    file: File,
    path: PathBuf,
    /// The driver answered `VGPU_IOC_SUBMIT_ASYNC` with ENOTTY or EINVAL (an older one).
    async_unsupported: AtomicBool,
    poll: SubmitPoll,
}

impl CharDevTransport {
    /// Opens the device node, which opens a session on the host.
    pub fn open(path: impl AsRef<Path>) -> Result<CharDevTransport> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                // The driver's answer when the host refused the session because the VM's
                // memory quota has no room for another context.
                Some(libc::EDQUOT) => Error::Device {
                    op: "session open",
                    status: Status::QuotaExceeded,
                    detail: 0,
                },
                _ => Error::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        debug!("opened {}", path.display());
        Ok(CharDevTransport {
            file,
            path,
            async_unsupported: AtomicBool::new(false),
            poll: SubmitPoll::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host's id of this file's session.
    pub fn session_id(&self) -> Result<u64> {
        let mut id = 0u64;
        self.ioctl(
            "VGPU_IOC_SESSION",
            VGPU_IOC_SESSION,
            (&mut id as *mut u64).cast(),
        )?;
        Ok(id)
    }

    /// The most descriptors one chain may have.
    pub fn queue_size(&self) -> Result<u32> {
        Ok(self.info()?.queue_size)
    }

    fn info(&self) -> Result<VgpuInfo> {
        let mut info = VgpuInfo {
            config: [0; CONFIG_SIZE],
            queue_size: 0,
            reserved: 0,
        };
        self.ioctl(
            "VGPU_IOC_INFO",
            VGPU_IOC_INFO,
            (&mut info as *mut VgpuInfo).cast(),
        )?;
        Ok(info)
    }

    fn ioctl(&self, what: &'static str, request: u32, arg: *mut libc::c_void) -> Result<()> {
        self.raw_ioctl(request, arg)
            .map_err(|e| Error::from_errno(what, e))
    }

    fn raw_ioctl(&self, request: u32, arg: *mut libc::c_void) -> io::Result<()> {
        // SAFETY: `request` is one of the driver's ioctls and `arg` points to the struct
        // its number encodes, alive for the duration of the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request as libc::Ioctl, arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `VGPU_IOC_SUBMIT`, or `VGPU_IOC_SUBMIT_POLL` while polling is on: the response as
    /// the driver wrote it.
    fn submit_raw(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<[u8; RESPONSE_HEADER_SIZE]> {
        let in_segs = segments(input);
        let out_segs: Vec<VgpuSeg> = output
            .iter_mut()
            .map(|s| VgpuSeg {
                addr: s.as_mut_ptr() as u64,
                len: s.len() as u64,
            })
            .collect();
        let mut response = [0u8; RESPONSE_HEADER_SIZE];
        let submit = VgpuSubmit {
            header: header.as_ptr() as u64,
            response: response.as_mut_ptr() as u64,
            in_segs: in_segs.as_ptr() as u64,
            out_segs: out_segs.as_ptr() as u64,
            num_in: u32::try_from(in_segs.len()).map_err(|_| Error::ChainTooLong)?,
            num_out: u32::try_from(out_segs.len()).map_err(|_| Error::ChainTooLong)?,
        };
        // The driver reads `input` and writes `output` only during this call.
        self.poll
            .submit(submit, |request, arg| self.raw_ioctl(request, arg))?;
        Ok(response)
    }

    /// `VGPU_IOC_SUBMIT_ASYNC`: the driver copies `header` and `input` before it returns.
    fn queue_async(&self, header: &[u8; REQUEST_HEADER_SIZE], input: &[&[u8]]) -> io::Result<()> {
        let in_segs = segments(input);
        let mut submit = VgpuSubmit {
            header: header.as_ptr() as u64,
            response: 0,
            in_segs: in_segs.as_ptr() as u64,
            out_segs: 0,
            num_in: u32::try_from(in_segs.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
            num_out: 0,
        };
        self.raw_ioctl(
            VGPU_IOC_SUBMIT_ASYNC,
            (&mut submit as *mut VgpuSubmit).cast(),
        )
    }
}

fn segments(input: &[&[u8]]) -> Vec<VgpuSeg> {
    input
        .iter()
        .map(|s| VgpuSeg {
            addr: s.as_ptr() as u64,
            len: s.len() as u64,
        })
        .collect()
}

impl Transport for CharDevTransport {
    fn submit(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader> {
        Ok(ResponseHeader::decode(
            &self.submit_raw(header, input, output)?,
        )?)
    }

    fn submit_reply(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<Reply> {
        decode_reply(&self.submit_raw(header, input, output)?)
    }

    fn submit_async(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
    ) -> Result<Option<Reply>> {
        submit_async_or_sync(
            &self.async_unsupported,
            || self.queue_async(header, input),
            || self.submit_reply(header, input, &mut []),
        )
    }

    fn set_poll_us(&self, us: u32) {
        self.poll.set(us);
    }

    fn poll_us(&self) -> u32 {
        self.poll.in_effect()
    }

    fn config(&self) -> Result<DeviceConfig> {
        Ok(DeviceConfig::decode(&self.info()?.config)?)
    }

    fn host_memory(&self, bytes: usize) -> Result<HostMemory> {
        HostMemory::map(bytes, Some(&self.file))
    }
}

/// A device in the same process: each decoded request goes to a handler, the way the
/// host backend hands it to the mediator. Like the guest driver, it opens a session when
/// created, writes that session into every header, refuses SESSION_OPEN and
/// SESSION_CLOSE from its caller, and closes the session when dropped.
pub struct InProcessTransport {
    handler: Arc<dyn Fn(Request) -> Response + Send + Sync>,
    session: u64,
}

impl InProcessTransport {
    /// Opens a session through `handler`.
    pub fn new(handler: Arc<dyn Fn(Request) -> Response + Send + Sync>) -> Result<Self> {
        let r = handler(Request::new(0, Command::SessionOpen));
        if r.status != Status::Ok {
            return Err(Error::Device {
                op: "SESSION_OPEN",
                status: r.status,
                detail: r.detail,
            });
        }
        Ok(InProcessTransport {
            handler,
            session: r.value0,
        })
    }

    pub fn session_id(&self) -> u64 {
        self.session
    }
}

impl Transport for InProcessTransport {
    fn submit(
        &self,
        header: &[u8; REQUEST_HEADER_SIZE],
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader> {
        let reply = |status: Status| ResponseHeader {
            status,
            detail: 0,
            value0: 0,
            value1: 0,
            written: 0,
        };
        let mut h = match Header::decode(header) {
            Ok(h) => h,
            Err(e) => return Ok(reply(e.status())),
        };
        if matches!(h.op, Op::SessionOpen | Op::SessionClose) {
            return Err(Error::invalid(
                "SESSION_OPEN and SESSION_CLOSE belong to the transport",
            ));
        }
        h.session = self.session;
        let payload = input.concat();
        let request = match Request::from_parts(&h, &payload) {
            Ok(r) => r,
            Err(e) => return Ok(reply(e.status())),
        };
        let response = (self.handler)(request);
        let capacity: usize = output.iter().map(|o| o.len()).sum();
        if response.data.len() > capacity {
            return Ok(reply(Status::BufferTooSmall));
        }
        let mut rest = &response.data[..];
        for out in output.iter_mut() {
            let n = rest.len().min(out.len());
            out[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        Ok(response.header())
    }

    fn config(&self) -> Result<DeviceConfig> {
        let r = (self.handler)(Request::new(self.session, Command::Info));
        if r.status != Status::Ok {
            return Err(Error::Device {
                op: "INFO",
                status: r.status,
                detail: r.detail,
            });
        }
        Ok(InfoReply::decode(&r.data)?.config)
    }
}

impl Drop for InProcessTransport {
    fn drop(&mut self) {
        let r = (self.handler)(Request::new(self.session, Command::SessionClose));
        if r.status != Status::Ok {
            debug!("session {} close: {}", self.session, r.status);
        }
    }
}

/// Name of an opcode as the protocol spells it, for messages.
pub(crate) fn opcode_name(op: Opcode) -> &'static str {
    op.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_vgpu_ioctl_h() {
        // _IOWR('V', 1, struct vgpu_submit), _IOR('V', 2, struct vgpu_info),
        // _IOR('V', 3, __u64), as a C compiler computes them from include/vgpu_ioctl.h.
        assert_eq!(std::mem::size_of::<VgpuSubmit>(), 40);
        assert_eq!(std::mem::size_of::<VgpuSeg>(), 16);
        assert_eq!(std::mem::size_of::<VgpuInfo>(), 136);
        assert_eq!(VGPU_IOC_SUBMIT, 0xc028_5601);
        assert_eq!(VGPU_IOC_INFO, 0x8088_5602);
        assert_eq!(VGPU_IOC_SESSION, 0x8008_5603);
        // _IOW('V', 4, struct vgpu_submit)
        assert_eq!(VGPU_IOC_SUBMIT_ASYNC, 0x4028_5604);
        // _IOWR('V', 5, struct vgpu_submit_poll)
        assert_eq!(std::mem::size_of::<VgpuSubmitPoll>(), 48);
        assert_eq!(std::mem::offset_of!(VgpuSubmitPoll, poll_us), 40);
        assert_eq!(VGPU_IOC_SUBMIT_POLL, 0xc030_5605);
    }

    /// What a fake driver saw of one ioctl: its number, the request and the polling.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        request: u32,
        submit: VgpuSubmit,
        poll_us: Option<u32>,
    }

    /// A fake driver's ioctl: records each call and answers with `answer(request)`.
    fn fake_driver<'a>(
        seen: &'a std::cell::RefCell<Vec<Seen>>,
        mut answer: impl FnMut(u32) -> Option<i32> + 'a,
    ) -> impl FnMut(u32, *mut libc::c_void) -> io::Result<()> + 'a {
        move |request, arg| {
            let (submit, poll_us) = if request == VGPU_IOC_SUBMIT_POLL {
                // SAFETY: SubmitPoll passes a VgpuSubmitPoll with this number.
                let p = unsafe { &*(arg as *const VgpuSubmitPoll) };
                assert_eq!(p.reserved, 0);
                (p.submit, Some(p.poll_us))
            } else {
                assert_eq!(request, VGPU_IOC_SUBMIT);
                // SAFETY: and a VgpuSubmit with this one.
                (unsafe { *(arg as *const VgpuSubmit) }, None)
            };
            seen.borrow_mut().push(Seen {
                request,
                submit,
                poll_us,
            });
            match answer(request) {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }
    }

    fn a_submit() -> VgpuSubmit {
        VgpuSubmit {
            header: 0x1000,
            response: 0x2000,
            in_segs: 0x3000,
            out_segs: 0,
            num_in: 2,
            num_out: 0,
        }
    }

    #[test]
    fn polling_submits_use_the_poll_ioctl_with_the_setting() {
        let seen = std::cell::RefCell::new(Vec::new());
        let poll = SubmitPoll::default();
        poll.submit(a_submit(), fake_driver(&seen, |_| None))
            .unwrap();
        poll.set(50);
        poll.submit(a_submit(), fake_driver(&seen, |_| None))
            .unwrap();
        poll.set(5000);
        assert_eq!(poll.get(), POLL_MAX_US);
        poll.submit(a_submit(), fake_driver(&seen, |_| None))
            .unwrap();
        poll.set(0);
        poll.submit(a_submit(), fake_driver(&seen, |_| None))
            .unwrap();
        let calls: Vec<_> = seen
            .borrow()
            .iter()
            .map(|s| (s.request, s.poll_us))
            .collect();
        assert_eq!(
            calls,
            [
                (VGPU_IOC_SUBMIT, None),
                (VGPU_IOC_SUBMIT_POLL, Some(50)),
                (VGPU_IOC_SUBMIT_POLL, Some(POLL_MAX_US)),
                (VGPU_IOC_SUBMIT, None),
            ]
        );
        assert!(seen.borrow().iter().all(|s| s.submit == a_submit()));
        assert!(!poll.unsupported.load(Ordering::Relaxed));
    }

    #[test]
    fn polling_falls_back_to_plain_submits_for_an_older_driver() {
        // ENOTTY: the driver does not know the ioctl. This request goes plain, and so
        // does every later one without asking again.
        let seen = std::cell::RefCell::new(Vec::new());
        let poll = SubmitPoll::default();
        poll.set(50);
        let old_driver = |r| (r == VGPU_IOC_SUBMIT_POLL).then_some(libc::ENOTTY);
        poll.submit(a_submit(), fake_driver(&seen, old_driver))
            .unwrap();
        assert!(poll.unsupported.load(Ordering::Relaxed));
        poll.submit(a_submit(), fake_driver(&seen, old_driver))
            .unwrap();
        let calls: Vec<_> = seen.borrow().iter().map(|s| s.request).collect();
        assert_eq!(
            calls,
            [VGPU_IOC_SUBMIT_POLL, VGPU_IOC_SUBMIT, VGPU_IOC_SUBMIT]
        );
        assert!(seen.borrow().iter().all(|s| s.submit == a_submit()));
        assert_eq!((poll.get(), poll.in_effect()), (50, 0));

        // EINVAL for the polling form that the plain form accepts: refused, remembered.
        let seen = std::cell::RefCell::new(Vec::new());
        let poll = SubmitPoll::default();
        poll.set(50);
        let refusing = |r| (r == VGPU_IOC_SUBMIT_POLL).then_some(libc::EINVAL);
        poll.submit(a_submit(), fake_driver(&seen, refusing))
            .unwrap();
        assert!(poll.unsupported.load(Ordering::Relaxed));
        assert_eq!(seen.borrow().len(), 2);

        // EINVAL for both forms: the request is bad, polling stays on.
        let seen = std::cell::RefCell::new(Vec::new());
        let poll = SubmitPoll::default();
        poll.set(50);
        let err = poll
            .submit(a_submit(), fake_driver(&seen, |_| Some(libc::EINVAL)))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Io {
                what: "VGPU_IOC_SUBMIT",
                ..
            }
        ));
        assert!(!poll.unsupported.load(Ordering::Relaxed));
        assert_eq!(poll.in_effect(), 50);
        poll.submit(a_submit(), fake_driver(&seen, |_| None))
            .unwrap();
        assert_eq!(seen.borrow().last().unwrap().poll_us, Some(50));

        // Any other error is the request's: no second try, polling stays on.
        for (errno, gone) in [
            (libc::ENODEV, true),
            (libc::EFAULT, false),
            (libc::E2BIG, false),
        ] {
            let seen = std::cell::RefCell::new(Vec::new());
            let err = poll
                .submit(a_submit(), fake_driver(&seen, |_| Some(errno)))
                .unwrap_err();
            assert_eq!(seen.borrow().len(), 1);
            assert_eq!(matches!(err, Error::DeviceGone), gone);
            if errno == libc::E2BIG {
                assert!(matches!(err, Error::ChainTooLong));
            }
            if errno == libc::EFAULT {
                assert!(matches!(
                    err,
                    Error::Io {
                        what: "VGPU_IOC_SUBMIT_POLL",
                        ..
                    }
                ));
            }
        }
        assert!(!poll.unsupported.load(Ordering::Relaxed));
    }

    fn raw_response(status: u32, detail: u32, value0: u64, flags: u32) -> [u8; 32] {
        let mut b = [0u8; RESPONSE_HEADER_SIZE];
        b[0..4].copy_from_slice(&status.to_le_bytes());
        b[4..8].copy_from_slice(&detail.to_le_bytes());
        b[8..16].copy_from_slice(&value0.to_le_bytes());
        b[24..28].copy_from_slice(&16u32.to_le_bytes());
        b[28..32].copy_from_slice(&flags.to_le_bytes());
        b
    }

    #[test]
    fn a_response_flagged_with_an_async_failure_splits_into_both() {
        let plain = decode_reply(&raw_response(Status::OutOfRange as u32, 3, 9, 0)).unwrap();
        assert_eq!(plain.earlier, None);
        assert_eq!(
            (plain.response.status, plain.response.detail),
            (Status::OutOfRange, 3)
        );
        // An ALLOC (own status OK, handle 9) that carries a failed LAUNCH's status.
        let flags = 1 | (Status::Ok as u32) << 8 | (Opcode::Launch as u32) << 16;
        let raw = raw_response(Status::LaunchFailed as u32, 700, 9, flags);
        let r = decode_reply(&raw).unwrap();
        assert_eq!(
            r.earlier,
            Some(AsyncFailure {
                op: "LAUNCH",
                status: Status::LaunchFailed,
                detail: 700
            })
        );
        assert_eq!(
            (r.response.status, r.response.value0, r.response.written),
            (Status::Ok, 9, 16)
        );
        // The request's own failure stays its own.
        let flags = 1 | (Status::QuotaExceeded as u32) << 8 | (Opcode::Memset as u32) << 16;
        let r = decode_reply(&raw_response(Status::InvalidHandle as u32, 0, 0, flags)).unwrap();
        assert_eq!(r.response.status, Status::QuotaExceeded);
        assert_eq!(r.earlier.unwrap().op, "MEMSET");
        assert_eq!(r.earlier.unwrap().status, Status::InvalidHandle);
    }

    #[test]
    fn async_submission_falls_back_to_sync_for_an_older_driver_and_large_requests() {
        use std::cell::Cell;
        let unsupported = AtomicBool::new(false);
        let (tries, syncs) = (Cell::new(0), Cell::new(0));
        let reply = Reply {
            response: ResponseHeader {
                status: Status::Ok,
                detail: 0,
                value0: 0,
                value1: 0,
                written: 0,
            },
            earlier: None,
        };
        let run = |errno: Option<i32>| {
            submit_async_or_sync(
                &unsupported,
                || {
                    tries.set(tries.get() + 1);
                    // A signal first, then the answer under test.
                    match (tries.get() % 2, errno) {
                        (1, _) => Err(io::Error::from_raw_os_error(libc::EINTR)),
                        (_, Some(e)) => Err(io::Error::from_raw_os_error(e)),
                        (_, None) => Ok(()),
                    }
                },
                || {
                    syncs.set(syncs.get() + 1);
                    Ok(reply)
                },
            )
        };
        assert_eq!(run(None).unwrap(), None);
        // Too large to copy: that one request synchronously, async stays on.
        assert_eq!(run(Some(libc::E2BIG)).unwrap(), Some(reply));
        assert!(!unsupported.load(Ordering::Relaxed));
        assert!(matches!(run(Some(libc::EFAULT)), Err(Error::Io { .. })));
        assert!(matches!(run(Some(libc::ENODEV)), Err(Error::DeviceGone)));
        assert_eq!((tries.get(), syncs.get()), (8, 1));
        // An older driver: ENOTTY, and from then on synchronous without asking again.
        assert_eq!(run(Some(libc::ENOTTY)).unwrap(), Some(reply));
        assert!(unsupported.load(Ordering::Relaxed));
        assert_eq!(run(None).unwrap(), Some(reply));
        assert_eq!((tries.get(), syncs.get()), (10, 3));
        // EINVAL (a driver that refuses the operation) falls back the same way.
        let unsupported = AtomicBool::new(false);
        let r = submit_async_or_sync(
            &unsupported,
            || Err(io::Error::from_raw_os_error(libc::EINVAL)),
            || Ok(reply),
        );
        assert_eq!(r.unwrap(), Some(reply));
        assert!(unsupported.load(Ordering::Relaxed));
    }

    #[test]
    fn anonymous_host_memory_is_zeroed_page_aligned_and_writable() {
        let mut m = HostMemory::anonymous(10_000).unwrap();
        assert_eq!(m.len(), 10_000);
        assert!(!m.is_contiguous());
        assert_eq!(m.as_slice().as_ptr() as usize % page_size(), 0);
        assert!(m.as_slice().iter().all(|&b| b == 0));
        m.as_mut_slice()[9_999] = 7;
        assert_eq!(m.as_slice()[9_999], 7);
        assert!(matches!(
            HostMemory::anonymous(0),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn opening_a_missing_node_names_the_path() {
        let err = CharDevTransport::open("/nonexistent/vgpu7").err().unwrap();
        assert!(
            matches!(&err, Error::Open { path, .. } if path == Path::new("/nonexistent/vgpu7"))
        );
        assert_eq!(err.to_string(), "cannot open /nonexistent/vgpu7");
    }
}
