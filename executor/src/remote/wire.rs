// SPDX-License-Identifier: Apache-2.0
//! The messages between a mediator and a worker host, encoded with postcard inside the
//! link's encrypted records ([`super::link`]).

use serde::{Deserialize, Serialize};
use vgpu_protocol::{
    ExecutorKind, MAX_COMPILE_OUTPUT_BYTES, MAX_MODULE_IMAGE_BYTES, MAX_PTX_BYTES,
};

use crate::executor::DeviceInfo;
pub use crate::messages::{as_bytes, Bytes, WireAnswer, WireError, WireKernel, WireParam};

/// Largest piece of a copy in one message.
pub const PIECE: usize = 4 << 20;
/// Largest message a worker accepts: a module load of the largest PTX or binary image,
/// or a compilation's source and options, with room for the rest of the message.
pub const MAX_REQUEST: usize = max(
    max(MAX_PTX_BYTES as usize, MAX_MODULE_IMAGE_BYTES as usize),
    PIECE,
) + (64 << 10);
/// Largest message a mediator accepts: a compilation's output or a copy's piece, with
/// room for the rest of the message.
pub const MAX_REPLY: usize = max(MAX_COMPILE_OUTPUT_BYTES as usize, PIECE) + (64 << 10);

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// What the worker says about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// The worker's release (`vgpu-executor` version).
    pub release: String,
    /// `ExecutorKind` as its number.
    pub kind: u32,
    pub name: String,
    pub total_memory: u64,
    pub cc_major: u16,
    pub cc_minor: u16,
    pub multiprocessors: u32,
    /// GPUs the worker's host has (0 for the CPU executor).
    pub gpus: u32,
    /// Free device memory now (the driver's figure; for the CPU executor, the total).
    pub free_memory: u64,
    /// Sessions it serves now (connections past their first request; not the one this
    /// hello answers), and at most.
    pub sessions: u32,
    pub max_sessions: u32,
    /// The CUDA sanity gate's line at the worker's start, or why it runs the CPU executor.
    pub sanity: String,
}

impl WorkerHello {
    pub fn device(&self) -> Option<DeviceInfo> {
        Some(DeviceInfo {
            kind: ExecutorKind::from_u32(self.kind)?,
            name: self.name.clone(),
            total_memory: self.total_memory,
            cc_major: self.cc_major,
            cc_minor: self.cc_minor,
            multiprocessors: self.multiprocessors,
        })
    }
}

/// What a mediator sends after the handshake. Every request is answered with exactly one
/// reply, in order; `Meter` messages come between them.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// Opens the connection's executor (one per connection, one per session); answered
    /// with `Opened`.
    Open,
    /// Runs the CUDA sanity gate again; answered with `Text`.
    Sanity,
    OpenStream,
    CloseStream {
        stream: u64,
    },
    Alloc {
        bytes: u64,
    },
    Free {
        buffer: u64,
    },
    Htod {
        stream: u64,
        dst: u64,
        offset: u64,
        #[serde(serialize_with = "as_bytes", borrow)]
        data: &'a [u8],
    },
    /// Answered with `Data`.
    Dtoh {
        stream: u64,
        src: u64,
        offset: u64,
        len: u64,
    },
    Dtod {
        stream: u64,
        dst: u64,
        dst_offset: u64,
        src: u64,
        src_offset: u64,
        len: u64,
    },
    Memset {
        stream: u64,
        dst: u64,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    },
    /// Answered with `Module`.
    LoadModule {
        ptx: &'a str,
    },
    UnloadModule {
        module: u64,
    },
    /// Answered with `Module`.
    LoadModuleImage {
        #[serde(serialize_with = "as_bytes", borrow)]
        image: &'a [u8],
    },
    Launch {
        stream: u64,
        #[serde(borrow)]
        kernel: WireKernel<'a>,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        #[serde(borrow)]
        params: Vec<WireParam<'a>>,
    },
    Sync {
        stream: u64,
    },
    LocalReservation {
        #[serde(borrow)]
        kernel: WireKernel<'a>,
    },
    /// Answered with `Answer`.
    DeviceAttributes {
        count: u32,
    },
    /// Answered with `Answer`.
    FunctionInfo {
        #[serde(borrow)]
        kernel: WireKernel<'a>,
    },
    /// Answered with `Answer`.
    ModuleGlobal {
        module: u64,
        name: &'a str,
    },
    /// Answered with `Answer`.
    Compile {
        source: &'a str,
        #[serde(borrow)]
        options: Vec<&'a str>,
        out_len: u32,
    },
}

impl Request<'_> {
    /// Whether the request is a device operation (the scheduler's unit: launch, copy,
    /// memset), counted by both sides' meters.
    pub fn is_device_op(&self) -> bool {
        matches!(
            self,
            Request::Htod { .. }
                | Request::Dtoh { .. }
                | Request::Dtod { .. }
                | Request::Memset { .. }
                | Request::Launch { .. }
        )
    }
}

/// A loaded module: its id, what it holds on the device, and its kernels' local memory
/// reservations as far as the worker knows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireModule {
    pub id: u64,
    pub bytes: u64,
}

/// What a worker sends after the handshake.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The answer to `Open`.
    Opened { result: Result<Opened, WireError> },
    /// The answer to most requests: a value (an id, a size) or the error.
    Done {
        poisoned: bool,
        result: Result<u64, WireError>,
    },
    /// The answer to `Dtoh`.
    Data {
        poisoned: bool,
        result: Result<Bytes, WireError>,
    },
    Module {
        poisoned: bool,
        result: Result<WireModule, WireError>,
    },
    Answer {
        poisoned: bool,
        result: Result<WireAnswer, WireError>,
    },
    /// The answer to `Sanity`.
    Text { result: Result<String, String> },
    /// Not an answer: how far the executor's device work has got — device operations
    /// finished (counted as the mediator counts the ones it sent) and device time, in
    /// nanoseconds. Sent whenever they change while work is in flight.
    Meter { done: u64, busy_ns: u64 },
}

/// The executor a worker opened for a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// [`crate::Executor::context_bytes`].
    pub context_bytes: u64,
    /// [`crate::Executor::local_reservation`] of each built-in kernel, by name.
    pub builtin_locals: Vec<(String, u64)>,
    /// Which executor, for the log.
    pub executor: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_one_byte_string_both_ways() {
        let data = Reply::Data {
            poisoned: false,
            result: Ok(Bytes((0..=255u8).cycle().take(70_000).collect())),
        };
        let enc = postcard::to_stdvec(&data).unwrap();
        // Variant, flag, Ok, a 3-byte length, the bytes.
        assert_eq!(enc.len(), 70_000 + 6);
        assert_eq!(postcard::from_bytes::<Reply>(&enc).unwrap(), data);
    }
}
