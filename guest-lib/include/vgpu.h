/* SPDX-License-Identifier: Apache-2.0 */
/*
 * vgpu.h: the C interface of libvgpu, the guest library of the vGPU device.
 *
 *   cc -I guest-lib/include app.c -L target/release -lvgpu
 *
 * A session is one open file of /dev/vgpuN and one context on the host; its buffers and
 * modules are its own and are freed when it closes. Every call returns a vgpu_status:
 * the device's status codes (VGPU_OK = 0 and the protocol's errors) or one of the
 * library's own (VGPU_ERROR_*). vgpu_last_error() describes the calling thread's last
 * failure. Launches and host-to-device copies of at most 64 KiB are queued without
 * waiting for the device: a failure among them (a bad handle, an unknown kernel) or
 * one later on the device is the status of the session's next synchronous call
 * (vgpu_sync, vgpu_dtoh, vgpu_alloc...); a sticky failure (VGPU_LAUNCH_FAILED) is
 * reported by every call after it too. VGPU_SYNC_SUBMIT=1 in the environment makes
 * every call wait for the device, so a failure is the failing call's own status.
 * A session may be used from several threads at once.
 */
#ifndef VGPU_H
#define VGPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum vgpu_status {
	VGPU_OK = 0,
	VGPU_INVALID_REQUEST = 1,	/* malformed request */
	VGPU_UNKNOWN_OPCODE = 2,
	VGPU_VERSION_MISMATCH = 3,	/* library and device speak different protocols */
	VGPU_INVALID_SESSION = 4,
	VGPU_INVALID_HANDLE = 5,	/* not a buffer or module of this session */
	VGPU_INVALID_ARGUMENT = 6,	/* sizes, grid, block, widths, parameters */
	VGPU_OUT_OF_RANGE = 7,		/* a copy or memset past the end of a buffer */
	VGPU_QUOTA_EXCEEDED = 8,	/* over this VM's device-memory quota */
	VGPU_OUT_OF_MEMORY = 9,		/* the device itself is full */
	VGPU_UNSUPPORTED = 10,		/* e.g. PTX on the CPU executor */
	VGPU_KERNEL_NOT_FOUND = 11,
	VGPU_MODULE_INVALID = 12,	/* the PTX did not load */
	VGPU_LAUNCH_FAILED = 13,	/* asynchronous failure; close the session */
	VGPU_DEVICE_LOST = 14,		/* the VM's context was restarted; reopen */
	VGPU_BUFFER_TOO_SMALL = 15,
	VGPU_LIMIT_EXCEEDED = 16,	/* too many sessions, handles or modules */
	VGPU_INTERNAL = 17,

	VGPU_ERROR_IO = 100,		/* a system call failed: see vgpu_last_error() */
	VGPU_ERROR_NO_DEVICE = 101,	/* no such device, or it was removed or reset */
	VGPU_ERROR_INVALID_VALUE = 102,	/* NULL pointer, bad string, bad argument */
	VGPU_ERROR_PANIC = 103		/* a bug in the library; close the session */
} vgpu_status;

typedef struct vgpu_session vgpu_session;

/* Kernel arguments, in the kernel's parameter order. */
typedef enum vgpu_arg_kind {
	VGPU_ARG_BUFFER = 0,	/* value.buffer: a buffer handle; the kernel gets its address */
	VGPU_ARG_U32 = 1,
	VGPU_ARG_I32 = 2,
	VGPU_ARG_F32 = 3,
	VGPU_ARG_U64 = 4,
	VGPU_ARG_F64 = 5,
	VGPU_ARG_BYTES = 6	/* value.bytes: size bytes passed by value */
} vgpu_arg_kind;

typedef struct vgpu_arg {
	uint32_t kind;		/* vgpu_arg_kind */
	uint32_t size;		/* VGPU_ARG_BYTES only */
	union {
		uint64_t buffer;
		uint32_t u32;
		int32_t i32;
		float f32;
		uint64_t u64;
		double f64;
		const void *bytes;
	} value;
} vgpu_arg;

static inline vgpu_arg vgpu_arg_buffer(uint64_t handle)
{
	vgpu_arg a = { VGPU_ARG_BUFFER, 0, { 0 } };
	a.value.buffer = handle;
	return a;
}

