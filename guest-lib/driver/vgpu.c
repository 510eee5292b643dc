// SPDX-License-Identifier: GPL-2.0
/*
 * vgpu: guest driver for the mediated vGPU virtio device.
 *
 * Each device gets a char device /dev/vgpuN; each open file is one session on the host.
 * VGPU_IOC_SUBMIT sends one request over the "requests" virtqueue as one descriptor
 * chain: [header] [device-readable user memory] [device-writable user memory]
 * [response]. User memory is pinned and handed to the device in place.
 * VGPU_IOC_SUBMIT_ASYNC queues a LAUNCH, MEMSET, DTOD or HTOD from a kernel copy of its
 * bytes and returns at once; the first failure among them is reported by the file's
 * next VGPU_IOC_SUBMIT. VGPU_IOC_SUBMIT_POLL is VGPU_IOC_SUBMIT that first polls the
 * ring for its answer for a while (vgpu_poll) before it sleeps. mmap gives zeroed,
 * physically contiguous host buffers so that large copies need few descriptors;
 * each is registered with the device (HOST_REGISTER), which may then copy straight
 * between its pages and the GPU, and unregistered before its pages are freed.
 * The wire format is protocol/README.md; the user interface is include/vgpu_ioctl.h.
 */

#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/llist.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/rwsem.h>
#include <linux/scatterlist.h>
#include <linux/sched/clock.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vmalloc.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
#include <linux/unaligned.h>
#else
#include <asm/unaligned.h>
#endif

#include "vgpu_ioctl.h"

/* Largest page order a host buffer chunk may have. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
#define VGPU_MAX_ORDER MAX_PAGE_ORDER
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define VGPU_MAX_ORDER MAX_ORDER
#else
#define VGPU_MAX_ORDER (MAX_ORDER - 1)
#endif

#define VGPU_MAX_DEVICES 64

/*
 * Opcodes only the driver sends (protocol/README.md, "Host buffers"); user space
 * never sees them, so they are not in vgpu_ioctl.h.
 */
#define VGPU_OP_HOST_REGISTER		15	/* 0: u64 id, 8: u64 len, 16: u64 chunks */
#define VGPU_OP_HOST_UNREGISTER		16	/* 0: u64 id */
#define VGPU_HOST_CHUNK_SIZE		16	/* u64 guest-physical address, u64 length */
#define VGPU_MAX_HOST_BUFFER_BYTES	(16ULL << 30)

/* vgpu_device.hostreg: what the device last answered to HOST_REGISTER. */
enum {
	VGPU_HOSTREG_UNKNOWN,
	VGPU_HOSTREG_SUPPORTED,
	VGPU_HOSTREG_UNSUPPORTED,
};

static unsigned int virtio_id = VGPU_DEFAULT_VIRTIO_ID;
module_param(virtio_id, uint, 0444);
MODULE_PARM_DESC(virtio_id, "virtio device ID to bind (default 22)");

/* Filled in from virtio_id at module init; the static value feeds the module alias. */
static struct virtio_device_id id_table[] = {
	{ VGPU_DEFAULT_VIRTIO_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, id_table);

static struct class *vgpu_class;
static dev_t vgpu_devt;
static DEFINE_IDA(vgpu_ida);
/* Frees requests abandoned by killed callers and finishes interrupted session closes. */
static struct workqueue_struct *vgpu_wq;

/* Async requests the device is done with; vgpu_async_free_work frees them. */
static LLIST_HEAD(vgpu_async_done);
static void vgpu_async_free_fn(struct work_struct *work);
static DECLARE_WORK(vgpu_async_free_work, vgpu_async_free_fn);

/* Most in_segs one VGPU_IOC_SUBMIT_ASYNC may have. */
#define VGPU_ASYNC_MAX_SEGS		64

struct vgpu_device {
	struct device dev;		/* /sys/class/vgpu/vgpuN; its refcount owns this */
	struct cdev cdev;
	int index;

	struct mutex state_lock;	/* vdev and vq setup/teardown, config reads */
	struct virtio_device *vdev;	/* NULL once removed */

	spinlock_t vq_lock;		/* vq, live, epoch, space_gen, inflight, pollers */
	struct virtqueue *vq;
	bool live;			/* requests may be queued */
	unsigned int epoch;		/* bumped by every reset: older sessions are gone */
	unsigned long space_gen;	/* bumped whenever descriptors are freed */
	struct list_head inflight;	/* requests the device holds */
	unsigned int pollers;		/* tasks in vgpu_poll: interrupts may be off */
	unsigned int queue_size;
	wait_queue_head_t space_wq;
	/* Read-held from virtqueue_add_sgs to the notify, so teardown can wait them out. */
	struct rw_semaphore notify_sem;

	atomic_t sessions;
	/* The ring hands the device physical addresses: host buffers can be registered. */
	bool phys_addressing;
	atomic_t hostreg;		/* VGPU_HOSTREG_*, logged when it changes */
};

/* One user range, pinned for the lifetime of a request. */
struct vgpu_pinned {
	struct page **pages;
	unsigned int npages;
	bool writable;
	struct sg_table sgt;
};

struct vgpu_request {
	struct vgpu_device *vg;		/* holds a reference */
	unsigned int epoch;
	struct list_head node;		/* on vg->inflight while the device holds it */
	struct completion done;
	struct work_struct work;	/* reaping, or a deferred session close */
	int error;			/* 0, or -ENODEV when failed by teardown */
	unsigned int used_len;
	bool returned;			/* the device gave it back; under vq_lock */
	bool abandoned;			/* the caller was killed; under vq_lock */

	unsigned int nr_pinned;
	struct vgpu_pinned *pinned;
	/* HOST_REGISTER, async requests: the payload (kvmalloc'd) and its table. */
	void *payload;
	struct sg_table payload_sgt;
	/* HOST_REGISTER / HOST_UNREGISTER: the buffer they are about. */
	struct vgpu_hostbuf *hb;
	/* VGPU_IOC_SUBMIT_ASYNC: the file it counts against (holds a reference). */
	struct vgpu_file *async_vf;
	struct llist_node free_node;	/* on vgpu_async_done once returned */
	struct scatterlist **sgs;
	struct scatterlist hdr_sg;
	struct scatterlist resp_sg;
	u8 header[VGPU_REQUEST_HEADER_SIZE];
	/* Written by the device: keep it off the header's cache line. */
	u8 response[VGPU_RESPONSE_HEADER_SIZE] ____cacheline_aligned;
};

struct vgpu_file {
	/* The open file's, plus one per async request until it is freed. */
	struct kref ref;
	struct vgpu_device *vg;		/* holds a reference */
	unsigned int epoch;
	u64 session;
	atomic64_t hostbuf_ids;		/* last host buffer id handed out */
	bool hostreg_unsupported;	/* the device cannot register: stop asking */

