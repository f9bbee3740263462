//! `aperture dt-pool`: gives PCI devices of an arm64 `virt` guest a restricted DMA pool
//! through the device tree (issue 17).
//!
//! Input is the machine's own device tree, as QEMU dumps it
//! (`-machine virt,dumpdtb=FILE` with the same `-m`, `-smp` and `-cpu` as the boot).
//! The pool's place comes from one plan: [`plan`] puts `--pool-size` bytes at the top
//! of the RAM the tree describes (2 MiB aligned) unless `--pool-base` says where, and
//! checks it with the guest's own rules ([`ReservedMemoryNode::pool_config`]). The
//! `/reserved-memory` child is [`ReservedMemoryNode::restricted`] rendered by
//! [`bounce_pool::dt::reserved_memory_dts`]; each device gets a child node of the PCI
//! host bridge whose `reg` names its devfn on bus 0 (IEEE 1275 PCI binding: first cell
//! `bus << 16 | devfn << 8`), holding `memory-region = <&pool>`, which Linux's
//! `of_dma_set_restricted_buffer` follows when the device has no IOMMU. The result is
//! compiled with `dtc` and booted with `-dtb`.
//!
//! The device-tree source is read only as far as needed: the root's cell sizes, the
//! `/memory` nodes' `reg`, the ECAM host bridge's node name and the phandles in use
//! (the new pool's phandle is one above the largest). Nothing else is interpreted.

use bounce_pool::dt::{memory_region_property, reserved_memory_dts, POOL_LABEL};
use bounce_pool::{Gpa, ReservedMemoryNode};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The pool's alignment when `--pool-base` is not given: a 2 MiB block, so the
/// kernel's linear map of the pool needs no page-granular split.
const POOL_ALIGN: u64 = 2 << 20;
/// The `compatible` of QEMU virt's PCIe host bridge.
const ECAM_COMPATIBLE: &str = "pci-host-ecam-generic";

/// Arguments of `aperture dt-pool`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The machine's device tree blob, from `-machine virt,dumpdtb=FILE`.
    #[arg(long, value_name = "FILE")]
    dtb: PathBuf,
    /// Where to write the patched blob (and its source, FILE.dts).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Pool size: bytes, or with a K, M or G suffix; at least 256 KiB (one swiotlb
    /// segment) and a multiple of 4 KiB.
    #[arg(long = "pool-size", value_name = "SIZE", value_parser = crate::layout::parse_size)]
    pool_size: u64,
    /// Pool base address (default: the top of RAM, 2 MiB aligned).
    #[arg(long = "pool-base", value_name = "ADDR", value_parser = parse_addr)]
    pool_base: Option<u64>,
    /// A PCI function on bus 0 that gets the pool: SLOT or SLOT.FN in hex (e.g. 2 or
    /// 0x2.0). Repeatable; all of them share the one pool.
    #[arg(long, value_name = "SLOT[.FN]", value_parser = parse_devfn, required = true)]
    device: Vec<u8>,
    /// The device tree compiler.
    #[arg(long, value_name = "PATH", default_value = "dtc")]
    dtc: PathBuf,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The `/reserved-memory` child.
    pub node: ReservedMemoryNode,
    /// The PCI host bridge's node path, e.g. `/pcie@10000000`.
    pub bridge: String,
    /// The devfns given the pool.
    pub devfns: Vec<u8>,
    /// Guest RAM as the tree describes it.
    pub ram: Vec<Range<u64>>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtPoolError {
    /// The root node does not use two cells for addresses and sizes.
    #[error("the root node has #address-cells/#size-cells {0}/{1}; only 2/2 (virt) is handled")]
    Cells(u32, u32),
    /// No `/memory` node with a `reg`.
    #[error("the device tree has no /memory node with a reg")]
    NoMemory,
    /// No ECAM PCI host bridge.
    #[error("the device tree has no top-level node compatible with \"{ECAM_COMPATIBLE}\"")]
    NoBridge,
    /// The pool does not fit where asked, or at the top of RAM.
    #[error("no room for a {size:#x}-byte pool in RAM {ram:x?}")]
    NoRoom {
        /// Size asked for.
        size: u64,
        /// RAM ranges.
        ram: Vec<Range<u64>>,
    },
    /// The guest would refuse the pool (the rules of `rmem_swiotlb_setup`).
    #[error("{0}")]
    Refused(#[from] bounce_pool::DtError),
    /// A devfn given twice.
    #[error("PCI function {0:02x}.{1} given twice")]
    Duplicate(u8, u8),
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("{s:?} is not an address (decimal or 0x hex)"))
}

