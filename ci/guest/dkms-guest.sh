#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# The guest side of ci/e2e-dkms.sh: runs inside a Debian guest booted with systemd and
# udev, as root, from the directory ci/e2e-dkms.sh handed in (the packages, this script,
# C sources). Installs the packages as a user would, then checks the driver, the device
# node, the tools and the libraries. Prints one line per check:
#   CHECK <name> PASS|FAIL <detail>
# with evidence on lines starting with "APT| " (apt-get's output), "DKMS| " (dkms
# status), "BUILD| " (DKMS's make.log after a failed build) and "INFO ". Ends with
# GUEST-DONE.
#
# Environment (from the kernel command line): VGPU_ELEMENTS, vgpu-vector-add's element
# count (default 65536); VGPU_KERNEL_HOOK=0 skips the rebuild through the kernel hook.

set -u
# VGPU_* words of the kernel command line (a service does not get them otherwise).
read -r -a words </proc/cmdline
for word in "${words[@]}"; do
    case $word in VGPU_*=*) export "${word?}" ;; esac
done
here=$(cd "$(dirname "$0")" && pwd)
elements=${VGPU_ELEMENTS:-65536}
kernel_hook=${VGPU_KERNEL_HOOK:-1}
kver=$(uname -r)
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

check() { # NAME PASS|FAIL DETAIL...
    local name=$1 verdict=$2
    shift 2
    echo "CHECK $name $verdict $*"
}
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1; }
# Seconds since an earlier $(now), with tenths.
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# Waits up to SECS for a path to exist (or, with !, to be gone).
wait_path() { # [!] PATH SECS
    local neg=0 i
    [[ $1 == '!' ]] && { neg=1; shift; }
    for ((i = 0; i < $2 * 10; i++)); do
        if [[ $neg -eq 0 && -e $1 ]] || [[ $neg -eq 1 && ! -e $1 ]]; then return 0; fi
        sleep 0.1
    done
    return 1
}
# The virtio device of the vGPU (virtio ID 22) in sysfs.
vgpu_virtio_dev() {
    local d
    for d in /sys/bus/virtio/devices/*; do
        [[ $(cat "$d/device" 2>/dev/null) == 0x0016 ]] && { echo "$d"; return 0; }
    done
    return 1
}
node_owner() { stat -c '%U:%G %a' "$1" 2>/dev/null; }

# The firmware's and the kernel's escape sequences end without a newline.
echo
echo "INFO kernel $kver, $(. /etc/os-release && echo "$PRETTY_NAME"), systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p'), up $(cut -d' ' -f1 /proc/uptime) s"
debs=("$here"/vgpu-dkms_*.deb "$here"/vgpu-guest_*.deb)
cuda_deb=$(find "$here" -maxdepth 1 -name 'vgpu-cuda_*.deb' | head -n 1)
[[ -n $cuda_deb ]] && debs+=("$cuda_deb")

# 1. Before anything is installed: the device is there, no driver has it, no node.
dev=$(vgpu_virtio_dev)
if [[ -z $dev ]]; then
    check device FAIL "no virtio device with ID 22: $(cat /sys/bus/virtio/devices/*/modalias 2>/dev/null | tr '\n' ' ')"
elif [[ -e $dev/driver || -e /dev/vgpu0 || -d /sys/module/vgpu ]]; then
    check device FAIL "before the packages: ${dev##*/} already has a driver or /dev/vgpu0 exists"
else
    check device PASS "${dev##*/} modalias $(cat "$dev/modalias"), no driver bound, no /dev/vgpu0, no vgpu module; $(lspci -nn 2>/dev/null | grep -F '[1af4:1056]' | head -n 1)"
fi

# 2. apt-get install of the local packages (no network: their dependencies are in the
#    image), as a user would.
t0=$(now)
apt-get install -y --no-install-recommends "${debs[@]}" >/tmp/apt.out 2>&1
rc=$?
apt_s=$(since "$t0")
# dpkg's progress ("(Reading database ... 45%") ends in carriage returns: one line each,
# and only the last kept.
tr '\r' '\n' </tmp/apt.out | grep -vE '^\(Reading database \.\.\. *([0-9]+%)?$' | sed 's/^/APT| /'
if [[ $rc -eq 0 ]]; then
    check apt-install PASS "apt-get install ${debs[*]##*/} in $apt_s s (DKMS build included)"
