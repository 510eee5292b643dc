#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Unmodified CUDA programs on a GPU machine, natively and in a QEMU guest (TCG) over
# vhost-vgpu --executor cuda: cudarc's own examples (driver API and NVRTC),
# ci/guest/cuda-driver-check.c and vgpu-cudarc-check with a PTX module, and CUDA runtime
# programs that nvcc builds here (ci/cuda-programs: two with -cudart shared, one with
# -cudart static). Prints a PASS/FAIL line per program in the guest and a table of both
# runs last.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") DIR [--timeout SECS] [--keep]

DIR is a GPU bundle: DIR/guests from ci/gpu-bundle.sh, vhost-vgpu and
vgpu-executor-worker, and from ci/gpu-programs-bundle.sh cuda-driver-check,
vgpu-cudarc-check and DIR/cudarc-examples (cudarc's example binaries, sin.ptx beside
them).
Needs nvcc (PATH or /usr/local/cuda/bin) and python3. The guest's programs come in a
second initramfs appended to the bundle's.

  --timeout SECS   longest wait for the guest (default 600)
  --keep           keep the work directory
  -h, --help       show this help

VGPU_PROGRAMS_LOGS=DIR: copy the guest's console, the native run's output and
vhost-vgpu's log there.
EOF
}

die() { echo "gpu-programs.sh: error: $*" >&2; exit 1; }

dir=
timeout=600
keep=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; timeout=$2; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $dir ]] || die "one DIR only"; dir=$1 ;;
    esac
    shift
done
[[ -n $dir ]] || { usage >&2; exit 2; }
dir=$(cd "$dir" && pwd)
for f in cuda-driver-check vgpu-cudarc-check; do
    [[ -x $dir/$f ]] || die "$dir/$f missing"
done
[[ -d $dir/cudarc-examples ]] || die "$dir/cudarc-examples missing"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[[ -x $nvcc ]] || die "nvcc not found"
command -v python3 >/dev/null || die "python3 not found"

# shellcheck source=ci/e2e-lib.sh
source "$REPO_DIR/ci/e2e-lib.sh"
# shellcheck source=ci/e2e-build.sh
source "$REPO_DIR/ci/e2e-build.sh"
e2e_begin gpu-programs programs
e2e_workdir vgpu-programs
cd "$REPO_DIR"

