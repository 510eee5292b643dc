// SPDX-License-Identifier: Apache-2.0
//! The daemon: one thread per socket, each serving its VM again after every disconnect.
//!
//! A socket's thread waits for QEMU, then builds a fresh backend and vhost-user daemon for
//! the connection (its state — features, rings, memory table — belongs to that connection),
//! registers the backend's completion eventfd with the vring worker and serves until QEMU
//! goes away. It then resets the VM's tenant (sessions closed, device memory freed) and
//! waits for the next connection on the same, still bound, socket.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{error, info, warn};
use vgpu_mediator::control::{self, Attachment, Attachments, ControlServer};
use vgpu_mediator::metrics::MetricsServer;
use vgpu_mediator::{Limits, Mediator, Placement, SchedConfig, TenantConfig, TenantId};
use vgpu_nfs::NfsServer;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{VgpuBackend, COMPLETION_EVENT};
use crate::wait::wait_readable;
use crate::weights::WeightsReloader;
use crate::{qemu_args, Error, Result, VgpuConfig};

/// A running backend: its sockets, their tenants and the mediator they share.
///
/// Dropping it stops it like [`Daemon::stop`].
pub struct Daemon {
    mediator: Arc<Mediator>,
    sockets: Vec<PathBuf>,
    tenants: Vec<TenantId>,
    stop: Arc<Stop>,
    threads: Vec<(PathBuf, JoinHandle<Result<()>>)>,
    /// The NFS file transport on the same mediator, with `--nfs-root`.
    nfs: Option<NfsServer>,
    /// Reloads `--weights` (on SIGHUP).
    weights: Option<WeightsReloader>,
    /// The HTTP metrics endpoint, with `--metrics`.
    metrics: Option<MetricsServer>,

    /// The control socket (`vgpu-admin`), with `--control`.
    control: Option<ControlServer>,
}

/// Stops a [`Daemon`] from any thread: its sockets stop accepting, connected VMs are
/// disconnected and [`Daemon::wait`] returns.
#[derive(Clone)]
pub struct StopHandle(Arc<Stop>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.request();
    }
}

impl Daemon {
    /// Selects the executor, creates the mediator and starts serving. The sockets are bound
    /// when this returns, so a frontend may connect at once.
    pub fn start(config: VgpuConfig) -> Result<Daemon> {
        config.validate()?;
        let gpus = vgpu_mediator::select_gpus(config.executor.clone(), &config.executor_options)
            .map_err(Error::Executor)?;
        let limits = Limits {
            max_held_bytes: config.inflight_budget,
            ..Limits::default()
        };
        let sched = SchedConfig::with_kernel_timeout(config.executor_options.kernel_timeout);
        Daemon::start_with_mediator(&config, Mediator::with_gpus(gpus, limits, sched))
    }

