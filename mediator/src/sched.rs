// SPDX-License-Identifier: Apache-2.0
//! The scheduler: weighted fair shares of device time between tenants (VMs), a bounded
//! amount of work on the device per tenant, and the watchdog.
//!
//! Every device operation (launch, copy, memset) a tenant's worker is about to hand to an
//! executor is first admitted here ([`Scheduler::admit`]). Device time is what executors
//! report through their [`DeviceMeter`]s: a worker process times its operations on the
//! device with CUDA events (the CPU executor with the clock around each operation), and
//! an executor without a meter does all its work inside the call, whose duration is then
//! its device time.
//!
//! Contexts of different processes do not run on a GPU at the same time: the GPU
//! time-slices between them, in equal slices whatever anyone's weight. Shares that follow
//! weights therefore need one tenant at a time on the device while several want it:
//!
//! - **Virtual time.** Each tenant's device time divided by its weight. Among tenants that
//!   wait, the one furthest behind goes next; the tenant on the device keeps it until it is
//!   [`SchedConfig::slice`] of its own device time ahead of a waiting one, then it stops
//!   being admitted, its work drains, and the other takes over. In the long run every busy
//!   tenant's virtual time advances alike, so device time divides in proportion to weight.
//!   A tenant idle for [`SchedConfig::idle`] comes back one slice behind the others: the
//!   device time it did not use is no credit against them.
//! - **Bounded work in flight.** A tenant has at most [`SchedConfig::max_in_flight`] of
//!   estimated device time queued (and never fewer than two operations, so the device is
//!   never idle between them): however long its queue, another tenant waits at most that
//!   long for the device once it is due. A tenant alone may queue eight times as much, so
//!   a flood of tiny launches keeps the device fed; a tenant that comes then waits that
//!   long once.
//! - **Work-conserving.** A tenant alone is admitted whatever its virtual time, and one
//!   that comes back from idle starts one slice behind the busy ones, not with the credit
//!   of its idle time.
//! - **Stalls.** A tenant whose work finishes nothing for [`SchedConfig::stall`] (a very
//!   long kernel) no longer keeps others off the device: they are admitted beside it and the
//!   GPU's own time-slicing shares the device meanwhile.
//! - **Watchdog.** A session with work on the device that finished nothing for
//!   [`SchedConfig::kernel_timeout`] is ended through its executor's [`Killer`]; its
//!   session then answers `DEVICE_LOST` (detail [`crate::executor::TIMEOUT_DETAIL`]) and the
//!   VM's other sessions run on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::executor::{DeviceMeter, Killer, MeterReading};
use crate::mediator::TenantId;

/// Default of [`SchedConfig::slice`].
pub const DEFAULT_SLICE: Duration = Duration::from_millis(4);
/// Default of [`SchedConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: Duration = Duration::from_millis(1);
/// Default of [`SchedConfig::stall`].
pub const DEFAULT_STALL: Duration = Duration::from_millis(100);
/// Default of [`SchedConfig::idle`].
pub const DEFAULT_IDLE: Duration = Duration::from_millis(100);
/// Default of [`SchedConfig::kernel_timeout`].
pub const DEFAULT_KERNEL_TIMEOUT: Duration = Duration::from_secs(600);

/// Operations a tenant may always have on the device, whatever their estimated time: one
/// running and one queued behind it.
const MIN_IN_FLIGHT_OPS: u64 = 2;
/// The estimate of an operation's device time before any has been measured.
const FIRST_OP_ESTIMATE_NS: u64 = 100_000;
/// How much more than [`SchedConfig::max_in_flight`] a tenant may queue while no other
/// tenant is active.
const ALONE_FACTOR: u128 = 8;
/// How many operations the running estimate of an operation's device time counts as.
const OP_ESTIMATE_WEIGHT: u64 = 4;
/// Virtual time is device nanoseconds times this, divided by the weight.
const VTIME_SCALE: u128 = 1_000_000;