# ---- the programs: one tree, run natively and copied into the guest -------------------
step "build: nvcc programs (-cudart shared), the PTX of vector_add_f32, the tree"
tree=$work/programs
mkdir -p "$tree/bin" "$tree/cudarc/examples" "$tree/native-lib"
cp "$dir"/cudarc-examples/* "$tree/cudarc/" 2>/dev/null || true
mv "$tree/cudarc/sin.ptx" "$tree/cudarc/examples/sin.ptx" 2>/dev/null || true
cp "$dir/cuda-driver-check" "$dir/vgpu-cudarc-check" "$tree/bin/"
cp ci/cuda-programs/run.sh "$tree/run.sh"
for p in vector_add matmul_tiled; do
    quiet "nvcc-$p" "$work/nvcc.log" "$nvcc" -O2 -cudart shared -arch=native \
        -o "$tree/bin/$p" "ci/cuda-programs/$p.cu"
done
# And with the runtime linked in, nvcc's default.
quiet nvcc-vector_add_static "$work/nvcc.log" "$nvcc" -O2 -cudart static -arch=native \
    -o "$tree/bin/vector_add_static" ci/cuda-programs/vector_add.cu
quiet nvcc-ptx "$work/nvcc.log" "$nvcc" -ptx -arch=compute_90 -include kernels/cuda/common.cuh \
    -o "$tree/vector_add_f32.ptx" kernels/cuda/vector_add_f32.cu
cuda_inc=$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include
if cc -std=c11 -fsyntax-only -I "$cuda_inc" ci/guest/cuda-driver-check.c 2>"$work/cc.log"; then
    pass "native-header cuda-driver-check.c builds against NVIDIA's cuda.h ($cuda_inc)"
else
    fail "native-header cuda-driver-check.c does not build against NVIDIA's cuda.h: $(tail -n 1 "$work/cc.log")"
fi
# The loader and libraries the nvcc programs use, for the guest (whose own C library may
# be older than the one they were linked with).
while read -r lib; do
    [[ -f $lib ]] && cp -L "$lib" "$tree/native-lib/"
done < <(ldd "$tree/bin/vector_add" "$tree/bin/matmul_tiled" "$tree/bin/vector_add_static" | awk '/=>/ { print $3 } /ld-linux/ && !/=>/ { print $1 }' | sort -u)
[[ -f $tree/native-lib/ld-linux-x86-64.so.2 ]] || die "no ld-linux-x86-64.so.2 among the nvcc programs' libraries"
rm -f "$tree/native-lib/libcuda.so"*
echo "   $(find "$tree" -type f | wc -l) files, $(du -sh "$tree" | cut -f1)"

# ---- natively ---------------------------------------------------------------------------
step "native: the programs on the host's CUDA driver"
sh "$tree/run.sh" "$tree" native 2>&1 | tee "$work/native.out" | grep -v '^    |' || true
# What the programs measured themselves, for the comparison with the guest below.
grep -E '^    \| .*(between its events|PASSED|Found|in [0-9.]+ms)' "$work/native.out" |
    sed 's/^    | /   native: /' || true

# ---- in a guest -----------------------------------------------------------------------
e2e_use_bundle "$dir"
step "guest: vhost-vgpu --executor cuda, one guest with the programs appended to its initramfs"
python3 - "$work/programs.cpio" "$tree" <<'PY'
import os, sys
out, root = sys.argv[1], sys.argv[2]
ino = [1000]
def entry(f, name, mode, data=b""):
    ino[0] += 1
    hdr = "070701" + "".join("%08X" % v for v in (
        ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
    f.write(hdr.encode() + name.encode() + b"\0")
    f.write(b"\0" * ((4 - (110 + len(name) + 1) % 4) % 4))
    f.write(data)
    f.write(b"\0" * ((4 - len(data) % 4) % 4))
with open(out, "wb") as f:
    for d in ("opt", "opt/programs"):
        entry(f, d, 0o40755)
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        base = "opt/programs" if rel == "." else "opt/programs/" + rel
        for d in sorted(dirs):
            entry(f, base + "/" + d, 0o40755)
        for n in sorted(files):
            p = os.path.join(top, n)
            entry(f, base + "/" + n, 0o100755, open(p, "rb").read())
    entry(f, "TRAILER!!!", 0)
PY
gzip -1 "$work/programs.cpio"
cat "$initrd" "$work/programs.cpio.gz" >"$work/initrd-programs.cpio.gz"
mkdir -p "$work/sockets"
RUST_LOG=${RUST_LOG:-info} "$target/vhost-vgpu" --socket-path "$work/sockets/vm" --socket-count 1 \
    --executor cuda --no-control >"$work/vhost-vgpu.log" 2>&1 &
pids+=($!)
for ((i = 0; i < 100; i++)); do
    [[ -S $work/sockets/vm0 ]] && break
    sleep 0.1
done
[[ -S $work/sockets/vm0 ]] || abort guest "vhost-vgpu did not listen" "$work/vhost-vgpu.log"
guest_log=$work/guest.log
bash qemu-configs/launch-vm.sh --qemu "$qemu" --kernel "$kernel" --initrd "$work/initrd-programs.cpio.gz" \
    --socket "$work/sockets/vm0" --mem 2G --accel tcg --append "VGPU_PLAN=programs" \
    </dev/null >"$guest_log" 2>&1 &
vm=$!
pids+=("$vm")
deadline=$((SECONDS + timeout))
while ((SECONDS < deadline)) && kill -0 "$vm" 2>/dev/null && ! grep -q '^PROGRAMS-DONE' "$guest_log"; do
    sleep 1
done
grep -q '^PROGRAMS-DONE' "$guest_log" || fail "guest did not finish its programs in ${timeout}s"
tr -d '\r' <"$guest_log" | sed -n 's/^PROG| //p' >"$work/guest.out"
grep -v '^    |' "$work/guest.out" || true
grep -E '^    \| .*(between its events|PASSED|Found|in [0-9.]+ms)' "$work/guest.out" |
    sed 's/^    | /   guest: /' || true

# The whole logs, where the caller wants them (VGPU_PROGRAMS_LOGS=DIR).
if [[ -n ${VGPU_PROGRAMS_LOGS:-} ]]; then
    mkdir -p "$VGPU_PROGRAMS_LOGS"
    cp "$guest_log" "$work/native.out" "$work/vhost-vgpu.log" "$VGPU_PROGRAMS_LOGS/" || true
fi

# ---- results ------------------------------------------------------------------------
step "results"
while read -r _ name verdict ms rest; do
    # What the same program did natively: a program that fails there too, the same way
    # (cudarc's 12-context-config asks a limit the H200 does not have), behaves as it
    # should.
    native=$(grep "^RESULT $name " "$work/native.out" | head -n 1 | cut -d' ' -f3,5-)
    if [[ $verdict == PASS ]]; then
        pass "$name in the guest: $rest ($ms ms)"
    elif [[ $native == "FAIL $rest" ]]; then
        pass "$name in the guest fails as natively: $rest ($ms ms)"
    else
        fail "$name in the guest: $rest ($ms ms)"
        grep -A0 -B12 "^RESULT $name " "$work/guest.out" | grep '^    |' || true
    fi
done < <(grep '^RESULT ' "$work/guest.out")
echo
printf '%-28s %-6s %9s   %-6s %9s\n' program native ms guest ms
while read -r _ name verdict ms _; do
    g=$(grep "^RESULT $name " "$work/guest.out" | head -n 1 | awk '{ print $3, $4 }')
    printf '%-28s %-6s %9s   %-6s %9s\n' "$name" "$verdict" "$ms" "${g% *}" "${g#* }"
done < <(grep '^RESULT ' "$work/native.out")
verdict
