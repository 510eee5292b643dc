// SPDX-License-Identifier: Apache-2.0
// c = a + b, element-wise. Each element is read and written by one thread, so c may
// alias a or b. A single IEEE add: bit-exact against the CPU reference.
extern "C" __global__ void vector_add_f32(const float* a, const float* b, float* c,
                                          unsigned int n)
{
    const vgpu_grid_range r = vgpu_grid_stride(n);
    for (unsigned long long i = r.first; i < n; i += r.stride) {
        c[i] = a[i] + b[i];
    }
}
