#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fails when a binary in a directory needs a glibc symbol version newer than 2.17.
set -euo pipefail

MAX=${VGPU_GLIBC_MAX:-2.17}

usage() {
    cat <<EOF
Usage: $(basename "$0") DIR

Runs objdump -T on every ELF file directly in DIR (executables and shared libraries)
and checks the GLIBC_x.y versions of the symbols it uses. One line per file:

  PASS glibc <file> needs at most GLIBC_$MAX (newest: GLIBC_x.y)
  FAIL glibc <file> needs GLIBC_x.y > GLIBC_$MAX: <symbol>@GLIBC_x.y ...

(every symbol above the baseline is named; GLIBC_PRIVATE fails too). Exits 0 when every
file passes, 1 when one fails, 2 on bad usage or when DIR holds no ELF file. Installs
binutils (objdump) if missing.

Environment: VGPU_GLIBC_MAX   the newest version allowed (default $MAX)
EOF
}

die() { echo "glibc-check.sh: error: $*" >&2; exit 2; }

[[ $# -eq 1 && ( $1 == -h || $1 == --help ) ]] && { usage; exit 0; }
[[ $# -eq 1 ]] || die "wants one argument, the directory (see --help)"
dir=$1
[[ -d $dir ]] || die "$dir is not a directory"
[[ $MAX =~ ^[0-9]+\.[0-9]+$ ]] || die "VGPU_GLIBC_MAX wants a version like 2.17, got '$MAX'"

if ! command -v objdump >/dev/null; then
    # shellcheck source=ci/apt.sh
    source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
    apt_install binutils
fi

# True when version $1 (e.g. 2.34) is newer than $MAX.
newer() { [[ $1 != "$MAX" && $(printf '%s\n%s\n' "$MAX" "$1" | sort -V | tail -n 1) == "$1" ]]; }

files=0
failed=0
for f in "$dir"/*; do
    [[ -f $f && ! -L $f ]] || continue
    [[ $(head -c 4 "$f" | od -An -c | tr -d ' ') == 177ELF ]] || continue
    files=$((files + 1))
    name=${f##*/}
    if ! table=$(objdump -T "$f" 2>&1); then
        echo "FAIL glibc $name: objdump -T failed: $(head -n 1 <<<"$table")"
        failed=1
        continue
    fi
    # "symbol version" pairs, e.g. "memcpy 2.14" ("(GLIBC_2.14)" or "GLIBC_2.14" in the
    # version column, the symbol name last on the line).
    pairs=$(awk '{
        for (i = 1; i < NF; i++) if (match($i, /^\(?GLIBC_[0-9A-Z_.]+\)?$/)) {
            v = $i; gsub(/[()]/, "", v); sub(/^GLIBC_/, "", v); print $NF, v; break
        }
    }' <<<"$table")
    newest=$(awk '$2 ~ /^[0-9.]+$/ { print $2 }' <<<"$pairs" | sort -uV | tail -n 1)
    bad=()
    while read -r ver; do
        [[ -n $ver ]] || continue
        if [[ $ver == PRIVATE ]] || newer "$ver"; then bad+=("$ver"); fi
    done < <(awk '{ print $2 }' <<<"$pairs" | sort -u)
    too_new=()
    if [[ ${#bad[@]} -gt 0 ]]; then
        mapfile -t too_new < <(awk -v bad=" ${bad[*]} " 'index(bad, " " $2 " ") { print $1 "@GLIBC_" $2 }' <<<"$pairs" | sort -u)
    fi
    if [[ ${#too_new[@]} -gt 0 ]]; then
        worst=$(printf '%s\n' "${too_new[@]}" | sed 's/.*@GLIBC_//' | sort -uV | tail -n 1)
        echo "FAIL glibc $name needs GLIBC_$worst > GLIBC_$MAX: ${too_new[*]}"
        failed=1
    elif [[ -z $newest ]]; then
        echo "PASS glibc $name needs at most GLIBC_$MAX (no versioned glibc symbol)"
    else
        echo "PASS glibc $name needs at most GLIBC_$MAX (newest: GLIBC_$newest)"
    fi
done
[[ $files -gt 0 ]] || die "no ELF file in $dir"
exit "$failed"
