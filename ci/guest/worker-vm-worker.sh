#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The worker guest of ci/e2e-worker-vm.sh: runs inside a TCG guest (busybox sh, from the
# initramfs's /init) playing the GPU worker VM of qemu-configs/xcp-ng.md. It mounts its
# disk (ext4, label vgpu) at /var/vgpu nodev,nosuid,noexec, starts
# `vgpu-mediator --executor cpu serve --nfs-root /var/vgpu --vm vm1 --vm vm2`, then the
# Linux kernel NFS server (nfsd, NFSv4 only, no rpcbind) exporting vm1/ to the client
# guest and vm2/ to an address nobody has here, one /etc/exports line each, squashed as
# the runbook says, with nfsdcld tracking the clients on a second disk. Then it prints
# WORKER-READY, copies the mediator's log to the console ("MEDIATOR| " lines) and waits
# until the host powers it off.
#
# One line per check: "CHECK <name> PASS|FAIL <detail>"; evidence starts with "INFO ".
# The kernel command line sets (as environment variables):
#   VGPU_BOOT          1 for the first boot, 2 after the host power-cycled the worker
#                      (check names then start with "reboot-")
#   VGPU_WORKER_ADDR   the worker's address (default 10.0.3.1/24)
#   VGPU_CLIENT1       vm1's client address (default 10.0.3.2)
#   VGPU_CLIENT2       vm2's client address (default 10.0.3.3: no guest has it)
#   VGPU_LEASE         NFSv4 lease and grace time in seconds (default 10, nfsd's minimum)

boot=${VGPU_BOOT:-1}
addr=${VGPU_WORKER_ADDR:-10.0.3.1/24}
client1=${VGPU_CLIENT1:-10.0.3.2}
client2=${VGPU_CLIENT2:-10.0.3.3}
lease=${VGPU_LEASE:-10}
root=/var/vgpu
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
for m in virtio_net virtio_blk ext4 nfsd; do
    modprobe "$m" 2>/tmp/modprobe.err || echo "INFO modprobe $m failed: $(flat /tmp/modprobe.err)"
done

# The private network: a static address, no gateway.
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
ip addr add "$addr" dev eth0
printf '127.0.0.1 localhost\n%s worker\n%s vm1-client\n%s vm2-client\n' \
    "${addr%/*}" "$client1" "$client2" >/etc/hosts

# The export filesystem: a disk of its own (label vgpu), as the runbook's dedicated
# filesystem. The NFS server's state, which the root disk of a real worker keeps in
# /var/lib/nfs, is on a second disk (label nfs-state): nfsdcld's record of the clients
# must outlive the power cycle for them to reclaim their state after it. dirsync: nfsdcld's
# SQLite commits by deleting its journal, and ext4 makes a deletion durable only at its
# next commit (5 s): a power cut before that rolls the new client's record back.
disk_of() { # LABEL: waits for it
    j=0
    while ! findfs "LABEL=$1" 2>/dev/null && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
}
mkdir -p "$root" /var/lib/nfs
vgpu_dev=$(disk_of vgpu)
state_dev=$(disk_of nfs-state)
if [ -n "$vgpu_dev" ] && mount -t ext4 -o nodev,nosuid,noexec "$vgpu_dev" "$root" 2>/tmp/mount.err &&
    [ -n "$state_dev" ] && mount -t ext4 -o dirsync "$state_dev" /var/lib/nfs 2>>/tmp/mount.err; then
    check disk PASS "$(grep " $root " /proc/mounts | cut -d' ' -f1-4); $(grep " /var/lib/nfs " /proc/mounts | cut -d' ' -f1-4)"
else
    check disk FAIL "mount the disks labelled vgpu ('$vgpu_dev') at $root and nfs-state ('$state_dev') at /var/lib/nfs: $(flat /tmp/mount.err)"
    give_up
fi
# One directory per VM, owned by the uid its requests are squashed to, closed to others.
chmod 0755 "$root"
for n in 1 2; do
    mkdir -p "$root/vm$n"
    chown "6400$n:6400$n" "$root/vm$n"
    chmod 0770 "$root/vm$n"
done
# shellcheck disable=SC2012 # a listing for the log (modes, numeric owners); busybox find has no -printf
echo "INFO $root: $(ls -ln "$root" | tr '\n' ' ')"
if [ "$boot" != 1 ]; then
    # What the client's root wrote before the power cycle is still there, squashed.
    owner=$(stat -c %u "$root/vm1/command.txt" 2>/dev/null || echo none)
    if [ "$owner" = 64001 ]; then
        check disk-kept PASS "vm1/command.txt from before the power cycle is there, owned by uid 64001; response.txt read '$(cat "$root/vm1/response.txt" 2>/dev/null)'"
    else
        check disk-kept FAIL "vm1/command.txt after the power cycle: owner '$owner'"
    fi
fi

# The mediator first, so that no command can reach the directories before it serves them.
RUST_LOG=${RUST_LOG:-info} vgpu-mediator --executor cpu serve --nfs-root "$root" \
    --vm vm1 --vm vm2 --poll-ms 100 >/tmp/mediator.log 2>&1 &
mediator=$!
# Started, it has written a line in each response.txt: 0:Ready, or the answer to a
# command it found waiting (one written before a power cut whose answer was lost).
served() {
    grep -q '^[012]:' "$root/vm1/response.txt" 2>/dev/null &&
        grep -q '^[012]:' "$root/vm2/response.txt" 2>/dev/null &&
        grep -q 'NFS transport serving' /tmp/mediator.log
}
i=0
while ! served && [ $i -lt 300 ]; do
    kill -0 $mediator 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
