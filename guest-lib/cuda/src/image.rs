// SPDX-License-Identifier: Apache-2.0
//! What a module image is and how long: `cuModuleLoadData` gets a bare pointer, so the
//! length comes from the image itself, as NVIDIA's driver finds it.
//!
//! - a cubin: an ELF64 file; its length is the end of the last thing its headers
//!   describe (header, section and program header tables, sections, segments);
//! - a fatbin: magic `0xBA55ED50`, then a 16-byte header whose u16 at 6 is the header
//!   size and u64 at 8 the size of what follows;
//! - the wrapper cudart passes (`__fatBinC_Wrapper_t`, magic `0x466243b1`): its u64 at 8
//!   points to the fatbin;
//! - `vgpu:builtin` with its NUL: the device's built-in kernel catalog;
//! - anything else: PTX text up to its NUL.

use vgpu_protocol::{MAX_MODULE_IMAGE_BYTES, MAX_PTX_BYTES};

use crate::types::{CUDA_ERROR_INVALID_IMAGE, CUDA_ERROR_INVALID_PTX, CUDA_ERROR_INVALID_VALUE};
use crate::{Fail, Res};

/// The name of the device's built-in kernel catalog as an image or a file name.
pub const BUILTIN: &str = "vgpu:builtin";

const ELF_MAGIC: &[u8] = b"\x7fELF";
const FATBIN_MAGIC: &[u8] = &0xBA55_ED50u32.to_le_bytes();
const WRAPPER_MAGIC: &[u8] = &0x4662_43b1u32.to_le_bytes();
const ELF_HEADER: usize = 64;
const SHT_NOBITS: u32 = 8;

/// A module as the device loads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Builtin,
    Ptx(String),
    Image(Vec<u8>),
}

/// Bytes of an image, read where its headers say.
trait Bytes {
    /// `len` bytes at `offset`, or None where the image certainly ends before.
    fn at(&self, offset: usize, len: usize) -> Option<&[u8]>;
}

/// An image whose bytes are all at hand (a file's).
struct Slice<'a>(&'a [u8]);

impl Bytes for Slice<'_> {
    fn at(&self, offset: usize, len: usize) -> Option<&[u8]> {
        self.0.get(offset..offset.checked_add(len)?)
    }
}

/// An image known only by its address.
struct Pointer(*const u8);

impl Bytes for Pointer {
    fn at(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > MAX_MODULE_IMAGE_BYTES as usize + 1 {
            return None;
        }
        // SAFETY: `Pointer` is only made by `from_pointer`, whose caller promises an
        // image of the kind its headers describe: these bytes are part of it.
        Some(unsafe { std::slice::from_raw_parts(self.0.add(offset), len) })
    }
}

/// Whether `image` starts with `prefix`, read a byte at a time so that a short string
/// is never read past its first difference (its NUL differs from every prefix byte).
fn starts_with(image: &dyn Bytes, prefix: &[u8]) -> bool {
    prefix
        .iter()
        .enumerate()
        .all(|(i, &b)| image.at(i, 1) == Some(&[b]))
}

