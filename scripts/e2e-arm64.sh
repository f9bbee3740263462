#!/usr/bin/env bash
# End-to-end tests of the restricted DMA pool with a real Linux guest (issue 17): an
# arm64 guest (QEMU virt, TCG) whose device tree gives PCI devices a restricted-dma-pool.
#
# 1. Runs scripts/provision-arm64.sh (cached; needs root the first time; the first run
#    builds the guest kernel, about 5-10 min on 2 CPUs). If that fails, every scenario
#    FAILS, naming what could not be provisioned.
# 2. Builds `aperture` (unless APERTURE_BIN is set) for `aperture dt-pool`, and the
#    initramfs (scripts/mkinitramfs.sh --arch arm64 --init scripts/e2e-arm64-init.sh).
# 3. Dumps the virt machine's device tree with the boot's own -cpu/-smp/-m
#    (-machine virt,dumpdtb=F) and adds the pool with `aperture dt-pool`: POOL_SIZE at the
#    top of RAM, given to the functions at 00:02.0 (disk) and 00:03.0 (rng).
# 4. Runs the scenarios, each one TCG boot with a fresh disk image
#    ([0, N MiB) deterministic host data, [N, 2N MiB) zeros the guest overwrites with
#    `yes PATTERN`), all with swiotlb=8192,force so that a 16 MiB global swiotlb exists
#    and any device DMA that missed the pool would show in its counters:
#      qemu-pool              QEMU's virtio-blk-pci and virtio-rng-pci with
#                             iommu_platform=on (VIRTIO_F_ACCESS_PLATFORM: virtio then uses
#                             the DMA API) and the pool: the guest creates the pool at the
#                             planned place and assigns it to both functions, the pool's
#                             io_tlb_used_hiwater rises above what the probe left
#                             allocated, the global swiotlb's stays 0, and the data
#                             checksum-match in both directions
#      qemu-pool-no-platform  control: the same pool, iommu_platform=off; the pool is
#                             assigned but virtio bypasses the DMA API, so its counters
#                             stay 0 (the check that they rise can fail)
#      qemu-no-pool           control: no pool node, iommu_platform=on; the devices bounce
#                             through the global swiotlb, whose hiwater rises (the check
#                             that it stays 0 can fail)
#      serve-pool             our device host: `aperture serve --arch arm64 --iommu off
#                             --pool SIZE --dtb virt.dtb` serves virtio-blk (00:11.0) and
#                             virtio-rng (00:12.0) over vfio-user, in process, each
#                             offering ACCESS_PLATFORM and reaching only the pool; serve
#                             writes the pool's device tree itself (its plan must agree
#                             with dt-pool's); the checks of qemu-pool, and serve exits by
#                             itself with its sockets gone
#      serve-pool-fault       as serve-pool with --test-fault-sector S: the device aims
#                             that one read at guest RAM outside the pool, which its
#                             memory refuses; the guest's read fails (EIO), the rest of the
#                             I/O works and serve exits cleanly
#      serve-pool-backend     as serve-pool, the disk run out of process by `aperture
#                             backend blk` over vhost-user (--disk vhost-user=SOCK); guest
#                             RAM is two memfds split at the pool (two NUMA nodes), and
#                             the back-end is given the pool's alone: during the guest's
#                             hold its /proc/PID/maps and fd hold the pool's memfd and not
#                             RAM's, and a secret the guest keeps in RAM outside the pool
#                             is nowhere in its memory
#      serve-backend-no-pool  control: the same without --pool; the back-end maps guest
#                             RAM's memfd and the secret is in its memory (the two checks
#                             above can fail)
# Prints "PASS name (...)" or "FAIL name: reason (logs: DIR)" per scenario, then
# "N passed, M failed". Exit status 0 only if M == 0. Not part of test.sh (yet).
#
# Environment:
#   E2E_ONLY=a,b         run only these scenarios
#   APERTURE_BIN=PATH    use this aperture binary instead of building one
#   E2E_MIB=N            MiB the guest reads and writes (default 32)
#   E2E_POOL_SIZE=SIZE   the pool (default 16M)
#   E2E_BOOT_TIMEOUT=S   QEMU's time limit per boot (default 240)
#   E2E_KEEP=1           keep the work directory of passed scenarios too
#   APERTURE_CACHE       the provisioning cache (default ~/.cache/aperture)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"

