//! `vgpu-mediator`: the Phase 1 CUDA sanity gate, device information, and the NFS
//! file-protocol server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vgpu_mediator::{select, selftest, ExecutorChoice};

#[derive(Parser)]
#[command(
    name = "vgpu-mediator",
    version,
    about = "Shares a GPU between virtual machines"
)]
struct Cli {
    /// Executor: cuda, cpu, or auto (CUDA when usable, else CPU).
    #[arg(long, global = true, default_value = "auto")]
    executor: ExecutorChoice,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Phase 1 CUDA sanity gate: a device is present and device memory can be allocated
    /// and freed. Exits 0 only on PASS.
    Sanity,
    /// Prints what the selected executor runs on.
    Info,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Sanity => sanity(),
        Cmd::Info => info(cli.executor),
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

fn info(choice: ExecutorChoice) -> ExitCode {
    match select(choice) {
        Ok(factory) => {
            let d = factory.device();
            println!("executor: {}", d.kind.name());
            println!("device: {}", selftest::device_line(d));
            println!("multiprocessors: {}", d.multiprocessors);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vgpu-mediator: {e}");
            ExitCode::FAILURE
        }
    }
}
