// SPDX-License-Identifier: Apache-2.0
//! NVRTC's C functions against an in-process device whose "compiler" answers like the
//! host's: the library's session is set with the `test-hook` feature's `set_session`.

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr;
use std::sync::{Arc, Mutex, Once};

use vgpu::{InProcessTransport, Session};
use vgpu_nvrtc::*;
use vgpu_protocol::{Command, Request, Response, Status};

/// Every COMPILE the device got: (source, options).
static COMPILES: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());

/// A stand-in for the host's compiler: PTX with an entry per `extern "C" __global__`
/// function and a variable per `__device__ int` of the source; `#error` fails with a
/// log; `-I...` is refused with its index; a source with `NO_COMPILER` meets a device
/// that cannot compile; `#warning` puts a line in the log.
fn compile(source: &str, options: &[String], out_len: u32) -> Response {
    if source.contains("NO_COMPILER") {
        return Response::error(Status::Unsupported, 0);
    }
    if let Some(i) = options.iter().position(|o| o.starts_with("-I")) {
        return Response::error(Status::InvalidArgument, i as u32);
    }
    if source.contains("#error") {
        let log = "prog.cu(2): catastrophic error: #error directive\n";
        return Response {
            value1: log.len() as u64,
            data: log.as_bytes().to_vec(),
            ..Response::error(Status::ModuleInvalid, 6)
        };
    }
    let mut ptx = String::from(".version 9.0\n.target sm_90\n.address_size 64\n");
    let mut log = String::new();
    for line in source.lines() {
        if let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") {
            let name = rest.split('(').next().unwrap();
            ptx.push_str(&format!(".visible .entry {name}()\n{{\n\tret;\n}}\n"));
        }
        if let Some(rest) = line.strip_prefix("__device__ int ") {
            let name = rest.trim_end_matches(';');
            ptx.push_str(&format!(".visible .global .align 4 .u32 {name};\n"));
        }
        if line.starts_with("#warning") {
            log.push_str("prog.cu: warning: #warning\n");
        }
    }
    if (ptx.len() + log.len()) as u64 > out_len as u64 {
        return Response {
            value0: (ptx.len() + log.len()) as u64,
            ..Response::error(Status::BufferTooSmall, 0)
        };
    }
    let (v0, v1) = (ptx.len() as u64, log.len() as u64);
    let mut data = ptx.into_bytes();
    data.extend_from_slice(log.as_bytes());
    Response {
        value0: v0,
        value1: v1,
        ..Response::data(data)
    }
}

fn device(r: Request) -> Response {
    match r.command {
        Command::SessionOpen => Response::value(1),
        Command::Compile {
            source,
            options,
            out_len,
        } => {
            let answer = compile(&source, &options, out_len);
            COMPILES.lock().unwrap().push((source, options));
            answer
        }
        _ => Response::ok(),
    }
}

fn setup() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let t = InProcessTransport::new(Arc::new(device)).unwrap();
        set_session(Some(Session::from_transport(Box::new(t))));
    });
}

/// The COMPILE requests whose source contains `marker`.
fn compiles_with(marker: &str) -> Vec<(String, Vec<String>)> {
    let all = COMPILES.lock().unwrap();
    all.iter()
        .filter(|(s, _)| s.contains(marker))
        .cloned()
        .collect()
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// A program from `src` named `name`, with in-memory headers (include name, text).
fn create(src: &str, name: &str, headers: &[(&str, &str)]) -> nvrtcProgram {
    setup();
    let (src, name) = (c(src), c(name));
    let names: Vec<CString> = headers.iter().map(|(n, _)| c(n)).collect();
    let texts: Vec<CString> = headers.iter().map(|(_, t)| c(t)).collect();
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let text_ptrs: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr()).collect();
    let mut prog = ptr::null_mut();
    // SAFETY: every pointer is a live C string or an array of as many as said.
    let r = unsafe {
        nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            headers.len() as c_int,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    };
    assert_eq!(r, NVRTC_SUCCESS);
    assert!(!prog.is_null());
    prog
}

