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
