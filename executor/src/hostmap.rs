// SPDX-License-Identifier: Apache-2.0
//! Host buffers: guest memory a guest process was handed by its driver (the analogue of
//! `cudaMallocHost`), mapped here straight from the files that back the VM's RAM.
//!
//! A transport describes a registered host buffer as [`HostMapping`]: the pieces of the
//! VM's memory files that hold its bytes, in order. [`HostMap::map`] maps those pieces
//! one after the other into one reserved address range, so the buffer is one contiguous
//! run of bytes here as it is in the guest process; a CUDA executor then page-locks that
//! range once, and copies between it and the GPU run at pinned speed with no copy in
//! between. Only the buffer's own pages are mapped: nothing else of the VM's memory is
//! reachable from the process (or, for a page-locked buffer, from its kernels).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;

/// Page size host buffer pieces are aligned to.
pub const PAGE: u64 = 4096;

/// One piece of a host buffer: `len` bytes at `offset` of a file backing guest memory.
#[derive(Clone, Debug)]
pub struct FilePiece {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

/// A host buffer's bytes, in order, as pieces of the VM's memory files.
#[derive(Clone, Debug, Default)]
pub struct HostMapping {
    pub pieces: Vec<FilePiece>,
}

impl HostMapping {
    /// The buffer's length in bytes.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
}

/// An anonymous memory file of `len` bytes (close-on-exec), the kind that backs a VM's
/// RAM. Through the system call, not glibc's wrapper: glibc 2.17 has none.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> io::Result<File> {
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("memfd_create: bad fd"))?;
    // SAFETY: a new fd owned by nothing else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// A host buffer mapped into this process, unmapped on drop.
#[derive(Debug)]
pub struct HostMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; `HostMap` hands out raw pointers and
// copies through them, never references that outlive a call.
unsafe impl Send for HostMap {}

impl HostMap {
    /// Maps every piece of `mapping`, in order, into one contiguous range.
    pub fn map(mapping: &HostMapping) -> io::Result<HostMap> {
        let total = mapping.len();
        let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
        if total == 0 {
            return Err(invalid("an empty host buffer"));
        }
        let len = usize::try_from(total).map_err(|_| invalid("host buffer too large"))?;
        // SAFETY: reserves fresh address space; nothing is touched.
        let reserved = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(reserved.cast::<u8>()).ok_or_else(|| invalid("mmap gave NULL"))?;
        let map = HostMap { base, len };
        let mut at = 0usize;
        for piece in &mapping.pieces {
            if piece.offset % PAGE != 0 || piece.len % PAGE != 0 || piece.len == 0 {
                return Err(invalid("host buffer piece not whole pages"));
            }
            // A mapping past the end of the file would fault on access.
            let size = piece.file.metadata()?.len();
            if piece
                .offset
                .checked_add(piece.len)
                .map_or(true, |end| end > size)
            {
                return Err(invalid("host buffer piece past the end of its file"));
            }
            let offset = libc::off_t::try_from(piece.offset)
                .map_err(|_| invalid("host buffer piece offset too large"))?;
            let n = piece.len as usize;
            // SAFETY: replaces part of the range reserved above (MAP_FIXED inside our own
            // reservation) with a shared mapping of the piece.
            let p = unsafe {
                libc::mmap(
                    base.as_ptr().add(at).cast(),
                    n,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    piece.file.as_raw_fd(),
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            at += n;
        }
        Ok(map)
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `[offset, offset + len)` lies in the buffer; the start address.
    pub fn at(&self, offset: u64, len: u64) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        // SAFETY: in bounds, checked just before.
        (end <= self.len as u64).then(|| unsafe { self.base.as_ptr().add(offset as usize) })
    }

    /// Copies bytes `[offset, offset + out.len())` of the buffer into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Option<()> {
        let src = self.at(offset, out.len() as u64)?;
        // SAFETY: `src` is valid for `out.len()` bytes (checked by `at`); the guest may
        // change the bytes meanwhile, which a copy of plain bytes tolerates.
        unsafe { ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Some(())
    }

    /// Copies `data` to bytes `[offset, offset + data.len())` of the buffer.
    pub fn write(&self, offset: u64, data: &[u8]) -> Option<()> {
        let dst = self.at(offset, data.len() as u64)?;
        // SAFETY: as in `read`, for writing.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Some(())
    }
}

impl Drop for HostMap {
    fn drop(&mut self) {
        // SAFETY: the whole reservation, mapped in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn memfd(len: u64) -> File {
        super::memfd(c"hostmap-test", len).unwrap()
    }

    #[test]
    fn pieces_map_in_order_and_writes_reach_the_file() {
        let mut f = memfd(8 * PAGE);
        let bytes: Vec<u8> = (0..8 * PAGE).map(|i| (i / PAGE) as u8).collect();
        f.write_all(&bytes).unwrap();
        let file = Arc::new(f.try_clone().unwrap());
        // Pages 5-6, then page 1: out of order, as a guest's chunks may be.
        let mapping = HostMapping {
            pieces: vec![
                FilePiece {
                    file: file.clone(),
                    offset: 5 * PAGE,
                    len: 2 * PAGE,
                },
                FilePiece {
                    file,
                    offset: PAGE,
                    len: PAGE,
                },
            ],
        };
        let map = HostMap::map(&mapping).unwrap();
        assert_eq!(map.len(), 3 * PAGE as usize);
        let mut out = vec![0u8; 3];
        map.read(2 * PAGE - 1, &mut out).unwrap();
        assert_eq!(out, [5 + 1, 1, 1]);
        map.write(2 * PAGE, &[0xee; 2]).unwrap();
        let mut back = [0u8; 2];
        f.seek(SeekFrom::Start(PAGE)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, [0xee; 2]);
        assert!(map.read(3 * PAGE - 1, &mut out).is_none());
    }

    #[test]
    fn unaligned_pieces_are_refused() {
        let file = Arc::new(memfd(2 * PAGE));
        let mapping = HostMapping {
            pieces: vec![FilePiece {
                file,
                offset: 100,
                len: PAGE,
            }],
        };
        assert!(HostMap::map(&mapping).is_err());
        assert!(HostMap::map(&HostMapping::default()).is_err());
    }
}
