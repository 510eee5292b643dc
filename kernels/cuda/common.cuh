// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the whole catalog. CUDA_SOURCE places this file first, so the
// kernel files are parts of one translation unit rather than standalone sources.
// NVRTC provides no standard headers: built-in types and intrinsics only.

// Linear index of this block over the whole (up to 3-D) grid. It fits in 64 bits
// because gridDim.x < 2^31 and gridDim.y, gridDim.z <= 65535.
static __device__ __forceinline__ unsigned long long vgpu_block_index()
{
    return blockIdx.x
        + (unsigned long long)gridDim.x
              * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
}

// A grid-stride walk over [0, n) that visits every index exactly once whatever the
// launch shape (any grid, any block, 1-D to 3-D), so results never depend on it.
struct vgpu_grid_range {
    unsigned long long first;
    unsigned long long stride;
};

static __device__ __forceinline__ vgpu_grid_range vgpu_grid_stride(unsigned int n)
{
    const unsigned long long threads_per_block =
        (unsigned long long)blockDim.x * blockDim.y * blockDim.z;
    const unsigned long long thread =
        threadIdx.x
        + (unsigned long long)blockDim.x
              * (threadIdx.y + (unsigned long long)blockDim.y * threadIdx.z);
    const unsigned long long block = vgpu_block_index();
    const unsigned long long blocks =
        (unsigned long long)gridDim.x * gridDim.y * gridDim.z;
    // block * threads_per_block can pass 2^64 on a huge grid. A block at or past n owns
    // no index, and capping the block count at n keeps the stride >= n, so every
    // product below stays under 2^42 and i + stride under 2^43.
    vgpu_grid_range r;
    r.first = block < n ? block * threads_per_block + thread : n;
    r.stride = (blocks < n ? blocks : (unsigned long long)n) * threads_per_block;
    return r;
}
