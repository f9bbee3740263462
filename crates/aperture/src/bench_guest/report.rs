//! What a run measured, summed up: the machine's other load, medians and spreads, the
//! tables printed and the JSON written.

use super::{mean_us, mean_us_cell, Config, Options, Run, Workload, RANDREAD, SEQREAD, WARMUP_S};
use crate::vm::{self, RAM_MIB};
use std::time::Duration;

/// CPU time so far, in seconds: the whole machine's busy time (`/proc/stat`) and that
/// of this process and its living descendants (QEMU).
#[derive(Clone, Copy, Debug)]
pub(super) struct CpuSample {
    pub(super) machine_busy: f64,
    pub(super) steal: f64,
    pub(super) ours: f64,
}

/// What the rest of the machine did while the guest's workloads ran: the bench shares
/// the machine, and TCG figures move with every CPU another process takes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Interference {
    /// Wall seconds of the window.
    pub(super) window_s: f64,
    /// CPU seconds used by everything but this process and QEMU.
    pub(super) other_cpu_s: f64,
    /// CPU seconds the hypervisor under this machine took away (`steal`).
    pub(super) steal_s: f64,
}

impl Interference {
    pub(super) fn between(a: CpuSample, b: CpuSample, window: Duration) -> Self {
        Self {
            window_s: window.as_secs_f64(),
            other_cpu_s: ((b.machine_busy - a.machine_busy) - (b.ours - a.ours)).max(0.0),
            steal_s: (b.steal - a.steal).max(0.0),
        }
    }

    /// Other processes' CPUs busy on average over the window.
    pub(super) fn load(&self) -> f64 {
        if self.window_s > 0.0 {
            self.other_cpu_s / self.window_s
        } else {
            0.0
        }
    }
}

pub(super) fn cpu_sample() -> Option<CpuSample> {
    let tck = vm::clock_ticks();
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // proc(5): user nice system idle iowait irq softirq steal (guest time is in user).
    let at = |i: usize| cpu.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    let me = std::process::id();
    let own: u64 = std::iter::once(me)
        .chain(vm::descendants(me))
        .filter_map(vm::proc_stat)
        .map(|(_, t)| t)
        .sum();
    Some(CpuSample {
        machine_busy: busy as f64 / tck,
        steal: at(7) as f64 / tck,
        ours: own as f64 / tck,
    })
}

/// Median of `v` (mean of the middle two for an even count); `None` when empty.
pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians of one configuration over its counted runs, and their spread.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Medians {
    pub(super) iops: Option<f64>,
    pub(super) mibps: Option<f64>,
    /// Lowest and highest IOPS of the counted runs.
    pub(super) iops_range: Option<(f64, f64)>,
    /// Lowest and highest MiB/s of the counted runs.
    pub(super) mibps_range: Option<(f64, f64)>,
    /// Other processes' CPUs busy during the workloads ([`Interference::load`]).
    pub(super) other_load: Option<f64>,
    pub(super) counted_runs: usize,
}

/// Lowest and highest of `v`; `None` when empty.
pub(super) fn range(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().min_by(f64::total_cmp)?;
    let hi = v.iter().copied().max_by(f64::total_cmp)?;
    Some((lo, hi))
}

/// One ratio of two configurations' medians.
#[derive(Clone, Debug)]
pub(super) struct Ratio {
    pub(super) what: String,
    pub(super) numerator: Config,
    pub(super) denominator: Config,
    pub(super) iops: Option<f64>,
    pub(super) mibps: Option<f64>,
}

pub(super) struct Summary {
    pub(super) medians: Vec<(Config, Medians)>,
    pub(super) ratios: Vec<Ratio>,
}

