#!/bin/bash
# Boot a test image under TCG with a fresh NoCloud seed and check it end to end:
# SSH (pinned pre-generated host key), a command, the hostname, SFTP put/get,
# then ACPI power-off.  Prints the boot-to-SSH seconds.
#
#   tests/images/smoke.sh tiny|cloud
#
# Env: SMOKE_TIMEOUT (seconds to wait for SSH; 120 tiny, 400 cloud),
#      SMOKE_MEM (MiB; 512 tiny, 1024 cloud), SMOKE_KEEP=1 keeps the temp dir,
#      SMOKE_SEED=scsi puts the seed on a virtio-scsi cdrom (default virtio-blk).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${1:-}
case $NAME in tiny | cloud) ;; *) echo "usage: $0 tiny|cloud" >&2; exit 2 ;; esac

log() { printf '[smoke %s] %s\n' "$NAME" "$*" >&2; }
fail() { log "FAIL: $*"; [ -f "$T/serial.log" ] && { log "serial console (last 40 lines):"; tail -40 "$T/serial.log" >&2; }; exit 1; }

IMAGE=$("$HERE/build.sh" "$NAME")
T=$(mktemp -d /tmp/vmctl-smoke-$NAME.XXXXXX)
QPID=
cleanup() {
    [ -n "$QPID" ] && kill "$QPID" 2>/dev/null && wait "$QPID" 2>/dev/null
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT

if [ "$NAME" = tiny ]; then
    TIMEOUT=${SMOKE_TIMEOUT:-120}; MEM=${SMOKE_MEM:-512}
else
    TIMEOUT=${SMOKE_TIMEOUT:-400}; MEM=${SMOKE_MEM:-1024}
fi
HOST=smoke-$NAME-$RANDOM
USER_NAME=vm

# --- seed ---------------------------------------------------------------------
ssh-keygen -q -t ed25519 -N '' -C smoke-client -f "$T/id"
ssh-keygen -q -t ed25519 -N '' -C smoke-host -f "$T/hostkey"
{
    echo "#cloud-config"
    echo "hostname: $HOST"
    echo "users:"
    echo "  - name: $USER_NAME"
    echo "    sudo: \"ALL=(ALL) NOPASSWD:ALL\""
    echo "    shell: /bin/bash"
    echo "    ssh_authorized_keys:"
    echo "      - $(cat "$T/id.pub")"
    echo "ssh_keys:"
    echo "  ed25519_private: |"
    sed 's/^/    /' "$T/hostkey"
    echo "  ed25519_public: $(cat "$T/hostkey.pub")"
} > "$T/user-data"
printf 'instance-id: smoke-%s\nlocal-hostname: %s\n' "$RANDOM" "$HOST" > "$T/meta-data"
"$HERE/make-seed.sh" "$T/seed.iso" "$T/user-data" "$T/meta-data"
qemu-img create -q -f qcow2 -b "$IMAGE" -F qcow2 "$T/disk.qcow2"

# --- boot ---------------------------------------------------------------------
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        ss -Htln "sport = :$p" 2>/dev/null | grep -q . || { echo $p; return; }
    done
}
PORT=$(free_port)
QMP=$(free_port)
# the host key is pinned: a guest presenting any other key fails the test
echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$T/hostkey.pub")" > "$T/known_hosts"

# SMOKE_SEED=scsi attaches the seed as a virtio-scsi cdrom instead of virtio-blk
if [ "${SMOKE_SEED:-virtio}" = scsi ]; then
    SEED_ARGS=(-device virtio-scsi-pci,id=scsi0
        -drive "file=$T/seed.iso,if=none,id=seed,format=raw,media=cdrom,readonly=on"
        -device scsi-cd,bus=scsi0.0,drive=seed)
else
    SEED_ARGS=(-drive "file=$T/seed.iso,if=virtio,format=raw,readonly=on")
fi
START=$(date +%s.%N)
qemu-system-x86_64 -machine q35 -accel tcg -m "$MEM" -smp 1 \
    -drive "file=$T/disk.qcow2,if=virtio,format=qcow2" \
    "${SEED_ARGS[@]}" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0 \
    -display none -serial "file:$T/serial.log" -monitor none \
    -qmp "tcp:127.0.0.1:$QMP,server=on,wait=off" &
QPID=$!
log "qemu pid $QPID, ssh port $PORT, image $IMAGE"

SSH=(ssh -i "$T/id" -p "$PORT" -o IdentitiesOnly=yes -o BatchMode=yes -o ConnectTimeout=10
    -o UserKnownHostsFile="$T/known_hosts" -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR
    "$USER_NAME@127.0.0.1")
deadline=$(($(date +%s) + TIMEOUT))
until "${SSH[@]}" -- true 2>"$T/ssh.err"; do
    kill -0 "$QPID" 2>/dev/null || fail "qemu exited before SSH came up"
    grep -q 'REMOTE HOST IDENTIFICATION HAS CHANGED' "$T/ssh.err" && fail "guest host key is not the pinned one"
    [ "$(date +%s)" -lt $deadline ] || fail "no SSH after ${TIMEOUT}s ($(tail -1 "$T/ssh.err"))"
    sleep 1
done
BOOT=$(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
log "SSH up after ${BOOT}s"

# --- checks -------------------------------------------------------------------
uname_out=$("${SSH[@]}" -- uname -a) || fail "uname -a"
log "uname -a: $uname_out"
out=$("${SSH[@]}" -- sh -c "'echo \$((6 * 7)) \$(id -un)'") || fail "sh -c"
[ "$out" = "42 $USER_NAME" ] || fail "sh -c gave '$out'"
h=$("${SSH[@]}" -- hostname) || fail "hostname"
[ "$h" = "$HOST" ] || fail "hostname is '$h', expected '$HOST'"
log "hostname ok: $h"

head -c 1048576 /dev/urandom > "$T/payload"
printf 'put %s payload.bin\nget payload.bin %s\nrm payload.bin\n' "$T/payload" "$T/payload.back" > "$T/sftp.batch"
sftp -q -i "$T/id" -P "$PORT" -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR \
    -o UserKnownHostsFile="$T/known_hosts" -o StrictHostKeyChecking=accept-new \
    -b "$T/sftp.batch" "$USER_NAME@127.0.0.1" >/dev/null || fail "sftp put/get"
cmp -s "$T/payload" "$T/payload.back" || fail "sftp round trip changed the file"
log "sftp put/get ok (1 MiB)"

if [ "$NAME" = cloud ]; then
    "${SSH[@]}" -- sudo -n true || fail "passwordless sudo"
    log "sudo ok"
fi

# --- ACPI power-off through QMP -------------------------------------------------
exec 3<>"/dev/tcp/127.0.0.1/$QMP"
read -r -t 10 _ <&3 || true
echo '{"execute":"qmp_capabilities"}' >&3
read -r -t 10 _ <&3 || true
echo '{"execute":"system_powerdown"}' >&3
read -r -t 10 _ <&3 || true
for _ in $(seq 1 120); do
    kill -0 "$QPID" 2>/dev/null || break
    sleep 1
done
kill -0 "$QPID" 2>/dev/null && fail "guest did not power off within 120s of ACPI power button"
wait "$QPID" 2>/dev/null || true
QPID=
log "powered off by ACPI power button"
echo "PASS $NAME: boot-to-SSH ${BOOT}s"
