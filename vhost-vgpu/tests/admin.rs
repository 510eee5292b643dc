// SPDX-License-Identifier: Apache-2.0
//! `vgpu-admin`, the built binary, against a daemon's control socket.

use std::path::Path;
use std::process::{Command, Output};

use vgpu_mediator::ExecutorChoice;
use vhost_vgpu::{Daemon, VgpuConfig};
use vmm_sys_util::tempdir::TempDir;

fn admin(control: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vgpu-admin"))
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vgpu-admin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[test]
fn vgpu_admin_lists_the_vms_and_sets_quota_and_weight() {
    let dir = TempDir::new().unwrap();
    let control = dir.as_path().join("vm.control");
    let config = VgpuConfig {
        socket_count: 2,
        executor: ExecutorChoice::Cpu,
        mem_quota: Some(64 << 20),
        control: Some(control.clone()),
        ..VgpuConfig::new(dir.as_path().join("vm"))
    };
    let daemon = Daemon::start(config).unwrap();
    let m = daemon.mediator();
    let [vm0, vm1] = [daemon.tenants()[0], daemon.tenants()[1]];

    let table = stdout(&admin(&control, &[]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("Device: "), "{table}");
    assert!(lines[0].contains("executor: cpu"), "{table}");
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_string()
    };
    for name in ["vm0", "vm1"] {
        let r = row(name);
        assert!(r.contains("virtio") && r.contains("waiting"), "{r}");
        assert!(r.contains("0 / 64 MiB") && r.contains(" 100 "), "{r}");
    }
    // `list` is the default; past the header (the daemon's uptime) the same.
    let again = stdout(&admin(&control, &["list"]));
    assert_eq!(again.lines().skip(2).collect::<Vec<_>>(), lines[2..]);

    let out = stdout(&admin(&control, &["set", "vm1", "--weight", "300"]));
    assert_eq!(out.trim(), "vm1: quota 64 MiB (0 MiB in use), weight 300");
    assert_eq!(m.weight(vm1), Some(300));
    let out = stdout(&admin(&control, &["set", "vm0", "--quota", "512M"]));
    assert!(out.starts_with("vm0: quota 512 MiB"), "{out}");
    assert_eq!(m.quota(vm0), Some(512 << 20));
    let out = stdout(&admin(
        &control,
        &["--json", "set", "vm0", "--quota", "48M", "--weight", "7"],
    ));
    let set: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (set["mem_quota"].as_u64(), set["weight"].as_u64()),
        (Some(48 << 20), Some(7))
    );

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&admin(&control, &["--json"]))).unwrap();
    let vms = json["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0]["name"], "vm0");
    assert_eq!(vms[0]["mem_quota"].as_u64(), Some(48 << 20));
    assert_eq!(vms[1]["weight"].as_u64(), Some(300));
    assert_eq!(json["device"]["executor"], "cpu");
    // One GPU: it holds both VMs and both quotas.
    assert_eq!(json["gpus"].as_array().map(Vec::len), Some(1));
    assert_eq!(json["gpus"][0]["vms"].as_u64(), Some(2));
    assert_eq!(
        json["gpus"][0]["quota_committed"].as_u64(),
        Some((48 << 20) + (64 << 20))
    );
    assert_eq!(
        (vms[0]["gpu"].as_u64(), vms[1]["gpu"].as_u64()),
        (Some(0), Some(0))
    );
    let table = stdout(&admin(&control, &[]));
    assert!(table.contains("0 / 48 MiB"), "{table}");

    // Errors: one line, exit status 1.
    let e = stderr(&admin(&control, &["set", "vm9", "--weight", "3"]));
    assert_eq!(e, "vgpu-admin: no VM named \"vm9\" (VMs: vm0, vm1)\n");
    let e = stderr(&admin(&control, &["set", "vm0", "--weight", "0"]));
    assert!(
        e.starts_with("vgpu-admin: bad weight 0") && e.lines().count() == 1,
        "{e}"
    );
    let e = stderr(&admin(&control, &["set", "vm0", "--quota", "lots"]));
    assert!(
        e.starts_with("vgpu-admin: bad quota") && e.lines().count() == 1,
        "{e}"
    );
    assert_eq!(m.quota(vm0), Some(48 << 20));

    daemon.stop().unwrap();
    let e = stderr(&admin(&control, &[]));
    assert!(
        e.starts_with(&format!(
            "vgpu-admin: cannot reach the daemon at {}: ",
            control.display()
        )) && e.lines().count() == 1,
        "{e}"
    );
}

