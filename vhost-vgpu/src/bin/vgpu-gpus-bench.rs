// SPDX-License-Identifier: Apache-2.0
//! `vgpu-gpus-bench`: two VMs on a daemon that drives several GPUs, measured through the
//! daemon's real vhost-user sockets with the test VMM as the VMs.
//!
//! Each VM runs a saxpy loop: one session, `y = a*x + y` over `--elements` floats with the
//! built-in `saxpy_f32`, launches sent back to back (a launch is answered once queued) and
//! a SYNC every 64. Its rate is the launches finished per second over the window.
//!
//! - `apart`: the two VMs are on different GPUs (the daemon placed them; the device each
//!   sees names its GPU). Each runs alone, then both at once. Goal: each VM at least
//!   0.95x of its rate alone.
//! - `same`: the two VMs are on the same GPU, with different weights. Both run at once.
//!   Goal: their device time (from the daemon's control socket) in the ratio of their
//!   weights, within 10%.
//! - `faults`: the VMs are on different GPUs. VM 1 runs alone, then again while VM 0
//!   loops on a kernel that traps (each in a fresh session: its context is lost and
//!   replaced). Goal: VM 1 at least 0.95x of its rate alone, every answer OK, its results
//!   right, no session of VM 1 lost (control socket), and VM 0's faults all reported.
//!
//! Prints `PASS <scenario>: ...` or `FAIL <scenario>: ...` per goal and a table last;
//! exits 1 when a goal fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use vgpu_protocol::{Command, Launch, Param, Request, Status, BUILTIN_MODULE};
use vhost_vgpu::testvmm::Vm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Apart,
    Same,
    Faults,
}

#[derive(Parser, Debug)]
#[command(
    name = "vgpu-gpus-bench",
    version,
    about = "Measures two VMs of a vhost-vgpu daemon that drives several GPUs",
    long_about = "Measures two VMs of a running vhost-vgpu daemon (its sockets BASE0 and \
        BASE1, its control socket) through the test VMM. apart: VMs on different GPUs each \
        keep at least 0.95x of their saxpy rate alone while both run. same: VMs on one GPU \
        share its device time by weight (within 10%). faults: a VM that faults without end \
        on one GPU leaves the VM on the other at 0.95x of its rate, all answers OK. Prints \
        PASS/FAIL lines and a table; exits 1 if a goal fails."
)]
struct Cli {
    /// The daemon's --socket-path (the VMs are BASE0 and BASE1).
    #[arg(long, value_name = "BASE")]
    socket_path: PathBuf,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Seconds each measurement window lasts.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Floats per saxpy (two buffers of 4 bytes each per element per VM).
    #[arg(long, default_value_t = 1 << 26)]
    elements: u32,
}

/// A goal's outcome, printed as it is found.
struct Goals {
    failed: bool,
    rows: Vec<(String, String)>,
}

impl Goals {
    fn check(&mut self, scenario: &str, ok: bool, what: String) {
        println!("{} {scenario}: {what}", if ok { "PASS" } else { "FAIL" });
        self.failed |= !ok;
    }

    fn row(&mut self, figure: impl Into<String>, value: String) {
        self.rows.push((figure.into(), value));
    }
}

fn socket(base: &Path, i: usize) -> PathBuf {
    let mut p = base.as_os_str().to_owned();
    p.push(i.to_string());
    PathBuf::from(p)
}

fn call(vm: &mut Vm, session: u64, command: Command) -> Result<(u64, Vec<u8>), String> {
    let what = vgpu_mediator::metrics::op_name(vgpu_mediator::metrics::opcode(&command));
    let (h, data) = vm
        .request(&Request::new(session, command))
        .map_err(|e| format!("{what}: {e}"))?;
    if h.status != Status::Ok {
        return Err(format!("{what}: {} (detail {})", h.status, h.detail));
    }
    Ok((h.value0, data))
}

/// A VM running saxpy: its session and buffers.
struct Saxpy {
    vm: Vm,
    session: u64,
    y: u64,
    launch: Command,
}

