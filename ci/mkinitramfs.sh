#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the small initramfs the end-to-end tests boot: busybox, the kernel modules asked
# for (with their dependencies), extra binaries with their shared libraries, and an /init
# that loads virtio PCI, runs one guest script and powers off.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") OUT.cpio.gz --kdir KDIR [options]

Builds a gzip'd newc initramfs around busybox-static.

  --kdir KDIR          kernel cache dir from ci/guest-kernel.sh (holds lib/modules/<kver>)
  --kver KVER          kernel release under KDIR/lib/modules (needed only if several)
  --module NAME        a module of that kernel, with its dependencies (repeatable)
  --ko FILE.ko         an extra module, put in lib/modules/<kver>/extra (repeatable)
  --bin FILE[:DEST]    a program plus the shared libraries and loader it needs
                       (ldd); DEST defaults to /usr/bin/<name> (repeatable)
  --file SRC:DEST      a file or directory copied to DEST; DEST ending in / keeps
                       the name (repeatable)
  --init SCRIPT        the guest script, installed as /guest.sh and run by /init
                       with sh; without it /init starts an interactive shell
  -h, --help           show this help

/init mounts proc, sys, devtmpfs, /tmp and /run, modprobes virtio_ring, virtio,
virtio_pci_modern_dev, virtio_pci_legacy_dev and virtio_pci, prints GUEST-START,
runs /guest.sh, prints 'GUEST-EXIT <rc>' and powers off. Kernel command-line
words of the form NAME=value that the kernel does not know reach the script as
environment variables. modprobe works in the guest for every module included.
EOF
}

die() { echo "mkinitramfs.sh: error: $*" >&2; exit 1; }

BOOT_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci)

out=
kdir=
kver=
init_script=
modules=()
kos=()
bins=()
files=()
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --kdir) need_arg "$1" $#; kdir=$2; shift ;;
        --kver) need_arg "$1" $#; kver=$2; shift ;;
        --module) need_arg "$1" $#; modules+=("$2"); shift ;;
        --ko) need_arg "$1" $#; kos+=("$2"); shift ;;
        --bin) need_arg "$1" $#; bins+=("$2"); shift ;;
        --file) need_arg "$1" $#; files+=("$2"); shift ;;
        --init) need_arg "$1" $#; init_script=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [[ -z $out ]] || die "more than one output file given ('$out', '$1')"
            out=$1
            ;;
    esac
    shift
