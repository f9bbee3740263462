#!/usr/bin/env bash
# In-guest disk throughput of the arm64 guest with and without the restricted DMA pool,
# in one run (issue 17, "aperture bench --guest --arch arm64 or an equivalent command").
#
# Provisions with scripts/provision-arm64.sh (fails loudly naming what could not be
# provisioned), builds `aperture` (unless APERTURE_BIN) and scripts/guest/diskbench.c
# for arm64 (static, aarch64-linux-gnu-gcc; cached in $APERTURE_CACHE/arm64/tools), and
# boots the guest (QEMU virt TCG, 1 vCPU, 512 MiB) once per configuration and round,
# rounds alternating so that drift in the machine hits every configuration alike:
#   aperture-none   `aperture serve --arch arm64 --iommu off`: our device host, the disk
#                   reaches all guest RAM (no isolation)
#   aperture-pool   the same with --pool SIZE: the disk reaches only the pool, and the
#                   guest bounces every buffer (vrings included) through it
#   qemu-none       QEMU's own virtio-blk-pci, no ACCESS_PLATFORM (reference)
#   qemu-pool       QEMU's own virtio-blk-pci with iommu_platform=on and the pool
# The guest runs diskbench (scripts/bench-init.sh): 4 KiB random reads and 1 MiB
# sequential reads, O_DIRECT, queue depth 1, an untimed warm-up then SECONDS timed.
# Pool configurations must show "assigned reserved memory node" for the disk on the
# console, else the run fails. Prints per configuration the median of the rounds and
# the ratio of each pool configuration to its own "none", one line each:
#   BENCH <config> randread4k_iops=<median> seqread1m_mibps=<median> rounds=<n>
#   RATIO <config>/<base> randread4k=<x> seqread1m=<x>
# and writes them with every round's figures to $BENCH_OUT (default: a file in the work
# directory, printed at the end). Exit 0 if every boot produced its figures.
#
# Environment: APERTURE_CACHE, APERTURE_BIN, BENCH_SECONDS (5), BENCH_ROUNDS (3),
# BENCH_POOL (16M), BENCH_DISK_MIB (256), BENCH_ONLY=a,b (configurations), BENCH_OUT.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"

SCRIPTS="$APERTURE_SCRIPTS_DIR"
ALL=(aperture-none aperture-pool qemu-none qemu-pool)
SECS="${BENCH_SECONDS:-5}"
ROUNDS="${BENCH_ROUNDS:-3}"
POOL_ARG="${BENCH_POOL:-16M}"
DISK_MIB="${BENCH_DISK_MIB:-256}"
MEM_MIB=512
MACHINE=(-machine virt -cpu cortex-a57 -smp 1)
BOOT_TIMEOUT=$((SECS * 2 * 2 + 120))
for v in SECS ROUNDS DISK_MIB; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done

E2E_ONLY="${BENCH_ONLY:-}"
e2e_select
e2e_workdir bench-arm64
OUT="${BENCH_OUT:-$RUN/bench-arm64.txt}"
KEEP_RUN=1   # the figures stay

# --- provisioning, binary, diskbench, initramfs, device trees ---------------------------------
if ! "$SCRIPTS/provision-arm64.sh" >"$RUN/provision.log" 2>&1; then
    sed 's/^/  provision: /' "$RUN/provision.log" | tail -n 15 >&2
    die "arm64 provisioning failed: $(grep -E 'ERROR' "$RUN/provision.log" | head -n 2 | tr '\n' ' ')(log: $RUN/provision.log)"
