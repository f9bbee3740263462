//! The guest physical layout of a q35 VM with reserved device memory: where RAM goes,
//! which regions stay reserved, what the e820 says, and where BARs may go. One
//! [`Layout`] value is the single source of truth for all of it.
//!
//! The algorithm is libxl's `libxl__domain_device_construct_rdm` (Xen
//! `tools/libs/light/libxl_dm.c`):
//! 1. **Collect** the regions: with [`Strategy::Host`] every host region at the global
//!    policy; then each assigned device's regions at the device's policy ("per-device
//!    policy always overrides the global policy").
//! 2. **Pass 1**: a region that overlaps low RAM and starts above the boundary
//!    (`rdm_mem_boundary`, 2 GiB) lowers the end of low RAM to its start (rounded down
//!    to 2 MiB to keep huge pages, as libxl does with HAP) and high RAM grows by the
//!    same amount: the guest keeps all its RAM.
//! 3. **Pass 2**: any region still under RAM (below the boundary, or above 4 GiB, which
//!    is never moved), or a direct region on q35's fixed MMCONFIG or platform window, is
//!    a conflict: strict → the plan fails; relaxed → a warning, and the region is
//!    dropped from the e820.
//!
//! The starting split is QEMU q35's (`hw/i386/pc_q35.c`): RAM of 0xB000_0000 bytes or
//! more is split at 2 GiB, smaller RAM stays below the MMCONFIG window at 0xB000_0000;
//! `max-ram-below-4g` can only lower it. The planned low end is what `aperture serve`
//! passes to QEMU as `max-ram-below-4g` ([`Layout::max_ram_below_4g`]).
//!
//! Before the passes, the **shared-region rule** (Xen `intel_iommu_assign_device`; see
//! [`crate::identity`]): a direct region of an assigned device that other devices need
//! too is shared; unless every one of those sharers is assigned as well (the devices
//! of one plan go to one guest together: a group), strict makes it a conflict naming
//! the device, the range and every sharer left out, and relaxed a "risky" warning
//! ([`Layout::warnings`]).
//!
//! Defaults follow Xen: global policy relaxed, each explicitly assigned device strict
//! unless it says otherwise or a global policy was given explicitly (xl copies it into
//! each device). Two deliberate differences: a region several assigned devices share
//! takes the strictest of their policies (libxl lets the last device win), and a
//! `direct-relaxable` region is always relaxed (Linux ≥ 5.3: safe to drop on
//! assignment).
//!
//! This file holds the layout types and the two passes; step 1 with the shared-region
//! rule is its submodule `collect`, the BAR allocator ([`MmioAllocator`]) its submodule
//! `mmio`.

mod collect;
mod mmio;

pub use mmio::MmioAllocator;

use crate::rdm::{device_list, RdmDatabase};
use crate::types::{Bdf, MemRange, Policy, RegionKind, Strategy, PAGE_SIZE};
use collect::{collect, Collected};

