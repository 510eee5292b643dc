// SPDX-License-Identifier: Apache-2.0
//! The daemon through its real vhost-user sockets, driven by the test VMM: every
//! operation, two VMs pipelining at once, a hostile guest beside a well-behaved one, and
//! disconnects in the middle of work.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use vgpu_mediator::{ExecutorChoice, Mediator, TenantId};
use vgpu_protocol::{
    Command, ExecutorKind, InfoReply, Launch, Param, Request, ResponseHeader, SelftestKind, Status,
    BUILTIN_MODULE, INFO_SIZE, REQUEST_HEADER_SIZE,
};
use vhost_vgpu::testvmm::hostile::{self, Bytes, Scratch};
use vhost_vgpu::testvmm::{
    Buf, Completion, Link, Notify, RawDesc, Shape, Vm, VmOptions, DESC_F_INDIRECT, DESC_F_NEXT,
    DESC_F_WRITE,
};
use vhost_vgpu::{Daemon, VgpuConfig};

const QUOTA: u64 = 256 << 20;

/// A daemon on fresh sockets with the CPU executor.
struct Fixture {
    daemon: Option<Daemon>,
    sockets: Vec<PathBuf>,
    mediator: Arc<Mediator>,
    tenants: Vec<TenantId>,
    dir: PathBuf,
}

