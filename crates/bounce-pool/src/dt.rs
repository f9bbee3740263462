//! The device-tree side of a restricted pool: the `/reserved-memory` node that tells
//! a DT guest about the pool, and the rules Linux applies when it builds a pool from
//! such a node and attaches devices to it (binding
//! `Documentation/devicetree/bindings/reserved-memory/shared-dma-pool.yaml`,
//! Linux `kernel/dma/swiotlb.c` `rmem_swiotlb_setup`, `drivers/of/device.c`
//! `of_dma_set_restricted_buffer`).
//!
//! - [`ReservedMemoryNode::restricted`] + [`reserved_memory_dts`]: the node Aperture
//!   emits — a `/reserved-memory` child with `compatible = "restricted-dma-pool"`, a
//!   static `reg`, a label and a phandle, and never `no-map` or `reusable` (the
//!   binding forbids both for this compatible). Devices point at it with
//!   [`memory_region_property`]. crosvm emits the same shape for protected VMs.
//! - [`ReservedMemoryNode::pool_config`]: what a guest kernel would make of a node —
//!   `reg`, or `size` + `alignment` (+ `alloc-ranges`) placed top-down as memblock
//!   does; the properties `rmem_swiotlb_setup` refuses are refused.
//! - [`restricted_pool_for`]: which pool, if any, a device uses: none behind an
//!   IOMMU, else the first available restricted pool among its `memory-region`
//!   phandles (or its DMA parent's), any further one ignored.
//!
//! The types hold parsed property values, not a flattened tree: parsing a DTB is the
//! guest's business and building one the VMM's; both meet here on the rules.

use crate::{Gpa, PoolConfig, PAGE_SIZE, SEGMENT_BYTES};
use std::fmt::Write as _;
use std::ops::Range;

/// The compatible string of a restricted pool.
pub const RESTRICTED_DMA_POOL: &str = "restricted-dma-pool";

/// Why a reserved-memory node gives no pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtError {
    /// The node is not `compatible = "restricted-dma-pool"`.
    #[error("node {node} is not compatible with \"restricted-dma-pool\"")]
    NotRestricted {
        /// Node name.
        node: String,
    },
    /// The node has a property Linux refuses on a restricted pool
    /// (`rmem_swiotlb_setup` returns -EINVAL).
    #[error("restricted DMA pool {node} must not have the \"{property}\" property")]
    Forbidden {
        /// Node name.
        node: String,
        /// The property.
        property: &'static str,
    },
    /// The node has neither `reg` nor `size`.
    #[error("restricted DMA pool {node} has neither \"reg\" nor \"size\"")]
    NoRange {
        /// Node name.
        node: String,
    },
    /// `alignment` is not a power of two.
    #[error("restricted DMA pool {node}: alignment {alignment:#x} is not a power of two")]
    BadAlignment {
        /// Node name.
        node: String,
        /// The value.
        alignment: u64,
    },
    /// The static range is not page-aligned, wraps, or is smaller than one 256 KiB
    /// segment.
    #[error(
        "restricted DMA pool {node}: reg <{base:#x} {size:#x}> is not a page-aligned \
         range of at least one {SEGMENT_BYTES:#x}-byte segment"
    )]
    BadReg {
        /// Node name.
        node: String,
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// The range is not inside guest RAM (Linux: "Restricted DMA pool must be
    /// accessible within the linear mapping").
    #[error("restricted DMA pool {node} at {base:#x} of {size:#x} bytes is not inside RAM")]
    NotInRam {
        /// Node name.
        node: String,
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// No place satisfies `size`, `alignment` and `alloc-ranges` inside RAM.
    #[error(
        "restricted DMA pool {node}: no room for {size:#x} bytes aligned to {alignment:#x} \
         in the allowed ranges"
    )]
    NoRoom {
        /// Node name.
        node: String,
        /// Size asked for.
        size: u64,
        /// Alignment used.
        alignment: u64,
    },
}

/// A child of `/reserved-memory`: the properties the binding defines and Linux reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReservedMemoryNode {
    /// Node name, e.g. `restricted-dma-pool@80000000`.
    pub name: String,
    /// Label devices refer to it by in source form (`&label`).
    pub label: Option<String>,
    /// Its phandle (what `memory-region` cells hold).
    pub phandle: u32,
    /// `compatible` strings.
    pub compatible: Vec<String>,
    /// `status`; `None` means okay.
    pub status: Option<String>,
    /// `reg = <base size>`: a static range.
    pub reg: Option<(u64, u64)>,
    /// `size`: a range placed by the OS.
    pub size: Option<u64>,
    /// `alignment` of a placed range.
    pub alignment: Option<u64>,
    /// `alloc-ranges` a placed range must lie in (`(base, size)` pairs).
    pub alloc_ranges: Vec<(u64, u64)>,
    /// `no-map`.
    pub no_map: bool,
    /// `reusable`.
    pub reusable: bool,
    /// `linux,cma-default`.
    pub linux_cma_default: bool,
    /// `linux,dma-default`.
    pub linux_dma_default: bool,
}