/// 4 GiB: high RAM starts here (QEMU maps `above_4g_mem_size` from 4 GiB).
pub const FOUR_GIB: u64 = 1 << 32;
/// q35's low-RAM end when RAM is [`Q35_SPLIT_THRESHOLD`] or more (pc_q35.c,
/// gigabyte-aligned machine types): 2 GiB.
pub const Q35_LOWMEM_SPLIT: u64 = 0x8000_0000;
/// q35 splits RAM at [`Q35_LOWMEM_SPLIT`] from this size on; below it, all RAM fits
/// under the MMCONFIG window (pc_q35.c `ram_size >= 0xb0000000`).
pub const Q35_SPLIT_THRESHOLD: u64 = 0xB000_0000;
/// q35's PCIe MMCONFIG (ECAM) window, 256 MiB at 0xB000_0000
/// (hw/pci-host/q35.c `MCH_HOST_BRIDGE_PCIEXBAR_DEFAULT`, 256 buses).
pub const Q35_MMCONFIG: MemRange = range(0xB000_0000, 0xBFFF_FFFF);
/// q35's 32-bit PCI MMIO hole: from the end of MMCONFIG to below the IOAPIC
/// (q35.c `mch->pci_hole`).
pub const Q35_PCI_HOLE32: MemRange = range(0xC000_0000, 0xFEBF_FFFF);
/// Fixed x86 platform devices up to 4 GiB: IOAPIC 0xFEC0_0000, HPET 0xFED0_0000,
/// LAPIC/MSI 0xFEE0_0000, BIOS flash at the top.
pub const X86_PLATFORM: MemRange = range(0xFEC0_0000, 0xFFFF_FFFF);
/// q35's default 64-bit PCI hole size (`Q35_PCI_HOST_HOLE64_SIZE_DEFAULT`, 32 GiB).
pub const Q35_PCI_HOLE64_SIZE: u64 = 1 << 35;
/// The 64-bit hole starts at the end of high RAM rounded up to 1 GiB (pc.c
/// `pc_pci_hole64_start`).
pub const PCI_HOLE64_ALIGN: u64 = 1 << 30;
/// Xen's `rdm_mem_boundary` default, 2048 MiB (`LIBXL_RDM_MEM_BOUNDARY_MEMKB_DEFAULT`):
/// regions starting above it may lower low RAM; below it they are only checked.
pub const RDM_MEM_BOUNDARY_DEFAULT: u64 = 0x8000_0000;
/// Low RAM is lowered to a multiple of 2 MiB so it keeps huge pages (libxl with HAP).
pub const SUPERPAGE: u64 = 2 << 20;
/// Most e820 entries a guest accepts (`E820MAX`, Linux's zero page: 128).
pub const E820_MAX: usize = 128;
/// Guest physical address width when not told (QEMU's TCG default `phys-bits=40`).
pub const DEFAULT_PHYS_BITS: u8 = 40;

/// `MemRange::span` for the constants below, checked at compile time.
const fn range(start: u64, end: u64) -> MemRange {
    match MemRange::span(start, end) {
        Some(r) => r,
        None => panic!("constant range with end below start"),
    }
}

/// Errors of this module: layouts that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// RAM size zero or not a whole number of pages.
    #[error("RAM size {size:#x} is not a positive multiple of 4 KiB")]
    BadRamSize {
        /// Size asked.
        size: u64,
    },
    /// `max-ram-below-4g` zero, not page aligned, or above 4 GiB.
    #[error("max-ram-below-4g {value:#x} is not a positive multiple of 4 KiB up to 4 GiB")]
    BadMaxRamBelow4g {
        /// Value given.
        value: u64,
    },
    /// High RAM would pass the guest's physical address width.
    #[error("RAM would end at {end:#x}, past the {bits}-bit guest physical address space")]
    RamTooLarge {
        /// Where high RAM would end (exclusive).
        end: u128,
        /// Physical address bits.
        bits: u8,
    },
    /// At least one conflict under the strict policy: the plan is impossible.
    #[error("{} strict conflict(s); first: {}", .0.conflicts.len(), .0.conflicts.first().map_or("", |c| c.message.as_str()))]
    StrictConflict(Box<Rejected>),
    /// More e820 entries than a guest accepts (libxl "Too many entries in the memory map!").
    #[error("the memory map needs {count} entries, more than {max}")]
    TooManyE820 {
        /// Entries needed.
        count: usize,
        /// [`E820_MAX`].
        max: usize,
    },
    /// A BAR size that is not a power of two of at least 4 KiB (PCI BARs are naturally
    /// aligned powers of two; sub-page BARs get a page so they can be mapped alone).
    #[error("BAR size {size:#x} is not a power of two of at least 4 KiB")]
    BadBarSize {
        /// Size asked.
        size: u64,
    },
    /// No room for a BAR in the MMIO windows outside every reserved region.
    #[error("no room for a {size:#x}-byte BAR in the MMIO windows outside the reserved regions")]
    MmioExhausted {
        /// Size asked.
        size: u64,
    },
}

/// What a failed plan found, so a caller can still show every region and conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The regions, with what would have been done.
    pub regions: Vec<PlannedRegion>,
    /// Every conflict, strict and relaxed.
    pub conflicts: Vec<Conflict>,
    /// Findings that did not decide anything (relaxed shared regions).
    pub warnings: Vec<String>,
}

