#!/bin/bash
# The baseline of `cargo bench -p vmctl --bench boot`: what a user writes by
# hand to boot a cloud-init image with QEMU (keys, NoCloud seed, overlay,
# QEMU in the background). Returns once QEMU runs; the bench then waits for
# SSH exactly as it does for vmctl.
#
#   plain-qemu-boot.sh IMAGE DIR PORT
set -euo pipefail
IMG=$1 T=$2 PORT=$3
mkdir -p "$T"
ssh-keygen -q -t ed25519 -N '' -C plain -f "$T/id"
cat > "$T/user-data" <<END
#cloud-config
hostname: plain
users:
  - name: vm
    ssh_authorized_keys:
      - $(cat "$T/id.pub")
END
printf 'instance-id: plain-%s\nlocal-hostname: plain\n' "$RANDOM" > "$T/meta-data"
genisoimage -quiet -output "$T/seed.iso" -volid cidata -joliet -rock "$T/user-data" "$T/meta-data"
qemu-img create -q -f qcow2 -b "$IMG" -F qcow2 "$T/disk.qcow2"
qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 1 -m 512 \
    -nodefaults -display none \
    -drive "file=$T/disk.qcow2,if=virtio,format=qcow2" \
    -drive "file=$T/seed.iso,if=virtio,format=raw,readonly=on" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0 \
    -device virtio-rng-pci \
    -serial "file:$T/serial.log" \
    -daemonize -pidfile "$T/qemu.pid"
