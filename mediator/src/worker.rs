// SPDX-License-Identifier: Apache-2.0
//! A tenant's worker: it owns the tenant's sessions and checks every request against
//! them before anything reaches an executor.
//!
//! Each session (one guest process) has its own executor, made when the session opens:
//! with worker processes that is its own CUDA context in its own process, as native CUDA
//! gives each process. A kernel can dereference any device pointer of its context, so
//! sessions that shared one could read and write each other's buffers by address; apart,
//! a pointer of another session means nothing in this session's context. A fault loses
//! the faulting session's executor only; the VM's other sessions work on. The tenant still
//! owns the quota, the weight and the accounting across its sessions.
//!
//! The quota counts everything the VM's work holds on the device, each part checked
//! before the work that takes it and given back exactly when it goes: a session's
//! context ([`Executor::context_bytes`], at SESSION_OPEN; the self-test's context too, for
//! as long as it is kept, which is until the VM needs the room), buffers as the
//! allocator takes them ([`Executor::alloc_footprint`], at ALLOC), modules
//! ([`Executor::module_bytes`], measured at MODULE_LOAD: a module that does not fit is
//! unloaded again and refused; one whose PTX alone declares more than fits never reaches
//! the device), and the local memory the driver reserves for a session's kernels
//! ([`Executor::local_reservation`]: the largest over the kernels the session launched,
//! since the driver keeps it for the context's life; a launch that would raise it past
//! the quota is refused before it reaches the device).
//!
//! A module loaded from a binary image (MODULE_LOAD_IMAGE) is charged like a PTX module:
//! what its image declares is checked before it loads ([`vgpu_executor::image`]) and what
//! it holds is measured once it has. A module's variables (MODULE_GLOBAL) are handed out
//! as handles that copies and launches take like buffers; their memory is the module's,
//! charged with it, so they are not charged again, FREE refuses them
//! (`INVALID_ARGUMENT`), and they go with their module.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use vgpu_kernels::{KernelError, LaunchShape, ParamKind};
use vgpu_protocol::{
    Command, HostChunk, InfoReply, Launch, Param, Request, Response, SelftestKind, Status,
    BUILTIN_MODULE,
};

use crate::executor::{
    BufferId, CompileOutput, ExecError, ExecParam, Executor, ExecutorFactory, GuestIo, KernelRef,
    ModuleId, StreamId,
};
use crate::hostmap::HostMapping;
use crate::mediator::{
    device_config, Limits, Message, TenantShared, TenantUsage, SELFTEST_EXECUTOR,
};
use crate::metrics::opcode;

/// Most dynamic shared memory a launch may ask for without an opt-in.
pub const MAX_SHARED_BYTES: u32 = 48 << 10;

struct Buffer {
    id: BufferId,
    size: u64,
    /// Its footprint, charged to the quota.
    charged: u64,
}

struct Module {
    id: ModuleId,
    /// Its device bytes, charged to the quota.
    charged: u64,
    /// Handles of its variables handed out (MODULE_GLOBAL), by name.
    globals: HashMap<String, u64>,
}

/// A module's variable, handed out as a handle that copies and launches take.
struct Global {
    id: BufferId,
    size: u64,
}

struct Session {
    /// The session's own executor; `None` once it was lost.
    exec: Option<Box<dyn Executor>>,
    stream: StreamId,
    buffers: HashMap<u64, Buffer>,
    modules: HashMap<u64, Module>,
    /// Variables of its modules handed out, by handle (not charged: their module is).
    globals: HashMap<u64, Global>,
    /// Charged for its context.
    context_bytes: u64,
    /// Charged for the local memory the driver reserved for its kernels: the largest
    /// reservation of those it launched.
    local_bytes: u64,
    /// Registered host buffers: id -> length.
    host_bufs: HashMap<u64, u64>,
    /// Where their chunks lie in guest-physical memory: chunk start -> chunk.
    host_chunks: BTreeMap<u64, HostChunkAt>,
    /// An asynchronous failure: every later request answers it until the session closes.
    sticky: Option<Refusal>,
}

/// A chunk of a registered host buffer: `len` bytes at `offset` of buffer `id`.
#[derive(Clone, Copy, Debug)]
struct HostChunkAt {
    id: u64,
    len: u64,
    offset: u64,
}

impl Session {
    /// The memory and size of buffer or module variable `handle`.
    fn memory(&self, handle: u64) -> Option<(BufferId, u64)> {
        match self.buffers.get(&handle) {
            Some(b) => Some((b.id, b.size)),
            None => self.globals.get(&handle).map(|g| (g.id, g.size)),
        }
    }

    /// The host buffer and offset that hold the first `len` bytes of the guest-physical
    /// `ranges`, in order, as one run of bytes; `None` unless one registered buffer holds
    /// all of them.
    fn locate(&self, ranges: &[(u64, u64)], len: u64) -> Option<(u64, u64)> {
        let mut found: Option<(u64, u64)> = None;
        let mut next = 0u64;
        let mut wanted = len;
        for &(mut addr, n) in ranges {
            let mut left = n.min(wanted);
            wanted -= left;
            while left > 0 {
                let (&start, chunk) = self.host_chunks.range(..=addr).next_back()?;
                let inside = addr - start;
                if inside >= chunk.len {
                    return None;
                }
                let at = chunk.offset + inside;
                match found {
                    None => found = Some((chunk.id, at)),
                    Some((id, _)) if id != chunk.id || at != next => return None,
                    Some(_) => {}
                }
                let n = left.min(chunk.len - inside);
                next = at + n;
                addr += n;
                left -= n;
            }
            if wanted == 0 {
                break;
            }
        }
        found.filter(|_| wanted == 0)
    }
}

