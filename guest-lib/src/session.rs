// SPDX-License-Identifier: Apache-2.0
//! Devices, sessions, device buffers, modules and launches, shaped like cudarc.

use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use log::{debug, trace, warn};
use vgpu_protocol::{
    Command, DeviceConfig, Header, InfoReply, Launch, Op, Param, Request, ResponseHeader,
    SelftestKind, Status, BUILTIN_MODULE, INFO_SIZE, MAX_KERNEL_NAME, MAX_PARAMS, MAX_PARAM_BYTES,
    MAX_PTX_BYTES, MAX_SELFTEST_MESSAGE, MAX_TRANSFER_BYTES, REQUEST_HEADER_SIZE,
    RESPONSE_HEADER_SIZE,
};

use crate::error::{Error, Result};
use crate::transport::{
    device_path, opcode_name, AsyncFailure, CharDevTransport, HostMemory, Reply, Transport,
    ASYNC_MAX_BYTES, POLL_MAX_US,
};

/// Size of one copy request from ordinary (pageable) memory. Its pages may be scattered,
/// so it takes up to 258 descriptors of a chain; the device's queue holds 1024.
pub const PAGEABLE_CHUNK_BYTES: usize = 1 << 20;
/// Size of one copy request from a [`HostBuffer`] to start with: its memory comes in
/// physically contiguous chunks, so even the largest transfer needs few descriptors.
pub const HOST_CHUNK_BYTES: usize = MAX_TRANSFER_BYTES as usize;
/// Chunks never shrink below one page when the driver reports a chain too long.
pub const MIN_CHUNK_BYTES: usize = 4096;
/// Set to 1, every request of the process's sessions waits for its answer (see
/// [`Session::set_sync_submit`]).
pub const SYNC_SUBMIT_ENV: &str = "VGPU_SYNC_SUBMIT";

/// Set to N (microseconds), every synchronous request of the process's sessions polls
/// for its answer for up to N µs before it sleeps (see [`Session::set_poll_us`]).
pub const POLL_US_ENV: &str = "VGPU_POLL_US";

/// Whether a value of `VGPU_SYNC_SUBMIT` asks for synchronous submission.
fn sync_submit_requested(value: Option<&str>) -> bool {
    matches!(value.map(str::trim), Some(v) if !v.is_empty() && v != "0")
}

/// The polling a value of `VGPU_POLL_US` asks for, at most [`POLL_MAX_US`]; `None` when
/// unset, empty or not a number.
fn poll_us_requested(value: Option<&str>) -> Option<u32> {
    let v = value.map(str::trim).filter(|v| !v.is_empty())?;
    match v.parse::<u64>() {
        Ok(us) => Some(us.min(u64::from(POLL_MAX_US)) as u32),
        Err(_) => {
            warn!("{POLL_US_ENV}={v:?} is not a number of microseconds: ignored");
            None
        }
    }
}

/// Plain data that is copied to and from the device as its bytes.
///
/// # Safety
/// Every bit pattern must be a valid value and the type must have no padding.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: primitive numbers: no padding, every bit pattern valid.
        unsafe impl Pod for $t {}
    )* };
}
pod!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);
// SAFETY: an array of Pod has no padding and every bit pattern is valid.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod, so its bytes are initialized and any view of them is valid.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod: whatever bytes are written form valid values.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

fn byte_len<T>(n: usize) -> Result<usize> {
    n.checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| Error::invalid(format!("{n} elements overflow the address space")))
}

/// A vGPU device node, `/dev/vgpuN`. Work happens in its sessions.
#[derive(Clone, Debug)]
pub struct Device {
    path: PathBuf,
}

impl Device {
    /// The device `/dev/vgpu<index>`.
    pub fn open(index: u32) -> Result<Device> {
        Device::open_path(device_path(index))
    }

    /// The device at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Device> {
        let path = path.as_ref().to_path_buf();
        fs::metadata(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Device { path })
    }

    /// Indices of the device nodes present, in order.
    pub fn list() -> Vec<u32> {
        let mut found: Vec<u32> = fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("vgpu")?.parse().ok())
            .collect();
        found.sort_unstable();
        found
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a new session: one open file of the device, one context on the host.
    pub fn session(&self) -> Result<Session> {
        Ok(Session::from_transport(Box::new(CharDevTransport::open(
            &self.path,
        )?)))
    }
}

pub(crate) struct SessionInner {
    pub(crate) transport: Box<dyn Transport>,
    next_tag: AtomicU64,
    /// Current chunk for pageable memory; halves when the driver says E2BIG.
    pub(crate) pageable_chunk: AtomicUsize,
    /// The largest payload the device accepts in one request.
    device_limit: OnceLock<usize>,
    /// Launches, memsets, device copies and small host-to-device copies are queued
    /// without waiting for their answer.
    async_submit: AtomicBool,
    /// An earlier asynchronous failure that arrived with a request that could not
    /// report it (a free or unload when something drops): the next request reports it.
    unreported: Mutex<Option<AsyncFailure>>,
}

impl SessionInner {
    fn header(&self, op: Op) -> ([u8; REQUEST_HEADER_SIZE], u64) {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let header = Header {
            session: 0,
            tag,
            op,
        }
        .encode();
        (header, tag)
    }

