// SPDX-License-Identifier: Apache-2.0
//! CUDA C++ compiled to PTX by the host's compiler (NVRTC): [`Session::compile`].
//!
//! The source travels to the host in one COMPILE request with its options; the host
//! answers with the PTX and the compiler's log. The host's compiler sees only the source:
//! options that read files of the host (`-I`, `--include-path`, `--pre-include`,
//! `-include`, precompiled headers) are refused, so whatever a source includes beyond
//! NVRTC's built-in headers must be part of it.

use std::fmt;

use log::debug;
use vgpu_protocol::{
    DecodeError, Op, Status, MAX_COMPILE_OPTIONS_BYTES, MAX_COMPILE_OUTPUT_BYTES, MAX_PTX_BYTES,
};

use crate::error::Error;
use crate::session::{Session, PAGEABLE_CHUNK_BYTES};

/// Room for the PTX and the log that a compile asks for first. When they need more, the
/// device says how much and the compile is sent once more with that.
pub const COMPILE_OUTPUT_BYTES: usize = 1 << 20;

/// What a successful compile made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// The PTX, ready for [`Session::load_module`].
    pub ptx: String,
    /// The compiler's log: warnings, often empty.
    pub log: String,
}

/// Why a compile made no PTX: the compiler rejected the source (with its log), or the
/// request failed.
#[derive(Debug)]
pub enum CompileError {
    /// The compiler rejected the source or its options.
    Failed {
        /// The compiler's `nvrtcResult` (6, NVRTC_ERROR_COMPILATION, for errors in
        /// the source; 5, NVRTC_ERROR_INVALID_OPTION, for options it does not know).
        code: u32,
        /// The compiler's log: what is wrong, and where.
        log: String,
    },
    /// The request failed: an argument the request cannot carry, an option that reads
    /// files of the host (`Error::Device` with status INVALID_ARGUMENT and the option's
    /// index as detail), a device that cannot compile (UNSUPPORTED), the transport...
    Request(Error),
}

impl CompileError {
    /// The compiler's log, when the compiler ran and rejected the source.
    pub fn log(&self) -> Option<&str> {
        match self {
            CompileError::Failed { log, .. } => Some(log),
            CompileError::Request(_) => None,
        }
    }

