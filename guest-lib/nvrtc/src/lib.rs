// SPDX-License-Identifier: Apache-2.0
//! `libnvrtc.so.13` for programs in a virtual machine: NVRTC's C API, with the
//! compiling done by the host's NVRTC through the vGPU device (`/dev/vgpu0`).
//!
//! A program is kept here until `nvrtcCompileProgram` sends its source, with its
//! in-memory headers put in (see [`include`]) and its options, in one COMPILE request
//! of a session that the process opens on first use and keeps. The PTX and the log
//! come back and are answered from here, as are the version, the architectures and
//! the error strings. See `README.md` for what works and what does not.
//!
//! Nothing unwinds across the C ABI: a panic becomes `NVRTC_ERROR_INTERNAL_ERROR`.
//! Messages go to stderr at the level `VGPU_NVRTC_LOG` sets (`warn` by default;
//! `env_logger` filter syntax).
#![allow(non_snake_case, non_camel_case_types)]

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};

use log::{debug, warn};
use vgpu::{CompileError, Device, Error, Session, Status};

mod exports;
pub mod include;

pub use exports::*;

/// The result code of every NVRTC function.
pub type nvrtcResult = c_int;

/// What a program handle points to (nothing a caller may look at).
#[repr(C)]
pub struct _nvrtcProgram {
    _private: [u8; 0],
}

/// A program handle.
pub type nvrtcProgram = *mut _nvrtcProgram;

pub const NVRTC_SUCCESS: nvrtcResult = 0;
pub const NVRTC_ERROR_OUT_OF_MEMORY: nvrtcResult = 1;
pub const NVRTC_ERROR_PROGRAM_CREATION_FAILURE: nvrtcResult = 2;
pub const NVRTC_ERROR_INVALID_INPUT: nvrtcResult = 3;
pub const NVRTC_ERROR_INVALID_PROGRAM: nvrtcResult = 4;
pub const NVRTC_ERROR_INVALID_OPTION: nvrtcResult = 5;
pub const NVRTC_ERROR_COMPILATION: nvrtcResult = 6;
pub const NVRTC_ERROR_BUILTIN_OPERATION_FAILURE: nvrtcResult = 7;
pub const NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION: nvrtcResult = 8;
pub const NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION: nvrtcResult = 9;
pub const NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID: nvrtcResult = 10;
pub const NVRTC_ERROR_INTERNAL_ERROR: nvrtcResult = 11;
pub const NVRTC_ERROR_TIME_FILE_WRITE_FAILED: nvrtcResult = 12;
pub const NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED: nvrtcResult = 13;
pub const NVRTC_ERROR_PCH_CREATE_HEAP_EXHAUSTED: nvrtcResult = 14;
pub const NVRTC_ERROR_PCH_CREATE: nvrtcResult = 15;
pub const NVRTC_ERROR_CANCELLED: nvrtcResult = 16;
pub const NVRTC_ERROR_TIME_TRACE_FILE_WRITE_FAILED: nvrtcResult = 17;

/// `nvrtcGetErrorString` of each result, as NVRTC 13.0 spells it.
const ERROR_STRINGS: [&CStr; 18] = [
    c"NVRTC_SUCCESS",
    c"NVRTC_ERROR_OUT_OF_MEMORY",
    c"NVRTC_ERROR_PROGRAM_CREATION_FAILURE",
    c"NVRTC_ERROR_INVALID_INPUT",
    c"NVRTC_ERROR_INVALID_PROGRAM",
    c"NVRTC_ERROR_INVALID_OPTION",
    c"NVRTC_ERROR_COMPILATION",
    c"NVRTC_ERROR_BUILTIN_OPERATION_FAILURE",
    c"NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION",
    c"NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION",
    c"NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID",
    c"NVRTC_ERROR_INTERNAL_ERROR",
    c"NVRTC_ERROR_TIME_FILE_WRITE_FAILED",
    c"NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED",
    c"NVRTC_ERROR_PCH_CREATE_HEAP_EXHAUSTED",
    c"NVRTC_ERROR_PCH_CREATE",
    c"NVRTC_ERROR_CANCELLED",
    c"NVRTC_ERROR_TIME_TRACE_FILE_WRITE_FAILED",
];