	/* VGPU_IOC_SUBMIT_ASYNC */
	atomic_t async_inflight;	/* queued and not returned yet */
	wait_queue_head_t async_wq;	/* woken whenever one returns */
	spinlock_t async_lock;		/* the three below; taken inside vq_lock */
	bool async_failed;		/* async_error waits for the next VGPU_IOC_SUBMIT */
	u16 async_opcode;		/* of the failed request */
	u8 async_error[VGPU_RESPONSE_HEADER_SIZE];
};

/*
 * A host buffer handed out by mmap: order-0 pages split from high-order blocks.
 * Registered with the device (HOST_REGISTER) under @id in @vf's session; the pages are
 * freed only once the device has answered HOST_UNREGISTER (or lost the session).
 */
struct vgpu_hostbuf {
	/* One per VMA, plus one while an abandoned HOST_REGISTER is in the device. */
	struct kref ref;
	struct file *file;		/* holds a reference: keeps @vf and its session */
	struct vgpu_file *vf;
	u64 id;
	bool registered;		/* the device may hold it: unregister before freeing */
	unsigned long npages;
	struct page *pages[];
};

/* ---- requests ---- */

static struct vgpu_request *vgpu_request_alloc(struct vgpu_device *vg, unsigned int nsegs,
					       gfp_t gfp)
{
	struct vgpu_request *req;

	req = kzalloc(sizeof(*req), gfp);
	if (!req)
		return NULL;
	req->sgs = kvcalloc(nsegs + 2, sizeof(*req->sgs), gfp);
	if (nsegs)
		req->pinned = kvcalloc(nsegs, sizeof(*req->pinned), gfp);
	if (!req->sgs || (nsegs && !req->pinned)) {
		kvfree(req->sgs);
		kvfree(req->pinned);
		kfree(req);
		return NULL;
	}
	req->vg = vg;
	get_device(&vg->dev);
	INIT_LIST_HEAD(&req->node);
	init_completion(&req->done);
	sg_init_one(&req->hdr_sg, req->header, sizeof(req->header));
	sg_init_one(&req->resp_sg, req->response, sizeof(req->response));
	return req;
}

static void vgpu_unpin(struct vgpu_pinned *p)
{
	if (!p->pages)
		return;
	sg_free_table(&p->sgt);
	if (p->writable)
		unpin_user_pages_dirty_lock(p->pages, p->npages, true);
	else
		unpin_user_pages(p->pages, p->npages);
	kvfree(p->pages);
	p->pages = NULL;
}

/* Process context only: unpinning may sleep. */
static void vgpu_request_free(struct vgpu_request *req)
{
	struct vgpu_device *vg = req->vg;
	unsigned int i;

	for (i = 0; i < req->nr_pinned; i++)
		vgpu_unpin(&req->pinned[i]);
	kvfree(req->pinned);
	if (req->payload_sgt.sgl)
		sg_free_table(&req->payload_sgt);
	kvfree(req->payload);
	kvfree(req->sgs);
	kfree(req);
	put_device(&vg->dev);
}

/* Lays a kernel buffer from kmalloc or vmalloc out in @sgt. */
static int vgpu_kbuf_sg(struct sg_table *sgt, void *buf, size_t len)
{
	unsigned int npages, i;
	struct page **pages;
	int err;

	if (!is_vmalloc_addr(buf)) {
		err = sg_alloc_table(sgt, 1, GFP_KERNEL);
		if (!err)
			sg_set_buf(sgt->sgl, buf, len);
		return err;
	}
	/* kvmalloc's vmalloc memory starts on a page. */
	npages = DIV_ROUND_UP(len, PAGE_SIZE);
	pages = kvmalloc_array(npages, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return -ENOMEM;
	for (i = 0; i < npages; i++)
		pages[i] = vmalloc_to_page(buf + ((size_t)i << PAGE_SHIFT));
	err = sg_alloc_table_from_pages(sgt, pages, npages, 0, len, GFP_KERNEL);
	kvfree(pages);
	return err;
}

static void vgpu_fill_header(struct vgpu_request *req, u16 opcode, u64 session)
{
	put_unaligned_le32(VGPU_REQUEST_MAGIC, req->header + VGPU_HDR_MAGIC);
	put_unaligned_le16(VGPU_PROTOCOL_VERSION, req->header + VGPU_HDR_VERSION);
	put_unaligned_le16(opcode, req->header + VGPU_HDR_OPCODE);
	put_unaligned_le64(session, req->header + VGPU_HDR_SESSION);
}

static int vgpu_execute(struct vgpu_device *vg, struct vgpu_request *req, unsigned int nout,
			unsigned int nin, bool *abandoned);
static void vgpu_host_register_reaped(struct vgpu_request *req);
static void vgpu_host_unregister_done(struct vgpu_request *req, int err);

static void vgpu_reap_fn(struct work_struct *work)
{
	struct vgpu_request *req = container_of(work, struct vgpu_request, work);
	u16 opcode = get_unaligned_le16(req->header + VGPU_HDR_OPCODE);
	bool abandoned;

	dev_dbg(&req->vg->dev, "abandoned request returned, freeing it\n");
	/* A host buffer's request: its outcome decides what happens to the buffer. */
	if (opcode == VGPU_OP_HOST_REGISTER) {
		vgpu_host_register_reaped(req);
		return;
	}
	if (opcode == VGPU_OP_HOST_UNREGISTER) {
		vgpu_host_unregister_done(req, req->error);
		return;
	}
	/* The caller of this SESSION_OPEN was killed: nobody will close the session. */
	if (!req->error && req->used_len >= VGPU_RESPONSE_HEADER_SIZE &&
	    get_unaligned_le16(req->header + VGPU_HDR_OPCODE) == VGPU_OP_SESSION_OPEN &&
	    get_unaligned_le32(req->response + VGPU_RESP_STATUS) == VGPU_STATUS_OK) {
		u64 session = get_unaligned_le64(req->response + VGPU_RESP_VALUE0);

		req->returned = false;
		req->abandoned = false;
		reinit_completion(&req->done);
		vgpu_fill_header(req, VGPU_OP_SESSION_CLOSE, session);
		/* A worker takes no signals: this waits for the answer or for teardown. */
		vgpu_execute(req->vg, req, 1, 1, &abandoned);
	}
	vgpu_request_free(req);
}

static void vgpu_file_free(struct kref *ref)
{
	struct vgpu_file *vf = container_of(ref, struct vgpu_file, ref);

	put_device(&vf->vg->dev);
	kfree(vf);
}

/* Frees the async requests the device gave back (freeing may sleep: not under vq_lock). */
static void vgpu_async_free_fn(struct work_struct *work)
{
	struct llist_node *done = llist_del_all(&vgpu_async_done);
	struct vgpu_request *req, *tmp;

	llist_for_each_entry_safe(req, tmp, done, free_node) {
		struct vgpu_file *vf = req->async_vf;

		vgpu_request_free(req);
		kref_put(&vf->ref, vgpu_file_free);
	}
}

/*
 * An async request came back, or teardown failed it (-ENODEV: the session is gone and
 * every later submit of the file says so). Called under vq_lock, in the interrupt or in
 * teardown: keeps the file's first failure for its next VGPU_IOC_SUBMIT, gives the
 * request's slot back and leaves the freeing to a worker.
 */
static void vgpu_async_finish(struct vgpu_request *req)
{
	struct vgpu_file *vf = req->async_vf;
	u32 status = VGPU_STATUS_OK;

	if (!req->error) {
		if (req->used_len < VGPU_RESPONSE_HEADER_SIZE) {
			/* Returned without an answer: its outcome is unknown. */
			memset(req->response, 0, sizeof(req->response));
			put_unaligned_le32(VGPU_STATUS_INTERNAL, req->response + VGPU_RESP_STATUS);
		}
		status = get_unaligned_le32(req->response + VGPU_RESP_STATUS);
	}
	if (status != VGPU_STATUS_OK) {
		spin_lock(&vf->async_lock);
		if (!vf->async_failed) {
			vf->async_failed = true;
			vf->async_opcode = get_unaligned_le16(req->header + VGPU_HDR_OPCODE);
			memcpy(vf->async_error, req->response, sizeof(vf->async_error));
		}
		spin_unlock(&vf->async_lock);
	}
	atomic_dec(&vf->async_inflight);
	wake_up(&vf->async_wq);
	if (llist_add(&req->free_node, &vgpu_async_done))
		queue_work(vgpu_wq, &vgpu_async_free_work);
}

/* The device is done with @req (or will never touch it again). Called under vq_lock. */
static void vgpu_finish_locked(struct vgpu_device *vg, struct vgpu_request *req, int error,
			       unsigned int len)
{
	list_del_init(&req->node);
	req->error = error;
	req->used_len = len;
	req->returned = true;
	if (req->async_vf) {
		vgpu_async_finish(req);
	} else if (req->abandoned) {
		INIT_WORK(&req->work, vgpu_reap_fn);
		queue_work(vgpu_wq, &req->work);
	} else {
		complete(&req->done);
	}
}

/*
 * Hands back every request the device returned, in the order it returned them. The
 * interrupt and the pollers both come here, under vq_lock, so each used entry leaves
 * the ring once and is finished once, whoever finds it. While a task polls, the
 * device's interrupt stays off (the pollers look anyway); otherwise it is re-armed, and
 * whatever returned before the re-arm is taken here, so the next return interrupts.
 * Returns whether anything came back.
 */
static bool vgpu_reap_locked(struct vgpu_device *vg, struct virtqueue *vq)
{
	struct vgpu_request *req;
	unsigned int len;
	bool any = false;

	do {
		virtqueue_disable_cb(vq);
		while ((req = virtqueue_get_buf(vq, &len))) {
			vgpu_finish_locked(vg, req, 0, len);
			any = true;
		}
	} while (!vg->pollers && !virtqueue_enable_cb(vq));
	if (any)
		vg->space_gen++;
	return any;
}

static void vgpu_vq_done(struct virtqueue *vq)
{
	struct vgpu_device *vg = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&vg->vq_lock, flags);
	vgpu_reap_locked(vg, vq);
	spin_unlock_irqrestore(&vg->vq_lock, flags);
	wake_up_all(&vg->space_wq);
}

/*
 * VGPU_IOC_SUBMIT_POLL: looks for @req's answer in the ring itself, for up to @poll_us
 * or until the CPU is wanted elsewhere or a fatal signal comes; the caller then waits on
 * req->done as usual (at once if @req came back). Everything that came back meanwhile,
 * other files' and async requests too, is finished here as the interrupt would.
 *
 * The device's interrupt is off while any task polls (vgpu_reap_locked): a poll runs
 * with preemption off and ends in bounded time, and the last poller out re-arms the
 * interrupt, taking what came back before the re-arm. From the moment a reset or
 * removal begins (!live) the ring is left alone: teardown hands everything back.
 */
static void vgpu_poll(struct vgpu_device *vg, struct vgpu_request *req, unsigned int poll_us)
{
	bool any, done;
	u64 deadline;

	preempt_disable();
	deadline = local_clock() + (u64)poll_us * NSEC_PER_USEC;
	spin_lock_irq(&vg->vq_lock);
	vg->pollers++;
	for (;;) {
		any = vg->live && vgpu_reap_locked(vg, vg->vq);
		done = req->returned || !vg->live;
		spin_unlock_irq(&vg->vq_lock);
		if (any)
			wake_up_all(&vg->space_wq);
		if (done || local_clock() >= deadline || need_resched() ||
		    fatal_signal_pending(current))
			break;
		cpu_relax();
		spin_lock_irq(&vg->vq_lock);
	}
	spin_lock_irq(&vg->vq_lock);
	any = !--vg->pollers && vg->live && vgpu_reap_locked(vg, vg->vq);
	spin_unlock_irq(&vg->vq_lock);
	if (any)
		wake_up_all(&vg->space_wq);
	preempt_enable();
}

/*
 * Puts @req in the ring and notifies the device, waiting (killable) while the ring is
 * full. Once it returns 0 the device holds the request and only vgpu_finish_locked
 * hands it back: an async request may be freed before this returns.
 */
static int vgpu_queue(struct vgpu_device *vg, struct vgpu_request *req, unsigned int nout,
		      unsigned int nin)
{
	struct virtqueue *vq = NULL;
	unsigned long gen = 0;
	bool kick = false;
	int err;

	for (;;) {
		down_read(&vg->notify_sem);
		spin_lock_irq(&vg->vq_lock);
		if (!vg->live || vg->epoch != req->epoch) {
			err = -ENODEV;
		} else {
			vq = vg->vq;
			err = virtqueue_add_sgs(vq, req->sgs, nout, nin, req, GFP_ATOMIC);
			if (!err) {
				list_add_tail(&req->node, &vg->inflight);
				kick = virtqueue_kick_prepare(vq);
			}
			gen = vg->space_gen;
		}
		spin_unlock_irq(&vg->vq_lock);
		if (kick)
			virtqueue_notify(vq);
		up_read(&vg->notify_sem);

		if (err != -ENOSPC)
			break;
		if (wait_event_killable(vg->space_wq,
					READ_ONCE(vg->space_gen) != gen || !READ_ONCE(vg->live)))
			return -EINTR;
	}
	if (err == -EIO)	/* broken virtqueue */
		err = -ENODEV;
	return err;
}

/*
 * Queues @req and waits until the device returns it, polling for up to @poll_us first
 * (vgpu_poll). On success, or on an error with *abandoned false, the caller still owns
 * @req and frees it. With *abandoned true the caller was killed while the device holds
 * the request: the completion path frees it, because the device may still write the
 * pinned pages.
 *
 * Waits are killable only: an ordinary signal must not make a request's outcome unknown
 * (a restarted ALLOC or LAUNCH would run twice).
 */
static int vgpu_execute_poll(struct vgpu_device *vg, struct vgpu_request *req,
			     unsigned int nout, unsigned int nin, unsigned int poll_us,
			     bool *abandoned)
{
	int err;

	*abandoned = false;
	err = vgpu_queue(vg, req, nout, nin);
	if (err)
		return err;

	if (poll_us)
		vgpu_poll(vg, req, poll_us);
	wait_for_completion_killable(&req->done);
	spin_lock_irq(&vg->vq_lock);
	if (!req->returned) {
		req->abandoned = true;
		*abandoned = true;
		dev_dbg(&vg->dev, "caller killed; request left to the completion path\n");
		err = -EINTR;
	} else {
		err = req->error;
	}
	spin_unlock_irq(&vg->vq_lock);
	return err;
}

static int vgpu_execute(struct vgpu_device *vg, struct vgpu_request *req, unsigned int nout,
			unsigned int nin, bool *abandoned)
{
	return vgpu_execute_poll(vg, req, nout, nin, 0, abandoned);
}

static int vgpu_status_errno(u32 status)
{
	switch (status) {
	case VGPU_STATUS_OK:
		return 0;
	case VGPU_STATUS_OUT_OF_MEMORY:
		return -ENOMEM;
	case VGPU_STATUS_QUOTA_EXCEEDED:
		return -EDQUOT;
	case VGPU_STATUS_LIMIT_EXCEEDED:
		return -EBUSY;
	case VGPU_STATUS_DEVICE_LOST:
		return -ENODEV;
	default:
		return -EIO;
	}
}

/* Sends a request without payload; returns its response status as an errno. */
static int vgpu_simple_request(struct vgpu_request *req, u16 opcode, u64 session, u64 *value0)
{
	bool abandoned;
	int err;

	vgpu_fill_header(req, opcode, session);
	req->sgs[0] = &req->hdr_sg;
	req->sgs[1] = &req->resp_sg;
	err = vgpu_execute(req->vg, req, 1, 1, &abandoned);
	if (abandoned)
		return err;
	if (!err && req->used_len < VGPU_RESPONSE_HEADER_SIZE)
		err = -EIO;
	if (!err)
		err = vgpu_status_errno(get_unaligned_le32(req->response + VGPU_RESP_STATUS));
	if (!err && value0)
		*value0 = get_unaligned_le64(req->response + VGPU_RESP_VALUE0);
	vgpu_request_free(req);
	return err;
}

static int vgpu_session_open(struct vgpu_device *vg, struct vgpu_file *vf)
{
	struct vgpu_request *req;

	req = vgpu_request_alloc(vg, 0, GFP_KERNEL);
	if (!req)
		return -ENOMEM;
	spin_lock_irq(&vg->vq_lock);
	req->epoch = vg->epoch;
	spin_unlock_irq(&vg->vq_lock);
	vf->epoch = req->epoch;
	return vgpu_simple_request(req, VGPU_OP_SESSION_OPEN, 0, &vf->session);
}

static void vgpu_close_fn(struct work_struct *work)
{
	struct vgpu_request *req = container_of(work, struct vgpu_request, work);
	bool abandoned;

	/* A worker takes no signals: this waits until the device answers or goes away. */
	vgpu_execute(req->vg, req, 1, 1, &abandoned);
	if (!abandoned)
		vgpu_request_free(req);
}

static void vgpu_session_close(struct vgpu_device *vg, struct vgpu_file *vf)
{
	struct vgpu_request *req;
	bool abandoned;
	int err;

	/* Small and must not fail: a lost close would leak the session until reset. */
	req = vgpu_request_alloc(vg, 0, GFP_KERNEL | __GFP_NOFAIL);
	req->epoch = vf->epoch;
	vgpu_fill_header(req, VGPU_OP_SESSION_CLOSE, vf->session);
	req->sgs[0] = &req->hdr_sg;
	req->sgs[1] = &req->resp_sg;
	err = vgpu_execute(vg, req, 1, 1, &abandoned);
	if (abandoned)
		return;
	if (err == -EINTR) {
		/* Killed while the queue was full: let a worker send it. */
		INIT_WORK(&req->work, vgpu_close_fn);
		queue_work(vgpu_wq, &req->work);
		return;
	}
	if (!err && req->used_len >= VGPU_RESPONSE_HEADER_SIZE &&
	    get_unaligned_le32(req->response + VGPU_RESP_STATUS) != VGPU_STATUS_OK)
		dev_dbg(&vg->dev, "session %llu close: status %u\n", vf->session,
			get_unaligned_le32(req->response + VGPU_RESP_STATUS));
	vgpu_request_free(req);
}

/* ---- submit ---- */

static int vgpu_pin(struct vgpu_pinned *p, u64 addr, u64 len, bool writable)
{
	unsigned long start = addr & PAGE_MASK;
	unsigned long npages = (PAGE_ALIGN(addr + len) - start) >> PAGE_SHIFT;
	unsigned int flags = writable ? FOLL_WRITE : 0;
	unsigned long done = 0;
	int ret;

	p->pages = kvmalloc_array(npages, sizeof(*p->pages), GFP_KERNEL);
	if (!p->pages)
		return -ENOMEM;
	p->writable = writable;
	while (done < npages) {
		ret = pin_user_pages_fast(start + (done << PAGE_SHIFT), npages - done, flags,
					  p->pages + done);
		if (ret <= 0) {
			ret = ret ? ret : -EFAULT;
			goto unpin;
		}
		done += ret;
	}
	p->npages = npages;
	ret = sg_alloc_table_from_pages(&p->sgt, p->pages, npages, offset_in_page(addr), len,
					GFP_KERNEL);
	if (ret)
		goto unpin;
	return 0;

unpin:
	unpin_user_pages(p->pages, done);
	kvfree(p->pages);
	p->pages = NULL;
	return ret;
}

/* Checks a segment table; returns the bytes it covers or -errno. */
static long long vgpu_segs_bytes(const struct vgpu_seg *segs, unsigned int n)
{
	u64 total = 0;
	unsigned int i;

	for (i = 0; i < n; i++) {
		if (segs[i].addr + segs[i].len < segs[i].addr)
			return -EINVAL;
		if (segs[i].len > VGPU_MAX_PINNED_BYTES)
			return -E2BIG;
		total += segs[i].len;
		if (total > VGPU_MAX_PINNED_BYTES)
			return -E2BIG;
	}
	return total;
}

/*
 * A synchronous request of @vf was answered into @resp: puts the file's first unreported
 * async failure in its place, and writes VGPU_RESP_FLAGS. The device answers a
 * session's requests in order, so every async request queued before this one has come
 * back by now.
 */
static void vgpu_report_async_error(struct vgpu_file *vf, u8 *resp)
{
	u32 flags = 0;

	spin_lock_irq(&vf->async_lock);
	if (vf->async_failed) {
		u32 own = get_unaligned_le32(resp + VGPU_RESP_STATUS);

		flags = VGPU_RESP_F_ASYNC_ERROR | min_t(u32, own, 0xff) << 8 |
			(u32)vf->async_opcode << 16;
		memcpy(resp + VGPU_RESP_STATUS, vf->async_error + VGPU_RESP_STATUS, 4);
		memcpy(resp + VGPU_RESP_DETAIL, vf->async_error + VGPU_RESP_DETAIL, 4);
		vf->async_failed = false;
	}
	spin_unlock_irq(&vf->async_lock);
	put_unaligned_le32(flags, resp + VGPU_RESP_FLAGS);
}

/* VGPU_IOC_SUBMIT, or VGPU_IOC_SUBMIT_POLL with @poll. */
static long vgpu_ioctl_submit(struct vgpu_file *vf, void __user *argp, bool poll)
{
	struct vgpu_device *vg = vf->vg;
	struct vgpu_seg *segs = NULL;
	struct vgpu_request *req;
	unsigned int nsegs, i, nout, nin, ndesc, poll_us = 0;
	struct vgpu_submit sub;
	long long bytes_in, bytes_out;
	bool abandoned;
	u16 opcode;
	long err;

	if (poll) {
		struct vgpu_submit_poll sp;

		if (copy_from_user(&sp, argp, sizeof(sp)))
			return -EFAULT;
		if (sp.reserved)
			return -EINVAL;
		sub = sp.submit;
		poll_us = min_t(u32, sp.poll_us, VGPU_POLL_MAX_US);
	} else if (copy_from_user(&sub, argp, sizeof(sub))) {
		return -EFAULT;
	}
	/* Every segment takes at least one descriptor besides header and response. */
	if (sub.num_in > vg->queue_size || sub.num_out > vg->queue_size ||
	    sub.num_in + sub.num_out + 2 > vg->queue_size)
		return -E2BIG;
	nsegs = sub.num_in + sub.num_out;

	req = vgpu_request_alloc(vg, nsegs, GFP_KERNEL);
	if (!req)
		return -ENOMEM;
	req->epoch = vf->epoch;
	if (copy_from_user(req->header, u64_to_user_ptr(sub.header), sizeof(req->header))) {
		err = -EFAULT;
		goto out;
	}
	opcode = get_unaligned_le16(req->header + VGPU_HDR_OPCODE);
	/* Driver-only operations: a process could name memory it does not own. */
	if (opcode == VGPU_OP_SESSION_OPEN || opcode == VGPU_OP_SESSION_CLOSE ||
	    opcode == VGPU_OP_HOST_REGISTER || opcode == VGPU_OP_HOST_UNREGISTER) {
		err = -EINVAL;
		goto out;
	}
	put_unaligned_le64(vf->session, req->header + VGPU_HDR_SESSION);

	if (nsegs) {
		segs = kvmalloc_array(nsegs, sizeof(*segs), GFP_KERNEL);
		if (!segs) {
			err = -ENOMEM;
			goto out;
		}
		if (copy_from_user(segs, u64_to_user_ptr(sub.in_segs),
				   array_size(sub.num_in, sizeof(*segs))) ||
		    copy_from_user(segs + sub.num_in, u64_to_user_ptr(sub.out_segs),
				   array_size(sub.num_out, sizeof(*segs)))) {
			err = -EFAULT;
			goto out;
		}
	}
	bytes_in = vgpu_segs_bytes(segs, sub.num_in);
	bytes_out = vgpu_segs_bytes(segs + sub.num_in, sub.num_out);
	if (bytes_in < 0 || bytes_out < 0) {
		err = bytes_in < 0 ? bytes_in : bytes_out;
		goto out;
	}
	if (bytes_in + bytes_out > VGPU_MAX_PINNED_BYTES) {
		err = -E2BIG;
		goto out;
	}

	/* Chain: header, readable segments, writable segments, response. */
	nout = 1;
	nin = 0;
	ndesc = 2;
	req->sgs[0] = &req->hdr_sg;
	for (i = 0; i < nsegs; i++) {
		struct vgpu_pinned *p = &req->pinned[req->nr_pinned];
		bool writable = i >= sub.num_in;

		if (!segs[i].len)
			continue;
		err = vgpu_pin(p, segs[i].addr, segs[i].len, writable);
		if (err)
			goto out;
		req->nr_pinned++;
		ndesc += p->sgt.orig_nents;
		if (ndesc > vg->queue_size) {
			err = -E2BIG;
			goto out;
		}
		req->sgs[nout + nin] = p->sgt.sgl;
		if (writable)
			nin++;
		else
			nout++;
	}
	req->sgs[nout + nin] = &req->resp_sg;
	nin++;

	err = vgpu_execute_poll(vg, req, nout, nin, poll_us, &abandoned);
	if (abandoned) {
		req = NULL;
		goto out;
	}
	if (err)
		goto out;
	if (req->used_len < VGPU_RESPONSE_HEADER_SIZE) {
		dev_warn_ratelimited(&vg->dev, "opcode %u: chain returned without a response\n",
				     opcode);
		err = -EIO;
		goto out;
	}
	vgpu_report_async_error(vf, req->response);
	if (copy_to_user(u64_to_user_ptr(sub.response), req->response, sizeof(req->response)))
		err = -EFAULT;

out:
	kvfree(segs);
	if (req)
		vgpu_request_free(req);
	return err;
}

/* The operations whose answer is only a status, which may be queued without waiting. */
static bool vgpu_async_opcode(u16 opcode)
{
	return opcode == VGPU_OP_LAUNCH || opcode == VGPU_OP_MEMSET ||
	       opcode == VGPU_OP_DTOD || opcode == VGPU_OP_HTOD;
}

/* Copies the readable segments into one kernel buffer and places it in the chain. */
static int vgpu_async_copy_payload(struct vgpu_request *req, const struct vgpu_seg *segs,
				   unsigned int nsegs, size_t bytes)
{
	size_t pos = 0;
	unsigned int i;

	req->payload = kvmalloc(bytes, GFP_KERNEL_ACCOUNT);
	if (!req->payload)
		return -ENOMEM;
	for (i = 0; i < nsegs; i++) {
		if (copy_from_user(req->payload + pos, u64_to_user_ptr(segs[i].addr), segs[i].len))
			return -EFAULT;
		pos += segs[i].len;
	}
	return vgpu_kbuf_sg(&req->payload_sgt, req->payload, bytes);
}

/*
 * VGPU_IOC_SUBMIT_ASYNC: queues a copy of the request and returns. The completion path
 * (vgpu_async_finish) keeps a failure for the next VGPU_IOC_SUBMIT and frees the
 * request; nothing here waits for the device to answer.
 */
static long vgpu_ioctl_submit_async(struct vgpu_file *vf, void __user *argp)
{
	struct vgpu_device *vg = vf->vg;
	struct vgpu_seg *segs = NULL;
	struct vgpu_request *req;
	struct vgpu_submit sub;
	unsigned int nout = 1;
	long long bytes;
	long err;

	if (copy_from_user(&sub, argp, sizeof(sub)))
		return -EFAULT;
	if (sub.num_out)
		return -EINVAL;
	if (sub.num_in > VGPU_ASYNC_MAX_SEGS)
		return -E2BIG;

	/* Header, payload, response. */
	req = vgpu_request_alloc(vg, 1, GFP_KERNEL);
	if (!req)
		return -ENOMEM;
	req->epoch = vf->epoch;
	if (copy_from_user(req->header, u64_to_user_ptr(sub.header), sizeof(req->header))) {
		err = -EFAULT;
		goto out;
	}
	if (!vgpu_async_opcode(get_unaligned_le16(req->header + VGPU_HDR_OPCODE))) {
		err = -EINVAL;
		goto out;
	}
	put_unaligned_le64(vf->session, req->header + VGPU_HDR_SESSION);

	if (sub.num_in) {
		segs = kmalloc_array(sub.num_in, sizeof(*segs), GFP_KERNEL);
		if (!segs) {
			err = -ENOMEM;
			goto out;
		}
		if (copy_from_user(segs, u64_to_user_ptr(sub.in_segs),
				   array_size(sub.num_in, sizeof(*segs)))) {
			err = -EFAULT;
			goto out;
		}
	}
	bytes = vgpu_segs_bytes(segs, sub.num_in);
	if (bytes < 0) {
		err = bytes;
		goto out;
	}
	if (bytes > VGPU_ASYNC_MAX_BYTES) {
		err = -E2BIG;
		goto out;
	}
	req->sgs[0] = &req->hdr_sg;
	if (bytes) {
		err = vgpu_async_copy_payload(req, segs, sub.num_in, bytes);
		if (err)
			goto out;
		req->sgs[nout++] = req->payload_sgt.sgl;
	}
	req->sgs[nout] = &req->resp_sg;

	/* A slot of the file's VGPU_ASYNC_MAX_INFLIGHT; every return frees one and wakes. */
	if (wait_event_interruptible(vf->async_wq,
				     atomic_add_unless(&vf->async_inflight, 1,
						       VGPU_ASYNC_MAX_INFLIGHT))) {
		err = -ERESTARTSYS;
		goto out;
	}
	kref_get(&vf->ref);
	req->async_vf = vf;
	err = vgpu_queue(vg, req, nout, 1);
	if (!err) {
		/* The completion path owns the request now. */
		kvfree(segs);
		return 0;
	}
	req->async_vf = NULL;
	kref_put(&vf->ref, vgpu_file_free);	/* not the last: the file holds one */
	atomic_dec(&vf->async_inflight);
	wake_up(&vf->async_wq);

out:
	kvfree(segs);
	vgpu_request_free(req);
	return err;
}

/* ---- config space ---- */

static int vgpu_read_config(struct vgpu_device *vg, u8 *cfg)
{
	int err = 0;

	mutex_lock(&vg->state_lock);
	if (vg->vdev)
		virtio_cread_bytes(vg->vdev, 0, cfg, VGPU_CONFIG_SIZE);
	else
		err = -ENODEV;
	mutex_unlock(&vg->state_lock);
	return err;
}

static long vgpu_ioctl_info(struct vgpu_device *vg, void __user *argp)
{
	struct vgpu_info info = {};
	int err;

	err = vgpu_read_config(vg, info.config);
	if (err)
		return err;
	info.queue_size = vg->queue_size;
	if (copy_to_user(argp, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

/* ---- file operations ---- */

static int vgpu_open(struct inode *inode, struct file *file)
{
	/* chrdev_open holds the cdev, and through it vg->dev, for the duration. */
	struct vgpu_device *vg = container_of(inode->i_cdev, struct vgpu_device, cdev);
	struct vgpu_file *vf;
	int err;

	vf = kzalloc(sizeof(*vf), GFP_KERNEL);
	if (!vf)
		return -ENOMEM;
	kref_init(&vf->ref);
	vf->vg = vg;
	atomic_set(&vf->async_inflight, 0);
	init_waitqueue_head(&vf->async_wq);
	spin_lock_init(&vf->async_lock);
	get_device(&vg->dev);
	err = vgpu_session_open(vg, vf);
	if (err) {
		put_device(&vg->dev);
		kfree(vf);
		return err;
	}
	atomic_inc(&vg->sessions);
	file->private_data = vf;
	return nonseekable_open(inode, file);
}

static int vgpu_release(struct inode *inode, struct file *file)
{
	struct vgpu_file *vf = file->private_data;
	struct vgpu_device *vg = vf->vg;

	/*
	 * Async requests still in the device come before the close in the ring. They hold
	 * @vf (and the device) until they come back or a reset or removal fails them, so
	 * nothing here waits for them.
	 */
	vgpu_session_close(vg, vf);
	atomic_dec(&vg->sessions);
	kref_put(&vf->ref, vgpu_file_free);
	return 0;
}

static long vgpu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct vgpu_file *vf = file->private_data;
	void __user *argp = (void __user *)arg;

	switch (cmd) {
	case VGPU_IOC_SUBMIT:
		return vgpu_ioctl_submit(vf, argp, false);
	case VGPU_IOC_SUBMIT_POLL:
		return vgpu_ioctl_submit(vf, argp, true);
	case VGPU_IOC_SUBMIT_ASYNC:
		return vgpu_ioctl_submit_async(vf, argp);
	case VGPU_IOC_INFO:
		return vgpu_ioctl_info(vf->vg, argp);
	case VGPU_IOC_SESSION:
		return put_user(vf->session, (__u64 __user *)argp);
	default:
		return -ENOTTY;
	}
}

/* ---- host buffers (mmap) ---- */

/* The pages may go: nothing on the device refers to them any more. */
static void vgpu_hostbuf_free(struct vgpu_hostbuf *hb)
{
	unsigned long i;

	/* Pages still pinned by an in-flight request keep their own reference. */
	for (i = 0; i < hb->npages; i++)
		__free_page(hb->pages[i]);
	if (hb->file)
		fput(hb->file);
	kvfree(hb);
}

/* Is @vf's session still the device's? A reset or removal dropped it and all it held. */
static bool vgpu_session_alive(struct vgpu_file *vf)
{
	struct vgpu_device *vg = vf->vg;
	bool alive;

	spin_lock_irq(&vg->vq_lock);
	alive = vg->live && vg->epoch == vf->epoch;
	spin_unlock_irq(&vg->vq_lock);
	return alive;
}

static void vgpu_hostreg_report(struct vgpu_device *vg, int state, u32 status)
{
	if (atomic_xchg(&vg->hostreg, state) == state)
		return;
	if (state == VGPU_HOSTREG_SUPPORTED)
		dev_info(&vg->dev, "host buffer registration: supported\n");
	else
		dev_info(&vg->dev, "host buffer registration: unsupported (status %u)\n", status);
}

/*
 * The outcome of a HOST_REGISTER that went to the device (@err from vgpu_execute).
 * Returns whether the device registered the buffer.
 */
static bool vgpu_host_register_result(struct vgpu_request *req, int err)
{
	struct vgpu_device *vg = req->vg;
	u32 status;

	if (!err && req->used_len < VGPU_RESPONSE_HEADER_SIZE)
		err = -EIO;
	if (err) {
		dev_dbg(&vg->dev, "host buffer %llu: not registered (%d)\n", req->hb->id, err);
		return false;
	}
	status = get_unaligned_le32(req->response + VGPU_RESP_STATUS);
	if (status == VGPU_STATUS_UNSUPPORTED || status == VGPU_STATUS_UNKNOWN_OPCODE) {
		/* An older device: the session's later buffers take the ordinary path too. */
		WRITE_ONCE(req->hb->vf->hostreg_unsupported, true);
		vgpu_hostreg_report(vg, VGPU_HOSTREG_UNSUPPORTED, status);
		return false;
	}
	if (status != VGPU_STATUS_OK) {
		/* About this buffer (a limit, memory), not about what the device can do. */
		dev_dbg(&vg->dev, "host buffer %llu: not registered (status %u)\n", req->hb->id,
			status);
		return false;
	}
	vgpu_hostreg_report(vg, VGPU_HOSTREG_SUPPORTED, status);
	return true;
}

static void vgpu_hostbuf_release(struct kref *ref);

/* An abandoned HOST_REGISTER came back: settle the buffer, drop the request's reference. */
static void vgpu_host_register_reaped(struct vgpu_request *req)
{
	struct vgpu_hostbuf *hb = req->hb;

	hb->registered = vgpu_host_register_result(req, req->error);
	vgpu_request_free(req);
	kref_put(&hb->ref, vgpu_hostbuf_release);
}

/*
 * Describes @hb to the device (HOST_REGISTER in @vf's session) and waits for the
 * answer. The buffer works either way: unregistered, copies from it take the ordinary
 * path. Sets hb->registered when the device may hold the buffer.
 */
static void vgpu_host_register(struct vgpu_file *vf, struct vgpu_hostbuf *hb)
{
	struct vgpu_device *vg = vf->vg;
	struct vgpu_request *req;
	unsigned long nchunks, i, c;
	u64 len = (u64)hb->npages << PAGE_SHIFT;
	phys_addr_t end = 0;
	bool abandoned;
	u8 *chunk;
	int err;

	if (!vg->phys_addressing || len > VGPU_MAX_HOST_BUFFER_BYTES ||
	    READ_ONCE(vf->hostreg_unsupported) || !vgpu_session_alive(vf))
		return;

	/* The device sees guest-physical addresses (no IOMMU): coalesce adjacent pages. */
	nchunks = 0;
	for (i = 0; i < hb->npages; i++) {
		if (!i || page_to_phys(hb->pages[i]) != end)
			nchunks++;
		end = page_to_phys(hb->pages[i]) + PAGE_SIZE;
	}

	/* Header, the chunk list, response. */
	req = vgpu_request_alloc(vg, 1, GFP_KERNEL);
	if (!req)
		return;
	req->epoch = vf->epoch;
	req->hb = hb;
	req->payload = kvmalloc_array(nchunks, VGPU_HOST_CHUNK_SIZE, GFP_KERNEL);
	if (!req->payload)
		goto out;
	chunk = req->payload;
	c = 0;
	for (i = 0; i < hb->npages; i++) {
		phys_addr_t addr = page_to_phys(hb->pages[i]);

		if (i && addr == end) {
			put_unaligned_le64(get_unaligned_le64(chunk - 8) + PAGE_SIZE, chunk - 8);
		} else {
			put_unaligned_le64(addr, chunk);
			put_unaligned_le64(PAGE_SIZE, chunk + 8);
			chunk += VGPU_HOST_CHUNK_SIZE;
			c++;
		}
		end = addr + PAGE_SIZE;
	}
	WARN_ON_ONCE(c != nchunks);
	err = vgpu_kbuf_sg(&req->payload_sgt, req->payload, nchunks * VGPU_HOST_CHUNK_SIZE);
	if (err)
		goto out;
	if (req->payload_sgt.orig_nents + 2 > vg->queue_size) {
		dev_dbg(&vg->dev, "host buffer of %lu chunks: list too long to register\n",
			nchunks);
		goto out;
	}

	hb->id = atomic64_inc_return(&vf->hostbuf_ids);
	vgpu_fill_header(req, VGPU_OP_HOST_REGISTER, vf->session);
	put_unaligned_le64(hb->id, req->header + VGPU_HDR_ARGS);
	put_unaligned_le64(len, req->header + VGPU_HDR_ARGS + 8);
	put_unaligned_le64(nchunks, req->header + VGPU_HDR_ARGS + 16);
	req->sgs[0] = &req->hdr_sg;
	req->sgs[1] = req->payload_sgt.sgl;
	req->sgs[2] = &req->resp_sg;

	/*
	 * Killed while the device holds it, the request (and its chunk list) goes to the
	 * completion path, which settles hb->registered: its reference keeps the pages
	 * (and the unregistration that must follow the answer) until then.
	 */
	kref_get(&hb->ref);
	hb->registered = true;
	err = vgpu_execute(vg, req, 2, 1, &abandoned);
	if (abandoned)
		return;
	hb->registered = vgpu_host_register_result(req, err);
	/* Not the last reference: the caller holds one. */
	kref_put(&hb->ref, vgpu_hostbuf_release);
out:
	vgpu_request_free(req);
}

/* The device answered HOST_UNREGISTER, or never will: the pages may go. */
static void vgpu_host_unregister_done(struct vgpu_request *req, int err)
{
	struct vgpu_hostbuf *hb = req->hb;
	struct vgpu_device *vg = req->vg;
	u32 status;

	if (!err && req->used_len < VGPU_RESPONSE_HEADER_SIZE)
		err = -EIO;
	if (!err) {
		status = get_unaligned_le32(req->response + VGPU_RESP_STATUS);
		/* A restarted backend or a replaced worker lost the session and its buffers. */
		if (status == VGPU_STATUS_INVALID_SESSION || status == VGPU_STATUS_DEVICE_LOST)
			dev_dbg(&vg->dev, "host buffer %llu: unregister: no session (status %u)\n",
				hb->id, status);
		else if (status != VGPU_STATUS_OK)
			dev_warn_ratelimited(&vg->dev, "host buffer %llu: unregister: status %u\n",
					     hb->id, status);
	} else if (err != -ENODEV) {
		/* -ENODEV: reset or removed, the host dropped the session's buffers. */
		dev_warn_ratelimited(&vg->dev, "host buffer %llu: unregister failed (%d)\n",
				     hb->id, err);
	}
	vgpu_request_free(req);
	vgpu_hostbuf_free(hb);
}

static void vgpu_unregister_fn(struct work_struct *work)
{
	struct vgpu_request *req = container_of(work, struct vgpu_request, work);
	bool abandoned;
	int err;

	/* A worker takes no signals: this waits until the device answers or goes away. */
	err = vgpu_execute(req->vg, req, 1, 1, &abandoned);
	if (!abandoned)
		vgpu_host_unregister_done(req, err);
}

/*
 * The last reference is gone (last VMA closed, with mmap_lock held; or the completion
 * path of an abandoned HOST_REGISTER). A registered buffer is unregistered first and
 * freed once the device has answered.
 */
static void vgpu_hostbuf_release(struct kref *ref)
{
	struct vgpu_hostbuf *hb = container_of(ref, struct vgpu_hostbuf, ref);
	struct vgpu_file *vf = hb->vf;
	struct vgpu_request *req;
	bool abandoned;
	int err;

	/* After a reset or removal the host holds none of the session's buffers. */
	if (!hb->registered || !vgpu_session_alive(vf)) {
		vgpu_hostbuf_free(hb);
		return;
	}
	/* Small and must not fail: the pages cannot be freed before the answer. */
	req = vgpu_request_alloc(vf->vg, 0, GFP_KERNEL | __GFP_NOFAIL);
	req->epoch = vf->epoch;
	req->hb = hb;
	vgpu_fill_header(req, VGPU_OP_HOST_UNREGISTER, vf->session);
	put_unaligned_le64(hb->id, req->header + VGPU_HDR_ARGS);
	req->sgs[0] = &req->hdr_sg;
	req->sgs[1] = &req->resp_sg;
	/* A reset or removal fails it with -ENODEV: this never outwaits the device. */
	err = vgpu_execute(vf->vg, req, 1, 1, &abandoned);
	if (abandoned)
		return;		/* the completion path frees the pages after the answer */
	if (err == -EINTR) {
		/* Killed while the queue was full: let a worker send it, then free. */
		INIT_WORK(&req->work, vgpu_unregister_fn);
		queue_work(vgpu_wq, &req->work);
		return;
	}
	vgpu_host_unregister_done(req, err);
}

static struct vgpu_hostbuf *vgpu_hostbuf_alloc(unsigned long npages)
{
	unsigned int order = VGPU_MAX_ORDER;
	struct vgpu_hostbuf *hb;
	unsigned long done = 0, i;

	hb = kvzalloc(struct_size(hb, pages, npages), GFP_KERNEL);
	if (!hb)
		return NULL;
	kref_init(&hb->ref);
	while (done < npages) {
		gfp_t gfp = GFP_HIGHUSER | __GFP_ZERO | __GFP_ACCOUNT | __GFP_NOWARN;
		struct page *page;

		while ((1UL << order) > npages - done)
			order--;
		if (order)
			gfp |= __GFP_NORETRY;
		page = alloc_pages(gfp, order);
		if (!page) {
			if (!order)
				goto fail;
			order--;
			continue;
		}
		/* Order-0 pages can be mapped, pinned and freed one by one. */
		if (order)
			split_page(page, order);
		/*
		 * One buddy allocation never crosses a memory section, so its struct
		 * pages are contiguous in the memmap on every memory model and kernel:
		 * page + i is the i-th page. (nth_page(), which Linux 6.18 removed,
		 * was only ever needed for ranges that may cross a section.)
		 */
		for (i = 0; i < (1UL << order); i++)
			hb->pages[done + i] = page + i;
		done += 1UL << order;
	}
	hb->npages = npages;
	return hb;

fail:
	hb->npages = done;
	vgpu_hostbuf_free(hb);
	return NULL;
}

static void vgpu_vm_open(struct vm_area_struct *vma)
{
	struct vgpu_hostbuf *hb = vma->vm_private_data;

	kref_get(&hb->ref);
}

static void vgpu_vm_close(struct vm_area_struct *vma)
{
	struct vgpu_hostbuf *hb = vma->vm_private_data;

	/* May sleep until the device answers HOST_UNREGISTER (mmap_lock is held). */
	kref_put(&hb->ref, vgpu_hostbuf_release);
}

/* Pages are mapped at mmap time; this only refills ptes that were zapped since. */
static vm_fault_t vgpu_vm_fault(struct vm_fault *vmf)
{
	struct vgpu_hostbuf *hb = vmf->vma->vm_private_data;

	if (vmf->pgoff >= hb->npages)
		return VM_FAULT_SIGBUS;
	vmf->page = hb->pages[vmf->pgoff];
	get_page(vmf->page);
	return 0;
}

static const struct vm_operations_struct vgpu_vm_ops = {
	.open = vgpu_vm_open,
	.close = vgpu_vm_close,
	.fault = vgpu_vm_fault,
};

static int vgpu_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct vgpu_file *vf = file->private_data;
	unsigned long npages = vma_pages(vma);
	struct vgpu_hostbuf *hb;
	int err;

	if (vma->vm_pgoff || !(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if (npages > totalram_pages() / 2)
		return -ENOMEM;
	hb = vgpu_hostbuf_alloc(npages);
	if (!hb)
		return -ENOMEM;
	/*
	 * Every VMA holds the file too, but the completion path of an abandoned
	 * HOST_REGISTER may outlive them and still needs the session.
	 */
	hb->file = get_file(file);
	hb->vf = vf;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_DONTEXPAND | VM_DONTDUMP | VM_DONTCOPY);
#else
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP | VM_DONTCOPY;
#endif
	err = vm_map_pages_zero(vma, hb->pages, npages);
	if (err) {
		kref_put(&hb->ref, vgpu_hostbuf_release);
		return err;
	}
	/* Best effort: an unregistered buffer still works, through the ordinary path. */
	vgpu_host_register(vf, hb);
	vma->vm_private_data = hb;
	vma->vm_ops = &vgpu_vm_ops;
	return 0;
}

static const struct file_operations vgpu_fops = {
	.owner = THIS_MODULE,
	.open = vgpu_open,
	.release = vgpu_release,
	.unlocked_ioctl = vgpu_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = vgpu_mmap,
};

/* ---- sysfs: /sys/class/vgpu/vgpuN/ ---- */

static struct vgpu_device *to_vgpu(struct device *dev)
{
	return container_of(dev, struct vgpu_device, dev);
}

static ssize_t vgpu_show_config(struct device *dev, char *buf,
				ssize_t (*show)(const u8 *cfg, char *buf))
{
	u8 cfg[VGPU_CONFIG_SIZE];
	int err;

	err = vgpu_read_config(to_vgpu(dev), cfg);
	if (err)
		return err;
	return show(cfg, buf);
}

#define VGPU_CONFIG_ATTR(_name, _expr)						\
static ssize_t _name##_config(const u8 *cfg, char *buf)				\
{										\
	return _expr;								\
}										\
static ssize_t _name##_show(struct device *dev, struct device_attribute *attr,	\
			    char *buf)						\
{										\
	return vgpu_show_config(dev, buf, _name##_config);			\
}										\
static DEVICE_ATTR_RO(_name)

VGPU_CONFIG_ATTR(name, sysfs_emit(buf, "%.*s\n",
				  (int)strnlen(cfg + VGPU_CFG_NAME, VGPU_CFG_NAME_SIZE),
				  cfg + VGPU_CFG_NAME));
VGPU_CONFIG_ATTR(version, sysfs_emit(buf, "%u\n", get_unaligned_le32(cfg + VGPU_CFG_VERSION)));
VGPU_CONFIG_ATTR(cc, sysfs_emit(buf, "%u.%u\n", get_unaligned_le16(cfg + VGPU_CFG_CC_MAJOR),
				get_unaligned_le16(cfg + VGPU_CFG_CC_MINOR)));
VGPU_CONFIG_ATTR(mem_quota,
		 sysfs_emit(buf, "%llu\n", get_unaligned_le64(cfg + VGPU_CFG_MEM_QUOTA)));
VGPU_CONFIG_ATTR(device_memory,
		 sysfs_emit(buf, "%llu\n", get_unaligned_le64(cfg + VGPU_CFG_DEVICE_MEMORY)));
VGPU_CONFIG_ATTR(multiprocessors,
		 sysfs_emit(buf, "%u\n", get_unaligned_le32(cfg + VGPU_CFG_MULTIPROCESSORS)));
VGPU_CONFIG_ATTR(max_sessions,
		 sysfs_emit(buf, "%u\n", get_unaligned_le32(cfg + VGPU_CFG_MAX_SESSIONS)));
VGPU_CONFIG_ATTR(max_request_bytes,
		 sysfs_emit(buf, "%u\n", get_unaligned_le32(cfg + VGPU_CFG_MAX_REQUEST_BYTES)));
/* Which of the host's GPUs the device is placed on; 0 from hosts that predate the field. */
VGPU_CONFIG_ATTR(gpu, sysfs_emit(buf, "%u\n", get_unaligned_le32(cfg + VGPU_CFG_GPU)));

static ssize_t executor_config(const u8 *cfg, char *buf)
{
	u32 kind = get_unaligned_le32(cfg + VGPU_CFG_EXECUTOR);

	switch (kind) {
	case VGPU_EXECUTOR_CPU:
		return sysfs_emit(buf, "cpu\n");
	case VGPU_EXECUTOR_CUDA:
		return sysfs_emit(buf, "cuda\n");
	default:
		return sysfs_emit(buf, "unknown (%u)\n", kind);
	}
}

static ssize_t executor_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return vgpu_show_config(dev, buf, executor_config);
}
static DEVICE_ATTR_RO(executor);

static ssize_t sessions_open_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&to_vgpu(dev)->sessions));
}
static DEVICE_ATTR_RO(sessions_open);

