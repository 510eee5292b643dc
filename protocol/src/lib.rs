// SPDX-License-Identifier: Apache-2.0
//! `vgpu-protocol`: the wire format shared by the guest library, the guest kernel driver
//! and the host backend of the vGPU device.
//!
//! A request is one virtio descriptor chain: a readable [`REQUEST_HEADER_SIZE`]-byte
//! header, the readable payload its operation defines (host-to-device data, PTX text,
//! kernel name and parameters), the writable payload (device-to-host data, info, messages)
//! and, last, a writable [`RESPONSE_HEADER_SIZE`]-byte response header. Everything is
//! little-endian and fixed-size; `README.md` beside this crate documents every byte.
//!
//! This crate does no I/O: it only encodes and decodes, and rejects every malformed
//! input with a typed [`DecodeError`].

mod config;
mod request;
mod response;
mod status;
mod wire;

pub use config::{DeviceConfig, ExecutorKind, InfoReply, CONFIG_MAGIC, CONFIG_SIZE, INFO_SIZE};
pub use request::{
    Command, DecodeError, FunctionInfo, Header, HostChunk, Launch, LaunchArgs, Op, Opcode, Param,
    ParamDesc, Request, SelftestKind, BUILTIN_MODULE, FUNCTION_ATTRIBUTES,
};
pub use response::{Response, ResponseHeader};
pub use status::Status;

/// Version carried in every request header and in the config space.
pub const PROTOCOL_VERSION: u16 = 1;
/// First four bytes of every request header: "VGPQ".
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"VGPQ");
/// Size of the readable request header that starts every chain.
pub const REQUEST_HEADER_SIZE: usize = 80;
/// Size of the writable response header that ends every chain.
pub const RESPONSE_HEADER_SIZE: usize = 32;
/// The virtio device ID the device uses by default (assigned to pstore, never implemented).
pub const DEFAULT_VIRTIO_ID: u32 = 22;

/// Largest host-to-device or device-to-host transfer in one request.
pub const MAX_TRANSFER_BYTES: u64 = 256 << 20;
/// Largest PTX module accepted by MODULE_LOAD.
pub const MAX_PTX_BYTES: u32 = 8 << 20;
/// Largest kernel or variable name, including its terminating NUL (mangled C++ names of
/// templates run long).
pub const MAX_KERNEL_NAME: usize = 1024;
/// Largest binary module image (cubin, fatbin) MODULE_LOAD_IMAGE accepts.
pub const MAX_MODULE_IMAGE_BYTES: u32 = 64 << 20;
/// Most device attributes DEVICE_ATTRIBUTES answers.
pub const MAX_DEVICE_ATTRIBUTES: u32 = 1024;
/// Largest option list COMPILE accepts.
pub const MAX_COMPILE_OPTIONS_BYTES: u32 = 64 << 10;
/// Largest output (PTX and log) COMPILE writes.
pub const MAX_COMPILE_OUTPUT_BYTES: u32 = 64 << 20;
/// Most parameters FUNCTION_INFO describes.
pub const MAX_FUNCTION_PARAMS: usize = 2048;
/// Most parameters a launch may carry.
pub const MAX_PARAMS: usize = 64;
/// Most parameter bytes a launch may carry (CUDA's classic 4 KiB parameter limit).
pub const MAX_PARAM_BYTES: u32 = 4096;
/// Page size of host buffers: chunk addresses and lengths are multiples of it.
pub const HOST_PAGE_SIZE: u64 = 4096;
/// Bytes of one host buffer chunk in a HOST_REGISTER payload (address, length).
pub const HOST_CHUNK_SIZE: usize = 16;
/// Largest host buffer HOST_REGISTER describes.
pub const MAX_HOST_BUFFER_BYTES: u64 = 16 << 30;
/// Most chunks one HOST_REGISTER lists (a 1 MiB payload).
pub const MAX_HOST_CHUNKS: u64 = 65536;
/// Largest message a SELFTEST writes.
pub const MAX_SELFTEST_MESSAGE: usize = 256;
