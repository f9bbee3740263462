//! Fuzz target `requests`. Its body is `aperture_fuzz::requests::run`
//! (src/requests.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `requests FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::requests::run(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main("requests", aperture_fuzz::requests::run);
}
