// SPDX-License-Identifier: Apache-2.0
//! Device memory, host memory, copies and memsets.
//!
//! Device pointers are the addresses the host answers for each allocation; a pointer is
//! found in the context that allocated it (the stream's or current context first). Host
//! memory from `cuMemAllocHost` is the driver's DMA buffers: copies from and to it go in
//! large requests that the device serves straight from its pages.

use std::ffi::{c_int, c_uchar, c_uint, c_ushort, c_void};
use std::sync::Arc;

use super::{handle, invalid, out, out_opt};
use crate::memset::{self, Piece};
use crate::state::{driver, lock, Context, DevicePtr, Driver};
use crate::types::*;
use crate::{guard, Fail, Res};

fn alloc(dptr: *mut CUdeviceptr, size: usize, ctx: &Context) -> Res<()> {
    if dptr.is_null() || size == 0 {
        return Err(invalid());
    }
    let address = ctx.alloc(size as u64)?;
    // SAFETY: checked non-NULL; writable by NVIDIA's contract.
    unsafe { out(dptr, address) }
}

fn free(dptr: CUdeviceptr, prefer: Option<&Arc<Context>>) -> Res<()> {
    if dptr == 0 {
        return Ok(());
    }
    let d = driver()?;
    let p = d.device_ptr(dptr, 0, prefer)?;
    p.ctx.free(dptr)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    guard("cuMemAlloc", || alloc(dptr, size, &*driver()?.current()?))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemAlloc_v2(dptr, size) }
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard("cuMemFree", || free(dptr, None))
}

#[no_mangle]
pub extern "C" fn cuMemFree(dptr: CUdeviceptr) -> CUresult {
    cuMemFree_v2(dptr)
}

/// Stream-ordered allocation: the context's work runs in order, so allocating now is
/// allocating in the stream's order.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    size: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemAllocAsync", || {
        alloc(dptr, size, &driver()?.stream(stream)?.ctx)
    })
}

/// Stream-ordered free: FREE runs after the work queued before it.
#[no_mangle]
pub extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    guard("cuMemFreeAsync", || {
        let ctx = driver()?.stream(stream)?.ctx;
        free(dptr, Some(&ctx))
    })
}

