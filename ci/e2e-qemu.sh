#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check with real QEMU guests: one vhost-vgpu backend with two sockets, two
# TCG guests booted at the same time with Debian's current kernel and the vgpu driver,
# every guest check reported as one "PASS <vm> <check> <detail>" or
# "FAIL <vm> <check> <detail>" line (ci/test.sh counts them), then one guest powered off
# and booted again while the other keeps sending requests, then (with a QEMU that carries
# the reconnect fix) vhost-vgpu restarted under the running guest, which must reconnect.
# With --bundle DIR nothing is built: everything comes from a ci/gpu-bundle.sh bundle.
# With --executor remote the VMs' executors run on a vgpu-worker started on 127.0.0.1
# (vhost-vgpu --executor remote:127.0.0.1:PORT), and the check lines start with "remote".
# With --kernel-suite SUITE the guests boot that Debian suite's kernel (e.g. the newest
# of trixie-backports) with vgpu.ko built for it, and the check lines start with "k<major>".
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds what the guests need (vhost-vgpu and the guest tools with cargo, vgpu.ko against
the headers of Debian's current linux-image-amd64, a QEMU with the generic vhost-user
device, a busybox initramfs), starts one vhost-vgpu with two sockets and boots two
guests under TCG at the same time. In each guest: lspci -nn shows [1af4:1056],
vgpu-smi shows the device, vgpu-vector-add passes, a 64 MiB HTOD/DTOH round trip keeps
its checksum, 200 mixed requests succeed, and a C program linked against libvgpu runs a
built-in kernel. Then vm1 is powered off and booted again (a second QEMU on the same
socket) while vm0 keeps sending requests; both must pass. Last, when the QEMU carries
qemu-configs/vhost-user-base-reconnect.patch (the reconnect-ok marker), vhost-vgpu is
stopped with SIGTERM and started again on the same sockets while vm0 runs on: the same
QEMU must reconnect, vgpu-vector-add must pass again and vgpu-smi show 0 allocations.
Without the fix that phase is skipped with a "note:" line.

With --executor remote the executors are not vhost-vgpu's own: the script makes a key
(vgpu-worker keygen), starts vgpu-worker --executor KIND (--worker-executor, default cpu)
on a free port of 127.0.0.1 from the same build (or bundle), its log beside the daemon's,
and runs vhost-vgpu with --executor remote:127.0.0.1:PORT --remote-key KEY. Every check
above runs unchanged, and the worker's side is checked too: vhost-vgpu reached the worker,
the guests' sessions run there (one executor process each, children of vgpu-worker), the
daemon's SIGTERM in the restart phase ends them on the worker, and once both guests are
off no session is left there. Each line then reads "PASS remote <vm> <check> ...".

With --kernel-suite SUITE the guests run the kernel of another Debian suite instead of
this machine's linux-image-amd64: by default the newest one there (trixie-backports:
the newest kernel built for Debian 13), or the one --kernel-version names. It is
fetched by ci/guest-kernel.sh --suite, and vgpu.ko is built against its headers in the
build root of that Debian release (ci/build-root.sh, a cached chroot: that kernel's
kbuild tools need its C library). Every check runs unchanged; each line then starts
with k<major version>, e.g. "PASS k7 <vm> <check> ..." (after "remote" with --executor
remote). The last line names the guests' kernel in every mode.

With --bundle DIR nothing is built and neither cargo, apt nor root is needed: QEMU,
its libraries and firmware, the guest kernel and the initramfs come from DIR/guests
(written by ci/gpu-bundle.sh), vhost-vgpu and vgpu-executor-worker from DIR
(VGPU_EXECUTOR_WORKER is set to the latter), and with --executor remote vgpu-worker from
DIR too. This is how ci/gpu-check.sh boots the guests on a GPU machine, there also with
--executor remote --worker-executor cuda (the guests through a CUDA worker over loopback).

Prints one line per check, "PASS <vm> <check> <detail>" or "FAIL <vm> <check> <detail>",
and exits non-zero if any check failed.

Options:
  --executor KIND   vhost-vgpu's executor: cpu (default), cuda, auto, or remote (on a
                    vgpu-worker this script starts on 127.0.0.1; see above)
  --worker-executor KIND
                    with --executor remote, the worker's executor: cpu (default), cuda
                    or auto
  --mib N           size of the HTOD/DTOH round trip in MiB (default 64)
  --mixed N         number of mixed requests per guest (default 200)
  --mem SIZE        RAM of each guest (default 512M)
  --timeout SECS    longest wait for one guest phase (default 300)
  --accel ACCEL     QEMU accelerator: tcg (default) or kvm
  --bundle DIR      build nothing: take the guests' files from DIR/guests and
                    vhost-vgpu, vgpu-executor-worker (and vgpu-worker) from DIR
  --kernel-suite SUITE
                    boot the kernel of Debian SUITE (e.g. trixie, trixie-backports)
                    with vgpu.ko built for it (see above)
  --kernel-version KVER|SERIES|newest
                    which kernel: a kernel release (e.g. 7.3.4+deb13-amd64), the newest
                    of a series (e.g. 7, 7.2) or the newest (the default); without
                    --kernel-suite, of this machine's apt sources
  --narrate         explain each step for a person (used by ci/demo.sh)
  --keep            keep the work directory (logs, initramfs) and print its path
  -h, --help        show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (vhost-vgpu's and vgpu-worker's log level, default info).
