#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check of the remote-executor layout of qemu-configs/xcp-ng.md: the GPU is
# passed through to a worker VM that runs vgpu-worker, and the mediator and the NFS export
# run in Dom0 (here: this host), with two TCG guests on QEMU's user-mode network:
#
#   worker  vgpu-worker --executor cpu --listen 0.0.0.0:7701 (each session's executor in
#           its own vgpu-executor-worker process, as user vgpu-worker), reached from the
#           host through QEMU's hostfwd=tcp:127.0.0.1:PORT-:7701
#   host    vgpu-mediator --executor remote:127.0.0.1:PORT info and sanity; nfs-ganesha
#           exporting ROOT/vm1; vgpu-mediator --executor remote:127.0.0.1:PORT serve
#           --nfs-root ROOT --vm vm1 (Noise handshake with a pre-shared key per mediator)
#   client  (vm1) mounts the export from 10.0.2.2, vgpu-nfs-client commands 1 and 2, a
#           few more in a row; then the host quits the worker's QEMU: the next command
#           is answered with an error, not left waiting; the host starts the worker again
#           on the same port: command 1 passes again once the mediator has reconnected.
#
# One "PASS remote-vm <check> <detail>" or "FAIL remote-vm <check> <detail>" line per
# check (ci/test.sh counts them), then a final "PASS e2e-remote-vm ..." or
# "FAIL e2e-remote-vm ..." line; exits non-zero on any failure.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds vgpu-worker, vgpu-executor-worker, vgpu-mediator and vgpu-nfs-client (cargo build
--release), installs nfs-ganesha and nfs-ganesha-vfs if missing, fetches the guest kernel
(ci/guest-kernel.sh) and QEMU (qemu-configs/build-qemu.sh), makes a key
(vgpu-worker keygen), builds two initramfs images (ci/mkinitramfs.sh with
ci/guest/remote-vm-worker.sh and ci/guest/remote-vm-client.sh), then:

  worker QEMU:  -netdev user,hostfwd=tcp:127.0.0.1:WORKER-PORT-:7701; vgpu-worker with
                the CPU executor and the key in /etc/vgpu/worker.keys
  host:         vgpu-mediator --executor remote:127.0.0.1:WORKER-PORT info (the worker's
                CPU executor) and sanity (a clear FAIL: no GPU there); ganesha.nfsd
                exporting ROOT/vm1 as /vgpu/vm1 on 127.0.0.1:NFS-PORT; vgpu-mediator
                --executor remote:127.0.0.1:WORKER-PORT serve --nfs-root ROOT --vm vm1
  client QEMU:  -netdev user (10.0.2.2 = the host), a second serial port for the host's
                word (SERVING, WORKER-DOWN); once the mediator serves: mount,
                vgpu-nfs-client --command 1 and 2 and six more, KILL-WORKER, five
                more commands (error answers), START-WORKER, command 1 once a second
                until it passes (error answers, never a wait, while the worker boots)
  host:         on KILL-WORKER quits the worker's QEMU; on START-WORKER starts it again
                on the same port

Options:
  --port N          NFS port on 127.0.0.1 (default 12249; the next free one if taken)
  --worker-port N   the worker's forwarded port on 127.0.0.1 (default 12270; the next
                    free one if taken)
  --timeout SECS    longest wait for the whole guest phase (default 360)
  --keep            keep the work directory (logs, export, initramfs images) and print
                    its path
  -h, --help        show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (the mediator's and the worker's, default info).
EOF
}

die() { echo "e2e-remote-vm.sh: error: $*" >&2; exit 1; }

port=12249
wport=12270
timeout=360
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) need_arg "$1" $#; port=$2; shift ;;
        --worker-port) need_arg "$1" $#; wport=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
for p in "$port" "$wport"; do
    if ! [[ $p =~ ^[1-9][0-9]*$ ]] || ((p > 65535)); then
        die "--port and --worker-port want a port number, got '$p'"
    fi
done
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-remote-vm remote-vm
e2e_workdir vgpu-e2e-remote-vm

# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"

# ---- 1. build and fetch ----------------------------------------------------------------
step "setup: host packages and the Rust toolchain"
quiet setup "$work/setup.log" bash ci/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

step "build: vgpu-worker, vgpu-executor-worker, vgpu-mediator, vgpu-nfs-client (cargo build --release)"
quiet build "$work/cargo.log" cargo build --release --locked -p vgpu-mediator -p vgpu-nfs \
    -p vgpu-guest --bin vgpu-worker --bin vgpu-executor-worker --bin vgpu-mediator \
    --bin vgpu-nfs-client
