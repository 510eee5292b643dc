// SPDX-License-Identifier: Apache-2.0
//! Kernel parameters as `cuLaunchKernel` gets them, laid out by the kernel's parameter
//! list (offset and size of each, from FUNCTION_INFO): `kernelParams[i]` points to
//! parameter `i`, or `extra` hands one buffer with every parameter at its offset.

use std::ffi::c_void;

use vgpu::Param;

use crate::types::{
    CUDA_ERROR_INVALID_VALUE, CU_LAUNCH_PARAM_BUFFER_POINTER, CU_LAUNCH_PARAM_BUFFER_SIZE,
    CU_LAUNCH_PARAM_END,
};
use crate::{Fail, Res};

/// Most (key, value) pairs read from `extra` before its END.
const MAX_EXTRA_PAIRS: usize = 16;

fn invalid() -> Fail {
    Fail(CUDA_ERROR_INVALID_VALUE)
}

/// The bytes of each parameter: `params[i]` points to `layout[i].1` bytes.
///
/// # Safety
/// `params` must be NULL or point to `layout.len()` pointers, each to its parameter.
pub unsafe fn from_pointers(
    layout: &[(u32, u32)],
    params: *const *const c_void,
) -> Res<Vec<Vec<u8>>> {
    if layout.is_empty() {
        return Ok(Vec::new());
    }
    if params.is_null() {
        return Err(invalid());
    }
    // SAFETY: one pointer per parameter, by the caller's promise.
    let pointers = unsafe { std::slice::from_raw_parts(params, layout.len()) };
    layout
        .iter()
        .zip(pointers)
        .map(|(&(_, size), &p)| {
            if p.is_null() {
                return Err(invalid());
            }
            // SAFETY: each points to its parameter's `size` bytes (caller's promise).
            Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), size as usize) }.to_vec())
        })
        .collect()
}

/// The argument buffer that `extra` describes (`CU_LAUNCH_PARAM_BUFFER_POINTER` and
/// `CU_LAUNCH_PARAM_BUFFER_SIZE`, then `CU_LAUNCH_PARAM_END`), copied.
///
/// # Safety
/// `extra` must be a list of (key, value) pointers ended by `CU_LAUNCH_PARAM_END`, the
/// buffer pointer valid for the size the size pointer points to.
pub unsafe fn extra_buffer(extra: *const *const c_void) -> Res<Vec<u8>> {
    let (mut buffer, mut size): (Option<*const u8>, Option<usize>) = (None, None);
    for pair in 0..MAX_EXTRA_PAIRS {
        // SAFETY: keys and values up to the END key, by the caller's promise.
        let key = unsafe { *extra.add(2 * pair) } as usize;
        match key {
            CU_LAUNCH_PARAM_END => {
                return match (buffer, size) {
                    (Some(b), Some(n)) if !b.is_null() || n == 0 => Ok(if n == 0 {
                        Vec::new()
                    } else {
                        // SAFETY: the buffer holds `n` bytes (caller's promise).
                        unsafe { std::slice::from_raw_parts(b, n) }.to_vec()
                    }),
                    _ => Err(invalid()),
                };
            }
            CU_LAUNCH_PARAM_BUFFER_POINTER => {
                // SAFETY: the value after a key.
                buffer = Some(unsafe { *extra.add(2 * pair + 1) }.cast::<u8>());
            }
            CU_LAUNCH_PARAM_BUFFER_SIZE => {
                // SAFETY: the value after a key: a pointer to a size_t.
                let p = unsafe { *extra.add(2 * pair + 1) }.cast::<usize>();
                if p.is_null() {
                    return Err(invalid());
                }
                // SAFETY: non-NULL, points to the size (caller's promise).
                size = Some(unsafe { p.read_unaligned() });
            }
            _ => return Err(invalid()),
        }
    }
    Err(invalid())
}

