// SPDX-License-Identifier: Apache-2.0
//! The CPU executor's own memory (security review, finding 6): built-in kernels run in
//! place in bounded chunks, so a launch over large buffers allocates next to nothing
//! outside the tenant's quota, and an allocation the host cannot make answers
//! OUT_OF_MEMORY instead of aborting the daemon.
//!
//! A counting global allocator sees every heap allocation of this test binary (all
//! threads, the tenant's worker included), so the tests here take turns (`SERIAL`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vgpu_mediator::cpu::CpuExecutorFactory;
use vgpu_mediator::{Mediator, TenantConfig, TenantId};
use vgpu_protocol::{Command, Launch, Param, Request, Response, Status, BUILTIN_MODULE};

/// Counts the bytes held on the heap now and the most held since the last reset.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

fn shrank(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged; the
// counters never affect what is returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The most the heap grew above its level at the start while `f` ran.
fn peak_growth(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

/// Buffers of the launches below: 64 MiB each, 16 Mi f32 elements.
const BUFFER: u64 = 64 << 20;
const ELEMS: u32 = (BUFFER / 4) as u32;
/// What a launch or copy may allocate besides the request and its answer. The kernels'
/// scratch is a few 64 KiB chunks; the old code copied every buffer (4-5x, 256+ MiB here).
const BOUND: usize = 4 << 20;

fn tenant(m: &Mediator, quota: u64) -> TenantId {
    m.add_tenant(TenantConfig {
        name: "vm1".into(),
        mem_quota: quota,
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

fn launch(kernel: &str, block: [u32; 3], params: Vec<Param>) -> Command {
    Command::Launch(Launch {
        module: BUILTIN_MODULE,
        kernel: kernel.into(),
        grid: [64, 1, 1],
        block,
        shared_bytes: 0,
        params,
    })
}

fn f32_at(m: &Mediator, t: TenantId, s: u64, handle: u64, index: u64) -> f32 {
    let data = ok(
        m,
        t,
        s,
        Command::Dtoh {
            src: handle,
            offset: index * 4,
            len: 4,
        },
    )
    .data;
    f32::from_le_bytes(data.try_into().unwrap())
}

fn set_f32(m: &Mediator, t: TenantId, s: u64, handle: u64, value: f32) {
    let memset = Command::Memset {
        dst: handle,
        offset: 0,
        len: BUFFER,
        value: value.to_bits(),
        width: 4,
    };
    ok(m, t, s, memset);
}

#[test]
fn builtin_kernels_and_copies_over_64_mib_buffers_allocate_a_bounded_amount() {
    let _serial = serial();
    let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
    let t = tenant(&m, 3 * BUFFER);
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    let [x, y, z] = [0; 3].map(|_| ok(&m, t, s, Command::Alloc { size: BUFFER }).value0);
    set_f32(&m, t, s, x, 1.5);
    set_f32(&m, t, s, y, 2.0);
    let n = Param::u32(ELEMS);
    let one = Param::u32(1);
    let (bx, by, bz) = (Param::Buffer(x), Param::Buffer(y), Param::Buffer(z));
    let linear = [256, 1, 1];
    let tiles = [16, 16, 1];
    // Each step: what it does, then an element of a buffer and the value it must hold.
    let steps: Vec<(Command, u64, u64, f32)> = vec![
        (
            launch(
                "vector_add_f32",
                linear,
                vec![bx.clone(), by.clone(), bz.clone(), n.clone()],
            ),
            z,
            u64::from(ELEMS) - 1,
            3.5,
        ),
        (
            launch(
                "saxpy_f32",
                linear,
                vec![bz.clone(), bx.clone(), Param::f32(2.0), n.clone()],
            ),
            z,
            u64::from(ELEMS) / 2,
            6.5,
        ),
        (
            launch(
                "scale_f32",
                linear,
                vec![bz.clone(), Param::f32(0.5), n.clone()],
            ),
            z,
            7,
            3.25,
        ),
        (
            launch(
                "reduce_sum_f32",
                linear,
                vec![bx.clone(), bz.clone(), n.clone()],
            ),
            z,
            0,
            3.25 + 1.5 * ELEMS as f32,
        ),
        (
            launch(
                "fill_u32",
                linear,
                vec![bz.clone(), Param::u32(1.0f32.to_bits()), n.clone()],
            ),
            z,
            u64::from(ELEMS) - 1,
            1.0,
        ),
        // C = A (16 Mi x 1) * B (1 x 1): a tall A and C.
        (
            launch(
                "matmul_f32",
                tiles,
                vec![
                    bx.clone(),
                    by.clone(),
                    bz.clone(),
                    n.clone(),
                    one.clone(),
                    one.clone(),
                ],
            ),
            z,
            u64::from(ELEMS) - 1,
            3.0,
        ),
        // C = A (1 x 1) * B (1 x 16 Mi): a wide B and C.
        (
            launch(
                "matmul_f32",
                tiles,
                vec![
                    by.clone(),
                    bx.clone(),
                    bz.clone(),
                    one.clone(),
                    n.clone(),
                    one.clone(),
                ],
            ),
            z,
            12345,
            3.0,
        ),
        // C = A (1 x 16 Mi) * B (16 Mi x 1): a long A and B, one element of C.
        (
            launch(
                "matmul_f32",
                tiles,
                vec![
                    bx.clone(),
                    by.clone(),
                    bz.clone(),
                    one.clone(),
                    one.clone(),
                    n.clone(),
                ],
            ),
            z,
            0,
            // An f32 fma chain from +0 in increasing k, as the kernel computes it.
            (0..ELEMS).fold(0.0f32, |acc, _| 1.5f32.mul_add(2.0, acc)),
        ),
        (
            Command::Dtod {
                dst: z,
                dst_offset: 0,
                src: y,
                src_offset: 0,
                len: BUFFER,
            },
            z,
            u64::from(ELEMS) - 1,
            2.0,
        ),
        (
            Command::Memset {
                dst: z,
                offset: 0,
                len: BUFFER,
                value: 0.25f32.to_bits(),
                width: 4,
            },
            z,
            99,
            0.25,
        ),
    ];
    for (command, handle, index, want) in steps {
        let growth = peak_growth(|| {
            ok(&m, t, s, command.clone());
            ok(&m, t, s, Command::Sync);
        });
        assert!(
            growth < BOUND,
            "{command:?} grew the heap by {growth} bytes over {BUFFER}-byte buffers"
        );
        assert_eq!(f32_at(&m, t, s, handle, index), want, "{command:?}");
    }
}

#[test]
fn an_allocation_the_host_cannot_make_is_out_of_memory_and_the_tenant_serves_on() {
    let _serial = serial();
    let m = Mediator::new(Arc::new(CpuExecutorFactory::new()));
    // A quota that large lets the request reach the executor.
    let t = tenant(&m, u64::MAX);
    let s = ok(&m, t, 0, Command::SessionOpen).value0;
    for size in [1 << 50, 1 << 62, u64::MAX] {
        let r = call(&m, t, s, Command::Alloc { size });
        assert_eq!(r.status, Status::OutOfMemory, "ALLOC of {size} bytes");
    }
    assert_eq!(m.usage(t).unwrap().mem_used, 0);
    let h = ok(&m, t, s, Command::Alloc { size: 64 }).value0;
    let data: Vec<u8> = (1..=16)
        .flat_map(|i: u32| (i as f32).to_le_bytes())
        .collect();
    ok(
        &m,
        t,
        s,
        Command::Htod {
            dst: h,
            offset: 0,
            data,
        },
    );
    let scale = launch(
        "scale_f32",
        [32, 1, 1],
        vec![Param::Buffer(h), Param::f32(2.0), Param::u32(16)],
    );
    ok(&m, t, s, scale);
    ok(&m, t, s, Command::Sync);
    assert_eq!(f32_at(&m, t, s, h, 15), 32.0);
    ok(&m, t, s, Command::Free { handle: h });
    ok(&m, t, s, Command::SessionClose);
}
