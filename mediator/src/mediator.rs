// SPDX-License-Identifier: Apache-2.0
//! The mediator: tenants (VMs) with their quota and weight, each served by a worker that
//! owns the tenant's executor, sessions and handles.
//!
//! Transports (the vhost-user backend, the NFS file transport, tests) call
//! [`Mediator::submit`], which never blocks: the worker answers through a
//! [`CompletionSink`], e.g. a [`CompletionQueue`] whose eventfd wakes an epoll loop.
//! A tenant's requests run in the order they were submitted; tenants run in parallel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vgpu_protocol::{
    DeviceConfig, Header, Request, Response, Status, MAX_TRANSFER_BYTES, REQUEST_HEADER_SIZE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::executor::{DeviceInfo, ExecutorFactory, GuestIo, Killer};
use crate::metrics::{opcode, TenantCounters};
use crate::sched::{SchedConfig, Scheduler};
use crate::worker::Worker;

/// Identifies a tenant for the life of the mediator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub u64);

/// A VM's share of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantConfig {
    pub name: String,
    /// Device memory the VM may hold, in bytes: everything its work takes on the device
    /// (its sessions' contexts, buffers as the allocator rounds them, modules, local
    /// memory reserved for its kernels), not only the bytes it asked to allocate.
    pub mem_quota: u64,
    /// Relative share of device time.
    pub weight: u32,
}

/// Per-tenant limits that keep one guest from exhausting the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: u32,
    pub max_buffers_per_session: u32,
    pub max_modules_per_session: u32,
    /// Device buffers the tenant may hold at once, over all its sessions.
    pub max_allocations: u32,
    /// Modules the tenant may have loaded at once, over all its sessions.
    pub max_modules: u32,
    /// Host buffers a session may register (see [`crate::hostmap`]).
    pub max_host_buffers_per_session: u32,
    /// Bytes of host buffers a tenant may have registered at once: each is mapped (and on
    /// CUDA page-locked) on the host for as long as the guest keeps it.
    pub max_host_bytes: u64,
    /// Host memory the tenant's requests may hold at once, in bytes: the payload a request
    /// carries in (host-to-device data, PTX, parameters) and the data its answer carries
    /// out, from submission until the transport takes the answer, whether the request is
    /// queued, running, or abandoned by a VM that reset its device. See
    /// [`request_cost`]. A request that does not fit is answered `LIMIT_EXCEEDED`.
    pub max_held_bytes: u64,
}

/// Default of [`Limits::max_held_bytes`]: room for one of the largest transfers while
/// the VM's other requests hold almost as much.
pub const DEFAULT_MAX_HELD_BYTES: u64 = 2 * MAX_TRANSFER_BYTES;

/// Default of [`Limits::max_host_bytes`].
pub const DEFAULT_MAX_HOST_BYTES: u64 = 64 << 30;

/// Default of [`Limits::max_allocations`]: four sessions' worth of
/// [`Limits::max_buffers_per_session`].
pub const DEFAULT_MAX_ALLOCATIONS: u32 = 65536;

/// Default of [`Limits::max_modules`]: four sessions' worth of
/// [`Limits::max_modules_per_session`].
pub const DEFAULT_MAX_MODULES: u32 = 256;

/// What every request costs on top of its payload (its header, its place in queues).
pub const REQUEST_OVERHEAD: u64 = 256;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 64,
            max_buffers_per_session: 16384,
            max_modules_per_session: 64,
            max_allocations: DEFAULT_MAX_ALLOCATIONS,
            max_modules: DEFAULT_MAX_MODULES,
            max_host_buffers_per_session: 256,
            max_host_bytes: DEFAULT_MAX_HOST_BYTES,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
        }
    }
}

/// Host bytes a request holds while the mediator has it: its readable payload, the data
/// its answer may carry, and [`REQUEST_OVERHEAD`]. Known from the header alone, so a
/// transport can reserve before it copies the payload out of the guest.
pub fn request_cost(header: &Header) -> u64 {
    REQUEST_OVERHEAD
        .saturating_add(header.payload_len())
        .saturating_add(header.writable_len())
}

/// Bytes reserved against a tenant's [`Limits::max_held_bytes`]; released when dropped.
#[must_use = "the reservation is released when dropped"]
pub struct Hold {
    shared: Arc<TenantShared>,
    bytes: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.shared.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hold({} bytes)", self.bytes)
    }
}

/// Why [`Mediator::hold`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldError {
    /// No such tenant (removed, or never added).
    NoTenant,
    /// The tenant already holds `held` of its `limit` bytes; `wanted` more do not fit.
    OverBudget { held: u64, wanted: u64, limit: u64 },
}

impl HoldError {
    /// The answer a request that could not be held gets.
    pub fn response(self) -> Response {
        match self {
            HoldError::NoTenant => Response::error(Status::DeviceLost, 0),
            HoldError::OverBudget { .. } => Response::error(Status::LimitExceeded, 0),
        }
    }
}