fi
# shellcheck disable=SC1091
. "$APERTURE_CACHE/arm64/env"
QEMU="$APERTURE_ARM64_QEMU" KERNEL="$APERTURE_ARM64_KERNEL"
e2e_binary
SRC="$SCRIPTS/guest/diskbench.c"
DB="$APERTURE_CACHE/arm64/tools/diskbench-$(sha256sum "$SRC" | cut -c1-12)"
if [[ ! -s "$DB" ]]; then
    aarch64-linux-gnu-gcc -static -O2 -o "$DB.tmp" "$SRC" 2>"$RUN/diskbench.log" \
        || die "cannot build diskbench for arm64 (static glibc for aarch64 comes with libc6-dev-arm64-cross, which provision-arm64.sh installs): $(head -n 3 "$RUN/diskbench.log" | tr '\n' ' ')"
    mv -f "$DB.tmp" "$DB"
fi
INITRD="$RUN/initramfs.cpio.gz"
"$SCRIPTS/mkinitramfs.sh" "$INITRD" --arch arm64 --init "$SCRIPTS/bench-init.sh" --add "$DB" /bin/diskbench \
    >"$RUN/initramfs.log" 2>&1 || die "mkinitramfs.sh --arch arm64 failed (log: $RUN/initramfs.log)"
"$QEMU" -nodefaults -no-user-config -display none "${MACHINE[@]}" -m "${MEM_MIB}M" \
    -machine "virt,dumpdtb=$RUN/virt.dtb" >/dev/null 2>&1
[[ -s "$RUN/virt.dtb" ]] || die "QEMU did not dump the virt device tree"
dtc -q -I dtb -O dtb -o "$RUN/plain.dtb" "$RUN/virt.dtb" || die "dtc could not recompile the virt device tree"
"$BIN" dt-pool --dtb "$RUN/virt.dtb" --out "$RUN/pool.dtb" --pool-size "$POOL_ARG" --device 2 >"$RUN/pool.env" \
    || die "aperture dt-pool failed"
DISK="$RUN/disk.img"
head -c $((DISK_MIB << 20)) /dev/urandom >"$DISK" || die "cannot write the disk image"
log "QEMU $APERTURE_ARM64_QEMU_VERSION, kernel $APERTURE_ARM64_KERNEL_RELEASE, ${SECS}s per workload, $ROUNDS rounds of: ${SELECTED[*]}"

# --- one boot ---------------------------------------------------------------------------------
# boot_one CONFIG ROUND: boots it (work directory CONFIG.ROUND); prints "<iops> <mibps>" or fails saying why.
boot_one() {
    local cfg="$1" dir="$RUN/$1.$2" dev_args=() extra=() serve_pid="" i qrc
    mkdir -p "$dir"
    local append="console=ttyAMA0 panic=-1 loglevel=7 aperture.seconds=$SECS aperture.warmup=1 aperture.watchdog=$((BOOT_TIMEOUT - 10))"
    case "$cfg" in
        aperture-none | aperture-pool)
            local args=(serve --dir "$dir/vm" --disk "$DISK" --arch arm64 --iommu off --mem "$MEM_MIB")
            [[ "$cfg" == aperture-pool ]] && args+=(--pool "$POOL_ARG" --dtb "$RUN/virt.dtb")
            "$BIN" "${args[@]}" >"$dir/serve.log" 2>&1 &
            serve_pid=$!
            PIDS+=("$serve_pid")
            for ((i = 0; i < 200; i++)); do
                grep -q 'QEMU arguments in' "$dir/serve.log" 2>/dev/null && break
                kill -0 "$serve_pid" 2>/dev/null || break
                sleep 0.05
            done
            grep -q 'QEMU arguments in' "$dir/serve.log" || { echo "serve did not come up: $(tail -n 2 "$dir/serve.log" | tr '\n' ' ')"; return 1; }
            mapfile -t extra <"$dir/vm/qemu-args"
            dev_args=("${extra[@]}")
            [[ "$cfg" == aperture-none ]] && dev_args+=(-dtb "$RUN/plain.dtb")
            ;;
        qemu-none | qemu-pool)
            local platform=off dtb="$RUN/plain.dtb"
            [[ "$cfg" == qemu-pool ]] && platform=on dtb="$RUN/pool.dtb"
            dev_args=(-m "${MEM_MIB}M" -dtb "$dtb" -drive "if=none,id=d0,file=$DISK,format=raw,cache=none"
                      -device "virtio-blk-pci,drive=d0,addr=2,iommu_platform=$platform,disable-legacy=on")
            ;;
    esac
    timeout -k 5 "$BOOT_TIMEOUT" "$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        "${MACHINE[@]}" -accel tcg -kernel "$KERNEL" -initrd "$INITRD" -append "$append" "${dev_args[@]}" \
        </dev/null 2>"$dir/qemu.err" | tr -d '\r' >"$dir/console.log"
    qrc=${PIPESTATUS[0]}
    if [[ -n "$serve_pid" ]]; then
        for ((i = 0; i < 200; i++)); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$serve_pid" 2>/dev/null
        wait "$serve_pid" 2>/dev/null
        forget_pid "$serve_pid"
    fi
    ((qrc == 0)) || { echo "QEMU exited with status $qrc (console: $dir/console.log)"; return 1; }
    if [[ "$cfg" == *-pool ]]; then
        grep -q 'assigned reserved memory node restricted-dma-pool' "$dir/console.log" \
            || { echo "the guest did not assign the pool to the disk (console: $dir/console.log)"; return 1; }
    fi
    local iops mibps
    iops=$(sed -n 's/.*APERTURE-BENCH randread4k iops=\([0-9.]*\).*/\1/p' "$dir/console.log")
    mibps=$(sed -n 's/.*APERTURE-BENCH seqread1m mibps=\([0-9.]*\).*/\1/p' "$dir/console.log")
    [[ -n "$iops" && -n "$mibps" ]] || { echo "no diskbench figures (console: $dir/console.log)"; return 1; }
    echo "$iops $mibps"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A IOPS=() MIBPS=()
