//! Fuzz target `host_tables_iort`. Its body is `aperture_fuzz::host_tables::run_iort`
//! (src/host_tables.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `host_tables_iort FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::host_tables::run_iort(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main("host_tables_iort", aperture_fuzz::host_tables::run_iort);
}
