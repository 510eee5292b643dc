#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the shipped binaries for the glibc 2.17 baseline (CentOS 7 / XCP-ng Dom0,
# RHEL 7 and newer) with cargo-zigbuild, and copies them into one directory.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}
# Versions known to work together and with the project's Rust (zigbuild's MSRV is 1.88;
# its CI tests zig 0.16.0).
ZIGBUILD_VERSION=${VGPU_ZIGBUILD_VERSION:-0.22.3}
ZIG_VERSION=${VGPU_ZIG_VERSION:-0.16.0}
TARGET=x86_64-unknown-linux-gnu.2.17
HOST_BINS=(vgpu-mediator vgpu-executor-worker vhost-vgpu vgpu-admin vgpu-worker)
GUEST_BINS=(vgpu-nfs-client vgpu-smi vgpu-vector-add)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--out DIR] [--target-dir DIR] [--keep-debug] [--tests DIR] [--tools-only]

Builds, with cargo zigbuild --release --locked --target $TARGET:
  host:  ${HOST_BINS[*]}
  guest: ${GUEST_BINS[*]} libvgpu.so
and copies them into DIR (default: <target-dir>/dist), with the C headers
vgpu.h and vgpu_ioctl.h. The library goes in as libvgpu.so.1 (its soname) with the
link libvgpu.so -> libvgpu.so.1. None needs a glibc symbol newer than GLIBC_2.17
(ci/glibc-check.sh DIR checks). They are dynamically linked against glibc: the mediator
and the worker load libcuda and libnvrtc at run time, so they cannot be static musl.

Tools, installed once and cached in \${VGPU_CACHE:-\$HOME/.cache/vgpu}:
  cargo-zigbuild $ZIGBUILD_VERSION   cargo install --locked into cargo-zigbuild-$ZIGBUILD_VERSION/
  zig $ZIG_VERSION              PyPI's ziglang in a venv, ziglang-$ZIG_VERSION/
  zig's and zigbuild's caches  zig-cache/, cargo-zigbuild-cache/

Needs a Rust toolchain (ci/setup.sh) and python3 (python3-venv is installed if venvs
fail); the first run reaches crates.io and PyPI. Output: progress on stderr, DIR's
absolute path as the last line of stdout.

Options:
  --out DIR         where the binaries go (created; files of the same names replaced)
  --target-dir DIR  cargo target directory (default: target/glibc217 in the repository;
                    kept apart from the native build's)
  --keep-debug      copy the binaries with their debug info (default: debug info stripped,
                    symbols kept, about a fifth of the size)
  --tests DIR       also build vgpu-mediator's test suites process and sandbox for the
                    same target and copy them into DIR: run there, they start the glibc
                    2.17 vgpu-executor-worker (confined, CPU executor) for every case
  --tools-only      install the tools and stop
  -h, --help        show this help

Environment:
  VGPU_CACHE              cache root (default \$HOME/.cache/vgpu)
  VGPU_ZIGBUILD_VERSION   cargo-zigbuild version (default $ZIGBUILD_VERSION)
  VGPU_ZIG_VERSION        ziglang version from PyPI (default $ZIG_VERSION)
EOF
}

die() { echo "build-glibc217.sh: error: $*" >&2; exit 1; }
log() { echo "build-glibc217.sh: $*" >&2; }

out=""
target_dir=$REPO_DIR/target/glibc217
keep_debug=0
tools_only=0
tests_out=""
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) need_arg "$1" $#; out=$2; shift ;;
        --target-dir) need_arg "$1" $#; target_dir=$2; shift ;;
        --keep-debug) keep_debug=1 ;;
        --tests) need_arg "$1" $#; tests_out=$2; shift ;;
        --tools-only) tools_only=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "no cargo on PATH (install a Rust toolchain, see ci/setup.sh)"

# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"
command -v objcopy >/dev/null || apt_install binutils

# ---- tools --------------------------------------------------------------------------
zigbuild_root=$CACHE_ROOT/cargo-zigbuild-$ZIGBUILD_VERSION
zigbuild=$zigbuild_root/bin/cargo-zigbuild
if [[ ! -x $zigbuild ]]; then
    log "cargo install --locked cargo-zigbuild@$ZIGBUILD_VERSION (once, into $zigbuild_root)"
    mkdir -p "$CACHE_ROOT"
    install_log=$CACHE_ROOT/cargo-zigbuild-$ZIGBUILD_VERSION.log
    # Its own temporary target directory, whatever CARGO_TARGET_DIR says.
    if ! env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET cargo install --locked --quiet \
        --root "$zigbuild_root" "cargo-zigbuild@$ZIGBUILD_VERSION" >"$install_log" 2>&1; then
        tail -n 20 "$install_log" >&2
        die "cargo install cargo-zigbuild@$ZIGBUILD_VERSION failed (log: $install_log)"
    fi
