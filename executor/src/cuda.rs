// SPDX-License-Identifier: Apache-2.0
//! The CUDA executor: one CUDA context per session, driven through cudarc's `sys` layer.
//!
//! Each executor gets its own context from `cuCtxCreate`, never the primary context. A
//! context does not contain a device fault, though: after a kernel traps, the other
//! contexts of the same process fail too. Sessions are therefore isolated by running each
//! one's executor in its own worker process ([`crate::process`]); this in-process factory
//! serves those workers, and the mediator directly only when no worker binary is found.
//! The built-in catalog is compiled once with NVRTC ([`CudaExecutorFactory::new`]) and its
//! PTX is loaded into every context (workers get it from their parent:
//! [`CudaExecutorFactory::from_ptx`]).
//!
//! cudarc loads `libcuda` and `libnvrtc` on first use and panics when they are missing,
//! so every entry point first checks with `dlopen` that the library cudarc will pick is
//! there, and runs CUDA calls that could still panic under `catch_unwind`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};
use cudarc::nvrtc::result as nvrtc;
use vgpu_kernels::{LaunchShape, ParamKind, CATALOG};
use vgpu_protocol::{
    ExecutorKind, FunctionInfo, Status, FUNCTION_ATTRIBUTES, MAX_DEVICE_ATTRIBUTES,
    MAX_FUNCTION_PARAMS, MAX_PTX_BYTES,
};

use crate::executor::{
    builtin_param_layout, no_host_buffer, outside_host_buffer, BufferId, CompileOutput, DeviceInfo,
    ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, KernelRef, ModuleId, StreamId,
};
use crate::hostmap::{HostMap, HostMapping};
use crate::image::{self, ImageKind};

/// Size of the JIT error log captured when a PTX module fails to load.
const JIT_LOG_BYTES: usize = 8192;
/// CUDA's largest kernel parameter space (Volta and later), in bytes.
const MAX_PARAM_SPACE: usize = 32764;
/// Set (to anything) to ignore `cuFuncGetParamInfo` and size guest kernels' parameters
/// from their PTX alone, as on drivers before CUDA 12.4: for testing that path on a
/// newer driver.
pub const PTX_SIGNATURES_ONLY_ENV: &str = "VGPU_PTX_SIGNATURES_ONLY";
/// Bytes allocated, written and read back by [`sanity`].
const SANITY_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Libraries

/// A shared library found with `dlopen`, kept loaded for the life of the process.
struct Probe {
    file: String,
    lib: libloading::Library,
}

/// The first candidate `dlopen` accepts, in the order cudarc tries them.
fn probe(names: &[&str]) -> Option<Probe> {
    names
        .iter()
        .flat_map(|name| cudarc::get_lib_name_candidates(name))
        .find_map(|file| {
            // SAFETY: loading the CUDA driver or NVRTC runs only their initialisers, which is
            // what cudarc does on its first call anyway.
            unsafe { libloading::Library::new(&file) }
                .ok()
                .map(|lib| Probe { file, lib })
        })
}

/// The CUDA driver library cudarc will load, or why there is none.
fn driver_library() -> Result<&'static Probe, CudaError> {
    static DRIVER: OnceLock<Option<Probe>> = OnceLock::new();
    DRIVER
        .get_or_init(|| probe(&["cuda", "nvcuda"]))
        .as_ref()
        .ok_or(CudaError::NoDriver)
}

/// The NVRTC library cudarc will load, or why there is none.
fn nvrtc_library() -> Result<&'static Probe, CudaError> {
    static NVRTC: OnceLock<Option<Probe>> = OnceLock::new();
    NVRTC
        .get_or_init(|| probe(&["nvrtc"]))
        .as_ref()
        .ok_or(CudaError::NoNvrtc)
}

/// Whether the loaded driver exports `symbol` (cudarc panics when calling a missing one).
fn driver_has(symbol: &[u8]) -> bool {
    driver_library().is_ok_and(|d| {
        // SAFETY: only the symbol's presence is checked; nothing is called.
        unsafe { d.lib.get::<*const c_void>(symbol) }.is_ok()
    })
}

/// `cuFuncGetParamInfo` exists from CUDA 12.4 drivers on.
fn driver_has_param_info() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| driver_has(b"cuFuncGetParamInfo"))
}

/// Runs `f`, turning a panic inside cudarc (a library or symbol it could not load) into
/// an error instead of unwinding into the caller.
fn guarded<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(CudaError::Panicked {
            what,
            message: message.to_string(),
        })
    })
}

// ---------------------------------------------------------------------------------------
// Error mapping

/// Why CUDA could not be set up ([`CudaExecutorFactory::new`],
/// [`CudaExecutorFactory::from_ptx`], [`compile_ptx`]) or the sanity gate ([`sanity`])
/// failed. Its `Display` is one line, the operator's whole reason: the CUDA and NVRTC
/// result codes are kept as values and named there (they are not `std::error::Error`s),
/// and a [`CudaError::Context`]'s executor error is shown by its message, so none of them
/// is also a `source()`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// No CUDA driver library that cudarc would load.
    #[error("no CUDA driver (libcuda.so.1 not found)")]
    NoDriver,
    /// No NVRTC library that cudarc would load.
    #[error("no NVRTC (libnvrtc.so.* not found; install the CUDA runtime compiler library)")]
    NoNvrtc,
    /// A driver call (`call`) failed with `code`.
    #[error("{call} failed: {code:?}")]
    Driver { call: &'static str, code: CUresult },
    /// The driver sees no device at all.
    #[error("no CUDA device (cuDeviceGetCount returned 0)")]
    NoDevice,
    /// There is no device `ordinal`.
    #[error("no CUDA device {ordinal} ({count} present)")]
    NoSuchDevice { ordinal: usize, count: usize },
    /// The ordinal does not fit the driver's (or the workers' messages') integer.
    #[error("device ordinal too large")]
    OrdinalTooLarge(usize),
    /// Text handed to CUDA (`what`) contains a NUL byte.
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    /// An NVRTC call (`call`) other than the compilation failed with `code`.
    #[error("{call} failed: {code:?}")]
    Nvrtc {
        call: &'static str,
        code: cudarc::nvrtc::sys::nvrtcResult,
    },
    /// NVRTC did not compile the source; `log` is its whole program log (the message
    /// shows its first error line).
    #[error("NVRTC compile failed ({code:?}): {}", compile_error_line(.log))]
    Compile {
        code: cudarc::nvrtc::sys::nvrtcResult,
        log: String,
    },
    /// A CUDA library call made during `what` panicked inside cudarc (a library or symbol
    /// it could not load); `message` is the panic's.
    #[error("{what}: CUDA library call failed: {}", first_line(.message, 160))]
    Panicked { what: &'static str, message: String },
    /// A context on the device failed to come up: creating it, loading the catalog into
    /// it or running its first kernel.
    #[error("{}", .0.message)]
    Context(ExecError),
    /// Device memory did not read back what was written to it.
    #[error("device memory read back wrong at byte {offset}")]
    ReadBack { offset: usize },
}

/// The line of an NVRTC log that says what went wrong: its first line mentioning an
/// error (else its first line), cut at 300 characters.
fn compile_error_line(log: &str) -> String {
    let detail = log
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or(log)
        .trim();
    first_line(detail, 300)
}

/// The CUDA error's name, e.g. `CUDA_ERROR_LAUNCH_FAILED`.
pub fn error_name(code: CUresult) -> String {
    format!("{code:?}")
}

/// The errors after which a context is unusable: every later call in the context fails
/// with the same error, and only destroying the context recovers.
pub const STICKY_ERRORS: [CUresult; 15] = [
    CUresult::CUDA_ERROR_ECC_UNCORRECTABLE,
    CUresult::CUDA_ERROR_NVLINK_UNCORRECTABLE,
    CUresult::CUDA_ERROR_CONTAINED,
    CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
    CUresult::CUDA_ERROR_LAUNCH_TIMEOUT,
    CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED,
    CUresult::CUDA_ERROR_ASSERT,
    CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR,
    CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION,
    CUresult::CUDA_ERROR_MISALIGNED_ADDRESS,
    CUresult::CUDA_ERROR_INVALID_ADDRESS_SPACE,
    CUresult::CUDA_ERROR_INVALID_PC,
    CUresult::CUDA_ERROR_LAUNCH_FAILED,
    CUresult::CUDA_ERROR_TENSOR_MEMORY_LEAK,
    CUresult::CUDA_ERROR_EXTERNAL_DEVICE,
];

/// Errors other than the sticky ones that [`error_name_of`] can name.
const OTHER_NAMED_ERRORS: [CUresult; 9] = [
    CUresult::CUDA_ERROR_INVALID_VALUE,
    CUresult::CUDA_ERROR_OUT_OF_MEMORY,
    CUresult::CUDA_ERROR_INVALID_IMAGE,
    CUresult::CUDA_ERROR_INVALID_CONTEXT,
    CUresult::CUDA_ERROR_INVALID_PTX,
    CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION,
    CUresult::CUDA_ERROR_INVALID_HANDLE,
    CUresult::CUDA_ERROR_NOT_FOUND,
    CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
];

/// True for the errors in [`STICKY_ERRORS`].
pub fn is_sticky(code: CUresult) -> bool {
    STICKY_ERRORS.contains(&code)
}

/// The name of a CUDA error number as carried in a response's detail, for reports.
pub fn error_name_of(code: u32) -> String {
    STICKY_ERRORS
        .iter()
        .chain(&OTHER_NAMED_ERRORS)
        .find(|&&c| c as u32 == code)
        .map_or_else(|| format!("CUDA error {code}"), |&c| error_name(c))
}

/// The protocol status a guest sees for a CUDA error.
pub fn status_for(code: CUresult) -> Status {
    use CUresult::*;
    if is_sticky(code) {
        return Status::LaunchFailed;
    }
    match code {
        CUDA_SUCCESS => Status::Ok,
        CUDA_ERROR_OUT_OF_MEMORY => Status::OutOfMemory,
        CUDA_ERROR_INVALID_PTX
        | CUDA_ERROR_INVALID_IMAGE
        | CUDA_ERROR_NO_BINARY_FOR_GPU
        | CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | CUDA_ERROR_JIT_COMPILER_NOT_FOUND
        | CUDA_ERROR_JIT_COMPILATION_DISABLED
        | CUDA_ERROR_INVALID_SOURCE
        | CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND
        | CUDA_ERROR_SHARED_OBJECT_INIT_FAILED => Status::ModuleInvalid,
        CUDA_ERROR_NOT_FOUND => Status::KernelNotFound,
        // A launch the guest shaped badly: too many registers or too much shared memory
        // for its block size is as much the guest's argument as an invalid value.
        CUDA_ERROR_INVALID_VALUE | CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => Status::InvalidArgument,
        _ => Status::Internal,
    }
}

/// The executor error for a failed CUDA call: mapped status, the CUDA error number as
/// detail, and `what` failed with the error's name.
pub fn cuda_error(code: CUresult, what: &str) -> ExecError {
    ExecError::new(
        status_for(code),
        code as u32,
        format!("{what}: {}", error_name(code)),
    )
}

/// [`CudaError::Driver`] for anything but success, for the setup paths.
fn cu(code: CUresult, call: &'static str) -> Result<(), CudaError> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver { call, code })
    }
}

fn first_line(text: &str, max: usize) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    match line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Device and context setup

/// Loads the driver library and calls `cuInit`.
fn init_driver() -> Result<(), CudaError> {
    let driver = driver_library()?;
    log::debug!("CUDA driver library: {}", driver.file);
    guarded("cuInit", || {
        // SAFETY: cuInit takes flags only (must be 0).
        cu(unsafe { sys::cuInit(0) }, "cuInit")
    })
}

/// How many CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`): loads the
/// driver and initialises it first. Never panics.
pub fn visible_devices() -> Result<usize, CudaError> {
    init_driver()?;
    guarded("device count", device_count)
}

fn device_count() -> Result<usize, CudaError> {
    let mut count: c_int = 0;
    // SAFETY: writes one int.
    let r = unsafe { sys::cuDeviceGetCount(&mut count) };
    cu(r, "cuDeviceGetCount")?;
    Ok(usize::try_from(count).unwrap_or(0))
}

fn device_attribute(
    device: sys::CUdevice,
    attribute: sys::CUdevice_attribute,
) -> Result<i32, CudaError> {
    let mut value: c_int = 0;
    // SAFETY: writes one int for a device handle returned by cuDeviceGet.
    let r = unsafe { sys::cuDeviceGetAttribute(&mut value, attribute, device) };
    cu(r, "cuDeviceGetAttribute")?;
    Ok(value)
}

/// The device handle and description of `ordinal`. The driver must be initialised.
fn query_device(ordinal: usize) -> Result<(sys::CUdevice, DeviceInfo), CudaError> {
    let count = device_count()?;
    if count == 0 {
        return Err(CudaError::NoDevice);
    }
    if ordinal >= count {
        return Err(CudaError::NoSuchDevice { ordinal, count });
    }
    let mut device: sys::CUdevice = 0;
    let ordinal_c = c_int::try_from(ordinal).map_err(|_| CudaError::OrdinalTooLarge(ordinal))?;
    // SAFETY: writes one device handle.
    let r = unsafe { sys::cuDeviceGet(&mut device, ordinal_c) };
    cu(r, "cuDeviceGet")?;

    let mut name = [0 as c_char; 256];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `name`.
    let r = unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, device) };
    cu(r, "cuDeviceGetName")?;
    name[name.len() - 1] = 0;
    // SAFETY: NUL-terminated within the array (forced above).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string();

    let mut total: usize = 0;
    // SAFETY: writes one size_t.
    let r = unsafe { sys::cuDeviceTotalMem_v2(&mut total, device) };
    cu(r, "cuDeviceTotalMem")?;

    use sys::CUdevice_attribute::*;
    let cc_major = device_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let cc_minor = device_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = device_attribute(device, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let info = DeviceInfo {
        kind: ExecutorKind::Cuda,
        name,
        total_memory: total as u64,
        cc_major: u16::try_from(cc_major).unwrap_or(0),
        cc_minor: u16::try_from(cc_minor).unwrap_or(0),
        multiprocessors: u32::try_from(sms).unwrap_or(0),
    };
    Ok((device, info))
}

/// The driver's CUDA version as `major.minor`.
fn driver_version() -> Option<String> {
    let mut version: c_int = 0;
    // SAFETY: writes one int.
    let r = unsafe { sys::cuDriverGetVersion(&mut version) };
    (r == CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", version / 1000, (version % 1000) / 10))
}

type CtxCreateV2 = unsafe extern "C" fn(*mut sys::CUcontext, c_uint, sys::CUdevice) -> CUresult;

/// Creates a new, non-primary context on `device` and makes it current on this thread.
///
/// CUDA 13 names `cuCtxCreate_v4` `cuCtxCreate`; a NULL `CUctxCreateParams` asks for a
/// regular context. Drivers older than 12.5 lack v4 and get `cuCtxCreate_v2`, which
/// cudarc's CUDA 13 bindings no longer declare, so it is looked up here.
pub fn create_context(device: sys::CUdevice) -> Result<sys::CUcontext, CUresult> {
    let mut ctx: sys::CUcontext = ptr::null_mut();
    let flags = sys::CUctx_flags::CU_CTX_SCHED_AUTO as c_uint;
    let r = if driver_has(b"cuCtxCreate_v4") {
        // SAFETY: writes one context handle; NULL params are documented as "regular context".
        let r = unsafe { sys::cuCtxCreate_v4(&mut ctx, ptr::null_mut(), flags, device) };
        if r == CUresult::CUDA_ERROR_INVALID_VALUE {
            // Some 12.x documentation wants the parameter block present; both of its
            // pointers NULL also means a regular context.
            let mut params = sys::CUctxCreateParams {
                execAffinityParams: ptr::null_mut(),
                numExecAffinityParams: 0,
                cigParams: ptr::null_mut(),
            };
            // SAFETY: `params` outlives the call; writes one context handle.
            unsafe { sys::cuCtxCreate_v4(&mut ctx, &mut params, flags, device) }
        } else {
            r
        }
    } else {
        let driver = driver_library().map_err(|_| CUresult::CUDA_ERROR_NOT_INITIALIZED)?;
        // SAFETY: the signature is cuCtxCreate_v2's in every CUDA 11/12 cuda.h.
        let create = unsafe { driver.lib.get::<CtxCreateV2>(b"cuCtxCreate_v2") }
            .map_err(|_| CUresult::CUDA_ERROR_NOT_SUPPORTED)?;
        // SAFETY: writes one context handle.
        unsafe { create(&mut ctx, flags, device) }
    };
    if r != CUresult::CUDA_SUCCESS {
        return Err(r);
    }
    if ctx.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
    }
    Ok(ctx)
}

