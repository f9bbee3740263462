#!/usr/bin/env bash
# The whole test run of Aperture, from a fresh clone on Debian 12 (bookworm):
# formatting, lints, then every unit, integration, property and doc test
# (`aperture demo` runs too, as an end-to-end smoke test in crates/aperture/tests/cli.rs),
# then the end-to-end suites: scripts/e2e.sh (a real guest against `aperture serve`),
# scripts/e2e-vhost.sh and scripts/e2e-frontend.sh (vhost-user back-ends out of process).
# CI runs exactly this script (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

say() { printf 'test.sh: %s\n' "$*"; }

# --- what a fresh machine may lack ---------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    say "cargo not found. Aperture needs a Rust toolchain (1.88 or newer, stable)," >&2
    say "installed with rustup: see https://rustup.rs, then open a new shell and re-run ./test.sh." >&2
    say "(This script does not download toolchains.)" >&2
    exit 1
fi

# rustc links through the system C compiler; Debian's rustup users need it from apt.
if ! command -v cc >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        say "no C compiler/linker (cc) found; installing gcc and libc6-dev with apt-get"
        $sudo apt-get update -qq
        $sudo apt-get install -y -qq gcc libc6-dev
    else
        say "no C compiler/linker (cc) found; install gcc (rustc needs it to link)." >&2
        exit 1
    fi
fi

# rustfmt and clippy are rustup components of the toolchain already installed.
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        component=$([ "$tool" = fmt ] && echo rustfmt || echo clippy)
        if command -v rustup >/dev/null 2>&1; then
            say "cargo $tool missing; adding the $component component with rustup"
            rustup component add "$component"
        else
            say "cargo $tool missing and rustup not found; install the $component component." >&2
            exit 1
        fi
    fi
done

# --- the run -------------------------------------------------------------------------
say "cargo fmt --all -- --check"
cargo fmt --all -- --check

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

say "cargo doc --workspace --no-deps (warnings are errors: no broken doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

say "cargo test --workspace"
cargo test --workspace

# End-to-end: an unmodified Linux guest under QEMU against `aperture serve`. Provisions
# QEMU and the guest kernel first (cached; needs root the first time, as CI runs).
say "scripts/e2e.sh"
scripts/e2e.sh

# Out-of-process back-ends over vhost-user: QEMU as the front-end of ours, then our
# device host as the front-end of ours and of a third-party back-end from the registry.
say "scripts/e2e-vhost.sh"
scripts/e2e-vhost.sh

say "scripts/e2e-frontend.sh"
scripts/e2e-frontend.sh

say "PASS: formatting, lints and all tests of the workspace"
