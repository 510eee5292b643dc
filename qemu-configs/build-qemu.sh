#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds a minimal x86_64 QEMU that can create QEMU's generic vhost-user device, from
# Debian's source package, and caches it outside the repository.
#
# QEMU >= 10.2 ships the device as `vhost-user-test-device-pci`. Older releases call it
# `vhost-user-device-pci` and refuse to create it from the command line; for those the
# build applies vhost-user-device-user-creatable.patch beside this script.
#
# Every build also gets vhost-user-base-reconnect.patch where it applies (written for
# 10.2): without it the generic device cannot start on a chardev with reconnect-ms
# ("Failed to set msg fds") nor reattach after the backend restarts. A build that carries
# it has the marker file bin/reconnect-ok next to the binary; launch-vm.sh turns the
# chardev's reconnect on by default only then.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}
PATCH=$SCRIPT_DIR/vhost-user-device-user-creatable.patch
RECONNECT_PATCH=$SCRIPT_DIR/vhost-user-base-reconnect.patch
SOURCES_FILE=/etc/apt/sources.list.d/vgpu-qemu-src.sources
ARCHIVE=${VGPU_DEBIAN_MIRROR:-http://deb.debian.org/debian}

# The source version known to build and work; when the archive no longer serves it,
# every other version offered is tried, newest first (older than 10.2 gets the patch).
PREFERRED=${VGPU_QEMU_SOURCE_VERSION:-1:10.2.2+ds-1}
SOURCE_SUITES="sid trixie bookworm-backports"

BUILD_DEPS=(dpkg-dev ninja-build pkg-config python3-venv flex bison
    libglib2.0-dev libpixman-1-dev libfdt-dev device-tree-compiler libslirp-dev)
# Part of the cache key: a cached build is reused only if it was built with exactly
# these patches (qemu-<version>/patch-set holds this hash).
PATCH_SET=$(cat "$PATCH" "$RECONNECT_PATCH" | sha256sum | cut -c1-16)
# Firmware a direct-kernel boot needs: bios-256k.bin (seabios), linuxboot_dma.bin and
# kvmvapic.bin (qemu-system-data, which pulls in no emulator). NIC option ROMs
# (efi-virtio.rom, package ipxe-qemu) are not needed: launch-vm.sh sets romfile=.
FIRMWARE_PKGS=(seabios qemu-system-data)
PY_DEPS=(meson==1.5.0 pycotap==1.3.1)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--print-path | --print-device] [--fallback] [--keep-build]

Builds qemu-system-x86_64 with vhost-user, TCG, KVM and user-mode networking (slirp)
from Debian's qemu source package (qemu=$PREFERRED, else the newest version
the archive serves; deb-src entries for $SOURCE_SUITES go to
$SOURCES_FILE), installs the firmware packages it needs
(${FIRMWARE_PKGS[*]}), and caches the binary in
\${VGPU_CACHE:-\$HOME/.cache/vgpu}/qemu-<version>/bin/. A cached build is reused
while the patches beside this script are unchanged (patch set $PATCH_SET).

Patches: $(basename "$PATCH") for versions older than 10.2;
$(basename "$RECONNECT_PATCH") wherever it applies, which also writes
bin/reconnect-ok next to the binary (launch-vm.sh then enables chardev reconnect).

Output: the device name it takes on stderr, the binary's absolute path as the last
line of stdout.

Options:
  --print-path    print only the binary's absolute path (building first if needed)
  --print-device  print only the vhost-user device name: vhost-user-test-device-pci
                  (QEMU >= 10.2) or vhost-user-device-pci (older, patched)
  --fallback      only use a source version older than 10.2 (patched vhost-user-device-pci)
  --keep-build    keep the source and build tree next to the cached binary
  -h, --help      show this help

Environment:
  VGPU_CACHE                 cache root (default \$HOME/.cache/vgpu)
  VGPU_QEMU_SOURCE_VERSION   Debian source version to prefer (default $PREFERRED)
  VGPU_DEBIAN_MIRROR         archive for the deb-src entries (default $ARCHIVE)

Run it with: qemu-system-x86_64 -L /usr/share/qemu -L /usr/share/seabios (qemu-configs/launch-vm.sh)
EOF
}

die() { echo "build-qemu.sh: error: $*" >&2; exit 1; }
log() { echo "build-qemu.sh: $*" >&2; }

print=all
fallback=0
keep_build=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --print-path) print=path ;;
        --print-device) print=device ;;
        --fallback) fallback=1 ;;
        --keep-build) keep_build=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