/// What the plan did with a reserved region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Kept free of RAM and MMIO and listed as reserved in the e820 (host strategy, or
    /// a non-direct region of an assigned device).
    Reserved,
    /// Like `Reserved`, and identity-mapped when its assigned device is attached.
    Identity,
    /// Not honoured (relaxed conflict): RAM or a fixed window covers it; not in the e820.
    Dropped,
}

impl Action {
    /// `reserved`, `identity` or `dropped`, as the CLI prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Reserved => "reserved",
            Action::Identity => "identity",
            Action::Dropped => "dropped",
        }
    }
}

/// A reserved region as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRegion {
    /// The addresses (identity: host and guest physical are the same).
    pub range: MemRange,
    /// Its kind.
    pub kind: RegionKind,
    /// The devices that need it.
    pub devices: Vec<Bdf>,
    /// Platform devices that need it, by ACPI name (IORT named components).
    pub components: Vec<String>,
    /// The policy that decided conflicts on it.
    pub policy: Policy,
    /// What was done.
    pub action: Action,
    /// Where the host said so: the table and entry, or the file
    /// (`DMAR RMRR @0x68`, `IVRS IVMD @0x1a8`, `IORT RMR @0x9e0`, a path).
    pub source: String,
}

/// A region the layout could not honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The region.
    pub range: MemRange,
    /// Its devices.
    pub devices: Vec<Bdf>,
    /// Strict: the plan failed on it; relaxed: it was dropped.
    pub policy: Policy,
    /// A plain sentence naming the range, the devices and what covers it.
    pub message: String,
}

/// An e820 entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// `E820_RAM` (1).
    Ram,
    /// `E820_RESERVED` (2).
    Reserved,
}

impl E820Kind {
    /// `ram` or `reserved`.
    pub fn as_str(&self) -> &'static str {
        match self {
            E820Kind::Ram => "ram",
            E820Kind::Reserved => "reserved",
        }
    }
}

/// One e820 entry, end inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// The addresses.
    pub range: MemRange,
    /// RAM or reserved.
    pub kind: E820Kind,
}

/// What to plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub ram_size: u64,
    /// QEMU's `max-ram-below-4g` as given by the user; `None`: q35's default split.
    pub max_ram_below_4g: Option<u64>,
    /// Regions starting above this may lower low RAM ([`RDM_MEM_BOUNDARY_DEFAULT`]).
    pub rdm_mem_boundary: u64,
    /// Which regions to keep free.
    pub strategy: Strategy,
    /// The global policy if given explicitly; `None`: relaxed for host-strategy regions,
    /// strict for assigned devices (Xen's defaults).
    pub policy: Option<Policy>,
    /// Devices assigned at creation, each with its own policy if given.
    pub assigned: Vec<(Bdf, Option<Policy>)>,
    /// Guest physical address bits ([`DEFAULT_PHYS_BITS`]).
    pub phys_bits: u8,
}

impl LayoutConfig {
    /// `ram_size` bytes of RAM, every other setting at its default.
    pub fn new(ram_size: u64) -> Self {
        Self {
            ram_size,
            max_ram_below_4g: None,
            rdm_mem_boundary: RDM_MEM_BOUNDARY_DEFAULT,
            strategy: Strategy::Ignore,
            policy: None,
            assigned: Vec::new(),
            phys_bits: DEFAULT_PHYS_BITS,
        }
    }
}

/// The planned guest layout: the single source of truth for RAM placement, the e820,
/// the reserved regions and the MMIO windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Guest RAM in bytes, all of it placed.
    pub ram_size: u64,
    /// End of low RAM (exclusive); low RAM is `[0, low_ram_end)`. This is the
    /// `max-ram-below-4g` to give QEMU.
    pub low_ram_end: u64,
    /// End of high RAM (exclusive); high RAM is `[4 GiB, high_ram_end)`, empty when equal.
    pub high_ram_end: u64,
    /// Every region considered, with its action.
    pub regions: Vec<PlannedRegion>,
    /// Relaxed conflicts (warnings); a strict one makes [`plan`] fail instead.
    pub conflicts: Vec<Conflict>,
    /// Other findings worth showing: a shared region assigned under relaxed ("risky").
    pub warnings: Vec<String>,
    /// The guest's memory map, sorted, end inclusive.
    pub e820: Vec<E820Entry>,
    /// 32-bit MMIO window for BARs ([`Q35_PCI_HOLE32`]).
    pub mmio32: MemRange,
    /// 64-bit MMIO window, above high RAM.
    pub mmio64: MemRange,
}