static ssize_t queue_size_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n", to_vgpu(dev)->queue_size);
}
static DEVICE_ATTR_RO(queue_size);

static struct attribute *vgpu_attrs[] = {
	&dev_attr_name.attr,
	&dev_attr_executor.attr,
	&dev_attr_version.attr,
	&dev_attr_cc.attr,
	&dev_attr_mem_quota.attr,
	&dev_attr_device_memory.attr,
	&dev_attr_multiprocessors.attr,
	&dev_attr_max_sessions.attr,
	&dev_attr_max_request_bytes.attr,
	&dev_attr_gpu.attr,
	&dev_attr_sessions_open.attr,
	&dev_attr_queue_size.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vgpu);

/* ---- virtio driver ---- */

/* Called with state_lock held. */
static int vgpu_init_vq(struct vgpu_device *vg)
{
	struct virtqueue *vq;

	vq = virtio_find_single_vq(vg->vdev, vgpu_vq_done, "requests");
	if (IS_ERR(vq))
		return PTR_ERR(vq);
	spin_lock_irq(&vg->vq_lock);
	vg->vq = vq;
	vg->queue_size = virtqueue_get_vring_size(vq);
	spin_unlock_irq(&vg->vq_lock);
	return 0;
}

static void vgpu_go_live(struct vgpu_device *vg)
{
	virtio_device_ready(vg->vdev);
	spin_lock_irq(&vg->vq_lock);
	vg->live = true;
	spin_unlock_irq(&vg->vq_lock);
}

