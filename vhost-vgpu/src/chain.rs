// SPDX-License-Identifier: Apache-2.0
//! Descriptor chains, checked whole before any byte of them is used.
//!
//! A request chain is a run of device-readable descriptors followed by a run of
//! device-writable ones. [`Chain::parse`] walks the chain once (through an indirect table
//! if there is one), refuses every shape the device cannot trust and keeps only guest
//! address ranges: the readable ones are gathered when the request is decoded, the
//! writable ones are kept with the request until its completion is written back.

use std::ops::Deref;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use vgpu_mediator::GuestAccessError;

use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};

/// A guest-physical byte range. Adjacent descriptors are merged into one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub addr: GuestAddress,
    pub len: u64,
}

/// Why a chain cannot be used at all. Such a chain is returned with nothing written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    #[error("the chain has no descriptors")]
    Empty,
    #[error(
        "the chain breaks off after {0} descriptors (a loop, a next index outside the table, \
         an unreadable or nested indirect table, or more than 4 GiB)"
    )]
    Truncated(usize),
    #[error("the chain has more than {0} descriptors")]
    TooLong(usize),
    #[error("descriptor {0} is device-readable but follows a device-writable one")]
    ReadableAfterWritable(usize),
    #[error("descriptor {index} ({addr:#x}, {len} bytes) is not inside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
}

/// Why copying to or from a checked chain failed: guest memory changed under it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessError {
    #[error("guest memory access")]
    Memory(#[from] GuestMemoryError),
    #[error("{wanted} bytes at offset {offset} do not fit in {total} bytes of buffers")]
    OutOfBounds {
        offset: u64,
        wanted: u64,
        total: u64,
    },
}

/// A chain whose every descriptor lies in guest memory, readable ones first.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    pub readable: Vec<Region>,
    pub readable_len: u64,
    pub writable: Vec<Region>,
    pub writable_len: u64,
    /// A descriptor of length zero was present (well-formed otherwise, but not a request).
    pub has_empty_descriptor: bool,
}

impl Chain {
    /// Walks `descriptors` and checks the whole chain against `mem`.
    ///
    /// virtio-queue's iterator stops silently on a loop (its time-to-live runs out), a next
    /// index outside the table, an unreadable or nested indirect table, or a byte count
    /// overflow; a chain that stops on a descriptor that still says NEXT was therefore cut
    /// short and is refused. `max_descriptors` bounds the count independently of that (the
    /// virtio spec forbids chains longer than the queue, indirect ones included).
    pub fn parse<M>(
        descriptors: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        max_descriptors: usize,
    ) -> Result<Chain, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut chain = Chain::default();
        let mut count = 0usize;
        let mut last_has_next = false;
        let mut seen_writable = false;
        for desc in descriptors {
            if count == max_descriptors {
                return Err(ChainError::TooLong(max_descriptors));
            }
            let index = count;
            count += 1;
            last_has_next = desc.has_next();

            let (addr, len) = (desc.addr(), desc.len());
            if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
                return Err(ChainError::OutsideMemory {
                    index,
                    addr: addr.0,
                    len,
                });
            }
            if desc.is_write_only() {
                seen_writable = true;
                push_region(&mut chain.writable, addr, len);
                chain.writable_len += u64::from(len);
            } else {
                if seen_writable {
                    return Err(ChainError::ReadableAfterWritable(index));
                }
                push_region(&mut chain.readable, addr, len);
                chain.readable_len += u64::from(len);
            }
            if len == 0 {
                chain.has_empty_descriptor = true;
            }
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            return Err(ChainError::Truncated(count));
        }
        Ok(chain)
    }

    /// Copies readable bytes `[offset, offset + out.len())` into `out`.
    pub fn read(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), AccessError> {
        for_each_piece(&self.readable, offset, out.len() as u64, |addr, at, len| {
            mem.read_slice(&mut out[at..at + len], addr)
        })
    }

    /// Appends readable bytes `[offset, offset + len)` to `out`, straight from guest memory.
    pub fn append(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), AccessError> {
        for_each_piece(&self.readable, offset, len, |addr, _, len| {
            mem.write_all_volatile_to(addr, out, len)
        })
    }
}

