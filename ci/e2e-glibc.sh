#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The glibc 2.17 build and its packages, end to end: builds the shipped binaries with
# ci/build-glibc217.sh, checks that none needs a glibc symbol newer than 2.17
# (ci/glibc-check.sh), runs them here (--help, info, vhost-vgpu's sockets, the NFS file
# protocol between the 2.17 mediator and client, libvgpu.so from C, the worker test
# suites on the 2.17 worker), then builds the RPMs (ci/build-rpm.sh) and checks them.
# One "PASS <check> ..." / "FAIL <check> ..." line per check (ci/test.sh counts them),
# then a final "PASS e2e-glibc ..." or "FAIL e2e-glibc ..." line; exits non-zero on any
# failure.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [--keep] [--no-rpm]

Builds into target/glibc217 (dist/ the binaries, rpm/ the packages), then checks:
  glibc       objdump -T: no binary needs more than GLIBC_2.17 (one line per binary)
  glibc-run   every binary's --help; vgpu-mediator --executor cpu info; vhost-vgpu
              --executor cpu creates its sockets and exits 0 on SIGTERM; the NFS file
              protocol in a local directory: vgpu-mediator --executor cpu serve --nfs-root
              DIR --vm vm1, vgpu-nfs-client --command 1 and 2, exit 0 on SIGTERM; a C
              program linked against libvgpu.so; vgpu-mediator's test suites process and
              sandbox, built for the same target, on the 2.17 vgpu-executor-worker
  rpm         vgpu-host, vgpu-guest and vgpu-dkms: rpm -qpi, the file lists (rpm -qpl),
              payload gzip or xz, rpmlib features all known to rpm 4.11, no requirement
              above GLIBC_2.17, the scriptlets (users created in %pre; vgpu-dkms: the
              group vgpu, dkms add, build, install and remove), the units' binaries in
              the package; vgpu-guest's libvgpu.so.1 (soname, the link libvgpu.so,
              vgpu.pc through pkg-config); vgpu-dkms's dkms.conf and udev rule

Options:
  --keep      keep the work directory (logs, NFS directory) and print its path
  --no-rpm    skip building and checking the packages
  -h, --help  show this help

Environment: VGPU_CACHE (cache root, default \$HOME/.cache/vgpu).
EOF
}

die() { echo "e2e-glibc.sh: error: $*" >&2; exit 1; }

keep=0
rpm_checks=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --keep) keep=1 ;;
        --no-rpm) rpm_checks=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

cd "$REPO_DIR"
start_time=$SECONDS
export PATH="$HOME/.cargo/bin:$PATH"

# ---- output -------------------------------------------------------------------------
# Only pass() and fail() print lines starting with "PASS " or "FAIL " (ci/test.sh counts
# them); evidence is indented.
passed=0
failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
step() { echo "== $* ($((SECONDS - start_time)) s)"; }
show() { # FILE [LINES]
    [[ -f $1 ]] || return 0
    tail -n "${2:-20}" "$1" | sed 's/^/    | /'
}

# shellcheck source=ci/apt.sh
source "$REPO_DIR/ci/apt.sh"
apt_install gcc libc6-dev cpio rpm2cpio pkgconf

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-glibc.XXXXXX")
vhost=""
server=""
worker=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local p
    for p in $vhost $server $worker; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    if [[ $keep -eq 1 ]]; then echo "work directory: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

finish() {
    local t=$((SECONDS - start_time))
    if [[ $failed -eq 0 ]]; then
        echo "PASS e2e-glibc $passed checks in $t s"
        exit 0
    fi
    echo "FAIL e2e-glibc $failed of $((passed + failed)) checks failed ($t s)"
    exit 1
}

# ---- build --------------------------------------------------------------------------
target=$REPO_DIR/target/glibc217
dist=$target/dist
step "build: ci/build-glibc217.sh --out $dist"
t0=$SECONDS
if bash ci/build-glibc217.sh --out "$dist" --tests "$work/tests" >"$work/build.log" 2>&1; then
    pass "glibc-build 8 binaries and libvgpu.so.1 for x86_64-unknown-linux-gnu.2.17 ($((SECONDS - t0)) s)"
else
    show "$work/build.log" 30
    fail "glibc-build ci/build-glibc217.sh failed"
    finish
fi