target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
for f in vgpu-worker vgpu-executor-worker vgpu-mediator vgpu-nfs-client; do
    [[ -x $target/$f ]] || abort build "cargo build did not produce $target/$f"
done

step "NFS server: nfs-ganesha with its VFS backend"
if ! command -v ganesha.nfsd >/dev/null || [[ -n $(apt_missing nfs-ganesha-vfs) ]]; then
    [[ $(id -u) -eq 0 ]] || abort ganesha "nfs-ganesha is not installed and this is not root"
    quiet ganesha "$work/apt.log" apt_install nfs-ganesha nfs-ganesha-vfs
fi
ganesha=$(command -v ganesha.nfsd) || abort ganesha "ganesha.nfsd not found after installing nfs-ganesha"
echo "   $ganesha ($(dpkg-query -W -f='${Version}' nfs-ganesha))"

step "guest kernel (ci/guest-kernel.sh) and QEMU (qemu-configs/build-qemu.sh)"
kenv=$(bash ci/guest-kernel.sh --no-headers 2>"$work/guest-kernel.log") ||
    abort guest-kernel "ci/guest-kernel.sh failed" "$work/guest-kernel.log"
kver=$(sed -n 's/^KVER=//p' <<<"$kenv")
kdir=$(sed -n 's/^KDIR=//p' <<<"$kenv")
kernel=$(sed -n 's/^KERNEL=//p' <<<"$kenv")
[[ -n $kver && -f $kernel ]] || abort guest-kernel "ci/guest-kernel.sh gave no usable kernel: $kenv"
qemu=$(bash qemu-configs/build-qemu.sh --print-path 2>"$work/build-qemu.log") ||
    abort qemu "qemu-configs/build-qemu.sh failed" "$work/build-qemu.log"
echo "   kernel $kver; $("$qemu" --version | sed -n 1p)"

step "key: vgpu-worker keygen (the worker's key file and the mediator's, one line)"
# One mediator, one line NAME KEY: the worker's --keys file and the mediator's
# --remote-key file hold the same line, readable by their owner only.
keys=$work/remote.key
(umask 077 && "$target/vgpu-worker" keygen dom0 >"$keys") 2>"$work/keygen.log" ||
    abort keygen "vgpu-worker keygen dom0 failed" "$work/keygen.log"
[[ $(awk 'NR == 1 { print $1 }' "$keys") == dom0 ]] || abort keygen "vgpu-worker keygen printed no line 'dom0 KEY'"
echo "   $(stat -c '%A' "$keys") $(awk '{ print $1, substr($2, 1, 8) "..." }' "$keys")"

step "initramfs: worker (virtio_net, vgpu-worker, vgpu-executor-worker, its key) and client (nfsv4, vgpu-nfs-client)"
mkdir -p "$work/bin"
for f in vgpu-worker vgpu-executor-worker vgpu-nfs-client; do
    cp "$target/$f" "$work/bin/$f"
    strip --strip-debug "$work/bin/$f"
done
# vgpu-worker finds vgpu-executor-worker beside itself.
quiet initramfs "$work/mkinitramfs-worker.log" bash ci/mkinitramfs.sh "$work/worker.cpio.gz" \
    --kdir "$kdir" --kver "$kver" --module virtio_net \
    --bin "$work/bin/vgpu-worker:/usr/bin/vgpu-worker" \
    --bin "$work/bin/vgpu-executor-worker:/usr/bin/vgpu-executor-worker" \
    --file "$keys:/etc/vgpu/worker.keys" --init ci/guest/remote-vm-worker.sh
quiet initramfs "$work/mkinitramfs-client.log" bash ci/mkinitramfs.sh "$work/client.cpio.gz" \
    --kdir "$kdir" --kver "$kver" --module virtio_net --module nfsv4 \
    --bin "$work/bin/vgpu-nfs-client:/usr/bin/vgpu-nfs-client" \
    --init ci/guest/remote-vm-client.sh
echo "   $(du -h "$work/worker.cpio.gz" | cut -f1) worker.cpio.gz, $(du -h "$work/client.cpio.gz" | cut -f1) client.cpio.gz"

