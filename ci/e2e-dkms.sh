#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check of the guest's Debian packages: builds vgpu-dkms, vgpu-guest and
# vgpu-cuda with ci/build-deb.sh, checks what they hold, then boots a Debian guest
# (systemd, udev, DKMS, the kernel's headers; a cached disk image) under TCG on a
# vhost-vgpu --executor cpu, where the packages are installed with apt-get and DKMS builds
# the driver. One "PASS dkms <check> <detail>" / "FAIL dkms <check> <detail>" line per
# check (ci/test.sh counts them), then a final line.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds what it needs (vhost-vgpu and the guest's binaries with cargo, the packages with
ci/build-deb.sh, Debian's current kernel (ci/guest-kernel.sh), a QEMU with the generic
vhost-user device) and checks:

  packages  dpkg-deb -I and -c of each: fields, dependencies, files, the maintainer
            scripts and triggers, the udev rule, dkms.conf, the pkg-config files
            (pkg-config against the unpacked tree), the libraries' sonames (readelf);
            lintian finds no error
  guest     a Debian guest (the host's release: minbase, systemd, udev, dkms, gcc, make,
            pkgconf, linux-image and linux-headers of that kernel), booted under TCG with
            the kernel and the guest's own initramfs, its disk a copy-on-write view of
            a cached image. In it ci/guest/dkms-guest.sh installs the three packages
            with apt-get (DKMS builds vgpu.ko in the guest), shows dkms status, and
            checks: the module for the running kernel with its alias, loaded by the
            package onto the device, /dev/vgpu0 root:vgpu 0660 (udev rule), loaded
            again by udev through its alias, vgpu-smi and vgpu-vector-add as a member
            of the group vgpu and refused to others, a C program built with
            pkg-config vgpu, a CUDA driver-API program built with pkg-config
            vgpu-cuda and loaded through /etc/ld.so.conf.d, the module rebuilt by
            DKMS's kernel hook (a kernel upgrade), apt-get remove

The image is made once with mmdebstrap and mke2fs -d (about 1 GiB, a minute or two
with a fast mirror) and kept in \${VGPU_CACHE:-\$HOME/.cache/vgpu}/debian-dkms-*;
a change of its recipe (packages, kernel, the unit that runs the check) makes a new one.

Options:
  --mem SIZE        the guest's RAM (default 1G)
  --timeout SECS    longest wait for the guest (default 900)
  --no-kernel-hook  skip the rebuild through DKMS's kernel hook (one DKMS build less)
  --rebuild-image   make the guest image again even if it is cached
  --keep            keep the work directory (logs, packages) and print its path
  -h, --help        show this help

Environment: VGPU_CACHE, CARGO_TARGET_DIR, VGPU_DEBIAN_MIRROR (the image's Debian
mirror, default mmdebstrap's: deb.debian.org with the release's updates and security).
EOF
}

die() { echo "e2e-dkms.sh: error: $*" >&2; exit 1; }

mem=1G
timeout=900
kernel_hook=1
rebuild_image=0
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --mem) need_arg "$1" $#; mem=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --no-kernel-hook) kernel_hook=0 ;;
        --rebuild-image) rebuild_image=1 ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-dkms dkms
e2e_workdir vgpu-dkms
# ci/e2e-build.sh's paragraphs for a person: not here.
say() { :; }

# ---- 1. build -----------------------------------------------------------------------
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"
e2e_build_setup
# What the checks of the packages run: pkg-config, readelf.
apt_install pkgconf binutils
e2e_build_cargo
e2e_build_kernel
e2e_build_qemu

step "packages: ci/build-deb.sh"
t0=$SECONDS
if bash ci/build-deb.sh --out "$work/debs" >"$work/debs.out" 2>"$work/build-deb.log"; then
    mapfile -t debs <"$work/debs.out"
    pass "deb-build ${debs[*]##*/} ($((SECONDS - t0)) s)"
    sed -n 's/^build-deb.sh: \(vgpu-.*\.deb: \)/    | \1/p' "$work/build-deb.log"
