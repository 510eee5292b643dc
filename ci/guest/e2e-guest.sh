#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# The guest side of ci/e2e-qemu.sh and ci/e2e-libvirt.sh: runs inside a test VM (busybox sh, from the
# initramfs's /init) and prints one line per check:
#   CHECK <name> PASS|FAIL <detail>
# which the host turns into its PASS / FAIL lines. Evidence lines start with "SMI| "
# (vgpu-smi output) or "INFO ". The kernel command line sets (as environment variables):
#   VGPU_PLAN      first-loop:  all checks, then send requests until STOP on the console,
#                               then hold 16 MiB of device memory and wait for
#                               BACKEND-RESTARTED (the checks after the host restarted
#                               vhost-vgpu, prefixed "backend-restart") or POWEROFF
#                  first-wait:  all checks, then wait for POWEROFF on the console (and
#                               run vgpu-vector-add on VECTOR-ADD, vgpu-smi on SMI)
#                  reboot:      the checks after a power cycle (prefixed "reboot-")
#                               (first-wait powers off holding 16 MiB of device memory)
#                  libvirt:     lspci, vgpu-smi and vgpu-vector-add, then power off
#                               (a domain that libvirt started, ci/e2e-libvirt.sh)
#   VGPU_MIB       size of the HTOD/DTOH round trip in MiB (default 64)
#   VGPU_MIXED     number of mixed requests (default 200)
#   VGPU_ELEMENTS  vgpu-vector-add's element count (default 65536)
#   VGPU_LOOP_MAX  longest the request loop runs without a STOP, seconds (default 480)
#   VGPU_RESTART_WAIT  how long vgpu-vector-add is retried after BACKEND-RESTARTED while
#                  QEMU reconnects, seconds (default 20)

plan=${VGPU_PLAN:-first-wait}
mib=${VGPU_MIB:-64}
mixed=${VGPU_MIXED:-200}
elements=${VGPU_ELEMENTS:-65536}
loop_max=${VGPU_LOOP_MAX:-480}
restart_wait=${VGPU_RESTART_WAIT:-20}
bench_mib=${VGPU_BENCH_MIB:-32}
prefix=
[ "$plan" = reboot ] && prefix=reboot-

check() { # NAME PASS|FAIL DETAIL...
    name=$1
    verdict=$2
    shift 2
    echo "CHECK $prefix$name $verdict $*"
}

# The last non-empty line of a command's output, for a failure's detail.
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1; }

echo "INFO plan=$plan kernel=$(uname -r)"
# The host types STOP / MARK / POWEROFF on the console: no echo in the log.
stty -echo 2>/dev/null

# The driver: load it and wait for its char device.
if ! modprobe vgpu 2>/tmp/modprobe.err; then
    echo "INFO modprobe vgpu failed: $(cat /tmp/modprobe.err)"
fi
i=0
while [ ! -c /dev/vgpu0 ] && [ $i -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ -c /dev/vgpu0 ]; then
    echo "INFO /dev/vgpu0 is present"
else
    echo "INFO no /dev/vgpu0; kernel messages:"
    dmesg | grep -i -E 'vgpu|virtio' | tail -n 20 | sed 's/^/INFO dmesg: /'
fi

# The programs plan (ci/gpu-programs.sh): run the CUDA programs of an initramfs the host
# appended to this one, then power off.
if [ "$plan" = programs ]; then
    if [ -f /opt/programs/run.sh ]; then
        sh /opt/programs/run.sh /opt/programs guest 2>&1 | sed 's/^/PROG| /'
        echo "PROGRAMS-DONE"
    else
        echo "PROGRAMS-DONE no /opt/programs/run.sh in the initramfs"
    fi
    exit 0
fi

# 1. lspci -nn shows the device.
line=$(lspci -nn 2>&1 | grep -F '[1af4:1056]' | head -n 1)
if [ -n "$line" ]; then
    check lspci PASS "$line"
