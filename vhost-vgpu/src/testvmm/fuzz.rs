// SPDX-License-Identifier: Apache-2.0
//! Fuzz harness: raw bytes become a guest's whole RAM image (descriptor table, available
//! ring, used ring, buffers), and the device's request queue is run over it by the real
//! backend ([`VgpuBackend`]), completions included, with no socket in between.
//!
//! Input layout: byte 0 picks the queue size (2 to 256) and `EVENT_IDX`; byte 1 how many
//! entries the guest published (at most the queue size); the rest is RAM from [`RAM_BASE`], zero-padded to
//! [`RAM_SIZE`]. The rings sit at fixed places in that image ([`DESC_TABLE`],
//! [`AVAIL_RING`], [`USED_RING`]); everything else in them, and every buffer, is the
//! input's. The same function runs under `cargo fuzz` (`vhost-vgpu/fuzz`) and in a stable
//! test with random and mutated inputs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vgpu_mediator::{Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Request, SelftestKind};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{VgpuBackend, COMPLETION_EVENT, REQUEST_QUEUE};

/// Guest physical address of the image's first byte (addresses below it are outside RAM).
pub const RAM_BASE: u64 = 0x1_0000;
/// Bytes of guest RAM.
pub const RAM_SIZE: usize = 64 << 10;
/// Offsets of the rings in the image (room for 256 entries each).
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x1000;
pub const USED_RING: u64 = 0x1400;
/// First byte of the image that no ring uses: where seeds put their buffers.
pub const DATA: u64 = 0x2000;
/// Bytes of the input before the RAM image.
pub const PREFIX: usize = 2;
/// Longest the harness waits for the mediator to answer what it was handed.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

/// What one input did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Chains the device took off the available ring.
    pub popped: u16,
    /// Chains it put on the used ring.
    pub used: u16,
}

fn mediator() -> &'static Arc<Mediator> {
    static MEDIATOR: OnceLock<Arc<Mediator>> = OnceLock::new();
    MEDIATOR.get_or_init(|| Mediator::new(Arc::new(vgpu_mediator::cpu::CpuExecutorFactory::new())))
}

/// A fresh tenant for one input, so that its ids, and so the input's meaning, do not
/// depend on the inputs before it.
fn fresh_tenant(mediator: &Mediator) -> TenantId {
    mediator
        .add_tenant(TenantConfig {
            name: "fuzz".into(),
            // Small: random ALLOCs stay cheap.
            mem_quota: 16 << 20,
            weight: 1,
        })
        .expect("adding the fuzz tenant")
}

/// The queue size and `EVENT_IDX` choice that byte 0 of an input encodes.
pub fn queue_shape(b: u8) -> (u16, bool) {
    (1 << (1 + (b >> 1) % 8), b & 1 != 0)
}

/// Runs one input through the backend. Panics on what a device must never do: hang
/// with requests in flight, or return more chains than it took.
pub fn run(data: &[u8]) -> Outcome {
    run_image(data).0
}

