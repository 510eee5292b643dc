#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the guest driver vgpu.ko out of tree against one kernel's build tree, on this
# machine or in the build root of another Debian release (ci/build-root.sh), from a fresh
# copy of guest-lib/driver and guest-lib/include.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") --kbuild DIR --out DIR [--root ROOT] [MAKE-ARG...]

Copies the driver's sources (guest-lib/driver: *.c, *.h, Makefile, Kbuild; and
guest-lib/include) into a fresh directory, runs make KDIR=<kbuild> there with the
MAKE-ARGs (e.g. W=1) and copies vgpu.ko into the output directory. make's output goes
to stdout; the exit status is make's.

  --kbuild DIR   the kernel build tree (KBUILD of ci/guest-kernel.sh)
  --root ROOT    the build root that holds it (KBUILD_ROOT of ci/guest-kernel.sh
                 --suite): the build runs there, in a directory under ROOT/tmp that is
                 removed afterwards; DIR is a path inside ROOT
  --out DIR      where vgpu.ko goes (created); without --root the build directory
                 is DIR/src and stays
  -h, --help     show this help
EOF
}

die() { echo "driver-build.sh: error: $*" >&2; exit 1; }

kbuild=
root=
out=
make_args=()
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --kbuild) need_arg "$1" $#; kbuild=$2; shift ;;
        --root) need_arg "$1" $#; root=$2; shift ;;
        --out) need_arg "$1" $#; out=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) make_args+=("$1") ;;
    esac
    shift
done
[[ -n $kbuild ]] || die "--kbuild is required (see --help)"
[[ -n $out ]] || die "--out is required (see --help)"
[[ -f $root$kbuild/Makefile ]] || die "no kernel build tree at ${root:+$root:}$kbuild"
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [[ -n $root ]]; then
    src=$(mktemp -d "$root/tmp/vgpu-driver.XXXXXX")
    trap 'rm -rf "$src"' EXIT
else
    src=$out/src
    rm -rf "$src"
    mkdir -p "$src"
fi
mkdir -p "$src/guest-lib"
cp -r "$REPO_DIR/guest-lib/driver" "$REPO_DIR/guest-lib/include" "$src/guest-lib/"
# Only the sources: objects a developer built in the checkout would be reused otherwise.
find "$src/guest-lib/driver" -type f \( -name '*.mod.c' -o ! \( -name '*.c' -o -name '*.h' \
    -o -name Makefile -o -name Kbuild \) \) -delete
rm -f "$out/vgpu.ko"

if [[ -n $root ]]; then
    bash "$HERE/build-root.sh" --run "$root" \
        make -C "/${src#"$root"/}/guest-lib/driver" KDIR="$kbuild" "${make_args[@]}"
else
    make -C "$src/guest-lib/driver" KDIR="$kbuild" "${make_args[@]}"
fi
[[ -f $src/guest-lib/driver/vgpu.ko ]] || die "make did not produce vgpu.ko"
cp "$src/guest-lib/driver/vgpu.ko" "$out/vgpu.ko"
