// SPDX-License-Identifier: Apache-2.0
//! The mediator's rules, exercised through its public API with the CPU executor: every
//! refused request gets its specific status and the mediator serves on afterwards.

use std::sync::Arc;

use vgpu_mediator::cpu::{CpuExecutorFactory, CPU_DEVICE_NAME};
use vgpu_mediator::{ExecutorFactory, Mediator, TenantConfig, TenantId};
use vgpu_protocol::{
    Command, InfoReply, Launch, Param, Request, Response, SelftestKind, Status, BUILTIN_MODULE,
};

const QUOTA: u64 = 1 << 20;

fn mediator() -> Arc<Mediator> {
    Mediator::new(crate::executor_factory())
}

/// The executor these cases run on: the CPU executor in this process. `tests/process.rs`
/// includes this file as a module and runs every case again with the CPU executor in
/// worker processes.
#[allow(dead_code)] // unused where this file is included as a module
fn executor_factory() -> Arc<dyn ExecutorFactory> {
    Arc::new(CpuExecutorFactory::new())
}

fn tenant(m: &Mediator, name: &str) -> TenantId {
    m.add_tenant(TenantConfig {
        name: name.into(),
        mem_quota: QUOTA,
        weight: 100,
    })
    .unwrap()
}

fn call(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    m.call(t, Request::new(session, command))
}

fn ok(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    let r = call(m, t, session, command.clone());
    assert_eq!(r.status, Status::Ok, "{command:?}");
    r
}

fn open(m: &Mediator, t: TenantId) -> u64 {
    ok(m, t, 0, Command::SessionOpen).value0
}

fn alloc(m: &Mediator, t: TenantId, s: u64, size: u64) -> u64 {
    ok(m, t, s, Command::Alloc { size }).value0
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn launch(kernel: &str, grid: [u32; 3], block: [u32; 3], params: Vec<Param>) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: kernel.into(),
        grid,
        block,
        shared_bytes: 0,
        params,
    })
}

/// A round trip that must still work after each refusal.
fn still_serves(m: &Mediator, t: TenantId, s: u64) {
    let h = alloc(m, t, s, 16);
    ok(
        m,
        t,
        s,
        Command::Htod {
            dst: h,
            offset: 0,
            data: vec![7; 16],
        },
    );
    assert_eq!(
        ok(
            m,
            t,
            s,
            Command::Dtoh {
                src: h,
                offset: 0,
                len: 16
            }
        )
        .data,
        vec![7; 16]
    );
    ok(m, t, s, Command::Free { handle: h });
    ok(m, t, s, Command::Sync);
}

fn expect(m: &Mediator, t: TenantId, s: u64, command: Command, status: Status) {
    assert_eq!(call(m, t, s, command.clone()).status, status, "{command:?}");
    still_serves(m, t, s);
}

#[test]
fn allocation_over_quota_is_quota_exceeded() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let a = alloc(&m, t, s, QUOTA - 64);
    expect(&m, t, s, Command::Alloc { size: 65 }, Status::QuotaExceeded);
    expect(
        &m,
        t,
        s,
        Command::Alloc { size: u64::MAX },
        Status::QuotaExceeded,
    );
    ok(&m, t, s, Command::Free { handle: a });
    alloc(&m, t, s, QUOTA);
}

#[test]
fn zero_sized_allocation_is_invalid_argument() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    expect(
        &m,
        t,
        s,
        Command::Alloc { size: 0 },
        Status::InvalidArgument,
    );
}

#[test]
fn unknown_handle_is_invalid_handle() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    expect(
        &m,
        t,
        s,
        Command::Dtoh {
            src: 12345,
            offset: 0,
            len: 4,
        },
        Status::InvalidHandle,
    );
    expect(
        &m,
        t,
        s,
        Command::Free { handle: 12345 },
        Status::InvalidHandle,
    );
    expect(
        &m,
        t,
        s,
        Command::ModuleUnload { module: 12345 },
        Status::InvalidHandle,
    );
}

