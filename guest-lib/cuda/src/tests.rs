// SPDX-License-Identifier: Apache-2.0
//! The exports against the real mediator with the CPU executor, in process: two devices
//! (two VMs' tenants), every call as a C program makes it. The tests share the library's
//! state (as a program's threads do) and run in parallel.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::{Arc, Once};

use vgpu::{DeviceConfig, InProcessTransport, InfoReply, Session};
use vgpu_mediator::cpu::{CpuExecutorFactory, CPU_DEVICE_NAME};
use vgpu_mediator::{Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Request, Status};

use crate::api::*;
use crate::export_tables::{self, integrity, Uuid};
use crate::generated::*;
use crate::state::Backend;
use crate::types::*;

const QUOTAS: [u64; 2] = [256 << 20, 32 << 20];

/// The mediator's tenants as devices.
struct MediatorBackend {
    mediator: Arc<Mediator>,
    tenants: Vec<TenantId>,
}

impl Backend for MediatorBackend {
    fn devices(&self) -> usize {
        self.tenants.len()
    }

    fn config(&self, ordinal: usize) -> vgpu::Result<DeviceConfig> {
        let r = self
            .mediator
            .call(self.tenants[ordinal], Request::new(0, Command::Info));
        assert_eq!(r.status, Status::Ok);
        Ok(InfoReply::decode(&r.data)?.config)
    }

    fn open(&self, ordinal: usize) -> vgpu::Result<Session> {
        let (m, t) = (self.mediator.clone(), self.tenants[ordinal]);
        let transport = InProcessTransport::new(Arc::new(move |r| m.call(t, r)))?;
        Ok(Session::from_transport(Box::new(transport)))
    }
}

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mediator = Mediator::new(Arc::new(CpuExecutorFactory::new()));
        let tenants = QUOTAS
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                mediator
                    .add_tenant(TenantConfig {
                        name: format!("vm{i}"),
                        mem_quota: q,
                        weight: 1,
                    })
                    .unwrap()
            })
            .collect();
        assert!(crate::set_backend(Box::new(MediatorBackend {
            mediator,
            tenants
        })));
        assert_eq!(cuInit(0), CUDA_SUCCESS);
    });
}

macro_rules! ok {
    ($call:expr) => {{
        let r = $call;
        assert_eq!(r, CUDA_SUCCESS, "{} = {}", stringify!($call), name(r));
    }};
}

fn name(r: CUresult) -> &'static str {
    crate::errors::name(r).unwrap_or("?")
}

/// A fresh context of `dev`, current on this thread.
fn context(dev: CUdevice) -> CUcontext {
    setup();
    let mut ctx = null_mut();
    // SAFETY: a valid out-parameter.
    ok!(unsafe { cuCtxCreate_v2(&mut ctx, 0, dev) });
    ctx
}

fn alloc(n: usize) -> CUdeviceptr {
    let mut p = 0;
    // SAFETY: a valid out-parameter.
    ok!(unsafe { cuMemAlloc_v2(&mut p, n) });
    p
}

fn read(p: CUdeviceptr, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: `v` holds n bytes.
    ok!(unsafe { cuMemcpyDtoH_v2(v.as_mut_ptr().cast(), p, n) });
    v
}

fn write(p: CUdeviceptr, data: &[u8]) {
    // SAFETY: `data` holds its bytes.
    ok!(unsafe { cuMemcpyHtoD_v2(p, data.as_ptr().cast(), data.len()) });
}

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn devices_answer_from_the_config_space_and_attributes_are_cached() {
    setup();
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let mut n = 0;
        ok!(cuDeviceGetCount(&mut n));
        assert_eq!(n, 2);
        let mut dev = -1;
        ok!(cuDeviceGet(&mut dev, 1));
        assert_eq!(dev, 1);
        assert_eq!(cuDeviceGet(&mut dev, 2), CUDA_ERROR_INVALID_DEVICE);
        assert_eq!(cuDeviceGet(null_mut(), 0), CUDA_ERROR_INVALID_VALUE);
        let mut version = 0;
        ok!(cuDriverGetVersion(&mut version));
        assert_eq!(version, 13000);

        let mut buf = [0 as c_char; 64];
        ok!(cuDeviceGetName(buf.as_mut_ptr(), 64, 0));
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str(), Ok(CPU_DEVICE_NAME));
        ok!(cuDeviceGetName(buf.as_mut_ptr(), 4, 0));
        assert_eq!(
            CStr::from_ptr(buf.as_ptr()).to_bytes(),
            &CPU_DEVICE_NAME.as_bytes()[..3]
        );
        for (dev, quota) in QUOTAS.iter().enumerate() {
            let mut total = 0;
            ok!(cuDeviceTotalMem_v2(&mut total, dev as CUdevice));
            assert_eq!(total as u64, *quota);
        }
        let (mut major, mut minor) = (-1, -1);
        ok!(cuDeviceComputeCapability(&mut major, &mut minor, 0));
        assert_eq!((major, minor), (0, 0), "the CPU executor's config space");

        let (mut u0, mut u0b, mut u1) = ([0u8; 16], [0u8; 16], [0u8; 16]);
        ok!(cuDeviceGetUuid_v2(&mut u0, 0));
        ok!(cuDeviceGetUuid(&mut u0b, 0));
        ok!(cuDeviceGetUuid_v2(&mut u1, 1));
        assert_eq!(u0, u0b);
        assert_ne!(u0, u1);

        let attr = |a: c_int| {
            let mut v = -1;
            let r = cuDeviceGetAttribute(&mut v, a, 0);
            (r, v)
        };
        assert_eq!(attr(41), (CUDA_SUCCESS, 1), "unified addressing");
        assert_eq!(attr(19), (CUDA_SUCCESS, 0), "no mapped host memory");
        let (r, threads) = attr(1);
        assert_eq!(r, CUDA_SUCCESS);
        assert!(threads > 0);
        assert_eq!(attr(0).0, CUDA_ERROR_INVALID_VALUE);
        assert_eq!(attr(148).0, CUDA_ERROR_INVALID_VALUE);
        assert_eq!(
            cuDeviceGetAttribute(null_mut(), 1, 0),
            CUDA_ERROR_INVALID_VALUE
        );
        let mut can = -1;
        ok!(cuDeviceCanAccessPeer(&mut can, 0, 1));
        assert_eq!(can, 0);
        assert_eq!(
            cuDeviceGetPCIBusId(buf.as_mut_ptr(), 64, 0),
            CUDA_ERROR_NOT_SUPPORTED
        );
        // These devices sit on no PCI function: no id names them.
        assert_eq!(
            cuDeviceGetByPCIBusId(&mut dev, c"0000:00:02.0".as_ptr()),
            CUDA_ERROR_INVALID_DEVICE
        );
        assert_eq!(
            cuDeviceGetByPCIBusId(&mut dev, c"virtio0".as_ptr()),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            cuDeviceGetByPCIBusId(null_mut(), c"0000:00:02.0".as_ptr()),
            CUDA_ERROR_INVALID_VALUE
        );
    }
}

