//! Fuzz target `host_tables`. Its body is `aperture_fuzz::host_tables::run`
//! (src/host_tables.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `host_tables FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::host_tables::run(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main("host_tables", aperture_fuzz::host_tables::run);
}
