// SPDX-License-Identifier: Apache-2.0
//! Links the C library as a versioned shared library: soname `libvgpu.so.1`, so programs
//! built with `-lvgpu` record `libvgpu.so.1` and keep working with any later library of
//! that soname, while one of an incompatible C ABI would take another. The packages
//! install the file as `libvgpu.so.1` with the development link `libvgpu.so` pointing at
//! it.
//!
//! Programs linked in the build tree (`-L target/release -lvgpu`) look for
//! `libvgpu.so.1` there: the link `libvgpu.so.1 -> libvgpu.so` is made beside the
//! library cargo builds.

use std::path::Path;

/// The soname's version: raised only when the C ABI of `include/vgpu.h` changes
/// incompatibly.
const SONAME: &str = "libvgpu.so.1";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    // rustc-link-arg, not rustc-cdylib-link-arg: cargo passes the latter on to the cdylibs
    // of the packages that depend on this one (libcuda.so.1 and libnvrtc.so.13 would be
    // named libvgpu.so.1). This one reaches every link of this package only: the cdylib,
    // and the tools and tests, whose executables carry the name unused.
    println!("cargo:rustc-link-arg=-Wl,-soname,{SONAME}");
    link_soname_in_build_tree();
}

#[cfg(unix)]
fn link_soname_in_build_tree() {
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out: the profile directory,
    // where cargo puts libvgpu.so, is three levels up.
    let out = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    if let Some(profile) = Path::new(&out).ancestors().nth(3) {
        let link = profile.join(SONAME);
        if profile.join("build").is_dir() && std::fs::symlink_metadata(&link).is_err() {
            // A missing link only costs programs run from the build tree their library.
            let _ = std::os::unix::fs::symlink("libvgpu.so", &link);
        }
    }
}

#[cfg(not(unix))]
fn link_soname_in_build_tree() {}
