#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check of one guest with two vGPU devices placed on two host GPUs: one
# vhost-vgpu with two sockets (vm0 on GPU 0, vm1 on GPU 1), one TCG guest with one
# vhost-user device per socket. Every check is one "PASS <check> <detail>" or
# "FAIL <check> <detail>" line (ci/test.sh counts them); the last line is
# "== done: N passed, M failed ...". With --bundle DIR nothing is built: everything comes
# from a ci/gpu-bundle.sh bundle, and the executor is CUDA (two real GPUs) by default.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds what the guest needs as ci/e2e-qemu.sh does (ci/e2e-build.sh: vhost-vgpu and the
guest tools with cargo, vgpu.ko against Debian's current kernel, the QEMU with the
generic vhost-user device, a busybox initramfs running ci/guest/gpus-guest.sh), then
starts one vhost-vgpu with two sockets on two GPUs (--gpu 0,1; simulated ones,
--executor cpu:2, unless --executor says otherwise) and boots one guest under TCG with two
vhost-user devices, one per socket (chardevs c0 and c1).

In the guest: lspci shows two [1af4:1056] devices; /dev/vgpu0 and /dev/vgpu1 exist and
their sysfs attribute gpu names the host GPU the host placed each on; vgpu-smi shows
both, each with its host GPU; vgpu-vector-add --device N passes on each; the C example
runs on /dev/vgpu1 through libvgpu (vgpu_open(1), vgpu_device_gpu); a driver-API
program over the guest libcuda.so.1 (ci/guest/cuda-devices-check.c) counts two devices
with distinct PCI bus ids and UUIDs and runs a vector add in a context on device 1.
On the host, around each of those runs, vgpu-admin --json list through the daemon's
control socket must show that only the VM (socket) of the device used answered more
requests: the work of /dev/vgpuN lands on tenant vmN. It must also list vm0 on GPU 0 and
vm1 on GPU 1, both GPUs run by the executor asked for, and the vector add on /dev/vgpuN
must name the device of GPU N as the daemon lists it (with --executor cuda: the GPU's
own name, e.g. NVIDIA H200).

With --bundle DIR nothing is built and neither cargo, apt nor root is needed: QEMU, its
libraries and firmware, the guest kernel and initramfs.cpio.gz with
initramfs-gpus.cpio.gz appended (this guest's script and cuda-devices-check) come from
DIR/guests (written by ci/gpu-bundle.sh), vhost-vgpu, vgpu-executor-worker and
vgpu-admin from DIR (VGPU_EXECUTOR_WORKER is set to the executor worker). The executor is
then cuda unless --executor says otherwise: this is how ci/gpu-check.sh (step
"guests-gpus") runs it on a machine with two GPUs. Besides bash and coreutils it needs
only grep, sed and gzip (or python3).

Options:
  --executor KIND   vhost-vgpu's executor: cuda (two real GPUs; the default with
                    --bundle) or cpu:N with N >= 2 (N simulated GPUs; the default,
                    cpu:2, without --bundle)
  --bundle DIR      build nothing: take the guest's files from DIR/guests and vhost-vgpu,
                    vgpu-executor-worker and vgpu-admin from DIR
  --elements N      elements of each vector add (default 65536)
  --mem SIZE        RAM of the guest (default 512M)
  --timeout SECS    longest wait for one guest phase (default 300)
  --accel ACCEL     QEMU accelerator: tcg (default) or kvm
  --keep            keep the work directory (logs, initramfs) and print its path
  -h, --help        show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (vhost-vgpu's log level, default info).
EOF
}

die() { echo "e2e-gpus.sh: error: $*" >&2; exit 1; }

executor=
bundle=
elements=65536
mem=512M
timeout=300
accel=tcg
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --executor) need_arg "$1" $#; executor=$2; shift ;;
        --bundle) need_arg "$1" $#; bundle=$2; shift ;;
        --elements) need_arg "$1" $#; elements=$2; shift ;;
        --mem) need_arg "$1" $#; mem=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --accel) need_arg "$1" $#; accel=$2; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ $elements =~ ^[1-9][0-9]*$ ]] || die "--elements wants a positive number, got '$elements'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"
if [[ -n $bundle ]]; then
    [[ -d $bundle/guests ]] || die "--bundle: $bundle/guests does not exist (build it with ci/gpu-bundle.sh)"
    bundle=$(cd "$bundle" && pwd)
    executor=${executor:-cuda}
else
    executor=${executor:-cpu:2}