/// [`run`], also returning guest RAM as the device left it.
pub fn run_image(data: &[u8]) -> (Outcome, Vec<u8>) {
    let mediator = mediator();
    let tenant = fresh_tenant(mediator);
    let b = |i: usize| data.get(i).copied().unwrap_or(0);
    let (queue_size, event_idx) = queue_shape(b(0));
    // At most a full queue: a guest that publishes more makes the backend's EVENT_IDX loop
    // spin (the transport test `a_guest_publishing_more_than_a_queue_can_still_leave`).
    let published = u16::from(b(1)) % (queue_size + 1);

    let mut image = vec![0u8; RAM_SIZE];
    let body = data.get(PREFIX..).unwrap_or(&[]);
    let n = body.len().min(RAM_SIZE);
    image[..n].copy_from_slice(&body[..n]);
    // The used ring is the device's; the available index is what the guest published.
    image[USED_RING as usize..USED_RING as usize + 4].fill(0);
    let idx = AVAIL_RING as usize + 2;
    image[idx..idx + 2].copy_from_slice(&published.to_le_bytes());

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_BASE), RAM_SIZE)])
        .expect("guest memory");
    vm_memory::Bytes::write_slice(&mem, &image, GuestAddress(RAM_BASE)).expect("RAM image");
    let mem = GuestMemoryAtomic::new(mem);
    let ram = mem.clone();

    let vring = VringRwLock::new(mem.clone(), 256).expect("vring");
    vring.set_queue_size(queue_size);
    vring
        .set_queue_info(
            RAM_BASE + DESC_TABLE,
            RAM_BASE + AVAIL_RING,
            RAM_BASE + USED_RING,
        )
        .expect("ring addresses");
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    let mut backend = VgpuBackend::new(mediator.clone(), tenant).expect("backend");
    backend.update_memory(mem).expect("memory table");
    backend.set_event_idx(event_idx);
    let vrings = [vring.clone()];
    backend
        .handle_event(REQUEST_QUEUE, EventSet::IN, &vrings, 0)
        .expect("handle_event must not fail");
    let fd = backend.completion_fd();
    let deadline = std::time::Instant::now() + COMPLETION_TIMEOUT;
    while backend.requests_in_flight() > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "{} requests still in flight after {COMPLETION_TIMEOUT:?}",
            backend.requests_in_flight()
        );
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call. A signal (libFuzzer's
        // timer) may cut the wait short; the loop then simply waits again.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if ready > 0 {
            backend
                .handle_event(COMPLETION_EVENT, EventSet::IN, &vrings, 0)
                .expect("handle_event must not fail");
        }
    }
    let outcome = Outcome {
        popped: vring.queue_next_avail(),
        used: vring.queue_used_idx().unwrap_or(0),
    };
    // Guest writes may have moved the available index after the device read it; the
    // device can still never return more chains than it took.
    assert!(
        outcome.used <= outcome.popped,
        "{} chains returned, {} taken",
        outcome.used,
        outcome.popped
    );
    drop(backend);
    mediator.remove_tenant(tenant);
    let mut after = vec![0u8; RAM_SIZE];
    vm_memory::Bytes::read_slice(&*ram.memory(), &mut after, GuestAddress(RAM_BASE))
        .expect("RAM image");
    (outcome, after)
}

/// Inputs that hold real requests, laid out as a driver would, for a fuzzer to start
/// from: each is a valid queue of a few requests (open a session, allocate, copy in and
/// out, launch, information, self-test).
pub fn seeds() -> Vec<Vec<u8>> {
    seed_layouts().into_iter().map(|(input, _)| input).collect()
}

/// The seeds, each with the image offsets of its response headers, in request order.
fn seed_layouts() -> Vec<(Vec<u8>, Vec<u64>)> {
    // Every input gets a fresh tenant, whose ids count from 1: the first SESSION_OPEN
    // gives session 1, the next id (the first ALLOC) is 2.
    let session = 1;
    let requests: Vec<Vec<Request>> = vec![
        vec![Request::new(0, Command::Info)],
        vec![
            Request::new(0, Command::SessionOpen),
            Request::new(session, Command::Alloc { size: 4096 }),
            Request::new(
                session,
                Command::Htod {
                    dst: 2,
                    offset: 16,
                    data: (0..200u8).collect(),
                },
            ),
            Request::new(
                session,
                Command::Dtoh {
                    src: 2,
                    offset: 0,
                    len: 256,
                },
            ),
            Request::new(session, Command::Sync),
        ],
        vec![
            Request::new(0, Command::SessionOpen),
            Request::new(session, Command::Alloc { size: 1024 }),
            Request::new(
                session,
                Command::Memset {
                    dst: 2,
                    offset: 0,
                    len: 1024,
                    value: 7,
                    width: 4,
                },
            ),
            Request::new(
                session,
                Command::Launch(vgpu_protocol::Launch {
                    module: vgpu_protocol::BUILTIN_MODULE,
                    kernel: "fill_u32".into(),
                    grid: [1, 1, 1],
                    block: [64, 1, 1],
                    shared_bytes: 0,
                    params: vec![
                        vgpu_protocol::Param::Buffer(2),
                        vgpu_protocol::Param::u32(9),
                        vgpu_protocol::Param::u32(256),
                    ],
                }),
            ),
            Request::new(session, Command::Free { handle: 2 }),
            Request::new(session, Command::SessionClose),
        ],
        vec![
            Request::new(
                0,
                Command::Selftest {
                    test: SelftestKind::DeviceInfo,
                },
            ),
            Request::new(0, Command::SessionOpen),
            Request::new(
                session,
                Command::ModuleLoad {
                    ptx: ".version 8.0\n".into(),
                },
            ),
        ],
        // The driver-API requests: attributes, a built-in kernel's layout, a variable,
        // a binary image and a compile.
        vec![
            Request::new(0, Command::SessionOpen),
            Request::new(session, Command::DeviceAttributes { count: 140 }),
            Request::new(
                session,
                Command::FunctionInfo {
                    module: vgpu_protocol::BUILTIN_MODULE,
                    name: "vector_add_f32".into(),
                },
            ),
            Request::new(
                session,
                Command::ModuleGlobal {
                    module: 7,
                    name: "coefficients".into(),
                },
            ),
            Request::new(
                session,
                Command::ModuleLoadImage {
                    image: b"\x7fELF\x02\x01\x01".to_vec(),
                },
            ),
            Request::new(
                session,
                Command::Compile {
                    source: "extern \"C\" __global__ void k() {}".into(),
                    options: vec!["-default-device".into()],
                    out_len: 4096,
                },
            ),
        ],
    ];
    requests
        .iter()
        .enumerate()
        .flat_map(|(i, rs)| {
            [false, true].map(|indirect| seed_image(rs, (i as u8) << 1 | 1, indirect))
        })
        .collect()
}