failed=0
: >"$OUT"
for ((r = 1; r <= ROUNDS; r++)); do
    for cfg in "${SELECTED[@]}"; do
        if res=$(boot_one "$cfg" "$r"); then
            read -r iops mibps <<<"$res"
            IOPS[$cfg]+="$iops " MIBPS[$cfg]+="$mibps "
            printf 'ROUND %d %s randread4k_iops=%s seqread1m_mibps=%s\n' "$r" "$cfg" "$iops" "$mibps" | tee -a "$OUT" >&2
        else
            failed=1
            printf 'FAIL %s round %d: %s\n' "$cfg" "$r" "$res" | tee -a "$OUT"
        fi
    done
done
declare -A MI=() MM=()
for cfg in "${SELECTED[@]}"; do
    [[ -n "${IOPS[$cfg]:-}" ]] || continue
    MI[$cfg]=$(tr ' ' '\n' <<<"${IOPS[$cfg]}" | grep . | median)
    MM[$cfg]=$(tr ' ' '\n' <<<"${MIBPS[$cfg]}" | grep . | median)
    printf 'BENCH %s randread4k_iops=%s seqread1m_mibps=%s rounds=%d\n' "$cfg" "${MI[$cfg]}" "${MM[$cfg]}" \
        "$(tr ' ' '\n' <<<"${IOPS[$cfg]}" | grep -c .)" | tee -a "$OUT"
done
for pair in aperture-pool/aperture-none qemu-pool/qemu-none aperture-none/qemu-none aperture-pool/qemu-pool; do
    a=${pair%/*} b=${pair#*/}
    [[ -n "${MI[$a]:-}" && -n "${MI[$b]:-}" ]] || continue
    awk -v a="$a" -v b="$b" -v ia="${MI[$a]}" -v ib="${MI[$b]}" -v ma="${MM[$a]}" -v mb="${MM[$b]}" \
        'BEGIN { printf "RATIO %s/%s randread4k=%.2f seqread1m=%.2f\n", a, b, ia / ib, ma / mb }' | tee -a "$OUT"
done
rm -f "$DISK"
log "figures in $OUT (consoles and logs in $RUN)"
exit "$failed"
