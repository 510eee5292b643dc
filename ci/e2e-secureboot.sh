#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Secure Boot end-to-end check: a TCG guest booted the way a Debian VM boots with UEFI
# Secure Boot (OVMF with Microsoft's keys, Debian's shim signed by Microsoft, Debian's GRUB
# and kernel), a module signing key generated for the run and enrolled as a Machine Owner
# Key (shim's MokList, as MokManager leaves it after `mokutil --import`), and the kernel's
# module.sig_enforce=1. In the guest: the unsigned vgpu.ko and one signed with a key that is
# not enrolled are refused and vgpu-smi says why; vgpu.ko signed with the enrolled key (by
# the kernel's scripts/sign-file, as DKMS signs) loads, /dev/vgpu0 appears, vgpu-smi and
# vgpu-vector-add work against vhost-vgpu.
# Prints one "PASS sb <check> <detail>" or "FAIL sb <check> <detail>" line per check and
# a final summary line; exits non-zero if any check failed.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}
# virt-firmware (PyPI) writes the MOK into a copy of OVMF's variable store.
VIRT_FIRMWARE_VERSION=26.10
# The GUID MokManager gives the keys it enrolls as their owner (shim's lock GUID).
SHIM_LOCK_GUID=605dab50-e046-4300-abb6-3dd810dd8b23

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds vhost-vgpu, the guest tools and vgpu.ko (as ci/e2e-qemu.sh does), makes two
module signing keys with openssl (one to enroll, one not), signs vgpu.ko with the kernel's
scripts/sign-file, and boots one TCG guest through UEFI Secure Boot: OVMF's Secure Boot
firmware and Microsoft-enrolled variable store (package ovmf), with the key added to
shim's MokList, a FAT ESP image (mtools) with Debian's signed shim and GRUB (packages
shim-signed and grub-efi-amd64-signed, unpacked into the cache, not installed) and
Debian's kernel with module.sig_enforce=1. The guest's checks are
ci/guest/secureboot-guest.sh's.

Options:
  --mem SIZE      RAM of the guest (default 512M)
  --timeout SECS  longest wait for the guest (default 240)
  --keep          keep the work directory (keys, images, logs) and print its path
  -h, --help      show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (vhost-vgpu's log level, default info).
EOF
}

die() { echo "e2e-secureboot.sh: error: $*" >&2; exit 1; }
say() { :; }

mem=512M
timeout=240
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --mem) need_arg "$1" $#; mem=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $mem =~ ^[0-9]+[KMGT]?$ ]] || die "--mem wants a size such as 512M, got '$mem'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-secureboot sb
e2e_workdir vgpu-secureboot
# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"

# ---- 1. build (ci/e2e-build.sh) ------------------------------------------------------
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
e2e_build_setup
e2e_build_cargo
e2e_build_kernel
e2e_build_driver
e2e_build_qemu

# ---- 2. firmware and boot loaders --------------------------------------------------------
step "firmware: OVMF (Secure Boot), Debian's signed shim and GRUB, virt-firmware"
apt_install ovmf mtools dosfstools openssl
# One script at a time fills the cache below.
mkdir -p "$CACHE_ROOT"
exec 8>"$CACHE_ROOT/.secureboot-firmware.lock"
flock 8
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd
ovmf_vars=/usr/share/OVMF/OVMF_VARS_4M.ms.fd
[[ -f $ovmf_code && -f $ovmf_vars ]] || die "package ovmf has no $ovmf_code or $ovmf_vars"

