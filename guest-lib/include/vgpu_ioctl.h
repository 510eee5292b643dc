/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR Apache-2.0 */
/*
 * vgpu_ioctl.h: the interface between the vgpu guest driver (vgpu.ko) and user space,
 * plus the wire constants of the vGPU protocol that both sides need. The protocol
 * itself is defined by protocol/README.md (crate vgpu-protocol); this header mirrors
 * it. Everything on the wire is little-endian.
 *
 * Each open file of /dev/vgpuN is one session on the host. The driver opens the
 * session at open() and closes it at the last close(); it writes the file's session
 * into every request header, so user space leaves that field 0.
 */
#ifndef VGPU_IOCTL_H
#define VGPU_IOCTL_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* ---- wire format (protocol/README.md) ---- */

#define VGPU_PROTOCOL_VERSION		1
#define VGPU_REQUEST_MAGIC		0x51504756u	/* "VGPQ" */
#define VGPU_CONFIG_MAGIC		0x55504756u	/* "VGPU" */
#define VGPU_DEFAULT_VIRTIO_ID		22

#define VGPU_REQUEST_HEADER_SIZE	80
#define VGPU_RESPONSE_HEADER_SIZE	32
#define VGPU_CONFIG_SIZE		128
#define VGPU_INFO_SIZE			192
#define VGPU_MAX_TRANSFER_BYTES		(256u << 20)

/* Request header field offsets. */
#define VGPU_HDR_MAGIC			0	/* u32 */
#define VGPU_HDR_VERSION		4	/* u16 */
#define VGPU_HDR_OPCODE			6	/* u16 */
#define VGPU_HDR_FLAGS			8	/* u32, 0 */
#define VGPU_HDR_SESSION		16	/* u64, filled in by the driver */
#define VGPU_HDR_TAG			24	/* u64, free for the caller */
#define VGPU_HDR_ARGS			32	/* 48 bytes of operation arguments */

/* Response header field offsets. */
#define VGPU_RESP_STATUS		0	/* u32 */
#define VGPU_RESP_DETAIL		4	/* u32 */
#define VGPU_RESP_VALUE0		8	/* u64 */
#define VGPU_RESP_VALUE1		16	/* u64 */
#define VGPU_RESP_WRITTEN		24	/* u32 */
#define VGPU_RESP_FLAGS			28	/* u32, from the driver: VGPU_RESP_F_* */

/* Config space field offsets. */
#define VGPU_CFG_MAGIC			0	/* u32 */
#define VGPU_CFG_VERSION		4	/* u32 */
#define VGPU_CFG_NUM_QUEUES		8	/* u32 */
#define VGPU_CFG_MAX_REQUEST_BYTES	12	/* u32 */
#define VGPU_CFG_EXECUTOR		16	/* u32: 1 CPU, 2 CUDA */
#define VGPU_CFG_CC_MAJOR		20	/* u16 */
#define VGPU_CFG_CC_MINOR		22	/* u16 */
#define VGPU_CFG_MEM_QUOTA		24	/* u64 */
#define VGPU_CFG_DEVICE_MEMORY		32	/* u64 */
#define VGPU_CFG_MULTIPROCESSORS	40	/* u32 */
#define VGPU_CFG_MAX_SESSIONS		44	/* u32 */
#define VGPU_CFG_NAME			48	/* NUL-terminated UTF-8 */
#define VGPU_CFG_NAME_SIZE		64
#define VGPU_CFG_GPU			112	/* u32: the host GPU's index (0 from older hosts) */

#define VGPU_EXECUTOR_CPU		1
#define VGPU_EXECUTOR_CUDA		2

/* Opcodes. */
#define VGPU_OP_INFO			1
#define VGPU_OP_SESSION_OPEN		2	/* driver only */
#define VGPU_OP_SESSION_CLOSE		3	/* driver only */
#define VGPU_OP_ALLOC			4
#define VGPU_OP_FREE			5
#define VGPU_OP_HTOD			6
#define VGPU_OP_DTOH			7
#define VGPU_OP_DTOD			8
#define VGPU_OP_MEMSET			9
#define VGPU_OP_MODULE_LOAD		10
#define VGPU_OP_MODULE_UNLOAD		11
#define VGPU_OP_LAUNCH			12
#define VGPU_OP_SYNC			13
#define VGPU_OP_SELFTEST		14
#define VGPU_OP_MODULE_LOAD_IMAGE	17
#define VGPU_OP_DEVICE_ATTRIBUTES	18
#define VGPU_OP_FUNCTION_INFO		19
#define VGPU_OP_MODULE_GLOBAL		20
#define VGPU_OP_COMPILE			21

