// SPDX-License-Identifier: Apache-2.0
// A tiled matrix multiply with the CUDA runtime (shared-memory tiles, a 2D grid), checked
// against a CPU multiply. Built with `nvcc -cudart shared`.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define TILE 16
#define CHECK(call)                                                                  \
    do {                                                                             \
        cudaError_t e_ = (call);                                                     \
        if (e_ != cudaSuccess) {                                                     \
            std::printf("matmul_tiled FAILED: %s: %s (%s)\n", #call, cudaGetErrorString(e_), \
                        cudaGetErrorName(e_));                                       \
            return 1;                                                                \
        }                                                                            \
    } while (0)

__global__ void matmul(const float *a, const float *b, float *c, int m, int n, int k)
{
    __shared__ float ta[TILE][TILE];
    __shared__ float tb[TILE][TILE];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < (k + TILE - 1) / TILE; t++) {
        int ac = t * TILE + threadIdx.x, br = t * TILE + threadIdx.y;
        ta[threadIdx.y][threadIdx.x] = (row < m && ac < k) ? a[row * k + ac] : 0.0f;
        tb[threadIdx.y][threadIdx.x] = (br < k && col < n) ? b[br * n + col] : 0.0f;
        __syncthreads();
        for (int i = 0; i < TILE; i++)
            acc += ta[threadIdx.y][i] * tb[i][threadIdx.x];
        __syncthreads();
    }
    if (row < m && col < n)
        c[row * n + col] = acc;
}

int main(int argc, char **argv)
{
    int m = argc > 1 ? std::atoi(argv[1]) : 512;
    int n = m, k = m;
    if (m <= 0 || m > 8192) {
        std::printf("matmul_tiled FAILED: size must be 1 to 8192\n");
        return 2;
    }
    std::vector<float> a(size_t(m) * k), b(size_t(k) * n), c(size_t(m) * n), ref(size_t(m) * n);
    for (size_t i = 0; i < a.size(); i++)
        a[i] = float((i * 7) % 17) / 17.0f - 0.5f;
    for (size_t i = 0; i < b.size(); i++)
        b[i] = float((i * 5) % 13) / 13.0f - 0.5f;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int p = 0; p < k; p++)
                s += double(a[size_t(i) * k + p]) * b[size_t(p) * n + j];
            ref[size_t(i) * n + j] = float(s);
        }
    float *da, *db, *dc;
    CHECK(cudaMalloc(&da, a.size() * sizeof(float)));
    CHECK(cudaMalloc(&db, b.size() * sizeof(float)));
    CHECK(cudaMalloc(&dc, c.size() * sizeof(float)));
    CHECK(cudaMemcpy(da, a.data(), a.size() * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(db, b.data(), b.size() * sizeof(float), cudaMemcpyHostToDevice));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    dim3 block(TILE, TILE), grid((n + TILE - 1) / TILE, (m + TILE - 1) / TILE);
    CHECK(cudaEventRecord(start));
    matmul<<<grid, block>>>(da, db, dc, m, n, k);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(stop));
    CHECK(cudaMemcpy(c.data(), dc, c.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    double worst = 0;
    for (size_t i = 0; i < c.size(); i++)
        worst = std::fmax(worst, std::fabs(double(c[i]) - ref[i]));
    if (worst > 1e-3 * k) {
        std::printf("matmul_tiled FAILED: largest error %g against the CPU\n", worst);
        return 1;
    }
    CHECK(cudaFree(da));
    CHECK(cudaFree(db));
    CHECK(cudaFree(dc));
    std::printf("matmul_tiled PASSED: %dx%d by %dx%d, largest error %.2e, kernel %.3f ms (events)\n",
                m, k, k, n, worst, ms);
    return 0;
}