# "1:10.2.2+ds-1" -> "10.2.2"
upstream_version() {
    local v=${1#*:}
    echo "${v%%[+~-]*}"
}

# Whether an upstream version may be used under the current options.
acceptable() {
    [[ $fallback -eq 0 || $(device_for_version "$1") == vhost-user-device-pci ]]
}

# Device name for an upstream version: renamed to the "test" device in 10.2.
device_for_version() {
    local major minor
    IFS=. read -r major minor _ <<<"$1"
    if ((major > 10 || (major == 10 && minor >= 2))); then
        echo vhost-user-test-device-pci
    else
        echo vhost-user-device-pci
    fi
}

# shellcheck source=ci/apt.sh
source "$SCRIPT_DIR/../ci/apt.sh"

# A deb-src entry for each suite we may build from, in a file of its own.
ensure_deb_src() {
    local want
    want=$(cat <<EOF
# Source packages for building QEMU with vhost-user (qemu-configs/build-qemu.sh).
Types: deb-src
URIs: $ARCHIVE
Suites: $SOURCE_SUITES
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
)
    if [[ ! -f $SOURCES_FILE ]] || [[ $(cat "$SOURCES_FILE") != "$want" ]]; then
        [[ $(id -u) -eq 0 ]] || die "need root to write $SOURCES_FILE"
        echo "$want" >"$SOURCES_FILE"
        apt_updated=0
        apt_update_once
    fi
}

# Source versions of qemu the archive offers, newest first.
offered_versions() {
    local out
    out=$(apt-cache showsrc qemu 2>/dev/null || true)
    sed -n 's/^Version: //p' <<<"$out" | sort -u | sort -r -V
}

# Preferred version first, then the rest of those offered (and acceptable).
candidates() {
    local offered v
    offered=$(offered_versions)
    if grep -qxF "$PREFERRED" <<<"$offered" && acceptable "$(upstream_version "$PREFERRED")"; then
        echo "$PREFERRED"
    fi
    while read -r v; do
        [[ -n $v && $v != "$PREFERRED" ]] || continue
        acceptable "$(upstream_version "$v")" && echo "$v"
    done <<<"$offered"
    return 0
}

# Prints the binary cached for an upstream version, if it is there, was built with the
# current patch set and runs.
cached_binary() {
    local d=$CACHE_ROOT/qemu-$1
    [[ -x $d/bin/qemu-system-x86_64 && -f $d/device-name ]] || return 1
    [[ -f $d/patch-set && $(cat "$d/patch-set") == "$PATCH_SET" ]] || return 1
    "$d/bin/qemu-system-x86_64" --version >/dev/null 2>&1 || return 1
    echo "$d/bin/qemu-system-x86_64"
}

# The version a previous run settled on when the preferred one could not be had.
SELECTED_FILE=$CACHE_ROOT/qemu-selected

# Prints the binary to use without asking apt: the preferred version, else the one a
# previous run selected; with --fallback, the newest cached version older than 10.2.
find_cached() {
    local d ver
    if [[ $fallback -eq 1 ]]; then
        while read -r d; do
            ver=${d##*/qemu-}
            acceptable "$ver" && cached_binary "$ver" && return 0
        done < <(find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | sort -r -V)
        return 1
    fi
    cached_binary "$(upstream_version "$PREFERRED")" && return 0
    [[ -f $SELECTED_FILE ]] && cached_binary "$(cat "$SELECTED_FILE")"
}

build_log=
fail_build() {
    echo "build-qemu.sh: error: $1 (log: $build_log); last lines:" >&2
    tail -n 40 "$build_log" >&2 || true
    exit 1
}

# apply_patch SRC PATCH: applies PATCH to the tree SRC unless it is applied already.
# Returns 1, changing nothing, when it does not apply exactly (no fuzz).
apply_patch() {
    local src=$1 p=$2
    if patch -d "$src" -p1 -R --dry-run --fuzz=0 -s -f <"$p" >/dev/null 2>&1; then
        log "$(basename "$p") is already applied"
        return 0
    fi
    patch -d "$src" -p1 --dry-run --fuzz=0 -s -f <"$p" >>"$build_log" 2>&1 || return 1
    log "applying $(basename "$p")"
    patch -d "$src" -p1 --fuzz=0 -f <"$p" >>"$build_log" 2>&1
}

# build DEBVERSION -> prints the binary path
build() {
    local deb=$1 ver dir src work venv device reconnect_ok=0
    ver=$(upstream_version "$deb")
    dir=$CACHE_ROOT/qemu-$ver
    work=$dir/work
    venv=$CACHE_ROOT/python-venv
    build_log=$dir/build.log
    rm -rf "$work"
    # Whatever was cached here is stale from now on.
    rm -f "$dir/patch-set" "$dir/bin/reconnect-ok"
    mkdir -p "$work" "$dir/bin"
    : >"$build_log"
    log "building QEMU $ver from Debian source qemu=$deb; log: $build_log"

    apt_install "${BUILD_DEPS[@]}"
    if [[ ! -x $venv/bin/meson ]] || ! "$venv/bin/python3" -c 'import pycotap' 2>/dev/null; then
        log "python venv with ${PY_DEPS[*]}"
        python3 -m venv "$venv" >>"$build_log" 2>&1 || fail_build "python3 -m venv failed"
        "$venv/bin/pip" install -q "${PY_DEPS[@]}" >>"$build_log" 2>&1 ||
            fail_build "pip install ${PY_DEPS[*]} failed"
    fi

    (cd "$work" && apt-get source -qq "qemu=$deb") >>"$build_log" 2>&1 ||
        fail_build "apt-get source qemu=$deb failed"
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n 1)
    [[ -n $src ]] || fail_build "no source tree after apt-get source"

    # The +ds tarball carries no EDK2 blobs: never try to unpack them.
    sed -i 's/^\([[:space:]]*unpack_edk2_blobs = \)bzip2\.found()/\1false/' "$src/meson.build" ||
        fail_build "cannot edit meson.build"
    if [[ $(device_for_version "$ver") == vhost-user-device-pci ]]; then
        apply_patch "$src" "$PATCH" || fail_build "$(basename "$PATCH") did not apply"
    fi
    if apply_patch "$src" "$RECONNECT_PATCH"; then
        reconnect_ok=1
    else
        log "$(basename "$RECONNECT_PATCH") does not apply to QEMU $ver: building without it" \
            "(launch-vm.sh leaves chardev reconnect off for this build)"
    fi

    log "configure"
    (cd "$src" && ./configure --python="$venv/bin/python3" \
        --target-list=x86_64-softmmu --without-default-features \
        --enable-kvm --enable-tcg --enable-vhost-user --enable-slirp \
        --enable-fdt=system --disable-install-blobs --disable-docs --disable-werror) \
        >>"$build_log" 2>&1 || fail_build "configure failed"
    log "ninja (a few minutes)"
    ninja -C "$src/build" -j "$(nproc)" qemu-system-x86_64 >>"$build_log" 2>&1 ||
        fail_build "build failed"

    install -m 0755 "$src/build/qemu-system-x86_64" "$dir/bin/qemu-system-x86_64" ||
        fail_build "cannot install the binary into $dir/bin"
    strip --strip-debug "$dir/bin/qemu-system-x86_64" 2>>"$build_log" || true
    device=$(device_for_version "$ver")
    "$dir/bin/qemu-system-x86_64" -device help 2>/dev/null | grep -q "\"$device\"" ||
        fail_build "the built QEMU does not list device $device"
    echo "$device" >"$dir/device-name"
    if [[ $reconnect_ok -eq 1 ]]; then
        echo "$(basename "$RECONNECT_PATCH") applied: $device waits for its backend and" \
            "reconnects to it (chardev reconnect-ms)" >"$dir/bin/reconnect-ok"
    fi
    echo "$PATCH_SET" >"$dir/patch-set"
    if [[ $keep_build -eq 0 ]]; then
        rm -rf "$work"
    fi
    echo "$dir/bin/qemu-system-x86_64"
}

main() {
    local bin deb
    local -a versions
    mkdir -p "$CACHE_ROOT"
    apt_install "${FIRMWARE_PKGS[@]}"
    if ! bin=$(find_cached); then
        # One build at a time per cache; a second caller waits and then reuses it.
        exec 9>"$CACHE_ROOT/.qemu-build.lock"
        flock 9
    fi
    if ! bin=$(find_cached); then
        command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"
        ensure_deb_src
        mapfile -t versions < <(candidates)
        # Stale lists may lack the preferred version (or any): refresh them once.
        if [[ ${#versions[@]} -eq 0 ]] || { [[ $fallback -eq 0 && ${versions[0]} != "$PREFERRED" ]]; }; then
            apt_update_once
            mapfile -t versions < <(candidates)
        fi
        [[ ${#versions[@]} -gt 0 ]] || die "apt offers no usable qemu source package"
        bin=
        for deb in "${versions[@]}"; do
            if bin=$(cached_binary "$(upstream_version "$deb")") || bin=$(build "$deb"); then
                break
            fi
            log "qemu=$deb failed, trying the next version"
        done
        [[ -n $bin ]] || die "no QEMU source version could be fetched and built (tried: ${versions[*]})"
        [[ $fallback -eq 1 ]] || basename "$(dirname "$(dirname "$bin")")" | sed 's/^qemu-//' >"$SELECTED_FILE"
    fi

    local device
    device=$(cat "$(dirname "$(dirname "$bin")")/device-name")
    case $print in
        path) echo "$bin" ;;
        device) echo "$device" ;;
        all)
            echo "device: $device" >&2
            echo "$bin"
            ;;
    esac
}

main "$@"; exit