/* Response status codes. */
#define VGPU_STATUS_OK			0
#define VGPU_STATUS_INVALID_REQUEST	1
#define VGPU_STATUS_UNKNOWN_OPCODE	2
#define VGPU_STATUS_VERSION_MISMATCH	3
#define VGPU_STATUS_INVALID_SESSION	4
#define VGPU_STATUS_INVALID_HANDLE	5
#define VGPU_STATUS_INVALID_ARGUMENT	6
#define VGPU_STATUS_OUT_OF_RANGE	7
#define VGPU_STATUS_QUOTA_EXCEEDED	8
#define VGPU_STATUS_OUT_OF_MEMORY	9
#define VGPU_STATUS_UNSUPPORTED		10
#define VGPU_STATUS_KERNEL_NOT_FOUND	11
#define VGPU_STATUS_MODULE_INVALID	12
#define VGPU_STATUS_LAUNCH_FAILED	13
#define VGPU_STATUS_DEVICE_LOST		14
#define VGPU_STATUS_BUFFER_TOO_SMALL	15
#define VGPU_STATUS_LIMIT_EXCEEDED	16
#define VGPU_STATUS_INTERNAL		17

/* ---- ioctls on /dev/vgpuN ---- */

/* One contiguous piece of user memory placed in the chain. */
struct vgpu_seg {
	__u64 addr;	/* user pointer */
	__u64 len;	/* bytes; 0 is skipped */
};

/*
 * VGPU_IOC_SUBMIT: one request, as one descriptor chain
 *   [header copy] [in_segs...] [out_segs...] [response]
 * The in (device-readable) and out (device-writable) segments are pinned and handed
 * to the device in place; physically contiguous pages share one descriptor. The
 * chain may hold at most vgpu_info.queue_size descriptors (else E2BIG: split the
 * request) and VGPU_MAX_PINNED_BYTES of user memory.
 *
 * Returns 0 once the device has answered: the response header (whatever its status)
 * is in *response; it may carry the failure of an earlier async request instead of
 * this request's status (VGPU_RESP_FLAGS, see VGPU_IOC_SUBMIT_ASYNC). Errors: EINVAL
 * (an opcode only the driver sends: SESSION_OPEN, SESSION_CLOSE, HOST_REGISTER,
 * HOST_UNREGISTER; a bad segment), EFAULT, E2BIG, ENOMEM, ENODEV (device removed or
 * reset: reopen), EIO (the device returned the chain without an answer), EINTR (fatal
 * signal).
 */
struct vgpu_submit {
	__u64 header;		/* user pointer to VGPU_REQUEST_HEADER_SIZE bytes */
	__u64 response;		/* user pointer to VGPU_RESPONSE_HEADER_SIZE bytes, written */
	__u64 in_segs;		/* user pointer to struct vgpu_seg[num_in]: device reads */
	__u64 out_segs;		/* user pointer to struct vgpu_seg[num_out]: device writes */
	__u32 num_in;
	__u32 num_out;
};

/*
 * VGPU_IOC_SUBMIT_POLL: VGPU_IOC_SUBMIT for latency-critical callers. After queueing the
 * request the driver looks for its answer in the ring itself, spinning on the caller's
 * CPU, for up to poll_us microseconds (more than VGPU_POLL_MAX_US counts as that; 0 does
 * not poll); then, or as soon as the CPU is wanted by another task, it sleeps until the
 * device's interrupt as VGPU_IOC_SUBMIT does. It trades the caller's CPU time for the
 * interrupt's and the wake-up's latency. While a caller polls the device is asked not
 * to interrupt, and the poller completes whatever comes back (other files' and async
 * requests too). Results and errors are VGPU_IOC_SUBMIT's; reserved must be 0
 * (else EINVAL). A driver without it answers ENOTTY: use VGPU_IOC_SUBMIT.
 *
 * struct vgpu_submit has no spare field (40 bytes, no padding, its size in the ioctl
 * number): hence a new number with a longer struct.
 */
