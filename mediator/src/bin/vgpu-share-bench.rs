// SPDX-License-Identifier: Apache-2.0
//! `vgpu-share-bench`: measures on a real GPU whether the mediator's scheduler shares the
//! device between VMs (tenants) as it promises: device time in proportion to weight,
//! weights that take effect at once, little cost for the scheduling itself, and a
//! watchdog that ends a kernel that never finishes while the other VMs work on.
//!
//! The mediator runs on the executor factory `select(ExecutorChoice::Cuda)` returns, as
//! the service does: each session's executor in its own `vgpu-executor-worker` process
//! with its own CUDA context. Every scenario gets a fresh [`Mediator`] with its own
//! scheduler; every tenant has one session and a driver thread, as a guest program would.
//!
//! The load is `vgpu_bench_burn`, a hand-written PTX kernel (after the `.version` and
//! `.target` lines NVRTC wrote for this device's built-in catalog) in which every thread
//! runs a dependent FMA chain of `iters` iterations. It is launched with four blocks of 256
//! threads per multiprocessor, so one launch holds the whole GPU. At start the number of
//! iterations for 50 µs, 500 µs, 2 ms and 5 ms is calibrated from solo runs through one
//! mediated session: the fastest of many launches followed by a SYNC, less the fastest
//! such run of zero iterations (the host's clock, so the kernel counts below are a check
//! independent of the device meter; the meter's time per kernel is printed beside it).
//!
//! Scenarios (after one second of warm-up each; the window is `--seconds`). In the first
//! three, every VM's driver thread launches without pause (a launch is answered once it is
//! queued) and SYNCs every 64 launches:
//!
//! - `jain-4vm`: four VMs of equal weight with kernels of 50 µs, 500 µs, 2 ms and 5 ms.
//!   Each VM's device time over the window, as the scheduler's device meters report it
//!   (CUDA events in the worker processes), and independently the kernels it finished
//!   (launches answered less those still in flight) times their calibrated solo duration.
//!   Goal: Jain's fairness index of device time at least 0.99.
//! - `weights-1-3`: two VMs of weights 100 and 300, 500 µs kernels. Goal: device time in
//!   the ratio 3 within 5% (the ratio of kernel counts is printed too).
//! - `weights-runtime`: the same two VMs; half-way through the window the first one's
//!   weight becomes 300. Goal: over the second half, the ratio 1 within 10%.
//! - `sched-overhead`: one VM, 50,000 launches of a one-element kernel submitted without
//!   waiting, then a SYNC, timed end to end; the scheduler enforcing shares against the
//!   scheduler only measuring (`Scheduler::set_enforce`, switched between runs of the same
//!   session in the same worker process), five runs each in the order A B B A ..., the
//!   best of each. Goal: the enforcing scheduler within 5% of the launch rate of the
//!   measuring one. Also the median launch + SYNC round trip both ways.
//! - `watchdog`: VM A launches a kernel that never ends (it spins on a load of memory
//!   nobody writes) and SYNCs while VM B adds vectors in a loop. Goals: A's SYNC answers
//!   `DEVICE_LOST` with detail 702 after about `--kernel-timeout` (at most the timeout
//!   plus 2 s, the watchdog's period included), B's results are all correct, B finished
//!   work while A was stuck, and a new session of A works afterwards.
//!
//! Every goal prints `PASS <scenario>: ...` or `FAIL <scenario>: <why>` (a scenario that
//! cannot run prints `SKIP`); a table of the figures comes last. Exits 1 when any goal
//! fails.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use vgpu_kernels::reference;
use vgpu_mediator::check::{
    blocks, describe, f32_bytes, launch_command, median, ptx_header, us, Answers, Guest, Rng,
};
use vgpu_mediator::cuda::CudaExecutorFactory;
use vgpu_mediator::executor::TIMEOUT_DETAIL;
use vgpu_mediator::{
    select, CompletionSink, ExecutorChoice, ExecutorFactory, Limits, Mediator, SchedConfig,
    TenantConfig, TenantId,
};
use vgpu_protocol::{Command, Param, Request, Response, Status, BUILTIN_MODULE};

#[derive(Parser)]
#[command(
    name = "vgpu-share-bench",
    version,
    about = "Measures how the vGPU mediator shares a CUDA device between VMs",
    long_about = "Measures on a CUDA device whether the vGPU mediator's scheduler shares the \
                  GPU between VMs as it should: Jain's fairness index of device time for four \
                  VMs of equal weight and very different kernel lengths (goal >= 0.99), device \
                  time in proportion to weights 1:3 (within 5%), a weight changed at run time \
                  (ratio 1 within 10% afterwards), the cost of enforcing shares against only \
                  measuring them (within 5% in launches/s), and the watchdog ending a kernel \
                  that never finishes (DEVICE_LOST 702 after the kernel timeout) while another \
                  VM works on. Each session's executor runs in its own vgpu-executor-worker \
                  process (found through $VGPU_EXECUTOR_WORKER, beside this binary or on \
                  $PATH), as in the service. Prints PASS/FAIL lines per goal, then a table; \
                  exits 1 if any goal fails."
)]
struct Args {
    /// Measurement window of each scenario in seconds, after 1 s of warm-up [default: 10].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: Option<u64>,
    /// 3 s per scenario.
    #[arg(long, conflicts_with = "seconds")]
    quick: bool,
    /// The scheduler's kernel timeout (the watchdog scenario waits for it), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = parse_timeout)]
    kernel_timeout: f64,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if v.is_finite() && (0.1..=600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{s} s: the kernel timeout must lie between 0.1 and 600 s"
        ))
    }
}

