//! The cost survey: what each way of sharing guest memory with a device backend costs,
//! per device access pattern, measured in one process and one run — and the `auto`
//! mode that uses the answer.
//!
//! Every cell is one [`Mode`] × one [`Pattern`]: the same device backends
//! (`virtio-devices`' virtio-blk and virtio-rng, and a virtio-net-like transmit sink,
//! [`net::NetTx`]) serve requests that a guest-side driver model posts on a split ring
//! ([`ring::GuestRing`]), mapping every buffer the way Linux's DMA layer does in that
//! mode ([`modes`]). Driver, device and backend run on one thread, so the thread's CPU
//! time is the whole cost of the path; the figures compare paths on this machine.
//!
//! Each cell runs in one of two placements: `in-process` as above, and, for the modes
//! and patterns a real out-of-process backend exists for, `out-of-process`: the
//! backend is `aperture backend` in a child process behind the vhost-user front-end,
//! and the cell's CPU is both processes' ([`remote`]).
//!
//! `auto` bounces buffers shorter than a threshold through the pool and maps the rest;
//! [`calibrate`] measures where mapping becomes cheaper than copying one buffer, and
//! [`run_survey`] uses that crossover unless told a threshold.
//!
//! # Errors
//!
//! Every failure is a typed error. There is one enum per layer rather than one for
//! the crate, because the layers fail in different ways and know different things:
//! a mode knows the buffer it refused, a cell knows its pattern, the out-of-process
//! runner knows the backend process. Each enum keeps the error of the crate that
//! failed (virtio-iommu, bounce-pool, grant-table, vhost-user, I/O...) as its
//! `source` rather than a copy of its text, and wraps the layer below with what it
//! adds:
//!
//! - [`ModeError`] ([`modes`]): a sharing mode could not be set up (guest RAM, the
//!   virtio-iommu, the pool, the grant world) or refused to map or unmap a buffer —
//!   with the request, the address and length.
//! - [`RingError`] ([`ring`]): the driver's side of the split ring.
//! - [`RunError`] ([`run`]): a cell — the disk image, the device, a request, or the
//!   check of what the first request moved, with the pattern; it wraps the two above
//!   and, for a backend in another process, [`RemoteError`].
//! - [`RemoteError`] ([`remote`]): the out-of-process placement — a cell that has
//!   none, the backend process (started, connected, waited for, its figures), each
//!   message about the process ending with the tail of its log.
//! - [`SurveyError`] (here): [`run_survey`]'s, naming the cell (mode, pattern,
//!   placement) or the step that failed.
//!
//! `ModeError` and `RemoteError`, the two long ones, are defined in `error.rs` and
//! re-exported by their modules.
//!
//! The messages are sentences for a person; the `aperture` binary prints them.

mod error;
pub mod implicit;
pub mod modes;
pub mod net;
pub mod remote;
pub mod ring;
pub mod run;
pub mod windowed;

use dma_types::DmaDirection;
use implicit::Implicit;
use modes::{Direct, Grant, GrantKind, Pool, Sharing, Viommu};
use remote::BackendCommand;
use run::{run_cell, Measured, Pattern};
use std::path::Path;
use std::time::Duration;

pub use modes::ModeError;
pub use remote::RemoteError;
pub use ring::RingError;
pub use run::RunError;

/// Why [`run_survey`] failed: the step or the cell, and the error below.
#[derive(Debug, thiserror::Error)]
pub enum SurveyError {
    /// The disk image could not be prepared.
    #[error(transparent)]
    Disk(RunError),
    /// The copy/map calibration failed.
    #[error(transparent)]
    Calibration(ModeError),
    /// An in-process cell failed.
    #[error("{} {}: {source}", .mode.name(), .pattern.name())]
    Cell {
        /// The mode.
        mode: Mode,
        /// The pattern.
        pattern: Pattern,
        /// Why.
        #[source]
        source: RunError,
    },
    /// An out-of-process cell failed.
    #[error("{} {} out of process: {source}", .mode.name(), .pattern.name())]
    RemoteCell {
        /// The mode.
        mode: Mode,
        /// The pattern.
        pattern: Pattern,
        /// Why.
        #[source]
        source: RemoteError,
    },
    /// `auto`'s check against the best fixed mode failed.
    #[error("auto check {}: {source}", .pattern.name())]
    AutoCheck {
        /// The pattern.
        pattern: Pattern,
        /// Why.
        #[source]
        source: RunError,
    },
}

