#!/bin/sh
# Aperture end-to-end test guest /init (busybox ash). Build with
#   scripts/mkinitramfs.sh OUT.cpio.gz --init scripts/e2e-init.sh
# It mounts proc/sys/dev, loads the provisioned modules in dependency order
# (virtio_iommu first, then virtio_blk and virtio_rng), waits for the virtio devices to
# bind, prints machine-readable lines on the console and powers off.
#
# Kernel command line (all optional):
#   aperture.mib=N          MiB read from /dev/vda at offset 0 and written at offset N MiB
#                           (default 64; the disk needs at least 2*N MiB)
#   aperture.pattern=WORD   the write pattern is `yes WORD | head -c N MiB` (default APERTURE)
#   aperture.settle=SECS    how long to wait for the devices to bind (default 20)
#   aperture.watchdog=SECS  after this long, print "APERTURE-E2E watchdog-expired", dump
#                           dmesg and power off, even if I/O hangs (default 600)
#   aperture.fault_sector=S before the block phase, read sector S alone (512 bytes, O_DIRECT)
#                           and print fault-read (for `aperture serve --test-fault-sector S`,
#                           which aims that read's DMA at an unmapped IOVA: expected "fail";
#                           without that switch it is a plain one-sector read: "ok")
#   aperture.secret=WORD    before the devices are used, fill 1 MiB of a tmpfs file (guest
#                           RAM that no device ever reads or writes) with WORD; the host
#                           then scans the back-ends' memory for it
#   aperture.hold=SECS      after the workload, print "hold SECS" and sleep that long before
#                           powering off, so the host can inspect the back-ends mid-session
#
# Output, one line each (host side: grep '^APERTURE-E2E '):
#   APERTURE-E2E start <uname -r>
#   APERTURE-E2E settle <ok|timeout> <seconds waited> [unbound: <names>...]
#   APERTURE-E2E dmesg-viommu <ok|missing>      virtio_iommu's probe line ("input address: N bits")
#   APERTURE-E2E pci <addr> <vendor:device> driver=<name|none>
#   APERTURE-E2E virtio <virtioN> device=<id> driver=<name|none> pci=<parent addr>
#   APERTURE-E2E iommu-group <pci addr> <group>
#   APERTURE-E2E iommu-group-type <group> <DMA|DMA-FQ|identity|...>
#   APERTURE-E2E iommu-groups <number of PCI devices in a group>
#   APERTURE-E2E iommu-resv <group> <start> <end> <type>   a line of the group's reserved_regions
#   APERTURE-E2E e820 <start> <end> <type...>      an entry of /sys/firmware/memmap (end inclusive)
#   APERTURE-E2E e820 absent                       without /sys/firmware/memmap
#   APERTURE-E2E fault-read ok <md5 of the sector>  (only with aperture.fault_sector)
#   APERTURE-E2E fault-read fail <dd's error message>
#   APERTURE-E2E fault-read skipped <bad-sector=S|no-disk>
#   APERTURE-E2E blk-size <bytes>                  (only with /dev/vda)
#   APERTURE-E2E blk-read-md5 <md5 of the first N MiB of /dev/vda, read with O_DIRECT>
#   APERTURE-E2E blk-write-md5 <md5 of the N MiB written at offset N MiB>
#   APERTURE-E2E blk-readback-md5 <md5 of [N, 2N) MiB re-read with O_DIRECT after the write>
#   APERTURE-E2E blk <absent|fail REASON>          instead of the above when there is no disk or I/O failed
#   APERTURE-E2E blk-seconds <wall time of the block phase>
#   APERTURE-E2E rng-current <hw_random source in use>
#   APERTURE-E2E rng <ok|fail> <bytes read>        64 bytes from /dev/hwrng; ok = 64 bytes, not all zero
#   APERTURE-E2E rng-md5 <md5 of those bytes>      (when any were read)
#   APERTURE-E2E rng absent                        when there is no hwrng source (rng_current "none")
#   APERTURE-E2E secret-written <bytes>            (only with aperture.secret)
#   APERTURE-E2E hold <seconds>                    (only with aperture.hold)
#   APERTURE-E2E dmesg-faults <count of "fault from EP" lines>
#   APERTURE-DMESG <line>                          dmesg lines matching iommu, virtio, viot, fault (not
#                                                  "default") or "I/O error"
#   APERTURE-E2E done
# then `poweroff -f`. Module load failures print "APERTURE-ERROR: ..." (aperture-load-modules).
# The host can recompute the write checksum with: yes WORD | head -c $((N << 20)) | md5sum
# No `set -e`: an early exit of init panics the kernel.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

