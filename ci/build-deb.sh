#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the guest's Debian packages vgpu-dkms, vgpu-guest and vgpu-cuda with dpkg-deb
# from the release binaries and packaging/deb/.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKG_DIR=$REPO_DIR/packaging
MAINTAINER=${VGPU_DEB_MAINTAINER:-vGPU team <team@vgpu.invalid>}
SONAME=libvgpu.so.1

usage() {
    cat <<EOF
Usage: $(basename "$0") [--bin-dir DIR] [--out DIR] [--release N] [--no-cuda]

Packages the guest side for Debian and Ubuntu with dpkg-deb (no source package: the
binaries come from cargo):

  vgpu-dkms   (all)    /usr/src/vgpu-VERSION/{dkms.conf,Makefile,vgpu.c,vgpu_ioctl.h},
                       /lib/udev/rules.d/60-vgpu.rules; postinst: creates the group
                       vgpu, builds and installs vgpu.ko with DKMS (running and newest
                       kernel; later kernels through AUTOINSTALL) and loads it where the
                       device is; prerm: dkms remove
  vgpu-guest  (ARCH)   /usr/bin/{vgpu-smi,vgpu-vector-add,vgpu-nfs-client},
                       /usr/lib/MULTIARCH/{$SONAME,libvgpu.so,pkgconfig/vgpu.pc},
                       /usr/include/{vgpu.h,vgpu_ioctl.h}
  vgpu-cuda   (ARCH)   /usr/lib/vgpu/{libcuda.so.1,libcuda.so,libnvrtc.so.13,libnvrtc.so},
                       /etc/ld.so.conf.d/vgpu-cuda.conf, /usr/include/vgpu-cuda/cuda.h,
                       /usr/lib/MULTIARCH/pkgconfig/vgpu-cuda.pc

The version is the workspace's (Cargo.toml), the Debian revision --release. Dependencies
on the C library come from dpkg-shlibdeps. Output: progress on stderr, the packages'
absolute paths on stdout, one a line, in the order above. Installs dpkg-dev and binutils
if missing.

Options:
  --bin-dir DIR   the binaries: vgpu-smi, vgpu-vector-add, vgpu-nfs-client, libvgpu.so
                  (and libvgpu_cuda.so, libvgpu_nvrtc.so); default: cargo build --release
                  and its target directory (CARGO_TARGET_DIR or target/)
  --out DIR       where the .deb files go (default: target/deb)
  --release N     the Debian revision (default 1)
  --no-cuda       leave vgpu-cuda out
  -h, --help      show this help

Environment: CARGO_TARGET_DIR, VGPU_DEB_MAINTAINER (the Maintainer field).
EOF
}

die() { echo "build-deb.sh: error: $*" >&2; exit 1; }
log() { echo "build-deb.sh: $*" >&2; }

bin_dir=
out=$REPO_DIR/target/deb
release=1
cuda=1
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --bin-dir) need_arg "$1" $#; bin_dir=$2; shift ;;
        --out) need_arg "$1" $#; out=$2; shift ;;
        --release) need_arg "$1" $#; release=$2; shift ;;
        --no-cuda) cuda=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $release =~ ^[0-9][0-9a-zA-Z.+~]*$ ]] || die "--release wants e.g. 1 or 2~rc1, got '$release'"

# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this script needs Debian or Ubuntu"
apt_install dpkg-dev binutils

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' \
    "$REPO_DIR/Cargo.toml")
[[ $version =~ ^[0-9][0-9a-zA-Z.+~]*$ ]] ||
    die "cannot read a version usable by dpkg from Cargo.toml's [workspace.package] (got '$version')"
debversion=$version-$release
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)