/// The NVRTC version this library stands in for.
pub const VERSION: (c_int, c_int) = (13, 0);

/// The architectures NVRTC 13.0 compiles for (`nvrtcGetSupportedArchs` of NVRTC
/// 13.0.88): Turing to Blackwell; CUDA 13.0 dropped Maxwell, Pascal and Volta and
/// renamed Thor's sm_101 to sm_110.
pub const SUPPORTED_ARCHS: [c_int; 12] = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];

/// The device whose host compiles.
pub const DEVICE_INDEX: u32 = 0;

/// The environment variable with the log level (`env_logger` filters; `warn` unless set).
pub const LOG_ENV: &str = "VGPU_NVRTC_LOG";

/// The name of a program created without one, as NVRTC names it.
const DEFAULT_NAME: &str = "default_program";

/// Options for output the host does not send back (LTO IR, OptiX IR).
const UNSUPPORTED_OPTIONS: [&str; 6] = [
    "-dlto",
    "--dlink-time-opt",
    "-gen-opt-lto",
    "--gen-opt-lto",
    "-optix-ir",
    "--optix-ir",
];

fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| "warn".into());
        let _ = env_logger::Builder::new()
            .parse_filters(&filter)
            .target(env_logger::Target::Stderr)
            .try_init();
    });
}

/// Runs one C function's body: logging set up, a panic turned into
/// `NVRTC_ERROR_INTERNAL_ERROR`.
fn guard(f: impl FnOnce() -> nvrtcResult) -> nvrtcResult {
    catch_unwind(AssertUnwindSafe(|| {
        init_logging();
        f()
    }))
    .unwrap_or(NVRTC_ERROR_INTERNAL_ERROR)
}

/// What a stub does: says once that `name` is not supported, and returns `result`.
fn unsupported(name: &'static str, result: nvrtcResult) -> nvrtcResult {
    guard(|| {
        static SAID: Mutex<Vec<&str>> = Mutex::new(Vec::new());
        let mut said = lock(&SAID);
        if !said.contains(&name) {
            said.push(name);
            warn!(
                "{name} is not supported by the vGPU NVRTC library: {}",
                error_name(result)
            );
        }
        result
    })
}

/// Warns once per message: what a program is refused keeps coming in loops.
fn warn_once(msg: String) {
    static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut said = lock(&SAID);
    if said.get_or_insert_with(HashSet::new).insert(msg.clone()) {
        warn!("{msg}");
    }
}

fn error_name(result: nvrtcResult) -> &'static str {
    usize::try_from(result)
        .ok()
        .and_then(|i| ERROR_STRINGS.get(i))
        .and_then(|s| s.to_str().ok())
        .unwrap_or("NVRTC_ERROR unknown")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A C string as text (invalid UTF-8 replaced).
///
/// # Safety
/// `s` must be non-NULL and NUL-terminated.
unsafe fn text(s: *const c_char) -> String {
    // SAFETY: non-NULL and NUL-terminated by the caller's promise.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// `s` as a C string (a NUL inside becomes a space).
fn c_string(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let bytes: Vec<u8> = e
            .into_vec()
            .into_iter()
            .map(|b| if b == 0 { b' ' } else { b })
            .collect();
        CString::new(bytes).unwrap_or_default()
    })
}

// ---- the session ----

static SESSION: Mutex<Option<Session>> = Mutex::new(None);

/// The process's session, opened on first use.
fn session() -> vgpu::Result<Session> {
    let mut s = lock(&SESSION);
    if let Some(s) = &*s {
        return Ok(s.clone());
    }
    let new = Device::open(DEVICE_INDEX)?.session()?;
    debug!("session opened on device {DEVICE_INDEX}");
    *s = Some(new.clone());
    Ok(new)
}

fn forget_session() {
    lock(&SESSION).take();
}

