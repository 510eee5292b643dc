// SPDX-License-Identifier: Apache-2.0
// x = alpha * x, in place. A single IEEE multiply: bit-exact against the CPU reference.
extern "C" __global__ void scale_f32(float* x, float alpha, unsigned int n)
{
    const vgpu_grid_range r = vgpu_grid_stride(n);
    for (unsigned long long i = r.first; i < n; i += r.stride) {
        x[i] = x[i] * alpha;
    }
}
