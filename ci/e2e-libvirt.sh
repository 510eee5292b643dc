#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# End-to-end check through libvirt: a guest defined from qemu-configs/libvirt-domain.xml
# and started with `virsh start` under Debian's libvirt, its vGPU device on a vhost-vgpu
# socket that QEMU (running as libvirt-qemu) reaches through the group vgpu, as
# qemu-configs/libvirt.md tells a host to be set up. Prints one "PASS libvirt <check>" or
# "FAIL libvirt <check>" line per check (ci/test.sh counts them).
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds (or reuses, through ci/e2e-build.sh) vhost-vgpu, the guest tools, vgpu.ko, the
guest kernel and initramfs and the QEMU with the generic vhost-user device; installs
Debian's libvirt (libvirt-daemon-system, libvirt-clients) if missing; sets the host up
as qemu-configs/libvirt.md says (a group vgpu, which libvirt-qemu joins). Then:

  - vhost-vgpu --executor cpu serves one socket, srwxrwx--- in a directory of the group
    vgpu (as vhost-vgpu.service makes them);
  - a libvirtd of its own runs in a private mount namespace, so that its configuration
    (qemu.conf: QEMU as libvirt-qemu, no security driver, no cgroups, no namespaces),
    state and sockets are all under the work directory, whatever libvirt this machine
    runs or not (no systemd is needed);
  - qemu-configs/libvirt-domain.xml, filled in (type qemu = TCG, the QEMU build as
    <emulator> with -L for its firmware, direct kernel boot with VGPU_PLAN=libvirt,
    serial console to a file), goes through virsh define and virsh start;
  - the guest's results come from the serial file: lspci shows [1af4:1056], vgpu-smi
    shows the device, vgpu-vector-add passes; the guest powers off and libvirt must see
    the domain shut off. Then the domain is undefined and the daemons stopped.

Checks: define, start (QEMU's user and its groups), lspci, vgpu-smi, vector-add,
shutoff. Exits non-zero if any failed. Needs root (apt, the group, unshare).

Options:
  --executor KIND   vhost-vgpu's executor: cpu (default), cuda or auto
  --mem MIB         guest RAM in MiB (default 512)
  --timeout SECS    longest wait for the guest's checks (default 120)
  --keep            keep the work directory (logs, domain XML, libvirt's files)
  -h, --help        show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu), CARGO_TARGET_DIR,
RUST_LOG (vhost-vgpu's log level, default info).
EOF
}

die() { echo "e2e-libvirt.sh: error: $*" >&2; exit 1; }

executor=cpu
mem_mib=512
timeout=120
keep=0
need_arg() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --executor) need_arg "$1" $#; executor=$2; shift ;;
        --mem) need_arg "$1" $#; mem_mib=$2; shift ;;
        --timeout) need_arg "$1" $#; timeout=$2; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
case $executor in cpu | cuda | auto) ;; *) die "--executor wants cpu, cuda or auto, got '$executor'" ;; esac
[[ $mem_mib =~ ^[1-9][0-9]*$ ]] || die "--mem wants MiB, got '$mem_mib'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants whole seconds, got '$timeout'"
[[ $(id -u) -eq 0 ]] || die "run as root (apt, groups, a private mount namespace for libvirtd)"

cd "$REPO_DIR"
# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
e2e_begin e2e-libvirt libvirt
e2e_workdir vgpu-libvirt
# ci/e2e-build.sh explains its steps through say(); this script has nothing to narrate.
say() { :; }

# ---- 1. build (ci/e2e-build.sh) -----------------------------------------------------
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
e2e_build_all

# ---- 2. libvirt and the host setup of qemu-configs/libvirt.md ------------------------
step "libvirt: Debian's libvirt-daemon-system and libvirt-clients; the group vgpu"
# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"
apt_install libvirt-daemon-system libvirt-clients
command -v libvirtd >/dev/null || abort setup "no libvirtd after installing libvirt-daemon-system"
command -v unshare >/dev/null || abort setup "no unshare (util-linux)"
qemu_user=libvirt-qemu
getent passwd "$qemu_user" >/dev/null || abort setup "no user $qemu_user (libvirt-daemon-system creates it)"
# QEMU's user reaches vhost-vgpu's sockets through the group vgpu (libvirt.md, step 3).
if ! getent group vgpu >/dev/null; then
    groupadd --system vgpu
    echo "   created the system group vgpu"
