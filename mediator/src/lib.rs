// SPDX-License-Identifier: Apache-2.0
//! `vgpu-mediator`: shares one GPU between virtual machines. Policy only: the executors
//! that run the work live in `vgpu-executor` (re-exported here under the same module
//! names).
//!
//! A [`Mediator`] holds tenants (one per VM socket or NFS VM directory) with their
//! memory quota and weight. Each tenant's requests run on its own worker, which owns
//! the tenant's sessions (handles, modules, a stream, a sticky asynchronous error), each
//! with its own [`Executor`]: [`cuda::CudaExecutor`] on a GPU, [`cpu::CpuExecutor`]
//! elsewhere. On a GPU each session's executor runs in its own worker process
//! ([`process`]), as native CUDA gives each process its own context: no kernel can reach
//! another session's memory, and a kernel that faults takes down only its own session.
//! Transports hand decoded requests to [`Mediator::submit`] and receive completions
//! through a [`CompletionSink`] without blocking. A daemon's [`control`] socket shows its
//! VMs to the host and changes their quota and weight at run time (`vgpu-admin`).

pub mod check;
pub mod compile;
pub mod control;
mod mediator;
pub mod metrics;
pub mod sched;
pub mod signals;
mod worker;

pub use mediator::RESET_GRACE;
pub use mediator::{
    plan_placement, request_cost, CompletionQueue, CompletionSink, GpuUsage, Hold, HoldError,
    Limits, Mediator, Placement, PlacementWish, TenantConfig, TenantId, TenantUsage,
    DEFAULT_MAX_ALLOCATIONS, DEFAULT_MAX_HELD_BYTES, DEFAULT_MAX_MODULES, REQUEST_OVERHEAD,
};
pub use sched::{SchedConfig, SchedStats, Scheduler};
pub use vgpu_executor::{cpu, cuda, executor, hostmap, process, ptx, remote, sandbox, selftest};
pub use vgpu_executor::{
    parse_gpu_list, select, select_gpus, select_with, DeviceInfo, ExecError, Executor,
    ExecutorChoice, ExecutorFactory, ExecutorOptions, GpuFactory, GuestAccessError, GuestIo,
    GuestSink, GuestSource, Isolation, SetupError, MAX_GPUS,
};
pub use worker::{COMPILE_SOURCE_REFUSED, MAX_SHARED_BYTES};

/// Why [`parse_size`] refused a size (the text as given is in each).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    /// No number where the size starts.
    #[error("invalid size '{text}'")]
    Number {
        text: String,
        #[source]
        source: std::num::ParseFloatError,
    },
    /// A unit other than K, M, G or T (or their `B`/`iB` forms).
    #[error("invalid size unit in '{0}' (use K, M, G or T)")]
    Unit(String),
    /// Negative, or more than 2^64 - 1 bytes.
    #[error("size '{0}' out of range")]
    OutOfRange(String),
}

/// Parses sizes such as `4096`, `512M`, `8G`, `1.5GiB` into bytes. A clap value parser:
/// its error is the message clap shows.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|source| ParseSizeError::Number {
        text: s.to_string(),
        source,
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(ParseSizeError::Unit(s.to_string())),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(ParseSizeError::OutOfRange(s.to_string()));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, ParseSizeError};

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("12Q"), Err(ParseSizeError::Unit("12Q".into())));
        assert!(matches!(parse_size(""), Err(ParseSizeError::Number { .. })));
        assert!(parse_size("-1G").is_err());
        assert_eq!(
            parse_size("12Q").unwrap_err().to_string(),
            "invalid size unit in '12Q' (use K, M, G or T)"
        );
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "invalid size 'lots'"
        );
        assert_eq!(
            parse_size("1e400").unwrap_err().to_string(),
            "invalid size unit in '1e400' (use K, M, G or T)"
        );
        assert_eq!(
            parse_size("99999999999T").unwrap_err().to_string(),
            "size '99999999999T' out of range"
        );
    }
}
