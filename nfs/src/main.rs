// SPDX-License-Identifier: Apache-2.0
//! `vgpu-mediator`: the Phase 1 CUDA sanity gate, device information, and the NFS
//! file-protocol server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vgpu_mediator::control::{self, ControlServer};
use vgpu_mediator::signals::DaemonSignals;
use vgpu_mediator::{
    select_gpus, selftest, ExecutorChoice, ExecutorFactory, ExecutorOptions, Mediator,
};
use vgpu_nfs::{NfsOptions, NfsServer};

#[derive(Parser)]
#[command(
    name = "vgpu-mediator",
    version,
    about = "Shares a GPU between virtual machines"
)]
struct Cli {
    /// Executor: cuda, cpu, cpu:N (the CPU executor as N simulated GPUs), auto (CUDA when
    /// usable, else CPU), or remote:HOST:PORT[,HOST:PORT...] (executors on worker hosts
    /// running vgpu-worker, tried in order; vsock:CID:PORT for a worker in a local VM;
    /// several GPUs: each GPU's workers separated by +, e.g.
    /// remote:gpuvm:7701+gpuvm:7702).
    #[arg(
        long,
        global = true,
        default_value = "auto",
        value_name = "auto|cuda|cpu|cpu:N|remote:HOST:PORT"
    )]
    executor: ExecutorChoice,
    /// GPUs to drive, by index: CUDA's device order after CUDA_VISIBLE_DEVICES, e.g. 0,2.
    /// Each VM is placed on one (serve --gpu NAME=N, or automatically: the GPU with the
    /// most memory not yet promised to quotas, then the fewest VMs). Default: every GPU.
    #[arg(long, global = true, value_name = "LIST", value_delimiter = ',')]
    gpus: Option<Vec<u32>>,
    /// Key file for --executor remote: one line NAME KEY (this mediator's name and the key
    /// the worker holds for it; vgpu-worker keygen makes one). Must not be readable by
    /// group or others. Default: /etc/vgpu/remote.key.
    #[arg(long, global = true, value_name = "FILE")]
    remote_key: Option<PathBuf>,
    /// How long to keep trying to reach a remote worker at start, in seconds. Default: 30.
    #[arg(long, global = true, value_name = "SECONDS")]
    remote_wait: Option<u64>,
    /// User the executor worker processes run as (needs root). Default when running as
    /// root: vgpu-worker if it exists, else nobody.
    #[arg(long, global = true, value_name = "USER")]
    worker_user: Option<String>,
    /// Cap on each CUDA executor worker's private host memory (RLIMIT_DATA).
    #[arg(long, global = true, value_name = "SIZE", value_parser = vgpu_mediator::parse_size)]
    worker_max_memory: Option<u64>,
    /// Kernel timeout, in seconds: the longest a session's call may wait for its executor
    /// worker (a kernel, or the work a SYNC waits for) before the watchdog ends that
    /// worker. The session then gets DEVICE_LOST with detail 702 (CUDA's launch timeout);
    /// the VM's other sessions and the other VMs keep running. Default 600; at least 1.
    /// Applies to executors in worker processes (CUDA) and on worker hosts (remote), not
    /// to the in-process CPU one.
    #[arg(
        long,
        global = true,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    kernel_timeout: Option<u64>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Phase 1 CUDA sanity gate: a device is present and device memory can be allocated
    /// and freed. Exits 0 only on PASS. With --executor remote:..., the gate runs on each
    /// worker host named, which must all pass.
    Sanity,
    /// Prints what the selected executor runs on.
    Info,
    /// Serves the Phase 1 file protocol (command.txt / response.txt) in a directory
    /// exported to the VMs over NFS, until SIGINT or SIGTERM.
    #[command(long_about = SERVE_ABOUT)]
    Serve(ServeArgs),
}

const SERVE_ABOUT: &str = "Serves the Phase 1 file protocol in a directory exported to the VMs \
over NFS, until SIGINT or SIGTERM.

