#!/usr/bin/env bash
# End-to-end tests: an unmodified Linux guest (QEMU TCG) against `aperture serve`.
#
# 1. Runs scripts/provision.sh (cached, idempotent; needs root the first time). If that
#    fails, every scenario FAILS, naming what could not be provisioned.
# 2. Builds the binary (`cargo build -p aperture`) unless APERTURE_BIN is set, and the
#    initramfs once (scripts/mkinitramfs.sh --init scripts/e2e-init.sh).
# 3. Runs the scenarios, one after the other. Each gets a fresh disk image:
#      [0, N MiB)         deterministic host data (AES-CTR keystream of a per-scenario key)
#      [N, 2N MiB)        zeros; the guest writes `yes PATTERN` there
#      [2N, 2N+1 MiB)     `yes TAIL-<name>`; its sector TAIL_SECTOR is the one-sector read
#    starts `aperture serve` in the background with its own DIR, boots QEMU under
#    `timeout`, then checks the guest's markers (scripts/e2e-init.sh), the image on the
#    host, and that serve exits by itself with its sockets gone.
#      iommu-on-strict   --iommu on, iommu.strict=1
#      iommu-on-lazy     --iommu on (Linux's default lazy invalidation)
#      iommu-bypass      --iommu bypass
#      iommu-off         --iommu off (no virtio-iommu)
#      fault             --iommu on --test-fault-sector TAIL_SECTOR: that read fails with
#                        EIO, the guest logs the fault, the rest of the I/O still works
#      reserved          --iommu on --mem 2560 and an RMRR-like region for each device
#                        (--reserved): the guest's own memory map has no RAM on them and
#                        all 2560 MiB (low RAM lowered as serve planned it, the rest
#                        above 4 GiB), and each device's IOMMU group lists its region
#                        (and not the other's) next to the MSI window
#      host-table        as reserved, but the regions come from a real host table: the
#                        ThinkPad DMAR fixture (crates/mem-layout/fixtures) with
#                        --host-device 00:02.0=blk0 (the IGD's RMRR) and the three USB
#                        controllers sharing one RMRR given together to rng; the guest's
#                        own reserved_regions must list each RMRR for its device
#      qemu-killed       SIGKILL to QEMU during I/O: serve exits by itself, sockets gone
# Prints "PASS name (...)" or "FAIL name: reason (logs: DIR)" per scenario, then exactly
# one line "N passed, M failed". Exit status 0 only if M == 0.
#
# Environment:
#   E2E_ONLY=a,b         run only these scenarios
#   APERTURE_BIN=PATH    use this aperture binary instead of building one
#   E2E_MIB=N            MiB the guest reads and writes (default 32)
#   E2E_KILL_MIB=N       MiB of the qemu-killed boot (default 256; only partly done)
#   E2E_BOOT_TIMEOUT=S   QEMU's time limit per boot (default 240)
#   E2E_KEEP=1           keep the work directory of passed scenarios too
#   APERTURE_CACHE       the provisioning cache (default ~/.cache/aperture)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"

SCRIPTS="$APERTURE_SCRIPTS_DIR"
ALL=(iommu-on-strict iommu-on-lazy iommu-bypass iommu-off fault reserved host-table qemu-killed)
MIB="${E2E_MIB:-32}"
KILL_MIB="${E2E_KILL_MIB:-256}"
BOOT_TIMEOUT="${E2E_BOOT_TIMEOUT:-240}"
# The guest's own watchdog fires first, so a hung device still yields a diagnosis.
WATCHDOG=$((BOOT_TIMEOUT * 2 / 3))
SERVE_EXIT_LIMIT=10     # seconds serve may take to exit after QEMU is gone (its grace is 3 s)
KILL_AFTER=2            # qemu-killed: seconds between the first block I/O and SIGKILL
# reserved: guest RAM (MiB) and one region per device. Low RAM (q35 keeps 2560 MiB below
# 4 GiB) must end below the blk0 region at 2 MiB alignment; the rng region is then free.
RESV_MEM=2560
RESV_BLK=(0x90301000 0x90301fff)
RESV_RNG=(0x98000000 0x980fffff)
# host-table: the ThinkPad DMAR's two RMRRs, IGD 00:02.0 for blk0 and the USB one
# (00:14.0, 00:1a.0, 00:1d.0) for rng; both lie in q35's 32-bit PCI hole.
HOST_DMAR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/crates/mem-layout/fixtures/thinkpad-snb-dmar.bin"
HOST_BLK=(0xdb800000 0xdf9fffff)
HOST_RNG=(0xda2f0000 0xda306fff)

