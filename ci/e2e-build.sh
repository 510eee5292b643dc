# SPDX-License-Identifier: Apache-2.0
# shellcheck shell=bash disable=SC2154 # $work and $REPO_DIR come from the caller
# What the QEMU guests of ci/e2e-qemu.sh need, built here or taken from a bundle (sourced,
# not run). ci/e2e-qemu.sh builds it all before it boots its guests; ci/gpu-bundle.sh
# builds the same and packs it for a machine without cargo; `ci/e2e-qemu.sh --bundle DIR`
# boots from such a pack.
#
#   e2e_build_all        every build step below, in order, each announced with step():
#     e2e_build_setup      host packages (ci/setup.sh), the Rust toolchain on PATH
#     e2e_build_cargo      vhost-vgpu, libvgpu and the guest tools: $target
#     e2e_build_kernel     the guest kernel (ci/guest-kernel.sh): $kver $kdir $kernel $kbuild
#                          $kbuild_root; from the Debian suite $kernel_suite when the caller
#                          set it (e.g. trixie-backports), $kernel_version (KVER, SERIES
#                          or newest) likewise
#     e2e_build_driver     vgpu.ko against that kernel's headers (ci/driver-build.sh): $ko
#     e2e_build_c_programs the C example and ci/guest/vgpu-e2e-check.c, in $work/guest
#   e2e_build_cuda_devices_check
#                        ci/guest/cuda-devices-check.c (ci/e2e-gpus.sh's guest), in $work/guest
#     e2e_build_qemu       QEMU with the generic device: $qemu $qemu_device $reconnect
#     e2e_build_initramfs  busybox, vgpu.ko, lspci and the guest tools: $initrd; its /init
#                          runs $e2e_init (default ci/guest/e2e-guest.sh), and the array
#                          e2e_initramfs_extra holds more ci/mkinitramfs.sh options
#   e2e_build_worker     vgpu-worker and vgpu-executor-worker in $target (--executor remote)
#   e2e_use_bundle DIR [BIN...]
#                        the same variables from DIR/guests and DIR (no build at all);
#                        BIN: host binaries needed beyond E2E_BUNDLE_HOST_BINS
#
# The caller has sourced ci/e2e-lib.sh and run e2e_begin and e2e_workdir, runs in the
# repository root, and defines die (print an error and exit) and say (a paragraph for a
# person; may print nothing).

# The files of a guest bundle, under DIR/guests (ci/gpu-bundle.sh writes them):
#   qemu-system-x86_64.gz   the stripped QEMU, gzip'd (a tenth of its size)
#   reconnect-ok            present when that QEMU carries the reconnect fix
#   lib/                    the shared libraries QEMU needs beyond the C library and zlib
#   firmware/               bios-256k.bin, linuxboot_dma.bin, kvmvapic.bin (for -L)
#   vmlinuz, initramfs.cpio.gz, MANIFEST (what they are), SHA256SUMS (every other file)
#   initramfs-gpus.cpio.gz  what ci/e2e-gpus.sh's guest has beyond initramfs.cpio.gz (its
#                           /guest.sh, cuda-devices-check): booted appended to it
E2E_BUNDLE_QEMU='qemu-system-x86_64.gz'
E2E_BUNDLE_KERNEL=vmlinuz
E2E_BUNDLE_INITRD=initramfs.cpio.gz
# shellcheck disable=SC2034 # ci/gpu-bundle.sh and ci/e2e-gpus.sh read it
E2E_BUNDLE_GPUS_INITRD=initramfs-gpus.cpio.gz
# shellcheck disable=SC2034 # ci/gpu-bundle.sh copies these
E2E_BUNDLE_FIRMWARE=(bios-256k.bin linuxboot_dma.bin kvmvapic.bin)
# The host binaries a bundle directory holds beside guests/: those every run needs, and
# those of the runs with --executor remote (the worker host's).
E2E_BUNDLE_HOST_BINS=(vhost-vgpu vgpu-executor-worker)
# shellcheck disable=SC2034 # ci/e2e-qemu.sh and ci/gpu-bundle.sh read it
E2E_BUNDLE_REMOTE_BINS=(vgpu-worker)