impl std::fmt::Display for HoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HoldError::NoTenant => write!(f, "no such tenant"),
            HoldError::OverBudget {
                held,
                wanted,
                limit,
            } => write!(
                f,
                "{wanted} bytes do not fit: {held} of the VM's {limit} bytes in flight are held"
            ),
        }
    }
}

/// What a tenant holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub sessions: u32,
    /// Device memory charged to the tenant's quota: the sum of the four below.
    pub mem_used: u64,
    /// Its buffers, each as the executor's allocator takes it
    /// ([`crate::Executor::alloc_footprint`]).
    pub buffer_bytes: u64,
    /// Its sessions' execution contexts, and the self-test's while it has one
    /// ([`crate::Executor::context_bytes`]).
    pub context_bytes: u64,
    /// Its loaded modules ([`crate::Executor::module_bytes`]).
    pub module_bytes: u64,
    /// Local memory the driver reserved for its sessions' kernels: per session, the
    /// largest [`crate::Executor::local_reservation`] of the kernels it launched.
    pub local_bytes: u64,
    pub allocations: u32,
    pub modules: u32,
    /// Times the tenant's execution context was lost and recreated.
    pub restarts: u32,
    /// Requests answered since the tenant was added.
    pub requests: u64,
    /// Requests dropped unexecuted because the VM reset its device after submitting them.
    pub cancelled: u64,
    /// Host bytes the tenant's requests hold now (see [`Limits::max_held_bytes`]).
    pub held_bytes: u64,
    /// Bytes of host buffers the tenant's sessions have registered.
    pub host_bytes: u64,
    /// Copies that went straight between a registered host buffer and the device.
    pub host_copies: u64,
    /// Device time the tenant's work took, in nanoseconds (see [`crate::sched`]).
    pub device_ns: u64,
    /// Time the tenant's worker waited for its turn on the device, in nanoseconds.
    pub sched_wait_ns: u64,
    /// Sessions the watchdog ended for running past the kernel timeout.
    pub timeouts: u64,
}

/// Receives completed requests.
pub trait CompletionSink: Send + Sync {
    fn complete(&self, token: u64, response: Response);

    /// Like `complete`, for an answer whose bytes `hold` still counts against the
    /// tenant's budget: a sink that keeps answers until someone takes them keeps the hold
    /// with them.
    fn complete_held(&self, token: u64, response: Response, hold: Hold) {
        self.complete(token, response);
        drop(hold);
    }
}

/// Completions collected for an event loop: `complete` queues and signals the eventfd;
/// the loop polls the fd and calls [`CompletionQueue::drain`].
pub struct CompletionQueue {
    /// Answers with the reservation of their bytes, released when they are taken.
    done: Mutex<VecDeque<(u64, Response, Option<Hold>)>>,
    eventfd: EventFd,
}

