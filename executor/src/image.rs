// SPDX-License-Identifier: Apache-2.0
//! What a binary module image declares, read from its bytes without the driver: the
//! names of its kernels and of its variables in device memory, with their sizes. The
//! quota charges a module loaded from an image the way it charges a PTX module (its
//! variables as the driver reports them by name, see
//! [`crate::cuda::module_footprint`]), and refuses one whose variables alone would not
//! fit before it reaches the device ([`declared_global_bytes`]).
//!
//! The image is the guest's: every offset and size is checked, nothing is allocated in
//! proportion to what the image claims, and an image that cannot be read is simply not
//! [`ImageSymbols::complete`].
//!
//! Formats (all little-endian, as CUDA writes them on x86-64):
//! - **cubin**: an ELF64 object. Its `SHT_SYMTAB` symbols name the kernels (`STT_FUNC`)
//!   and the variables (`STT_OBJECT` in a `.nv.global*` or `.nv.constant*` section,
//!   `st_size` bytes each).
//! - **fatbin**: a container (magic `0xBA55ED50`, `u16` version, `u16` header size,
//!   `u64` size of the entries) of entries, each a header (`u16` kind: 1 PTX, 2 ELF;
//!   `u32` header size at 4; `u64` payload size at 8; `u64` flags at 40, bit `0x2000`
//!   compressed) followed by its payload. Uncompressed ELF and PTX entries are read;
//!   a compressed one makes the image incomplete.
//! - **PTX** text is what [`as_ptx`] recognises; it is loaded and charged as PTX.
//!
//! A fatbin *wrapper* (magic `0x466243B1`, as `__cudaRegisterFatBinary` takes) holds a
//! pointer into the process that made it, meaningless on the host: [`kind`] names it so
//! that it is refused.

use std::collections::{HashMap, HashSet};

use vgpu_protocol::MAX_KERNEL_NAME;

use crate::ptx;

/// First bytes of an ELF object.
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// First word of a fatbin container.
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// First word of a fatbin wrapper (a struct holding a pointer to a container).
pub const FATBIN_WRAPPER_MAGIC: u32 = 0x4662_43B1;
/// A fatbin entry whose payload is compressed.
const FATBIN_FLAG_COMPRESSED: u64 = 0x2000;
const FATBIN_KIND_PTX: u16 = 1;
const FATBIN_KIND_ELF: u16 = 2;
/// Most symbols read from one image, over all its symbol tables: far more than a real
/// module has. An image with more is read that far and counts as incomplete.
pub const MAX_SYMBOLS: u64 = 65536;

/// What an image is, by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// An ELF object (a cubin).
    Elf,
    /// A fatbin container.
    Fatbin,
    /// A fatbin wrapper: a pointer, not a module.
    FatbinWrapper,
    /// PTX text (see [`as_ptx`]).
    Ptx,
    /// Anything else; the driver decides.
    Unknown,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// `len` bytes at `at` of `b`, if they are all there.
fn slice(b: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let at = usize::try_from(at).ok()?;
    let len = usize::try_from(len).ok()?;
    b.get(at..at.checked_add(len)?)
}

/// What `image` is, by its first bytes.
pub fn kind(image: &[u8]) -> ImageKind {
    if image.starts_with(&ELF_MAGIC) {
        ImageKind::Elf
    } else if u32_at(image, 0) == Some(FATBIN_MAGIC) {
        ImageKind::Fatbin
    } else if u32_at(image, 0) == Some(FATBIN_WRAPPER_MAGIC) {
        ImageKind::FatbinWrapper
    } else if as_ptx(image).is_some() {
        ImageKind::Ptx
    } else {
        ImageKind::Unknown
    }
}

/// `image` as PTX text: UTF-8 with no NUL (trailing NULs, as a C string carries, are
/// dropped), neither an ELF object nor a fatbin, and with a `.version` directive.
pub fn as_ptx(image: &[u8]) -> Option<&str> {
    if image.starts_with(&ELF_MAGIC)
        || matches!(u32_at(image, 0), Some(FATBIN_MAGIC | FATBIN_WRAPPER_MAGIC))
    {
        return None;
    }
    let end = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&image[..end]).ok()?;
    (!text.contains('\0') && text.contains(".version")).then_some(text)
}

/// The kernels and device variables an image declares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSymbols {
    /// Names of its functions (kernels among them), in order, without repeats.
    pub functions: Vec<String>,
    /// Its variables in device memory: name and declared bytes, without repeats.
    pub globals: Vec<(String, u64)>,
    /// Every part of the image could be read (no compressed or unreadable entry, no
    /// more than [`MAX_SYMBOLS`] symbols), so `globals` names all its variables.
    pub complete: bool,
    /// Symbols read so far, over all the image's symbol tables.
    symbols_read: u64,
    /// Where each name is in `functions` / `globals`.
    seen_functions: HashSet<String>,
    seen_globals: HashMap<String, usize>,
}

