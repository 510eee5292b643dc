// SPDX-License-Identifier: GPL-2.0
/*
 * driver_test: checks vgpu.ko's user interface (include/vgpu_ioctl.h) against a live
 * device: session handling, refused opcodes, chain limits, bad pointers, host buffers,
 * async submission and its deferred errors, polling submission, many threads, processes
 * killed mid-request, and (with --remove, as root, last) driver unbind while requests
 * run, then rebind. With --poll N every synchronous request of the test goes through
 * VGPU_IOC_SUBMIT_POLL with poll_us N.
 *
 *   cc -O2 -Wall -I guest-lib/include guest-lib/driver/tests/driver_test.c -lpthread \
 *      -o driver_test
 *   ./driver_test [--poll N] [--remove]
 *
 * Prints one line per check and exits non-zero if any failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <libgen.h>
#include <unistd.h>

#include "vgpu_ioctl.h"

static int failures;
#define CHECK(cond, ...) do { if (cond) { printf("ok   " __VA_ARGS__); printf("\n"); } \
	else { failures++; printf("FAIL " __VA_ARGS__); printf(" (errno %d %s)\n", errno, strerror(errno)); } } while (0)

static void put16(uint8_t *b, int o, uint16_t v) { memcpy(b + o, &v, 2); }
static void put32(uint8_t *b, int o, uint32_t v) { memcpy(b + o, &v, 4); }
static void put64(uint8_t *b, int o, uint64_t v) { memcpy(b + o, &v, 8); }
static uint32_t get32(const uint8_t *b, int o) { uint32_t v; memcpy(&v, b + o, 4); return v; }
static uint64_t get64(const uint8_t *b, int o) { uint64_t v; memcpy(&v, b + o, 8); return v; }

static void header(uint8_t *h, uint16_t op, uint64_t session)
{
	memset(h, 0, VGPU_REQUEST_HEADER_SIZE);
	put32(h, VGPU_HDR_MAGIC, VGPU_REQUEST_MAGIC);
	put16(h, VGPU_HDR_VERSION, VGPU_PROTOCOL_VERSION);
	put16(h, VGPU_HDR_OPCODE, op);
	put64(h, VGPU_HDR_SESSION, session);
}

/* VGPU_IOC_SUBMIT_POLL with poll_us and reserved as given; returns ioctl's result. */
static int submit_poll(int fd, uint8_t *h, struct vgpu_seg *in, unsigned nin, struct vgpu_seg *out,
		       unsigned nout, uint8_t *resp, uint32_t poll_us, uint32_t reserved)
{
	struct vgpu_submit_poll s = { { (uintptr_t)h, (uintptr_t)resp, (uintptr_t)in, (uintptr_t)out, nin, nout },
				      poll_us, reserved };
	return ioctl(fd, VGPU_IOC_SUBMIT_POLL, &s);
}

/* --poll N: every submit() below polls for N microseconds. */
static uint32_t poll_all;

/* Returns ioctl's result; *status gets the response status. */
static int submit(int fd, uint8_t *h, struct vgpu_seg *in, unsigned nin, struct vgpu_seg *out,
		  unsigned nout, uint8_t *resp)
{
	struct vgpu_submit s = { (uintptr_t)h, (uintptr_t)resp, (uintptr_t)in, (uintptr_t)out, nin, nout };
	if (poll_all)
		return submit_poll(fd, h, in, nin, out, nout, resp, poll_all, 0);
	return ioctl(fd, VGPU_IOC_SUBMIT, &s);
}

static int submit_async(int fd, uint8_t *h, struct vgpu_seg *in, unsigned nin, struct vgpu_seg *out,
			unsigned nout)
{
	struct vgpu_submit s = { (uintptr_t)h, 0, (uintptr_t)in, (uintptr_t)out, nin, nout };
	return ioctl(fd, VGPU_IOC_SUBMIT_ASYNC, &s);
}

/* An async MEMSET (width 1) of [off, off + len) of a buffer; returns ioctl's result. */
static int memset_async(int fd, uint64_t handle, uint64_t off, uint64_t len, uint8_t value)
{
	uint8_t h[80];
	header(h, VGPU_OP_MEMSET, 0);
	put64(h, 32, handle); put64(h, 40, off); put64(h, 48, len);
	put32(h, 56, value); put32(h, 60, 1);
	return submit_async(fd, h, NULL, 0, NULL, 0);
}

