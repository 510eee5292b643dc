// SPDX-License-Identifier: Apache-2.0
//! The worker host's side: accepts mediators, authenticates them, and serves each
//! connection one executor from the host's own factory (for CUDA: a sandboxed worker
//! process per connection, exactly as a local mediator runs one per session).
//!
//! Per connection, two threads: the connection's own, which reads requests in order,
//! runs them on the executor and answers each (answers to requests nobody waits for are
//! written together, once no further request is buffered); and a monitor, which reports
//! the executor's device progress while work is in flight (`Meter`) and, when the
//! mediator hangs up, ends the executor at once through its killer, so a kernel the
//! mediator gave up on does not keep running. When the connection ends for any reason
//! the executor is dropped, which frees everything it held on the device.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;

use super::link::{self, Conn, Key, Listener, Sender};
use super::wire::{
    Bytes, Opened, Reply, Request, WireAnswer, WireError, WireKernel, WireModule, WireParam,
    WorkerHello, MAX_REQUEST,
};
use crate::executor::{
    BufferId, DeviceMeter, ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, KernelRef,
    Killer, ModuleId, StreamId,
};
use vgpu_protocol::Status;

/// Connections authenticating at once; more are closed at once.
const MAX_PENDING: u32 = 64;
/// A reply that cannot be written for this long ends its connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`ServerConfig::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: u32 = 256;
/// Replies waiting to be written together are written once they reach this size.
const REPLY_BATCH_BYTES: usize = 64 << 10;
/// How often the monitor looks at device progress while work is in flight: at first, and
/// again after each change; the wait doubles while nothing changes, up to
/// [`METER_POLL_MAX`] (a long kernel costs few looks).
const METER_POLL: Duration = Duration::from_micros(50);
const METER_POLL_MAX: Duration = Duration::from_millis(2);
/// How long the monitor sleeps while nothing is in flight (it wakes at once for new work
/// and for a hang-up).
const IDLE_POLL: Duration = Duration::from_millis(500);

/// What a worker host serves, and to whom.
pub struct ServerConfig {
    /// The mediators it serves, by name, with their keys.
    pub keys: HashMap<String, Key>,
    /// Connections (sessions) served at once; more are refused with a clear message.
    pub max_sessions: u32,
    /// GPUs the host has (reported to mediators).
    pub gpus: u32,
    /// The sanity gate's line at start (reported to mediators).
    pub sanity: String,
    /// Runs the sanity gate again, for a mediator's `sanity`.
    pub sanity_check: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
    /// Free device memory now, when known.
    pub free_memory: Box<dyn Fn() -> Option<u64> + Send + Sync>,
}

/// A worker host serving mediators.
pub struct Server {
    factory: Arc<dyn ExecutorFactory>,
    config: ServerConfig,
    active: AtomicU32,
    /// Connections still authenticating.
    pending: AtomicU32,
}

