//! The built-in kernel catalog: the CUDA C sources every executor can launch without a
//! guest-supplied module, and one table ([`CATALOG`]) that describes each kernel's
//! parameters, launch constraints and buffer sizes, and runs its CPU reference.
//!
//! The CUDA executor compiles [`CUDA_SOURCE`] once with NVRTC and launches kernels by
//! name; the CPU executor calls [`KernelSpec::run_cpu`]. Both call
//! [`KernelSpec::validate`] first, so a guest's launch is accepted or refused the same
//! way whichever executor serves it, and no kernel ever touches memory outside the
//! buffers it was given.

use std::fmt;

use ParamKind::{Buffer, F32, U32};

pub mod reference;

/// The CUDA C source of the whole catalog, for one NVRTC compilation.
///
/// Kernel names are unmangled (`extern "C"`). Compile with NVRTC's default floating-point
/// options (no `--use_fast_math`, no `-ftz=true`): the bit-exact kernels rely on IEEE
/// rounding and subnormals (with `-ftz=true` an H100 run flushed subnormal sums to zero).
///
/// `cuda/common.cuh` comes first: every kernel file uses its grid-stride helper, so the
/// files are parts of this one translation unit rather than standalone sources.
pub const CUDA_SOURCE: &str = concat!(
    include_str!("../cuda/common.cuh"),
    include_str!("../cuda/vector_add_f32.cu"),
    include_str!("../cuda/saxpy_f32.cu"),
    include_str!("../cuda/scale_f32.cu"),
    include_str!("../cuda/reduce_sum_f32.cu"),
    include_str!("../cuda/matmul_f32.cu"),
    include_str!("../cuda/fill_u32.cu"),
);

/// The type of one kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A device buffer, passed to the kernel as an 8-byte device pointer.
    Buffer,
    U32,
    F32,
}

impl ParamKind {
    /// Size in bytes of the parameter as the kernel receives it.
    pub const fn size(self) -> usize {
        match self {
            ParamKind::Buffer => 8,
            ParamKind::U32 | ParamKind::F32 => 4,
        }
    }
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamKind::Buffer => "buffer",
            ParamKind::U32 => "u32",
            ParamKind::F32 => "f32",
        })
    }
}

/// One launch argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A buffer handle, opaque to this crate; the executor maps it to memory.
    Buffer(u64),
    U32(u32),
    F32(f32),
}

impl Arg {
    /// The parameter kind this argument fills.
    pub const fn kind(self) -> ParamKind {
        match self {
            Arg::Buffer(_) => ParamKind::Buffer,
            Arg::U32(_) => ParamKind::U32,
            Arg::F32(_) => ParamKind::F32,
        }
    }
}

