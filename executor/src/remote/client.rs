// SPDX-License-Identifier: Apache-2.0
//! The mediator's side: executors whose work runs on a worker host.
//!
//! One connection per executor (per session). The calling thread writes requests; a
//! reader thread per connection reads everything the worker sends — replies into an
//! inbox the calls take them from, `Meter` messages into the executor's meter — so the
//! worker's writes always drain, whatever the caller does, and a dead connection is seen
//! at once. The inbox is bounded: at most [`MAX_IN_FLIGHT`] requests are unanswered,
//! and a worker that answers more than it was asked is cut off.
//!
//! Pipelining and errors follow the worker-process executor
//! ([`crate::process`]): `launch`, `memset`, `dtod`, `htod`, `free`, `unload_module`
//! and `close_stream` return once sent; a call that needs a value first reads the
//! earlier replies and returns the first error among them instead of sending; `sync` and
//! `dtoh` return that error in preference to their own result.
//!
//! Faults: a connection that breaks (or a worker that stops answering for the kernel
//! timeout, or a killer) turns this executor and every later call into `DEVICE_LOST`,
//! never a retry: a request that was sent may have run. The mediator then drops the
//! executor; the guest session answers `DEVICE_LOST` until the guest closes it, and the
//! VM's next session opens a new executor (a new connection; for the NFS transport, the
//! next command). The factory waits between failed attempts to reach a worker, doubling
//! the wait up to [`MAX_BACKOFF`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vgpu_kernels::LaunchShape;
use vgpu_protocol::{ExecutorKind, FunctionInfo, Status};

use super::link::{self, Conn, Endpoint, HandshakeError, Key, Receiver, Sender};
use super::wire::{
    Opened, Reply, Request, WireAnswer, WireKernel, WireParam, WorkerHello, MAX_REPLY, PIECE,
};
use crate::executor::{
    guest_fault, BufferId, CompileOutput, DeviceInfo, DeviceMeter, ExecError, ExecParam,
    ExecResult, Executor, ExecutorFactory, GuestSink, GuestSource, KernelRef, Killer, MeterReading,
    ModuleId, SetupError, StreamId, TIMEOUT_DETAIL,
};
use crate::process::{DEFAULT_KERNEL_TIMEOUT, MAX_IN_FLIGHT};

/// First wait after a failed attempt to reach a worker.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between attempts to reach a worker.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// DTOH pieces in flight at once.
const DTOH_WINDOW: usize = 4;
/// Most reply bytes waiting in the inbox before the worker is cut off (it never needs
/// more: one DTOH window, or one compilation's output).
const MAX_INBOX_BYTES: usize = MAX_REPLY + DTOH_WINDOW * (PIECE + 64);

/// Where the remote executors run: `--executor remote:ENDPOINT[,ENDPOINT...]`, the
/// workers of one GPU tried in order; several GPUs separated by `+`
/// (`remote:A:7701,B:7701+A:7702`: GPU 0 on A (B if A does not answer), GPU 1 on A's
/// second worker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    /// Every worker, in the order given.
    pub endpoints: Vec<Endpoint>,
    /// The GPU of each endpoint (same length; 0 for all of a one-GPU spec), in
    /// nondecreasing order.
    pub gpu_of: Vec<u32>,
}

impl RemoteSpec {
    /// A one-GPU spec of these workers, tried in order.
    pub fn one_gpu(endpoints: Vec<Endpoint>) -> RemoteSpec {
        let gpu_of = vec![0; endpoints.len()];
        RemoteSpec { endpoints, gpu_of }
    }

    /// How many GPUs the spec names.
    pub fn gpu_count(&self) -> u32 {
        self.gpu_of.last().map_or(0, |&g| g + 1)
    }

    /// The one-GPU spec of GPU `gpu`'s workers.
    pub fn gpu(&self, gpu: u32) -> RemoteSpec {
        let endpoints = self
            .endpoints
            .iter()
            .zip(&self.gpu_of)
            .filter(|(_, &g)| g == gpu)
            .map(|(e, _)| e.clone())
            .collect();
        RemoteSpec::one_gpu(endpoints)
    }
}

impl std::str::FromStr for RemoteSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<RemoteSpec, String> {
        let mut spec = RemoteSpec::one_gpu(Vec::new());
        for (gpu, group) in s.split('+').enumerate() {
            let gpu = u32::try_from(gpu).map_err(|_| "too many GPUs".to_string())?;
            for e in group.split(',') {
                spec.endpoints.push(e.trim().parse::<Endpoint>()?);
                spec.gpu_of.push(gpu);
            }
        }
        if spec.endpoints.is_empty() {
            return Err("no worker address".into());
        }
        Ok(spec)
    }
}

