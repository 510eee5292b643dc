//! A tenant's worker: it owns the tenant's executor and sessions and checks every
//! request against them before anything reaches the executor.

use std::collections::HashMap;
use std::sync::Arc;

use vgpu_kernels::{KernelError, LaunchShape, ParamKind};
use vgpu_protocol::{
    Command, InfoReply, Launch, Param, Request, Response, SelftestKind, Status, BUILTIN_MODULE,
};

use crate::executor::{
    BufferId, ExecError, ExecParam, Executor, ExecutorFactory, KernelRef, ModuleId, StreamId,
};
use crate::mediator::{device_config, Limits, Message, TenantShared, TenantUsage};

/// Most dynamic shared memory a launch may ask for without an opt-in.
pub const MAX_SHARED_BYTES: u32 = 48 << 10;

struct Buffer {
    id: BufferId,
    size: u64,
}

struct Session {
    stream: StreamId,
    buffers: HashMap<u64, Buffer>,
    modules: HashMap<u64, ModuleId>,
    /// An asynchronous failure: every later request answers it until the session closes.
    sticky: Option<(Status, u32)>,
    /// The executor this session lived in was lost.
    lost: bool,
}

pub(crate) struct Worker {
    factory: Arc<dyn ExecutorFactory>,
    shared: Arc<TenantShared>,
    limits: Limits,
    exec: Option<Box<dyn Executor>>,
    sessions: HashMap<u64, Session>,
    next_id: u64,
    usage: TenantUsage,
}

type Reply = Result<Response, (Status, u32)>;

