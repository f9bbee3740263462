//! `aperture bench`: in-guest disk throughput of our device host against QEMU's own
//! devices, every figure a ratio of two configurations measured in the same run on the
//! same guest.
//!
//! Each configuration is one boot of the same kernel and initramfs (QEMU TCG, q35, one
//! vCPU, 512 MiB of shared-memfd RAM) with the same raw disk image, read-only, as its
//! only disk. Its init (`scripts/bench-init.sh`) runs `diskbench`
//! (`scripts/guest/diskbench.c`, built here with `gcc -static`): 4 KiB random reads and
//! 1 MiB sequential reads, O_DIRECT, queue depth 1, an untimed warm-up before each.
//! For our configurations the host also counts, over each timed part, the doorbells
//! the virtio-blk received (each one a vfio-user REGION_WRITE message) and the MAP and
//! UNMAP requests our virtio-iommu answered. [`crate::vm`] boots the guests.
//!
//! The `aperture-vhost-*` configurations run the same disk out of process: the device
//! host is the vhost-user front-end of `aperture backend blk` (a child process, the
//! same image read-only), both behind our virtio-iommu, so the back-end holds only the
//! IOTLB windows the guest mapped. Each is compared with the in-process configuration
//! of the same mode, and the IOTLB traffic (misses, updates, invalidates) is counted
//! per timed workload at the front-end and over the whole connection by the back-end
//! (its `--stats` JSON).

use crate::backend::IotlbMap;
use crate::vm;
use device_host::endpoints::{BlockFactory, VhostUserFactory};
use device_host::host::{DeviceHost, EndpointFactory, Function, IommuHandle, IommuMode};
use device_host::poll::{PollHandle, Pollable};
use device_host::vhost_user::{
    DeviceKind, InflightConfig, VhostUserHandle, DEFAULT_MAP_THRESHOLD, DEFAULT_TIMEOUT,
};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use virtio_iommu::RequestType;

mod report;
mod tools;

use crate::backend_process::BackendProcess;
use report::{cpu_sample, opt, summarise, table, to_json, Interference, Summary};
use tools::{build_diskbench, utc_now};

/// Untimed seconds before each workload (`diskbench -w`).
const WARMUP_S: u32 = 1;
/// Where the JSON goes unless `--out` says otherwise, relative to the workspace.
pub(crate) const DEFAULT_OUT: &str = "target/bench/guest-disk.json";
/// The marker prefix of `scripts/bench-init.sh` and `diskbench`.
const PREFIX: &str = "APERTURE-BENCH";
/// The two workloads, as diskbench names them.
const RANDREAD: &str = "randread4k";
const SEQREAD: &str = "seqread1m";

/// One way of serving the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Config {
    /// Our device host behind our virtio-iommu, guest booted with iommu.strict=1.
    ApertureStrict,
    /// Our device host behind our virtio-iommu, the guest's default lazy invalidation.
    ApertureLazy,
    /// Our device host without an IOMMU.
    ApertureOff,
    /// Our device host as the vhost-user front-end of `aperture backend blk` in another
    /// process, behind our virtio-iommu (IOTLB), iommu.strict=1.
    ApertureVhostStrict,
    /// As [`Config::ApertureVhostStrict`], the guest's default lazy invalidation.
    ApertureVhostLazy,
    /// As [`Config::ApertureVhostStrict`], the back-end mapping guest RAM whole
    /// (`backend --iotlb-map whole`).
    ApertureVhostWholeStrict,
    /// As [`Config::ApertureVhostLazy`], the back-end mapping guest RAM whole.
    ApertureVhostWholeLazy,
    /// Implicit grants, copy form: `aperture backend blk` in another process given
    /// only the device host's shadow rings and bounce buffers; no IOMMU in the guest.
    ApertureInflightCopy,
    /// Implicit grants, map form: as [`Config::ApertureInflightCopy`], buffers of 64 KiB
    /// and more shown through per-request IOTLB windows instead of copied.
    ApertureInflightMap,
    /// QEMU's virtio-blk-pci behind QEMU's virtio-iommu-pci, iommu.strict=1.
    QemuViommuStrict,
    /// QEMU's virtio-blk-pci behind QEMU's virtio-iommu-pci, lazy.
    QemuViommuLazy,
    /// QEMU's virtio-blk-pci without an IOMMU.
    QemuOff,
}