/// Has the library compile through `session` (`None`: `/dev/vgpu0` again, on next use).
/// For tests.
#[cfg(feature = "test-hook")]
#[doc(hidden)]
pub fn set_session(session: Option<Session>) {
    *lock(&SESSION) = session;
}

// ---- programs ----

struct Program {
    name: String,
    source: String,
    /// (include name, text) of the in-memory headers.
    headers: Vec<(String, String)>,
    name_expressions: Vec<String>,
    /// Empty until a compile succeeds.
    ptx: CString,
    log: CString,
    /// The last compile succeeded.
    compiled: bool,
    /// The real architecture (`sm_XX`) the last compile was for: NVRTC would have made
    /// a CUBIN.
    real_arch: Option<String>,
    /// Lowered names by name expression, of the last compile (`None`: unknown here).
    lowered: HashMap<String, Option<CString>>,
    /// Lowered names of earlier compiles: handed out, so kept until destroyed.
    retired: Vec<CString>,
}

type Programs = Mutex<HashMap<usize, Arc<Mutex<Program>>>>;

fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Programs> = OnceLock::new();
    PROGRAMS.get_or_init(Programs::default)
}

fn program(prog: nvrtcProgram) -> Option<Arc<Mutex<Program>>> {
    lock(programs()).get(&(prog as usize)).cloned()
}

/// Runs `f` on the program behind `prog`; `NVRTC_ERROR_INVALID_PROGRAM` if there is none.
fn with_program(prog: nvrtcProgram, f: impl FnOnce(&mut Program) -> nvrtcResult) -> nvrtcResult {
    guard(|| match program(prog) {
        Some(p) => f(&mut lock(&p)),
        None => NVRTC_ERROR_INVALID_PROGRAM,
    })
}

/// Writes `value` to `out`; `NVRTC_ERROR_INVALID_INPUT` if it is NULL.
///
/// # Safety
/// `out` must be NULL or writable.
unsafe fn put<T>(out: *mut T, value: T) -> nvrtcResult {
    if out.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    // SAFETY: non-NULL, and writable by the caller's promise.
    unsafe { out.write(value) };
    NVRTC_SUCCESS
}

/// Copies `s` with its NUL to `out`; `NVRTC_ERROR_INVALID_INPUT` if it is NULL.
///
/// # Safety
/// `out` must be NULL or writable for `s.to_bytes_with_nul().len()` bytes.
unsafe fn put_c_str(out: *mut c_char, s: &CStr) -> nvrtcResult {
    if out.is_null() {
        return NVRTC_ERROR_INVALID_INPUT;
    }
    let bytes = s.to_bytes_with_nul();
    // SAFETY: non-NULL, writable for the size the caller got from the size function.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len()) };
    NVRTC_SUCCESS
}

/// The `sm_XX` an `-arch`/`--gpu-architecture` option asks for, if it names a real
/// architecture (NVRTC then makes a CUBIN) rather than a virtual one (`compute_XX`).
fn real_arch(options: &[String]) -> Option<String> {
    let mut arch = None;
    let mut iter = options.iter();
    while let Some(o) = iter.next() {
        for flag in ["-arch", "--gpu-architecture"] {
            if o == flag {
                arch = iter.next().cloned();
            } else if let Some(v) = o.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                arch = Some(v.to_string());
            }
        }
    }
    arch.filter(|a| a.starts_with("sm_"))
}

/// Whether the PTX declares `ident` (an entry, function or variable of that exact name).
fn ptx_declares(ptx: &str, ident: &str) -> bool {
    const DECLARATIONS: [&str; 8] = [
        ".visible", ".entry", ".func", ".extern", ".weak", ".global", ".const", ".shared",
    ];
    ptx.lines()
        .map(str::trim_start)
        .filter(|l| DECLARATIONS.iter().any(|d| l.starts_with(d)))
        .any(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.')))
                .any(|token| token == ident)
        })
}