pub(super) fn summarise(configs: &[Config], runs: &[Run]) -> Summary {
    let medians: Vec<(Config, Medians)> = configs
        .iter()
        .map(|&c| {
            let good: Vec<&Run> = runs
                .iter()
                .filter(|r| r.config == c && r.problems.is_empty())
                .collect();
            let rates = |f: fn(&Run) -> Option<&Workload>| -> Vec<f64> {
                good.iter().filter_map(|r| f(r)).map(|w| w.rate).collect()
            };
            let (iops, mibps) = (
                rates(|r| r.randread.as_ref()),
                rates(|r| r.seqread.as_ref()),
            );
            (
                c,
                Medians {
                    iops_range: range(&iops),
                    mibps_range: range(&mibps),
                    iops: median(iops),
                    mibps: median(mibps),
                    other_load: median(
                        good.iter()
                            .filter_map(|r| r.others.map(|o| o.load()))
                            .collect(),
                    ),
                    counted_runs: good.len(),
                },
            )
        })
        .collect();
    let get = |c: Config| medians.iter().find(|(m, _)| *m == c).map(|(_, m)| *m);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut ratios = Vec::new();
    let mut pair = |what: &str, n: Config, d: Config| {
        if let (Some(a), Some(b)) = (get(n), get(d)) {
            ratios.push(Ratio {
                what: what.to_string(),
                numerator: n,
                denominator: d,
                iops: ratio(a.iops, b.iops),
                mibps: ratio(a.mibps, b.mibps),
            });
        }
    };
    for c in Config::ALL {
        if let Some(peer) = c.peer() {
            if c.vhost() {
                pair(
                    "out of process (vhost-user, IOTLB) against in process, same mode",
                    c,
                    peer,
                );
            } else {
                pair("against QEMU's peer of the same mode", c, peer);
            }
        }
    }
    pair(
        "cost of isolation: ours with the IOMMU against ours without",
        Config::ApertureStrict,
        Config::ApertureOff,
    );
    Summary { medians, ratios }
}

pub(super) fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.prec$}"))
}

