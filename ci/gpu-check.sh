#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs the GPU checks on the GPU machine, from release binaries copied into DIR.
#
#   ci/gpu-check.sh DIR [vgpu-gpu-check options, e.g. --quick]
#
# DIR holds vgpu-mediator, vgpu-executor-worker and vgpu-gpu-check (and, when present,
# vgpu-share-bench, vgpu-bench and vgpu-executor-tests, the executor crate's unit-test binary from
# `cargo test -p vgpu-executor --lib --no-run`, whose CUDA tests then run on the GPU). Every step runs each tenant's CUDA work in its own
# vgpu-executor-worker process, the one in DIR (VGPU_EXECUTOR_WORKER is set to it).
# With DIR/guests (a bundle from ci/gpu-bundle.sh) and DIR/vhost-vgpu, the step "guests"
# boots two QEMU guests (TCG) on one `vhost-vgpu --executor cuda` and runs their checks
# (`ci/e2e-qemu.sh --bundle DIR`), and with DIR/vgpu-worker the step "guests-remote" boots
# them again with their executors on a `vgpu-worker --executor cuda` over loopback TCP
# (`--executor remote --worker-executor cuda`); with DIR/guests/initramfs-gpus.cpio.gz and
# DIR/vgpu-admin, on a machine with two GPUs or more, the step "guests-gpus" boots one guest
# with two vGPU devices placed on GPUs 0 and 1 (`ci/e2e-gpus.sh --bundle DIR`, executor cuda);
# with DIR/vgpu-executor-bench too the step "remote" runs ci/gpu-remote.sh; with DIR/vgpu-gpus-bench the step "gpus" runs
# ci/gpu-gpus.sh (several GPUs); with DIR/cudarc-examples too, the step "programs" runs
# unmodified CUDA programs natively and in a guest (ci/gpu-programs.sh).
# Prints every step's PASS/FAIL lines, then the totals; exits 1 if anything failed.
# Only reads the GPU's state: it never changes clocks, persistence, compute mode or MIG,
# and never resets the card.
#
# Step time limits (seconds) can be overridden: SANITY_TIMEOUT, CHECK_TIMEOUT,
# BENCH_TIMEOUT, TESTS_TIMEOUT, SHARE_TIMEOUT, NFS_TIMEOUT, GUESTS_TIMEOUT, REMOTE_TIMEOUT,
# GPUS_TIMEOUT, PROGRAMS_TIMEOUT. SHARE_ARGS:
# extra arguments of vgpu-share-bench, separated by blanks (e.g. SHARE_ARGS="--quick").

set -u -o pipefail