    /// The compiler's `nvrtcResult`, when the compiler ran and rejected the source.
    pub fn code(&self) -> Option<u32> {
        match self {
            CompileError::Failed { code, .. } => Some(*code),
            CompileError::Request(_) => None,
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompileError::Failed { code, log } if log.trim().is_empty() => {
                write!(f, "COMPILE: the compiler failed (nvrtcResult {code})")
            }
            CompileError::Failed { code, log } => write!(
                f,
                "COMPILE: the compiler failed (nvrtcResult {code}):\n{}",
                log.trim_end()
            ),
            CompileError::Request(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CompileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CompileError::Failed { .. } => None,
            CompileError::Request(e) => e.source(),
        }
    }
}

impl From<Error> for CompileError {
    fn from(e: Error) -> Self {
        CompileError::Request(e)
    }
}

/// For `?` in functions that return [`crate::Result`]: a rejected source becomes the
/// device's refusal (MODULE_INVALID with the compiler's code as detail); its log is lost,
/// so keep the [`CompileError`] where the log matters.
impl From<CompileError> for Error {
    fn from(e: CompileError) -> Self {
        match e {
            CompileError::Failed { code, .. } => Error::Device {
                op: "COMPILE",
                status: Status::ModuleInvalid,
                detail: code,
            },
            CompileError::Request(e) => e,
        }
    }
}

/// The options as the request carries them: each one printable ASCII, ended by a NUL.
fn encode_options(options: &[&str]) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    for (i, o) in options.iter().enumerate() {
        if o.is_empty() || !o.bytes().all(|c| (b' '..=b'~').contains(&c)) {
            return Err(Error::invalid(format!(
                "compiler option {i} ({o:?}): empty or not printable ASCII"
            )));
        }
        bytes.extend_from_slice(o.as_bytes());
        bytes.push(0);
    }
    if bytes.len() > MAX_COMPILE_OPTIONS_BYTES as usize {
        return Err(Error::invalid(format!(
            "{} bytes of compiler options (at most {MAX_COMPILE_OPTIONS_BYTES})",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The writable buffer of one attempt: ordinary memory, or for more than a pageable
/// request holds, host memory (few descriptors).
enum Output {
    Pageable(Vec<u8>),
    Host(crate::HostBuffer),
}

impl Output {
    fn new(session: &Session, len: usize) -> Result<Output, Error> {
        Ok(if len > PAGEABLE_CHUNK_BYTES {
            Output::Host(session.host_buffer(len)?)
        } else {
            Output::Pageable(vec![0; len])
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Output::Pageable(v) => v,
            Output::Host(h) => h.as_mut_slice(),
        }
    }
}

impl Session {
    /// Compiles CUDA C++ `source` to PTX with the host's NVRTC and `options` (NVRTC's:
    /// `--gpu-architecture=compute_90`, `-DNAME=1`, `--std=c++17`, ...). Options that
    /// read files of the host are refused (see [`CompileError::Request`]); a source the
    /// compiler rejects is [`CompileError::Failed`] with the log. When the PTX and the
    /// log do not fit in [`COMPILE_OUTPUT_BYTES`], the request is sent once more with
    /// the room the device asks for.
    pub fn compile(&self, source: &str, options: &[&str]) -> Result<Compiled, CompileError> {
        if source.is_empty() || source.len() > MAX_PTX_BYTES as usize {
            return Err(Error::invalid(format!(
                "source of {} bytes (1 to {MAX_PTX_BYTES})",
                source.len()
            ))
            .into());
        }
        if source.as_bytes().contains(&0) {
            return Err(Error::invalid("the source contains a NUL byte").into());
        }
        let opts = encode_options(options)?;
        // Too many scattered pages for one chain: stage it in contiguous memory.
        let staged = if source.len() > PAGEABLE_CHUNK_BYTES {
            let mut h = self.host_buffer(source.len())?;
            h.as_mut_slice().copy_from_slice(source.as_bytes());
            Some(h)
        } else {
            None
        };
        let src = staged
            .as_ref()
            .map_or(source.as_bytes(), |h| &h.as_slice()[..source.len()]);
        let mut out_len = COMPILE_OUTPUT_BYTES;
        let mut retried = false;
        loop {
            let op = Op::Compile {
                source_len: source.len() as u32,
                options_len: opts.len() as u32,
                out_len: out_len as u32,
            };
            let mut out = Output::new(self, out_len)?;
            let buf = out.bytes();
            let r = self.request_answer(op, &[src, &opts], &mut [&mut buf[..out_len]])?;
            let written = (r.written as usize).min(out_len);
            match r.status {
                Status::Ok => return compiled(&buf[..written], r.value0, r.value1),
                Status::ModuleInvalid => {
                    let n = usize::try_from(r.value1).map_or(written, |n| n.min(written));
                    let log = String::from_utf8_lossy(&buf[..n]).into_owned();
                    debug!("COMPILE: the compiler failed with {}", r.detail);
                    return Err(CompileError::Failed {
                        code: r.detail,
                        log,
                    });
                }
                Status::BufferTooSmall
                    if !retried
                        && r.value0 > out_len as u64
                        && r.value0 <= MAX_COMPILE_OUTPUT_BYTES as u64 =>
                {
                    debug!(
                        "COMPILE: {} bytes of output, {out_len} offered: once more",
                        r.value0
                    );
                    out_len = r.value0 as usize;
                    retried = true;
                }
                status => {
                    return Err(Error::Device {
                        op: "COMPILE",
                        status,
                        detail: r.detail,
                    }
                    .into())
                }
            }
        }
    }
}

/// The PTX (`ptx_len` bytes) and the log (`log_len` bytes) of a successful answer.
fn compiled(out: &[u8], ptx_len: u64, log_len: u64) -> Result<Compiled, CompileError> {
    let needed = ptx_len.saturating_add(log_len);
    if needed > out.len() as u64 {
        return Err(Error::ShortReply {
            op: "COMPILE",
            expected: usize::try_from(needed).unwrap_or(usize::MAX),
            written: out.len(),
        }
        .into());
    }
    let (ptx, rest) = out.split_at(ptx_len as usize);
    let ptx =
        String::from_utf8(ptx.to_vec()).map_err(|_| Error::from(DecodeError::InvalidString))?;
    if ptx.contains('\0') {
        return Err(Error::from(DecodeError::PtxContainsNul).into());
    }
    let log = String::from_utf8_lossy(&rest[..log_len as usize]).into_owned();
    Ok(Compiled { ptx, log })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vgpu_protocol::{Command, Request, Response};

    use super::*;
    use crate::fake::{AsyncDriver, FakeDevice, NVRTC_ERROR_COMPILATION};
    use crate::session::{KernelArg, LaunchConfig};
    use crate::transport::InProcessTransport;

    const KERNEL: &str = "extern \"C\" __global__ void k(float *x) { x[0] = 1.0f; }\n";

    /// The COMPILE requests the device got: (source, options, out_len).
    fn compiles(dev: &FakeDevice) -> Vec<(String, Vec<String>, u32)> {
        let st = dev.state.lock().unwrap();
        st.log
            .iter()
            .filter_map(|r| match &r.command {
                Command::Compile {
                    source,
                    options,
                    out_len,
                } => Some((source.clone(), options.clone(), *out_len)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn source_and_options_reach_the_device_and_ptx_and_log_come_back() {
        let dev = FakeDevice::new();
        let s = dev.session();
        let source = format!("#warning careful\n{KERNEL}");
        let opts = ["--gpu-architecture=compute_90", "-DN=4", "--std=c++17"];
        let c = s.compile(&source, &opts).unwrap();
        assert!(c.ptx.starts_with("//\n// fake PTX"));
        assert!(c
            .ptx
            .contains("// options: --gpu-architecture=compute_90 -DN=4 --std=c++17\n"));
        assert!(c.ptx.contains("void k(float *x)"));
        assert_eq!(c.log, "fake.cu: warning: #warning directive\n");
        let sent = compiles(&dev);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, source);
        assert_eq!(sent[0].1, opts);
        assert_eq!(sent[0].2 as usize, COMPILE_OUTPUT_BYTES);
        // No options, no log.
        let c = s.compile(KERNEL, &[]).unwrap();
        assert!(c.ptx.contains("// options: \n"));
        assert_eq!(c.log, "");
    }

    #[test]
    fn a_rejected_source_is_an_error_with_the_log() {
        let dev = FakeDevice::new();
        let s = dev.session();
        let err = s.compile("#error no\n", &[]).unwrap_err();
        assert_eq!(err.code(), Some(NVRTC_ERROR_COMPILATION));
        assert_eq!(
            err.log(),
            Some("fake.cu(1): catastrophic error: #error directive\n")
        );
        assert_eq!(
            err.to_string(),
            "COMPILE: the compiler failed (nvrtcResult 6):\n\
             fake.cu(1): catastrophic error: #error directive"
        );
        let e = Error::from(err);
        assert_eq!(e.status(), Some(Status::ModuleInvalid));
        assert_eq!(e.detail(), Some(NVRTC_ERROR_COMPILATION));
    }

    #[test]
    fn options_that_read_host_files_are_refused_with_their_index() {
        let dev = FakeDevice::new();
        let s = dev.session();
        let err = s.compile(KERNEL, &["-DX=1", "-I/usr/include"]).unwrap_err();
        assert!(err.log().is_none());
        match err {
            CompileError::Request(Error::Device {
                op: "COMPILE",
                status: Status::InvalidArgument,
                detail: 1,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn output_larger_than_the_first_buffer_is_asked_again_with_the_size_needed() {
        let dev = FakeDevice::new();
        let s = dev.session();
        // Over 1 MiB: the source is staged, and its echo in the PTX does not fit.
        let line = "// a long comment line of the source, repeated many times over\n";
        let source = line.repeat(2 * COMPILE_OUTPUT_BYTES / line.len());
        let c = s.compile(&source, &["-DBIG"]).unwrap();
        assert!(c.ptx.len() > source.len());
        let sent = compiles(&dev);
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].2 as usize, COMPILE_OUTPUT_BYTES);
        assert_eq!(sent[1].2 as usize, c.ptx.len() + c.log.len());
        assert_eq!(sent[1].0, source);
    }

    /// A session on a device that answers COMPILE with `answer(out_len)`.
    fn answering(answer: impl Fn(u32) -> Response + Send + Sync + 'static) -> Session {
        let handler = move |r: Request| match r.command {
            Command::SessionOpen => Response::value(1),
            Command::Compile { out_len, .. } => answer(out_len),
            _ => Response::ok(),
        };
        Session::from_transport(Box::new(
            InProcessTransport::new(Arc::new(handler)).unwrap(),
        ))
    }

    #[test]
    fn a_device_that_keeps_asking_for_more_is_asked_once_more_only() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let s = answering(move |out_len| {
            seen.lock().unwrap().push(out_len);
            Response {
                value0: out_len as u64 + 1,
                ..Response::error(Status::BufferTooSmall, 0)
            }
        });
        let err = Error::from(s.compile(KERNEL, &[]).unwrap_err());
        assert_eq!(err.status(), Some(Status::BufferTooSmall));
        let n = COMPILE_OUTPUT_BYTES as u32;
        assert_eq!(*asked.lock().unwrap(), [n, n + 1]);

        // More than the protocol allows is not asked for at all.
        let s = answering(|_| Response {
            value0: MAX_COMPILE_OUTPUT_BYTES as u64 + 1,
            ..Response::error(Status::BufferTooSmall, 0)
        });
        let err = Error::from(s.compile(KERNEL, &[]).unwrap_err());
        assert_eq!(err.status(), Some(Status::BufferTooSmall));
    }

    #[test]
    fn a_device_that_cannot_compile_says_unsupported() {
        let s = answering(|_| Response::error(Status::Unsupported, 0));
        let err = s.compile(KERNEL, &[]).unwrap_err();
        assert!(matches!(
            err,
            CompileError::Request(Error::Device {
                status: Status::Unsupported,
                ..
            })
        ));
        assert_eq!(
            err.to_string(),
            "COMPILE: device returned UNSUPPORTED (detail 0)"
        );
    }

    #[test]
    fn lengths_past_what_was_written_are_a_short_reply() {
        let s = answering(|_| Response {
            value0: 100,
            value1: 0,
            ..Response::data(vec![b'x'; 10])
        });
        let err = Error::from(s.compile(KERNEL, &[]).unwrap_err());
        assert!(matches!(err, Error::ShortReply { op: "COMPILE", .. }));
    }

    #[test]
    fn bad_sources_and_options_are_refused_before_sending() {
        let dev = FakeDevice::new();
        let s = dev.session();
        let big = "x".repeat(MAX_PTX_BYTES as usize + 1);
        let long_option = "-D".to_string() + &"X".repeat(MAX_COMPILE_OPTIONS_BYTES as usize);
        let cases: [(&str, &[&str]); 6] = [
            ("", &[]),
            ("int a;\0", &[]),
            (&big, &[]),
            (KERNEL, &[""]),
            (KERNEL, &["-DX=\u{e9}"]),
            (KERNEL, &[&long_option]),
        ];
        for (source, options) in cases {
            let err = s.compile(source, options).unwrap_err();
            assert!(
                matches!(err, CompileError::Request(Error::InvalidArgument(_))),
                "{err:?}"
            );
        }
        assert!(compiles(&dev).is_empty());
    }

    #[test]
    fn an_earlier_asynchronous_failure_is_reported_by_the_compile() {
        let dev = FakeDevice::new();
        let s = Session::from_transport(Box::new(AsyncDriver::new(dev.transport())));
        let cfg = LaunchConfig::for_num_elems(1);
        s.launch(&s.builtin(), "no_such_kernel", cfg, &[KernelArg::U32(1)])
            .unwrap();
        let err = Error::from(s.compile(KERNEL, &[]).unwrap_err());
        assert!(matches!(
            err,
            Error::Device {
                op: "LAUNCH",
                status: Status::KernelNotFound,
                ..
            }
        ));
        // Reported once: the next compile is its own.
        s.compile(KERNEL, &[]).unwrap();
        assert_eq!(compiles(&dev).len(), 2);
    }
}
