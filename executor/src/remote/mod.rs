// SPDX-License-Identifier: Apache-2.0
//! Executors across the network: a mediator whose executors run on another machine (or
//! in a VM with the GPU passed through), reached over TCP or vsock.
//!
//! - [`server`]: the worker host (`vgpu-worker`): authenticates mediators and serves each
//!   connection one executor from its own factory (CUDA executors in sandboxed worker
//!   processes, as a local mediator runs them).
//! - [`client`]: the mediator's side: [`RemoteExecutorFactory`] and [`RemoteExecutor`],
//!   an [`crate::Executor`] whose calls become requests on the connection, pipelined like
//!   the worker-process executor's.
//! - [`link`]: addresses, connections, pre-shared keys, the Noise handshake
//!   (`Noise_NNpsk0_25519_AESGCM_SHA256`: mutual authentication by a key per mediator,
//!   fresh keys per connection) and the encrypted records; [`wire`]: the messages.
//! - [`nvml`]: the GPUs and free memory a worker reports, from NVIDIA's management
//!   library when it is there.
//!
//! One connection carries one executor (one guest session): a lost connection costs
//! exactly the sessions it carried, a worker frees everything a connection held when it
//! ends, and nothing is ever sent twice.

pub mod client;
pub mod link;
pub mod nvml;
pub mod server;
pub mod wire;

pub use client::{Credentials, RemoteExecutor, RemoteExecutorFactory, RemoteSpec};
pub use link::{Endpoint, Key, KeyFile, Listener};
pub use server::{Server, ServerConfig};