/* An async HTOD of len bytes at p; returns ioctl's result. */
static int htod_async(int fd, uint64_t handle, uint64_t off, const void *p, uint64_t len)
{
	uint8_t h[80];
	struct vgpu_seg seg = { (uintptr_t)p, len };
	header(h, VGPU_OP_HTOD, 0);
	put64(h, 32, handle); put64(h, 40, off); put64(h, 48, len);
	return submit_async(fd, h, &seg, 1, NULL, 0);
}

static int simple(int fd, uint16_t op, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t *value0)
{
	uint8_t h[80], r[32];
	header(h, op, 0);
	put64(h, 32, a0); put64(h, 40, a1); put64(h, 48, a2);
	if (submit(fd, h, NULL, 0, NULL, 0, r))
		return -1;
	if (value0)
		*value0 = get64(r, VGPU_RESP_VALUE0);
	return (int)get32(r, VGPU_RESP_STATUS);
}

static int copy(int fd, uint16_t op, uint64_t handle, uint64_t off, void *p, uint64_t len)
{
	uint8_t h[80], r[32];
	struct vgpu_seg seg = { (uintptr_t)p, len };
	header(h, op, 0);
	put64(h, 32, handle); put64(h, 40, off); put64(h, 48, len);
	if (op == VGPU_OP_HTOD ? submit(fd, h, &seg, 1, NULL, 0, r) : submit(fd, h, NULL, 0, &seg, 1, r))
		return -errno;
	return (int)get32(r, VGPU_RESP_STATUS);
}

static int open_dev(void) { return open("/dev/vgpu0", O_RDWR | O_CLOEXEC); }

static void *hammer(void *arg)
{
	int fd = (int)(intptr_t)arg, i, bad = 0;
	for (i = 0; i < 200; i++) {
		uint64_t h = 0;
		uint32_t v = i, back = 0;
		if (simple(fd, VGPU_OP_ALLOC, 4, 0, 0, &h) != 0 ||
		    copy(fd, VGPU_OP_HTOD, h, 0, &v, 4) != 0 ||
		    copy(fd, VGPU_OP_DTOH, h, 0, &back, 4) != 0 || back != v ||
		    simple(fd, VGPU_OP_FREE, h, 0, 0, NULL) != 0)
			bad++;
	}
	return (void *)(intptr_t)bad;
}

/* 300 SYNCs polling for 200 us, then 300 waiting for the interrupt; returns failures. */
static void *poll_sync_loop(void *arg)
{
	int fd = (int)(intptr_t)arg, i, bad = 0;
	uint8_t h[80], r[32];

	for (i = 0; i < 600; i++) {
		header(h, VGPU_OP_SYNC, 0);
		if (submit_poll(fd, h, NULL, 0, NULL, 0, r, i < 300 ? 200 : 0, 0) ||
		    get32(r, VGPU_RESP_STATUS) != VGPU_STATUS_OK)
			bad++;
	}
	return (void *)(intptr_t)bad;
}

/* Async MEMSETs of a 64 KiB buffer while others poll; returns how many failed to queue. */
static void *async_flood(void *arg)
{
	int fd = (int)(intptr_t)arg, i, bad = 0;
	uint64_t buf = 0;

	if (simple(fd, VGPU_OP_ALLOC, 65536, 0, 0, &buf) != 0)
		return (void *)(intptr_t)1;
	for (i = 0; i < 1500; i++)
		bad += memset_async(fd, buf, 0, 65536, (uint8_t)i) != 0;
	bad += simple(fd, VGPU_OP_SYNC, 0, 0, 0, NULL) != 0;
	bad += simple(fd, VGPU_OP_FREE, buf, 0, 0, NULL) != 0;
	return (void *)(intptr_t)bad;
}

static int read_int(const char *path)
{
	char buf[64] = "";
	FILE *f = fopen(path, "r");
	if (!f) return -1;
	if (!fgets(buf, sizeof(buf), f)) buf[0] = 0;
	fclose(f);
	return atoi(buf);
}

static int hold_fd, hold_errno, async_errno;
static long hold_done, async_done;

/* SYNCs until one fails (the unbind: ENODEV); polling for arg microseconds if not 0. */
static void *sync_loop(void *arg)
{
	uint32_t poll_us = (uint32_t)(uintptr_t)arg;
	uint8_t h[80], r[32];

	for (;;) {
		header(h, VGPU_OP_SYNC, 0);
		if ((poll_us ? submit_poll(hold_fd, h, NULL, 0, NULL, 0, r, poll_us, 0)
			     : submit(hold_fd, h, NULL, 0, NULL, 0, r)) ||
		    get32(r, VGPU_RESP_STATUS) != VGPU_STATUS_OK)
			break;
		__atomic_fetch_add(&hold_done, 1, __ATOMIC_RELAXED);
	}
	hold_errno = errno;
	return NULL;
}

