// SPDX-License-Identifier: Apache-2.0
//! `cuGetProcAddress`: the export a base name stands for at a CUDA version.
//!
//! Most functions whose ABI changed keep their unversioned export with the newest
//! signature here (`cuMemAlloc` is `cuMemAlloc_v2`), so for a base name the highest of
//! `name_v3`, `name_v2`, `name` that exists is right. Where versions differ in their
//! parameters, the version the caller's CUDA release declares is chosen, as
//! `cudaTypedefs.h` names them (`PFN_cuCtxCreate_v11040` is `cuCtxCreate_v3`).
//! Per-thread default stream variants (`_ptds`, `_ptsz`, or the flag) are the same
//! functions: a context's work runs in order whatever its stream.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Base names whose versions take different parameters: (first CUDA version, export).
/// An empty list keeps the unversioned function (the `_v2` is a newer API with an extra
/// parameter that callers ask for by its full name).
const VERSIONED: &[(&str, &[(i32, &str)])] = &[
    (
        "cuCtxCreate",
        &[
            (3020, "cuCtxCreate_v2"),
            (11040, "cuCtxCreate_v3"),
            (12050, "cuCtxCreate_v4"),
        ],
    ),
    ("cuGetProcAddress", &[(12000, "cuGetProcAddress_v2")]),
    ("cuCtxSynchronize", &[]),
    ("cuCtxGetDevice", &[]),
    ("cuStreamGetCtx", &[]),
];

/// The export `symbol` resolves to for a caller built against `cuda_version`.
pub fn resolve(symbol: &str, cuda_version: i32, exists: &dyn Fn(&str) -> bool) -> Option<String> {
    let base = symbol
        .strip_suffix("_ptds")
        .or_else(|| symbol.strip_suffix("_ptsz"))
        .unwrap_or(symbol);
    if let Some((_, versions)) = VERSIONED.iter().find(|(b, _)| *b == base) {
        let chosen = versions
            .iter()
            .rev()
            .find(|(v, _)| *v <= cuda_version)
            .map_or(base, |(_, s)| *s);
        return exists(chosen).then(|| chosen.to_owned());
    }
    ["_v3", "_v2", ""]
        .iter()
        .map(|suffix| format!("{base}{suffix}"))
        .find(|name| exists(name))
}

/// Every export by name.
pub fn exports() -> &'static HashMap<&'static str, usize> {
    static TABLE: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    TABLE.get_or_init(|| crate::generated::exports().into_iter().collect())
}

/// The address of the export `symbol` resolves to.
pub fn lookup(symbol: &str, cuda_version: i32) -> Option<usize> {
    let table = exports();
    let name = resolve(symbol, cuda_version, &|n| table.contains_key(n))?;
    table.get(name.as_str()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_name_takes_its_highest_version_and_ptds_is_the_same_function() {
        let r = |s: &str, v: i32| lookup_name(s, v);
        assert_eq!(r("cuMemAlloc", 13000).as_deref(), Some("cuMemAlloc_v2"));
        assert_eq!(r("cuMemAlloc", 2000).as_deref(), Some("cuMemAlloc_v2"));
        assert_eq!(r("cuInit", 13000).as_deref(), Some("cuInit"));
        assert_eq!(
            r("cuTexRefSetAddress2D", 13000).as_deref(),
            Some("cuTexRefSetAddress2D_v3")
        );
        assert_eq!(
            r("cuMemcpyHtoDAsync_ptsz", 13000).as_deref(),
            Some("cuMemcpyHtoDAsync_v2")
        );
        assert_eq!(
            r("cuLaunchKernel_ptsz", 13000).as_deref(),
            Some("cuLaunchKernel")
        );
        assert_eq!(
            r("cuEventElapsedTime", 13000).as_deref(),
            Some("cuEventElapsedTime_v2")
        );
        assert_eq!(r("cuNoSuchFunction", 13000), None);
    }

    #[test]
    fn versions_with_other_parameters_follow_the_callers_cuda_version() {
        let r = |s: &str, v: i32| lookup_name(s, v);
        assert_eq!(r("cuCtxCreate", 3000).as_deref(), Some("cuCtxCreate"));
        assert_eq!(r("cuCtxCreate", 11000).as_deref(), Some("cuCtxCreate_v2"));
        assert_eq!(r("cuCtxCreate", 12000).as_deref(), Some("cuCtxCreate_v3"));
        assert_eq!(r("cuCtxCreate", 13000).as_deref(), Some("cuCtxCreate_v4"));
        assert_eq!(
            r("cuGetProcAddress", 11080).as_deref(),
            Some("cuGetProcAddress")
        );
        assert_eq!(
            r("cuGetProcAddress", 12000).as_deref(),
            Some("cuGetProcAddress_v2")
        );
        for f in ["cuCtxSynchronize", "cuCtxGetDevice", "cuStreamGetCtx"] {
            assert_eq!(r(f, 13000).as_deref(), Some(f));
        }
    }

    #[test]
    fn every_cudarc_function_and_the_unversioned_names_resolve() {
        for name in crate::CUDARC_EXPORTS {
            assert!(exports().contains_key(name), "{name}");
        }
        for base in [
            "cuMemAlloc",
            "cuMemFree",
            "cuCtxDestroy",
            "cuMemcpyHtoD",
            "cuMemsetD16",
            "cuStreamDestroy",
            "cuDevicePrimaryCtxRelease",
            "cuModuleGetGlobal",
        ] {
            assert!(lookup(base, 13000).is_some(), "{base}");
            assert!(exports().contains_key(base), "{base} is exported too");
        }
    }

    fn lookup_name(symbol: &str, version: i32) -> Option<String> {
        let table = exports();
        resolve(symbol, version, &|n| table.contains_key(n))
    }
}
