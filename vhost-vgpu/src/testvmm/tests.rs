// SPDX-License-Identifier: Apache-2.0
//! The test VMM against a stand-in backend built on vhost-user-backend, so the VMM's
//! own handshake, rings and notification modes are proven without the vGPU daemon.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use vgpu_protocol::{
    Command, DeviceConfig, ExecutorKind, Header, Request, ResponseHeader, Status, CONFIG_SIZE,
    RESPONSE_HEADER_SIZE,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::*;

/// Answers every chain: status OK, value0 = the request's tag, value1 = readable bytes,
/// and the writable payload filled with 0xab. A chain with less than 32 writable bytes
/// comes back with used len 0.
struct Echo {
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: RwLock<bool>,
}

impl Echo {
    fn answer(&self, vring: &VringRwLock) {
        let mem = self.mem.read().unwrap().as_ref().unwrap().memory();
        loop {
            if *self.event_idx.read().unwrap() {
                vring.disable_notification().unwrap();
            }
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .unwrap()
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let mut input = Vec::new();
                let _ = chain.clone().reader(&*mem).unwrap().read_to_end(&mut input);
                let mut w = chain.writer(&*mem).unwrap();
                let avail = w.available_bytes();
                let used = if avail < RESPONSE_HEADER_SIZE {
                    0
                } else {
                    let payload = avail - RESPONSE_HEADER_SIZE;
                    w.write_all(&vec![0xab; payload]).unwrap();
                    let h = ResponseHeader {
                        status: Status::Ok,
                        detail: 0,
                        value0: Header::decode(&input).map_or(u64::MAX, |h| h.tag),
                        value1: input.len() as u64,
                        written: payload as u32,
                    };
                    w.write_all(&h.encode()).unwrap();
                    avail as u32
                };
                vring.add_used(head, used).unwrap();
            }
            if vring.needs_notification().unwrap() {
                vring.signal_used_queue().unwrap();
            }
            if !*self.event_idx.read().unwrap() || !vring.enable_notification().unwrap() {
                break;
            }
        }
    }
}

impl VhostUserBackend for Echo {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        DRIVER_FEATURES
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        *self.event_idx.write().unwrap() = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = DeviceConfig {
            version: 1,
            num_queues: 1,
            max_request_bytes: 1 << 20,
            executor: ExecutorKind::Cpu,
            cc_major: 0,
            cc_minor: 0,
            mem_quota: 1 << 30,
            device_memory: 1 << 30,
            multiprocessors: 1,
            max_sessions: 8,
            name: "echo".into(),
            gpu: 0,
        }
        .encode();
        c.get(offset as usize..(offset + size) as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        self.answer(&vrings[0]);
        Ok(())
    }
}

/// Serves one connection on a fresh socket; returns its path.
fn echo_backend(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("testvmm-{name}-{}.sock", std::process::id()));
    let backend = Arc::new(Echo {
        mem: RwLock::new(None),
        event_idx: RwLock::new(false),
    });
    let mut daemon = VhostUserDaemon::new(
        "echo".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let p = path.clone();
    std::thread::spawn(move || {
        let _ = daemon.serve(&p);
    });
    path
}

fn sync(tag: u64) -> Request {
    Request {
        session: 1,
        tag,
        command: Command::Sync,
    }
}

#[test]
fn a_vm_negotiates_reads_config_and_round_trips_requests() {
    let mut vm = Vm::connect(echo_backend("basic")).unwrap();
    assert_eq!(vm.features() & DRIVER_FEATURES, DRIVER_FEATURES);
    assert_eq!(vm.config().name, "echo");
    let (h, data) = vm.request(&sync(7)).unwrap();
    assert_eq!((h.status, h.value0, h.value1), (Status::Ok, 7, 80));
    assert!(data.is_empty());
    let (h, data) = vm.request(&Request::new(0, Command::Info)).unwrap();
    assert_eq!(h.written as usize, vgpu_protocol::INFO_SIZE);
    assert_eq!(data, vec![0xab; vgpu_protocol::INFO_SIZE]);
    assert_eq!(CONFIG_SIZE, 128);
}

#[test]
fn pipelined_requests_come_back_once_each_in_every_mode() {
    for (name, notify, features, indirect, segment) in [
        ("irq", Notify::Interrupt, DRIVER_FEATURES, false, None),
        ("poll", Notify::Polling, DRIVER_FEATURES, true, Some(7)),
        ("noevidx", Notify::Interrupt, F_VERSION_1, false, Some(16)),
        ("noevidx-poll", Notify::Polling, F_VERSION_1, false, None),
    ] {
        let options = VmOptions {
            notify,
            features,
            indirect,
            queue_size: 64,
            ..VmOptions::default()
        };
        let mut vm = Vm::connect_with(echo_backend(name), options).unwrap();
        let shape = Shape {
            segment,
            ..Shape::default()
        };
        let total = 3000u64;
        let (mut sent, mut seen) = (0u64, vec![false; total as usize]);
        let mut got = 0;
        while got < total {
            while sent < total && vm.queue().num_free() >= 16 && vm.in_flight() < 40 {
                vm.submit_shaped(&sync(sent), shape).unwrap();
                sent += 1;
            }
            for c in vm.wait().unwrap() {
                let (h, _) = c.clone().response().unwrap();
                assert_eq!(h.value0, c.token, "{name}");
                assert!(!seen[c.token as usize], "{name}: {} twice", c.token);
                seen[c.token as usize] = true;
                got += 1;
            }
        }
        assert_eq!(vm.in_flight(), 0);
    }
}

#[test]
fn hand_made_chains_reach_the_backend() {
    let mut vm = Vm::connect(echo_backend("raw")).unwrap();
    let buf = vm.alloc_buffer(256).unwrap();
    vm.ram().write(buf, &sync(99).encode()).unwrap();
    // A readable-only chain cannot be answered: it comes back with used len 0.
    let head = vm
        .submit_raw(
            &[RawDesc {
                addr: buf,
                len: 80,
                flags: 0,
                link: Link::End,
            }],
            5,
        )
        .unwrap();
    let c = vm.wait().unwrap().pop().unwrap();
    assert_eq!((c.head, c.token, c.used_len, c.reply), (head, 5, 0, None));
    // A well-formed hand-laid chain is answered in place.
    vm.submit_chain(&[Buf::readable(buf, 80), Buf::writable(buf + 128, 32)], 6)
        .unwrap();
    let c = vm.wait().unwrap().pop().unwrap();
    assert_eq!(c.used_len, 32);
    let h = ResponseHeader::decode(&vm.ram().read_vec(buf + 128, 32).unwrap()).unwrap();
    assert_eq!(h.value0, 99);
}