# ---- 2. ports and the NFS server ----------------------------------------------------------
# Whether something listens on 127.0.0.1:PORT or on every address (read from /proc, IPv4
# and IPv6: ganesha binds ::ffff:127.0.0.1; a probe connection to the worker's port would
# reach vgpu-worker as a failed handshake).
listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p="$hex" '$4 == "0A" && ($2 ~ ("^0*(0100007F)?:" p "$") || $2 ~ ("^0+FFFF00000100007F:" p "$")) { found = 1 }
        END { exit !found }' /proc/net/tcp /proc/net/tcp6
}
# Free: nothing listens on it, and no connection uses it either.
port_free() {
    local hex
    hex=$(printf '%04X' "$1")
    ! awk -v p=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6
}
pick_port() { # FIRST
    local p
    for ((p = $1; p < $1 + 20; p++)); do
        port_free "$p" && { echo "$p"; return 0; }
    done
    return 1
}
port=$(pick_port "$port") || abort ports "ports from --port on 127.0.0.1 are all taken"
wport=$(pick_port "$wport") || abort ports "ports from --worker-port on 127.0.0.1 are all taken"
[[ $port != "$wport" ]] || abort ports "--port and --worker-port are the same ($port)"

step "host: ganesha.nfsd exports ROOT/vm1 as /vgpu/vm1 on 127.0.0.1:$port"
# As in qemu-configs/xcp-ng.md: one export per VM directory, only to its VM, with root
# squashed to 65534, which owns the directory; the root itself is not exported. The
# client's connections come from 127.0.0.1 (QEMU's user-mode network).
root=$work/export
e2e_ganesha_conf "$root" "$port" 1
"$ganesha" -F -f "$work/ganesha.conf" -L "$work/ganesha.log" -p "$work/ganesha.pid" \
    >"$work/ganesha.out" 2>&1 &
ganesha_pid=$!
pids+=("$ganesha_pid")
for ((i = 0; i < 100; i++)); do
    listening "$port" && break
    kill -0 "$ganesha_pid" 2>/dev/null || break
    sleep 0.1
done
if ! listening "$port"; then
    cat "$work/ganesha.out" >>"$work/ganesha.log" 2>/dev/null || true
    abort ganesha "ganesha.nfsd does not listen on 127.0.0.1:$port" "$work/ganesha.log"
fi
echo "   ganesha listening on 127.0.0.1:$port"

# ---- 3. the guests and the host's mediator -----------------------------------------------
launch() { # LOG INITRD APPEND QEMU-ARGS...
    local log=$1 initrd=$2 append=$3
    shift 3
    bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$initrd" \
        --no-vgpu --mem 512M --append "$append" -- "$@" </dev/null >"$log" 2>&1 &
    launched=$!
    pids+=("$launched")
}
seen() { [[ -f $1 ]] && tr -d '\r' <"$1" | grep -q -E "$2"; } # LOG REGEX
# stop PID: pulls the plug of a QEMU (SIGTERM: it quits at once, as its `quit` does).
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
remote=remote:127.0.0.1:$wport
mediator() { "$target/vgpu-mediator" --executor "$remote" --remote-key "$keys" "$@"; }

client_log=$work/client.log
worker1_log=$work/worker-1.log
worker2_log=$work/worker-2.log
: >"$client_log"
: >"$worker1_log"
: >"$worker2_log"
# The host's answers to the client: its second serial port reads ctl.in (QEMU's pipe
# chardev). Held open read-write here, so that writing never waits for a reader.
serving=NOT-SERVING
mkfifo "$work/ctl.in" "$work/ctl.out"
exec 7<>"$work/ctl.in"
tell_client() { echo "$1" >&7; }
net_worker=(-netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$wport-:7701"
    -device "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:04:01")
net_client=(-netdev "user,id=n0" -device "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:04:02"
    -chardev "pipe,id=ctl,path=$work/ctl" -device "isa-serial,chardev=ctl,index=1")

step "guests: worker (127.0.0.1:$wport forwarded to its 7701) and client, both TCG"
guest_start=$SECONDS
launch "$worker1_log" "$work/worker.cpio.gz" "VGPU_BOOT=1" "${net_worker[@]}"
worker_pid=$launched
launch "$client_log" "$work/client.cpio.gz" "VGPU_NFS_PORT=$port VGPU_WAIT=$timeout" "${net_client[@]}"
client_pid=$launched

# The worker's first boot: its vgpu-worker listens.
while ! seen "$worker1_log" '^(WORKER-READY|WORKER-FAILED)'; do
    if ! kill -0 "$worker_pid" 2>/dev/null || ((SECONDS - guest_start >= timeout)); then
        break
    fi
    sleep 0.5
done
if ! seen "$worker1_log" '^WORKER-READY'; then
    fail "worker-up the worker guest did not start vgpu-worker within $((SECONDS - guest_start)) s"
    show "$worker1_log" 30
    verdict worker-up || true
    exit 1
fi
worker_ready=$((SECONDS - guest_start))
echo "   worker ready after $worker_ready s"
if listening "$wport"; then
    pass "worker-up vgpu-worker listens in the worker guest (ready after $worker_ready s); its QEMU forwards 127.0.0.1:$wport to it"