/// A sharing mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// No isolation: the backend reaches all guest RAM.
    None,
    /// Our virtio-iommu, UNMAP waited for.
    ViommuStrict,
    /// Our virtio-iommu, UNMAP deferred to the next sync.
    ViommuLazy,
    /// Xen grants, granted and mapped per I/O.
    GrantMap,
    /// Xen persistent grants: a pool granted and mapped once, data copied through it.
    GrantPersistent,
    /// Xen grant copy: granted per I/O, the backend copies instead of mapping.
    GrantCopy,
    /// The restricted pool: every buffer bounced.
    Pool,
    /// Small buffers bounced through the (mapped) pool, large ones mapped strictly.
    Auto,
    /// Implicit grants, copy form: no guest change; a shadow ring copies what is in
    /// flight in and back.
    InflightCopy,
    /// Implicit grants, map form: as `InflightCopy`, buffers from the copy/map
    /// crossover up shown in place through per-request windows.
    InflightMap,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 10] = [
        Mode::None,
        Mode::ViommuStrict,
        Mode::ViommuLazy,
        Mode::GrantMap,
        Mode::GrantPersistent,
        Mode::GrantCopy,
        Mode::Pool,
        Mode::Auto,
        Mode::InflightCopy,
        Mode::InflightMap,
    ];

    /// The name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::ViommuStrict => "viommu-strict",
            Mode::ViommuLazy => "viommu-lazy",
            Mode::GrantMap => "grant-map",
            Mode::GrantPersistent => "grant-persistent",
            Mode::GrantCopy => "grant-copy",
            Mode::Pool => "pool",
            Mode::Auto => "auto",
            Mode::InflightCopy => "inflight-copy",
            Mode::InflightMap => "inflight-map",
        }
    }
}

/// [`Cell::placement`] of a backend on the driver's thread.
pub const IN_PROCESS: &str = "in-process";
/// [`Cell::placement`] of a backend in a child process over vhost-user.
pub const OUT_OF_PROCESS: &str = "out-of-process";

/// One measured cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The mode.
    pub mode: Mode,
    /// The pattern.
    pub pattern: Pattern,
    /// Where the backend ran: [`IN_PROCESS`] or [`OUT_OF_PROCESS`].
    pub placement: &'static str,
    /// What was measured.
    pub measured: Measured,
}

impl Cell {
    /// Payload bytes per second of wall time.
    pub fn throughput(&self) -> f64 {
        self.measured.bytes as f64 / self.measured.wall.as_secs_f64()
    }
    /// CPU nanoseconds per payload byte.
    pub fn cpu_ns_per_byte(&self) -> f64 {
        self.measured.cpu.as_nanos() as f64 / self.measured.bytes as f64
    }
    /// CPU nanoseconds per request.
    pub fn cpu_ns_per_request(&self) -> f64 {
        self.measured.cpu.as_nanos() as f64 / self.measured.requests as f64
    }
    /// Mapping operations (MAP and UNMAP requests) per request.
    pub fn map_ops_per_request(&self) -> f64 {
        self.measured.stats.map_ops as f64 / self.measured.requests as f64
    }
    /// Notifications of the virtio-iommu's request queue per request.
    pub fn iommu_kicks_per_request(&self) -> f64 {
        self.measured.stats.iommu_kicks as f64 / self.measured.requests as f64
    }
    /// Bytes copied per payload byte moved.
    pub fn copy_bytes_per_byte(&self) -> f64 {
        self.measured.stats.copy_bytes as f64 / self.measured.bytes as f64
    }
    /// Lowest and highest CPU ns per request over the cell's slices: its noise.
    pub fn cpu_ns_per_request_range(&self) -> (f64, f64) {
        let v = &self.measured.slice_cpu_ns_per_request;
        let m = self.cpu_ns_per_request();
        (
            v.first().copied().unwrap_or(m),
            v.last().copied().unwrap_or(m),
        )
    }
}

