// SPDX-License-Identifier: Apache-2.0
//! `vgpu-smi`: what each vGPU device is, and this VM's use of it.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use vgpu::{Device, Error, InfoReply};

/// Shows each vGPU device: name, executor, the host GPU it is placed on, memory quota and
/// use, sessions, compute capability and multiprocessors.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Show only /dev/vgpuN (default: every device present).
    #[arg(long, value_name = "N")]
    device: Option<u32>,
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

fn print(index: u32, info: &InfoReply) {
    let c = &info.config;
    println!("vgpu{index}: {}", c.name);
    println!("  executor            {}", c.executor.name());
    // The host's index: with several GPUs there, which one this device's work runs on.
    println!("  host GPU            {}", c.gpu);
    println!("  compute capability  {}.{}", c.cc_major, c.cc_minor);
    println!("  multiprocessors     {}", c.multiprocessors);
    println!("  device memory       {}", mib(c.device_memory));
    println!("  memory quota        {}", mib(c.mem_quota));
    println!(
        "  memory used         {} in {} allocations",
        mib(info.mem_used),
        info.allocations
    );
    println!(
        "  sessions            {} of {} (this one included)",
        info.sessions, c.max_sessions
    );
    println!("  modules             {}", info.modules);
    println!("  weight              {}", info.weight);
    println!("  protocol version    {}", c.version);
}

fn run(indices: &[u32]) -> Result<(), Error> {
    for (i, &index) in indices.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let info = Device::open(index)?.session()?.info()?;
        print(index, &info);
    }
    Ok(())
}

/// The kernel's marker at the end of a signed module file.
const MODULE_SIG_MARKER: &[u8] = b"~Module signature appended~\n";

/// Why there is no /dev/vgpuN, as far as this machine tells: the driver is loaded without a
/// device, or it is not loaded, and then whether the kernel loads only signed modules and
/// whether the installed vgpu.ko is signed, with the kernel's last refusal from its log.
fn why_no_device() -> String {
    if Path::new("/sys/module/vgpu").exists() {
        return "the vgpu driver is loaded but has no device (does the VM have the vGPU \
                device? lspci -nn shows it as [1af4:1056])"
            .into();
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let modules = Path::new("/lib/modules").join(release.trim());
    let said = kernel_refusal()
        .map(|line| format!("; the kernel logged: \"{line}\""))
        .unwrap_or_default();
    let Some(module) = installed_module(&modules) else {
        let dep = modules.join("modules.dep");
        return format!(
            "the vgpu driver is not loaded and {} names no vgpu module{said}",
            dep.display()
        );
    };
    let m = module.display();
    let Some((how, mok)) = enforcement() else {
        return format!("the vgpu driver is not loaded (modprobe vgpu){said}");
    };
    // Without Secure Boot the kernel loads no Machine Owner Key at all.
    let no_mok = "without UEFI Secure Boot (this kernel is not locked down) it trusts no \
                  Machine Owner Key: boot with Secure Boot on and the signing key enrolled, or \
                  without module.sig_enforce=1 (docs/secure-boot.md)";
    match signed(&module) {
        Some(false) => format!(
            "the vgpu driver is not loaded: {m} is not signed and this kernel loads only \
             signed modules ({how}), so it refuses it ('Key was rejected by service'); {}{said}",
            if mok {
                "sign it with a key enrolled as a Machine Owner Key, as DKMS does with \
                 /var/lib/dkms/mok.key (docs/secure-boot.md)"
            } else {
                no_mok
            }
        ),
        Some(true) => format!(
            "the vgpu driver is not loaded: this kernel loads only modules signed with a key \
             it trusts ({how}); {m} is signed: if modprobe vgpu says 'Key was rejected by \
             service', {}{said}",
            if mok {
                "enroll the certificate of the key that signed it as a Machine Owner Key \
                 (mokutil --import, confirmed at the next boot; docs/secure-boot.md)"
            } else {
                no_mok
            }
        ),
        None => format!(
            "the vgpu driver is not loaded and this kernel loads only signed modules ({how}): \
             is {m} signed with a key it trusts? (docs/secure-boot.md){said}"
        ),
    }
}

/// How this kernel enforces module signatures (None: it loads unsigned modules), and
/// whether a Machine Owner Key can help: true when it is locked down as under UEFI Secure
/// Boot (or its lockdown state is unknown, securityfs not mounted), false when it enforces
/// by module.sig_enforce=1 alone, not locked down, so booted without Secure Boot.
fn enforcement() -> Option<(String, bool)> {
    let lockdown = fs::read_to_string("/sys/kernel/security/lockdown").ok();
    let mode = lockdown
        .as_deref()
        .and_then(|l| l.split('[').nth(1)?.split(']').next());
    if let Some(mode) = mode.filter(|m| *m != "none") {
        return Some((
            format!("kernel lockdown '{mode}', as under UEFI Secure Boot"),
            true,
        ));
    }
    let sig = fs::read_to_string("/sys/module/module/parameters/sig_enforce").unwrap_or_default();
    (sig.trim() == "Y").then(|| ("module.sig_enforce=1".into(), lockdown.is_none()))
}

/// The vgpu module modprobe would load: its line in DIR/modules.dep.
fn installed_module(dir: &Path) -> Option<PathBuf> {
    let dep = fs::read_to_string(dir.join("modules.dep")).ok()?;
    dep.lines()
        .filter_map(|line| line.split(':').next())
        .find(|path| {
            let name = path.rsplit('/').next().unwrap_or_default();
            name == "vgpu.ko" || name.starts_with("vgpu.ko.")
        })
        .map(|path| dir.join(path))
}

/// Whether a module file carries a signature; None when it cannot tell (a compressed or
/// unreadable file).
fn signed(module: &Path) -> Option<bool> {
    if module.extension()? != "ko" {
        return None;
    }
    let mut file = File::open(module).ok()?;
    let mut tail = [0u8; MODULE_SIG_MARKER.len()];
    file.seek(SeekFrom::End(-(tail.len() as i64))).ok()?;
    file.read_exact(&mut tail).ok()?;
    Some(tail == MODULE_SIG_MARKER)
}

/// The kernel's last word on refusing a module for its signature, from /dev/kmsg (readable
/// by root; None otherwise).
fn kernel_refusal() -> Option<String> {
    let mut kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut last = None;
    let mut record = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&record[..n]);
                // "PRIORITY,SEQUENCE,TIME,FLAGS;MESSAGE", then continuation lines.
                let message = text.split_once(';').map_or("", |(_, m)| m);
                let message = message.lines().next().unwrap_or_default();
                if is_refusal(message) {
                    last = Some(message.to_string());
                }
            }
            // EPIPE: records were overwritten while reading; the next read goes on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    last
}