# ---- glibc versions -----------------------------------------------------------------
step "glibc: ci/glibc-check.sh $dist"
set +e
bash ci/glibc-check.sh "$dist" >"$work/glibc-check.log" 2>&1
rc=$?
set -e
grep -E '^(PASS|FAIL) ' "$work/glibc-check.log" || true
passed=$((passed + $(grep -c '^PASS ' "$work/glibc-check.log" || true)))
failed=$((failed + $(grep -c '^FAIL ' "$work/glibc-check.log" || true)))
if [[ $rc -ne 0 ]] && ! grep -q '^FAIL ' "$work/glibc-check.log"; then
    show "$work/glibc-check.log"
    fail "glibc ci/glibc-check.sh exited $rc"
fi
n=$(grep -c '^PASS glibc ' "$work/glibc-check.log" || true)
[[ $n -eq 9 ]] || fail "glibc-count $n binaries checked, want 9 (8 binaries and libvgpu.so.1)"

# ---- the binaries run here ----------------------------------------------------------
step "run: the 2.17 binaries on this machine"
for b in vgpu-mediator vgpu-executor-worker vhost-vgpu vgpu-admin vgpu-worker vgpu-nfs-client vgpu-smi vgpu-vector-add; do
    if "$dist/$b" --help >"$work/$b.help" 2>&1 && grep -q '^Usage: ' "$work/$b.help"; then
        pass "glibc-run $b --help: $(grep -m 1 '^Usage: ' "$work/$b.help")"
    else
        show "$work/$b.help" 5
        fail "glibc-run $b --help"
    fi
done

if "$dist/vgpu-mediator" --executor cpu info >"$work/info.out" 2>"$work/info.err" &&
    grep -q '^executor: cpu' "$work/info.out"; then
    pass "glibc-run vgpu-mediator --executor cpu info: $(grep -m 1 '^device: ' "$work/info.out")"
else
    show "$work/info.out" 5; show "$work/info.err" 5
    fail "glibc-run vgpu-mediator --executor cpu info"
fi

# vhost-vgpu: listens on one socket per VM and stops on SIGTERM.
mkdir -p "$work/sock"
"$dist/vhost-vgpu" --executor cpu --socket-path "$work/sock/vm" --socket-count 2 \
    >"$work/vhost.log" 2>&1 &
vhost=$!
for _ in $(seq 100); do
    [[ -S $work/sock/vm0 && -S $work/sock/vm1 ]] && break
    kill -0 "$vhost" 2>/dev/null || break
    sleep 0.1
done
if [[ -S $work/sock/vm0 && -S $work/sock/vm1 ]]; then
    kill "$vhost"
    rc=0; wait "$vhost" || rc=$?
    vhost=""
    if [[ $rc -eq 0 ]]; then
        pass "glibc-run vhost-vgpu --executor cpu: listened on vm0 and vm1, exited 0 on SIGTERM"
    else
        show "$work/vhost.log" 5
        fail "glibc-run vhost-vgpu --executor cpu: exit status $rc on SIGTERM"
    fi
else
    show "$work/vhost.log" 10
    fail "glibc-run vhost-vgpu --executor cpu: no sockets vm0 and vm1 within 10 s"
fi

# The NFS file protocol with the 2.17 mediator and client, in a local directory.
nfs=$work/nfs
mkdir -p "$nfs"
"$dist/vgpu-mediator" --executor cpu serve --nfs-root "$nfs" --vm vm1 >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do
    [[ -f $nfs/vm1/response.txt ]] && break
    sleep 0.1
done
client() { # COMMAND EXPECTED-PREFIX
    local out=$work/client-$1.out
    if "$dist/vgpu-nfs-client" --dir "$nfs/vm1" --command "$1" --timeout 30 >"$out" 2>&1 &&
        grep -q "^SUCCESS: $2" "$out"; then
        pass "glibc-nfs command $1: $(grep -m 1 '^SUCCESS' "$out")"
    else
        show "$out" 5; show "$work/serve.log" 10
        fail "glibc-nfs command $1: $(head -n 1 "$out")"
    fi
}
client 1 "Vector add PASSED: 1024 elements, 0 errors"
client 2 "CPU reference executor"
kill "$server"
rc=0; wait "$server" || rc=$?
server=""
if [[ $rc -eq 0 ]]; then
    pass "glibc-nfs shutdown: vgpu-mediator serve exited 0 on SIGTERM"