/// How the scheduler shares the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Device time a tenant may run ahead of a waiting one before it yields the device.
    /// Longer slices waste less device time on hand-overs; shorter ones wait less.
    pub slice: Duration,
    /// Estimated device time a tenant may have queued on the device at once.
    pub max_in_flight: Duration,
    /// A tenant whose device work finished nothing for this long stops keeping others off
    /// the device.
    pub stall: Duration,
    /// A session whose device work finished nothing for this long is ended.
    pub kernel_timeout: Duration,
    /// How often a tenant waiting for the device looks again at work that finishes in
    /// worker processes.
    pub poll: Duration,
    /// A tenant with no work for this long is idle: when it comes back it starts one slice
    /// behind the busy ones instead of keeping the credit of the time it did not use.
    /// Shorter gaps (a VM between two requests) keep its place.
    pub idle: Duration,
    /// Whether admission holds work back; without it device time is only measured (and
    /// the watchdog still runs): for comparisons.
    pub enforce: bool,
}

impl SchedConfig {
    /// The defaults, with the executors' kernel timeout (`None`: the default).
    pub fn with_kernel_timeout(timeout: Option<Duration>) -> SchedConfig {
        SchedConfig {
            kernel_timeout: timeout.unwrap_or(DEFAULT_KERNEL_TIMEOUT),
            ..SchedConfig::default()
        }
    }
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            slice: DEFAULT_SLICE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            stall: DEFAULT_STALL,
            kernel_timeout: DEFAULT_KERNEL_TIMEOUT,
            poll: Duration::from_micros(50),
            idle: DEFAULT_IDLE,
            enforce: true,
        }
    }
}

/// A tenant's standing with the scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    pub weight: u32,
    /// Device time the tenant's work took, in nanoseconds.
    pub device_ns: u64,
    /// Time its worker waited to be admitted, in nanoseconds.
    pub waited_ns: u64,
    /// Operations on the device or queued for it now.
    pub in_flight: u64,
    /// Sessions the watchdog ended.
    pub timeouts: u64,
}

/// A session's executor as the scheduler sees it.
struct SessionMeter {
    /// `None`: the executor's calls do their work before they return.
    meter: Option<Arc<dyn DeviceMeter>>,
    killer: Option<Killer>,
    last: MeterReading,
    /// When its work last finished something, or last went onto an idle device.
    progress_at: Instant,
    /// Device time it took, in nanoseconds.
    device_ns: u64,
    /// Its place among the tenant's sessions: device time, moved up to the tenant's
    /// session floor (less a slice) when it comes back from idle.
    vt: u64,
    /// When its requests were last picked.
    picked_at: Option<Instant>,
    /// Without a meter: since when a call of it has been running.
    busy_since: Option<Instant>,
    killed: bool,
}

struct Tenant {
    weight: u32,
    vtime: u128,
    device_ns: u64,
    waited_ns: u64,
    timeouts: u64,
    sessions: HashMap<u64, SessionMeter>,
    /// The least `vt` of the sessions picked, never going back.
    session_floor: u64,
    /// Admitted operations whose call has not returned yet.
    reserved: u64,
    /// When the oldest of those was admitted.
    reserved_at: Option<Instant>,
    /// Its worker waits in `admit`.
    waiting: bool,
    /// Estimated device time of one operation, from the last ones measured.
    op_ns: u64,
    /// When its work last finished something.
    progress_at: Instant,
    /// When it last had work admitted, queued or finishing.
    active_at: Instant,
    removed: bool,
}

impl Tenant {
    /// Whether it has work, or had some within `grace`: a tenant that does its work in
    /// the calls is between two operations, not idle.
    fn active(&self, now: Instant, grace: Duration) -> bool {
        !self.removed
            && (self.waiting
                || self.in_flight() > 0
                || now.saturating_duration_since(self.active_at) < grace)
    }

    fn in_flight(&self) -> u64 {
        self.reserved
            + self
                .sessions
                .values()
                .map(|s| s.last.in_flight())
                .sum::<u64>()
    }

    /// `ns` of device time, in this tenant's virtual time.
    fn virtual_ns(&self, ns: u64) -> u128 {
        u128::from(ns) * VTIME_SCALE / u128::from(self.weight.max(1))
    }

