//! Runs one survey cell, for profiling one path alone (e.g. under
//! `valgrind --tool=callgrind`): `cargo run --release -p survey --example cell -- auto net-64 20000`.
#![allow(clippy::unwrap_used)] // a tool that cannot proceed fails by panicking

use std::time::Duration;
use survey::run::{prepare_disk, Pattern};
use survey::{run_one, Budget, Mode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = Mode::ALL
        .into_iter()
        .find(|m| Some(m.name()) == args.get(1).map(String::as_str))
        .expect("first argument: a mode name");
    let pattern = Pattern::ALL
        .into_iter()
        .find(|p| Some(p.name()) == args.get(2).map(String::as_str))
        .expect("second argument: a pattern name");
    let n: u64 = args.get(3).map_or(10_000, |s| s.parse().unwrap());
    let disk = std::env::temp_dir().join("aperture-survey-cell.img");
    prepare_disk(&disk).unwrap();
    let budget = Budget {
        per_cell: Duration::ZERO,
        min_requests: n,
        calibration_iters: 0,
    };
    let m = run_one(mode, pattern, &disk, budget, 32 << 10).unwrap();
    println!(
        "{} {}: {} requests, {:.0} CPU ns/request",
        mode.name(),
        pattern.name(),
        m.requests,
        m.cpu.as_nanos() as f64 / m.requests as f64
    );
}
