#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The main job, narrated: two QEMU guests at the same time see the vGPU in lspci and
# run GPU work through one vhost-vgpu backend; then one guest is powered off and booted
# again while the other keeps working. Uses the GPU through CUDA when this machine has
# one, else the CPU reference executor, and says which.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--executor auto|cuda|cpu] [--accel tcg|kvm] [--keep]

Builds everything the guests need, starts one vhost-vgpu with two sockets, boots two
QEMU guests at the same time and explains what each step shows: the device in lspci,
vgpu-smi, the vector-add check, a 64 MiB copy round trip, 200 mixed requests, a C
program on libvgpu, and a guest power cycle while the other guest keeps working.
Runs as root on Debian; installs what it needs (the same steps as ci/e2e-qemu.sh,
which this narrates). Ends with how to run it against a GPU.

Options:
  --executor KIND  auto (default): CUDA when an NVIDIA driver and GPU are present,
                   else the CPU reference executor; or force cuda or cpu
  --accel ACCEL    QEMU accelerator for the guests: tcg (default) or kvm
  --keep           keep the work directory (logs, initramfs)
  -h, --help       show this help
EOF
}

die() { echo "demo.sh: error: $*" >&2; exit 1; }

executor=auto
passthrough=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --executor) [[ $# -ge 2 ]] || die "--executor needs a value"; executor=$2; shift ;;
        --accel) [[ $# -ge 2 ]] || die "--accel needs a value"; passthrough+=(--accel "$2"); shift ;;
        --keep) passthrough+=(--keep) ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
case $executor in auto | cuda | cpu) ;; *) die "--executor wants auto, cuda or cpu, got '$executor'" ;; esac

para() { fold -s -w 88 <<<"$*"; echo; }

# A usable NVIDIA GPU: the driver library and a device node (what vhost-vgpu's
# --executor auto looks for, minus creating a context).
gpu_name() {
    local name
    ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 ' || return 1
    compgen -G '/dev/nvidia[0-9]*' >/dev/null || return 1
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || true
    echo "${name:-an NVIDIA GPU}"
}

cat <<'EOF'
========================================================================================
 vGPU demo: two virtual machines share one GPU through a vhost-user mediator
========================================================================================
EOF
para "What you will see: one host process, vhost-vgpu, listens on two vhost-user sockets. \
Two QEMU guests boot at the same time, each with a virtio PCI device on its own socket. \
Inside each guest, Debian's kernel loads the vgpu driver, and ordinary programs linked \
against the guest library send GPU work (allocate, copy, launch kernels, synchronize) \
over the device's virtqueue to the host, which runs it and answers."

case $executor in
    auto)
        if name=$(gpu_name); then
            executor=cuda
            para "Executor: CUDA. This machine has $name, so the guests' work runs on it."
        else
            executor=cpu
            para "Executor: CPU reference. No NVIDIA GPU or driver was found on this machine, \
so vhost-vgpu runs the same requests on its CPU reference executor (same protocol, same \
built-in kernels, same checks); the guests cannot tell except by the device name."
        fi
        ;;
    cuda) para "Executor: CUDA (forced with --executor cuda)." ;;
    cpu) para "Executor: CPU reference (forced with --executor cpu)." ;;
esac

rc=0
bash "$REPO_DIR/ci/e2e-qemu.sh" --narrate --executor "$executor" "${passthrough[@]}" || rc=$?

echo
if [[ $rc -eq 0 ]]; then
    para "Result: both guests saw the device in lspci and ran every check; vm1 was powered \
off and booted again while vm0 kept sending requests, and both passed; where the QEMU \
build carries the reconnect patch, vhost-vgpu was also restarted under the running vm0, \
which reconnected and kept working."
else
    para "Result: some checks FAILED (exit $rc); the lines above say which, with the end \
of the guest console and of the backend's log."
fi

cat <<'EOF'
----------------------------------------------------------------------------------------
 To run it against a GPU
----------------------------------------------------------------------------------------
EOF
para "On a KVM host with an NVIDIA GPU and its driver (CUDA is loaded at run time: \
nothing CUDA is needed to build):"
cat <<'EOF'
  cargo build --release
  target/release/vgpu-mediator sanity     # must print SANITY PASS
  bash ci/demo.sh --executor cuda         # this demo on the GPU (add --accel kvm for KVM guests)
  bash ci/gpu-check.sh target/release     # every built-in kernel, PTX, sticky errors, timings

EOF
para "For real VMs, run the backend as a service (qemu-configs/vhost-vgpu.service) and \
give each VM the options qemu-configs/launch-vm.sh uses (or \
qemu-configs/libvirt-domain-snippet.xml): shared memfd RAM and"
cat <<'EOF'
  target/release/vhost-vgpu --socket-path /run/vhost-vgpu/vm --socket-count 2 --executor cuda
  -chardev socket,id=c0,path=/run/vhost-vgpu/vm0
  -device vhost-user-test-device-pci,chardev=c0,virtio-id=22,num_vqs=1,vq_size=1024,config_size=128

EOF
para "In the guest, build guest-lib/driver against its kernel headers, load vgpu.ko, and \
vgpu-smi names the GPU, e.g. 'NVIDIA H100 80GB HBM3'."
exit "$rc"