e2e() { echo "APERTURE-E2E $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
link_name() { if [ -e "$1" ]; then basename "$(readlink "$1")"; else echo none; fi; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }
# "fault" as a word start only, so that "default" does not match.
dump_dmesg() {
    dmesg | grep -i -E 'iommu|virtio|viot|(^|[^a-z])fault|I/O error' | sed 's/^/APERTURE-DMESG /'
}

# --- parameters --------------------------------------------------------------------------
MIB=64 PATTERN=APERTURE SETTLE=20 WATCHDOG=600 FAULT_SECTOR= SECRET= HOLD=0
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
is_uint "$SETTLE" || { echo "APERTURE-ERROR: bad aperture.settle=$SETTLE, using 20"; SETTLE=20; }
is_uint "$WATCHDOG" && [ "$WATCHDOG" -gt 0 ] || { echo "APERTURE-ERROR: bad aperture.watchdog=$WATCHDOG, using 600"; WATCHDOG=600; }
is_uint "$HOLD" || { echo "APERTURE-ERROR: bad aperture.hold=$HOLD, using 0"; HOLD=0; }
[ -n "$PATTERN" ] || PATTERN=APERTURE

echo "APERTURE: e2e init started, uptime $(uptime_s)s, cmdline: $(cat /proc/cmdline)"
e2e start "$(uname -r)"

# A hung DMA leaves dd in uninterruptible sleep; this still ends the run with a diagnosis.
(
    sleep "$WATCHDOG"
    e2e watchdog-expired "$WATCHDOG"
    dump_dmesg
    poweroff -f
) &

# --- modules -----------------------------------------------------------------------------
# scripts/mkinitramfs.sh installs it in every initramfs.
aperture-load-modules || echo "APERTURE-ERROR: $? module(s) failed to load"

# --- wait for the devices to bind ----------------------------------------------------------
# Unbound: a virtio-vendor (1af4) PCI function without a driver (e.g. still deferred until
# the IOMMU registers), a virtio block/rng/iommu device without a driver, or a vda
# whose /dev node is not there yet.
unbound() {
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/vendor" ] || continue
        [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
        [ -e "$d/driver" ] || printf ' %s' "${d##*/}"
    done
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d/device" ] || continue
        case "$(cat "$d/device")" in
            0x0002 | 0x0004 | 0x0017) [ -e "$d/driver" ] || printf ' %s' "${d##*/}" ;;
        esac
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

# --- IOMMU, PCI and virtio ---------------------------------------------------------------
if dmesg | grep -q -E 'virtio_iommu .*input address: [0-9]+ bits'; then
    e2e dmesg-viommu ok
else
    e2e dmesg-viommu missing
fi

for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    v=$(cat "$d/vendor") dv=$(cat "$d/device")
    e2e pci "${d##*/}" "${v#0x}:${dv#0x}" "driver=$(link_name "$d/driver")"
done
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    parent=$(basename "$(dirname "$(readlink -f "$d")")")
    e2e virtio "${d##*/}" "device=$(cat "$d/device")" "driver=$(link_name "$d/driver")" "pci=$parent"
done

ngroups=0
for g in /sys/kernel/iommu_groups/*; do
    [ -d "$g/devices" ] || continue
    for d in "$g"/devices/*; do
        [ -e "$d" ] || continue
        # Only PCI functions (the groups hold nothing else on x86, but be exact).
        [ -e "/sys/bus/pci/devices/${d##*/}" ] || continue
        e2e iommu-group "${d##*/}" "${g##*/}"
        ngroups=$((ngroups + 1))
    done
    [ -r "$g/type" ] && e2e iommu-group-type "${g##*/}" "$(cat "$g/type")"
done
e2e iommu-groups "$ngroups"
# What the kernel itself reports of reserved memory: each group's reserved regions
# (from the virtio-iommu's PROBE answers) and the firmware memory map it booted with.
for g in /sys/kernel/iommu_groups/*; do
    [ -r "$g/reserved_regions" ] || continue
    while read -r start end type; do
        e2e iommu-resv "${g##*/}" "$start" "$end" "$type"
    done <"$g/reserved_regions"