else
    abort deb-build "ci/build-deb.sh failed" "$work/build-deb.log"
fi
[[ ${#debs[@]} -eq 3 ]] || abort deb-build "ci/build-deb.sh wrote ${#debs[@]} packages, want 3"
version=$(dpkg-deb -f "${debs[0]}" Version)
upstream=${version%-*}
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
arch=$(dpkg --print-architecture)

# ---- 2. what the packages hold ------------------------------------------------------
step "packages: dpkg-deb -I and -c"
declare -A deb_of
for deb in "${debs[@]}"; do
    pkg=$(dpkg-deb -f "$deb" Package)
    deb_of[$pkg]=$deb
    mkdir -p "$work/x/$pkg" "$work/ctl/$pkg"
    dpkg-deb -x "$deb" "$work/x/$pkg"
    dpkg-deb -e "$deb" "$work/ctl/$pkg"
    # The files and links (directories left out), a link as "PATH -> TARGET".
    dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { p = $6; sub(/^\./, "", p); if ($7 == "->") p = p " -> " $8; print p }' \
        >"$work/$pkg.files"
done

# Fields: PACKAGE ARCH DEPENDS-REGEX
deb_info() {
    local pkg=$1 want_arch=$2 want_deps=$3 deb=${deb_of[$1]:-} a d m
    if [[ -z $deb ]]; then
        fail "deb-info $pkg: no such package built"
        return
    fi
    a=$(dpkg-deb -f "$deb" Architecture)
    d=$(dpkg-deb -f "$deb" Depends)
    m=$(dpkg-deb -f "$deb" Maintainer)
    if [[ $a == "$want_arch" && $d =~ $want_deps && -n $m && $(dpkg-deb -f "$deb" Version) == "$version" &&
        -n $(dpkg-deb -f "$deb" Description) ]]; then
        pass "deb-info $pkg $version $a, Depends: $d; Installed-Size $(dpkg-deb -f "$deb" Installed-Size) KiB"
    else
        fail "deb-info $pkg: Architecture '$a' (want $want_arch), Depends '$d' (want /$want_deps/), Maintainer '$m', Version $(dpkg-deb -f "$deb" Version)"
    fi
}
deb_info vgpu-dkms all '^dkms \(>= [0-9.]+\), passwd$'
deb_info vgpu-guest "$arch" '^libc6 \(>= 2\.[0-9]+\), libgcc-s1'
deb_info vgpu-cuda "$arch" '^libc6 \(>= 2\.[0-9]+\), libgcc-s1'

# Files: PACKAGE PATH... (a symbolic link as "PATH -> TARGET").
deb_files() {
    local pkg=$1 want missing=()
    shift
    for want in "$@"; do
        grep -qxF "$want" "$work/$pkg.files" || missing+=("$want")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        pass "deb-files $pkg: $(wc -l <"$work/$pkg.files") files and links, the $# expected ones among them"
        sed 's/^/    | /' "$work/$pkg.files"
    else
        fail "deb-files $pkg lacks ${missing[*]}"
    fi
}
src=/usr/src/vgpu-$upstream
deb_files vgpu-dkms "$src/dkms.conf" "$src/Makefile" "$src/vgpu.c" "$src/vgpu_ioctl.h" \
    /lib/udev/rules.d/60-vgpu.rules /usr/share/doc/vgpu-dkms/copyright
deb_files vgpu-guest /usr/bin/vgpu-smi /usr/bin/vgpu-vector-add /usr/bin/vgpu-nfs-client \
    "/usr/lib/$multiarch/libvgpu.so.1" "/usr/lib/$multiarch/libvgpu.so -> libvgpu.so.1" \
    "/usr/lib/$multiarch/pkgconfig/vgpu.pc" /usr/include/vgpu.h /usr/include/vgpu_ioctl.h \
    /usr/share/doc/vgpu-guest/copyright
deb_files vgpu-cuda /usr/lib/vgpu/libcuda.so.1 "/usr/lib/vgpu/libcuda.so -> libcuda.so.1" \
    /usr/lib/vgpu/libnvrtc.so.13 "/usr/lib/vgpu/libnvrtc.so -> libnvrtc.so.13" \
    /etc/ld.so.conf.d/vgpu-cuda.conf /usr/include/vgpu-cuda/cuda.h \
    "/usr/lib/$multiarch/pkgconfig/vgpu-cuda.pc" /usr/share/doc/vgpu-cuda/copyright

# Maintainer scripts and triggers.
ctl=$work/ctl
bad=()
for s in postinst prerm; do
    f=$ctl/vgpu-dkms/$s
    [[ -x $f ]] || { bad+=("no executable $s"); continue; }
    sh -n "$f" 2>/dev/null || bad+=("$s: sh -n fails")
    grep -q "^VERSION=$upstream\$" "$f" || bad+=("$s: VERSION is not $upstream")
done
# (The scripts' own words: single quotes keep their variables.)
# shellcheck disable=SC2016
grep -q 'groupadd --system vgpu' "$ctl/vgpu-dkms/postinst" 2>/dev/null || bad+=("postinst creates no group vgpu")
# shellcheck disable=SC2016
grep -q '/usr/lib/dkms/common.postinst "$NAME" "$VERSION"' "$ctl/vgpu-dkms/postinst" 2>/dev/null ||
    bad+=("postinst does not run DKMS's common.postinst")
# shellcheck disable=SC2016
grep -q 'modprobe "$NAME"' "$ctl/vgpu-dkms/postinst" 2>/dev/null || bad+=("postinst loads no module")
# shellcheck disable=SC2016
grep -q 'dkms remove -m "$NAME" -v "$VERSION" --all' "$ctl/vgpu-dkms/prerm" 2>/dev/null || bad+=("prerm does not dkms remove")
for pkg in vgpu-guest vgpu-cuda; do
    grep -qx 'activate-noawait ldconfig' "$ctl/$pkg/triggers" 2>/dev/null || bad+=("$pkg: no ldconfig trigger")
    [[ ! -e $ctl/$pkg/postinst && ! -e $ctl/$pkg/prerm ]] || bad+=("$pkg has maintainer scripts")
done
grep -qx /etc/ld.so.conf.d/vgpu-cuda.conf "$ctl/vgpu-cuda/conffiles" 2>/dev/null || bad+=("vgpu-cuda: ld.so.conf.d entry not a conffile")
grep -qx "libvgpu 1 vgpu-guest (>= $upstream)" "$ctl/vgpu-guest/shlibs" 2>/dev/null || bad+=("vgpu-guest: no shlibs line for libvgpu 1")
for pkg in vgpu-dkms vgpu-guest vgpu-cuda; do
    (cd "$work/x/$pkg" && md5sum --check --quiet "$ctl/$pkg/md5sums") >/dev/null 2>&1 || bad+=("$pkg: md5sums do not match")
done
if [[ ${#bad[@]} -eq 0 ]]; then
    pass "deb-scripts vgpu-dkms postinst (groupadd --system vgpu, DKMS's common.postinst $upstream, modprobe) and prerm (dkms remove --all); ldconfig triggers of vgpu-guest and vgpu-cuda; vgpu-cuda's conffile; vgpu-guest's shlibs; md5sums"
    sed -n '/^case/,$p' "$ctl/vgpu-dkms/postinst" | sed -n '1,12p' | sed 's/^/    | /'
else
    fail "deb-scripts ${bad[*]}"
fi

rule=$work/x/vgpu-dkms/lib/udev/rules.d/60-vgpu.rules
rule_line=$(grep -v '^#' "$rule" 2>/dev/null | grep . || true)
if [[ $rule_line == 'SUBSYSTEM=="vgpu", KERNEL=="vgpu[0-9]*", GROUP="vgpu", MODE="0660"' ]]; then
    pass "deb-udev-rule /lib/udev/rules.d/60-vgpu.rules: $rule_line"
else
    fail "deb-udev-rule /lib/udev/rules.d/60-vgpu.rules: '${rule_line:-missing}'"
fi

conf=$work/x/vgpu-dkms$src/dkms.conf
bad=()
for want in 'PACKAGE_NAME="vgpu"' "PACKAGE_VERSION=\"$upstream\"" 'BUILT_MODULE_NAME[0]="vgpu"' 'AUTOINSTALL="yes"'; do
    grep -qxF "$want" "$conf" 2>/dev/null || bad+=("$want")
done
# shellcheck disable=SC2016 # DKMS's variables
grep -q '^MAKE\[0\]="make -C ${kernel_source_dir} M=' "$conf" 2>/dev/null || bad+=("MAKE[0] (Kbuild's call)")
# The repository's copy too: the by-hand DKMS install uses it as it is.
grep -qxF "PACKAGE_VERSION=\"$upstream\"" guest-lib/driver/dkms.conf ||
    bad+=("guest-lib/driver/dkms.conf: PACKAGE_VERSION=\"$upstream\" (the workspace version)")
if [[ ${#bad[@]} -eq 0 ]]; then
    pass "deb-dkms-conf $src/dkms.conf: $(grep -E '^(PACKAGE_NAME|PACKAGE_VERSION|BUILT_MODULE_NAME|AUTOINSTALL)' "$conf" | paste -sd ' ')"
else
    fail "deb-dkms-conf $src/dkms.conf lacks ${bad[*]}"
fi

# pkg-config over the unpacked packages: versions, flags, and the files they name.
pc() { # ROOT PC-ARGS...
    local root=$1
    shift
    PKG_CONFIG_LIBDIR=$root/usr/lib/$multiarch/pkgconfig pkg-config "$@" 2>&1 | sed 's/ *$//'
}
g=$work/x/vgpu-guest
c=$work/x/vgpu-cuda
bad=()
pc "$g" --validate vgpu >/dev/null || bad+=("vgpu.pc: $(pc "$g" --validate vgpu)")
pc "$c" --validate vgpu-cuda >/dev/null || bad+=("vgpu-cuda.pc: $(pc "$c" --validate vgpu-cuda)")
[[ $(pc "$g" --modversion vgpu) == "$upstream" ]] || bad+=("vgpu.pc version $(pc "$g" --modversion vgpu)")
[[ $(pc "$c" --modversion vgpu-cuda) == "$upstream" ]] || bad+=("vgpu-cuda.pc version $(pc "$c" --modversion vgpu-cuda)")
[[ -f $g$(pc "$g" --variable=includedir vgpu)/vgpu.h ]] || bad+=("vgpu.pc includedir has no vgpu.h")
[[ -L $g$(pc "$g" --variable=libdir vgpu)/libvgpu.so ]] || bad+=("vgpu.pc libdir has no libvgpu.so")
[[ " $(pc "$g" --libs vgpu) " == *" -lvgpu "* ]] || bad+=("vgpu.pc libs: $(pc "$g" --libs vgpu)")
[[ -f $c$(pc "$c" --variable=includedir vgpu-cuda)/cuda.h ]] || bad+=("vgpu-cuda.pc includedir has no cuda.h")
[[ -L $c$(pc "$c" --variable=libdir vgpu-cuda)/libcuda.so ]] || bad+=("vgpu-cuda.pc libdir has no libcuda.so")
[[ $(pc "$c" --cflags --libs vgpu-cuda) == "-I/usr/include/vgpu-cuda -L/usr/lib/vgpu -lcuda" ]] ||
    bad+=("vgpu-cuda.pc flags: $(pc "$c" --cflags --libs vgpu-cuda)")
if [[ ${#bad[@]} -eq 0 ]]; then
    pass "deb-pkgconfig vgpu.pc $upstream: $(pc "$g" --cflags --libs vgpu) (libdir $(pc "$g" --variable=libdir vgpu)); vgpu-cuda.pc $upstream: $(pc "$c" --cflags --libs vgpu-cuda)"
    grep -v '^#' "$g/usr/lib/$multiarch/pkgconfig/vgpu.pc" | grep . | sed 's/^/    | /'
else
    fail "deb-pkgconfig ${bad[*]}"
fi

soname() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p'; }
s_vgpu=$(soname "$g/usr/lib/$multiarch/libvgpu.so.1")
s_cuda=$(soname "$c/usr/lib/vgpu/libcuda.so.1")
s_nvrtc=$(soname "$c/usr/lib/vgpu/libnvrtc.so.13")
if [[ $s_vgpu == libvgpu.so.1 && $s_cuda == libcuda.so.1 && $s_nvrtc == libnvrtc.so.13 &&
    $(readlink "$g/usr/lib/$multiarch/libvgpu.so") == libvgpu.so.1 ]]; then
    pass "deb-soname readelf -d: libvgpu.so.1 SONAME $s_vgpu (libvgpu.so -> libvgpu.so.1), libcuda.so.1 SONAME $s_cuda, libnvrtc.so.13 SONAME $s_nvrtc"
else
    fail "deb-soname libvgpu.so.1 '$s_vgpu', libcuda.so.1 '$s_cuda', libnvrtc.so.13 '$s_nvrtc', libvgpu.so -> '$(readlink "$g/usr/lib/$multiarch/libvgpu.so")'"
fi

# Debian's package checker: no errors (the overrides in packaging/deb/ say why), the
# warnings shown.
apt_install lintian
if lintian --fail-on error --tag-display-limit 0 "${debs[@]}" >"$work/lintian.log" 2>&1; then
    warnings=$(grep -c '^W: ' "$work/lintian.log" || true)
    pass "deb-lintian $(lintian --version): no errors, $warnings warnings ($(sed -n 's/^W: [^:]*: \([^ ]*\).*/\1/p' "$work/lintian.log" | sort -u | paste -sd ' ')), overrides: $(cat "$work"/x/*/usr/share/lintian/overrides/* 2>/dev/null | grep -c '^vgpu-')"
else
    fail "deb-lintian $(grep -c '^E: ' "$work/lintian.log" || true) errors: $(grep '^E: ' "$work/lintian.log" | head -n 5 | tr '\n' ';')"
    show "$work/lintian.log" 20
fi

# ---- 3. the guest image (cached) ----------------------------------------------------
# What the image holds and how it is made: its hash names the cache directory.
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $suite ]] || die "cannot tell this Debian's release (VERSION_CODENAME in /etc/os-release)"
image_packages=(systemd-sysv udev kmod dkms gcc make libc6-dev pkgconf pciutils initramfs-tools
    "linux-image-$kver" "linux-headers-$kver")
# Runs /run/vgpu-e2e/run.sh from the tar archive on the second disk with the console as
# its output, then powers the guest off. SIGPIPE as for any shell (DKMS writes into
# pipes nobody reads).
read -r -d '' image_unit <<'EOF' || true
[Unit]
Description=vGPU end-to-end check (the tar archive on /dev/vdb)
Requires=dev-vdb.device
After=dev-vdb.device systemd-udev-trigger.service local-fs.target
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
IgnoreSIGPIPE=no
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
ExecStart=/bin/sh -c 'rm -rf /run/vgpu-e2e && mkdir -m 0755 /run/vgpu-e2e && tar -xf /dev/vdb -C /run/vgpu-e2e && exec /bin/bash /run/vgpu-e2e/run.sh'

[Install]
WantedBy=multi-user.target
EOF
# The units a test guest does without (login prompts, timers).
image_masked=(serial-getty@ttyS0.service getty@tty1.service apt-daily.timer
    apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer)
image_recipe() {
    printf '%s\n' "suite $suite" "mirror ${VGPU_DEBIAN_MIRROR:-}" "packages ${image_packages[*]}" \
        "masked ${image_masked[*]}" "initramfs MODULES=list virtio_pci virtio_blk ext4" "format ext4 3G"
    echo "$image_unit"
}
image_dir=$CACHE_ROOT/debian-dkms-$suite-$kver-$(image_recipe | sha256sum | cut -c1-12)

make_image() {
    local root=$1/root mirror=()
    [[ -n ${VGPU_DEBIAN_MIRROR:-} ]] && mirror=("$VGPU_DEBIAN_MIRROR")
    apt_install mmdebstrap e2fsprogs
    # The initramfs needs only the root disk's drivers (MODULES=list): set before the
    # kernel's package makes it. ($1 is mmdebstrap's, the root directory.)
    # shellcheck disable=SC2016
    mmdebstrap --variant=minbase --mode=root --aptopt='APT::Install-Recommends "false"' \
        --include="$(IFS=,; echo "${image_packages[*]}")" \
        --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=list >"$1/etc/initramfs-tools/conf.d/vgpu-e2e" && printf "virtio_pci\nvirtio_blk\next4\n" >"$1/etc/initramfs-tools/modules"' \
        "$suite" "$root" "${mirror[@]}" || return 1
    [[ -f $root/boot/initrd.img-$kver ]] || { echo "no /boot/initrd.img-$kver in the image" >&2; return 1; }
    printf '%s\n' "$image_unit" >"$root/etc/systemd/system/vgpu-e2e.service"
    ln -sf /etc/systemd/system/vgpu-e2e.service "$root/etc/systemd/system/multi-user.target.wants/vgpu-e2e.service"
    for u in "${image_masked[@]}"; do ln -sf /dev/null "$root/etc/systemd/system/$u"; done
    echo '/dev/vda / ext4 rw,relatime 0 1' >"$root/etc/fstab"
    echo guest >"$root/etc/hostname"
    cp "$root/boot/initrd.img-$kver" "$1/initrd.img"
    mke2fs -q -F -t ext4 -L vgpu-root -d "$root" "$1/rootfs.img" 3G || return 1
    rm -rf "$root"
    image_recipe >"$1/RECIPE"
}

step "guest image: Debian $suite with DKMS and linux-headers-$kver"
mkdir -p "$CACHE_ROOT"
exec 8>"$image_dir.lock"
flock 8
[[ $rebuild_image -eq 1 ]] && rm -rf "$image_dir"
if [[ -f $image_dir/.complete ]]; then
    echo "   cached: $image_dir"
else
    rm -rf "$image_dir" "$image_dir.tmp"
    mkdir -p "$image_dir.tmp"
    t0=$SECONDS
    if ! make_image "$image_dir.tmp" >"$work/image.log" 2>&1; then
        rm -rf "$image_dir.tmp"
        abort guest-image "mmdebstrap or mke2fs failed" "$work/image.log"
    fi
    touch "$image_dir.tmp/.complete"
    mv "$image_dir.tmp" "$image_dir"
    echo "   made in $((SECONDS - t0)) s: $image_dir"
    # Images of older recipes for the same kernel are not used again.
    for old in "$CACHE_ROOT/debian-dkms-$suite-$kver"-*; do
        [[ -d $old && $old != "$image_dir" ]] || continue
        rm -rf "$old" "$old.lock"
    done
fi
exec 8>&-
echo "   $(du -h --apparent-size "$image_dir/rootfs.img" | cut -f1) rootfs.img ($(du -h "$image_dir/rootfs.img" | cut -f1) on disk), $(du -h "$image_dir/initrd.img" | cut -f1) initrd.img"

# ---- 4. the guest -------------------------------------------------------------------
step "host: vhost-vgpu --executor cpu"
mkdir -p "$work/sockets"
"$target/vhost-vgpu" --socket-path "$work/sockets/vm" --socket-count 1 --executor cpu \
    >"$work/vhost-vgpu.log" 2>&1 &
daemon=$!
pids+=("$daemon")
for ((i = 0; i < 100; i++)); do
    [[ -S $work/sockets/vm0 ]] && break
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
[[ -S $work/sockets/vm0 ]] || abort vhost-vgpu "vhost-vgpu did not listen on $work/sockets/vm0" "$work/vhost-vgpu.log"

# What the guest gets on its second disk: the packages, the check and its C sources.
mkdir -p "$work/payload"
cp "${debs[@]}" "$work/payload/"
install -m 0755 ci/guest/dkms-guest.sh "$work/payload/run.sh"
cp guest-lib/examples/c/vector_scale.c ci/guest/cuda-driver-check.c "$work/payload/"
tar -cf "$work/payload.tar" -C "$work/payload" .

step "boot the Debian guest (TCG): apt-get install of the packages, DKMS in the guest"
console=$work/guest.log
boot_start=$SECONDS
bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$image_dir/initrd.img" \
    --socket "$work/sockets/vm0" --mem "$mem" \
    --append "root=/dev/vda rw VGPU_KERNEL_HOOK=$kernel_hook" -- \
    -drive "file=$image_dir/rootfs.img,format=raw,if=virtio,snapshot=on" \
    -drive "file=$work/payload.tar,format=raw,if=virtio,readonly=on" \
    </dev/null >"$console" 2>&1 &
vm=$!
pids+=("$vm")
started=
while kill -0 "$vm" 2>/dev/null && ((SECONDS - boot_start < timeout)); do
    if [[ -z $started ]] && grep -q '^INFO kernel ' "$console"; then
        started=$((SECONDS - boot_start))
    fi
    sleep 1
done
if kill -0 "$vm" 2>/dev/null; then
    echo "   the guest did not power off within $timeout s: stopping its QEMU"
    kill "$vm" 2>/dev/null || true
fi
wait "$vm" 2>/dev/null || true
e2e_forget_pid "$vm"
guest_s=$((SECONDS - boot_start))
tr -d '\r' <"$console" >"$work/guest.txt"
echo "   the guest ran ${started:+its check ${started} s after QEMU started, }powered off after $guest_s s"
sed -n 's/^INFO /   guest: /p' "$work/guest.txt"

step "results from the guest"
# One PASS/FAIL line per check the guest should have reported.
guest_checks=(device apt-install dkms-status module-file loaded-by-postinst udev-autoload
    vgpu-smi vector-add group-only pkg-config-program cuda-driver-api)
[[ $kernel_hook -eq 1 ]] && guest_checks+=(kernel-hook)
guest_checks+=(apt-remove)
guest_bad=0
for c in "${guest_checks[@]}"; do
    line=$(sed -n "s/^CHECK $c \(PASS\|FAIL\) /\1 /p" "$work/guest.txt" | tail -n 1)
    case $line in
        PASS\ *) pass "$c ${line#PASS }" ;;
        FAIL\ *) fail "$c ${line#FAIL }"; guest_bad=1 ;;
        *) fail "$c no result from the guest"; guest_bad=1 ;;
    esac
    case $c in
        apt-install) sed -n 's/^APT| /    | /p' "$work/guest.txt" ;;
        dkms-status)
            echo "   dkms status in the guest:"
            sed -n 's/^DKMS| /    | /p' "$work/guest.txt"
            ;;
        vgpu-smi) sed -n 's/^SMI| /    | /p' "$work/guest.txt" ;;
        cuda-driver-api) sed -n 's/^CUDA| /    | /p' "$work/guest.txt" ;;
    esac
done
if [[ $guest_bad -eq 1 ]]; then
    sed -n 's/^BUILD| /    | /p' "$work/guest.txt"
    if ! grep -q '^GUEST-DONE' "$work/guest.txt"; then
        echo "   the end of the guest's console:"
        show "$work/guest.txt" 40
    fi
    echo "   the end of vhost-vgpu's log:"
    show "$work/vhost-vgpu.log" 10
fi

step "done: $passed passed, $failed failed"
verdict ""
