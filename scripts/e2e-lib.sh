# What the end-to-end suites (scripts/e2e*.sh) share: choosing scenarios, PASS/FAIL
# lines and the summary, the work directory and the processes to reap, provisioning,
# the aperture binary and the initramfs, checksums, timing and the list of reasons a
# scenario failed. Source it after common.sh; set ALL (the scenario names) first.
# shellcheck shell=bash

# --- which scenarios: E2E_ONLY=a,b or all of ALL; sets SELECTED -----------------------------
e2e_select() {
    SELECTED=()
    if [[ -n "${E2E_ONLY:-}" ]]; then
        local want w
        IFS=',' read -r -a want <<<"$E2E_ONLY"
        for w in "${want[@]}"; do
            [[ -n "$w" ]] || continue
            [[ " ${ALL[*]} " == *" $w "* ]] || die "E2E_ONLY: unknown scenario '$w' (known: ${ALL[*]})"
            SELECTED+=("$w")
        done
        ((${#SELECTED[@]})) || die "E2E_ONLY='$E2E_ONLY' names no scenario (known: ${ALL[*]})"
    else
        SELECTED=("${ALL[@]}")
    fi
}

# --- results ----------------------------------------------------------------------------------
PASSED=0 FAILED=0
pass() { PASSED=$((PASSED + 1)); printf 'PASS %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$*"; }
summary() { printf '%d passed, %d failed\n' "$PASSED" "$FAILED"; }
# Setup failed: every selected scenario fails with the reason, then the summary.
abort_all() {
    local s
    for s in "${SELECTED[@]}"; do fail "$s: not run: $*"; done
    summary
    exit 1
}

# Reasons the current scenario failed: bad adds one, expect WHAT GOT WANT compares.
REASONS=()
bad() { REASONS+=("$*"); }
expect() { [[ "$2" == "$3" ]] || bad "$1: got '${2:-<none>}', want '$3'"; }
# The first four reasons, "; "-separated, with a trailing "; ".
reasons_text() {
    printf '%s; ' "${REASONS[@]:0:4}"
    if ((${#REASONS[@]} > 4)); then printf '(+%d more) ' $((${#REASONS[@]} - 4)); fi
}

# --- work directory and the processes to reap ---------------------------------------------------
# e2e_workdir TAG: RUN (short enough for unix sockets), PIDS, KEEP_RUN, the exit trap.
e2e_workdir() {
    RUN=$(mktemp -d "${TMPDIR:-/tmp}/aperture-$1.XXXXXX") || die "cannot create a work directory"
    # vfio-user and vhost-user socket paths must fit sun_path (108 bytes).
    (( ${#RUN} + 40 < 108 )) || die "work directory path too long for unix sockets: $RUN (set TMPDIR shorter)"
    PIDS=()
    KEEP_RUN=0
    trap e2e_cleanup EXIT
    trap 'exit 130' INT TERM
}
e2e_cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    if ((KEEP_RUN)) || [[ -n "${E2E_KEEP:-}" ]]; then
        log "work directory kept: $RUN"
    else
        rm -rf "$RUN"
    fi
}
forget_pid() { local p keep=(); for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done; PIDS=("${keep[@]}"); }

# --- provisioning, binary, initramfs ----------------------------------------------------------
# e2e_provision: runs scripts/provision.sh (cached); sets QEMU, KERNEL, KREL. A failure
# fails every scenario, naming what could not be provisioned.
e2e_provision() {
    local why envf
    log "provisioning: scripts/provision.sh (log: $RUN/provision.log)"
    if ! "$APERTURE_SCRIPTS_DIR/provision.sh" >"$RUN/provision.log" 2>&1; then
        KEEP_RUN=1
        why=$(grep -E 'ERROR|could not|must run as root' "$RUN/provision.log" | grep -v 'provisioning FAILED' | head -n 3 | tr '\n' ' ')
        why=$(printf "%s" "$why" | sed "s/  *$//")
        sed 's/^/  provision: /' "$RUN/provision.log" | tail -n 15 >&2
        abort_all "provisioning failed: ${why:-see $RUN/provision.log} (log: $RUN/provision.log)"
    fi
    envf="$APERTURE_CACHE/env"
    [[ -r "$envf" ]] || abort_all "provisioning left no $envf"
    # shellcheck disable=SC1090
    . "$envf"
    QEMU="${APERTURE_QEMU:-}" KERNEL="${APERTURE_KERNEL_PVH:-}" KREL="${APERTURE_KERNEL_RELEASE:-}"
    [[ -x "$QEMU" ]] || abort_all "provisioning did not produce a QEMU wrapper (APERTURE_QEMU=$QEMU)"
    [[ -s "$KERNEL" ]] || abort_all "provisioning did not produce the PVH guest kernel (APERTURE_KERNEL_PVH=$KERNEL)"
    log "provisioned: QEMU ${APERTURE_QEMU_VERSION:-?} (${APERTURE_QEMU_DEB:-?}), guest kernel $KREL (${APERTURE_KERNEL_DEB:-?})"
}

# e2e_binary: APERTURE_BIN, or `cargo build -p aperture`; sets BIN.
e2e_binary() {
    local root
    root="$(cd "$APERTURE_SCRIPTS_DIR/.." && pwd)"
    if [[ -n "${APERTURE_BIN:-}" ]]; then
        BIN="$APERTURE_BIN"
        log "binary: $BIN (APERTURE_BIN)"
    else
        log "binary: cargo build -p aperture"
        if ! (cd "$root" && cargo build -p aperture) >"$RUN/build.log" 2>&1; then
            KEEP_RUN=1
            tail -n 20 "$RUN/build.log" >&2
            abort_all "cargo build -p aperture failed (log: $RUN/build.log)"
        fi
        BIN="${CARGO_TARGET_DIR:-$root/target}/debug/aperture"
    fi
    [[ -x "$BIN" ]] || abort_all "no executable aperture binary at $BIN"
}

# e2e_initramfs INIT: the guest's initramfs with INIT as /init; sets INITRD.
e2e_initramfs() {
    INITRD="$RUN/initramfs.cpio.gz"
    if ! "$APERTURE_SCRIPTS_DIR/mkinitramfs.sh" "$INITRD" --init "$1" >"$RUN/initramfs.log" 2>&1; then
        KEEP_RUN=1
        cat "$RUN/initramfs.log" >&2
        abort_all "scripts/mkinitramfs.sh failed (log: $RUN/initramfs.log)"
    fi
}

# --- data and time ------------------------------------------------------------------------------
md5_of() { md5sum | cut -d' ' -f1; }
# N bytes of `yes WORD` (status of head: yes itself always dies of SIGPIPE).
yes_bytes() { yes "$1" | head -c "$2"; return "${PIPESTATUS[1]}"; }
# md5 of COUNT MiB of FILE from MiB SKIP.
md5_range() { dd if="$1" bs=1M skip="$2" count="$3" status=none | md5_of; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- what a back-end process holds of guest memory --------------------------------------------
# memfd_maps PID: "INODE BYTES" for each memfd mapping of PID (BYTES: its length).
memfd_maps() {
    local range ino path
    while read -r range _ _ _ ino path; do
        [[ "$path" == /memfd:* ]] || continue
        echo "$ino $(($((16#${range#*-})) - $((16#${range%-*}))))"
    done <"/proc/$1/maps"
}
# mapped_memfds PID [MIN_BYTES]: inodes of the memfds PID maps in pieces of at least
# MIN_BYTES (default 0).
mapped_memfds() {
    memfd_maps "$1" | awk -v m="${2:-0}" '$2 >= m { print $1 }'
}
# open_memfds PID: inodes of the memfds PID holds open.
open_memfds() {
    local f
    for f in /proc/"$1"/fd/*; do
        [[ "$(readlink "$f" 2>/dev/null)" == /memfd:* ]] && stat -L -c %i "$f" 2>/dev/null
    done
}
# memfd_held PID: inodes of the memfds PID maps or holds open.
memfd_held() {
    mapped_memfds "$1"
    open_memfds "$1"
}
# secret_regions PID WORD: how many of PID's readable mappings hold WORD (read through
# /proc/PID/mem, which needs root or ptrace rights over PID).
secret_regions() {
    local pid="$1" word="$2" range perms rest a b n=0
    while read -r range perms rest; do
        [[ "$perms" == r* ]] || continue
        a=$((16#${range%-*})) b=$((16#${range#*-}))
        # grep -q stops reading at the first hit; dd's SIGPIPE must not count (pipefail).
        { dd if="/proc/$pid/mem" bs=1M iflag=skip_bytes,count_bytes skip="$a" count=$((b - a)) 2>/dev/null || true; } \
            | grep -q -a -F -- "$word" && n=$((n + 1))
    done <"/proc/$pid/maps"
    echo "$n"
}
# qemu_at_hold PARENT_PID: waits (up to BOOT_TIMEOUT) until the console CONSOLE_RAW
# shows the guest's "APERTURE-E2E hold", then sets QEMU_PID to QEMU's pid (the child of
# PARENT_PID, the `timeout` that runs it). Returns 1, the reason recorded with `bad`, if
# the guest ended first or QEMU cannot be found.
qemu_at_hold() {
    local parent="$1" i p
    QEMU_PID=""
    for ((i = 0; i < BOOT_TIMEOUT * 5; i++)); do
        grep -q 'APERTURE-E2E hold' "$CONSOLE_RAW" 2>/dev/null && break
        kill -0 "$parent" 2>/dev/null || { bad "the guest ended before its hold"; return 1; }
        sleep 0.2
    done
    for p in /proc/[0-9]*; do
        if [[ "$(awk '$1 == "PPid:" { print $2 }' "$p/status" 2>/dev/null)" == "$parent" ]]; then
            QEMU_PID=${p#/proc/}
            return 0
        fi
    done
    bad "cannot find QEMU's pid (child of $parent)"
    return 1
}
