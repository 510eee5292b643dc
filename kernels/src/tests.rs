// SPDX-License-Identifier: Apache-2.0
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Host buffers by handle: the simplest `CpuMemory`.
#[derive(Default)]
struct TestMemory {
    buffers: HashMap<u64, Vec<u8>>,
}

impl TestMemory {
    fn put_f32(&mut self, handle: u64, values: &[f32]) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.buffers.insert(handle, bytes);
    }

    fn put_u32(&mut self, handle: u64, values: &[u32]) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.buffers.insert(handle, bytes);
    }

    fn f32s(&self, handle: u64) -> Vec<f32> {
        self.buffers[&handle]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn u32s(&self, handle: u64) -> Vec<u32> {
        self.buffers[&handle]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn len_of(&self, handle: u64) -> Option<u64> {
        self.buffers.get(&handle).map(|b| b.len() as u64)
    }
}

impl CpuMemory for TestMemory {
    fn len(&self, buffer: u64) -> Option<u64> {
        self.len_of(buffer)
    }

    fn read(&self, buffer: u64, offset: u64, out: &mut [u8]) -> bool {
        let Some(data) = self.buffers.get(&buffer) else {
            return false;
        };
        let start = offset as usize;
        match data.get(start..start + out.len()) {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn write(&mut self, buffer: u64, offset: u64, src: &[u8]) -> bool {
        let Some(data) = self.buffers.get_mut(&buffer) else {
            return false;
        };
        let start = offset as usize;
        match data.get_mut(start..start + src.len()) {
            Some(dst) => {
                dst.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

const LINEAR: LaunchShape = LaunchShape {
    grid: [4, 1, 1],
    block: [256, 1, 1],
    shared_bytes: 0,
};

const TILES: LaunchShape = LaunchShape {
    grid: [2, 2, 1],
    block: [16, 16, 1],
    shared_bytes: 0,
};

fn spec(name: &str) -> &'static KernelSpec {
    find(name).unwrap_or_else(|| panic!("{name} is missing from the catalog"))
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn lens(table: &'static [(u64, u64)]) -> impl Fn(u64) -> Option<u64> {
    move |handle| {
        table
            .iter()
            .find(|(h, _)| *h == handle)
            .map(|(_, len)| *len)
    }
}

// ---- reference ----

#[test]
fn reference_vector_add_adds_element_wise() {
    let mut c = [0.0; 3];
    reference::vector_add_f32(&[1.0, -2.5, 1e30], &[2.0, 0.5, 1e30], &mut c);
    assert_eq!(c, [3.0, -2.0, 2e30]);
}

#[test]
fn reference_saxpy_rounds_once_like_fma() {
    // a * x = 1 - 2^-46 exactly; rounding the product first would give 1.0 and a sum of 0.
    let e = f32::EPSILON;
    let mut y = [-1.0, 3.0];
    reference::saxpy_f32(&mut y, &[1.0 - e, 2.0], 1.0 + e);
    assert_eq!(y, [-(2.0f32.powi(-46)), 2.0 * (1.0 + e) + 3.0]);
}

#[test]
fn reference_scale_multiplies_in_place() {
    let mut x = [1.0, -3.0, 0.25];
    reference::scale_f32(&mut x, -2.0);
    assert_eq!(x, [-2.0, 6.0, -0.5]);
}

#[test]
fn reference_reduce_sum_accumulates_in_f64() {
    // In f32, each 2^24 + 1 rounds back to 2^24; in f64 the four ones survive.
    assert_eq!(
        reference::reduce_sum_f32(&[16_777_216.0, 1.0, 1.0, 1.0, 1.0]),
        16_777_220.0
    );
    assert_eq!(reference::reduce_sum_f32(&[]), 0.0);
}

#[test]
fn reference_matmul_multiplies_row_major() {
    // [1 2 3; 4 5 6] * [7 8; 9 10; 11 12]
    let mut c = [0.0; 4];
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
    reference::matmul_f32(&a, &b, &mut c, 2, 2, 3);
    assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
}

#[test]
fn reference_matmul_with_k_zero_writes_zeros() {
    let mut c = [7.0; 6];
    reference::matmul_f32(&[], &[], &mut c, 2, 3, 0);
    assert_eq!(bits(&c), [0; 6]);
}

#[test]
fn reference_matmul_ragged_k_padding_turns_negative_zero_positive() {
    // -1e-30 * 1e-30 underflows to -0.0. The GPU pads k to 16 with fma(0, 0, acc).
    let mut c = [1.0];
    reference::matmul_f32(&[-1e-30], &[1e-30], &mut c, 1, 1, 1);
    assert_eq!(c[0].to_bits(), 0.0f32.to_bits());
    let mut c = [1.0];
    reference::matmul_f32(&[-1e-30; 16], &[1e-30; 16], &mut c, 1, 1, 16);
    assert_eq!(c[0].to_bits(), (-0.0f32).to_bits());
}

#[test]
fn reference_fill_sets_every_element() {
    let mut x = [1, 2, 3];
    reference::fill_u32(&mut x, 0xdead_beef);
    assert_eq!(x, [0xdead_beef; 3]);
}

#[test]
#[should_panic(expected = "vector_add_f32: lengths")]
fn reference_vector_add_panics_on_mismatched_lengths() {
    reference::vector_add_f32(&[1.0], &[1.0, 2.0], &mut [0.0]);
}

#[test]
#[should_panic(expected = "matmul_f32: a must hold m * k elements")]
fn reference_matmul_panics_when_a_disagrees_with_dims() {
    reference::matmul_f32(&[1.0; 5], &[1.0; 6], &mut [0.0; 4], 2, 2, 3);
}

// ---- validate ----

#[test]
fn validate_accepts_well_formed_launch_of_every_kernel() {
    let all = lens(&[(1, 4096), (2, 4096), (3, 4096)]);
    let ok = |name: &str, args: &[Arg], shape: &LaunchShape| {
        assert_eq!(spec(name).validate(args, shape, &all), Ok(()), "{name}");
    };
    let (a, b, c) = (Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3));
    ok("vector_add_f32", &[a, b, c, Arg::U32(1024)], &LINEAR);
    ok("saxpy_f32", &[a, b, Arg::F32(2.0), Arg::U32(1024)], &LINEAR);
    ok("scale_f32", &[a, Arg::F32(2.0), Arg::U32(1024)], &LINEAR);
    ok("reduce_sum_f32", &[a, b, Arg::U32(1024)], &LINEAR);
    let dims = [Arg::U32(32), Arg::U32(32), Arg::U32(32)];
    ok("matmul_f32", &[a, b, c, dims[0], dims[1], dims[2]], &TILES);
    ok("fill_u32", &[a, Arg::U32(7), Arg::U32(1024)], &LINEAR);
}

#[test]
fn validate_accepts_n_zero_with_empty_buffers() {
    let empty = lens(&[(1, 0), (2, 0), (3, 0)]);
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3), Arg::U32(0)];
    assert_eq!(
        spec("vector_add_f32").validate(&args, &LINEAR, &empty),
        Ok(())
    );
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3)];
    let args = [
        args[0],
        args[1],
        args[2],
        Arg::U32(0),
        Arg::U32(0),
        Arg::U32(0),
    ];
    assert_eq!(spec("matmul_f32").validate(&args, &TILES, &empty), Ok(()));
}

#[test]
fn validate_accepts_any_shape_and_shared_bytes_for_element_wise_kernels() {
    let all = lens(&[(1, 64)]);
    let shape = LaunchShape {
        grid: [3, 5, 7],
        block: [3, 5, 2],
        shared_bytes: 48 * 1024,
    };
    let args = [Arg::Buffer(1), Arg::F32(2.0), Arg::U32(16)];
    assert_eq!(spec("scale_f32").validate(&args, &shape, &all), Ok(()));
}

#[test]
fn validate_rejects_wrong_param_count() {
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::U32(4)];
    assert_eq!(
        spec("vector_add_f32").validate(&args, &LINEAR, &lens(&[])),
        Err(KernelError::ParamCount {
            expected: 4,
            got: 3
        })
    );
}

#[test]
fn validate_rejects_wrong_param_kind_at_first_mismatch() {
    // saxpy's a is f32; a u32 with the same bits is still the wrong kind.
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::U32(2), Arg::F32(4.0)];
    assert_eq!(
        spec("saxpy_f32").validate(&args, &LINEAR, &lens(&[])),
        Err(KernelError::ParamKind {
            index: 2,
            expected: ParamKind::F32
        })
    );
}