EOF
}

die() { echo "e2e-qemu.sh: error: $*" >&2; exit 1; }

executor=cpu
worker_executor=
mib=64
mixed=200
mem=512M
timeout=300
accel=tcg
narrate=0
keep=0
bundle=
kernel_suite=
kernel_version=
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --executor) need_arg "$1" $#; executor=$2; shift ;;
        --worker-executor) need_arg "$1" $#; worker_executor=$2; shift ;;
        --mib) need_arg "$1" $#; mib=$2; shift ;;
        --mixed) need_arg "$1" $#; mixed=$2; shift ;;
        --mem) need_arg "$1" $#; mem=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --accel) need_arg "$1" $#; accel=$2; shift ;;
        --bundle) need_arg "$1" $#; bundle=$2; shift ;;
        --kernel-suite) need_arg "$1" $#; kernel_suite=$2; shift ;;
        --kernel-version) need_arg "$1" $#; kernel_version=$2; shift ;;
        --narrate) narrate=1 ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
case $executor in cpu | cuda | auto | remote) ;; *) die "--executor wants cpu, cuda, auto or remote, got '$executor'" ;; esac
if [[ $executor == remote ]]; then
    worker_executor=${worker_executor:-cpu}
    case $worker_executor in cpu | cuda | auto) ;; *) die "--worker-executor wants cpu, cuda or auto, got '$worker_executor'" ;; esac
elif [[ -n $worker_executor ]]; then
    die "--worker-executor goes with --executor remote"
fi
[[ $mib =~ ^[1-9][0-9]*$ ]] || die "--mib wants a positive number, got '$mib'"
[[ $mixed =~ ^[1-9][0-9]*$ ]] || die "--mixed wants a positive number, got '$mixed'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"
if [[ -n $bundle && -n $kernel_suite$kernel_version ]]; then
    die "--bundle brings its own guest kernel: no --kernel-suite or --kernel-version with it"
fi
if [[ -n $bundle ]]; then
    [[ -d $bundle/guests ]] || die "--bundle: $bundle/guests does not exist (build it with ci/gpu-bundle.sh)"
    bundle=$(cd "$bundle" && pwd)
fi

cd "$REPO_DIR"
# Check lines, show() and the work directory come from ci/e2e-lib.sh; ci/test.sh counts
# the PASS/FAIL lines and nothing more.
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
if [[ $executor == remote ]]; then
    e2e_begin e2e-qemu-remote remote
else
    e2e_begin e2e-qemu
fi
e2e_workdir vgpu-e2e
# A paragraph for a person, only with --narrate.
say() {
    [[ $narrate -eq 1 ]] || return 0
    echo
    fold -s -w 88 <<<"$*" | sed 's/^/   /'
    echo
}

# ---- 1. build (ci/e2e-build.sh), or take everything from a bundle --------------------
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
if [[ -n $bundle ]]; then
    if [[ $executor == remote ]]; then
        e2e_use_bundle "$bundle" "${E2E_BUNDLE_REMOTE_BINS[@]}"
    else
        e2e_use_bundle "$bundle"
    fi
else
    e2e_build_all
    [[ $executor == remote ]] && e2e_build_worker
fi
# Check lines on another suite's kernel say so: "k7 vm0 lspci ...".
[[ -n $kernel_suite ]] && e2e_prefix="${e2e_prefix}k${kver%%.*} "

# ---- 2. the backend ---------------------------------------------------------------
export RUST_LOG=${RUST_LOG:-info}
# vhost-vgpu's executor options; with --executor remote, those of the worker's.
backend_executor=(--executor "$executor")
if [[ $executor == remote ]]; then
    step "host: vgpu-worker --executor $worker_executor --listen 127.0.0.1:PORT"
    say "The VMs' work runs on a GPU worker host, reached over the network: here a \
vgpu-worker on the loopback address. vhost-vgpu authenticates with a pre-shared key and \
opens one encrypted connection per guest session; the worker runs each session's \
executor in its own process."
    e2e_worker_keys "$target/vgpu-worker" e2e-qemu || die "vgpu-worker keygen e2e-qemu failed"
    if ! e2e_worker_start "$target/vgpu-worker" "$worker_executor" "$work/vgpu-worker.log"; then
        show "$work/vgpu-worker.log" 20 >&2
        die "$worker_error"
    fi
    worker=$worker_pid
    backend_executor=(--executor "remote:127.0.0.1:$worker_port" --remote-key "$work/mediator.key")
    echo "   vgpu-worker pid $worker: $(sed -n 's/^\[[^]]*\] *//; /serving /p' "$work/vgpu-worker.log" | tail -n 1)"