#[test]
fn another_sessions_handle_is_invalid_handle() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let (s1, s2) = (open(&m, t), open(&m, t));
    let h = alloc(&m, t, s1, 64);
    expect(
        &m,
        t,
        s2,
        Command::Htod {
            dst: h,
            offset: 0,
            data: vec![1; 8],
        },
        Status::InvalidHandle,
    );
    expect(
        &m,
        t,
        s2,
        Command::Free { handle: h },
        Status::InvalidHandle,
    );
    ok(
        &m,
        t,
        s1,
        Command::Dtoh {
            src: h,
            offset: 0,
            len: 64,
        },
    );
}

#[test]
fn another_tenants_handle_and_session_are_refused() {
    let m = mediator();
    let (t1, t2) = (tenant(&m, "vm1"), tenant(&m, "vm2"));
    let (s1, s2) = (open(&m, t1), open(&m, t2));
    let h = alloc(&m, t1, s1, 64);
    ok(
        &m,
        t1,
        s1,
        Command::Htod {
            dst: h,
            offset: 0,
            data: vec![9; 64],
        },
    );
    // Through its own session, tenant 2 can neither read nor free tenant 1's buffer.
    expect(
        &m,
        t2,
        s2,
        Command::Dtoh {
            src: h,
            offset: 0,
            len: 64,
        },
        Status::InvalidHandle,
    );
    expect(
        &m,
        t2,
        s2,
        Command::Free { handle: h },
        Status::InvalidHandle,
    );
    // Tenant 1's session id means nothing to tenant 2.
    expect(
        &m,
        t2,
        s2,
        Command::Free { handle: h },
        Status::InvalidHandle,
    );
    if s1 != s2 {
        assert_eq!(
            call(&m, t2, s1, Command::Free { handle: h }).status,
            Status::InvalidSession
        );
    }
    assert_eq!(
        call(&m, t2, 999, Command::Sync).status,
        Status::InvalidSession
    );
    // Tenant 2 sees only its own usage.
    let info = InfoReply::decode(&ok(&m, t2, 0, Command::Info).data).unwrap();
    assert_eq!((info.mem_used, info.allocations, info.sessions), (0, 0, 1));
    // Tenant 1's data is intact.
    assert_eq!(
        ok(
            &m,
            t1,
            s1,
            Command::Dtoh {
                src: h,
                offset: 0,
                len: 64
            }
        )
        .data,
        vec![9; 64]
    );
    assert_eq!(m.usage(t1).unwrap().mem_used, 64);
}

#[test]
fn use_after_free_and_double_free_are_invalid_handle() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let h = alloc(&m, t, s, 64);
    ok(&m, t, s, Command::Free { handle: h });
    expect(
        &m,
        t,
        s,
        Command::Dtoh {
            src: h,
            offset: 0,
            len: 4,
        },
        Status::InvalidHandle,
    );
    expect(&m, t, s, Command::Free { handle: h }, Status::InvalidHandle);
    assert_eq!(m.usage(t).unwrap().mem_used, 0);
}

#[test]
fn ptx_on_the_cpu_executor_is_unsupported() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let ptx = ".version 8.0\n.target sm_90\n.address_size 64\n".to_string();
    expect(&m, t, s, Command::ModuleLoad { ptx }, Status::Unsupported);
}

#[test]
fn unknown_kernel_name_is_kernel_not_found() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    expect(
        &m,
        t,
        s,
        launch("no_such_kernel", [1; 3], [1; 3], vec![]),
        Status::KernelNotFound,
    );
}

#[test]
fn parameter_size_or_kind_mismatch_is_invalid_argument() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let x = alloc(&m, t, s, 64);
    let fill = |n: Param| {
        launch(
            "fill_u32",
            [1, 1, 1],
            [32, 1, 1],
            vec![Param::Buffer(x), Param::u32(1), n],
        )
    };
    ok(&m, t, s, fill(Param::u32(16)));
    let r = call(&m, t, s, fill(Param::u64(16)));
    assert_eq!((r.status, r.detail), (Status::InvalidArgument, 2));
    // A value where a buffer belongs, and too few parameters.
    let r = call(
        &m,
        t,
        s,
        launch(
            "fill_u32",
            [1; 3],
            [1; 3],
            vec![Param::u64(x), Param::u32(1), Param::u32(1)],
        ),
    );
    assert_eq!((r.status, r.detail), (Status::InvalidArgument, 0));
    expect(
        &m,
        t,
        s,
        launch("fill_u32", [1; 3], [1; 3], vec![Param::Buffer(x)]),
        Status::InvalidArgument,
    );
}

