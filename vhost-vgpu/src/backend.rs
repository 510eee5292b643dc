// SPDX-License-Identifier: Apache-2.0
//! The vhost-user backend of one VM's vGPU device.
//!
//! The vring worker thread pops request chains, checks each one whole
//! ([`crate::chain::Chain::parse`]), decodes it with `vgpu-protocol` and hands it to the
//! mediator without waiting. The mediator answers through a [`CompletionQueue`] whose
//! eventfd is registered with the same worker's epoll loop (as [`COMPLETION_EVENT`]); the
//! worker then writes each response into the chain's writable buffers and returns the
//! chain to the guest. Nothing a guest puts in the queue makes `handle_event` fail: a
//! malformed chain is answered with an error status, or returned with nothing written
//! when it cannot even hold a response.
//!
//! With a polling window ([`VgpuBackend::set_poll`], `--poll-us`), the worker does not go
//! back to epoll as soon as a kick or a completion has been handled: it keeps looking at
//! the available ring and at the completion queue until the window passes without work,
//! with the guest's kicks suppressed meanwhile. Before it sleeps it turns kicks back on and
//! looks at the ring once more, so a chain published while kicks were off is never left
//! waiting for a kick that will not come. Interrupts to the guest are unchanged.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vgpu_mediator::{request_cost, CompletionQueue, GuestIo, HoldError, Mediator, TenantId};
use vgpu_protocol::{
    Command, Header, Op, Request, Response, ResponseHeader, Status, CONFIG_SIZE,
    REQUEST_HEADER_SIZE, RESPONSE_HEADER_SIZE,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::{host_mapping, write_regions, AccessError, Chain, Gate, GuestData, Region};
use crate::wait::wait_readable;

/// Virtqueues the device has (QEMU's `num_vqs` must not exceed it).
pub const NUM_QUEUES: usize = 1;
/// Largest virtqueue the device accepts (QEMU's `vq_size` must not exceed it).
pub const QUEUE_SIZE: usize = 1024;
/// epoll event of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// epoll event of the completion eventfd: the first value above the ones vhost-user-backend
/// reserves (one per queue, then its exit event).
pub const COMPLETION_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// How long a stopped ring waits for requests already handed to the mediator.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time one polling round keeps the worker away from epoll, however busy the ring
/// (unless the polling window itself is longer). The worker holds the backend while it
/// polls: vhost-user messages from QEMU wait for the round to end.
pub const POLL_ROUND_LIMIT: Duration = Duration::from_millis(2);

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
type GuestMemoryGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// A request handed to the mediator: where its answer goes.
struct InFlight {
    head: u16,
    writable: Vec<Region>,
    writable_len: u64,
}

/// What became of a chain taken from the queue.
enum Taken {
    /// Answered, returned, or handed to the mediator.
    Done,
    /// Put back on the queue: the VM's byte budget has no room for it until requests in
    /// flight complete.
    PutBack,
}

/// Why a chain got an error status instead of reaching the mediator.
struct Refusal {
    status: Status,
    why: String,
}

impl Refusal {
    fn new(status: Status, why: impl Into<String>) -> Refusal {
        Refusal {
            status,
            why: why.into(),
        }
    }
}

/// The read end of an exit pipe given to vhost-user-backend. Version 0.24 adds it to the
/// vring worker's epoll with `into_raw_fd()` and never closes it: one descriptor lost per
/// connection, which a daemon serving VMs for months would run out of. The backend keeps
/// what identifies the pipe so that it can close it once the worker is gone, and only if
/// the descriptor still is that pipe.
struct ExitPipe {
    fd: RawFd,
    dev: u64,
    ino: u64,
}

impl ExitPipe {
    /// A new pipe as a (consumer, notifier) pair.
    fn create() -> io::Result<(EventConsumer, EventNotifier, ExitPipe)> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nothing else.
        let (consumer, notifier) = unsafe {
            (
                EventConsumer::from_raw_fd(fds[0]),
                EventNotifier::from_raw_fd(fds[1]),
            )
        };
        let (dev, ino) = fifo_identity(fds[0]).ok_or_else(io::Error::last_os_error)?;
        Ok((
            consumer,
            notifier,
            ExitPipe {
                fd: fds[0],
                dev,
                ino,
            },
        ))
    }

    /// Closes the descriptor if it still is this pipe.
    fn close(self) {
        if fifo_identity(self.fd) == Some((self.dev, self.ino)) {
            // SAFETY: the descriptor is the pipe created above, which vhost-user-backend
            // gave up without closing; nothing else refers to it once its worker is gone.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// Device and inode of `fd` if it is a pipe.
fn fifo_identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain data, filled in by fstat before it is read.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    Some((stat.st_dev, stat.st_ino))
}

/// The device of one VM: one request queue, served by one tenant of the mediator.
pub struct VgpuBackend {
    name: String,
    mediator: Arc<Mediator>,
    tenant: TenantId,
    config: [u8; CONFIG_SIZE],
    completions: Arc<CompletionQueue>,
    mem: Option<GuestMemory>,
    event_idx: bool,
    inflight: HashMap<u64, InFlight>,
    /// Lets the requests in flight read and write the guest's buffers in place.
    gate: Arc<Gate>,
    next_token: u64,
    /// Chains were left on the queue because too much is in flight (too many requests,
    /// or the VM's byte budget in the mediator is spent); take them once completions free
    /// room.
    throttled: bool,
    /// The guest published an available index more than a queue ahead: nothing more is
    /// taken from the ring until the device is reset or the ring restarted.
    ring_broken: bool,
    used_since_signal: bool,
    /// The request queue, kept to finish in-flight requests when the ring is stopped.
    vring: Option<VringRwLock>,
    stop_timeout: Duration,
    exit_pipes: Mutex<Vec<ExitPipe>>,
    /// How long the worker keeps polling after its last useful work; zero: it does not poll.
    poll: Duration,
    /// Kicks were turned off for polling and must be turned back on before the worker
    /// sleeps.
    kicks_off: bool,
}

impl VgpuBackend {
    /// A device for `tenant`, which must exist in `mediator`.
    pub fn new(mediator: Arc<Mediator>, tenant: TenantId) -> io::Result<VgpuBackend> {
        let missing = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("tenant {} is not in the mediator", tenant.0),
            )
        };
        let name = mediator.tenant_config(tenant).ok_or_else(missing)?.name;
        let config = mediator.device_config(tenant).ok_or_else(missing)?.encode();
        Ok(VgpuBackend {
            name,
            mediator,
            tenant,
            config,
            completions: CompletionQueue::new()?,
            mem: None,
            event_idx: false,
            inflight: HashMap::new(),
            gate: Gate::open(),
            next_token: 1,
            throttled: false,
            ring_broken: false,
            used_since_signal: false,
            vring: None,
            stop_timeout: STOP_TIMEOUT,
            exit_pipes: Mutex::new(Vec::new()),
            poll: Duration::ZERO,
            kicks_off: false,
        })
    }

    /// After handling a kick or a completion, keep looking for new chains and finished
    /// requests until `window` passes without any (each polling round ends after at most
    /// [`POLL_ROUND_LIMIT`] or `window`, whichever is longer). Zero (the default) turns
    /// polling off.
    pub fn set_poll(&mut self, window: Duration) {
        self.poll = window;
    }

    fn polling(&self) -> bool {
        !self.poll.is_zero()
    }

    /// How long a stopped ring waits for the requests in flight before it answers them
    /// `INTERNAL` and cancels those still queued (default [`STOP_TIMEOUT`]).
    pub fn set_stop_timeout(&mut self, timeout: Duration) {
        self.stop_timeout = timeout;
    }

    /// The eventfd to register with the vring worker's epoll as [`COMPLETION_EVENT`].
    pub fn completion_fd(&self) -> RawFd {
        self.completions.eventfd().as_raw_fd()
    }

    /// Closes the exit descriptors vhost-user-backend leaves open. Call after the
    /// `VhostUserDaemon` that served this backend is dropped (its vring worker is then gone).
    pub fn close_exit_events(&self) {
        let pipes = std::mem::take(&mut *self.exit_pipes.lock().unwrap_or_else(|e| e.into_inner()));
        for pipe in pipes {
            pipe.close();
        }
    }

    /// Requests handed to the mediator and not yet answered.
    pub fn requests_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Takes the chains the guest made available; returns whether it took any.
    fn process_queue(&mut self, vring: &VringRwLock) -> bool {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            warn!(
                "{}: request queue kicked before any memory table",
                self.name
            );
            return false;
        };
        if self.ring_broken {
            return false;
        }
        let mut taken = 0;
        if self.polling() {
            // Kicks stay off while the worker polls; `rearm` turns them back on.
            self.suppress_kicks(vring);
            taken += self.pop_requests(vring, &mem);
        } else if self.event_idx {
            // The queue reads the available index once per pop; keep going until the guest
            // has added nothing since notifications were re-enabled.
            loop {
                if let Err(e) = vring.disable_notification() {
                    warn!("{}: disabling notifications: {e}", self.name);
                }
                taken += self.pop_requests(vring, &mem);
                if self.throttled || self.ring_broken {
                    // Notifications stay off; completions resume the queue.
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        warn!("{}: enabling notifications: {e}", self.name);
                        break;
                    }
                }
            }
        } else {
            taken += self.pop_requests(vring, &mem);
        }
        self.signal_guest(vring);
        taken > 0
    }

    /// Keeps handling new chains and finished requests until the polling window passes
    /// without either, or the round's limit is reached. Kicks are off meanwhile; the caller
    /// turns them back on with [`VgpuBackend::rearm`].
    fn poll(&mut self, vring: &VringRwLock) {
        let window = self.poll;
        let limit = window.max(POLL_ROUND_LIMIT);
        let start = Instant::now();
        let mut last_work = start;
        self.suppress_kicks(vring);
        loop {
            let mut worked = false;
            if !self.completions.is_empty() {
                worked |= self.process_completions(vring);
            }
            if self.kicks_off && !self.throttled && !self.ring_broken && self.ring_has_chains(vring)
            {
                worked |= self.process_queue(vring);
            }
            // A vDSO clock read, no system call.
            let now = Instant::now();
            if worked {
                last_work = now;
            } else if now.duration_since(last_work) >= window {
                break;
            }
            if now.duration_since(start) >= limit {
                break;
            }
            std::hint::spin_loop();
        }
    }

    /// Turns the guest's kicks off for polling, when the ring is in use.
    fn suppress_kicks(&mut self, vring: &VringRwLock) {
        if self.kicks_off || self.ring_broken || !ring_live(vring) {
            return;
        }
        // With EVENT_IDX this writes nothing: the guest kicks at most once more (for the
        // first chain past the avail event last written), and none after that until the
        // avail event is written again by `rearm`.
        if let Err(e) = vring.disable_notification() {
            warn!("{}: disabling notifications: {e}", self.name);
        }
        self.kicks_off = true;
    }

    /// Turns kicks back on before the worker sleeps, then reads the available index once
    /// more (after a full fence, in `enable_notification`): a chain the guest published
    /// while kicks were off is taken now, and the check repeated, instead of waiting for a
    /// kick that will not come. A chain published later is kicked.
    ///
    /// Kicks are turned back on even when QEMU stopped or disabled the ring meanwhile: the
    /// ring's memory outlives the stop (a restarted ring, a migrated guest), and a device
    /// that starts on it must get kicks.
    fn rearm(&mut self, vring: &VringRwLock) {
        if !std::mem::take(&mut self.kicks_off) {
            return;
        }
        loop {
            match vring.enable_notification() {
                Ok(true) if !self.throttled && !self.ring_broken && ring_live(vring) => {
                    let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
                        return;
                    };
                    // Kicks stay on: one that comes meanwhile only wakes the worker once more.
                    let taken = self.pop_requests(vring, &mem);
                    self.signal_guest(vring);
                    if taken == 0 {
                        // Too much in flight (completions resume the queue) or a ring that
                        // cannot be read: no point in looking again.
                        return;
                    }
                }
                // Nothing new; or chains wait for room, which completions make (their
                // eventfd wakes the worker).
                Ok(_) => return,
                Err(e) => {
                    warn!("{}: enabling notifications: {e}", self.name);
                    return;
                }
            }
        }
    }

    /// Whether the guest published chains the device has not taken yet: one load of the
    /// available index, without taking the vring for writing.
    fn ring_has_chains(&self, vring: &VringRwLock) -> bool {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return false;
        };
        let state = vring.get_ref();
        let queue = state.get_queue();
        if !(state.is_enabled() && queue.ready()) {
            return false;
        }
        match queue.avail_idx(&*mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != queue.next_avail(),
            // `pop_requests` reports it.
            Err(_) => true,
        }
    }

    /// Takes chains until the ring is empty or too much is in flight; returns how many it
    /// took (answered, returned or handed to the mediator).
    fn pop_requests(&mut self, vring: &VringRwLock, mem: &GuestMemoryGuard) -> usize {
        let queue_size = usize::from(vring.get_ref().get_queue().size());
        let mut taken = 0;
        loop {
            if self.inflight.len() >= queue_size {
                if !self.throttled {
                    debug!(
                        "{}: {} requests in flight; pausing the queue",
                        self.name,
                        self.inflight.len(),
                    );
                }
                self.throttled = true;
                return taken;
            }
            // Not pop_descriptor_chain: it hides a broken available index as "empty",
            // which with EVENT_IDX re-arms forever and spins this thread.
            let popped = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
                Ok(mut available) => available.next(),
                Err(e) => {
                    warn!(
                        "{}: the guest broke its request ring ({e}); ignoring it until reset",
                        self.name
                    );
                    self.ring_broken = true;
                    return taken;
                }
            };
            let Some(descriptors) = popped else {
                return taken;
            };
            if let Taken::PutBack = self.handle_chain(vring, mem, descriptors, queue_size) {
                vring.get_mut().get_queue_mut().go_to_previous_position();
                self.throttled = true;
                return taken;
            }
            taken += 1;
        }
    }

    fn handle_chain(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryGuard,
        descriptors: DescriptorChain<GuestMemoryGuard>,
        max_descriptors: usize,
    ) -> Taken {
        let head = descriptors.head_index();
        let chain = match Chain::parse(descriptors, mem, max_descriptors) {
            Ok(chain) => chain,
            Err(e) => {
                warn!("{}: chain {head} returned unanswered: {e}", self.name);
                self.add_used(vring, head, 0);
                return Taken::Done;
            }
        };
        if chain.writable_len < RESPONSE_HEADER_SIZE as u64 {
            warn!(
                "{}: chain {head} returned unanswered: {} writable bytes, the response header \
                 needs {RESPONSE_HEADER_SIZE}",
                self.name, chain.writable_len
            );
            self.add_used(vring, head, 0);
            return Taken::Done;
        }
        // The budget is reserved before the payload is copied out of the guest.
        let decoded = decode_header(mem, &chain).and_then(|header| {
            match self.mediator.hold(self.tenant, request_cost(&header)) {
                Ok(hold) => Ok(Some((header, hold))),
                // Completions of our own requests will make room: wait for them.
                Err(HoldError::OverBudget { .. }) if !self.inflight.is_empty() => Ok(None),
                Err(e) => Err(Refusal::new(e.response().status, e.to_string())),
            }
        });
        let (header, hold) = match decoded {
            Ok(Some(held)) => held,
            Ok(None) => return Taken::PutBack,
            Err(refusal) => {
                self.refuse(vring, mem, head, &chain, refusal);
                return Taken::Done;
            }
        };
        match decode_payload(&self.gate, mem, &chain, &header) {
            Ok((request, io)) => {
                let token = self.next_token;
                self.next_token += 1;
                self.inflight.insert(
                    token,
                    InFlight {
                        head,
                        writable: chain.writable,
                        writable_len: chain.writable_len,
                    },
                );
                self.mediator.submit_io(
                    self.tenant,
                    request,
                    io,
                    token,
                    self.completions.clone(),
                    hold,
                );
            }
            Err(refusal) => self.refuse(vring, mem, head, &chain, refusal),
        }
        Taken::Done
    }

    /// Answers a chain with the refusal's status and returns it to the guest.
    fn refuse(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryGuard,
        head: u16,
        chain: &Chain,
        refusal: Refusal,
    ) {
        warn!(
            "{}: chain {head} answered {}: {}",
            self.name, refusal.status, refusal.why
        );
        let response = Response::error(refusal.status, 0);
        let len = self.respond(mem, head, &chain.writable, chain.writable_len, &response);
        self.add_used(vring, head, len);
    }

    /// Answers the finished requests; returns whether it answered any or took new chains.
    fn process_completions(&mut self, vring: &VringRwLock) -> bool {
        let done = self.completions.drain();
        let mut worked = self.complete(vring, done) > 0;
        self.signal_guest(vring);
        if self.throttled {
            self.throttled = false;
            worked |= self.process_queue(vring);
        }
        worked
    }

    /// Writes the responses of finished requests back into their chains; returns how many
    /// chains it returned.
    fn complete(&mut self, vring: &VringRwLock, done: Vec<(u64, Response)>) -> usize {
        if done.is_empty() {
            return 0;
        }
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return 0;
        };
        let mut answered = 0;
        for (token, response) in done {
            let Some(request) = self.inflight.remove(&token) else {
                debug!(
                    "{}: completion {token} is for no request in flight",
                    self.name
                );
                continue;
            };
            let len = self.respond(
                &mem,
                request.head,
                &request.writable,
                request.writable_len,
                &response,
            );
            self.add_used(vring, request.head, len);
            answered += 1;
        }
        answered
    }

    /// Writes `response` into a chain's writable buffers; returns the used length.
    fn respond(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        writable: &[Region],
        writable_len: u64,
        response: &Response,
    ) -> u32 {
        match write_response(mem, writable, writable_len, response) {
            Ok(len) => len,
            Err(e) => {
                // The chain was checked when it was taken; the memory table changed since.
                warn!("{}: response to chain {head} not written: {e}", self.name);
                0
            }
        }
    }

    fn add_used(&mut self, vring: &VringRwLock, head: u16, len: u32) {
        match vring.add_used(head, len) {
            Ok(()) => self.used_since_signal = true,
            Err(e) => warn!("{}: returning chain {head}: {e}", self.name),
        }
    }

    fn signal_guest(&mut self, vring: &VringRwLock) {
        if !std::mem::take(&mut self.used_since_signal) {
            return;
        }
        let needed = vring.needs_notification().unwrap_or_else(|e| {
            warn!("{}: reading the used event: {e}", self.name);
            true
        });
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                warn!("{}: signalling the guest: {e}", self.name);
            }
        }
    }

    fn forget_inflight(&mut self) {
        // Requests still running must not touch the guest's buffers any more.
        self.gate.close();
        self.gate = Gate::open();
        self.inflight.clear();
        self.throttled = false;
        self.ring_broken = false;
        self.kicks_off = false;
    }
}