SCRIPTS="$APERTURE_SCRIPTS_DIR"
ALL=(qemu-pool qemu-pool-no-platform qemu-no-pool serve-pool serve-pool-fault serve-pool-backend serve-backend-no-pool)
MIB="${E2E_MIB:-32}"
POOL_SIZE_ARG="${E2E_POOL_SIZE:-16M}"
BOOT_TIMEOUT="${E2E_BOOT_TIMEOUT:-240}"
WATCHDOG=$((BOOT_TIMEOUT * 2 / 3))
# The machine: the device tree is dumped with exactly these, and every boot uses them.
# serve's qemu-args carry -m (= --mem) for the served scenarios.
MEM_MIB=512
MACHINE=(-machine virt -cpu cortex-a57 -smp 1)
BLK_PCI=0000:00:02.0 RNG_PCI=0000:00:03.0
# The functions `aperture serve` lays out (0x10 is the virtio-iommu's slot, unused here).
SERVE_BLK_PCI=0000:00:11.0 SERVE_RNG_PCI=0000:00:12.0
SERVE_EXIT_LIMIT=10
# The back-end scenarios: the guest holds this long after its workload while the host
# inspects the back-end.
HOLD=8
# swiotlb=N,force: the global swiotlb, 16 MiB of 2 KiB slabs, bounces every DMA that
# does not go through the pool. Without N, arm64 sizes it for kmalloc bouncing only
# (1 MiB per GiB of RAM: 512 KiB here) when RAM needs no bouncing.
GLOBAL_SLABS=8192
for v in MIB BOOT_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "E2E_$v must be a positive integer, not '${!v}'"
done

e2e_select
e2e_workdir e2e-arm64
T_ALL=$(now)

# --- provisioning -----------------------------------------------------------------------------
log "provisioning: scripts/provision-arm64.sh (log: $RUN/provision.log)"
t0=$(now)
if ! "$SCRIPTS/provision-arm64.sh" >"$RUN/provision.log" 2>&1; then
    KEEP_RUN=1
    why=$(grep -E 'ERROR|could not|must run as root' "$RUN/provision.log" | grep -v 'provisioning FAILED' | head -n 3 | tr '\n' ' ')
    sed 's/^/  provision: /' "$RUN/provision.log" | tail -n 15 >&2
    abort_all "arm64 provisioning failed: ${why:-see $RUN/provision.log} (log: $RUN/provision.log)"
fi
ENVF="$APERTURE_CACHE/arm64/env"
[[ -r "$ENVF" ]] || abort_all "arm64 provisioning left no $ENVF"
# shellcheck disable=SC1090
. "$ENVF"
QEMU="${APERTURE_ARM64_QEMU:-}" KERNEL="${APERTURE_ARM64_KERNEL:-}" KREL="${APERTURE_ARM64_KERNEL_RELEASE:-}"
[[ -x "$QEMU" ]] || abort_all "provisioning did not produce the aarch64 QEMU wrapper (APERTURE_ARM64_QEMU=$QEMU)"
[[ -s "$KERNEL" ]] || abort_all "provisioning did not produce the arm64 guest kernel (APERTURE_ARM64_KERNEL=$KERNEL)"
command -v dtc >/dev/null || abort_all "dtc (device-tree-compiler) is missing after provisioning"
log "provisioned in $(since "$t0")s: QEMU $APERTURE_ARM64_QEMU_VERSION ($APERTURE_ARM64_QEMU_DEB), kernel $KREL ($APERTURE_ARM64_KERNEL_SOURCE_DEB, key $APERTURE_ARM64_KERNEL_KEY)"

