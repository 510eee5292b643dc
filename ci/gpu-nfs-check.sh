#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The NFS file protocol on a GPU: `vgpu-mediator serve --executor cuda` answers two VM
# directories at once. The GPU machine has no NFS server, so the directories are local;
# ci/e2e-nfs.sh covers the same protocol over real NFS.
#
#   bash ci/gpu-nfs-check.sh DIR     # DIR holds vgpu-mediator and vgpu-nfs-client
# EXECUTOR=cpu EXPECT_DEVICE=CPU runs the same checks without a GPU; EXECUTOR=remote:HOST:PORT
# with REMOTE_KEY=FILE through a worker host (ci/gpu-remote.sh).
set -uo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '3,9p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 1 ]] && exit 0 || exit 2
fi
DIR=$(cd "$1" && pwd) || exit 2
root=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-nfs-gpu.XXXXXX")
server=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$root"
}
trap cleanup EXIT

key=()
[[ -n ${REMOTE_KEY:-} ]] && key=(--remote-key "$REMOTE_KEY")
"$DIR/vgpu-mediator" --executor "${EXECUTOR:-cuda}" "${key[@]}" serve --nfs-root "$root" --vm vm1 --vm vm2 \
    >"$root/.server.log" 2>&1 &
server=$!
for _ in $(seq 100); do
    [[ -f $root/vm1/response.txt && -f $root/vm2/response.txt ]] && break
    sleep 0.1
done

failed=0
check() { # NAME EXPECTED-PREFIX OUTPUT-FILE
    if grep -q "^$2" "$3"; then
        echo "PASS nfs-gpu $1: $(cat "$3")"
    else
        echo "FAIL nfs-gpu $1: $(cat "$3")"
        failed=1
    fi
}

# Both VMs at once.
pids=()
for vm in vm1 vm2; do
    "$DIR/vgpu-nfs-client" --dir "$root/$vm" --command 1 --timeout 60 >"$root/$vm.out" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
for vm in vm1 vm2; do
    check "$vm-command-1" "SUCCESS: Vector add PASSED: 1024 elements, 0 errors (${EXPECT_DEVICE:-NVIDIA}" "$root/$vm.out"
    echo "    $vm/response.txt: $(cat "$root/$vm/response.txt")"
done
"$DIR/vgpu-nfs-client" --dir "$root/vm2" --command 2 --timeout 60 >"$root/info.out" 2>&1
check "vm2-command-2" "SUCCESS: ${EXPECT_DEVICE:-NVIDIA}" "$root/info.out"
echo "    vm2/response.txt: $(cat "$root/vm2/response.txt")"

# Repeated commands from both VMs in parallel.
for vm in vm1 vm2; do
    (for i in $(seq 25); do
        "$DIR/vgpu-nfs-client" --dir "$root/$vm" --command $((i % 2 + 1)) --timeout 60 || exit 1
    done) >"$root/$vm.loop" 2>&1 &
    pids+=($!)
done
if wait "${pids[2]}" && wait "${pids[3]}"; then
    echo "PASS nfs-gpu parallel: 25 + 25 commands from vm1 and vm2, all SUCCESS"
else
    echo "FAIL nfs-gpu parallel: $(grep -v '^SUCCESS' "$root"/vm*.loop | head -3)"
    failed=1
fi
kill "$server" && wait "$server"
rc=$?
server=""
if [[ $rc -eq 0 ]]; then
    echo "PASS nfs-gpu shutdown: mediator exited 0 on SIGTERM"
else
    echo "FAIL nfs-gpu shutdown: mediator exit status $rc"; tail -5 "$root/.server.log"; failed=1
fi
exit "$failed"
