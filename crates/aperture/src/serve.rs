//! `aperture serve`: plans the guest's memory, builds the devices the command line asks
//! for, hands both to the device host, and serves until QEMU goes away.
//!
//! The memory plan is one [`mem_layout::Layout`]: RAM as q35 lays it out, lowered below
//! the reserved regions given with `--reserved` (libxl's algorithm, see
//! [`mem_layout::layout`]); the device host turns the same value into QEMU's RAM
//! arguments and each endpoint's PROBE answers.
//!
//! A host's own table can stand in for typing the ranges: with `--dmar`, `--ivrs` or
//! `--iort` and `--host-device HOSTBDF=DEVICE`, every direct region the tables list for
//! host function HOSTBDF (RMRRs, IVMDs, RMRs, read into one [`RdmDatabase`]) becomes a
//! `--reserved` region of the served DEVICE, and takes the same path from there. The
//! shared-region rule applies first: a region the host device shares with other host
//! functions is refused unless every sharer is given with `--host-device` too (strict,
//! the default), or allowed with a "risky" warning when the argument ends in `,relaxed`.

use crate::{DiskArg, IommuArg};
use device_host::endpoints::VhostUserFactory;
use device_host::host::{endpoint_slot, slot_bdf, DeviceHost, EndpointFactory};
use device_host::vhost_user::{DeviceKind, InflightConfig, VhostUserHandle};
use mem_layout::reserved_regions::ResvRegion;
use mem_layout::{Bdf, Layout, LayoutConfig, MemRange, Policy, RdmDatabase, RegionKind};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

/// How long the other functions get to disconnect after the first one did.
const GRACE: Duration = Duration::from_secs(3);

/// One `--reserved START-END@DEVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReservedArg {
    range: MemRange,
    device: String,
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("'{s}' is not an address (0x-prefixed hex or decimal)"))
}

/// Parses `START-END@DEVICE` (END inclusive).
pub(crate) fn parse_reserved(s: &str) -> Result<ReservedArg, String> {
    let (range, device) = s
        .rsplit_once('@')
        .ok_or_else(|| format!("'{s}' has no '@DEVICE' (e.g. 0x90301000-0x90301fff@blk0)"))?;
    let (start, end) = range
        .split_once('-')
        .ok_or_else(|| format!("'{range}' is not START-END"))?;
    let (start, end) = (parse_addr(start)?, parse_addr(end)?);
    let range = MemRange::new(start, end)
        .map_err(|_| format!("'{range}': END {end:#x} is below START {start:#x}"))?;
    if device.is_empty() {
        return Err(format!("'{s}' names no device after '@'"));
    }
    Ok(ReservedArg {
        range,
        device: device.to_string(),
    })
}

/// One `--host-device HOSTBDF=DEVICE[,strict|relaxed]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostDeviceArg {
    host: Bdf,
    device: String,
    policy: Policy,
}

/// Parses `HOSTBDF=DEVICE[,strict|relaxed]`.
pub(crate) fn parse_host_device(s: &str) -> Result<HostDeviceArg, String> {
    let (host, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not HOSTBDF=DEVICE (e.g. 0000:00:14.0=blk0)"))?;
    let host: Bdf = host
        .parse()
        .map_err(|e: mem_layout::types::BdfError| format!("'{s}': {e}"))?;
    let (device, policy) = match rest.split_once(',') {
        Some((d, p)) => (d, p.parse::<Policy>().map_err(|e| format!("'{s}': {e}"))?),
        None => (rest, Policy::Strict),
    };
    if device.is_empty() {
        return Err(format!("'{s}' names no served device after '='"));
    }
    Ok(HostDeviceArg {
        host,
        device: device.to_string(),
        policy,
    })
}

/// The host tables `serve` may read (`--dmar`, `--ivrs`, `--iort`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostTables<'a> {
    pub dmar: Option<&'a Path>,
    pub ivrs: Option<&'a Path>,
    pub iort: Option<&'a Path>,
}

