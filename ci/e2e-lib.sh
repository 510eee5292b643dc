# SPDX-License-Identifier: Apache-2.0
# shellcheck shell=bash
# What the end-to-end scripts share (sourced, not run): their check lines, their work
# directory and the cleanup of every process they started.
#
#   source ci/e2e-lib.sh
#   e2e_begin NAME [PREFIX]   # NAME for the final line (e2e-nfs), PREFIX for check lines (nfs)
#   e2e_workdir STEM          # $work (mktemp STEM.XXXXXX), $pids; kills and reaps them on exit
#                             # (after e2e_before_cleanup, when the script defines one)
#
# Only pass() and fail() print lines starting with "PASS " or "FAIL " (ci/test.sh counts
# them); evidence is indented. The caller sets $keep (1: keep the work directory).

e2e_begin() { # NAME [PREFIX]
    e2e_name=$1
    e2e_prefix=${2:+$2 }
    start_time=$SECONDS
    passed=0
    failed=0
}

pass() { echo "PASS $e2e_prefix$*"; passed=$((passed + 1)); }
fail() { echo "FAIL $e2e_prefix$*"; failed=$((failed + 1)); }
step() { echo "== $* ($((SECONDS - start_time)) s)"; }

# Indented lines of a file (evidence, or the end of a log after a failure).
show() { # FILE [LINES]
    [[ -f $1 ]] || return 0
    tail -n "${2:-30}" "$1" | tr -d '\r' | sed 's/^/    | /'
}

# The final line; also what a setup failure ends with.
verdict() { # [WHAT FAILED]
    local what=${1:-}
    if [[ $failed -eq 0 && $passed -gt 0 ]]; then
        echo "PASS $e2e_name: $passed checks passed in $((SECONDS - start_time)) s"
        return 0
    fi
    echo "FAIL $e2e_name: $failed of $((passed + failed)) checks failed${what:+ ($what)} in $((SECONDS - start_time)) s"
    return 1
}

# A step that cannot go on: one FAIL line with what failed, the final line, exit 1.
abort() { # CHECK DETAIL [LOG]
    fail "$1 $2"
    [[ -n ${3:-} ]] && show "$3" 30
    verdict "$1" || true
    exit 1
}

# Runs a step quietly; on failure, abort with the end of its log.
quiet() { # CHECK LOG CMD...
    local check=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 || abort "$check" "'$*' failed" "$log"
}

e2e_workdir() { # STEM
    work=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    pids=()
    trap e2e_cleanup EXIT
    trap 'exit 130' INT TERM
}

# shellcheck disable=SC2317  # called by the EXIT trap
e2e_cleanup() {
    local rc=$? pid
    # What a script must undo before its processes go (ci/e2e-libvirt.sh: its domain,
    # while its libvirtd still runs).
    if declare -F e2e_before_cleanup >/dev/null; then
        e2e_before_cleanup || true
    fi
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${keep:-0} -eq 1 ]]; then
        echo "${0##*/}: work directory kept: $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}

# ---- a vgpu-worker on the loopback address (the scripts' --executor remote modes) ------
#
#   e2e_worker_keys BIN NAME           `BIN keygen NAME` into $work/worker.keys (the
#                                      worker's --keys) and $work/mediator.key (the
#                                      mediator's --remote-key), both mode 0600
#   e2e_worker_start BIN KIND LOG [PORT]
#                                      `BIN --listen 127.0.0.1:PORT --keys $work/worker.keys
#                                      --executor KIND`, its output in LOG; PORT is the given
#                                      one, else the first free one of 20 from a base taken
#                                      from the script's PID. Waits for the worker's
#                                      "serving" line; sets worker_pid (also in pids) and
#                                      worker_port. Returns 1 (worker_error says why) when
#                                      it does not serve.
#   e2e_children PID                   the PIDs of PID's live child processes (the worker's:
#                                      its sessions' executor processes), from /proc
#   e2e_forget_pid PID                 drops PID from pids (a process already reaped)

e2e_worker_keys() { # BIN NAME
    (umask 077 && "$1" keygen "$2" >"$work/worker.keys") || return 1
    [[ $(wc -l <"$work/worker.keys") -eq 1 ]] || return 1
    install -m 0600 "$work/worker.keys" "$work/mediator.key"
}