for v in MIB KILL_MIB BOOT_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "E2E_$v must be a positive integer, not '${!v}'"
done

e2e_select
e2e_workdir e2e
T_ALL=$(now)

e2e_provision
e2e_binary
e2e_initramfs "$SCRIPTS/e2e-init.sh"

# --- helpers for one scenario -------------------------------------------------------------------
# Deterministic pseudo-random bytes: AES-128-CTR keystream under a key derived from SEED.
host_data() {   # host_data SEED MIB
    local key
    key=$(printf 'aperture-e2e %s' "$1" | md5_of)
    if command -v openssl >/dev/null 2>&1; then
        head -c $(($2 << 20)) /dev/zero | openssl enc -aes-128-ctr -nosalt -K "$key" -iv 00000000000000000000000000000000
    else
        yes_bytes "HOSTDATA $1 $key" $(($2 << 20))
    fi
}
TAIL_SECTOR=0   # set per image: the sector of the one-sector read, in the tail MiB
# make_image IMG NAME MIB: writes the image and sets HOST_MD5, TAIL_SECTOR, TAIL_MD5.
make_image() {
    local img="$1" name="$2" n="$3"
    host_data "$name" "$n" >"$img" || return 1
    truncate -s $(((2 * n) << 20)) "$img" || return 1
    yes_bytes "TAIL-$name" $((1 << 20)) >>"$img" || return 1
    [[ "$(stat -c %s "$img")" == $(((2 * n + 1) << 20)) ]] || return 1
    HOST_MD5=$(md5_range "$img" 0 "$n")
    TAIL_SECTOR=$((((2 * n) << 11) + 1001))
    TAIL_MD5=$(dd if="$img" bs=512 skip="$TAIL_SECTOR" count=1 status=none | md5_of)
}

# start_serve DIR ARGS...: starts `aperture serve --dir DIR ARGS...` in the background
# (SERVE_PID) and waits for qemu-args. Returns 1 with WHY set if it did not come up.
start_serve() {
    local dir="$1" i
    shift
    "$BIN" serve --dir "$dir" "$@" >"$dir.serve.log" 2>&1 &
    SERVE_PID=$!
    PIDS+=("$SERVE_PID")
    for ((i = 0; i < 200; i++)); do
        grep -q 'QEMU arguments in' "$dir.serve.log" 2>/dev/null && [[ -s "$dir/qemu-args" ]] && return 0
        if ! kill -0 "$SERVE_PID" 2>/dev/null; then
            wait "$SERVE_PID"
            WHY="aperture serve exited with status $? before it was ready: $(tail -n 3 "$dir.serve.log" | tr '\n' ' ')"
            forget_pid "$SERVE_PID"
            return 1
        fi
        sleep 0.05
    done
    WHY="aperture serve did not write $dir/qemu-args within 10 s"
    return 1
}

# wait_serve DIR: waits up to SERVE_EXIT_LIMIT s for serve to exit; sets SERVE_RC and
# SERVE_SECS (time from the call). Kills it and returns 1 if it hangs.
wait_serve() {
    local t0 i
    t0=$(now)
    for ((i = 0; i < SERVE_EXIT_LIMIT * 20; i++)); do
        kill -0 "$SERVE_PID" 2>/dev/null || break
        sleep 0.05
    done
    SERVE_SECS=$(since "$t0")
    if kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -KILL "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
        forget_pid "$SERVE_PID"
        SERVE_RC=hung
        return 1
    fi
    wait "$SERVE_PID"
    SERVE_RC=$?
    forget_pid "$SERVE_PID"
    return 0
}

# qemu_cmd DIR APPEND: fills QCMD.
qemu_cmd() {
    local dir="$1" append="$2" extra=()
    mapfile -t extra <"$dir/qemu-args"
    QCMD=("$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot
          -machine q35 -accel tcg -smp 1
          -kernel "$KERNEL" -initrd "$INITRD"
          -append "console=ttyS0 panic=-1 loglevel=4 $append"
          "${extra[@]}")
}

