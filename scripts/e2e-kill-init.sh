#!/bin/sh
# Aperture end-to-end guest /init (busybox ash) for the "back-end killed during I/O"
# scenario of scripts/e2e-frontend.sh. Build with
#   scripts/mkinitramfs.sh OUT.cpio.gz --init scripts/e2e-kill-init.sh
# It loads the provisioned modules, waits for /dev/vda, prints "kill-io-start", then
# reads the whole disk with O_DIRECT over and over until a read fails or the time limit
# passes; the host SIGKILLs the disk's vhost-user back-end once it sees "kill-io-start".
# A read the dead back-end had taken must fail (EIO), not hang.
#
# Kernel command line (all optional):
#   aperture.kill_limit=SECS  stop reading after this long without an error (default 60)
#   aperture.settle=SECS      how long to wait for /dev/vda (default 20)
#   aperture.watchdog=SECS    after this long, print "APERTURE-E2E watchdog-expired",
#                             dump dmesg and power off, even if I/O hangs (default 300)
#
# Output, one line each (host side: grep '^APERTURE-E2E '):
#   APERTURE-E2E start <uname -r>
#   APERTURE-E2E settle <ok|timeout> <seconds waited>
#   APERTURE-E2E kill-io-start
#   APERTURE-E2E kill-io fail <passes> <seconds since kill-io-start> <dd's error message>
#   APERTURE-E2E kill-io no-error <passes> <seconds>   (the limit passed, no read failed)
#   APERTURE-E2E kill-io-again <fail|ok>   a second read after the failure (a notification
#                                          to the broken device must fail too, not hang)
#   APERTURE-E2E dmesg-io-errors <count of "I/O error" lines>
#   APERTURE-DMESG <line>                  dmesg lines matching virtio, iommu or "I/O error"
#   APERTURE-E2E done
# then `poweroff -f`. No `set -e`: an early exit of init panics the kernel.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

e2e() { echo "APERTURE-E2E $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }
dump_dmesg() { dmesg | grep -i -E 'iommu|virtio|I/O error' | sed 's/^/APERTURE-DMESG /'; }

LIMIT=60 SETTLE=20 WATCHDOG=300
for w in $(cat /proc/cmdline); do
    case "$w" in
        aperture.kill_limit=*) LIMIT=${w#aperture.kill_limit=} ;;
        aperture.settle=*) SETTLE=${w#aperture.settle=} ;;
        aperture.watchdog=*) WATCHDOG=${w#aperture.watchdog=} ;;
    esac
done
is_uint "$LIMIT" || { echo "APERTURE-ERROR: bad aperture.kill_limit=$LIMIT, using 60"; LIMIT=60; }
is_uint "$SETTLE" || { echo "APERTURE-ERROR: bad aperture.settle=$SETTLE, using 20"; SETTLE=20; }
is_uint "$WATCHDOG" && [ "$WATCHDOG" -gt 0 ] || { echo "APERTURE-ERROR: bad aperture.watchdog=$WATCHDOG, using 300"; WATCHDOG=300; }

e2e start "$(uname -r)"
# A read that never completes leaves dd in uninterruptible sleep; this still ends the run.
(
    sleep "$WATCHDOG"
    e2e watchdog-expired "$WATCHDOG"
    dump_dmesg
    poweroff -f
) &

# scripts/mkinitramfs.sh installs it in every initramfs.
aperture-load-modules || echo "APERTURE-ERROR: $? module(s) failed to load"

t0=$(uptime_s)
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt $((SETTLE * 5)) ]; do
    sleep 0.2
    i=$((i + 1))
done
if [ -b /dev/vda ]; then e2e settle ok "$(since "$t0")"; else e2e settle timeout "$(since "$t0")"; fi

if [ -b /dev/vda ]; then
    e2e kill-io-start
    t0=$(uptime_s) passes=0 result=
    while [ -z "$result" ]; do
        if dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/tmp/dd.err; then
            passes=$((passes + 1))
            if [ "$(awk -v a="$t0" -v b="$(uptime_s)" -v l="$LIMIT" 'BEGIN { print (b - a >= l) }')" = 1 ]; then
                result="no-error $passes $(since "$t0")"
            fi
        else
            result="fail $passes $(since "$t0") $(tr '\n' ' ' </tmp/dd.err)"
        fi
    done
    e2e kill-io "$result"
    if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=7 iflag=direct 2>/dev/null; then
        e2e kill-io-again ok
    else
        e2e kill-io-again fail
    fi
fi

e2e dmesg-io-errors "$(dmesg | grep -c 'I/O error')"
dump_dmesg
e2e done
poweroff -f