impl Saxpy {
    fn open(socket: &Path, n: u32) -> Result<Saxpy, String> {
        let mut vm = Vm::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        let session = call(&mut vm, 0, Command::SessionOpen)?.0;
        let bytes = u64::from(n) * 4;
        let y = call(&mut vm, session, Command::Alloc { size: bytes })?.0;
        let x = call(&mut vm, session, Command::Alloc { size: bytes })?.0;
        for (buf, value) in [(y, 0u32), (x, 1.0f32.to_bits())] {
            call(
                &mut vm,
                session,
                Command::Memset {
                    dst: buf,
                    offset: 0,
                    len: bytes,
                    value,
                    width: 4,
                },
            )?;
        }
        call(&mut vm, session, Command::Sync)?;
        let launch = Command::Launch(Launch {
            module: BUILTIN_MODULE,
            kernel: "saxpy_f32".into(),
            grid: [n.div_ceil(256), 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
            params: vec![
                Param::Buffer(y),
                Param::Buffer(x),
                Param::f32(0.5),
                Param::u32(n),
            ],
        });
        Ok(Saxpy {
            vm,
            session,
            y,
            launch,
        })
    }

    fn gpu(&self) -> u32 {
        self.vm.config().gpu
    }

    /// Launches for `window` (after `warmup`), a SYNC every 64; launches per second in the
    /// window.
    fn run(&mut self, warmup: Duration, window: Duration) -> Result<f64, String> {
        let started = Instant::now();
        let mut counted: Option<(Instant, u64)> = None;
        let mut launches = 0u64;
        loop {
            for _ in 0..64 {
                call(&mut self.vm, self.session, self.launch.clone())?;
            }
            call(&mut self.vm, self.session, Command::Sync)?;
            launches += 64;
            let now = Instant::now();
            match counted {
                None if now - started >= warmup => counted = Some((now, launches)),
                Some((from, base)) if now - from >= window => {
                    return Ok((launches - base) as f64 / (now - from).as_secs_f64());
                }
                _ => {}
            }
        }
    }

    /// The first element of y: 0.5 per launch so far (x is 1).
    fn first(&mut self) -> Result<f32, String> {
        let (_, data) = call(
            &mut self.vm,
            self.session,
            Command::Dtoh {
                src: self.y,
                offset: 0,
                len: 4,
            },
        )?;
        Ok(f32::from_le_bytes(
            data.get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or("DTOH answered fewer than 4 bytes")?,
        ))
    }
}

/// The control socket's view of a VM: (device time in s, restarts, weight).
fn vm_view(control: &Path, name: &str) -> Result<(f64, u64, u64), String> {
    let reply =
        vgpu_mediator::control::request(control, &json!({"op": "list"}), Duration::from_secs(5))
            .map_err(|e| format!("control socket {}: {e}", control.display()))?;
    let vm = reply["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == name))
        .ok_or_else(|| format!("the control socket lists no VM {name}"))?;
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    Ok((
        num(&vm["device_time_s"]),
        vm["restarts"].as_u64().unwrap_or(0),
        vm["weight"].as_u64().unwrap_or(0),
    ))
}

/// [`vm_view`] of both VMs.
fn views(control: &Path, names: &[String; 2]) -> Result<[(f64, u64, u64); 2], String> {
    Ok([vm_view(control, &names[0])?, vm_view(control, &names[1])?])
}

fn vm_name(base: &Path, i: usize) -> String {
    socket(base, i)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Both VMs' saxpy loops at once: their rates.
fn together(
    a: &mut Saxpy,
    b: &mut Saxpy,
    warmup: Duration,
    window: Duration,
) -> [Result<f64, String>; 2] {
    let barrier = Barrier::new(2);
    std::thread::scope(|scope| {
        let ha = scope.spawn(|| {
            barrier.wait();
            a.run(warmup, window)
        });
        let hb = scope.spawn(|| {
            barrier.wait();
            b.run(warmup, window)
        });
        [ha, hb].map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("a VM thread panicked".into()))
        })
    })
}

/// VM 0 and VM 1, each with its saxpy session.
fn both_vms(cli: &Cli) -> Result<[Saxpy; 2], String> {
    Ok([
        Saxpy::open(&socket(&cli.socket_path, 0), cli.elements)?,
        Saxpy::open(&socket(&cli.socket_path, 1), cli.elements)?,
    ])
}

