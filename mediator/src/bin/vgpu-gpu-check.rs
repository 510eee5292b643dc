// SPDX-License-Identifier: Apache-2.0
//! `vgpu-gpu-check`: drives the whole mediator stack on a real GPU the way a guest would,
//! checks every result against the CPU references, and times the mediated path against
//! native CUDA calls made in the same process.
//!
//! The mediator runs on the executor factory `select(ExecutorChoice::Cuda)` returns, as
//! the service does: each session's executor in its own `vgpu-executor-worker` process
//! (found through `VGPU_EXECUTOR_WORKER`, beside this binary, or on `PATH`). The direct
//! executor checks and the native comparisons use CUDA in this process.
//!
//! Every check prints `PASS <name>: ...`, `FAIL <name>: <why>` or `SKIP <name>: <why>`;
//! the timing table comes last. Exits 1 when any check fails.

use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use vgpu_kernels::{reference, KernelSpec, CATALOG};
use vgpu_mediator::check::{
    blocks, describe, expect_ok, expect_status, f32_bytes, launch_command, median, ptx_header, us,
    Answers, Guest, Rng,
};
use vgpu_mediator::cuda::{self, CudaExecutorFactory};
use vgpu_mediator::executor::{ExecParam, Executor, KernelRef};
use vgpu_mediator::process::ProcessExecutorFactory;
use vgpu_mediator::sandbox::Sandbox;
use vgpu_mediator::{
    select, ExecutorChoice, ExecutorFactory, Limits, Mediator, TenantConfig, TenantId,
};
use vgpu_protocol::{
    Command, ExecutorKind, InfoReply, Param, Request, SelftestKind, Status, BUILTIN_MODULE,
};

#[derive(Parser)]
#[command(
    name = "vgpu-gpu-check",
    version,
    about = "End-to-end checks and timings of the vGPU mediator on a CUDA device",
    long_about = "Runs the CUDA sanity gate, every built-in kernel on fresh random inputs, a \
                  guest PTX module, the sticky-error isolation between tenants, the error \
                  paths and the device memory quotas (measured against the device) through \
                  the mediator (each session's executor in its own \
                  vgpu-executor-worker process, found through $VGPU_EXECUTOR_WORKER, beside \
                  this binary or on $PATH), then times the mediated path against native CUDA \
                  in the same process. Prints PASS/FAIL/SKIP lines, then the timing table; \
                  exits 1 if any check fails."
)]
struct Args {
    /// Smaller inputs and fewer timing runs.
    #[arg(long)]
    quick: bool,
    /// Seed for the random inputs (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Timed runs per measurement (default 1000 for launches and 200 for copies; --quick: 200 and 20).
    #[arg(long)]
    runs: Option<usize>,
}

/// Poisoned elements after every output, which no kernel may touch.
const GUARD: usize = 256;
/// A quiet NaN with a payload no arithmetic produces: an unwritten float output.
const POISON_F32: u32 = 0x7fc0_dead;
/// An unwritten 32-bit integer output.
const POISON_U32: u32 = 0xdead_beef;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// What vm-errors may hold besides its session's context.
const ERRORS_QUOTA: u64 = 64 << 20;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut report = Report::default();
    let mut table = Table::default();
    run(&args, seed, &mut report, &mut table);

    println!(
        "SUMMARY: {} passed, {} failed, {} skipped (seed {seed})",
        report.passed, report.failed, report.skipped
    );
    print_table(&table);
    if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(args: &Args, seed: u64, report: &mut Report, table: &mut Table) {
    match cuda::sanity() {
        Ok(line) => report.pass("sanity", line),
        Err(why) => return report.fail("sanity", why.to_string()),
    }
    let factory = match CudaExecutorFactory::new(0) {
        Ok(f) => Arc::new(f),
        Err(why) => return report.fail("factory", why.to_string()),
    };
    report.pass(
        "factory",
        format!(
            "{}; catalog compiled in {:.1} ms; guest kernel parameters checked ({})",
            vgpu_mediator::selftest::device_line(factory.device()),
            ms(factory.compile_time()),
            factory.module_param_source(),
        ),
    );
    table.device = factory.device().name.clone();
    let header = ptx_header(factory.catalog_ptx());
    let guest_ptx = format!("{header}{GUEST_KERNELS}");
    let mut rng = Rng(seed);

    executor_checks(report, &factory, &header, &mut rng);

    // The mediator gets what the service gets: executors in worker processes.
    let mediated = match select(ExecutorChoice::Cuda) {
        Ok(f) => f,
        Err(why) => return report.fail("select", why.to_string()),
    };
    match mediated.worker_process() {
        Some(worker) => {
            table.isolation = "each session's executor in its own worker process".into();
            // One worker of the same kind, asked whether the driver page-locked its
            // staging area (copies through it are then pinned).
            // Confined as the mediator's own workers are (see `select`).
            let probe = ProcessExecutorFactory::cuda(0, &factory).map(|f| {
                let sandbox = Sandbox {
                    max_data_bytes: Some(vgpu_mediator::executor::DEFAULT_WORKER_MAX_MEMORY),
                    ..f.sandbox().clone()
                };
                f.with_worker(worker).with_sandbox(sandbox)
            });
            let spawned = probe.map_err(|e| e.to_string()).and_then(|f| {
                f.spawn()
                    .map(|w| (w, f.sandbox().clone()))
                    .map_err(|e| e.to_string())
            });
            match &spawned {
                Ok((w, sandbox)) => sandbox_check(report, w.pid(), sandbox),
                Err(e) => report.fail("worker-sandbox", format!("no worker started: {e}")),
            }
            let staging = spawned.map_or_else(
                |e| format!("staging area unknown ({e})"),
                |(w, _)| {
                    if w.staging_pinned() {
                        "staging area page-locked (cuMemHostRegister)".into()
                    } else {
                        "staging area NOT page-locked: copies run from pageable memory".into()
                    }
                },
            );
            report.pass(
                "isolation-mode",
                format!(
                    "each session's executor runs in its own worker process ({}); {staging}",
                    worker.display()
                ),
            );
        }
        None => {
            table.isolation = "all executors in this process (NOT isolated)".into();
            report.fail(
                "isolation-mode",
                "no executor worker process (see the warning above): every tenant runs in \
                 this process, so one faulting kernel fails them all",
            );
        }
    }

    let mediator = Mediator::new(mediated.clone());
    let m = &*mediator;
    // Every session's context is charged to its VM: each quota has room for the sessions
    // the checks open at once (a context each) besides what they allocate.
    let context = factory.context_bytes();
    let quota = |gib: u64, sessions: u64| gib * GIB + sessions * context;
    let tenant = |name: &str, mem_quota: u64| {
        m.add_tenant(TenantConfig {
            name: name.into(),
            mem_quota,
            weight: 1,
        })
        .map_err(|e| format!("add_tenant {name}: {e}"))
    };
    // vm-huge's quota exceeds the device, so its big ALLOC reaches cuMemAlloc.
    let huge_quota = factory.device().total_memory.saturating_mul(4);
    let (main, good, fault, errs, huge) = match (|| {
        Ok::<_, String>((
            tenant("vm-main", quota(8, 8))?,
            tenant("vm-good", quota(2, 4))?,
            tenant("vm-fault", quota(2, 4))?,
            tenant("vm-errors", context + ERRORS_QUOTA)?,
            tenant("vm-huge", huge_quota)?,
        ))
    })() {
        Ok(t) => t,
        Err(why) => return report.fail("tenants", why),
    };

    check(report, "info", || info_check(m, main, mediated.as_ref()));
    check(report, "selftest-vector-add", || selftest_check(m, main));
    for spec in CATALOG {
        let name = format!("kernel {}", spec.name);
        let mut kernel_rng = Rng(rng.next_u64());
        match builtin_check(spec, args.quick) {
            Some(kernel_check) => check(report, &name, || {
                kernel_check(m, main, spec, &mut kernel_rng)
            }),
            None => report.skip(&name, "no check written for this catalog kernel"),
        }
    }
    check(report, "guest-ptx-module", || {
        guest_module_check(m, main, &guest_ptx, &mut rng, args.quick)
    });
    check(report, "guest-ptx-param-check", || {
        param_check(m, main, &guest_ptx)
    });
    sticky_checks(report, m, fault, good, &header, &mut rng);
    session_isolation_checks(report, m, good, &header, &mut rng);
    error_checks(report, m, errs, huge, &factory, &guest_ptx, &mut rng);

    for id in [good, fault, errs, huge] {
        m.remove_tenant(id);
    }
    quota_checks(
        report,
        &factory,
        mediated.worker_process(),
        &header,
        &mut rng,
    );
    timings(
        args, m, main, &factory, &mediated, &guest_ptx, table, report,
    );
}

// ---------------------------------------------------------------------------------------
// Reporting

#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Report {
    fn pass(&mut self, name: &str, detail: impl AsRef<str>) {
        self.passed += 1;
        println!("PASS {name}: {}", detail.as_ref());
    }

    fn fail(&mut self, name: &str, why: impl AsRef<str>) {
        self.failed += 1;
        println!("FAIL {name}: {}", why.as_ref());
    }

    fn skip(&mut self, name: &str, why: impl AsRef<str>) {
        self.skipped += 1;
        println!("SKIP {name}: {}", why.as_ref());
    }
}

