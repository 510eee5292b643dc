#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check of the GPU worker-VM layout of qemu-configs/xcp-ng.md, with two TCG
# guests on a private network of their own (QEMU socket networking between the two QEMU
# processes over 127.0.0.1; the host has no address on it):
#
#   worker  10.0.3.1: its own ext4 disk at /var/vgpu (nodev,nosuid,noexec), the Linux
#           kernel NFS server (Debian's nfsd module; rpc.nfsd, rpc.mountd and exportfs
#           from Debian's nfs-kernel-server), NFSv4 only, one /etc/exports line per client
#           directory (root_squash, all_squash, anonuid), and
#           vgpu-mediator --executor cpu serve --nfs-root /var/vgpu --vm vm1 --vm vm2
#   client  10.0.3.2 (vm1): mount -t nfs4 -o vers=4.1,hard,_netdev,nofail of vm1's
#           export, vgpu-nfs-client commands 1 and 2; then the worker is powered off
#           (its QEMU quits) and started again on the same network port while the
#           client's command 1 waits on its hard mount; the command completes once the
#           worker is back, and the next commands pass.
#
# One "PASS worker-vm <check> <detail>" or "FAIL worker-vm <check> <detail>" line per
# check (ci/test.sh counts them), then a final "PASS e2e-worker-vm ..." or
# "FAIL e2e-worker-vm ..." line; exits non-zero on any failure.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${VGPU_CACHE:-$HOME/.cache/vgpu}

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds vgpu-mediator and vgpu-nfs-client (cargo build --release), unpacks Debian's
nfs-kernel-server package into the cache (never installed on this host: no NFS server,
rpcbind or service runs here), fetches the guest kernel (ci/guest-kernel.sh) and QEMU
(qemu-configs/build-qemu.sh), builds two initramfs images (ci/mkinitramfs.sh with
ci/guest/worker-vm-worker.sh and ci/guest/worker-vm-client.sh), then:

  client QEMU:  -netdev socket,listen=127.0.0.1:PORT (it starts first and accepts the
                worker's QEMU again after the worker's power cycle)
  worker QEMU:  -netdev socket,connect=127.0.0.1:PORT, two ext4 disk images (/var/vgpu,
                /var/lib/nfs)
  worker:       nfsd + vgpu-mediator serve (CPU executor), exports vm1/ to the client
  client:       mount, vgpu-nfs-client --command 1 and 2, REBOOT-WORKER
  host:         quits the worker's QEMU; once the client's command 1 is waiting on
                its hard mount (COMMAND-PENDING), starts the worker again (same disk,
                same port); the command completes, two more commands follow

Options:
  --port N          TCP port on 127.0.0.1 for the guests' network (default 12150;
                    the next free one if taken)
  --timeout SECS    longest wait for the whole guest phase (default 480)
  --keep            keep the work directory (logs, disk image, initramfs images) and
                    print its path
  -h, --help        show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (the worker's mediator, default info).
EOF
}

die() { echo "e2e-worker-vm.sh: error: $*" >&2; exit 1; }