/// A kernel message about a module refused or tainted for its signature.
fn is_refusal(message: &str) -> bool {
    (message.starts_with("Loading of ") && message.ends_with(" is rejected"))
        || message.contains("module verification failed")
        || (message.starts_with("Lockdown: ") && message.contains("module loading is restricted"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let indices = match args.device {
        Some(n) => vec![n],
        None => Device::list(),
    };
    if indices.is_empty() {
        eprintln!(
            "vgpu-smi: error: no vGPU device: /dev/vgpu* not found: {}",
            why_no_device()
        );
        return ExitCode::FAILURE;
    }
    match run(&indices) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-smi: error: {}", e.report());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_module_in_modules_dep() {
        let dir = std::env::temp_dir().join(format!("vgpu-smi-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("updates/dkms")).unwrap();
        let virtio = "kernel/drivers/virtio/virtio.ko";
        let dep = format!("{virtio}:\nupdates/dkms/vgpu.ko: {virtio}\n");
        fs::write(dir.join("modules.dep"), dep).unwrap();
        let module = installed_module(&dir).unwrap();
        assert_eq!(module, dir.join("updates/dkms/vgpu.ko"));
        let elf = [0x7fu8; 64];
        fs::write(&module, elf).unwrap();
        assert_eq!(signed(&module), Some(false));
        fs::write(&module, [&elf[..], MODULE_SIG_MARKER].concat()).unwrap();
        assert_eq!(signed(&module), Some(true));
        fs::write(dir.join("modules.dep"), format!("{virtio}:\n")).unwrap();
        assert_eq!(installed_module(&dir), None);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn recognises_the_kernels_refusals() {
        for refusal in [
            "Loading of unsigned module is rejected",
            "Loading of module with unavailable key is rejected",
            "Lockdown: modprobe: unsigned module loading is restricted; see man kernel_lockdown.7",
            "vgpu: module verification failed: signature and/or required key missing - tainting \
             kernel",
        ] {
            assert!(is_refusal(refusal), "{refusal}");
        }
        assert!(!is_refusal(
            "vgpu: loading out-of-tree module taints kernel."
        ));
    }
}
