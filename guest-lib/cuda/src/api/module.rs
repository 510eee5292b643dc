// SPDX-License-Identifier: Apache-2.0
//! Modules, functions, libraries and kernels.
//!
//! A module is loaded into the current context (PTX through MODULE_LOAD, cubin and
//! fatbin images through MODULE_LOAD_IMAGE, `vgpu:builtin` names the device's built-in
//! catalog). A function is asked of the device once (FUNCTION_INFO: its attributes and
//! parameter layout). A library keeps its image and is loaded into each context that
//! uses it; a `CUkernel` is a library's function in whatever context is current.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vgpu::FUNCTION_ATTRIBUTES;

use super::{c_str, handle, id, invalid, out, out_opt};
use crate::image::{self, Source, BUILTIN};
use crate::state::{driver, Function};
use crate::types::*;
use crate::{guard, Fail, Res};

/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` and `..._PREFERRED_SHARED_MEMORY_CARVEOUT`.
const MAX_DYNAMIC_SHARED: c_int = 8;
const CARVEOUT: c_int = 9;
/// `CU_FUNC_ATTRIBUTE_MAX`: the cluster attributes 10..=15 are all 0 here.
const FUNCTION_ATTRIBUTE_MAX: c_int = 16;
const CU_MODULE_EAGER_LOADING: c_int = 1;
const CU_FUNCTION_LOADING_STATE_LOADED: c_int = 1;

/// The module named by a file: `vgpu:builtin`, or the file's contents.
fn source_from_file(name: &str) -> Res<Source> {
    if name == BUILTIN {
        return Ok(Source::Builtin);
    }
    let bytes = std::fs::read(name).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Fail(CUDA_ERROR_FILE_NOT_FOUND),
        _ => Fail(CUDA_ERROR_OPERATING_SYSTEM),
    })?;
    image::from_bytes(&bytes)
}

/// Answers JIT options that report back: no wall time, empty logs.
///
/// # Safety
/// `options` and `values` must be NULL or hold `n` entries, as `cuModuleLoadDataEx`
/// takes them.
unsafe fn answer_jit_options(n: c_uint, options: *const c_int, values: *mut *mut c_void) {
    if n == 0 || options.is_null() || values.is_null() {
        return;
    }
    // SAFETY: `n` entries each, by the caller's promise.
    let (options, values) = unsafe {
        (
            std::slice::from_raw_parts(options, n as usize),
            std::slice::from_raw_parts_mut(values, n as usize),
        )
    };
    let size_of = |wanted: c_int| {
        options
            .iter()
            .position(|&o| o == wanted)
            .map_or(0, |i| values[i] as usize)
    };
    let (info_size, error_size) = (
        size_of(CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES),
        size_of(CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES),
    );
    for (i, &o) in options.iter().enumerate() {
        match o {
            CU_JIT_WALL_TIME => values[i] = 0f32.to_bits() as usize as *mut c_void,
            CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES | CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES => {
                values[i] = std::ptr::null_mut()
            }
            CU_JIT_INFO_LOG_BUFFER | CU_JIT_ERROR_LOG_BUFFER => {
                let size = if o == CU_JIT_INFO_LOG_BUFFER {
                    info_size
                } else {
                    error_size
                };
                let log = values[i].cast::<u8>();
                if !log.is_null() && size > 0 {
                    // SAFETY: the log buffer holds `size` bytes (cuModuleLoadDataEx's
                    // contract).
                    unsafe { *log = 0 };
                }
            }
            _ => {}
        }
    }
}

fn load(pmod: *mut CUmodule, source: Res<Source>) -> Res<()> {
    if pmod.is_null() {
        return Err(invalid());
    }
    let d = driver()?;
    let ctx = d.current()?;
    let m = d.load_module(&ctx, &source?)?;
    // SAFETY: checked non-NULL; writable by NVIDIA's contract.
    unsafe { out(pmod, handle(m.id)) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(pmod: *mut CUmodule, fname: *const c_char) -> CUresult {
    guard("cuModuleLoad", || {
        driver()?;
        // SAFETY: a NUL-terminated file name, by NVIDIA's contract.
        let name = unsafe { c_str(fname) }?;
        load(pmod, source_from_file(name))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(pmod: *mut CUmodule, image: *const c_void) -> CUresult {
    guard("cuModuleLoadData", || {
        driver()?;
        // SAFETY: an image of a kind `image` recognises, by NVIDIA's contract.
        load(pmod, unsafe { image::from_pointer(image.cast()) })
    })
}

/// The options are not passed on (the host loads with its defaults); log buffers come
/// back empty.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    pmod: *mut CUmodule,
    image: *const c_void,
    num_options: c_uint,
    options: *const c_int,
    values: *mut *mut c_void,
) -> CUresult {
    guard("cuModuleLoadDataEx", || {
        driver()?;
        // SAFETY: the option arrays as cuModuleLoadDataEx takes them.
        unsafe { answer_jit_options(num_options, options, values) };
        // SAFETY: as for cuModuleLoadData.
        load(pmod, unsafe { image::from_pointer(image.cast()) })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadFatBinary(
    pmod: *mut CUmodule,
    fat: *const c_void,
) -> CUresult {
    guard("cuModuleLoadFatBinary", || {
        driver()?;
        // SAFETY: a fatbin (or any image), by NVIDIA's contract.
        load(pmod, unsafe { image::from_pointer(fat.cast()) })
    })
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    guard("cuModuleUnload", || driver()?.unload_module(id(hmod)))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut CUfunction,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard("cuModuleGetFunction", || {
        let d = driver()?;
        let m = d
            .modules
            .get(id(hmod))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        // SAFETY: a NUL-terminated name, by NVIDIA's contract.
        let name = unsafe { c_str(name) }?;
        if hfunc.is_null() {
            return Err(invalid());
        }
        let f = d.function(&m, name)?;
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(hfunc, handle(f)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard("cuModuleGetGlobal", || {
        let d = driver()?;
        let m = d
            .modules
            .get(id(hmod))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        // SAFETY: a NUL-terminated name, by NVIDIA's contract.
        let name = unsafe { c_str(name) }?;
        let (address, size) = d.global(&m, name)?;
        // SAFETY: each NULL or writable, by NVIDIA's contract.
        unsafe {
            out_opt(dptr, address);
            out_opt(bytes, size as usize);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuModuleGetGlobal_v2(dptr, bytes, hmod, name) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetLoadingMode(mode: *mut c_int) -> CUresult {
    // SAFETY: NVIDIA's contract for the out-parameter.
    guard("cuModuleGetLoadingMode", || unsafe {
        out(mode, CU_MODULE_EAGER_LOADING)
    })
}

fn attribute(f: &Function, attrib: c_int) -> Res<c_int> {
    let info = f.info.as_ref().ok_or(Fail(CUDA_ERROR_NOT_SUPPORTED))?;
    match attrib {
        MAX_DYNAMIC_SHARED => Ok(f.max_dynamic_shared.load(Ordering::Relaxed)),
        CARVEOUT => Ok(f.carveout.load(Ordering::Relaxed)),
        a if (0..FUNCTION_ATTRIBUTES as c_int).contains(&a) => Ok(info.attributes[a as usize]),
        a if (0..FUNCTION_ATTRIBUTE_MAX).contains(&a) => Ok(0),
        _ => Err(invalid()),
    }
}

/// Remembers the maximum dynamic shared memory and carveout a program sets (the host
/// applies what a launch asks for); cluster shapes are not offered.
fn set_attribute(f: &Function, attrib: c_int, value: c_int) -> Res<()> {
    match attrib {
        MAX_DYNAMIC_SHARED => f.max_dynamic_shared.store(value, Ordering::Relaxed),
        CARVEOUT => f.carveout.store(value, Ordering::Relaxed),
        11..=13 if value > 1 => return Err(Fail(CUDA_ERROR_NOT_SUPPORTED)),
        10..=15 => {}
        _ => return Err(invalid()),
    }
    Ok(())
}

fn param_info(f: &Function, index: usize, offset: *mut usize, size: *mut usize) -> Res<()> {
    let info = f.info.as_ref().ok_or(Fail(CUDA_ERROR_NOT_SUPPORTED))?;
    let &(o, s) = info.params.get(index).ok_or_else(invalid)?;
    // SAFETY: each NULL or writable, by NVIDIA's contract.
    unsafe {
        out_opt(offset, o as usize);
        out_opt(size, s as usize);
    }
    Ok(())
}

fn function(h: *mut c_void) -> Res<Arc<Function>> {
    driver()?.function_like(h, None)
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    hfunc: CUfunction,
) -> CUresult {
    guard("cuFuncGetAttribute", || {
        let v = attribute(&*function(hfunc)?, attrib)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pi, v) }
    })
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(hfunc: CUfunction, attrib: c_int, value: c_int) -> CUresult {
    guard("cuFuncSetAttribute", || {
        set_attribute(&*function(hfunc)?, attrib, value)
    })
}

/// Remembers a function's cache preference (over the context's, as NVIDIA's driver
/// does): the occupancy calculator takes it into account; the host's cache configuration
/// stands.
fn set_cache_config(h: *mut c_void, config: c_uint) -> Res<()> {
    let f = function(h)?;
    if config > 3 {
        return Err(invalid());
    }
    f.cache_config.store(config, Ordering::Relaxed);
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(hfunc: CUfunction, config: c_uint) -> CUresult {
    guard("cuFuncSetCacheConfig", || set_cache_config(hfunc, config))
}

/// Accepted: the host's shared memory configuration stands.
#[no_mangle]
pub extern "C" fn cuFuncSetSharedMemConfig(hfunc: CUfunction, _config: c_uint) -> CUresult {
    guard("cuFuncSetSharedMemConfig", || function(hfunc).map(drop))
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetParamInfo(
    hfunc: CUfunction,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> CUresult {
    guard("cuFuncGetParamInfo", || {
        param_info(&*function(hfunc)?, index, offset, size)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetName(name: *mut *const c_char, hfunc: CUfunction) -> CUresult {
    guard("cuFuncGetName", || {
        let f = function(hfunc)?;
        // The name lives as long as the function's module.
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(name, f.name.as_ptr()) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetModule(hmod: *mut CUmodule, hfunc: CUfunction) -> CUresult {
    guard("cuFuncGetModule", || {
        let f = function(hfunc)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(hmod, handle(f.module.id)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncIsLoaded(state: *mut c_int, hfunc: CUfunction) -> CUresult {
    guard("cuFuncIsLoaded", || {
        function(hfunc)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(state, CU_FUNCTION_LOADING_STATE_LOADED) }
    })
}

#[no_mangle]
pub extern "C" fn cuFuncLoad(hfunc: CUfunction) -> CUresult {
    guard("cuFuncLoad", || function(hfunc).map(drop))
}

// ---- libraries and kernels ----

fn load_library(plib: *mut CUlibrary, source: Res<Source>) -> Res<()> {
    if plib.is_null() {
        return Err(invalid());
    }
    let d = driver()?;
    let lib = d.add_library(source?);
    // Loaded into the current context at once, so a bad image fails here.
    if let Ok(ctx) = d.current() {
        let l = d
            .libraries
            .get(lib)
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        if let Err(e) = d.library_module(&l, &ctx) {
            let _ = d.unload_library(lib);
            return Err(e);
        }
    }
    // SAFETY: checked non-NULL; writable by NVIDIA's contract.
    unsafe { out(plib, handle(lib)) }
}

/// Options (JIT and library) are not passed on; JIT logs come back empty.
#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadData(
    plib: *mut CUlibrary,
    code: *const c_void,
    jit_options: *const c_int,
    jit_values: *mut *mut c_void,
    num_jit_options: c_uint,
    _library_options: *const c_int,
    _library_values: *mut *mut c_void,
    _num_library_options: c_uint,
) -> CUresult {
    guard("cuLibraryLoadData", || {
        driver()?;
        // SAFETY: the option arrays as cuLibraryLoadData takes them.
        unsafe { answer_jit_options(num_jit_options, jit_options, jit_values) };
        // SAFETY: an image of a kind `image` recognises, by NVIDIA's contract.
        load_library(plib, unsafe { image::from_pointer(code.cast()) })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryLoadFromFile(
    plib: *mut CUlibrary,
    file: *const c_char,
    jit_options: *const c_int,
    jit_values: *mut *mut c_void,
    num_jit_options: c_uint,
    _library_options: *const c_int,
    _library_values: *mut *mut c_void,
    _num_library_options: c_uint,
) -> CUresult {
    guard("cuLibraryLoadFromFile", || {
        driver()?;
        // SAFETY: the option arrays as cuLibraryLoadFromFile takes them.
        unsafe { answer_jit_options(num_jit_options, jit_options, jit_values) };
        // SAFETY: a NUL-terminated file name, by NVIDIA's contract.
        let name = unsafe { c_str(file) }?;
        load_library(plib, source_from_file(name))
    })
}

#[no_mangle]
pub extern "C" fn cuLibraryUnload(lib: CUlibrary) -> CUresult {
    guard("cuLibraryUnload", || driver()?.unload_library(id(lib)))
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetKernel(
    pkernel: *mut CUkernel,
    lib: CUlibrary,
    name: *const c_char,
) -> CUresult {
    guard("cuLibraryGetKernel", || {
        let d = driver()?;
        let l = d
            .libraries
            .get(id(lib))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        // SAFETY: a NUL-terminated name, by NVIDIA's contract.
        let name = unsafe { c_str(name) }?;
        if pkernel.is_null() {
            return Err(invalid());
        }
        let k = d.kernel(&l, name)?;
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(pkernel, handle(k)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetModule(pmod: *mut CUmodule, lib: CUlibrary) -> CUresult {
    guard("cuLibraryGetModule", || {
        let d = driver()?;
        let l = d
            .libraries
            .get(id(lib))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        if pmod.is_null() {
            return Err(invalid());
        }
        let m = d.library_module(&l, &d.current()?)?;
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(pmod, handle(m.id)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLibraryGetGlobal(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    lib: CUlibrary,
    name: *const c_char,
) -> CUresult {
    guard("cuLibraryGetGlobal", || {
        let d = driver()?;
        let l = d
            .libraries
            .get(id(lib))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        // SAFETY: a NUL-terminated name, by NVIDIA's contract.
        let name = unsafe { c_str(name) }?;
        let m = d.library_module(&l, &d.current()?)?;
        let (address, size) = d.global(&m, name)?;
        // SAFETY: each NULL or writable, by NVIDIA's contract.
        unsafe {
            out_opt(dptr, address);
            out_opt(bytes, size as usize);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuKernelGetFunction(pfunc: *mut CUfunction, kernel: CUkernel) -> CUresult {
    guard("cuKernelGetFunction", || {
        let f = function(kernel)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pfunc, handle(f.id)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuKernelGetLibrary(plib: *mut CUlibrary, kernel: CUkernel) -> CUresult {
    guard("cuKernelGetLibrary", || {
        let k = driver()?
            .kernels
            .get(id(kernel))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(plib, handle(k.library.id)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuKernelGetName(name: *mut *const c_char, kernel: CUkernel) -> CUresult {
    guard("cuKernelGetName", || {
        let k = driver()?
            .kernels
            .get(id(kernel))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        // SAFETY: NVIDIA's contract for the out-parameter; the name lives with its
        // library.
        unsafe { out(name, k.name.as_ptr()) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuKernelGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    kernel: CUkernel,
    _dev: CUdevice,
) -> CUresult {
    guard("cuKernelGetAttribute", || {
        let v = attribute(&*function(kernel)?, attrib)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pi, v) }
    })
}

#[no_mangle]
pub extern "C" fn cuKernelSetAttribute(
    attrib: c_int,
    value: c_int,
    kernel: CUkernel,
    _dev: CUdevice,
) -> CUresult {
    guard("cuKernelSetAttribute", || {
        set_attribute(&*function(kernel)?, attrib, value)
    })
}

/// As `cuFuncSetCacheConfig`.
#[no_mangle]
pub extern "C" fn cuKernelSetCacheConfig(
    kernel: CUkernel,
    config: c_uint,
    _dev: CUdevice,
) -> CUresult {
    guard("cuKernelSetCacheConfig", || {
        set_cache_config(kernel, config)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuKernelGetParamInfo(
    kernel: CUkernel,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> CUresult {
    guard("cuKernelGetParamInfo", || {
        param_info(&*function(kernel)?, index, offset, size)
    })
}
