// SPDX-License-Identifier: Apache-2.0
// A CUDA runtime program as nvcc users write it: cudaMalloc, cudaMemcpy, a <<<>>> launch,
// events for timing, checked against the CPU. Built with `nvcc -cudart shared`.
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                  \
    do {                                                                             \
        cudaError_t e_ = (call);                                                     \
        if (e_ != cudaSuccess) {                                                     \
            std::printf("vector_add FAILED: %s: %s (%s)\n", #call, cudaGetErrorString(e_), \
                        cudaGetErrorName(e_));                                       \
            return 1;                                                                \
        }                                                                            \
    } while (0)

__global__ void vector_add(const float *a, const float *b, float *c, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        c[i] = a[i] + b[i];
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? std::atoi(argv[1]) : 1 << 24;
    if (n <= 0) {
        std::printf("vector_add FAILED: bad element count\n");
        return 2;
    }
    size_t bytes = size_t(n) * sizeof(float);
    std::vector<float> a(n), b(n), c(n);
    for (int i = 0; i < n; i++) {
        a[i] = float(i % 1000) * 0.5f;
        b[i] = float(n - i) * 0.25f;
    }
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    float *da, *db, *dc;
    CHECK(cudaMalloc(&da, bytes));
    CHECK(cudaMalloc(&db, bytes));
    CHECK(cudaMalloc(&dc, bytes));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    CHECK(cudaMemcpy(da, a.data(), bytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(db, b.data(), bytes, cudaMemcpyHostToDevice));
    int block = 256, grid = (n + block - 1) / block;
    CHECK(cudaEventRecord(start));
    vector_add<<<grid, block>>>(da, db, dc, n);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(stop));
    CHECK(cudaMemcpy(c.data(), dc, bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    for (int i = 0; i < n; i++) {
        if (c[i] != a[i] + b[i]) {
            std::printf("vector_add FAILED: element %d is %g, expected %g\n", i, c[i], a[i] + b[i]);
            return 1;
        }
    }
    CHECK(cudaFree(da));
    CHECK(cudaFree(db));
    CHECK(cudaFree(dc));
    std::printf("vector_add PASSED: %d elements on %s, kernel %.3f ms (events)\n", n, prop.name, ms);
    return 0;
}
