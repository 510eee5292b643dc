// SPDX-License-Identifier: Apache-2.0
//! Guest RAM: one memfd mapped `MAP_SHARED`, so the backend maps the very same pages
//! from the fd it receives in `SET_MEM_TABLE`.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;

use super::{Error, Result};

/// Guest physical address of the first byte of RAM. Not zero, so that addresses below
/// RAM exist for hostile-guest tests as well as addresses above it.
pub const DEFAULT_RAM_BASE: u64 = 0x10_0000;

/// The guest's memory, and a bump allocator that hands out physically contiguous ranges
/// of it (rings, descriptor tables, request buffers).
pub struct GuestRam {
    memfd: File,
    host: NonNull<u8>,
    base: u64,
    size: u64,
    /// Offset of the first byte not yet handed out.
    next: Mutex<u64>,
}

// SAFETY: the mapping lives as long as the `GuestRam`; every access goes through methods
// that bound-check and copy, and the bump pointer is behind a mutex. Concurrent access by
// the device (another mapping of the same pages) is the virtio contract: the rings'
// index fields are read and written atomically, buffers only once handed over.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// `size` bytes of zeroed RAM at [`DEFAULT_RAM_BASE`]. The memfd is sparse: pages cost
    /// memory only once touched.
    pub fn new(size: u64) -> Result<GuestRam> {
        GuestRam::with_base(DEFAULT_RAM_BASE, size)
    }

    /// `size` bytes of zeroed RAM at guest physical address `base`.
    pub fn with_base(base: u64, size: u64) -> Result<GuestRam> {
        if size == 0 || base.checked_add(size).is_none() {
            return Err(Error::RamLayout { base, size });
        }
        let len = usize::try_from(size).map_err(|_| Error::RamLayout { base, size })?;
        let memfd = vgpu_mediator::hostmap::memfd(c"vgpu-guest-ram", size).map_err(Error::Memfd)?;
        // SAFETY: a fresh shared mapping of the whole memfd; the result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(GuestRam {
            memfd,
            host: NonNull::new(host.cast()).ok_or(Error::RamLayout { base, size })?,
            base,
            size,
            next: Mutex::new(0),
        })
    }

    /// Guest physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest physical address one past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// The memfd, for `SET_MEM_TABLE`.
    pub fn fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    /// Where this process maps the first byte: the "userspace address" of the region in
    /// vhost-user messages, against which the backend translates vring addresses.
    pub fn userspace_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// This process's address of guest address `gpa`, after checking `[gpa, gpa+len)`.
    pub fn userspace_addr_of(&self, gpa: u64, len: u64) -> Result<u64> {
        Ok(self.host_ptr(gpa, len)? as u64)
    }

    /// Whether `[gpa, gpa + len)` lies inside RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.base
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.base + self.size)
    }

    /// Hands out `len` bytes aligned to `align` (a power of two), zeroed when first
    /// handed out.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64> {
        debug_assert!(align.is_power_of_two());
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = (self.base + *next).next_multiple_of(align);
        match start.checked_add(len) {
            Some(end) if end <= self.end() => {
                *next = end - self.base;
                Ok(start)
            }
            _ => Err(Error::OutOfGuestRam {
                wanted: len,
                free: self.end().saturating_sub(start),
            }),
        }
    }

    /// The bump pointer, to hand back everything allocated after it with [`rewind`].
    ///
    /// [`rewind`]: GuestRam::rewind
    pub fn mark(&self) -> u64 {
        *self.next.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases everything allocated since `mark` (the caller no longer uses it).
    pub fn rewind(&self, mark: u64) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        *next = mark.min(*next);
    }

    /// Bytes not yet handed out.
    pub fn free(&self) -> u64 {
        self.size - self.mark()
    }

    /// A host pointer to `[gpa, gpa + len)`, valid while `self` lives. Lets a benchmark
    /// fill a DMA buffer in place instead of through a copy.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8> {
        if !self.contains(gpa, len) {
            return Err(Error::OutsideRam { gpa, len });
        }
        // SAFETY: in bounds of the mapping, checked above.
        Ok(unsafe { self.host.as_ptr().add((gpa - self.base) as usize) })
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let dst = self.host_ptr(gpa, data.len() as u64)?;
        // SAFETY: `dst` is valid for `data.len()` bytes; a Rust slice never aliases guest RAM.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies guest memory at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<()> {
        let src = self.host_ptr(gpa, out.len() as u64)?;
        // SAFETY: `src` is valid for `out.len()` bytes; a Rust slice never aliases guest RAM.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Sets `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<()> {
        let dst = self.host_ptr(gpa, len)?;
        // SAFETY: `dst` is valid for `len` bytes.
        unsafe { std::ptr::write_bytes(dst, byte, len as usize) };
        Ok(())
    }

    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn read_u16(&self, gpa: u64) -> Result<u16> {
        let mut b = [0; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn read_u32(&self, gpa: u64) -> Result<u32> {
        let mut b = [0; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A ring index or flags field that the device reads or writes concurrently. The
    /// field is little-endian in memory, which is this host's order.
    pub(crate) fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16> {
        if gpa % 2 != 0 {
            return Err(Error::Misaligned { gpa, align: 2 });
        }
        let p = self.host_ptr(gpa, 2)?;
        // SAFETY: in bounds, 2-byte aligned (the mapping is page-aligned), and valid as
        // long as `self`; only ever accessed atomically or by the device.
        Ok(unsafe { &*p.cast::<AtomicU16>() })
    }

    pub(crate) fn load_u16(&self, gpa: u64, order: Ordering) -> Result<u16> {
        Ok(u16::from_le(self.atomic_u16(gpa)?.load(order)))
    }

    pub(crate) fn store_u16(&self, gpa: u64, v: u16, order: Ordering) -> Result<()> {
        self.atomic_u16(gpa)?.store(v.to_le(), order);
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `with_base`, of this length, unmapped once.
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.size as usize) };
    }
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("base", &format_args!("{:#x}", self.base))
            .field("size", &self.size)
            .field("used", &self.mark())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_contiguous_and_bounded() {
        let ram = GuestRam::new(0x4000).unwrap();
        let a = ram.alloc(3, 1).unwrap();
        assert_eq!(a, DEFAULT_RAM_BASE);
        let b = ram.alloc(16, 16).unwrap();
        assert_eq!(b, DEFAULT_RAM_BASE + 16);
        let mark = ram.mark();
        assert!(matches!(
            ram.alloc(0x4000, 1),
            Err(Error::OutOfGuestRam { .. })
        ));
        let c = ram.alloc(0x100, 0x1000).unwrap();
        assert_eq!(c, DEFAULT_RAM_BASE + 0x1000);
        ram.rewind(mark);
        assert_eq!(ram.alloc(1, 1).unwrap(), DEFAULT_RAM_BASE + 32);
    }

    #[test]
    fn reads_and_writes_outside_ram_are_refused() {
        let ram = GuestRam::new(0x1000).unwrap();
        ram.write(ram.base() + 0xffe, &[1, 2]).unwrap();
        assert_eq!(ram.read_u16(ram.base() + 0xffe).unwrap(), 0x0201);
        assert!(ram.write(ram.base() + 0xfff, &[1, 2]).is_err());
        assert!(ram.read_u16(ram.base() - 2).is_err());
        assert!(!ram.contains(u64::MAX - 1, 4));
    }

    #[test]
    fn a_second_mapping_of_the_memfd_sees_the_same_bytes() {
        let ram = GuestRam::new(0x2000).unwrap();
        ram.write(ram.base() + 0x1000, b"shared").unwrap();
        let file = ram.memfd.try_clone().unwrap();
        let mut got = [0u8; 6];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 0x1000).unwrap();
        assert_eq!(&got, b"shared");
    }
}
