#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The guest side of ci/e2e-gpus.sh: one VM with several vGPU devices (one per vhost-vgpu
# socket), run from the initramfs's /init (busybox sh). Prints one line per check:
#   CHECK <name> PASS|FAIL <detail>
# and evidence lines: "SMI| " (vgpu-smi), "CUDA| " (the driver-API program), "C| " (the
# C example), "GPU vgpuN G" (the host GPU each device's config space names). The work
# steps run one at a time so that the host can see which VM (socket) each one reached:
# the guest prints "READY <step>", waits for "GO <step>" on the console (at most
# VGPU_STEP_WAIT seconds; then it goes on by itself), runs the step, prints its CHECK line
# and "DONE <step>". At the end it prints WAITING-FOR-POWEROFF and waits for POWEROFF.
# The kernel command line sets:
#   VGPU_DEVICES    how many devices the VM has (default 2)
#   VGPU_GPUS       the host GPU the host placed each device on, in device order, comma
#                   separated (e.g. 0,1); empty: not checked against the host
#   VGPU_ELEMENTS   elements of each vector add (default 65536)
#   VGPU_STEP_WAIT  longest wait for the host's GO or POWEROFF, seconds (default 120)

devices=${VGPU_DEVICES:-2}
gpus=${VGPU_GPUS:-}
elements=${VGPU_ELEMENTS:-65536}
step_wait=${VGPU_STEP_WAIT:-120}
last=$((devices - 1))

check() { # NAME PASS|FAIL DETAIL...
    name=$1
    verdict=$2
    shift 2
    echo "CHECK $name $verdict $*"
}

last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1; }

# The host's GO for a step (or nothing within step_wait seconds: go on anyway).
ready() { # STEP
    echo "READY $1"
    # shellcheck disable=SC3045 # busybox sh has read -t
    while read -r -t "$step_wait" cmd arg; do
        [ "$cmd" = GO ] && [ "$arg" = "$1" ] && return 0
    done
    echo "INFO no GO $1 from the host within $step_wait s: going on"
}

echo "INFO devices=$devices gpus=${gpus:-unchecked} kernel=$(uname -r)"
stty -echo 2>/dev/null

if ! modprobe vgpu 2>/tmp/modprobe.err; then
    echo "INFO modprobe vgpu failed: $(cat /tmp/modprobe.err)"
