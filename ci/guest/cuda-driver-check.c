/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A CUDA driver-API program: device query, context, memory (allocations, memsets,
 * copies to and from pageable and page-locked host memory, device-to-device, interior
 * pointers), a stream, events and a kernel from a module, checked against the CPU.
 * It uses only the CUDA driver API, so it builds unchanged against NVIDIA's cuda.h and
 * libcuda (natively) and against the vGPU guest libcuda.so.1.
 *
 * Usage: cuda-driver-check [MODULE [ELEMENTS]]
 *   MODULE   a PTX or cubin file with
 *            extern "C" __global__ void vector_add_f32(const float *a, const float *b,
 *                                                      float *c, unsigned int n)
 *            or "vgpu:builtin", the vGPU device's built-in catalog (the default).
 *   ELEMENTS the vector length (default 1048576).
 * Prints one line per step, then "Driver API check PASSED: ..." or "... FAILED: ...".
 */
#define _POSIX_C_SOURCE 200809L
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int steps;

static void fail(const char *what, CUresult r)
{
	const char *name = "?", *text = "?";

	cuGetErrorName(r, &name);
	cuGetErrorString(r, &text);
	printf("Driver API check FAILED: %s: %s (%d): %s\n", what, name, (int)r, text);
	exit(1);
}

