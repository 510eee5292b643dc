// SPDX-License-Identifier: Apache-2.0
//! The CPU reference executor: host memory and the built-in catalog, no PTX.
//!
//! It is what CI and machines without a GPU run, so it follows the same rules as the
//! CUDA executor: the same catalog, the same validation, results a test can trust.
//!
//! Its buffers have synthetic device addresses, as a GPU's would be: each buffer's
//! [`BufferId`] is an address from a per-executor counter that starts at
//! [`CPU_ADDRESS_BASE`] and moves on by the buffer's size in whole pages plus a gap of
//! [`CPU_ADDRESS_GAP`], so addresses are never 0, page-aligned (so 256-byte aligned),
//! unique in the executor for its whole life (never reused after a free) and stable. No
//! kernel dereferences them: the catalog's reference kernels address buffers by id.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vgpu_kernels::{Arg, CpuMemory, LaunchShape, ParamKind};
use vgpu_protocol::{ExecutorKind, FunctionInfo, Status, FUNCTION_ATTRIBUTES};

use crate::executor::{
    builtin_function_info, guest_fault, no_host_buffer, outside_host_buffer, BufferId, DeviceInfo,
    ExecError, ExecParam, ExecResult, Executor, ExecutorFactory, GuestSink, GuestSource, KernelRef,
    Killer, ModuleId, StreamId, TIMEOUT_DETAIL,
};
use crate::hostmap::{HostMap, HostMapping};

/// Name the CPU executor reports as its device.
pub const CPU_DEVICE_NAME: &str = "CPU reference executor";

pub struct CpuExecutorFactory {
    info: DeviceInfo,
}

impl CpuExecutorFactory {
    pub fn new() -> CpuExecutorFactory {
        CpuExecutorFactory {
            info: cpu_device_info(),
        }
    }

    /// One of `count` simulated devices (`--executor cpu:N`): the same executor, with the
    /// host's memory split evenly between the devices, so that placement, per-device
    /// quotas and per-device scheduling can be exercised without a GPU.
    pub fn simulated(count: u32) -> CpuExecutorFactory {
        let mut info = cpu_device_info();
        info.total_memory /= u64::from(count.max(1));
        CpuExecutorFactory { info }
    }
}

/// What the CPU executor reports as its device (INFO, the config space).
pub fn cpu_device_info() -> DeviceInfo {
    DeviceInfo {
        kind: ExecutorKind::Cpu,
        name: CPU_DEVICE_NAME.to_owned(),
        total_memory: device_memory(host_memory(), cgroup_memory_limit()),
        cc_major: 0,
        cc_minor: 0,
        multiprocessors: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    }
}

/// Where the CPU executor's synthetic device addresses start.
pub const CPU_ADDRESS_BASE: u64 = 0x7000_0000_0000;
/// The unused addresses between two of the CPU executor's buffers.
pub const CPU_ADDRESS_GAP: u64 = 64 << 10;
/// The CPU executor's buffers take addresses in whole pages of this size.
const CPU_ADDRESS_PAGE: u64 = 4096;

/// How many attributes [`cpu_device_attributes`] describes
/// (`CU_DEVICE_ATTRIBUTE_MAX` of CUDA 13); those after it are 0.
pub const CPU_DEVICE_ATTRIBUTES: usize = 162;

