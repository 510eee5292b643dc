// SPDX-License-Identifier: Apache-2.0
//! A test VMM: everything a VM and its guest driver do to the vGPU device, in-process,
//! for the integration tests, the benchmark and the fuzz harness.
//!
//! - [`GuestRam`]: guest memory in a memfd mapped `MAP_SHARED` (the backend maps the same
//!   pages from the fd), with a bump allocator of physically contiguous ranges.
//! - [`Frontend`]: the vhost-user frontend (the vhost crate's) that negotiates features,
//!   reads the config space and hands the backend the memory table and the vrings.
//! - [`VirtQueue`]: a split-virtqueue driver over guest RAM: chains of readable and
//!   writable buffers, indirect tables, kicks, used entries reaped by interrupt (call
//!   eventfd) or by polling the used index, with `EVENT_IDX` suppression both ways.
//! - [`Vm`]: all three together, with `request()` for one protocol request, pipelined
//!   [`Vm::submit`] / [`Vm::wait`], and [`Vm::submit_raw`] for hostile descriptor chains.
//! - [`hostile`]: hostile chains built from bytes (random or a fuzzer's), and [`fuzz`]: the
//!   backend run over a RAM image made of raw bytes, shared by `cargo fuzz` and a stable test.
//!
//! ```no_run
//! use vgpu_protocol::{Command, Request};
//! use vhost_vgpu::testvmm::Vm;
//!
//! let mut vm = Vm::connect("/run/vgpu/vm1.sock")?;
//! let (header, _) = vm.request(&Request::new(0, Command::SessionOpen))?;
//! println!("session {}", header.value0);
//! # Ok::<(), vhost_vgpu::testvmm::Error>(())
//! ```

mod frontend;
pub mod fuzz;
pub mod hostile;
mod ram;
mod virtqueue;
mod vm;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use frontend::{Frontend, DRIVER_FEATURES, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
pub use ram::{GuestRam, DEFAULT_RAM_BASE};
pub use virtqueue::{
    need_event, write_desc, Buf, Link, Notify, RawDesc, Used, VirtQueue, AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY,
};
pub use vm::{Completion, Reply, Shape, Vm, VmOptions};

/// What went wrong in the test VMM. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    #[error("mapping guest RAM")]
    Mmap(#[source] std::io::Error),
    #[error("guest RAM of {size} bytes at {base:#x} does not fit the address space")]
    RamLayout { base: u64, size: u64 },
    #[error("guest RAM exhausted: {wanted} bytes wanted, {free} free")]
    OutOfGuestRam { wanted: u64, free: u64 },
    #[error("guest range {gpa:#x}+{len} is outside RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("guest address {gpa:#x} is not {align}-byte aligned")]
    Misaligned { gpa: u64, align: u64 },
    #[error("queue size {0} is not a power of two")]
    QueueSize(u16),
    #[error("a chain needs at least one buffer")]
    EmptyChain,
    #[error("descriptor link to position {0} is outside the chain")]
    BadLink(usize),
    #[error("virtqueue full: {needed} descriptors needed, {free} free")]
    QueueFull { needed: usize, free: usize },
    #[error("eventfd")]
    Eventfd(#[source] std::io::Error),
    #[error("connecting to the backend socket")]
    Connect(#[source] std::io::Error),
    #[error("vhost-user {step}")]
    Vhost {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("config space")]
    Config(#[source] vgpu_protocol::DecodeError),
    #[error("no used entry within {0:?}")]
    Timeout(Duration),
    #[error("the device returned id {id} (len {len}), which is not a chain in flight")]
    UnexpectedUsed { id: u32, len: u32 },
    #[error("chain {head} came back (used len {used_len}) without a response header")]
    NoResponse { head: u16, used_len: u32 },
}

impl Error {
    /// Maps a vhost error to the message that failed.
    fn vhost(step: &'static str) -> impl FnOnce(vhost::Error) -> Error {
        move |source| Error::Vhost { step, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