impl Server {
    pub fn new(factory: Arc<dyn ExecutorFactory>, config: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            factory,
            config,
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
        })
    }

    /// Sessions served now.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Accepts connections until the listener fails; each gets its own thread.
    pub fn serve(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        loop {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    log::warn!("accepting a connection: {e}; retrying in 100 ms");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => return Err(e),
            };
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("vgpu-remote-conn".into())
                .spawn(move || me.connection(conn));
            if let Err(e) = spawned {
                log::warn!("no thread for a connection: {e}");
            }
        }
    }

    /// The hello of a connection already counted in `active`: the sessions it reports
    /// are the others.
    fn hello(&self) -> WorkerHello {
        let d = self.factory.device();
        WorkerHello {
            release: env!("CARGO_PKG_VERSION").into(),
            kind: d.kind as u32,
            name: d.name.clone(),
            total_memory: d.total_memory,
            cc_major: d.cc_major,
            cc_minor: d.cc_minor,
            multiprocessors: d.multiprocessors,
            gpus: self.config.gpus,
            free_memory: (self.config.free_memory)().unwrap_or(d.total_memory),
            sessions: self.active(),
            max_sessions: self.config.max_sessions,
            sanity: self.config.sanity.clone(),
        }
    }

    /// Serves one connection to its end.
    pub fn connection(self: Arc<Self>, conn: Conn) {
        let peer = conn.peer().to_string();
        // Connections not yet authenticated are few and short: a peer without a key (or
        // one replaying a recorded hello) holds a slot for one handshake timeout at most.
        if self.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            log::warn!(
                "connection from {peer} closed: {MAX_PENDING} connections are authenticating \
                 already"
            );
            return;
        }
        let pending = Decrement(&self.pending);
        let admit = |_version: u32, name: &str| -> Result<Key, String> {
            let Some(key) = self.config.keys.get(name) else {
                return Err(format!(
                    "mediator '{name}' is not among those this worker serves"
                ));
            };
            Ok(key.clone())
        };
        let (hs, name) = match link::accept(&conn, &admit) {
            Ok(x) => x,
            Err(why) => {
                log::warn!("connection from {peer} refused: {why}");
                return;
            }
        };
        let hello = self.hello();
        let payload = match postcard::to_stdvec(&hello) {
            Ok(p) => p,
            Err(e) => {
                log::error!("encoding the hello: {e}");
                return;
            }
        };
        let mut link = match link::respond(conn, hs, &payload) {
            Ok(l) => l,
            Err(why) => {
                log::warn!("connection from {peer} ('{name}'): {why}");
                return;
            }
        };
        // The first request proves the peer holds the key (a replayed hello cannot make
        // one): only then is the connection a session.
        let mut buf = Vec::new();
        let first = link::recv_within(&mut link.rx, MAX_REQUEST, &mut buf, link::HANDSHAKE_TIMEOUT);
        drop(pending);
        if let Err(e) = first {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                log::warn!("connection from {peer} ('{name}'): no first request: {e}");
            }
            return;
        }
        let active = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        let _count = Decrement(&self.active);
        // A mediator that stops reading cannot hold this thread forever.
        link.tx.conn().set_send_timeout(Some(SEND_TIMEOUT));
        log::info!("mediator '{name}' connected from {peer} ({active} connection(s))");
        if active > self.config.max_sessions {
            // Told in the answer to Open.
            log::warn!(
                "mediator '{name}' from {peer}: {} sessions already served (--max-sessions)",
                self.config.max_sessions
            );
        }
        let tx = Arc::new(Mutex::new(link.tx));
        let mut session = Session {
            server: &self,
            tx: tx.clone(),
            exec: None,
            progress: Arc::new(Mutex::new(Progress::default())),
            monitor: None,
            batched: 0,
            full: active > self.config.max_sessions,
        };
        let mut have = true;
        let why = loop {
            if !have {
                if !link.rx.has_buffered() {
                    if let Err(e) = session.flush() {
                        break format!("sending: {e}");
                    }
                }
                if let Err(e) = link.rx.recv(MAX_REQUEST, &mut buf) {
                    break if e.kind() == io::ErrorKind::UnexpectedEof {
                        "closed by the mediator".to_string()
                    } else {
                        format!("receiving: {e}")
                    };
                }
            }
            have = false;
            let request: Request<'_> = match postcard::take_from_bytes(&buf) {
                Ok((r, [])) => r,
                _ => break "a malformed request; connection closed".to_string(),
            };
            if let Err(e) = session.handle(request) {
                break format!("sending: {e}");
            }
        };
        log::info!("mediator '{name}' from {peer}: {why}");
        session.end();
    }
}

struct Decrement<'a>(&'a AtomicU32);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Device progress as the mediator counts it: the device operations it sent, each
/// finished once the executor's own meter has finished everything it sent up to it.
#[derive(Default)]
struct Progress {
    /// For each device operation not yet finished: the executor's `sent` count after it.
    pending: VecDeque<u64>,
    done: u64,
    busy_ns: u64,
}

struct Session<'a> {
    server: &'a Server,
    tx: Arc<Mutex<Sender>>,
    exec: Option<Box<dyn Executor>>,
    progress: Arc<Mutex<Progress>>,
    monitor: Option<Monitor>,
    /// Replies queued and not yet written.
    batched: usize,
    /// More connections than --max-sessions: Open is refused.
    full: bool,
}

fn wire_err(e: &ExecError) -> WireError {
    WireError::from(e)
}

fn no_executor() -> ExecError {
    ExecError::new(
        Status::InvalidRequest,
        0,
        "no executor is open on this connection (send Open first)",
    )
}

