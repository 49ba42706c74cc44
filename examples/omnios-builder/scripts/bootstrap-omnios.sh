#!/bin/bash
# Install build dependencies and the Rust toolchain on OmniOS.
set -euo pipefail
export PATH="/usr/gnu/bin:$PATH"
sudo pkg install -q gcc14 gnu-make pkg-config openssl curl git || true
curl -sSf https://sh.rustup.rs | sh -s -- -y
"$HOME/.cargo/bin/cargo" --version
