#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fetches the guest kernel the end-to-end tests boot: Debian's current linux-image-amd64,
# unpacked into a cache (vmlinuz + lib/modules), plus the matching linux-headers package
# so out-of-tree modules (the vgpu driver) build against it.
set -euo pipefail

CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}

usage() {
    cat <<EOF
Usage: $(basename "$0") [--kver KVER] [--update] [--no-headers]

Resolves the kernel that Debian's linux-image-amd64 depends on, downloads
linux-image-<kver> with apt-get download, unpacks it into
\${VGPU_CACHE:-\$HOME/.cache/vgpu}/kernel-<kver>/ (vmlinuz, config, lib/modules/<kver>
with modules.dep) and installs linux-headers-<kver>. A cached kernel is reused.

Output (stdout, for eval):
  KVER=<kver>             e.g. 6.1.0-56-amd64
  KDIR=<cache dir>        holds vmlinuz and lib/modules/<kver>
  KERNEL=<KDIR>/vmlinuz
  KBUILD=<headers dir>    for make -C \$KBUILD M=\$PWD modules

Options:
  --kver KVER    use this kernel release instead of linux-image-amd64's
  --update       run apt-get update before resolving (otherwise only when needed)
  --no-headers   do not install linux-headers-<kver>
  -h, --help     show this help
EOF
}

die() { echo "guest-kernel.sh: error: $*" >&2; exit 1; }
log() { echo "guest-kernel.sh: $*" >&2; }

kver=
force_update=0
headers=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --kver)
            [[ $# -ge 2 ]] || die "--kver needs a value"
            kver=$2
            shift
            ;;
        --update) force_update=1 ;;
        --no-headers) headers=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"

# shellcheck source=ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# The kernel release linux-image-amd64 currently depends on, e.g. 6.1.0-56-amd64.
resolve_kver() {
    local deps
    deps=$(apt-cache depends --important linux-image-amd64 2>/dev/null || true)
    sed -n 's/^ *|\{0,1\}Depends: linux-image-\([0-9][^ ]*\)$/\1/p' <<<"$deps" | head -n 1
}

[[ $force_update -eq 1 ]] && apt_update_once
if [[ -z $kver ]]; then
    kver=$(resolve_kver)
    if [[ -z $kver ]]; then
        apt_update_once
        kver=$(resolve_kver)
    fi
    [[ -n $kver ]] || die "cannot resolve the kernel of linux-image-amd64 (apt-cache depends)"
fi

kdir=$CACHE_ROOT/kernel-$kver
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.kernel-$kver.lock"
flock 9

if [[ ! -f $kdir/.complete ]]; then
    apt_install kmod
    log "fetching linux-image-$kver"
    tmp=$(mktemp -d "$CACHE_ROOT/.kernel-$kver.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # apt's download sandbox user must be able to write the target directory.
    chmod 0755 "$tmp"
    if ! (cd "$tmp" && apt-get download -qq "linux-image-$kver" >/dev/null 2>&1); then
        apt_update_once
        (cd "$tmp" && apt-get download -qq "linux-image-$kver" >/dev/null 2>&1) ||
            die "apt-get download linux-image-$kver failed"
    fi
    deb=$(find "$tmp" -maxdepth 1 -name "linux-image-${kver}_*.deb" | head -n 1)
    [[ -n $deb ]] || die "no linux-image-$kver package was downloaded"
    dpkg-deb -x "$deb" "$tmp/root" || die "cannot unpack $deb"
    [[ -f $tmp/root/boot/vmlinuz-$kver ]] || die "$deb has no boot/vmlinuz-$kver"
    # Debian ships usr-merged or not depending on the release.
    moddir=$tmp/root/lib/modules/$kver
    [[ -d $moddir ]] || moddir=$tmp/root/usr/lib/modules/$kver
    [[ -d $moddir ]] || die "$deb has no lib/modules/$kver"

    rm -rf "$kdir"
    mkdir -p "$tmp/out/lib/modules"
    mv "$tmp/root/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
    [[ -f $tmp/root/boot/config-$kver ]] && mv "$tmp/root/boot/config-$kver" "$tmp/out/config"
    [[ -f $tmp/root/boot/System.map-$kver ]] && mv "$tmp/root/boot/System.map-$kver" "$tmp/out/System.map"
    mv "$moddir" "$tmp/out/lib/modules/$kver"
    # The package leaves modules.dep to its postinst: generate it here.
    depmod -b "$tmp/out" "$kver" || die "depmod failed for $kver"
    touch "$tmp/out/.complete"
    mv "$tmp/out" "$kdir"
    rm -rf "$tmp"
    trap - EXIT
fi

kbuild=
if [[ $headers -eq 1 ]]; then
    apt_install "linux-headers-$kver"
    kbuild=/usr/src/linux-headers-$kver
    [[ -f $kbuild/Makefile ]] || kbuild=/lib/modules/$kver/build
    [[ -f $kbuild/Makefile ]] || die "linux-headers-$kver is installed but no kernel build tree was found"
fi

echo "KVER=$kver"
echo "KDIR=$kdir"
echo "KERNEL=$kdir/vmlinuz"
echo "KBUILD=$kbuild"
