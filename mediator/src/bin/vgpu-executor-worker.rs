// SPDX-License-Identifier: Apache-2.0
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
    /// Switch to this user id (with --gid) before anything else; needs root.
    #[arg(long, value_name = "UID", requires = "gid")]
    uid: Option<u32>,
    /// Switch to this group id (with --uid), with no supplementary groups.
    #[arg(long, value_name = "GID", requires = "uid")]
    gid: Option<u32>,
    /// Cap on private writable memory (RLIMIT_DATA), in bytes.
    #[arg(long, value_name = "BYTES")]
    max_data_bytes: Option<u64>,
    /// Cap on the worker user's processes and threads (RLIMIT_NPROC).
    #[arg(long, value_name = "N", default_value_t = vgpu_mediator::sandbox::DEFAULT_MAX_TASKS)]
    max_tasks: u64,
    /// CPU seconds one PTX module load (JIT compilation) may take; past it the worker ends.
    #[arg(long, value_name = "S", default_value_t = vgpu_mediator::sandbox::DEFAULT_JIT_CPU_SECONDS)]
    jit_cpu_seconds: u64,
    /// Do not install the seccomp allow-list (for diagnosis only).
    #[arg(long)]
    no_seccomp: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    // Before anything else, and before a byte from the guest: see vgpu_mediator::sandbox.
    if let Err(e) =
        vgpu_mediator::sandbox::confine(args.uid, args.gid, args.max_data_bytes, args.max_tasks)
    {
        eprintln!(
            "vgpu-executor-worker {}: confining: {e}",
            std::process::id()
        );
        return ExitCode::FAILURE;
    }
    let confinement = vgpu_mediator::process::WorkerConfinement {
        seccomp: !args.no_seccomp,
        jit_cpu_seconds: args.jit_cpu_seconds,
    };
    match vgpu_mediator::process::serve(
        args.socket_fd,
        args.staging_fd,
        args.staging_bytes,
        &confinement,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-executor-worker {}: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}