pub(crate) struct Worker {
    factory: Arc<dyn ExecutorFactory>,
    shared: Arc<TenantShared>,
    limits: Limits,
    /// Runs the built-in self-tests (no guest code): made when first needed.
    selftest_exec: Option<Box<dyn Executor>>,
    /// Charged for the self-test executor's context while it exists.
    selftest_bytes: u64,
    /// The context bytes of the executor made last: a session (or self-test) whose
    /// context would not fit is refused before one is made.
    expected_context_bytes: u64,
    sessions: HashMap<u64, Session>,
    next_id: u64,
    usage: TenantUsage,
    /// The device's attributes as a session's executor last reported them: every
    /// session's executor is on the same device, so one table serves them all.
    attributes: Vec<i32>,
}

type Reply = Result<Response, Refusal>;

/// Why a request was refused: the status and detail its answer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} (detail {detail})")]
pub(crate) struct Refusal {
    pub status: Status,
    pub detail: u32,
}

impl Refusal {
    pub fn new(status: Status, detail: u32) -> Refusal {
        Refusal { status, detail }
    }
}

impl From<ExecError> for Refusal {
    fn from(e: ExecError) -> Refusal {
        Refusal::new(e.status, e.detail)
    }
}

fn err<T>(status: Status, detail: u32) -> Result<T, Refusal> {
    Err(Refusal::new(status, detail))
}

/// The refusal for an executor's error, logged.
fn refused(e: ExecError) -> Refusal {
    log::debug!("executor: {e}");
    Refusal::from(e)
}

impl Worker {
    pub fn new(
        factory: Arc<dyn ExecutorFactory>,
        shared: Arc<TenantShared>,
        limits: Limits,
    ) -> Self {
        Worker {
            factory,
            shared,
            limits,
            selftest_exec: None,
            selftest_bytes: 0,
            expected_context_bytes: 0,
            sessions: HashMap::new(),
            next_id: 0,
            usage: TenantUsage::default(),
            attributes: Vec::new(),
        }
    }

    /// Whether `bytes` more fit in the tenant's quota.
    fn fits(&self, bytes: u64) -> bool {
        fits(&self.usage, self.shared.quota(), bytes)
    }

    /// Whether `bytes` more fit in the tenant's quota once the self-test executor, kept
    /// between self-tests, is given up if it is in the way.
    fn make_room(&mut self, bytes: u64) -> bool {
        if !self.fits(bytes) && self.selftest_exec.is_some() {
            self.drop_selftest_exec();
        }
        self.fits(bytes)
    }

    /// The refusal for device memory that does not fit, logged with what was asked.
    fn over_quota(&self, what: &str, bytes: u64) -> Refusal {
        log::debug!(
            "tenant {}: {what} of {bytes} bytes refused: {} of the {}-byte quota in use",
            self.name(),
            self.usage.mem_used,
            self.shared.quota()
        );
        Refusal::new(Status::QuotaExceeded, 0)
    }

    /// Drops the self-test executor (and its context), giving back its charge.
    fn drop_selftest_exec(&mut self) {
        self.selftest_exec = None;
        self.untrack(SELFTEST_EXECUTOR);
        release(&mut self.usage, Charge::Context, self.selftest_bytes);
        self.selftest_bytes = 0;
    }

    pub fn run(mut self) {
        let shared = self.shared.clone();
        // Among sessions with requests waiting, the one whose work took the least device
        // time goes next.
        let pick = |waiting: &[u64]| shared.sched.pick_session(shared.id, waiting);
        while let Some(message) = shared.queue.pop(pick) {
            match message {
                Message::Request {
                    request,
                    io,
                    token,
                    sink,
                    hold,
                    submitted,
                } => {
                    let op = opcode(&request.command);
                    let response = self.handle(request, io);
                    self.usage.requests += 1;
                    self.publish();
                    // Counted before the answer goes: whoever reads it sees it counted.
                    self.shared
                        .counters
                        .record(op, response.status, submitted.elapsed());
                    sink.complete_held(token, response, hold);
                }
                Message::Reset { done } => {
                    self.reset();
                    self.publish();
                    let _ = done.send(());
                }
            }
        }
        self.reset();
        self.publish();
    }

    fn publish(&self) {
        *self.shared.usage.lock().unwrap_or_else(|e| e.into_inner()) = self.usage;
    }

    fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// Closes every session; their executors (and contexts) go with them.
    fn reset(&mut self) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close_session(id);
        }
        self.drop_selftest_exec();
    }

    /// Lets a reset or removal end `exec` from another thread while this thread is blocked
    /// in a call on it (see [`crate::Mediator::reset_tenant`]): its killer is kept under
    /// `key` (a session id, or [`SELFTEST_EXECUTOR`]).
    fn track(&self, key: u64, exec: &dyn Executor) {
        if let Some(killer) = exec.killer() {
            self.shared
                .killers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, killer);
        }
    }

    /// Forgets the killer under `key`, once its executor is dropped (a reset that comes
    /// while it is being dropped still reaches it).
    fn untrack(&self, key: u64) {
        self.shared
            .killers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A new executor (for a worker process: one taken from the pool or started now).
    fn new_executor(&self) -> Result<Box<dyn Executor>, Refusal> {
        let started = std::time::Instant::now();
        let exec = self.factory.create().map_err(|e| {
            log::error!("tenant {}: executor unavailable: {e}", self.name());
            Refusal::new(Status::DeviceLost, e.detail)
        })?;
        log::debug!(
            "tenant {}: executor ready in {} us",
            self.name(),
            started.elapsed().as_micros()
        );
        Ok(exec)
    }

    /// The session's executor; `DEVICE_LOST` once it was lost.
    fn exec(&mut self, sid: u64) -> Result<&mut dyn Executor, Refusal> {
        match self.sessions.get_mut(&sid).and_then(|s| s.exec.as_mut()) {
            Some(e) => Ok(e.as_mut()),
            None => err(Status::DeviceLost, 0),
        }
    }

    /// Runs a request; its data may stay in the guest's buffers (see
    /// [`crate::Mediator::submit_io`]).
    pub fn handle(&mut self, request: Request, io: Option<GuestIo>) -> Response {
        let session = request.session;
        let result = match request.command {
            Command::Info => Ok(self.info()),
            Command::SessionOpen => self.open_session(),
            Command::Selftest { test } => Ok(self.selftest(test)),
            Command::SessionClose => {
                if self.sessions.contains_key(&session) {
                    self.close_session(session);
                    Ok(Response::ok())
                } else {
                    err(Status::InvalidSession, 0)
                }
            }
            command => self.in_session(session, command, io),
        };
        result.unwrap_or_else(|r| Response::error(r.status, r.detail))
    }

    fn info(&self) -> Response {
        let config = device_config(
            self.factory.device(),
            self.shared.gpu,
            self.shared.quota(),
            &self.limits,
        );
        let reply = InfoReply {
            config,
            mem_used: self.usage.mem_used,
            sessions: self.usage.sessions,
            allocations: self.usage.allocations,
            modules: self.usage.modules,
            weight: self
                .shared
                .sched
                .stats(self.shared.id)
                .map_or(self.shared.config.weight, |s| s.weight),
        };
        Response::data(reply.encode().to_vec())
    }

    fn open_session(&mut self) -> Reply {
        if self.sessions.len() >= self.limits.max_sessions as usize {
            return err(Status::LimitExceeded, self.limits.max_sessions);
        }
        // A context the size of the last one would not fit: refused without making one.
        if !self.make_room(self.expected_context_bytes) {
            return Err(self.over_quota("session context", self.expected_context_bytes));
        }
        let mut exec = self.new_executor()?;
        let context = exec.context_bytes();
        self.expected_context_bytes = context;
        if !self.make_room(context) {
            return Err(self.over_quota("session context", context));
        }
        let id = self.new_id();
        self.track(id, exec.as_ref());
        let stream = match exec.open_stream() {
            Ok(stream) => stream,
            Err(e) => {
                drop(exec);
                self.untrack(id);
                return Err(Refusal::from(e));
            }
        };
        self.shared
            .sched
            .attach(self.shared.id, id, exec.meter(), exec.killer());
        self.sessions.insert(
            id,
            Session {
                exec: Some(exec),
                stream,
                buffers: HashMap::new(),
                modules: HashMap::new(),
                globals: HashMap::new(),
                context_bytes: context,
                local_bytes: 0,
                host_bufs: HashMap::new(),
                host_chunks: BTreeMap::new(),
                sticky: None,
            },
        );
        charge(&mut self.usage, Charge::Context, context);
        self.usage.sessions += 1;
        log::debug!("tenant {}: session {id} opened", self.name());
        Ok(Response::value(id))
    }

    fn close_session(&mut self, id: u64) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.shared.sched.detach(self.shared.id, id);
        self.usage.sessions -= 1;
        uncount(&mut self.usage, &s);
        // The executor goes with the session: for a worker process its context and
        // everything in it; an in-process executor frees what it holds when dropped.
        drop(s);
        self.untrack(id);
        log::debug!("tenant {}: session {id} closed", self.shared.config.name);
    }

    fn in_session(&mut self, id: u64, command: Command, io: Option<GuestIo>) -> Reply {
        let session = self
            .sessions
            .get(&id)
            .ok_or(Refusal::new(Status::InvalidSession, 0))?;
        if let Some(sticky) = session.sticky {
            return Err(sticky);
        }
        // Poisoned since the last request (a worker process that died while idle).
        if session.exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.lose_session(id);
            return err(Status::DeviceLost, 0);
        }
        let result = self.dispatch(id, command, io);
        if let Err(Refusal { status, detail }) = result {
            if matches!(status, Status::LaunchFailed | Status::DeviceLost) {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.sticky = Some(Refusal::new(status, detail));
                }
            }
        }
        let session = &self.sessions[&id];
        if session.exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.lose_session(id);
        }
        result
    }

    /// The session's context is unusable: drop its executor (for a worker process, the
    /// process and its context) and everything it held. The session keeps answering its
    /// sticky error (`DEVICE_LOST` if it had none) until it is closed; the VM's other
    /// sessions are untouched.
    fn lose_session(&mut self, sid: u64) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        log::warn!(
            "tenant {}: session {sid} lost its execution context (a device fault, the kernel \
             timeout or a reset)",
            self.shared.config.name
        );
        s.exec = None;
        self.shared.sched.detach(self.shared.id, sid);
        if s.sticky.is_none() {
            s.sticky = Some(Refusal::new(Status::DeviceLost, 0));
        }
        uncount(&mut self.usage, s);
        s.buffers.clear();
        s.modules.clear();
        s.globals.clear();
        s.context_bytes = 0;
        s.local_bytes = 0;
        s.host_bufs.clear();
        s.host_chunks.clear();
        self.usage.restarts += 1;
        self.untrack(sid);
    }

    /// The registered host buffer and offset that hold the first `len` bytes of guest
    /// data at `ranges`, counted as a copy straight from it; `None` (and `ranges` never
    /// asked for) when the session has no host buffers.
    fn host_copy(
        &mut self,
        sid: u64,
        len: u64,
        ranges: impl FnOnce() -> Option<Vec<(u64, u64)>>,
    ) -> Option<(u64, u64)> {
        let s = &self.sessions[&sid];
        if s.host_bufs.is_empty() {
            return None;
        }
        let found = s.locate(&ranges()?, len);
        if found.is_some() {
            self.usage.host_copies += 1;
        }
        found
    }

    /// The memory and size of the session's buffer or module variable `handle`.
    fn buffer(&self, session: u64, handle: u64) -> Result<(BufferId, u64), Refusal> {
        self.sessions[&session]
            .memory(handle)
            .ok_or(Refusal::new(Status::InvalidHandle, 0))
    }

    fn dispatch(&mut self, sid: u64, command: Command, io: Option<GuestIo>) -> Reply {
        let stream = self.sessions[&sid].stream;
        match command {
            Command::Alloc { size } => {
                if size == 0 {
                    return err(Status::InvalidArgument, 0);
                }
                let s = &self.sessions[&sid];
                if s.buffers.len() >= self.limits.max_buffers_per_session as usize {
                    return err(Status::LimitExceeded, self.limits.max_buffers_per_session);
                }
                if self.usage.allocations >= self.limits.max_allocations {
                    return err(Status::LimitExceeded, self.limits.max_allocations);
                }
                // Charged as the allocator takes it, not as asked.
                let footprint = self.exec(sid)?.alloc_footprint(size);
                if !self.make_room(footprint) {
                    return Err(self.over_quota("allocation", footprint));
                }
                let id = self.exec(sid)?.alloc(size).map_err(refused)?;
                let handle = self.new_id();
                self.sessions
                    .get_mut(&sid)
                    .expect("checked")
                    .buffers
                    .insert(
                        handle,
                        Buffer {
                            id,
                            size,
                            charged: footprint,
                        },
                    );
                charge(&mut self.usage, Charge::Buffer, footprint);
                self.usage.allocations += 1;
                // The handle, and the buffer's device address: what a kernel sees for it.
                Ok(Response {
                    value1: id.0,
                    ..Response::value(handle)
                })
            }
            Command::Free { handle } => {
                let s = self.sessions.get_mut(&sid).expect("checked");
                if s.globals.contains_key(&handle) {
                    // A module's variable goes with its module.
                    return err(Status::InvalidArgument, 0);
                }
                let b = s
                    .buffers
                    .remove(&handle)
                    .ok_or(Refusal::new(Status::InvalidHandle, 0))?;
                release(&mut self.usage, Charge::Buffer, b.charged);
                self.usage.allocations -= 1;
                self.exec(sid)?.free(b.id);
                Ok(Response::ok())
            }
            Command::Htod { dst, offset, data } => {
                let source = match io {
                    Some(GuestIo::Source(source)) if data.is_empty() => Some(source),
                    _ => None,
                };
                let len = source.as_ref().map_or(data.len() as u64, |s| s.len());
                let id = self.range(sid, dst, offset, len)?;
                // Data in a registered host buffer goes straight from its pages.
                let host = match &source {
                    Some(s) => self.host_copy(sid, len, || s.guest_ranges()),
                    None => None,
                };
                let _turn = self.shared.sched.admit(self.shared.id, sid);
                let exec = self.exec(sid)?;
                match (source, host) {
                    (Some(_), Some((host, at))) => {
                        exec.htod_host(stream, id, offset, host, at, len)
                    }
                    (Some(source), None) => exec.htod_from(stream, id, offset, source.as_ref()),
                    (None, _) => exec.htod(stream, id, offset, &data),
                }
                .map_err(refused)?;
                self.shared.counters.add_htod(len);
                Ok(Response::ok())
            }
            Command::Dtoh { src, offset, len } => {
                let id = self.range(sid, src, offset, len)?;
                if let Some(GuestIo::Sink(sink)) = io {
                    let placed = u32::try_from(len)
                        .ok()
                        .filter(|_| len <= sink.capacity())
                        .ok_or(Refusal::new(Status::BufferTooSmall, 0))?;
                    let host = self.host_copy(sid, len, || sink.guest_ranges());
                    let _turn = self.shared.sched.admit(self.shared.id, sid);
                    let exec = self.exec(sid)?;
                    match host {
                        Some((host, at)) => exec.dtoh_host(stream, id, offset, host, at, len),
                        None => exec.dtoh_into(stream, id, offset, len, sink.as_ref()),
                    }
                    .map_err(refused)?;
                    self.shared.counters.add_dtoh(len);
                    return Ok(Response::placed(placed));
                }
                // Counted in the VM's byte budget (`request_cost`); allocated fallibly all
                // the same: the host may have less than the budgets add up to.
                let mut out = crate::executor::host_buffer(len).map_err(refused)?;
                let _turn = self.shared.sched.admit(self.shared.id, sid);
                self.exec(sid)?
                    .dtoh(stream, id, offset, &mut out)
                    .map_err(refused)?;
                self.shared.counters.add_dtoh(len);
                Ok(Response::data(out))
            }
            Command::Dtod {
                dst,
                dst_offset,
                src,
                src_offset,
                len,
            } => {
                let d = self.range(sid, dst, dst_offset, len)?;
                let s = self.range(sid, src, src_offset, len)?;
                // CUDA leaves overlapping copies undefined: refuse them on every executor.
                let overlap = dst_offset < src_offset + len && src_offset < dst_offset + len;
                if dst == src && len > 0 && overlap {
                    return err(Status::InvalidArgument, 0);
                }
                let _turn = self.shared.sched.admit(self.shared.id, sid);
                self.exec(sid)?
                    .dtod(stream, d, dst_offset, s, src_offset, len)
                    .map_err(refused)?;
                Ok(Response::ok())
            }
            Command::Memset {
                dst,
                offset,
                len,
                value,
                width,
            } => {
                let d = self.range(sid, dst, offset, len)?;
                let _turn = self.shared.sched.admit(self.shared.id, sid);
                self.exec(sid)?
                    .memset(stream, d, offset, len, value, width)
                    .map_err(refused)?;
                Ok(Response::ok())
            }
            Command::ModuleLoad { ptx } => self.load_module(sid, ModuleSource::Ptx(&ptx)),
            Command::ModuleLoadImage { image } => match vgpu_executor::image::as_ptx(&image) {
                // PTX text is a PTX module, whichever way it came.
                Some(ptx) => self.load_module(sid, ModuleSource::Ptx(ptx)),
                None => self.load_module(sid, ModuleSource::Image(&image)),
            },
            Command::ModuleUnload { module } => {
                let s = self.sessions.get_mut(&sid).expect("checked");
                let m = s
                    .modules
                    .remove(&module)
                    .ok_or(Refusal::new(Status::InvalidHandle, 0))?;
                for handle in m.globals.values() {
                    s.globals.remove(handle);
                }
                self.usage.modules -= 1;
                release(&mut self.usage, Charge::Module, m.charged);
                self.exec(sid)?.unload_module(m.id);
                Ok(Response::ok())
            }
            Command::Launch(launch) => self.launch(sid, stream, launch),
            Command::HostRegister { id, chunks } => {
                let Some(GuestIo::Map(mapping)) = io else {
                    // Only a transport that can map guest memory registers host buffers.
                    return err(Status::Unsupported, 0);
                };
                self.register_host(sid, id, &chunks, &mapping)
            }
            Command::HostUnregister { id } => {
                let s = self.sessions.get_mut(&sid).expect("checked");
                let len = s
                    .host_bufs
                    .remove(&id)
                    .ok_or(Refusal::new(Status::InvalidHandle, 0))?;
                s.host_chunks.retain(|_, c| c.id != id);
                self.usage.host_bytes -= len;
                self.exec(sid)?.unregister_host(id);
                Ok(Response::ok())
            }
            Command::Sync => {
                self.exec(sid)?.sync(stream).map_err(refused)?;
                Ok(Response::ok())
            }
            Command::DeviceAttributes { count } => self.device_attributes(sid, count),
            Command::FunctionInfo { module, name } => {
                let kernel = self.kernel_ref(sid, module, &name)?;
                let info = match self.sessions.get_mut(&sid).and_then(|s| s.exec.as_mut()) {
                    Some(exec) => exec.function_info(kernel).map_err(refused)?,
                    None => return err(Status::DeviceLost, 0),
                };
                Ok(Response::data(info.encode()))
            }
            Command::ModuleGlobal { module, name } => self.module_global(sid, module, &name),
            Command::Compile {
                source,
                options,
                out_len,
            } => self.compile(sid, &source, &options, out_len),
            Command::Info
            | Command::SessionOpen
            | Command::SessionClose
            | Command::Selftest { .. } => {
                unreachable!("handled before dispatch")
            }
        }
    }

    /// MODULE_LOAD, and MODULE_LOAD_IMAGE: the limits, what the module declares, then
    /// the load and what it holds, each checked against the quota.
    fn load_module(&mut self, sid: u64, source: ModuleSource<'_>) -> Reply {
        if self.sessions[&sid].modules.len() >= self.limits.max_modules_per_session as usize {
            return err(Status::LimitExceeded, self.limits.max_modules_per_session);
        }
        if self.usage.modules >= self.limits.max_modules {
            return err(Status::LimitExceeded, self.limits.max_modules);
        }
        // Variables the module itself declares past the quota never reach the device.
        let declared = match source {
            ModuleSource::Ptx(ptx) => crate::ptx::declared_global_bytes(ptx),
            ModuleSource::Image(image) => vgpu_executor::image::declared_global_bytes(image),
        };
        if !self.make_room(declared) {
            return Err(self.over_quota("module (declared variables)", declared));
        }
        let exec = self.exec(sid)?;
        let loaded = match source {
            ModuleSource::Ptx(ptx) => exec.load_module(ptx),
            ModuleSource::Image(image) => exec.load_module_image(image),
        };
        let m = loaded.map_err(refused)?;
        let bytes = exec.module_bytes(m);
        if !self.make_room(bytes) {
            // Measured once loaded: out again before anything can use it.
            self.exec(sid)?.unload_module(m);
            return Err(self.over_quota("module", bytes));
        }
        let handle = self.new_id();
        self.sessions
            .get_mut(&sid)
            .expect("checked")
            .modules
            .insert(
                handle,
                Module {
                    id: m,
                    charged: bytes,
                    globals: HashMap::new(),
                },
            );
        charge(&mut self.usage, Charge::Module, bytes);
        self.usage.modules += 1;
        Ok(Response::value(handle))
    }

    /// DEVICE_ATTRIBUTES: `count` little-endian `i32`, from the tenant's table when it
    /// has them (all its sessions' executors are on one device).
    fn device_attributes(&mut self, sid: u64, count: u32) -> Reply {
        if self.attributes.len() < count as usize {
            let mut table = self.exec(sid)?.device_attributes(count).map_err(refused)?;
            if table.len() != count as usize {
                return err(Status::Internal, 0);
            }
            hide_host_topology(&mut table);
            self.attributes = table;
        }
        let data = self.attributes[..count as usize]
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .collect();
        Ok(Response {
            value0: u64::from(count),
            ..Response::data(data)
        })
    }

    /// The kernel `name` of the session's `module`, or of the built-in catalog.
    fn kernel_ref<'n>(
        &self,
        sid: u64,
        module: u64,
        name: &'n str,
    ) -> Result<KernelRef<'n>, Refusal> {
        if module == BUILTIN_MODULE {
            let spec = vgpu_kernels::find(name).ok_or(Refusal::new(Status::KernelNotFound, 0))?;
            return Ok(KernelRef::Builtin(spec));
        }
        let m = self.sessions[&sid]
            .modules
            .get(&module)
            .ok_or(Refusal::new(Status::InvalidHandle, 0))?;
        Ok(KernelRef::Module(m.id, name))
    }

    /// MODULE_GLOBAL: a handle for the variable (the same one each time it is asked
    /// for), its device address and, as 8 bytes, its size. The catalog declares no
    /// variables.
    fn module_global(&mut self, sid: u64, module: u64, name: &str) -> Reply {
        if module == BUILTIN_MODULE {
            return err(Status::KernelNotFound, 0);
        }
        let s = &self.sessions[&sid];
        let m = s
            .modules
            .get(&module)
            .ok_or(Refusal::new(Status::InvalidHandle, 0))?;
        let answer = |handle: u64, g: &Global| Response {
            value0: handle,
            value1: g.id.0,
            ..Response::data(g.size.to_le_bytes().to_vec())
        };
        if let Some(&handle) = m.globals.get(name) {
            return Ok(answer(handle, &s.globals[&handle]));
        }
        // Each is a handle the mediator keeps: as many as a session may have buffers.
        if s.globals.len() >= self.limits.max_buffers_per_session as usize {
            return err(Status::LimitExceeded, self.limits.max_buffers_per_session);
        }
        let module_id = m.id;
        let (id, size) = self
            .exec(sid)?
            .module_global(module_id, name)
            .map_err(refused)?;
        let handle = self.new_id();
        let s = self.sessions.get_mut(&sid).expect("checked");
        let global = Global { id, size };
        let response = answer(handle, &global);
        s.globals.insert(handle, global);
        if let Some(m) = s.modules.get_mut(&module) {
            m.globals.insert(name.to_string(), handle);
        }
        Ok(response)
    }

    /// COMPILE: options and source checked ([`crate::compile`]), then NVRTC in the
    /// session's worker. Its answer: the PTX then the log (value0 and value1 their
    /// lengths); `BUFFER_TOO_SMALL` with the bytes needed in value0; `MODULE_INVALID`
    /// with NVRTC's result in detail and the log (value1 its whole length).
    fn compile(&mut self, sid: u64, source: &str, options: &[String], out_len: u32) -> Reply {
        if let Err(index) = crate::compile::check_options(options) {
            return err(Status::InvalidArgument, index as u32);
        }
        if let Err(line) = crate::compile::check_source(source) {
            return Ok(Response {
                value0: u64::from(line),
                ..Response::error(Status::InvalidArgument, COMPILE_SOURCE_REFUSED)
            });
        }
        let output = self
            .exec(sid)?
            .compile(source, options, out_len)
            .map_err(refused)?;
        Ok(match output {
            CompileOutput::Ptx { ptx, log } => {
                let (ptx_len, log_len) = (ptx.len() as u64, log.len() as u64);
                let mut data = ptx;
                data.extend_from_slice(&log);
                if data.len() as u64 > u64::from(out_len) {
                    return Ok(Response {
                        value0: data.len() as u64,
                        ..Response::error(Status::BufferTooSmall, 0)
                    });
                }
                Response {
                    value0: ptx_len,
                    value1: log_len,
                    ..Response::data(data)
                }
            }
            CompileOutput::Failed {
                code,
                mut log,
                log_len,
            } => {
                log.truncate(out_len as usize);
                Response {
                    value1: log_len,
                    data: log,
                    ..Response::error(Status::ModuleInvalid, code)
                }
            }
            CompileOutput::TooLarge { needed } => Response {
                value0: needed,
                ..Response::error(Status::BufferTooSmall, 0)
            },
        })
    }

    fn register_host(
        &mut self,
        sid: u64,
        id: u64,
        chunks: &[HostChunk],
        mapping: &HostMapping,
    ) -> Reply {
        let len: u64 = chunks.iter().map(|c| c.len).sum();
        if mapping.len() != len {
            return err(Status::InvalidArgument, 0);
        }
        let s = &self.sessions[&sid];
        if s.host_bufs.contains_key(&id) {
            return err(Status::InvalidArgument, 0);
        }
        if s.host_bufs.len() >= self.limits.max_host_buffers_per_session as usize {
            return err(
                Status::LimitExceeded,
                self.limits.max_host_buffers_per_session,
            );
        }
        if self
            .usage
            .host_bytes
            .checked_add(len)
            .map_or(true, |total| total > self.limits.max_host_bytes)
        {
            return err(Status::LimitExceeded, 0);
        }
        // A correct driver never registers a page twice: refuse overlaps.
        for c in chunks {
            let overlaps = s
                .host_chunks
                .range(..c.addr.saturating_add(c.len))
                .next_back()
                .is_some_and(|(&start, old)| start + old.len > c.addr);
            if overlaps {
                return err(Status::InvalidArgument, 0);
            }
        }
        self.exec(sid)?
            .register_host(id, mapping)
            .map_err(Refusal::from)?;
        let s = self.sessions.get_mut(&sid).expect("checked");
        let mut offset = 0;
        for c in chunks {
            s.host_chunks.insert(
                c.addr,
                HostChunkAt {
                    id,
                    len: c.len,
                    offset,
                },
            );
            offset += c.len;
        }
        s.host_bufs.insert(id, len);
        self.usage.host_bytes += len;
        Ok(Response::ok())
    }

    /// Checks that `[offset, offset + len)` lies inside the session's buffer `handle`.
    fn range(&self, sid: u64, handle: u64, offset: u64, len: u64) -> Result<BufferId, Refusal> {
        let (id, size) = self.buffer(sid, handle)?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(id),
            _ => err(Status::OutOfRange, 0),
        }
    }

    fn launch(&mut self, sid: u64, stream: StreamId, launch: Launch) -> Reply {
        let mut shape = LaunchShape {
            grid: launch.grid,
            block: launch.block,
            shared_bytes: launch.shared_bytes,
        };
        check_shape(&shape)?;
        let session = self.sessions.get_mut(&sid).expect("checked by in_session");
        let mut params = Vec::with_capacity(launch.params.len());
        for (i, p) in launch.params.iter().enumerate() {
            params.push(match p {
                Param::Value(v) => ExecParam::Value(v.clone()),
                Param::Buffer(h) => ExecParam::Buffer(
                    session
                        .memory(*h)
                        .ok_or(Refusal::new(Status::InvalidHandle, i as u32))?
                        .0,
                ),
            });
        }
        let kernel = if launch.module == BUILTIN_MODULE {
            let spec = vgpu_kernels::find(&launch.kernel)
                .ok_or(Refusal::new(Status::KernelNotFound, 0))?;
            // The grid cut to what the elements need: a huge grid costs no device time.
            shape = check_builtin(spec, &launch.params, &params, &shape, &*session)?;
            KernelRef::Builtin(spec)
        } else {
            let m = session
                .modules
                .get(&launch.module)
                .ok_or(Refusal::new(Status::InvalidHandle, 0))?
                .id;
            KernelRef::Module(m, &launch.kernel)
        };
        let exec = match session.exec.as_mut() {
            Some(e) => e,
            None => return err(Status::DeviceLost, 0),
        };
        // The local memory the driver will reserve for it, kept for the context's life:
        // only what exceeds the session's reservation so far is new.
        let local = exec.local_reservation(kernel).map_err(Refusal::from)?;
        let extra = local.saturating_sub(session.local_bytes);
        if extra > 0 && !self.make_room(extra) {
            log::debug!(
                "tenant {}: launch of {} refused: its local memory reservation of {local} \
                 bytes does not fit the quota ({} of {} bytes in use)",
                self.name(),
                launch.kernel,
                self.usage.mem_used,
                self.shared.quota()
            );
            return err(Status::QuotaExceeded, 0);
        }
        let session = self.sessions.get_mut(&sid).expect("checked by in_session");
        let exec = match session.exec.as_mut() {
            Some(e) => e,
            None => return err(Status::DeviceLost, 0),
        };
        let _turn = self.shared.sched.admit(self.shared.id, sid);
        exec.launch(stream, kernel, &shape, &params)
            .map_err(Refusal::from)?;
        self.shared.counters.add_launch();
        if extra > 0 {
            session.local_bytes = local;
            charge(&mut self.usage, Charge::Local, extra);
        }
        Ok(Response::ok())
    }

    fn selftest(&mut self, test: SelftestKind) -> Response {
        let device = self.factory.device().clone();
        let result = match test {
            SelftestKind::DeviceInfo => Ok(crate::selftest::device_line(&device)),
            SelftestKind::VectorAdd => self.vector_add_selftest(&device.name),
        };
        if self.selftest_exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.drop_selftest_exec();
            self.usage.restarts += 1;
        }
        match result {
            Ok(message) => Response::data(message.into_bytes()),
            Err((status, message)) => Response {
                data: message.into_bytes(),
                ..Response::error(status, 0)
            },
        }
    }

    /// The Phase 1 vector add on the self-test executor, made when first needed and kept
    /// for the next self-test: its context is the VM's like a session's and charged while
    /// it exists (given up when the VM's work needs the room: [`Worker::make_room`]); its
    /// three buffers must fit too while the test runs.
    fn vector_add_selftest(&mut self, device: &str) -> Result<String, (Status, String)> {
        let quota_failure = |what: &str, bytes: u64, quota: u64| {
            (
                Status::QuotaExceeded,
                format!(
                    "Vector add FAILED: the VM's device memory quota ({} MiB) has no room \
                     for {what} ({} MiB) ({device})",
                    quota >> 20,
                    bytes.div_ceil(1 << 20)
                ),
            )
        };
        let quota = self.shared.quota();
        // Lost while idle (a worker host whose connection ended): a restart like any.
        if self.selftest_exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.drop_selftest_exec();
            self.usage.restarts += 1;
        }
        if self.selftest_exec.is_none() {
            if !self.fits(self.expected_context_bytes) {
                return Err(quota_failure(
                    "a context",
                    self.expected_context_bytes,
                    quota,
                ));
            }
            let Ok(exec) = self.new_executor() else {
                return Err((
                    Status::LaunchFailed,
                    format!("Vector add FAILED: no executor ({device})"),
                ));
            };
            let context = exec.context_bytes();
            self.expected_context_bytes = context;
            if !self.fits(context) {
                return Err(quota_failure("a context", context, quota));
            }
            charge(&mut self.usage, Charge::Context, context);
            self.selftest_bytes = context;
            self.track(SELFTEST_EXECUTOR, exec.as_ref());
            self.selftest_exec = Some(exec);
        }
        let exec = self.selftest_exec.as_mut().expect("made above");
        let buffers = exec
            .alloc_footprint(crate::selftest::VECTOR_ADD_ELEMENTS as u64 * 4)
            .saturating_mul(3);
        if !fits(&self.usage, quota, buffers) {
            return Err(quota_failure("its buffers", buffers, quota));
        }
        // Its device work takes its turn like any other (timed by the call: this executor's
        // session is not attached to the scheduler).
        let _turn = self.shared.sched.admit(self.shared.id, SELFTEST_EXECUTOR);
        crate::selftest::vector_add(exec.as_mut(), device).map_err(|m| (Status::LaunchFailed, m))
    }
}

