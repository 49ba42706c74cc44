#!/bin/bash
# Write a cloud-init NoCloud seed: an ISO9660 volume labelled "cidata".
#   tests/images/make-seed.sh OUT.iso USERDATA METADATA [NETWORKCONFIG]
set -euo pipefail
[ $# -ge 3 ] && [ $# -le 4 ] || { echo "usage: $0 OUT.iso USERDATA METADATA [NETWORKCONFIG]" >&2; exit 2; }
out=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$2" "$dir/user-data"
cp "$3" "$dir/meta-data"
[ $# -lt 4 ] || cp "$4" "$dir/network-config"
genisoimage -quiet -output "$out.tmp" -volid cidata -joliet -rock "$dir"
mv "$out.tmp" "$out"