const GIB: u64 = 1 << 30;
/// Every VM's memory quota.
const QUOTA: u64 = 8 * GIB;
/// The weight of a VM when weights are equal.
const WEIGHT: u32 = 100;
/// Launches between two SYNCs of a driver.
const SYNC_EVERY: u64 = 64;
/// Load before every measurement window.
const WARMUP: Duration = Duration::from_secs(1);
/// Blocks of the burn kernel per multiprocessor, and its threads per block.
const BLOCKS_PER_SM: u32 = 4;
const THREADS: u32 = 256;
/// The burn kernel's output (it writes the first word).
const OUT_BYTES: u64 = 256;
/// Kernel durations calibrated at start, with their labels.
const TARGETS: [(&str, Duration); 4] = [
    ("50us", Duration::from_micros(50)),
    ("500us", Duration::from_micros(500)),
    ("2ms", Duration::from_millis(2)),
    ("5ms", Duration::from_millis(5)),
];
/// Launches per `sched-overhead` run, and its timed runs per configuration.
const OVERHEAD_LAUNCHES: u64 = 50_000;
const OVERHEAD_ROUNDS: usize = 5;
/// Launch + SYNC round trips timed per configuration, in alternating chunks.
const ROUND_TRIPS: usize = 1_000;
const ROUND_TRIP_CHUNK: usize = 100;
/// How late the watchdog may end a stuck kernel: its period is at most 1 s, with margin.
const WATCHDOG_SLACK: Duration = Duration::from_secs(2);
/// Floats per vector add of the watchdog scenario's steady VM.
const ADD_ELEMENTS: usize = 1 << 20;
/// An output word no vector add of finite inputs produces.
const POISON_F32: u32 = 0x7fc0_dead;

/// The benchmark's kernels, after a header that suits the device.
///
/// `vgpu_bench_burn(out, iters)`: every thread runs a dependent chain of `iters` FMAs
/// (`x = x * m + 1` with `m` just below 1, so `x` stays finite). Thread 0 of block 0
/// stores the result, as does any thread whose result is NaN: that never happens, but the
/// compiler cannot know, so no thread's chain can be dropped or moved under the store.
///
/// `vgpu_bench_hang(flag)`: every thread spins on a volatile load of `flag` while it
/// reads 0. Nobody writes it, so the kernel never ends on its own.
const BENCH_KERNELS: &str = r#"
.visible .entry vgpu_bench_burn(
	.param .u64 vgpu_burn_out,
	.param .u32 vgpu_burn_iters
)
{
	.reg .pred 	%p<5>;
	.reg .b32 	%r<8>;
	.reg .f32 	%f<5>;
	.reg .b64 	%rd<3>;

	ld.param.u64 	%rd1, [vgpu_burn_out];
	ld.param.u32 	%r1, [vgpu_burn_iters];
	mov.u32 	%r2, %tid.x;
	mov.u32 	%r3, %ctaid.x;
	cvt.rn.f32.u32 	%f1, %r2;
	mov.f32 	%f2, 0f3F7FFFEF;
	mov.f32 	%f3, 0f3F800000;
	mov.u32 	%r4, 0;
	setp.eq.u32 	%p1, %r1, 0;
	@%p1 bra 	VGPU_BURN_END;
VGPU_BURN_LOOP:
	fma.rn.f32 	%f1, %f1, %f2, %f3;
	add.u32 	%r4, %r4, 1;
	setp.lt.u32 	%p2, %r4, %r1;
	@%p2 bra 	VGPU_BURN_LOOP;
VGPU_BURN_END:
	or.b32 	%r5, %r2, %r3;
	setp.eq.u32 	%p3, %r5, 0;
	setp.nan.f32 	%p4, %f1, %f1;
	or.pred 	%p3, %p3, %p4;
	@!%p3 bra 	VGPU_BURN_DONE;
	cvta.to.global.u64 	%rd2, %rd1;
	mov.b32 	%r6, %f1;
	st.global.u32 	[%rd2], %r6;
VGPU_BURN_DONE:
	ret;
}

