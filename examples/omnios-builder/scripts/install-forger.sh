#!/bin/bash
# Build forger from the uploaded tarball and install it.
set -euo pipefail
mkdir -p "$HOME/forger"
tar -xzf /tmp/forger-src.tar.gz -C "$HOME/forger"
cd "$HOME/forger"
"$HOME/.cargo/bin/cargo" build -p forger --release
sudo cp target/release/forger /usr/local/bin/forger
