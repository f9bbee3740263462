#!/usr/bin/env bash
# The version resolver of provisioning: reads a Debian suite's package index (the
# `Package:`/`Version:` stanzas of a Packages file, as apt stores it) and picks what to
# install by the policy in scripts/versions.env, never by an exact Debian revision
# (backports suites keep only the newest revision of a package).
#
#   qemu:   the newest qemu-system-x86 whose upstream version is in APERTURE_QEMU_SERIES
#           (e.g. 11.1 -> 11.1.x), not below APERTURE_QEMU_MIN_VERSION, with a
#           qemu-system-data of the same version.
#   kernel: the newest linux-image-SERIES.N+debV-FLAVOUR (not -unsigned, not -dbg),
#           never an upstream release in a known-bad range for virtio-iommu.
#
# Sourced by scripts/provision.sh (functions resolve_qemu, resolve_kernel), or run on
# its own against an index file, which is how its tests run it:
#
#   scripts/resolve.sh qemu SUITE SERIES FLOOR [EXACT] <INDEX
#       prints the Debian version of qemu-system-x86 to install
#   scripts/resolve.sh kernel SUITE SERIES FLAVOUR [EXACT_PACKAGE] <INDEX
#       prints "PACKAGE VERSION RELEASE" (RELEASE is the kernel's `uname -r`)
#
# Either prints why it picked what it picked on stderr. When nothing fits it prints one
# line on stderr, "[resolve.sh] ERROR: ...", naming what the index has and the variable
# of scripts/versions.env to change, and exits 1.

# index_versions NAME_REGEX: "PACKAGE VERSION" for every stanza on stdin whose package
# name matches the (awk, anchored by the caller) regex.
index_versions() {
    awk -v re="$1" '
        /^Package:/ { p = $2; next }
        /^Version:/ { if (p ~ re) print p, $2; next }
        /^$/        { p = "" }
    '
}

# upstream_of DEBIAN_VERSION: the upstream release number, "1:11.1.3+ds-2~bpo13+1" -> 11.1.3.
upstream_of() {
    local v="${1#*:}"
    [[ "$v" =~ ^([0-9]+(\.[0-9]+)*) ]] && printf '%s\n' "${BASH_REMATCH[1]}"
}

# in_series UPSTREAM SERIES: 11.1.3 is in 11.1 (and in 11), 11.10.0 is not in 11.1.
in_series() { [[ "$1" == "$2" || "$1" == "$2".* ]]; }

# newest_of: of the lines "NAME VERSION ..." on stdin, the one whose Debian version is
# the greatest (nothing when there are none).
newest_of() {
    local best="" best_v="" line v
    while IFS= read -r line; do
        [[ -n "$line" ]] || continue
        read -r _ v _ <<<"$line"
        if [[ -z "$best" ]] || dpkg --compare-versions "$v" gt "$best_v"; then
            best="$line" best_v="$v"
        fi
    done
    [[ -z "$best" ]] || printf '%s\n' "$best"
}

# Upstream kernel releases whose virtio-iommu probing is broken: 6.15.x, 6.16.0-6.16.3.
# kernel_refused RELEASE: RELEASE (6.16 is 6.16.0) is one of them.
kernel_refused() {
    case "$1" in
        6.15 | 6.15.* | 6.16 | 6.16.[0-3]) return 0 ;;
        *) return 1 ;;
    esac
}
# kernel_series_refused SERIES: every release of SERIES is refused (6.15, 6.16.2; not 6.16,
# which goes on past 6.16.3).
kernel_series_refused() {
    case "$1" in
        6.15 | 6.15.* | 6.16.[0-3] | 6.16.[0-3].*) return 0 ;;
        *) return 1 ;;
    esac
}

_resolve_fail() { printf '[resolve.sh] ERROR: %s\n' "$*" >&2; return 1; }
_resolve_say() { printf '[resolve.sh] %s\n' "$*" >&2; }
# list_or_none: the lines of stdin joined with ", ", or "none".
_list_or_none() { local s; s=$(paste -sd, - | sed 's/,/, /g'); printf '%s' "${s:-none}"; }

