// SPDX-License-Identifier: Apache-2.0
//! Status codes carried in the response header.

use std::fmt;

/// Outcome of a request. `Ok` is zero; every other value names the step that refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The request succeeded (or, for asynchronous work, was accepted).
    Ok = 0,
    /// The request is malformed: truncated, inconsistent lengths, bad strings.
    InvalidRequest = 1,
    /// The opcode is not one this device knows.
    UnknownOpcode = 2,
    /// The request's protocol version is not supported.
    VersionMismatch = 3,
    /// The session does not exist for this VM (never opened, closed, or another VM's).
    InvalidSession = 4,
    /// The buffer or module handle does not belong to this session.
    InvalidHandle = 5,
    /// An argument is out of its allowed range (sizes, grid, block, widths, parameters).
    InvalidArgument = 6,
    /// A copy or memset range goes past the end of an allocation.
    OutOfRange = 7,
    /// The allocation would take the VM over its device-memory quota.
    QuotaExceeded = 8,
    /// The device itself has no memory left.
    OutOfMemory = 9,
    /// The executor cannot do this (e.g. PTX on the CPU executor).
    Unsupported = 10,
    /// No kernel of that name in the module or the built-in catalog.
    KernelNotFound = 11,
    /// The PTX module did not load (invalid PTX, wrong target).
    ModuleInvalid = 12,
    /// A kernel or asynchronous operation failed on the device; sticky for the session.
    LaunchFailed = 13,
    /// The VM's execution context was lost and restarted; its sessions are gone.
    DeviceLost = 14,
    /// The writable buffer in the chain is too small for the result.
    BufferTooSmall = 15,
    /// A per-VM limit (sessions, handles, modules) is reached.
    LimitExceeded = 16,
    /// An unexpected failure inside the host; logged there.
    Internal = 17,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 18] = [
        Status::Ok,
        Status::InvalidRequest,
        Status::UnknownOpcode,
        Status::VersionMismatch,
        Status::InvalidSession,
        Status::InvalidHandle,
        Status::InvalidArgument,
        Status::OutOfRange,
        Status::QuotaExceeded,
        Status::OutOfMemory,
        Status::Unsupported,
        Status::KernelNotFound,
        Status::ModuleInvalid,
        Status::LaunchFailed,
        Status::DeviceLost,
        Status::BufferTooSmall,
        Status::LimitExceeded,
        Status::Internal,
    ];

    /// The status for a wire value, if it is one.
    pub fn from_u32(v: u32) -> Option<Status> {
        Status::ALL.get(v as usize).copied()
    }

    /// Stable upper-case name, as in `vgpu.h`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::InvalidRequest => "INVALID_REQUEST",
            Status::UnknownOpcode => "UNKNOWN_OPCODE",
            Status::VersionMismatch => "VERSION_MISMATCH",
            Status::InvalidSession => "INVALID_SESSION",
            Status::InvalidHandle => "INVALID_HANDLE",
            Status::InvalidArgument => "INVALID_ARGUMENT",
            Status::OutOfRange => "OUT_OF_RANGE",
            Status::QuotaExceeded => "QUOTA_EXCEEDED",
            Status::OutOfMemory => "OUT_OF_MEMORY",
            Status::Unsupported => "UNSUPPORTED",
            Status::KernelNotFound => "KERNEL_NOT_FOUND",
            Status::ModuleInvalid => "MODULE_INVALID",
            Status::LaunchFailed => "LAUNCH_FAILED",
            Status::DeviceLost => "DEVICE_LOST",
            Status::BufferTooSmall => "BUFFER_TOO_SMALL",
            Status::LimitExceeded => "LIMIT_EXCEEDED",
            Status::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_unknown_values_are_rejected() {
        for s in Status::ALL {
            assert_eq!(Status::from_u32(s as u32), Some(s));
        }
        assert_eq!(Status::from_u32(Status::ALL.len() as u32), None);
        assert_eq!(Status::from_u32(u32::MAX), None);
    }
}