#[test]
fn validate_rejects_reduce_block_that_is_not_a_power_of_two() {
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::U32(4)];
    let all = lens(&[(1, 16), (2, 4)]);
    for block in [
        [96, 1, 1],
        [2048, 1, 1],
        [256, 2, 1],
        [256, 1, 2],
        [0, 1, 1],
    ] {
        let shape = LaunchShape { block, ..LINEAR };
        assert_eq!(
            spec("reduce_sum_f32").validate(&args, &shape, &all),
            Err(KernelError::BadLaunchShape(
                "reduce_sum_f32 needs block (2^j,1,1) with 2^j <= 1024"
            )),
            "{block:?}"
        );
    }
    for x in [1, 32, 1024] {
        let shape = LaunchShape {
            block: [x, 1, 1],
            ..LINEAR
        };
        assert_eq!(spec("reduce_sum_f32").validate(&args, &shape, &all), Ok(()));
    }
}

#[test]
fn validate_rejects_matmul_block_other_than_16_by_16() {
    let args = [Arg::Buffer(1), Arg::Buffer(1), Arg::Buffer(1)];
    let args = [
        args[0],
        args[1],
        args[2],
        Arg::U32(1),
        Arg::U32(1),
        Arg::U32(1),
    ];
    for block in [[256, 1, 1], [16, 16, 2], [32, 8, 1], [8, 8, 1]] {
        let shape = LaunchShape { block, ..TILES };
        assert_eq!(
            spec("matmul_f32").validate(&args, &shape, &lens(&[(1, 4)])),
            Err(KernelError::BadLaunchShape(
                "matmul_f32 needs block (16,16,1)"
            ))
        );
    }
}

#[test]
fn validate_rejects_unknown_buffer() {
    let args = [Arg::Buffer(1), Arg::Buffer(9), Arg::U32(4)];
    assert_eq!(
        spec("reduce_sum_f32").validate(&args, &LINEAR, &lens(&[(1, 16)])),
        Err(KernelError::UnknownBuffer { index: 1 })
    );
}

#[test]
fn validate_rejects_unknown_buffer_even_when_n_is_zero() {
    let args = [Arg::Buffer(9), Arg::U32(5), Arg::U32(0)];
    assert_eq!(
        spec("fill_u32").validate(&args, &LINEAR, &lens(&[])),
        Err(KernelError::UnknownBuffer { index: 0 })
    );
}

#[test]
fn validate_rejects_vector_add_output_one_byte_short() {
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3), Arg::U32(10)];
    assert_eq!(
        spec("vector_add_f32").validate(&args, &LINEAR, &lens(&[(1, 40), (2, 40), (3, 39)])),
        Err(KernelError::BufferTooSmall {
            index: 2,
            needed: 40,
            len: 39
        })
    );
}

#[test]
fn validate_rejects_reduce_without_room_for_out() {
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::U32(3)];
    assert_eq!(
        spec("reduce_sum_f32").validate(&args, &LINEAR, &lens(&[(1, 12), (2, 3)])),
        Err(KernelError::BufferTooSmall {
            index: 1,
            needed: 4,
            len: 3
        })
    );
}