/*
 * Stops the device and fails everything it held with -ENODEV. After this no request
 * can be queued, no waiter sleeps, and the device touches no guest memory. Called
 * with state_lock held.
 */
static void vgpu_teardown_vq(struct vgpu_device *vg)
{
	struct vgpu_request *req, *tmp;
	unsigned int len;

	spin_lock_irq(&vg->vq_lock);
	vg->live = false;
	vg->epoch++;
	spin_unlock_irq(&vg->vq_lock);
	/* Wait out submitters between virtqueue_add_sgs and their notify. */
	down_write(&vg->notify_sem);
	up_write(&vg->notify_sem);

	/* Also synchronizes with the interrupt: no callback runs after this. */
	virtio_reset_device(vg->vdev);

	spin_lock_irq(&vg->vq_lock);
	/* Deliver what the device finished before the reset, fail the rest. */
	while ((req = virtqueue_get_buf(vg->vq, &len)))
		vgpu_finish_locked(vg, req, 0, len);
	list_for_each_entry_safe(req, tmp, &vg->inflight, node)
		vgpu_finish_locked(vg, req, -ENODEV, 0);
	vg->space_gen++;
	vg->vq = NULL;
	spin_unlock_irq(&vg->vq_lock);
	wake_up_all(&vg->space_wq);

	vg->vdev->config->del_vqs(vg->vdev);
}