impl ImageSymbols {
    fn add_function(&mut self, name: String) {
        if self.seen_functions.insert(name.clone()) {
            self.functions.push(name);
        }
    }

    fn add_global(&mut self, name: String, bytes: u64) {
        match self.seen_globals.get(&name) {
            Some(&i) => self.globals[i].1 = self.globals[i].1.max(bytes),
            None => {
                self.seen_globals.insert(name.clone(), self.globals.len());
                self.globals.push((name, bytes));
            }
        }
    }
}

/// The kernels and variables `image` declares (see the module documentation).
pub fn symbols(image: &[u8]) -> ImageSymbols {
    let mut out = ImageSymbols::default();
    out.complete = match kind(image) {
        ImageKind::Elf => read_elf(image, &mut out),
        ImageKind::Fatbin => read_fatbin(image, &mut out),
        ImageKind::Ptx => {
            read_ptx(as_ptx(image).unwrap_or(""), &mut out);
            true
        }
        ImageKind::FatbinWrapper | ImageKind::Unknown => false,
    };
    out
}

/// The bytes of device memory `image`'s variables declare (see [`symbols`]); saturates
/// instead of overflowing.
pub fn declared_global_bytes(image: &[u8]) -> u64 {
    symbols(image)
        .globals
        .iter()
        .fold(0u64, |sum, (_, b)| sum.saturating_add(*b))
}

fn read_ptx(text: &str, out: &mut ImageSymbols) {
    if let Some(entries) = ptx::entries(text) {
        let mut names: Vec<String> = entries.into_keys().collect();
        names.sort();
        for name in names {
            out.add_function(name);
        }
    }
    for g in ptx::globals(text) {
        out.add_global(g.name, g.bytes.unwrap_or(0));
    }
}

/// Reads a fatbin container's entries; false if any could not be read.
fn read_fatbin(image: &[u8], out: &mut ImageSymbols) -> bool {
    let (Some(header), Some(size)) = (u16_at(image, 6), u64_at(image, 8)) else {
        return false;
    };
    let start = u64::from(header);
    let Some(end) = start.checked_add(size).filter(|&e| e <= image.len() as u64) else {
        return false;
    };
    let mut at = start;
    let mut complete = true;
    while at < end {
        let Ok(pos) = usize::try_from(at) else {
            return false;
        };
        let (Some(kind), Some(header), Some(payload), Some(flags)) = (
            u16_at(image, pos),
            u32_at(image, pos + 4),
            u64_at(image, pos + 8),
            u64_at(image, pos + 40),
        ) else {
            return false;
        };
        let Some(body) = slice(image, at + u64::from(header), payload) else {
            return false;
        };
        if flags & FATBIN_FLAG_COMPRESSED != 0 {
            complete = false;
        } else {
            match kind {
                FATBIN_KIND_ELF => complete &= read_elf(body, out),
                FATBIN_KIND_PTX => {
                    // A PTX entry's text may end in NULs.
                    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                    match std::str::from_utf8(&body[..end]) {
                        Ok(text) => read_ptx(text, out),
                        Err(_) => complete = false,
                    }
                }
                _ => complete = false,
            }
        }
        let Some(next) = at
            .checked_add(u64::from(header))
            .and_then(|n| n.checked_add(payload))
            .filter(|&n| n > at)
        else {
            return false;
        };
        at = next;
    }
    complete
}

/// One ELF64 section header's fields this module reads.
struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

fn section(elf: &[u8], shoff: u64, shentsize: u64, index: u64) -> Option<Section> {
    let at = usize::try_from(shoff.checked_add(index.checked_mul(shentsize)?)?).ok()?;
    Some(Section {
        name: u32_at(elf, at)?,
        kind: u32_at(elf, at + 4)?,
        offset: u64_at(elf, at + 24)?,
        size: u64_at(elf, at + 32)?,
        link: u32_at(elf, at + 40)?,
        entsize: u64_at(elf, at + 56)?,
    })
}