impl Layout {
    /// Bytes of RAM in the e820 (always equals `ram_size` for a planned layout).
    pub fn e820_ram(&self) -> u128 {
        self.e820
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.range.size())
            .sum()
    }

    /// The `max-ram-below-4g` QEMU needs to build this layout: the planned end of low
    /// RAM when it is below where q35 would end it by itself, else `None`.
    pub fn max_ram_below_4g(&self) -> Option<u64> {
        (self.low_ram_end < self.ram_size.min(q35_low_ram_limit(self.ram_size)))
            .then_some(self.low_ram_end)
    }

    /// The regions a device will see reserved (for its PROBE RESV_MEM list), i.e. the
    /// kept regions that list it.
    pub fn reserved_for(&self, bdf: Bdf) -> Vec<&PlannedRegion> {
        self.regions
            .iter()
            .filter(|r| r.action != Action::Dropped && r.devices.contains(&bdf))
            .collect()
    }
}

/// `v` rounded up to a multiple of the power of two `align`; `None` on overflow.
fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Where QEMU's q35 ends low RAM by itself for `ram` bytes (no `max-ram-below-4g`):
/// at 2 GiB from 0xB000_0000 bytes of RAM on, else below the MMCONFIG window
/// (`pc_q35_init`).
pub fn q35_low_ram_limit(ram: u64) -> u64 {
    if ram >= Q35_SPLIT_THRESHOLD {
        Q35_LOWMEM_SPLIT
    } else {
        Q35_SPLIT_THRESHOLD
    }
}