static void vgpu_device_release(struct device *dev)
{
	struct vgpu_device *vg = to_vgpu(dev);

	ida_free(&vgpu_ida, vg->index);
	kfree(vg);
}

static int vgpu_probe(struct virtio_device *vdev)
{
	u8 cfg[VGPU_CONFIG_SIZE];
	struct vgpu_device *vg;
	u32 magic, version;
	int index, err;

	virtio_cread_bytes(vdev, 0, cfg, sizeof(cfg));
	magic = get_unaligned_le32(cfg + VGPU_CFG_MAGIC);
	version = get_unaligned_le32(cfg + VGPU_CFG_VERSION);
	if (magic != VGPU_CONFIG_MAGIC) {
		dev_err(&vdev->dev, "config space magic %#010x is not a vGPU device's (config_size=%d?)\n",
			magic, VGPU_CONFIG_SIZE);
		return -ENODEV;
	}
	if (version != VGPU_PROTOCOL_VERSION) {
		dev_err(&vdev->dev, "device speaks protocol version %u, this driver %u\n",
			version, VGPU_PROTOCOL_VERSION);
		return -ENODEV;
	}

	index = ida_alloc_max(&vgpu_ida, VGPU_MAX_DEVICES - 1, GFP_KERNEL);
	if (index < 0)
		return index;
	vg = kzalloc(sizeof(*vg), GFP_KERNEL);
	if (!vg) {
		ida_free(&vgpu_ida, index);
		return -ENOMEM;
	}
	vg->index = index;
	mutex_init(&vg->state_lock);
	spin_lock_init(&vg->vq_lock);
	INIT_LIST_HEAD(&vg->inflight);
	init_waitqueue_head(&vg->space_wq);
	init_rwsem(&vg->notify_sem);
	atomic_set(&vg->sessions, 0);
	atomic_set(&vg->hostreg, VGPU_HOSTREG_UNKNOWN);
	/* Without VIRTIO_F_ACCESS_PLATFORM the ring gives the device physical addresses. */
	vg->phys_addressing = virtio_has_dma_quirk(vdev);
	vg->vdev = vdev;
	vdev->priv = vg;

	/* From here on the device's refcount owns vg: errors put it. */
	device_initialize(&vg->dev);
	vg->dev.class = vgpu_class;
	vg->dev.parent = &vdev->dev;
	vg->dev.devt = MKDEV(MAJOR(vgpu_devt), index);
	vg->dev.groups = vgpu_groups;
	vg->dev.release = vgpu_device_release;
	err = dev_set_name(&vg->dev, "vgpu%d", index);
	if (err)
		goto put;

	mutex_lock(&vg->state_lock);
	err = vgpu_init_vq(vg);
	if (!err)
		vgpu_go_live(vg);
	mutex_unlock(&vg->state_lock);
	if (err)
		goto put;

	cdev_init(&vg->cdev, &vgpu_fops);
	vg->cdev.owner = THIS_MODULE;
	err = cdev_device_add(&vg->cdev, &vg->dev);
	if (err)
		goto teardown;

	dev_info(&vg->dev, "%.*s, queue size %u\n",
		 (int)strnlen(cfg + VGPU_CFG_NAME, VGPU_CFG_NAME_SIZE), cfg + VGPU_CFG_NAME,
		 vg->queue_size);
	return 0;

teardown:
	mutex_lock(&vg->state_lock);
	vgpu_teardown_vq(vg);
	mutex_unlock(&vg->state_lock);
put:
	put_device(&vg->dev);
	return err;
}