/// The lowered name of a name expression, where the PTX tells it: a name that C++
/// does not mangle (an `extern "C"` function, a variable at namespace scope), with or
/// without `&`. Templates and other C++ names are mangled: unknown here.
fn lowered_name(ptx: &str, expression: &str) -> Option<String> {
    let e = expression.trim();
    let e = e.strip_prefix('&').unwrap_or(e).trim_start();
    let e = e.strip_prefix("::").unwrap_or(e);
    let mut chars = e.chars();
    let ident = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    (ident && ptx_declares(ptx, e)).then(|| e.to_string())
}

impl Program {
    /// Ends a compile that did not get to the compiler (or whose answer was not usable):
    /// `msg` becomes the log.
    fn fail(&mut self, result: nvrtcResult, msg: String) -> nvrtcResult {
        warn_once(format!("{}: {msg}", self.name));
        self.log = c_string(format!("nvrtc: error: {msg}\n"));
        result
    }

    fn compile(&mut self, options: Vec<String>) -> nvrtcResult {
        self.compiled = false;
        self.ptx = CString::default();
        self.log = CString::default();
        self.real_arch = None;
        let old = std::mem::take(&mut self.lowered);
        self.retired.extend(old.into_values().flatten());

        for o in &options {
            if UNSUPPORTED_OPTIONS.contains(&o.as_str()) {
                return self.fail(
                    NVRTC_ERROR_INVALID_OPTION,
                    format!(
                        "option {o} is not supported by the vGPU device: it compiles to PTX only"
                    ),
                );
            }
            if o.is_empty() || !o.bytes().all(|c| (b' '..=b'~').contains(&c)) {
                return self.fail(
                    NVRTC_ERROR_INVALID_OPTION,
                    format!("option {o:?}: the vGPU device takes printable ASCII options only"),
                );
            }
        }
        let source = include::inline(&self.source, &self.name, &self.headers);
        let opts: Vec<&str> = options.iter().map(String::as_str).collect();
        let mut result = self.send(&source, &opts);
        if matches!(result, Err(CompileError::Request(Error::DeviceGone))) {
            debug!("the device was reset: compiling with a new session");
            forget_session();
            result = self.send(&source, &opts);
        }
        match result {
            Ok(c) => {
                if c.ptx.contains('\0') {
                    return self.fail(NVRTC_ERROR_INTERNAL_ERROR, "the PTX has a NUL byte".into());
                }
                for e in &self.name_expressions {
                    let lowered = lowered_name(&c.ptx, e).map(c_string);
                    self.lowered.insert(e.clone(), lowered);
                }
                self.ptx = c_string(c.ptx);
                self.log = c_string(c.log);
                self.compiled = true;
                self.real_arch = real_arch(&options);
                NVRTC_SUCCESS
            }
            Err(CompileError::Failed { code, log }) => {
                self.log = c_string(log);
                match c_int::try_from(code) {
                    Ok(code) if (1..ERROR_STRINGS.len() as c_int).contains(&code) => code,
                    _ => NVRTC_ERROR_COMPILATION,
                }
            }
            Err(CompileError::Request(e)) => self.refused(&e, &options),
        }
    }

    fn send(&self, source: &str, options: &[&str]) -> Result<vgpu::Compiled, CompileError> {
        session()?.compile(source, options)
    }

    /// A compile whose request failed: the result and log that say why.
    fn refused(&mut self, e: &Error, options: &[String]) -> nvrtcResult {
        let invalid_option = match e {
            Error::Device {
                status: Status::InvalidArgument,
                detail,
                ..
            } => options.get(*detail as usize),
            _ => None,
        };
        if let Some(o) = invalid_option {
            return self.fail(
                NVRTC_ERROR_INVALID_OPTION,
                format!(
                    "option {o} names files, which the host's compiler does not read for a \
                     virtual machine: give headers to nvrtcCreateProgram instead"
                ),
            );
        }
        let result = match e {
            Error::InvalidArgument(_) => NVRTC_ERROR_INVALID_INPUT,
            Error::Device {
                status: Status::OutOfMemory | Status::QuotaExceeded,
                ..
            } => NVRTC_ERROR_OUT_OF_MEMORY,
            _ => NVRTC_ERROR_INTERNAL_ERROR,
        };
        let why = match e {
            Error::Device {
                status: Status::Unsupported,
                ..
            } => "the vGPU device cannot compile (its host has no GPU executor)".to_string(),
            Error::Open { .. } | Error::DeviceGone => format!("no vGPU device: {}", e.report()),
            _ => format!("the vGPU device did not compile: {}", e.report()),
        };
        self.fail(result, why)
    }
}