# Runs a build step quietly; on failure shows the end of its log and stops (without
# check lines).
e2e_build_quiet() { # LOG CMD...
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        echo "${0##*/}: '$*' failed; the end of its output:" >&2
        tail -n 40 "$log" | sed 's/^/    | /' >&2
        exit 1
    fi
}

e2e_build_setup() {
    step "setup: host packages and the Rust toolchain"
    e2e_build_quiet "$work/setup.log" bash ci/setup.sh
    export PATH="$HOME/.cargo/bin:$PATH"
}

e2e_build_cargo() {
    local f
    step "build: vhost-vgpu and the guest library and tools (cargo build --release)"
    say "vhost-vgpu is the host side: a vhost-user backend that QEMU connects to, one socket \
per VM, handing each request to the mediator and its executor. The guest side is \
libvgpu (Rust API and C ABI) with the tools vgpu-smi and vgpu-vector-add."
    e2e_build_quiet "$work/cargo.log" cargo build --release --locked -p vgpu-guest -p vhost-vgpu \
        -p vgpu-libcuda -p vgpu-libnvrtc -p vgpu-cudarc-check
    target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
    for f in vhost-vgpu vgpu-smi vgpu-vector-add libvgpu.so libvgpu_cuda.so libvgpu_nvrtc.so \
        vgpu-cudarc-check; do
        [[ -f $target/$f ]] || die "cargo build did not produce $target/$f"
    done
}

# The worker host's binaries, for --executor remote: vgpu-worker and the
# vgpu-executor-worker it starts for each session (found beside it).
e2e_build_worker() {
    local f
    step "build: vgpu-worker and vgpu-executor-worker (cargo build --release)"
    e2e_build_quiet "$work/cargo-worker.log" cargo build --release --locked -p vgpu-mediator \
        --bin vgpu-worker --bin vgpu-executor-worker
    target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
    for f in vgpu-worker vgpu-executor-worker; do
        [[ -f $target/$f ]] || die "cargo build did not produce $target/$f"
    done
}

e2e_build_kernel() {
    local kenv args=()
    if [[ -n ${kernel_suite:-} ]]; then
        step "guest kernel: Debian $kernel_suite's ${kernel_version:-newest} kernel and its headers"
        args=(--suite "$kernel_suite")
    else
        step "guest kernel: Debian's current linux-image-amd64 and its headers"
    fi
    [[ -n ${kernel_version:-} ]] && args+=(--kver "$kernel_version")
    kenv=$(bash ci/guest-kernel.sh "${args[@]}" 2>"$work/guest-kernel.log") || {
        show "$work/guest-kernel.log" 20 >&2
        die "ci/guest-kernel.sh ${args[*]} failed"
    }
    kver=$(sed -n 's/^KVER=//p' <<<"$kenv")
    kdir=$(sed -n 's/^KDIR=//p' <<<"$kenv")
    kernel=$(sed -n 's/^KERNEL=//p' <<<"$kenv")
    kbuild=$(sed -n 's/^KBUILD=//p' <<<"$kenv")
    kbuild_root=$(sed -n 's/^KBUILD_ROOT=//p' <<<"$kenv")
    [[ -n $kver && -f $kernel && -d $kbuild_root$kbuild ]] || die "ci/guest-kernel.sh gave no usable kernel: $kenv"
    if [[ -n $kbuild_root ]]; then
        echo "   kernel $kver (Debian ${kernel_suite:-}; headers in the build root $kbuild_root)"
    else
        echo "   kernel $kver"
    fi
}

e2e_build_driver() {
    local vermagic
    step "driver: vgpu.ko against linux-headers-$kver"
    say "vgpu.ko is the guest driver: a virtio driver for device ID 22 that gives each \
device a /dev/vgpuN and puts user buffers straight into the virtqueue. It is built \
out of tree against the headers of exactly the kernel the guests boot."
    e2e_build_quiet "$work/driver.log" bash ci/driver-build.sh --kbuild "$kbuild" \
        ${kbuild_root:+--root "$kbuild_root"} --out "$work/driver"
    ko=$work/driver/vgpu.ko
    [[ -f $ko ]] || die "make did not produce vgpu.ko"
    vermagic=$(modinfo -F vermagic "$ko")
    [[ $vermagic == "$kver "* ]] || die "vgpu.ko is built for '$vermagic', the guest runs $kver"
}

