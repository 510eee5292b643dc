// SPDX-License-Identifier: Apache-2.0
//! The occupancy calculator, worked out in the guest: the device's attributes (asked of
//! the host once) and the function's (FUNCTION_INFO, and what the program set) are all
//! it takes. The rules are those of CUDA's occupancy calculator (`cuda_occupancy.h`):
//!
//! - **warps**: an SM holds `max threads per SM / warp size` warps; a block takes its
//!   threads rounded up to whole warps; a block larger than the device allows fits none.
//! - **blocks**: at most `CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR` per SM.
//! - **registers**: allocated per warp, `registers per thread x warp size` rounded up to
//!   256; each of the SM's 4 partitions holds a quarter of its registers, so an SM holds
//!   `4 x (registers per SM / 4 / registers per warp)` warps. A block whose registers
//!   exceed the per-block limit (its warps rounded up to the partitions, as the hardware
//!   checks), or a function above the per-thread maximum, fits none.
//! - **shared memory**: a block takes its static and dynamic shared memory plus what the
//!   driver reserves per block (`CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK`),
//!   rounded up to the allocation granularity (128 bytes from compute capability 8.0,
//!   256 before). The SM's shared memory is the carveout the function prefers
//!   (`CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT`, else its or the context's
//!   cache preference, else all of it) rounded up to a size the SM can be configured to,
//!   or the smallest such size that holds one block when the preference holds none.
//!   Dynamic shared memory above the function's maximum
//!   (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`), or a block above the per-block
//!   limit (the opt-in limit once the function's maximum exceeds the default one), fits
//!   none.
//!
//! The blocks per SM are the least of the four. The suggested block size is searched from
//! the largest allowed (the device's, the function's and the caller's limit) down in
//! steps of the warp size; the first one with the most resident threads wins (so a tie
//! goes to the larger block), and the minimum grid is its blocks per SM times the SMs.
//! Cluster occupancy is not calculated (`cuOccupancyMaxActiveClusters` and
//! `cuOccupancyMaxPotentialClusterSize` answer `CUDA_ERROR_NOT_SUPPORTED`).

use std::ffi::{c_int, c_uint};
use std::sync::atomic::Ordering;

use super::{invalid, out};
use crate::state::driver;
use crate::types::*;
use crate::{guard, Fail, Res};

/// `size_t (*)(int blockSize)`: the dynamic shared memory a block size needs.
pub type CUoccupancyB2DSize = Option<unsafe extern "C" fn(c_int) -> usize>;

/// `CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE`: only devices that CUDA 13 no longer
/// supports (compute capability 5.2 to 6.x) cache globals in a way that costs occupancy,
/// so the flag changes nothing here.
const CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE: c_uint = 1;

/// Register allocation granularity (registers per warp), on every supported device.
const REGISTER_GRANULARITY: i64 = 256;
/// The shared memory sizes an SM of compute capability 8.0 and later can be configured
/// to (KiB), up to its maximum.
const CARVEOUTS_KIB: [i64; 10] = [0, 8, 16, 32, 64, 100, 132, 164, 196, 228];
/// Volta's (7.0, 7.2).
const CARVEOUTS_KIB_VOLTA: [i64; 6] = [0, 8, 16, 32, 64, 96];
/// Turing's (7.5).
const CARVEOUTS_KIB_TURING: [i64; 2] = [32, 64];

/// What the calculator needs of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sm {
    pub cc: (u32, u32),
    pub sms: i64,
    pub warp_size: i64,
    pub max_threads_per_block: i64,
    pub max_threads: i64,
    pub max_blocks: i64,
    pub regs_per_block: i64,
    pub regs: i64,
    pub smem_per_block: i64,
    pub smem_per_block_optin: i64,
    pub smem: i64,
    pub reserved_smem_per_block: i64,
}