# resolve_qemu SUITE SERIES FLOOR [EXACT] <INDEX: see the header.
resolve_qemu() {
    local suite="$1" series="$2" floor="$3" exact="${4:-}" index x86 data cands pick v up
    index=$(cat)
    x86=$(index_versions '^qemu-system-x86$' <<<"$index")
    data=$(index_versions '^qemu-system-data$' <<<"$index")
    [[ -n "$x86" ]] || _resolve_fail "QEMU: $suite has no qemu-system-x86 at all (an empty or missing suite index); check APERTURE_QEMU_BACKPORTS_SUITE in scripts/versions.env" || return
    if [[ -n "$exact" ]]; then
        grep -qxF "qemu-system-x86 $exact" <<<"$x86" \
            || _resolve_fail "QEMU: APERTURE_QEMU_DEB_VERSION=$exact is not in $suite (it has: $(awk '{ print $2 }' <<<"$x86" | _list_or_none)); unset it to follow APERTURE_QEMU_SERIES" || return
        grep -qxF "qemu-system-data $exact" <<<"$data" \
            || _resolve_fail "QEMU: $suite has qemu-system-x86 $exact but no qemu-system-data of that version; unset APERTURE_QEMU_DEB_VERSION" || return
        _resolve_say "QEMU: $exact, because APERTURE_QEMU_DEB_VERSION asks for exactly it"
        printf '%s\n' "$exact"
        return 0
    fi
    version_ge "$series" "$floor" \
        || _resolve_fail "QEMU: APERTURE_QEMU_SERIES=$series is below the floor $floor (vfio-user-pci needs $floor or newer); raise it in scripts/versions.env" || return
    cands=""
    while read -r _ v; do
        up=$(upstream_of "$v")
        in_series "$up" "$series" || continue
        version_ge "$up" "$floor" || continue
        grep -qxF "qemu-system-data $v" <<<"$data" || continue
        cands+="qemu-system-x86 $v"$'\n'
    done <<<"$x86"
    pick=$(newest_of <<<"$cands" | awk '{ print $2 }')
    [[ -n "$pick" ]] \
        || _resolve_fail "QEMU: series $series is gone from $suite, which has qemu-system-x86 $(awk '{ print $2 }' <<<"$x86" | _list_or_none); set APERTURE_QEMU_SERIES in scripts/versions.env to a series you have tested (>= $floor)" || return
    _resolve_say "QEMU: $pick, the newest qemu-system-x86 of series $series (>= $floor) in $suite, which has: $(awk '{ print $2 }' <<<"$x86" | _list_or_none)"
    printf '%s\n' "$pick"
}

# resolve_kernel SUITE SERIES FLAVOUR [EXACT_PACKAGE] <INDEX: see the header.
resolve_kernel() {
    local suite="$1" series="$2" flavour="$3" exact="${4:-}" re all cands="" refused="" pkg v rel up pick
    if kernel_series_refused "$series"; then
        _resolve_fail "guest kernel: APERTURE_KERNEL_SERIES=$series is in a known-bad range for virtio-iommu (6.15.x, 6.16.0-6.16.3); set another series in scripts/versions.env" || return
    fi
    # linux-image-6.12.95+deb12-cloud-amd64, linux-image-6.12.90+deb12.1-cloud-amd64,
    # bookworm's linux-image-6.1.0-28-cloud-amd64; the -unsigned and -dbg builds do not
    # match (the flavour ends the name).
    re="^linux-image-[0-9]+[.][0-9]+([.][0-9]+)?([+]deb[0-9.]+)?(-[0-9]+)?-${flavour//./[.]}\$"
    all=$(index_versions "$re")
    [[ -n "$all" ]] \
        || _resolve_fail "guest kernel: $suite has no linux-image-*-$flavour at all (an empty or missing suite index, or a wrong APERTURE_KERNEL_FLAVOUR in scripts/versions.env)" || return
    while read -r pkg v; do
        rel=${pkg#linux-image-}
        up=${rel%%[+-]*}
        if [[ -n "$exact" ]]; then
            [[ "$pkg" == "$exact" ]] || continue
        else
            in_series "$up" "$series" || continue
        fi
        if kernel_refused "$up"; then refused+="$pkg "; continue; fi
        cands+="$pkg $v $rel"$'\n'
    done <<<"$all"
    pick=$(newest_of <<<"$cands")
    if [[ -z "$pick" ]]; then
        local has
        has=$(awk '{ p = $1; sub(/^linux-image-/, "", p); sub(/[+-].*/, "", p); print p }' <<<"$all" | sort -uV | _list_or_none)
        if [[ -n "$exact" ]]; then
            _resolve_fail "guest kernel: APERTURE_KERNEL_PACKAGE=$exact is ${refused:+refused (known-bad for virtio-iommu)}${refused:-not in $suite} (its $flavour kernels: $has); unset it to follow APERTURE_KERNEL_SERIES"
        else
            _resolve_fail "guest kernel: no $series.x $flavour kernel in $suite${refused:+ outside the known-bad range (refused: $refused)} (it has: $has); set APERTURE_KERNEL_SERIES in scripts/versions.env"
        fi
        return
    fi
    read -r pkg v rel <<<"$pick"
    if [[ -n "$exact" ]]; then
        _resolve_say "guest kernel: $pkg $v, because APERTURE_KERNEL_PACKAGE asks for exactly it"
    else
        _resolve_say "guest kernel: $pkg $v, the newest $series.x $flavour kernel in $suite ($(grep -c . <<<"$cands") of that series there${refused:+; refused as known-bad: $refused})"
    fi
    printf '%s\n' "$pick"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    # version_ge comes from common.sh; sourcing it also reads versions.env.
    # shellcheck source=common.sh
    . "$(dirname "${BASH_SOURCE[0]}")/common.sh"
    case "${1:-}" in
        qemu)
            (($# >= 4 && $# <= 5)) || die "usage: $0 qemu SUITE SERIES FLOOR [EXACT] <INDEX"
            shift; resolve_qemu "$@" ;;
        kernel)
            (($# >= 4 && $# <= 5)) || die "usage: $0 kernel SUITE SERIES FLAVOUR [EXACT_PACKAGE] <INDEX"
            shift; resolve_kernel "$@" ;;
        *) die "usage: $0 qemu|kernel ... <INDEX (see the header of $0)" ;;
    esac
fi
