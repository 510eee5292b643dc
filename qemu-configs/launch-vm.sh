#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Launches one guest with the vGPU device: QEMU's generic vhost-user PCI device connected
# to a vhost-vgpu socket (or several devices, one per socket), guest RAM in a shared memfd
# so the backend can map it.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

usage() {
    cat <<EOF
Usage: $(basename "$0") --initrd FILE [--socket PATH... | --no-vgpu] [options] [-- QEMU-ARGS...]

Boots a guest kernel + initramfs under QEMU with the serial console on stdio.

  --qemu PATH          qemu-system-x86_64 (default: qemu-configs/build-qemu.sh --print-path)
  --kernel FILE        guest kernel (default: vmlinuz from ci/guest-kernel.sh)
  --initrd FILE        initramfs, e.g. from ci/mkinitramfs.sh (required)
  --socket PATH        vhost-user socket of the vhost-vgpu backend (required with the device);
                       repeat it for several devices, one per socket, in that order
                       (chardevs c0, c1, ...; the guest's /dev/vgpu0, /dev/vgpu1, ...)
  --socket-wait SECS   wait this long for each socket to appear (default: 10); if no
                       backend listens when it starts, QEMU fails at once (no reconnect)
                       or waits silently (reconnect)
  --reconnect-ms N     let QEMU reconnect to a backend that went away, trying every N ms
                       (chardev reconnect-ms; reconnect=<secs> before QEMU 9.2); 0 turns
                       it off. Default: 1000 if the QEMU build carries the reconnect fix
                       (a file reconnect-ok next to the binary, as build-qemu.sh writes),
                       else 0: a stock QEMU's generic vhost-user device does not wait for
                       a background connection and fails to start ("Failed to set msg fds")
  --mem SIZE           guest RAM, shared memfd (default: 512M)
  --smp N              virtual CPUs (default: 1)
  --virtio-id ID       virtio device ID the device presents (default: 22)
  --config-size N      config space bytes read from the backend (default: 128)
  --device-name NAME   QEMU device type (default: vhost-user-test-device-pci if the
                       QEMU has it, else vhost-user-device-pci)
  --net                add user-mode networking: -netdev user,id=n0 -device virtio-net-pci
                       (guest 10.0.2.15/24, host reachable as 10.0.2.2)
  --append EXTRA       extra kernel command line (after console=ttyS0 panic=-1 quiet, and
                       no_timer_check under TCG)
  --serial-log FILE    also write the serial console to FILE
  --accel ACCEL        QEMU accelerator (default: tcg)
  --no-vgpu            boot without the vGPU device
  --dry-run            print the QEMU command line instead of running it
  -h, --help           show this help

Arguments after -- go to QEMU unchanged. QEMU exits when the guest powers off,
reboots or panics (-no-reboot, panic=-1).
EOF
}

die() { echo "launch-vm.sh: error: $*" >&2; exit 1; }

qemu=
kernel=
initrd=
sockets=()
socket_wait=10
reconnect_ms=
mem=512M
smp=1
virtio_id=22
config_size=128
device_name=
net=0
append=
serial_log=
accel=tcg
vgpu=1
dry_run=0
extra=()
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --qemu) need_arg "$1" $#; qemu=$2; shift ;;
        --kernel) need_arg "$1" $#; kernel=$2; shift ;;
        --initrd) need_arg "$1" $#; initrd=$2; shift ;;
        --socket) need_arg "$1" $#; sockets+=("$2"); shift ;;
        --socket-wait) need_arg "$1" $#; socket_wait=$2; shift ;;
        --reconnect-ms) need_arg "$1" $#; reconnect_ms=$2; shift ;;
        --mem) need_arg "$1" $#; mem=$2; shift ;;
        --smp) need_arg "$1" $#; smp=$2; shift ;;
        --virtio-id) need_arg "$1" $#; virtio_id=$2; shift ;;
        --config-size) need_arg "$1" $#; config_size=$2; shift ;;
        --device-name) need_arg "$1" $#; device_name=$2; shift ;;
        --net) net=1 ;;
        --append) need_arg "$1" $#; append=$2; shift ;;
        --serial-log) need_arg "$1" $#; serial_log=$2; shift ;;
        --accel) need_arg "$1" $#; accel=$2; shift ;;
        --no-vgpu) vgpu=0 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

[[ -n $initrd ]] || die "--initrd is required (build one with ci/mkinitramfs.sh)"
[[ -f $initrd ]] || die "initramfs $initrd not found"
[[ $mem =~ ^[0-9]+[KMGT]?$ ]] || die "--mem wants a size such as 512M, got '$mem'"
[[ $virtio_id =~ ^[0-9]+$ ]] || die "--virtio-id wants a number, got '$virtio_id'"
if ! [[ $config_size =~ ^[0-9]+$ ]] || ((config_size > 256)); then
    die "--config-size wants a number up to 256, got '$config_size'"
fi
[[ $socket_wait =~ ^[0-9]+$ ]] || die "--socket-wait wants whole seconds, got '$socket_wait'"
[[ -z $reconnect_ms || $reconnect_ms =~ ^[0-9]+$ ]] ||
    die "--reconnect-ms wants milliseconds (0 = off), got '$reconnect_ms'"