impl std::fmt::Display for RemoteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<String> = (0..self.gpu_count())
            .map(|g| {
                let list: Vec<String> = self
                    .gpu(g)
                    .endpoints
                    .iter()
                    .map(|e| e.to_string())
                    .collect();
                list.join(",")
            })
            .collect();
        write!(f, "remote:{}", groups.join("+"))
    }
}

/// How a mediator reaches its workers: who it is, with which key.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub name: String,
    pub key: Key,
}

impl Credentials {
    /// The mediator's key file (one `NAME KEY` line).
    pub fn load(path: &std::path::Path) -> Result<Credentials, SetupError> {
        let file = link::KeyFile::load(path).map_err(|e| SetupError::Worker(e.to_string()))?;
        let (name, key) = file
            .identity()
            .map_err(|e| SetupError::Worker(format!("{}: {e}", path.display())))?;
        Ok(Credentials { name, key })
    }
}

/// An authenticated connection to a worker, before any executor is opened on it.
struct Connected {
    tx: Sender,
    rx: Receiver,
    hello: WorkerHello,
}

/// Connects to a worker and authenticates; the worker's hello.
fn connect(endpoint: &Endpoint, creds: &Credentials) -> Result<Connected, ConnectError> {
    let conn = Conn::connect(endpoint).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let (link, payload) = link::initiate(conn, &creds.name, &creds.key).map_err(|e| match e {
        HandshakeError::Io(e) => {
            ConnectError::Unreachable(format!("handshake: {}", link::handshake_io(&e)))
        }
        other => ConnectError::Refused(other.to_string()),
    })?;
    let hello: WorkerHello = postcard::from_bytes(&payload)
        .map_err(|_| ConnectError::Refused("the worker's hello did not decode".into()))?;
    Ok(Connected {
        tx: link.tx,
        rx: link.rx,
        hello,
    })
}

/// Why a worker could not be used.
#[derive(Debug)]
enum ConnectError {
    /// Not reachable now (worth trying again).
    Unreachable(String),
    /// Reached, and it refused or failed authentication (trying again will not help).
    Refused(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(s) | ConnectError::Refused(s) => f.write_str(s),
        }
    }
}

/// Asks the worker at `endpoint` for its hello only.
pub fn hello(endpoint: &Endpoint, creds: &Credentials) -> Result<WorkerHello, String> {
    connect(endpoint, creds)
        .map(|c| c.hello)
        .map_err(|e| format!("worker {endpoint}: {e}"))
}

/// Runs the CUDA sanity gate on the worker at `endpoint`: its result line, or why not.
pub fn sanity(endpoint: &Endpoint, creds: &Credentials) -> Result<String, String> {
    let mut c = connect(endpoint, creds).map_err(|e| format!("worker {endpoint}: {e}"))?;
    c.tx.send_with(|v| postcard::to_extend(&Request::Sanity, v))
        .map_err(|e| format!("worker {endpoint}: {e}"))?;
    c.rx.conn().set_timeout(Some(Duration::from_secs(120)));
    let mut buf = Vec::new();
    loop {
        c.rx.recv(MAX_REPLY, &mut buf)
            .map_err(|e| format!("worker {endpoint}: {e}"))?;
        match postcard::from_bytes::<Reply>(&buf) {
            Ok(Reply::Text { result }) => {
                return result.map_err(|e| format!("worker {endpoint}: {e}"))
            }
            Ok(Reply::Meter { .. }) => continue,
            _ => return Err(format!("worker {endpoint}: an unexpected answer")),
        }
    }
}

/// Executors on one or more worker hosts.
pub struct RemoteExecutorFactory {
    spec: RemoteSpec,
    creds: Credentials,
    device: DeviceInfo,
    hello: WorkerHello,
    kernel_timeout: Duration,
    /// Per endpoint: when it may be tried again, and the wait after the next failure.
    backoff: Mutex<Vec<(Option<Instant>, Duration)>>,
}