impl CompletionQueue {
    pub fn new() -> io::Result<Arc<CompletionQueue>> {
        Ok(Arc::new(CompletionQueue {
            done: Mutex::new(VecDeque::new()),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The fd that becomes readable when completions are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Takes every waiting completion and resets the eventfd.
    pub fn drain(&self) -> Vec<(u64, Response)> {
        let _ = self.eventfd.read();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.drain(..)
            .map(|(token, response, _)| (token, response))
            .collect()
    }

    /// Whether no completion is waiting, without a system call and without blocking: while
    /// a completion is being added (the queue is busy) it answers `false`.
    pub fn is_empty(&self) -> bool {
        match self.done.try_lock() {
            Ok(done) => done.is_empty(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().is_empty(),
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    fn push(&self, token: u64, response: Response, hold: Option<Hold>) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((token, response, hold));
        if let Err(e) = self.eventfd.write(1) {
            log::error!("completion eventfd: {e}");
        }
    }
}

impl CompletionSink for CompletionQueue {
    fn complete(&self, token: u64, response: Response) {
        self.push(token, response, None);
    }

    fn complete_held(&self, token: u64, response: Response, hold: Hold) {
        self.push(token, response, Some(hold));
    }
}

struct ChannelSink(Mutex<mpsc::Sender<Response>>);

impl CompletionSink for ChannelSink {
    fn complete(&self, _token: u64, response: Response) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(response);
    }
}

pub(crate) enum Message {
    Request {
        request: Request,
        /// Where an HTOD's data or a DTOH's answer stays (the guest's buffers).
        io: Option<GuestIo>,
        token: u64,
        sink: Arc<dyn CompletionSink>,
        /// Released once the answer is taken from the sink.
        hold: Hold,
        /// When it was submitted: its answer's latency is measured from here.
        submitted: Instant,
    },
    /// Close every session and free everything (the VM disconnected or reset).
    Reset { done: mpsc::Sender<()> },
}

/// State a worker publishes for everyone else to read.
pub(crate) struct TenantShared {
    pub id: TenantId,
    /// The GPU the tenant is placed on, by its host index ([`Mediator::gpus`]).
    pub gpu: u32,
    /// As the tenant was added: its quota now is [`TenantShared::quota`], its weight the
    /// scheduler's.
    pub config: TenantConfig,
    /// Device memory the tenant may hold now, in bytes ([`Mediator::set_quota`]).
    pub mem_quota: AtomicU64,
    /// Admits the tenant's device work and measures it.
    pub sched: Arc<Scheduler>,
    pub usage: Mutex<TenantUsage>,
    /// Bytes reserved by [`Hold`]s.
    pub held: AtomicU64,
    /// Requests taken back out of the queue unexecuted.
    pub cancelled: AtomicU64,
    /// Answers by operation and status, bytes copied, latencies (see [`crate::metrics`]).
    pub counters: TenantCounters,
    /// What the worker has yet to take.
    pub queue: TenantQueue,
    /// Killers of the worker's executors that can be ended from outside, by session id
    /// ([`SELFTEST_EXECUTOR`] for the self-test executor): a reset or removal that the
    /// worker does not answer within [`RESET_GRACE`] ends them.
    pub killers: Mutex<HashMap<u64, Killer>>,
}

/// The key of the self-test executor's killer in [`TenantShared::killers`] (session ids
/// start at 1).
pub(crate) const SELFTEST_EXECUTOR: u64 = 0;

/// How long a reset or removal lets the tenant's worker get to it before the tenant's
/// executors are killed.
pub const RESET_GRACE: Duration = Duration::from_millis(200);

impl TenantShared {
    /// The tenant's device-memory quota now: what every quota check and INFO use.
    pub fn quota(&self) -> u64 {
        self.mem_quota.load(Ordering::Acquire)
    }

    /// Kills every executor of the tenant that can be killed; how many.
    fn kill_executors(&self, timed_out: bool) -> usize {
        let killers: Vec<Killer> = self
            .killers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for k in &killers {
            k.kill(timed_out);
        }
        killers.len()
    }

    /// Waits until `done` (which waits at most the time it is given) says the worker got
    /// there. Each time it has not within [`RESET_GRACE`], the tenant's executors are
    /// killed: the worker may be blocked in a call on one of them, e.g. waiting for a
    /// kernel that does not end, and a killed executor's call returns at once.
    ///
    /// Killing only after a grace, not at once: a worker that is idle or finishing a short
    /// request (the usual reset) closes its sessions the ordinary way, its executor
    /// workers exit cleanly and nothing is counted as lost; only a worker that is stuck
    /// has its executors killed, so a reset never waits on a kernel for much longer than
    /// the grace. Killing again at every grace also ends executors that the worker made
    /// meanwhile (a session opened by a request that was already running).
    fn wait_or_kill(&self, what: &str, mut done: impl FnMut(Duration) -> bool) {
        if done(RESET_GRACE) {
            return;
        }
        let started = Instant::now();
        let killed = self.kill_executors(false);
        log::info!(
            "tenant {} ({}): {what} not reached within {RESET_GRACE:?}: {killed} executors \
             killed",
            self.id.0,
            self.config.name
        );
        while !done(RESET_GRACE) {
            let killed = self.kill_executors(false);
            log::debug!(
                "tenant {} ({}): {what} still not reached after {:?}; {killed} executors \
                 killed",
                self.id.0,
                self.config.name,
                started.elapsed()
            );
        }
    }

    /// Drops every queued request of the tenant: see [`Mediator::cancel_queued`].
    fn cancel_queued(&self) {
        let cancelled = self.queue.take_requests();
        if cancelled.is_empty() {
            return;
        }
        self.cancelled
            .fetch_add(cancelled.len() as u64, Ordering::Relaxed);
        log::debug!(
            "tenant {} ({}): {} queued requests cancelled",
            self.id.0,
            self.config.name,
            cancelled.len()
        );
        for message in cancelled {
            if let Message::Request {
                request,
                token,
                sink,
                hold,
                submitted,
                ..
            } = message
            {
                let op = opcode(&request.command);
                drop(request);
                drop(hold);
                self.counters
                    .record(op, Status::DeviceLost, submitted.elapsed());
                sink.complete(token, Response::error(Status::DeviceLost, 0));
            }
        }
    }
}

/// Waits up to `wait` for `thread` to end; true once it has.
fn finished_within(thread: &JoinHandle<()>, wait: Duration) -> bool {
    let end = Instant::now() + wait;
    let mut nap = Duration::from_micros(100);
    while !thread.is_finished() {
        let now = Instant::now();
        if now >= end {
            return false;
        }
        std::thread::sleep(nap.min(end - now));
        nap = (nap * 2).min(Duration::from_millis(10));
    }
    true
}

/// A tenant's messages: each session's requests in submission order, the sessions taken
/// in turn by device time (see [`TenantQueue::pop`]). Unlike a channel, queued requests can
/// be taken back out (cancelled) by someone other than the worker.
#[derive(Default)]
pub(crate) struct TenantQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    /// Resets, and requests outside any session (INFO, SESSION_OPEN, SELFTEST): first.
    control: VecDeque<Message>,
    /// Each session's requests, in order.
    sessions: BTreeMap<u64, VecDeque<Message>>,
    closed: bool,
}

impl QueueState {
    fn is_empty(&self) -> bool {
        self.control.is_empty() && self.sessions.is_empty()
    }
}

impl TenantQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message; false (and the message dropped) if the queue is closed.
    fn push(&self, message: Message) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        match &message {
            Message::Request { request, .. } if request.session != 0 => state
                .sessions
                .entry(request.session)
                .or_default()
                .push_back(message),
            _ => state.control.push_back(message),
        }
        self.ready.notify_one();
        true
    }

    /// The next message; `None` once the queue is closed and empty. Control messages come
    /// first; then `pick` chooses among the sessions with requests waiting (the one whose
    /// work took the least device time), and its oldest request comes next: one session's
    /// flood does not hold up the VM's other sessions.
    pub fn pop(&self, pick: impl Fn(&[u64]) -> u64) -> Option<Message> {
        let mut state = self.lock();
        loop {
            if let Some(m) = state.control.pop_front() {
                return Some(m);
            }
            // Asked even for one session: `pick` keeps count of who runs.
            let session = match state.sessions.len() {
                0 => None,
                _ => {
                    let waiting: Vec<u64> = state.sessions.keys().copied().collect();
                    Some(pick(&waiting))
                }
            };
            if let Some(sid) = session {
                if let Some(queue) = state.sessions.get_mut(&sid) {
                    let m = queue.pop_front();
                    if queue.is_empty() {
                        state.sessions.remove(&sid);
                    }
                    if let Some(m) = m {
                        return Some(m);
                    }
                }
                // `pick` named no waiting session: take the first.
                let first = state.sessions.keys().next().copied();
                if let Some(queue) = first.and_then(|s| state.sessions.get_mut(&s)) {
                    let m = queue.pop_front();
                    if queue.is_empty() {
                        state.sessions.remove(&first.unwrap_or_default());
                    }
                    if let Some(m) = m {
                        return Some(m);
                    }
                }
                continue;
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Takes every queued request out (resets stay).
    fn take_requests(&self) -> Vec<Message> {
        let mut state = self.lock();
        let mut requests = Vec::new();
        let mut rest = VecDeque::new();
        for m in state.control.drain(..) {
            match m {
                Message::Request { .. } => requests.push(m),
                Message::Reset { .. } => rest.push_back(m),
            }
        }
        state.control = rest;
        for (_, queue) in std::mem::take(&mut state.sessions) {
            requests.extend(queue);
        }
        debug_assert!(state.is_empty() || !state.control.is_empty());
        requests
    }
}

struct TenantHandle {
    shared: Arc<TenantShared>,
    thread: Option<JoinHandle<()>>,
}

/// Where [`Mediator::add_tenant_on`] puts a tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// On the GPU with the most device memory not yet promised to its tenants' quotas; of
    /// those, the one with the fewest tenants; of those, the lowest index.
    #[default]
    Auto,
    /// On the GPU with this host index.
    Gpu(u32),
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Placement, String> {
        match s.trim() {
            "auto" => Ok(Placement::Auto),
            n => n
                .parse()
                .map(Placement::Gpu)
                .map_err(|_| format!("'{n}' is neither a GPU index nor auto")),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Auto => write!(f, "auto"),
            Placement::Gpu(n) => write!(f, "{n}"),
        }
    }
}

/// One GPU the mediator drives: what runs work on it and the scheduler that shares it.
struct Gpu {
    index: u32,
    factory: Arc<dyn ExecutorFactory>,
    sched: Arc<Scheduler>,
}

/// A GPU and what its tenants take of it, for views of the host ([`Mediator::gpu_usage`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuUsage {
    /// The GPU's host index.
    pub index: u32,
    pub device: DeviceInfo,
    /// Tenants placed on it.
    pub tenants: u32,
    /// The sum of its tenants' quotas, in bytes.
    pub quota_committed: u64,
    /// Device memory its tenants hold, in bytes.
    pub mem_used: u64,
}

/// Shares the host's GPUs between tenants: each tenant lives on one GPU, whose scheduler
/// shares that GPU's time between the tenants placed on it; quotas count against the
/// GPU's memory.
pub struct Mediator {
    /// In index order; never empty.
    gpus: Vec<Gpu>,
    limits: Limits,
    tenants: Mutex<HashMap<TenantId, TenantHandle>>,
    /// Held while a tenant is placed and added, so two additions see each other.
    placing: Mutex<()>,
    next_tenant: AtomicU64,
}

impl Mediator {
    pub fn new(factory: Arc<dyn ExecutorFactory>) -> Arc<Mediator> {
        Mediator::with_limits(factory, Limits::default())
    }

    pub fn with_limits(factory: Arc<dyn ExecutorFactory>, limits: Limits) -> Arc<Mediator> {
        Mediator::with_config(factory, limits, SchedConfig::default())
    }

    /// A mediator of one GPU (index 0) whose scheduler shares it as `sched` says.
    pub fn with_config(
        factory: Arc<dyn ExecutorFactory>,
        limits: Limits,
        sched: SchedConfig,
    ) -> Arc<Mediator> {
        Mediator::with_gpus(vec![(0, factory)], limits, sched)
    }

    /// A mediator of several GPUs, each `(host index, factory)` (see
    /// [`crate::select_gpus`]); each GPU gets its own scheduler configured by `sched`.
    /// Panics when `gpus` is empty or names an index twice: a caller's bug.
    pub fn with_gpus(
        gpus: Vec<crate::GpuFactory>,
        limits: Limits,
        sched: SchedConfig,
    ) -> Arc<Mediator> {
        assert!(!gpus.is_empty(), "a mediator needs at least one GPU");
        let mut gpus: Vec<Gpu> = gpus
            .into_iter()
            .map(|(index, factory)| Gpu {
                index,
                factory,
                sched: Scheduler::new(sched),
            })
            .collect();
        gpus.sort_by_key(|g| g.index);
        assert!(
            gpus.windows(2).all(|w| w[0].index != w[1].index),
            "a GPU index named twice"
        );
        Arc::new(Mediator {
            gpus,
            limits,
            tenants: Mutex::new(HashMap::new()),
            placing: Mutex::new(()),
            next_tenant: AtomicU64::new(1),
        })
    }

    /// The first GPU's device (the only one on a one-GPU host).
    pub fn device(&self) -> &DeviceInfo {
        self.gpus[0].factory.device()
    }

    /// The host indices of the GPUs the mediator drives, in order.
    pub fn gpus(&self) -> Vec<u32> {
        self.gpus.iter().map(|g| g.index).collect()
    }

    /// The device of the GPU with host index `gpu`.
    pub fn gpu_device(&self, gpu: u32) -> Option<&DeviceInfo> {
        self.gpu(gpu).map(|g| g.factory.device())
    }

    /// The scheduler of the GPU with host index `gpu`.
    pub fn gpu_scheduler(&self, gpu: u32) -> Option<&Arc<Scheduler>> {
        self.gpu(gpu).map(|g| &g.sched)
    }

    /// The GPU a tenant is placed on.
    pub fn tenant_gpu(&self, tenant: TenantId) -> Option<u32> {
        Some(self.shared(tenant)?.gpu)
    }

    /// Every GPU with what its tenants take of it, in index order.
    pub fn gpu_usage(&self) -> Vec<GpuUsage> {
        let tenants: Vec<Arc<TenantShared>> =
            self.lock().values().map(|h| h.shared.clone()).collect();
        self.gpus
            .iter()
            .map(|g| {
                let mine = tenants.iter().filter(|t| t.gpu == g.index);
                let (mut count, mut committed, mut used) = (0u32, 0u64, 0u64);
                for t in mine {
                    count += 1;
                    committed = committed.saturating_add(t.quota());
                    let usage = t.usage.lock().unwrap_or_else(|e| e.into_inner());
                    used = used.saturating_add(usage.mem_used);
                }
                GpuUsage {
                    index: g.index,
                    device: g.factory.device().clone(),
                    tenants: count,
                    quota_committed: committed,
                    mem_used: used,
                }
            })
            .collect()
    }

    /// The GPU [`Placement::Auto`] would put a tenant on now: [`plan_placement`]'s choice
    /// for one tenant with a quota (the quota itself does not change the order).
    pub fn place(&self) -> u32 {
        plan_placement(&self.gpu_usage(), &[(Placement::Auto, Some(0))])
            .ok()
            .and_then(|plan| plan.first().map(|&(gpu, _)| gpu))
            .unwrap_or(self.gpus[0].index)
    }

    fn gpu(&self, gpu: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == gpu)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The scheduler of the first GPU (the only one on a one-GPU host); a tenant's is
    /// [`Mediator::scheduler_of`].
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.gpus[0].sched
    }

    /// The scheduler that shares the tenant's GPU.
    pub fn scheduler_of(&self, tenant: TenantId) -> Option<Arc<Scheduler>> {
        Some(self.shared(tenant)?.sched.clone())
    }

    /// Changes a tenant's share of device time from now on; false if there is no such
    /// tenant or the weight is 0.
    pub fn set_weight(&self, tenant: TenantId, weight: u32) -> bool {
        let Some(shared) = self.shared(tenant).filter(|_| weight > 0) else {
            return false;
        };
        let changed = shared.sched.set_weight(tenant, weight);
        if changed {
            log::info!("tenant {}: weight {weight}", tenant.0);
        }
        changed
    }

    /// A tenant's weight now.
    pub fn weight(&self, tenant: TenantId) -> Option<u32> {
        self.shared(tenant)?.sched.stats(tenant).map(|s| s.weight)
    }

    /// Changes a tenant's device-memory quota from now on: every later quota check, INFO
    /// reply and [`Mediator::device_config`] use it. Lowering it below what the tenant
    /// holds frees nothing: work that needs more device memory is refused
    /// (`QUOTA_EXCEEDED`) until the tenant is back under it. False if there is no such
    /// tenant.
    pub fn set_quota(&self, tenant: TenantId, bytes: u64) -> bool {
        let Some(shared) = self.shared(tenant) else {
            return false;
        };
        let old = shared.mem_quota.swap(bytes, Ordering::AcqRel);
        if old != bytes {
            log::info!(
                "tenant {} ({}): memory quota {} MiB (was {} MiB)",
                tenant.0,
                shared.config.name,
                bytes >> 20,
                old >> 20
            );
        }
        true
    }

    /// A tenant's device-memory quota now, in bytes.
    pub fn quota(&self, tenant: TenantId) -> Option<u64> {
        Some(self.shared(tenant)?.quota())
    }

    /// Adds a tenant, placed automatically ([`Placement::Auto`]), and starts its worker.
    pub fn add_tenant(&self, config: TenantConfig) -> io::Result<TenantId> {
        self.add_tenant_on(config, Placement::Auto)
    }

    /// Adds a tenant on a GPU and starts its worker. A GPU the mediator does not drive is
    /// an `InvalidInput` error that names the ones it does.
    pub fn add_tenant_on(
        &self,
        config: TenantConfig,
        placement: Placement,
    ) -> io::Result<TenantId> {
        let _placing = self.placing.lock().unwrap_or_else(|e| e.into_inner());
        let index = match placement {
            Placement::Auto => self.place(),
            Placement::Gpu(n) => n,
        };
        let Some(gpu) = self.gpu(index) else {
            let known: Vec<String> = self.gpus.iter().map(|g| g.index.to_string()).collect();
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no GPU {index} (GPUs: {})", known.join(", ")),
            ));
        };
        let id = TenantId(self.next_tenant.fetch_add(1, Ordering::Relaxed));
        gpu.sched.add(id, config.weight);
        let shared = Arc::new(TenantShared {
            id,
            gpu: gpu.index,
            config: config.clone(),
            mem_quota: AtomicU64::new(config.mem_quota),
            sched: gpu.sched.clone(),
            usage: Mutex::new(TenantUsage::default()),
            held: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            counters: TenantCounters::new(),
            queue: TenantQueue::default(),
            killers: Mutex::new(HashMap::new()),
        });
        let (factory, worker_shared, limits) = (gpu.factory.clone(), shared.clone(), self.limits);
        // The worker is built on its own thread: its executor never leaves that thread.
        let thread = std::thread::Builder::new()
            .name(format!("tenant-{}", config.name))
            .spawn(move || Worker::new(factory, worker_shared, limits).run())
            .inspect_err(|_| gpu.sched.remove(id))?;
        log::info!(
            "tenant {} ({}) added on GPU {}: quota {} MiB, weight {}",
            id.0,
            config.name,
            gpu.index,
            config.mem_quota >> 20,
            config.weight
        );
        self.lock().insert(
            id,
            TenantHandle {
                shared,
                thread: Some(thread),
            },
        );
        Ok(id)
    }