/// Label of the node [`ReservedMemoryNode::restricted`] builds (crosvm's name).
pub const POOL_LABEL: &str = "restricted_dma_reserved";

fn inside(ram: &[Range<u64>], base: u64, size: u64) -> bool {
    base.checked_add(size)
        .is_some_and(|end| ram.iter().any(|r| r.start <= base && end <= r.end))
}

impl ReservedMemoryNode {
    /// The node for a pool at `base` of `size` bytes with phandle `phandle`: static
    /// `reg`, `compatible = "restricted-dma-pool"`, label [`POOL_LABEL`].
    pub fn restricted(base: Gpa, size: u64, phandle: u32) -> Self {
        Self {
            name: format!("{RESTRICTED_DMA_POOL}@{:x}", base.0),
            label: Some(POOL_LABEL.to_owned()),
            phandle,
            compatible: vec![RESTRICTED_DMA_POOL.to_owned()],
            reg: Some((base.0, size)),
            ..Self::default()
        }
    }

    /// `of_device_is_compatible(node, "restricted-dma-pool")`.
    pub fn is_restricted(&self) -> bool {
        self.compatible.iter().any(|c| c == RESTRICTED_DMA_POOL)
    }

    /// `of_device_is_available`: no `status`, or `"okay"` / `"ok"`.
    pub fn is_available(&self) -> bool {
        matches!(self.status.as_deref(), None | Some("okay") | Some("ok"))
    }

    /// The pool a guest builds from this node in RAM made of `ram` ranges: its
    /// `reg`, or `size` bytes placed at the highest address aligned to `alignment`
    /// (at least a page) inside `alloc-ranges` (or anywhere in RAM) — memblock's
    /// default top-down placement. One area, as Linux gives a restricted pool. The
    /// size is cut to whole 256 KiB segments (this allocator's unit; Linux keeps a
    /// partial last segment).
    ///
    /// # Errors
    /// [`DtError::NotRestricted`]; [`DtError::Forbidden`] for `reusable`,
    /// `linux,cma-default`, `linux,dma-default` or `no-map` (checked in Linux's
    /// order); [`DtError::NoRange`], [`DtError::BadAlignment`], [`DtError::BadReg`],
    /// [`DtError::NotInRam`], [`DtError::NoRoom`].
    pub fn pool_config(&self, ram: &[Range<u64>]) -> Result<PoolConfig, DtError> {
        let node = || self.name.clone();
        if !self.is_restricted() {
            return Err(DtError::NotRestricted { node: node() });
        }
        for (set, property) in [
            (self.reusable, "reusable"),
            (self.linux_cma_default, "linux,cma-default"),
            (self.linux_dma_default, "linux,dma-default"),
            (self.no_map, "no-map"),
        ] {
            if set {
                return Err(DtError::Forbidden {
                    node: node(),
                    property,
                });
            }
        }
        let (base, size) = match (self.reg, self.size) {
            (Some((base, size)), _) => {
                let whole = size - size % SEGMENT_BYTES;
                if !base.is_multiple_of(PAGE_SIZE) || whole == 0 || base.checked_add(size).is_none()
                {
                    return Err(DtError::BadReg {
                        node: node(),
                        base,
                        size,
                    });
                }
                if !inside(ram, base, size) {
                    return Err(DtError::NotInRam {
                        node: node(),
                        base,
                        size,
                    });
                }
                (base, whole)
            }
            (None, Some(size)) => self.place(ram, size)?,
            (None, None) => return Err(DtError::NoRange { node: node() }),
        };
        Ok(PoolConfig {
            base: Gpa(base),
            size,
            areas: 1,
        })
    }

    /// Top-down placement of a `size` node.
    fn place(&self, ram: &[Range<u64>], size: u64) -> Result<(u64, u64), DtError> {
        let node = || self.name.clone();
        let alignment = self.alignment.unwrap_or(PAGE_SIZE);
        if !alignment.is_power_of_two() {
            return Err(DtError::BadAlignment {
                node: node(),
                alignment,
            });
        }
        let alignment = alignment.max(PAGE_SIZE);
        let whole = size - size % SEGMENT_BYTES;
        if whole == 0 {
            return Err(DtError::BadReg {
                node: node(),
                base: 0,
                size,
            });
        }
        // Each allowed window, cut to each RAM range it overlaps.
        let windows: Vec<Range<u64>> = if self.alloc_ranges.is_empty() {
            ram.to_vec()
        } else {
            self.alloc_ranges
                .iter()
                .flat_map(|&(b, s)| {
                    let end = b.saturating_add(s);
                    ram.iter()
                        .map(move |r| r.start.max(b)..r.end.min(end))
                        .filter(|w| w.start < w.end)
                })
                .collect()
        };
        windows
            .iter()
            .filter_map(|w| {
                // Highest aligned base with the whole (unrounded) size inside.
                let top = w.end.checked_sub(size)?;
                let base = top - top % alignment;
                (base >= w.start).then_some(base)
            })
            .max()
            .map(|base| (base, whole))
            .ok_or(DtError::NoRoom {
                node: node(),
                size,
                alignment,
            })
    }