    /// Starts serving with an existing mediator (`config.executor` is not used). The daemon
    /// adds one tenant per socket, placed on the mediator's GPUs as `config` and the
    /// weights file say (and the NFS transport one per directory it serves), and removes
    /// them when it stops.
    pub fn start_with_mediator(config: &VgpuConfig, mediator: Arc<Mediator>) -> Result<Daemon> {
        config.validate()?;
        let paths = config.socket_paths();
        for index in mediator.gpus() {
            if let Some(device) = mediator.gpu_device(index) {
                info!(
                    "GPU {index}: {} ({} executor, {} MiB)",
                    device.name,
                    device.kind.name(),
                    device.total_memory >> 20
                );
            }
        }
        if config.poll_us > 0 {
            info!(
                "host polling: each vring worker polls for up to {} µs after its last work",
                config.poll_us
            );
        }

        let mut daemon = Daemon {
            mediator: mediator.clone(),
            sockets: Vec::new(),
            tenants: Vec::new(),
            stop: Arc::new(Stop::new().map_err(Error::StopEvent)?),
            threads: Vec::new(),
            nfs: None,
            weights: config.weights_file.as_ref().map(|path| WeightsReloader {
                mediator: mediator.clone(),
                path: path.clone(),
                default: config.weight,
            }),
            metrics: None,
            control: None,
        };
        // First: an address that cannot be had stops the start before any VM is served.
        if let Some(addr) = config.metrics {
            let server = vgpu_mediator::metrics::serve(addr, &mediator)
                .map_err(|e| Error::Metrics(addr, e))?;
            daemon.metrics = Some(server);
        }
        // NFS VMs have their own quota (--nfs-mem-quota), and only the listed directories
        // (or the root pair) are tenants unless discovery was asked for.
        let names: Vec<String> = paths
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let settings = match &config.weights_file {
            Some(path) => crate::weights::load(path).map_err(Error::Weights)?,
            None => Default::default(),
        };
        if let Some(mut options) = config.nfs_options() {
            options.placements = crate::weights::nfs_placements(&settings, &names);
            let (root, nfs_quota) = (options.root.clone(), options.mem_quota);
            let nfs = NfsServer::start(mediator.clone(), options).map_err(Error::StartNfs)?;
            info!(
                "{}: serving the NFS file protocol, each NFS VM with {} MiB of device memory",
                root.display(),
                nfs_quota >> 20
            );
            daemon.nfs = Some(nfs);
        }
        let places = place_sockets(config, &settings, &mediator, &names)?;
        for (index, path) in paths.into_iter().enumerate() {
            let name = names[index].clone();
            let (gpu, quota, weight) = places[index];
            let listener =
                Listener::new(&path, true).map_err(|e| Error::Listen(path.clone(), e))?;
            let tenant = mediator
                .add_tenant_on(
                    TenantConfig {
                        name: name.clone(),
                        mem_quota: quota,
                        weight,
                    },
                    Placement::Gpu(gpu),
                )
                .map_err(|e| Error::AddTenant(name.clone(), e))?;
            daemon.sockets.push(path.clone());
            daemon.tenants.push(tenant);

            let socket = Socket {
                index,
                path: path.clone(),
                name: name.clone(),
                listener,
                tenant,
                mediator: mediator.clone(),
                stop: daemon.stop.clone(),
                poll: Duration::from_micros(config.poll_us),
            };
            let thread = thread::Builder::new()
                .name(format!("vgpu-{name}"))
                .spawn(move || socket.run())
                .map_err(|e| Error::SpawnThread(path.clone(), e))?;
            daemon.threads.push((path.clone(), thread));
            info!(
                "{}: listening (GPU {gpu}, {} MiB of device memory, weight {weight}); QEMU \
                 options: {}",
                path.display(),
                quota >> 20,
                qemu_args(&path, index, config.virtio_id)
            );
        }
        // The settings read for the placement above: the file is read once at start.
        if let Some(r) = &daemon.weights {
            r.apply(&settings);
            info!(
                "{}: weights of {} VMs (SIGHUP reads it again)",
                r.path.display(),
                settings.len()
            );
        }
        if let Some(path) = &config.control {
            let attachments = daemon.attachments();
            daemon.control = Some(
                ControlServer::start(path, mediator.clone(), attachments)
                    .map_err(Error::Control)?,
            );
        }
        info!(
            "QEMU must share guest RAM with the backend: -object \
             memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem"
        );
        Ok(daemon)
    }

    /// The socket paths, in order (`PATH0`, `PATH1`, ...).
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// The tenant of each socket, in the same order as [`Daemon::sockets`].
    pub fn tenants(&self) -> &[TenantId] {
        &self.tenants
    }

    /// The mediator the sockets' tenants live in.
    pub fn mediator(&self) -> Arc<Mediator> {
        self.mediator.clone()
    }

    /// The NFS file transport, with `--nfs-root`.
    pub fn nfs(&self) -> Option<&NfsServer> {
        self.nfs.as_ref()
    }

    /// Where the metrics endpoint listens, with `--metrics` (the port the system chose
    /// for port 0).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The control socket's path, with `--control`.
    pub fn control_path(&self) -> Option<&std::path::Path> {
        self.control.as_ref().map(ControlServer::path)
    }

    /// How each VM reaches the daemon, for the control socket: the sockets' tenants are
    /// virtio VMs, connected while their socket has a connection.
    fn attachments(&self) -> Attachments {
        let sockets: HashMap<TenantId, (usize, PathBuf)> = self
            .tenants
            .iter()
            .copied()
            .zip(self.sockets.iter().cloned().enumerate())
            .collect();
        let stop = self.stop.clone();
        Arc::new(move |tenant, name: &str| match sockets.get(&tenant) {
            Some((index, path)) => Attachment {
                transport: "virtio".into(),
                endpoint: Some(path.display().to_string()),
                connected: Some(stop.connections().contains_key(index)),
            },
            None => control::default_attachment(name),
        })
    }

