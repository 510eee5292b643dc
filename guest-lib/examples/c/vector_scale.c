/* SPDX-License-Identifier: Apache-2.0 */
/*
 * vector_scale: scales a vector on the vGPU with the built-in scale_f32 and checks it.
 *
 *   cargo build --release -p vgpu-guest
 *   cc -O2 -Wall -I guest-lib/include guest-lib/examples/c/vector_scale.c \
 *      -L target/release -lvgpu -Wl,-rpath,"$PWD/target/release" -o vector_scale
 *   ./vector_scale [device index]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vgpu.h"

#define N 100000u

static int check(vgpu_status status, const char *what)
{
	if (status == VGPU_OK)
		return 0;
	fprintf(stderr, "vector_scale: %s: %s (%s)\n", what, vgpu_status_name(status),
		vgpu_last_error());
	return 1;
}

int main(int argc, char **argv)
{
	int index = argc > 1 ? atoi(argv[1]) : 0;
	const float alpha = 2.5f;
	vgpu_session *s = NULL;
	uint64_t x = 0;
	float *host, *back;
	char name[64];
	uint32_t gpu = 0;
	unsigned int i, errors = 0;
	int failed = 1;

	host = malloc(N * sizeof(float));
	back = malloc(N * sizeof(float));
	if (!host || !back) {
		fprintf(stderr, "vector_scale: out of memory\n");
		return 1;
	}
	for (i = 0; i < N; i++)
		host[i] = (float)(rand() % 20001 - 10000) / 8.0f;

	if (check(vgpu_open(index, &s), "open"))
		goto out;
	if (check(vgpu_alloc(s, N * sizeof(float), &x), "alloc") ||
	    check(vgpu_htod(s, x, 0, host, N * sizeof(float)), "copy to device"))
		goto out;
	{
		const uint32_t grid[3] = { (N + 255) / 256, 1, 1 };
		const uint32_t block[3] = { 256, 1, 1 };
		const vgpu_arg args[] = { vgpu_arg_buffer(x), vgpu_arg_f32(alpha), vgpu_arg_u32(N) };

		if (check(vgpu_launch_builtin(s, "scale_f32", grid, block, args, 3), "launch") ||
		    check(vgpu_sync(s), "sync"))
			goto out;
	}
	memset(back, 0xff, N * sizeof(float));	/* NaN: an element left unwritten fails */
	if (check(vgpu_dtoh(s, x, 0, back, N * sizeof(float)), "copy to host"))
		goto out;
	for (i = 0; i < N; i++) {
		float want = host[i] * alpha;

		if (memcmp(&back[i], &want, sizeof(float)) != 0)
			errors++;
	}
	if (errors) {
		printf("C example FAILED: %u of %u elements wrong\n", errors, N);
		goto out;
	}
	if (check(vgpu_free(s, x), "free"))
		goto out;
	if (check(vgpu_device_name(s, name, sizeof(name)), "device name") ||
	    check(vgpu_device_gpu(s, &gpu), "host GPU"))
		goto out;
	printf("C example PASSED on /dev/vgpu%d: %s, host GPU %u\n", index, name, (unsigned)gpu);
	failed = 0;
out:
	vgpu_close(s);
	free(host);
	free(back);
	return failed;
}