/// Whether the device may take chains from the ring: QEMU started it (ready; it stops it
/// with GET_VRING_BASE) and enabled it.
fn ring_live(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Reads and checks the request header a checked chain carries, and that the chain's
/// sizes fit the request.
fn decode_header(mem: &GuestMemoryMmap, chain: &Chain) -> Result<Header, Refusal> {
    if chain.has_empty_descriptor {
        return Err(Refusal::new(
            Status::InvalidRequest,
            "a descriptor has length zero",
        ));
    }
    let mut header = [0u8; REQUEST_HEADER_SIZE];
    let present = chain.readable_len.min(REQUEST_HEADER_SIZE as u64) as usize;
    chain
        .read(mem, 0, &mut header[..present])
        .map_err(|e| Refusal::new(Status::InvalidRequest, e.to_string()))?;
    let header = Header::decode(&header[..present])
        .map_err(|e| Refusal::new(e.status(), format!("request header: {e}")))?;

    let expected = header
        .payload_len()
        .saturating_add(REQUEST_HEADER_SIZE as u64);
    if chain.readable_len != expected {
        return Err(Refusal::new(
            Status::InvalidRequest,
            format!(
                "{} readable bytes, the {:?} request needs exactly {expected}",
                chain.readable_len,
                header.op.opcode()
            ),
        ));
    }
    let capacity = chain.writable_len - RESPONSE_HEADER_SIZE as u64;
    if capacity < header.writable_len() {
        return Err(Refusal::new(
            Status::BufferTooSmall,
            format!(
                "{capacity} writable payload bytes, the {:?} request needs {}",
                header.op.opcode(),
                header.writable_len()
            ),
        ));
    }
    Ok(header)
}

/// Reads the payload of a chain whose header [`decode_header`] accepted and builds the
/// request. Copy data stays in the guest's buffers: an HTOD's source and a DTOH's
/// destination go to the executor as [`GuestIo`], read and written in place.
fn decode_payload(
    gate: &Arc<Gate>,
    mem: &GuestMemoryGuard,
    chain: &Chain,
    header: &Header,
) -> Result<(Request, Option<GuestIo>), Refusal> {
    let payload_len = header.payload_len();
    let in_place = |regions: &[Region], start: u64, len: u64| {
        GuestData::new(
            gate.clone(),
            mem.clone().into_inner(),
            regions.to_vec(),
            start,
            len,
        )
        .ok_or_else(|| {
            Refusal::new(
                Status::InvalidRequest,
                format!("{len} bytes at {start} do not fit the chain's buffers"),
            )
        })
    };
    match header.op {
        Op::Htod { dst, offset, .. } => {
            let source = in_place(&chain.readable, REQUEST_HEADER_SIZE as u64, payload_len)?;
            let request = Request {
                session: header.session,
                tag: header.tag,
                command: Command::Htod {
                    dst,
                    offset,
                    data: Vec::new(),
                },
            };
            return Ok((request, Some(GuestIo::Source(Arc::new(source)))));
        }
        Op::Dtoh { .. } => {
            let room = chain.writable_len - RESPONSE_HEADER_SIZE as u64;
            let sink = in_place(&chain.writable, 0, room)?;
            let request = Request::from_parts(header, &[])
                .map_err(|e| Refusal::new(e.status(), format!("request payload: {e}")))?;
            return Ok((request, Some(GuestIo::Sink(Arc::new(sink)))));
        }
        _ => {}
    }
    let mut payload = Vec::new();
    payload
        .try_reserve_exact(payload_len as usize)
        .map_err(|_| {
            Refusal::new(
                Status::OutOfMemory,
                format!("no host memory for a {payload_len}-byte payload"),
            )
        })?;
    chain
        .append(mem, REQUEST_HEADER_SIZE as u64, payload_len, &mut payload)
        .map_err(|e| Refusal::new(Status::InvalidRequest, e.to_string()))?;
    let request = Request::from_parts(header, &payload)
        .map_err(|e| Refusal::new(e.status(), format!("request payload: {e}")))?;
    // A host buffer: the pieces of the VM's memory files that hold it.
    if let Command::HostRegister { chunks, .. } = &request.command {
        let mapping = host_mapping(mem, chunks).ok_or_else(|| {
            Refusal::new(
                Status::InvalidArgument,
                "a host buffer chunk is not inside the VM's memory",
            )
        })?;
        return Ok((request, Some(GuestIo::Map(mapping))));
    }
    Ok((request, None))
}

/// Writes the response data at the start of the writable buffers and the response header
/// into their last [`RESPONSE_HEADER_SIZE`] bytes. Returns the bytes written.
fn write_response(
    mem: &GuestMemoryMmap,
    writable: &[Region],
    writable_len: u64,
    response: &Response,
) -> Result<u32, AccessError> {
    let capacity = writable_len - RESPONSE_HEADER_SIZE as u64;
    let (header, data) = if response.data.len() as u64 + u64::from(response.placed) > capacity {
        error!(
            "the mediator answered {} bytes for a {capacity}-byte buffer",
            response.data.len()
        );
        let header = ResponseHeader {
            status: Status::BufferTooSmall,
            detail: 0,
            value0: 0,
            value1: 0,
            written: 0,
        };
        (header, &[][..])
    } else {
        (response.header(), response.data.as_slice())
    };
    write_regions(mem, writable, 0, data)?;
    write_regions(mem, writable, capacity, &header.encode())?;
    // `written` counts data placed in the buffers by the executor as well.
    Ok(header.written.saturating_add(RESPONSE_HEADER_SIZE as u32))
}

impl VhostUserBackendMut for VgpuBackend {
    type Vring = VringRwLock;
    type Bitmap = ();

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads the config space from us (`config_size`). REPLY_ACK: QEMU
        // waits until a new memory table is mapped before it uses it.
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // vhost already refuses reads past its 4 KiB config limit; stay bounded regardless.
        if size > vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE {
            return Vec::new();
        }
        // As the VM's tenant is now (its quota may have changed since the device was
        // made); the config from the device's creation if the tenant is gone.
        let config = self
            .mediator
            .device_config(self.tenant)
            .map_or(self.config, |c| c.encode());
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SIZE);
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn update_memory(&mut self, mem: GuestMemory) -> io::Result<()> {
        // In-flight requests hold guest addresses only; their answers are written through
        // whatever table is current when they complete.
        self.mem = Some(mem);
        Ok(())
    }

    fn reset_device(&mut self) {
        info!("{}: device reset: its sessions are closed", self.name);
        self.forget_inflight();
        self.mediator.reset_tenant(self.tenant);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match ExitPipe::create() {
            Ok((consumer, notifier, pipe)) => {
                self.exit_pipes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pipe);
                Some((consumer, notifier))
            }
            Err(e) => {
                error!("{}: exit eventfd: {e}", self.name);
                None
            }
        }
    }

    fn stop_vring(&mut self, _queue_index: u32) -> io::Result<()> {
        // QEMU reads the ring position once this returns: answer what the guest already
        // handed over, so that nothing is lost across a stop and restart.
        self.throttled = false;
        self.ring_broken = false;
        let Some(vring) = self.vring.clone() else {
            self.forget_inflight();
            return Ok(());
        };
        let deadline = Instant::now() + self.stop_timeout;
        let fd = self.completion_fd();
        while !self.inflight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match wait_readable(&[fd], Some(left)) {
                Ok(Some(_)) => {
                    let done = self.completions.drain();
                    self.complete(&vring, done);
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("{}: waiting for completions: {e}", self.name);
                    break;
                }
            }
        }
        if !self.inflight.is_empty() {
            warn!(
                "{}: {} requests still running {:?} after the ring stopped; answering them {}",
                self.name,
                self.inflight.len(),
                self.stop_timeout,
                Status::Internal
            );
            let abandoned: Vec<(u64, Response)> = self
                .inflight
                .keys()
                .map(|&token| (token, Response::error(Status::Internal, 0)))
                .collect();
            self.complete(&vring, abandoned);
            // Nobody waits for them now: drop the queued ones unexecuted. Their bytes and
            // the running one's stay counted against the VM's budget until released.
            self.mediator.cancel_queued(self.tenant);
        }
        self.forget_inflight();
        self.signal_guest(&vring);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An Err here would end the vring worker for the rest of the connection: every
        // failure below is logged and handled instead.
        if !evset.contains(EventSet::IN) {
            debug!("{}: event {device_event} with {evset:?}", self.name);
        }
        let Some(vring) = vrings.first() else {
            warn!("{}: event {device_event} without a vring", self.name);
            return Ok(());
        };
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let worked = match device_event {
            REQUEST_QUEUE => self.process_queue(vring),
            COMPLETION_EVENT => self.process_completions(vring),
            other => {
                warn!("{}: unexpected event {other}", self.name);
                false
            }
        };
        if self.polling() {
            if worked {
                self.poll(vring);
            }
            self.rearm(vring);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};

    use vgpu_mediator::cpu::CpuExecutorFactory;
    use vgpu_mediator::{Limits, TenantConfig};
    use vgpu_protocol::{DeviceConfig, InfoReply, INFO_SIZE};
    use vgpu_protocol::{Launch, Param, BUILTIN_MODULE};
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    const RAM: u64 = 16 << 20;
    const DATA_START: u64 = 1 << 20;
    /// What unwritten guest buffers hold, to prove nothing was written.
    const UNTOUCHED: u8 = 0xa5;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    /// One buffer of a test chain.
    enum Buf {
        Read(Vec<u8>),
        Write(u32),
    }

    /// A guest-physical range the device may write.
    type Span = (u64, u32);

    /// A memfd of `RAM` bytes.
    fn ram_file() -> File {
        vgpu_mediator::hostmap::memfd(c"vgpu-test-ram", RAM).unwrap()
    }

    /// A memory table for `ram`: two regions, the second starting at `RAM / 2`.
    fn map_ram(ram: &File) -> GuestMemoryMmap {
        let half = (RAM / 2) as usize;
        let region = |at: u64| {
            let file = ram.try_clone().unwrap();
            (
                GuestAddress(at),
                half,
                Some(vm_memory::FileOffset::new(file, at)),
            )
        };
        GuestMemoryMmap::from_ranges_with_files([region(0), region(RAM / 2)]).unwrap()
    }

    /// The rings of a test queue as the guest sees them, usable from another thread.
    #[derive(Clone)]
    struct Ring {
        mem: GuestMemory,
        avail: u64,
        used: u64,
        queue_size: u16,
    }

    impl Ring {
        /// Makes the chain at `head` available as entry `idx` (without kicking).
        fn publish(&self, idx: u16, head: u16) {
            let m = self.mem.memory();
            let slot = u64::from(idx % self.queue_size);
            m.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            m.store(
                idx.wrapping_add(1),
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem
                .memory()
                .load(GuestAddress(self.used + 2), Ordering::Acquire)
                .unwrap()
        }

        /// Waits up to 5 s for the used index to reach `idx`.
        fn wait_used(&self, idx: u16) -> bool {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.used_idx() == idx {
                    return true;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            false
        }

        /// Whether the guest must kick after publishing the entry at `avail_idx` (the
        /// driver's side of notification suppression).
        fn wants_kick(&self, event_idx: bool, avail_idx: u16) -> bool {
            let m = self.mem.memory();
            std::sync::atomic::fence(Ordering::SeqCst);
            if event_idx {
                let at = self.used + 4 + 8 * u64::from(self.queue_size);
                let avail_event: u16 = m.load(GuestAddress(at), Ordering::Acquire).unwrap();
                // vring_need_event(avail_event, avail_idx + 1, avail_idx)
                avail_event == avail_idx
            } else {
                let flags: u16 = m.load(GuestAddress(self.used), Ordering::Acquire).unwrap();
                flags & VRING_USED_F_NO_NOTIFY as u16 == 0
            }
        }
    }

    /// A guest with one virtqueue in front of a backend served by a CPU mediator.
    struct Guest {
        /// The guest's RAM: two memory regions of one memfd, so buffers can straddle them.
        ram: File,
        mem: GuestMemory,
        vring: VringRwLock,
        call: EventFd,
        backend: VgpuBackend,
        mediator: Arc<Mediator>,
        tenant: TenantId,
        queue_size: u16,
        desc_table: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        next_data: u64,
        avail_idx: u16,
        used_seen: u16,
    }

    impl Guest {
        fn new(queue_size: u16) -> Guest {
            Guest::with_limits(queue_size, Limits::default())
        }

        fn with_limits(queue_size: u16, limits: Limits) -> Guest {
            let _ = env_logger::builder().is_test(true).try_init();
            let mediator = Mediator::with_limits(Arc::new(CpuExecutorFactory::new()), limits);
            let tenant = mediator
                .add_tenant(TenantConfig {
                    name: "vm-test".into(),
                    mem_quota: 64 << 20,
                    weight: 100,
                })
                .unwrap();
            let ram = ram_file();
            let mem = GuestMemoryAtomic::new(map_ram(&ram));
            let (desc_table, avail, used) = {
                let m = mem.memory();
                let vq = MockSplitQueue::create(&*m, GuestAddress(0), queue_size);
                (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            };
            let vring = VringRwLock::new(mem.clone(), queue_size).unwrap();
            vring.set_queue_size(queue_size);
            vring.set_queue_info(desc_table, avail, used).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            let call_file = call.try_clone().unwrap().into_raw_fd();
            // SAFETY: the fd was just duplicated and is owned by nothing else.
            vring.set_call(Some(unsafe { File::from_raw_fd(call_file) }));
            vring.set_enabled(true);
            vring.set_queue_ready(true);

            let mut backend = VgpuBackend::new(mediator.clone(), tenant).unwrap();
            backend.update_memory(mem.clone()).unwrap();
            Guest {
                ram,
                mem,
                vring,
                call,
                backend,
                mediator,
                tenant,
                queue_size,
                desc_table,
                avail,
                used,
                next_desc: 0,
                next_data: DATA_START,
                avail_idx: 0,
                used_seen: 0,
            }
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let len = len.next_multiple_of(16).max(16);
            if self.next_data + len > RAM {
                self.next_data = DATA_START;
            }
            let addr = self.next_data;
            self.next_data += len;
            addr
        }

        /// Guest memory holding `bytes`.
        fn data(&mut self, bytes: &[u8]) -> u64 {
            let addr = self.alloc(bytes.len() as u64);
            self.mem
                .memory()
                .write_slice(bytes, GuestAddress(addr))
                .unwrap();
            addr
        }

        /// Guest memory of `len` bytes, filled with [`UNTOUCHED`].
        fn space(&mut self, len: u32) -> u64 {
            self.data(&vec![UNTOUCHED; len as usize])
        }

        /// `n` consecutive free descriptor indices.
        fn descs(&mut self, n: u16) -> u16 {
            if self.next_desc + n > self.queue_size {
                self.next_desc = 0;
            }
            let first = self.next_desc;
            self.next_desc += n;
            first
        }

        fn store(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mem
                .memory()
                .write_obj(desc, GuestAddress(table + 16 * u64::from(index)))
                .unwrap();
        }

        /// Places `bufs` as one chain in `table` from index `first`; returns what the device
        /// may write.
        fn lay_out(&mut self, table: u64, first: u16, bufs: &[Buf]) -> Vec<Span> {
            let mut writable = Vec::new();
            for (i, buf) in bufs.iter().enumerate() {
                let index = first + i as u16;
                let last = i + 1 == bufs.len();
                let (addr, len, mut flags) = match buf {
                    Buf::Read(bytes) => (self.data(bytes), bytes.len() as u32, 0),
                    Buf::Write(len) => {
                        let addr = self.space(*len);
                        writable.push((addr, *len));
                        (addr, *len, WRITE)
                    }
                };
                if !last {
                    flags |= NEXT;
                }
                self.store(table, index, addr, len, flags, index + 1);
            }
            writable
        }

        fn ring(&self) -> Ring {
            Ring {
                mem: self.mem.clone(),
                avail: self.avail,
                used: self.used,
                queue_size: self.queue_size,
            }
        }

        /// Turns host polling on with `window`, and EVENT_IDX on both sides with `event_idx`.
        fn polling(mut self, window: Duration, event_idx: bool) -> Guest {
            self.backend.set_poll(window);
            if event_idx {
                self.backend.set_event_idx(true);
                self.vring.set_queue_event_idx(true);
            }
            self
        }

        /// An INFO chain laid out but not published: its head and writable spans.
        fn info_chain(&mut self) -> (u16, Vec<Span>) {
            let bufs = [Buf::Read(header_bytes(Command::Info)), Buf::Write(192 + 32)];
            let head = self.descs(bufs.len() as u16);
            let writable = self.lay_out(self.desc_table, head, &bufs);
            (head, writable)
        }

        /// Makes the chain at `head` available to the device.
        fn publish(&mut self, head: u16) {
            let m = self.mem.memory();
            let slot = u64::from(self.avail_idx % self.queue_size);
            m.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Publishes `bufs` as one direct chain.
        fn post(&mut self, bufs: &[Buf]) -> (u16, Vec<Span>) {
            let head = self.descs(bufs.len() as u16);
            let writable = self.lay_out(self.desc_table, head, bufs);
            self.publish(head);
            (head, writable)
        }

        /// Publishes `bufs` through an indirect table.
        fn post_indirect(&mut self, bufs: &[Buf]) -> (u16, Vec<Span>) {
            let table = self.alloc(16 * bufs.len() as u64);
            let writable = self.lay_out(table, 0, bufs);
            let head = self.descs(1);
            self.store(
                self.desc_table,
                head,
                table,
                16 * bufs.len() as u32,
                INDIRECT,
                0,
            );
            self.publish(head);
            (head, writable)
        }

        fn kick(&mut self) {
            let vrings = [self.vring.clone()];
            self.backend
                .handle_event(REQUEST_QUEUE, EventSet::IN, &vrings, 0)
                .unwrap();
        }

        /// Waits for the mediator to answer and lets the backend write the answers back.
        fn complete(&mut self) {
            let fd = self.backend.completion_fd();
            let ready = wait_readable(&[fd], Some(Duration::from_secs(10))).unwrap();
            assert_eq!(ready, Some(0), "no completion within 10 s");
            let vrings = [self.vring.clone()];
            self.backend
                .handle_event(COMPLETION_EVENT, EventSet::IN, &vrings, 0)
                .unwrap();
        }

        /// Used entries added since the last call: (head, length).
        fn used(&mut self) -> Vec<(u32, u32)> {
            let m = self.mem.memory();
            let idx: u16 = m.read_obj(GuestAddress(self.used + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen != idx {
                let slot = u64::from(self.used_seen % self.queue_size);
                let at = self.used + 4 + 8 * slot;
                let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
                out.push((id, len));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }

        /// Kicks, lets the mediator answer if needed, and returns the chain's used length.
        /// (After host polling the completion eventfd may be readable with nothing left to
        /// answer: one wake-up more.)
        fn finish(&mut self, head: u16) -> u32 {
            self.kick();
            for _ in 0..3 {
                let used = self.used();
                if let Some(&(id, len)) = used.first() {
                    assert_eq!(used.len(), 1, "one chain posted, {used:?} returned");
                    assert_eq!(id, u32::from(head));
                    return len;
                }
                self.complete();
            }
            panic!("chain {head} was not returned");
        }

        fn read_span(&self, writable: &[Span], offset: u64, len: usize) -> Vec<u8> {
            let regions: Vec<Region> = writable
                .iter()
                .map(|&(addr, len)| Region {
                    addr: GuestAddress(addr),
                    len: u64::from(len),
                })
                .collect();
            let chain = Chain {
                readable: regions,
                ..Chain::default()
            };
            let mut out = vec![0; len];
            chain.read(&self.mem.memory(), offset, &mut out).unwrap();
            out
        }

        fn response(&self, writable: &[Span]) -> ResponseHeader {
            let total: u64 = writable.iter().map(|&(_, l)| u64::from(l)).sum();
            let bytes = self.read_span(writable, total - 32, 32);
            ResponseHeader::decode(&bytes).unwrap()
        }

        fn untouched(&self, writable: &[Span]) -> bool {
            writable.iter().all(|&(addr, len)| {
                let mut b = vec![0; len as usize];
                self.mem
                    .memory()
                    .read_slice(&mut b, GuestAddress(addr))
                    .unwrap();
                b.iter().all(|&x| x == UNTOUCHED)
            })
        }

        /// Sends `request` with `payload_room` writable payload bytes; returns the used
        /// length, the response header and the writable payload.
        fn call(&mut self, request: &Request, payload_room: u32) -> (u32, ResponseHeader, Vec<u8>) {
            let mut bufs = vec![Buf::Read(request.encode())];
            if payload_room > 0 {
                bufs.push(Buf::Write(payload_room));
            }
            bufs.push(Buf::Write(32));
            self.call_bufs(&bufs)
        }

        fn call_bufs(&mut self, bufs: &[Buf]) -> (u32, ResponseHeader, Vec<u8>) {
            let (head, writable) = self.post(bufs);
            let len = self.finish(head);
            let header = self.response(&writable);
            let payload = self.read_span(&writable, 0, header.written as usize);
            (len, header, payload)
        }

        /// Posts `bufs`, which the device must return unanswered and unwritten.
        fn expect_unanswered(&mut self, bufs: &[Buf]) {
            let (head, writable) = self.post(bufs);
            assert_eq!(self.finish(head), 0);
            assert!(self.untouched(&writable));
        }

        /// Posts `bufs`, which the device must answer with `status` alone.
        fn expect_status(&mut self, bufs: &[Buf], status: Status) {
            let (len, header, _) = self.call_bufs(bufs);
            assert_eq!((len, header.status, header.written), (32, status, 0));
        }

        /// The device still answers a good request.
        fn expect_healthy(&mut self) {
            let (_, header, payload) = self.call(&Request::new(0, Command::Info), 192);
            assert_eq!(header.status, Status::Ok);
            assert_eq!(payload.len(), INFO_SIZE);
            assert_eq!(self.backend.requests_in_flight(), 0);
        }

        fn open_session(&mut self) -> u64 {
            let (_, header, _) = self.call(&Request::new(0, Command::SessionOpen), 0);
            assert_eq!(header.status, Status::Ok);
            assert_ne!(header.value0, 0);
            header.value0
        }
    }

    fn header_bytes(command: Command) -> Vec<u8> {
        Request::new(0, command).encode()
    }

    #[test]
    fn info_reports_the_config_space_and_the_tenant() {
        let mut g = Guest::new(64);
        let (len, header, payload) = g.call(&Request::new(0, Command::Info), 192);
        assert_eq!(len, 192 + 32);
        assert_eq!((header.status, header.written), (Status::Ok, 192));
        let info = InfoReply::decode(&payload).unwrap();
        assert_eq!(
            info.config,
            DeviceConfig::decode(&g.backend.config).unwrap()
        );
        assert_eq!(info.config.mem_quota, 64 << 20);
        assert_eq!(info.weight, 100);
        assert!(g.call.read().is_ok(), "the guest was not signalled");
    }

    #[test]
    fn sessions_memory_and_copies_round_trip_across_split_buffers() {
        let mut g = Guest::new(64);
        let session = g.open_session();

        let (_, header, _) = g.call(&Request::new(session, Command::Alloc { size: 4096 }), 0);
        assert_eq!(header.status, Status::Ok);
        let buffer = header.value0;

        // Host-to-device: the header and the data split at odd places over three buffers.
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let readable = Request::new(
            session,
            Command::Htod {
                dst: buffer,
                offset: 0,
                data: data.clone(),
            },
        )
        .encode();
        let (len, header, _) = g.call_bufs(&[
            Buf::Read(readable[..50].to_vec()),
            Buf::Read(readable[50..1000].to_vec()),
            Buf::Read(readable[1000..].to_vec()),
            Buf::Write(32),
        ]);
        assert_eq!((len, header.status), (32, Status::Ok));

        // Device-to-host: the data scattered over two buffers, the response header split
        // over the end of the second and a third.
        let dtoh = Request::new(
            session,
            Command::Dtoh {
                src: buffer,
                offset: 0,
                len: 4096,
            },
        );
        let (len, header, payload) = g.call_bufs(&[
            Buf::Read(dtoh.encode()),
            Buf::Write(1000),
            Buf::Write(3096 + 10),
            Buf::Write(22),
        ]);
        assert_eq!(
            (len, header.status, header.written),
            (4096 + 32, Status::Ok, 4096)
        );
        assert_eq!(payload, data);

        let (_, header, _) = g.call(&Request::new(session, Command::Sync), 0);
        assert_eq!(header.status, Status::Ok);
        assert_eq!(g.mediator.usage(g.tenant).unwrap().mem_used, 4096);
        let (_, header, _) = g.call(&Request::new(session, Command::SessionClose), 0);
        assert_eq!(header.status, Status::Ok);
        let usage = g.mediator.usage(g.tenant).unwrap();
        assert_eq!((usage.sessions, usage.mem_used), (0, 0));
    }

    #[test]
    fn copies_in_place_of_every_size_and_alignment_straddle_regions_and_table_changes() {
        let mut g = Guest::new(64);
        let session = g.open_session();
        let max = (1u64 << 20) + 4099;
        let (_, header, _) = g.call(&Request::new(session, Command::Alloc { size: max + 64 }), 0);
        assert_eq!(header.status, Status::Ok);
        let buffer = header.value0;
        let mut round = 0u32;
        for len in [1u64, 3, 8, 4095, 4096, 4097, 65_537, max] {
            for (dev_offset, straddle) in [(0u64, 0u64), (1, 1), (7, 4093), (61, len / 2)] {
                round += 1;
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u32).wrapping_mul(31).wrapping_add(round) as u8)
                    .collect();
                let htod = Request::new(
                    session,
                    Command::Htod {
                        dst: buffer,
                        offset: dev_offset,
                        data: data.clone(),
                    },
                )
                .encode();
                // The data starts `straddle` bytes before the boundary of the two memory
                // regions (and at odd addresses), split over two descriptors.
                let cut = REQUEST_HEADER_SIZE + (len as usize / 3);
                g.next_data = RAM / 2 - straddle.min(RAM / 4) - REQUEST_HEADER_SIZE as u64 - 16;
                let (head, writable) = g.post(&[
                    Buf::Read(htod[..cut].to_vec()),
                    Buf::Read(htod[cut..].to_vec()),
                    Buf::Write(32),
                ]);
                g.kick();
                // QEMU replaces the memory table while the copy is queued: same RAM, new
                // mappings. The old one stays mapped until the copy is done.
                if round % 2 == 0 {
                    // As vhost-user-backend does on SET_MEM_TABLE: the atomic every user
                    // shares gets the new table.
                    g.mem.lock().unwrap().replace(map_ram(&g.ram));
                    g.backend.update_memory(g.mem.clone()).unwrap();
                }
                assert_eq!(g.finish(head), 32, "len {len} offset {dev_offset}");
                assert_eq!(g.response(&writable).status, Status::Ok);

                let dtoh = Request::new(
                    session,
                    Command::Dtoh {
                        src: buffer,
                        offset: dev_offset,
                        len,
                    },
                );
                g.next_data = RAM / 2 - straddle.min(RAM / 4) - 7;
                let first = (len as u32 / 2).max(1);
                let (head, writable) = g.post(&[
                    Buf::Read(dtoh.encode()),
                    Buf::Write(first),
                    Buf::Write(len as u32 - first + 32),
                ]);
                let used = g.finish(head);
                let response = g.response(&writable);
                assert_eq!(
                    (used, response.status, response.written),
                    (len as u32 + 32, Status::Ok, len as u32),
                    "len {len} offset {dev_offset}"
                );
                assert!(
                    g.read_span(&writable, 0, len as usize) == data,
                    "len {len} offset {dev_offset} straddle {straddle}: data differs"
                );
            }
        }
    }

    #[test]
    fn registered_host_buffers_are_copied_in_place_and_checked() {
        use vgpu_protocol::HostChunk;
        let mut g = Guest::new(64);
        let session = g.open_session();
        let (_, header, _) = g.call(&Request::new(session, Command::Alloc { size: 1 << 20 }), 0);
        let buffer = header.value0;
        // A host buffer of 5 pages in two chunks, out of guest-physical order, the second
        // straddling the two memory regions: bytes 0..3 pages at RAM/2 - 4096, bytes
        // 3..5 pages at 2 MiB.
        let page = 4096u64;
        let chunks = vec![
            HostChunk {
                addr: RAM / 2 - page,
                len: 3 * page,
            },
            HostChunk {
                addr: 2 << 20,
                len: 2 * page,
            },
        ];
        let register = |id, chunks: Vec<HostChunk>| {
            Request::new(session, Command::HostRegister { id, chunks })
        };
        let (_, header, _) = g.call(&register(7, chunks.clone()), 0);
        assert_eq!(header.status, Status::Ok);
        // The same id again, an overlap, memory outside the VM: refused.
        let (_, header, _) = g.call(&register(7, chunks[1..].to_vec()), 0);
        assert_eq!(header.status, Status::InvalidArgument);
        let overlap = vec![HostChunk {
            addr: (2 << 20) + page,
            len: page,
        }];
        let (_, header, _) = g.call(&register(8, overlap), 0);
        assert_eq!(header.status, Status::InvalidArgument);
        let outside = vec![HostChunk {
            addr: RAM,
            len: page,
        }];
        let (_, header, _) = g.call(&register(9, outside), 0);
        assert_eq!(header.status, Status::InvalidArgument);

        // The process's data in its host buffer: 1.5 pages from byte 2.5 pages, i.e. the
        // last half page before the region boundary's chunk ends and the next chunk.
        let data: Vec<u8> = (0..page * 3 / 2).map(|i| (i % 253) as u8).collect();
        let host_at = |offset: u64| -> u64 {
            if offset < 3 * page {
                RAM / 2 - page + offset
            } else {
                (2 << 20) + offset - 3 * page
            }
        };
        let m = g.mem.memory();
        let split = (page / 2) as usize;
        m.write_slice(&data[..split], GuestAddress(host_at(page * 5 / 2)))
            .unwrap();
        m.write_slice(&data[split..], GuestAddress(host_at(3 * page)))
            .unwrap();
        drop(m);
        let before = g.mediator.usage(g.tenant).unwrap().host_copies;
        // The driver would place the pinned pages in the chain: two descriptors.
        let header_bytes = Request::new(
            session,
            Command::Htod {
                dst: buffer,
                offset: 100,
                data: data.clone(),
            },
        )
        .header()
        .encode();
        let head = g.descs(4);
        let hdr = g.data(&header_bytes);
        let resp = g.space(32);
        g.store(g.desc_table, head, hdr, 80, NEXT, head + 1);
        g.store(
            g.desc_table,
            head + 1,
            host_at(page * 5 / 2),
            split as u32,
            NEXT,
            head + 2,
        );
        g.store(
            g.desc_table,
            head + 2,
            host_at(3 * page),
            (data.len() - split) as u32,
            NEXT,
            head + 3,
        );
        g.store(g.desc_table, head + 3, resp, 32, WRITE, 0);
        g.publish(head);
        assert_eq!(g.finish(head), 32);
        assert_eq!(g.response(&[(resp, 32)]).status, Status::Ok);
        assert_eq!(
            g.mediator.usage(g.tenant).unwrap().host_copies,
            before + 1,
            "the copy did not come straight from the host buffer"
        );
        // Back through the ordinary path: the bytes arrived.
        let (_, header, payload) = g.call(
            &Request::new(
                session,
                Command::Dtoh {
                    src: buffer,
                    offset: 100,
                    len: data.len() as u64,
                },
            ),
            data.len() as u32,
        );
        assert_eq!(header.status, Status::Ok);
        assert_eq!(payload, data);

        // DTOH into the host buffer, its first page and a half.
        let header_bytes = Request::new(
            session,
            Command::Dtoh {
                src: buffer,
                offset: 100,
                len: data.len() as u64,
            },
        )
        .header()
        .encode();
        let head = g.descs(3);
        let hdr = g.data(&header_bytes);
        let resp = g.space(32);
        g.store(g.desc_table, head, hdr, 80, NEXT, head + 1);
        g.store(
            g.desc_table,
            head + 1,
            host_at(0),
            data.len() as u32,
            WRITE | NEXT,
            head + 2,
        );
        g.store(g.desc_table, head + 2, resp, 32, WRITE, 0);
        g.publish(head);
        assert_eq!(g.finish(head), data.len() as u32 + 32);
        assert_eq!(g.response(&[(resp, 32)]).status, Status::Ok);
        assert_eq!(g.mediator.usage(g.tenant).unwrap().host_copies, before + 2);
        let mut back = vec![0u8; data.len()];
        g.mem
            .memory()
            .read_slice(&mut back, GuestAddress(host_at(0)))
            .unwrap();
        assert_eq!(back, data);

        // Unregistered, the same copies take the ordinary path and still work.
        let (_, header, _) = g.call(&Request::new(session, Command::HostUnregister { id: 7 }), 0);
        assert_eq!(header.status, Status::Ok);
        let (_, header, _) = g.call(&Request::new(session, Command::HostUnregister { id: 7 }), 0);
        assert_eq!(header.status, Status::InvalidHandle);
        assert_eq!(g.mediator.usage(g.tenant).unwrap().host_bytes, 0);
    }

    #[test]
    fn mediator_refusals_reach_the_guest() {
        let mut g = Guest::new(64);
        let (len, header, _) = g.call(&Request::new(42, Command::Alloc { size: 4096 }), 0);
        assert_eq!((len, header.status), (32, Status::InvalidSession));
        let session = g.open_session();
        let (_, header, _) = g.call(&Request::new(session, Command::Alloc { size: 1 << 30 }), 0);
        assert_eq!(header.status, Status::QuotaExceeded);
    }

    #[test]
    fn an_indirect_chain_is_followed() {
        let mut g = Guest::new(64);
        let (head, writable) = g.post_indirect(&[
            Buf::Read(header_bytes(Command::Info)),
            Buf::Write(100),
            Buf::Write(92 + 32),
        ]);
        assert_eq!(g.finish(head), 192 + 32);
        let header = g.response(&writable);
        assert_eq!((header.status, header.written), (Status::Ok, 192));
    }

    #[test]
    fn descriptor_loops_are_returned_unanswered() {
        let mut g = Guest::new(64);
        let hdr = g.data(&header_bytes(Command::Info));
        let out = g.space(256);
        // Two readable descriptors pointing at each other, then a self-loop.
        let first = g.descs(2);
        g.store(g.desc_table, first, hdr, 80, NEXT, first + 1);
        g.store(g.desc_table, first + 1, out, 256, NEXT, first);
        g.publish(first);
        assert_eq!(g.finish(first), 0);
        let lone = g.descs(1);
        g.store(g.desc_table, lone, out, 256, WRITE | NEXT, lone);
        g.publish(lone);
        assert_eq!(g.finish(lone), 0);
        assert!(g.untouched(&[(out, 256)]));
        g.expect_healthy();
    }

    #[test]
    fn a_next_index_outside_the_table_is_returned_unanswered() {
        let mut g = Guest::new(64);
        let hdr = g.data(&header_bytes(Command::Info));
        let head = g.descs(1);
        g.store(g.desc_table, head, hdr, 80, NEXT, 200);
        g.publish(head);
        assert_eq!(g.finish(head), 0);
        g.expect_healthy();
    }

    #[test]
    fn a_head_outside_the_table_does_not_stop_the_queue() {
        let mut g = Guest::new(64);
        g.publish(1000);
        g.kick();
        assert!(g.used().is_empty());
        g.expect_healthy();
    }

    #[test]
    fn buffers_outside_guest_memory_are_returned_unanswered() {
        let mut g = Guest::new(64);
        let hdr = header_bytes(Command::Info);
        for (addr, len) in [(RAM + 0x1000, 80u32), (RAM - 16, 80), (u64::MAX - 8, 80)] {
            let out = g.space(224);
            let first = g.descs(2);
            g.store(g.desc_table, first, addr, len, NEXT, first + 1);
            g.store(g.desc_table, first + 1, out, 224, WRITE, 0);
            g.publish(first);
            assert_eq!(g.finish(first), 0);
            assert!(g.untouched(&[(out, 224)]));
        }
        // A writable buffer outside memory: nothing is written anywhere.
        let first = g.descs(3);
        let h = g.data(&hdr);
        let out = g.space(192);
        g.store(g.desc_table, first, h, 80, NEXT, first + 1);
        g.store(g.desc_table, first + 1, out, 192, WRITE | NEXT, first + 2);
        g.store(g.desc_table, first + 2, RAM, 32, WRITE, 0);
        g.publish(first);
        assert_eq!(g.finish(first), 0);
        assert!(g.untouched(&[(out, 192)]));
        g.expect_healthy();
    }

    #[test]
    fn a_readable_buffer_after_a_writable_one_is_returned_unanswered() {
        let mut g = Guest::new(64);
        g.expect_unanswered(&[
            Buf::Write(32),
            Buf::Read(header_bytes(Command::Info)),
            Buf::Write(224),
        ]);
        g.expect_healthy();
    }

    #[test]
    fn a_readable_buffer_after_an_empty_writable_one_is_returned_unanswered() {
        let mut g = Guest::new(64);
        g.expect_unanswered(&[
            Buf::Read(header_bytes(Command::Info)),
            Buf::Write(0),
            Buf::Read(vec![0; 8]),
            Buf::Write(224),
        ]);
        g.expect_healthy();
    }

    #[test]
    fn a_chain_without_room_for_the_response_header_is_returned_unanswered() {
        let mut g = Guest::new(64);
        g.expect_unanswered(&[
            Buf::Read(header_bytes(Command::SessionOpen)),
            Buf::Write(16),
        ]);
        g.expect_unanswered(&[
            Buf::Read(header_bytes(Command::SessionOpen)),
            Buf::Write(16),
            Buf::Write(15),
        ]);
        let (head, _) = g.post(&[Buf::Read(header_bytes(Command::SessionOpen))]);
        assert_eq!(g.finish(head), 0);
        assert_eq!(g.mediator.usage(g.tenant).unwrap().sessions, 0);
        g.expect_healthy();
    }

    #[test]
    fn a_zero_length_buffer_is_an_invalid_request() {
        let mut g = Guest::new(64);
        g.expect_status(
            &[
                Buf::Read(header_bytes(Command::SessionOpen)),
                Buf::Read(Vec::new()),
                Buf::Write(32),
            ],
            Status::InvalidRequest,
        );
        g.expect_status(
            &[
                Buf::Read(header_bytes(Command::SessionOpen)),
                Buf::Write(0),
                Buf::Write(32),
            ],
            Status::InvalidRequest,
        );
        assert_eq!(g.mediator.usage(g.tenant).unwrap().sessions, 0);
        g.expect_healthy();
    }

    #[test]
    fn a_short_or_bad_header_gets_its_status() {
        let mut g = Guest::new(64);
        let info = header_bytes(Command::Info);
        g.expect_status(
            &[Buf::Read(info[..40].to_vec()), Buf::Write(224)],
            Status::InvalidRequest,
        );
        let mut bad_magic = info.clone();
        bad_magic[0] ^= 0xff;
        g.expect_status(
            &[Buf::Read(bad_magic), Buf::Write(224)],
            Status::InvalidRequest,
        );
        let mut unknown = info.clone();
        unknown[6..8].copy_from_slice(&99u16.to_le_bytes());
        g.expect_status(
            &[Buf::Read(unknown), Buf::Write(224)],
            Status::UnknownOpcode,
        );
        let mut version = info.clone();
        version[4..6].copy_from_slice(&7u16.to_le_bytes());
        g.expect_status(
            &[Buf::Read(version), Buf::Write(224)],
            Status::VersionMismatch,
        );
        g.expect_healthy();
    }

    #[test]
    fn a_payload_of_the_wrong_length_is_an_invalid_request() {
        let mut g = Guest::new(64);
        let session = g.open_session();
        let htod = Request::new(
            session,
            Command::Htod {
                dst: 1,
                offset: 0,
                data: vec![7; 100],
            },
        )
        .encode();
        // 50 of the 100 bytes the header announces, then 20 too many.
        g.expect_status(
            &[Buf::Read(htod[..130].to_vec()), Buf::Write(32)],
            Status::InvalidRequest,
        );
        let mut long = htod.clone();
        long.extend_from_slice(&[0; 20]);
        g.expect_status(&[Buf::Read(long), Buf::Write(32)], Status::InvalidRequest);
        // A request without payload followed by bytes.
        let mut info = header_bytes(Command::Info);
        info.extend_from_slice(&[0; 8]);
        g.expect_status(&[Buf::Read(info), Buf::Write(224)], Status::InvalidRequest);
        g.expect_healthy();
    }

    #[test]
    fn a_writable_payload_too_small_for_the_answer_is_buffer_too_small() {
        let mut g = Guest::new(64);
        g.expect_status(
            &[Buf::Read(header_bytes(Command::Info)), Buf::Write(191 + 32)],
            Status::BufferTooSmall,
        );
        let session = g.open_session();
        let dtoh = Request::new(
            session,
            Command::Dtoh {
                src: 1,
                offset: 0,
                len: 4096,
            },
        );
        g.expect_status(
            &[Buf::Read(dtoh.encode()), Buf::Write(4095), Buf::Write(32)],
            Status::BufferTooSmall,
        );
        g.expect_healthy();
    }

    #[test]
    fn a_chain_longer_than_the_queue_is_returned_unanswered() {
        let mut g = Guest::new(16);
        let mut bufs = vec![Buf::Read(header_bytes(Command::Info))];
        bufs.extend((0..16).map(|_| Buf::Write(16)));
        let (head, writable) = g.post_indirect(&bufs);
        assert_eq!(g.finish(head), 0);
        assert!(g.untouched(&writable));
        g.expect_healthy();
    }

    #[test]
    fn a_nested_indirect_table_is_returned_unanswered() {
        let mut g = Guest::new(64);
        let inner = g.alloc(16);
        let hdr = g.data(&header_bytes(Command::Info));
        let table = g.alloc(32);
        g.store(table, 0, hdr, 80, NEXT, 1);
        g.store(table, 1, inner, 16, INDIRECT, 0);
        let head = g.descs(1);
        g.store(g.desc_table, head, table, 32, INDIRECT, 0);
        g.publish(head);
        assert_eq!(g.finish(head), 0);
        g.expect_healthy();
    }

    #[test]
    fn event_idx_still_signals_the_guest() {
        let mut g = Guest::new(64);
        g.backend.set_event_idx(true);
        g.vring.set_queue_event_idx(true);
        g.expect_healthy();
        assert!(g.call.read().is_ok(), "the guest was not signalled");
        g.expect_healthy();
    }

    #[test]
    fn requests_in_flight_complete_through_a_new_memory_table() {
        let mut g = Guest::new(64);
        let (head, writable) = g.post(&[Buf::Read(header_bytes(Command::Info)), Buf::Write(224)]);
        g.kick();
        assert_eq!(g.backend.requests_in_flight(), 1);

        // QEMU adds a region: same guest RAM content, a new mapping.
        let old = g.mem.memory();
        let new = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), RAM as usize),
            (GuestAddress(1 << 30), 1 << 20),
        ])
        .unwrap();
        let mut copy = vec![0; RAM as usize];
        old.read_slice(&mut copy, GuestAddress(0)).unwrap();
        new.write_slice(&copy, GuestAddress(0)).unwrap();
        drop(old);
        g.mem.lock().unwrap().replace(new);
        g.backend.update_memory(g.mem.clone()).unwrap();

        g.complete();
        assert_eq!(g.used(), vec![(u32::from(head), 192 + 32)]);
        assert_eq!(g.response(&writable).status, Status::Ok);
        g.expect_healthy();
    }

    #[test]
    fn stopping_the_ring_answers_the_requests_in_flight() {
        let mut g = Guest::new(64);
        let (head, writable) = g.post(&[
            Buf::Read(header_bytes(Command::SessionOpen)),
            Buf::Write(32),
        ]);
        g.kick();
        assert_eq!(g.backend.requests_in_flight(), 1);
        g.backend.stop_vring(0).unwrap();
        assert_eq!(g.backend.requests_in_flight(), 0);
        assert_eq!(g.used(), vec![(u32::from(head), 32)]);
        assert_eq!(g.response(&writable).status, Status::Ok);
    }

    /// A guest's bytes held by the mediator, host-to-device payload and device-to-host
    /// answers alike, never exceed its budget, also when it keeps its worker busy and
    /// stops its ring again and again with large copies queued behind (each stop used to
    /// forget those bytes while the requests stayed queued in the mediator: about 1 GiB
    /// more per stop, until the OOM killer took the daemon and every VM).
    #[test]
    fn stopping_the_ring_under_a_busy_worker_never_exceeds_the_byte_budget() {
        const BUDGET: u64 = 24 << 20;
        const CHUNK: u32 = 1 << 20;
        let limits = Limits {
            max_held_bytes: BUDGET,
            ..Limits::default()
        };
        let mut g = Guest::with_limits(1024, limits);
        g.backend.set_stop_timeout(Duration::from_millis(20));
        let s = g.open_session();
        let alloc = |g: &mut Guest, size: u64| {
            let (_, h, _) = g.call(&Request::new(s, Command::Alloc { size }), 0);
            assert_eq!(h.status, Status::Ok);
            h.value0
        };
        // 256 x 256 x 256 on the CPU: long enough to outlast every stop below, in order.
        let n = 256u32;
        let [a, b, c] = [0; 3].map(|_| alloc(&mut g, u64::from(n * n * 4)));
        let target = alloc(&mut g, 16 << 20);
        let matmul = Request::new(
            s,
            Command::Launch(Launch {
                module: BUILTIN_MODULE,
                kernel: "matmul_f32".into(),
                grid: [n / 16, n / 16, 1],
                block: [16, 16, 1],
                shared_bytes: 0,
                params: vec![
                    Param::Buffer(a),
                    Param::Buffer(b),
                    Param::Buffer(c),
                    Param::u32(n),
                    Param::u32(n),
                    Param::u32(n),
                ],
            }),
        );
        // One MiB of guest RAM stands in for 16 MiB of payload: every descriptor of the
        // copy points at it.
        let alias = g.space(CHUNK);
        let htod = Request::new(
            s,
            Command::Htod {
                dst: target,
                offset: 0,
                data: vec![0; 16 * CHUNK as usize],
            },
        );
        let dtoh = Request::new(
            s,
            Command::Dtoh {
                src: target,
                offset: 0,
                len: 16 << 20,
            },
        );
        for round in 0..4 {
            for _ in 0..8 {
                g.post(&[Buf::Read(matmul.encode()), Buf::Write(32)]);
            }
            for i in 0..12 {
                let head = g.descs(18);
                if i % 2 == 0 {
                    let header = g.data(&htod.header().encode());
                    g.store(g.desc_table, head, header, 80, NEXT, head + 1);
                    for k in 0..16 {
                        let index = head + 1 + k;
                        g.store(g.desc_table, index, alias, CHUNK, NEXT, index + 1);
                    }
                    let resp = g.space(32);
                    g.store(g.desc_table, head + 17, resp, 32, WRITE, 0);
                } else {
                    // A 16 MiB answer into the same aliased MiB.
                    let header = g.data(&dtoh.header().encode());
                    g.store(g.desc_table, head, header, 80, NEXT, head + 1);
                    for k in 0..16 {
                        let index = head + 1 + k;
                        g.store(g.desc_table, index, alias, CHUNK, NEXT | WRITE, index + 1);
                    }
                    let resp = g.space(32);
                    g.store(g.desc_table, head + 17, resp, 32, WRITE, 0);
                }
                g.publish(head);
            }
            g.kick();
            let held = g.mediator.usage(g.tenant).unwrap().held_bytes;
            assert!(
                held <= BUDGET,
                "round {round}: {held} bytes held, budget {BUDGET}"
            );
            g.backend.stop_vring(0).unwrap();
            assert_eq!(g.backend.requests_in_flight(), 0);
            // What was queued is dropped at once; only the request running now holds
            // anything.
            let held = g.mediator.usage(g.tenant).unwrap().held_bytes;
            assert!(
                held <= (16 << 20) + 4096,
                "round {round}: {held} bytes still held after the stop"
            );
            g.used();
        }
        let u = g.mediator.usage(g.tenant).unwrap();
        assert!(u.cancelled > 0, "nothing was cancelled: {u:?}");
        // Let the ring run dry: what is left is taken, answered, or refused while the
        // last running request still holds bytes.
        g.backend.set_stop_timeout(Duration::from_secs(60));
        for _ in 0..200 {
            g.kick();
            let busy = g.backend.requests_in_flight() > 0;
            g.backend.stop_vring(0).unwrap();
            if !busy && g.used().is_empty() {
                break;
            }
        }
        // The VM's device still works, and holds nothing once its worker is free.
        g.expect_healthy();
        assert_eq!(g.mediator.usage(g.tenant).unwrap().held_bytes, 0);
    }

    #[test]
    fn a_full_queue_in_flight_pauses_and_resumes() {
        let mut g = Guest::new(4);
        let (head, writable) = g.post(&[
            Buf::Read(header_bytes(Command::SessionOpen)),
            Buf::Write(32),
        ]);
        // A misbehaving guest offers the same chain six times: four fill the queue's worth
        // of requests in flight, the last two wait until answers free room.
        for _ in 0..3 {
            g.publish(head);
        }
        g.kick();
        assert_eq!(g.backend.requests_in_flight(), 4);
        g.publish(head);
        g.publish(head);
        g.kick();
        assert_eq!(g.backend.requests_in_flight(), 4);
        assert!(g.used().is_empty());
        let mut answered = 0;
        while answered < 6 {
            g.complete();
            answered += g.used().len();
        }
        assert_eq!(answered, 6);
        assert_eq!(g.backend.requests_in_flight(), 0);
        assert_eq!(g.response(&writable).status, Status::Ok);
        assert_eq!(g.mediator.usage(g.tenant).unwrap().sessions, 6);
    }

    /// With host polling, the worker that handled a kick keeps taking chains the guest
    /// publishes without kicking (kicks are off meanwhile), answers them from the
    /// completion queue, signals the guest for each, and turns kicks back on before it
    /// returns.
    #[test]
    fn polling_answers_chains_published_without_a_kick() {
        for event_idx in [false, true] {
            let mut g = Guest::new(64).polling(Duration::from_millis(500), event_idx);
            let chains: Vec<(u16, Vec<Span>)> = (0..3).map(|_| g.info_chain()).collect();
            assert!(g.ring().wants_kick(event_idx, 0));
            g.publish(chains[0].0);
            let ring = g.ring();
            let heads: Vec<u16> = chains.iter().map(|(head, _)| *head).collect();
            // The guest: once the first chain is answered (the worker, still inside its kick
            // handler, is polling), publish the others one by one, without kicking.
            let guest = std::thread::spawn(move || {
                let mut suppressed = Vec::new();
                for (idx, &head) in (1u16..).zip(&heads[1..]) {
                    assert!(ring.wait_used(idx), "chain {} not answered", idx - 1);
                    suppressed.push(!ring.wants_kick(event_idx, idx));
                    ring.publish(idx, head);
                }
                assert!(ring.wait_used(3), "chain 2 not answered");
                suppressed
            });
            g.kick();
            let suppressed = guest.join().unwrap();
            g.avail_idx = 3;
            assert_eq!(
                suppressed,
                [true, true],
                "event_idx {event_idx}: kicks were on"
            );
            let used = g.used();
            assert_eq!(
                used,
                chains
                    .iter()
                    .map(|(head, _)| (u32::from(*head), 192 + 32))
                    .collect::<Vec<_>>(),
                "event_idx {event_idx}"
            );
            for (_, writable) in &chains {
                assert_eq!(g.response(writable).status, Status::Ok);
            }
            assert!(g.call.read().is_ok(), "the guest was not signalled");
            assert_eq!(g.backend.requests_in_flight(), 0);
            assert!(!g.backend.kicks_off);
            assert!(
                g.ring().wants_kick(event_idx, 3),
                "event_idx {event_idx}: kicks are still off"
            );
        }
    }

    /// Once the polling window has passed, the worker sleeps with kicks on: a chain
    /// published later is kicked and answered.
    #[test]
    fn a_chain_published_after_the_polling_window_is_answered_on_its_kick() {
        for event_idx in [false, true] {
            let mut g = Guest::new(64).polling(Duration::from_micros(200), event_idx);
            g.expect_healthy();
            std::thread::sleep(Duration::from_millis(5));
            assert!(
                g.ring().wants_kick(event_idx, g.avail_idx),
                "event_idx {event_idx}: kicks are off after the window"
            );
            let (head, writable) = g.info_chain();
            g.publish(head);
            assert_eq!(g.finish(head), 192 + 32);
            assert_eq!(g.response(&writable).status, Status::Ok);
            assert!(g.ring().wants_kick(event_idx, g.avail_idx));
            g.expect_healthy();
        }
    }

    /// A chain the guest publishes between the worker's last look and the moment kicks are
    /// turned back on is not left waiting for a kick: turning them on looks once more.
    #[test]
    fn a_chain_published_as_polling_ends_is_taken_when_kicks_are_turned_back_on() {
        for event_idx in [false, true] {
            let mut g = Guest::new(64).polling(Duration::from_micros(50), event_idx);
            g.expect_healthy();
            let vring = g.vring.clone();
            g.backend.suppress_kicks(&vring);
            assert!(g.backend.kicks_off);
            if !event_idx {
                assert!(!g.ring().wants_kick(false, g.avail_idx));
            }
            let (head, writable) = g.info_chain();
            g.publish(head);
            g.backend.rearm(&vring);
            assert!(!g.backend.kicks_off);
            assert!(g.ring().wants_kick(event_idx, g.avail_idx));
            // Taken: in flight, or already answered. (The completion eventfd may still be
            // readable from the polled answer before: a wake-up with nothing to do.)
            let mut used = g.used();
            while used.is_empty() {
                assert_eq!(g.backend.requests_in_flight(), 1);
                g.complete();
                used = g.used();
            }
            assert_eq!(used, vec![(u32::from(head), 192 + 32)]);
            assert_eq!(g.response(&writable).status, Status::Ok);
        }
    }

    /// The whole queue in flight and more chains waiting: the completion that makes room
    /// starts a polling round that takes the waiting chains and answers them, and kicks
    /// end up on.
    #[test]
    fn a_full_queue_resumes_and_drains_while_polling() {
        for event_idx in [false, true] {
            let mut g = Guest::new(4).polling(Duration::ZERO, event_idx);
            let (head, writable) = g.post(&[
                Buf::Read(header_bytes(Command::SessionOpen)),
                Buf::Write(32),
            ]);
            for _ in 0..3 {
                g.publish(head);
            }
            g.kick();
            g.publish(head);
            g.publish(head);
            g.kick();
            assert_eq!(g.backend.requests_in_flight(), 4);
            assert!(g.backend.throttled);
            g.backend.set_poll(Duration::from_millis(100));
            let mut answered = 0;
            while answered < 6 {
                g.complete();
                answered += g.used().len();
            }
            assert_eq!(answered, 6);
            assert_eq!(g.backend.requests_in_flight(), 0);
            assert_eq!(g.response(&writable).status, Status::Ok);
            assert_eq!(g.mediator.usage(g.tenant).unwrap().sessions, 6);
            assert!(g.ring().wants_kick(event_idx, g.avail_idx));
        }
    }

    /// A kick with nothing on the ring, and a completion event with nothing finished, do not
    /// start polling; a polling round ends when its window passes.
    #[test]
    fn polling_starts_after_work_only_and_ends_with_its_window() {
        let mut g = Guest::new(64).polling(Duration::from_millis(20), false);
        let started = Instant::now();
        g.kick();
        let vrings = [g.vring.clone()];
        g.backend
            .handle_event(COMPLETION_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert!(started.elapsed() < Duration::from_millis(20));
        assert!(g.ring().wants_kick(false, g.avail_idx));
        let started = Instant::now();
        g.expect_healthy();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(20), "no polling: {took:?}");
        assert!(took < Duration::from_secs(2), "polled for {took:?}");
    }

    #[test]
    fn reset_closes_the_sessions() {
        let mut g = Guest::new(64);
        g.open_session();
        g.backend.reset_device();
        assert_eq!(g.mediator.usage(g.tenant).unwrap().sessions, 0);
        g.expect_healthy();
    }

    #[test]
    fn get_config_returns_exactly_the_bytes_asked_for() {
        let g = Guest::new(64);
        let config = g.mediator.device_config(g.tenant).unwrap().encode();
        let b = &g.backend;
        assert_eq!(b.get_config(0, CONFIG_SIZE as u32), config.to_vec());
        assert_eq!(b.get_config(4, 8), config[4..12].to_vec());
        let mut tail = config[120..].to_vec();
        tail.extend_from_slice(&[0; 8]);
        assert_eq!(b.get_config(120, 16), tail);
        assert_eq!(b.get_config(200, 4), vec![0; 4]);
        assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
        assert_eq!(b.get_config(0, 256).len(), 256);
        assert!(b.get_config(0, 0).is_empty());
    }

    #[test]
    fn the_config_space_follows_a_quota_changed_at_run_time() {
        let g = Guest::new(64);
        let quota = |b: &VgpuBackend| {
            vgpu_protocol::DeviceConfig::decode(&b.get_config(0, CONFIG_SIZE as u32))
                .unwrap()
                .mem_quota
        };
        let before = quota(&g.backend);
        assert!(g.mediator.set_quota(g.tenant, before / 2));
        assert_eq!(quota(&g.backend), before / 2);
    }

    #[test]
    fn offers_the_features_and_queue_the_device_needs() {
        let g = Guest::new(64);
        let b = &g.backend;
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert_eq!((b.num_queues(), b.max_queue_size()), (1, 1024));
        assert!(b.exit_event(0).is_some());
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only asks about the descriptor.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn the_exit_pipe_left_open_by_vhost_user_backend_is_closed_afterwards() {
        let g = Guest::new(64);
        let (consumer, notifier) = g.backend.exit_event(0).unwrap();
        // What vhost-user-backend 0.24 does with the consumer.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(consumer);
        notifier.notify().unwrap();
        drop(notifier);
        assert!(is_open(fd));
        g.backend.close_exit_events();
        assert!(!is_open(fd));
    }

    #[test]
    fn an_exit_descriptor_closed_and_reused_elsewhere_is_left_alone() {
        let g = Guest::new(64);
        let (consumer, _notifier) = g.backend.exit_event(0).unwrap();
        let fd = consumer.as_raw_fd();
        drop(consumer);
        // The number now belongs to someone else (most likely this eventfd).
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        g.backend.close_exit_events();
        assert!(is_open(other.as_raw_fd()));
        assert!(fd != other.as_raw_fd() || is_open(fd));
    }

    #[test]
    fn unknown_events_and_missing_vrings_are_ignored() {
        let mut g = Guest::new(64);
        let vrings = [g.vring.clone()];
        g.backend.handle_event(9, EventSet::IN, &vrings, 0).unwrap();
        g.backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, &[], 0)
            .unwrap();
        g.backend
            .handle_event(COMPLETION_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        g.expect_healthy();
    }
}