/// One input: `requests` as chains 0.. of a queue of 16, header and payload readable,
/// then the writable payload and the response header, optionally through one indirect
/// table each.
fn seed_image(requests: &[Request], shape: u8, indirect: bool) -> (Vec<u8>, Vec<u64>) {
    let queue_size = 16u16;
    // queue_shape: 1 << (1 + 3) = 16 entries.
    let shape = (shape & 1) | (3 << 1);
    let mut image = vec![0u8; RAM_SIZE];
    let mut put = |at: u64, bytes: &[u8]| {
        image[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    };
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let mut data = DATA;
    let mut slot = 0u16;
    let mut responses = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let readable = r.encode();
        let writable = r.header().writable_len() + 32;
        let (rd, wr) = (data, data + readable.len() as u64);
        responses.push(wr + writable - 32);
        put(rd, &readable);
        data = (wr + writable).next_multiple_of(16);
        let entries = [
            desc(RAM_BASE + rd, readable.len() as u32, super::DESC_F_NEXT, 0),
            desc(RAM_BASE + wr, writable as u32, super::DESC_F_WRITE, 0),
        ];
        let head = slot;
        if indirect {
            let table = data;
            data += 32;
            let mut first = entries[0];
            first[14..16].copy_from_slice(&1u16.to_le_bytes());
            put(table, &first);
            put(table + 16, &entries[1]);
            put(
                DESC_TABLE + 16 * u64::from(slot),
                &desc(RAM_BASE + table, 32, super::DESC_F_INDIRECT, 0),
            );
            slot += 1;
        } else {
            let mut first = entries[0];
            first[14..16].copy_from_slice(&(slot + 1).to_le_bytes());
            put(DESC_TABLE + 16 * u64::from(slot), &first);
            put(DESC_TABLE + 16 * u64::from(slot + 1), &entries[1]);
            slot += 2;
        }
        put(AVAIL_RING + 4 + 2 * i as u64, &head.to_le_bytes());
    }
    assert!(slot <= queue_size && data as usize <= RAM_SIZE);
    let mut input = vec![shape, requests.len() as u8];
    input.extend_from_slice(&image);
    // Trailing zeros add nothing: the harness pads.
    while input.last() == Some(&0) {
        input.pop();
    }
    (input, responses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_is_a_queue_of_requests_the_device_carries_out() {
        use vgpu_protocol::{ResponseHeader, Status};
        for (i, (seed, responses)) in seed_layouts().iter().enumerate() {
            let (size, _) = queue_shape(seed[0]);
            assert_eq!(size, 16);
            let (outcome, ram) = run_image(seed);
            assert_eq!(outcome.popped, u16::from(seed[1]), "seed {i}");
            assert_eq!(outcome.used, outcome.popped, "seed {i}");
            for (k, &at) in responses.iter().enumerate() {
                let h = ResponseHeader::decode(&ram[at as usize..at as usize + 32]).unwrap();
                // The CPU executor runs no PTX, loads no images and compiles nothing, so
                // it has no module variables either; everything else succeeds.
                let want = match (i / 2, k) {
                    (3, 2) | (4, 4) | (4, 5) => Status::Unsupported,
                    (4, 3) => Status::InvalidHandle,
                    _ => Status::Ok,
                };
                assert_eq!(h.status, want, "seed {i}, response at {at:#x}");
            }
        }
    }

    #[test]
    fn empty_and_tiny_inputs_run() {
        assert_eq!(run(&[]), Outcome::default());
        let o = run(&[0xff, 0xff]);
        assert_eq!(o.popped, o.used);
    }
}
