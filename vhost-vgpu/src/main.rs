// SPDX-License-Identifier: Apache-2.0
//! `vhost-vgpu`: parses the command line and runs the backend until SIGINT or SIGTERM.

use std::error::Error as _;
use std::process::ExitCode;

use clap::Parser;
use vhost_vgpu::{start_backend, Args, VgpuConfig};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match VgpuConfig::try_from(Args::parse()).and_then(start_backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the failed step, then each cause.
            let mut line = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                line.push_str(": ");
                line.push_str(&cause.to_string());
                source = cause.source();
            }
            eprintln!("vhost-vgpu: error: {line}");
            ExitCode::FAILURE
        }
    }
}