Each directory served is one VM (one tenant): ROOT/<vm>/ for each VM named with --vm \
(the normal way), or, with no --vm, the single pair ROOT/command.txt and \
ROOT/response.txt. Directories that appear are not served unless --discover is given. A \
VM writes 1 (vector-add validation), 2 (device information) or 0 (reset) to \
command.txt; the mediator answers in response.txt with one line: 0:Ready, 1:<message> \
or 2:<error>. To issue the same command again, write 0 and wait for 0:Ready first \
(vgpu-nfs-client does this). Only a regular file with one link is read as command.txt.";

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory exported to the VMs; must exist and be writable.
    #[arg(long, value_name = "DIR", default_value = vgpu_nfs::DEFAULT_ROOT)]
    nfs_root: PathBuf,
    /// Serve the VM directory DIR/NAME, created if missing (repeatable: one per VM; the
    /// normal way). Without --vm: the pair at the root, for a single VM.
    #[arg(long = "vm", value_name = "NAME")]
    vms: Vec<String>,
    /// Also serve every vm* directory that appears in DIR (and drop it when it goes), up
    /// to --max-vms of them. Off by default: with it, whoever can create a directory in
    /// DIR creates a tenant.
    #[arg(long)]
    discover: bool,
    /// With --discover, the most discovered directories served at once; further ones are
    /// ignored, with one warning each.
    #[arg(
        long,
        value_name = "N",
        default_value_t = vgpu_nfs::DEFAULT_MAX_VMS,
        requires = "discover"
    )]
    max_vms: usize,
    /// Milliseconds between scans of the command files (local changes wake it at once).
    #[arg(long, value_name = "N", default_value_t = 100)]
    poll_ms: u64,
    /// Device memory each VM's work may hold (its execution contexts included), e.g. 1G
    /// or 8G.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = vgpu_mediator::parse_size)]
    mem_quota: u64,
    /// Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics: per VM, requests by
    /// operation and status, their latency, bytes copied, device memory and quota,
    /// device time, restarts; and the daemon's CPU time and memory. Off by default. No
    /// authentication: bind to a loopback or management address (e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR:PORT", value_parser = vgpu_mediator::metrics::parse_addr)]
    metrics: Option<SocketAddr>,

    /// Also listen on a control socket at PATH for vgpu-admin (the VMs, their memory and
    /// device time; quota and weight changed at run time): owner-only (mode 0600), removed
    /// at stop. Off by default.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Place the VM directory NAME on GPU N (repeatable; NAME as given to --vm, or `-` for
    /// the pair at the root). VMs not named are placed automatically.
    #[arg(long = "gpu", value_name = "NAME=N", value_parser = parse_vm_gpu)]
    gpu: Vec<(String, u32)>,
}

/// `NAME=N` of `serve --gpu`.
fn parse_vm_gpu(s: &str) -> Result<(String, u32), String> {
    let (name, gpu) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=N, e.g. vm1=1"))?;
    let gpu = gpu
        .parse()
        .map_err(|_| format!("'{s}': '{gpu}' is not a GPU index"))?;
    let name = if name == "-" {
        vgpu_nfs::ROOT_ENDPOINT
    } else {
        name
    };
    Ok((name.to_string(), gpu))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let options = ExecutorOptions {
        worker_user: cli.worker_user,
        worker_max_memory: cli.worker_max_memory,
        kernel_timeout: cli.kernel_timeout.map(Duration::from_secs),
        remote_key: cli.remote_key,
        remote_wait: cli.remote_wait.map(Duration::from_secs),
        gpus: cli.gpus,
        ..ExecutorOptions::default()
    };
    if let Err(e) = options.validate() {
        eprintln!("vgpu-mediator: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Cmd::Sanity => match &cli.executor {
            ExecutorChoice::Remote(spec) => remote_sanity(spec, &options),
            _ => sanity(),
        },
        Cmd::Info => {
            let rc = info(cli.executor.clone(), &options);
            if let (ExecutorChoice::Remote(spec), true) = (&cli.executor, rc == ExitCode::SUCCESS) {
                workers(spec, &options);
            }
            rc
        }
        Cmd::Serve(args) => serve(cli.executor, &options, args),
    }
}

fn sanity() -> ExitCode {
    match vgpu_mediator::cuda::sanity() {
        Ok(line) => {
            println!("PASS: {line}");
            println!("SANITY PASS");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            println!("FAIL: {reason}");
            println!("SANITY FAIL");
            ExitCode::FAILURE
        }
    }
}