fi
step "host: vhost-vgpu --socket-count 2 ${backend_executor[*]:0:2}"
say "One vhost-vgpu process serves both VMs: one socket each, so each VM is its own \
tenant with its own memory quota, sessions and handles."
mkdir -p "$work/sockets"
# The daemon listens on PATH0, PATH1, ...; each VM's tenant is named after its socket.
# Its metrics on a loopback port, its control socket beside the VMs' sockets.
metrics_port=$((20000 + $$ % 20000))
control=$work/sockets/vm.control
"$target/vhost-vgpu" --socket-path "$work/sockets/vm" --socket-count 2 \
    "${backend_executor[@]}" --metrics "127.0.0.1:$metrics_port" \
    >"$work/vhost-vgpu.log" 2>&1 &
daemon=$!
pids+=("$daemon")
sockets=("$work/sockets/vm0" "$work/sockets/vm1")
for ((i = 0; i < 100; i++)); do
    [[ -S ${sockets[0]} && -S ${sockets[1]} ]] && break
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
if ! [[ -S ${sockets[0]} && -S ${sockets[1]} ]]; then
    show "$work/vhost-vgpu.log" 20 >&2
    die "vhost-vgpu did not listen on ${sockets[*]}"
fi
echo "   listening on ${sockets[0]##*/} (vm0) and ${sockets[1]##*/} (vm1)"
# With --executor remote: the sessions vhost-vgpu opened on the worker and those that
# ended there (from the worker's log), and the worker's executor processes now.
worker_sessions() {
    opened=$(grep -c "mediator 'e2e-qemu' connected from" "$work/vgpu-worker.log" || true)
    ended=$(grep -cE "mediator 'e2e-qemu' from [^ ]+: " "$work/vgpu-worker.log" || true)
    mapfile -t worker_children < <(e2e_children "$worker")
}
# A CUDA worker keeps started executor processes ready for the next sessions (the pool,
# DEFAULT_CUDA_POOL = 2): that many may be left when no session is.
idle_pool=0
[[ $worker_executor == cuda ]] && idle_pool=2
# Waits up to SECS for the worker to have no executor process left beyond its pool.
worker_drained() { # SECS
    local i n
    for ((i = 0; i < $1 * 10; i++)); do
        n=$(e2e_children "$worker" | wc -l)
        [[ $n -le $idle_pool ]] && return 0
        sleep 0.1
    done
    return 1
}
if [[ $executor == remote ]]; then
    # The daemon took its device from the worker's hello at start.
    # The worker's hello is encrypted under the handshake's keys: the daemon logging what
    # it says proves both sides authenticated. (The worker logs a connection only at its
    # first request, which this one does not send.)
    reached=$(grep -m 1 -o "worker 127\.0\.0\.1:$worker_port: .*" "$work/vhost-vgpu.log" || true)
    if [[ -n $reached ]]; then
        pass "host worker-connected vhost-vgpu authenticated to vgpu-worker pid $worker as 'e2e-qemu'; its log: $reached"
    else
        fail "host worker-connected vhost-vgpu's log names no worker 127.0.0.1:$worker_port"
        show "$work/vgpu-worker.log" 10
    fi
fi