else
    check apt-install FAIL "apt-get install exit $rc after $apt_s s: $(last_line /tmp/apt.out)"
    for log in /var/lib/dkms/vgpu/*/build/make.log; do
        [[ -f $log ]] && tail -n 30 "$log" | sed 's/^/BUILD| /'
    done
fi
version=$(dpkg-query -W -f '${Version}' vgpu-dkms 2>/dev/null)
version=${version%-*}

# 3. dkms status: built and installed for the running kernel.
dkms status >/tmp/dkms.out 2>&1
sed 's/^/DKMS| /' /tmp/dkms.out
if grep -qE "^vgpu/$version, $kver, [^:]*: installed" /tmp/dkms.out; then
    check dkms-status PASS "$(grep -E "^vgpu/$version, $kver" /tmp/dkms.out | head -n 1)"
else
    check dkms-status FAIL "no 'vgpu/$version, $kver, ...: installed' in dkms status: $(tr '\n' ';' </tmp/dkms.out)"
fi

# 4. The module DKMS installed: where, for which kernel, with which alias.
file=$(modinfo -k "$kver" -F filename vgpu 2>/dev/null)
alias=$(modinfo -k "$kver" -F alias vgpu 2>/dev/null | tr '\n' ' ')
vermagic=$(modinfo -k "$kver" -F vermagic vgpu 2>/dev/null)
if [[ $file == /lib/modules/$kver/updates/dkms/vgpu.ko* && $alias == 'virtio:d00000016v* ' && $vermagic == "$kver "* ]]; then
    check module-file PASS "$file, alias ${alias% }, vermagic ${vermagic%% *}"
else
    check module-file FAIL "modinfo vgpu: filename '${file:-none}', alias '${alias% }', vermagic '$vermagic'"
fi

# 5. The package's postinst loaded it and the device is bound; udev gave the node to the
#    group vgpu.
group=$(getent group vgpu)
wait_path /dev/vgpu0 10
udevadm settle --timeout=10 2>/dev/null
owner=$(node_owner /dev/vgpu0)
driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
if [[ -d /sys/module/vgpu && $driver == vgpu && $owner == 'root:vgpu 660' && -n $group ]]; then
    check loaded-by-postinst PASS "vgpu loaded, ${dev##*/} bound to it; /dev/vgpu0 $owner; group ${group%%:*} (gid $(cut -d: -f3 <<<"$group"))"
else
    check loaded-by-postinst FAIL "module $([[ -d /sys/module/vgpu ]] && echo loaded || echo 'not loaded'), ${dev##*/} driver '${driver:-none}', /dev/vgpu0 '${owner:-missing}', group '${group:-missing}'"
    dmesg | grep -iE 'vgpu|virtio' | tail -n 10 | sed 's/^/INFO dmesg: /'
fi

# 6. Autoload: unloaded, then the device announced again as at boot (systemd-udev-trigger):
#    udev loads vgpu through its alias and applies the rule to the new node.
modprobe -r vgpu 2>/tmp/rmmod.err
wait_path ! /dev/vgpu0 10
gone=$([[ ! -d /sys/module/vgpu && ! -e /dev/vgpu0 ]] && echo yes || echo no)
t0=$(now)
udevadm trigger --action=add --subsystem-match=virtio
udevadm settle --timeout=30
wait_path /dev/vgpu0 10
udevadm settle --timeout=10
owner=$(node_owner /dev/vgpu0)
driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
if [[ $gone == yes && -d /sys/module/vgpu && $driver == vgpu && $owner == 'root:vgpu 660' ]]; then
    check udev-autoload PASS "after modprobe -r vgpu, udevadm trigger --action=add on the virtio bus loaded it by ${dev##*/}'s modalias $(cat "$dev/modalias") in $(since "$t0") s; /dev/vgpu0 $owner"
else
    check udev-autoload FAIL "unloaded: $gone ($(cat /tmp/rmmod.err)); after the trigger: module $([[ -d /sys/module/vgpu ]] && echo loaded || echo 'not loaded'), driver '${driver:-none}', /dev/vgpu0 '${owner:-missing}'"
fi

# 7. A user in the group vgpu runs the tools; one outside it is refused.
useradd -m -G vgpu alice 2>/dev/null
useradd -m bob 2>/dev/null
as() { runuser -u "$1" -- "${@:2}"; }
as alice vgpu-smi >/tmp/smi.out 2>&1
rc=$?
sed 's/^/SMI| /' /tmp/smi.out
if [[ $rc -eq 0 && -s /tmp/smi.out ]]; then
    check vgpu-smi PASS "as alice (group vgpu): $(grep -v '^[[:space:]]*$' /tmp/smi.out | head -n 1)"
else
    check vgpu-smi FAIL "as alice: exit $rc: $(last_line /tmp/smi.out)"
fi
as alice vgpu-vector-add --elements "$elements" >/tmp/va.out 2>&1
rc=$?
va=$(grep '^Vector add PASSED' /tmp/va.out | head -n 1)
if [[ $rc -eq 0 && -n $va ]]; then
    check vector-add PASS "as alice (group vgpu): $va"
else
    check vector-add FAIL "as alice: exit $rc: $(last_line /tmp/va.out)"
fi
as bob vgpu-smi >/tmp/bob.out 2>&1
rc=$?
if [[ $rc -ne 0 ]] && grep -qi 'permission denied' /tmp/bob.out; then
    check group-only PASS "bob (not in vgpu) is refused: $(last_line /tmp/bob.out)"
else
    check group-only FAIL "bob (not in vgpu): exit $rc: $(last_line /tmp/bob.out)"
fi

