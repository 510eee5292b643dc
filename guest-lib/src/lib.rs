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
//! the session closes). Launches, memsets and host-to-device copies are accepted
//! asynchronously; [`Session::sync`] reports a failure that happened later.
//!
//! Requests travel through a [`Transport`]: [`CharDevTransport`] on a guest, or
//! [`InProcessTransport`] to drive a device implementation in the same process. The C
//! ABI of `include/vgpu.h` lives in [`capi`].

pub mod capi;
mod error;
mod session;
mod transport;

#[cfg(test)]
mod fake;

pub use error::{Error, Result};
pub use session::{
    BufferArg, Device, DeviceBuffer, HostBuffer, KernelArg, LaunchConfig, Module, Pod, Session,
    HOST_CHUNK_BYTES, MIN_CHUNK_BYTES, PAGEABLE_CHUNK_BYTES,
};
pub use transport::{device_path, CharDevTransport, HostMemory, InProcessTransport, Transport};
pub use vgpu_protocol::{DeviceConfig, ExecutorKind, InfoReply, SelftestKind, Status};
