# shellcheck shell=bash
# Shared helpers for scripts/*.sh. Sourced, not executed.

APERTURE_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$APERTURE_SCRIPTS_DIR/versions.env"

APERTURE_CACHE="${APERTURE_CACHE:-$HOME/.cache/aperture}"
export APERTURE_CACHE

_ap_prog="$(basename "$0")"
log()  { printf '[%s %s] %s\n' "$_ap_prog" "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$_ap_prog" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$_ap_prog" "$*" >&2; exit 1; }

# Elapsed seconds since the script started, for progress lines.
_ap_t0=$(date +%s.%N)
elapsed() { awk -v a="$_ap_t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }

# The Debian mirror, read from the machine's own apt sources (never hard-coded).
# Order: $APERTURE_APT_MIRROR, deb822 *.sources, one-line sources.list(.d/*.list).
# Security archives are skipped: they do not carry trixie or *-backports.
apt_mirror() {
    if [[ -n "${APERTURE_APT_MIRROR:-}" ]]; then
        printf '%s\n' "${APERTURE_APT_MIRROR%/}"; return 0
    fi
    local f uri
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        # Stanza-wise: pick URIs of enabled "deb" stanzas whose suites are not *-security.
        uri=$(awk '
            function flush() {
                if (uris != "" && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && suites !~ /-security/) {
                    split(uris, u, /[ \t]+/); for (i in u) if (u[i] ~ /^(https?|file):/ && u[i] !~ /security/) { print u[i]; found = 1; exit }
                }
                uris = ""; types = ""; suites = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "uris:"    { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            tolower($1) == "types:"   { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            tolower($1) == "suites:"  { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            tolower($1) == "enabled:" { sub(/^[^:]*:[ \t]*/, ""); enabled = tolower($0) }
            END { if (!found) flush() }
        ' "$f")
        if [[ -n "$uri" ]]; then shopt -u nullglob; printf '%s\n' "${uri%/}"; return 0; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        # deb [options] URI suite components...
        uri=$(awk '$1 == "deb" {
                  i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                  if ($i ~ /^(https?|file):/ && $i !~ /security/ && $(i+1) !~ /-security/) { print $i; exit }
              }' "$f")
        if [[ -n "$uri" ]]; then shopt -u nullglob; printf '%s\n' "${uri%/}"; return 0; fi
    done
    shopt -u nullglob
    return 1
}

export DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# List mount points at or below $1 (deepest first).
mounts_under() {
    local dir
    dir=$(realpath -m "$1")
    awk -v d="$dir" '{ m = $5; gsub(/\\040/, " ", m); if (m == d || index(m, d "/") == 1) print m }' /proc/self/mountinfo \
        | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}

# Unmount everything below $1, then delete it. Refuses (loudly) if a mount survives,
# so a bind mount can never make us delete host files.
safe_rm_tree() {
    local dir="$1" m
    [[ -e "$dir" ]] || return 0
    while IFS= read -r m; do
        [[ -n "$m" ]] || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under "$dir")
    if [[ -n "$(mounts_under "$dir")" ]]; then
        die "refusing to delete $dir: still has mounts: $(mounts_under "$dir" | tr '\n' ' ')"
    fi
    rm -rf --one-file-system "$dir"
}

# Serialise provisioning runs that share one cache directory.
take_cache_lock() {
    mkdir -p "$APERTURE_CACHE"
    exec {_ap_lock_fd}>"$APERTURE_CACHE/.lock"
    if ! flock -n "$_ap_lock_fd"; then
        log "waiting for another provisioning run holding $APERTURE_CACHE/.lock"
        flock "$_ap_lock_fd"
    fi
}

# "11.1.3" >= "10.1" ?
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }

# build_dirs WHAT: temporary build directories under $CACHE for a provisioning script.
# Sets the EXIT trap that removes every directory `new_tmp` made (after unmounting
# anything inside; with APERTURE_KEEP_FAILED a failed run keeps them) and says "WHAT
# FAILED" on a failure, and removes the leftovers of interrupted runs (build dirs are
# only ever renamed into place when complete).
build_dirs() {
    _ap_build_what="$1"
    TMPDIRS=()
    trap _ap_build_cleanup EXIT
    trap 'exit 130' INT TERM
    local stale
    shopt -s nullglob
    for stale in "$CACHE"/.build-* "$CACHE"/.old-*; do
        log "removing leftover of an interrupted run: $stale"
        safe_rm_tree "$stale"
    done
    shopt -u nullglob
}
_ap_build_cleanup() {
    local rc=$? d m
    for d in "${TMPDIRS[@]}"; do
        if ((rc != 0)) && [[ -n "${APERTURE_KEEP_FAILED:-}" ]]; then
            for m in $(mounts_under "$d"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
            printf '[%s] kept for debugging (APERTURE_KEEP_FAILED): %s\n' "$_ap_prog" "$d" >&2
            continue
        fi
        safe_rm_tree "$d" || rc=1
    done
    if ((rc != 0)); then
        printf '[%s] ERROR: %s FAILED (exit %d); logs in %s/logs\n' "$_ap_prog" "$_ap_build_what" "$rc" "$CACHE" >&2
    fi
    exit "$rc"
}
# new_tmp VAR PREFIX: VAR=fresh temp dir under the cache (same filesystem, so mv is a
# rename), removed on exit (build_dirs).
new_tmp() { local -n _v=$1; _v=$(mktemp -d "$CACHE/$2.XXXXXX"); TMPDIRS+=("$_v"); }

# provision_args ARGS...: the provisioning scripts' shared options. Sets REFRESH_QEMU and
# REFRESH_KERNEL (--refresh-qemu, --refresh-kernel, --refresh); -h prints the caller's
# `usage`; anything else is refused. Then checks the host: x86_64, root.
provision_args() {
    REFRESH_QEMU=0 REFRESH_KERNEL=0
    while (($#)); do
        case "$1" in
            --refresh-qemu) REFRESH_QEMU=1 ;;
            --refresh-kernel) REFRESH_KERNEL=1 ;;
            --refresh) REFRESH_QEMU=1 REFRESH_KERNEL=1 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument: $1" ;;
        esac
        shift
    done
    [[ "$(uname -m)" == x86_64 ]] || die "this provisioning supports x86_64 hosts only (got $(uname -m))"
    [[ "$(id -u)" == 0 ]] || die "must run as root (apt-get install, debootstrap and chroot need it)"
}