fi
# The executor each GPU must be run by, as vgpu-admin --json list names it.
case $executor in
    cuda) want_executor=cuda ;;
    cpu:*)
        [[ ${executor#cpu:} =~ ^[0-9]+$ && ${executor#cpu:} -ge 2 ]] ||
            die "--executor cpu:N wants N >= 2 simulated GPUs (--gpu 0,1), got '$executor'"
        want_executor=cpu
        ;;
    *) die "--executor wants cuda or cpu:N (N >= 2), got '$executor'" ;;
esac

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-gpus
e2e_workdir vgpu-e2e-gpus
# ci/e2e-build.sh's paragraphs for a person: not in this script.
say() { :; }

# The rows of one top-level array of `vgpu-admin --json` (serde's pretty layout: the
# array's name at two spaces, its objects' fields at six, each object closed at four),
# one object a line: the values of FIELD... joined by "|", strings without their quotes.
# Read with bash alone (no jq on the GPU machine). Fails when the array is not there or
# an object lacks one of the fields.
json_rows() { # ARRAY FIELD... <JSON
    local array=$1 line inside=0 value f row
    shift
    local -A obj=()
    while IFS= read -r line; do
        if [[ $inside -eq 0 ]]; then
            [[ $line == "  \"$array\": ["* ]] && inside=1
            [[ $line == "  \"$array\": []"* ]] && return 0
            continue
        fi
        if [[ $line =~ ^\ {6}\"([A-Za-z_0-9]+)\":\ (.*)$ ]]; then
            value=${BASH_REMATCH[2]%,}
            [[ $value == \"*\" ]] && value=${value:1:${#value}-2}
            obj[${BASH_REMATCH[1]}]=$value
        elif [[ $line =~ ^\ {4}\},?$ ]]; then
            row=
            for f in "$@"; do
                [[ -n ${obj[$f]+set} ]] || return 1
                row+=${row:+|}${obj[$f]}
            done
            echo "$row"
            obj=()
        elif [[ $line =~ ^\ {2}\] ]]; then
            return 0
        fi
    done
    return 1
}
# "vm0=A vm1=B": FIELD of each VM of `vgpu-admin --json list` on stdin.
json_vms() { # FIELD <JSON
    local rows
    rows=$(json_rows vms name "$1") || return 1
    [[ -n $rows ]] || return 1
    tr '|' '=' <<<"$rows" | paste -s -d ' '
}

# ---- 1. build (ci/e2e-build.sh), or take everything from a bundle --------------------
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
if [[ -n $bundle ]]; then
    e2e_use_bundle "$bundle" vgpu-admin
    # This guest's script and cuda-devices-check, appended to the bundle's initramfs:
    # the kernel unpacks both, the later /guest.sh replacing the earlier.
    gpus_part=$bundle/guests/$E2E_BUNDLE_GPUS_INITRD
    [[ -f $gpus_part ]] || die "$gpus_part does not exist: the bundle predates ci/e2e-gpus.sh's guest (build it again with ci/gpu-bundle.sh)"
    cat "$initrd" "$gpus_part" >"$work/initramfs-gpus.cpio.gz"
    initrd=$work/initramfs-gpus.cpio.gz
    echo "   $(du -h "$initrd" | cut -f1) $(basename "$initrd"): $E2E_BUNDLE_INITRD with" \
        "$E2E_BUNDLE_GPUS_INITRD (this guest's /guest.sh, cuda-devices-check) appended"
else
    e2e_build_setup
    e2e_build_cargo
    e2e_build_kernel
    e2e_build_driver
    e2e_build_c_programs
    e2e_build_cuda_devices_check
    e2e_build_qemu
    # shellcheck disable=SC2034 # e2e_build_initramfs reads them
    e2e_init=ci/guest/gpus-guest.sh
    # shellcheck disable=SC2034
    e2e_initramfs_extra=(--file "$work/guest/usr/bin/cuda-devices-check:/usr/bin/cuda-devices-check")
    e2e_build_initramfs
    [[ -x $target/vgpu-admin ]] || die "cargo build did not produce $target/vgpu-admin"
    if [[ $executor == cuda ]]; then
        # CUDA work runs in vgpu-executor-worker processes.
        e2e_build_worker
        export VGPU_EXECUTOR_WORKER=$target/vgpu-executor-worker
    fi
fi

# ---- 2. the backend: two sockets, two GPUs --------------------------------------------
export RUST_LOG=${RUST_LOG:-info}
backend=(--executor "$executor" --gpu "0,1")
want_gpus=(0 1)
step "host: vhost-vgpu --socket-count 2 ${backend[*]}"
mkdir -p "$work/sockets"
control=$work/sockets/vm.control
sockets=("$work/sockets/vm0" "$work/sockets/vm1")
"$target/vhost-vgpu" --socket-path "$work/sockets/vm" --socket-count 2 "${backend[@]}" \
    >"$work/vhost-vgpu.log" 2>&1 &
daemon=$!
pids+=("$daemon")
for ((i = 0; i < 100; i++)); do
    [[ -S ${sockets[0]} && -S ${sockets[1]} && -S $control ]] && break
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
if ! [[ -S ${sockets[0]} && -S ${sockets[1]} && -S $control ]]; then
    show "$work/vhost-vgpu.log" 20 >&2
    die "vhost-vgpu did not listen on ${sockets[*]} and $control"
fi
# Where the mediator placed each VM, from its log ("tenant 1 (vm0) added on GPU 0: ...").
placed=()
for vm in vm0 vm1; do
    placed+=("$(sed -n "s/.* ($vm) added on GPU \([0-9]*\).*/\1/p" "$work/vhost-vgpu.log" | tail -n 1)")
done
if [[ "${placed[*]}" == "${want_gpus[*]}" ]]; then
    pass "host-placement vm0 on GPU ${placed[0]}, vm1 on GPU ${placed[1]} (${backend[*]})"
else
    fail "host-placement the daemon's log places vm0 on GPU '${placed[0]}', vm1 on GPU '${placed[1]}'; expected ${want_gpus[*]} (${backend[*]})"
    show "$work/vhost-vgpu.log" 10
fi
sed -n 's/^\[[^]]*\] *//; /QEMU options: /p' "$work/vhost-vgpu.log" | sed 's/^/    | /'

# Each VM's requests answered so far ("vm0=12 vm1=3"), from the control socket.
requests() {
    "$target/vgpu-admin" --control "$control" --json list 2>>"$work/admin.err" | json_vms requests
}
# VM's number in "vm0=N vm1=M", or nothing when it has none.
count_of() { # VM "vm0=N vm1=M"
    local kv
    for kv in $2; do
        [[ ${kv%%=*} == "$1" && ${kv#*=} =~ ^[0-9]+$ ]] && { echo "${kv#*=}"; return; }
    done
}

# ---- 3. the guest ---------------------------------------------------------------------
step "boot one guest with two vGPU devices (${accel^^})"
mkfifo "$work/guest.in"
exec {guest_in}<>"$work/guest.in"
log=$work/guest.log
want_csv=$(IFS=,; echo "${want_gpus[*]}")
bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" \
    --socket "${sockets[0]}" --socket "${sockets[1]}" --mem "$mem" --accel "$accel" \
    --append "VGPU_DEVICES=2 VGPU_GPUS=$want_csv VGPU_ELEMENTS=$elements VGPU_STEP_WAIT=$timeout" \
    <"$work/guest.in" >"$log" 2>&1 &
guest=$!
pids+=("$guest")
tell() { echo "$1" >&"$guest_in"; }
# Waits until the guest's console matches PATTERN: 0 when it does, 1 when QEMU exited
# first, 2 after SECS.
wait_for() { # PATTERN SECS
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        tr -d '\r' 2>/dev/null <"$log" | grep -qE "$1" && return 0
        if ! kill -0 "$guest" 2>/dev/null; then
            tr -d '\r' 2>/dev/null <"$log" | grep -qE "$1" && return 0
            return 1
        fi
        sleep 0.2
    done
    return 2
}

# The steps that use one device each: /dev/vgpuN's work must reach vmN only.
work_steps=(vector-add-0 vector-add-1 c-example-1 cuda-device-1)
bad=0
for s in "${work_steps[@]}"; do
    if ! wait_for "^READY $s\$" "$timeout"; then
        fail "tenant-$s the guest did not get to $s"
        bad=1
        break
    fi
    before=$(requests || true)
    tell "GO $s"
    wait_for "^DONE $s\$" "$timeout" || true
    after=$(requests || true)
    dev=${s##*-}
    other=$((1 - dev))
    counts=("$(count_of "vm$dev" "$before")" "$(count_of "vm$dev" "$after")"
        "$(count_of "vm$other" "$before")" "$(count_of "vm$other" "$after")")
    if [[ -z $before || -z $after ]]; then
        fail "tenant-$s vgpu-admin --json list failed: $(tail -n 1 "$work/admin.err" 2>/dev/null)"
        bad=1
        continue
    fi
    if [[ -z ${counts[0]} || -z ${counts[1]} || -z ${counts[2]} || -z ${counts[3]} ]]; then
        fail "tenant-$s vgpu-admin --json list lacks vm$dev's or vm$other's requests: before '$before', after '$after'"
        bad=1
        continue
    fi
    grew=$((counts[1] - counts[0]))
    still=$((counts[3] - counts[2]))
    detail="vgpu-admin --json list around $s: vm$dev requests +$grew, vm$other +$still"
    if [[ $grew -gt 0 && $still -eq 0 ]]; then
        pass "tenant-$s /dev/vgpu$dev's work reached vm$dev only: $detail"
    else
        fail "tenant-$s $detail; expected vm$dev to grow and vm$other to stay"
        bad=1
    fi
done

# What the daemon's control socket says of each VM's GPU, and of each GPU: "INDEX|EXECUTOR|NAME".
"$target/vgpu-admin" --control "$control" --json list >"$work/admin-list.json" 2>>"$work/admin.err" || true
listed_gpus=$(json_vms gpu <"$work/admin-list.json" || true)
gpu_rows=$(json_rows gpus index executor name <"$work/admin-list.json" || true)
if [[ $listed_gpus == "vm0=${want_gpus[0]} vm1=${want_gpus[1]}" ]]; then
    pass "host-admin-gpus vgpu-admin --json list: $listed_gpus"
else
    fail "host-admin-gpus vgpu-admin --json list says '$listed_gpus'; expected vm0=${want_gpus[0]} vm1=${want_gpus[1]}"
fi
echo "   vgpu-admin list:"
"$target/vgpu-admin" --control "$control" list 2>&1 | sed 's/^/    | /'

wait_for '^WAITING-FOR-POWEROFF' "$timeout" || true
tell POWEROFF
wait_for '^GUEST-EXIT' 30 || true
deadline=$((SECONDS + 10))
while kill -0 "$guest" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.2
done
kill "$guest" 2>/dev/null || true
wait "$guest" 2>/dev/null || true

step "results from the guest"
e2e_guest_checks "$log" guest lspci devices vgpu-smi "${work_steps[@]}"
# The vector add on /dev/vgpuN ran on GPU N's device: its PASSED line names the device as
# the daemon lists GPU N, and the daemon runs GPU N with the executor asked for (cuda: a
# real GPU's name, e.g. "NVIDIA H200"; cpu:N: the CPU reference executor).
names_detail=
names_bad=
for d in "${!want_gpus[@]}"; do
    g=${want_gpus[$d]}
    row=$(grep "^$g|" <<<"$gpu_rows" | head -n 1 || true)
    gpu_executor=$(cut -d'|' -f2 <<<"$row")
    gpu_name=$(cut -d'|' -f3- <<<"$row")
    va=$(tr -d '\r' <"$log" | sed -n "s/^CHECK vector-add-$d PASS .*Vector add PASSED: [0-9]* elements, 0 errors (\(.*\))\$/\1/p" | tail -n 1)
    names_detail+="/dev/vgpu$d: '${va:-?}' on GPU $g '${gpu_name:-?}' (${gpu_executor:-?} executor); "
    if [[ -z $row ]]; then
        names_bad+="vgpu-admin --json list has no GPU $g; "
    elif [[ $gpu_executor != "$want_executor" ]]; then
        names_bad+="GPU $g is run by the ${gpu_executor:-?} executor, not $want_executor; "
    elif [[ -z $gpu_name || $va != "$gpu_name" ]]; then
        names_bad+="the vector add on /dev/vgpu$d names '${va:-nothing}', not GPU $g's '${gpu_name:-?}'; "
    fi
done
if [[ -z $names_bad ]]; then
    pass "host-vector-add-gpus ${names_detail%; } (vgpu-admin --json list)"
else
    fail "host-vector-add-gpus $names_bad${names_detail%; }"
    bad=1
fi
echo "   the guest's devices (/dev/vgpuN, host GPU, PCI address):"
tr -d '\r' <"$log" | sed -n 's/^GPU /    | /p'
echo "   vgpu-smi:"
tr -d '\r' <"$log" | sed -n 's/^SMI| /    | /p'
echo "   cuda-devices-check:"
tr -d '\r' <"$log" | sed -n 's/^CUDA| /    | /p'
if kill -0 "$daemon" 2>/dev/null; then
    pass "host-daemon vhost-vgpu served the whole run"
else
    fail "host-daemon vhost-vgpu exited during the run"
    bad=1
fi
if [[ $bad -eq 1 ]]; then
    echo "   the end of the guest's console:"
    show "$log" 25
    echo "   the end of vhost-vgpu's log:"
    show "$work/vhost-vgpu.log" 10
fi

step "done: $passed passed, $failed failed (host: ${backend[*]}; guest kernel $kver)"
[[ $failed -eq 0 ]]
