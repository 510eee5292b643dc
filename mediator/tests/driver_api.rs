// SPDX-License-Identifier: Apache-2.0
//! The requests of a driver-API guest library on the CPU executor: buffer addresses from
//! ALLOC, DEVICE_ATTRIBUTES, FUNCTION_INFO of the built-in catalog, and what the CPU
//! executor refuses (binary images, module variables, compiling) with the status each
//! refusal has, the session serving on afterwards. `tests/process.rs` includes this file
//! as a module and runs every case again with the CPU executor in worker processes, so
//! the worker channel carries each request and answer.

use std::sync::Arc;

use vgpu_mediator::cpu::{cpu_device_attributes, CpuExecutorFactory, CPU_ADDRESS_BASE};
use vgpu_mediator::{ExecutorFactory, Mediator, TenantConfig, TenantId, COMPILE_SOURCE_REFUSED};
use vgpu_protocol::{
    Command, FunctionInfo, InfoReply, Request, Response, Status, BUILTIN_MODULE,
    MAX_DEVICE_ATTRIBUTES,
};

fn mediator() -> Arc<Mediator> {
    Mediator::new(crate::executor_factory())
}

/// The executor these cases run on: the CPU executor in this process.
#[allow(dead_code)] // unused where this file is included as a module
fn executor_factory() -> Arc<dyn ExecutorFactory> {
    Arc::new(CpuExecutorFactory::new())
}

fn tenant(m: &Mediator) -> TenantId {
    m.add_tenant(TenantConfig {
        name: "vm-driver".into(),
        mem_quota: 64 << 20,
        weight: 100,
    })
    .unwrap()
}

fn call(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    m.call(t, Request::new(session, command))
}

fn ok(m: &Mediator, t: TenantId, session: u64, command: Command) -> Response {
    let r = call(m, t, session, command.clone());
    assert_eq!(r.status, Status::Ok, "{command:?}: {r:?}");
    r
}

fn open(m: &Mediator, t: TenantId) -> u64 {
    ok(m, t, 0, Command::SessionOpen).value0
}

/// A round trip that must still work after each refusal.
fn still_serves(m: &Mediator, t: TenantId, s: u64) {
    let h = ok(m, t, s, Command::Alloc { size: 16 }).value0;
    let data = vec![9u8; 16];
    ok(
        m,
        t,
        s,
        Command::Htod {
            dst: h,
            offset: 0,
            data: data.clone(),
        },
    );
    let back = ok(
        m,
        t,
        s,
        Command::Dtoh {
            src: h,
            offset: 0,
            len: 16,
        },
    );
    assert_eq!(back.data, data);
    ok(m, t, s, Command::Free { handle: h });
    ok(m, t, s, Command::Sync);
}

fn expect(m: &Mediator, t: TenantId, s: u64, command: Command, status: Status) -> Response {
    let r = call(m, t, s, command.clone());
    assert_eq!(r.status, status, "{command:?}: {r:?}");
    still_serves(m, t, s);
    r
}

#[test]
fn alloc_answers_each_buffers_device_address() {
    let m = mediator();
    let t = tenant(&m);
    let s = open(&m, t);
    let sizes = [1u64, 256, 4096, 5000, 1 << 20, 3];
    let mut spans: Vec<(u64, u64, u64)> = Vec::new();
    for size in sizes {
        let r = ok(&m, t, s, Command::Alloc { size });
        let (handle, address) = (r.value0, r.value1);
        assert_ne!(address, 0);
        assert_ne!(address, handle);
        assert_eq!(address % 256, 0, "{address:#x}");
        assert!(address >= CPU_ADDRESS_BASE, "{address:#x}");
        spans.push((handle, address, size));
    }
    // No two buffers' bytes share an address, and neither buffer touches the next.
    let mut sorted = spans.clone();
    sorted.sort_by_key(|&(_, a, _)| a);
    for w in sorted.windows(2) {
        assert!(w[0].1 + w[0].2 < w[1].1, "{:#x?}", w);
    }
    // An address is never handed out again, even once its buffer is freed.
    ok(&m, t, s, Command::Free { handle: spans[0].0 });
    for _ in 0..4 {
        let r = ok(&m, t, s, Command::Alloc { size: 1 });
        assert!(spans.iter().all(|&(_, a, _)| a != r.value1));
    }
    // Another session counts its own addresses; its handles are its own.
    let other = open(&m, t);
    let r = ok(&m, t, other, Command::Alloc { size: 8 });
    assert_ne!(r.value1, 0);
    still_serves(&m, t, s);
}

