//! The mediator: tenants (VMs) with their quota and weight, each served by a worker that
//! owns the tenant's executor, sessions and handles.
//!
//! Transports (the vhost-user backend, the NFS file transport, tests) call
//! [`Mediator::submit`], which never blocks: the worker answers through a
//! [`CompletionSink`], e.g. a [`CompletionQueue`] whose eventfd wakes an epoll loop.
//! A tenant's requests run in the order they were submitted; tenants run in parallel.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vgpu_protocol::{DeviceConfig, Request, Response, MAX_TRANSFER_BYTES, REQUEST_HEADER_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::executor::{DeviceInfo, ExecutorFactory};
use crate::worker::Worker;

/// Identifies a tenant for the life of the mediator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub u64);

/// A VM's share of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantConfig {
    pub name: String,
    /// Device memory the VM may allocate, in bytes.
    pub mem_quota: u64,
    /// Relative share of device time.
    pub weight: u32,
}

/// Per-tenant limits that keep one guest from exhausting the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: u32,
    pub max_buffers_per_session: u32,
    pub max_modules_per_session: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 64,
            max_buffers_per_session: 16384,
            max_modules_per_session: 64,
        }
    }
}

/// What a tenant holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub sessions: u32,
    pub mem_used: u64,
    pub allocations: u32,
    pub modules: u32,
    /// Times the tenant's execution context was lost and recreated.
    pub restarts: u32,
    /// Requests answered since the tenant was added.
    pub requests: u64,
}

/// Receives completed requests.
pub trait CompletionSink: Send + Sync {
    fn complete(&self, token: u64, response: Response);
}

/// Completions collected for an event loop: `complete` queues and signals the eventfd;
/// the loop polls the fd and calls [`CompletionQueue::drain`].
pub struct CompletionQueue {
    done: Mutex<VecDeque<(u64, Response)>>,
    eventfd: EventFd,
}

