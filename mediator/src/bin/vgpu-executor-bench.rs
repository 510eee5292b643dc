// SPDX-License-Identifier: Apache-2.0
//! `vgpu-executor-bench`: what a request costs through the mediator and one executor, no
//! transport: for comparing executors (a local CUDA worker process against a worker host
//! reached with `--executor remote:HOST:PORT`).
//!
//! Figures: the round trip of a SYNC on an idle session and of a one-block launch with its
//! SYNC (p50, p99), launches per second when pipelined, HTOD and DTOH bandwidth at each
//! `--sizes` (the request carries the data, as a transport's would), and a checked vector
//! add. Prints a markdown table and one `figure NAME VALUE UNIT` line per figure.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use vgpu_mediator::check::{blocks, f32_bytes, launch_command, us, Guest, Rng};
use vgpu_mediator::{select_with, ExecutorChoice, ExecutorOptions, Mediator, TenantConfig};
use vgpu_protocol::{Param, BUILTIN_MODULE};

#[derive(Parser)]
#[command(
    name = "vgpu-executor-bench",
    version,
    about = "Measures request latency and copy bandwidth through the mediator and one executor"
)]
struct Cli {
    /// Executor: cuda, cpu, auto, or remote:HOST:PORT.
    #[arg(
        long,
        value_name = "auto|cuda|cpu|remote:HOST:PORT",
        default_value = "auto"
    )]
    executor: ExecutorChoice,
    /// Key file for --executor remote (one line NAME KEY).
    #[arg(long, value_name = "FILE")]
    remote_key: Option<std::path::PathBuf>,
    /// Copy sizes of the bandwidth rows.
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',', default_value = "16M,256M",
          value_parser = vgpu_mediator::parse_size)]
    sizes: Vec<u64>,
    /// Seconds each latency row measures for.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// A label for the figures (default: the executor's kind).
    #[arg(long)]
    label: Option<String>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-executor-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    name: String,
    value: String,
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn run(cli: &Cli) -> Result<(), String> {
    let options = ExecutorOptions {
        remote_key: cli.remote_key.clone(),
        ..ExecutorOptions::default()
    };
    let factory = select_with(cli.executor.clone(), &options).map_err(|e| e.to_string())?;
    let label = cli.label.clone().unwrap_or_else(|| match &cli.executor {
        ExecutorChoice::Remote(_) => "remote".into(),
        _ => factory.device().kind.name().into(),
    });
    let max = cli.sizes.iter().copied().max().unwrap_or(0).max(4 << 20);
    let m = Mediator::new(factory);
    let tenant = m
        .add_tenant(TenantConfig {
            name: "bench".into(),
            mem_quota: 3 * max + (8 << 30),
            weight: 100,
        })
        .map_err(|e| e.to_string())?;
    let g = Guest::open(&m, tenant)?;
    let budget = Duration::from_secs_f64(cli.seconds);
    let mut rows = Vec::new();

    // SYNC on an idle session.
    for _ in 0..200 {
        g.sync()?;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 200 {
        let t = Instant::now();
        g.sync()?;
        samples.push(t.elapsed());
    }
    rows.push(Row {
        name: "sync_p50_us".into(),
        value: format!("{:.1}", us(percentile(&mut samples, 0.5))),
    });
    rows.push(Row {
        name: "sync_p99_us".into(),
        value: format!("{:.1}", us(percentile(&mut samples, 0.99))),
    });

    // One-block launch + SYNC.
    let out = g.alloc(4096)?;
    let launch = launch_command(
        BUILTIN_MODULE,
        "fill_u32",
        [1, 1, 1],
        [32, 1, 1],
        vec![Param::Buffer(out), Param::u32(7), Param::u32(1)],
    );
    for _ in 0..100 {
        g.launch_prepared(&launch)?;
        g.sync()?;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 200 {
        let t = Instant::now();
        g.launch_prepared(&launch)?;
        g.sync()?;
        samples.push(t.elapsed());
    }
    rows.push(Row {
        name: "launch_sync_p50_us".into(),
        value: format!("{:.1}", us(percentile(&mut samples, 0.5))),
    });
    rows.push(Row {
        name: "launch_sync_p99_us".into(),
        value: format!("{:.1}", us(percentile(&mut samples, 0.99))),
    });

    // Pipelined launches.
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        g.launch_prepared(&launch)?;
    }
    g.sync()?;
    rows.push(Row {
        name: "launches_per_s".into(),
        value: format!("{:.0}", n as f64 / t.elapsed().as_secs_f64()),
    });

    // Bandwidth.
    let buf = g.alloc(max)?;
    let data = vec![0x5au8; max as usize];
    for &size in &cli.sizes {
        let reps = ((1u64 << 30) / size.max(1)).clamp(3, 64) as u32;
        let t = Instant::now();
        for _ in 0..reps {
            g.htod(buf, 0, data[..size as usize].to_vec())?;
        }
        g.sync()?;
        let htod = size as f64 * f64::from(reps) / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        for _ in 0..reps {
            g.dtoh(buf, 0, size)?;
        }
        let dtoh = size as f64 * f64::from(reps) / t.elapsed().as_secs_f64() / 1e9;
        let mib = size >> 20;
        rows.push(Row {
            name: format!("htod_{mib}mib_gbps"),
            value: format!("{htod:.2}"),
        });
        rows.push(Row {
            name: format!("dtoh_{mib}mib_gbps"),
            value: format!("{dtoh:.2}"),
        });
    }

    // A checked vector add.
    let n = 1usize << 22;
    let mut rng = Rng(0x5eed);
    let a = rng.f32s(n, -100.0, 100.0);
    let b = rng.f32s(n, -100.0, 100.0);
    let bytes = (n * 4) as u64;
    let (da, db, dc) = (g.alloc(bytes)?, g.alloc(bytes)?, g.alloc(bytes)?);
    g.htod(da, 0, f32_bytes(&a))?;
    g.htod(db, 0, f32_bytes(&b))?;
    let t = Instant::now();
    g.launch(
        BUILTIN_MODULE,
        "vector_add_f32",
        [blocks(n, 256), 1, 1],
        [256, 1, 1],
        vec![
            Param::Buffer(da),
            Param::Buffer(db),
            Param::Buffer(dc),
            Param::u32(n as u32),
        ],
    )?;
    let got = g.dtoh(dc, 0, bytes)?;
    let took = t.elapsed();
    let wrong = got
        .chunks_exact(4)
        .zip(a.iter().zip(&b))
        .filter(|(c, (x, y))| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) != *x + *y)
        .count();
    if wrong > 0 {
        return Err(format!("vector add: {wrong} of {n} elements wrong"));
    }
    println!(
        "Vector add PASSED: {n} elements on {} ({label}), launch to results {:.3} ms",
        m.device().name,
        took.as_secs_f64() * 1e3
    );
    rows.push(Row {
        name: "vector_add_ms".into(),
        value: format!("{:.3}", took.as_secs_f64() * 1e3),
    });

    println!("\n| figure | {label} |\n|---|---|");
    for r in &rows {
        println!("| {} | {} |", r.name, r.value);
    }
    println!();
    for r in &rows {
        println!("figure {label} {} {}", r.name, r.value);
    }
    Ok(())
}