impl Fixture {
    fn start(name: &str, sockets: usize) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vgpu-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = VgpuConfig {
            socket_count: sockets,
            executor: ExecutorChoice::Cpu,
            mem_quota: Some(QUOTA),
            ..VgpuConfig::new(dir.join("vm"))
        };
        let daemon = Daemon::start(config).unwrap();
        Fixture {
            sockets: daemon.sockets().to_vec(),
            mediator: daemon.mediator(),
            tenants: daemon.tenants().to_vec(),
            daemon: Some(daemon),
            dir,
        }
    }

    /// Waits until the tenant holds no session and no device memory.
    fn assert_released(&self, vm: usize) {
        let tenant = self.tenants[vm];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let u = self.mediator.usage(tenant).unwrap();
            if u.sessions == 0 && u.mem_used == 0 && u.allocations == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "VM {vm} still holds {} sessions, {} bytes in {} allocations",
                u.sessions,
                u.mem_used,
                u.allocations
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ok(vm: &mut Vm, command: Command, session: u64) -> (ResponseHeader, Vec<u8>) {
    let what = format!("{command:?}");
    let (h, data) = vm.request(&Request::new(session, command)).unwrap();
    assert_eq!(h.status, Status::Ok, "{what}: detail {}", h.detail);
    (h, data)
}

fn status(vm: &mut Vm, command: Command, session: u64) -> Status {
    vm.request(&Request::new(session, command))
        .unwrap()
        .0
        .status
}

fn info(vm: &mut Vm) -> InfoReply {
    let (h, data) = ok(vm, Command::Info, 0);
    assert_eq!(h.written as usize, INFO_SIZE);
    InfoReply::decode(&data).unwrap()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn launch(
    session: u64,
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    params: Vec<Param>,
) -> Request {
    Request::new(
        session,
        Command::Launch(Launch {
            module: BUILTIN_MODULE,
            kernel: kernel.into(),
            grid,
            block,
            shared_bytes: 0,
            params,
        }),
    )
}

/// Uploads `data` into a fresh buffer; returns its handle.
fn upload(vm: &mut Vm, session: u64, data: &[u8]) -> u64 {
    let (h, _) = ok(
        vm,
        Command::Alloc {
            size: data.len() as u64,
        },
        session,
    );
    ok(
        vm,
        Command::Htod {
            dst: h.value0,
            offset: 0,
            data: data.to_vec(),
        },
        session,
    );
    h.value0
}

fn download(vm: &mut Vm, session: u64, handle: u64, len: u64) -> Vec<u8> {
    let (h, data) = ok(
        vm,
        Command::Dtoh {
            src: handle,
            offset: 0,
            len,
        },
        session,
    );
    assert_eq!(h.written as u64, len);
    data
}

/// Every operation once, results checked, in one descriptor layout.
fn every_operation(vm: &mut Vm, mediator: &Mediator, tenant: TenantId, rng: &mut StdRng) {
    let config = vm.config().clone();
    assert_eq!(config.executor, ExecutorKind::Cpu);
    assert_eq!(config.mem_quota, QUOTA);
    assert_eq!(config.num_queues, 1);
    assert_eq!(Some(config.clone()), mediator.device_config(tenant));

    let before = info(vm);
    assert_eq!(before.config, config);
    assert_eq!(
        (before.sessions, before.mem_used, before.allocations),
        (0, 0, 0)
    );

    let (h, _) = ok(vm, Command::SessionOpen, 0);
    let s = h.value0;
    assert_ne!(s, 0);
    assert_eq!(info(vm).sessions, 1);

    // ALLOC / HTOD / DTOH of random data at an offset.
    let (h, _) = ok(vm, Command::Alloc { size: 1 << 20 }, s);
    let a = h.value0;
    let u = info(vm);
    assert_eq!((u.mem_used, u.allocations), (1 << 20, 1));
    assert_eq!(mediator.usage(tenant).unwrap().mem_used, 1 << 20);
    let mut data = vec![0u8; 65536 + 17];
    rng.fill_bytes(&mut data);
    ok(
        vm,
        Command::Htod {
            dst: a,
            offset: 4096,
            data: data.clone(),
        },
        s,
    );
    let (h, back) = ok(
        vm,
        Command::Dtoh {
            src: a,
            offset: 4096,
            len: data.len() as u64,
        },
        s,
    );
    assert_eq!(h.written as usize, data.len());
    assert!(back == data, "DTOH returned other bytes than HTOD sent");

    // DTOD into a second buffer.
    let (h, _) = ok(vm, Command::Alloc { size: 8192 }, s);
    let b = h.value0;
    ok(
        vm,
        Command::Dtod {
            dst: b,
            dst_offset: 100,
            src: a,
            src_offset: 4096,
            len: 5000,
        },
        s,
    );
    let (_, back) = ok(
        vm,
        Command::Dtoh {
            src: b,
            offset: 100,
            len: 5000,
        },
        s,
    );
    assert_eq!(back, data[..5000]);

    // MEMSET, 1 and 4 bytes wide.
    ok(
        vm,
        Command::Memset {
            dst: b,
            offset: 3,
            len: 1000,
            value: 0xab,
            width: 1,
        },
        s,
    );
    ok(
        vm,
        Command::Memset {
            dst: b,
            offset: 2000,
            len: 64,
            value: 0xdead_beef,
            width: 4,
        },
        s,
    );
    let back = download(vm, s, b, 8192);
    assert!(back[3..1003].iter().all(|&x| x == 0xab));
    assert!(back[2000..2064]
        .chunks_exact(4)
        .all(|c| c == 0xdead_beef_u32.to_le_bytes()));
    assert_eq!(
        back[1003..2000],
        data[903..1900],
        "bytes around a memset are untouched"
    );

    // MODULE_LOAD: the CPU executor runs no PTX.
    assert_eq!(
        status(
            vm,
            Command::ModuleLoad {
                ptx: ".version 8.0\n.target sm_90\n".into()
            },
            s
        ),
        Status::Unsupported
    );

    every_builtin_kernel(vm, s, rng);

    ok(vm, Command::Sync, s);

    // SELFTEST, both kinds.
    let (h, msg) = ok(
        vm,
        Command::Selftest {
            test: SelftestKind::VectorAdd,
        },
        0,
    );
    let msg = String::from_utf8(msg).unwrap();
    assert_eq!(h.written as usize, msg.len());
    assert!(
        msg.starts_with("Vector add PASSED: 1024 elements, 0 errors"),
        "{msg}"
    );
    let (_, msg) = ok(
        vm,
        Command::Selftest {
            test: SelftestKind::DeviceInfo,
        },
        0,
    );
    assert_eq!(
        String::from_utf8(msg).unwrap(),
        vgpu_mediator::selftest::device_line(mediator.device())
    );

    // FREE, then the handle is gone; SESSION_CLOSE, then the session is gone.
    ok(vm, Command::Free { handle: a }, s);
    assert_eq!(
        status(vm, Command::Free { handle: a }, s),
        Status::InvalidHandle
    );
    assert_eq!(info(vm).mem_used, 8192);
    ok(vm, Command::SessionClose, s);
    assert_eq!(status(vm, Command::Sync, s), Status::InvalidSession);
    let after = info(vm);
    assert_eq!(
        (after.sessions, after.mem_used, after.allocations),
        (0, 0, 0)
    );
}

fn every_builtin_kernel(vm: &mut Vm, s: u64, rng: &mut StdRng) {
    use vgpu_kernels::reference as r;
    let n = 1000usize;
    let a: Vec<f32> = (0..n).map(|_| rng.random_range(-100.0..100.0)).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.random_range(-100.0..100.0)).collect();
    let (da, db) = (upload(vm, s, &f32s(&a)), upload(vm, s, &f32s(&b)));
    let dc = upload(vm, s, &vec![0; 4 * n]);
    let grid = [(n as u32).div_ceil(128), 1, 1];
    let block = [128, 1, 1];

    ok_launch(
        vm,
        launch(
            s,
            "vector_add_f32",
            grid,
            block,
            vec![
                Param::Buffer(da),
                Param::Buffer(db),
                Param::Buffer(dc),
                Param::u32(n as u32),
            ],
        ),
    );
    let mut want = vec![0.0; n];
    r::vector_add_f32(&a, &b, &mut want);
    assert_eq!(
        from_f32s(&download(vm, s, dc, 4 * n as u64)),
        want,
        "vector_add_f32"
    );

    ok_launch(
        vm,
        launch(
            s,
            "saxpy_f32",
            grid,
            block,
            vec![
                Param::Buffer(dc),
                Param::Buffer(da),
                Param::f32(1.5),
                Param::u32(n as u32),
            ],
        ),
    );
    r::saxpy_f32(&mut want, &a, 1.5);
    assert_eq!(
        from_f32s(&download(vm, s, dc, 4 * n as u64)),
        want,
        "saxpy_f32"
    );

    ok_launch(
        vm,
        launch(
            s,
            "scale_f32",
            grid,
            block,
            vec![Param::Buffer(dc), Param::f32(-0.25), Param::u32(n as u32)],
        ),
    );
    r::scale_f32(&mut want, -0.25);
    assert_eq!(
        from_f32s(&download(vm, s, dc, 4 * n as u64)),
        want,
        "scale_f32"
    );

    let out = upload(vm, s, &f32s(&[0.0]));
    ok_launch(
        vm,
        launch(
            s,
            "reduce_sum_f32",
            [4, 1, 1],
            [64, 1, 1],
            vec![Param::Buffer(da), Param::Buffer(out), Param::u32(n as u32)],
        ),
    );
    let sum = from_f32s(&download(vm, s, out, 4))[0];
    let expect = r::reduce_sum_f32(&a);
    let scale: f32 = a.iter().map(|x| x.abs()).sum();
    assert!(
        (sum - expect).abs() <= 1e-4 * scale,
        "reduce_sum_f32: {sum} vs {expect}"
    );

    let (m, k, nn) = (17usize, 9usize, 23usize);
    let ma: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4.0..4.0)).collect();
    let mb: Vec<f32> = (0..k * nn).map(|_| rng.random_range(-4.0..4.0)).collect();
    let (dma, dmb) = (upload(vm, s, &f32s(&ma)), upload(vm, s, &f32s(&mb)));
    let dmc = upload(vm, s, &vec![0; 4 * m * nn]);
    ok_launch(
        vm,
        launch(
            s,
            "matmul_f32",
            [(nn as u32).div_ceil(16), (m as u32).div_ceil(16), 1],
            [16, 16, 1],
            vec![
                Param::Buffer(dma),
                Param::Buffer(dmb),
                Param::Buffer(dmc),
                Param::u32(m as u32),
                Param::u32(nn as u32),
                Param::u32(k as u32),
            ],
        ),
    );
    let mut mc = vec![0.0; m * nn];
    r::matmul_f32(&ma, &mb, &mut mc, m, nn, k);
    assert_eq!(
        from_f32s(&download(vm, s, dmc, (4 * m * nn) as u64)),
        mc,
        "matmul_f32"
    );

    ok_launch(
        vm,
        launch(
            s,
            "fill_u32",
            grid,
            block,
            vec![
                Param::Buffer(dc),
                Param::u32(0x1234_5678),
                Param::u32(n as u32 - 1),
            ],
        ),
    );
    let back = download(vm, s, dc, 4 * n as u64);
    let mut fill = vec![0u32; n - 1];
    r::fill_u32(&mut fill, 0x1234_5678);
    let got: Vec<u32> = back
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got[..n - 1], fill[..], "fill_u32");
    assert_eq!(
        got[n - 1].to_le_bytes(),
        f32s(&want[n - 1..])[..],
        "fill_u32 stops at n"
    );

    // A kernel that does not exist, and a launch shape matmul refuses.
    let bad = launch(s, "no_such_kernel", grid, block, vec![]);
    assert_eq!(vm.request(&bad).unwrap().0.status, Status::KernelNotFound);
    for h in [da, db, dc, out, dma, dmb, dmc] {
        ok(vm, Command::Free { handle: h }, s);
    }
}

fn ok_launch(vm: &mut Vm, r: Request) {
    let what = format!("{:?}", r.command);
    let (h, _) = vm.request(&r).unwrap();
    assert_eq!(h.status, Status::Ok, "{what}");
}

