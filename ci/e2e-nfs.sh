#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check of the NFS file transport over a real NFS server: Debian's
# nfs-ganesha (VFS backend) exports vm1/ and vm2/ of a temporary root on the loopback
# address, one export per VM directory with root squashing (as qemu-configs/xcp-ng.md
# sets up), `vgpu-mediator serve --vm vm1 --vm vm2` serves them, and a TCG guest mounts
# both with its own kernel NFS client (through QEMU's user-mode network, 10.0.2.2 = the
# host's loopback) and runs vgpu-nfs-client against both directories. One "PASS nfs <check> <detail>" or
# "FAIL nfs <check> <detail>" line per check (ci/test.sh counts them), then a final
# "PASS e2e-nfs ..." or "FAIL e2e-nfs ..." line; exits non-zero on any failure.
# With --executor remote the mediator's executors run on a vgpu-worker started on
# 127.0.0.1 (vgpu-mediator --executor remote:127.0.0.1:PORT), the check lines read
# "PASS remote nfs ..." and the final line "PASS e2e-nfs-remote ...".
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds vgpu-mediator and vgpu-nfs-client (cargo build --release; with --executor remote
vgpu-worker and vgpu-executor-worker too), installs
nfs-ganesha and nfs-ganesha-vfs if missing, fetches the guest kernel
(ci/guest-kernel.sh) and QEMU (qemu-configs/build-qemu.sh), then:

  host:  ganesha.nfsd exports ROOT/vm1 and ROOT/vm2 of a temporary ROOT as /vgpu/vm1
         and /vgpu/vm2 on 127.0.0.1:PORT (NFSv4 only, Root_Squash to 65534);
         vgpu-mediator --executor cpu serve --nfs-root ROOT --vm vm1 --vm vm2
  guest: modprobe virtio_net nfsv4; mount -t nfs4 10.0.2.2:/vgpu/vmN /mnt/vgpu/vmN;
         mknod in the export (refused: root is squashed);
         vgpu-nfs-client --dir /mnt/vgpu/vm1 --command 1, vm2 --command 1, both
         --command 2, a garbage command (answered 2:...), the same command twice in a
         row, and both directories in parallel loops

With --executor remote the mediator's executors are on a vgpu-worker: the script makes a
key (vgpu-worker keygen), starts vgpu-worker --executor cpu on a free port of 127.0.0.1,
its log beside the mediator's, and runs vgpu-mediator --executor remote:127.0.0.1:PORT
--remote-key KEY serve. Every check above runs unchanged; the worker's side is checked
too: the mediator reached the worker, the VMs' commands ran there (one executor process
per VM, children of vgpu-worker), and the mediator's SIGTERM at the end ends them there.

Options:
  --executor KIND   the mediator's executor: cpu (default), or remote (on a
                    vgpu-worker --executor cpu this script starts on 127.0.0.1)
  --port N          NFS port on 127.0.0.1 (default 12049; the next free one if taken)
  --loops N         commands per directory in the parallel phase (default 100)
  --timeout SECS    longest wait for the guest (default 300)
  --keep            keep the work directory (logs, export, initramfs) and print its path
  -h, --help        show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (the mediator's and vgpu-worker's log level, default info).
EOF
}

die() { echo "e2e-nfs.sh: error: $*" >&2; exit 1; }

port=12049
executor=cpu
loops=100
timeout=300
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) need_arg "$1" $#; port=$2; shift ;;
        --executor) need_arg "$1" $#; executor=$2; shift ;;
        --loops) need_arg "$1" $#; loops=$2; shift ;;
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
case $executor in cpu | remote) ;; *) die "--executor wants cpu or remote, got '$executor'" ;; esac
[[ $loops =~ ^[1-9][0-9]*$ ]] || die "--loops wants a positive number, got '$loops'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
if [[ $executor == remote ]]; then
    e2e_begin e2e-nfs-remote "remote nfs"
else
    e2e_begin e2e-nfs nfs
fi
e2e_workdir vgpu-e2e-nfs

# ---- 1. build and fetch ----------------------------------------------------------------
step "setup: host packages and the Rust toolchain"
quiet setup "$work/setup.log" bash ci/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

host_bins=(vgpu-mediator vgpu-nfs-client)
packages=(-p vgpu-nfs -p vgpu-guest)
if [[ $executor == remote ]]; then
    host_bins+=(vgpu-worker vgpu-executor-worker)
    packages+=(-p vgpu-mediator)
