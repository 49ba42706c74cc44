#!/bin/sh
# Run by the full example's script provisioner.
set -eu
git --version
curl --version | head -n 1