/// Free and total memory of the VM's quota: total is the quota, free what the VM's
/// allocations (in all its contexts) leave of it.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(
    free_bytes: *mut usize,
    total_bytes: *mut usize,
) -> CUresult {
    guard("cuMemGetInfo", || {
        if free_bytes.is_null() || total_bytes.is_null() {
            return Err(invalid());
        }
        let ctx = driver()?.current()?;
        let info = ctx.session.info()?;
        let total = info.config.mem_quota;
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe {
            out(free_bytes, total.saturating_sub(info.mem_used) as usize)?;
            out(total_bytes, total as usize)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo(free_bytes: *mut usize, total_bytes: *mut usize) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemGetInfo_v2(free_bytes, total_bytes) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    base: *mut CUdeviceptr,
    size: *mut usize,
    dptr: CUdeviceptr,
) -> CUresult {
    guard("cuMemGetAddressRange", || {
        let p = driver()?.device_ptr(dptr, 0, None)?;
        // SAFETY: each NULL or writable, by NVIDIA's contract.
        unsafe {
            out_opt(base, p.base);
            out_opt(size, p.entry.size as usize);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAddressRange(
    base: *mut CUdeviceptr,
    size: *mut usize,
    dptr: CUdeviceptr,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemGetAddressRange_v2(base, size, dptr) }
}

// ---- host memory ----

fn host_alloc(pp: *mut *mut c_void, size: usize, flags: c_uint) -> Res<()> {
    if pp.is_null() || size == 0 {
        return Err(invalid());
    }
    let d = driver()?;
    let ctx = d.current()?;
    let buffer = ctx.session.host_buffer(size)?;
    let start = d.add_host(&ctx, buffer, flags);
    // SAFETY: checked non-NULL; writable by NVIDIA's contract.
    unsafe { out(pp, start as *mut c_void) }
}

/// Page-locked host memory: one of the driver's DMA buffers mapped into the process.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, size: usize) -> CUresult {
    guard("cuMemAllocHost", || host_alloc(pp, size, 0))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost(pp: *mut *mut c_void, size: usize) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemAllocHost_v2(pp, size) }
}

/// As `cuMemAllocHost`; the flags are remembered (portable memory is usable from every
/// context anyway; the device cannot map it, see `cuMemHostGetDevicePointer`).
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CUresult {
    guard("cuMemHostAlloc", || host_alloc(pp, size, flags))
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard("cuMemFreeHost", || driver()?.remove_host(p as usize))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostGetFlags(flags: *mut c_uint, p: *mut c_void) -> CUresult {
    guard("cuMemHostGetFlags", || {
        let (h, _) = driver()?.find_host(p as usize, 1).ok_or_else(invalid)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(flags, h.flags) }
    })
}

/// Accepted and remembered: the memory stays ordinary memory, and copies from and to it
/// take the ordinary path (the device cannot address it).
#[no_mangle]
pub extern "C" fn cuMemHostRegister_v2(p: *mut c_void, size: usize, _flags: c_uint) -> CUresult {
    guard("cuMemHostRegister", || {
        driver()?.current()?;
        let start = p as usize;
        let end = start.checked_add(size).ok_or_else(invalid)?;
        if p.is_null() || size == 0 {
            return Err(invalid());
        }
        let d = driver()?;
        let mut reg = lock(&d.registered);
        let overlaps = reg
            .range(..end)
            .next_back()
            .is_some_and(|(&s, &len)| s + len > start);
        if overlaps {
            return Err(Fail(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED));
        }
        reg.insert(start, size);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemHostRegister(p: *mut c_void, size: usize, flags: c_uint) -> CUresult {
    cuMemHostRegister_v2(p, size, flags)
}

#[no_mangle]
pub extern "C" fn cuMemHostUnregister(p: *mut c_void) -> CUresult {
    guard("cuMemHostUnregister", || {
        let d = driver()?;
        match lock(&d.registered).remove(&(p as usize)) {
            Some(_) => Ok(()),
            None => Err(Fail(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED)),
        }
    })
}

/// The registered host range holding `p`: (start, length).
fn registered(d: &Driver, p: usize) -> Option<(usize, usize)> {
    let reg = lock(&d.registered);
    let (&s, &len) = reg.range(..=p).next_back()?;
    (p - s < len).then_some((s, len))
}

/// Writes an attribute value of type `T` to `data`.
///
/// # Safety
/// `data` must be NULL or writable for a `T` (NVIDIA's contract for the attribute).
unsafe fn put<T>(data: *mut c_void, value: T) -> Res<()> {
    // SAFETY: forwarded caller promise.
    unsafe { out(data.cast::<T>(), value) }
}

#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: c_int,
    ptr: CUdeviceptr,
) -> CUresult {
    guard("cuPointerGetAttribute", || {
        let d = driver()?;
        if data.is_null() {
            return Err(invalid());
        }
        let unsupported = || Err(Fail(CUDA_ERROR_NOT_SUPPORTED));
        if let Some(found) = d.find_device(ptr, 0, None) {
            let p = found?;
            // SAFETY: every `put` writes the type NVIDIA documents for the attribute.
            return unsafe {
                match attribute {
                    CU_POINTER_ATTRIBUTE_CONTEXT => put(data, handle(p.ctx.id)),
                    CU_POINTER_ATTRIBUTE_MEMORY_TYPE => put(data, CU_MEMORYTYPE_DEVICE),
                    CU_POINTER_ATTRIBUTE_DEVICE_POINTER => put(data, ptr),
                    CU_POINTER_ATTRIBUTE_HOST_POINTER => Err(invalid()),
                    CU_POINTER_ATTRIBUTE_BUFFER_ID => put(data, p.entry.handle),
                    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL => put(data, p.ctx.device as c_int),
                    CU_POINTER_ATTRIBUTE_RANGE_START_ADDR => put(data, p.base),
                    CU_POINTER_ATTRIBUTE_RANGE_SIZE => put(data, p.entry.size as usize),
                    _ => unsupported(),
                }
            };
        }
        let host = d
            .find_host(ptr as usize, 0)
            .map(|(h, _)| (h.start(), h.buffer.len(), d.contexts.get(h.ctx)))
            .or_else(|| registered(d, ptr as usize).map(|(s, l)| (s, l, None)));
        let Some((start, len, ctx)) = host else {
            return Err(invalid());
        };
        // SAFETY: as above.
        unsafe {
            match attribute {
                CU_POINTER_ATTRIBUTE_CONTEXT => match ctx {
                    Some(c) => put(data, handle(c.id)),
                    None => Err(invalid()),
                },
                CU_POINTER_ATTRIBUTE_MEMORY_TYPE => put(data, CU_MEMORYTYPE_HOST),
                CU_POINTER_ATTRIBUTE_HOST_POINTER => put(data, ptr as usize as *mut c_void),
                CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL => match ctx {
                    Some(c) => put(data, c.device as c_int),
                    None => Err(invalid()),
                },
                CU_POINTER_ATTRIBUTE_RANGE_START_ADDR => put(data, start as CUdeviceptr),
                CU_POINTER_ATTRIBUTE_RANGE_SIZE => put(data, len),
                CU_POINTER_ATTRIBUTE_DEVICE_POINTER
                | CU_POINTER_ATTRIBUTE_IS_MANAGED
                | CU_POINTER_ATTRIBUTE_MAPPED => unsupported(),
                _ => unsupported(),
            }
        }
    })
}

// ---- copies ----

/// `n` bytes from host memory at `src` to a device pointer.
fn to_device(d: &Driver, p: &DevicePtr, src: *const u8, n: usize) -> Res<()> {
    let (handle, offset) = (p.entry.handle, p.offset);
    if let Some((h, at)) = d.find_host(src as usize, n) {
        return p
            .ctx
            .submit(|s| s.raw_htod_from_host(handle, offset, &h.buffer, at, n));
    }
    // SAFETY: `src` is readable for `n` bytes by the copy's contract (checked non-NULL).
    let data = unsafe { std::slice::from_raw_parts(src, n) };
    p.ctx.submit(|s| s.raw_htod(handle, offset, data))
}

/// `n` bytes from a device pointer to host memory at `dst`; the copy returns once the
/// context's earlier work has finished.
fn to_host(d: &Driver, p: &DevicePtr, dst: *mut u8, n: usize) -> Res<()> {
    let (handle, offset) = (p.entry.handle, p.offset);
    let upto = p.ctx.sequence();
    if let Some((h, at)) = d.find_host(dst as usize, n) {
        let copy = |s: &vgpu::Session| {
            // SAFETY: the caller hands these bytes to the copy: nothing else uses them
            // until it returns (the copy's contract).
            unsafe { s.raw_dtoh_into_shared_host(handle, offset, &h.buffer, at, n) }
        };
        p.ctx.submit(copy)?;
    } else {
        // SAFETY: `dst` is writable for `n` bytes by the copy's contract (non-NULL).
        let out = unsafe { std::slice::from_raw_parts_mut(dst, n) };
        p.ctx.submit(|s| s.raw_dtoh(handle, offset, out))?;
    }
    p.ctx.finished_through(upto);
    Ok(())
}

/// `n` bytes between device pointers; through the host when they are in different
/// contexts (different sessions).
fn device_to_device(src: &DevicePtr, dst: &DevicePtr, n: usize) -> Res<()> {
    if Arc::ptr_eq(&src.ctx, &dst.ctx) {
        let (dh, doff, sh, soff) = (dst.entry.handle, dst.offset, src.entry.handle, src.offset);
        return dst.ctx.submit(|s| s.raw_dtod(dh, doff, sh, soff, n as u64));
    }
    let mut staged = vec![0u8; n];
    src.ctx
        .submit(|s| s.raw_dtoh(src.entry.handle, src.offset, &mut staged))?;
    dst.ctx
        .submit(|s| s.raw_htod(dst.entry.handle, dst.offset, &staged))
}

fn htod(dst: CUdeviceptr, src: *const c_void, n: usize, prefer: Option<&Arc<Context>>) -> Res<()> {
    let d = driver()?;
    if n == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(invalid());
    }
    let p = d.device_ptr(dst, n as u64, prefer)?;
    to_device(d, &p, src.cast(), n)
}

fn dtoh(dst: *mut c_void, src: CUdeviceptr, n: usize, prefer: Option<&Arc<Context>>) -> Res<()> {
    let d = driver()?;
    if n == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(invalid());
    }
    let p = d.device_ptr(src, n as u64, prefer)?;
    to_host(d, &p, dst.cast(), n)
}

fn dtod(dst: CUdeviceptr, src: CUdeviceptr, n: usize, prefer: Option<&Arc<Context>>) -> Res<()> {
    let d = driver()?;
    if n == 0 {
        return Ok(());
    }
    let s = d.device_ptr(src, n as u64, prefer)?;
    let t = d.device_ptr(dst, n as u64, Some(&s.ctx))?;
    device_to_device(&s, &t, n)
}

/// A copy whose direction the pointers tell (unified addressing).
fn unified(dst: CUdeviceptr, src: CUdeviceptr, n: usize, prefer: Option<&Arc<Context>>) -> Res<()> {
    let d = driver()?;
    if n == 0 {
        return Ok(());
    }
    let s = d.find_device(src, n as u64, prefer).transpose()?;
    let t = d.find_device(dst, n as u64, prefer).transpose()?;
    match (s, t) {
        (Some(s), Some(t)) => device_to_device(&s, &t, n),
        (None, Some(t)) if src != 0 => to_device(d, &t, src as usize as *const u8, n),
        (Some(s), None) if dst != 0 => to_host(d, &s, dst as usize as *mut u8, n),
        (None, None) if src != 0 && dst != 0 => {
            // SAFETY: both host memory of `n` bytes by the copy's contract.
            unsafe {
                std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, n);
            }
            Ok(())
        }
        _ => Err(invalid()),
    }
}

fn stream_ctx(stream: CUstream) -> Res<Arc<Context>> {
    Ok(driver()?.stream(stream)?.ctx)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CUresult {
    guard("cuMemcpyHtoD", || htod(dst, src, n, None))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD(dst: CUdeviceptr, src: *const c_void, n: usize) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemcpyHtoD_v2(dst, src, n) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemcpyHtoDAsync", || {
        htod(dst, src, n, Some(&stream_ctx(stream)?))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemcpyHtoDAsync_v2(dst, src, n, stream) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    guard("cuMemcpyDtoH", || dtoh(dst, src, n, None))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemcpyDtoH_v2(dst, src, n) }
}

/// Returns once the data is in `dst` (a copy to the host waits for the device).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemcpyDtoHAsync", || {
        dtoh(dst, src, n, Some(&stream_ctx(stream)?))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuMemcpyDtoHAsync_v2(dst, src, n, stream) }
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    guard("cuMemcpyDtoD", || dtod(dst, src, n, None))
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    cuMemcpyDtoD_v2(dst, src, n)
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemcpyDtoDAsync", || {
        dtod(dst, src, n, Some(&stream_ctx(stream)?))
    })
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    stream: CUstream,
) -> CUresult {
    cuMemcpyDtoDAsync_v2(dst, src, n, stream)
}