impl CompletionQueue {
    pub fn new() -> io::Result<Arc<CompletionQueue>> {
        Ok(Arc::new(CompletionQueue {
            done: Mutex::new(VecDeque::new()),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The fd that becomes readable when completions are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Takes every waiting completion and resets the eventfd.
    pub fn drain(&self) -> Vec<(u64, Response)> {
        let _ = self.eventfd.read();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.drain(..).collect()
    }
}

impl CompletionSink for CompletionQueue {
    fn complete(&self, token: u64, response: Response) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((token, response));
        if let Err(e) = self.eventfd.write(1) {
            log::error!("completion eventfd: {e}");
        }
    }
}

struct ChannelSink(Mutex<mpsc::Sender<Response>>);

impl CompletionSink for ChannelSink {
    fn complete(&self, _token: u64, response: Response) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(response);
    }
}

pub(crate) enum Message {
    Request {
        request: Request,
        token: u64,
        sink: Arc<dyn CompletionSink>,
    },
    /// Close every session and free everything (the VM disconnected or reset).
    Reset { done: mpsc::Sender<()> },
}

/// State a worker publishes for everyone else to read.
pub(crate) struct TenantShared {
    pub config: TenantConfig,
    pub usage: Mutex<TenantUsage>,
}

struct TenantHandle {
    tx: mpsc::Sender<Message>,
    shared: Arc<TenantShared>,
    thread: Option<JoinHandle<()>>,
}

/// Shares one device between tenants.
pub struct Mediator {
    factory: Arc<dyn ExecutorFactory>,
    limits: Limits,
    tenants: Mutex<HashMap<TenantId, TenantHandle>>,
    next_tenant: AtomicU64,
}

impl Mediator {
    pub fn new(factory: Arc<dyn ExecutorFactory>) -> Arc<Mediator> {
        Mediator::with_limits(factory, Limits::default())
    }

    pub fn with_limits(factory: Arc<dyn ExecutorFactory>, limits: Limits) -> Arc<Mediator> {
        Arc::new(Mediator {
            factory,
            limits,
            tenants: Mutex::new(HashMap::new()),
            next_tenant: AtomicU64::new(1),
        })
    }

    pub fn device(&self) -> &DeviceInfo {
        self.factory.device()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Adds a tenant and starts its worker.
    pub fn add_tenant(&self, config: TenantConfig) -> io::Result<TenantId> {
        let id = TenantId(self.next_tenant.fetch_add(1, Ordering::Relaxed));
        let shared = Arc::new(TenantShared {
            config: config.clone(),
            usage: Mutex::new(TenantUsage::default()),
        });
        let (tx, rx) = mpsc::channel();
        let (factory, worker_shared, limits) = (self.factory.clone(), shared.clone(), self.limits);
        // The worker is built on its own thread: its executor never leaves that thread.
        let thread = std::thread::Builder::new()
            .name(format!("tenant-{}", config.name))
            .spawn(move || Worker::new(factory, worker_shared, limits).run(rx))?;
        log::info!(
            "tenant {} ({}) added: quota {} MiB, weight {}",
            id.0,
            config.name,
            config.mem_quota >> 20,
            config.weight
        );
        self.lock().insert(
            id,
            TenantHandle {
                tx,
                shared,
                thread: Some(thread),
            },
        );
        Ok(id)
    }

    /// Frees everything the tenant holds and stops its worker.
    pub fn remove_tenant(&self, tenant: TenantId) {
        let handle = self.lock().remove(&tenant);
        if let Some(mut h) = handle {
            drop(h.tx);
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
            log::info!("tenant {} ({}) removed", tenant.0, h.shared.config.name);
        }
    }

    /// Closes all the tenant's sessions and frees its device memory, after the requests
    /// already submitted. Returns once done.
    pub fn reset_tenant(&self, tenant: TenantId) {
        let (done, wait) = mpsc::channel();
        if self.send(tenant, Message::Reset { done }) {
            let _ = wait.recv();
        }
    }

    /// Queues a request; `sink` receives the response with `token`. Never blocks.
    pub fn submit(
        &self,
        tenant: TenantId,
        request: Request,
        token: u64,
        sink: Arc<dyn CompletionSink>,
    ) {
        let reject = sink.clone();
        if !self.send(
            tenant,
            Message::Request {
                request,
                token,
                sink,
            },
        ) {
            reject.complete(token, Response::error(vgpu_protocol::Status::DeviceLost, 0));
        }
    }

    /// Runs a request and waits for its response.
    pub fn call(&self, tenant: TenantId, request: Request) -> Response {
        let (tx, rx) = mpsc::channel();
        self.submit(tenant, request, 0, Arc::new(ChannelSink(Mutex::new(tx))));
        rx.recv()
            .unwrap_or_else(|_| Response::error(vgpu_protocol::Status::DeviceLost, 0))
    }

    pub fn usage(&self, tenant: TenantId) -> Option<TenantUsage> {
        self.lock()
            .get(&tenant)
            .map(|h| *h.shared.usage.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn tenant_config(&self, tenant: TenantId) -> Option<TenantConfig> {
        self.lock().get(&tenant).map(|h| h.shared.config.clone())
    }

    pub fn tenants(&self) -> Vec<TenantId> {
        let mut ids: Vec<_> = self.lock().keys().copied().collect();
        ids.sort();
        ids
    }

    /// The config space a tenant's device shows.
    pub fn device_config(&self, tenant: TenantId) -> Option<DeviceConfig> {
        let quota = self.tenant_config(tenant)?.mem_quota;
        Some(device_config(self.device(), quota, &self.limits))
    }

    fn send(&self, tenant: TenantId, message: Message) -> bool {
        match self.lock().get(&tenant) {
            Some(h) => h.tx.send(message).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantHandle>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Mediator {
    fn drop(&mut self) {
        for id in self.tenants() {
            self.remove_tenant(id);
        }
    }
}

pub(crate) fn device_config(device: &DeviceInfo, quota: u64, limits: &Limits) -> DeviceConfig {
    DeviceConfig {
        version: vgpu_protocol::PROTOCOL_VERSION as u32,
        num_queues: 1,
        max_request_bytes: (MAX_TRANSFER_BYTES as usize + REQUEST_HEADER_SIZE + 4096) as u32,
        executor: device.kind,
        cc_major: device.cc_major,
        cc_minor: device.cc_minor,
        mem_quota: quota,
        device_memory: device.total_memory,
        multiprocessors: device.multiprocessors,
        max_sessions: limits.max_sessions,
        name: device.name.clone(),
    }
}