impl Sm {
    /// From `CUdevice_attribute` values 1.. (`a[0]` is attribute 1). Missing limits (a
    /// host that answers no attributes) are filled in from the ones present; a device
    /// still without one is `CUDA_ERROR_NOT_SUPPORTED`.
    pub fn from_attributes(cc: (u32, u32), a: &[i32]) -> Res<Sm> {
        let at = |n: usize| a.get(n - 1).map_or(0, |&v| i64::from(v));
        let smem_per_block = at(8);
        let optin = at(97).max(smem_per_block);
        let sm = Sm {
            cc,
            sms: at(16),
            warp_size: at(10),
            max_threads_per_block: at(1),
            max_threads: at(39),
            max_blocks: match at(106) {
                0 => default_max_blocks(cc),
                n => n,
            },
            regs_per_block: at(12),
            regs: match at(82) {
                0 => at(12),
                n => n,
            },
            smem_per_block,
            smem_per_block_optin: optin,
            smem: match at(81) {
                0 => optin,
                n => n,
            },
            reserved_smem_per_block: at(111).max(0),
        };
        let known = [
            sm.sms,
            sm.warp_size,
            sm.max_threads_per_block,
            sm.max_threads,
            sm.max_blocks,
            sm.regs_per_block,
            sm.regs,
            sm.smem_per_block,
            sm.smem,
        ];
        if known.iter().any(|&v| v <= 0) {
            return Err(Fail(CUDA_ERROR_NOT_SUPPORTED));
        }
        Ok(sm)
    }

    fn volta_or_later(&self) -> bool {
        self.cc.0 >= 7
    }

    /// Shared memory is allocated in units of this many bytes.
    fn smem_granularity(&self) -> i64 {
        if self.cc.0 >= 8 {
            128
        } else {
            256
        }
    }

    fn max_regs_per_thread(&self) -> i64 {
        if self.volta_or_later() {
            256
        } else {
            255
        }
    }

    /// Register file partitions (one per scheduler).
    fn partitions(&self) -> i64 {
        if self.cc == (6, 0) {
            2
        } else {
            4
        }
    }

    /// The smallest shared memory size an SM can be configured to that holds `bytes`:
    /// the device's maximum when none does (or the device has one size only).
    fn carveout_at_least(&self, bytes: i64) -> i64 {
        let sizes: &[i64] = match self.cc {
            (7, 5) => &CARVEOUTS_KIB_TURING,
            (7, _) => &CARVEOUTS_KIB_VOLTA,
            (major, _) if major >= 8 => &CARVEOUTS_KIB,
            _ => &[],
        };
        sizes
            .iter()
            .map(|kib| kib << 10)
            .take_while(|&size| size <= self.smem)
            .find(|&size| size >= bytes)
            .unwrap_or(self.smem)
    }

    /// The per-block shared memory limit (with the driver's reservation) for a function
    /// that may use up to `max_per_block` bytes.
    fn smem_limit_per_block(&self, max_per_block: i64) -> i64 {
        let limit = if self.volta_or_later() && max_per_block > self.smem_per_block {
            self.smem_per_block_optin
        } else {
            self.smem_per_block
        };
        if self.cc.0 >= 8 {
            limit + self.reserved_smem_per_block
        } else {
            limit
        }
    }
}

/// Blocks per SM where the device does not say (`cuda_occupancy.h`'s table).
fn default_max_blocks(cc: (u32, u32)) -> i64 {
    match cc {
        (7, 5) | (8, 6) | (8, 7) => 16,
        (8, 9) | (12, _) => 24,
        _ => 32,
    }
}

/// What the calculator needs of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Func {
    pub max_threads_per_block: i64,
    pub regs: i64,
    pub static_smem: i64,
    pub max_dynamic_smem: i64,
    /// `CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT`: a percentage, or -1.
    pub carveout: i32,
    /// `CU_FUNC_CACHE_PREFER_*` of the function, else of its context.
    pub cache_config: u32,
}