done
if served; then
    check mediator PASS "vgpu-mediator --executor cpu serve --nfs-root $root --vm vm1 --vm vm2: vm1/response.txt '$(cat "$root/vm1/response.txt")', vm2/response.txt '$(cat "$root/vm2/response.txt")'"
else
    check mediator FAIL "vgpu-mediator serve did not start serving: $(tail -n 5 /tmp/mediator.log | tr '\n' ' ')"
    give_up
fi

# The kernel NFS server, NFSv4 only: no rpcbind, no statd, no lockd; rpc.mountd only
# answers the kernel's export cache (no MOUNT listener without v2/v3).
cat >/etc/exports <<EOF
$root/vm1 $client1(rw,sync,root_squash,all_squash,anonuid=64001,anongid=64001,subtree_check)
$root/vm2 $client2(rw,sync,root_squash,all_squash,anonuid=64002,anongid=64002,subtree_check)
EOF
mkdir -p /proc/fs/nfsd /var/lib/nfs/rpc_pipefs /var/lib/nfs/nfsdcld
: >/var/lib/nfs/etab
: >/var/lib/nfs/rmtab
nfs_fail() {
    check nfs-server FAIL "$1: $(flat "$2")"
    dmesg | grep -i -E 'nfsd|svc|rpc' | tail -n 10 | sed 's/^/INFO dmesg: /'
    give_up
}
mount -t nfsd nfsd /proc/fs/nfsd 2>/tmp/nfsd.err || nfs_fail "mount -t nfsd" /tmp/nfsd.err
mount -t rpc_pipefs rpc_pipefs /var/lib/nfs/rpc_pipefs 2>/tmp/pipefs.err ||
    nfs_fail "mount -t rpc_pipefs" /tmp/pipefs.err
# As Debian's nfs-server.service: nfsdcld (client tracking), exportfs, rpc.nfsd, rpc.mountd.
nfsdcld -F -d -p /var/lib/nfs/rpc_pipefs -s /var/lib/nfs/nfsdcld >/tmp/nfsdcld.log 2>&1 &
nfsdcld=$!
# The kernel waits only briefly for nfsdcld to open the pipe nfsd creates, then goes on
# without client tracking: start nfsd once nfsdcld is ready (slow on the first boot, when
# it creates its database).
i=0
while ! grep -q 'Starting event dispatch handler' /tmp/nfsdcld.log 2>/dev/null && [ $i -lt 100 ]; do
    kill -0 $nfsdcld 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
done
exportfs -ra 2>/tmp/exportfs.err || nfs_fail "exportfs -ra" /tmp/exportfs.err
rpc.nfsd -N 3 -V 4 -V 4.1 -V 4.2 -U -p 2049 -L "$lease" -G "$lease" 4 2>/tmp/rpc.nfsd.err ||
    nfs_fail "rpc.nfsd" /tmp/rpc.nfsd.err
rpc.mountd -F -N 2 -N 3 >/tmp/mountd.log 2>&1 &
mountd=$!
sleep 0.2
kill -0 $mountd 2>/dev/null || nfs_fail "rpc.mountd exited" /tmp/mountd.log
kill -0 $nfsdcld 2>/dev/null || nfs_fail "nfsdcld exited" /tmp/nfsdcld.log
[ -s /tmp/mountd.log ] && head -n 5 /tmp/mountd.log | sed 's/^/INFO rpc.mountd: /'
versions=$(cat /proc/fs/nfsd/versions)
threads=$(cat /proc/fs/nfsd/threads)
ports=$(sort -u /proc/fs/nfsd/portlist | tr '\n' ' ' | sed 's/ *$//')
# The kernel says which client tracking it uses and whether it starts a grace period.
nfsd_log() { dmesg | grep -E 'NFSD: ' | sed 's/^\[[^]]*\] *//'; }
tracking=$(nfsd_log | grep -i -E 'tracking|grace' | tr '\n' ';' | sed 's/;$//')
if [ "$threads" -gt 0 ] && grep -q "^tcp 2049" /proc/fs/nfsd/portlist; then
    check nfs-server PASS "nfsd $threads threads, versions '$versions', ports '$ports', lease ${lease} s; $tracking"
else
    check nfs-server FAIL "nfsd threads '$threads', ports '$ports'"
    give_up
fi
exportfs -v >/tmp/exportfs.out 2>&1
if grep -q "^$root/vm1" /tmp/exportfs.out && grep -q "^$root/vm2" /tmp/exportfs.out; then
    check exports PASS "$(flat /tmp/exportfs.out)"
else
    check exports FAIL "exportfs -v: $(flat /tmp/exportfs.out)"
fi

echo "WORKER-READY"
# The mediator's log on the console (the host reads what it received and sent), nfsdcld's
# (for the record) and the kernel NFS server's messages (the grace period ending), until
# the host powers the worker off.
tail -n +1 -f /tmp/mediator.log | while IFS= read -r line; do echo "MEDIATOR| $line"; done &
tail -n +1 -f /tmp/nfsdcld.log | while IFS= read -r line; do echo "NFSDCLD| $line"; done &
shown=$(nfsd_log | wc -l)
while kill -0 $mediator 2>/dev/null; do
    sleep 1
    n=$(nfsd_log | wc -l)
    if [ "$n" -gt "$shown" ]; then
        nfsd_log | tail -n $((n - shown)) | sed 's/^/INFO dmesg: /'
        shown=$n
    fi
done
check mediator-alive FAIL "vgpu-mediator exited: $(tail -n 5 /tmp/mediator.log | tr '\n' ' ')"
sleep 2
