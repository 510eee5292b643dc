// SPDX-License-Identifier: Apache-2.0
//! Request headers, operations and their payloads.

use crate::wire::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::{
    HOST_CHUNK_SIZE, HOST_PAGE_SIZE, MAX_COMPILE_OPTIONS_BYTES, MAX_COMPILE_OUTPUT_BYTES,
    MAX_DEVICE_ATTRIBUTES, MAX_HOST_BUFFER_BYTES, MAX_HOST_CHUNKS, MAX_KERNEL_NAME,
    MAX_MODULE_IMAGE_BYTES, MAX_PARAMS, MAX_PARAM_BYTES, MAX_PTX_BYTES, MAX_TRANSFER_BYTES,
    PROTOCOL_VERSION, REQUEST_HEADER_SIZE, REQUEST_MAGIC,
};

/// Module handle that names the built-in kernel catalog in a launch.
pub const BUILTIN_MODULE: u64 = 0;
const ARGS: usize = 32;
const PARAM_DESC_SIZE: usize = 8;
const PARAM_KIND_VALUE: u32 = 0;
const PARAM_KIND_BUFFER: u32 = 1;

/// Why bytes did not decode. Each variant names the rule the input broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: {needed} bytes needed, {got} present")]
    Truncated { needed: usize, got: usize },
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("reserved flags set: {0:#x}")]
    ReservedFlags(u32),
    #[error("payload is {got} bytes, the operation needs {expected}")]
    PayloadLength { expected: u64, got: u64 },
    #[error("{0}: offset + length overflows")]
    Overflow(&'static str),
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("string is not NUL-terminated")]
    StringNotTerminated,
    #[error("string holds invalid characters")]
    InvalidString,
    #[error("PTX contains a NUL byte")]
    PtxContainsNul,
    #[error("kernel parameter layout: {0}")]
    ParamLayout(&'static str),
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("unknown status {0}")]
    UnknownStatus(u32),
}

impl DecodeError {
    /// The status a device answers with for a request that failed to decode.
    pub fn status(&self) -> crate::Status {
        match self {
            DecodeError::UnknownOpcode(_) => crate::Status::UnknownOpcode,
            DecodeError::UnsupportedVersion(_) => crate::Status::VersionMismatch,
            DecodeError::TooLarge { .. } | DecodeError::InvalidArgument(_) => {
                crate::Status::InvalidArgument
            }
            _ => crate::Status::InvalidRequest,
        }
    }
}

/// Operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    Info = 1,
    SessionOpen = 2,
    SessionClose = 3,
    Alloc = 4,
    Free = 5,
    Htod = 6,
    Dtoh = 7,
    Dtod = 8,
    Memset = 9,
    ModuleLoad = 10,
    ModuleUnload = 11,
    Launch = 12,
    Sync = 13,
    Selftest = 14,
    HostRegister = 15,
    HostUnregister = 16,
    ModuleLoadImage = 17,
    DeviceAttributes = 18,
    FunctionInfo = 19,
    ModuleGlobal = 20,
    Compile = 21,
}

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Opcode> {
        use Opcode::*;
        Some(match v {
            1 => Info,
            2 => SessionOpen,
            3 => SessionClose,
            4 => Alloc,
            5 => Free,
            6 => Htod,
            7 => Dtoh,
            8 => Dtod,
            9 => Memset,
            10 => ModuleLoad,
            11 => ModuleUnload,
            12 => Launch,
            13 => Sync,
            14 => Selftest,
            15 => HostRegister,
            16 => HostUnregister,
            17 => ModuleLoadImage,
            18 => DeviceAttributes,
            19 => FunctionInfo,
            20 => ModuleGlobal,
            21 => Compile,
            _ => return None,
        })
    }

    /// The operation's name as the protocol documentation spells it.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Info => "INFO",
            Opcode::SessionOpen => "SESSION_OPEN",
            Opcode::SessionClose => "SESSION_CLOSE",
            Opcode::Alloc => "ALLOC",
            Opcode::Free => "FREE",
            Opcode::Htod => "HTOD",
            Opcode::Dtoh => "DTOH",
            Opcode::Dtod => "DTOD",
            Opcode::Memset => "MEMSET",
            Opcode::ModuleLoad => "MODULE_LOAD",
            Opcode::ModuleUnload => "MODULE_UNLOAD",
            Opcode::Launch => "LAUNCH",
            Opcode::Sync => "SYNC",
            Opcode::Selftest => "SELFTEST",
            Opcode::HostRegister => "HOST_REGISTER",
            Opcode::HostUnregister => "HOST_UNREGISTER",
            Opcode::ModuleLoadImage => "MODULE_LOAD_IMAGE",
            Opcode::DeviceAttributes => "DEVICE_ATTRIBUTES",
            Opcode::FunctionInfo => "FUNCTION_INFO",
            Opcode::ModuleGlobal => "MODULE_GLOBAL",
            Opcode::Compile => "COMPILE",
        }
    }

    /// Whether the operation acts inside a session (the header's session must be open).
    pub fn needs_session(self) -> bool {
        !matches!(self, Opcode::Info | Opcode::SessionOpen | Opcode::Selftest)
    }
}

/// The Phase 1 self-tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SelftestKind {
    /// Vector add of 1024 elements, validated against the CPU.
    VectorAdd = 1,
    /// One line describing the device.
    DeviceInfo = 2,
}

impl SelftestKind {
    pub fn from_u32(v: u32) -> Option<SelftestKind> {
        match v {
            1 => Some(SelftestKind::VectorAdd),
            2 => Some(SelftestKind::DeviceInfo),
            _ => None,
        }
    }
}

/// Fixed launch arguments carried in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchArgs {
    /// Module handle, or [`BUILTIN_MODULE`] for the built-in catalog.
    pub module: u64,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub num_params: u16,
    /// Length of the kernel name in the payload, including its NUL.
    pub name_len: u16,
    /// Total bytes of parameter values in the payload.
    pub params_bytes: u32,
}

impl LaunchArgs {
    fn payload_len(&self) -> u64 {
        self.name_len as u64
            + self.num_params as u64 * PARAM_DESC_SIZE as u64
            + self.params_bytes as u64
    }
}