else
    show "$work/serve.log" 5
    fail "glibc-nfs shutdown: vgpu-mediator serve exit status $rc"
fi

# The worker-VM layout with the 2.17 binaries (a Dom0 mediator and a GPU worker): the
# same protocol through vgpu-worker over loopback TCP.
(umask 077 && "$dist/vgpu-worker" keygen glibc-check >"$work/remote.key")
cp "$work/remote.key" "$work/worker.keys"
chmod 600 "$work/worker.keys"
port=$((19000 + RANDOM % 1000))
VGPU_EXECUTOR_WORKER=$dist/vgpu-executor-worker "$dist/vgpu-worker" --executor cpu \
    --listen "127.0.0.1:$port" --keys "$work/worker.keys" >"$work/worker.log" 2>&1 &
worker=$!
rm -rf "$nfs" && mkdir -p "$nfs"
"$dist/vgpu-mediator" --executor "remote:127.0.0.1:$port" --remote-key "$work/remote.key" \
    serve --nfs-root "$nfs" --vm vm1 >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do
    [[ -f $nfs/vm1/response.txt ]] && break
    sleep 0.1
done
client 1 "Vector add PASSED: 1024 elements, 0 errors"
kill "$server" "$worker" 2>/dev/null
wait "$server" "$worker" 2>/dev/null
server=""
worker=""
if grep -q "mediator 'glibc-check' connected" "$work/worker.log"; then
    pass "glibc-remote: vgpu-mediator --executor remote served command 1 through vgpu-worker"
else
    show "$work/worker.log" 10
    fail "glibc-remote: the worker log shows no session of the mediator"
fi

# libvgpu.so from C: loads, resolves, and answers without a device.
cat >"$work/libcheck.c" <<'EOF'
#include <stdio.h>
#include <string.h>
#include "vgpu.h"
int main(void) {
    vgpu_session *s = NULL;
    vgpu_status st = vgpu_open_path("/nonexistent/vgpu0", &s);
    const char *name = vgpu_status_name(st);
    if (st == 0 || s != NULL || name == NULL || strlen(name) == 0) return 1;
    printf("vgpu_open_path(/nonexistent/vgpu0) = %s\n", name);
    return 0;
}
EOF
if gcc -O0 -I "$dist" -o "$work/libcheck" "$work/libcheck.c" -L "$dist" -lvgpu >"$work/libcheck.log" 2>&1 &&
    LD_LIBRARY_PATH=$dist "$work/libcheck" >>"$work/libcheck.log" 2>&1; then
    pass "glibc-run libvgpu.so from C: $(tail -n 1 "$work/libcheck.log")"
else
    show "$work/libcheck.log" 10
    fail "glibc-run libvgpu.so from C"
fi

# The worker suites: every case starts the 2.17 vgpu-executor-worker, confined.
for t in process sandbox; do
    if "$work/tests/$t" >"$work/test-$t.log" 2>&1; then
        pass "glibc-worker $t tests on the 2.17 worker: $(grep -m 1 '^test result:' "$work/test-$t.log")"
    else
        grep -E '^test .* FAILED|panicked' "$work/test-$t.log" | head -n 10 | sed 's/^/    | /'
        fail "glibc-worker $t tests: $(grep -m 1 '^test result:' "$work/test-$t.log" || echo 'did not finish')"
    fi
done

[[ $rpm_checks -eq 1 ]] || finish

# ---- packages -----------------------------------------------------------------------
step "rpm: ci/build-rpm.sh --bin-dir $dist"
if bash ci/build-rpm.sh --bin-dir "$dist" --out "$target/rpm" >"$work/rpm.out" 2>"$work/rpm.log"; then
    mapfile -t rpms <"$work/rpm.out"
    pass "rpm-build ${rpms[*]##*/}"
else
    show "$work/rpm.log" 30
    fail "rpm-build ci/build-rpm.sh failed"
    finish
fi

# What rpm 4.11 (CentOS 7, XCP-ng Dom0) knows (lib/rpmds.c, rpmlibProvides, 4.11.3).
RPM411_FEATURES="VersionedDependencies CompressedFileNames PayloadIsBzip2 PayloadIsXz"
RPM411_FEATURES+=" PayloadIsLzma PayloadFilesHavePrefix ExplicitPackageProvide"
RPM411_FEATURES+=" HeaderLoadSortsTags ScriptletInterpreterArgs PartialHardlinkSets"
RPM411_FEATURES+=" ConcurrentAccess BuiltinLuaScripts FileDigests FileCaps"
RPM411_FEATURES+=" ScriptletExpansion TildeInVersions"