/// Runs one check; a panic inside it is a failure of that check, not of the run.
fn check(report: &mut Report, name: &str, f: impl FnOnce() -> Result<String, String>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(detail)) => report.pass(name, detail),
        Ok(Err(why)) => report.fail(name, why),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            report.fail(name, format!("panicked: {why}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inputs and comparisons

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn as_f32(w: &[u32]) -> Vec<f32> {
    w.iter().map(|&w| f32::from_bits(w)).collect()
}

/// The elements past `n` still hold `poison`: the kernel wrote nothing out of range.
fn guard_intact(out: &[u32], n: usize, poison: u32) -> Result<(), String> {
    match out[n..].iter().position(|&w| w != poison) {
        None => Ok(()),
        Some(i) => Err(format!(
            "wrote past the end: element {} = {:#010x}",
            n + i,
            out[n + i]
        )),
    }
}

/// Compares a GPU result with the reference. Exact kernels (tolerance 0) must match bit
/// for bit up to NaN payloads; otherwise `|g - r| <= tol * scale`, with `scale` the
/// kernel's error scale or `|r|`. Reports the largest relative error.
fn compare(got: &[f32], want: &[f32], tol: f32, scale: Option<f64>) -> Result<String, String> {
    if got.len() != want.len() {
        return Err(format!("{} results for {} expected", got.len(), want.len()));
    }
    let mut mismatches = 0usize;
    let mut first_bad = None;
    let mut max_rel = 0f64;
    for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
        let exact = g == r || (g.is_nan() && r.is_nan());
        let diff = (f64::from(g) - f64::from(r)).abs();
        let denom = scale
            .unwrap_or_else(|| f64::from(r.abs()))
            .max(f64::from(f32::MIN_POSITIVE));
        let rel = if exact {
            0.0
        } else if diff.is_nan() {
            f64::INFINITY
        } else {
            diff / denom
        };
        max_rel = max_rel.max(rel);
        let ok = exact || (tol > 0.0 && rel <= f64::from(tol));
        if !ok {
            mismatches += 1;
            first_bad.get_or_insert((i, g, r));
        }
    }
    match first_bad {
        None => Ok(format!(
            "{} elements, max rel err {max_rel:.3e} (tolerance {tol:e})",
            got.len()
        )),
        Some((i, g, r)) => Err(format!(
            "{mismatches} of {} elements wrong (first at {i}: got {g:e} [{:#010x}], want {r:e}); \
             max rel err {max_rel:.3e}, tolerance {tol:e}",
            got.len(),
            g.to_bits()
        )),
    }
}

/// A buffer holding `data`, followed (with `guard`) by `GUARD` elements of `POISON_F32`.
fn fresh_f32(g: &Guest, data: &[f32], guard: bool) -> Result<u64, String> {
    let elems = data.len() + if guard { GUARD } else { 0 };
    let h = g.alloc(elems as u64 * 4)?;
    if guard {
        g.memset32(h, 0, elems as u64 * 4, POISON_F32)?;
    }
    g.htod(h, 0, f32_bytes(data))?;
    Ok(h)
}

/// An output of `n` 32-bit elements plus guard, all set to `poison`.
fn poisoned(g: &Guest, n: usize, poison: u32) -> Result<u64, String> {
    let bytes = (n + GUARD) as u64 * 4;
    let h = g.alloc(bytes)?;
    g.memset32(h, 0, bytes, poison)?;
    Ok(h)
}

fn read_words(g: &Guest, h: u64, n: usize) -> Result<Vec<u32>, String> {
    Ok(words(&g.dtoh(h, 0, (n + GUARD) as u64 * 4)?))
}

/// Adds `a + b` for `n` fresh elements and checks the result: the tenant is working.
fn vector_add_works(g: &Guest, rng: &mut Rng, n: usize) -> Result<String, String> {
    let a = rng.f32s(n, -100.0, 100.0);
    let b = rng.f32s(n, -100.0, 100.0);
    let (da, db, dc) = (
        fresh_f32(g, &a, false)?,
        fresh_f32(g, &b, false)?,
        poisoned(g, n, POISON_F32)?,
    );
    let params = vec![
        Param::Buffer(da),
        Param::Buffer(db),
        Param::Buffer(dc),
        Param::u32(n as u32),
    ];
    g.launch(
        BUILTIN_MODULE,
        "vector_add_f32",
        [blocks(n, 256), 1, 1],
        [256, 1, 1],
        params,
    )?;
    let out = read_words(g, dc, n)?;
    let mut want = vec![0.0; n];
    reference::vector_add_f32(&a, &b, &mut want);
    guard_intact(&out, n, POISON_F32)?;
    let got = as_f32(&out[..n]);
    compare(&got, &want, 0.0, None).map(|_| format!("vector add of {n} correct"))
}

// ---------------------------------------------------------------------------------------
// Checks

fn info_check(
    m: &Mediator,
    tenant: TenantId,
    factory: &dyn ExecutorFactory,
) -> Result<String, String> {
    let r = m.call(tenant, Request::new(0, Command::Info));
    expect_ok(&r, "INFO")?;
    let info = InfoReply::decode(&r.data).map_err(|e| format!("INFO reply: {e}"))?;
    let d = factory.device();
    let c = &info.config;
    if c.executor != ExecutorKind::Cuda
        || (c.cc_major, c.cc_minor) != (d.cc_major, d.cc_minor)
        || c.multiprocessors != d.multiprocessors
    {
        return Err(format!("INFO disagrees with the device: {c:?}"));
    }
    Ok(format!(
        "'{}', cc {}.{}, {} SMs, quota {} MiB",
        c.name,
        c.cc_major,
        c.cc_minor,
        c.multiprocessors,
        c.mem_quota >> 20
    ))
}

fn selftest_check(m: &Mediator, tenant: TenantId) -> Result<String, String> {
    let r = m.call(
        tenant,
        Request::new(
            0,
            Command::Selftest {
                test: SelftestKind::VectorAdd,
            },
        ),
    );
    let message = String::from_utf8_lossy(&r.data).into_owned();
    expect_ok(&r, "SELFTEST").map_err(|e| format!("{e}: {message}"))?;
    if message.contains("PASSED") {
        Ok(message)
    } else {
        Err(message)
    }
}

type KernelCheck = fn(&Mediator, TenantId, &KernelSpec, &mut Rng) -> Result<String, String>;

/// The check for a catalog kernel, sized by `quick`.
fn builtin_check(spec: &KernelSpec, quick: bool) -> Option<KernelCheck> {
    Some(match (spec.name, quick) {
        ("vector_add_f32", false) => |m, t, s, r| check_vector_add(m, t, s, r, 1_000_000),
        ("vector_add_f32", true) => |m, t, s, r| check_vector_add(m, t, s, r, 100_000),
        ("saxpy_f32", false) => |m, t, s, r| check_saxpy(m, t, s, r, 1_000_000),
        ("saxpy_f32", true) => |m, t, s, r| check_saxpy(m, t, s, r, 100_000),
        ("scale_f32", false) => |m, t, s, r| check_scale(m, t, s, r, 1_000_000),
        ("scale_f32", true) => |m, t, s, r| check_scale(m, t, s, r, 100_000),
        ("reduce_sum_f32", false) => |m, t, s, r| check_reduce(m, t, s, r, 1 << 20),
        ("reduce_sum_f32", true) => |m, t, s, r| check_reduce(m, t, s, r, 1 << 18),
        ("matmul_f32", false) => |m, t, s, r| check_matmul(m, t, s, r, (512, 384, 256)),
        ("matmul_f32", true) => |m, t, s, r| check_matmul(m, t, s, r, (200, 120, 72)),
        ("fill_u32", false) => |m, t, s, r| check_fill(m, t, s, r, 1_000_000),
        ("fill_u32", true) => |m, t, s, r| check_fill(m, t, s, r, 100_000),
        ("spin_us", _) => |m, t, s, _| check_spin(m, t, s, 2_000),
        _ => return None,
    })
}

fn check_vector_add(
    m: &Mediator,
    t: TenantId,
    spec: &KernelSpec,
    rng: &mut Rng,
    n: usize,
) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let a = rng.f32s(n, -100.0, 100.0);
    let b = rng.f32s(n, -100.0, 100.0);
    let (da, db, dc) = (
        fresh_f32(&g, &a, false)?,
        fresh_f32(&g, &b, false)?,
        poisoned(&g, n, POISON_F32)?,
    );
    let params = vec![
        Param::Buffer(da),
        Param::Buffer(db),
        Param::Buffer(dc),
        Param::u32(n as u32),
    ];
    g.launch(
        BUILTIN_MODULE,
        spec.name,
        [blocks(n, 256), 1, 1],
        [256, 1, 1],
        params,
    )?;
    g.sync()?;
    let out = read_words(&g, dc, n)?;
    guard_intact(&out, n, POISON_F32)?;
    let mut want = vec![0.0; n];
    reference::vector_add_f32(&a, &b, &mut want);
    let got = as_f32(&out[..n]);
    compare(&got, &want, spec.rel_tolerance(), None).map(|s| format!("n={n}: {s}"))
}

fn check_saxpy(
    m: &Mediator,
    t: TenantId,
    spec: &KernelSpec,
    rng: &mut Rng,
    n: usize,
) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let y = rng.f32s(n, -100.0, 100.0);
    let x = rng.f32s(n, -100.0, 100.0);
    let a = rng.f32_in(-4.0, 4.0);
    let (dy, dx) = (fresh_f32(&g, &y, true)?, fresh_f32(&g, &x, false)?);
    // A grid smaller than n: every thread walks several elements.
    let params = vec![
        Param::Buffer(dy),
        Param::Buffer(dx),
        Param::f32(a),
        Param::u32(n as u32),
    ];
    g.launch(BUILTIN_MODULE, spec.name, [1024, 1, 1], [256, 1, 1], params)?;
    g.sync()?;
    let out = read_words(&g, dy, n)?;
    guard_intact(&out, n, POISON_F32)?;
    let mut want = y.clone();
    reference::saxpy_f32(&mut want, &x, a);
    let got = as_f32(&out[..n]);
    compare(&got, &want, spec.rel_tolerance(), None).map(|s| format!("n={n}, a={a}: {s}"))
}

fn check_scale(
    m: &Mediator,
    t: TenantId,
    spec: &KernelSpec,
    rng: &mut Rng,
    n: usize,
) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let x = rng.f32s(n, -100.0, 100.0);
    let alpha = rng.f32_in(-3.0, 3.0);
    let dx = fresh_f32(&g, &x, true)?;
    // A 3-D grid of 3-D blocks: the kernel must flatten both.
    let params = vec![Param::Buffer(dx), Param::f32(alpha), Param::u32(n as u32)];
    g.launch(BUILTIN_MODULE, spec.name, [16, 4, 2], [64, 2, 2], params)?;
    g.sync()?;
    let out = read_words(&g, dx, n)?;
    guard_intact(&out, n, POISON_F32)?;
    let mut want = x.clone();
    reference::scale_f32(&mut want, alpha);
    let got = as_f32(&out[..n]);
    compare(&got, &want, spec.rel_tolerance(), None).map(|s| format!("n={n}, 3-D grid: {s}"))
}

fn check_reduce(
    m: &Mediator,
    t: TenantId,
    spec: &KernelSpec,
    rng: &mut Rng,
    n: usize,
) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let x = rng.f32s(n, -1.0, 1.0);
    let start = rng.f32_in(-1000.0, 1000.0);
    let dx = fresh_f32(&g, &x, false)?;
    let dout = poisoned(&g, 1, POISON_F32)?;
    g.htod(dout, 0, start.to_le_bytes().to_vec())?;
    let params = vec![Param::Buffer(dx), Param::Buffer(dout), Param::u32(n as u32)];
    g.launch(BUILTIN_MODULE, spec.name, [1024, 1, 1], [256, 1, 1], params)?;
    g.sync()?;
    let out = read_words(&g, dout, 1)?;
    guard_intact(&out, 1, POISON_F32)?;
    let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
    let want = (f64::from(start) + sum) as f32;
    let scale = f64::from(start.abs()) + x.iter().map(|&v| f64::from(v.abs())).sum::<f64>();
    compare(
        &[f32::from_bits(out[0])],
        &[want],
        spec.rel_tolerance(),
        Some(scale),
    )
    .map(|s| format!("n={n}, got {} want {want}: {s}", f32::from_bits(out[0])))
}

fn check_matmul(
    m: &Mediator,
    t: TenantId,
    spec: &KernelSpec,
    rng: &mut Rng,
    (rows, cols, inner): (usize, usize, usize),
) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let a = rng.f32s(rows * inner, -1.0, 1.0);
    let b = rng.f32s(inner * cols, -1.0, 1.0);
    let (da, db, dc) = (
        fresh_f32(&g, &a, false)?,
        fresh_f32(&g, &b, false)?,
        poisoned(&g, rows * cols, POISON_F32)?,
    );
    let params = vec![
        Param::Buffer(da),
        Param::Buffer(db),
        Param::Buffer(dc),
        Param::u32(rows as u32),
        Param::u32(cols as u32),
        Param::u32(inner as u32),
    ];
    g.launch(
        BUILTIN_MODULE,
        spec.name,
        [blocks(cols, 16), blocks(rows, 16), 1],
        [16, 16, 1],
        params,
    )?;
    g.sync()?;
    let out = read_words(&g, dc, rows * cols)?;
    guard_intact(&out, rows * cols, POISON_F32)?;
    let mut want = vec![0.0; rows * cols];
    reference::matmul_f32(&a, &b, &mut want, rows, cols, inner);
    let got = as_f32(&out[..rows * cols]);
    compare(&got, &want, spec.rel_tolerance(), None).map(|s| format!("{rows}x{cols}x{inner}: {s}"))
}

