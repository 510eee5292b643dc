// SPDX-License-Identifier: Apache-2.0
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
    include_str!("../cuda/spin_us.cu"),
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
///
/// The kernels move at most [`CPU_CHUNK_ELEMS`] elements (`4 * CPU_CHUNK_ELEMS` bytes) per
/// call, so an implementation serves them from its own buffers without copying them whole.
pub trait CpuMemory {
    /// Length in bytes of `buffer`, or `None` when no such buffer exists.
    fn len(&self, buffer: u64) -> Option<u64>;
    /// Fills `out` from `buffer` at `offset`; false if out of range or unknown.
    fn read(&self, buffer: u64, offset: u64, out: &mut [u8]) -> bool;
    /// Writes `data` into `buffer` at `offset`; false if out of range or unknown.
    fn write(&mut self, buffer: u64, offset: u64, data: &[u8]) -> bool;
    /// True once the launch should stop early (its executor is being ended): a kernel
    /// that runs for long ([`spin_us`](CATALOG)) looks at it as it goes.
    fn cancelled(&self) -> bool {
        false
    }
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

    /// Runs the CPU reference (after validate), in place: it works through the buffers
    /// [`CPU_CHUNK_ELEMS`] elements at a time, so its scratch memory is a few chunks
    /// whatever the buffer sizes (a guest's launch allocates nothing in proportion to its
    /// buffers), and its results are bit-identical to the typed functions in [`reference`].
    ///
    /// Validates first with `mem`'s lengths, so a bad launch is refused before anything is
    /// written. Aliasing buffers (e.g. saxpy with x == y) behave like the GPU's element-wise
    /// result: each chunk of input is read before the same chunk of output is written.
    /// Where the GPU result under aliasing is a race: reduce's out aliasing x uses x as it
    /// was before the launch (out is written once, at the end); matmul's c aliasing a or b
    /// uses the inputs as they were before the launch when C is a single tile (at most
    /// [`CPU_CHUNK_ELEMS`] elements), and otherwise, like a GPU that ran its blocks one
    /// after another, each tile of C (row-major order) sees the tiles written before it.
    pub fn run_cpu(
        &self,
        args: &[Arg],
        shape: &LaunchShape,
        mem: &mut dyn CpuMemory,
    ) -> Result<(), KernelError> {
        self.validate(args, shape, &|buffer| mem.len(buffer))?;
        (self.cpu)(args, mem)
    }

    /// The launch shape to run instead of `shape` (after [`KernelSpec::validate`]): the
    /// grid cut down to the blocks the kernel's element count needs. Every catalog kernel
    /// walks its elements grid-stride, so the result is the same; a guest's huge grid over
    /// few elements then costs no more device time than the elements need.
    pub fn capped_shape(&self, args: &[Arg], shape: &LaunchShape) -> LaunchShape {
        let threads = shape
            .block
            .iter()
            .map(|&d| u64::from(d))
            .product::<u64>()
            .max(1);
        let [gx, gy, gz] = shape.grid;
        let cap = |n: u64, d: u32| n.clamp(1, u64::from(d)) as u32;
        let elements = |index: usize| u32_at(args, index).map(u64::from).unwrap_or(u64::MAX);
        // Blocks needed for `n` elements flattened over the whole grid.
        let linear = |n: u64| {
            let blocks = n.div_ceil(threads).max(1);
            let x = cap(blocks, gx);
            let y = cap(blocks.div_ceil(u64::from(x)), gy);
            let z = cap(blocks.div_ceil(u64::from(x) * u64::from(y)), gz);
            [x, y, z]
        };
        let grid = match self.name {
            "vector_add_f32" | "saxpy_f32" => linear(elements(3)),
            "scale_f32" | "reduce_sum_f32" | "fill_u32" => linear(elements(2)),
            "matmul_f32" => {
                // Columns of 16-wide tiles over x, rows of tiles over y * z.
                let (m, n) = (elements(3), elements(4));
                let col_tiles = n.div_ceil(16);
                let row_tiles = m.div_ceil(16);
                let y = cap(row_tiles, gy);
                let z = cap(row_tiles.div_ceil(u64::from(y)), gz);
                [cap(col_tiles, gx), y, z]
            }
            _ => shape.grid,
        };
        LaunchShape { grid, ..*shape }
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
    KernelSpec {
        name: "spin_us",
        params: &[Buffer, U32],
        buffers: &[extent(0, 4, &[])],
        check_shape: spin_shape,
        cpu: cpu_spin_us,
        rel_tolerance: 0.0,
    },
];

/// Most blocks a `spin_us` launch may have: a few waves on any GPU, so a launch lasts a
/// few times its `us` at most.
pub const SPIN_MAX_BLOCKS: u64 = 1024;

/// `spin_us` runs for its duration whatever its grid: cap the grid, not the work.
fn spin_shape(shape: &LaunchShape) -> Result<(), KernelError> {
    let blocks = shape.grid.iter().map(|&d| u64::from(d)).product::<u64>();
    if blocks <= SPIN_MAX_BLOCKS {
        Ok(())
    } else {
        Err(KernelError::BadLaunchShape(
            "spin_us takes at most 1024 blocks",
        ))
    }
}

/// The CPU stands in for the GPU's busy wait by sleeping: a device that is busy for `us`.
/// It sleeps in steps of at most 10 ms and stops early, writing nothing, once
/// [`CpuMemory::cancelled`].
fn cpu_spin_us(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let us = u32_at(args, 1)?;
    let end = std::time::Instant::now() + std::time::Duration::from_micros(u64::from(us));
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        if mem.cancelled() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(10)));
    }
    write_bytes(mem, args, 0, 0, &us.to_le_bytes())
}

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

