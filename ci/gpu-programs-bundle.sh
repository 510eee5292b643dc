#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Puts into a GPU bundle what ci/gpu-programs.sh runs besides the guests: cudarc's own
# examples (at the cudarc version in Cargo.lock, built unchanged from the crate cargo
# downloaded), cuda-driver-check (ci/guest/cuda-driver-check.c, built -lcuda against
# guest-lib/include/cuda/cuda.h) and vgpu-cudarc-check. Run where cargo and cc are, after
# `cargo build --release -p vgpu-libcuda -p vgpu-cudarc-check`.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "gpu-programs-bundle.sh: error: $*" >&2; exit 1; }

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    cat <<EOF
Usage: $(basename "$0") DIR

Writes DIR/cudarc-examples (cudarc's examples 01-06, 09, 10, 12, matmul-kernel and
nvrtc-compile, stripped, with sin.ptx), DIR/cuda-driver-check and DIR/vgpu-cudarc-check.
Environment: CARGO_TARGET_DIR.
EOF
    [[ $# -eq 1 ]] && exit 0
    exit 2
fi
dir=$1
mkdir -p "$dir/cudarc-examples"
cd "$REPO_DIR"
target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
for f in libvgpu_cuda.so vgpu-cudarc-check; do
    [[ -f $target/$f ]] || die "$target/$f missing: cargo build --release -p vgpu-libcuda -p vgpu-cudarc-check"
done

version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
[[ -n $version ]] || die "no cudarc in Cargo.lock"
cargo fetch --locked >/dev/null
src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "cudarc-$version" | head -n 1)
[[ -d $src ]] || die "cudarc-$version not in cargo's registry"

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-programs-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r "$src" "$work/cudarc"
examples=(01-allocate 02-copy 03-launch-kernel 04-streams 05-device-repr 06-threading
    09-constant-memory 10-function-attributes 12-context-config matmul-kernel nvrtc-compile)
args=()
for e in "${examples[@]}"; do
    args+=(--example "$e")
done
echo "gpu-programs-bundle.sh: cudarc $version's examples (cargo build --release)"
(cd "$work/cudarc" && CARGO_TARGET_DIR=$work/target cargo build --release --quiet \
    --no-default-features --features std,driver,nvrtc,cuda-13000,dynamic-loading "${args[@]}")
for e in "${examples[@]}"; do
    strip -o "$dir/cudarc-examples/$e" "$work/target/release/examples/$e"
done
cp "$src/examples/sin.ptx" "$dir/cudarc-examples/"

# cuda-driver-check links against libcuda.so: the guest library under that name.
mkdir -p "$work/lib"
ln -s "$target/libvgpu_cuda.so" "$work/lib/libcuda.so"
cc -std=c11 -O2 -Wall -Wextra -Werror -o "$dir/cuda-driver-check" ci/guest/cuda-driver-check.c \
    -I guest-lib/include/cuda -L "$work/lib" -lcuda
strip "$dir/cuda-driver-check"
strip -o "$dir/vgpu-cudarc-check" "$target/vgpu-cudarc-check"
echo "gpu-programs-bundle.sh: wrote $dir/cudarc-examples ($(du -sh "$dir/cudarc-examples" | cut -f1)), $dir/cuda-driver-check, $dir/vgpu-cudarc-check"