# After a boot: CONSOLE (\r stripped) and MARKERS ("APERTURE-E2E ..." lines only, from
# wherever they start on a console line, in case a kernel message got in front).
parse_console() {
    tr -d '\r' <"$1" >"$CONSOLE"
    grep -o 'APERTURE-E2E .*' "$CONSOLE" >"$MARKERS"
}
# m KEY: the rest of the first "APERTURE-E2E KEY ..." line (empty if none).
m() { awk -v k="$1" '$2 == k { sub(/^APERTURE-E2E [^ ]+ ?/, ""); print; exit }' "$MARKERS"; }
has() { awk -v k="$1" '$2 == k { f = 1 } END { exit !f }' "$MARKERS"; }

# Checks common to every boot that ran to the end: the run itself, serve's exit and sockets.
check_run() {   # check_run DIR QEMU_RC
    local dir="$1" qrc="$2" socks
    if ((qrc == 124 || qrc == 137)); then
        bad "QEMU did not finish within ${BOOT_TIMEOUT}s"
    elif ((qrc != 0)); then
        bad "QEMU exited with status $qrc: $(tail -n 2 "$dir.qemu.err" 2>/dev/null | tr '\n' ' ')"
    fi
    if [[ "$SERVE_RC" == hung ]]; then
        bad "aperture serve still running ${SERVE_EXIT_LIMIT}s after QEMU exited (killed)"
    elif [[ "$SERVE_RC" != 0 ]]; then
        bad "aperture serve exited with status $SERVE_RC: $(grep -v 'client disconnected' "$dir.serve.log" | tail -n 2 | tr '\n' ' ')"
    fi
    socks=$(find "$dir" -maxdepth 1 -type s -printf '%f ' 2>/dev/null)
    [[ -z "$socks" ]] || bad "sockets left in DIR after serve exited: $socks"
    grep -q . "$MARKERS" || { bad "no APERTURE-E2E line on the console"; return; }
    expect "start" "$(m start)" "$KREL"
    has watchdog-expired && bad "guest watchdog expired after $(m watchdog-expired)s (I/O hung?)"
    grep -q '^APERTURE-ERROR' "$CONSOLE" && bad "guest errors: $(grep '^APERTURE-ERROR' "$CONSOLE" | head -n 2 | tr '\n' ' ')"
    has done || bad "guest did not reach 'APERTURE-E2E done'"
    [[ "$(m settle)" == ok* ]] || bad "devices did not bind: settle $(m settle)"
}

# The functions serve lays out (slots 0x10 iommu, 0x11 blk0, 0x12 rng).
BLK_PCI=0000:00:11.0 RNG_PCI=0000:00:12.0 VIOMMU_PCI=0000:00:10.0
BLK_EP=$((0x11 << 3))

check_pci() {   # check_pci on|off
    grep -Eq "^APERTURE-E2E pci $BLK_PCI 1af4:1042 driver=virtio-pci\$" "$MARKERS" \
        || bad "virtio-blk at $BLK_PCI not bound to virtio-pci: $(grep "pci $BLK_PCI" "$MARKERS")"
    grep -Eq "^APERTURE-E2E pci $RNG_PCI 1af4:1044 driver=virtio-pci\$" "$MARKERS" \
        || bad "virtio-rng at $RNG_PCI not bound to virtio-pci: $(grep "pci $RNG_PCI" "$MARKERS")"
    grep -Eq "^APERTURE-E2E virtio virtio[0-9]+ device=0x0002 driver=virtio_blk pci=$BLK_PCI\$" "$MARKERS" \
        || bad "no virtio_blk bound at $BLK_PCI"
    grep -Eq "^APERTURE-E2E virtio virtio[0-9]+ device=0x0004 driver=virtio_rng pci=$RNG_PCI\$" "$MARKERS" \
        || bad "no virtio_rng bound at $RNG_PCI"
    if [[ "$1" == on ]]; then
        grep -Eq "^APERTURE-E2E pci $VIOMMU_PCI 1af4:1057 driver=virtio-pci\$" "$MARKERS" \
            || bad "virtio-iommu at $VIOMMU_PCI not bound to virtio-pci"
        expect "dmesg-viommu" "$(m dmesg-viommu)" ok
    else
        grep -q '1af4:1057' "$MARKERS" && bad "a virtio-iommu (1af4:1057) is present with --iommu off"
        expect "dmesg-viommu" "$(m dmesg-viommu)" missing
    fi
}