else
    check lspci FAIL "no [1af4:1056] in lspci -nn: $(lspci -nn 2>&1 | tr '\n' ';')"
fi

# 2. vgpu-smi shows the device. After the power cycle it must also show that nothing
#    of the previous boot is left: that boot powered off holding an allocation.
vgpu-smi >/tmp/smi.out 2>&1
rc=$?
sed 's/^/SMI| /' /tmp/smi.out
used=$(grep -i 'memory used' /tmp/smi.out | head -n 1 | sed 's/^[[:space:]]*//; s/[[:space:]][[:space:]]*/ /g')
if [ $rc -ne 0 ] || [ ! -s /tmp/smi.out ]; then
    check vgpu-smi FAIL "exit $rc: $(last_line /tmp/smi.out)"
elif [ "$plan" = reboot ] && [ -n "$used" ] && ! echo "$used" | grep -q ' in 0 allocations'; then
    check vgpu-smi FAIL "the previous boot's device memory was not freed: $used"
elif [ "$plan" = reboot ]; then
    check vgpu-smi PASS "$(grep -v '^[[:space:]]*$' /tmp/smi.out | head -n 1); ${used:-memory use not shown}"
else
    check vgpu-smi PASS "$(grep -v '^[[:space:]]*$' /tmp/smi.out | head -n 1)"
fi

# 3. vgpu-vector-add passes.
vgpu-vector-add --elements "$elements" >/tmp/va.out 2>&1
rc=$?
va=$(grep '^Vector add PASSED' /tmp/va.out | head -n 1)
if [ $rc -eq 0 ] && [ -n "$va" ]; then
    check vector-add PASS "$va"
else
    check vector-add FAIL "exit $rc: $(last_line /tmp/va.out)"
fi

# The libvirt plan stops here: /init powers the guest off, libvirt sees it shut off.
if [ "$plan" = libvirt ]; then
    exit 0
fi

# 4. A 64 MiB host-to-device / device-to-host round trip keeps its checksum.
if [ "$plan" != reboot ]; then
    VGPU_CHECK="htod-dtoh-${mib}MiB" vgpu-e2e-check roundtrip "$mib"
fi

# 5. Mixed requests.
VGPU_CHECK="$prefix""mixed-$mixed" vgpu-e2e-check mixed "$mixed"

# 6. A small C program linked against libvgpu runs a built-in kernel: the C example
#    of guest-lib/examples/c (scale_f32), built on the host against vgpu.h.
if [ "$plan" != reboot ]; then
    vgpu-c-example >/tmp/c.out 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        check c-builtin-kernel PASS "vector_scale.c (scale_f32 via libvgpu): $(last_line /tmp/c.out)"
    else
        check c-builtin-kernel FAIL "vector_scale.c exit $rc: $(last_line /tmp/c.out)"
    fi
fi

# 6b. Unmodified CUDA programs over the guest libcuda.so.1 (in /usr/lib/vgpu): a C
#     program of the driver API linked with -lcuda, and a program written against cudarc's
#     CudaContext API (it loads libcuda.so at run time). Both run vector_add_f32 from the
#     built-in catalog, the only kernels every executor has.
if [ "$plan" != reboot ] && [ -x /usr/bin/cuda-driver-check ]; then
    LD_LIBRARY_PATH=/usr/lib/vgpu cuda-driver-check vgpu:builtin "$elements" >/tmp/cu.out 2>&1
    rc=$?
    sed 's/^/CUDA| /' /tmp/cu.out
    if [ $rc -eq 0 ] && grep -q '^Driver API check PASSED' /tmp/cu.out; then
        check cuda-driver-api PASS "$(last_line /tmp/cu.out)"
    else
        check cuda-driver-api FAIL "exit $rc: $(last_line /tmp/cu.out)"
    fi
    LD_LIBRARY_PATH=/usr/lib/vgpu vgpu-cudarc-check vgpu:builtin "$elements" >/tmp/cudarc.out 2>&1
    rc=$?
    sed 's/^/CUDARC| /' /tmp/cudarc.out
    if [ $rc -eq 0 ] && grep -q '^cudarc check PASSED' /tmp/cudarc.out; then
        check cudarc-context-api PASS "$(last_line /tmp/cudarc.out)"
    else
        check cudarc-context-api FAIL "exit $rc: $(last_line /tmp/cudarc.out)"
    fi