e2e_build_c_programs() {
    local c_example cflags
    step "C programs against vgpu.h and libvgpu: the C example and ci/guest/vgpu-e2e-check.c"
    c_example=guest-lib/examples/c/vector_scale.c
    [[ -f $c_example ]] || die "$c_example not found"
    mkdir -p "$work/guest/usr/bin" "$work/guest/usr/lib"
    # Copies without debug information: a smaller initramfs boots faster under TCG.
    cp "$target/vgpu-smi" "$target/vgpu-vector-add" "$work/guest/usr/bin/"
    # The library under its soname (what programs linked with -lvgpu load), the
    # development link beside it for the link below.
    cp "$target/libvgpu.so" "$work/guest/usr/lib/libvgpu.so.1"
    ln -sf libvgpu.so.1 "$work/guest/usr/lib/libvgpu.so"
    strip --strip-debug "$work/guest/usr/bin/vgpu-smi" "$work/guest/usr/bin/vgpu-vector-add" \
        "$work/guest/usr/lib/libvgpu.so.1"
    # In the guest the programs live in /usr/bin and libvgpu.so.1 in /usr/lib.
    # shellcheck disable=SC2016,SC2054 # $ORIGIN is for the loader; -Wl takes commas
    cflags=(-O2 -Wall -Wextra -I guest-lib/include -L "$work/guest/usr/lib" -lvgpu
        -Wl,-rpath,'$ORIGIN/../lib')
    e2e_build_quiet "$work/cc.log" cc -o "$work/guest/usr/bin/vgpu-c-example" "$c_example" "${cflags[@]}"
    e2e_build_quiet "$work/cc.log" cc -std=c11 -Werror -o "$work/guest/usr/bin/vgpu-e2e-check" \
        ci/guest/vgpu-e2e-check.c "${cflags[@]}"
    # The CUDA driver API: libcuda.so.1 and libnvrtc.so.13 in /usr/lib/vgpu, a C program
    # built against the driver API's declarations and linked with -lcuda, and a program
    # written against cudarc (which loads libcuda.so at run time).
    mkdir -p "$work/guest/usr/lib/vgpu"
    cp "$target/libvgpu_cuda.so" "$work/guest/usr/lib/vgpu/libcuda.so.1"
    cp "$target/libvgpu_nvrtc.so" "$work/guest/usr/lib/vgpu/libnvrtc.so.13"
    cp "$target/vgpu-cudarc-check" "$work/guest/usr/bin/"
    strip --strip-debug "$work/guest/usr/lib/vgpu/libcuda.so.1" \
        "$work/guest/usr/lib/vgpu/libnvrtc.so.13" "$work/guest/usr/bin/vgpu-cudarc-check"
    ln -sf libcuda.so.1 "$work/guest/usr/lib/vgpu/libcuda.so"
    ln -sf libnvrtc.so.13 "$work/guest/usr/lib/vgpu/libnvrtc.so"
    e2e_build_quiet "$work/cc.log" cc -std=c11 -O2 -Wall -Wextra -Werror \
        -o "$work/guest/usr/bin/cuda-driver-check" ci/guest/cuda-driver-check.c \
        -I guest-lib/include/cuda -L "$work/guest/usr/lib/vgpu" -lcuda
}

# ci/guest/cuda-devices-check.c, a driver-API program over the guest libcuda.so.1 (after
# e2e_build_c_programs): $work/guest/usr/bin/cuda-devices-check.
e2e_build_cuda_devices_check() {
    step "C program: ci/guest/cuda-devices-check.c against the guest libcuda.so.1"
    e2e_build_quiet "$work/cc.log" cc -std=c11 -O2 -Wall -Wextra -Werror \
        -o "$work/guest/usr/bin/cuda-devices-check" ci/guest/cuda-devices-check.c \
        -I guest-lib/include/cuda -L "$work/guest/usr/lib/vgpu" -lcuda
}

