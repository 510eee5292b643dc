// SPDX-License-Identifier: Apache-2.0
//! Per-VM weights from a file (`--weights FILE`), read at start and again on SIGHUP.
//!
//! One VM per line: its name (the socket's file name such as `vm0`, or an NFS VM
//! directory's name) and its weight, a whole number of at least 1, separated by spaces or
//! `=`. `#` starts a comment; blank lines are ignored. VMs the file does not name get
//! `--weight`. A file that does not parse changes nothing: the daemon refuses to start
//! with it, and a reload keeps the weights in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vgpu_mediator::Mediator;

/// Weights by VM name.
pub type Weights = BTreeMap<String, u32>;

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
        let mut parts = line
            .split(|c: char| c.is_whitespace() || c == '=')
            .filter(|p| !p.is_empty());
        let (Some(name), Some(weight), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!("expected `NAME WEIGHT`, got `{line}`")));
        };
        let weight: u32 = weight
            .parse()
            .ok()
            .filter(|&w| w >= 1)
            .ok_or_else(|| bad(format!("weight `{weight}` is not a whole number >= 1")))?;
        if weights.insert(name.to_string(), weight).is_some() {
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

/// Gives every tenant of `mediator` its weight from `weights`, or `default`. Returns the
/// names in `weights` that no tenant has (VMs not served yet, or misspelt).
pub fn apply(mediator: &Mediator, weights: &Weights, default: u32) -> Vec<String> {
    let mut unknown: Vec<String> = weights.keys().cloned().collect();
    for t in mediator.tenants() {
        let Some(config) = mediator.tenant_config(t) else {
            continue;
        };
        let weight = weights.get(&config.name).copied().unwrap_or(default);
        unknown.retain(|n| *n != config.name);
        if mediator.weight(t) != Some(weight) {
            mediator.set_weight(t, weight);
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
    /// Reads the file again and applies it; on error the weights in force stay.
    pub fn reload(&self) -> Result<Weights, WeightsError> {
        let weights = load(&self.path)?;
        let unknown = apply(&self.mediator, &weights, self.default);
        if !unknown.is_empty() {
            log::warn!(
                "{}: no VM is named {} (yet)",
                self.path.display(),
                unknown.join(", ")
            );
        }
        Ok(weights)
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
            w.into_iter().collect::<Vec<_>>(),
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
        let (a, b) = (add("vm0"), add("vm1"));
        let unknown = apply(&m, &parse("vm1 300\nvm7 2\n").unwrap(), 50);
        assert_eq!(unknown, ["vm7"]);
        assert_eq!((m.weight(a), m.weight(b)), (Some(50), Some(300)));
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