#[test]
fn device_attributes_answer_the_cpu_devices_table() {
    let m = mediator();
    let t = tenant(&m);
    let s = open(&m, t);
    let info = InfoReply::decode(&ok(&m, t, 0, Command::Info).data).unwrap();
    let r = ok(
        &m,
        t,
        s,
        Command::DeviceAttributes {
            count: MAX_DEVICE_ATTRIBUTES,
        },
    );
    assert_eq!(r.value0, u64::from(MAX_DEVICE_ATTRIBUTES));
    assert_eq!(r.data.len(), 4 * MAX_DEVICE_ATTRIBUTES as usize);
    let a: Vec<i32> = r
        .data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // a[n - 1] is attribute n.
    let attr = |n: usize| a[n - 1];
    assert_eq!((attr(1), attr(2), attr(3), attr(4)), (1024, 1024, 1024, 64));
    assert_eq!((attr(5), attr(6), attr(7)), (i32::MAX, 65535, 65535));
    assert_eq!((attr(8), attr(9), attr(10)), (49152, 65536, 32));
    assert_eq!(attr(16) as u32, info.config.multiprocessors);
    assert_eq!(attr(75) as u16, info.config.cc_major);
    assert_eq!(attr(76) as u16, info.config.cc_minor);
    assert_eq!((attr(18), attr(19), attr(41), attr(83)), (0, 0, 1, 0));
    // Where the GPU sits in the host is not the guest's to see: PCI bus, device, domain,
    // board group 0; NUMA nodes -1 ("none").
    assert_eq!(
        (attr(33), attr(34), attr(50), attr(85), attr(131), attr(134)),
        (0, 0, 0, 0, -1, -1)
    );
    // Past the attributes CUDA names: 0.
    assert!(a[200..].iter().all(|&v| v == 0));
    // The same table for a short question, and for another session.
    let r = ok(&m, t, s, Command::DeviceAttributes { count: 1 });
    assert_eq!((r.value0, r.data), (1, 1024i32.to_le_bytes().to_vec()));
    let other = open(&m, t);
    let again = ok(&m, t, other, Command::DeviceAttributes { count: 76 });
    assert_eq!(again.data, r_bytes(&a[..76]));
    let expected = cpu_device_attributes(&CpuExecutorFactory::new().device().clone());
    assert_eq!(&a[..expected.len() - 1], &expected[1..]);
    still_serves(&m, t, s);
}

fn r_bytes(a: &[i32]) -> Vec<u8> {
    a.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn attribute_counts_past_the_limit_never_decode() {
    for count in [0, MAX_DEVICE_ATTRIBUTES + 1, u32::MAX] {
        let bytes = Request::new(1, Command::DeviceAttributes { count }).encode();
        let e = Request::decode(&bytes).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument, "{count}");
    }
}

#[test]
fn function_info_describes_built_in_kernels() {
    let m = mediator();
    let t = tenant(&m);
    let s = open(&m, t);
    let info = |name: &str| {
        let r = ok(
            &m,
            t,
            s,
            Command::FunctionInfo {
                module: BUILTIN_MODULE,
                name: name.into(),
            },
        );
        FunctionInfo::decode(&r.data).unwrap()
    };
    // vector_add_f32(a, b, c, u32 n): three pointers, then the count.
    let v = info("vector_add_f32");
    assert_eq!(v.params, vec![(0, 8), (8, 8), (16, 8), (24, 4)]);
    assert_eq!(v.attributes[0], 1024);
    // saxpy_f32(y, x, f32 a, u32 n).
    assert_eq!(
        info("saxpy_f32").params,
        vec![(0, 8), (8, 8), (16, 4), (20, 4)]
    );
    // matmul_f32(a, b, c, u32 m, u32 n, u32 k).
    assert_eq!(
        info("matmul_f32").params,
        vec![(0, 8), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4)]
    );
    let unknown = Command::FunctionInfo {
        module: BUILTIN_MODULE,
        name: "no_such_kernel".into(),
    };
    expect(&m, t, s, unknown, Status::KernelNotFound);
    let no_module = Command::FunctionInfo {
        module: 12345,
        name: "vector_add_f32".into(),
    };
    expect(&m, t, s, no_module, Status::InvalidHandle);
}

