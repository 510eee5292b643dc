#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check of executors across the network with host processes only (no QEMU,
# no NFS server): a vgpu-worker with the CPU executor on 127.0.0.1 and
# `vgpu-mediator --executor remote:127.0.0.1:PORT serve` on a temporary directory that
# vgpu-nfs-client writes directly, as a VM does over its NFS mount. Covers the worker's
# command line, its keys and their refusals, the sanity gate and info through the
# worker, commands through it, the worker killed and started again under a serving
# mediator, and what each side frees. One "PASS remote <check> <detail>" or
# "FAIL remote <check> <detail>" line per check (ci/test.sh counts them), then a final
# "PASS e2e-remote ..." or "FAIL e2e-remote ..." line; exits non-zero on any failure.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds vgpu-worker, vgpu-executor-worker, vgpu-mediator, vgpu-nfs-client, vhost-vgpu and
vgpu-admin (cargo build --release), then, all on this host:

  vgpu-worker --help and keygen     the help names its options; keygen prints NAME KEY
  vgpu-worker --executor cpu        on a free port of 127.0.0.1, with a fresh key
  vgpu-mediator sanity / info       through the worker: sanity fails naming the CPU
                                    executor, info succeeds and names the worker
  vgpu-mediator serve               --executor remote:127.0.0.1:PORT on ROOT/vm1 and
                                    ROOT/vm2; vgpu-nfs-client --command 1 and 2 in both
  refusals                          a wrong key, a mediator name the worker does not
                                    know, key files of mode 0644 (vgpu-worker,
                                    vgpu-mediator and vhost-vgpu)
  worker killed (SIGKILL)           its executor processes end with it; the next
                                    command is answered 2:... (no hang); a worker on the
                                    same port serves the next commands again; vgpu-admin
                                    shows the lost executors and nothing held
  stops                             the mediator's SIGTERM ends its sessions on the
                                    worker; the worker's SIGTERM stops it (exit 0)

Options:
  --keep            keep the work directory (logs, keys, ROOT) and print its path
  -h, --help        show this help

Environment: CARGO_TARGET_DIR, RUST_LOG (the worker's and mediator's log level, default
info).
EOF
}

die() { echo "e2e-remote.sh: error: $*" >&2; exit 1; }

keep=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-remote remote
e2e_workdir vgpu-e2e-remote
export RUST_LOG=${RUST_LOG:-info}
name=e2e-remote

# ---- 1. build ---------------------------------------------------------------------------
step "setup: host packages and the Rust toolchain"
quiet setup "$work/setup.log" bash ci/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

step "build: vgpu-worker, vgpu-executor-worker, vgpu-mediator, vgpu-nfs-client, vhost-vgpu, vgpu-admin"
quiet build "$work/cargo.log" cargo build --release --locked -p vgpu-mediator -p vgpu-nfs \
    -p vgpu-guest -p vhost-vgpu --bin vgpu-worker --bin vgpu-executor-worker \
    --bin vgpu-mediator --bin vgpu-nfs-client --bin vhost-vgpu --bin vgpu-admin
target=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release
for f in vgpu-worker vgpu-executor-worker vgpu-mediator vgpu-nfs-client vhost-vgpu vgpu-admin; do
    [[ -x $target/$f ]] || abort build "cargo build did not produce $target/$f"
done
worker_bin=$target/vgpu-worker
mediator_bin=$target/vgpu-mediator
client=$target/vgpu-nfs-client
admin=$target/vgpu-admin

