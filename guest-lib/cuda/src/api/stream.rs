// SPDX-License-Identifier: Apache-2.0
//! Streams and events over one in-order queue per context.
//!
//! A context's work runs in the order it was sent, whatever its stream, which satisfies
//! CUDA's stream semantics (it serializes what CUDA may overlap). So synchronizing a
//! stream is a SYNC of its context, a query is a SYNC unless the context is known idle,
//! and waiting on an event costs nothing. An event made with `CU_EVENT_DISABLE_TIMING`
//! records the context's request count (no request); synchronizing or querying it sends
//! a SYNC only when no SYNC has covered that count since. A timing event sends a SYNC
//! when recorded and stamps the time it returns: the moment the stream reached the
//! event plus one round trip.

use std::ffi::{c_float, c_int, c_uint, c_ulonglong, c_void};
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::{handle, id, invalid, out};
use crate::api::context::clamp_priority;
use crate::state::{driver, lock, next_id, Event, Recorded, StreamRef};
use crate::types::*;
use crate::{guard, Fail, Res};

/// `CU_EVENT_DEFAULT | BLOCKING_SYNC | DISABLE_TIMING | INTERPROCESS`.
const EVENT_FLAGS: c_uint = 0x7;
const CU_EVENT_INTERPROCESS: c_uint = 0x4;
/// `CU_STREAM_CAPTURE_STATUS_NONE`.
const CAPTURE_STATUS_NONE: c_int = 0;

