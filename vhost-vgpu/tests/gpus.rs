// SPDX-License-Identifier: Apache-2.0
//! The daemon on several (simulated) GPUs: each socket's VM placed by `--gpu`, by its
//! line in the weights file or automatically, its quota and weight from the same places,
//! and the device each guest sees names its GPU and that GPU's memory. Bad placements are
//! refused at start with one line.

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use vgpu_mediator::{ExecutorChoice, Placement};
use vgpu_protocol::{Command, InfoReply, Request, Status};
use vhost_vgpu::testvmm::Vm;
use vhost_vgpu::{Daemon, VgpuConfig};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vgpu-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A session, a buffer, a fill and a read back through the socket: the VM works.
fn works(vm: &mut Vm) {
    let mut call = |session: u64, command: Command| {
        let (h, data) = vm.request(&Request::new(session, command)).unwrap();
        assert_eq!(h.status, Status::Ok, "detail {}", h.detail);
        (h, data)
    };
    let s = call(0, Command::SessionOpen).0.value0;
    let b = call(s, Command::Alloc { size: 256 }).0.value0;
    call(
        s,
        Command::Memset {
            dst: b,
            offset: 0,
            len: 256,
            value: 7,
            width: 1,
        },
    );
    let (_, data) = call(
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len: 256,
        },
    );
    assert_eq!(data, vec![7u8; 256]);
    call(s, Command::SessionClose);
}

#[test]
fn sockets_are_placed_by_flag_by_file_or_automatically_and_guests_see_their_gpu() {
    let dir = temp_dir("gpus-place");
    let weights = dir.join("weights");
    // vm3 is pinned to GPU 0 with its own quota and weight by the file; vm0 is pinned to
    // GPU 1 by --gpu although the file says 0; vm1 and vm2 go where fewest VMs are.
    std::fs::write(&weights, "vm3 300 gpu=0 quota=64M\nvm0 100 gpu=0\n").unwrap();
    let config = VgpuConfig {
        socket_count: 4,
        executor: ExecutorChoice::SimulatedCpu(2),
        placements: vec![
            Placement::Gpu(1),
            Placement::Auto,
            Placement::Auto,
            Placement::Auto,
        ],
        weights_file: Some(weights),
        ..VgpuConfig::new(dir.join("vm"))
    };
    let daemon = Daemon::start(config).unwrap();
    let m = daemon.mediator();
    assert_eq!(m.gpus(), [0, 1]);
    let total = m.gpu_device(0).unwrap().total_memory;
    let placed: Vec<(Option<u32>, Option<u64>, Option<u32>)> = daemon
        .tenants()
        .iter()
        .map(|&t| (m.tenant_gpu(t), m.quota(t), m.weight(t)))
        .collect();
    // vm3 (named) on 0; vm0 (flag) on 1; then vm1 where fewest VMs are and, on a tie, most
    // memory unpromised (GPU 1: vm3's 64M is promised on GPU 0); vm2 on GPU 0. The VMs
    // without a quota split their GPU evenly.
    assert_eq!(
        placed,
        [
            (Some(1), Some(total / 2), Some(100)),
            (Some(1), Some(total / 2), Some(100)),
            (Some(0), Some(total), Some(100)),
            (Some(0), Some(64 << 20), Some(300)),
        ]
    );
    for (i, socket) in daemon.sockets().iter().enumerate() {
        let mut vm = Vm::connect(socket).unwrap();
        let gpu = placed[i].0.unwrap();
        assert_eq!(vm.config().gpu, gpu, "vm{i}");
        assert_eq!(vm.config().mem_quota, placed[i].1.unwrap(), "vm{i}");
        assert_eq!(
            vm.config().device_memory,
            m.gpu_device(gpu).unwrap().total_memory
        );
        let (h, data) = vm.request(&Request::new(0, Command::Info)).unwrap();
        assert_eq!(h.status, Status::Ok);
        assert_eq!(InfoReply::decode(&data).unwrap().config.gpu, gpu);
        works(&mut vm);
    }
    daemon.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vhost-vgpu` with `args` after the socket: its exit status and last stderr line.
fn refused(dir: &Path, args: &[&str]) -> String {
    let out = Process::new(env!("CARGO_BIN_EXE_vhost-vgpu"))
        .arg("--socket-path")
        .arg(dir.join("vm"))
        .args(["--no-control", "--executor", "cpu:2"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.lines().last().unwrap_or_default().to_string()
}

#[test]
fn placements_that_cannot_be_had_are_refused_at_start_with_one_line() {
    let dir = temp_dir("gpus-refused");
    assert_eq!(
        refused(&dir, &["--socket-count", "3", "--gpu", "0,1"]),
        "vhost-vgpu: error: --gpu names 2 GPUs for 3 sockets: give one per socket, or one for all"
    );
    assert_eq!(
        refused(&dir, &["--gpu", "5"]),
        "vhost-vgpu: error: placing the VMs on GPUs: no GPU 5 (GPUs: 0, 1)"
    );
    assert_eq!(
        refused(&dir, &["--gpus", "1", "--gpu", "0"]),
        "vhost-vgpu: error: placing the VMs on GPUs: no GPU 0 (GPUs: 1)"
    );
    assert_eq!(
        refused(&dir, &["--gpus", "2"]),
        "vhost-vgpu: error: --gpus: no GPU 2 (cpu:2 has GPUs 0 to 1; cpu:N presents N)"
    );
    assert_eq!(
        refused(&dir, &["--gpus", "1,1"]),
        "vhost-vgpu: error: --gpus: GPU 1 is named twice"
    );
    let weights = dir.join("weights");
    std::fs::write(&weights, "vm0 100 gpu=one\n").unwrap();
    let line = refused(&dir, &["--weights", weights.to_str().unwrap()]);
    assert!(
        line.ends_with("line 1: gpu=one: 'one' is neither a GPU index nor auto"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
