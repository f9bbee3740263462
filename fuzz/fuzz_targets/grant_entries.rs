//! Fuzz target `grant_entries`. Its body is `aperture_fuzz::grant_entries::run`
//! (src/grant_entries.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `grant_entries FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::grant_entries::run(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main("grant_entries", aperture_fuzz::grant_entries::run);
}
