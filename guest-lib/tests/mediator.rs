// SPDX-License-Identifier: Apache-2.0
//! The guest library against the real mediator (CPU executor), in process: the API a
//! guest program uses, end to end except for the virtqueue.

use std::sync::Arc;

use vgpu::{Error, InProcessTransport, KernelArg, LaunchConfig, SelftestKind, Session, Status};
use vgpu_mediator::cpu::{CpuExecutorFactory, CPU_DEVICE_NAME};
use vgpu_mediator::{Mediator, TenantConfig, TenantId};

fn setup() -> (Arc<Mediator>, TenantId) {
    let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
    let t = m
        .add_tenant(TenantConfig {
            name: "vm1".into(),
            mem_quota: 64 << 20,
            weight: 1,
        })
        .unwrap();
    (m, t)
}

fn session(m: &Arc<Mediator>, t: TenantId) -> Session {
    let m = m.clone();
    let transport = InProcessTransport::new(Arc::new(move |r| m.call(t, r))).unwrap();
    Session::from_transport(Box::new(transport))
}

#[test]
fn vector_add_through_the_library_matches_the_cpu() {
    let (m, t) = setup();
    let s = session(&m, t);
    let n = 3000u32;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
    let b: Vec<f32> = (0..n).map(|i| 10.0 - i as f32).collect();
    let da = s.htod_copy(&a).unwrap();
    let db = s.htod_copy(&b).unwrap();
    let mut dc = s.alloc::<f32>(n as usize).unwrap();
    s.memset_u32(&mut dc, 0x7fc0_0001).unwrap();
    let args = [da.arg(), db.arg(), dc.arg(), KernelArg::U32(n)];
    s.launch(
        &s.builtin(),
        "vector_add_f32",
        LaunchConfig::for_num_elems(n),
        &args,
    )
    .unwrap();
    s.sync().unwrap();
    let c = s.dtoh(&dc).unwrap();
    assert!(c
        .iter()
        .zip(a.iter().zip(&b))
        .all(|(z, (x, y))| *z == x + y));
    assert_eq!(s.info().unwrap().allocations, 3);
    assert_eq!(s.info().unwrap().config.name, CPU_DEVICE_NAME);
}

#[test]
fn copies_larger_than_one_chunk_round_trip() {
    let (m, t) = setup();
    let s = session(&m, t);
    let data: Vec<u8> = (0..(5 << 20) + 123)
        .map(|i: u32| (i * 7 + i / 251) as u8)
        .collect();
    let d = s.htod_copy(&data).unwrap();
    assert_eq!(s.dtoh(&d).unwrap(), data);
}

#[test]
fn device_errors_carry_the_protocol_status_and_buffers_are_freed_on_drop() {
    let (m, t) = setup();
    let s = session(&m, t);
    match s.alloc::<u8>(65 << 20) {
        Err(Error::Device { status, .. }) => assert_eq!(status, Status::QuotaExceeded),
        other => panic!("expected QUOTA_EXCEEDED, got {:?}", other.map(|b| b.len())),
    }
    match s.load_module(".version 8.0\n") {
        Err(Error::Device { status, .. }) => assert_eq!(status, Status::Unsupported),
        other => panic!("expected UNSUPPORTED, got {:?}", other.map(|_| ())),
    }
    {
        let _buf = s.alloc::<u32>(1024).unwrap();
        assert_eq!(m.usage(t).unwrap().mem_used, 4096);
    }
    assert_eq!(m.usage(t).unwrap().mem_used, 0);
    let line = s.selftest(SelftestKind::VectorAdd).unwrap();
    assert_eq!(
        line,
        format!("Vector add PASSED: 1024 elements, 0 errors ({CPU_DEVICE_NAME})")
    );
    drop(s);
    assert_eq!(m.usage(t).unwrap().sessions, 0);
}
