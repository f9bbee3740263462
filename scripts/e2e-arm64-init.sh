#!/bin/sh
# Aperture arm64 end-to-end guest /init (busybox ash) for the restricted-DMA-pool tests
# (scripts/e2e-arm64.sh). Build with
#   scripts/mkinitramfs.sh OUT.cpio.gz --arch arm64 --init scripts/e2e-arm64-init.sh
# The kernel (scripts/provision-arm64.sh) has virtio-pci, blk and rng built in and a
# restricted-dma-pool from the device tree (aperture dt-pool). This init waits for the
# virtio devices, reports what the kernel says about the pool, does the block and rng
# phases, reports the swiotlb counters before and after, and powers off.
#
# Kernel command line (all optional):
#   aperture.mib=N          MiB read from /dev/vda at 0 and written at N MiB (default 32)
#   aperture.pattern=WORD   the write pattern is `yes WORD | head -c N MiB` (default APERTURE)
#   aperture.settle=SECS    how long to wait for the devices to bind (default 20)
#   aperture.watchdog=SECS  then dump and power off even if I/O hangs (default 600)
#   aperture.fault_sector=S before the block phase, read sector S alone (O_DIRECT) and
#                           print fault-read (for `aperture serve --test-fault-sector S`,
#                           which aims that read at guest RAM outside the pool: "fail")
#   aperture.secret=WORD    before the devices are used, fill 1 MiB of a tmpfs file (guest
#                           RAM outside the pool, which no device is given) with WORD
#   aperture.hold=SECS      after the workload, print "hold SECS" and sleep that long, so
#                           the host can inspect the back-ends while the devices are live
#
# Output, one line each (host side: grep '^APERTURE-E2E '):
#   APERTURE-E2E start <uname -r>
#   APERTURE-E2E settle <ok|timeout> <seconds> [unbound: <names>]
#   APERTURE-E2E pci <addr> <vendor:device> driver=<name|none>
#   APERTURE-E2E pool-created <base> <MiB>          from "created restricted DMA pool at B, size S MiB"
#   APERTURE-E2E pool-assigned <pci addr> <node>    from "<addr>: assigned reserved memory node <node>"
#   APERTURE-E2E swiotlb <phase> <name> nslabs=N used=N hiwater=N
#                 phase: probe (after the devices bound) or io (after the block and rng
#                 phases; hiwater was reset to 0 in between); name: "default" for the
#                 global swiotlb, else the pool's debugfs directory (its node name)
#   APERTURE-E2E fault-read <ok MD5|fail ERROR|skipped WHY>   (only with aperture.fault_sector)
#   APERTURE-E2E secret-written <bytes>   (only with aperture.secret)
#   APERTURE-E2E blk-read-md5 / blk-write-md5 / blk-readback-md5 <md5>, or blk <absent|fail R>
#   APERTURE-E2E blk-seconds <s>
#   APERTURE-E2E rng <ok|fail> <bytes> | rng absent
#   APERTURE-E2E hold <seconds>           (only with aperture.hold)
#   APERTURE-DMESG <line>     dmesg lines about reserved memory, swiotlb, virtio, DMA
#   APERTURE-E2E done
# No `set -e`: an early exit of init panics the kernel.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t debugfs debugfs /sys/kernel/debug

