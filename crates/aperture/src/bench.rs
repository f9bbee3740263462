//! `aperture bench`: the cost survey ([`survey`]) — every sharing mode against every
//! device access pattern in this process, then the cells that have an out-of-process
//! backend with `aperture backend` (this binary, [`std::env::current_exe`]) in a
//! child process over vhost-user — printed as a table, written as JSON and as an SVG
//! plot of cost per byte against request size (in-process cells); with `--guest`, the
//! in-guest disk comparison ([`crate::bench_guest`]) too, and how well the model's ratios
//! agree with the guest's.

use crate::bench_guest::{self, Config, GuestMedians};
use plotters::prelude::*;
use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use survey::remote::BackendCommand;
use survey::run::Pattern;
use survey::{Budget, Cell, Mode, Survey, IN_PROCESS, OUT_OF_PROCESS};

/// Default JSON output, relative to the workspace.
pub(crate) const DEFAULT_JSON: &str = "target/bench/survey.json";
/// Default plot, relative to the workspace.
pub(crate) const DEFAULT_SVG: &str = "target/bench/survey.svg";

/// What `aperture bench` was asked to do.
pub(crate) struct Options {
    pub(crate) quick: bool,
    pub(crate) json: Option<PathBuf>,
    pub(crate) svg: Option<PathBuf>,
    pub(crate) auto_threshold: Option<usize>,
    /// Also run the in-guest comparison with these options.
    pub(crate) guest: Option<bench_guest::Options>,
}

fn say(msg: &str) {
    eprintln!("aperture bench: {msg}");
}

