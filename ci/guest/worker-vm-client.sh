#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The client guest of ci/e2e-worker-vm.sh: runs inside a TCG guest (busybox sh, from the
# initramfs's /init) playing vm1 of qemu-configs/xcp-ng.md. It mounts vm1's export of the
# worker guest with the runbook's options, runs vgpu-nfs-client commands 1 and 2, then
# asks the host to power-cycle the worker: once the worker stops answering ping it issues
# command 1 on its hard mount, tells the host (COMMAND-PENDING) to start the worker again,
# and the command must complete once the worker is back; then two more commands.
#
# One line per check: "CHECK <name> PASS|FAIL <detail>"; evidence starts with "INFO ".
# Lines for the host: REBOOT-WORKER (power the worker off now), COMMAND-PENDING (start
# it again). The kernel command line sets (as environment variables):
#   VGPU_CLIENT_ADDR   this guest's address (default 10.0.3.2/24)
#   VGPU_WORKER        the worker's address (default 10.0.3.1)
#   VGPU_MOUNT_OPTS    mount options (default vers=4.1,hard,_netdev,nofail)
#   VGPU_WAIT          longest wait for the worker, at boot and after the power cycle,
#                      seconds (default 240)

addr=${VGPU_CLIENT_ADDR:-10.0.3.2/24}
worker=${VGPU_WORKER:-10.0.3.1}
opts=${VGPU_MOUNT_OPTS:-vers=4.1,hard,_netdev,nofail}
wait_max=${VGPU_WAIT:-240}

check() { # NAME PASS|FAIL DETAIL...
    n=$1
    v=$2
    shift 2
    echo "CHECK $n $v $*"
}
flat() { tr '\n\t' '  ' <"$1" | sed 's/  */ /g; s/ *$//'; }
now() { cut -d' ' -f1 /proc/uptime; }
# Seconds since T (from now), one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for m in virtio_net nfsv4; do
    modprobe "$m" 2>/tmp/modprobe.err || echo "INFO modprobe $m failed: $(flat /tmp/modprobe.err)"
done
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
ip addr add "$addr" dev eth0

# The worker boots at the same time: wait for it to answer on the private network.
t0=$(now)
until ping -c 1 -W 1 "$worker" >/dev/null 2>&1; do
    if [ "$(since "$t0" | cut -d. -f1)" -ge "$wait_max" ]; then
        check network FAIL "$worker did not answer ping within $wait_max s"
        exit 1
    fi
    sleep 0.5
done
check network PASS "$worker answers ping from ${addr%/*} after $(since "$t0") s"

# The mount as the runbook writes it. busybox mount resolves the server and adds addr=
# and clientaddr= itself, and drops _netdev and nofail (the kernel refuses options it
# does not know); with nofail it exits 0 whether or not the mount worked, so
# /proc/mounts says. The server may still be starting: try until it answers.
dir=/mnt/vgpu/vm1
mkdir -p "$dir"
all=$opts
mounted() { grep " $1 nfs4 " /proc/mounts | cut -d' ' -f1-4; }
t0=$(now)
tries=0
while :; do
    tries=$((tries + 1))
    mount -t nfs4 -o "$all" "$worker:/var/vgpu/vm1" "$dir" 2>/tmp/mount.err
    [ -n "$(mounted "$dir")" ] && break
    if [ "$(since "$t0" | cut -d. -f1)" -ge "$wait_max" ]; then
        check mount FAIL "mount -t nfs4 -o $all $worker:/var/vgpu/vm1 $dir: not mounted after $tries tries: $(flat /tmp/mount.err)"
        dmesg | tail -n 10 | sed 's/^/INFO dmesg: /'
        exit 1
    fi
    sleep 1
done
check mount PASS "mount -t nfs4 -o $all (try $tries, after $(since "$t0") s): $(mounted "$dir")"
# shellcheck disable=SC2012 # a listing for the log (modes, numeric owners); busybox find has no -printf
echo "INFO $dir: $(ls -ln "$dir" | tr '\n' ' ')"

