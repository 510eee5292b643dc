// SPDX-License-Identifier: Apache-2.0
//! Per-VM settings from a file (`--weights FILE`), read at start and again on SIGHUP.
//!
//! One VM per line: its name (the socket's file name such as `vm0`, or an NFS VM
//! directory's name, as `nfs:vm1` or as `vm1` when no socket has that name) and its weight, a whole number of at least 1, separated by spaces or
//! `=`; then, optionally, `gpu=N` (the host GPU the VM is placed on, or `gpu=auto`) and
//! `quota=SIZE` (its device-memory quota, e.g. `quota=8G`). `#` starts a comment; blank
//! lines are ignored. VMs the file does not name get `--weight`, their socket's `--gpu`
//! and `--mem-quota`. A file that does not parse changes nothing: the daemon refuses to
//! start with it, and a reload keeps the settings in force.
//!
//! A reload applies weights and quotas at once; a VM's GPU is chosen when its tenant is
//! added (at start), so a changed `gpu=` is reported and takes effect at the next start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vgpu_mediator::{Mediator, Placement};

/// One VM's line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSettings {
    pub weight: u32,
    /// `gpu=`: where the VM is placed.
    pub gpu: Option<Placement>,
    /// `quota=`: its device-memory quota in bytes.
    pub quota: Option<u64>,
}

impl VmSettings {
    /// A line with a weight only.
    pub fn weight(weight: u32) -> VmSettings {
        VmSettings {
            weight,
            gpu: None,
            quota: None,
        }
    }
}

/// Settings by VM name.
pub type Weights = BTreeMap<String, VmSettings>;

/// Why a weights file was not used.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} line {1}: {2}")]
    Line(PathBuf, usize, String),
}

/// Parses a weights file's text; errors name the line.
pub fn parse(text: &str) -> Result<Weights, (usize, String)> {
    let mut weights = Weights::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| (i + 1, why);
        let expected = || {
            bad(format!(
                "expected `NAME WEIGHT [gpu=N] [quota=SIZE]`, got `{line}`"
            ))
        };
        // NAME, then an optional `=`, then WEIGHT: `vm0 100`, `vm1=300`, `vm2 = 7`.
        let name_end = line
            .find(|c: char| c.is_whitespace() || c == '=')
            .ok_or_else(expected)?;
        let name = &line[..name_end];
        let rest = line[name_end..].trim_start();
        let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
        let mut parts = rest.split_whitespace();
        let weight = parts.next().ok_or_else(expected)?;
        let weight: u32 = weight
            .parse()
            .ok()
            .filter(|&w| w >= 1)
            .ok_or_else(|| bad(format!("weight `{weight}` is not a whole number >= 1")))?;
        let mut settings = VmSettings::weight(weight);
        for option in parts {
            match option.split_once('=') {
                Some(("gpu", v)) if settings.gpu.is_none() => {
                    settings.gpu = Some(v.parse().map_err(|e| bad(format!("gpu={v}: {e}")))?);
                }
                Some(("quota", v)) if settings.quota.is_none() => {
                    let q = vgpu_mediator::parse_size(v)
                        .ok()
                        .filter(|&q| q > 0)
                        .ok_or_else(|| bad(format!("quota={v}: not a size such as 8G")))?;
                    settings.quota = Some(q);
                }
                _ => {
                    return Err(bad(format!(
                        "`{option}`: expected gpu=N or quota=SIZE, each at most once"
                    )))
                }
            }
        }
        if weights.insert(name.to_string(), settings).is_some() {
            return Err(bad(format!("{name} is named twice")));
        }
    }
    Ok(weights)
}

/// Reads and parses a weights file.
pub fn load(path: &Path) -> Result<Weights, WeightsError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| WeightsError::Read(path.to_path_buf(), e))?;
    parse(&text).map_err(|(line, why)| WeightsError::Line(path.to_path_buf(), line, why))
}