/// The bytes of each parameter, cut out of an argument buffer by the layout.
pub fn from_buffer(layout: &[(u32, u32)], buffer: &[u8]) -> Res<Vec<Vec<u8>>> {
    layout
        .iter()
        .map(|&(offset, size)| {
            let start = offset as usize;
            buffer
                .get(start..start + size as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(invalid)
        })
        .collect()
}

/// The launch's parameters. For a kernel of the built-in catalog, which takes whole
/// buffers, an 8-byte parameter whose value is the base address of one of the context's
/// allocations (`buffer_at`) goes as that buffer; everything else goes as its bytes.
pub fn to_params(
    values: Vec<Vec<u8>>,
    buffer_at: Option<&dyn Fn(u64) -> Option<u64>>,
) -> Vec<Param> {
    values
        .into_iter()
        .map(|v| {
            let handle = match (buffer_at, <[u8; 8]>::try_from(&v[..])) {
                (Some(find), Ok(word)) => find(u64::from_le_bytes(word)),
                _ => None,
            };
            match handle {
                Some(h) => Param::Buffer(h),
                None => Param::Value(v),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: [(u32, u32); 4] = [(0, 8), (8, 4), (16, 8), (24, 2)];

    #[test]
    fn kernel_params_point_to_each_parameter_of_its_size() {
        let (a, b, c, d) = (0x7f00_0000_1000u64, 7u32, 2.5f64, 0x0102u16);
        let ptrs: [*const c_void; 4] = [
            (&a as *const u64).cast(),
            (&b as *const u32).cast(),
            (&c as *const f64).cast(),
            (&d as *const u16).cast(),
        ];
        // SAFETY: four pointers to live values of the layout's sizes.
        let values = unsafe { from_pointers(&LAYOUT, ptrs.as_ptr()) }.unwrap();
        assert_eq!(
            values,
            vec![
                a.to_le_bytes().to_vec(),
                b.to_le_bytes().to_vec(),
                c.to_le_bytes().to_vec(),
                d.to_le_bytes().to_vec()
            ]
        );
        // SAFETY: NULL arrays are checked; no parameters need none.
        unsafe {
            assert_eq!(from_pointers(&[], std::ptr::null()), Ok(vec![]));
            assert_eq!(
                from_pointers(&LAYOUT, std::ptr::null()),
                Err(Fail(CUDA_ERROR_INVALID_VALUE))
            );
        }
        let with_null = [ptrs[0], std::ptr::null(), ptrs[2], ptrs[3]];
        // SAFETY: as above, one of them NULL.
        let refused = unsafe { from_pointers(&LAYOUT, with_null.as_ptr()) };
        assert_eq!(refused, Err(Fail(CUDA_ERROR_INVALID_VALUE)));
    }

    #[test]
    fn extra_hands_one_buffer_cut_at_the_parameters_offsets() {
        let mut buf = [0u8; 26];
        buf[..8].copy_from_slice(&0x1122u64.to_le_bytes());
        buf[8..12].copy_from_slice(&9u32.to_le_bytes());
        buf[12..16].fill(0xee); // padding
        buf[16..24].copy_from_slice(&1.5f64.to_le_bytes());
        buf[24..26].copy_from_slice(&3u16.to_le_bytes());
        let size = buf.len();
        let extra: [*const c_void; 5] = [
            CU_LAUNCH_PARAM_BUFFER_POINTER as *const c_void,
            buf.as_ptr().cast(),
            CU_LAUNCH_PARAM_BUFFER_SIZE as *const c_void,
            (&size as *const usize).cast(),
            CU_LAUNCH_PARAM_END as *const c_void,
        ];
        // SAFETY: a well-formed extra list over a live buffer.
        let copied = unsafe { extra_buffer(extra.as_ptr()) }.unwrap();
        assert_eq!(copied, buf);
        let values = from_buffer(&LAYOUT, &copied).unwrap();
        assert_eq!(values[1], 9u32.to_le_bytes());
        assert_eq!(values[2], 1.5f64.to_le_bytes());
        assert_eq!(values[3], 3u16.to_le_bytes());
        // Too short for the layout; no size; an unknown key.
        assert_eq!(
            from_buffer(&LAYOUT, &copied[..25]),
            Err(Fail(CUDA_ERROR_INVALID_VALUE))
        );
        let no_size: [*const c_void; 3] = [extra[0], extra[1], extra[4]];
        let unknown: [*const c_void; 3] = [9 as *const c_void, extra[1], extra[4]];
        for bad in [no_size, unknown] {
            // SAFETY: END-terminated lists.
            let refused = unsafe { extra_buffer(bad.as_ptr()) };
            assert_eq!(refused, Err(Fail(CUDA_ERROR_INVALID_VALUE)));
        }
    }

    #[test]
    fn built_in_kernels_get_buffers_for_allocation_base_addresses() {
        let base = 0x7f00_0000_0100u64;
        let find = |addr: u64| (addr == base).then_some(42u64);
        let values = vec![
            base.to_le_bytes().to_vec(),
            (base + 4).to_le_bytes().to_vec(),
            7u32.to_le_bytes().to_vec(),
        ];
        assert_eq!(
            to_params(values.clone(), Some(&find)),
            vec![
                Param::Buffer(42),
                Param::Value((base + 4).to_le_bytes().to_vec()),
                Param::Value(7u32.to_le_bytes().to_vec()),
            ]
        );
        // Other modules get raw values: device pointers are real addresses.
        assert!(to_params(values, None)
            .iter()
            .all(|p| matches!(p, Param::Value(_))));
    }
}
