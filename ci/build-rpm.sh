#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the RPMs vgpu-host, vgpu-guest and vgpu-dkms from the glibc 2.17 binaries and
# the driver's source, with Debian's rpmbuild and packaging/rpm/vgpu.spec.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SPEC=$REPO_DIR/packaging/rpm/vgpu.spec

usage() {
    cat <<EOF
Usage: $(basename "$0") [--bin-dir DIR] [--out DIR] [--release N]

Packages the binaries of ci/build-glibc217.sh with packaging/rpm/vgpu.spec (rpmbuild -bb,
gzip payload, readable by rpm 4.11: CentOS 7, XCP-ng Dom0, RHEL 7 and later):

  vgpu-host   /usr/bin/{vgpu-mediator,vgpu-executor-worker,vhost-vgpu},
              /usr/lib/systemd/system/{vhost-vgpu,vgpu-mediator-nfs,vgpu-worker}.service (the units of
              qemu-configs/ with their binaries in /usr/bin),
              /usr/lib/tmpfiles.d/vhost-vgpu.conf, /var/vgpu; %pre creates the system
              users vgpu and vgpu-worker and adds QEMU's user qemu, where it exists,
              to the group vgpu (vhost-vgpu.service's sockets)
  vgpu-guest  /usr/bin/{vgpu-nfs-client,vgpu-smi,vgpu-vector-add},
              /usr/lib64/{libvgpu.so.1,libvgpu.so,pkgconfig/vgpu.pc},
              /usr/include/{vgpu.h,vgpu_ioctl.h}; ldconfig in %post and %postun
  vgpu-dkms   (noarch) /usr/src/vgpu-VERSION/{dkms.conf,Makefile,vgpu.c,vgpu_ioctl.h},
              /usr/lib/udev/rules.d/60-vgpu.rules; %pre creates the group vgpu,
              %post builds and installs vgpu.ko with DKMS and loads it where the
              device is, %preun removes it from DKMS

Output: progress on stderr, the three packages' absolute paths on stdout, one a line,
in that order.
Installs Debian's rpm package (rpmbuild) if missing.

Options:
  --bin-dir DIR   the binaries (default: run ci/build-glibc217.sh and use its output)
  --out DIR       where the .rpm files go (default: target/glibc217/rpm)
  --release N     the packages' release (default 1); the version is the workspace's
  -h, --help      show this help
EOF
}

die() { echo "build-rpm.sh: error: $*" >&2; exit 1; }
log() { echo "build-rpm.sh: $*" >&2; }

bin_dir=""
out=$REPO_DIR/target/glibc217/rpm
release=1
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --bin-dir) need_arg "$1" $#; bin_dir=$2; shift ;;
        --out) need_arg "$1" $#; out=$2; shift ;;
        --release) need_arg "$1" $#; release=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $release =~ ^[0-9][0-9a-zA-Z._]*$ ]] || die "--release wants e.g. 1 or 2.rc1, got '$release'"

# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"
apt_install rpm

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' \
    "$REPO_DIR/Cargo.toml")
[[ $version =~ ^[0-9][0-9a-zA-Z.]*$ ]] ||
    die "cannot read a version usable by rpm from Cargo.toml's [workspace.package] (got '$version')"

if [[ -z $bin_dir ]]; then
    bin_dir=$(bash "$REPO_DIR/ci/build-glibc217.sh" | tail -n 1) || die "ci/build-glibc217.sh failed"
fi
[[ -d $bin_dir ]] || die "--bin-dir $bin_dir is not a directory"
bin_dir=$(cd "$bin_dir" && pwd)
for f in vgpu-mediator vgpu-executor-worker vhost-vgpu vgpu-nfs-client vgpu-smi vgpu-vector-add \
    libvgpu.so.1 vgpu.h vgpu_ioctl.h; do
    [[ -f $bin_dir/$f ]] || die "$bin_dir has no $f (build it with ci/build-glibc217.sh)"
done

mkdir -p "$out" || die "cannot create $out"
out=$(cd "$out" && pwd)
top=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-rpm.XXXXXX")
trap 'rm -rf "$top"' EXIT

log "rpmbuild vgpu-host, vgpu-guest and vgpu-dkms $version-$release from $bin_dir"
rm -f "$out/vgpu-host-$version-$release.x86_64.rpm" "$out/vgpu-guest-$version-$release.x86_64.rpm" \
    "$out/vgpu-dkms-$version-$release.noarch.rpm"
if ! rpmbuild -bb --target x86_64 \
    --define "_topdir $top" \
    --define "_rpmdir $out" \
    --define '_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm' \
    --define "vgpu_version $version" \
    --define "vgpu_release $release" \
    --define "vgpu_bindir $bin_dir" \
    --define "vgpu_srcdir $REPO_DIR" \
    "$SPEC" >"$top/rpmbuild.log" 2>&1; then
    tail -n 30 "$top/rpmbuild.log" >&2
    die "rpmbuild -bb $SPEC failed"
fi
for p in host.x86_64 guest.x86_64 dkms.noarch; do
    rpm=$out/vgpu-${p%.*}-$version-$release.${p#*.}.rpm
    [[ -f $rpm ]] || die "rpmbuild did not write $rpm"
    echo "$rpm"
done