impl Func {
    /// The shared memory per SM the function prefers, as a size the SM can be
    /// configured to.
    fn preferred_smem(&self, sm: &Sm) -> Res<i64> {
        if !sm.volta_or_later() {
            return Ok(sm.smem);
        }
        let percent = match (self.carveout, self.cache_config) {
            (c, _) if !(-1..=100).contains(&c) => return Err(invalid()),
            (-1, 1) => 100, // CU_FUNC_CACHE_PREFER_SHARED
            (-1, 2) => 0,   // CU_FUNC_CACHE_PREFER_L1
            (-1, 3) => 50,  // CU_FUNC_CACHE_PREFER_EQUAL
            (-1, _) => 100,
            (c, _) => i64::from(c),
        };
        Ok(sm.carveout_at_least(percent * sm.smem / 100))
    }
}

/// `x / unit` rounded up, for `x >= 0` and `unit > 0`.
fn div_ceil(x: i64, unit: i64) -> i64 {
    x / unit + i64::from(x % unit != 0)
}

fn round_up(x: i64, unit: i64) -> i64 {
    div_ceil(x, unit).saturating_mul(unit)
}

/// Blocks per SM as warps allow.
fn blocks_by_warps(sm: &Sm, block: i64) -> i64 {
    if block > sm.max_threads_per_block {
        return 0;
    }
    (sm.max_threads / sm.warp_size) / div_ceil(block, sm.warp_size)
}

/// Blocks per SM as registers allow.
fn blocks_by_registers(sm: &Sm, f: &Func, block: i64) -> i64 {
    let warps = div_ceil(block, sm.warp_size);
    let per_warp = round_up(f.regs.saturating_mul(sm.warp_size), REGISTER_GRANULARITY);
    let per_block = per_warp.saturating_mul(warps);
    let checked = per_warp.saturating_mul(round_up(warps, sm.partitions()));
    if per_block > sm.regs_per_block
        || checked > sm.regs_per_block
        || f.regs > sm.max_regs_per_thread()
    {
        return 0;
    }
    if per_warp == 0 {
        return i64::MAX;
    }
    let warps_per_sm = sm.regs / sm.partitions() / per_warp * sm.partitions();
    warps_per_sm / warps
}

/// Blocks per SM as shared memory allows, with `dynamic` bytes of it per block.
fn blocks_by_shared_memory(sm: &Sm, f: &Func, dynamic: i64) -> Res<i64> {
    let preferred = f.preferred_smem(sm)?;
    let fixed = f.static_smem + sm.reserved_smem_per_block;
    let per_block = round_up(fixed.saturating_add(dynamic), sm.smem_granularity());
    let limit = sm.smem_limit_per_block(fixed.saturating_add(f.max_dynamic_smem));
    if dynamic > f.max_dynamic_smem || per_block > limit {
        return Ok(0);
    }
    if per_block == 0 {
        return Ok(i64::MAX);
    }
    let per_sm = if preferred >= per_block {
        preferred
    } else if sm.volta_or_later() {
        sm.carveout_at_least(per_block)
    } else {
        sm.smem
    };
    Ok(per_sm / per_block)
}

fn check(f: &Func) -> Res<()> {
    if f.max_threads_per_block <= 0 || f.regs < 0 || f.static_smem < 0 {
        return Err(invalid());
    }
    Ok(())
}

/// Blocks of `block` threads with `dynamic` bytes of dynamic shared memory each that an
/// SM holds at once.
pub(crate) fn max_active_blocks(sm: &Sm, f: &Func, block: i64, dynamic: i64) -> Res<i64> {
    check(f)?;
    if block <= 0 || dynamic < 0 {
        return Err(invalid());
    }
    Ok(blocks_by_warps(sm, block)
        .min(sm.max_blocks)
        .min(blocks_by_registers(sm, f, block))
        .min(blocks_by_shared_memory(sm, f, dynamic)?))
}