fn check_fill(
    m: &Mediator,
    t: TenantId,
    spec: &KernelSpec,
    rng: &mut Rng,
    n: usize,
) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let value = match rng.next_u64() as u32 {
        POISON_U32 => 0x1234_5678,
        v => v,
    };
    let dx = poisoned(&g, n, POISON_U32)?;
    let params = vec![Param::Buffer(dx), Param::u32(value), Param::u32(n as u32)];
    g.launch(BUILTIN_MODULE, spec.name, [120, 1, 1], [512, 1, 1], params)?;
    g.sync()?;
    let out = read_words(&g, dx, n)?;
    guard_intact(&out, n, POISON_U32)?;
    let mut want = vec![0u32; n];
    reference::fill_u32(&mut want, value);
    match out[..n].iter().zip(&want).position(|(g, w)| g != w) {
        None => Ok(format!("n={n}, value {value:#010x}: exact")),
        Some(i) => Err(format!(
            "element {i} = {:#010x}, want {value:#010x}",
            out[i]
        )),
    }
}

/// `spin_us` on the whole grid it allows: it lasts its duration and writes it.
fn check_spin(m: &Mediator, t: TenantId, spec: &KernelSpec, us: u32) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let out = poisoned(&g, 1, POISON_U32)?;
    let params = vec![Param::Buffer(out), Param::u32(us)];
    let started = Instant::now();
    g.launch(BUILTIN_MODULE, spec.name, [1024, 1, 1], [256, 1, 1], params)?;
    g.sync()?;
    let took = started.elapsed();
    let got = read_words(&g, out, 1)?;
    let fine = got[0] == us && took >= Duration::from_micros(u64::from(us));
    let what = format!(
        "{us} us on 1024 blocks of 256 threads: launch + SYNC {:.0} us, out[0] = {}",
        took.as_secs_f64() * 1e6,
        got[0]
    );
    if fine {
        Ok(what)
    } else {
        Err(what)
    }
}

/// Guest kernels in hand-written PTX, after a `.version`/`.target` header that suits the
/// device. `vgpu_check_axpy` uses `fma.rn.f32`, so `f32::mul_add` is its exact reference.
const GUEST_KERNELS: &str = r#"
.visible .entry vgpu_check_axpy(
	.param .u64 vgpu_axpy_y,
	.param .u64 vgpu_axpy_x,
	.param .f32 vgpu_axpy_a,
	.param .u32 vgpu_axpy_n
)
{
	.reg .pred 	%p<2>;
	.reg .b32 	%r<6>;
	.reg .f32 	%f<5>;
	.reg .b64 	%rd<8>;

	ld.param.u64 	%rd1, [vgpu_axpy_y];
	ld.param.u64 	%rd2, [vgpu_axpy_x];
	ld.param.f32 	%f1, [vgpu_axpy_a];
	ld.param.u32 	%r1, [vgpu_axpy_n];
	mov.u32 	%r2, %ctaid.x;
	mov.u32 	%r3, %ntid.x;
	mov.u32 	%r4, %tid.x;
	mad.lo.u32 	%r5, %r2, %r3, %r4;
	setp.ge.u32 	%p1, %r5, %r1;
	@%p1 bra 	VGPU_AXPY_DONE;
	cvta.to.global.u64 	%rd3, %rd1;
	cvta.to.global.u64 	%rd4, %rd2;
	mul.wide.u32 	%rd5, %r5, 4;
	add.s64 	%rd6, %rd3, %rd5;
	add.s64 	%rd7, %rd4, %rd5;
	ld.global.f32 	%f2, [%rd7];
	ld.global.f32 	%f3, [%rd6];
	fma.rn.f32 	%f4, %f1, %f2, %f3;
	st.global.f32 	[%rd6], %f4;
VGPU_AXPY_DONE:
	ret;
}

.visible .entry vgpu_check_empty()
{
	ret;
}
"#;

/// A kernel that executes `trap`: the context it runs in faults.
const TRAP_KERNEL: &str = r#"
.visible .entry vgpu_check_trap()
{
	trap;
	ret;
}
"#;

/// Kernels a hostile guest program would write: one stores the device address of a
/// buffer it was given (a program can learn its own buffers' addresses), one copies
/// `n` words from any address it is handed into its output.
const PEEK_KERNELS: &str = r#"
.visible .entry vgpu_check_addr(
	.param .u64 vgpu_addr_out,
	.param .u64 vgpu_addr_buf
)
{
	.reg .b64 	%rd<4>;

	ld.param.u64 	%rd1, [vgpu_addr_out];
	ld.param.u64 	%rd2, [vgpu_addr_buf];
	cvta.to.global.u64 	%rd3, %rd1;
	st.global.u64 	[%rd3], %rd2;
	ret;
}

.visible .entry vgpu_check_peek(
	.param .u64 vgpu_peek_out,
	.param .u64 vgpu_peek_addr,
	.param .u32 vgpu_peek_n
)
{
	.reg .pred 	%p<2>;
	.reg .b32 	%r<7>;
	.reg .b64 	%rd<7>;

	ld.param.u64 	%rd1, [vgpu_peek_out];
	ld.param.u64 	%rd2, [vgpu_peek_addr];
	ld.param.u32 	%r1, [vgpu_peek_n];
	mov.u32 	%r2, %ctaid.x;
	mov.u32 	%r3, %ntid.x;
	mov.u32 	%r4, %tid.x;
	mad.lo.u32 	%r5, %r2, %r3, %r4;
	setp.ge.u32 	%p1, %r5, %r1;
	@%p1 bra 	VGPU_PEEK_DONE;
	cvta.to.global.u64 	%rd3, %rd1;
	mul.wide.u32 	%rd4, %r5, 4;
	add.s64 	%rd5, %rd3, %rd4;
	add.s64 	%rd6, %rd2, %rd4;
	ld.u32 	%r6, [%rd6];
	st.global.u32 	[%rd5], %r6;
VGPU_PEEK_DONE:
	ret;
}
"#;

/// Words the peek kernel copies.
const PEEK_WORDS: usize = 1024;

/// What a session got when its kernel read `addr`: an error (the address means nothing
/// in its context), or words that must not be the secret.
fn peek(g: &Guest, module: u64, addr: u64, secret: &[u8]) -> Result<String, String> {
    let out = g.alloc((PEEK_WORDS * 4) as u64)?;
    g.memset32(out, 0, (PEEK_WORDS * 4) as u64, POISON_U32)?;
    let launch = g.call(launch_command(
        module,
        "vgpu_check_peek",
        [blocks(PEEK_WORDS, 256), 1, 1],
        [256, 1, 1],
        vec![
            Param::Buffer(out),
            Param::Value(addr.to_le_bytes().to_vec()),
            Param::u32(PEEK_WORDS as u32),
        ],
    ));
    let sync = g.call(Command::Sync);
    if launch.status != Status::Ok {
        return Ok(format!("the launch was refused: {}", describe(&launch)));
    }
    if sync.status != Status::Ok {
        return Ok(format!("SYNC -> {}", describe(&sync)));
    }
    let got = g.dtoh(out, 0, (PEEK_WORDS * 4) as u64)?;
    if got == secret[..got.len()] {
        return Err(format!("the kernel read the secret at {addr:#x}"));
    }
    Err(format!(
        "no error: the kernel read {addr:#x} and got other bytes ({:02x?}...); expected an \
         error",
        &got[..8]
    ))
}

/// A guest program hands its kernel a device pointer of another session of the same VM,
/// and the host address of memory its session does not own: each gets an error, never
/// the data, and the victim works on.
fn session_isolation_checks(
    report: &mut Report,
    m: &Mediator,
    tenant: TenantId,
    header: &str,
    rng: &mut Rng,
) {
    let ptx = format!("{header}{PEEK_KERNELS}");
    let secret: Vec<u8> = (0..PEEK_WORDS * 4)
        .map(|_| rng.next_u64() as u8 | 1)
        .collect();
    let setup = (|| {
        let victim = Guest::open(m, tenant)?;
        // A large allocation first, so that the secret's address lies past anything the
        // attacker's context maps at the same addresses.
        let _gap = victim.alloc(64 << 20)?;
        let buf = victim.alloc(secret.len() as u64)?;
        victim.htod(buf, 0, secret.clone())?;
        let module = victim.load(&ptx)?;
        let slot = victim.alloc(8)?;
        victim.launch(
            module,
            "vgpu_check_addr",
            [1, 1, 1],
            [1, 1, 1],
            vec![Param::Buffer(slot), Param::Buffer(buf)],
        )?;
        victim.sync()?;
        let addr = u64::from_le_bytes(victim.dtoh(slot, 0, 8)?.try_into().expect("8 bytes"));
        // The kernel reads the secret through that address in its own session.
        let own = peek(&victim, module, addr, &secret);
        match own {
            Err(e) if e.contains("read the secret") => {}
            other => {
                return Err(format!(
                    "own-address read did not see the secret: {other:?}"
                ))
            }
        }
        Ok::<_, String>((victim, buf, addr))
    })();
    let (victim, buf, addr) = match setup {
        Ok(s) => s,
        Err(why) => return report.fail("session-isolation-setup", why),
    };
    check(report, "session-isolation-device-pointer", || {
        let attacker = Guest::open(m, tenant)?;
        let module = attacker.load(&ptx)?;
        peek(&attacker, module, addr, &secret).map(|what| {
            format!(
                "a kernel of another session of the same VM handed the victim's device pointer {addr:#x}: {what}"
            )
        })
    });
    // Host memory of the mediator's process that holds the VM's data (the analogue of
    // the backend's mapping of guest RAM): no session's context may reach it.
    let host = secret.clone();
    let host_addr = host.as_ptr() as u64;
    check(report, "session-isolation-host-address", || {
        let attacker = Guest::open(m, tenant)?;
        let module = attacker.load(&ptx)?;
        peek(&attacker, module, host_addr, &host).map(|what| {
            format!("a kernel handed the host address {host_addr:#x} of VM data: {what}")
        })
    });
    check(report, "session-isolation-victim-intact", || {
        let back = victim.dtoh(buf, 0, secret.len() as u64)?;
        if back != secret {
            return Err("the victim's buffer changed".into());
        }
        vector_add_works(&victim, rng, 1 << 20)
            .map(|ok| format!("the victim session works on: {ok}"))
    });
    drop(host);
}

fn guest_module_check(
    m: &Mediator,
    t: TenantId,
    ptx: &str,
    rng: &mut Rng,
    quick: bool,
) -> Result<String, String> {
    let n = if quick { 100_000 } else { 1_000_000 };
    let g = Guest::open(m, t)?;
    let module = g.load(ptx)?;
    let y = rng.f32s(n, -100.0, 100.0);
    let x = rng.f32s(n, -100.0, 100.0);
    let a = rng.f32_in(-4.0, 4.0);
    let (dy, dx) = (fresh_f32(&g, &y, true)?, fresh_f32(&g, &x, false)?);
    let params = vec![
        Param::Buffer(dy),
        Param::Buffer(dx),
        Param::f32(a),
        Param::u32(n as u32),
    ];
    g.launch(
        module,
        "vgpu_check_axpy",
        [blocks(n, 256), 1, 1],
        [256, 1, 1],
        params,
    )?;
    g.sync()?;
    let out = read_words(&g, dy, n)?;
    guard_intact(&out, n, POISON_F32)?;
    let want: Vec<f32> = y.iter().zip(&x).map(|(&y, &x)| a.mul_add(x, y)).collect();
    let got = as_f32(&out[..n]);
    compare(&got, &want, 0.0, None).map(|s| format!("hand-written PTX axpy, n={n}: {s}"))
}

