// SPDX-License-Identifier: Apache-2.0
//! The C ABI declared in `include/vgpu.h` (`libvgpu.so`, `libvgpu.a`).
//!
//! Every function returns a `vgpu_status`: the protocol's status codes (0 = OK) and a few
//! of the library's own from 100 up. Nothing unwinds across the boundary: a panic
//! becomes `VGPU_ERROR_PANIC`. `vgpu_last_error` describes the calling thread's last
//! failure.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use vgpu_protocol::{Status, BUILTIN_MODULE};

use crate::error::{Error, Result};
use crate::session::{DeviceBuffer, HostBuffer, KernelArg, LaunchConfig, Module, Session};
use crate::Device;

/// A system call failed (see `vgpu_last_error`).
pub const VGPU_ERROR_IO: c_int = 100;
/// No such device, or it was removed or reset.
pub const VGPU_ERROR_NO_DEVICE: c_int = 101;
/// A NULL pointer, a bad string or an argument the request cannot carry.
pub const VGPU_ERROR_INVALID_VALUE: c_int = 102;
/// A bug inside the library; the session should be closed.
pub const VGPU_ERROR_PANIC: c_int = 103;

const VGPU_ARG_BUFFER: u32 = 0;
const VGPU_ARG_U32: u32 = 1;
const VGPU_ARG_I32: u32 = 2;
const VGPU_ARG_F32: u32 = 3;
const VGPU_ARG_U64: u32 = 4;
const VGPU_ARG_F64: u32 = 5;
const VGPU_ARG_BYTES: u32 = 6;

/// One session, with the buffers and modules the C caller holds by handle.
pub struct vgpu_session {
    session: Session,
    buffers: Mutex<HashMap<u64, DeviceBuffer<u8>>>,
    modules: Mutex<HashMap<u64, Module>>,
    /// Host buffers by start address.
    hosts: Mutex<HashMap<usize, HostBuffer>>,
}

impl vgpu_session {
    /// The host buffer that holds `[addr, addr + len)`, if one does, and the offset.
    fn host_at(&self, addr: usize, len: usize) -> Option<(usize, usize)> {
        let hosts = lock(&self.hosts);
        hosts.iter().find_map(|(&start, b)| {
            let end = start + b.len();
            (addr >= start && addr.checked_add(len)? <= end).then_some((start, addr - start))
        })
    }
}

/// The value of a kernel argument; which member is set depends on `vgpu_arg.kind`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vgpu_arg_value {
    pub buffer: u64,
    pub u32_: u32,
    pub i32_: i32,
    pub f32_: f32,
    pub u64_: u64,
    pub f64_: f64,
    pub bytes: *const c_void,
}

/// One kernel argument (see `vgpu.h`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vgpu_arg {
    pub kind: u32,
    /// Bytes at `value.bytes`, for `VGPU_ARG_BYTES` only.
    pub size: u32,
    pub value: vgpu_arg_value,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

fn status_of(e: &Error) -> c_int {
    match e {
        Error::Device { status, .. } => *status as c_int,
        Error::DeviceGone => VGPU_ERROR_NO_DEVICE,
        Error::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            VGPU_ERROR_NO_DEVICE
        }
        Error::ForeignHandle(_) | Error::UnknownHandle { .. } => Status::InvalidHandle as c_int,
        Error::InvalidArgument(_) => VGPU_ERROR_INVALID_VALUE,
        Error::Open { .. }
        | Error::ChainTooLong
        | Error::Io { .. }
        | Error::ShortReply { .. }
        | Error::Protocol(_) => VGPU_ERROR_IO,
    }
}

/// Runs `f`, turning its error or panic into a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::Ok as c_int,
        Ok(Err(e)) => {
            set_last_error(e.report());
            status_of(&e)
        }
        Err(_) => {
            set_last_error("internal error (panic) in libvgpu".into());
            VGPU_ERROR_PANIC
        }
    }
}

fn invalid(msg: &str) -> Error {
    Error::invalid(msg)
}

fn unknown_handle(what: &'static str, handle: u64) -> Error {
    Error::UnknownHandle { what, handle }
}

