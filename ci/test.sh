#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs every check of the project: formatting, lints (shellcheck over the shell scripts),
# the Rust test suites, systemd-analyze verify over the systemd units and the end-to-end
# scripts (real QEMU guests, one through libvirt, one on the newest Debian backports
# kernel, one guest with two devices on two simulated GPUs, real NFS, executors on a
# vgpu-worker across the network, the glibc 2.17 build and its RPMs, the guest driver
# built with W=1 for each supported kernel).
# Ends with one line "N passed, N failed" that counts every check that ran.
#
#   bash ci/test.sh            # everything
#   bash ci/test.sh --no-e2e   # formatting, lints, cargo tests and the units only
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
e2e=1
for arg in "$@"; do
    case "$arg" in
        --no-e2e) e2e=0 ;;
        -h|--help) sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "ci/test.sh: unknown option '$arg'" >&2; exit 2 ;;
    esac
done

passed=0
failed=0
failures=()
logdir=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-test.XXXXXX")

pass() { passed=$((passed + $1)); }
fail() { failed=$((failed + $1)); failures+=("$2"); }

# One check that passes or fails as a whole.
check() {
    local name=$1; shift
    echo "=== $name"
    if "$@" >"$logdir/$name.log" 2>&1; then
        echo "PASS $name"; pass 1
    else
        tail -n 60 "$logdir/$name.log"
        echo "FAIL $name (log: $logdir/$name.log)"; fail 1 "$name"
    fi
}

bash ci/setup.sh || { echo "FAIL setup"; echo "0 passed, 1 failed"; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"

# The shell scripts of ci/, .ci/ and qemu-configs/: every *.sh and every file whose first
# line names sh or bash. shellcheck takes the dialect from the shebang (or the sourced
# files' "# shellcheck shell=" line) and follows `source` (-x) from the repository root.
shell_scripts() {
    local f
    find ci .ci qemu-configs -type f | LC_ALL=C sort | while read -r f; do
        if [[ $f == *.sh ]] || head -n 1 "$f" | grep -qE '^#!.*[/ ](ba)?sh( |$)'; then
            echo "$f"
        fi
    done
}
run_shellcheck() {
    local scripts
    mapfile -t scripts < <(shell_scripts)
    shellcheck --version | sed -n 's/^version: /shellcheck /p'
    echo "${#scripts[@]} scripts: ${scripts[*]}"
    shellcheck -x "${scripts[@]}"
}

check shellcheck run_shellcheck

check fmt cargo fmt --all -- --check
check clippy cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "=== cargo test"
cargo test --workspace --locked 2>&1 | tee "$logdir/cargo-test.log"
cargo_rc=${PIPESTATUS[0]}
read -r t_pass t_fail < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } } END { print p + 0, f + 0 }' "$logdir/cargo-test.log")
pass "$t_pass"
if [ "$t_fail" -gt 0 ]; then
    fail "$t_fail" "cargo test ($t_fail)"
elif [ "$cargo_rc" -ne 0 ]; then
    fail 1 "cargo test (build or harness error)"
fi

# The systemd units of qemu-configs/ (after cargo test: their ExecStart binaries are built).
check systemd-units bash ci/verify-units.sh

if [ "$e2e" = 1 ]; then
    # Each run: a script and its options. The guests' scripts run twice: with the executors
    # in the daemon's process, and with --executor remote, on a vgpu-worker over loopback
    # TCP (their check lines then start with "remote"). The guests boot Debian 12's kernel;
    # ci/e2e-qemu.sh runs once more on the newest kernel of Debian 13's backports (its
    # lines start with "k<major>"), and ci/driver-kernels.sh builds the driver with W=1
    # for Debian 12's, Debian 13's and that newest kernel. ci/e2e-gpus.sh boots one guest
    # with two devices on two simulated GPUs (--executor cpu:2).
    runs=("ci/e2e-remote.sh" "ci/e2e-qemu.sh" "ci/e2e-qemu.sh --executor remote"
        "ci/e2e-gpus.sh" "ci/driver-kernels.sh" "ci/e2e-qemu.sh --kernel-suite trixie-backports"
        "ci/e2e-libvirt.sh" "ci/e2e-nfs.sh" "ci/e2e-nfs.sh --executor remote"
        "ci/e2e-glibc.sh" "ci/e2e-worker-vm.sh" "ci/e2e-remote-vm.sh"
        "ci/e2e-secureboot.sh" "ci/e2e-dkms.sh")
    for run in "${runs[@]}"; do
        read -r -a argv <<<"$run"
        script=${argv[0]}
        [ -f "$script" ] || continue
        name=$(basename "$script" .sh)
        [ "${#argv[@]}" -gt 1 ] && name="$name-${argv[-1]}"
        echo "=== $name"
        bash "${argv[@]}" 2>&1 | tee "$logdir/$name.log"
        rc=${PIPESTATUS[0]}
        # Each script prints one "PASS <check>" / "FAIL <check>" line per check.
        p=$(grep -c '^PASS ' "$logdir/$name.log" || true)
        f=$(grep -c '^FAIL ' "$logdir/$name.log" || true)
        pass "$p"
        if [ "$f" -gt 0 ]; then
            fail "$f" "$name ($f)"
        elif [ "$rc" -ne 0 ] || [ "$p" -eq 0 ]; then
            fail 1 "$name (exit $rc)"
        fi
    done
fi

echo
if [ "${#failures[@]}" -gt 0 ]; then
    echo "failed: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