/// A CUDA worker runs confined: no_new_privs, the seccomp filter, and (when the mediator
/// runs as root) not as root.
fn sandbox_check(report: &mut Report, pid: u32, sandbox: &Sandbox) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let (uid, nnp, seccomp, filters, caps) = (
        field("Uid"),
        field("NoNewPrivs"),
        field("Seccomp"),
        field("Seccomp_filters"),
        field("CapEff"),
    );
    // SAFETY: no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let seccomp_wanted = sandbox.seccomp;
    let what = format!(
        "worker {pid}: Uid {uid}, CapEff {caps}, NoNewPrivs {nnp}, Seccomp {seccomp} \
         ({filters} filters); {}",
        sandbox.describe()
    );
    let root_uid = uid.split_whitespace().any(|u| u == "0");
    let no_caps = caps.trim_start_matches('0').is_empty();
    if nnp != "1" || !no_caps || (seccomp_wanted && seccomp != "2") || (as_root && root_uid) {
        report.fail("worker-sandbox", what);
    } else {
        report.pass("worker-sandbox", what);
    }
}

fn param_check(m: &Mediator, t: TenantId, ptx: &str) -> Result<String, String> {
    let g = Guest::open(m, t)?;
    let module = g.load(ptx)?;
    let buf = g.alloc(4096)?;
    let launch = |params: Vec<Param>| {
        g.call(launch_command(
            module,
            "vgpu_check_axpy",
            [1, 1, 1],
            [32, 1, 1],
            params,
        ))
    };
    let too_few = launch(vec![
        Param::Buffer(buf),
        Param::Buffer(buf),
        Param::f32(1.0),
    ]);
    let wrong_size = launch(vec![
        Param::Buffer(buf),
        Param::Buffer(buf),
        Param::u64(1),
        Param::u32(8),
    ]);
    let a = expect_status(&too_few, Status::InvalidArgument, "3 of 4 parameters")?;
    let b = expect_status(
        &wrong_size,
        Status::InvalidArgument,
        "8-byte value for an f32",
    )?;
    if (too_few.detail, wrong_size.detail) != (3, 2) {
        return Err(format!(
            "details {} and {}, expected parameter indices 3 and 2",
            too_few.detail, wrong_size.detail
        ));
    }
    g.sync()?;
    Ok(format!("{a}; {b}; session still usable"))
}

/// A kernel that traps in one session: it reports the fault, the VM's other session (its
/// own worker process) keeps its data, a new session works, and another tenant stays
/// correct before, during and after.
fn sticky_checks(
    report: &mut Report,
    m: &Mediator,
    fault: TenantId,
    good: TenantId,
    header: &str,
    rng: &mut Rng,
) {
    let n = 1 << 20;
    let setup = (|| {
        let other = Guest::open(m, good)?;
        let sibling = Guest::open(m, fault)?;
        let buf = sibling.alloc(1 << 20)?;
        sibling.htod(buf, 0, vec![0x5a; 1 << 20])?;
        let faulting = Guest::open(m, fault)?;
        let module = faulting.load(&format!("{header}{TRAP_KERNEL}"))?;
        Ok::<_, String>((other, sibling, buf, faulting, module))
    })();
    let (other, sibling, buf, faulting, module) = match setup {
        Ok(s) => s,
        Err(why) => return report.fail("sticky-setup", why),
    };
    check(report, "isolation-before", || {
        vector_add_works(&other, rng, n)
    });
    let r = faulting.call(launch_command(
        module,
        "vgpu_check_trap",
        [1, 1, 1],
        [1, 1, 1],
        vec![],
    ));
    check(report, "sticky-launch-accepted", || {
        expect_status(&r, Status::Ok, "LAUNCH of a trapping kernel")
    });
    check(report, "isolation-during", || {
        vector_add_works(&other, rng, n)
    });
    let sync = faulting.call(Command::Sync);
    check(report, "sticky-sync-fails", || {
        expect_status(&sync, Status::LaunchFailed, "SYNC after the trap")
    });
    let next = faulting.call(Command::Alloc { size: 4096 });
    check(report, "sticky-persists", || {
        if next.status == sync.status && next.detail == sync.detail {
            Ok(format!("the next ALLOC -> {}", describe(&next)))
        } else {
            Err(format!(
                "the next ALLOC returned {}, SYNC returned {}",
                describe(&next),
                describe(&sync)
            ))
        }
    });
    check(report, "isolation-after", || {
        vector_add_works(&other, rng, n)
    });
    check(report, "sibling-session-unaffected", || {
        // Its own context in its own worker: the fault never reached it.
        let data = sibling.dtoh(buf, 0, 16)?;
        if data == [0x5a; 16] {
            Ok("the same VM's other session reads its buffer back intact".into())
        } else {
            Err(format!("the other session's buffer changed: {data:02x?}"))
        }
    });
    check(report, "tenant-restarted", || {
        let fresh = Guest::open(m, fault)?;
        let ok = vector_add_works(&fresh, rng, n)?;
        let restarts = m.usage(fault).map_or(0, |u| u.restarts);
        Ok(format!(
            "a new session on the faulted tenant: {ok}; tenant restarts: {restarts}"
        ))
    });
    check(report, "isolation-final", || {
        vector_add_works(&other, rng, n)
    });
}

fn error_checks(
    report: &mut Report,
    m: &Mediator,
    errs: TenantId,
    big: TenantId,
    factory: &CudaExecutorFactory,
    ptx: &str,
    rng: &mut Rng,
) {
    let g = match Guest::open(m, errs) {
        Ok(g) => g,
        Err(why) => return report.fail("errors-setup", why),
    };
    check(report, "error-quota-exceeded", || {
        expect_status(
            &g.call(Command::Alloc {
                size: ERRORS_QUOTA + MIB,
            }),
            Status::QuotaExceeded,
            "ALLOC of 65 MiB on a quota of its context and 64 MiB",
        )
    });
    check(report, "error-bad-handle", || {
        let a = expect_status(
            &g.call(Command::Free {
                handle: 0xdead_0000,
            }),
            Status::InvalidHandle,
            "FREE of a made-up handle",
        )?;
        let b = expect_status(
            &g.call(Command::Dtoh {
                src: 0xdead_0000,
                offset: 0,
                len: 4,
            }),
            Status::InvalidHandle,
            "DTOH from a made-up handle",
        )?;
        Ok(format!("{a}; {b}"))
    });
    check(report, "error-out-of-range", || {
        let h = g.alloc(4096)?;
        expect_status(
            &g.call(Command::Dtoh {
                src: h,
                offset: 4000,
                len: 200,
            }),
            Status::OutOfRange,
            "DTOH past the end",
        )
    });
    check(report, "error-bad-ptx", || {
        let bad = format!("{}\nthis is not PTX;\n", ptx_header(factory.catalog_ptx()));
        expect_status(
            &g.call(Command::ModuleLoad { ptx: bad }),
            Status::ModuleInvalid,
            "MODULE_LOAD of bad PTX",
        )
    });
    check(report, "error-unknown-builtin", || {
        let r = g.call(launch_command(
            BUILTIN_MODULE,
            "no_such_kernel",
            [1, 1, 1],
            [1, 1, 1],
            vec![],
        ));
        expect_status(&r, Status::KernelNotFound, "LAUNCH of an unknown built-in")
    });
    check(report, "error-unknown-module-kernel", || {
        let module = g.load(ptx)?;
        let r = g.call(launch_command(
            module,
            "no_such_kernel",
            [1, 1, 1],
            [1, 1, 1],
            vec![],
        ));
        expect_status(
            &r,
            Status::KernelNotFound,
            "LAUNCH of a name the module lacks",
        )
    });
    check(report, "error-out-of-memory", || {
        let huge = Guest::open(m, big)?;
        let size = factory.device().total_memory * 2;
        let r = huge.call(Command::Alloc { size });
        let s = expect_status(
            &r,
            Status::OutOfMemory,
            &format!("ALLOC of {} GiB", size >> 30),
        )?;
        Ok(format!("{s}; then {}", vector_add_works(&huge, rng, 4096)?))
    });
    check(report, "errors-not-sticky", || {
        vector_add_works(&g, rng, 1 << 16).map(|s| format!("after all the errors: {s}"))
    });
}

// ---------------------------------------------------------------------------------------
// Quotas against the device

/// A module with a 4 MiB `__device__` array and a kernel that writes both ends of it.
const BIG_GLOBAL_KERNEL: &str = r#"
.visible .global .align 4 .b8 vgpu_check_big[4194304];

.visible .entry vgpu_check_touch_big(
	.param .u32 vgpu_touch_value
)
{
	.reg .b32 	%r<2>;

	ld.param.u32 	%r1, [vgpu_touch_value];
	st.global.u32 	[vgpu_check_big], %r1;
	st.global.u32 	[vgpu_check_big+4194300], %r1;
	ret;
}
"#;

/// A kernel with `per_thread` bytes of local memory per thread (a `.local` array it
/// writes at index `i` and reads at index `j`, which the compiler cannot fold away).
fn local_kernel(per_thread: u64) -> String {
    let words = per_thread / 4;
    format!(
        r#"
.visible .entry vgpu_check_local(
	.param .u64 vgpu_local_out,
	.param .u32 vgpu_local_i,
	.param .u32 vgpu_local_j
)
{{
	.local .align 4 .b8 	vgpu_local_buf[{per_thread}];
	.reg .b32 	%r<6>;
	.reg .b64 	%rd<8>;

	ld.param.u64 	%rd1, [vgpu_local_out];
	ld.param.u32 	%r1, [vgpu_local_i];
	ld.param.u32 	%r2, [vgpu_local_j];
	rem.u32 	%r3, %r1, {words};
	rem.u32 	%r4, %r2, {words};
	mov.u64 	%rd2, vgpu_local_buf;
	mul.wide.u32 	%rd3, %r3, 4;
	add.s64 	%rd4, %rd2, %rd3;
	st.local.u32 	[%rd4], %r1;
	mul.wide.u32 	%rd5, %r4, 4;
	add.s64 	%rd6, %rd2, %rd5;
	ld.local.u32 	%r5, [%rd6];
	cvta.to.global.u64 	%rd7, %rd1;
	st.global.u32 	[%rd7], %r5;
	ret;
}}
"#
    )
}

/// The launch of [`local_kernel`]'s kernel, writing its word to `out`.
fn local_launch(module: u64, out: u64) -> Command {
    launch_command(
        module,
        "vgpu_check_local",
        [1, 1, 1],
        [32, 1, 1],
        vec![Param::Buffer(out), Param::u32(1), Param::u32(1)],
    )
}

/// A context of this process's own, current on this thread, for reading how much device
/// memory is free (`cuMemGetInfo`, device-wide).
struct FreeMemory {
    ctx: sys::CUcontext,
}

impl FreeMemory {
    fn new() -> Result<FreeMemory, String> {
        let device =
            cu::device::get(0).map_err(|e| format!("cuDeviceGet: {}", cuda::error_name(e.0)))?;
        let ctx = cuda::create_context(device)
            .map_err(|e| format!("cuCtxCreate: {}", cuda::error_name(e)))?;
        Ok(FreeMemory { ctx })
    }

    /// Free device memory now, after a moment for contexts of workers that exited to go.
    fn read(&self) -> Result<u64, String> {
        std::thread::sleep(Duration::from_millis(300));
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: `ctx` is live until drop; out-parameters.
        let r = unsafe {
            match sys::cuCtxSetCurrent(self.ctx) {
                sys::CUresult::CUDA_SUCCESS => sys::cuMemGetInfo_v2(&mut free, &mut total),
                r => r,
            }
        };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(free as u64)
        } else {
            Err(format!("cuMemGetInfo: {}", cuda::error_name(r)))
        }
    }
}