    /// Frees everything the tenant holds and stops its worker. Requests still queued are
    /// cancelled (answered `DEVICE_LOST` unexecuted); a worker that does not stop within
    /// [`RESET_GRACE`] (stuck in a call, e.g. on a kernel that does not end) has the
    /// tenant's executors killed, so this never waits on a kernel.
    pub fn remove_tenant(&self, tenant: TenantId) {
        let handle = self.lock().remove(&tenant);
        if let Some(mut h) = handle {
            h.shared.cancel_queued();
            h.shared.queue.close();
            // A worker waiting for its turn on the device stops waiting.
            h.shared.sched.remove(tenant);
            if let Some(t) = h.thread.take() {
                h.shared
                    .wait_or_kill("removal", |wait| finished_within(&t, wait));
                let _ = t.join();
            }
            log::info!("tenant {} ({}) removed", tenant.0, h.shared.config.name);
        }
    }

    /// Closes all the tenant's sessions and frees its device memory. Requests submitted
    /// before are cancelled (answered `DEVICE_LOST` unexecuted, their payload dropped);
    /// one already running is waited for up to [`RESET_GRACE`], after which the tenant's
    /// executors are killed (the running request and the killed sessions get
    /// `DEVICE_LOST`). Returns once done.
    pub fn reset_tenant(&self, tenant: TenantId) {
        let Some(shared) = self.shared(tenant) else {
            return;
        };
        shared.cancel_queued();
        let (done, wait) = mpsc::channel();
        if shared.queue.push(Message::Reset { done }) {
            shared.wait_or_kill("reset", |grace| {
                !matches!(
                    wait.recv_timeout(grace),
                    Err(mpsc::RecvTimeoutError::Timeout)
                )
            });
        }
    }