#[test]
fn primary_contexts_are_refcounted_and_the_current_context_is_a_per_thread_stack() {
    setup();
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let (mut p1, mut p2) = (null_mut(), null_mut());
        ok!(cuDevicePrimaryCtxRetain(&mut p1, 1));
        ok!(cuDevicePrimaryCtxRetain(&mut p2, 1));
        assert_eq!(p1, p2);
        let (mut flags, mut active) = (9, 0);
        ok!(cuDevicePrimaryCtxGetState(1, &mut flags, &mut active));
        assert_eq!(active, 1);
        assert_eq!(cuCtxDestroy_v2(p1), CUDA_ERROR_INVALID_CONTEXT);

        ok!(cuCtxSetCurrent(p1));
        let mut dev = -1;
        ok!(cuCtxGetDevice(&mut dev));
        assert_eq!(dev, 1);
        let mut mine = null_mut();
        ok!(cuCtxCreate_v4(&mut mine, null(), 0, 0));
        let mut cur = null_mut();
        ok!(cuCtxGetCurrent(&mut cur));
        assert_eq!(cur, mine, "a new context is pushed");
        ok!(cuCtxGetDevice(&mut dev));
        assert_eq!(dev, 0);
        let mut popped = null_mut();
        ok!(cuCtxPopCurrent_v2(&mut popped));
        assert_eq!(popped, mine);
        ok!(cuCtxGetCurrent(&mut cur));
        assert_eq!(cur, p1);
        ok!(cuCtxPushCurrent_v2(mine));
        let (mut id1, mut id2) = (0u64, 0u64);
        ok!(cuCtxGetId(null_mut(), &mut id1));
        ok!(cuCtxGetId(p1, &mut id2));
        assert_ne!(id1, id2);

        // Another thread starts with nothing current.
        std::thread::spawn(|| {
            let mut cur = 1 as CUcontext;
            ok!(cuCtxGetCurrent(&mut cur));
            assert!(cur.is_null());
            assert_eq!(cuCtxSynchronize(), CUDA_ERROR_INVALID_CONTEXT);
        })
        .join()
        .unwrap();

        // Limits, cache and shared memory configuration, priorities, version.
        let mut v = 0usize;
        ok!(cuCtxGetLimit(&mut v, 0));
        assert_eq!(v, 1024);
        ok!(cuCtxGetLimit(&mut v, 1));
        assert_eq!(v, 1 << 20);
        ok!(cuCtxGetLimit(&mut v, 2));
        assert_eq!(v, 8 << 20);
        ok!(cuCtxSetLimit(2, 64 << 20));
        ok!(cuCtxGetLimit(&mut v, 2));
        assert_eq!(v, 64 << 20);
        // The CPU executor's device (compute capability 0.0) has no device runtime and
        // no persisting L2; it is no CIG context.
        assert_eq!(cuCtxGetLimit(&mut v, 3), CUDA_ERROR_UNSUPPORTED_LIMIT);
        assert_eq!(cuCtxSetLimit(4, 4096), CUDA_ERROR_UNSUPPORTED_LIMIT);
        assert_eq!(cuCtxGetLimit(&mut v, 6), CUDA_ERROR_UNSUPPORTED_LIMIT);
        ok!(cuCtxSetLimit(5, 4096));
        ok!(cuCtxGetLimit(&mut v, 5));
        assert_eq!(v, 128, "the L2 fetch granularity is clamped");
        ok!(cuCtxGetLimit(&mut v, 7));
        assert_eq!(v, 65536, "all of the SM's shared memory");
        assert_eq!(cuCtxSetLimit(7, 1024), CUDA_ERROR_INVALID_VALUE);
        ok!(cuCtxGetLimit(&mut v, 8));
        assert_eq!(v, 0);
        ok!(cuCtxGetLimit(&mut v, 9));
        assert_eq!(v, 1);
        assert_eq!(cuCtxGetLimit(&mut v, 10), CUDA_ERROR_UNSUPPORTED_LIMIT);
        assert_eq!(cuCtxGetLimit(&mut v, -1), CUDA_ERROR_UNSUPPORTED_LIMIT);
        let mut c: c_uint = 9;
        ok!(cuCtxSetCacheConfig(2));
        ok!(cuCtxGetCacheConfig(&mut c));
        assert_eq!(c, 2);
        let (mut least, mut greatest) = (9, 9);
        ok!(cuCtxGetStreamPriorityRange(&mut least, &mut greatest));
        assert_eq!((least, greatest), (0, -5));
        ok!(cuCtxGetApiVersion(mine, &mut c));
        assert_eq!(c, 3020);
        ok!(cuCtxSynchronize());
        ok!(cuCtxSynchronize_v2(p1));

        // A destroyed context's handle is refused, here and on other threads.
        ok!(cuCtxDestroy_v2(mine));
        ok!(cuCtxGetCurrent(&mut cur));
        assert_eq!(cur, p1, "the destroyed context left the stack");
        assert_eq!(cuCtxSetCurrent(mine), CUDA_ERROR_INVALID_CONTEXT);
        assert_eq!(cuCtxDestroy_v2(mine), CUDA_ERROR_INVALID_CONTEXT);
        assert_eq!(
            cuCtxCreate_v3(&mut cur, null_mut(), 1, 0, 0),
            CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY
        );

        ok!(cuDevicePrimaryCtxRelease_v2(1));
        ok!(cuDevicePrimaryCtxRelease(1));
        assert_eq!(cuDevicePrimaryCtxRelease_v2(1), CUDA_ERROR_INVALID_CONTEXT);
        ok!(cuDevicePrimaryCtxGetState(1, &mut flags, &mut active));
        assert_eq!(active, 0);
        assert_eq!(cuCtxSynchronize(), CUDA_ERROR_INVALID_CONTEXT, "released");
        ok!(cuCtxSetCurrent(null_mut()));
    }
}