/// The host's region database from the tables given. Errors are bad input, as a
/// sentence naming the flag and file.
fn host_database(t: HostTables<'_>) -> Result<RdmDatabase, String> {
    let mut db = RdmDatabase::new();
    if let Some(p) = t.dmar {
        let table =
            mem_layout::dmar::read(p).map_err(|e| format!("--dmar {}: {e}", p.display()))?;
        let bridges = mem_layout::dmar::SysfsBridges {
            root: std::path::PathBuf::from("/sys/bus/pci/devices"),
        };
        db.add_dmar(&table, &bridges, None)
            .map_err(|e| format!("--dmar {}: {e}", p.display()))?;
    }
    if let Some(p) = t.ivrs {
        let table =
            mem_layout::ivrs::read(p).map_err(|e| format!("--ivrs {}: {e}", p.display()))?;
        db.add_ivrs(&table)
            .map_err(|e| format!("--ivrs {}: {e}", p.display()))?;
    }
    if let Some(p) = t.iort {
        let table =
            mem_layout::iort::read(p).map_err(|e| format!("--iort {}: {e}", p.display()))?;
        db.add_iort(&table)
            .map_err(|e| format!("--iort {}: {e}", p.display()))?;
    }
    Ok(db)
}

/// The `--reserved` regions the `--host-device` arguments stand for: each direct region
/// of each host function, for its served device, after the shared-region rule. Returns
/// the regions and the warnings (relaxed sharing, table findings). Errors are bad input.
fn host_reserved(
    db: &RdmDatabase,
    host_devices: &[HostDeviceArg],
) -> Result<(Vec<ReservedArg>, Vec<String>), String> {
    let mut out = Vec::new();
    let mut warnings: Vec<String> = db.warnings().iter().map(|w| w.message.clone()).collect();
    let given: BTreeSet<Bdf> = host_devices.iter().map(|h| h.host).collect();
    for h in host_devices {
        let arg = format!("--host-device {}={}", h.host, h.device);
        let regions: Vec<_> = db
            .for_device(h.host)
            .filter(|r| r.kind.is_direct())
            .collect();
        if regions.is_empty() {
            return Err(format!(
                "{arg}: the host tables list no reserved region for {}; drop the argument, or check the table and the address",
                h.host
            ));
        }
        for r in regions {
            let others: Vec<Bdf> = r
                .devices
                .iter()
                .filter(|d| !given.contains(*d))
                .copied()
                .collect();
            if !others.is_empty() {
                let others = mem_layout::rdm::device_list(&others);
                match h.policy {
                    Policy::Strict => {
                        return Err(format!(
                            "{arg}: it is disallowed to pass {} through with shared reserved region {} ({}): host devices {others} need it too; give each with --host-device, or end this argument in ,relaxed",
                            h.host, r.range, r.source
                        ))
                    }
                    Policy::Relaxed => warnings.push(format!(
                        "{arg}: it is risky to pass {} through with shared reserved region {} ({}): host devices {others} need it too; passed anyway (relaxed)",
                        h.host, r.range, r.source
                    )),
                }
            }
            out.push(ReservedArg {
                range: r.range,
                device: h.device.clone(),
            });
        }
    }
    Ok((out, warnings))
}

/// What `aperture serve` was asked to do.
pub(crate) struct Options<'a> {
    pub dir: &'a Path,
    pub disks: &'a [DiskArg],
    pub rng: bool,
    pub iommu: IommuArg,
    pub mem: u32,
    pub reserved: &'a [ReservedArg],
    /// Host ACPI tables to read reserved regions from.
    pub host_tables: HostTables<'a>,
    /// Host functions whose regions served devices take (`--host-device`).
    pub host_devices: &'a [HostDeviceArg],
    pub test_fault_sector: Option<u64>,
    /// With `rng`: the socket of the vhost-user back-end that runs it.
    pub rng_vhost_user: Option<&'a Path>,
    /// The poll window's maximum (`--poll-us`).
    pub poll: std::time::Duration,
    /// The poll budget it shares (`--poll-cpus`, `--poll-budget`).
    pub poll_budget: crate::poll_budget::BudgetArgs,
    /// Implicit grants for every vhost-user device (`--inflight copy`).
    pub inflight: Option<InflightConfig>,
    /// The guest is an arm64 virt machine (`--arch arm64`).
    pub arm64: bool,
    /// Pool mode (`--pool SIZE --dtb FILE`).
    pub pool: Option<PoolArg>,
}