impl Config {
    /// Every configuration, in table order.
    pub(crate) const ALL: [Config; 12] = [
        Config::ApertureStrict,
        Config::ApertureLazy,
        Config::ApertureOff,
        Config::ApertureVhostStrict,
        Config::ApertureVhostLazy,
        Config::ApertureVhostWholeStrict,
        Config::ApertureVhostWholeLazy,
        Config::ApertureInflightCopy,
        Config::ApertureInflightMap,
        Config::QemuViommuStrict,
        Config::QemuViommuLazy,
        Config::QemuOff,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Config::ApertureStrict => "aperture-strict",
            Config::ApertureLazy => "aperture-lazy",
            Config::ApertureOff => "aperture-off",
            Config::ApertureVhostStrict => "aperture-vhost-strict",
            Config::ApertureVhostLazy => "aperture-vhost-lazy",
            Config::ApertureVhostWholeStrict => "aperture-vhost-whole-strict",
            Config::ApertureVhostWholeLazy => "aperture-vhost-whole-lazy",
            Config::ApertureInflightCopy => "aperture-inflight-copy",
            Config::ApertureInflightMap => "aperture-inflight-map",
            Config::QemuViommuStrict => "qemu-viommu-strict",
            Config::QemuViommuLazy => "qemu-viommu-lazy",
            Config::QemuOff => "qemu-off",
        }
    }

    /// Served by our device host (else by QEMU itself).
    fn ours(self) -> bool {
        matches!(
            self,
            Config::ApertureStrict | Config::ApertureLazy | Config::ApertureOff
        ) || self.vhost()
    }

    /// The disk runs in `aperture backend blk`, a vhost-user back-end process.
    fn vhost(self) -> bool {
        matches!(
            self,
            Config::ApertureVhostStrict
                | Config::ApertureVhostLazy
                | Config::ApertureVhostWholeStrict
                | Config::ApertureVhostWholeLazy
                | Config::ApertureInflightCopy
                | Config::ApertureInflightMap
        )
    }

    /// The disk sits behind a virtio-iommu.
    fn translated(self) -> bool {
        !matches!(
            self,
            Config::ApertureOff
                | Config::QemuOff
                | Config::ApertureInflightCopy
                | Config::ApertureInflightMap
        )
    }

    fn strict(self) -> bool {
        matches!(
            self,
            Config::ApertureStrict
                | Config::QemuViommuStrict
                | Config::ApertureVhostStrict
                | Config::ApertureVhostWholeStrict
        )
    }

    /// The baseline of our ratios: for an in-process configuration QEMU's of the
    /// same mode, for an out-of-process one our in-process one of the same mode.
    fn peer(self) -> Option<Config> {
        match self {
            Config::ApertureStrict => Some(Config::QemuViommuStrict),
            Config::ApertureLazy => Some(Config::QemuViommuLazy),
            Config::ApertureOff => Some(Config::QemuOff),
            Config::ApertureVhostStrict | Config::ApertureVhostWholeStrict => {
                Some(Config::ApertureStrict)
            }
            Config::ApertureVhostLazy | Config::ApertureVhostWholeLazy => {
                Some(Config::ApertureLazy)
            }
            // Isolation with no guest change, against none at all.
            Config::ApertureInflightCopy | Config::ApertureInflightMap => Some(Config::ApertureOff),
            _ => None,
        }
    }

    /// The IOMMU group type the guest must report for the disk (sysfs `type`), so a
    /// run that silently measured another mode is refused.
    fn group_type(self) -> &'static str {
        match (self.translated(), self.strict()) {
            (false, _) => "none",
            (true, true) => "DMA",
            (true, false) => "DMA-FQ",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Config::ApertureStrict => "our virtio-blk and virtio-iommu over vfio-user, iommu.strict=1",
            Config::ApertureLazy => "our virtio-blk and virtio-iommu over vfio-user, lazy (the guest's default)",
            Config::ApertureOff => "our virtio-blk over vfio-user, no IOMMU",
            Config::ApertureVhostStrict => "our device host as vhost-user front-end of `aperture backend blk` (another process, IOTLB) behind our virtio-iommu, iommu.strict=1",
            Config::ApertureVhostLazy => "our device host as vhost-user front-end of `aperture backend blk` (another process, IOTLB) behind our virtio-iommu, lazy",
            Config::ApertureVhostWholeStrict => "as aperture-vhost-strict, the back-end mapping guest RAM whole and checking each access against its IOTLB (--iotlb-map whole)",
            Config::ApertureVhostWholeLazy => "as aperture-vhost-lazy, the back-end mapping guest RAM whole and checking each access against its IOTLB (--iotlb-map whole)",
            Config::ApertureInflightCopy => "implicit grants, copy form: `aperture backend blk` (another process) given only our shadow rings and bounce buffers, no IOMMU in the guest",
            Config::ApertureInflightMap => "implicit grants, map form: as inflight-copy, buffers of 64 KiB and more through per-request IOTLB windows",
            Config::QemuViommuStrict => "QEMU's virtio-blk-pci (iommu_platform=on) behind QEMU's virtio-iommu-pci, iommu.strict=1",
            Config::QemuViommuLazy => "QEMU's virtio-blk-pci (iommu_platform=on) behind QEMU's virtio-iommu-pci, lazy",
            Config::QemuOff => "QEMU's virtio-blk-pci, no IOMMU",
        }
    }
}