if [[ -z $bin_dir ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "no cargo on PATH (install a Rust toolchain, see ci/setup.sh)"
    crates=(-p vgpu-guest)
    [[ $cuda -eq 1 ]] && crates+=(-p vgpu-libcuda -p vgpu-libnvrtc)
    log "cargo build --release ${crates[*]}"
    (cd "$REPO_DIR" && cargo build --release --locked "${crates[@]}" >&2) || die "cargo build failed"
    bin_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
fi
[[ -d $bin_dir ]] || die "--bin-dir $bin_dir is not a directory"
bin_dir=$(cd "$bin_dir" && pwd)
need=(vgpu-smi vgpu-vector-add vgpu-nfs-client libvgpu.so)
[[ $cuda -eq 1 ]] && need+=(libvgpu_cuda.so libvgpu_nvrtc.so)
for f in "${need[@]}"; do
    [[ -f $bin_dir/$f ]] && continue
    [[ $f == libvgpu_*.so ]] && die "$bin_dir has no $f (--no-cuda leaves vgpu-cuda out)"
    die "$bin_dir has no $f"
done

# The shared libraries must carry the sonames they are installed under.
soname_of() { readelf -d "$1" | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p'; }
check_soname() { # FILE WANT
    local got
    got=$(soname_of "$1")
    [[ $got == "$2" ]] || die "$1 has soname '${got:-none}', want $2 (built before guest-lib/build.rs set it?)"
}
check_soname "$bin_dir/libvgpu.so" "$SONAME"
if [[ $cuda -eq 1 ]]; then
    check_soname "$bin_dir/libvgpu_cuda.so" libcuda.so.1
    check_soname "$bin_dir/libvgpu_nvrtc.so" libnvrtc.so.13
fi

mkdir -p "$out" || die "cannot create $out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Files' times: the last commit's, so that the same tree gives the same packages.
if epoch=$(git -C "$REPO_DIR" log -1 --format=%ct 2>/dev/null) && [[ -n $epoch ]]; then
    export SOURCE_DATE_EPOCH=$epoch
else
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)}
fi

# A template of packaging/ with its comment lines dropped and the fields filled in.
fill() { # TEMPLATE DEST
    sed -e '/^#/d' -e "s|@VERSION@|$version|g" -e "s|@DEBVERSION@|$debversion|g" \
        -e "s|@ARCH@|$arch|g" -e "s|@MAINTAINER@|$MAINTAINER|g" \
        -e "s|@PREFIX@|/usr|g" -e "s|@LIBDIR@|/usr/lib/$multiarch|g" \
        -e "s|@INCLUDEDIR@|/usr/include|g" -e "s|@CUDALIBDIR@|/usr/lib/vgpu|g" "$1" >"$2"
}
# Maintainer scripts keep their comments (the shebang among them).
fill_script() { # TEMPLATE DEST
    sed -e "s|@VERSION@|$version|g" "$1" >"$2"
    chmod 0755 "$2"
}
install_file() { # MODE SRC DEST
    install -D -m "$1" "$2" "$3"
}
# An ELF file stripped as dh_strip does: programs of their symbol table and debug
# information, shared libraries of everything the dynamic linker does not need.
install_stripped() { # MODE SRC DEST
    local args=(--remove-section=.comment --remove-section=.note)
    [[ $1 == 0644 ]] && args+=(--strip-unneeded)
    mkdir -p "$(dirname "$3")"
    strip "${args[@]}" -o "$3" "$2" || die "strip $2 failed"
    chmod "$1" "$3"
}
# DEPENDS: what dpkg-shlibdeps says the ELF files need (the C library, libgcc).
shlibdeps() { # PACKAGE FILE...
    local pkg=$1 args=() f deps
    shift
    mkdir -p "$tmp/shlibdeps/debian"
    printf 'Source: vgpu\n\nPackage: %s\nArchitecture: any\n' "$pkg" >"$tmp/shlibdeps/debian/control"
    for f in "$@"; do args+=(-e"$f"); done
    deps=$(cd "$tmp/shlibdeps" && dpkg-shlibdeps -O "${args[@]}" 2>"$tmp/shlibdeps.log") || {
        cat "$tmp/shlibdeps.log" >&2
        die "dpkg-shlibdeps failed for $pkg"
    }
    sed -n 's/^shlibs:Depends=//p' <<<"$deps"
}
# Writes DEBIAN/control (from packaging/deb/control.PACKAGE), DEBIAN/md5sums and the
# package, and prints its path.
build_package() { # PACKAGE ROOT DEPENDS
    local pkg=$1 root=$2 depends=$3 size deb doc=$2/usr/share/doc/$1
    install_file 0644 "$PKG_DIR/deb/copyright" "$doc/copyright"
    sed -i '/^#/d' "$doc/copyright"
    {
        echo "vgpu ($debversion) unstable; urgency=medium"
        echo
        echo "  * The vGPU guest side, version $version."
        echo
        echo " -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
    } | gzip -9n >"$doc/changelog.Debian.gz"
    chmod 0644 "$doc/changelog.Debian.gz"
    if [[ -f $PKG_DIR/deb/$pkg.lintian-overrides ]]; then
        install_file 0644 "$PKG_DIR/deb/$pkg.lintian-overrides" "$root/usr/share/lintian/overrides/$pkg"
    fi
    mkdir -p "$root/DEBIAN"
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    fill "$PKG_DIR/deb/control.$pkg" "$root/DEBIAN/control"
    sed -i -e "s|@INSTALLED_SIZE@|$size|" -e "s|@DEPENDS@|$depends|" "$root/DEBIAN/control"
    grep -q '@[A-Z_]*@' "$root/DEBIAN/control" && die "unfilled fields in $pkg's control: $(grep '@[A-Z_]*@' "$root/DEBIAN/control")"
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
        xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    find "$root" -type d -exec chmod 0755 {} +
    find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    deb=$out/${pkg}_${debversion}_$(sed -n 's/^Architecture: //p' "$root/DEBIAN/control").deb
    rm -f "$deb"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >"$tmp/dpkg-deb.log" 2>&1 || {
        cat "$tmp/dpkg-deb.log" >&2
        die "dpkg-deb --build $pkg failed"
    }
    log "$(basename "$deb"): $(dpkg-deb -f "$deb" Installed-Size) KiB installed, depends: $(dpkg-deb -f "$deb" Depends)"
    echo "$deb"
}

umask 022

# ---- vgpu-dkms ----------------------------------------------------------------------
root=$tmp/vgpu-dkms
src=$root/usr/src/vgpu-$version
install_file 0644 "$REPO_DIR/guest-lib/driver/Makefile" "$src/Makefile"
install_file 0644 "$REPO_DIR/guest-lib/driver/vgpu.c" "$src/vgpu.c"
install_file 0644 "$REPO_DIR/guest-lib/include/vgpu_ioctl.h" "$src/vgpu_ioctl.h"
sed "s/^PACKAGE_VERSION=.*/PACKAGE_VERSION=\"$version\"/" "$REPO_DIR/guest-lib/driver/dkms.conf" >"$src/dkms.conf"
chmod 0644 "$src/dkms.conf"
grep -qx "PACKAGE_VERSION=\"$version\"" "$src/dkms.conf" || die "guest-lib/driver/dkms.conf has no PACKAGE_VERSION line"
install_file 0644 "$PKG_DIR/udev/60-vgpu.rules" "$root/lib/udev/rules.d/60-vgpu.rules"
mkdir -p "$root/DEBIAN"
fill_script "$PKG_DIR/deb/vgpu-dkms.postinst" "$root/DEBIAN/postinst"
fill_script "$PKG_DIR/deb/vgpu-dkms.prerm" "$root/DEBIAN/prerm"
build_package vgpu-dkms "$root" ""

# ---- vgpu-guest ---------------------------------------------------------------------
root=$tmp/vgpu-guest
libdir=$root/usr/lib/$multiarch
for b in vgpu-smi vgpu-vector-add vgpu-nfs-client; do
    install_stripped 0755 "$bin_dir/$b" "$root/usr/bin/$b"
done
install_stripped 0644 "$bin_dir/libvgpu.so" "$libdir/$SONAME"
ln -s "$SONAME" "$libdir/libvgpu.so"
install_file 0644 "$REPO_DIR/guest-lib/include/vgpu.h" "$root/usr/include/vgpu.h"
install_file 0644 "$REPO_DIR/guest-lib/include/vgpu_ioctl.h" "$root/usr/include/vgpu_ioctl.h"
mkdir -p "$libdir/pkgconfig"
fill "$PKG_DIR/pkgconfig/vgpu.pc.in" "$libdir/pkgconfig/vgpu.pc"
install_file 0644 "$REPO_DIR/guest-lib/README.md" "$root/usr/share/doc/vgpu-guest/README.md"
mkdir -p "$root/DEBIAN"
install_file 0644 "$PKG_DIR/deb/vgpu-guest.triggers" "$root/DEBIAN/triggers"
# Packages built against libvgpu.so.1 depend on this one (dpkg-shlibdeps reads it).
echo "libvgpu 1 vgpu-guest (>= $version)" >"$root/DEBIAN/shlibs"
depends=$(shlibdeps vgpu-guest "$root/usr/bin/vgpu-smi" "$root/usr/bin/vgpu-vector-add" \
    "$root/usr/bin/vgpu-nfs-client" "$libdir/$SONAME")
build_package vgpu-guest "$root" "$depends"

# ---- vgpu-cuda ----------------------------------------------------------------------
if [[ $cuda -eq 1 ]]; then
    root=$tmp/vgpu-cuda
    install_stripped 0644 "$bin_dir/libvgpu_cuda.so" "$root/usr/lib/vgpu/libcuda.so.1"
    install_stripped 0644 "$bin_dir/libvgpu_nvrtc.so" "$root/usr/lib/vgpu/libnvrtc.so.13"
    ln -s libcuda.so.1 "$root/usr/lib/vgpu/libcuda.so"
    ln -s libnvrtc.so.13 "$root/usr/lib/vgpu/libnvrtc.so"
    mkdir -p "$root/etc/ld.so.conf.d"
    echo /usr/lib/vgpu >"$root/etc/ld.so.conf.d/vgpu-cuda.conf"
    install_file 0644 "$REPO_DIR/guest-lib/include/cuda/cuda.h" "$root/usr/include/vgpu-cuda/cuda.h"
    mkdir -p "$root/usr/lib/$multiarch/pkgconfig"
    fill "$PKG_DIR/pkgconfig/vgpu-cuda.pc.in" "$root/usr/lib/$multiarch/pkgconfig/vgpu-cuda.pc"
    install_file 0644 "$REPO_DIR/docs/cuda.md" "$root/usr/share/doc/vgpu-cuda/cuda.md"
    mkdir -p "$root/DEBIAN"
    install_file 0644 "$PKG_DIR/deb/vgpu-cuda.triggers" "$root/DEBIAN/triggers"
    echo /etc/ld.so.conf.d/vgpu-cuda.conf >"$root/DEBIAN/conffiles"
    depends=$(shlibdeps vgpu-cuda "$root/usr/lib/vgpu/libcuda.so.1" "$root/usr/lib/vgpu/libnvrtc.so.13")
    build_package vgpu-cuda "$root" "$depends"
fi