/// Where a module comes from.
#[derive(Clone, Copy)]
enum ModuleSource<'a> {
    Ptx(&'a str),
    /// A binary image (cubin, fatbin).
    Image(&'a [u8]),
}

/// The detail of the `INVALID_ARGUMENT` for a COMPILE whose source names a host file
/// (value0 is then the line); otherwise the detail is the refused option's index.
pub const COMPILE_SOURCE_REFUSED: u32 = u32::MAX;

/// Takes what a session holds out of the tenant's accounting.
fn uncount(usage: &mut TenantUsage, s: &Session) {
    for b in s.buffers.values() {
        release(usage, Charge::Buffer, b.charged);
        usage.allocations -= 1;
    }
    for m in s.modules.values() {
        release(usage, Charge::Module, m.charged);
    }
    usage.modules -= s.modules.len() as u32;
    release(usage, Charge::Context, s.context_bytes);
    release(usage, Charge::Local, s.local_bytes);
    usage.host_bytes -= s.host_bufs.values().sum::<u64>();
}

/// What device memory is charged for.
#[derive(Clone, Copy, Debug)]
enum Charge {
    Buffer,
    Context,
    Module,
    Local,
}

impl Charge {
    fn field(self, usage: &mut TenantUsage) -> &mut u64 {
        match self {
            Charge::Buffer => &mut usage.buffer_bytes,
            Charge::Context => &mut usage.context_bytes,
            Charge::Module => &mut usage.module_bytes,
            Charge::Local => &mut usage.local_bytes,
        }
    }
}

/// Whether `bytes` more fit in `quota` on top of what `usage` holds.
fn fits(usage: &TenantUsage, quota: u64, bytes: u64) -> bool {
    usage
        .mem_used
        .checked_add(bytes)
        .is_some_and(|total| total <= quota)
}

/// Charges `bytes` of device memory to the tenant (its total and its part).
fn charge(usage: &mut TenantUsage, what: Charge, bytes: u64) {
    usage.mem_used += bytes;
    *what.field(usage) += bytes;
}

/// Gives back device memory [`charge`] charged.
fn release(usage: &mut TenantUsage, what: Charge, bytes: u64) {
    usage.mem_used -= bytes;
    *what.field(usage) -= bytes;
}

/// The launch limits every CUDA device of compute capability >= 3.0 shares.
fn check_shape(s: &LaunchShape) -> Result<(), Refusal> {
    let [gx, gy, gz] = s.grid;
    let [bx, by, bz] = s.block;
    let grid_ok = gx >= 1 && gy >= 1 && gz >= 1 && gx < (1 << 31) && gy <= 65535 && gz <= 65535;
    let threads = (bx as u64)
        .saturating_mul(by as u64)
        .saturating_mul(bz as u64);
    let block_ok =
        bx >= 1 && by >= 1 && bz >= 1 && bx <= 1024 && by <= 1024 && bz <= 64 && threads <= 1024;
    if !grid_ok || !block_ok || s.shared_bytes > MAX_SHARED_BYTES {
        return err(Status::InvalidArgument, 0);
    }
    Ok(())
}

/// Checks a built-in launch against the catalog: parameter kinds and sizes, and that
/// every buffer holds what the kernel will touch. Returns the shape to launch: the grid cut
/// down to the blocks the kernel's elements need.
fn check_builtin(
    spec: &vgpu_kernels::KernelSpec,
    raw: &[Param],
    params: &[ExecParam],
    shape: &LaunchShape,
    session: &Session,
) -> Result<LaunchShape, Refusal> {
    if raw.len() != spec.params.len() {
        return err(Status::InvalidArgument, raw.len() as u32);
    }
    let mut args = Vec::with_capacity(raw.len());
    for (i, (kind, p)) in spec.params.iter().zip(params).enumerate() {
        let bad = Refusal::new(Status::InvalidArgument, i as u32);
        args.push(match (kind, p) {
            (ParamKind::Buffer, ExecParam::Buffer(id)) => vgpu_kernels::Arg::Buffer(id.0),
            (ParamKind::U32, ExecParam::Value(v)) => vgpu_kernels::Arg::U32(u32::from_le_bytes(
                v.as_slice().try_into().map_err(|_| bad)?,
            )),
            (ParamKind::F32, ExecParam::Value(v)) => vgpu_kernels::Arg::F32(f32::from_le_bytes(
                v.as_slice().try_into().map_err(|_| bad)?,
            )),
            _ => return Err(bad),
        });
    }
    let sizes: HashMap<u64, u64> = session
        .buffers
        .values()
        .map(|b| (b.id.0, b.size))
        .chain(session.globals.values().map(|g| (g.id.0, g.size)))
        .collect();
    spec.validate(&args, shape, &|id| sizes.get(&id).copied())
        .map_err(|e| match e {
            KernelError::BufferTooSmall { index, .. } => {
                Refusal::new(Status::OutOfRange, index as u32)
            }
            KernelError::UnknownBuffer { index } => {
                Refusal::new(Status::InvalidHandle, index as u32)
            }
            KernelError::UnknownKernel => Refusal::new(Status::KernelNotFound, 0),
            KernelError::ParamKind { index, .. } => {
                Refusal::new(Status::InvalidArgument, index as u32)
            }
            _ => Refusal::new(Status::InvalidArgument, 0),
        })?;
    Ok(spec.capped_shape(&args, shape))
}

/// Device attributes that describe where the GPU sits in the host, not what it can do:
/// PCI bus (33), device (34) and domain (50), the multi-GPU board group (85), the
/// device's and the host's NUMA node (131, 134). A guest gets 0 (-1 for the NUMA ids, the
/// driver's "none"): its device is the virtio function in its own PCI topology.
const HOST_TOPOLOGY_ATTRIBUTES: [(usize, i32); 6] =
    [(33, 0), (34, 0), (50, 0), (85, 0), (131, -1), (134, -1)];

/// Replaces the host-topology attributes of a DEVICE_ATTRIBUTES table (index 0 is
/// attribute 1).
fn hide_host_topology(table: &mut [i32]) {
    for (attribute, value) in HOST_TOPOLOGY_ATTRIBUTES {
        if let Some(a) = table.get_mut(attribute - 1) {
            *a = value;
        }
    }
}
