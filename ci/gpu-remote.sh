#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The GPU worker host on a GPU: `vgpu-worker --executor cuda` on 127.0.0.1 and mediators
# reaching it over loopback TCP: the sanity gate run on the worker, the NFS protocol
# through it (ci/gpu-nfs-check.sh), and vgpu-executor-bench on the local worker-process
# path beside the remote path (latency per request, bandwidth at 16 and 256 MiB, a
# checked vector add). Prints PASS/FAIL lines and, last, the table.
#
#   bash ci/gpu-remote.sh DIR   # DIR: vgpu-worker, vgpu-executor-worker, vgpu-mediator,
#                               # vgpu-nfs-client, vgpu-executor-bench
# EXECUTOR=cpu runs the same without a GPU (both paths on the CPU executor).
set -uo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '3,11p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 1 ]] && exit 0 || exit 2
fi
DIR=$(cd "$1" && pwd) || exit 2
HERE=$(cd "$(dirname "$0")" && pwd)
executor=${EXECUTOR:-cuda}
work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-remote-gpu.XXXXXX")
worker=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    [[ -n $worker ]] && kill "$worker" 2>/dev/null && wait "$worker" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
failed=0
pass() { echo "PASS remote-gpu $*"; }
fail() { echo "FAIL remote-gpu $*"; failed=1; }

port=$((17000 + RANDOM % 2000))
(umask 077 && "$DIR/vgpu-worker" keygen gpu-check >"$work/key")
cp "$work/key" "$work/worker.keys"
chmod 600 "$work/worker.keys"
VGPU_EXECUTOR_WORKER=$DIR/vgpu-executor-worker RUST_LOG=${RUST_LOG:-info} \
    "$DIR/vgpu-worker" --executor "$executor" --listen "127.0.0.1:$port" \
    --keys "$work/worker.keys" >"$work/worker.log" 2>&1 &
worker=$!
for _ in $(seq 600); do
    grep -q "serving " "$work/worker.log" && break
    kill -0 "$worker" 2>/dev/null || break
    sleep 0.2
done
if grep -q "serving " "$work/worker.log"; then
    pass "worker: $(grep -m1 -o 'serving .*' "$work/worker.log")"
else
    fail "worker did not start: $(tail -3 "$work/worker.log" | tr '\n' ' ')"
    exit 1
fi
remote=(--executor "remote:127.0.0.1:$port" --remote-key "$work/key")

# The Phase 1 gate, run on the worker from the mediator's side.
out=$("$DIR/vgpu-mediator" "${remote[@]}" sanity 2>&1)
rc=$?
if [[ $executor == cuda && $rc -eq 0 ]] && grep -q '^SANITY PASS' <<<"$out"; then
    pass "sanity: $(grep -m1 '^PASS' <<<"$out")"
elif [[ $executor != cuda && $rc -ne 0 ]] && grep -q 'CPU reference executor' <<<"$out"; then
    pass "sanity: refused on the CPU worker as expected: $(grep -m1 '^FAIL' <<<"$out")"
else
    fail "sanity (exit $rc): $out"
fi

# The NFS protocol through the worker.
if [[ $executor == cuda ]]; then expect=NVIDIA; else expect=CPU; fi
if EXECUTOR="remote:127.0.0.1:$port" REMOTE_KEY="$work/key" EXPECT_DEVICE=$expect \
    bash "$HERE/gpu-nfs-check.sh" "$DIR" | sed 's/^\(PASS\|FAIL\) nfs-gpu/\1 remote-gpu nfs/'; then
    :
else
    failed=1
fi

# The local worker-process path and the remote path, one after the other.
bench() { # LABEL EXECUTOR-ARGS...
    local label=$1
    shift
    if "$DIR/vgpu-executor-bench" --label "$label" "$@" >"$work/bench-$label.txt" 2>&1; then
        pass "bench $label: $(grep -m1 '^Vector add PASSED' "$work/bench-$label.txt")"
    else
        fail "bench $label: $(tail -3 "$work/bench-$label.txt" | tr '\n' ' ')"
    fi
}
bench local --executor "$executor"
bench remote "${remote[@]}"
sessions=$(grep -c "connected from" "$work/worker.log")
pass "worker log: $sessions connections served, $(grep -c 'closed by the mediator' "$work/worker.log") ended by their mediator"

echo
echo "## Remote worker over loopback TCP beside the local worker process ($executor)"
echo
awk '
    /^figure / { v[$2, $3] = $4; if (!seen[$3]++) order[n++] = $3 }
    END {
        print "| figure | local | remote | remote - local |"
        print "|---|---|---|---|"
        for (i = 0; i < n; i++) {
            f = order[i]; l = v["local", f]; r = v["remote", f]
            if (f ~ /gbps$/ && l > 0 && r > 0) {
                d = sprintf("%.2f ms per MiB (%.0f%% of local)", (1 / r - 1 / l) * 1048576 / 1e6, 100 * r / l)
            } else if (f ~ /_us$|_ms$/) {
                d = sprintf("%+.1f", r - l)
            } else if (l > 0) {
                d = sprintf("%.0f%% of local", 100 * r / l)
            }
            printf "| %s | %s | %s | %s |\n", f, l, r, d
        }
    }' "$work"/bench-local.txt "$work"/bench-remote.txt
exit "$failed"