else
    fail "worker-up the worker's QEMU does not listen on 127.0.0.1:$wport"
fi

step "host: vgpu-mediator --executor $remote info and sanity"
# info: the first handshake through the forwarded port (tried again for up to 60 s).
info_rc=0
mediator --remote-wait 60 info >"$work/info.out" 2>"$work/info.log" || info_rc=$?
if [[ $info_rc -eq 0 ]] && grep -q '^executor: cpu$' "$work/info.out" &&
    grep -q "^isolation: .*127.0.0.1:$wport" "$work/info.out"; then
    pass "host-info vgpu-mediator --executor $remote info: $(tr '\n' '|' <"$work/info.out" | sed 's/|$//; s/|/; /g')"
else
    fail "host-info vgpu-mediator --executor $remote info: exit $info_rc: $(tr '\n' ' ' <"$work/info.out")"
    show "$work/info.log" 10
fi
# sanity: a worker with the CPU executor is no GPU: FAIL, exit 1, and it says why.
sanity_rc=0
mediator sanity >"$work/sanity.out" 2>&1 || sanity_rc=$?
if [[ $sanity_rc -eq 1 ]] && grep -q '^SANITY FAIL$' "$work/sanity.out" &&
    grep -q "^FAIL: .*CPU reference executor" "$work/sanity.out"; then
    pass "host-sanity-cpu-worker vgpu-mediator --executor $remote sanity: exit 1: $(tr '\n' ' ' <"$work/sanity.out")"
else
    fail "host-sanity-cpu-worker vgpu-mediator --executor $remote sanity: exit $sanity_rc (expected 1, a FAIL naming the CPU executor): $(tr '\n' ' ' <"$work/sanity.out")"
fi

step "host: vgpu-mediator --executor $remote serve --nfs-root ROOT --vm vm1"
RUST_LOG=${RUST_LOG:-info} "$target/vgpu-mediator" --executor "$remote" --remote-key "$keys" \
    --remote-wait 60 serve --nfs-root "$root" --vm vm1 --poll-ms 100 >"$work/mediator.log" 2>&1 &
mediator_pid=$!
pids+=("$mediator_pid")
for ((i = 0; i < 600; i++)); do
    [[ $(cat "$root/vm1/response.txt" 2>/dev/null) == 0:Ready ]] && break
    kill -0 "$mediator_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ $(cat "$root/vm1/response.txt" 2>/dev/null) == 0:Ready ]]; then
    pass "host-mediator serving vm1/ with executors on the worker guest (vm1/response.txt reads 0:Ready): $(grep -m 1 'executor: ' "$work/mediator.log" | sed 's/^\[[^]]*\] *//')"
    serving=SERVING
else
    fail "host-mediator vgpu-mediator serve did not write 0:Ready in vm1/"
    show "$work/mediator.log" 20
    serving=NOT-SERVING
fi

# The host's part, driven by the client's console: WAIT-SERVING (answered SERVING),
# KILL-WORKER (quit the worker's QEMU, then WORKER-DOWN), START-WORKER (start it again);
# done when the client powers off. Each answer goes out only once the client asked for it:
# by then it holds its serial port open (opening it empties the receive buffer).
phase=serving
killed_after=
restarted_after=
listened_after=
while kill -0 "$client_pid" 2>/dev/null; do
    if ((SECONDS - guest_start >= timeout)); then
        echo "   the client did not power off within $timeout s: stopping both guests"
        break
    fi
    case $phase in
        serving)
            if seen "$client_log" '^WAIT-SERVING'; then
                tell_client "$serving"
                phase=up
            fi
            ;;
        up)
            if seen "$client_log" '^KILL-WORKER'; then
                sleep 1 # its console copies vgpu-worker's log as it grows
                stop "$worker_pid"
                killed_after=$((SECONDS - guest_start))
                echo "   client: KILL-WORKER: the worker's QEMU quit after $killed_after s"
                listening "$wport" && echo "   127.0.0.1:$wport still listens after the worker's QEMU quit"
                tell_client WORKER-DOWN
                phase=down
            elif ! kill -0 "$worker_pid" 2>/dev/null; then
                echo "   the worker's QEMU quit on its own: stopping the client"
                break
            fi
            ;;
        down)
            if seen "$client_log" '^START-WORKER'; then
                launch "$worker2_log" "$work/worker.cpio.gz" "VGPU_BOOT=2" "${net_worker[@]}"
                worker_pid=$launched
                restarted_after=$((SECONDS - guest_start))
                echo "   client: START-WORKER: the worker's QEMU started again after $restarted_after s (same port)"
                phase=again
            fi
            ;;
        again)
            if seen "$worker2_log" '^WORKER-READY'; then
                listened_after=$((SECONDS - guest_start))
                echo "   worker ready again after $listened_after s"
                phase=served
            elif seen "$worker2_log" '^WORKER-FAILED' || ! kill -0 "$worker_pid" 2>/dev/null; then
                echo "   the worker's second boot failed: stopping the client"
                break
            fi
            ;;
    esac
    sleep 0.5
