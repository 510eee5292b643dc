// SPDX-License-Identifier: Apache-2.0
//! `vhost-vgpu`: the vhost-user backend that presents the mediated GPU to virtual machines.
//!
//! A [`Daemon`] listens on one Unix socket per VM. Each socket is a tenant of one shared
//! [`Mediator`]: QEMU connects with a generic vhost-user device (`vhost-user-test-device-pci`,
//! see [`qemu_args`]), the guest driver sends requests over the device's virtqueue, and
//! [`backend::VgpuBackend`] hands them to the mediator. When QEMU disconnects, the VM's
//! sessions are closed, its device memory is freed, and the socket is served again.
//!
//! In-process use (tests, benchmarks):
//!
//! ```no_run
//! use vhost_vgpu::{Daemon, VgpuConfig};
//! use vgpu_mediator::ExecutorChoice;
//!
//! let config = VgpuConfig {
//!     executor: ExecutorChoice::Cpu,
//!     ..VgpuConfig::new("/tmp/vgpu.sock")
//! };
//! let daemon = Daemon::start(config)?; // listening on /tmp/vgpu.sock0 when this returns
//! // ... connect a vhost-user frontend to daemon.sockets()[0] ...
//! // ... daemon.mediator().usage(daemon.tenants()[0]) shows what the VM holds ...
//! daemon.stop()?; // sockets removed, tenants removed
//! # Ok::<(), vhost_vgpu::Error>(())
//! ```

pub mod backend;
mod chain;
mod daemon;
#[cfg(any(test, feature = "test-utils"))]
pub mod testvmm;
mod wait;
pub mod weights;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use vgpu_mediator::signals::DaemonSignals;
use vgpu_mediator::{ExecutorChoice, ExecutorOptions, Isolation, Placement};
use vgpu_nfs::NfsOptions;
use vgpu_protocol::{CONFIG_SIZE, DEFAULT_VIRTIO_ID, MAX_TRANSFER_BYTES};

pub use backend::{VgpuBackend, NUM_QUEUES, QUEUE_SIZE};

/// Smallest `--inflight-budget`: room for the largest request the protocol allows.
pub const MIN_INFLIGHT_BUDGET: u64 = MAX_TRANSFER_BYTES + vgpu_mediator::REQUEST_OVERHEAD;
/// Largest `--poll-us`: the worker holds its VM's device while it polls, so QEMU's messages
/// to it wait as long.
pub const MAX_POLL_US: u64 = 1000;
pub use daemon::{Daemon, StopHandle};
pub use vgpu_mediator::Mediator;
pub use weights::WeightsReloader;

