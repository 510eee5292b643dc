// SPDX-License-Identifier: Apache-2.0
//! Writes the seed inputs of `queue_image` (valid queues of real requests) into a
//! directory: `cargo run --bin write-seeds -- corpus/queue_image`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: write-seeds DIR");
        return ExitCode::FAILURE;
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("write-seeds: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (i, seed) in vhost_vgpu::testvmm::fuzz::seeds().iter().enumerate() {
        let path = dir.join(format!("seed-{i:02}"));
        if let Err(e) = std::fs::write(&path, seed) {
            eprintln!("write-seeds: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