/// The CPU executor's answer to DEVICE_ATTRIBUTES: a device that takes the launches the
/// mediator allows every device (`CUdevice_attribute` numbering, index 0 unused):
///
/// | attribute | value |
/// |---|---|
/// | 1 max threads per block, 2-4 max block x/y/z | 1024, 1024, 1024, 64 |
/// | 5-7 max grid x/y/z | 2^31 - 1, 65535, 65535 |
/// | 8 shared memory per block, 97 its opt-in maximum | 49152 (the mediator's limit) |
/// | 9 total constant memory | 65536 |
/// | 10 warp size | 32 |
/// | 11 max pitch | 2^31 - 1 |
/// | 12 registers per block, 82 per multiprocessor | 65536 |
/// | 13 clock rate, 36 memory clock rate (kHz) | 1,000,000 |
/// | 14 texture alignment, 51 texture pitch alignment | 512, 32 |
/// | 16 multiprocessor count | the host's CPUs, as INFO reports |
/// | 31 concurrent kernels | 1 |
/// | 37 memory bus width (bits) | 64 |
/// | 39 max threads per multiprocessor | 2048 |
/// | 41 unified addressing | 1 |
/// | 75, 76 compute capability major, minor | as INFO reports (0, 0) |
/// | 81 shared memory per multiprocessor | 65536 |
/// | 106 max blocks per multiprocessor | 32 |
///
/// Everything else is 0: not integrated (18), no mapped or registered host memory (19,
/// 99), default compute mode (20), no textures or surfaces, no ECC (32), PCI bus, device
/// and domain ids 0 (33, 34, 50), no NUMA node of the device or the host (-1: 131, 134),
/// no managed memory (83), no memory pools (115), no
/// cooperative launch (95), no stream priorities (78), no async copy engine (40).
pub fn cpu_device_attributes(info: &DeviceInfo) -> Vec<i32> {
    let mut a = vec![0i32; CPU_DEVICE_ATTRIBUTES + 1];
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    for (attribute, value) in [
        (1, 1024),
        (2, 1024),
        (3, 1024),
        (4, 64),
        (5, i32::MAX),
        (6, 65535),
        (7, 65535),
        (8, 49152),
        (9, 65536),
        (10, 32),
        (11, i32::MAX),
        (12, 65536),
        (13, 1_000_000),
        (14, 512),
        (16, count(info.multiprocessors)),
        (31, 1),
        (36, 1_000_000),
        (37, 64),
        (39, 2048),
        (41, 1),
        (51, 32),
        (75, i32::from(info.cc_major)),
        (76, i32::from(info.cc_minor)),
        (81, 65536),
        (82, 65536),
        (97, 49152),
        (106, 32),
        (131, -1),
        (134, -1),
    ] {
        a[attribute] = value;
    }
    a
}

/// The CPU executor's function attributes of a built-in kernel (`CUfunction_attribute`
/// 0 to 9): 1024 threads per block, no static shared, constant or local memory, no
/// registers or PTX/binary version to speak of, no cache mode, 49152 bytes of dynamic
/// shared memory, and no preferred carveout (-1).
pub const CPU_FUNCTION_ATTRIBUTES: [i32; FUNCTION_ATTRIBUTES] =
    [1024, 0, 0, 0, 0, 0, 0, 0, 49152, -1];

impl Default for CpuExecutorFactory {
    fn default() -> Self {
        Self::new()
    }
}

/// The CPU device's memory is this fraction of the memory the daemon may use.
pub const DEVICE_MEMORY_DIVISOR: u64 = 8;

/// The CPU executor's device memory ([`DeviceInfo::total_memory`]), from which vhost-vgpu
/// derives each VM's default quota (total / sockets).
///
/// Guest buffers on the CPU executor are the daemon's own heap, so a VM filling its quota
/// fills the daemon's memory: the device is 1/8 of the memory the daemon may use, which is
/// physical RAM or, when smaller, its cgroup's memory limit (a service or container limited
/// to 3 GiB shows a 384 MiB device). Eight leaves the daemon, the requests' payloads in
/// flight, and the host's other work the lion's share; the CPU executor is for CI and
/// hosts without a GPU, where small quotas are enough. An operator who wants more sets the
/// quota explicitly (`--mem-quota`).
pub fn device_memory(physical: u64, cgroup_limit: Option<u64>) -> u64 {
    physical.min(cgroup_limit.unwrap_or(u64::MAX)) / DEVICE_MEMORY_DIVISOR
}

/// The memory limit of this process's cgroup, the smallest set on it or any ancestor
/// (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), or None when there is none.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_memory_limit_at(Path::new("/sys/fs/cgroup"), &own)
}

/// [`cgroup_memory_limit`] with the cgroup filesystem at `root` and `proc_self_cgroup`
/// the text of `/proc/self/cgroup`.
///
/// Walks from the process's own cgroup up to the mount's root, as each ancestor's limit
/// applies too; the root is also where a container without its own cgroup namespace sees
/// its limit, as its path in `/proc/self/cgroup` then names a directory it cannot see.
pub fn cgroup_memory_limit_at(root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    let mut limit: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        // "0::/path" (v2) or "4:memory:/path" (v1; controllers may be comma-joined).
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = match (fields.next(), fields.next(), fields.next()) {
            (Some(id), Some(controllers), Some(path)) => (id, controllers, path),
            _ => continue,
        };
        let (dir, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        // A cgroup outside this namespace shows as "/../..": look only at the mount's root.
        let path = if path.split('/').any(|part| part == "..") {
            ""
        } else {
            path.trim_start_matches('/')
        };
        let mut cgroup = Some(Path::new(path));
        while let Some(relative) = cgroup {
            let text = std::fs::read_to_string(dir.join(relative).join(file));
            if let Some(value) = text.ok().as_deref().and_then(parse_cgroup_limit) {
                limit = Some(limit.map_or(value, |l| l.min(value)));
            }
            cgroup = relative.parent();
        }
    }
    limit
}