/// The CPU reference works through every buffer this many elements at a time (64 KiB of
/// f32 or u32): it reads a chunk of each input, computes it and writes the chunk of output
/// before the next, so a launch needs a few chunks of scratch memory (under 512 KiB)
/// however large its buffers are. Also the most elements one [`CpuMemory`] call moves.
pub const CPU_CHUNK_ELEMS: usize = 16 * 1024;

/// Consecutive `(first element, element count)` chunks that cover `0..n`.
fn chunks(n: u64) -> impl Iterator<Item = (u64, usize)> {
    let step = CPU_CHUNK_ELEMS as u64;
    (0..n.div_ceil(step)).map(move |i| {
        let first = i * step;
        (first, (n - first).min(step) as usize)
    })
}

/// Scratch elements for a kernel over `n` elements: one chunk at most.
fn chunk_len(n: u64) -> usize {
    n.min(CPU_CHUNK_ELEMS as u64) as usize
}

fn cpu_vector_add_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 3)?);
    let len = chunk_len(n);
    let (mut a, mut b, mut c) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
    let mut io = Io::default();
    // Element i reads only a[i] and b[i] and writes only c[i], all at the same offset, so
    // chunk by chunk equals all at once even when operands alias.
    for (first, count) in chunks(n) {
        let (a, b, c) = (&mut a[..count], &mut b[..count], &mut c[..count]);
        io.read(mem, args, 0, first, a)?;
        io.read(mem, args, 1, first, b)?;
        reference::vector_add_f32(a, b, c);
        io.write(mem, args, 2, first, c)?;
    }
    Ok(())
}

fn cpu_saxpy_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 3)?);
    let alpha = f32_at(args, 2)?;
    let len = chunk_len(n);
    let (mut y, mut x) = (vec![0.0; len], vec![0.0; len]);
    let mut io = Io::default();
    for (first, count) in chunks(n) {
        let (y, x) = (&mut y[..count], &mut x[..count]);
        io.read(mem, args, 0, first, y)?;
        io.read(mem, args, 1, first, x)?;
        reference::saxpy_f32(y, x, alpha);
        io.write(mem, args, 0, first, y)?;
    }
    Ok(())
}

fn cpu_scale_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 2)?);
    let alpha = f32_at(args, 1)?;
    let mut x = vec![0.0; chunk_len(n)];
    let mut io = Io::default();
    for (first, count) in chunks(n) {
        let x = &mut x[..count];
        io.read(mem, args, 0, first, x)?;
        reference::scale_f32(x, alpha);
        io.write(mem, args, 0, first, x)?;
    }
    Ok(())
}

fn cpu_reduce_sum_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 2)?);
    if n == 0 {
        // The kernel's blocks all own no element and skip their atomicAdd.
        return Ok(());
    }
    let mut x = vec![0.0; chunk_len(n)];
    let mut io = Io::default();
    // The same f64 additions in the same order as `reference::sum_f64` over all of x: the
    // first chunk through it, the rest continuing its left fold.
    let mut sum = None;
    for (first, count) in chunks(n) {
        let x = &mut x[..count];
        io.read(mem, args, 0, first, x)?;
        sum = Some(match sum {
            None => reference::sum_f64(x),
            Some(sum) => x.iter().fold(sum, |acc, &v| acc + f64::from(v)),
        });
    }
    // Nothing is written before this point, so an `out` aliasing x[0] still contributed
    // its value from before the launch.
    let mut out = [0.0];
    io.read(mem, args, 1, 0, &mut out)?;
    let total = (f64::from(out[0]) + sum.unwrap_or_default()) as f32;
    io.write(mem, args, 1, 0, &[total])
}