fi

# 7. Several guest processes at once, each a session with its own context on the host and
#    its requests in flight beside the others', and one more killed with SIGKILL in the
#    middle of its copies: the others keep their checksums and a new process works after.
if [ "$plan" != reboot ]; then
    # The victim runs 48 MiB round trips back to back under its own name, so that it can
    # be killed by name in whatever request it is in.
    cp "$(command -v vgpu-e2e-check)" /tmp/vgpu-victim
    ( while :; do /tmp/vgpu-victim roundtrip 48 >/tmp/victim.out 2>&1; done ) &
    victim=$!
    pids=
    for i in 1 2 3; do
        VGPU_CHECK="parallel-$i-16MiB" vgpu-e2e-check roundtrip 16 >/tmp/par$i.out 2>&1 &
        pids="$pids $!"
    done
    sleep 2
    killed=no
    for _ in 1 2 3; do
        # Between two round trips no victim runs for a moment: then try again.
        killall -9 vgpu-victim 2>/dev/null && { killed=yes; break; }
        sleep 1
    done
    kill "$victim" 2>/dev/null
    wait "$victim" 2>/dev/null
    killall -9 vgpu-victim 2>/dev/null
    for p in $pids; do wait "$p"; done
    for i in 1 2 3; do cat /tmp/par$i.out; done
    if [ "$killed" != yes ]; then
        check killed-process FAIL "the process of 48 MiB round trips was not running at the kill: $(last_line /tmp/victim.out)"
    elif VGPU_CHECK=after-kill vgpu-e2e-check roundtrip 8 >/tmp/after.out 2>&1; then
        check killed-process PASS "a process of 48 MiB round trips killed with SIGKILL in the middle of its requests; then $(grep -F 'CHECK after-kill' /tmp/after.out | cut -d' ' -f4-)"
    else
        check killed-process FAIL "after a process was killed in the middle of its requests: $(last_line /tmp/after.out)"
    fi
fi

# 8. Copies from ordinary and from host memory, and a vector add from host memory, timed
#    (figures, not limits: they are compared in docs/benchmarks.md).
if [ "$plan" != reboot ]; then
    VGPU_CHECK="bench-${bench_mib}MiB" vgpu-e2e-check bench "$bench_mib"
fi

