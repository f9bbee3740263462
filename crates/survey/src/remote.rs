//! The out-of-process placement: the same cells with the device backend in a child
//! process, reached over vhost-user.
//!
//! The backend is `aperture backend blk|rng|net-tx` (`vhost-iotlb`'s session running
//! the same devices as in process: `virtio-devices`' virtio-blk and virtio-rng, and
//! the network patterns' transmit sink [`crate::net::NetTx`]), started by the
//! [`BackendCommand`] the caller names — the `aperture` binary passes its own path. The front-end is
//! `device-host`'s [`VhostUserDevice`], driven as a virtio-pci transport would drive
//! it: features acked, queue 0 activated (memory table, vring set-up), every notify a
//! kick. Guest RAM is file-backed ([`bounce_pool::SplitRam`]: RAM and the pool as two
//! memfds) so its descriptors can go in `SET_MEM_TABLE`:
//!
//! - `none`: the memory table is all of RAM; the backend maps it whole.
//! - `viommu-strict`, `viommu-lazy`: the front-end sits behind our virtio-iommu and
//!   the backend negotiates `VIRTIO_F_IOMMU_PLATFORM` (it is started with
//!   `--require-iommu`): it maps only the windows its IOTLB misses obtain, and every
//!   UNMAP the guest sends reaches it as an INVALIDATE the front-end waits for —
//!   those round trips are part of the cell's cost.
//! - `pool`: the memory table is the pool's memfd alone; the backend cannot map
//!   anything else.
//! - `auto`: as `viommu-strict`, with the pool mapped once through the IOMMU: the
//!   backend's first miss in the pool gets the whole pool as one window and keeps it,
//!   so bounced buffers cost no IOTLB traffic; buffers auto maps cost what
//!   `viommu-strict`'s do.
//!
//! The driver posts on the ring as in process, kicks, then waits for the used ring:
//! a [`SPIN`] of polling, then blocking until the front-end turns the backend's call
//! eventfd into an interrupt ([`virtio_pci::InterruptSink`]).
//!
//! CPU time: the cell's CPU is this process's CPU clock (`CLOCK_PROCESS_CPUTIME_ID`:
//! the driver thread and the front-end's miss and interrupt threads) plus the
//! backend process's CPU clock (`clock_getcpuclockid` on the child), both read at
//! nanosecond resolution while the child runs, so `cpu_ns_per_byte` counts both
//! sides of the path as the in-process cells count their one thread. Exposure is the
//! backend's own figure (`--stats`): the most guest bytes its address space held.

use crate::modes::{Direct, Pool, Sharing, Viommu, POOL_GPA, POOL_SIZE, RAM_SIZE};
use crate::run::{self, Device, Measured, Pattern};
use crate::{Budget, Mode};
use bounce_pool::{map_pool_file, Gpa, SplitRam};
use device_host::vhost_user::{
    DeviceKind, InflightConfig, VhostUserCounters, VhostUserDevice, VhostUserError,
    VhostUserHandle, DEFAULT_TIMEOUT,
};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use virtio_contract::{ActiveQueue, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_iommu::EndpointIommu;
use virtio_pci::InterruptSink;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use crate::error::RemoteError;

/// How long the driver polls the used ring before it sleeps until the interrupt.
pub const SPIN: Duration = Duration::from_micros(10);
/// How long a request may take before the cell fails (the backend hung or died).
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the backend may take to start listening, and to exit after disconnect.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The command that runs a vhost-user backend: `program args... blk|rng|net-tx --socket S
/// --stats F --once [--require-iommu] [--disk D --read-only]`, the command line of
/// `aperture backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl BackendCommand {
    /// `program` with `args` before the device name.
    pub fn new(program: impl Into<PathBuf>, args: impl IntoIterator<Item = OsString>) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().collect(),
        }
    }

    /// `aperture backend`, where `exe` is the `aperture` binary.
    pub fn aperture(exe: impl Into<PathBuf>) -> Self {
        Self::new(exe, [OsString::from("backend")])
    }

    /// The program run.
    pub fn program(&self) -> &Path {
        &self.program
    }
}