/// One operation with its fixed arguments, as decoded from a header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Info,
    SessionOpen,
    SessionClose,
    Alloc {
        size: u64,
    },
    Free {
        handle: u64,
    },
    Htod {
        dst: u64,
        offset: u64,
        len: u64,
    },
    Dtoh {
        src: u64,
        offset: u64,
        len: u64,
    },
    Dtod {
        dst: u64,
        dst_offset: u64,
        src: u64,
        src_offset: u64,
        len: u64,
    },
    Memset {
        dst: u64,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    },
    ModuleLoad {
        ptx_len: u32,
    },
    ModuleUnload {
        module: u64,
    },
    Launch(LaunchArgs),
    Sync,
    Selftest {
        test: SelftestKind,
    },
    /// A host buffer of the session (guest memory its driver handed the process by mmap)
    /// is described to the device: `chunks` (guest-physical address, length) pairs follow
    /// as the payload, `len` bytes in all. Issued by the guest driver only.
    HostRegister {
        id: u64,
        len: u64,
        chunks: u32,
    },
    /// The host buffer `id` is gone (the driver frees its pages next).
    HostUnregister {
        id: u64,
    },
    /// A module from a binary image (cubin, fatbin) of `len` bytes, the payload.
    ModuleLoadImage {
        len: u32,
    },
    /// The device's attributes 1..=`count` (`CUdevice_attribute` numbering), written as
    /// `count` little-endian `i32`; attributes the device does not know are 0.
    DeviceAttributes {
        count: u32,
    },
    /// What a kernel of `module` needs: the payload is its name and a NUL
    /// (`name_len` bytes); writes [`FunctionInfo`].
    FunctionInfo {
        module: u64,
        name_len: u16,
    },
    /// A device variable of `module` (`__device__`, `__constant__`): the payload is its
    /// name and a NUL. Answers a buffer handle for copies (freed with the module) in
    /// value0, its device address in value1, and its size as 8 written bytes.
    ModuleGlobal {
        module: u64,
        name_len: u16,
    },
    /// CUDA C++ compiled to PTX by the host's NVRTC: the payload is the source
    /// (`source_len` bytes, no NUL) then the options, each ended by a NUL
    /// (`options_len` bytes). Writes the PTX, then the compiler's log; value0 is the
    /// PTX's length, value1 the log's. `out_len` writable bytes.
    Compile {
        source_len: u32,
        options_len: u32,
        out_len: u32,
    },
}

impl Op {
    pub fn opcode(&self) -> Opcode {
        match self {
            Op::Info => Opcode::Info,
            Op::SessionOpen => Opcode::SessionOpen,
            Op::SessionClose => Opcode::SessionClose,
            Op::Alloc { .. } => Opcode::Alloc,
            Op::Free { .. } => Opcode::Free,
            Op::Htod { .. } => Opcode::Htod,
            Op::Dtoh { .. } => Opcode::Dtoh,
            Op::Dtod { .. } => Opcode::Dtod,
            Op::Memset { .. } => Opcode::Memset,
            Op::ModuleLoad { .. } => Opcode::ModuleLoad,
            Op::ModuleUnload { .. } => Opcode::ModuleUnload,
            Op::Launch(_) => Opcode::Launch,
            Op::Sync => Opcode::Sync,
            Op::Selftest { .. } => Opcode::Selftest,
            Op::HostRegister { .. } => Opcode::HostRegister,
            Op::HostUnregister { .. } => Opcode::HostUnregister,
            Op::ModuleLoadImage { .. } => Opcode::ModuleLoadImage,
            Op::DeviceAttributes { .. } => Opcode::DeviceAttributes,
            Op::FunctionInfo { .. } => Opcode::FunctionInfo,
            Op::ModuleGlobal { .. } => Opcode::ModuleGlobal,
            Op::Compile { .. } => Opcode::Compile,
        }
    }
}

/// A decoded request header: who asks, and the operation with its fixed arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub session: u64,
    pub tag: u64,
    pub op: Op,
}

impl Header {
    /// Exact number of readable payload bytes that must follow this header.
    pub fn payload_len(&self) -> u64 {
        match self.op {
            Op::Htod { len, .. } => len,
            Op::ModuleLoad { ptx_len } => ptx_len as u64,
            Op::Launch(a) => a.payload_len(),
            Op::HostRegister { chunks, .. } => chunks as u64 * HOST_CHUNK_SIZE as u64,
            Op::ModuleLoadImage { len } => len as u64,
            Op::FunctionInfo { name_len, .. } | Op::ModuleGlobal { name_len, .. } => {
                name_len as u64
            }
            Op::Compile {
                source_len,
                options_len,
                ..
            } => source_len as u64 + options_len as u64,
            _ => 0,
        }
    }

    /// Writable payload bytes the device needs ahead of the response header.
    pub fn writable_len(&self) -> u64 {
        match self.op {
            Op::Dtoh { len, .. } => len,
            Op::Info => crate::INFO_SIZE as u64,
            Op::Selftest { .. } => crate::MAX_SELFTEST_MESSAGE as u64,
            Op::DeviceAttributes { count } => 4 * count as u64,
            Op::FunctionInfo { .. } => FunctionInfo::MAX_SIZE as u64,
            Op::ModuleGlobal { .. } => 8,
            Op::Compile { out_len, .. } => out_len as u64,
            _ => 0,
        }
    }