// ---------------------------------------------------------------------------------------
// NVRTC

/// NVRTC's version as `major.minor`, if NVRTC loads.
pub fn nvrtc_version() -> Option<String> {
    nvrtc_library().ok()?;
    guarded("nvrtcVersion", || {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: writes two ints.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        r.result().map_err(|e| CudaError::Nvrtc {
            call: "nvrtcVersion",
            code: e.0,
        })?;
        Ok(format!("{major}.{minor}"))
    })
    .ok()
}

/// An NVRTC program, destroyed on drop.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed exactly once, here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Compiles CUDA C `source` to PTX with NVRTC for compute capability `cc` (no standard
/// headers, NVRTC's default floating-point options). A device newer than this NVRTC
/// knows is compiled for NVRTC's default architecture instead: PTX runs on later GPUs.
pub fn compile_ptx(source: &str, name: &str, cc: (u16, u16)) -> Result<CString, CudaError> {
    nvrtc_library()?;
    let src = CString::new(source).map_err(|_| CudaError::NulByte {
        what: "CUDA source",
    })?;
    let name = CString::new(name).map_err(|_| CudaError::NulByte {
        what: "program name",
    })?;
    guarded("NVRTC", || {
        let arch = format!("--gpu-architecture=compute_{}{}", cc.0, cc.1);
        match compile_with(&src, &name, &[arch.as_str()]) {
            Err(CudaError::Compile {
                code: cudarc::nvrtc::sys::nvrtcResult::NVRTC_ERROR_INVALID_OPTION,
                ..
            }) => {
                log::warn!(
                    "NVRTC does not know compute_{}{}; compiling for its default",
                    cc.0,
                    cc.1
                );
                compile_with(&src, &name, &[])
            }
            other => other,
        }
    })
}

fn compile_with(src: &CStr, name: &CStr, options: &[&str]) -> Result<CString, CudaError> {
    let prog = nvrtc::create_program(src, Some(name)).map_err(|e| CudaError::Nvrtc {
        call: "nvrtcCreateProgram",
        code: e.0,
    })?;
    let prog = Program(prog);
    // SAFETY: `prog` is live; the options are converted to C strings by cudarc.
    if let Err(e) = unsafe { nvrtc::compile_program(prog.0, options) } {
        // SAFETY: `prog` is live.
        let log = unsafe { nvrtc::get_program_log(prog.0) }
            .map(c_chars_to_string)
            .unwrap_or_default();
        return Err(CudaError::Compile { code: e.0, log });
    }
    // SAFETY: `prog` is live and compiled.
    let ptx = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| CudaError::Nvrtc {
        call: "nvrtcGetPTX",
        code: e.0,
    })?;
    CString::new(c_chars_to_string(ptx)).map_err(|_| CudaError::NulByte {
        what: "the PTX NVRTC produced",
    })
}

type NvrtcCode = cudarc::nvrtc::sys::nvrtcResult;

/// What the guest's programs are called: in a directory that cannot exist (`/dev/null`
/// is no directory), so that a quoted `#include` finds nothing beside the source.
pub const GUEST_PROGRAM_NAME: &CStr = c"/dev/null/guest.cu";

/// One NVRTC compilation: its result code (0 for success), the PTX when there is one,
/// and the log.
struct NvrtcRun {
    code: u32,
    ptx: Option<Vec<u8>>,
    log: Vec<u8>,
}

impl NvrtcRun {
    /// COMPILE's answer for an output room of `room` bytes.
    fn into_output(self, room: usize) -> CompileOutput {
        match self.ptx {
            Some(ptx) => {
                let needed = ptx.len() as u64 + self.log.len() as u64;
                if needed > room as u64 {
                    CompileOutput::TooLarge { needed }
                } else {
                    CompileOutput::Ptx { ptx, log: self.log }
                }
            }
            None => {
                let mut log = self.log;
                let log_len = log.len() as u64;
                log.truncate(room);
                CompileOutput::Failed {
                    code: self.code,
                    log,
                    log_len,
                }
            }
        }
    }
}

/// Compiles `src` with `options`; never fails as a call: a failure is in the result.
fn run_nvrtc(src: &CStr, name: &CStr, options: &[String]) -> NvrtcRun {
    let failed = |code: NvrtcCode, log: Vec<u8>| NvrtcRun {
        code: code as u32,
        ptx: None,
        log,
    };
    let prog = match nvrtc::create_program(src, Some(name)) {
        Ok(p) => Program(p),
        Err(e) => return failed(e.0, Vec::new()),
    };
    // SAFETY: `prog` is live; the options are converted to C strings by cudarc (they are
    // printable ASCII, checked by the protocol).
    let compiled = unsafe { nvrtc::compile_program(prog.0, options) };
    // SAFETY: `prog` is live.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|chars| c_chars_to_string(chars).into_bytes())
        .unwrap_or_default();
    if let Err(e) = compiled {
        return failed(e.0, log);
    }
    // SAFETY: `prog` is live and compiled.
    match unsafe { nvrtc::get_ptx(prog.0) } {
        Ok(chars) => {
            let ptx: Vec<u8> = chars
                .into_iter()
                .take_while(|&c| c != 0)
                .map(|c| c as u8)
                .collect();
            NvrtcRun {
                code: 0,
                ptx: Some(ptx),
                log,
            }
        }
        // Options that ask for no PTX (a real `sm_` architecture).
        Err(e) => failed(e.0, log),
    }
}

/// Whether a compiler option names the target architecture (`--gpu-architecture=...`,
/// `-arch=...`, in either spelling).
pub fn names_architecture(option: &str) -> bool {
    let name = option.trim_start_matches('-');
    let name = name.split('=').next().unwrap_or(name);
    matches!(name, "gpu-architecture" | "arch")
}

/// Text up to the first NUL of a C character buffer.
fn c_chars_to_string(chars: Vec<c_char>) -> String {
    let bytes: Vec<u8> = chars
        .into_iter()
        .take_while(|&c| c != 0)
        .map(|c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------
// Sanity gate

/// The Phase 1 CUDA sanity gate: a driver, at least one device, and device memory that
/// can be allocated, written, read back and freed in a fresh context on device 0.
/// `Ok(one line describing the device)` or `Err(why not)`, whose `Display` is one line;
/// never panics.
///
/// The `Ok` value stays a `String`: it is not a result to compute with but the gate's
/// PASS line, printed as it is (`vgpu-mediator sanity`, `vgpu-gpu-check`).
pub fn sanity() -> Result<String, CudaError> {
    init_driver()?;
    guarded("sanity", || {
        let count = device_count()?;
        let (device, info) = query_device(0)?;
        let ctx = create_context(device).map_err(|code| CudaError::Driver {
            call: "cuCtxCreate",
            code,
        })?;
        let result = sanity_memory();
        // SAFETY: `ctx` was created above and is destroyed once.
        let _ = unsafe { sys::cuCtxDestroy_v2(ctx) };
        result?;
        Ok(format!(
            "{} ({} MiB, compute capability {}.{}, {} SMs); {count} device(s); driver CUDA {}; NVRTC {}; \
             allocated, wrote, read back and freed {} MiB",
            info.name,
            info.total_memory >> 20,
            info.cc_major,
            info.cc_minor,
            info.multiprocessors,
            driver_version().unwrap_or_else(|| "?".into()),
            nvrtc_version().unwrap_or_else(|| "missing".into()),
            SANITY_BYTES >> 20,
        ))
    })
}

/// Allocates, fills, reads back and frees device memory in the current context.
fn sanity_memory() -> Result<(), CudaError> {
    let mut dptr: sys::CUdeviceptr = 0;
    // SAFETY: writes one device pointer.
    let r = unsafe { sys::cuMemAlloc_v2(&mut dptr, SANITY_BYTES) };
    cu(r, "cuMemAlloc")?;
    let mut host = vec![0u8; SANITY_BYTES];
    // SAFETY: `dptr` holds SANITY_BYTES; `host` is as long and outlives the synchronous copy.
    let r = unsafe { sys::cuMemsetD8_v2(dptr, 0xa5, SANITY_BYTES) };
    let r = if r == CUresult::CUDA_SUCCESS {
        // SAFETY: as above: `host` holds SANITY_BYTES and outlives the synchronous copy.
        unsafe { sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), dptr, SANITY_BYTES) }
    } else {
        r
    };
    // SAFETY: freed once.
    let freed = unsafe { sys::cuMemFree_v2(dptr) };
    cu(r, "device memory write/read")?;
    cu(freed, "cuMemFree")?;
    match host.iter().position(|&b| b != 0xa5) {
        Some(offset) => Err(CudaError::ReadBack { offset }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Device memory a session holds: the rules the quotas charge by

/// Allocations up to this size are sub-allocated by the driver from pages it shares
/// between them ([`alloc_footprint`]).
pub const SMALL_ALLOC_BYTES: u64 = 1 << 20;
/// What a small allocation takes at least, and the multiple it is rounded up to.
pub const SMALL_ALLOC_GRANULE: u64 = 512;
/// The device page larger allocations are rounded up to.
pub const DEVICE_PAGE_BYTES: u64 = 2 << 20;
/// The sane range of a context's measured device memory ([`CudaExecutorFactory::new`]);
/// a measurement outside it (another process allocated or freed meanwhile) is clamped.
pub const CONTEXT_BYTES_RANGE: (u64, u64) = (64 << 20, 4 << 30);
/// What a context is charged when its device memory could not be measured.
pub const DEFAULT_CONTEXT_BYTES: u64 = 512 << 20;

/// Device bytes a `cuMemAlloc` of `bytes` takes: allocations of at most
/// [`SMALL_ALLOC_BYTES`] are rounded up to [`SMALL_ALLOC_GRANULE`] (the driver packs them
/// into shared pages at that alignment: 20,000 one-byte allocations take about 8 MiB),
/// larger ones to whole [`DEVICE_PAGE_BYTES`] pages (each gets pages of its own). The rule
/// errs towards charging more: `vgpu-gpu-check` measures it against the device
/// (`quota-alloc-footprint`).
pub fn alloc_footprint(bytes: u64) -> u64 {
    let granule = if bytes <= SMALL_ALLOC_BYTES {
        SMALL_ALLOC_GRANULE
    } else {
        DEVICE_PAGE_BYTES
    };
    bytes.checked_next_multiple_of(granule).unwrap_or(u64::MAX)
}

/// Device bytes a loaded module is charged: the larger of
/// - `globals`: the sizes of its `.global` and `.const` variables as the driver reports
///   them (`cuModuleGetGlobal`, names from the PTX): exact, and immune to other work on
///   the device; and
/// - `delta`: how much the device's free memory (`cuMemGetInfo`) fell while the module
///   was loaded, its globals looked up and its kernels loaded, which also covers its code
///   and constant banks, but in whole pages and including whatever another process
///   allocated meanwhile. So it counts only up to what such a module can take: its
///   globals and up to its PTX's length of code, each in whole pages, and one page more.
pub fn module_footprint(globals: u64, delta: u64, ptx_len: u64) -> u64 {
    let pages = |n: u64| {
        n.checked_next_multiple_of(DEVICE_PAGE_BYTES)
            .unwrap_or(u64::MAX)
    };
    let cap = pages(globals)
        .saturating_add(pages(ptx_len))
        .saturating_add(DEVICE_PAGE_BYTES);
    globals.max(delta.min(cap))
}

/// The per-thread stack of a new context (`CU_LIMIT_STACK_SIZE`) on current drivers.
pub const DEFAULT_STACK_BYTES: u64 = 1024;

/// Device bytes the driver reserves for a kernel's local memory beyond what every context
/// holds from the start: one slot of its per-thread local memory
/// (`CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`) for every thread the device can hold at once
/// (`resident_threads`: most resident threads per multiprocessor x multiprocessors), less
/// the `base` per thread (the stack, `CU_LIMIT_STACK_SIZE`) that the context's own
/// reservation already holds and that the larger one replaces: on an H200, a kernel of
/// 16 KiB per thread grew the device's used memory by 15 KiB x 270,336 threads. The
/// driver sizes the context's local memory for the most demanding kernel launched so far
/// and keeps it for the context's life; the base is part of
/// [`CudaExecutor::context_bytes`].
pub fn local_footprint(per_thread: u64, base: u64, resident_threads: u64) -> u64 {
    per_thread
        .saturating_sub(base)
        .saturating_mul(resident_threads)
}

/// The device's free memory (`cuMemGetInfo`); a context must be current.
fn free_device_memory() -> Result<u64, CUresult> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writes two size_t.
    let r = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
    if r == CUresult::CUDA_SUCCESS {
        Ok(free as u64)
    } else {
        Err(r)
    }
}

/// Threads the device holds at once: most resident threads per multiprocessor x
/// multiprocessors.
/// The device's UUID in the form `CUDA_VISIBLE_DEVICES` and `nvidia-smi -L` show
/// (`GPU-` and 32 hex digits in groups of 8-4-4-4-12); `None` if the driver does not say.
fn device_uuid(device: sys::CUdevice) -> Option<String> {
    let uuid = guarded("cuDeviceGetUuid", || {
        let mut uuid = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: writes one CUuuid for a device handle returned by cuDeviceGet.
        let r = unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, device) };
        cu(r, "cuDeviceGetUuid")?;
        Ok(uuid)
    })
    .ok()?;
    let b: Vec<u8> = uuid.bytes.iter().map(|&c| c as u8).collect();
    let hex =
        |r: std::ops::Range<usize>| -> String { b[r].iter().map(|x| format!("{x:02x}")).collect() };
    Some(format!(
        "GPU-{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    ))
}

fn resident_threads(device: sys::CUdevice, info: &DeviceInfo) -> Result<u64, CudaError> {
    let per_sm = device_attribute(
        device,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
    )?;
    Ok(u64::try_from(per_sm).unwrap_or(0) * u64::from(info.multiprocessors))
}

/// A context's measured device memory, clamped to [`CONTEXT_BYTES_RANGE`].
fn sane_context_bytes(measured: Result<u64, CudaError>) -> u64 {
    let (low, high) = CONTEXT_BYTES_RANGE;
    match measured {
        Ok(bytes) if (low..=high).contains(&bytes) => bytes,
        Ok(bytes) => {
            let clamped = bytes.clamp(low, high);
            log::warn!(
                "a CUDA context measured {} MiB of device memory, outside {}..={} MiB (other \
                 work on the device?): charging {} MiB per context",
                bytes >> 20,
                low >> 20,
                high >> 20,
                clamped >> 20
            );
            clamped
        }
        Err(e) => {
            log::warn!(
                "a CUDA context's device memory could not be measured ({e}): charging {} \
                 MiB per context",
                DEFAULT_CONTEXT_BYTES >> 20
            );
            DEFAULT_CONTEXT_BYTES
        }
    }
}

// ---------------------------------------------------------------------------------------
// Factory

/// Describes the device and makes one [`CudaExecutor`] (one CUDA context) per session.
pub struct CudaExecutorFactory {
    device: sys::CUdevice,
    info: DeviceInfo,
    /// The device's UUID as `CUDA_VISIBLE_DEVICES` takes it (`GPU-xxxxxxxx-...`).
    uuid: Option<String>,
    catalog_ptx: CString,
    compile_time: Duration,
    /// Threads the device holds at once (see [`local_footprint`]).
    resident_threads: u64,
    /// Device memory each executor's context holds (see [`CudaExecutor::context_bytes`]).
    context_bytes: u64,
}

impl CudaExecutorFactory {
    /// Initialises CUDA on device `ordinal`, compiles the built-in catalog with NVRTC and
    /// checks that a context can load it. Fails with one line when no driver, device or
    /// NVRTC is usable; never panics.
    pub fn new(ordinal: usize) -> Result<CudaExecutorFactory, CudaError> {
        init_driver()?;
        let (device, info) = guarded("device query", || query_device(ordinal))?;
        log::debug!("NVRTC library: {}", nvrtc_library()?.file);
        let started = Instant::now();
        let catalog_ptx = compile_ptx(
            vgpu_kernels::CUDA_SOURCE,
            "vgpu_catalog.cu",
            (info.cc_major, info.cc_minor),
        )?;
        let compile_time = started.elapsed();
        log::info!(
            "CUDA device {ordinal}: {} ({} MiB, cc {}.{}, {} SMs); catalog compiled by NVRTC in {:.1} ms ({} bytes of PTX)",
            info.name,
            info.total_memory >> 20,
            info.cc_major,
            info.cc_minor,
            info.multiprocessors,
            compile_time.as_secs_f64() * 1e3,
            catalog_ptx.as_bytes().len()
        );
        let resident_threads = guarded("device query", || resident_threads(device, &info))?;
        let mut factory = CudaExecutorFactory {
            device,
            info,
            uuid: device_uuid(device),
            catalog_ptx,
            compile_time,
            resident_threads,
            context_bytes: DEFAULT_CONTEXT_BYTES,
        };
        // A context that loads the catalog now makes a broken driver or JIT show at start,
        // where `--executor auto` can still fall back to the CPU.
        let started = Instant::now();
        let probe = guarded("context probe", || {
            factory.create_executor().map_err(CudaError::Context)
        })?;
        log::info!(
            "CUDA context with catalog ready in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        let measured = guarded("context measurement", || Ok(factory.measure_context()))?;
        drop(probe);
        factory.context_bytes = sane_context_bytes(measured);
        log::info!(
            "a session's CUDA context holds {} MiB of device memory (charged to its VM)",
            factory.context_bytes >> 20
        );
        Ok(factory)
    }

    /// The device memory one more context takes once it has loaded the catalog and run a
    /// kernel (the driver reserves the context's local memory, its per-thread stack for
    /// every thread the device holds, at the first launch): the fall of the device's free
    /// memory around it. Another context must be current (its creation is not measured).
    fn measure_context(&self) -> Result<u64, CudaError> {
        let failed = |code| CudaError::Driver {
            call: "cuMemGetInfo",
            code,
        };
        let before = free_device_memory().map_err(failed)?;
        let mut exec = self.create_executor().map_err(CudaError::Context)?;
        exec.touch_local_memory().map_err(CudaError::Context)?;
        let after = free_device_memory().map_err(failed)?;
        drop(exec);
        Ok(before.saturating_sub(after))
    }

    /// Charges `bytes` per context instead of what [`CudaExecutorFactory::new`] measured
    /// (a worker process is told what its parent measured).
    pub fn with_context_bytes(mut self, bytes: u64) -> Self {
        self.context_bytes = bytes;
        self
    }

    /// Device memory each executor's context holds (see [`CudaExecutor::context_bytes`]).
    pub fn context_bytes(&self) -> u64 {
        self.context_bytes
    }

    /// Threads the device holds at once: most resident threads per multiprocessor x
    /// multiprocessors (see [`local_footprint`]).
    pub fn resident_threads(&self) -> u64 {
        self.resident_threads
    }

    /// A factory for device `ordinal` around catalog PTX that [`CudaExecutorFactory::new`]
    /// compiled elsewhere (an executor worker process gets it from its parent): no NVRTC
    /// and no probe context. The PTX must suit this device and driver, as it does when it
    /// comes from a factory on the same machine.
    pub fn from_ptx(ordinal: usize, catalog_ptx: &str) -> Result<CudaExecutorFactory, CudaError> {
        init_driver()?;
        let (device, info) = guarded("device query", || query_device(ordinal))?;
        let catalog_ptx = CString::new(catalog_ptx).map_err(|_| CudaError::NulByte {
            what: "the catalog PTX",
        })?;
        let resident_threads = guarded("device query", || resident_threads(device, &info))?;
        Ok(CudaExecutorFactory {
            device,
            info,
            uuid: device_uuid(device),
            catalog_ptx,
            compile_time: Duration::ZERO,
            resident_threads,
            context_bytes: DEFAULT_CONTEXT_BYTES,
        })
    }

    /// The device's UUID as `CUDA_VISIBLE_DEVICES` takes it (`GPU-xxxxxxxx-...`), when the
    /// driver gives one.
    pub fn uuid(&self) -> Option<&str> {
        self.uuid.as_deref()
    }

    /// How long NVRTC took to compile the catalog.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// The catalog's PTX (its `.version` and `.target` suit this device and driver).
    pub fn catalog_ptx(&self) -> &str {
        self.catalog_ptx.to_str().unwrap_or("")
    }

    /// Where the parameter sizes that guest PTX launches are checked against come from:
    /// the driver (`cuFuncGetParamInfo`, CUDA 12.4 drivers and later) or the module's PTX
    /// `.entry` signatures. A launch is never made unchecked.
    pub fn module_param_source(&self) -> &'static str {
        if driver_has_param_info() && std::env::var_os(PTX_SIGNATURES_ONLY_ENV).is_none() {
            "cuFuncGetParamInfo"
        } else {
            "PTX .entry signatures"
        }
    }

    /// A new executor with its own context, current on the calling thread.
    pub fn create_executor(&self) -> ExecResult<CudaExecutor> {
        let created = guarded("cuCtxCreate", || Ok(create_context(self.device)));
        let ctx = match created {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(code)) => return Err(cuda_error(code, "cuCtxCreate")),
            Err(e) => return Err(ExecError::new(Status::Internal, 0, e.to_string())),
        };
        let mut exec =
            CudaExecutor::new(ctx, self.device, (self.info.cc_major, self.info.cc_minor));
        exec.resident_threads = self.resident_threads;
        exec.query_stack_bytes();
        exec.context_bytes = self.context_bytes;
        let catalog = exec.load_image(&self.catalog_ptx).map_err(|mut e| {
            e.message = format!("built-in catalog: {}", e.message);
            e
        })?;
        exec.catalog = catalog;
        for spec in CATALOG {
            let name = CString::new(spec.name).expect("catalog names have no NUL");
            let mut f: sys::CUfunction = ptr::null_mut();
            // SAFETY: `catalog` is loaded in the current context; writes one handle.
            let r = unsafe { sys::cuModuleGetFunction(&mut f, catalog, name.as_ptr()) };
            exec.check(r, "cuModuleGetFunction (built-in)")
                .map_err(|mut e| {
                    e.message = format!("built-in {}: {}", spec.name, e.message);
                    e
                })?;
            exec.builtins.insert(spec.name, f);
        }
        Ok(exec)
    }
}

impl ExecutorFactory for CudaExecutorFactory {
    fn device(&self) -> &DeviceInfo {
        &self.info
    }

    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        self.create_executor()
            .map(|e| Box::new(e) as Box<dyn Executor>)
    }
}