# ---- 3. guests ----------------------------------------------------------------------
declare -A vm_pid vm_log vm_in
# Boots a guest in the background: VM RUN PLAN. Its console goes to $work/VM-RUN.log;
# its console input comes from a FIFO held open on fd vm_in[VM].
boot() {
    local vm=$1 run=$2 plan=$3 sock fifo fd
    case $vm in vm0) sock=${sockets[0]} ;; *) sock=${sockets[1]} ;; esac
    fifo=$work/$vm.in
    if [[ ! -p $fifo ]]; then
        mkfifo "$fifo"
        exec {fd}<>"$fifo"
        vm_in[$vm]=$fd
    fi
    vm_log[$vm]=$work/$vm-$run.log
    bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" \
        --socket "$sock" --mem "$mem" --accel "$accel" \
        --append "VGPU_PLAN=$plan VGPU_MIB=$mib VGPU_MIXED=$mixed VGPU_LOOP_MAX=$((timeout * 3))" \
        <"$fifo" >"${vm_log[$vm]}" 2>&1 &
    vm_pid[$vm]=$!
    pids+=("${vm_pid[$vm]}")
}
# Writes one line to a guest's console.
tell() { echo "$2" >&"${vm_in[$1]}"; }
# Waits until the guest's log matches PATTERN: 0 when it does, 1 when the guest
# stopped first, 2 after SECS.
wait_for() { # VM PATTERN SECS
    local vm=$1 pattern=$2 deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        grep -qE "$pattern" "${vm_log[$vm]}" 2>/dev/null && return 0
        if ! kill -0 "${vm_pid[$vm]}" 2>/dev/null; then
            grep -qE "$pattern" "${vm_log[$vm]}" 2>/dev/null && return 0
            return 1
        fi
        sleep 0.5
    done
    return 2
}
# Waits for a guest's QEMU to exit (it powers off by itself); kills it after SECS.
wait_exit() { # VM SECS
    local vm=$1 deadline=$((SECONDS + $2))
    while kill -0 "${vm_pid[$vm]}" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "   $vm did not power off within $2 s: stopping its QEMU"
            kill "${vm_pid[$vm]}" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    wait "${vm_pid[$vm]}" 2>/dev/null || true
}
# The detail of the guest's result line for CHECK, or nothing.
result_of() { # VM CHECK
    tr -d '\r' <"${vm_log[$1]}" | sed -n "s/^CHECK $2 \(PASS\|FAIL\) //p" | tail -n 1
}
verdict_of() { # VM CHECK
    tr -d '\r' <"${vm_log[$1]}" | sed -n "s/^CHECK $2 \(PASS\|FAIL\) .*/\1/p" | tail -n 1
}
# One PASS/FAIL line per expected check of a guest run.
report() { # VM CHECK...
    local vm=$1 c verdict detail bad=0
    shift
    for c in "$@"; do
        verdict=$(verdict_of "$vm" "$c")
        detail=$(result_of "$vm" "$c")
        case $verdict in
            PASS) pass "$vm $c $detail" ;;
            FAIL) fail "$vm $c $detail"; bad=1 ;;
            *) fail "$vm $c no result from the guest"; bad=1 ;;
        esac
        if [[ $c == *vgpu-smi ]]; then
            tr -d '\r' <"${vm_log[$vm]}" | sed -n 's/^SMI| /    | /p'
        elif [[ $c == cuda-driver-api ]]; then
            tr -d '\r' <"${vm_log[$vm]}" | sed -n 's/^CUDA| /    | /p'
        elif [[ $c == cudarc-context-api ]]; then
            tr -d '\r' <"${vm_log[$vm]}" | sed -n 's/^CUDARC| /    | /p'
        fi
    done
    if [[ $bad -eq 1 ]]; then
        echo "   the end of $vm's console (${vm_log[$vm]##*/}):"
        show "${vm_log[$vm]}" 25
    fi
}
first_checks=(lspci vgpu-smi vector-add "htod-dtoh-${mib}MiB" "mixed-$mixed" c-builtin-kernel
              cuda-driver-api cudarc-context-api parallel-1-16MiB parallel-2-16MiB parallel-3-16MiB killed-process bench-32MiB)
reboot_checks=(reboot-lspci reboot-vgpu-smi reboot-vector-add "reboot-mixed-$mixed")

step "boot vm0 and vm1 at the same time (${accel^^})"
say "Each guest is QEMU with -device vhost-user-test-device-pci,virtio-id=22 on its own \
socket and its RAM in a shared memfd, so the backend can read and write guest buffers \
in place. Inside, the busybox init loads virtio PCI and vgpu.ko, then runs the checks \
of ci/guest/e2e-guest.sh."
phase_start=$SECONDS
boot vm0 1 first-loop
boot vm1 1 first-wait
# vm1 finishes its checks and waits for POWEROFF; vm0 finishes and starts its loop.
rc1=0
wait_for vm1 '^WAITING-FOR-POWEROFF' "$timeout" || rc1=$?
rc0=0
wait_for vm0 '^LOOP-START|CHECK requests-during-reboot ' "$((timeout - (SECONDS - phase_start)))" || rc0=$?
echo "   both guests ran their checks in $((SECONDS - phase_start)) s"
[[ $rc0 -ne 2 && $rc1 -ne 2 ]] || echo "   timed out after $timeout s (vm0: $rc0, vm1: $rc1)"