    /// Sends a request and waits for its answer. A failure of an earlier asynchronous
    /// request that comes with it is the error.
    pub(crate) fn request(
        &self,
        op: Op,
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader> {
        let (header, tag) = self.header(op);
        let reply = self.transport.submit_reply(&header, input, output)?;
        self.settle(op, tag, reply, true)
    }

    /// A request without payload whose caller cannot report an earlier asynchronous
    /// failure (a drop): the next request reports it instead.
    fn request_quietly(&self, op: Op) -> Result<ResponseHeader> {
        let (header, tag) = self.header(op);
        let reply = self.transport.submit_reply(&header, &[], &mut [])?;
        self.settle(op, tag, reply, false)
    }

    /// Queues a request whose answer is only a status (LAUNCH, MEMSET, DTOD, an HTOD of
    /// at most [`ASYNC_MAX_BYTES`]) without waiting for it; a failure is reported by a
    /// later request. Synchronous when turned off or when the transport cannot queue.
    pub(crate) fn request_async(&self, op: Op, input: &[&[u8]]) -> Result<()> {
        if !self.async_submit.load(Ordering::Relaxed) {
            return self.request(op, input, &mut []).map(drop);
        }
        let (header, tag) = self.header(op);
        match self.transport.submit_async(&header, input)? {
            None => {
                trace!("{} tag {tag}: queued", opcode_name(op.opcode()));
                Ok(())
            }
            Some(reply) => self.settle(op, tag, reply, true).map(drop),
        }
    }

    /// The outcome of a request that was answered: the oldest unreported asynchronous
    /// failure when there is one (and `report`), else its own status.
    fn settle(&self, op: Op, tag: u64, reply: Reply, report: bool) -> Result<ResponseHeader> {
        let Reply {
            response: r,
            earlier,
        } = reply;
        let name = opcode_name(op.opcode());
        trace!(
            "{name} tag {tag}: {} detail {} value0 {}",
            r.status,
            r.detail,
            r.value0
        );
        let failure = {
            let mut kept = self.unreported.lock().unwrap_or_else(|e| e.into_inner());
            match (report, kept.take()) {
                (false, older) => {
                    *kept = older.or(earlier);
                    None
                }
                (true, Some(older)) => {
                    *kept = earlier;
                    Some(older)
                }
                (true, None) => earlier,
            }
        };
        if let Some(f) = failure {
            debug!(
                "{name} tag {tag} reports an earlier {}: {} (detail {})",
                f.op, f.status, f.detail
            );
            if r.status == Status::Ok {
                self.undo(op, &r);
            }
            return Err(Error::Device {
                op: f.op,
                status: f.status,
                detail: f.detail,
            });
        }
        if r.status != Status::Ok {
            return Err(Error::Device {
                op: name,
                status: r.status,
                detail: r.detail,
            });
        }
        Ok(r)
    }

    /// A request ran although its caller gets an earlier failure instead of its result:
    /// what it made must not outlive the session unseen.
    fn undo(&self, op: Op, r: &ResponseHeader) {
        match op {
            Op::Alloc { .. } => self.free(r.value0),
            Op::ModuleLoad { .. } | Op::ModuleLoadImage { .. } => self.unload(r.value0),
            _ => {}
        }
    }

    fn device_limit(&self) -> usize {
        *self.device_limit.get_or_init(|| {
            let overhead = REQUEST_HEADER_SIZE + RESPONSE_HEADER_SIZE;
            match self.transport.config() {
                Ok(c) if c.max_request_bytes as usize > overhead + MIN_CHUNK_BYTES => {
                    let limit = (c.max_request_bytes as usize - overhead) / MIN_CHUNK_BYTES
                        * MIN_CHUNK_BYTES;
                    limit.min(HOST_CHUNK_BYTES)
                }
                Ok(_) => HOST_CHUNK_BYTES,
                Err(e) => {
                    debug!("config unavailable, assuming the protocol's transfer limit: {e}");
                    HOST_CHUNK_BYTES
                }
            }
        })
    }

    /// Runs `send(offset, len)` over `total` bytes in chunks of `chunk`, halving the
    /// chunk whenever the driver reports the chain too long.
    fn chunked(
        &self,
        total: usize,
        chunk: &AtomicUsize,
        mut send: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < total {
            let size = chunk
                .load(Ordering::Relaxed)
                .min(self.device_limit())
                .min(total - pos);
            match send(pos, size) {
                Ok(()) => pos += size,
                Err(Error::ChainTooLong) if size > MIN_CHUNK_BYTES => {
                    let smaller =
                        (size / 2 / MIN_CHUNK_BYTES * MIN_CHUNK_BYTES).max(MIN_CHUNK_BYTES);
                    debug!("chain too long for {size} bytes, retrying with {smaller}");
                    chunk.store(smaller, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(crate) fn htod(
        &self,
        dst: u64,
        offset: u64,
        src: &[u8],
        chunk: &AtomicUsize,
    ) -> Result<()> {
        self.chunked(src.len(), chunk, |pos, len| {
            let offset = offset_at(offset, pos)?;
            let op = Op::Htod {
                dst,
                offset,
                len: len as u64,
            };
            let data = &src[pos..pos + len];
            if len <= ASYNC_MAX_BYTES {
                self.request_async(op, &[data])
            } else {
                self.request(op, &[data], &mut []).map(drop)
            }
        })
    }

    pub(crate) fn dtoh(
        &self,
        src: u64,
        offset: u64,
        dst: &mut [u8],
        chunk: &AtomicUsize,
    ) -> Result<()> {
        self.chunked(dst.len(), chunk, |pos, len| {
            let offset = offset_at(offset, pos)?;
            let op = Op::Dtoh {
                src,
                offset,
                len: len as u64,
            };
            let r = self.request(op, &[], &mut [&mut dst[pos..pos + len]])?;
            if r.written as usize != len {
                return Err(Error::ShortReply {
                    op: "DTOH",
                    expected: len,
                    written: r.written as usize,
                });
            }
            Ok(())
        })
    }

    fn free(&self, handle: u64) {
        if let Err(e) = self.request_quietly(Op::Free { handle }) {
            debug!("free of buffer {handle}: {e}");
        }
    }

    fn unload(&self, module: u64) {
        if let Err(e) = self.request_quietly(Op::ModuleUnload { module }) {
            debug!("unload of module {module}: {e}");
        }
    }
}

/// A symbol name as the protocol carries it: letters, digits, `_`, `$`, `.`, shorter
/// than [`MAX_KERNEL_NAME`] so that its NUL fits.
pub(crate) fn check_symbol(what: &str, name: &str) -> Result<()> {
    let valid = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.');
    if name.is_empty() || name.len() >= MAX_KERNEL_NAME || !name.bytes().all(valid) {
        return Err(Error::invalid(format!("{what} {name:?}")));
    }
    Ok(())
}

/// The LAUNCH request for `kernel` of `module` with `params`, checked against the
/// protocol's limits.
pub(crate) fn launch_request(
    module: u64,
    kernel: &str,
    cfg: LaunchConfig,
    params: Vec<Param>,
) -> Result<Request> {
    check_symbol("kernel name", kernel)?;
    if params.len() > MAX_PARAMS {
        return Err(Error::invalid(format!(
            "{} kernel arguments (at most {MAX_PARAMS})",
            params.len()
        )));
    }
    let mut bytes = 0usize;
    for p in &params {
        bytes += match p {
            Param::Value(v) if v.is_empty() => {
                return Err(Error::invalid("an empty by-value argument"))
            }
            Param::Value(v) => v.len(),
            Param::Buffer(_) => 8,
        };
    }
    if bytes > MAX_PARAM_BYTES as usize {
        return Err(Error::invalid(format!(
            "{bytes} bytes of kernel arguments (at most {MAX_PARAM_BYTES})"
        )));
    }
    Ok(Request::new(
        0,
        Command::Launch(Launch {
            module,
            kernel: kernel.to_owned(),
            grid: cfg.grid,
            block: cfg.block,
            shared_bytes: cfg.shared_bytes,
            params,
        }),
    ))
}

fn offset_at(base: u64, pos: usize) -> Result<u64> {
    base.checked_add(pos as u64)
        .ok_or_else(|| Error::invalid("offset overflows"))
}

/// One session on the device: its own buffers, modules and stream of work. Cheap to
/// clone (clones share the session) and usable from several threads at once. The
/// session closes when the last clone and the last buffer or module made in it drop.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
}

impl Session {
    /// A session over any transport (the guest driver, or an in-process device).
    pub fn from_transport(transport: Box<dyn Transport>) -> Session {
        let sync = sync_submit_requested(std::env::var(SYNC_SUBMIT_ENV).ok().as_deref());
        let poll = poll_us_requested(std::env::var(POLL_US_ENV).ok().as_deref());
        Session::with_options(transport, sync, poll)
    }

    /// A session with the settings of `VGPU_SYNC_SUBMIT` and `VGPU_POLL_US`.
    fn with_options(transport: Box<dyn Transport>, sync: bool, poll_us: Option<u32>) -> Session {
        if sync {
            debug!("{SYNC_SUBMIT_ENV} is set: every request waits for its answer");
        }
        if let Some(us) = poll_us {
            debug!("{POLL_US_ENV} is set: synchronous requests poll for up to {us} us");
            transport.set_poll_us(us);
        }
        Session {
            inner: Arc::new(SessionInner {
                transport,
                next_tag: AtomicU64::new(1),
                pageable_chunk: AtomicUsize::new(PAGEABLE_CHUNK_BYTES),
                device_limit: OnceLock::new(),
                async_submit: AtomicBool::new(!sync),
                unreported: Mutex::new(None),
            }),
        }
    }

    /// With `true`, launches, memsets and copies to the device wait for the device's
    /// answer, so a failure is the call's own error (for debugging; the environment
    /// variable `VGPU_SYNC_SUBMIT=1` does this for every session of a process). With
    /// `false` (the default) they are queued, up to 256 at a time per session, and a
    /// failure is reported by the session's next synchronous call ([`Session::sync`],
    /// a copy to the host, an allocation...). Applies to every clone of the session.
    pub fn set_sync_submit(&self, sync: bool) {
        self.inner.async_submit.store(!sync, Ordering::Relaxed);
    }

    /// Whether every request waits for its answer (see [`Session::set_sync_submit`]).
    pub fn sync_submit(&self) -> bool {
        !self.inner.async_submit.load(Ordering::Relaxed)
    }

    /// Has every later synchronous request (`sync`, copies to the host, `alloc`...) poll
    /// the device for its answer for up to `us` microseconds (at most [`POLL_MAX_US`])
    /// before it sleeps until the device's interrupt: lower latency for CPU time, the
    /// request's thread spinning in the driver meanwhile. 0 (the default) turns it off;
    /// the environment variable `VGPU_POLL_US=N` sets it for every session of a
    /// process. Applies to every clone of the session. A driver without polling
    /// (`VGPU_IOC_SUBMIT_POLL`) and transports other than the driver's ignore it.
    pub fn set_poll_us(&self, us: u32) {
        self.inner.transport.set_poll_us(us.min(POLL_MAX_US));
    }

    /// The polling of synchronous requests in microseconds (see
    /// [`Session::set_poll_us`]); 0 when off, when the transport cannot poll, or once
    /// the driver has turned it down.
    pub fn poll_us(&self) -> u32 {
        self.inner.transport.poll_us()
    }

    /// The device's config space.
    pub fn config(&self) -> Result<DeviceConfig> {
        self.inner.transport.config()
    }

    /// The device and this VM's usage of it.
    pub fn info(&self) -> Result<InfoReply> {
        let mut buf = [0u8; INFO_SIZE];
        let r = self.inner.request(Op::Info, &[], &mut [&mut buf])?;
        if (r.written as usize) < INFO_SIZE {
            return Err(Error::ShortReply {
                op: "INFO",
                expected: INFO_SIZE,
                written: r.written as usize,
            });
        }
        Ok(InfoReply::decode(&buf)?)
    }

    /// Allocates device memory for `n` elements (contents undefined).
    pub fn alloc<T: Pod>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        let bytes = byte_len::<T>(n)?;
        let r = self
            .inner
            .request(Op::Alloc { size: bytes as u64 }, &[], &mut [])?;
        Ok(DeviceBuffer {
            session: self.inner.clone(),
            handle: r.value0,
            len: n,
            _t: PhantomData,
        })
    }

    /// Allocates device memory for `n` elements, zeroed.
    pub fn alloc_zeros<T: Pod>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(n)?;
        self.memset_u8(&mut b, 0)?;
        Ok(b)
    }

    /// Allocates a buffer holding a copy of `src`.
    pub fn htod_copy<T: Pod>(&self, src: &[T]) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(src.len())?;
        self.htod(src, &mut b)?;
        Ok(b)
    }

    /// Copies `src` to the start of `dst` (which must be at least as long).
    pub fn htod<T: Pod>(&self, src: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        self.check_buffer(dst)?;
        if src.len() > dst.len {
            return Err(Error::invalid(format!(
                "copy of {} elements into a buffer of {}",
                src.len(),
                dst.len
            )));
        }
        self.inner
            .htod(dst.handle, 0, as_bytes(src), &self.inner.pageable_chunk)
    }

    /// Copies the whole of `src` to a new vector.
    pub fn dtoh<T: Pod>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>> {
        // SAFETY: T is Pod, so all-zero bytes are a valid value.
        let mut v = vec![unsafe { std::mem::zeroed::<T>() }; src.len];
        self.dtoh_into(src, &mut v)?;
        Ok(v)
    }

    /// Copies the whole of `src` into the start of `dst` (which must be at least as long).
    pub fn dtoh_into<T: Pod>(&self, src: &DeviceBuffer<T>, dst: &mut [T]) -> Result<()> {
        self.check_buffer(src)?;
        if dst.len() < src.len {
            return Err(Error::invalid(format!(
                "copy of {} elements into a slice of {}",
                src.len,
                dst.len()
            )));
        }
        let dst = &mut dst[..src.len];
        self.inner
            .dtoh(src.handle, 0, as_bytes_mut(dst), &self.inner.pageable_chunk)
    }

    /// Copies the whole of `src` to the start of `dst`, on the device.
    pub fn dtod<T: Pod>(&self, src: &DeviceBuffer<T>, dst: &mut DeviceBuffer<T>) -> Result<()> {
        self.check_buffer(src)?;
        self.check_buffer(dst)?;
        if src.len > dst.len {
            return Err(Error::invalid(format!(
                "copy of {} elements into a buffer of {}",
                src.len, dst.len
            )));
        }
        let op = Op::Dtod {
            dst: dst.handle,
            dst_offset: 0,
            src: src.handle,
            src_offset: 0,
            len: src.byte_len() as u64,
        };
        self.inner.request_async(op, &[])
    }

    /// Sets every byte of `dst` to `value`.
    pub fn memset_u8<T: Pod>(&self, dst: &mut DeviceBuffer<T>, value: u8) -> Result<()> {
        self.memset(dst, value as u32, 1)
    }

    /// Sets every 32-bit word of `dst` to `value`; its size must be a multiple of 4.
    pub fn memset_u32<T: Pod>(&self, dst: &mut DeviceBuffer<T>, value: u32) -> Result<()> {
        if dst.byte_len() % 4 != 0 {
            return Err(Error::invalid(format!(
                "memset_u32 of a buffer of {} bytes",
                dst.byte_len()
            )));
        }
        self.memset(dst, value, 4)
    }

    fn memset<T: Pod>(&self, dst: &mut DeviceBuffer<T>, value: u32, width: u32) -> Result<()> {
        self.check_buffer(dst)?;
        let op = Op::Memset {
            dst: dst.handle,
            offset: 0,
            len: dst.byte_len() as u64,
            value,
            width,
        };
        self.inner.request_async(op, &[])
    }

    /// Loads a PTX module; it is unloaded when the returned [`Module`] drops.
    pub fn load_module(&self, ptx: &str) -> Result<Module> {
        if ptx.is_empty() || ptx.len() > MAX_PTX_BYTES as usize {
            return Err(Error::invalid(format!(
                "PTX of {} bytes (1 to {MAX_PTX_BYTES})",
                ptx.len()
            )));
        }
        if ptx.as_bytes().contains(&0) {
            return Err(Error::invalid("PTX contains a NUL byte"));
        }
        let op = Op::ModuleLoad {
            ptx_len: ptx.len() as u32,
        };
        let r = if ptx.len() > PAGEABLE_CHUNK_BYTES {
            // Too many scattered pages for one chain: stage it in contiguous memory.
            let mut staged = self.inner.transport.host_memory(ptx.len())?;
            staged.as_mut_slice().copy_from_slice(ptx.as_bytes());
            self.inner.request(op, &[staged.as_slice()], &mut [])?
        } else {
            self.inner.request(op, &[ptx.as_bytes()], &mut [])?
        };
        Ok(Module {
            session: Some(self.inner.clone()),
            handle: r.value0,
        })
    }

    /// The built-in kernel catalog (`vector_add_f32`, `scale_f32`, ...).
    pub fn builtin(&self) -> Module {
        Module {
            session: None,
            handle: BUILTIN_MODULE,
        }
    }

    /// Launches `kernel` of `module`. Queued without waiting for the device: a failure
    /// (a bad handle, an unknown kernel, or one while it runs) shows up at the session's
    /// next synchronous call, [`Session::sync`] or a copy to the host say.
    pub fn launch(
        &self,
        module: &Module,
        kernel: &str,
        cfg: LaunchConfig,
        args: &[KernelArg<'_>],
    ) -> Result<()> {
        if let Some(owner) = &module.session {
            if !Arc::ptr_eq(owner, &self.inner) {
                return Err(Error::ForeignHandle("module"));
            }
        }
        let request = self.launch_request(module.handle, kernel, cfg, args)?;
        let payload = request.payload();
        self.inner.request_async(request.header().op, &[&payload])
    }

    fn launch_request(
        &self,
        module: u64,
        kernel: &str,
        cfg: LaunchConfig,
        args: &[KernelArg<'_>],
    ) -> Result<Request> {
        if args.len() > MAX_PARAMS {
            return Err(Error::invalid(format!(
                "{} kernel arguments (at most {MAX_PARAMS})",
                args.len()
            )));
        }
        let params = args
            .iter()
            .map(|a| a.param(&self.inner))
            .collect::<Result<Vec<Param>>>()?;
        launch_request(module, kernel, cfg, params)
    }

    /// Waits for all of the session's work; reports an asynchronous failure (the first
    /// since the last report).
    pub fn sync(&self) -> Result<()> {
        self.inner.request(Op::Sync, &[], &mut []).map(drop)
    }

    /// Runs one of the device's self-tests and returns its message.
    pub fn selftest(&self, kind: SelftestKind) -> Result<String> {
        let mut buf = [0u8; MAX_SELFTEST_MESSAGE];
        let r = self
            .inner
            .request(Op::Selftest { test: kind }, &[], &mut [&mut buf])?;
        let n = (r.written as usize).min(buf.len());
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Host memory for fast copies: on the guest driver, physically contiguous pages
    /// mapped from the device (the analogue of `cudaMallocHost`). Zeroed.
    pub fn host_buffer(&self, bytes: usize) -> Result<HostBuffer> {
        let mem = self.inner.transport.host_memory(bytes)?;
        let chunk = if mem.is_contiguous() {
            HOST_CHUNK_BYTES
        } else {
            PAGEABLE_CHUNK_BYTES
        };
        Ok(HostBuffer {
            mem,
            chunk: AtomicUsize::new(chunk),
        })
    }

    /// Copies the first `dst.byte_len()` bytes of `src` into `dst`.
    pub fn htod_from_host<T: Pod>(
        &self,
        src: &HostBuffer,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.check_buffer(dst)?;
        let n = dst.byte_len();
        if src.len() < n {
            return Err(Error::invalid(format!(
                "copy of {n} bytes from a host buffer of {}",
                src.len()
            )));
        }
        self.inner
            .htod(dst.handle, 0, &src.as_slice()[..n], &src.chunk)
    }

    /// Copies all of `src` into the start of `dst`.
    pub fn dtoh_into_host<T: Pod>(
        &self,
        src: &DeviceBuffer<T>,
        dst: &mut HostBuffer,
    ) -> Result<()> {
        self.check_buffer(src)?;
        let n = src.byte_len();
        if dst.len() < n {
            return Err(Error::invalid(format!(
                "copy of {n} bytes into a host buffer of {}",
                dst.len()
            )));
        }
        let HostBuffer { mem, chunk } = dst;
        self.inner
            .dtoh(src.handle, 0, &mut mem.as_mut_slice()[..n], chunk)
    }

    fn check_buffer<T>(&self, b: &DeviceBuffer<T>) -> Result<()> {
        if Arc::ptr_eq(&b.session, &self.inner) {
            Ok(())
        } else {
            Err(Error::ForeignHandle("buffer"))
        }
    }

    /// Sends a request and returns its response header whatever its status, for
    /// requests whose refusals carry results (COMPILE: the size it needs, the compiler's
    /// log). Only a request that did not get an answer, or an earlier asynchronous
    /// failure reported with it, is an error.
    pub(crate) fn request_answer(
        &self,
        op: Op,
        input: &[&[u8]],
        output: &mut [&mut [u8]],
    ) -> Result<ResponseHeader> {
        let (header, tag) = self.inner.header(op);
        let mut reply = self.inner.transport.submit_reply(&header, input, output)?;
        let own = reply.response;
        // Settled as a success, so that only an earlier failure is an error.
        reply.response.status = Status::Ok;
        self.inner.settle(op, tag, reply, true).map(|_| own)
    }
}

/// Device memory of one session, freed when dropped.
pub struct DeviceBuffer<T> {
    session: Arc<SessionInner>,
    handle: u64,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn byte_len(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The device's handle, as kernels and the C ABI see it.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// This buffer as a kernel argument.
    pub fn arg(&self) -> KernelArg<'_> {
        KernelArg::Buffer(BufferArg {
            session: &self.session,
            handle: self.handle,
        })
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        self.session.free(self.handle);
    }
}

/// A loaded PTX module, unloaded when dropped, or the built-in catalog.
pub struct Module {
    session: Option<Arc<SessionInner>>,
    handle: u64,
}

impl Module {
    /// The device's handle; 0 for the built-in catalog.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    pub fn is_builtin(&self) -> bool {
        self.session.is_none()
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if let Some(s) = &self.session {
            s.unload(self.handle);
        }
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// One thread per element in blocks of 256, for the element-wise kernels.
    pub fn for_num_elems(n: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [n.div_ceil(256).max(1), 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
        }
    }
}

/// A device buffer passed to a kernel (see [`DeviceBuffer::arg`]).
#[derive(Clone, Copy)]
pub struct BufferArg<'a> {
    session: &'a Arc<SessionInner>,
    handle: u64,
}

impl BufferArg<'_> {
    pub fn handle(&self) -> u64 {
        self.handle
    }
}

/// One kernel argument, in the kernel's parameter order.
#[derive(Clone, Copy)]
pub enum KernelArg<'a> {
    /// A buffer of the launching session; the kernel receives its device address.
    Buffer(BufferArg<'a>),
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    F64(f64),
    /// Any other by-value parameter, as its bytes (at least one).
    Bytes(&'a [u8]),
}

impl<'a> KernelArg<'a> {
    pub fn buffer<T: Pod>(b: &'a DeviceBuffer<T>) -> KernelArg<'a> {
        b.arg()
    }

    fn param(&self, session: &Arc<SessionInner>) -> Result<Param> {
        Ok(match *self {
            KernelArg::Buffer(b) => {
                if !Arc::ptr_eq(b.session, session) {
                    return Err(Error::ForeignHandle("buffer"));
                }
                Param::Buffer(b.handle)
            }
            KernelArg::U32(v) => Param::u32(v),
            KernelArg::I32(v) => Param::Value(v.to_le_bytes().to_vec()),
            KernelArg::F32(v) => Param::f32(v),
            KernelArg::U64(v) => Param::u64(v),
            KernelArg::F64(v) => Param::Value(v.to_le_bytes().to_vec()),
            KernelArg::Bytes([]) => return Err(Error::invalid("an empty by-value argument")),
            KernelArg::Bytes(b) => Param::Value(b.to_vec()),
        })
    }
}

impl<'a, T: Pod> From<&'a DeviceBuffer<T>> for KernelArg<'a> {
    fn from(b: &'a DeviceBuffer<T>) -> Self {
        b.arg()
    }
}

impl From<u32> for KernelArg<'_> {
    fn from(v: u32) -> Self {
        KernelArg::U32(v)
    }
}

impl From<f32> for KernelArg<'_> {
    fn from(v: f32) -> Self {
        KernelArg::F32(v)
    }
}

/// Host memory for fast copies (see [`Session::host_buffer`]); unmapped when dropped.
pub struct HostBuffer {
    pub(crate) mem: HostMemory,
    /// Current chunk for copies from this buffer; halves when the driver says E2BIG.
    pub(crate) chunk: AtomicUsize,
}

impl HostBuffer {
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Whether the memory is the device's physically contiguous host memory.
    pub fn is_contiguous(&self) -> bool {
        self.mem.is_contiguous()
    }

    pub fn as_slice(&self) -> &[u8] {
        self.mem.as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.mem.as_mut_slice()
    }

    /// The buffer as whole elements of `T` (a trailing partial element is left out).
    pub fn cast_slice<T: Pod>(&self) -> &[T] {
        let n = self.len() / std::mem::size_of::<T>();
        // SAFETY: the mapping is page-aligned, so aligned for any Pod; n elements fit.
        unsafe { std::slice::from_raw_parts(self.as_slice().as_ptr().cast(), n) }
    }

    pub fn cast_slice_mut<T: Pod>(&mut self) -> &mut [T] {
        let n = self.len() / std::mem::size_of::<T>();
        // SAFETY: as above, and &mut self makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_slice().as_mut_ptr().cast(), n) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vgpu_protocol::Opcode;

    use super::*;
    use crate::fake::{AsyncDriver, Chain, FakeDevice, Recorder, NAME, QUOTA};
    use crate::transport::InProcessTransport;

    const MIB: usize = 1 << 20;

    struct Rig {
        dev: Arc<FakeDevice>,
        chains: Arc<Mutex<Vec<Chain>>>,
        rejected: Arc<Mutex<usize>>,
        session: Session,
    }

    /// A session over the fake device through a driver with async submission (unless
    /// `async_unsupported`), every chain recorded.
    fn rig_full(limit: Option<usize>, contiguous: bool, async_unsupported: bool) -> Rig {
        let dev = FakeDevice::new();
        let mut driver = AsyncDriver::new(dev.transport());
        driver.unsupported = async_unsupported;
        let mut rec = Recorder::new(driver);
        rec.payload_limit = limit;
        rec.contiguous_host_memory = contiguous;
        let (chains, rejected) = (rec.chains.clone(), rec.rejected.clone());
        Rig {
            dev,
            chains,
            rejected,
            session: Session::from_transport(Box::new(rec)),
        }
    }

    fn rig_with(limit: Option<usize>, contiguous: bool) -> Rig {
        rig_full(limit, contiguous, false)
    }

    fn rig() -> Rig {
        rig_with(None, false)
    }

    impl Rig {
        fn sent(&self, op: Opcode) -> Vec<Chain> {
            self.chains
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.opcode() == op)
                .cloned()
                .collect()
        }

        fn clear(&self) {
            self.chains.lock().unwrap().clear();
        }

        /// (opcode, queued) of every chain, in order.
        fn order(&self) -> Vec<(Opcode, bool)> {
            let chains = self.chains.lock().unwrap();
            chains.iter().map(|c| (c.opcode(), c.queued)).collect()
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// (offset, len) of each HTOD/DTOH chain, with the payload slices' lengths checked.
    fn pieces(chains: &[Chain]) -> Vec<(u64, u64)> {
        chains
            .iter()
            .map(|c| match c.header.op {
                Op::Htod { offset, len, .. } => {
                    assert_eq!(c.input, vec![len as usize]);
                    (offset, len)
                }
                Op::Dtoh { offset, len, .. } => {
                    assert_eq!(c.output, vec![len as usize]);
                    (offset, len)
                }
                op => panic!("unexpected {op:?}"),
            })
            .collect()
    }

    #[test]
    fn typed_copies_round_trip() {
        let r = rig();
        let src: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let b = r.session.htod_copy(&src).unwrap();
        assert_eq!(b.len(), 1000);
        assert_eq!(b.byte_len(), 4000);
        assert_eq!(r.session.dtoh(&b).unwrap(), src);
        let mut back = vec![0f32; 1200];
        r.session.dtoh_into(&b, &mut back).unwrap();
        assert_eq!(&back[..1000], &src[..]);
        assert!(back[1000..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn pageable_copies_go_in_1_mib_chunks_at_increasing_offsets() {
        let r = rig();
        let n = 3 * MIB + MIB / 2;
        let src = pattern(n);
        let mut b = r.session.alloc::<u8>(n).unwrap();
        r.session.htod(&src, &mut b).unwrap();
        let m = MIB as u64;
        let expected = vec![(0, m), (m, m), (2 * m, m), (3 * m, m / 2)];
        assert_eq!(pieces(&r.sent(Opcode::Htod)), expected);
        assert_eq!(r.session.dtoh(&b).unwrap(), src);
        assert_eq!(pieces(&r.sent(Opcode::Dtoh)), expected);
    }

    #[test]
    fn a_chain_too_long_halves_the_chunk_and_the_copy_still_completes() {
        let r = rig_with(Some(300 * 1024), false);
        let src = pattern(MIB);
        let mut b = r.session.alloc::<u8>(MIB).unwrap();
        r.session.htod(&src, &mut b).unwrap();
        // 1 MiB and 512 KiB were refused; 256 KiB pieces went through.
        assert_eq!(*r.rejected.lock().unwrap(), 2);
        let q = (MIB / 4) as u64;
        assert_eq!(
            pieces(&r.sent(Opcode::Htod)),
            vec![(0, q), (q, q), (2 * q, q), (3 * q, q)]
        );
        // The smaller chunk is remembered: reading back is refused no more.
        assert_eq!(r.session.dtoh(&b).unwrap(), src);
        assert_eq!(*r.rejected.lock().unwrap(), 2);
        assert_eq!(r.sent(Opcode::Dtoh).len(), 4);
    }

    #[test]
    fn host_buffer_copies_use_large_chunks_halved_per_buffer() {
        let r = rig_with(Some(3 * MIB), true);
        let n = 8 * MIB;
        let mut host = r.session.host_buffer(n).unwrap();
        assert!(host.is_contiguous());
        assert_eq!(host.len(), n);
        host.as_mut_slice().copy_from_slice(&pattern(n));
        let mut b = r.session.alloc::<u32>(n / 4).unwrap();
        r.session.htod_from_host(&host, &mut b).unwrap();
        // 8 MiB (the whole copy) and 4 MiB were refused, then 2 MiB pieces.
        assert_eq!(*r.rejected.lock().unwrap(), 2);
        let two = 2 * MIB as u64;
        assert_eq!(
            pieces(&r.sent(Opcode::Htod)),
            vec![(0, two), (two, two), (2 * two, two), (3 * two, two)]
        );
        let mut back = r.session.host_buffer(n).unwrap();
        r.session.dtoh_into_host(&b, &mut back).unwrap();
        assert_eq!(back.as_slice(), host.as_slice());
        assert_eq!(back.cast_slice::<u32>().len(), n / 4);
        assert_eq!(
            back.cast_slice::<u32>()[1],
            u32::from_le_bytes(pattern(8)[4..8].try_into().unwrap())
        );
    }

    #[test]
    fn copies_past_a_buffer_are_refused_before_sending() {
        let r = rig();
        let mut b = r.session.alloc::<f32>(4).unwrap();
        r.clear();
        let err = r.session.htod(&[0f32; 5], &mut b).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument: copy of 5 elements into a buffer of 4"
        );
        assert!(matches!(
            r.session.dtoh_into(&b, &mut [0f32; 3]),
            Err(Error::InvalidArgument(_))
        ));
        let small = r.session.host_buffer(8).unwrap();
        assert!(matches!(
            r.session.htod_from_host(&small, &mut b),
            Err(Error::InvalidArgument(_))
        ));
        assert!(r.chains.lock().unwrap().is_empty());
    }

    #[test]
    fn device_statuses_become_typed_errors() {
        let r = rig();
        let err = r.session.alloc::<u8>(QUOTA as usize + 1).err().unwrap();
        assert!(matches!(
            err,
            Error::Device {
                op: "ALLOC",
                status: Status::QuotaExceeded,
                detail: 0
            }
        ));
        assert_eq!(err.status(), Some(Status::QuotaExceeded));
        assert_eq!(
            err.to_string(),
            "ALLOC: device returned QUOTA_EXCEEDED (detail 0)"
        );
        assert_eq!(Error::DeviceGone.status(), None);
    }

    #[test]
    fn sync_reports_an_asynchronous_failure_and_it_sticks() {
        let r = rig();
        let b = r.session.alloc::<u8>(16).unwrap();
        r.dev.state.lock().unwrap().fail_sync = Some((Status::LaunchFailed, 700));
        let err = r.session.sync().unwrap_err();
        assert_eq!(err.status(), Some(Status::LaunchFailed));
        assert_eq!(err.detail(), Some(700));
        assert_eq!(
            r.session.dtoh(&b).unwrap_err().status(),
            Some(Status::LaunchFailed)
        );
    }

    #[test]
    fn launch_sends_buffers_as_handles_and_values_in_order() {
        let r = rig();
        let n = 1000u32;
        let a = r.session.htod_copy(&vec![1.5f32; n as usize]).unwrap();
        let b = r.session.htod_copy(&vec![2.25f32; n as usize]).unwrap();
        let c = r.session.alloc::<f32>(n as usize).unwrap();
        let cfg = LaunchConfig::for_num_elems(n);
        assert_eq!(
            cfg,
            LaunchConfig {
                grid: [4, 1, 1],
                block: [256, 1, 1],
                shared_bytes: 0
            }
        );
        r.session
            .launch(
                &r.session.builtin(),
                "vector_add_f32",
                cfg,
                &[a.arg(), (&b).into(), c.arg(), n.into()],
            )
            .unwrap();
        let launch = r
            .dev
            .state
            .lock()
            .unwrap()
            .log
            .iter()
            .find_map(|q| match &q.command {
                Command::Launch(l) => Some(l.clone()),
                _ => None,
            });
        assert_eq!(
            launch.unwrap(),
            Launch {
                module: BUILTIN_MODULE,
                kernel: "vector_add_f32".into(),
                grid: [4, 1, 1],
                block: [256, 1, 1],
                shared_bytes: 0,
                params: vec![
                    Param::Buffer(a.handle()),
                    Param::Buffer(b.handle()),
                    Param::Buffer(c.handle()),
                    Param::Value(1000u32.to_le_bytes().to_vec()),
                ],
            }
        );
        assert!(r.session.dtoh(&c).unwrap().iter().all(|&x| x == 3.75));
    }

    #[test]
    fn every_argument_kind_is_encoded_little_endian() {
        let r = rig();
        let b = r.session.alloc::<u8>(8).unwrap();
        let args = [
            b.arg(),
            KernelArg::U32(0x0102_0304),
            KernelArg::I32(-2),
            KernelArg::F32(1.5),
            KernelArg::U64(0x0102_0304_0506_0708),
            KernelArg::F64(-0.25),
            KernelArg::Bytes(&[9, 8, 7]),
        ];
        let req = r
            .session
            .launch_request(7, "k$1.x_y", LaunchConfig::for_num_elems(1), &args)
            .unwrap();
        let Command::Launch(l) = &req.command else {
            panic!()
        };
        assert_eq!(l.module, 7);
        assert_eq!(
            l.params,
            vec![
                Param::Buffer(b.handle()),
                Param::Value(vec![4, 3, 2, 1]),
                Param::Value((-2i32).to_le_bytes().to_vec()),
                Param::Value(1.5f32.to_le_bytes().to_vec()),
                Param::Value(vec![8, 7, 6, 5, 4, 3, 2, 1]),
                Param::Value((-0.25f64).to_le_bytes().to_vec()),
                Param::Value(vec![9, 8, 7]),
            ]
        );
        // The payload decodes on the device side exactly as built.
        let decoded = Request::from_parts(&req.header(), &req.payload()).unwrap();
        assert_eq!(decoded, req);
    }

    #[test]
    fn bad_launches_are_refused_before_sending() {
        let r = rig();
        let cfg = LaunchConfig::for_num_elems(1);
        let builtin = r.session.builtin();
        r.clear();
        let refused = |name: &str, args: &[KernelArg<'_>]| {
            matches!(
                r.session.launch(&builtin, name, cfg, args),
                Err(Error::InvalidArgument(_))
            )
        };
        assert!(refused("", &[]));
        assert!(refused("bad name", &[]));
        assert!(refused(&"k".repeat(MAX_KERNEL_NAME), &[]));
        assert!(!refused(&"k".repeat(MAX_KERNEL_NAME - 1), &[]));
        assert!(refused("k", &[KernelArg::Bytes(&[])]));
        assert!(refused("k", &vec![KernelArg::U32(0); MAX_PARAMS + 1]));
        let big = [0u8; 2049];
        assert!(refused(
            "k",
            &[KernelArg::Bytes(&big), KernelArg::Bytes(&big)]
        ));
        // Only the one valid name reached the device (which does not know it).
        assert_eq!(r.sent(Opcode::Launch).len(), 1);
    }

    #[test]
    fn handles_of_another_session_are_refused() {
        let dev = FakeDevice::new();
        let (s1, s2) = (dev.session(), dev.session());
        let mut b1 = s1.alloc::<f32>(4).unwrap();
        let m1 = s1.load_module(".version 8.0").unwrap();
        assert!(matches!(
            s2.htod(&[1.0; 4], &mut b1),
            Err(Error::ForeignHandle("buffer"))
        ));
        assert!(matches!(s2.dtoh(&b1), Err(Error::ForeignHandle("buffer"))));
        let cfg = LaunchConfig::for_num_elems(4);
        assert!(matches!(
            s2.launch(
                &s2.builtin(),
                "scale_f32",
                cfg,
                &[b1.arg(), 2.0f32.into(), 4u32.into()]
            ),
            Err(Error::ForeignHandle("buffer"))
        ));
        assert!(matches!(
            s2.launch(&m1, "k", cfg, &[]),
            Err(Error::ForeignHandle("module"))
        ));
        // The built-in catalog is every session's.
        s1.htod(&[1.0, 2.0, 3.0, 4.0], &mut b1).unwrap();
        s1.launch(
            &s2.builtin(),
            "scale_f32",
            cfg,
            &[b1.arg(), 2.0f32.into(), 4u32.into()],
        )
        .unwrap();
        assert_eq!(s1.dtoh(&b1).unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
    }

    #[test]
    fn dropping_buffers_modules_and_the_session_frees_them_on_the_device() {
        let dev = FakeDevice::new();
        let s = dev.session();
        let b = s.alloc::<u8>(100).unwrap();
        let m = s.load_module(".version 8.0").unwrap();
        let clone = s.clone();
        {
            let st = dev.state.lock().unwrap();
            assert_eq!((st.open_sessions(), st.buffers(), st.modules()), (1, 1, 1));
        }
        drop(b);
        drop(m);
        {
            let st = dev.state.lock().unwrap();
            assert_eq!((st.buffers(), st.modules()), (0, 0));
        }
        let kept = s.alloc::<u8>(1).unwrap();
        drop(s);
        drop(clone);
        // A buffer keeps its session open until it drops.
        assert_eq!(dev.state.lock().unwrap().open_sessions(), 1);
        drop(kept);
        assert_eq!(dev.state.lock().unwrap().open_sessions(), 0);
    }

    #[test]
    fn memset_and_dtod_act_on_whole_buffers() {
        let r = rig();
        let mut a = r.session.alloc::<u32>(5).unwrap();
        r.session.memset_u32(&mut a, 0xdead_beef).unwrap();
        assert_eq!(r.session.dtoh(&a).unwrap(), vec![0xdead_beef; 5]);
        let mut z = r.session.alloc_zeros::<u32>(6).unwrap();
        assert_eq!(r.session.dtoh(&z).unwrap(), vec![0; 6]);
        r.session.dtod(&a, &mut z).unwrap();
        assert_eq!(
            r.session.dtoh(&z).unwrap(),
            vec![
                0xdead_beef,
                0xdead_beef,
                0xdead_beef,
                0xdead_beef,
                0xdead_beef,
                0
            ]
        );
        assert!(matches!(
            r.session.dtod(&z, &mut a),
            Err(Error::InvalidArgument(_))
        ));
        let mut odd = r.session.alloc::<u8>(6).unwrap();
        assert!(matches!(
            r.session.memset_u32(&mut odd, 1),
            Err(Error::InvalidArgument(_))
        ));
        r.session.memset_u8(&mut odd, 0x5a).unwrap();
        assert_eq!(r.session.dtoh(&odd).unwrap(), vec![0x5a; 6]);
        let memsets: Vec<_> = r.sent(Opcode::Memset).iter().map(|c| c.header.op).collect();
        assert_eq!(
            memsets,
            vec![
                Op::Memset {
                    dst: a.handle(),
                    offset: 0,
                    len: 20,
                    value: 0xdead_beef,
                    width: 4
                },
                Op::Memset {
                    dst: z.handle(),
                    offset: 0,
                    len: 24,
                    value: 0,
                    width: 1
                },
                Op::Memset {
                    dst: odd.handle(),
                    offset: 0,
                    len: 6,
                    value: 0x5a,
                    width: 1
                },
            ]
        );
    }

    #[test]
    fn ptx_is_checked_and_large_ptx_goes_through_host_memory() {
        let r = rig();
        assert!(matches!(
            r.session.load_module(""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            r.session.load_module("a\0b"),
            Err(Error::InvalidArgument(_))
        ));
        let big = "/".repeat(3 * MIB);
        let m = r.session.load_module(&big).unwrap();
        let loads = r.sent(Opcode::ModuleLoad);
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].input, vec![3 * MIB]);
        assert_eq!(
            loads[0].header.op,
            Op::ModuleLoad {
                ptx_len: 3 * MIB as u32
            }
        );
        let logged = r
            .dev
            .state
            .lock()
            .unwrap()
            .log
            .iter()
            .any(|q| matches!(&q.command, Command::ModuleLoad { ptx } if ptx.len() == 3 * MIB));
        assert!(logged);
        drop(m);
        assert_eq!(r.sent(Opcode::ModuleUnload).len(), 1);
    }

    #[test]
    fn info_config_and_selftest_decode_the_device_reply() {
        let r = rig();
        let _b = r.session.alloc::<u8>(4096).unwrap();
        let info = r.session.info().unwrap();
        assert_eq!(info.config.name, NAME);
        assert_eq!(info.config.mem_quota, QUOTA);
        assert_eq!(
            (info.mem_used, info.sessions, info.allocations),
            (4096, 1, 1)
        );
        assert_eq!(r.session.config().unwrap().name, NAME);
        assert_eq!(
            r.session.selftest(SelftestKind::DeviceInfo).unwrap(),
            "fake self-test passed"
        );
    }

    #[test]
    fn the_transport_fills_in_the_session_and_refuses_session_opcodes() {
        let dev = FakeDevice::new();
        let t: InProcessTransport = dev.transport();
        let id = t.session_id();
        let header = Header {
            session: 999,
            tag: 5,
            op: Op::Alloc { size: 8 },
        }
        .encode();
        let r = t.submit(&header, &[], &mut []).unwrap();
        assert_eq!(r.status, Status::Ok);
        assert_eq!(dev.state.lock().unwrap().log.last().unwrap().session, id);
        for op in [Op::SessionOpen, Op::SessionClose] {
            let header = Header {
                session: 0,
                tag: 0,
                op,
            }
            .encode();
            assert!(matches!(
                t.submit(&header, &[], &mut []),
                Err(Error::InvalidArgument(_))
            ));
        }
        // A header that does not decode is answered the way the device would.
        let mut bad = Header {
            session: 0,
            tag: 0,
            op: Op::Sync,
        }
        .encode();
        bad[6] = 99;
        assert_eq!(
            t.submit(&bad, &[], &mut []).unwrap().status,
            Status::UnknownOpcode
        );
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        let r = rig();
        assert!(matches!(
            r.session.alloc::<u64>(usize::MAX / 4),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_missing_device_node_is_an_open_error() {
        let err = Device::open_path("/nonexistent/vgpu0").unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        assert_eq!(
            err.report(),
            "cannot open /nonexistent/vgpu0: No such file or directory (os error 2)"
        );
    }

    fn scale(r: &Rig, b: &DeviceBuffer<f32>, alpha: f32) -> Result<()> {
        let n = b.len() as u32;
        r.session.launch(
            &r.session.builtin(),
            "scale_f32",
            LaunchConfig::for_num_elems(n),
            &[b.arg(), alpha.into(), n.into()],
        )
    }

    #[test]
    fn launches_memsets_and_small_copies_are_queued_in_order() {
        use Opcode::*;
        let r = rig();
        let mut a = r.session.alloc::<f32>(4).unwrap();
        let mut b = r.session.alloc::<f32>(4).unwrap();
        r.session.htod(&[1.0, 2.0, 3.0, 4.0], &mut a).unwrap();
        r.session.memset_u8(&mut b, 0).unwrap();
        scale(&r, &a, 2.0).unwrap();
        r.session.dtod(&a, &mut b).unwrap();
        scale(&r, &b, 10.0).unwrap();
        r.session.sync().unwrap();
        // Queued in the order they were made, and the device ran them in that order.
        assert_eq!(r.session.dtoh(&b).unwrap(), vec![20.0, 40.0, 60.0, 80.0]);
        let expected = [
            (Alloc, false),
            (Alloc, false),
            (Htod, true),
            (Memset, true),
            (Launch, true),
            (Dtod, true),
            (Launch, true),
            (Sync, false),
            (Dtoh, false),
        ];
        assert_eq!(r.order(), expected);
        let executed: Vec<Opcode> = {
            let st = r.dev.state.lock().unwrap();
            st.log.iter().map(|q| q.header().op.opcode()).collect()
        };
        let executed: Vec<Opcode> = executed
            .into_iter()
            .filter(|op| !matches!(op, Opcode::SessionOpen | Opcode::Info))
            .collect();
        assert_eq!(executed, expected.map(|(op, _)| op));
    }

    #[test]
    fn copies_over_64_kib_wait_for_the_device_in_every_piece_over_it() {
        let r = rig();
        let n = PAGEABLE_CHUNK_BYTES + ASYNC_MAX_BYTES;
        let src = pattern(n);
        let mut big = r.session.alloc::<u8>(n).unwrap();
        r.session.htod(&src, &mut big).unwrap();
        // 1 MiB synchronously, the 64 KiB rest queued; exactly 64 KiB is queued too.
        let htods: Vec<(u64, bool)> = r
            .sent(Opcode::Htod)
            .iter()
            .map(|c| (pieces(std::slice::from_ref(c))[0].1, c.queued))
            .collect();
        assert_eq!(
            htods,
            vec![
                (PAGEABLE_CHUNK_BYTES as u64, false),
                (ASYNC_MAX_BYTES as u64, true)
            ]
        );
        assert_eq!(r.session.dtoh(&big).unwrap(), src);
        let mut small = r.session.alloc::<u8>(ASYNC_MAX_BYTES + 1).unwrap();
        r.clear();
        r.session
            .htod(&src[..ASYNC_MAX_BYTES + 1], &mut small)
            .unwrap();
        assert_eq!(r.order(), [(Opcode::Htod, false)]);
    }

    #[test]
    fn an_async_launch_error_is_reported_by_the_next_sync_and_not_lost() {
        let r = rig();
        let mut b = r.session.htod_copy(&[1.0f32; 4]).unwrap();
        let builtin = r.session.builtin();
        let cfg = LaunchConfig::for_num_elems(4);
        // Queued: the launch itself cannot know yet.
        r.session
            .launch(&builtin, "no_such_kernel", cfg, &[])
            .unwrap();
        // Later failures until the report are dropped, as the driver does.
        r.session
            .launch(&builtin, "another_unknown", cfg, &[])
            .unwrap();
        r.session.memset_u32(&mut b, 7).unwrap();
        let err = r.session.sync().unwrap_err();
        assert!(matches!(
            err,
            Error::Device {
                op: "LAUNCH",
                status: Status::KernelNotFound,
                detail: 0
            }
        ));
        assert_eq!(
            err.to_string(),
            "LAUNCH: device returned KERNEL_NOT_FOUND (detail 0)"
        );
        // Reported once; the work queued after the failure ran.
        r.session.sync().unwrap();
        assert_eq!(r.session.dtoh(&b).unwrap(), vec![f32::from_bits(7); 4]);

        // A failure that arrives with a free on drop waits for the next call.
        let other = r.session.alloc::<f32>(4).unwrap();
        scale(&r, &other, 2.0).unwrap();
        r.session
            .launch(&builtin, "no_such_kernel", cfg, &[])
            .unwrap();
        drop(other);
        assert_eq!(r.dev.state.lock().unwrap().buffers(), 1);
        let err = r.session.dtoh(&b).unwrap_err();
        assert_eq!(err.status(), Some(Status::KernelNotFound));
        r.session.sync().unwrap();

        // An ALLOC that ran but reports an earlier failure gives its buffer back.
        let values = [KernelArg::U32(1); 4];
        r.session
            .launch(&builtin, "vector_add_f32", cfg, &values)
            .unwrap();
        let err = r.session.alloc::<f32>(4).err().unwrap();
        assert_eq!(err.status(), Some(Status::InvalidArgument));
        assert_eq!(r.sent(Opcode::Alloc).len(), 3);
        assert_eq!(r.sent(Opcode::Free).len(), 2);
        assert_eq!(r.dev.state.lock().unwrap().buffers(), 1);
        r.session.sync().unwrap();
    }

    #[test]
    fn without_async_support_every_request_waits_and_fails_at_once() {
        let r = rig_full(None, false, true);
        let mut b = r.session.alloc::<u32>(4).unwrap();
        let cfg = LaunchConfig::for_num_elems(1);
        let err = r
            .session
            .launch(&r.session.builtin(), "no_such_kernel", cfg, &[])
            .unwrap_err();
        assert_eq!(err.status(), Some(Status::KernelNotFound));
        r.session.memset_u32(&mut b, 5).unwrap();
        r.session.sync().unwrap();
        assert_eq!(r.session.dtoh(&b).unwrap(), vec![5; 4]);
    }

    #[test]
    fn poll_us_comes_from_the_environment_value() {
        assert_eq!(poll_us_requested(None), None);
        assert_eq!(poll_us_requested(Some("")), None);
        assert_eq!(poll_us_requested(Some("  ")), None);
        assert_eq!(poll_us_requested(Some("fast")), None);
        assert_eq!(poll_us_requested(Some("-5")), None);
        assert_eq!(poll_us_requested(Some("0")), Some(0));
        assert_eq!(poll_us_requested(Some(" 50 ")), Some(50));
        assert_eq!(poll_us_requested(Some("1000")), Some(POLL_MAX_US));
        assert_eq!(poll_us_requested(Some("99999999999")), Some(POLL_MAX_US));
    }

    /// A session whose transport polls as the `VGPU_POLL_US` value says.
    fn rig_polling(env: Option<&str>) -> Rig {
        let dev = FakeDevice::new();
        let rec = Recorder::new(AsyncDriver::new(dev.transport()));
        let (chains, rejected) = (rec.chains.clone(), rec.rejected.clone());
        Rig {
            dev,
            chains,
            rejected,
            session: Session::with_options(Box::new(rec), false, poll_us_requested(env)),
        }
    }

    impl Rig {
        /// (opcode, queued, poll_us) of every chain, in order.
        fn polls(&self) -> Vec<(Opcode, bool, u32)> {
            let chains = self.chains.lock().unwrap();
            chains
                .iter()
                .map(|c| (c.opcode(), c.queued, c.poll_us))
                .collect()
        }
    }

    #[test]
    fn poll_us_from_the_environment_reaches_the_transport() {
        let r = rig_polling(Some("50"));
        assert_eq!(r.session.poll_us(), 50);
        let b = r.session.alloc::<u32>(4).unwrap();
        r.session.sync().unwrap();
        assert_eq!(r.session.dtoh(&b).unwrap().len(), 4);
        assert_eq!(
            r.polls(),
            [
                (Opcode::Alloc, false, 50),
                (Opcode::Sync, false, 50),
                (Opcode::Dtoh, false, 50)
            ]
        );
        assert_eq!(rig_polling(Some("5000")).session.poll_us(), POLL_MAX_US);
        for env in [None, Some(""), Some("0"), Some("soon")] {
            assert_eq!(rig_polling(env).session.poll_us(), 0, "{env:?}");
        }
        // A transport that cannot poll ignores it.
        let s = Session::with_options(Box::new(FakeDevice::new().transport()), false, Some(50));
        assert_eq!(s.poll_us(), 0);
        s.set_poll_us(50);
        assert_eq!(s.poll_us(), 0);
        s.sync().unwrap();
    }

    #[test]
    fn set_poll_us_makes_synchronous_requests_of_every_clone_poll() {
        let r = rig();
        let clone = r.session.clone();
        assert_eq!(r.session.poll_us(), 0);
        let mut b = r.session.alloc::<u32>(4).unwrap();
        clone.set_poll_us(20);
        assert_eq!(r.session.poll_us(), 20);
        r.clear();
        // Queued requests do not wait, so they do not poll; the waiting ones do.
        r.session.memset_u32(&mut b, 7).unwrap();
        r.session.sync().unwrap();
        assert_eq!(clone.dtoh(&b).unwrap(), vec![7; 4]);
        assert_eq!(
            r.polls(),
            [
                (Opcode::Memset, true, 0),
                (Opcode::Sync, false, 20),
                (Opcode::Dtoh, false, 20)
            ]
        );
        // With synchronous submission a memset waits for its answer, and polls.
        r.session.set_sync_submit(true);
        r.clear();
        r.session.memset_u32(&mut b, 8).unwrap();
        assert_eq!(r.polls(), [(Opcode::Memset, false, 20)]);
        r.session.set_sync_submit(false);
        r.session.set_poll_us(u32::MAX);
        assert_eq!(clone.poll_us(), POLL_MAX_US);
        r.session.set_poll_us(0);
        r.clear();
        r.session.sync().unwrap();
        assert_eq!(r.polls(), [(Opcode::Sync, false, 0)]);
        assert_eq!(clone.poll_us(), 0);
    }

    #[test]
    fn sync_submit_makes_each_request_wait_for_its_answer() {
        assert!(sync_submit_requested(Some("1")));
        assert!(sync_submit_requested(Some(" yes ")));
        assert!(!sync_submit_requested(Some("0")));
        assert!(!sync_submit_requested(Some("")));
        assert!(!sync_submit_requested(None));

        let r = rig();
        let clone = r.session.clone();
        assert!(!clone.sync_submit());
        r.session.set_sync_submit(true);
        assert!(clone.sync_submit());
        let mut b = r.session.alloc::<u32>(4).unwrap();
        r.clear();
        r.session.memset_u32(&mut b, 1).unwrap();
        r.session.htod(&[1, 2, 3, 4], &mut b).unwrap();
        let err = clone
            .launch(
                &clone.builtin(),
                "no_such_kernel",
                LaunchConfig::for_num_elems(1),
                &[],
            )
            .unwrap_err();
        assert_eq!(err.status(), Some(Status::KernelNotFound));
        assert!(r.order().iter().all(|&(_, queued)| !queued));
        r.session.set_sync_submit(false);
        r.session.memset_u32(&mut b, 1).unwrap();
        assert_eq!(r.order().last(), Some(&(Opcode::Memset, true)));
    }
}