fi
step "build: ${host_bins[*]} (cargo build --release)"
quiet build "$work/cargo.log" cargo build --release --locked "${packages[@]}" \
    "${host_bins[@]/#/--bin=}"
target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
for f in "${host_bins[@]}"; do
    [[ -x $target/$f ]] || abort build "cargo build did not produce $target/$f"
done

step "NFS server: nfs-ganesha with its VFS backend"
if ! command -v ganesha.nfsd >/dev/null || ! dpkg-query -W -f='${Status}' nfs-ganesha-vfs 2>/dev/null | grep -q 'ok installed'; then
    [[ $(id -u) -eq 0 ]] || abort ganesha "nfs-ganesha is not installed and this is not root"
    apt_ganesha() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
            --no-install-recommends nfs-ganesha nfs-ganesha-vfs
    }
    if ! apt_ganesha >"$work/apt.log" 2>&1; then
        apt-get update -qq -o DPkg::Lock::Timeout=600 >>"$work/apt.log" 2>&1 || true
        apt_ganesha >>"$work/apt.log" 2>&1 || abort ganesha "apt-get install nfs-ganesha nfs-ganesha-vfs failed" "$work/apt.log"
    fi
fi
ganesha=$(command -v ganesha.nfsd) || abort ganesha "ganesha.nfsd not found after installing nfs-ganesha"
echo "   $ganesha ($(dpkg-query -W -f='${Version}' nfs-ganesha))"

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

step "initramfs: busybox, virtio_net, nfsv4, vgpu-nfs-client"
mkdir -p "$work/bin"
cp "$target/vgpu-nfs-client" "$work/bin/vgpu-nfs-client"
strip --strip-debug "$work/bin/vgpu-nfs-client"
cat >"$work/guest.sh" <<'GUEST'
#!/bin/sh
# Runs in the guest: network, NFS mount, vgpu-nfs-client against vm1/ and vm2/.
# Prints "CHECK <name> PASS|FAIL <detail>" per check; the host turns them into lines.
port=${VGPU_NFS_PORT:-12049}
loops=${VGPU_NFS_LOOPS:-20}
check() { n=$1; v=$2; shift 2; echo "CHECK $n $v $*"; }
flat() { tr '\n' ' ' <"$1" | sed 's/ *$//'; }

for m in virtio_net nfsv4; do
    modprobe "$m" || echo "INFO modprobe $m failed"
done
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# One export per VM directory, as each VM of the runbook mounts its own.
opts="port=$port,vers=4.1,addr=10.0.2.2"
mounted=""
for vm in vm1 vm2; do
    mkdir -p "/mnt/vgpu/$vm"
    if mount -t nfs4 -o "$opts" "10.0.2.2:/vgpu/$vm" "/mnt/vgpu/$vm" 2>/tmp/mount.err; then
        mounted="$mounted $(grep " /mnt/vgpu/$vm " /proc/mounts | cut -d' ' -f1-4);"
    else
        check mount FAIL "mount -t nfs4 -o $opts 10.0.2.2:/vgpu/$vm /mnt/vgpu/$vm: $(flat /tmp/mount.err)"
        dmesg | tail -n 15 | sed 's/^/INFO dmesg: /'
        exit 1
    fi
done
check mount PASS "$mounted"
echo "INFO export vm1: $(ls -ln /mnt/vgpu/vm1 | tr '\n' ' ')"
# Root squashing: the guest's root may not create a device node in its directory.
if mknod /mnt/vgpu/vm1/node c 1 3 2>/tmp/mknod.err; then
    check vm1-mknod-refused FAIL "the guest's root created a device node in the export"
    rm -f /mnt/vgpu/vm1/node
elif grep -qiE 'not permitted|permission denied' /tmp/mknod.err; then
    check vm1-mknod-refused PASS "mknod in the export refused: $(flat /tmp/mknod.err)"
else
    check vm1-mknod-refused FAIL "mknod failed, but not for want of permission: $(flat /tmp/mknod.err)"
fi