    /// Decodes and checks a request header (the first [`REQUEST_HEADER_SIZE`] bytes).
    pub fn decode(b: &[u8]) -> Result<Header, DecodeError> {
        if b.len() < REQUEST_HEADER_SIZE {
            return Err(DecodeError::Truncated {
                needed: REQUEST_HEADER_SIZE,
                got: b.len(),
            });
        }
        let magic = u32_at(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = u16_at(b, 4);
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let raw_op = u16_at(b, 6);
        let opcode = Opcode::from_u16(raw_op).ok_or(DecodeError::UnknownOpcode(raw_op))?;
        let flags = u32_at(b, 8);
        if flags != 0 {
            return Err(DecodeError::ReservedFlags(flags));
        }
        let a = |i: usize| u64_at(b, ARGS + 8 * i);
        let a32 = |off: usize| u32_at(b, ARGS + off);
        let op = match opcode {
            Opcode::Info => Op::Info,
            Opcode::SessionOpen => Op::SessionOpen,
            Opcode::SessionClose => Op::SessionClose,
            Opcode::Alloc => Op::Alloc { size: a(0) },
            Opcode::Free => Op::Free { handle: a(0) },
            Opcode::Htod => {
                let (dst, offset, len) = (a(0), a(1), a(2));
                check_range("htod", offset, len)?;
                check_transfer(len)?;
                Op::Htod { dst, offset, len }
            }
            Opcode::Dtoh => {
                let (src, offset, len) = (a(0), a(1), a(2));
                check_range("dtoh", offset, len)?;
                check_transfer(len)?;
                Op::Dtoh { src, offset, len }
            }
            Opcode::Dtod => {
                let (dst, dst_offset, src, src_offset, len) = (a(0), a(1), a(2), a(3), a(4));
                check_range("dtod destination", dst_offset, len)?;
                check_range("dtod source", src_offset, len)?;
                Op::Dtod {
                    dst,
                    dst_offset,
                    src,
                    src_offset,
                    len,
                }
            }
            Opcode::Memset => {
                let (dst, offset, len) = (a(0), a(1), a(2));
                let (value, width) = (a32(24), a32(28));
                check_range("memset", offset, len)?;
                match width {
                    1 => {}
                    4 if offset % 4 == 0 && len % 4 == 0 => {}
                    4 => return Err(DecodeError::InvalidArgument("memset width 4 misaligned")),
                    _ => return Err(DecodeError::InvalidArgument("memset width must be 1 or 4")),
                }
                if width == 1 && value > 0xff {
                    return Err(DecodeError::InvalidArgument(
                        "memset value wider than 1 byte",
                    ));
                }
                Op::Memset {
                    dst,
                    offset,
                    len,
                    value,
                    width,
                }
            }
            Opcode::ModuleLoad => {
                let ptx_len = a32(0);
                if ptx_len == 0 {
                    return Err(DecodeError::InvalidArgument("empty PTX"));
                }
                if ptx_len > MAX_PTX_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "PTX",
                        len: ptx_len as u64,
                        max: MAX_PTX_BYTES as u64,
                    });
                }
                Op::ModuleLoad { ptx_len }
            }
            Opcode::ModuleUnload => Op::ModuleUnload { module: a(0) },
            Opcode::Launch => {
                let args = LaunchArgs {
                    module: a(0),
                    grid: [a32(8), a32(12), a32(16)],
                    block: [a32(20), a32(24), a32(28)],
                    shared_bytes: a32(32),
                    num_params: u16_at(b, ARGS + 36),
                    name_len: u16_at(b, ARGS + 38),
                    params_bytes: a32(40),
                };
                if args.name_len == 0 || args.name_len as usize > MAX_KERNEL_NAME {
                    return Err(DecodeError::TooLarge {
                        what: "kernel name",
                        len: args.name_len as u64,
                        max: MAX_KERNEL_NAME as u64,
                    });
                }
                if args.num_params as usize > MAX_PARAMS {
                    return Err(DecodeError::ParamLayout("too many parameters"));
                }
                if args.params_bytes > MAX_PARAM_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "kernel parameters",
                        len: args.params_bytes as u64,
                        max: MAX_PARAM_BYTES as u64,
                    });
                }
                Op::Launch(args)
            }
            Opcode::Sync => Op::Sync,
            Opcode::HostRegister => {
                let (id, len, chunks) = (a(0), a(1), a(2));
                if len == 0 || chunks == 0 || len % HOST_PAGE_SIZE != 0 {
                    return Err(DecodeError::InvalidArgument(
                        "host buffer: empty or not whole pages",
                    ));
                }
                if len > MAX_HOST_BUFFER_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "host buffer",
                        len,
                        max: MAX_HOST_BUFFER_BYTES,
                    });
                }
                if chunks > len / HOST_PAGE_SIZE {
                    return Err(DecodeError::InvalidArgument(
                        "host buffer: more chunks than pages",
                    ));
                }
                if chunks > MAX_HOST_CHUNKS {
                    return Err(DecodeError::TooLarge {
                        what: "host buffer chunk list",
                        len: chunks,
                        max: MAX_HOST_CHUNKS,
                    });
                }
                Op::HostRegister {
                    id,
                    len,
                    chunks: chunks as u32,
                }
            }
            Opcode::HostUnregister => Op::HostUnregister { id: a(0) },
            Opcode::ModuleLoadImage => {
                let len = a32(0);
                if len == 0 {
                    return Err(DecodeError::InvalidArgument("empty module image"));
                }
                if len > MAX_MODULE_IMAGE_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "module image",
                        len: len as u64,
                        max: MAX_MODULE_IMAGE_BYTES as u64,
                    });
                }
                Op::ModuleLoadImage { len }
            }
            Opcode::DeviceAttributes => {
                let count = a32(0);
                if count == 0 || count > MAX_DEVICE_ATTRIBUTES {
                    return Err(DecodeError::TooLarge {
                        what: "attribute count",
                        len: count as u64,
                        max: MAX_DEVICE_ATTRIBUTES as u64,
                    });
                }
                Op::DeviceAttributes { count }
            }
            Opcode::FunctionInfo | Opcode::ModuleGlobal => {
                let (module, name_len) = (a(0), u16_at(b, ARGS + 8));
                if name_len == 0 || name_len as usize > MAX_KERNEL_NAME {
                    return Err(DecodeError::TooLarge {
                        what: "symbol name",
                        len: name_len as u64,
                        max: MAX_KERNEL_NAME as u64,
                    });
                }
                if opcode == Opcode::FunctionInfo {
                    Op::FunctionInfo { module, name_len }
                } else {
                    Op::ModuleGlobal { module, name_len }
                }
            }
            Opcode::Compile => {
                let (source_len, options_len, out_len) = (a32(0), a32(4), a32(8));
                if source_len == 0 {
                    return Err(DecodeError::InvalidArgument("empty source"));
                }
                if source_len > MAX_PTX_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "source",
                        len: source_len as u64,
                        max: MAX_PTX_BYTES as u64,
                    });
                }
                if options_len > MAX_COMPILE_OPTIONS_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "compiler options",
                        len: options_len as u64,
                        max: MAX_COMPILE_OPTIONS_BYTES as u64,
                    });
                }
                if out_len > MAX_COMPILE_OUTPUT_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "compiler output",
                        len: out_len as u64,
                        max: MAX_COMPILE_OUTPUT_BYTES as u64,
                    });
                }
                Op::Compile {
                    source_len,
                    options_len,
                    out_len,
                }
            }
            Opcode::Selftest => {
                let raw = a32(0);
                Op::Selftest {
                    test: SelftestKind::from_u32(raw)
                        .ok_or(DecodeError::InvalidArgument("unknown self-test"))?,
                }
            }
        };
        Ok(Header {
            session: u64_at(b, 16),
            tag: u64_at(b, 24),
            op,
        })
    }

    /// Encodes the header. The caller appends the payload.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_SIZE] {
        let mut b = [0u8; REQUEST_HEADER_SIZE];
        put_u32(&mut b, 0, REQUEST_MAGIC);
        put_u16(&mut b, 4, PROTOCOL_VERSION);
        put_u16(&mut b, 6, self.op.opcode() as u16);
        put_u64(&mut b, 16, self.session);
        put_u64(&mut b, 24, self.tag);
        let set = |b: &mut [u8; REQUEST_HEADER_SIZE], i: usize, v: u64| put_u64(b, ARGS + 8 * i, v);
        match self.op {
            Op::Info | Op::SessionOpen | Op::SessionClose | Op::Sync => {}
            Op::Alloc { size } => set(&mut b, 0, size),
            Op::Free { handle } => set(&mut b, 0, handle),
            Op::ModuleUnload { module } => set(&mut b, 0, module),
            Op::Htod {
                dst: h,
                offset,
                len,
            }
            | Op::Dtoh {
                src: h,
                offset,
                len,
            } => {
                set(&mut b, 0, h);
                set(&mut b, 1, offset);
                set(&mut b, 2, len);
            }
            Op::Dtod {
                dst,
                dst_offset,
                src,
                src_offset,
                len,
            } => {
                set(&mut b, 0, dst);
                set(&mut b, 1, dst_offset);
                set(&mut b, 2, src);
                set(&mut b, 3, src_offset);
                set(&mut b, 4, len);
            }
            Op::Memset {
                dst,
                offset,
                len,
                value,
                width,
            } => {
                set(&mut b, 0, dst);
                set(&mut b, 1, offset);
                set(&mut b, 2, len);
                put_u32(&mut b, ARGS + 24, value);
                put_u32(&mut b, ARGS + 28, width);
            }
            Op::ModuleLoad { ptx_len } => put_u32(&mut b, ARGS, ptx_len),
            Op::Launch(l) => {
                put_u64(&mut b, ARGS, l.module);
                for i in 0..3 {
                    put_u32(&mut b, ARGS + 8 + 4 * i, l.grid[i]);
                    put_u32(&mut b, ARGS + 20 + 4 * i, l.block[i]);
                }
                put_u32(&mut b, ARGS + 32, l.shared_bytes);
                put_u16(&mut b, ARGS + 36, l.num_params);
                put_u16(&mut b, ARGS + 38, l.name_len);
                put_u32(&mut b, ARGS + 40, l.params_bytes);
            }
            Op::Selftest { test } => put_u32(&mut b, ARGS, test as u32),
            Op::HostRegister { id, len, chunks } => {
                set(&mut b, 0, id);
                set(&mut b, 1, len);
                set(&mut b, 2, chunks as u64);
            }
            Op::HostUnregister { id } => set(&mut b, 0, id),
            Op::ModuleLoadImage { len } => put_u32(&mut b, ARGS, len),
            Op::DeviceAttributes { count } => put_u32(&mut b, ARGS, count),
            Op::FunctionInfo { module, name_len } | Op::ModuleGlobal { module, name_len } => {
                set(&mut b, 0, module);
                put_u16(&mut b, ARGS + 8, name_len);
            }
            Op::Compile {
                source_len,
                options_len,
                out_len,
            } => {
                put_u32(&mut b, ARGS, source_len);
                put_u32(&mut b, ARGS + 4, options_len);
                put_u32(&mut b, ARGS + 8, out_len);
            }
        }
        b
    }
}