// ---- the C API ----

/// Sets `major` and `minor` to the NVRTC version: 13.0.
///
/// # Safety
/// `major` and `minor` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> nvrtcResult {
    guard(|| {
        if major.is_null() || minor.is_null() {
            return NVRTC_ERROR_INVALID_INPUT;
        }
        // SAFETY: both checked non-NULL; writable by the caller's promise.
        unsafe {
            put(major, VERSION.0);
            put(minor, VERSION.1)
        }
    })
}

/// Sets `num_archs` to the number of architectures NVRTC 13.0 compiles for.
///
/// # Safety
/// `num_archs` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetNumSupportedArchs(num_archs: *mut c_int) -> nvrtcResult {
    // SAFETY: writable or NULL by the caller's promise.
    guard(|| unsafe { put(num_archs, SUPPORTED_ARCHS.len() as c_int) })
}

/// Writes the architectures NVRTC 13.0 compiles for, ascending.
///
/// # Safety
/// `archs` must be NULL or writable for `nvrtcGetNumSupportedArchs` values.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetSupportedArchs(archs: *mut c_int) -> nvrtcResult {
    guard(|| {
        if archs.is_null() {
            return NVRTC_ERROR_INVALID_INPUT;
        }
        // SAFETY: non-NULL; room for every architecture by the caller's promise.
        unsafe {
            std::ptr::copy_nonoverlapping(SUPPORTED_ARCHS.as_ptr(), archs, SUPPORTED_ARCHS.len())
        };
        NVRTC_SUCCESS
    })
}

/// The name of `result`, as NVRTC 13.0 spells it; `"NVRTC_ERROR unknown"` for a value
/// it does not know. The string is static.
#[no_mangle]
pub extern "C" fn nvrtcGetErrorString(result: nvrtcResult) -> *const c_char {
    usize::try_from(result)
        .ok()
        .and_then(|i| ERROR_STRINGS.get(i))
        .copied()
        .unwrap_or(c"NVRTC_ERROR unknown")
        .as_ptr()
}

/// Creates a program from `src`, named `name` (NULL: `default_program`), with
/// `num_headers` in-memory headers: `headers[i]` is included as `include_names[i]`.
///
/// # Safety
/// `prog` must be NULL or writable; `src` and `name` NULL or NUL-terminated; when
/// `num_headers` > 0, `headers` and `include_names` NULL or arrays of that many
/// pointers, each NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nvrtcCreateProgram(
    prog: *mut nvrtcProgram,
    src: *const c_char,
    name: *const c_char,
    num_headers: c_int,
    headers: *const *const c_char,
    include_names: *const *const c_char,
) -> nvrtcResult {
    guard(|| {
        if prog.is_null() {
            return NVRTC_ERROR_INVALID_PROGRAM;
        }
        if src.is_null() || num_headers < 0 {
            return NVRTC_ERROR_INVALID_INPUT;
        }
        let mut list = Vec::new();
        if num_headers > 0 {
            if headers.is_null() || include_names.is_null() {
                return NVRTC_ERROR_INVALID_INPUT;
            }
            for i in 0..num_headers as usize {
                // SAFETY: both arrays hold num_headers pointers by the caller's promise.
                let (h, n) = unsafe { (*headers.add(i), *include_names.add(i)) };
                if h.is_null() || n.is_null() {
                    return NVRTC_ERROR_INVALID_INPUT;
                }
                // SAFETY: non-NULL, NUL-terminated by the caller's promise.
                list.push(unsafe { (text(n), text(h)) });
            }
        }
        let name = if name.is_null() {
            DEFAULT_NAME.to_string()
        } else {
            // SAFETY: non-NULL, NUL-terminated by the caller's promise.
            unsafe { text(name) }
        };
        let p = Arc::new(Mutex::new(Program {
            name,
            // SAFETY: non-NULL, NUL-terminated by the caller's promise.
            source: unsafe { text(src) },
            headers: list,
            name_expressions: Vec::new(),
            ptx: CString::default(),
            log: CString::default(),
            compiled: false,
            real_arch: None,
            lowered: HashMap::new(),
            retired: Vec::new(),
        }));
        let handle = Arc::as_ptr(&p) as usize;
        lock(programs()).insert(handle, p);
        // SAFETY: checked non-NULL; writable by the caller's promise.
        unsafe { put(prog, handle as nvrtcProgram) }
    })
}

