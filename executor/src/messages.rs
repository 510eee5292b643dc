// SPDX-License-Identifier: Apache-2.0
//! Message parts both executor channels carry: the worker-process channel
//! ([`crate::process`]) and the link to a worker host ([`crate::remote`]). Encoded with
//! postcard; byte strings go as one length and the bytes.

use serde::{Deserialize, Serialize};
use vgpu_protocol::{Status, FUNCTION_ATTRIBUTES};

use crate::executor::{CompileOutput, ExecError, ExecResult, KernelRef, ModuleId};

/// The kernel a launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireKernel<'a> {
    Builtin { name: &'a str },
    Module { module: u64, name: &'a str },
}

impl<'a> From<&KernelRef<'a>> for WireKernel<'a> {
    fn from(kernel: &KernelRef<'a>) -> WireKernel<'a> {
        match *kernel {
            KernelRef::Builtin(spec) => WireKernel::Builtin { name: spec.name },
            KernelRef::Module(m, name) => WireKernel::Module { module: m.0, name },
        }
    }
}

impl<'a> WireKernel<'a> {
    /// The kernel it names: a built-in kernel by name (`KERNEL_NOT_FOUND` when the catalog
    /// has none of that name), or a module's.
    pub fn resolve(self) -> ExecResult<KernelRef<'a>> {
        match self {
            WireKernel::Builtin { name } => vgpu_kernels::find(name)
                .map(KernelRef::Builtin)
                .ok_or_else(|| {
                    ExecError::new(
                        Status::KernelNotFound,
                        0,
                        format!("no built-in kernel '{name}'"),
                    )
                }),
            WireKernel::Module { module, name } => Ok(KernelRef::Module(ModuleId(module), name)),
        }
    }
}

/// A launch parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireParam<'a> {
    Value(#[serde(serialize_with = "as_bytes")] &'a [u8]),
    Buffer(u64),
}

/// Writes a byte slice as one byte string (length and bytes), not as a sequence of `u8`.
pub fn as_bytes<S: serde::Serializer>(v: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

/// Owned bytes as one byte string (a length and the bytes, copied at once), not as
/// serde's sequence of `u8`, which costs a call per byte each way. The encoding is the
/// same in postcard; only the speed differs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

/// An [`ExecError`] on the wire; the status as its protocol number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub status: u32,
    pub detail: u32,
    pub message: String,
}

impl From<&ExecError> for WireError {
    fn from(e: &ExecError) -> WireError {
        WireError {
            status: e.status as u32,
            detail: e.detail,
            message: e.message.clone(),
        }
    }
}

impl From<WireError> for ExecError {
    fn from(e: WireError) -> ExecError {
        let status = Status::from_u32(e.status).unwrap_or(Status::Internal);
        ExecError::new(status, e.detail, e.message)
    }
}

/// The answer to a request that asks for more than a number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireAnswer {
    /// [`crate::Executor::device_attributes`].
    Attributes(Vec<i32>),
    /// [`crate::Executor::function_info`].
    Function {
        attributes: [i32; FUNCTION_ATTRIBUTES],
        params: Vec<(u32, u32)>,
    },
    /// [`crate::Executor::module_global`]: its device address and size.
    Global {
        address: u64,
        size: u64,
    },
    /// [`crate::Executor::compile`], by its variants.
    Compiled {
        ptx: Bytes,
        log: Bytes,
    },
    CompileFailed {
        code: u32,
        log: Bytes,
        log_len: u64,
    },
    CompileTooLarge {
        needed: u64,
    },
}

impl WireAnswer {
    /// The compilation's output, for the compile variants.
    pub fn into_compile_output(self) -> Option<CompileOutput> {
        Some(match self {
            WireAnswer::Compiled { ptx, log } => CompileOutput::Ptx {
                ptx: ptx.0,
                log: log.0,
            },
            WireAnswer::CompileFailed { code, log, log_len } => CompileOutput::Failed {
                code,
                log: log.0,
                log_len,
            },
            WireAnswer::CompileTooLarge { needed } => CompileOutput::TooLarge { needed },
            _ => return None,
        })
    }

    /// Bytes it holds, for bounding what waits to be read.
    pub fn bytes(&self) -> usize {
        match self {
            WireAnswer::Compiled { ptx, log } => ptx.0.len() + log.0.len(),
            WireAnswer::CompileFailed { log, .. } => log.0.len(),
            WireAnswer::Attributes(a) => a.len() * 4,
            WireAnswer::Function { params, .. } => params.len() * 8,
            _ => 0,
        }
    }
}

impl From<CompileOutput> for WireAnswer {
    fn from(c: CompileOutput) -> WireAnswer {
        match c {
            CompileOutput::Ptx { ptx, log } => WireAnswer::Compiled {
                ptx: Bytes(ptx),
                log: Bytes(log),
            },
            CompileOutput::Failed { code, log, log_len } => WireAnswer::CompileFailed {
                code,
                log: Bytes(log),
                log_len,
            },
            CompileOutput::TooLarge { needed } => WireAnswer::CompileTooLarge { needed },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_encode_as_a_sequence_of_u8_does_only_faster() {
        let v: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let fast = postcard::to_stdvec(&Bytes(v.clone())).unwrap();
        assert_eq!(fast, postcard::to_stdvec(&v).unwrap());
        assert_eq!(postcard::from_bytes::<Bytes>(&fast).unwrap(), Bytes(v));
    }
}