/// Plans a layout.
///
/// # Errors
/// [`LayoutError::BadRamSize`], [`LayoutError::BadMaxRamBelow4g`],
/// [`LayoutError::RamTooLarge`], [`LayoutError::TooManyE820`], and
/// [`LayoutError::StrictConflict`] with every region and conflict when a strict region
/// cannot be kept free.
pub fn plan(cfg: &LayoutConfig, db: &RdmDatabase) -> Result<Layout, LayoutError> {
    let ram = cfg.ram_size;
    if ram == 0 || !ram.is_multiple_of(PAGE_SIZE) {
        return Err(LayoutError::BadRamSize { size: ram });
    }
    if let Some(v) = cfg.max_ram_below_4g {
        if v == 0 || !v.is_multiple_of(PAGE_SIZE) || v > FOUR_GIB {
            return Err(LayoutError::BadMaxRamBelow4g { value: v });
        }
    }
    // QEMU q35: min(qemu limit, user limit).
    let mut lowmem = q35_low_ram_limit(ram);
    if let Some(user) = cfg.max_ram_below_4g {
        lowmem = lowmem.min(user);
    }
    let mut low_end = ram.min(lowmem);
    // u128: 4 GiB + RAM cannot overflow, the address-width check comes later.
    let mut high_end: u128 = u128::from(FOUR_GIB) + u128::from(ram - low_end);

    let Collected {
        mut regions,
        shared,
        warnings,
    } = collect(cfg, db);

    // Pass 1: only low memory, only above the boundary.
    for r in &regions {
        if r.range.overlaps_span(0, low_end) && r.range.start() > cfg.rdm_mem_boundary {
            let mut s = r.range.start();
            if s > SUPERPAGE {
                s &= !(SUPERPAGE - 1);
            }
            high_end += u128::from(low_end - s);
            low_end = s;
        }
    }
    let limit = 1u128 << cfg.phys_bits.min(64);
    if high_end > limit {
        return Err(LayoutError::RamTooLarge {
            end: high_end,
            bits: cfg.phys_bits,
        });
    }
    // high_end ≤ 2^64 here; a range ending at 2^64 - 1 is representable.
    let high_last = u64::try_from(high_end - 1).unwrap_or(u64::MAX);

    let high = if high_end > u128::from(FOUR_GIB) {
        MemRange::span(FOUR_GIB, high_last)
    } else {
        None
    };

    // Pass 2: everything still in conflict.
    let mut conflicts = Vec::new();
    for r in &mut regions {
        let devices = device_list(&r.devices);
        let covered_by = if r.range.overlaps_span(0, low_end) {
            Some(format!(
                "low RAM [0x0-{:#x}] covers it (only regions starting above the {:#x} boundary move low RAM)",
                low_end - 1,
                cfg.rdm_mem_boundary
            ))
        } else if high.is_some_and(|h| r.range.overlaps(&h)) {
            Some(format!(
                "high RAM [{FOUR_GIB:#x}-{high_last:#x}] covers it (regions above 4 GiB are never moved around)"
            ))
        } else if r.kind.is_direct() && r.range.overlaps(&Q35_MMCONFIG) {
            Some(format!(
                "it overlaps q35's PCIe MMCONFIG window {Q35_MMCONFIG}"
            ))
        } else if r.kind.is_direct() && r.range.overlaps(&X86_PLATFORM) {
            Some(format!(
                "it overlaps the fixed IOAPIC/HPET/LAPIC/firmware window {X86_PLATFORM}"
            ))
        } else {
            None
        };
        if let Some(why) = covered_by {
            let verdict = match r.policy {
                Policy::Strict => "strict: the layout cannot honour it",
                Policy::Relaxed => "relaxed: dropped from the e820",
            };
            conflicts.push(Conflict {
                range: r.range,
                devices: r.devices.clone(),
                policy: r.policy,
                message: format!(
                    "reserved region {} of {} conflicts: {why}; {verdict}",
                    r.range,
                    if devices.is_empty() {
                        "no device".to_string()
                    } else {
                        devices
                    }
                ),
            });
            if r.policy == Policy::Relaxed {
                r.action = Action::Dropped;
            }
        }
    }
    // Shared-region refusals come first: they name what the user must change.
    conflicts.splice(0..0, shared);
    if conflicts.iter().any(|c| c.policy == Policy::Strict) {
        return Err(LayoutError::StrictConflict(Box::new(Rejected {
            regions,
            conflicts,
            warnings,
        })));
    }

    // e820: low RAM, kept regions, high RAM (libxl_x86.c domain_construct_memmap).
    let mut e820 = Vec::new();
    if let Some(low) = low_end
        .checked_sub(1)
        .and_then(|last| MemRange::span(0, last))
    {
        e820.push(E820Entry {
            range: low,
            kind: E820Kind::Ram,
        });
    }
    for r in regions.iter().filter(|r| r.action != Action::Dropped) {
        e820.push(E820Entry {
            range: r.range,
            kind: E820Kind::Reserved,
        });
    }
    if let Some(h) = high {
        e820.push(E820Entry {
            range: h,
            kind: E820Kind::Ram,
        });
    }
    e820.sort_by_key(|e| (e.range.start(), e.range.end()));
    if e820.len() > E820_MAX {
        return Err(LayoutError::TooManyE820 {
            count: e820.len(),
            max: E820_MAX,
        });
    }

    let hole64_start = u64::try_from(high_end)
        .ok()
        .and_then(|h| align_up(h.max(FOUR_GIB), PCI_HOLE64_ALIGN));
    let mmio64 = hole64_start
        .and_then(|s| MemRange::from_len(s, Q35_PCI_HOLE64_SIZE).ok())
        .filter(|w| u128::from(w.end()) < limit)
        // No room above RAM: an empty-as-possible window the allocator cannot use.
        .unwrap_or(Q35_PCI_HOLE32);
    let layout = Layout {
        ram_size: ram,
        low_ram_end: low_end,
        high_ram_end: u64::try_from(high_end).unwrap_or(u64::MAX),
        regions,
        conflicts,
        warnings,
        e820,
        mmio32: Q35_PCI_HOLE32,
        mmio64,
    };
    debug_assert_eq!(layout.e820_ram(), u128::from(ram), "RAM must never be lost");
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reserved_regions::ResvRegion;
    use std::collections::BTreeSet;

    pub(super) const GIB: u64 = 1 << 30;
    pub(super) const MIB: u64 = 1 << 20;

    pub(super) fn bdf(s: &str) -> Bdf {
        s.parse().expect("valid bdf")
    }

    /// A database with one region per (start, end, kind, devices).
    pub(super) fn db(regions: &[(u64, u64, RegionKind, &[&str])]) -> RdmDatabase {
        let mut db = RdmDatabase::new();
        for (i, (s, e, kind, devs)) in regions.iter().enumerate() {
            let r = [ResvRegion {
                range: MemRange::new(*s, *e).expect("valid"),
                kind: *kind,
            }];
            let devs: BTreeSet<Bdf> = devs.iter().map(|d| bdf(d)).collect();
            db.add_reserved_regions(&r, &devs, &format!("test {i}"))
                .expect("no overlap");
        }
        db
    }

    pub(super) fn assigned(cfg: &mut LayoutConfig, d: &str, p: Option<Policy>) {
        cfg.assigned.push((bdf(d), p));
    }

    #[test]
    fn layout_initial_split_follows_q35() {
        let empty = RdmDatabase::new();
        let l = plan(&LayoutConfig::new(2 * GIB), &empty).expect("plan");
        assert_eq!((l.low_ram_end, l.high_ram_end), (2 * GIB, FOUR_GIB));
        let l = plan(&LayoutConfig::new(0xA000_0000), &empty).expect("plan");
        assert_eq!(
            l.low_ram_end, 0xA000_0000,
            "below 0xB0000000 all RAM stays low"
        );
        let l = plan(&LayoutConfig::new(0xB000_0000), &empty).expect("plan");
        assert_eq!(
            (l.low_ram_end, l.high_ram_end),
            (2 * GIB, FOUR_GIB + 0x3000_0000)
        );
        let mut cfg = LayoutConfig::new(4 * GIB);
        cfg.max_ram_below_4g = Some(GIB);
        let l = plan(&cfg, &empty).expect("plan");
        assert_eq!((l.low_ram_end, l.high_ram_end), (GIB, FOUR_GIB + 3 * GIB));
        assert_eq!(l.e820_ram(), u128::from(4 * GIB));
        assert!(matches!(
            plan(&LayoutConfig::new(4097), &empty),
            Err(LayoutError::BadRamSize { size: 4097 })
        ));
    }

    #[test]
    fn layout_rdm_above_boundary_lowers_low_ram_and_grows_high_ram_by_the_same_amount() {
        // 2.5 GiB stays all below 4 GiB on q35; an RMRR at 2 GiB + 259 MiB + 4 KiB is above
        // the 2 GiB boundary, so low RAM ends at its start rounded down to 2 MiB.
        let d = db(&[(0x9030_1000, 0x9030_ffff, RegionKind::Direct, &["00:14.0"])]);
        let mut cfg = LayoutConfig::new(0xA000_0000);
        assigned(&mut cfg, "00:14.0", None);
        let l = plan(&cfg, &d).expect("resolvable");
        assert_eq!(l.low_ram_end, 0x9020_0000);
        assert_eq!(l.high_ram_end, FOUR_GIB + (0xA000_0000 - 0x9020_0000));
        assert_eq!(l.e820_ram(), u128::from(cfg.ram_size), "no RAM lost");
        assert_eq!(l.regions[0].action, Action::Identity);
        assert!(l.conflicts.is_empty());
    }

    #[test]
    fn layout_rdm_below_boundary_strict_fails() {
        let d = db(&[(GIB, GIB + 0xfff, RegionKind::Direct, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(4 * GIB);
        assigned(&mut cfg, "00:02.0", None); // assigned devices default to strict
        match plan(&cfg, &d) {
            Err(LayoutError::StrictConflict(r)) => {
                assert_eq!(r.conflicts.len(), 1);
                assert!(r.conflicts[0].message.contains("00:02.0"));
                assert!(r.conflicts[0].message.contains("0x40000000"));
            }
            other => panic!("expected a strict conflict, got {other:?}"),
        }
    }

    #[test]
    fn layout_rdm_below_boundary_relaxed_drops_the_entry_from_e820() {
        let d = db(&[(GIB, GIB + 0xfff, RegionKind::Direct, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(4 * GIB);
        assigned(&mut cfg, "00:02.0", Some(Policy::Relaxed));
        let l = plan(&cfg, &d).expect("relaxed plans");
        assert_eq!(l.regions[0].action, Action::Dropped);
        assert_eq!(l.conflicts.len(), 1);
        assert!(l.e820.iter().all(|e| e.kind == E820Kind::Ram));
        assert_eq!(l.e820_ram(), u128::from(4 * GIB));
    }

    #[test]
    fn layout_rdm_above_4g_overlapping_high_ram_policy_applies() {
        let d = db(&[(5 * GIB, 5 * GIB + 0xfff, RegionKind::Direct, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(4 * GIB); // high RAM is [4G, 6G)
        assigned(&mut cfg, "00:02.0", Some(Policy::Strict));
        assert!(matches!(
            plan(&cfg, &d),
            Err(LayoutError::StrictConflict(_))
        ));
        cfg.assigned[0].1 = Some(Policy::Relaxed);
        let l = plan(&cfg, &d).expect("relaxed");
        assert_eq!(l.regions[0].action, Action::Dropped);
        assert!(l.conflicts[0].message.contains("high RAM"));
    }

    #[test]
    fn layout_e820_is_sorted_with_ram_and_reserved_types() {
        let d = db(&[
            (0xDB80_0000, 0xDF9F_FFFF, RegionKind::Direct, &["00:02.0"]),
            (
                0xDA2F_0000,
                0xDA30_6FFF,
                RegionKind::Direct,
                &["00:1d.0", "00:14.0"],
            ),
        ]);
        let mut cfg = LayoutConfig::new(8 * GIB);
        cfg.strategy = Strategy::Host;
        let l = plan(&cfg, &d).expect("plan");
        let kinds: Vec<_> = l.e820.iter().map(|e| (e.range.start(), e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, E820Kind::Ram),
                (0xDA2F_0000, E820Kind::Reserved),
                (0xDB80_0000, E820Kind::Reserved),
                (FOUR_GIB, E820Kind::Ram),
            ]
        );
        assert_eq!(l.e820[3].range.end(), FOUR_GIB + 6 * GIB - 1);
    }

    #[test]
    fn layout_e820max_overflow_is_an_error() {
        let mut d = RdmDatabase::new();
        for i in 0..E820_MAX as u64 {
            let r = [ResvRegion {
                range: MemRange::from_len(0xC000_0000 + i * 0x10_0000, 0x1000).expect("ok"),
                kind: RegionKind::Reserved,
            }];
            d.add_reserved_regions(&r, &[bdf("00:03.0")].into(), "many")
                .expect("ok");
        }
        let mut cfg = LayoutConfig::new(GIB);
        cfg.strategy = Strategy::Host;
        assert_eq!(
            plan(&cfg, &d),
            Err(LayoutError::TooManyE820 {
                count: E820_MAX + 1,
                max: E820_MAX
            })
        );
    }

    #[test]
    fn layout_direct_region_on_mmconfig_conflicts() {
        let d = db(&[(0xB000_0000, 0xB000_0FFF, RegionKind::Direct, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(GIB);
        assigned(&mut cfg, "00:02.0", None);
        match plan(&cfg, &d) {
            Err(LayoutError::StrictConflict(r)) => {
                assert!(r.conflicts[0].message.contains("MMCONFIG"))
            }
            other => panic!("expected strict conflict, got {other:?}"),
        }
    }

    #[test]
    fn layout_msi_window_is_kept_out_but_not_a_conflict() {
        let d = db(&[(0xFEE0_0000, 0xFEEF_FFFF, RegionKind::Msi, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(GIB);
        assigned(&mut cfg, "00:02.0", None);
        let l = plan(&cfg, &d).expect("plan");
        assert_eq!(l.regions[0].action, Action::Reserved);
        assert!(l.conflicts.is_empty());
        assert_eq!(l.reserved_for(bdf("00:02.0")).len(), 1);
    }

    #[test]
    fn layout_ram_past_the_address_width_is_refused() {
        let mut cfg = LayoutConfig::new(1 << 40);
        cfg.phys_bits = 40;
        assert!(matches!(
            plan(&cfg, &RdmDatabase::new()),
            Err(LayoutError::RamTooLarge { bits: 40, .. })
        ));
    }
}