#[test]
fn grid_or_block_of_zero_or_over_the_limits_is_invalid_argument() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let x = alloc(&m, t, s, 64);
    let fill = |grid, block| {
        launch(
            "fill_u32",
            grid,
            block,
            vec![Param::Buffer(x), Param::u32(1), Param::u32(16)],
        )
    };
    ok(&m, t, s, fill([2, 1, 1], [8, 1, 1]));
    for (grid, block) in [
        ([0, 1, 1], [32, 1, 1]),
        ([1, 0, 1], [32, 1, 1]),
        ([1, 1, 1], [0, 1, 1]),
        ([1, 1, 1], [32, 1, 0]),
        ([1 << 31, 1, 1], [32, 1, 1]),
        ([1, 1, 1], [u32::MAX, u32::MAX, u32::MAX]),
        ([1, 65536, 1], [32, 1, 1]),
        ([1, 1, 1], [1025, 1, 1]),
        ([1, 1, 1], [64, 32, 1]),
        ([1, 1, 1], [1, 1, 65]),
    ] {
        expect(&m, t, s, fill(grid, block), Status::InvalidArgument);
    }
    let mut big_shared = fill([1; 3], [1; 3]);
    if let Command::Launch(l) = &mut big_shared {
        l.shared_bytes = vgpu_mediator::MAX_SHARED_BYTES + 1;
    }
    expect(&m, t, s, big_shared, Status::InvalidArgument);
}

#[test]
fn copy_ranges_past_the_end_of_an_allocation_are_out_of_range() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let a = alloc(&m, t, s, 64);
    let b = alloc(&m, t, s, 32);
    expect(
        &m,
        t,
        s,
        Command::Htod {
            dst: a,
            offset: 60,
            data: vec![0; 8],
        },
        Status::OutOfRange,
    );
    expect(
        &m,
        t,
        s,
        Command::Dtoh {
            src: a,
            offset: 0,
            len: 65,
        },
        Status::OutOfRange,
    );
    expect(
        &m,
        t,
        s,
        Command::Dtoh {
            src: a,
            offset: u64::MAX - 2,
            len: 2,
        },
        Status::OutOfRange,
    );
    let dtod = |len| Command::Dtod {
        dst: b,
        dst_offset: 0,
        src: a,
        src_offset: 0,
        len,
    };
    ok(&m, t, s, dtod(32));
    expect(&m, t, s, dtod(33), Status::OutOfRange);
    expect(
        &m,
        t,
        s,
        Command::Memset {
            dst: b,
            offset: 16,
            len: 20,
            value: 0,
            width: 4,
        },
        Status::OutOfRange,
    );
    // A built-in kernel may not touch more than the buffer holds.
    let r = call(
        &m,
        t,
        s,
        launch(
            "fill_u32",
            [1; 3],
            [32, 1, 1],
            vec![Param::Buffer(b), Param::u32(1), Param::u32(9)],
        ),
    );
    assert_eq!((r.status, r.detail), (Status::OutOfRange, 0));
}

#[test]
fn requests_without_an_open_session_are_invalid_session() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    assert_eq!(
        call(&m, t, 0, Command::Alloc { size: 4 }).status,
        Status::InvalidSession
    );
    let s = open(&m, t);
    ok(&m, t, s, Command::SessionClose);
    assert_eq!(call(&m, t, s, Command::Sync).status, Status::InvalidSession);
    assert_eq!(
        call(&m, t, s, Command::SessionClose).status,
        Status::InvalidSession
    );
}

#[test]
fn session_limit_is_limit_exceeded() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let max = m.limits().max_sessions;
    let ids: Vec<u64> = (0..max).map(|_| open(&m, t)).collect();
    let r = call(&m, t, 0, Command::SessionOpen);
    assert_eq!(r.status, Status::LimitExceeded);
    ok(&m, t, ids[0], Command::SessionClose);
    open(&m, t);
}

