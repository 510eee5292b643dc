#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The client guest of ci/e2e-remote-vm.sh: runs inside a TCG guest (busybox sh, from the
# initramfs's /init) playing vm1 of qemu-configs/xcp-ng.md when the mediator and the NFS
# export run in Dom0 (here: the host, 10.0.2.2 on QEMU's user-mode network) and the
# executors on a worker VM. It mounts vm1's export, runs vgpu-nfs-client commands 1 and
# 2 (the answers come from the worker VM's CPU executor), then has the host power the
# worker off: the next commands must be answered with errors, not hang; once the host
# has started the worker again, command 1 must pass again (the mediator reconnects).
#
# One line per check: "CHECK <name> PASS|FAIL <detail>"; evidence starts with "INFO ".
# Lines for the host on the console: WAIT-SERVING (say when the mediator serves),
# KILL-WORKER (power the worker off), START-WORKER (start it again). The host answers the
# first two on the second serial port (/dev/ttyS1), one line each: SERVING (NOT-SERVING
# if the mediator does not start) and WORKER-DOWN (the worker's QEMU has quit).
# The kernel command line sets (as environment variables):
#   VGPU_NFS_PORT  the NFS server's port on the host (default 12049)
#   VGPU_REPEAT    commands 1 and 2 in a row after the first two (default 6)
#   VGPU_WAIT      longest wait for the export, the mediator and the host, seconds
#                  (default 180)

port=${VGPU_NFS_PORT:-12049}
repeat=${VGPU_REPEAT:-6}
wait_max=${VGPU_WAIT:-180}
dir=/mnt/vgpu/vm1
ctl=/dev/ttyS1

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
secs() { since "$1" | cut -d. -f1; }

for m in virtio_net nfsv4; do
    modprobe "$m" 2>/tmp/modprobe.err || echo "INFO modprobe $m failed: $(flat /tmp/modprobe.err)"
done
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

# The host's answers: opened once and held open (the serial driver empties the port's
# receive buffer when it is opened), raw, without echo. The host writes each answer only
# after the request for it appeared on the console, so none arrives before this.
if ! exec 3<>"$ctl" || ! stty raw -echo <&3 2>/tmp/stty.err; then
    check control FAIL "the host's serial line $ctl: $(flat /tmp/stty.err)"
    exit 1
fi
# wait_for WORD: the host's next line on the serial line must be WORD.
wait_for() {
    # shellcheck disable=SC3045 # busybox sh's read has -t
    if ! read -r -t "$wait_max" line <&3; then
        echo "INFO no line from the host within $wait_max s (waiting for $1)"
        return 1
    fi
    line=$(echo "$line" | tr -d '\r')
    [ "$line" = "$1" ] || { echo "INFO the host said '$line', not $1"; return 1; }
}

# The host starts its mediator once it has reached the worker, and says SERVING. Mounted
# earlier, the client would cache that response.txt is missing for up to a minute.
echo "WAIT-SERVING"
if ! wait_for SERVING; then
    check mount FAIL "the host did not report its mediator serving"
    exit 1
fi

# The host's NFS server: try until the export mounts.
mkdir -p "$dir"
opts="port=$port,vers=4.1,addr=10.0.2.2"
mounted() { grep " $dir nfs4 " /proc/mounts | cut -d' ' -f1-4; }
t0=$(now)
tries=0
while :; do
    tries=$((tries + 1))
    mount -t nfs4 -o "$opts" 10.0.2.2:/vgpu/vm1 "$dir" 2>/tmp/mount.err
    [ -n "$(mounted)" ] && break
    if [ "$(secs "$t0")" -ge "$wait_max" ]; then
        check mount FAIL "mount -t nfs4 -o $opts 10.0.2.2:/vgpu/vm1 $dir: not mounted after $tries tries: $(flat /tmp/mount.err)"
        dmesg | tail -n 10 | sed 's/^/INFO dmesg: /'
        exit 1
    fi
    sleep 1
done
check mount PASS "mount -t nfs4 -o $opts (try $tries, after $(since "$t0") s): $(mounted)"

# The mediator's first answer.
t0=$(now)
until [ "$(cat "$dir/response.txt" 2>/dev/null)" = 0:Ready ]; do
    if [ "$(secs "$t0")" -ge "$wait_max" ]; then
        check served FAIL "$dir/response.txt did not read 0:Ready within $wait_max s: '$(cat "$dir/response.txt" 2>&1)'"
        exit 1
    fi
    sleep 0.5
done
check served PASS "$dir/response.txt read 0:Ready after $(since "$t0") s"