// ---------------------------------------------------------------------------------------
// Executor

/// A function of a guest module, with its parameters' (offset, size) as the driver
/// reports them, or as the module's PTX declares them.
struct ModuleFunction {
    function: sys::CUfunction,
    params: Vec<(usize, usize)>,
}

struct LoadedModule {
    module: sys::CUmodule,
    functions: HashMap<String, ModuleFunction>,
    /// (offset, size) of the parameters of each `.entry`, read from the module's PTX
    /// (none for a binary image).
    signatures: HashMap<String, Vec<(usize, usize)>>,
    /// Device bytes it holds ([`module_footprint`]).
    bytes: u64,
    /// Per-thread local memory of its kernels, by name, read when it was loaded.
    local_sizes: HashMap<String, u64>,
}

/// One tenant's CUDA context: its streams, allocations and modules.
///
/// Not `Send`: it lives on the tenant's worker thread, where its context is made current
/// at every call (cheap, and correct even if something else changed the thread's context).
pub struct CudaExecutor {
    ctx: sys::CUcontext,
    /// The device the context is on, and its compute capability.
    device: sys::CUdevice,
    cc: (u16, u16),
    catalog: sys::CUmodule,
    builtins: HashMap<&'static str, sys::CUfunction>,
    streams: HashMap<u64, sys::CUstream>,
    next_stream: u64,
    /// Device pointer -> size in bytes. A `BufferId` is the device pointer.
    buffers: HashMap<u64, u64>,
    /// Module variables handed out ([`Executor::module_global`]): device pointer ->
    /// (size in bytes, module id). Copies and launches take them like buffers.
    globals: HashMap<u64, (u64, u64)>,
    /// The device's attributes 1..=n read so far ([`Executor::device_attributes`]).
    attributes: Vec<i32>,
    /// Whether [`Executor::compile`] runs NVRTC here: only in a worker process
    /// ([`CudaExecutor::enable_compile`]).
    compiler: bool,
    modules: HashMap<u64, LoadedModule>,
    next_module: u64,
    /// The sticky error that made the context unusable.
    poison: Option<CUresult>,
    /// Parameter bytes and pointers of the launch being built, kept to reuse their memory.
    param_arena: Vec<u64>,
    param_ptrs: Vec<*mut c_void>,
    /// Registered host buffers (page-locked in this context).
    hosts: HashMap<u64, HostMap>,
    /// Per stream, an event recorded after its latest `htod_staged` copy, and whether it
    /// has been waited for since.
    copy_events: HashMap<u64, (sys::CUevent, bool)>,
    /// Threads the device holds at once (see [`local_footprint`]).
    resident_threads: u64,
    /// Device memory the context holds (see [`Executor::context_bytes`]).
    context_bytes: u64,
    /// Per-thread local memory of the built-in kernels, read when first asked.
    builtin_local_sizes: HashMap<&'static str, u64>,
    /// The per-thread stack the context's own local memory holds.
    stack_bytes: u64,
}

impl CudaExecutor {
    fn new(ctx: sys::CUcontext, device: sys::CUdevice, cc: (u16, u16)) -> CudaExecutor {
        CudaExecutor {
            ctx,
            device,
            cc,
            catalog: ptr::null_mut(),
            builtins: HashMap::new(),
            streams: HashMap::new(),
            next_stream: 1,
            buffers: HashMap::new(),
            globals: HashMap::new(),
            attributes: Vec::new(),
            compiler: false,
            modules: HashMap::new(),
            next_module: 1,
            poison: None,
            param_arena: Vec::new(),
            param_ptrs: Vec::new(),
            hosts: HashMap::new(),
            copy_events: HashMap::new(),
            resident_threads: 0,
            context_bytes: 0,
            builtin_local_sizes: HashMap::new(),
            stack_bytes: DEFAULT_STACK_BYTES,
        }
    }

    /// The context's per-thread stack (`CU_LIMIT_STACK_SIZE`), which its own local memory
    /// reservation holds; [`DEFAULT_STACK_BYTES`] if the driver does not say.
    fn query_stack_bytes(&mut self) {
        if self.enter().is_err() {
            return;
        }
        let mut value = 0usize;
        // SAFETY: writes one size_t; the context is current.
        let r = unsafe { sys::cuCtxGetLimit(&mut value, sys::CUlimit::CU_LIMIT_STACK_SIZE) };
        if r == CUresult::CUDA_SUCCESS {
            self.stack_bytes = value as u64;
        }
    }

    /// Per-thread local memory of `function` (`CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`),
    /// loading it first if lazy loading has not yet.
    fn function_local_size(&mut self, function: sys::CUfunction) -> ExecResult<u64> {
        let value = self.function_attribute(
            function,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
        )?;
        Ok(u64::try_from(value).unwrap_or(0))
    }

    /// An attribute of `function` (`cuFuncGetAttribute`), loading the function first if
    /// lazy loading has not yet.
    fn function_attribute(
        &mut self,
        function: sys::CUfunction,
        attribute: sys::CUfunction_attribute,
    ) -> ExecResult<i32> {
        let mut loaded = false;
        loop {
            let mut value: c_int = 0;
            // SAFETY: `function` is a live handle of the current context; writes one int.
            let r = unsafe { sys::cuFuncGetAttribute(&mut value, attribute, function) };
            match r {
                CUresult::CUDA_SUCCESS => return Ok(value),
                CUresult::CUDA_ERROR_FUNCTION_NOT_LOADED
                    if !loaded && driver_has(b"cuFuncLoad") =>
                {
                    loaded = true;
                    // SAFETY: `function` is a live handle of the current context.
                    let r = unsafe { sys::cuFuncLoad(function) };
                    self.check(r, "cuFuncLoad")?;
                }
                other => return Err(self.check(other, "cuFuncGetAttribute").unwrap_err()),
            }
        }
    }

    /// FUNCTION_INFO's attributes of `function`: `CUfunction_attribute` 0 to 9, 0 for
    /// one the driver does not answer.
    fn function_attributes(
        &mut self,
        function: sys::CUfunction,
    ) -> ExecResult<[i32; FUNCTION_ATTRIBUTES]> {
        use sys::CUfunction_attribute::*;
        let names = [
            CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
            CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES,
            CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
            CU_FUNC_ATTRIBUTE_NUM_REGS,
            CU_FUNC_ATTRIBUTE_PTX_VERSION,
            CU_FUNC_ATTRIBUTE_BINARY_VERSION,
            CU_FUNC_ATTRIBUTE_CACHE_MODE_CA,
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        ];
        let mut out = [0i32; FUNCTION_ATTRIBUTES];
        for (slot, attribute) in out.iter_mut().zip(names) {
            *slot = match self.function_attribute(function, attribute) {
                Ok(v) => v,
                Err(e) if self.poison.is_some() => return Err(e),
                Err(_) => 0,
            };
        }
        Ok(out)
    }

    /// The bytes of `module`'s module-scope variables `names`, as the driver reports them
    /// (`cuModuleGetGlobal`; with lazy loading this also makes the driver place them). A
    /// name the driver does not know counts nothing.
    fn module_global_bytes(
        &mut self,
        module: sys::CUmodule,
        names: impl IntoIterator<Item = String>,
    ) -> u64 {
        let mut total = 0u64;
        for name in names {
            let Ok(name) = CString::new(name) else {
                continue;
            };
            let (mut dptr, mut bytes): (sys::CUdeviceptr, usize) = (0, 0);
            // SAFETY: `module` is loaded in the current context; writes a pointer and a size.
            let r =
                unsafe { sys::cuModuleGetGlobal_v2(&mut dptr, &mut bytes, module, name.as_ptr()) };
            if r == CUresult::CUDA_SUCCESS {
                total = total.saturating_add(bytes as u64);
            } else if is_sticky(r) {
                let _ = self.check(r, "cuModuleGetGlobal");
                break;
            }
        }
        total
    }

