#!/usr/bin/env bash
# Installs vhost-device-rng, rust-vmm's vhost-user RNG back-end (software we did not
# write), from the crate registry into the cache. It is the third-party back-end of
# scripts/e2e-frontend.sh.
#
# APERTURE_VHOST_DEVICE_RNG_VERSION (scripts/versions.env) is a version requirement, not
# an exact release: cargo takes the newest release that meets it, so a yanked or
# superseded release does not break a fresh machine. The binary goes to
#   $APERTURE_CACHE/vhost-device-rng/<requirement>/bin/vhost-device-rng
# and the exact release installed to .../version. Idempotent: an installed binary for the
# same requirement is kept. Prints the binary's path on stdout; when the registry has no
# release that meets the requirement, says so in one line naming the variable to change.
#
# Usage: scripts/install-vhost-device-rng.sh
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

req="$APERTURE_VHOST_DEVICE_RNG_VERSION"
root="$APERTURE_CACHE/vhost-device-rng/$(tr -c 'A-Za-z0-9.+_\n-' '_' <<<"$req")"
bin="$root/bin/vhost-device-rng"
if [[ -x "$bin" && -s "$root/version" ]]; then
    log "vhost-device-rng $(cat "$root/version") (requirement $req): cached"
    printf '%s\n' "$bin"
    exit 0
fi
command -v cargo >/dev/null || die "cargo is needed to build vhost-device-rng"
mkdir -p "$APERTURE_CACHE/logs"
build_log="$APERTURE_CACHE/logs/vhost-device-rng.log"
log "building the newest vhost-device-rng meeting '$req' (crate registry) into $root (log: $build_log)"
# --locked: the dependency versions the crate was published with.
if ! cargo install --locked -j "${APERTURE_JOBS:-2}" \
        --version "$req" --root "$root" vhost-device-rng >"$build_log" 2>&1; then
    why=$(grep -m1 '^error' "$build_log" || tail -n 1 "$build_log")
    die "could not install vhost-device-rng '$req' from the crate registry ($why); set APERTURE_VHOST_DEVICE_RNG_VERSION in scripts/versions.env (log: $build_log)"
fi
[[ -x "$bin" ]] || die "cargo install left no $bin (log: $build_log)"
# cargo's own record of what it installed: `vhost-device-rng 0.1.0 (registry+...)`.
version=$(sed -n 's/^"vhost-device-rng \([^ ]*\) .*/\1/p' "$root/.crates.toml" | head -n1)
[[ -n "$version" ]] || die "cannot tell which vhost-device-rng release cargo installed ($root/.crates.toml)"
printf '%s\n' "$version" >"$root/version"
log "installed vhost-device-rng $version (requirement $req) at $bin ($(elapsed))"
printf '%s\n' "$bin"