/// A cgroup memory limit file's value: None for `max` (v2's "no limit") or anything else
/// that is not a number. v1's "no limit" is a number near `i64::MAX`, which the
/// comparison with physical memory then ignores.
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
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
///
/// Every host allocation made for a guest is fallible (a failure answers OUT_OF_MEMORY,
/// never aborts the daemon), and no operation allocates in proportion to a buffer:
/// buffers are the only memory sized by the guest, and ALLOC charges them to its quota.
/// Kernels run in place in bounded chunks ([`vgpu_kernels::CPU_CHUNK_ELEMS`]).
#[derive(Default)]
pub struct CpuExecutor {
    /// By synthetic device address.
    buffers: HashMap<u64, Vec<u8>>,
    /// Addresses handed out so far, from [`CPU_ADDRESS_BASE`].
    address_used: u64,
    /// [`cpu_device_attributes`], made when first asked for.
    attributes: Vec<i32>,
    /// Registered host buffers, mapped from the VM's memory files.
    hosts: HashMap<u64, HostMap>,
    streams: HashSet<u64>,
    next_id: u64,
    /// Set by its [`Killer`]: 1 ended, 2 ended by the watchdog. A launch running then
    /// stops early and the executor is lost.
    killed: Arc<AtomicU8>,
}

impl CpuExecutor {
    /// The `DEVICE_LOST` of an executor that was ended, if it was.
    fn ended(&self) -> ExecResult<()> {
        match self.killed.load(Ordering::Acquire) {
            0 => Ok(()),
            2 => Err(ExecError::new(
                Status::DeviceLost,
                TIMEOUT_DETAIL,
                "the work ran past the kernel timeout",
            )),
            _ => Err(ExecError::new(
                Status::DeviceLost,
                0,
                "the executor was ended",
            )),
        }
    }

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

/// Bytes a copy between two different buffers moves at a time.
const COPY_CHUNK: usize = 64 << 10;

fn out_of_memory(what: &str, bytes: u64) -> ExecError {
    ExecError::new(
        Status::OutOfMemory,
        0,
        format!("host memory exhausted: the CPU executor cannot allocate {bytes} bytes for {what}"),
    )
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

    fn cancelled(&self) -> bool {
        self.killed.load(Ordering::Acquire) != 0
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
        self.streams
            .try_reserve(1)
            .map_err(|_| out_of_memory("a stream", 8))?;
        let id = self.next();
        self.streams.insert(id);
        Ok(StreamId(id))
    }

    fn close_stream(&mut self, stream: StreamId) {
        self.streams.remove(&stream.0);
    }

    fn alloc(&mut self, bytes: u64) -> ExecResult<BufferId> {
        let oom = || out_of_memory("a buffer", bytes);
        let n = usize::try_from(bytes).map_err(|_| oom())?;
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| oom())?;
        v.resize(n, 0);
        self.buffers
            .try_reserve(1)
            .map_err(|_| out_of_memory("the buffer table", 64))?;
        // Its address, and where the next buffer's starts: past its pages and a gap.
        let next = bytes
            .max(1)
            .checked_next_multiple_of(CPU_ADDRESS_PAGE)
            .and_then(|span| self.address_used.checked_add(span))
            .and_then(|end| end.checked_add(CPU_ADDRESS_GAP))
            .filter(|&used| CPU_ADDRESS_BASE.checked_add(used).is_some())
            .ok_or_else(|| out_of_memory("device addresses", bytes))?;
        let address = CPU_ADDRESS_BASE + self.address_used;
        self.address_used = next;
        self.buffers.insert(address, v);
        Ok(BufferId(address))
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
            // Through a bounded scratch: a copy of the whole range would be guest-sized.
            let mut tmp = vec![0u8; s.len().min(COPY_CHUNK)];
            for start in (0..s.len()).step_by(COPY_CHUNK) {
                let len = (s.len() - start).min(COPY_CHUNK);
                let (from, to) = (s.start + start, d.start + start);
                tmp[..len].copy_from_slice(&self.buffers[&src.0][from..from + len]);
                self.buffers.get_mut(&dst.0).expect("range checked")[to..to + len]
                    .copy_from_slice(&tmp[..len]);
            }
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
        self.ended()?;
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
            .map_err(|e| ExecError::new(Status::InvalidArgument, 0, e.to_string()))?;
        // Ended while it ran: the launch did not finish.
        self.ended()
    }