impl Drop for FreeMemory {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = sys::cuCtxDestroy_v2(self.ctx);
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Whether `charged` is within 5% of `measured` plus 64 MiB: how closely the quota
/// follows the device.
fn within_margin(charged: u64, measured: u64) -> (bool, i64, u64) {
    let allowed = measured / 20 + 64 * MIB;
    let margin = charged as i64 - measured as i64;
    (margin.unsigned_abs() <= allowed, margin, allowed)
}

/// A tenant of the quota checks' own mediator, removed (and all it holds freed) on drop.
struct QuotaVm<'a> {
    m: &'a Mediator,
    id: TenantId,
    quota: u64,
}

impl<'a> QuotaVm<'a> {
    fn new(m: &'a Mediator, name: &str, quota: u64) -> Result<QuotaVm<'a>, String> {
        let id = m
            .add_tenant(TenantConfig {
                name: name.into(),
                mem_quota: quota,
                weight: 1,
            })
            .map_err(|e| format!("add_tenant {name}: {e}"))?;
        Ok(QuotaVm { m, id, quota })
    }

    fn usage(&self) -> vgpu_mediator::TenantUsage {
        self.m.usage(self.id).unwrap_or_default()
    }

    fn open(&self) -> Result<Guest<'a>, String> {
        Guest::open(self.m, self.id)
    }

    /// What its usage says, part by part.
    fn charged(&self) -> String {
        let u = self.usage();
        format!(
            "mem_used {:.1} MiB (contexts {:.1}, buffers {:.1}, modules {:.1}, local {:.1})",
            mib(u.mem_used),
            mib(u.context_bytes),
            mib(u.buffer_bytes),
            mib(u.module_bytes),
            mib(u.local_bytes)
        )
    }
}

impl Drop for QuotaVm<'_> {
    fn drop(&mut self) {
        self.m.remove_tenant(self.id);
    }
}

/// The quotas count what a VM's work really takes on the device: each check runs on a
/// mediator of its own whose workers start only when a session opens (no pool refilling
/// in the background), and compares its VM's charges with the device's free memory.
fn quota_checks(
    report: &mut Report,
    factory: &Arc<CudaExecutorFactory>,
    worker: Option<&std::path::Path>,
    header: &str,
    rng: &mut Rng,
) {
    let executors: Arc<dyn ExecutorFactory> = match worker {
        Some(worker) => {
            match ProcessExecutorFactory::cuda(0, factory).map(|f| {
                let sandbox = Sandbox {
                    max_data_bytes: Some(vgpu_mediator::executor::DEFAULT_WORKER_MAX_MEMORY),
                    ..f.sandbox().clone()
                };
                f.with_worker(worker).with_sandbox(sandbox).with_pool(0)
            }) {
                Ok(f) => Arc::new(f),
                Err(e) => return report.fail("quota-setup", e.to_string()),
            }
        }
        None => factory.clone(),
    };
    let limits = Limits {
        max_buffers_per_session: 25_000,
        max_allocations: 25_000,
        max_modules_per_session: 256,
        ..Limits::default()
    };
    let qm = Mediator::with_limits(executors, limits);
    let meter = match FreeMemory::new() {
        Ok(m) => m,
        Err(e) => return report.fail("quota-setup", e),
    };
    let context = factory.context_bytes();
    let threads = factory.resident_threads();
    check(report, "quota-session-context", || {
        session_context_check(&qm, &meter, context, rng)
    });
    check(report, "quota-alloc-footprint", || {
        alloc_footprint_check(&qm, &meter, context)
    });
    check(report, "quota-module-globals", || {
        module_globals_check(&qm, &meter, context, header)
    });
    check(report, "quota-local-memory-refused", || {
        local_refused_check(&qm, &meter, context, threads, header, rng)
    });
    check(report, "quota-local-memory-charged", || {
        local_charged_check(&qm, &meter, context, threads, header)
    });
    check(report, "quota-matches-device", || {
        matches_device_check(&qm, &meter, context, header, rng)
    });
}

/// A session's context as charged against what opening it (and running a kernel in it)
/// took on the device.
fn session_context_check(
    qm: &Mediator,
    meter: &FreeMemory,
    context: u64,
    rng: &mut Rng,
) -> Result<String, String> {
    let vm = QuotaVm::new(qm, "vm-quota-context", context + GIB)?;
    let before = meter.read()?;
    let g = vm.open()?;
    let ok = vector_add_works(&g, rng, 4096)?;
    let after = meter.read()?;
    let grown = before.saturating_sub(after);
    let charged = vm.usage().mem_used;
    let (fine, margin, allowed) = within_margin(charged, grown);
    let what = format!(
        "one session ({ok}): {}; the device's used memory grew {:.1} MiB; margin {:+.1} MiB \
         (allowed +-{:.1}); a context is charged {:.1} MiB",
        vm.charged(),
        mib(grown),
        margin as f64 / MIB as f64,
        mib(allowed),
        mib(context)
    );
    if fine {
        Ok(what)
    } else {
        Err(what)
    }
}

/// Allocations of several sizes, many of each: what the device gives up for them against
/// what the quota charges ([`cuda::alloc_footprint`]).
fn alloc_footprint_check(
    qm: &Mediator,
    meter: &FreeMemory,
    context: u64,
) -> Result<String, String> {
    let vm = QuotaVm::new(qm, "vm-quota-alloc", context + 4 * GIB)?;
    let g = vm.open()?;
    let sizes: [(u64, usize); 7] = [
        (1, 20_000),
        (4096, 2_000),
        (64 << 10, 512),
        (MIB, 64),
        (MIB + 1, 64),
        (3 * MIB, 32),
        (64 * MIB + 1, 4),
    ];
    let mut lines = Vec::new();
    let mut short = Vec::new();
    for (size, n) in sizes {
        let before = meter.read()?;
        let handles = (0..n)
            .map(|_| g.alloc(size))
            .collect::<Result<Vec<_>, _>>()?;
        g.sync()?;
        let after = meter.read()?;
        let taken = before.saturating_sub(after);
        let charged = cuda::alloc_footprint(size) * n as u64;
        let buffers = vm.usage().buffer_bytes;
        for h in handles {
            g.ok(Command::Free { handle: h }, "FREE")?;
        }
        g.sync()?;
        lines.push(format!(
            "{size} B x {n}: device {:.0} B each, charged {} B each",
            taken as f64 / n as f64,
            cuda::alloc_footprint(size)
        ));
        if buffers != charged {
            short.push(format!(
                "{size} B x {n}: the VM's buffers are charged {buffers} B, the rule says {charged}"
            ));
        }
        // Whole pages are what the device's free memory moves by.
        if charged + cuda::DEVICE_PAGE_BYTES < taken {
            short.push(format!(
                "{size} B x {n}: the device gave up {taken} B, {charged} B were charged"
            ));
        }
    }
    let what = format!(
        "rule: up to {} B rounded to {} B, larger to {} MiB pages; {}",
        cuda::SMALL_ALLOC_BYTES,
        cuda::SMALL_ALLOC_GRANULE,
        cuda::DEVICE_PAGE_BYTES >> 20,
        lines.join("; ")
    );
    if short.is_empty() {
        Ok(what)
    } else {
        Err(format!("{}; {what}", short.join("; ")))
    }
}

/// Modules with a 4 MiB `__device__` array each, loaded until refused: the refusal comes
/// at the quota, and the device never gives the VM more than its quota.
fn module_globals_check(
    qm: &Mediator,
    meter: &FreeMemory,
    context: u64,
    header: &str,
) -> Result<String, String> {
    let vm = QuotaVm::new(qm, "vm-quota-modules", context + 256 * MIB)?;
    let ptx = format!("{header}{BIG_GLOBAL_KERNEL}");
    let before = meter.read()?;
    let g = vm.open()?;
    let mut loaded = 0u32;
    let refused = loop {
        let r = g.call(Command::ModuleLoad { ptx: ptx.clone() });
        if r.status != Status::Ok {
            break r;
        }
        loaded += 1;
        g.launch(
            r.value0,
            "vgpu_check_touch_big",
            [1, 1, 1],
            [1, 1, 1],
            vec![Param::u32(loaded)],
        )?;
        if loaded >= 200 {
            return Err(format!(
                "200 modules of 4 MiB loaded in a quota of {:.0} MiB: none refused; {}",
                mib(vm.quota),
                vm.charged()
            ));
        }
    };
    g.sync()?;
    let after = meter.read()?;
    let grown = before.saturating_sub(after);
    let u = vm.usage();
    let what = format!(
        "{loaded} modules with a 4 MiB __device__ array loaded and launched, the next -> {}; \
         {}; the device's used memory grew {:.1} MiB; quota {:.1} MiB (a context and 256 MiB)",
        describe(&refused),
        vm.charged(),
        mib(grown),
        mib(vm.quota)
    );
    if refused.status == Status::QuotaExceeded && u.mem_used <= vm.quota && grown <= vm.quota {
        Ok(what)
    } else {
        Err(what)
    }
}

/// A kernel with 256 KiB of local memory per thread, whose launch would make the driver
/// reserve tens of GiB: refused before it reaches the device, and the session works on.
fn local_refused_check(
    qm: &Mediator,
    meter: &FreeMemory,
    context: u64,
    threads: u64,
    header: &str,
    rng: &mut Rng,
) -> Result<String, String> {
    let per_thread = 256 << 10;
    let vm = QuotaVm::new(qm, "vm-quota-local", context + 256 * MIB)?;
    let g = vm.open()?;
    let module = g.load(&format!("{header}{}", local_kernel(per_thread)))?;
    let out = g.alloc(4)?;
    g.sync()?;
    let before = meter.read()?;
    let r = g.call(local_launch(module, out));
    g.sync()?;
    let after = meter.read()?;
    let grown = before.saturating_sub(after);
    let refused = expect_status(
        &r,
        Status::QuotaExceeded,
        "LAUNCH of a kernel with 256 KiB of local memory per thread",
    )?;
    let works = vector_add_works(&g, rng, 4096)?;
    let u = vm.usage();
    let what = format!(
        "{refused} (it would reserve {:.1} GiB: 256 KiB x {threads} resident threads); the \
         device's used memory grew {:.1} MiB meanwhile; local charged {:.1} MiB; the session \
         works on: {works}",
        cuda::local_footprint(per_thread, cuda::DEFAULT_STACK_BYTES, threads) as f64 / GIB as f64,
        mib(grown),
        mib(u.local_bytes)
    );
    if grown < 64 * MIB && u.local_bytes == 0 {
        Ok(what)
    } else {
        Err(what)
    }
}

/// A kernel with 16 KiB of local memory per thread, in a VM with room for it: what the
/// device reserves at its launch against what the VM is charged.
fn local_charged_check(
    qm: &Mediator,
    meter: &FreeMemory,
    context: u64,
    threads: u64,
    header: &str,
) -> Result<String, String> {
    let per_thread = 16 << 10;
    let reserve = cuda::local_footprint(per_thread, cuda::DEFAULT_STACK_BYTES, threads);
    let vm = QuotaVm::new(qm, "vm-quota-local-fits", context + reserve + GIB)?;
    let g = vm.open()?;
    let module = g.load(&format!("{header}{}", local_kernel(per_thread)))?;
    let out = g.alloc(4)?;
    g.sync()?;
    let before = meter.read()?;
    g.ok(local_launch(module, out), "LAUNCH")?;
    g.sync()?;
    // Launched again: the reservation is kept, not charged twice.
    g.ok(local_launch(module, out), "LAUNCH")?;
    g.sync()?;
    let after = meter.read()?;
    let grown = before.saturating_sub(after);
    let charged = vm.usage().local_bytes;
    let (fine, margin, allowed) = within_margin(charged, grown);
    let what = format!(
        "16 KiB of local memory per thread x {threads} resident threads: charged {:.1} MiB, \
         the device's used memory grew {:.1} MiB at its launches; margin {:+.1} MiB (allowed \
         +-{:.1})",
        mib(charged),
        mib(grown),
        margin as f64 / MIB as f64,
        mib(allowed)
    );
    if fine {
        Ok(what)
    } else {
        Err(what)
    }
}