# The group (and its type) of a PCI function, from the markers.
group_of() { awk -v d="$1" '$2 == "iommu-group" && $3 == d { print $4; exit }' "$MARKERS"; }
group_type() { awk -v g="$1" '$2 == "iommu-group-type" && $3 == g { print $4; exit }' "$MARKERS"; }
check_groups() {   # check_groups WANT_TYPE
    local dev g
    for dev in "$BLK_PCI" "$RNG_PCI"; do
        g=$(group_of "$dev")
        if [[ -z "$g" ]]; then bad "$dev is in no IOMMU group"; continue; fi
        expect "group $g type ($dev)" "$(group_type "$g")" "$1"
    done
}
groups_summary() {
    local dev g out=
    for dev in "$BLK_PCI" "$RNG_PCI"; do
        g=$(group_of "$dev")
        if [[ -n "$g" ]]; then out+=", ${dev#0000:} group $g $(group_type "$g")"; else out+=", ${dev#0000:} no group"; fi
    done
    printf '%s' "${out#, }"
}

# Disk, RNG and fault checks against the host's view.
check_io() {   # check_io IMG N PATTERN
    local img="$1" n="$2" pat="$3" want_w after_r after_w
    want_w=$(yes_bytes "$pat" $((n << 20)) | md5_of)
    expect "blk-size" "$(m blk-size)" "$(stat -c %s "$img")"
    has blk && bad "guest block phase: blk $(m blk)"
    expect "blk-read-md5 (host data [0,${n}MiB))" "$(m blk-read-md5)" "$HOST_MD5"
    expect "blk-write-md5 (yes $pat)" "$(m blk-write-md5)" "$want_w"
    expect "blk-readback-md5" "$(m blk-readback-md5)" "$want_w"
    after_w=$(md5_range "$img" "$n" "$n")
    expect "host md5 of [${n},$((2 * n))MiB) after the run" "$after_w" "$want_w"
    after_r=$(md5_range "$img" 0 "$n")
    expect "host md5 of [0,${n}MiB) after the run (must be unchanged)" "$after_r" "$HOST_MD5"
    [[ "$(m rng)" == "ok 64" ]] || bad "rng: got '$(m rng)', want 'ok 64'"
}

