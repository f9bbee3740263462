//! Fuzz target `virtio_pci_registers`. Its body is `aperture_fuzz::virtio_pci_registers::run`
//! (src/virtio_pci_registers.rs), which the stable replay test (tests/replay.rs) runs too.
//!
//! Built by cargo-fuzz (`--cfg fuzzing`) this is a libFuzzer target; built without it
//! (stable `cargo build`), a replay tool: `virtio_pci_registers FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aperture_fuzz::virtio_pci_registers::run(data));

#[cfg(not(fuzzing))]
fn main() {
    aperture_fuzz::replay_main(
        "virtio_pci_registers",
        aperture_fuzz::virtio_pci_registers::run,
    );
}