/// Grid and block dimensions of a launch, and its dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// Why a launch of a catalog kernel was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    UnknownKernel,
    ParamCount { expected: usize, got: usize },
    ParamKind { index: usize, expected: ParamKind },
    BadLaunchShape(&'static str),
    BufferTooSmall { index: usize, needed: u64, len: u64 },
    UnknownBuffer { index: usize },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::UnknownKernel => f.write_str("no such kernel in the built-in catalog"),
            KernelError::ParamCount { expected, got } => {
                write!(f, "kernel takes {expected} parameters, got {got}")
            }
            KernelError::ParamKind { index, expected } => write!(
                f,
                "parameter {index} must be a {expected} ({} bytes)",
                expected.size()
            ),
            KernelError::BadLaunchShape(why) => write!(f, "bad launch shape: {why}"),
            KernelError::BufferTooSmall { index, needed, len } => write!(
                f,
                "buffer parameter {index} holds {len} bytes but the kernel touches {needed}"
            ),
            KernelError::UnknownBuffer { index } => {
                write!(f, "parameter {index} names an unknown buffer")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// Memory the CPU reference reads and writes, addressed by buffer handle.
pub trait CpuMemory {
    /// Length in bytes of `buffer`, or `None` when no such buffer exists.
    fn len(&self, buffer: u64) -> Option<u64>;
    /// Fills `out` from `buffer` at `offset`; false if out of range or unknown.
    fn read(&self, buffer: u64, offset: u64, out: &mut [u8]) -> bool;
    /// Writes `data` into `buffer` at `offset`; false if out of range or unknown.
    fn write(&mut self, buffer: u64, offset: u64, data: &[u8]) -> bool;
}

/// The bytes a kernel touches in one buffer parameter: `elem_bytes` times the product of
/// the U32 parameters listed in `dims` (no dims: one element). Elements start at offset 0.
#[derive(Debug)]
struct BufferExtent {
    param: usize,
    elem_bytes: u64,
    dims: &'static [usize],
}

const fn extent(param: usize, elem_bytes: u64, dims: &'static [usize]) -> BufferExtent {
    BufferExtent {
        param,
        elem_bytes,
        dims,
    }
}

impl BufferExtent {
    /// Saturates at `u64::MAX`, which no buffer can hold, so an overflowing size is refused.
    fn needed(&self, args: &[Arg]) -> Result<u64, KernelError> {
        let mut bytes = u128::from(self.elem_bytes);
        for &dim in self.dims {
            bytes = bytes.saturating_mul(u128::from(u32_at(args, dim)?));
        }
        Ok(u64::try_from(bytes).unwrap_or(u64::MAX))
    }
}

/// One catalog entry: everything an executor needs to check and run a kernel.
#[derive(Debug)]
pub struct KernelSpec {
    /// The `extern "C"` name in [`CUDA_SOURCE`].
    pub name: &'static str,
    /// Parameter types, in the kernel's order.
    pub params: &'static [ParamKind],
    /// One entry per `Buffer` parameter.
    buffers: &'static [BufferExtent],
    /// Kernel-specific launch constraints; shape rules common to all kernels are the
    /// mediator's.
    check_shape: fn(&LaunchShape) -> Result<(), KernelError>,
    cpu: fn(&[Arg], &mut dyn CpuMemory) -> Result<(), KernelError>,
    rel_tolerance: f32,
}

impl KernelSpec {
    /// Checks arguments, launch shape and that every buffer is large enough for the
    /// elements the kernel touches (e.g. vector_add needs 4*n bytes in a, b and c; matmul
    /// 4*m*k, 4*k*n, 4*m*n; reduce 4*n in x and 4 in out). `buffer_len` returns None for an
    /// unknown buffer.
    ///
    /// Checks run in this order: parameter count, parameter kinds, launch shape, then each
    /// buffer (known, then large enough) in parameter order; the first failure is returned.
    pub fn validate(
        &self,
        args: &[Arg],
        shape: &LaunchShape,
        buffer_len: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(), KernelError> {
        if args.len() != self.params.len() {
            return Err(KernelError::ParamCount {
                expected: self.params.len(),
                got: args.len(),
            });
        }
        for (index, (arg, &expected)) in args.iter().zip(self.params).enumerate() {
            if arg.kind() != expected {
                return Err(KernelError::ParamKind { index, expected });
            }
        }
        (self.check_shape)(shape)?;
        for extent in self.buffers {
            let index = extent.param;
            let len =
                buffer_len(buffer_at(args, index)?).ok_or(KernelError::UnknownBuffer { index })?;
            let needed = extent.needed(args)?;
            if len < needed {
                return Err(KernelError::BufferTooSmall { index, needed, len });
            }
        }
        Ok(())
    }

    /// Runs the CPU reference (after validate). Inputs are read into temporaries first so
    /// aliasing buffers (e.g. saxpy with x == y) behave like the GPU's element-wise result.
    ///
    /// Validates first with `mem`'s lengths, so a bad launch is refused before anything is
    /// written. Where the GPU result under aliasing is a race (matmul's c aliasing a or b,
    /// reduce's out aliasing x), this computes the result from the inputs as they were
    /// before the launch.
    pub fn run_cpu(
        &self,
        args: &[Arg],
        shape: &LaunchShape,
        mem: &mut dyn CpuMemory,
    ) -> Result<(), KernelError> {
        self.validate(args, shape, &|buffer| mem.len(buffer))?;
        (self.cpu)(args, mem)
    }

    /// Relative error bound of the CUDA result against the CPU reference, for test harnesses
    /// (0 for exact kernels like fill/add/scale; state a justified bound for
    /// reduce/matmul/saxpy — fma contraction).
    ///
    /// A CUDA value `g` matches the reference value `r` when `g == r`, or both are NaN, or
    /// `|g - r| <= rel_tolerance() * scale`, where `scale` is `|out[0] before the launch| +
    /// sum |x_i|` for `reduce_sum_f32` (that is `|r|` for non-negative data).
    ///
    /// - `vector_add_f32`, `scale_f32`, `fill_u32`: 0, one IEEE operation per element.
    /// - `saxpy_f32`: 0, the kernel uses `__fmaf_rn` explicitly (one rounding whatever
    ///   NVRTC's `--fmad` contraction setting) and the reference uses `f32::mul_add`.
    /// - `matmul_f32`: 0, each element is a chain of `__fmaf_rn` in increasing k from +0,
    ///   which the reference reproduces, including the zero padding of ragged tiles.
    /// - `reduce_sum_f32`: 1e-4. The GPU adds in f32 in an order set by the launch shape
    ///   and by atomic ordering; the reference sums in f64 and rounds once. A value built by
    ///   chains of at most L f32 additions is within `L * 2^-24 / (1 - L * 2^-24)` of
    ///   `scale`, and the reference adds at most 2^-24, so 1e-4 is guaranteed for
    ///   L <= 1600, with L = elements per thread (ceil(n / threads)) + log2(blockDim.x) +
    ///   blocks that own elements + 1. For example n = 2^24 with 1024 blocks of 256
    ///   threads gives L = 1097. Longer chains stay within the bound on random test data
    ///   (rounding errors then grow like sqrt(L) * 2^-24), but that is not guaranteed.
    ///   On an H100, 80 launches (n up to 2^22, grids of 1 to 100 000 blocks, 1 to 1024
    ///   threads, signed and non-negative data) stayed within 7.2e-6.
    pub fn rel_tolerance(&self) -> f32 {
        self.rel_tolerance
    }
}

/// The catalog entry named `name`.
pub fn find(name: &str) -> Option<&'static KernelSpec> {
    CATALOG.iter().find(|spec| spec.name == name)
}

/// Decodes raw little-endian parameter bytes (as carried by a launch request, one entry per
/// param with its byte size) into typed args for this kernel; checks sizes match the
/// signature.
///
/// A wrong number of entries is `ParamCount`; an entry whose size is not its parameter's
/// [`ParamKind::size`] is `ParamKind` for that index.
pub fn decode_args(spec: &KernelSpec, params: &[&[u8]]) -> Result<Vec<Arg>, KernelError> {
    if params.len() != spec.params.len() {
        return Err(KernelError::ParamCount {
            expected: spec.params.len(),
            got: params.len(),
        });
    }
    spec.params
        .iter()
        .zip(params)
        .enumerate()
        .map(|(index, (&expected, bytes))| {
            let wrong_size = KernelError::ParamKind { index, expected };
            Ok(match expected {
                ParamKind::Buffer => Arg::Buffer(u64::from_le_bytes(
                    (*bytes).try_into().map_err(|_| wrong_size)?,
                )),
                ParamKind::U32 => Arg::U32(u32::from_le_bytes(
                    (*bytes).try_into().map_err(|_| wrong_size)?,
                )),
                ParamKind::F32 => Arg::F32(f32::from_le_bytes(
                    (*bytes).try_into().map_err(|_| wrong_size)?,
                )),
            })
        })
        .collect()
}

/// The built-in kernels. Parameter indices in `buffers` and in the CPU functions follow the
/// CUDA signatures in `cuda/<name>.cu`.
pub static CATALOG: &[KernelSpec] = &[
    KernelSpec {
        name: "vector_add_f32",
        params: &[Buffer, Buffer, Buffer, U32],
        buffers: &[extent(0, 4, &[3]), extent(1, 4, &[3]), extent(2, 4, &[3])],
        check_shape: any_shape,
        cpu: cpu_vector_add_f32,
        rel_tolerance: 0.0,
    },
    KernelSpec {
        name: "saxpy_f32",
        params: &[Buffer, Buffer, F32, U32],
        buffers: &[extent(0, 4, &[3]), extent(1, 4, &[3])],
        check_shape: any_shape,
        cpu: cpu_saxpy_f32,
        rel_tolerance: 0.0,
    },
    KernelSpec {
        name: "scale_f32",
        params: &[Buffer, F32, U32],
        buffers: &[extent(0, 4, &[2])],
        check_shape: any_shape,
        cpu: cpu_scale_f32,
        rel_tolerance: 0.0,
    },
    KernelSpec {
        name: "reduce_sum_f32",
        params: &[Buffer, Buffer, U32],
        buffers: &[extent(0, 4, &[2]), extent(1, 4, &[])],
        check_shape: reduce_shape,
        cpu: cpu_reduce_sum_f32,
        rel_tolerance: 1e-4,
    },
    KernelSpec {
        name: "matmul_f32",
        params: &[Buffer, Buffer, Buffer, U32, U32, U32],
        buffers: &[
            extent(0, 4, &[3, 5]),
            extent(1, 4, &[5, 4]),
            extent(2, 4, &[3, 4]),
        ],
        check_shape: matmul_shape,
        cpu: cpu_matmul_f32,
        rel_tolerance: 0.0,
    },
    KernelSpec {
        name: "fill_u32",
        params: &[Buffer, U32, U32],
        buffers: &[extent(0, 4, &[2])],
        check_shape: any_shape,
        cpu: cpu_fill_u32,
        rel_tolerance: 0.0,
    },
];

/// The element-wise kernels flatten the whole grid, so any shape gives the same result.
fn any_shape(_: &LaunchShape) -> Result<(), KernelError> {
    Ok(())
}

/// The shared-memory tree halves a 1-D block.
fn reduce_shape(shape: &LaunchShape) -> Result<(), KernelError> {
    let [x, y, z] = shape.block;
    if x.is_power_of_two() && x <= 1024 && y == 1 && z == 1 {
        Ok(())
    } else {
        Err(KernelError::BadLaunchShape(
            "reduce_sum_f32 needs block (2^j,1,1) with 2^j <= 1024",
        ))
    }
}

/// One thread per element of a 16x16 tile.
fn matmul_shape(shape: &LaunchShape) -> Result<(), KernelError> {
    if shape.block == [16, 16, 1] {
        Ok(())
    } else {
        Err(KernelError::BadLaunchShape(
            "matmul_f32 needs block (16,16,1)",
        ))
    }
}

fn cpu_vector_add_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 3)?);
    let a = read_f32s(mem, args, 0, n)?;
    let b = read_f32s(mem, args, 1, n)?;
    let mut c = vec![0.0; a.len()];
    reference::vector_add_f32(&a, &b, &mut c);
    write_f32s(mem, args, 2, &c)
}