fn check_range(what: &'static str, offset: u64, len: u64) -> Result<(), DecodeError> {
    offset
        .checked_add(len)
        .map(|_| ())
        .ok_or(DecodeError::Overflow(what))
}

fn check_transfer(len: u64) -> Result<(), DecodeError> {
    if len > MAX_TRANSFER_BYTES {
        return Err(DecodeError::TooLarge {
            what: "transfer",
            len,
            max: MAX_TRANSFER_BYTES,
        });
    }
    Ok(())
}

/// A kernel parameter descriptor: its kind and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamDesc {
    pub kind: u32,
    pub size: u32,
}

/// One kernel parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// Raw bytes passed by value (integers, floats, small structs).
    Value(Vec<u8>),
    /// A buffer handle of the session; the device passes the buffer's device address.
    Buffer(u64),
}

impl Param {
    fn desc(&self) -> ParamDesc {
        match self {
            Param::Value(v) => ParamDesc {
                kind: PARAM_KIND_VALUE,
                size: v.len() as u32,
            },
            Param::Buffer(_) => ParamDesc {
                kind: PARAM_KIND_BUFFER,
                size: 8,
            },
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Param::Value(v) => v.clone(),
            Param::Buffer(h) => h.to_le_bytes().to_vec(),
        }
    }

    /// A by-value `u32` parameter.
    pub fn u32(v: u32) -> Param {
        Param::Value(v.to_le_bytes().to_vec())
    }

    /// A by-value `f32` parameter.
    pub fn f32(v: f32) -> Param {
        Param::Value(v.to_le_bytes().to_vec())
    }

    /// A by-value `u64` parameter.
    pub fn u64(v: u64) -> Param {
        Param::Value(v.to_le_bytes().to_vec())
    }
}

/// Number of function attributes FUNCTION_INFO answers: `CUfunction_attribute` 0 to 9
/// (max threads per block, static shared, constant and local bytes, registers, PTX and
/// binary versions, cache mode, max dynamic shared bytes, preferred shared carveout).
pub const FUNCTION_ATTRIBUTES: usize = 10;

/// What FUNCTION_INFO writes: the kernel's attributes and its parameters' layout, as the
/// driver reports them (`cuFuncGetAttribute`, `cuFuncGetParamInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionInfo {
    pub attributes: [i32; FUNCTION_ATTRIBUTES],
    /// (offset, size) of each parameter, in order.
    pub params: Vec<(u32, u32)>,
}

impl FunctionInfo {
    /// The most bytes FUNCTION_INFO writes.
    pub const MAX_SIZE: usize = 4 * FUNCTION_ATTRIBUTES + 4 + 8 * crate::MAX_FUNCTION_PARAMS;

    pub fn encode(&self) -> Vec<u8> {
        let n = self.params.len().min(crate::MAX_FUNCTION_PARAMS);
        let mut b = Vec::with_capacity(4 * FUNCTION_ATTRIBUTES + 4 + 8 * n);
        for a in self.attributes {
            b.extend_from_slice(&a.to_le_bytes());
        }
        b.extend_from_slice(&(n as u32).to_le_bytes());
        for &(offset, size) in &self.params[..n] {
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<FunctionInfo, DecodeError> {
        let head = 4 * FUNCTION_ATTRIBUTES + 4;
        if b.len() < head {
            return Err(DecodeError::Truncated {
                needed: head,
                got: b.len(),
            });
        }
        let mut info = FunctionInfo::default();
        for (i, a) in info.attributes.iter_mut().enumerate() {
            *a = u32_at(b, 4 * i) as i32;
        }
        let n = u32_at(b, 4 * FUNCTION_ATTRIBUTES) as usize;
        if n > crate::MAX_FUNCTION_PARAMS {
            return Err(DecodeError::ParamLayout("too many parameters"));
        }
        let needed = head + 8 * n;
        if b.len() < needed {
            return Err(DecodeError::Truncated {
                needed,
                got: b.len(),
            });
        }
        info.params = (0..n)
            .map(|i| (u32_at(b, head + 8 * i), u32_at(b, head + 8 * i + 4)))
            .collect();
        Ok(info)
    }
}

/// A launch with its payload decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub module: u64,
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub params: Vec<Param>,
}

/// An operation with its payload: what the mediator executes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Info,
    SessionOpen,
    SessionClose,
    Alloc {
        size: u64,
    },
    Free {
        handle: u64,
    },
    Htod {
        dst: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Dtoh {
        src: u64,
        offset: u64,
        len: u64,
    },
    Dtod {
        dst: u64,
        dst_offset: u64,
        src: u64,
        src_offset: u64,
        len: u64,
    },
    Memset {
        dst: u64,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    },
    ModuleLoad {
        ptx: String,
    },
    ModuleUnload {
        module: u64,
    },
    Launch(Launch),
    Sync,
    Selftest {
        test: SelftestKind,
    },
    /// See [`Op::HostRegister`]: the buffer's guest-physical chunks in the order of its
    /// bytes.
    HostRegister {
        id: u64,
        chunks: Vec<HostChunk>,
    },
    HostUnregister {
        id: u64,
    },
    /// See [`Op::ModuleLoadImage`].
    ModuleLoadImage {
        image: Vec<u8>,
    },
    /// See [`Op::DeviceAttributes`].
    DeviceAttributes {
        count: u32,
    },
    /// See [`Op::FunctionInfo`].
    FunctionInfo {
        module: u64,
        name: String,
    },
    /// See [`Op::ModuleGlobal`].
    ModuleGlobal {
        module: u64,
        name: String,
    },
    /// See [`Op::Compile`].
    Compile {
        source: String,
        options: Vec<String>,
        out_len: u32,
    },
}

/// One physically contiguous piece of a host buffer, in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostChunk {
    pub addr: u64,
    pub len: u64,
}