    /// What reloads `--weights`, when given.
    pub fn weights_reloader(&self) -> Option<WeightsReloader> {
        self.weights.clone()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Waits until the daemon is stopped (or a socket fails, which stops it), then removes
    /// its tenants. Returns the first socket's failure, if any.
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Stops the daemon and waits for it: sockets removed, VMs disconnected, the NFS
    /// transport stopped, tenants removed.
    pub fn stop(mut self) -> Result<()> {
        self.stop.request();
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        let mut result = Ok(());
        for (path, thread) in self.threads.drain(..) {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err(Error::ThreadPanicked(path)));
            if let Err(e) = outcome {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        // The socket threads end only once a stop was requested: the control socket and
        // the NFS transport stop with them.
        if let Some(control) = self.control.take() {
            control.stop();
        }
        if let Some(nfs) = self.nfs.take() {
            nfs.stop();
        }
        for tenant in self.tenants.drain(..) {
            self.mediator.remove_tenant(tenant);
        }
        if let Some(metrics) = self.metrics.take() {
            metrics.stop();
        }
        result
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.request();
        let _ = self.join();
    }
}

/// Each socket's GPU, quota and weight: `--gpu` for the socket, else the weights file's
/// `gpu=`, else automatic; the file's `quota=`, else `--mem-quota`, else an even split of
/// the GPU (see [`vgpu_mediator::plan_placement`]); the file's weight, else `--weight`.
fn place_sockets(
    config: &VgpuConfig,
    settings: &crate::weights::Weights,
    mediator: &Mediator,
    names: &[String],
) -> Result<Vec<(u32, u64, u32)>> {
    let mut wishes = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let file = settings.get(name);
        let placement = match (config.placement(index), file.and_then(|s| s.gpu)) {
            (Some(flag), Some(line)) if flag != line => {
                warn!("{name}: --gpu {flag} overrides gpu={line} in the weights file");
                flag
            }
            (Some(flag), _) => flag,
            (None, Some(line)) => line,
            (None, None) => Placement::Auto,
        };
        let quota = file.and_then(|s| s.quota).or(config.mem_quota);
        wishes.push((placement, quota));
    }
    let places =
        vgpu_mediator::plan_placement(&mediator.gpu_usage(), &wishes).map_err(Error::Placement)?;
    Ok(places
        .into_iter()
        .zip(names)
        .map(|((gpu, quota), name)| {
            let weight = settings.get(name).map_or(config.weight, |s| s.weight);
            (gpu, quota, weight)
        })
        .collect())
}

/// The stop request every socket thread watches.
struct Stop {
    requested: AtomicBool,
    /// Becomes readable (and stays so) once a stop is requested.
    event: EventFd,
    /// The connection of each socket that has one, to cut it on stop.
    connections: Mutex<HashMap<usize, vhost_user_backend::ShutdownHandle>>,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        Ok(Stop {
            requested: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
            connections: Mutex::new(HashMap::new()),
        })
    }

