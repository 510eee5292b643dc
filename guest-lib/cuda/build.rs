// SPDX-License-Identifier: Apache-2.0
//! Links the cdylib as NVIDIA's driver library is linked: soname `libcuda.so.1`, and only
//! the `cu*` functions exported (everything else, the Rust runtime included, local).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("libcuda.map");
    std::fs::write(&script, "{\n  global:\n    cu*;\n  local:\n    *;\n};\n")
        .expect("write the linker version script");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    // The guest library's own C ABI (vgpu_*) comes in an rlib: keep it out of this one.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs,ALL");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        script.display()
    );
}
