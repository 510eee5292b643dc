#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Packs what the two-guest check of ci/e2e-qemu.sh and the two-device guest of
# ci/e2e-gpus.sh need into DIR/guests, for a machine without cargo, apt or KVM (the GPU
# machine): built with the same steps as ci/e2e-qemu.sh (ci/e2e-build.sh), booted there by
# `ci/e2e-qemu.sh --bundle DIR` and `ci/e2e-gpus.sh --bundle DIR`, which ci/gpu-check.sh
# runs as its steps "guests" and "guests-gpus".
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIMIT_MIB=${VGPU_BUNDLE_LIMIT_MIB:-60}
# Libraries every glibc system has (zlib too: dpkg needs it): QEMU takes them from the
# machine it runs on. Every other library it loads goes into the bundle.
SYSTEM_LIBS=(linux-vdso.so.1 ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libpthread.so.0
    libdl.so.2 librt.so.1 libresolv.so.2 libgcc_s.so.1 libz.so.1)
# Where Debian's seabios and qemu-system-data put the firmware (launch-vm.sh's -L dirs).
FIRMWARE_DIRS=(/usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--keep] DIR

Builds what the two guests of ci/e2e-qemu.sh and the guest of ci/e2e-gpus.sh need, with
their own build steps (host packages, the guest tools with cargo, Debian's current guest
kernel, vgpu.ko, QEMU with the generic vhost-user device, the busybox initramfs, the
driver-API program ci/guest/cuda-devices-check.c; run as root on Debian like
ci/e2e-qemu.sh), and packs it into DIR/guests:

  qemu-system-x86_64.gz   the QEMU, stripped and gzip'd (unpacked when the check runs)
  reconnect-ok            when that QEMU carries the reconnect fix
  lib/                    the libraries QEMU needs beyond glibc and zlib (LD_LIBRARY_PATH)
  firmware/               bios-256k.bin, linuxboot_dma.bin, kvmvapic.bin (QEMU's -L)
  vmlinuz                 the guest kernel
  initramfs.cpio.gz       busybox, vgpu.ko, lspci, the guest tools and check script
  initramfs-gpus.cpio.gz  what ci/e2e-gpus.sh's guest has beyond that: its check script
                          (ci/guest/gpus-guest.sh as /guest.sh) and cuda-devices-check;
                          booted appended to initramfs.cpio.gz (a few KiB, not a copy)
  MANIFEST, SHA256SUMS    what the files are; their checksums

DIR is created if needed; an existing DIR/guests is replaced, nothing else in DIR is
touched. Prints the bundle's size; fails, leaving DIR as it was, if DIR with the new
bundle would hold more than $LIMIT_MIB MiB (what is carried to the GPU machine must fit
in 64 MiB with the host binaries).

Then put the release vhost-vgpu, vgpu-executor-worker, vgpu-worker and vgpu-admin,
stripped, into DIR and run, with nothing but bash, coreutils, grep, sed and gzip (or
python3):
  bash ci/e2e-qemu.sh --bundle DIR --executor cuda   # or cpu without a GPU
  bash ci/e2e-qemu.sh --bundle DIR --executor remote --worker-executor cuda
                                                     # through a CUDA vgpu-worker
  bash ci/e2e-gpus.sh --bundle DIR                   # one guest, two devices on
                                                     # GPUs 0 and 1 (--executor cuda;
                                                     # cpu:2 without GPUs)
  bash ci/gpu-check.sh DIR                           # its steps "guests",
                                                     # "guests-remote" and "guests-gpus"
                                                     # do the same

Options:
  --keep       keep the work directory (logs) and print its path
  -h, --help   show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
VGPU_BUNDLE_LIMIT_MIB (the size limit above, default 60).
EOF
}

die() { echo "gpu-bundle.sh: error: $*" >&2; exit 1; }