e2e_binary
INITRD="$RUN/initramfs.cpio.gz"
"$SCRIPTS/mkinitramfs.sh" "$INITRD" --arch arm64 --init "$SCRIPTS/e2e-arm64-init.sh" >"$RUN/initramfs.log" 2>&1 \
    || { KEEP_RUN=1; cat "$RUN/initramfs.log" >&2; abort_all "scripts/mkinitramfs.sh --arch arm64 failed (log: $RUN/initramfs.log)"; }

# --- the device trees ----------------------------------------------------------------------------
"$QEMU" -nodefaults -no-user-config -display none "${MACHINE[@]}" -m "${MEM_MIB}M" \
    -machine "virt,dumpdtb=$RUN/virt.dtb" >"$RUN/dumpdtb.log" 2>&1
[[ -s "$RUN/virt.dtb" ]] || { KEEP_RUN=1; abort_all "QEMU did not dump the virt device tree: $(tail -n 2 "$RUN/dumpdtb.log" | tr '\n' ' ')"; }
# QEMU's dump is padded to 1 MiB, and the guest does not boot from it as given (no
# console output at all); recompiled by dtc (8 KiB) it boots. dt-pool's output is always
# recompiled; the control without a pool gets the same treatment.
dtc -q -I dtb -O dtb -o "$RUN/virt-plain.dtb" "$RUN/virt.dtb" 2>"$RUN/dtc.err" \
    || { KEEP_RUN=1; abort_all "dtc could not recompile the virt device tree: $(tr '\n' ' ' <"$RUN/dtc.err")"; }
"$BIN" dt-pool --dtb "$RUN/virt.dtb" --out "$RUN/pool.dtb" --pool-size "$POOL_SIZE_ARG" \
    --device "${BLK_PCI#0000:00:}" --device "${RNG_PCI#0000:00:}" >"$RUN/pool.env" 2>"$RUN/dt-pool.err" \
    || { KEEP_RUN=1; abort_all "aperture dt-pool failed: $(tr '\n' ' ' <"$RUN/dt-pool.err")"; }
POOL_NODE=$(sed -n 's/^POOL_NODE=//p' "$RUN/pool.env")
POOL_BASE=$(sed -n 's/^POOL_BASE=//p' "$RUN/pool.env")
POOL_SIZE=$(sed -n 's/^POOL_SIZE=//p' "$RUN/pool.env")
[[ -n "$POOL_NODE" && -n "$POOL_BASE" && -n "$POOL_SIZE" ]] || abort_all "aperture dt-pool printed no pool ($RUN/pool.env)"
log "pool: $POOL_NODE, $((POOL_SIZE >> 20)) MiB at $POOL_BASE, for $BLK_PCI and $RNG_PCI (source: $RUN/pool.dtb.dts)"

# --- one scenario -----------------------------------------------------------------------------------
# m KEY [WORD...]: the rest of the first "APERTURE-E2E KEY WORD..." line.
m() { awk -v k="$*" '{ $1 = ""; sub(/^ /, "") } index($0, k " ") == 1 || $0 == k { print substr($0, length(k) + 2); exit }' "$MARKERS"; }
has() { [[ -n "$(m "$@")" ]] || grep -qx "APERTURE-E2E $*" "$MARKERS"; }
# field NAME LINE: the value of NAME=VALUE in LINE.
field() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$2"; }

# inspect_backend TIMEOUT_PID BACKEND_PID: during the guest's hold, sets RAM_INO and
# POOL_INO (QEMU's memfds of guest RAM: the piece of 64 MiB or more, and the piece of
# exactly the pool's size), HELD (memfd inodes the back-end maps or holds) and
# SECRET_HITS (its mappings holding the secret).
inspect_backend() {
    local parent="$1" bpid="$2" qpid
    RAM_INO="" POOL_INO="" HELD="" SECRET_HITS=""
    qemu_at_hold "$parent" || return
    qpid=$QEMU_PID
    RAM_INO=$(memfd_maps "$qpid" | awk '$2 >= 64 * 1048576 { print $1 }' | sort -u | paste -sd' ' -)
    POOL_INO=$(memfd_maps "$qpid" | awk -v s="$((POOL_SIZE))" '$2 == s { print $1 }' | sort -u | paste -sd' ' -)
    HELD=$(memfd_held "$bpid" | sort -u | paste -sd' ' -)
    SECRET_HITS=$(secret_regions "$bpid" "$SECRET")
    kill -0 "$qpid" 2>/dev/null || bad "the inspection outlasted the guest's hold of ${HOLD}s"
}

