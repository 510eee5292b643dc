#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fetches the guest kernel the end-to-end tests boot: Debian's current linux-image-amd64
# (or that of another Debian suite), unpacked into a cache (vmlinuz + lib/modules), plus
# the matching linux-headers package so out-of-tree modules (the vgpu driver) build
# against it.
set -euo pipefail

CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--suite SUITE] [--kver KVER|SERIES|newest] [--update]
                      [--no-headers | --headers-only]

Resolves the kernel that Debian's linux-image-amd64 depends on, downloads
linux-image-<kver> with apt-get download (and, where that is only a metapackage, the
linux-binary-, linux-modules- and linux-base- packages it depends on), unpacks it into
\${VGPU_CACHE:-\$HOME/.cache/vgpu}/kernel-<kver>/ (vmlinuz, config, lib/modules/<kver>
with modules.dep) and installs linux-headers-<kver>. A cached kernel is reused.

Without --suite the kernel comes from this machine's apt sources and its headers are
installed here. With --suite it comes from that Debian suite, e.g. trixie (Debian 13's
kernel) or trixie-backports (the newest kernel built for Debian 13): apt runs in the
build root of that release (ci/build-root.sh: a cached debootstrap'ed chroot with gcc
and make), its headers are installed there, and out-of-tree modules are built there
too (ci/driver-build.sh --root), since that kernel's kbuild tools need that release's
C library. The build root's package lists are refreshed when a day old (or --update).

Output (stdout, for eval):
  KVER=<kver>             e.g. 6.1.0-57-amd64, 7.3.4+deb13-amd64
  KDIR=<cache dir>        holds vmlinuz and lib/modules/<kver> (empty with --headers-only)
  KERNEL=<KDIR>/vmlinuz   (empty with --headers-only)
  KBUILD=<headers dir>    for make -C \$KBUILD M=\$PWD modules (empty with --no-headers);
                          with --suite a path inside KBUILD_ROOT
  KBUILD_ROOT=<dir>       with --suite: the build root that holds KBUILD; empty otherwise
  KSUITE=<suite>          the suite given with --suite; empty otherwise

Options:
  --suite SUITE  take the kernel from Debian SUITE: RELEASE (its main, updates and
                 security archives) or RELEASE-backports, e.g. trixie, trixie-backports
  --kver KVER    use this kernel release instead of linux-image-amd64's; or SERIES
                 (e.g. 7, 7.2, 6.12): the newest kernel release of that series in the
                 suite; or newest: linux-image-amd64's (the default)
  --update       refresh the package lists before resolving (otherwise only when needed)
  --no-headers   do not install linux-headers-<kver>
  --headers-only install linux-headers-<kver> but fetch no kernel image
  -h, --help     show this help
EOF
}

die() { echo "guest-kernel.sh: error: $*" >&2; exit 1; }
log() { echo "guest-kernel.sh: $*" >&2; }

kver=
suite=
force_update=0
headers=1
image=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --kver)
            [[ $# -ge 2 ]] || die "--kver needs a value"
            kver=$2
            shift
            ;;
        --suite)
            [[ $# -ge 2 ]] || die "--suite needs a value"
            suite=$2
            shift
            ;;
        --update) force_update=1 ;;
        --no-headers) headers=0 ;;
        --headers-only) image=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $headers -eq 1 || $image -eq 1 ]] || die "--no-headers and --headers-only leave nothing to do"
[[ $kver == newest ]] && kver=

command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"

# shellcheck source=ci/apt.sh
source "$HERE/apt.sh"

# Where apt runs: on this machine, or in the build root of the suite's release.
root=
release=
if [[ -n $suite ]]; then
    [[ $suite =~ ^([a-z]+)(-backports)?$ ]] ||
        die "--suite wants a Debian release or RELEASE-backports (e.g. trixie, trixie-backports), got '$suite'"
    release=${BASH_REMATCH[1]}
    root=$(bash "$HERE/build-root.sh" "$release") || die "no build root for Debian $release"
    mkdir -p "$CACHE_ROOT"
    exec 8>"$CACHE_ROOT/.build-root-$release.lock"
fi

# An apt command where the kernel's packages come from.
in_env() {
    if [[ -n $root ]]; then
        bash "$HERE/build-root.sh" --run "$root" "$@"
    else
        "$@"
    fi
}

# The build root's lock (fd 8): apt-get update and install there, one at a time.
locked=0
lock_root() { [[ $locked -gt 0 ]] || flock 8; locked=$((locked + 1)); }
unlock_root() { locked=$((locked - 1)); [[ $locked -gt 0 ]] || flock -u 8; }

