/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A CUDA driver-API program for a guest with several vGPU devices: every device is
 * listed (name, PCI bus id, UUID), the PCI bus ids and UUIDs must differ between
 * devices and each PCI bus id must find its own device again, and then a context on one device runs vector_add_f32 from the built-in
 * catalog, checked against the CPU. Only the device it runs on is asked anything by the
 * host (its attributes, its context's work): the others are described from what the
 * guest driver shows, so the host can tell which device the work went to.
 *
 * Usage: cuda-devices-check COUNT DEVICE [ELEMENTS]
 *   COUNT    how many devices cuDeviceGetCount must report
 *   DEVICE   the ordinal to run on
 *   ELEMENTS the vector length (default 65536)
 * Prints one line per device, then "Devices check PASSED: ..." or "... FAILED: ...".
 */
#define _POSIX_C_SOURCE 200809L
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEVICES 16

static void fail(const char *what, CUresult r)
{
	const char *name = "?";

	cuGetErrorName(r, &name);
	printf("Devices check FAILED: %s: %s (%d)\n", what, name, (int)r);
	exit(1);
}

#define CHECK(call)                                                                 \
	do {                                                                        \
		CUresult r_ = (call);                                               \
		if (r_ != CUDA_SUCCESS)                                             \
			fail(#call, r_);                                            \
	} while (0)

int main(int argc, char **argv)
{
	int want, use, count = 0, i, j;
	size_t n = 65536, k, bytes;
	char names[MAX_DEVICES][128], bus[MAX_DEVICES][32];
	CUuuid uuid[MAX_DEVICES];
	CUdevice dev, ctx_dev;
	CUcontext ctx;
	CUmodule module;
	CUfunction fn;
	CUdeviceptr da, db, dc;
	float *ha, *hb, *hc;
	unsigned int n32, block = 256, grid;
	void *params[4];

	if (argc < 3) {
		printf("usage: cuda-devices-check COUNT DEVICE [ELEMENTS]\n");
		return 2;
	}
	want = atoi(argv[1]);
	use = atoi(argv[2]);
	if (argc > 3)
		n = strtoull(argv[3], NULL, 0);
	if (want < 1 || want > MAX_DEVICES || use < 0 || use >= want || n == 0 || n > (1u << 26)) {
		printf("Devices check FAILED: COUNT 1 to %d, DEVICE below it, ELEMENTS 1 to 2^26\n",
		       MAX_DEVICES);
		return 2;
	}

	CHECK(cuInit(0));
	CHECK(cuDeviceGetCount(&count));
	if (count != want) {
		printf("Devices check FAILED: cuDeviceGetCount says %d devices, expected %d\n", count,
		       want);
		return 1;
	}
	for (i = 0; i < count; i++) {
		CHECK(cuDeviceGet(&dev, i));
		if (dev != i)
			fail("cuDeviceGet: not the ordinal asked for", CUDA_ERROR_INVALID_DEVICE);
		CHECK(cuDeviceGetName(names[i], sizeof(names[i]), dev));
		CHECK(cuDeviceGetPCIBusId(bus[i], sizeof(bus[i]), dev));
		CHECK(cuDeviceGetUuid(&uuid[i], dev));
		CHECK(cuDeviceGetByPCIBusId(&ctx_dev, bus[i]));
		if (ctx_dev != i) {
			printf("Devices check FAILED: cuDeviceGetByPCIBusId(%s) is device %d, not %d\n",
			       bus[i], ctx_dev, i);
			return 1;
		}
		printf("device %d: %s, PCI %s, UUID %02x%02x%02x%02x...\n", i, names[i], bus[i],
		       (unsigned char)uuid[i].bytes[0], (unsigned char)uuid[i].bytes[1],
		       (unsigned char)uuid[i].bytes[2], (unsigned char)uuid[i].bytes[3]);
		for (j = 0; j < i; j++) {
			if (strcmp(bus[i], bus[j]) == 0) {
				printf("Devices check FAILED: devices %d and %d share PCI bus id %s\n",
				       j, i, bus[i]);
				return 1;
			}
			if (memcmp(uuid[i].bytes, uuid[j].bytes, sizeof(uuid[i].bytes)) == 0) {
				printf("Devices check FAILED: devices %d and %d share a UUID\n", j, i);
				return 1;
			}
		}
	}
	if (cuDeviceGet(&dev, count) != CUDA_ERROR_INVALID_DEVICE)
		fail("cuDeviceGet of the ordinal past the last: expected CUDA_ERROR_INVALID_DEVICE",
		     CUDA_ERROR_UNKNOWN);

	/* A context on DEVICE and a vector add there. */
	CHECK(cuDeviceGet(&dev, use));
	CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
	CHECK(cuCtxSetCurrent(ctx));
	CHECK(cuCtxGetDevice(&ctx_dev));
	if (ctx_dev != dev)
		fail("cuCtxGetDevice: not the device the context was made on",
		     CUDA_ERROR_INVALID_CONTEXT);
	bytes = n * sizeof(float);
	ha = malloc(bytes);
	hb = malloc(bytes);
	hc = malloc(bytes);
	if (!ha || !hb || !hc) {
		printf("Devices check FAILED: out of host memory\n");
		return 1;
	}
	for (k = 0; k < n; k++) {
		ha[k] = (float)k * 0.5f;
		hb[k] = (float)(n - k) * 0.25f;
	}
	CHECK(cuMemAlloc(&da, bytes));
	CHECK(cuMemAlloc(&db, bytes));
	CHECK(cuMemAlloc(&dc, bytes));
	CHECK(cuMemcpyHtoD(da, ha, bytes));
	CHECK(cuMemcpyHtoD(db, hb, bytes));
	CHECK(cuModuleLoadData(&module, "vgpu:builtin"));
	CHECK(cuModuleGetFunction(&fn, module, "vector_add_f32"));
	n32 = (unsigned int)n;
	grid = (unsigned int)((n + block - 1) / block);
	params[0] = &da;
	params[1] = &db;
	params[2] = &dc;
	params[3] = &n32;
	CHECK(cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, 0, NULL, params, NULL));
	CHECK(cuCtxSynchronize());
	CHECK(cuMemcpyDtoH(hc, dc, bytes));
	for (k = 0; k < n; k++) {
		if (hc[k] != ha[k] + hb[k]) {
			printf("Devices check FAILED: element %zu is %g, expected %g\n", k,
			       (double)hc[k], (double)(ha[k] + hb[k]));
			return 1;
		}
	}
	CHECK(cuModuleUnload(module));
	CHECK(cuMemFree(da));
	CHECK(cuMemFree(db));
	CHECK(cuMemFree(dc));
	CHECK(cuDevicePrimaryCtxRelease(dev));
	free(ha);
	free(hb);
	free(hc);
	printf("Devices check PASSED: %d devices, distinct PCI bus ids and UUIDs, found by them; "
	       "vector_add_f32 of %zu elements correct on device %d (%s, PCI %s)\n",
	       count, n, use, names[use], bus[use]);
	return 0;
}