done
if [ -d /sys/firmware/memmap ]; then
    for d in /sys/firmware/memmap/*; do
        e2e e820 "$(cat "$d/start")" "$(cat "$d/end")" "$(cat "$d/type")"
    done
else
    e2e e820 absent
fi

# --- one-sector read (the fault test) -------------------------------------------------------
# Before the block phase, so that the block phase shows the device still works after it.
fault_read() {
    if ! is_uint "$FAULT_SECTOR"; then
        echo "APERTURE-ERROR: bad aperture.fault_sector=$FAULT_SECTOR"
        e2e fault-read skipped "bad-sector=$FAULT_SECTOR"
        return
    fi
    [ -b /dev/vda ] || { e2e fault-read skipped no-disk; return; }
    rm -f /tmp/fault.bin /tmp/fault.err
    # Not `bs=512 skip=S count=1 iflag=direct`: busybox dd mallocs buffers smaller than a
    # page, unaligned for O_DIRECT; the read then fails with EINVAL and dd silently
    # retries it buffered (a 4 KiB readahead, retried once more by the page cache).
    # bs=4096 gets a page-aligned buffer; the byte counts make it one 512-byte read.
    if dd if=/dev/vda of=/tmp/fault.bin bs=4096 skip=$((FAULT_SECTOR * 512)) count=512 \
        iflag=direct,skip_bytes,count_bytes 2>/tmp/fault.err; then
        n=$(wc -c </tmp/fault.bin)
        if [ "$n" -eq 512 ]; then
            sum=$(md5sum </tmp/fault.bin)
            e2e fault-read ok "${sum%% *}"
        else
            e2e fault-read fail "short read: $n bytes"
        fi
    else
        e2e fault-read fail "$(tr '\n' ' ' </tmp/fault.err)"
    fi
}
[ -z "$FAULT_SECTOR" ] || fault_read

# --- a secret in memory no device touches ---------------------------------------------------
if [ -n "$SECRET" ]; then
    mkdir -p /secret && mount -t tmpfs -o size=2m tmpfs /secret
    yes "$SECRET" | head -c 1048576 >/secret/s
    e2e secret-written "$(wc -c </secret/s)"
fi

# --- block: read the host's pattern, write ours --------------------------------------------
blk() {
    if ! is_uint "$MIB" || [ "$MIB" -lt 1 ]; then
        e2e blk fail "bad-mib=$MIB"
        return
    fi
    sectors=$(cat /sys/block/vda/size 2>/dev/null)
    is_uint "$sectors" || { e2e blk fail no-size; return; }
    size=$((sectors * 512)) need=$((MIB * 2 * 1048576))
    e2e blk-size "$size"
    if [ "$size" -lt "$need" ]; then
        e2e blk fail "too-small need=$need"
        return
    fi
    # set -o pipefail is not portable to every ash build; check dd's status via a file.
    rm -f /tmp/dd.err
    sum=$( (dd if=/dev/vda bs=1M count="$MIB" iflag=direct 2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err) | md5sum)
    if grep -q '^rc=' /tmp/dd.err; then
        e2e blk fail "read: $(tr '\n' ' ' </tmp/dd.err)"
        return
    fi
    e2e blk-read-md5 "${sum%% *}"

    # The stream `yes WORD | head -c N MiB`, built from a ~1 MiB chunk of whole lines and
    # cut with dd: busybox yes writes once per line and head -c copies byte by byte,
    # which together cost ~15 s per 64 MiB under TCG.
    line=$((${#PATTERN} + 1))
    yes "$PATTERN" | head -n $((1048576 / line)) >/tmp/chunk
    reps=$(((MIB * 1048576 + 1048576 / line * line - 1) / (1048576 / line * line)))
    chunks() {
        i=0
        while [ "$i" -lt "$reps" ]; do cat /tmp/chunk; i=$((i + 1)); done
    }
    rm -f /tmp/dd.err
    wsum=$(chunks | dd bs=1M count="$MIB" iflag=fullblock 2>/dev/null | md5sum)
    chunks | dd of=/dev/vda bs=1M count="$MIB" seek="$MIB" iflag=fullblock oflag=direct conv=notrunc,fsync \
        2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err
    if grep -q '^rc=' /tmp/dd.err; then
        e2e blk fail "write: $(tr '\n' ' ' </tmp/dd.err)"
        return
    fi
    e2e blk-write-md5 "${wsum%% *}"

    sync
    echo 3 >/proc/sys/vm/drop_caches
    rm -f /tmp/dd.err
    rsum=$( (dd if=/dev/vda bs=1M skip="$MIB" count="$MIB" iflag=direct 2>/tmp/dd.err || echo "rc=$?" >>/tmp/dd.err) | md5sum)
    if grep -q '^rc=' /tmp/dd.err; then
        e2e blk fail "readback: $(tr '\n' ' ' </tmp/dd.err)"
        return
    fi
    e2e blk-readback-md5 "${rsum%% *}"
}
if [ -b /dev/vda ]; then
    t0=$(uptime_s)
    blk
    e2e blk-seconds "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')"
else
    e2e blk absent
fi

# --- hwrng ---------------------------------------------------------------------------------
# /dev/hwrng exists whenever the hw_random core is built in; "none" means no rng device.
rng_current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
if [ -c /dev/hwrng ] && [ "$rng_current" != none ]; then
    e2e rng-current "${rng_current:-unknown}"
    rm -f /tmp/rng
    timeout -s KILL 20 dd if=/dev/hwrng of=/tmp/rng bs=64 count=1 iflag=fullblock 2>/dev/null
    n=$(wc -c </tmp/rng 2>/dev/null)
    n=${n:-0}
    hex=$(od -An -tx1 /tmp/rng 2>/dev/null | tr -d ' \n')
    # All-zero bytes would mean the device's DMA did not land in the guest's buffer.
    case "$hex" in *[!0]*) nonzero=1 ;; *) nonzero=0 ;; esac
    if [ "$n" -eq 64 ] && [ "$nonzero" = 1 ]; then e2e rng ok "$n"; else e2e rng fail "$n"; fi
    if [ "$n" -gt 0 ]; then
        sum=$(md5sum </tmp/rng)
        e2e rng-md5 "${sum%% *}"
    fi
else
    e2e rng absent
fi

# --- hold: the host inspects the back-ends while the devices are still live -----------------
if [ "$HOLD" -gt 0 ]; then
    e2e hold "$HOLD"
    sleep "$HOLD"
fi

# --- dmesg, done ---------------------------------------------------------------------------
e2e dmesg-faults "$(dmesg | grep -c 'fault from EP')"
dump_dmesg
sync
e2e done
poweroff -f