/// Pool mode's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PoolArg {
    /// Pool size in bytes.
    pub size: u64,
    /// The machine's dumped device tree.
    pub dtb: std::path::PathBuf,
    /// The device tree compiler.
    pub dtc: std::path::PathBuf,
}

/// Checks the arm64 and pool-mode arguments; errors are bad input, as a sentence.
fn check_arch(o: &Options<'_>) -> Result<(), String> {
    if o.pool.is_some() && !o.arm64 {
        return Err("--pool needs a guest that reads a device tree: --arch arm64".into());
    }
    if !o.arm64 {
        return Ok(());
    }
    if o.iommu != IommuArg::Off {
        return Err(
            "--arch arm64: our virtio-iommu is announced to the guest by an ACPI VIOT table, \
             which a device-tree guest never reads; give --iommu off (and --pool SIZE for \
             pool mode)"
                .into(),
        );
    }
    if !o.reserved.is_empty() || !o.host_devices.is_empty() {
        return Err(
            "--arch arm64: --reserved and --host-device plan q35's memory layout; \
                    not supported on arm64 virt"
                .into(),
        );
    }
    if o.pool.is_some() && o.inflight.is_some() {
        return Err("--pool and --inflight are two different ways of sharing; pick one".into());
    }
    Ok(())
}

/// Pool mode: writes DIR/pool.dtb with the pool at the top of RAM for every served
/// function (endpoint `i` at [`endpoint_slot`]`(i)`), from the one plan of
/// [`crate::dt_pool`]; its RAM must be the layout's. Returns the pool, the blob's path
/// and a guest-RAM address outside the pool ([`PoolPlan`]). Errors are sentences.
pub(crate) fn plan_pool(
    dir: &Path,
    pool: &PoolArg,
    layout: &Layout,
    functions: usize,
) -> Result<PoolPlan, String> {
    let devfns: Vec<u8> = (0..functions)
        .map(|i| {
            endpoint_slot(i)
                .map(|s| s << 3)
                .ok_or_else(|| format!("{functions} devices do not fit on bus 0"))
        })
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = dir.join("pool.dtb");
    let plan =
        crate::dt_pool::write_pool_dtb(&pool.dtc, &pool.dtb, &out, pool.size, None, &devfns)?;
    let ram: u64 = plan.ram.iter().map(|r| r.end - r.start).sum();
    if ram != layout.ram_size {
        return Err(format!(
            "--dtb {} describes {} MiB of RAM but --mem is {} MiB: dump it with -m {}M",
            pool.dtb.display(),
            ram >> 20,
            layout.ram_size >> 20,
            layout.ram_size >> 20
        ));
    }
    let (base, size) = plan.node.reg.ok_or("internal: the pool node has no reg")?;
    eprintln!(
        "aperture serve: pool mode: {} MiB restricted DMA pool at {base:#x} ({}), for {}; \
         each device reaches only it",
        size >> 20,
        plan.node.name,
        devfns
            .iter()
            .map(|d| format!("00:{:02x}.{}", d >> 3, d & 7))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let ram_start = plan.ram.first().map_or(0, |r| r.start);
    Ok(PoolPlan {
        window: device_host::host::PoolWindow {
            base: bounce_pool::Gpa(base),
            size,
        },
        ram_start: bounce_pool::Gpa(ram_start),
        dtb: out,
        // For --test-fault-sector: guest RAM 2 MiB in (where virt loads the kernel),
        // outside the pool, which sits at the top of RAM.
        outside: ram_start + (2 << 20),
    })
}

/// What [`plan_pool`] decided.
pub(crate) struct PoolPlan {
    /// The pool.
    pub(crate) window: device_host::host::PoolWindow,
    /// Where guest RAM starts (virt: 1 GiB).
    pub(crate) ram_start: bounce_pool::Gpa,
    /// The patched device tree.
    pub(crate) dtb: std::path::PathBuf,
    /// A guest-RAM address outside the pool.
    pub(crate) outside: u64,
}

/// A form of implicit grants (`--inflight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InflightForm {
    /// Bounce copies in memory the device host made.
    Copy,
    /// Large buffers through per-request IOTLB windows, the rest bounced.
    Map,
}

