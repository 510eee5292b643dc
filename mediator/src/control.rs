// SPDX-License-Identifier: Apache-2.0
//! The control socket: the host's view of the VMs a daemon serves, and control of their
//! memory quota and weight at run time (what `vgpu-admin` talks to).
//!
//! A Unix stream socket that only its owner may use (mode 0600; root may too). One request
//! per connection: the client writes one line of JSON (at most [`MAX_REQUEST_BYTES`]),
//! the server answers one JSON document on one line and closes the connection.
//!
//! - `{"op":"list"}` answers a [`ListReply`]: the GPUs (each with its VMs, the quota
//!   promised to them and the memory they hold) and every VM (tenant) with its GPU,
//!   transport, sessions, memory used and quota, weight, device time and share of its
//!   GPU's device time.
//! - `{"op":"set","vm":"vm0","quota":"512M"}` (a size as `--mem-quota` takes it, or a
//!   number of bytes) and/or `"weight":300` changes the VM's quota
//!   ([`Mediator::set_quota`]) and weight ([`Mediator::set_weight`]) and answers a
//!   [`SetReply`] with the values now in force.
//! - Any failure answers `{"error":"..."}`.
//!
//! Connections are served one at a time, each within [`CONNECTION_DEADLINE`]: a client
//! that is slow, sends too much or sends garbage gets an error (or is dropped) and the
//! server goes on with the next one.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mediator::{Mediator, TenantConfig, TenantId, TenantUsage};
use crate::sched::Scheduler;

/// The longest request line the server reads, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// How long the server gives one connection to send its request and take the answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// The window of [`VmView::recent_share`].
pub const SHARE_WINDOW: Duration = Duration::from_secs(10);
/// How often the server samples every VM's device time for [`VmView::recent_share`].
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The device (the first GPU), as `list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub name: String,
    /// `cuda` or `cpu`.
    pub executor: String,
    /// Device memory, in bytes.
    pub memory: u64,
    pub multiprocessors: u32,
    /// Compute capability, e.g. `9.0`.
    pub compute_capability: String,
}

/// One GPU the daemon drives, as `list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    /// The GPU's host index (what [`VmView::gpu`] names).
    pub index: u32,
    pub name: String,
    /// `cuda` or `cpu`.
    pub executor: String,
    /// Device memory, in bytes.
    pub memory: u64,
    pub multiprocessors: u32,
    /// Compute capability, e.g. `9.0`.
    pub compute_capability: String,
    /// VMs placed on it.
    pub vms: u32,
    /// The sum of its VMs' quotas, in bytes (it may exceed `memory`).
    pub quota_committed: u64,
    /// Device memory its VMs hold, in bytes.
    pub mem_used: u64,
    /// Device time its VMs' work took since each was added, in seconds.
    pub device_time_s: f64,
    /// Device time its VMs' work took over the last [`ListReply::recent_window_s`]
    /// seconds, divided by that window: about the part of the time the GPU was busy
    /// (work of several VMs that overlaps counts once per VM); 0 when the window is empty.
    pub recent_busy: f64,
}

/// One session of a VM: one guest process with the device open.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: u64,
    /// Device time its work took, in seconds.
    pub device_time_s: f64,
}

/// One VM (tenant), as `list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    /// The host index of the GPU the VM is placed on (see [`ListReply::gpus`]).
    #[serde(default)]
    pub gpu: u32,
    /// `virtio` (a vhost-user socket), `nfs` (the file protocol) or `other`.
    pub transport: String,
    /// Where the VM reaches the daemon: its socket, when known.
    pub endpoint: Option<String>,
    /// Whether a VM (QEMU) is connected to the socket; `null` where the transport has no
    /// connection (NFS).
    pub connected: Option<bool>,
    pub sessions: u32,
    /// Device memory charged to the VM, in bytes: contexts, buffers, modules, local
    /// memory.
    pub mem_used: u64,
    /// Device memory the VM may hold, in bytes.
    pub mem_quota: u64,
    pub allocations: u32,
    pub modules: u32,
    pub weight: u32,
    /// Device time the VM's work took since the VM was added, in seconds.
    pub device_time_s: f64,
    /// The VM's part (0 to 1) of the device time that the work of the listed VMs on its
    /// GPU took since each was added (VMs on other GPUs do not compete with it).
    pub share: f64,
    /// The VM's part (0 to 1) of the device time of the listed VMs on its GPU over the
    /// last [`ListReply::recent_window_s`] seconds; 0 for every VM of a GPU that was idle.
    pub recent_share: f64,
    /// Sessions whose execution context was lost: a device fault, a worker that died, or
    /// the kernel timeout.
    pub restarts: u32,
    /// Sessions the watchdog ended for running past the kernel timeout.
    pub timeouts: u64,
    /// Requests answered since the VM was added.
    pub requests: u64,
    /// Its sessions with an execution context.
    pub session_rows: Vec<SessionView>,
}

