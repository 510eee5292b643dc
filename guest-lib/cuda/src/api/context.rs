// SPDX-License-Identifier: Apache-2.0
//! Contexts: one session of the device each; the current one is a per-thread stack.

use std::ffi::{c_int, c_uint, c_ulonglong, c_void};
use std::sync::atomic::Ordering;

use super::{handle, id, out, out_opt};
use crate::state::{current_id, driver, lock, pop_current, push_current, set_current, LIMITS};
use crate::types::*;
use crate::{guard, Fail, Res};

/// The priorities streams may have: 0 (least) to -5 (greatest), as on current GPUs.
const LEAST_PRIORITY: c_int = 0;
const GREATEST_PRIORITY: c_int = -5;

fn create(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) -> Res<()> {
    if pctx.is_null() {
        return Err(Fail(CUDA_ERROR_INVALID_VALUE));
    }
    let d = driver()?;
    let ctx = d.create_context(d.device(dev)?, flags)?;
    push_current(ctx.id);
    // SAFETY: checked non-NULL; writable by NVIDIA's contract.
    unsafe { out(pctx, handle(ctx.id)) }
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(
    pctx: *mut CUcontext,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard("cuCtxCreate", || create(pctx, flags, dev))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate(
    pctx: *mut CUcontext,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuCtxCreate_v2(pctx, flags, dev) }
}

/// With execution affinity parameters: none can be honoured.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(
    pctx: *mut CUcontext,
    _params: *mut c_void,
    num_params: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard("cuCtxCreate_v3", || {
        if num_params > 0 {
            return Err(Fail(CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY));
        }
        create(pctx, flags, dev)
    })
}

/// With `CUctxCreateParams`: execution affinity and CUDA-in-graphics are not offered.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    params: *const CUctxCreateParams,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    guard("cuCtxCreate_v4", || {
        // SAFETY: NULL or a CUctxCreateParams, by NVIDIA's contract.
        if let Some(p) = unsafe { params.as_ref() } {
            if p.num_exec_affinity_params > 0 {
                return Err(Fail(CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY));
            }
            if !p.cig_params.is_null() {
                return Err(Fail(CUDA_ERROR_NOT_SUPPORTED));
            }
        }
        create(pctx, flags, dev)
    })
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    guard("cuCtxDestroy", || {
        let d = driver()?;
        let c = d
            .contexts
            .get(id(ctx))
            .ok_or(Fail(CUDA_ERROR_INVALID_CONTEXT))?;
        if c.primary {
            return Err(Fail(CUDA_ERROR_INVALID_CONTEXT));
        }
        d.destroy_context(&c);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy(ctx: CUcontext) -> CUresult {
    cuCtxDestroy_v2(ctx)
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard("cuCtxSetCurrent", || {
        let d = driver()?;
        if ctx.is_null() {
            set_current(None);
            return Ok(());
        }
        d.contexts
            .get(id(ctx))
            .ok_or(Fail(CUDA_ERROR_INVALID_CONTEXT))?;
        set_current(Some(id(ctx)));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxGetCurrent", || {
        driver()?;
        let current = current_id().map_or(std::ptr::null_mut(), handle);
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pctx, current) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    guard("cuCtxPushCurrent", || {
        let d = driver()?;
        d.contexts
            .get(id(ctx))
            .ok_or(Fail(CUDA_ERROR_INVALID_CONTEXT))?;
        push_current(id(ctx));
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent(ctx: CUcontext) -> CUresult {
    cuCtxPushCurrent_v2(ctx)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxPopCurrent", || {
        driver()?;
        let popped = pop_current().ok_or(Fail(CUDA_ERROR_INVALID_CONTEXT))?;
        // SAFETY: NULL or writable, by NVIDIA's contract.
        unsafe { out_opt(pctx, handle(popped)) };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent(pctx: *mut CUcontext) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuCtxPopCurrent_v2(pctx) }
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guard("cuCtxGetDevice", || {
        let ctx = driver()?.current()?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(device, ctx.device as CUdevice) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice_v2(device: *mut CUdevice, ctx: CUcontext) -> CUresult {
    guard("cuCtxGetDevice_v2", || {
        let c = driver()?.context(ctx)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(device, c.device as CUdevice) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard("cuCtxSynchronize", || driver()?.current()?.sync())
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize_v2(ctx: CUcontext) -> CUresult {
    guard("cuCtxSynchronize_v2", || driver()?.context(ctx)?.sync())
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) -> CUresult {
    guard("cuCtxGetApiVersion", || {
        driver()?.context(ctx)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(version, 3020) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetId(ctx: CUcontext, ctx_id: *mut c_ulonglong) -> CUresult {
    guard("cuCtxGetId", || {
        let c = driver()?.context(ctx)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(ctx_id, c.id) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    guard("cuCtxGetFlags", || {
        let c = driver()?.current()?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(flags, c.flags.load(Ordering::Relaxed)) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetFlags(flags: c_uint) -> CUresult {
    guard("cuCtxSetFlags", || {
        let c = driver()?.current()?;
        c.flags.store(flags, Ordering::Relaxed);
        Ok(())
    })
}

/// The stack size, printf FIFO, malloc heap and the other limits a context has: the
/// values NVIDIA's driver starts with; what a program sets is remembered and answered,
/// but the host's context keeps its own.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(value: *mut usize, limit: c_int) -> CUresult {
    guard("cuCtxGetLimit", || {
        let c = driver()?.current()?;
        let v = usize::try_from(limit)
            .ok()
            .and_then(|l| c.limit(l))
            .ok_or(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT))?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(value, v) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetLimit(limit: c_int, value: usize) -> CUresult {
    guard("cuCtxSetLimit", || {
        let c = driver()?.current()?;
        match usize::try_from(limit) {
            Ok(l) if l < LIMITS => {
                lock(&c.limits)[l] = value;
                Ok(())
            }
            _ => Err(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT)),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCacheConfig(config: *mut c_uint) -> CUresult {
    guard("cuCtxGetCacheConfig", || {
        let c = driver()?.current()?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(config, c.cache_config.load(Ordering::Relaxed)) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCacheConfig(config: c_uint) -> CUresult {
    guard("cuCtxSetCacheConfig", || {
        if config > 3 {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        driver()?
            .current()?
            .cache_config
            .store(config, Ordering::Relaxed);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetSharedMemConfig(config: *mut c_uint) -> CUresult {
    guard("cuCtxGetSharedMemConfig", || {
        let c = driver()?.current()?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(config, c.shmem_config.load(Ordering::Relaxed)) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetSharedMemConfig(config: c_uint) -> CUresult {
    guard("cuCtxSetSharedMemConfig", || {
        if config > 2 {
            return Err(Fail(CUDA_ERROR_INVALID_VALUE));
        }
        driver()?
            .current()?
            .shmem_config
            .store(config, Ordering::Relaxed);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    guard("cuCtxGetStreamPriorityRange", || {
        driver()?.current()?;
        // SAFETY: each NULL or writable, by NVIDIA's contract.
        unsafe {
            out_opt(least, LEAST_PRIORITY);
            out_opt(greatest, GREATEST_PRIORITY);
        }
        Ok(())
    })
}

/// The priority a stream gets: clamped into the range, as NVIDIA's driver does.
pub(crate) fn clamp_priority(p: c_int) -> c_int {
    p.clamp(GREATEST_PRIORITY, LEAST_PRIORITY)
}