/// The chunks of a HOST_REGISTER payload, checked: whole pages that add up to `len`.
fn decode_chunks(len: u64, payload: &[u8]) -> Result<Vec<HostChunk>, DecodeError> {
    let mut chunks = Vec::with_capacity(payload.len() / HOST_CHUNK_SIZE);
    let mut total = 0u64;
    for c in payload.chunks_exact(HOST_CHUNK_SIZE) {
        let chunk = HostChunk {
            addr: u64_at(c, 0),
            len: u64_at(c, 8),
        };
        if chunk.len == 0 || chunk.addr % HOST_PAGE_SIZE != 0 || chunk.len % HOST_PAGE_SIZE != 0 {
            return Err(DecodeError::InvalidArgument(
                "host buffer chunk: empty or not whole pages",
            ));
        }
        check_range("host buffer chunk", chunk.addr, chunk.len)?;
        total = total
            .checked_add(chunk.len)
            .ok_or(DecodeError::Overflow("host buffer"))?;
        chunks.push(chunk);
    }
    if total != len {
        return Err(DecodeError::InvalidArgument(
            "host buffer: the chunks do not add up to its length",
        ));
    }
    Ok(chunks)
}

/// A complete request: header fields and the command with its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub session: u64,
    pub tag: u64,
    pub command: Command,
}

impl Request {
    pub fn new(session: u64, command: Command) -> Request {
        Request {
            session,
            tag: 0,
            command,
        }
    }

    /// The header that describes this request.
    pub fn header(&self) -> Header {
        let op = match &self.command {
            Command::Info => Op::Info,
            Command::SessionOpen => Op::SessionOpen,
            Command::SessionClose => Op::SessionClose,
            Command::Alloc { size } => Op::Alloc { size: *size },
            Command::Free { handle } => Op::Free { handle: *handle },
            Command::Htod { dst, offset, data } => Op::Htod {
                dst: *dst,
                offset: *offset,
                len: data.len() as u64,
            },
            Command::Dtoh { src, offset, len } => Op::Dtoh {
                src: *src,
                offset: *offset,
                len: *len,
            },
            Command::Dtod {
                dst,
                dst_offset,
                src,
                src_offset,
                len,
            } => Op::Dtod {
                dst: *dst,
                dst_offset: *dst_offset,
                src: *src,
                src_offset: *src_offset,
                len: *len,
            },
            Command::Memset {
                dst,
                offset,
                len,
                value,
                width,
            } => Op::Memset {
                dst: *dst,
                offset: *offset,
                len: *len,
                value: *value,
                width: *width,
            },
            Command::ModuleLoad { ptx } => Op::ModuleLoad {
                ptx_len: ptx.len() as u32,
            },
            Command::ModuleUnload { module } => Op::ModuleUnload { module: *module },
            Command::Launch(l) => Op::Launch(LaunchArgs {
                module: l.module,
                grid: l.grid,
                block: l.block,
                shared_bytes: l.shared_bytes,
                num_params: l.params.len() as u16,
                name_len: (l.kernel.len() + 1) as u16,
                params_bytes: l.params.iter().map(|p| p.desc().size).sum(),
            }),
            Command::Sync => Op::Sync,
            Command::Selftest { test } => Op::Selftest { test: *test },
            Command::HostRegister { id, chunks } => Op::HostRegister {
                id: *id,
                len: chunks.iter().map(|c| c.len).sum(),
                chunks: chunks.len() as u32,
            },
            Command::HostUnregister { id } => Op::HostUnregister { id: *id },
            Command::ModuleLoadImage { image } => Op::ModuleLoadImage {
                len: image.len() as u32,
            },
            Command::DeviceAttributes { count } => Op::DeviceAttributes { count: *count },
            Command::FunctionInfo { module, name } => Op::FunctionInfo {
                module: *module,
                name_len: (name.len() + 1) as u16,
            },
            Command::ModuleGlobal { module, name } => Op::ModuleGlobal {
                module: *module,
                name_len: (name.len() + 1) as u16,
            },
            Command::Compile {
                source,
                options,
                out_len,
            } => Op::Compile {
                source_len: source.len() as u32,
                options_len: options.iter().map(|o| o.len() as u32 + 1).sum(),
                out_len: *out_len,
            },
        };
        Header {
            session: self.session,
            tag: self.tag,
            op,
        }
    }

    /// The readable payload that follows the header.
    pub fn payload(&self) -> Vec<u8> {
        match &self.command {
            Command::Htod { data, .. } => data.clone(),
            Command::ModuleLoad { ptx } => ptx.as_bytes().to_vec(),
            Command::Launch(l) => {
                let mut p = Vec::new();
                p.extend_from_slice(l.kernel.as_bytes());
                p.push(0);
                for param in &l.params {
                    let d = param.desc();
                    p.extend_from_slice(&d.kind.to_le_bytes());
                    p.extend_from_slice(&d.size.to_le_bytes());
                }
                for param in &l.params {
                    p.extend_from_slice(&param.bytes());
                }
                p
            }
            Command::HostRegister { chunks, .. } => {
                let mut p = Vec::with_capacity(chunks.len() * HOST_CHUNK_SIZE);
                for c in chunks {
                    p.extend_from_slice(&c.addr.to_le_bytes());
                    p.extend_from_slice(&c.len.to_le_bytes());
                }
                p
            }
            Command::ModuleLoadImage { image } => image.clone(),
            Command::FunctionInfo { name, .. } | Command::ModuleGlobal { name, .. } => {
                let mut p = name.as_bytes().to_vec();
                p.push(0);
                p
            }
            Command::Compile {
                source, options, ..
            } => {
                let mut p = source.as_bytes().to_vec();
                for o in options {
                    p.extend_from_slice(o.as_bytes());
                    p.push(0);
                }
                p
            }
            _ => Vec::new(),
        }
    }

    /// Header followed by payload: the readable bytes of a chain.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.header().encode().to_vec();
        b.extend_from_slice(&self.payload());
        b
    }

    /// Decodes the readable bytes of a chain: a header and exactly its payload.
    pub fn decode(b: &[u8]) -> Result<Request, DecodeError> {
        let header = Header::decode(b)?;
        Request::from_parts(&header, &b[REQUEST_HEADER_SIZE..])
    }

    /// Builds a request from a decoded header and its readable payload, which must be
    /// exactly [`Header::payload_len`] bytes.
    pub fn from_parts(header: &Header, payload: &[u8]) -> Result<Request, DecodeError> {
        let expected = header.payload_len();
        if payload.len() as u64 != expected {
            return Err(DecodeError::PayloadLength {
                expected,
                got: payload.len() as u64,
            });
        }
        let command = match header.op {
            Op::Info => Command::Info,
            Op::SessionOpen => Command::SessionOpen,
            Op::SessionClose => Command::SessionClose,
            Op::Alloc { size } => Command::Alloc { size },
            Op::Free { handle } => Command::Free { handle },
            Op::Htod { dst, offset, .. } => Command::Htod {
                dst,
                offset,
                data: payload.to_vec(),
            },
            Op::Dtoh { src, offset, len } => Command::Dtoh { src, offset, len },
            Op::Dtod {
                dst,
                dst_offset,
                src,
                src_offset,
                len,
            } => Command::Dtod {
                dst,
                dst_offset,
                src,
                src_offset,
                len,
            },
            Op::Memset {
                dst,
                offset,
                len,
                value,
                width,
            } => Command::Memset {
                dst,
                offset,
                len,
                value,
                width,
            },
            Op::ModuleLoad { .. } => Command::ModuleLoad {
                ptx: decode_ptx(payload)?,
            },
            Op::ModuleUnload { module } => Command::ModuleUnload { module },
            Op::Launch(args) => Command::Launch(decode_launch(&args, payload)?),
            Op::Sync => Command::Sync,
            Op::Selftest { test } => Command::Selftest { test },
            Op::HostRegister { id, len, .. } => Command::HostRegister {
                id,
                chunks: decode_chunks(len, payload)?,
            },
            Op::HostUnregister { id } => Command::HostUnregister { id },
            Op::ModuleLoadImage { .. } => Command::ModuleLoadImage {
                image: payload.to_vec(),
            },
            Op::DeviceAttributes { count } => Command::DeviceAttributes { count },
            Op::FunctionInfo { module, .. } => Command::FunctionInfo {
                module,
                name: decode_symbol(payload)?,
            },
            Op::ModuleGlobal { module, .. } => Command::ModuleGlobal {
                module,
                name: decode_symbol(payload)?,
            },
            Op::Compile {
                source_len,
                out_len,
                ..
            } => {
                let (source, options) = payload.split_at(source_len as usize);
                Command::Compile {
                    source: decode_ptx(source)?,
                    options: decode_options(options)?,
                    out_len,
                }
            }
        };
        Ok(Request {
            session: header.session,
            tag: header.tag,
            command,
        })
    }
}