done
guest_end=$SECONDS
sleep 1 # the worker's console: the last sessions' end
stop "$client_pid"
stop "$worker_pid"
echo "   the guests ran for $((guest_end - guest_start)) s"

# ---- 4. results ----------------------------------------------------------------------------
step "results"
bad=0
e2e_guest_checks "$worker1_log" worker listening
e2e_guest_checks "$client_log" client mount served command-1 command-2 commands-repeated \
    worker-down-command-1 worker-down-commands reconnect-command-1 \
    reconnect-command-2 reconnect-next-command-1
e2e_guest_checks "$worker2_log" worker reboot-listening
for log in "$worker1_log" "$client_log" "$worker2_log"; do
    who=$(basename "$log" .log)
    tr -d '\r' <"$log" | grep '^INFO ' | sed "s/^/    | $who: /" || true
done

# Each boot of the worker served the mediator's sessions (vgpu-worker's log on its
# console), each in an executor process of its own as user vgpu-worker (uid 999).
boot=1
for log in "$worker1_log" "$worker2_log"; do
    sessions=$(tr -d '\r' <"$log" | grep -c "^WORKER| .*mediator 'dom0' connected from" || true)
    executors=$(tr -d '\r' <"$log" | grep -c '^EXECUTOR ' || true)
    others=$(tr -d '\r' <"$log" | grep '^EXECUTOR ' | grep -v -c 'Uid: 999 Gid: 999 Seccomp: 2' || true)
    if [[ $sessions -gt 0 && $executors -gt 0 && $others -eq 0 ]]; then
        pass "worker-sessions-boot-$boot the worker's vgpu-worker logged $sessions connections of mediator 'dom0'; $executors executor processes, each as uid 999 (vgpu-worker) with seccomp filtering"
    else
        fail "worker-sessions-boot-$boot the worker (boot $boot) logged $sessions connections of mediator 'dom0' and $executors executor processes under a seccomp filter ($others of them not as uid 999 in filter mode)"
        bad=1
    fi
    tr -d '\r' <"$log" | grep -m 6 -E "^(WORKER\| .*mediator 'dom0'|EXECUTOR )" |
        sed 's/^WORKER| \[[^]]*\] */    | /; s/^EXECUTOR /    | executor /' || true
    boot=$((boot + 1))
done

# The host's mediator: commands received and answered, the worker's loss noticed, and
# still serving at the end.
received=$(grep -c "nfs vm1: received command" "$work/mediator.log" || true)
sent=$(grep -c "nfs vm1: response sent: [12]:" "$work/mediator.log" || true)
errors=$(grep -c "nfs vm1: response sent: 2:" "$work/mediator.log" || true)
if [[ $received -gt 0 && $sent -gt 0 && $errors -gt 0 ]] && kill -0 "$mediator_pid" 2>/dev/null; then
    pass "host-mediator-served the mediator logged $received commands received and $sent answers sent for vm1 ($errors errors while the worker was away), and still runs"
else
    fail "host-mediator-served the mediator logged $received commands received, $sent answers sent, $errors errors; running: $(kill -0 "$mediator_pid" 2>/dev/null && echo yes || echo no)"
    bad=1
fi
# (grep -m rather than head: a reader that stops early would fail the pipeline.)
grep -m 8 -E "nfs vm1: response sent: 2:|127.0.0.1:$wport: |executor unavailable" "$work/mediator.log" |
    sed 's/^\[[^]]*\] */    | /' || true
echo "   timeline: worker ready after ${worker_ready:-?} s; killed after ${killed_after:-?} s; started again after ${restarted_after:-?} s, listening after ${listened_after:-?} s; guests done after $((guest_end - guest_start)) s"
if [[ $bad -eq 1 ]]; then
    for log in "$client_log" "$worker1_log" "$worker2_log" "$work/mediator.log"; do
        [[ -s $log ]] || continue
        echo "   the end of $(basename "$log" .log)'s log:"
        tr -d '\r' <"$log" | tail -n 25 | sed 's/^/    | /'
    done
fi

verdict ""