fn apart(cli: &Cli, goals: &mut Goals) -> Result<(), String> {
    let (warmup, window) = (Duration::from_secs(1), Duration::from_secs_f64(cli.seconds));
    let mut vms = both_vms(cli)?;
    let gpus = [vms[0].gpu(), vms[1].gpu()];
    goals.check(
        "apart",
        gpus[0] != gpus[1],
        format!("vm0 is on GPU {}, vm1 on GPU {}", gpus[0], gpus[1]),
    );
    let alone = [vms[0].run(warmup, window)?, vms[1].run(warmup, window)?];
    let [a, b] = &mut vms;
    let [ta, tb] = together(a, b, warmup, window);
    let both = [ta?, tb?];
    for i in 0..2 {
        let ratio = both[i] / alone[i];
        goals.check(
            "apart",
            ratio >= 0.95,
            format!(
                "vm{i} (GPU {}): {:.1} saxpy/s alone, {:.1} with the other VM running: {ratio:.3}x \
                 (goal >= 0.95x)",
                gpus[i], alone[i], both[i]
            ),
        );
        goals.row(
            format!("apart: vm{i} on GPU {}, saxpy/s alone / together", gpus[i]),
            format!("{:.1} / {:.1} ({ratio:.3}x)", alone[i], both[i]),
        );
    }
    Ok(())
}

fn same(cli: &Cli, goals: &mut Goals) -> Result<(), String> {
    let (warmup, window) = (Duration::from_secs(1), Duration::from_secs_f64(cli.seconds));
    let mut vms = both_vms(cli)?;
    let gpus = [vms[0].gpu(), vms[1].gpu()];
    goals.check(
        "same",
        gpus[0] == gpus[1],
        format!("vm0 and vm1 are both on GPU {}", gpus[0]),
    );
    let names = [vm_name(&cli.socket_path, 0), vm_name(&cli.socket_path, 1)];
    let before = views(&cli.control, &names)?;
    let [a, b] = &mut vms;
    let [ra, rb] = together(a, b, warmup, window);
    let rates = [ra?, rb?];
    let after = views(&cli.control, &names)?;
    let time = [after[0].0 - before[0].0, after[1].0 - before[1].0];
    let weights = [after[0].2 as f64, after[1].2 as f64];
    let want = weights[1] / weights[0].max(1.0);
    let got = time[1] / time[0].max(1e-9);
    goals.check(
        "same",
        (got / want - 1.0).abs() <= 0.10,
        format!(
            "weights {} : {}, device time {:.2} s : {:.2} s = 1 : {got:.2} (goal 1 : {want:.2} within \
             10%); saxpy/s {:.1} : {:.1}",
            weights[0], weights[1], time[0], time[1], rates[0], rates[1]
        ),
    );
    goals.row(
        format!(
            "same GPU {}: device time ratio (weights {} : {})",
            gpus[0], weights[0], weights[1]
        ),
        format!("1 : {got:.2} (want 1 : {want:.2})"),
    );
    goals.row(
        "same GPU: saxpy/s vm0 / vm1",
        format!("{:.1} / {:.1}", rates[0], rates[1]),
    );
    Ok(())
}

/// PTX whose kernel traps, for the device the VM sees.
fn trap_ptx(vm: &Vm) -> String {
    let c = vm.config();
    format!(
        ".version 8.0\n.target sm_{}{}\n.address_size 64\n\n.visible .entry vgpu_trap()\n{{\n\ttrap;\n\tret;\n}}\n",
        c.cc_major, c.cc_minor
    )
}