#[test]
fn closing_a_session_or_resetting_a_tenant_frees_everything() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    alloc(&m, t, s, 1000);
    alloc(&m, t, s, 24);
    assert_eq!(m.usage(t).unwrap().mem_used, 1024);
    ok(&m, t, s, Command::SessionClose);
    assert_eq!(m.usage(t).unwrap().mem_used, 0);
    let s2 = open(&m, t);
    alloc(&m, t, s2, 4096);
    open(&m, t);
    m.reset_tenant(t);
    let u = m.usage(t).unwrap();
    assert_eq!((u.sessions, u.mem_used, u.allocations), (0, 0, 0));
    still_serves(&m, t, open(&m, t));
}

#[test]
fn memset_and_dtod_produce_the_expected_bytes() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let a = alloc(&m, t, s, 16);
    let b = alloc(&m, t, s, 16);
    ok(
        &m,
        t,
        s,
        Command::Memset {
            dst: a,
            offset: 0,
            len: 16,
            value: 0xdead_beef,
            width: 4,
        },
    );
    ok(
        &m,
        t,
        s,
        Command::Memset {
            dst: a,
            offset: 4,
            len: 2,
            value: 0x11,
            width: 1,
        },
    );
    ok(
        &m,
        t,
        s,
        Command::Dtod {
            dst: b,
            dst_offset: 8,
            src: a,
            src_offset: 0,
            len: 8,
        },
    );
    let out = ok(
        &m,
        t,
        s,
        Command::Dtoh {
            src: b,
            offset: 0,
            len: 16,
        },
    )
    .data;
    let word = 0xdead_beefu32.to_le_bytes();
    let mut expected = vec![0u8; 8];
    expected.extend_from_slice(&word);
    expected.extend_from_slice(&[0x11, 0x11, word[2], word[3]]);
    assert_eq!(out, expected);
}

