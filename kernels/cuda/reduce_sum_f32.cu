// SPDX-License-Identifier: Apache-2.0
// out[0] += sum(x). Each thread sums its grid-stride elements, the block combines them
// in a shared-memory tree, and one atomicAdd per block publishes the block's sum: one
// atomic per block instead of per element. The summation order depends on the launch
// shape and on atomic ordering, so the result is only close to the CPU reference (see
// rel_tolerance). Requires blockDim == (2^j, 1, 1) with 2^j <= 1024; out must not alias x.
extern "C" __global__ void reduce_sum_f32(const float* x, float* out, unsigned int n)
{
    __shared__ float partial[1024];

    // Uniform across the block, so returning before __syncthreads is safe. A block that
    // owns no element adds nothing, which leaves out untouched when n == 0.
    const unsigned long long block = vgpu_block_index();
    if (block >= n || block * blockDim.x >= n) {
        return;
    }

    const vgpu_grid_range r = vgpu_grid_stride(n);
    float sum = 0.0f;
    for (unsigned long long i = r.first; i < n; i += r.stride) {
        sum += x[i];
    }

    const unsigned int tid = threadIdx.x;
    partial[tid] = sum;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (tid < half) {
            partial[tid] += partial[tid + half];
        }
        __syncthreads();
    }
    if (tid == 0) {
        atomicAdd(out, partial[0]);
    }
}
