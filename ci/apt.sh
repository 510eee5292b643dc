# SPDX-License-Identifier: Apache-2.0
# shellcheck shell=bash
# Installs the Debian packages a script needs, once, quietly (sourced, not run).
#   source ci/apt.sh; apt_install PKG...
# Messages carry the sourcing script's name. Setting apt_updated=0 again forces the
# next install to refresh the package lists (after adding a source, say).

apt_updated=0

apt_fail() { echo "${0##*/}: error: $*" >&2; exit 1; }

apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        echo "${0##*/}: apt-get update" >&2
        apt-get update -qq -o DPkg::Lock::Timeout=600 >/dev/null || apt_fail "apt-get update failed"
        apt_updated=1
    fi
}

# Prints the packages of the arguments that are not installed, one a line.
apt_missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

apt_install() {
    local missing out
    mapfile -t missing < <(apt_missing "$@")
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || apt_fail "need root to install: ${missing[*]}"
    apt_update_once
    echo "${0##*/}: apt-get install ${missing[*]}" >&2
    if ! out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        -o DPkg::Lock::Timeout=600 --no-install-recommends \
        "${missing[@]}" 2>&1); then
        tail -n 20 <<<"$out" >&2
        apt_fail "apt-get install ${missing[*]} failed"
    fi
}
