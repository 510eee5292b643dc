// SPDX-License-Identifier: Apache-2.0
//! Prometheus metrics of the mediator, and the HTTP endpoint that serves them.
//!
//! Two kinds of figures:
//! - counters kept on the request path, per tenant, in [`TenantCounters`]: answers by
//!   operation and status, their latency (submission to answer), bytes copied each way,
//!   kernel launches. Atomics only: no lock and no allocation per request;
//! - figures read at scrape time from what the mediator already keeps: each tenant's
//!   [`crate::TenantUsage`] (device memory, sessions, restarts, device time measured on
//!   the device, ...) and its standing with the scheduler, plus the daemon process's own
//!   CPU time and memory.
//!
//! Every scrape walks the mediator's current tenants, so a VM that goes away takes its
//! series with it. Series are labelled `vm` with the tenant's name (made unique with
//! `#<id>` where two tenants share a name) and `gpu` with the host index of the GPU it is
//! placed on; each GPU has its own series too, labelled `gpu` and `device` (its name).
//! [`Mediator::metrics_text`] gives the text; [`serve`] answers `GET /metrics` over HTTP.
//!
//! Metric names (Prometheus conventions: `_total` counters, base units):
//!
//! Every per-VM series also has the label gpu.
//!
//! | name | labels | what |
//! |---|---|---|
//! | `vgpu_requests_total` | vm, op, status | requests answered |
//! | `vgpu_request_duration_seconds` | vm, op | histogram: submission to answer |
//! | `vgpu_copied_bytes_total` | vm, direction (`htod`, `dtoh`) | bytes copied |
//! | `vgpu_kernel_launches_total` | vm | kernel launches accepted |
//! | `vgpu_memory_used_bytes` | vm | device memory charged to the quota |
//! | `vgpu_memory_quota_bytes` | vm | the quota |
//! | `vgpu_memory_charged_bytes` | vm, kind | used, by what holds it |
//! | `vgpu_sessions`, `vgpu_allocations`, `vgpu_modules` | vm | held now |
//! | `vgpu_device_time_seconds_total` | vm | device time (CUDA events) |
//! | `vgpu_sched_wait_seconds_total` | vm | time waited for the device |
//! | `vgpu_in_flight_operations` | vm | operations on or queued for the device |
//! | `vgpu_weight` | vm | share of device time |
//! | `vgpu_worker_restarts_total` | vm | execution contexts lost |
//! | `vgpu_watchdog_timeouts_total` | vm | sessions ended by the kernel timeout |
//! | `vgpu_cancelled_requests_total` | vm | requests dropped by a reset |
//! | `vgpu_host_held_bytes`, `vgpu_host_registered_bytes` | vm | host memory |
//! | `vgpu_host_copies_total` | vm | copies straight from registered host buffers |
//! | `vgpu_gpu_memory_bytes` | gpu, device | memory of the GPU |
//! | `vgpu_gpu_vms` | gpu, device | VMs placed on the GPU |
//! | `vgpu_gpu_quota_committed_bytes` | gpu, device | the sum of their quotas |
//! | `vgpu_gpu_memory_used_bytes` | gpu, device | device memory they hold |
//! | `vgpu_tenants`, `vgpu_device_memory_bytes`, `vgpu_device_info`, `vgpu_build_info` | | the first GPU's device |
//! | `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_start_time_seconds` | | the daemon process |

mod http;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use vgpu_protocol::{Command, Opcode, Status};

use crate::mediator::{GpuUsage, Mediator, TenantId, TenantUsage};

pub use http::{parse_addr, serve, MetricsServer, ParseAddrError, MAX_REQUEST_BYTES, READ_TIMEOUT};

/// Every operation, in wire order, with its `op` label.
pub const OPS: [(Opcode, &str); 21] = [
    (Opcode::Info, "info"),
    (Opcode::SessionOpen, "session_open"),
    (Opcode::SessionClose, "session_close"),
    (Opcode::Alloc, "alloc"),
    (Opcode::Free, "free"),
    (Opcode::Htod, "htod"),
    (Opcode::Dtoh, "dtoh"),
    (Opcode::Dtod, "dtod"),
    (Opcode::Memset, "memset"),
    (Opcode::ModuleLoad, "module_load"),
    (Opcode::ModuleUnload, "module_unload"),
    (Opcode::Launch, "launch"),
    (Opcode::Sync, "sync"),
    (Opcode::Selftest, "selftest"),
    (Opcode::HostRegister, "host_register"),
    (Opcode::HostUnregister, "host_unregister"),
    (Opcode::ModuleLoadImage, "module_load_image"),
    (Opcode::DeviceAttributes, "device_attributes"),
    (Opcode::FunctionInfo, "function_info"),
    (Opcode::ModuleGlobal, "module_global"),
    (Opcode::Compile, "compile"),
];

