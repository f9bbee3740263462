//! Fuzz target `blk_request`. Its body is `aperture_fuzz::blk_request::run`
//! (src/blk_request.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `blk_request FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::blk_request::run(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main("blk_request", aperture_fuzz::blk_request::run);
}