/// What the bench was asked to do.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) runs: u32,
    pub(crate) only: Vec<Config>,
    pub(crate) seconds: u32,
    pub(crate) disk_mib: u32,
    pub(crate) out: Option<PathBuf>,
    /// Our device host's poll window maximum.
    pub(crate) poll: Duration,
    /// The out-of-process back-end's.
    pub(crate) backend_poll: Duration,
    /// The poll budget they share.
    pub(crate) poll_budget: crate::poll_budget::BudgetArgs,
}

fn say(msg: &str) {
    eprintln!("aperture bench: {msg}");
}

/// What our device host counted over one timed workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostCounts {
    /// Doorbells (queue notifications) the virtio-blk's transport received.
    kicks: u64,
    /// Times the poller found the virtio-blk's requests without a doorbell.
    blk_polled: u64,
    /// Interrupts the virtio-blk sent.
    blk_irqs: u64,
    /// Doorbells of our virtio-iommu's request queue (each one a guest sync).
    iommu_kicks: u64,
    /// Times the poller found IOMMU requests without a doorbell (a sync each).
    iommu_polled: u64,
    /// MAP requests our virtio-iommu answered.
    maps: u64,
    /// UNMAP requests our virtio-iommu answered.
    unmaps: u64,
    /// Requests our virtio-iommu parked until a back-end acknowledged, and the time
    /// they spent parked, summed (ns).
    parked: u64,
    parked_ns: u64,
    /// The vhost-user front-end's IOTLB traffic (out-of-process configurations only).
    iotlb: Option<IotlbCounts>,
    /// Times our poller went to sleep (its window passed with nothing new); each
    /// next request of the guest then notifies.
    poller_sleeps: u64,
    /// Times its window ended before it got a turn of the poll budget.
    poller_refused: u64,
}

/// IOTLB messages between our front-end and the back-end process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct IotlbCounts {
    /// Misses the back-end sent.
    misses: u64,
    /// Updates sent in answer.
    updates: u64,
    /// Updates pushed when the guest mapped, before any miss.
    pushed: u64,
    /// Invalidates the back-end acknowledged.
    invalidates: u64,
    /// Their round trips, summed (ns).
    invalidate_ns: u64,
}

impl HostCounts {
    fn since(self, before: HostCounts) -> HostCounts {
        HostCounts {
            kicks: self.kicks.saturating_sub(before.kicks),
            blk_polled: self.blk_polled.saturating_sub(before.blk_polled),
            blk_irqs: self.blk_irqs.saturating_sub(before.blk_irqs),
            iommu_kicks: self.iommu_kicks.saturating_sub(before.iommu_kicks),
            iommu_polled: self.iommu_polled.saturating_sub(before.iommu_polled),
            maps: self.maps.saturating_sub(before.maps),
            unmaps: self.unmaps.saturating_sub(before.unmaps),
            parked: self.parked.saturating_sub(before.parked),
            parked_ns: self.parked_ns.saturating_sub(before.parked_ns),
            poller_sleeps: self.poller_sleeps.saturating_sub(before.poller_sleeps),
            poller_refused: self.poller_refused.saturating_sub(before.poller_refused),
            iotlb: self.iotlb.map(|a| {
                let b = before.iotlb.unwrap_or_default();
                IotlbCounts {
                    misses: a.misses.saturating_sub(b.misses),
                    updates: a.updates.saturating_sub(b.updates),
                    pushed: a.pushed.saturating_sub(b.pushed),
                    invalidates: a.invalidates.saturating_sub(b.invalidates),
                    invalidate_ns: a.invalidate_ns.saturating_sub(b.invalidate_ns),
                }
            }),
        }
    }
}