# $reconnect: on when the QEMU in $qemu carries the reconnect fix (launch-vm.sh then turns
# chardev reconnect on by default).
e2e_qemu_reconnect() {
    reconnect="off (this QEMU lacks the reconnect fix)"
    [[ -f $(dirname "$qemu")/reconnect-ok ]] && reconnect=on
    return 0
}

e2e_print_qemu() {
    echo "   $("$qemu" --version | head -n 1), device $qemu_device, chardev reconnect $reconnect"
}

e2e_print_initrd() {
    echo "   $(du -h "$initrd" | cut -f1) $(basename "$initrd")"
}

e2e_build_qemu() {
    step "QEMU with the generic vhost-user device (qemu-configs/build-qemu.sh)"
    qemu=$(bash qemu-configs/build-qemu.sh --print-path 2>"$work/build-qemu.log") || {
        show "$work/build-qemu.log" 40 >&2
        die "qemu-configs/build-qemu.sh failed"
    }
    qemu_device=$(bash qemu-configs/build-qemu.sh --print-device 2>>"$work/build-qemu.log")
    # launch-vm.sh turns chardev reconnect on by default for a QEMU built with the fix.
    e2e_qemu_reconnect
    e2e_print_qemu
}

e2e_build_initramfs() {
    local lspci_bin pci_ids f libm
    step "initramfs: busybox, virtio PCI, vgpu.ko, lspci, the guest tools and libraries"
    lspci_bin=$(command -v lspci) || die "lspci not found (package pciutils)"
    pci_ids=
    for f in /usr/share/misc/pci.ids /usr/share/hwdata/pci.ids; do
        [[ -f $f ]] && { pci_ids=$f; break; }
    done
    [[ -n $pci_ids ]] || die "no pci.ids found (package pci.ids)"
    # The C maths library too: programs built with Rust or C against this machine's C
    # library load it (cudarc's examples among them), though no tool here does.
    # (awk reads to the end: ldconfig must not die of SIGPIPE under pipefail.)
    libm=$(ldconfig -p | awk '/libm\.so\.6 .*x86-64/ && !found { print $NF; found = 1 }')
    [[ -f $libm ]] || die "libm.so.6 not found (ldconfig -p)"
    initrd=$work/initramfs.cpio.gz
    e2e_build_quiet "$work/mkinitramfs.log" bash ci/mkinitramfs.sh "$initrd" --kdir "$kdir" --kver "$kver" \
        --ko "$ko" \
        --bin "$lspci_bin:/usr/bin/lspci" --file "$pci_ids:/usr/share/misc/pci.ids" \
        --bin "$work/guest/usr/bin/vgpu-smi" --bin "$work/guest/usr/bin/vgpu-vector-add" \
        --bin "$work/guest/usr/lib/libvgpu.so.1:/usr/lib/libvgpu.so.1" \
        --file "$work/guest/usr/bin/vgpu-e2e-check:/usr/bin/vgpu-e2e-check" \
        --file "$work/guest/usr/bin/vgpu-c-example:/usr/bin/vgpu-c-example" \
        --bin "$work/guest/usr/lib/vgpu/libcuda.so.1:/usr/lib/vgpu/libcuda.so.1" \
        --bin "$work/guest/usr/lib/vgpu/libnvrtc.so.13:/usr/lib/vgpu/libnvrtc.so.13" \
        --file "$work/guest/usr/lib/vgpu/libcuda.so.1:/usr/lib/vgpu/libcuda.so" \
        --file "$work/guest/usr/lib/vgpu/libnvrtc.so.13:/usr/lib/vgpu/libnvrtc.so" \
        --file "$work/guest/usr/bin/cuda-driver-check:/usr/bin/cuda-driver-check" \
        --bin "$work/guest/usr/bin/vgpu-cudarc-check" --bin "$libm:$libm" \
        --init "${e2e_init:-ci/guest/e2e-guest.sh}" \
        ${e2e_initramfs_extra[@]+"${e2e_initramfs_extra[@]}"}
    e2e_print_initrd
}