#[test]
fn validate_checks_each_matmul_operand_against_its_own_dims() {
    // m = 2, n = 3, k = 5: a needs 40 bytes, b 60, c 24.
    let args = |a, b, c| {
        [
            Arg::Buffer(a),
            Arg::Buffer(b),
            Arg::Buffer(c),
            Arg::U32(2),
            Arg::U32(3),
            Arg::U32(5),
        ]
    };
    let table = lens(&[(40, 40), (60, 60), (24, 24), (39, 39), (59, 59), (23, 23)]);
    let check = |a, b, c| spec("matmul_f32").validate(&args(a, b, c), &TILES, &table);
    assert_eq!(check(40, 60, 24), Ok(()));
    let short = |index, needed, len| Err(KernelError::BufferTooSmall { index, needed, len });
    assert_eq!(check(39, 60, 24), short(0, 40, 39));
    assert_eq!(check(40, 59, 24), short(1, 60, 59));
    assert_eq!(check(40, 60, 23), short(2, 24, 23));
}

#[test]
fn validate_saturates_needed_bytes_when_dims_overflow_u64() {
    let args = [
        Arg::Buffer(1),
        Arg::Buffer(1),
        Arg::Buffer(1),
        Arg::U32(u32::MAX),
        Arg::U32(1),
        Arg::U32(u32::MAX),
    ];
    assert_eq!(
        spec("matmul_f32").validate(&args, &TILES, &lens(&[(1, u64::MAX - 1)])),
        Err(KernelError::BufferTooSmall {
            index: 0,
            needed: u64::MAX,
            len: u64::MAX - 1
        })
    );
}

#[test]
fn validate_checks_args_before_shape_and_shape_before_buffers() {
    let bad_shape = LaunchShape {
        block: [3, 1, 1],
        ..LINEAR
    };
    let bad_args = [Arg::Buffer(1), Arg::U32(2), Arg::U32(3)];
    assert!(matches!(
        spec("reduce_sum_f32").validate(&bad_args, &bad_shape, &lens(&[])),
        Err(KernelError::ParamKind { index: 1, .. })
    ));
    let unknown = [Arg::Buffer(8), Arg::Buffer(9), Arg::U32(3)];
    assert!(matches!(
        spec("reduce_sum_f32").validate(&unknown, &bad_shape, &lens(&[])),
        Err(KernelError::BadLaunchShape(_))
    ));
}

#[test]
fn kernel_error_messages_name_the_problem() {
    let cases = [
        (
            KernelError::UnknownKernel,
            "no such kernel in the built-in catalog",
        ),
        (
            KernelError::ParamCount {
                expected: 4,
                got: 3,
            },
            "kernel takes 4 parameters, got 3",
        ),
        (
            KernelError::ParamKind {
                index: 2,
                expected: ParamKind::Buffer,
            },
            "parameter 2 must be a buffer (8 bytes)",
        ),
        (
            KernelError::BadLaunchShape("matmul_f32 needs block (16,16,1)"),
            "bad launch shape: matmul_f32 needs block (16,16,1)",
        ),
        (
            KernelError::BufferTooSmall {
                index: 1,
                needed: 40,
                len: 39,
            },
            "buffer parameter 1 holds 39 bytes but the kernel touches 40",
        ),
        (
            KernelError::UnknownBuffer { index: 0 },
            "parameter 0 names an unknown buffer",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(error.to_string(), message);
    }
}

#[test]
fn find_returns_each_catalog_entry_and_none_for_unknown_names() {
    for spec in CATALOG {
        assert!(std::ptr::eq(find(spec.name).unwrap(), spec));
    }
    assert!(find("vector_add").is_none());
    assert!(find("").is_none());
}

#[test]
fn param_sizes_are_pointer_and_word_sized() {
    assert_eq!(ParamKind::Buffer.size(), 8);
    assert_eq!(ParamKind::U32.size(), 4);
    assert_eq!(ParamKind::F32.size(), 4);
}

#[test]
fn tolerance_is_zero_except_for_reduce() {
    for spec in CATALOG {
        let expected = if spec.name == "reduce_sum_f32" {
            1e-4
        } else {
            0.0
        };
        assert_eq!(spec.rel_tolerance(), expected, "{}", spec.name);
    }
}

// ---- run_cpu ----

#[test]
fn run_cpu_saxpy_with_x_aliasing_y_uses_values_before_the_launch() {
    let mut mem = TestMemory::default();
    mem.put_f32(1, &[1.0, 2.0, 3.0, 99.0]);
    let args = [Arg::Buffer(1), Arg::Buffer(1), Arg::F32(3.0), Arg::U32(3)];
    spec("saxpy_f32").run_cpu(&args, &LINEAR, &mut mem).unwrap();
    assert_eq!(mem.f32s(1), [4.0, 8.0, 12.0, 99.0]);
}

#[test]
fn run_cpu_vector_add_with_every_operand_aliased_doubles_in_place() {
    let mut mem = TestMemory::default();
    mem.put_f32(5, &[1.5, -2.0, 7.0]);
    let args = [Arg::Buffer(5), Arg::Buffer(5), Arg::Buffer(5), Arg::U32(2)];
    spec("vector_add_f32")
        .run_cpu(&args, &LINEAR, &mut mem)
        .unwrap();
    assert_eq!(mem.f32s(5), [3.0, -4.0, 7.0]);
}

#[test]
fn run_cpu_matmul_with_c_aliasing_a_uses_a_before_the_launch() {
    let mut mem = TestMemory::default();
    mem.put_f32(1, &[1.0, 2.0, 3.0, 4.0]);
    mem.put_f32(2, &[0.0, 1.0, 1.0, 0.0]);
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(1)];
    let args = [
        args[0],
        args[1],
        args[2],
        Arg::U32(2),
        Arg::U32(2),
        Arg::U32(2),
    ];
    spec("matmul_f32").run_cpu(&args, &TILES, &mut mem).unwrap();
    assert_eq!(mem.f32s(1), [2.0, 1.0, 4.0, 3.0]);
}