#[test]
fn builtin_kernels_compute_the_reference_results() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    let n = 1000u32;
    let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
    let ys: Vec<f32> = (0..n).map(|i| 3.0 - i as f32 * 0.25).collect();
    let (a, b, c) = (
        alloc(&m, t, s, 4000),
        alloc(&m, t, s, 4000),
        alloc(&m, t, s, 4000),
    );
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: a,
            offset: 0,
            data: f32s(&xs),
        },
    );
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: b,
            offset: 0,
            data: f32s(&ys),
        },
    );
    let grid = [4, 1, 1];
    let block = [128, 1, 1];
    ok(
        &m,
        t,
        s,
        launch(
            "vector_add_f32",
            grid,
            block,
            vec![
                Param::Buffer(a),
                Param::Buffer(b),
                Param::Buffer(c),
                Param::u32(n),
            ],
        ),
    );
    let sum = to_f32s(
        &ok(
            &m,
            t,
            s,
            Command::Dtoh {
                src: c,
                offset: 0,
                len: 4000,
            },
        )
        .data,
    );
    assert!(sum
        .iter()
        .zip(xs.iter().zip(&ys))
        .all(|(z, (x, y))| *z == x + y));

    ok(
        &m,
        t,
        s,
        launch(
            "saxpy_f32",
            grid,
            block,
            vec![
                Param::Buffer(b),
                Param::Buffer(a),
                Param::f32(2.0),
                Param::u32(n),
            ],
        ),
    );
    let saxpy = to_f32s(
        &ok(
            &m,
            t,
            s,
            Command::Dtoh {
                src: b,
                offset: 0,
                len: 4000,
            },
        )
        .data,
    );
    assert!(saxpy
        .iter()
        .zip(xs.iter().zip(&ys))
        .all(|(z, (x, y))| *z == 2.0 * x + y));

    ok(
        &m,
        t,
        s,
        launch(
            "scale_f32",
            grid,
            block,
            vec![Param::Buffer(a), Param::f32(-1.0), Param::u32(n)],
        ),
    );
    let scaled = to_f32s(
        &ok(
            &m,
            t,
            s,
            Command::Dtoh {
                src: a,
                offset: 0,
                len: 4000,
            },
        )
        .data,
    );
    assert!(scaled.iter().zip(&xs).all(|(z, x)| *z == -x));

    let out = alloc(&m, t, s, 4);
    ok(
        &m,
        t,
        s,
        Command::Memset {
            dst: out,
            offset: 0,
            len: 4,
            value: 0,
            width: 4,
        },
    );
    ok(
        &m,
        t,
        s,
        launch(
            "reduce_sum_f32",
            grid,
            block,
            vec![Param::Buffer(a), Param::Buffer(out), Param::u32(n)],
        ),
    );
    let total = to_f32s(
        &ok(
            &m,
            t,
            s,
            Command::Dtoh {
                src: out,
                offset: 0,
                len: 4,
            },
        )
        .data,
    )[0];
    let expected: f64 = xs.iter().map(|x| -(*x as f64)).sum();
    assert!(
        (total as f64 - expected).abs() <= expected.abs() * 1e-5,
        "{total} vs {expected}"
    );

    // 2x3 * 3x2
    let (ma, mb, mc) = (
        alloc(&m, t, s, 24),
        alloc(&m, t, s, 24),
        alloc(&m, t, s, 16),
    );
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: ma,
            offset: 0,
            data: f32s(&[1., 2., 3., 4., 5., 6.]),
        },
    );
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: mb,
            offset: 0,
            data: f32s(&[7., 8., 9., 10., 11., 12.]),
        },
    );
    ok(
        &m,
        t,
        s,
        launch(
            "matmul_f32",
            [1, 1, 1],
            [16, 16, 1],
            vec![
                Param::Buffer(ma),
                Param::Buffer(mb),
                Param::Buffer(mc),
                Param::u32(2),
                Param::u32(2),
                Param::u32(3),
            ],
        ),
    );
    let prod = to_f32s(
        &ok(
            &m,
            t,
            s,
            Command::Dtoh {
                src: mc,
                offset: 0,
                len: 16,
            },
        )
        .data,
    );
    assert_eq!(prod, vec![58., 64., 139., 154.]);

    ok(
        &m,
        t,
        s,
        launch(
            "fill_u32",
            grid,
            block,
            vec![Param::Buffer(c), Param::u32(0xabcd), Param::u32(n)],
        ),
    );
    let filled = ok(
        &m,
        t,
        s,
        Command::Dtoh {
            src: c,
            offset: 0,
            len: 4000,
        },
    )
    .data;
    assert!(filled.chunks_exact(4).all(|w| w == 0xabcdu32.to_le_bytes()));
    ok(&m, t, s, Command::Sync);
}

#[test]
fn selftests_answer_the_phase_one_lines() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let r = ok(
        &m,
        t,
        0,
        Command::Selftest {
            test: SelftestKind::VectorAdd,
        },
    );
    assert_eq!(
        String::from_utf8(r.data).unwrap(),
        format!("Vector add PASSED: 1024 elements, 0 errors ({CPU_DEVICE_NAME})")
    );
    let r = ok(
        &m,
        t,
        0,
        Command::Selftest {
            test: SelftestKind::DeviceInfo,
        },
    );
    assert!(String::from_utf8(r.data)
        .unwrap()
        .starts_with(CPU_DEVICE_NAME));
    assert_eq!(m.usage(t).unwrap().mem_used, 0);
}

#[test]
fn info_reports_the_device_quota_and_usage() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    let s = open(&m, t);
    alloc(&m, t, s, 4096);
    let info = InfoReply::decode(&ok(&m, t, 0, Command::Info).data).unwrap();
    assert_eq!(info.config.name, CPU_DEVICE_NAME);
    assert_eq!(info.config.mem_quota, QUOTA);
    assert_eq!(
        (info.mem_used, info.sessions, info.allocations, info.weight),
        (4096, 1, 1, 100)
    );
    assert_eq!(m.device_config(t).unwrap(), info.config);
}

#[test]
fn removed_tenant_answers_device_lost() {
    let m = mediator();
    let t = tenant(&m, "vm1");
    m.remove_tenant(t);
    assert_eq!(
        call(&m, t, 0, Command::SessionOpen).status,
        Status::DeviceLost
    );
    assert!(m.usage(t).is_none());
}