fi

zig_venv=$CACHE_ROOT/ziglang-$ZIG_VERSION
zig_python=$zig_venv/bin/python3
if ! "$zig_python" -m ziglang version >/dev/null 2>&1; then
    log "PyPI ziglang==$ZIG_VERSION in a venv (once, into $zig_venv)"
    rm -rf "$zig_venv"
    command -v python3 >/dev/null || apt_install python3
    # Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
    if ! python3 -m venv "$zig_venv" >/dev/null 2>&1; then
        rm -rf "$zig_venv"
        apt_install python3-venv
        python3 -m venv "$zig_venv" || die "python3 -m venv $zig_venv failed"
    fi
    "$zig_venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "ziglang==$ZIG_VERSION" ||
        { rm -rf "$zig_venv"; die "pip install ziglang==$ZIG_VERSION failed"; }
    "$zig_python" -m ziglang version >/dev/null 2>&1 ||
        { rm -rf "$zig_venv"; die "ziglang==$ZIG_VERSION installed but 'python3 -m ziglang version' fails"; }
fi
log "cargo-zigbuild $ZIGBUILD_VERSION, zig $("$zig_python" -m ziglang version)"
[[ $tools_only -eq 1 ]] && { echo "$zigbuild"; exit 0; }

# ---- build --------------------------------------------------------------------------
# zigbuild runs `python3 -m ziglang` with this python, so no zig is needed on PATH.
export CARGO_ZIGBUILD_PYTHON_PATH=$zig_python
export CARGO_ZIGBUILD_CACHE_DIR=$CACHE_ROOT/cargo-zigbuild-cache
export ZIG_GLOBAL_CACHE_DIR=$CACHE_ROOT/zig-cache
export CARGO_TARGET_DIR=$target_dir
unset CARGO_BUILD_TARGET

mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)
out=${out:-$target_dir/dist}
mkdir -p "$out" || die "cannot create $out"
out=$(cd "$out" && pwd)

bin_args=()
for b in "${HOST_BINS[@]}" "${GUEST_BINS[@]}"; do bin_args+=(--bin "$b"); done
[[ -n $tests_out ]] && bin_args+=(--test process --test sandbox)
log "cargo zigbuild --release --target $TARGET (target dir $target_dir)"
cd "$REPO_DIR"
messages=$target_dir/zigbuild-messages.json
# Messages as JSON on stdout (the test executables' names), diagnostics on stderr.
"$zigbuild" zigbuild --release --locked --target "$TARGET" --message-format=json-render-diagnostics \
    -p vgpu-mediator -p vgpu-nfs -p vhost-vgpu -p vgpu-guest "${bin_args[@]}" --lib >"$messages" ||
    die "cargo zigbuild --target $TARGET failed"

built=$target_dir/x86_64-unknown-linux-gnu/release
# FILE[:NAME]: the library under its soname.
for f in "${HOST_BINS[@]}" "${GUEST_BINS[@]}" libvgpu.so:libvgpu.so.1; do
    name=${f#*:}
    f=${f%%:*}
    [[ -f $built/$f ]] || die "the build did not produce $built/$f"
    rm -f "$out/$name"
    if [[ $keep_debug -eq 1 ]]; then
        cp "$built/$f" "$out/$name"
    else
        objcopy --strip-debug "$built/$f" "$out/$name" || die "objcopy --strip-debug $f failed"
    fi
done
rm -f "$out/libvgpu.so"
ln -s libvgpu.so.1 "$out/libvgpu.so"
if [[ -n $tests_out ]]; then
    mkdir -p "$tests_out" || die "cannot create $tests_out"
    for t in process sandbox; do
        exe=$(grep -o "\"executable\":\"[^\"]*/deps/$t-[0-9a-f]*\"" "$messages" | tail -n 1 | cut -d'"' -f4)
        [[ -n $exe && -x $exe ]] || die "the build did not report the test executable $t"
        cp "$exe" "$tests_out/$t"
    done
fi
install -m 0644 guest-lib/include/vgpu.h guest-lib/include/vgpu_ioctl.h "$out/"
log "$(( ${#HOST_BINS[@]} + ${#GUEST_BINS[@]} )) binaries and libvgpu.so.1 in $out"
echo "$out"