# run COMMAND TIMEOUT: one vgpu-nfs-client run; sets $rc, $out and $took.
vector='SUCCESS: Vector add PASSED: 1024 elements, 0 errors (CPU reference executor)'
device='SUCCESS: *, * MiB*, *compute capability*'
run() {
    t1=$(now)
    vgpu-nfs-client --dir "$dir" --command "$1" --timeout "$2" >/tmp/out 2>&1
    rc=$?
    took=$(since "$t1")
    out=$(flat /tmp/out)
}
# expect NAME COMMAND: one run that must succeed with the command's answer.
expect() {
    case $2 in 1) glob=$vector ;; *) glob=$device ;; esac
    run "$2" 60
    # shellcheck disable=SC2254 # the glob is the expected output
    case "$rc:$out" in
        "0:"$glob) check "$1" PASS "$out (in $took s)"; return 0 ;;
        *) check "$1" FAIL "exit $rc after $took s (expected 0 and '$glob'): $out"; return 1 ;;
    esac
}
expect command-1 1
expect command-2 2

# The same again, alternating, several times in a row.
ok=0
k=0
t0=$(now)
while [ $k -lt "$repeat" ]; do
    c=$((k % 2 + 1))
    case $c in 1) glob=$vector ;; *) glob=$device ;; esac
    run "$c" 60
    # shellcheck disable=SC2254 # the glob is the expected output
    case "$rc:$out" in
        "0:"$glob) ok=$((ok + 1)) ;;
        *) echo "INFO command $c (run $((k + 1))): exit $rc: $out" ;;
    esac
    k=$((k + 1))
done
if [ $ok -eq "$repeat" ]; then
    check commands-repeated PASS "$repeat commands (1 and 2 alternating), every answer right, in $(since "$t0") s"
else
    check commands-repeated FAIL "$ok of $repeat commands answered right"
fi

# The worker goes away while the mediator serves: the next command is answered with an
# error (exit 1: the mediator wrote 2:<message>), not left waiting (exit 3).
echo "KILL-WORKER"
if ! wait_for WORKER-DOWN; then
    check worker-down-command-1 FAIL "the host did not report the worker down"
    exit 1
fi
run 1 60
case "$rc:$out" in
    "1:FAILED: "*) check worker-down-command-1 PASS "answered with an error in $took s: $out" ;;
    *) check worker-down-command-1 FAIL "exit $rc after $took s (expected 1, an error answer): $out" ;;
esac
# A few more while it is away, one a second: each is answered with an error at once,
# whether or not the mediator tries the worker again (its tries grow apart: backoff).
ok=0
slowest=0
k=0
while [ $k -lt 4 ]; do
    sleep 1
    run 1 60
    case "$rc:$out" in
        "1:FAILED: "*) ok=$((ok + 1)) ;;
        *) echo "INFO command 1 with the worker away (run $((k + 2))): exit $rc after $took s: $out" ;;
    esac
    slowest=$(awk -v a="$slowest" -v b="$took" 'BEGIN { print (b > a) ? b : a }')
    k=$((k + 1))
done
if [ $ok -eq 4 ]; then
    check worker-down-commands PASS "4 more commands 1 s apart, each answered with an error (the slowest in $slowest s); the last: $out"
else
    check worker-down-commands FAIL "$ok of 4 commands answered with an error"
fi
run 2 60
echo "INFO command 2 with the worker away: exit $rc in $took s: $out"

# The worker is started again on the same forwarded port. From then on command 1 once a
# second until it passes: while the worker boots (its QEMU already forwards the port)
# each is answered with an error, never left waiting; then the mediator reaches the
# worker again on its own.
echo "START-WORKER"
t0=$(now)
tries=0
errors=0
slowest=0
while :; do
    tries=$((tries + 1))
    run 1 60
    # shellcheck disable=SC2254 # the glob is the expected output
    case "$rc:$out" in
        "0:"$vector)
            check reconnect-command-1 PASS "$out (try $tries, $(since "$t0") s after the worker's QEMU started again; $errors error answers before it, the slowest in $slowest s)"
            break
            ;;
        "1:FAILED: "*)
            errors=$((errors + 1))
            slowest=$(awk -v a="$slowest" -v b="$took" 'BEGIN { print (b > a) ? b : a }')
            [ $errors -le 3 ] && echo "INFO while the worker starts again, try $tries: answered with an error in $took s: $out"
            ;;
        *)
            check reconnect-command-1 FAIL "try $tries: exit $rc after $took s (expected an answer): $out"
            break
            ;;
    esac
    if [ "$(secs "$t0")" -ge "$wait_max" ]; then
        check reconnect-command-1 FAIL "command 1 still failed $wait_max s after the worker's QEMU started again ($tries tries): $out"
        break
    fi
    sleep 1
done
expect reconnect-command-2 2
expect reconnect-next-command-1 1
umount "$dir" 2>/tmp/umount.err || echo "INFO umount $dir: $(flat /tmp/umount.err)"
