#!/usr/bin/env bash
# End-to-end tests of our device host as a vhost-user FRONT-END: an unmodified Linux guest
# (QEMU TCG) against `aperture serve`, with devices run by vhost-user back-ends in other
# processes.
#
#   third-party-rng   rust-vmm's vhost-device-rng (crate registry, pinned in versions.env,
#                     built by scripts/install-vhost-device-rng.sh) behind
#                     `serve --rng vhost-user=SOCK --iommu off`, next to our in-process
#                     virtio-blk: the guest reads 64 random bytes from /dev/hwrng through it.
#                     Also the control for the next scenario: while the guest holds
#                     (aperture.hold), the back-end maps guest RAM's memfd and a secret the
#                     guest wrote to memory no device touches is found in its memory.
#   inflight-copy     implicit grants: `serve --iommu off --inflight copy` with
#                     `aperture backend blk` as the disk and vhost-device-rng as the RNG,
#                     an unmodified guest with no IOMMU. Data and RNG as above; while the
#                     guest holds, neither back-end's /proc/PID/fd nor /proc/PID/maps
#                     names guest RAM's memfd (its inode, from QEMU's maps), the secret
#                     is absent from a scan of each back-end's memory, and serve reports
#                     the requests it posted through the shadows.
#   inflight-copy-iommu the same behind our virtio-iommu (--iommu on, the guest's default
#                     lazy mode): the shadow copies through the IOMMU's translation, the
#                     back-ends (vhost-device-rng has no IOMMU support) still get no IOTLB
#                     and no guest RAM; the disk's IOMMU group is DMA-FQ.
#   inflight-map      implicit grants, map form (--inflight map --inflight-map-kib 16) with
#                     `aperture backend blk` (which has IOMMU support) and our in-process
#                     RNG: data as above; it documents what the map form leaves
#                     reachable: the back-end holds guest RAM's descriptor (checked in
#                     /proc/PID/fd), maps none of it with nothing in flight (maps), and
#                     the secret is absent from its memory.
#   inflight-copy-qsd the same as inflight-copy with qemu-storage-daemon (QEMU's own tools, provisioned with
#                     QEMU) exporting the image as vhost-user-blk: an unmodified
#                     third-party blk back-end that holds no guest RAM.
#   ours-blk-strict   `aperture backend blk` behind `serve --disk vhost-user=SOCK --iommu on`,
#   ours-blk-lazy     guest iommu.strict=1 / Linux's default lazy mode: the guest reads host
#                     data and writes a pattern with checksums through the back-end, and the
#                     host image holds what the guest wrote.
#   ours-blk-whole    as ours-blk-strict with `backend --iotlb-map whole`: guest RAM mapped
#                     whole in the back-end, the guest's UNMAPs completed by its views
#                     (invalidations applied from the ring, none refused, no miss failed).
#   ours-blk-killed   `aperture backend blk` behind the virtio-iommu is SIGKILLed while the
#                     guest reads the disk (scripts/e2e-kill-init.sh): the guest's read must
#                     fail with EIO within KILL_BOUND seconds of the kill (the device host
#                     completes the requests the dead back-end took with VIRTIO_BLK_S_IOERR),
#                     a read after that must fail too, the guest reaches 'done' and
#                     `aperture serve` exits cleanly.
# The other scenarios boot with scripts/e2e-init.sh (see scripts/e2e.sh for its markers).
# Prints "PASS name (...)" or "FAIL name: reason" per scenario, then exactly one line
# "N passed, M failed". Exit status 0 only if M == 0.
#
# Environment: E2E_ONLY=a,b, APERTURE_BIN=PATH, E2E_MIB=N (default 8), E2E_BOOT_TIMEOUT=S
# (default 240), E2E_KEEP=1, APERTURE_CACHE, as for scripts/e2e.sh.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"