done
[[ -n $out ]] || die "no output file given (see --help)"
[[ -n $kdir ]] || die "--kdir is required (see ci/guest-kernel.sh)"
[[ -d $kdir/lib/modules ]] || die "$kdir/lib/modules does not exist"
if [[ -z $kver ]]; then
    mapfile -t kvers < <(find "$kdir/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n')
    [[ ${#kvers[@]} -eq 1 ]] || die "$kdir/lib/modules holds ${#kvers[@]} kernels: pick one with --kver"
    kver=${kvers[0]}
fi
moddir=$kdir/lib/modules/$kver
[[ -f $moddir/modules.dep ]] || die "$moddir/modules.dep is missing (run depmod -b $kdir $kver)"
[[ -z $init_script || -f $init_script ]] || die "guest script $init_script not found"

# Tools this script runs on the host.
# shellcheck source=ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
need_pkgs=()
# A dynamic /bin/busybox (package busybox) cannot run in the initramfs: replace it.
if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
    need_pkgs+=(busybox-static)
fi
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v depmod >/dev/null && command -v modprobe >/dev/null || need_pkgs+=(kmod)
[[ ${#need_pkgs[@]} -eq 0 ]] || apt_install "${need_pkgs[@]}"
if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is missing or not static: install busybox-static"
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,mnt}
chmod 1777 "$root/tmp"

# busybox and its applets.
cp /bin/busybox "$root/bin/busybox"
while read -r applet; do
    [[ -n $applet && $applet != bin/busybox ]] || continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done < <(/bin/busybox --list-full)

# Kernel modules with their dependencies, then depmod over what was copied.
copy_module_with_deps() {
    local name=$1 deps line path
    deps=$(modprobe -d "$kdir" -S "$kver" --show-depends "$name" 2>&1) ||
        die "module $name not found for $kver: $deps"
    while read -r line; do
        case $line in
            insmod\ *)
                path=${line#insmod }
                path=${path%% *}
                [[ $path == "$moddir"/* ]] || die "module path $path outside $moddir"
                mkdir -p "$root/lib/modules/$kver/$(dirname "${path#"$moddir"/}")"
                cp "$path" "$root/lib/modules/$kver/${path#"$moddir"/}"
                ;;
            builtin\ *) ;;
            *) [[ -z $line ]] || echo "mkinitramfs.sh: modprobe: $line" >&2 ;;
        esac
    done <<<"$deps"
}
mkdir -p "$root/lib/modules/$kver"
for m in "${BOOT_MODULES[@]}" "${modules[@]}"; do
    copy_module_with_deps "$m"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f $moddir/$f ]] && cp "$moddir/$f" "$root/lib/modules/$kver/"
done
if [[ ${#kos[@]} -gt 0 ]]; then
    mkdir -p "$root/lib/modules/$kver/extra"
    for ko in "${kos[@]}"; do
        [[ -f $ko ]] || die "module file $ko not found"
        cp "$ko" "$root/lib/modules/$kver/extra/"
        # The kernel modules it needs come along too (vgpu.ko: virtio, virtio_ring).
        ko_deps=$(modinfo -F depends "$ko") || die "cannot read module info of $ko"
        for dep in ${ko_deps//,/ }; do
            copy_module_with_deps "$dep"
        done
    done
fi
depmod -b "$root" "$kver" || die "depmod failed on the initramfs modules"

# A program and the shared objects it loads, each at the path ldd names.
copy_with_libs() {
    local src=$1 dest=$2 deps lib
    [[ -f $src ]] || die "program $src not found"
    mkdir -p "$root$(dirname "$dest")"
    rm -f "$root$dest"
    cp -L "$src" "$root$dest"
    chmod 0755 "$root$dest"
    deps=$(ldd "$src" 2>&1) || return 0 # static: nothing to add
    if grep -q 'not found' <<<"$deps"; then
        die "$src needs libraries missing on this host: $(grep 'not found' <<<"$deps" | tr -s ' \t' ' ')"
    fi
    while read -r lib; do
        [[ -f $root$lib ]] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps")
}
for b in "${bins[@]}"; do
    if [[ $b == *:* ]]; then
        copy_with_libs "${b%%:*}" "${b#*:}"
    else
        copy_with_libs "$b" "/usr/bin/$(basename "$b")"
    fi
done

for f in "${files[@]}"; do
    [[ $f == *:* ]] || die "--file wants SRC:DEST, got '$f'"
    src=${f%%:*}
    dest=${f#*:}
    [[ -e $src ]] || die "file $src not found"
    [[ $dest == /* ]] || die "--file destination must be absolute, got '$dest'"
    if [[ $dest == */ ]]; then
        mkdir -p "$root$dest"
    else
        mkdir -p "$root$(dirname "$dest")"
    fi
    cp -rL "$src" "$root$dest"
done

if [[ -n $init_script ]]; then
    cp "$init_script" "$root/guest.sh"
    chmod 0755 "$root/guest.sh"
fi

cat >"$root/init" <<'EOF'
#!/bin/sh
# initramfs init: bring up the basics and virtio PCI, run /guest.sh, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname guest
ip link set lo up 2>/dev/null
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci; do
    modprobe "$m" || echo "init: modprobe $m failed"
done
echo "GUEST-START"
if [ -f /guest.sh ]; then
    sh /guest.sh
    rc=$?
else
    setsid cttyhack sh
    rc=$?
fi
echo "GUEST-EXIT $rc"
sync
poweroff -f
EOF
chmod 0755 "$root/init"
# The kernel's built-in initramfs has /dev/console; add it as well where we can.
mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || true

mkdir -p "$(dirname "$out")"
tmp_out=$out.tmp.$$
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -6 >"$tmp_out" ||
    { rm -f "$tmp_out"; die "cannot write $out"; }
mv "$tmp_out" "$out"