const STATUSES: usize = Status::ALL.len();

/// Upper bounds of the latency histogram's buckets, in nanoseconds: 10 µs to 10 s.
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The buckets and the one past the last bound (`+Inf`).
const SLOTS: usize = LATENCY_BUCKETS_NS.len() + 1;

/// The `op` label of an operation.
pub fn op_name(op: Opcode) -> &'static str {
    OPS[op_index(op)].1
}

/// The `status` label of a status: its name in lower case, e.g. `quota_exceeded`.
pub fn status_name(status: Status) -> String {
    status.name().to_ascii_lowercase()
}

fn op_index(op: Opcode) -> usize {
    // Opcodes are 1..=21 in wire order (checked by a test).
    (op as usize).wrapping_sub(1).min(OPS.len() - 1)
}

/// The operation of a decoded command.
pub fn opcode(command: &Command) -> Opcode {
    match command {
        Command::Info => Opcode::Info,
        Command::SessionOpen => Opcode::SessionOpen,
        Command::SessionClose => Opcode::SessionClose,
        Command::Alloc { .. } => Opcode::Alloc,
        Command::Free { .. } => Opcode::Free,
        Command::Htod { .. } => Opcode::Htod,
        Command::Dtoh { .. } => Opcode::Dtoh,
        Command::Dtod { .. } => Opcode::Dtod,
        Command::Memset { .. } => Opcode::Memset,
        Command::ModuleLoad { .. } => Opcode::ModuleLoad,
        Command::ModuleUnload { .. } => Opcode::ModuleUnload,
        Command::Launch(_) => Opcode::Launch,
        Command::Sync => Opcode::Sync,
        Command::Selftest { .. } => Opcode::Selftest,
        Command::HostRegister { .. } => Opcode::HostRegister,
        Command::HostUnregister { .. } => Opcode::HostUnregister,
        Command::ModuleLoadImage { .. } => Opcode::ModuleLoadImage,
        Command::DeviceAttributes { .. } => Opcode::DeviceAttributes,
        Command::FunctionInfo { .. } => Opcode::FunctionInfo,
        Command::ModuleGlobal { .. } => Opcode::ModuleGlobal,
        Command::Compile { .. } => Opcode::Compile,
    }
}

/// One operation's latency histogram.
struct Latency {
    /// Answers per bucket (not cumulative); the last is past the last bound.
    slots: [AtomicU64; SLOTS],
    sum_ns: AtomicU64,
}