# The guest's view of reserved memory against serve's plan (its "guest RAM" log line).
# check_reserved DIR
check_reserved() {
    local dir="$1" plan low_last high_last=0 e820 s e t r rs re os oe g g_blk g_rng lines want pair name
    plan=$(grep -m1 'aperture serve: guest RAM' "$dir.serve.log")
    if [[ "$plan" =~ low\ RAM\ \[0x0-(0x[0-9a-f]+)\](,\ high\ RAM\ \[0x100000000-(0x[0-9a-f]+)\])? ]]; then
        low_last=${BASH_REMATCH[1]}
        [[ -n "${BASH_REMATCH[3]}" ]] && high_last=${BASH_REMATCH[3]}
    else
        bad "serve printed no plan line ('guest RAM ... low RAM [0x0-...]'): '$plan'"
        return
    fi
    (( low_last < ${RESV_BLK[0]} )) || bad "serve's plan keeps low RAM up to $low_last, over the blk0 region ${RESV_BLK[0]}"
    e820=$(awk '$2 == "e820"' "$MARKERS")
    if [[ -z "$e820" || "$e820" == *absent* ]]; then
        bad "the guest reported no memory map (/sys/firmware/memmap)"
        return
    fi
    # No RAM on a region; the end of low memory (RAM or firmware's own reserved RAM
    # below MMCONFIG) and of high RAM exactly as planned.
    local low_end_seen=0 high_end_seen=0
    while read -r _ _ s e t; do
        for r in "${RESV_BLK[*]}" "${RESV_RNG[*]}"; do
            read -r rs re <<<"$r"
            if [[ "$t" == "System RAM" ]] && (( s <= re && rs <= e )); then
                bad "guest e820 has RAM [$s-$e] on reserved region [$rs-$re]"
            fi
        done
        if (( e < 0xb0000000 && e + 1 > low_end_seen )); then low_end_seen=$((e + 1)); fi
        if [[ "$t" == "System RAM" ]] && (( s >= 0x100000000 && e + 1 > high_end_seen )); then high_end_seen=$((e + 1)); fi
    done <<<"$e820"
    expect "guest's end of low memory" "$(printf '%#x' "$low_end_seen")" "$(printf '%#x' $((low_last + 1)))"
    if (( high_last )); then
        expect "guest's end of high RAM" "$(printf '%#x' "$high_end_seen")" "$(printf '%#x' $((high_last + 1)))"
    fi
    local total=$(( low_end_seen + (high_end_seen > 0 ? high_end_seen - 0x100000000 : 0) ))
    expect "guest RAM (low memory + high RAM), MiB" "$((total >> 20))" "$RESV_MEM"
    # Each group lists its own region and the MSI window, and not the other's region.
    g_blk=$(group_of "$BLK_PCI") g_rng=$(group_of "$RNG_PCI")
    for pair in "$g_blk blk0 ${RESV_BLK[*]} ${RESV_RNG[*]}" "$g_rng rng ${RESV_RNG[*]} ${RESV_BLK[*]}"; do
        read -r g name rs re os oe <<<"$pair"
        if [[ -z "$g" ]]; then bad "$name is in no IOMMU group"; continue; fi
        lines=$(awk -v g="$g" '$2 == "iommu-resv" && $3 == g { print $4, $5, $6 }' "$MARKERS")
        want=$(printf '0x%016x 0x%016x reserved' "$rs" "$re")
        grep -qx "$want" <<<"$lines" || bad "group $g ($name) reserved_regions lacks '$want': $(tr '\n' ';' <<<"$lines")"
        grep -qx '0x00000000fee00000 0x00000000feefffff msi' <<<"$lines" || bad "group $g ($name) reserved_regions lacks the MSI window"
        grep -q "$(printf '0x%016x' "$os")" <<<"$lines" && bad "group $g ($name) lists the other device's region $os"
    done
    RESV_INFO="low RAM to $(printf '%#x' "$low_end_seen"), high RAM to $(printf '%#x' "$high_end_seen"), $((total >> 20)) MiB; groups $g_blk/$g_rng list their regions"
}