/// The answer to `{"op":"list"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListReply {
    /// The first GPU (the only one on a one-GPU host); every GPU is in `gpus`.
    pub device: DeviceView,
    /// Every GPU the daemon drives, in index order.
    #[serde(default)]
    pub gpus: Vec<GpuView>,
    /// Seconds since the control server started.
    pub uptime_s: f64,
    /// The window of every [`VmView::recent_share`], in seconds: [`SHARE_WINDOW`], or less
    /// right after the start.
    pub recent_window_s: f64,
    pub vms: Vec<VmView>,
}

/// The answer to `{"op":"set",...}`: the values in force after the change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetReply {
    pub vm: String,
    pub mem_quota: u64,
    pub mem_used: u64,
    pub weight: u32,
}

/// How a VM reaches the daemon, as the transport that serves it knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    /// `virtio`, `nfs` or `other`.
    pub transport: String,
    pub endpoint: Option<String>,
    pub connected: Option<bool>,
}

/// Tells the server how each VM (by tenant and name) is attached. See
/// [`default_attachment`].
pub type Attachments = Arc<dyn Fn(TenantId, &str) -> Attachment + Send + Sync>;

/// What the mediator alone can tell: the NFS transport names its tenants `nfs:<dir>`.
pub fn default_attachment(name: &str) -> Attachment {
    Attachment {
        transport: if name.starts_with("nfs:") {
            "nfs"
        } else {
            "other"
        }
        .into(),
        endpoint: None,
        connected: None,
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {0} does not end in a file name")]
    NoFileName(PathBuf),
    #[error("control socket {0}: something that is not a socket is in the way; not replaced")]
    NotASocket(PathBuf),
    #[error("control socket {0}: another daemon answers on it")]
    InUse(PathBuf),
    #[error("control socket {path}: {step}")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Why the server refused a request: the client gets `{"error":"<Display>"}`, one line.
/// The JSON errors are fields shown in the message, not sources.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request longer than {MAX_REQUEST_BYTES} bytes: one line of JSON expected")]
    TooLong,
    #[error("no complete request within {} s", CONNECTION_DEADLINE.as_secs())]
    Timeout,
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("empty request: one line of JSON expected, e.g. {{\"op\":\"list\"}}")]
    Empty,
    #[error("request is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("request must be a JSON object such as {{\"op\":\"list\"}}")]
    NotAnObject,
    #[error("\"op\" must be a string")]
    OpNotAString,
    #[error("request has no \"op\" (\"list\" or \"set\")")]
    NoOp,
    #[error("unknown op \"{0}\" (expected \"list\" or \"set\")")]
    UnknownOp(String),
    /// A field the operation does not take; `known` are those it does.
    #[error("unknown field \"{field}\" for {op} (expected {})", known.join(", "))]
    UnknownField {
        field: String,
        op: &'static str,
        known: &'static [&'static str],
    },
    #[error("\"vm\" must be a string (the VM's name)")]
    VmNotAString,
    #[error("set needs \"vm\" (the VM's name)")]
    NoVm,
    #[error("set needs \"quota\" or \"weight\" (or both)")]
    NothingToSet,
    /// No VM has the name; `known` are the names there are.
    #[error(
        "no VM named \"{vm}\" (VMs: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    NoSuchVm { vm: String, known: Vec<String> },
    /// The VM was removed while the request was served.
    #[error("VM \"{0}\" went away")]
    VmGone(String),
    /// A quota given as text that is not a size.
    #[error("bad quota: {0} (e.g. 512M, 8G)")]
    QuotaSize(crate::ParseSizeError),
    /// A quota given as a number that is not a whole number of bytes.
    #[error("bad quota {0}: a whole number of bytes or a size such as \"512M\"")]
    QuotaNumber(serde_json::Number),
    /// A quota that is neither text nor a number.
    #[error("bad quota: a whole number of bytes or a size such as \"512M\"")]
    QuotaType,
    #[error("bad quota: it must be more than 0")]
    QuotaZero,
    /// A weight that is not a whole number of at least 1.
    #[error("bad weight {0}: a whole number of at least 1")]
    Weight(Value),
    #[error("bad weight {0}: at most {max}", max = u32::MAX)]
    WeightTooLarge(u64),
    /// The answer could not be encoded.
    #[error("encoding the answer: {0}")]
    Encode(serde_json::Error),
}

fn io_error<'a>(path: &'a Path, step: &'static str) -> impl FnOnce(io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        step,
        source,
    }
}