fn err<T>(status: Status, detail: u32) -> Result<T, (Status, u32)> {
    Err((status, detail))
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
            exec: None,
            sessions: HashMap::new(),
            next_id: 0,
            usage: TenantUsage::default(),
        }
    }

    pub fn run(mut self) {
        let shared = self.shared.clone();
        while let Some(message) = shared.queue.pop() {
            match message {
                Message::Request {
                    request,
                    token,
                    sink,
                    hold,
                } => {
                    let response = self.handle(request);
                    self.usage.requests += 1;
                    self.publish();
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

    /// Closes every session; the executor (and its context) goes with them.
    fn reset(&mut self) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close_session(id);
        }
        self.exec = None;
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn executor(&mut self) -> Result<&mut Box<dyn Executor>, (Status, u32)> {
        // Poisoned outside a session request (while closing a session, or a worker
        // process that died while idle): its sessions are lost, the next one starts anew.
        if self.exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.lose_executor(0);
        }
        if self.exec.is_none() {
            match self.factory.create() {
                Ok(e) => self.exec = Some(e),
                Err(e) => {
                    log::error!("tenant {}: executor unavailable: {e}", self.name());
                    return err(Status::DeviceLost, e.detail);
                }
            }
        }
        Ok(self.exec.as_mut().expect("created above"))
    }

    pub fn handle(&mut self, request: Request) -> Response {
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
            command => self.in_session(session, command),
        };
        result.unwrap_or_else(|(status, detail)| Response::error(status, detail))
    }

    fn info(&self) -> Response {
        let config = device_config(
            self.factory.device(),
            self.shared.config.mem_quota,
            &self.limits,
        );
        let reply = InfoReply {
            config,
            mem_used: self.usage.mem_used,
            sessions: self.usage.sessions,
            allocations: self.usage.allocations,
            modules: self.usage.modules,
            weight: self.shared.config.weight,
        };
        Response::data(reply.encode().to_vec())
    }

    fn open_session(&mut self) -> Reply {
        if self.sessions.len() >= self.limits.max_sessions as usize {
            return err(Status::LimitExceeded, self.limits.max_sessions);
        }
        let stream = self
            .executor()?
            .open_stream()
            .map_err(|e| (e.status, e.detail))?;
        let id = self.new_id();
        self.sessions.insert(
            id,
            Session {
                stream,
                buffers: HashMap::new(),
                modules: HashMap::new(),
                sticky: None,
                lost: false,
            },
        );
        self.usage.sessions += 1;
        log::debug!("tenant {}: session {id} opened", self.name());
        Ok(Response::value(id))
    }

    fn close_session(&mut self, id: u64) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.usage.sessions -= 1;
        for b in s.buffers.values() {
            self.usage.mem_used -= b.size;
            self.usage.allocations -= 1;
        }
        self.usage.modules -= s.modules.len() as u32;
        if s.lost {
            return;
        }
        if let Some(exec) = self.exec.as_mut() {
            exec.close_stream(s.stream);
            for b in s.buffers.values() {
                exec.free(b.id);
            }
            for m in s.modules.values() {
                exec.unload_module(*m);
            }
        }
        log::debug!("tenant {}: session {id} closed", self.shared.config.name);
    }

    fn in_session(&mut self, id: u64, command: Command) -> Reply {
        let session = self.sessions.get(&id).ok_or((Status::InvalidSession, 0))?;
        if let Some((status, detail)) = session.sticky {
            return err(status, detail);
        }
        if self.exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.lose_executor(0);
        }
        let session = &self.sessions[&id];
        if session.lost {
            return err(Status::DeviceLost, 0);
        }
        let result = self.dispatch(id, command);
        if let Err((status, detail)) = result {
            if matches!(status, Status::LaunchFailed | Status::DeviceLost) {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.sticky = Some((status, detail));
                }
            }
        }
        if self.exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.lose_executor(id);
        }
        result
    }

    /// The context is unusable: drop it and mark every session lost (the faulting one
    /// keeps reporting its own sticky error). The next request that needs an executor makes a
    /// new one.
    fn lose_executor(&mut self, faulting: u64) {
        log::warn!(
            "tenant {}: execution context lost after a device fault; restarting it",
            self.name()
        );
        self.exec = None;
        self.usage.restarts += 1;
        for (&id, s) in self.sessions.iter_mut() {
            s.lost = true;
            if id == faulting && s.sticky.is_none() {
                s.sticky = Some((Status::DeviceLost, 0));
            }
            for b in s.buffers.values() {
                self.usage.mem_used -= b.size;
                self.usage.allocations -= 1;
            }
            self.usage.modules -= s.modules.len() as u32;
            s.buffers.clear();
            s.modules.clear();
        }
    }

    fn buffer(&self, session: u64, handle: u64) -> Result<&Buffer, (Status, u32)> {
        self.sessions[&session]
            .buffers
            .get(&handle)
            .ok_or((Status::InvalidHandle, 0))
    }

    fn dispatch(&mut self, sid: u64, command: Command) -> Reply {
        let stream = self.sessions[&sid].stream;
        let exec_err = |e: ExecError| {
            log::debug!("executor: {e}");
            (e.status, e.detail)
        };
        match command {
            Command::Alloc { size } => {
                if size == 0 {
                    return err(Status::InvalidArgument, 0);
                }
                let s = &self.sessions[&sid];
                if s.buffers.len() >= self.limits.max_buffers_per_session as usize {
                    return err(Status::LimitExceeded, self.limits.max_buffers_per_session);
                }
                let quota = self.shared.config.mem_quota;
                if self
                    .usage
                    .mem_used
                    .checked_add(size)
                    .map_or(true, |total| total > quota)
                {
                    return err(Status::QuotaExceeded, 0);
                }
                let id = self.executor()?.alloc(size).map_err(exec_err)?;
                let handle = self.new_id();
                self.sessions
                    .get_mut(&sid)
                    .expect("checked")
                    .buffers
                    .insert(handle, Buffer { id, size });
                self.usage.mem_used += size;
                self.usage.allocations += 1;
                Ok(Response::value(handle))
            }
            Command::Free { handle } => {
                let b = self
                    .sessions
                    .get_mut(&sid)
                    .expect("checked")
                    .buffers
                    .remove(&handle)
                    .ok_or((Status::InvalidHandle, 0))?;
                self.usage.mem_used -= b.size;
                self.usage.allocations -= 1;
                self.executor()?.free(b.id);
                Ok(Response::ok())
            }
            Command::Htod { dst, offset, data } => {
                let id = self.range(sid, dst, offset, data.len() as u64)?;
                self.executor()?
                    .htod(stream, id, offset, &data)
                    .map_err(exec_err)?;
                Ok(Response::ok())
            }
            Command::Dtoh { src, offset, len } => {
                let id = self.range(sid, src, offset, len)?;
                // Counted in the VM's byte budget (`request_cost`); allocated fallibly all
                // the same: the host may have less than the budgets add up to.
                let mut out = Vec::new();
                out.try_reserve_exact(len as usize)
                    .map_err(|_| (Status::OutOfMemory, 0))?;
                out.resize(len as usize, 0);
                self.executor()?
                    .dtoh(stream, id, offset, &mut out)
                    .map_err(exec_err)?;
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
                self.executor()?
                    .dtod(stream, d, dst_offset, s, src_offset, len)
                    .map_err(exec_err)?;
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
                self.executor()?
                    .memset(stream, d, offset, len, value, width)
                    .map_err(exec_err)?;
                Ok(Response::ok())
            }
            Command::ModuleLoad { ptx } => {
                if self.sessions[&sid].modules.len() >= self.limits.max_modules_per_session as usize
                {
                    return err(Status::LimitExceeded, self.limits.max_modules_per_session);
                }
                let m = self.executor()?.load_module(&ptx).map_err(exec_err)?;
                let handle = self.new_id();
                self.sessions
                    .get_mut(&sid)
                    .expect("checked")
                    .modules
                    .insert(handle, m);
                self.usage.modules += 1;
                Ok(Response::value(handle))
            }
            Command::ModuleUnload { module } => {
                let m = self
                    .sessions
                    .get_mut(&sid)
                    .expect("checked")
                    .modules
                    .remove(&module)
                    .ok_or((Status::InvalidHandle, 0))?;
                self.usage.modules -= 1;
                self.executor()?.unload_module(m);
                Ok(Response::ok())
            }
            Command::Launch(launch) => self.launch(sid, stream, launch),
            Command::Sync => {
                self.executor()?.sync(stream).map_err(exec_err)?;
                Ok(Response::ok())
            }
            Command::Info
            | Command::SessionOpen
            | Command::SessionClose
            | Command::Selftest { .. } => {
                unreachable!("handled before dispatch")
            }
        }
    }

    /// Checks that `[offset, offset + len)` lies inside the session's buffer `handle`.
    fn range(
        &self,
        sid: u64,
        handle: u64,
        offset: u64,
        len: u64,
    ) -> Result<BufferId, (Status, u32)> {
        let b = self.buffer(sid, handle)?;
        match offset.checked_add(len) {
            Some(end) if end <= b.size => Ok(b.id),
            _ => err(Status::OutOfRange, 0),
        }
    }

    fn launch(&mut self, sid: u64, stream: StreamId, launch: Launch) -> Reply {
        let shape = LaunchShape {
            grid: launch.grid,
            block: launch.block,
            shared_bytes: launch.shared_bytes,
        };
        check_shape(&shape)?;
        let session = &self.sessions[&sid];
        let mut params = Vec::with_capacity(launch.params.len());
        for (i, p) in launch.params.iter().enumerate() {
            params.push(match p {
                Param::Value(v) => ExecParam::Value(v.clone()),
                Param::Buffer(h) => ExecParam::Buffer(
                    session
                        .buffers
                        .get(h)
                        .ok_or((Status::InvalidHandle, i as u32))?
                        .id,
                ),
            });
        }
        let kernel = if launch.module == BUILTIN_MODULE {
            let spec = vgpu_kernels::find(&launch.kernel).ok_or((Status::KernelNotFound, 0))?;
            check_builtin(spec, &launch.params, &params, &shape, session)?;
            KernelRef::Builtin(spec)
        } else {
            let m = *session
                .modules
                .get(&launch.module)
                .ok_or((Status::InvalidHandle, 0))?;
            KernelRef::Module(m, &launch.kernel)
        };
        let exec = self.executor()?;
        exec.launch(stream, kernel, &shape, &params)
            .map_err(|e| (e.status, e.detail))?;
        Ok(Response::ok())
    }

    fn selftest(&mut self, test: SelftestKind) -> Response {
        let device = self.factory.device().clone();
        let result = match test {
            SelftestKind::DeviceInfo => Ok(crate::selftest::device_line(&device)),
            SelftestKind::VectorAdd => match self.executor() {
                Ok(exec) => crate::selftest::vector_add(exec.as_mut(), &device.name),
                Err(_) => Err(format!("Vector add FAILED: no executor ({})", device.name)),
            },
        };
        if self.exec.as_ref().is_some_and(|e| e.poisoned()) {
            self.lose_executor(0);
        }
        match result {
            Ok(message) => Response::data(message.into_bytes()),
            Err(message) => Response {
                data: message.into_bytes(),
                ..Response::error(Status::LaunchFailed, 0)
            },
        }
    }
}

