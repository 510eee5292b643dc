// SPDX-License-Identifier: Apache-2.0
//! A program written against cudarc's safe `CudaContext` API only, as any cudarc user
//! writes it: device query, allocations, copies, a second stream joined back, events, and
//! a kernel launched through cudarc's launch builder, checked against the CPU. It loads
//! whatever `libcuda.so` the loader finds: NVIDIA's natively, the vGPU guest library in
//! a VM.
//!
//! Usage: `vgpu-cudarc-check [MODULE [ELEMENTS]]`. MODULE is a PTX file holding
//! `vector_add_f32(const float*, const float*, float*, unsigned int)` or `vgpu:builtin`
//! (the default: the vGPU device's built-in catalog, the only kernels a CPU-executor
//! device runs). Prints one line per step, then `cudarc check PASSED: ...` or exits
//! non-zero with `cudarc check FAILED: ...`.

use std::process::ExitCode;
use std::time::Instant;

use cudarc::driver::{sys, CudaContext, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

fn run(module: &str, n: usize) -> Result<String, String> {
    let e = |what: &'static str| move |err: DriverError| format!("{what}: {err}");
    let ctx = CudaContext::new(0).map_err(e("CudaContext::new"))?;
    let name = ctx.name().map_err(e("name"))?;
    let (major, minor) = ctx.compute_capability().map_err(e("compute_capability"))?;
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(e("attribute"))?;
    let (free, total) = ctx.mem_get_info().map_err(e("mem_get_info"))?;
    println!(
        "device: {name}, compute {major}.{minor}, {sms} multiprocessors, {} of {} MiB free, {} device(s)",
        free >> 20,
        total >> 20,
        CudaContext::device_count().map_err(e("device_count"))?
    );

    let stream = ctx.default_stream();
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..n).map(|i| (n - i) as f32 * 0.25).collect();
    let a_dev = stream.clone_htod(&a).map_err(e("clone_htod"))?;
    let zeros = stream.alloc_zeros::<f32>(n).map_err(e("alloc_zeros"))?;
    let back = stream.clone_dtoh(&zeros).map_err(e("clone_dtoh"))?;
    if back.iter().any(|&x| x != 0.0) {
        return Err("alloc_zeros: memory read back is not zero".into());
    }
    let copy = stream.clone_dtod(&a_dev).map_err(e("clone_dtod"))?;
    if stream.clone_dtoh(&copy).map_err(e("clone_dtoh"))? != a {
        return Err("clone_dtod: the copy differs from its source".into());
    }
    println!("allocations, zeroing and copies host->device->device->host correct");

    // A second stream: the copy of b runs there; cudarc's event tracking orders the
    // launch on the first stream after it.
    let side = stream.fork().map_err(e("fork"))?;
    let b_dev = side
        .clone_htod(&b)
        .map_err(e("clone_htod on a forked stream"))?;
    let mut c_dev = stream.alloc_zeros::<f32>(n).map_err(e("alloc_zeros"))?;
    stream.join(&side).map_err(e("join"))?;

    let ptx = if module == "vgpu:builtin" {
        Ptx::from_src(module)
    } else {
        Ptx::from_file(module)
    };
    let m = ctx.load_module(ptx).map_err(e("load_module"))?;
    let f = m
        .load_function("vector_add_f32")
        .map_err(e("load_function"))?;
    let start = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(e("new_event"))?;
    let stop = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(e("new_event"))?;
    let cfg = LaunchConfig::for_num_elems(n as u32);
    let n32 = n as u32;
    let t0 = Instant::now();
    start.record(&stream).map_err(e("record"))?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&a_dev).arg(&b_dev).arg(&mut c_dev).arg(&n32);
    // SAFETY: vector_add_f32 takes (const float*, const float*, float*, unsigned int);
    // the three buffers hold n floats each and the grid covers n elements.
    unsafe { launch.launch(cfg) }.map_err(e("launch"))?;
    stop.record(&stream).map_err(e("record"))?;
    let c = stream.clone_dtoh(&c_dev).map_err(e("clone_dtoh"))?;
    let wall = t0.elapsed();
    stop.synchronize().map_err(e("event synchronize"))?;
    let ms = start.elapsed_ms(&stop).map_err(e("elapsed_ms"))?;
    for i in 0..n {
        if c[i] != a[i] + b[i] {
            return Err(format!(
                "vector_add_f32: element {i} is {}, expected {}",
                c[i],
                a[i] + b[i]
            ));
        }
    }
    println!(
        "vector_add_f32 of {n} elements through the launch builder correct: {ms:.3} ms between its events, {:.3} ms launch to results",
        wall.as_secs_f64() * 1e3
    );
    stream.synchronize().map_err(e("synchronize"))?;
    ctx.synchronize().map_err(e("context synchronize"))?;
    Ok(format!("{n} elements, {name}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("Usage: vgpu-cudarc-check [MODULE [ELEMENTS]]\n\nRuns cudarc's CudaContext API over the libcuda.so the loader finds: device query, copies, two streams, events and vector_add_f32 from MODULE (a PTX file, or vgpu:builtin, the default), checked against the CPU.");
        return ExitCode::SUCCESS;
    }
    let module = args.first().map_or("vgpu:builtin", String::as_str);
    let n = match args.get(1).map(|s| s.parse::<usize>()) {
        None => 1 << 20,
        Some(Ok(n)) if (1..=1 << 30).contains(&n) => n,
        Some(_) => {
            eprintln!("vgpu-cudarc-check: error: ELEMENTS must be a number from 1 to 2^30");
            return ExitCode::from(2);
        }
    };
    match run(module, n) {
        Ok(summary) => {
            println!("cudarc check PASSED: {summary}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("cudarc check FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}