#[test]
fn run_cpu_reduce_adds_the_sum_to_out_and_leaves_the_rest() {
    let mut mem = TestMemory::default();
    mem.put_f32(1, &[1.0, 2.0, 3.0, 4.0]);
    mem.put_f32(2, &[10.0, -1.0]);
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::U32(3)];
    spec("reduce_sum_f32")
        .run_cpu(&args, &LINEAR, &mut mem)
        .unwrap();
    assert_eq!(mem.f32s(2), [16.0, -1.0]);
}

#[test]
fn run_cpu_touches_nothing_past_n_elements() {
    let mut mem = TestMemory::default();
    mem.put_u32(1, &[1, 2, 3, 4]);
    let args = [Arg::Buffer(1), Arg::U32(9), Arg::U32(2)];
    spec("fill_u32").run_cpu(&args, &LINEAR, &mut mem).unwrap();
    assert_eq!(mem.u32s(1), [9, 9, 3, 4]);
}

#[test]
fn run_cpu_with_n_zero_leaves_memory_untouched() {
    let mut mem = TestMemory::default();
    mem.put_f32(1, &[-0.0, 1.0]);
    mem.put_f32(2, &[-0.0]);
    let before = mem.buffers.clone();
    let (x, out) = (Arg::Buffer(1), Arg::Buffer(2));
    let zero = Arg::U32(0);
    let launches: [(&str, Vec<Arg>); 6] = [
        ("vector_add_f32", vec![x, x, out, zero]),
        ("saxpy_f32", vec![x, x, Arg::F32(2.0), zero]),
        ("scale_f32", vec![x, Arg::F32(0.0), zero]),
        ("reduce_sum_f32", vec![x, out, zero]),
        ("fill_u32", vec![x, Arg::U32(7), zero]),
        ("matmul_f32", vec![x, x, out, Arg::U32(5), zero, zero]),
    ];
    for (name, args) in launches {
        let shape = if name == "matmul_f32" { TILES } else { LINEAR };
        spec(name).run_cpu(&args, &shape, &mut mem).unwrap();
        assert_eq!(mem.buffers, before, "{name}");
    }
}

#[test]
fn run_cpu_refuses_an_invalid_launch_before_writing() {
    let mut mem = TestMemory::default();
    mem.put_f32(1, &[1.0; 4]);
    mem.put_f32(2, &[1.0; 4]);
    mem.put_f32(3, &[5.0; 3]);
    let before = mem.buffers.clone();
    let args = [Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3), Arg::U32(4)];
    assert_eq!(
        spec("vector_add_f32").run_cpu(&args, &LINEAR, &mut mem),
        Err(KernelError::BufferTooSmall {
            index: 2,
            needed: 16,
            len: 12
        })
    );
    assert_eq!(mem.buffers, before);
}

#[test]
fn run_cpu_reports_a_memory_that_refuses_a_read() {
    /// Claims a length it cannot serve, as a buggy executor memory might.
    struct Liar;
    impl CpuMemory for Liar {
        fn len(&self, _: u64) -> Option<u64> {
            Some(64)
        }
        fn read(&self, _: u64, _: u64, _: &mut [u8]) -> bool {
            false
        }
        fn write(&mut self, _: u64, _: u64, _: &[u8]) -> bool {
            false
        }
    }
    let args = [Arg::Buffer(1), Arg::F32(2.0), Arg::U32(4)];
    assert_eq!(
        spec("scale_f32").run_cpu(&args, &LINEAR, &mut Liar),
        Err(KernelError::BufferTooSmall {
            index: 0,
            needed: 16,
            len: 64
        })
    );
}

// ---- decode_args ----

#[test]
fn decode_args_reads_little_endian_values_of_each_kind() {
    let handle = 0x0102_0304_0506_0708u64.to_le_bytes();
    let a = 2.5f32.to_le_bytes();
    let n = 1000u32.to_le_bytes();
    let args = decode_args(
        spec("saxpy_f32"),
        &[&handle, &[9, 0, 0, 0, 0, 0, 0, 0], &a, &n],
    );
    assert_eq!(
        args,
        Ok(vec![
            Arg::Buffer(0x0102_0304_0506_0708),
            Arg::Buffer(9),
            Arg::F32(2.5),
            Arg::U32(1000)
        ])
    );
}

#[test]
fn decode_args_rejects_wrong_param_count() {
    let n = 4u32.to_le_bytes();
    assert_eq!(
        decode_args(spec("scale_f32"), &[&[0; 8], &n]),
        Err(KernelError::ParamCount {
            expected: 3,
            got: 2
        })
    );
}

#[test]
fn decode_args_rejects_a_param_of_the_wrong_size() {
    let scale = spec("scale_f32");
    let cases: [(&[&[u8]], usize, ParamKind); 4] = [
        (&[&[0; 4], &[0; 4], &[0; 4]], 0, ParamKind::Buffer),
        (&[&[0; 8], &[0; 8], &[0; 4]], 1, ParamKind::F32),
        (&[&[0; 8], &[0; 4], &[0; 2]], 2, ParamKind::U32),
        (&[&[0; 8], &[0; 4], &[]], 2, ParamKind::U32),
    ];
    for (params, index, expected) in cases {
        assert_eq!(
            decode_args(scale, params),
            Err(KernelError::ParamKind { index, expected })
        );
    }
}

// ---- randomized: run_cpu against the typed reference ----

fn random_f32s(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect()
}