impl Session<'_> {
    fn queue(&mut self, reply: &Reply, flush: bool) -> io::Result<()> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let n = tx.queue_with(|v| postcard::to_extend(reply, v))?;
        self.batched += n;
        if flush || self.batched >= REPLY_BATCH_BYTES {
            self.batched = 0;
            tx.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.batched == 0 {
            return Ok(());
        }
        self.batched = 0;
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }

    fn poisoned(&self) -> bool {
        self.exec.as_ref().is_some_and(|e| e.poisoned())
    }

    fn done(&mut self, result: ExecResult<u64>, flush: bool) -> io::Result<()> {
        let reply = Reply::Done {
            poisoned: self.poisoned(),
            result: result.map_err(|e| wire_err(&e)),
        };
        self.queue(&reply, flush)
    }

    fn exec(&mut self) -> ExecResult<&mut Box<dyn Executor>> {
        self.exec.as_mut().ok_or_else(no_executor)
    }

    /// Records a device operation just handed to the executor (see [`Progress`]).
    fn sent_device_op(&mut self, took: Duration) {
        let meter = self.exec.as_ref().and_then(|e| e.meter());
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match meter {
            Some(m) => {
                let was_idle = p.pending.is_empty();
                p.pending.push_back(m.read().sent);
                drop(p);
                if was_idle {
                    if let Some(mon) = &self.monitor {
                        mon.wake();
                    }
                }
            }
            None => {
                // The call did the work: it is done, and its duration is its device time.
                p.done += 1;
                p.busy_ns = p.busy_ns.saturating_add(took.as_nanos() as u64);
                drop(p);
                if let Some(mon) = &self.monitor {
                    mon.wake();
                }
            }
        }
    }

    fn open(&mut self) -> io::Result<()> {
        let result = if self.exec.is_some() {
            Err(ExecError::new(
                Status::InvalidRequest,
                0,
                "this connection's executor is already open",
            ))
        } else if self.full {
            Err(ExecError::new(
                Status::LimitExceeded,
                0,
                format!(
                    "the worker serves {} sessions already (its --max-sessions)",
                    self.server.config.max_sessions
                ),
            ))
        } else {
            self.server.factory.create().map(|mut exec| {
                let builtin_locals = vgpu_kernels::CATALOG
                    .iter()
                    .map(|k| {
                        let v = exec.local_reservation(KernelRef::Builtin(k)).unwrap_or(0);
                        (k.name.to_string(), v)
                    })
                    .collect();
                let opened = Opened {
                    context_bytes: exec.context_bytes(),
                    builtin_locals,
                    executor: format!("{:?}", self.server.factory.device().kind),
                };
                let meter = exec.meter();
                let killer = exec.killer();
                self.exec = Some(exec);
                let conn = self
                    .tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .conn()
                    .try_clone();
                match conn.and_then(|conn| {
                    Monitor::start(conn, self.tx.clone(), self.progress.clone(), meter, killer)
                }) {
                    Ok(m) => self.monitor = Some(m),
                    // Progress is then reported only with the next device operation's
                    // flush; the scheduler's stall rule keeps other VMs going meanwhile.
                    Err(e) => log::error!("no monitor thread for a connection: {e}"),
                }
                opened
            })
        };
        let reply = Reply::Opened {
            result: result.map_err(|e| wire_err(&e)),
        };
        self.queue(&reply, true)
    }

    fn handle(&mut self, request: Request<'_>) -> io::Result<()> {
        let started = Instant::now();
        match request {
            Request::Open => self.open(),
            Request::Sanity => {
                let result = (self.server.config.sanity_check)();
                self.queue(&Reply::Text { result }, true)
            }
            Request::OpenStream => {
                let r = self.exec().and_then(|e| e.open_stream()).map(|s| s.0);
                self.done(r, true)
            }
            Request::CloseStream { stream } => {
                let r = self.exec().map(|e| e.close_stream(StreamId(stream)));
                self.done(r.map(|()| 0), false)
            }
            Request::Alloc { bytes } => {
                let r = self.exec().and_then(|e| e.alloc(bytes)).map(|b| b.0);
                self.done(r, true)
            }
            Request::Free { buffer } => {
                let r = self.exec().map(|e| e.free(BufferId(buffer)));
                self.done(r.map(|()| 0), false)
            }
            Request::Htod {
                stream,
                dst,
                offset,
                data,
            } => {
                let r = self
                    .exec()
                    .and_then(|e| e.htod(StreamId(stream), BufferId(dst), offset, data));
                self.sent_device_op(started.elapsed());
                self.done(r.map(|()| 0), false)
            }
            Request::Dtoh {
                stream,
                src,
                offset,
                len,
            } => {
                let r = match usize::try_from(len) {
                    Ok(len) if len <= super::wire::PIECE => self.exec().and_then(|e| {
                        let mut out = vec![0u8; len];
                        e.dtoh(StreamId(stream), BufferId(src), offset, &mut out)
                            .map(|()| Bytes(out))
                    }),
                    _ => Err(ExecError::new(
                        Status::InvalidRequest,
                        0,
                        "a DTOH piece larger than the link's piece",
                    )),
                };
                self.sent_device_op(started.elapsed());
                let reply = Reply::Data {
                    poisoned: self.poisoned(),
                    result: r.map_err(|e| wire_err(&e)),
                };
                self.queue(&reply, true)
            }
            Request::Dtod {
                stream,
                dst,
                dst_offset,
                src,
                src_offset,
                len,
            } => {
                let r = self.exec().and_then(|e| {
                    e.dtod(
                        StreamId(stream),
                        BufferId(dst),
                        dst_offset,
                        BufferId(src),
                        src_offset,
                        len,
                    )
                });
                self.sent_device_op(started.elapsed());
                self.done(r.map(|()| 0), false)
            }
            Request::Memset {
                stream,
                dst,
                offset,
                len,
                value,
                width,
            } => {
                let r = self.exec().and_then(|e| {
                    e.memset(StreamId(stream), BufferId(dst), offset, len, value, width)
                });
                self.sent_device_op(started.elapsed());
                self.done(r.map(|()| 0), false)
            }
            Request::LoadModule { ptx } => {
                let r = self.exec().and_then(|e| {
                    let id = e.load_module(ptx)?;
                    Ok(WireModule {
                        id: id.0,
                        bytes: e.module_bytes(id),
                    })
                });
                self.module(r)
            }
            Request::LoadModuleImage { image } => {
                let r = self.exec().and_then(|e| {
                    let id = e.load_module_image(image)?;
                    Ok(WireModule {
                        id: id.0,
                        bytes: e.module_bytes(id),
                    })
                });
                self.module(r)
            }
            Request::UnloadModule { module } => {
                let r = self.exec().map(|e| e.unload_module(ModuleId(module)));
                self.done(r.map(|()| 0), false)
            }
            Request::Launch {
                stream,
                kernel,
                grid,
                block,
                shared_bytes,
                params,
            } => {
                let r = self.launch(stream, kernel, grid, block, shared_bytes, &params);
                self.sent_device_op(started.elapsed());
                self.done(r.map(|()| 0), false)
            }
            Request::Sync { stream } => {
                let r = self.exec().and_then(|e| e.sync(StreamId(stream)));
                self.done(r.map(|()| 0), true)
            }
            Request::LocalReservation { kernel } => {
                let r = kernel
                    .resolve()
                    .and_then(|k| self.exec().and_then(|e| e.local_reservation(k)));
                self.done(r, true)
            }
            Request::DeviceAttributes { count } => {
                let r = if count == 0 || count > vgpu_protocol::MAX_DEVICE_ATTRIBUTES {
                    Err(ExecError::new(
                        Status::InvalidArgument,
                        0,
                        format!("attribute count {count} out of range"),
                    ))
                } else {
                    self.exec().and_then(|e| e.device_attributes(count))
                }
                .map(WireAnswer::Attributes);
                self.answer(r)
            }
            Request::FunctionInfo { kernel } => {
                let r = kernel
                    .resolve()
                    .and_then(|k| self.exec().and_then(|e| e.function_info(k)))
                    .map(|f| WireAnswer::Function {
                        attributes: f.attributes,
                        params: f.params,
                    });
                self.answer(r)
            }
            Request::ModuleGlobal { module, name } => {
                let r = self
                    .exec()
                    .and_then(|e| e.module_global(ModuleId(module), name))
                    .map(|(b, size)| WireAnswer::Global { address: b.0, size });
                self.answer(r)
            }
            Request::Compile {
                source,
                options,
                out_len,
            } => {
                let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
                let r = self
                    .exec()
                    .and_then(|e| e.compile(source, &options, out_len))
                    .map(WireAnswer::from);
                self.answer(r)
            }
        }
    }

    fn launch(
        &mut self,
        stream: u64,
        kernel: WireKernel<'_>,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &[WireParam<'_>],
    ) -> ExecResult<()> {
        let kernel = kernel.resolve()?;
        let params: Vec<ExecParam> = params
            .iter()
            .map(|p| match p {
                WireParam::Value(v) => ExecParam::Value(v.to_vec()),
                WireParam::Buffer(b) => ExecParam::Buffer(BufferId(*b)),
            })
            .collect();
        let shape = LaunchShape {
            grid,
            block,
            shared_bytes,
        };
        self.exec()?
            .launch(StreamId(stream), kernel, &shape, &params)
    }

    fn module(&mut self, r: ExecResult<WireModule>) -> io::Result<()> {
        let reply = Reply::Module {
            poisoned: self.poisoned(),
            result: r.map_err(|e| wire_err(&e)),
        };
        self.queue(&reply, true)
    }

    fn answer(&mut self, r: ExecResult<WireAnswer>) -> io::Result<()> {
        let reply = Reply::Answer {
            poisoned: self.poisoned(),
            result: r.map_err(|e| wire_err(&e)),
        };
        self.queue(&reply, true)
    }

    /// The connection is over: stop the monitor, drop the executor (which frees what it
    /// held on the device).
    fn end(mut self) {
        if let Some(m) = self.monitor.take() {
            m.stop();
        }
        self.exec = None;
    }
}

