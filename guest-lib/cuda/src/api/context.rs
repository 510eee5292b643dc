// SPDX-License-Identifier: Apache-2.0
//! Contexts: one session of the device each; the current one is a per-thread stack.

use std::ffi::{c_int, c_uint, c_ulonglong, c_void};
use std::sync::atomic::Ordering;

use super::{handle, id, out, out_opt};
use crate::state::{
    current_id, driver, lock, pop_current, push_current, set_current, Context, LIMITS,
};
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

// `CUlimit` (CUDA 13.0).
const CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH: c_int = 3;
const CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT: c_int = 4;
const CU_LIMIT_MAX_L2_FETCH_GRANULARITY: c_int = 5;
const CU_LIMIT_PERSISTING_L2_CACHE_SIZE: c_int = 6;
const CU_LIMIT_SHMEM_SIZE: c_int = 7;
const CU_LIMIT_CIG_ENABLED: c_int = 8;
/// The deepest nesting `CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH` may be set to.
const MAX_SYNC_DEPTH: usize = 24;
/// The coarsest `CU_LIMIT_MAX_L2_FETCH_GRANULARITY` (bytes).
const MAX_L2_FETCH_GRANULARITY: usize = 128;

/// What a context's limits depend on of its device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LimitDevice {
    pub cc: (u32, u32),
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR`.
    pub smem_per_sm: usize,
    /// `CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE`: 0 without persisting L2.
    pub max_persisting_l2: usize,
}

impl LimitDevice {
    fn of(c: &Context) -> Res<LimitDevice> {
        let d = driver()?;
        let slot = d.device(c.device as CUdevice)?;
        let a = d.attributes(slot)?;
        let at = |n: usize| a.get(n - 1).map_or(0, |&v| usize::try_from(v).unwrap_or(0));
        Ok(LimitDevice {
            cc: (
                u32::from(slot.config.cc_major),
                u32::from(slot.config.cc_minor),
            ),
            smem_per_sm: at(81),
            max_persisting_l2: at(108),
        })
    }

    /// The index of `limit` where the device supports it, as NVIDIA's driver documents
    /// it: the device runtime's limits from compute capability 3.5, its sync depth
    /// below 9.0 only (`cudaDeviceSynchronize` in kernels is gone from Hopper on);
    /// persisting L2 where the device has it (8.0 and later); all others always.
    fn supported(&self, limit: c_int) -> Res<usize> {
        let device_runtime = self.cc >= (3, 5);
        let ok = match limit {
            CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH => device_runtime && self.cc < (9, 0),
            CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT => device_runtime,
            CU_LIMIT_PERSISTING_L2_CACHE_SIZE => self.max_persisting_l2 > 0,
            _ => true,
        };
        usize::try_from(limit)
            .ok()
            .filter(|&l| ok && l < LIMITS)
            .ok_or(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT))
    }

    /// `cuCtxGetLimit`'s answer from the context's `stored` limits. Not a CIG (CUDA in
    /// graphics) context: kernels have all of the SM's shared memory.
    pub(crate) fn read(&self, stored: &[usize; LIMITS], limit: c_int) -> Res<usize> {
        let l = self.supported(limit)?;
        Ok(match limit {
            CU_LIMIT_SHMEM_SIZE => self.smem_per_sm,
            CU_LIMIT_CIG_ENABLED => 0,
            _ => stored[l],
        })
    }

    /// Where `cuCtxSetLimit` stores what, as NVIDIA's driver takes it: the sync depth
    /// up to 24, the L2 fetch granularity clamped to 128 bytes and the persisting L2 to
    /// the device's maximum; the CIG shared memory size and state cannot be set.
    pub(crate) fn write(&self, limit: c_int, value: usize) -> Res<(usize, usize)> {
        let l = self.supported(limit)?;
        let v = match limit {
            CU_LIMIT_SHMEM_SIZE | CU_LIMIT_CIG_ENABLED => {
                return Err(Fail(CUDA_ERROR_INVALID_VALUE))
            }
            CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH if value > MAX_SYNC_DEPTH => {
                return Err(Fail(CUDA_ERROR_INVALID_VALUE))
            }
            CU_LIMIT_MAX_L2_FETCH_GRANULARITY => value.min(MAX_L2_FETCH_GRANULARITY),
            CU_LIMIT_PERSISTING_L2_CACHE_SIZE => value.min(self.max_persisting_l2),
            _ => value,
        };
        Ok((l, v))
    }
}

/// The stack size, printf FIFO, malloc heap and the other limits a context has: the
/// values NVIDIA's driver starts with, and `CUDA_ERROR_UNSUPPORTED_LIMIT` for those the
/// device's compute capability does not have; what a program sets is remembered and
/// answered, but the host's context keeps its own.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(value: *mut usize, limit: c_int) -> CUresult {
    guard("cuCtxGetLimit", || {
        let c = driver()?.current()?;
        let v = LimitDevice::of(&c)?.read(&lock(&c.limits), limit)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(value, v) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetLimit(limit: c_int, value: usize) -> CUresult {
    guard("cuCtxSetLimit", || {
        let c = driver()?.current()?;
        let (l, v) = LimitDevice::of(&c)?.write(limit, value)?;
        lock(&c.limits)[l] = v;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    const H200: LimitDevice = LimitDevice {
        cc: (9, 0),
        smem_per_sm: 228 << 10,
        max_persisting_l2: 78 << 20,
    };
    const A100: LimitDevice = LimitDevice {
        cc: (8, 0),
        smem_per_sm: 164 << 10,
        max_persisting_l2: 30 << 20,
    };
    const T4: LimitDevice = LimitDevice {
        cc: (7, 5),
        smem_per_sm: 64 << 10,
        max_persisting_l2: 0,
    };
    const DEFAULTS: [usize; LIMITS] = [1024, 1 << 20, 8 << 20, 2, 2048, 64, 0, 0, 0, 1];

    #[test]
    fn hopper_has_no_device_runtime_sync_depth() {
        // cudarc's context-config example fails here on an H200, as it must.
        let unsupported = Err(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT));
        assert_eq!(H200.read(&DEFAULTS, 3), unsupported);
        assert_eq!(H200.write(3, 2), Err(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT)));
        let answers: Vec<_> = [0, 1, 2, 4, 5, 6, 7, 8, 9]
            .iter()
            .map(|&l| H200.read(&DEFAULTS, l))
            .collect();
        let expected = [1024, 1 << 20, 8 << 20, 2048, 64, 0, 228 << 10, 0, 1];
        assert_eq!(answers, expected.map(Ok));
        assert_eq!(H200.read(&DEFAULTS, 10), unsupported, "not in CUDA 13.0");
        assert_eq!(H200.read(&DEFAULTS, -1), unsupported);
    }

    #[test]
    fn ampere_has_sync_depth_and_persisting_l2_and_turing_no_persisting_l2() {
        assert_eq!(A100.read(&DEFAULTS, 3), Ok(2));
        assert_eq!(A100.write(3, 24), Ok((3, 24)));
        assert_eq!(A100.write(3, 25), Err(Fail(CUDA_ERROR_INVALID_VALUE)));
        assert_eq!(A100.write(6, 1 << 20), Ok((6, 1 << 20)));
        assert_eq!(A100.write(6, 1 << 30), Ok((6, 30 << 20)), "clamped");
        assert_eq!(T4.read(&DEFAULTS, 3), Ok(2));
        assert_eq!(
            T4.read(&DEFAULTS, 6),
            Err(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT))
        );
        assert_eq!(T4.write(6, 0), Err(Fail(CUDA_ERROR_UNSUPPORTED_LIMIT)));
    }

    #[test]
    fn settable_limits_take_what_the_driver_takes() {
        assert_eq!(H200.write(0, 4096), Ok((0, 4096)));
        assert_eq!(H200.write(5, 32), Ok((5, 32)));
        assert_eq!(H200.write(5, 256), Ok((5, 128)));
        assert_eq!(H200.write(7, 0), Err(Fail(CUDA_ERROR_INVALID_VALUE)));
        assert_eq!(H200.write(8, 1), Err(Fail(CUDA_ERROR_INVALID_VALUE)));
        assert_eq!(H200.write(9, 0), Ok((9, 0)));
    }
}