impl Latency {
    fn new() -> Latency {
        Latency {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A tenant's counters on the request path. Written by the tenant's worker (and by the
/// paths that answer without it: a full budget, a cancellation); read at scrape time.
pub(crate) struct TenantCounters {
    /// Answers by operation and status.
    requests: [[AtomicU64; STATUSES]; OPS.len()],
    latency: [Latency; OPS.len()],
    htod_bytes: AtomicU64,
    dtoh_bytes: AtomicU64,
    launches: AtomicU64,
}

impl TenantCounters {
    pub fn new() -> TenantCounters {
        TenantCounters {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| Latency::new()),
            htod_bytes: AtomicU64::new(0),
            dtoh_bytes: AtomicU64::new(0),
            launches: AtomicU64::new(0),
        }
    }

    /// Counts an answer and the time from its submission.
    pub fn record(&self, op: Opcode, status: Status, elapsed: Duration) {
        let op = op_index(op);
        let status = (status as usize).min(STATUSES - 1);
        self.requests[op][status].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let slot = LATENCY_BUCKETS_NS.partition_point(|&bound| bound < ns);
        let latency = &self.latency[op];
        latency.slots[slot].fetch_add(1, Ordering::Relaxed);
        latency.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn add_htod(&self, bytes: u64) {
        self.htod_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_dtoh(&self, bytes: u64) {
        self.dtoh_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_launch(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> CountersSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut requests = Vec::new();
        for (op, row) in self.requests.iter().enumerate() {
            for (status, n) in row.iter().enumerate() {
                let n = load(n);
                if n > 0 {
                    requests.push((op, status, n));
                }
            }
        }
        let mut latency = Vec::new();
        for (op, l) in self.latency.iter().enumerate() {
            let slots: [u64; SLOTS] = std::array::from_fn(|i| load(&l.slots[i]));
            if slots.iter().any(|&n| n > 0) {
                latency.push((op, slots, load(&l.sum_ns)));
            }
        }
        CountersSnapshot {
            requests,
            latency,
            htod_bytes: load(&self.htod_bytes),
            dtoh_bytes: load(&self.dtoh_bytes),
            launches: load(&self.launches),
        }
    }
}

/// The text format of a scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (ends with `# EOF`).
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// The HTTP content type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

impl Mediator {
    /// Every metric of the mediator and the process now, as OpenMetrics text.
    pub fn metrics_text(&self) -> String {
        self.metrics(Format::OpenMetrics)
    }

    /// Every metric of the mediator and the process now, in `format`.
    pub fn metrics(&self, format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape::take(self)));
        let mut text = String::with_capacity(16 << 10);
        let encoded = match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry),
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            }
        };
        if let Err(e) = encoded {
            // Writing to a String does not fail; an encoder that refuses is a bug here.
            log::error!("encoding the metrics: {e}");
        }
        text
    }
}

#[derive(Debug)]
struct CountersSnapshot {
    /// (op index, status index, count) of the pairs counted at least once.
    requests: Vec<(usize, usize, u64)>,
    /// (op index, per-bucket counts, sum in ns) of the operations answered at least once.
    latency: Vec<(usize, [u64; SLOTS], u64)>,
    htod_bytes: u64,
    dtoh_bytes: u64,
    launches: u64,
}

#[derive(Debug)]
struct TenantScrape {
    vm: String,
    /// The host index of its GPU, as the label shows it.
    gpu: String,
    quota: u64,
    usage: TenantUsage,
    weight: u32,
    in_flight: u64,
    counters: CountersSnapshot,
}

/// Everything one scrape shows, read from the mediator at once and then encoded.
#[derive(Debug)]
struct Scrape {
    device: String,
    executor: &'static str,
    device_memory: u64,
    tenants: Vec<TenantScrape>,
    gpus: Vec<GpuUsage>,
    process: ProcessStats,
}

impl Scrape {
    fn take(m: &Mediator) -> Scrape {
        let device = m.device();
        let mut tenants: Vec<(TenantId, TenantScrape)> = Vec::new();
        for id in m.tenants() {
            // A tenant removed meanwhile is left out.
            let (Some(shared), Some(usage)) = (m.shared(id), m.usage(id)) else {
                continue;
            };
            let stats = shared.sched.stats(id);
            tenants.push((
                id,
                TenantScrape {
                    vm: shared.config.name.clone(),
                    gpu: shared.gpu.to_string(),
                    quota: shared.quota(),
                    usage,
                    weight: stats.map_or(shared.config.weight, |s| s.weight),
                    in_flight: stats.map_or(0, |s| s.in_flight),
                    counters: shared.counters.snapshot(),
                },
            ));
        }
        // Two tenants of one name (a socket and an NFS directory both called vm1) would
        // give duplicate series: each gets its id.
        let mut names: HashMap<String, usize> = HashMap::new();
        for (_, t) in &tenants {
            *names.entry(t.vm.clone()).or_default() += 1;
        }
        for (id, t) in &mut tenants {
            if names.get(&t.vm).is_some_and(|&n| n > 1) {
                t.vm = format!("{}#{}", t.vm, id.0);
            }
        }
        Scrape {
            device: device.name.clone(),
            executor: device.kind.name(),
            device_memory: device.total_memory,
            tenants: tenants.into_iter().map(|(_, t)| t).collect(),
            gpus: m.gpu_usage(),
            process: ProcessStats::read(),
        }
    }
}

const BYTES: Unit = Unit::Bytes;
const SECONDS: Unit = Unit::Seconds;

type Fmt = Result<(), std::fmt::Error>;

fn ns_to_seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One metric with a sample per tenant, labelled `vm`.
fn per_vm<V: EncodeGaugeValue + prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    tenants: &[TenantScrape],
    (name, help, unit, kind): (&str, &str, Option<&Unit>, MetricType),
    value: impl Fn(&TenantScrape) -> V,
) -> Fmt {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for t in tenants {
        let labels = [("vm", t.vm.as_str()), ("gpu", t.gpu.as_str())];
        let mut sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => {
                sample.encode_counter::<NoLabelSet, _, u64>(&value(t), None)?;
            }
            _ => sample.encode_gauge(&value(t))?,
        }
    }
    Ok(())
}