fn cpu_saxpy_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 3)?);
    let mut y = read_f32s(mem, args, 0, n)?;
    let x = read_f32s(mem, args, 1, n)?;
    reference::saxpy_f32(&mut y, &x, f32_at(args, 2)?);
    write_f32s(mem, args, 0, &y)
}

fn cpu_scale_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 2)?);
    let mut x = read_f32s(mem, args, 0, n)?;
    reference::scale_f32(&mut x, f32_at(args, 1)?);
    write_f32s(mem, args, 0, &x)
}

fn cpu_reduce_sum_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 2)?);
    if n == 0 {
        // The kernel's blocks all own no element and skip their atomicAdd.
        return Ok(());
    }
    let x = read_f32s(mem, args, 0, n)?;
    let out = read_f32s(mem, args, 1, 1)?[0];
    let total = (f64::from(out) + reference::sum_f64(&x)) as f32;
    write_f32s(mem, args, 1, &[total])
}

fn cpu_matmul_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let [m, n, k] = [3, 4, 5].map(|index| u32_at(args, index).map(u64::from));
    let (m, n, k) = (m?, n?, k?);
    // validate bounded 4*m*k etc. by real buffer lengths, so these products cannot overflow.
    let a = read_f32s(mem, args, 0, m * k)?;
    let b = read_f32s(mem, args, 1, k * n)?;
    let mut c = vec![0.0; to_usize(m * n)?];
    reference::matmul_f32(&a, &b, &mut c, to_usize(m)?, to_usize(n)?, to_usize(k)?);
    write_f32s(mem, args, 2, &c)
}