    /// Drops every request of the tenant that has not started yet: each is answered
    /// `DEVICE_LOST` without being executed and its payload is freed at once. For a VM
    /// that abandoned its requests (a device reset, a ring stopped for good).
    pub fn cancel_queued(&self, tenant: TenantId) {
        if let Some(shared) = self.shared(tenant) {
            shared.cancel_queued();
        }
    }

    /// Reserves `bytes` of the tenant's [`Limits::max_held_bytes`] for a request about to
    /// be submitted with [`Mediator::submit_held`].
    pub fn hold(&self, tenant: TenantId, bytes: u64) -> Result<Hold, HoldError> {
        let shared = self.shared(tenant).ok_or(HoldError::NoTenant)?;
        let limit = self.limits.max_held_bytes;
        let mut held = shared.held.load(Ordering::Acquire);
        loop {
            let total = held.saturating_add(bytes);
            if total > limit {
                return Err(HoldError::OverBudget {
                    held,
                    wanted: bytes,
                    limit,
                });
            }
            match shared.held.compare_exchange_weak(
                held,
                total,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => held = now,
            }
        }
        Ok(Hold { shared, bytes })
    }

    /// Queues a request; `sink` receives the response with `token`. Never blocks. The
    /// request's [`request_cost`] is reserved first; one that does not fit in the
    /// tenant's budget is answered `LIMIT_EXCEEDED` at once.
    pub fn submit(
        &self,
        tenant: TenantId,
        request: Request,
        token: u64,
        sink: Arc<dyn CompletionSink>,
    ) {
        match self.hold(tenant, request_cost(&request.header())) {
            Ok(hold) => self.submit_held(tenant, request, token, sink, hold),
            Err(e) => {
                log::debug!("tenant {}: request refused: {e}", tenant.0);
                let response = e.response();
                if let Some(shared) = self.shared(tenant) {
                    let op = opcode(&request.command);
                    shared.counters.record(op, response.status, Duration::ZERO);
                }
                sink.complete(token, response);
            }
        }
    }