static int write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	int ok = f && fputs(text, f) >= 0;
	if (f && fclose(f))
		ok = 0;
	return ok ? 0 : -1;
}

/* Async MEMSETs until one fails (the unbind: ENODEV); never waits for an answer. */
static void *async_loop(void *arg)
{
	uint64_t buf = (uint64_t)(uintptr_t)arg;

	while (memset_async(hold_fd, buf, 0, 4096, 1) == 0)
		async_done++;
	async_errno = errno;
	return NULL;
}

/* Unbinds the driver while threads run requests (and async ones) on an open file, then rebinds. */
static void remove_test(void)
{
	uint8_t h[80], r[32];
	char link[256] = "", name[64];
	pthread_t t[4], ta;
	uint64_t sess, buf = 0;
	char *hb;
	int i, fd;
	ssize_t n = readlink("/sys/class/vgpu/vgpu0/device", link, sizeof(link) - 1);

	CHECK(n > 0, "find the virtio device of vgpu0");
	if (n <= 0)
		return;
	link[n] = 0;
	snprintf(name, sizeof(name), "%s", basename(link));
	hold_fd = open_dev();
	/* A host buffer mapped across the removal: the host dropped it, unmapping must not wait. */
	hb = mmap(NULL, 8 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, hold_fd, 0);
	CHECK(hb != MAP_FAILED, "mmap a host buffer before the unbind");
	CHECK(simple(hold_fd, VGPU_OP_ALLOC, 4096, 0, 0, &buf) == 0, "ALLOC for the async thread");
	/* The fourth polls: the unbind may come in the middle of a poll. */
	for (i = 0; i < 4; i++)
		pthread_create(&t[i], NULL, sync_loop, (void *)(uintptr_t)(i == 3 ? 1000 : 0));
	pthread_create(&ta, NULL, async_loop, (void *)(uintptr_t)buf);
	usleep(300000);
	CHECK(write_file("/sys/bus/virtio/drivers/vgpu/unbind", name) == 0, "unbind %s with requests running", name);
	for (i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	pthread_join(ta, NULL);
	CHECK(hold_errno == ENODEV, "requests end with ENODEV after %ld", hold_done);
	CHECK(async_errno == ENODEV, "async requests end with ENODEV after %ld", async_done);
	errno = 0;
	CHECK(simple(hold_fd, VGPU_OP_SYNC, 0, 0, 0, NULL) == -1 && errno == ENODEV, "a new request on the old file is ENODEV");
	CHECK(ioctl(hold_fd, VGPU_IOC_INFO, &(struct vgpu_info){0}) == -1 && errno == ENODEV, "INFO on the old file is ENODEV");
	CHECK(ioctl(hold_fd, VGPU_IOC_SESSION, &sess) == 0, "the old file still answers VGPU_IOC_SESSION");
	CHECK(access("/dev/vgpu0", F_OK) != 0, "/dev/vgpu0 is gone");
	if (hb != MAP_FAILED) {
		hb[4096] = 3;
		CHECK(hb[4096] == 3, "the host buffer still works after the unbind");
		CHECK(munmap(hb, 8 << 20) == 0, "unmap the host buffer after the unbind");
	}
	hb = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, hold_fd, 0);
	CHECK(hb != MAP_FAILED, "mmap on the old file still gives a host buffer");
	if (hb != MAP_FAILED)
		munmap(hb, 1 << 20);
	close(hold_fd);
	CHECK(write_file("/sys/bus/virtio/drivers/vgpu/bind", name) == 0, "rebind %s", name);
	usleep(300000);
	fd = open_dev();
	CHECK(fd >= 0 && simple(fd, VGPU_OP_SYNC, 0, 0, 0, NULL) == 0, "the rebound device answers");
	header(h, VGPU_OP_SYNC, 0);
	CHECK(fd >= 0 && submit_poll(fd, h, NULL, 0, NULL, 0, r, 100, 0) == 0 && get32(r, 0) == VGPU_STATUS_OK,
	      "the rebound device answers a polling SYNC");
	if (fd >= 0)
		close(fd);
}

