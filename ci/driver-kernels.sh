#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the guest driver with make W=1 against the headers of each kernel the product
# supports (by default Debian 12's, Debian 13's and the newest of Debian 13's backports)
# and reports one "PASS <kernel> make-W=1 ..." or "FAIL ..." line per kernel: the build
# must succeed without a single warning.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFAULT_KERNELS=(host trixie trixie-backports)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--kernel SPEC]... [--update] [--keep]

For each kernel: installs its headers (ci/guest-kernel.sh --headers-only; a kernel of
another Debian suite in that release's build root, ci/build-root.sh), builds vgpu.ko
from guest-lib/driver with make W=1 (ci/driver-build.sh) and checks that make
succeeded, printed no warning or error and that the module's vermagic names that
kernel. One line per kernel, "PASS <label> make-W=1 <detail>" or
"FAIL <label> make-W=1 <detail>", with label the suite (or this machine's release
name), then a last line with the count. Exits non-zero if any failed.

Default kernels: ${DEFAULT_KERNELS[*]}, i.e. this machine's linux-image-amd64 (on
Debian 12, 6.1), Debian 13's (6.12) and the newest kernel of Debian 13's backports.

Options:
  --kernel SPEC  a kernel to build for, instead of the default ones (repeatable):
                 host (this machine's linux-image-amd64), SUITE (the newest kernel of
                 that Debian suite, e.g. trixie-backports) or SUITE:VERSION, VERSION
                 being a kernel release, a series (e.g. 7.2) or newest; host:VERSION
                 likewise
  --update       refresh the package lists before resolving the kernels
  --keep         keep the work directory (build logs) and print its path
  -h, --help     show this help
EOF
}

die() { echo "driver-kernels.sh: error: $*" >&2; exit 1; }

kernels=()
update=()
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --kernel) need_arg "$1" $#; kernels+=("$2"); shift ;;
        --update) update=(--update) ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[[ ${#kernels[@]} -gt 0 ]] || kernels=("${DEFAULT_KERNELS[@]}")

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin driver-kernels
e2e_workdir vgpu-driver-kernels

# This machine's Debian release, for the label of its own kernel.
host_release=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")

n=0
for spec in "${kernels[@]}"; do
    n=$((n + 1))
    suite=${spec%%:*}
    version=
    [[ $spec == *:* ]] && version=${spec#*:}
    args=(--headers-only "${update[@]}")
    label=$suite
    if [[ $suite == host ]]; then
        label=${host_release:-host}
    else
        args+=(--suite "$suite")
    fi
    [[ -n $version ]] && args+=(--kver "$version")
    step "$label${version:+ $version}: headers (ci/guest-kernel.sh ${args[*]})"
    log=$work/$n-$label
    if ! kenv=$(bash ci/guest-kernel.sh "${args[@]}" 2>"$log-kernel.log"); then
        fail "$label make-W=1 no kernel headers: ci/guest-kernel.sh ${args[*]} failed"
        show "$log-kernel.log" 15
        continue
    fi
    kver=$(sed -n 's/^KVER=//p' <<<"$kenv")
    kbuild=$(sed -n 's/^KBUILD=//p' <<<"$kenv")
    kbuild_root=$(sed -n 's/^KBUILD_ROOT=//p' <<<"$kenv")
    echo "   kernel $kver, headers ${kbuild_root:+in $kbuild_root: }$kbuild"
    step "$label: make W=1 against linux-headers-$kver (ci/driver-build.sh)"
    rc=0
    bash ci/driver-build.sh --kbuild "$kbuild" ${kbuild_root:+--root "$kbuild_root"} \
        --out "$log" W=1 >"$log-make.log" 2>&1 || rc=$?
    # The compiler's and modpost's warnings, and any error.
    mapfile -t warnings < <(grep -iE '(warning|error):' "$log-make.log" || true)
    vermagic=
    [[ -f $log/vgpu.ko ]] && vermagic=$(modinfo -F vermagic "$log/vgpu.ko" 2>/dev/null || true)
    if [[ $rc -ne 0 ]]; then
        fail "$label make-W=1 $kver: make failed (exit $rc), ${#warnings[@]} warning or error lines"
        show "$log-make.log" 25
    elif [[ ${#warnings[@]} -gt 0 ]]; then
        fail "$label make-W=1 $kver: vgpu.ko built, but with ${#warnings[@]} warning lines"
        printf '%s\n' "${warnings[@]}" | head -n 20 | sed 's/^/    | /'
    elif [[ $vermagic != "$kver "* ]]; then
        fail "$label make-W=1 $kver: vgpu.ko's vermagic is '${vermagic:-unreadable}'"
    else
        pass "$label make-W=1 $kver: vgpu.ko built without a warning (vermagic $vermagic)"
    fi
done

verdict
