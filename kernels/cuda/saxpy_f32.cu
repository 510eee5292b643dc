// SPDX-License-Identifier: Apache-2.0
// y = a * x + y, in place. The explicit __fmaf_rn pins one rounding whatever the
// compiler's --fmad setting, so the CPU reference (f32::mul_add) matches bit for bit.
// Each element is owned by one thread, so x may alias y.
extern "C" __global__ void saxpy_f32(float* y, const float* x, float a, unsigned int n)
{
    const vgpu_grid_range r = vgpu_grid_stride(n);
    for (unsigned long long i = r.first; i < n; i += r.stride) {
        y[i] = __fmaf_rn(a, x[i], y[i]);
    }
}