/// Two sessions of one VM with buffers of many sizes, modules with globals and a kernel
/// with local memory: the VM's `mem_used` against how much the device's used memory grew
/// from before its first session.
fn matches_device_check(
    qm: &Mediator,
    meter: &FreeMemory,
    context: u64,
    header: &str,
    rng: &mut Rng,
) -> Result<String, String> {
    let vm = QuotaVm::new(qm, "vm-quota-total", 2 * context + 2 * GIB)?;
    let before = meter.read()?;
    let (a, b) = (vm.open()?, vm.open()?);
    let mut held = Vec::new();
    for _ in 0..1000 {
        held.push(a.alloc(1)?);
    }
    for _ in 0..16 {
        held.push(a.alloc(MIB)?);
    }
    for _ in 0..2 {
        let h = a.alloc(100 * MIB)?;
        a.memset32(h, 0, 100 * MIB, 7)?;
        held.push(h);
    }
    let big = a.load(&format!("{header}{BIG_GLOBAL_KERNEL}"))?;
    a.load(&format!("{header}{BIG_GLOBAL_KERNEL}"))?;
    a.launch(
        big,
        "vgpu_check_touch_big",
        [1, 1, 1],
        [1, 1, 1],
        vec![Param::u32(1)],
    )?;
    for _ in 0..3 {
        b.alloc(3 * MIB)?;
    }
    b.alloc(512 * MIB)?;
    let local = b.load(&format!("{header}{}", local_kernel(1 << 10)))?;
    let out = b.alloc(4)?;
    b.ok(local_launch(local, out), "LAUNCH")?;
    let works = vector_add_works(&b, rng, 1 << 16)?;
    a.sync()?;
    b.sync()?;
    let after = meter.read()?;
    let grown = before.saturating_sub(after);
    let used = vm.usage().mem_used;
    let (fine, margin, allowed) = within_margin(used, grown);
    let what = format!(
        "2 sessions, {} buffers, 3 modules, local memory ({works}): {}; the device's used \
         memory grew {:.1} MiB; margin {:+.1} MiB (allowed +-{:.1}: 5% + 64 MiB)",
        vm.usage().allocations,
        vm.charged(),
        mib(grown),
        margin as f64 / MIB as f64,
        mib(allowed)
    );
    drop((a, b));
    if fine {
        Ok(what)
    } else {
        Err(what)
    }
}

/// Direct calls on a `CudaExecutor`, below the mediator.
fn executor_checks(
    report: &mut Report,
    factory: &CudaExecutorFactory,
    header: &str,
    rng: &mut Rng,
) {
    let mut exec = match factory.create_executor() {
        Ok(e) => e,
        Err(e) => return report.fail("executor-create", e.to_string()),
    };
    check(report, "executor-copies-and-memset", || {
        let n = 1 << 16;
        let data: Vec<u8> = f32_bytes(&rng.f32s(n / 4, -1.0, 1.0));
        let s = exec.open_stream().map_err(|e| e.to_string())?;
        let result = (|| {
            let a = exec.alloc(n as u64)?;
            let b = exec.alloc(n as u64)?;
            exec.htod(s, a, 0, &data)?;
            exec.dtod(s, b, 0, a, 0, n as u64)?;
            exec.memset(s, b, 4096, 4096, 0xab, 1)?;
            exec.memset(s, b, 8192, 4096, POISON_U32, 4)?;
            let mut out = vec![0u8; n];
            exec.dtoh(s, b, 0, &mut out)?;
            exec.free(a);
            exec.free(b);
            Ok::<_, vgpu_mediator::ExecError>(out)
        })();
        exec.close_stream(s);
        let out = result.map_err(|e| e.to_string())?;
        let mut want = data.clone();
        want[4096..8192].fill(0xab);
        for w in want[8192..12288].chunks_exact_mut(4) {
            w.copy_from_slice(&POISON_U32.to_le_bytes());
        }
        match out.iter().zip(&want).position(|(a, b)| a != b) {
            None => Ok(format!(
                "{n} bytes: htod, dtod, memset width 1 and 4, dtoh exact"
            )),
            Some(i) => Err(format!("byte {i} = {:#04x}, want {:#04x}", out[i], want[i])),
        }
    });
    check(report, "executor-bad-ptx-log", || {
        match exec.load_module(&format!(
            "{header}\n.visible .entry broken() {{ bogus.instruction; }}\n"
        )) {
            Ok(_) => Err("bad PTX loaded".into()),
            Err(e) if e.status == Status::ModuleInvalid => {
                Ok(format!("MODULE_INVALID: {}", e.message))
            }
            Err(e) => Err(format!("expected MODULE_INVALID, got {e}")),
        }
    });
    check(report, "executor-ptx-nul", || {
        match exec.load_module(".version 8.0\0") {
            Err(e) if e.status == Status::ModuleInvalid => Ok(e.message),
            other => Err(format!("expected MODULE_INVALID, got {other:?}")),
        }
    });
    check(report, "executor-kernel-not-found", || {
        let module = exec
            .load_module(&format!("{header}{GUEST_KERNELS}"))
            .map_err(|e| e.to_string())?;
        let s = exec.open_stream().map_err(|e| e.to_string())?;
        let shape = vgpu_kernels::LaunchShape {
            grid: [1, 1, 1],
            block: [1, 1, 1],
            shared_bytes: 0,
        };
        let r = exec.launch(s, KernelRef::Module(module, "missing"), &shape, &[]);
        let empty = exec
            .launch(
                s,
                KernelRef::Module(module, "vgpu_check_empty"),
                &shape,
                &[],
            )
            .and_then(|()| exec.sync(s));
        exec.close_stream(s);
        exec.unload_module(module);
        empty.map_err(|e| format!("empty kernel: {e}"))?;
        match r {
            Err(e) if e.status == Status::KernelNotFound => Ok(e.message),
            other => Err(format!("expected KERNEL_NOT_FOUND, got {other:?}")),
        }
    });
    check(report, "executor-builtin-param-kinds", || {
        let spec = vgpu_kernels::find("fill_u32").ok_or("fill_u32 missing")?;
        let s = exec.open_stream().map_err(|e| e.to_string())?;
        let shape = vgpu_kernels::LaunchShape {
            grid: [1, 1, 1],
            block: [32, 1, 1],
            shared_bytes: 0,
        };
        let params = [
            ExecParam::Value(vec![0; 8]),
            ExecParam::Value(vec![0; 4]),
            ExecParam::Value(vec![0; 4]),
        ];
        let r = exec.launch(s, KernelRef::Builtin(spec), &shape, &params);
        exec.close_stream(s);
        match r {
            Err(e) if e.status == Status::InvalidArgument && e.detail == 0 => Ok(e.message),
            other => Err(format!(
                "expected INVALID_ARGUMENT for parameter 0, got {other:?}"
            )),
        }
    });
    if exec.poisoned() {
        report.fail(
            "executor-healthy",
            "the executor was poisoned by the checks above",
        );
    }
}

// ---------------------------------------------------------------------------------------
// Timings

#[derive(Default)]
struct Table {
    device: String,
    isolation: String,
    rows: Vec<Row>,
}

struct Row {
    metric: String,
    runs: usize,
    mediator: Option<f64>,
    native: Option<f64>,
    pinned: Option<f64>,
}

fn print_table(table: &Table) {
    let rows = &table.rows;
    if rows.is_empty() {
        return;
    }
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    println!();
    println!(
        "== timing on {}: medians after warm-up (mediator = through Mediator::call, {}; native = cudarc result calls, same process) ==",
        table.device, table.isolation
    );
    println!(
        "{:<40} {:>6} {:>12} {:>12} {:>14}",
        "metric", "runs", "mediator", "native", "native pinned"
    );
    for r in rows {
        println!(
            "{:<40} {:>6} {:>12} {:>12} {:>14}",
            r.metric,
            r.runs,
            cell(r.mediator),
            cell(r.native),
            cell(r.pinned)
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median of `runs` timed calls of `op` after `warmup` untimed ones; `prepare` runs
/// untimed before each call and hands it its input.
fn measure<T, E>(
    warmup: usize,
    runs: usize,
    mut prepare: impl FnMut() -> T,
    mut op: impl FnMut(T) -> Result<(), E>,
) -> Result<Duration, E> {
    for _ in 0..warmup {
        op(prepare())?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let input = prepare();
        let started = Instant::now();
        op(input)?;
        samples.push(started.elapsed());
    }
    Ok(median(samples))
}

/// This process's executor worker children and their resident memory, in KiB.
fn worker_rss() -> Vec<(u32, u64)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        };
        let worker = field("Name:").is_some_and(|n| n.starts_with("vgpu-executor"));
        let child = field("PPid:").and_then(|p| p.parse::<u32>().ok()) == Some(me);
        if worker && child {
            let rss = field("VmRSS:").and_then(|v| v.parse().ok()).unwrap_or(0);
            out.push((pid, rss));
        }
    }
    out
}

/// Host memory (MiB) of a session's worker and device memory (MiB) of its context: the
/// averages over the worker processes that appeared while `n` sessions were opened (the
/// pool's refills included), against the state before.
fn session_footprint(m: &Mediator, tenant: TenantId, n: usize) -> Result<(f64, f64), String> {
    let free = || -> Result<u64, String> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-parameters; a context is current in this thread (the check's own).
        let r = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(free as u64)
        } else {
            Err(format!("cuMemGetInfo: {}", cuda::error_name(r)))
        }
    };
    // A context of this process's own, current here, for cuMemGetInfo.
    let device =
        cu::device::get(0).map_err(|e| format!("cuDeviceGet: {}", cuda::error_name(e.0)))?;
    let ctx = cuda::create_context(device)
        .map_err(|e| format!("cuCtxCreate: {}", cuda::error_name(e)))?;
    let before_workers: Vec<u32> = worker_rss().into_iter().map(|(p, _)| p).collect();
    let before = free()?;
    let sessions = (0..n)
        .map(|_| Guest::open(m, tenant))
        .collect::<Result<Vec<_>, _>>()?;
    // Something in each context, as a program would have.
    for g in &sessions {
        let b = g.alloc(4096)?;
        g.memset32(b, 0, 4096, 1)?;
        g.sync()?;
    }
    // Workers the pool starts meanwhile are counted too: each new process is one context.
    std::thread::sleep(Duration::from_secs(2));
    let after = free()?;
    let fresh: Vec<u64> = worker_rss()
        .into_iter()
        .filter(|(p, _)| !before_workers.contains(p))
        .map(|(_, rss)| rss)
        .collect();
    drop(sessions);
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = sys::cuCtxDestroy_v2(ctx);
    }
    if fresh.is_empty() {
        return Err("no new worker process found".into());
    }
    let host = fresh.iter().sum::<u64>() as f64 / fresh.len() as f64 / 1024.0;
    let device = before.saturating_sub(after) as f64 / fresh.len() as f64 / (1 << 20) as f64;
    Ok((host, device))
}