    /// The per-thread local memory of each of `names` that is a kernel of `module`,
    /// read now (which also loads them with lazy loading, so that their code is on the
    /// device when the free memory is read again).
    fn module_local_sizes(
        &mut self,
        module: sys::CUmodule,
        names: impl IntoIterator<Item = String>,
    ) -> HashMap<String, u64> {
        let mut local_sizes = HashMap::new();
        for name in names {
            let Ok(cname) = CString::new(name.as_str()) else {
                continue;
            };
            let mut function: sys::CUfunction = ptr::null_mut();
            // SAFETY: `module` is loaded in the current context; writes one handle.
            let r = unsafe { sys::cuModuleGetFunction(&mut function, module, cname.as_ptr()) };
            if r == CUresult::CUDA_SUCCESS {
                if let Ok(size) = self.function_local_size(function) {
                    local_sizes.insert(name, size);
                }
            } else if is_sticky(r) {
                let _ = self.check(r, "cuModuleGetFunction");
                break;
            }
        }
        local_sizes
    }

    /// Loads every function of `module` (`cuModuleEnumerateFunctions`, CUDA 12.4 drivers
    /// and later), so that with lazy loading their code is on the device when the free
    /// memory is read: for an image whose kernels could not all be named.
    fn load_every_function(&mut self, module: sys::CUmodule) {
        if !(driver_has(b"cuModuleGetFunctionCount")
            && driver_has(b"cuModuleEnumerateFunctions")
            && driver_has(b"cuFuncLoad"))
        {
            return;
        }
        let mut count: c_uint = 0;
        // SAFETY: `module` is loaded in the current context; writes one count.
        let r = unsafe { sys::cuModuleGetFunctionCount(&mut count, module) };
        if r != CUresult::CUDA_SUCCESS {
            let _ = self.check(r, "cuModuleGetFunctionCount");
            return;
        }
        let count = count.min(image::MAX_SYMBOLS as c_uint);
        let mut functions: Vec<sys::CUfunction> = vec![ptr::null_mut(); count as usize];
        // SAFETY: `functions` holds `count` handles for the driver to write.
        let r = unsafe { sys::cuModuleEnumerateFunctions(functions.as_mut_ptr(), count, module) };
        if r != CUresult::CUDA_SUCCESS {
            let _ = self.check(r, "cuModuleEnumerateFunctions");
            return;
        }
        for function in functions.into_iter().filter(|f| !f.is_null()) {
            // SAFETY: a live function handle of `module`, in the current context.
            let r = unsafe { sys::cuFuncLoad(function) };
            if is_sticky(r) {
                let _ = self.check(r, "cuFuncLoad");
                return;
            }
        }
    }

    /// Lets [`Executor::compile`] run NVRTC in this process: for an executor in a worker
    /// process, where the guest's source can cost only its own session (or for tests).
    pub fn enable_compile(&mut self) {
        self.compiler = true;
    }

    /// The device's attribute `attribute` (any number: the driver answers
    /// `CUDA_ERROR_INVALID_VALUE` for one it does not know, which is 0 here).
    fn raw_device_attribute(&mut self, attribute: c_int) -> ExecResult<i32> {
        type GetAttribute = unsafe extern "C" fn(*mut c_int, c_int, sys::CUdevice) -> c_int;
        let driver =
            driver_library().map_err(|e| ExecError::new(Status::Internal, 0, e.to_string()))?;
        // SAFETY: cuDeviceGetAttribute's C signature; the attribute is passed as the plain
        // integer the C enum is, so numbers this build's bindings do not name are fine.
        let get =
            unsafe { driver.lib.get::<GetAttribute>(b"cuDeviceGetAttribute") }.map_err(|e| {
                ExecError::new(Status::Internal, 0, format!("cuDeviceGetAttribute: {e}"))
            })?;
        let mut value: c_int = 0;
        // SAFETY: writes one int for the executor's device handle.
        let r = unsafe { get(&mut value, attribute, self.device) };
        match r {
            0 => Ok(value),
            // CUDA_ERROR_INVALID_VALUE: an attribute this driver does not know.
            1 => Ok(0),
            code => Err(ExecError::new(
                Status::Internal,
                code as u32,
                format!("cuDeviceGetAttribute({attribute}): CUDA error {code}"),
            )),
        }
    }
    /// Launches a built-in kernel that touches nothing (`fill_u32` of 0 elements) and
    /// waits for it: the driver reserves the context's local memory at its first launch.
    fn touch_local_memory(&mut self) -> ExecResult<()> {
        self.enter()?;
        let function = *self.builtins.get("fill_u32").ok_or_else(|| {
            ExecError::new(Status::Internal, 0, "no built-in fill_u32 in the catalog")
        })?;
        let (mut ptr, mut value, mut n): (u64, u32, u32) = (0, 0, 0);
        let mut args: [*mut c_void; 3] = [
            (&mut ptr as *mut u64).cast(),
            (&mut value as *mut u32).cast(),
            (&mut n as *mut u32).cast(),
        ];
        // SAFETY: fill_u32 takes (pointer, u32, u32), matching `args`, which outlive the
        // call; with n = 0 it dereferences nothing. The null stream of the current context.
        let r = unsafe {
            sys::cuLaunchKernel(
                function,
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                ptr::null_mut(),
                args.as_mut_ptr(),
                ptr::null_mut(),
            )
        };
        self.check(r, "cuLaunchKernel (fill_u32 of nothing)")?;
        self.sync_context("cuCtxSynchronize (fill_u32 of nothing)")
    }

    /// The sticky error that poisoned this context, if one did.
    pub fn sticky_error(&self) -> Option<CUresult> {
        self.poison
    }

    /// Page-locks `len` bytes of host memory at `ptr` for this context
    /// (`cuMemHostRegister`, flags 0), so copies from and to them run at pinned speed.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be a page-aligned mapping that stays mapped until
    /// [`CudaExecutor::unpin_host_memory`] succeeds or this executor is dropped.
    pub unsafe fn pin_host_memory(&mut self, ptr: *mut c_void, len: usize) -> ExecResult<()> {
        if !(driver_has(b"cuMemHostRegister_v2") && driver_has(b"cuMemHostUnregister")) {
            return Err(ExecError::new(
                Status::Unsupported,
                0,
                "the driver has no cuMemHostRegister",
            ));
        }
        self.enter()?;
        // SAFETY: the caller keeps the range mapped while registered; the context is current.
        let r = unsafe { sys::cuMemHostRegister_v2(ptr, len, 0) };
        self.check(r, "cuMemHostRegister")
    }

    /// Undoes [`CudaExecutor::pin_host_memory`] for the range starting at `ptr`; call it
    /// before unmapping the range. Fails (and does nothing) once the context is poisoned:
    /// destroying the context then releases the registration.
    ///
    /// # Safety
    /// `ptr` must be a pointer [`CudaExecutor::pin_host_memory`] registered in this executor.
    pub unsafe fn unpin_host_memory(&mut self, ptr: *mut c_void) -> ExecResult<()> {
        self.enter()?;
        // SAFETY: `ptr` was registered in this context (pin_host_memory), which is current.
        let r = unsafe { sys::cuMemHostUnregister(ptr) };
        self.check(r, "cuMemHostUnregister")
    }

    /// Maps a CUDA result; a sticky error poisons the executor.
    fn check(&mut self, r: CUresult, what: &str) -> ExecResult<()> {
        if r == CUresult::CUDA_SUCCESS {
            return Ok(());
        }
        if is_sticky(r) && self.poison.is_none() {
            log::warn!("CUDA context poisoned by {} during {what}", error_name(r));
            self.poison = Some(r);
        }
        Err(cuda_error(r, what))
    }

    /// Refuses work once poisoned, and makes this context current on the thread.
    fn enter(&mut self) -> ExecResult<()> {
        if let Some(code) = self.poison {
            return Err(cuda_error(
                code,
                "context unusable after an earlier device fault",
            ));
        }
        // SAFETY: `ctx` is live until drop.
        let r = unsafe { sys::cuCtxSetCurrent(self.ctx) };
        self.check(r, "cuCtxSetCurrent")
    }

    fn stream(&self, stream: StreamId) -> ExecResult<sys::CUstream> {
        self.streams.get(&stream.0).copied().ok_or_else(|| {
            ExecError::new(Status::Internal, 0, format!("unknown stream {}", stream.0))
        })
    }

    /// The device address of `[offset, offset + len)` in `buffer`, checked.
    /// `len` bytes at `offset` of host buffer `id`.
    fn host_span(&self, id: u64, offset: u64, len: u64) -> ExecResult<*mut u8> {
        let map = self.hosts.get(&id).ok_or_else(|| no_host_buffer(id))?;
        map.at(offset, len)
            .ok_or_else(|| outside_host_buffer(id, offset, len))
    }

    /// The size of a buffer or module variable of this context.
    fn buffer_size(&self, buffer: BufferId) -> Option<u64> {
        self.buffers
            .get(&buffer.0)
            .copied()
            .or_else(|| self.globals.get(&buffer.0).map(|&(size, _)| size))
    }

