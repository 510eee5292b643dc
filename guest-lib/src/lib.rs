// SPDX-License-Identifier: Apache-2.0
//! `vgpu`: the guest library of the vGPU device.
//!
//! Programs in a virtual machine use the host's GPU through `/dev/vgpuN`, the char device
//! of the guest driver (`driver/vgpu.ko`). The API is shaped like cudarc:
//!
//! ```no_run
//! use vgpu::{Device, KernelArg, LaunchConfig};
//!
//! let session = Device::open(0)?.session()?;
//! let n = 1024;
//! let a = session.htod_copy(&vec![1.0f32; n])?;
//! let b = session.htod_copy(&vec![2.0f32; n])?;
//! let c = session.alloc::<f32>(n)?;
//! session.launch(
//!     &session.builtin(),
//!     "vector_add_f32",
//!     LaunchConfig::for_num_elems(n as u32),
//!     &[a.arg(), b.arg(), c.arg(), KernelArg::U32(n as u32)],
//! )?;
//! session.sync()?;
//! assert!(session.dtoh(&c)?.iter().all(|&x| x == 3.0));
//! # Ok::<(), vgpu::Error>(())
//! ```
//!
//! A [`Session`] is one open file of the device and one context on the host: its
//! buffers and modules are its own and are freed when dropped (or, at the latest, when
//! the session closes). Launches, memsets, device copies and small host-to-device copies
//! are queued without waiting for the device (many in flight per session); a failure
//! among them, or one that happened later on the device, is reported by the session's
//! next synchronous call, such as [`Session::sync`]. `VGPU_SYNC_SUBMIT=1` (or
//! [`Session::set_sync_submit`]) makes every request wait for its answer.
//! `VGPU_POLL_US=N` (or [`Session::set_poll_us`]) has a request that waits poll the
//! device for its answer for up to N µs before it sleeps until the interrupt.
//!
//! Requests travel through a [`Transport`]: [`CharDevTransport`] on a guest, or
//! [`InProcessTransport`] to drive a device implementation in the same process. The C
//! ABI of `include/vgpu.h` lives in [`capi`]. Driver-API shims use the handle-level
//! `Session::raw_*` calls, [`Session::device_attributes`], [`Session::function_info`]
//! and [`Session::module_global`].

pub mod capi;
mod compile;
mod error;
mod raw;
mod session;
mod transport;

#[cfg(test)]
mod fake;

pub use compile::{CompileError, Compiled, COMPILE_OUTPUT_BYTES};
pub use error::{Error, Result};
pub use raw::ModuleGlobal;
pub use session::{
    BufferArg, Device, DeviceBuffer, HostBuffer, KernelArg, LaunchConfig, Module, Pod, Session,
    HOST_CHUNK_BYTES, MIN_CHUNK_BYTES, PAGEABLE_CHUNK_BYTES, POLL_US_ENV, SYNC_SUBMIT_ENV,
};
pub use transport::{
    device_path, AsyncFailure, CharDevTransport, HostMemory, InProcessTransport, Reply, Transport,
    ASYNC_MAX_BYTES, POLL_MAX_US,
};
pub use vgpu_protocol::{
    DeviceConfig, ExecutorKind, FunctionInfo, InfoReply, Param, SelftestKind, Status,
    BUILTIN_MODULE, FUNCTION_ATTRIBUTES,
};