/// How long and how much to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Timed wall time per cell.
    pub per_cell: Duration,
    /// Fewest timed requests per cell.
    pub min_requests: u64,
    /// Timed iterations per size and mode in [`calibrate`].
    pub calibration_iters: u32,
}

impl Budget {
    /// The full survey: 1 s per cell.
    pub const FULL: Budget = Budget {
        per_cell: Duration::from_secs(1),
        min_requests: 256,
        calibration_iters: 400,
    };
    /// `--quick`: a tenth of it.
    pub const QUICK: Budget = Budget {
        per_cell: Duration::from_millis(100),
        min_requests: 32,
        calibration_iters: 40,
    };
}

/// Sizes [`calibrate`] tries: 64 B to 256 KiB, doubling.
pub const CALIBRATION_SIZES: [usize; 13] = [
    64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144,
];

/// Cost of one device-written buffer of one size, mapped and unmapped each way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CalibrationPoint {
    /// Buffer bytes.
    pub size: usize,
    /// Bounced through the pool (copy in, copy back), ns.
    pub bounce_ns: f64,
    /// Mapped strictly through the virtio-iommu (MAP, UNMAP), ns.
    pub map_ns: f64,
    /// Through `auto` with the survey's threshold, ns.
    pub auto_ns: f64,
}

impl CalibrationPoint {
    /// `auto` over the cheaper of bouncing and mapping this buffer.
    pub fn auto_ratio(&self) -> f64 {
        self.auto_ns / self.bounce_ns.min(self.map_ns)
    }
}

/// Where mapping one buffer becomes cheaper than bouncing it, and what `auto` does
/// with that.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Per size in [`CALIBRATION_SIZES`].
    pub points: Vec<CalibrationPoint>,
    /// Smallest size from which a strict mapping costs no more than bouncing, if any.
    pub crossover: Option<usize>,
    /// The threshold `auto` ran with: the one asked for, else the crossover, else
    /// 4 KiB.
    pub auto_threshold: usize,
}

/// Rounds of [`calibrate`]'s timing per size and mode; the fastest counts (the others
/// were disturbed by something else on the machine).
const CALIBRATION_ROUNDS: u32 = 5;

fn time_map_unmap<S: Sharing>(s: &mut S, len: usize, iters: u32) -> Result<f64, ModeError> {
    const BUF: u64 = 0x100_0000;
    for _ in 0..iters.min(64) {
        let m = s.map(BUF, len, DmaDirection::FromDevice)?;
        s.unmap(m)?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..CALIBRATION_ROUNDS {
        // This thread's CPU time: time spent preempted by other work does not count.
        let t0 = run::thread_cpu();
        for _ in 0..iters {
            let m = s.map(BUF, len, DmaDirection::FromDevice)?;
            s.unmap(m)?;
        }
        s.flush()?;
        let spent = run::thread_cpu().saturating_sub(t0);
        best = best.min(spent.as_nanos() as f64 / f64::from(iters));
    }
    Ok(best)
}

/// Measures, per size, one device-written buffer mapped and unmapped by bouncing
/// (copy in, copy back) and by a strict virtio-iommu mapping (MAP, UNMAP), the fastest
/// of five rounds of `iters` each (thread CPU time), and finds the crossover: where
/// `auto` should stop copying. Then measures `auto` the same way, with
/// `auto_threshold` or else the crossover, to show it takes the cheaper way per size.
///
/// # Errors
/// A mode could not be set up or refused a mapping.
pub fn calibrate(iters: u32, auto_threshold: Option<usize>) -> Result<Calibration, ModeError> {
    let mut pool = Pool::new()?;
    let mut viommu = Viommu::new(false)?;
    let mut both = Vec::new();
    for &size in &CALIBRATION_SIZES {
        let p = time_map_unmap(&mut pool, size, iters)?;
        let v = time_map_unmap(&mut viommu, size, iters)?;
        both.push((size, p, v));
    }
    // The first size from which mapping stays at least as cheap for every larger size.
    let crossover = (0..both.len())
        .find(|&i| both[i..].iter().all(|&(_, p, v)| v <= p))
        .map(|i| both[i].0);
    let threshold = auto_threshold.or(crossover).unwrap_or(4096);
    let mut auto = Pool::auto(threshold)?;
    let mut points = Vec::new();
    for (size, bounce_ns, map_ns) in both {
        points.push(CalibrationPoint {
            size,
            bounce_ns,
            map_ns,
            auto_ns: time_map_unmap(&mut auto, size, iters)?,
        });
    }
    Ok(Calibration {
        points,
        crossover,
        auto_threshold: threshold,
    })
}

/// `auto` against the cheaper fixed mode of one pattern, measured in alternating
/// rounds (auto then the other, the other then auto, ...) so that both see the same
/// machine.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoCheck {
    /// The pattern.
    pub pattern: Pattern,
    /// The cheaper of `pool` and `viommu-strict` in the survey's table.
    pub best: Mode,
    /// Per round: auto's CPU per request over the other's.
    pub ratios: Vec<f64>,
    /// The noise of a measurement on this machine now: the larger of the two modes'
    /// own spreads over the rounds (highest over lowest CPU per request, minus 1).
    pub noise: f64,
}

