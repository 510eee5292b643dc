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