/// The sanity gate on every worker host of `spec`.
fn remote_sanity(spec: &vgpu_mediator::remote::RemoteSpec, options: &ExecutorOptions) -> ExitCode {
    let creds = match options.remote_credentials() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL: {e}");
            println!("SANITY FAIL");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for e in &spec.endpoints {
        match vgpu_mediator::remote::client::sanity(e, &creds) {
            Ok(line) => println!("PASS: worker {e}: {line}"),
            Err(reason) => {
                ok = false;
                println!("FAIL: {reason}");
            }
        }
    }
    if ok {
        println!("SANITY PASS");
        ExitCode::SUCCESS
    } else {
        println!("SANITY FAIL");
        ExitCode::FAILURE
    }
}

/// What each worker host of `spec` says about itself.
fn workers(spec: &vgpu_mediator::remote::RemoteSpec, options: &ExecutorOptions) {
    let Ok(creds) = options.remote_credentials() else {
        return;
    };
    for e in &spec.endpoints {
        match vgpu_mediator::remote::client::hello(e, &creds) {
            Ok(h) => println!(
                "worker {e}: release {}, {} ({} MiB, {} MiB free), {} GPU(s), {} of {} \
                 sessions; {}",
                h.release,
                h.name,
                h.total_memory >> 20,
                h.free_memory >> 20,
                h.gpus,
                h.sessions,
                h.max_sessions,
                h.sanity
            ),
            Err(why) => println!("{why}"),
        }
    }
}

