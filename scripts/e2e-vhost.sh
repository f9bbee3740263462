#!/usr/bin/env bash
# End-to-end tests of our out-of-process vhost-user back-ends (`aperture backend blk|rng`)
# with QEMU as the front-end and an unmodified Linux guest (TCG).
#
# 1. Runs scripts/provision.sh (cached; needs root the first time). If that fails,
#    every scenario FAILS, naming what could not be provisioned.
# 2. Builds the binary (`cargo build -p aperture`) unless APERTURE_BIN is set, and the
#    initramfs (scripts/mkinitramfs.sh --init scripts/e2e-vhost-init.sh).
# 3. Runs the scenarios. Guest RAM is a shared memfd (-object memory-backend-memfd,
#    share=on; -machine memory-backend=), which vhost-user needs. Each scenario gets a
#    fresh disk image: [0, N MiB) host random data, [N, 2N MiB) zeros. The guest reads
#    [0, N) with O_DIRECT, writes `yes PATTERN` to [N, 2N), re-reads it; the md5s it
#    prints are checked against the host's, and the image on the host is checked too.
#    Each back-end runs with --once --stats FILE and must exit 0 after QEMU does; its
#    JSON exposure figures are checked:
#      iommu-strict  -device virtio-iommu-pci, vhost-user-blk-pci and vhost-user-rng-pci
#                    with iommu_platform=on, iommu.strict=1: mode iotlb, misses and
#                    invalidates seen, no failed miss, peak exposure of each back-end
#                    below E2E_MAX_SHARE of guest RAM; the guest's groups are DMA
#      iommu-lazy    the same with Linux's default lazy invalidation (groups DMA-FQ)
#      no-iommu      plain vhost-user-blk and -rng: mode plain, exposure 100% (the
#                    comparison point), and --require-iommu refuses such a front-end
# Prints "PASS name (...)" or "FAIL name: reason (logs: DIR)" per scenario, then one
# line "N passed, M failed". Exit status 0 only if M == 0.
#
# Environment:
#   E2E_ONLY=a,b          run only these scenarios
#   APERTURE_BIN=PATH     use this aperture binary instead of building one
#   E2E_MIB=N             MiB the guest reads and writes (default 16)
#   E2E_MAX_SHARE=F       largest accepted peak exposure share under the IOMMU (default 0.05)
#   E2E_BOOT_TIMEOUT=S    QEMU's time limit per boot (default 120)
#   E2E_KEEP=1            keep the work directory of passed scenarios too
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"

SCRIPTS="$APERTURE_SCRIPTS_DIR"
ALL=(iommu-strict iommu-lazy no-iommu)
MIB="${E2E_MIB:-16}"
MAX_SHARE="${E2E_MAX_SHARE:-0.05}"
BOOT_TIMEOUT="${E2E_BOOT_TIMEOUT:-120}"
RAM_MIB=512
for v in MIB BOOT_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "E2E_$v must be a positive integer, not '${!v}'"
done
[[ "$MAX_SHARE" =~ ^(0|1)?\.[0-9]+$ ]] || die "E2E_MAX_SHARE must be a fraction like 0.05, not '$MAX_SHARE'"

e2e_select
e2e_workdir vh

e2e_provision
e2e_binary
e2e_initramfs "$SCRIPTS/e2e-vhost-init.sh"

# --- helpers -------------------------------------------------------------------------------------
m() { awk -v k="$1" '$2 == k { sub(/^VHOST-E2E [^ ]+ ?/, ""); print; exit }' "$MARKERS"; }
has() { awk -v k="$1" '$2 == k { f = 1 } END { exit !f }' "$MARKERS"; }
# j FILE KEY: a top-level number or string of a back-end's stats JSON.
j() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2" 2>/dev/null; }