impl RemoteExecutorFactory {
    /// Reaches the first worker of `spec` that answers (trying the list again, with
    /// growing waits, for up to `wait` while none is reachable; a refusal or failed
    /// authentication ends at once) and takes its device as the one this mediator
    /// offers.
    pub fn connect(
        spec: RemoteSpec,
        creds: Credentials,
        wait: Duration,
    ) -> Result<RemoteExecutorFactory, SetupError> {
        let deadline = Instant::now() + wait;
        let mut delay = MIN_BACKOFF;
        loop {
            let mut why = Vec::new();
            for e in &spec.endpoints {
                match connect(e, &creds) {
                    Ok(c) => {
                        let Some(device) = c.hello.device() else {
                            return Err(SetupError::Worker(format!(
                                "worker {e}: an executor kind this mediator does not know"
                            )));
                        };
                        log::info!(
                            "worker {e}: {} ({} MiB, {} MiB free, {} GPU(s)), release {}, \
                             {} of {} sessions; {}",
                            device.name,
                            device.total_memory >> 20,
                            c.hello.free_memory >> 20,
                            c.hello.gpus,
                            c.hello.release,
                            c.hello.sessions,
                            c.hello.max_sessions,
                            c.hello.sanity
                        );
                        return Ok(RemoteExecutorFactory {
                            backoff: Mutex::new(vec![(None, MIN_BACKOFF); spec.endpoints.len()]),
                            spec,
                            creds,
                            device,
                            hello: c.hello,
                            kernel_timeout: DEFAULT_KERNEL_TIMEOUT,
                        });
                    }
                    Err(ConnectError::Refused(s)) => {
                        return Err(SetupError::Worker(format!("worker {e}: {s}")))
                    }
                    Err(ConnectError::Unreachable(s)) => why.push(format!("{e}: {s}")),
                }
            }
            if Instant::now() + delay > deadline {
                return Err(SetupError::Worker(format!(
                    "no worker reachable ({})",
                    why.join("; ")
                )));
            }
            log::warn!(
                "no worker reachable yet ({}); trying again in {:?}",
                why.join("; "),
                delay
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    /// The kernel timeout of the executors handed out (see
    /// [`crate::process::ProcessExecutorFactory::with_kernel_timeout`]).
    pub fn with_kernel_timeout(mut self, timeout: Duration) -> Self {
        self.kernel_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    pub fn kernel_timeout(&self) -> Duration {
        self.kernel_timeout
    }

    /// What the first worker said at start.
    pub fn hello(&self) -> &WorkerHello {
        &self.hello
    }

    pub fn spec(&self) -> &RemoteSpec {
        &self.spec
    }

    /// An executor on the first worker that opens one, as a concrete type.
    pub fn create_executor(&self) -> ExecResult<RemoteExecutor> {
        let mut why = Vec::new();
        for (i, e) in self.spec.endpoints.iter().enumerate() {
            let now = Instant::now();
            {
                let b = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
                if let (Some(until), _) = b[i] {
                    if now < until {
                        why.push(format!(
                            "{e}: not tried again for {} ms",
                            (until - now).as_millis()
                        ));
                        continue;
                    }
                }
            }
            match self.open_on(e) {
                Ok(exec) => {
                    self.backoff.lock().unwrap_or_else(|e| e.into_inner())[i] = (None, MIN_BACKOFF);
                    return Ok(exec);
                }
                Err(s) => {
                    let mut b = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
                    let delay = b[i].1;
                    b[i] = (Some(now + delay), (delay * 2).min(MAX_BACKOFF));
                    log::warn!("worker {e}: {s} (not tried again for {delay:?})");
                    why.push(format!("{e}: {s}"));
                }
            }
        }
        Err(ExecError::new(
            Status::DeviceLost,
            0,
            format!("no worker could open an executor ({})", why.join("; ")),
        ))
    }

    fn open_on(&self, endpoint: &Endpoint) -> Result<RemoteExecutor, String> {
        let c = connect(endpoint, &self.creds).map_err(|e| e.to_string())?;
        if c.hello.device().as_ref() != Some(&self.device) {
            return Err(format!(
                "now reports {} ({} MiB), not the {} ({} MiB) this mediator started with; \
                 restart the mediator to take the new device",
                c.hello.name,
                c.hello.total_memory >> 20,
                self.device.name,
                self.device.total_memory >> 20
            ));
        }
        RemoteExecutor::open(c, endpoint, self.kernel_timeout)
    }
}

impl ExecutorFactory for RemoteExecutorFactory {
    fn device(&self) -> &DeviceInfo {
        &self.device
    }

    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        self.create_executor()
            .map(|e| Box::new(e) as Box<dyn Executor>)
    }

    fn placement(&self) -> Option<String> {
        Some(format!(
            "each session in its own executor on a worker host ({}), in its own worker \
             process there",
            self.spec
        ))
    }

    fn check(&self) -> Result<(), SetupError> {
        let mut why = Vec::new();
        for e in &self.spec.endpoints {
            match connect(e, &self.creds) {
                Ok(_) => return Ok(()),
                Err(s) => why.push(format!("{e}: {s}")),
            }
        }
        Err(SetupError::Worker(format!(
            "no worker reachable ({})",
            why.join("; ")
        )))
    }
}

/// Device operations sent, and finished as the worker reports them.
#[derive(Default)]
struct RemoteMeter {
    sent: AtomicU64,
    done: AtomicU64,
    busy_ns: AtomicU64,
}

impl DeviceMeter for RemoteMeter {
    fn read(&self) -> MeterReading {
        let done = self.done.load(Ordering::Acquire);
        let sent = self.sent.load(Ordering::Acquire);
        MeterReading {
            sent,
            done: done.min(sent),
            busy_ns: self.busy_ns.load(Ordering::Acquire),
        }
    }
}

const NOT_KILLED: u8 = 0;
const KILLED: u8 = 1;
const KILLED_TIMED_OUT: u8 = 2;

/// What the reader thread shares with the executor.
struct Shared {
    inbox: Mutex<Inbox>,
    ready: Condvar,
    meter: RemoteMeter,
    /// For killing: shut down, every read on the connection returns.
    conn: Conn,
    killed: AtomicU8,
    /// Requests sent (counted before each is written): a reply beyond them answers
    /// nothing that was asked.
    asked: AtomicU64,
    /// The reader saw the connection end.
    ended: AtomicBool,
}

#[derive(Default)]
struct Inbox {
    replies: VecDeque<Reply>,
    bytes: usize,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl Shared {
    fn kill(&self, timed_out: bool) {
        let v = if timed_out { KILLED_TIMED_OUT } else { KILLED };
        let _ = self
            .killed
            .compare_exchange(NOT_KILLED, v, Ordering::SeqCst, Ordering::SeqCst);
        self.conn.shutdown();
    }
}

fn reply_bytes(r: &Reply) -> usize {
    64 + match r {
        Reply::Data { result: Ok(d), .. } => d.0.len(),
        Reply::Answer { result: Ok(a), .. } => a.bytes(),
        _ => 0,
    }
}

fn reader(mut rx: Receiver, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    let mut answered = 0u64;
    let why = loop {
        if let Err(e) = rx.recv(MAX_REPLY, &mut buf) {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the worker closed the connection".to_string()
            } else {
                format!("the connection to the worker failed: {e}")
            };
        }
        let reply: Reply = match postcard::from_bytes(&buf) {
            Ok(r) => r,
            Err(_) => break "the worker sent a malformed reply".to_string(),
        };
        if let Reply::Meter { done, busy_ns } = reply {
            shared.meter.done.fetch_max(done, Ordering::AcqRel);
            shared.meter.busy_ns.fetch_max(busy_ns, Ordering::AcqRel);
            continue;
        }
        let n = reply_bytes(&reply);
        answered += 1;
        let unasked = answered > shared.asked.load(Ordering::SeqCst);
        let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if unasked || inbox.replies.len() > MAX_IN_FLIGHT || inbox.bytes + n > MAX_INBOX_BYTES {
            inbox.closed = Some("the worker sent replies nobody asked for".into());
            drop(inbox);
            shared.ended.store(true, Ordering::Release);
            shared.conn.shutdown();
            shared.ready.notify_all();
            return;
        }
        inbox.bytes += n;
        inbox.replies.push_back(reply);
        drop(inbox);
        shared.ready.notify_all();
    };
    let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
    inbox.closed.get_or_insert(why);
    drop(inbox);
    shared.ended.store(true, Ordering::Release);
    // Whatever ended the reading ends the connection at once: the worker frees the
    // session now, not at the session's next call.
    shared.conn.shutdown();
    shared.ready.notify_all();
}

/// A request whose reply has not been taken yet.
#[derive(Debug)]
enum Pending {
    /// Nobody waits for it: an error is kept for the next call that waits.
    Deferred(&'static str),
    /// The caller waits for it.
    Waited,
}

/// An executor on a worker host (see the module documentation).
pub struct RemoteExecutor {
    tx: Sender,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    peer: String,
    pending: VecDeque<Pending>,
    deferred: Option<ExecError>,
    poisoned: bool,
    lost: Option<ExecError>,
    kind: ExecutorKind,
    context_bytes: u64,
    builtin_locals: HashMap<String, u64>,
    module_locals: HashMap<(u64, String), u64>,
    module_bytes: HashMap<u64, u64>,
    attributes: Option<Vec<i32>>,
    kernel_timeout: Duration,
    /// Reused for copies from guest sources.
    piece: Vec<u8>,
}

impl RemoteExecutor {
    fn open(c: Connected, endpoint: &Endpoint, kernel_timeout: Duration) -> Result<Self, String> {
        let kind = c
            .hello
            .device()
            .map(|d| d.kind)
            .ok_or("an unknown executor kind")?;
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            ready: Condvar::new(),
            meter: RemoteMeter::default(),
            conn: c.rx.conn().try_clone().map_err(|e| e.to_string())?,
            killed: AtomicU8::new(NOT_KILLED),
            ended: AtomicBool::new(false),
            asked: AtomicU64::new(0),
        });
        let s2 = shared.clone();
        let rx = c.rx;
        let reader = std::thread::Builder::new()
            .name("vgpu-remote-rx".into())
            .spawn(move || reader(rx, s2))
            .map_err(|e| format!("no reader thread: {e}"))?;
        let mut exec = RemoteExecutor {
            tx: c.tx,
            shared,
            reader: Some(reader),
            peer: endpoint.to_string(),
            pending: VecDeque::new(),
            deferred: None,
            poisoned: false,
            lost: None,
            kind,
            context_bytes: 0,
            builtin_locals: HashMap::new(),
            module_locals: HashMap::new(),
            module_bytes: HashMap::new(),
            attributes: None,
            kernel_timeout,
            piece: Vec::new(),
        };
        // Opening may start a worker process there: allow it the worker's start time.
        let opened = exec
            .call_with(&Request::Open, crate::process::START_TIMEOUT)
            .map_err(|e| e.message)?;
        match opened {
            Reply::Opened { result: Ok(o) } => {
                let Opened {
                    context_bytes,
                    builtin_locals,
                    executor,
                } = o;
                exec.context_bytes = context_bytes;
                exec.builtin_locals = builtin_locals.into_iter().collect();
                log::debug!("worker {endpoint}: {executor} executor opened");
                Ok(exec)
            }
            Reply::Opened { result: Err(e) } => Err(ExecError::from(e).message),
            _ => Err("an unexpected answer to Open".into()),
        }
    }

    /// The worker's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn lose(&mut self, why: String) -> ExecError {
        let killed = self.shared.killed.load(Ordering::SeqCst);
        let detail = if killed == KILLED_TIMED_OUT {
            TIMEOUT_DETAIL
        } else {
            0
        };
        let why = match killed {
            KILLED_TIMED_OUT => "ended by the watchdog (kernel timeout)".to_string(),
            KILLED => "ended".to_string(),
            _ => why,
        };
        let e = self.lost.get_or_insert_with(|| {
            log::warn!("remote executor on {}: {why}", self.peer);
            ExecError::new(
                Status::DeviceLost,
                detail,
                format!("remote executor on {}: {why}", self.peer),
            )
        });
        self.shared.conn.shutdown();
        e.clone()
    }

    fn check_lost(&self) -> ExecResult<()> {
        match &self.lost {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// The next reply, waiting at most `timeout` for it; past that the connection is
    /// ended as the watchdog would.
    fn next_reply(&mut self, timeout: Duration) -> ExecResult<Reply> {
        self.check_lost()?;
        let deadline = Instant::now() + timeout;
        let shared = self.shared.clone();
        let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = inbox.replies.pop_front() {
                inbox.bytes -= reply_bytes(&r).min(inbox.bytes);
                return Ok(r);
            }
            if let Some(why) = inbox.closed.clone() {
                drop(inbox);
                return Err(self.lose(why));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(inbox);
                self.shared.kill(true);
                return Err(self.lose(String::new()));
            }
            inbox = shared
                .ready
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Takes a reply's poisoned flag and its error, if any.
    fn note(&mut self, reply: &Reply) -> Option<ExecError> {
        let (poisoned, err) = match reply {
            Reply::Done { poisoned, result } => (*poisoned, result.as_ref().err()),
            Reply::Data { poisoned, result } => (*poisoned, result.as_ref().err()),
            Reply::Module { poisoned, result } => (*poisoned, result.as_ref().err()),
            Reply::Answer { poisoned, result } => (*poisoned, result.as_ref().err()),
            _ => (false, None),
        };
        self.poisoned |= poisoned;
        err.cloned().map(ExecError::from)
    }

    /// Reads the oldest unanswered reply, one nobody waits for.
    fn settle_one(&mut self) -> ExecResult<()> {
        let reply = self.next_reply(self.kernel_timeout)?;
        let what = match self.pending.pop_front() {
            Some(Pending::Deferred(what)) => what,
            _ => "a request",
        };
        if let Some(e) = self.note(&reply) {
            if self.deferred.is_none() {
                self.deferred = Some(e);
            } else {
                log::debug!("remote executor on {}: {what} failed too: {e}", self.peer);
            }
        }
        Ok(())
    }

    /// Reads every unanswered reply.
    fn settle_all(&mut self) -> ExecResult<()> {
        while !self.pending.is_empty() {
            self.settle_one()?;
        }
        Ok(())
    }

    fn send(&mut self, req: &Request<'_>, what: Pending) -> ExecResult<()> {
        self.check_lost()?;
        while self.pending.len() >= MAX_IN_FLIGHT {
            self.settle_one()?;
        }
        if req.is_device_op() {
            self.shared.meter.sent.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.asked.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.tx.send_with(|v| postcard::to_extend(req, v)) {
            return Err(self.lose(format!("sending to the worker: {e}")));
        }
        self.pending.push_back(what);
        Ok(())
    }

    /// Sends a request nobody waits for.
    fn post(&mut self, req: &Request<'_>, what: &'static str) -> ExecResult<()> {
        self.send(req, Pending::Deferred(what))
    }

    /// A call that needs its answer: earlier errors first (without sending), then the
    /// request and its reply, with the request's own error as an `Err`.
    fn call(&mut self, req: &Request<'_>) -> ExecResult<Reply> {
        self.settle_all()?;
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let reply = self.call_with(req, self.kernel_timeout)?;
        match self.note(&reply) {
            Some(e) => Err(e),
            None => Ok(reply),
        }
    }

    fn call_with(&mut self, req: &Request<'_>, timeout: Duration) -> ExecResult<Reply> {
        self.send(req, Pending::Waited)?;
        let reply = self.next_reply(timeout)?;
        self.pending.pop_front();
        Ok(reply)
    }

    /// `sync`-like: sends at once, reads everything up to its reply; an earlier error in
    /// preference to its own.
    fn call_through(&mut self, req: &Request<'_>) -> ExecResult<Reply> {
        self.send(req, Pending::Waited)?;
        while self.pending.len() > 1 {
            self.settle_one()?;
        }
        let reply = self.next_reply(self.kernel_timeout)?;
        self.pending.pop_front();
        let own = self.note(&reply);
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        match own {
            Some(e) => Err(e),
            None => Ok(reply),
        }
    }

    fn value(reply: Reply) -> ExecResult<u64> {
        match reply {
            Reply::Done { result: Ok(v), .. } => Ok(v),
            _ => Err(unexpected()),
        }
    }

    fn answer(&mut self, req: &Request<'_>) -> ExecResult<WireAnswer> {
        match self.call(req)? {
            Reply::Answer { result: Ok(a), .. } => Ok(a),
            _ => Err(unexpected()),
        }
    }

    fn load(&mut self, req: &Request<'_>) -> ExecResult<ModuleId> {
        match self.call(req)? {
            Reply::Module { result: Ok(m), .. } => {
                self.module_bytes.insert(m.id, m.bytes);
                Ok(ModuleId(m.id))
            }
            _ => Err(unexpected()),
        }
    }

    /// DTOH of `len` bytes in pieces, each handed to `put` (offset in the copy, bytes) as
    /// it arrives, with [`DTOH_WINDOW`] pieces in flight.
    fn dtoh_pieces(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        len: u64,
        put: &mut dyn FnMut(u64, &[u8]) -> ExecResult<()>,
    ) -> ExecResult<()> {
        self.settle_all()?;
        let pieces = len.div_ceil(PIECE as u64).max(1);
        let (mut sent, mut got) = (0u64, 0u64);
        let mut first_err: Option<ExecError> = None;
        while got < pieces {
            while sent < pieces && sent - got < DTOH_WINDOW as u64 {
                let at = sent * PIECE as u64;
                let n = (len - at.min(len)).min(PIECE as u64);
                let req = Request::Dtoh {
                    stream: stream.0,
                    src: src.0,
                    offset: offset + at,
                    len: n,
                };
                self.send(&req, Pending::Waited)?;
                sent += 1;
            }
            let reply = self.next_reply(self.kernel_timeout)?;
            self.pending.pop_front();
            let at = got * PIECE as u64;
            got += 1;
            if let Some(e) = self.note(&reply) {
                first_err.get_or_insert(e);
                continue;
            }
            match reply {
                Reply::Data { result: Ok(d), .. } => {
                    let want = (len - at.min(len)).min(PIECE as u64);
                    if d.0.len() as u64 != want {
                        first_err.get_or_insert_with(unexpected);
                    } else if first_err.is_none() {
                        if let Err(e) = put(at, &d.0) {
                            first_err = Some(e);
                        }
                    }
                }
                _ => {
                    first_err.get_or_insert_with(unexpected);
                }
            }
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn unexpected() -> ExecError {
    ExecError::new(
        Status::Internal,
        0,
        "the worker answered with an unexpected message",
    )
}

impl Executor for RemoteExecutor {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        let r = self.call(&Request::OpenStream)?;
        Self::value(r).map(StreamId)
    }

    fn close_stream(&mut self, stream: StreamId) {
        let _ = self.post(&Request::CloseStream { stream: stream.0 }, "close_stream");
    }

    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        let r = self.call(&Request::Alloc { bytes })?;
        Self::value(r).map(BufferId)
    }

    fn free(&mut self, buffer: BufferId) {
        let _ = self.post(&Request::Free { buffer: buffer.0 }, "free");
    }

    fn htod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        data: &[u8],
    ) -> ExecResult<()> {
        if data.is_empty() {
            return self.post(
                &Request::Htod {
                    stream: stream.0,
                    dst: dst.0,
                    offset,
                    data,
                },
                "htod",
            );
        }
        for (i, chunk) in data.chunks(PIECE).enumerate() {
            let req = Request::Htod {
                stream: stream.0,
                dst: dst.0,
                offset: offset + (i * PIECE) as u64,
                data: chunk,
            };
            self.post(&req, "htod")?;
        }
        Ok(())
    }

    fn htod_from(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        src: &dyn GuestSource,
    ) -> ExecResult<()> {
        let len = src.len();
        let mut piece = std::mem::take(&mut self.piece);
        let mut at = 0u64;
        let r = loop {
            if at >= len && !(len == 0 && at == 0) {
                break Ok(());
            }
            let n = (len - at).min(PIECE as u64) as usize;
            piece.resize(n, 0);
            if let Err(e) = src.read(at, &mut piece) {
                break Err(guest_fault(e));
            }
            let req = Request::Htod {
                stream: stream.0,
                dst: dst.0,
                offset: offset + at,
                data: &piece,
            };
            if let Err(e) = self.post(&req, "htod") {
                break Err(e);
            }
            if len == 0 {
                break Ok(());
            }
            at += n as u64;
        };
        self.piece = piece;
        r
    }

    fn dtoh(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        out: &mut [u8],
    ) -> ExecResult<()> {
        let len = out.len() as u64;
        self.dtoh_pieces(stream, src, offset, len, &mut |at, d| {
            out[at as usize..at as usize + d.len()].copy_from_slice(d);
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
        self.dtoh_pieces(stream, src, offset, len, &mut |at, d| {
            dst.write(at, d).map_err(guest_fault)
        })
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
        let req = Request::Dtod {
            stream: stream.0,
            dst: dst.0,
            dst_offset,
            src: src.0,
            src_offset,
            len,
        };
        self.post(&req, "dtod")
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
        let req = Request::Memset {
            stream: stream.0,
            dst: dst.0,
            offset,
            len,
            value,
            width,
        };
        self.post(&req, "memset")
    }

    fn load_module(&mut self, ptx: &str) -> ExecResult<ModuleId> {
        self.load(&Request::LoadModule { ptx })
    }

    fn unload_module(&mut self, module: ModuleId) {
        self.module_bytes.remove(&module.0);
        self.module_locals.retain(|(m, _), _| *m != module.0);
        let _ = self.post(&Request::UnloadModule { module: module.0 }, "unload_module");
    }

    fn load_module_image(&mut self, image: &[u8]) -> ExecResult<ModuleId> {
        self.load(&Request::LoadModuleImage { image })
    }

    fn device_attributes(&mut self, count: u32) -> ExecResult<Vec<i32>> {
        if let Some(a) = &self.attributes {
            if a.len() >= count as usize {
                return Ok(a[..count as usize].to_vec());
            }
        }
        match self.answer(&Request::DeviceAttributes { count })? {
            WireAnswer::Attributes(a) if a.len() == count as usize => {
                self.attributes = Some(a.clone());
                Ok(a)
            }
            _ => Err(unexpected()),
        }
    }

    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        let kernel = WireKernel::from(&kernel);
        match self.answer(&Request::FunctionInfo { kernel })? {
            WireAnswer::Function { attributes, params } => Ok(FunctionInfo { attributes, params }),
            _ => Err(unexpected()),
        }
    }

    fn module_global(&mut self, module: ModuleId, name: &str) -> ExecResult<(BufferId, u64)> {
        let req = Request::ModuleGlobal {
            module: module.0,
            name,
        };
        match self.answer(&req)? {
            WireAnswer::Global { address, size } => Ok((BufferId(address), size)),
            _ => Err(unexpected()),
        }
    }

    fn compile(
        &mut self,
        source: &str,
        options: &[String],
        out_len: u32,
    ) -> ExecResult<CompileOutput> {
        let req = Request::Compile {
            source,
            options: options.iter().map(String::as_str).collect(),
            out_len,
        };
        self.answer(&req)?
            .into_compile_output()
            .ok_or_else(unexpected)
    }

    fn launch(
        &mut self,
        stream: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()> {
        let params = params
            .iter()
            .map(|p| match p {
                ExecParam::Value(v) => WireParam::Value(v),
                ExecParam::Buffer(b) => WireParam::Buffer(b.0),
            })
            .collect();
        let req = Request::Launch {
            stream: stream.0,
            kernel: WireKernel::from(&kernel),
            grid: shape.grid,
            block: shape.block,
            shared_bytes: shape.shared_bytes,
            params,
        };
        self.post(&req, "launch")
    }

    fn sync(&mut self, stream: StreamId) -> ExecResult<()> {
        self.call_through(&Request::Sync { stream: stream.0 })
            .map(drop)
    }

    fn poisoned(&self) -> bool {
        // A connection that ended while idle counts at once: the mediator then replaces
        // the executor before the next request, not after it failed.
        self.poisoned || self.lost.is_some() || self.shared.ended.load(Ordering::Acquire)
    }

    fn meter(&self) -> Option<Arc<dyn DeviceMeter>> {
        let shared = self.shared.clone();
        Some(Arc::new(MeterOf(shared)))
    }

    fn killer(&self) -> Option<Killer> {
        let shared = self.shared.clone();
        Some(Killer::new(move |timed_out| shared.kill(timed_out)))
    }

    fn alloc_footprint(&self, bytes: u64) -> u64 {
        match self.kind {
            ExecutorKind::Cuda => crate::cuda::alloc_footprint(bytes),
            ExecutorKind::Cpu => bytes,
        }
    }

    fn module_bytes(&self, module: ModuleId) -> u64 {
        self.module_bytes.get(&module.0).copied().unwrap_or(0)
    }

    fn local_reservation(&mut self, kernel: KernelRef<'_>) -> ExecResult<u64> {
        match kernel {
            KernelRef::Builtin(spec) => {
                if let Some(v) = self.builtin_locals.get(spec.name) {
                    return Ok(*v);
                }
            }
            KernelRef::Module(m, name) => {
                if let Some(v) = self.module_locals.get(&(m.0, name.to_string())) {
                    return Ok(*v);
                }
            }
        }
        let r = self.call(&Request::LocalReservation {
            kernel: WireKernel::from(&kernel),
        })?;
        let v = Self::value(r)?;
        match kernel {
            KernelRef::Builtin(spec) => {
                self.builtin_locals.insert(spec.name.to_string(), v);
            }
            KernelRef::Module(m, name) => {
                self.module_locals.insert((m.0, name.to_string()), v);
            }
        }
        Ok(v)
    }

    fn context_bytes(&self) -> u64 {
        self.context_bytes
    }
}

/// The executor's meter, shared with the scheduler.
struct MeterOf(Arc<Shared>);

impl DeviceMeter for MeterOf {
    fn read(&self) -> MeterReading {
        self.0.meter.read()
    }
}

impl Drop for RemoteExecutor {
    fn drop(&mut self) {
        // The worker drops its executor when the connection ends, after the requests
        // sent before (frees included).
        self.shared.conn.shutdown();
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}