/// One gauge with a sample per GPU, labelled `gpu` (its host index) and `device` (its
/// name).
fn per_gpu(
    encoder: &mut DescriptorEncoder,
    gpus: &[GpuUsage],
    (name, help, unit): (&str, &str, Option<&Unit>),
    value: impl Fn(&GpuUsage) -> u64,
) -> Fmt {
    let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for g in gpus {
        let index = g.index.to_string();
        let labels = [("gpu", index.as_str()), ("device", g.device.name.as_str())];
        metric.encode_family(&labels)?.encode_gauge(&value(g))?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: V,
) -> Fmt {
    encoder
        .encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Fmt {
        let e = &mut encoder;
        let tenants = &self.tenants;
        let statuses: Vec<String> = Status::ALL.iter().map(|&s| status_name(s)).collect();

        // Requests, as they were answered.
        let mut metric = e.encode_descriptor(
            "vgpu_requests",
            "Requests answered, by operation and status (pairs never seen are left out).",
            None,
            MetricType::Counter,
        )?;
        for t in tenants {
            for &(op, status, n) in &t.counters.requests {
                let labels = [
                    ("vm", t.vm.as_str()),
                    ("gpu", t.gpu.as_str()),
                    ("op", OPS[op].1),
                    ("status", statuses[status].as_str()),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut metric = e.encode_descriptor(
            "vgpu_request_duration",
            "Time from a request's submission to its answer (for launches, memsets and \
             host-to-device copies: until accepted, not until the device finished).",
            Some(&SECONDS),
            MetricType::Histogram,
        )?;
        for t in tenants {
            for (op, slots, sum_ns) in &t.counters.latency {
                let labels = [
                    ("vm", t.vm.as_str()),
                    ("gpu", t.gpu.as_str()),
                    ("op", OPS[*op].1),
                ];
                let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_NS
                    .iter()
                    .map(|&ns| ns_to_seconds(ns))
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(slots.iter().copied())
                    .collect();
                let count = slots.iter().sum();
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        ns_to_seconds(*sum_ns),
                        count,
                        &buckets,
                        None,
                    )?;
            }
        }
        let mut metric = e.encode_descriptor(
            "vgpu_copied",
            "Bytes copied between the VM and the device by HTOD and DTOH requests that \
             succeeded.",
            Some(&BYTES),
            MetricType::Counter,
        )?;
        for t in tenants {
            for (direction, n) in [
                ("htod", t.counters.htod_bytes),
                ("dtoh", t.counters.dtoh_bytes),
            ] {
                let labels = [
                    ("vm", t.vm.as_str()),
                    ("gpu", t.gpu.as_str()),
                    ("direction", direction),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let counter = MetricType::Counter;
        let gauge_type = MetricType::Gauge;
        per_vm(
            e,
            tenants,
            (
                "vgpu_kernel_launches",
                "Kernel launches the device accepted.",
                None,
                counter,
            ),
            |t| t.counters.launches,
        )?;

        // Device memory.
        per_vm(
            e,
            tenants,
            (
                "vgpu_memory_used",
                "Device memory charged to the VM's quota: contexts, buffers as allocated, \
                 modules, local memory of its kernels.",
                Some(&BYTES),
                gauge_type,
            ),
            |t| t.usage.mem_used,
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_memory_quota",
                "Device memory the VM may hold.",
                Some(&BYTES),
                gauge_type,
            ),
            |t| t.quota,
        )?;
        let mut metric = e.encode_descriptor(
            "vgpu_memory_charged",
            "Device memory charged to the VM, by what holds it (the kinds add up to \
             vgpu_memory_used_bytes).",
            Some(&BYTES),
            gauge_type,
        )?;
        for t in tenants {
            let u = &t.usage;
            for (kind, n) in [
                ("buffers", u.buffer_bytes),
                ("contexts", u.context_bytes),
                ("modules", u.module_bytes),
                ("local", u.local_bytes),
            ] {
                let labels = [
                    ("vm", t.vm.as_str()),
                    ("gpu", t.gpu.as_str()),
                    ("kind", kind),
                ];
                metric.encode_family(&labels)?.encode_gauge(&n)?;
            }
        }
        per_vm(
            e,
            tenants,
            ("vgpu_sessions", "Open sessions.", None, gauge_type),
            |t| t.usage.sessions,
        )?;
        per_vm(
            e,
            tenants,
            ("vgpu_allocations", "Device buffers held.", None, gauge_type),
            |t| t.usage.allocations,
        )?;
        per_vm(
            e,
            tenants,
            ("vgpu_modules", "Modules loaded.", None, gauge_type),
            |t| t.usage.modules,
        )?;

        // Device time and scheduling.
        per_vm(
            e,
            tenants,
            (
                "vgpu_device_time",
                "Device time the VM's work took, measured on the device (CUDA events); its \
                 rate is the VM's share of the device.",
                Some(&SECONDS),
                counter,
            ),
            |t| ns_to_seconds(t.usage.device_ns),
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_sched_wait",
                "Time the VM's worker waited for its turn on the device.",
                Some(&SECONDS),
                counter,
            ),
            |t| ns_to_seconds(t.usage.sched_wait_ns),
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_in_flight_operations",
                "Operations of the VM on the device or queued for it.",
                None,
                gauge_type,
            ),
            |t| t.in_flight,
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_weight",
                "The VM's relative share of device time.",
                None,
                gauge_type,
            ),
            |t| t.weight,
        )?;

        // Faults.
        per_vm(
            e,
            tenants,
            (
                "vgpu_worker_restarts",
                "Execution contexts of the VM lost and recreated (a device fault, the kernel \
                 timeout, a worker process that died).",
                None,
                counter,
            ),
            |t| t.usage.restarts,
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_watchdog_timeouts",
                "Sessions the watchdog ended for running past the kernel timeout.",
                None,
                counter,
            ),
            |t| t.usage.timeouts,
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_cancelled_requests",
                "Requests dropped unexecuted because the VM reset its device.",
                None,
                counter,
            ),
            |t| t.usage.cancelled,
        )?;

        // Host memory.
        per_vm(
            e,
            tenants,
            (
                "vgpu_host_held",
                "Host memory the VM's requests hold now (see --inflight-budget).",
                Some(&BYTES),
                gauge_type,
            ),
            |t| t.usage.held_bytes,
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_host_registered",
                "Host buffers the VM's sessions registered.",
                Some(&BYTES),
                gauge_type,
            ),
            |t| t.usage.host_bytes,
        )?;
        per_vm(
            e,
            tenants,
            (
                "vgpu_host_copies",
                "Copies that went straight between a registered host buffer and the device.",
                None,
                counter,
            ),
            |t| t.usage.host_copies,
        )?;

        // Each GPU.
        let gpus = &self.gpus;
        per_gpu(
            e,
            gpus,
            ("vgpu_gpu_memory", "Memory of the GPU.", Some(&BYTES)),
            |g| g.device.total_memory,
        )?;
        per_gpu(
            e,
            gpus,
            ("vgpu_gpu_vms", "VMs placed on the GPU.", None),
            |g| u64::from(g.tenants),
        )?;
        per_gpu(
            e,
            gpus,
            (
                "vgpu_gpu_quota_committed",
                "The sum of the quotas of the VMs on the GPU (it may exceed its memory).",
                Some(&BYTES),
            ),
            |g| g.quota_committed,
        )?;
        per_gpu(
            e,
            gpus,
            (
                "vgpu_gpu_memory_used",
                "Device memory the VMs on the GPU hold (the sum of their \
                 vgpu_memory_used_bytes).",
                Some(&BYTES),
            ),
            |g| g.mem_used,
        )?;

        // The mediator and the (first) device.
        gauge(
            e,
            "vgpu_tenants",
            "VMs served (sockets and NFS directories).",
            None,
            tenants.len() as u64,
        )?;
        gauge(
            e,
            "vgpu_device_memory",
            "Memory of the device (the first GPU; every GPU's: vgpu_gpu_memory_bytes).",
            Some(&BYTES),
            self.device_memory,
        )?;
        e.encode_descriptor(
            "vgpu_device",
            "The device the VMs share (the first GPU; every GPU: vgpu_gpu_memory_bytes).",
            None,
            MetricType::Info,
        )?
        .encode_info(&[
            ("device", self.device.as_str()),
            ("executor", self.executor),
        ])?;
        e.encode_descriptor(
            "vgpu_build",
            "The mediator's version.",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;

        self.process.encode(e)
    }
}