#[test]
fn every_operation_works_through_the_socket_in_any_descriptor_layout() {
    let f = Fixture::start("ops", 1);
    let mut rng = StdRng::seed_from_u64(1);
    for (i, options) in [
        VmOptions::default(),
        VmOptions {
            indirect: true,
            notify: Notify::Polling,
            ..VmOptions::default()
        },
        VmOptions {
            features: vhost_vgpu::testvmm::F_VERSION_1,
            ..VmOptions::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let mut vm = Vm::connect_with(&f.sockets[0], options).unwrap();
        every_operation(&mut vm, &f.mediator, f.tenants[0], &mut rng);
        // The same requests cut into odd-sized pieces: the response header straddles two
        // descriptors, the request header several.
        let (h, _) = ok(&mut vm, Command::SessionOpen, 0);
        let (a, _) = ok(&mut vm, Command::Alloc { size: 4096 }, h.value0);
        for segment in [1, 7, 17, 33, 1000] {
            // At most one descriptor per byte still fits the queue for small transfers.
            let mut data = vec![0u8; if segment < 17 { 100 } else { 3000 }];
            rng.fill_bytes(&mut data);
            let len = data.len() as u64;
            let shape = Shape {
                segment: Some(segment),
                ..Shape::default()
            };
            let put = Request::new(
                h.value0,
                Command::Htod {
                    dst: a.value0,
                    offset: 5,
                    data: data.clone(),
                },
            );
            let head = vm.submit_shaped(&put, shape).unwrap();
            let (r, _) = vm.wait_for(head).unwrap().response().unwrap();
            assert_eq!(r.status, Status::Ok, "layout {i}, segment {segment}");
            let get = Request::new(
                h.value0,
                Command::Dtoh {
                    src: a.value0,
                    offset: 5,
                    len,
                },
            );
            let head = vm.submit_shaped(&get, shape).unwrap();
            let (r, back) = vm.wait_for(head).unwrap().response().unwrap();
            assert_eq!((r.status, u64::from(r.written)), (Status::Ok, len));
            assert!(back == data, "layout {i}, segment {segment}: data differs");
        }
        ok(&mut vm, Command::SessionClose, h.value0);
    }
    f.assert_released(0);
}

/// What a pipelined request must come back with.
enum Expect {
    Ok,
    Data(Vec<u8>),
    Handle,
    Info,
    Status(Status),
}

/// One VM's share of the mixed workload: requests whose outcomes follow from a shadow
/// copy of its device buffers (a tenant's requests run in submission order).
fn mixed_workload(socket: PathBuf, seed: u64, total: u64, done: Arc<AtomicU64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vm = Vm::connect_with(
        &socket,
        VmOptions {
            queue_size: 128,
            ..VmOptions::default()
        },
    )
    .unwrap();
    let (h, _) = ok(&mut vm, Command::SessionOpen, 0);
    let s = h.value0;
    const BUF: usize = 16384;
    let mut shadow = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (h, _) = ok(&mut vm, Command::Alloc { size: BUF as u64 }, s);
        ok(
            &mut vm,
            Command::Memset {
                dst: h.value0,
                offset: 0,
                len: BUF as u64,
                value: 0,
                width: 1,
            },
            s,
        );
        handles.push(h.value0);
        shadow.push(vec![0u8; BUF]);
    }
    let mut expect: HashMap<u64, Expect> = HashMap::new();
    let mut spare: Vec<u64> = Vec::new();
    let (mut sent, mut got) = (0u64, 0u64);
    let check = |c: Completion, expect: &mut HashMap<u64, Expect>, spare: &mut Vec<u64>| {
        let tag = c.token;
        let e = expect
            .remove(&tag)
            .unwrap_or_else(|| panic!("tag {tag} answered twice or never sent"));
        let (h, data) = c.response().unwrap();
        match e {
            Expect::Ok => assert_eq!(h.status, Status::Ok, "tag {tag}"),
            Expect::Data(want) => {
                assert_eq!(
                    (h.status, h.written as usize),
                    (Status::Ok, want.len()),
                    "tag {tag}"
                );
                assert!(
                    data == want,
                    "tag {tag}: DTOH bytes differ from the shadow copy"
                );
            }
            Expect::Handle => {
                assert_eq!(h.status, Status::Ok, "tag {tag}");
                spare.push(h.value0);
            }
            Expect::Info => {
                assert_eq!(h.status, Status::Ok, "tag {tag}");
                assert_eq!(InfoReply::decode(&data).unwrap().sessions, 1);
            }
            Expect::Status(s) => assert_eq!(h.status, s, "tag {tag}"),
        }
    };
    while got < total {
        while sent < total && vm.in_flight() < 48 && vm.queue().num_free() >= 4 {
            let b = rng.random_range(0..handles.len());
            let off = rng.random_range(0..BUF - 1);
            let len = rng.random_range(1..=(BUF - off).min(4096));
            let (command, e) = match rng.random_range(0..100) {
                0..=24 => {
                    let mut data = vec![0u8; len];
                    rng.fill_bytes(&mut data);
                    shadow[b][off..off + len].copy_from_slice(&data);
                    (
                        Command::Htod {
                            dst: handles[b],
                            offset: off as u64,
                            data,
                        },
                        Expect::Ok,
                    )
                }
                25..=49 => (
                    Command::Dtoh {
                        src: handles[b],
                        offset: off as u64,
                        len: len as u64,
                    },
                    Expect::Data(shadow[b][off..off + len].to_vec()),
                ),
                50..=59 => {
                    let v: u8 = rng.random();
                    shadow[b][off..off + len].fill(v);
                    (
                        Command::Memset {
                            dst: handles[b],
                            offset: off as u64,
                            len: len as u64,
                            value: v.into(),
                            width: 1,
                        },
                        Expect::Ok,
                    )
                }
                60..=67 => {
                    let d = (b + 1) % handles.len();
                    let doff = rng.random_range(0..=BUF - len);
                    let src = shadow[b][off..off + len].to_vec();
                    shadow[d][doff..doff + len].copy_from_slice(&src);
                    (
                        Command::Dtod {
                            dst: handles[d],
                            dst_offset: doff as u64,
                            src: handles[b],
                            src_offset: off as u64,
                            len: len as u64,
                        },
                        Expect::Ok,
                    )
                }
                68..=73 => {
                    let n = (len / 4) as u32;
                    let v: u32 = rng.random();
                    for w in shadow[b][..4 * n as usize].chunks_exact_mut(4) {
                        w.copy_from_slice(&v.to_le_bytes());
                    }
                    let r = launch(
                        s,
                        "fill_u32",
                        [1, 1, 1],
                        [64, 1, 1],
                        vec![Param::Buffer(handles[b]), Param::u32(v), Param::u32(n)],
                    );
                    (r.command, Expect::Ok)
                }
                74..=79 => (Command::Alloc { size: 4096 }, Expect::Handle),
                80..=85 => match spare.pop() {
                    Some(h) => (Command::Free { handle: h }, Expect::Ok),
                    None => (Command::Sync, Expect::Ok),
                },
                86..=89 => (Command::Info, Expect::Info),
                90..=93 => (
                    Command::Dtoh {
                        src: handles[b],
                        offset: BUF as u64 - 1,
                        len: 2,
                    },
                    Expect::Status(Status::OutOfRange),
                ),
                94..=96 => (
                    Command::Free {
                        handle: 0xdead_0000 + sent,
                    },
                    Expect::Status(Status::InvalidHandle),
                ),
                _ => (Command::Sync, Expect::Ok),
            };
            let session = if matches!(command, Command::Info) {
                0
            } else {
                s
            };
            let request = Request {
                session,
                tag: sent,
                command,
            };
            expect.insert(sent, e);
            vm.submit(&request).unwrap();
            sent += 1;
        }
        for c in vm.wait().unwrap() {
            check(c, &mut expect, &mut spare);
            got += 1;
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert!(
        expect.is_empty(),
        "{} requests never answered",
        expect.len()
    );
    assert_eq!(vm.in_flight(), 0);
    // The device's copy equals the shadow copy at the end.
    for (b, h) in handles.iter().enumerate() {
        assert!(
            download(&mut vm, s, *h, BUF as u64) == shadow[b],
            "buffer {b} differs"
        );
    }
    ok(&mut vm, Command::SessionClose, s);
}

#[test]
fn two_vms_pipeline_ten_thousand_mixed_requests_each_without_loss() {
    let f = Fixture::start("mixed", 2);
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (socket, done) = (f.sockets[i].clone(), done.clone());
            std::thread::spawn(move || mixed_workload(socket, 100 + i as u64, 10_000, done))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 20_000);
    f.assert_released(0);
    f.assert_released(1);
}

/// Runs `chain` on the hostile VM and returns (used len, status if one was written).
fn hostile_raw(vm: &mut Vm, descs: &[RawDesc], resp: Option<u64>) -> (u32, Option<Status>) {
    if let Some(r) = resp {
        vm.ram().fill(r, 32, 0xff).unwrap();
    }
    let head = vm.submit_raw(descs, 0).unwrap();
    let c = vm.wait_for(head).unwrap();
    let status = resp.and_then(|r| {
        ResponseHeader::decode(&vm.ram().read_vec(r, 32).unwrap())
            .ok()
            .map(|h| h.status)
    });
    (c.used_len, status)
}

fn rd(addr: u64, len: u32, link: Link) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags: 0,
        link,
    }
}