/// Opens a session on the tenant and runs a small kernel: some device time.
fn work(m: &vgpu_mediator::Mediator, t: vgpu_mediator::TenantId) {
    use vgpu_protocol::{Command, Launch, Param, Request, Status, BUILTIN_MODULE};
    let call = |session: u64, command: Command| {
        let r = m.call(t, Request::new(session, command.clone()));
        assert_eq!(r.status, Status::Ok, "{command:?}");
        r.value0
    };
    let s = call(0, Command::SessionOpen);
    let x = call(s, Command::Alloc { size: 4096 });
    call(
        s,
        Command::Launch(Launch {
            module: BUILTIN_MODULE,
            kernel: "fill_u32".into(),
            grid: [1, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
            params: vec![Param::Buffer(x), Param::u32(7), Param::u32(256)],
        }),
    );
    call(s, Command::Sync);
}

#[test]
fn vgpu_admin_shows_each_gpu_and_the_gpu_of_each_vm() {
    use std::sync::Arc;
    use vgpu_mediator::cpu::CpuExecutorFactory;
    use vgpu_mediator::{ExecutorFactory, Limits, Mediator, SchedConfig};

    let dir = TempDir::new().unwrap();
    let control = dir.as_path().join("vm.control");
    let config = VgpuConfig {
        socket_count: 3,
        mem_quota: Some(64 << 20),
        control: Some(control.clone()),
        ..VgpuConfig::new(dir.as_path().join("vm"))
    };
    let factory = || -> Arc<dyn ExecutorFactory> { Arc::new(CpuExecutorFactory::simulated(2)) };
    let memory = CpuExecutorFactory::simulated(2).device().total_memory;
    let mediator = Mediator::with_gpus(
        vec![(0, factory()), (1, factory())],
        Limits::default(),
        SchedConfig::default(),
    );
    let daemon = Daemon::start_with_mediator(&config, mediator).unwrap();
    let m = daemon.mediator();
    let [vm0, vm1, vm2] = [0, 1, 2].map(|i| daemon.tenants()[i]);
    // Placed where the most memory is unpromised, then on the lower index.
    let placed: Vec<Option<u32>> = [vm0, vm1, vm2].iter().map(|&t| m.tenant_gpu(t)).collect();
    assert_eq!(placed, [Some(0), Some(1), Some(0)]);
    for t in [vm0, vm1, vm2] {
        work(&m, t);
    }

    // The GPUs first, then the VMs with their GPU.
    let table = stdout(&admin(&control, &["list"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("Daemon: up "), "{table}");
    assert!(lines[0].ends_with("  GPUs: 2  VMs: 3"), "{table}");
    assert!(
        lines[1].starts_with("SHARE: each VM's part of its GPU's"),
        "{table}"
    );
    let words = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let header = lines.iter().position(|l| l.starts_with("GPU ")).unwrap();
    assert_eq!(words(lines[header])[..3], ["GPU", "DEVICE", "EXECUTOR"]);
    for (i, (vms, committed)) in [(2, 128), (1, 64)].into_iter().enumerate() {
        let row = lines[header + 2 + i];
        assert!(row.starts_with(&format!("{i} ")), "{table}");
        assert!(row.contains("  cpu "), "{row}");
        assert!(
            row.contains(&format!(" {vms}  "))
                && row.contains(&format!("{committed} / {} MiB", memory >> 20)),
            "{row}"
        );
    }
    let row = |name: &str| {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"));
        words(line)
    };
    assert!(lines
        .iter()
        .any(|l| words(l).get(..4)
            == Some(&["VM", "TRANSPORT", "STATE", "GPU"].map(String::from)[..])));
    for (name, gpu) in [("vm0", "0"), ("vm1", "1"), ("vm2", "0")] {
        assert_eq!(row(name)[..4], [name, "virtio", "waiting", gpu], "{table}");
    }
    // vm1 is alone on GPU 1: all of that GPU's device time is its own.
    let vm1_row = row("vm1");
    assert_eq!(vm1_row[vm1_row.len() - 2], "100.0%", "{table}");

    // `gpus`: the table of GPUs alone.
    // Past BUSY, which moves with the time of the listing, the same as in `list`.
    let gpus = stdout(&admin(&control, &["gpus"]));
    let gpus: Vec<&str> = gpus.lines().collect();
    assert_eq!(gpus.len(), 4, "{gpus:?}");
    assert_eq!(gpus[0], lines[header]);
    assert!(gpus[1].starts_with("---"));
    for (line, listed) in gpus[2..].iter().zip(&lines[header + 2..header + 4]) {
        let (mut a, mut b) = (words(line), words(listed));
        a.pop();
        b.pop();
        assert_eq!(a, b);
    }
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&admin(&control, &["--json", "gpus"]))).unwrap();
    let gpus = json.as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(
        (gpus[1]["index"].as_u64(), gpus[1]["vms"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(gpus[0]["quota_committed"].as_u64(), Some(128 << 20));
    assert_eq!(gpus[0]["memory"].as_u64(), Some(memory));

    // `--json`: the new fields pass through.
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&admin(&control, &["--json"]))).unwrap();
    assert_eq!(json["gpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["gpus"][1]["mem_used"], m.usage(vm1).unwrap().mem_used);
    let vms = json["vms"].as_array().unwrap();
    let gpu_of: Vec<(&str, u64)> = vms
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["gpu"].as_u64().unwrap()))
        .collect();
    assert_eq!(gpu_of, [("vm0", 0), ("vm1", 1), ("vm2", 0)]);
    assert_eq!(vms[1]["share"].as_f64(), Some(1.0));
    let (s0, s2) = (
        vms[0]["share"].as_f64().unwrap(),
        vms[2]["share"].as_f64().unwrap(),
    );
    assert!(
        s0 > 0.0 && s2 > 0.0 && (s0 + s2 - 1.0).abs() < 1e-9,
        "{s0} {s2}"
    );

    daemon.stop().unwrap();
}
