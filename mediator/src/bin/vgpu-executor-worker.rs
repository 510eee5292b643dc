//! `vgpu-executor-worker`: serves one tenant's executor to the mediator that started it.
//! Not meant to be run by hand: the mediator passes it an inherited socket and a shared
//! staging area (see `vgpu_mediator::process`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vgpu-executor-worker",
    version,
    about = "Runs one tenant's GPU executor for the vGPU mediator (started by the mediator, not by hand)",
    long_about = "Runs one tenant's GPU executor (CUDA, or the CPU reference executor) in its own \
                  process, so a kernel that faults takes down only this tenant's context. The \
                  mediator starts it with an inherited unix socket and a shared-memory staging \
                  area for copies, tells it which executor to open, and stops it when the \
                  tenant's executor is dropped. Not meant to be run by hand. The mediator finds \
                  this binary through $VGPU_EXECUTOR_WORKER, else beside its own executable, \
                  else on $PATH."
)]
struct Args {
    /// The inherited unix stream socket connected to the mediator.
    #[arg(long, value_name = "FD")]
    socket_fd: i32,
    /// The inherited memfd holding the staging area.
    #[arg(long, value_name = "FD")]
    staging_fd: i32,
    /// Size of the staging area in bytes.
    #[arg(long, value_name = "BYTES")]
    staging_bytes: usize,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match vgpu_mediator::process::serve(args.socket_fd, args.staging_fd, args.staging_bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-executor-worker {}: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}