/// Tiles of C, at most [`CPU_CHUNK_ELEMS`] elements each, in row-major tile order. A tile
/// accumulates over k in steps whose blocks of A and B are at most a chunk each, so every
/// element still takes `fma(a, b, acc)` from `+0.0` in increasing k, then the padding,
/// exactly as `reference::matmul_f32` does.
fn cpu_matmul_f32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let [m, n, k] = [3, 4, 5].map(|index| u32_at(args, index).map(u64::from));
    let (m, n, k) = (m?, n?, k?);
    if m == 0 || n == 0 {
        return Ok(()); // C has no element.
    }
    // validate bounded 4*m*k etc. by real buffer lengths, so offsets below cannot overflow.
    let chunk = CPU_CHUNK_ELEMS as u64;
    let cols = n.min(chunk);
    let rows = m.min(chunk / cols);
    let depth = k.min(chunk / rows.max(cols));
    let padding = k.div_ceil(16) * 16 - k;
    let (cols, rows, depth) = (cols as usize, rows as usize, depth as usize);
    let mut acc = vec![0.0f32; rows * cols];
    let mut a_blk = vec![0.0f32; rows * depth];
    let mut b_blk = vec![0.0f32; depth * cols];
    let mut io = Io::default();
    for i0 in (0..m).step_by(rows) {
        let r = (m - i0).min(rows as u64) as usize;
        for j0 in (0..n).step_by(cols) {
            let w = (n - j0).min(cols as u64) as usize;
            let acc = &mut acc[..r * w];
            acc.fill(0.0);
            let mut p0 = 0;
            while p0 < k {
                let d = (k - p0).min(depth as u64) as usize;
                // A[i0 .. i0+r][p0 .. p0+d], one read when whole rows are wanted.
                let a = &mut a_blk[..r * d];
                if d as u64 == k {
                    io.read(mem, args, 0, i0 * k, a)?;
                } else {
                    for (row, a_row) in (i0..).zip(a.chunks_exact_mut(d)) {
                        io.read(mem, args, 0, row * k + p0, a_row)?;
                    }
                }
                // B[p0 .. p0+d][j0 .. j0+w], likewise.
                let b = &mut b_blk[..d * w];
                if w as u64 == n {
                    io.read(mem, args, 1, p0 * n, b)?;
                } else {
                    for (p, b_row) in (p0..).zip(b.chunks_exact_mut(w)) {
                        io.read(mem, args, 1, p * n + j0, b_row)?;
                    }
                }
                for (a_row, c_row) in a.chunks_exact(d).zip(acc.chunks_exact_mut(w)) {
                    for (&a_ip, b_row) in a_row.iter().zip(b.chunks_exact(w)) {
                        for (c, &b_pj) in c_row.iter_mut().zip(b_row) {
                            *c = a_ip.mul_add(b_pj, *c);
                        }
                    }
                }
                p0 += d as u64;
            }
            if padding > 0 {
                for c in acc.iter_mut() {
                    *c = 0.0f32.mul_add(0.0, *c);
                }
            }
            if w as u64 == n {
                io.write(mem, args, 2, i0 * n, acc)?;
            } else {
                for (row, c_row) in (i0..).zip(acc.chunks_exact(w)) {
                    io.write(mem, args, 2, row * n + j0, c_row)?;
                }
            }
        }
    }
    Ok(())
}

fn cpu_fill_u32(args: &[Arg], mem: &mut dyn CpuMemory) -> Result<(), KernelError> {
    let n = u64::from(u32_at(args, 2)?);
    let mut x = vec![0; chunk_len(n)];
    reference::fill_u32(&mut x, u32_at(args, 1)?);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (first, count) in chunks(n) {
        write_bytes(mem, args, 0, first * 4, &bytes[..count * 4])?;
    }
    Ok(())
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

/// The error for a read or write that `CpuMemory` refused after validation passed.
fn access_error(mem: &dyn CpuMemory, buffer: u64, index: usize, needed: u64) -> KernelError {
    match mem.len(buffer) {
        Some(len) => KernelError::BufferTooSmall { index, needed, len },
        None => KernelError::UnknownBuffer { index },
    }
}

/// Moves f32 values between typed chunks and a buffer's little-endian bytes through one
/// reused byte scratch (at most a chunk, as no caller passes more).
#[derive(Default)]
struct Io {
    bytes: Vec<u8>,
}

impl Io {
    /// Fills `out` from buffer parameter `index`, starting at element `first`.
    fn read(
        &mut self,
        mem: &dyn CpuMemory,
        args: &[Arg],
        index: usize,
        first: u64,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        if out.is_empty() {
            return Ok(());
        }
        let buffer = buffer_at(args, index)?;
        let len = out.len() * 4;
        if self.bytes.len() < len {
            self.bytes.resize(len, 0);
        }
        let bytes = &mut self.bytes[..len];
        let offset = first.saturating_mul(4);
        if !mem.read(buffer, offset, bytes) {
            let needed = offset.saturating_add(len as u64);
            return Err(access_error(mem, buffer, index, needed));
        }
        for (value, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *value = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Writes `values` into buffer parameter `index`, starting at element `first`.
    fn write(
        &mut self,
        mem: &mut dyn CpuMemory,
        args: &[Arg],
        index: usize,
        first: u64,
        values: &[f32],
    ) -> Result<(), KernelError> {
        self.bytes.clear();
        self.bytes
            .extend(values.iter().flat_map(|v| v.to_le_bytes()));
        write_bytes(mem, args, index, first.saturating_mul(4), &self.bytes)
    }
}

fn write_bytes(
    mem: &mut dyn CpuMemory,
    args: &[Arg],
    index: usize,
    offset: u64,
    bytes: &[u8],
) -> Result<(), KernelError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let buffer = buffer_at(args, index)?;
    if mem.write(buffer, offset, bytes) {
        Ok(())
    } else {
        let needed = offset.saturating_add(bytes.len() as u64);
        Err(access_error(mem, buffer, index, needed))
    }
}

#[cfg(test)]
mod tests;
