#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Checks the systemd units of qemu-configs/ without a running systemd (CI and this kind of
# machine have none as PID 1): systemd-analyze verify over copies whose ExecStart binaries
# are the ones cargo built, the hardening each unit must keep, the socket directory QEMU's
# user reaches through the group, and the tmpfiles entries of packaging/ against the units.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--bin-dir DIR] [--no-security]

For each unit in qemu-configs/ (*.service, *.socket):
  - systemd-analyze verify on a copy in which /usr/local/bin/NAME is the built binary
    (DIR/NAME, else \$CARGO_TARGET_DIR/{release,debug}/NAME, else cargo build --bin NAME);
    any message it prints fails the check (unknown keys are only warnings to systemd);
  - the hardening: NoNewPrivileges=yes, ProtectSystem=strict, ProtectHome=yes,
    PrivateTmp=yes, DevicePolicy=closed with DeviceAllow= only for char-nvidia-* nodes,
    RestrictAddressFamilies= (with AF_INET/AF_INET6 when ExecStart has --metrics), a
    CapabilityBoundingSet=; a non-root User= or else a bounded capability set;
  - a unit whose RuntimeDirectory= holds vhost-user sockets (ExecStart --socket-path under
    it) runs as a non-root user with a non-root Group=, RuntimeDirectoryMode= lets only
    that group in (0750 or 0770) and UMask= gives the group read and write on the sockets.
For each tmpfiles entry in packaging/ (*.tmpfiles): systemd-tmpfiles --create into a
temporary root (users from the units), and a directory that is a unit's RuntimeDirectory=
gets the unit's User=, Group= and RuntimeDirectoryMode=.
Then systemd-analyze security --offline=yes for each service, for the log only (no check).

Prints one "ok ..." line per unit or entry that passes and "error: ..." per problem;
exits 1 if there was any problem. Needs systemd-analyze and systemd-tmpfiles (Debian's
systemd package, installed by ci/setup.sh), not a running systemd.

Options:
  --bin-dir DIR    take the ExecStart binaries from DIR
  --no-security    skip the systemd-analyze security report
  -h, --help       show this help
EOF
}

die() { echo "verify-units.sh: error: $*" >&2; exit 2; }

bin_dir=
security=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --bin-dir) [[ $# -ge 2 ]] || die "--bin-dir needs a value"; bin_dir=$2; shift ;;
        --no-security) security=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
cd "$REPO_DIR"
for tool in systemd-analyze systemd-tmpfiles; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian package systemd; ci/setup.sh installs it)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-units.XXXXXX")
trap 'rm -rf "$work"' EXIT
problems=0
problem() { echo "error: $*"; problems=$((problems + 1)); }