impl AutoCheck {
    /// Rounds [`check_auto`] runs.
    pub const ROUNDS: usize = 7;

    /// Median of the per-round ratios.
    pub fn ratio(&self) -> f64 {
        let mut v = self.ratios.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// auto is no dearer than the best fixed mode, or dearer by less than the noise.
    pub fn ok(&self) -> bool {
        self.ratio() <= 1.0 + self.noise
    }
}

/// Measures `auto` against `best` on `pattern` in [`AutoCheck::ROUNDS`] alternating
/// rounds of `budget.per_cell / 2` each.
///
/// # Errors
/// A cell failed.
pub fn check_auto(
    pattern: Pattern,
    best: Mode,
    disk: &Path,
    budget: Budget,
    auto_threshold: usize,
) -> Result<AutoCheck, RunError> {
    let half = Budget {
        per_cell: budget.per_cell / 2,
        ..budget
    };
    let cost = |m: &Measured| m.cpu.as_nanos() as f64 / m.requests as f64;
    let (mut ratios, mut autos, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..AutoCheck::ROUNDS {
        // Which of the two runs first alternates too, so that neither always meets
        // the machine in the state the other left it in.
        let run = |m: Mode| -> Result<f64, RunError> {
            Ok(cost(&run_one(m, pattern, disk, half, auto_threshold)?))
        };
        let (a, b) = if round % 2 == 0 {
            let a = run(Mode::Auto)?;
            (a, run(best)?)
        } else {
            let b = run(best)?;
            (run(Mode::Auto)?, b)
        };
        ratios.push(a / b);
        autos.push(a);
        others.push(b);
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        hi / lo - 1.0
    };
    Ok(AutoCheck {
        pattern,
        best,
        ratios,
        noise: spread(&autos).max(spread(&others)),
    })
}

/// The whole survey.
#[derive(Clone, Debug, PartialEq)]
pub struct Survey {
    /// The crossover measurement and `auto`'s threshold.
    pub calibration: Calibration,
    /// Every cell, modes × patterns.
    pub cells: Vec<Cell>,
    /// `auto` against the cheaper fixed mode, per pattern.
    pub auto_checks: Vec<AutoCheck>,
    /// Cells with no out-of-process counterpart, and why ([`remote::not_measured`]);
    /// every cell when no backend command was given.
    pub not_out_of_process: Vec<(Mode, Pattern, String)>,
}

impl Survey {
    /// The cell of `mode` × `pattern` in `placement`, if measured.
    pub fn cell(&self, mode: Mode, pattern: Pattern, placement: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.mode == mode && c.pattern == pattern && c.placement == placement)
    }
}

/// Runs one mode over one pattern on a fresh guest.
///
/// # Errors
/// The mode's setup or a request failed.
pub fn run_one(
    mode: Mode,
    pattern: Pattern,
    disk: &Path,
    budget: Budget,
    auto_threshold: usize,
) -> Result<Measured, RunError> {
    let (t, n) = (budget.per_cell, budget.min_requests);
    match mode {
        Mode::None => run_cell(&mut Direct::new()?, pattern, disk, t, n),
        Mode::ViommuStrict => run_cell(&mut Viommu::new(false)?, pattern, disk, t, n),
        Mode::ViommuLazy => run_cell(&mut Viommu::new(true)?, pattern, disk, t, n),
        Mode::GrantMap => run_cell(&mut Grant::new(GrantKind::PerIo)?, pattern, disk, t, n),
        Mode::GrantPersistent => {
            run_cell(&mut Grant::new(GrantKind::Persistent)?, pattern, disk, t, n)
        }
        Mode::GrantCopy => run_cell(&mut Grant::new(GrantKind::Copy)?, pattern, disk, t, n),
        Mode::Pool => run_cell(&mut Pool::new()?, pattern, disk, t, n),
        Mode::Auto => run_cell(&mut Pool::auto(auto_threshold)?, pattern, disk, t, n),
        Mode::InflightCopy => run_cell(&mut Implicit::copy()?, pattern, disk, t, n),
        Mode::InflightMap => run_cell(&mut Implicit::map(auto_threshold)?, pattern, disk, t, n),
    }
}

/// Calibrates, then runs every mode against every pattern in process, then, with
/// `backend` (the command that runs `aperture backend`), every cell that has an
/// out-of-process backend with it out of process. `auto_threshold`: `None` takes the
/// measured crossover (or, without one, 4 KiB).
///
/// # Errors
/// A cell failed, named with its mode, pattern and placement.
pub fn run_survey(
    disk: &Path,
    budget: Budget,
    auto_threshold: Option<usize>,
    backend: Option<&BackendCommand>,
    mut progress: impl FnMut(&str),
) -> Result<Survey, SurveyError> {
    run::prepare_disk(disk).map_err(SurveyError::Disk)?;
    progress("calibrating the copy/map crossover");
    let calibration =
        calibrate(budget.calibration_iters, auto_threshold).map_err(SurveyError::Calibration)?;
    let threshold = calibration.auto_threshold;
    let mut cells = Vec::new();
    for pattern in Pattern::ALL {
        for mode in Mode::ALL {
            progress(&format!("{} {}", mode.name(), pattern.name()));
            let measured = run_one(mode, pattern, disk, budget, threshold).map_err(|source| {
                SurveyError::Cell {
                    mode,
                    pattern,
                    source,
                }
            })?;
            cells.push(Cell {
                mode,
                pattern,
                placement: IN_PROCESS,
                measured,
            });
        }
    }
    let mut not_out_of_process = Vec::new();
    for pattern in Pattern::ALL {
        for mode in Mode::ALL {
            let why = match (remote::not_measured(mode, pattern), backend) {
                (Some(why), _) => why.to_string(),
                (None, None) => "no backend command was given".to_string(),
                (None, Some(cmd)) => {
                    progress(&format!(
                        "{} {} out of process",
                        mode.name(),
                        pattern.name()
                    ));
                    let measured =
                        remote::run_one_remote(mode, pattern, disk, budget, threshold, cmd)
                            .map_err(|source| SurveyError::RemoteCell {
                                mode,
                                pattern,
                                source,
                            })?;
                    cells.push(Cell {
                        mode,
                        pattern,
                        placement: OUT_OF_PROCESS,
                        measured,
                    });
                    continue;
                }
            };
            not_out_of_process.push((mode, pattern, why));
        }
    }
    let mut auto_checks = Vec::new();
    for pattern in Pattern::ALL {
        let cost = |m: Mode| {
            cells
                .iter()
                .find(|c| c.mode == m && c.pattern == pattern && c.placement == IN_PROCESS)
                .map_or(f64::INFINITY, Cell::cpu_ns_per_request)
        };
        let best = if cost(Mode::Pool) <= cost(Mode::ViommuStrict) {
            Mode::Pool
        } else {
            Mode::ViommuStrict
        };
        progress(&format!(
            "auto against {} on {}",
            best.name(),
            pattern.name()
        ));
        auto_checks.push(
            check_auto(pattern, best, disk, budget, threshold)
                .map_err(|source| SurveyError::AutoCheck { pattern, source })?,
        );
    }
    Ok(Survey {
        calibration,
        cells,
        auto_checks,
        not_out_of_process,
    })
}