port=12150
timeout=480
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) need_arg "$1" $#; port=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
if ! [[ $port =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
    die "--port wants a port number, got '$port'"
fi
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"
[[ $(id -u) -eq 0 ]] || die "run as root (it installs Debian packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian"

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-worker-vm worker-vm
e2e_workdir vgpu-e2e-worker-vm

# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"

# ---- 1. build and fetch ----------------------------------------------------------------
step "setup: host packages and the Rust toolchain"
quiet setup "$work/setup.log" bash ci/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# mkfs.ext4 and debugfs for the worker's disk image.
quiet setup "$work/apt.log" apt_install e2fsprogs

step "build: vgpu-mediator and vgpu-nfs-client (cargo build --release)"
quiet build "$work/cargo.log" cargo build --release --locked -p vgpu-nfs -p vgpu-guest \
    --bin vgpu-mediator --bin vgpu-nfs-client
target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
for f in vgpu-mediator vgpu-nfs-client; do
    [[ -x $target/$f ]] || abort build "cargo build did not produce $target/$f"
done

# Debian's nfs-kernel-server, unpacked (not installed: its scripts would start an NFS
# server and rpcbind on this host) into CACHE_ROOT/nfs-kernel-server-<version>/; the
# libraries its programs link are ordinary packages, installed here so that
# ci/mkinitramfs.sh finds them with ldd.
fetch_nfs_server() {
    local ver dir tmp deb
    candidate() { apt-cache policy nfs-kernel-server 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
    ver=$(candidate)
    if [[ -z $ver || $ver == "(none)" ]]; then
        apt_update_once
        ver=$(candidate)
    fi
    [[ -n $ver && $ver != "(none)" ]] || { echo "apt offers no nfs-kernel-server" >&2; return 1; }
    dir=$CACHE_ROOT/nfs-kernel-server-${ver//:/_}
    mkdir -p "$CACHE_ROOT"
    exec 8>"$CACHE_ROOT/.nfs-kernel-server.lock"
    flock 8
    if [[ ! -f $dir/.complete ]]; then
        tmp=$(mktemp -d "$CACHE_ROOT/.nfs-kernel-server.XXXXXX")
        # apt's download sandbox user must be able to write the target directory.
        chmod 0755 "$tmp"
        if ! (cd "$tmp" && apt-get download -q "nfs-kernel-server=$ver" >&2); then
            apt_update_once
            (cd "$tmp" && apt-get download -q "nfs-kernel-server=$ver" >&2) ||
                { rm -rf "$tmp"; echo "apt-get download nfs-kernel-server=$ver failed" >&2; return 1; }
        fi
        deb=$(find "$tmp" -maxdepth 1 -name 'nfs-kernel-server_*.deb' | head -n 1)
        mkdir -p "$tmp/out"
        if ! dpkg-deb -x "$deb" "$tmp/out" || ! dpkg-deb -f "$deb" Depends >"$tmp/out/DEPENDS"; then
            rm -rf "$tmp"
            echo "cannot unpack $deb" >&2
            return 1
        fi
        echo "$ver" >"$tmp/out/VERSION"
        touch "$tmp/out/.complete"
        rm -rf "$dir"
        mv "$tmp/out" "$dir"
        rm -rf "$tmp"
    fi
    exec 8>&-
    # The shared libraries among its dependencies (libtirpc3, libblkid1, libwrap0, ...).
    local -a libs
    mapfile -t libs < <(sed 's/[,|]/\n/g' "$dir/DEPENDS" | sed 's/(.*)//; s/[[:space:]]//g' |
        grep '^lib' | sort -u)
    [[ ${#libs[@]} -eq 0 ]] || apt_install "${libs[@]}"
    echo "$dir"
}
step "NFS server programs: Debian's nfs-kernel-server, unpacked into the cache"
(fetch_nfs_server) >"$work/nfs-server.out" 2>"$work/nfs-server.log" ||
    abort nfs-kernel-server "fetching nfs-kernel-server failed" "$work/nfs-server.log"
nfsdir=$(tail -n 1 "$work/nfs-server.out")
for f in usr/sbin/rpc.nfsd usr/sbin/rpc.mountd usr/sbin/exportfs usr/sbin/nfsdcld; do
    [[ -x $nfsdir/$f ]] || abort nfs-kernel-server "the unpacked package has no $f"
done
echo "   nfs-kernel-server $(cat "$nfsdir/VERSION"): rpc.nfsd, rpc.mountd, exportfs, nfsdcld"

step "guest kernel (ci/guest-kernel.sh) and QEMU (qemu-configs/build-qemu.sh)"
kenv=$(bash ci/guest-kernel.sh --no-headers 2>"$work/guest-kernel.log") ||
    abort guest-kernel "ci/guest-kernel.sh failed" "$work/guest-kernel.log"
kver=$(sed -n 's/^KVER=//p' <<<"$kenv")
kdir=$(sed -n 's/^KDIR=//p' <<<"$kenv")
kernel=$(sed -n 's/^KERNEL=//p' <<<"$kenv")
[[ -n $kver && -f $kernel ]] || abort guest-kernel "ci/guest-kernel.sh gave no usable kernel: $kenv"
qemu=$(bash qemu-configs/build-qemu.sh --print-path 2>"$work/build-qemu.log") ||
    abort qemu "qemu-configs/build-qemu.sh failed" "$work/build-qemu.log"
echo "   kernel $kver; $("$qemu" --version | sed -n 1p)"

step "initramfs: worker (nfsd, ext4, NFS server programs, vgpu-mediator) and client (nfsv4, vgpu-nfs-client)"
mkdir -p "$work/bin"
for f in vgpu-mediator vgpu-nfs-client; do
    cp "$target/$f" "$work/bin/$f"
    strip --strip-debug "$work/bin/$f"
done
worker_files=()
# libtirpc (rpc.mountd) reads its transports from /etc/netconfig.
[[ -f /etc/netconfig ]] && worker_files+=(--file /etc/netconfig:/etc/netconfig)
quiet initramfs "$work/mkinitramfs-worker.log" bash ci/mkinitramfs.sh "$work/worker.cpio.gz" \
    --kdir "$kdir" --kver "$kver" \
    --module virtio_net --module virtio_blk --module ext4 --module nfsd \
    --bin "$work/bin/vgpu-mediator:/usr/bin/vgpu-mediator" \
    --bin "$nfsdir/usr/sbin/rpc.nfsd:/usr/sbin/rpc.nfsd" \
    --bin "$nfsdir/usr/sbin/rpc.mountd:/usr/sbin/rpc.mountd" \
    --bin "$nfsdir/usr/sbin/exportfs:/usr/sbin/exportfs" \
    --bin "$nfsdir/usr/sbin/nfsdcld:/usr/sbin/nfsdcld" \
    "${worker_files[@]}" --init ci/guest/worker-vm-worker.sh
quiet initramfs "$work/mkinitramfs-client.log" bash ci/mkinitramfs.sh "$work/client.cpio.gz" \
    --kdir "$kdir" --kver "$kver" --module virtio_net --module nfsv4 \
    --bin "$work/bin/vgpu-nfs-client:/usr/bin/vgpu-nfs-client" \
    --init ci/guest/worker-vm-client.sh
echo "   $(du -h "$work/worker.cpio.gz" | cut -f1) worker.cpio.gz, $(du -h "$work/client.cpio.gz" | cut -f1) client.cpio.gz"

# The worker's disks, kept across its power cycle: its /var/vgpu, and the NFS server's
# state (/var/lib/nfs, on a real worker's root disk).
disk=$work/worker-vgpu.img
state=$work/worker-nfs-state.img
truncate -s 64M "$disk"
truncate -s 16M "$state"
quiet disk "$work/mkfs.log" mkfs.ext4 -q -F -L vgpu "$disk"
quiet disk "$work/mkfs.log" mkfs.ext4 -q -F -L nfs-state "$state"

# ---- 2. the two guests -------------------------------------------------------------------
# Whether something listens on 127.0.0.1:PORT (read from /proc: a probe connection would
# be taken by QEMU's socket network as its peer).
listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p="0100007F:$hex" '$2 == p && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp
}
port_free() { ! listening "$1" && ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for ((p = port; p < port + 20; p++)); do
    port_free "$p" && break
done
port_free "$p" || abort network "ports $port to $((port + 19)) on 127.0.0.1 are all taken"
port=$p

launch() { # LOG INITRD APPEND QEMU-ARGS...
    local log=$1 initrd=$2 append=$3
    shift 3
    bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" \
        --no-vgpu --mem 512M --append "$append" -- "$@" </dev/null >"$log" 2>&1 &
    launched=$!
    pids+=("$launched")
}
seen() { [[ -f $1 ]] && tr -d '\r' <"$1" | grep -q -E "$2"; } # LOG REGEX
# stop PID: pulls the plug of a QEMU (SIGTERM: it quits at once, as its `quit` does).
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

client_log=$work/client.log
worker1_log=$work/worker-1.log
worker2_log=$work/worker-2.log
: >"$client_log"
: >"$worker1_log"
: >"$worker2_log"
net_client=(-netdev "socket,id=n0,listen=127.0.0.1:$port"
    -device "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:03:02")
net_worker=(-netdev "socket,id=n0,connect=127.0.0.1:$port"
    -device "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:03:01"
    -drive "file=$disk,format=raw,if=virtio" -drive "file=$state,format=raw,if=virtio")

step "guests: client (listens on 127.0.0.1:$port) and worker (connects), both TCG"
guest_start=$SECONDS
launch "$client_log" "$work/client.cpio.gz" "VGPU_CLIENT_ADDR=10.0.3.2/24 VGPU_WORKER=10.0.3.1" \
    "${net_client[@]}"
client_pid=$launched
for ((i = 0; i < 100; i++)); do
    listening "$port" && break
    kill -0 "$client_pid" 2>/dev/null || break
    sleep 0.1
done
listening "$port" || abort network "the client's QEMU does not listen on 127.0.0.1:$port" "$client_log"
worker_append="VGPU_WORKER_ADDR=10.0.3.1/24 VGPU_CLIENT1=10.0.3.2 VGPU_CLIENT2=10.0.3.3"
launch "$worker1_log" "$work/worker.cpio.gz" "VGPU_BOOT=1 $worker_append" "${net_worker[@]}"
worker_pid=$launched

# The host's part, driven by the client's console: REBOOT-WORKER (quit the worker's
# QEMU), COMMAND-PENDING (start it again); done when the client powers off.
phase=boot
worker_ready=
rebooted_after=
while kill -0 "$client_pid" 2>/dev/null; do
    if ((SECONDS - guest_start >= timeout)); then
        echo "   the client did not power off within $timeout s: stopping both guests"
        break
    fi
    case $phase in
        boot)
            if [[ -z $worker_ready ]] && seen "$worker1_log" '^WORKER-READY'; then
                worker_ready=$((SECONDS - guest_start))
                echo "   worker ready after $worker_ready s"
            fi
            if seen "$worker1_log" '^WORKER-FAILED' || ! kill -0 "$worker_pid" 2>/dev/null; then
                echo "   the worker's first boot failed: stopping the client"
                break
            fi
            if seen "$client_log" '^REBOOT-WORKER'; then
                echo "   client: REBOOT-WORKER after $((SECONDS - guest_start)) s: quitting the worker's QEMU"
                sleep 1 # its console copies the mediator's log once a second
                stop "$worker_pid"
                phase=down
            fi
            ;;
        down)
            if seen "$client_log" '^COMMAND-PENDING'; then
                echo "   client: COMMAND-PENDING after $((SECONDS - guest_start)) s: starting the worker again (same disk, same port)"
                launch "$worker2_log" "$work/worker.cpio.gz" "VGPU_BOOT=2 $worker_append" "${net_worker[@]}"
                worker_pid=$launched
                rebooted_after=$((SECONDS - guest_start))
                phase=again
            fi
            ;;
        again)
            if seen "$worker2_log" '^WORKER-READY'; then
                echo "   worker ready again after $((SECONDS - guest_start)) s"
                phase=served
            elif seen "$worker2_log" '^WORKER-FAILED' || ! kill -0 "$worker_pid" 2>/dev/null; then
                echo "   the worker's second boot failed: stopping the client"
                break
            fi
            ;;
    esac
    sleep 0.5
done
guest_end=$SECONDS
stop "$client_pid"
stop "$worker_pid"
echo "   the guests ran for $((SECONDS - guest_start)) s"

# ---- 3. results ----------------------------------------------------------------------------
step "results"
bad=0
e2e_guest_checks "$worker1_log" worker disk mediator nfs-server exports
e2e_guest_checks "$client_log" client network mount vm2-export-refused mknod-refused command-1 command-2 \
    worker-down reboot-command-1 reboot-mount-kept reboot-next-command-2 reboot-next-command-1
e2e_guest_checks "$worker2_log" worker reboot-disk reboot-disk-kept reboot-mediator reboot-nfs-server \
    reboot-exports
for log in "$worker1_log" "$client_log" "$worker2_log"; do
    who=$(basename "$log" .log)
    tr -d '\r' <"$log" | grep '^INFO ' | sed "s/^/    | $who: /" || true
done

# What each boot of the worker served: its mediator's log, copied to its console.
boot=1
for log in "$worker1_log" "$worker2_log"; do
    received=$(tr -d '\r' <"$log" 2>/dev/null | grep -c '^MEDIATOR| .*nfs vm1: received command' || true)
    sent=$(tr -d '\r' <"$log" 2>/dev/null | grep -c '^MEDIATOR| .*nfs vm1: response sent: [12]:' || true)
    if [[ $received -gt 0 && $sent -gt 0 ]]; then
        pass "host-mediator-boot-$boot the worker's mediator logged $received commands received and $sent answers sent for vm1"
    else
        fail "host-mediator-boot-$boot the worker's mediator (boot $boot) logged no command for vm1"
        bad=1
    fi
    tr -d '\r' <"$log" 2>/dev/null | grep -m 6 -E '^MEDIATOR\| .*nfs vm1: (received command|response sent)' |
        sed 's/^MEDIATOR| \[[^]]*\] */    | /' || true
    boot=$((boot + 1))
done
# Root squashing reached the disk: what the client's root wrote belongs to vm1's anonuid.
owner=$(debugfs -R 'stat /vm1/command.txt' "$disk" 2>/dev/null | sed -n 's/.*User: *\([0-9]*\).*/\1/p' | head -n 1)
if [[ $owner == 64001 ]]; then
    pass "host-disk-squashed vm1/command.txt on the worker's disk image, written by the client's root, belongs to uid 64001 (debugfs)"
else
    fail "host-disk-squashed vm1/command.txt on the worker's disk image belongs to uid '${owner:-none}', not 64001"
fi
echo "   timeline: worker ready after ${worker_ready:-?} s; worker restarted after ${rebooted_after:-?} s (client's command pending); guests done after $((guest_end - guest_start)) s"
if [[ $bad -eq 1 ]]; then
    for log in "$client_log" "$worker1_log" "$worker2_log"; do
        [[ -f $log ]] || continue
        echo "   the end of $(basename "$log" .log)'s console:"
        tr -d '\r' <"$log" | grep -v -E '^(MEDIATOR|NFSDCLD)\| ' | tail -n 25 | sed 's/^/    | /'
    done
fi

verdict ""