fn wr(addr: u64, len: u32, link: Link) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags: DESC_F_WRITE,
        link,
    }
}

#[test]
fn a_hostile_guest_gets_errors_and_never_disturbs_another_vm() {
    let f = Fixture::start("hostile", 2);

    // VM 1 works the whole time and checks every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let good_done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let good = {
        let (socket, stop, done) = (f.sockets[1].clone(), stop.clone(), good_done.clone());
        std::thread::spawn(move || {
            let mut vm = Vm::connect(&socket).unwrap();
            // Ids count up per VM: take some, so this VM's ids are not the other's.
            let mut s = 0;
            for _ in 0..20 {
                s = ok(&mut vm, Command::SessionOpen, 0).0.value0;
            }
            let mut a = ok(&mut vm, Command::Alloc { size: 4096 }, s).0;
            for _ in 0..20 {
                a = ok(&mut vm, Command::Alloc { size: 4096 }, s).0;
            }
            tx.send((s, a.value0)).unwrap();
            let mut i = 0u8;
            while !stop.load(Ordering::Relaxed) {
                let data = vec![i; 512];
                ok(
                    &mut vm,
                    Command::Htod {
                        dst: a.value0,
                        offset: 7,
                        data: data.clone(),
                    },
                    s,
                );
                assert!(download(&mut vm, s, a.value0, 519)[7..] == data[..]);
                done.fetch_add(1, Ordering::Relaxed);
                i = i.wrapping_add(1);
            }
            (s, a.value0)
        })
    };
    let (their_session, their_buffer) = rx.recv().unwrap();
    let progress = || good_done.load(Ordering::Relaxed);
    while progress() < 5 {
        std::thread::sleep(Duration::from_millis(1));
    }

    let options = VmOptions {
        ram_size: 8 << 20,
        arena_size: 2 << 20,
        queue_size: 64,
        ..VmOptions::default()
    };
    let mut vm = Vm::connect_with(&f.sockets[0], options).unwrap();
    let ram = vm.ram().clone();
    let (end, base) = (ram.end(), ram.base());
    let buf = vm.alloc_buffer(1 << 16).unwrap();
    let resp = buf + 0x8000;
    let (h, _) = ok(&mut vm, Command::SessionOpen, 0);
    let s = h.value0;
    let sync = Request::new(s, Command::Sync).encode();
    ram.write(buf, &sync).unwrap();
    let hdr = REQUEST_HEADER_SIZE as u32;
    assert!(
        their_session > s + 5 && their_buffer > s + 5,
        "the VMs' ids must differ"
    );
    let before = progress();

    // Chains the device cannot walk or trust come back with nothing written.
    let unanswerable: Vec<(&str, Vec<RawDesc>)> = vec![
        (
            "descriptor loop",
            vec![rd(buf, hdr, Link::To(1)), wr(resp, 32, Link::To(0))],
        ),
        ("self loop", vec![rd(buf, hdr, Link::To(0))]),
        (
            "next outside the table",
            vec![rd(buf, hdr, Link::Raw(0xffff)), wr(resp, 32, Link::End)],
        ),
        (
            "header above RAM",
            vec![rd(end + 4096, hdr, Link::To(1)), wr(resp, 32, Link::End)],
        ),
        (
            "header below RAM",
            vec![rd(base - 4096, hdr, Link::To(1)), wr(resp, 32, Link::End)],
        ),
        (
            "header across the end of RAM",
            vec![rd(end - 8, hdr, Link::To(1)), wr(resp, 32, Link::End)],
        ),
        (
            "address wraps",
            vec![rd(u64::MAX - 8, hdr, Link::To(1)), wr(resp, 32, Link::End)],
        ),
        (
            "response outside RAM",
            vec![rd(buf, hdr, Link::To(1)), wr(end, 32, Link::End)],
        ),
        (
            "4 GiB response buffer",
            vec![rd(buf, hdr, Link::To(1)), wr(resp, u32::MAX, Link::End)],
        ),
        (
            "readable after writable",
            vec![wr(resp, 32, Link::To(1)), rd(buf, hdr, Link::End)],
        ),
        (
            "response of 31 bytes",
            vec![rd(buf, hdr, Link::To(1)), wr(resp, 31, Link::End)],
        ),
        ("no writable buffer", vec![rd(buf, hdr, Link::End)]),
    ];
    for (what, descs) in &unanswerable {
        let (used, st) = hostile_raw(&mut vm, descs, Some(resp));
        assert_eq!((used, st), (0, None), "{what}");
    }

    // Indirect tables that are not tables.
    let table = buf + 0x4000;
    let write_table = |entries: &[(u64, u32, u16, u16)]| {
        for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
            vhost_vgpu::testvmm::write_desc(&ram, table + 16 * i as u64, addr, len, flags, next)
                .unwrap();
        }
    };
    let indirect = |len: u32| {
        vec![RawDesc {
            addr: table,
            len,
            flags: DESC_F_INDIRECT,
            link: Link::End,
        }]
    };
    write_table(&[
        (buf, hdr, DESC_F_NEXT, 1),
        (resp, 32, DESC_F_WRITE | DESC_F_NEXT, 0),
    ]);
    assert_eq!(
        hostile_raw(&mut vm, &indirect(32), Some(resp)),
        (0, None),
        "loop in an indirect table"
    );
    write_table(&[(buf, hdr, DESC_F_NEXT, 1), (table, 32, DESC_F_INDIRECT, 0)]);
    assert_eq!(
        hostile_raw(&mut vm, &indirect(32), Some(resp)),
        (0, None),
        "nested indirect table"
    );
    write_table(&[(buf, hdr, DESC_F_NEXT, 1), (resp, 32, DESC_F_WRITE, 0)]);
    assert_eq!(
        hostile_raw(&mut vm, &indirect(24), Some(resp)),
        (0, None),
        "table length not a multiple of 16"
    );
    let outside = vec![RawDesc {
        addr: end + 4096,
        len: 32,
        flags: DESC_F_INDIRECT,
        link: Link::End,
    }];
    assert_eq!(
        hostile_raw(&mut vm, &outside, Some(resp)).0,
        0,
        "table outside RAM"
    );
    // More descriptors than the queue holds, through an indirect table.
    let n = vm.queue().size() as usize + 1;
    let long: Vec<_> = (0..n)
        .map(|i| {
            if i + 1 < n {
                (buf + i as u64, 1, DESC_F_NEXT, i as u16 + 1)
            } else {
                (resp, 32, DESC_F_WRITE, 0)
            }
        })
        .collect();
    write_table(&long);
    assert_eq!(
        hostile_raw(&mut vm, &indirect(16 * n as u32), Some(resp)),
        (0, None),
        "chain longer than the queue"
    );
    // A table shorter than the queue is a valid (if odd) SYNC: 40 two-byte pieces.
    let short: Vec<_> = (0..40)
        .map(|i| (buf + 2 * i as u64, 2, DESC_F_NEXT, i as u16 + 1))
        .chain([(resp, 32, DESC_F_WRITE, 0)])
        .collect();
    write_table(&short);
    assert_eq!(
        hostile_raw(&mut vm, &indirect(16 * 41), Some(resp)),
        (32, Some(Status::Ok)),
        "40 two-byte descriptors"
    );

    // Chains that hold a response header get the error status for what is wrong: the
    // SYNC header with `bytes` written at `offset`.
    let answered = |vm: &mut Vm, descs: &[RawDesc]| hostile_raw(vm, descs, Some(resp));
    let simple = [rd(buf, hdr, Link::To(1)), wr(resp, 32, Link::End)];
    let cases: [(&str, usize, Vec<u8>, Status); 7] = [
        ("unknown opcode", 6, vec![99, 0], Status::UnknownOpcode),
        ("opcode 0", 6, vec![0, 0], Status::UnknownOpcode),
        ("bad magic", 0, b"XGPQ".to_vec(), Status::InvalidRequest),
        ("version 2", 4, vec![2, 0], Status::VersionMismatch),
        ("reserved flags", 8, vec![1], Status::InvalidRequest),
        (
            "another VM's session",
            16,
            their_session.to_le_bytes().to_vec(),
            Status::InvalidSession,
        ),
        (
            "a session never opened",
            16,
            u64::MAX.to_le_bytes().to_vec(),
            Status::InvalidSession,
        ),
    ];
    for (what, offset, bytes, want) in &cases {
        let mut h = sync.clone();
        h[*offset..offset + bytes.len()].copy_from_slice(bytes);
        ram.write(buf, &h).unwrap();
        assert_eq!(answered(&mut vm, &simple), (32, Some(*want)), "{what}");
    }
    ram.write(buf, &sync).unwrap();
    let truncated = [rd(buf, 40, Link::To(1)), wr(resp, 32, Link::End)];
    assert_eq!(
        answered(&mut vm, &truncated),
        (32, Some(Status::InvalidRequest)),
        "truncated header"
    );
    let in_writable = [wr(buf, hdr, Link::To(1)), wr(resp, 32, Link::End)];
    assert_eq!(
        answered(&mut vm, &in_writable).1,
        Some(Status::InvalidRequest),
        "header in a writable buffer"
    );
    let zero = [
        rd(buf, hdr, Link::To(1)),
        rd(buf + 200, 0, Link::To(2)),
        wr(resp, 32, Link::End),
    ];
    assert_eq!(
        answered(&mut vm, &zero),
        (32, Some(Status::InvalidRequest)),
        "zero-length descriptor"
    );
    let extra = [rd(buf, hdr + 8, Link::To(1)), wr(resp, 32, Link::End)];
    assert_eq!(
        answered(&mut vm, &extra),
        (32, Some(Status::InvalidRequest)),
        "payload a SYNC has not"
    );
    // HTOD that announces more bytes than it carries; DTOH into a too small buffer.
    let (a, _) = ok(&mut vm, Command::Alloc { size: 1 << 20 }, s);
    let htod = Request::new(
        s,
        Command::Htod {
            dst: a.value0,
            offset: 0,
            data: vec![7; 100],
        },
    )
    .encode();
    ram.write(buf, &htod[..hdr as usize + 50]).unwrap();
    let short_payload = [rd(buf, hdr + 50, Link::To(1)), wr(resp, 32, Link::End)];
    assert_eq!(
        answered(&mut vm, &short_payload),
        (32, Some(Status::InvalidRequest)),
        "HTOD payload short"
    );
    let dtoh = Request::new(
        s,
        Command::Dtoh {
            src: a.value0,
            offset: 0,
            len: 1 << 20,
        },
    )
    .encode();
    ram.write(buf, &dtoh).unwrap();
    let small = [
        rd(buf, hdr, Link::To(1)),
        wr(buf + 0x1000, 16, Link::To(2)),
        wr(resp, 32, Link::End),
    ];
    assert_eq!(
        answered(&mut vm, &small),
        (32, Some(Status::BufferTooSmall)),
        "DTOH into 16 bytes"
    );
    // Another VM's buffer is no handle of this session.
    let theirs = Request::new(
        s,
        Command::Dtoh {
            src: their_buffer,
            offset: 0,
            len: 16,
        },
    );
    assert_eq!(
        vm.request(&theirs).unwrap().0.status,
        Status::InvalidHandle,
        "another VM's buffer"
    );
    // A head outside the queue can never come back; the queue goes on regardless.
    let size = vm.queue().size();
    vm.queue_mut().push_avail(size + 5).unwrap();
    vm.flush().unwrap();
    assert_eq!(info(&mut vm).sessions, 1);

    // 1,000 random chains: each comes back once, claiming no more than it could hold.
    let scratch = Scratch::take_rest(&ram).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut input = vec![0u8; 1024];
    let mut answered_with_status = 0;
    for i in 0..1000u64 {
        rng.fill_bytes(&mut input);
        let (chain, c) = hostile::submit(&mut vm, scratch, &mut Bytes::new(&input), i).unwrap();
        assert_eq!(c.token, i);
        assert!(
            u64::from(c.used_len) <= chain.max_used,
            "chain {i}: used len {} > {} writable bytes: {:?}",
            c.used_len,
            chain.max_used,
            chain.descs
        );
        if c.used_len > 0 {
            answered_with_status += 1;
        }
        if i % 100 == 99 {
            info(&mut vm);
        }
    }
    assert!(
        answered_with_status > 200,
        "only {answered_with_status} random chains reached decoding"
    );
    assert!(
        progress() > before,
        "the other VM made no progress meanwhile"
    );

    // The hostile VM's own requests still work, and leaving frees what it held.
    assert_eq!(status(&mut vm, Command::Sync, s), Status::Ok);
    drop(vm);
    f.assert_released(0);
    stop.store(true, Ordering::Relaxed);
    let (s1, _) = good.join().unwrap();
    assert_eq!(s1, their_session);
}

