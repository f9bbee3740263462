//! `aperture layout`: plans a q35 guest's memory around the reserved device memory of
//! the devices to assign, and prints the plan — the e820, each reserved region with its
//! devices and what was done with it, and every conflict — as a table or as JSON.
//!
//! Input comes from the host's ACPI tables — Intel's DMAR (`--dmar`), AMD's IVRS
//! (`--ivrs`), Arm's IORT (`--iort`) — and Linux's per-group `reserved_regions` files
//! (`--reserved-regions`), all into one region database; the planning is
//! [`mem_layout::plan`], so this file only reads, converts and prints. Exit status: 0
//! planned, 1 a strict conflict makes the plan impossible, 2 bad input.

use mem_layout::dmar::{self, SysfsBridges};
use mem_layout::layout::{Conflict, E820Entry, LayoutError, PlannedRegion};
use mem_layout::reserved_regions;
use mem_layout::{plan, Bdf, LayoutConfig, Policy, RdmDatabase, Strategy};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `aperture layout`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM: bytes, or with a K, M, G or T suffix (binary units), e.g. 8G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    ram: u64,
    /// The host's ACPI DMAR table, e.g. /sys/firmware/acpi/tables/DMAR (root only).
    #[arg(long, value_name = "FILE")]
    dmar: Option<PathBuf>,
    /// The host's ACPI IVRS table (AMD), e.g. /sys/firmware/acpi/tables/IVRS: its IVMD
    /// unity and exclusion ranges.
    #[arg(long, value_name = "FILE")]
    ivrs: Option<PathBuf>,
    /// The host's ACPI IORT table (Arm), e.g. /sys/firmware/acpi/tables/IORT: its RMR
    /// nodes, followed to PCI functions and named components.
    #[arg(long, value_name = "FILE")]
    iort: Option<PathBuf>,
    /// A Linux /sys/kernel/iommu_groups/N/reserved_regions file; its devices are read
    /// from devices/ beside it, or given after @ (FILE@00:14.0,00:1a.0).
    #[arg(long = "reserved-regions", value_name = "FILE[@BDF,...]")]
    reserved_regions: Vec<String>,
    /// A device to assign, with its own policy (default: --policy if given, else strict).
    /// Every device of one run goes to the same guest: a reserved region several
    /// devices share is allowed under strict only when all of them are assigned.
    #[arg(long, value_name = "BDF[,strict|relaxed]", value_parser = parse_assign)]
    assign: Vec<(Bdf, Option<Policy>)>,
    /// Devices that share reserved regions, assigned together with one policy: the same
    /// as one --assign per device (e.g. --group 00:14.0,00:1a.0,00:1d.0,strict).
    #[arg(long, value_name = "BDF,BDF...[,strict|relaxed]", value_parser = parse_group)]
    group: Vec<(Vec<Bdf>, Option<Policy>)>,
    /// Global policy for regions without a device policy (default: relaxed).
    #[arg(long, value_name = "strict|relaxed", value_parser = parse_policy)]
    policy: Option<Policy>,
    /// host: keep every host region free (for hotplug); ignore: only assigned devices'.
    #[arg(long, value_name = "host|ignore", default_value = "ignore", value_parser = parse_strategy)]
    strategy: Strategy,
    /// Regions starting above this may lower the end of low RAM; below it they are
    /// only checked (Xen's rdm_mem_boundary; default 2G).
    #[arg(long = "rdm-mem-boundary", value_name = "SIZE", value_parser = parse_size)]
    rdm_mem_boundary: Option<u64>,
    /// Print one JSON object (e820, reserved, conflicts; addresses as integers).
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or N with K, M, G or T)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} does not fit in 64 bits"))
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse()
        .map_err(|e: mem_layout::types::TypesError| e.to_string())
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    s.parse()
        .map_err(|e: mem_layout::types::TypesError| e.to_string())
}

fn parse_assign(s: &str) -> Result<(Bdf, Option<Policy>), String> {
    let (bdf, policy) = match s.split_once(',') {
        Some((b, p)) => (b, Some(parse_policy(p)?)),
        None => (s, None),
    };
    Ok((
        bdf.parse()
            .map_err(|e: mem_layout::types::BdfError| e.to_string())?,
        policy,
    ))
}