fn compile_with(prog: nvrtcProgram, options: &[&str]) -> nvrtcResult {
    let opts: Vec<CString> = options.iter().map(|o| c(o)).collect();
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: an array of live C strings.
    unsafe { nvrtcCompileProgram(prog, ptrs.len() as c_int, ptrs.as_ptr()) }
}

type SizeFn = unsafe extern "C" fn(nvrtcProgram, *mut usize) -> nvrtcResult;
type GetFn = unsafe extern "C" fn(nvrtcProgram, *mut c_char) -> nvrtcResult;

/// The text a size and a get function give, checked to end in its NUL.
fn fetch(prog: nvrtcProgram, size: SizeFn, get: GetFn) -> String {
    let mut n = 0usize;
    // SAFETY: a live handle, a writable size.
    assert_eq!(unsafe { size(prog, &mut n) }, NVRTC_SUCCESS);
    assert!(n >= 1);
    let mut buf = vec![0x55u8; n];
    // SAFETY: room for the n bytes the size function gave.
    assert_eq!(unsafe { get(prog, buf.as_mut_ptr().cast()) }, NVRTC_SUCCESS);
    assert_eq!(buf.pop(), Some(0));
    assert!(!buf.contains(&0));
    String::from_utf8(buf).unwrap()
}

fn ptx(prog: nvrtcProgram) -> String {
    fetch(prog, nvrtcGetPTXSize, nvrtcGetPTX)
}

fn log(prog: nvrtcProgram) -> String {
    fetch(prog, nvrtcGetProgramLogSize, nvrtcGetProgramLog)
}

fn size(prog: nvrtcProgram, f: SizeFn) -> (nvrtcResult, usize) {
    let mut n = 12345usize;
    // SAFETY: a writable size; the handle may be invalid, which the function checks.
    let r = unsafe { f(prog, &mut n) };
    (r, n)
}

fn destroy(mut prog: nvrtcProgram) {
    // SAFETY: a writable handle.
    assert_eq!(unsafe { nvrtcDestroyProgram(&mut prog) }, NVRTC_SUCCESS);
    assert!(prog.is_null());
}

fn add_name(prog: nvrtcProgram, e: &str) -> nvrtcResult {
    let e = c(e);
    // SAFETY: a live C string.
    unsafe { nvrtcAddNameExpression(prog, e.as_ptr()) }
}

fn lowered(prog: nvrtcProgram, e: &str) -> Result<String, nvrtcResult> {
    let e = c(e);
    let mut out: *const c_char = ptr::null();
    // SAFETY: a live C string and a writable pointer.
    match unsafe { nvrtcGetLoweredName(prog, e.as_ptr(), &mut out) } {
        // SAFETY: on success a string the program keeps.
        NVRTC_SUCCESS => Ok(unsafe { CStr::from_ptr(out) }.to_str().unwrap().to_string()),
        r => Err(r),
    }
}