.visible .entry vgpu_bench_hang(
	.param .u64 vgpu_hang_flag
)
{
	.reg .pred 	%p<2>;
	.reg .b32 	%r<2>;
	.reg .b64 	%rd<3>;

	ld.param.u64 	%rd1, [vgpu_hang_flag];
	cvta.to.global.u64 	%rd2, %rd1;
VGPU_HANG_LOOP:
	ld.volatile.global.u32 	%r1, [%rd2];
	setp.eq.u32 	%p1, %r1, 0;
	@%p1 bra 	VGPU_HANG_LOOP;
	ret;
}
"#;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let window = Duration::from_secs(match (args.quick, args.seconds) {
        (true, _) => 3,
        (false, Some(s)) => s,
        (false, None) => 10,
    });
    let kernel_timeout = Duration::from_secs_f64(args.kernel_timeout);

    // What the service runs VMs on: CUDA executors in worker processes.
    let factory = match select(ExecutorChoice::Cuda) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "vgpu-share-bench: needs a CUDA GPU and the vgpu-executor-worker binary: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    // The catalog's PTX gives the `.version` and `.target` lines for hand-written PTX.
    let header = match CudaExecutorFactory::new(0) {
        Ok(f) => ptx_header(f.catalog_ptx()),
        Err(e) => {
            eprintln!("vgpu-share-bench: CUDA unavailable in this process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bench = Bench {
        sms: factory.device().multiprocessors.max(1),
        factory,
        ptx: format!("{header}{BENCH_KERNELS}"),
        window,
        kernel_timeout,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    println!(
        "vgpu-share-bench: {}, {} multiprocessors; {} s per scenario after {} s of warm-up; \
         kernel timeout {:.1} s",
        vgpu_mediator::selftest::device_line(bench.factory.device()),
        bench.sms,
        window.as_secs(),
        WARMUP.as_secs(),
        kernel_timeout.as_secs_f64()
    );

    let mut report = Report::default();
    let calibration = match catch(|| bench.calibrate()) {
        Ok(c) => Some(c),
        Err(why) => {
            report.fail("calibration", "-", "kernels of known length", why);
            None
        }
    };
    match &calibration {
        Some(cal) => {
            report.scenario("jain-4vm", "J >= 0.99 (device time)", || {
                bench.jain_4vm(cal)
            });
            report.scenario("weights-1-3", "ratio 3 within 5%", || bench.weights(cal));
            report.scenario("weights-runtime", "ratio 1 within 10% after", || {
                bench.weights_runtime(cal)
            });
        }
        None => {
            for (name, goal) in [
                ("jain-4vm", "J >= 0.99 (device time)"),
                ("weights-1-3", "ratio 3 within 5%"),
                ("weights-runtime", "ratio 1 within 10% after"),
            ] {
                report.skip(name, goal, "no calibrated kernels");
            }
        }
    }
    report.scenario("sched-overhead", "enforced >= 95% of measure-only", || {
        bench.sched_overhead()
    });
    let watchdog_goal = format!(
        "DEVICE_LOST/702 within {:.1} s, B runs",
        (kernel_timeout + WATCHDOG_SLACK).as_secs_f64()
    );
    report.scenario("watchdog", &watchdog_goal, || bench.watchdog());

    report.print_table(&bench);
    if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------------------
// Reporting

/// What a scenario measured: whether its goal held, its figure for the table, and the
/// detail for its PASS/FAIL line.
struct Outcome {
    pass: bool,
    figure: String,
    detail: String,
}

struct Row {
    scenario: String,
    figure: String,
    goal: String,
    result: &'static str,
}

#[derive(Default)]
struct Report {
    failed: usize,
    rows: Vec<Row>,
}

impl Report {
    fn row(&mut self, scenario: &str, figure: &str, goal: &str, result: &'static str) {
        self.rows.push(Row {
            scenario: scenario.into(),
            figure: figure.into(),
            goal: goal.into(),
            result,
        });
    }

    fn fail(&mut self, name: &str, figure: &str, goal: &str, why: impl AsRef<str>) {
        self.failed += 1;
        println!("FAIL {name}: {}", why.as_ref());
        self.row(name, figure, goal, "FAIL");
    }

    fn skip(&mut self, name: &str, goal: &str, why: &str) {
        println!("SKIP {name}: {why}");
        self.row(name, "-", goal, "SKIP");
    }

    /// Runs one scenario; an error or a panic inside it is a failure of that scenario.
    fn scenario(&mut self, name: &str, goal: &str, f: impl FnOnce() -> Result<Outcome, String>) {
        println!("-- {name}");
        match catch(f) {
            Ok(o) if o.pass => {
                println!("PASS {name}: {}", o.detail);
                self.row(name, &o.figure, goal, "PASS");
            }
            Ok(o) => self.fail(name, &o.figure, goal, o.detail),
            Err(why) => self.fail(name, "-", goal, why),
        }
    }

    fn print_table(&self, bench: &Bench) {
        println!();
        println!(
            "== sharing on {}: {} s per scenario, kernel timeout {:.1} s ==",
            bench.factory.device().name,
            bench.window.as_secs(),
            bench.kernel_timeout.as_secs_f64()
        );
        println!("{:<16} {:<58} {:<36} result", "scenario", "figure", "goal");
        for r in &self.rows {
            println!(
                "{:<16} {:<58} {:<36} {}",
                r.scenario, r.figure, r.goal, r.result
            );
        }
    }
}

/// Runs `f`; a panic becomes an error.
fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {why}"))
        }
    }
}

fn add_tenant(m: &Mediator, name: &str, weight: u32) -> Result<TenantId, String> {
    m.add_tenant(TenantConfig {
        name: name.into(),
        mem_quota: QUOTA,
        weight,
    })
    .map_err(|e| format!("add_tenant {name}: {e}"))
}

/// Hands one answer to a channel, for a call that may never come back.
struct OneAnswer(Mutex<mpsc::Sender<Response>>);

impl CompletionSink for OneAnswer {
    fn complete(&self, _token: u64, response: Response) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(response);
    }
}

// ---------------------------------------------------------------------------------------
// Inputs and figures