    fn span(&self, buffer: BufferId, offset: u64, len: u64) -> ExecResult<sys::CUdeviceptr> {
        let size = self
            .buffer_size(buffer)
            .ok_or_else(|| ExecError::new(Status::InvalidHandle, 0, "unknown device buffer"))?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(buffer.0 + offset),
            _ => Err(ExecError::new(
                Status::OutOfRange,
                0,
                format!("{len} bytes at offset {offset} pass the end of a {size}-byte buffer"),
            )),
        }
    }

    fn sync_context(&mut self, what: &str) -> ExecResult<()> {
        // SAFETY: the context is current (enter).
        let r = unsafe { sys::cuCtxSynchronize() };
        self.check(r, what)
    }

    /// Loads a NUL-terminated PTX image, capturing the JIT error log on failure.
    fn load_image(&mut self, image: &CStr) -> ExecResult<sys::CUmodule> {
        // SAFETY: a C string is a valid PTX image for the driver to read up to its NUL.
        unsafe { self.load_data(image.as_ptr().cast()) }
    }

    /// Loads a module image as `cuModuleLoadDataEx` takes it, capturing the JIT error
    /// log on failure.
    ///
    /// # Safety
    /// `image` must point at a module image the driver can read to its end: PTX ended
    /// by a NUL, or a cubin or fatbin (the driver reads as far as its headers say).
    unsafe fn load_data(&mut self, image: *const c_void) -> ExecResult<sys::CUmodule> {
        self.enter()?;
        let mut log = vec![0u8; JIT_LOG_BYTES];
        let mut options = [
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        // The size option is passed by value in the pointer slot, as cuda.h specifies.
        let mut values: [*mut c_void; 2] = [log.as_mut_ptr().cast(), JIT_LOG_BYTES as *mut c_void];
        let mut module: sys::CUmodule = ptr::null_mut();
        // SAFETY: the caller vouches for `image`; `options` and `values` have 2 entries
        // each; `log` outlives the call and is JIT_LOG_BYTES long.
        let r = unsafe {
            sys::cuModuleLoadDataEx(
                &mut module,
                image,
                options.len() as c_uint,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if r == CUresult::CUDA_SUCCESS {
            return Ok(module);
        }
        let mut e = self
            .check(r, "cuModuleLoadDataEx")
            .expect_err("not a success");
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let jit = first_line(&String::from_utf8_lossy(&log[..end]), 300);
        if !jit.is_empty() {
            e.message = format!("{}: {jit}", e.message);
        }
        Err(e)
    }

    /// The function `name` of a guest module, looked up once, with its parameters'
    /// (offset, size).
    fn module_function(
        &mut self,
        module: ModuleId,
        name: &str,
    ) -> ExecResult<(sys::CUfunction, Vec<(usize, usize)>)> {
        let loaded = self
            .modules
            .get(&module.0)
            .ok_or_else(|| ExecError::new(Status::InvalidHandle, 0, "unknown module"))?;
        if let Some(f) = loaded.functions.get(name) {
            return Ok((f.function, f.params.clone()));
        }
        let handle = loaded.module;
        let signature = loaded.signatures.get(name).cloned();
        let cname = CString::new(name).map_err(|_| {
            ExecError::new(Status::KernelNotFound, 0, "kernel name contains a NUL byte")
        })?;
        let mut function: sys::CUfunction = ptr::null_mut();
        // SAFETY: `handle` is loaded in the current context; writes one handle.
        let r = unsafe { sys::cuModuleGetFunction(&mut function, handle, cname.as_ptr()) };
        self.check(r, "cuModuleGetFunction").map_err(|mut e| {
            e.message = format!("kernel '{}': {}", first_line(name, 128), e.message);
            e
        })?;
        // The driver's word when it has one, else the PTX's; a kernel with neither is
        // never launched: the driver would read as many parameters as the kernel declares,
        // past what the guest passed.
        let params = param_layout(function).or(signature).ok_or_else(|| {
            ExecError::new(
                Status::Unsupported,
                0,
                format!(
                    "kernel '{name}': its parameter layout cannot be established (no \
                         cuFuncGetParamInfo in this driver and no readable .entry signature \
                         in the PTX); not launched"
                ),
            )
        })?;
        if let Some(loaded) = self.modules.get_mut(&module.0) {
            loaded.functions.insert(
                name.to_string(),
                ModuleFunction {
                    function,
                    params: params.clone(),
                },
            );
        }
        Ok((function, params))
    }

    /// Lays the launch parameters out in `param_arena` (8-byte aligned) and points
    /// `param_ptrs` at them.
    fn marshal_params(&mut self, params: &[ExecParam]) -> ExecResult<()> {
        let mut offsets = Vec::with_capacity(params.len());
        let mut end = 0usize;
        for (i, p) in params.iter().enumerate() {
            let size = match p {
                ExecParam::Value(v) => v.len(),
                ExecParam::Buffer(id) => {
                    if self.buffer_size(*id).is_none() {
                        return Err(ExecError::new(
                            Status::InvalidHandle,
                            i as u32,
                            "unknown buffer parameter",
                        ));
                    }
                    8
                }
            };
            let at = end.next_multiple_of(8);
            offsets.push(at);
            end = at + size;
        }
        if end > MAX_PARAM_SPACE {
            return Err(ExecError::new(
                Status::InvalidArgument,
                params.len() as u32,
                "kernel parameters too large",
            ));
        }
        self.param_arena.clear();
        self.param_arena.resize(end.div_ceil(8).max(1), 0);
        let base = self.param_arena.as_mut_ptr().cast::<u8>();
        self.param_ptrs.clear();
        for (p, &at) in params.iter().zip(&offsets) {
            // SAFETY: `at + len <= end <= arena bytes`; the arena is not resized again
            // before the launch, so the pointers stay valid.
            unsafe {
                let dst = base.add(at);
                match p {
                    ExecParam::Value(v) => ptr::copy_nonoverlapping(v.as_ptr(), dst, v.len()),
                    ExecParam::Buffer(id) => {
                        ptr::copy_nonoverlapping(id.0.to_ne_bytes().as_ptr(), dst, 8)
                    }
                }
                self.param_ptrs.push(dst.cast());
            }
        }
        Ok(())
    }
}

/// The (offset, size) of `function`'s parameters, or `None` when the driver cannot say.
fn param_layout(function: sys::CUfunction) -> Option<Vec<(usize, usize)>> {
    static IGNORED: OnceLock<bool> = OnceLock::new();
    if !driver_has_param_info()
        || *IGNORED.get_or_init(|| std::env::var_os(PTX_SIGNATURES_ONLY_ENV).is_some())
    {
        return None;
    }
    let mut sizes = Vec::new();
    let mut loaded = false;
    let mut index = 0;
    while index <= MAX_PARAM_SPACE {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: `function` is a live handle; writes two size_t.
        let r = unsafe { sys::cuFuncGetParamInfo(function, index, &mut offset, &mut size) };
        match r {
            CUresult::CUDA_SUCCESS => {
                sizes.push((offset, size));
                index += 1;
            }
            // The documented answer for an index past the last parameter.
            CUresult::CUDA_ERROR_INVALID_VALUE => return Some(sizes),
            // Lazy module loading (the default since CUDA 12.2) may not have loaded the
            // function yet: load it and ask again.
            CUresult::CUDA_ERROR_FUNCTION_NOT_LOADED if !loaded && driver_has(b"cuFuncLoad") => {
                loaded = true;
                // SAFETY: `function` is a live handle of the current context.
                let r = unsafe { sys::cuFuncLoad(function) };
                if r != CUresult::CUDA_SUCCESS {
                    log::debug!("cuFuncLoad: {}; launching unchecked", error_name(r));
                    return None;
                }
            }
            other => {
                log::debug!(
                    "cuFuncGetParamInfo: {}; launching unchecked",
                    error_name(other)
                );
                return None;
            }
        }
    }
    None
}

/// Checks PTX text before it reaches the driver: not empty, within the protocol's size
/// limit, no NUL byte (the driver reads a C string). Returns the C string.
pub fn validate_ptx(ptx: &str) -> ExecResult<CString> {
    if ptx.trim().is_empty() {
        return Err(ExecError::new(Status::ModuleInvalid, 0, "empty PTX"));
    }
    if ptx.len() > MAX_PTX_BYTES as usize {
        return Err(ExecError::new(
            Status::InvalidArgument,
            0,
            format!(
                "PTX of {} bytes exceeds the {MAX_PTX_BYTES}-byte limit",
                ptx.len()
            ),
        ));
    }
    CString::new(ptx).map_err(|e| {
        ExecError::new(
            Status::ModuleInvalid,
            0,
            format!("PTX contains a NUL byte at offset {}", e.nul_position()),
        )
    })
}

/// Checks launch arguments against known parameter sizes; the error's detail is the index
/// of the first parameter that does not fit.
pub(crate) fn check_params(params: &[ExecParam], expected: &[usize]) -> ExecResult<()> {
    for (i, p) in params.iter().enumerate() {
        let given = match p {
            ExecParam::Value(v) => v.len(),
            ExecParam::Buffer(_) => 8,
        };
        match expected.get(i) {
            None => {
                return Err(ExecError::new(
                    Status::InvalidArgument,
                    i as u32,
                    format!(
                        "kernel takes {} parameters, got {}",
                        expected.len(),
                        params.len()
                    ),
                ))
            }
            Some(&size) if size != given => {
                return Err(ExecError::new(
                    Status::InvalidArgument,
                    i as u32,
                    format!("parameter {i} is {size} bytes, got {given}"),
                ))
            }
            Some(_) => {}
        }
    }
    if params.len() < expected.len() {
        return Err(ExecError::new(
            Status::InvalidArgument,
            params.len() as u32,
            format!(
                "kernel takes {} parameters, got {}",
                expected.len(),
                params.len()
            ),
        ));
    }
    Ok(())
}

fn builtin_sizes(params: &[ParamKind]) -> Vec<usize> {
    params.iter().map(|k| k.size()).collect()
}

impl Executor for CudaExecutor {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        self.enter()?;
        let mut stream: sys::CUstream = ptr::null_mut();
        // SAFETY: writes one stream handle in the current context.
        let r = unsafe {
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
            )
        };
        self.check(r, "cuStreamCreate")?;
        let id = self.next_stream;
        self.next_stream += 1;
        self.streams.insert(id, stream);
        Ok(StreamId(id))
    }

    fn close_stream(&mut self, stream: StreamId) {
        let Some(s) = self.streams.remove(&stream.0) else {
            return;
        };
        if self.enter().is_err() {
            return; // a poisoned context goes with everything in it
        }
        // SAFETY: `s` was created in this context and is destroyed once.
        let r = unsafe { sys::cuStreamSynchronize(s) };
        let _ = self.check(r, "cuStreamSynchronize (close)");
        // SAFETY: as above; nothing uses the stream after this.
        let r = unsafe { sys::cuStreamDestroy_v2(s) };
        let _ = self.check(r, "cuStreamDestroy");
        if let Some((event, _)) = self.copy_events.remove(&stream.0) {
            // SAFETY: created in `htod_staged`, destroyed once; its stream is done.
            let r = unsafe { sys::cuEventDestroy_v2(event) };
            let _ = self.check(r, "cuEventDestroy");
        }
    }

    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        self.enter()?;
        let size = usize::try_from(bytes)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                ExecError::new(
                    Status::InvalidArgument,
                    0,
                    format!("cannot allocate {bytes} bytes"),
                )
            })?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer.
        let r = unsafe { sys::cuMemAlloc_v2(&mut dptr, size) };
        self.check(r, "cuMemAlloc")?;
        self.buffers.insert(dptr, bytes);
        Ok(BufferId(dptr))
    }

    fn free(&mut self, buffer: BufferId) {
        if self.buffers.remove(&buffer.0).is_none() {
            log::warn!("free of an unknown device buffer {:#x}", buffer.0);
            return;
        }
        if self.enter().is_err() {
            return; // freed with the context
        }
        // Work queued on any stream may still use the buffer: wait for it, then free.
        // After a sticky error the memory goes with the context.
        if self.sync_context("cuCtxSynchronize (free)").is_err() && self.poison.is_some() {
            return;
        }
        // SAFETY: allocated by cuMemAlloc in this context; removed from `buffers` above so
        // it is freed once.
        let r = unsafe { sys::cuMemFree_v2(buffer.0) };
        let _ = self.check(r, "cuMemFree");
    }

    fn htod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        data: &[u8],
    ) -> ExecResult<()> {
        self.enter()?;
        let dptr = self.span(dst, offset, data.len() as u64)?;
        let s = self.stream(stream)?;
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: `data` is valid for its length and lives until the stream sync below;
        // `dptr..dptr+len` lies in a live allocation (span).
        let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dptr, data.as_ptr().cast(), data.len(), s) };
        self.check(r, "cuMemcpyHtoDAsync")?;
        // `data` is pageable memory the caller reuses as soon as we return, and the driver
        // only promises that an async copy from pageable memory *may* be staged before it
        // returns. Waiting for the stream is the documented way to know it was read.
        // TODO(perf): stage small copies through pinned memory tracked by events.
        // SAFETY: `s` is a live stream of this context.
        let r = unsafe { sys::cuStreamSynchronize(s) };
        self.check(r, "cuStreamSynchronize (htod)")
    }

    fn dtoh(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        out: &mut [u8],
    ) -> ExecResult<()> {
        self.enter()?;
        let dptr = self.span(src, offset, out.len() as u64)?;
        let s = self.stream(stream)?;
        if out.is_empty() {
            return self.sync(stream);
        }
        // SAFETY: `out` is valid for writes of its length until the stream sync below.
        let r = unsafe { sys::cuMemcpyDtoHAsync_v2(out.as_mut_ptr().cast(), dptr, out.len(), s) };
        self.check(r, "cuMemcpyDtoHAsync")?;
        // SAFETY: `s` is a live stream of this context.
        let r = unsafe { sys::cuStreamSynchronize(s) };
        self.check(r, "cuStreamSynchronize (dtoh)")
    }

    fn dtod(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        dst_offset: u64,
        src: BufferId,
        src_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        self.enter()?;
        let d = self.span(dst, dst_offset, len)?;
        let s_ptr = self.span(src, src_offset, len)?;
        let s = self.stream(stream)?;
        if len == 0 {
            return Ok(());
        }
        // CUDA copies do not define overlapping ranges.
        if d < s_ptr + len && s_ptr < d + len {
            return Err(ExecError::new(
                Status::InvalidArgument,
                0,
                "overlapping device-to-device copy",
            ));
        }
        // SAFETY: both ranges lie in live allocations (span) and do not overlap.
        let r = unsafe { sys::cuMemcpyDtoDAsync_v2(d, s_ptr, len as usize, s) };
        self.check(r, "cuMemcpyDtoDAsync")
    }

    fn memset(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    ) -> ExecResult<()> {
        self.enter()?;
        let d = self.span(dst, offset, len)?;
        let s = self.stream(stream)?;
        let r = match width {
            1 => {
                let byte = u8::try_from(value).map_err(|_| {
                    ExecError::new(
                        Status::InvalidArgument,
                        0,
                        "memset value does not fit a byte",
                    )
                })?;
                if len == 0 {
                    return Ok(());
                }
                // SAFETY: `d..d+len` lies in a live allocation.
                unsafe { sys::cuMemsetD8Async(d, byte, len as usize, s) }
            }
            4 => {
                if offset % 4 != 0 || len % 4 != 0 {
                    return Err(ExecError::new(
                        Status::InvalidArgument,
                        0,
                        "4-byte memset needs 4-byte aligned offset and length",
                    ));
                }
                if len == 0 {
                    return Ok(());
                }
                // SAFETY: `d..d+len` lies in a live allocation, 4-byte aligned
                // (allocations are 256-byte aligned and the offset is a multiple of 4).
                unsafe { sys::cuMemsetD32Async(d, value, (len / 4) as usize, s) }
            }
            _ => {
                return Err(ExecError::new(
                    Status::InvalidArgument,
                    0,
                    format!("memset width {width}"),
                ))
            }
        };
        self.check(r, "cuMemsetAsync")
    }

    fn load_module(&mut self, ptx: &str) -> ExecResult<ModuleId> {
        let image = validate_ptx(ptx)?;
        self.enter()?;
        let before = free_device_memory().ok();
        let module = self.load_image(&image)?;
        // Its kernels' local memory, read now (which also loads them with lazy loading, so
        // that their code is on the device when the free memory is read again).
        let kernels = crate::ptx::entries(ptx).unwrap_or_default().into_keys();
        let local_sizes = self.module_local_sizes(module, kernels);
        let globals =
            self.module_global_bytes(module, crate::ptx::globals(ptx).into_iter().map(|g| g.name));
        let after = free_device_memory().ok();
        let delta = match (before, after) {
            (Some(b), Some(a)) => b.saturating_sub(a),
            _ => 0,
        };
        let bytes = module_footprint(globals, delta, ptx.len() as u64);
        let id = self.next_module;
        self.next_module += 1;
        self.modules.insert(
            id,
            LoadedModule {
                module,
                functions: HashMap::new(),
                signatures: crate::ptx::entry_layouts(ptx),
                bytes,
                local_sizes,
            },
        );
        if let Some(code) = self.poison {
            // A sticky error while its kernels were read: the context goes, and with it
            // the module.
            return Err(cuda_error(code, "module load"));
        }
        Ok(ModuleId(id))
    }

    fn unload_module(&mut self, module: ModuleId) {
        let Some(loaded) = self.modules.remove(&module.0) else {
            return;
        };
        self.globals.retain(|_, &mut (_, owner)| owner != module.0);
        if self.enter().is_err() {
            return;
        }
        // A kernel of the module may still be queued or running.
        if self
            .sync_context("cuCtxSynchronize (module unload)")
            .is_err()
            && self.poison.is_some()
        {
            return;
        }
        // SAFETY: loaded in this context; removed from `modules` so unloaded once.
        let r = unsafe { sys::cuModuleUnload(loaded.module) };
        let _ = self.check(r, "cuModuleUnload");
    }

    fn launch(
        &mut self,
        stream: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()> {
        self.enter()?;
        let s = self.stream(stream)?;
        let (function, sizes) = match kernel {
            KernelRef::Builtin(spec) => {
                let f = *self.builtins.get(spec.name).ok_or_else(|| {
                    ExecError::new(
                        Status::KernelNotFound,
                        0,
                        format!("no built-in kernel '{}'", spec.name),
                    )
                })?;
                for (i, (kind, p)) in spec.params.iter().zip(params).enumerate() {
                    if (*kind == ParamKind::Buffer) != matches!(p, ExecParam::Buffer(_)) {
                        return Err(ExecError::new(
                            Status::InvalidArgument,
                            i as u32,
                            format!("parameter {i} must be a {kind}"),
                        ));
                    }
                }
                (f, builtin_sizes(spec.params))
            }
            KernelRef::Module(module, name) => {
                let (f, layout) = self.module_function(module, name)?;
                (f, layout.into_iter().map(|(_, size)| size).collect())
            }
        };
        check_params(params, &sizes)?;
        self.marshal_params(params)?;
        let kernel_params = if self.param_ptrs.is_empty() {
            ptr::null_mut()
        } else {
            self.param_ptrs.as_mut_ptr()
        };
        let [gx, gy, gz] = shape.grid;
        let [bx, by, bz] = shape.block;
        // SAFETY: `function` belongs to a module loaded in this context; `kernel_params`
        // holds one pointer per parameter, each to at least the parameter's size in bytes
        // (checked against the kernel's signature), all alive until the call returns (the
        // driver copies them at launch). Buffer parameters are live allocations.
        let r = unsafe {
            sys::cuLaunchKernel(
                function,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                shape.shared_bytes,
                s,
                kernel_params,
                ptr::null_mut(),
            )
        };
        self.check(r, "cuLaunchKernel")
    }

    fn sync(&mut self, stream: StreamId) -> ExecResult<()> {
        self.enter()?;
        let s = self.stream(stream)?;
        // SAFETY: `s` is a live stream of this context.
        let r = unsafe { sys::cuStreamSynchronize(s) };
        self.check(r, "cuStreamSynchronize")
    }

    /// PTX text goes through [`Executor::load_module`]; a cubin or fatbin is handed to the
    /// driver from an 8-byte aligned copy with NULs after it, and charged like a PTX
    /// module ([`module_footprint`]) by the variables it names ([`crate::image`]). An
    /// image whose variables cannot all be named (compressed fatbin entries) is charged
    /// all the device's free memory fell by while it loaded and its functions were loaded.
    fn load_module_image(&mut self, bytes: &[u8]) -> ExecResult<ModuleId> {
        match image::kind(bytes) {
            ImageKind::Ptx => return self.load_module(image::as_ptx(bytes).unwrap_or("")),
            ImageKind::FatbinWrapper => {
                return Err(ExecError::new(
                    Status::InvalidArgument,
                    0,
                    "a fatbin wrapper holds a pointer into the guest's process, not a module",
                ))
            }
            ImageKind::Elf | ImageKind::Fatbin | ImageKind::Unknown => {}
        }
        if bytes.is_empty() || bytes.len() > vgpu_protocol::MAX_MODULE_IMAGE_BYTES as usize {
            return Err(ExecError::new(
                Status::InvalidArgument,
                0,
                format!("a module image of {} bytes", bytes.len()),
            ));
        }
        // Aligned for the ELF reader, and ended by NULs for anything read as text.
        let words = bytes.len().div_ceil(8) + 8;
        let mut copy: Vec<u64> = Vec::new();
        copy.try_reserve_exact(words)
            .map_err(|_| ExecError::new(Status::OutOfMemory, 0, "no host memory for the image"))?;
        copy.resize(words, 0);
        // SAFETY: `copy` holds `words * 8 >= bytes.len()` bytes; u64 has no invalid bit
        // patterns, and the two do not overlap.
        unsafe {
            ptr::copy_nonoverlapping(bytes.as_ptr(), copy.as_mut_ptr().cast::<u8>(), bytes.len())
        };
        self.enter()?;
        let before = free_device_memory().ok();
        // SAFETY: `copy` is the image followed by 64 NUL bytes and outlives the call (the
        // driver copies what it loads). What the driver reads of it is the guest's: this
        // runs in the session's own worker process.
        let module = unsafe { self.load_data(copy.as_ptr().cast()) }?;
        drop(copy);
        let symbols = image::symbols(bytes);
        let local_sizes = self.module_local_sizes(module, symbols.functions.iter().cloned());
        if !symbols.complete {
            self.load_every_function(module);
        }
        let globals =
            self.module_global_bytes(module, symbols.globals.iter().map(|(n, _)| n.clone()));
        let after = free_device_memory().ok();
        let delta = match (before, after) {
            (Some(b), Some(a)) => b.saturating_sub(a),
            _ => 0,
        };
        let charged = if symbols.complete {
            module_footprint(globals, delta, bytes.len() as u64)
        } else {
            globals.max(delta)
        };
        let id = self.next_module;
        self.next_module += 1;
        self.modules.insert(
            id,
            LoadedModule {
                module,
                functions: HashMap::new(),
                signatures: HashMap::new(),
                bytes: charged,
                local_sizes,
            },
        );
        if let Some(code) = self.poison {
            return Err(cuda_error(code, "module load"));
        }
        Ok(ModuleId(id))
    }

    /// Read from the driver once (all of [`MAX_DEVICE_ATTRIBUTES`] at the first call)
    /// and kept: the device's attributes do not change.
    fn device_attributes(&mut self, count: u32) -> ExecResult<Vec<i32>> {
        let count = count.min(MAX_DEVICE_ATTRIBUTES) as usize;
        if self.attributes.len() < count {
            self.enter()?;
            let mut table = Vec::with_capacity(MAX_DEVICE_ATTRIBUTES as usize);
            for attribute in 1..=MAX_DEVICE_ATTRIBUTES as c_int {
                table.push(self.raw_device_attribute(attribute)?);
            }
            self.attributes = table;
        }
        Ok(self.attributes[..count].to_vec())
    }

    /// The driver's attributes; the parameters as the driver lays them out
    /// (`cuFuncGetParamInfo`) or, before CUDA 12.4 drivers, as the module's PTX declares
    /// them; a built-in kernel's from the catalog.
    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        self.enter()?;
        let (function, params) = match kernel {
            KernelRef::Builtin(spec) => {
                let f = *self.builtins.get(spec.name).ok_or_else(|| {
                    ExecError::new(
                        Status::KernelNotFound,
                        0,
                        format!("no built-in kernel '{}'", spec.name),
                    )
                })?;
                (f, builtin_param_layout(spec.params))
            }
            KernelRef::Module(module, name) => {
                let (f, layout) = self.module_function(module, name)?;
                let params = layout
                    .into_iter()
                    .take(MAX_FUNCTION_PARAMS)
                    .map(|(offset, size)| {
                        (
                            u32::try_from(offset).unwrap_or(u32::MAX),
                            u32::try_from(size).unwrap_or(u32::MAX),
                        )
                    })
                    .collect();
                (f, params)
            }
        };
        let attributes = self.function_attributes(function)?;
        Ok(FunctionInfo { attributes, params })
    }

    /// `cuModuleGetGlobal`; the variable is then accepted by copies and launches until
    /// its module is unloaded.
    fn module_global(&mut self, module: ModuleId, name: &str) -> ExecResult<(BufferId, u64)> {
        self.enter()?;
        let handle = self
            .modules
            .get(&module.0)
            .ok_or_else(|| ExecError::new(Status::InvalidHandle, 0, "unknown module"))?
            .module;
        let cname = CString::new(name).map_err(|_| {
            ExecError::new(
                Status::KernelNotFound,
                0,
                "variable name contains a NUL byte",
            )
        })?;
        let (mut dptr, mut bytes): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: `handle` is loaded in the current context; writes a pointer and a size.
        let r = unsafe { sys::cuModuleGetGlobal_v2(&mut dptr, &mut bytes, handle, cname.as_ptr()) };
        self.check(r, "cuModuleGetGlobal").map_err(|mut e| {
            e.message = format!("variable '{}': {}", first_line(name, 128), e.message);
            e
        })?;
        if dptr == 0 {
            return Err(ExecError::new(
                Status::Internal,
                0,
                format!("variable '{}' has no device address", first_line(name, 128)),
            ));
        }
        self.globals.insert(dptr, (bytes as u64, module.0));
        Ok((BufferId(dptr), bytes as u64))
    }

    /// NVRTC, in this process: only once [`CudaExecutor::enable_compile`] allowed it (a
    /// worker process, whose per-request CPU limit and kernel timeout bound the
    /// compilation). The program is named `/dev/null/guest.cu`, a directory that cannot
    /// exist, so that the source's quoted includes find no file beside it.
    fn compile(
        &mut self,
        source: &str,
        options: &[String],
        out_len: u32,
    ) -> ExecResult<CompileOutput> {
        if !self.compiler {
            return Err(ExecError::new(
                Status::Unsupported,
                0,
                "CUDA C++ is compiled only in executor worker processes",
            ));
        }
        nvrtc_library().map_err(|e| ExecError::new(Status::Unsupported, 0, e.to_string()))?;
        let src = CString::new(source)
            .map_err(|_| ExecError::new(Status::InvalidArgument, 0, "source contains a NUL"))?;
        let default_arch = !options.iter().any(|o| names_architecture(o));
        let mut all: Vec<String> = options.to_vec();
        if default_arch {
            all.push(format!(
                "--gpu-architecture=compute_{}{}",
                self.cc.0, self.cc.1
            ));
        }
        let mut out = guarded("NVRTC", || Ok(run_nvrtc(&src, GUEST_PROGRAM_NAME, &all)))
            .map_err(|e| ExecError::new(Status::Internal, 0, e.to_string()))?;
        if default_arch && out.code == NvrtcCode::NVRTC_ERROR_INVALID_OPTION as u32 {
            // A device newer than this NVRTC knows: its default architecture, whose PTX
            // runs on later devices.
            all.pop();
            out = guarded("NVRTC", || Ok(run_nvrtc(&src, GUEST_PROGRAM_NAME, &all)))
                .map_err(|e| ExecError::new(Status::Internal, 0, e.to_string()))?;
        }
        Ok(out.into_output(out_len as usize))
    }

    fn poisoned(&self) -> bool {
        self.poison.is_some()
    }

    /// See [`alloc_footprint`].
    fn alloc_footprint(&self, bytes: u64) -> u64 {
        alloc_footprint(bytes)
    }

    /// See [`module_footprint`]: measured when the module was loaded.
    fn module_bytes(&self, module: ModuleId) -> u64 {
        self.modules.get(&module.0).map_or(0, |m| m.bytes)
    }

    /// See [`local_footprint`].
    fn local_reservation(&mut self, kernel: KernelRef<'_>) -> ExecResult<u64> {
        self.enter()?;
        let per_thread = match kernel {
            KernelRef::Builtin(spec) => match self.builtin_local_sizes.get(spec.name) {
                Some(&size) => size,
                None => {
                    let f = *self.builtins.get(spec.name).ok_or_else(|| {
                        ExecError::new(
                            Status::KernelNotFound,
                            0,
                            format!("no built-in kernel '{}'", spec.name),
                        )
                    })?;
                    let size = self.function_local_size(f)?;
                    self.builtin_local_sizes.insert(spec.name, size);
                    size
                }
            },
            KernelRef::Module(module, name) => {
                let known = self
                    .modules
                    .get(&module.0)
                    .and_then(|m| m.local_sizes.get(name).copied());
                match known {
                    Some(size) => size,
                    None => {
                        let (f, _) = self.module_function(module, name)?;
                        let size = self.function_local_size(f)?;
                        if let Some(m) = self.modules.get_mut(&module.0) {
                            m.local_sizes.insert(name.to_string(), size);
                        }
                        size
                    }
                }
            }
        };
        Ok(local_footprint(
            per_thread,
            self.stack_bytes,
            self.resident_threads,
        ))
    }

    /// Measured once by the factory ([`CudaExecutorFactory::new`]): the device memory a
    /// context takes with the catalog loaded and its local memory reserved for a kernel
    /// without local variables, clamped to [`CONTEXT_BYTES_RANGE`].
    fn context_bytes(&self) -> u64 {
        self.context_bytes
    }

    fn htod_staged(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        data: &[u8],
    ) -> ExecResult<()> {
        self.enter()?;
        let dptr = self.span(dst, offset, data.len() as u64)?;
        let s = self.stream(stream)?;
        if data.is_empty() {
            return Ok(());
        }
        let event = match self.copy_events.get(&stream.0) {
            Some(&(e, _)) => e,
            None => {
                let mut e = ptr::null_mut();
                // SAFETY: an out-parameter; the context is current.
                let r = unsafe {
                    sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                };
                self.check(r, "cuEventCreate")?;
                self.copy_events.insert(stream.0, (e, false));
                e
            }
        };
        // SAFETY: the caller keeps `data` (page-locked staging) valid and unchanged until
        // `fence` returns; the destination lies in a live allocation (span).
        let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dptr, data.as_ptr().cast(), data.len(), s) };
        self.check(r, "cuMemcpyHtoDAsync (staged)")?;
        // SAFETY: a live event and stream of this context.
        let r = unsafe { sys::cuEventRecord(event, s) };
        self.check(r, "cuEventRecord")?;
        self.copy_events.insert(stream.0, (event, true));
        Ok(())
    }

    fn fence(&mut self) -> ExecResult<()> {
        if !self.copy_events.values().any(|&(_, pending)| pending) {
            return Ok(());
        }
        self.enter()?;
        let pending: Vec<(u64, sys::CUevent)> = self
            .copy_events
            .iter()
            .filter(|(_, &(_, pending))| pending)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        for (stream, event) in pending {
            // SAFETY: a live event of this context, recorded after the copy.
            let r = unsafe { sys::cuEventSynchronize(event) };
            self.check(r, "cuEventSynchronize (staged copies)")?;
            self.copy_events.insert(stream, (event, false));
        }
        Ok(())
    }

    fn register_host(&mut self, id: u64, mapping: &HostMapping) -> ExecResult<()> {
        if self.hosts.contains_key(&id) {
            return Err(ExecError::new(
                Status::InvalidArgument,
                0,
                format!("host buffer {id} exists"),
            ));
        }
        let map = HostMap::map(mapping).map_err(|e| {
            ExecError::new(Status::InvalidArgument, 0, format!("host buffer {id}: {e}"))
        })?;
        // SAFETY: `map` is a page-aligned mapping that stays mapped until it is
        // unregistered (`unregister_host`, `Drop`).
        unsafe { self.pin_host_memory(map.as_ptr().cast(), map.len()) }?;
        self.hosts.insert(id, map);
        Ok(())
    }

    fn unregister_host(&mut self, id: u64) {
        if let Some(map) = self.hosts.remove(&id) {
            // Copies from and to host buffers finish before they return: nothing queued
            // uses it. SAFETY: registered in `register_host` above, unmapped after.
            if let Err(e) = unsafe { self.unpin_host_memory(map.as_ptr().cast()) } {
                log::debug!("host buffer {id}: {e}");
            }
        }
    }

    fn htod_host(
        &mut self,
        stream: StreamId,
        dst: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        self.enter()?;
        let dptr = self.span(dst, offset, len)?;
        let s = self.stream(stream)?;
        let src = self.host_span(host, host_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `src` is `len` bytes of a registered host buffer, mapped until it is
        // unregistered; the destination lies in a live allocation (span).
        let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dptr, src.cast(), len as usize, s) };
        self.check(r, "cuMemcpyHtoDAsync (host buffer)")?;
        // The guest may reuse its buffer once the request completes.
        // SAFETY: `s` is a live stream of this context.
        let r = unsafe { sys::cuStreamSynchronize(s) };
        self.check(r, "cuStreamSynchronize (htod host buffer)")
    }

    fn dtoh_host(
        &mut self,
        stream: StreamId,
        src: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        self.enter()?;
        let sptr = self.span(src, offset, len)?;
        let s = self.stream(stream)?;
        let dst = self.host_span(host, host_offset, len)?;
        if len == 0 {
            return self.sync(stream);
        }
        // SAFETY: as in `htod_host`, for writing.
        let r = unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), sptr, len as usize, s) };
        self.check(r, "cuMemcpyDtoHAsync (host buffer)")?;
        // SAFETY: `s` is a live stream of this context.
        let r = unsafe { sys::cuStreamSynchronize(s) };
        self.check(r, "cuStreamSynchronize (dtoh host buffer)")
    }
}