    fn request(&self) {
        if self.requested.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.event.write(1) {
            error!("signalling the stop to the socket threads: {e}");
        }
        for connection in self.connections().values() {
            connection.shutdown();
        }
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Records a socket's connection so that a stop cuts it; cuts it at once when the stop
    /// came first. (`request` sets the flag before it takes the lock, so no connection is
    /// missed.)
    fn track(&self, index: usize, connection: Option<vhost_user_backend::ShutdownHandle>) {
        let mut connections = self.connections();
        if let Some(connection) = connection {
            if self.is_requested() {
                connection.shutdown();
            } else {
                connections.insert(index, connection);
            }
        }
    }

    fn untrack(&self, index: usize) {
        self.connections().remove(&index);
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<usize, vhost_user_backend::ShutdownHandle>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One socket, its tenant, and the thread that serves it.
struct Socket {
    index: usize,
    path: PathBuf,
    name: String,
    /// Bound for the socket thread's whole life; removes the socket file when dropped.
    listener: Listener,
    tenant: TenantId,
    mediator: Arc<Mediator>,
    stop: Arc<Stop>,
    /// Host-side polling window of the backend (`--poll-us`).
    poll: Duration,
}

impl Socket {
    fn run(mut self) -> Result<()> {
        let result = self.serve();
        if let Err(e) = &result {
            error!("{}: {e}; stopping the daemon", self.name);
            self.stop.request();
        }
        result
    }

    fn serve(&mut self) -> Result<()> {
        loop {
            let fds = [self.listener.as_raw_fd(), self.stop.event.as_raw_fd()];
            match wait_readable(&fds, None) {
                Ok(Some(0)) if !self.stop.is_requested() => self.serve_connection()?,
                Ok(_) => return Ok(()),
                Err(e) => return Err(Error::WaitConnection(self.path.clone(), e)),
            }
            if self.stop.is_requested() {
                return Ok(());
            }
        }
    }

    fn serve_connection(&mut self) -> Result<()> {
        let path = || self.path.clone();
        let mut backend = VgpuBackend::new(self.mediator.clone(), self.tenant)
            .map_err(|e| Error::CreateBackend(path(), e))?;
        backend.set_poll(self.poll);
        let completion_fd = backend.completion_fd();
        let backend = Arc::new(RwLock::new(backend));
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-vgpu-{}", self.name),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::CreateDaemon(path(), e))?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(completion_fd, EventSet::IN, u64::from(COMPLETION_EVENT))
                .map_err(|e| Error::RegisterCompletions(path(), e))?;
        }

        if let Err(e) = daemon.start(&mut self.listener) {
            warn!("{}: accepting a connection: {e}", self.name);
            drop(daemon);
            close_exit_events(&backend);
            // E.g. out of file descriptors: give the host a moment instead of spinning.
            thread::sleep(Duration::from_millis(100));
            return Ok(());
        }
        self.stop.track(self.index, daemon.shutdown_handle());
        info!("{}: VM connected", self.name);
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {}
            Err(e) => warn!("{}: connection ended: {e}", self.name),
        }
        self.stop.untrack(self.index);
        // Dropping the daemon stops and joins its vring worker; nothing touches the backend
        // after this.
        drop(daemon);
        close_exit_events(&backend);
        drop(backend);
        self.mediator.reset_tenant(self.tenant);
        info!(
            "{}: VM disconnected; its sessions are closed and its device memory is freed",
            self.name
        );
        Ok(())
    }
}

/// Once the vhost-user daemon is dropped: see [`VgpuBackend::close_exit_events`].
fn close_exit_events(backend: &RwLock<VgpuBackend>) {
    backend
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .close_exit_events();
}

/// The signals the daemon acts on: SIGINT and SIGTERM stop it, SIGHUP reloads the
/// weights. See [`vgpu_mediator::signals`].
pub(crate) const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;
    use std::path::Path;
    use std::time::Instant;

    use vgpu_mediator::cpu::CpuExecutorFactory;
    use vgpu_mediator::ExecutorChoice;
    use vgpu_protocol::{Command, Request, Status};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::testvmm::Vm;

    fn is_socket(path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
    }

    fn cpu_config(dir: &TempDir, count: usize) -> VgpuConfig {
        VgpuConfig {
            socket_count: count,
            executor: ExecutorChoice::Cpu,
            mem_quota: Some(32 << 20),
            ..VgpuConfig::new(dir.as_path().join("vm"))
        }
    }

    /// Waits until `done` holds, for up to 10 s.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn sockets_are_bound_at_start_one_tenant_each_and_removed_at_stop() {
        let dir = TempDir::new().unwrap();
        let mediator = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let daemon = Daemon::start_with_mediator(&cpu_config(&dir, 2), mediator.clone()).unwrap();
        let sockets = daemon.sockets().to_vec();
        assert_eq!(
            sockets,
            vec![dir.as_path().join("vm0"), dir.as_path().join("vm1")]
        );
        assert!(sockets.iter().all(|s| is_socket(s)));
        let names: Vec<String> = daemon
            .tenants()
            .iter()
            .map(|&t| mediator.tenant_config(t).unwrap().name)
            .collect();
        assert_eq!(names, ["vm0", "vm1"]);
        assert_eq!(
            mediator
                .device_config(daemon.tenants()[1])
                .unwrap()
                .mem_quota,
            32 << 20
        );

