#!/usr/bin/env bash
# The whole test run of Aperture, from a fresh clone on Debian 12 (bookworm):
# formatting, lints, then every unit, integration, property and doc test
# (`aperture demo --model` runs too, in crates/aperture/tests/cli.rs), the fuzz targets'
# inputs replayed on stable (and the targets built when nightly and cargo-fuzz are
# there), then provisioning
# (scripts/provision.sh: QEMU and the guest kernel, into $APERTURE_CACHE, by default
# ~/.cache/aperture) and its own tests (scripts/e2e-provision.sh), then the end-to-end
# suites: scripts/e2e.sh (a real guest against `aperture serve`), scripts/e2e-vhost.sh and
# scripts/e2e-frontend.sh (vhost-user back-ends out of process, implicit grants),
# scripts/e2e-arm64.sh (the restricted DMA pool with an arm64 guest; its first run
# builds the guest kernel, 3-6 min), and last the README's demo as a newcomer runs it. Every step's time is listed at the end.
# CI runs exactly this script (.ci/run), with APERTURE_CACHE pointed at a new empty
# directory so that it provisions as a fresh machine does.
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
: "${APERTURE_CACHE:=$HOME/.cache/aperture}"
export APERTURE_CACHE
TIMES=()
# step NAME CMD...: runs CMD, noting how long it took.
step() {
    local name="$1" t0
    shift
    say "$name"
    t0=$(date +%s)
    "$@"
    TIMES+=("$(printf '%5d s  %s' $(($(date +%s) - t0)) "$name")")
}
t_run=$(date +%s)

step "cargo fmt --all -- --check" cargo fmt --all -- --check
step "cargo clippy --workspace --all-targets -- -D warnings" \
    cargo clippy --workspace --all-targets -- -D warnings
step "cargo doc --workspace --no-deps (warnings are errors: no broken doc links)" \
    env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
step "cargo test --workspace" cargo test --workspace
# The product (serve, backend blk|rng, layout, demo) builds without the benchmarks.
step "cargo build -p aperture --no-default-features (the product without the survey)" \
    cargo build -p aperture --no-default-features --quiet

# The fuzz targets (fuzz/, a workspace of its own): every committed input and any local
# corpus replayed through each target's body on stable, then, when a nightly toolchain
# with cargo-fuzz is installed, the libFuzzer targets built. This script installs
# neither; see fuzz/README.md.
fuzz_build() {
    local why=""
    if ! command -v rustup >/dev/null 2>&1; then
        why="rustup not found"
    elif ! rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null; then
        why="no nightly toolchain (rustup toolchain install nightly)"
    elif ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        why="cargo-fuzz not installed (cargo install cargo-fuzz)"
    fi
    if [ -n "$why" ]; then
        say "fuzz build skipped: $why; the stable replay of every fuzz input ran"
        return 0
    fi
    (cd fuzz && cargo +nightly fuzz build)
}
step "cargo test --manifest-path fuzz/Cargo.toml (fuzz inputs replayed on stable)" \
    cargo test --manifest-path fuzz/Cargo.toml
step "cargo +nightly fuzz build (if nightly and cargo-fuzz are installed)" fuzz_build

# QEMU, the guest kernel and busybox, resolved from the archive by the version policy
# of scripts/versions.env (cached; needs root, as CI runs). Then provisioning's own
# end-to-end tests, on copies of that cache.
step "scripts/provision.sh (cache: $APERTURE_CACHE)" scripts/provision.sh
step "scripts/e2e-provision.sh" scripts/e2e-provision.sh

# End-to-end: an unmodified Linux guest under QEMU against `aperture serve`.
step "scripts/e2e.sh" scripts/e2e.sh

# Out-of-process back-ends over vhost-user: QEMU as the front-end of ours, then our
# device host as the front-end of ours and of a third-party back-end from the registry.
step "scripts/e2e-vhost.sh" scripts/e2e-vhost.sh
step "scripts/e2e-frontend.sh" scripts/e2e-frontend.sh

# The restricted DMA pool with a real guest: arm64 under QEMU's virt machine, its kernel
# built once from Debian's linux-source with the pool (scripts/provision-arm64.sh,
# cached), QEMU's own devices and then ours in pool mode, in process and out of process.
step "scripts/e2e-arm64.sh" scripts/e2e-arm64.sh

# The README's first command, exactly as a newcomer types it.
step "cargo run --release -p aperture -- demo" cargo run --release -p aperture -- demo

say "time per step:"
printf '  %s\n' "${TIMES[@]}"
say "$(printf '%5d s  in all' $(($(date +%s) - t_run)))"
say "PASS: formatting, lints and all tests of the workspace"
