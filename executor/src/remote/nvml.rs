// SPDX-License-Identifier: Apache-2.0
//! What a worker host reports about its GPUs without opening a CUDA context: the count
//! and the first GPU's free memory, from NVIDIA's management library
//! (`libnvidia-ml.so.1`, installed with the driver), when it loads.

use std::ffi::c_void;
use std::sync::OnceLock;

type NvmlInit = unsafe extern "C" fn() -> u32;
type NvmlCount = unsafe extern "C" fn(*mut u32) -> u32;
type NvmlHandle = unsafe extern "C" fn(u32, *mut *mut c_void) -> u32;
type NvmlMemory = unsafe extern "C" fn(*mut c_void, *mut NvmlMemoryInfo) -> u32;

#[repr(C)]
#[derive(Default)]
struct NvmlMemoryInfo {
    total: u64,
    free: u64,
    used: u64,
}

struct Nvml {
    _lib: libloading::Library,
    count: NvmlCount,
    handle: NvmlHandle,
    memory: NvmlMemory,
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        // SAFETY: loading NVIDIA's library runs its initialisers, which have no
        // preconditions; the symbols are used with the signatures NVML documents.
        unsafe {
            let lib = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init: NvmlInit = *lib.get(b"nvmlInit_v2\0").ok()?;
            let count: NvmlCount = *lib.get(b"nvmlDeviceGetCount_v2\0").ok()?;
            let handle: NvmlHandle = *lib.get(b"nvmlDeviceGetHandleByIndex_v2\0").ok()?;
            let memory: NvmlMemory = *lib.get(b"nvmlDeviceGetMemoryInfo\0").ok()?;
            if init() != 0 {
                return None;
            }
            Some(Nvml {
                _lib: lib,
                count,
                handle,
                memory,
            })
        }
    })
    .as_ref()
}

/// GPUs NVML sees, when it loads.
pub fn gpu_count() -> Option<u32> {
    let n = nvml()?;
    let mut c = 0u32;
    // SAFETY: `c` is a valid out-pointer.
    (unsafe { (n.count)(&mut c) } == 0).then_some(c)
}

/// Free memory of GPU `index` in bytes, when NVML loads.
pub fn free_memory(index: u32) -> Option<u64> {
    let n = nvml()?;
    let mut h: *mut c_void = std::ptr::null_mut();
    // SAFETY: `h` is a valid out-pointer.
    if unsafe { (n.handle)(index, &mut h) } != 0 {
        return None;
    }
    let mut m = NvmlMemoryInfo::default();
    // SAFETY: `h` is the handle NVML returned and `m` a valid out-pointer.
    (unsafe { (n.memory)(h, &mut m) } == 0).then_some(m.free)
}