fn info(choice: ExecutorChoice, options: &ExecutorOptions) -> ExitCode {
    match select_gpus(choice, options) {
        Ok(gpus) => {
            let factory = &gpus[0].1;
            let d = factory.device();
            println!("executor: {}", d.kind.name());
            println!("device: {}", selftest::device_line(d));
            println!("multiprocessors: {}", d.multiprocessors);
            println!("isolation: {}", isolation(factory.as_ref()));
            println!("gpus: {}", gpus.len());
            for (index, f) in &gpus {
                println!("gpu {index}: {}", selftest::device_line(f.device()));
            }
            // A VM's executor must start on every GPU, not only the devices be there.
            for (index, f) in &gpus {
                if let Err(e) = f.check() {
                    eprintln!("vgpu-mediator: GPU {index}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vgpu-mediator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(choice: ExecutorChoice, options: &ExecutorOptions, args: ServeArgs) -> ExitCode {
    // Caught and blocked before any thread starts, so every thread inherits the mask and
    // only this one receives them, once it waits below (see vgpu_mediator::signals).
    let mut signals = match DaemonSignals::catch(&[libc::SIGINT, libc::SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!(
                "vgpu-mediator: setting up SIGINT/SIGTERM handling: {}",
                error_chain(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    vgpu_mediator::sandbox::protect_daemon();
    if let Err(e) = vgpu_nfs::check_root(&args.nfs_root) {
        eprintln!("vgpu-mediator: {}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    let gpus = match select_gpus(choice, options) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vgpu-mediator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let factory = gpus[0].1.clone();
    for (index, f) in gpus.iter().skip(1) {
        log::info!("GPU {index}: {}", selftest::device_line(f.device()));
    }
    let mediator = Mediator::with_gpus(
        gpus,
        vgpu_mediator::Limits::default(),
        vgpu_mediator::SchedConfig::with_kernel_timeout(options.kernel_timeout),
    );
    log::info!(
        "executor: {}; {}",
        selftest::device_line(mediator.device()),
        isolation(factory.as_ref())
    );
    // Before the VMs are served: an address that cannot be had stops the start.
    let metrics = match args.metrics {
        Some(addr) => match vgpu_mediator::metrics::serve(addr, &mediator) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("vgpu-mediator: --metrics {addr}: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let opts = NfsOptions {
        vms: args.vms,
        discover: args.discover,
        max_vms: args.max_vms,
        poll_interval: Duration::from_millis(args.poll_ms),
        settle: Duration::from_millis(args.poll_ms),
        mem_quota: args.mem_quota,
        placements: args
            .gpu
            .into_iter()
            .map(|(name, gpu)| (name, vgpu_mediator::Placement::Gpu(gpu)))
            .collect(),
        ..NfsOptions::new(args.nfs_root)
    };
    let server = match NfsServer::start(mediator.clone(), opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vgpu-mediator: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let control = match args.control.as_deref().map(|path| {
        ControlServer::start(
            path,
            mediator,
            Arc::new(|_, name: &str| control::default_attachment(name)),
        )
    }) {
        Some(Err(e)) => {
            eprintln!("vgpu-mediator: {}", error_chain(&e));
            server.stop();
            return ExitCode::FAILURE;
        }
        Some(Ok(c)) => Some(c),
        None => None,
    };
    // The iterator ends only when closed, which nothing does.
    let received = signals.receive().map(|mut received| received.next());
    match &received {
        Ok(signal) => log::info!("signal {}: stopping", signal.unwrap_or_default()),
        Err(e) => log::error!("receiving signals: {}; stopping", error_chain(e)),
    }
    if let Some(c) = control {
        c.stop();
    }
    server.stop();
    drop(metrics);
    if received.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How tenants' executors are kept apart, for `info` and the log.
fn isolation(factory: &dyn ExecutorFactory) -> String {
    if let Some(placement) = factory.placement() {
        return placement;
    }
    match factory.worker_process() {
        Some(worker) => format!(
            "each session (guest process) in its own worker process ({})",
            worker.display()
        ),
        None => "tenants share this process".into(),
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(list: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vgpu-mediator").chain(list.iter().copied()))
    }

    #[test]
    fn the_kernel_timeout_is_whole_seconds_of_at_least_one() {
        assert_eq!(cli(&["serve"]).unwrap().kernel_timeout, None);
        let c = cli(&["serve", "--kernel-timeout", "45"]).unwrap();
        assert_eq!(c.kernel_timeout, Some(45));
        assert!(matches!(c.command, Cmd::Serve(ref s) if s.control.is_none()));
        assert_eq!(
            cli(&["--kernel-timeout", "2", "info"])
                .unwrap()
                .kernel_timeout,
            Some(2)
        );
        let c = cli(&["serve", "--control", "/run/vgpu-mediator/control"]).unwrap();
        assert!(matches!(c.command, Cmd::Serve(ref s)
            if s.control.as_deref() == Some(std::path::Path::new("/run/vgpu-mediator/control"))));
        for bad in ["0", "-1", "2.5", "soon"] {
            assert!(
                cli(&["serve", "--kernel-timeout", bad]).is_err(),
                "--kernel-timeout {bad} accepted"
            );
        }
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        let serve_args = |list: &[&str]| match cli(list).unwrap().command {
            Cmd::Serve(args) => args,
            _ => panic!("not serve"),
        };
        assert_eq!(serve_args(&["serve"]).metrics, None);
        assert_eq!(
            serve_args(&["serve", "--metrics", "127.0.0.1:9477"]).metrics,
            Some("127.0.0.1:9477".parse().unwrap())
        );
        assert_eq!(
            serve_args(&["serve", "--metrics", "[::1]:9477"]).metrics,
            Some("[::1]:9477".parse().unwrap())
        );
        for bad in ["9477", "127.0.0.1", "127.0.0.1:http-alt-99999"] {
            assert!(
                cli(&["serve", "--metrics", bad]).is_err(),
                "--metrics {bad} accepted"
            );
        }
    }

    #[test]
    fn serve_places_a_vm_with_name_equals_gpu() {
        assert_eq!(parse_vm_gpu("vm2=1"), Ok(("vm2".into(), 1)));
        assert_eq!(parse_vm_gpu("-=0"), Ok((vgpu_nfs::ROOT_ENDPOINT.into(), 0)));
        assert!(parse_vm_gpu("vm2").is_err());
        assert!(parse_vm_gpu("vm2=one").is_err());
        let cli = Cli::try_parse_from([
            "vgpu-mediator",
            "--gpus",
            "0,1",
            "serve",
            "--vm",
            "vm1",
            "--gpu",
            "vm1=1",
        ])
        .unwrap();
        assert_eq!(cli.gpus, Some(vec![0, 1]));
        let Cmd::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(args.gpu, [("vm1".to_string(), 1)]);
    }
}
