// SPDX-License-Identifier: Apache-2.0
//! Executor workers are confined: an unprivileged user when started as root,
//! no_new_privs, not dumpable, and a seccomp allow-list that refuses what a compromised
//! worker would try (exec, new processes, network, ptrace, creating files, signalling
//! other processes).

use std::process::Command;

use vgpu_mediator::process::{ProcessExecutorFactory, WORKER_ENV};
use vgpu_mediator::sandbox;

const WORKER: &str = env!("CARGO_BIN_EXE_vgpu-executor-worker");
const PROBE_ENV: &str = "VGPU_SANDBOX_PROBE_CHILD";

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn a_worker_runs_unprivileged_with_no_new_privs_and_the_seccomp_filter() {
    std::env::set_var(WORKER_ENV, WORKER);
    let factory = ProcessExecutorFactory::cpu().unwrap();
    let exec = factory
        .spawn()
        .expect("a confined worker starts and serves");
    let pid = exec.pid();
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{set}");
    }
    if sandbox::seccomp_by_default() {
        assert_eq!(status_field(pid, "Seccomp"), "2", "filter mode");
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let uids = status_field(pid, "Uid");
        let want = factory.sandbox().user.as_ref().unwrap().uid;
        assert_eq!(
            uids.split_whitespace().collect::<Vec<_>>(),
            vec![want.to_string(); 4],
            "real, effective, saved and filesystem uid"
        );
        assert_ne!(want, 0);
        assert_eq!(status_field(pid, "Groups"), "");
    }
    drop(exec);
}

/// Runs in a child process of this test binary (see below): confines itself exactly as
/// a worker does, then tries what an attacker in a worker would.
#[test]
fn sandbox_probe_child() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    sandbox::confine(None, None, None, sandbox::DEFAULT_MAX_TASKS).unwrap();
    sandbox::install_seccomp().unwrap();
    let mut report = Vec::new();
    let mut attempt = |name: &str, rc: i64| {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        report.push(format!("{name}={}", if rc < 0 { errno } else { 0 }));
    };
    // SAFETY: plain system calls; none of them succeeds (that is the point), and those
    // that would are harmless here.
    unsafe {
        let sh = c"/bin/true";
        let argv = [sh.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        attempt(
            "execve",
            libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) as i64,
        );
        attempt("fork", libc::syscall(libc::SYS_fork));
        attempt(
            "clone-process",
            libc::syscall(libc::SYS_clone, libc::SIGCHLD as u64, 0, 0, 0, 0),
        );
        attempt(
            "socket-inet",
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
        );
        attempt(
            "ptrace",
            libc::ptrace(libc::PTRACE_ATTACH, libc::getppid(), 0, 0) as i64,
        );
        attempt("kill-parent", libc::kill(libc::getppid(), 0) as i64);
        let path = c"/tmp/vgpu-sandbox-probe-created";
        attempt(
            "create-file",
            libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600) as i64,
        );
        attempt("setuid-0", libc::setuid(0) as i64);
        attempt("unshare", libc::unshare(libc::CLONE_NEWUSER) as i64);
        // What a worker needs still works.
        let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
        attempt("open-read", if fd >= 0 { 0 } else { -1 });
        let t = std::thread::spawn(|| 7).join().unwrap();
        attempt("thread", if t == 7 { 0 } else { -1 });
    }
    println!("PROBE {}", report.join(" "));
}

#[test]
fn the_seccomp_filter_refuses_what_a_compromised_worker_would_try() {
    if !sandbox::seccomp_supported() {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sandbox_probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "no report from the probe: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let results: std::collections::HashMap<&str, i32> = line
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    for denied in [
        "execve",
        "fork",
        "clone-process",
        "socket-inet",
        "ptrace",
        "kill-parent",
        "create-file",
        "unshare",
    ] {
        assert_eq!(results[denied], libc::EPERM, "{denied} in {line}");
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(results["setuid-0"], 0, "{line}");
    }
    assert_eq!(results["open-read"], 0, "{line}");
    assert_eq!(results["thread"], 0, "{line}");
    assert!(!std::path::Path::new("/tmp/vgpu-sandbox-probe-created").exists());
}