/// Unified addressing: a pointer that lies in a device allocation or variable is the
/// device's, any other is host memory.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    guard("cuMemcpy", || unified(dst, src, n, None))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemcpyAsync", || {
        unified(dst, src, n, Some(&stream_ctx(stream)?))
    })
}

// ---- memsets ----

/// Sets `count` elements of `width` bytes (1, 2 or 4) at `dst` to `value`.
fn memset(
    dst: CUdeviceptr,
    width: u64,
    value: u32,
    count: usize,
    prefer: Option<&Arc<Context>>,
) -> Res<()> {
    let d = driver()?;
    let bytes = (count as u64).checked_mul(width).ok_or_else(invalid)?;
    if dst % width != 0 {
        return Err(invalid());
    }
    if count == 0 {
        return Ok(());
    }
    let p = d.device_ptr(dst, bytes, prefer)?;
    let (handle, offset) = (p.entry.handle, p.offset);
    let pieces = match width {
        1 => vec![Piece::Memset {
            offset,
            len: bytes,
            value: value & 0xff,
            width: 1,
        }],
        2 => memset::d16(offset, value as u16, count as u64).ok_or_else(invalid)?,
        _ if offset % 4 == 0 => vec![Piece::Memset {
            offset,
            len: bytes,
            value,
            width: 4,
        }],
        _ => return Err(invalid()),
    };
    for piece in pieces {
        match piece {
            Piece::Memset {
                offset,
                len,
                value,
                width,
            } => p
                .ctx
                .submit(|s| s.raw_memset(handle, offset, len, value, width))?,
            Piece::Bytes { offset, data } => p.ctx.submit(|s| s.raw_htod(handle, offset, &data))?,
        }
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: c_uchar, count: usize) -> CUresult {
    guard("cuMemsetD8", || memset(dst, 1, value as u32, count, None))
}

#[no_mangle]
pub extern "C" fn cuMemsetD8(dst: CUdeviceptr, value: c_uchar, count: usize) -> CUresult {
    cuMemsetD8_v2(dst, value, count)
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: c_uchar,
    count: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemsetD8Async", || {
        memset(dst, 1, value as u32, count, Some(&stream_ctx(stream)?))
    })
}

#[no_mangle]
pub extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, value: c_ushort, count: usize) -> CUresult {
    guard("cuMemsetD16", || memset(dst, 2, value as u32, count, None))
}

#[no_mangle]
pub extern "C" fn cuMemsetD16(dst: CUdeviceptr, value: c_ushort, count: usize) -> CUresult {
    cuMemsetD16_v2(dst, value, count)
}

#[no_mangle]
pub extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    value: c_ushort,
    count: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemsetD16Async", || {
        memset(dst, 2, value as u32, count, Some(&stream_ctx(stream)?))
    })
}

#[no_mangle]
pub extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, value: c_uint, count: usize) -> CUresult {
    guard("cuMemsetD32", || memset(dst, 4, value, count, None))
}

#[no_mangle]
pub extern "C" fn cuMemsetD32(dst: CUdeviceptr, value: c_uint, count: usize) -> CUresult {
    cuMemsetD32_v2(dst, value, count)
}

#[no_mangle]
pub extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    value: c_uint,
    count: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemsetD32Async", || {
        memset(dst, 4, value, count, Some(&stream_ctx(stream)?))
    })
}