# start_backend NAME ARGS...: `aperture backend ARGS --stats DIR/NAME.json --once` in the
# background; waits for its socket. Sets BPID_<NAME>.
start_backend() {
    local name="$1" sock="$2" i pid
    shift 2
    "$BIN" backend "$@" --socket "$sock" --stats "$DIR/$name.json" --once >"$DIR/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    printf -v "BPID_$name" '%s' "$pid"
    for ((i = 0; i < 100; i++)); do
        [[ -S "$sock" ]] && return 0
        kill -0 "$pid" 2>/dev/null || { WHY="backend $name exited early: $(tail -n 2 "$DIR/$name.log" | tr '\n' ' ')"; return 1; }
        sleep 0.05
    done
    WHY="backend $name did not create $sock within 5 s"
    return 1
}
# wait_backend NAME: up to 10 s for it to exit after QEMU; BRC = its status or "hung".
wait_backend() {
    local var="BPID_$1" i pid
    pid="${!var}"
    for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; forget_pid "$pid"; BRC=hung; return
    fi
    wait "$pid"; BRC=$?; forget_pid "$pid"
}
check_backend_exit() {   # check_backend_exit NAME
    wait_backend "$1"
    if [[ "$BRC" == hung ]]; then bad "backend $1 still running 10 s after QEMU exited"
    elif [[ "$BRC" != 0 ]]; then bad "backend $1 exited with status $BRC: $(tail -n 2 "$DIR/$1.log" | tr '\n' ' ')"
    fi
    [[ -s "$DIR/$1.json" ]] || bad "backend $1 wrote no stats"
}
# Exposure checks of a back-end behind the IOMMU.
check_iotlb_stats() {   # check_iotlb_stats NAME
    local f="$DIR/$1.json" share
    [[ -s "$f" ]] || return
    expect "$1 mode" "$(j "$f" mode)" iotlb
    expect "$1 guest RAM" "$(j "$f" guest_ram_bytes)" $((RAM_MIB << 20))
    expect "$1 failed misses" "$(j "$f" miss_failures)" 0
    expect "$1 access failures" "$(j "$f" access_fails)" 0
    expect "$1 mapped at exit" "$(j "$f" mapped_bytes)" 0
    (( $(j "$f" misses) > 0 )) || bad "$1 raised no IOTLB miss"
    share=$(j "$f" peak_share)
    awk -v s="$share" -v m="$MAX_SHARE" 'BEGIN { exit !(s != "" && s > 0 && s <= m) }' \
        || bad "$1 peak exposure share ${share:-?} not in (0, $MAX_SHARE]"
}

QARGS_BASE=()
qemu_base() {   # qemu_base APPEND
    QARGS_BASE=("$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot
        -machine q35,memory-backend=mem -accel tcg -smp 1 -m "${RAM_MIB}M"
        -object "memory-backend-memfd,id=mem,size=${RAM_MIB}M,share=on"
        -kernel "$KERNEL" -initrd "$INITRD"
        -append "console=ttyS0 panic=-1 loglevel=4 aperture.mib=$MIB aperture.pattern=VH-$NAME $1")
}

run_qemu() {   # run_qemu ARGS...: QRC, console in $DIR/console.log, markers in $MARKERS
    local t0
    t0=$(now)
    timeout -s KILL "$BOOT_TIMEOUT" "$@" >"$DIR/console.raw" 2>"$DIR/qemu.err" </dev/null
    QRC=$?
    BOOT_SECS=$(since "$t0")
    tr -d '\r' <"$DIR/console.raw" >"$DIR/console.log"
    grep -ao 'VHOST-E2E .*' "$DIR/console.log" >"$MARKERS"
    if ((QRC == 137)); then bad "QEMU did not finish within ${BOOT_TIMEOUT}s"
    elif ((QRC != 0)); then bad "QEMU exited with status $QRC: $(tail -n 2 "$DIR/qemu.err" | tr '\n' ' ')"
    fi
}

check_guest() {   # check_guest IMG GROUP_TYPE RNG(yes|no)
    local img="$1" want_w
    expect "guest kernel" "$(m start)" "$KREL"
    has watchdog-expired && bad "guest watchdog expired (I/O hung?)"
    has done || bad "guest did not reach 'VHOST-E2E done'"
    [[ "$(m settle)" == ok* ]] || bad "devices did not bind: settle $(m settle)"
    [[ "$(m group)" == blk\ *\ "$2" ]] || bad "blk group: got '$(m group)', want type $2"
    has blk && bad "guest block phase: blk $(m blk)"
    expect "blk-read-md5" "$(m blk-read-md5)" "$HOST_MD5"
    want_w=$(yes_bytes "VH-$NAME" $((MIB << 20)) | md5_of)
    expect "blk-write-md5" "$(m blk-write-md5)" "$want_w"
    expect "blk-readback-md5" "$(m blk-readback-md5)" "$want_w"
    expect "image [N,2N) on the host" "$(md5_range "$img" "$MIB" "$MIB")" "$want_w"
    expect "image [0,N) on the host (unchanged)" "$(md5_range "$img" 0 "$MIB")" "$HOST_MD5"
    if [[ "$3" == yes ]]; then
        expect "rng" "$(m rng)" "ok 64"
        awk '$2 == "group" && $3 == "rng" { f = 1 } END { exit !f }' "$MARKERS" || bad "no virtio-rng in the guest"
    fi
}

make_image() {   # make_image IMG: sets HOST_MD5
    head -c $((MIB << 20)) /dev/urandom >"$1" && truncate -s $(((2 * MIB) << 20)) "$1" || return 1
    HOST_MD5=$(md5_range "$1" 0 "$MIB")
}

