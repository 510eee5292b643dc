// SPDX-License-Identifier: Apache-2.0
//! `vhost-vgpu`: parses the command line and runs the backend until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use vhost_vgpu::{error_chain, start_backend, Args, VgpuConfig};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match VgpuConfig::try_from(Args::parse()).and_then(start_backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-vgpu: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