# run NAME DIR COMMAND EXPECTED_RC EXPECTED_OUTPUT_GLOB: one vgpu-nfs-client run.
vector='SUCCESS: Vector add PASSED: 1024 elements, 0 errors (*)'
device='SUCCESS: *, * MiB*, *compute capability*'
run() {
    name=$1 dir=$2 cmd=$3 want=$4 glob=$5
    vgpu-nfs-client --dir "$dir" --command "$cmd" --timeout 60 >/tmp/out 2>&1
    rc=$?
    out=$(flat /tmp/out)
    # shellcheck disable=SC2254 # the glob is the expected output
    case "$rc:$out" in
        "$want:"$glob) check "$name" PASS "$out" ;;
        *) check "$name" FAIL "exit $rc (expected $want and '$glob'): $out" ;;
    esac
}
run vm1-command-1 /mnt/vgpu/vm1 1 0 "$vector"
run vm2-command-1 /mnt/vgpu/vm2 1 0 "$vector"
run vm1-command-2 /mnt/vgpu/vm1 2 0 "$device"
run vm2-command-2 /mnt/vgpu/vm2 2 0 "$device"
run vm1-garbage-command /mnt/vgpu/vm1 hello 1 "FAILED: unknown command: write 1 *"
run vm2-command-2-again /mnt/vgpu/vm2 2 0 "$device"
echo "INFO vm1/response.txt after the garbage command: $(cat /mnt/vgpu/vm1/response.txt)"

# Both directories at once, each alternating 1 and 2; every answer must match.
loop() { # DIR TAG
    ok=0 bad=0 k=0
    while [ $k -lt "$loops" ]; do
        c=$((k % 2 + 1))
        out=$(vgpu-nfs-client --dir "$1" --command "$c" --timeout 60 2>&1)
        case "$c:$out" in
            "1:SUCCESS: Vector add PASSED: 1024 elements, 0 errors ("*) ok=$((ok + 1)) ;;
            "2:SUCCESS: "*"compute capability"*) ok=$((ok + 1)) ;;
            *) bad=$((bad + 1)); echo "INFO $2 command $c got: $out" ;;
        esac
        k=$((k + 1))
    done
    echo "$ok $bad" >"/tmp/loop-$2"
}
start=$(date +%s)
loop /mnt/vgpu/vm1 vm1 &
p1=$!
loop /mnt/vgpu/vm2 vm2 &
p2=$!
wait $p1 $p2
secs=$(($(date +%s) - start))
read -r ok1 bad1 </tmp/loop-vm1
read -r ok2 bad2 </tmp/loop-vm2
if [ "$bad1" -eq 0 ] && [ "$bad2" -eq 0 ] && [ "$ok1" -eq "$loops" ] && [ "$ok2" -eq "$loops" ]; then
    check parallel-vm1-vm2 PASS "$ok1 + $ok2 commands, every answer matched its command, in ${secs} s"
else
    check parallel-vm1-vm2 FAIL "vm1: $ok1 right, $bad1 wrong; vm2: $ok2 right, $bad2 wrong"
fi
umount /mnt/vgpu/vm1 /mnt/vgpu/vm2
GUEST
initrd=$work/initramfs.cpio.gz
quiet initramfs "$work/mkinitramfs.log" bash ci/mkinitramfs.sh "$initrd" --kdir "$kdir" \
    --kver "$kver" --module virtio_net --module nfsv4 \
    --bin "$work/bin/vgpu-nfs-client:/usr/bin/vgpu-nfs-client" --init "$work/guest.sh"
echo "   $(du -h "$initrd" | cut -f1) $(basename "$initrd")"

# ---- 2. host: NFS server and mediator ---------------------------------------------------
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for ((p = port; p < port + 20; p++)); do
    port_free "$p" && break
done
port_free "$p" || abort ganesha "ports $port to $((port + 19)) on 127.0.0.1 are all taken"
port=$p

step "host: ganesha.nfsd exports ROOT/vm1 and ROOT/vm2 as /vgpu/vm1 and /vgpu/vm2 on 127.0.0.1:$port"
# As in qemu-configs/xcp-ng.md: one export per VM directory, each only to its VM, with
# root squashed to 65534, which owns its directory (the mediator, root here, needs no
# permission). Here the one guest plays both VMs, so both exports go to the address the
# guest's connections come from (QEMU's user-mode network: 127.0.0.1); the root itself,
# with the mediator's lock file, is not exported.
root=$work/export
e2e_ganesha_conf "$root" "$port" 1 2
"$ganesha" -F -f "$work/ganesha.conf" -L "$work/ganesha.log" -p "$work/ganesha.pid" \
    >"$work/ganesha.out" 2>&1 &
ganesha_pid=$!
pids+=("$ganesha_pid")
for ((i = 0; i < 100; i++)); do
    port_free "$port" || break
    kill -0 "$ganesha_pid" 2>/dev/null || break
    sleep 0.1
