#!/usr/bin/env bash
# Installs what building and testing need on a Debian machine (run as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

# shellcheck source=ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
apt_install build-essential pkg-config busybox-static pciutils cpio kmod zstd xz-utils

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: no Rust toolchain found; install rustup (https://rustup.rs) and Rust >= 1.80" >&2
    exit 1
fi