#define CHECK(call)                                                                 \
	do {                                                                        \
		CUresult r_ = (call);                                               \
		if (r_ != CUDA_SUCCESS)                                             \
			fail(#call, r_);                                            \
		steps++;                                                            \
	} while (0)

static void mismatch(const char *what, size_t i, double got, double want)
{
	printf("Driver API check FAILED: %s: element %zu is %g, expected %g\n", what, i, got, want);
	exit(1);
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
	const char *module_path = argc > 1 ? argv[1] : "vgpu:builtin";
	size_t n = argc > 2 ? strtoull(argv[2], NULL, 0) : 1 << 20;
	size_t bytes = n * sizeof(float);
	int version = 0, count = 0, attr[6];
	char name[256];
	size_t total = 0, free_mem = 0, quota = 0;
	CUdevice dev, ctx_dev;
	CUcontext ctx, current;
	CUdeviceptr da, db, dc, dbig;
	CUstream stream;
	CUevent start, stop, marker;
	CUmodule module;
	CUfunction fn;
	float *ha, *hb, *hc, *pinned, ms = 0;
	unsigned int *words;
	unsigned short *halves;
	unsigned char *bytes8;
	unsigned int n32 = (unsigned int)n;
	void *params[4];
	int max_threads = 0;
	unsigned int block = 256, grid;
	double t0, t_kernel;
	size_t i;
	CUresult r;

	if (n == 0 || n > (1u << 30)) {
		printf("Driver API check FAILED: ELEMENTS must be 1 to 2^30\n");
		return 2;
	}
	CHECK(cuInit(0));
	CHECK(cuDriverGetVersion(&version));
	CHECK(cuDeviceGetCount(&count));
	if (count < 1)
		fail("cuDeviceGetCount: no device", CUDA_ERROR_NO_DEVICE);
	CHECK(cuDeviceGet(&dev, 0));
	CHECK(cuDeviceGetName(name, sizeof(name), dev));
	CHECK(cuDeviceTotalMem(&total, dev));
	CHECK(cuDeviceGetAttribute(&attr[0], CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
	CHECK(cuDeviceGetAttribute(&attr[1], CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
	CHECK(cuDeviceGetAttribute(&attr[2], CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
	CHECK(cuDeviceGetAttribute(&attr[3], CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, dev));
	CHECK(cuDeviceGetAttribute(&attr[4], CU_DEVICE_ATTRIBUTE_WARP_SIZE, dev));
	CHECK(cuDeviceGetAttribute(&attr[5], CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, dev));
	printf("device 0 of %d: %s, compute %d.%d, %d multiprocessors, %zu MiB, driver %d\n",
	       count, name, attr[0], attr[1], attr[2], total >> 20, version);
	if (attr[3] < 1 || attr[4] != 32 || attr[5] != 1) {
		printf("Driver API check FAILED: attributes: max threads %d, warp %d, unified %d\n",
		       attr[3], attr[4], attr[5]);
		return 1;
	}

	CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
	CHECK(cuCtxSetCurrent(ctx));
	CHECK(cuCtxGetCurrent(&current));
	CHECK(cuCtxGetDevice(&ctx_dev));
	if (current != ctx || ctx_dev != dev)
		fail("cuCtxGetCurrent/cuCtxGetDevice: not the context just made current",
		     CUDA_ERROR_INVALID_CONTEXT);
	CHECK(cuMemGetInfo(&free_mem, &quota));
	printf("memory: %zu MiB free of %zu MiB\n", free_mem >> 20, quota >> 20);

	/* Memory: three buffers, memsets of each width read back. */
	CHECK(cuMemAlloc(&da, bytes));
	CHECK(cuMemAlloc(&db, bytes));
	CHECK(cuMemAlloc(&dc, bytes));
	words = malloc(bytes);
	ha = malloc(bytes);
	hb = malloc(bytes);
	hc = malloc(bytes);
	if (!words || !ha || !hb || !hc) {
		printf("Driver API check FAILED: out of host memory\n");
		return 1;
	}
	CHECK(cuMemsetD32(dc, 0xdeadbeef, n));
	CHECK(cuMemcpyDtoH(words, dc, bytes));
	for (i = 0; i < n; i++)
		if (words[i] != 0xdeadbeef)
			mismatch("cuMemsetD32", i, words[i], 0xdeadbeef);
	halves = (unsigned short *)words;
	CHECK(cuMemsetD16(dc + 2, 0x1234, 2 * n - 1)); /* from the second half-word on */
	CHECK(cuMemcpyDtoH(words, dc, bytes));
	if (halves[0] != 0xbeef)
		mismatch("cuMemsetD16 (before the range)", 0, halves[0], 0xbeef);
	for (i = 1; i < 2 * n; i++)
		if (halves[i] != 0x1234)
			mismatch("cuMemsetD16", i, halves[i], 0x1234);
	bytes8 = (unsigned char *)words;
	CHECK(cuMemsetD8(dc + 3, 0x5a, 5)); /* an odd range inside the buffer */
	CHECK(cuMemcpyDtoH(words, dc, 16));
	for (i = 3; i < 8; i++)
		if (bytes8[i] != 0x5a)
			mismatch("cuMemsetD8", i, bytes8[i], 0x5a);
	if (bytes8[8] != 0x34)
		mismatch("cuMemsetD8 (after the range)", 8, bytes8[8], 0x34);
	printf("memset D32, D16 and D8 (interior pointers) read back correct\n");

	/* Copies: pageable host memory in, device to device, an interior pointer. */
	for (i = 0; i < n; i++) {
		ha[i] = (float)i * 0.5f;
		hb[i] = (float)(n - i) * 0.25f;
	}
	CHECK(cuMemcpyHtoD(da, ha, bytes));
	CHECK(cuMemcpyDtoD(dc, da, bytes));
	CHECK(cuMemcpyDtoH(hc, dc, bytes));
	for (i = 0; i < n; i++)
		if (hc[i] != ha[i])
			mismatch("cuMemcpyDtoD", i, hc[i], ha[i]);
	if (n >= 8) {
		float tail[4];

		CHECK(cuMemcpyDtoH(tail, da + (n - 4) * sizeof(float), sizeof(tail)));
		for (i = 0; i < 4; i++)
			if (tail[i] != ha[n - 4 + i])
				mismatch("cuMemcpyDtoH of an interior pointer", n - 4 + i, tail[i],
					 ha[n - 4 + i]);
	}
	printf("copies host->device->device->host, and from an interior pointer, correct\n");

	/* A stream, page-locked memory and timing events around a kernel. */
	CHECK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
	CHECK(cuEventCreate(&start, CU_EVENT_DEFAULT));
	CHECK(cuEventCreate(&stop, CU_EVENT_DEFAULT));
	CHECK(cuEventCreate(&marker, CU_EVENT_DISABLE_TIMING));
	CHECK(cuMemAllocHost((void **)&pinned, bytes));
	memcpy(pinned, hb, bytes);
	CHECK(cuMemcpyHtoDAsync(db, pinned, bytes, stream));
	CHECK(cuEventRecord(marker, stream));
	CHECK(cuStreamWaitEvent(stream, marker, 0));

	if (strcmp(module_path, "vgpu:builtin") == 0)
		CHECK(cuModuleLoadData(&module, module_path));
	else
		CHECK(cuModuleLoad(&module, module_path));
	CHECK(cuModuleGetFunction(&fn, module, "vector_add_f32"));
	CHECK(cuFuncGetAttribute(&max_threads, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn));
	if (max_threads < (int)block)
		block = (unsigned int)max_threads;
	grid = (unsigned int)((n + block - 1) / block);
	if (grid > 65535)
		grid = 65535;
	params[0] = &da;
	params[1] = &db;
	params[2] = &dc;
	params[3] = &n32;
	t0 = now_ms();
	CHECK(cuEventRecord(start, stream));
	CHECK(cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, 0, stream, params, NULL));
	CHECK(cuEventRecord(stop, stream));
	CHECK(cuMemcpyDtoHAsync(pinned, dc, bytes, stream));
	CHECK(cuStreamSynchronize(stream));
	t_kernel = now_ms() - t0;
	CHECK(cuEventSynchronize(stop));
	CHECK(cuEventQuery(stop));
	CHECK(cuEventElapsedTime(&ms, start, stop));
	for (i = 0; i < n; i++)
		if (pinned[i] != ha[i] + hb[i])
			mismatch("vector_add_f32", i, pinned[i], ha[i] + hb[i]);
	if (!(ms >= 0))
		fail("cuEventElapsedTime: negative", CUDA_ERROR_UNKNOWN);
	printf("vector_add_f32 of %zu elements (%u blocks of %u, module %s) correct: "
	       "%.3f ms between its events, %.3f ms launch to results\n",
	       n, grid, block, module_path, ms, t_kernel);
	CHECK(cuStreamQuery(stream));

	/* Errors: a bad function name, an allocation beyond the memory, a bad pointer. */
	r = cuModuleGetFunction(&fn, module, "no_such_kernel");
	if (r != CUDA_ERROR_NOT_FOUND)
		fail("cuModuleGetFunction of a missing kernel: expected CUDA_ERROR_NOT_FOUND", r);
	r = cuMemAlloc(&dbig, quota + ((size_t)1 << 30));
	if (r != CUDA_ERROR_OUT_OF_MEMORY)
		fail("cuMemAlloc beyond the memory: expected CUDA_ERROR_OUT_OF_MEMORY", r);
	r = cuMemcpyDtoH(hc, (CUdeviceptr)16, 4); /* no allocation there */
	if (r == CUDA_SUCCESS)
		fail("cuMemcpyDtoH from an address no allocation holds succeeded", r);
	steps += 3;
	printf("errors: missing kernel, allocation beyond the memory, copy from no allocation refused\n");

	CHECK(cuModuleUnload(module));
	CHECK(cuEventDestroy(start));
	CHECK(cuEventDestroy(stop));
	CHECK(cuEventDestroy(marker));
	CHECK(cuStreamDestroy(stream));
	CHECK(cuMemFreeHost(pinned));
	CHECK(cuMemFree(da));
	CHECK(cuMemFree(db));
	CHECK(cuMemFree(dc));
	CHECK(cuCtxSynchronize());
	CHECK(cuDevicePrimaryCtxRelease(dev));
	free(words);
	free(ha);
	free(hb);
	free(hc);
	printf("Driver API check PASSED: %d calls checked, %zu elements, %s\n", steps, n, name);
	return 0;
}
