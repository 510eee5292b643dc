// SPDX-License-Identifier: Apache-2.0
//! The library's error type.

use std::io;
use std::path::PathBuf;

use vgpu_protocol::{DecodeError, Status};

/// Result of every fallible call in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call failed: the device refused the request, or it never reached the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device answered with a status other than OK.
    #[error("{op}: device returned {status} (detail {detail})")]
    Device {
        op: &'static str,
        status: Status,
        detail: u32,
    },
    /// The device node could not be opened (missing driver, permissions, no session left).
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The device was removed or reset; its sessions are gone.
    #[error("the device was removed or reset")]
    DeviceGone,
    /// The request needs more descriptors than the virtqueue holds (split it).
    #[error("the request needs more descriptors than the virtqueue holds")]
    ChainTooLong,
    /// A system call on the device failed.
    #[error("{what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The device wrote fewer payload bytes than the request asked for.
    #[error("{op}: device wrote {written} of {expected} bytes")]
    ShortReply {
        op: &'static str,
        expected: usize,
        written: usize,
    },
    /// The device's reply does not decode.
    #[error("malformed reply from the device")]
    Protocol(#[from] DecodeError),
    /// The caller passed something the request cannot carry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No buffer or module with this handle is held in the session.
    #[error("no {what} with handle {handle} in this session")]
    UnknownHandle { what: &'static str, handle: u64 },
    /// A buffer or module handle of one session was used with another.
    #[error("{0} belongs to another session")]
    ForeignHandle(&'static str),
}

impl Error {
    /// The device's status, when the device refused the request.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::Device { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The device's detail code (CUDA error, parameter index...), when it refused.
    pub fn detail(&self) -> Option<u32> {
        match self {
            Error::Device { detail, .. } => Some(*detail),
            _ => None,
        }
    }

    /// The message with its causes, one after another: what a tool prints.
    pub fn report(&self) -> String {
        let mut s = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            s.push_str(": ");
            s.push_str(&e.to_string());
            source = e.source();
        }
        s
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidArgument(msg.into())
    }

    /// Maps an errno from the driver's ioctl to the error it means.
    pub(crate) fn from_errno(what: &'static str, err: io::Error) -> Error {
        match err.raw_os_error() {
            Some(libc::E2BIG) => Error::ChainTooLong,
            Some(libc::ENODEV) => Error::DeviceGone,
            _ => Error::Io { what, source: err },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errnos_map_to_what_they_mean() {
        let e = |n| Error::from_errno("VGPU_IOC_SUBMIT", io::Error::from_raw_os_error(n));
        assert!(matches!(e(libc::E2BIG), Error::ChainTooLong));
        assert!(matches!(e(libc::ENODEV), Error::DeviceGone));
        let other = e(libc::EFAULT);
        assert!(matches!(
            other,
            Error::Io {
                what: "VGPU_IOC_SUBMIT",
                ..
            }
        ));
        assert_eq!(
            other.report(),
            "VGPU_IOC_SUBMIT failed: Bad address (os error 14)"
        );
    }
}
