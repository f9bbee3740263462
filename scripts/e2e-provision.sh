#!/usr/bin/env bash
# End-to-end tests of provisioning (scripts/provision.sh) against the real archive, on
# copies of the cache it filled (the main cache is never changed):
#
#   stale-cache-replaced   a cache filled by an older set of versions (an older QEMU tree,
#                          a guest directory stamped for an older kernel but holding this
#                          one's modules, that kernel's .deb, an env file naming them) is
#                          noticed, rebuilt for the resolved versions and the old parts
#                          removed; the result matches the main cache, its modules are all
#                          built for its kernel, and the smoke boot ran again.
#   broken-kernel-rebuilt  a guest directory missing a module is noticed and rebuilt from
#                          the cached .deb.
#   offline-uses-recorded  with the archive out of reach, a complete cache runs with the
#                          versions it recorded, saying so; an empty one stops in one line.
#   series-gone            a QEMU series the archive does not have stops provisioning with
#                          one resolver line naming what is there and the variable to change,
#                          and leaves the cache as it was.
#
# Runs scripts/provision.sh on $APERTURE_CACHE first (as every e2e suite does). Prints
# PASS/FAIL per scenario and "N passed, M failed"; exit 0 only if nothing failed.
# Env: E2E_ONLY=a,b, E2E_KEEP=1, APERTURE_CACHE. About 1 minute (one QEMU tree rebuild).
set -euo pipefail
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
. "$SCRIPTS/common.sh"
# shellcheck source=e2e-lib.sh
. "$SCRIPTS/e2e-lib.sh"

ALL=(stale-cache-replaced broken-kernel-rebuilt offline-uses-recorded series-gone)
e2e_select
e2e_workdir prov
[[ "$(id -u)" == 0 ]] || abort_all "provisioning needs root"
e2e_provision
MAIN="$APERTURE_CACHE"
envkey() { sed -n "s/^$2=//p" "$1/env" 2>/dev/null | head -n1; }
NOW_QEMU=$(envkey "$MAIN" APERTURE_QEMU_DEB) NOW_KERNEL=$(envkey "$MAIN" APERTURE_KERNEL_DEB)
[[ -n "$NOW_QEMU" && -n "$NOW_KERNEL" ]] || abort_all "$MAIN/env names no resolved versions"
NOW_QTREE=$(basename "$(find "$MAIN/qemu" -mindepth 1 -maxdepth 1 -type d)")

# copy_cache NAME: a copy of the main cache at $RUN/NAME (sets C).
copy_cache() { C="$RUN/$1"; cp -a "$MAIN" "$C"; rm -f "$C/.lock"; }
# provision_in CACHE LOG [VAR=VALUE...]: provision.sh on CACHE; its status, output in LOG.
provision_in() {
    local cache="$1" logf="$2"
    shift 2
    env "$@" APERTURE_CACHE="$cache" "$SCRIPTS/provision.sh" >"$logf" 2>&1
}
# modules_match CACHE: every module of the guest directory is built for its kernel.
modules_match() {
    local g="$1/guest" krel ko vm
    krel=$(cat "$g/kernel-version")
    while IFS= read -r ko; do
        vm=$(modinfo -F vermagic "$g/modules/$ko" 2>&1) || vm="unreadable ($vm)"
        [[ "$vm" == "$krel "* ]] || bad "the guest directory mixes kernels: $ko is built for ${vm%% *}, not $krel"
    done <"$g/modules/load-order"
}