fi
i=0
while [ ! -c "/dev/vgpu$last" ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done

# 1. lspci shows one device per socket.
n=$(lspci -nn 2>&1 | grep -c -F '[1af4:1056]')
if [ "$n" -eq "$devices" ]; then
    check lspci PASS "$n devices [1af4:1056]: $(lspci -nn | grep -F '[1af4:1056]' | cut -d' ' -f1 | tr '\n' ' ')"
else
    check lspci FAIL "$n devices [1af4:1056] in lspci -nn, expected $devices"
fi

# 2. One /dev/vgpuN per device, each with the sysfs attribute gpu: the host GPU it is on.
nodes=0
for f in /dev/vgpu[0-9]*; do
    [ -c "$f" ] && nodes=$((nodes + 1))
done
detail=
bad=
d=0
while [ $d -lt "$devices" ]; do
    sys=/sys/class/vgpu/vgpu$d
    gpu=$(cat "$sys/gpu" 2>/dev/null)
    pci=$(basename "$(dirname "$(readlink -f "$sys/device")")")
    want=$(echo "$gpus" | cut -d, -f$((d + 1)))
    echo "GPU vgpu$d ${gpu:-none} $pci"
    detail="$detail/dev/vgpu$d: PCI $pci, host GPU ${gpu:-?}; "
    if [ ! -c "/dev/vgpu$d" ]; then
        bad="${bad}no /dev/vgpu$d; "
    elif [ -z "$gpu" ]; then
        bad="${bad}no $sys/gpu; "
    elif [ -n "$want" ] && [ "$gpu" != "$want" ]; then
        bad="${bad}vgpu$d is on host GPU $gpu, the host placed it on $want; "
    fi
    d=$((d + 1))
done
if [ "$nodes" -ne "$devices" ]; then
    bad="${bad}$nodes /dev/vgpuN nodes, expected $devices; "
fi
if [ -z "$bad" ]; then
    check devices PASS "$detail${gpus:+as the host placed them: $gpus}"
else
    check devices FAIL "$bad$detail"
    dmesg | grep -i -E 'vgpu|virtio' | tail -n 20 | sed 's/^/INFO dmesg: /'
fi

# 3. vgpu-smi shows every device with the host GPU it is on (as sysfs says).
vgpu-smi >/tmp/smi.out 2>&1
rc=$?
sed 's/^/SMI| /' /tmp/smi.out
bad=
d=0
while [ $d -lt "$devices" ]; do
    # The "host GPU" line of device d's block.
    smi_gpu=$(awk -v dev="vgpu$d:" '$1 == dev { on = 1; next } /^vgpu[0-9]+:/ { on = 0 }
        on && /^ *host GPU / { print $NF; exit }' /tmp/smi.out)
    gpu=$(cat "/sys/class/vgpu/vgpu$d/gpu" 2>/dev/null)
    if [ -z "$smi_gpu" ]; then
        bad="${bad}no host GPU line for vgpu$d; "
    elif [ "$smi_gpu" != "$gpu" ]; then
        bad="${bad}vgpu$d: host GPU $smi_gpu, sysfs says $gpu; "
    fi
    d=$((d + 1))
done
heads=$(grep -c '^vgpu[0-9]*: ' /tmp/smi.out)
if [ $rc -ne 0 ]; then
    check vgpu-smi FAIL "exit $rc: $(last_line /tmp/smi.out)"
elif [ "$heads" -ne "$devices" ] || [ -n "$bad" ]; then
    check vgpu-smi FAIL "$heads devices shown, expected $devices; $bad"
else
    check vgpu-smi PASS "$(grep '^vgpu[0-9]*: ' /tmp/smi.out | tr '\n' ';' | sed 's/;$//; s/;/; /g'), each with its host GPU"
fi

# 4. vgpu-vector-add on each device (the Rust API opening /dev/vgpuN).
d=0
while [ $d -lt "$devices" ]; do
    ready "vector-add-$d"
    vgpu-vector-add --device "$d" --elements "$elements" >/tmp/va.out 2>&1
    rc=$?
    va=$(grep '^Vector add PASSED' /tmp/va.out | head -n 1)
    if [ $rc -eq 0 ] && [ -n "$va" ]; then
        check "vector-add-$d" PASS "--device $d: $va"
    else
        check "vector-add-$d" FAIL "--device $d exit $rc: $(last_line /tmp/va.out)"
    fi
    echo "DONE vector-add-$d"
    d=$((d + 1))
done

# 5. The C ABI on the last device: vgpu_open(N), a built-in kernel, vgpu_device_gpu.
ready "c-example-$last"
vgpu-c-example "$last" >/tmp/c.out 2>&1
rc=$?
sed 's/^/C| /' /tmp/c.out
gpu=$(cat "/sys/class/vgpu/vgpu$last/gpu" 2>/dev/null)
if [ $rc -eq 0 ] && grep -q "^C example PASSED on /dev/vgpu$last: .*, host GPU $gpu\$" /tmp/c.out; then
    check "c-example-$last" PASS "$(last_line /tmp/c.out)"
else
    check "c-example-$last" FAIL "exit $rc (host GPU in sysfs: ${gpu:-?}): $(last_line /tmp/c.out)"
fi
echo "DONE c-example-$last"

# 6. A driver-API program over the guest libcuda.so.1: every device counted, distinct
#    PCI bus ids and UUIDs, and a context on the last device runs a vector add there.
ready "cuda-device-$last"
LD_LIBRARY_PATH=/usr/lib/vgpu cuda-devices-check "$devices" "$last" "$elements" >/tmp/cu.out 2>&1
rc=$?
sed 's/^/CUDA| /' /tmp/cu.out
if [ $rc -eq 0 ] && grep -q '^Devices check PASSED' /tmp/cu.out; then
    check "cuda-device-$last" PASS "$(last_line /tmp/cu.out)"
else
    check "cuda-device-$last" FAIL "exit $rc: $(last_line /tmp/cu.out)"
fi
echo "DONE cuda-device-$last"

echo "WAITING-FOR-POWEROFF"
# shellcheck disable=SC3045 # busybox sh has read -t
while read -r -t "$step_wait" cmd _; do
    [ "$cmd" = POWEROFF ] && break
done
exit 0