# A Debian package's files, unpacked once into the cache (its maintainer scripts would
# install a boot loader on this host: it is never installed). Prints the directory.
candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
unpacked() { # PACKAGE
    local pkg=$1 ver dir tmp deb
    ver=$(candidate "$pkg")
    if [[ -z $ver || $ver == '(none)' ]]; then
        apt_update_once
        ver=$(candidate "$pkg")
    fi
    [[ -n $ver && $ver != '(none)' ]] || die "apt knows no package $pkg"
    dir=$CACHE_ROOT/debian-efi/${pkg}_${ver//:/_}
    if [[ ! -f $dir/.complete ]]; then
        mkdir -p "$CACHE_ROOT/debian-efi"
        tmp=$(mktemp -d "$CACHE_ROOT/debian-efi/.$pkg.XXXXXX")
        # apt's download sandbox user must be able to write the target directory.
        chmod 0755 "$tmp"
        if ! (cd "$tmp" && apt-get download -qq "$pkg=$ver" >/dev/null 2>&1); then
            # Stale package lists name a version the mirror no longer has.
            apt_update_once
            ver=$(candidate "$pkg")
            dir=$CACHE_ROOT/debian-efi/${pkg}_${ver//:/_}
            (cd "$tmp" && apt-get download -qq "$pkg=$ver" >/dev/null 2>&1) ||
                { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
        fi
        deb=$(find "$tmp" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)
        if [[ -z $deb ]] || ! dpkg-deb -x "$deb" "$tmp/root"; then
            rm -rf "$tmp"
            die "cannot unpack $pkg=$ver"
        fi
        rm -rf "$dir"
        mv "$tmp/root" "$dir"
        rm -rf "$tmp"
        echo "$pkg $ver" >"$dir/.complete"
    fi
    echo "$dir"
}
shim_dir=$(unpacked shim-signed)
grub_dir=$(unpacked grub-efi-amd64-signed)
shim=$shim_dir/usr/lib/shim/shimx64.efi.signed
grub=$grub_dir/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
[[ -f $shim ]] || die "shim-signed has no ${shim#"$shim_dir"}"
[[ -f $grub ]] || die "grub-efi-amd64-signed has no ${grub#"$grub_dir"}"
echo "   $(cat "$shim_dir/.complete"), $(cat "$grub_dir/.complete"), $(dpkg-query -W -f '${Package} ${Version}' ovmf)"

fw_venv=$CACHE_ROOT/virt-firmware-$VIRT_FIRMWARE_VERSION
virt_fw_vars=$fw_venv/bin/virt-fw-vars
if ! "$virt_fw_vars" --help >/dev/null 2>&1; then
    rm -rf "$fw_venv"
    # Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
    python3 -m venv "$fw_venv" >/dev/null 2>&1 || { rm -rf "$fw_venv"; apt_install python3-venv; python3 -m venv "$fw_venv"; }
    "$fw_venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
        "virt-firmware==$VIRT_FIRMWARE_VERSION" >"$work/pip.log" 2>&1 ||
        { show "$work/pip.log" 20 >&2; rm -rf "$fw_venv"; die "pip install virt-firmware==$VIRT_FIRMWARE_VERSION failed"; }
fi
echo "   virt-firmware $VIRT_FIRMWARE_VERSION ($fw_venv)"
exec 8>&-

# ---- 3. keys and signatures ---------------------------------------------------------
step "keys: a Machine Owner Key and a key not enrolled (openssl); vgpu.ko signed with scripts/sign-file"
# The headers' scripts/ is linux-kbuild's: the sign-file DKMS uses on Debian.
sign_file=$(readlink -f "$kbuild/scripts/sign-file")
[[ -x $sign_file ]] || die "$kbuild/scripts/sign-file not found (linux-kbuild for $kver)"
hash=$(sed -n 's/^CONFIG_MODULE_SIG_HASH="\(.*\)"$/\1/p' "$kbuild/.config")
[[ -n $hash ]] || die "$kbuild/.config sets no CONFIG_MODULE_SIG_HASH"
mkdir -p "$work/keys" "$work/modules"
# As DKMS makes its /var/lib/dkms/mok.key and mok.pub: RSA 2048, self-signed, DER.
newkey() { # NAME CN
    openssl req -new -x509 -nodes -days 2 -subj "/CN=$2/" -newkey rsa:2048 \
        -keyout "$work/keys/$1.key" -outform DER -out "$work/keys/$1.der" >"$work/openssl.log" 2>&1 ||
        abort keys "openssl req failed" "$work/openssl.log"
}
mok_cn=vgpu-e2e-mok
stranger_cn=vgpu-e2e-not-enrolled
newkey mok "$mok_cn"
newkey stranger "$stranger_cn"
# The kernel names a key "CN: <subject key identifier>"; modinfo names the signer's serial.
mok_keyid=$(openssl x509 -inform DER -in "$work/keys/mok.der" -noout -ext subjectKeyIdentifier |
    sed -n 's/^ *\([0-9A-F:]*\)$/\1/p' | tr -d ':' | tr 'A-F' 'a-f')
mok_serial=$(openssl x509 -inform DER -in "$work/keys/mok.der" -noout -serial | sed 's/^serial=//')
[[ -n $mok_keyid && -n $mok_serial ]] || die "cannot read the key identifier and serial of $work/keys/mok.der"
# DKMS strips debug information, then signs.
strip --strip-debug -o "$work/modules/vgpu.ko" "$ko"
cp "$work/modules/vgpu.ko" "$work/modules/vgpu-signed.ko"
cp "$work/modules/vgpu.ko" "$work/modules/vgpu-not-enrolled.ko"
"$sign_file" "$hash" "$work/keys/mok.key" "$work/keys/mok.der" "$work/modules/vgpu-signed.ko" ||
    abort sign-file "$sign_file failed"
"$sign_file" "$hash" "$work/keys/stranger.key" "$work/keys/stranger.der" "$work/modules/vgpu-not-enrolled.ko" ||
    abort sign-file "$sign_file failed"
signer=$(modinfo -F signer "$work/modules/vgpu-signed.ko")
sig_key=$(modinfo -F sig_key "$work/modules/vgpu-signed.ko" | tr -d ':')
sig_hash=$(modinfo -F sig_hashalgo "$work/modules/vgpu-signed.ko")
stranger_signer=$(modinfo -F signer "$work/modules/vgpu-not-enrolled.ko")
unsigned_signer=$(modinfo -F signer "$work/modules/vgpu.ko")
detail="modinfo: signer '$signer', key serial $sig_key, $sig_hash (CONFIG_MODULE_SIG_HASH=$hash); the copy for the key not enrolled: signer '$stranger_signer'; the unsigned copy: signer '$unsigned_signer'"
if [[ $signer == "$mok_cn" && ${sig_key^^} == "${mok_serial^^}" && $sig_hash == "$hash" &&
      $stranger_signer == "$stranger_cn" && -z $unsigned_signer ]]; then
    pass "sign-file $sign_file signed vgpu.ko: $detail"
else
    fail "sign-file $detail; expected signer '$mok_cn', serial $mok_serial"
fi

# ---- 4. the enrolled key, the ESP, the initramfs --------------------------------------
step "enroll: the key into shim's MokList in a copy of $(basename "$ovmf_vars") (virt-fw-vars --add-mok)"
quiet enroll "$work/virt-fw-vars.log" "$virt_fw_vars" -i "$ovmf_vars" -o "$work/vars.fd" \
    --add-mok "$SHIM_LOCK_GUID" "$work/keys/mok.der"
"$virt_fw_vars" -i "$work/vars.fd" -p 2>/dev/null | grep -E '^(SecureBootEnable|MokList|PK|KEK|db) ' |
    sed 's/^/   /' || true

step "initramfs: busybox, the three vgpu.ko, vgpu-smi, vgpu-vector-add"
mkdir -p "$work/guest"
for f in vgpu-smi vgpu-vector-add; do
    strip --strip-debug -o "$work/guest/$f" "$target/$f"
done
initrd=$work/initramfs.cpio.gz
quiet initramfs "$work/mkinitramfs.log" bash ci/mkinitramfs.sh "$initrd" --kdir "$kdir" --kver "$kver" \
    --module efivarfs --ko "$work/modules/vgpu.ko" \
    --file "$work/modules/vgpu-signed.ko:/root/sb/vgpu-signed.ko" \
    --file "$work/modules/vgpu-not-enrolled.ko:/root/sb/vgpu-not-enrolled.ko" \
    --bin "$work/guest/vgpu-smi:/usr/bin/vgpu-smi" \
    --bin "$work/guest/vgpu-vector-add:/usr/bin/vgpu-vector-add" \
    --init ci/guest/secureboot-guest.sh

step "ESP: shim as the removable-media loader, GRUB beside it, the kernel and initramfs (mtools)"
# GRUB's built-in prefix is /EFI/debian; its grub.cfg boots the kernel with module.sig_enforce=1.
cmdline="console=ttyS0 panic=-1 quiet no_timer_check module.sig_enforce=1 VGPU_SB_CN=$mok_cn VGPU_SB_KEYID=$mok_keyid"
printf 'set timeout=0\nlinux /vmlinuz %s\ninitrd /initrd.gz\nboot\n' "$cmdline" >"$work/grub.cfg"
esp=$work/esp.img
size_kib=$(du -k -c "$shim" "$grub" "$kernel" "$initrd" | tail -n 1 | cut -f1)
make_esp() {
    mkfs.fat -C -n VGPU-ESP "$esp" $((size_kib + 4096)) &&
        mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian &&
        mcopy -i "$esp" "$shim" ::/EFI/BOOT/BOOTX64.EFI &&
        mcopy -i "$esp" "$grub" ::/EFI/BOOT/grubx64.efi &&
        mcopy -i "$esp" "$work/grub.cfg" ::/EFI/debian/grub.cfg &&
        mcopy -i "$esp" "$kernel" ::/vmlinuz &&
        mcopy -i "$esp" "$initrd" ::/initrd.gz
}
quiet esp "$work/esp.log" make_esp
echo "   $(du -h "$esp" | cut -f1) $(basename "$esp"); kernel command line: $cmdline"

# ---- 5. the backend and the guest ---------------------------------------------------
export RUST_LOG=${RUST_LOG:-info}
step "host: vhost-vgpu --socket-count 1"
mkdir -p "$work/sockets"
"$target/vhost-vgpu" --socket-path "$work/sockets/vm" --socket-count 1 --executor cpu \
    >"$work/vhost-vgpu.log" 2>&1 &
pids+=("$!")
sock=$work/sockets/vm0
for ((i = 0; i < 100; i++)); do
    [[ -S $sock ]] && break
    sleep 0.1
done
[[ -S $sock ]] || abort vhost-vgpu "vhost-vgpu did not listen on $sock" "$work/vhost-vgpu.log"

step "boot: OVMF (Secure Boot) -> shim -> GRUB -> Linux $kver (TCG)"
console=$work/console.log
args=(-machine "q35,smm=on" -accel tcg -display none -no-reboot -nodefaults -smp 1 -m "$mem"
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa "node,memdev=mem"
    -global "driver=cfi.pflash01,property=secure,value=on"
    -drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code"
    -drive "if=pflash,format=raw,unit=1,file=$work/vars.fd"
    -drive "if=virtio,format=raw,readonly=on,file=$esp"
    -chardev "file,id=con0,path=$console" -serial chardev:con0
    -chardev "socket,id=c0,path=$sock"
    -device "$qemu_device,chardev=c0,virtio-id=22,num_vqs=1,vq_size=1024,config_size=128")
for dir in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
    [[ -d $dir ]] && args+=(-L "$dir")
done
boot_start=$SECONDS
"$qemu" "${args[@]}" </dev/null >"$work/qemu.log" 2>&1 &
vm=$!
pids+=("$vm")
deadline=$((SECONDS + timeout))
while kill -0 "$vm" 2>/dev/null && ((SECONDS < deadline)); do
    grep -qs '^GUEST-EXIT' "$console" && break
    sleep 0.5
done
if kill -0 "$vm" 2>/dev/null && ! grep -qs '^GUEST-EXIT' "$console"; then
    echo "   the guest did not finish within $timeout s: stopping its QEMU"
fi
# It powers off by itself after GUEST-EXIT.
for ((i = 0; i < 40; i++)); do
    kill -0 "$vm" 2>/dev/null || break
    sleep 0.5
done
kill "$vm" 2>/dev/null || true
wait "$vm" 2>/dev/null || true
echo "   the guest ran $((SECONDS - boot_start)) s"

step "results"
checks=(secure-boot mok-trusted unsigned-refused unsigned-refused-vgpu-smi untrusted-key-refused
    untrusted-key-refused-vgpu-smi signed-loads vgpu-smi vector-add)
log=$(tr -d '\r' <"$console")
bad=0
for c in "${checks[@]}"; do
    line=$(sed -n "s/^CHECK $c \(PASS\|FAIL\) /\1 /p" <<<"$log" | tail -n 1)
    case $line in
        PASS\ *) pass "$c ${line#PASS }" ;;
        FAIL\ *) fail "$c ${line#FAIL }"; bad=1 ;;
        *) fail "$c no result from the guest"; bad=1 ;;
    esac
done
sed -n 's/^SMI| /    | /p' <<<"$log"
if [[ $bad -eq 1 ]]; then
    echo "   the end of the guest's console ($(basename "$console")):"
    show "$console" 30
    show "$work/qemu.log" 10
fi
verdict