/// A CUDA event that may be handed to the timer's thread: events belong to their context,
/// not to a thread.
#[derive(Clone, Copy)]
struct Event(sys::CUevent);

// SAFETY: a CUDA event handle may be used from any thread that makes its context current.
unsafe impl Send for Event {}

/// Device operations timed together: the events recorded before the first and after the
/// last; `None` when recording failed (the operations then count with no device time).
struct TimedUnit {
    events: Option<(Event, Event)>,
    ops: u64,
}

#[derive(Default)]
struct TimerQueue {
    units: std::collections::VecDeque<TimedUnit>,
    /// Events the thread is done with, for reuse.
    spare: Vec<Event>,
    stop: bool,
    /// The thread has ended.
    ended: bool,
}

struct TimerShared {
    queue: std::sync::Mutex<TimerQueue>,
    ready: std::sync::Condvar,
}

impl TimerShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, TimerQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Times an executor's device operations on the device, for the scheduler: consecutive
/// operations on a stream form a unit between two CUDA events (recorded before the first
/// and after the last); a thread waits for each unit's end event and reports the
/// operations it held with the device time between the events. Recording two events per
/// batch of operations, not per operation, keeps the cost off the launch path.
pub struct DeviceTimer {
    ctx: sys::CUcontext,
    shared: std::sync::Arc<TimerShared>,
    /// The unit being filled: its stream, start event and operations so far.
    open: Option<(sys::CUstream, Option<Event>, u64)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Most operations in one timed unit.
const UNIT_OPS: u64 = 64;

impl DeviceTimer {
    /// A timer for `exec`'s operations; `report(ops, device_ns)` is called from the
    /// timer's thread as units finish, in order.
    pub fn new(
        exec: &CudaExecutor,
        report: impl Fn(u64, u64) + Send + 'static,
    ) -> ExecResult<DeviceTimer> {
        let shared = std::sync::Arc::new(TimerShared {
            queue: std::sync::Mutex::new(TimerQueue::default()),
            ready: std::sync::Condvar::new(),
        });
        let ctx = Event(exec.ctx.cast());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("device-timer".into())
            .spawn(move || {
                let ctx = ctx;
                time_units(ctx.0.cast(), &thread_shared, report)
            })
            .map_err(|e| ExecError::new(Status::Internal, 0, format!("timer thread: {e}")))?;
        Ok(DeviceTimer {
            ctx: exec.ctx,
            shared,
            open: None,
            thread: Some(thread),
        })
    }

    fn event(&mut self) -> Option<Event> {
        if let Some(e) = self.shared.lock().spare.pop() {
            return Some(e);
        }
        let mut e = ptr::null_mut();
        // SAFETY: an out-parameter; the executor's context is current on this thread.
        let r = unsafe {
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32)
        };
        (r == CUresult::CUDA_SUCCESS).then_some(Event(e))
    }

    fn record(&mut self, stream: sys::CUstream) -> Option<Event> {
        let e = self.event()?;
        // SAFETY: a live event and stream of the current context.
        let r = unsafe { sys::cuEventRecord(e.0, stream) };
        if r == CUresult::CUDA_SUCCESS {
            Some(e)
        } else {
            self.shared.lock().spare.push(e);
            None
        }
    }

    /// Before a device operation on `stream` of `exec`: opens a unit unless one is open on
    /// that stream.
    pub fn before(&mut self, exec: &CudaExecutor, stream: StreamId) {
        let Ok(s) = exec.stream(stream) else {
            return;
        };
        match self.open {
            Some((open, _, _)) if open == s => return,
            Some(_) => self.close(),
            None => {}
        }
        let start = if exec.poison.is_none() && self.current() {
            self.record(s)
        } else {
            None
        };
        self.open = Some((s, start, 0));
    }