/// Destroys `*prog` and sets it to NULL.
///
/// # Safety
/// `prog` must be NULL or point to a readable and writable handle.
#[no_mangle]
pub unsafe extern "C" fn nvrtcDestroyProgram(prog: *mut nvrtcProgram) -> nvrtcResult {
    guard(|| {
        if prog.is_null() {
            return NVRTC_ERROR_INVALID_PROGRAM;
        }
        // SAFETY: non-NULL and readable by the caller's promise.
        let handle = unsafe { *prog };
        match lock(programs()).remove(&(handle as usize)) {
            // SAFETY: as above, writable.
            Some(_) => unsafe { put(prog, std::ptr::null_mut()) },
            None => NVRTC_ERROR_INVALID_PROGRAM,
        }
    })
}

/// Compiles `prog` with `num_options` options by the host's NVRTC: see the crate's
/// documentation and `README.md` for the options the device refuses.
///
/// # Safety
/// `options` must be NULL or an array of `num_options` pointers, each NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nvrtcCompileProgram(
    prog: nvrtcProgram,
    num_options: c_int,
    options: *const *const c_char,
) -> nvrtcResult {
    with_program(prog, |p| {
        if num_options < 0 || (num_options > 0 && options.is_null()) {
            return NVRTC_ERROR_INVALID_OPTION;
        }
        let mut list = Vec::with_capacity(num_options as usize);
        for i in 0..num_options as usize {
            // SAFETY: num_options pointers by the caller's promise.
            let o = unsafe { *options.add(i) };
            if o.is_null() {
                return NVRTC_ERROR_INVALID_OPTION;
            }
            // SAFETY: non-NULL, NUL-terminated by the caller's promise.
            list.push(unsafe { text(o) });
        }
        p.compile(list)
    })
}

/// Sets `size` to the size of the PTX with its NUL (1 before a successful compile).
///
/// # Safety
/// `size` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetPTXSize(prog: nvrtcProgram, size: *mut usize) -> nvrtcResult {
    // SAFETY: writable or NULL by the caller's promise.
    with_program(prog, |p| unsafe {
        put(size, p.ptx.as_bytes_with_nul().len())
    })
}

/// Writes the PTX with its NUL.
///
/// # Safety
/// `ptx` must be NULL or writable for `nvrtcGetPTXSize` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetPTX(prog: nvrtcProgram, ptx: *mut c_char) -> nvrtcResult {
    // SAFETY: room for the PTX or NULL by the caller's promise.
    with_program(prog, |p| unsafe { put_c_str(ptx, &p.ptx) })
}

/// Sets `size` to the size of the log of the last compile with its NUL.
///
/// # Safety
/// `size` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLogSize(
    prog: nvrtcProgram,
    size: *mut usize,
) -> nvrtcResult {
    // SAFETY: writable or NULL by the caller's promise.
    with_program(prog, |p| unsafe {
        put(size, p.log.as_bytes_with_nul().len())
    })
}

/// Writes the log of the last compile with its NUL.
///
/// # Safety
/// `log` must be NULL or writable for `nvrtcGetProgramLogSize` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLog(prog: nvrtcProgram, log: *mut c_char) -> nvrtcResult {
    // SAFETY: room for the log or NULL by the caller's promise.
    with_program(prog, |p| unsafe { put_c_str(log, &p.log) })
}