e2e_port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# shellcheck disable=SC2034 # worker_port and worker_error are for the caller
e2e_worker_start() { # BIN KIND LOG [PORT]
    local bin=$1 kind=$2 log=$3 port=${4:-} candidates p i
    worker_error=
    if [[ -n $port ]]; then
        candidates=("$port")
    else
        candidates=()
        # 10000 to 19019: below ci/e2e-qemu.sh's metrics ports (20000 on) and Linux's
        # ephemeral ports (32768 on).
        for ((p = 10000 + $$ % 900 * 10, i = 0; i < 20; p++, i++)); do
            candidates+=("$p")
        done
    fi
    for p in "${candidates[@]}"; do
        e2e_port_free "$p" || continue
        "$bin" --listen "127.0.0.1:$p" --keys "$work/worker.keys" --executor "$kind" >"$log" 2>&1 &
        worker_pid=$!
        pids+=("$worker_pid")
        # The CUDA sanity gate runs first: allow it a minute.
        for ((i = 0; i < 600; i++)); do
            grep -qs "serving .* on 127\.0\.0\.1:$p\$" "$log" && break
            kill -0 "$worker_pid" 2>/dev/null || break
            sleep 0.1
        done
        if grep -qs "serving .* on 127\.0\.0\.1:$p\$" "$log"; then
            worker_port=$p
            return 0
        fi
        kill "$worker_pid" 2>/dev/null || true
        wait "$worker_pid" 2>/dev/null || true
        e2e_forget_pid "$worker_pid"
        # Taken between the probe and the bind: the next port.
        grep -qi 'in use' "$log" && [[ -z $port ]] && continue
        worker_error="vgpu-worker did not serve on 127.0.0.1:$p: $(tail -n 1 "$log")"
        return 1
    done
    worker_error="no free port for vgpu-worker among 127.0.0.1:${candidates[0]}..${candidates[-1]}"
    return 1
}

e2e_children() { # PID
    local stat line f pid
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$stat" || continue
        # After the command name in parentheses: state, parent PID, ...
        read -r -a f <<<"${line##*) }"
        [[ ${f[1]} == "$1" && ${f[0]} != Z ]] || continue
        pid=${stat#/proc/}
        echo "${pid%/stat}"
    done
}

e2e_forget_pid() { # PID
    local p kept=()
    for p in "${pids[@]}"; do
        [[ $p == "$1" ]] || kept+=("$p")
    done
    pids=("${kept[@]}")
}

# e2e_guest_checks LOG WHO CHECK...: the checks a guest reported on its console as
# "CHECK <name> PASS|FAIL <detail>": one line per check it should have reported (FAIL when
# it did not), then one per failed check it reported that was not expected (the mediator
# exiting, say). Sets bad=1 on any failure.
# shellcheck disable=SC2034 # bad is for the caller
e2e_guest_checks() {
    local log=$1 who=$2 c line rest
    shift 2
    for c in "$@"; do
        line=$(tr -d '\r' <"$log" 2>/dev/null | grep -E "^CHECK $c (PASS|FAIL) " | tail -n 1 || true)
        case $line in
            "CHECK $c PASS "*) pass "$who-$c ${line#"CHECK $c PASS "}" ;;
            "CHECK $c FAIL "*) fail "$who-$c ${line#"CHECK $c FAIL "}"; bad=1 ;;
            *) fail "$who-$c no result from the $who"; bad=1 ;;
        esac
    done
    while read -r _ c _ rest; do
        case " $* " in
            *" $c "*) ;;
            *) fail "$who-$c $rest"; bad=1 ;;
        esac
    done < <(tr -d '\r' <"$log" 2>/dev/null | grep -E '^CHECK [^ ]+ FAIL ' || true)
}

# e2e_ganesha_conf ROOT PORT N...: $work/ganesha.conf for nfs-ganesha (VFS) on
# 127.0.0.1:PORT, NFSv4 only, with one export per VM directory ROOT/vmN as /vgpu/vmN,
# only to 127.0.0.1 (QEMU's user-mode network), root squashed to 65534, which owns the
# directory; ROOT itself (with the mediator's lock file) is not exported. Creates the
# directories.
e2e_ganesha_conf() {
    local root=$1 port=$2 n
    shift 2
    mkdir -p "$root" "$work/ganesha"
    chmod 0755 "$root"
    cat >"$work/ganesha.conf" <<EOF
NFS_CORE_PARAM {
    Protocols = 4;
    NFS_Port = $port;
    Bind_addr = 127.0.0.1;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}
NFSv4 {
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "$work/ganesha";
}
EOF
    for n in "$@"; do
        install -d -o 65534 -g 65534 -m 0770 "$root/vm$n"
        cat >>"$work/ganesha.conf" <<EOF
EXPORT {
    Export_Id = $n;
    Path = "$root/vm$n";
    Pseudo = /vgpu/vm$n;
    Access_Type = None;
    Squash = Root_Squash;
    Anonymous_Uid = 65534;
    Anonymous_Gid = 65534;
    Protocols = 4;
    Transports = TCP;
    SecType = sys;
    CLIENT {
        Clients = 127.0.0.1;
        Access_Type = RW;
    }
    FSAL {
        Name = VFS;
    }
}
EOF
    done
}
