#!/bin/sh
# vmctl tiny guest: system start-up, run once by busybox init (sysinit).
# Reads the cloud-init NoCloud seed (volume label "cidata"), creates the user,
# configures eth0 by DHCP and starts dropbear.  Markers go to the console.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "vmctl-tiny: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
echo 0 > /proc/sys/kernel/printk 2>/dev/null
say "init started (kernel $(uname -r))"

# Modules, in dependency order (computed at build time).
while read -r m; do
    [ -n "$m" ] && insmod "/lib/modules/$m" 2>/dev/null
done < /etc/tiny-modules

ip link set lo up

# --- ACPI power button -> clean poweroff -----------------------------------
for ev in /sys/class/input/event*; do
    [ -e "$ev/device/name" ] || continue
    if grep -q "Power Button" "$ev/device/name"; then
        dev="/dev/input/${ev##*/}"
        (dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null && say "power button pressed" && poweroff) &
    fi
done

# --- NoCloud seed ---------------------------------------------------------
mkdir -p /run/seed
seed_ok=
i=0
while [ $i -lt 100 ]; do
    cands=$(blkid 2>/dev/null | grep -i 'LABEL="cidata"' | cut -d: -f1)
    for d in $cands /dev/vd* /dev/sr*; do
        [ -b "$d" ] || continue
        if mount -t iso9660 -o ro "$d" /run/seed 2>/dev/null; then
            if [ -f /run/seed/user-data ] || [ -f /run/seed/meta-data ]; then
                seed_ok=$d; break
            fi
            umount /run/seed
        fi
    done
    [ -n "$seed_ok" ] && break
    i=$((i + 1)); sleep 0.1
done
if [ -n "$seed_ok" ]; then
    say "seed found on $seed_ok"
else
    say "WARNING: no cidata seed found"
fi

flat() { [ -f "$1" ] && awk -f /etc/yaml2flat.awk "$1"; }
flat /run/seed/user-data > /run/ud.flat
flat /run/seed/meta-data > /run/md.flat
get() { awk -F '\t' -v k="$2" '$1 == k { sub(/^[^\t]*\t/, ""); print; exit }' "$1"; }
# getall FILE PREFIX: values of the keys PREFIX0, PREFIX1, ...
getall() { awk -F '\t' -v p="$2" 'index($1, p) == 1 && substr($1, length(p) + 1) ~ /^[0-9]+$/ { sub(/^[^\t]*\t/, ""); print }' "$1"; }

user=$(awk -F '\t' '$1 ~ /^users\.[0-9]+\.name$/ { sub(/^[^\t]*\t/, ""); print; exit }' /run/ud.flat)
[ -n "$user" ] || user=debian
uidx=$(awk -F '\t' -v u="$user" '$1 ~ /^users\.[0-9]+\.name$/ && $2 == u { split($1, a, "."); print a[2]; exit }' /run/ud.flat)
host=$(get /run/ud.flat hostname)
[ -n "$host" ] || host=$(get /run/ud.flat fqdn)
[ -n "$host" ] || host=$(get /run/md.flat local-hostname)
[ -n "$host" ] || host=tiny
host=${host%%.*}

hostname "$host"
echo "$host" > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost\n' "$host" > /etc/hosts
say "hostname $host"

# --- user -----------------------------------------------------------------
home=/home/$user
if [ "$user" != root ]; then
    echo "$user:x:1000:1000::$home:/bin/sh" >> /etc/passwd
    echo "$user:x:1000:" >> /etc/group
    sed -i "s/^wheel:x:10:.*/wheel:x:10:$user/" /etc/group
else
    home=/root
fi
mkdir -p "$home/.ssh"
{
    [ -n "$uidx" ] && getall /run/ud.flat "users.$uidx.ssh_authorized_keys."
    getall /run/ud.flat ssh_authorized_keys.
    getall /run/md.flat public-keys.
} > "$home/.ssh/authorized_keys"
chmod 700 "$home/.ssh"; chmod 600 "$home/.ssh/authorized_keys"
[ "$user" != root ] && chown -R 1000:1000 "$home"
chmod 755 "$home"
say "user $user with $(grep -c . "$home/.ssh/authorized_keys") authorized key(s)"

# --- host key -------------------------------------------------------------
mkdir -p /etc/dropbear
hk=/etc/dropbear/dropbear_ed25519_host_key
priv=$(get /run/ud.flat ssh_keys.ed25519_private)
if [ -n "$priv" ]; then
    printf '%b' "$priv" > /run/ed25519.openssh
    chmod 600 /run/ed25519.openssh
    if dropbearconvert openssh dropbear /run/ed25519.openssh "$hk" >/dev/null 2>&1; then
        say "host key from seed"
    else
        say "WARNING: could not convert seed host key, generating one"
    fi
    rm -f /run/ed25519.openssh
fi
[ -s "$hk" ] || dropbearkey -t ed25519 -f "$hk" >/dev/null 2>&1
say "host key: $(dropbearkey -y -f "$hk" 2>/dev/null | grep '^ssh-ed25519' | cut -d' ' -f1,2)"

# --- network --------------------------------------------------------------
ip link set eth0 up 2>/dev/null
if udhcpc -i eth0 -s /etc/udhcpc.script -q -f -n -t 20 -T 1 -A 1 >/dev/null 2>&1; then
    say "network up: $(ip -4 -o addr show eth0 | awk '{print $4}')"
else
    say "WARNING: DHCP on eth0 failed"
fi

# --- bootcmd ---------------------------------------------------------------
# cloud-init's bootcmd (every boot): string entries only, each run by sh, in
# order, before SSH starts (vmctl mounts shared folders this way).
n=0
getall /run/ud.flat bootcmd. > /run/bootcmd.list
while IFS= read -r cmd; do
    n=$((n + 1))
    if sh -c "$cmd" </dev/null >>/run/bootcmd.log 2>&1; then
        say "bootcmd $n ok"
    else
        say "WARNING: bootcmd $n failed: $(tail -n 1 /run/bootcmd.log)"
    fi
done < /run/bootcmd.list

# --- ssh ------------------------------------------------------------------
dropbear -r "$hk" -p 22 -s -E 2>>/run/dropbear.log
say "ssh ready"