fn cpu_fill_u32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u32_at(args, 2)?;
    let mut x = vec![0; to_usize(u64::from(n))?];
    reference::fill_u32(&mut x, u32_at(args, 1)?);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_bytes(mem, args, 0, &bytes)
}

fn u32_at(args: &[Arg], index: usize) -> Result<u32, KernelError> {
    match args.get(index) {
        Some(Arg::U32(value)) => Ok(*value),
        _ => Err(KernelError::ParamKind {
            index,
            expected: U32,
        }),
    }
}

fn f32_at(args: &[Arg], index: usize) -> Result<f32, KernelError> {
    match args.get(index) {
        Some(Arg::F32(value)) => Ok(*value),
        _ => Err(KernelError::ParamKind {
            index,
            expected: F32,
        }),
    }
}

fn buffer_at(args: &[Arg], index: usize) -> Result<u64, KernelError> {
    match args.get(index) {
        Some(Arg::Buffer(handle)) => Ok(*handle),
        _ => Err(KernelError::ParamKind {
            index,
            expected: Buffer,
        }),
    }
}

/// Only reachable on a target whose usize cannot hold a buffer's length.
fn to_usize(count: u64) -> Result<usize, KernelError> {
    usize::try_from(count).map_err(|_| KernelError::BadLaunchShape("buffer too large for host"))
}