/// Failures of the daemon and of its configuration. Each message names the step that failed;
/// the cause, if any, is the error's source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--socket-count must be at least 1")]
    SocketCountZero,
    #[error("socket path {0} does not end in a file name")]
    SocketPathNoFileName(PathBuf),
    #[error("socket directory {0} does not exist")]
    SocketDirMissing(PathBuf),
    #[error("socket directory {0} is not a directory")]
    SocketDirNotDirectory(PathBuf),
    #[error("--weight must be at least 1")]
    WeightZero,
    #[error("--virtio-id must be between 1 and 65535, not {0}")]
    VirtioIdOutOfRange(u32),
    #[error(
        "--inflight-budget of {0} bytes cannot hold the largest request; it must be at least \
         {MIN_INFLIGHT_BUDGET}"
    )]
    InflightBudgetTooSmall(u64),
    #[error("--poll-us must be at most {MAX_POLL_US}, not {0}")]
    PollTooLong(u64),
    #[error("--single-vm-shared-process serves one VM only: --socket-count 1 and no --nfs-root")]
    SharedProcessNotSingleVm,
    #[error("--nfs-root")]
    NfsRoot(#[source] vgpu_nfs::NfsError),
    #[error("--nfs-vm, --nfs-discover and --nfs-max-vms need --nfs-root")]
    NfsWithoutRoot,
    #[error("NFS VM list")]
    NfsVms(#[source] vgpu_nfs::NfsError),
    #[error("starting the NFS file transport")]
    StartNfs(#[source] vgpu_nfs::NfsError),
    #[error(transparent)]
    Executor(#[from] vgpu_mediator::executor::SetupError),
    #[error("adding tenant {0}")]
    AddTenant(String, #[source] io::Error),
    #[error("listening on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    #[error("creating the stop eventfd")]
    StopEvent(#[source] io::Error),
    #[error("{0}: starting its thread")]
    SpawnThread(PathBuf, #[source] io::Error),
    #[error("{0}: creating the device backend")]
    CreateBackend(PathBuf, #[source] io::Error),
    // vhost-user-backend's error does not implement `std::error::Error`: shown inline.
    #[error("{0}: creating the vhost-user daemon: {1}")]
    CreateDaemon(PathBuf, vhost_user_backend::Error),
    #[error("{0}: registering the completion eventfd")]
    RegisterCompletions(PathBuf, #[source] io::Error),
    #[error("{0}: waiting for a connection")]
    WaitConnection(PathBuf, #[source] io::Error),
    #[error("{0}: its thread panicked")]
    ThreadPanicked(PathBuf),
    #[error("--weights")]
    Weights(#[source] weights::WeightsError),
    #[error("setting up SIGINT/SIGTERM handling")]
    Signals(#[source] vgpu_mediator::signals::SignalsError),
    #[error("starting the signal thread")]
    SignalThread(#[source] io::Error),
    #[error("--metrics {0}: cannot listen")]
    Metrics(SocketAddr, #[source] io::Error),
    #[error("--control")]
    Control(#[source] vgpu_mediator::control::ControlError),
    #[error("--gpu names {given} GPUs for {sockets} sockets: give one per socket, or one for all")]
    GpuCount { given: usize, sockets: usize },
    #[error("placing the VMs on GPUs: {0}")]
    Placement(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Command line of `vhost-vgpu`.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "vhost-vgpu",
    version,
    about = "vhost-user backend that presents the mediated GPU to virtual machines",
    long_about = "vhost-user backend that presents the mediated GPU to virtual machines.\n\n\
        Listens on one Unix socket per VM; every VM is a tenant of one shared mediator with \
        its own device-memory quota and sessions. At startup it logs the QEMU options that \
        match each socket. A VM that disconnects loses its sessions and its device memory; \
        its socket is served again, for the VM's next QEMU or for a QEMU that reconnects. \
        The logged options suit a stock QEMU 10.2, whose generic vhost-user device fails to \
        start with chardev reconnect-ms and cannot reattach to a restarted backend; with \
        the patched QEMU of qemu-configs/build-qemu.sh add ,reconnect-ms=1000 to the chardev. \
        SIGINT or SIGTERM stops the daemon and removes the sockets."
)]
pub struct Args {
    /// Base path of the vhost-user sockets. The daemon listens on PATH0, PATH1, ...
    /// PATH{N-1} (N = --socket-count; the index is appended even when N is 1, as in
    /// vhost-device-i2c), one VM per socket. Each VM's tenant is named after its socket's
    /// file name (e.g. vm0).
    #[arg(short, long, value_name = "PATH")]
    pub socket_path: PathBuf,

    /// Number of sockets, i.e. of VMs served.
    #[arg(short = 'c', long, value_name = "N", default_value_t = 1)]
    pub socket_count: usize,

    /// What runs the work: cuda, cpu (the reference executor), cpu:N (the reference
    /// executor as N simulated GPUs, for trying placement without a GPU), auto (CUDA when
    /// a driver and a device are usable, otherwise the CPU with a warning), or
    /// remote:HOST:PORT[,HOST:PORT...] (executors on worker hosts running vgpu-worker,
    /// tried in order; vsock:CID:PORT for a worker in a local VM; several GPUs: each
    /// GPU's workers separated by +, e.g. remote:gpuvm:7701+gpuvm:7702).
    #[arg(
        long,
        value_name = "auto|cuda|cpu|cpu:N|remote:HOST:PORT",
        default_value = "auto"
    )]
    pub executor: ExecutorChoice,

    /// GPUs to drive, by index: CUDA's device order after CUDA_VISIBLE_DEVICES (with
    /// --executor cpu:N, the simulated devices 0 to N-1), e.g. 0,2. Each GPU has its own
    /// scheduler; each VM is placed on one GPU (--gpu) and its sessions stay there.
    /// Default: every GPU there is.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub gpus: Option<Vec<u32>>,

    /// The GPU of each socket's VM: one entry per socket in order (e.g. 0,1,auto) or one
    /// for every socket. auto places the VM on the GPU with the most memory not yet
    /// promised to quotas (then the fewest VMs); without --mem-quota, on the one with the
    /// fewest VMs, each VM's quota then being its GPU's memory divided by its VMs. A VM's
    /// `gpu=` in --weights applies where this is not given. Default: auto.
    #[arg(long, value_name = "N|auto[,...]", value_delimiter = ',')]
    pub gpu: Vec<Placement>,

    /// Key file for --executor remote: one line NAME KEY (this mediator's name and the key
    /// the worker holds for it; vgpu-worker keygen makes one). Must not be readable by
    /// group or others. Default: /etc/vgpu/remote.key.
    #[arg(long, value_name = "FILE")]
    pub remote_key: Option<PathBuf>,

    /// How long to keep trying to reach a remote worker at start, in seconds. Default: 30.
    #[arg(long, value_name = "SECONDS")]
    pub remote_wait: Option<u64>,

    /// Device memory each VM's work may hold, e.g. 512M, 8G, 1.5GiB: its sessions'
    /// execution contexts, buffers, modules and kernels' local memory. Default: the
    /// memory of the VM's GPU divided by the number of sockets placed on it. A VM's
    /// `quota=` in --weights applies over it.
    #[arg(long, value_name = "SIZE", value_parser = vgpu_mediator::parse_size)]
    pub mem_quota: Option<u64>,

    /// Each VM's relative share of device time: under contention each VM gets device time
    /// in proportion to its weight (measured on the device, per kernel and copy).
    #[arg(long, value_name = "W", default_value_t = 100)]
    pub weight: u32,

    /// Per-VM settings: a file of lines `NAME WEIGHT [gpu=N|auto] [quota=SIZE]` (NAME: a
    /// socket's file name such as vm0, or an NFS VM directory; `#` comments). VMs it does
    /// not name get --weight, --gpu and --mem-quota. Read again on SIGHUP, so weights and
    /// quotas change without a restart (a VM's GPU is chosen at start); a file that does
    /// not parse keeps the settings in force.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,

    /// virtio device ID that the VMs' QEMU gives the device (its `virtio-id=` option). The
    /// backend does not depend on it; it is used in the QEMU options logged at startup.
    #[arg(long, value_name = "ID", default_value_t = DEFAULT_VIRTIO_ID)]
    pub virtio_id: u32,

    /// Also serve the Phase 1 NFS file protocol (command.txt / response.txt) in DIR, the
    /// directory exported to the VMs: DIR/NAME for each --nfs-vm NAME, or without
    /// --nfs-vm the pair at DIR's root (a single VM). Each is a tenant of the same mediator
    /// with --nfs-mem-quota and --weight.
    #[arg(long, value_name = "DIR")]
    pub nfs_root: Option<PathBuf>,

    /// Serve the NFS VM directory DIR/NAME (created if missing); repeatable, one per VM.
    #[arg(long = "nfs-vm", value_name = "NAME", requires = "nfs_root")]
    pub nfs_vms: Vec<String>,

    /// Also serve every vm* directory that appears in the NFS root (and drop it when it
    /// goes), up to --nfs-max-vms of them. Off by default: with it, whoever can create a
    /// directory there creates a tenant.
    #[arg(long, requires = "nfs_root")]
    pub nfs_discover: bool,

    /// With --nfs-discover, the most discovered directories served at once; further ones
    /// are ignored, with one warning each.
    #[arg(
        long,
        value_name = "N",
        default_value_t = vgpu_nfs::DEFAULT_MAX_VMS,
        requires = "nfs_discover"
    )]
    pub nfs_max_vms: usize,

    /// Device memory each NFS VM's work may hold (its own quota, not --mem-quota's; the
    /// self-test's execution context counts), e.g. 1G or 2G.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1G",
        value_parser = vgpu_mediator::parse_size
    )]
    pub nfs_mem_quota: u64,

    /// Host memory each VM's requests may hold at once, queued, running or abandoned by a
    /// device reset: their payload in and their answers out. A request past it waits in
    /// the VM's queue while the VM's own requests are in flight, and is answered
    /// LIMIT_EXCEEDED otherwise.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "512M",
        value_parser = vgpu_mediator::parse_size
    )]
    pub inflight_budget: u64,

    /// Host-side polling: after each kick or completion, each VM's vring worker keeps
    /// checking the request ring and the finished requests for up to N microseconds since
    /// its last useful work before it sleeps again, with the guest's kicks suppressed
    /// meanwhile. Lowers round-trip latency at the cost of up to N µs of a busy host core
    /// per VM after each burst; worth it only with cores to spare. 0 (the default): off;
    /// at most 1000.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub poll_us: u64,

    /// User the executor worker processes run as (needs root). Default when running as
    /// root: vgpu-worker if it exists, else nobody.
    #[arg(long, value_name = "USER")]
    pub worker_user: Option<String>,

    /// Cap on each CUDA executor worker's private host memory (RLIMIT_DATA).
    #[arg(long, value_name = "SIZE", value_parser = vgpu_mediator::parse_size)]
    pub worker_max_memory: Option<u64>,

    /// Kernel timeout, in seconds: the longest a session's call may wait for its executor
    /// worker (a kernel, or the work a SYNC waits for) before the watchdog ends that
    /// worker. The session then gets DEVICE_LOST with detail 702 (CUDA's launch timeout)
    /// for that call and every later one; the VM's other sessions and the other VMs keep
    /// running. Default 600; at least 1. Applies to executors in worker processes (CUDA)
    /// and on worker hosts (remote); not to --single-vm-shared-process or the in-process
    /// CPU executor.
    #[arg(
        long,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub kernel_timeout: Option<u64>,

    /// Run the VM's CUDA work in this process instead of a worker process. NO MEMORY
    /// ISOLATION: contexts of one process share its address space, so a kernel could reach
    /// any other context's device memory by address. Only with --socket-count 1 and no
    /// --nfs-root.
    #[arg(long)]
    pub single_vm_shared_process: bool,

    /// Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics: per VM, requests by
    /// operation and status, their latency, bytes copied, device memory and quota, device
    /// time, restarts and watchdog timeouts; and the daemon's CPU time and memory. Off by
    /// default. No authentication: bind to a loopback or management address (e.g.
    /// 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR:PORT", value_parser = vgpu_mediator::metrics::parse_addr)]
    pub metrics: Option<SocketAddr>,

    /// Control socket for vgpu-admin (the VMs, their memory and device time; quota and
    /// weight changed at run time). Owner-only (mode 0600: the daemon's user and root),
    /// removed at stop. Default: the socket path with `.control` appended, e.g.
    /// /run/vhost-vgpu/vm.control for --socket-path /run/vhost-vgpu/vm.
    #[arg(long, value_name = "PATH", conflicts_with = "no_control")]
    pub control: Option<PathBuf>,

    /// No control socket.
    #[arg(long)]
    pub no_control: bool,
}

/// Where `vgpu-admin` looks for the control socket by default: the one of
/// `vhost-vgpu --socket-path /run/vhost-vgpu/vm` (the systemd unit's).
pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-vgpu/vm.control";

/// The control socket of a daemon whose sockets are `socket_path` + N when `--control` is
/// not given: `socket_path` with `.control` appended (never one of the VMs' sockets).
pub fn default_control_path(socket_path: &Path) -> PathBuf {
    let mut path = socket_path.as_os_str().to_owned();
    path.push(".control");
    PathBuf::from(path)
}

/// A checked configuration of the daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct VgpuConfig {
    /// Base path: the sockets are this path with 0, 1, ... appended.
    pub socket_path: PathBuf,
    pub socket_count: usize,
    /// The GPU of each socket's VM (see `Args::gpu`): empty (every one placed
    /// automatically), one for all, or one per socket. The GPUs to drive are
    /// `executor_options.gpus`.
    pub placements: Vec<Placement>,
    pub executor: ExecutorChoice,
    /// Device-memory quota of each VM; `None`: the device's memory divided by the count.
    pub mem_quota: Option<u64>,
    pub weight: u32,
    /// Per-VM weights (see `Args::weights`).
    pub weights_file: Option<PathBuf>,
    pub virtio_id: u32,
    /// Also serve the NFS file protocol in this directory.
    pub nfs_root: Option<PathBuf>,
    /// NFS VM directories served; empty: the pair at the root.
    pub nfs_vms: Vec<String>,
    /// Also serve `vm*` directories as they appear, up to `nfs_max_vms`.
    pub nfs_discover: bool,
    pub nfs_max_vms: usize,
    /// Device-memory quota of each NFS VM.
    pub nfs_mem_quota: u64,
    /// Host bytes each VM's requests may hold (see `Args::inflight_budget`).
    pub inflight_budget: u64,
    /// Host-side polling window of each vring worker, in microseconds; 0: off (see
    /// `Args::poll_us`).
    pub poll_us: u64,
    /// How CUDA executors run: isolation, worker user and limits.
    pub executor_options: ExecutorOptions,
    /// Serve Prometheus metrics over HTTP on this address (see `Args::metrics`).
    pub metrics: Option<SocketAddr>,

    /// Serve the control socket (`vgpu-admin`) here; `None`: no control socket.
    pub control: Option<PathBuf>,
}

impl VgpuConfig {
    /// One socket at `socket_path` + "0", automatic executor, default quota and weight.
    pub fn new(socket_path: impl Into<PathBuf>) -> VgpuConfig {
        VgpuConfig {
            socket_path: socket_path.into(),
            socket_count: 1,
            placements: Vec::new(),
            executor: ExecutorChoice::Auto,
            mem_quota: None,
            weight: 100,
            weights_file: None,
            virtio_id: DEFAULT_VIRTIO_ID,
            nfs_root: None,
            nfs_vms: Vec::new(),
            nfs_discover: false,
            nfs_max_vms: vgpu_nfs::DEFAULT_MAX_VMS,
            nfs_mem_quota: vgpu_nfs::DEFAULT_MEM_QUOTA,
            inflight_budget: vgpu_mediator::DEFAULT_MAX_HELD_BYTES,
            poll_us: 0,
            executor_options: ExecutorOptions::default(),
            metrics: None,
            control: None,
        }
    }

    /// The NFS transport's options, with `--nfs-root`.
    pub fn nfs_options(&self) -> Option<NfsOptions> {
        let root = self.nfs_root.as_ref()?;
        Some(NfsOptions {
            vms: self.nfs_vms.clone(),
            discover: self.nfs_discover,
            max_vms: self.nfs_max_vms,
            mem_quota: self.nfs_mem_quota,
            weight: self.weight,
            ..NfsOptions::new(root)
        })
    }

    /// The socket paths: `socket_path` with `0` .. `socket_count - 1` appended.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        (0..self.socket_count)
            .map(|i| {
                let mut path = self.socket_path.clone().into_os_string();
                path.push(i.to_string());
                PathBuf::from(path)
            })
            .collect()
    }

    /// The GPU asked for the socket with this index (see `Args::gpu`); `None`: no
    /// `--gpu` for it.
    pub fn placement(&self, socket: usize) -> Option<Placement> {
        match self.placements.len() {
            0 => None,
            1 => Some(self.placements[0]),
            _ => self.placements.get(socket).copied(),
        }
    }

    /// Checks what can be checked before anything is started.
    pub fn validate(&self) -> Result<()> {
        if self.socket_count == 0 {
            return Err(Error::SocketCountZero);
        }
        if self.placements.len() > 1 && self.placements.len() != self.socket_count {
            return Err(Error::GpuCount {
                given: self.placements.len(),
                sockets: self.socket_count,
            });
        }
        if self.weight == 0 {
            return Err(Error::WeightZero);
        }
        if let Some(path) = &self.weights_file {
            weights::load(path).map_err(Error::Weights)?;
        }
        if !(1..=u32::from(u16::MAX)).contains(&self.virtio_id) {
            return Err(Error::VirtioIdOutOfRange(self.virtio_id));
        }
        if self.inflight_budget < MIN_INFLIGHT_BUDGET {
            return Err(Error::InflightBudgetTooSmall(self.inflight_budget));
        }
        if self.poll_us > MAX_POLL_US {
            return Err(Error::PollTooLong(self.poll_us));
        }
        self.executor_options.validate().map_err(Error::Executor)?;
        if self.executor_options.isolation == Isolation::SharedProcess
            && (self.socket_count != 1 || self.nfs_root.is_some())
        {
            return Err(Error::SharedProcessNotSingleVm);
        }
        let path = &self.socket_path;
        if path.file_name().is_none() {
            return Err(Error::SocketPathNoFileName(path.clone()));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.exists() {
            return Err(Error::SocketDirMissing(dir.to_path_buf()));
        }
        if !dir.is_dir() {
            return Err(Error::SocketDirNotDirectory(dir.to_path_buf()));
        }
        match self.nfs_options() {
            Some(options) => {
                options.validate().map_err(Error::NfsVms)?;
                vgpu_nfs::check_root(&options.root).map_err(Error::NfsRoot)?;
            }
            None if !self.nfs_vms.is_empty() || self.nfs_discover => {
                return Err(Error::NfsWithoutRoot)
            }
            None => {}
        }
        Ok(())
    }
}

impl Default for VgpuConfig {
    /// No socket path yet (set one before starting), otherwise as [`VgpuConfig::new`].
    fn default() -> VgpuConfig {
        VgpuConfig::new(PathBuf::new())
    }
}

impl TryFrom<Args> for VgpuConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<VgpuConfig> {
        let control = match (args.no_control, args.control) {
            (true, _) => None,
            (false, Some(path)) => Some(path),
            (false, None) => Some(default_control_path(&args.socket_path)),
        };
        let config = VgpuConfig {
            control,
            socket_path: args.socket_path,
            socket_count: args.socket_count,
            placements: args.gpu,
            executor: args.executor,
            mem_quota: args.mem_quota,
            weight: args.weight,
            weights_file: args.weights,
            virtio_id: args.virtio_id,
            nfs_root: args.nfs_root,
            nfs_vms: args.nfs_vms,
            nfs_discover: args.nfs_discover,
            nfs_max_vms: args.nfs_max_vms,
            nfs_mem_quota: args.nfs_mem_quota,
            inflight_budget: args.inflight_budget,
            poll_us: args.poll_us,
            executor_options: ExecutorOptions {
                isolation: if args.single_vm_shared_process {
                    Isolation::SharedProcess
                } else {
                    Isolation::Process
                },
                worker_user: args.worker_user,
                worker_max_memory: args.worker_max_memory,
                kernel_timeout: args.kernel_timeout.map(std::time::Duration::from_secs),
                remote_key: args.remote_key,
                remote_wait: args.remote_wait.map(std::time::Duration::from_secs),
                gpus: args.gpus,
            },
            metrics: args.metrics,
        };
        config.validate()?;
        Ok(config)
    }
}

/// An error and its causes on one line: the failed step, then each cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// The QEMU options that attach a VM to `socket` (`index` names the chardev). Without
/// `reconnect-ms`: a stock QEMU's generic vhost-user device fails to start with it.
pub fn qemu_args(socket: &Path, index: usize, virtio_id: u32) -> String {
    let path = socket.display().to_string().replace(',', ",,");
    format!(
        "-chardev socket,id=vgpu{index},path={path} \
         -device vhost-user-test-device-pci,chardev=vgpu{index},virtio-id={virtio_id},\
         num_vqs={NUM_QUEUES},vq_size={QUEUE_SIZE},config_size={CONFIG_SIZE}"
    )
}

/// Runs the daemon until SIGINT or SIGTERM, then removes its sockets. What `vhost-vgpu` runs.
pub fn start_backend(config: VgpuConfig) -> Result<()> {
    // Caught and blocked before any thread exists, so that every thread inherits the mask
    // and only the waiting thread below ever receives them (see vgpu_mediator::signals).
    let mut signals = DaemonSignals::catch(&daemon::SIGNALS).map_err(Error::Signals)?;
    vgpu_mediator::sandbox::protect_daemon();
    let daemon = Daemon::start(config)?;
    let stop = daemon.stop_handle();
    let reloader = daemon.weights_reloader();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = match signals.receive() {
                Ok(received) => received,
                Err(e) => {
                    log::error!("receiving signals: {e}");
                    return;
                }
            };
            for signal in received.by_ref() {
                if signal != libc::SIGHUP {
                    log::info!("signal {signal} received: stopping");
                    stop.stop();
                    break;
                }
                match &reloader {
                    Some(r) => match r.reload() {
                        Ok(w) => log::info!(
                            "SIGHUP: weights reloaded from {} ({} VMs named)",
                            r.path.display(),
                            w.len()
                        ),
                        Err(e) => {
                            log::error!("SIGHUP: {}; the weights in force stay", error_chain(&e))
                        }
                    },
                    None => log::info!("SIGHUP: no --weights file to reload"),
                }
            }
            // A second signal while stopping (e.g. a long kernel still running) ends the
            // process at once.
            if let Some(signal) = received.next() {
                log::warn!("signal {signal} received again: exiting without cleanup");
                std::process::exit(1);
            }
        })
        .map_err(Error::SignalThread)?;
    daemon.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> std::result::Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vhost-vgpu").chain(list.iter().copied()))
    }

    #[test]
    fn defaults_are_one_socket_auto_executor_and_weight_100() {
        let a = args(&["--socket-path", "/tmp/vm"]).unwrap();
        let c = VgpuConfig::try_from(a).unwrap();
        assert_eq!(
            c,
            VgpuConfig {
                control: Some(PathBuf::from("/tmp/vm.control")),
                ..VgpuConfig::new("/tmp/vm")
            }
        );
        assert_eq!(c.socket_paths(), vec![PathBuf::from("/tmp/vm0")]);
    }

    #[test]
    fn the_control_socket_is_on_beside_the_sockets_unless_moved_or_turned_off() {
        let control = |list: &[&str]| VgpuConfig::try_from(args(list).unwrap()).unwrap().control;
        assert_eq!(control(&["-s", "/tmp/vm"]), Some("/tmp/vm.control".into()));
        assert_eq!(
            default_control_path(Path::new("/run/vhost-vgpu/vm")),
            PathBuf::from(DEFAULT_CONTROL_PATH)
        );
        assert_eq!(
            control(&["-s", "/tmp/vm", "--control", "/tmp/admin.sock"]),
            Some(PathBuf::from("/tmp/admin.sock"))
        );
        assert_eq!(control(&["-s", "/tmp/vm", "--no-control"]), None);
        assert!(args(&["-s", "/tmp/vm", "--no-control", "--control", "/tmp/c"]).is_err());
    }

    #[test]
    fn every_flag_parses() {
        let a = args(&[
            "-s",
            "/tmp/vgpu.sock",
            "-c",
            "3",
            "--executor",
            "cpu",
            "--mem-quota",
            "512M",
            "--weight",
            "7",
            "--virtio-id",
            "40",
            "--nfs-root",
            "/tmp",
            "--nfs-vm",
            "vm1",
            "--nfs-vm",
            "vm2",
            "--nfs-discover",
            "--nfs-max-vms",
            "3",
            "--nfs-mem-quota",
            "64M",
            "--inflight-budget",
            "1G",
            "--poll-us",
            "50",
            "--worker-user",
            "root",
            "--worker-max-memory",
            "2G",
            "--kernel-timeout",
            "30",
        ])
        .unwrap();
        let c = VgpuConfig::try_from(a).unwrap();
        assert_eq!(c.inflight_budget, 1 << 30);
        assert_eq!(c.poll_us, 50);
        assert_eq!(
            c.executor_options,
            ExecutorOptions {
                isolation: Isolation::Process,
                worker_user: Some("root".into()),
                worker_max_memory: Some(2 << 30),
                kernel_timeout: Some(std::time::Duration::from_secs(30)),
                remote_key: None,
                remote_wait: None,
                gpus: None,
            }
        );
        assert_eq!(c.executor, ExecutorChoice::Cpu);
        assert_eq!(c.mem_quota, Some(512 << 20));
        assert_eq!(c.weight, 7);
        assert_eq!(c.virtio_id, 40);
        assert_eq!(c.nfs_root, Some(PathBuf::from("/tmp")));
        let nfs = c.nfs_options().unwrap();
        assert_eq!(nfs.vms, ["vm1", "vm2"]);
        assert!(nfs.discover);
        assert_eq!((nfs.max_vms, nfs.mem_quota, nfs.weight), (3, 64 << 20, 7));
        assert_eq!(
            c.socket_paths(),
            ["/tmp/vgpu.sock0", "/tmp/vgpu.sock1", "/tmp/vgpu.sock2"].map(PathBuf::from)
        );
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(args(&[]).is_err());
        assert!(args(&["-s", "/tmp/vm", "--executor", "opencl"]).is_err());
        assert!(args(&["-s", "/tmp/vm", "--mem-quota", "12Q"]).is_err());

        let check = |list: &[&str]| VgpuConfig::try_from(args(list).unwrap()).unwrap_err();
        assert!(matches!(
            check(&["-s", "/tmp/vm", "-c", "0"]),
            Error::SocketCountZero
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--weight", "0"]),
            Error::WeightZero
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--virtio-id", "70000"]),
            Error::VirtioIdOutOfRange(70000)
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--inflight-budget", "255M"]),
            Error::InflightBudgetTooSmall(_)
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--poll-us", "1001"]),
            Error::PollTooLong(1001)
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--weights", "/nonexistent/weights"]),
            Error::Weights(weights::WeightsError::Read(..))
        ));
        assert!(args(&["-s", "/tmp/vm", "--poll-us", "-1"]).is_err());
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--worker-user", "no-such-user-here"]),
            Error::Executor(e) if e.to_string().contains("no user")
        ));
        for shared in [
            &["-s", "/tmp/vm", "-c", "2", "--single-vm-shared-process"][..],
            &[
                "-s",
                "/tmp/vm",
                "--nfs-root",
                "/tmp",
                "--single-vm-shared-process",
            ],
        ] {
            assert!(matches!(check(shared), Error::SharedProcessNotSingleVm));
        }
        let one =
            VgpuConfig::try_from(args(&["-s", "/tmp/vm", "--single-vm-shared-process"]).unwrap());
        assert_eq!(
            one.unwrap().executor_options.isolation,
            Isolation::SharedProcess
        );
        assert!(matches!(
            check(&["-s", "/nonexistent-vgpu-dir/vm"]),
            Error::SocketDirMissing(p) if p == Path::new("/nonexistent-vgpu-dir")
        ));
        assert!(matches!(
            check(&["-s", "/etc/hostname/vm"]),
            Error::SocketDirNotDirectory(_) | Error::SocketDirMissing(_)
        ));
        assert!(matches!(
            check(&["-s", "/"]),
            Error::SocketPathNoFileName(_)
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--nfs-root", "/nonexistent-vgpu-root"]),
            Error::NfsRoot(_)
        ));
        assert!(matches!(
            check(&["-s", "/tmp/vm", "--nfs-root", "/tmp", "--nfs-vm", "../etc"]),
            Error::NfsVms(_)
        ));
        let discover_none = ["-s", "/tmp/vm", "--nfs-root", "/tmp", "--nfs-discover"];
        assert!(matches!(
            check(&[&discover_none[..], &["--nfs-max-vms", "0"]].concat()),
            Error::NfsVms(_)
        ));
        // NFS flags without --nfs-root, and the cap without discovery, are refused.
        assert!(args(&["-s", "/tmp/vm", "--nfs-vm", "vm1"]).is_err());
        assert!(args(&["-s", "/tmp/vm", "--nfs-discover"]).is_err());
        assert!(args(&["-s", "/tmp/vm", "--nfs-root", "/tmp", "--nfs-max-vms", "4"]).is_err());
        let no_root = VgpuConfig {
            nfs_vms: vec!["vm1".into()],
            ..VgpuConfig::new("/tmp/vm")
        };
        assert!(matches!(no_root.validate(), Err(Error::NfsWithoutRoot)));
    }

    #[test]
    fn the_kernel_timeout_defaults_to_600_seconds_and_is_at_least_one() {
        let c = VgpuConfig::try_from(args(&["-s", "/tmp/vm"]).unwrap()).unwrap();
        assert_eq!(c.executor_options.kernel_timeout, None);
        assert_eq!(
            vgpu_mediator::process::DEFAULT_KERNEL_TIMEOUT,
            std::time::Duration::from_secs(600)
        );
        let c = VgpuConfig::try_from(args(&["-s", "/tmp/vm", "--kernel-timeout", "1"]).unwrap())
            .unwrap();
        assert_eq!(
            c.executor_options.kernel_timeout,
            Some(std::time::Duration::from_secs(1))
        );
        for bad in ["0", "-5", "1.5", "ten", ""] {
            assert!(
                args(&["-s", "/tmp/vm", "--kernel-timeout", bad]).is_err(),
                "--kernel-timeout {bad} accepted"
            );
        }
        // Set in code below the minimum: refused like the flag.
        let short = VgpuConfig {
            executor_options: ExecutorOptions {
                kernel_timeout: Some(std::time::Duration::from_millis(500)),
                ..ExecutorOptions::default()
            },
            ..VgpuConfig::new("/tmp/vm")
        };
        assert!(matches!(
            short.validate(),
            Err(Error::Executor(e)) if e.to_string().contains("--kernel-timeout")
        ));
    }

    #[test]
    fn metrics_are_off_by_default_and_served_where_asked() {
        let c = VgpuConfig::try_from(args(&["-s", "/tmp/vm"]).unwrap()).unwrap();
        assert_eq!(c.metrics, None);
        for (flag, addr) in [
            ("127.0.0.1:9477", "127.0.0.1:9477"),
            ("0.0.0.0:9100", "0.0.0.0:9100"),
            ("[::1]:9477", "[::1]:9477"),
        ] {
            let c =
                VgpuConfig::try_from(args(&["-s", "/tmp/vm", "--metrics", flag]).unwrap()).unwrap();
            assert_eq!(c.metrics, Some(addr.parse().unwrap()));
        }
        let local = args(&["-s", "/tmp/vm", "--metrics", "localhost:9477"]).unwrap();
        assert!(local
            .metrics
            .is_some_and(|a| a.ip().is_loopback() && a.port() == 9477));
        for bad in ["", "9477", "127.0.0.1", "127.0.0.1:70000", "127.0.0.1:port"] {
            assert!(
                args(&["-s", "/tmp/vm", "--metrics", bad]).is_err(),
                "--metrics {bad:?} accepted"
            );
        }
    }

    #[test]
    fn nfs_serves_the_root_pair_by_default_with_its_own_small_quota() {
        let c =
            VgpuConfig::try_from(args(&["-s", "/tmp/vm", "--nfs-root", "/tmp"]).unwrap()).unwrap();
        let nfs = c.nfs_options().unwrap();
        assert!(nfs.vms.is_empty() && !nfs.discover);
        assert_eq!(nfs.mem_quota, 1 << 30);
        assert_eq!(c.mem_quota, None, "the sockets' quota is separate");
        assert_eq!(
            VgpuConfig::new("/tmp/vm").nfs_options().map(|o| o.root),
            None
        );
    }

    #[test]
    fn relative_socket_paths_live_in_the_current_directory() {
        let c = VgpuConfig::new("vm");
        c.validate().unwrap();
        assert_eq!(c.socket_paths(), vec![PathBuf::from("vm0")]);
    }

    #[test]
    fn qemu_args_match_the_device() {
        assert_eq!(
            qemu_args(Path::new("/run/vhost-vgpu/vm1"), 1, 22),
            "-chardev socket,id=vgpu1,path=/run/vhost-vgpu/vm1 \
             -device vhost-user-test-device-pci,chardev=vgpu1,virtio-id=22,num_vqs=1,\
             vq_size=1024,config_size=128"
        );
    }
}
