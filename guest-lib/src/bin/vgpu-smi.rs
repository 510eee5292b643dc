// SPDX-License-Identifier: Apache-2.0
//! `vgpu-smi`: what each vGPU device is, and this VM's use of it.

use std::process::ExitCode;

use clap::Parser;
use vgpu::{Device, Error, InfoReply};

/// Shows each vGPU device: name, executor, memory quota and use, sessions, compute
/// capability and multiprocessors.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Show only /dev/vgpuN (default: every device present).
    #[arg(long, value_name = "N")]
    device: Option<u32>,
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

fn print(index: u32, info: &InfoReply) {
    let c = &info.config;
    println!("vgpu{index}: {}", c.name);
    println!("  executor            {}", c.executor.name());
    println!("  compute capability  {}.{}", c.cc_major, c.cc_minor);
    println!("  multiprocessors     {}", c.multiprocessors);
    println!("  device memory       {}", mib(c.device_memory));
    println!("  memory quota        {}", mib(c.mem_quota));
    println!(
        "  memory used         {} in {} allocations",
        mib(info.mem_used),
        info.allocations
    );
    println!(
        "  sessions            {} of {} (this one included)",
        info.sessions, c.max_sessions
    );
    println!("  modules             {}", info.modules);
    println!("  weight              {}", info.weight);
    println!("  protocol version    {}", c.version);
}

fn run(indices: &[u32]) -> Result<(), Error> {
    for (i, &index) in indices.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let info = Device::open(index)?.session()?.info()?;
        print(index, &info);
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let indices = match args.device {
        Some(n) => vec![n],
        None => Device::list(),
    };
    if indices.is_empty() {
        eprintln!(
            "vgpu-smi: error: no vGPU device: /dev/vgpu* not found (is the vgpu driver loaded?)"
        );
        return ExitCode::FAILURE;
    }
    match run(&indices) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-smi: error: {}", e.report());
            ExitCode::FAILURE
        }
    }
}
