// SPDX-License-Identifier: Apache-2.0
//! `vgpu-worker`: the GPU worker host. Runs where the GPU is (a machine, or a VM with the
//! GPU passed through), passes the CUDA sanity gate at start, and serves executors to the
//! mediators named in its key file over TCP or vsock (see `vgpu_mediator::remote`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vgpu_mediator::process::ProcessExecutorFactory;
use vgpu_mediator::remote::link::{self, Endpoint, Key, KeyFile, Listener};
use vgpu_mediator::remote::{nvml, Server, ServerConfig};
use vgpu_mediator::signals::DaemonSignals;
use vgpu_mediator::{select_with, ExecutorChoice, ExecutorFactory, ExecutorOptions};
use vgpu_protocol::ExecutorKind;

const ABOUT: &str = "Serves GPU executors to vGPU mediators over the network.

Runs on the machine (or in the VM) that has the GPU. At start it runs the CUDA sanity \
gate; with --executor auto a failed gate means the CPU reference executor, with \
--executor cuda it means exit. Then it listens for mediators (vgpu-mediator or vhost-vgpu \
with --executor remote:HOST:PORT). Each mediator authenticates with a pre-shared key \
(Noise NNpsk0: X25519, AES-256-GCM, SHA-256): only the mediators named in the key file \
are served, and all traffic is encrypted. Every session a mediator opens gets its own \
executor here — for CUDA its own context in its own sandboxed worker process, as on a \
local mediator — and everything a session held is freed when its connection ends. The \
GPU is CUDA device 0 (choose another with CUDA_VISIBLE_DEVICES).

Make a key with `vgpu-worker keygen NAME`; put the line it prints into this worker's key \
file (one line per mediator) and into the mediator's --remote-key file.";

