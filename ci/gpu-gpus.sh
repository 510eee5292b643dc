#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Several GPUs on one host: discovery (`vgpu-mediator info`, --gpus, CUDA_VISIBLE_DEVICES),
# automatic placement of two VMs on two GPUs, and runs of vgpu-gpus-bench through a real
# `vhost-vgpu --executor cuda` with the test VMM as the VMs:
#   apart   two VMs placed on different GPUs: each keeps >= 0.95x of its saxpy rate alone
#   faults  a VM faulting without end on GPU 0: the VM on GPU 1 keeps >= 0.95x, all OK
#   same    two VMs forced onto one GPU (--gpu 0) with weights 100 and 300: device time 1:3
# and, with DIR/vgpu-worker, apart again with each GPU on its own vgpu-worker
# (CUDA_VISIBLE_DEVICES=N each, --executor remote:A+B).
# Prints PASS/FAIL lines and, last, the tables. Needs at least two GPUs (else one SKIP).
#
#   bash ci/gpu-gpus.sh DIR   # DIR: vhost-vgpu, vgpu-executor-worker, vgpu-mediator,
#                             # vgpu-gpus-bench (and vgpu-worker)
# SECONDS_PER_WINDOW (default 5) sets each measurement window, ELEMENTS (default 2^26)
# the floats of each saxpy. EXECUTOR=cpu:2 runs the same plumbing on simulated GPUs (the
# CUDA_VISIBLE_DEVICES, fault and weight goals need CUDA).
set -uo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '3,17p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 1 ]] && exit 0 || exit 2
fi
DIR=$(cd "$1" && pwd) || exit 2
window=${SECONDS_PER_WINDOW:-5}
work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-gpus.XXXXXX")
daemon=""
workers=()
# shellcheck disable=SC2317  # called by the EXIT trap and stop_daemon
stop_daemon() {
    if [[ -n $daemon ]]; then
        kill "$daemon" 2>/dev/null
        wait "$daemon" 2>/dev/null
        daemon=""
    fi
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    stop_daemon
    [[ ${#workers[@]} -gt 0 ]] && kill "${workers[@]}" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
failed=0
pass() { echo "PASS gpus $*"; }
fail() { echo "FAIL gpus $*"; failed=1; }
tables=()

export VGPU_EXECUTOR_WORKER=$DIR/vgpu-executor-worker
executor=${EXECUTOR:-cuda}
if [[ $executor == cuda ]]; then
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
else
    count=${executor#cpu:}
fi
if [[ ${count:-0} -lt 2 ]]; then
    echo "SKIP gpus: ${count:-0} GPU(s) here; the multi-GPU checks need two"
    exit 0
fi

# Discovery: every GPU, the ones --gpus names, the ones CUDA_VISIBLE_DEVICES leaves.
out=$("$DIR/vgpu-mediator" --executor "$executor" info 2>/dev/null)
if grep -q "^gpus: $count$" <<<"$out" && [[ $(grep -c '^gpu [0-9]*: ' <<<"$out") -eq $count ]]; then
    pass "info: $count GPUs: $(grep '^gpu ' <<<"$out" | tr '\n' ';')"
else
    fail "info does not list $count GPUs: $(tr '\n' ' ' <<<"$out")"
fi
out=$("$DIR/vgpu-mediator" --executor "$executor" --gpus 1 info 2>/dev/null)
if grep -q '^gpus: 1$' <<<"$out" && grep -q '^gpu 1: ' <<<"$out"; then
    pass "info --gpus 1: $(grep '^gpu ' <<<"$out")"
else
    fail "info --gpus 1: $(tr '\n' ' ' <<<"$out")"
fi
out=$(CUDA_VISIBLE_DEVICES=1 "$DIR/vgpu-mediator" --executor "$executor" info 2>/dev/null)
if grep -q '^gpus: 1$' <<<"$out"; then
    pass "CUDA_VISIBLE_DEVICES=1: one GPU: $(grep '^gpu ' <<<"$out")"
else
    fail "CUDA_VISIBLE_DEVICES=1: $(tr '\n' ' ' <<<"$out")"
fi
if out=$("$DIR/vgpu-mediator" --executor "$executor" --gpus "$count" info 2>&1); then
    fail "--gpus $count was not refused: $(tr '\n' ' ' <<<"$out")"
elif grep -q "no GPU $count" <<<"$out"; then
    pass "--gpus $count refused: $(tail -1 <<<"$out")"
else
    fail "--gpus $count was not refused: $(tr '\n' ' ' <<<"$out")"
fi

# start_daemon NAME ARGS...: vhost-vgpu on two sockets with the executor (the CUDA one,
# or $daemon_executor when set).
start_daemon() {
    local name=$1
    shift
    RUST_LOG=info "$DIR/vhost-vgpu" --executor "${daemon_executor:-$executor}" \
        --socket-path "$work/vm" --socket-count 2 \
        --control "$work/control" "$@" >"$work/$name.log" 2>&1 &
    daemon=$!
    for _ in $(seq 600); do
        [[ $(grep -c ': listening' "$work/$name.log") -ge 2 && -S $work/control ]] && return 0
        kill -0 "$daemon" 2>/dev/null || break
        sleep 0.2
    done
    fail "$name: the daemon did not start: $(tail -3 "$work/$name.log" | tr '\n' ' ')"
    daemon=""
    return 1
}

# bench SCENARIO: vgpu-gpus-bench on the running daemon; its lines, its table kept.
bench() {
    local out
    out=$(timeout 300 "$DIR/vgpu-gpus-bench" --socket-path "$work/vm" --control "$work/control" \
        --scenario "$1" --seconds "$window" --elements "${ELEMENTS:-67108864}" 2>&1)
    local rc=$?
    grep -E '^(PASS|FAIL)' <<<"$out" | sed 's/^\(PASS\|FAIL\) /\1 gpus /'
    grep -q '^FAIL' <<<"$out" && failed=1
    if [[ $rc -ne 0 ]] && ! grep -q '^FAIL' <<<"$out"; then
        fail "$1: vgpu-gpus-bench exit status $rc: $(tail -3 <<<"$out" | tr '\n' ' ')"
    fi
    tables+=("$(grep '^|' <<<"$out")")
}

# placed NAME WHAT GPU0 GPU1: the daemon's log (NAME.log) put vm0 on GPU0 and vm1 on GPU1.
placed() {
    local log=$work/$1.log got
    got=$(grep -o '(vm[01]) added on GPU [0-9]*' "$log" | paste -s -d ' ')
    if grep -q "(vm0) added on GPU $3" "$log" && grep -q "(vm1) added on GPU $4" "$log"; then
        pass "$2: $got"
    else
        fail "$2: $got"
    fi
}

# Automatic placement: two VMs, two GPUs, one each.
if start_daemon auto; then
    placed auto "auto placement" 0 1
    grep -o 'GPU [0-9]*: .*MiB)' "$work/auto.log" | sed 's/^/  /'
    bench apart
    bench faults
    stop_daemon
fi

# The two GPUs on two vgpu-worker processes (one per GPU, CUDA_VISIBLE_DEVICES), named
# remote:A+B: two VMs apart again, their executors on the workers.
if [[ -x $DIR/vgpu-worker ]]; then
    (umask 077 && "$DIR/vgpu-worker" keygen gpus-check >"$work/key")
    cp "$work/key" "$work/worker.keys"
    chmod 600 "$work/worker.keys"
    ports=()
    for g in 0 1; do
        port=$((18500 + RANDOM % 1000 + g))
        ports+=("$port")
        [[ $executor == cuda ]] && export CUDA_VISIBLE_DEVICES=$g
        RUST_LOG=info "$DIR/vgpu-worker" --executor "${executor%%:*}" \
            --listen "127.0.0.1:$port" --keys "$work/worker.keys" >"$work/worker$g.log" 2>&1 &
        workers+=($!)
        unset CUDA_VISIBLE_DEVICES
    done
    for g in 0 1; do
        for _ in $(seq 300); do
            grep -q "serving " "$work/worker$g.log" && break
            sleep 0.2
        done
    done
    daemon_executor="remote:127.0.0.1:${ports[0]}+127.0.0.1:${ports[1]}"
    if start_daemon remote --remote-key "$work/key"; then
        placed remote "remote placement ($daemon_executor)" 0 1
        bench apart
        stop_daemon
        for g in 0 1; do
            n=$(grep -c "mediator 'gpus-check' connected from" "$work/worker$g.log" || true)
            if [[ $n -ge 1 ]]; then
                pass "remote worker $g (CUDA_VISIBLE_DEVICES=$g): $n connection(s): $(grep -m1 -o 'serving .*' "$work/worker$g.log")"
            else
                fail "remote worker $g saw no connection"
            fi
        done
    fi
    unset daemon_executor
    kill "${workers[@]}" 2>/dev/null
    wait "${workers[@]}" 2>/dev/null
    workers=()
fi

# Forced onto one GPU, weights 100 and 300.
printf 'vm0 100\nvm1 300\n' >"$work/weights"
if start_daemon same --gpu 0 --weights "$work/weights"; then
    placed same "--gpu 0" 0 0
    bench same
    stop_daemon
fi

echo
for t in "${tables[@]}"; do
    echo "$t"
done
exit "$failed"