/// # Safety
/// `s` must be NULL or a session from `vgpu_open` not yet closed.
unsafe fn session<'a>(s: *const vgpu_session) -> Result<&'a vgpu_session> {
    // SAFETY: the caller promises a live session or NULL.
    unsafe { s.as_ref() }.ok_or_else(|| invalid("NULL session"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// # Safety
/// `s` must be NULL or a NUL-terminated string.
unsafe fn c_str<'a>(s: *const c_char, what: &str) -> Result<&'a str> {
    if s.is_null() {
        return Err(invalid(&format!("NULL {what}")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's promise.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| invalid(&format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` must be NULL or point to three readable `uint32_t`.
unsafe fn dim3(p: *const u32, what: &str) -> Result<[u32; 3]> {
    if p.is_null() {
        return Err(invalid(&format!("NULL {what}")));
    }
    // SAFETY: three readable values by the caller's promise.
    Ok(unsafe { [*p, *p.add(1), *p.add(2)] })
}

fn open_session(device: Result<Device>, out: *mut *mut vgpu_session) -> Result<()> {
    if out.is_null() {
        return Err(invalid("NULL output pointer"));
    }
    let session = device?.session()?;
    let s = Box::new(vgpu_session {
        session,
        buffers: Mutex::new(HashMap::new()),
        modules: Mutex::new(HashMap::new()),
        hosts: Mutex::new(HashMap::new()),
    });
    // SAFETY: checked non-NULL; the caller provides a writable pointer.
    unsafe { *out = Box::into_raw(s) };
    Ok(())
}

/// Opens a session on `/dev/vgpu<index>`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vgpu_open(index: c_int, out: *mut *mut vgpu_session) -> c_int {
    guard(|| {
        let index = u32::try_from(index).map_err(|_| invalid("negative device index"))?;
        open_session(Device::open(index), out)
    })
}

/// Opens a session on the device node at `path`.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vgpu_open_path(path: *const c_char, out: *mut *mut vgpu_session) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let path = unsafe { c_str(path, "path") }?;
        open_session(Device::open_path(path), out)
    })
}

/// Frees the session's buffers and modules and closes it. NULL is ignored.
///
/// # Safety
/// `s` must be NULL or a session from `vgpu_open`, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn vgpu_close(s: *mut vgpu_session) {
    if s.is_null() {
        return;
    }
    // SAFETY: the caller hands back ownership of a session made by Box::into_raw.
    let s = unsafe { Box::from_raw(s) };
    let _ = guard(move || {
        drop(s);
        Ok(())
    });
}

/// Allocates `size` bytes of device memory.
///
/// # Safety
/// `s` must be a live session; `handle` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vgpu_alloc(s: *mut vgpu_session, size: u64, handle: *mut u64) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        if handle.is_null() {
            return Err(invalid("NULL handle pointer"));
        }
        let size = usize::try_from(size).map_err(|_| invalid("size too large"))?;
        let b = s.session.alloc::<u8>(size)?;
        let h = b.handle();
        lock(&s.buffers).insert(h, b);
        // SAFETY: checked non-NULL; writable by the caller's promise.
        unsafe { *handle = h };
        Ok(())
    })
}

/// Frees a buffer.
///
/// # Safety
/// `s` must be a live session.
#[no_mangle]
pub unsafe extern "C" fn vgpu_free(s: *mut vgpu_session, handle: u64) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        let b = lock(&s.buffers).remove(&handle);
        match b {
            Some(b) => {
                drop(b);
                Ok(())
            }
            None => Err(unknown_handle("buffer", handle)),
        }
    })
}

fn check_buffer(s: &vgpu_session, handle: u64) -> Result<()> {
    if lock(&s.buffers).contains_key(&handle) {
        Ok(())
    } else {
        Err(unknown_handle("buffer", handle))
    }
}