pub(crate) fn run(opts: Options) -> ExitCode {
    match run_inner(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            say(&format!("FAILED: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The in-process cell of `mode` × `pattern`.
fn cell(s: &Survey, mode: Mode, pattern: Pattern) -> Option<&Cell> {
    s.cell(mode, pattern, IN_PROCESS)
}

fn human_bytes(b: f64) -> String {
    if b >= f64::from(1u32 << 30) {
        format!("{:.1} GiB", b / f64::from(1u32 << 30))
    } else if b >= f64::from(1u32 << 20) {
        format!("{:.1} MiB", b / f64::from(1u32 << 20))
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn table(s: &Survey, budget: Budget) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "aperture bench: the cost of each sharing mode per device access pattern \
(in-process backends, one thread, {} ms per cell)",
        budget.per_cell.as_millis()
    );
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{:<14} {:<17} {:>10} {:>7} {:>10} {:>9} {:>8} {:>8} {:>10}",
        "pattern",
        "mode",
        "MiB/s",
        "x none",
        "ns/req",
        "ns/byte",
        "maps/req",
        "copy B/B",
        "exposure"
    );
    for p in Pattern::ALL {
        let none = cell(s, Mode::None, p).map(Cell::throughput);
        for c in s
            .cells
            .iter()
            .filter(|c| c.pattern == p && c.placement == IN_PROCESS)
        {
            let ratio = none.map_or("-".into(), |n| format!("{:.2}", c.throughput() / n));
            let _ = writeln!(
                t,
                "{:<14} {:<17} {:>10.1} {:>7} {:>10.0} {:>9.3} {:>8.2} {:>8.2} {:>10}",
                p.name(),
                c.mode.name(),
                c.throughput() / f64::from(1u32 << 20),
                ratio,
                c.cpu_ns_per_request(),
                c.cpu_ns_per_byte(),
                c.map_ops_per_request(),
                c.copy_bytes_per_byte(),
                human_bytes(c.measured.stats.exposure_peak as f64)
            );
        }
    }
    out_of_process_table(&mut t, s);
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "Crossover (one device-written buffer: bounce = copy in + copy back, map = MAP + UNMAP, \
strict; auto = the same buffer through auto, against the cheaper of the two):"
    );
    let c = &s.calibration;
    for p in &c.points {
        let _ = writeln!(
            t,
            "  {:>8}  bounce {:>8.0} ns  map {:>8.0} ns  {:<6}  auto {:>8.0} ns  x{:.3}",
            human_bytes(p.size as f64),
            p.bounce_ns,
            p.map_ns,
            if p.map_ns <= p.bounce_ns {
                "map"
            } else {
                "bounce"
            },
            p.auto_ns,
            p.auto_ratio()
        );
    }
    let _ = writeln!(
        t,
        "  mapping is no dearer from {} on; auto bounced buffers below {}",
        c.crossover
            .map_or("no size measured".into(), |x| human_bytes(x as f64)),
        human_bytes(c.auto_threshold as f64)
    );
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "auto against the cheaper of pool and viommu-strict, {} alternating rounds \
(CPU per request, median ratio; noise: the larger of the two modes' spreads over the rounds):",
        survey::AutoCheck::ROUNDS
    );
    for a in &s.auto_checks {
        let r = a.ratio();
        let _ = writeln!(
            t,
            "  {:<14} vs {:<14} auto x{r:.3} (noise {:.1}%) {}",
            a.pattern.name(),
            a.best.name(),
            a.noise * 100.0,
            if r <= 1.0 {
                "cheaper"
            } else if a.ok() {
                "within noise"
            } else {
                "DEARER"
            }
        );
    }
    t
}

/// Per request, `n` counted over a cell's timed part.
fn per_request(c: &Cell, n: u64) -> f64 {
    n as f64 / c.measured.requests as f64
}

/// Share of the cell's CPU spent in the backend process.
fn backend_share(c: &Cell) -> Option<f64> {
    let b = c.measured.backend.as_ref()?;
    Some(b.cpu.as_nanos() as f64 / c.measured.cpu.as_nanos().max(1) as f64)
}

/// The out-of-process cells, each against its in-process twin, and what has none.
fn out_of_process_table(t: &mut String, s: &Survey) {
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "Out of process: `aperture backend` in a child process over vhost-user (CPU = this \
process + the backend process; exposure = the backend's own peak mapped bytes):"
    );
    let _ = writeln!(
        t,
        "{:<14} {:<14} {:>9} {:>9} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "pattern",
        "mode",
        "MiB/s",
        "x in-proc",
        "ns/req",
        "ns/byte",
        "backend%",
        "maps/req",
        "miss/req",
        "inval/req",
        "exposure"
    );
    for c in s.cells.iter().filter(|c| c.placement == OUT_OF_PROCESS) {
        let twin = cell(s, c.mode, c.pattern).map(Cell::throughput);
        let (misses, invals) = c
            .measured
            .backend
            .as_ref()
            .map_or((0, 0), |b| (b.misses, b.invalidates));
        let _ = writeln!(
            t,
            "{:<14} {:<14} {:>9.1} {:>9} {:>10.0} {:>9.3} {:>7.0}% {:>8.2} {:>8.2} {:>8.2} {:>10}",
            c.pattern.name(),
            c.mode.name(),
            c.throughput() / f64::from(1u32 << 20),
            twin.map_or("-".into(), |n| format!("{:.2}", c.throughput() / n)),
            c.cpu_ns_per_request(),
            c.cpu_ns_per_byte(),
            100.0 * backend_share(c).unwrap_or(0.0),
            c.map_ops_per_request(),
            per_request(c, misses),
            per_request(c, invals),
            human_bytes(c.measured.stats.exposure_peak as f64)
        );
    }
    // One line per reason, naming what it covers.
    let mut reasons: Vec<(&str, Vec<String>)> = Vec::new();
    for (m, p, why) in &s.not_out_of_process {
        let what = format!("{} {}", m.name(), p.name());
        match reasons.iter_mut().find(|(w, _)| *w == why.as_str()) {
            Some((_, v)) => v.push(what),
            None => reasons.push((why.as_str(), vec![what])),
        }
    }
    if !reasons.is_empty() {
        let _ = writeln!(t, "  no out-of-process cell (not measured):");
    }
    for (why, what) in reasons {
        let _ = writeln!(t, "    {} cells: {why}", what.len());
    }
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel,
        "arch": std::env::consts::ARCH,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

fn to_json(s: &Survey, budget: Budget, agreement: &serde_json::Value) -> serde_json::Value {
    let cells: Vec<serde_json::Value> = s
        .cells
        .iter()
        .map(|c| {
            json!({
                "mode": c.mode.name(),
                "pattern": c.pattern.name(),
                "placement": c.placement,
                "throughput_bytes_per_s": c.throughput(),
                "cpu_ns_per_byte": c.cpu_ns_per_byte(),
                "cpu_ns_per_request": c.cpu_ns_per_request(),
                "cpu_ns_per_request_slices": c.measured.slice_cpu_ns_per_request,
                "map_ops_per_request": c.map_ops_per_request(),
                "iommu_kicks_per_request": c.iommu_kicks_per_request(),
                "copy_bytes_per_byte": c.copy_bytes_per_byte(),
                "exposure_peak_bytes": c.measured.stats.exposure_peak,
                "requests": c.measured.requests,
                "bytes": c.measured.bytes,
                "wall_ns": c.measured.wall.as_nanos() as u64,
                "cpu_ns": c.measured.cpu.as_nanos() as u64,
                "backend": c.measured.backend.as_ref().map(|b| json!({
                    "cpu_ns": b.cpu.as_nanos() as u64,
                    "iotlb_misses_per_request": per_request(c, b.misses),
                    "iotlb_updates_per_request": per_request(c, b.updates),
                    "iotlb_invalidates_per_request": per_request(c, b.invalidates),
                    "peak_mapped_bytes": b.peak_mapped_bytes,
                    "memory_table_bytes": b.table_bytes,
                    "peak_windows": b.peak_windows,
                    "mode": b.mode,
                })),
            })
        })
        .collect();
    json!({
        "machine": machine(),
        "per_cell_ms": budget.per_cell.as_millis() as u64,
        "calibration": {
            "points": s.calibration.points.iter().map(|p| json!({
                "bytes": p.size, "bounce_ns": p.bounce_ns, "map_strict_ns": p.map_ns,
                "auto_ns": p.auto_ns, "auto_over_cheaper": p.auto_ratio(),
            })).collect::<Vec<_>>(),
            "crossover_bytes": s.calibration.crossover,
        },
        "auto_threshold_bytes": s.calibration.auto_threshold,
        "auto_vs_best": s.auto_checks.iter().map(|a| json!({
            "pattern": a.pattern.name(), "best_fixed_mode": a.best.name(),
            "cpu_ratio_median": a.ratio(), "cpu_ratios": a.ratios, "noise": a.noise,
            "ok": a.ok(),
        })).collect::<Vec<_>>(),
        "cells": cells,
        "cpu_accounting": {
            IN_PROCESS: "CPU time of the one thread running driver, device and backend",
            OUT_OF_PROCESS: "CPU time of this whole process (driver thread, the vhost-user front-end's miss and interrupt threads) plus the backend process's CPU clock, both over the timed part",
        },
        "out_of_process_not_measured": s.not_out_of_process.iter().map(|(m, p, why)| json!({
            "mode": m.name(), "pattern": p.name(), "reason": why,
        })).collect::<Vec<_>>(),
        "model_vs_guest": agreement,
    })
}

/// Eight distinguishable line colours, one per mode.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(31, 119, 180),
    RGBColor(23, 190, 207),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Lowest and highest of `v` (positive), widened for a log axis.
fn log_bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v
        .filter(|x| *x > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(l, h), x| (l.min(x), h.max(x)));
    if lo.is_finite() {
        (lo / 1.5, hi * 1.5)
    } else {
        (0.01, 1.0)
    }
}

