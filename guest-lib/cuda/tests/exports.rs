// SPDX-License-Identifier: Apache-2.0
//! The built shared library, loaded as a program loads `libcuda.so.1`: it resolves
//! every function cudarc binds for CUDA 13.0, by name, and answers like a driver
//! without GPUs when this machine has no `/dev/vgpuN`.

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;

use libloading::Library;

/// `libvgpu_cuda.so` in the target directory this test was built in.
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let deps = exe.parent().expect("target/<profile>/deps");
    let candidates = [
        deps.parent().map(|p| p.join("libvgpu_cuda.so")),
        Some(deps.join("libvgpu_cuda.so")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libvgpu_cuda.so not found next to {}", exe.display()))
}

fn load() -> Library {
    // SAFETY: the library's initializers are Rust's (none of its own); loading it runs
    // nothing else.
    unsafe { Library::new(cdylib()) }.expect("dlopen libvgpu_cuda.so")
}

#[test]
fn every_function_cudarc_binds_resolves_by_name() {
    let lib = load();
    let mut missing = Vec::new();
    for name in vgpu_cuda::CUDARC_EXPORTS {
        // SAFETY: only resolved, never called, here.
        let f = unsafe { lib.get::<unsafe extern "C" fn() -> u32>(name.as_bytes()) };
        if f.is_err() {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert_eq!(vgpu_cuda::CUDARC_EXPORTS.len(), 445);
    // The unversioned names of the common entry points, for programs that use them.
    for name in [
        "cuMemAlloc",
        "cuMemFree",
        "cuCtxCreate",
        "cuMemcpyHtoD",
        "cuGetProcAddress",
    ] {
        // SAFETY: only resolved.
        assert!(unsafe { lib.get::<unsafe extern "C" fn() -> u32>(name.as_bytes()) }.is_ok());
    }
    // Nothing but the driver API: the Rust runtime and the guest library's C ABI stay
    // inside.
    for name in ["vgpu_open", "rust_eh_personality", "not_supported"] {
        // SAFETY: only resolved.
        let found = unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) };
        assert!(found.is_err(), "{name}");
    }
}

#[test]
fn without_a_device_it_answers_like_a_driver_without_gpus() {
    let lib = load();
    // SAFETY: the driver API's signatures; every pointer passed is a valid local.
    unsafe {
        let version = lib
            .get::<unsafe extern "C" fn(*mut c_int) -> u32>(b"cuDriverGetVersion")
            .unwrap();
        let mut v = 0;
        assert_eq!(version(&mut v), 0);
        assert_eq!(v, 13000);

        let name = lib
            .get::<unsafe extern "C" fn(u32, *mut *const c_char) -> u32>(b"cuGetErrorName")
            .unwrap();
        let mut s = std::ptr::null();
        assert_eq!(name(801, &mut s), 0);
        assert_eq!(CStr::from_ptr(s).to_str(), Ok("CUDA_ERROR_NOT_SUPPORTED"));

        let stub = lib
            .get::<unsafe extern "C" fn() -> u32>(b"cuArrayDestroy")
            .unwrap();
        assert_eq!(stub(), 801);

        let init = lib
            .get::<unsafe extern "C" fn(u32) -> u32>(b"cuInit")
            .unwrap();
        let count = lib
            .get::<unsafe extern "C" fn(*mut c_int) -> u32>(b"cuDeviceGetCount")
            .unwrap();
        let mut n = -1;
        if std::path::Path::new("/dev/vgpu0").exists() {
            assert_eq!(init(0), 0);
            assert_eq!(count(&mut n), 0);
            assert!(n > 0);
        } else {
            assert_eq!(init(0), 100, "CUDA_ERROR_NO_DEVICE");
            assert_eq!(count(&mut n), 3, "CUDA_ERROR_NOT_INITIALIZED");
        }
    }
}