/// A running control socket; stopped (and its file removed) by [`ControlServer::stop`] or
/// when dropped.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's device and inode: removed at stop only if it is still this one.
    file_id: (u64, u64),
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Creates the socket at `path`, owner-only (mode 0600) from the moment it can be
    /// reached: it is bound inside a fresh directory of mode 0700 beside `path`, made
    /// 0600, and only then renamed to `path`. A stale socket at `path` (nobody answers on
    /// it) is replaced; anything else there is an error. Serves `mediator` until stopped.
    pub fn start(
        path: &Path,
        mediator: Arc<Mediator>,
        attachments: Attachments,
    ) -> Result<ControlServer, ControlError> {
        let listener = bind_private(path)?;
        let meta = std::fs::metadata(path).map_err(io_error(path, "reading it back"))?;
        let file_id = (meta.dev(), meta.ino());
        listener
            .set_nonblocking(true)
            .map_err(io_error(path, "making it non-blocking"))?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_error(path, "eventfd"))?);
        let server = Server {
            mediator,
            attachments,
            started: Instant::now(),
            samples: VecDeque::new(),
        };
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vgpu-control".into())
            .spawn(move || server.run(listener, &thread_stop))
            .map_err(|e| {
                let _ = std::fs::remove_file(path);
                io_error(path, "starting its thread")(e)
            })?;
        log::info!("{}: control socket (owner only)", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            file_id,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket file.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("{}: signalling the stop: {e}", self.path.display());
        }
        let _ = thread.join();
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("{}: removing the control socket: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Binds a listening socket at `path` that nobody but its owner can reach at any time.
fn bind_private(path: &Path) -> Result<UnixListener, ControlError> {
    if path.file_name().is_none() {
        return Err(ControlError::NoFileName(path.to_path_buf()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ControlError::NotASocket(path.into())),
        Ok(_) if UnixStream::connect(path).is_ok() => return Err(ControlError::InUse(path.into())),
        // A stale socket: the rename below replaces it.
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, "looking at it")(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Short, so that the temporary path fits in a socket address where `path` does.
    let private = parent.join(format!(".ctl{}", std::process::id()));
    if private.exists() {
        // Left by an earlier process with the same id that did not finish: ours to clear.
        let _ = std::fs::remove_file(private.join("s"));
        let _ = std::fs::remove_dir(&private);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_error(path, "creating its private directory"))?;
    let temp = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&temp).map_err(io_error(path, "binding"))?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(path, "making it owner-only (chmod 0600)"))?;
        std::fs::rename(&temp, path).map_err(io_error(path, "moving it into place"))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&temp);
    let _ = std::fs::remove_dir(&private);
    result
}

/// The server thread's state.
struct Server {
    mediator: Arc<Mediator>,
    attachments: Attachments,
    started: Instant,
    /// Every VM's device time, sampled every [`SAMPLE_EVERY`], oldest first, reaching back
    /// [`SHARE_WINDOW`].
    samples: VecDeque<(Instant, HashMap<TenantId, u64>)>,
}

impl Server {
    fn run(mut self, listener: UnixListener, stop: &EventFd) {
        self.sample(Instant::now());
        loop {
            let (incoming, stopped) = wait(listener.as_raw_fd(), stop.as_raw_fd(), SAMPLE_EVERY);
            if stopped {
                return;
            }
            let now = Instant::now();
            if self
                .samples
                .back()
                .map_or(true, |(at, _)| now.duration_since(*at) >= SAMPLE_EVERY)
            {
                self.sample(now);
            }
            if !incoming {
                continue;
            }
            match listener.accept() {
                Ok((stream, _)) => self.serve(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // E.g. out of file descriptors: do not spin.
                    log::warn!("control socket: accepting a connection: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Device time of every VM now, by tenant.
    fn device_times(&self) -> HashMap<TenantId, u64> {
        self.mediator
            .tenants()
            .into_iter()
            .filter_map(|t| Some((t, self.mediator.usage(t)?.device_ns)))
            .collect()
    }

    fn sample(&mut self, now: Instant) {
        let times = self.device_times();
        self.samples.push_back((now, times));
        // Keep the newest sample at least a window old, and nothing older.
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) >= SHARE_WINDOW {
            self.samples.pop_front();
        }
    }

    fn serve(&mut self, mut stream: UnixStream) {
        let deadline = Instant::now() + CONNECTION_DEADLINE;
        if let Err(e) = stream.set_nonblocking(false) {
            log::debug!("control socket: {e}");
            return;
        }
        let (reply, drain) = match read_request(&mut stream, deadline) {
            Ok(Line::Complete(line)) => (self.handle(&line), false),
            Ok(Line::TooLong) => (error(&RequestError::TooLong), true),
            Err(e) if is_timeout(&e) => (error(&RequestError::Timeout), false),
            Err(e) => {
                log::debug!("control socket: reading a request: {e}");
                return;
            }
        };
        let mut text = reply.to_string();
        text.push('\n');
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let written = stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| stream.write_all(text.as_bytes()));
        if let Err(e) = written {
            log::debug!("control socket: writing an answer: {e}");
            return;
        }
        if drain {
            // Read what the client still sends of its oversized line, so that it sees the
            // answer rather than a reset connection; bounded by the deadline.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 16 << 10];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                    break;
                }
                match stream.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(n) if sink[..n].contains(&b'\n') => break,
                    Ok(_) => {}
                }
            }
        }
    }

