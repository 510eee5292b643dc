/* SPDX-License-Identifier: Apache-2.0 */
/*
 * vgpu-e2e-check: the guest side of ci/e2e-qemu.sh, a small C program linked against
 * libvgpu (include/vgpu.h). Each mode prints one result line
 *   CHECK <name> PASS|FAIL <detail>
 * that the host script turns into its PASS / FAIL lines, and exits 0 on success.
 * <name> is $VGPU_CHECK when set, else the mode's own name.
 *
 *   vgpu-e2e-check roundtrip MIB       HTOD then DTOH of MIB MiB, checksums compared
 *   vgpu-e2e-check mixed N             N requests: alloc, htod, launches, sync, dtoh, free
 *   vgpu-e2e-check loop MAX_SECONDS    mixed batches until a line STOP arrives on stdin
 *                                      (or MAX_SECONDS pass); a line MARK <word> prints
 *                                      the request count so far
 *   vgpu-e2e-check hold MIB            allocates and fills MIB MiB, prints HOLDING and
 *                                      sleeps: the VM powers off with the session open
 *   vgpu-e2e-check bench MIB           HTOD and DTOH of MIB MiB from ordinary memory and
 *                                      from host memory (vgpu_host_alloc), and a vector
 *                                      add end to end from host memory, checked and timed
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <vgpu.h>

#define BLOCK 256u

static const char *check_name = "?";

/* The result line's name: $VGPU_CHECK, else the mode's default. */
static void name_check(const char *fallback)
{
	const char *env = getenv("VGPU_CHECK");

	check_name = env && *env ? env : fallback;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void result(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void result(int ok, const char *fmt, ...)
{
	va_list ap;

	printf("CHECK %s %s ", check_name, ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* Reports a failed call and exits. */
static void die_call(const char *what, int rc)
{
	result(0, "%s: %s (%d): %s", what, vgpu_status_name(rc), rc, vgpu_last_error());
	exit(1);
}

#define CALL(expr)                                                                   \
	do {                                                                         \
		int rc_ = (expr);                                                    \
		if (rc_ != 0)                                                        \
			die_call(#expr, rc_);                                        \
	} while (0)

static int launch(vgpu_session *s, const char *kernel, uint32_t n, const vgpu_arg *args, size_t nargs)
{
	uint32_t grid[3] = { (n + BLOCK - 1) / BLOCK, 1, 1 };
	uint32_t block[3] = { BLOCK, 1, 1 };

	return vgpu_launch_builtin(s, kernel, grid, block, args, nargs);
}

static vgpu_session *open_device(void)
{
	vgpu_session *s = NULL;

	CALL(vgpu_open(0, &s));
	return s;
}

/* ---- roundtrip: HTOD then DTOH of MIB MiB with checksums ---- */

static uint64_t checksum(const uint64_t *p, size_t words)
{
	uint64_t h = 0xcbf29ce484222325ull;
	size_t i;

	for (i = 0; i < words; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

static int mode_roundtrip(unsigned mib)
{
	size_t bytes = (size_t)mib << 20, words = bytes / 8, i;
	uint64_t *src = malloc(bytes), *dst = malloc(bytes);
	uint64_t handle, x = 0x9e3779b97f4a7c15ull, sum_src, sum_dst;
	vgpu_session *s;
	double t0, t1, t2;

	if (!src || !dst) {
		result(0, "out of memory for 2 x %u MiB", mib);
		return 1;
	}
	for (i = 0; i < words; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		src[i] = x;
	}
	memset(dst, 0, bytes);
	sum_src = checksum(src, words);
	s = open_device();
	CALL(vgpu_alloc(s, bytes, &handle));
	t0 = now();
	CALL(vgpu_htod(s, handle, 0, src, bytes));
	CALL(vgpu_sync(s));
	t1 = now();
	CALL(vgpu_dtoh(s, handle, 0, dst, bytes));
	t2 = now();
	sum_dst = checksum(dst, words);
	CALL(vgpu_free(s, handle));
	vgpu_close(s);
	result(sum_src == sum_dst && memcmp(src, dst, bytes) == 0,
	       "%u MiB: checksum sent %016" PRIx64 " received %016" PRIx64 " (htod %.2f s, dtoh %.2f s)",
	       mib, sum_src, sum_dst, t1 - t0, t2 - t1);
	free(src);
	free(dst);
	return sum_src != sum_dst;
}

/* ---- bench: copies from ordinary and host memory, vector add from host memory ---- */

/* Seconds of the fastest of 3 runs of one copy. */
static double best_copy(vgpu_session *s, uint64_t handle, void *p, size_t bytes, int up)
{
	double best = 1e9;
	int i;

	for (i = 0; i < 3; i++) {
		double t0 = now(), t;

		if (up) {
			CALL(vgpu_htod(s, handle, 0, p, bytes));
			CALL(vgpu_sync(s));
		} else {
			CALL(vgpu_dtoh(s, handle, 0, p, bytes));
		}
		t = now() - t0;
		if (t < best)
			best = t;
	}
	return best;
}

static int mode_bench(unsigned mib)
{
	size_t bytes = (size_t)mib << 20, n = bytes / 4, i;
	uint8_t *plain = malloc(bytes);
	void *host = NULL, *ha = NULL, *hb = NULL, *hc = NULL;
	uint64_t handle, da, db, dc, x = 0x2545f4914f6cdd1dull;
	double up_plain, down_plain, up_host, down_host, t0, vadd;
	float *a, *b, *c;
	size_t bad = 0;
	int ok;
	vgpu_session *s;

	if (!plain) {
		result(0, "out of memory for %u MiB", mib);
		return 1;
	}
	for (i = 0; i < bytes; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		plain[i] = (uint8_t)x;
	}
	s = open_device();
	CALL(vgpu_alloc(s, bytes, &handle));
	CALL(vgpu_host_alloc(s, bytes, &host));
	memcpy(host, plain, bytes);
	up_plain = best_copy(s, handle, plain, bytes, 1);
	down_plain = best_copy(s, handle, plain, bytes, 0);
	up_host = best_copy(s, handle, host, bytes, 1);
	memset(host, 0, bytes);
	down_host = best_copy(s, handle, host, bytes, 0);
	ok = memcmp(host, plain, bytes) == 0;
	CALL(vgpu_host_free(s, host));
	CALL(vgpu_free(s, handle));

	/* Vector add of MIB/4 Mi floats from host memory: upload, launch, download. */
	CALL(vgpu_host_alloc(s, bytes, &ha));
	CALL(vgpu_host_alloc(s, bytes, &hb));
	CALL(vgpu_host_alloc(s, bytes, &hc));
	a = ha;
	b = hb;
	c = hc;
	for (i = 0; i < n; i++) {
		a[i] = (float)(i % 1000) * 0.5f;
		b[i] = (float)(i % 777) * 0.25f;
		c[i] = -1.0f;
	}
	CALL(vgpu_alloc(s, bytes, &da));
	CALL(vgpu_alloc(s, bytes, &db));
	CALL(vgpu_alloc(s, bytes, &dc));
	t0 = now();
	CALL(vgpu_htod(s, da, 0, a, bytes));
	CALL(vgpu_htod(s, db, 0, b, bytes));
	{
		vgpu_arg add[4] = { vgpu_arg_buffer(da), vgpu_arg_buffer(db), vgpu_arg_buffer(dc),
				    vgpu_arg_u32((uint32_t)n) };
		CALL(launch(s, "vector_add_f32", (uint32_t)n, add, 4));
	}
	CALL(vgpu_dtoh(s, dc, 0, c, bytes));
	vadd = now() - t0;
	for (i = 0; i < n; i++)
		if (c[i] != a[i] + b[i])
			bad++;
	CALL(vgpu_free(s, da));
	CALL(vgpu_free(s, db));
	CALL(vgpu_free(s, dc));
	CALL(vgpu_host_free(s, ha));
	CALL(vgpu_host_free(s, hb));
	CALL(vgpu_host_free(s, hc));
	vgpu_close(s);
	free(plain);
	result(ok && bad == 0,
	       "%u MiB: ordinary memory htod %.2f GB/s dtoh %.2f GB/s; host memory htod %.2f GB/s "
	       "dtoh %.2f GB/s; vector add of %zu floats from host memory %.1f ms end to end, "
	       "%zu errors",
	       mib, bytes / up_plain / 1e9, bytes / down_plain / 1e9, bytes / up_host / 1e9,
	       bytes / down_host / 1e9, n, vadd * 1e3, bad);
	return !(ok && bad == 0);
}

/* ---- mixed: alloc, htod, vector_add, scale, fill, reduce, sync, dtoh, free ---- */

#define MIXED_N 4096u /* elements per buffer */

struct counts {
	unsigned long requests, errors;
	unsigned long alloc, free, htod, dtoh, launch, sync;
	char first_error[256];
};

static void note_error(struct counts *c, const char *what, int rc)
{
	if (c->errors++ == 0)
		snprintf(c->first_error, sizeof(c->first_error), "%s: %s (%d): %s", what,
			 vgpu_status_name(rc), rc, rc >= 0 && rc < 100 ? "" : vgpu_last_error());
}

/* One request, counted. */
#define REQ(c, field, expr)                                                         \
	do {                                                                        \
		int rc_ = (expr);                                                   \
		(c)->requests++;                                                    \
		(c)->field++;                                                       \
		if (rc_ != 0)                                                       \
			note_error((c), #field, rc_);                               \
	} while (0)

/*
 * One batch of exactly 8 + 8 * rounds requests: 4 allocs, rounds x (htod A, htod B,
 * vector_add, scale, fill, reduce_sum, sync or dtoh C, dtoh S), 4 frees. Every result
 * is checked; all values are small integers, so the float sums are exact.
 */
static void mixed_batch(vgpu_session *s, unsigned rounds, unsigned seed, struct counts *c)
{
	static float a[MIXED_N], b[MIXED_N], out[MIXED_N];
	const uint32_t n = MIXED_N;
	uint64_t da = 0, db = 0, dc = 0, ds = 0;
	unsigned r, i;

	REQ(c, alloc, vgpu_alloc(s, n * sizeof(float), &da));
	REQ(c, alloc, vgpu_alloc(s, n * sizeof(float), &db));
	REQ(c, alloc, vgpu_alloc(s, n * sizeof(float), &dc));
	REQ(c, alloc, vgpu_alloc(s, sizeof(float), &ds));
	for (r = 0; r < rounds; r++) {
		unsigned k = seed + r;
		float expect_sum = 0, sum = -1;
		uint32_t bad = 0;

		for (i = 0; i < n; i++) {
			a[i] = (float)((i + k) % 97);
			b[i] = (float)((3 * i + k) % 89);
			expect_sum += 2.0f * (a[i] + b[i]);
		}
		REQ(c, htod, vgpu_htod(s, da, 0, a, sizeof(a)));
		REQ(c, htod, vgpu_htod(s, db, 0, b, sizeof(b)));
		{
			vgpu_arg add[4] = { vgpu_arg_buffer(da), vgpu_arg_buffer(db), vgpu_arg_buffer(dc), vgpu_arg_u32(n) };
			vgpu_arg scale[3] = { vgpu_arg_buffer(dc), vgpu_arg_f32(2.0f), vgpu_arg_u32(n) };
			vgpu_arg fill[3] = { vgpu_arg_buffer(ds), vgpu_arg_u32(0), vgpu_arg_u32(1) };
			vgpu_arg reduce[3] = { vgpu_arg_buffer(dc), vgpu_arg_buffer(ds), vgpu_arg_u32(n) };

			REQ(c, launch, launch(s, "vector_add_f32", n, add, 4));
			REQ(c, launch, launch(s, "scale_f32", n, scale, 3));
			REQ(c, launch, launch(s, "fill_u32", 1, fill, 3));
			REQ(c, launch, launch(s, "reduce_sum_f32", n, reduce, 3));
		}
		if (r % 2 == 0) {
			REQ(c, sync, vgpu_sync(s));
		} else {
			memset(out, 0, sizeof(out));
			REQ(c, dtoh, vgpu_dtoh(s, dc, 0, out, sizeof(out)));
			for (i = 0; i < n; i++)
				if (out[i] != 2.0f * (a[i] + b[i]))
					bad++;
		}
		REQ(c, dtoh, vgpu_dtoh(s, ds, 0, &sum, sizeof(sum)));
		if (sum != expect_sum)
			bad++;
		if (bad) {
			if (c->errors++ == 0)
				snprintf(c->first_error, sizeof(c->first_error),
					 "round %u: wrong results (%u mismatches, sum %.0f, expected %.0f)",
					 r, bad, (double)sum, (double)expect_sum);
		}
	}
	REQ(c, free, vgpu_free(s, da));
	REQ(c, free, vgpu_free(s, db));
	REQ(c, free, vgpu_free(s, dc));
	REQ(c, free, vgpu_free(s, ds));
}

static void describe(const struct counts *c, char *buf, size_t len)
{
	snprintf(buf, len,
		 "%lu requests (alloc %lu, htod %lu, launch %lu, sync %lu, dtoh %lu, free %lu), %lu errors%s%s",
		 c->requests, c->alloc, c->htod, c->launch, c->sync, c->dtoh, c->free, c->errors,
		 c->errors ? "; first: " : "", c->errors ? c->first_error : "");
}

static int mode_mixed(unsigned n)
{
	struct counts c;
	char text[512];
	unsigned rounds = n > 8 ? (n - 8 + 7) / 8 : 1;
	vgpu_session *s;
	double t0;

	memset(&c, 0, sizeof(c));
	s = open_device();
	t0 = now();
	mixed_batch(s, rounds, 1, &c);
	vgpu_close(s);
	describe(&c, text, sizeof(text));
	result(c.errors == 0 && c.requests >= n, "%s in %.2f s", text, now() - t0);
	return c.errors != 0;
}

/* Reads one line from stdin if one is waiting; returns 1 when it is STOP. */
static int poll_stdin(const struct counts *c)
{
	struct pollfd p = { .fd = 0, .events = POLLIN };
	char line[128];
	ssize_t got;

	if (poll(&p, 1, 0) <= 0 || !(p.revents & POLLIN))
		return 0;
	got = read(0, line, sizeof(line) - 1);
	if (got <= 0)
		return 0;
	line[got] = 0;
	line[strcspn(line, "\r\n")] = 0;
	if (strcmp(line, "STOP") == 0)
		return 1;
	if (strncmp(line, "MARK ", 5) == 0) {
		printf("LOOP-MARK %s requests=%lu errors=%lu\n", line + 5, c->requests, c->errors);
		fflush(stdout);
	}
	return 0;
}

static int mode_loop(unsigned max_seconds)
{
	struct counts c;
	char text[512];
	vgpu_session *s;
	double t0 = now(), last = t0;
	unsigned seed = 0;
	int stopped = 0;

	memset(&c, 0, sizeof(c));
	s = open_device();
	printf("LOOP-START\n");
	fflush(stdout);
	while (now() - t0 < max_seconds) {
		if (poll_stdin(&c)) {
			stopped = 1;
			break;
		}
		mixed_batch(s, 4, seed, &c); /* 40 requests */
		seed += 4;
		if (now() - last >= 5) {
			last = now();
			printf("LOOP-PROGRESS requests=%lu errors=%lu\n", c.requests, c.errors);
			fflush(stdout);
		}
	}
	vgpu_close(s);
	describe(&c, text, sizeof(text));
	if (!stopped)
		result(0, "no STOP from the host within %u s; %s", max_seconds, text);
	else
		result(c.errors == 0, "%s in %.1f s", text, now() - t0);
	return !stopped || c.errors != 0;
}

static int mode_hold(unsigned mib)
{
	size_t bytes = (size_t)mib << 20;
	char *data = malloc(bytes);
	vgpu_session *s;
	uint64_t handle;

	if (!data) {
		result(0, "out of memory for %u MiB", mib);
		return 1;
	}
	memset(data, 0x5a, bytes);
	s = open_device();
	CALL(vgpu_alloc(s, bytes, &handle));
	CALL(vgpu_htod(s, handle, 0, data, bytes));
	CALL(vgpu_sync(s));
	printf("HOLDING %u MiB in buffer %" PRIu64 "\n", mib, handle);
	fflush(stdout);
	for (;;)
		pause();
}

static unsigned number(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);

	if (!*s || *end || v == 0 || v > 100000) {
		fprintf(stderr, "vgpu-e2e-check: bad number '%s'\n", s);
		exit(2);
	}
	return (unsigned)v;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "roundtrip") == 0) {
		name_check("htod-dtoh");
		return mode_roundtrip(number(argv[2]));
	}
	if (argc == 3 && strcmp(argv[1], "mixed") == 0) {
		name_check("mixed-requests");
		return mode_mixed(number(argv[2]));
	}
	if (argc == 3 && strcmp(argv[1], "loop") == 0) {
		name_check("requests-during-reboot");
		return mode_loop(number(argv[2]));
	}
	if (argc == 3 && strcmp(argv[1], "bench") == 0) {
		name_check("bench");
		return mode_bench(number(argv[2]));
	}
	if (argc == 3 && strcmp(argv[1], "hold") == 0) {
		name_check("hold");
		return mode_hold(number(argv[2]));
	}
	fprintf(stderr, "usage: vgpu-e2e-check roundtrip MIB | mixed N | loop MAX_SECONDS | hold MIB | bench MIB\n");
	return 2;
}