#[derive(Parser)]
#[command(name = "vgpu-worker", version, about = "Serves GPU executors to vGPU mediators over the network", long_about = ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Where to listen: HOST:PORT (TCP; 0.0.0.0 for every address) or vsock:any:PORT
    /// (mediators on the VM host reach a worker in a VM at vsock:CID:PORT). May be
    /// given several times.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7701")]
    listen: Vec<Endpoint>,
    /// The mediators served: lines NAME KEY (from vgpu-worker keygen). Must not be
    /// readable by group or others.
    #[arg(long, value_name = "FILE", default_value = link::DEFAULT_WORKER_KEYS)]
    keys: PathBuf,
    /// Executor: cuda, cpu, or auto (CUDA when the sanity gate passes, else CPU).
    #[arg(long, value_name = "auto|cuda|cpu", default_value = "auto")]
    executor: ExecutorChoice,
    /// Sessions served at once (one per connection); more are refused with a message.
    #[arg(long, value_name = "N", default_value_t = vgpu_mediator::remote::server::DEFAULT_MAX_SESSIONS)]
    max_sessions: u32,
    /// User the executor worker processes run as (needs root). Default when running as
    /// root: vgpu-worker if it exists, else nobody.
    #[arg(long, value_name = "USER")]
    worker_user: Option<String>,
    /// Cap on each executor worker's private host memory (RLIMIT_DATA; default 16G).
    #[arg(long, value_name = "SIZE", value_parser = vgpu_mediator::parse_size)]
    worker_max_memory: Option<u64>,
    /// Kernel timeout, in seconds: the longest one call of a session may wait for its
    /// executor before the executor is ended (the mediator has its own, too).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    kernel_timeout: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prints a new key line `NAME KEY` for a mediator called NAME.
    Keygen {
        /// The mediator's name: 1 to 64 of A-Z a-z 0-9 . _ -
        name: String,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(Cmd::Keygen { name }) = &cli.command {
        if !link::valid_name(name) {
            eprintln!("vgpu-worker: keygen: the name must be 1 to 64 of A-Z a-z 0-9 . _ -");
            return ExitCode::FAILURE;
        }
        return match Key::generate() {
            Ok(k) => {
                println!("{name} {}", k.to_hex());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vgpu-worker: keygen: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let mut signals = DaemonSignals::catch(&[libc::SIGINT, libc::SIGTERM])
        .map_err(|e| format!("setting up SIGINT/SIGTERM handling: {e}"))?;
    vgpu_mediator::sandbox::protect_daemon();
    let keys = KeyFile::load(&cli.keys).map_err(|e| e.to_string())?;
    let options = ExecutorOptions {
        worker_user: cli.worker_user.clone(),
        worker_max_memory: cli.worker_max_memory,
        kernel_timeout: cli.kernel_timeout.map(Duration::from_secs),
        ..ExecutorOptions::default()
    };
    options.validate().map_err(|e| e.to_string())?;

    // The Phase 1 gate decides what this worker offers.
    let (choice, sanity) = match cli.executor {
        ExecutorChoice::Cpu => (
            ExecutorChoice::Cpu,
            "CPU reference executor (--executor cpu): no CUDA sanity gate".to_string(),
        ),
        ExecutorChoice::Remote(_) => {
            return Err("--executor remote is for mediators, not for a worker".into())
        }
        choice => match vgpu_mediator::cuda::sanity() {
            Ok(line) => {
                log::info!("CUDA sanity gate PASS: {line}");
                (
                    ExecutorChoice::Cuda,
                    format!("CUDA sanity gate PASS: {line}"),
                )
            }
            Err(e) if choice == ExecutorChoice::Cuda => {
                return Err(format!("the CUDA sanity gate failed: {e}"))
            }
            Err(e) => {
                log::warn!(
                    "the CUDA sanity gate failed ({e}): serving the CPU reference executor, \
                     NOT a GPU; pass --executor cuda to refuse to start without one"
                );
                (
                    ExecutorChoice::Cpu,
                    format!("CPU reference executor: the CUDA sanity gate failed ({e})"),
                )
            }
        },
    };
    let factory: Arc<dyn ExecutorFactory> = match choice {
        // The CPU executor too runs each session in its own worker process here: the
        // mediator is trusted only with its own sessions.
        ExecutorChoice::Cpu => {
            let mut f = ProcessExecutorFactory::cpu().map_err(|e| e.to_string())?;
            let mut sandbox = f.sandbox().clone();
            if let Some(name) = &options.worker_user {
                sandbox.user = Some(
                    vgpu_mediator::sandbox::WorkerUser::lookup(name)
                        .map_err(|e| format!("--worker-user: {e}"))?,
                );
            }
            sandbox.max_data_bytes = Some(
                options
                    .worker_max_memory
                    .unwrap_or(vgpu_mediator::executor::DEFAULT_WORKER_MAX_MEMORY),
            );
            f = f.with_sandbox(sandbox).with_kernel_timeout(
                options
                    .kernel_timeout
                    .unwrap_or(vgpu_mediator::process::DEFAULT_KERNEL_TIMEOUT),
            );
            f.check().map_err(|e| e.to_string())?;
            Arc::new(f)
        }
        _ => select_with(choice, &options).map_err(|e| e.to_string())?,
    };
    let cuda = factory.device().kind == ExecutorKind::Cuda;
    let gpus = if cuda {
        nvml::gpu_count().unwrap_or(1)
    } else {
        0
    };
    let config = ServerConfig {
        keys: keys.by_name(),
        max_sessions: cli.max_sessions,
        gpus,
        sanity: sanity.clone(),
        sanity_check: Box::new(move || {
            if cuda {
                vgpu_mediator::cuda::sanity().map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "this worker runs the CPU reference executor, not a GPU ({sanity})"
                ))
            }
        }),
        free_memory: Box::new(move || if cuda { nvml::free_memory(0) } else { None }),
    };
    let server = Server::new(factory.clone(), config);
    let mut listening = Vec::new();
    for e in &cli.listen {
        let l = Listener::bind(e).map_err(|err| format!("--listen {e}: {err}"))?;
        let at = l
            .local()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| e.to_string());
        listening.push(at);
        let s = server.clone();
        std::thread::Builder::new()
            .name("vgpu-worker-accept".into())
            .spawn(move || {
                if let Err(err) = s.serve(l) {
                    log::error!("listener stopped: {err}");
                }
            })
            .map_err(|e| format!("no thread: {e}"))?;
    }
    let d = factory.device();
    log::info!(
        "serving {} ({} MiB, {} executor) to {} mediator(s) [{}] on {}",
        d.name,
        d.total_memory >> 20,
        d.kind.name(),
        keys.names().len(),
        keys.names().join(", "),
        listening.join(", ")
    );
    let received = signals.receive().map(|mut r| r.next());
    match received {
        Ok(signal) => {
            log::info!("signal {}: stopping", signal.unwrap_or_default());
            Ok(())
        }
        Err(e) => Err(format!("receiving signals: {e}")),
    }
}