type LogChart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<LogCoord<f64>, LogCoord<f64>>>;

/// A log-log chart on `area`: its caption, x and y ranges, and axis descriptions.
fn log_chart<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    (x_lo, x_hi): (f64, f64),
    (y_lo, y_hi): (f64, f64),
    (x_desc, y_desc): (&str, &str),
) -> Result<LogChart<'a>, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|x| e(&x))?;
    Ok(chart)
}

/// Draws `chart`'s legend.
fn legend(chart: &mut LogChart<'_>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|x| x.to_string())
}

/// One labelled series on `chart`: a line through `pts` and a dot on each.
fn series(
    chart: &mut LogChart<'_>,
    pts: Vec<(f64, f64)>,
    colour: RGBColor,
    label: &str,
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    chart
        .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
        .map_err(|x| e(&x))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
    chart
        .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
        .map_err(|x| e(&x))?;
    Ok(())
}

/// Two panels, log-log. Left: host CPU per byte moved against request size, one line
/// per mode over the blk and net patterns (rng-64 has net-64's size and is left out).
/// Right: one device-written buffer bounced against mapped (the calibration), with
/// the crossover marked: where copying stops being cheaper than mapping.
fn plot(s: &Survey, path: &std::path::Path) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(720);

    // In-process cells only: the out-of-process ones are in the table and the JSON.
    let shown = |c: &&Cell| c.pattern != Pattern::Rng64 && c.placement == IN_PROCESS;
    let (lo, hi) = log_bounds(s.cells.iter().filter(shown).map(Cell::cpu_ns_per_byte));
    let mut chart = log_chart(
        &left,
        "Host CPU per byte moved, by request size (in-process backends)",
        (40.0, 1.6 * 1048576.0),
        (lo, hi),
        (
            "request payload, bytes (net 64, 1500; blk 4 KiB, 64 KiB, 1 MiB)",
            "CPU ns per byte",
        ),
    )
    .map_err(|x| e(&x))?;
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = s
            .cells
            .iter()
            .filter(shown)
            .filter(|c| c.mode == mode)
            .map(|c| (c.pattern.bytes() as f64, c.cpu_ns_per_byte()))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series(&mut chart, pts, COLOURS[i % COLOURS.len()], mode.name()).map_err(|x| e(&x))?;
    }
    legend(&mut chart).map_err(|x| e(&x))?;

    let pts = &s.calibration.points;
    let (lo, hi) = log_bounds(
        pts.iter()
            .flat_map(|p| [p.bounce_ns, p.map_ns, p.auto_ns].map(|ns| ns / p.size as f64)),
    );
    let mut chart = log_chart(
        &right,
        "One buffer: bounce or map?",
        (40.0, 400_000.0),
        (lo, hi),
        (
            "buffer bytes (device-written)",
            "CPU ns per byte, map + unmap",
        ),
    )
    .map_err(|x| e(&x))?;
    type Way = (&'static str, RGBColor, fn(&survey::CalibrationPoint) -> f64);
    let ways: [Way; 3] = [
        ("bounce (pool)", COLOURS[6], |p| p.bounce_ns),
        ("map (viommu strict)", COLOURS[1], |p| p.map_ns),
        ("auto", COLOURS[7], |p| p.auto_ns),
    ];
    for (label, colour, ns) in ways {
        let line = pts.iter().map(|p| (p.size as f64, ns(p) / p.size as f64));
        series(&mut chart, line.collect(), colour, label).map_err(|x| e(&x))?;
    }
    if let Some(x) = s.calibration.crossover {
        let x = x as f64;
        chart
            .draw_series(LineSeries::new(
                vec![(x, lo), (x, hi)],
                BLACK.stroke_width(1),
            ))
            .map_err(|x| e(&x))?
            .label(format!("crossover {}", human_bytes(x)))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
    }
    legend(&mut chart).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// Model against guest: the cost of isolation (viommu throughput over none) for the
/// two disk patterns the guest runs, in both.
fn agreement(s: &Survey, guest: &GuestMedians) -> (String, serde_json::Value) {
    let g = |c: Config| guest.iter().find(|(x, _, _)| *x == c);
    let mut text = String::from(
        "\nModel against the Linux guest (our device host, throughput with the IOMMU / without; \
then what the IOMMU adds per request in the guest, what the model's work accounts for, and the \
rest per kick of the IOMMU's queue):\n",
    );
    let _ = writeln!(
        text,
        "  {:<14} {:<14} {:>7} {:>7} {:>14} {:>14} {:>9} {:>13}",
        "pattern",
        "mode",
        "model",
        "guest",
        "guest +us/req",
        "model +us/req",
        "kicks/req",
        "us per kick"
    );
    let mut rows = Vec::new();
    for (pattern, mode, config) in [
        (
            Pattern::Blk4kRandom,
            Mode::ViommuStrict,
            Config::ApertureStrict,
        ),
        (Pattern::Blk4kRandom, Mode::ViommuLazy, Config::ApertureLazy),
        (
            Pattern::Blk1mSeq,
            Mode::ViommuStrict,
            Config::ApertureStrict,
        ),
        (Pattern::Blk1mSeq, Mode::ViommuLazy, Config::ApertureLazy),
    ] {
        let (iso, none) = (cell(s, mode, pattern), cell(s, Mode::None, pattern));
        let model = iso.zip(none).map(|(m, n)| m.throughput() / n.throughput());
        // Requests per second in the guest: IOPS for 4 KiB reads; MiB/s for 1 MiB reads.
        let rate = |(_, iops, mibps): &(Config, Option<f64>, Option<f64>)| {
            if pattern == Pattern::Blk4kRandom {
                *iops
            } else {
                *mibps
            }
        };
        let (with, without) = (
            g(config).and_then(rate),
            g(Config::ApertureOff).and_then(rate),
        );
        let guest_ratio = with.zip(without).map(|(a, b)| a / b);
        let guest_added = with.zip(without).map(|(a, b)| 1e6 / a - 1e6 / b);
        let model_added = iso
            .zip(none)
            .map(|(m, n)| (m.cpu_ns_per_request() - n.cpu_ns_per_request()) / 1e3);
        let kicks = iso.map(Cell::iommu_kicks_per_request);
        let per_kick = guest_added
            .zip(model_added)
            .zip(kicks.filter(|k| *k > 0.0))
            .map(|((g, m), k)| (g - m) / k);
        let f = |v: Option<f64>, prec: usize| v.map_or("-".into(), |x| format!("{x:.prec$}"));
        let _ = writeln!(
            text,
            "  {:<14} {:<14} {:>7} {:>7} {:>14} {:>14} {:>9} {:>13}",
            pattern.name(),
            mode.name(),
            model.map_or("-".into(), |r| format!("x{r:.2}")),
            guest_ratio.map_or("-".into(), |r| format!("x{r:.2}")),
            f(guest_added, 1),
            f(model_added, 1),
            f(kicks, 2),
            f(per_kick, 1)
        );
        rows.push(json!({
            "pattern": pattern.name(), "mode": mode.name(),
            "model_ratio_to_none": model, "guest_ratio_to_none": guest_ratio,
            "guest_added_us_per_request": guest_added,
            "model_added_us_per_request": model_added,
            "model_iommu_kicks_per_request": kicks,
            "guest_us_per_kick_beyond_model": per_kick,
        }));
    }
    (text, serde_json::Value::Array(rows))
}

fn run_inner(opts: &Options) -> Result<bool, String> {
    let budget = if opts.quick {
        Budget::QUICK
    } else {
        Budget::FULL
    };
    if cfg!(debug_assertions) {
        say("warning: a debug build measures unoptimised code; use `cargo run --release -p aperture -- bench`");
    }
    let out_dir = crate::vm::repo().join("target/bench");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let disk = out_dir.join("survey-disk.img");
    // `aperture backend` is this very binary.
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable to run `aperture backend`: {e}"))?;
    let backend = BackendCommand::aperture(exe);
    let s = survey::run_survey(&disk, budget, opts.auto_threshold, Some(&backend), say)
        .map_err(|e| e.to_string())?;
    print!("{}", table(&s, budget));
    let mut ok = true;
    let mut agree = serde_json::Value::Null;
    if let Some(g) = &opts.guest {
        let (guest_ok, medians) = bench_guest::run(g)?;
        ok &= guest_ok;
        let (text, value) = agreement(&s, &medians);
        print!("{text}");
        agree = value;
    }
    let json_path = opts
        .json
        .clone()
        .unwrap_or_else(|| crate::vm::repo().join(DEFAULT_JSON));
    let svg_path = opts
        .svg
        .clone()
        .unwrap_or_else(|| crate::vm::repo().join(DEFAULT_SVG));
    for p in [&json_path, &svg_path] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let text =
        serde_json::to_string_pretty(&to_json(&s, budget, &agree)).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    plot(&s, &svg_path)?;
    println!(
        "JSON: {}\nplot: {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;
    use survey::modes::ModeStats;
    use survey::run::Measured;

    fn cell(mode: Mode, cpu_ns_per_request: u64, kicks_per_request: u64) -> Cell {
        let requests = 100;
        Cell {
            mode,
            pattern: Pattern::Blk4kRandom,
            placement: IN_PROCESS,
            measured: Measured {
                requests,
                bytes: requests * 4096,
                wall: Duration::from_nanos(requests * cpu_ns_per_request),
                cpu: Duration::from_nanos(requests * cpu_ns_per_request),
                stats: ModeStats {
                    iommu_kicks: requests * kicks_per_request,
                    ..ModeStats::default()
                },
                slice_cpu_ns_per_request: Vec::new(),
                backend: None,
            },
        }
    }

    #[test]
    fn agreement_splits_the_guests_added_time_into_model_work_and_time_per_kick() {
        let s = Survey {
            calibration: survey::Calibration {
                points: Vec::new(),
                crossover: None,
                auto_threshold: 4096,
            },
            cells: vec![
                cell(Mode::None, 1_000, 0),
                cell(Mode::ViommuStrict, 5_000, 6),
            ],
            auto_checks: Vec::new(),
            not_out_of_process: Vec::new(),
        };
        // Guest: 2000 IOPS with the IOMMU (500 us per read), 5000 without (200 us).
        let guest = vec![
            (Config::ApertureStrict, Some(2000.0), None),
            (Config::ApertureOff, Some(5000.0), None),
        ];
        let (text, v) = agreement(&s, &guest);
        let row = &v[0];
        assert_eq!(row["mode"], "viommu-strict");
        assert!((row["model_ratio_to_none"].as_f64().unwrap() - 0.2).abs() < 1e-9);
        assert!((row["guest_ratio_to_none"].as_f64().unwrap() - 0.4).abs() < 1e-9);
        assert!((row["guest_added_us_per_request"].as_f64().unwrap() - 300.0).abs() < 1e-9);
        assert!((row["model_added_us_per_request"].as_f64().unwrap() - 4.0).abs() < 1e-9);
        // (300 - 4) us over 6 kicks.
        let per_kick = row["guest_us_per_kick_beyond_model"].as_f64().unwrap();
        assert!((per_kick - 296.0 / 6.0).abs() < 1e-9, "{per_kick}");
        assert!(text.contains("49.3"), "{text}");
        // Rows without the cells or the guest's figures say so instead of inventing them.
        assert!(v[1]["guest_ratio_to_none"].is_null(), "no lazy boot given");
        assert!(
            v[2]["model_ratio_to_none"].is_null(),
            "no 1 MiB cells given"
        );
    }
}