#[test]
fn memory_copies_and_memsets_at_offsets_stay_inside_allocations() {
    let ctx = context(0);
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let a = alloc(4096);
        let b = alloc(4096);
        assert_ne!(a, 0);
        assert_ne!(a, b);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        write(a, &data);
        assert_eq!(read(a, 4096), data);
        assert_eq!(read(a + 100, 50), data[100..150]);
        ok!(cuMemcpyDtoD_v2(b + 8, a + 16, 1000));
        assert_eq!(read(b + 8, 1000), data[16..1016]);
        // Unified: the pointers say which way.
        let mut back = vec![0u8; 64];
        ok!(cuMemcpy(back.as_mut_ptr() as CUdeviceptr, a + 64, 64));
        assert_eq!(back, data[64..128]);
        let src = [0xabu8; 32];
        ok!(cuMemcpy(b, src.as_ptr() as CUdeviceptr, 32));
        assert_eq!(read(b, 32), src);
        ok!(cuMemcpy(a, b, 16));
        assert_eq!(read(a, 16), [0xab; 16]);
        let mut host = [0u8; 8];
        ok!(cuMemcpy(
            host.as_mut_ptr() as CUdeviceptr,
            src.as_ptr() as CUdeviceptr,
            8
        ));
        assert_eq!(host, [0xab; 8]);

        // Memsets of every width; D16 with a pattern whose bytes differ, unaligned.
        ok!(cuMemsetD8_v2(a, 0x11, 4096));
        ok!(cuMemsetD32_v2(a + 8, 0xdead_beef, 2));
        ok!(cuMemsetD16_v2(a + 18, 0x1234, 5));
        ok!(cuMemsetD16(a + 40, 0x5555, 3));
        let got = read(a, 64);
        let mut want = vec![0x11u8; 64];
        want[8..16].copy_from_slice(&[0xef, 0xbe, 0xad, 0xde, 0xef, 0xbe, 0xad, 0xde]);
        for i in 0..5 {
            want[18 + 2 * i..20 + 2 * i].copy_from_slice(&0x1234u16.to_le_bytes());
        }
        want[40..46].fill(0x55);
        assert_eq!(got, want);
        assert_eq!(cuMemsetD32_v2(a + 2, 0, 1), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemsetD16_v2(a + 1, 0, 1), CUDA_ERROR_INVALID_VALUE);

        // Out of bounds, interior frees, unknown pointers, NULLs.
        assert_eq!(cuMemsetD8_v2(a + 4000, 0, 100), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(
            cuMemcpyHtoD_v2(a + 4090, data.as_ptr().cast(), 7),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuMemcpyDtoD_v2(b, a + 1, 4096), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(
            cuMemcpyDtoH_v2(back.as_mut_ptr().cast(), 12345, 4),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuMemcpyHtoD_v2(a, null(), 4), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemFree_v2(a + 1), CUDA_ERROR_INVALID_VALUE);
        assert_eq!(cuMemAlloc_v2(null_mut(), 8), CUDA_ERROR_INVALID_VALUE);
        let mut huge = 0;
        assert_eq!(cuMemAlloc_v2(&mut huge, 1 << 40), CUDA_ERROR_OUT_OF_MEMORY);

        // Where a pointer lies.
        let (mut base, mut size) = (0, 0);
        ok!(cuMemGetAddressRange_v2(&mut base, &mut size, a + 77));
        assert_eq!((base, size), (a, 4096));
        let mut kind: c_uint = 0;
        ok!(cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            b + 5
        ));
        assert_eq!(kind, CU_MEMORYTYPE_DEVICE);
        let mut owner: CUcontext = null_mut();
        ok!(cuPointerGetAttribute(
            (&mut owner as *mut CUcontext).cast(),
            CU_POINTER_ATTRIBUTE_CONTEXT,
            b
        ));
        assert_eq!(owner, ctx);
        let mut start: CUdeviceptr = 0;
        ok!(cuPointerGetAttribute(
            (&mut start as *mut u64).cast(),
            CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            b + 9
        ));
        assert_eq!(start, b);
        assert_eq!(
            cuPointerGetAttribute(
                (&mut kind as *mut c_uint).cast(),
                CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                8
            ),
            CUDA_ERROR_INVALID_VALUE
        );

        let (mut free, mut total) = (0, 0);
        ok!(cuMemGetInfo_v2(&mut free, &mut total));
        assert_eq!(total as u64, QUOTAS[0]);
        assert!(free as u64 <= QUOTAS[0] - 8192);
        assert_eq!(
            cuMemGetInfo_v2(null_mut(), &mut total),
            CUDA_ERROR_INVALID_VALUE
        );

        ok!(cuMemFree_v2(a));
        ok!(cuMemFree_v2(b));
        assert_eq!(cuMemFree_v2(a), CUDA_ERROR_INVALID_VALUE, "freed twice");
        ok!(cuCtxDestroy_v2(ctx));
    }
}

#[test]
fn host_memory_copies_in_large_requests_and_registration_is_remembered() {
    let ctx = context(0);
    // SAFETY: (this test) every pointer passed is a valid local, NULL on purpose, or host
    // memory this library handed out.
    unsafe {
        let n = 3 << 20;
        let mut pinned: *mut c_void = null_mut();
        ok!(cuMemAllocHost_v2(&mut pinned, n));
        let host = std::slice::from_raw_parts_mut(pinned.cast::<u8>(), n);
        host.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 253) as u8);
        let d = alloc(n);
        ok!(cuMemcpyHtoD_v2(d, pinned, n));
        let mut out: *mut c_void = null_mut();
        ok!(cuMemHostAlloc(&mut out, n, 0));
        ok!(cuMemcpyDtoH_v2(out, d, n));
        assert_eq!(std::slice::from_raw_parts(out.cast::<u8>(), n), &host[..]);
        // Part of a host buffer, and the ordinary path for the same bytes.
        ok!(cuMemsetD8_v2(d, 0, 4096));
        ok!(cuMemcpyHtoD_v2(
            d + 1,
            pinned.cast::<u8>().add(5).cast(),
            100
        ));
        assert_eq!(read(d + 1, 100), host[5..105]);
        assert_eq!(read(d, 1 << 20 | 1)[1..101], host[5..105]);

        let mut kind: c_uint = 0;
        ok!(cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            pinned as u64 + 10
        ));
        assert_eq!(kind, CU_MEMORYTYPE_HOST);
        let mut flags = 9;
        ok!(cuMemHostGetFlags(&mut flags, pinned));
        assert_eq!(flags, 0);
        ok!(cuMemFreeHost(pinned));
        ok!(cuMemFreeHost(out));
        assert_eq!(cuMemFreeHost(out), CUDA_ERROR_INVALID_VALUE);

        // Registration is accepted; copies take the ordinary path.
        let mut plain = vec![7u8; 8192];
        ok!(cuMemHostRegister_v2(plain.as_mut_ptr().cast(), 8192, 0));
        assert_eq!(
            cuMemHostRegister_v2(plain.as_mut_ptr().add(100).cast(), 10, 0),
            CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
        );
        ok!(cuMemcpyHtoD_v2(d, plain.as_ptr().cast(), 8192));
        assert_eq!(read(d, 8192), plain);
        ok!(cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            plain.as_ptr() as u64 + 1
        ));
        assert_eq!(kind, CU_MEMORYTYPE_HOST);
        ok!(cuMemHostUnregister(plain.as_mut_ptr().cast()));
        assert_eq!(
            cuMemHostUnregister(plain.as_mut_ptr().cast()),
            CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
        );
        ok!(cuMemFree_v2(d));
        ok!(cuCtxDestroy_v2(ctx));
    }
}