keep=0
dir=
while [[ $# -gt 0 ]]; do
    case $1 in
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [[ -z $dir ]] || die "more than one DIR given ('$dir', '$1')"
            dir=$1
            ;;
    esac
    shift
done
[[ -n $dir ]] || die "no DIR given (see --help)"
[[ $LIMIT_MIB =~ ^[1-9][0-9]*$ ]] || die "VGPU_BUNDLE_LIMIT_MIB wants whole MiB, got '$LIMIT_MIB'"
[[ ! -e $dir || -d $dir ]] || die "$dir exists and is not a directory"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
e2e_begin gpu-bundle
e2e_workdir vgpu-bundle
say() { :; }

e2e_build_all
e2e_build_cuda_devices_check

# Bytes of the files under a directory, leaving out one subdirectory.
bytes_in() { # DIR [EXCLUDED-SUBDIR]
    local prune=()
    [[ -n ${2:-} ]] && prune=(-path "$1/$2" -prune -o)
    find "$1" "${prune[@]}" -type f -printf '%s\n' | awk '{ n += $1 } END { printf "%d\n", n }'
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

step "bundle: $dir/guests"
stage=$work/bundle/guests
mkdir -p "$stage/lib" "$stage/firmware"

# QEMU, stripped and gzip'd: 26 MiB of binary pack into about 4.
strip --strip-all -o "$work/qemu-system-x86_64" "$qemu"
gzip -9 -n -c "$work/qemu-system-x86_64" >"$stage/$E2E_BUNDLE_QEMU"
[[ -f $(dirname "$qemu")/reconnect-ok ]] && cp "$(dirname "$qemu")/reconnect-ok" "$stage/"

# Its shared libraries, except those of every glibc system.
deps=$(ldd "$qemu") || die "ldd $qemu failed"
if grep -q 'not found' <<<"$deps"; then
    die "$qemu needs libraries missing here: $(grep 'not found' <<<"$deps" | tr -s ' \t' ' ')"
fi
libs=()
while read -r name path; do
    [[ " ${SYSTEM_LIBS[*]} " == *" $name "* ]] && continue
    [[ -f $path ]] || die "ldd names $path for $name, which does not exist"
    cp -L "$path" "$stage/lib/$name"
    libs+=("$name")
done < <(awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' <<<"$deps")

# Firmware for a direct kernel boot.
for f in "${E2E_BUNDLE_FIRMWARE[@]}"; do
    found=
    for d in "${FIRMWARE_DIRS[@]}"; do
        [[ -f $d/$f ]] && { found=$d/$f; break; }
    done
    [[ -n $found ]] || die "firmware $f not found in ${FIRMWARE_DIRS[*]} (packages seabios, qemu-system-data)"
    cp -L "$found" "$stage/firmware/$f"
done

cp -L "$kernel" "$stage/$E2E_BUNDLE_KERNEL"
cp "$initrd" "$stage/$E2E_BUNDLE_INITRD"

# ci/e2e-gpus.sh's guest: the same initramfs with another /guest.sh and one more program.
# Only those go into a second archive; the kernel unpacks archives appended to each other
# in order, a later file replacing an earlier one, so e2e-gpus.sh boots the two
# concatenated instead of a second copy of everything.
gpus_root=$work/gpus-root
mkdir -p "$gpus_root/usr/bin"
cp ci/guest/gpus-guest.sh "$gpus_root/guest.sh"
strip --strip-all -o "$gpus_root/usr/bin/cuda-devices-check" "$work/guest/usr/bin/cuda-devices-check"
chmod 0755 "$gpus_root/usr" "$gpus_root/usr/bin" "$gpus_root/guest.sh" \
    "$gpus_root/usr/bin/cuda-devices-check"
(cd "$gpus_root" && find guest.sh usr -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9 -n >"$stage/$E2E_BUNDLE_GPUS_INITRD"

source_rev=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo unknown)
{
    echo "# A guest bundle for ci/e2e-qemu.sh --bundle DIR and ci/e2e-gpus.sh --bundle DIR"
    echo "# (DIR holds this guests/ folder), written by ci/gpu-bundle.sh. One fact a line;"
    echo "# SHA256SUMS lists every other file."
    echo "kernel $kver"
    echo "device $qemu_device"
    echo "qemu $("$qemu" --version | head -n 1)"
    echo "reconnect $reconnect"
    echo "vgpu.ko $(modinfo -F vermagic "$ko" | sed 's/ *$//')"
    echo "libraries ${libs[*]}"
    echo "firmware ${E2E_BUNDLE_FIRMWARE[*]}"
    echo "gpus-initramfs $E2E_BUNDLE_GPUS_INITRD: ci/guest/gpus-guest.sh as /guest.sh and" \
        "cuda-devices-check, appended to $E2E_BUNDLE_INITRD"
    echo "source $source_rev"
} >"$stage/MANIFEST"
(cd "$stage" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort |
    while read -r f; do sha256sum "$f"; done) >"$work/SHA256SUMS"
mv "$work/SHA256SUMS" "$stage/SHA256SUMS"

# What it all weighs, and whether DIR still fits.
size_of() { stat -c %s "$stage/$1"; }
qemu_raw=$(stat -c %s "$work/qemu-system-x86_64")
printf '   %-22s %6s MiB (%s MiB unpacked)\n' "$E2E_BUNDLE_QEMU" \
    "$(mib "$(size_of "$E2E_BUNDLE_QEMU")")" "$(mib "$qemu_raw")"
printf '   %-22s %6s MiB: %s\n' lib/ "$(mib "$(bytes_in "$stage/lib")")" "${libs[*]}"
printf '   %-22s %6s MiB: %s\n' firmware/ "$(mib "$(bytes_in "$stage/firmware")")" \
    "${E2E_BUNDLE_FIRMWARE[*]}"
printf '   %-22s %6s MiB (kernel %s)\n' "$E2E_BUNDLE_KERNEL" "$(mib "$(size_of "$E2E_BUNDLE_KERNEL")")" "$kver"
printf '   %-22s %6s MiB\n' "$E2E_BUNDLE_INITRD" "$(mib "$(size_of "$E2E_BUNDLE_INITRD")")"
printf '   %-22s %6s KiB (appended to %s)\n' "$E2E_BUNDLE_GPUS_INITRD" \
    "$(awk -v b="$(size_of "$E2E_BUNDLE_GPUS_INITRD")" 'BEGIN { printf "%.1f", b / 1024 }')" \
    "$E2E_BUNDLE_INITRD"
bundle_bytes=$(bytes_in "$stage")
other_bytes=$(bytes_in "$dir" guests)
total=$((bundle_bytes + other_bytes))
limit=$((LIMIT_MIB * 1048576))
files=$(find "$stage" -type f | wc -l)
echo "   bundle: $(mib "$bundle_bytes") MiB in $files files; with the $(mib "$other_bytes") MiB" \
    "already in $dir: $(mib "$total") MiB of the $LIMIT_MIB MiB limit"
if ((total > limit)); then
    die "$dir with this bundle would hold $(mib "$total") MiB ($(mib "$bundle_bytes") MiB bundle + $(mib "$other_bytes") MiB already there), over the $LIMIT_MIB MiB limit; $dir is unchanged (make room in $dir, or set VGPU_BUNDLE_LIMIT_MIB)"
fi

rm -rf "$dir/guests"
mv "$stage" "$dir/guests"
missing=()
for f in "${E2E_BUNDLE_HOST_BINS[@]}" "${E2E_BUNDLE_REMOTE_BINS[@]}" vgpu-admin; do
    [[ -x $dir/$f ]] || missing+=("$f")
done
echo "gpu-bundle.sh: wrote $dir/guests ($(mib "$bundle_bytes") MiB); $dir holds $(mib "$total") MiB," \
    "$(mib $((limit - total))) MiB below the $LIMIT_MIB MiB limit"
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "gpu-bundle.sh: next: put the release ${missing[*]} (stripped) into $dir," \
        "then run: bash ci/e2e-qemu.sh --bundle $dir; bash ci/e2e-gpus.sh --bundle $dir"
fi