/// The error for a read or write that `CpuMemory` refused after validation passed.
fn access_error(mem: &dyn CpuMemory, buffer: u64, index: usize, needed: u64) -> KernelError {
    match mem.len(buffer) {
        Some(len) => KernelError::BufferTooSmall { index, needed, len },
        None => KernelError::UnknownBuffer { index },
    }
}

fn read_f32s(
    mem: &dyn CpuMemory,
    args: &[Arg],
    index: usize,
    count: u64,
) -> Result<Vec<f32>, KernelError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let buffer = buffer_at(args, index)?;
    let needed = count.saturating_mul(4);
    let mut bytes = vec![0u8; to_usize(needed)?];
    if !mem.read(buffer, 0, &mut bytes) {
        return Err(access_error(mem, buffer, index, needed));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

fn write_f32s(
    mem: &mut dyn CpuMemory,
    args: &[Arg],
    index: usize,
    values: &[f32],
) -> Result<(), KernelError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_bytes(mem, args, index, &bytes)
}

fn write_bytes(
    mem: &mut dyn CpuMemory,
    args: &[Arg],
    index: usize,
    bytes: &[u8],
) -> Result<(), KernelError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let buffer = buffer_at(args, index)?;
    if mem.write(buffer, 0, bytes) {
        Ok(())
    } else {
        Err(access_error(mem, buffer, index, bytes.len() as u64))
    }
}

#[cfg(test)]
mod tests;
