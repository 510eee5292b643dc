#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes src/generated.rs: every function cudarc's driver bindings declare for CUDA 13.0
(feature cuda-13000), a NOT_SUPPORTED stub for each one src/ does not implement, the
table cuGetProcAddress looks names up in, and every CUresult with its name and message.

    python3 guest-lib/cuda/gen-exports.py [path/to/cudarc/src/driver/sys/mod.rs]

Without a path it takes cudarc 0.19.10 from the cargo registry. Run it again after an
export is implemented in src/ (its stub must go) or when cudarc is updated.
"""

import glob
import os
import re
import sys

FEATURE = "cuda-13000"
CUDARC = "cudarc-0.19.10"
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
OUT = os.path.join(SRC, "generated.rs")

# The messages NVIDIA's driver gives for the common codes; the others are made from the
# name ("CUDA_ERROR_ILLEGAL_STATE" -> "illegal state").
MESSAGES = {
    "CUDA_SUCCESS": "no error",
    "CUDA_ERROR_INVALID_VALUE": "invalid argument",
    "CUDA_ERROR_OUT_OF_MEMORY": "out of memory",
    "CUDA_ERROR_NOT_INITIALIZED": "initialization error",
    "CUDA_ERROR_DEINITIALIZED": "driver shutting down",
    "CUDA_ERROR_NO_DEVICE": "no CUDA-capable device is detected",
    "CUDA_ERROR_INVALID_DEVICE": "invalid device ordinal",
    "CUDA_ERROR_INVALID_IMAGE": "device kernel image is invalid",
    "CUDA_ERROR_INVALID_CONTEXT": "invalid device context",
    "CUDA_ERROR_NO_BINARY_FOR_GPU": "no kernel image is available for execution on the device",
    "CUDA_ERROR_UNSUPPORTED_LIMIT": "limit is not supported on this architecture",
    "CUDA_ERROR_INVALID_PTX": "a PTX JIT compilation failed",
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": "the provided PTX was compiled with an unsupported toolchain.",
    "CUDA_ERROR_FILE_NOT_FOUND": "file not found",
    "CUDA_ERROR_OPERATING_SYSTEM": "OS call failed or operation not supported on this OS",
    "CUDA_ERROR_INVALID_HANDLE": "invalid resource handle",
    "CUDA_ERROR_NOT_FOUND": "named symbol not found",
    "CUDA_ERROR_NOT_READY": "device not ready",
    "CUDA_ERROR_ILLEGAL_ADDRESS": "an illegal memory access was encountered",
    "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES": "too many resources requested for launch",
    "CUDA_ERROR_LAUNCH_TIMEOUT": "the launch timed out and was terminated",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED": "context is destroyed",
    "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED": "part or all of the requested memory range is already mapped",
    "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED": "pointer does not correspond to a registered memory region",
    "CUDA_ERROR_LAUNCH_FAILED": "unspecified launch failure",
    "CUDA_ERROR_NOT_PERMITTED": "operation not permitted",
    "CUDA_ERROR_NOT_SUPPORTED": "operation not supported",
    "CUDA_ERROR_UNKNOWN": "unknown error",
}


def cudarc_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    home = os.path.expanduser("~/.cargo/registry/src")
    found = glob.glob(os.path.join(home, "*", CUDARC, "src", "driver", "sys", "mod.rs"))
    if not found:
        sys.exit(f"gen-exports.py: {CUDARC} not in {home}; pass the path of its driver/sys/mod.rs")
    return sorted(found)[0]


def for_feature(cfg_line):
    """Whether an item under this line (a #[cfg(...)] or anything else) is compiled."""
    return not cfg_line.startswith("#[cfg") or f'"{FEATURE}"' in cfg_line


def bound_functions(lines):
    names = []
    for i, line in enumerate(lines):
        m = re.match(r"pub unsafe fn (cu\w+)\(.*\) -> CUresult \{", line)
        if m and for_feature(lines[i - 1]):
            names.append(m.group(1))
    if len(set(names)) != len(names):
        sys.exit("gen-exports.py: a function is bound twice for the feature")
    return names


def results(text):
    for m in re.finditer(
        r"((?:#\[cfg\([^\n]*\)\]\n)?)(?:#\[repr[^\n]*\]\n)?(?:#\[derive[^\n]*\]\n)?"
        r"pub enum cudaError_enum \{\n(.*?)\n\}",
        text,
        re.S,
    ):
        if m.group(1) and not for_feature(m.group(1)):
            continue
        return [
            (n, int(v))
            for n, v in re.findall(r"(CUDA_\w+) = (\d+),", m.group(2))
        ]
    sys.exit("gen-exports.py: no cudaError_enum for the feature")


def implemented():
    names = set()
    for path in glob.glob(os.path.join(SRC, "**", "*.rs"), recursive=True):
        if os.path.abspath(path) == OUT:
            continue
        with open(path) as f:
            names.update(re.findall(r'^pub (?:unsafe )?extern "C" fn (cu\w+)\(', f.read(), re.M))
    return names


def message(name):
    if name in MESSAGES:
        return MESSAGES[name]
    return name.removeprefix("CUDA_ERROR_").lower().replace("_", " ")


def main():
    path = cudarc_path()
    with open(path) as f:
        text = f.read()
    bound = bound_functions(text.split("\n"))
    errors = results(text)
    ours = implemented()
    stubs = [n for n in bound if n not in ours]
    table = sorted(ours | set(bound))

    out = []
    w = out.append
    w("// SPDX-License-Identifier: Apache-2.0")
    w(f"//! Written by gen-exports.py from {CUDARC}'s driver bindings (feature `{FEATURE}`);")
    w("//! run it again instead of editing this file.")
    w("")
    w("use std::ffi::CStr;")
    w("")
    w("#[allow(unused_imports)]")
    w("use crate::api::*;")
    w("use crate::types::CUresult;")
    w("")
    w(f"/// Every function {CUDARC} binds for CUDA 13.0: with dynamic loading it resolves each")
    w("/// by name when first called, and panics when one is missing.")
    w(f"pub const CUDARC_EXPORTS: [&str; {len(bound)}] = [")
    for n in bound:
        w(f'    "{n}",')
    w("];")
    w("")
    w("crate::stubs! {")
    for n in stubs:
        w(f"    {n},")
    w("}")
    w("")
    w("/// (name, address) of every export, implemented or not, for `cuGetProcAddress`.")
    w("pub(crate) fn exports() -> Vec<(&'static str, usize)> {")
    w("    vec![")
    for n in table:
        w(f'        ("{n}", {n} as *const () as usize),')
    w("    ]")
    w("}")
    w("")
    w("/// Every `CUresult` of CUDA 13.0: value, name, message.")
    w("pub(crate) const RESULTS: &[(CUresult, &CStr, &CStr)] = &[")
    for n, v in errors:
        w(f'    ({v}, c"{n}", c"{message(n)}"),')
    w("];")
    w("")
    with open(OUT, "w") as f:
        f.write("\n".join(out))
    print(
        f"{os.path.relpath(OUT)}: {len(bound)} cudarc functions, {len(bound) - len(stubs)} "
        f"implemented, {len(stubs)} stubs, {len(table)} exports, {len(errors)} results"
    )


if __name__ == "__main__":
    main()