/// The daemon process's own figures (not its executor worker processes'), where the
/// system tells them.
#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    start_time: Option<f64>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        ProcessStats {
            cpu_seconds: cpu_seconds(),
            resident_bytes: resident_bytes(),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: max_fds(),
            start_time: *START_TIME.get_or_init(start_time),
        }
    }

    fn encode(&self, e: &mut DescriptorEncoder) -> Fmt {
        if let Some(v) = self.cpu_seconds {
            e.encode_descriptor(
                "process_cpu",
                "User and system CPU time of the daemon process.",
                Some(&SECONDS),
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        if let Some(v) = self.resident_bytes {
            gauge(
                e,
                "process_resident_memory",
                "Resident memory of the daemon process.",
                Some(&BYTES),
                v,
            )?;
        }
        if let Some(v) = self.open_fds {
            gauge(e, "process_open_fds", "Open file descriptors.", None, v)?;
        }
        if let Some(v) = self.max_fds {
            gauge(e, "process_max_fds", "Most open file descriptors.", None, v)?;
        }
        if let Some(v) = self.start_time {
            gauge(
                e,
                "process_start_time",
                "Start of the daemon process since the Unix epoch.",
                Some(&SECONDS),
                v,
            )?;
        }
        Ok(())
    }
}

static START_TIME: OnceLock<Option<f64>> = OnceLock::new();

fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return None;
        }
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

