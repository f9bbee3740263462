#!/usr/bin/env bash
# Build a gzip'ed newc initramfs for the Aperture test guest:
#   /bin/busybox (static) + applet links, the guest modules from provision.sh
#   (/lib/aperture/modules/*.ko + load-order), helper scripts
#   /bin/aperture-load-modules and /bin/aperture-pci-info, and /init.
# The default /init mounts proc/sys/dev, loads the modules in dependency order, prints
# "APERTURE-GUEST-UP <uname -r>" on the console, lists PCI/virtio devices and their
# drivers, reads a few bytes from /dev/hwrng if present, prints "APERTURE-GUEST-DONE"
# and powers off (poweroff -f).
# Needs a provisioned cache (scripts/provision.sh); does not need root.
# With --arch arm64 it builds the image of the arm64 guest (scripts/provision-arm64.sh):
# its static busybox, no modules (that kernel has everything built in), and an /init that
# first installs busybox's applet links (an arm64 busybox cannot list them on this host)
# and then runs the given or default init as /init.main.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
usage: $0 OUT.cpio.gz [--arch x86_64|arm64] [--init PATH] [--add HOST_PATH GUEST_PATH]...
  --arch ARCH                  the guest's architecture (default x86_64; arm64 needs
                               scripts/provision-arm64.sh)
  --init PATH                  use PATH as /init instead of the default (it can call
                               aperture-load-modules and aperture-pci-info)
  --add HOST_PATH GUEST_PATH   copy an extra file into the image (repeatable)
env: APERTURE_CACHE (default \$HOME/.cache/aperture)
EOF
}