/// The line of the file that is a tenant's: its own name (a socket's `vm0`, an NFS VM's
/// `nfs:vm1`), or for an NFS VM its directory's name alone when no other tenant has that
/// name. With the name it was found under.
fn settings_of<'a>(
    weights: &'a Weights,
    name: &'a str,
    names: &[String],
) -> Option<(&'a str, VmSettings)> {
    if let Some(s) = weights.get(name) {
        return Some((name, *s));
    }
    let dir = name.strip_prefix("nfs:")?;
    if names.iter().any(|n| n == dir) {
        return None;
    }
    weights.get(dir).map(|s| (dir, *s))
}

/// The `gpu=` of NFS VM directories, by directory name, before their tenants exist: a line
/// `nfs:NAME`, or `NAME` when no socket in `sockets` has that name (the rule of
/// [`settings_of`]; `nfs:NAME` wins).
pub fn nfs_placements(weights: &Weights, sockets: &[String]) -> BTreeMap<String, Placement> {
    let mut placements = BTreeMap::new();
    // "nfs:..." sorts before the bare names, so its line is taken first.
    for (name, line) in weights {
        let dir = match name.strip_prefix("nfs:") {
            Some(dir) => dir,
            None if sockets.contains(name) => continue,
            None => name,
        };
        if let Some(gpu) = line.gpu {
            placements.entry(dir.to_string()).or_insert(gpu);
        }
    }
    placements
}

/// Gives every tenant of `mediator` its weight from `weights`, or `default`, and its quota
/// where the file names one. Returns the names in `weights` that no tenant has (VMs not
/// served yet, or misspelt).
pub fn apply(mediator: &Mediator, weights: &Weights, default: u32) -> Vec<String> {
    let mut unknown: Vec<String> = weights.keys().cloned().collect();
    let tenants: Vec<_> = mediator
        .tenants()
        .into_iter()
        .filter_map(|t| Some((t, mediator.tenant_config(t)?)))
        .collect();
    let names: Vec<String> = tenants.iter().map(|(_, c)| c.name.clone()).collect();
    for (t, config) in &tenants {
        let t = *t;
        let found = settings_of(weights, &config.name, &names);
        let weight = found.map_or(default, |(_, s)| s.weight);
        if let Some((name, _)) = found {
            unknown.retain(|n| n != name);
        }
        if mediator.weight(t) != Some(weight) {
            mediator.set_weight(t, weight);
        }
        let Some((_, settings)) = found else {
            continue;
        };
        if let Some(quota) = settings.quota {
            mediator.set_quota(t, quota);
        }
        if let (Some(Placement::Gpu(want)), Some(gpu)) = (settings.gpu, mediator.tenant_gpu(t)) {
            if want != gpu {
                log::warn!(
                    "{}: gpu={want} in the file, but the VM is on GPU {gpu}: a VM's GPU is chosen \
                     at start; it moves at the next start",
                    config.name
                );
            }
        }
    }
    unknown
}

/// Reloads weights from a file on request (SIGHUP), from any thread.
#[derive(Clone)]
pub struct WeightsReloader {
    pub(crate) mediator: std::sync::Arc<Mediator>,
    pub(crate) path: PathBuf,
    pub(crate) default: u32,
}

impl WeightsReloader {
    /// Reads the file again and applies it; on error the settings in force stay.
    pub fn reload(&self) -> Result<Weights, WeightsError> {
        let weights = load(&self.path)?;
        self.apply(&weights);
        Ok(weights)
    }