fn max_fds() -> Option<u64> {
    // SAFETY: getrlimit fills the zeroed struct it is given.
    let limit = unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        limit
    };
    Some(limit.rlim_cur)
}

/// When the process started, from `/proc`: its start in clock ticks after boot, and the
/// boot time.
fn start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces and parentheses): field 22,
    // the start time, is the 20th.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| boot as f64 + ticks as f64 / hz as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_listed_in_wire_order() {
        for (i, (op, _)) in OPS.iter().enumerate() {
            assert_eq!(*op as usize, i + 1);
            assert_eq!(op_index(*op), i);
        }
        assert_eq!(op_name(Opcode::Launch), "launch");
        assert_eq!(op_name(Opcode::Htod), "htod");
        assert_eq!(status_name(Status::QuotaExceeded), "quota_exceeded");
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }

    #[test]
    fn latencies_fall_in_the_bucket_of_their_upper_bound() {
        let c = TenantCounters::new();
        let op = op_index(Opcode::Sync);
        for us in [1, 10, 11, 20_000_000] {
            c.record(Opcode::Sync, Status::Ok, Duration::from_micros(us));
        }
        let slots: Vec<u64> = c.latency[op]
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        // 1 us and 10 us in the first (le 10 us), 11 us in the second, 20 s past the last.
        assert_eq!(slots[0], 2);
        assert_eq!(slots[1], 1);
        assert_eq!(slots[SLOTS - 1], 1);
        assert_eq!(slots.iter().sum::<u64>(), 4);
        assert_eq!(
            c.latency[op].sum_ns.load(Ordering::Relaxed),
            (1 + 10 + 11 + 20_000_000) * 1000
        );
        assert_eq!(
            c.requests[op][Status::Ok as usize].load(Ordering::Relaxed),
            4
        );
    }

    #[test]
    fn process_figures_are_read() {
        let p = ProcessStats::read();
        assert!(p.cpu_seconds.is_some());
        assert!(p.resident_bytes.is_some_and(|b| b > 0));
        assert!(p.open_fds.is_some_and(|n| n > 0));
        let start = p.start_time.expect("start time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86400.0 * 365.0,
            "{start}"
        );
    }
}