/// The launch limits every CUDA device of compute capability >= 3.0 shares.
fn check_shape(s: &LaunchShape) -> Result<(), (Status, u32)> {
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
/// every buffer holds what the kernel will touch.
fn check_builtin(
    spec: &vgpu_kernels::KernelSpec,
    raw: &[Param],
    params: &[ExecParam],
    shape: &LaunchShape,
    session: &Session,
) -> Result<(), (Status, u32)> {
    if raw.len() != spec.params.len() {
        return err(Status::InvalidArgument, raw.len() as u32);
    }
    let mut args = Vec::with_capacity(raw.len());
    for (i, (kind, p)) in spec.params.iter().zip(params).enumerate() {
        let bad = (Status::InvalidArgument, i as u32);
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
    let sizes: HashMap<u64, u64> = session.buffers.values().map(|b| (b.id.0, b.size)).collect();
    spec.validate(&args, shape, &|id| sizes.get(&id).copied())
        .map_err(|e| match e {
            KernelError::BufferTooSmall { index, .. } => (Status::OutOfRange, index as u32),
            KernelError::UnknownBuffer { index } => (Status::InvalidHandle, index as u32),
            KernelError::UnknownKernel => (Status::KernelNotFound, 0),
            KernelError::ParamKind { index, .. } => (Status::InvalidArgument, index as u32),
            _ => (Status::InvalidArgument, 0),
        })
}