    /// The answer to one request line.
    fn handle(&self, line: &[u8]) -> Value {
        match self.dispatch(line) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("control socket: request refused: {e}");
                error(&e)
            }
        }
    }

    fn dispatch(&self, line: &[u8]) -> Result<Value, RequestError> {
        let text = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
        let text = text.trim();
        if text.is_empty() {
            return Err(RequestError::Empty);
        }
        let request: Value = serde_json::from_str(text).map_err(RequestError::NotJson)?;
        let Value::Object(fields) = request else {
            return Err(RequestError::NotAnObject);
        };
        let op = match fields.get("op") {
            Some(Value::String(op)) => op.as_str(),
            Some(_) => return Err(RequestError::OpNotAString),
            None => return Err(RequestError::NoOp),
        };
        match op {
            "list" => {
                only_fields(&fields, "list", &["op"])?;
                to_value(self.list())
            }
            "set" => {
                only_fields(&fields, "set", &["op", "vm", "quota", "weight"])?;
                to_value(self.set(&fields)?)
            }
            other => Err(RequestError::UnknownOp(other.to_string())),
        }
    }

    fn list(&self) -> ListReply {
        let m = &self.mediator;
        let device = m.device();
        let now = Instant::now();
        let times = self.device_times();
        let (since, base) = match self.samples.front() {
            Some((at, base)) => (*at, Some(base)),
            None => (self.started, None),
        };
        let window = now.duration_since(since).as_secs_f64();
        // Every VM with its device time, in all and over the window.
        struct Row {
            tenant: TenantId,
            config: TenantConfig,
            usage: TenantUsage,
            sched: Arc<Scheduler>,
            gpu: u32,
            device_ns: u64,
            recent_ns: u64,
        }
        let mut rows = Vec::new();
        for t in m.tenants() {
            let (Some(config), Some(usage), Some(sched), Some(gpu)) = (
                m.tenant_config(t),
                m.usage(t),
                m.scheduler_of(t),
                m.tenant_gpu(t),
            ) else {
                continue;
            };
            let device_ns = times.get(&t).copied().unwrap_or(usage.device_ns);
            let then = base.and_then(|b| b.get(&t)).copied().unwrap_or(0);
            let recent_ns = device_ns.saturating_sub(then);
            rows.push(Row {
                tenant: t,
                config,
                usage,
                sched,
                gpu,
                device_ns,
                recent_ns,
            });
        }
        // VMs share only the GPU they are on: each GPU's device time, in all and recent.
        let mut totals: HashMap<u32, (u64, u64)> = HashMap::new();
        for row in &rows {
            let total = totals.entry(row.gpu).or_default();
            total.0 = total.0.saturating_add(row.device_ns);
            total.1 = total.1.saturating_add(row.recent_ns);
        }
        let fraction = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        let mut vms = Vec::new();
        for row in rows {
            let Row {
                tenant: t,
                config,
                usage,
                sched,
                gpu,
                device_ns,
                recent_ns,
            } = row;
            let attachment = (self.attachments)(t, &config.name);
            let (total, recent_total) = totals.get(&gpu).copied().unwrap_or_default();
            vms.push(VmView {
                gpu,
                transport: attachment.transport,
                endpoint: attachment.endpoint,
                connected: attachment.connected,
                sessions: usage.sessions,
                mem_used: usage.mem_used,
                mem_quota: config.mem_quota,
                allocations: usage.allocations,
                modules: usage.modules,
                weight: config.weight,
                device_time_s: seconds(device_ns),
                share: fraction(device_ns, total),
                recent_share: fraction(recent_ns, recent_total),
                restarts: usage.restarts,
                timeouts: usage.timeouts,
                requests: usage.requests,
                session_rows: sched
                    .session_stats(t)
                    .into_iter()
                    .map(|(id, ns)| SessionView {
                        id,
                        device_time_s: seconds(ns),
                    })
                    .collect(),
                name: config.name,
            });
        }
        // The sockets' VMs first, then the NFS ones, each by name.
        let rank = |v: &VmView| match v.transport.as_str() {
            "virtio" => 0,
            "nfs" => 1,
            _ => 2,
        };
        vms.sort_by(|a, b| (rank(a), &a.name).cmp(&(rank(b), &b.name)));
        let gpus = m
            .gpu_usage()
            .into_iter()
            .map(|g| {
                let (total, recent_total) = totals.get(&g.index).copied().unwrap_or_default();
                let d = &g.device;
                GpuView {
                    index: g.index,
                    name: d.name.clone(),
                    executor: d.kind.name().into(),
                    memory: d.total_memory,
                    multiprocessors: d.multiprocessors,
                    compute_capability: format!("{}.{}", d.cc_major, d.cc_minor),
                    vms: g.tenants,
                    quota_committed: g.quota_committed,
                    mem_used: g.mem_used,
                    device_time_s: seconds(total),
                    recent_busy: if window > 0.0 {
                        seconds(recent_total) / window
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        ListReply {
            device: DeviceView {
                name: device.name.clone(),
                executor: device.kind.name().into(),
                memory: device.total_memory,
                multiprocessors: device.multiprocessors,
                compute_capability: format!("{}.{}", device.cc_major, device.cc_minor),
            },
            gpus,
            uptime_s: now.duration_since(self.started).as_secs_f64(),
            recent_window_s: window,
            vms,
        }
    }

    fn set(&self, fields: &Map<String, Value>) -> Result<SetReply, RequestError> {
        let m = &self.mediator;
        let vm = match fields.get("vm") {
            Some(Value::String(vm)) => vm.as_str(),
            Some(_) => return Err(RequestError::VmNotAString),
            None => return Err(RequestError::NoVm),
        };
        let quota = fields.get("quota").map(parse_quota).transpose()?;
        let weight = fields.get("weight").map(parse_weight).transpose()?;
        if quota.is_none() && weight.is_none() {
            return Err(RequestError::NothingToSet);
        }
        let tenants = m.tenants();
        let names: Vec<(TenantId, String)> = tenants
            .iter()
            .filter_map(|&t| Some((t, m.tenant_config(t)?.name)))
            .collect();
        let Some(&(tenant, _)) = names.iter().find(|(_, n)| n == vm) else {
            return Err(RequestError::NoSuchVm {
                vm: vm.to_string(),
                known: names.into_iter().map(|(_, n)| n).collect(),
            });
        };
        let gone = || RequestError::VmGone(vm.to_string());
        if let Some(bytes) = quota {
            if !m.set_quota(tenant, bytes) {
                return Err(gone());
            }
        }
        if let Some(w) = weight {
            if m.weight(tenant) != Some(w) && !m.set_weight(tenant, w) {
                return Err(gone());
            }
        }
        log::debug!(
            "control socket: {vm}: {}{}",
            quota.map_or(String::new(), |q| format!("quota {} MiB ", q >> 20)),
            weight.map_or(String::new(), |w| format!("weight {w}"))
        );
        let config = m.tenant_config(tenant).ok_or_else(gone)?;
        Ok(SetReply {
            vm: config.name,
            mem_quota: config.mem_quota,
            mem_used: m.usage(tenant).map_or(0, |u| u.mem_used),
            weight: config.weight,
        })
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The answer to a refused request.
fn error(e: &RequestError) -> Value {
    json!({ "error": e.to_string() })
}

fn to_value<T: Serialize>(reply: T) -> Result<Value, RequestError> {
    serde_json::to_value(reply).map_err(RequestError::Encode)
}

fn only_fields(
    fields: &Map<String, Value>,
    op: &'static str,
    known: &'static [&'static str],
) -> Result<(), RequestError> {
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(RequestError::UnknownField {
            field: k.clone(),
            op,
            known,
        }),
        None => Ok(()),
    }
}

/// A quota: a size such as `512M` or a number of bytes; more than 0.
fn parse_quota(value: &Value) -> Result<u64, RequestError> {
    let bytes = match value {
        Value::String(s) => crate::parse_size(s).map_err(RequestError::QuotaSize)?,
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| RequestError::QuotaNumber(n.clone()))?,
        _ => return Err(RequestError::QuotaType),
    };
    if bytes == 0 {
        return Err(RequestError::QuotaZero);
    }
    Ok(bytes)
}

/// A weight: a whole number from 1 to 2^32 - 1.
fn parse_weight(value: &Value) -> Result<u32, RequestError> {
    let bad = || RequestError::Weight(value.clone());
    let w = value.as_u64().ok_or_else(bad)?;
    if w == 0 {
        return Err(bad());
    }
    u32::try_from(w).map_err(|_| RequestError::WeightTooLarge(w))
}

enum Line {
    Complete(Vec<u8>),
    TooLong,
}

/// Reads up to the first newline (or the end of the stream), within `deadline`.
fn read_request(stream: &mut UnixStream, deadline: Instant) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Line::Complete(line));
        }
        let new = &chunk[..n];
        let end = new.iter().position(|&b| b == b'\n');
        line.extend_from_slice(&new[..end.unwrap_or(n)]);
        if line.len() > MAX_REQUEST_BYTES {
            return Ok(Line::TooLong);
        }
        if end.is_some() {
            return Ok(Line::Complete(line));
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// Waits until `listener` or `stop` is readable, or `timeout` passes: (incoming, stopped).
fn wait(listener: i32, stop: i32, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        // EINTR or a transient failure: look again after a short pause.
        std::thread::sleep(Duration::from_millis(10));
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// Why a request to the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the path (the daemon is not running, or runs without it).
    #[error("cannot reach the daemon at {}: {error}", path.display())]
    Connect { path: PathBuf, error: io::Error },
    #[error("talking to the daemon at {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("the daemon's answer is not JSON: {0}")]
    BadReply(String),
    /// The daemon refused the request: its message.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the control socket at `path` and returns the daemon's answer; an
/// answer `{"error":...}` is [`ClientError::Refused`].
pub fn request(path: &Path, request: &Value, timeout: Duration) -> Result<Value, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|error| ClientError::Connect {
        path: path.to_path_buf(),
        error,
    })?;
    let io = |error| ClientError::Io {
        path: path.to_path_buf(),
        error,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(io)?;
    let value: Value = serde_json::from_str(answer.trim()).map_err(|e| {
        ClientError::BadReply(format!(
            "{e}: {}",
            answer.chars().take(200).collect::<String>()
        ))
    })?;
    if let Some(message) = value.get("error") {
        let message = message
            .as_str()
            .map_or_else(|| message.to_string(), str::to_owned);
        return Err(ClientError::Refused(message));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuExecutorFactory;

    fn mediator_with(names: &[&str]) -> (Arc<Mediator>, Vec<TenantId>) {
        let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let ids = names
            .iter()
            .map(|n| {
                m.add_tenant(TenantConfig {
                    name: (*n).into(),
                    mem_quota: 64 << 20,
                    weight: 100,
                })
                .unwrap()
            })
            .collect();
        (m, ids)
    }

    fn server(m: &Arc<Mediator>) -> Server {
        Server {
            mediator: m.clone(),
            attachments: Arc::new(|_, name: &str| default_attachment(name)),
            started: Instant::now(),
            samples: VecDeque::new(),
        }
    }

    fn ask(s: &Server, line: &str) -> Value {
        s.handle(line.as_bytes())
    }

    fn error_of(v: &Value) -> String {
        v.get("error")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no error in {v}"))
            .to_string()
    }

    #[test]
    fn quotas_and_weights_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_quota(&json!("512M")).ok(), Some(512 << 20));
        assert_eq!(parse_quota(&json!(4096)).ok(), Some(4096));
        assert_eq!(
            parse_quota(&json!("12Q")).unwrap_err().to_string(),
            "bad quota: invalid size unit in '12Q' (use K, M, G or T) (e.g. 512M, 8G)"
        );
        assert!(matches!(
            parse_quota(&json!(0)),
            Err(RequestError::QuotaZero)
        ));
        assert!(matches!(
            parse_quota(&json!("0M")),
            Err(RequestError::QuotaZero)
        ));
        assert_eq!(
            parse_quota(&json!(-5)).unwrap_err().to_string(),
            "bad quota -5: a whole number of bytes or a size such as \"512M\""
        );
        assert!(matches!(
            parse_quota(&json!(1.5)),
            Err(RequestError::QuotaNumber(_))
        ));
        assert!(matches!(
            parse_quota(&json!(true)),
            Err(RequestError::QuotaType)
        ));
        assert_eq!(parse_weight(&json!(300)).ok(), Some(300));
        assert_eq!(
            parse_weight(&json!(0)).unwrap_err().to_string(),
            "bad weight 0: a whole number of at least 1"
        );
        assert!(parse_weight(&json!(-1)).is_err());
        assert_eq!(
            parse_weight(&json!("300")).unwrap_err().to_string(),
            "bad weight \"300\": a whole number of at least 1"
        );
        assert_eq!(
            parse_weight(&json!(5_000_000_000u64))
                .unwrap_err()
                .to_string(),
            "bad weight 5000000000: at most 4294967295"
        );
    }

    #[test]
    fn requests_are_answered_and_bad_ones_get_clear_errors() {
        let (m, ids) = mediator_with(&["vm0", "nfs:vm1"]);
        let s = server(&m);
        let list: ListReply = serde_json::from_value(ask(&s, r#"{"op":"list"}"#)).unwrap();
        assert_eq!(list.device.executor, "cpu");
        let names: Vec<_> = list.vms.iter().map(|v| v.name.as_str()).collect();
        // NFS VMs after the others.
        assert_eq!(names, ["nfs:vm1", "vm0"]);
        assert_eq!(list.vms[0].transport, "nfs");
        assert_eq!(list.vms[1].transport, "other");
        assert_eq!(list.vms[1].mem_quota, 64 << 20);

        let set: SetReply = serde_json::from_value(ask(
            &s,
            r#"{"op":"set","vm":"vm0","quota":"16M","weight":250}"#,
        ))
        .unwrap();
        assert_eq!((set.mem_quota, set.weight), (16 << 20, 250));
        assert_eq!(m.quota(ids[0]), Some(16 << 20));
        assert_eq!(m.weight(ids[0]), Some(250));
        assert_eq!(m.device_config(ids[0]).unwrap().mem_quota, 16 << 20);

        for (line, expect) in [
            ("", "empty request"),
            ("{", "not valid JSON"),
            ("[1]", "JSON object"),
            (r#"{"op":7}"#, "must be a string"),
            (r#"{"vm":"vm0"}"#, "no \"op\""),
            (r#"{"op":"reboot"}"#, "unknown op \"reboot\""),
            (r#"{"op":"list","x":1}"#, "unknown field \"x\""),
            (
                r#"{"op":"set","vm":"vm9","weight":3}"#,
                "no VM named \"vm9\"",
            ),
            (
                r#"{"op":"set","vm":"vm0"}"#,
                "needs \"quota\" or \"weight\"",
            ),
            (r#"{"op":"set","weight":3}"#, "needs \"vm\""),
            (r#"{"op":"set","vm":"vm0","weight":0}"#, "bad weight"),
            (r#"{"op":"set","vm":"vm0","quota":"lots"}"#, "bad quota"),
            (
                r#"{"op":"set","vm":"vm0","weigth":3}"#,
                "unknown field \"weigth\"",
            ),
        ] {
            let e = error_of(&ask(&s, line));
            assert!(e.contains(expect), "{line}: {e}");
            assert!(!e.contains('\n'), "{line}: {e}");
        }
        assert_eq!(
            error_of(&ask(&s, r#"{"op":"set","vm":"vm9","weight":3}"#)),
            "no VM named \"vm9\" (VMs: vm0, nfs:vm1)"
        );
        assert_eq!(
            error_of(&ask(&s, r#"{"op":"list","x":1}"#)),
            "unknown field \"x\" for list (expected op)"
        );
        assert_eq!(
            error_of(&ask(&s, "")),
            "empty request: one line of JSON expected, e.g. {\"op\":\"list\"}"
        );
        assert!(error_of(&s.handle(&[0xff, 0xfe])).contains("UTF-8"));
        // Nothing changed by the refused requests.
        assert_eq!(m.weight(ids[0]), Some(250));
        assert_eq!(m.quota(ids[0]), Some(16 << 20));
    }

    #[test]
    fn shares_divide_the_device_time_of_the_listed_vms() {
        let (m, _) = mediator_with(&["vm0", "vm1"]);
        let s = server(&m);
        // No device time yet: every share is 0, not NaN.
        let list = s.list();
        assert!(list
            .vms
            .iter()
            .all(|v| v.share == 0.0 && v.recent_share == 0.0));
    }

    /// Opens a session and runs a small kernel on it: some device time.
    fn work(m: &Mediator, t: TenantId) {
        use vgpu_protocol::{Command, Launch, Param, Request, Status, BUILTIN_MODULE};
        let call = |session: u64, command: Command| {
            let r = m.call(t, Request::new(session, command.clone()));
            assert_eq!(r.status, Status::Ok, "{command:?}");
            r.value0
        };
        let s = call(0, Command::SessionOpen);
        let x = call(s, Command::Alloc { size: 4096 });
        let launch = Launch {
            module: BUILTIN_MODULE,
            kernel: "fill_u32".into(),
            grid: [1, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
            params: vec![Param::Buffer(x), Param::u32(7), Param::u32(256)],
        };
        for _ in 0..4 {
            call(s, Command::Launch(launch.clone()));
        }
        call(s, Command::Sync);
    }

    #[test]
    fn each_gpu_is_listed_and_vms_share_only_the_device_time_of_their_gpu() {
        use crate::{ExecutorFactory, Limits, Placement, SchedConfig};
        let factory = || -> Arc<dyn ExecutorFactory> { Arc::new(CpuExecutorFactory::simulated(2)) };
        let m = Mediator::with_gpus(
            vec![(0, factory()), (1, factory())],
            Limits::default(),
            SchedConfig::default(),
        );
        let add = |name: &str, quota: u64, gpu: u32| {
            m.add_tenant_on(
                TenantConfig {
                    name: name.into(),
                    mem_quota: quota,
                    weight: 100,
                },
                Placement::Gpu(gpu),
            )
            .unwrap()
        };
        let (a, b, c) = (
            add("vm-a", 64 << 20, 0),
            add("vm-b", 32 << 20, 0),
            add("vm-c", 16 << 20, 1),
        );
        let s = server(&m);

        // Before any work: both GPUs, every share 0.
        let list = s.list();
        assert_eq!(list.gpus.len(), 2);
        assert!(list
            .vms
            .iter()
            .all(|v| v.share == 0.0 && v.recent_share == 0.0));
        assert!(list
            .gpus
            .iter()
            .all(|g| g.device_time_s == 0.0 && g.recent_busy == 0.0));

        for t in [a, b, c] {
            work(&m, t);
        }
        let list = s.list();
        let memory = CpuExecutorFactory::simulated(2).device().total_memory;
        let [g0, g1] = [&list.gpus[0], &list.gpus[1]];
        assert_eq!((g0.index, g0.vms, g0.quota_committed), (0, 2, 96 << 20));
        assert_eq!((g1.index, g1.vms, g1.quota_committed), (1, 1, 16 << 20));
        for g in [g0, g1] {
            assert_eq!((g.executor.as_str(), g.memory), ("cpu", memory));
            assert_eq!(g.name, m.device().name);
        }
        let used = |t| m.usage(t).unwrap().mem_used;
        assert_eq!(g0.mem_used, used(a) + used(b));
        assert_eq!(g1.mem_used, used(c));
        assert!(g1.mem_used >= 4096);
        // The first GPU is still the device.
        assert_eq!(
            (list.device.name.as_str(), list.device.memory),
            (g0.name.as_str(), memory)
        );

        let vm = |name: &str| list.vms.iter().find(|v| v.name == name).unwrap();
        let (va, vb, vc) = (vm("vm-a"), vm("vm-b"), vm("vm-c"));
        assert_eq!((va.gpu, vb.gpu, vc.gpu), (0, 0, 1));
        // vm-c is alone on GPU 1: all of its device time is vm-c's.
        assert!(vc.device_time_s > 0.0);
        assert_eq!((vc.share, vc.recent_share), (1.0, 1.0));
        // vm-a and vm-b split GPU 0's.
        for v in [va, vb] {
            assert!(v.share > 0.0 && v.share < 1.0, "{v:?}");
            assert!(v.recent_share > 0.0 && v.recent_share < 1.0, "{v:?}");
        }
        assert!((va.share + vb.share - 1.0).abs() < 1e-9);
        assert!((va.recent_share + vb.recent_share - 1.0).abs() < 1e-9);
        assert!((g0.device_time_s - (va.device_time_s + vb.device_time_s)).abs() < 1e-9);
        assert_eq!(g1.device_time_s, vc.device_time_s);

        // On the wire: the new fields by name.
        let v = ask(&s, r#"{"op":"list"}"#);
        assert_eq!(v["gpus"][1]["index"], 1);
        assert_eq!(v["gpus"][1]["vms"], 1);
        assert_eq!(v["gpus"][0]["quota_committed"], 96u64 << 20);
        let on_wire: Vec<(String, u64)> = v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["gpu"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            on_wire,
            [("vm-a".into(), 0), ("vm-b".into(), 0), ("vm-c".into(), 1)]
        );

        // A VM that goes away leaves its GPU; the others' shares stay within their GPU.
        m.remove_tenant(b);
        let list = s.list();
        assert_eq!(
            (list.gpus[0].vms, list.gpus[0].quota_committed),
            (1, 64 << 20)
        );
        assert!(list.vms.iter().all(|v| v.share == 1.0));
    }

    #[test]
    fn a_reply_without_gpus_still_decodes() {
        let (m, _) = mediator_with(&["vm0"]);
        let mut v = to_value(server(&m).list()).unwrap();
        let object = v.as_object_mut().unwrap();
        assert_eq!(object["gpus"].as_array().map(Vec::len), Some(1));
        object.remove("gpus");
        object["vms"][0].as_object_mut().unwrap().remove("gpu");
        let list: ListReply = serde_json::from_value(v).unwrap();
        assert!(list.gpus.is_empty());
        assert_eq!((list.vms[0].name.as_str(), list.vms[0].gpu), ("vm0", 0));
    }

    #[test]
    fn the_socket_is_owner_only_replaces_a_stale_one_and_refuses_a_live_one() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("vgpu.control");
        // A stale socket left by a daemon that died.
        drop(UnixListener::bind(&path).unwrap());
        let (m, _) = mediator_with(&["vm0"]);
        let attach: Attachments = Arc::new(|_, name: &str| default_attachment(name));
        let server = ControlServer::start(&path, m.clone(), attach.clone()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Only the socket is left in the directory: no private directory stays behind.
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 1);
        assert!(matches!(
            ControlServer::start(&path, m.clone(), attach.clone()),
            Err(ControlError::InUse(_))
        ));
        let v = request(&path, &json!({"op":"list"}), Duration::from_secs(5)).unwrap();
        assert_eq!(v["vms"][0]["name"], "vm0");
        server.stop();
        assert!(!path.exists());
        assert!(matches!(
            request(&path, &json!({"op":"list"}), Duration::from_secs(1)),
            Err(ClientError::Connect { .. })
        ));

        let file = dir.as_path().join("a-file");
        std::fs::write(&file, "keep me").unwrap();
        assert!(matches!(
            ControlServer::start(&file, m, attach),
            Err(ControlError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
