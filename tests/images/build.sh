#!/bin/bash
# Build (or find in the cache) a vmctl test guest image from Debian packages.
#
#   tests/images/build.sh tiny|cloud [--print-path]
#
# The image is cached in
#   ${VMCTL_TEST_IMAGE_CACHE:-$HOME/.cache/vmctl-test-images}/<name>-<key>/<name>.qcow2
# where <key> is the first 16 hex digits of the sha256 of this script and of the
# files under tests/images/<name>/, so it is rebuilt only when they change.
# The image path is printed on stdout; everything else goes to stderr.
# With --print-path nothing is built: the path is printed, and the exit status
# is 0 if the image is already built and 1 if not.
#
# Packages come from the machine's own apt sources (/etc/apt/sources.list and
# /etc/apt/sources.list.d/*.list|*.sources) and its Acquire:: apt options;
# VMCTL_IMAGE_APT_SOURCES (a sources file) and VMCTL_IMAGE_SUITE (default
# bookworm) override them.  Needs root (mmdebstrap, mknod, chroot).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=${VMCTL_IMAGE_SUITE:-bookworm}
CACHE=${VMCTL_TEST_IMAGE_CACHE:-$HOME/.cache/vmctl-test-images}

log() { printf '[build %s] %s\n' "${NAME:-?}" "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { echo "usage: $0 tiny|cloud [--print-path]" >&2; exit 2; }

NAME=
PRINT_ONLY=0
for a in "$@"; do
    case $a in
    tiny | cloud) NAME=$a ;;
    --print-path) PRINT_ONLY=1 ;;
    *) usage ;;
    esac
done
[ -n "$NAME" ] || usage

cache_key() {
    (
        cd "$HERE"
        for f in build.sh $(find "$NAME" -type f | LC_ALL=C sort); do
            printf '== %s\n' "$f"
            cat "$f"
        done
    ) | sha256sum | cut -c1-16
}
KEY=$(cache_key)
FINAL="$CACHE/$NAME-$KEY"
IMAGE="$FINAL/$NAME.qcow2"

if [ "$PRINT_ONLY" = 1 ]; then
    echo "$IMAGE"
    [ -f "$IMAGE" ]
    exit
fi
if [ -f "$IMAGE" ]; then
    log "cached: $IMAGE"
    echo "$IMAGE"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap, mknod)"
for t in mmdebstrap mkfs.ext4 sfdisk grub-mkimage qemu-img cpio zstd depmod; do
    command -v "$t" >/dev/null || die "missing $t (apt-get install $(grep -v '^#' "$HERE/packages.txt" | tr '\n' ' '))"
done

mkdir -p "$CACHE"
# One build per image key at a time; a second caller waits and reuses it.
exec 9>"$CACHE/.$NAME-$KEY.lock"
flock 9
if [ -f "$IMAGE" ]; then
    log "cached: $IMAGE"
    echo "$IMAGE"
    exit 0
fi

remove_tree() { # a build dir; mmdebstrap may leave mounts behind when killed
    local m
    for m in $(grep -o " $1/[^ ]*" /proc/mounts | sort -r || true); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$1"
}
# Build dirs of this key left by killed builds (we hold the lock: none is live).
for old in "$CACHE/.tmp-$NAME-$KEY".*; do
    [ -d "$old" ] && { log "removing stale $old"; remove_tree "$old"; }