fi
if ! id -nG "$qemu_user" | tr ' ' '\n' | grep -qx vgpu; then
    usermod -a -G vgpu "$qemu_user"
    echo "   added $qemu_user to the group vgpu"
fi
echo "   $(libvirtd --version | head -n 1); $qemu_user: $(id "$qemu_user")"

# QEMU runs as libvirt-qemu: what it opens by path must be reachable by that user. The
# work directory can be entered (not listed); QEMU, the kernel and the initramfs are
# copied out of the cache under $HOME (libvirt's dynamic ownership gives the copies to
# libvirt-qemu while the domain runs, and takes them back after).
chmod 0711 "$work"
mkdir -p "$work/boot" "$work/qemu"
cp "$qemu" "$work/qemu/qemu-system-x86_64"
cp "$kernel" "$work/boot/vmlinuz"
cp "$initrd" "$work/boot/initramfs.cpio.gz"
chmod 0755 "$work/boot" "$work/qemu"
chmod 0644 "$work/boot/vmlinuz" "$work/boot/initramfs.cpio.gz"
emulator=$work/qemu/qemu-system-x86_64

# ---- 3. the backend -------------------------------------------------------------------
step "host: vhost-vgpu --executor $executor, its socket for the group vgpu"
# As vhost-vgpu.service: a directory only the group may enter, sockets srwxrwx---. Here
# the daemon runs as root, so the directory's setgid bit gives the socket the group vgpu
# that systemd's Group= gives it in the service.
sockets=$work/sockets
mkdir -p "$sockets"
chgrp vgpu "$sockets"
chmod 2750 "$sockets"
socket=$sockets/vm0
export RUST_LOG=${RUST_LOG:-info}
(umask 0007 && exec "$target/vhost-vgpu" --socket-path "$sockets/vm" --socket-count 1 \
    --executor "$executor") >"$work/vhost-vgpu.log" 2>&1 &
daemon=$!
pids+=("$daemon")
for ((i = 0; i < 100; i++)); do
    [[ -S $socket ]] && break
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
[[ -S $socket ]] || abort setup "vhost-vgpu did not listen on $socket" "$work/vhost-vgpu.log"
echo "   $(stat -c '%A %U:%G' "$sockets") ${sockets##*/}/, $(stat -c '%A %U:%G' "$socket") ${socket##*/}"

# ---- 4. a libvirtd of its own ---------------------------------------------------------
step "libvirt: libvirtd with a private configuration (mount namespace)"
# libvirt's system paths, bound to directories of the work directory inside the
# daemon's mount namespace; virsh reaches the daemon through the socket's real path.
lv=$work/libvirt
declare -A lv_dirs=([etc]=/etc/libvirt [run]=/run/libvirt [lib]=/var/lib/libvirt
    [log]=/var/log/libvirt [cache]=/var/cache/libvirt)
binds=
for d in "${!lv_dirs[@]}"; do
    mkdir -p "$lv/$d"
    binds+="mkdir -p ${lv_dirs[$d]} && mount --bind $(printf '%q' "$lv/$d") ${lv_dirs[$d]} && "