/// Copies `len` bytes from `src` to the buffer at `offset`.
///
/// # Safety
/// `s` must be a live session; `src` must be readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vgpu_htod(
    s: *mut vgpu_session,
    handle: u64,
    offset: u64,
    src: *const c_void,
    len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        check_buffer(s, handle)?;
        if len == 0 {
            return Ok(());
        }
        if src.is_null() {
            return Err(invalid("NULL source"));
        }
        // Host memory of this session goes in large requests, straight from its pages.
        if let Some((start, at)) = s.host_at(src as usize, len) {
            let hosts = lock(&s.hosts);
            return s
                .session
                .raw_htod_from_host(handle, offset, &hosts[&start], at, len);
        }
        // SAFETY: readable for len bytes by the caller's promise.
        let src = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
        s.session.raw_htod(handle, offset, src)
    })
}

/// Copies `len` bytes from the buffer at `offset` to `dst`.
///
/// # Safety
/// `s` must be a live session; `dst` must be writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vgpu_dtoh(
    s: *mut vgpu_session,
    handle: u64,
    offset: u64,
    dst: *mut c_void,
    len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        check_buffer(s, handle)?;
        if len == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(invalid("NULL destination"));
        }
        if let Some((start, at)) = s.host_at(dst as usize, len) {
            let mut hosts = lock(&s.hosts);
            let host = hosts.get_mut(&start).expect("found above");
            return s.session.raw_dtoh_into_host(handle, offset, host, at, len);
        }
        // SAFETY: writable for len bytes by the caller's promise.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
        s.session.raw_dtoh(handle, offset, dst)
    })
}

/// Allocates `bytes` of host memory for fast copies (the analogue of `cudaMallocHost`):
/// on the guest driver, memory the device copies from and to directly. Zeroed.
///
/// # Safety
/// `s` must be a live session; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vgpu_host_alloc(
    s: *mut vgpu_session,
    bytes: usize,
    out: *mut *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        if out.is_null() {
            return Err(invalid("NULL output pointer"));
        }
        if bytes == 0 {
            return Err(invalid("zero bytes"));
        }
        let mut buffer = s.session.host_buffer(bytes)?;
        let ptr = buffer.as_mut_slice().as_mut_ptr();
        lock(&s.hosts).insert(ptr as usize, buffer);
        // SAFETY: checked non-NULL; writable by the caller's promise.
        unsafe { *out = ptr.cast() };
        Ok(())
    })
}

/// Frees host memory from [`vgpu_host_alloc`].
///
/// # Safety
/// `s` must be a live session; nothing may use the memory afterwards.
#[no_mangle]
pub unsafe extern "C" fn vgpu_host_free(s: *mut vgpu_session, ptr: *mut c_void) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        match lock(&s.hosts).remove(&(ptr as usize)) {
            Some(_) => Ok(()),
            None => Err(invalid("not host memory of this session")),
        }
    })
}

/// Loads a NUL-terminated PTX module.
///
/// # Safety
/// `s` must be a live session; `ptx` NUL-terminated; `module` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vgpu_load_module(
    s: *mut vgpu_session,
    ptx: *const c_char,
    module: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        // SAFETY: forwarded caller promise.
        let ptx = unsafe { c_str(ptx, "PTX") }?;
        if module.is_null() {
            return Err(invalid("NULL module pointer"));
        }
        let m = s.session.load_module(ptx)?;
        let h = m.handle();
        lock(&s.modules).insert(h, m);
        // SAFETY: checked non-NULL; writable by the caller's promise.
        unsafe { *module = h };
        Ok(())
    })
}

/// Unloads a module.
///
/// # Safety
/// `s` must be a live session.
#[no_mangle]
pub unsafe extern "C" fn vgpu_unload_module(s: *mut vgpu_session, module: u64) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        let m = lock(&s.modules).remove(&module);
        match m {
            Some(m) => {
                drop(m);
                Ok(())
            }
            None => Err(unknown_handle("module", module)),
        }
    })
}