/// `SLOT[.FN]`, hex slot < 32, function < 8, to a devfn (slot << 3 | fn).
fn parse_devfn(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let (slot, func) = t.split_once('.').unwrap_or((t, "0"));
    let slot = slot.trim_start_matches("0x");
    let slot = u8::from_str_radix(slot, 16).map_err(|_| format!("{s:?}: bad slot"))?;
    let func: u8 = func.parse().map_err(|_| format!("{s:?}: bad function"))?;
    if slot >= 32 || func >= 8 {
        return Err(format!("{s:?}: slot must be < 0x20 and function < 8"));
    }
    Ok(slot << 3 | func)
}

/// The cells of a property `name = <...>;` on `line` (trimmed), if it is that property.
fn cells_of(line: &str, name: &str) -> Option<Vec<u32>> {
    let rest = line.strip_prefix(name)?.trim_start();
    let inner = rest.strip_prefix("= <")?.strip_suffix(">;")?;
    inner
        .split_whitespace()
        .map(|c| match c.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => c.parse().ok(),
        })
        .collect()
}

/// What is read from the decompiled tree.
#[derive(Debug, Default, PartialEq, Eq)]
struct Facts {
    cells: (u32, u32),
    ram: Vec<Range<u64>>,
    bridge: Option<String>,
    max_phandle: u32,
}

/// Reads [`Facts`] from `dtc -O dts` output (one node or property per line).
fn read_facts(dts: &str) -> Facts {
    let mut f = Facts {
        cells: (2, 1), // the DT spec's defaults
        ..Facts::default()
    };
    // Node path as a stack of names; depth 1 = children of the root.
    let mut path: Vec<String> = Vec::new();
    for raw in dts.lines() {
        let line = raw.trim();
        if let Some(head) = line.strip_suffix('{') {
            let name = head.trim().rsplit(':').next().unwrap_or("").trim();
            path.push(name.to_owned());
            continue;
        }
        if line.starts_with("};") {
            path.pop();
            continue;
        }
        if let Some(c) = cells_of(line, "phandle") {
            f.max_phandle = f.max_phandle.max(c.first().copied().unwrap_or(0));
        }
        match path.len() {
            1 => {
                if let Some(c) = cells_of(line, "#address-cells") {
                    f.cells.0 = c.first().copied().unwrap_or(0);
                }
                if let Some(c) = cells_of(line, "#size-cells") {
                    f.cells.1 = c.first().copied().unwrap_or(0);
                }
            }
            2 => {
                let node = &path[1];
                if node == "memory" || node.starts_with("memory@") {
                    if let Some(c) = cells_of(line, "reg") {
                        for r in c.chunks_exact(4) {
                            let base = u64::from(r[0]) << 32 | u64::from(r[1]);
                            let size = u64::from(r[2]) << 32 | u64::from(r[3]);
                            if let Some(end) = base.checked_add(size) {
                                f.ram.push(base..end);
                            }
                        }
                    }
                }
                if line.starts_with("compatible")
                    && line.contains(&format!("\"{ECAM_COMPATIBLE}\""))
                {
                    f.bridge = Some(format!("/{node}"));
                }
            }
            _ => {}
        }
    }
    f.ram.sort_by_key(|r| r.start);
    f
}

/// Plans the pool and its devices for the tree `dts`.
///
/// # Errors
/// [`DtPoolError`] naming what is missing from the tree, or why the pool cannot be.
pub fn plan(dts: &str, size: u64, base: Option<u64>, devfns: &[u8]) -> Result<Plan, DtPoolError> {
    let facts = read_facts(dts);
    if facts.cells != (2, 2) {
        return Err(DtPoolError::Cells(facts.cells.0, facts.cells.1));
    }
    if facts.ram.is_empty() {
        return Err(DtPoolError::NoMemory);
    }
    let bridge = facts.bridge.clone().ok_or(DtPoolError::NoBridge)?;
    let mut seen = Vec::new();
    for &d in devfns {
        if seen.contains(&d) {
            return Err(DtPoolError::Duplicate(d >> 3, d & 7));
        }
        seen.push(d);
    }
    let no_room = || DtPoolError::NoRoom {
        size,
        ram: facts.ram.clone(),
    };
    let base = match base {
        Some(b) => b,
        None => {
            let top = facts.ram.last().ok_or(DtPoolError::NoMemory)?;
            let b = top.end.checked_sub(size).ok_or_else(no_room)?;
            let b = b - b % POOL_ALIGN;
            if b < top.start {
                return Err(no_room());
            }
            b
        }
    };
    let node = ReservedMemoryNode::restricted(Gpa(base), size, facts.max_phandle + 1);
    // The guest's rules: refuse what Linux would refuse, before any blob is written.
    let pool = node.pool_config(&facts.ram)?;
    if pool.size != size {
        // Linux keeps a partial last segment; ours would not: ask for whole segments.
        return Err(DtPoolError::Refused(bounce_pool::DtError::BadReg {
            node: node.name.clone(),
            base,
            size,
        }));
    }
    Ok(Plan {
        node,
        bridge,
        devfns: devfns.to_vec(),
        ram: facts.ram,
    })
}