OUT='' INIT='' ADDS=() ARCH=x86_64
while (($#)); do
    case "$1" in
        --init) (($# >= 2)) || die "--init needs a path"; INIT="$2"; shift 2 ;;
        --arch) (($# >= 2)) || die "--arch needs x86_64 or arm64"; ARCH="$2"; shift 2 ;;
        --add) (($# >= 3)) || die "--add needs HOST_PATH GUEST_PATH"; ADDS+=("$2" "$3"); shift 3 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z "$OUT" ]] || die "more than one output path given"; OUT="$1"; shift ;;
    esac
done
[[ -n "$OUT" ]] || { usage >&2; die "missing OUT.cpio.gz"; }

CACHE="$APERTURE_CACHE"
case "$ARCH" in
    x86_64)
        BUSYBOX="$CACHE/tools/busybox"
        MODDIR="$CACHE/guest/modules"
        [[ -x "$BUSYBOX" ]] || die "no busybox at $BUSYBOX; run scripts/provision.sh first"
        [[ -r "$MODDIR/load-order" && -r "$CACHE/guest/kernel-version" ]] || die "no guest modules in $MODDIR; run scripts/provision.sh first"
        KREL=$(cat "$CACHE/guest/kernel-version")
        ;;
    arm64)
        BUSYBOX="$CACHE/arm64/tools/busybox"
        MODDIR=
        [[ -s "$BUSYBOX" ]] || die "no arm64 busybox at $BUSYBOX; run scripts/provision-arm64.sh first"
        KREL=$(sed -n 's/^APERTURE_ARM64_KERNEL_RELEASE=//p' "$CACHE/arm64/env" 2>/dev/null)
        [[ -n "$KREL" ]] || die "no arm64 guest kernel in $CACHE/arm64/env; run scripts/provision-arm64.sh first"
        ;;
    *) die "--arch must be x86_64 or arm64, not '$ARCH'" ;;
esac
for t in cpio gzip; do command -v "$t" >/dev/null || die "host tool '$t' missing; run scripts/provision.sh first"; done
[[ -z "$INIT" || -r "$INIT" ]] || die "--init file not readable: $INIT"

S=$(mktemp -d "${TMPDIR:-/tmp}/aperture-initramfs.XXXXXX")
trap 'rm -rf "$S"' EXIT
mkdir -p "$S"/{bin,dev,proc,sys,tmp,run,etc,root,lib/aperture/modules}
ln -s bin "$S/sbin"
mkdir -p "$S/usr"; ln -s ../bin "$S/usr/bin"; ln -s ../bin "$S/usr/sbin"
cp "$BUSYBOX" "$S/bin/busybox"
if [[ "$ARCH" == x86_64 ]]; then
    for a in $("$BUSYBOX" --list); do
        [[ "$a" == busybox || -e "$S/bin/$a" ]] || ln -s busybox "$S/bin/$a"
    done
else
    ln -s busybox "$S/bin/sh"
fi
# Console node so /init has stdout from the first instruction (only possible as root;
# otherwise /init re-opens /dev/console after mounting devtmpfs).
if [[ "$(id -u)" == 0 ]]; then
    mknod -m 600 "$S/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$S/dev/null" c 1 3 2>/dev/null || true
fi

n=0
if [[ -n "$MODDIR" ]]; then
    while IFS= read -r ko; do
        [[ -n "$ko" ]] || continue
        [[ -r "$MODDIR/$ko" ]] || die "module $ko listed in $MODDIR/load-order is missing; re-run scripts/provision.sh --refresh-kernel"
        cp "$MODDIR/$ko" "$S/lib/aperture/modules/"
        n=$((n + 1))
    done <"$MODDIR/load-order"
    cp "$MODDIR/load-order" "$S/lib/aperture/modules/load-order"
    [[ -r "$MODDIR/builtin" ]] && cp "$MODDIR/builtin" "$S/lib/aperture/modules/builtin"
else
    : >"$S/lib/aperture/modules/load-order"
fi
echo "$KREL" >"$S/etc/aperture-kernel-release"

cat >"$S/bin/aperture-load-modules" <<'EOF'
#!/bin/sh
# Load the provisioned modules in dependency order. Exit status: number of failures.
want=$(cat /etc/aperture-kernel-release); have=$(uname -r)
[ "$want" = "$have" ] || echo "APERTURE-ERROR: modules are for $want but the kernel is $have"
fail=0
while read -r ko; do
    [ -n "$ko" ] || continue
    if out=$(insmod "/lib/aperture/modules/$ko" 2>&1); then
        echo "APERTURE: insmod $ko ok"
    else
        echo "APERTURE-ERROR: insmod $ko failed: $out"; fail=$((fail + 1))
    fi
done </lib/aperture/modules/load-order
exit $fail
EOF

cat >"$S/bin/aperture-pci-info" <<'EOF'
#!/bin/sh
# lspci-like listing from sysfs, with the bound driver of each PCI and virtio device.
link_name() { if [ -e "$1" ]; then basename "$(readlink "$1")"; else echo none; fi; }
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    v=$(cat "$d/vendor"); dv=$(cat "$d/device"); c=$(cat "$d/class")
    echo "APERTURE-PCI ${d##*/} [${v#0x}:${dv#0x}] class=${c#0x} driver=$(link_name "$d/driver") iommu_group=$(link_name "$d/iommu_group")"
done
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    parent=$(basename "$(dirname "$(readlink -f "$d")")")
    echo "APERTURE-VIRTIO ${d##*/} device=$(cat "$d/device") driver=$(link_name "$d/driver") parent=$parent"
done
if [ -r /sys/class/misc/hw_random/rng_current ]; then
    echo "APERTURE-HWRNG current=$(cat /sys/class/misc/hw_random/rng_current) available=$(cat /sys/class/misc/hw_random/rng_available)"
fi
EOF

if [[ -n "$INIT" ]]; then
    cp "$INIT" "$S/init"
else
    cat >"$S/init" <<'EOF'
#!/bin/sh
# Aperture default test-guest init (scripts/mkinitramfs.sh). No `set -e`: an early exit
# of init panics the kernel (panic=-1 + QEMU -no-reboot then just ends the VM).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "APERTURE: init started, uptime $(cut -d' ' -f1 /proc/uptime)s, cmdline: $(cat /proc/cmdline)"
aperture-load-modules || echo "APERTURE-ERROR: $? module(s) failed to load"
echo "APERTURE-GUEST-UP $(uname -r)"
aperture-pci-info
if [ -c /dev/hwrng ]; then
    echo "APERTURE-HWRNG sample: $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
fi
echo "APERTURE-GUEST-DONE uptime $(cut -d' ' -f1 /proc/uptime)s"
poweroff -f
EOF
fi
if [[ "$ARCH" == arm64 ]]; then
    mv "$S/init" "$S/init.main"
    cat >"$S/init" <<'EOF'
#!/bin/busybox sh
# scripts/mkinitramfs.sh --arch arm64: the applet links first, then the real init.
/bin/busybox --install -s /bin
exec /init.main "$@"
EOF
    chmod 0755 "$S/init.main"
fi
chmod 0755 "$S/init" "$S/bin/aperture-load-modules" "$S/bin/aperture-pci-info"

i=0
while ((i < ${#ADDS[@]})); do
    src="${ADDS[i]}" dst="${ADDS[i+1]}"; i=$((i + 2))
    [[ -r "$src" ]] || die "--add source not readable: $src"
    [[ "$dst" == /* ]] || die "--add guest path must be absolute: $dst"
    mkdir -p "$S$(dirname "$dst")"
    cp -a "$src" "$S$dst"
done

mkdir -p "$(dirname "$OUT")"
( cd "$S" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --reproducible --quiet ) | gzip -6n >"$OUT.tmp.$$" \
    || { rm -f "$OUT.tmp.$$"; die "could not build initramfs $OUT (cpio/gzip failed)"; }
mv -f "$OUT.tmp.$$" "$OUT"
log "initramfs $OUT: $ARCH, kernel $KREL, $n module(s), init=${INIT:-default}, $(du -k "$OUT" | cut -f1) KiB"
