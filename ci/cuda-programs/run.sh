#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Runs the CUDA programs of a GPU check, natively on the host or inside a guest, one
# line per program: "RESULT NAME PASS|FAIL WALL_MS LAST-LINE" (wall time to 10 ms).
# POSIX sh: in a guest it runs under busybox.
#
#   run.sh BASE native|guest
#
# BASE holds cudarc/ (cudarc's examples, with examples/sin.ptx beside them), bin/
# (cuda-driver-check, vgpu-cudarc-check, vector_add, vector_add_static and matmul_tiled
# built by nvcc),
# vector_add_f32.ptx, and for a guest native-lib/ (the loader and libraries the nvcc
# programs were linked with, libcudart.so.13 among them). In a guest, the vGPU's
# libcuda.so.1 and libnvrtc.so.13 come from /usr/lib/vgpu.
base=$1
mode=$2
uptime_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

if [ "$mode" = guest ]; then
    LD_LIBRARY_PATH=/usr/lib/vgpu
    export LD_LIBRARY_PATH
    VGPU_CUDA_LOG=${VGPU_CUDA_LOG:-warn}
    export VGPU_CUDA_LOG
fi

# run NAME DIR CMD...: runs CMD in DIR, prints its output indented and its RESULT line.
run() {
    name=$1
    dir=$2
    shift 2
    t0=$(uptime_ms)
    (cd "$dir" && "$@") >/tmp/prog.out 2>&1
    rc=$?
    t1=$(uptime_ms)
    # All of a failing program's output (its libraries' logs say what failed), the end
    # of a passing one's.
    if [ $rc -eq 0 ]; then
        sed 's/^/    | /' /tmp/prog.out | tail -n 12
    else
        sed 's/^/    | /' /tmp/prog.out | tail -n 300
    fi
    last=$(grep -v '^[[:space:]]*$' /tmp/prog.out | tail -n 1)
    if [ $rc -eq 0 ]; then
        echo "RESULT $name PASS $((t1 - t0)) $last"
    else
        echo "RESULT $name FAIL $((t1 - t0)) exit $rc: $last"
    fi
}

# nvcc's programs: in a guest through the loader they were linked with, the guest
# libcuda's log at debug level (which of NVIDIA's private tables and entries the CUDA
# runtime used, and how).
nvcc_run() {
    name=$1
    shift
    if [ "$mode" = guest ]; then
        level=$VGPU_CUDA_LOG
        VGPU_CUDA_LOG=${VGPU_CUDA_LOG_NVCC:-debug}
        run "$name" "$base" "$base/native-lib/ld-linux-x86-64.so.2" \
            --library-path "$base/native-lib:/usr/lib/vgpu" "$@"
        VGPU_CUDA_LOG=$level
    else
        run "$name" "$base" "$@"
    fi
}

for ex in 01-allocate 02-copy 03-launch-kernel 04-streams 05-device-repr 06-threading \
    09-constant-memory 10-function-attributes 12-context-config matmul-kernel nvrtc-compile; do
    if [ -x "$base/cudarc/$ex" ]; then
        run "cudarc/$ex" "$base/cudarc" "./$ex"
    fi
done
run cuda-driver-check "$base" "$base/bin/cuda-driver-check" "$base/vector_add_f32.ptx" 1048576
run vgpu-cudarc-check "$base" "$base/bin/vgpu-cudarc-check" "$base/vector_add_f32.ptx" 1048576
nvcc_run nvcc/vector_add "$base/bin/vector_add" 4194304
nvcc_run nvcc/vector_add_static "$base/bin/vector_add_static" 4194304
nvcc_run nvcc/matmul_tiled "$base/bin/matmul_tiled" 256
echo "RUN-DONE"