done
chmod 0755 "$lv"/*
# The domain is TCG (type qemu). A /dev/kvm that QEMU's capability probe can open but
# libvirt then finds unusable for QEMU's user (a container's root-only node, say) makes
# libvirt throw the probe away and probe again, ten times over (40 s). Inside the
# daemon's namespace /dev/kvm is an empty root-only file: QEMU probes without KVM, and
# libvirt agrees that there is none.
if [[ -e /dev/kvm ]]; then
    : >"$lv/no-kvm"
    chmod 0600 "$lv/no-kvm"
    binds+="mount --bind $(printf '%q' "$lv/no-kvm") /dev/kvm && "
fi
cat >"$lv/etc/qemu.conf" <<EOF
# ci/e2e-libvirt.sh: QEMU as Debian's default user, which joined the group vgpu
# (qemu-configs/libvirt.md). No AppArmor/SELinux driver (the test's QEMU has no profile),
# no cgroups and no private /dev (a container may not allow them), logs to files (no
# virtlogd without systemd). Dynamic ownership stays on, as on a real host.
user = "$qemu_user"
group = "$qemu_user"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
EOF
cat >"$lv/etc/libvirtd.conf" <<'EOF'
# ci/e2e-libvirt.sh: local socket only (the default), warnings and errors to a file.
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
unshare --mount --propagation private -- bash -c \
    "${binds}exec libvirtd --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid" \
    >"$work/libvirtd.out" 2>&1 &
libvirtd_pid=$!
pids+=("$libvirtd_pid")
uri="qemu+unix:///system?socket=$lv/run/libvirt-sock"
virsh_() { virsh --quiet -c "$uri" "$@"; }
for ((i = 0; i < 100; i++)); do
    [[ -S $lv/run/libvirt-sock ]] && virsh_ list --all >/dev/null 2>&1 && break
    kill -0 "$libvirtd_pid" 2>/dev/null || break
    sleep 0.1
done
if ! virsh_ list --all >"$work/virsh-list.log" 2>&1; then
    cat "$work/libvirtd.out" "$lv/log/libvirtd.log" >"$work/libvirtd-all.log" 2>/dev/null || true
    abort setup "libvirtd did not answer on $lv/run/libvirt-sock" "$work/libvirtd-all.log"
fi
echo "   libvirtd pid $libvirtd_pid, $uri"

# The domain's XML: libvirt-domain.xml with its placeholders filled in, XML-escaped.
name=vgpu-e2e-$$
serial=$work/serial.log
# Pre-created: libvirt's dynamic ownership hands it to QEMU's user for the run.
: >"$serial"
xml_escape() {
    local s=$1
    s=${s//&/&amp;}
    s=${s//</&lt;}
    s=${s//>/&gt;}
    s=${s//\'/&apos;}
    s=${s//\"/&quot;}
    printf '%s' "$s"
}
declare -A fill=(
    [NAME]=$name
    [TYPE]=qemu
    [EMULATOR]=$emulator
    [MEMORY_MIB]=$mem_mib
    [KERNEL]=$work/boot/vmlinuz
    [INITRD]=$work/boot/initramfs.cpio.gz
    [CMDLINE]="console=ttyS0 panic=-1 quiet no_timer_check VGPU_PLAN=libvirt"
    [SERIAL_LOG]=$serial
    [SOCKET]=${socket//,/,,}
    [DEVICE]=$qemu_device
)
# The template without its leading comment (which names the placeholders).
xml=$(sed '1,/^-->/d' qemu-configs/libvirt-domain.xml)
for key in "${!fill[@]}"; do
    xml=${xml//"@$key@"/"$(xml_escape "${fill[$key]}")"}
done
# -L: the firmware of the QEMU build (Debian's seabios and qemu-system-data), as
# qemu-configs/launch-vm.sh passes it.
extra=
for dir in /usr/share/qemu /usr/share/seabios; do
    [[ -d $dir ]] && extra+="<qemu:arg value='-L'/><qemu:arg value='$(xml_escape "$dir")'/>"
done
xml=${xml//"<!-- @QEMU_EXTRA_ARGS@ -->"/"$extra"}
if grep -n '@[A-Z_]*@' <<<"$xml" >"$work/unfilled.log"; then
    abort define "placeholders left in the domain XML" "$work/unfilled.log"
fi
printf '%s\n' "$xml" >"$work/domain.xml"

# ---- 5. define, start, wait for the guest ---------------------------------------------
step "virsh define and virsh start ($name, TCG)"
defined=0
# On any exit (e2e_cleanup calls it): the domain goes while libvirtd still runs; then
# e2e_cleanup stops libvirtd and vhost-vgpu.
e2e_before_cleanup() {
    if [[ $defined -eq 1 ]]; then
        virsh_ destroy "$name" >/dev/null 2>&1 || true
        virsh_ undefine "$name" >/dev/null 2>&1 || true
    fi
}
if virsh_ define "$work/domain.xml" >"$work/define.log" 2>&1; then
    defined=1
    pass "define $name from qemu-configs/libvirt-domain.xml (type qemu, memfd shared RAM in a NUMA cell, the vGPU through qemu:commandline)"
else
    abort define "virsh define failed" "$work/define.log"
fi
qemu_log=$lv/log/qemu/$name.log
started=$SECONDS
if ! virsh_ start "$name" >"$work/start.log" 2>&1; then
    cat "$work/start.log" "$qemu_log" >"$work/start-all.log" 2>/dev/null || true
    abort start "virsh start failed" "$work/start-all.log"
fi
# Who QEMU runs as, and with which groups: the socket is reachable through vgpu only.
qemu_pid=$(cat "$lv/run/qemu/$name.pid" 2>/dev/null || true)
if [[ -n $qemu_pid ]] && [[ -r /proc/$qemu_pid/status ]]; then
    q_uid=$(awk '/^Uid:/ { print $2 }' "/proc/$qemu_pid/status")
    q_groups=$(awk '/^Groups:/ { $1 = ""; print }' "/proc/$qemu_pid/status")
    q_user=$(getent passwd "$q_uid" | cut -d: -f1)
    group_names=
    for g in $q_groups; do
        group_names+=" $(getent group "$g" | cut -d: -f1)"
    done
    vgpu_gid=$(getent group vgpu | cut -d: -f3)
    if [[ $q_user == "$qemu_user" && " $q_groups " == *" $vgpu_gid "* ]]; then
        pass "start virsh start: QEMU $("$emulator" --version | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p') (pid $qemu_pid) runs as $q_user (groups:${group_names}), connected to ${socket##*/} ($(stat -c '%A %U:%G' "$socket")) through the group vgpu"
    else
        fail "start QEMU pid $qemu_pid runs as ${q_user:-uid $q_uid} (groups:${group_names:- none}), expected $qemu_user in the group vgpu"
    fi
