// SPDX-License-Identifier: Apache-2.0
//! `vgpu-bench`: what the vhost-user transport costs, measured through the test VMM.
//!
//! Each virtio figure stands beside the same operation called in-process on the mediator
//! (`Mediator::call`, no transport) and beside a bare eventfd ping-pong between two
//! threads, the floor of any interrupt-driven round trip. The null round trip is measured
//! with the daemon's host-side polling off and on (`--poll-us`). The output is a markdown
//! report for `docs/benchmarks.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use vgpu_mediator::{
    select_with, ExecutorChoice, ExecutorOptions, Mediator, TenantConfig, TenantId,
};
use vgpu_protocol::{Command, Request, ResponseHeader, Status, RESPONSE_HEADER_SIZE};
use vhost_vgpu::testvmm::{Buf, Notify, Vm, VmOptions};
use vmm_sys_util::eventfd::EventFd;

#[derive(Parser, Debug)]
#[command(
    name = "vgpu-bench",
    version,
    about = "Benchmarks the vGPU vhost-user transport through an in-process test VMM",
    long_about = "Benchmarks the vGPU vhost-user transport through an in-process test VMM.\n\n\
        Measures a null operation (SYNC on an idle session) round trip with 1 and 4 VMs, by \
        interrupt and by polling in the guest, each with the daemon's host-side polling off \
        (--poll-us 0) and on (--poll-us N), and host-to-device / device-to-host bandwidth \
        from 4 KiB up to --max-size. Beside each figure: the same operation called \
        in-process on the mediator, and an eventfd ping-pong between two threads. Prints a \
        markdown report."
)]
struct Cli {
    /// Executor of the in-process daemon and of the in-process baseline.
    #[arg(
        long,
        value_name = "auto|cuda|cpu|remote:HOST:PORT",
        default_value = "auto"
    )]
    executor: ExecutorChoice,
    /// Key file for --executor remote (see vhost-vgpu --remote-key).
    #[arg(long, value_name = "FILE")]
    remote_key: Option<PathBuf>,
    /// Benchmark an external daemon instead of starting one in-process: its socket, or the
    /// base path it was started with (`vhost-vgpu --socket-path BASE --socket-count 4`
    /// listens on BASE0 ... BASE3; the 4-VM rows need four sockets).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Largest transfer of the bandwidth table (rounded down to a power of 4 times 4 KiB).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = vgpu_mediator::parse_size)]
    max_size: u64,
    /// Short runs and transfers up to 4 MiB: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Seconds each latency row measures for.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Host-side polling window (the daemon's --poll-us) of the rows marked "poll N µs": a
    /// second in-process daemon, on the same mediator, is started with it; every other row
    /// uses a daemon with --poll-us 0. 0 leaves the host-polling rows out. Not used with
    /// --socket (the external daemon's own setting applies).
    #[arg(long, value_name = "N", default_value_t = 50)]
    poll_us: u64,
}

impl Cli {
    fn options(&self) -> ExecutorOptions {
        ExecutorOptions {
            remote_key: self.remote_key.clone(),
            ..ExecutorOptions::default()
        }
    }
}

/// Latency samples of one row.
struct Latency {
    samples: Vec<Duration>,
    wall: Duration,
}

impl Latency {
    fn percentile(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort_unstable();
        if s.is_empty() {
            return Duration::ZERO;
        }
        let i = ((s.len() - 1) as f64 * p).round() as usize;
        s[i]
    }