static inline vgpu_arg vgpu_arg_u32(uint32_t v)
{
	vgpu_arg a = { VGPU_ARG_U32, 0, { 0 } };
	a.value.u32 = v;
	return a;
}

static inline vgpu_arg vgpu_arg_i32(int32_t v)
{
	vgpu_arg a = { VGPU_ARG_I32, 0, { 0 } };
	a.value.i32 = v;
	return a;
}

static inline vgpu_arg vgpu_arg_f32(float v)
{
	vgpu_arg a = { VGPU_ARG_F32, 0, { 0 } };
	a.value.f32 = v;
	return a;
}

static inline vgpu_arg vgpu_arg_u64(uint64_t v)
{
	vgpu_arg a = { VGPU_ARG_U64, 0, { 0 } };
	a.value.u64 = v;
	return a;
}

static inline vgpu_arg vgpu_arg_f64(double v)
{
	vgpu_arg a = { VGPU_ARG_F64, 0, { 0 } };
	a.value.f64 = v;
	return a;
}

static inline vgpu_arg vgpu_arg_bytes(const void *p, uint32_t size)
{
	vgpu_arg a = { VGPU_ARG_BYTES, 0, { 0 } };
	a.size = size;
	a.value.bytes = p;
	return a;
}

/* Sessions. */
vgpu_status vgpu_open(int index, vgpu_session **session);	/* /dev/vgpu<index> */
vgpu_status vgpu_open_path(const char *path, vgpu_session **session);
void vgpu_close(vgpu_session *session);				/* NULL is ignored */

/* Device memory, by handle. Copies are split into requests the driver accepts. */
vgpu_status vgpu_alloc(vgpu_session *s, uint64_t size, uint64_t *handle);
vgpu_status vgpu_free(vgpu_session *s, uint64_t handle);
vgpu_status vgpu_htod(vgpu_session *s, uint64_t handle, uint64_t offset,
		      const void *src, size_t len);
vgpu_status vgpu_dtoh(vgpu_session *s, uint64_t handle, uint64_t offset,
		      void *dst, size_t len);

/* Host memory for fast copies (the analogue of cudaMallocHost): memory the device copies
 * from and to directly. vgpu_htod / vgpu_dtoh from or into it take the fast path. */
vgpu_status vgpu_host_alloc(vgpu_session *s, size_t bytes, void **ptr);
vgpu_status vgpu_host_free(vgpu_session *s, void *ptr);

/* Kernels: PTX modules, or the built-in catalog (module 0): vector_add_f32(a, b, c, n),
 * saxpy_f32(y, x, alpha, n), scale_f32(x, alpha, n), reduce_sum_f32(x, out, n),
 * matmul_f32(a, b, c, m, n, k), fill_u32(x, value, n). */
vgpu_status vgpu_load_module(vgpu_session *s, const char *ptx, uint64_t *module);
vgpu_status vgpu_unload_module(vgpu_session *s, uint64_t module);
vgpu_status vgpu_launch(vgpu_session *s, uint64_t module, const char *kernel,
			const uint32_t grid[3], const uint32_t block[3], uint32_t shared_bytes,
			const vgpu_arg *args, size_t num_args);
vgpu_status vgpu_launch_builtin(vgpu_session *s, const char *kernel,
				const uint32_t grid[3], const uint32_t block[3],
				const vgpu_arg *args, size_t num_args);
vgpu_status vgpu_sync(vgpu_session *s);

/* The device's name, NUL-terminated and cut to len bytes. */
vgpu_status vgpu_device_name(vgpu_session *s, char *buf, size_t len);

/* The index of the host GPU the device is placed on, as the host numbers its GPUs (0 from
 * a host with one GPU, or one that does not say). Several /dev/vgpuN of one VM may be on
 * different host GPUs, or on the same one. */
vgpu_status vgpu_device_gpu(vgpu_session *s, uint32_t *gpu);

/* "OK", "QUOTA_EXCEEDED", ..., "UNKNOWN"; static strings. */
const char *vgpu_status_name(int status);
/* The calling thread's last failure; valid until its next failing call. */
const char *vgpu_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* VGPU_H */
