// SPDX-License-Identifier: Apache-2.0
//! Error names, entry points by name, export tables.

use std::ffi::{c_char, c_int, c_void};

use super::{c_str, invalid, out, out_opt};
use crate::errors::{c_message, c_name};
use crate::procaddr;
use crate::types::*;
use crate::{guard, Fail, Res};

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, pstr: *mut *const c_char) -> CUresult {
    guard("cuGetErrorName", || {
        if pstr.is_null() {
            return Err(invalid());
        }
        let name = c_name(error).map_or(std::ptr::null(), |n| n.as_ptr());
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(pstr, name) }?;
        if name.is_null() {
            return Err(invalid());
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, pstr: *mut *const c_char) -> CUresult {
    guard("cuGetErrorString", || {
        if pstr.is_null() {
            return Err(invalid());
        }
        let msg = c_message(error).map_or(std::ptr::null(), |m| m.as_ptr());
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(pstr, msg) }?;
        if msg.is_null() {
            return Err(invalid());
        }
        Ok(())
    })
}

/// # Safety
/// As `cuGetProcAddress_v2` takes its arguments.
unsafe fn proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    status: *mut c_int,
) -> Res<()> {
    // SAFETY: a NUL-terminated name, by NVIDIA's contract.
    let name = unsafe { c_str(symbol) }?;
    if pfn.is_null() {
        return Err(invalid());
    }
    let found = procaddr::lookup(name, cuda_version);
    // SAFETY: checked non-NULL / NULL or writable, by NVIDIA's contract.
    unsafe {
        out(
            pfn,
            found.map_or(std::ptr::null_mut(), |a| a as *mut c_void),
        )?;
        out_opt(
            status,
            if found.is_some() {
                CU_GET_PROC_ADDRESS_SUCCESS
            } else {
                CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND
            },
        );
    }
    if found.is_none() {
        log::debug!("cuGetProcAddress: no {name} (CUDA {cuda_version})");
        return Err(Fail(CUDA_ERROR_NOT_FOUND));
    }
    Ok(())
}

/// The export a base name stands for at `cuda_version` (see `procaddr`); the flags only
/// choose between default-stream variants, which are the same functions here.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    _flags: u64,
    status: *mut c_int,
) -> CUresult {
    // SAFETY: forwarded contract.
    guard("cuGetProcAddress", || unsafe {
        proc_address(symbol, pfn, cuda_version, status)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    _flags: u64,
) -> CUresult {
    // SAFETY: forwarded contract.
    guard("cuGetProcAddress", || unsafe {
        proc_address(symbol, pfn, cuda_version, std::ptr::null_mut())
    })
}

/// NVIDIA's private tables for its CUDA runtime (see `export_tables`); an unknown UUID
/// is `CUDA_ERROR_NOT_SUPPORTED`, logged at warn level.
#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(
    table: *mut *const c_void,
    uuid: *const [u8; 16],
) -> CUresult {
    // SAFETY: NVIDIA's contract: `table` writable, `uuid` a CUuuid.
    guard("cuGetExportTable", || unsafe {
        crate::export_tables::get(table, uuid)
    })
}