/// (minimum grid size, block size) for the most resident threads per SM; `dynamic` is
/// the dynamic shared memory a block size needs, `limit` the largest block the caller
/// takes (0: none).
pub(crate) fn max_potential_block_size(
    sm: &Sm,
    f: &Func,
    mut dynamic: impl FnMut(i64) -> i64,
    limit: i64,
) -> Res<(i64, i64)> {
    check(f)?;
    if limit < 0 {
        return Err(invalid());
    }
    let mut largest = sm.max_threads_per_block.min(f.max_threads_per_block);
    if limit > 0 {
        largest = largest.min(limit);
    }
    let (mut best_block, mut best_blocks, mut best_threads) = (0, 0, 0);
    let mut aligned = round_up(largest, sm.warp_size);
    while aligned > 0 {
        let block = aligned.min(largest);
        let blocks = max_active_blocks(sm, f, block, dynamic(block))?;
        let threads = block.saturating_mul(blocks);
        if threads > best_threads {
            (best_block, best_blocks, best_threads) = (block, blocks, threads);
        }
        if best_threads == sm.max_threads {
            break;
        }
        aligned -= sm.warp_size;
    }
    Ok((best_blocks.saturating_mul(sm.sms), best_block))
}

/// The most dynamic shared memory a block of `block` threads can have for `blocks` of
/// them to fit on an SM at once.
pub(crate) fn available_dynamic_smem(sm: &Sm, f: &Func, blocks: i64, block: i64) -> Res<i64> {
    if blocks <= 0 || max_active_blocks(sm, f, block, 0)? < blocks {
        return Err(invalid());
    }
    let limit = sm.smem_limit_per_block(sm.smem);
    let per_sm = if blocks == 1 {
        limit
    } else {
        match f.preferred_smem(sm)? {
            0 => sm.carveout_at_least(1),
            preferred => preferred,
        }
    };
    let granularity = sm.smem_granularity();
    let per_block = (per_sm / blocks / granularity * granularity).min(limit);
    Ok((per_block - f.static_smem).clamp(0, f.max_dynamic_smem.max(0)))
}

/// The device and function `func` (a `CUfunction` or `CUkernel`) describe.
fn inputs(func: CUfunction) -> Res<(Sm, Func)> {
    let d = driver()?;
    let f = d.function_like(func, None)?;
    let info = f.info.as_ref().ok_or(Fail(CUDA_ERROR_NOT_SUPPORTED))?;
    let ctx = &f.module.ctx;
    let slot = d.device(ctx.device as CUdevice)?;
    let attributes = d.attributes(slot)?;
    let cc = (
        u32::from(slot.config.cc_major),
        u32::from(slot.config.cc_minor),
    );
    let sm = Sm::from_attributes(cc, &attributes)?;
    let cache_config = match f.cache_config.load(Ordering::Relaxed) {
        0 => ctx.cache_config.load(Ordering::Relaxed),
        own => own,
    };
    let a = &info.attributes;
    Ok((
        sm,
        Func {
            max_threads_per_block: i64::from(a[0]),
            regs: i64::from(a[4]),
            static_smem: i64::from(a[1]),
            max_dynamic_smem: i64::from(f.max_dynamic_shared.load(Ordering::Relaxed)),
            carveout: f.carveout.load(Ordering::Relaxed),
            cache_config,
        },
    ))
}

fn check_flags(flags: c_uint) -> Res<()> {
    if flags & !CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE != 0 {
        return Err(invalid());
    }
    Ok(())
}