/// Copies `data` into the writable stream described by `regions`, starting `offset`
/// bytes into it.
pub(crate) fn write_regions(
    mem: &GuestMemoryMmap,
    regions: &[Region],
    offset: u64,
    data: &[u8],
) -> Result<(), AccessError> {
    for_each_piece(regions, offset, data.len() as u64, |addr, at, len| {
        mem.write_slice(&data[at..at + len], addr)
    })
}

/// Whether the guest still lets the device use the buffers of the requests it handed
/// over. Closed for good when the guest resets the device or its ring stops (the guest
/// may reuse those pages at once): a copy holds it open while it touches guest memory,
/// and closing waits for such a copy to finish.
pub(crate) struct Gate(RwLock<bool>);

impl Gate {
    pub fn open() -> Arc<Gate> {
        Arc::new(Gate(RwLock::new(true)))
    }

    /// Closes the gate once no copy runs; no copy starts after.
    pub fn close(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = false;
    }

    fn enter(&self) -> Result<RwLockReadGuard<'_, bool>, GuestAccessError> {
        let open = self.0.read().unwrap_or_else(|e| e.into_inner());
        if *open {
            Ok(open)
        } else {
            Err(GuestAccessError::Revoked)
        }
    }
}

/// A byte range of a chain's readable or writable stream, read or written in place by
/// an executor: the request's data never goes through a host buffer of its own. It holds
/// the memory table the chain was checked against, so a table that QEMU replaces while
/// the copy is queued or running stays mapped until the copy is done.
pub(crate) struct GuestData {
    gate: Arc<Gate>,
    mem: Arc<GuestMemoryMmap>,
    regions: Vec<Region>,
    /// Where the data starts in the stream.
    start: u64,
    len: u64,
}

impl GuestData {
    /// Bytes `[start, start + len)` of the stream `regions` form in `mem`; `None` unless
    /// the regions hold them.
    pub fn new(
        gate: Arc<Gate>,
        mem: Arc<GuestMemoryMmap>,
        regions: Vec<Region>,
        start: u64,
        len: u64,
    ) -> Option<GuestData> {
        let total: u64 = regions.iter().map(|r| r.len).sum();
        matches!(start.checked_add(len), Some(end) if end <= total).then_some(GuestData {
            gate,
            mem,
            regions,
            start,
            len,
        })
    }

    fn at(&self, offset: u64, len: usize) -> Result<u64, GuestAccessError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.start + offset),
            _ => Err(GuestAccessError::OutOfRange {
                offset,
                len: len as u64,
                total: self.len,
            }),
        }
    }
}

impl GuestData {
    /// The guest-physical pieces of the data, in order.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        // Cannot fail: `new` checked that the regions hold the range.
        let _ = for_each_piece(&self.regions, self.start, self.len, |addr, _, n| {
            out.push((addr.0, n as u64));
            Ok(())
        });
        out
    }
}

impl vgpu_mediator::GuestSource for GuestData {
    fn len(&self) -> u64 {
        self.len
    }

    fn guest_ranges(&self) -> Option<Vec<(u64, u64)>> {
        Some(self.ranges())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), GuestAccessError> {
        let at = self.at(offset, out.len())?;
        let _open = self.gate.enter()?;
        for_each_piece(&self.regions, at, out.len() as u64, |addr, i, n| {
            self.mem.read_slice(&mut out[i..i + n], addr)
        })
        .map_err(|e| GuestAccessError::Memory(e.to_string()))
    }
}

impl vgpu_mediator::GuestSink for GuestData {
    fn capacity(&self) -> u64 {
        self.len
    }

    fn guest_ranges(&self) -> Option<Vec<(u64, u64)>> {
        Some(self.ranges())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), GuestAccessError> {
        let at = self.at(offset, data.len())?;
        let _open = self.gate.enter()?;
        for_each_piece(&self.regions, at, data.len() as u64, |addr, i, n| {
            self.mem.write_slice(&data[i..i + n], addr)
        })
        .map_err(|e| GuestAccessError::Memory(e.to_string()))
    }
}