    /// Queues a request whose bytes `hold` already reserves (see [`Mediator::hold`]).
    /// Never blocks.
    pub fn submit_held(
        &self,
        tenant: TenantId,
        request: Request,
        token: u64,
        sink: Arc<dyn CompletionSink>,
        hold: Hold,
    ) {
        self.submit_io(tenant, request, None, token, sink, hold)
    }

    /// Like [`Mediator::submit_held`], for a request whose data stays in the guest's
    /// buffers: an HTOD (its `data` empty) copies from `GuestIo::Source`, a DTOH writes its
    /// answer into `GuestIo::Sink` and answers [`Response::placed`]. The transport keeps
    /// the buffers valid until the answer reaches it.
    pub fn submit_io(
        &self,
        tenant: TenantId,
        request: Request,
        io: Option<GuestIo>,
        token: u64,
        sink: Arc<dyn CompletionSink>,
        hold: Hold,
    ) {
        // The hold knows its tenant's queue: no second look-up on the hot path.
        let shared = hold.shared.clone();
        if shared.id != tenant {
            log::error!(
                "a hold of tenant {} used for tenant {}: refused",
                shared.id.0,
                tenant.0
            );
            sink.complete(token, Response::error(Status::Internal, 0));
            return;
        }
        let reject = sink.clone();
        let op = opcode(&request.command);
        let submitted = Instant::now();
        let message = Message::Request {
            request,
            io,
            token,
            sink,
            hold,
            submitted,
        };
        if !shared.queue.push(message) {
            shared
                .counters
                .record(op, Status::DeviceLost, submitted.elapsed());
            reject.complete(token, Response::error(Status::DeviceLost, 0));
        }
    }