struct vgpu_submit_poll {
	struct vgpu_submit submit;
	__u32 poll_us;		/* longest poll before sleeping, microseconds */
	__u32 reserved;		/* 0 */
};

#define VGPU_POLL_MAX_US		1000

/*
 * VGPU_IOC_SUBMIT_ASYNC: the same request, queued without waiting for the device, for
 * LAUNCH, MEMSET, DTOD and HTOD only (any other opcode, or any out_segs: EINVAL). The
 * driver copies the header and the in_segs bytes (at most VGPU_ASYNC_MAX_BYTES in all,
 * else E2BIG: send it with VGPU_IOC_SUBMIT), so the caller may reuse them at once;
 * response is not used. Returns 0 once the request is queued.
 *
 * At most VGPU_ASYNC_MAX_INFLIGHT async requests of one open file are in flight; the
 * next waits for one to return (a signal interrupts that wait: EINTR or a restart).
 * An async request answered with a status other than OK is kept (the first one; later
 * ones are dropped until it is reported) and reported by the file's next
 * VGPU_IOC_SUBMIT, which then answers with VGPU_RESP_F_ASYNC_ERROR set (below). The
 * device answers a session's requests in order, so a VGPU_IOC_SUBMIT (SYNC, say) sees
 * the failures of every async request queued before it.
 *
 * Errors: EINVAL, EFAULT, E2BIG, ENOMEM, ENODEV (device removed or reset), EINTR.
 * A driver without async submission answers ENOTTY.
 */
#define VGPU_ASYNC_MAX_BYTES		65536	/* 64 KiB */
#define VGPU_ASYNC_MAX_INFLIGHT		256

/*
 * The response's VGPU_RESP_FLAGS (the protocol's reserved field; the driver writes it,
 * 0 but for this):
 *   VGPU_RESP_F_ASYNC_ERROR  status and detail are those of an earlier async request
 *                            of the file that failed, whose opcode is
 *                            VGPU_RESP_ASYNC_OPCODE(flags). This request ran all the
 *                            same: its own status is VGPU_RESP_OWN_STATUS(flags) and
 *                            value0, value1 and written are its own (an ALLOC's buffer
 *                            exists: free it).
 */
#define VGPU_RESP_F_ASYNC_ERROR		1
#define VGPU_RESP_OWN_STATUS(flags)	(((flags) >> 8) & 0xffu)
#define VGPU_RESP_ASYNC_OPCODE(flags)	(((flags) >> 16) & 0xffffu)

/* VGPU_IOC_INFO: the device's config space and the queue's size. */
struct vgpu_info {
	__u8 config[VGPU_CONFIG_SIZE];	/* as read from the device, little-endian */
	__u32 queue_size;		/* most descriptors in one chain */
	__u32 reserved;
};

/* Most user memory one request may pin. */
#define VGPU_MAX_PINNED_BYTES		(512ul << 20)

#define VGPU_IOC_MAGIC			'V'
#define VGPU_IOC_SUBMIT			_IOWR(VGPU_IOC_MAGIC, 1, struct vgpu_submit)
#define VGPU_IOC_INFO			_IOR(VGPU_IOC_MAGIC, 2, struct vgpu_info)
#define VGPU_IOC_SESSION		_IOR(VGPU_IOC_MAGIC, 3, __u64)
#define VGPU_IOC_SUBMIT_ASYNC		_IOW(VGPU_IOC_MAGIC, 4, struct vgpu_submit)
#define VGPU_IOC_SUBMIT_POLL		_IOWR(VGPU_IOC_MAGIC, 5, struct vgpu_submit_poll)

/*
 * mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) returns a zeroed host
 * buffer of physically contiguous chunks (up to 4 MiB each on x86-64): copies from
 * it need few descriptors. Offset must be 0; each mmap is a new buffer, freed when
 * the last mapping of it goes away and the device no longer uses it.
 */

#endif /* VGPU_IOCTL_H */
