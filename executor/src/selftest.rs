// SPDX-License-Identifier: Apache-2.0
//! The Phase 1 self-tests: vector-add validation and a one-line device description.

use vgpu_kernels::{LaunchShape, ParamKind};

use crate::executor::{DeviceInfo, ExecParam, ExecResult, Executor, KernelRef};

/// Elements in the Phase 1 vector-add validation.
pub const VECTOR_ADD_ELEMENTS: usize = 1024;

/// `<name>, <memory> MiB, compute capability <x.y>` (the CPU executor has none).
pub fn device_line(device: &DeviceInfo) -> String {
    let mem = device.total_memory >> 20;
    match device.kind {
        vgpu_protocol::ExecutorKind::Cuda => format!(
            "{}, {} MiB, compute capability {}.{}",
            device.name, mem, device.cc_major, device.cc_minor
        ),
        vgpu_protocol::ExecutorKind::Cpu => {
            format!(
                "{}, {} MiB host memory, no compute capability",
                device.name, mem
            )
        }
    }
}

/// Adds two fresh pseudo-random vectors on the executor and compares with the CPU.
/// `Ok("Vector add PASSED: ...")` or `Err("Vector add FAILED: ...")`.
///
/// Both sides stay `String`s: they are the Phase 1 protocol's answer lines, sent to the
/// VM as they are (the mediator answers the self-test with the one or the other), not a
/// reason for a caller to act on. A failure is either wrong results or the executor's
/// own error, already typed as [`crate::ExecError`] where it arises.
pub fn vector_add(exec: &mut dyn Executor, device_name: &str) -> Result<String, String> {
    let n = VECTOR_ADD_ELEMENTS;
    match run_vector_add(exec, n) {
        Ok(0) => Ok(format!(
            "Vector add PASSED: {n} elements, 0 errors ({device_name})"
        )),
        Ok(errors) => Err(format!(
            "Vector add FAILED: {n} elements, {errors} errors ({device_name})"
        )),
        Err(e) => Err(format!("Vector add FAILED: {e} ({device_name})")),
    }
}

fn run_vector_add(exec: &mut dyn Executor, n: usize) -> ExecResult<usize> {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    let mut next = || {
        // xorshift64*: fresh inputs each run, no dependency needed.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 200.0
            - 100.0
    };
    let a: Vec<f32> = (0..n).map(|_| next()).collect();
    let b: Vec<f32> = (0..n).map(|_| next()).collect();
    let bytes = (n * 4) as u64;
    let spec = vgpu_kernels::find("vector_add_f32").expect("vector_add_f32 is in the catalog");
    debug_assert_eq!(spec.params[3], ParamKind::U32);

    let stream = exec.open_stream()?;
    let mut buffers = Vec::new();
    let result = (|| {
        for _ in 0..3 {
            buffers.push(exec.alloc(bytes)?);
        }
        let (da, db, dc) = (buffers[0], buffers[1], buffers[2]);
        exec.htod(stream, da, 0, &to_bytes(&a))?;
        exec.htod(stream, db, 0, &to_bytes(&b))?;
        // Poison the output so an element the kernel never writes fails.
        exec.memset(stream, dc, 0, bytes, 0x7fc0_0001, 4)?;
        let shape = LaunchShape {
            grid: [n.div_ceil(256) as u32, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        let params = [
            ExecParam::Buffer(da),
            ExecParam::Buffer(db),
            ExecParam::Buffer(dc),
            ExecParam::Value((n as u32).to_le_bytes().to_vec()),
        ];
        exec.launch(stream, KernelRef::Builtin(spec), &shape, &params)?;
        let mut out = vec![0u8; bytes as usize];
        exec.dtoh(stream, dc, 0, &mut out)?;
        exec.sync(stream)?;
        let c: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(a.iter()
            .zip(&b)
            .zip(&c)
            .filter(|((x, y), z)| (*x + *y) != **z)
            .count())
    })();
    for buf in buffers {
        exec.free(buf);
    }
    exec.close_stream(stream);
    result
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