/// Says once why a program that was compiled for `sm_XX` has no CUBIN.
fn no_cubin(p: &Program, arch: &str) -> nvrtcResult {
    warn_once(format!(
        "{}: no CUBIN for {arch}: the vGPU device compiles to PTX only (load the PTX, or \
         compile for compute_XX)",
        p.name
    ));
    NVRTC_ERROR_INVALID_INPUT
}

/// Sets `size` to the CUBIN's size: 0 (with success) for a virtual architecture, as
/// NVRTC does; a real one (`sm_XX`) is `NVRTC_ERROR_INVALID_INPUT`, since the device
/// makes PTX only.
///
/// # Safety
/// `size` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBINSize(prog: nvrtcProgram, size: *mut usize) -> nvrtcResult {
    with_program(prog, |p| match p.real_arch.clone() {
        Some(arch) if !size.is_null() => no_cubin(p, &arch),
        // SAFETY: writable or NULL by the caller's promise.
        _ => unsafe { put(size, 0) },
    })
}

/// Writes the CUBIN: nothing for a virtual architecture; `NVRTC_ERROR_INVALID_INPUT`
/// for a real one (see `nvrtcGetCUBINSize`).
///
/// # Safety
/// Nothing is written to `cubin`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBIN(prog: nvrtcProgram, cubin: *mut c_char) -> nvrtcResult {
    with_program(prog, |p| match p.real_arch.clone() {
        _ if cubin.is_null() => NVRTC_ERROR_INVALID_INPUT,
        Some(arch) => no_cubin(p, &arch),
        None => NVRTC_SUCCESS,
    })
}

/// Sets `size` to 0: LTO IR comes only with `-dlto`, which the device refuses, so no
/// program has any (NVRTC answers 0 too for a program compiled without it).
///
/// # Safety
/// `size` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetLTOIRSize(prog: nvrtcProgram, size: *mut usize) -> nvrtcResult {
    // SAFETY: writable or NULL by the caller's promise.
    with_program(prog, |_| unsafe { put(size, 0) })
}

/// Writes the LTO IR: nothing (see `nvrtcGetLTOIRSize`).
///
/// # Safety
/// Nothing is written to `ltoir`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetLTOIR(prog: nvrtcProgram, ltoir: *mut c_char) -> nvrtcResult {
    with_program(prog, |_| {
        if ltoir.is_null() {
            NVRTC_ERROR_INVALID_INPUT
        } else {
            NVRTC_SUCCESS
        }
    })
}

/// Sets `size` to 0: OptiX IR comes only with `--optix-ir`, which the device refuses.
///
/// # Safety
/// `size` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetOptiXIRSize(prog: nvrtcProgram, size: *mut usize) -> nvrtcResult {
    // SAFETY: writable or NULL by the caller's promise.
    with_program(prog, |_| unsafe { put(size, 0) })
}

/// Writes the OptiX IR: nothing (see `nvrtcGetOptiXIRSize`).
///
/// # Safety
/// Nothing is written to `optixir`.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetOptiXIR(prog: nvrtcProgram, optixir: *mut c_char) -> nvrtcResult {
    with_program(prog, |_| {
        if optixir.is_null() {
            NVRTC_ERROR_INVALID_INPUT
        } else {
            NVRTC_SUCCESS
        }
    })
}

/// Records a name expression, whose lowered name `nvrtcGetLoweredName` gives after the
/// compile; `NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION` once compiled.
///
/// # Safety
/// `name_expression` must be NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nvrtcAddNameExpression(
    prog: nvrtcProgram,
    name_expression: *const c_char,
) -> nvrtcResult {
    with_program(prog, |p| {
        if name_expression.is_null() {
            return NVRTC_ERROR_INVALID_INPUT;
        }
        if p.compiled {
            return NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION;
        }
        // SAFETY: non-NULL, NUL-terminated by the caller's promise.
        let e = unsafe { text(name_expression) };
        if !p.name_expressions.contains(&e) {
            p.name_expressions.push(e);
        }
        NVRTC_SUCCESS
    })
}