# 8. A C program built against the installed library through pkg-config (vgpu.pc),
#    loading libvgpu.so.1 by its soname from the system's library path.
flags=$(pkg-config --cflags --libs vgpu 2>&1)
flags=${flags% }
read -r -a flag_words <<<"$flags"
if cc -O2 -Wall -o /tmp/vector_scale "$here/vector_scale.c" "${flag_words[@]}" >/tmp/cc.out 2>&1; then
    needed=$(readelf -d /tmp/vector_scale | sed -n 's/.*(NEEDED).*\[\(libvgpu[^]]*\)\].*/\1/p')
    as alice /tmp/vector_scale >/tmp/vs.out 2>&1
    rc=$?
    if [[ $rc -eq 0 && $needed == libvgpu.so.1 ]]; then
        check pkg-config-program PASS "cc vector_scale.c $flags: NEEDED $needed ($(ldd /tmp/vector_scale | sed -n 's/.*libvgpu.so.1 => \([^ ]*\).*/\1/p')); as alice: $(last_line /tmp/vs.out)"
    else
        check pkg-config-program FAIL "NEEDED '${needed:-none}', exit $rc: $(last_line /tmp/vs.out)"
    fi
else
    check pkg-config-program FAIL "cc vector_scale.c $flags: $(last_line /tmp/cc.out)"
fi

# 9. vgpu-cuda: libcuda.so.1 found through /etc/ld.so.conf.d, a driver-API program built
#    with vgpu-cuda.pc runs without LD_LIBRARY_PATH.
if [[ -n $cuda_deb ]]; then
    cached=$(ldconfig -p | sed -n 's/^[[:space:]]*libcuda.so.1 (.*) => //p' | head -n 1)
    flags=$(pkg-config --cflags --libs vgpu-cuda 2>&1)
    flags=${flags% }
    read -r -a flag_words <<<"$flags"
    if cc -std=c11 -O2 -Wall -o /tmp/cuda-driver-check "$here/cuda-driver-check.c" "${flag_words[@]}" >/tmp/cc.out 2>&1; then
        as alice /tmp/cuda-driver-check vgpu:builtin "$elements" >/tmp/cu.out 2>&1
        rc=$?
        sed 's/^/CUDA| /' /tmp/cu.out
        if [[ $rc -eq 0 && $cached == /usr/lib/vgpu/libcuda.so.1 ]] && grep -q '^Driver API check PASSED' /tmp/cu.out; then
            check cuda-driver-api PASS "ldconfig: libcuda.so.1 => $cached; cc cuda-driver-check.c $flags; as alice: $(last_line /tmp/cu.out)"
        else
            check cuda-driver-api FAIL "ldconfig: libcuda.so.1 => '${cached:-none}'; exit $rc: $(last_line /tmp/cu.out)"
        fi
    else
        check cuda-driver-api FAIL "cc cuda-driver-check.c $flags: $(last_line /tmp/cc.out)"
    fi
fi

# 10. A kernel upgrade: what a kernel package's postinst runs (run-parts over
#     /etc/kernel/postinst.d, DKMS's hook among them) builds the module again for it.
#     Here the "new" kernel is the running one, its module unbuilt first (DKMS keeps
#     the source added, as for a kernel it has not built for yet).
if [[ $kernel_hook == 1 ]]; then
    dkms unbuild "vgpu/$version" -k "$kver" >/tmp/hook.out 2>&1
    before=$(dkms status vgpu 2>&1 | tr '\n' ';')
    t0=$(now)
    /etc/kernel/postinst.d/dkms "$kver" >>/tmp/hook.out 2>&1
    rc=$?
    after=$(dkms status vgpu 2>&1)
    if [[ $rc -eq 0 && $before != *"$kver"*installed* ]] && grep -qE "^vgpu/$version, $kver, [^:]*: installed" <<<"$after" &&
        [[ -n $(modinfo -k "$kver" -F filename vgpu 2>/dev/null) ]]; then
        check kernel-hook PASS "after dkms unbuild -k $kver ('${before%;}'), /etc/kernel/postinst.d/dkms $kver rebuilt it in $(since "$t0") s: $after"
    else
        check kernel-hook FAIL "exit $rc; before '${before%;}', after '$(tr '\n' ';' <<<"$after")': $(last_line /tmp/hook.out)"
    fi
fi

# 11. Removal: prerm takes the module out of DKMS and the kernel's module tree.
apt-get remove -y vgpu-dkms >/tmp/remove.out 2>&1
rc=$?
left=$(dkms status vgpu 2>&1)
file=$(modinfo -k "$kver" -F filename vgpu 2>/dev/null)
if [[ $rc -eq 0 && -z $left && -z $file && ! -e /usr/src/vgpu-$version ]]; then
    check apt-remove PASS "apt-get remove vgpu-dkms: dkms status has no vgpu, no vgpu.ko for $kver, /usr/src/vgpu-$version gone"
else
    check apt-remove FAIL "exit $rc; dkms status '$left', module '${file:-none}': $(last_line /tmp/remove.out)"
fi

echo "GUEST-DONE"