fn parse_group(s: &str) -> Result<(Vec<Bdf>, Option<Policy>), String> {
    let mut parts: Vec<&str> = s.split(',').collect();
    let policy = match parts.last().map(|p| p.parse::<Policy>()) {
        Some(Ok(p)) => {
            parts.pop();
            Some(p)
        }
        _ => None,
    };
    let devices = parts
        .iter()
        .map(|b| {
            b.parse::<Bdf>()
                .map_err(|e: mem_layout::types::BdfError| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if devices.len() < 2 {
        return Err(format!(
            "'{s}' names {} device(s); a group needs two or more (use --assign for one)",
            devices.len()
        ));
    }
    Ok((devices, policy))
}

/// Bad input: the one-line message, naming the input.
struct BadInput(String);

/// The devices of a group's `reserved_regions`: after `@`, else from `devices/` beside it.
fn group_devices(arg: &str) -> Result<(PathBuf, BTreeSet<Bdf>), BadInput> {
    if let Some((path, list)) = arg.rsplit_once('@') {
        let devices = list
            .split(',')
            .map(|b| b.parse::<Bdf>())
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|e| BadInput(format!("--reserved-regions {arg}: {e}")))?;
        return Ok((PathBuf::from(path), devices));
    }
    let path = PathBuf::from(arg);
    let dir = path.parent().unwrap_or(Path::new(".")).join("devices");
    let devices: BTreeSet<Bdf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if devices.is_empty() {
        return Err(BadInput(format!(
            "--reserved-regions {arg}: cannot tell which devices need these regions ({} lists none); write {arg}@BDF[,BDF...]",
            dir.display()
        )));
    }
    Ok((path, devices))
}

fn database(args: &Args) -> Result<RdmDatabase, BadInput> {
    let mut db = RdmDatabase::new();
    if let Some(path) = &args.dmar {
        let table =
            dmar::read(path).map_err(|e| BadInput(format!("--dmar {}: {e}", path.display())))?;
        // Multi-hop scope paths need the live PCI tree; one-hop ones resolve anywhere.
        let bridges = SysfsBridges {
            root: PathBuf::from("/sys/bus/pci/devices"),
        };
        db.add_dmar(&table, &bridges, None)
            .map_err(|e| BadInput(format!("--dmar {}: {e}", path.display())))?;
    }
    if let Some(path) = &args.ivrs {
        let table = mem_layout::ivrs::read(path)
            .map_err(|e| BadInput(format!("--ivrs {}: {e}", path.display())))?;
        db.add_ivrs(&table)
            .map_err(|e| BadInput(format!("--ivrs {}: {e}", path.display())))?;
    }
    if let Some(path) = &args.iort {
        let table = mem_layout::iort::read(path)
            .map_err(|e| BadInput(format!("--iort {}: {e}", path.display())))?;
        db.add_iort(&table)
            .map_err(|e| BadInput(format!("--iort {}: {e}", path.display())))?;
    }
    for arg in &args.reserved_regions {
        let (path, devices) = group_devices(arg)?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| BadInput(format!("--reserved-regions {}: {e}", path.display())))?;
        let regions = reserved_regions::parse(&text)
            .map_err(|e| BadInput(format!("--reserved-regions {}: {e}", path.display())))?;
        db.add_reserved_regions(&regions, &devices, &path.display().to_string())
            .map_err(|e| BadInput(format!("--reserved-regions {}: {e}", path.display())))?;
    }
    Ok(db)
}

/// `--assign` and `--group` as one list; a device named twice is bad input.
fn assigned(args: &Args) -> Result<Vec<(Bdf, Option<Policy>)>, BadInput> {
    let mut out: Vec<(Bdf, Option<Policy>)> = Vec::new();
    let groups = args
        .group
        .iter()
        .flat_map(|(devices, p)| devices.iter().map(move |d| (*d, *p)));
    for (bdf, policy) in args.assign.iter().copied().chain(groups) {
        if out.iter().any(|(b, _)| *b == bdf) {
            return Err(BadInput(format!(
                "--assign/--group: {bdf} is named twice; name each device once"
            )));
        }
        out.push((bdf, policy));
    }
    Ok(out)
}

fn devices_json(devices: &[Bdf]) -> Vec<String> {
    devices.iter().map(|b| b.to_string()).collect()
}

fn to_json(
    e820: &[E820Entry],
    regions: &[PlannedRegion],
    conflicts: &[Conflict],
    warnings: &[String],
) -> serde_json::Value {
    json!({
        "e820": e820.iter().map(|e| json!({
            "start": e.range.start(), "end": e.range.end(), "type": e.kind.as_str(),
        })).collect::<Vec<_>>(),
        "reserved": regions.iter().map(|r| json!({
            "start": r.range.start(), "end": r.range.end(),
            "devices": devices_json(&r.devices), "components": r.components,
            "action": r.action.as_str(),
            "kind": r.kind.as_str(), "policy": r.policy.as_str(),
            "table": table_of(&r.source), "source": r.source,
        })).collect::<Vec<_>>(),
        "conflicts": conflicts.iter().map(|c| json!({
            "start": c.range.start(), "end": c.range.end(),
            "devices": devices_json(&c.devices), "message": c.message,
        })).collect::<Vec<_>>(),
        "warnings": warnings,
    })
}

/// The host table a region came from: `DMAR`, `IVRS`, `IORT`, or `reserved_regions`
/// for a sysfs file (sources are `DMAR RMRR @0x68`, `IVRS IVMD @0x1a8`, `IORT RMR
/// @0x9e0` or a path; merged regions list several, `; `-separated).
fn table_of(source: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for part in source.split("; ") {
        let t = ["DMAR ", "IVRS ", "IORT "]
            .iter()
            .find(|p| part.starts_with(**p))
            .map_or("reserved_regions", |p| p.trim_end());
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

fn to_text(
    head: &str,
    e820: &[E820Entry],
    regions: &[PlannedRegion],
    conflicts: &[Conflict],
) -> String {
    let mut s = format!("{head}\n\ne820:\n");
    if e820.is_empty() {
        s += "  (none: no layout)\n";
    } else {
        s += &format!("  {:<18}  {:<18}  TYPE\n", "START", "END");
    }
    for e in e820 {
        s += &format!(
            "  {:#018x}  {:#018x}  {}\n",
            e.range.start(),
            e.range.end(),
            e.kind.as_str()
        );
    }
    s += "\nreserved regions:\n";
    if regions.is_empty() {
        s += "  none\n";
    } else {
        s += &format!(
            "  {:<18}  {:<18}  {:<16}  {:<7}  {:<8}  {:<18}  DEVICES\n",
            "START", "END", "KIND", "POLICY", "ACTION", "SOURCE"
        );
    }
    for r in regions {
        s += &format!(
            "  {:#018x}  {:#018x}  {:<16}  {:<7}  {:<8}  {:<18}  {}\n",
            r.range.start(),
            r.range.end(),
            r.kind.as_str(),
            r.policy.as_str(),
            r.action.as_str(),
            r.source,
            mem_layout::rdm::device_list(&r.devices)
                .split(", ")
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .chain(r.components.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s += "\nconflicts:\n";
    if conflicts.is_empty() {
        s += "  none\n";
    }
    for c in conflicts {
        s += &format!("  {}: {}\n", c.policy.as_str(), c.message);
    }
    s
}

fn print(json: bool, text: String, value: serde_json::Value) {
    if json {
        println!("{value:#}");
    } else {
        print!("{text}");
    }
}

/// Runs `aperture layout`.
pub fn run(args: Args) -> ExitCode {
    let db = match database(&args) {
        Ok(db) => db,
        Err(BadInput(msg)) => {
            eprintln!("aperture layout: {msg}");
            return ExitCode::from(2);
        }
    };
    for w in db.warnings() {
        eprintln!("aperture layout: warning: {}", w.message);
    }
    let mut cfg = LayoutConfig::new(args.ram);
    cfg.strategy = args.strategy;
    if let Some(b) = args.rdm_mem_boundary {
        cfg.rdm_mem_boundary = b;
    }
    cfg.policy = args.policy;
    cfg.assigned = match assigned(&args) {
        Ok(a) => a,
        Err(BadInput(msg)) => {
            eprintln!("aperture layout: {msg}");
            return ExitCode::from(2);
        }
    };
    match plan(&cfg, &db) {
        Ok(l) => {
            let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
            let head = format!(
                "Guest layout (q35), {:.2} GiB of RAM: low RAM [0x0-{:#x}] (max-ram-below-4g={:#x}), {}",
                gib(l.ram_size),
                l.low_ram_end.saturating_sub(1),
                l.low_ram_end,
                if l.high_ram_end > mem_layout::layout::FOUR_GIB {
                    format!(
                        "high RAM [{:#x}-{:#x}]",
                        mem_layout::layout::FOUR_GIB,
                        l.high_ram_end - 1
                    )
                } else {
                    "no RAM above 4 GiB".to_string()
                }
            );
            for w in &l.warnings {
                eprintln!("aperture layout: warning: {w}");
            }
            print(
                args.json,
                to_text(&head, &l.e820, &l.regions, &l.conflicts),
                to_json(&l.e820, &l.regions, &l.conflicts, &l.warnings),
            );
            ExitCode::SUCCESS
        }
        Err(LayoutError::StrictConflict(rejected)) => {
            print(
                args.json,
                to_text(
                    "No layout: a strict conflict makes the plan impossible.",
                    &[],
                    &rejected.regions,
                    &rejected.conflicts,
                ),
                to_json(
                    &[],
                    &rejected.regions,
                    &rejected.conflicts,
                    &rejected.warnings,
                ),
            );
            eprintln!(
                "aperture layout: the plan is impossible: {}",
                LayoutError::StrictConflict(rejected)
            );
            ExitCode::FAILURE
        }
        Err(e @ LayoutError::TooManyE820 { .. }) => {
            eprintln!("aperture layout: the plan is impossible: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("aperture layout: --ram {}: {e}", args.ram);
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn assign_takes_an_optional_policy() {
        let (b, p) = parse_assign("00:14.0,relaxed").expect("valid");
        assert_eq!(
            (b.to_string(), p),
            ("00:14.0".to_string(), Some(Policy::Relaxed))
        );
        assert_eq!(parse_assign("00:02.0").expect("valid").1, None);
        assert!(parse_assign("00:02.0,lenient").is_err());
    }
}