# The same VM after the host restarted vhost-vgpu (no reboot): QEMU reconnects to the new
# daemon. The sessions of the old daemon are gone; a new process opens a new session, so
# vgpu-vector-add is retried until it passes or restart_wait seconds have gone by. Then
# vgpu-smi must show no allocations: the new daemon's mediator is fresh, although this
# VM still has a process that held 16 MiB under the old one.
backend_restart_checks() {
    t0=$(date +%s)
    tries=0
    while :; do
        tries=$((tries + 1))
        if command -v timeout >/dev/null 2>&1; then
            timeout 10 vgpu-vector-add --elements "$elements" >/tmp/va.out 2>&1
        else
            vgpu-vector-add --elements "$elements" >/tmp/va.out 2>&1
        fi
        rc=$?
        va=$(grep '^Vector add PASSED' /tmp/va.out | head -n 1)
        [ $rc -eq 0 ] && [ -n "$va" ] && break
        [ $(($(date +%s) - t0)) -ge "$restart_wait" ] && break
        sleep 1
    done
    waited=$(($(date +%s) - t0))
    if [ $rc -eq 0 ] && [ -n "$va" ]; then
        check backend-restart PASS "$va; attempt $tries after $waited s"
    else
        # Without a working device vgpu-smi would only wait as well.
        check backend-restart FAIL "$tries attempts in $waited s, the last exit $rc: $(last_line /tmp/va.out)"
        return
    fi
    if command -v timeout >/dev/null 2>&1; then
        timeout 10 vgpu-smi >/tmp/smi.out 2>&1
    else
        vgpu-smi >/tmp/smi.out 2>&1
    fi
    rc=$?
    sed 's/^/SMI| /' /tmp/smi.out
    used=$(grep -i 'memory used' /tmp/smi.out | head -n 1 | sed 's/^[[:space:]]*//; s/[[:space:]][[:space:]]*/ /g')
    sessions=$(grep -i 'sessions' /tmp/smi.out | head -n 1 | sed 's/^[[:space:]]*//; s/[[:space:]][[:space:]]*/ /g')
    if [ $rc -ne 0 ] || [ ! -s /tmp/smi.out ]; then
        check backend-restart-smi FAIL "vgpu-smi exit $rc: $(last_line /tmp/smi.out)"
    elif [ -z "$used" ]; then
        check backend-restart-smi FAIL "vgpu-smi shows no memory use: $(last_line /tmp/smi.out)"
    elif ! echo "$used" | grep -q ' in 0 allocations'; then
        check backend-restart-smi FAIL "the restarted daemon shows allocations: $used"
    else
        check backend-restart-smi PASS "$used; ${sessions:-sessions not shown}"
    fi
}

case $plan in
    first-loop)
        # Keep sending requests until the host says STOP (after the other VM's reboot).
        VGPU_CHECK=requests-during-reboot vgpu-e2e-check loop "$loop_max"
        # Then hold device memory and wait: the host may restart vhost-vgpu and say
        # BACKEND-RESTARTED, and says POWEROFF at the end.
        : >/tmp/hold0.out
        vgpu-e2e-check hold 16 >/tmp/hold0.out 2>&1 &
        i=0
        while ! grep -q '^HOLDING' /tmp/hold0.out && [ $i -lt 100 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        echo "INFO $(head -n 1 /tmp/hold0.out)"
        echo "WAITING-FOR-POWEROFF"
        # shellcheck disable=SC3045 # busybox sh has read -t
        while read -r -t "$loop_max" cmd; do
            case $cmd in
                BACKEND-RESTARTED) backend_restart_checks ;;
                POWEROFF) break ;;
            esac
        done
        echo "POWERING-OFF"
        ;;
    first-wait)
        # Power off with a session open and device memory allocated: the host must free
        # it when the VM goes away (checked by vgpu-smi after the reboot).
        vgpu-e2e-check hold 16 >/tmp/hold.out 2>&1 &
        i=0
        while ! grep -q '^HOLDING' /tmp/hold.out && [ $i -lt 100 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        echo "INFO $(head -n 1 /tmp/hold.out)"
        echo "WAITING-FOR-POWEROFF"
        # Meanwhile the host may ask for one vector add (it compares the daemon's metrics
        # before and after) or for vgpu-smi (after it changed the VM's quota); each ends
        # with a DONE line.
        # shellcheck disable=SC3045 # busybox sh has read -t
        while read -r -t "$loop_max" cmd; do
            case $cmd in
                VECTOR-ADD)
                    if vgpu-vector-add --elements "$elements" >/tmp/va2.out 2>&1; then
                        check host-vector-add PASS "$(last_line /tmp/va2.out)"
                    else
                        check host-vector-add FAIL "$(last_line /tmp/va2.out)"
                    fi
                    echo "DONE VECTOR-ADD"
                    ;;
                SMI)
                    vgpu-smi >/tmp/smi2.out 2>&1
                    sed 's/^/SMI2| /' /tmp/smi2.out
                    echo "DONE SMI"
                    ;;
                POWEROFF) break ;;
            esac
        done
        echo "POWERING-OFF"
        ;;
esac
exit 0