rpm_check() { # PACKAGE-FILE KIND WANTED-FILE...
    local f=$1 kind=$2 name want missing=() unknown=() too_new=() comp newest
    shift 2
    name=$(basename "$f" .rpm)
    name=${name%.*}
    if rpm -qpi "$f" >"$work/$kind.qpi" 2>&1; then
        pass "rpm-info $name: $(grep -m 1 '^Summary' "$work/$kind.qpi" | sed 's/  */ /g')"
        sed 's/^/    | /' "$work/$kind.qpi" | grep -E '\| (Name|Version|Release|Architecture|Size|License) *:'
    else
        show "$work/$kind.qpi"; fail "rpm-info $name: rpm -qpi failed"
    fi
    rpm -qpl "$f" >"$work/$kind.qpl" 2>&1 || true
    for want in "$@"; do grep -qx "$want" "$work/$kind.qpl" || missing+=("$want"); done
    if [[ ${#missing[@]} -eq 0 ]]; then
        pass "rpm-files $name: $(wc -l <"$work/$kind.qpl") paths, $# checked"
        sed 's/^/    | /' "$work/$kind.qpl"
    else
        fail "rpm-files $name lacks ${missing[*]}"
    fi
    comp=$(rpm -qp --qf '%{PAYLOADCOMPRESSOR}' "$f" 2>&1)
    if [[ $comp == gzip || $comp == xz ]]; then
        pass "rpm-payload $name: $comp"
    else
        fail "rpm-payload $name: '$comp', want gzip or xz (rpm 4.11 reads no zstd)"
    fi
    rpm -qp --requires "$f" >"$work/$kind.requires" 2>&1 || true
    while read -r req _; do
        [[ $req == rpmlib\(*\) ]] || continue
        req=${req#rpmlib(}; req=${req%)}
        [[ " $RPM411_FEATURES " == *" $req "* ]] || unknown+=("rpmlib($req)")
    done <"$work/$kind.requires"
    if [[ ${#unknown[@]} -eq 0 ]]; then
        pass "rpm-rpmlib $name: $(grep -o '^rpmlib([A-Za-z]*)' "$work/$kind.requires" | tr '\n' ' ')all known to rpm 4.11"
    else
        fail "rpm-rpmlib $name needs what rpm 4.11 lacks: ${unknown[*]}"
    fi
    mapfile -t too_new < <(grep -oE 'GLIBC_[0-9.]+' "$work/$kind.requires" | sort -u |
        while read -r v; do
            [[ $(printf '2.17\n%s\n' "${v#GLIBC_}" | sort -V | tail -n 1) == 2.17 ]] || echo "$v"
        done)
    if [[ ${#too_new[@]} -eq 0 ]]; then
        newest=$(grep -oE 'GLIBC_[0-9.]+' "$work/$kind.requires" | sort -uV | tail -n 1 || true)
        pass "rpm-requires $name: ${newest:+newest glibc }${newest:-no glibc symbol required}"
    else
        fail "rpm-requires $name requires ${too_new[*]}"
    fi
    if rpm -Kv "$f" >"$work/$kind.digests" 2>&1 &&
        grep -q 'Header SHA1 digest: OK' "$work/$kind.digests" &&
        grep -q 'MD5 digest: OK' "$work/$kind.digests"; then
        pass "rpm-digests $name: header SHA1 and MD5 digests present (rpm 4.11 checks those)"
    else
        show "$work/$kind.digests"; fail "rpm-digests $name: no header SHA1 or MD5 digest"
    fi
}

host_rpm=${rpms[0]}
guest_rpm=${rpms[1]}
dkms_rpm=${rpms[2]:-}
rpm_check "$host_rpm" host /usr/bin/vgpu-mediator /usr/bin/vgpu-executor-worker /usr/bin/vhost-vgpu /usr/bin/vgpu-admin /usr/bin/vgpu-worker \
    /usr/lib/systemd/system/vhost-vgpu.service /usr/lib/systemd/system/vgpu-mediator-nfs.service /usr/lib/systemd/system/vgpu-worker.service \
    /usr/lib/tmpfiles.d/vhost-vgpu.conf /var/vgpu
rpm_check "$guest_rpm" guest /usr/bin/vgpu-nfs-client /usr/bin/vgpu-smi /usr/bin/vgpu-vector-add \
    /usr/lib64/libvgpu.so.1 /usr/lib64/libvgpu.so /usr/lib64/pkgconfig/vgpu.pc \
    /usr/include/vgpu.h /usr/include/vgpu_ioctl.h
version=$(rpm -qp --qf '%{VERSION}' "$guest_rpm")
rpm_check "$dkms_rpm" dkms "/usr/src/vgpu-$version/dkms.conf" "/usr/src/vgpu-$version/Makefile" \
    "/usr/src/vgpu-$version/vgpu.c" "/usr/src/vgpu-$version/vgpu_ioctl.h" /usr/lib/udev/rules.d/60-vgpu.rules

# The scriptlets, run here with stand-ins for getent (nobody exists), useradd, groupadd,
# systemctl and systemd-tmpfiles that only record their arguments: a first install
# creates both users and their groups, and every scriptlet exits 0.
stubs=$work/stubs
mkdir -p "$stubs"
printf '#!/bin/sh\nexit 2\n' >"$stubs/getent"
for c in useradd groupadd systemctl systemd-tmpfiles; do
    printf '#!/bin/sh\necho "%s $*" >>"%s"\n' "$c" "$work/scriptlets.log" >"$stubs/$c"
done
chmod +x "$stubs"/*
: >"$work/scriptlets.log"
bad=()
for s in PREIN:1 POSTIN:1 PREUN:0 POSTUN:0; do
    rpm -qp --qf "%{${s%:*}}" "$host_rpm" >"$work/${s%:*}.sh" 2>/dev/null || true
    PATH=$stubs:$PATH sh "$work/${s%:*}.sh" "${s#*:}" >>"$work/scriptlets.log" 2>&1 || bad+=("${s%:*} exited $?")
done
for u in vgpu vgpu-worker; do
    grep -q "^groupadd -r $u\$" "$work/scriptlets.log" || bad+=("no group $u")
    grep -q "^useradd -r .*-g $u .* $u\$" "$work/scriptlets.log" || bad+=("no user $u")
done
if [[ ${#bad[@]} -eq 0 ]]; then
    pass "rpm-scripts vgpu-host: install then erase, every scriptlet exits 0; %pre creates the users vgpu and vgpu-worker"
    sed 's/^/    | /' "$work/scriptlets.log"
else
    show "$work/scriptlets.log"
    fail "rpm-scripts vgpu-host: ${bad[*]}"
fi

# The packaged units start binaries the package ships, and the binaries in the package
# are the ones of the 2.17 build.
rm -rf "$work/host-root" && mkdir -p "$work/host-root"
(cd "$work/host-root" && rpm2cpio "$host_rpm" | cpio -idm --quiet) 2>"$work/cpio.log" || true
bad=()
for unit in vhost-vgpu.service vgpu-mediator-nfs.service vgpu-worker.service; do
    exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$work/host-root/usr/lib/systemd/system/$unit" 2>/dev/null)
    [[ -n $exe && -x $work/host-root$exe ]] || bad+=("$unit:${exe:-no ExecStart}")
done
for b in vgpu-mediator vgpu-executor-worker vhost-vgpu vgpu-admin vgpu-worker; do
    cmp -s "$work/host-root/usr/bin/$b" "$dist/$b" || bad+=("/usr/bin/$b differs from $dist/$b")
done
if [[ ${#bad[@]} -eq 0 ]]; then
    pass "rpm-units vgpu-host: ExecStart of the three units names a binary in the package ($(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$work/host-root"/usr/lib/systemd/system/*.service | tr '\n' ' ')), binaries as built"
else
    show "$work/cpio.log"
    fail "rpm-units vgpu-host: ${bad[*]}"
fi


# vgpu-guest's library: its soname, the development link, the pkg-config file.
rm -rf "$work/guest-root" && mkdir -p "$work/guest-root"
(cd "$work/guest-root" && rpm2cpio "$guest_rpm" | cpio -idm --quiet) 2>"$work/cpio.log" || true
g=$work/guest-root
soname=$(readelf -d "$g/usr/lib64/libvgpu.so.1" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
pc_out="$(PKG_CONFIG_LIBDIR=$g/usr/lib64/pkgconfig pkg-config --modversion vgpu 2>&1) $(PKG_CONFIG_LIBDIR=$g/usr/lib64/pkgconfig pkg-config --cflags --libs vgpu 2>&1)"
pc_out=${pc_out% }
pc_libdir=$(PKG_CONFIG_LIBDIR=$g/usr/lib64/pkgconfig pkg-config --variable=libdir vgpu 2>&1)
provides=$(rpm -qp --provides "$guest_rpm" 2>&1 | tr '\n' ' ')
if [[ $soname == libvgpu.so.1 && $(readlink "$g/usr/lib64/libvgpu.so") == libvgpu.so.1 &&
    $pc_libdir == /usr/lib64 && $pc_out == "$version "*-lvgpu* && $provides == *'libvgpu.so.1()(64bit)'* ]]; then
    pass "rpm-guest-lib vgpu-guest: /usr/lib64/libvgpu.so.1 SONAME $soname, libvgpu.so -> libvgpu.so.1, vgpu.pc: $pc_out (libdir $pc_libdir); provides libvgpu.so.1()(64bit)"
else
    show "$work/cpio.log"
    fail "rpm-guest-lib vgpu-guest: SONAME '$soname', libvgpu.so -> '$(readlink "$g/usr/lib64/libvgpu.so")', vgpu.pc '$pc_out' libdir '$pc_libdir', provides: $provides"
fi

# vgpu-dkms: dkms.conf and the udev rule as packaged; its scriptlets with stand-ins for
# getent (nobody exists), groupadd, dkms, udevadm and modprobe that record their arguments.
rm -rf "$work/dkms-root" && mkdir -p "$work/dkms-root"
(cd "$work/dkms-root" && rpm2cpio "$dkms_rpm" | cpio -idm --quiet) 2>"$work/cpio.log" || true
conf=$work/dkms-root/usr/src/vgpu-$version/dkms.conf
rule=$work/dkms-root/usr/lib/udev/rules.d/60-vgpu.rules
if grep -qx "PACKAGE_VERSION=\"$version\"" "$conf" 2>/dev/null && grep -qx 'AUTOINSTALL="yes"' "$conf" &&
    grep -q '^SUBSYSTEM=="vgpu", .*GROUP="vgpu", MODE="0660"' "$rule" 2>/dev/null; then
    pass "rpm-dkms-files vgpu-dkms: dkms.conf PACKAGE_VERSION=\"$version\" AUTOINSTALL=\"yes\"; 60-vgpu.rules: $(grep -v '^#' "$rule")"
else
    show "$work/cpio.log"
    fail "rpm-dkms-files vgpu-dkms: dkms.conf or 60-vgpu.rules not as expected"
fi
for c in dkms udevadm modprobe; do
    printf '#!/bin/sh\necho "%s $*" >>"%s"\n' "$c" "$work/dkms-scriptlets.log" >"$stubs/$c"
done
printf '#!/bin/sh\necho "groupadd $*" >>"%s"\n' "$work/dkms-scriptlets.log" >"$stubs/groupadd"
chmod +x "$stubs"/*
: >"$work/dkms-scriptlets.log"
bad=()
for s in PREIN:1 POSTIN:1 PREUN:0; do
    rpm -qp --qf "%{${s%:*}}" "$dkms_rpm" >"$work/dkms-${s%:*}.sh" 2>/dev/null || true
    PATH=$stubs:$PATH sh "$work/dkms-${s%:*}.sh" "${s#*:}" >>"$work/dkms-scriptlets.log" 2>&1 || bad+=("${s%:*} exited $?")
done
for want in "groupadd -r vgpu" "dkms add -m vgpu -v $version" "dkms build -m vgpu -v $version" \
    "dkms install -m vgpu -v $version" "dkms remove -m vgpu -v $version"; do
    grep -q "^$want" "$work/dkms-scriptlets.log" || bad+=("no '$want'")
done
if [[ ${#bad[@]} -eq 0 ]]; then
    pass "rpm-scripts vgpu-dkms: install then erase, every scriptlet exits 0; %pre creates the group vgpu, %post dkms add, build and install, %preun dkms remove"
    sed 's/^/    | /' "$work/dkms-scriptlets.log"
else
    show "$work/dkms-scriptlets.log"
    fail "rpm-scripts vgpu-dkms: ${bad[*]}"
fi

finish