#[test]
fn module_variables_need_a_module_of_the_session() {
    let m = mediator();
    let t = tenant(&m);
    let s = open(&m, t);
    // The catalog declares no variables.
    let builtin = Command::ModuleGlobal {
        module: BUILTIN_MODULE,
        name: "anything".into(),
    };
    expect(&m, t, s, builtin, Status::KernelNotFound);
    // A module handle the session never had, or a buffer's handle.
    let h = ok(&m, t, s, Command::Alloc { size: 64 }).value0;
    for module in [777, h] {
        let c = Command::ModuleGlobal {
            module,
            name: "table".into(),
        };
        expect(&m, t, s, c, Status::InvalidHandle);
    }
}

#[test]
fn the_cpu_executor_loads_no_binary_images() {
    let m = mediator();
    let t = tenant(&m);
    let s = open(&m, t);
    let cubin = {
        let mut b = vec![0x7f, b'E', b'L', b'F', 2, 1, 1];
        b.resize(256, 0);
        b
    };
    let ptx_text = b".version 8.0\n.target sm_90\n.address_size 64\n".to_vec();
    let wrapper = [
        0xb1, 0x43, 0x62, 0x46, 1, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0,
    ]
    .to_vec();
    for image in [cubin, ptx_text, wrapper, vec![0xff; 33]] {
        expect(
            &m,
            t,
            s,
            Command::ModuleLoadImage { image },
            Status::Unsupported,
        );
    }
    let u = m.usage(t).unwrap();
    assert_eq!((u.modules, u.module_bytes), (0, 0));
}

#[test]
fn compile_refuses_file_options_and_includes_then_is_unsupported_on_the_cpu() {
    let m = mediator();
    let t = tenant(&m);
    let s = open(&m, t);
    let source = "extern \"C\" __global__ void k(int *p) { *p = 1; }\n";
    let compile = |options: &[&str], source: &str| Command::Compile {
        source: source.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        out_len: 1 << 16,
    };
    for (options, index) in [
        (&["-std=c++17", "-I/usr/include"][..], 1),
        (&["--include-path=/etc"][..], 0),
        (
            &["-default-device", "--use_fast_math", "--pre-include=x.h"][..],
            2,
        ),
        (&["-include=/etc/passwd"][..], 0),
        (&["--pch"][..], 0),
        (&["-lineinfo", "--create-pch=/tmp/x.pch"][..], 1),
        (&["--use-pch=x"][..], 0),
        (&["--pch-dir=/tmp"][..], 0),
        (&["-pch-dir=/tmp"][..], 0),
        (&["--time=/tmp/t.csv"][..], 0),
    ] {
        let r = expect(&m, t, s, compile(options, source), Status::InvalidArgument);
        assert_eq!(r.detail, index, "{options:?}");
    }
    for (text, line) in [
        ("#include \"/etc/passwd\"\n", 1),
        ("int a;\n\n#include <../../etc/shadow>\n", 3),
        ("#define P \"/etc/hostname\"\n#include P\n", 2),
    ] {
        let r = expect(&m, t, s, compile(&[], text), Status::InvalidArgument);
        assert_eq!(
            (r.detail, r.value0),
            (COMPILE_SOURCE_REFUSED, line),
            "{text:?}"
        );
    }
    // Options and a source that read no files reach the executor, which has no compiler.
    expect(
        &m,
        t,
        s,
        compile(&["-arch=compute_90", "-DN=4"], source),
        Status::Unsupported,
    );
}