run_scenario() {   # run_scenario NAME
    local name="$1" dir="$RUN/$1" dtb platform img qrc t0 secs host_md5 want_w line probe io counters
    local blk_pci="$BLK_PCI" rng_pci="$RNG_PCI" serve=0 fault=0 tail_sector tail_md5 dev_args i
    local extra=() serve_pid="" serve_rc="" serve_args=() backend=0 pool=1 backend_pid="" qemu_pid
    local sock="" ino
    mkdir -p "$dir"
    REASONS=()
    CONSOLE="$dir/console.log" MARKERS="$dir/markers"
    case "$name" in
        qemu-pool) dtb="$RUN/pool.dtb" platform=on ;;
        qemu-pool-no-platform) dtb="$RUN/pool.dtb" platform=off ;;
        qemu-no-pool) dtb="$RUN/virt-plain.dtb" platform=on ;;
        serve-pool) serve=1 ;;
        serve-pool-fault) serve=1 fault=1 ;;
        serve-pool-backend) serve=1 backend=1 ;;
        serve-backend-no-pool) serve=1 backend=1 pool=0 ;;
    esac
    CONSOLE_RAW="$dir/console.raw"
    SECRET="SECRET-$(head -c 16 /dev/urandom | md5_of)"
    # The image: [0, N) host data, [N, 2N) zeros, [2N, 2N+1) MiB `yes TAIL-name`, whose
    # sector tail_sector is the one-sector read of the fault scenario.
    img="$dir/disk.img"
    head -c $((MIB << 20)) /dev/zero | openssl enc -aes-128-ctr -nosalt \
        -K "$(printf 'aperture-e2e-arm64 %s' "$name" | md5_of)" -iv 00000000000000000000000000000000 >"$img" 2>/dev/null \
        || { fail "$name: cannot write the disk image"; return; }
    truncate -s $(((2 * MIB) << 20)) "$img"
    yes_bytes "TAIL-$name" $((1 << 20)) >>"$img"
    tail_sector=$((((2 * MIB) << 11) + 1001))
    tail_md5=$(dd if="$img" bs=512 skip="$tail_sector" count=1 status=none | md5_of)
    host_md5=$(md5_range "$img" 0 "$MIB")
    want_w=$(yes_bytes "ARM64-$name" $((MIB << 20)) | md5_of)

    local append="console=ttyAMA0 panic=-1 loglevel=4 swiotlb=$GLOBAL_SLABS,force aperture.mib=$MIB aperture.pattern=ARM64-$name aperture.watchdog=$WATCHDOG"
    if ((serve)); then
        blk_pci=$SERVE_BLK_PCI rng_pci=$SERVE_RNG_PCI
        serve_args=(serve --dir "$dir/vm" --rng --arch arm64 --iommu off --mem "$MEM_MIB")
        ((pool)) && serve_args+=(--pool "$POOL_SIZE_ARG" --dtb "$RUN/virt.dtb")
        if ((backend)); then
            sock="$dir/blk.sock"
            "$BIN" backend blk --socket "$sock" --disk "$img" --stats "$dir/backend.json" --once \
                >"$dir/backend.log" 2>&1 &
            backend_pid=$!
            PIDS+=("$backend_pid")
            for ((i = 0; i < 200; i++)); do [[ -S "$sock" ]] && break; sleep 0.05; done
            [[ -S "$sock" ]] || { KEEP_RUN=1; fail "$name: aperture backend blk did not listen: $(tail -n 2 "$dir/backend.log" | tr '\n' ' ')(logs: $dir)"; return; }
            serve_args+=(--disk "vhost-user=$sock")
            append+=" aperture.secret=$SECRET aperture.hold=$HOLD"
        else
            serve_args+=(--disk "$img")
        fi
        if ((fault)); then
            serve_args+=(--test-fault-sector "$tail_sector")
            append+=" aperture.fault_sector=$tail_sector"
        fi
        "$BIN" "${serve_args[@]}" >"$dir/serve.log" 2>&1 &
        serve_pid=$!
        PIDS+=("$serve_pid")
        for ((i = 0; i < 200; i++)); do
            grep -q 'QEMU arguments in' "$dir/serve.log" 2>/dev/null && break
            kill -0 "$serve_pid" 2>/dev/null || break
            sleep 0.05
        done
        if ! grep -q 'QEMU arguments in' "$dir/serve.log" 2>/dev/null; then
            KEEP_RUN=1
            fail "$name: aperture serve did not come up: $(tail -n 3 "$dir/serve.log" | tr '\n' ' ')(logs: $dir)"
            kill -KILL "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null; forget_pid "$serve_pid"
            return
        fi
        mapfile -t extra <"$dir/vm/qemu-args"
        dev_args=("${extra[@]}")
    else
        dev_args=(-m "${MEM_MIB}M" -dtb "$dtb"
                  -drive "if=none,id=d0,file=$img,format=raw,cache=unsafe"
                  -device "virtio-blk-pci,drive=d0,addr=${BLK_PCI#0000:00:},iommu_platform=$platform,disable-legacy=on"
                  -device "virtio-rng-pci,addr=${RNG_PCI#0000:00:},iommu_platform=$platform,disable-legacy=on")
    fi

    t0=$(now)
    timeout -k 5 "$BOOT_TIMEOUT" "$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        "${MACHINE[@]}" -accel tcg -kernel "$KERNEL" -initrd "$INITRD" -append "$append" "${dev_args[@]}" \
        </dev/null >"$dir/console.raw" 2>"$dir/qemu.err" &
    qemu_pid=$!
    PIDS+=("$qemu_pid")
    ((backend)) && inspect_backend "$qemu_pid" "$backend_pid"
    wait "$qemu_pid"
    qrc=$?
    forget_pid "$qemu_pid"
    secs=$(since "$t0")
    tr -d '\r' <"$dir/console.raw" >"$CONSOLE"
    grep -o 'APERTURE-E2E .*' "$CONSOLE" >"$MARKERS"

    # The run itself.
    if ((qrc == 124 || qrc == 137)); then bad "QEMU did not finish within ${BOOT_TIMEOUT}s"
    elif ((qrc != 0)); then bad "QEMU exited with status $qrc: $(tail -n 2 "$dir/qemu.err" | tr '\n' ' ')"; fi
    if ((serve)); then
        for ((i = 0; i < SERVE_EXIT_LIMIT * 20; i++)); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 0.05; done
        if kill -0 "$serve_pid" 2>/dev/null; then
            kill -KILL "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null
            bad "aperture serve still running ${SERVE_EXIT_LIMIT}s after QEMU exited (killed)"
        else
            wait "$serve_pid"; serve_rc=$?
            ((serve_rc == 0)) || bad "aperture serve exited with status $serve_rc: $(grep -v 'client disconnected' "$dir/serve.log" | tail -n 2 | tr '\n' ' ')"
        fi
        forget_pid "$serve_pid"
        [[ -z "$(find "$dir/vm" -maxdepth 1 -type s 2>/dev/null)" ]] || bad "sockets left in $dir/vm after serve exited"
        # serve planned the pool itself, from the same blob: it must be dt-pool's.
        ((!pool)) || grep -q "restricted DMA pool at $POOL_BASE ($POOL_NODE)" "$dir/serve.log" \
            || bad "serve's pool is not dt-pool's ($POOL_NODE at $POOL_BASE): $(grep 'pool mode' "$dir/serve.log")"
        grep -qi 'panick' "$dir/serve.log" && bad "aperture serve panicked: $(grep -i -m1 'panick' "$dir/serve.log")"
    fi
    expect "start" "$(m start)" "$KREL"
    [[ "$(m settle)" == ok* ]] || bad "devices did not bind: settle $(m settle)"
    has watchdog-expired && bad "guest watchdog expired"
    has "done" || bad "guest did not reach 'APERTURE-E2E done'"
    expect "disk $blk_pci" "$(m pci "$blk_pci")" "1af4:1042 driver=virtio-pci"
    expect "rng $rng_pci" "$(m pci "$rng_pci")" "1af4:1044 driver=virtio-pci"
    if ((fault)); then
        # The refused read fails alone: EIO in the guest, and everything after works.
        [[ "$(m fault-read)" == fail* ]] || bad "the read of sector $tail_sector aimed outside the pool did not fail: fault-read $(m fault-read)"
        [[ "$(m fault-read)" == *"$tail_md5"* ]] && bad "the refused read returned the sector's data"
    fi
    # Data, both directions.
    expect "blk-read-md5 (host data)" "$(m blk-read-md5)" "$host_md5"
    expect "blk-write-md5" "$(m blk-write-md5)" "$want_w"
    expect "blk-readback-md5" "$(m blk-readback-md5)" "$want_w"
    expect "image [N, 2N) MiB on the host" "$(md5_range "$img" "$MIB" "$MIB")" "$want_w"
    has blk fail && bad "block I/O failed: $(m blk fail)"
    [[ "$(m rng)" == "ok 64" ]] || bad "rng: $(m rng)"

    # The global swiotlb (swiotlb=force: it exists).
    probe=$(m swiotlb probe default) io=$(m swiotlb io default)
    [[ -n "$io" ]] || bad "no counters of the global swiotlb in debugfs"
    expect "global swiotlb nslabs (swiotlb=$GLOBAL_SLABS,force)" "$(field nslabs "$io")" "$GLOBAL_SLABS"

    if ((backend)); then
        # The back-end process (--once): it exits after the front-end went away.
        for ((i = 0; i < SERVE_EXIT_LIMIT * 20; i++)); do kill -0 "$backend_pid" 2>/dev/null || break; sleep 0.05; done
        if kill -0 "$backend_pid" 2>/dev/null; then
            kill -KILL "$backend_pid" 2>/dev/null; wait "$backend_pid" 2>/dev/null
            bad "aperture backend blk still running ${SERVE_EXIT_LIMIT}s after serve exited (killed)"
        else
            wait "$backend_pid" || bad "aperture backend blk exited with status $?: $(tail -n 2 "$dir/backend.log" | tr '\n' ' ')"
        fi
        forget_pid "$backend_pid"
        expect "secret-written" "$(m secret-written)" 1048576
        [[ -n "$RAM_INO" ]] || bad "found no guest RAM memfd (a piece of 64 MiB or more) in QEMU's maps"
        if ((pool)); then
            [[ -n "$POOL_INO" ]] || bad "found no memfd of the pool's size ($((POOL_SIZE >> 20)) MiB) in QEMU's maps: RAM is not split at the pool"
            [[ -n "$POOL_INO" && " $HELD " == *" $POOL_INO "* ]] || bad "the back-end does not hold the pool's memfd (inode ${POOL_INO:-?}; it holds: ${HELD:-none})"
            for ino in $RAM_INO; do
                [[ " $HELD " == *" $ino "* ]] && bad "the back-end maps or holds guest RAM's memfd (inode $ino)"
            done
            [[ -z "$HELD" || "$HELD" == "$POOL_INO" ]] || bad "the back-end holds memfds other than the pool's: $HELD (pool: $POOL_INO)"
            [[ "$SECRET_HITS" == 0 ]] || bad "the guest's secret is in ${SECRET_HITS:-?} of the back-end's mappings"
        else
            # The control: without the pool the back-end is given guest RAM, secret and all.
            local any=0
            for ino in $RAM_INO; do [[ " $HELD " == *" $ino "* ]] && any=1; done
            ((any)) || bad "control: the back-end should map guest RAM's memfd without the pool (RAM: $RAM_INO; it holds: ${HELD:-none})"
            [[ "$SECRET_HITS" -gt 0 ]] 2>/dev/null || bad "control: the guest's secret should be in the back-end's memory without the pool; the scan found it in ${SECRET_HITS:-no} mappings"
        fi
    fi

    case "$name" in
        serve-backend-no-pool)
            grep -q '^APERTURE-E2E pool-assigned' "$MARKERS" && bad "a pool was assigned without --pool"
            ;;
        qemu-pool | qemu-pool-no-platform | serve-pool | serve-pool-fault | serve-pool-backend)
            line=$(m pool-created)
            expect "pool created (base MiB)" "$(printf '%#x %s' "${line%% *}" "${line#* }" 2>/dev/null)" "$(printf '%#x %s' "$POOL_BASE" $((POOL_SIZE >> 20)))"
            expect "pool assigned to $blk_pci" "$(m pool-assigned "$blk_pci")" "$POOL_NODE"
            expect "pool assigned to $rng_pci" "$(m pool-assigned "$rng_pci")" "$POOL_NODE"
            probe=$(m swiotlb probe "$POOL_NODE") io=$(m swiotlb io "$POOL_NODE")
            [[ -n "$io" ]] || bad "no debugfs counters of the pool $POOL_NODE"
            expect "pool nslabs" "$(field nslabs "$io")" $((POOL_SIZE >> 11))
            expect "global swiotlb hiwater after I/O" "$(field hiwater "$(m swiotlb io default)")" 0
            if [[ "$name" != qemu-pool-no-platform ]]; then
                # What the probe left allocated (vrings) stays; the I/O peak must exceed it.
                (($(field hiwater "$io") > $(field used "$probe"))) 2>/dev/null \
                    || bad "the pool's hiwater did not rise with I/O: probe '$probe', io '$io'"
            else
                expect "pool used after probe (no ACCESS_PLATFORM)" "$(field used "$probe")" 0
                expect "pool hiwater after I/O (no ACCESS_PLATFORM)" "$(field hiwater "$io")" 0
            fi
            ;;
        qemu-no-pool)
            has pool-created && bad "a pool was created without a pool node: $(m pool-created)"
            grep -q '^APERTURE-E2E pool-assigned' "$MARKERS" && bad "a pool was assigned without a pool node"
            (($(field hiwater "$(m swiotlb io default)") > 0)) 2>/dev/null \
                || bad "the global swiotlb's hiwater did not rise although the devices bounce through it: $(m swiotlb io default)"
            ;;
    esac

    if ((${#REASONS[@]})); then
        KEEP_RUN=1
        fail "$name: $(reasons_text)(logs: $dir)"
    else
        counters="global io: $(m swiotlb io default | sed 's/nslabs=[0-9]* //')"
        if has swiotlb probe "$POOL_NODE"; then
            counters="pool probe: $(m swiotlb probe "$POOL_NODE" | sed 's/nslabs=[0-9]* //'); pool io: $(m swiotlb io "$POOL_NODE" | sed 's/nslabs=[0-9]* //'); $counters"
        fi
        if ((backend && pool)); then
            counters+="; back-end holds only the pool's memfd (inode $POOL_INO; RAM's: $RAM_INO), secret in 0 of its mappings"
        elif ((backend)); then
            counters+="; control: back-end holds guest RAM's memfd ($HELD), secret in $SECRET_HITS of its mappings"
        fi
        pass "$name (boot+I/O ${secs}s, blk ${MIB} MiB each way in $(m blk-seconds)s; $counters)"
        rm -f "$img"
    fi
}

for s in "${SELECTED[@]}"; do
    log "scenario $s"
    run_scenario "$s"
done
log "all scenarios in $(since "$T_ALL")s"
summary
((FAILED == 0))
