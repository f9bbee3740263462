#!/bin/sh
# Guest /init for scripts/e2e-vhost.sh (busybox ash): the vhost-user back-end tests.
# Build with  scripts/mkinitramfs.sh OUT.cpio.gz --init scripts/e2e-vhost-init.sh
# Loads the provisioned modules, waits for the virtio devices to bind, reports which
# IOMMU group (and type) the disk and the RNG are in, does checksummed block I/O and an
# RNG read, prints one line per fact and powers off.
#
# Kernel command line (all optional):
#   aperture.mib=N          MiB read from /dev/vda at 0, then written at N MiB and read
#                           back (default 16; the disk needs 2*N MiB)
#   aperture.pattern=WORD   written data is `yes WORD` (default VHOST)
#   aperture.watchdog=SECS  power off with "VHOST-E2E watchdog-expired" after this long
#                           even if I/O hangs (default 300)
#
# Output (host side: grep -o 'VHOST-E2E .*'):
#   VHOST-E2E start <uname -r>
#   VHOST-E2E settle <ok|timeout> <seconds>
#   VHOST-E2E group <blk|rng> <pci addr> <iommu group type|none>
#   VHOST-E2E blk-size <bytes>
#   VHOST-E2E blk-read-md5 <md5 of [0, N MiB), O_DIRECT>
#   VHOST-E2E blk-write-md5 <md5 of what was written at N MiB>
#   VHOST-E2E blk-readback-md5 <md5 of [N, 2N MiB) re-read with O_DIRECT>
#   VHOST-E2E blk <absent|fail REASON>
#   VHOST-E2E blk-seconds <wall time of the block phase>
#   VHOST-E2E rng <ok|fail|absent> <bytes>      64 bytes from /dev/hwrng, not all zero
#   VHOST-E2E done
# No `set -e`: an early exit of init panics the kernel.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "VHOST-E2E $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

MIB=16 PATTERN=VHOST WATCHDOG=300
for w in $(cat /proc/cmdline); do
    case "$w" in
        aperture.mib=*) MIB=${w#aperture.mib=} ;;
        aperture.pattern=*) PATTERN=${w#aperture.pattern=} ;;
        aperture.watchdog=*) WATCHDOG=${w#aperture.watchdog=} ;;
    esac
done
is_uint "$WATCHDOG" && [ "$WATCHDOG" -gt 0 ] || WATCHDOG=300
say start "$(uname -r)"
(
    sleep "$WATCHDOG"
    say watchdog-expired "$WATCHDOG"
    dmesg | grep -i -E 'iommu|virtio|I/O error' | tail -n 30
    poweroff -f
) &

# scripts/mkinitramfs.sh installs it in every initramfs.
aperture-load-modules || echo "VHOST-E2E-ERROR: $? module(s) failed to load"

# Wait until every virtio-vendor PCI function and every blk/rng virtio device has a
# driver, and /dev/vda exists if the disk does.
unbound() {
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/vendor" ] && [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
        [ -e "$d/driver" ] || printf ' %s' "${d##*/}"
    done
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d/device" ] || continue
        case "$(cat "$d/device")" in
            0x0002 | 0x0004) [ -e "$d/driver" ] || printf ' %s' "${d##*/}" ;;
        esac
    done
    if [ -e /sys/block/vda ] && [ ! -b /dev/vda ]; then printf ' /dev/vda'; fi
}
t0=$(uptime_s)
i=0
while [ -n "$(unbound)" ] && [ "$i" -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
waited=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
if [ -z "$(unbound)" ]; then say settle ok "$waited"; else say settle timeout "$waited"; fi

# The PCI function of each virtio device, and its IOMMU group type.
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    case "$(cat "$d/device")" in
        0x0002) kind=blk ;;
        0x0004) kind=rng ;;
        *) continue ;;
    esac
    pci=$(basename "$(dirname "$(readlink -f "$d")")")
    gtype=none
    if [ -e "/sys/bus/pci/devices/$pci/iommu_group" ]; then
        g=$(readlink -f "/sys/bus/pci/devices/$pci/iommu_group")
        gtype=$(cat "$g/type" 2>/dev/null || echo unknown)
    fi
    say group "$kind" "$pci" "$gtype"
done

blk() {
    is_uint "$MIB" && [ "$MIB" -ge 1 ] || { say blk fail "bad-mib=$MIB"; return; }
    sectors=$(cat /sys/block/vda/size 2>/dev/null)
    is_uint "$sectors" || { say blk fail no-size; return; }
    size=$((sectors * 512))
    say blk-size "$size"
    [ "$size" -ge $((MIB * 2 * 1048576)) ] || { say blk fail "too-small"; return; }
    rm -f /tmp/dd.err
    sum=$( (dd if=/dev/vda bs=1M count="$MIB" iflag=direct 2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err) | md5sum)
    grep -q '^rc=' /tmp/dd.err && { say blk fail "read: $(tr '\n' ' ' </tmp/dd.err)"; return; }
    say blk-read-md5 "${sum%% *}"
    # Whole lines of `yes WORD` in a ~1 MiB chunk, repeated and cut with dd (fast under TCG).
    line=$((${#PATTERN} + 1))
    yes "$PATTERN" | head -n $((1048576 / line)) >/tmp/chunk
    reps=$(((MIB * 1048576 + 1048576 / line * line - 1) / (1048576 / line * line)))
    chunks() { j=0; while [ "$j" -lt "$reps" ]; do cat /tmp/chunk; j=$((j + 1)); done; }
    wsum=$(chunks | dd bs=1M count="$MIB" iflag=fullblock 2>/dev/null | md5sum)
    rm -f /tmp/dd.err
    chunks | dd of=/dev/vda bs=1M count="$MIB" seek="$MIB" iflag=fullblock oflag=direct conv=notrunc,fsync \
        2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err
    grep -q '^rc=' /tmp/dd.err && { say blk fail "write: $(tr '\n' ' ' </tmp/dd.err)"; return; }
    say blk-write-md5 "${wsum%% *}"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    rm -f /tmp/dd.err
    rsum=$( (dd if=/dev/vda bs=1M skip="$MIB" count="$MIB" iflag=direct 2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err) | md5sum)
    grep -q '^rc=' /tmp/dd.err && { say blk fail "readback: $(tr '\n' ' ' </tmp/dd.err)"; return; }
    say blk-readback-md5 "${rsum%% *}"
}
if [ -b /dev/vda ]; then
    t0=$(uptime_s)
    blk
    say blk-seconds "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')"
else
    say blk absent
fi

cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
if [ -c /dev/hwrng ] && [ -n "$cur" ] && [ "$cur" != none ]; then
    rm -f /tmp/rng
    timeout -s KILL 20 dd if=/dev/hwrng of=/tmp/rng bs=64 count=1 iflag=fullblock 2>/dev/null
    n=$(wc -c </tmp/rng 2>/dev/null)
    n=${n:-0}
    hex=$(od -An -tx1 /tmp/rng 2>/dev/null | tr -d ' \n')
    case "$hex" in *[!0]*) nz=1 ;; *) nz=0 ;; esac
    if [ "$n" -eq 64 ] && [ "$nz" = 1 ]; then say rng ok "$n"; else say rng fail "$n"; fi
else
    say rng absent 0
fi

dmesg | grep -i -E 'I/O error|fault' | sed 's/^/VHOST-DMESG /' | head -n 20
sync
say done
poweroff -f
