//! Aperture's fuzz targets as plain functions.
//!
//! Each module holds one target's body, `pub fn run(data: &[u8])`, which panics when
//! the code under test breaks a contract the target checks. Three callers share it:
//!
//! - the cargo-fuzz binaries in `fuzz_targets/` (nightly, libFuzzer:
//!   `cargo +nightly fuzz run <target>`), whose `fuzz_target!` only calls `run`;
//! - `tests/replay.rs`, a stable `cargo test` that runs every committed input
//!   (`regressions/<target>/`, `seeds/<target>/`) and any local corpus
//!   (`corpus/<target>/`) through `run`;
//! - the same binaries built without cargo-fuzz (stable): [`replay_main`] runs the
//!   files or directories given on the command line through `run`.

pub mod blk_request;
pub mod grant_entries;
pub mod host_tables;
pub mod requests;
pub mod vhost_user_wire;
pub mod virtio_pci_registers;

mod input;

/// A target's body.
pub type Run = fn(&[u8]);

/// Every target: its name (= its binary and its directories) and its body.
pub const TARGETS: &[(&str, Run)] = &[
    ("requests", requests::run),
    ("blk_request", blk_request::run),
    ("host_tables", host_tables::run),
    ("host_tables_ivrs", host_tables::run_ivrs),
    ("host_tables_iort", host_tables::run_iort),
    ("vhost_user_wire", vhost_user_wire::run),
    ("virtio_pci_registers", virtio_pci_registers::run),
    ("grant_entries", grant_entries::run),
];

/// The `main` of a target binary built without cargo-fuzz: runs each file named on
/// the command line (a directory: each file in it) through `run`, and says which one
/// panicked.
pub fn replay_main(name: &str, run: Run) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!(
            "{name}: built without cargo-fuzz; usage: {name} FILE|DIR... (replays inputs).\n\
             To fuzz: cargo +nightly fuzz run {name}"
        );
        std::process::exit(2);
    }
    let mut files = Vec::new();
    for a in &args {
        let p = std::path::Path::new(a);
        if p.is_dir() {
            files.extend(inputs_in(p));
        } else {
            files.push(p.to_path_buf());
        }
    }
    for f in &files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{name}: {}: {e}", f.display());
                std::process::exit(1);
            }
        };
        eprintln!("{name}: {}", f.display());
        run(&data);
    }
    eprintln!("{name}: {} input(s), no failure", files.len());
}

/// The files directly in `dir`, sorted (none if it does not exist). Dot files (such as
/// `.gitkeep`) are skipped.
pub fn inputs_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    v.sort();
    v
}