#[test]
fn streams_and_events_follow_the_contexts_order() {
    let ctx = context(1);
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let mut s: CUstream = null_mut();
        ok!(cuStreamCreateWithPriority(
            &mut s,
            CU_STREAM_NON_BLOCKING,
            -9
        ));
        let mut prio = 0;
        ok!(cuStreamGetPriority(s, &mut prio));
        assert_eq!(prio, -5, "clamped to the range");
        let mut flags = 0;
        ok!(cuStreamGetFlags(s, &mut flags));
        assert_eq!(flags, CU_STREAM_NON_BLOCKING);
        let mut owner = null_mut();
        ok!(cuStreamGetCtx(s, &mut owner));
        assert_eq!(owner, ctx);
        let (mut id_s, mut id_default) = (0, 0);
        ok!(cuStreamGetId(s, &mut id_s));
        ok!(cuStreamGetId(null_mut(), &mut id_default));
        assert_ne!(id_s, id_default);
        let mut capturing = 9;
        ok!(cuStreamIsCapturing(s, &mut capturing));
        assert_eq!(capturing, 0);

        let p = alloc(1024);
        let mut dp = 0;
        ok!(cuMemAllocAsync(&mut dp, 256, s));
        ok!(cuMemsetD32Async(p, 0x0101_0101, 256, s));
        let src = [5u8; 512];
        ok!(cuMemcpyHtoDAsync_v2(p, src.as_ptr().cast(), 512, s));
        ok!(cuMemcpyDtoDAsync_v2(dp, p + 256, 256, s));

        let (mut plain, mut t0, mut t1) = (null_mut(), null_mut(), null_mut());
        ok!(cuEventCreate(&mut plain, CU_EVENT_DISABLE_TIMING));
        ok!(cuEventCreate(&mut t0, 0));
        ok!(cuEventCreate(&mut t1, 0));
        ok!(cuEventQuery(plain)); // never recorded
        ok!(cuEventRecord(plain, s));
        ok!(cuEventRecord(t0, s));
        ok!(cuMemsetD8Async(p + 768, 9, 256, s));
        ok!(cuEventRecordWithFlags(t1, s, 0));
        ok!(cuStreamWaitEvent(null_mut(), plain, 0));
        ok!(cuEventSynchronize(plain));
        ok!(cuEventQuery(plain));
        ok!(cuStreamQuery(s));
        ok!(cuStreamSynchronize(s));
        let mut ms = -1.0f32;
        ok!(cuEventElapsedTime_v2(&mut ms, t0, t1));
        assert!(ms >= 0.0);
        ok!(cuEventElapsedTime(&mut ms, t0, t1));
        assert_eq!(
            cuEventElapsedTime_v2(&mut ms, plain, t1),
            CUDA_ERROR_INVALID_HANDLE
        );

        let got = read(p, 1024);
        assert_eq!(got[..512], [5; 512]);
        assert_eq!(got[512..768], [1; 256]);
        assert_eq!(got[768..], [9; 256]);
        assert_eq!(read(dp, 256), [5; 256]);
        ok!(cuMemFreeAsync(dp, s));

        // Host functions run once the work before them is done.
        extern "C" fn mark(data: *mut c_void) {
            // SAFETY: the test passes a live bool.
            unsafe { *data.cast::<bool>() = true };
        }
        let mut ran = false;
        ok!(cuLaunchHostFunc(
            s,
            Some(mark),
            (&mut ran as *mut bool).cast()
        ));
        assert!(ran);

        ok!(cuEventDestroy_v2(plain));
        assert_eq!(cuEventQuery(plain), CUDA_ERROR_INVALID_HANDLE);
        ok!(cuEventDestroy(t0));
        ok!(cuEventDestroy_v2(t1));
        ok!(cuStreamDestroy_v2(s));
        assert_eq!(cuStreamSynchronize(s), CUDA_ERROR_INVALID_HANDLE);
        assert_eq!(cuEventCreate(&mut plain, 0x40), CUDA_ERROR_INVALID_VALUE);
        ok!(cuMemFree_v2(p));
        ok!(cuCtxDestroy_v2(ctx));
    }
}

#[test]
fn modules_load_the_builtin_catalog_by_image_or_file_name() {
    let ctx = context(0);
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let mut m = null_mut();
        ok!(cuModuleLoadData(&mut m, c"vgpu:builtin".as_ptr().cast()));
        let mut f = null_mut();
        let mut m2 = null_mut();
        ok!(cuModuleLoad(&mut m2, c"vgpu:builtin".as_ptr()));
        assert_ne!(m, m2);
        assert_eq!(
            cuModuleLoad(&mut m2, c"/nonexistent/kernels.ptx".as_ptr()),
            CUDA_ERROR_FILE_NOT_FOUND
        );
        // The CPU executor has no PTX.
        assert_eq!(
            cuModuleLoadData(&mut f, c".version 8.0\n.target sm_90\n".as_ptr().cast()),
            CUDA_ERROR_NOT_SUPPORTED
        );
        let mut dptr = 0;
        assert_eq!(
            cuModuleGetGlobal_v2(&mut dptr, null_mut(), m, c"anything".as_ptr()),
            CUDA_ERROR_NOT_FOUND
        );
        assert_eq!(
            cuModuleLoadData(null_mut(), c"x".as_ptr().cast()),
            CUDA_ERROR_INVALID_VALUE
        );
        ok!(cuModuleUnload(m));
        ok!(cuModuleUnload(m2));
        assert_eq!(cuModuleUnload(m), CUDA_ERROR_INVALID_HANDLE);
        ok!(cuCtxDestroy_v2(ctx));
    }
}

/// 40 bytes of dynamic shared memory per thread.
extern "C" fn forty_bytes_a_thread(block: c_int) -> usize {
    40 * block as usize
}

#[test]
fn the_occupancy_calculator_answers_from_the_devices_and_kernels_attributes() {
    let ctx = context(0);
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let mut m = null_mut();
        ok!(cuModuleLoadData(&mut m, c"vgpu:builtin".as_ptr().cast()));
        let mut f = null_mut();
        ok!(cuModuleGetFunction(&mut f, m, c"vector_add_f32".as_ptr()));
        let mut sms = 0;
        ok!(cuDeviceGetAttribute(&mut sms, 16, 0));
        // The CPU executor's device: 2048 threads and 64 KiB of shared memory per SM,
        // 48 KiB per block, 256-byte allocation (compute capability 0.0); built-in
        // kernels use no registers or static shared memory.
        let mut n = -1;
        ok!(cuOccupancyMaxActiveBlocksPerMultiprocessor(
            &mut n, f, 256, 0
        ));
        assert_eq!(n, 8, "by warps");
        ok!(cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
            &mut n, f, 256, 40000, 1
        ));
        assert_eq!(n, 1, "40192 bytes of 65536");
        ok!(cuOccupancyMaxActiveBlocksPerMultiprocessor(
            &mut n, f, 32, 50000
        ));
        assert_eq!(n, 0, "over the function's 48 KiB");
        assert_eq!(
            cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&mut n, f, 256, 0, 2),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, 0, 0),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, null_mut(), 32, 0),
            CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(
            cuOccupancyMaxActiveBlocksPerMultiprocessor(null_mut(), f, 32, 0),
            CUDA_ERROR_INVALID_VALUE
        );

        let (mut grid, mut block) = (-1, -1);
        ok!(cuOccupancyMaxPotentialBlockSize(
            &mut grid, &mut block, f, None, 0, 0
        ));
        assert_eq!((grid, block), (2 * sms, 1024));
        // 40 bytes a thread: 1024 threads take 40960 bytes, 1 block; 800: 2 blocks,
        // 1600 threads; 544: 21760 bytes, 3 blocks (3 by warps too), 1632 threads,
        // which nothing smaller beats (96 threads tie at 17 blocks).
        ok!(cuOccupancyMaxPotentialBlockSizeWithFlags(
            &mut grid,
            &mut block,
            f,
            Some(forty_bytes_a_thread),
            0,
            0,
            0
        ));
        assert_eq!((grid, block), (3 * sms, 544));
        ok!(cuOccupancyMaxPotentialBlockSize(
            &mut grid, &mut block, f, None, 0, 100
        ));
        // At most 100 threads: 100 (4 warps): 16 blocks, 1600 threads; 96: 21 blocks,
        // 2016; 64: 32 blocks, 2048, all of the SM's.
        assert_eq!((grid, block), (32 * sms, 64));
        assert_eq!(
            cuOccupancyMaxPotentialBlockSize(null_mut(), &mut block, f, None, 0, 0),
            CUDA_ERROR_INVALID_VALUE
        );

        let mut bytes = 0usize;
        ok!(cuOccupancyAvailableDynamicSMemPerBlock(
            &mut bytes, f, 1, 1024
        ));
        assert_eq!(bytes, 48 << 10);
        ok!(cuOccupancyAvailableDynamicSMemPerBlock(
            &mut bytes, f, 2, 1024
        ));
        assert_eq!(bytes, 32 << 10);
        assert_eq!(
            cuOccupancyAvailableDynamicSMemPerBlock(&mut bytes, f, 3, 1024),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuFuncSetCacheConfig(f, 4), CUDA_ERROR_INVALID_VALUE);
        ok!(cuFuncSetCacheConfig(f, 2));
        // Cluster occupancy is not calculated.
        assert_eq!(cuOccupancyMaxActiveClusters(), CUDA_ERROR_NOT_SUPPORTED);
        ok!(cuModuleUnload(m));
        ok!(cuCtxDestroy_v2(ctx));
    }
}