#[test]
fn disconnecting_mid_request_a_hundred_times_leaves_nothing_behind() {
    let f = Fixture::start("reconnect", 1);
    let mut rng = StdRng::seed_from_u64(9);
    let options = VmOptions {
        ram_size: 4 << 20,
        arena_size: 2 << 20,
        queue_size: 64,
        ..VmOptions::default()
    };
    for round in 0..100 {
        let mut vm = Vm::connect_with(&f.sockets[0], options.clone()).unwrap();
        // What the previous VM held is gone before this one is served.
        let u = info(&mut vm);
        assert_eq!(
            (u.sessions, u.mem_used, u.allocations),
            (0, 0, 0),
            "round {round}"
        );
        let (h, _) = ok(&mut vm, Command::SessionOpen, 0);
        let s = h.value0;
        let (a, _) = ok(&mut vm, Command::Alloc { size: 65536 }, s);
        // Leave work in flight: copies, allocations, launches, a second session.
        let mut data = vec![0u8; 32768];
        rng.fill_bytes(&mut data);
        let inflight = [
            Command::Htod {
                dst: a.value0,
                offset: 0,
                data,
            },
            Command::Alloc { size: 1 << 20 },
            Command::Dtoh {
                src: a.value0,
                offset: 0,
                len: 65536,
            },
            launch(
                s,
                "fill_u32",
                [16, 1, 1],
                [256, 1, 1],
                vec![
                    Param::Buffer(a.value0),
                    Param::u32(round),
                    Param::u32(16384),
                ],
            )
            .command,
            Command::Alloc { size: 4 << 20 },
            Command::Sync,
        ];
        let n = rng.random_range(0..=inflight.len());
        for command in inflight.into_iter().take(n) {
            vm.submit(&Request::new(s, command)).unwrap();
        }
        if round % 3 == 0 {
            vm.submit(&Request::new(0, Command::SessionOpen)).unwrap();
        }
        if round % 10 == 0 {
            // Sometimes wait for part of it, so disconnects also land between completions.
            let _ = vm.wait_timeout(Duration::from_millis(50));
        }
        drop(vm);
    }
    f.assert_released(0);
    let u = f.mediator.usage(f.tenants[0]).unwrap();
    assert_eq!(
        (u.sessions, u.mem_used, u.allocations, u.modules),
        (0, 0, 0, 0)
    );
}

