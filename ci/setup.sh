#!/usr/bin/env bash
# Installs what building and testing need on a Debian machine (run as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

need=()
for pkg in build-essential pkg-config busybox-static pciutils cpio kmod zstd xz-utils; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: no Rust toolchain found; install rustup (https://rustup.rs) and Rust >= 1.85" >&2
    exit 1
fi