finish() {   # finish NAME EXTRA
    if ((${#REASONS[@]})); then
        KEEP_RUN=1
        fail "$1: $(reasons_text)(logs: $DIR)"
    else
        pass "$1 ($2)"
    fi
}

# --- scenarios -----------------------------------------------------------------------------------
scenario_iommu() {   # scenario_iommu strict|lazy
    local mode="$1" append='' gtype=DMA-FQ
    [[ "$mode" == strict ]] && { append='iommu.strict=1'; gtype=DMA; }
    make_image "$DIR/disk.img" || { bad "cannot write the disk image"; return; }
    start_backend blk "$DIR/blk.sock" blk --disk "$DIR/disk.img" --require-iommu || { bad "$WHY"; return; }
    start_backend rng "$DIR/rng.sock" rng --require-iommu || { bad "$WHY"; return; }
    qemu_base "$append"
    run_qemu "${QARGS_BASE[@]}" -device virtio-iommu-pci \
        -chardev socket,id=blk0,path="$DIR/blk.sock" \
        -device vhost-user-blk-pci,chardev=blk0,iommu_platform=on,disable-legacy=on,num-queues=1 \
        -chardev socket,id=rng0,path="$DIR/rng.sock" \
        -device vhost-user-rng-pci,chardev=rng0,iommu_platform=on
    check_backend_exit blk
    check_backend_exit rng
    check_guest "$DIR/disk.img" "$gtype" yes
    check_iotlb_stats blk
    check_iotlb_stats rng
    (( $(j "$DIR/blk.json" invalidates) > 0 )) || bad "blk saw no IOTLB invalidate"
    INFO="boot ${BOOT_SECS}s, blk peak $(( $(j "$DIR/blk.json" peak_mapped_bytes) >> 10 )) KiB / ${RAM_MIB} MiB, \
$(j "$DIR/blk.json" misses) misses, $(j "$DIR/blk.json" invalidates) invalidates; rng peak $(( $(j "$DIR/rng.json" peak_mapped_bytes) >> 10 )) KiB"
}

scenario_no_iommu() {
    make_image "$DIR/disk.img" || { bad "cannot write the disk image"; return; }
    # A back-end that requires the IOMMU refuses a plain front-end: QEMU fails to start it.
    start_backend strict "$DIR/strict.sock" rng --require-iommu || { bad "$WHY"; return; }
    qemu_base ""
    "${QARGS_BASE[@]}" -chardev socket,id=r,path="$DIR/strict.sock" \
        -device vhost-user-rng-pci,chardev=r >"$DIR/strict-qemu.log" 2>&1 </dev/null &
    local qp=$!
    PIDS+=("$qp")
    local i
    for ((i = 0; i < 600; i++)); do grep -q 'requires VIRTIO_F_IOMMU_PLATFORM' "$DIR/strict.log" && break; sleep 0.1; done
    grep -q 'requires VIRTIO_F_IOMMU_PLATFORM' "$DIR/strict.log" \
        || bad "--require-iommu back-end did not refuse SET_FEATURES without IOMMU_PLATFORM"
    kill -KILL "$qp" 2>/dev/null; wait "$qp" 2>/dev/null; forget_pid "$qp"
    wait_backend strict
    [[ "$(j "$DIR/strict.json" mapped_bytes)" == 0 && "$(j "$DIR/strict.json" peak_mapped_bytes)" == 0 ]] \
        || bad "the refusing back-end mapped guest memory: $(j "$DIR/strict.json" peak_mapped_bytes) bytes"

    start_backend blk "$DIR/blk.sock" blk --disk "$DIR/disk.img" || { bad "$WHY"; return; }
    start_backend rng "$DIR/rng.sock" rng || { bad "$WHY"; return; }
    qemu_base ""
    run_qemu "${QARGS_BASE[@]}" \
        -chardev socket,id=blk0,path="$DIR/blk.sock" \
        -device vhost-user-blk-pci,chardev=blk0,disable-legacy=on,num-queues=1 \
        -chardev socket,id=rng0,path="$DIR/rng.sock" \
        -device vhost-user-rng-pci,chardev=rng0
    check_backend_exit blk
    check_backend_exit rng
    check_guest "$DIR/disk.img" none yes
    local n
    for n in blk rng; do
        expect "$n mode" "$(j "$DIR/$n.json" mode)" plain
        expect "$n peak exposure (all RAM)" "$(j "$DIR/$n.json" peak_mapped_bytes)" $((RAM_MIB << 20))
        expect "$n misses" "$(j "$DIR/$n.json" misses)" 0
    done
    INFO="boot ${BOOT_SECS}s, exposure 100% of ${RAM_MIB} MiB as expected; --require-iommu refused the plain front-end"
}

for NAME in "${SELECTED[@]}"; do
    DIR="$RUN/$NAME"
    mkdir -p "$DIR"
    MARKERS="$DIR/markers"
    : >"$MARKERS"
    REASONS=() INFO=''
    log "scenario $NAME"
    case "$NAME" in
        iommu-strict) scenario_iommu strict ;;
        iommu-lazy) scenario_iommu lazy ;;
        no-iommu) scenario_no_iommu ;;
    esac
    finish "$NAME" "$INFO"
done
summary
((FAILED == 0))