/// The mean in µs of `ns` over `n` events; `None` without events.
fn mean_us(ns: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| ns as f64 / n as f64 / 1e3)
}

/// [`mean_us`] for the tables.
fn mean_us_cell(ns: u64, n: u64) -> String {
    mean_us(ns, n).map_or_else(|| "-".into(), |us| format!("{us:.1}"))
}

/// Reads our device host's counters while the guest runs.
struct Sampler {
    /// The virtio-blk's transport (set when the device host built it).
    blk: BlkTransport,
    iommu: Option<IommuHandle>,
    /// The vhost-user device's handle (out-of-process configurations).
    vhost: Option<VhostUserHandle>,
    poller: PollHandle,
}

impl Sampler {
    fn sample(&self) -> HostCounts {
        let (maps, unmaps, parked, parked_ns) = self.iommu.as_ref().map_or((0, 0, 0, 0), |h| {
            let c = h.counters();
            let sum = |t: RequestType| c.requests[t as usize].iter().sum::<u64>();
            (
                sum(RequestType::Map),
                sum(RequestType::Unmap),
                c.deferred,
                c.parked_ns,
            )
        });
        let iommu = self
            .iommu
            .as_ref()
            .map(IommuHandle::transport_counters)
            .unwrap_or_default();
        let blk = self
            .blk
            .get()
            .and_then(Weak::upgrade)
            .map(|t| t.counters())
            .unwrap_or_default();
        let poller = self.poller.counters();
        HostCounts {
            poller_sleeps: poller.sleeps,
            poller_refused: poller.refused,
            kicks: blk.notifications,
            blk_polled: blk.polled,
            blk_irqs: blk.interrupts,
            iommu_kicks: iommu.notifications,
            iommu_polled: iommu.polled,
            maps,
            unmaps,
            parked,
            parked_ns,
            iotlb: self.vhost.as_ref().map(|h| {
                let c = h.counters();
                IotlbCounts {
                    misses: c.misses,
                    updates: c.updates,
                    pushed: c.pushed,
                    invalidates: c.invalidates,
                    invalidate_ns: c.invalidate_ns,
                }
            }),
        }
    }
}

/// Where [`Counted`] leaves the transport of the device it built; weak, so that the
/// transport (and a vhost-user connection in it) goes when the device host ends.
type BlkTransport = Arc<OnceLock<Weak<dyn Pollable>>>;

/// An endpoint whose transport is kept, for its counters (doorbells, polls,
/// interrupts).
struct Counted {
    inner: Box<dyn EndpointFactory>,
    transport: BlkTransport,
}

impl EndpointFactory for Counted {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn build(
        self: Box<Self>,
        iommu: Option<virtio_iommu::EndpointIommu>,
    ) -> Result<Function, device_host::host::BuildError> {
        let f = self.inner.build(iommu)?;
        let _ = self.transport.set(Arc::downgrade(&f.transport));
        Ok(f)
    }
}

/// One workload's result in one boot.
#[derive(Clone, Debug, PartialEq)]
struct Workload {
    /// IOPS (randread4k) or MiB/s (seqread1m).
    rate: f64,
    /// Reads done: operations (randread4k) or MiB (seqread1m).
    count: u64,
    /// Timed seconds, measured by the guest.
    seconds: f64,
    /// Read requests the guest's block layer completed on the device.
    requests: u64,
    /// Our device host's counts (our configurations only).
    host: Option<HostCounts>,
    /// Host CPU over the workload.
    cpu: Option<vm::CpuTimes>,
}

impl Workload {
    /// GiB the workload read: 4 KiB per operation, or its MiB.
    fn gib(&self, name: &str) -> Option<f64> {
        let bytes = match name {
            RANDREAD => self.count as f64 * 4096.0,
            SEQREAD => self.count as f64 * 1048576.0,
            _ => return None,
        };
        (bytes > 0.0).then(|| bytes / f64::from(1u32 << 30))
    }
}

