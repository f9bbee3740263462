#!/bin/sh
# Aperture benchmark guest /init (busybox ash), the guest side of `aperture bench`.
# Build with
#   scripts/mkinitramfs.sh OUT.cpio.gz --init scripts/bench-init.sh --add DISKBENCH /bin/diskbench
# where DISKBENCH is scripts/guest/diskbench.c built with `gcc -static -O2`. It mounts
# proc/sys/dev, loads the provisioned modules (aperture-load-modules, from
# mkinitramfs.sh), waits for /dev/vda, runs diskbench on it, and powers off.
#
# Kernel command line (all optional):
#   aperture.seconds=S      timed seconds of each diskbench workload (default 10)
#   aperture.warmup=S       untimed seconds before each workload (default 1)
#   aperture.settle=SECS    how long to wait for /dev/vda (default 20)
#   aperture.watchdog=SECS  after this long print "APERTURE-BENCH watchdog-expired" and
#                           power off, even if I/O hangs (default 600)
#
# Output, one line each (host side: grep '^APERTURE-BENCH '):
#   APERTURE-BENCH start <uname -r>
#   APERTURE-BENCH settle <ok|timeout> <seconds waited>
#   APERTURE-BENCH iommu-group-type <DMA|DMA-FQ|identity|none>   vda's PCI function's group
#   APERTURE-BENCH dmesg-viommu <ok|missing>
#   ... diskbench's lines (scripts/guest/diskbench.c) ...
#   APERTURE-BENCH diskbench-exit <status>
#   APERTURE-BENCH done
# then `poweroff -f`. No `set -e`: an early exit of init panics the kernel.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

bench() { echo "APERTURE-BENCH $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

SECONDS_=10 WARMUP=1 SETTLE=20 WATCHDOG=600
for w in $(cat /proc/cmdline); do
    case "$w" in
        aperture.seconds=*) SECONDS_=${w#aperture.seconds=} ;;
        aperture.warmup=*) WARMUP=${w#aperture.warmup=} ;;
        aperture.settle=*) SETTLE=${w#aperture.settle=} ;;
        aperture.watchdog=*) WATCHDOG=${w#aperture.watchdog=} ;;
    esac
done
is_uint "$SETTLE" || SETTLE=20
is_uint "$WATCHDOG" && [ "$WATCHDOG" -gt 0 ] || WATCHDOG=600

bench start "$(uname -r)"
(
    sleep "$WATCHDOG"
    bench watchdog-expired "$WATCHDOG"
    poweroff -f
) &

# Only its failures (APERTURE-ERROR lines) reach the console.
aperture-load-modules | grep -v '^APERTURE: insmod '

t0=$(uptime_s)
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt $((SETTLE * 10)) ]; do
    sleep 0.1
    i=$((i + 1))
done
waited=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
if [ -b /dev/vda ]; then bench settle ok "$waited"; else bench settle timeout "$waited"; fi

# The translation the guest uses for the disk: DMA (strict), DMA-FQ (lazy), or none.
type=none
pci=$(basename "$(dirname "$(readlink -f /sys/block/vda/device 2>/dev/null)")" 2>/dev/null)
g=/sys/bus/pci/devices/$pci/iommu_group
[ -n "$pci" ] && [ -r "$g/type" ] && type=$(cat "$g/type")
bench iommu-group-type "$type"
if dmesg | grep -q -E 'virtio_iommu .*input address: [0-9]+ bits'; then
    bench dmesg-viommu ok
else
    bench dmesg-viommu missing
fi

if [ -b /dev/vda ]; then
    diskbench -s "$SECONDS_" -w "$WARMUP" /dev/vda
    bench diskbench-exit "$?"
fi
bench done
poweroff -f
