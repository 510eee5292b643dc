// SPDX-License-Identifier: Apache-2.0
//! Kernel launches. The parameters are laid out by the kernel's parameter list (from
//! FUNCTION_INFO, asked once per function) and passed to the device as raw values:
//! device pointers are the device's own addresses. Kernels of the built-in catalog take
//! whole buffers, so a pointer that is an allocation's base address goes as that buffer.

use std::ffi::{c_uint, c_void};

use vgpu::LaunchConfig;

use super::invalid;
use crate::params;
use crate::state::driver;
use crate::types::*;
use crate::{guard, Fail, Res};

/// One launch as the driver API describes it.
struct Launch {
    func: CUfunction,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared: c_uint,
    stream: CUstream,
    kernel_params: *const *const c_void,
    extra: *const *const c_void,
}

/// # Safety
/// `kernel_params` and `extra` as `cuLaunchKernel` takes them.
unsafe fn launch(l: Launch) -> Res<()> {
    let d = driver()?;
    if l.grid.contains(&0) || l.block.contains(&0) {
        return Err(invalid());
    }
    let ctx = d.stream(l.stream)?.ctx;
    let f = d.function_like(l.func, Some(&ctx))?;
    if f.module.ctx.id != ctx.id {
        return Err(Fail(CUDA_ERROR_INVALID_HANDLE));
    }
    let info = f.info.as_ref().ok_or(Fail(CUDA_ERROR_NOT_SUPPORTED))?;
    let values = match (l.kernel_params.is_null(), l.extra.is_null()) {
        (_, true) => {
            // SAFETY: one pointer per parameter (cuLaunchKernel's contract).
            unsafe { params::from_pointers(&info.params, l.kernel_params) }?
        }
        (true, false) => {
            // SAFETY: an END-terminated extra list (cuLaunchKernel's contract).
            let buffer = unsafe { params::extra_buffer(l.extra) }?;
            params::from_buffer(&info.params, &buffer)?
        }
        (false, false) => return Err(invalid()),
    };
    let find = |address: u64| ctx.buffer_at(address);
    let builtin = f.module.is_builtin();
    let params = params::to_params(
        values,
        builtin.then_some(&find as &dyn Fn(u64) -> Option<u64>),
    );
    let cfg = LaunchConfig {
        grid: l.grid,
        block: l.block,
        shared_bytes: l.shared,
    };
    let module = f.module.handle;
    ctx.submit(|s| s.raw_launch(module, f.name(), cfg, &params))
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    func: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared: c_uint,
    stream: CUstream,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    guard("cuLaunchKernel", || {
        // SAFETY: forwarded contract.
        unsafe {
            launch(Launch {
                func,
                grid: [grid_x, grid_y, grid_z],
                block: [block_x, block_y, block_z],
                shared,
                stream,
                kernel_params: kernel_params.cast_const().cast(),
                extra: extra.cast_const().cast(),
            })
        }
    })
}

/// The attributes that change what a launch means are refused (cooperative launches,
/// clusters, launch events); the others are hints and ignored.
fn check_attributes(attrs: &[CUlaunchAttribute]) -> Res<()> {
    for a in attrs {
        let w = a.value.words;
        let refused = match a.id {
            CU_LAUNCH_ATTRIBUTE_COOPERATIVE => w[0] != 0,
            CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION => w[..3].iter().any(|&d| d > 1),
            CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT
            | CU_LAUNCH_ATTRIBUTE_LAUNCH_COMPLETION_EVENT => true,
            _ => false,
        };
        if refused {
            log::warn!(
                "cuLaunchKernelEx: launch attribute {} is not supported",
                a.id
            );
            return Err(Fail(CUDA_ERROR_NOT_SUPPORTED));
        }
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    func: CUfunction,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    guard("cuLaunchKernelEx", || {
        // SAFETY: NULL or a CUlaunchConfig, by NVIDIA's contract.
        let c = unsafe { config.as_ref() }.ok_or_else(invalid)?;
        if c.num_attrs > 0 {
            if c.attrs.is_null() {
                return Err(invalid());
            }
            // SAFETY: `num_attrs` attributes at `attrs`, by NVIDIA's contract.
            let attrs = unsafe { std::slice::from_raw_parts(c.attrs, c.num_attrs as usize) };
            check_attributes(attrs)?;
        }
        // SAFETY: forwarded contract.
        unsafe {
            launch(Launch {
                func,
                grid: [c.grid_dim_x, c.grid_dim_y, c.grid_dim_z],
                block: [c.block_dim_x, c.block_dim_y, c.block_dim_z],
                shared: c.shared_mem_bytes,
                stream: c.h_stream,
                kernel_params: kernel_params.cast_const().cast(),
                extra: extra.cast_const().cast(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(id: c_uint, words: &[c_uint]) -> CUlaunchAttribute {
        let mut value = CUlaunchAttributeValue { words: [0; 16] };
        value.words[..words.len()].copy_from_slice(words);
        CUlaunchAttribute {
            id,
            pad: [0; 4],
            value,
        }
    }

    #[test]
    fn launch_attributes_that_change_the_launch_are_refused() {
        assert!(check_attributes(&[attr(8, &[3]), attr(0, &[])]).is_ok());
        assert!(
            check_attributes(&[attr(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, &[1, 1, 1])]).is_ok()
        );
        assert!(check_attributes(&[attr(CU_LAUNCH_ATTRIBUTE_COOPERATIVE, &[0])]).is_ok());
        for refused in [
            attr(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, &[2, 1, 1]),
            attr(CU_LAUNCH_ATTRIBUTE_COOPERATIVE, &[1]),
            attr(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT, &[]),
        ] {
            assert_eq!(
                check_attributes(&[refused]),
                Err(Fail(CUDA_ERROR_NOT_SUPPORTED))
            );
        }
    }
}