# Runs a command with RUST_LOG unset (as a person would) and a time limit; its stdout and
# stderr together in $out, its exit status in $rc.
run_plain() { # SECS CMD...
    local secs=$1
    shift
    rc=0
    out=$(env -u RUST_LOG timeout --kill-after=5 "$secs" "$@" 2>&1) || rc=$?
}
one_line() { tr '\n' ' ' <<<"$1" | sed 's/ *$//'; }
# Lines in a log matching a pattern (0 when none).
count() { grep -cE "$1" "$2" || true; }
# Runs CMD until it succeeds, for up to SECS (what a daemon logs may come a moment late).
eventually() { # SECS CMD...
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# ---- 2. the worker's command line -------------------------------------------------------
step "vgpu-worker --help and keygen"
run_plain 10 "$worker_bin" --help
missing=()
for word in 'Usage: vgpu-worker' --listen --keys --executor --max-sessions keygen; do
    [[ $out == *"$word"* ]] || missing+=("$word")
done
if [[ $rc -eq 0 && ${#missing[@]} -eq 0 ]]; then
    pass "worker-help exit 0; $(sed -n 1p <<<"$out"); names $(grep -oE '^ +--[a-z-]+' <<<"$out" | tr -d ' ' | tr '\n' ' ')and keygen"
else
    fail "worker-help exit $rc, missing: ${missing[*]:-nothing}"
    head -n 20 <<<"$out" | sed 's/^/    | /'
fi

keyline='^[A-Za-z0-9._-]+ [0-9a-f]{64}$'
run_plain 10 "$worker_bin" keygen "$name"
key1=$out rc1=$rc
run_plain 10 "$worker_bin" keygen "$name"
key2=$out rc2=$rc
run_plain 10 "$worker_bin" keygen 'not a name!'
bad_out=$out bad_rc=$rc
if [[ $rc1 -eq 0 && $rc2 -eq 0 && $(wc -l <<<"$key1") -eq 1 && $key1 =~ $keyline &&
      ${key1%% *} == "$name" && $key2 =~ $keyline && $key1 != "$key2" &&
      $bad_rc -ne 0 && $(wc -l <<<"$bad_out") -eq 1 ]]; then
    pass "worker-keygen 'keygen $name' prints one line NAME KEY ('$name' and 64 hex digits), a new key each time; 'keygen \"not a name!\"' exits $bad_rc: $bad_out"
else
    fail "worker-keygen exits $rc1/$rc2: '$(one_line "$key1")', '$(one_line "$key2")'; a bad name: exit $bad_rc: $(one_line "$bad_out")"
fi

# ---- 3. the worker, sanity and info through it ------------------------------------------
step "host: vgpu-worker --executor cpu --listen 127.0.0.1:PORT"
e2e_worker_keys "$worker_bin" "$name" || abort worker-keys "vgpu-worker keygen $name failed"
e2e_worker_start "$worker_bin" cpu "$work/worker.log" || abort worker-start "$worker_error" "$work/worker.log"
worker1=$worker_pid
port=$worker_port
remote=remote:127.0.0.1:$port
pass "worker-start pid $worker1, $(sed -n 's/^\[[^]]*\] *//; /serving /p' "$work/worker.log" | tail -n 1)"
key=$work/mediator.key

step "vgpu-mediator --executor $remote sanity / info"
run_plain 60 "$mediator_bin" --executor "$remote" --remote-key "$key" sanity
if [[ $rc -eq 1 && $(tail -n 1 <<<"$out") == 'SANITY FAIL' ]] &&
    grep -qE '^FAIL: .*CPU reference executor' <<<"$out"; then
    pass "sanity-cpu-worker exit 1: $(one_line "$out")"
else
    fail "sanity-cpu-worker exit $rc (expected 1, a FAIL: line naming the CPU reference executor, SANITY FAIL): $(one_line "$out")"
fi
run_plain 60 "$mediator_bin" --executor "$remote" --remote-key "$key" info
if [[ $rc -eq 0 ]] && grep -q '^executor: cpu' <<<"$out" &&
    grep -q "^isolation: .*$remote" <<<"$out" && grep -q "worker 127.0.0.1:$port: CPU reference executor" <<<"$out"; then
    pass "info exit 0: $(one_line "$(grep -E '^(executor|device|isolation):' <<<"$out")")"
else
    fail "info exit $rc (expected 0, executor cpu, the worker $remote named): $(one_line "$out")"
fi

# ---- 4. serve through the worker ----------------------------------------------------------
step "host: vgpu-mediator --executor $remote serve --nfs-root ROOT --vm vm1 --vm vm2"
root=$work/root
mkdir -p "$root"
control=$work/mediator.control
"$mediator_bin" --executor "$remote" --remote-key "$key" serve --nfs-root "$root" \
    --vm vm1 --vm vm2 --poll-ms 100 --control "$control" >"$work/mediator.log" 2>&1 &
mediator=$!
pids+=("$mediator")
ready() { [[ $(cat "$root/$1/response.txt" 2>/dev/null) == 0:Ready ]]; }
for ((i = 0; i < 300; i++)); do
    ready vm1 && ready vm2 && break
    kill -0 "$mediator" 2>/dev/null || break
    sleep 0.1
done
{ ready vm1 && ready vm2; } || abort serve "vgpu-mediator serve did not write 0:Ready in vm1/ and vm2/" "$work/mediator.log"
pass "serve-ready vm1/ and vm2/ read 0:Ready; the mediator: $(grep -m 1 -o "worker 127.0.0.1:$port: .*" "$work/mediator.log")"

vector='SUCCESS: Vector add PASSED: 1024 elements, 0 errors (CPU reference executor)'
device='SUCCESS: CPU reference executor, '
# nfs_command VM N [TIMEOUT]: one vgpu-nfs-client run; $out, $rc, $secs.
nfs_command() {
    local t0=$SECONDS
    rc=0
    out=$("$client" --dir "$root/$1" --command "$2" --timeout "${3:-20}" 2>&1) || rc=$?
    secs=$((SECONDS - t0))
}
for c in vm1:1 vm2:1 vm1:2 vm2:2; do
    vm=${c%:*} n=${c#*:}
    nfs_command "$vm" "$n"
    want=$vector
    [[ $n == 2 ]] && want=$device
    if [[ $rc -eq 0 && $out == "$want"* ]]; then
        pass "$vm-command-$n $out"
    else
        fail "$vm-command-$n exit $rc (expected 0 and '$want'): $(one_line "$out")"
    fi
done

# The sessions live on the worker: one executor process there for each open connection.
sessions_on() { # LOG: connections opened and ended in a worker's log
    opened=$(count "mediator '$name' connected from" "$1")
    ended=$(count "mediator '$name' from [^ ]+: " "$1")
}
sessions_consistent() { # PID LOG: executor processes, one per open connection
    sessions_on "$2"
    mapfile -t children < <(e2e_children "$1")
    [[ ${#children[@]} -ge 1 && ${#children[@]} -eq $((opened - ended)) ]]
}
if eventually 5 sessions_consistent "$worker1" "$work/worker.log"; then
    pass "worker-sessions the worker's log: $opened connections from '$name', $ended ended; ${#children[@]} executor processes on the worker (pids ${children[*]}), one per open connection"
else
    fail "worker-sessions the worker's log: $opened connections from '$name', $ended ended, but ${#children[@]} executor processes on the worker (pids ${children[*]:-none})"
fi
old_children=("${children[@]}")

# ---- 5. refusals ----------------------------------------------------------------------------
step "refusals: a wrong key, an unknown mediator, key files of mode 0644"
mkdir -p "$work/other"
(umask 077 && "$worker_bin" keygen "$name" >"$work/wrong.key")
wrong_before=$(count 'wrong key' "$work/worker.log")
run_plain 30 "$mediator_bin" --executor "$remote" --remote-key "$work/wrong.key" --remote-wait 5 \
    serve --nfs-root "$work/other" --vm vm1
logged_more() { [[ $(count "$1" "$2") -gt $3 ]]; }
eventually 5 logged_more 'wrong key' "$work/worker.log" "$wrong_before" || true
wrong_after=$(count 'wrong key' "$work/worker.log")
if [[ $rc -ne 0 && $rc -ne 124 && $(wc -l <<<"$out") -eq 1 && $out == *'wrong key'* &&
      $wrong_after -gt $wrong_before ]]; then
    pass "wrong-key serve exits $rc: $out; the worker's log: $(grep 'wrong key' "$work/worker.log" | tail -n 1 | sed 's/^\[[^]]*\] *//')"
else
    fail "wrong-key serve exits $rc (expected non-zero, one line naming the wrong key; the worker logged $((wrong_after - wrong_before)) refusals): $(one_line "$out")"
fi

(umask 077 && "$worker_bin" keygen stranger >"$work/stranger.key")
run_plain 30 "$mediator_bin" --executor "$remote" --remote-key "$work/stranger.key" --remote-wait 5 info
eventually 5 logged_more "mediator 'stranger' is not among" "$work/worker.log" 0 || true
if [[ $rc -ne 0 && $rc -ne 124 && $(wc -l <<<"$out") -eq 1 && $out == *"'stranger' is not among"* ]] &&
    grep -q "mediator 'stranger' is not among those this worker serves" "$work/worker.log"; then
    pass "unknown-mediator info exits $rc: $out"
else
    fail "unknown-mediator info exits $rc (expected non-zero, one line: 'stranger' is not among those served): $(one_line "$out")"
fi

install -m 0644 "$work/worker.keys" "$work/worker-0644.keys"
install -m 0644 "$key" "$work/mediator-0644.key"
mode_check() { # WHAT CMD...: refused at once, naming the mode
    local what=$1
    shift
    run_plain 15 "$@"
    if [[ $rc -ne 0 && $rc -ne 124 && $out == *'mode 644'* && $out == *'chmod 600'* ]]; then
        pass "key-mode-0644-$what exits $rc: $(tail -n 1 <<<"$out")"
    else
        fail "key-mode-0644-$what exits $rc (expected a refusal naming mode 644): $(one_line "$out")"
    fi
}
mode_check vgpu-worker "$worker_bin" --listen "127.0.0.1:$((port + 1))" \
    --keys "$work/worker-0644.keys" --executor cpu
mode_check vgpu-mediator "$mediator_bin" --executor "$remote" --remote-key "$work/mediator-0644.key" info
mkdir -p "$work/sockets"
mode_check vhost-vgpu "$target/vhost-vgpu" --executor "$remote" \
    --remote-key "$work/mediator-0644.key" --socket-path "$work/sockets/vm"
if kill -0 "$mediator" 2>/dev/null && kill -0 "$worker1" 2>/dev/null; then
    pass "refusals-harmless the serving mediator and the worker run on after the refusals"
else
    fail "refusals-harmless the serving mediator or the worker exited during the refusals"
fi

# ---- 6. the worker killed under the serving mediator ----------------------------------------
step "kill the worker (SIGKILL) while the mediator serves"
kill -KILL "$worker1"
wait "$worker1" 2>/dev/null || true
e2e_forget_pid "$worker1"
left=()
for ((i = 0; i < 50; i++)); do
    left=()
    for p in "${old_children[@]}"; do
        [[ -d /proc/$p ]] && left+=("$p")
    done
    [[ ${#left[@]} -eq 0 ]] && break
    sleep 0.1
done
if [[ ${#old_children[@]} -gt 0 && ${#left[@]} -eq 0 ]]; then
    pass "worker-killed vgpu-worker pid $worker1 killed with SIGKILL; its ${#old_children[@]} executor processes (pids ${old_children[*]}) ended with it"
else
    fail "worker-killed executor processes of the killed worker left running: ${left[*]:-none of ${#old_children[@]}}"
fi

nfs_command vm1 1 20
answer=$(cat "$root/vm1/response.txt" 2>/dev/null || true)
if [[ $rc -eq 1 && $answer == 2:* ]]; then
    pass "command-worker-down vm1 command 1 answered in $secs s with an error (vgpu-nfs-client exit 1); response.txt: $answer"
else
    fail "command-worker-down vm1 command 1: exit $rc after $secs s (expected 1: an error answer, not a hang), response.txt: '$answer'; $(one_line "$out")"
fi
if kill -0 "$mediator" 2>/dev/null; then
    pass "mediator-survives vgpu-mediator serve runs on without its worker"
else
    fail "mediator-survives vgpu-mediator serve exited when its worker was killed"
    show "$work/mediator.log" 15
fi

step "start the worker again on 127.0.0.1:$port"
t_restart=$SECONDS
e2e_worker_start "$worker_bin" cpu "$work/worker-2.log" "$port" || abort worker-restart "$worker_error" "$work/worker-2.log"
worker2=$worker_pid
pass "worker-restart pid $worker2 on the same port: $(sed -n 's/^\[[^]]*\] *//; /serving /p' "$work/worker-2.log" | tail -n 1)"

# The mediator waits a moment before it tries a worker again (its backoff), and a VM's
# executor from before the kill reports the lost connection on its next use: retry.
for vm in vm1 vm2; do
    tries=0 firsts=()
    t0=$SECONDS
    while ((SECONDS - t0 < 30)); do
        tries=$((tries + 1))
        nfs_command "$vm" 1 20
        [[ $rc -eq 0 ]] && break
        firsts+=("$(cat "$root/$vm/response.txt" 2>/dev/null)")
        sleep 0.5
    done
    if [[ $rc -eq 0 && $out == "$vector" ]]; then
        nfs_command "$vm" 2 20
        if [[ $rc -eq 0 && $out == "$device"* ]]; then
            pass "$vm-after-restart command 1 passed at try $tries, $((SECONDS - t_restart)) s after the restart${firsts[0]:+ (before: ${firsts[*]})}; command 2: $out"
        else
            fail "$vm-after-restart command 1 passed, command 2 exit $rc: $(one_line "$out")"
        fi
    else
        fail "$vm-after-restart command 1 still failing after $tries tries in $((SECONDS - t0)) s: exit $rc: $(one_line "$out")"
    fi
done

# What the mediator holds: nothing from before the kill, the lost executors counted.
if "$admin" --control "$control" >"$work/admin.out" 2>&1; then
    sed 's/^/    | /' "$work/admin.out"
    # Columns: VM TRANSPORT STATE SESSIONS USED / QUOTA ... FAULTS.
    read -r v1_sessions v1_used v1_faults < <(awk '$1 == "nfs:vm1" { print $4, $5, $NF }' "$work/admin.out")
    read -r v2_sessions v2_used v2_faults < <(awk '$1 == "nfs:vm2" { print $4, $5, $NF }' "$work/admin.out")
    if [[ ${v1_sessions:-x} == 0 && ${v2_sessions:-x} == 0 && ${v1_used:-x} == 0 && ${v2_used:-x} == 0 &&
          ${v1_faults:-0} -ge 1 && ${v2_faults:-0} -ge 1 ]]; then
        pass "mediator-freed vgpu-admin: vm1 and vm2 hold 0 sessions and 0 bytes; the executors lost with the worker counted as faults (vm1 $v1_faults, vm2 $v2_faults)"
    else
        fail "mediator-freed vgpu-admin: vm1 sessions ${v1_sessions:-?} used ${v1_used:-?} faults ${v1_faults:-?}, vm2 sessions ${v2_sessions:-?} used ${v2_used:-?} faults ${v2_faults:-?} (expected 0, 0 and at least 1 each)"
    fi
else
    fail "mediator-freed vgpu-admin --control $control: $(tail -n 1 "$work/admin.out")"
fi

# ---- 7. stops -------------------------------------------------------------------------------
step "stop the mediator (SIGTERM), then the worker (SIGTERM)"
sessions_on "$work/worker-2.log"
before=$((opened - ended))
kill -TERM "$mediator"
mediator_rc=0
for ((i = 0; i < 100; i++)); do
    kill -0 "$mediator" 2>/dev/null || break
    sleep 0.1
done
wait "$mediator" 2>/dev/null || mediator_rc=$?
e2e_forget_pid "$mediator"
for ((i = 0; i < 50; i++)); do
    [[ -z $(e2e_children "$worker2") ]] && break
    sleep 0.1
done
mapfile -t children < <(e2e_children "$worker2")
sessions_on "$work/worker-2.log"
closed=$(count "mediator '$name' from [^ ]+: closed by the mediator" "$work/worker-2.log")
if [[ $mediator_rc -eq 0 && $before -ge 2 && $opened -eq $ended && ${#children[@]} -eq 0 ]]; then
    pass "mediator-stop vgpu-mediator exit 0 on SIGTERM; the worker's log: all $opened connections ended ($closed closed by the mediator; $before open before the stop), no executor process left on the worker"
else
    fail "mediator-stop mediator exit $mediator_rc; the worker's log: $opened connections, $ended ended ($before open before the stop); executor processes left on the worker: ${children[*]:-none}"
    show "$work/worker-2.log" 10
fi

kill -TERM "$worker2"
worker_rc=0
for ((i = 0; i < 100; i++)); do
    kill -0 "$worker2" 2>/dev/null || break
    sleep 0.1
done
wait "$worker2" 2>/dev/null || worker_rc=$?
e2e_forget_pid "$worker2"
if [[ $worker_rc -eq 0 ]] && grep -q 'stopping' "$work/worker-2.log"; then
    pass "worker-stop vgpu-worker exit 0 on SIGTERM: $(grep 'stopping' "$work/worker-2.log" | tail -n 1 | sed 's/^\[[^]]*\] *//')"
else
    fail "worker-stop vgpu-worker exit $worker_rc on SIGTERM"
    show "$work/worker-2.log" 10
fi

if [[ $failed -gt 0 ]]; then
    echo "   the end of the mediator's log:"
    show "$work/mediator.log" 15
    echo "   the end of the first worker's log:"
    show "$work/worker.log" 10
fi
verdict ""