/// `key=value` fields of a marker.
fn fields(v: &str) -> BTreeMap<&str, &str> {
    v.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// Parses diskbench's result line for a workload.
fn parse_workload(value: &str, rate: &str, count: &str) -> Result<Workload, String> {
    let f = fields(value);
    let get = |k: &str| {
        f.get(k)
            .ok_or(format!("no {k}= in '{value}'"))
            .and_then(|s| s.parse::<f64>().map_err(|e| format!("{k}={s}: {e}")))
    };
    let int = |k: &str| {
        f.get(k)
            .ok_or(format!("no {k}= in '{value}'"))
            .and_then(|s| s.parse::<u64>().map_err(|e| format!("{k}={s}: {e}")))
    };
    Ok(Workload {
        rate: get(rate)?,
        count: int(count)?,
        seconds: get("seconds")?,
        requests: int("requests")?,
        host: None,
        cpu: None,
    })
}

/// One boot of one configuration.
struct Run {
    config: Config,
    /// 1-based repetition.
    index: u32,
    randread: Option<Workload>,
    seqread: Option<Workload>,
    group_type: String,
    /// `uname -r` as the guest printed it.
    guest_kernel: String,
    wall: Duration,
    /// Other processes' CPU use over the timed workloads.
    others: Option<Interference>,
    append: String,
    qemu_args: Vec<String>,
    console: PathBuf,
    /// Why the run does not count (empty: it does).
    problems: Vec<String>,
    /// `aperture backend blk --stats` after the run (out-of-process configurations).
    backend_stats: Option<serde_json::Value>,
}

/// What every boot shares.
struct Prepared {
    qemu: String,
    kernel: String,
    initrd: PathBuf,
    disk: PathBuf,
    work: PathBuf,
}

/// Medians the guest measured per configuration: (4 KiB random-read IOPS, 1 MiB
/// sequential-read MiB/s).
pub(crate) type GuestMedians = Vec<(Config, Option<f64>, Option<f64>)>;

/// Runs the in-guest comparison, prints its table and writes its JSON. Returns whether
/// every boot counted, and the medians.
///
/// # Errors
/// A sentence naming what could not be prepared or run.
pub(crate) fn run(opts: &Options) -> Result<(bool, GuestMedians), String> {
    let (ok, summary) = run_inner(opts)?;
    let medians = summary
        .medians
        .iter()
        .map(|(c, m)| (*c, m.iops, m.mibps))
        .collect();
    Ok((ok, medians))
}

fn run_inner(opts: &Options) -> Result<(bool, Summary), String> {
    let configs: Vec<Config> = if opts.only.is_empty() {
        Config::ALL.to_vec()
    } else {
        Config::ALL
            .into_iter()
            .filter(|c| opts.only.contains(c))
            .collect()
    };
    if cfg!(debug_assertions) {
        say(
            "warning: this is a debug build, so our device host runs unoptimised against QEMU's \
             optimised devices; use `cargo run --release -p aperture -- bench`",
        );
    }
    say("provisioning QEMU and the Debian guest kernel; cached after the first run");
    let stack = vm::provision()?;
    let diskbench = build_diskbench()?;

    let work = std::env::temp_dir().join(format!("aperture-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let initrd = work.join("initramfs.cpio.gz");
    let init = vm::repo().join("scripts/bench-init.sh");
    vm::script(
        "mkinitramfs.sh",
        &[
            &initrd.to_string_lossy(),
            "--init",
            &init.to_string_lossy(),
            "--add",
            &diskbench.to_string_lossy(),
            "/bin/diskbench",
        ],
    )?;
    say(&format!("making a {} MiB disk image", opts.disk_mib));
    let disk = work.join("disk.img");
    vm::make_disk(&disk, opts.disk_mib, opts.disk_mib)?;
    let prepared = Prepared {
        qemu: stack.qemu.clone(),
        kernel: stack.kernel.clone(),
        initrd,
        disk,
        work: work.clone(),
    };

    let date = utc_now();
    let total = configs.len() as u32 * opts.runs;
    let mut runs = Vec::new();
    // Repetitions go round the configurations, so slow drift spreads over all of them.
    for index in 1..=opts.runs {
        for &config in &configs {
            say(&format!(
                "[{}/{total}] {} (run {index} of {}): booting",
                runs.len() + 1,
                config.name(),
                opts.runs
            ));
            let r = run_one(&prepared, config, index, opts)?;
            let fmt = |w: &Option<Workload>, unit: &str| {
                w.as_ref()
                    .map_or("-".to_string(), |w| format!("{:.1} {unit}", w.rate))
            };
            if r.problems.is_empty() {
                say(&format!(
                    "    {} 4k random reads, {} 1M sequential reads ({:.0} s; other load {})",
                    fmt(&r.randread, "IOPS"),
                    fmt(&r.seqread, "MiB/s"),
                    r.wall.as_secs_f64(),
                    opt(r.others.map(|o| o.load()), 2)
                ));
            } else {
                say(&format!(
                    "    does not count: {}; console {}",
                    r.problems.join("; "),
                    r.console.display()
                ));
            }
            runs.push(r);
        }
    }

    let summary = summarise(&configs, &runs);
    print!("{}", table(&summary, opts, &stack, &runs));
    let json = to_json(&summary, &runs, opts, &stack, &date);
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| vm::repo().join(DEFAULT_OUT));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&out, text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!(
        "JSON: {}",
        std::fs::canonicalize(&out).unwrap_or(out).display()
    );
    let failed = runs.iter().filter(|r| !r.problems.is_empty()).count();
    if failed == 0 {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        say(&format!(
            "{failed} of {} boots did not count; their consoles are in {}",
            runs.len(),
            work.display()
        ));
    }
    Ok((failed == 0, summary))
}

/// The guest's kernel command line for `config`.
fn append(config: Config, seconds: u32) -> String {
    // The guest's watchdog ends a hung run well after its workloads should be done.
    let watchdog = 300 + 4 * (seconds + WARMUP_S);
    let mut a = format!(
        "console=ttyS0 panic=-1 loglevel=4 aperture.seconds={seconds} aperture.warmup={WARMUP_S} aperture.watchdog={watchdog}"
    );
    if config.strict() {
        a.push_str(" iommu.strict=1");
    }
    a
}

/// QEMU's own devices for `config`: the same image, read-only, in the slots our device
/// host would use (0x10 the IOMMU, 0x11 the disk). `boot-bypass=off` matches our
/// `IommuMode::On`. The drive keeps QEMU's defaults (cache=writeback, aio=threads):
/// both sides read through the host's page cache.
fn qemu_device_args(config: Config, disk: &Path) -> Result<Vec<String>, String> {
    // Guest RAM exactly as our device host gives it, so only the devices differ.
    let mut a = device_host::host::memory_args(&vm::ram_layout()?);
    a.push("-drive".into());
    a.push(format!(
        "file={},format=raw,if=none,id=disk0,readonly=on",
        disk.display()
    ));
    if config.translated() {
        a.push("-device".into());
        a.push("virtio-iommu-pci,addr=0x10,boot-bypass=off".into());
        a.push("-device".into());
        a.push("virtio-blk-pci,drive=disk0,addr=0x11,iommu_platform=on,disable-legacy=on".into());
    } else {
        a.push("-device".into());
        a.push("virtio-blk-pci,drive=disk0,addr=0x11,disable-legacy=on".into());
    }
    Ok(a)
}

fn run_one(p: &Prepared, config: Config, index: u32, opts: &Options) -> Result<Run, String> {
    let dir = p.work.join(format!("{}-{index}", config.name()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let append = append(config, opts.seconds);
    let mut args = vm::base_args(&p.kernel, &p.initrd, &append);
    let mut problems = Vec::new();

    let mut sampler = None;
    let mut served = None;
    let mut backend = None;
    let mut vhost = None;
    if config.ours() {
        let blk: Box<dyn EndpointFactory> = if config.vhost() {
            let poll = opts.backend_poll.as_micros().to_string();
            let budget = opts.poll_budget.to_args();
            let map = match config {
                Config::ApertureVhostWholeStrict | Config::ApertureVhostWholeLazy => {
                    IotlbMap::Whole
                }
                _ => IotlbMap::Windows,
            }
            .arg();
            let args = [
                "blk",
                "--read-only",
                "--poll-us",
                &poll,
                "--iotlb-map",
                map,
                "--disk",
            ]
            .map(OsStr::new)
            .into_iter()
            .chain([p.disk.as_os_str()])
            .chain(budget.iter().map(OsStr::new))
            .collect::<Vec<_>>();
            let b = BackendProcess::spawn(&dir, "blk", &args)?;
            let (tx, rx) = std::sync::mpsc::channel();
            vhost = Some(rx);
            let mut f =
                VhostUserFactory::new("blk0", &b.socket, DeviceKind::Block, DEFAULT_TIMEOUT)
                    .map_err(|e| format!("aperture backend blk: {e}"))?
                    .with_handle_sender(tx);
            match config {
                Config::ApertureInflightCopy => f = f.with_inflight(InflightConfig::default()),
                Config::ApertureInflightMap => {
                    f = f.with_inflight(InflightConfig {
                        map_threshold: Some(DEFAULT_MAP_THRESHOLD),
                        ..InflightConfig::default()
                    })
                }
                _ => {}
            }
            backend = Some(b);
            Box::new(f)
        } else {
            Box::new(BlockFactory::new("blk0", &p.disk, true).map_err(|e| e.to_string())?)
        };
        let blk_transport = BlkTransport::default();
        let endpoints: Vec<Box<dyn EndpointFactory>> = vec![Box::new(Counted {
            inner: blk,
            transport: Arc::clone(&blk_transport),
        })];
        let mode = if config.translated() {
            IommuMode::On
        } else {
            IommuMode::Off
        };
        let host = DeviceHost::new(
            &dir.join("serve"),
            mode,
            &vm::ram_layout()?,
            endpoints,
            opts.poll_budget.config("aperture bench", opts.poll)?,
        )
        .map_err(|e| e.to_string())?;
        sampler = Some(Sampler {
            blk: blk_transport,
            iommu: host.iommu(),
            // The device was built (and its handle sent) by DeviceHost::new.
            vhost: vhost.and_then(|rx| rx.try_recv().ok()),
            poller: host.poller(),
        });
        args.extend(host.qemu_args().iter().cloned());
        served = Some(std::thread::spawn(move || host.run(Duration::from_secs(3))));
    } else {
        args.extend(qemu_device_args(config, &p.disk)?);
    }

    // Host counters at each workload's "begin" and at its result line.
    let mut begun: BTreeMap<String, HostCounts> = BTreeMap::new();
    let mut counted: BTreeMap<String, HostCounts> = BTreeMap::new();
    // Host CPU at each workload's "begin", then over it.
    let mut cpu_begun: BTreeMap<String, vm::CpuTimes> = BTreeMap::new();
    let mut cpu_used: BTreeMap<String, vm::CpuTimes> = BTreeMap::new();
    let console = dir.join("console.log");
    let timeout = Duration::from_secs(u64::from(600 + 4 * (opts.seconds + WARMUP_S)));
    // The machine's CPU use from the first workload's start to the last one's end.
    let (mut cpu_start, mut others) = (None, None);
    let guest = vm::boot(
        &p.qemu,
        &args,
        &console,
        PREFIX,
        timeout,
        |k, v, elapsed| {
            if k == "begin" && v == RANDREAD {
                cpu_start = cpu_sample().map(|c| (c, elapsed));
            } else if k == SEQREAD {
                if let (Some((a, t0)), Some(b)) = (cpu_start, cpu_sample()) {
                    others = Some(Interference::between(a, b, elapsed.saturating_sub(t0)));
                }
            }
            if k == "begin" {
                if let Some(c) = vm::CpuTimes::now() {
                    cpu_begun.insert(v.to_string(), c);
                }
            } else if let (Some(before), Some(c)) = (cpu_begun.get(k), vm::CpuTimes::now()) {
                cpu_used.insert(k.to_string(), c.since(*before));
            }
            let Some(s) = &sampler else { return };
            if k == "begin" {
                begun.insert(v.to_string(), s.sample());
            } else if let Some(before) = begun.get(k) {
                counted.insert(k.to_string(), s.sample().since(*before));
            }
        },
    )?;
    if let Some(served) = served {
        match served.join() {
            Ok(results) => {
                for (name, r) in results {
                    if let Err(e) = r {
                        problems.push(format!("device host: {name}: {e}"));
                    }
                }
            }
            Err(_) => problems.push("the device host panicked".into()),
        }
    }
    // The back-end exits once the front-end disconnected (--once) and leaves its stats.
    // The copy form's back-end holds plain shadow memory; every other one translates.
    let mode = if config == Config::ApertureInflightCopy {
        "plain"
    } else {
        "iotlb"
    };
    let backend_stats = match backend.take().map(|b| b.finish(mode)) {
        None => None,
        Some(Ok(stats)) => Some(stats),
        Some(Err(e)) => {
            problems.push(e);
            None
        }
    };

    if !guest.status.success() {
        problems.push(format!("QEMU: {}", guest.status));
    }
    for e in guest.markers.get("error").into_iter().flatten() {
        problems.push(format!("diskbench: {e}"));
    }
    if guest.markers.contains_key("watchdog-expired") {
        problems.push("the guest's watchdog expired".into());
    }
    if !guest.markers.contains_key("done") {
        problems.push("the guest's init did not finish".into());
    }
    let exit = guest.first("diskbench-exit");
    if exit != "0" {
        problems.push(format!("diskbench exit status '{exit}'"));
    }
    let group_type = guest.first("iommu-group-type");
    if group_type != config.group_type() {
        problems.push(format!(
            "the disk's IOMMU group type is '{group_type}', not '{}'",
            config.group_type()
        ));
    }
    if config.translated() && guest.first("dmesg-viommu") != "ok" {
        problems.push("the guest's virtio-iommu driver did not probe".into());
    }
    let mut workload = |name: &str, rate: &str, count: &str| {
        let line = guest.first(name);
        if line.is_empty() {
            problems.push(format!("no {name} result"));
            return None;
        }
        match parse_workload(&line, rate, count) {
            Ok(mut w) => {
                w.host = counted.get(name).copied();
                w.cpu = cpu_used.get(name).copied();
                Some(w)
            }
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        }
    };
    let randread = workload(RANDREAD, "iops", "ops");
    let seqread = workload(SEQREAD, "mibps", "mib");
    Ok(Run {
        config,
        index,
        randread,
        seqread,
        group_type,
        guest_kernel: guest.first("start"),
        wall: guest.wall,
        others,
        append,
        qemu_args: args,
        console,
        problems,
        backend_stats,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::report::{median, per_request};
    use super::tools::rfc3339;
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn diskbench_lines_parse() {
        let w = parse_workload(
            "iops=1234.5 ops=12345 seconds=10.001 requests=12346",
            "iops",
            "ops",
        )
        .unwrap();
        assert_eq!((w.rate, w.count, w.requests), (1234.5, 12345, 12346));
        assert!(parse_workload("iops=x ops=1 seconds=1 requests=1", "iops", "ops").is_err());
        assert!(parse_workload("ops=1 seconds=1 requests=1", "iops", "ops").is_err());
    }

    #[test]
    fn medians_and_baselines() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        for c in Config::ALL {
            assert_eq!(c.peer().is_some(), c.ours(), "{c:?}");
            if let Some(p) = c.peer() {
                assert_eq!((p.translated(), p.strict()), (c.translated(), c.strict()));
                // Out of process is measured against ours in process, the rest
                // against QEMU.
                assert_eq!(p.ours(), c.vhost(), "{c:?}");
                assert!(!p.vhost());
            }
        }
        assert!(Config::ApertureVhostStrict.translated() && Config::ApertureVhostLazy.translated());
        assert_eq!(Config::ApertureVhostStrict.group_type(), "DMA");
        assert_eq!(Config::ApertureVhostLazy.group_type(), "DMA-FQ");
        assert_eq!(Config::ApertureVhostWholeStrict.group_type(), "DMA");
        assert_eq!(Config::ApertureVhostWholeLazy.group_type(), "DMA-FQ");
    }

    #[test]
    fn iotlb_counts_are_taken_over_the_workload_only() {
        let at = |misses, updates, invalidates| HostCounts {
            iotlb: Some(IotlbCounts {
                misses,
                updates,
                pushed: updates,
                invalidates,
                invalidate_ns: invalidates,
            }),
            ..HostCounts::default()
        };
        let d = at(130, 130, 120).since(at(30, 30, 20)).iotlb.unwrap();
        assert_eq!(
            (d.misses, d.updates, d.pushed, d.invalidates),
            (100, 100, 100, 100)
        );
        assert_eq!(HostCounts::default().since(at(1, 1, 1)).iotlb, None);
        assert_eq!(per_request(150, 100), "1.50");
        assert_eq!(per_request(3, 0), "-");
    }
}
