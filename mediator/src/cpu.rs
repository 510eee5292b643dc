//! The CPU reference executor: host memory and the built-in catalog, no PTX.
//!
//! It is what CI and machines without a GPU run, so it follows the same rules as the
//! CUDA executor: the same catalog, the same validation, results a test can trust.

use std::collections::{HashMap, HashSet};

use vgpu_kernels::{Arg, CpuMemory, LaunchShape, ParamKind};
use vgpu_protocol::{ExecutorKind, Status};

use crate::executor::{
    BufferId, DeviceInfo, ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, KernelRef,
    ModuleId, StreamId,
};

/// Name the CPU executor reports as its device.
pub const CPU_DEVICE_NAME: &str = "CPU reference executor";

pub struct CpuExecutorFactory {
    info: DeviceInfo,
}

impl CpuExecutorFactory {
    pub fn new() -> CpuExecutorFactory {
        CpuExecutorFactory {
            info: DeviceInfo {
                kind: ExecutorKind::Cpu,
                name: CPU_DEVICE_NAME.to_owned(),
                total_memory: host_memory() / 2,
                cc_major: 0,
                cc_minor: 0,
                multiprocessors: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            },
        }
    }
}

impl Default for CpuExecutorFactory {
    fn default() -> Self {
        Self::new()
    }
}

fn host_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64
    } else {
        1 << 30
    }
}

impl ExecutorFactory for CpuExecutorFactory {
    fn device(&self) -> &DeviceInfo {
        &self.info
    }

    fn create(&self) -> ExecResult<Box<dyn Executor>> {
        Ok(Box::new(CpuExecutor::default()))
    }
}

/// Buffers are plain byte vectors; work runs synchronously, in order.
#[derive(Default)]
pub struct CpuExecutor {
    buffers: HashMap<u64, Vec<u8>>,
    streams: HashSet<u64>,
    next_id: u64,
}

impl CpuExecutor {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn range(&self, id: BufferId, offset: u64, len: u64) -> ExecResult<std::ops::Range<usize>> {
        let buf = self.buffers.get(&id.0).ok_or_else(|| unknown_buffer(id))?;
        let end = offset.checked_add(len).filter(|&e| e <= buf.len() as u64);
        match end {
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(ExecError::new(
                Status::OutOfRange,
                0,
                "range past the end of the buffer",
            )),
        }
    }
}

fn unknown_buffer(id: BufferId) -> ExecError {
    ExecError::new(Status::InvalidHandle, 0, format!("no buffer {}", id.0))
}

impl CpuMemory for CpuExecutor {
    fn len(&self, buffer: u64) -> Option<u64> {
        self.buffers.get(&buffer).map(|b| b.len() as u64)
    }

    fn read(&self, buffer: u64, offset: u64, out: &mut [u8]) -> bool {
        match self.range(BufferId(buffer), offset, out.len() as u64) {
            Ok(r) => {
                out.copy_from_slice(&self.buffers[&buffer][r]);
                true
            }
            Err(_) => false,
        }
    }

    fn write(&mut self, buffer: u64, offset: u64, data: &[u8]) -> bool {
        match self.range(BufferId(buffer), offset, data.len() as u64) {
            Ok(r) => {
                self.buffers.get_mut(&buffer).expect("range checked")[r].copy_from_slice(data);
                true
            }
            Err(_) => false,
        }
    }
}

impl Executor for CpuExecutor {
    fn open_stream(&mut self) -> ExecResult<StreamId> {
        let id = self.next();
        self.streams.insert(id);
        Ok(StreamId(id))
    }

    fn close_stream(&mut self, stream: StreamId) {
        self.streams.remove(&stream.0);
    }

    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        let oom = || ExecError::new(Status::OutOfMemory, 0, "host memory exhausted");
        let n = usize::try_from(bytes).map_err(|_| oom())?;
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| oom())?;
        v.resize(n, 0);
        let id = self.next();
        self.buffers.insert(id, v);
        Ok(BufferId(id))
    }

    fn free(&mut self, buffer: BufferId) {
        self.buffers.remove(&buffer.0);
    }

    fn htod(&mut self, _: StreamId, dst: BufferId, offset: u64, data: &[u8]) -> ExecResult<()> {
        let r = self.range(dst, offset, data.len() as u64)?;
        self.buffers.get_mut(&dst.0).expect("range checked")[r].copy_from_slice(data);
        Ok(())
    }

    fn dtoh(&mut self, _: StreamId, src: BufferId, offset: u64, out: &mut [u8]) -> ExecResult<()> {
        let r = self.range(src, offset, out.len() as u64)?;
        out.copy_from_slice(&self.buffers[&src.0][r]);
        Ok(())
    }

    fn dtod(
        &mut self,
        _: StreamId,
        dst: BufferId,
        dst_offset: u64,
        src: BufferId,
        src_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let s = self.range(src, src_offset, len)?;
        let d = self.range(dst, dst_offset, len)?;
        if src == dst {
            self.buffers
                .get_mut(&dst.0)
                .expect("range checked")
                .copy_within(s, d.start);
        } else {
            let tmp = self.buffers[&src.0][s].to_vec();
            self.buffers.get_mut(&dst.0).expect("range checked")[d].copy_from_slice(&tmp);
        }
        Ok(())
    }

    fn memset(
        &mut self,
        _: StreamId,
        dst: BufferId,
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    ) -> ExecResult<()> {
        let r = self.range(dst, offset, len)?;
        let bytes = &mut self.buffers.get_mut(&dst.0).expect("range checked")[r];
        if width == 4 {
            for chunk in bytes.chunks_exact_mut(4) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        } else {
            bytes.fill(value as u8);
        }
        Ok(())
    }

    fn load_module(&mut self, _ptx: &str) -> ExecResult<ModuleId> {
        Err(ExecError::new(
            Status::Unsupported,
            0,
            "the CPU reference executor runs only the built-in kernels, not PTX",
        ))
    }

    fn unload_module(&mut self, _module: ModuleId) {}

    fn launch(
        &mut self,
        _: StreamId,
        kernel: KernelRef<'_>,
        shape: &LaunchShape,
        params: &[ExecParam],
    ) -> ExecResult<()> {
        let spec = match kernel {
            KernelRef::Builtin(spec) => spec,
            KernelRef::Module(..) => {
                return Err(ExecError::new(
                    Status::Unsupported,
                    0,
                    "no PTX on the CPU executor",
                ))
            }
        };
        let mut args = Vec::with_capacity(params.len());
        for (i, (kind, p)) in spec.params.iter().zip(params).enumerate() {
            let bad = || ExecError::new(Status::InvalidArgument, i as u32, "parameter type");
            args.push(match (kind, p) {
                (ParamKind::Buffer, ExecParam::Buffer(b)) => Arg::Buffer(b.0),
                (ParamKind::U32, ExecParam::Value(v)) => Arg::U32(u32::from_le_bytes(
                    v.as_slice().try_into().map_err(|_| bad())?,
                )),
                (ParamKind::F32, ExecParam::Value(v)) => Arg::F32(f32::from_le_bytes(
                    v.as_slice().try_into().map_err(|_| bad())?,
                )),
                _ => return Err(bad()),
            });
        }
        spec.run_cpu(&args, shape, self)
            .map_err(|e| ExecError::new(Status::InvalidArgument, 0, e.to_string()))
    }

    fn sync(&mut self, _: StreamId) -> ExecResult<()> {
        Ok(())
    }
}