    /// Runs a request and waits for its response.
    pub fn call(&self, tenant: TenantId, request: Request) -> Response {
        let (tx, rx) = mpsc::channel();
        self.submit(tenant, request, 0, Arc::new(ChannelSink(Mutex::new(tx))));
        rx.recv()
            .unwrap_or_else(|_| Response::error(Status::DeviceLost, 0))
    }

    pub fn usage(&self, tenant: TenantId) -> Option<TenantUsage> {
        let shared = self.shared(tenant)?;
        let mut usage = *shared.usage.lock().unwrap_or_else(|e| e.into_inner());
        usage.held_bytes = shared.held.load(Ordering::Acquire);
        usage.cancelled = shared.cancelled.load(Ordering::Relaxed);
        if let Some(stats) = shared.sched.stats(tenant) {
            usage.device_ns = stats.device_ns;
            usage.sched_wait_ns = stats.waited_ns;
            usage.timeouts = stats.timeouts;
        }
        Some(usage)
    }

    pub(crate) fn shared(&self, tenant: TenantId) -> Option<Arc<TenantShared>> {
        self.lock().get(&tenant).map(|h| h.shared.clone())
    }

    /// A tenant's name, quota and weight as they are now ([`Mediator::set_quota`] and
    /// [`Mediator::set_weight`] change the last two).
    pub fn tenant_config(&self, tenant: TenantId) -> Option<TenantConfig> {
        let shared = self.shared(tenant)?;
        Some(TenantConfig {
            mem_quota: shared.quota(),
            weight: shared
                .sched
                .stats(tenant)
                .map_or(shared.config.weight, |s| s.weight),
            ..shared.config.clone()
        })
    }