pub(super) fn table(s: &Summary, opts: &Options, stack: &vm::Stack, runs: &[Run]) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "aperture bench: in-guest disk reads, QD1, O_DIRECT (Linux {}, QEMU {} TCG, 1 vCPU, \
{RAM_MIB} MiB RAM, {} MiB disk, {} s per workload after {WARMUP_S} s warm-up, median of {} run{})\n\
  packages: {}, {}",
        stack.kernel_release,
        stack.qemu_version,
        opts.disk_mib,
        opts.seconds,
        opts.runs,
        if opts.runs == 1 { "" } else { "s" },
        stack.kernel_deb,
        stack.qemu_deb,
    );
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "{:<27} {:>16} {:>16}  {:<27} {:>10} {:>11} {:>11}",
        "configuration",
        "randread4k IOPS",
        "seqread1m MiB/s",
        "baseline",
        "IOPS ratio",
        "MiB/s ratio",
        "other load"
    );
    for (c, m) in &s.medians {
        let r = s
            .ratios
            .iter()
            .find(|r| r.numerator == *c && Some(r.denominator) == c.peer());
        let mut name = c.name().to_string();
        if m.counted_runs < opts.runs as usize {
            name.push_str(&format!(" ({}/{} ok)", m.counted_runs, opts.runs));
        }
        let _ = writeln!(
            t,
            "{:<27} {:>16} {:>16}  {:<27} {:>10} {:>11} {:>11}",
            name,
            opt(m.iops, 1),
            opt(m.mibps, 1),
            r.map_or("-".into(), |r| r.denominator.name().to_string()),
            opt(r.and_then(|r| r.iops), 3),
            opt(r.and_then(|r| r.mibps), 3),
            opt(m.other_load, 2),
        );
    }
    for r in s
        .ratios
        .iter()
        .filter(|r| r.numerator.peer() != Some(r.denominator))
    {
        let _ = writeln!(
            t,
            "{:<27} {:>16} {:>16}  {:<27} {:>10} {:>11}   ({})",
            r.numerator.name(),
            "",
            "",
            r.denominator.name(),
            opt(r.iops, 3),
            opt(r.mibps, 3),
            r.what
        );
    }
    let _ = writeln!(
        t,
        "(other load: CPUs that other processes kept busy during the workloads, median; \
this machine has {}. Anything but ~0 skews TCG figures.)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if opts.runs > 1 {
        let _ = writeln!(t);
        let _ = writeln!(t, "spread over the counted runs (lowest - highest):");
        let span =
            |r: Option<(f64, f64)>| r.map_or("-".to_string(), |(a, b)| format!("{a:.1} - {b:.1}"));
        for (c, m) in &s.medians {
            let _ = writeln!(
                t,
                "{:<27} {:>22} IOPS {:>22} MiB/s",
                c.name(),
                span(m.iops_range),
                span(m.mibps_range)
            );
        }
    }
    // What our device host counted, per read request the guest's block layer completed.
    let ours: Vec<&Run> = runs
        .iter()
        .filter(|r| r.config.ours() && r.problems.is_empty())
        .collect();
    if !ours.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "our device host over each timed workload (run 1 of each; /req: per read request the guest completed):"
        );
        let _ = writeln!(
            t,
            "{:<27} {:<11} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>13} {:>13}",
            "configuration",
            "workload",
            "requests",
            "blk kicks",
            "blk polled",
            "blk irqs",
            "MAPs",
            "UNMAPs",
            "IOMMU sync",
            "of which",
            "poller slept",
            "poller no turn"
        );
        let _ = writeln!(
            t,
            "{:<27} {:<11} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>13} {:>13}",
            "", "", "", "/req", "/req", "/req", "/req", "/req", "/req", "kicked", "/req", "/req"
        );
        for r in ours
            .iter()
            .filter(|r| r.index == 1 || ours.iter().all(|o| o.index != 1))
        {
            for (name, w) in [(RANDREAD, &r.randread), (SEQREAD, &r.seqread)] {
                let Some(w) = w else { continue };
                let Some(h) = w.host else { continue };
                let per = |n: u64| per_request(n, w.requests);
                let syncs = h.iommu_kicks + h.iommu_polled;
                let kicked = if syncs > 0 {
                    format!("{:.0}%", 100.0 * h.iommu_kicks as f64 / syncs as f64)
                } else {
                    "-".into()
                };
                let _ = writeln!(
                    t,
                    "{:<27} {:<11} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>13} {:>13}",
                    r.config.name(),
                    name,
                    w.requests,
                    per(h.kicks),
                    per(h.blk_polled),
                    per(h.blk_irqs),
                    per(h.maps),
                    per(h.unmaps),
                    per(syncs),
                    kicked,
                    per(h.poller_sleeps),
                    per(h.poller_refused)
                );
            }
        }
    }
    // Host CPU per GiB read, every configuration.
    let first: Vec<&Run> = runs
        .iter()
        .filter(|r| r.problems.is_empty())
        .filter(|r| r.index == 1 || runs.iter().all(|o| o.config != r.config || o.index != 1))
        .collect();
    if !first.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "host CPU over each timed workload, seconds per GiB read (run 1; ours: this process, \
which serves our devices; QEMU: QEMU and, out of process, the back-end):"
        );
        let _ = writeln!(
            t,
            "{:<27} {:<11} {:>12} {:>12} {:>12}",
            "configuration", "workload", "ours s/GiB", "QEMU s/GiB", "all s/GiB"
        );
        for r in first {
            for (name, w) in [(RANDREAD, &r.randread), (SEQREAD, &r.seqread)] {
                let Some(w) = w else { continue };
                let (Some(c), Some(gib)) = (w.cpu, w.gib(name)) else {
                    continue;
                };
                let _ = writeln!(
                    t,
                    "{:<27} {:<11} {:>12.2} {:>12.2} {:>12.2}",
                    r.config.name(),
                    name,
                    c.ours_s / gib,
                    c.children_s / gib,
                    (c.ours_s + c.children_s) / gib
                );
            }
        }
    }
    // The vhost-user IOTLB traffic of the out-of-process configurations.
    let vhost: Vec<&Run> = runs
        .iter()
        .filter(|r| r.config.vhost() && r.problems.is_empty())
        .filter(|r| r.index == 1 || runs.iter().all(|o| o.config != r.config || o.index != 1))
        .collect();
    if !vhost.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "vhost-user IOTLB messages over each timed workload, counted by our front-end (run 1; /req: per read request; parked/req: UNMAPs that waited for the back-end; us parked: how long each waited, queueing included):"
        );
        let _ = writeln!(
            t,
            "{:<27} {:<11} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9} {:>10} {:>12} {:>9} {:>12} {:>10} {:>10}",
            "configuration",
            "workload",
            "requests",
            "misses",
            "misses/req",
            "updates",
            "updates/req",
            "pushed",
            "pushed/req",
            "invalidates",
            "inval/req",
            "us/inval ack",
            "parked/req",
            "us parked"
        );
        for r in &vhost {
            for (name, w) in [(RANDREAD, &r.randread), (SEQREAD, &r.seqread)] {
                let Some(w) = w else { continue };
                let Some(h) = w.host else { continue };
                let Some(c) = h.iotlb else { continue };
                let per = |n: u64| per_request(n, w.requests);
                let _ = writeln!(
                    t,
                    "{:<27} {:<11} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9} {:>10} {:>12} {:>9} {:>12} {:>10} {:>10}",
                    r.config.name(),
                    name,
                    w.requests,
                    c.misses,
                    per(c.misses),
                    c.updates,
                    per(c.updates),
                    c.pushed,
                    per(c.pushed),
                    c.invalidates,
                    per(c.invalidates),
                    mean_us_cell(c.invalidate_ns, c.invalidates),
                    per(h.parked),
                    mean_us_cell(h.parked_ns, h.parked)
                );
            }
        }
        let _ = writeln!(
            t,
            "the back-end's own count over its whole connection (boot, warm-ups and both workloads; --stats):"
        );
        for r in &vhost {
            let Some(b) = &r.backend_stats else { continue };
            let n = |k: &str| b[k].as_u64().unwrap_or(0);
            let requests: u64 = [&r.randread, &r.seqread]
                .into_iter()
                .flatten()
                .map(|w| w.requests)
                .sum();
            let _ = writeln!(
                t,
                "{:<27} misses {} ({} failed), updates {}, invalidates {}, evictions {}, ring passes found by polling {}, \
poll windows without a turn of the poll budget {}; \
per timed request: {} misses, {} updates, {} invalidates; peak exposure {} KiB ({:.3}% of guest RAM), peak windows {}",
                r.config.name(),
                n("misses"),
                n("miss_failures"),
                n("updates"),
                n("invalidates"),
                n("evictions"),
                n("polled"),
                n("poll_refused"),
                per_request(n("misses"), requests),
                per_request(n("updates"), requests),
                per_request(n("invalidates"), requests),
                n("peak_mapped_bytes") >> 10,
                100.0 * b["peak_share"].as_f64().unwrap_or(0.0),
                n("peak_windows"),
            );
        }
    }
    t
}