        daemon.stop().unwrap();
        assert!(sockets.iter().all(|s| !s.exists()));
        assert!(mediator.tenants().is_empty());
    }

    #[test]
    fn a_vm_that_reconnects_is_served_again_with_its_sessions_gone() {
        let dir = TempDir::new().unwrap();
        let daemon = Daemon::start(cpu_config(&dir, 1)).unwrap();
        let (socket, tenant) = (daemon.sockets()[0].clone(), daemon.tenants()[0]);
        let mediator = daemon.mediator();
        for _ in 0..3 {
            let mut vm = Vm::connect(&socket).unwrap();
            let (header, _) = vm.request(&Request::new(0, Command::SessionOpen)).unwrap();
            assert_eq!(header.status, Status::Ok);
            let (header, _) = vm
                .request(&Request::new(header.value0, Command::Alloc { size: 4096 }))
                .unwrap();
            assert_eq!(header.status, Status::Ok);
            assert_eq!(mediator.usage(tenant).unwrap().sessions, 1);
            drop(vm);
            assert!(eventually(|| {
                let usage = mediator.usage(tenant).unwrap();
                (usage.sessions, usage.mem_used) == (0, 0)
            }));
        }
        // A VM still connected is cut by the stop.
        let _held = Vm::connect(&socket).unwrap();
        let stop = daemon.stop_handle();
        let waiter = thread::spawn(move || daemon.wait());
        stop.stop();
        assert!(eventually(|| waiter.is_finished()));
        waiter.join().unwrap().unwrap();
        assert!(!socket.exists());
    }

    /// A daemon that polls on the host serves a real frontend in every guest mode: with
    /// and without EVENT_IDX, by interrupt and by polling, one request at a time and many
    /// in flight.
    #[test]
    fn a_polling_daemon_serves_every_guest_mode() {
        use crate::testvmm::{Notify, VmOptions, DRIVER_FEATURES, F_EVENT_IDX};
        let dir = TempDir::new().unwrap();
        let config = VgpuConfig {
            poll_us: 50,
            ..cpu_config(&dir, 1)
        };
        let daemon = Daemon::start(config).unwrap();
        let socket = daemon.sockets()[0].clone();
        for features in [DRIVER_FEATURES, DRIVER_FEATURES & !F_EVENT_IDX] {
            for notify in [Notify::Interrupt, Notify::Polling] {
                let options = VmOptions {
                    features,
                    notify,
                    timeout: Duration::from_secs(10),
                    ..VmOptions::default()
                };
                let mut vm = Vm::connect_with(&socket, options).unwrap();
                assert_eq!(vm.features() & F_EVENT_IDX, features & F_EVENT_IDX);
                let (header, _) = vm.request(&Request::new(0, Command::SessionOpen)).unwrap();
                assert_eq!(header.status, Status::Ok);
                let sync = Request::new(header.value0, Command::Sync);
                for _ in 0..200 {
                    let (header, _) = vm.request(&sync).unwrap();
                    assert_eq!(header.status, Status::Ok);
                }
                // Bursts, with pauses longer than the polling window between them.
                for _ in 0..20 {
                    for _ in 0..16 {
                        vm.submit(&sync).unwrap();
                    }
                    let mut done = 0;
                    while done < 16 {
                        for c in vm.wait().unwrap() {
                            assert_eq!(c.response().unwrap().0.status, Status::Ok);
                            done += 1;
                        }
                    }
                    thread::sleep(Duration::from_micros(200));
                }
                drop(vm);
            }
        }
        daemon.stop().unwrap();
    }

    #[test]
    fn weights_from_the_file_apply_at_start_and_again_on_reload() {
        let dir = TempDir::new().unwrap();
        let file = dir.as_path().join("weights");
        std::fs::write(&file, "vm1 300  # the big one\n").unwrap();
        let config = VgpuConfig {
            weights_file: Some(file.clone()),
            weight: 50,
            ..cpu_config(&dir, 2)
        };
        let daemon = Daemon::start(config).unwrap();
        let m = daemon.mediator();
        let [vm0, vm1] = [daemon.tenants()[0], daemon.tenants()[1]];
        assert_eq!((m.weight(vm0), m.weight(vm1)), (Some(50), Some(300)));
        // What a guest sees in INFO follows.
        let info = m.call(vm1, Request::new(0, Command::Info));
        assert_eq!(info.status, Status::Ok);
        let info = vgpu_protocol::InfoReply::decode(&info.data).unwrap();
        assert_eq!(info.weight, 300);
        std::fs::write(&file, "vm0 10\nvm1 20\n").unwrap();
        daemon.weights_reloader().unwrap().reload().unwrap();
        assert_eq!((m.weight(vm0), m.weight(vm1)), (Some(10), Some(20)));
        daemon.stop().unwrap();
    }

    /// Sends `line` as it is to the control socket; the answer.
    fn raw_control(path: &Path, line: &[u8]) -> serde_json::Value {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A client that sends more than the server reads may see its write cut short.
        let _ = stream.write_all(line);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        serde_json::from_str(answer.trim()).unwrap()
    }

    #[test]
    fn the_control_socket_lists_the_vms_and_changes_quota_and_weight() {
        use std::os::unix::fs::PermissionsExt;
        use vgpu_mediator::control::{self, ListReply, SetReply};
        use vgpu_protocol::InfoReply;

        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vm.control");
        let config = VgpuConfig {
            control: Some(path.clone()),
            ..cpu_config(&dir, 2)
        };
        let daemon = Daemon::start(config).unwrap();
        assert_eq!(daemon.control_path(), Some(path.as_path()));
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let m = daemon.mediator();
        let [vm0, vm1] = [daemon.tenants()[0], daemon.tenants()[1]];
        let ask =
            |request: serde_json::Value| control::request(&path, &request, Duration::from_secs(10));
        let list = || -> ListReply {
            serde_json::from_value(ask(serde_json::json!({"op": "list"})).unwrap()).unwrap()
        };

        let l = list();
        assert_eq!(l.device.executor, "cpu");
        let names: Vec<&str> = l.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vm0", "vm1"]);
        for v in &l.vms {
            assert_eq!((v.transport.as_str(), v.connected), ("virtio", Some(false)));
            assert_eq!((v.mem_quota, v.weight, v.sessions), (32 << 20, 100, 0));
        }
        assert_eq!(
            l.vms[0].endpoint.as_deref(),
            Some(daemon.sockets()[0].to_str().unwrap())
        );

        // A VM with a session and a 1 MiB buffer.
        let mut vm = Vm::connect(&daemon.sockets()[0]).unwrap();
        let (header, _) = vm.request(&Request::new(0, Command::SessionOpen)).unwrap();
        assert_eq!(header.status, Status::Ok);
        let sid = header.value0;
        let alloc = |vm: &mut Vm, size: u64| {
            vm.request(&Request::new(sid, Command::Alloc { size }))
                .unwrap()
                .0
        };
        assert_eq!(alloc(&mut vm, 1 << 20).status, Status::Ok);
        let l = list();
        assert_eq!(l.vms[0].connected, Some(true));
        assert_eq!((l.vms[0].sessions, l.vms[0].allocations), (1, 1));
        let used = l.vms[0].mem_used;
        assert!(used >= 1 << 20, "{used}");
        assert_eq!(l.vms[0].session_rows.len(), 1);

        // The quota lowered below what the VM holds: nothing is freed, new memory is refused.
        let set: SetReply = serde_json::from_value(
            ask(serde_json::json!({"op": "set", "vm": "vm0", "quota": "1M"})).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (set.vm.as_str(), set.mem_quota, set.weight),
            ("vm0", 1 << 20, 100)
        );
        assert_eq!(m.quota(vm0), Some(1 << 20));
        assert_eq!(alloc(&mut vm, 4096).status, Status::QuotaExceeded);
        assert_eq!(m.usage(vm0).unwrap().mem_used, used);
        // What the guest sees (vgpu-smi's "memory quota") follows, and so does the config
        // space.
        let (header, data) = vm.request(&Request::new(sid, Command::Info)).unwrap();
        assert_eq!(header.status, Status::Ok);
        let info = InfoReply::decode(&data).unwrap();
        assert_eq!((info.config.mem_quota, info.mem_used), (1 << 20, used));
        assert_eq!(m.device_config(vm0).unwrap().mem_quota, 1 << 20);
        // Raised again: room again.
        ask(serde_json::json!({"op": "set", "vm": "vm0", "quota": 64 << 20})).unwrap();
        assert_eq!(alloc(&mut vm, 4096).status, Status::Ok);

        // The weight, in the scheduler and in the other VM's INFO.
        let set: SetReply = serde_json::from_value(
            ask(serde_json::json!({"op": "set", "vm": "vm1", "weight": 300})).unwrap(),
        )
        .unwrap();
        assert_eq!((set.mem_quota, set.weight), (32 << 20, 300));
        assert_eq!(m.weight(vm1), Some(300));
        let info = m.call(vm1, Request::new(0, Command::Info));
        assert_eq!(InfoReply::decode(&info.data).unwrap().weight, 300);
        let l = list();
        assert_eq!(
            (l.vms[0].mem_quota, l.vms[1].weight),
            (64 << 20, 300),
            "the list shows the new values"
        );

        // Bad requests get errors, and the server serves on.
        let error = |line: &[u8]| -> String {
            let v = raw_control(&path, line);
            v["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"))
                .to_owned()
        };
        assert!(error(b"{not json\n").contains("not valid JSON"));
        assert!(error(b"{\"op\":\"format\"}\n").contains("unknown op"));
        assert!(error(b"{\"op\":\"set\",\"vm\":\"vm9\",\"weight\":5}\n")
            .contains("no VM named \"vm9\" (VMs: vm0, vm1)"));
        assert!(error(b"{\"op\":\"set\",\"vm\":\"vm1\",\"weight\":0}\n").contains("bad weight"));
        assert!(error(b"{\"op\":\"set\",\"vm\":\"vm1\",\"quota\":\"2X\"}\n").contains("bad quota"));
        let mut huge = vec![b' '; 1 << 20];
        huge.push(b'\n');
        assert!(error(&huge).contains("longer than 65536 bytes"));
        // A client that goes away without a request, and one that stops half-way.
        drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
        assert!(error(b"{\"op\":").contains("not valid JSON"));
        // A client that sends nothing holds the server for the connection deadline at most.
        let slow = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let started = Instant::now();
        assert_eq!(list().vms.len(), 2);
        assert!(started.elapsed() < control::CONNECTION_DEADLINE * 2);
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut &slow, &mut answer).unwrap();
        assert!(answer.contains("no complete request within"), "{answer}");
        assert_eq!(m.weight(vm1), Some(300));
        assert_eq!(list().vms.len(), 2);

        drop(vm);
        daemon.stop().unwrap();
        assert!(!path.exists(), "the control socket is removed at stop");
    }

    #[test]
    fn dropping_the_daemon_stops_it() {
        let dir = TempDir::new().unwrap();
        let daemon = Daemon::start(cpu_config(&dir, 1)).unwrap();
        let socket = daemon.sockets()[0].clone();
        drop(daemon);
        assert!(!socket.exists());
    }

    #[test]
    fn start_refuses_a_missing_directory_and_binds_nothing() {
        let dir = TempDir::new().unwrap();
        let config = VgpuConfig {
            executor: ExecutorChoice::Cpu,
            ..VgpuConfig::new(dir.as_path().join("missing/vm"))
        };
        assert!(matches!(
            Daemon::start(config),
            Err(Error::SocketDirMissing(_))
        ));
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
    }

    #[test]
    fn the_nfs_transport_shares_the_mediator_and_stops_with_the_daemon() {
        let dir = TempDir::new().unwrap();
        let root = TempDir::new().unwrap();
        let config = VgpuConfig {
            nfs_root: Some(root.as_path().to_path_buf()),
            ..cpu_config(&dir, 1)
        };
        let mediator = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let daemon = Daemon::start_with_mediator(&config, mediator.clone()).unwrap();
        // The socket's tenant and the root pair's.
        assert_eq!(mediator.tenants().len(), 2);
        let response = root.as_path().join("response.txt");
        assert_eq!(
            std::fs::read_to_string(&response).unwrap().trim(),
            "0:Ready"
        );
        daemon.stop().unwrap();
        assert!(mediator.tenants().is_empty());
    }

    /// Waits until the NFS transport has scanned everything `n` more times.
    fn nfs_passes(daemon: &Daemon, n: u64) {
        let nfs = daemon.nfs().unwrap();
        let target = nfs.passes() + n + 1;
        assert!(
            eventually(|| nfs.passes() >= target),
            "the transport stopped"
        );
    }

    fn nfs_tenants(mediator: &Mediator) -> Vec<(String, u64)> {
        let mut names: Vec<(String, u64)> = mediator
            .tenants()
            .into_iter()
            .map(|t| {
                let name = mediator.tenant_config(t).unwrap().name;
                (name, mediator.device_config(t).unwrap().mem_quota)
            })
            .filter(|(name, _)| name.starts_with("nfs:"))
            .collect();
        names.sort();
        names
    }

    /// The attack of the security review: a guest that can create directories in the
    /// export must not create tenants (a thread, on CUDA a worker and a context, each).
    #[test]
    fn directories_a_guest_creates_are_no_tenants_unless_discovery_is_asked_for() {
        let dir = TempDir::new().unwrap();
        let root = TempDir::new().unwrap();
        for i in 0..200 {
            std::fs::create_dir(root.as_path().join(format!("vm{i}"))).unwrap();
        }
        let mediator = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let config = VgpuConfig {
            nfs_root: Some(root.as_path().to_path_buf()),
            nfs_vms: vec!["vm1".into(), "vm2".into()],
            ..cpu_config(&dir, 1)
        };
        let daemon = Daemon::start_with_mediator(&config, mediator.clone()).unwrap();
        // The 200 directories stay unserved while the transport scans them, again and again.
        nfs_passes(&daemon, 3);
        let quota = vgpu_nfs::DEFAULT_MEM_QUOTA;
        assert_eq!(
            nfs_tenants(&mediator),
            [("nfs:vm1".to_owned(), quota), ("nfs:vm2".to_owned(), quota)],
            "exactly the listed VMs, with the NFS quota (not the sockets' 32 MiB)"
        );
        assert_eq!(mediator.tenants().len(), 3);
        assert!(!root.as_path().join("vm7/response.txt").exists());
        daemon.stop().unwrap();

        // Discovery on: capped.
        let config = VgpuConfig {
            nfs_root: Some(root.as_path().to_path_buf()),
            nfs_discover: true,
            nfs_max_vms: 5,
            nfs_mem_quota: 8 << 20,
            ..cpu_config(&dir, 1)
        };
        let daemon = Daemon::start_with_mediator(&config, mediator.clone()).unwrap();
        nfs_passes(&daemon, 3);
        let tenants = nfs_tenants(&mediator);
        // The root pair and 5 discovered directories, each with --nfs-mem-quota.
        assert_eq!(tenants.len(), 6, "{tenants:?}");
        assert!(tenants.iter().all(|(_, q)| *q == 8 << 20), "{tenants:?}");
        daemon.stop().unwrap();
        assert!(mediator.tenants().is_empty());
    }

    /// Sends a GET and returns the answer's status line and body.
    fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    #[test]
    fn metrics_show_each_socket_vm_and_stop_with_the_daemon() {
        let dir = TempDir::new().unwrap();
        let config = VgpuConfig {
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            ..cpu_config(&dir, 2)
        };
        let daemon = Daemon::start(config).unwrap();
        let addr = daemon.metrics_addr().expect("listening");
        let mut vm = Vm::connect(&daemon.sockets()[1]).unwrap();
        let (header, _) = vm.request(&Request::new(0, Command::SessionOpen)).unwrap();
        assert_eq!(header.status, Status::Ok);

        let (status, body) = scrape(addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains(
            "vgpu_requests_total{vm=\"vm1\",gpu=\"0\",op=\"session_open\",status=\"ok\"} 1\n"
        ));
        assert!(body.contains("vgpu_sessions{vm=\"vm1\",gpu=\"0\"} 1\n"));
        assert!(body.contains("vgpu_sessions{vm=\"vm0\",gpu=\"0\"} 0\n"));
        assert!(body.contains(&format!(
            "vgpu_memory_quota_bytes{{vm=\"vm0\",gpu=\"0\"}} {}\n",
            32 << 20
        )));
        assert_eq!(scrape(addr, "/").0, "HTTP/1.1 404 Not Found");

        // The address is taken now: a second daemon does not start.
        let other = TempDir::new().unwrap();
        let taken = VgpuConfig {
            metrics: Some(addr),
            ..cpu_config(&other, 1)
        };
        let e = Daemon::start(taken).err().expect("address in use");
        assert!(matches!(e, Error::Metrics(a, _) if a == addr), "{e}");
        assert_eq!(e.to_string(), format!("--metrics {addr}: cannot listen"));
        assert!(!other.as_path().join("vm0").exists(), "no socket served");

        drop(vm);
        daemon.stop().unwrap();
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