fn decode_ptx(payload: &[u8]) -> Result<String, DecodeError> {
    if payload.contains(&0) {
        return Err(DecodeError::PtxContainsNul);
    }
    String::from_utf8(payload.to_vec()).map_err(|_| DecodeError::InvalidString)
}

/// A NUL-terminated symbol name (a kernel's, a variable's): letters, digits, `_`, `$`,
/// `.`, as PTX allows, mangled C++ names included.
fn symbol_name(field: &[u8]) -> Result<&[u8], DecodeError> {
    match field.split_last() {
        Some((0, name)) => {
            let valid = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.');
            if name.is_empty() || !name.iter().all(valid) {
                return Err(DecodeError::InvalidString);
            }
            Ok(name)
        }
        _ => Err(DecodeError::StringNotTerminated),
    }
}

fn decode_symbol(payload: &[u8]) -> Result<String, DecodeError> {
    let name = symbol_name(payload)?;
    String::from_utf8(name.to_vec()).map_err(|_| DecodeError::InvalidString)
}

/// Compiler options: each one printable ASCII ended by a NUL.
fn decode_options(payload: &[u8]) -> Result<Vec<String>, DecodeError> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    if payload.last() != Some(&0) {
        return Err(DecodeError::StringNotTerminated);
    }
    let body = &payload[..payload.len() - 1];
    if body.len() > MAX_COMPILE_OPTIONS_BYTES as usize {
        return Err(DecodeError::InvalidArgument("compiler options too long"));
    }
    body.split(|&c| c == 0)
        .map(|o| {
            if o.is_empty() || !o.iter().all(|c| (b' '..=b'~').contains(c)) {
                return Err(DecodeError::InvalidString);
            }
            Ok(String::from_utf8(o.to_vec()).expect("printable ASCII"))
        })
        .collect()
}