[[ -z $reconnect_ms ]] || reconnect_ms=$((10#$reconnect_ms))
if [[ $vgpu -eq 1 ]]; then
    [[ ${#sockets[@]} -gt 0 ]] || die "--socket is required unless --no-vgpu is given"
fi

if [[ -z $qemu ]]; then
    qemu=$("$REPO_DIR/qemu-configs/build-qemu.sh" --print-path) || die "no QEMU: qemu-configs/build-qemu.sh failed"
fi
[[ -x $qemu ]] || die "QEMU binary $qemu not found or not executable"
if [[ -z $kernel ]]; then
    kenv=$("$REPO_DIR/ci/guest-kernel.sh" --no-headers) || die "no guest kernel: ci/guest-kernel.sh failed"
    kernel=$(sed -n 's/^KERNEL=//p' <<<"$kenv")
fi
[[ -f $kernel ]] || die "guest kernel $kernel not found"

# Chardev reconnect. With it the socket chardev connects in the background, and QEMU's
# generic vhost-user device (up to at least 10.2) sends its first message without waiting
# for that connection: QEMU stops at once with "Failed to set msg fds ... vhost_backend_init
# failed: Protocol error", and the device could not reattach after a backend restart
# anyway. qemu-configs/vhost-user-base-reconnect.patch fixes both; build-qemu.sh marks
# builds that carry it with reconnect-ok next to the binary. So: on by default only there.
reconnect_marker=$(dirname "$qemu")/reconnect-ok
if [[ -z $reconnect_ms ]]; then
    if [[ -f $reconnect_marker ]]; then reconnect_ms=1000; else reconnect_ms=0; fi
elif ((reconnect_ms > 0)) && [[ $vgpu -eq 1 && ! -f $reconnect_marker ]]; then
    echo "launch-vm.sh: warning: $qemu has no $(basename "$reconnect_marker") marker; if its" \
        "vhost-user device lacks the reconnect fix, QEMU fails with 'Failed to set msg fds'" >&2
fi
reconnect=
if ((reconnect_ms > 0)); then
    # QEMU 9.2 replaced the socket chardev's reconnect=<seconds> with reconnect-ms.
    qemu_version=$("$qemu" --version | sed -n 's/^QEMU emulator version \([0-9]*\.[0-9]*\).*/\1/p')
    [[ -n $qemu_version ]] || die "cannot tell the version of $qemu"
    IFS=. read -r qmajor qminor <<<"$qemu_version"
    if ((qmajor > 9 || (qmajor == 9 && qminor >= 2))); then
        reconnect=",reconnect-ms=$reconnect_ms"
    else
        reconnect=",reconnect=$(((reconnect_ms + 999) / 1000))"
    fi
fi

if [[ $vgpu -eq 1 && -z $device_name ]]; then
    devices=$("$qemu" -device help 2>/dev/null || true)
    if grep -qF '"vhost-user-test-device-pci"' <<<"$devices"; then
        device_name=vhost-user-test-device-pci
    elif grep -qF '"vhost-user-device-pci"' <<<"$devices"; then
        device_name=vhost-user-device-pci
    else
        die "$qemu has no generic vhost-user device (build one with qemu-configs/build-qemu.sh)"
    fi
fi

# Under TCG on a loaded host the kernel's check that the IO-APIC timer ticks can time
# out ("IO-APIC + timer doesn't work!", a panic at boot); the emulated timer is fine, so
# the check is skipped there.
cmdline="console=ttyS0 panic=-1 quiet"
[[ $accel == tcg ]] && cmdline+=" no_timer_check"
args=(-accel "$accel" -nographic -no-reboot -nodefaults
    -smp "$smp" -m "$mem"
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa "node,memdev=mem"
    -kernel "$kernel" -initrd "$initrd"
    -append "$cmdline${append:+ $append}")
# Firmware (SeaBIOS, linuxboot_dma, kvmvapic) from Debian's seabios and qemu-system-data.
for dir in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
    [[ -d $dir ]] && args+=(-L "$dir")
done
# Serial console and monitor multiplexed on stdio (Ctrl-A X quits), optionally logged.
console="stdio,id=con0,mux=on,signal=on${serial_log:+,logfile=${serial_log//,/,,}}"
args+=(-chardev "$console" -serial chardev:con0 -mon "chardev=con0,mode=readline")
if [[ $vgpu -eq 1 ]]; then
    # One device per socket; the guest's driver numbers them in PCI order, which is this.
    for i in "${!sockets[@]}"; do
        socket=${sockets[$i]}
        args+=(-chardev "socket,id=c$i,path=${socket//,/,,}$reconnect"
            -device "$device_name,chardev=c$i,virtio-id=$virtio_id,num_vqs=1,vq_size=1024,config_size=$config_size")
    done
fi
if [[ $net -eq 1 ]]; then
    # romfile= skips the iPXE option ROM: the kernel is loaded directly, never netbooted.
    args+=(-netdev "user,id=n0" -device "virtio-net-pci,netdev=n0,romfile=")
fi
args+=("${extra[@]}")

if [[ $vgpu -eq 1 && $dry_run -eq 0 ]]; then
    # Without reconnect QEMU fails at once when nobody listens; with it QEMU would wait
    # silently. Either way, wait here and say clearly what is missing.
    for socket in "${sockets[@]}"; do
        for ((i = 0; i < socket_wait * 10; i++)); do
            [[ -S $socket ]] && break
            sleep 0.1
        done
        [[ -S $socket ]] || die "no vhost-user socket at $socket (is vhost-vgpu running?)"
    done
fi

if [[ $dry_run -eq 1 ]]; then
    line=
    for a in "$qemu" "${args[@]}"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            line+=" $a"
        else
            line+=" $(printf '%q' "$a")"
        fi
    done
    echo "${line# }"
    exit 0
fi
exec "$qemu" "${args[@]}"