/// The pieces of the VM's memory files that hold a host buffer's guest-physical
/// `chunks`, in order; `None` if a chunk is not wholly inside file-backed guest memory.
pub(crate) fn host_mapping(
    mem: &GuestMemoryMmap,
    chunks: &[vgpu_protocol::HostChunk],
) -> Option<vgpu_mediator::hostmap::HostMapping> {
    let mut pieces = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let (mut addr, mut left) = (chunk.addr, chunk.len);
        while left > 0 {
            let region = mem.find_region(GuestAddress(addr))?;
            let inside = addr - region.start_addr().0;
            let file = region.file_offset()?;
            let n = left.min(region.len() - inside);
            pieces.push(vgpu_mediator::hostmap::FilePiece {
                file: file.arc().clone(),
                offset: file.start().checked_add(inside)?,
                len: n,
            });
            addr += n;
            left -= n;
        }
    }
    Some(vgpu_mediator::hostmap::HostMapping { pieces })
}

fn push_region(regions: &mut Vec<Region>, addr: GuestAddress, len: u32) {
    if len == 0 {
        return;
    }
    let len = u64::from(len);
    if let Some(last) = regions.last_mut() {
        if last.addr.0.checked_add(last.len) == Some(addr.0) {
            last.len += len;
            return;
        }
    }
    regions.push(Region { addr, len });
}

/// Calls `f(guest address, offset into the caller's buffer, length)` for each piece of
/// the byte range `[offset, offset + len)` of the stream that `regions` form.
fn for_each_piece<F>(regions: &[Region], offset: u64, len: u64, mut f: F) -> Result<(), AccessError>
where
    F: FnMut(GuestAddress, usize, usize) -> Result<(), GuestMemoryError>,
{
    let total: u64 = regions.iter().map(|r| r.len).sum();
    let fits = matches!(offset.checked_add(len), Some(end) if end <= total);
    if !fits {
        return Err(AccessError::OutOfBounds {
            offset,
            wanted: len,
            total,
        });
    }
    let (mut skip, mut done) = (offset, 0u64);
    for region in regions {
        if done == len {
            break;
        }
        if skip >= region.len {
            skip -= region.len;
            continue;
        }
        let n = (region.len - skip).min(len - done);
        f(
            GuestAddress(region.addr.0 + skip),
            done as usize,
            n as usize,
        )?;
        done += n;
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(spec: &[(u64, u64)]) -> Vec<Region> {
        spec.iter()
            .map(|&(addr, len)| Region {
                addr: GuestAddress(addr),
                len,
            })
            .collect()
    }

    #[test]
    fn adjacent_descriptors_merge_and_gaps_do_not() {
        let mut r = Vec::new();
        push_region(&mut r, GuestAddress(0x1000), 0x100);
        push_region(&mut r, GuestAddress(0x1100), 0x100);
        push_region(&mut r, GuestAddress(0x1300), 0x10);
        push_region(&mut r, GuestAddress(0x2000), 0);
        assert_eq!(r, regions(&[(0x1000, 0x200), (0x1300, 0x10)]));
    }

    #[test]
    fn pieces_split_at_region_boundaries_and_honour_the_offset() {
        let r = regions(&[(0x1000, 10), (0x2000, 5), (0x3000, 20)]);
        let mut pieces = Vec::new();
        for_each_piece(&r, 8, 10, |addr, at, len| {
            pieces.push((addr.0, at, len));
            Ok(())
        })
        .unwrap();
        assert_eq!(pieces, vec![(0x1008, 0, 2), (0x2000, 2, 5), (0x3000, 7, 3)]);
    }

    #[test]
    fn a_range_past_the_end_is_refused_before_any_copy() {
        let r = regions(&[(0x1000, 10)]);
        let mut called = false;
        let err = for_each_piece(&r, 4, 7, |_, _, _| {
            called = true;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(
            err,
            AccessError::OutOfBounds {
                offset: 4,
                wanted: 7,
                total: 10
            }
        ));
        assert!(!called);
        assert!(for_each_piece(&r, u64::MAX, 2, |_, _, _| Ok(())).is_err());
    }
}
