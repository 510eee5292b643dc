// SPDX-License-Identifier: Apache-2.0
//! `vgpu-executor`: what runs a VM's GPU work, below the mediator's policy.
//!
//! - [`Executor`]: the seam. One executor per session (one guest process); the mediator
//!   above checks every request before it reaches one.
//! - [`cuda`]: the CUDA executor (cudarc's driver API), one context per executor.
//! - [`cpu`]: the CPU reference executor (built-in kernels on host memory).
//! - [`process`]: executors in `vgpu-executor-worker` processes, behind a typed,
//!   pipelined channel, with a pool of ready workers; [`sandbox`] confines them.
//! - [`hostmap`]: guest host buffers mapped from the VM's memory files.
//! - [`ptx`]: kernel signatures read from PTX; [`image`]: what binary module images
//!   (cubin, fatbin) declare; [`selftest`]: the Phase 1 self-tests.
//!
//! Nothing here knows about tenants, quotas or transports.

pub mod cpu;
pub mod cuda;
pub mod executor;
pub mod hostmap;
pub mod image;
pub mod messages;
pub mod process;
pub mod ptx;
pub mod remote;
pub mod sandbox;
pub mod selftest;

pub use executor::{
    parse_gpu_list, select, select_gpus, select_with, BufferId, CompileOutput, DeviceInfo,
    ExecError, ExecParam, ExecResult, Executor, ExecutorChoice, ExecutorFactory, ExecutorOptions,
    GpuFactory, GuestAccessError, GuestIo, GuestSink, GuestSource, Isolation, KernelRef, ModuleId,
    SetupError, StreamId, UnknownExecutor, MAX_GPUS,
};