/// `n` per request, two decimals; `-` without requests.
pub(super) fn per_request(n: u64, requests: u64) -> String {
    if requests > 0 {
        format!("{:.2}", n as f64 / requests as f64)
    } else {
        "-".into()
    }
}

pub(super) fn workload_json(
    w: &Option<Workload>,
    name: &str,
    rate: &str,
    count: &str,
) -> serde_json::Value {
    match w {
        None => serde_json::Value::Null,
        Some(w) => {
            let mut j = serde_json::json!({
                rate: w.rate,
                count: w.count,
                "seconds": w.seconds,
                "requests": w.requests,
            });
            if let Some(c) = w.cpu {
                let gib = w.gib(name);
                j["host_cpu"] = serde_json::json!({
                    "ours_s": c.ours_s,
                    "qemu_and_backend_s": c.children_s,
                    "ours_s_per_gib": gib.map(|g| c.ours_s / g),
                    "qemu_and_backend_s_per_gib": gib.map(|g| c.children_s / g),
                });
            }
            if let Some(h) = w.host {
                j["device_host"] = serde_json::json!({
                    "blk_kicks": h.kicks,
                    "blk_polled": h.blk_polled,
                    "blk_interrupts": h.blk_irqs,
                    "iommu_kicks": h.iommu_kicks,
                    "iommu_polled": h.iommu_polled,
                    "iommu_syncs": h.iommu_kicks + h.iommu_polled,
                    "iommu_map_requests": h.maps,
                    "iommu_unmap_requests": h.unmaps,
                    "poller_sleeps": h.poller_sleeps,
                    "poller_windows_without_a_turn": h.poller_refused,
                });
                if let Some(c) = h.iotlb {
                    let per = |n: u64| (w.requests > 0).then(|| n as f64 / w.requests as f64);
                    j["vhost_user_iotlb"] = serde_json::json!({
                        "counted_by": "front-end",
                        "misses": c.misses,
                        "updates": c.updates,
                        "pushed": c.pushed,
                        "invalidates": c.invalidates,
                        "misses_per_request": per(c.misses),
                        "updates_per_request": per(c.updates),
                        "pushed_per_request": per(c.pushed),
                        "invalidates_per_request": per(c.invalidates),
                        "invalidate_ack_us": mean_us(c.invalidate_ns, c.invalidates),
                        "parked_requests": h.parked,
                        "parked_per_request": per(h.parked),
                        "parked_us": mean_us(h.parked_ns, h.parked),
                    });
                }
            }
            j
        }
    }
}