fn create(phstream: *mut CUstream, flags: c_uint, priority: c_int) -> Res<()> {
    if phstream.is_null() || flags & !CU_STREAM_NON_BLOCKING != 0 {
        return Err(invalid());
    }
    let d = driver()?;
    let ctx = d.current()?;
    let s = d.add_stream(&ctx, flags, clamp_priority(priority));
    // SAFETY: checked non-NULL; writable by NVIDIA's contract.
    unsafe { out(phstream, handle(s)) }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(phstream: *mut CUstream, flags: c_uint) -> CUresult {
    guard("cuStreamCreate", || create(phstream, flags, 0))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    phstream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    guard("cuStreamCreateWithPriority", || {
        create(phstream, flags, priority)
    })
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    guard("cuStreamDestroy", || driver()?.remove_stream(id(stream)))
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy(stream: CUstream) -> CUresult {
    cuStreamDestroy_v2(stream)
}

fn stream(s: CUstream) -> Res<StreamRef> {
    driver()?.stream(s)
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: CUstream) -> CUresult {
    guard("cuStreamSynchronize", || stream(s)?.ctx.sync())
}

/// Done once a SYNC says so: CUDA_SUCCESS, or the context's failure.
#[no_mangle]
pub extern "C" fn cuStreamQuery(s: CUstream) -> CUresult {
    guard("cuStreamQuery", || {
        let ctx = stream(s)?.ctx;
        ctx.sync_through(ctx.sequence())
    })
}

/// Nothing to wait for: the context's work runs in order.
#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(s: CUstream, event: CUevent, _flags: c_uint) -> CUresult {
    guard("cuStreamWaitEvent", || {
        stream(s)?;
        driver()?
            .events
            .get(id(event))
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx(s: CUstream, pctx: *mut CUcontext) -> CUresult {
    guard("cuStreamGetCtx", || {
        let ctx = stream(s)?.ctx;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(pctx, handle(ctx.id)) }
    })
}

/// A stream's context; streams here never belong to a green context.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx_v2(
    s: CUstream,
    pctx: *mut CUcontext,
    pgreen: *mut CUgreenCtx,
) -> CUresult {
    guard("cuStreamGetCtx_v2", || {
        let ctx = stream(s)?.ctx;
        // SAFETY: NVIDIA's contract for the out-parameters.
        unsafe {
            out(pctx, handle(ctx.id))?;
            out(pgreen, std::ptr::null_mut())
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetDevice(s: CUstream, device: *mut CUdevice) -> CUresult {
    guard("cuStreamGetDevice", || {
        let ctx = stream(s)?.ctx;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(device, ctx.device as CUdevice) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetFlags(s: CUstream, flags: *mut c_uint) -> CUresult {
    guard("cuStreamGetFlags", || {
        let f = stream(s)?.stream.map_or(0, |s| s.flags);
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(flags, f) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(s: CUstream, priority: *mut c_int) -> CUresult {
    guard("cuStreamGetPriority", || {
        let p = stream(s)?.stream.map_or(0, |s| s.priority);
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(priority, p) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetId(s: CUstream, stream_id: *mut c_ulonglong) -> CUresult {
    guard("cuStreamGetId", || {
        let r = stream(s)?;
        // The default streams: the context's id, distinct from every stream's.
        let v = r.stream.map_or(r.ctx.id, |s| s.id);
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(stream_id, v) }
    })
}

/// Never capturing: graphs are not offered.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(s: CUstream, status: *mut c_int) -> CUresult {
    guard("cuStreamIsCapturing", || {
        stream(s)?;
        // SAFETY: NVIDIA's contract for the out-parameter.
        unsafe { out(status, CAPTURE_STATUS_NONE) }
    })
}

/// Runs `f(data)` once the stream's earlier work has finished: after a SYNC, on the
/// calling thread.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(s: CUstream, f: CUhostFn, data: *mut c_void) -> CUresult {
    guard("cuLaunchHostFunc", || {
        let f = f.ok_or_else(invalid)?;
        stream(s)?.ctx.sync()?;
        // SAFETY: the caller's function with its own data, called as CUDA would.
        unsafe { f(data) };
        Ok(())
    })
}

/// Runs the callback once the stream's earlier work has finished (after a SYNC, on the
/// calling thread), with the context's status.
#[no_mangle]
pub unsafe extern "C" fn cuStreamAddCallback(
    s: CUstream,
    callback: CUstreamCallback,
    data: *mut c_void,
    flags: c_uint,
) -> CUresult {
    guard("cuStreamAddCallback", || {
        let cb = callback.ok_or_else(invalid)?;
        if flags != 0 {
            return Err(invalid());
        }
        let status = match stream(s)?.ctx.sync() {
            Ok(()) => CUDA_SUCCESS,
            Err(Fail(code)) => code,
        };
        // SAFETY: the caller's callback with its own data, called as CUDA would.
        unsafe { cb(s, status, data) };
        Ok(())
    })
}

// ---- events ----

fn event(e: CUevent) -> Res<Arc<Event>> {
    driver()?
        .events
        .get(id(e))
        .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(phevent: *mut CUevent, flags: c_uint) -> CUresult {
    guard("cuEventCreate", || {
        let d = driver()?;
        d.current()?;
        if phevent.is_null() || flags & !EVENT_FLAGS != 0 {
            return Err(invalid());
        }
        if flags & CU_EVENT_INTERPROCESS != 0 {
            return Err(Fail(CUDA_ERROR_NOT_SUPPORTED));
        }
        let ev = next_id();
        d.events.insert(
            ev,
            Arc::new(Event {
                flags,
                recorded: std::sync::Mutex::new(None),
            }),
        );
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(phevent, handle(ev)) }
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(e: CUevent) -> CUresult {
    guard("cuEventDestroy", || {
        driver()?
            .events
            .remove(id(e))
            .map(drop)
            .ok_or(Fail(CUDA_ERROR_INVALID_HANDLE))
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy(e: CUevent) -> CUresult {
    cuEventDestroy_v2(e)
}

fn record(e: CUevent, s: CUstream) -> Res<()> {
    let ev = event(e)?;
    let ctx = stream(s)?.ctx;
    let at = if ev.timing() {
        ctx.sync()?;
        Some(Instant::now())
    } else {
        None
    };
    *lock(&ev.recorded) = Some(Recorded {
        ctx: Arc::downgrade(&ctx),
        seq: ctx.sequence(),
        at,
    });
    Ok(())
}

#[no_mangle]
pub extern "C" fn cuEventRecord(e: CUevent, s: CUstream) -> CUresult {
    guard("cuEventRecord", || record(e, s))
}

#[no_mangle]
pub extern "C" fn cuEventRecordWithFlags(e: CUevent, s: CUstream, _flags: c_uint) -> CUresult {
    guard("cuEventRecordWithFlags", || record(e, s))
}

/// Waits for the work before the event's record, with a SYNC unless one covered it.
fn wait(e: CUevent) -> Res<()> {
    let ev = event(e)?;
    let recorded = lock(&ev.recorded).clone();
    let Some(r) = recorded else {
        return Ok(());
    };
    match Weak::upgrade(&r.ctx) {
        Some(ctx) => ctx.sync_through(r.seq),
        None => Ok(()),
    }
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    guard("cuEventSynchronize", || wait(e))
}

/// Done once a SYNC says so (see [`wait`]): CUDA_SUCCESS, or the context's failure.
#[no_mangle]
pub extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    guard("cuEventQuery", || wait(e))
}

/// Milliseconds between the records of two timing events.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut c_float,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    guard("cuEventElapsedTime", || {
        let (a, b) = (event(start)?, event(end)?);
        if ms.is_null() {
            return Err(invalid());
        }
        if !a.timing() || !b.timing() {
            return Err(Fail(CUDA_ERROR_INVALID_HANDLE));
        }
        let at = |e: &Event| lock(&e.recorded).as_ref().and_then(|r| r.at);
        let (Some(t0), Some(t1)) = (at(&a), at(&b)) else {
            return Err(Fail(CUDA_ERROR_INVALID_HANDLE));
        };
        let elapsed = if t1 >= t0 {
            (t1 - t0).as_secs_f64()
        } else {
            -(t0 - t1).as_secs_f64()
        };
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(ms, (elapsed * 1e3) as c_float) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut c_float,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuEventElapsedTime_v2(ms, start, end) }
}