fn u16_at(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid() -> Fail {
    Fail(CUDA_ERROR_INVALID_IMAGE)
}

/// The length of an ELF64 image.
fn elf_len(image: &dyn Bytes) -> Res<usize> {
    let h = image.at(0, ELF_HEADER).ok_or_else(invalid)?;
    // 64-bit, little-endian: what every cubin is.
    if h[4] != 2 || h[5] != 1 {
        return Err(invalid());
    }
    let (phoff, shoff) = (u64_at(h, 0x20), u64_at(h, 0x28));
    let (phentsize, phnum) = (u16_at(h, 0x36), u16_at(h, 0x38));
    let (shentsize, shnum) = (u16_at(h, 0x3a), u16_at(h, 0x3c));
    let table_end = |off: u64, size: u64, n: u64| off.checked_add(size * n);
    let mut len = (ELF_HEADER as u64)
        .max(table_end(shoff, shentsize, shnum).ok_or_else(invalid)?)
        .max(table_end(phoff, phentsize, phnum).ok_or_else(invalid)?);
    let max = MAX_MODULE_IMAGE_BYTES as u64;
    if len > max {
        return Err(invalid());
    }
    // Sections and segments may lie after the tables.
    if shnum > 0 && shentsize < 0x28 || phnum > 0 && phentsize < 0x28 {
        return Err(invalid());
    }
    for i in 0..shnum {
        let sh = image
            .at((shoff + i * shentsize) as usize, 0x28)
            .ok_or_else(invalid)?;
        if u32_at(sh, 4) != SHT_NOBITS {
            let end = u64_at(sh, 0x18).checked_add(u64_at(sh, 0x20));
            len = len.max(end.ok_or_else(invalid)?);
        }
    }
    for i in 0..phnum {
        let ph = image
            .at((phoff + i * phentsize) as usize, 0x28)
            .ok_or_else(invalid)?;
        let end = u64_at(ph, 8).checked_add(u64_at(ph, 0x20));
        len = len.max(end.ok_or_else(invalid)?);
    }
    if len > max {
        return Err(invalid());
    }
    Ok(len as usize)
}

/// The length of a fatbin.
fn fatbin_len(image: &dyn Bytes) -> Res<usize> {
    let h = image.at(0, 16).ok_or_else(invalid)?;
    let len = u16_at(h, 6)
        .checked_add(u64_at(h, 8))
        .filter(|&n| (16..=MAX_MODULE_IMAGE_BYTES as u64).contains(&n))
        .ok_or_else(invalid)?;
    Ok(len as usize)
}

/// The length of NUL-terminated text (without the NUL), or of all of it.
fn text_len(image: &dyn Bytes, all: Option<usize>) -> Res<usize> {
    if let Some(n) = all {
        let b = image.at(0, n).ok_or_else(invalid)?;
        return Ok(b.iter().position(|&c| c == 0).unwrap_or(n));
    }
    (0..=MAX_PTX_BYTES as usize)
        .find(|&i| image.at(i, 1) == Some(&[0]))
        .ok_or(Fail(CUDA_ERROR_INVALID_VALUE))
}

/// What `image` is (`len`: all of it, for a file; None for a bare pointer).
fn detect(image: &dyn Bytes, len: Option<usize>, follow: bool) -> Res<Source> {
    if starts_with(image, ELF_MAGIC) {
        let n = elf_len(image)?;
        return Ok(Source::Image(image.at(0, n).ok_or_else(invalid)?.to_vec()));
    }
    if starts_with(image, FATBIN_MAGIC) {
        let n = fatbin_len(image)?;
        return Ok(Source::Image(image.at(0, n).ok_or_else(invalid)?.to_vec()));
    }
    if starts_with(image, WRAPPER_MAGIC) {
        let data = image.at(8, 8).ok_or_else(invalid)?;
        let data = u64_at(data, 0) as usize as *const u8;
        if !follow || data.is_null() {
            return Err(invalid());
        }
        // SAFETY: the wrapper's data member points to its fatbin (cudart's layout); the
        // caller of `from_pointer` vouches for the wrapper.
        return unsafe { from_pointer_inner(data, false) };
    }
    let mut builtin = BUILTIN.as_bytes().to_vec();
    builtin.push(0);
    if starts_with(image, &builtin)
        || len == Some(BUILTIN.len()) && starts_with(image, &builtin[..BUILTIN.len()])
    {
        return Ok(Source::Builtin);
    }
    let n = text_len(image, len)?;
    if n == 0 {
        return Err(Fail(CUDA_ERROR_INVALID_IMAGE));
    }
    let text = image.at(0, n).ok_or_else(invalid)?;
    match std::str::from_utf8(text) {
        Ok(ptx) => Ok(Source::Ptx(ptx.to_owned())),
        Err(_) => Err(Fail(CUDA_ERROR_INVALID_PTX)),
    }
}

/// The module at `image` (`cuModuleLoadData`, `cuModuleLoadFatBinary`,
/// `cuLibraryLoadData`).
///
/// # Safety
/// `image` must be NULL or point to a cubin, a fatbin, cudart's fatbin wrapper or
/// NUL-terminated text.
pub unsafe fn from_pointer(image: *const u8) -> Res<Source> {
    if image.is_null() {
        return Err(Fail(CUDA_ERROR_INVALID_VALUE));
    }
    // SAFETY: forwarded caller promise.
    unsafe { from_pointer_inner(image, true) }
}

/// # Safety
/// As for [`from_pointer`], `image` not NULL.
unsafe fn from_pointer_inner(image: *const u8, follow: bool) -> Res<Source> {
    detect(&Pointer(image), None, follow)
}

/// The module in a file's bytes (`cuModuleLoad`, `cuLibraryLoadFromFile`).
pub fn from_bytes(bytes: &[u8]) -> Res<Source> {
    detect(&Slice(bytes), Some(bytes.len()), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 image: header, `sections` section headers at `shoff`, each
    /// (type, offset, size), one program header at `phoff` covering (offset, filesz).
    pub(crate) fn elf(
        shoff: u64,
        sections: &[(u32, u64, u64)],
        ph: Option<(u64, u64, u64)>,
    ) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        let mut len = shoff as usize + 64 * sections.len();
        if let Some((phoff, off, filesz)) = ph {
            b[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
            b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            len = len.max(phoff as usize + 56).max((off + filesz) as usize);
        }
        for &(ty, off, size) in sections {
            if ty != SHT_NOBITS {
                len = len.max((off + size) as usize);
            }
        }
        b.resize(len, 0xcc);
        for (i, &(ty, off, size)) in sections.iter().enumerate() {
            let at = shoff as usize + 64 * i;
            b[at..at + 64].fill(0);
            b[at + 4..at + 8].copy_from_slice(&ty.to_le_bytes());
            b[at + 0x18..at + 0x20].copy_from_slice(&off.to_le_bytes());
            b[at + 0x20..at + 0x28].copy_from_slice(&size.to_le_bytes());
        }
        if let Some((phoff, off, filesz)) = ph {
            let at = phoff as usize;
            b[at..at + 56].fill(0);
            b[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            b[at + 0x20..at + 0x28].copy_from_slice(&filesz.to_le_bytes());
        }
        b
    }

    fn fatbin(payload: usize) -> Vec<u8> {
        let mut b = FATBIN_MAGIC.to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(&(payload as u64).to_le_bytes());
        b.extend((0..payload).map(|i| i as u8));
        b
    }

    /// `bytes` followed by garbage that is not part of the image, read by pointer.
    fn by_pointer(bytes: &[u8]) -> Res<Source> {
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0xee; 4096]);
        // SAFETY: a valid image followed by readable bytes.
        unsafe { from_pointer(padded.as_ptr()) }
    }

    #[test]
    fn a_cubin_ends_where_its_headers_say() {
        // Section header table last: its end is the length.
        let img = elf(256, &[(0, 0, 0), (1, 64, 192)], None);
        assert_eq!(img.len(), 256 + 128);
        assert_eq!(by_pointer(&img), Ok(Source::Image(img.clone())));
        // A section after the table counts; a NOBITS one does not.
        let img = elf(128, &[(1, 256, 100), (SHT_NOBITS, 1000, 5000)], None);
        assert_eq!(img.len(), 356);
        assert_eq!(by_pointer(&img), Ok(Source::Image(img.clone())));
        // The program header table and a segment past everything else count.
        let img = elf(128, &[(1, 256, 16)], Some((400, 300, 200)));
        assert_eq!(img.len(), 500);
        assert_eq!(by_pointer(&img), Ok(Source::Image(img.clone())));
        // Files are read the same way (trailing bytes are not part of the image).
        let mut file = img.clone();
        file.extend_from_slice(&[1, 2, 3]);
        assert_eq!(from_bytes(&file), Ok(Source::Image(img)));
    }

    #[test]
    fn broken_cubins_are_invalid_images() {
        let good = elf(128, &[(1, 64, 64)], None);
        let mut class32 = good.clone();
        class32[4] = 1;
        let mut huge = good.clone();
        huge[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut past = good.clone();
        let sh = 128 + 0x20;
        past[sh..sh + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        for bad in [class32, huge, past, good[..40].to_vec()] {
            assert_eq!(from_bytes(&bad), Err(Fail(CUDA_ERROR_INVALID_IMAGE)));
        }
    }

    #[test]
    fn a_fatbin_is_its_header_and_what_it_says_follows_and_a_wrapper_is_followed() {
        let fb = fatbin(100);
        assert_eq!(by_pointer(&fb), Ok(Source::Image(fb.clone())));
        assert_eq!(from_bytes(&fb[..50]), Err(Fail(CUDA_ERROR_INVALID_IMAGE)));
        let mut wrapper = WRAPPER_MAGIC.to_vec();
        wrapper.extend_from_slice(&1u32.to_le_bytes());
        wrapper.extend_from_slice(&(fb.as_ptr() as u64).to_le_bytes());
        wrapper.extend_from_slice(&0u64.to_le_bytes());
        // SAFETY: a wrapper pointing to a live fatbin.
        let followed = unsafe { from_pointer(wrapper.as_ptr()) };
        assert_eq!(followed, Ok(Source::Image(fb.clone())));
        // A file cannot hold a pointer.
        assert_eq!(from_bytes(&wrapper), Err(Fail(CUDA_ERROR_INVALID_IMAGE)));
        // A wrapper of a wrapper is not followed further.
        let mut outer = WRAPPER_MAGIC.to_vec();
        outer.extend_from_slice(&1u32.to_le_bytes());
        outer.extend_from_slice(&(wrapper.as_ptr() as u64).to_le_bytes());
        // SAFETY: as above.
        let twice = unsafe { from_pointer(outer.as_ptr()) };
        assert_eq!(twice, Err(Fail(CUDA_ERROR_INVALID_IMAGE)));
    }

    #[test]
    fn text_is_ptx_up_to_its_nul_and_the_builtin_name_is_exact() {
        assert_eq!(
            by_pointer(b".version 8.0\n.target sm_90\0garbage"),
            Ok(Source::Ptx(".version 8.0\n.target sm_90".into()))
        );
        assert_eq!(by_pointer(b"vgpu:builtin\0"), Ok(Source::Builtin));
        assert_eq!(
            by_pointer(b"vgpu:builtins\0"),
            Ok(Source::Ptx("vgpu:builtins".into()))
        );
        assert_eq!(by_pointer(b"vgpu\0"), Ok(Source::Ptx("vgpu".into())));
        assert_eq!(by_pointer(b"\0"), Err(Fail(CUDA_ERROR_INVALID_IMAGE)));
        assert_eq!(by_pointer(b"\xff\xfe\0"), Err(Fail(CUDA_ERROR_INVALID_PTX)));
        // SAFETY: NULL is checked.
        let null = unsafe { from_pointer(std::ptr::null()) };
        assert_eq!(null, Err(Fail(CUDA_ERROR_INVALID_VALUE)));
        // Files: with or without a NUL, and the catalog's name as a file's content.
        assert_eq!(from_bytes(b"ptx text"), Ok(Source::Ptx("ptx text".into())));
        assert_eq!(from_bytes(b"ptx\0rest"), Ok(Source::Ptx("ptx".into())));
        assert_eq!(from_bytes(b"vgpu:builtin"), Ok(Source::Builtin));
        assert_eq!(from_bytes(b""), Err(Fail(CUDA_ERROR_INVALID_IMAGE)));
    }
}