/// # Safety
/// `args` must be NULL (with n = 0) or point to `n` arguments; BYTES arguments must
/// point to `size` readable bytes.
unsafe fn kernel_args<'a>(
    args: *const vgpu_arg,
    n: usize,
    buffers: &'a HashMap<u64, DeviceBuffer<u8>>,
) -> Result<Vec<KernelArg<'a>>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if args.is_null() {
        return Err(invalid("NULL arguments"));
    }
    // SAFETY: n readable arguments by the caller's promise.
    let args = unsafe { std::slice::from_raw_parts(args, n) };
    args.iter()
        .enumerate()
        // SAFETY: each union member read is the one `kind` selects.
        .map(|(i, a)| unsafe {
            Ok(match a.kind {
                VGPU_ARG_BUFFER => buffers
                    .get(&a.value.buffer)
                    .ok_or_else(|| unknown_handle("buffer", a.value.buffer))?
                    .arg(),
                VGPU_ARG_U32 => KernelArg::U32(a.value.u32_),
                VGPU_ARG_I32 => KernelArg::I32(a.value.i32_),
                VGPU_ARG_F32 => KernelArg::F32(a.value.f32_),
                VGPU_ARG_U64 => KernelArg::U64(a.value.u64_),
                VGPU_ARG_F64 => KernelArg::F64(a.value.f64_),
                VGPU_ARG_BYTES if a.size > 0 && !a.value.bytes.is_null() => KernelArg::Bytes(
                    std::slice::from_raw_parts(a.value.bytes.cast::<u8>(), a.size as usize),
                ),
                VGPU_ARG_BYTES => return Err(invalid(&format!("argument {i}: empty bytes"))),
                k => return Err(invalid(&format!("argument {i}: unknown kind {k}"))),
            })
        })
        .collect()
}

/// Launches `kernel` of `module` (0 = the built-in catalog).
///
/// # Safety
/// `s` must be a live session; `kernel` NUL-terminated; `grid` and `block` three
/// `uint32_t` each; `args` as for `vgpu_arg` arrays of `num_args` entries.
#[no_mangle]
pub unsafe extern "C" fn vgpu_launch(
    s: *mut vgpu_session,
    module: u64,
    kernel: *const c_char,
    grid: *const u32,
    block: *const u32,
    shared_bytes: u32,
    args: *const vgpu_arg,
    num_args: usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller passes a session from vgpu_session_open (forwarded promise).
        let s = unsafe { session(s) }?;
        // SAFETY: `kernel` is a NUL-terminated string or null (forwarded promise).
        let kernel = unsafe { c_str(kernel, "kernel name") }?;
        // SAFETY: `grid` and `block` point to three u32 each or are null (forwarded promise).
        let (grid, block) = unsafe { (dim3(grid, "grid")?, dim3(block, "block")?) };
        let cfg = LaunchConfig {
            grid,
            block,
            shared_bytes,
        };
        let buffers = lock(&s.buffers);
        // SAFETY: forwarded caller promise.
        let args = unsafe { kernel_args(args, num_args, &buffers) }?;
        if module == BUILTIN_MODULE {
            return s.session.launch(&s.session.builtin(), kernel, cfg, &args);
        }
        let modules = lock(&s.modules);
        let m = modules
            .get(&module)
            .ok_or_else(|| unknown_handle("module", module))?;
        s.session.launch(m, kernel, cfg, &args)
    })
}

/// Launches a kernel of the built-in catalog.
///
/// # Safety
/// As for `vgpu_launch`.
#[no_mangle]
pub unsafe extern "C" fn vgpu_launch_builtin(
    s: *mut vgpu_session,
    kernel: *const c_char,
    grid: *const u32,
    block: *const u32,
    args: *const vgpu_arg,
    num_args: usize,
) -> c_int {
    // SAFETY: forwarded caller promises.
    unsafe { vgpu_launch(s, BUILTIN_MODULE, kernel, grid, block, 0, args, num_args) }
}

/// Waits for the session's work; reports an asynchronous failure.
///
/// # Safety
/// `s` must be a live session.
#[no_mangle]
pub unsafe extern "C" fn vgpu_sync(s: *mut vgpu_session) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        unsafe { session(s) }?.session.sync()
    })
}