/// The guest layout: `mem` MiB of RAM around the `--reserved` regions of the devices
/// named `names` (endpoint `i` is `names[i]`). Errors are bad input, as a sentence.
fn plan_layout(mem: u32, names: &[String], reserved: &[ReservedArg]) -> Result<Layout, String> {
    // Regions by range, each with every device that needs it.
    let mut by_range: BTreeMap<MemRange, BTreeSet<Bdf>> = BTreeMap::new();
    for r in reserved {
        let index = names.iter().position(|n| *n == r.device).ok_or_else(|| {
            format!(
                "--reserved {}@{}: no device '{}' is served (devices: {})",
                r.range,
                r.device,
                r.device,
                names.join(", ")
            )
        })?;
        let slot = endpoint_slot(index).ok_or("too many devices")?;
        by_range.entry(r.range).or_default().insert(slot_bdf(slot));
    }
    let mut db = RdmDatabase::new();
    let mut cfg = LayoutConfig::new(u64::from(mem) << 20);
    for (range, devices) in &by_range {
        let region = ResvRegion {
            range: *range,
            kind: RegionKind::Direct,
        };
        db.add_reserved_regions(&[region], devices, "--reserved")
            .map_err(|e| format!("--reserved: {e}"))?;
        for bdf in devices {
            if !cfg.assigned.iter().any(|(b, _)| b == bdf) {
                cfg.assigned.push((*bdf, None));
            }
        }
    }
    for w in db.warnings() {
        eprintln!("aperture serve: warning: {}: {}", w.range, w.message);
    }
    let layout = mem_layout::plan(&cfg, &db).map_err(|e| format!("--reserved: {e}"))?;
    // Strict (every region's policy here) never leaves a conflict behind; relaxed
    // would, and would be worth saying.
    for c in &layout.conflicts {
        eprintln!("aperture serve: warning: {}", c.message);
    }
    Ok(layout)
}

fn describe(layout: &Layout, names: &[String]) {
    let high = if layout.high_ram_end > mem_layout::layout::FOUR_GIB {
        format!(
            ", high RAM [{:#x}-{:#x}]",
            mem_layout::layout::FOUR_GIB,
            layout.high_ram_end - 1
        )
    } else {
        String::new()
    };
    eprintln!(
        "aperture serve: guest RAM {} MiB: low RAM [0x0-{:#x}]{high}",
        layout.ram_size >> 20,
        layout.low_ram_end - 1
    );
    for r in &layout.regions {
        let devices: Vec<String> = r
            .devices
            .iter()
            .map(|b| {
                let name = (0..names.len())
                    .find(|&i| endpoint_slot(i).map(slot_bdf) == Some(*b))
                    .map_or("?", |i| names[i].as_str());
                format!("{name} ({b})")
            })
            .collect();
        eprintln!(
            "aperture serve: reserved {} for {}: {} (no RAM on it; PROBE lists it as reserved)",
            r.range,
            devices.join(", "),
            r.action.as_str()
        );
    }
}

/// A device run by the vhost-user back-end at `sock` (connected when the host builds
/// it; each answer awaited at most 1 s).
/// With implicit grants, the device's handle arrives on `handles` once it is built, for
/// the statistics printed at exit.
fn vhost_user(
    name: &str,
    sock: &Path,
    kind: DeviceKind,
    inflight: Option<InflightConfig>,
    handles: &mut Vec<(String, mpsc::Receiver<VhostUserHandle>)>,
) -> Result<VhostUserFactory, device_host::endpoints::VhostUserArgError> {
    let f = VhostUserFactory::new(name, sock, kind, device_host::vhost_user::DEFAULT_TIMEOUT)?;
    Ok(match inflight {
        Some(cfg) => {
            let (tx, rx) = mpsc::channel();
            handles.push((name.to_string(), rx));
            f.with_inflight(cfg).with_handle_sender(tx)
        }
        None => f,
    })
}

