// SPDX-License-Identifier: Apache-2.0
//! Typed CPU references of the catalog kernels: the ground truth that `run_cpu` applies
//! to buffers and that test harnesses compare CUDA results against.
//!
//! Each function computes what the CUDA kernel of the same name computes, in the same
//! rounding where the kernel's order is fixed (everything except `reduce_sum_f32`), so
//! those results are bit-identical to the GPU's.
//!
//! # Panics
//! Every function panics when slice lengths disagree with each other or with the given
//! dimensions; `run_cpu` always passes consistent slices.

/// `c[i] = a[i] + b[i]`.
pub fn vector_add_f32(a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(
        a.len() == c.len() && b.len() == c.len(),
        "vector_add_f32: lengths a {}, b {}, c {} differ",
        a.len(),
        b.len(),
        c.len()
    );
    for ((c, a), b) in c.iter_mut().zip(a).zip(b) {
        *c = a + b;
    }
}

/// `y[i] = a * x[i] + y[i]` with a single rounding (fused multiply-add), like the
/// kernel's `__fmaf_rn`.
pub fn saxpy_f32(y: &mut [f32], x: &[f32], a: f32) {
    assert_eq!(x.len(), y.len(), "saxpy_f32: lengths of x and y differ");
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
    }
}

/// `x[i] = x[i] * alpha`.
pub fn scale_f32(x: &mut [f32], alpha: f32) {
    for x in x.iter_mut() {
        *x *= alpha;
    }
}

/// The sum of `x`, accumulated in f64 and rounded once to f32: a more accurate value than
/// any f32 summation order, which is what the GPU result is measured against.
pub fn reduce_sum_f32(x: &[f32]) -> f32 {
    sum_f64(x) as f32
}

/// f64 sum of f32 values. With 29 spare bits its own error is below 2^-21 of
/// `sum |x|` even for 2^32 elements.
pub(crate) fn sum_f64(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v)).sum()
}

/// Row-major `C[m x n] = A[m x k] * B[k x n]`.
///
/// Every element accumulates `fma(a, b, acc)` from `+0.0` in increasing k, then applies
/// the GPU's zero padding of k up to a multiple of 16 (`fma(0, 0, acc)`, which only turns
/// a `-0.0` into `+0.0`), so the result is bit-identical to the tiled kernel.
pub fn matmul_f32(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    let dims = |x: usize, y: usize| x.checked_mul(y).expect("matmul_f32: dimensions overflow");
    assert_eq!(
        a.len(),
        dims(m, k),
        "matmul_f32: a must hold m * k elements"
    );
    assert_eq!(
        b.len(),
        dims(k, n),
        "matmul_f32: b must hold k * n elements"
    );
    assert_eq!(
        c.len(),
        dims(m, n),
        "matmul_f32: c must hold m * n elements"
    );
    c.fill(0.0);
    if k == 0 || n == 0 {
        return;
    }
    let padding = k.div_ceil(16) * 16 - k;
    // i-p-j order walks B and C by rows (cache friendly) while keeping, for each element,
    // the increasing-k accumulation order of the kernel.
    for (a_row, c_row) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)) {
        for (&a_ip, b_row) in a_row.iter().zip(b.chunks_exact(n)) {
            for (acc, &b_pj) in c_row.iter_mut().zip(b_row) {
                *acc = a_ip.mul_add(b_pj, *acc);
            }
        }
        if padding > 0 {
            for acc in c_row.iter_mut() {
                *acc = 0.0f32.mul_add(0.0, *acc);
            }
        }
    }
}

/// `x[i] = value`.
pub fn fill_u32(x: &mut [u32], value: u32) {
    x.fill(value);
}