/// A `size_t` count of bytes, saturated.
fn bytes(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_int(v: i64) -> c_int {
    c_int::try_from(v).unwrap_or(c_int::MAX)
}

fn active_blocks(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic: usize,
    flags: c_uint,
) -> Res<()> {
    check_flags(flags)?;
    let (sm, f) = inputs(func)?;
    let n = max_active_blocks(&sm, &f, i64::from(block_size), bytes(dynamic))?;
    // SAFETY: NVIDIA's contract for the out-parameter.
    unsafe { out(num_blocks, to_int(n)) }
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic_smem_size: usize,
) -> CUresult {
    guard("cuOccupancyMaxActiveBlocksPerMultiprocessor", || {
        active_blocks(num_blocks, func, block_size, dynamic_smem_size, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    num_blocks: *mut c_int,
    func: CUfunction,
    block_size: c_int,
    dynamic_smem_size: usize,
    flags: c_uint,
) -> CUresult {
    guard(
        "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags",
        || active_blocks(num_blocks, func, block_size, dynamic_smem_size, flags),
    )
}

/// # Safety
/// `to_dynamic` is NULL or a function NVIDIA's contract lets us call with block sizes.
unsafe fn potential_block_size(
    min_grid_size: *mut c_int,
    block_size: *mut c_int,
    func: CUfunction,
    to_dynamic: CUoccupancyB2DSize,
    dynamic: usize,
    limit: c_int,
    flags: c_uint,
) -> Res<()> {
    if min_grid_size.is_null() || block_size.is_null() {
        return Err(invalid());
    }
    check_flags(flags)?;
    let (sm, f) = inputs(func)?;
    let per_block = |block: i64| match to_dynamic {
        // SAFETY: the caller's function, called with a block size as documented.
        Some(cb) => bytes(unsafe { cb(to_int(block)) }),
        None => bytes(dynamic),
    };
    let (grid, block) = max_potential_block_size(&sm, &f, per_block, i64::from(limit))?;
    // SAFETY: both checked non-NULL; writable by NVIDIA's contract.
    unsafe {
        out(min_grid_size, to_int(grid))?;
        out(block_size, to_int(block))
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSize(
    min_grid_size: *mut c_int,
    block_size: *mut c_int,
    func: CUfunction,
    block_size_to_dynamic_smem_size: CUoccupancyB2DSize,
    dynamic_smem_size: usize,
    block_size_limit: c_int,
) -> CUresult {
    guard("cuOccupancyMaxPotentialBlockSize", || {
        // SAFETY: forwarded contract.
        unsafe {
            potential_block_size(
                min_grid_size,
                block_size,
                func,
                block_size_to_dynamic_smem_size,
                dynamic_smem_size,
                block_size_limit,
                0,
            )
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSizeWithFlags(
    min_grid_size: *mut c_int,
    block_size: *mut c_int,
    func: CUfunction,
    block_size_to_dynamic_smem_size: CUoccupancyB2DSize,
    dynamic_smem_size: usize,
    block_size_limit: c_int,
    flags: c_uint,
) -> CUresult {
    guard("cuOccupancyMaxPotentialBlockSizeWithFlags", || {
        // SAFETY: forwarded contract.
        unsafe {
            potential_block_size(
                min_grid_size,
                block_size,
                func,
                block_size_to_dynamic_smem_size,
                dynamic_smem_size,
                block_size_limit,
                flags,
            )
        }
    })
}

/// Per `cuda_occupancy.h`: the SM's preferred shared memory (all of the per-block limit
/// for a single block) divided among the blocks, less the static shared memory, at most
/// the function's maximum dynamic shared memory. `CUDA_ERROR_INVALID_VALUE` when that
/// many blocks of that size cannot be resident at all.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    dynamic_smem_size: *mut usize,
    func: CUfunction,
    num_blocks: c_int,
    block_size: c_int,
) -> CUresult {
    guard("cuOccupancyAvailableDynamicSMemPerBlock", || {
        if dynamic_smem_size.is_null() {
            return Err(invalid());
        }
        let (sm, f) = inputs(func)?;
        let n = available_dynamic_smem(&sm, &f, i64::from(num_blocks), i64::from(block_size))?;
        // SAFETY: checked non-NULL; writable by NVIDIA's contract.
        unsafe { out(dynamic_smem_size, usize::try_from(n).unwrap_or(0)) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NVIDIA H200 as its driver describes it: compute capability 9.0, 132 SMs of
    /// 2048 threads, 32 blocks, 64 Ki registers and 228 KiB of shared memory each; 1024
    /// threads, 64 Ki registers, 48 KiB (227 KiB opted in) of shared memory per block,
    /// 1 KiB of it reserved by the driver.
    fn h200() -> Sm {
        let mut a = vec![0; 147];
        for (attr, value) in [
            (1, 1024),
            (8, 48 << 10),
            (10, 32),
            (12, 64 << 10),
            (16, 132),
            (39, 2048),
            (81, 228 << 10),
            (82, 64 << 10),
            (97, 227 << 10),
            (106, 32),
            (111, 1 << 10),
        ] {
            a[attr - 1] = value;
        }
        Sm::from_attributes((9, 0), &a).unwrap()
    }

    /// A kernel as ptxas describes it, with the driver's defaults: dynamic shared memory
    /// up to 48 KiB less the static, no carveout or cache preference.
    fn kernel(regs: i64, static_smem: i64) -> Func {
        Func {
            max_threads_per_block: 1024,
            regs,
            static_smem,
            max_dynamic_smem: (48 << 10) - static_smem,
            carveout: -1,
            cache_config: 0,
        }
    }

    fn suggest(f: &Func, dynamic: i64, limit: i64) -> (i64, i64) {
        max_potential_block_size(&h200(), f, |_| dynamic, limit).unwrap()
    }

    #[test]
    fn a_light_kernel_fills_the_sm_with_two_blocks_of_1024() {
        // cudarc's sin_kernel: few registers, no shared memory. 1024 threads: 32 warps,
        // 64 / 32 = 2 blocks by warps; 8 regs x 32 = 256 per warp, 16384 / 256 = 64
        // warps per partition, 256 per SM: 8 blocks; 1 KiB reserved: 228 blocks by
        // shared memory. 2 x 1024 = 2048 threads, the SM's all, found at once.
        let f = kernel(8, 0);
        assert_eq!(suggest(&f, 0, 0), (264, 1024));
        assert_eq!(264 * 1024, 270_336, "132 SMs x 2048 threads");
        let sm = h200();
        assert_eq!(max_active_blocks(&sm, &f, 1024, 0), Ok(2));
        assert_eq!(max_active_blocks(&sm, &f, 256, 0), Ok(8));
        // 32 threads: 64 blocks by warps, capped at 32 blocks per SM.
        assert_eq!(max_active_blocks(&sm, &f, 32, 0), Ok(32));
        assert_eq!(
            max_active_blocks(&sm, &f, 1025, 0),
            Ok(0),
            "over the device's limit"
        );
        assert_eq!(max_active_blocks(&sm, &f, 0, 0), Err(invalid()));
        // A caller's limit of 200 threads: 200 (7 warps): 9 blocks, 1800 threads;
        // 192 (6): 10, 1920; 160 (5): 12, 1920 (no better); 128 (4): 16, 2048: the SM's
        // all, so the search ends there.
        assert_eq!(suggest(&f, 0, 200), (16 * 132, 128));
    }

    #[test]
    fn a_register_heavy_kernel_is_limited_by_registers() {
        // 128 regs x 32 = 4096 per warp; 16384 / 4096 = 4 warps per partition, 16 per
        // SM. 1024 threads need 32 x 4096 = 128 Ki registers: over the 64 Ki per block,
        // none. 512 (16 warps): 1 block, 512 threads. 256 (8 warps): 2 blocks, 512 again
        // (a tie keeps the larger block). Nothing does better than 16 warps.
        let f = kernel(128, 0);
        let sm = h200();
        assert_eq!(max_active_blocks(&sm, &f, 1024, 0), Ok(0));
        assert_eq!(max_active_blocks(&sm, &f, 512, 0), Ok(1));
        assert_eq!(max_active_blocks(&sm, &f, 256, 0), Ok(2));
        // 96 threads, 3 warps: 16 / 3 = 5 blocks.
        assert_eq!(max_active_blocks(&sm, &f, 96, 0), Ok(5));
        assert_eq!(suggest(&f, 0, 0), (132, 512));
        // 256 registers per thread are allowed, 257 are not.
        // 256 x 32 = 8192 per warp: 2 warps per partition, 8 per SM.
        assert_eq!(max_active_blocks(&sm, &kernel(256, 0), 32, 0), Ok(8));
        assert_eq!(max_active_blocks(&sm, &kernel(257, 0), 32, 0), Ok(0));
    }

    #[test]
    fn registers_are_allocated_per_warp_in_units_of_256() {
        // 37 regs x 32 = 1184, allocated as 1280 per warp: 16384 / 1280 = 12 warps per
        // partition, 48 per SM (1536 threads at most). 416 threads (13 warps): 3 blocks,
        // 1248 threads; without the rounding it would be 52 / 13 = 4 (1664 threads) and
        // win. 1024: 1 block; 992..800: 1; 768 (24 warps): 2 blocks, 1536: the best.
        let f = kernel(37, 0);
        let sm = h200();
        assert_eq!(max_active_blocks(&sm, &f, 416, 0), Ok(3));
        assert_eq!(max_active_blocks(&sm, &f, 1024, 0), Ok(1));
        assert_eq!(suggest(&f, 0, 0), (264, 768));
    }

    #[test]
    fn a_shared_memory_heavy_kernel_is_limited_by_shared_memory() {
        let sm = h200();
        // 40 KiB static + 1 KiB reserved = 41984 bytes (a multiple of 128): 233472 /
        // 41984 = 5 blocks. 128 threads: 16 by warps, so 5.
        let f = kernel(16, 40 << 10);
        assert_eq!(max_active_blocks(&sm, &f, 128, 0), Ok(5));
        assert_eq!(
            suggest(&f, 0, 0),
            (264, 1024),
            "warps still limit 1024 to 2"
        );
        // 150 KiB of dynamic shared memory after opting in to 227 KiB: 153600 + 1024 =
        // 154624 bytes a block, one per SM; the largest block wins: 1024 threads.
        let mut big = kernel(16, 0);
        big.max_dynamic_smem = 227 << 10;
        assert_eq!(max_active_blocks(&sm, &big, 1024, 150 << 10), Ok(1));
        assert_eq!(max_active_blocks(&sm, &big, 1024, 100 << 10), Ok(2));
        assert_eq!(suggest(&big, 150 << 10, 0), (132, 1024));
        // 227 KiB + 1 KiB reserved is the whole SM: one block; 1 byte more fits none.
        assert_eq!(max_active_blocks(&sm, &big, 32, 227 << 10), Ok(1));
        assert_eq!(max_active_blocks(&sm, &big, 32, (227 << 10) + 1), Ok(0));
        // Without opting in, dynamic shared memory above 48 KiB fits none.
        assert_eq!(max_active_blocks(&sm, &kernel(16, 0), 32, 64 << 10), Ok(0));
        assert_eq!(suggest(&kernel(16, 0), 64 << 10, 0), (0, 0));
        // Sizes are rounded up to 128 bytes: 20096 + 1024 = 21120 bytes (165 x 128):
        // 233472 / 21120 = 11 blocks; one byte more takes 21248: 10.
        assert_eq!(max_active_blocks(&sm, &big, 32, 20096), Ok(11));
        assert_eq!(max_active_blocks(&sm, &big, 32, 20097), Ok(10));
    }

    #[test]
    fn dynamic_shared_memory_per_block_size_comes_from_the_callers_function() {
        // 128 bytes per thread, opted in to 227 KiB. 1024: 132096 bytes, 1 block, 1024
        // threads; 992..928: 1 block; 896: 114688 + 1024 = 115712 bytes, 2 blocks (and
        // 2 by warps): 1792 threads. Below: 448 gives 4 x 448 = 1792 too (a tie),
        // 512: 3 blocks, 1536; 128: 13 blocks, 1664; none reaches 1792 + 1.
        let mut f = kernel(8, 0);
        f.max_dynamic_smem = 227 << 10;
        let r = max_potential_block_size(&h200(), &f, |block| block * 128, 0);
        assert_eq!(r, Ok((264, 896)));
    }

    #[test]
    fn the_carveout_preference_sets_the_shared_memory_of_the_sm() {
        let sm = h200();
        let mut f = kernel(8, 0);
        assert_eq!(max_active_blocks(&sm, &f, 128, 0), Ok(16));
        // All L1: the 1 KiB a block reserves needs the smallest carveout, 8 KiB: 8
        // blocks.
        f.carveout = 0;
        assert_eq!(max_active_blocks(&sm, &f, 128, 0), Ok(8));
        f.carveout = -1;
        f.cache_config = 2; // CU_FUNC_CACHE_PREFER_L1
        assert_eq!(max_active_blocks(&sm, &f, 128, 0), Ok(8));
        // 50%: 114 KiB, configured as 132 KiB: 132 blocks of 1 KiB (16 by warps).
        f.carveout = 50;
        assert_eq!(max_active_blocks(&sm, &f, 128, 0), Ok(16));
        f.carveout = 101;
        assert_eq!(max_active_blocks(&sm, &f, 128, 0), Err(invalid()));
        assert_eq!(sm.carveout_at_least(1), 8 << 10);
        assert_eq!(sm.carveout_at_least(101 << 10), 132 << 10);
        assert_eq!(sm.carveout_at_least(300 << 10), 228 << 10);
    }

    #[test]
    fn available_dynamic_shared_memory_divides_the_preferred_carveout() {
        let sm = h200();
        let mut f = kernel(8, 0);
        // One block: the per-block limit (227 KiB + the reserved 1 KiB), capped by the
        // function's maximum: 48 KiB by default, 227 KiB opted in.
        assert_eq!(available_dynamic_smem(&sm, &f, 1, 1024), Ok(48 << 10));
        f.max_dynamic_smem = 227 << 10;
        assert_eq!(available_dynamic_smem(&sm, &f, 1, 1024), Ok(227 << 10));
        // Two: 228 KiB / 2 = 114 KiB.
        assert_eq!(available_dynamic_smem(&sm, &f, 2, 1024), Ok(114 << 10));
        // Five with 40 KiB static: 233472 / 5 = 46694, 46592 in 128-byte units, less
        // 40960.
        f.static_smem = 40 << 10;
        assert_eq!(available_dynamic_smem(&sm, &f, 5, 128), Ok(46592 - 40960));
        // Three blocks of 1024 threads never fit (2 by warps), nor do 0 blocks.
        assert_eq!(available_dynamic_smem(&sm, &f, 3, 1024), Err(invalid()));
        assert_eq!(available_dynamic_smem(&sm, &f, 0, 1024), Err(invalid()));
    }

    #[test]
    fn devices_without_attributes_or_of_other_generations() {
        assert_eq!(
            Sm::from_attributes((9, 0), &[]),
            Err(Fail(CUDA_ERROR_NOT_SUPPORTED))
        );
        // A Turing GPU (7.5): 40 SMs of 1024 threads, 16 blocks, 64 KiB of shared
        // memory configurable as 32 or 64 KiB, 256-byte allocation, nothing reserved.
        let mut a = vec![0; 147];
        for (attr, value) in [
            (1, 1024),
            (8, 48 << 10),
            (10, 32),
            (12, 64 << 10),
            (16, 40),
            (39, 1024),
            (81, 64 << 10),
            (82, 64 << 10),
            (97, 64 << 10),
        ] {
            a[attr - 1] = value;
        }
        let turing = Sm::from_attributes((7, 5), &a).unwrap();
        assert_eq!(turing.max_blocks, 16, "from the table when not asked");
        let f = kernel(32, 0);
        // 32 regs: 1024 per warp, 16 warps per partition: 64 per SM; warps: 32 per SM.
        assert_eq!(
            max_potential_block_size(&turing, &f, |_| 0, 0),
            Ok((40, 1024))
        );
        // 20 KiB + 1 byte of static shared memory takes 20736 bytes: 3 per 64 KiB.
        let g = kernel(32, (20 << 10) + 1);
        assert_eq!(max_active_blocks(&turing, &g, 64, 0), Ok(3));
    }
}