done
if port_free "$port"; then
    cat "$work/ganesha.out" >>"$work/ganesha.log" 2>/dev/null || true
    abort ganesha "ganesha.nfsd does not listen on 127.0.0.1:$port" "$work/ganesha.log"
fi
pass "ganesha listening on 127.0.0.1:$port, exporting $root/vm1 and $root/vm2 as /vgpu/vm1 and /vgpu/vm2 (FSAL VFS, NFSv4, Root_Squash)"

export RUST_LOG=${RUST_LOG:-info}
# The mediator's executor options; with --executor remote, those of the worker's.
mediator_executor=(--executor cpu)
if [[ $executor == remote ]]; then
    step "host: vgpu-worker --executor cpu --listen 127.0.0.1:PORT"
    e2e_worker_keys "$target/vgpu-worker" e2e-nfs || abort worker "vgpu-worker keygen e2e-nfs failed"
    e2e_worker_start "$target/vgpu-worker" cpu "$work/vgpu-worker.log" ||
        abort worker "$worker_error" "$work/vgpu-worker.log"
    worker=$worker_pid
    mediator_executor=(--executor "remote:127.0.0.1:$worker_port" --remote-key "$work/mediator.key")
    pass "worker vgpu-worker pid $worker: $(sed -n 's/^\[[^]]*\] *//; /serving /p' "$work/vgpu-worker.log" | tail -n 1)"
fi

step "host: vgpu-mediator ${mediator_executor[*]:0:2} serve --nfs-root ROOT --vm vm1 --vm vm2"
"$target/vgpu-mediator" "${mediator_executor[@]}" serve --nfs-root "$root" \
    --vm vm1 --vm vm2 --poll-ms 100 >"$work/mediator.log" 2>&1 &
mediator_pid=$!
pids+=("$mediator_pid")
for ((i = 0; i < 100; i++)); do
    [[ $(cat "$root/vm1/response.txt" 2>/dev/null) == 0:Ready &&
        $(cat "$root/vm2/response.txt" 2>/dev/null) == 0:Ready ]] && break
    kill -0 "$mediator_pid" 2>/dev/null || break
    sleep 0.1
done
[[ $(cat "$root/vm2/response.txt" 2>/dev/null) == 0:Ready ]] ||
    abort mediator "vgpu-mediator serve did not write 0:Ready in vm1/ and vm2/" "$work/mediator.log"
pass "mediator serving vm1/ and vm2/ (both read 0:Ready)"
if [[ $executor == remote ]]; then
    reached=$(grep -m 1 -o "worker 127\.0\.0\.1:$worker_port: .*" "$work/mediator.log" || true)
    # The worker's hello is encrypted under the handshake's keys: the mediator logging what
    # it says proves both sides authenticated.
    if [[ -n $reached ]]; then
        pass "worker-connected the mediator authenticated to the worker as 'e2e-nfs'; its log: $reached"
    else
        fail "worker-connected the mediator's log names no worker 127.0.0.1:$worker_port"
        show "$work/vgpu-worker.log" 10
    fi
fi

# ---- 3. the guest -------------------------------------------------------------------------
step "guest: boot (TCG, user-mode network), mount over NFS, run vgpu-nfs-client"
guest_log=$work/guest.log
guest_start=$SECONDS
bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" \
    --no-vgpu --net --mem 512M \
    --append "VGPU_NFS_PORT=$port VGPU_NFS_LOOPS=$loops" </dev/null >"$guest_log" 2>&1 &
guest_pid=$!
pids+=("$guest_pid")
while kill -0 "$guest_pid" 2>/dev/null; do
    if ((SECONDS - guest_start >= timeout)); then
        echo "   the guest did not power off within $timeout s: stopping its QEMU"
        kill "$guest_pid" 2>/dev/null || true
        break
    fi
    sleep 0.5
done
wait "$guest_pid" 2>/dev/null || true
echo "   the guest ran for $((SECONDS - guest_start)) s"

step "results"
checks=(mount vm1-mknod-refused vm1-command-1 vm2-command-1 vm1-command-2 vm2-command-2
    vm1-garbage-command vm2-command-2-again parallel-vm1-vm2)
bad=0
for c in "${checks[@]}"; do
    line=$(tr -d '\r' <"$guest_log" | grep -E "^CHECK $c (PASS|FAIL) " | tail -n 1 || true)
    case $line in
        "CHECK $c PASS "*) pass "guest $c ${line#"CHECK $c PASS "}" ;;
        "CHECK $c FAIL "*) fail "guest $c ${line#"CHECK $c FAIL "}"; bad=1 ;;
        *) fail "guest $c no result from the guest"; bad=1 ;;
    esac
