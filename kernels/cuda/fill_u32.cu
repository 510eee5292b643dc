// SPDX-License-Identifier: Apache-2.0
// x[i] = value for i < n. Write-only and exact: it poisons outputs before a check and
// initialises 32-bit data in stream order with the launches around it, on every executor.
extern "C" __global__ void fill_u32(unsigned int* x, unsigned int value, unsigned int n)
{
    const vgpu_grid_range r = vgpu_grid_stride(n);
    for (unsigned long long i = r.first; i < n; i += r.stride) {
        x[i] = value;
    }
}
