// SPDX-License-Identifier: Apache-2.0
//! `CUresult` names and messages, and how the device's errors map to them.

use std::ffi::CStr;

use log::debug;
use vgpu::{Error, Status};

use crate::generated::RESULTS;
use crate::types::*;
use crate::Fail;

/// The `CUresult`'s name ("CUDA_ERROR_INVALID_VALUE"), if it is one.
pub(crate) fn name(code: CUresult) -> Option<&'static str> {
    c_name(code).and_then(|n| n.to_str().ok())
}

pub(crate) fn c_name(code: CUresult) -> Option<&'static CStr> {
    RESULTS.iter().find(|r| r.0 == code).map(|r| r.1)
}

pub(crate) fn c_message(code: CUresult) -> Option<&'static CStr> {
    RESULTS.iter().find(|r| r.0 == code).map(|r| r.2)
}

/// What a device failure is for the caller. `detail` carries the CUDA error code of a
/// failure on the GPU when there is one; `module_load` says a MODULE_INVALID came from
/// loading (`ptx`: PTX text, else a binary image).
pub(crate) fn from_device(status: Status, detail: u32, load: Option<Load>) -> CUresult {
    // The host's own CUDA error, when it names one this API knows.
    let cuda = (detail != 0 && c_name(detail).is_some()).then_some(detail);
    match status {
        Status::Ok => CUDA_SUCCESS,
        Status::InvalidRequest | Status::InvalidArgument | Status::OutOfRange => {
            CUDA_ERROR_INVALID_VALUE
        }
        Status::BufferTooSmall => CUDA_ERROR_INVALID_VALUE,
        Status::UnknownOpcode | Status::Unsupported => CUDA_ERROR_NOT_SUPPORTED,
        Status::VersionMismatch => CUDA_ERROR_SYSTEM_DRIVER_MISMATCH,
        Status::InvalidSession => CUDA_ERROR_INVALID_CONTEXT,
        Status::InvalidHandle => CUDA_ERROR_INVALID_HANDLE,
        Status::QuotaExceeded | Status::OutOfMemory | Status::LimitExceeded => {
            CUDA_ERROR_OUT_OF_MEMORY
        }
        Status::KernelNotFound => CUDA_ERROR_NOT_FOUND,
        Status::ModuleInvalid => cuda.unwrap_or(match load {
            Some(Load::Ptx) => CUDA_ERROR_INVALID_PTX,
            _ => CUDA_ERROR_INVALID_IMAGE,
        }),
        Status::LaunchFailed | Status::DeviceLost => cuda.unwrap_or(CUDA_ERROR_LAUNCH_FAILED),
        Status::Internal => CUDA_ERROR_UNKNOWN,
    }
}

/// What kind of module a request loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Load {
    Ptx,
    Image,
}

/// The `CUresult` for an error of the guest library.
pub(crate) fn from_error(e: &Error, load: Option<Load>) -> CUresult {
    debug!("device request failed: {}", e.report());
    match e {
        Error::Device { status, detail, .. } => from_device(*status, *detail, load),
        Error::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            CUDA_ERROR_NO_DEVICE
        }
        Error::Open { .. } | Error::Io { .. } | Error::ChainTooLong => CUDA_ERROR_OPERATING_SYSTEM,
        Error::DeviceGone => CUDA_ERROR_DEVICE_UNAVAILABLE,
        Error::InvalidArgument(_) => CUDA_ERROR_INVALID_VALUE,
        Error::UnknownHandle { .. } | Error::ForeignHandle(_) => CUDA_ERROR_INVALID_HANDLE,
        Error::ShortReply { .. } | Error::Protocol(_) => CUDA_ERROR_UNKNOWN,
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail(from_error(&e, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_has_a_name_and_a_message_and_the_known_ones_read_as_cuda_h() {
        assert!(RESULTS.len() > 90);
        for &(code, n, m) in RESULTS {
            assert_eq!(c_name(code), Some(n));
            assert!(n.to_str().unwrap().starts_with("CUDA_"));
            assert!(!m.to_bytes().is_empty());
        }
        assert_eq!(name(0), Some("CUDA_SUCCESS"));
        assert_eq!(name(1), Some("CUDA_ERROR_INVALID_VALUE"));
        assert_eq!(name(801), Some("CUDA_ERROR_NOT_SUPPORTED"));
        assert_eq!(name(46), Some("CUDA_ERROR_DEVICE_UNAVAILABLE"));
        assert_eq!(name(916), Some("CUDA_ERROR_KEY_ROTATION"));
        assert_eq!(name(12345), None);
        assert_eq!(c_message(2).unwrap().to_str(), Ok("out of memory"));
        assert_eq!(
            c_message(401).unwrap().to_str(),
            Ok("illegal state"),
            "messages not in the table are made from the name"
        );
        // The constants this library uses are the enum's values.
        for (code, n) in [
            (CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE"),
            (CUDA_ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX"),
            (CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED"),
            (
                CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
                "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
            ),
            (
                CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY,
                "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
            ),
        ] {
            assert_eq!(name(code), Some(n));
        }
    }

    #[test]
    fn device_statuses_map_to_the_cuda_errors_they_mean() {
        let m = |s, d| from_device(s, d, None);
        assert_eq!(m(Status::QuotaExceeded, 0), CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(m(Status::OutOfMemory, 2), CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(m(Status::KernelNotFound, 0), CUDA_ERROR_NOT_FOUND);
        assert_eq!(m(Status::Unsupported, 0), CUDA_ERROR_NOT_SUPPORTED);
        assert_eq!(m(Status::OutOfRange, 0), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(m(Status::InvalidHandle, 0), CUDA_ERROR_INVALID_HANDLE);
        // A failure on the GPU carries the CUDA error when there is one.
        assert_eq!(
            m(Status::DeviceLost, 700),
            700,
            "CUDA_ERROR_ILLEGAL_ADDRESS"
        );
        assert_eq!(m(Status::DeviceLost, 0), CUDA_ERROR_LAUNCH_FAILED);
        assert_eq!(m(Status::LaunchFailed, 716), 716);
        assert_eq!(m(Status::LaunchFailed, 77_777), CUDA_ERROR_LAUNCH_FAILED);
        let load = |l| from_device(Status::ModuleInvalid, 0, Some(l));
        assert_eq!(load(Load::Ptx), CUDA_ERROR_INVALID_PTX);
        assert_eq!(load(Load::Image), CUDA_ERROR_INVALID_IMAGE);
        assert_eq!(
            from_device(Status::ModuleInvalid, 209, Some(Load::Image)),
            209
        );
        for s in Status::ALL {
            assert!(c_name(m(s, 0)).is_some(), "{s}");
        }
        assert_eq!(
            from_error(&Error::DeviceGone, None),
            CUDA_ERROR_DEVICE_UNAVAILABLE
        );
        assert_eq!(
            from_error(&Error::InvalidArgument("x".into()), None),
            CUDA_ERROR_INVALID_VALUE
        );
    }
}