    /// The node in device-tree source form, one tab of indentation per level below
    /// `/reserved-memory` (which has `#address-cells = <2>` and `#size-cells = <2>`).
    pub fn to_dts(&self) -> String {
        let cells = |v: u64| format!("{:#x} {:#x}", v >> 32, v & 0xffff_ffff);
        let mut s = String::new();
        let label = self
            .label
            .as_deref()
            .map(|l| format!("{l}: "))
            .unwrap_or_default();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "\t{label}{} {{", self.name);
        if !self.compatible.is_empty() {
            let list: Vec<String> = self.compatible.iter().map(|c| format!("\"{c}\"")).collect();
            let _ = writeln!(s, "\t\tcompatible = {};", list.join(", "));
        }
        if let Some((base, size)) = self.reg {
            let _ = writeln!(s, "\t\treg = <{} {}>;", cells(base), cells(size));
        }
        if let Some(size) = self.size {
            let _ = writeln!(s, "\t\tsize = <{}>;", cells(size));
        }
        if let Some(a) = self.alignment {
            let _ = writeln!(s, "\t\talignment = <{}>;", cells(a));
        }
        if !self.alloc_ranges.is_empty() {
            let r: Vec<String> = self
                .alloc_ranges
                .iter()
                .map(|&(b, l)| format!("{} {}", cells(b), cells(l)))
                .collect();
            let _ = writeln!(s, "\t\talloc-ranges = <{}>;", r.join(" "));
        }
        for (set, p) in [
            (self.no_map, "no-map"),
            (self.reusable, "reusable"),
            (self.linux_cma_default, "linux,cma-default"),
            (self.linux_dma_default, "linux,dma-default"),
        ] {
            if set {
                let _ = writeln!(s, "\t\t{p};");
            }
        }
        if let Some(st) = &self.status {
            let _ = writeln!(s, "\t\tstatus = \"{st}\";");
        }
        let _ = writeln!(s, "\t\tphandle = <{:#x}>;", self.phandle);
        s.push_str("\t};\n");
        s
    }
}

/// The `/reserved-memory` node holding `children`, in device-tree source form:
/// 64-bit cells and an empty `ranges`, as the binding asks.
pub fn reserved_memory_dts(children: &[ReservedMemoryNode]) -> String {
    let mut s = String::from(
        "reserved-memory {\n\t#address-cells = <0x2>;\n\t#size-cells = <0x2>;\n\tranges;\n",
    );
    for c in children {
        s.push('\n');
        s.push_str(&c.to_dts());
    }
    s.push_str("};\n");
    s
}

/// The property a device node carries to use the pool labelled `label`.
pub fn memory_region_property(label: &str) -> String {
    format!("memory-region = <&{label}>;")
}

/// What the DMA layer knows of a device node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceNode {
    /// Its `memory-region` phandles, in order.
    pub memory_region: Vec<u32>,
    /// Whether it is translated by an IOMMU (`iommus` / `iommu-map` resolved).
    pub behind_iommu: bool,
}

/// `of_dma_set_restricted_buffer`: the restricted pool `dev` uses, if any. A device
/// behind an IOMMU uses none (`of_dma_configure_id` only calls it without one). The
/// phandles come from the device's own `memory-region`, or, if it has none, from
/// its DMA parent's (e.g. the PCI host bridge); the first that names an available
/// `restricted-dma-pool` node wins and any later one is ignored ("only one
/// restricted-dma-pool region is allowed").
pub fn restricted_pool_for<'a>(
    dev: &DeviceNode,
    dma_parent: Option<&DeviceNode>,
    nodes: &'a [ReservedMemoryNode],
) -> Option<&'a ReservedMemoryNode> {
    if dev.behind_iommu {
        return None;
    }
    let phandles = if dev.memory_region.is_empty() {
        dma_parent.map_or(&[][..], |p| &p.memory_region[..])
    } else {
        &dev.memory_region[..]
    };
    phandles.iter().find_map(|&ph| {
        nodes
            .iter()
            .find(|n| n.phandle == ph)
            .filter(|n| n.is_restricted() && n.is_available())
    })
}