# Refreshes the package lists (once): this machine's, or the build root's.
updated=0
update_lists() {
    [[ $updated -eq 0 ]] || return 0
    updated=1
    if [[ -z $root ]]; then
        apt_update_once
        return 0
    fi
    log "apt-get update in the Debian $release build root"
    lock_root
    in_env apt-get update -qq >/dev/null || die "apt-get update in $root failed"
    touch "$root/.apt-updated"
    unlock_root
}

# The kernel release a linux-image-amd64 depends on, e.g. 6.1.0-56-amd64: this machine's
# candidate, or the one of the suite.
resolve_meta() {
    local pkg=linux-image-amd64 deps
    [[ $suite == *-backports ]] && pkg=$pkg/$suite
    deps=$(in_env apt-cache depends --important "$pkg" 2>/dev/null || true)
    sed -n 's/^ *|\{0,1\}Depends: linux-image-\([0-9][^ ]*\)$/\1/p' <<<"$deps" | head -n 1
}

# The newest kernel release of SERIES (7, 7.2, 6.12) in the suite: of the amd64 flavour
# (not cloud, rt, unsigned or debug packages), from the suite's archives.
resolve_series() { # SERIES
    local series=${1//./\\.} names archives
    mapfile -t names < <(in_env apt-cache pkgnames "linux-image-$1" 2>/dev/null |
        grep -E "^linux-image-$series(\\.[0-9]+)*(\\+deb[0-9.]+|-[0-9]+)-amd64\$" || true)
    [[ ${#names[@]} -gt 0 ]] || return 0
    # madison: "PKG | VERSION | URI ARCHIVE/COMPONENT ARCH Packages", one line per source.
    case $suite in
        '') archives='.*' ;;
        *-backports) archives="$suite" ;;
        *) archives="$suite(-updates|-security)?" ;;
    esac
    in_env apt-cache madison "${names[@]}" 2>/dev/null |
        awk -F' *[|] *' -v want="^($archives)/" '{ split($3, f, " "); if (f[2] ~ want) print $1 }' |
        sed 's/^linux-image-//' | sort -u -V | tail -n 1
}

resolve_kver() {
    if [[ -z $kver ]]; then
        resolve_meta
    elif [[ $kver =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        resolve_series "$kver"
    else
        echo "$kver"
    fi
}

if [[ -n $root ]]; then
    # A day-old list may lack the newest kernel, or name one the mirror no longer has.
    if [[ $force_update -eq 1 || -n $(find "$root/.apt-updated" -mmin +1440 2>/dev/null) ]]; then
        update_lists
    fi
elif [[ $force_update -eq 1 ]]; then
    update_lists
fi
asked=${kver:-newest}
want=$(resolve_kver)
if [[ -z $want ]]; then
    update_lists
    want=$(resolve_kver)
fi
[[ -n $want ]] || die "cannot resolve kernel '$asked'${suite:+ in $suite} (apt-cache)"
kver=$want
log "kernel $kver${suite:+ from Debian $suite}"

# Downloads packages into DIR (on this machine), refreshing the lists once if that fails.
download() { # DIR PKG...
    local dir=$1 indir
    shift
    # apt's download sandbox user must be able to write the target directory.
    chmod 0755 "$dir"
    if [[ -n $root ]]; then
        indir=/${dir#"$root"/}
        # shellcheck disable=SC2016 # expanded by the shell in the build root
        get() { in_env sh -c 'cd "$1" && shift && exec apt-get download -qq "$@"' sh "$indir" "$@"; }
    else
        get() { (cd "$dir" && apt-get download -qq "$@"); }
    fi
    if ! get "$@" >/dev/null 2>&1; then
        update_lists
        get "$@" >/dev/null 2>&1 || die "apt-get download $* failed"
    fi
}

# The .deb of PKG in DIR.
deb_of() { # DIR PKG
    local deb
    deb=$(find "$1" -maxdepth 1 -name "${2}_*.deb" | head -n 1)
    [[ -n $deb ]] || die "no $2 package was downloaded"
    echo "$deb"
}

# Where the suite's downloads go: inside the build root, so its apt can write there.
tmp_base=$CACHE_ROOT
[[ -n $root ]] && tmp_base=$root/tmp

kdir=
if [[ $image -eq 1 ]]; then
    kdir=$CACHE_ROOT/kernel-$kver
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.kernel-$kver.lock"
    flock 9
fi

if [[ $image -eq 1 && ! -f $kdir/.complete ]]; then
    apt_install kmod
    log "fetching linux-image-$kver"
    tmp=$(mktemp -d "$tmp_base/.kernel-$kver.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    chmod 0755 "$tmp"
    mkdir "$tmp/debs"
    download "$tmp/debs" "linux-image-$kver"
    deb=$(deb_of "$tmp/debs" "linux-image-$kver")
    dpkg-deb -x "$deb" "$tmp/root" || die "cannot unpack $deb"
    # Newer Debian kernels split linux-image-<kver> into an empty metapackage that
    # depends on linux-binary-<kver> (vmlinuz), linux-modules-<kver> (the modules) and
    # linux-base-<kver> (config, modules.builtin, modules.order), or on -unsigned.
    if [[ ! -f $tmp/root/boot/vmlinuz-$kver ]]; then
        mapfile -t parts < <(dpkg-deb -f "$deb" Depends | sed 's/[,|]/\n/g' | sed 's/^ *//; s/ .*//' |
            grep -Fx -e "linux-binary-$kver" -e "linux-modules-$kver" -e "linux-base-$kver" \
                -e "linux-image-$kver-unsigned" | sort -u)
        [[ ${#parts[@]} -gt 0 ]] || die "$deb has no vmlinuz and depends on no linux-binary-$kver"
        log "linux-image-$kver is a metapackage: fetching ${parts[*]}"
        download "$tmp/debs" "${parts[@]}"
        for p in "${parts[@]}"; do
            d=$(deb_of "$tmp/debs" "$p")
            dpkg-deb -x "$d" "$tmp/root" || die "cannot unpack $d"
        done
    fi
    # Debian ships usr-merged or not depending on the release.
    moddir=$tmp/root/lib/modules/$kver
    [[ -d $moddir ]] || moddir=$tmp/root/usr/lib/modules/$kver
    [[ -d $moddir ]] || die "linux-image-$kver has no lib/modules/$kver"
    vmlinuz=$tmp/root/boot/vmlinuz-$kver
    [[ -f $vmlinuz ]] || vmlinuz=$moddir/vmlinuz
    [[ -f $vmlinuz ]] || die "linux-image-$kver has no boot/vmlinuz-$kver nor lib/modules/$kver/vmlinuz"
    config=$tmp/root/boot/config-$kver
    [[ -f $config ]] || config=$moddir/config

    rm -rf "$kdir"
    mkdir -p "$tmp/out/lib/modules"
    mv "$vmlinuz" "$tmp/out/vmlinuz"
    [[ -f $config ]] && mv "$config" "$tmp/out/config"
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
if [[ $headers -eq 1 && -z $root ]]; then
    apt_install "linux-headers-$kver"
    kbuild=/usr/src/linux-headers-$kver
    [[ -f $kbuild/Makefile ]] || kbuild=/lib/modules/$kver/build
    [[ -f $kbuild/Makefile ]] || die "linux-headers-$kver is installed but no kernel build tree was found"
elif [[ $headers -eq 1 ]]; then
    kbuild=/usr/src/linux-headers-$kver
    lock_root
    if [[ ! -f $root$kbuild/Makefile ]]; then
        log "installing linux-headers-$kver in the Debian $release build root"
        tmp=$(mktemp -d "$tmp_base/.headers-$kver.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        download "$tmp" "linux-headers-$kver"
        deb=$(deb_of "$tmp" "linux-headers-$kver")
        # What the headers need (kbuild tools, the common headers, the compiler), but not
        # the kernel image some releases' headers depend on: an alternative group that
        # names linux-image- is left out.
        mapfile -t deps < <(dpkg-deb -f "$deb" Depends | tr ',' '\n' | grep -v 'linux-image-' |
            sed 's/^ *//; s/[ |(].*//' | grep .)
        # A backports kernel may need the backports version of a tool (-t prefers them).
        target=()
        [[ $suite == *-backports ]] && target=(-t "$suite")
        if ! out=$(in_env apt-get install -y -qq "${target[@]}" "${deps[@]}" 2>&1); then
            tail -n 20 <<<"$out" >&2
            die "apt-get install ${deps[*]} failed in $root"
        fi
        # The package itself, unpacked by hand (apt would insist on the image): only
        # usr/src, so that the root's own directory links stay as they are.
        dpkg-deb -x "$deb" "$tmp/x" || die "cannot unpack $deb"
        [[ -f $tmp/x$kbuild/Makefile ]] || die "$deb has no $kbuild/Makefile"
        cp -a "$tmp/x/usr/src/." "$root/usr/src/"
        rm -rf "$tmp"
        trap - EXIT
    fi
    unlock_root
    [[ -f $root$kbuild/Makefile ]] || die "no kernel build tree $kbuild in $root"
fi

echo "KVER=$kver"
echo "KDIR=$kdir"
echo "KERNEL=${kdir:+$kdir/vmlinuz}"
echo "KBUILD=$kbuild"
echo "KBUILD_ROOT=$root"
echo "KSUITE=$suite"
