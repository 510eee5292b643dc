#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The worker guest of ci/e2e-remote-vm.sh: runs inside a TCG guest (busybox sh, from the
# initramfs's /init) playing the GPU worker VM of qemu-configs/xcp-ng.md whose mediator
# runs in Dom0 (here: the host). It brings up QEMU's user-mode network (10.0.2.15; the
# host forwards a port of its loopback to 7701 here), creates the dedicated user the
# executor processes switch to (as `useradd --system vgpu-worker` does on a real worker),
# and starts
#   vgpu-worker --executor cpu --listen 0.0.0.0:7701 --keys /etc/vgpu/worker.keys
# Then it prints WORKER-READY, copies vgpu-worker's log to the console ("WORKER| "
# lines), reports the user each executor process runs as, and waits until the host
# powers it off.
#
# One line per check: "CHECK <name> PASS|FAIL <detail>"; evidence starts with "INFO ".
# The kernel command line sets (as environment variables):
#   VGPU_BOOT     1 for the first boot, 2 after the host power-cycled the worker (check
#                 names then start with "reboot-")
#   VGPU_LISTEN   the port vgpu-worker listens on (default 7701)

boot=${VGPU_BOOT:-1}
listen=${VGPU_LISTEN:-7701}
keys=/etc/vgpu/worker.keys
prefix=
[ "$boot" = 1 ] || prefix=reboot-

check() { # NAME PASS|FAIL DETAIL...
    n=$1
    v=$2
    shift 2
    echo "CHECK $prefix$n $v $*"
}
flat() { tr '\n\t' '  ' <"$1" | sed 's/  */ /g; s/ *$//'; }
# Stops here: the host sees no WORKER-READY and reports what is missing.
give_up() {
    echo "WORKER-FAILED"
    exit 1
}

echo "INFO worker boot $boot, kernel $(uname -r)"
modprobe virtio_net 2>/tmp/modprobe.err || echo "INFO modprobe virtio_net failed: $(flat /tmp/modprobe.err)"
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

# The executor processes' user (uid 999), and root; glibc reads them from /etc/passwd.
printf 'root:x:0:0:root:/root:/bin/sh\nvgpu-worker:x:999:999:vGPU executor workers:/nonexistent:/bin/false\n' >/etc/passwd
printf 'root:x:0:\nvgpu-worker:x:999:\n' >/etc/group
# shellcheck disable=SC2012 # a listing for the log (mode, owner); busybox find has no -printf
echo "INFO $keys: $(ls -ln "$keys" 2>&1)"

RUST_LOG=${RUST_LOG:-info} vgpu-worker --executor cpu --listen "0.0.0.0:$listen" \
    --keys "$keys" >/tmp/worker.log 2>&1 &
worker=$!
# Listening: its log says so, and the kernel has the socket (0.0.0.0:PORT, state 0A).
hex=$(printf '%04X' "$listen")
listening() {
    grep -q ' serving ' /tmp/worker.log 2>/dev/null &&
        awk -v p="00000000:$hex" '$2 == p && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp
}
i=0
while ! listening && [ $i -lt 600 ]; do
    kill -0 $worker 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
done
if listening; then
    check listening PASS "vgpu-worker listening on 0.0.0.0:$listen (/proc/net/tcp): $(grep -m 1 ' serving ' /tmp/worker.log | sed 's/^\[[^]]*\] *//')"
else
    check listening FAIL "vgpu-worker is not listening on 0.0.0.0:$listen: $(tail -n 5 /tmp/worker.log | tr '\n' ' ')"
    give_up
fi

echo "WORKER-READY"
# vgpu-worker's log on the console (the host reads the mediator's sessions from it).
tail -n +1 -f /tmp/worker.log | while IFS= read -r line; do echo "WORKER| $line"; done &
# Each executor process (one per session) once its sandbox is in place (the seccomp
# filter goes on last, before the first request): its user and seccomp mode, from /proc.
# (comm holds the first 15 bytes of the name.)
seen=" "
while kill -0 $worker 2>/dev/null; do
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        case $seen in *" $pid "*) continue ;; esac
        [ "$(cat "$d/comm" 2>/dev/null)" = vgpu-executor-w ] || continue
        status=$(awk '/^(Uid|Gid|Seccomp):/ { printf "%s %s ", $1, $2 }' "$d/status" 2>/dev/null)
        case $status in *"Seccomp: 0 "* | "") continue ;; esac
        seen="$seen$pid "
        echo "EXECUTOR pid $pid $status"
    done
    sleep 0.5
done
check worker-alive FAIL "vgpu-worker exited: $(tail -n 5 /tmp/worker.log | tr '\n' ' ')"
sleep 2
