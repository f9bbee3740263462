#!/usr/bin/env bash
# Smoke test of the provisioned stack (run scripts/provision.sh first):
#   1. the cached QEMU wrapper lists `vfio-user-pci` in `-device help`;
#   2. the guest kernel boots under QEMU TCG (q35, 512 MiB shared memfd RAM as vfio-user
#      needs) with the default initramfs, reaches "APERTURE-GUEST-UP", and QEMU's own
#      virtio-rng-pci enumerates with virtio-pci + virtio_rng bound; the guest powers off.
# Exit 0 = pass. Console log: $APERTURE_CACHE/logs/boot-smoke-console.log
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
usage: $0 [--kernel pvh|bzimage] [-- EXTRA_QEMU_ARGS...]
  --kernel pvh      boot the PVH ELF vmlinux (default; ~4 s faster under TCG)
  --kernel bzimage  boot vmlinuz (the bzImage) instead
env: APERTURE_CACHE, APERTURE_BOOT_TIMEOUT (seconds, default 120),
     APERTURE_GUEST_APPEND (extra kernel command line)
EOF
}

KIND=pvh EXTRA=()
while (($#)); do
    case "$1" in
        --kernel) (($# >= 2)) || die "--kernel needs pvh|bzimage"; KIND="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

CACHE="$APERTURE_CACHE"
QEMU="$CACHE/bin/qemu-system-x86_64"
case "$KIND" in
    pvh) KERNEL="$CACHE/guest/vmlinux" ;;
    bzimage) KERNEL="$CACHE/guest/vmlinuz" ;;
    *) die "--kernel must be pvh or bzimage, not '$KIND'" ;;
esac
TIMEOUT="${APERTURE_BOOT_TIMEOUT:-120}"
[[ -x "$QEMU" ]] || die "no QEMU wrapper at $QEMU; run scripts/provision.sh first"
[[ -s "$KERNEL" ]] || die "no guest kernel at $KERNEL; run scripts/provision.sh first"
KREL=$(cat "$CACHE/guest/kernel-version")
mkdir -p "$CACHE/logs"

# --- 1. vfio-user-pci in `-device help` -------------------------------------------------
log "check: $QEMU -device help lists vfio-user-pci"
qver=$("$QEMU" --version | head -n1) || die "QEMU wrapper $QEMU does not run"
if help=$("$QEMU" -device help 2>&1); then
    grep -q '"vfio-user-pci"' <<<"$help" || die "$qver: 'vfio-user-pci' is not in '-device help' (need QEMU >= 10.1)"
    log "ok: $qver has $(grep '"vfio-user-pci"' <<<"$help")"
elif grep -q 'Only modules from the same build' <<<"$help"; then
    # Known trap: a host-installed QEMU's module dir (compiled-in path) gets consulted for
    # modules the minimal tree lacks, and -device help loads every module.
    warn "'-device help' aborts because a host QEMU's modules are found (see scripts/README.md); checking '-device vfio-user-pci,help' instead"
    "$QEMU" -device vfio-user-pci,help >/dev/null 2>&1 || die "$qver: '-device vfio-user-pci,help' failed too"
    log "ok: $qver has -device vfio-user-pci"
else
    printf '%s\n' "$help" | tail -n 5 >&2
    die "'$QEMU -device help' failed"
fi

# --- 2. boot ------------------------------------------------------------------------------
W=$(mktemp -d "${TMPDIR:-/tmp}/aperture-smoke.XXXXXX")
trap 'rm -rf "$W"' EXIT
"$(dirname "${BASH_SOURCE[0]}")/mkinitramfs.sh" "$W/initramfs.cpio.gz"

LOG="$CACHE/logs/boot-smoke-console.log"
cmd=("$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot
     -machine q35,memory-backend=mem -accel tcg -smp 1 -m 512M
     -object memory-backend-memfd,id=mem,size=512M,share=on
     -kernel "$KERNEL" -initrd "$W/initramfs.cpio.gz"
     -append "console=ttyS0 panic=-1 loglevel=4 ${APERTURE_GUEST_APPEND:-}"
     -device virtio-rng-pci,disable-legacy=on
     "${EXTRA[@]}")
log "boot: $KREL ($KIND) under $qver, TCG, timeout ${TIMEOUT}s"
log "cmd: ${cmd[*]}"
t0=$(date +%s.%N)
set +e
timeout -k 10 "$TIMEOUT" "${cmd[@]}" </dev/null 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

fail() { die "boot smoke FAILED after ${secs}s: $* (console log: $LOG)"; }
((rc != 124 && rc != 137)) || fail "QEMU did not finish within ${TIMEOUT}s (APERTURE_BOOT_TIMEOUT)"
grep -q "^APERTURE-GUEST-UP $KREL" "$LOG" || fail "guest never printed 'APERTURE-GUEST-UP $KREL' (QEMU exit $rc)"
! grep -q '^APERTURE-ERROR' "$LOG" || fail "guest reported errors: $(grep '^APERTURE-ERROR' "$LOG" | head -n3 | tr '\n' ' ')"
grep -Eq '^APERTURE-PCI .* \[1af4:1044\] .* driver=virtio-pci ' "$LOG" \
    || fail "virtio-rng-pci (1af4:1044) did not enumerate with driver=virtio-pci"
grep -Eq '^APERTURE-VIRTIO .* device=0x0004 driver=virtio_rng ' "$LOG" \
    || fail "no virtio device bound to virtio_rng"
grep -q '^APERTURE-GUEST-DONE' "$LOG" || fail "guest init did not reach the end (APERTURE-GUEST-DONE missing)"
((rc == 0)) || fail "QEMU exited with status $rc"
log "PASS: $KREL booted, virtio-rng bound, guest powered off; boot took ${secs}s wall"