/// Why `mode` × `pattern` has no out-of-process cell, or `None` when it has one.
pub fn not_measured(mode: Mode, pattern: Pattern) -> Option<&'static str> {
    match (mode, pattern) {
        (Mode::GrantMap | Mode::GrantPersistent | Mode::GrantCopy, _) => Some(
            "grant tables are modelled in process only: there is no Xen backend domain to run a backend in",
        ),
        (Mode::InflightCopy | Mode::InflightMap, Pattern::Net64 | Pattern::Net1500) => Some(
            "the front-end shadows only virtio-blk and virtio-rng (device types whose requests carry no guest addresses); the network sink is measured in process",
        ),
        _ => None,
    }
}

/// What the backend process did in a cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendFigures {
    /// Its CPU time in the timed part (included in [`Measured::cpu`]).
    pub cpu: Duration,
    /// IOTLB misses the front-end answered in the timed part.
    pub misses: u64,
    /// IOTLB updates it sent in the timed part: pushed when the guest mapped, or
    /// answering a miss.
    pub updates: u64,
    /// IOTLB invalidates the backend acknowledged in the timed part.
    pub invalidates: u64,
    /// Most guest bytes the backend's address space held at once, over the session
    /// (its `--stats` `peak_mapped_bytes`).
    pub peak_mapped_bytes: u64,
    /// Guest bytes its memory table described (`guest_ram_bytes`).
    pub table_bytes: u64,
    /// Most IOTLB windows it held at once.
    pub peak_windows: u64,
    /// Its translation mode: `plain` (memory table mapped whole) or `iotlb`.
    pub mode: String,
    /// The device's own counters over the session (`--stats` `requests`: blk
    /// `ok`/`ioerr`/..., net-tx `frames`/`errors`; none for rng).
    pub device: serde_json::Value,
}

impl BackendFigures {
    /// Checks the device's own counters: it completed all `served` requests of
    /// `pattern` and refused none (blk `ok`/`ioerr`, net-tx `frames`/`errors`; rng
    /// keeps no counters).
    ///
    /// # Errors
    /// The counters are missing or say otherwise.
    pub fn check_served(&self, pattern: Pattern, served: u64) -> Result<(), RemoteError> {
        let (done, failed) = match pattern {
            Pattern::Rng64 => return Ok(()),
            Pattern::Net64 | Pattern::Net1500 => ("frames", "errors"),
            Pattern::Blk4kRandom | Pattern::Blk64k | Pattern::Blk1mSeq => ("ok", "ioerr"),
        };
        let count = |k: &str| self.device.get(k).and_then(serde_json::Value::as_u64);
        match (count(done), count(failed)) {
            (Some(d), Some(0)) if d == served => Ok(()),
            _ => Err(RemoteError::Unserved {
                pattern,
                counters: self.device.clone(),
                served,
            }),
        }
    }
}

/// The interrupt the driver sleeps on: the front-end signals it from its call-eventfd
/// thread once the backend returned a chain.
#[derive(Default)]
struct Wake {
    fired: Mutex<bool>,
    cv: Condvar,
}

impl InterruptSink for Wake {
    fn signal(&self, _vector: u16) {
        *self.fired.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
    }
}

impl Wake {
    /// Sleeps until signalled or `left` passed; clears the signal.
    fn wait(&self, left: Duration) {
        let g = self.fired.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, left, |fired| !*fired)
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }
}

/// Counters at the start of the timed part.
#[derive(Clone, Copy, Debug)]
struct Mark {
    counters: VhostUserCounters,
    backend_cpu: Duration,
}

/// A backend process and the front-end device connected to it.
pub(crate) struct Remote {
    dev: Option<VhostUserDevice>,
    /// Implicit grants: the front-end shadows the ring, so the driver's wait takes the
    /// back-end's completions through it.
    inflight: bool,
    wake: Arc<Wake>,
    child: Child,
    /// The child's process CPU clock.
    clock: libc::clockid_t,
    /// The driver's RAM, to read the used index from.
    guest: GuestMemoryMmap,
    used_idx: GuestAddress,
    seen: u16,
    dir: PathBuf,
    mark: Option<Mark>,
}

/// A fresh directory for one backend's socket, stats and log.
fn work_dir() -> Result<PathBuf, RemoteError> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "aperture-survey-backend-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    match std::fs::create_dir_all(&dir) {
        Ok(()) => Ok(dir),
        Err(source) => Err(RemoteError::WorkDir { path: dir, source }),
    }
}