/// The source text appended to the machine's tree: the `/reserved-memory` node and,
/// under the host bridge, one node per device pointing at the pool.
pub fn overlay_dts(p: &Plan) -> String {
    let mut s = String::from("\n/* aperture dt-pool: a restricted DMA pool (issue 17) */\n/ {\n");
    for line in reserved_memory_dts(std::slice::from_ref(&p.node)).lines() {
        if line.is_empty() {
            s.push('\n');
        } else {
            let _ = writeln!(s, "\t{line}");
        }
    }
    s.push_str("};\n\n");
    let _ = writeln!(s, "&{{{}}} {{", p.bridge);
    for &d in &p.devfns {
        let (slot, func) = (d >> 3, d & 7);
        // dtc's pci_device_reg check: unit address "slot" or "slot,fn" in hex.
        let unit = if func == 0 {
            format!("{slot:x}")
        } else {
            format!("{slot:x},{func:x}")
        };
        let _ = writeln!(s, "\tpool-device@{unit} {{");
        // phys.hi of the PCI binding: 0b00000000 bbbbbbbb dddddfff rrrrrrrr (bus 0,
        // register 0); the other four cells (phys.mid/lo, size) are 0.
        let _ = writeln!(s, "\t\treg = <{:#x} 0x0 0x0 0x0 0x0>;", u32::from(d) << 8);
        let _ = writeln!(s, "\t\t{}", memory_region_property(POOL_LABEL));
        s.push_str("\t};\n");
    }
    s.push_str("};\n");
    s
}