fn decode_launch(args: &LaunchArgs, payload: &[u8]) -> Result<Launch, DecodeError> {
    let name_len = args.name_len as usize;
    let name = symbol_name(&payload[..name_len])?;
    let descs_end = name_len + args.num_params as usize * PARAM_DESC_SIZE;
    let descs = &payload[name_len..descs_end];
    let mut values = &payload[descs_end..];
    let mut params = Vec::with_capacity(args.num_params as usize);
    let mut total: u64 = 0;
    for d in descs.chunks_exact(PARAM_DESC_SIZE) {
        let (kind, size) = (u32_at(d, 0), u32_at(d, 4));
        if size == 0 {
            return Err(DecodeError::ParamLayout("zero-sized parameter"));
        }
        total += size as u64;
        if total > args.params_bytes as u64 {
            return Err(DecodeError::ParamLayout(
                "parameter sizes exceed the parameter bytes",
            ));
        }
        let (bytes, rest) = values.split_at(size as usize);
        values = rest;
        params.push(match kind {
            PARAM_KIND_VALUE => Param::Value(bytes.to_vec()),
            PARAM_KIND_BUFFER if size == 8 => Param::Buffer(u64_at(bytes, 0)),
            PARAM_KIND_BUFFER => {
                return Err(DecodeError::ParamLayout("a buffer parameter is 8 bytes"))
            }
            _ => return Err(DecodeError::ParamLayout("unknown parameter kind")),
        });
    }
    if total != args.params_bytes as u64 {
        return Err(DecodeError::ParamLayout(
            "parameter sizes do not add up to the parameter bytes",
        ));
    }
    Ok(Launch {
        module: args.module,
        kernel: String::from_utf8(name.to_vec()).map_err(|_| DecodeError::InvalidString)?,
        grid: args.grid,
        block: args.block,
        shared_bytes: args.shared_bytes,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn launch() -> Request {
        Request::new(
            7,
            Command::Launch(Launch {
                module: BUILTIN_MODULE,
                kernel: "vector_add_f32".into(),
                grid: [4, 1, 1],
                block: [256, 1, 1],
                shared_bytes: 0,
                params: vec![
                    Param::Buffer(1),
                    Param::Buffer(2),
                    Param::Buffer(3),
                    Param::u32(1024),
                ],
            }),
        )
    }

    #[test]
    fn host_register_round_trips_and_checks_its_chunks() {
        let chunks = vec![
            HostChunk {
                addr: 0x20_0000,
                len: 0x3000,
            },
            HostChunk {
                addr: 0x1000,
                len: 0x1000,
            },
        ];
        let r = Request::new(3, Command::HostRegister { id: 9, chunks });
        let b = r.encode();
        assert_eq!(b.len(), REQUEST_HEADER_SIZE + 2 * HOST_CHUNK_SIZE);
        assert_eq!(Request::decode(&b), Ok(r.clone()));
        let u = Request::new(3, Command::HostUnregister { id: 9 });
        assert_eq!(Request::decode(&u.encode()), Ok(u));
        // A chunk that is not whole pages, or lengths that do not add up: refused.
        let mut bad = b.clone();
        bad[REQUEST_HEADER_SIZE..REQUEST_HEADER_SIZE + 8]
            .copy_from_slice(&0x20_0100u64.to_le_bytes());
        assert!(matches!(
            Request::decode(&bad),
            Err(DecodeError::InvalidArgument(_))
        ));
        let mut header = r.header();
        header.op = Op::HostRegister {
            id: 9,
            len: 0x5000,
            chunks: 2,
        };
        let mut wrong = header.encode().to_vec();
        wrong.extend_from_slice(&b[REQUEST_HEADER_SIZE..]);
        assert!(matches!(
            Request::decode(&wrong),
            Err(DecodeError::InvalidArgument(_))
        ));
        // More chunks than pages, or than the limit, are refused from the header alone.
        let mut h = header.encode();
        h[ARGS + 16..ARGS + 24].copy_from_slice(&6u64.to_le_bytes());
        assert!(Header::decode(&h).is_err());
        header.op = Op::HostRegister {
            id: 9,
            len: (MAX_HOST_CHUNKS + 1) * HOST_PAGE_SIZE,
            chunks: (MAX_HOST_CHUNKS + 1) as u32,
        };
        assert!(matches!(
            Header::decode(&header.encode()),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn driver_api_requests_round_trip() {
        let requests = [
            Command::ModuleLoadImage {
                image: vec![0x7f, b'E', b'L', b'F', 0, 1, 2],
            },
            Command::DeviceAttributes { count: 140 },
            Command::FunctionInfo {
                module: 3,
                name: "_Z9vectorAddPKfS0_Pfi".into(),
            },
            Command::ModuleGlobal {
                module: 3,
                name: "coefficients".into(),
            },
            Command::Compile {
                source: "extern \"C\" __global__ void k() {}".into(),
                options: vec!["--gpu-architecture=compute_90".into(), "-lineinfo".into()],
                out_len: 1 << 20,
            },
            Command::Compile {
                source: "x".into(),
                options: vec![],
                out_len: 16,
            },
        ];
        for command in requests {
            let r = Request::new(5, command);
            assert_eq!(Request::decode(&r.encode()), Ok(r.clone()), "{r:?}");
        }
        let info = FunctionInfo {
            attributes: [1024, 0, 0, 0, 18, 90, 90, 0, 48 << 10, -1],
            params: vec![(0, 8), (8, 8), (16, 4)],
        };
        assert_eq!(FunctionInfo::decode(&info.encode()), Ok(info.clone()));
        assert!(FunctionInfo::decode(&info.encode()[..50]).is_err());
    }

    #[test]
    fn driver_api_requests_check_their_payloads() {
        // A symbol without its NUL, with a character no PTX name has, or empty.
        for bad in [&b"abc"[..], b"a b\0", b"\0"] {
            let mut h = Request::new(
                1,
                Command::ModuleGlobal {
                    module: 1,
                    name: "abc".into(),
                },
            )
            .header();
            h.op = Op::ModuleGlobal {
                module: 1,
                name_len: bad.len() as u16,
            };
            let mut b = h.encode().to_vec();
            b.extend_from_slice(bad);
            assert!(Request::decode(&b).is_err(), "{bad:?}");
        }
        // Options must be NUL-terminated printable text; empty images and sources, too
        // many attributes and oversized output are refused from the header.
        let mut h = Request::new(
            1,
            Command::Compile {
                source: "k".into(),
                options: vec![],
                out_len: 8,
            },
        )
        .header();
        h.op = Op::Compile {
            source_len: 1,
            options_len: 3,
            out_len: 8,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(b"k-O1");
        assert_eq!(Request::decode(&b), Err(DecodeError::StringNotTerminated));
        let mut b = h.encode().to_vec();
        b.extend_from_slice(b"k\x01\0\0");
        assert!(Request::decode(&b[..b.len() - 1]).is_err());
        for op in [
            Op::ModuleLoadImage { len: 0 },
            Op::ModuleLoadImage {
                len: MAX_MODULE_IMAGE_BYTES + 1,
            },
            Op::DeviceAttributes { count: 0 },
            Op::DeviceAttributes {
                count: MAX_DEVICE_ATTRIBUTES + 1,
            },
            Op::Compile {
                source_len: 0,
                options_len: 0,
                out_len: 8,
            },
            Op::Compile {
                source_len: 1,
                options_len: 0,
                out_len: MAX_COMPILE_OUTPUT_BYTES + 1,
            },
        ] {
            let h = Header {
                session: 1,
                tag: 1,
                op,
            };
            assert!(Header::decode(&h.encode()).is_err(), "{op:?}");
        }
    }

    #[test]
    fn launch_round_trips_with_its_layout() {
        let r = launch();
        let b = r.encode();
        assert_eq!(b.len(), REQUEST_HEADER_SIZE + 15 + 4 * 8 + 28);
        assert_eq!(Request::decode(&b), Ok(r));
    }

    #[test]
    fn truncated_header_is_rejected() {
        let b = launch().encode();
        assert_eq!(
            Request::decode(&b[..40]),
            Err(DecodeError::Truncated {
                needed: REQUEST_HEADER_SIZE,
                got: 40
            })
        );
    }

    #[test]
    fn truncated_or_overlong_payload_is_rejected() {
        let b = launch().encode();
        assert!(matches!(
            Request::decode(&b[..b.len() - 1]),
            Err(DecodeError::PayloadLength { .. })
        ));
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            Request::decode(&longer),
            Err(DecodeError::PayloadLength { .. })
        ));
    }

    #[test]
    fn unknown_opcode_and_version_and_flags_are_rejected() {
        let mut b = Request::new(1, Command::Sync).encode();
        b[6] = 99;
        assert_eq!(Request::decode(&b), Err(DecodeError::UnknownOpcode(99)));
        assert_eq!(
            DecodeError::UnknownOpcode(99).status(),
            crate::Status::UnknownOpcode
        );
        let mut b = Request::new(1, Command::Sync).encode();
        b[4] = 2;
        assert_eq!(Request::decode(&b), Err(DecodeError::UnsupportedVersion(2)));
        let mut b = Request::new(1, Command::Sync).encode();
        b[8] = 1;
        assert_eq!(Request::decode(&b), Err(DecodeError::ReservedFlags(1)));
        let mut b = Request::new(1, Command::Sync).encode();
        b[0] = 0;
        assert!(matches!(Request::decode(&b), Err(DecodeError::BadMagic(_))));
    }

    #[test]
    fn overflowing_offsets_are_rejected() {
        let r = Request::new(
            1,
            Command::Dtoh {
                src: 1,
                offset: u64::MAX - 3,
                len: 8,
            },
        );
        assert_eq!(
            Request::decode(&r.encode()),
            Err(DecodeError::Overflow("dtoh"))
        );
        let r = Request::new(
            1,
            Command::Dtod {
                dst: 1,
                dst_offset: 0,
                src: 2,
                src_offset: u64::MAX,
                len: 1,
            },
        );
        assert_eq!(
            Request::decode(&r.encode()),
            Err(DecodeError::Overflow("dtod source"))
        );
        let r = Request::new(
            1,
            Command::Memset {
                dst: 1,
                offset: u64::MAX,
                len: 2,
                value: 0,
                width: 1,
            },
        );
        assert_eq!(
            Request::decode(&r.encode()),
            Err(DecodeError::Overflow("memset"))
        );
    }

    #[test]
    fn oversized_transfer_is_rejected() {
        let r = Request::new(
            1,
            Command::Dtoh {
                src: 1,
                offset: 0,
                len: MAX_TRANSFER_BYTES + 1,
            },
        );
        assert!(matches!(
            Request::decode(&r.encode()),
            Err(DecodeError::TooLarge {
                what: "transfer",
                ..
            })
        ));
    }

    #[test]
    fn memset_width_rules_are_enforced() {
        let m = |offset, len, value, width| {
            Request::decode(
                &Request::new(
                    1,
                    Command::Memset {
                        dst: 1,
                        offset,
                        len,
                        value,
                        width,
                    },
                )
                .encode(),
            )
        };
        assert!(m(0, 8, 7, 4).is_ok());
        assert!(m(1, 3, 255, 1).is_ok());
        assert!(matches!(
            m(0, 8, 0, 2),
            Err(DecodeError::InvalidArgument(_))
        ));
        assert!(matches!(
            m(2, 8, 0, 4),
            Err(DecodeError::InvalidArgument(_))
        ));
        assert!(matches!(
            m(0, 8, 256, 1),
            Err(DecodeError::InvalidArgument(_))
        ));
    }

    #[test]
    fn ptx_with_nul_or_invalid_utf8_or_empty_is_rejected() {
        let mut b = Request::new(
            1,
            Command::ModuleLoad {
                ptx: ".version 8.0\n".into(),
            },
        )
        .encode();
        let n = b.len();
        b[n - 2] = 0;
        assert_eq!(Request::decode(&b), Err(DecodeError::PtxContainsNul));
        b[n - 2] = 0xff;
        assert_eq!(Request::decode(&b), Err(DecodeError::InvalidString));
        let empty = Request::new(1, Command::ModuleLoad { ptx: String::new() }).encode();
        assert_eq!(
            Request::decode(&empty),
            Err(DecodeError::InvalidArgument("empty PTX"))
        );
    }

    #[test]
    fn kernel_name_without_terminator_or_too_long_is_rejected() {
        let mut b = launch().encode();
        b[REQUEST_HEADER_SIZE + 14] = b'x';
        assert_eq!(Request::decode(&b), Err(DecodeError::StringNotTerminated));

        let mut r = launch();
        if let Command::Launch(l) = &mut r.command {
            l.kernel = "k".repeat(MAX_KERNEL_NAME);
        }
        assert!(matches!(
            Request::decode(&r.encode()),
            Err(DecodeError::TooLarge {
                what: "kernel name",
                ..
            })
        ));

        let mut r = launch();
        if let Command::Launch(l) = &mut r.command {
            l.kernel = "bad name".into();
        }
        assert_eq!(
            Request::decode(&r.encode()),
            Err(DecodeError::InvalidString)
        );
    }

    #[test]
    fn parameter_layouts_that_do_not_add_up_are_rejected() {
        let b = launch().encode();
        // params_bytes is at header offset 32 + 40.
        let set_params_bytes = |b: &mut Vec<u8>, v: u32| {
            b[72..76].copy_from_slice(&v.to_le_bytes());
        };
        let mut short = b.clone();
        set_params_bytes(&mut short, 27);
        short.pop();
        assert_eq!(
            Request::decode(&short),
            Err(DecodeError::ParamLayout(
                "parameter sizes exceed the parameter bytes"
            ))
        );
        let mut long = b.clone();
        set_params_bytes(&mut long, 29);
        long.push(0);
        assert_eq!(
            Request::decode(&long),
            Err(DecodeError::ParamLayout(
                "parameter sizes do not add up to the parameter bytes"
            ))
        );
        // A buffer parameter that claims 4 bytes.
        let descs = REQUEST_HEADER_SIZE + 15;
        let mut bad_buf = b.clone();
        bad_buf[descs + 4..descs + 8].copy_from_slice(&4u32.to_le_bytes());
        set_params_bytes(&mut bad_buf, 24);
        bad_buf.truncate(bad_buf.len() - 4);
        assert_eq!(
            Request::decode(&bad_buf),
            Err(DecodeError::ParamLayout("a buffer parameter is 8 bytes"))
        );
        let mut bad_kind = b.clone();
        bad_kind[descs] = 9;
        assert_eq!(
            Request::decode(&bad_kind),
            Err(DecodeError::ParamLayout("unknown parameter kind"))
        );
        let mut zero = b;
        zero[descs + 4..descs + 8].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            Request::decode(&zero),
            Err(DecodeError::ParamLayout("zero-sized parameter"))
        );
    }

    #[test]
    fn too_many_params_or_param_bytes_are_rejected() {
        let mut b = launch().encode();
        b[68..70].copy_from_slice(&(MAX_PARAMS as u16 + 1).to_le_bytes());
        assert_eq!(
            Request::decode(&b),
            Err(DecodeError::ParamLayout("too many parameters"))
        );
        let mut b = launch().encode();
        b[72..76].copy_from_slice(&(MAX_PARAM_BYTES + 1).to_le_bytes());
        assert!(matches!(
            Request::decode(&b),
            Err(DecodeError::TooLarge {
                what: "kernel parameters",
                ..
            })
        ));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[A-Za-z_][A-Za-z0-9_]{0,100}"
    }

    fn arb_param() -> impl Strategy<Value = Param> {
        prop_oneof![
            any::<u64>().prop_map(Param::Buffer),
            proptest::collection::vec(any::<u8>(), 1..32).prop_map(Param::Value),
        ]
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let small = 0u64..(1 << 40);
        prop_oneof![
            Just(Command::Info),
            Just(Command::SessionOpen),
            Just(Command::SessionClose),
            Just(Command::Sync),
            any::<u64>().prop_map(|size| Command::Alloc { size }),
            any::<u64>().prop_map(|handle| Command::Free { handle }),
            (
                any::<u64>(),
                small.clone(),
                proptest::collection::vec(any::<u8>(), 0..256)
            )
                .prop_map(|(dst, offset, data)| Command::Htod { dst, offset, data }),
            (any::<u64>(), small.clone(), 0..MAX_TRANSFER_BYTES)
                .prop_map(|(src, offset, len)| Command::Dtoh { src, offset, len }),
            (
                any::<u64>(),
                small.clone(),
                any::<u64>(),
                small.clone(),
                small.clone()
            )
                .prop_map(|(dst, dst_offset, src, src_offset, len)| Command::Dtod {
                    dst,
                    dst_offset,
                    src,
                    src_offset,
                    len
                }),
            (any::<u64>(), small.clone(), small.clone(), any::<u8>()).prop_map(
                |(dst, offset, len, v)| Command::Memset {
                    dst,
                    offset,
                    len,
                    value: v as u32,
                    width: 1
                }
            ),
            (any::<u64>(), 0u64..(1 << 30), 0u64..(1 << 30), any::<u32>()).prop_map(
                |(dst, o, l, value)| Command::Memset {
                    dst,
                    offset: o * 4,
                    len: l * 4,
                    value,
                    width: 4
                }
            ),
            "[ -~\n\t]{1,512}".prop_map(|ptx| Command::ModuleLoad { ptx }),
            any::<u64>().prop_map(|module| Command::ModuleUnload { module }),
            (
                any::<u64>(),
                arb_name(),
                any::<[u32; 3]>(),
                any::<[u32; 3]>(),
                any::<u32>(),
                proptest::collection::vec(arb_param(), 0..MAX_PARAMS)
            )
                .prop_map(|(module, kernel, grid, block, shared_bytes, params)| {
                    Command::Launch(Launch {
                        module,
                        kernel,
                        grid,
                        block,
                        shared_bytes,
                        params,
                    })
                }),
            prop_oneof![
                Just(SelftestKind::VectorAdd),
                Just(SelftestKind::DeviceInfo)
            ]
            .prop_map(|test| Command::Selftest { test }),
        ]
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity(session: u64, tag: u64, command in arb_command()) {
            let r = Request { session, tag, command };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = crate::ResponseHeader::decode(&bytes);
            let _ = crate::DeviceConfig::decode(&bytes);
            let _ = crate::InfoReply::decode(&bytes);
        }

        #[test]
        fn mutated_valid_requests_never_panic(
            command in arb_command(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut b = Request::new(1, command).encode();
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            let n = b.len();
            b.truncate(n - cut % (n / 4 + 1));
            let _ = Request::decode(&b);
        }
    }
}
