//! Fuzz target `vhost_user_wire`. Its body is `aperture_fuzz::vhost_user_wire::run`
//! (src/vhost_user_wire.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `vhost_user_wire FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::vhost_user_wire::run(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main("vhost_user_wire", aperture_fuzz::vhost_user_wire::run);
}