# vm2's directory is exported to another address only: this client cannot mount it.
# (Without nofail, so that mount says why.)
mkdir -p /mnt/vgpu/vm2
strict=$(echo "$all" | tr ',' '\n' | grep -v -x nofail | tr '\n' ',' | sed 's/,$//')
timeout 60 mount -t nfs4 -o "$strict" "$worker:/var/vgpu/vm2" /mnt/vgpu/vm2 2>/tmp/mount2.err
rc=$?
if [ -n "$(mounted /mnt/vgpu/vm2)" ]; then
    check vm2-export-refused FAIL "vm1's client mounted vm2's directory: $(mounted /mnt/vgpu/vm2)"
    umount /mnt/vgpu/vm2
else
    check vm2-export-refused PASS "mount -o $strict $worker:/var/vgpu/vm2 refused (exit $rc): $(flat /tmp/mount2.err)"
fi

# Root squashing: the guest's root may not create a device node in its directory.
if mknod "$dir/node" c 1 3 2>/tmp/mknod.err; then
    check mknod-refused FAIL "the guest's root created a device node in the export"
    rm -f "$dir/node"
else
    check mknod-refused PASS "mknod in the export refused: $(flat /tmp/mknod.err)"
fi

# run NAME COMMAND TIMEOUT: one vgpu-nfs-client run, expected to succeed.
vector='SUCCESS: Vector add PASSED: 1024 elements, 0 errors (*)'
device='SUCCESS: *, * MiB*, *compute capability*'
run() {
    name=$1 cmd=$2 secs=$3
    case $cmd in 1) glob=$vector ;; *) glob=$device ;; esac
    t0=$(now)
    vgpu-nfs-client --dir "$dir" --command "$cmd" --timeout "$secs" >/tmp/out 2>&1
    rc=$?
    out=$(flat /tmp/out)
    # shellcheck disable=SC2254 # the glob is the expected output
    case "$rc:$out" in
        "0:"$glob) check "$name" PASS "$out (in $(since "$t0") s)" ;;
        *) check "$name" FAIL "exit $rc after $(since "$t0") s (expected 0 and '$glob'): $out" ;;
    esac
}
run command-1 1 60
run command-2 2 60

# The worker's power cycle. Ask the host to power it off, wait until it no longer
# answers, then issue command 1: on the hard mount it waits for the server.
echo "REBOOT-WORKER"
t0=$(now)
while ping -c 1 -W 1 "$worker" >/dev/null 2>&1; do
    if [ "$(since "$t0" | cut -d. -f1)" -ge 60 ]; then
        check worker-down FAIL "$worker still answers ping 60 s after REBOOT-WORKER"
        exit 1
    fi
    sleep 0.5
done
check worker-down PASS "$worker stopped answering ping $(since "$t0") s after REBOOT-WORKER"
run reboot-command-1 1 "$wait_max" &
pending=$!
sleep 2
if kill -0 $pending 2>/dev/null; then
    # shellcheck disable=SC2009 # the guest's busybox has no pgrep applet
    echo "INFO command 1 is waiting for the worker: $(ps | grep '[v]gpu-nfs-client' | sed 's/  */ /g')"
else
    echo "INFO command 1 returned while the worker was down"
fi
echo "COMMAND-PENDING"
wait $pending
if [ -n "$(mounted "$dir")" ]; then
    check reboot-mount-kept PASS "the mount held through the worker's power cycle: $(mounted "$dir")"
else
    check reboot-mount-kept FAIL "$dir is no longer mounted"
fi
# The client's next commands after the worker is back.
run reboot-next-command-2 2 60
run reboot-next-command-1 1 60
umount "$dir" 2>/tmp/umount.err || echo "INFO umount $dir: $(flat /tmp/umount.err)"