e2e_build_all() {
    e2e_build_setup
    e2e_build_cargo
    e2e_build_kernel
    e2e_build_driver
    e2e_build_c_programs
    e2e_build_qemu
    e2e_build_initramfs
}

# Writes the uncompressed copy of a gzip'd file (gzip, else python3).
e2e_gunzip() { # SRC.gz DEST
    if command -v gzip >/dev/null; then
        gzip -dc "$1" >"$2"
    else
        python3 -c 'import gzip, shutil, sys
with gzip.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$1" "$2"
    fi
}

# Takes everything the guests need from a bundle instead of building it: QEMU (unpacked
# into $work/qemu behind a wrapper that adds the bundle's libraries and firmware), the
# kernel and initramfs from DIR/guests, vhost-vgpu and vgpu-executor-worker (and each BIN)
# from DIR. Needs only bash, coreutils, grep, sed and gzip (or python3).
e2e_use_bundle() { # DIR [BIN...]
    local dir=$1 guests=$1/guests n f bins
    shift
    bins=("${E2E_BUNDLE_HOST_BINS[@]}" "$@")
    step "bundle: QEMU, firmware, guest kernel and initramfs from $guests (ci/gpu-bundle.sh)"
    [[ -f $guests/MANIFEST && -f $guests/SHA256SUMS ]] ||
        die "$guests is not a guest bundle (no MANIFEST or SHA256SUMS): build one with ci/gpu-bundle.sh"
    n=$(grep -c . "$guests/SHA256SUMS")
    if ! (cd "$guests" && sha256sum --check --quiet --strict SHA256SUMS) >"$work/bundle-sums.log" 2>&1; then
        show "$work/bundle-sums.log" 20 >&2
        die "$guests does not match its SHA256SUMS (incomplete copy?)"
    fi
    echo "   $n files match SHA256SUMS"
    kver=$(sed -n 's/^kernel //p' "$guests/MANIFEST")
    qemu_device=$(sed -n 's/^device //p' "$guests/MANIFEST")
    [[ -n $kver && -n $qemu_device ]] || die "$guests/MANIFEST names no kernel or device"
    echo "   kernel $kver"
    mkdir -p "$work/qemu"
    e2e_gunzip "$guests/$E2E_BUNDLE_QEMU" "$work/qemu/qemu-system-x86_64.bin" ||
        die "cannot unpack $guests/$E2E_BUNDLE_QEMU"
    chmod 0755 "$work/qemu/qemu-system-x86_64.bin"
    [[ -f $guests/reconnect-ok ]] && cp "$guests/reconnect-ok" "$work/qemu/"
    # The bundle's -L comes first, so its firmware wins over any installed copy.
    {
        echo '#!/usr/bin/env bash'
        echo "# QEMU from the bundle in $(printf '%q' "$guests")."
        echo "export LD_LIBRARY_PATH=$(printf '%q' "$guests/lib")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
        echo "exec $(printf '%q' "$work/qemu/qemu-system-x86_64.bin") -L $(printf '%q' "$guests/firmware") \"\$@\""
    } >"$work/qemu/qemu-system-x86_64"
    chmod 0755 "$work/qemu/qemu-system-x86_64"
    qemu=$work/qemu/qemu-system-x86_64
    "$qemu" --version >"$work/bundle-qemu.log" 2>&1 || {
        show "$work/bundle-qemu.log" 20 >&2
        die "the bundle's QEMU does not run here"
    }
    e2e_qemu_reconnect
    e2e_print_qemu
    kernel=$guests/$E2E_BUNDLE_KERNEL
    initrd=$guests/$E2E_BUNDLE_INITRD
    e2e_print_initrd
    target=$dir
    for f in "${bins[@]}"; do
        [[ -x $dir/$f ]] || die "$dir/$f is missing or not executable (copy the release binary there)"
    done
    # vhost-vgpu (or vgpu-worker) starts each session's CUDA executor from this binary.
    export VGPU_EXECUTOR_WORKER=$dir/vgpu-executor-worker
    echo "   ${bins[*]} from $dir"
}
