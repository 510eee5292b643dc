#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs what building and testing need on a Debian machine (run as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

# shellcheck source=ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
# ci/test.sh's lint needs shellcheck; systemd brings systemd-analyze and systemd-tmpfiles
# (ci/verify-units.sh: nothing is started, no systemd needs to run).
apt_install build-essential pkg-config busybox-static pciutils cpio kmod zstd xz-utils \
    shellcheck systemd

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: no Rust toolchain found; install rustup (https://rustup.rs) and Rust >= 1.80" >&2
    exit 1
fi

# The unprivileged user executor worker processes switch to when the mediator runs as
# root (see executor/src/sandbox.rs); without it they fall back to nobody.
if ! getent passwd vgpu-worker >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --user-group vgpu-worker
    echo "setup: created the system user vgpu-worker" >&2
fi