#[test]
fn a_program_compiles_with_its_options_and_gives_ptx_and_log() {
    let src = "// marker-basic\n#warning w\nextern \"C\" __global__ void add_one(float *x)\n";
    let prog = create(src, "basic.cu", &[]);
    // Before the compile: empty PTX and log, as NVRTC gives them.
    assert_eq!(size(prog, nvrtcGetPTXSize), (NVRTC_SUCCESS, 1));
    assert_eq!(size(prog, nvrtcGetProgramLogSize), (NVRTC_SUCCESS, 1));
    let opts = [
        "--gpu-architecture=compute_90",
        "-DN=3",
        "--std=c++17",
        "-lineinfo",
    ];
    assert_eq!(compile_with(prog, &opts), NVRTC_SUCCESS);
    let text = ptx(prog);
    assert!(text.starts_with(".version 9.0\n"));
    assert!(text.contains(".visible .entry add_one()"));
    assert_eq!(log(prog), "prog.cu: warning: #warning\n");
    let sent = compiles_with("marker-basic");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, format!("#line 1 \"basic.cu\"\n{src}"));
    assert_eq!(sent[0].1, opts);
    // No CUBIN for a virtual architecture (size 0, as NVRTC says), no LTO or OptiX IR.
    assert_eq!(size(prog, nvrtcGetCUBINSize), (NVRTC_SUCCESS, 0));
    assert_eq!(size(prog, nvrtcGetLTOIRSize), (NVRTC_SUCCESS, 0));
    assert_eq!(size(prog, nvrtcGetOptiXIRSize), (NVRTC_SUCCESS, 0));
    let mut byte = 0 as c_char;
    // SAFETY: a writable byte (nothing is written).
    assert_eq!(unsafe { nvrtcGetCUBIN(prog, &mut byte) }, NVRTC_SUCCESS);
    // SAFETY: NULL is checked.
    let r = unsafe { nvrtcGetCUBIN(prog, ptr::null_mut()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
    // SAFETY: as above.
    let r = unsafe { nvrtcGetPTX(prog, ptr::null_mut()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
    // SAFETY: as above.
    let r = unsafe { nvrtcGetPTXSize(prog, ptr::null_mut()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
    // Compiled again, the same.
    assert_eq!(compile_with(prog, &[]), NVRTC_SUCCESS);
    assert!(ptx(prog).contains("add_one"));
    destroy(prog);
}

#[test]
fn in_memory_headers_are_put_into_the_source() {
    let src = "// marker-headers\n#include \"params.h\"\n#include <cuda_fp16.h>\n\
               extern \"C\" __global__ void k(float *x)\n";
    let headers = [
        (
            "params.h",
            "#pragma once\n#include <util/sq.h>\n#define N 4\n",
        ),
        ("util/sq.h", "#define SQ(x) ((x) * (x))\n"),
    ];
    let prog = create(src, "h.cu", &headers);
    assert_eq!(compile_with(prog, &[]), NVRTC_SUCCESS);
    let sent = compiles_with("marker-headers");
    assert_eq!(
        sent[0].0,
        "#line 1 \"h.cu\"\n\
         // marker-headers\n\
         #line 1 \"params.h\"\n\
         \n\
         #line 1 \"util/sq.h\"\n\
         #define SQ(x) ((x) * (x))\n\
         #line 3 \"params.h\"\n\
         #define N 4\n\
         #line 3 \"h.cu\"\n\
         #include <cuda_fp16.h>\n\
         extern \"C\" __global__ void k(float *x)\n"
    );
    destroy(prog);
}

#[test]
fn a_compile_error_gives_nvrtcs_code_and_the_log() {
    let prog = create("// marker-error\n#error stop\n", "e.cu", &[]);
    assert_eq!(add_name(prog, "k"), NVRTC_SUCCESS);
    assert_eq!(compile_with(prog, &[]), NVRTC_ERROR_COMPILATION);
    assert_eq!(
        log(prog),
        "prog.cu(2): catastrophic error: #error directive\n"
    );
    assert_eq!(size(prog, nvrtcGetPTXSize), (NVRTC_SUCCESS, 1));
    // Not compiled: no lowered names yet, and names may still be added.
    assert_eq!(
        lowered(prog, "k"),
        Err(NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION)
    );
    assert_eq!(add_name(prog, "j"), NVRTC_SUCCESS);
    destroy(prog);
}

#[test]
fn options_the_device_refuses_are_invalid_options_with_a_log() {
    let prog = create("// marker-options\n", "o.cu", &[]);
    // The host refuses include paths (its files), naming the option.
    assert_eq!(
        compile_with(prog, &["-DX", "-I/usr/local/include"]),
        NVRTC_ERROR_INVALID_OPTION
    );
    let l = log(prog);
    assert!(
        l.starts_with("nvrtc: error: option -I/usr/local/include names files"),
        "{l}"
    );
    // LTO and OptiX IR are refused here, without a request.
    let before = compiles_with("marker-options").len();
    for o in ["-dlto", "--dlink-time-opt", "--optix-ir", "-gen-opt-lto"] {
        assert_eq!(
            compile_with(prog, &["-arch=sm_90", o]),
            NVRTC_ERROR_INVALID_OPTION
        );
        assert!(log(prog).contains("compiles to PTX only"));
    }
    // So are options the request cannot carry.
    assert_eq!(
        compile_with(prog, &["-DX=\u{e9}"]),
        NVRTC_ERROR_INVALID_OPTION
    );
    assert_eq!(compile_with(prog, &[""]), NVRTC_ERROR_INVALID_OPTION);
    assert_eq!(compiles_with("marker-options").len(), before);
    // A NULL array or option.
    // SAFETY: NULL is checked.
    let r = unsafe { nvrtcCompileProgram(prog, 1, ptr::null()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_OPTION);
    let list = [ptr::null::<c_char>()];
    // SAFETY: an array of one (NULL) pointer.
    let r = unsafe { nvrtcCompileProgram(prog, 1, list.as_ptr()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_OPTION);
    destroy(prog);
}

#[test]
fn a_real_architecture_has_no_cubin_here() {
    let prog = create(
        "// marker-sm\nextern \"C\" __global__ void k(int *x)\n",
        "s.cu",
        &[],
    );
    assert_eq!(compile_with(prog, &["-arch", "sm_90"]), NVRTC_SUCCESS);
    assert!(ptx(prog).contains(".entry k"));
    assert_eq!(size(prog, nvrtcGetCUBINSize).0, NVRTC_ERROR_INVALID_INPUT);
    let mut buf = [0 as c_char; 8];
    // SAFETY: a writable buffer (nothing is written).
    let r = unsafe { nvrtcGetCUBIN(prog, buf.as_mut_ptr()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
    destroy(prog);
}

#[test]
fn name_expressions_follow_nvrtcs_rules_and_unmangled_names_are_lowered() {
    let src = "// marker-names\nextern \"C\" __global__ void scale(float *x)\n\
               __device__ int counter;\n\
               template <typename T> __global__ void tmpl(T *x) {}\n";
    let prog = create(src, "n.cu", &[]);
    assert_eq!(
        lowered(prog, "scale"),
        Err(NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION)
    );
    for e in ["scale", "&counter", "tmpl<float>", "scale"] {
        assert_eq!(add_name(prog, e), NVRTC_SUCCESS);
    }
    // SAFETY: NULL is checked.
    let r = unsafe { nvrtcAddNameExpression(prog, ptr::null()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
    assert_eq!(compile_with(prog, &[]), NVRTC_SUCCESS);
    assert_eq!(lowered(prog, "scale").as_deref(), Ok("scale"));
    assert_eq!(lowered(prog, "&counter").as_deref(), Ok("counter"));
    // Mangled names would need the host.
    assert_eq!(lowered(prog, "tmpl<float>"), Err(NVRTC_ERROR_INVALID_INPUT));
    assert_eq!(
        lowered(prog, "never_added"),
        Err(NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID)
    );
    assert_eq!(
        add_name(prog, "late"),
        NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION
    );
    let mut out: *const c_char = ptr::null();
    // SAFETY: NULL is checked.
    let r = unsafe { nvrtcGetLoweredName(prog, ptr::null(), &mut out) };
    assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
    destroy(prog);
}

#[test]
fn a_device_that_cannot_compile_is_an_internal_error_with_a_log() {
    let prog = create("// marker-cpu NO_COMPILER\n", "c.cu", &[]);
    assert_eq!(compile_with(prog, &[]), NVRTC_ERROR_INTERNAL_ERROR);
    assert!(log(prog).contains("cannot compile"));
    destroy(prog);
}

#[test]
fn handles_and_pointers_are_checked() {
    setup();
    let bogus = 0x1000 as nvrtcProgram;
    for p in [ptr::null_mut(), bogus] {
        assert_eq!(size(p, nvrtcGetPTXSize).0, NVRTC_ERROR_INVALID_PROGRAM);
        assert_eq!(
            size(p, nvrtcGetProgramLogSize).0,
            NVRTC_ERROR_INVALID_PROGRAM
        );
        assert_eq!(compile_with(p, &[]), NVRTC_ERROR_INVALID_PROGRAM);
        assert_eq!(add_name(p, "k"), NVRTC_ERROR_INVALID_PROGRAM);
    }
    // Destroying: NULL, a NULL handle, twice.
    // SAFETY: NULL is checked.
    let r = unsafe { nvrtcDestroyProgram(ptr::null_mut()) };
    assert_eq!(r, NVRTC_ERROR_INVALID_PROGRAM);
    let mut null = ptr::null_mut();
    // SAFETY: a writable handle.
    let r = unsafe { nvrtcDestroyProgram(&mut null) };
    assert_eq!(r, NVRTC_ERROR_INVALID_PROGRAM);
    let prog = create("int x;\n", "d.cu", &[]);
    let mut copy = prog;
    destroy(prog);
    // SAFETY: a writable handle (of a destroyed program).
    let r = unsafe { nvrtcDestroyProgram(&mut copy) };
    assert_eq!(r, NVRTC_ERROR_INVALID_PROGRAM);

    let src = c("int x;");
    let mut prog = ptr::null_mut();
    // SAFETY: each call's pointers are NULL or valid; NULLs are checked.
    unsafe {
        let r = nvrtcCreateProgram(
            ptr::null_mut(),
            src.as_ptr(),
            ptr::null(),
            0,
            ptr::null(),
            ptr::null(),
        );
        assert_eq!(r, NVRTC_ERROR_INVALID_PROGRAM);
        let r = nvrtcCreateProgram(
            &mut prog,
            ptr::null(),
            ptr::null(),
            0,
            ptr::null(),
            ptr::null(),
        );
        assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
        let r = nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            ptr::null(),
            -1,
            ptr::null(),
            ptr::null(),
        );
        assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
        let r = nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            ptr::null(),
            1,
            ptr::null(),
            ptr::null(),
        );
        assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
        let nulls = [ptr::null::<c_char>()];
        let r = nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            ptr::null(),
            1,
            nulls.as_ptr(),
            nulls.as_ptr(),
        );
        assert_eq!(r, NVRTC_ERROR_INVALID_INPUT);
        // No name: NVRTC's default.
        let r = nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            ptr::null(),
            0,
            ptr::null(),
            ptr::null(),
        );
        assert_eq!(r, NVRTC_SUCCESS);
    }
    assert_eq!(compile_with(prog, &[]), NVRTC_SUCCESS);
    let sent = compiles_with("#line 1 \"default_program\"\nint x;");
    assert!(!sent.is_empty());
    destroy(prog);
}

#[test]
fn version_architectures_and_stubs() {
    let (mut major, mut minor, mut n) = (0, 0, 0);
    // SAFETY: writable values; NULLs are checked.
    unsafe {
        assert_eq!(nvrtcVersion(&mut major, &mut minor), NVRTC_SUCCESS);
        assert_eq!(
            nvrtcVersion(ptr::null_mut(), &mut minor),
            NVRTC_ERROR_INVALID_INPUT
        );
        assert_eq!(nvrtcGetNumSupportedArchs(&mut n), NVRTC_SUCCESS);
        assert_eq!(
            nvrtcGetNumSupportedArchs(ptr::null_mut()),
            NVRTC_ERROR_INVALID_INPUT
        );
        assert_eq!(
            nvrtcGetSupportedArchs(ptr::null_mut()),
            NVRTC_ERROR_INVALID_INPUT
        );
    }
    assert_eq!((major, minor), (13, 0));
    let mut archs = vec![0; n as usize];
    // SAFETY: room for n values.
    let r = unsafe { nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
    assert_eq!(r, NVRTC_SUCCESS);
    assert_eq!(archs, [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]);

    let mut heap = 0usize;
    assert_eq!(nvrtcGetPCHHeapSize(&mut heap), NVRTC_ERROR_INTERNAL_ERROR);
    assert_eq!(nvrtcSetPCHHeapSize(1 << 20), NVRTC_ERROR_INTERNAL_ERROR);
    assert_eq!(
        nvrtcGetPCHCreateStatus(ptr::null_mut()),
        NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED
    );
    assert_eq!(
        nvrtcSetFlowCallback(ptr::null_mut(), ptr::null_mut(), ptr::null_mut()),
        NVRTC_ERROR_INTERNAL_ERROR
    );
    assert_eq!(STUBS.len(), 5);
}