done
WORK=$(mktemp -d "$CACHE/.tmp-$NAME-$KEY.XXXXXX")
cleanup() {
    local rc=$?
    [ -d "$WORK" ] && remove_tree "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
START=$(date +%s)

# ---------------------------------------------------------------------------
# apt sources and options of this machine, for mmdebstrap
# (mmdebstrap without a mirror argument would use a built-in default mirror).
apt_sources() {
    local f n=0
    if [ -n "${VMCTL_IMAGE_APT_SOURCES:-}" ]; then
        echo "$VMCTL_IMAGE_APT_SOURCES"
        return
    fi
    if [ -f /etc/apt/sources.list ] && grep -q '^[[:space:]]*deb' /etc/apt/sources.list; then
        echo /etc/apt/sources.list; n=1
    fi
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -qiE '^[[:space:]]*(deb[[:space:]]|types:)' "$f" || continue
        echo "$f"; n=1
    done
    [ $n = 1 ] || die "no apt sources found in /etc/apt"
}
mapfile -t MIRRORS < <(apt_sources)
# Network-related apt options of the host (proxies, Check-Valid-Until, ...).
apt-config dump | grep -E '^Acquire::' |
    grep -vE '^Acquire::(IndexTargets|Changelogs|CompressionTypes|cdrom|Languages)' |
    grep -v ' "";$' > "$WORK/apt-host.conf" || true
MMDEB=(mmdebstrap --quiet --aptopt="$WORK/apt-host.conf" --aptopt='Acquire::Languages "none"')
log "apt sources: ${MIRRORS[*]}"

# ---------------------------------------------------------------------------
# make_disk FSDIR OUT.qcow2 EXTRA_MB
# Bootable MBR disk with one ext4 partition made from FSDIR (mkfs.ext4 -d, no
# loop mounts) and GRUB i386-pc written offline; FSDIR/boot/grub/grub.cfg must
# exist.  The result is a compressed qcow2.
make_disk() {
    local dir=$1 out=$2 extra=$3 used fsmb
    local grubdir=/usr/lib/grub/i386-pc
    mkdir -p "$dir/boot/grub/i386-pc"
    cp "$grubdir"/*.mod "$grubdir"/*.lst "$dir/boot/grub/i386-pc/"
    used=$(du -sm --apparent-size "$dir" | cut -f1)
    fsmb=$((used * 12 / 10 + extra + 32))
    log "ext4 filesystem: ${fsmb} MiB for ${used} MiB of files"
    rm -f "$WORK/fs.img"
    mkfs.ext4 -q -F -L root -U "${UUID_FOR_DISK:-random}" -E root_owner=0:0 -d "$dir" "$WORK/fs.img" "${fsmb}M"
    # disk = 1 MiB (MBR + GRUB core image) + the filesystem
    truncate -s $(((fsmb + 1) * 1024 * 1024)) "$WORK/disk.raw"
    printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$WORK/disk.raw" >&2
    dd if="$WORK/fs.img" of="$WORK/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
    rm -f "$WORK/fs.img"
    grub-mkimage -O i386-pc -d "$grubdir" -o "$WORK/core.img" -p '(hd0,msdos1)/boot/grub' \
        biosdisk part_msdos ext2 normal linux configfile search echo test serial terminal
    [ "$(stat -c %s "$WORK/core.img")" -lt $((2047 * 512)) ] || die "GRUB core image too large"
    # boot.img (its first 440 bytes: the MBR keeps its partition table) loads
    # the core image from sector 1, grub-mkimage's default for i386-pc.
    dd if="$grubdir/boot.img" of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
    dd if="$WORK/core.img" of="$WORK/disk.raw" bs=512 seek=1 conv=notrunc status=none
    qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$out"
    rm -f "$WORK/disk.raw"
}

grub_cfg() { # KERNEL INITRD CMDLINE
    cat <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
menuentry "vmctl $NAME" {
    linux $1 $3
    initrd $2
}
EOF
}

# ---------------------------------------------------------------------------
build_tiny() {
    local R=$WORK/pkgs I=$WORK/initramfs B=$WORK/bootfs kver f m
    log "extracting packages (mmdebstrap --variant=extract)"
    "${MMDEB[@]}" --variant=extract \
        --include=linux-image-cloud-amd64,busybox-static,dropbear-bin,openssh-sftp-server \
        "$SUITE" "$R" "${MIRRORS[@]}" >&2
    kver=$(ls "$R/lib/modules")
    [ -f "$R/boot/vmlinuz-$kver" ] || die "no kernel in $R/boot"
    log "kernel $kver"

    # initramfs layout: everything in /usr/bin, /bin and /sbin point there
    mkdir -p "$I"/{usr/bin,usr/lib/x86_64-linux-gnu,usr/lib/openssh,usr/lib/modules,etc,proc,sys,dev,tmp,run,root,home,var/log,mnt}
    ln -s usr/bin "$I/bin"
    ln -s usr/bin "$I/sbin"
    ln -s bin "$I/usr/sbin"
    ln -s usr/lib "$I/lib"
    ln -s usr/lib "$I/lib64"
    # kernel opens /dev/console for init before devtmpfs is mounted
    mknod -m 600 "$I/dev/console" c 5 1
    mknod -m 666 "$I/dev/null" c 1 3
    chmod 1777 "$I/tmp"; chmod 700 "$I/root"

    cp "$R/bin/busybox" "$I/usr/bin/busybox"
    for a in $("$I/usr/bin/busybox" --list); do
        [ -e "$I/usr/bin/$a" ] || ln -s busybox "$I/usr/bin/$a"
    done
    ln -sf usr/bin/busybox "$I/init"
    cp "$R/usr/sbin/dropbear" "$R/usr/bin/dropbearkey" "$R/usr/bin/dropbearconvert" "$I/usr/bin/"
    cp "$R/usr/lib/openssh/sftp-server" "$I/usr/lib/openssh/sftp-server"
    # dropbear runs the sftp subsystem from its compiled-in path
    ln -s openssh/sftp-server "$I/usr/lib/sftp-server"
    # shared libraries of the dynamically linked programs, resolved in the
    # extracted tree with the host's dynamic loader
    local libpath="$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu"
    for f in usr/sbin/dropbear usr/bin/dropbearkey usr/bin/dropbearconvert usr/lib/openssh/sftp-server; do
        /lib64/ld-linux-x86-64.so.2 --library-path "$libpath" --list "$R/$f" |
            awk '$2 == "=>" && $3 ~ /^\// { print $3 }'
    done | sort -u | while read -r f; do
        cp -L "$f" "$I/usr/lib/x86_64-linux-gnu/"
    done
    # (the tree's /lib64/ld-linux-x86-64.so.2 is an absolute symlink: not cp -L)
    cp -L "$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$I/usr/lib/x86_64-linux-gnu/"
    ln -s x86_64-linux-gnu/ld-linux-x86-64.so.2 "$I/usr/lib/ld-linux-x86-64.so.2"
    printf '/usr/lib/x86_64-linux-gnu\n' > "$I/etc/ld.so.conf"

    # kernel modules and their dependencies, in load order
    depmod -b "$R" "$kver"
    : > "$I/etc/tiny-modules"
    # virtiofs, fuse, 9p, 9pnet_virtio: shared folders (vmctl `share`)
    local want="virtio_pci virtio_blk virtio_net virtio_scsi sr_mod isofs button evdev virtiofs fuse 9p 9pnet 9pnet_virtio"
    local -A seen=()
    add_mod() {
        local path dep
        path=$(modinfo -b "$R" -k "$kver" -F filename "$1" 2>/dev/null) || return 0
        case $path in /*) ;; *) return 0 ;; esac   # built in
        [ -z "${seen[$path]:-}" ] || return 0
        seen[$path]=1
        for dep in $(modinfo -b "$R" -k "$kver" -F depends "$1" | tr ',' ' '); do
            add_mod "$dep"
        done
        cp "$path" "$I/usr/lib/modules/"
        basename "$path" >> "$I/etc/tiny-modules"
    }
    for m in $want; do add_mod "$m"; done
    log "modules: $(tr '\n' ' ' < "$I/etc/tiny-modules")"

    # configuration
    install -m 755 "$HERE/tiny/rc.sh" "$I/etc/rc.tiny"
    install -m 755 "$HERE/tiny/udhcpc.script" "$I/etc/udhcpc.script"
    install -m 644 "$HERE/tiny/yaml2flat.awk" "$I/etc/yaml2flat.awk"
    install -m 644 "$HERE/tiny/inittab" "$I/etc/inittab"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$I/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\nwheel:x:10:\n' > "$I/etc/group"
    printf '/bin/sh\n/bin/ash\n' > "$I/etc/shells"
    printf 'hosts: files dns\npasswd: files\ngroup: files\nshadow: files\n' > "$I/etc/nsswitch.conf"
    echo tiny > "$I/etc/hostname"

    mkdir -p "$B/boot/grub"
    cp "$R/boot/vmlinuz-$kver" "$B/boot/vmlinuz"
    (cd "$I" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
        zstd -q -19 -T0 > "$B/boot/initrd.img"
    log "initramfs: $(du -h "$B/boot/initrd.img" | cut -f1)"
    grub_cfg /boot/vmlinuz /boot/initrd.img "console=ttyS0,115200 quiet loglevel=1 rdinit=/init" > "$B/boot/grub/grub.cfg"
    make_disk "$B" "$WORK/out/$NAME.qcow2" 4
}

# ---------------------------------------------------------------------------
build_cloud() {
    local R=$WORK/rootfs kver uuid
    # dbus: without it systemd-logind does not run and the ACPI power button is ignored
    local pkgs=linux-image-cloud-amd64,systemd,systemd-sysv,dbus,cloud-init,openssh-server,sudo,ifupdown,isc-dhcp-client
    log "mmdebstrap --variant=minbase --include=$pkgs"
    # The initramfs configuration must be in place before the kernel is set up.
    "${MMDEB[@]}" --variant=minbase --include="$pkgs" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"' \
        --setup-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/vmctl.conf"' \
        --setup-hook="grep -v '^#' '$HERE/cloud/initramfs-modules' > \"\$1/usr/share/initramfs-tools/modules.d/vmctl\"" \
        "$SUITE" "$R" "${MIRRORS[@]}" >&2
    kver=$(ls "$R/lib/modules")
    [ -f "$R/boot/vmlinuz-$kver" ] && [ -f "$R/boot/initrd.img-$kver" ] || die "no kernel/initrd in $R/boot"
    log "kernel $kver, initrd $(du -h "$R/boot/initrd.img-$kver" | cut -f1)"
    uuid=$(cat /proc/sys/kernel/random/uuid)

    install -m 644 "$HERE/cloud/99-vmctl.cfg" "$R/etc/cloud/cloud.cfg.d/99-vmctl.cfg"
    printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" > "$R/etc/fstab"
    echo debian > "$R/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
    rm -f "$R/etc/resolv.conf"; : > "$R/etc/resolv.conf"
    if ! grep -q interfaces.d "$R/etc/network/interfaces" 2>/dev/null; then
        printf 'source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n' > "$R/etc/network/interfaces"
    fi
    # per-instance state: generated on first boot of each VM
    rm -f "$R"/etc/ssh/ssh_host_*
    : > "$R/etc/machine-id"
    rm -f "$R/var/lib/dbus/machine-id"
    rm -rf "$R/var/lib/cloud"
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/log/*.log "$R"/tmp/* 2>/dev/null || true
    # the host's apt options were only needed for the build
    rm -f "$R/etc/apt/apt.conf.d/99mmdebstrap"

    mkdir -p "$R/boot/grub"
    grub_cfg "/boot/vmlinuz-$kver" "/boot/initrd.img-$kver" \
        "root=UUID=$uuid ro console=ttyS0,115200 net.ifnames=0" > "$R/boot/grub/grub.cfg"
    UUID_FOR_DISK=$uuid make_disk "$R" "$WORK/out/$NAME.qcow2" 1536
}

mkdir -p "$WORK/out"
"build_$NAME" >&2
{
    echo "name=$NAME"
    echo "key=$KEY"
    echo "suite=$SUITE"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(($(date +%s) - START))"
    echo "size_bytes=$(stat -c %s "$WORK/out/$NAME.qcow2")"
} > "$WORK/out/info"
chmod 755 "$WORK/out"
# atomic publish: the directory appears complete or not at all
mv -T "$WORK/out" "$FINAL"
log "built in $(($(date +%s) - START)) s: $IMAGE ($(du -h "$IMAGE" | cut -f1))"
echo "$IMAGE"