/// One fault of VM 0: a fresh session, the trapping kernel, the SYNC that reports it.
fn fault_once(vm: &mut Vm, ptx: &str) -> Result<(), String> {
    let s = call(vm, 0, Command::SessionOpen)?.0;
    let module = call(vm, s, Command::ModuleLoad { ptx: ptx.into() })?.0;
    call(
        vm,
        s,
        Command::Launch(Launch {
            module,
            kernel: "vgpu_trap".into(),
            grid: [1, 1, 1],
            block: [32, 1, 1],
            shared_bytes: 0,
            params: Vec::new(),
        }),
    )?;
    let (h, _) = vm
        .request(&Request::new(s, Command::Sync))
        .map_err(|e| format!("SYNC after the trap: {e}"))?;
    if h.status == Status::Ok {
        return Err("SYNC after a trapping kernel answered OK".into());
    }
    let _ = vm.request(&Request::new(s, Command::SessionClose));
    Ok(())
}

fn faults(cli: &Cli, goals: &mut Goals) -> Result<(), String> {
    let (warmup, window) = (Duration::from_secs(1), Duration::from_secs_f64(cli.seconds));
    let mut calm = Saxpy::open(&socket(&cli.socket_path, 1), cli.elements)?;
    let mut storm = Vm::connect(socket(&cli.socket_path, 0)).map_err(|e| format!("vm0: {e}"))?;
    let (storm_gpu, calm_gpu) = (storm.config().gpu, calm.gpu());
    goals.check(
        "faults",
        storm_gpu != calm_gpu,
        format!("the faulting vm0 is on GPU {storm_gpu}, vm1 on GPU {calm_gpu}"),
    );
    let names = [vm_name(&cli.socket_path, 0), vm_name(&cli.socket_path, 1)];
    let ptx = trap_ptx(&storm);
    let alone = calm.run(warmup, window)?;
    let launched_alone = calm.first()?;
    let before = views(&cli.control, &names)?;
    let stop = AtomicBool::new(false);
    let faulted = AtomicU64::new(0);
    let (rate, stormed) = std::thread::scope(|scope| {
        let stormer = scope.spawn(|| -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                fault_once(&mut storm, &ptx)?;
                faulted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        let rate = calm.run(warmup, window);
        stop.store(true, Ordering::Relaxed);
        let stormed = stormer
            .join()
            .unwrap_or_else(|_| Err("the faulting VM's thread panicked".into()));
        (rate, stormed)
    });
    let rate = rate?;
    stormed?;
    let after = views(&cli.control, &names)?;
    let faults = faulted.load(Ordering::Relaxed);
    let ratio = rate / alone;
    goals.check(
        "faults",
        ratio >= 0.95,
        format!(
            "vm1 (GPU {calm_gpu}): {alone:.1} saxpy/s alone, {rate:.1} while vm0 (GPU {storm_gpu}) \
             faulted {faults} times: {ratio:.3}x (goal >= 0.95x)"
        ),
    );
    let lost = after[0].1 - before[0].1;
    goals.check(
        "faults",
        faults > 0 && lost >= faults,
        format!("vm0: {faults} faults reported, {lost} of its sessions lost and replaced"),
    );
    let calm_lost = after[1].1 - before[1].1;
    // y grows by 0.5 per launch: whole and positive, and more than before the storm.
    let y = calm.first()?;
    let right = y > launched_alone && (y * 2.0).fract() == 0.0;
    goals.check(
        "faults",
        calm_lost == 0 && right,
        format!("vm1: every answer OK, {calm_lost} sessions lost, y[0] = {y} (0.5 per launch)"),
    );
    goals.row(
        format!("faults: vm1 on GPU {calm_gpu}, saxpy/s alone / during vm0's storm"),
        format!("{alone:.1} / {rate:.1} ({ratio:.3}x)"),
    );
    goals.row(
        format!("faults: vm0 on GPU {storm_gpu}, faults in the window"),
        faults.to_string(),
    );
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let mut goals = Goals {
        failed: false,
        rows: Vec::new(),
    };
    let name = format!("{:?}", cli.scenario).to_lowercase();
    let outcome = match cli.scenario {
        Scenario::Apart => apart(&cli, &mut goals),
        Scenario::Same => same(&cli, &mut goals),
        Scenario::Faults => faults(&cli, &mut goals),
    };
    if let Err(e) = outcome {
        goals.check(&name, false, e);
    }
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    for (figure, value) in &goals.rows {
        println!("| {figure} | {value} |");
    }
    if goals.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