    fn sync(&mut self, _: StreamId) -> ExecResult<()> {
        self.ended()
    }

    /// See [`cpu_device_attributes`]; attributes past its table are 0.
    fn device_attributes(&mut self, count: u32) -> ExecResult<Vec<i32>> {
        if self.attributes.is_empty() {
            self.attributes = cpu_device_attributes(&cpu_device_info());
        }
        Ok((1..=count as usize)
            .map(|a| self.attributes.get(a).copied().unwrap_or(0))
            .collect())
    }

    /// Built-in kernels only: [`CPU_FUNCTION_ATTRIBUTES`] and the catalog's layout.
    fn function_info(&mut self, kernel: KernelRef<'_>) -> ExecResult<FunctionInfo> {
        match kernel {
            KernelRef::Builtin(spec) => Ok(builtin_function_info(spec, CPU_FUNCTION_ATTRIBUTES)),
            KernelRef::Module(..) => Err(ExecError::new(
                Status::Unsupported,
                0,
                "no modules on the CPU executor",
            )),
        }
    }

    fn poisoned(&self) -> bool {
        self.killed.load(Ordering::Acquire) != 0
    }

    /// Ends a launch that runs (a long `spin_us`) from another thread: the watchdog and
    /// a VM reset then need no worker process to kill.
    fn killer(&self) -> Option<Killer> {
        let killed = self.killed.clone();
        Some(Killer::new(move |timed_out| {
            let _ = killed.compare_exchange(
                0,
                if timed_out { 2 } else { 1 },
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }))
    }

    fn htod_from(
        &mut self,
        _: StreamId,
        dst: BufferId,
        offset: u64,
        src: &dyn GuestSource,
    ) -> ExecResult<()> {
        // Straight from the guest's buffers into the device buffer.
        let r = self.range(dst, offset, src.len())?;
        let out = &mut self.buffers.get_mut(&dst.0).expect("range checked")[r];
        src.read(0, out).map_err(guest_fault)
    }

    fn dtoh_into(
        &mut self,
        _: StreamId,
        src: BufferId,
        offset: u64,
        len: u64,
        dst: &dyn GuestSink,
    ) -> ExecResult<()> {
        let r = self.range(src, offset, len)?;
        dst.write(0, &self.buffers[&src.0][r]).map_err(guest_fault)
    }

    fn register_host(&mut self, id: u64, mapping: &HostMapping) -> ExecResult<()> {
        let map = HostMap::map(mapping).map_err(|e| {
            ExecError::new(Status::InvalidArgument, 0, format!("host buffer {id}: {e}"))
        })?;
        self.hosts.insert(id, map);
        Ok(())
    }

    fn unregister_host(&mut self, id: u64) {
        self.hosts.remove(&id);
    }

    fn htod_host(
        &mut self,
        _: StreamId,
        dst: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let r = self.range(dst, offset, len)?;
        let map = self.hosts.get(&host).ok_or_else(|| no_host_buffer(host))?;
        let out = &mut self.buffers.get_mut(&dst.0).expect("range checked")[r];
        map.read(host_offset, out)
            .ok_or_else(|| outside_host_buffer(host, host_offset, len))
    }

    fn dtoh_host(
        &mut self,
        _: StreamId,
        src: BufferId,
        offset: u64,
        host: u64,
        host_offset: u64,
        len: u64,
    ) -> ExecResult<()> {
        let r = self.range(src, offset, len)?;
        let map = self.hosts.get(&host).ok_or_else(|| no_host_buffer(host))?;
        map.write(host_offset, &self.buffers[&src.0][r])
            .ok_or_else(|| outside_host_buffer(host, host_offset, len))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;

    const GIB: u64 = 1 << 30;

    /// A scratch cgroup filesystem: `files` are (path under root, contents).
    fn cgroup_root(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vgpu-cgroup-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (path, contents) in files {
            let file = root.join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, contents).unwrap();
        }
        fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn device_memory_is_an_eighth_of_ram_or_of_a_smaller_cgroup_limit() {
        assert_eq!(device_memory(64 * GIB, None), 8 * GIB);
        assert_eq!(device_memory(64 * GIB, Some(3 * GIB)), 384 << 20);
        assert_eq!(device_memory(4 * GIB, Some(u64::MAX)), GIB / 2);
        // v1's "unlimited" is a number larger than any RAM.
        assert_eq!(
            device_memory(4 * GIB, Some(9_223_372_036_854_771_712)),
            GIB / 2
        );
    }

    #[test]
    fn the_cpu_device_is_at_most_an_eighth_of_this_host() {
        let total = CpuExecutorFactory::new().device().total_memory;
        assert!(total > 0);
        assert!(total <= host_memory() / DEVICE_MEMORY_DIVISOR, "{total}");
        if let Some(limit) = cgroup_memory_limit() {
            assert!(total <= limit / DEVICE_MEMORY_DIVISOR, "{total} vs {limit}");
        }
    }

    #[test]
    fn cgroup_v2_limit_is_the_smallest_on_the_path_to_the_root() {
        let root = cgroup_root(
            "v2",
            &[
                ("system.slice/memory.max", "max\n"),
                ("system.slice/vgpu.service/memory.max", "3221225472\n"),
                ("system.slice/vgpu.service/worker/memory.max", "max\n"),
                ("other/memory.max", "1024\n"),
            ],
        );
        let own = "0::/system.slice/vgpu.service/worker\n";
        assert_eq!(cgroup_memory_limit_at(&root, own), Some(3 * GIB));
        fs::write(root.join("system.slice/memory.max"), "2147483648").unwrap();
        assert_eq!(cgroup_memory_limit_at(&root, own), Some(2 * GIB));
        // A container's own limit at the mount root, its path in /proc invisible to it.
        fs::write(root.join("memory.max"), "1073741824\n").unwrap();
        assert_eq!(cgroup_memory_limit_at(&root, "0::/docker/abc\n"), Some(GIB));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn cgroup_v1_limit_comes_from_the_memory_controller() {
        let root = cgroup_root(
            "v1",
            &[
                ("memory/memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory/box/memory.limit_in_bytes", "536870912\n"),
                ("cpu/box/memory.limit_in_bytes", "1\n"),
            ],
        );
        let own = "9:name=systemd:/box\n5:cpu,cpuacct:/box\n4:blkio,memory:/box\n0::/\n";
        assert_eq!(cgroup_memory_limit_at(&root, own), Some(GIB / 2));
        assert_eq!(
            cgroup_memory_limit_at(&root, "4:memory:/../box\n"),
            Some(9_223_372_036_854_771_712)
        );
        let unlimited = "4:memory:/elsewhere\n";
        assert_eq!(
            cgroup_memory_limit_at(&root, unlimited),
            Some(9_223_372_036_854_771_712)
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_cgroup_limit_without_limit_files() {
        let root = cgroup_root("none", &[("memory.max", "max\n")]);
        assert_eq!(cgroup_memory_limit_at(&root, "0::/a/b\n"), None);
        assert_eq!(cgroup_memory_limit_at(&root, ""), None);
        assert_eq!(cgroup_memory_limit_at(&root, "garbage\n1:cpu\n"), None);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_impossible_allocation_is_out_of_memory_and_the_executor_serves_on() {
        let mut exec = CpuExecutor::default();
        for bytes in [1 << 50, u64::MAX] {
            let err = exec.alloc(bytes).expect_err("allocated the impossible");
            assert_eq!(err.status, Status::OutOfMemory, "{err:?}");
        }
        let b = exec.alloc(16).unwrap();
        assert_eq!(exec.len(b.0), Some(16));
    }

    #[test]
    fn dtod_between_buffers_copies_ranges_larger_than_a_chunk() {
        let mut exec = CpuExecutor::default();
        let stream = exec.open_stream().unwrap();
        let len = 3 * COPY_CHUNK + 11;
        let (src, dst) = (
            exec.alloc(len as u64 + 5).unwrap(),
            exec.alloc(len as u64 + 9).unwrap(),
        );
        let data: Vec<u8> = (0..len + 5).map(|i| (i * 7 % 251) as u8).collect();
        exec.htod(stream, src, 0, &data).unwrap();
        exec.dtod(stream, dst, 4, src, 5, len as u64).unwrap();
        let mut out = vec![0xaa; len + 9];
        exec.dtoh(stream, dst, 0, &mut out).unwrap();
        assert_eq!(out[..4], [0; 4]);
        assert_eq!(out[4..4 + len], data[5..]);
        assert_eq!(out[4 + len..], [0; 5]);
    }
}
