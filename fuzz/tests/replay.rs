//! The stable replay of every fuzz target: each committed input (`regressions/<target>/`
//! and `seeds/<target>/`) and the local corpus a fuzzing run grew (`corpus/<target>/`,
//! git-ignored, if present) goes through the target's `run`, the function the
//! cargo-fuzz binary calls. No nightly, no libFuzzer.

use aperture_fuzz::{inputs_in, TARGETS};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs every input of `target` found under the given directories; returns how many
/// ran, and panics naming each input that failed.
fn replay(target: &str, dirs: &[&str]) -> usize {
    let run = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .unwrap_or_else(|| panic!("no target {target}"));
    let mut failed = Vec::new();
    let mut n = 0;
    for dir in dirs {
        for file in inputs_in(&root().join(dir).join(target)) {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            n += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failed.push(file);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} input(s) failed (replay one with `cargo run --manifest-path fuzz/Cargo.toml --bin {target} -- FILE`):\n{}",
        failed.len(),
        failed
            .iter()
            .map(|f| format!("  {}", f.display()))
            .collect::<Vec<_>>()
            .join("\n")
    );
    n
}

fn replay_all(target: &str) {
    let n = replay(target, &["regressions", "seeds", "corpus"]);
    eprintln!("{target}: {n} input(s) replayed");
}

#[test]
fn requests() {
    replay_all("requests");
}

#[test]
fn blk_request() {
    replay_all("blk_request");
}

#[test]
fn host_tables() {
    replay_all("host_tables");
}

#[test]
fn host_tables_ivrs() {
    replay_all("host_tables_ivrs");
}

#[test]
fn host_tables_iort() {
    replay_all("host_tables_iort");
}

#[test]
fn vhost_user_wire() {
    replay_all("vhost_user_wire");
}

#[test]
fn virtio_pci_registers() {
    replay_all("virtio_pci_registers");
}

#[test]
fn grant_entries() {
    replay_all("grant_entries");
}

/// Every target has a test above, its binary, and a committed seed corpus.
#[test]
fn every_target_is_replayed_and_seeded() {
    let this = std::fs::read_to_string(root().join("tests/replay.rs")).expect("this file");
    for (name, _) in TARGETS {
        assert!(
            this.contains(&format!("fn {name}()")),
            "no replay test for {name}"
        );
        assert!(
            Path::new(&root().join("fuzz_targets").join(format!("{name}.rs"))).is_file(),
            "no fuzz_targets/{name}.rs"
        );
        assert!(
            !inputs_in(&root().join("seeds").join(name)).is_empty(),
            "no seeds/{name}/"
        );
    }
}