    pub fn tenants(&self) -> Vec<TenantId> {
        let mut ids: Vec<_> = self.lock().keys().copied().collect();
        ids.sort();
        ids
    }

    /// The config space a tenant's device shows.
    pub fn device_config(&self, tenant: TenantId) -> Option<DeviceConfig> {
        let shared = self.shared(tenant)?;
        let device = self.gpu_device(shared.gpu)?;
        Some(device_config(
            device,
            shared.gpu,
            shared.quota(),
            &self.limits,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantHandle>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Mediator {
    fn drop(&mut self) {
        for id in self.tenants() {
            self.remove_tenant(id);
        }
    }
}

pub(crate) fn device_config(
    device: &DeviceInfo,
    gpu: u32,
    quota: u64,
    limits: &Limits,
) -> DeviceConfig {
    DeviceConfig {
        version: vgpu_protocol::PROTOCOL_VERSION as u32,
        num_queues: 1,
        max_request_bytes: (MAX_TRANSFER_BYTES as usize + REQUEST_HEADER_SIZE + 4096) as u32,
        executor: device.kind,
        cc_major: device.cc_major,
        cc_minor: device.cc_minor,
        mem_quota: quota,
        device_memory: device.total_memory,
        multiprocessors: device.multiprocessors,
        max_sessions: limits.max_sessions,
        name: device.name.clone(),
        gpu,
    }
}

/// What [`plan_placement`] is asked to place: where (a GPU or [`Placement::Auto`]) and the
/// quota, when one is set (`None`: an even split of its GPU between the planned VMs that
/// have none).
pub type PlacementWish = (Placement, Option<u64>);

/// Places a batch of VMs at once, the way a daemon places its sockets at start: named GPUs
/// first; then the VMs with a quota, each on the GPU with the most memory not yet promised
/// (then the fewest VMs, then the lowest index); then the VMs without one, each on the GPU
/// with the fewest VMs (then the most memory not yet promised, then the lowest index),
/// which get the memory of their GPU divided by the planned VMs without a quota there.
/// `gpus` is what the GPUs hold already ([`Mediator::gpu_usage`]). Answers each VM's GPU
/// and quota in the order asked, or an error naming a GPU that is not there.
pub fn plan_placement(
    gpus: &[GpuUsage],
    wishes: &[PlacementWish],
) -> Result<Vec<(u32, u64)>, String> {
    struct Plan {
        index: u32,
        total: u64,
        committed: u64,
        vms: u32,
        even: u32,
    }
    let mut plan: Vec<Plan> = gpus
        .iter()
        .map(|g| Plan {
            index: g.index,
            total: g.device.total_memory,
            committed: g.quota_committed,
            vms: g.tenants,
            even: 0,
        })
        .collect();
    if plan.is_empty() {
        return Err("no GPU to place on".into());
    }
    let known: Vec<String> = plan.iter().map(|p| p.index.to_string()).collect();
    let mut chosen: Vec<Option<usize>> = vec![None; wishes.len()];
    let take = |slot: usize, quota: Option<u64>, plan: &mut [Plan]| {
        let p = &mut plan[slot];
        p.vms += 1;
        match quota {
            Some(q) => p.committed = p.committed.saturating_add(q),
            None => p.even += 1,
        }
    };
    for (i, (placement, quota)) in wishes.iter().enumerate() {
        if let Placement::Gpu(n) = placement {
            let slot = plan
                .iter()
                .position(|p| p.index == *n)
                .ok_or_else(|| format!("no GPU {n} (GPUs: {})", known.join(", ")))?;
            take(slot, *quota, &mut plan);
            chosen[i] = Some(slot);
        }
    }
    let free = |p: &Plan| p.total.saturating_sub(p.committed);
    for pass in [true, false] {
        for (i, (placement, quota)) in wishes.iter().enumerate() {
            if *placement != Placement::Auto || quota.is_some() != pass {
                continue;
            }
            let slot = (0..plan.len())
                .min_by(|&a, &b| {
                    let (a, b) = (&plan[a], &plan[b]);
                    let order = if pass {
                        free(b).cmp(&free(a)).then(a.vms.cmp(&b.vms))
                    } else {
                        a.vms.cmp(&b.vms).then(free(b).cmp(&free(a)))
                    };
                    order.then(a.index.cmp(&b.index))
                })
                .unwrap_or(0);
            take(slot, *quota, &mut plan);
            chosen[i] = Some(slot);
        }
    }
    Ok(wishes
        .iter()
        .zip(chosen)
        .map(|((_, quota), slot)| {
            let p = &plan[slot.unwrap_or(0)];
            let quota = quota.unwrap_or(p.total / u64::from(p.even.max(1)));
            (p.index, quota)
        })
        .collect())
}
