// SPDX-License-Identifier: Apache-2.0
//! The built `libvgpu_nvrtc.so` as a program loads it: every name cudarc resolves (and
//! the other functions of NVRTC 13.0) is there, nothing else is exported, and its
//! soname is `libnvrtc.so.13`.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;

use libloading::Library;
use vgpu_nvrtc::{CUDARC_FUNCTIONS, EXTRA_FUNCTIONS};

/// The cdylib cargo built next to this test (`target/<profile>/deps/`).
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|d| d.join("libvgpu_nvrtc.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no libvgpu_nvrtc.so near {}", exe.display()))
}

fn load() -> Library {
    // SAFETY: the library's initialisers are Rust's, which have no preconditions.
    unsafe { Library::new(cdylib()) }.unwrap()
}

#[test]
fn every_nvrtc_function_resolves_and_nothing_else_is_exported() {
    let lib = load();
    for name in CUDARC_FUNCTIONS.iter().chain(&EXTRA_FUNCTIONS) {
        // SAFETY: only the address is looked up.
        let sym = unsafe { lib.get::<*const c_void>(name.as_bytes()) };
        assert!(sym.is_ok(), "{name} is not exported");
    }
    for name in [
        "vgpu_open",
        "vgpu_last_error",
        "rust_eh_personality",
        "main",
    ] {
        // SAFETY: as above.
        let sym = unsafe { lib.get::<*const c_void>(name.as_bytes()) };
        assert!(sym.is_err(), "{name} is exported");
    }
    let mut expected: Vec<&str> = CUDARC_FUNCTIONS
        .iter()
        .chain(&EXTRA_FUNCTIONS)
        .copied()
        .collect();
    expected.sort_unstable();
    let mut exported = exported_names();
    exported.sort_unstable();
    assert_eq!(exported, expected);
}

#[test]
fn the_loaded_library_answers() {
    let lib = load();
    type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
    type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
    // SAFETY: the functions have these signatures (nvrtc.h).
    let (version, error_string) = unsafe {
        (
            *lib.get::<Version>(b"nvrtcVersion").unwrap(),
            *lib.get::<ErrorString>(b"nvrtcGetErrorString").unwrap(),
        )
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two writable ints.
    assert_eq!(unsafe { version(&mut major, &mut minor) }, 0);
    assert_eq!((major, minor), (13, 0));
    // SAFETY: a static string comes back.
    let s = unsafe { CStr::from_ptr(error_string(6)) };
    assert_eq!(s, c"NVRTC_ERROR_COMPILATION");
}

#[test]
fn the_soname_is_libnvrtc_so_13() {
    let elf = std::fs::read(cdylib()).unwrap();
    assert_eq!(soname(&elf).as_deref(), Some("libnvrtc.so.13"));
}

/// The names in the library's dynamic symbol table that are defined in it.
fn exported_names() -> Vec<String> {
    let elf = std::fs::read(cdylib()).unwrap();
    let sections = sections(&elf);
    let dynsym = sections.iter().find(|s| s.kind == SHT_DYNSYM).unwrap();
    let strtab = &sections[dynsym.link as usize];
    let mut names = Vec::new();
    for i in 1..dynsym.size / 24 {
        let sym = &elf[(dynsym.offset + i * 24) as usize..];
        let (name, shndx) = (u32_at(sym, 0) as u64, u16_at(sym, 6));
        let bind = sym[4] >> 4;
        if shndx != 0 && (bind == 1 || bind == 2) {
            names.push(c_str_at(&elf, strtab.offset + name));
        }
    }
    names
}

const SHT_DYNSYM: u32 = 11;
const SHT_DYNAMIC: u32 = 6;
const DT_SONAME: u64 = 14;

struct Section {
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn c_str_at(b: &[u8], at: u64) -> String {
    let s = &b[at as usize..];
    let end = s.iter().position(|&c| c == 0).unwrap();
    String::from_utf8_lossy(&s[..end]).into_owned()
}

/// The section headers of a little-endian ELF64 file.
fn sections(elf: &[u8]) -> Vec<Section> {
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "a little-endian ELF64 file");
    let (shoff, shentsize, shnum) = (u64_at(elf, 0x28), u16_at(elf, 0x3a), u16_at(elf, 0x3c));
    (0..shnum as u64)
        .map(|i| {
            let h = &elf[(shoff + i * shentsize as u64) as usize..];
            Section {
                kind: u32_at(h, 4),
                offset: u64_at(h, 0x18),
                size: u64_at(h, 0x20),
                link: u32_at(h, 0x28),
            }
        })
        .collect()
}

fn soname(elf: &[u8]) -> Option<String> {
    let sections = sections(elf);
    let dynamic = sections.iter().find(|s| s.kind == SHT_DYNAMIC)?;
    let strtab = &sections[dynamic.link as usize];
    (0..dynamic.size / 16)
        .map(|i| &elf[(dynamic.offset + i * 16) as usize..])
        .find(|d| u64_at(d, 0) == DT_SONAME)
        .map(|d| c_str_at(elf, strtab.offset + u64_at(d, 8)))
}