step "results of the first boot"
say "lspci is pciutils' lspci -nn in the guest: QEMU's generic vhost-user device with \
virtio ID 22 is PCI device 1af4:1056, a communication controller. vgpu-smi reads the \
device's config space and the host's INFO reply; vgpu-vector-add runs the built-in \
vector_add_f32 kernel and checks every element; the round trip copies ${mib} MiB into \
device memory and back and compares checksums; the mixed requests interleave alloc, \
copies, four built-in kernels, sync and free; the C program uses only vgpu.h and libvgpu."
report vm0 "${first_checks[@]}"
report vm1 "${first_checks[@]}"
if [[ $executor == remote ]]; then
    # vm1 waits with one process holding 16 MiB: a session, and so an executor process,
    # on the worker.
    worker_sessions
    if kill -0 "$worker" 2>/dev/null && [[ $opened -ge 2 && ${#worker_children[@]} -ge 1 ]]; then
        pass "host worker-sessions the guests' sessions ran on vgpu-worker pid $worker: $opened connections from vhost-vgpu so far, $ended ended; ${#worker_children[@]} executor processes there now (pids ${worker_children[*]}; vm1's 16 MiB among them)"
    else
        fail "host worker-sessions vgpu-worker pid $worker: $opened connections from vhost-vgpu, $ended ended, executor processes there: ${worker_children[*]:-none}"
        show "$work/vgpu-worker.log" 10
    fi
fi

step "operate: the daemon's metrics and vgpu-admin, against what vm1 does"
say "vm1 is idle now (one of its processes holds 16 MiB of device memory). The host \
reads vhost-vgpu's Prometheus metrics, asks vm1 for one vgpu-vector-add and reads them \
again: vm1's counters must have grown by exactly that program's work. Then vgpu-admin \
lists both VMs through the control socket, lowers vm1's memory quota, and vgpu-smi in \
vm1 must report the new quota."
# GET /metrics from the daemon, over bash's /dev/tcp.
scrape() {
    local fd
    exec {fd}<>"/dev/tcp/127.0.0.1/$metrics_port" || return 1
    printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&"$fd"
    tr -d '\r' <&"$fd"
    exec {fd}>&-
}
# The sum of the samples of metric NAME whose labels include every one of LABELS
# (each written as name="value"), in the metrics TEXT.
metric() { # TEXT NAME LABEL...
    local text=$1 name=$2
    shift 2
    awk -v name="$name" -v want="$*" '
        BEGIN { n = split(want, labels, " ") }
        index($0, name "{") == 1 || $1 == name {
            for (i = 1; i <= n; i++) if (index($0, labels[i]) == 0) next
            sum += $NF
        }
        END { printf "%.0f\n", sum }' <<<"$text"
}
elements=65536
if ! metrics_before=$(scrape) || [[ $metrics_before != *vgpu_requests_total* ]]; then
    fail "host metrics-scrape no metrics from http://127.0.0.1:$metrics_port/metrics"
    show "$work/vhost-vgpu.log" 10
elif ! grep -q '^WAITING-FOR-POWEROFF' "${vm_log[vm1]}"; then
    fail "host metrics-vector-add vm1 is not waiting for the host"
else
    tell vm1 VECTOR-ADD
    wait_for vm1 '^DONE VECTOR-ADD' 120 || true
    metrics_after=$(scrape || true)
    report vm1 host-vector-add
    delta() { # NAME LABEL...
        echo $(($(metric "$metrics_after" "$@") - $(metric "$metrics_before" "$@")))
    }
    vm='vm="vm1"'
    launches=$(delta vgpu_kernel_launches_total "$vm")
    htod=$(delta vgpu_copied_bytes_total "$vm" 'direction="htod"')
    dtoh=$(delta vgpu_copied_bytes_total "$vm" 'direction="dtoh"')
    requests=$(delta vgpu_requests_total "$vm")
    ok=$(delta vgpu_requests_total "$vm" 'status="ok"')
    allocs=$(delta vgpu_requests_total "$vm" 'op="alloc"' 'status="ok"')
    timed=$(delta vgpu_request_duration_seconds_count "$vm")
    # Buffers: the 16 MiB vm1's long-lived session holds. Contexts are charged on top of
    # it by the CUDA executor (nothing on the CPU executor); the kinds add up to the total.
    used=$(metric "$metrics_after" vgpu_memory_used_bytes "$vm")
    buffers=$(metric "$metrics_after" vgpu_memory_charged_bytes "$vm" 'kind="buffers"')
    contexts=$(metric "$metrics_after" vgpu_memory_charged_bytes "$vm" 'kind="contexts"')
    kinds=0
    for kind in buffers contexts modules local; do
        kinds=$((kinds + $(metric "$metrics_after" vgpu_memory_charged_bytes "$vm" "kind=\"$kind\"")))
    done
    held=$((16 << 20))
    detail="vm1 ran one vgpu-vector-add of $elements floats: launches +$launches, HTOD +$htod B, DTOH +$dtoh B, requests +$requests ($ok OK, $allocs allocations, $timed timed), memory used $used B ($buffers B buffers, $contexts B contexts)"
    if [[ $launches -eq 1 && $htod -eq $((2 * 4 * elements)) && $dtoh -eq $((4 * elements)) &&
          $requests -gt 0 && $ok -eq $requests && $allocs -eq 3 && $timed -eq $requests &&
          $buffers -eq $held && $used -eq $kinds ]]; then
        pass "host metrics-match-guest $detail (the 16 MiB still held)"
    else
        fail "host metrics-match-guest $detail; expected launches +1, HTOD +$((8 * elements)), DTOH +$((4 * elements)), every request OK and timed, 3 allocations, $held B of buffers held, the kinds adding up to the total ($kinds B)"
    fi
    # An excerpt of what a scrape shows, for the log.
    echo "   /metrics after vm1's vector add (excerpt):"
    grep -E '^vgpu_(kernel_launches_total|copied_bytes_total|memory_(used|quota)_bytes|device_time_seconds_total|weight|sessions)\{vm="vm1"' <<<"$metrics_after" | sed 's/^/    | /' | head -20
    grep -E '^vgpu_requests_total\{.*vm="vm1"' <<<"$metrics_after" | sed 's/^/    | /' | head -12
    # The control socket: both VMs listed, vm1's quota lowered and seen by the guest.
    if [[ ! -x $target/vgpu-admin ]]; then
        echo "   note: no $target/vgpu-admin: the vgpu-admin checks are skipped"
    elif ! "$target/vgpu-admin" --control "$control" >"$work/admin.out" 2>&1; then
        fail "host vgpu-admin-list $(tail -n 1 "$work/admin.out")"
    else
        sed 's/^/    | /' "$work/admin.out"
        if grep -qE '^vm0 ' "$work/admin.out" && grep -qE '^vm1 ' "$work/admin.out"; then
            pass "host vgpu-admin-list both VMs listed"
        else
            fail "host vgpu-admin-list vm0 and vm1 not both listed"
        fi
        # Room for what vm1 holds and for vgpu-smi's own session (a context on CUDA),
        # then the quota vm1 had, so the reboot below runs as before.
        sessions=$(metric "$metrics_after" vgpu_sessions "$vm")
        per_context=$((sessions > 0 ? contexts / sessions : 0))
        quota_mib=$(((used + per_context + (64 << 20) + (1 << 20) - 1) >> 20))
        quota_before=$(metric "$metrics_after" vgpu_memory_quota_bytes "$vm")
        if "$target/vgpu-admin" --control "$control" set vm1 --quota "${quota_mib}M" >"$work/admin-set.out" 2>&1; then
            tell vm1 SMI
            wait_for vm1 '^DONE SMI' 60 || true
            smi_quota=$(tr -d '\r' <"${vm_log[vm1]}" | sed -n 's/^SMI2| *memory quota *//p' | tail -n 1)
            if [[ $smi_quota == "$quota_mib MiB"* ]]; then
                pass "host vgpu-admin-quota $(head -n 1 "$work/admin-set.out"); vm1's vgpu-smi: memory quota $smi_quota"
            else
                fail "host vgpu-admin-quota vm1's vgpu-smi shows memory quota '${smi_quota:-nothing}' after vgpu-admin set vm1 --quota ${quota_mib}M"
                tr -d '\r' <"${vm_log[vm1]}" | grep '^SMI2|' | sed 's/^/    | /'
            fi
        else
            fail "host vgpu-admin-quota $(tail -n 1 "$work/admin-set.out")"
        fi
        "$target/vgpu-admin" --control "$control" set vm1 --quota "$quota_before" >/dev/null ||
            fail "host vgpu-admin-restore could not give vm1 its quota of $quota_before B back"
    fi
fi

step "power vm1 off and boot it again while vm0 keeps sending requests"
say "vm0 now submits batches of mixed requests in a loop. vm1 powers off while one of \
its processes still holds 16 MiB of device memory: its QEMU exits, the vhost-user \
connection closes and the backend frees everything vm1 had. A new QEMU then boots vm1 \
again on the same socket: the backend must serve the new connection, vgpu-smi there must \
show no allocations left over, and vm0 must not notice."
reboot_start=$SECONDS
loop_running=0
if [[ $rc0 -eq 0 ]] && grep -q '^LOOP-START' "${vm_log[vm0]}"; then
    loop_running=1
    sleep 3
    tell vm0 "MARK poweroff"
fi
tell vm1 POWEROFF
wait_exit vm1 60
echo "   vm1 powered off after $((SECONDS - reboot_start)) s"
if ! kill -0 "$daemon" 2>/dev/null; then
    echo "   vhost-vgpu is no longer running; the end of its log:"
    show "$work/vhost-vgpu.log" 20
fi
boot vm1 2 reboot
rc1=0
wait_for vm1 '^GUEST-EXIT' "$timeout" || rc1=$?
wait_exit vm1 30
echo "   vm1 booted again and ran its checks in $((SECONDS - reboot_start)) s"
# Without the backend vm0's requests never complete: do not wait long for it then.
grace=60
kill -0 "$daemon" 2>/dev/null || grace=5
if [[ $loop_running -eq 1 ]]; then
    tell vm0 "MARK rebooted"
    wait_for vm0 '^LOOP-MARK rebooted' "$grace" || true
    tell vm0 STOP
fi
# vm0 stays up after its loop (holding device memory) for the backend restart below.
wait_for vm0 '^WAITING-FOR-POWEROFF|^GUEST-EXIT' "$grace" || true

step "results of the reboot"
if [[ $narrate -eq 1 ]]; then
    echo "   what vhost-vgpu logged about the VMs' connections:"
    grep -E 'VM (connected|disconnected)' "$work/vhost-vgpu.log" | sed 's/^\[[^]]*\] */    | /'
fi
report vm1 "${reboot_checks[@]}"
# vm0's loop: its own verdict, and requests must have completed while vm1 was away.
loop_verdict=$(verdict_of vm0 requests-during-reboot)
loop_detail=$(result_of vm0 requests-during-reboot)
mark() { tr -d '\r' <"${vm_log[vm0]}" | sed -n "s/^LOOP-MARK $1 requests=\([0-9]*\).*/\1/p" | tail -n 1; }
before=$(mark poweroff)
after=$(mark rebooted)
if [[ -z $loop_verdict ]]; then
    fail "vm0 requests-during-reboot no result from the guest"
    show "${vm_log[vm0]}" 25
elif [[ $loop_verdict == FAIL ]]; then
    fail "vm0 requests-during-reboot $loop_detail"
    show "${vm_log[vm0]}" 25
elif [[ -z $before || -z $after ]] || ((after <= before)); then
    fail "vm0 requests-during-reboot no requests completed while vm1 was off and rebooting (${before:-?} -> ${after:-?}); $loop_detail"
else
    pass "vm0 requests-during-reboot $((after - before)) requests while vm1 was powered off and booted again; in all $loop_detail"
fi
if ! kill -0 "$daemon" 2>/dev/null; then
    echo "   vhost-vgpu exited during the run; the end of its log:"
    show "$work/vhost-vgpu.log" 20
fi
if [[ $failed -gt 0 ]]; then
    echo "   the end of vhost-vgpu's log:"
    show "$work/vhost-vgpu.log" 15
fi

# ---- 4. backend restart under a running guest -------------------------------------
step "restart vhost-vgpu under vm0 (same QEMU, no reboot)"
say "vm0 still runs, and one of its processes holds 16 MiB of device memory. vhost-vgpu \
now stops (SIGTERM: its sockets go away, every session and allocation with it) and a new \
vhost-vgpu starts on the same socket paths. vm0's QEMU, with chardev reconnect and the \
reconnect fix, must connect to the new daemon by itself and set the device up again; \
in vm0 a new vgpu-vector-add must pass and vgpu-smi must show the new daemon's fresh \
mediator: no allocations."
# Stops the running daemon with SIGTERM and starts a new one on the same socket paths.
# Sets restart_note (evidence) or restart_error (why not), daemon to the new PID, and
# keeps pids (what cleanup kills) free of the old PID.
restart_note=
restart_error=
restart_backend() {
    local old=$daemon p old_rc=0 kept=() t0 down held_on_worker=0
    if [[ $executor == remote ]]; then
        worker_sessions
        held_on_worker=${#worker_children[@]}
    fi
    t0=$SECONDS
    kill -TERM "$old" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$old" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$old" 2>/dev/null; then
        kill -KILL "$old" 2>/dev/null || true
        restart_error="vhost-vgpu (pid $old) did not exit within 10 s of SIGTERM"
    fi
    wait "$old" 2>/dev/null || old_rc=$?
    for p in "${pids[@]}"; do
        [[ $p == "$old" ]] || kept+=("$p")
    done
    pids=("${kept[@]}")
    [[ -z $restart_error ]] || return 0
    if [[ $old_rc -ne 0 ]]; then
        restart_error="vhost-vgpu (pid $old) exited with status $old_rc on SIGTERM"
        return 0
    fi
    if [[ -e ${sockets[0]} ]]; then
        restart_error="vhost-vgpu (pid $old) left ${sockets[0]##*/} behind"
        return 0
    fi
    if [[ $executor == remote ]]; then
        # The stopped daemon's connections are gone: the worker ends their sessions
        # (vm0's held 16 MiB among them) and their executor processes.
        worker_drained 10 || true
        worker_sessions
        if [[ ${#worker_children[@]} -le $idle_pool && $opened -eq $ended ]]; then
            pass "host worker-freed-on-daemon-stop within $((SECONDS - t0)) s of the old vhost-vgpu's SIGTERM the worker ended its sessions (executor processes before: $held_on_worker, vm0's held 16 MiB; now: ${#worker_children[@]}, the pool keeps $idle_pool), all $opened connections from 'e2e-qemu' ended (its log)"
        else
            fail "host worker-freed-on-daemon-stop $((SECONDS - t0)) s after vhost-vgpu's SIGTERM the worker still runs executor processes ${worker_children[*]:-none}; its log: $opened connections, $ended ended"
            show "$work/vgpu-worker.log" 10
        fi
    fi
    # A moment without a backend: QEMU sees the connection closed and retries.
    sleep 2
    "$target/vhost-vgpu" --socket-path "$work/sockets/vm" --socket-count 2 \
        "${backend_executor[@]}" --metrics "127.0.0.1:$metrics_port" \
        >"$work/vhost-vgpu-2.log" 2>&1 &
    daemon=$!
    pids+=("$daemon")
    for ((i = 0; i < 100; i++)); do
        [[ -S ${sockets[0]} ]] && break
        kill -0 "$daemon" 2>/dev/null || break
        sleep 0.1
    done
    if ! [[ -S ${sockets[0]} ]]; then
        restart_error="the new vhost-vgpu (pid $daemon) did not listen on ${sockets[0]##*/}"
        return 0
    fi
    down=$((SECONDS - t0))
    # QEMU retries every second (launch-vm.sh's reconnect-ms=1000).
    for ((i = 0; i < 300; i++)); do
        grep -q 'vm0: VM connected' "$work/vhost-vgpu-2.log" && break
        kill -0 "$daemon" 2>/dev/null || break
        kill -0 "${vm_pid[vm0]}" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q 'vm0: VM connected' "$work/vhost-vgpu-2.log"; then
        restart_error="vm0's QEMU did not connect to the new vhost-vgpu (pid $daemon) within 30 s"
        return 0
    fi
    restart_note="vhost-vgpu pid $old stopped by SIGTERM (exit 0), pid $daemon on the same socket; QEMU pid ${vm_pid[vm0]} reconnected $((SECONDS - t0)) s after the stop (backend down ${down} s)"
}
if [[ $reconnect != on ]]; then
    echo "note: vm0 backend-restart skipped: $qemu lacks the reconnect fix (no reconnect-ok marker)"
else
    restart_start=$SECONDS
    boots=$(grep -c '^GUEST-START' "${vm_log[vm0]}" || true)
    if ! kill -0 "${vm_pid[vm0]}" 2>/dev/null || ! grep -q '^WAITING-FOR-POWEROFF' "${vm_log[vm0]}"; then
        restart_error="vm0 was not running and waiting after its request loop"
    elif ! kill -0 "$daemon" 2>/dev/null; then
        restart_error="vhost-vgpu had exited before the restart"
    else
        restart_backend
    fi
    if [[ -z $restart_error ]]; then
        tell vm0 BACKEND-RESTARTED
        wait_for vm0 '^CHECK backend-restart-smi |^CHECK backend-restart FAIL' 90 || true
        echo "   vm0's checks after the restart took $((SECONDS - restart_start)) s"
        if [[ $narrate -eq 1 ]]; then
            echo "   what the new vhost-vgpu logged about the VMs' connections:"
            grep -E 'VM (connected|disconnected)' "$work/vhost-vgpu-2.log" | sed 's/^\[[^]]*\] */    | /'
        fi
        va_verdict=$(verdict_of vm0 backend-restart)
        va_detail=$(result_of vm0 backend-restart)
        boots_now=$(grep -c '^GUEST-START' "${vm_log[vm0]}" || true)
        if [[ -z $va_verdict ]]; then
            restart_error="no result from the guest after the restart; $restart_note"
        elif [[ $va_verdict == FAIL ]]; then
            restart_error="$va_detail; $restart_note"
        elif [[ $boots_now != "$boots" ]]; then
            restart_error="vm0 booted again ($boots -> $boots_now boots): not the same guest"
        elif ! kill -0 "${vm_pid[vm0]}" 2>/dev/null; then
            restart_error="vm0's QEMU exited during the check; $va_detail"
        fi
    fi
    if [[ -n $restart_error ]]; then
        fail "vm0 backend-restart $restart_error"
        echo "   the end of vm0's console (${vm_log[vm0]##*/}):"
        show "${vm_log[vm0]}" 25
        echo "   the end of the first vhost-vgpu's log:"
        show "$work/vhost-vgpu.log" 10
        if [[ -f $work/vhost-vgpu-2.log ]]; then
            echo "   the end of the new vhost-vgpu's log:"
            show "$work/vhost-vgpu-2.log" 15
        fi
    else
        pass "vm0 backend-restart $restart_note; in vm0 (same boot): $va_detail"
        report vm0 backend-restart-smi
        tr -d '\r' <"${vm_log[vm0]}" | sed -n '/^CHECK backend-restart /,$s/^SMI| /    | /p'
    fi
fi

# vm0 powers off (its hold process still open) as vm1 did.
if kill -0 "${vm_pid[vm0]}" 2>/dev/null; then
    tell vm0 POWEROFF
    wait_for vm0 '^GUEST-EXIT' 30 || true
fi
wait_exit vm0 10
if [[ $executor == remote ]]; then
    # Both guests are off: nothing of theirs may be left on the worker.
    worker_drained 10 || true
    worker_sessions
    if kill -0 "$worker" 2>/dev/null && [[ ${#worker_children[@]} -le $idle_pool && $opened -eq $ended && $opened -gt 0 ]]; then
        pass "host worker-sessions-ended both guests off: all $opened connections the daemons opened to the worker ended (its log), ${#worker_children[@]} executor processes left there (the pool keeps $idle_pool); vgpu-worker pid $worker served the whole run"
    elif ! kill -0 "$worker" 2>/dev/null; then
        fail "host worker-sessions-ended vgpu-worker pid $worker exited during the run"
        show "$work/vgpu-worker.log" 15
    else
        fail "host worker-sessions-ended both guests off, but the worker still runs executor processes ${worker_children[*]:-none}; its log: $opened connections, $ended ended"
        show "$work/vgpu-worker.log" 10
    fi
fi

step "done: $passed passed, $failed failed (guest kernel $kver${kernel_suite:+ from Debian $kernel_suite})"
[[ $failed -eq 0 ]]