/// The NUL-terminated string at `at` of the string table `strtab`; `None` past the
/// longest name the protocol carries.
fn string_at(strtab: &[u8], at: u32) -> Option<&str> {
    let rest = strtab.get(at as usize..)?;
    let rest = &rest[..rest.len().min(MAX_KERNEL_NAME)];
    let end = rest.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// Reads an ELF64 little-endian object's symbol table; false if it could not be read.
fn read_elf(elf: &[u8], out: &mut ImageSymbols) -> bool {
    read_elf_symbols(elf, out).is_some()
}

fn read_elf_symbols(elf: &[u8], out: &mut ImageSymbols) -> Option<()> {
    const SHT_SYMTAB: u32 = 2;
    const STT_OBJECT: u8 = 1;
    const STT_FUNC: u8 = 2;
    const SHN_UNDEF: u16 = 0;
    const SHN_LORESERVE: u16 = 0xff00;
    // 64-bit, little-endian.
    if !elf.starts_with(&ELF_MAGIC) || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return None;
    }
    let shoff = u64_at(elf, 0x28)?;
    let shentsize = u64::from(u16_at(elf, 0x3a)?);
    let shnum = u64::from(u16_at(elf, 0x3c)?);
    let shstrndx = u64::from(u16_at(elf, 0x3e)?);
    if shentsize < 64 {
        return None;
    }
    let names = section(elf, shoff, shentsize, shstrndx)
        .and_then(|s| slice(elf, s.offset, s.size))
        .unwrap_or(&[]);
    let mut found = false;
    let mut incomplete = false;
    for index in 0..shnum {
        let table = section(elf, shoff, shentsize, index)?;
        if table.kind != SHT_SYMTAB {
            continue;
        }
        found = true;
        if table.entsize < 24 {
            return None;
        }
        let symbols = slice(elf, table.offset, table.size)?;
        let strings = section(elf, shoff, shentsize, u64::from(table.link))
            .and_then(|s| slice(elf, s.offset, s.size))?;
        let count = table.size / table.entsize;
        let room = MAX_SYMBOLS.saturating_sub(out.symbols_read);
        if count > room {
            incomplete = true;
        }
        let count = count.min(room);
        out.symbols_read += count;
        for i in 0..count {
            let at = usize::try_from(i * table.entsize).ok()?;
            let (name, info, shndx, size) = (
                u32_at(symbols, at)?,
                *symbols.get(at + 4)?,
                u16_at(symbols, at + 6)?,
                u64_at(symbols, at + 16)?,
            );
            if shndx == SHN_UNDEF {
                continue;
            }
            let Some(name) = string_at(strings, name).filter(|n| !n.is_empty()) else {
                continue;
            };
            match info & 0xf {
                STT_FUNC => out.add_function(name.to_string()),
                STT_OBJECT => {
                    // Variables in device memory; shared and local memory are per block
                    // and per thread, not the module's. A section whose name cannot be
                    // read counts.
                    let in_device_memory = shndx >= SHN_LORESERVE
                        || section(elf, shoff, shentsize, u64::from(shndx))
                            .and_then(|s| string_at(names, s.name))
                            .map_or(true, |n| {
                                n.starts_with(".nv.global") || n.starts_with(".nv.constant")
                            });
                    if in_device_memory {
                        out.add_global(name.to_string(), size);
                    }
                }
                _ => {}
            }
        }
    }
    (found && !incomplete).then_some(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A minimal ELF64 object: sections null, .shstrtab, .strtab, .symtab, .nv.global,
    /// .nv.shared.k, .text.k, with `symbols` (name, type, section index, size).
    fn elf(symbols: &[(&str, u8, u16, u64)]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.strtab\0.symtab\0.nv.global\0.nv.shared.k\0.text.k\0";
        let name_at = |s: &str| {
            let needle = format!("\0{s}\0");
            shstrtab
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24];
        for &(name, kind, shndx, size) in symbols {
            let at = strtab.len() as u32;
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
            let mut sym = [0u8; 24];
            sym[..4].copy_from_slice(&at.to_le_bytes());
            sym[4] = 0x10 | kind;
            sym[6..8].copy_from_slice(&shndx.to_le_bytes());
            sym[16..24].copy_from_slice(&size.to_le_bytes());
            symtab.extend_from_slice(&sym);
        }
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(&ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        let place = |b: &mut Vec<u8>, data: &[u8]| {
            let at = b.len() as u64;
            b.extend_from_slice(data);
            (at, data.len() as u64)
        };
        let shs = place(&mut b, shstrtab);
        let st = place(&mut b, &strtab);
        let sy = place(&mut b, &symtab);
        while b.len() % 8 != 0 {
            b.push(0);
        }
        let shoff = b.len() as u64;
        // (name, type, offset, size, link, entsize)
        let sections: [(u32, u32, u64, u64, u32, u64); 7] = [
            (0, 0, 0, 0, 0, 0),
            (name_at(".shstrtab"), 3, shs.0, shs.1, 0, 0),
            (name_at(".strtab"), 3, st.0, st.1, 0, 0),
            (name_at(".symtab"), 2, sy.0, sy.1, 2, 24),
            (name_at(".nv.global"), 8, 0, 1 << 20, 0, 0),
            (name_at(".nv.shared.k"), 8, 0, 4096, 0, 0),
            (name_at(".text.k"), 1, 0, 0, 0, 0),
        ];
        for (name, kind, offset, size, link, entsize) in sections {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[40..44].copy_from_slice(&link.to_le_bytes());
            h[56..64].copy_from_slice(&entsize.to_le_bytes());
            b.extend_from_slice(&h);
        }
        b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&7u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    /// A fatbin container of `entries` (kind, flags, payload).
    fn fatbin(entries: &[(u16, u64, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, flags, payload) in entries {
            let mut h = [0u8; 64];
            h[..2].copy_from_slice(&kind.to_le_bytes());
            h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            h[40..48].copy_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&h);
            body.extend_from_slice(payload);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(&(body.len() as u64).to_le_bytes());
        b.extend_from_slice(&body);
        b
    }

    const PTX: &str = ".version 8.0\n.target sm_80\n.address_size 64\n\
        .global .align 4 .b8 table[4096];\n\
        .visible .entry k(.param .u64 p)\n{\nret;\n}\n";

    #[test]
    fn a_cubin_names_its_kernels_and_device_variables() {
        let image = elf(&[
            ("k", 2, 6, 64),
            ("table", 1, 4, 4096),
            ("tile", 1, 5, 1024),
            ("extern_fn", 2, 0, 0),
        ]);
        assert_eq!(kind(&image), ImageKind::Elf);
        let s = symbols(&image);
        assert!(s.complete);
        assert_eq!(s.functions, vec!["k".to_string()]);
        // Shared memory is not the module's device memory; undefined symbols are skipped.
        assert_eq!(s.globals, vec![("table".to_string(), 4096)]);
        assert_eq!(declared_global_bytes(&image), 4096);
    }

    #[test]
    fn a_fatbin_is_read_entry_by_entry_and_compressed_entries_leave_it_incomplete() {
        let cubin = elf(&[("k", 2, 6, 0), ("big", 1, 4, 1 << 30)]);
        let image = fatbin(&[(2, 0x11, &cubin), (1, 0x11, PTX.as_bytes())]);
        assert_eq!(kind(&image), ImageKind::Fatbin);
        let s = symbols(&image);
        assert!(s.complete);
        assert_eq!(s.functions, vec!["k".to_string()]);
        assert_eq!(
            s.globals,
            vec![("big".to_string(), 1 << 30), ("table".to_string(), 4096)]
        );
        assert_eq!(declared_global_bytes(&image), (1 << 30) + 4096);

        let packed = fatbin(&[(2, 0x2011, &cubin[..100])]);
        let s = symbols(&packed);
        assert!(!s.complete);
        assert!(s.globals.is_empty());
    }

    #[test]
    fn ptx_text_and_wrappers_are_recognised() {
        assert_eq!(as_ptx(PTX.as_bytes()), Some(PTX));
        let mut with_nul = PTX.as_bytes().to_vec();
        with_nul.extend_from_slice(&[0, 0]);
        assert_eq!(as_ptx(&with_nul), Some(PTX));
        assert_eq!(kind(&with_nul), ImageKind::Ptx);
        let mut inner_nul = PTX.as_bytes().to_vec();
        inner_nul[3] = 0;
        assert_eq!(as_ptx(&inner_nul), None);
        assert_eq!(as_ptx(b"no directive"), None);
        let mut wrapper = FATBIN_WRAPPER_MAGIC.to_le_bytes().to_vec();
        wrapper.extend_from_slice(&[1, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(kind(&wrapper), ImageKind::FatbinWrapper);
        assert!(!symbols(&wrapper).complete);
        assert_eq!(kind(&[0xff; 16]), ImageKind::Unknown);
        let s = symbols(PTX.as_bytes());
        assert!(s.complete);
        assert_eq!(s.functions, vec!["k".to_string()]);
    }

    #[test]
    fn damaged_images_are_incomplete_not_a_panic() {
        let image = elf(&[("k", 2, 6, 0), ("table", 1, 4, 64)]);
        for cut in [5, 40, 64, 100, image.len() - 1] {
            let s = symbols(&image[..cut]);
            assert!(!s.complete || s.globals.len() <= 1, "{cut}");
        }
        let mut huge = image.clone();
        huge[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!symbols(&huge).complete);
        let mut loops = fatbin(&[(2, 0, &image)]);
        loops[16 + 4..16 + 8].copy_from_slice(&0u32.to_le_bytes());
        loops[16 + 8..16 + 16].copy_from_slice(&0u64.to_le_bytes());
        assert!(!symbols(&loops).complete);
    }

    proptest! {
        #[test]
        fn random_and_mutated_images_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        ) {
            let _ = symbols(&bytes);
            let mut image = fatbin(&[(2, 0, &elf(&[("k", 2, 6, 0), ("g", 1, 4, 8)]))]);
            for (i, v) in flips {
                let n = image.len();
                image[i % n] = v;
            }
            let _ = symbols(&image);
            let _ = declared_global_bytes(&image);
        }
    }
}
