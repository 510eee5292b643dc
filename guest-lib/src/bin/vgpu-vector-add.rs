// SPDX-License-Identifier: Apache-2.0
//! `vgpu-vector-add`: checks the device end to end with the built-in `vector_add_f32`.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use log::info;
use vgpu::{Device, Error, KernelArg, LaunchConfig};

/// Adds two fresh random vectors on the device with the built-in `vector_add_f32`,
/// compares every element with the CPU's sum, and prints PASSED or FAILED.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Use /dev/vgpuN.
    #[arg(long, value_name = "N", default_value_t = 0)]
    device: u32,
    /// Number of elements.
    #[arg(long, value_name = "N", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    elements: u32,
}

/// Bits written into the output first: a NaN, so an element the kernel skips fails.
const POISON: u32 = 0x7fba_dbad;

/// splitmix64: fresh inputs every run without a dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(t ^ (u64::from(std::process::id()) << 32))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1000, 1000).
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2000.0 - 1000.0
    }
}

/// Returns (device name, number of wrong elements).
fn run(args: &Args) -> Result<(String, usize), Error> {
    let session = Device::open(args.device)?.session()?;
    let name = session.info()?.config.name;
    let n = args.elements as usize;
    let mut rng = Rng::seeded();
    let a: Vec<f32> = (0..n).map(|_| rng.float()).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.float()).collect();

    let da = session.htod_copy(&a)?;
    let db = session.htod_copy(&b)?;
    let mut dc = session.alloc::<f32>(n)?;
    session.memset_u32(&mut dc, POISON)?;
    let cfg = LaunchConfig::for_num_elems(args.elements);
    info!(
        "launching vector_add_f32: grid {:?} block {:?}",
        cfg.grid, cfg.block
    );
    session.launch(
        &session.builtin(),
        "vector_add_f32",
        cfg,
        &[da.arg(), db.arg(), dc.arg(), KernelArg::U32(args.elements)],
    )?;
    session.sync()?;
    let c = session.dtoh(&dc)?;

    // One IEEE add per element: the device's result must match bit for bit.
    let errors = (0..n)
        .filter(|&i| c[i].to_bits() != (a[i] + b[i]).to_bits())
        .count();
    Ok((name, errors))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok((name, 0)) => {
            println!(
                "Vector add PASSED: {} elements, 0 errors ({name})",
                args.elements
            );
            ExitCode::SUCCESS
        }
        Ok((name, errors)) => {
            println!(
                "Vector add FAILED: {} elements, {errors} errors ({name})",
                args.elements
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vgpu-vector-add: error: {}", e.report());
            ExitCode::FAILURE
        }
    }
}