    fn charge(&mut self, ns: u64, ops: u64) {
        self.device_ns = self.device_ns.saturating_add(ns);
        self.vtime += self.virtual_ns(ns);
        // A running average in which each operation counts and the estimate so far counts
        // as a few: one batch of measured operations mostly replaces a first guess.
        if ops > 0 {
            let prior = u128::from(OP_ESTIMATE_WEIGHT);
            let total = u128::from(self.op_ns) * prior + u128::from(ns);
            self.op_ns = u64::try_from(total / (prior + u128::from(ops))).unwrap_or(u64::MAX);
        }
    }
}

struct State {
    tenants: HashMap<TenantId, Tenant>,
    /// The least virtual time of the tenants with work, never going back: where a tenant
    /// that was idle starts again (less a slice).
    floor: u128,
    stopping: bool,
}

/// Shares the device between tenants; see the module documentation.
pub struct Scheduler {
    config: SchedConfig,
    state: Mutex<State>,
    /// Signalled when an operation returns, a weight changes or a tenant goes.
    changed: Condvar,
    watchdog: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when the scheduler goes: the watchdog thread waits on it between rounds.
    stop: Arc<StopSignal>,
    /// [`SchedConfig::enforce`], changeable at run time.
    enforce: AtomicBool,
}

/// A flag with a condition to wait on, for stopping the watchdog thread.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    signal: Condvar,
}

impl StopSignal {
    /// Waits up to `period`; true once stopped.
    fn wait(&self, period: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return true;
        }
        *self
            .signal
            .wait_timeout(stopped, period)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.signal.notify_all();
    }
}

/// An admitted device operation: held while the executor call runs, released (and, for
/// an executor without a meter, charged with the call's duration) when dropped.
#[must_use = "the operation is released when this is dropped"]
pub struct Admission {
    sched: Arc<Scheduler>,
    tenant: TenantId,
    session: u64,
    started: Instant,
    admitted: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.admitted {
            self.sched.release(self.tenant, self.session, self.started);
        }
    }
}