e2e() { echo "APERTURE-E2E $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
link_name() { if [ -e "$1" ]; then basename "$(readlink "$1")"; else echo none; fi; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }
dump_dmesg() {
    dmesg | grep -i -E 'reserved mem|restricted|swiotlb|virtio|dma|I/O error|buffer is full' | sed 's/^/APERTURE-DMESG /'
}

MIB=32 PATTERN=APERTURE SETTLE=20 WATCHDOG=600 FAULT_SECTOR='' SECRET='' HOLD=0
for w in $(cat /proc/cmdline); do
    case "$w" in
        aperture.mib=*) MIB=${w#aperture.mib=} ;;
        aperture.pattern=*) PATTERN=${w#aperture.pattern=} ;;
        aperture.settle=*) SETTLE=${w#aperture.settle=} ;;
        aperture.watchdog=*) WATCHDOG=${w#aperture.watchdog=} ;;
        aperture.fault_sector=*) FAULT_SECTOR=${w#aperture.fault_sector=} ;;
        aperture.secret=*) SECRET=${w#aperture.secret=} ;;
        aperture.hold=*) HOLD=${w#aperture.hold=} ;;
    esac
done
is_uint "$SETTLE" || SETTLE=20
is_uint "$HOLD" || HOLD=0
is_uint "$WATCHDOG" && [ "$WATCHDOG" -gt 0 ] || WATCHDOG=600
[ -n "$PATTERN" ] || PATTERN=APERTURE

echo "APERTURE: arm64 e2e init started, uptime $(uptime_s)s, cmdline: $(cat /proc/cmdline)"
e2e start "$(uname -r)"
(
    sleep "$WATCHDOG"
    e2e watchdog-expired "$WATCHDOG"
    dump_dmesg
    poweroff -f
) &

# --- wait for the virtio devices ------------------------------------------------------------
unbound() {
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/vendor" ] || continue
        [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
        [ -e "$d/driver" ] || printf ' %s' "${d##*/}"
    done
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d/device" ] || continue
        [ -e "$d/driver" ] || printf ' %s' "${d##*/}"
    done
    if [ -e /sys/block/vda ] && [ ! -b /dev/vda ]; then printf ' /dev/vda'; fi
}
t0=$(uptime_s)
i=0 left=$(unbound)
while [ -n "$left" ] && [ "$i" -lt $((SETTLE * 5)) ]; do
    sleep 0.2
    i=$((i + 1))
    left=$(unbound)
done
waited=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
if [ -z "$left" ]; then e2e settle ok "$waited"; else e2e settle timeout "$waited" "unbound:$left"; fi

for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    v=$(cat "$d/vendor") dv=$(cat "$d/device")
    e2e pci "${d##*/}" "${v#0x}:${dv#0x}" "driver=$(link_name "$d/driver")"
done

# --- what the kernel says about the pool -----------------------------------------------------
# "Reserved memory: created restricted DMA pool at 0x000000005f000000, size 16 MiB"
dmesg | sed -n 's/.*created restricted DMA pool at \(0x[0-9a-f]*\), size \([0-9]*\) MiB.*/\1 \2/p' |
    while read -r base mib; do e2e pool-created "$base" "$mib"; done
# "virtio-pci 0000:00:02.0: assigned reserved memory node restricted-dma-pool@5f000000"
dmesg | sed -n 's/.* \([0-9a-f]*:[0-9a-f]*:[0-9a-f]*\.[0-7]\): assigned reserved memory node \(.*\)$/\1 \2/p' |
    while read -r dev node; do e2e pool-assigned "$dev" "$node"; done

# --- swiotlb counters (debugfs) ---------------------------------------------------------------
# The global pool's files are in /sys/kernel/debug/swiotlb; a restricted pool's directory
# is named after its node and sits under it or, when the device probed before swiotlb's
# late_initcall made that directory, at the debugfs root.
swiotlb_dirs() {
    for f in /sys/kernel/debug/swiotlb/io_tlb_used_hiwater /sys/kernel/debug/*/io_tlb_used_hiwater \
             /sys/kernel/debug/swiotlb/*/io_tlb_used_hiwater; do
        [ -e "$f" ] && dirname "$f"
    done | sort -u
}
swiotlb_report() {   # swiotlb_report PHASE
    for d in $(swiotlb_dirs); do
        if [ "$d" = /sys/kernel/debug/swiotlb ]; then name=default; else name=${d##*/}; fi
        e2e swiotlb "$1" "$name" "nslabs=$(cat "$d/io_tlb_nslabs")" "used=$(cat "$d/io_tlb_used")" \
            "hiwater=$(cat "$d/io_tlb_used_hiwater")"
    done
}
swiotlb_report probe
# From here on, hiwater is the peak of the I/O phases (plus what stays allocated: vrings).
for d in $(swiotlb_dirs); do echo 0 >"$d/io_tlb_used_hiwater"; done

# --- a secret in guest RAM no device is given (outside the pool) ----------------------------------
if [ -n "$SECRET" ]; then
    mkdir -p /secret && mount -t tmpfs -o size=2m tmpfs /secret
    yes "$SECRET" | head -c 1048576 >/secret/s
    e2e secret-written "$(wc -c </secret/s)"
fi

# --- one-sector read (the refused-address test), before the block phase --------------------------
fault_read() {
    is_uint "$FAULT_SECTOR" || { e2e fault-read skipped "bad-sector=$FAULT_SECTOR"; return; }
    [ -b /dev/vda ] || { e2e fault-read skipped no-disk; return; }
    rm -f /tmp/fault.bin /tmp/fault.err
    # bs=4096 for a page-aligned O_DIRECT buffer; the byte counts make it one 512-byte
    # read (scripts/README.md, "busybox dd iflag=direct").
    if dd if=/dev/vda of=/tmp/fault.bin bs=4096 skip=$((FAULT_SECTOR * 512)) count=512 \
        iflag=direct,skip_bytes,count_bytes 2>/tmp/fault.err; then
        n=$(wc -c </tmp/fault.bin)
        if [ "$n" -eq 512 ]; then sum=$(md5sum </tmp/fault.bin); e2e fault-read ok "${sum%% *}"
        else e2e fault-read fail "short read: $n bytes"; fi
    else
        e2e fault-read fail "$(tr '\n' ' ' </tmp/fault.err)"
    fi
}
[ -z "$FAULT_SECTOR" ] || fault_read

# --- block ---------------------------------------------------------------------------------------
blk() {
    if ! is_uint "$MIB" || [ "$MIB" -lt 1 ]; then e2e blk fail "bad-mib=$MIB"; return; fi
    sectors=$(cat /sys/block/vda/size 2>/dev/null)
    is_uint "$sectors" || { e2e blk fail no-size; return; }
    [ $((sectors * 512)) -ge $((MIB * 2 * 1048576)) ] || { e2e blk fail "too-small sectors=$sectors"; return; }
    rm -f /tmp/dd.err
    sum=$( (dd if=/dev/vda bs=1M count="$MIB" iflag=direct 2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err) | md5sum)
    if grep -q '^rc=' /tmp/dd.err; then e2e blk fail "read: $(tr '\n' ' ' </tmp/dd.err)"; return; fi
    e2e blk-read-md5 "${sum%% *}"
    # `yes WORD | head -c N MiB`, from a ~1 MiB chunk of whole lines (scripts/e2e-init.sh).
    line=$((${#PATTERN} + 1))
    yes "$PATTERN" | head -n $((1048576 / line)) >/tmp/chunk
    reps=$(((MIB * 1048576 + 1048576 / line * line - 1) / (1048576 / line * line)))
    chunks() { i=0; while [ "$i" -lt "$reps" ]; do cat /tmp/chunk; i=$((i + 1)); done; }
    wsum=$(chunks | dd bs=1M count="$MIB" iflag=fullblock 2>/dev/null | md5sum)
    rm -f /tmp/dd.err
    chunks | dd of=/dev/vda bs=1M count="$MIB" seek="$MIB" iflag=fullblock oflag=direct conv=notrunc,fsync \
        2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err
    if grep -q '^rc=' /tmp/dd.err; then e2e blk fail "write: $(tr '\n' ' ' </tmp/dd.err)"; return; fi
    e2e blk-write-md5 "${wsum%% *}"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    rm -f /tmp/dd.err
    rsum=$( (dd if=/dev/vda bs=1M skip="$MIB" count="$MIB" iflag=direct 2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err) | md5sum)
    if grep -q '^rc=' /tmp/dd.err; then e2e blk fail "readback: $(tr '\n' ' ' </tmp/dd.err)"; return; fi
    e2e blk-readback-md5 "${rsum%% *}"
}
if [ -b /dev/vda ]; then
    t0=$(uptime_s)
    blk
    e2e blk-seconds "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')"
else
    e2e blk absent
fi

# --- rng -------------------------------------------------------------------------------------------
rng_current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
if [ -c /dev/hwrng ] && [ -n "$rng_current" ] && [ "$rng_current" != none ]; then
    rm -f /tmp/rng
    timeout -s KILL 20 dd if=/dev/hwrng of=/tmp/rng bs=64 count=1 iflag=fullblock 2>/dev/null
    n=$(wc -c </tmp/rng 2>/dev/null)
    hex=$(od -An -tx1 /tmp/rng 2>/dev/null | tr -d ' \n')
    case "$hex" in *[!0]*) nonzero=1 ;; *) nonzero=0 ;; esac
    if [ "${n:-0}" -eq 64 ] && [ "$nonzero" = 1 ]; then e2e rng ok "$n"; else e2e rng fail "${n:-0}"; fi
else
    e2e rng absent
fi

swiotlb_report io
if [ "$HOLD" -gt 0 ]; then
    e2e hold "$HOLD"
    sleep "$HOLD"
fi
dump_dmesg
sync
e2e "done"
poweroff -f
