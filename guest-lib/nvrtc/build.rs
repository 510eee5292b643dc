// SPDX-License-Identifier: Apache-2.0
//! Links `libvgpu_nvrtc.so` to be installed as `libnvrtc.so.13`: that soname, and only
//! NVRTC's functions exported (not those of the libraries it is built from, such as
//! `libvgpu`'s C ABI).

fn main() {
    println!("cargo:rerun-if-changed=libnvrtc.map");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvrtc.so.13");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/libnvrtc.map");
    // rustc's own version script exports the C ABI of every crate linked in; symbols of
    // archives (the rlibs of dependencies) are kept local.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs,ALL");
}