mapfile -t units < <(find qemu-configs -maxdepth 1 -type f \( -name '*.service' -o -name '*.socket' \) | LC_ALL=C sort)
mapfile -t tmpfiles < <(find packaging qemu-configs -type f -name '*.tmpfiles' | LC_ALL=C sort)
[[ ${#units[@]} -gt 0 ]] || die "no units in qemu-configs/"
echo "$(systemd-analyze --version | head -n 1); units: ${units[*]}; tmpfiles: ${tmpfiles[*]:-none}"

# The values of KEY in a unit file, one a line (the last one counts for most keys).
values() { # FILE KEY
    sed -n "s/^$2=//p" "$1"
}
last() { # FILE KEY
    values "$1" "$2" | tail -n 1
}

# The built binary for /usr/local/bin/NAME.
target_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}
find_binary() { # NAME
    local d
    for d in ${bin_dir:+"$bin_dir"} "$target_dir/release" "$target_dir/debug"; do
        [[ -x $d/$1 ]] && { echo "$d/$1"; return 0; }
    done
    echo "verify-units.sh: building $1 (cargo build --locked --bin $1)" >&2
    export PATH="$HOME/.cargo/bin:$PATH"
    cargo build --locked --bin "$1" >"$work/cargo-$1.log" 2>&1 || {
        tail -n 20 "$work/cargo-$1.log" >&2
        return 1
    }
    [[ -x $target_dir/debug/$1 ]] && echo "$target_dir/debug/$1"
}

# ---- systemd-analyze verify on copies with the built binaries ----------------------
mkdir -p "$work/units"
copies=()
for unit in "${units[@]}"; do
    name=${unit##*/}
    sed_args=()
    while read -r exe; do
        [[ $exe == /usr/local/bin/* ]] || continue
        built=$(find_binary "${exe##*/}") || { problem "$name: no built binary for $exe"; continue; }
        sed_args+=(-e "s|$exe\\b|$built|g")
    done < <(sed -n 's/^Exec[A-Za-z]*=[-+!@:]*\([^ ]*\).*/\1/p' "$unit" | sort -u)
    if [[ ${#sed_args[@]} -gt 0 ]]; then
        sed "${sed_args[@]}" "$unit" >"$work/units/$name"
    else
        cp "$unit" "$work/units/$name"
    fi
    copies+=("$work/units/$name")
done
if out=$(systemd-analyze verify "${copies[@]}" 2>&1) && [[ -z $out ]]; then
    echo "ok systemd-analyze verify: ${units[*]##*/}"
else
    problem "systemd-analyze verify:"
    printf '%s\n' "$out" | sed 's/^/    | /'
fi

# ---- hardening and socket permissions ----------------------------------------------
# Octal helpers: the group and other digits of a mode such as 0750.
digit() { # MODE INDEX-FROM-RIGHT (0 = other, 1 = group)
    local m=$1
    echo "${m:$((${#m} - 1 - $2)):1}"
}
for unit in "${units[@]}"; do
    name=${unit##*/}
    [[ $name == *.service ]] || continue
    before=$problems
    for want in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
        DevicePolicy=closed; do
        [[ $(last "$unit" "${want%%=*}") == "${want#*=}" ]] || problem "$name: no $want"
    done
    mapfile -t allow < <(values "$unit" DeviceAllow)
    [[ ${#allow[@]} -gt 0 ]] || problem "$name: no DeviceAllow= for the NVIDIA nodes"
    for a in "${allow[@]}"; do
        [[ $a == char-nvidia-* ]] || problem "$name: DeviceAllow=$a is not an NVIDIA node"
    done
    families=$(last "$unit" RestrictAddressFamilies)
    [[ -n $families ]] || problem "$name: no RestrictAddressFamilies="
    if values "$unit" ExecStart | grep -q -- '--metrics'; then
        [[ $families == *AF_INET* ]] || problem "$name: ExecStart serves --metrics over TCP but RestrictAddressFamilies=$families"
    fi
    caps_set=$(grep -c '^CapabilityBoundingSet=' "$unit" || true)
    caps=$(last "$unit" CapabilityBoundingSet)
    [[ $caps_set -gt 0 ]] || problem "$name: no CapabilityBoundingSet="
    user=$(last "$unit" User)
    group=$(last "$unit" Group)
    if [[ -z $user || $user == root || $user == 0 ]]; then
        # Root only with a short list of capabilities, never CAP_SYS_ADMIN.
        if [[ -z $caps || $caps == *CAP_SYS_ADMIN* ]]; then
            problem "$name: runs as root with CapabilityBoundingSet='$caps'"
        fi
    fi
    rundir=$(last "$unit" RuntimeDirectory)
    socket_path=$(values "$unit" ExecStart | sed -n 's/.*--socket-path \([^ ]*\).*/\1/p' | head -n 1)
    if [[ -n $socket_path ]]; then
        # vhost-user sockets that QEMU connects to: group access, nobody else.
        mode=$(last "$unit" RuntimeDirectoryMode)
        umask_=$(last "$unit" UMask)
        [[ -n $rundir && $socket_path == /run/$rundir/* ]] ||
            problem "$name: --socket-path $socket_path is not in its RuntimeDirectory=${rundir:-(none)}"
        [[ -n $user && $user != root ]] || problem "$name: serves vhost-user sockets as root"
        [[ -n $group && $group != root ]] || problem "$name: no Group= for QEMU's user to join"
        [[ $mode =~ ^0?7[57]0$ ]] || problem "$name: RuntimeDirectoryMode=${mode:-(default 0755)}: want 0750 or 0770"
        if [[ ! $umask_ =~ ^0?[0-7]{3}$ ]]; then
            problem "$name: UMask=${umask_:-(default 0022)}: the sockets need group rw"
        else
            g=$(digit "$umask_" 1)
            o=$(digit "$umask_" 0)
            ((g & 6)) && problem "$name: UMask=$umask_ takes read/write from the sockets' group"
            ((o == 7)) || problem "$name: UMask=$umask_ leaves the sockets open to others"
        fi
    fi
    [[ $problems -eq $before ]] && echo "ok $name: hardened (User=${user:-root}${group:+ Group=$group}, CapabilityBoundingSet=${caps:-(none)}, DeviceAllow=${allow[*]}, RestrictAddressFamilies=$families${rundir:+, RuntimeDirectory=$rundir $(last "$unit" RuntimeDirectoryMode)})"
done

# ---- tmpfiles entries against the units --------------------------------------------
# A root with the users and groups of the units and entries (uid/gid 900 and up), so that
# systemd-tmpfiles resolves them there and not on this machine.
root=$work/root
mkdir -p "$root/etc"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
id=900
declare -A uid_of gid_of
mapfile -t names < <(
    for unit in "${units[@]}"; do last "$unit" User; last "$unit" Group; done
    cat "${tmpfiles[@]}" /dev/null | grep -v '^[[:space:]]*\(#\|$\)' | awk '{ print $4; print $5 }'
)
for n in "${names[@]}"; do
    [[ -z $n || $n == - || $n == root || -n ${uid_of[$n]:-} ]] && continue
    uid_of[$n]=$id
    gid_of[$n]=$id
    echo "$n:x:$id:$id::/nonexistent:/usr/sbin/nologin" >>"$root/etc/passwd"
    echo "$n:x:$id:" >>"$root/etc/group"
    id=$((id + 1))
done
for tf in "${tmpfiles[@]}"; do
    before=$problems
    if ! out=$(systemd-tmpfiles --root="$root" --create "$REPO_DIR/$tf" 2>&1) || [[ -n $out ]]; then
        problem "systemd-tmpfiles --create $tf:"
        printf '%s\n' "$out" | sed 's/^/    | /'
        continue
    fi
    # Each directory entry under /run that is some unit's RuntimeDirectory=.
    while read -r type path mode user group _; do
        [[ $type == d* && $path == /run/* ]] || continue
        for unit in "${units[@]}"; do
            [[ $(last "$unit" RuntimeDirectory) == "${path#/run/}" ]] || continue
            want_user=$(last "$unit" User)
            want_group=$(last "$unit" Group)
            want_mode=$(last "$unit" RuntimeDirectoryMode)
            want_user=${want_user:-root}
            want_group=${want_group:-$want_user}
            [[ $user == "$want_user" && $group == "$want_group" && $((8#$mode)) -eq $((8#${want_mode:-0755})) ]] ||
                problem "$tf: $path is $mode $user:$group, ${unit##*/} makes it ${want_mode:-0755} $want_user:$want_group"
            # What systemd-tmpfiles made of it: mode, uid, gid in the temporary root.
            got=$(stat -c '%a %u %g' "$root$path" 2>/dev/null || echo missing)
            want=$(printf '%o %s %s' "$((8#$mode))" "${uid_of[$user]:-0}" "${gid_of[$group]:-0}")
            [[ $got == "$want" ]] || problem "$tf: systemd-tmpfiles made $path '$got', not '$want'"
        done
    done < <(grep -v '^[[:space:]]*\(#\|$\)' "$tf")
    [[ $problems -eq $before ]] && echo "ok $tf: systemd-tmpfiles creates it; its directories match the units' RuntimeDirectory="
done

# ---- exposure report (log only) -----------------------------------------------------
if [[ $security -eq 1 ]]; then
    for unit in "${units[@]}"; do
        [[ $unit == *.service ]] || continue
        echo "-- systemd-analyze security --offline=yes ${unit##*/} (for the log, not a check)"
        systemd-analyze security --offline=yes --no-pager "$work/units/${unit##*/}" 2>&1 |
            sed 's/[[:space:]]*$//' | grep -E '^(✗|→)' || true
    done
fi

if [[ $problems -gt 0 ]]; then
    echo "verify-units.sh: $problems problem(s)"
    exit 1
fi
echo "verify-units.sh: every unit and tmpfiles entry checked"