/// The monitor thread of a connection (see the module documentation).
struct Monitor {
    wake: OwnedFd,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(
        conn: Conn,
        tx: Arc<Mutex<Sender>>,
        progress: Arc<Mutex<Progress>>,
        meter: Option<Arc<dyn DeviceMeter>>,
        killer: Option<Killer>,
    ) -> io::Result<Monitor> {
        // SAFETY: plain eventfd creation; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let wake2 = wake.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vgpu-remote-mon".into())
            .spawn(move || monitor(conn, wake2, stop2, tx, progress, meter, killer))?;
        Ok(Monitor {
            wake,
            stop,
            thread: Some(thread),
        })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn monitor(
    conn: Conn,
    wake: OwnedFd,
    stop: Arc<AtomicBool>,
    tx: Arc<Mutex<Sender>>,
    progress: Arc<Mutex<Progress>>,
    meter: Option<Arc<dyn DeviceMeter>>,
    killer: Option<Killer>,
) {
    let mut reported = (0u64, 0u64);
    let mut poll = METER_POLL;
    loop {
        let busy = !progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .is_empty();
        let wait = if busy { poll } else { IDLE_POLL };
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        let mut fds = [
            libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds and a valid timespec.
        let _ = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if fds[1].revents & libc::POLLIN != 0 {
            poll = METER_POLL;
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from an eventfd we own.
            let _ = unsafe { libc::read(wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            // The mediator is gone: end whatever the executor is doing now.
            if let Some(k) = &killer {
                k.kill(false);
            }
            return;
        }
        let now = {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = &meter {
                let r = m.read();
                // Everything the executor sent has finished: so has every operation of
                // the mediator's (whatever the executor counted for each).
                let all = r.done >= r.sent;
                while p.pending.front().is_some_and(|&s| all || s <= r.done) {
                    p.pending.pop_front();
                    p.done += 1;
                }
                p.busy_ns = r.busy_ns;
            }
            (p.done, p.busy_ns)
        };
        if now == reported {
            poll = (poll * 2).min(METER_POLL_MAX);
        } else {
            poll = METER_POLL;
            reported = now;
            let reply = Reply::Meter {
                done: now.0,
                busy_ns: now.1,
            };
            let mut tx = tx.lock().unwrap_or_else(|e| e.into_inner());
            if tx
                .queue_with(|v| postcard::to_extend(&reply, v))
                .and_then(|_| tx.flush())
                .is_err()
            {
                return;
            }
        }
    }
}