/// What implicit grants did for one device, and what its back-end could read.
fn report_inflight(name: &str, h: &VhostUserHandle, map: bool) {
    let c = h.counters();
    let s = c.shadow;
    let (form, reach) = if map {
        (
            "map",
            "guest bytes it could reach at once through copies and windows; it holds guest \
             RAM's descriptor, so only a cooperating back-end is confined to them",
        )
    } else {
        (
            "copy",
            "guest bytes the back-end could read at once; it never held guest RAM",
        )
    };
    eprintln!(
        "aperture serve: {name}: implicit grants ({form}): {} requests posted, {} completed, \
         peak exposure {} bytes ({reach}), {} waited for bounce space, {} too large, {} \
         lengths clamped, {} cut off at the deadline",
        s.posted,
        s.completed,
        s.peak_exposed_bytes,
        s.waits,
        s.refused,
        s.clamped,
        c.deadline_cutoffs
    );
}

pub(crate) fn run(o: Options<'_>) -> ExitCode {
    let mode = crate::mode(o.iommu);
    if o.disks.is_empty() && !o.rng {
        eprintln!("aperture serve: nothing to serve: give at least one --disk PATH or --rng");
        return ExitCode::from(2);
    }
    if o.inflight.is_some() && o.rng_vhost_user.is_none() && !o.disks.iter().any(|d| d.vhost_user) {
        eprintln!(
            "aperture serve: --inflight applies to devices run by vhost-user back-ends, and none \
             is given (--disk vhost-user=SOCK or --rng vhost-user=SOCK)"
        );
        return ExitCode::from(2);
    }
    if o.inflight.is_some_and(|c| c.map_threshold.is_some())
        && mode != device_host::host::IommuMode::Off
    {
        eprintln!(
            "aperture serve: --inflight map opens windows onto guest-physical memory and needs \
             --iommu off (behind the virtio-iommu use --inflight copy)"
        );
        return ExitCode::from(2);
    }
    if let Err(e) = check_arch(&o) {
        eprintln!("aperture serve: {e}");
        return ExitCode::from(2);
    }
    let mut names: Vec<String> = (0..o.disks.len()).map(|i| format!("blk{i}")).collect();
    if o.rng {
        names.push("rng".into());
    }
    let mut reserved = o.reserved.to_vec();
    if !o.host_devices.is_empty()
        || o.host_tables.dmar.is_some()
        || o.host_tables.ivrs.is_some()
        || o.host_tables.iort.is_some()
    {
        if o.host_devices.is_empty() {
            eprintln!("aperture serve: --dmar/--ivrs/--iort: no --host-device says which host function's regions to use (e.g. --host-device 0000:00:14.0=blk0)");
            return ExitCode::from(2);
        }
        let from_host =
            host_database(o.host_tables).and_then(|db| host_reserved(&db, o.host_devices));
        match from_host {
            Ok((regions, warnings)) => {
                for w in warnings {
                    eprintln!("aperture serve: warning: {w}");
                }
                reserved.extend(regions);
            }
            Err(e) => {
                eprintln!("aperture serve: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let layout = match plan_layout(o.mem, &names, &reserved) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aperture serve: {e}");
            return ExitCode::from(2);
        }
    };
    let pool = match &o.pool {
        Some(p) => match plan_pool(o.dir, p, &layout, names.len()) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("aperture serve: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let mut endpoints: Vec<Box<dyn EndpointFactory>> = Vec::new();
    let mut handles = Vec::new();
    for (i, d) in o.disks.iter().enumerate() {
        if d.vhost_user {
            match vhost_user(
                &names[i],
                &d.path,
                DeviceKind::Block,
                o.inflight,
                &mut handles,
            ) {
                Ok(f) => endpoints.push(Box::new(f)),
                Err(e) => {
                    eprintln!("aperture serve: --disk vhost-user={e}");
                    return ExitCode::from(2);
                }
            }
            continue;
        }
        match device_host::endpoints::BlockFactory::new(&names[i], &d.path, d.read_only) {
            Ok(f) => {
                let stray = if i == 0 { o.test_fault_sector } else { None };
                // Pool mode aims the test read at guest RAM outside the pool.
                let addr = pool.as_ref().map(|p| p.outside);
                endpoints.push(Box::new(
                    f.with_test_stray_sector(stray).with_test_stray_addr(addr),
                ))
            }
            Err(e) => {
                eprintln!("aperture serve: --disk {}: {e}", d.path.display());
                return ExitCode::from(2);
            }
        }
    }
    if let Some(sock) = o.rng_vhost_user {
        match vhost_user("rng", sock, DeviceKind::Rng, o.inflight, &mut handles) {
            Ok(f) => endpoints.push(Box::new(f)),
            Err(e) => {
                eprintln!("aperture serve: --rng vhost-user={e}");
                return ExitCode::from(2);
            }
        }
    } else if o.rng {
        endpoints.push(Box::new(device_host::endpoints::RngFactory::new("rng")));
    }
    let poll = match o.poll_budget.config("aperture serve", o.poll) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("aperture serve: {e}");
            return ExitCode::from(2);
        }
    };
    let built = match &pool {
        Some(p) => DeviceHost::new_pool(o.dir, &layout, p.ram_start, endpoints, poll, p.window),
        None => DeviceHost::new(o.dir, mode, &layout, endpoints, poll),
    };
    let mut host = match built {
        Ok(h) => h,
        Err(e) => {
            eprintln!("aperture serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(p) = &pool {
        if let Err(e) = host.add_qemu_args(&["-dtb".to_string(), p.dtb.display().to_string()]) {
            eprintln!("aperture serve: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !o.arm64 {
        // q35's split; virt's RAM is one range at 1 GiB (the device tree says where).
        describe(&layout, &names);
    }
    for (name, socket, slot) in host.functions() {
        eprintln!(
            "aperture serve: {name} at 00:{slot:02x}.0 on {}",
            socket.display()
        );
    }
    eprintln!(
        "aperture serve: QEMU arguments in {}",
        o.dir.join("qemu-args").display()
    );
    let results = host.run(GRACE);
    for (name, rx) in &handles {
        if let Ok(h) = rx.try_recv() {
            report_inflight(
                name,
                &h,
                o.inflight.is_some_and(|c| c.map_threshold.is_some()),
            );
        }
    }
    let mut failed = false;
    for (name, r) in results {
        match r {
            Ok(()) => eprintln!("aperture serve: {name}: client disconnected"),
            Err(e) => {
                failed = true;
                eprintln!("aperture serve: {name}: {e}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names() -> Vec<String> {
        vec!["blk0".into(), "rng".into()]
    }

    #[test]
    fn reserved_argument_forms() {
        let r = parse_reserved("0x90301000-0x90301fff@blk0").unwrap();
        assert_eq!((r.range.start(), r.range.end()), (0x9030_1000, 0x9030_1fff));
        assert_eq!(r.device, "blk0");
        assert_eq!(parse_reserved("4096-8191@rng").unwrap().range.start(), 4096);
        for bad in [
            "0x1000-0x1fff",
            "0x1000@blk0",
            "0x2000-0x1000@blk0",
            "0x1000-0xzz@blk0",
            "0x1000-0x1fff@",
        ] {
            assert!(parse_reserved(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn reserved_region_lowers_low_ram_and_keeps_all_ram() {
        let r = [parse_reserved("0x90301000-0x90301fff@blk0").unwrap()];
        let l = plan_layout(2560, &names(), &r).unwrap();
        assert_eq!(l.low_ram_end, 0x9020_0000);
        assert_eq!(l.e820_ram(), 2560 << 20);
        assert_eq!(l.max_ram_below_4g(), Some(0x9020_0000));
        let blk = slot_bdf(endpoint_slot(0).unwrap());
        let rng = slot_bdf(endpoint_slot(1).unwrap());
        assert_eq!(l.reserved_for(blk).len(), 1);
        assert!(l.reserved_for(rng).is_empty());
    }

    #[test]
    fn reserved_for_an_unknown_device_is_refused_naming_it() {
        let r = [parse_reserved("0x90301000-0x90301fff@blk7").unwrap()];
        let e = plan_layout(2560, &names(), &r).unwrap_err();
        assert!(e.contains("'blk7'") && e.contains("blk0, rng"), "{e}");
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../mem-layout/fixtures")
            .join(name)
    }

    #[test]
    fn host_device_argument_forms() {
        let h = parse_host_device("0000:00:14.0=blk0").unwrap();
        assert_eq!(
            (h.host.to_string(), h.device.as_str(), h.policy),
            ("00:14.0".into(), "blk0", Policy::Strict)
        );
        assert_eq!(
            parse_host_device("c4:00.7=rng,relaxed").unwrap().policy,
            Policy::Relaxed
        );
        for bad in ["00:14.0", "zz=blk0", "00:14.0=", "00:14.0=blk0,lenient"] {
            assert!(parse_host_device(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn host_device_regions_become_the_served_devices_reserved_regions() {
        let ivrs = fixture("mechrevo-wujie14-ivrs.bin");
        let db = host_database(HostTables {
            ivrs: Some(&ivrs),
            ..HostTables::default()
        })
        .unwrap();
        let h = [parse_host_device("01:00.0=blk0,relaxed").unwrap()];
        let (regions, warnings) = host_reserved(&db, &h).unwrap();
        assert_eq!(regions.len(), 5);
        assert!(regions.iter().all(|r| r.device == "blk0"));
        let risky = warnings.iter().filter(|w| w.contains("risky")).count();
        assert_eq!(risky, 5, "shared with 4095 host functions: {warnings:?}");
        let aligned = warnings
            .iter()
            .filter(|w| w.contains("not page aligned"))
            .count();
        assert_eq!(aligned, 5, "length 1 rounded up, said once per IVMD");
        let l = plan_layout(2560, &names(), &regions).unwrap();
        let blk = slot_bdf(endpoint_slot(0).unwrap());
        assert_eq!(l.reserved_for(blk).len(), 5);
        assert_eq!(l.low_ram_end, 0x9600_0000);
        assert_eq!(l.e820_ram(), 2560 << 20);
    }

    #[test]
    fn host_device_with_a_shared_rmrr_is_refused_unless_every_sharer_is_given() {
        let dmar = fixture("thinkpad-snb-dmar.bin");
        let db = host_database(HostTables {
            dmar: Some(&dmar),
            ..HostTables::default()
        })
        .unwrap();
        let one = [parse_host_device("00:14.0=blk0").unwrap()];
        let e = host_reserved(&db, &one).unwrap_err();
        for want in ["00:14.0", "00:1a.0, 00:1d.0", "[0xda2f0000-0xda306fff]"] {
            assert!(e.contains(want), "{e} lacks {want}");
        }
        let all = [
            parse_host_device("00:14.0=blk0").unwrap(),
            parse_host_device("00:1a.0=blk0").unwrap(),
            parse_host_device("00:1d.0=rng").unwrap(),
        ];
        let (regions, warnings) = host_reserved(&db, &all).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(regions.len(), 3);
        let l = plan_layout(2560, &names(), &regions).unwrap();
        let rng = slot_bdf(endpoint_slot(1).unwrap());
        assert_eq!(l.reserved_for(rng)[0].range.start(), 0xda2f_0000);
        let none = [parse_host_device("00:1f.0=blk0").unwrap()];
        assert!(host_reserved(&db, &none)
            .unwrap_err()
            .contains("no reserved region"));
    }

    #[test]
    fn reserved_region_under_unmovable_ram_is_refused() {
        // Below the 2 GiB boundary low RAM is not moved: strict refuses the plan.
        let r = [parse_reserved("0x100000-0x100fff@rng").unwrap()];
        let e = plan_layout(512, &names(), &r).unwrap_err();
        assert!(e.contains("0x100000"), "{e}");
    }
}