done
tr -d '\r' <"$guest_log" | grep '^INFO ' | sed 's/^/    | /' || true
if [[ $bad -eq 1 ]]; then
    echo "   the end of the guest's console:"
    show "$guest_log" 30
fi

# What the host saw: the mediator logged each command and answer for both directories,
# and the files on the host read what the guest read.
for vm in vm1 vm2; do
    received=$(grep -c "nfs $vm: received command" "$work/mediator.log" || true)
    sent=$(grep -c "nfs $vm: response sent: [12]:" "$work/mediator.log" || true)
    if [[ $received -gt 0 && $sent -gt 0 ]]; then
        pass "host-$vm mediator logged $received commands received and $sent answers sent; $vm/response.txt on the host: $(cat "$root/$vm/response.txt")"
    else
        fail "host-$vm the mediator logged no command for $vm"
    fi
done
# Root squashing reached the files: what the guest's root wrote belongs to 65534, and the
# mediator served it all the same.
for vm in vm1 vm2; do
    owner=$(stat -c %u "$root/$vm/command.txt" 2>/dev/null || echo none)
    if [[ $owner == 65534 ]]; then
        pass "host-$vm-squashed $vm/command.txt, written by the guest's root, belongs to uid 65534"
    else
        fail "host-$vm-squashed $vm/command.txt belongs to uid $owner, not 65534 (root squashing not in effect)"
    fi
done
# (grep -m rather than head: a reader that stops early would fail the pipeline.)
grep -m 8 -E "nfs vm[12]: (received command|response sent)" "$work/mediator.log" |
    sed 's/^\[[^]]*\] */    | /' || true
if ! kill -0 "$mediator_pid" 2>/dev/null; then
    fail "mediator vgpu-mediator serve exited during the run"
    show "$work/mediator.log" 20
elif [[ $executor == remote ]]; then
    # The VMs' commands ran on the worker: the mediator holds one executor per VM there
    # (one connection, one executor process each); its SIGTERM ends them there.
    opened_ended() {
        opened=$(grep -c "mediator 'e2e-nfs' connected from" "$work/vgpu-worker.log" || true)
        ended=$(grep -cE "mediator 'e2e-nfs' from [^ ]+: " "$work/vgpu-worker.log" || true)
    }
    # (What the worker logs may come a moment late: up to 5 s.)
    for ((i = 0; i < 50; i++)); do
        opened_ended
        mapfile -t children < <(e2e_children "$worker")
        [[ ${#children[@]} -eq 2 && $((opened - ended)) -eq 2 ]] && break
        sleep 0.1
    done
    if kill -0 "$worker" 2>/dev/null && [[ ${#children[@]} -eq 2 && $((opened - ended)) -eq 2 ]]; then
        pass "worker-sessions vm1's and vm2's executors run on the worker: 2 open connections from 'e2e-nfs' ($opened in all, $ended ended), executor processes ${children[*]}"
    else
        fail "worker-sessions expected 2 open connections and executor processes on the worker (vm1, vm2): $opened connections, $ended ended, executor processes: ${children[*]:-none}"
        show "$work/vgpu-worker.log" 10
    fi
    kill -TERM "$mediator_pid"
    mediator_rc=0
    wait "$mediator_pid" || mediator_rc=$?
    e2e_forget_pid "$mediator_pid"
    for ((i = 0; i < 100; i++)); do
        [[ -z $(e2e_children "$worker") ]] && break
        sleep 0.1
    done
    opened_ended
    mapfile -t children < <(e2e_children "$worker")
    if [[ $mediator_rc -eq 0 && ${#children[@]} -eq 0 && $opened -eq $ended ]]; then
        pass "worker-freed-on-mediator-stop vgpu-mediator exit 0 on SIGTERM; the worker ended all $opened connections (its log) and runs no executor process"
    else
        fail "worker-freed-on-mediator-stop mediator exit $mediator_rc; the worker: $opened connections, $ended ended, executor processes left: ${children[*]:-none}"
        show "$work/vgpu-worker.log" 10
    fi
fi
if [[ $failed -gt 0 ]]; then
    echo "   the end of the mediator's log:"
    show "$work/mediator.log" 15
    echo "   the end of ganesha's log:"
    show "$work/ganesha.log" 15
    if [[ $executor == remote ]]; then
        echo "   the end of vgpu-worker's log:"
        show "$work/vgpu-worker.log" 15
    fi
fi

verdict ""