    fn per_second(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64()
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type BenchResult<T> = Result<T, String>;

fn run(cli: &Cli) -> BenchResult<()> {
    let seconds = if cli.quick { 0.2 } else { cli.seconds };
    let budget = Duration::from_secs_f64(seconds);
    let max_size = if cli.quick {
        cli.max_size.min(4 << 20)
    } else {
        cli.max_size
    };
    // Enough quota for the largest buffer of the in-process baseline and of the VM, and
    // for the sessions' contexts (charged to the VM on a GPU: at most 4 GiB each).
    let quota = (2 * max_size).max(64 << 20) + (8 << 30);
    let target = Target::start(cli, quota)?;

    println!("# vgpu-bench\n");
    println!(
        "- device: {} ({} executor)\n- host: {} CPUs; build: {}\n- daemon: {}\n- command: `{}`\n",
        target.mediator.device().name,
        target.mediator.device().kind.name(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cfg!(debug_assertions) {
            "debug (numbers are not representative)"
        } else {
            "release"
        },
        target.describe(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );

    // Round trips.
    let floor = eventfd_ping_pong(budget);
    let inproc = inprocess_null(&target.mediator, target.baseline_tenant, budget)?;
    println!("## Null-operation round trip (SYNC on an idle session)\n");
    println!(
        "| path | VMs | notify | host | p50 µs | p99 µs | req/s | p50 / in-process | \
         p50 / eventfd floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let row = |path: &str, vms: usize, notify: &str, host: &str, l: &Latency| {
        let p50 = l.percentile(0.5);
        println!(
            "| {path} | {vms} | {notify} | {host} | {} | {} | {:.0} | {:.1}x | {:.1}x |",
            us(p50),
            us(l.percentile(0.99)),
            l.per_second(),
            p50.as_secs_f64() / inproc.percentile(0.5).as_secs_f64().max(1e-9),
            p50.as_secs_f64() / floor.percentile(0.5).as_secs_f64().max(1e-9),
        );
    };
    row("eventfd ping-pong, 2 threads", 0, "-", "-", &floor);
    row("`Mediator::call` in-process", 0, "-", "-", &inproc);
    for (host, sockets) in target.host_modes() {
        for notify in [Notify::Interrupt, Notify::Polling] {
            for vms in [1, 4] {
                let notify_name = format!("{notify:?}").to_lowercase();
                if sockets.len() < vms {
                    println!(
                        "| virtio (vhost-user) | {vms} | {notify_name} | {host} | skipped: {} \
                         socket(s) | | | | |",
                        sockets.len()
                    );
                    continue;
                }
                let l = virtio_null(&sockets[..vms], notify, budget)?;
                row("virtio (vhost-user)", vms, &notify_name, &host, &l);
            }
        }
    }
    println!();
    // What a request costs in CPU time: this process holds the test VMM, the backend and
    // the mediator (with the CPU executor, the executor too), so the figure is their sum.
    for (host, sockets) in target.host_modes() {
        let cpu_before = process_cpu();
        let l = virtio_null(&sockets[..1], Notify::Interrupt, budget)?;
        let cpu = process_cpu().saturating_sub(cpu_before);
        println!(
            "CPU time per null request, 1 VM, interrupt, host {host}: {:.1} µs (test VMM, \
             backend and mediator of this process together; {} requests).\n",
            cpu.as_secs_f64() * 1e6 / l.samples.len().max(1) as f64,
            l.samples.len()
        );
    }
    for (host, sockets) in target.host_modes() {
        let pipelined = virtio_pipelined(&sockets[0], budget)?;
        println!(
            "Pipelined, 1 VM, 64 requests in flight, interrupt, host {host}: {pipelined:.0} \
             req/s ({:.2} µs per request).\n",
            1e6 / pipelined
        );
    }
    if target.polling.is_some() {
        println!(
            "Host \"epoll\": the daemon's vring worker sleeps in epoll between events \
             (--poll-us 0). Host \"poll N µs\": after each kick or completion it keeps \
             checking the ring and the completion queue for up to N µs since its last work, \
             with guest kicks suppressed meanwhile (--poll-us N); it spends a host core while \
             it does, so with fewer cores than busy threads polling can lose.\n"
        );
    }

    // Bandwidth.
    println!("## Bandwidth (one request per transfer, guest buffer physically contiguous)\n");
    println!(
        "| size | HTOD virtio GB/s | HTOD virtio host buffer GB/s | HTOD in-process GB/s | \
         DTOH virtio GB/s | DTOH virtio host buffer GB/s | DTOH in-process GB/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut size = 4096u64;
    let sockets = target.sockets(2);
    let mut vm = BandwidthVm::connect(&sockets[0], max_size, false)?;
    // A second VM (one frontend per socket) whose data area is a registered host buffer.
    let mut registered = BandwidthVm::connect(sockets.last().expect("a socket"), max_size, true)?;
    let baseline = Baseline::open(&target.mediator, target.baseline_tenant, max_size)?;
    while size <= max_size {
        let reps = repetitions(size, cli.quick);
        let htod_v = vm.run(Direction::Htod, size, reps)?;
        let htod_r = registered.run(Direction::Htod, size, reps)?;
        let htod_m = baseline.run(Direction::Htod, size, reps)?;
        let dtoh_v = vm.run(Direction::Dtoh, size, reps)?;
        let dtoh_r = registered.run(Direction::Dtoh, size, reps)?;
        let dtoh_m = baseline.run(Direction::Dtoh, size, reps)?;
        println!(
            "| {} | {htod_v:.2} | {} | {htod_m:.2} | {dtoh_v:.2} | {} | {dtoh_m:.2} |",
            human(size),
            registered.show(htod_r),
            registered.show(dtoh_r),
        );
        size *= 4;
    }
    println!(
        "\nIn-process rows build the request as a transport would (HTOD copies the data into \
         the request, DTOH returns it in the response); virtio rows move the bytes between \
         guest RAM and the executor, read and written in place. Host buffer rows copy from \
         and to guest memory registered with HOST_REGISTER, as a guest driver's mmap \
         buffers are (the analogue of cudaMallocHost): {}.",
        registered.registration
    );
    Ok(())
}

fn repetitions(size: u64, quick: bool) -> u32 {
    // About 1 GiB per point (64 MiB quick), between 3 and 2000 transfers.
    let bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    (bytes / size).clamp(3, 2000) as u32
}

fn human(size: u64) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

/// Where the VMs connect: an in-process daemon or an external socket.
struct Target {
    mediator: Arc<Mediator>,
    /// A tenant of `mediator` that no VM uses, for the in-process baseline.
    baseline_tenant: TenantId,
    sockets: Vec<PathBuf>,
    daemon: Option<vhost_vgpu::Daemon>,
    /// The daemon with host polling (`--poll-us N`, N > 0), on the same mediator, and its
    /// window in µs.
    polling: Option<(vhost_vgpu::Daemon, u64)>,
    _dir: Option<TempDir>,
}

impl Target {
    fn start(cli: &Cli, quota: u64) -> BenchResult<Target> {
        let tenant = |m: &Mediator| {
            m.add_tenant(TenantConfig {
                name: "bench-in-process".into(),
                mem_quota: quota,
                weight: 1,
            })
            .map_err(|e| format!("adding the baseline tenant: {e}"))
        };
        if let Some(socket) = &cli.socket {
            let mediator = Mediator::new(
                select_with(cli.executor.clone(), &cli.options()).map_err(|e| e.to_string())?,
            );
            let baseline_tenant = tenant(&mediator)?;
            let indexed: Vec<PathBuf> = (0..4)
                .map(|i| PathBuf::from(format!("{}{i}", socket.display())))
                .take_while(|p| p.exists())
                .collect();
            let sockets = if indexed.is_empty() {
                vec![socket.clone()]
            } else {
                indexed
            };
            return Ok(Target {
                mediator,
                baseline_tenant,
                sockets,
                daemon: None,
                polling: None,
                _dir: None,
            });
        }
        let dir = TempDir::new()?;
        let config = vhost_vgpu::VgpuConfig {
            socket_count: 4,
            executor: cli.executor.clone(),
            executor_options: cli.options(),
            mem_quota: Some(quota),
            ..vhost_vgpu::VgpuConfig::new(dir.0.join("vm"))
        };
        let daemon = vhost_vgpu::Daemon::start(config.clone())
            .map_err(|e| format!("starting the daemon: {e}"))?;
        let mediator = daemon.mediator();
        let polling = if cli.poll_us > 0 {
            let config = vhost_vgpu::VgpuConfig {
                socket_path: dir.0.join("poll"),
                poll_us: cli.poll_us,
                ..config
            };
            config
                .validate()
                .map_err(|e| format!("--poll-us {}: {e}", cli.poll_us))?;
            let polling = vhost_vgpu::Daemon::start_with_mediator(&config, mediator.clone())
                .map_err(|e| format!("starting the polling daemon: {e}"))?;
            Some((polling, cli.poll_us))
        } else {
            None
        };
        let baseline_tenant = tenant(&mediator)?;
        Ok(Target {
            mediator,
            baseline_tenant,
            sockets: daemon.sockets().to_vec(),
            daemon: Some(daemon),
            polling,
            _dir: Some(dir),
        })
    }

    /// The sockets of each host mode, named for the table: the daemon without host
    /// polling, then the one with it.
    fn host_modes(&self) -> Vec<(String, Vec<PathBuf>)> {
        let plain = match self.daemon {
            Some(_) => "epoll",
            None => "external",
        };
        let mut modes = vec![(plain.to_string(), self.sockets.clone())];
        if let Some((daemon, poll_us)) = &self.polling {
            modes.push((format!("poll {poll_us} µs"), daemon.sockets().to_vec()));
        }
        modes
    }

    fn sockets(&self, n: usize) -> Vec<PathBuf> {
        self.sockets.iter().take(n).cloned().collect()
    }

    fn describe(&self) -> String {
        match self.daemon {
            Some(_) => match &self.polling {
                Some((daemon, poll_us)) => format!(
                    "in-process, {} sockets with --poll-us 0 and {} with --poll-us {poll_us}, \
                     one mediator",
                    self.sockets.len(),
                    daemon.sockets().len()
                ),
                None => format!("in-process, {} sockets, --poll-us 0", self.sockets.len()),
            },
            None => format!(
                "external, {} socket(s) from {}; in-process baseline on this process's own mediator",
                self.sockets.len(),
                self.sockets[0].display()
            ),
        }
    }
}

/// A private directory for the daemon's sockets, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> BenchResult<TempDir> {
        let dir = std::env::temp_dir().join(format!("vgpu-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two threads pass a token through two blocking eventfds: one round trip is two
/// wake-ups, as a kick and an interrupt are.
fn eventfd_ping_pong(budget: Duration) -> Latency {
    let ping = Arc::new(EventFd::new(0).expect("eventfd"));
    let pong = Arc::new(EventFd::new(0).expect("eventfd"));
    let (p, q) = (ping.clone(), pong.clone());
    // The largest value an eventfd counter holds ends the echo thread.
    const STOP: u64 = u64::MAX - 1;
    let echo = std::thread::spawn(move || loop {
        match p.read() {
            Ok(STOP) | Err(_) => break,
            Ok(_) => q.write(1).expect("eventfd write"),
        }
    });
    for _ in 0..1000 {
        ping.write(1).expect("eventfd write");
        pong.read().expect("eventfd read");
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 1000 {
        let t = Instant::now();
        ping.write(1).expect("eventfd write");
        pong.read().expect("eventfd read");
        samples.push(t.elapsed());
    }
    let wall = start.elapsed();
    ping.write(STOP).expect("eventfd write");
    let _ = echo.join();
    Latency { samples, wall }
}

fn inprocess_null(mediator: &Mediator, tenant: TenantId, budget: Duration) -> BenchResult<Latency> {
    let open = mediator.call(tenant, Request::new(0, Command::SessionOpen));
    if !open.is_ok() {
        return Err(format!("in-process SESSION_OPEN: {}", open.status));
    }
    let session = open.value0;
    for _ in 0..1000 {
        mediator.call(tenant, Request::new(session, Command::Sync));
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 1000 {
        let t = Instant::now();
        let r = mediator.call(tenant, Request::new(session, Command::Sync));
        samples.push(t.elapsed());
        if !r.is_ok() {
            return Err(format!("in-process SYNC: {}", r.status));
        }
    }
    let wall = start.elapsed();
    mediator.call(tenant, Request::new(session, Command::SessionClose));
    Ok(Latency { samples, wall })
}

/// A SYNC request laid out once in guest RAM and resubmitted as is.
struct NullChain {
    bufs: [Buf; 2],
    response: u64,
}

impl NullChain {
    fn new(vm: &mut Vm) -> BenchResult<NullChain> {
        let (h, _) = vm
            .request(&Request::new(0, Command::SessionOpen))
            .map_err(|e| format!("SESSION_OPEN: {e}"))?;
        if h.status != Status::Ok {
            return Err(format!("SESSION_OPEN: {}", h.status));
        }
        let bytes = Request::new(h.value0, Command::Sync).encode();
        let at = vm.alloc_buffer(256).map_err(|e| e.to_string())?;
        vm.ram().write(at, &bytes).map_err(|e| e.to_string())?;
        Ok(NullChain {
            bufs: [
                Buf::readable(at, bytes.len() as u32),
                Buf::writable(at + 128, RESPONSE_HEADER_SIZE as u32),
            ],
            response: at + 128,
        })
    }

    fn round_trip(&self, vm: &mut Vm) -> BenchResult<()> {
        let head = vm.submit_chain(&self.bufs, 0).map_err(|e| e.to_string())?;
        vm.wait_for(head).map_err(|e| e.to_string())?;
        check_status(vm, self.response, "SYNC")
    }
}

fn check_status(vm: &Vm, response: u64, what: &str) -> BenchResult<()> {
    let raw = vm
        .ram()
        .read_vec(response, RESPONSE_HEADER_SIZE)
        .map_err(|e| e.to_string())?;
    match ResponseHeader::decode(&raw) {
        Ok(h) if h.status == Status::Ok => Ok(()),
        Ok(h) => Err(format!("{what}: {}", h.status)),
        Err(e) => Err(format!("{what}: no response header ({e})")),
    }
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: an out-parameter of the right type.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn virtio_null(sockets: &[PathBuf], notify: Notify, budget: Duration) -> BenchResult<Latency> {
    let barrier = Arc::new(Barrier::new(sockets.len()));
    let threads: Vec<_> = sockets
        .iter()
        .cloned()
        .map(|socket| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> BenchResult<Latency> {
                let options = VmOptions {
                    notify,
                    ram_size: 4 << 20,
                    arena_size: 1 << 20,
                    ..VmOptions::default()
                };
                let mut vm = Vm::connect_with(&socket, options)
                    .map_err(|e| format!("{}: {e}", socket.display()))?;
                let chain = NullChain::new(&mut vm)?;
                for _ in 0..200 {
                    chain.round_trip(&mut vm)?;
                }
                barrier.wait();
                let mut samples = Vec::new();
                let start = Instant::now();
                while start.elapsed() < budget || samples.len() < 1000 {
                    let t = Instant::now();
                    chain.round_trip(&mut vm)?;
                    samples.push(t.elapsed());
                }
                Ok(Latency {
                    samples,
                    wall: start.elapsed(),
                })
            })
        })
        .collect();
    let mut all = Latency {
        samples: Vec::new(),
        wall: Duration::ZERO,
    };
    let mut rate = 0.0;
    for t in threads {
        let l = t.join().map_err(|_| "a VM thread panicked".to_string())??;
        rate += l.per_second();
        all.samples.extend(l.samples);
    }
    // Requests per second of all VMs together: the sum of each VM's rate.
    all.wall = Duration::from_secs_f64(all.samples.len() as f64 / rate.max(1e-9));
    Ok(all)
}

/// Requests per second with 64 SYNCs kept in flight.
fn virtio_pipelined(socket: &PathBuf, budget: Duration) -> BenchResult<f64> {
    let mut vm = Vm::connect(socket).map_err(|e| e.to_string())?;
    let (h, _) = vm
        .request(&Request::new(0, Command::SessionOpen))
        .map_err(|e| e.to_string())?;
    let sync = Request::new(h.value0, Command::Sync);
    let (mut done, start) = (0u64, Instant::now());
    while start.elapsed() < budget || done < 1000 {
        while vm.in_flight() < 64 {
            vm.submit(&sync).map_err(|e| e.to_string())?;
        }
        for c in vm.wait().map_err(|e| e.to_string())? {
            let (h, _) = c.response().map_err(|e| e.to_string())?;
            if h.status != Status::Ok {
                return Err(format!("pipelined SYNC: {}", h.status));
            }
            done += 1;
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Htod,
    Dtoh,
}

/// One VM with a device buffer and a guest DMA buffer of the largest size.
struct BandwidthVm {
    vm: Vm,
    session: u64,
    handle: u64,
    /// Guest buffer: request header at 0, response header at 128, data from 4096.
    at: u64,
    /// Whether the data area is a registered host buffer, in words.
    registration: String,
    registered: bool,
}

impl BandwidthVm {
    fn connect(socket: &PathBuf, max: u64, register: bool) -> BenchResult<BandwidthVm> {
        let options = VmOptions {
            ram_size: max + (16 << 20),
            arena_size: 4 << 20,
            ..VmOptions::default()
        };
        let mut vm = Vm::connect_with(socket, options).map_err(|e| e.to_string())?;
        let call = |vm: &mut Vm, r: Request| -> BenchResult<u64> {
            let what = format!("{:?}", r.header().op.opcode());
            let (h, _) = vm.request(&r).map_err(|e| e.to_string())?;
            match h.status {
                Status::Ok => Ok(h.value0),
                s => Err(format!("{what}: {s}")),
            }
        };
        let session = call(&mut vm, Request::new(0, Command::SessionOpen))?;
        let handle = call(&mut vm, Request::new(session, Command::Alloc { size: max }))?;
        let at = vm
            .ram()
            .alloc(max + 4096, 4096)
            .map_err(|e| e.to_string())?;
        // Touch the DMA buffer once, as a guest would have filled it.
        vm.ram()
            .fill(at + 4096, max, 0x5a)
            .map_err(|e| e.to_string())?;
        let (registration, registered) = if register {
            let chunks = vec![vgpu_protocol::HostChunk {
                addr: at + 4096,
                len: max.next_multiple_of(4096),
            }];
            let r = Request::new(session, Command::HostRegister { id: 1, chunks });
            let (h, _) = vm.request(&r).map_err(|e| e.to_string())?;
            match h.status {
                Status::Ok => ("registered".to_string(), true),
                s => (format!("not registered ({s}): the ordinary path"), false),
            }
        } else {
            (String::new(), false)
        };
        Ok(BandwidthVm {
            vm,
            session,
            handle,
            at,
            registration,
            registered,
        })
    }

    /// A figure of this VM, marked when its buffer could not be registered.
    fn show(&self, gbps: f64) -> String {
        if self.registered {
            format!("{gbps:.2}")
        } else {
            format!("{gbps:.2} (not registered)")
        }
    }

    /// GB/s of `reps` transfers of `size` bytes, one request each.
    fn run(&mut self, dir: Direction, size: u64, reps: u32) -> BenchResult<f64> {
        let (command, what) = match dir {
            Direction::Htod => (
                Command::Htod {
                    dst: self.handle,
                    offset: 0,
                    data: Vec::new(),
                },
                "HTOD",
            ),
            Direction::Dtoh => (
                Command::Dtoh {
                    src: self.handle,
                    offset: 0,
                    len: size,
                },
                "DTOH",
            ),
        };
        // The header alone: for HTOD its length field must say `size`.
        let mut header = Request::new(self.session, command).header();
        if let vgpu_protocol::Op::Htod { len, .. } = &mut header.op {
            *len = size;
        }
        let ram = self.vm.ram().clone();
        ram.write(self.at, &header.encode())
            .map_err(|e| e.to_string())?;
        let data = Buf {
            addr: self.at + 4096,
            len: size as u32,
            writable: dir == Direction::Dtoh,
        };
        let bufs = [
            Buf::readable(self.at, vgpu_protocol::REQUEST_HEADER_SIZE as u32),
            data,
            Buf::writable(self.at + 128, RESPONSE_HEADER_SIZE as u32),
        ];
        // Each HTOD is followed by nothing: completion means the guest buffer is free,
        // which is what a guest waits for. One SYNC at the end makes the device finish.
        let start = Instant::now();
        for _ in 0..reps {
            let head = self.vm.submit_chain(&bufs, 0).map_err(|e| e.to_string())?;
            self.vm.wait_for(head).map_err(|e| e.to_string())?;
            check_status(&self.vm, self.at + 128, what)?;
        }
        let (h, _) = self
            .vm
            .request(&Request::new(self.session, Command::Sync))
            .map_err(|e| e.to_string())?;
        if h.status != Status::Ok {
            return Err(format!("SYNC after {what}: {}", h.status));
        }
        Ok(size as f64 * f64::from(reps) / start.elapsed().as_secs_f64() / 1e9)
    }
}

/// The same transfers on the mediator directly.
struct Baseline<'a> {
    mediator: &'a Mediator,
    tenant: TenantId,
    session: u64,
    handle: u64,
    data: Vec<u8>,
}

impl<'a> Baseline<'a> {
    fn open(mediator: &'a Mediator, tenant: TenantId, max: u64) -> BenchResult<Baseline<'a>> {
        let call = |r: Request| {
            let resp = mediator.call(tenant, r);
            if resp.is_ok() {
                Ok(resp.value0)
            } else {
                Err(format!("in-process setup: {}", resp.status))
            }
        };
        let session = call(Request::new(0, Command::SessionOpen))?;
        let handle = call(Request::new(session, Command::Alloc { size: max }))?;
        Ok(Baseline {
            mediator,
            tenant,
            session,
            handle,
            data: vec![0x5a; max as usize],
        })
    }

    fn run(&self, dir: Direction, size: u64, reps: u32) -> BenchResult<f64> {
        let start = Instant::now();
        for _ in 0..reps {
            let command = match dir {
                Direction::Htod => Command::Htod {
                    dst: self.handle,
                    offset: 0,
                    data: self.data[..size as usize].to_vec(),
                },
                Direction::Dtoh => Command::Dtoh {
                    src: self.handle,
                    offset: 0,
                    len: size,
                },
            };
            let r = self
                .mediator
                .call(self.tenant, Request::new(self.session, command));
            if !r.is_ok() {
                return Err(format!("in-process transfer: {}", r.status));
            }
        }
        let r = self
            .mediator
            .call(self.tenant, Request::new(self.session, Command::Sync));
        if !r.is_ok() {
            return Err(format!("in-process SYNC: {}", r.status));
        }
        Ok(size as f64 * f64::from(reps) / start.elapsed().as_secs_f64() / 1e9)
    }
}