pub(super) fn to_json(
    s: &Summary,
    runs: &[Run],
    opts: &Options,
    stack: &vm::Stack,
    date: &str,
) -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    serde_json::json!({
        "benchmark": "guest-disk",
        "date": date,
        "guest_kernel": stack.kernel_release,
        "guest_kernel_deb": stack.kernel_deb,
        "qemu_version": stack.qemu_version,
        "qemu_deb": stack.qemu_deb,
        "aperture_build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "host": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "cpu_model": cpu,
            "kernel": host_kernel,
        },
        "setup": {
            "accel": "tcg",
            "machine": "q35",
            "vcpus": 1,
            "guest_ram_mib": RAM_MIB,
            "disk_mib": opts.disk_mib,
            "disk_read_only": true,
            "seconds_per_workload": opts.seconds,
            "warmup_seconds": WARMUP_S,
            "runs": opts.runs,
            "workloads": {
                RANDREAD: "4 KiB pread, O_DIRECT, QD1, offsets 4 KiB-aligned from xorshift64* seed 1 over the whole disk",
                SEQREAD: "1 MiB pread, O_DIRECT, QD1, sequential from 0, wrapping",
            },
        },
        "configurations": s.medians.iter().map(|(c, m)| serde_json::json!({
            "name": c.name(),
            "description": c.describe(),
            "served_by": if c.vhost() {
                "aperture device host (vfio-user) as vhost-user front-end of aperture backend blk (another process)"
            } else if c.ours() {
                "aperture device host (vfio-user)"
            } else {
                "qemu"
            },
            "out_of_process": c.vhost(),
            "iommu": c.translated(),
            "strict": c.strict(),
            "expected_iommu_group_type": c.group_type(),
            "median": { "randread4k_iops": m.iops, "seqread1m_mibps": m.mibps },
            "min_max": {
                "randread4k_iops": m.iops_range.map(|(a, b)| [a, b]),
                "seqread1m_mibps": m.mibps_range.map(|(a, b)| [a, b]),
            },
            "counted_runs": m.counted_runs,
            "median_other_load_cpus": m.other_load,
        })).collect::<Vec<_>>(),
        "ratios": s.ratios.iter().map(|r| serde_json::json!({
            "numerator": r.numerator.name(),
            "denominator": r.denominator.name(),
            "what": r.what,
            "randread4k_iops": r.iops,
            "seqread1m_mibps": r.mibps,
        })).collect::<Vec<_>>(),
        "runs": runs.iter().map(|r| serde_json::json!({
            "configuration": r.config.name(),
            "run": r.index,
            "counted": r.problems.is_empty(),
            "problems": r.problems,
            "guest_uname_r": r.guest_kernel,
            "iommu_group_type": r.group_type,
            "wall_s": r.wall.as_secs_f64(),
            "interference": r.others.map(|o| serde_json::json!({
                "window_s": o.window_s,
                "other_processes_cpu_s": o.other_cpu_s,
                "steal_s": o.steal_s,
            })),
            RANDREAD: workload_json(&r.randread, RANDREAD, "iops", "ops"),
            SEQREAD: workload_json(&r.seqread, SEQREAD, "mibps", "mib"),
            "backend_stats": r.backend_stats,
            "kernel_append": r.append,
            "qemu_args": r.qemu_args,
        })).collect::<Vec<_>>(),
    })
}
