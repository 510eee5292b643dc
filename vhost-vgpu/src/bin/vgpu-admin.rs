// SPDX-License-Identifier: Apache-2.0
//! `vgpu-admin`: the host's view of the VMs a `vhost-vgpu` (or `vgpu-mediator serve
//! --control`) daemon serves, and their memory quota and weight changed at run time,
//! through the daemon's control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use vgpu_mediator::control::{self, ListReply, SetReply, VmView};
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
        killed workers, kernel timeouts). A quota or weight set here holds until the \
        daemon stops (a SIGHUP reload of --weights sets the weights from the file again)."
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
    /// Lists the device and the VMs (the default).
    List {
        /// Also one row per session (guest process) with its device time.
        #[arg(long)]
        sessions: bool,
    },
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

/// The listing: a header with the device, then one row per VM.
fn table(list: &ListReply, sessions: bool) -> String {
    let d = &list.device;
    let mut out = format!(
        "Device: {}  executor: {}  memory: {} MiB",
        d.name,
        d.executor,
        d.memory >> 20
    );
    if d.compute_capability != "0.0" {
        out.push_str(&format!(
            "  compute capability: {}  multiprocessors: {}",
            d.compute_capability, d.multiprocessors
        ));
    }
    out.push_str(&format!(
        "\nDaemon: up {}  VMs: {}  SHARE: device time share over the last {:.0} s; ALL: since \
         each VM was added\n\n",
        uptime(list.uptime_s),
        list.vms.len(),
        list.recent_window_s,
    ));
    let header = [
        "VM",
        "TRANSPORT",
        "STATE",
        "SESSIONS",
        "MEMORY USED / QUOTA",
        "WEIGHT",
        "DEVICE TIME",
        "SHARE",
        "ALL",
        "FAULTS",
    ];
    // Left-aligned: the first three columns; the others are numbers.
    let left = 3;
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let mut extra: Vec<Vec<String>> = Vec::new();
    for vm in &list.vms {
        rows.push(vec![
            vm.name.clone(),
            vm.transport.clone(),
            state(vm).into(),
            vm.sessions.to_string(),
            format!("{} / {} MiB", mib(vm.mem_used), vm.mem_quota >> 20),
            vm.weight.to_string(),
            duration(vm.device_time_s),
            percent(vm.recent_share),
            percent(vm.share),
            vm.restarts.to_string(),
        ]);
        extra.push(if sessions {
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
        });
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
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
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(rule));
            out.push('\n');
        } else {
            for line in &extra[i - 1] {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if list.vms.is_empty() {
        out.push_str("(no VMs)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_mediator::control::{DeviceView, SessionView};

    #[test]
    fn the_table_has_a_row_per_vm_under_the_device() {
        let vm = |name: &str, connected: Option<bool>| VmView {
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
        };
        let list = ListReply {
            device: DeviceView {
                name: "NVIDIA H200 (mediated)".into(),
                executor: "cuda".into(),
                memory: 143_155 << 20,
                multiprocessors: 132,
                compute_capability: "9.0".into(),
            },
            gpus: Vec::new(),
            uptime_s: 3725.0,
            recent_window_s: 10.0,
            vms: vec![vm("vm0", Some(true)), vm("nfs:vm1", None)],
        };
        let text = table(&list, true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("Device: NVIDIA H200 (mediated)  executor: cuda"));
        assert!(lines[1].contains("up 1h02m") && lines[1].contains("last 10 s"));
        assert!(lines[3].starts_with("VM "));
        assert!(lines[5].starts_with("vm0 ") && lines[5].contains("connected"));
        assert!(lines[5].contains("3 / 512 MiB") && lines[5].contains("1m15s"));
        assert!(lines[5].contains("50.0%") && lines[5].contains("75.0%"));
        assert_eq!(lines[6], "  session 1: device time 0.250 s");
        assert!(lines[7].starts_with("nfs:vm1") && lines[7].contains(" - "));
        assert!(!table(&list, false).contains("session 1"));
    }

    #[test]
    fn set_needs_a_quota_or_a_weight() {
        let parse = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("vgpu-admin").chain(a.iter().copied()))
        };
        assert!(parse(&["set", "vm0"]).is_err());
        assert!(parse(&["set", "vm0", "--weight", "3"]).is_ok());
        assert!(parse(&["set", "vm0", "--quota", "1G", "--weight", "3"]).is_ok());
        let c = parse(&["--json"]).unwrap();
        assert!(c.json && c.command.is_none());
        assert_eq!(c.control, PathBuf::from("/run/vhost-vgpu/vm.control"));
    }
}