/// a + b with the built-in `vector_add_f32`, launched as `launch` does.
fn vector_add(launch: impl Fn(CUfunction, &[*mut c_void]) -> CUresult) {
    let ctx = context(0);
    let n = 1000usize;
    let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..n).map(|i| 0.5 * i as f32).collect();
    let (da, db, dc) = (alloc(4 * n), alloc(4 * n), alloc(4 * n));
    write(da, &floats(&a));
    write(db, &floats(&b));
    // SAFETY: (this block) every pointer passed is a valid local.
    unsafe {
        ok!(cuMemsetD32_v2(dc, 0x7fc0_0000, n));
        let mut m = null_mut();
        ok!(cuModuleLoadData(&mut m, c"vgpu:builtin".as_ptr().cast()));
        let mut f = null_mut();
        ok!(cuModuleGetFunction(&mut f, m, c"vector_add_f32".as_ptr()));
        let count = n as u32;
        let args: [*mut c_void; 4] = [
            (&da as *const u64).cast_mut().cast(),
            (&db as *const u64).cast_mut().cast(),
            (&dc as *const u64).cast_mut().cast(),
            (&count as *const u32).cast_mut().cast(),
        ];
        ok!(launch(f, &args));
        ok!(cuCtxSynchronize());
        let c = read(dc, 4 * n);
        let expected: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(c, floats(&expected));
        ok!(cuModuleUnload(m));
        ok!(cuCtxDestroy_v2(ctx));
    }
}

#[test]
fn vector_add_runs_through_cu_launch_kernel() {
    vector_add(|f, args| {
        // SAFETY: four parameter pointers to live values.
        unsafe {
            cuLaunchKernel(
                f,
                4,
                1,
                1,
                256,
                1,
                1,
                0,
                null_mut(),
                args.as_ptr().cast_mut(),
                null_mut(),
            )
        }
    });
}

#[test]
fn vector_add_runs_with_an_extra_argument_buffer_and_through_launch_kernel_ex() {
    vector_add(|f, args| {
        // The parameters packed at their offsets (8, 8, 8, 4).
        let mut buf = [0u8; 28];
        for (i, size) in [8, 8, 8, 4].iter().enumerate() {
            // SAFETY: each points to `size` readable bytes.
            let v = unsafe { std::slice::from_raw_parts(args[i].cast::<u8>(), *size) };
            buf[8 * i..8 * i + size].copy_from_slice(v);
        }
        let size = buf.len();
        let mut extra: [*mut c_void; 5] = [
            CU_LAUNCH_PARAM_BUFFER_POINTER as *mut c_void,
            buf.as_mut_ptr().cast(),
            CU_LAUNCH_PARAM_BUFFER_SIZE as *mut c_void,
            (&size as *const usize).cast_mut().cast(),
            CU_LAUNCH_PARAM_END as *mut c_void,
        ];
        // SAFETY: an END-terminated extra list over a live buffer.
        let r = unsafe {
            cuLaunchKernel(
                f,
                4,
                1,
                1,
                256,
                1,
                1,
                0,
                null_mut(),
                null_mut(),
                extra.as_mut_ptr(),
            )
        };
        if r != CUDA_SUCCESS {
            return r;
        }
        let config = CUlaunchConfig {
            grid_dim_x: 2,
            grid_dim_y: 1,
            grid_dim_z: 1,
            block_dim_x: 512,
            block_dim_y: 1,
            block_dim_z: 1,
            shared_mem_bytes: 0,
            h_stream: null_mut(),
            attrs: null_mut(),
            num_attrs: 0,
        };
        // SAFETY: a live config and four parameter pointers.
        unsafe { cuLaunchKernelEx(&config, f, args.as_ptr().cast_mut(), null_mut()) }
    });
}

#[test]
fn a_librarys_kernel_launches_and_describes_its_parameters() {
    let ctx = context(0);
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let mut lib = null_mut();
        ok!(cuLibraryLoadData(
            &mut lib,
            c"vgpu:builtin".as_ptr().cast(),
            null_mut(),
            null_mut(),
            0,
            null_mut(),
            null_mut(),
            0
        ));
        let mut k = null_mut();
        ok!(cuLibraryGetKernel(&mut k, lib, c"scale_f32".as_ptr()));
        assert_eq!(
            cuLibraryGetKernel(&mut k, lib, c"no_such_kernel".as_ptr()),
            CUDA_ERROR_NOT_FOUND
        );
        ok!(cuLibraryGetKernel(&mut k, lib, c"scale_f32".as_ptr()));
        let mut f = null_mut();
        ok!(cuKernelGetFunction(&mut f, k));
        let (mut offset, mut size) = (9, 9);
        ok!(cuFuncGetParamInfo(f, 1, &mut offset, &mut size));
        assert_eq!((offset, size), (8, 4));
        ok!(cuKernelGetParamInfo(k, 2, &mut offset, &mut size));
        assert_eq!((offset, size), (12, 4));
        assert_eq!(
            cuFuncGetParamInfo(f, 3, &mut offset, &mut size),
            CUDA_ERROR_INVALID_VALUE
        );
        let mut threads = 0;
        ok!(cuFuncGetAttribute(&mut threads, 0, f));
        assert!(threads > 0);
        ok!(cuFuncSetAttribute(f, 8, 1024));
        ok!(cuFuncGetAttribute(&mut threads, 8, f));
        assert_eq!(threads, 1024);
        let mut name: *const c_char = null();
        ok!(cuKernelGetName(&mut name, k));
        assert_eq!(CStr::from_ptr(name).to_str(), Ok("scale_f32"));
        ok!(cuFuncGetName(&mut name, f));
        assert_eq!(CStr::from_ptr(name).to_str(), Ok("scale_f32"));

        let x = alloc(64);
        write(x, &floats(&[2.0; 16]));
        let (alpha, n) = (1.5f32, 16u32);
        let mut args: [*mut c_void; 3] = [
            (&x as *const u64).cast_mut().cast(),
            (&alpha as *const f32).cast_mut().cast(),
            (&n as *const u32).cast_mut().cast(),
        ];
        // A CUkernel launches as a function of the current context.
        ok!(cuLaunchKernel(
            k,
            1,
            1,
            1,
            16,
            1,
            1,
            0,
            null_mut(),
            args.as_mut_ptr(),
            null_mut()
        ));
        assert_eq!(read(x, 64), floats(&[3.0; 16]));
        ok!(cuLibraryUnload(lib));
        assert_eq!(cuKernelGetFunction(&mut f, k), CUDA_ERROR_INVALID_HANDLE);
        ok!(cuCtxDestroy_v2(ctx));
    }
}