/// A chain laid out by hand over guest buffers (what the benchmark submits) is answered
/// in place, with the used length the response occupies.
#[test]
fn a_hand_laid_chain_from_guest_buffers_is_answered_in_place() {
    let f = Fixture::start("laid", 1);
    let mut vm = Vm::connect(&f.sockets[0]).unwrap();
    let at = vm.alloc_buffer(4096).unwrap();
    vm.ram()
        .write(at, &Request::new(0, Command::Info).encode())
        .unwrap();
    let head = vm
        .submit_chain(
            &[Buf::readable(at, 80), Buf::writable(at + 1024, 192 + 32)],
            42,
        )
        .unwrap();
    let c = vm.wait_for(head).unwrap();
    assert_eq!((c.token, c.used_len), (42, 192 + 32));
    let h = ResponseHeader::decode(&vm.ram().read_vec(at + 1024 + 192, 32).unwrap()).unwrap();
    assert_eq!((h.status, h.written), (Status::Ok, 192));
}

/// A fuzzer finding: with EVENT_IDX, an available index more than a queue ahead of the
/// device makes the backend's pop / re-enable loop spin in the vring worker, which then
/// never stops, so the VM can neither be served nor reconnect.
#[test]
fn a_guest_publishing_more_than_a_queue_can_still_leave() {
    let f = Fixture::start("overfull", 1);
    let options = VmOptions {
        queue_size: 16,
        timeout: Duration::from_secs(5),
        ..VmOptions::default()
    };
    let outcome = (|| -> Result<InfoReply, vhost_vgpu::testvmm::Error> {
        let mut vm = Vm::connect_with(&f.sockets[0], options.clone())?;
        for _ in 0..=vm.queue().size() {
            vm.queue_mut().push_avail(0)?;
        }
        vm.flush()?;
        std::thread::sleep(Duration::from_millis(50));
        drop(vm);
        let mut vm = Vm::connect_with(&f.sockets[0], options.clone())?;
        let (h, data) = vm.request(&Request::new(0, Command::Info))?;
        assert_eq!(h.status, Status::Ok);
        Ok(InfoReply::decode(&data).unwrap())
    })();
    match outcome {
        Ok(info) => assert_eq!(info.sessions, 0),
        Err(e) => {
            // A spinning worker never joins: do not wait for the daemon to stop.
            std::mem::forget(f);
            panic!("the VM could not come back: {e}");
        }
    }
}

/// A fuzzer finding: the mediator multiplies a launch's block dimensions in u64 before it
/// checks them, so a block of 2^31 x 2^31 x 2^31 overflows; with overflow checks (debug
/// builds, tests) the tenant's worker panics and every request of the VM is lost.
#[test]
fn a_launch_with_an_enormous_block_is_refused() {
    let f = Fixture::start("block", 1);
    let options = VmOptions {
        timeout: Duration::from_secs(5),
        ..VmOptions::default()
    };
    let mut vm = Vm::connect_with(&f.sockets[0], options).unwrap();
    let (h, _) = ok(&mut vm, Command::SessionOpen, 0);
    let huge = 1 << 31;
    let r = launch(h.value0, "fill_u32", [1, 1, 1], [huge, huge, huge], vec![]);
    let outcome = vm.request(&r);
    let alive = vm.request(&Request::new(0, Command::Info));
    drop(vm);
    if outcome.is_err() || alive.is_err() {
        // A dead worker leaves requests unanswered: do not wait for the daemon to stop.
        std::mem::forget(f);
    }
    assert_eq!(outcome.unwrap().0.status, Status::InvalidArgument);
    assert_eq!(alive.unwrap().0.status, Status::Ok);
}