scenario_stale_cache_replaced() {
    copy_cache stale
    # The set of versions before this one: QEMU's previous Debian revision, the previous
    # 6.12 kernel. Its guest directory says so but holds the current kernel's modules: a
    # cache that trusted the directory would boot a mix.
    local old_qemu="1:11.1.3+ds-1~bpo13+1" old_kpkg="linux-image-6.12.94+deb12-cloud-amd64" old_kver="6.12.94-1~bpo12+1"
    local old_tree="trixie_trixie-backports_1_11.1.3+ds-1_bpo13+1"
    mv "$C/qemu/$NOW_QTREE" "$C/qemu/$old_tree"
    sed -i "s/^deb_version=.*/deb_version=$old_qemu/" "$C/qemu/$old_tree/.complete"
    sed -i "s/^package=[^ ]* version=[^ ]* release=[^ ]*/package=$old_kpkg version=$old_kver release=${old_kpkg#linux-image-}/" "$C/guest/.stamp"
    local deb
    deb=$(echo "$C"/debs/*.deb)
    mv "$deb" "$C/debs/${old_kpkg}_${old_kver}_amd64.deb"
    sed -i -e "s/^APERTURE_QEMU_DEB=.*/APERTURE_QEMU_DEB=qemu-system-x86=$old_qemu/" \
           -e "s/^APERTURE_KERNEL_DEB=.*/APERTURE_KERNEL_DEB=$old_kpkg=$old_kver/" "$C/env"
    echo "qemu-system-x86=$old_qemu $old_kpkg=$old_kver busybox=old" >"$C/.smoke-ok"

    if ! provision_in "$C" "$RUN/stale.log"; then
        bad "provision.sh failed: $(grep ERROR "$RUN/stale.log" | head -n 2 | tr '\n' ' ')"
        return
    fi
    grep -q "the cache holds a tree of other versions ($old_tree" "$RUN/stale.log" || bad "the old QEMU tree was not reported"
    grep -q "the cache holds package=$old_kpkg version=$old_kver" "$RUN/stale.log" || bad "the old guest kernel was not reported"
    grep -q "smoke boot: QEMU" "$RUN/stale.log" || bad "the smoke boot did not run again for the new versions"
    expect "QEMU trees" "$(ls "$C/qemu" | tr '\n' ' ')" "$NOW_QTREE "
    expect "kernel packages" "$(ls "$C/debs" | tr '\n' ' ')" "$(ls "$MAIN/debs" | tr '\n' ' ')"
    expect "guest stamp" "$(cat "$C/guest/.stamp")" "$(cat "$MAIN/guest/.stamp")"
    expect "env QEMU" "$(envkey "$C" APERTURE_QEMU_DEB)" "$NOW_QEMU"
    expect "env kernel" "$(envkey "$C" APERTURE_KERNEL_DEB)" "$NOW_KERNEL"
    expect "wrapper's tree" "$(grep -o "qemu/[^/]*/root" "$C/bin/qemu-system-x86_64")" "qemu/$NOW_QTREE/root"
    modules_match "$C"
    [[ -z "$(ls -d "$C"/.old-* "$C"/.build-* 2>/dev/null)" ]] || bad "left-overs: $(ls -d "$C"/.old-* "$C"/.build-* 2>/dev/null)"
}

scenario_broken_kernel_rebuilt() {
    copy_cache broken
    local ko
    ko=$(head -n1 "$C/guest/modules/load-order")
    rm "$C/guest/modules/$ko"
    if ! provision_in "$C" "$RUN/broken.log"; then
        bad "provision.sh failed: $(grep ERROR "$RUN/broken.log" | head -n 2 | tr '\n' ' ')"
        return
    fi
    grep -q "does not pass its check (module $ko is in load-order but missing)" "$RUN/broken.log" || bad "the missing module was not reported"
    grep -q "downloading" "$RUN/broken.log" && bad "downloaded again instead of using the cached .deb"
    [[ -s "$C/guest/modules/$ko" ]] || bad "$ko was not restored"
    modules_match "$C"
}

scenario_offline_uses_recorded() {
    copy_cache offline
    # Port 9 (discard) on loopback: nothing listens, the archive is out of reach at once.
    local off=APERTURE_APT_MIRROR=http://127.0.0.1:9/debian
    if ! provision_in "$C" "$RUN/offline.log" "$off"; then
        bad "provision.sh failed offline on a complete cache: $(grep ERROR "$RUN/offline.log" | head -n 2 | tr '\n' ' ')"
    else
        grep -q "WARNING: could not read the package indexes.*using the versions resolved at" "$RUN/offline.log" \
            || bad "did not say it used the recorded versions"
        expect "env QEMU" "$(envkey "$C" APERTURE_QEMU_DEB)" "$NOW_QEMU"
    fi
    if provision_in "$RUN/offline-empty" "$RUN/offline-empty.log" "$off"; then
        bad "an empty cache provisioned without the archive"
    else
        grep -q "ERROR: could not read the package indexes of .* and the cache holds no earlier resolution" "$RUN/offline-empty.log" \
            || bad "an empty cache offline did not fail saying why: $(grep ERROR "$RUN/offline-empty.log" | head -n1)"
    fi
}

scenario_series_gone() {
    copy_cache gone
    if provision_in "$C" "$RUN/gone.log" APERTURE_QEMU_SERIES=99.1; then
        bad "provisioning went on with a series the archive does not have"
        return
    fi
    local line
    line=$(grep '^\[resolve.sh\] ERROR' "$RUN/gone.log" || true)
    expect "resolver error lines" "$(grep -c . <<<"$line")" 1
    [[ "$line" == *"series 99.1 is gone from trixie-backports"*"${NOW_QEMU#qemu-system-x86=}"*"APERTURE_QEMU_SERIES"* ]] \
        || bad "the line does not name the series, what is there and the variable: $line"
    # A series below the vfio-user floor is refused the same way.
    provision_in "$C" "$RUN/floor.log" APERTURE_QEMU_SERIES=9.9 && bad "series 9.9 provisioned"
    grep -q "APERTURE_QEMU_SERIES=9.9 is below the floor" "$RUN/floor.log" || bad "series 9.9: $(grep ERROR "$RUN/floor.log" | head -n1)"
    expect "QEMU trees kept" "$(ls "$C/qemu")" "$NOW_QTREE"
    expect "env kept" "$(envkey "$C" APERTURE_QEMU_DEB)" "$NOW_QEMU"
}

for s in "${SELECTED[@]}"; do
    REASONS=()
    t0=$(now)
    "scenario_${s//-/_}"
    if ((${#REASONS[@]})); then
        KEEP_RUN=1
        fail "$s: $(reasons_text)(logs: $RUN)"
    else
        pass "$s ($(since "$t0") s)"
    fi
done
summary
((FAILED == 0))