if [[ $# -lt 1 || ! -d $1 ]]; then
    echo "usage: $0 DIR [vgpu-gpu-check options]" >&2
    exit 2
fi
DIR=$(cd "$1" && pwd)
shift
CHECK_ARGS=("$@")

# Check lines (PASS/FAIL/SKIP printed by the binaries) and steps (one per command).
PASS=0
FAIL=0
SKIP=0
STEP_FAIL=0
STEPS=()
OUTPUT=$(mktemp)
trap 'rm -f "$OUTPUT"' EXIT

note() { printf '\n=== %s ===\n' "$*"; }

# Counts the PASS/FAIL/SKIP lines a step printed.
count_lines() {
    local p f s
    p=$(grep -c '^PASS' "$OUTPUT" || true)
    f=$(grep -c '^FAIL' "$OUTPUT" || true)
    s=$(grep -c '^SKIP' "$OUTPUT" || true)
    PASS=$((PASS + p))
    FAIL=$((FAIL + f))
    SKIP=$((SKIP + s))
}

# run_step NAME TIMEOUT COMMAND...: runs the command, shows its output, records its exit
# status as a step result and counts the check lines it printed.
run_step() {
    local name=$1 limit=$2
    shift 2
    note "$name: $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTPUT"
    local rc=${PIPESTATUS[0]}
    count_lines
    if [[ $rc -eq 0 ]]; then
        STEPS+=("PASS step $name")
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        STEPS+=("FAIL step $name: timed out after ${limit}s")
        STEP_FAIL=$((STEP_FAIL + 1))
    else
        STEPS+=("FAIL step $name: exit status $rc")
        STEP_FAIL=$((STEP_FAIL + 1))
    fi
    return 0
}

skip_step() {
    STEPS+=("SKIP step $1: $2")
}

require() {
    if [[ ! -x $DIR/$1 ]]; then
        STEPS+=("FAIL step $1: $DIR/$1 missing or not executable")
        STEP_FAIL=$((STEP_FAIL + 1))
        return 1
    fi
}

# NVRTC ships with the toolkit, which is not always on the loader's path.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        if [[ -d $d ]]; then
            export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    done
fi

note "machine"
uname -srm
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    # Read-only queries: what the card is and what else is using it.
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu \
        --format=csv 2>/dev/null || true
else
    echo "nvidia-smi not found"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

# Tenants' executors run in worker processes: every step uses the worker from DIR.
export VGPU_EXECUTOR_WORKER=$DIR/vgpu-executor-worker
echo "VGPU_EXECUTOR_WORKER=$VGPU_EXECUTOR_WORKER"
# Without it the mediator runs every tenant's CUDA work in its own single process (not
# isolated from each other's faults); gpu-check's isolation-mode check then fails.
require vgpu-executor-worker || true

if require vgpu-mediator; then
    run_step sanity "${SANITY_TIMEOUT:-120}" "$DIR/vgpu-mediator" sanity
    # --executor cuda: `auto` would fall back to the CPU and hide a broken CUDA path.
    run_step info "${SANITY_TIMEOUT:-120}" "$DIR/vgpu-mediator" --executor cuda info
fi

if require vgpu-gpu-check; then
    run_step gpu-check "${CHECK_TIMEOUT:-420}" "$DIR/vgpu-gpu-check" "${CHECK_ARGS[@]}"
    GPU_CHECK_TABLE=$(sed -n '/^== timing/,$p' "$OUTPUT")
fi

# Fail closed: without a worker binary a CUDA mediator refuses to start; it never runs
# VMs' CUDA work in its own process.
fail_closed_check() {
    local out rc
    out=$(VGPU_EXECUTOR_WORKER=/nonexistent/vgpu-executor-worker \
        "$DIR/vgpu-mediator" --executor cuda info 2>&1)
    rc=$?
    if [[ $rc -ne 0 && $out == *"worker processes"* ]]; then
        echo "PASS fail-closed: no worker binary -> exit $rc: $(tail -n 1 <<<"$out")"
    else
        echo "FAIL fail-closed: exit $rc: $out"
        return 1
    fi
}
if [[ -x $DIR/vgpu-mediator ]]; then
    note "fail-closed"
    if fail_closed_check | tee "$OUTPUT"; then
        STEPS+=("PASS step fail-closed")
    else
        STEPS+=("FAIL step fail-closed")
        STEP_FAIL=$((STEP_FAIL + 1))
    fi
    count_lines
fi

# Guest kernels' parameters sized from their PTX alone, as on drivers before CUDA 12.4
# (no cuFuncGetParamInfo): every check again, quickly.
if [[ -x $DIR/vgpu-gpu-check ]]; then
    run_step ptx-signatures "${CHECK_TIMEOUT:-420}" \
        env VGPU_PTX_SIGNATURES_ONLY=1 "$DIR/vgpu-gpu-check" --quick
fi

if [[ -x $DIR/vgpu-executor-tests ]]; then
    # Unit tests, including the ones that skip themselves without a GPU.
    run_step unit-tests "${TESTS_TIMEOUT:-120}" "$DIR/vgpu-executor-tests" --test-threads=1
else
    skip_step unit-tests "no $DIR/vgpu-executor-tests"
fi

# ---- Further GPU checks --------------------------------------------
# Each one: `run_step NAME TIMEOUT COMMAND...` when its binary is present, otherwise
# `skip_step NAME WHY`. Lines starting with PASS/FAIL/SKIP are counted.
if [[ -x $DIR/vgpu-share-bench ]]; then
    # Sharing: weighted device time, the scheduler's cost, the watchdog.
    # SHARE_ARGS is a list separated by blanks: one word per argument, no globbing.
    read -r -a share_args <<<"${SHARE_ARGS:-}"
    run_step share "${SHARE_TIMEOUT:-300}" "$DIR/vgpu-share-bench" "${share_args[@]}"
else
    skip_step share "no $DIR/vgpu-share-bench"
fi
if [[ -x $DIR/vgpu-bench ]]; then
    run_step bench "${BENCH_TIMEOUT:-300}" "$DIR/vgpu-bench"
else
    skip_step bench "no $DIR/vgpu-bench"
fi
if [[ -x $DIR/vgpu-nfs-client ]]; then
    run_step nfs "${NFS_TIMEOUT:-180}" bash "$(dirname "$0")/gpu-nfs-check.sh" "$DIR"
else
    skip_step nfs "no $DIR/vgpu-nfs-client"
fi
# Real guests: two TCG VMs on one vhost-vgpu with the CUDA executor, from the bundle.
if [[ -d $DIR/guests ]]; then
    run_step guests "${GUESTS_TIMEOUT:-420}" \
        bash "$(dirname "$0")/e2e-qemu.sh" --bundle "$DIR" --executor cuda
else
    skip_step guests "no $DIR/guests bundle (ci/gpu-bundle.sh)"
fi
# The same guests, their executors on a CUDA vgpu-worker reached over loopback TCP.
if [[ -d $DIR/guests && -x $DIR/vgpu-worker ]]; then
    run_step guests-remote "${GUESTS_TIMEOUT:-420}" \
        bash "$(dirname "$0")/e2e-qemu.sh" --bundle "$DIR" --executor remote --worker-executor cuda
else
    skip_step guests-remote "no $DIR/guests bundle or no $DIR/vgpu-worker"
fi
# One guest with two vGPU devices on two sockets of one vhost-vgpu --executor cuda,
# placed on GPUs 0 and 1 (--gpu 0,1), from the bundle; one GPU cannot hold that placement.
gpu_count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [[ ! -f $DIR/guests/initramfs-gpus.cpio.gz || ! -x $DIR/vgpu-admin ]]; then
    skip_step guests-gpus "no $DIR/guests/initramfs-gpus.cpio.gz (ci/gpu-bundle.sh) or no $DIR/vgpu-admin"
elif [[ ${gpu_count:-0} -lt 2 ]]; then
    skip_step guests-gpus "${gpu_count:-0} GPU(s) here; --gpu 0,1 needs two"
else
    run_step guests-gpus "${GUESTS_TIMEOUT:-420}" \
        bash "$(dirname "$0")/e2e-gpus.sh" --bundle "$DIR" --executor cuda
fi
# The worker host on CUDA over loopback TCP: the sanity gate and the NFS protocol through
# it, and the executor bench beside the local worker-process path (ci/gpu-remote.sh).
if [[ -x $DIR/vgpu-worker && -x $DIR/vgpu-executor-bench ]]; then
    run_step remote "${REMOTE_TIMEOUT:-300}" bash "$(dirname "$0")/gpu-remote.sh" "$DIR"
else
    skip_step remote "no $DIR/vgpu-worker or $DIR/vgpu-executor-bench"
fi
# Several GPUs: discovery, placement, VMs apart at full speed, one GPU shared by weight,
# a fault storm on one GPU beside a VM on another (ci/gpu-gpus.sh; one SKIP with one GPU).
if [[ -x $DIR/vhost-vgpu && -x $DIR/vgpu-gpus-bench ]]; then
    run_step gpus "${GPUS_TIMEOUT:-300}" bash "$(dirname "$0")/gpu-gpus.sh" "$DIR"
else
    skip_step gpus "no $DIR/vhost-vgpu or $DIR/vgpu-gpus-bench"
fi
# Unmodified CUDA programs natively and in a guest: cudarc's examples, the driver-API C
# program, cudarc's CudaContext API and nvcc-built runtime programs (ci/gpu-programs.sh).
if [[ -d $DIR/guests && -d $DIR/cudarc-examples ]]; then
    run_step programs "${PROGRAMS_TIMEOUT:-600}" bash "$(dirname "$0")/gpu-programs.sh" "$DIR"
else
    skip_step programs "no $DIR/guests or $DIR/cudarc-examples"
fi
# -------------------------------------------------------------------------------------

note "summary"
printf '%s\n' "${STEPS[@]}"
if [[ -n ${GPU_CHECK_TABLE:-} ]]; then
    echo
    echo "$GPU_CHECK_TABLE"
fi
echo
echo "GPU-CHECK TOTALS: checks $PASS passed, $FAIL failed, $SKIP skipped; $STEP_FAIL of ${#STEPS[@]} steps failed"
if [[ $FAIL -gt 0 || $STEP_FAIL -gt 0 ]]; then
    echo "GPU-CHECK FAIL"
    exit 1
fi
echo "GPU-CHECK PASS"