    /// Applies settings read from the file, warning about the names no VM has.
    pub fn apply(&self, weights: &Weights) {
        let unknown = apply(&self.mediator, weights, self.default);
        if !unknown.is_empty() {
            log::warn!(
                "{}: no VM is named {} (yet)",
                self.path.display(),
                unknown.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vgpu_mediator::cpu::CpuExecutorFactory;
    use vgpu_mediator::TenantConfig;

    use super::*;

    #[test]
    fn lines_name_a_vm_and_its_weight_with_comments_and_either_separator() {
        let w = parse("# shares\nvm0 100\n\n  vm1=300  # the big one\nvm2 = 7\n").unwrap();
        assert_eq!(
            w.into_iter()
                .map(|(n, s)| (n, s.weight))
                .collect::<Vec<_>>(),
            [("vm0".into(), 100), ("vm1".into(), 300), ("vm2".into(), 7)]
        );
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        assert_eq!(parse("vm0 100\nvm1\n").unwrap_err().0, 2);
        assert_eq!(parse("vm0 0\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 -3\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 1 2\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 5000000000\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 1\nvm0 2\n").unwrap_err().0, 2);
        assert_eq!(parse("vm0 1 gpu=x\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 1 gpu=1 gpu=2\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 1 quota=0\n").unwrap_err().0, 1);
        assert_eq!(parse("vm0 1 colour=red\n").unwrap_err().0, 1);
    }

    #[test]
    fn lines_may_place_a_vm_on_a_gpu_and_set_its_quota() {
        let w = parse("vm0 100 gpu=1 quota=8G\nvm1=300 gpu=auto\nvm2 5 quota=512M\n").unwrap();
        assert_eq!(
            w["vm0"],
            VmSettings {
                weight: 100,
                gpu: Some(Placement::Gpu(1)),
                quota: Some(8 << 30)
            }
        );
        assert_eq!(w["vm1"].gpu, Some(Placement::Auto));
        assert_eq!((w["vm2"].gpu, w["vm2"].quota), (None, Some(512 << 20)));
    }

    #[test]
    fn nfs_vms_take_their_gpu_by_nfs_name_or_by_a_name_no_socket_has() {
        let w = parse("nfs:vm1 1 gpu=1\nvm1 1 gpu=0\nvm2 1 gpu=1\nvm0 1 gpu=1\nvm3 1\n").unwrap();
        let p = nfs_placements(&w, &["vm0".into(), "vm2".into()]);
        // vm1: nfs:vm1 wins over the bare line; vm2 and vm0 are sockets; vm3 names no GPU.
        assert_eq!(
            p.into_iter().collect::<Vec<_>>(),
            [("vm1".to_string(), Placement::Gpu(1))]
        );
    }

    #[test]
    fn applying_sets_named_vms_and_gives_the_others_the_default() {
        let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let add = |name: &str| {
            m.add_tenant(TenantConfig {
                name: name.into(),
                mem_quota: 1 << 20,
                weight: 100,
            })
            .unwrap()
        };
        let (a, b, c) = (add("vm0"), add("vm1"), add("nfs:vm2"));
        let unknown = apply(&m, &parse("vm1 300 quota=4M\nvm7 2\nvm2 9\n").unwrap(), 50);
        assert_eq!(unknown, ["vm7"]);
        assert_eq!(
            (m.weight(a), m.weight(b), m.weight(c)),
            (Some(50), Some(300), Some(9))
        );
        assert_eq!((m.quota(a), m.quota(b)), (Some(1 << 20), Some(4 << 20)));
    }

    #[test]
    fn a_reload_with_a_bad_file_keeps_the_weights_in_force() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("weights");
        let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let t = m
            .add_tenant(TenantConfig {
                name: "vm0".into(),
                mem_quota: 1 << 20,
                weight: 100,
            })
            .unwrap();
        let r = WeightsReloader {
            mediator: m.clone(),
            path: path.clone(),
            default: 100,
        };
        std::fs::write(&path, "vm0 250\n").unwrap();
        r.reload().unwrap();
        assert_eq!(m.weight(t), Some(250));
        std::fs::write(&path, "vm0 zero\n").unwrap();
        assert!(matches!(r.reload(), Err(WeightsError::Line(_, 1, _))));
        assert_eq!(m.weight(t), Some(250));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(r.reload(), Err(WeightsError::Read(..))));
        assert_eq!(m.weight(t), Some(250));
    }
}