#[test]
fn threads_share_a_primary_context_as_cudarcs_threading_example_does() {
    setup();
    let mut primary = null_mut();
    // SAFETY: a valid out-parameter.
    ok!(unsafe { cuDevicePrimaryCtxRetain(&mut primary, 0) });
    let primary = primary as usize;
    let workers: Vec<_> = (0..6u32)
        .map(|t| {
            std::thread::spawn(move || {
                ok!(cuCtxSetCurrent(primary as CUcontext));
                let mut s = null_mut();
                // SAFETY: a valid out-parameter.
                ok!(unsafe { cuStreamCreate(&mut s, 0) });
                for round in 0..5u32 {
                    let p = alloc(4096);
                    let value = t << 16 | round;
                    ok!(cuMemsetD32Async(p, value, 1024, s));
                    ok!(cuStreamSynchronize(s));
                    let got = read(p, 4096);
                    assert!(got
                        .chunks_exact(4)
                        .all(|w| u32::from_le_bytes(w.try_into().unwrap()) == value));
                    ok!(cuMemFree_v2(p));
                }
                ok!(cuStreamDestroy_v2(s));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    ok!(cuDevicePrimaryCtxRelease_v2(0));
}

#[test]
fn entry_points_resolve_by_name_and_version_and_errors_have_names() {
    setup();
    // SAFETY: (this test) every pointer passed is a valid local or NULL on purpose.
    unsafe {
        let mut pfn: *mut c_void = null_mut();
        let mut status = 9;
        ok!(cuGetProcAddress_v2(
            c"cuMemAlloc".as_ptr(),
            &mut pfn,
            13000,
            0,
            &mut status
        ));
        assert_eq!(pfn as usize, cuMemAlloc_v2 as *const () as usize);
        assert_eq!(status, CU_GET_PROC_ADDRESS_SUCCESS);
        ok!(cuGetProcAddress(
            c"cuCtxCreate".as_ptr(),
            &mut pfn,
            12000,
            0
        ));
        assert_eq!(pfn as usize, cuCtxCreate_v3 as *const () as usize);
        ok!(cuGetProcAddress_v2(
            c"cuLaunchKernel".as_ptr(),
            &mut pfn,
            12080,
            2,
            &mut status
        ));
        assert_eq!(pfn as usize, cuLaunchKernel as *const () as usize);
        assert_eq!(
            cuGetProcAddress_v2(c"cuNoSuchThing".as_ptr(), &mut pfn, 13000, 0, &mut status),
            CUDA_ERROR_NOT_FOUND
        );
        assert!(pfn.is_null());
        assert_eq!(status, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);

        let mut s: *const c_char = null();
        ok!(cuGetErrorName(CUDA_ERROR_OUT_OF_MEMORY, &mut s));
        assert_eq!(CStr::from_ptr(s).to_str(), Ok("CUDA_ERROR_OUT_OF_MEMORY"));
        ok!(cuGetErrorString(CUDA_ERROR_INVALID_VALUE, &mut s));
        assert_eq!(CStr::from_ptr(s).to_str(), Ok("invalid argument"));
        assert_eq!(cuGetErrorName(4242, &mut s), CUDA_ERROR_INVALID_VALUE);
        assert!(s.is_null());
        assert_eq!(cuGetErrorString(0, null_mut()), CUDA_ERROR_INVALID_VALUE);

        let uuid = [1u8; 16];
        let mut table: *const c_void = 1 as *const c_void;
        assert_eq!(
            cuGetExportTable(&mut table, &uuid),
            CUDA_ERROR_NOT_SUPPORTED
        );
        assert!(table.is_null());
        // An unimplemented export: NOT_SUPPORTED, whatever it is passed.
        assert_eq!(cuArrayDestroy(), CUDA_ERROR_NOT_SUPPORTED);
        assert_eq!(cuGraphCreate(), CUDA_ERROR_NOT_SUPPORTED);
    }
}

// ---- NVIDIA's runtime's private tables (cuGetExportTable) ----

/// The table `u`, as NVIDIA's runtime gets it.
fn export_table(u: &Uuid) -> *const usize {
    setup();
    let mut t = null();
    // SAFETY: a valid out-parameter and UUID.
    ok!(unsafe { cuGetExportTable(&mut t, u) });
    assert!(!t.is_null());
    t.cast()
}

/// Entry `i` of a table, as a function of type `F`.
///
/// # Safety
/// `t` must hold at least `i + 1` words and entry `i` must be a function of type `F`.
unsafe fn entry<F: Copy>(t: *const usize, i: usize) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<usize>());
    // SAFETY: word `i` exists and is a function of type `F` (the caller's promise).
    unsafe { std::mem::transmute_copy(&*t.add(i)) }
}

type Put = unsafe extern "C" fn(
    CUcontext,
    *mut c_void,
    *mut c_void,
    Option<unsafe extern "C" fn(CUcontext, *mut c_void, *mut c_void)>,
) -> CUresult;
type Delete = unsafe extern "C" fn(CUcontext, *mut c_void) -> CUresult;
type Get = unsafe extern "C" fn(*mut *mut c_void, CUcontext, *mut c_void) -> CUresult;
type LoadWrapped = unsafe extern "C" fn(*mut CUmodule, *const c_void) -> CUresult;
type LoadWrappedExt = unsafe extern "C" fn(
    *mut CUmodule,
    *const c_void,
    *mut c_void,
    *mut c_void,
    c_uint,
) -> CUresult;
type LoadFatbin = unsafe extern "C" fn(
    *const c_void,
    *mut CUmodule,
    *mut c_void,
    *mut c_void,
    c_uint,
) -> CUresult;

#[test]
fn each_known_table_answers_with_its_size_and_others_are_refused() {
    setup();
    let sized: [(Uuid, usize); 5] = [
        (export_tables::CUDART_INTERFACE_UUID, 13),
        (export_tables::TOOLS_TLS_UUID, 4),
        (export_tables::TOOLS_RUNTIME_CALLBACK_HOOKS_UUID, 7),
        (export_tables::CONTEXT_CHECKS_UUID, 4),
        (export_tables::INTEGRITY_CHECK_UUID, 3),
    ];
    for (u, words) in sized {
        let t = export_table(&u);
        // SAFETY: a table states its byte size in its first word.
        assert_eq!(unsafe { *t }, words * 8, "{}", export_tables::hex(&u));
    }
    // Context-local storage has no size word: its first entry is a function.
    let t = export_table(&export_tables::CONTEXT_LOCAL_STORAGE_UUID);
    // SAFETY: the table's first word.
    assert_eq!(unsafe { *t }, export_tables::storage_put_address());
    // SAFETY: (the rest) valid locals or NULL on purpose.
    unsafe {
        let mut t: *const c_void = 1 as *const c_void;
        assert_eq!(
            cuGetExportTable(&mut t, &export_tables::CUDA13_FIRST_UUID),
            CUDA_ERROR_NOT_FOUND,
            "declined on purpose"
        );
        assert!(t.is_null());
        t = 1 as *const c_void;
        let heap_access: Uuid = 0x195bcbf4_d67d_024a_acc5_1d29cea631aeu128.to_be_bytes();
        assert_eq!(
            cuGetExportTable(&mut t, &heap_access),
            CUDA_ERROR_NOT_SUPPORTED
        );
        assert!(t.is_null());
        assert_eq!(
            cuGetExportTable(null_mut(), &export_tables::CUDART_INTERFACE_UUID),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(cuGetExportTable(&mut t, null()), CUDA_ERROR_INVALID_VALUE);
        // An entry nobody understands answers an error rather than a guess.
        let cudart = export_table(&export_tables::CUDART_INTERFACE_UUID);
        let unknown: unsafe extern "C" fn() -> CUresult = entry(cudart, 3);
        assert_eq!(unknown(), CUDA_ERROR_NOT_SUPPORTED);
        assert_eq!(unknown(), CUDA_ERROR_NOT_SUPPORTED);
        let load_compilers: unsafe extern "C" fn() -> CUresult = entry(cudart, 12);
        ok!(load_compilers());
        let fn7: unsafe extern "C" fn(usize) -> CUresult = entry(cudart, 7);
        ok!(fn7(42));
    }
}

static DESTROYED: std::sync::Mutex<Vec<(usize, usize, usize)>> = std::sync::Mutex::new(Vec::new());

unsafe extern "C" fn record_destroyed(ctx: CUcontext, key: *mut c_void, value: *mut c_void) {
    DESTROYED
        .lock()
        .unwrap()
        .push((ctx as usize, key as usize, value as usize));
}

#[test]
fn context_local_storage_keeps_values_per_context_until_the_context_goes() {
    let t = export_table(&export_tables::CONTEXT_LOCAL_STORAGE_UUID);
    // SAFETY: (this test) the table's entries have these types; every pointer passed is
    // a valid local or NULL on purpose.
    unsafe {
        let (put, delete, get): (Put, Delete, Get) = (entry(t, 0), entry(t, 1), entry(t, 2));
        let (key, other_key) = (
            0x5e70_0001usize as *mut c_void,
            0x5e70_0002usize as *mut c_void,
        );
        let ctx = context(0);
        let mine = context(1);
        ok!(cuCtxPopCurrent_v2(null_mut()));
        let mut cur = null_mut();
        ok!(cuCtxGetCurrent(&mut cur));
        assert_eq!(cur, ctx);

        // NULL is the current context.
        ok!(put(null_mut(), key, 0xa1 as *mut c_void, None));
        let mut v = null_mut();
        ok!(get(&mut v, ctx, key));
        assert_eq!(v as usize, 0xa1);
        ok!(get(&mut v, null_mut(), key));
        assert_eq!(v as usize, 0xa1);
        assert_eq!(
            get(&mut v, mine, key),
            CUDA_ERROR_INVALID_HANDLE,
            "per context"
        );
        assert_eq!(get(&mut v, ctx, other_key), CUDA_ERROR_INVALID_HANDLE);
        assert_eq!(get(null_mut(), ctx, key), CUDA_ERROR_INVALID_VALUE);
        ok!(put(ctx, key, 0xa2 as *mut c_void, None));
        ok!(get(&mut v, ctx, key));
        assert_eq!(v as usize, 0xa2, "replaced");
        ok!(delete(ctx, key));
        assert_eq!(get(&mut v, ctx, key), CUDA_ERROR_INVALID_HANDLE);
        // An absent key is no error.
        ok!(delete(ctx, key));
        assert_eq!(
            put(0x1234 as CUcontext, key, null_mut(), None),
            CUDA_ERROR_INVALID_CONTEXT
        );
        let k = key as usize;
        std::thread::spawn(move || {
            let mut v = null_mut();
            let r = get(&mut v, null_mut(), k as *mut c_void);
            assert_eq!(r, CUDA_ERROR_INVALID_CONTEXT, "nothing current");
        })
        .join()
        .unwrap();

        // Destroying a context forgets its values and runs their destructors once,
        // after the call returned; a deleted value's destructor never runs.
        ok!(put(mine, key, 0xb1 as *mut c_void, Some(record_destroyed)));
        ok!(put(
            mine,
            other_key,
            0xb2 as *mut c_void,
            Some(record_destroyed)
        ));
        ok!(delete(mine, other_key));
        ok!(put(ctx, key, 0xc1 as *mut c_void, Some(record_destroyed)));
        ok!(cuCtxDestroy_v2(mine));
        let ran: Vec<_> = DESTROYED
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.0 == mine as usize)
            .copied()
            .collect();
        assert_eq!(ran, [(mine as usize, key as usize, 0xb1)]);
        assert_eq!(get(&mut v, mine, key), CUDA_ERROR_INVALID_CONTEXT);
        ok!(get(&mut v, ctx, key));
        assert_eq!(v as usize, 0xc1, "the other context's value stays");
        ok!(cuCtxDestroy_v2(ctx));
        assert!(DESTROYED
            .lock()
            .unwrap()
            .contains(&(ctx as usize, key as usize, 0xc1)));
    }
}

#[test]
fn the_runtimes_primary_context_is_the_drivers_active_and_holds_storage() {
    let cudart = export_table(&export_tables::CUDART_INTERFACE_UUID);
    let storage = export_table(&export_tables::CONTEXT_LOCAL_STORAGE_UUID);
    // SAFETY: (this test) the tables' entries have these types; every pointer passed is
    // a valid local or NULL on purpose.
    unsafe {
        let primary: unsafe extern "C" fn(*mut CUcontext, CUdevice) -> CUresult = entry(cudart, 2);
        let (put, delete): (Put, Delete) = (entry(storage, 0), entry(storage, 1));
        let mut from_table = null_mut();
        ok!(primary(&mut from_table, 0));
        assert!(!from_table.is_null());
        // The runtime makes it current without retaining it: it must be active.
        ok!(cuCtxSetCurrent(from_table));
        ok!(cuCtxSetCurrent(null_mut()));
        assert_eq!(primary(&mut from_table, 7), CUDA_ERROR_INVALID_DEVICE);
        assert_eq!(primary(null_mut(), 0), CUDA_ERROR_INVALID_VALUE);
        // The handle names the primary context whether or not it is active.
        ok!(put(
            from_table,
            0x5e70_0003 as *mut c_void,
            null_mut(),
            None
        ));
        ok!(delete(from_table, 0x5e70_0003 as *mut c_void));
        let mut retained = null_mut();
        ok!(cuDevicePrimaryCtxRetain(&mut retained, 0));
        assert_eq!(retained, from_table);
        ok!(cuDevicePrimaryCtxRelease_v2(0));
    }
}

#[test]
fn cudarts_fatbin_wrapper_loads_a_module_that_launches() {
    let cudart = export_table(&export_tables::CUDART_INTERFACE_UUID);
    let ctx = context(0);
    // A `__fatBinC_Wrapper_t` (magic, version, data, filename) around an image the
    // image code recognises: the built-in catalog's name.
    let wrapper =
        |data: *const u8| -> Vec<u64> { vec![u64::from(0x4662_43b1u32) | 1 << 32, data as u64, 0] };
    let builtin = wrapper(c"vgpu:builtin".as_ptr().cast());
    // A fatbin: magic, version 1, 16-byte header, 64 bytes after it.
    let mut fatbin = 0xBA55_ED50u32.to_le_bytes().to_vec();
    fatbin.extend_from_slice(&1u16.to_le_bytes());
    fatbin.extend_from_slice(&16u16.to_le_bytes());
    fatbin.extend_from_slice(&64u64.to_le_bytes());
    fatbin.extend_from_slice(&[0x5a; 64]);
    let wrapped_fatbin = wrapper(fatbin.as_ptr());
    // SAFETY: (this test) the table's entries have these types; every pointer passed is
    // a valid local or NULL on purpose.
    unsafe {
        let (load, load_ext1, load_fatbin): (LoadWrapped, LoadWrappedExt, LoadFatbin) =
            (entry(cudart, 1), entry(cudart, 6), entry(cudart, 8));
        let mut m = null_mut();
        ok!(load(&mut m, builtin.as_ptr().cast()));
        let mut f = null_mut();
        ok!(cuModuleGetFunction(&mut f, m, c"vector_add_f32".as_ptr()));
        let mut m2 = null_mut();
        ok!(load_ext1(
            &mut m2,
            builtin.as_ptr().cast(),
            null_mut(),
            null_mut(),
            0
        ));
        assert_ne!(m, m2);
        assert_eq!(
            load_ext1(
                &mut m2,
                builtin.as_ptr().cast(),
                1 as *mut c_void,
                null_mut(),
                0
            ),
            CUDA_ERROR_NOT_SUPPORTED,
            "arguments nobody understands"
        );

        // The kernel runs: c = a + b.
        let n = 256usize;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let (da, dc) = (alloc(4 * n), alloc(4 * n));
        write(da, &floats(&a));
        let count = n as u32;
        let args: [*mut c_void; 4] = [
            (&da as *const u64).cast_mut().cast(),
            (&da as *const u64).cast_mut().cast(),
            (&dc as *const u64).cast_mut().cast(),
            (&count as *const u32).cast_mut().cast(),
        ];
        ok!(cuLaunchKernel(
            f,
            1,
            1,
            1,
            256,
            1,
            1,
            0,
            null_mut(),
            args.as_ptr().cast_mut(),
            null_mut()
        ));
        let doubled: Vec<f32> = a.iter().map(|x| 2.0 * x).collect();
        assert_eq!(read(dc, 4 * n), floats(&doubled));

        // A real fatbin, wrapped or not, goes to the device as an image: the CPU
        // executor has no binary images (a GPU loads it).
        assert_eq!(
            load(&mut m2, wrapped_fatbin.as_ptr().cast()),
            CUDA_ERROR_NOT_SUPPORTED
        );
        assert_eq!(
            load_fatbin(fatbin.as_ptr().cast(), &mut m2, null_mut(), null_mut(), 0),
            CUDA_ERROR_NOT_SUPPORTED
        );
        // Anything else is no image of the runtime's.
        assert_eq!(
            load(&mut m2, c".version 8.0".as_ptr().cast()),
            CUDA_ERROR_INVALID_IMAGE
        );
        assert_eq!(
            load(null_mut(), builtin.as_ptr().cast()),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(load(&mut m2, null()), CUDA_ERROR_INVALID_VALUE);
        ok!(cuCtxDestroy_v2(ctx));
        assert_eq!(
            load(&mut m2, builtin.as_ptr().cast()),
            CUDA_ERROR_INVALID_CONTEXT,
            "a module needs a current context"
        );
    }
}

#[test]
fn the_tools_hooks_and_checks_answer_as_nvidias_driver_does() {
    let hooks = export_table(&export_tables::TOOLS_RUNTIME_CALLBACK_HOOKS_UUID);
    let checks = export_table(&export_tables::CONTEXT_CHECKS_UUID);
    // SAFETY: (this test) the tables' entries have these types; every pointer passed is
    // a valid local.
    unsafe {
        for (i, words) in [(2, 1024), (6, 14)] {
            let buffer: unsafe extern "C" fn(*mut *mut c_void, *mut usize) = entry(hooks, i);
            let (mut p, mut n) = (null_mut(), 0usize);
            buffer(&mut p, &mut n);
            assert_eq!(n, words);
            let zeroed = std::slice::from_raw_parts(p.cast::<u64>(), words);
            assert!(zeroed.iter().all(|&w| w == 0), "no tool subscribed");
            let (mut again, mut n2) = (null_mut(), 0usize);
            buffer(&mut again, &mut n2);
            assert_eq!((again, n2), (p, n), "the same memory each time");
        }
        let hook1: unsafe extern "C" fn(c_uint, *mut c_void) -> usize = entry(hooks, 1);
        assert_eq!(hook1(3, null_mut()), 0);
        let check: unsafe extern "C" fn(CUcontext, *mut u32, *mut *const c_void) -> CUresult =
            entry(checks, 2);
        let mut result = 7u32;
        ok!(check(null_mut(), &mut result, null_mut()));
        assert_eq!(result, 0);
        let flags: unsafe extern "C" fn() -> u32 = entry(checks, 3);
        assert_eq!(flags(), 0);
    }
}

#[test]
fn the_integrity_check_hashes_what_the_runtime_sees_through_the_driver_api() {
    let table = export_table(&export_tables::INTEGRITY_CHECK_UUID);
    let cudart = export_table(&export_tables::CUDART_INTERFACE_UUID);
    // SAFETY: (this test) the table's entry has this type; every pointer passed is a
    // valid local.
    unsafe {
        let check: unsafe extern "C" fn(c_uint, u64, *mut [u64; 2]) -> CUresult = entry(table, 1);
        let mut r = [0u64; 2];
        ok!(check(13000, 1_790_000_000, &mut r));
        assert_eq!(r, [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8]);
        ok!(check(13001, 1_790_000_000, &mut r));
        assert_eq!(r, [0x1841_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8]);
        assert_eq!(check(13002, 0, null_mut()), CUDA_ERROR_INVALID_VALUE);

        // What the runtime computes on its side, from what the driver API tells it.
        let mut version = 0;
        ok!(cuDriverGetVersion(&mut version));
        let mut count = 0;
        ok!(cuDeviceGetCount(&mut count));
        let devices: Vec<integrity::Device> = (0..count)
            .map(|dev| {
                let mut uuid = [0u8; 16];
                ok!(cuDeviceGetUuid_v2(&mut uuid, dev));
                let attribute = |a| {
                    let mut v = -1;
                    ok!(cuDeviceGetAttribute(&mut v, a, dev));
                    v
                };
                integrity::Device {
                    uuid,
                    pci_domain: attribute(50),
                    pci_bus: attribute(33),
                    pci_device: attribute(34),
                }
            })
            .collect();
        let seconds = 1_790_000_123;
        let expected = integrity::answer(
            &integrity::Inputs {
                driver_version: version as u32,
                version: 13002,
                process: std::process::id(),
                thread: libc::pthread_self() as u32,
                cudart_table: cudart as usize,
                integrity_table: table as usize,
                function: *table.add(1),
                unix_seconds: seconds,
            },
            &devices,
        );
        ok!(check(13002, seconds, &mut r));
        assert_eq!(r, expected);
        ok!(check(13002, seconds + 1, &mut r));
        assert_ne!(r, expected, "the time stamp counts");
    }
}
