// SPDX-License-Identifier: Apache-2.0
// Row-major C[m x n] = A[m x k] * B[k x n]. Each 16x16 block computes one 16x16 output
// tile at a time, staging 16x16 tiles of A and B in shared memory so each global value is
// loaded once per tile instead of once per product. Output tiles are walked grid-stride
// (columns over gridDim.x, rows over gridDim.y * gridDim.z) with bounds that depend only
// on the block, so every thread reaches each __syncthreads. Ragged edges load zeros.
// Every element accumulates with __fmaf_rn in increasing k from +0.0f, exactly the CPU
// reference's order, so results are bit-exact. Requires blockDim == (16, 16, 1);
// c must not alias a or b.
extern "C" __global__ void matmul_f32(const float* a, const float* b, float* c,
                                      unsigned int m, unsigned int n, unsigned int k)
{
    __shared__ float a_tile[16][16];
    __shared__ float b_tile[16][16];

    const unsigned int tx = threadIdx.x;
    const unsigned int ty = threadIdx.y;
    const unsigned long long row_tiles = ((unsigned long long)m + 15) / 16;
    const unsigned long long col_tiles = ((unsigned long long)n + 15) / 16;
    const unsigned long long k_tiles = ((unsigned long long)k + 15) / 16;
    const unsigned long long row_tile_stride = (unsigned long long)gridDim.y * gridDim.z;

    for (unsigned long long rt = blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z;
         rt < row_tiles; rt += row_tile_stride) {
        for (unsigned long long ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
            const unsigned long long row = rt * 16 + ty;
            const unsigned long long col = ct * 16 + tx;
            float acc = 0.0f;
            for (unsigned long long kt = 0; kt < k_tiles; ++kt) {
                const unsigned long long a_col = kt * 16 + tx;
                const unsigned long long b_row = kt * 16 + ty;
                a_tile[ty][tx] = (row < m && a_col < k) ? a[row * k + a_col] : 0.0f;
                b_tile[ty][tx] = (b_row < k && col < n) ? b[b_row * n + col] : 0.0f;
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < 16; ++kk) {
                    acc = __fmaf_rn(a_tile[ty][kk], b_tile[kk][tx], acc);
                }
                __syncthreads();
            }
            if (row < m && col < n) {
                c[row * n + col] = acc;
            }
        }
    }
}