impl Scheduler {
    /// A scheduler with its watchdog running.
    pub fn new(config: SchedConfig) -> Arc<Scheduler> {
        let sched = Arc::new(Scheduler {
            config,
            state: Mutex::new(State {
                tenants: HashMap::new(),
                floor: 0,
                stopping: false,
            }),
            changed: Condvar::new(),
            watchdog: Mutex::new(None),
            stop: Arc::new(StopSignal::default()),
            enforce: AtomicBool::new(config.enforce),
        });
        let (weak, stop) = (Arc::downgrade(&sched), sched.stop.clone());
        match std::thread::Builder::new()
            .name("vgpu-watchdog".into())
            .spawn(move || watchdog(weak, &stop))
        {
            Ok(thread) => *sched.watchdog.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread),
            Err(e) => {
                log::error!("watchdog thread: {e}; work past the kernel timeout is not ended")
            }
        }
        sched
    }

    pub fn config(&self) -> SchedConfig {
        SchedConfig {
            enforce: self.enforce.load(Ordering::Relaxed),
            ..self.config
        }
    }

    /// Turns admission on or off from now on (see [`SchedConfig::enforce`]); device time is
    /// measured either way.
    pub fn set_enforce(&self, on: bool) {
        self.enforce.store(on, Ordering::Relaxed);
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a tenant; it starts level with the busiest tenants, not behind them.
    pub fn add(&self, tenant: TenantId, weight: u32) {
        let mut st = self.lock();
        let vtime = st.floor;
        st.tenants.insert(
            tenant,
            Tenant {
                weight: weight.max(1),
                vtime,
                device_ns: 0,
                waited_ns: 0,
                timeouts: 0,
                sessions: HashMap::new(),
                session_floor: 0,
                reserved: 0,
                reserved_at: None,
                waiting: false,
                op_ns: FIRST_OP_ESTIMATE_NS,
                progress_at: Instant::now(),
                active_at: Instant::now(),
                removed: false,
            },
        );
    }

    /// Removes a tenant: a worker waiting in [`Scheduler::admit`] for it returns at once.
    pub fn remove(&self, tenant: TenantId) {
        let mut st = self.lock();
        if let Some(t) = st.tenants.get_mut(&tenant) {
            t.removed = true;
            if t.reserved == 0 {
                st.tenants.remove(&tenant);
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Changes a tenant's weight from now on; false if there is no such tenant.
    pub fn set_weight(&self, tenant: TenantId, weight: u32) -> bool {
        let mut st = self.lock();
        let found = match st.tenants.get_mut(&tenant) {
            Some(t) if !t.removed => {
                t.weight = weight.max(1);
                true
            }
            _ => false,
        };
        drop(st);
        self.changed.notify_all();
        found
    }

    /// Starts accounting a session's executor.
    pub fn attach(
        &self,
        tenant: TenantId,
        session: u64,
        meter: Option<Arc<dyn DeviceMeter>>,
        killer: Option<Killer>,
    ) {
        let mut st = self.lock();
        if let Some(t) = st.tenants.get_mut(&tenant) {
            let last = meter.as_ref().map(|m| m.read()).unwrap_or_default();
            t.sessions.insert(
                session,
                SessionMeter {
                    meter,
                    killer,
                    last,
                    progress_at: Instant::now(),
                    device_ns: 0,
                    vt: 0,
                    picked_at: None,
                    busy_since: None,
                    killed: false,
                },
            );
        }
    }

    /// Stops accounting a session's executor (closed or lost), after charging what it
    /// finished since last looked at.
    pub fn detach(&self, tenant: TenantId, session: u64) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(t) = st.tenants.get_mut(&tenant) {
            refresh_tenant(t, now);
            t.sessions.remove(&session);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Device time of each of a tenant's sessions with an executor, in nanoseconds, by
    /// session id (ascending).
    pub fn session_stats(&self, tenant: TenantId) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        let now = Instant::now();
        let Some(t) = st.tenants.get_mut(&tenant) else {
            return Vec::new();
        };
        refresh_tenant(t, now);
        let mut rows: Vec<(u64, u64)> = t
            .sessions
            .iter()
            .map(|(&sid, s)| (sid, s.device_ns))
            .collect();
        rows.sort_unstable();
        rows
    }

    /// Which of a tenant's `waiting` sessions (not empty) goes next: the one whose work
    /// took the least device time, a session back from idle starting one slice behind the
    /// others rather than with the credit of its idle time. Sessions share their VM's
    /// device time equally this way.
    pub fn pick_session(&self, tenant: TenantId, waiting: &[u64]) -> u64 {
        let first = waiting.first().copied().unwrap_or_default();
        let mut st = self.lock();
        let now = Instant::now();
        let slice = self.config.slice;
        let Some(t) = st.tenants.get_mut(&tenant) else {
            return first;
        };
        refresh_tenant(t, now);
        let floor = t.session_floor.saturating_sub(slice.as_nanos() as u64);
        let mut best: Option<(u64, u64)> = None;
        for &sid in waiting {
            let Some(s) = t.sessions.get_mut(&sid) else {
                continue;
            };
            let idle = s
                .picked_at
                .map_or(true, |at| now.saturating_duration_since(at) >= slice);
            if idle {
                s.vt = s.vt.max(floor);
            }
            if best.map_or(true, |(_, vt)| s.vt < vt) {
                best = Some((sid, s.vt));
            }
        }
        let Some((sid, vt)) = best else {
            return first;
        };
        t.session_floor = t.session_floor.max(vt);
        if let Some(s) = t.sessions.get_mut(&sid) {
            s.picked_at = Some(now);
        }
        sid
    }

    pub fn stats(&self, tenant: TenantId) -> Option<SchedStats> {
        let mut st = self.lock();
        let now = Instant::now();
        let t = st.tenants.get_mut(&tenant)?;
        refresh_tenant(t, now);
        Some(SchedStats {
            weight: t.weight,
            device_ns: t.device_ns,
            waited_ns: t.waited_ns,
            in_flight: t.in_flight(),
            timeouts: t.timeouts,
        })
    }

    /// Waits until the tenant may hand one more operation of `session` to the device.
    /// Returns at once for a tenant that is gone (the operation then fails on its own).
    /// The admission holds the scheduler, so a caller may go on borrowing its own state
    /// mutably while the operation runs.
    pub fn admit(self: &Arc<Self>, tenant: TenantId, session: u64) -> Admission {
        let started = Instant::now();
        let mut st = self.lock();
        let mut admitted = false;
        let mut arrived = false;
        loop {
            let now = Instant::now();
            refresh(&mut st, now, self.config.idle);
            if st.stopping {
                break;
            }
            let Some(me) = st.tenants.get(&tenant) else {
                break;
            };
            if me.removed {
                break;
            }
            if !arrived {
                arrived = true;
                if !me.active(now, self.config.idle) {
                    arrive(&mut st, tenant, self.config.slice);
                }
                if let Some(me) = st.tenants.get_mut(&tenant) {
                    me.waiting = true;
                }
            }
            let enforce = self.enforce.load(Ordering::Relaxed);
            if !enforce || may_go(&st, tenant, &self.config, now) {
                let me = st.tenants.get_mut(&tenant).expect("checked above");
                if me.in_flight() == 0 {
                    // Its work goes onto the device now: a stall counts from here.
                    me.progress_at = now;
                }
                me.waiting = false;
                me.active_at = now;
                me.reserved += 1;
                if let Some(s) = me.sessions.get_mut(&session) {
                    if s.meter.is_none() {
                        s.busy_since = Some(now);
                    }
                }
                me.reserved_at.get_or_insert(now);
                me.waited_ns = me
                    .waited_ns
                    .saturating_add(now.duration_since(started).as_nanos() as u64);
                admitted = true;
                break;
            }
            st = self
                .changed
                .wait_timeout(st, self.config.poll)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if !admitted {
            if let Some(me) = st.tenants.get_mut(&tenant) {
                me.waiting = false;
            }
        }
        Admission {
            sched: self.clone(),
            tenant,
            session,
            started: Instant::now(),
            admitted,
        }
    }

    fn release(&self, tenant: TenantId, session: u64, started: Instant) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(t) = st.tenants.get_mut(&tenant) {
            t.reserved = t.reserved.saturating_sub(1);
            t.active_at = now;
            if t.reserved == 0 {
                t.reserved_at = None;
            }
            // Without a meter the call did the work: its duration is the device time.
            let synchronous = t.sessions.get(&session).map_or(true, |s| s.meter.is_none());
            if synchronous {
                let ns = now.duration_since(started).as_nanos() as u64;
                t.charge(ns, 1);
                t.progress_at = now;
                if let Some(s) = t.sessions.get_mut(&session) {
                    s.busy_since = None;
                    s.device_ns = s.device_ns.saturating_add(ns);
                    s.vt = s.vt.saturating_add(ns);
                    s.progress_at = now;
                }
            }
            if t.removed && t.reserved == 0 {
                st.tenants.remove(&tenant);
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// One round of the watchdog: ends the sessions whose work finished nothing for the
    /// kernel timeout. Returns how many it ended.
    fn check_timeouts(&self) -> usize {
        let timeout = self.config.kernel_timeout;
        let mut st = self.lock();
        let now = Instant::now();
        refresh(&mut st, now, self.config.idle);
        let mut ending = Vec::new();
        for (id, t) in st.tenants.iter_mut() {
            for (sid, s) in t.sessions.iter_mut() {
                let queued_too_long =
                    s.last.in_flight() > 0 && now.duration_since(s.progress_at) >= timeout;
                let running_too_long = s
                    .busy_since
                    .is_some_and(|since| now.duration_since(since) >= timeout);
                let stuck = !s.killed && (queued_too_long || running_too_long);
                if let (true, Some(killer)) = (stuck, &s.killer) {
                    s.killed = true;
                    t.timeouts += 1;
                    ending.push((*id, *sid, killer.clone()));
                }
            }
        }
        drop(st);
        for (tenant, session, killer) in &ending {
            log::warn!(
                "tenant {}: session {session}'s device work finished nothing for {timeout:?} \
                 (the kernel timeout): its executor is ended",
                tenant.0
            );
            killer.kill(true);
        }
        if !ending.is_empty() {
            self.changed.notify_all();
        }
        ending.len()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.lock().stopping = true;
        self.changed.notify_all();
        self.stop.stop();
        let thread = self
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The watchdog thread: checks a few times per kernel timeout, at least once a second.
/// It holds the scheduler only while it checks, and stops as soon as the scheduler goes.
fn watchdog(sched: Weak<Scheduler>, stop: &StopSignal) {
    loop {
        let period = {
            let Some(s) = sched.upgrade() else {
                return;
            };
            s.check_timeouts();
            (s.config.kernel_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
        };
        if stop.wait(period) {
            return;
        }
    }
}

/// Reads every meter and charges what finished since the last look.
fn refresh(st: &mut State, now: Instant, grace: Duration) {
    for t in st.tenants.values_mut() {
        refresh_tenant(t, now);
        if t.in_flight() > 0 {
            t.active_at = now;
        }
    }
    let busy = st
        .tenants
        .values()
        .filter(|t| t.active(now, grace))
        .map(|t| t.vtime)
        .min();
    if let Some(busy) = busy {
        st.floor = st.floor.max(busy);
    }
}

fn refresh_tenant(t: &mut Tenant, now: Instant) {
    let mut charged = (0u64, 0u64);
    for s in t.sessions.values_mut() {
        let Some(meter) = &s.meter else {
            continue;
        };
        let r = meter.read();
        let ops = r.done.saturating_sub(s.last.done);
        // Counters only grow: a smaller one (a confused worker) charges nothing.
        let ns = r.busy_ns.saturating_sub(s.last.busy_ns);
        if ops > 0 || (s.last.in_flight() == 0 && r.in_flight() > 0) {
            s.progress_at = now;
        }
        if ops > 0 {
            t.progress_at = now;
        }
        s.device_ns = s.device_ns.saturating_add(ns);
        s.vt = s.vt.saturating_add(ns);
        charged.0 = charged.0.saturating_add(ns);
        charged.1 += ops;
        s.last = MeterReading {
            sent: r.sent.max(s.last.sent),
            done: r.done.max(s.last.done),
            busy_ns: r.busy_ns.max(s.last.busy_ns),
        };
    }
    if charged.1 > 0 || charged.0 > 0 {
        t.charge(charged.0, charged.1);
    }
}

/// A tenant that was idle comes back at most one slice behind the floor (the tenants that
/// were busy meanwhile), so the device time it did not use is no credit against them.
fn arrive(st: &mut State, tenant: TenantId, slice: Duration) {
    let floor = st.floor;
    if let Some(me) = st.tenants.get_mut(&tenant) {
        let lag = me.virtual_ns(slice.as_nanos() as u64);
        me.vtime = me.vtime.max(floor.saturating_sub(lag));
    }
}

/// Whether `tenant` may hand one more operation to the device now.
fn may_go(st: &State, tenant: TenantId, config: &SchedConfig, now: Instant) -> bool {
    let me = &st.tenants[&tenant];
    let mine = me.in_flight();
    // Its own bound: enough queued to keep the device busy, not enough to make others wait
    // long. With no other tenant active, [`ALONE_FACTOR`] times as much: a tenant that
    // comes then waits that long once, and the bound is back to normal from there on.
    let alone = st
        .tenants
        .iter()
        .all(|(id, t)| *id == tenant || !t.active(now, config.idle));
    let bound = config.max_in_flight.as_nanos() * if alone { ALONE_FACTOR } else { 1 };
    let queued_ns = u128::from(mine) * u128::from(me.op_ns.max(1));
    if mine >= MIN_IN_FLIGHT_OPS && queued_ns >= bound {
        return false;
    }
    let lead = me.virtual_ns(config.slice.as_nanos() as u64);
    for (id, other) in &st.tenants {
        if *id == tenant || other.removed {
            continue;
        }
        // Someone else's work is on the device and finishing: one tenant at a time.
        let since = now.duration_since(
            other
                .progress_at
                .max(other.reserved_at.unwrap_or(other.progress_at)),
        );
        if other.in_flight() > 0 && since < config.stall {
            return false;
        }
        // A waiting tenant this one is a slice ahead of goes first.
        if other.waiting && me.vtime > other.vtime.saturating_add(lead) {
            return false;
        }
        // Of two that wait with the device free, the one further behind goes first.
        if other.waiting && mine == 0 && other.in_flight() == 0 && other.vtime < me.vtime {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests;
