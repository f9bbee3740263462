#!/usr/bin/env bash
# Installs vhost-device-rng, rust-vmm's vhost-user RNG back-end (software we did not
# write), from the crate registry at the pinned version into the cache:
#   $APERTURE_CACHE/vhost-device-rng-$VERSION/bin/vhost-device-rng
# It is the third-party back-end of scripts/e2e-frontend.sh. Idempotent: an installed
# binary of the pinned version is kept. Prints the binary's path on stdout.
#
# Usage: scripts/install-vhost-device-rng.sh
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

version="$APERTURE_VHOST_DEVICE_RNG_VERSION"
root="$APERTURE_CACHE/vhost-device-rng-$version"
bin="$root/bin/vhost-device-rng"
if [[ -x "$bin" ]]; then
    printf '%s\n' "$bin"
    exit 0
fi
command -v cargo >/dev/null || die "cargo is needed to build vhost-device-rng"
log "building vhost-device-rng $version (crate registry) into $root"
# --locked: the dependency versions the crate was published with.
cargo install --locked --quiet -j "${APERTURE_JOBS:-2}" \
    --version "=$version" --root "$root" vhost-device-rng >&2 \
    || die "cargo install vhost-device-rng $version failed"
[[ -x "$bin" ]] || die "cargo install left no $bin"
log "installed $bin ($(elapsed))"
printf '%s\n' "$bin"
