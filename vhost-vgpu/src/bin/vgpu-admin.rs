// SPDX-License-Identifier: Apache-2.0
//! `vgpu-admin`: the host's view of the VMs a `vhost-vgpu` (or `vgpu-mediator serve
//! --control`) daemon serves, and their memory quota and weight changed at run time,
//! through the daemon's control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use vgpu_mediator::control::{self, GpuView, ListReply, SetReply, VmView};
use vhost_vgpu::DEFAULT_CONTROL_PATH;

/// How long the daemon has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "vgpu-admin",
    version,
    about = "Shows the VMs sharing the GPU and changes their memory quota and weight",
    long_about = "Shows the VMs sharing the GPU and changes their memory quota and weight.\n\n\
        Talks to the daemon's control socket (vhost-vgpu --control, on by default beside the \
        VM sockets; vgpu-mediator serve --control). The socket is owner-only: run as the \
        daemon's user or as root. Without a command it lists the VMs: sessions, device \
        memory used and quota, weight, device time and its share over the last 10 s and \
        since each VM was added, and faults (execution contexts lost: device faults, \
        killed workers, kernel timeouts). Each VM shares only the GPU it is placed on: its \
        share is its part of that GPU's device time. When the daemon drives several GPUs, \
        a table of the GPUs comes first (`gpus` shows it alone). A quota or weight set \
        here holds until the daemon stops (a SIGHUP reload of --weights sets the weights \
        from the file again)."
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    /// Print the daemon's answer as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Lists the device and the VMs (the default); the GPUs first when there are several.
    List {
        /// Also one row per session (guest process) with its device time.
        #[arg(long)]
        sessions: bool,
    },
    /// Lists the GPUs: memory, VMs placed on each, the quota promised to them and the
    /// memory they hold, device time.
    Gpus,
    /// Changes a VM's device-memory quota and/or weight from now on.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
    Set {
        /// The VM's name, as the list shows it (e.g. vm0, nfs:vm1).
        vm: String,
        /// Device memory the VM may hold, e.g. 512M, 8G. Lowering it below what the VM
        /// holds frees nothing: its work that needs more is refused until it is back
        /// under the quota.
        #[arg(long, value_name = "SIZE", group = "change")]
        quota: Option<String>,
        /// Its relative share of device time (at least 1).
        #[arg(long, value_name = "W", group = "change")]
        weight: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vgpu-admin: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let ask = |request: Value| {
        control::request(&cli.control, &request, TIMEOUT).map_err(|e| e.to_string())
    };
    let (answer, sessions) = match &cli.command {
        None => (ask(json!({"op": "list"}))?, false),
        Some(Cmd::List { sessions }) => (ask(json!({"op": "list"}))?, *sessions),
        Some(Cmd::Gpus) => {
            let list: ListReply = decode(ask(json!({"op": "list"}))?)?;
            let gpus = gpus_of(&list);
            if cli.json {
                return print_json(&gpus);
            }
            print!("{}", gpu_table(&gpus));
            return Ok(());
        }
        Some(Cmd::Set { vm, quota, weight }) => {
            let mut request = json!({"op": "set", "vm": vm});
            if let Some(q) = quota {
                request["quota"] = json!(q);
            }
            if let Some(w) = weight {
                request["weight"] = json!(w);
            }
            let set: SetReply = decode(ask(request)?)?;
            if cli.json {
                return print_json(&set);
            }
            println!(
                "{}: quota {} MiB ({} MiB in use), weight {}",
                set.vm,
                set.mem_quota >> 20,
                set.mem_used.div_ceil(1 << 20),
                set.weight
            );
            return Ok(());
        }
    };
    let list: ListReply = decode(answer)?;
    if cli.json {
        return print_json(&list);
    }
    print!("{}", table(&list, sessions));
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, String> {
    serde_json::from_value(answer).map_err(|e| format!("unexpected answer from the daemon: {e}"))
}

/// The answer as JSON, its fields in the order of the protocol's documentation.
fn print_json(answer: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(answer).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Seconds as `0.123 s`, `12.35 s`, `4m05s` or `3h07m`.
fn duration(s: f64) -> String {
    let whole = s as u64;
    if s < 10.0 {
        format!("{s:.3} s")
    } else if s < 60.0 {
        format!("{s:.2} s")
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, whole / 60 % 60)
    }
}

/// Whole seconds as `42s`, `4m05s`, `3h07m` or `2d03h`.
fn uptime(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

fn state(vm: &VmView) -> &'static str {
    match vm.connected {
        Some(true) => "connected",
        Some(false) => "waiting",
        None => "-",
    }
}

/// The GPUs of the answer; for a daemon that does not list them, its one device with
/// every VM on it.
fn gpus_of(list: &ListReply) -> Vec<GpuView> {
    if !list.gpus.is_empty() {
        return list.gpus.clone();
    }
    let d = &list.device;
    let vms = &list.vms;
    vec![GpuView {
        index: 0,
        name: d.name.clone(),
        executor: d.executor.clone(),
        memory: d.memory,
        multiprocessors: d.multiprocessors,
        compute_capability: d.compute_capability.clone(),
        vms: u32::try_from(vms.len()).unwrap_or(u32::MAX),
        quota_committed: vms.iter().map(|v| v.mem_quota).sum(),
        mem_used: vms.iter().map(|v| v.mem_used).sum(),
        device_time_s: vms.iter().map(|v| v.device_time_s).sum(),
        recent_busy: 0.0,
    }]
}

/// Rows under a header and a rule, each column as wide as its widest cell: the first
/// `left` columns left-aligned, the others (numbers) right-aligned. Each row brings the
/// lines printed under it.
fn grid(header: &[&str], left: usize, rows: &[(Vec<String>, Vec<String>)]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            std::iter::once(&header)
                .chain(rows.iter().map(|(cells, _)| cells))
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: &[String]| {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c < left {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        format!("{}\n", cells.join("  ").trim_end())
    };
    let mut out = line(&header);
    let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(rule));
    out.push('\n');
    for (cells, extra) in rows {
        out.push_str(&line(cells));
        for l in extra {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// One row per GPU: its device, the VMs on it, the quota promised to them against its
/// memory, the memory they hold, their device time and how busy it was lately (their
/// device time over the window of SHARE, as a part of the window).
fn gpu_table(gpus: &[GpuView]) -> String {
    // Compute capability and multiprocessors where a GPU has them (not the CPU executor).
    let cuda = gpus.iter().any(|g| g.compute_capability != "0.0");
    let mut header = vec!["GPU", "DEVICE", "EXECUTOR"];
    if cuda {
        header.extend(["CC", "SMS"]);
    }
    header.extend([
        "VMS",
        "QUOTA COMMITTED / MEMORY",
        "USED",
        "DEVICE TIME",
        "BUSY",
    ]);
    let rows: Vec<(Vec<String>, Vec<String>)> = gpus
        .iter()
        .map(|g| {
            let mut cells = vec![g.index.to_string(), g.name.clone(), g.executor.clone()];
            if cuda {
                cells.extend([g.compute_capability.clone(), g.multiprocessors.to_string()]);
            }
            cells.extend([
                g.vms.to_string(),
                format!("{} / {} MiB", g.quota_committed >> 20, g.memory >> 20),
                format!("{} MiB", mib(g.mem_used)),
                duration(g.device_time_s),
                percent(g.recent_busy),
            ]);
            (cells, Vec::new())
        })
        .collect();
    let mut out = grid(&header, 3, &rows);
    if gpus.is_empty() {
        out.push_str("(no GPUs)\n");
    }
    out
}

/// The listing: a header with the device (or, for several GPUs, a table of them), then
/// one row per VM.
fn table(list: &ListReply, sessions: bool) -> String {
    let gpus = gpus_of(list);
    let d = &list.device;
    let mut out = String::new();
    if gpus.len() > 1 {
        out.push_str(&format!(
            "Daemon: up {}  GPUs: {}  VMs: {}\nSHARE: each VM's part of its GPU's device time \
             over the last {window:.0} s; ALL: since each VM was added\nBUSY: the part of \
             those {window:.0} s that its VMs' work took on the GPU\n\n",
            uptime(list.uptime_s),
            gpus.len(),
            list.vms.len(),
            window = list.recent_window_s,
        ));
        out.push_str(&gpu_table(&gpus));
        out.push('\n');
    } else {
        out.push_str(&format!(
            "Device: {}  executor: {}  memory: {} MiB",
            d.name,
            d.executor,
            d.memory >> 20
        ));
        if d.compute_capability != "0.0" {
            out.push_str(&format!(
                "  compute capability: {}  multiprocessors: {}",
                d.compute_capability, d.multiprocessors
            ));
        }
        out.push_str(&format!(
            "\nDaemon: up {}  VMs: {}  SHARE: device time share over the last {:.0} s; ALL: \
             since each VM was added\n\n",
            uptime(list.uptime_s),
            list.vms.len(),
            list.recent_window_s,
        ));
    }
    let header = [
        "VM",
        "TRANSPORT",
        "STATE",
        "GPU",
        "SESSIONS",
        "MEMORY USED / QUOTA",
        "WEIGHT",
        "DEVICE TIME",
        "SHARE",
        "ALL",
        "FAULTS",
    ];
    let rows: Vec<(Vec<String>, Vec<String>)> = list
        .vms
        .iter()
        .map(|vm| {
            let cells = vec![
                vm.name.clone(),
                vm.transport.clone(),
                state(vm).into(),
                vm.gpu.to_string(),
                vm.sessions.to_string(),
                format!("{} / {} MiB", mib(vm.mem_used), vm.mem_quota >> 20),
                vm.weight.to_string(),
                duration(vm.device_time_s),
                percent(vm.recent_share),
                percent(vm.share),
                vm.restarts.to_string(),
            ];
            let extra = if sessions {
                vm.session_rows
                    .iter()
                    .map(|s| {
                        format!(
                            "  session {}: device time {}",
                            s.id,
                            duration(s.device_time_s)
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            (cells, extra)
        })
        .collect();
    // Left-aligned: the first three columns; the others are numbers.
    out.push_str(&grid(&header, 3, &rows));
    if list.vms.is_empty() {
        out.push_str("(no VMs)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_mediator::control::{DeviceView, SessionView};

    fn vm(name: &str, connected: Option<bool>) -> VmView {
        VmView {
            name: name.into(),
            gpu: 0,
            transport: if connected.is_some() { "virtio" } else { "nfs" }.into(),
            endpoint: None,
            connected,
            sessions: 2,
            mem_used: 3 << 20,
            mem_quota: 512 << 20,
            allocations: 4,
            modules: 1,
            weight: 300,
            device_time_s: 75.5,
            share: 0.75,
            recent_share: 0.5,
            restarts: 1,
            timeouts: 0,
            requests: 10,
            session_rows: vec![SessionView {
                id: 1,
                device_time_s: 0.25,
            }],
        }
    }

    fn h200(index: u32, vms: u32) -> GpuView {
        GpuView {
            index,
            name: "NVIDIA H200".into(),
            executor: "cuda".into(),
            memory: 143_155 << 20,
            multiprocessors: 132,
            compute_capability: "9.0".into(),
            vms,
            quota_committed: u64::from(vms) * (512 << 20),
            mem_used: u64::from(vms) * (3 << 20),
            device_time_s: 151.0,
            recent_busy: 0.25,
        }
    }

    #[test]
    fn the_table_has_a_row_per_vm_under_the_device() {
        let list = ListReply {
            device: DeviceView {
                name: "NVIDIA H200 (mediated)".into(),
                executor: "cuda".into(),
                memory: 143_155 << 20,
                multiprocessors: 132,
                compute_capability: "9.0".into(),
            },
            gpus: vec![h200(0, 2)],
            uptime_s: 3725.0,
            recent_window_s: 10.0,
            vms: vec![vm("vm0", Some(true)), vm("nfs:vm1", None)],
        };
        let text = table(&list, true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("Device: NVIDIA H200 (mediated)  executor: cuda"));
        assert!(lines[1].contains("up 1h02m") && lines[1].contains("last 10 s"));
        let words = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            words(lines[3])[..5],
            ["VM", "TRANSPORT", "STATE", "GPU", "SESSIONS"]
        );
        assert!(lines[5].starts_with("vm0 "));
        assert_eq!(
            words(lines[5])[..5],
            ["vm0", "virtio", "connected", "0", "2"]
        );
        assert!(lines[5].contains("3 / 512 MiB") && lines[5].contains("1m15s"));
        assert!(lines[5].contains("50.0%") && lines[5].contains("75.0%"));
        assert_eq!(lines[6], "  session 1: device time 0.250 s");
        assert!(lines[7].starts_with("nfs:vm1") && lines[7].contains(" - "));
        assert!(!table(&list, false).contains("session 1"));
        // An answer without GPUs (an older daemon) shows the same.
        let older = ListReply {
            gpus: Vec::new(),
            ..list.clone()
        };
        assert_eq!(table(&older, true), text);
    }

    #[test]
    fn several_gpus_come_first_in_a_table_of_their_own() {
        let mut vm1 = vm("vm1", Some(false));
        vm1.gpu = 1;
        let list = ListReply {
            device: DeviceView {
                name: "NVIDIA H200".into(),
                executor: "cuda".into(),
                memory: 143_155 << 20,
                multiprocessors: 132,
                compute_capability: "9.0".into(),
            },
            gpus: vec![h200(0, 1), h200(1, 1)],
            uptime_s: 42.0,
            recent_window_s: 10.0,
            vms: vec![vm("vm0", Some(true)), vm1],
        };
        let text = table(&list, false);
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Daemon: up 42s  GPUs: 2  VMs: 2");
        assert!(lines[1]
            .starts_with("SHARE: each VM's part of its GPU's device time over the last 10 s"));
        assert_eq!(
            lines[2],
            "BUSY: the part of those 10 s that its VMs' work took on the GPU"
        );
        assert_eq!(lines[3], "");
        lines.drain(..2);
        assert!(lines[2].starts_with("GPU  DEVICE "), "{text}");
        assert!(lines[2].contains("QUOTA COMMITTED / MEMORY"), "{text}");
        assert!(lines[3].starts_with("---"));
        for (i, line) in lines[4..6].iter().enumerate() {
            assert!(
                line.starts_with(&format!("{i}    NVIDIA H200  cuda ")),
                "{text}"
            );
            assert!(line.contains(" 9.0  132 ") && line.contains("512 / 143155 MiB"));
            assert!(line.contains("  3 MiB ") && line.contains("2m31s") && line.ends_with("25.0%"));
        }
        assert_eq!(lines[6], "");
        assert!(lines[7].starts_with("VM "), "{text}");
        let words = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(words(lines[9])[..4], ["vm0", "virtio", "connected", "0"]);
        assert_eq!(words(lines[10])[..4], ["vm1", "virtio", "waiting", "1"]);
        // `gpus` alone: the same table.
        assert_eq!(gpu_table(&list.gpus), lines[2..6].join("\n") + "\n");
    }

    #[test]
    fn set_needs_a_quota_or_a_weight() {
        let parse = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("vgpu-admin").chain(a.iter().copied()))
        };
        assert!(parse(&["set", "vm0"]).is_err());
        assert!(parse(&["set", "vm0", "--weight", "3"]).is_ok());
        assert!(parse(&["set", "vm0", "--quota", "1G", "--weight", "3"]).is_ok());
        assert!(matches!(parse(&["gpus"]).unwrap().command, Some(Cmd::Gpus)));
        assert!(parse(&["gpus", "--json"]).unwrap().json);
        let c = parse(&["--json"]).unwrap();
        assert!(c.json && c.command.is_none());
        assert_eq!(c.control, PathBuf::from("/run/vhost-vgpu/vm.control"));
    }
}