else
    fail "start no QEMU process after virsh start (pid file $lv/run/qemu/$name.pid)"
    show "$qemu_log" 20
fi

# The guest runs its checks and powers off; libvirt then sees the domain shut off.
state=
deadline=$((SECONDS + timeout))
while ((SECONDS < deadline)); do
    state=$(virsh_ domstate "$name" 2>/dev/null || true)
    grep -q '^GUEST-EXIT' "$serial" 2>/dev/null && [[ $state == "shut off" ]] && break
    [[ $state == "shut off" ]] && { sleep 0.5; break; }
    sleep 0.5
done
echo "   the guest ran for $((SECONDS - started)) s; domain state: ${state:-unknown}"

# ---- 6. results -------------------------------------------------------------------------
step "results from the serial console ($(basename "$serial"))"
result() { # CHECK: "PASS detail" / "FAIL detail" / nothing
    tr -d '\r' <"$serial" | sed -n "s/^CHECK $1 \(PASS\|FAIL\) /\1 /p" | tail -n 1
}
bad=0
for c in lspci vgpu-smi vector-add; do
    r=$(result "$c")
    case $r in
        PASS*) pass "$c ${r#PASS }" ;;
        FAIL*) fail "$c ${r#FAIL }"; bad=1 ;;
        *) fail "$c no result from the guest"; bad=1 ;;
    esac
    if [[ $c == vgpu-smi ]]; then
        tr -d '\r' <"$serial" | sed -n 's/^SMI| /    | /p'
    fi
done
if [[ $state == "shut off" ]] && grep -q '^GUEST-EXIT' "$serial"; then
    reason=$(virsh_ domstate --reason "$name" 2>/dev/null || true)
    pass "shutoff the guest powered off after its checks; libvirt: ${reason:-shut off}"
else
    fail "shutoff the domain is '${state:-unknown}' after $timeout s$(grep -q '^GUEST-EXIT' "$serial" || echo ', no GUEST-EXIT on the console')"
    bad=1
fi
if [[ $bad -eq 1 ]]; then
    echo "   the end of the serial console:"
    show "$serial" 25
    echo "   the end of QEMU's log ($qemu_log):"
    show "$qemu_log" 15
    echo "   the end of vhost-vgpu's log:"
    show "$work/vhost-vgpu.log" 10
fi

step "clean up: undefine $name, stop libvirtd and vhost-vgpu"
virsh_ destroy "$name" >/dev/null 2>&1 || true
if virsh_ undefine "$name" >"$work/undefine.log" 2>&1; then
    defined=0
else
    show "$work/undefine.log" 5
fi
verdict