static void vgpu_remove(struct virtio_device *vdev)
{
	struct vgpu_device *vg = vdev->priv;

	/* No new opens and no sysfs readers; open files keep vg alive. */
	cdev_device_del(&vg->cdev, &vg->dev);
	mutex_lock(&vg->state_lock);
	if (vg->vq)
		vgpu_teardown_vq(vg);
	vg->vdev = NULL;
	mutex_unlock(&vg->state_lock);
	put_device(&vg->dev);
}

#ifdef CONFIG_PM_SLEEP
/* The host drops a reset VM's sessions, so files opened before a freeze get -ENODEV. */
static int vgpu_freeze(struct virtio_device *vdev)
{
	struct vgpu_device *vg = vdev->priv;

	mutex_lock(&vg->state_lock);
	if (vg->vq)
		vgpu_teardown_vq(vg);
	mutex_unlock(&vg->state_lock);
	return 0;
}

static int vgpu_restore(struct virtio_device *vdev)
{
	struct vgpu_device *vg = vdev->priv;
	int err;

	mutex_lock(&vg->state_lock);
	err = vgpu_init_vq(vg);
	if (!err)
		vgpu_go_live(vg);
	mutex_unlock(&vg->state_lock);
	return err;
}
#endif

static struct virtio_driver vgpu_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = id_table,
	.probe = vgpu_probe,
	.remove = vgpu_remove,