/// Writes the device's name, NUL-terminated and cut to fit, into `buf`.
///
/// # Safety
/// `s` must be a live session; `buf` writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn vgpu_device_name(
    s: *mut vgpu_session,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        if buf.is_null() || len == 0 {
            return Err(invalid("empty name buffer"));
        }
        let name = s.session.config()?.name;
        let n = name.len().min(len - 1);
        // SAFETY: n + 1 <= len writable bytes by the caller's promise.
        unsafe {
            std::ptr::copy_nonoverlapping(name.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
        Ok(())
    })
}

/// The index of the host GPU the session's device is placed on (0 from hosts that do not
/// say: those with one GPU).
///
/// # Safety
/// `s` must be a live session; `gpu` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn vgpu_device_gpu(s: *mut vgpu_session, gpu: *mut u32) -> c_int {
    guard(|| {
        // SAFETY: forwarded caller promise.
        let s = unsafe { session(s) }?;
        if gpu.is_null() {
            return Err(invalid("NULL gpu pointer"));
        }
        let index = s.session.config()?.gpu;
        // SAFETY: checked non-NULL; writable by the caller's promise.
        unsafe { *gpu = index };
        Ok(())
    })
}

/// The upper-case name of a status ("OK", "QUOTA_EXCEEDED", ...), or "UNKNOWN".
#[no_mangle]
pub extern "C" fn vgpu_status_name(status: c_int) -> *const c_char {
    let name: &'static CStr = match status {
        0 => c"OK",
        1 => c"INVALID_REQUEST",
        2 => c"UNKNOWN_OPCODE",
        3 => c"VERSION_MISMATCH",
        4 => c"INVALID_SESSION",
        5 => c"INVALID_HANDLE",
        6 => c"INVALID_ARGUMENT",
        7 => c"OUT_OF_RANGE",
        8 => c"QUOTA_EXCEEDED",
        9 => c"OUT_OF_MEMORY",
        10 => c"UNSUPPORTED",
        11 => c"KERNEL_NOT_FOUND",
        12 => c"MODULE_INVALID",
        13 => c"LAUNCH_FAILED",
        14 => c"DEVICE_LOST",
        15 => c"BUFFER_TOO_SMALL",
        16 => c"LIMIT_EXCEEDED",
        17 => c"INTERNAL",
        VGPU_ERROR_IO => c"ERROR_IO",
        VGPU_ERROR_NO_DEVICE => c"ERROR_NO_DEVICE",
        VGPU_ERROR_INVALID_VALUE => c"ERROR_INVALID_VALUE",
        VGPU_ERROR_PANIC => c"ERROR_PANIC",
        _ => c"UNKNOWN",
    };
    name.as_ptr()
}

