// SPDX-License-Identifier: Apache-2.0
//! `vgpu_cuda`: the CUDA driver API over the vGPU device. Installed in a guest as
//! `libcuda.so.1` (and `libcuda.so`), it lets programs written for NVIDIA's driver API,
//! and libraries that load it by name such as cudarc, run on the host's GPU.
//!
//! A context is one session of the device (one open file of `/dev/vgpuN`, one CUDA
//! context on the host). Every function cudarc binds for CUDA 13.0 is exported; those
//! this library does not implement answer `CUDA_ERROR_NOT_SUPPORTED` (and log it once).
//! `README.md` beside this crate lists what is implemented and what each call costs.
//!
//! Every export's contract is that of NVIDIA's function of the same name (pointers valid
//! for what its documentation says it reads or writes); that is the `# Safety` section
//! of each, so the exports carry no section of their own. They never unwind: a panic
//! becomes `CUDA_ERROR_UNKNOWN`.
#![allow(non_snake_case, clippy::missing_safety_doc)]

mod api;
mod errors;
mod export_tables;
#[rustfmt::skip]
mod generated;
mod image;
mod memset;
mod params;
mod procaddr;
mod state;
mod types;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use log::{debug, error, warn};

pub use generated::CUDARC_EXPORTS;
#[cfg(any(test, feature = "test-hook"))]
#[doc(hidden)]
pub use state::set_backend;
#[doc(hidden)]
pub use state::Backend;
pub use types::CUresult;

use types::{CUDA_ERROR_NOT_SUPPORTED, CUDA_ERROR_UNKNOWN, CUDA_SUCCESS};

/// The environment variable with the log filter (`env_logger` syntax); default `warn`.
pub const LOG_ENV: &str = "VGPU_CUDA_LOG";

/// Why a call failed: the `CUresult` it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fail(pub CUresult);

pub(crate) type Res<T> = Result<T, Fail>;

fn init_logging() {
    static LOG: Once = Once::new();
    LOG.call_once(|| {
        let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| "warn".into());
        let _ = env_logger::Builder::new()
            .parse_filters(&filter)
            .target(env_logger::Target::Stderr)
            .format_timestamp(None)
            .try_init();
    });
}

/// Runs the body of export `name`: its error is the result, a panic is
/// `CUDA_ERROR_UNKNOWN`; nothing unwinds into the caller.
pub(crate) fn guard(name: &'static str, f: impl FnOnce() -> Res<()>) -> CUresult {
    init_logging();
    match catch_unwind(AssertUnwindSafe(|| export_tables::export_body(f))) {
        Ok(Ok(())) => CUDA_SUCCESS,
        Ok(Err(Fail(code))) => {
            debug!("{name}: {}", errors::name(code).unwrap_or("unknown result"));
            code
        }
        Err(_) => {
            error!("{name}: internal error (panic)");
            CUDA_ERROR_UNKNOWN
        }
    }
}

/// What every unimplemented export does: `CUDA_ERROR_NOT_SUPPORTED`, logged once per name.
pub(crate) fn not_supported(name: &'static str) -> CUresult {
    static SEEN: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    init_logging();
    let first = {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        seen.get_or_insert_with(HashSet::new).insert(name)
    };
    if first {
        warn!("{name} is not supported by the vGPU driver library");
    }
    CUDA_ERROR_NOT_SUPPORTED
}

/// Defines exports that answer `CUDA_ERROR_NOT_SUPPORTED`. They take no parameters: the
/// C caller's arguments are never read.
macro_rules! stubs {
    ($($name:ident),* $(,)?) => { $(
        #[no_mangle]
        pub extern "C" fn $name() -> $crate::CUresult {
            $crate::not_supported_export(stringify!($name))
        }
    )* };
}
pub(crate) use stubs;

pub(crate) fn not_supported_export(name: &'static str) -> CUresult {
    catch_unwind(|| not_supported(name)).unwrap_or(CUDA_ERROR_NOT_SUPPORTED)
}