/// Launches per second of saxpy on 2^22 floats, `iters` launches then a sync per VM: one
/// VM alone, and the sum over 4 VMs running at once.
fn saxpy_share(m: &Mediator, context: u64, iters: usize) -> Result<(f64, f64), String> {
    let n: usize = 1 << 22;
    let tenants = (0..4)
        .map(|i| {
            m.add_tenant(TenantConfig {
                name: format!("vm-share-{i}"),
                mem_quota: context + GIB,
                weight: 1,
            })
            .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let run = |t: TenantId| -> Result<Duration, String> {
        let g = Guest::open(m, t)?;
        let (y, x) = (g.alloc((n * 4) as u64)?, g.alloc((n * 4) as u64)?);
        g.memset32(y, 0, (n * 4) as u64, 0)?;
        g.memset32(x, 0, (n * 4) as u64, 0x3f80_0000)?;
        g.sync()?;
        let launch = launch_command(
            BUILTIN_MODULE,
            "saxpy_f32",
            [blocks(n, 256), 1, 1],
            [256, 1, 1],
            vec![
                Param::Buffer(y),
                Param::Buffer(x),
                Param::f32(0.5),
                Param::u32(n as u32),
            ],
        );
        let answers = Arc::new(Answers::default());
        let started = Instant::now();
        for _ in 0..iters {
            let sink: Arc<dyn vgpu_mediator::CompletionSink> = answers.clone();
            m.submit(t, Request::new(g.session, launch.clone()), 0, sink);
        }
        g.sync()?;
        let took = started.elapsed();
        answers.expect(iters as u64)?;
        Ok(took)
    };
    let alone = iters as f64 / run(tenants[0])?.as_secs_f64();
    let took = std::thread::scope(|scope| {
        let handles: Vec<_> = tenants
            .iter()
            .map(|&t| scope.spawn(move || run(t)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a VM thread panicked".into()))
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    // All launches over the time until the last VM was done.
    let wall = took.iter().max().copied().unwrap_or_default();
    let together = (iters * took.len()) as f64 / wall.as_secs_f64().max(1e-9);
    for t in tenants {
        m.remove_tenant(t);
    }
    Ok((alone, together))
}

/// axpy of 2^26 floats end to end, medians: through a session worker from a guest host
/// buffer, and natively from pinned memory. `None` without worker processes.
fn vector_add_end_to_end(
    native: &Native,
    mediated: &Arc<dyn ExecutorFactory>,
    ptx: &str,
    runs: usize,
) -> Result<Option<(Duration, Duration)>, String> {
    use vgpu_mediator::executor::BufferId;
    let n: usize = 1 << 26;
    let bytes = n * 4;
    let a = 1.5f32;
    let shape = vgpu_kernels::LaunchShape {
        grid: [blocks(n, 256), 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
    };
    let text = |e: vgpu_mediator::ExecError| e.to_string();
    // Mediated: x at 0, y at `bytes` of one host buffer; y comes back to 2 * bytes.
    let Some(mut h) = HostBufferBench::new(mediated, 3 * bytes)? else {
        return Ok(None);
    };
    let s = h.stream;
    let exec = &mut h.exec;
    let dx = exec.alloc(bytes as u64).map_err(text)?;
    let dy = exec.alloc(bytes as u64).map_err(text)?;
    let module = exec.load_module(ptx).map_err(text)?;
    let params = |dy: BufferId, dx: BufferId| {
        vec![
            ExecParam::Buffer(dy),
            ExecParam::Buffer(dx),
            ExecParam::Value(a.to_le_bytes().to_vec()),
            ExecParam::Value((n as u32).to_le_bytes().to_vec()),
        ]
    };
    let med = measure(
        1,
        runs,
        || (),
        |()| {
            exec.htod_host(s, dx, 0, 1, 0, bytes as u64).map_err(text)?;
            exec.htod_host(s, dy, 0, 1, bytes as u64, bytes as u64)
                .map_err(text)?;
            exec.launch(
                s,
                KernelRef::Module(module, "vgpu_check_axpy"),
                &shape,
                &params(dy, dx),
            )
            .map_err(text)?;
            exec.dtoh_host(s, dy, 0, 1, 2 * bytes as u64, bytes as u64)
                .map_err(text)
        },
    )?;
    drop(h);

    native.current()?;
    let mut x = Pinned::new(bytes)?;
    let mut y = Pinned::new(bytes)?;
    // SAFETY: plain allocations in the current (native) context, freed below.
    let (nx, ny) = unsafe { (cu::malloc_sync(bytes), cu::malloc_sync(bytes)) };
    let (nx, ny) = match (nx, ny) {
        (Ok(x), Ok(y)) => (x, y),
        _ => return Err("cuMemAlloc for the native axpy failed".into()),
    };
    let nat = measure(
        1,
        runs,
        || (),
        |()| {
            native_htod(native, nx, x.slice())?;
            native_htod(native, ny, y.slice())?;
            let (mut p_y, mut p_x, mut p_a, mut p_n) = (ny, nx, a, n as u32);
            let mut args: [*mut c_void; 4] = [
                (&mut p_y as *mut u64).cast(),
                (&mut p_x as *mut u64).cast(),
                (&mut p_a as *mut f32).cast(),
                (&mut p_n as *mut u32).cast(),
            ];
            // SAFETY: the kernel takes (u64, u64, f32, u32), matching `args`; the stream
            // belongs to the current context.
            unsafe {
                cu::launch_kernel(
                    native.axpy,
                    (blocks(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                    native.stream,
                    &mut args,
                )
            }
            .map_err(|e| format!("cuLaunchKernel: {}", cuda::error_name(e.0)))?;
            native_dtoh(native, ny, y.slice())
        },
    )?;
    // SAFETY: allocated above, freed once.
    unsafe {
        let _ = cu::free_sync(nx);
        let _ = cu::free_sync(ny);
    }
    drop((x, y));
    Ok(Some((med, nat)))
}

/// A session worker with a registered host buffer of `len` bytes and a device buffer.
struct HostBufferBench {
    exec: Box<dyn Executor>,
    stream: vgpu_mediator::executor::StreamId,
    buffer: vgpu_mediator::executor::BufferId,
}

impl HostBufferBench {
    /// `None` (with a note) when the executors do not run in workers.
    fn new(factory: &Arc<dyn ExecutorFactory>, len: usize) -> Result<Option<Self>, String> {
        use vgpu_mediator::hostmap::{FilePiece, HostMapping};
        if factory.worker_process().is_none() {
            println!("note: no worker processes: host buffer copies not timed");
            return Ok(None);
        }
        let text = |e: vgpu_mediator::ExecError| e.to_string();
        let file = vgpu_mediator::hostmap::memfd(c"vm-ram", len as u64)
            .map_err(|e| format!("memfd_create: {e}"))?;
        let mapping = HostMapping {
            pieces: vec![FilePiece {
                file: Arc::new(file),
                offset: 0,
                len: len as u64,
            }],
        };
        let mut exec = factory.create().map_err(text)?;
        let stream = exec.open_stream().map_err(text)?;
        let buffer = exec.alloc(len as u64).map_err(text)?;
        exec.register_host(1, &mapping).map_err(text)?;
        Ok(Some(HostBufferBench {
            exec,
            stream,
            buffer,
        }))
    }
}

/// The native side of the comparison: its own (non-primary) context, like a tenant's.
struct Native {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    empty: sys::CUfunction,
    axpy: sys::CUfunction,
}

impl Native {
    fn new(ptx: &str) -> Result<Native, String> {
        let err = |what: &'static str| {
            move |e: cu::DriverError| format!("{what}: {}", cuda::error_name(e.0))
        };
        let device = cu::device::get(0).map_err(err("cuDeviceGet"))?;
        // The mediator's way to make a context (v4, or v2 on old drivers); it becomes current.
        let ctx = cuda::create_context(device)
            .map_err(|e| format!("cuCtxCreate: {}", cuda::error_name(e)))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(err("cuStreamCreate"))?;
        let image = CString::new(ptx).map_err(|_| "PTX with a NUL".to_string())?;
        // SAFETY: NUL-terminated PTX; the module lives as long as the context.
        let module = unsafe { cu::module::load_data(image.as_ptr().cast()) }
            .map_err(err("cuModuleLoadData"))?;
        let name = CString::new("vgpu_check_empty").expect("no NUL");
        // SAFETY: `module` is loaded in the current context.
        let empty = unsafe { cu::module::get_function(module, name) }
            .map_err(err("cuModuleGetFunction"))?;
        let name = CString::new("vgpu_check_axpy").expect("no NUL");
        // SAFETY: as above.
        let axpy = unsafe { cu::module::get_function(module, name) }
            .map_err(err("cuModuleGetFunction"))?;
        Ok(Native {
            ctx,
            stream,
            empty,
            axpy,
        })
    }

    fn current(&self) -> Result<(), String> {
        // SAFETY: `ctx` is live until drop.
        unsafe { cu::ctx::set_current(self.ctx) }
            .map_err(|e| format!("cuCtxSetCurrent: {}", cuda::error_name(e.0)))
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = sys::cuCtxDestroy_v2(self.ctx);
        }
    }
}

/// Pinned host memory from cuMemHostAlloc, freed on drop.
struct Pinned {
    ptr: *mut u8,
    len: usize,
}

impl Pinned {
    fn new(len: usize) -> Result<Pinned, String> {
        // SAFETY: plain pinned allocation in the current context; zeroed below.
        let ptr = unsafe { cu::malloc_host(len, 0) }
            .map_err(|e| format!("cuMemHostAlloc: {}", cuda::error_name(e.0)))?;
        let pinned = Pinned {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: `len` bytes were just allocated.
        unsafe { std::ptr::write_bytes(pinned.ptr, 0x3c, len) };
        Ok(pinned)
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes owned by this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc, freed once.
        let _ = unsafe { cu::free_host(self.ptr.cast::<c_void>()) };
    }
}

#[allow(clippy::too_many_arguments)]
fn timings(
    args: &Args,
    m: &Mediator,
    tenant: TenantId,
    factory: &CudaExecutorFactory,
    mediated: &Arc<dyn ExecutorFactory>,
    ptx: &str,
    table: &mut Table,
    report: &mut Report,
) {
    let table = &mut table.rows;
    let (launch_runs, copy_runs, big_runs) = match (args.runs, args.quick) {
        (Some(r), _) => (r, r, r),
        (None, false) => (1000, 200, 200),
        (None, true) => (200, 50, 20),
    };
    let measured = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let g = Guest::open(m, tenant)?;
        let module = g.load(ptx)?;
        let native = Native::new(ptx)?;

        // Empty kernel: launch + sync, and the launch alone.
        let launch = launch_command(module, "vgpu_check_empty", [1, 1, 1], [1, 1, 1], vec![]);
        let med = measure(
            100,
            launch_runs,
            || launch.clone(),
            |l| g.ok(l, "LAUNCH").and_then(|_| g.sync()),
        )?;
        native.current()?;
        let nat = measure(100, launch_runs, || (), |()| native_launch(&native, true))?;
        table.push(Row {
            metric: "empty kernel launch+sync (us)".into(),
            runs: launch_runs,
            mediator: Some(us(med)),
            native: Some(us(nat)),
            pinned: None,
        });
        let med = measure(
            100,
            launch_runs,
            || launch.clone(),
            |l| g.ok(l, "LAUNCH").map(drop),
        )?;
        g.sync()?;
        native.current()?;
        let mut launched = 0usize;
        let nat = measure(
            100,
            launch_runs,
            || (),
            |()| {
                launched += 1;
                if launched % 64 == 0 {
                    // Untimed drain so the queue never fills; counted in this sample only.
                    sync_native(&native)?;
                }
                native_launch(&native, false)
            },
        )?;
        sync_native(&native)?;
        table.push(Row {
            metric: "kernel launch enqueue (us)".into(),
            runs: launch_runs,
            mediator: Some(us(med)),
            native: Some(us(nat)),
            pinned: None,
        });

        // A burst: 1,000 launches back to back, then one sync. The launches are submitted
        // without waiting for their answers, as a guest keeps requests in flight.
        let bursts = if args.quick { 3 } else { 10 };
        let answered = Arc::new(Answers::default());
        let med = measure(
            1,
            bursts,
            || (),
            |()| {
                answered.reset();
                for _ in 0..1000 {
                    let sink: Arc<dyn vgpu_mediator::CompletionSink> = answered.clone();
                    m.submit(tenant, Request::new(g.session, launch.clone()), 0, sink);
                }
                g.sync()?;
                answered.expect(1000)
            },
        )?;
        native.current()?;
        let nat = measure(
            1,
            bursts,
            || (),
            |()| {
                for _ in 0..1000 {
                    native_launch(&native, false)?;
                }
                sync_native(&native)
            },
        )?;
        table.push(Row {
            metric: "1,000 launches then sync (us)".into(),
            runs: bursts,
            mediator: Some(us(med)),
            native: Some(us(nat)),
            pinned: None,
        });

        // Copies at four sizes, both directions.
        let max = 256usize << 20;
        let dbuf = g.alloc(max as u64)?;
        native.current()?;
        // SAFETY: plain allocation in the current (native) context.
        let nptr = unsafe { cu::malloc_sync(max) }
            .map_err(|e| format!("cuMemAlloc: {}", cuda::error_name(e.0)))?;
        let mut pageable = vec![0x3cu8; max];
        let mut pinned = Pinned::new(max)?;
        // A guest process's host buffer (its driver's mmap memory, registered with
        // HOST_REGISTER): a memfd standing in for the VM's RAM, mapped and page-locked
        // in a session worker, copied straight to and from the GPU.
        let mut host = HostBufferBench::new(mediated, max)?;
        for (label, size) in [
            ("4 KiB", 4usize << 10),
            ("1 MiB", 1 << 20),
            ("16 MiB", 16 << 20),
            ("64 MiB", 64 << 20),
            ("256 MiB", 256 << 20),
        ] {
            let runs = if size >= 64 << 20 {
                big_runs
            } else {
                copy_runs
            };
            let warm = if size >= 64 << 20 { 3 } else { 20 };
            let gbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;
            let src = vec![0xa7u8; size];
            let med_h = measure(warm, runs, || src.clone(), |data| g.htod(dbuf, 0, data))?;
            let med_d = measure(
                warm,
                runs,
                || (),
                |()| g.dtoh(dbuf, 0, size as u64).map(drop),
            )?;
            native.current()?;
            let nat_h = measure(
                warm,
                runs,
                || (),
                |()| native_htod(&native, nptr, &pageable[..size]),
            )?;
            let nat_d = measure(
                warm,
                runs,
                || (),
                |()| native_dtoh(&native, nptr, &mut pageable[..size]),
            )?;
            let pin_h = measure(
                warm,
                runs,
                || (),
                |()| native_htod(&native, nptr, &pinned.slice()[..size]),
            )?;
            let pin_d = measure(
                warm,
                runs,
                || (),
                |()| native_dtoh(&native, nptr, &mut pinned.slice()[..size]),
            )?;
            table.push(Row {
                metric: format!("HTOD {label} (GB/s)"),
                runs,
                mediator: Some(gbps(med_h)),
                native: Some(gbps(nat_h)),
                pinned: Some(gbps(pin_h)),
            });
            table.push(Row {
                metric: format!("DTOH {label} (GB/s)"),
                runs,
                mediator: Some(gbps(med_d)),
                native: Some(gbps(nat_d)),
                pinned: Some(gbps(pin_d)),
            });
            if let Some(h) = host.as_mut() {
                let text = |e: vgpu_mediator::ExecError| e.to_string();
                let (s, b) = (h.stream, h.buffer);
                let hb_h = measure(
                    warm,
                    runs,
                    || (),
                    |()| h.exec.htod_host(s, b, 0, 1, 0, size as u64).map_err(text),
                )?;
                let hb_d = measure(
                    warm,
                    runs,
                    || (),
                    |()| h.exec.dtoh_host(s, b, 0, 1, 0, size as u64).map_err(text),
                )?;
                table.push(Row {
                    metric: format!("HTOD {label}, guest host buffer (GB/s)"),
                    runs,
                    mediator: Some(gbps(hb_h)),
                    native: Some(gbps(nat_h)),
                    pinned: Some(gbps(pin_h)),
                });
                table.push(Row {
                    metric: format!("DTOH {label}, guest host buffer (GB/s)"),
                    runs,
                    mediator: Some(gbps(hb_d)),
                    native: Some(gbps(nat_d)),
                    pinned: Some(gbps(pin_d)),
                });
            }
        }
        drop(host);
        native.current()?;
        // SAFETY: allocated above in this context, freed once.
        let _ = unsafe { cu::free_sync(nptr) };
        // Vector add (axpy) of 2^26 floats end to end: upload x and y, launch, download y;
        // from pinned memory natively, from a guest host buffer through a session worker.
        match vector_add_end_to_end(&native, mediated, ptx, if args.quick { 2 } else { 5 }) {
            Ok(Some((med, nat))) => table.push(Row {
                metric: "axpy 2^26 floats, upload+launch+download (ms)".into(),
                runs: if args.quick { 2 } else { 5 },
                mediator: Some(ms(med)),
                native: None,
                pinned: Some(ms(nat)),
            }),
            Ok(None) => {}
            Err(e) => report.fail("timing-vector-add", e),
        }
        native.current()?;
        // Pinned memory belongs to the native context: free it first.
        drop(pinned);
        drop(native);

        // NVRTC and per-tenant context costs.
        let compiles = if args.quick { 1 } else { 5 };
        let cc = (factory.device().cc_major, factory.device().cc_minor);
        let compile = measure(
            0,
            compiles,
            || (),
            |()| {
                cuda::compile_ptx(vgpu_kernels::CUDA_SOURCE, "vgpu_catalog.cu", cc)
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )?;
        table.push(Row {
            metric: "NVRTC catalog compile (ms)".into(),
            runs: compiles,
            mediator: None,
            native: Some(ms(compile)),
            pinned: None,
        });
        table.push(Row {
            metric: "NVRTC catalog compile, first (ms)".into(),
            runs: 1,
            mediator: None,
            native: Some(ms(factory.compile_time())),
            pinned: None,
        });
        let create = measure(
            1,
            compiles,
            || (),
            |()| {
                factory
                    .create_executor()
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )?;
        table.push(Row {
            metric: "tenant context + catalog load (ms)".into(),
            runs: compiles,
            mediator: Some(ms(create)),
            native: None,
            pinned: None,
        });

        // What a worker process adds: its start, and one call's round trip.
        if mediated.worker_process().is_some() {
            let start = measure(
                1,
                compiles,
                || (),
                |()| mediated.create().map(drop).map_err(|e| e.to_string()),
            )?;
            table.push(Row {
                metric: "session worker process start (ms)".into(),
                runs: compiles,
                mediator: Some(ms(start)),
                native: None,
                pinned: None,
            });
            // What a guest process waits for at open: a ready worker from the pool (the
            // pool refills in the background between the samples).
            let mut opened = Vec::new();
            let open = measure(
                0,
                compiles,
                || std::thread::sleep(Duration::from_millis(1500)),
                |()| {
                    let r = m.call(tenant, Request::new(0, Command::SessionOpen));
                    expect_ok(&r, "SESSION_OPEN")?;
                    opened.push(r.value0);
                    Ok::<_, String>(())
                },
            )?;
            for session in opened {
                m.call(tenant, Request::new(session, Command::SessionClose));
            }
            table.push(Row {
                metric: "session open, a ready worker from the pool (ms)".into(),
                runs: compiles,
                mediator: Some(ms(open)),
                native: None,
                pinned: None,
            });
            // What a session costs: its worker's host memory and its context's device
            // memory, from 4 sessions opened at once.
            match session_footprint(m, tenant, 4) {
                Ok((host, device)) => {
                    table.push(Row {
                        metric: "host memory per session worker (MiB)".into(),
                        runs: 4,
                        mediator: Some(host),
                        native: None,
                        pinned: None,
                    });
                    table.push(Row {
                        metric: "device memory per session context (MiB)".into(),
                        runs: 4,
                        mediator: Some(device),
                        native: None,
                        pinned: None,
                    });
                }
                Err(e) => report.fail("timing-session-footprint", e),
            }
            // Sharing: saxpy loops in 4 VMs at once against one VM alone.
            match saxpy_share(
                m,
                factory.context_bytes(),
                if args.quick { 50 } else { 300 },
            ) {
                Ok((alone, together)) => table.push(Row {
                    metric: "saxpy 2^22 loops: 4 VMs aggregate / 1 VM (x)".into(),
                    runs: 4,
                    mediator: Some(together / alone),
                    native: None,
                    pinned: None,
                }),
                Err(e) => report.fail("timing-saxpy-share", e),
            }
            let text = |e: vgpu_mediator::ExecError| e.to_string();
            let mut remote = mediated.create().map_err(text)?;
            let mut local = factory.create_executor().map_err(text)?;
            let rs = remote.open_stream().map_err(text)?;
            let ls = local.open_stream().map_err(text)?;
            let rpc = measure(100, launch_runs, || (), |()| remote.sync(rs).map_err(text))?;
            let direct = measure(100, launch_runs, || (), |()| local.sync(ls).map_err(text))?;
            remote.close_stream(rs);
            local.close_stream(ls);
            table.push(Row {
                metric: "idle SYNC: worker RPC vs in-process (us)".into(),
                runs: launch_runs,
                mediator: Some(us(rpc)),
                native: Some(us(direct)),
                pinned: None,
            });
        }
        Ok(())
    }));
    let result = measured.unwrap_or_else(|_| Err("panicked (see the message above)".into()));
    match result {
        Ok(()) => report.pass("timings", format!("{} measurements", table.len())),
        Err(why) => report.fail("timings", why),
    }
}

fn native_launch(n: &Native, sync: bool) -> Result<(), String> {
    // SAFETY: `empty` takes no parameters; the stream belongs to the current context.
    unsafe { cu::launch_kernel(n.empty, (1, 1, 1), (1, 1, 1), 0, n.stream, &mut []) }
        .map_err(|e| format!("cuLaunchKernel: {}", cuda::error_name(e.0)))?;
    if sync {
        sync_native(n)?;
    }
    Ok(())
}

fn sync_native(n: &Native) -> Result<(), String> {
    // SAFETY: a live stream of the current context.
    unsafe { cu::stream::synchronize(n.stream) }
        .map_err(|e| format!("cuStreamSynchronize: {}", cuda::error_name(e.0)))
}

fn native_htod(n: &Native, dptr: sys::CUdeviceptr, src: &[u8]) -> Result<(), String> {
    // SAFETY: `dptr` holds at least `src.len()` bytes; `src` outlives the sync below.
    unsafe { cu::memcpy_htod_async(dptr, src, n.stream) }
        .map_err(|e| format!("cuMemcpyHtoDAsync: {}", cuda::error_name(e.0)))?;
    sync_native(n)
}

fn native_dtoh(n: &Native, dptr: sys::CUdeviceptr, dst: &mut [u8]) -> Result<(), String> {
    // SAFETY: `dptr` holds at least `dst.len()` bytes; `dst` outlives the sync below.
    unsafe { cu::memcpy_dtoh_async(dst, dptr, n.stream) }
        .map_err(|e| format!("cuMemcpyDtoHAsync: {}", cuda::error_name(e.0)))?;
    sync_native(n)
}