#[test]
fn run_cpu_matches_typed_reference_on_random_inputs() {
    let mut rng = StdRng::seed_from_u64(0x5eed_6b65_726e);
    for round in 0..200 {
        let n: usize = rng.random_range(0..300);
        // Buffers longer than needed: the tail must survive untouched.
        let extra = rng.random_range(0..3);
        let x = random_f32s(&mut rng, n + extra);
        let y = random_f32s(&mut rng, n + extra);
        let s: f32 = rng.random_range(-3.0..3.0);
        let n_arg = Arg::U32(n as u32);
        let mut mem = TestMemory::default();
        let (bx, by, bz) = (Arg::Buffer(10), Arg::Buffer(20), Arg::Buffer(30));
        let reset = |mem: &mut TestMemory| {
            mem.put_f32(10, &x);
            mem.put_f32(20, &y);
            mem.put_f32(30, &vec![f32::NAN; n + extra]);
        };

        reset(&mut mem);
        spec("vector_add_f32")
            .run_cpu(&[bx, by, bz, n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want: Vec<f32> = vec![f32::NAN; n + extra];
        reference::vector_add_f32(&x[..n], &y[..n], &mut want[..n]);
        assert_eq!(bits(&mem.f32s(30)), bits(&want), "vector_add round {round}");

        reset(&mut mem);
        spec("saxpy_f32")
            .run_cpu(&[by, bx, Arg::F32(s), n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want = y.clone();
        reference::saxpy_f32(&mut want[..n], &x[..n], s);
        assert_eq!(bits(&mem.f32s(20)), bits(&want), "saxpy round {round}");

        reset(&mut mem);
        spec("scale_f32")
            .run_cpu(&[bx, Arg::F32(s), n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want = x.clone();
        reference::scale_f32(&mut want[..n], s);
        assert_eq!(bits(&mem.f32s(10)), bits(&want), "scale round {round}");

        reset(&mut mem);
        mem.put_f32(30, &[s]);
        spec("reduce_sum_f32")
            .run_cpu(&[bx, bz, n_arg], &LINEAR, &mut mem)
            .unwrap();
        let want = if n == 0 {
            s
        } else {
            (f64::from(s) + reference::sum_f64(&x[..n])) as f32
        };
        assert_eq!(
            mem.f32s(30)[0].to_bits(),
            want.to_bits(),
            "reduce round {round}"
        );

        let value = rng.random::<u32>();
        mem.put_u32(40, &vec![0xffff_ffff; n + extra]);
        let fill = [Arg::Buffer(40), Arg::U32(value), n_arg];
        spec("fill_u32").run_cpu(&fill, &LINEAR, &mut mem).unwrap();
        let mut want = vec![0xffff_ffff; n + extra];
        reference::fill_u32(&mut want[..n], value);
        assert_eq!(mem.u32s(40), want, "fill round {round}");

        let (m, cols, k) = (
            rng.random_range(0..20),
            rng.random_range(0..20),
            rng.random_range(0..40),
        );
        let a = random_f32s(&mut rng, m * k);
        let b = random_f32s(&mut rng, k * cols);
        mem.put_f32(50, &a);
        mem.put_f32(60, &b);
        mem.put_f32(70, &vec![f32::NAN; m * cols + extra]);
        let dims = [m, cols, k].map(|d| Arg::U32(d as u32));
        let args = [
            Arg::Buffer(50),
            Arg::Buffer(60),
            Arg::Buffer(70),
            dims[0],
            dims[1],
            dims[2],
        ];
        spec("matmul_f32").run_cpu(&args, &TILES, &mut mem).unwrap();
        let mut want = vec![f32::NAN; m * cols + extra];
        reference::matmul_f32(&a, &b, &mut want[..m * cols], m, cols, k);
        assert_eq!(bits(&mem.f32s(70)), bits(&want), "matmul round {round}");
    }
}

// ---- in place, in bounded chunks ----

/// A `TestMemory` that records the largest read or write asked of it.
#[derive(Default)]
struct Recording {
    inner: TestMemory,
    largest: std::cell::Cell<usize>,
    calls: std::cell::Cell<usize>,
}

impl Recording {
    fn record(&self, bytes: usize) {
        self.largest.set(self.largest.get().max(bytes));
        self.calls.set(self.calls.get() + 1);
    }
}

impl CpuMemory for Recording {
    fn len(&self, buffer: u64) -> Option<u64> {
        self.inner.len(buffer)
    }
    fn read(&self, buffer: u64, offset: u64, out: &mut [u8]) -> bool {
        self.record(out.len());
        self.inner.read(buffer, offset, out)
    }
    fn write(&mut self, buffer: u64, offset: u64, data: &[u8]) -> bool {
        self.record(data.len());
        self.inner.write(buffer, offset, data)
    }
}

/// Every launch below reads and writes at most one chunk per `CpuMemory` call, which
/// `run_cpu` only does if it works through the buffers chunk by chunk.
#[test]
fn run_cpu_reads_and_writes_at_most_a_chunk_per_memory_call() {
    let chunk = CPU_CHUNK_ELEMS;
    let n = 3 * chunk + 5;
    let mut rng = StdRng::seed_from_u64(0xc4_0c4);
    let mut mem = Recording::default();
    mem.inner.put_f32(1, &random_f32s(&mut rng, n));
    mem.inner.put_f32(2, &random_f32s(&mut rng, n));
    mem.inner.put_f32(3, &random_f32s(&mut rng, n));
    let (x, y, z) = (Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3));
    let count = Arg::U32(n as u32);
    let dims = |m: usize, cols: usize, k: usize| [m, cols, k].map(|d| Arg::U32(d as u32));
    let matmul = |[m, cols, k]: [Arg; 3]| vec![x, y, z, m, cols, k];
    let launches: Vec<(&str, Vec<Arg>)> = vec![
        ("vector_add_f32", vec![x, y, z, count]),
        ("saxpy_f32", vec![x, y, Arg::F32(0.5), count]),
        ("scale_f32", vec![x, Arg::F32(2.0), count]),
        ("reduce_sum_f32", vec![x, z, count]),
        ("fill_u32", vec![x, Arg::U32(7), count]),
        // Tall, long and wide matrices: C, A and B each span several chunks.
        ("matmul_f32", matmul(dims(n, 1, 1))),
        ("matmul_f32", matmul(dims(1, 1, n))),
        ("matmul_f32", matmul(dims(1, n, 1))),
        ("matmul_f32", matmul(dims(40, 300, 100))),
    ];
    for (name, args) in launches {
        mem.largest.set(0);
        mem.calls.set(0);
        let shape = if name == "matmul_f32" { TILES } else { LINEAR };
        spec(name).run_cpu(&args, &shape, &mut mem).unwrap();
        assert!(mem.calls.get() > 1, "{name} {args:?}: one call");
        assert!(
            mem.largest.get() <= chunk * 4,
            "{name} {args:?}: {} bytes in one call, more than a chunk",
            mem.largest.get()
        );
    }
}

/// Launches that span several chunks (and matmul tiles and k steps) give exactly the
/// typed reference's bits, and leave the bytes past the elements they touch alone.
#[test]
fn run_cpu_matches_typed_reference_across_chunk_boundaries() {
    let chunk = CPU_CHUNK_ELEMS;
    let mut rng = StdRng::seed_from_u64(0xb0_0da1);
    for n in [chunk - 1, chunk, chunk + 1, 2 * chunk + 77] {
        let extra = 3;
        let x = random_f32s(&mut rng, n + extra);
        let y = random_f32s(&mut rng, n + extra);
        let s = rng.random_range(-3.0f32..3.0);
        let n_arg = Arg::U32(n as u32);
        let mut mem = TestMemory::default();
        let (bx, by, bz) = (Arg::Buffer(1), Arg::Buffer(2), Arg::Buffer(3));
        let reset = |mem: &mut TestMemory| {
            mem.put_f32(1, &x);
            mem.put_f32(2, &y);
            mem.put_f32(3, &vec![f32::NAN; n + extra]);
        };

        reset(&mut mem);
        spec("vector_add_f32")
            .run_cpu(&[bx, by, bz, n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want = vec![f32::NAN; n + extra];
        reference::vector_add_f32(&x[..n], &y[..n], &mut want[..n]);
        assert_eq!(bits(&mem.f32s(3)), bits(&want), "vector_add n {n}");

        reset(&mut mem);
        spec("saxpy_f32")
            .run_cpu(&[by, bx, Arg::F32(s), n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want = y.clone();
        reference::saxpy_f32(&mut want[..n], &x[..n], s);
        assert_eq!(bits(&mem.f32s(2)), bits(&want), "saxpy n {n}");

        reset(&mut mem);
        spec("saxpy_f32")
            .run_cpu(&[bx, bx, Arg::F32(s), n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want = x.clone();
        let before = x[..n].to_vec();
        reference::saxpy_f32(&mut want[..n], &before, s);
        assert_eq!(bits(&mem.f32s(1)), bits(&want), "aliased saxpy n {n}");

        reset(&mut mem);
        spec("scale_f32")
            .run_cpu(&[bx, Arg::F32(s), n_arg], &LINEAR, &mut mem)
            .unwrap();
        let mut want = x.clone();
        reference::scale_f32(&mut want[..n], s);
        assert_eq!(bits(&mem.f32s(1)), bits(&want), "scale n {n}");

        reset(&mut mem);
        mem.put_f32(3, &[s, 9.0]);
        spec("reduce_sum_f32")
            .run_cpu(&[bx, bz, n_arg], &LINEAR, &mut mem)
            .unwrap();
        let want = (f64::from(s) + reference::sum_f64(&x[..n])) as f32;
        assert_eq!(bits(&mem.f32s(3)), bits(&[want, 9.0]), "reduce n {n}");

        // out aliasing x[0]: x as it was before the launch, x[0] included.
        reset(&mut mem);
        spec("reduce_sum_f32")
            .run_cpu(&[bx, bx, n_arg], &LINEAR, &mut mem)
            .unwrap();
        let want = (f64::from(x[0]) + reference::sum_f64(&x[..n])) as f32;
        assert_eq!(
            mem.f32s(1)[0].to_bits(),
            want.to_bits(),
            "aliased reduce n {n}"
        );
        assert_eq!(
            bits(&mem.f32s(1)[1..]),
            bits(&x[1..]),
            "aliased reduce n {n}"
        );

        let value = rng.random::<u32>();
        mem.put_u32(4, &vec![0xffff_ffff; n + extra]);
        let fill = [Arg::Buffer(4), Arg::U32(value), n_arg];
        spec("fill_u32").run_cpu(&fill, &LINEAR, &mut mem).unwrap();
        let mut want = vec![0xffff_ffff; n + extra];
        reference::fill_u32(&mut want[..n], value);
        assert_eq!(mem.u32s(4), want, "fill n {n}");
    }

    // (m, n, k): tall, wide and deep shapes that split C into several tiles or k into
    // several steps, ragged and 16-aligned k, and k = 0.
    let shapes = [
        (3, chunk + 7, 37),
        (chunk + 3, 1, 2),
        (2, 3, 2 * chunk + 1),
        (1, 2 * chunk + 1, 1),
        (70, 300, 50),
        (129, 130, 32),
        (5, chunk / 2 + 3, 19),
        (chunk + 1, 2, 0),
    ];
    for (m, cols, k) in shapes {
        let a = random_f32s(&mut rng, m * k);
        let b = random_f32s(&mut rng, k * cols);
        let mut mem = TestMemory::default();
        mem.put_f32(1, &a);
        mem.put_f32(2, &b);
        mem.put_f32(3, &vec![f32::NAN; m * cols + 2]);
        let dims = [m, cols, k].map(|d| Arg::U32(d as u32));
        let args = [
            Arg::Buffer(1),
            Arg::Buffer(2),
            Arg::Buffer(3),
            dims[0],
            dims[1],
            dims[2],
        ];
        spec("matmul_f32").run_cpu(&args, &TILES, &mut mem).unwrap();
        let mut want = vec![f32::NAN; m * cols + 2];
        reference::matmul_f32(&a, &b, &mut want[..m * cols], m, cols, k);
        assert_eq!(bits(&mem.f32s(3)), bits(&want), "matmul {m}x{cols}x{k}");
    }
}

/// C aliasing B over many tiles is a race on the GPU; on the CPU it must still finish,
/// deterministically, without touching anything outside the buffer.
#[test]
fn run_cpu_matmul_with_c_aliasing_b_over_many_tiles_stays_in_its_buffer() {
    let (m, cols, k) = (300, 300, 300);
    let mut rng = StdRng::seed_from_u64(7);
    let a = random_f32s(&mut rng, m * k);
    let b = random_f32s(&mut rng, k * cols + 1);
    let run = || {
        let mut mem = TestMemory::default();
        mem.put_f32(1, &a);
        mem.put_f32(2, &b);
        let dims = [m, cols, k].map(|d| Arg::U32(d as u32));
        let args = [
            Arg::Buffer(1),
            Arg::Buffer(2),
            Arg::Buffer(2),
            dims[0],
            dims[1],
            dims[2],
        ];
        spec("matmul_f32").run_cpu(&args, &TILES, &mut mem).unwrap();
        assert_eq!(bits(&mem.f32s(1)), bits(&a));
        mem.f32s(2)
    };
    let first = run();
    assert_eq!(first.len(), k * cols + 1);
    assert_eq!(first[k * cols].to_bits(), b[k * cols].to_bits());
    assert_eq!(bits(&first), bits(&run()));
}

// ---- the GPU's evaluation order, simulated on the CPU ----

/// The matmul kernel's arithmetic: 16x16 tiles, zeros outside the matrices, one
/// `fma` chain per element in tile order.
fn tiled_matmul_like_gpu(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![f32::NAN; m * n];
    let at = |r: usize, p: usize| if r < m && p < k { a[r * k + p] } else { 0.0 };
    let bt = |p: usize, col: usize| {
        if p < k && col < n {
            b[p * n + col]
        } else {
            0.0
        }
    };
    for row in 0..m {
        for col in 0..n {
            let mut acc = 0.0f32;
            for kt in 0..k.div_ceil(16) {
                for kk in 0..16 {
                    acc = at(row, kt * 16 + kk).mul_add(bt(kt * 16 + kk, col), acc);
                }
            }
            c[row * n + col] = acc;
        }
    }
    c
}

#[test]
fn matmul_reference_is_bit_identical_to_the_tiled_gpu_order() {
    let mut rng = StdRng::seed_from_u64(16);
    let specials = [0.0, -0.0, 1e-30, -1e-30, 1e-45, f32::INFINITY, f32::MAX];
    for _ in 0..300 {
        let (m, n, k) = (
            rng.random_range(0..9),
            rng.random_range(0..9),
            rng.random_range(0..50),
        );
        let mut pick = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| match rng.random_range(0..4) {
                    0 => specials[rng.random_range(0..specials.len())],
                    _ => rng.random_range(-2.0..2.0),
                })
                .collect()
        };
        let (a, b) = (pick(m * k), pick(k * n));
        let mut c = vec![f32::NAN; m * n];
        reference::matmul_f32(&a, &b, &mut c, m, n, k);
        let gpu = tiled_matmul_like_gpu(&a, &b, m, n, k);
        // NaN (inf * 0) may differ in payload on the GPU; every other value is bit-exact.
        for (got, want) in c.iter().zip(&gpu) {
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{m}x{n}x{k}: {got:e} vs {want:e}"
            );
        }
    }
}

/// The reduce kernel's arithmetic for a 1-D grid: f32 grid-stride sums per thread, a
/// halving tree per block, then block sums added to `out` one after another.
fn reduce_like_gpu(x: &[f32], out: f32, blocks: usize, threads: usize) -> f32 {
    let stride = blocks * threads;
    let mut total = out;
    for block in 0..blocks {
        if block * threads >= x.len() {
            continue;
        }
        let mut partial: Vec<f32> = (0..threads)
            .map(|t| x.iter().skip(block * threads + t).step_by(stride).sum())
            .collect();
        let mut half = threads / 2;
        while half > 0 {
            for t in 0..half {
                partial[t] += partial[t + half];
            }
            half /= 2;
        }
        total += partial[0];
    }
    total
}

#[test]
fn reduce_gpu_order_stays_within_rel_tolerance() {
    let tolerance = f64::from(spec("reduce_sum_f32").rel_tolerance());
    let mut rng = StdRng::seed_from_u64(1024);
    // (n, blocks, threads): one element per thread, a long per-thread chain, one block.
    let shapes = [
        (1 << 16, 256, 256),
        (1 << 16, 4, 32),
        (100_000, 1, 1024),
        (3, 8, 1),
    ];
    for (n, blocks, threads) in shapes {
        for signed in [false, true] {
            let low = if signed { -1.0 } else { 0.0 };
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(low..1.0)).collect();
            let out = rng.random_range(0.0..10.0);
            let gpu = reduce_like_gpu(&x, out, blocks, threads);
            let want = (f64::from(out) + reference::sum_f64(&x)) as f32;
            let scale = f64::from(out) + x.iter().map(|v| f64::from(v.abs())).sum::<f64>();
            let error = (f64::from(gpu) - f64::from(want)).abs();
            assert!(
                error <= tolerance * scale,
                "n {n}, {blocks}x{threads}, signed {signed}: error {error:e}, scale {scale:e}"
            );
        }
    }
}

// ---- the catalog against the CUDA source ----

/// The parameter list of `extern "C" __global__ void <name>(...)` in `CUDA_SOURCE`.
fn cuda_params(name: &str) -> Vec<String> {
    let head = format!("extern \"C\" __global__ void {name}(");
    let start = CUDA_SOURCE
        .find(&head)
        .unwrap_or_else(|| panic!("CUDA_SOURCE has no `{head}`"))
        + head.len();
    let end = start + CUDA_SOURCE[start..].find(')').unwrap();
    CUDA_SOURCE[start..end]
        .split(',')
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect()
}

#[test]
fn cuda_source_declares_every_catalog_kernel_with_its_signature() {
    for spec in CATALOG {
        let params = cuda_params(spec.name);
        assert_eq!(params.len(), spec.params.len(), "{}: {params:?}", spec.name);
        for (param, kind) in params.iter().zip(spec.params) {
            let matches = match kind {
                ParamKind::Buffer => param.contains('*'),
                ParamKind::U32 => param.starts_with("unsigned int ") && !param.contains('*'),
                ParamKind::F32 => param.starts_with("float ") && !param.contains('*'),
            };
            assert!(matches, "{}: `{param}` is not a {kind}", spec.name);
        }
    }
}

#[test]
fn cuda_source_has_one_kernel_per_catalog_entry_and_no_includes() {
    let kernels = CUDA_SOURCE.matches("__global__").count();
    assert_eq!(kernels, CATALOG.len());
    assert!(
        !CUDA_SOURCE.contains("#include"),
        "NVRTC has no standard headers"
    );
}

#[test]
fn catalog_names_are_unique_and_every_buffer_has_one_extent() {
    for (i, spec) in CATALOG.iter().enumerate() {
        assert!(CATALOG[..i].iter().all(|other| other.name != spec.name));
        for (index, kind) in spec.params.iter().enumerate() {
            let extents = spec.buffers.iter().filter(|e| e.param == index).count();
            let expected = usize::from(*kind == ParamKind::Buffer);
            assert_eq!(extents, expected, "{} param {index}", spec.name);
        }
        for extent in spec.buffers {
            for &dim in extent.dims {
                assert_eq!(spec.params[dim], ParamKind::U32, "{} dim {dim}", spec.name);
            }
        }
    }
}

// ---- grid caps and spin_us ----

fn shape(grid: [u32; 3], block: [u32; 3]) -> LaunchShape {
    LaunchShape {
        grid,
        block,
        shared_bytes: 0,
    }
}

#[test]
fn huge_grids_are_cut_to_the_blocks_the_elements_need() {
    let huge = [(1 << 31) - 1, 65535, 65535];
    let add = [
        Arg::Buffer(1),
        Arg::Buffer(2),
        Arg::Buffer(3),
        Arg::U32(1000),
    ];
    let s = spec("vector_add_f32").capped_shape(&add, &shape(huge, [256, 1, 1]));
    assert_eq!(s.grid, [4, 1, 1]);
    // A grid already smaller than needed is kept: the kernel strides over the rest.
    let small = shape([2, 1, 1], [32, 1, 1]);
    assert_eq!(spec("vector_add_f32").capped_shape(&add, &small), small);
    // Blocks spread over y when x is small.
    let s = spec("vector_add_f32").capped_shape(&add, &shape([2, 100, 100], [32, 1, 1]));
    assert_eq!(s.grid, [2, 16, 1]);
    // No elements: one block.
    let fill = [Arg::Buffer(1), Arg::U32(7), Arg::U32(0)];
    let s = spec("fill_u32").capped_shape(&fill, &shape(huge, [1024, 1, 1]));
    assert_eq!(s.grid, [1, 1, 1]);
    // matmul: 16-wide column tiles over x, row tiles over y * z.
    let mm = [
        Arg::Buffer(1),
        Arg::Buffer(2),
        Arg::Buffer(3),
        Arg::U32(40),
        Arg::U32(17),
        Arg::U32(9),
    ];
    let s = spec("matmul_f32").capped_shape(&mm, &shape(huge, [16, 16, 1]));
    assert_eq!(s.grid, [2, 3, 1]);
    let s = spec("matmul_f32").capped_shape(&mm, &shape([1, 2, 100], [16, 16, 1]));
    assert_eq!(s.grid, [1, 2, 2]);
}

#[test]
fn capped_grids_give_the_same_results() {
    let n = 3000u32;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let args = [Arg::Buffer(1), Arg::F32(3.0), Arg::U32(n)];
    let wide = shape([100_000, 3, 1], [64, 1, 1]);
    let capped = spec("scale_f32").capped_shape(&args, &wide);
    assert_eq!(capped.grid, [47, 1, 1]);
    let mut results = Vec::new();
    for s in [wide, capped] {
        let mut mem = TestMemory {
            buffers: HashMap::new(),
        };
        mem.put_f32(1, &x);
        spec("scale_f32").run_cpu(&args, &s, &mut mem).unwrap();
        results.push(bits(&mem.f32s(1)));
    }
    assert_eq!(results[0], results[1]);
}

#[test]
fn spin_us_lasts_its_duration_and_caps_its_grid() {
    let mut mem = TestMemory {
        buffers: HashMap::new(),
    };
    mem.put_u32(1, &[0]);
    let args = [Arg::Buffer(1), Arg::U32(20_000)];
    let started = std::time::Instant::now();
    spec("spin_us")
        .run_cpu(&args, &shape([1024, 1, 1], [32, 1, 1]), &mut mem)
        .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(20));
    assert_eq!(mem.u32s(1), [20_000]);
    let too_wide = shape([33, 32, 1], [32, 1, 1]);
    assert!(matches!(
        spec("spin_us").validate(&args, &too_wide, &|h| mem.len_of(h)),
        Err(KernelError::BadLaunchShape(_))
    ));
    // Its grid is its own: not cut by an element count.
    let s = shape([8, 4, 2], [32, 1, 1]);
    assert_eq!(spec("spin_us").capped_shape(&args, &s), s);
}
