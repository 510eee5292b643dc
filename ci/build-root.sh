#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# A Debian build root for kernels of another Debian release: a minimal chroot of that
# release with gcc and make, made once with debootstrap and cached, in which apt fetches
# that release's kernel packages and the kernel's own kbuild tools (built against that
# release's C library) run. ci/guest-kernel.sh --suite uses it; ci/driver-build.sh builds
# vgpu.ko in it.
set -euo pipefail

CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}
MIRROR=${VGPU_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VGPU_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What an out-of-tree module build needs beyond the kernel's headers package: make W=1
# runs scripts/kernel-doc, a Perl program up to Linux 6.x.
PACKAGES=(gcc make perl)

usage() {
    cat <<EOF
Usage: $(basename "$0") RELEASE
       $(basename "$0") --run ROOT [--] COMMAND [ARG...]

The first form makes sure the build root of Debian RELEASE (e.g. trixie) exists and
prints its path: \${VGPU_CACHE:-\$HOME/.cache/vgpu}/build-root-RELEASE. The first call
creates it (debootstrap --variant=minbase with ${PACKAGES[*]}, about 550 MB) with the
apt sources RELEASE, RELEASE-updates, RELEASE-security and RELEASE-backports, and runs
apt-get update there; later calls reuse it as it is (installing what a root made by an
older version of this script lacks).

The second form runs COMMAND inside ROOT (chroot) with a clean environment (PATH, HOME,
LANG only) and its own /proc, in a private mount and PID namespace (unshare): nothing
stays mounted when it ends. The working directory is / in ROOT.

Needs root. Environment: VGPU_CACHE, VGPU_DEBIAN_MIRROR (default $MIRROR),
VGPU_DEBIAN_SECURITY_MIRROR (default $SECURITY_MIRROR).

Options:
  -h, --help   show this help
EOF
}

die() { echo "build-root.sh: error: $*" >&2; exit 1; }
log() { echo "build-root.sh: $*" >&2; }

# Runs a command in a build root: its own /proc (the kernel's objtool reads it), the
# mount gone with the namespace.
run_in() { # ROOT COMMAND [ARG...]
    local root=$1
    shift
    [[ -x $root/usr/bin/env ]] || die "$root is not a build root"
    unshare --fork --pid --mount-proc="$root/proc" chroot "$root" /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

case ${1:-} in
    -h | --help) usage; exit 0 ;;
    --run)
        [[ $# -ge 3 ]] || die "--run needs ROOT and a command (see --help)"
        root=$2
        shift 2
        [[ ${1:-} == -- ]] && shift
        [[ $(id -u) -eq 0 ]] || die "needs root (chroot, unshare)"
        run_in "$root" "$@"
        exit
        ;;
    '' | -*) die "no release given (see --help)" ;;
esac
[[ $# -eq 1 ]] || die "one release expected, got: $* (see --help)"
release=$1
[[ $release =~ ^[a-z]+$ ]] || die "'$release' is not a Debian release name (e.g. trixie)"

root=$CACHE_ROOT/build-root-$release
# .complete records how the root was set up: the version of that setup (raised when
# configure() changes) and the packages.
FORMAT="1 ${PACKAGES[*]}"
ready() { [[ -f $root/.complete && $(cat "$root/.complete") == "$FORMAT" ]]; }

# This machine's apt proxy, if it uses one: debootstrap and the root's apt use it too.
proxy=
if command -v apt-config >/dev/null; then
    eval "$(apt-config shell proxy Acquire::http::Proxy)"
fi

# apt's sources and settings in a root.
configure() { # DIR
    cat >"$1/etc/apt/sources.list" <<EOF
deb $MIRROR $release main
deb $MIRROR $release-updates main
deb $SECURITY_MIRROR $release-security main
deb $MIRROR $release-backports main
EOF
    # No pseudo-terminal for dpkg's log: the root has no /dev/pts.
    cat >"$1/etc/apt/apt.conf.d/90build-root" <<EOF
APT::Install-Recommends "false";
Acquire::Languages "none";
DPkg::Lock::Timeout "600";
Dpkg::Use-Pty "false";
EOF
    if [[ -n $proxy ]]; then
        echo "Acquire::http::Proxy \"$proxy\";" >>"$1/etc/apt/apt.conf.d/90build-root"
    fi
}

if ! ready; then
    [[ $(id -u) -eq 0 ]] || die "needs root to create $root (debootstrap, chroot)"
    # shellcheck source=ci/apt.sh
    source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
    apt_install debootstrap util-linux
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.build-root-$release.lock"
    flock 9
fi
if [[ -f $root/.complete ]] && ! ready; then
    # A root set up by an older version of this script: bring it up to date.
    log "updating the setup of $root (${PACKAGES[*]})"
    configure "$root"
    run_in "$root" apt-get update -qq >/dev/null || die "apt-get update in $root failed"
    touch "$root/.apt-updated"
    run_in "$root" apt-get install -y -qq "${PACKAGES[@]}" >/dev/null ||
        die "apt-get install ${PACKAGES[*]} in $root failed"
    echo "$FORMAT" >"$root/.complete"
fi
if ! ready; then
    [[ -f /usr/share/debootstrap/scripts/$release ]] ||
        die "this debootstrap does not know Debian $release (a newer debootstrap may)"
    tmp=$(mktemp -d "$CACHE_ROOT/.build-root-$release.XXXXXX")
    trap 'rm -rf "$tmp" "$tmp.log"' EXIT
    # The root directory of the new system: readable by all (apt's _apt user among them).
    chmod 0755 "$tmp"
    log "creating the Debian $release build root (debootstrap, a minute or two)"
    if ! http_proxy=${http_proxy:-$proxy} debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        "$release" "$tmp" "$MIRROR" >"$tmp.log" 2>&1; then
        tail -n 20 "$tmp.log" >&2
        die "debootstrap $release failed"
    fi
    configure "$tmp"
    run_in "$tmp" apt-get update -qq >/dev/null || die "apt-get update in the $release build root failed"
    touch "$tmp/.apt-updated"
    echo "$FORMAT" >"$tmp/.complete"
    rm -rf "$root"
    mv "$tmp" "$root"
    rm -f "$tmp.log"
    trap - EXIT
    log "build root ready: $root ($(du -sh "$root" | cut -f1))"
fi
echo "$root"