# --- scenarios ------------------------------------------------------------------------------------
# io_scenario NAME SERVE_IOMMU APPEND KIND: KIND is strict|lazy|bypass|off|fault.
io_scenario() {
    local name="$1" iommu="$2" append="$3" kind="$4"
    local sd="$RUN/$name" dir="$RUN/$name/vm" img="$RUN/$name/disk.img" t0 pat qrc extra=() info
    local viommu=on fault_line
    t0=$(now)
    REASONS=()
    mkdir -p "$sd"
    CONSOLE="$sd/console.log" MARKERS="$sd/markers.txt"
    if ! make_image "$img" "$name" "$MIB"; then
        fail "$name: could not write the disk image $img (logs: $sd)"; KEEP_RUN=1; return
    fi
    pat="W-$name"
    [[ "$kind" == fault ]] && extra=(--test-fault-sector "$TAIL_SECTOR")
    [[ "$kind" == reserved ]] && extra=(--mem "$RESV_MEM"
        --reserved "${RESV_BLK[0]}-${RESV_BLK[1]}@blk0" --reserved "${RESV_RNG[0]}-${RESV_RNG[1]}@rng")
    # check_reserved reads RESV_BLK/RESV_RNG: here they are the table's RMRRs.
    local RESV_BLK=("${RESV_BLK[@]}") RESV_RNG=("${RESV_RNG[@]}")
    if [[ "$kind" == host-table ]]; then
        RESV_BLK=("${HOST_BLK[@]}") RESV_RNG=("${HOST_RNG[@]}")
        extra=(--mem "$RESV_MEM" --dmar "$HOST_DMAR" --host-device 00:02.0=blk0
            --host-device 00:14.0=rng --host-device 00:1a.0=rng --host-device 00:1d.0=rng)
    fi
    if ! start_serve "$dir" --disk "$img" --rng --iommu "$iommu" "${extra[@]}"; then
        fail "$name: $WHY (logs: $sd)"; KEEP_RUN=1; return
    fi
    qemu_cmd "$dir" "aperture.mib=$MIB aperture.pattern=$pat aperture.watchdog=$WATCHDOG aperture.fault_sector=$TAIL_SECTOR $append"
    printf '%q ' "${QCMD[@]}" >"$sd/qemu.cmd"
    log "$name: booting (serve --iommu $iommu${extra[*]:+ ${extra[*]}}; append: ${append:-none})"
    timeout -k 10 "$BOOT_TIMEOUT" "${QCMD[@]}" </dev/null >"$sd/console.raw" 2>"$dir.qemu.err"
    qrc=$?
    local boot_secs
    boot_secs=$(since "$t0")
    wait_serve "$dir"
    parse_console "$sd/console.raw"
    check_run "$dir" "$qrc"

    [[ "$kind" == off ]] && viommu=off
    check_pci "$viommu"
    case "$kind" in
        strict) check_groups DMA ;;
        lazy | reserved | host-table) check_groups DMA-FQ ;;
    esac
    [[ "$kind" == reserved || "$kind" == host-table ]] && check_reserved "$dir"
    if has done; then
        check_io "$img" "$MIB" "$pat"
        if [[ "$kind" == fault ]]; then
            if [[ "$(m fault-read)" != fail* ]]; then
                bad "fault-read: got '$(m fault-read)', want 'fail ...' (the read aimed astray succeeded?)"
            elif [[ "$(m fault-read)" != *'Input/output error'* ]]; then
                bad "fault-read failed, but not with EIO: '$(m fault-read)'"
            fi
            # Linux's viommu_fault_handler(): "%s fault from EP %u at %#llx [%s%s%s]"; a
            # read from the disk is the device WRITING guest memory.
            fault_line=$(grep -E "^APERTURE-DMESG .*virtio_iommu virtio[0-9]+: (domain|page|unknown) fault from EP $BLK_EP at 0x[0-9a-f]+ \[R?WX?\]" "$CONSOLE" | head -n 1)
            [[ -n "$fault_line" ]] || bad "no 'fault from EP $BLK_EP at 0x... [W]' line in the guest's dmesg: $(grep -E 'APERTURE-DMESG .*(fault from|I/O error)' "$CONSOLE" | head -n 2 | tr '\n' ' ')"
            [[ "$(m dmesg-faults)" =~ ^[1-9][0-9]*$ ]] || bad "dmesg-faults: got '$(m dmesg-faults)', want >= 1"
        else
            expect "fault-read (plain one-sector read of sector $TAIL_SECTOR)" "$(m fault-read)" "ok $TAIL_MD5"
            expect "dmesg-faults" "$(m dmesg-faults)" 0
        fi
    fi

    info="${boot_secs}s; blk $(m blk-seconds)s for ${MIB} MiB read+write+readback; serve exit ${SERVE_SECS}s after QEMU"
    case "$kind" in
        strict | lazy | bypass) info+="; $(groups_summary)" ;;
        fault) info+="; ${fault_line#APERTURE-DMESG }" ;;
        reserved | host-table) info+="; ${RESV_INFO:-}" ;;
    esac
    if ((${#REASONS[@]} == 0)); then
        pass "$name ($info)"
        [[ -n "${E2E_KEEP:-}" ]] || rm -rf "$sd"
    else
        KEEP_RUN=1
        fail "$name: $(reasons_text)(console: $CONSOLE)"
    fi
}

# Kill QEMU with SIGKILL during block I/O; serve must notice and exit by itself.
killed_scenario() {
    local name=qemu-killed sd="$RUN/qemu-killed" dir="$RUN/qemu-killed/vm" img="$RUN/qemu-killed/disk.img"
    local t0 qpid i phase socks
    t0=$(now)
    REASONS=()
    mkdir -p "$sd"
    CONSOLE="$sd/console.log" MARKERS="$sd/markers.txt"
    # Zeros will do: nothing is checked on the data.
    truncate -s $(((2 * KILL_MIB + 1) << 20)) "$img" || { fail "$name: cannot create $img"; KEEP_RUN=1; return; }
    if ! start_serve "$dir" --disk "$img" --rng --iommu on; then
        fail "$name: $WHY (logs: $sd)"; KEEP_RUN=1; return
    fi
    qemu_cmd "$dir" "aperture.mib=$KILL_MIB aperture.watchdog=$WATCHDOG"
    printf '%q ' "${QCMD[@]}" >"$sd/qemu.cmd"
    log "$name: booting with aperture.mib=$KILL_MIB; SIGKILL to QEMU ${KILL_AFTER}s into the block I/O"
    # No `timeout` wrapper: QEMU itself must get the SIGKILL (the wrapper execs it).
    "${QCMD[@]}" </dev/null >"$sd/console.raw" 2>"$dir.qemu.err" &
    qpid=$!
    PIDS+=("$qpid")
    # Wait for "start", then for the block phase (blk-size is printed just before the
    # first read), then a little more.
    phase=start
    for ((i = 0; i < BOOT_TIMEOUT * 10; i++)); do
        kill -0 "$qpid" 2>/dev/null || break
        if [[ "$phase" == start ]] && grep -q 'APERTURE-E2E start' "$sd/console.raw"; then phase=blk; fi
        if [[ "$phase" == blk ]] && grep -q 'APERTURE-E2E blk-size' "$sd/console.raw"; then phase=io; break; fi
        sleep 0.1
    done
    if [[ "$phase" == io ]]; then
        sleep "$KILL_AFTER"
    fi
    if ! kill -0 "$qpid" 2>/dev/null; then
        wait "$qpid"
        bad "QEMU ended by itself (status $?) before it was killed (phase: $phase)"
        forget_pid "$qpid"
    else
        [[ "$phase" == io ]] || bad "the guest never started block I/O within ${BOOT_TIMEOUT}s (phase: $phase); killed anyway"
        grep -q 'APERTURE-E2E done' "$sd/console.raw" && bad "the guest finished before the kill: raise E2E_KILL_MIB"
        kill -KILL "$qpid"
        wait "$qpid" 2>/dev/null
        forget_pid "$qpid"
    fi
    wait_serve "$dir"
    parse_console "$sd/console.raw"
    if [[ "$SERVE_RC" == hung ]]; then
        bad "aperture serve still running ${SERVE_EXIT_LIMIT}s after QEMU was killed (killed it)"
    elif [[ "$SERVE_RC" != 0 && "$SERVE_RC" != 1 ]]; then
        # 0: every function saw a clean disconnect; 1: a function reported the broken
        # connection as an error. Anything else (panic 101, a signal) is a bug.
        bad "aperture serve exited with status $SERVE_RC: $(tail -n 3 "$dir.serve.log" | tr '\n' ' ')"
    fi
    socks=$(find "$dir" -maxdepth 1 -type s -printf '%f ' 2>/dev/null)
    [[ -z "$socks" ]] || bad "sockets left in DIR after serve exited: $socks"
    local state="before the first read finished"
    has blk-read-md5 && state="after the read, during the write"
    has blk-write-md5 && state="during the readback"
    if ((${#REASONS[@]} == 0)); then
        pass "$name (killed $state; serve exited by itself with status $SERVE_RC ${SERVE_SECS}s after SIGKILL, sockets removed; $(since "$t0")s)"
        [[ -n "${E2E_KEEP:-}" ]] || rm -rf "$sd"
    else
        KEEP_RUN=1
        fail "$name: $(reasons_text)(console: $CONSOLE, serve log: $dir.serve.log)"
    fi
}

log "scenarios: ${SELECTED[*]} (aperture.mib=$MIB; QEMU ${APERTURE_QEMU_VERSION:-?}; work dir $RUN)"
for s in "${SELECTED[@]}"; do
    case "$s" in
        iommu-on-strict) io_scenario "$s" on "iommu.strict=1" strict ;;
        iommu-on-lazy) io_scenario "$s" on "" lazy ;;
        iommu-bypass) io_scenario "$s" bypass "" bypass ;;
        iommu-off) io_scenario "$s" off "" off ;;
        fault) io_scenario "$s" on "" fault ;;
        reserved) io_scenario "$s" on "" reserved ;;
        host-table) io_scenario "$s" on "" host-table ;;
        qemu-killed) killed_scenario ;;
    esac
done
log "total $(since "$T_ALL")s"
summary
((FAILED == 0))