fn f32s_of(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Jain's fairness index: 1 when all shares are equal, 1/n when one takes everything.
fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares > 0.0 {
        sum * sum / (x.len() as f64 * squares)
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------
// Calibration

/// A burn kernel of a target duration.
struct Burn {
    label: &'static str,
    target: Duration,
    iters: u32,
    /// Its solo duration: the median launch + SYNC, less that of a launch of 0 iterations.
    solo: Duration,
}

struct Calibration {
    burns: Vec<Burn>,
}

impl Calibration {
    fn get(&self, label: &str) -> Result<&Burn, String> {
        self.burns
            .iter()
            .find(|b| b.label == label)
            .ok_or_else(|| format!("no {label} kernel calibrated"))
    }
}

// ---------------------------------------------------------------------------------------
// Driving several VMs at once

/// A driver thread's progress.
#[derive(Default)]
struct Driver {
    /// Launches answered (queued on the device).
    launches: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Driver {
    fn fail(&self, why: String) {
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }
}

/// Every VM's counters at one moment.
struct Snap {
    at: Instant,
    device_ns: Vec<u64>,
    waited_ns: Vec<u64>,
    /// Kernels that finished.
    completed: Vec<u64>,
}

/// What every VM got between two snapshots.
struct Window {
    secs: f64,
    /// Device time by the scheduler's meters, in seconds.
    device: Vec<f64>,
    /// Time spent waiting to be admitted, in seconds.
    waited: Vec<f64>,
    /// Kernels that finished.
    kernels: Vec<u64>,
}

impl Window {
    fn between(a: &Snap, b: &Snap) -> Window {
        let diff = |x: &[u64], y: &[u64]| -> Vec<u64> {
            x.iter().zip(y).map(|(x, y)| y.saturating_sub(*x)).collect()
        };
        let secs = |ns: Vec<u64>| ns.into_iter().map(|ns| ns as f64 * 1e-9).collect();
        Window {
            secs: b.at.duration_since(a.at).as_secs_f64(),
            device: secs(diff(&a.device_ns, &b.device_ns)),
            waited: secs(diff(&a.waited_ns, &b.waited_ns)),
            kernels: diff(&a.completed, &b.completed),
        }
    }

    /// Device time from kernel counts: kernels finished times their solo duration.
    fn by_kernels(&self, burns: &[&Burn]) -> Vec<f64> {
        self.kernels
            .iter()
            .zip(burns)
            .map(|(&n, b)| n as f64 * b.solo.as_secs_f64())
            .collect()
    }

    /// One line per VM: both measures of its device time and its wait.
    fn print(&self, names: &[&str], burns: &[&Burn]) {
        let total: f64 = self.device.iter().sum();
        let by_kernels = self.by_kernels(burns);
        for (i, name) in names.iter().enumerate() {
            println!(
                "  {name:<10} device {:>7.3} s ({:>5.1}%)  kernels {:>7} x {:>7.1} us = {:>7.3} s  \
                 waited {:>7.3} s",
                self.device[i],
                100.0 * self.device[i] / total.max(1e-12),
                self.kernels[i],
                us(burns[i].solo),
                by_kernels[i],
                self.waited[i],
            );
        }
        println!(
            "  device busy {:.1}% of the {:.2} s window (by the meters)",
            100.0 * total / self.secs.max(1e-12),
            self.secs
        );
    }
}

/// Ratio of the second VM's share to the first's, by both measures.
fn ratios(w: &Window, burns: &[&Burn]) -> (f64, f64) {
    let k = w.by_kernels(burns);
    (w.device[1] / w.device[0], k[1] / k[0])
}

// ---------------------------------------------------------------------------------------
// The scenarios

struct Bench {
    factory: Arc<dyn ExecutorFactory>,
    sms: u32,
    ptx: String,
    window: Duration,
    kernel_timeout: Duration,
    seed: u64,
}

impl Bench {
    /// A fresh mediator on the shared factory, with the service's scheduler.
    fn mediator(&self) -> Arc<Mediator> {
        Mediator::with_config(
            self.factory.clone(),
            Limits::default(),
            SchedConfig {
                kernel_timeout: self.kernel_timeout,
                ..SchedConfig::default()
            },
        )
    }

    /// A launch of the burn kernel over the whole GPU.
    fn burn(&self, module: u64, out: u64, iters: u32) -> Command {
        launch_command(
            module,
            "vgpu_bench_burn",
            [self.sms * BLOCKS_PER_SM, 1, 1],
            [THREADS, 1, 1],
            vec![Param::Buffer(out), Param::u32(iters)],
        )
    }

    /// Finds the iterations of the burn kernel for each target duration, alone on the
    /// device through one mediated session, and prints them.
    fn calibrate(&self) -> Result<Calibration, String> {
        println!("-- calibration");
        let m = self.mediator();
        let t = add_tenant(&m, "vm-calibrate", WEIGHT)?;
        let g = Guest::open(&m, t)?;
        let module = g.load(&self.ptx)?;
        let out = g.alloc(OUT_BYTES)?;
        let device_ns = || m.usage(t).map_or(0, |u| u.device_ns);
        // Fastest launch + SYNC of `runs` (the least disturbed by the host), and the
        // meter's device time per launch.
        let solo = |iters: u32, runs: usize| -> Result<(Duration, Duration), String> {
            let launch = self.burn(module, out, iters);
            for _ in 0..2 {
                g.launch_prepared(&launch)?;
                g.sync()?;
            }
            let before = device_ns();
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs {
                let started = Instant::now();
                g.launch_prepared(&launch)?;
                g.sync()?;
                samples.push(started.elapsed());
            }
            let meter = device_ns().saturating_sub(before) / runs as u64;
            let fastest = samples.into_iter().min().unwrap_or_default();
            Ok((fastest, Duration::from_nanos(meter)))
        };
        let (base, base_meter) = solo(0, 100)?;
        // Iterations that take tens of milliseconds give the time of one iteration.
        let mut iters: u32 = 1 << 12;
        let per_iter_ns = loop {
            let (took, _) = solo(iters, 5)?;
            let net = took.saturating_sub(base);
            if net >= Duration::from_millis(20) || iters >= 1 << 30 {
                if net.is_zero() {
                    return Err(format!("{iters} iterations took no time"));
                }
                break net.as_nanos() as f64 / f64::from(iters);
            }
            iters = iters.saturating_mul(if net < Duration::from_millis(2) { 8 } else { 2 });
        };
        println!(
            "  grid {} blocks x {THREADS} threads; a launch of 0 iterations + SYNC takes {:.1} us \
             ({:.1} us by the meter); {per_iter_ns:.3} ns per iteration",
            self.sms * BLOCKS_PER_SM,
            us(base),
            us(base_meter)
        );
        let mut burns = Vec::new();
        for (label, target) in TARGETS {
            let runs =
                (Duration::from_millis(400).as_nanos() / target.as_nanos()).clamp(20, 200) as usize;
            let mut iters = (target.as_nanos() as f64 / per_iter_ns).round().max(1.0) as u32;
            let (mut took, mut meter) = solo(iters, runs)?;
            // One correction where the kernel is not linear in its iterations.
            let net = took.saturating_sub(base);
            let off = net.as_secs_f64() / target.as_secs_f64();
            if !(0.95..=1.05).contains(&off) && off > 0.0 {
                iters = (f64::from(iters) / off).round().max(1.0) as u32;
                (took, meter) = solo(iters, runs)?;
            }
            let net = took.saturating_sub(base);
            println!(
                "  {label:>5}: {iters:>9} iterations, solo {:>8.1} us (fastest of {runs} launch + \
                 SYNC less the fastest empty one), {:>8.1} us by the meter",
                us(net),
                us(meter)
            );
            // The host's clock could not tell it from an empty launch: the device's can.
            let net = if net.is_zero() { meter } else { net };
            if net.is_zero() {
                return Err(format!("the {label} kernel took no time"));
            }
            burns.push(Burn {
                label,
                target,
                iters,
                solo: net,
            });
        }
        let worst = burns
            .iter()
            .map(|b| (b.solo.as_secs_f64() / b.target.as_secs_f64() - 1.0).abs())
            .fold(0.0, f64::max);
        if worst > 0.2 {
            println!(
                "  note: a kernel is {:.0}% off its target; the scenarios use the measured solo \
                 durations",
                100.0 * worst
            );
        }
        Ok(Calibration { burns })
    }

    /// Runs one driver thread per `(tenant, iterations)` of the burn kernel: each launches
    /// without pause (a launch is answered once queued) and SYNCs every [`SYNC_EVERY`]
    /// launches. `measure` runs once every driver is set up, with a function that takes a
    /// snapshot of all VMs; the drivers stop when it returns.
    fn contend<T>(
        &self,
        m: &Mediator,
        load: &[(TenantId, u32)],
        measure: impl FnOnce(&dyn Fn() -> Result<Snap, String>) -> Result<T, String>,
    ) -> Result<T, String> {
        let drivers: Vec<Driver> = load.iter().map(|_| Driver::default()).collect();
        let stop = AtomicBool::new(false);
        let ready = Barrier::new(load.len() + 1);
        let result = std::thread::scope(|s| {
            for (&(tenant, iters), driver) in load.iter().zip(&drivers) {
                let (ready, stop) = (&ready, &stop);
                s.spawn(move || self.drive(m, tenant, iters, ready, stop, driver));
            }
            ready.wait();
            let snap = || -> Result<Snap, String> {
                let gone = |t: TenantId| format!("tenant {} is gone", t.0);
                let mut snap = Snap {
                    at: Instant::now(),
                    device_ns: Vec::new(),
                    waited_ns: Vec::new(),
                    completed: Vec::new(),
                };
                for (&(t, _), d) in load.iter().zip(&drivers) {
                    let usage = m.usage(t).ok_or_else(|| gone(t))?;
                    // Launches answered less those still on the device or queued for it.
                    let in_flight = m.scheduler().stats(t).ok_or_else(|| gone(t))?.in_flight;
                    let launched = d.launches.load(Ordering::SeqCst);
                    snap.device_ns.push(usage.device_ns);
                    snap.waited_ns.push(usage.sched_wait_ns);
                    snap.completed.push(launched.saturating_sub(in_flight));
                }
                Ok(snap)
            };
            let result = measure(&snap);
            stop.store(true, Ordering::SeqCst);
            result
        });
        for (d, &(t, _)) in drivers.iter().zip(load) {
            if let Some(why) = d.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(format!("the driver of tenant {}: {why}", t.0));
            }
        }
        result
    }

    /// One VM's guest program: a session, the module, then launches until `stop`.
    fn drive(
        &self,
        m: &Mediator,
        tenant: TenantId,
        iters: u32,
        ready: &Barrier,
        stop: &AtomicBool,
        driver: &Driver,
    ) {
        let setup = (|| {
            let g = Guest::open(m, tenant)?;
            let module = g.load(&self.ptx)?;
            let out = g.alloc(OUT_BYTES)?;
            let launch = self.burn(module, out, iters);
            g.launch_prepared(&launch)?;
            g.sync()?;
            Ok::<_, String>((g, launch))
        })();
        // Waited for whatever happened, so that the others never wait for this one.
        ready.wait();
        let (g, launch) = match setup {
            Ok(s) => s,
            Err(why) => return driver.fail(why),
        };
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if let Err(why) = g.launch_prepared(&launch) {
                return driver.fail(why);
            }
            n += 1;
            driver.launches.store(n, Ordering::SeqCst);
            if n % SYNC_EVERY == 0 {
                if let Err(why) = g.sync() {
                    return driver.fail(why);
                }
            }
        }
        if let Err(why) = g.sync() {
            driver.fail(why);
        }
    }

    /// Warm-up, then a snapshot at the start and the end of the window.
    fn window(&self, snap: &dyn Fn() -> Result<Snap, String>) -> Result<Window, String> {
        std::thread::sleep(WARMUP);
        let a = snap()?;
        std::thread::sleep(self.window);
        let b = snap()?;
        Ok(Window::between(&a, &b))
    }

    /// Four VMs of equal weight with kernels of 50 µs to 5 ms: Jain's index of their
    /// device time.
    fn jain_4vm(&self, cal: &Calibration) -> Result<Outcome, String> {
        let m = self.mediator();
        let burns: Vec<&Burn> = cal.burns.iter().collect();
        let names: Vec<String> = burns.iter().map(|b| format!("vm-{}", b.label)).collect();
        let mut load = Vec::new();
        for (name, b) in names.iter().zip(&burns) {
            load.push((add_tenant(&m, name, WEIGHT)?, b.iters));
        }
        let w = self.contend(&m, &load, |snap| self.window(snap))?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        w.print(&names, &burns);
        let j_device = jain(&w.device);
        let j_kernels = jain(&w.by_kernels(&burns));
        println!(
            "  Jain index: {j_device:.4} by the device meters, {j_kernels:.4} by kernel counts"
        );
        Ok(Outcome {
            pass: j_device >= 0.99,
            figure: format!("J {j_device:.4} (kernel counts {j_kernels:.4})"),
            detail: format!(
                "4 VMs of equal weight, kernels of 50 us to 5 ms: Jain index of device time \
                 {j_device:.4} (kernel counts x solo durations: {j_kernels:.4}); goal >= 0.99"
            ),
        })
    }

    /// Two VMs of weights 100 and 300 with 500 µs kernels: the ratio of their device time.
    fn weights(&self, cal: &Calibration) -> Result<Outcome, String> {
        let burn = cal.get("500us")?;
        let m = self.mediator();
        let load = [
            (add_tenant(&m, "vm-w100", 100)?, burn.iters),
            (add_tenant(&m, "vm-w300", 300)?, burn.iters),
        ];
        let w = self.contend(&m, &load, |snap| self.window(snap))?;
        let burns = [burn, burn];
        w.print(&["vm-w100", "vm-w300"], &burns);
        let (ratio, by_kernels) = ratios(&w, &burns);
        Ok(Outcome {
            pass: (2.85..=3.15).contains(&ratio),
            figure: format!("ratio {ratio:.3} (kernel counts {by_kernels:.3})"),
            detail: format!(
                "weights 100:300, 500 us kernels: device time ratio {ratio:.3} (kernel counts: \
                 {by_kernels:.3}); goal 2.85..3.15"
            ),
        })
    }

    /// The same two VMs; half-way the first one's weight becomes 300: the ratio over the
    /// second half.
    fn weights_runtime(&self, cal: &Calibration) -> Result<Outcome, String> {
        let burn = cal.get("500us")?;
        let m = self.mediator();
        let (light, heavy) = (
            add_tenant(&m, "vm-w100", 100)?,
            add_tenant(&m, "vm-w300", 300)?,
        );
        let load = [(light, burn.iters), (heavy, burn.iters)];
        let half = self.window / 2;
        let (before, after) = self.contend(&m, &load, |snap| {
            std::thread::sleep(WARMUP);
            let a = snap()?;
            std::thread::sleep(half);
            let b = snap()?;
            if !m.set_weight(light, 300) {
                return Err("set_weight refused".into());
            }
            let c = snap()?;
            std::thread::sleep(half);
            let d = snap()?;
            Ok((Window::between(&a, &b), Window::between(&c, &d)))
        })?;
        let burns = [burn, burn];
        println!("  first half, weights 100:300:");
        before.print(&["vm-w100", "vm-w300"], &burns);
        println!("  second half, weights 300:300:");
        after.print(&["vm-w100", "vm-w300"], &burns);
        let (first, _) = ratios(&before, &burns);
        let (ratio, by_kernels) = ratios(&after, &burns);
        Ok(Outcome {
            pass: (0.9..=1.1).contains(&ratio),
            figure: format!("ratio {ratio:.3} after (kernels {by_kernels:.3}; {first:.3} before)"),
            detail: format!(
                "weights 100:300, then 300:300 half-way: device time ratio {first:.3} before, \
                 {ratio:.3} after (kernel counts: {by_kernels:.3}); goal 0.90..1.10 after"
            ),
        })
    }

    /// The launch rate of one VM with the scheduler enforcing shares against it only
    /// measuring, and the launch + SYNC round trip both ways.
    fn sched_overhead(&self) -> Result<Outcome, String> {
        // One mediator, one session, one worker process: the runs differ only in whether
        // the scheduler holds work back, switched between them (`Scheduler::set_enforce`).
        let m = self.mediator();
        let guest = OverheadSide::open(&m)?;
        let mut sides = [
            OverheadSide::new("enforced", true),
            OverheadSide::new("measure-only", false),
        ];
        let sched = m.scheduler().clone();
        // `n` launches submitted without waiting, then a SYNC: the time end to end.
        let burst = |s: &OverheadSide, n: u64| -> Result<Duration, String> {
            sched.set_enforce(s.enforce);
            let g = &guest.0;
            let answers = Arc::new(Answers::default());
            let started = Instant::now();
            for _ in 0..n {
                let sink: Arc<dyn CompletionSink> = answers.clone();
                g.m.submit(g.tenant, Request::new(g.session, guest.1.clone()), 0, sink);
            }
            g.sync()?;
            let took = started.elapsed();
            answers.expect(n)?;
            Ok(took)
        };
        for s in &sides {
            burst(s, OVERHEAD_LAUNCHES / 10)?;
        }
        // A B B A ...: neither side always runs first.
        for round in 0..OVERHEAD_ROUNDS {
            for i in [round % 2, 1 - round % 2] {
                let took = burst(&sides[i], OVERHEAD_LAUNCHES)?;
                sides[i].best = sides[i].best.min(took);
            }
        }
        // Round trips in alternating chunks, so that neither side gets the warmer machine.
        let round_trip = |s: &OverheadSide, n: usize, samples: &mut Vec<Duration>| {
            sched.set_enforce(s.enforce);
            let g = &guest.0;
            for _ in 0..n {
                let started = Instant::now();
                g.launch_prepared(&guest.1)?;
                g.sync()?;
                samples.push(started.elapsed());
            }
            Ok::<_, String>(())
        };
        let mut samples = [Vec::new(), Vec::new()];
        for s in &sides {
            round_trip(s, ROUND_TRIP_CHUNK, &mut Vec::new())?;
        }
        for chunk in 0..ROUND_TRIPS / ROUND_TRIP_CHUNK {
            for i in [chunk % 2, 1 - chunk % 2] {
                round_trip(&sides[i], ROUND_TRIP_CHUNK, &mut samples[i])?;
            }
        }
        sched.set_enforce(true);
        for (s, samples) in sides.iter_mut().zip(samples) {
            s.round_trip = median(samples);
        }
        let rate = |s: &OverheadSide| OVERHEAD_LAUNCHES as f64 / s.best.as_secs_f64();
        for s in &sides {
            println!(
                "  {:<12} best of {OVERHEAD_ROUNDS}: {OVERHEAD_LAUNCHES} launches + SYNC in \
                 {:.1} ms = {:.0} launches/s; launch + SYNC round trip {:.1} us (median of \
                 {ROUND_TRIPS})",
                s.name,
                s.best.as_secs_f64() * 1e3,
                rate(s),
                us(s.round_trip)
            );
        }
        let (e, mo) = (&sides[0], &sides[1]);
        let (rate_e, rate_m) = (rate(e), rate(mo));
        let share = rate_e / rate_m;
        Ok(Outcome {
            pass: share >= 0.95,
            figure: format!(
                "{rate_e:.0} vs {rate_m:.0} launches/s ({:.1}%); rt {:.1} vs {:.1} us",
                100.0 * share,
                us(e.round_trip),
                us(mo.round_trip)
            ),
            detail: format!(
                "enforcing shares: {rate_e:.0} launches/s, measure-only: {rate_m:.0} launches/s \
                 ({:.1}%); launch + SYNC round trip {:.1} us vs {:.1} us; goal >= 95%",
                100.0 * share,
                us(e.round_trip),
                us(mo.round_trip)
            ),
        })
    }

    /// VM A's kernel never ends while VM B adds vectors: A's SYNC must answer
    /// `DEVICE_LOST`/702 after the kernel timeout, B must work on meanwhile, and A must get
    /// a working session afterwards.
    fn watchdog(&self) -> Result<Outcome, String> {
        let m = self.mediator();
        let hung = add_tenant(&m, "vm-hang", WEIGHT)?;
        let steady_vm = add_tenant(&m, "vm-steady", WEIGHT)?;
        let steady = Steady::default();
        let (stuck, adds) = std::thread::scope(|s| {
            let b = s.spawn(|| self.steady_adds(&m, steady_vm, &steady));
            let stuck = self.get_stuck(&m, hung, &steady);
            steady.stop.store(true, Ordering::SeqCst);
            let adds = b
                .join()
                .unwrap_or_else(|_| Err("the vector-add thread panicked".into()));
            (stuck, adds)
        });
        let stuck = stuck?;
        let timeout = self.kernel_timeout;
        let low = timeout.saturating_sub(Duration::from_millis(100));
        let high = timeout + WATCHDOG_SLACK;
        let secs = |d: Duration| d.as_secs_f64();
        let answer = describe(&stuck.answer);
        println!(
            "  A's SYNC of a kernel that never ends: {answer} after {:.3} s (kernel timeout \
             {:.1} s); the watchdog ended {} session(s) of A",
            secs(stuck.took),
            secs(timeout),
            stuck.timeouts
        );
        println!(
            "  B: {} vector adds of {ADD_ELEMENTS} floats before A's SYNC, {} while A was stuck \
             ({:.1}/s); {}",
            stuck.before,
            stuck.during,
            stuck.during as f64 / secs(stuck.took).max(1e-9),
            match &adds {
                Ok(n) => format!("{n} in all, every result correct"),
                Err(why) => format!("FAILED: {why}"),
            }
        );
        println!(
            "  A's new session afterwards: {}",
            match &stuck.recovered {
                Ok(()) => "a vector add, correct".to_string(),
                Err(why) => format!("FAILED: {why}"),
            }
        );
        let mut problems = Vec::new();
        if stuck.answer.status != Status::DeviceLost || stuck.answer.detail != TIMEOUT_DETAIL {
            problems.push(format!(
                "A's SYNC returned {answer}, expected DEVICE_LOST (detail {TIMEOUT_DETAIL})"
            ));
        }
        if stuck.took < low || stuck.took > high {
            problems.push(format!(
                "A's SYNC came back after {:.3} s, outside {:.1}..{:.1} s",
                secs(stuck.took),
                secs(low),
                secs(high)
            ));
        }
        if stuck.timeouts != 1 {
            problems.push(format!(
                "the watchdog ended {} sessions of A, expected 1",
                stuck.timeouts
            ));
        }
        if let Err(why) = &adds {
            problems.push(format!("B's vector adds: {why}"));
        }
        if stuck.during == 0 {
            problems.push("B finished no vector add while A was stuck".into());
        }
        if let Err(why) = &stuck.recovered {
            problems.push(format!("A's new session: {why}"));
        }
        let measured = format!(
            "A's SYNC -> {answer} after {:.2} s (timeout {:.1} s); B did {} correct vector adds \
             while A was stuck; A's new session works: {}",
            secs(stuck.took),
            secs(timeout),
            stuck.during,
            stuck.recovered.is_ok()
        );
        Ok(Outcome {
            pass: problems.is_empty(),
            figure: format!(
                "SYNC {:.2} s -> {}/{}; B {} adds meanwhile",
                secs(stuck.took),
                stuck.answer.status,
                stuck.answer.detail,
                stuck.during
            ),
            detail: if problems.is_empty() {
                measured
            } else {
                format!("{} ({measured})", problems.join("; "))
            },
        })
    }

    /// VM B's guest program: vector adds of fresh random inputs, each checked against the
    /// CPU, until `stop`. Returns how many.
    fn steady_adds(&self, m: &Mediator, tenant: TenantId, steady: &Steady) -> Result<u64, String> {
        let result = (|| {
            let g = Guest::open(m, tenant)?;
            let bufs = add_buffers(&g)?;
            let mut rng = Rng(self.seed);
            let mut adds = 0u64;
            while !steady.stop.load(Ordering::SeqCst) {
                vector_add(&g, &mut rng, bufs)?;
                adds += 1;
                steady
                    .done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now());
            }
            Ok(adds)
        })();
        steady.ended.store(true, Ordering::SeqCst);
        result
    }

    /// VM A's side: once B works, a kernel that never ends and a SYNC, then a new session.
    fn get_stuck(
        &self,
        m: &Arc<Mediator>,
        tenant: TenantId,
        steady: &Steady,
    ) -> Result<Stuck, String> {
        let adds = || steady.done.lock().unwrap_or_else(|e| e.into_inner()).len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while adds() < 3 {
            if steady.ended.load(Ordering::SeqCst) || Instant::now() > deadline {
                return Err("VM B did not get its vector adds going".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let g = Guest::open(m, tenant)?;
        let module = g.load(&self.ptx)?;
        let flag = g.alloc(OUT_BYTES)?;
        g.memset32(flag, 0, OUT_BYTES, 0)?;
        g.sync()?;
        let hang = launch_command(
            module,
            "vgpu_bench_hang",
            [self.sms * BLOCKS_PER_SM, 1, 1],
            [THREADS, 1, 1],
            vec![Param::Buffer(flag)],
        );
        g.launch_prepared(&hang)?;
        let started = Instant::now();
        // Submitted rather than called: if nothing ends the kernel, the answer never comes.
        let (tx, rx) = mpsc::channel();
        m.submit(
            tenant,
            Request::new(g.session, Command::Sync),
            0,
            Arc::new(OneAnswer(Mutex::new(tx))),
        );
        let give_up = self.kernel_timeout + WATCHDOG_SLACK + Duration::from_secs(30);
        let Ok(answer) = rx.recv_timeout(give_up) else {
            // A's worker waits in the SYNC for good: closing the session or dropping the
            // mediator would wait with it, so both are left to the end of this process
            // (which ends the executor's worker process too).
            std::mem::forget(g);
            std::mem::forget(Arc::clone(m));
            return Err(format!(
                "A's SYNC did not come back within {:.0} s: nothing ended the kernel (the \
                 mediator is abandoned)",
                give_up.as_secs_f64()
            ));
        };
        let took = started.elapsed();
        let ended = Instant::now();
        let (before, during) = {
            let done = steady.done.lock().unwrap_or_else(|e| e.into_inner());
            (
                done.iter().filter(|&&t| t < started).count(),
                done.iter().filter(|&&t| t >= started && t <= ended).count(),
            )
        };
        let timeouts = m.usage(tenant).map_or(0, |u| u.timeouts);
        drop(g);
        let recovered = Guest::open(m, tenant).and_then(|g| {
            let bufs = add_buffers(&g)?;
            vector_add(&g, &mut Rng(self.seed ^ 0x5eed), bufs)
        });
        Ok(Stuck {
            answer,
            took,
            before,
            during,
            timeouts,
            recovered,
        })
    }
}

/// VM B's progress in the watchdog scenario.
#[derive(Default)]
struct Steady {
    /// When each vector add finished.
    done: Mutex<Vec<Instant>>,
    stop: AtomicBool,
    /// Its thread stopped (asked to, or failed).
    ended: AtomicBool,
}

/// What VM A saw in the watchdog scenario.
struct Stuck {
    /// The answer to the SYNC behind the kernel that never ends.
    answer: Response,
    took: Duration,
    /// B's vector adds finished before that SYNC and while it waited.
    before: usize,
    during: usize,
    /// Sessions of A the watchdog ended.
    timeouts: u64,
    /// A vector add in a new session of A afterwards.
    recovered: Result<(), String>,
}

/// Three buffers of [`ADD_ELEMENTS`] floats: two inputs and the output.
fn add_buffers(g: &Guest) -> Result<[u64; 3], String> {
    let bytes = (ADD_ELEMENTS * 4) as u64;
    Ok([g.alloc(bytes)?, g.alloc(bytes)?, g.alloc(bytes)?])
}

/// `c = a + b` with the built-in `vector_add_f32` for fresh random inputs, checked
/// exactly against the CPU (one IEEE addition per element). The output is poisoned first,
/// so an add that did not run cannot pass.
fn vector_add(g: &Guest, rng: &mut Rng, [da, db, dc]: [u64; 3]) -> Result<(), String> {
    let n = ADD_ELEMENTS;
    let a = rng.f32s(n, -100.0, 100.0);
    let b = rng.f32s(n, -100.0, 100.0);
    g.htod(da, 0, f32_bytes(&a))?;
    g.htod(db, 0, f32_bytes(&b))?;
    g.memset32(dc, 0, (n * 4) as u64, POISON_F32)?;
    g.launch_prepared(&launch_command(
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
    ))?;
    let got = f32s_of(&g.dtoh(dc, 0, (n * 4) as u64)?);
    let mut want = vec![0.0; n];
    reference::vector_add_f32(&a, &b, &mut want);
    match got.iter().zip(&want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(format!(
            "vector add element {i} = {} [{:#010x}], want {}",
            got[i],
            got[i].to_bits(),
            want[i]
        )),
    }
}

/// One configuration of the `sched-overhead` scenario: a VM's session and its launch.
struct OverheadSide {
    name: &'static str,
    /// Whether the scheduler holds work back in this side's runs.
    enforce: bool,
    /// The shortest timed run.
    best: Duration,
    /// The median launch + SYNC.
    round_trip: Duration,
}

impl OverheadSide {
    fn new(name: &'static str, enforce: bool) -> OverheadSide {
        OverheadSide {
            name,
            enforce,
            best: Duration::MAX,
            round_trip: Duration::ZERO,
        }
    }

    /// The session both sides use, and its launch: `fill_u32` over one element, one block
    /// that does almost nothing.
    fn open(m: &Mediator) -> Result<(Guest<'_>, Command), String> {
        let t = add_tenant(m, "vm-overhead", WEIGHT)?;
        let guest = Guest::open(m, t)?;
        let out = guest.alloc(OUT_BYTES)?;
        let launch = launch_command(
            BUILTIN_MODULE,
            "fill_u32",
            [1, 1, 1],
            [32, 1, 1],
            vec![Param::Buffer(out), Param::u32(7), Param::u32(1)],
        );
        guest.launch_prepared(&launch)?;
        guest.sync()?;
        Ok((guest, launch))
    }
}