/// The end of the backend's log, for error messages.
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("backend.log")).unwrap_or_default();
    let t = text.trim();
    let start = t.char_indices().rev().nth(600).map_or(0, |(i, _)| i);
    if t.is_empty() {
        "(the backend wrote nothing)".into()
    } else {
        format!("backend log: {}", &t[start..])
    }
}

impl Remote {
    /// Starts the backend for `go.pattern`, connects the front-end (with implicit
    /// grants when `go.inflight`), puts it behind
    /// `iommu` when given, acks VERSION_1 (and ACCESS_PLATFORM behind the IOMMU) and
    /// activates queue 0 with the ring at `ring = (gpa, device address)` and `table`
    /// as the memory the VMM shares.
    fn start(
        go: &Launch<'_>,
        guest: &GuestMemoryMmap,
        ring: (u64, u64),
        table: &GuestMemoryMmap,
        iommu: Option<EndpointIommu>,
    ) -> Result<Self, RemoteError> {
        let (cmd, pattern, disk, inflight) = (go.cmd, go.pattern, go.disk, go.inflight);
        // The device, and the `aperture backend` subcommand that serves it.
        let (kind, backend) = match pattern {
            Pattern::Blk4kRandom | Pattern::Blk64k | Pattern::Blk1mSeq => {
                (DeviceKind::Block, "blk")
            }
            Pattern::Rng64 => (DeviceKind::Rng, "rng"),
            Pattern::Net64 | Pattern::Net1500 => (crate::net::DEVICE_KIND, "net-tx"),
        };
        let dir = work_dir()?;
        let socket = dir.join("backend.sock");
        let log = match std::fs::File::create(dir.join("backend.log")) {
            Ok(f) => f,
            Err(source) => return Err(RemoteError::Log { dir, source }),
        };
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .arg(backend)
            .arg("--socket")
            .arg(&socket)
            .arg("--stats")
            .arg(dir.join("stats.json"))
            .arg("--once");
        if iommu.is_some() {
            c.arg("--require-iommu");
        }
        if kind == DeviceKind::Block {
            c.arg("--disk").arg(disk).arg("--read-only");
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| {
                let _ = std::fs::remove_dir_all(&dir);
                RemoteError::Spawn {
                    program: cmd.program.clone(),
                    source,
                }
            })?;
        let wake = Arc::new(Wake::default());
        // From here on, dropping `this` kills the child and removes `dir`.
        let mut this = Self {
            dev: None,
            inflight: inflight.is_some(),
            wake,
            child,
            clock: 0,
            guest: guest.clone(),
            used_idx: GuestAddress(ring.0 + crate::ring::USED + 2),
            seen: 0,
            dir,
            mark: None,
        };
        this.clock = run::cpu_clock_of(this.child.id())?;
        let mut dev = this.connect(&socket, kind)?;
        if let Some(cfg) = inflight {
            dev.inflight_copy(cfg).map_err(RemoteError::Inflight)?;
        }
        let behind_iommu = iommu.is_some();
        if let Some(ep) = iommu {
            dev.attach_iommu(ep).map_err(RemoteError::AttachIommu)?;
        }
        let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
        let want = (1 << VIRTIO_F_VERSION_1)
            | if behind_iommu {
                1 << VIRTIO_F_ACCESS_PLATFORM
            } else {
                0
            };
        let offered = d.device_features();
        if offered & want != want {
            return Err(RemoteError::Features { offered, want });
        }
        d.set_acked_features(want);
        let queue = crate::ring::GuestRing::device_queue(ring.1)?;
        d.activate(
            &[ActiveQueue {
                index: 0,
                queue: &queue,
                vector: 0,
            }],
            table,
        )
        .map_err(RemoteError::Activate)?;
        this.dev = Some(dev);
        Ok(this)
    }

