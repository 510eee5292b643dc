// SPDX-License-Identifier: Apache-2.0
//! The implemented exports, by area. Each checks every pointer and length it is given
//! (a NULL out-parameter is `CUDA_ERROR_INVALID_VALUE`) and runs inside
//! [`crate::guard`], so nothing unwinds into the caller.

pub mod context;
pub mod device;
pub mod launch;
pub mod memory;
pub mod misc;
pub mod module;
pub mod occupancy;
pub mod stream;

pub use context::*;
pub use device::*;
pub use launch::*;
pub use memory::*;
pub use misc::*;
pub use module::*;
pub use occupancy::*;
pub use stream::*;

use std::ffi::{c_char, c_void, CStr};

use crate::types::CUDA_ERROR_INVALID_VALUE;
use crate::{Fail, Res};

pub(crate) fn invalid() -> Fail {
    Fail(CUDA_ERROR_INVALID_VALUE)
}

/// Writes `value` to an out-parameter; NULL is `CUDA_ERROR_INVALID_VALUE`.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
pub(crate) unsafe fn out<T>(p: *mut T, value: T) -> Res<()> {
    if p.is_null() {
        return Err(invalid());
    }
    // SAFETY: non-NULL, and writable by the caller's promise.
    unsafe { p.write(value) };
    Ok(())
}

/// Writes `value` to an out-parameter the caller may leave NULL.
///
/// # Safety
/// As for [`out`].
pub(crate) unsafe fn out_opt<T>(p: *mut T, value: T) {
    if !p.is_null() {
        // SAFETY: non-NULL, and writable by the caller's promise.
        unsafe { p.write(value) };
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string.
pub(crate) unsafe fn c_str<'a>(p: *const c_char) -> Res<&'a str> {
    if p.is_null() {
        return Err(invalid());
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| invalid())
}

/// A handle's id.
pub(crate) fn id<T>(p: *mut T) -> u64 {
    p as usize as u64
}

/// The handle for an id.
pub(crate) fn handle(id: u64) -> *mut c_void {
    id as usize as *mut c_void
}

/// Copies `s` and a NUL into `buf` of `len` bytes, cut to fit.
///
/// # Safety
/// `buf` must be NULL or writable for `len` bytes.
pub(crate) unsafe fn copy_str(buf: *mut c_char, len: i32, s: &str) -> Res<()> {
    if buf.is_null() || len <= 0 {
        return Err(invalid());
    }
    let n = s.len().min(len as usize - 1);
    // SAFETY: n + 1 <= len writable bytes by the caller's promise.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
    Ok(())
}