fn dtc(dtc: &Path, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, String> {
    let out = Command::new(dtc)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", dtc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {:?} failed: {}",
            dtc.display(),
            args,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// Runs `aperture dt-pool`.
pub fn run(a: Args) -> ExitCode {
    match run_inner(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aperture dt-pool: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the machine's blob `dtb`, plans a `size`-byte pool (at `base`, or at the
/// top of RAM) for the functions `devfns` on bus 0, and writes the patched blob to
/// `out` (and its source to `out`.dts). Errors are sentences naming the file or step.
pub(crate) fn write_pool_dtb(
    dtc_path: &Path,
    dtb: &Path,
    out: &Path,
    size: u64,
    base: Option<u64>,
    devfns: &[u8],
) -> Result<Plan, String> {
    let dts = dtc(
        dtc_path,
        &[
            "-q".as_ref(),
            "-I".as_ref(),
            "dtb".as_ref(),
            "-O".as_ref(),
            "dts".as_ref(),
            dtb.as_os_str(),
        ],
    )?;
    let dts = String::from_utf8(dts).map_err(|e| format!("dtc printed non-UTF-8 source: {e}"))?;
    let p = plan(&dts, size, base, devfns).map_err(|e| format!("{}: {e}", dtb.display()))?;
    let mut src = dts;
    src.push_str(&overlay_dts(&p));
    let mut dts_path = out.to_path_buf().into_os_string();
    dts_path.push(".dts");
    std::fs::write(&dts_path, &src)
        .map_err(|e| format!("cannot write {}: {e}", Path::new(&dts_path).display()))?;
    dtc(
        dtc_path,
        &[
            "-q".as_ref(),
            "-I".as_ref(),
            "dts".as_ref(),
            "-O".as_ref(),
            "dtb".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
            dts_path.as_os_str(),
        ],
    )?;
    Ok(p)
}

fn run_inner(a: &Args) -> Result<(), String> {
    let p = write_pool_dtb(&a.dtc, &a.dtb, &a.out, a.pool_size, a.pool_base, &a.device)?;
    let (base, size) = p.node.reg.unwrap_or((0, 0));
    println!("POOL_NODE={}", p.node.name);
    println!("POOL_BASE={base:#x}");
    println!("POOL_SIZE={size:#x}");
    println!("POOL_PHANDLE={:#x}", p.node.phandle);
    println!("PCI_BRIDGE={}", p.bridge);
    let devs: Vec<String> = p
        .devfns
        .iter()
        .map(|d| format!("0000:00:{:02x}.{}", d >> 3, d & 7))
        .collect();
    println!("POOL_DEVICES={}", devs.join(","));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking
    use super::*;

    /// The shape of `dtc -O dts` of QEMU virt's blob (abridged).
    const VIRT: &str = r#"/dts-v1/;

/ {
	interrupt-parent = <0x8002>;
	#size-cells = <0x02>;
	#address-cells = <0x02>;
	compatible = "linux,dummy-virt";

	pcie@10000000 {
		interrupt-map-mask = <0x1800 0x00 0x00 0x07>;
		#interrupt-cells = <0x01>;
		ranges = <0x1000000 0x00 0x00 0x00 0x3eff0000 0x00 0x10000>;
		reg = <0x40 0x10000000 0x00 0x10000000>;
		msi-map = <0x00 0x8003 0x00 0x10000>;
		dma-coherent;
		bus-range = <0x00 0xff>;
		#address-cells = <0x03>;
		#size-cells = <0x02>;
		device_type = "pci";
		compatible = "pci-host-ecam-generic";
	};

	intc@8000000 {
		phandle = <0x8002>;
		v2m@8020000 {
			phandle = <0x8003>;
			reg = <0x00 0x8020000 0x00 0x1000>;
		};
	};

	memory@40000000 {
		reg = <0x00 0x40000000 0x00 0x20000000>;
		device_type = "memory";
	};
};
"#;

    #[test]
    fn reads_what_the_plan_needs() {
        let f = read_facts(VIRT);
        assert_eq!(f.cells, (2, 2));
        assert_eq!(f.ram, vec![0x4000_0000..0x6000_0000]);
        assert_eq!(f.bridge.as_deref(), Some("/pcie@10000000"));
        assert_eq!(f.max_phandle, 0x8003);
    }

    #[test]
    fn pool_at_the_top_of_ram_and_devices_by_devfn() {
        let p = plan(VIRT, 16 << 20, None, &[0x10, 0x1a]).unwrap();
        assert_eq!(p.node.reg, Some((0x5f00_0000, 16 << 20)));
        assert_eq!(p.node.phandle, 0x8004);
        let s = overlay_dts(&p);
        assert!(s.contains("restricted_dma_reserved: restricted-dma-pool@5f000000 {"));
        assert!(s.contains("compatible = \"restricted-dma-pool\";"));
        assert!(!s.contains("no-map"));
        assert!(s.contains("&{/pcie@10000000} {"));
        // 00:02.0 -> devfn 0x10 -> 0x1000; 00:03.2 -> devfn 0x1a -> 0x1a00.
        assert!(s.contains("pool-device@2 {\n\t\treg = <0x1000 0x0 0x0 0x0 0x0>;"));
        assert!(s.contains("pool-device@3,2 {\n\t\treg = <0x1a00 0x0 0x0 0x0 0x0>;"));
        assert!(s.contains("memory-region = <&restricted_dma_reserved>;"));
    }

    #[test]
    fn refuses_what_the_guest_would_refuse() {
        // Outside RAM.
        assert!(matches!(
            plan(VIRT, 16 << 20, Some(0x6000_0000), &[0x10]),
            Err(DtPoolError::Refused(bounce_pool::DtError::NotInRam { .. }))
        ));
        // Smaller than a segment.
        assert!(matches!(
            plan(VIRT, 4096, None, &[0x10]),
            Err(DtPoolError::Refused(_))
        ));
        // Larger than RAM.
        assert!(matches!(
            plan(VIRT, 1 << 30, None, &[0x10]),
            Err(DtPoolError::NoRoom { .. })
        ));
        assert_eq!(
            plan(VIRT, 16 << 20, None, &[0x10, 0x10]),
            Err(DtPoolError::Duplicate(2, 0))
        );
        assert_eq!(
            plan(
                &VIRT.replace("pci-host-ecam-generic", "x"),
                16 << 20,
                None,
                &[0x10]
            ),
            Err(DtPoolError::NoBridge)
        );
    }

    #[test]
    fn devfn_syntax() {
        assert_eq!(parse_devfn("2"), Ok(0x10));
        assert_eq!(parse_devfn("0x1f.7"), Ok(0xff));
        assert!(parse_devfn("20").is_err());
        assert!(parse_devfn("2.8").is_err());
    }
}