#ifdef CONFIG_PM_SLEEP
	.freeze = vgpu_freeze,
	.restore = vgpu_restore,
#endif
};

static int __init vgpu_init(void)
{
	int err;

	if (!virtio_id || virtio_id == VIRTIO_DEV_ANY_ID) {
		pr_err("vgpu: virtio_id=%u is not a device ID\n", virtio_id);
		return -EINVAL;
	}
	id_table[0].device = virtio_id;

	err = alloc_chrdev_region(&vgpu_devt, 0, VGPU_MAX_DEVICES, "vgpu");
	if (err)
		return err;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	vgpu_class = class_create("vgpu");
#else
	vgpu_class = class_create(THIS_MODULE, "vgpu");
#endif
	if (IS_ERR(vgpu_class)) {
		err = PTR_ERR(vgpu_class);
		goto unregister_region;
	}
	vgpu_wq = alloc_workqueue("vgpu", WQ_UNBOUND, 0);
	if (!vgpu_wq) {
		err = -ENOMEM;
		goto destroy_class;
	}
	err = register_virtio_driver(&vgpu_driver);
	if (err)
		goto destroy_wq;
	return 0;

destroy_wq:
	destroy_workqueue(vgpu_wq);
destroy_class:
	class_destroy(vgpu_class);
unregister_region:
	unregister_chrdev_region(vgpu_devt, VGPU_MAX_DEVICES);
	return err;
}

static void __exit vgpu_exit(void)
{
	unregister_virtio_driver(&vgpu_driver);
	/* Runs the last deferred closes and reaps, which drop the last device references. */
	destroy_workqueue(vgpu_wq);
	class_destroy(vgpu_class);
	unregister_chrdev_region(vgpu_devt, VGPU_MAX_DEVICES);
	ida_destroy(&vgpu_ida);
}

module_init(vgpu_init);
module_exit(vgpu_exit);

MODULE_DESCRIPTION("Guest driver for the mediated vGPU virtio device");
MODULE_LICENSE("GPL");