/// Sets `lowered_name` to the lowered (mangled) name of a name expression added before
/// the compile; the string lives as long as the program. Known only for names C++ does
/// not mangle (`extern "C"` functions, variables at namespace scope): for others
/// (templates, C++ functions) the host would have to lower them, and the answer is
/// `NVRTC_ERROR_INVALID_INPUT`.
///
/// # Safety
/// `name_expression` must be NULL or NUL-terminated; `lowered_name` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nvrtcGetLoweredName(
    prog: nvrtcProgram,
    name_expression: *const c_char,
    lowered_name: *mut *const c_char,
) -> nvrtcResult {
    with_program(prog, |p| {
        if name_expression.is_null() || lowered_name.is_null() {
            return NVRTC_ERROR_INVALID_INPUT;
        }
        if !p.compiled {
            return NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION;
        }
        // SAFETY: non-NULL, NUL-terminated by the caller's promise.
        let e = unsafe { text(name_expression) };
        match p.lowered.get(&e) {
            None => NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID,
            // SAFETY: non-NULL, writable by the caller's promise; the string is the
            // program's until it is destroyed.
            Some(Some(lowered)) => unsafe { put(lowered_name, lowered.as_ptr()) },
            Some(None) => {
                warn_once(format!(
                    "{}: the lowered name of {e:?} is unknown: the vGPU NVRTC library knows \
                     only names C++ does not mangle (extern \"C\" functions, variables)",
                    p.name
                ));
                NVRTC_ERROR_INVALID_INPUT
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_has_nvrtcs_string() {
        for (i, s) in ERROR_STRINGS.iter().enumerate() {
            // SAFETY: the function returns a static NUL-terminated string.
            let got = unsafe { CStr::from_ptr(nvrtcGetErrorString(i as c_int)) };
            assert_eq!(got, *s);
            assert_eq!(error_name(i as c_int), s.to_str().unwrap());
        }
        assert_eq!(
            ERROR_STRINGS[17],
            c"NVRTC_ERROR_TIME_TRACE_FILE_WRITE_FAILED"
        );
        for unknown in [-1, 18, 1000, c_int::MIN] {
            // SAFETY: as above.
            let got = unsafe { CStr::from_ptr(nvrtcGetErrorString(unknown)) };
            assert_eq!(got, c"NVRTC_ERROR unknown");
        }
    }

    #[test]
    fn real_architectures_are_told_from_virtual_ones() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(real_arch(&o(&["-arch=sm_90"])), Some("sm_90".into()));
        assert_eq!(
            real_arch(&o(&["--gpu-architecture", "sm_120a", "-lineinfo"])),
            Some("sm_120a".into())
        );
        assert_eq!(real_arch(&o(&["--gpu-architecture=compute_90"])), None);
        assert_eq!(real_arch(&o(&["-arch", "compute_80"])), None);
        // The last one counts.
        assert_eq!(real_arch(&o(&["-arch=sm_80", "-arch=compute_80"])), None);
        assert_eq!(real_arch(&o(&["-DARCH=sm_80", "-archive"])), None);
        assert_eq!(real_arch(&[]), None);
    }

    #[test]
    fn lowered_names_are_known_for_names_cpp_does_not_mangle() {
        let ptx = "\
.visible .global .align 4 .u32 counter;\n\
.global .align 4 .b8 table[64];\n\
.visible .entry add_one(\n\
\t.param .u64 add_one_param_0\n\
)\n\
.visible .entry _Z4scalIfEvPT_(\n";
        assert_eq!(lowered_name(ptx, "add_one").as_deref(), Some("add_one"));
        assert_eq!(lowered_name(ptx, " & counter").as_deref(), Some("counter"));
        assert_eq!(lowered_name(ptx, "&::table").as_deref(), Some("table"));
        assert_eq!(lowered_name(ptx, "scal<float>"), None);
        assert_eq!(lowered_name(ptx, "scal"), None);
        assert_eq!(lowered_name(ptx, "u32"), None);
        assert_eq!(lowered_name(ptx, "param"), None);
        assert_eq!(lowered_name(ptx, "ns::f"), None);
        assert_eq!(lowered_name(ptx, ""), None);
    }
}