    /// After a device operation (whether or not it succeeded).
    pub fn after(&mut self) {
        let full = match &mut self.open {
            Some((_, _, ops)) => {
                *ops += 1;
                *ops >= UNIT_OPS
            }
            None => false,
        };
        if full {
            self.close();
        }
    }

    /// Whether a unit is open (operations recorded since the last [`DeviceTimer::close`]).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Ends the open unit (before the worker waits for more requests, or serves one that
    /// is no device operation) and hands it to the timer's thread.
    pub fn close(&mut self) {
        let Some((stream, start, ops)) = self.open.take() else {
            return;
        };
        let end = match start {
            Some(_) if self.current() => self.record(stream),
            _ => None,
        };
        let events = match (start, end) {
            (Some(s), Some(e)) => Some((s, e)),
            (Some(s), None) => {
                self.shared.lock().spare.push(s);
                None
            }
            _ => None,
        };
        self.shared
            .lock()
            .units
            .push_back(TimedUnit { events, ops });
        self.shared.ready.notify_one();
    }

    fn current(&self) -> bool {
        // SAFETY: the context lives as long as the executor this timer serves.
        unsafe { sys::cuCtxSetCurrent(self.ctx) == CUresult::CUDA_SUCCESS }
    }
}

impl Drop for DeviceTimer {
    fn drop(&mut self) {
        self.close();
        self.shared.lock().stop = true;
        self.shared.ready.notify_all();
        // The thread finishes the units queued; one stuck behind a kernel that never ends
        // is left to the process's exit rather than waited for.
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut q = self.shared.lock();
        while !q.ended && Instant::now() < deadline {
            q = self
                .shared
                .ready
                .wait_timeout(q, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let ended = q.ended;
        let spare = std::mem::take(&mut q.spare);
        drop(q);
        if ended {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            if self.current() {
                for e in spare {
                    // SAFETY: events of this context no thread uses any more.
                    unsafe {
                        sys::cuEventDestroy_v2(e.0);
                    }
                }
            }
        }
    }
}

/// The timer's thread: waits for each unit's end event in order and reports it.
fn time_units(ctx: sys::CUcontext, shared: &TimerShared, report: impl Fn(u64, u64)) {
    // SAFETY: the context outlives this thread's use of it (the timer waits for the
    // thread before the executor goes, unless the process is exiting).
    let current = unsafe { sys::cuCtxSetCurrent(ctx) } == CUresult::CUDA_SUCCESS;
    loop {
        let unit = {
            let mut q = shared.lock();
            loop {
                if let Some(u) = q.units.pop_front() {
                    break Some(u);
                }
                if q.stop {
                    break None;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(unit) = unit else {
            break;
        };
        let mut ns = 0;
        if let (true, Some((start, end))) = (current, unit.events) {
            // SAFETY: live events of the current context, both recorded.
            unsafe {
                if sys::cuEventSynchronize(end.0) == CUresult::CUDA_SUCCESS {
                    let mut ms = 0f32;
                    if sys::cuEventElapsedTime_v2(&mut ms, start.0, end.0) == CUresult::CUDA_SUCCESS
                    {
                        ns = (f64::from(ms) * 1e6) as u64;
                    }
                }
            }
        }
        report(unit.ops, ns);
        if let Some((start, end)) = unit.events {
            shared.lock().spare.extend([start, end]);
        }
    }
    shared.lock().ended = true;
    shared.ready.notify_all();
}

impl Drop for CudaExecutor {
    fn drop(&mut self) {
        // Host buffers are unregistered while the context lives, then unmapped.
        let ids: Vec<u64> = self.hosts.keys().copied().collect();
        for id in ids {
            Executor::unregister_host(self, id);
        }
        let ctx = self.ctx;
        let healthy = self.poison.is_none();
        let result = catch_unwind(|| {
            // SAFETY: `ctx` is live and destroyed exactly once, here; its streams, modules
            // and allocations go with it.
            unsafe {
                if healthy && sys::cuCtxSetCurrent(ctx) == CUresult::CUDA_SUCCESS {
                    let _ = sys::cuCtxSynchronize();
                }
                sys::cuCtxDestroy_v2(ctx)
            }
        });
        match result {
            Ok(CUresult::CUDA_SUCCESS) => {}
            Ok(r) => log::warn!("cuCtxDestroy: {}", error_name(r)),
            Err(_) => log::error!("cuCtxDestroy panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu_factory() -> Option<CudaExecutorFactory> {
        match CudaExecutorFactory::new(0) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("note: no usable CUDA device ({e}); GPU test skipped");
                None
            }
        }
    }

    #[test]
    fn factory_without_a_driver_is_an_error_not_a_panic() {
        let result = CudaExecutorFactory::new(0);
        if driver_library().is_err() {
            let e = result.err().expect("no driver, no factory");
            assert_eq!(e, CudaError::NoDriver);
            assert_eq!(e.to_string(), "no CUDA driver (libcuda.so.1 not found)");
        } else if let Err(e) = result {
            let e = e.to_string();
            assert!(
                !e.is_empty() && !e.contains('\n'),
                "one-line reason, got {e:?}"
            );
        }
    }

    #[test]
    fn sanity_without_a_driver_is_a_one_line_error() {
        match sanity() {
            Ok(line) => assert!(!line.contains('\n')),
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                if driver_library().is_err() {
                    assert_eq!(e.to_string(), "no CUDA driver (libcuda.so.1 not found)");
                }
            }
        }
    }

    #[test]
    fn setup_errors_say_what_failed_on_one_line() {
        use cudarc::nvrtc::sys::nvrtcResult;
        let cases = [
            (
                CudaError::Driver {
                    call: "cuInit",
                    code: CUresult::CUDA_ERROR_NO_DEVICE,
                },
                "cuInit failed: CUDA_ERROR_NO_DEVICE",
            ),
            (
                CudaError::NoSuchDevice {
                    ordinal: 2,
                    count: 1,
                },
                "no CUDA device 2 (1 present)",
            ),
            (
                CudaError::Nvrtc {
                    call: "nvrtcGetPTX",
                    code: nvrtcResult::NVRTC_ERROR_INTERNAL_ERROR,
                },
                "nvrtcGetPTX failed: NVRTC_ERROR_INTERNAL_ERROR",
            ),
            (
                CudaError::Compile {
                    code: nvrtcResult::NVRTC_ERROR_COMPILATION,
                    log: "\nvgpu.cu(3): warning: x\nvgpu.cu(7): error: expected a \";\"\n\n1 error\n"
                        .into(),
                },
                "NVRTC compile failed (NVRTC_ERROR_COMPILATION): vgpu.cu(7): error: expected a \";\"",
            ),
            (
                CudaError::Panicked {
                    what: "cuInit",
                    message: "Expected symbol in library\nmore".into(),
                },
                "cuInit: CUDA library call failed: Expected symbol in library",
            ),
            (
                CudaError::Context(cuda_error(
                    CUresult::CUDA_ERROR_OUT_OF_MEMORY,
                    "cuCtxCreate",
                )),
                "cuCtxCreate: CUDA_ERROR_OUT_OF_MEMORY",
            ),
            (
                CudaError::NulByte {
                    what: "the catalog PTX",
                },
                "the catalog PTX contains a NUL byte",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text, "{e:?}");
        }
    }

    #[test]
    fn missing_device_ordinal_is_an_error() {
        if let Ok(count) = init_driver().and_then(|()| device_count()) {
            assert!(CudaExecutorFactory::new(count).is_err());
        }
    }

    #[test]
    fn cuda_errors_map_to_protocol_statuses() {
        use CUresult::*;
        let table = [
            (CUDA_SUCCESS, Status::Ok),
            (CUDA_ERROR_OUT_OF_MEMORY, Status::OutOfMemory),
            (CUDA_ERROR_INVALID_PTX, Status::ModuleInvalid),
            (CUDA_ERROR_INVALID_IMAGE, Status::ModuleInvalid),
            (CUDA_ERROR_NO_BINARY_FOR_GPU, Status::ModuleInvalid),
            (CUDA_ERROR_UNSUPPORTED_PTX_VERSION, Status::ModuleInvalid),
            (
                CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND,
                Status::ModuleInvalid,
            ),
            (CUDA_ERROR_NOT_FOUND, Status::KernelNotFound),
            (CUDA_ERROR_INVALID_VALUE, Status::InvalidArgument),
            (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, Status::InvalidArgument),
            (CUDA_ERROR_ILLEGAL_ADDRESS, Status::LaunchFailed),
            (CUDA_ERROR_LAUNCH_FAILED, Status::LaunchFailed),
            (CUDA_ERROR_ILLEGAL_INSTRUCTION, Status::LaunchFailed),
            (CUDA_ERROR_MISALIGNED_ADDRESS, Status::LaunchFailed),
            (CUDA_ERROR_INVALID_PC, Status::LaunchFailed),
            (CUDA_ERROR_HARDWARE_STACK_ERROR, Status::LaunchFailed),
            (CUDA_ERROR_ASSERT, Status::LaunchFailed),
            (CUDA_ERROR_LAUNCH_TIMEOUT, Status::LaunchFailed),
            (CUDA_ERROR_ECC_UNCORRECTABLE, Status::LaunchFailed),
            (CUDA_ERROR_INVALID_HANDLE, Status::Internal),
            (CUDA_ERROR_NOT_READY, Status::Internal),
            (CUDA_ERROR_UNKNOWN, Status::Internal),
        ];
        for (code, status) in table {
            assert_eq!(status_for(code), status, "{code:?}");
        }
    }

    #[test]
    fn only_context_killing_errors_are_sticky() {
        use CUresult::*;
        for code in [
            CUDA_ERROR_ILLEGAL_ADDRESS,
            CUDA_ERROR_LAUNCH_FAILED,
            CUDA_ERROR_ASSERT,
            CUDA_ERROR_ECC_UNCORRECTABLE,
        ] {
            assert!(is_sticky(code), "{code:?}");
        }
        for code in [
            CUDA_SUCCESS,
            CUDA_ERROR_OUT_OF_MEMORY,
            CUDA_ERROR_INVALID_VALUE,
            CUDA_ERROR_INVALID_PTX,
            CUDA_ERROR_NOT_FOUND,
        ] {
            assert!(!is_sticky(code), "{code:?}");
        }
    }

    #[test]
    fn error_numbers_are_named_for_reports() {
        assert_eq!(error_name_of(719), "CUDA_ERROR_LAUNCH_FAILED");
        assert_eq!(error_name_of(700), "CUDA_ERROR_ILLEGAL_ADDRESS");
        assert_eq!(error_name_of(2), "CUDA_ERROR_OUT_OF_MEMORY");
        assert_eq!(error_name_of(123456), "CUDA error 123456");
    }

    #[test]
    fn cuda_error_carries_the_code_and_its_name() {
        let e = cuda_error(CUresult::CUDA_ERROR_LAUNCH_FAILED, "cuStreamSynchronize");
        assert_eq!(e.status, Status::LaunchFailed);
        assert_eq!(e.detail, 719);
        assert_eq!(e.message, "cuStreamSynchronize: CUDA_ERROR_LAUNCH_FAILED");
        assert_eq!(
            cuda_error(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS, "x").detail,
            700
        );
    }

    #[test]
    fn ptx_with_a_nul_byte_is_refused_with_its_offset() {
        let e = validate_ptx(".version 8.0\0.target sm_90").unwrap_err();
        assert_eq!(e.status, Status::ModuleInvalid);
        assert_eq!(e.message, "PTX contains a NUL byte at offset 12");
    }

    #[test]
    fn ptx_over_the_size_limit_or_empty_is_refused() {
        let big = "/".repeat(MAX_PTX_BYTES as usize + 1);
        assert_eq!(
            validate_ptx(&big).unwrap_err().status,
            Status::InvalidArgument
        );
        assert_eq!(
            validate_ptx(" \n").unwrap_err().status,
            Status::ModuleInvalid
        );
        let text = ".version 8.0\n.target sm_90\n.address_size 64\n";
        assert_eq!(validate_ptx(text).unwrap().as_bytes(), text.as_bytes());
    }

    #[test]
    fn launch_parameters_are_checked_by_count_and_size() {
        let params = [ExecParam::Buffer(BufferId(1)), ExecParam::Value(vec![0; 4])];
        assert!(check_params(&params, &[8, 4]).is_ok());
        assert_eq!(check_params(&params, &[8, 8]).unwrap_err().detail, 1);
        assert_eq!(check_params(&params, &[8]).unwrap_err().detail, 1);
        assert_eq!(check_params(&params, &[8, 4, 4]).unwrap_err().detail, 2);
        assert_eq!(check_params(&params, &[4, 4]).unwrap_err().detail, 0);
        assert_eq!(
            check_params(&params, &[8, 4, 4]).unwrap_err().status,
            Status::InvalidArgument
        );
    }

    #[test]
    fn allocations_are_charged_in_the_allocators_granules() {
        assert_eq!(alloc_footprint(0), 0);
        assert_eq!(alloc_footprint(1), 512);
        assert_eq!(alloc_footprint(512), 512);
        assert_eq!(alloc_footprint(513), 1024);
        // 20,000 one-byte allocations: about 10 MiB, not 20,000 bytes.
        assert_eq!(20_000 * alloc_footprint(1), 20_000 * 512);
        assert_eq!(alloc_footprint(1 << 20), 1 << 20);
        assert_eq!(alloc_footprint((1 << 20) + 1), 2 << 20);
        assert_eq!(alloc_footprint(3 << 20), 4 << 20);
        assert_eq!(alloc_footprint(u64::MAX - 5), u64::MAX);
    }

    #[test]
    fn a_module_is_charged_its_globals_or_what_the_device_lost_within_reason() {
        let mib = 1u64 << 20;
        // The driver's sizes when the free memory did not move (packed into pages the
        // context had).
        assert_eq!(module_footprint(4 * mib, 0, 1000), 4 * mib);
        // Whole pages when they moved.
        assert_eq!(module_footprint(4 * mib, 6 * mib, 1000), 6 * mib);
        assert_eq!(module_footprint(0, 2 * mib, 1000), 2 * mib);
        // Another process's 10 GiB allocation meanwhile is not this module's: at most its
        // globals and its code in pages, and one page more.
        assert_eq!(module_footprint(4 * mib, 10 << 30, 1000), 8 * mib);
        assert_eq!(module_footprint(0, 10 << 30, 3 * mib), 6 * mib);
        assert_eq!(module_footprint(u64::MAX, 0, 0), u64::MAX);
    }

    #[test]
    fn local_memory_is_reserved_for_every_resident_thread() {
        // An H200: 2048 threads per multiprocessor, 132 multiprocessors.
        let threads = 2048 * 132;
        assert_eq!(local_footprint(256 << 10, 0, threads), 66 << 30);
        // What the H200 showed: 16 KiB per thread grew it by 15 KiB per resident thread.
        assert_eq!(local_footprint(16 << 10, 1 << 10, threads), 3960 << 20);
        assert_eq!(local_footprint(512, 1 << 10, threads), 0);
        assert_eq!(local_footprint(0, 1 << 10, threads), 0);
        assert_eq!(local_footprint(u64::MAX, 0, 2), u64::MAX);
    }

    #[test]
    fn a_context_measurement_is_kept_within_its_sane_range() {
        assert_eq!(sane_context_bytes(Ok(500 << 20)), 500 << 20);
        assert_eq!(sane_context_bytes(Ok(1 << 20)), CONTEXT_BYTES_RANGE.0);
        assert_eq!(sane_context_bytes(Ok(100 << 30)), CONTEXT_BYTES_RANGE.1);
        assert_eq!(
            sane_context_bytes(Err(CudaError::NoDevice)),
            DEFAULT_CONTEXT_BYTES
        );
    }

    #[test]
    fn first_line_skips_blank_lines_and_truncates() {
        assert_eq!(
            first_line("\n  ptxas error: x  \nmore", 100),
            "ptxas error: x"
        );
        assert_eq!(first_line("abcdef", 3), "abc...");
    }

    #[test]
    fn gpu_round_trip_memset_and_dtod() {
        let Some(factory) = gpu_factory() else { return };
        let mut exec = factory.create_executor().expect("executor");
        let s = exec.open_stream().unwrap();
        let a = exec.alloc(4096).unwrap();
        let b = exec.alloc(4096).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        exec.htod(s, a, 0, &data).unwrap();
        exec.dtod(s, b, 0, a, 0, 4096).unwrap();
        exec.memset(s, b, 1024, 1024, 0xdead_beef, 4).unwrap();
        let mut out = vec![0u8; 4096];
        exec.dtoh(s, b, 0, &mut out).unwrap();
        assert_eq!(&out[..1024], &data[..1024]);
        assert!(out[1024..2048]
            .chunks_exact(4)
            .all(|c| c == 0xdead_beefu32.to_le_bytes()));
        assert_eq!(&out[2048..], &data[2048..]);
        assert_eq!(
            exec.htod(s, a, 4000, &data[..200]).unwrap_err().status,
            Status::OutOfRange
        );
        exec.free(a);
        exec.free(b);
        exec.close_stream(s);
    }

    #[test]
    fn options_that_name_an_architecture_are_recognised() {
        for o in [
            "--gpu-architecture=compute_90",
            "-arch=sm_80",
            "-gpu-architecture=compute_75",
            "--arch=compute_90",
        ] {
            assert!(names_architecture(o), "{o}");
        }
        for o in ["-std=c++17", "-DARCH=1", "--architecture-x", "-lineinfo"] {
            assert!(!names_architecture(o), "{o}");
        }
    }

    #[test]
    fn compiler_output_is_answered_within_the_room_there_is() {
        let run = |ptx: Option<&[u8]>, log: &[u8]| NvrtcRun {
            code: if ptx.is_some() { 0 } else { 6 },
            ptx: ptx.map(<[u8]>::to_vec),
            log: log.to_vec(),
        };
        assert_eq!(
            run(Some(b"ptx"), b"log").into_output(6),
            CompileOutput::Ptx {
                ptx: b"ptx".to_vec(),
                log: b"log".to_vec()
            }
        );
        assert_eq!(
            run(Some(b"ptx"), b"log").into_output(5),
            CompileOutput::TooLarge { needed: 6 }
        );
        assert_eq!(
            run(None, b"a long log").into_output(4),
            CompileOutput::Failed {
                code: 6,
                log: b"a lo".to_vec(),
                log_len: 10
            }
        );
    }

    /// Kernels and variables of every kind the driver-API requests deal with.
    const DRIVER_API_SOURCE: &str = r#"
__device__ unsigned int table[64];
__constant__ float scale_by;

extern "C" __global__ void store_ptr(unsigned long long *p) {
    *p = (unsigned long long)p;
}

extern "C" __global__ void bump(unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) table[i] += 1;
}

extern "C" __global__ void mixed(char c, double *out, short h, float4 v, int n) {
    if (threadIdx.x == 0) out[0] = c + h + v.x + v.w + n + scale_by;
}
"#;

    /// An executor of `factory` that may compile, and the PTX of [`DRIVER_API_SOURCE`]
    /// it compiled.
    fn compiled(factory: &CudaExecutorFactory) -> (CudaExecutor, Vec<u8>) {
        let mut exec = factory.create_executor().expect("executor");
        exec.enable_compile();
        match exec
            .compile(DRIVER_API_SOURCE, &[], 1 << 20)
            .expect("compile")
        {
            CompileOutput::Ptx { ptx, .. } => (exec, ptx),
            other => panic!("{other:?}"),
        }
    }

    /// A cubin of [`DRIVER_API_SOURCE`] for the device, from NVRTC; `None` when this
    /// NVRTC cannot make one for it.
    fn cubin_of(cc: (u16, u16)) -> Option<Vec<u8>> {
        use cudarc::nvrtc::sys as nv;
        let src = CString::new(DRIVER_API_SOURCE).unwrap();
        let prog = Program(nvrtc::create_program(&src, Some(c"cubin.cu")).ok()?);
        let arch = format!("--gpu-architecture=sm_{}{}", cc.0, cc.1);
        // SAFETY: `prog` is live; the option is a plain ASCII string.
        unsafe { nvrtc::compile_program(prog.0, &[arch.as_str()]) }.ok()?;
        let mut size = 0usize;
        // SAFETY: `prog` is live and compiled; writes one size.
        if unsafe { nv::nvrtcGetCUBINSize(prog.0, &mut size) } != nv::nvrtcResult::NVRTC_SUCCESS
            || size == 0
        {
            return None;
        }
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the `size` bytes NVRTC said it writes.
        let r = unsafe { nv::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) };
        (r == nv::nvrtcResult::NVRTC_SUCCESS).then_some(cubin)
    }

    #[test]
    fn gpu_an_allocations_address_is_what_a_kernel_sees() {
        let Some(factory) = gpu_factory() else { return };
        let (mut exec, ptx) = compiled(&factory);
        let module = exec
            .load_module(std::str::from_utf8(&ptx).unwrap())
            .unwrap();
        let s = exec.open_stream().unwrap();
        let b = store_ptr_writes_its_address(&mut exec, s, module);
        assert_ne!(b.0, 0);
        assert_eq!(b.0 % 256, 0);
    }

    /// Launches `store_ptr` of `module` on stream `s` and a fresh 8-byte buffer and checks that the kernel
    /// wrote the buffer's own address (the address the executor reports is the one a
    /// kernel sees); returns the buffer.
    fn store_ptr_writes_its_address(
        exec: &mut CudaExecutor,
        s: StreamId,
        module: ModuleId,
    ) -> BufferId {
        let b = exec.alloc(8).unwrap();
        let shape = LaunchShape {
            grid: [1, 1, 1],
            block: [1, 1, 1],
            shared_bytes: 0,
        };
        exec.launch(
            s,
            KernelRef::Module(module, "store_ptr"),
            &shape,
            &[ExecParam::Buffer(b)],
        )
        .unwrap();
        let mut out = [0u8; 8];
        exec.dtoh(s, b, 0, &mut out).unwrap();
        assert_eq!(u64::from_le_bytes(out), b.0);
        b
    }

    #[test]
    fn gpu_a_binary_image_loads_and_is_charged_its_variables() {
        let Some(factory) = gpu_factory() else { return };
        let mut exec = factory.create_executor().expect("executor");
        let cc = (factory.device().cc_major, factory.device().cc_minor);
        let image = match cubin_of(cc) {
            Some(cubin) => {
                // What the mediator reads from it before the driver does.
                assert_eq!(image::kind(&cubin), ImageKind::Elf);
                let symbols = image::symbols(&cubin);
                assert!(symbols.complete);
                for k in ["store_ptr", "bump", "mixed"] {
                    assert!(symbols.functions.iter().any(|f| f == k), "{symbols:?}");
                }
                assert!(
                    symbols.globals.contains(&("table".to_string(), 256)),
                    "{symbols:?}"
                );
                cubin
            }
            None => {
                eprintln!(
                    "note: NVRTC made no cubin for sm_{}{}; loading PTX",
                    cc.0, cc.1
                );
                let mut e = factory.create_executor().expect("executor");
                e.enable_compile();
                match e.compile(DRIVER_API_SOURCE, &[], 1 << 20).unwrap() {
                    CompileOutput::Ptx { ptx, .. } => ptx,
                    other => panic!("{other:?}"),
                }
            }
        };
        let module = exec.load_module_image(&image).unwrap();
        assert!(exec.module_bytes(module) >= 256);
        let s = exec.open_stream().unwrap();
        store_ptr_writes_its_address(&mut exec, s, module);
        // Bytes that are no image are refused as invalid, and the context serves on.
        // (A damaged cubin may make the driver read past it: the worker process is what
        // contains that, so it is not tried in the test's own process.)
        let e = exec.load_module_image(&[0xff; 64]).unwrap_err();
        assert!(
            matches!(e.status, Status::ModuleInvalid | Status::InvalidArgument),
            "{e}"
        );
        assert!(!exec.poisoned());
        let e = exec.load_module_image(&[0xb1, 0x43, 0x62, 0x46, 0, 0, 0, 0]);
        assert_eq!(e.unwrap_err().status, Status::InvalidArgument);
        exec.unload_module(module);
        exec.sync(s).unwrap();
    }

    #[test]
    fn gpu_function_info_reports_offsets_sizes_and_attributes() {
        let Some(factory) = gpu_factory() else { return };
        let (mut exec, ptx) = compiled(&factory);
        let module = exec
            .load_module(std::str::from_utf8(&ptx).unwrap())
            .unwrap();
        let info = exec
            .function_info(KernelRef::Module(module, "mixed"))
            .unwrap();
        // char, pointer, short, float4 (16-byte aligned), int.
        assert_eq!(
            info.params,
            vec![(0, 1), (8, 8), (16, 2), (32, 16), (48, 4)]
        );
        assert!(info.attributes[0] > 0, "{:?}", info.attributes);
        let e = exec
            .function_info(KernelRef::Module(module, "no_such_kernel"))
            .unwrap_err();
        assert_eq!(e.status, Status::KernelNotFound);
        let spec = vgpu_kernels::find("vector_add_f32").unwrap();
        let builtin = exec.function_info(KernelRef::Builtin(spec)).unwrap();
        assert_eq!(builtin.params, vec![(0, 8), (8, 8), (16, 8), (24, 4)]);
        assert!(builtin.attributes[0] > 0);
        assert!(
            builtin.attributes[4] > 0,
            "registers: {:?}",
            builtin.attributes
        );
    }

    #[test]
    fn gpu_a_module_variable_round_trips_through_copies() {
        let Some(factory) = gpu_factory() else { return };
        let (mut exec, ptx) = compiled(&factory);
        let module = exec
            .load_module(std::str::from_utf8(&ptx).unwrap())
            .unwrap();
        let s = exec.open_stream().unwrap();
        let (table, size) = exec.module_global(module, "table").unwrap();
        assert_eq!(size, 256);
        assert_ne!(table.0, 0);
        let data: Vec<u8> = (0..64u32).flat_map(|i| (i * 10).to_le_bytes()).collect();
        exec.htod(s, table, 0, &data).unwrap();
        let shape = LaunchShape {
            grid: [1, 1, 1],
            block: [64, 1, 1],
            shared_bytes: 0,
        };
        exec.launch(
            s,
            KernelRef::Module(module, "bump"),
            &shape,
            &[ExecParam::Value(64u32.to_le_bytes().to_vec())],
        )
        .unwrap();
        let mut out = vec![0u8; 256];
        exec.dtoh(s, table, 0, &mut out).unwrap();
        let expected: Vec<u8> = (0..64u32)
            .flat_map(|i| (i * 10 + 1).to_le_bytes())
            .collect();
        assert_eq!(out, expected);
        // Memset and device copies at offsets, bounded by its size.
        let b = exec.alloc(256).unwrap();
        exec.memset(s, table, 16, 16, 7, 4).unwrap();
        exec.dtod(s, b, 0, table, 0, 256).unwrap();
        exec.dtoh(s, b, 0, &mut out).unwrap();
        assert!(out[16..32].chunks_exact(4).all(|c| c == 7u32.to_le_bytes()));
        assert_eq!(
            exec.dtoh(s, table, 200, &mut [0u8; 57]).unwrap_err().status,
            Status::OutOfRange
        );
        // A constant, and a name the module does not have.
        assert_eq!(exec.module_global(module, "scale_by").unwrap().1, 4);
        let e = exec.module_global(module, "no_such_variable").unwrap_err();
        assert_eq!(e.status, Status::KernelNotFound);
        // Gone with its module.
        exec.unload_module(module);
        assert_eq!(
            exec.htod(s, table, 0, &data[..4]).unwrap_err().status,
            Status::InvalidHandle
        );
        exec.free(b);
        exec.sync(s).unwrap();
    }

    #[test]
    fn gpu_compile_answers_ptx_a_failure_log_or_the_room_it_needs() {
        let Some(factory) = gpu_factory() else { return };
        let mut exec = factory.create_executor().expect("executor");
        // Not in a worker process: refused.
        let e = exec.compile(DRIVER_API_SOURCE, &[], 1 << 20).unwrap_err();
        assert_eq!(e.status, Status::Unsupported);
        exec.enable_compile();
        let (ptx, log) = match exec.compile(DRIVER_API_SOURCE, &[], 1 << 20).unwrap() {
            CompileOutput::Ptx { ptx, log } => (ptx, log),
            other => panic!("{other:?}"),
        };
        let text = std::str::from_utf8(&ptx).unwrap();
        assert!(text.contains(".entry store_ptr"), "{text}");
        assert!(!ptx.contains(&0));
        // The device's own architecture unless the options name one.
        let cc = factory.device();
        let own = format!(".target sm_{}{}", cc.cc_major, cc.cc_minor);
        if !text.contains(&own) {
            eprintln!("note: NVRTC compiled for its default, not {own}");
        }
        let options = ["--gpu-architecture=compute_80".to_string()];
        match exec.compile(DRIVER_API_SOURCE, &options, 1 << 20).unwrap() {
            CompileOutput::Ptx { ptx, .. } => {
                assert!(std::str::from_utf8(&ptx).unwrap().contains(".target sm_80"))
            }
            other => panic!("{other:?}"),
        }
        // Too little room: only the size comes back.
        let needed = (ptx.len() + log.len()) as u64;
        assert_eq!(
            exec.compile(DRIVER_API_SOURCE, &[], 16).unwrap(),
            CompileOutput::TooLarge { needed }
        );
        // A compile error: NVRTC_ERROR_COMPILATION with the log.
        match exec
            .compile("__global__ void k() { undeclared(); }", &[], 1 << 16)
            .unwrap()
        {
            CompileOutput::Failed { code, log, log_len } => {
                assert_eq!(code, NvrtcCode::NVRTC_ERROR_COMPILATION as u32);
                let log = String::from_utf8(log).unwrap();
                assert!(log.contains("undeclared"), "{log}");
                assert_eq!(log_len, log.len() as u64);
            }
            other => panic!("{other:?}"),
        }
        // A quoted include finds nothing beside the source.
        match exec
            .compile("#include \"Cargo.toml\"\n", &[], 1 << 16)
            .unwrap()
        {
            CompileOutput::Failed { .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(!exec.poisoned());
    }

    #[test]
    fn gpu_device_attributes_are_the_drivers() {
        let Some(factory) = gpu_factory() else { return };
        let mut exec = factory.create_executor().expect("executor");
        let a = exec.device_attributes(MAX_DEVICE_ATTRIBUTES).unwrap();
        assert_eq!(a.len(), MAX_DEVICE_ATTRIBUTES as usize);
        let info = factory.device();
        assert_eq!(a[0], 1024, "max threads per block");
        assert_eq!(a[9], 32, "warp size");
        assert_eq!(a[15] as u32, info.multiprocessors);
        assert_eq!(a[74] as u16, info.cc_major);
        assert_eq!(a[75] as u16, info.cc_minor);
        // Numbers no driver knows yet are 0.
        assert!(a[900..].iter().all(|&v| v == 0));
        assert_eq!(exec.device_attributes(16).unwrap(), a[..16].to_vec());
    }

    #[test]
    fn gpu_bad_ptx_reports_module_invalid_with_the_jit_log() {
        let Some(factory) = gpu_factory() else { return };
        let mut exec = factory.create_executor().expect("executor");
        let e = exec
            .load_module(".version 8.0\n.target sm_90\n.address_size 64\nthis is not PTX;\n")
            .unwrap_err();
        assert_eq!(e.status, Status::ModuleInvalid, "{e}");
        assert!(!exec.poisoned());
    }
}