SCRIPTS="$APERTURE_SCRIPTS_DIR"
ALL=(third-party-rng inflight-copy inflight-copy-iommu inflight-copy-qsd inflight-map ours-blk-strict ours-blk-lazy ours-blk-whole ours-blk-killed)
# Seconds the guest holds after its workload while the back-ends are inspected.
HOLD=20
# Most seconds from the back-end's SIGKILL to the guest's failed read (TCG is slow; the
# front-end notices the death at once and its deadline is 1 s).
KILL_BOUND=20
MIB="${E2E_MIB:-8}"
BOOT_TIMEOUT="${E2E_BOOT_TIMEOUT:-240}"
WATCHDOG=$((BOOT_TIMEOUT * 2 / 3))
for v in MIB BOOT_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "E2E_$v must be a positive integer, not '${!v}'"
done

e2e_select
e2e_workdir e2ef
T_ALL=$(now)

e2e_provision
e2e_binary
e2e_initramfs "$SCRIPTS/e2e-init.sh"

# --- helpers ------------------------------------------------------------------------------------
# make_image IMG NAME: [0,N) pseudo-random host data, [N,2N) zeros, 1 MiB tail; HOST_MD5.
make_image() {
    local key
    key=$(printf 'aperture-e2ef %s' "$2" | md5_of)
    yes_bytes "HOSTDATA $2 $key" $((MIB << 20)) >"$1" || return 1
    truncate -s $(((2 * MIB + 1) << 20)) "$1" || return 1
    HOST_MD5=$(md5_range "$1" 0 "$MIB")
}
# wait_for PID FILE TEXT: until FILE holds TEXT (10 s); 1 if PID died first.
wait_for() {
    local i
    for ((i = 0; i < 200; i++)); do
        grep -q "$3" "$2" 2>/dev/null && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
wait_exit() {   # wait_exit PID SECONDS: sets EXIT_RC to its status, or "hung" (then killed)
    local i
    for ((i = 0; i < $2 * 20; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$1" 2>/dev/null; then
        kill -KILL "$1" 2>/dev/null; wait "$1" 2>/dev/null; forget_pid "$1"; EXIT_RC=hung; return
    fi
    wait "$1"; EXIT_RC=$?; forget_pid "$1"
}
m() { awk -v k="$1" '$2 == k { sub(/^APERTURE-E2E [^ ]+ ?/, ""); print; exit }' "$MARKERS"; }
has() { awk -v k="$1" '$2 == k { f = 1 } END { exit !f }' "$MARKERS"; }

# inspect QEMU_PARENT_PID NAME=PID...: waits for the guest's hold, then for each back-end
# sets MAPPED_<NAME> and OPEN_<NAME> (guest RAM memfd inodes it maps / holds open,
# space-separated), HELD_<NAME> (either) and SECRET_<NAME> (mappings holding the guest's
# secret). Guest RAM is every memfd QEMU maps in a piece of 64 MiB or more.
inspect() {
    local parent="$1" qpid ram nb name pid
    shift
    qemu_at_hold "$parent" || return
    qpid=$QEMU_PID
    ram=$(mapped_memfds "$qpid" $((64 << 20)) | sort -u)
    [[ -n "$ram" ]] || { bad "found no guest RAM memfd in QEMU's /proc/$qpid/maps"; return; }
    for nb in "$@"; do
        name="${nb%%=*}" pid="${nb#*=}"
        printf -v "MAPPED_$name" '%s' "$(comm -12 <(echo "$ram") <(mapped_memfds "$pid" | sort -u) | tr '\n' ' ')"
        printf -v "OPEN_$name" '%s' "$(comm -12 <(echo "$ram") <(open_memfds "$pid" | sort -u) | tr '\n' ' ')"
        printf -v "HELD_$name" '%s' "$(comm -12 <(echo "$ram") <(memfd_held "$pid" | sort -u) | tr '\n' ' ')"
        printf -v "SECRET_$name" '%s' "$(secret_regions "$pid" "$SECRET")"
    done
    kill -0 "$qpid" 2>/dev/null || bad "the inspection outlasted the guest's hold of $HOLD s"
}

# killed_scenario NAME: the back-end is SIGKILLed during the guest's reads.
killed_scenario() {
    local name="$1" sd="$RUN/$1" t0 backend_pid serve_pid qemu_pid qrc serve_rc sock i t_kill waited
    t0=$(now)
    REASONS=()
    mkdir -p "$sd"
    local dir="$sd/vm" img="$sd/disk.img" initrd="$RUN/initramfs-kill.cpio.gz"
    CONSOLE="$sd/console.log" MARKERS="$sd/markers.txt"
    if [[ ! -s "$initrd" ]] && ! "$SCRIPTS/mkinitramfs.sh" "$initrd" --init "$SCRIPTS/e2e-kill-init.sh" >"$sd/initramfs.log" 2>&1; then
        fail "$name: scripts/mkinitramfs.sh failed (log: $sd/initramfs.log)"; KEEP_RUN=1; return
    fi
    make_image "$img" "$name" || { fail "$name: cannot write $img"; KEEP_RUN=1; return; }
    sock="$sd/blk.sock"
    "$BIN" backend blk --socket "$sock" --disk "$img" --read-only >"$sd/backend.log" 2>&1 &
    backend_pid=$!
    PIDS+=("$backend_pid")
    for ((i = 0; i < 200; i++)); do [[ -S "$sock" ]] && break; kill -0 "$backend_pid" 2>/dev/null || break; sleep 0.05; done
    if [[ ! -S "$sock" ]]; then
        fail "$name: the back-end did not listen on $sock: $(tail -n 3 "$sd/backend.log" | tr '\n' ' ')"; KEEP_RUN=1; return
    fi
    "$BIN" serve --dir "$dir" --disk "vhost-user=$sock" --iommu on >"$sd/serve.log" 2>&1 &
    serve_pid=$!
    PIDS+=("$serve_pid")
    if ! wait_for "$serve_pid" "$sd/serve.log" 'QEMU arguments in'; then
        fail "$name: aperture serve did not come up: $(tail -n 3 "$sd/serve.log" | tr '\n' ' ')"; KEEP_RUN=1; return
    fi
    local extra=()
    mapfile -t extra <"$dir/qemu-args"
    log "$name: booting (serve --disk vhost-user=SOCK --iommu on; the back-end is killed during the guest's reads)"
    timeout -k 10 "$BOOT_TIMEOUT" "$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -machine q35 -accel tcg -smp 1 -kernel "$KERNEL" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 loglevel=4 aperture.kill_limit=60 aperture.watchdog=$WATCHDOG" \
        "${extra[@]}" </dev/null >"$sd/console.raw" 2>"$sd/qemu.err" &
    qemu_pid=$!
    PIDS+=("$qemu_pid")
    # The guest's reads have begun: give them a second to be in flight, then kill.
    for ((i = 0; i < BOOT_TIMEOUT * 10; i++)); do
        grep -q 'APERTURE-E2E kill-io-start' "$sd/console.raw" 2>/dev/null && break
        kill -0 "$qemu_pid" 2>/dev/null || break
        sleep 0.1
    done
    t_kill=""
    if grep -q 'APERTURE-E2E kill-io-start' "$sd/console.raw" 2>/dev/null; then
        sleep 1
        kill -KILL "$backend_pid" 2>/dev/null
        t_kill=$(now)
        for ((i = 0; i < (KILL_BOUND + 30) * 10; i++)); do
            grep -q 'APERTURE-E2E kill-io ' "$sd/console.raw" 2>/dev/null && break
            kill -0 "$qemu_pid" 2>/dev/null || break
            sleep 0.1
        done
        waited=$(since "$t_kill")
    fi
    wait "$qemu_pid"
    qrc=$?
    forget_pid "$qemu_pid"
    wait_exit "$serve_pid" 10
    serve_rc=$EXIT_RC
    { wait "$backend_pid"; } 2>/dev/null   # SIGKILLed: bash would report it
    forget_pid "$backend_pid"
    tr -d '\r' <"$sd/console.raw" >"$CONSOLE"
    grep -o 'APERTURE-E2E .*' "$CONSOLE" >"$MARKERS"

    ((qrc == 0)) || bad "QEMU exited with status $qrc: $(tail -n 2 "$sd/qemu.err" | tr '\n' ' ')"
    expect "serve exit status" "$serve_rc" 0
    expect "start" "$(m start)" "$KREL"
    [[ "$(m settle)" == ok* ]] || bad "/dev/vda did not appear: settle $(m settle)"
    [[ -n "$t_kill" ]] || bad "the guest never began its reads (no kill-io-start)"
    has done || bad "guest did not reach 'APERTURE-E2E done'"
    has watchdog-expired && bad "guest watchdog expired (I/O hung)"
    grep -q '^APERTURE-ERROR' "$CONSOLE" && bad "guest errors: $(grep '^APERTURE-ERROR' "$CONSOLE" | head -n 2 | tr '\n' ' ')"
    local io
    io=$(m kill-io)
    [[ "$io" == fail\ * && "$io" == *"Input/output error"* ]] || bad "kill-io: got '${io:-<none>}', want a read failing with EIO (Input/output error)"
    [[ -n "${waited:-}" ]] && awk -v w="$waited" -v b="$KILL_BOUND" 'BEGIN { exit !(w <= b) }' \
        || bad "the failed read took ${waited:-?} s after the kill (bound $KILL_BOUND s)"
    expect "kill-io-again (a read after the failure)" "$(m kill-io-again)" fail
    if ((${#REASONS[@]} == 0)); then
        pass "$name ($(since "$t0")s; the read failed ${waited}s after the kill (kill-io $io); guest I/O errors logged: $(m dmesg-io-errors))"
        [[ -n "${E2E_KEEP:-}" ]] || rm -rf "$sd"
    else
        KEEP_RUN=1
        fail "$name: $(reasons_text)(logs: $sd)"
    fi
}

# scenario NAME: one boot.
scenario() {
    local name="$1" sd="$RUN/$1" t0 backend_pid serve_pid qrc iommu append sock disk_arg rng_arg pat want_w
    local extra=() serve_extra=() socks=() inspected=() rng_pid="" qemu_parent
    SECRET="" HELD_blk="" HELD_rng="" SECRET_blk="" SECRET_rng="" MAPPED_blk="" OPEN_blk=""
    t0=$(now)
    REASONS=()
    mkdir -p "$sd"
    local dir="$sd/vm" img="$sd/disk.img"
    CONSOLE="$sd/console.log" MARKERS="$sd/markers.txt"
    make_image "$img" "$name" || { fail "$name: cannot write $img"; KEEP_RUN=1; return; }
    pat="W-$name"
    if [[ "$name" == third-party-rng || "$name" == inflight-copy* ]]; then
        local vdr
        if ! vdr=$("$SCRIPTS/install-vhost-device-rng.sh" 2>"$sd/install.log"); then
            fail "$name: scripts/install-vhost-device-rng.sh failed (log: $sd/install.log)"; KEEP_RUN=1; return
        fi
        # With --socket-count 1 it listens on SOCKET-PATH with "0" appended.
        "$vdr" --socket-path "$sd/rng.sock" >"$sd/rng-backend.log" 2>&1 &
        rng_pid=$!
        PIDS+=("$rng_pid")
        socks+=("$sd/rng.sock0=$rng_pid")
        SECRET="SECRET-$(printf '%s %s' "$name" "$(date +%s%N)" | md5_of)"
    fi
    case "$name" in
        third-party-rng)
            backend_pid=$rng_pid
            iommu=off append=""
            disk_arg=("$img") rng_arg=("vhost-user=$sd/rng.sock0")
            inspected=("rng=$rng_pid")
            ;;
        inflight-copy | inflight-copy-iommu)
            "$BIN" backend blk --socket "$sd/blk.sock" --disk "$img" >"$sd/backend.log" 2>&1 &
            backend_pid=$!
            socks+=("$sd/blk.sock=$backend_pid")
            iommu=off append=""
            [[ "$name" == *-iommu ]] && iommu=on
            disk_arg=("vhost-user=$sd/blk.sock") rng_arg=("vhost-user=$sd/rng.sock0")
            serve_extra=(--inflight copy)
            inspected=("blk=$backend_pid" "rng=$rng_pid")
            ;;
        inflight-map)
            # The map form needs a back-end with IOTLB support: the RNG is ours, in process.
            "$BIN" backend blk --socket "$sd/blk.sock" --disk "$img" >"$sd/backend.log" 2>&1 &
            backend_pid=$!
            socks+=("$sd/blk.sock=$backend_pid")
            iommu=off append=""
            disk_arg=("vhost-user=$sd/blk.sock") rng_arg=()
            serve_extra=(--inflight map --inflight-map-kib 16)
            inspected=("blk=$backend_pid")
            SECRET="SECRET-$(printf '%s %s' "$name" "$(date +%s%N)" | md5_of)"
            ;;
        inflight-copy-qsd)
            local qsd="${APERTURE_QSD:-}"
            if [[ ! -x "$qsd" ]]; then
                fail "$name: provisioning left no qemu-storage-daemon (APERTURE_QSD='$qsd')"; KEEP_RUN=1; return
            fi
            "$qsd" --blockdev "driver=file,node-name=file0,filename=$img" \
                --blockdev driver=raw,node-name=disk0,file=file0 \
                --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sd/blk.sock,writable=on" \
                >"$sd/backend.log" 2>&1 &
            backend_pid=$!
            socks+=("$sd/blk.sock=$backend_pid")
            iommu=off append=""
            disk_arg=("vhost-user=$sd/blk.sock") rng_arg=("vhost-user=$sd/rng.sock0")
            serve_extra=(--inflight copy)
            inspected=("blk=$backend_pid" "rng=$rng_pid")
            ;;
        ours-blk-*)
            local map=windows
            [[ "$name" == *whole ]] && map=whole
            "$BIN" backend blk --socket "$sd/blk.sock" --disk "$img" --iotlb-map "$map" >"$sd/backend.log" 2>&1 &
            backend_pid=$!
            socks+=("$sd/blk.sock=$backend_pid")
            iommu=on
            append=""
            [[ "$name" == *lazy ]] || append="iommu.strict=1"
            disk_arg=("vhost-user=$sd/blk.sock") rng_arg=()
            ;;
    esac
    PIDS+=("$backend_pid")
    [[ -n "$SECRET" ]] && append="$append aperture.secret=$SECRET aperture.hold=$HOLD"
    local i sp
    for sp in "${socks[@]}"; do
        sock="${sp%=*}"
        for ((i = 0; i < 200; i++)); do [[ -S "$sock" ]] && break; kill -0 "${sp##*=}" 2>/dev/null || break; sleep 0.05; done
        if [[ ! -S "$sock" ]]; then
            fail "$name: the back-end did not listen on $sock: $(tail -n 3 "$sd"/*backend.log | tr '\n' ' ')"; KEEP_RUN=1; return
        fi
    done
    "$BIN" serve --dir "$dir" --disk "${disk_arg[0]}" --rng "${rng_arg[@]}" --iommu "$iommu" "${serve_extra[@]}" >"$sd/serve.log" 2>&1 &
    serve_pid=$!
    PIDS+=("$serve_pid")
    if ! wait_for "$serve_pid" "$sd/serve.log" 'QEMU arguments in'; then
        fail "$name: aperture serve did not come up: $(tail -n 3 "$sd/serve.log" | tr '\n' ' ')"; KEEP_RUN=1; return
    fi
    mapfile -t extra <"$dir/qemu-args"
    log "$name: booting (serve --disk ${disk_arg[0]} --rng ${rng_arg[*]} --iommu $iommu ${serve_extra[*]}; append: ${append:-none})"
    CONSOLE_RAW="$sd/console.raw"
    timeout -k 10 "$BOOT_TIMEOUT" "$QEMU" -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -machine q35 -accel tcg -smp 1 -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 loglevel=4 aperture.mib=$MIB aperture.pattern=$pat aperture.watchdog=$WATCHDOG $append" \
        "${extra[@]}" </dev/null >"$CONSOLE_RAW" 2>"$sd/qemu.err" &
    qemu_parent=$!
    ((${#inspected[@]} == 0)) || inspect "$qemu_parent" "${inspected[@]}"
    wait "$qemu_parent"
    qrc=$?
    local serve_rc
    wait_exit "$serve_pid" 10
    serve_rc=$EXIT_RC
    kill -TERM "$backend_pid" 2>/dev/null
    wait_exit "$backend_pid" 5
    if [[ -n "$rng_pid" && "$rng_pid" != "$backend_pid" ]]; then
        kill -TERM "$rng_pid" 2>/dev/null
        wait_exit "$rng_pid" 5
    fi
    tr -d '\r' <"$sd/console.raw" >"$CONSOLE"
    grep -o 'APERTURE-E2E .*' "$CONSOLE" >"$MARKERS"

    ((qrc == 0)) || bad "QEMU exited with status $qrc: $(tail -n 2 "$sd/qemu.err" | tr '\n' ' ')"
    expect "serve exit status" "$serve_rc" 0
    expect "start" "$(m start)" "$KREL"
    has done || bad "guest did not reach 'APERTURE-E2E done'"
    has watchdog-expired && bad "guest watchdog expired (I/O hung?)"
    [[ "$(m settle)" == ok* ]] || bad "devices did not bind: settle $(m settle)"
    grep -q '^APERTURE-ERROR' "$CONSOLE" && bad "guest errors: $(grep '^APERTURE-ERROR' "$CONSOLE" | head -n 2 | tr '\n' ' ')"
    [[ "$(m rng)" == "ok 64" ]] || bad "rng: got '$(m rng)', want 'ok 64'"
    want_w=$(yes_bytes "$pat" $((MIB << 20)) | md5_of)
    expect "blk-read-md5 (host data)" "$(m blk-read-md5)" "$HOST_MD5"
    expect "blk-write-md5" "$(m blk-write-md5)" "$want_w"
    expect "blk-readback-md5" "$(m blk-readback-md5)" "$want_w"
    expect "host md5 of what the guest wrote" "$(md5_range "$img" "$MIB" "$MIB")" "$want_w"
    local info="" g
    case "$name" in
        third-party-rng)
            # The control: a back-end given guest RAM holds it, secret and all.
            [[ -n "$HELD_rng" ]] || bad "control: vhost-device-rng should map guest RAM's memfd without implicit grants, and does not (the inspection cannot see it)"
            [[ "$SECRET_rng" -gt 0 ]] 2>/dev/null || bad "control: the guest's secret should be in vhost-device-rng's memory without implicit grants, and the scan found it in ${SECRET_rng:-no} mappings"
            info="; control: vhost-device-rng maps guest RAM (inode ${HELD_rng% }), secret in $SECRET_rng of its mappings"
            ;;
        inflight-map)
            # What the map form leaves reachable: the back-end holds guest RAM's
            # descriptor (a hostile one could map it all); ours maps only the windows of
            # requests in flight, so at rest it maps none and holds no guest secret.
            [[ -n "$OPEN_blk" ]] || bad "the map form gives the back-end guest RAM's descriptor; /proc/PID/fd does not show it (the inspection cannot see it)"
            [[ -z "$MAPPED_blk" ]] || bad "blk back-end still maps guest RAM with no request in flight (inode $MAPPED_blk)"
            [[ "$SECRET_blk" == 0 ]] || bad "blk back-end: the guest's secret is in ${SECRET_blk:-?} of its mappings"
            local line
            line=$(grep -m1 "aperture serve: blk0: implicit grants (map):" "$sd/serve.log")
            [[ "$line" =~ \(map\):\ ([1-9][0-9]*)\ requests\ posted ]] || bad "serve did not report requests posted through blk0's shadow: '${line:-no line}'"
            info=$(grep -m1 'front-end disconnected' "$sd/backend.log" | sed 's/.*front-end disconnected: //')
            [[ "$info" == *"mode iotlb"* ]] || bad "the back-end did not run in IOTLB mode: '${info:-no summary line}'"
            info="; $(sed 's/.*(map): //; s/ (guest bytes.*confined to them)//; s/, [0-9]* waited.*//' <<<"$line"); back-end: $info; holds guest RAM's descriptor (inode ${OPEN_blk% }), maps none of it at rest, secret absent"
            ;;
        inflight-*)
            local b
            for b in blk rng; do
                local held="HELD_$b" sec="SECRET_$b"
                [[ -z "${!held}" ]] || bad "$b back-end maps or holds guest RAM's memfd (inode ${!held})"
                [[ "${!sec}" == 0 ]] || bad "$b back-end: the guest's secret is in ${!sec:-?} of its mappings"
            done
            local posted
            for b in blk0 rng; do
                posted=$(grep -m1 "aperture serve: $b: implicit grants (copy):" "$sd/serve.log" | sed 's/.*(copy): \([0-9]*\) requests posted.*/\1/')
                [[ "$posted" =~ ^[1-9][0-9]*$ ]] || bad "serve did not report requests posted through $b's shadow: '${posted:-no line}'"
                info="$info; $b: $(grep -m1 "aperture serve: $b: implicit grants" "$sd/serve.log" | sed 's/.*(copy): //; s/ (guest bytes.*RAM)//; s/, [0-9]* waited.*//')"
            done
            info="$info; no guest RAM in either back-end, secret absent"
            if [[ "$iommu" == on ]]; then
                g=$(awk '$2 == "iommu-group" && $3 == "0000:00:11.0" { print $4; exit }' "$MARKERS")
                expect "IOMMU group type of the blk" "$(awk -v g="$g" '$2 == "iommu-group-type" && $3 == g { print $4; exit }' "$MARKERS")" DMA-FQ
            fi
            ;;
    esac
    if [[ "$name" == ours-blk-* ]]; then
        # The guest's IOMMU mode, and the back-end's own account of the IOTLB traffic.
        g=$(awk '$2 == "iommu-group" && $3 == "0000:00:11.0" { print $4; exit }' "$MARKERS")
        local want_type=DMA-FQ
        [[ "$name" == *lazy ]] || want_type=DMA
        expect "IOMMU group type of the blk" "$(awk -v g="$g" '$2 == "iommu-group-type" && $3 == g { print $4; exit }' "$MARKERS")" "$want_type"
        info=$(grep -m1 'front-end disconnected' "$sd/backend.log" | sed 's/.*front-end disconnected: //')
        [[ "$info" == *"mode iotlb"* ]] || bad "the back-end did not run in IOTLB mode: '${info:-no summary line}'"
        # Our front-end pushes the guest's mappings through our back-end's push ring.
        [[ "$info" =~ \(([1-9][0-9]*)\ from\ the\ push\ ring,\ 0\ refused ]] \
            || bad "the back-end read no update from the push ring, or refused some: '${info:-no summary line}'"
        if [[ "$name" == *whole ]]; then
            # Guest RAM mapped whole: the UNMAPs complete by the back-end's views, so
            # their invalidations reach it through the ring, and no miss fails.
            [[ "$info" == *"mode iotlb, guest RAM mapped whole"* ]] || bad "the back-end did not map guest RAM whole: '${info:-no summary line}'"
            [[ "$info" =~ \(([1-9][0-9]*)\ from\ the\ ring, ]] || bad "no invalidation reached the back-end through the ring: '${info:-no summary line}'"
            [[ "$info" == *"(0 failed)"* ]] || bad "a miss failed: '${info:-no summary line}'"
        fi
        info="; back-end: $info"
    fi
    if ((${#REASONS[@]} == 0)); then
        pass "$name ($(since "$t0")s; blk $(m blk-seconds)s for $MIB MiB read+write+readback; rng $(m rng-current)$info)"
        [[ -n "${E2E_KEEP:-}" ]] || rm -rf "$sd"
    else
        KEEP_RUN=1
        fail "$name: $(reasons_text)(logs: $sd)"
    fi
}

log "scenarios: ${SELECTED[*]} (aperture.mib=$MIB; QEMU ${APERTURE_QEMU_VERSION:-?}; work dir $RUN)"
for s in "${SELECTED[@]}"; do
    if [[ "$s" == ours-blk-killed ]]; then killed_scenario "$s"; else scenario "$s"; fi
done
log "total $(since "$T_ALL")s"
summary
((FAILED == 0))