/// The calling thread's last failure, as text; valid until its next failing call.
#[no_mangle]
pub extern "C" fn vgpu_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use vgpu_protocol::{Opcode, CONFIG_SIZE, REQUEST_HEADER_SIZE, RESPONSE_HEADER_SIZE};

    use super::*;
    use crate::fake::{AsyncDriver, FakeDevice, NAME};

    const VGPU_H: &str = include_str!("../include/vgpu.h");
    const VGPU_IOCTL_H: &str = include_str!("../include/vgpu_ioctl.h");

    /// `NAME = value` pairs of a C enum or of `#define NAME value` lines with a prefix.
    fn c_constants(text: &str, prefix: &str) -> Vec<(String, i64)> {
        text.lines()
            .filter_map(|l| {
                let l = l.trim().trim_start_matches("#define").trim();
                let rest = l.strip_prefix(prefix)?;
                let (name, value) = rest.split_once(|c: char| c == '=' || c.is_whitespace())?;
                let value = value.trim_start_matches(['=', ' ', '\t']);
                let digits: String = value.chars().take_while(|c| c.is_ascii_digit()).collect();
                Some((name.to_string(), digits.parse().ok()?))
            })
            .collect()
    }

    fn name(status: c_int) -> String {
        // SAFETY: vgpu_status_name returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(vgpu_status_name(status)) }
            .to_str()
            .unwrap()
            .to_string()
    }

    fn last_error() -> String {
        // SAFETY: a NUL-terminated thread-local string.
        unsafe { CStr::from_ptr(vgpu_last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn vgpu_h_statuses_are_the_protocols_and_named_alike() {
        let header: Vec<_> = c_constants(VGPU_H, "VGPU_")
            .into_iter()
            .filter(|(n, v)| *v < 100 && !n.starts_with("ARG_"))
            .collect();
        let protocol: Vec<_> = Status::ALL
            .iter()
            .map(|s| (s.name().to_string(), *s as i64))
            .collect();
        assert_eq!(header, protocol);
        for s in Status::ALL {
            assert_eq!(name(s as c_int), s.name());
        }
        let library = [
            (VGPU_ERROR_IO, "ERROR_IO"),
            (VGPU_ERROR_NO_DEVICE, "ERROR_NO_DEVICE"),
            (VGPU_ERROR_INVALID_VALUE, "ERROR_INVALID_VALUE"),
            (VGPU_ERROR_PANIC, "ERROR_PANIC"),
        ];
        for (code, n) in library {
            assert_eq!(name(code), n);
            assert!(c_constants(VGPU_H, "VGPU_").contains(&(n.to_string(), code as i64)));
        }
        assert_eq!(name(18), "UNKNOWN");
        assert_eq!(name(-1), "UNKNOWN");
    }

    #[test]
    fn vgpu_h_argument_kinds_are_the_librarys() {
        let kinds = c_constants(VGPU_H, "VGPU_ARG_");
        let expected = [
            ("BUFFER", VGPU_ARG_BUFFER),
            ("U32", VGPU_ARG_U32),
            ("I32", VGPU_ARG_I32),
            ("F32", VGPU_ARG_F32),
            ("U64", VGPU_ARG_U64),
            ("F64", VGPU_ARG_F64),
            ("BYTES", VGPU_ARG_BYTES),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(n, v)| (n.to_string(), *v as i64))
            .collect();
        assert_eq!(kinds, expected);
        assert_eq!(std::mem::size_of::<vgpu_arg>(), 16);
    }

    #[test]
    fn vgpu_ioctl_h_mirrors_the_protocol() {
        let statuses = c_constants(VGPU_IOCTL_H, "VGPU_STATUS_");
        let protocol: Vec<_> = Status::ALL
            .iter()
            .map(|s| (s.name().to_string(), *s as i64))
            .collect();
        assert_eq!(statuses, protocol);
        // Every opcode but HOST_REGISTER and HOST_UNREGISTER, which only the driver sends.
        let ops = c_constants(VGPU_IOCTL_H, "VGPU_OP_");
        assert_eq!(ops.len(), 19);
        for (n, v) in ops {
            let op = Opcode::from_u16(v as u16).unwrap();
            assert_eq!(crate::transport::opcode_name(op), n);
        }
        let sizes = c_constants(VGPU_IOCTL_H, "VGPU_");
        let get = |n: &str| sizes.iter().find(|(k, _)| k == n).unwrap().1 as usize;
        assert_eq!(get("REQUEST_HEADER_SIZE"), REQUEST_HEADER_SIZE);
        assert_eq!(get("RESPONSE_HEADER_SIZE"), RESPONSE_HEADER_SIZE);
        assert_eq!(get("CONFIG_SIZE"), CONFIG_SIZE);
        assert_eq!(get("HDR_SESSION"), 16);
        assert_eq!(get("HDR_OPCODE"), 6);
        assert_eq!(get("RESP_FLAGS"), 28);
        assert_eq!(get("RESP_F_ASYNC_ERROR"), 1);
        assert_eq!(get("ASYNC_MAX_BYTES"), crate::ASYNC_MAX_BYTES);
        assert_eq!(get("ASYNC_MAX_INFLIGHT"), 256);
        assert_eq!(get("POLL_MAX_US"), crate::POLL_MAX_US as usize);
    }

    fn open_fake(dev: &std::sync::Arc<FakeDevice>) -> *mut vgpu_session {
        wrap(dev.session())
    }

    fn wrap(session: Session) -> *mut vgpu_session {
        Box::into_raw(Box::new(vgpu_session {
            session,
            buffers: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
        }))
    }

    #[test]
    fn a_queued_launch_fails_at_vgpu_sync() {
        let dev = FakeDevice::new();
        let driver = AsyncDriver::new(dev.transport());
        let s = wrap(Session::from_transport(Box::new(driver)));
        let dims = [1u32, 1, 1];
        // SAFETY: (whole test) a live session and valid pointers throughout.
        unsafe {
            let launch = vgpu_launch_builtin(
                s,
                c"no_such_kernel".as_ptr(),
                dims.as_ptr(),
                dims.as_ptr(),
                std::ptr::null(),
                0,
            );
            assert_eq!(launch, 0);
            assert_eq!(vgpu_sync(s), Status::KernelNotFound as c_int);
            assert_eq!(
                last_error(),
                "LAUNCH: device returned KERNEL_NOT_FOUND (detail 0)"
            );
            assert_eq!(vgpu_sync(s), 0);
            vgpu_close(s);
        }
    }

    #[test]
    fn host_memory_copies_to_and_from_the_device_and_is_freed_once() {
        let dev = FakeDevice::new();
        let s = open_fake(&dev);
        let mut h = 0u64;
        let mut host: *mut c_void = std::ptr::null_mut();
        // SAFETY: (whole test) a live session; `host` is 3 pages long once allocated.
        unsafe {
            assert_eq!(vgpu_host_alloc(s, 3 * 4096, &mut host), 0);
            assert!(!host.is_null());
            let bytes = std::slice::from_raw_parts_mut(host.cast::<u8>(), 3 * 4096);
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            assert_eq!(vgpu_alloc(s, 8192, &mut h), 0);
            // From the middle of the host memory, then back into its last page.
            assert_eq!(
                vgpu_htod(s, h, 0, host.cast::<u8>().add(100).cast(), 4096),
                0
            );
            let last = host.cast::<u8>().add(2 * 4096);
            assert_eq!(vgpu_dtoh(s, h, 0, last.cast(), 4096), 0);
            let want: Vec<u8> = (100..100 + 4096).map(|i| (i % 251) as u8).collect();
            assert_eq!(&bytes[2 * 4096..], &want[..]);
            assert_eq!(vgpu_host_free(s, host), 0);
            assert_ne!(vgpu_host_free(s, host), 0);
            vgpu_close(s);
        }
    }

    #[test]
    fn c_calls_allocate_copy_launch_and_free() {
        let dev = FakeDevice::new();
        let s = open_fake(&dev);
        let data: Vec<f32> = (0..300).map(|i| i as f32).collect();
        let bytes = (data.len() * 4) as u64;
        let mut h = 0u64;
        // SAFETY: (whole test) a live session and valid pointers throughout.
        unsafe {
            assert_eq!(vgpu_alloc(s, bytes, &mut h), 0);
            assert_eq!(vgpu_htod(s, h, 0, data.as_ptr().cast(), bytes as usize), 0);
            let args = [
                vgpu_arg {
                    kind: VGPU_ARG_BUFFER,
                    size: 0,
                    value: vgpu_arg_value { buffer: h },
                },
                vgpu_arg {
                    kind: VGPU_ARG_F32,
                    size: 0,
                    value: vgpu_arg_value { f32_: 3.0 },
                },
                vgpu_arg {
                    kind: VGPU_ARG_U32,
                    size: 0,
                    value: vgpu_arg_value { u32_: 300 },
                },
            ];
            let (grid, block) = ([2u32, 1, 1], [256u32, 1, 1]);
            let status = vgpu_launch_builtin(
                s,
                c"scale_f32".as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                args.as_ptr(),
                args.len(),
            );
            assert_eq!(status, 0);
            assert_eq!(vgpu_sync(s), 0);
            let mut back = vec![0f32; 300];
            assert_eq!(vgpu_dtoh(s, h, 4, back.as_mut_ptr().cast(), 8), 0);
            assert_eq!(&back[..2], &[3.0, 6.0]);

            let mut buf = [0 as c_char; 8];
            assert_eq!(vgpu_device_name(s, buf.as_mut_ptr(), buf.len()), 0);
            assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), &NAME[..7]);
            let mut gpu = u32::MAX;
            assert_eq!(vgpu_device_gpu(s, &mut gpu), 0);
            assert_eq!(gpu, 0);
            dev.state.lock().unwrap().gpu = 3;
            assert_eq!(vgpu_device_gpu(s, &mut gpu), 0);
            assert_eq!(gpu, 3, "the host GPU the device's config space names");
            assert_eq!(
                vgpu_device_gpu(s, std::ptr::null_mut()),
                VGPU_ERROR_INVALID_VALUE
            );

            assert_eq!(vgpu_free(s, h), 0);
            assert_eq!(dev.state.lock().unwrap().buffers(), 0);
            vgpu_close(s);
        }
        assert_eq!(dev.state.lock().unwrap().open_sessions(), 0);
    }

    #[test]
    fn c_errors_are_statuses_with_a_message() {
        let dev = FakeDevice::new();
        let s = open_fake(&dev);
        // SAFETY: (whole test) a live session; the bad pointers are the point.
        unsafe {
            assert_eq!(vgpu_free(s, 42), Status::InvalidHandle as c_int);
            assert_eq!(last_error(), "no buffer with handle 42 in this session");
            assert_eq!(
                vgpu_htod(s, 42, 0, std::ptr::null(), 0),
                Status::InvalidHandle as c_int
            );

            let mut h = 0u64;
            assert_eq!(
                vgpu_alloc(s, 16, std::ptr::null_mut()),
                VGPU_ERROR_INVALID_VALUE
            );
            assert_eq!(
                vgpu_alloc(s, 1 << 40, &mut h),
                Status::QuotaExceeded as c_int
            );
            assert_eq!(
                last_error(),
                "ALLOC: device returned QUOTA_EXCEEDED (detail 0)"
            );
            assert_eq!(vgpu_alloc(s, 16, &mut h), 0);
            let mut out = [0u8; 8];
            assert_eq!(
                vgpu_dtoh(s, h, 12, out.as_mut_ptr().cast(), 8),
                Status::OutOfRange as c_int
            );
            assert_eq!(
                vgpu_htod(s, h, 0, std::ptr::null(), 4),
                VGPU_ERROR_INVALID_VALUE
            );

            let dims = [1u32, 1, 1];
            let bad_arg = [vgpu_arg {
                kind: 77,
                size: 0,
                value: vgpu_arg_value { u64_: 0 },
            }];
            let launch = |kernel: &CStr, args: &[vgpu_arg]| {
                vgpu_launch_builtin(
                    s,
                    kernel.as_ptr(),
                    dims.as_ptr(),
                    dims.as_ptr(),
                    args.as_ptr(),
                    args.len(),
                )
            };
            assert_eq!(launch(c"scale_f32", &bad_arg), VGPU_ERROR_INVALID_VALUE);
            assert_eq!(
                last_error(),
                "invalid argument: argument 0: unknown kind 77"
            );
            assert_eq!(
                launch(c"no_such_kernel", &[]),
                Status::KernelNotFound as c_int
            );
            assert_eq!(
                vgpu_launch(
                    s,
                    99,
                    c"k".as_ptr(),
                    dims.as_ptr(),
                    dims.as_ptr(),
                    0,
                    std::ptr::null(),
                    0
                ),
                Status::InvalidHandle as c_int
            );
            assert_eq!(vgpu_sync(std::ptr::null_mut()), VGPU_ERROR_INVALID_VALUE);
            assert_eq!(
                vgpu_open(-1, &mut std::ptr::null_mut()),
                VGPU_ERROR_INVALID_VALUE
            );
            assert_eq!(
                vgpu_open_path(c"/nonexistent/vgpu0".as_ptr(), &mut std::ptr::null_mut()),
                VGPU_ERROR_NO_DEVICE
            );
            vgpu_close(s);
            vgpu_close(std::ptr::null_mut());
        }
    }

    #[test]
    fn a_panic_becomes_a_status_not_an_unwind() {
        let status = guard(|| panic!("boom"));
        assert_eq!(status, VGPU_ERROR_PANIC);
        assert_eq!(last_error(), "internal error (panic) in libvgpu");
    }
}