int main(int argc, char **argv)
{
	uint8_t h[80], r[32], info_buf[VGPU_INFO_SIZE];
	struct vgpu_info info;
	uint64_t session = 0, handle = 0;
	int fd = open_dev(), i, sessions_before, remove = 0;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--remove"))
			remove = 1;
		else if (!strcmp(argv[i], "--poll") && i + 1 < argc)
			poll_all = (uint32_t)strtoul(argv[++i], NULL, 0);
		else {
			fprintf(stderr, "usage: %s [--poll N] [--remove]\n", argv[0]);
			return 2;
		}
	}
	if (poll_all)
		printf("info every synchronous request polls for %u us (VGPU_IOC_SUBMIT_POLL)\n", poll_all);
	CHECK(fd >= 0, "open /dev/vgpu0");
	if (fd < 0) return 1;
	CHECK(ioctl(fd, VGPU_IOC_SESSION, &session) == 0 && session != 0, "VGPU_IOC_SESSION: %llu", (unsigned long long)session);
	CHECK(ioctl(fd, VGPU_IOC_INFO, &info) == 0 && get32(info.config, 0) == VGPU_CONFIG_MAGIC &&
	      info.queue_size >= 8, "VGPU_IOC_INFO: magic, queue size %u, name '%s'", info.queue_size, (char *)info.config + VGPU_CFG_NAME);
	CHECK(ioctl(fd, _IO('V', 99)) == -1 && errno == ENOTTY, "unknown ioctl is ENOTTY");

	header(h, VGPU_OP_SESSION_OPEN, 0);
	CHECK(submit(fd, h, NULL, 0, NULL, 0, r) == -1 && errno == EINVAL, "SESSION_OPEN from user space is EINVAL");
	header(h, VGPU_OP_SESSION_CLOSE, session);
	CHECK(submit(fd, h, NULL, 0, NULL, 0, r) == -1 && errno == EINVAL, "SESSION_CLOSE from user space is EINVAL");
	/* HOST_REGISTER (15) and HOST_UNREGISTER (16) are the driver's: they name guest memory. */
	{
		uint8_t chunk[16];
		struct vgpu_seg seg = { (uintptr_t)chunk, sizeof(chunk) };
		put64(chunk, 0, 0); put64(chunk, 8, 4096);
		header(h, 15, 0);
		put64(h, 32, 1); put64(h, 40, 4096); put64(h, 48, 1);
		CHECK(submit(fd, h, &seg, 1, NULL, 0, r) == -1 && errno == EINVAL, "HOST_REGISTER from user space is EINVAL");
		header(h, 16, 0);
		put64(h, 32, 1);
		CHECK(submit(fd, h, NULL, 0, NULL, 0, r) == -1 && errno == EINVAL, "HOST_UNREGISTER from user space is EINVAL");
	}

	/* The driver writes the session: a forged one is ignored. */
	header(h, VGPU_OP_SYNC, 0xdeadbeef);
	CHECK(submit(fd, h, NULL, 0, NULL, 0, r) == 0 && get32(r, 0) == VGPU_STATUS_OK, "SYNC with a forged session uses the file's session");

	{
		struct vgpu_seg out = { (uintptr_t)info_buf, sizeof(info_buf) };
		header(h, VGPU_OP_INFO, 0);
		CHECK(submit(fd, h, NULL, 0, &out, 1, r) == 0 && get32(r, 0) == 0 && get32(r, VGPU_RESP_WRITTEN) == 192 &&
		      get32(info_buf, 0) == VGPU_CONFIG_MAGIC, "INFO writes 192 bytes; sessions %u", get32(info_buf, 136));
	}

	{
		static struct vgpu_seg segs[1023];
		static char byte;
		unsigned q = info.queue_size;
		for (i = 0; i < 1023; i++) { segs[i].addr = (uintptr_t)&byte; segs[i].len = 1; }
		header(h, VGPU_OP_SYNC, 0);
		CHECK(submit(fd, h, segs, q - 1, NULL, 0, r) == -1 && errno == E2BIG, "%u segments is E2BIG", q - 1);
		CHECK(submit(fd, h, segs, q - 2, NULL, 0, r) == 0 && get32(r, 0) == VGPU_STATUS_INVALID_REQUEST,
		      "%u segments reach the device (which refuses a payload on SYNC): status %u", q - 2, get32(r, 0));
	}
	CHECK(submit(fd, NULL, NULL, 0, NULL, 0, r) == -1 && errno == EFAULT, "NULL header is EFAULT");
	{
		struct vgpu_seg bad = { 0x10, 4096 };
		header(h, VGPU_OP_SYNC, 0);
		CHECK(submit(fd, h, &bad, 1, NULL, 0, r) == -1 && errno == EFAULT, "unmapped segment is EFAULT");
		bad.addr = ~0ull - 10; bad.len = 100;
		CHECK(submit(fd, h, &bad, 1, NULL, 0, r) == -1 && errno == EINVAL, "wrapping segment is EINVAL");
	}

	/* Pageable memory touched backwards: likely one descriptor per page. */
	{
		size_t len = 8 << 20;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		long k;
		for (k = len / 4096 - 1; k >= 0; k--) p[k * 4096] = 1;
		CHECK(simple(fd, VGPU_OP_ALLOC, len, 0, 0, &handle) == 0, "ALLOC 8 MiB");
		int rc = copy(fd, VGPU_OP_HTOD, handle, 0, p, len);
		printf("info 8 MiB pageable HTOD in one request: %s\n", rc == -E2BIG ? "E2BIG (split it)" : rc == 0 ? "accepted (pages merged)" : "other");
		CHECK(rc == -E2BIG || rc == 0, "8 MiB pageable copy is E2BIG or accepted");
		if (info.queue_size >= 260)
			CHECK(copy(fd, VGPU_OP_HTOD, handle, 0, p, 1 << 20) == 0, "1 MiB pageable copy is accepted");
		munmap(p, len);
	}

	/* Host buffers: contiguous, zeroed, pinnable. */
	{
		size_t len = 64 << 20;
		uint32_t *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		uint32_t *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		size_t n = len / 4, bad = 0, nz = 0;
		uint64_t big = 0;
		CHECK(a != MAP_FAILED && b != MAP_FAILED, "mmap two 64 MiB host buffers");
		for (i = 0; i < (int)n; i++) { nz += a[i] != 0; a[i] = i * 2654435761u; }
		CHECK(nz == 0, "host buffer is zeroed");
		CHECK(simple(fd, VGPU_OP_ALLOC, len, 0, 0, &big) == 0, "ALLOC 64 MiB");
		CHECK(copy(fd, VGPU_OP_HTOD, big, 0, a, len) == 0, "64 MiB HTOD from a host buffer in one request");
		CHECK(copy(fd, VGPU_OP_DTOH, big, 0, b, len) == 0, "64 MiB DTOH into a host buffer in one request");
		for (i = 0; i < (int)n; i++) bad += b[i] != (uint32_t)(i * 2654435761u);
		CHECK(bad == 0, "64 MiB round trip through host buffers: %zu wrong words", bad);
		CHECK(simple(fd, VGPU_OP_FREE, big, 0, 0, NULL) == 0, "FREE 64 MiB");
		CHECK(madvise(b, len, MADV_DONTNEED) == 0, "MADV_DONTNEED on a host buffer");
		for (i = 0, bad = 0; i < (int)n; i++) bad += b[i] != (uint32_t)(i * 2654435761u);
		CHECK(bad == 0, "refaulted host buffer keeps its pages: %zu wrong words", bad);
		/* Split mappings: the buffer goes (and is unregistered) with its last piece. */
		CHECK(munmap((char *)a + (4 << 20), 4 << 20) == 0 && a[0] == 0 &&
		      a[(8 << 20) / 4] == (uint32_t)((8 << 20) / 4 * 2654435761u), "partial munmap of a host buffer");
		munmap(a, len); munmap(b, len);
		CHECK(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0) == MAP_FAILED && errno == EINVAL, "private mmap is EINVAL");
		CHECK(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4096) == MAP_FAILED && errno == EINVAL, "mmap at an offset is EINVAL");
		/* A host buffer outlives its file. */
		int fd2 = open_dev();
		char *keep = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd2, 0);
		close(fd2);
		keep[12345] = 7;
		CHECK(keep[12345] == 7, "host buffer still usable after its file closed");
		munmap(keep, 1 << 20);
	}

	/* Async submission: queued from a copy, failures reported by the next VGPU_IOC_SUBMIT. */
	{
		static uint8_t data[VGPU_ASYNC_MAX_BYTES + 1], back[4096];
		struct vgpu_seg seg = { (uintptr_t)data, 16 };
		uint64_t buf = 0, extra = 0;
		uint32_t flags;
		int ok, rc;

		header(h, VGPU_OP_SYNC, 0);
		CHECK(submit_async(fd, h, NULL, 0, NULL, 0) == -1 && errno == EINVAL, "async SYNC is EINVAL");
		header(h, VGPU_OP_ALLOC, 0);
		put64(h, 32, 4096);
		CHECK(submit_async(fd, h, NULL, 0, NULL, 0) == -1 && errno == EINVAL, "async ALLOC is EINVAL");
		header(h, VGPU_OP_HTOD, 0);
		CHECK(submit_async(fd, h, NULL, 0, &seg, 1) == -1 && errno == EINVAL, "async with a writable segment is EINVAL");
		CHECK(simple(fd, VGPU_OP_ALLOC, 1 << 20, 0, 0, &buf) == 0, "ALLOC 1 MiB for async requests");
		CHECK(htod_async(fd, buf, 0, data, sizeof(data)) == -1 && errno == E2BIG, "async HTOD of 64 KiB + 1 is E2BIG");
		CHECK(htod_async(fd, buf, 0, data, VGPU_ASYNC_MAX_BYTES) == 0, "async HTOD of 64 KiB is queued");

		/* 2000 HTODs from one buffer rewritten at once: each carries its own bytes. */
		for (i = 0, ok = 0; i < 2000; i++) {
			memset(data, i & 0xff, 4096);
			ok += htod_async(fd, buf, (uint64_t)(i % 256) * 4096, data, 4096) == 0;
		}
		CHECK(ok == 2000, "2000 async HTODs queued (%d), more than the 256 a file may have in flight", ok);
		CHECK(simple(fd, VGPU_OP_SYNC, 0, 0, 0, NULL) == VGPU_STATUS_OK, "SYNC after them is OK");
		for (i = 0, ok = 1; i < 256; i++) {
			int last = 2000 - 256 + ((i - (2000 - 256) % 256 + 256) % 256);
			if (copy(fd, VGPU_OP_DTOH, buf, (uint64_t)i * 4096, back, 4096) != 0 ||
			    back[0] != (uint8_t)last || back[4095] != (uint8_t)last)
				ok = 0;
		}
		CHECK(ok, "each page holds the last async HTOD's bytes, in order");

		/* A failure is kept and reported once, by the next synchronous request. */
		CHECK(memset_async(fd, 0xbad0bad0, 0, 16, 1) == 0, "async MEMSET of a made-up handle is queued");
		CHECK(htod_async(fd, buf, 1 << 20, data, 16) == 0, "async HTOD past the end is queued");
		CHECK(memset_async(fd, buf, 0, 16, 2) == 0, "a good async MEMSET after them is queued");
		header(h, VGPU_OP_ALLOC, 0);
		put64(h, 32, 4096);
		rc = submit(fd, h, NULL, 0, NULL, 0, r);
		flags = get32(r, VGPU_RESP_FLAGS);
		extra = get64(r, VGPU_RESP_VALUE0);
		CHECK(rc == 0 && get32(r, 0) == VGPU_STATUS_INVALID_HANDLE && (flags & VGPU_RESP_F_ASYNC_ERROR) &&
		      VGPU_RESP_ASYNC_OPCODE(flags) == VGPU_OP_MEMSET && VGPU_RESP_OWN_STATUS(flags) == VGPU_STATUS_OK,
		      "the next ALLOC reports the first failure: status %u flags %#x", get32(r, 0), flags);
		CHECK(extra != 0 && simple(fd, VGPU_OP_FREE, extra, 0, 0, NULL) == 0, "that ALLOC ran: its buffer frees");
		header(h, VGPU_OP_SYNC, 0);
		CHECK(submit(fd, h, NULL, 0, NULL, 0, r) == 0 && get32(r, 0) == VGPU_STATUS_OK &&
		      get32(r, VGPU_RESP_FLAGS) == 0, "reported once: the following SYNC is OK");
		CHECK(copy(fd, VGPU_OP_DTOH, buf, 0, back, 16) == 0 && back[0] == 2 && back[15] == 2,
		      "the good MEMSET after the failures ran");
		CHECK(simple(fd, VGPU_OP_FREE, buf, 0, 0, NULL) == 0, "FREE the async buffer");

		/* A file closed, and a process killed, with async requests in flight. */
		{
			int fd2 = open_dev();
			uint64_t b2 = 0;
			simple(fd2, VGPU_OP_ALLOC, 1 << 20, 0, 0, &b2);
			for (i = 0, ok = 0; i < 600; i++)
				ok += memset_async(fd2, b2, 0, 1 << 20, (uint8_t)i) == 0;
			CHECK(close(fd2) == 0 && ok == 600, "close with async requests in flight");
		}
		for (i = 0; i < 10; i++) {
			pid_t pid = fork();
			if (pid == 0) {
				int cfd = open_dev();
				uint64_t b2 = 0;
				simple(cfd, VGPU_OP_ALLOC, 1 << 20, 0, 0, &b2);
				for (;;)
					memset_async(cfd, b2, 0, 1 << 20, 3);
			}
			usleep(20000 + i * 9000);
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);
		}
		CHECK(simple(fd, VGPU_OP_SYNC, 0, 0, 0, NULL) == VGPU_STATUS_OK, "device answers after async killers");
	}

	/* Polling submission: the same answers as VGPU_IOC_SUBMIT, and async failures too. */
	{
		struct vgpu_seg out = { (uintptr_t)info_buf, sizeof(info_buf) };
		uint64_t buf = 0, extra = 0;
		uint32_t flags;
		int rc, bad;

		header(h, VGPU_OP_SYNC, 0);
		CHECK(submit_poll(fd, h, NULL, 0, NULL, 0, r, 50, 0) == 0 && get32(r, 0) == VGPU_STATUS_OK &&
		      get32(r, VGPU_RESP_FLAGS) == 0, "VGPU_IOC_SUBMIT_POLL: SYNC polling 50 us is OK");
		CHECK(submit_poll(fd, h, NULL, 0, NULL, 0, r, 0, 0) == 0 && get32(r, 0) == VGPU_STATUS_OK,
		      "VGPU_IOC_SUBMIT_POLL with poll_us 0 is OK");
		CHECK(submit_poll(fd, h, NULL, 0, NULL, 0, r, 0xffffffffu, 0) == 0 && get32(r, 0) == VGPU_STATUS_OK,
		      "poll_us beyond VGPU_POLL_MAX_US is taken as the most");
		CHECK(submit_poll(fd, h, NULL, 0, NULL, 0, r, 50, 1) == -1 && errno == EINVAL,
		      "VGPU_IOC_SUBMIT_POLL with reserved set is EINVAL");
		CHECK(submit_poll(fd, NULL, NULL, 0, NULL, 0, r, 50, 0) == -1 && errno == EFAULT,
		      "VGPU_IOC_SUBMIT_POLL with a NULL header is EFAULT");
		CHECK(ioctl(fd, VGPU_IOC_SUBMIT_POLL, NULL) == -1 && errno == EFAULT,
		      "VGPU_IOC_SUBMIT_POLL with a NULL argument is EFAULT");
		header(h, VGPU_OP_SESSION_CLOSE, 0);
		CHECK(submit_poll(fd, h, NULL, 0, NULL, 0, r, 50, 0) == -1 && errno == EINVAL,
		      "SESSION_CLOSE through VGPU_IOC_SUBMIT_POLL is EINVAL");
		header(h, VGPU_OP_INFO, 0);
		memset(info_buf, 0, sizeof(info_buf));
		CHECK(submit_poll(fd, h, NULL, 0, &out, 1, r, 100, 0) == 0 && get32(r, 0) == 0 &&
		      get32(r, VGPU_RESP_WRITTEN) == 192 && get32(info_buf, 0) == VGPU_CONFIG_MAGIC,
		      "INFO through VGPU_IOC_SUBMIT_POLL writes 192 bytes");

		CHECK(simple(fd, VGPU_OP_ALLOC, 1 << 20, 0, 0, &buf) == 0, "ALLOC 1 MiB for the polling checks");
		for (i = 0, bad = 0; i < 300; i++)
			bad += memset_async(fd, buf, 0, 1 << 20, (uint8_t)i) != 0;
		CHECK(memset_async(fd, 0xbad0bad0, 0, 16, 1) == 0 && bad == 0,
		      "300 async MEMSETs and a failing one queued");
		header(h, VGPU_OP_ALLOC, 0);
		put64(h, 32, 4096);
		rc = submit_poll(fd, h, NULL, 0, NULL, 0, r, 1000, 0);
		flags = get32(r, VGPU_RESP_FLAGS);
		extra = get64(r, VGPU_RESP_VALUE0);
		CHECK(rc == 0 && get32(r, 0) == VGPU_STATUS_INVALID_HANDLE && (flags & VGPU_RESP_F_ASYNC_ERROR) &&
		      VGPU_RESP_ASYNC_OPCODE(flags) == VGPU_OP_MEMSET && VGPU_RESP_OWN_STATUS(flags) == VGPU_STATUS_OK,
		      "a polling ALLOC reports the async failure: status %u flags %#x", get32(r, 0), flags);
		CHECK(extra != 0 && simple(fd, VGPU_OP_FREE, extra, 0, 0, NULL) == 0, "that ALLOC ran: its buffer frees");
		{
			static uint8_t back[1 << 20];
			size_t k, wrong = 0;
			CHECK(copy(fd, VGPU_OP_DTOH, buf, 0, back, sizeof(back)) == 0, "DTOH after the polled ALLOC");
			for (k = 0; k < sizeof(back); k++)
				wrong += back[k] != (uint8_t)299;
			CHECK(wrong == 0, "the last of the 300 MEMSETs is what the buffer holds: %zu wrong bytes", wrong);
		}
		CHECK(simple(fd, VGPU_OP_FREE, buf, 0, 0, NULL) == 0, "FREE the polling buffer");

		/*
		 * Pollers beside sleepers and async floods, on one session and on others: each
		 * request answered once, none lost (a lost one hangs the test).
		 */
		{
			pthread_t t[8];
			int fds[3];
			void *rv;
			for (i = 0; i < 3; i++) fds[i] = open_dev();
			pthread_create(&t[0], NULL, poll_sync_loop, (void *)(intptr_t)fd);
			pthread_create(&t[1], NULL, poll_sync_loop, (void *)(intptr_t)fd);
			pthread_create(&t[2], NULL, poll_sync_loop, (void *)(intptr_t)fds[0]);
			pthread_create(&t[3], NULL, async_flood, (void *)(intptr_t)fd);
			pthread_create(&t[4], NULL, async_flood, (void *)(intptr_t)fds[1]);
			pthread_create(&t[5], NULL, hammer, (void *)(intptr_t)fd);
			pthread_create(&t[6], NULL, hammer, (void *)(intptr_t)fds[2]);
			pthread_create(&t[7], NULL, poll_sync_loop, (void *)(intptr_t)fds[2]);
			for (i = 0, bad = 0; i < 8; i++) { pthread_join(t[i], &rv); bad += (int)(intptr_t)rv; }
			for (i = 0; i < 3; i++) close(fds[i]);
			CHECK(bad == 0, "4 polling threads beside 2 async floods and 2 sleeping threads: %d failures", bad);
		}
		/* Processes killed while they poll. */
		for (i = 0; i < 10; i++) {
			pid_t pid = fork();
			if (pid == 0) {
				int cfd = open_dev();
				for (;;)
					poll_sync_loop((void *)(intptr_t)cfd);
			}
			usleep(20000 + i * 7000);
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);
		}
		header(h, VGPU_OP_SYNC, 0);
		CHECK(submit_poll(fd, h, NULL, 0, NULL, 0, r, 100, 0) == 0 && get32(r, 0) == VGPU_STATUS_OK,
		      "device answers after processes killed while polling");
	}

	/* Many threads on one session, and on sessions of their own. */
	{
		pthread_t t[8];
		int fds[4], bad = 0;
		for (i = 0; i < 4; i++) fds[i] = open_dev();
		for (i = 0; i < 8; i++) pthread_create(&t[i], NULL, hammer, (void *)(intptr_t)(i < 4 ? fd : fds[i - 4]));
		for (i = 0; i < 8; i++) { void *rv; pthread_join(t[i], &rv); bad += (int)(intptr_t)rv; }
		for (i = 0; i < 4; i++) close(fds[i]);
		CHECK(bad == 0, "8 threads x 200 alloc/copy/copy/free: %d failures", bad);
	}

	/* Processes killed in the middle of requests, and of opening and closing. */
	sessions_before = read_int("/sys/class/vgpu/vgpu0/sessions_open");
	for (i = 0; i < 40; i++) {
		pid_t pid = fork();
		if (pid == 0 && i % 2) {
			for (;;)
				close(open_dev());
		}
		if (pid == 0) {
			int cfd = open_dev();
			size_t len = 1 << 20;
			char *p = malloc(len);
			uint64_t hh;
			memset(p, 1, len);
			simple(cfd, VGPU_OP_ALLOC, len, 0, 0, &hh);
			for (;;) copy(cfd, VGPU_OP_DTOH, hh, 0, p, len);
		}
		usleep(20000 + (i % 10) * 13000);
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
	}
	/* Processes killed while they map and unmap host buffers (register, unregister). */
	for (i = 0; i < 20; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			int cfd = open_dev();
			for (;;) {
				size_t len = (size_t)(1 + i % 4) << 20;
				char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
				if (p != MAP_FAILED) {
					p[len - 1] = 1;
					munmap(p, len);
				}
			}
		}
		usleep(10000 + (i % 10) * 7000);
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
	}
	usleep(300000);
	CHECK(read_int("/sys/class/vgpu/vgpu0/sessions_open") == sessions_before, "killed processes' sessions closed (%d open)", sessions_before);
	{
		struct vgpu_seg out = { (uintptr_t)info_buf, sizeof(info_buf) };
		header(h, VGPU_OP_INFO, 0);
		CHECK(submit(fd, h, NULL, 0, &out, 1, r) == 0 && get32(info_buf, 136) == 1,
		      "the host holds this test's session only: %u", get32(info_buf, 136));
	}
	CHECK(simple(fd, VGPU_OP_SYNC, 0, 0, 0, NULL) == 0, "device still answers after the kills");

	close(fd);
	if (remove)
		remove_test();
	printf("%s: %d failures\n", failures ? "DRIVER TEST FAILED" : "DRIVER TEST PASSED", failures);
	return failures != 0;
}