    /// Connects to the backend once it listens; fails early if it exits.
    fn connect(&mut self, socket: &Path, kind: DeviceKind) -> Result<VhostUserDevice, RemoteError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RemoteError::ExitedEarly {
                    status,
                    log: log_tail(&self.dir),
                });
            }
            if socket.exists() {
                let irq: Arc<dyn InterruptSink> = Arc::clone(&self.wake) as _;
                match VhostUserDevice::connect(socket, kind, DEFAULT_TIMEOUT, irq) {
                    Ok(d) => return Ok(d),
                    // Bound but not yet listening.
                    Err(VhostUserError::Connect { .. }) => {}
                    Err(source) => {
                        return Err(RemoteError::Connect {
                            source,
                            log: log_tail(&self.dir),
                        })
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(RemoteError::NotListening {
                    socket: socket.to_path_buf(),
                    timeout: START_TIMEOUT,
                    log: log_tail(&self.dir),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn handle(&self) -> Result<VhostUserHandle, RemoteError> {
        self.dev
            .as_ref()
            .map(VhostUserDevice::handle)
            .ok_or(RemoteError::DeviceGone)
    }

    /// The backend process's CPU time so far.
    fn backend_cpu(&self) -> Result<Duration, RemoteError> {
        run::clock_cpu(self.clock).ok_or_else(|| RemoteError::BackendClock {
            pid: self.child.id(),
        })
    }

    /// CPU time of both sides: this process and the backend's.
    pub(crate) fn cpu(&self) -> Result<Duration, RemoteError> {
        Ok(run::process_cpu() + self.backend_cpu()?)
    }

    /// Whether the backend returned a chain since the last call.
    fn used_moved(&mut self) -> Result<bool, RemoteError> {
        // Acquire: the used element the backend wrote before the index is visible.
        let idx: u16 = self
            .guest
            .load(self.used_idx, Ordering::Acquire)
            .map_err(RemoteError::UsedIndex)?;
        let idx = u16::from_le(idx);
        if idx == self.seen {
            return Ok(false);
        }
        self.seen = idx;
        Ok(true)
    }

    /// The driver's notify: kicks the backend, then waits for the used ring — polls
    /// for [`SPIN`], then sleeps until the interrupt.
    pub(crate) fn notify_and_wait(
        &mut self,
        queue: &mut virtio_queue::Queue,
    ) -> Result<(), RemoteError> {
        let Self { dev, guest, .. } = self;
        let dev = dev.as_mut().ok_or(RemoteError::DeviceGone)?;
        VirtioDevice::<GuestMemoryMmap>::process_queue(dev, 0, queue, guest)
            .map_err(RemoteError::Kick)?;
        let spin_end = Instant::now() + SPIN;
        loop {
            if self.take_completions(queue)? {
                return Ok(());
            }
            if Instant::now() >= spin_end {
                break;
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        loop {
            if self.take_completions(queue)? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.handle()?.is_broken() {
                return Err(RemoteError::Incomplete {
                    timeout: COMPLETION_TIMEOUT,
                    broken: self.handle()?.is_broken(),
                    log: log_tail(&self.dir),
                });
            }
            self.wake.wait(left);
        }
    }

    /// Whether the backend's completion reached the driver's ring; with implicit grants
    /// the front-end first takes what the backend used through the shadow (the
    /// transport's pass on a call).
    fn take_completions(&mut self, queue: &mut virtio_queue::Queue) -> Result<bool, RemoteError> {
        if self.inflight {
            let Self { dev, guest, .. } = self;
            let dev = dev.as_mut().ok_or(RemoteError::DeviceGone)?;
            VirtioDevice::<GuestMemoryMmap>::process_queue(dev, 0, queue, guest)
                .map_err(RemoteError::Kick)?;
        }
        self.used_moved()
    }

    /// Marks the start of the timed part.
    pub(crate) fn mark(&mut self) -> Result<(), RemoteError> {
        self.mark = Some(Mark {
            counters: self.handle()?.counters(),
            backend_cpu: self.backend_cpu()?,
        });
        Ok(())
    }

    /// Ends the cell: the figures since [`Remote::mark`], then disconnects, waits for
    /// the backend to exit and reads its exposure figures.
    pub(crate) fn finish(mut self) -> Result<BackendFigures, RemoteError> {
        let mark = self.mark.ok_or(RemoteError::NotMarked)?;
        let now = self.handle()?.counters();
        let cpu = self.backend_cpu()?.saturating_sub(mark.backend_cpu);
        if now.invalidate_failures != 0 || now.refused != 0 {
            return Err(RemoteError::FrontEnd {
                refused: now.refused,
                invalidate_failures: now.invalidate_failures,
            });
        }
        // Disconnect: the backend (`--once`) writes its stats and exits.
        self.dev = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(None) => {
                    return Err(RemoteError::NoExit {
                        timeout: EXIT_TIMEOUT,
                        log: log_tail(&self.dir),
                    });
                }
                Err(e) => return Err(RemoteError::Wait(e)),
            }
        };
        if !status.success() {
            return Err(RemoteError::Exit {
                status,
                log: log_tail(&self.dir),
            });
        }
        let path = self.dir.join("stats.json");
        let text = std::fs::read_to_string(&path).map_err(|source| RemoteError::StatsFile {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| RemoteError::StatsJson {
                path: path.clone(),
                source,
            })?;
        let num = |field: &'static str| {
            v.get(field)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| RemoteError::StatsField {
                    path: path.clone(),
                    field,
                })
        };
        // With implicit grants the backend's memory is the shadow; what it could reach
        // of the guest is the front-end's count of the bytes in flight.
        let peak_mapped_bytes = if self.inflight {
            now.shadow.peak_exposed_bytes
        } else {
            num("peak_mapped_bytes")?
        };
        Ok(BackendFigures {
            cpu,
            misses: now.misses - mark.counters.misses,
            updates: (now.updates + now.pushed) - (mark.counters.updates + mark.counters.pushed),
            invalidates: now.invalidates - mark.counters.invalidates,
            peak_mapped_bytes,
            table_bytes: num("guest_ram_bytes")?,
            peak_windows: num("peak_windows")?,
            mode: v
                .get("mode")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            device: v.get("requests").cloned().unwrap_or_default(),
        })
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.dev = None;
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `mode` over `pattern` with the backend out of process, started by `cmd`, on a
/// fresh guest whose RAM is file-backed.
///
/// # Errors
/// The cell is not measured out of process ([`not_measured`]), the backend could not
/// be started or connected, or a request failed.
pub fn run_one_remote(
    mode: Mode,
    pattern: Pattern,
    disk: &Path,
    budget: Budget,
    auto_threshold: usize,
    cmd: &BackendCommand,
) -> Result<Measured, RemoteError> {
    if let Some(why) = not_measured(mode, pattern) {
        return Err(RemoteError::NotMeasured { mode, pattern, why });
    }
    let ram = SplitRam::new(RAM_SIZE, Gpa(POOL_GPA), POOL_SIZE).map_err(RemoteError::SplitRam)?;
    let mem = ram.memory().clone();
    let go = Launch {
        cmd,
        pattern,
        disk,
        budget,
        inflight: match mode {
            Mode::InflightCopy => Some(InflightConfig::default()),
            Mode::InflightMap => Some(InflightConfig {
                map_threshold: Some(auto_threshold as u64),
                ..InflightConfig::default()
            }),
            _ => None,
        },
    };
    match mode {
        Mode::None => go.run(&mut Direct::with_memory(mem), None, None),
        // No guest change: the driver hands out guest-physical addresses. The copy form
        // sends the backend only the front-end's shadows; the map form guest RAM too,
        // reached through windows.
        Mode::InflightCopy | Mode::InflightMap => go.run(&mut Direct::with_memory(mem), None, None),
        Mode::ViommuStrict | Mode::ViommuLazy => {
            let mut s = Viommu::with_memory(mode == Mode::ViommuLazy, mem)?;
            let ep = s.endpoint();
            go.run(&mut s, None, Some(ep))
        }
        Mode::Pool => {
            // The backend is handed the pool's file and nothing else.
            let pool_file = ram
                .pool_file()
                .try_clone()
                .map_err(RemoteError::PoolMemfd)?;
            let table = map_pool_file(pool_file, Gpa(POOL_GPA), POOL_SIZE)
                .map_err(RemoteError::PoolTable)?;
            go.run(&mut Pool::with_memory(mem)?, Some(&table), None)
        }
        Mode::Auto => {
            // Behind the virtio-iommu like viommu-strict; the pool is one mapping the
            // backend's first miss there fills, and keeps.
            let mut s = Pool::auto_with_memory(auto_threshold, mem)?;
            let ep = s.endpoint().ok_or(RemoteError::NoEndpoint)?;
            go.run(&mut s, None, Some(ep))
        }
        _ => Err(RemoteError::NoRunner { mode }),
    }
}

/// What starting a cell's backend needs besides the mode.
struct Launch<'a> {
    cmd: &'a BackendCommand,
    pattern: Pattern,
    disk: &'a Path,
    budget: Budget,
    /// Implicit grants in front of the backend.
    inflight: Option<InflightConfig>,
}

impl Launch<'_> {
    /// Starts the backend for `s`'s ring, sharing `table` (default: all of `s`'s guest
    /// RAM), behind `iommu` if given, and runs the cell.
    fn run<S: Sharing>(
        &self,
        s: &mut S,
        table: Option<&GuestMemoryMmap>,
        iommu: Option<EndpointIommu>,
    ) -> Result<Measured, RemoteError> {
        let (p, disk) = (self.pattern, self.disk);
        let table = table.unwrap_or(s.guest_memory());
        let r = Remote::start(self, s.guest_memory(), s.ring(), table, iommu)?;
        let (t, n) = (self.budget.per_cell, self.budget.min_requests);
        Ok(run::run_device(
            s,
            Device::Remote(Box::new(r)),
            p,
            disk,
            t,
            n,
        )?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::run::RunError;

    fn figures(device: serde_json::Value) -> BackendFigures {
        BackendFigures {
            cpu: Duration::ZERO,
            misses: 0,
            updates: 0,
            invalidates: 0,
            peak_mapped_bytes: 0,
            table_bytes: 0,
            peak_windows: 0,
            mode: "plain".into(),
            device,
        }
    }

    #[test]
    fn a_cell_counts_only_if_the_backend_served_every_request_and_refused_none() {
        let net = figures(serde_json::json!({"frames": 10, "errors": 0}));
        assert!(net.check_served(Pattern::Net64, 10).is_ok());
        assert!(net.check_served(Pattern::Net1500, 11).is_err(), "one lost");
        let refused = figures(serde_json::json!({"frames": 10, "errors": 1}));
        assert!(refused.check_served(Pattern::Net64, 10).is_err());
        let blk = figures(serde_json::json!({"ok": 5, "ioerr": 0, "unsupp": 0}));
        assert!(blk.check_served(Pattern::Blk64k, 5).is_ok());
        let ioerr = figures(serde_json::json!({"ok": 5, "ioerr": 2}));
        assert!(ioerr.check_served(Pattern::Blk64k, 5).is_err());
        let e = figures(serde_json::Value::Null)
            .check_served(Pattern::Blk4kRandom, 1)
            .unwrap_err();
        assert!(e.to_string().contains("1 requests served"), "{e}");
        // rng keeps no counters.
        assert!(figures(serde_json::Value::Null)
            .check_served(Pattern::Rng64, 3)
            .is_ok());
    }

    #[test]
    fn errors_read_as_sentences_and_keep_their_cause() {
        use std::error::Error as _;
        let e = RemoteError::NotMeasured {
            mode: Mode::GrantCopy,
            pattern: Pattern::Net64,
            why: "no backend",
        };
        assert_eq!(
            e.to_string(),
            "grant-copy net-64 out of process: not measured: no backend"
        );
        let late = |broken| RemoteError::Incomplete {
            timeout: Duration::from_secs(5),
            broken,
            log: "(the backend wrote nothing)".into(),
        };
        assert_eq!(
            late(false).to_string(),
            "the backend did not complete the request within 5s; (the backend wrote nothing)"
        );
        assert!(late(true)
            .to_string()
            .contains("5s (the vhost-user connection broke);"));
        let e = RemoteError::Spawn {
            program: "/nonexistent/aperture".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(e
            .to_string()
            .starts_with("cannot run the backend /nonexistent/aperture: "));
        assert!(e.source().is_some_and(|s| s.is::<std::io::Error>()));
        // A cell's failure inside the out-of-process runner is not wrapped twice.
        let e = RemoteError::from(RunError::Remote(RemoteError::DeviceGone));
        assert!(matches!(e, RemoteError::DeviceGone), "{e:?}");
    }
}