/// The real `vhost-vgpu` binary serving two VMs on the CPU executor, with `args` added, in
/// a fresh directory: (the directory, the socket base path, the daemon).
fn two_vm_daemon(tag: &str, args: &[&str]) -> (PathBuf, PathBuf, std::process::Child) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("vm");
    let daemon = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-vgpu"))
        .arg("--socket-path")
        .arg(&base)
        .args(["--socket-count", "2", "--executor", "cpu"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (dir, base, daemon)
}

/// A hostile guest describes host buffers it has no business describing, through the
/// real `vhost-vgpu` binary: memory outside its RAM, pages it already registered, torn
/// chunk lists, too many buffers, copies half inside a registered buffer. Every attempt
/// is refused or served correctly; the daemon lives on, and the other VM never notices.
#[test]
fn a_hostile_guest_cannot_register_host_buffers_it_does_not_own() {
    use vgpu_protocol::{HostChunk, Op};
    let (dir, base, mut daemon) = two_vm_daemon("vgpu-test-hostbuf", &["--mem-quota", "256M"]);
    let socket = |i: usize| PathBuf::from(format!("{}{i}", base.display()));
    let mut vm = Vm::connect(socket(0)).unwrap();
    let mut other = Vm::connect(socket(1)).unwrap();
    let s = ok(&mut vm, Command::SessionOpen, 0).0.value0;
    let page = 4096u64;
    let (ram_base, ram_end) = (vm.ram().base(), vm.ram().end());
    let register = |id: u64, chunks: Vec<HostChunk>| Command::HostRegister { id, chunks };
    let chunk = |addr: u64, len: u64| HostChunk { addr, len };

    // Memory the VM does not have: past its RAM, straddling its end, at address 0 when
    // RAM starts above it, and near the top of the address space.
    for bad in [
        vec![chunk(ram_end, page)],
        vec![chunk(ram_end - page, 2 * page)],
        vec![chunk(!(page - 1), page)],
        vec![chunk(ram_end + (1 << 30), 1 << 20)],
    ] {
        let st = status(&mut vm, register(1, bad.clone()), s);
        assert!(
            matches!(st, Status::InvalidArgument | Status::InvalidRequest),
            "{bad:?}: {st:?}"
        );
    }
    if ram_base >= page {
        assert_ne!(
            status(&mut vm, register(1, vec![chunk(0, page)]), s),
            Status::Ok
        );
    }

    // A chunk list that does not add up to the length the header claims, and one with
    // more chunks than pages: refused before any of it is used.
    let at = vm.ram().alloc(8 * page, page).unwrap();
    let mut header = Request::new(s, register(2, vec![chunk(at, 2 * page)])).header();
    header.op = Op::HostRegister {
        id: 2,
        len: 4 * page,
        chunks: 1,
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&at.to_le_bytes());
    bytes.extend_from_slice(&(2 * page).to_le_bytes());
    let req = vm.ram().alloc(bytes.len() as u64, 16).unwrap();
    vm.ram().write(req, &bytes).unwrap();
    let resp = vm.ram().alloc(32, 16).unwrap();
    let (_, st) = hostile_raw(
        &mut vm,
        &[
            rd(req, bytes.len() as u32, Link::To(1)),
            wr(resp, 32, Link::End),
        ],
        Some(resp),
    );
    assert!(matches!(st, Some(Status::InvalidArgument)), "{st:?}");
    header.op = Op::HostRegister {
        id: 2,
        len: page,
        chunks: 2,
    };
    let mut torn = header.encode().to_vec();
    torn.extend_from_slice(&[0u8; 32]);
    vm.ram().write(req, &torn).unwrap();
    let (_, st) = hostile_raw(
        &mut vm,
        &[
            rd(req, torn.len() as u32, Link::To(1)),
            wr(resp, 32, Link::End),
        ],
        Some(resp),
    );
    assert!(matches!(st, Some(Status::InvalidArgument)), "{st:?}");

    // Its own pages, once: then the same pages, or the same id, again are refused.
    let data: Vec<u8> = (0..4 * page).map(|i| (i % 241) as u8).collect();
    vm.ram().write(at, &data).unwrap();
    ok(&mut vm, register(3, vec![chunk(at, 4 * page)]), s);
    assert_eq!(
        status(&mut vm, register(4, vec![chunk(at + page, page)]), s),
        Status::InvalidArgument
    );
    assert_eq!(
        status(&mut vm, register(3, vec![chunk(at + 4 * page, page)]), s),
        Status::InvalidArgument
    );
    // Up to the per-session limit of buffers, not one more.
    let mut last = Status::Ok;
    for id in 100..400u64 {
        let page_at = vm.ram().alloc(page, page).unwrap();
        last = status(&mut vm, register(id, vec![chunk(page_at, page)]), s);
        if last != Status::Ok {
            break;
        }
    }
    assert_eq!(last, Status::LimitExceeded);

    // A copy that starts in the registered buffer and runs past it: the ordinary path,
    // and the right bytes either way.
    let handle = ok(&mut vm, Command::Alloc { size: 8 * page }, s).0.value0;
    let tail: Vec<u8> = (0..2 * page).map(|i| (i % 239) as u8).collect();
    vm.ram().write(at + 4 * page, &tail).unwrap();
    let mut both = data[2 * page as usize..].to_vec();
    both.extend_from_slice(&tail);
    let head = Request::new(
        s,
        Command::Htod {
            dst: handle,
            offset: 0,
            data: both.clone(),
        },
    )
    .header()
    .encode();
    vm.ram().write(req, &head).unwrap();
    let (_, st) = hostile_raw(
        &mut vm,
        &[
            rd(req, REQUEST_HEADER_SIZE as u32, Link::To(1)),
            rd(at + 2 * page, both.len() as u32, Link::To(2)),
            wr(resp, 32, Link::End),
        ],
        Some(resp),
    );
    assert_eq!(st, Some(Status::Ok));
    assert_eq!(download(&mut vm, s, handle, both.len() as u64), both);

    // Unregistering what is not there; then everything still works, here and next door.
    assert_eq!(
        status(&mut vm, Command::HostUnregister { id: 77 }, s),
        Status::InvalidHandle
    );
    ok(&mut vm, Command::HostUnregister { id: 3 }, s);
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
    let o = ok(&mut other, Command::SessionOpen, 0).0.value0;
    let payload = f32s(&[1.0, 2.0, 3.0]);
    let h = upload(&mut other, o, &payload);
    assert_eq!(download(&mut other, o, h, payload.len() as u64), payload);
    assert_eq!(download(&mut vm, s, handle, both.len() as u64), both);

    drop((vm, other));
    // SAFETY: signals the child this test started.
    unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    let exit = daemon.wait().unwrap();
    assert!(exit.success(), "vhost-vgpu ended with {exit}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_hostile_guest_cannot_hold_the_device_or_take_more_than_its_share() {
    // The real binary, as a host runs it: the CPU executor in process, a 2 s watchdog.
    let (dir, base, mut daemon) = two_vm_daemon(
        "vgpu-test-hog",
        &["--mem-quota", "64M", "--kernel-timeout", "2"],
    );
    let socket = |i: usize| PathBuf::from(format!("{}{i}", base.display()));
    let connect = |i: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Vm::connect(socket(i)) {
                Ok(vm) => return vm,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("VM {i}: {e}"),
            }
        }
    };
    let mut hog = connect(0);
    let mut other = connect(1);
    let s = ok(&mut hog, Command::SessionOpen, 0).0.value0;
    let out = ok(&mut hog, Command::Alloc { size: 4096 }, s).0.value0;

    // The largest grid there is over 4 elements: cut to one block, done at once.
    let started = Instant::now();
    let huge = [(1 << 31) - 1, 65535, 65535];
    let fill = launch(
        s,
        "fill_u32",
        huge,
        [1024, 1, 1],
        vec![Param::Buffer(out), Param::u32(7), Param::u32(4)],
    );
    assert_eq!(hog.request(&fill).unwrap().0.status, Status::Ok);
    ok(&mut hog, Command::Sync, s);
    assert!(started.elapsed() < Duration::from_secs(1));
    // More blocks than spin_us allows: refused.
    let wide = launch(
        s,
        "spin_us",
        [1025, 1, 1],
        [32, 1, 1],
        vec![Param::Buffer(out), Param::u32(10)],
    );
    assert_eq!(
        hog.request(&wide).unwrap().0.status,
        Status::InvalidArgument
    );

    // A kernel of 71 minutes, then as many more as the ring holds queued behind it.
    let forever = launch(
        s,
        "spin_us",
        [1, 1, 1],
        [32, 1, 1],
        vec![Param::Buffer(out), Param::u32(u32::MAX)],
    );
    let started = Instant::now();
    let stuck = hog.submit(&forever).unwrap();
    let mut flood = 0;
    let more = launch(
        s,
        "spin_us",
        [1, 1, 1],
        [32, 1, 1],
        vec![Param::Buffer(out), Param::u32(1000)],
    );
    while hog.submit(&more).is_ok() {
        flood += 1;
    }
    assert!(flood >= 50, "only {flood} launches fit the ring");

    // The other VM is served meanwhile, every answer right and prompt.
    let t = ok(&mut other, Command::SessionOpen, 0).0.value0;
    let a: Vec<f32> = (0..4096).map(|i| i as f32).collect();
    let (da, dc) = (
        upload(&mut other, t, &f32s(&a)),
        upload(&mut other, t, &f32s(&a)),
    );
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(2500) {
        let t0 = Instant::now();
        let add = launch(
            t,
            "vector_add_f32",
            [16, 1, 1],
            [256, 1, 1],
            vec![
                Param::Buffer(da),
                Param::Buffer(da),
                Param::Buffer(dc),
                Param::u32(4096),
            ],
        );
        ok(
            &mut other,
            Command::Launch(match add.command {
                Command::Launch(l) => l,
                _ => unreachable!(),
            }),
            t,
        );
        let (_, data) = ok(
            &mut other,
            Command::Dtoh {
                src: dc,
                offset: 0,
                len: 4 * 4096,
            },
            t,
        );
        assert!(from_f32s(&data)
            .iter()
            .enumerate()
            .all(|(i, &v)| v == 2.0 * i as f32));
        slowest = slowest.max(t0.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "the other VM waited {slowest:?}"
    );

    // The watchdog ended the hog's kernel: DEVICE_LOST with CUDA's launch-timeout number.
    let (h, _) = hog.wait_for(stuck).unwrap().response().unwrap();
    assert_eq!((h.status, h.detail), (Status::DeviceLost, 702));
    let ended = started.elapsed();
    assert!(
        ended >= Duration::from_secs(2) && ended < Duration::from_secs(6),
        "{ended:?}"
    );
    // A new session of the hog works; the daemon stops promptly with its flood queued.
    let fresh = ok(&mut hog, Command::SessionOpen, 0).0.value0;
    ok(&mut hog, Command::Alloc { size: 16 }, fresh);
    // SAFETY: sends SIGTERM to the daemon this test started.
    unsafe {
        libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM);
    }
    let stopping = Instant::now();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hostile guest aims the driver-API requests at the host, through the real
/// `vhost-vgpu` binary: module images built to mislead the parser that reads them in the
/// daemon (tables past the end, sizes near 2^64, a fatbin whose entries go nowhere),
/// compiles that would read host files, names of modules and kernels it does not have, an
/// attribute count the protocol does not allow. Each gets an error; the daemon keeps serving this VM and the other.
#[test]
fn a_hostile_guest_gets_errors_from_the_driver_api_requests() {
    let (dir, base, mut daemon) = two_vm_daemon("vgpu-test-driverapi", &["--mem-quota", "256M"]);
    let socket = |i: usize| PathBuf::from(format!("{}{i}", base.display()));
    let mut vm = Vm::connect(socket(0)).unwrap();
    let mut other = Vm::connect(socket(1)).unwrap();
    let s = ok(&mut vm, Command::SessionOpen, 0).0.value0;

    // Images: an ELF header whose section table lies at 2^64 - 1 with 65535 entries, one
    // whose table starts inside the image and runs far past it, a fatbin that claims
    // 2^64 - 1 bytes, one whose entry has size 0 (a parser that trusts it loops), and
    // noise. The CPU executor loads no images; the daemon must still read each safely.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    let mut far = elf.clone();
    far[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
    far[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    far[0x3c..0x3e].copy_from_slice(&u16::MAX.to_le_bytes());
    let mut past = elf.clone();
    past.resize(256, 0);
    past[0x28..0x30].copy_from_slice(&128u64.to_le_bytes());
    past[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    past[0x3c..0x3e].copy_from_slice(&1000u16.to_le_bytes());
    let mut huge = vec![0u8; 64];
    huge[..4].copy_from_slice(&0xba55_ed50u32.to_le_bytes());
    huge[4..6].copy_from_slice(&1u16.to_le_bytes());
    huge[6..8].copy_from_slice(&16u16.to_le_bytes());
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut stuck = huge.clone();
    stuck[8..16].copy_from_slice(&48u64.to_le_bytes());
    let mut rng = StdRng::seed_from_u64(0xd1e5);
    let mut noise = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut noise);
    for image in [far, past, huge, stuck, noise] {
        let st = status(&mut vm, Command::ModuleLoadImage { image }, s);
        assert!(
            matches!(
                st,
                Status::Unsupported | Status::ModuleInvalid | Status::InvalidArgument
            ),
            "{st:?}"
        );
    }

    // Compiles that would read host files: refused by option or by line, before anything
    // runs (the CPU executor would answer UNSUPPORTED after the checks).
    let compile = |source: &str, options: &[&str]| Command::Compile {
        source: source.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        out_len: 1 << 16,
    };
    for (source, options, detail) in [
        ("__global__ void k() {}", &["-O3", "-I/etc"][..], 1),
        (
            "__global__ void k() {}",
            &["--pre-include=/etc/passwd"][..],
            0,
        ),
        ("__global__ void k() {}", &["@/etc/nvrtc.opts"][..], 0),
        (
            "#include \"/etc/passwd\"\n",
            &[][..],
            vgpu_mediator::COMPILE_SOURCE_REFUSED,
        ),
        (
            "\n#include <../../etc/shadow>\n",
            &[][..],
            vgpu_mediator::COMPILE_SOURCE_REFUSED,
        ),
        (
            "#if __has_include(\"/root/.ssh/id_rsa\")\n#endif\n",
            &[][..],
            vgpu_mediator::COMPILE_SOURCE_REFUSED,
        ),
    ] {
        let (h, _) = vm
            .request(&Request::new(s, compile(source, options)))
            .unwrap();
        assert_eq!(
            (h.status, h.detail),
            (Status::InvalidArgument, detail),
            "{source:?} {options:?}"
        );
    }

    // Modules and kernels that are not there; an attribute count out of range (refused
    // when the header is read).
    let function = |module: u64, name: &str| Command::FunctionInfo {
        module,
        name: name.into(),
    };
    assert_eq!(
        status(&mut vm, function(BUILTIN_MODULE, "no_such_kernel"), s),
        Status::KernelNotFound
    );
    assert_eq!(
        status(&mut vm, function(0xdead, "vector_add_f32"), s),
        Status::InvalidHandle
    );
    let global = Command::ModuleGlobal {
        module: 0xdead,
        name: "table".into(),
    };
    assert_eq!(status(&mut vm, global, s), Status::InvalidHandle);
    for count in [0, vgpu_protocol::MAX_DEVICE_ATTRIBUTES + 1] {
        assert_eq!(
            status(&mut vm, Command::DeviceAttributes { count }, s),
            Status::InvalidArgument
        );
    }

    // Still served, and where the GPU sits in the host stays hidden.
    let (h, data) = ok(&mut vm, Command::DeviceAttributes { count: 134 }, s);
    assert_eq!(h.value0, 134);
    let attr = |n: usize| i32::from_le_bytes(data[4 * (n - 1)..4 * n].try_into().unwrap());
    assert_eq!((attr(33), attr(34), attr(50), attr(134)), (0, 0, 0, -1));
    let buf = upload(&mut vm, s, &f32s(&[1.0, 2.0]));
    assert_eq!(from_f32s(&download(&mut vm, s, buf, 8)), vec![1.0, 2.0]);
    assert_eq!(info(&mut other).config.executor, ExecutorKind::Cpu);
    drop(vm);
    drop(other);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
