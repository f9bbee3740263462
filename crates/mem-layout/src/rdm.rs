//! The host's reserved device memory: every region some device needs, with the devices
//! that need it, gathered from the DMAR RMRRs (Intel), the IVRS IVMDs (AMD), the IORT
//! RMR nodes (Arm) and Linux `reserved_regions` files, after the sanity checks Linux and
//! Xen apply. One database for all of them: each region says where it came from
//! ([`HostRegion::source`], e.g. `IVRS IVMD @0x1a8`).
//!
//! Rules (Linux `drivers/iommu/intel/iommu.c`, Xen `xen/drivers/passthrough/vtd/dmar.c`):
//! - limit below base: an error (Xen `acpi_parse_one_rmrr` "is incorrect").
//! - base or `limit + 1` not page aligned, or `limit == base`: Linux `rmrr_sanity_check`
//!   prints `FW_BUG "Your BIOS is broken; bad RMRR"`, taints, and **still uses** the
//!   region; here it is a [`Warning`] and the region is rounded out to whole pages, so
//!   nothing that shares a page with it is placed there.
//! - two RMRRs of one table overlapping: an error (Xen "Overlapping RMRRs", `-EEXIST`).
//!   Between sources (a DMAR and several groups' files) the identical range is one
//!   region whose device sets merge; any other overlap is an error.
//! - an RMRR none of whose devices is present is ignored with a warning (Xen returns 1).
//! - an RMRR over host RAM is an error; over a hole, a warning (Xen
//!   `iommu_unity_region_ok`), see [`RdmDatabase::check_host_e820`].
//!
//! IVRS IVMDs (Linux `init_memory_definitions` / `init_unity_map_range` in
//! `drivers/iommu/amd/init.c`, `amd_iommu_get_resv_regions` in `iommu.c`):
//! - an IVMD with neither the unity nor the exclusion flag is ignored;
//! - type 0x21 names one device ID, 0x22 the IDs from its device ID to its auxiliary
//!   data, 0x20 every ID from 0 to the highest any IVHD of the segment names;
//! - the start is rounded **up** to a page and the length up to whole pages
//!   (`PAGE_ALIGN`), with a warning here when either was not aligned;
//! - an exclusion range is treated as a read/write unity map (`direct`), as Linux has
//!   done since 5.5 ("Treat per-device exclusion ranges as r/w unity-mapped regions");
//! - identical ranges merge their devices; a partial overlap is an error (Xen's AMD
//!   code, "AMD/IOMMU: correct device unity map handling", checks for overlaps).
//!
//! IORT RMR nodes (Linux `iort_find_rmrs`, `iort_node_get_rmr_info`, `iort_get_rmrs`,
//! `iort_rmr_alloc` in `drivers/acpi/arm64/iort.c`):
//! - only tables of revision 5 (DEN 0049E.d) or later: older ones' RMR nodes are
//!   ignored with a warning (E.c's RMR node is deprecated);
//! - an RMR node without ID mappings is skipped (`FW_BUG "Invalid ID mapping"`), one
//!   without descriptors has nothing to say;
//! - its stream IDs are each mapping's output IDs on an SMMU (`id_count` is the number
//!   of IDs minus one); the devices are the root-complex requester IDs (PCI functions)
//!   and named components whose own mappings produce those stream IDs on that SMMU;
//! - flag bit 0 (remapping permitted) makes the region `direct-relaxable`, else
//!   `direct`;
//! - a descriptor not aligned to 64 KiB is used rounded out to whole pages with a
//!   warning; a zero-length one, or two of one node overlapping, are errors here (Linux
//!   prints `FW_BUG … continue anyway`; an empty or ambiguous range cannot be reserved).
//!
//! [`RdmDatabase::query`] answers like `XENMEM_reserved_device_memory_map` (Xen
//! `xen/include/public/memory.h`, `xen/common/memory.c`): per device or all, and
//! `NoBufs` with the count needed when the buffer is too small.
//!
//! This file holds the database, its DMAR and `reserved_regions` sources, the host e820
//! check and the query; the IVRS and IORT sources are its submodules `ivmd` and `rmr`.

mod ivmd;
mod rmr;

pub use ivmd::MAX_IVRS_DEVICE_PAIRS;

use crate::dmar::{BridgeResolver, Dmar};
use crate::layout::{E820Entry, E820Kind};
use crate::reserved_regions::ResvRegion;
use crate::types::{Bdf, MemRange, RegionKind};
use std::collections::BTreeSet;

/// Errors of this module: regions that cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdmError {
    /// An RMRR whose limit is below its base.
    #[error("RMRR at table offset {offset:#x}: limit {limit:#x} is below base {base:#x}")]
    LimitBelowBase {
        /// Table offset of the RMRR.
        offset: usize,
        /// Base address.
        base: u64,
        /// Limit address.
        limit: u64,
    },
    /// Two regions overlap without being identical.
    #[error("reserved region {new} (from {new_source}) overlaps {old} (from {old_source})")]
    Overlap {
        /// The region being added.
        new: MemRange,
        /// Where it came from.
        new_source: String,
        /// The region already known.
        old: MemRange,
        /// Where that came from.
        old_source: String,
    },
    /// A direct region lies on host RAM, which cannot be turned into reserved memory.
    #[error("reserved region {range} of {devices} lies on host RAM at {ram}")]
    OverHostRam {
        /// The region.
        range: MemRange,
        /// Its devices, as text.
        devices: String,
        /// The host RAM range underneath.
        ram: MemRange,
    },
    /// A range of length zero (IVMD, IORT RMR descriptor).
    #[error("{entry}: the range at {start:#x} has length zero")]
    ZeroLength {
        /// The table entry, with its offset.
        entry: String,
        /// Its start.
        start: u64,
    },
    /// IVMDs that together name more (region, device) pairs than the bound.
    #[error("{entry}: the IVMDs so far name {pairs} (region, device) pairs, more than the {max} this database takes")]
    TooManyDevices {
        /// The IVMD that passed the bound, with its offset.
        entry: String,
        /// Pairs named up to and including it.
        pairs: usize,
        /// [`MAX_IVRS_DEVICE_PAIRS`].
        max: usize,
    },
    /// A range that runs past the top of the address space.
    #[error("{entry}: the range at {start:#x} of length {length:#x} runs past 2^64")]
    PastTop {
        /// The table entry, with its offset.
        entry: String,
        /// Its start.
        start: u64,
        /// Its length.
        length: u64,
    },
    /// The caller's buffer holds fewer entries than exist (`-ENOBUFS`).
    #[error("{required} reserved regions match but the buffer holds {capacity}")]
    NoBufs {
        /// Entries that match.
        required: usize,
        /// Buffer length given.
        capacity: usize,
    },
}

/// A finding that does not stop planning but must be shown (Linux taints; Xen warns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The region concerned.
    pub range: MemRange,
    /// A plain sentence.
    pub message: String,
}

/// One host region and the devices that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegion {
    /// Page-granular addresses (rounded out when firmware gave less).
    pub range: MemRange,
    /// What it is.
    pub kind: RegionKind,
    /// The devices that need it (several: a shared region).
    pub devices: BTreeSet<Bdf>,
    /// Platform devices that need it, by ACPI name (IORT named components such as
    /// `\_SB_.DPU0`); they have no PCI address, so they can be listed but not assigned.
    pub components: BTreeSet<String>,
    /// Where it came from, for messages (`DMAR RMRR @0x68`, a file name…).
    pub source: String,
}

/// One entry of a [`RdmDatabase::query`] answer (`struct xen_reserved_device_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmEntry {
    /// First page frame number.
    pub start_pfn: u64,
    /// Number of 4 KiB pages.
    pub nr_pages: u64,
}

/// Which regions [`RdmDatabase::query`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryFilter {
    /// `XENMEM_RDM_ALL`: every direct region.
    All,
    /// The direct regions of one device.
    Device(Bdf),
}

/// The host's reserved regions, sanity-checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmDatabase {
    regions: Vec<HostRegion>,
    warnings: Vec<Warning>,
}

impl RdmDatabase {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// All regions, sorted by start.
    pub fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// Findings that did not stop anything (bad alignment, absent devices…).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// The regions a device needs.
    pub fn for_device(&self, bdf: Bdf) -> impl Iterator<Item = &HostRegion> {
        self.regions
            .iter()
            .filter(move |r| r.devices.contains(&bdf))
    }

    /// Adds one region: identical range → devices merge (unless `no_merge` says the
    /// old one's source is the same table or node: it must not list a range twice);
    /// any other overlap → error.
    fn insert(
        &mut self,
        new: HostRegion,
        no_merge: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<(), RdmError> {
        if let Some(old) = self
            .regions
            .iter_mut()
            .find(|r| r.range.overlaps(&new.range))
        {
            let same_table = no_merge.is_some_and(|f| old.source.split("; ").any(f));
            if !same_table && old.range == new.range {
                old.devices.extend(new.devices);
                old.components.extend(new.components);
                // Say every place that listed it.
                if !old.source.split("; ").any(|s| s == new.source) {
                    old.source = format!("{}; {}", old.source, new.source);
                }
                // The stricter meaning wins: a region one source calls direct stays direct.
                old.kind = old.kind.min(new.kind);
                return Ok(());
            }
            return Err(RdmError::Overlap {
                new: new.range,
                new_source: new.source,
                old: old.range,
                old_source: old.source.clone(),
            });
        }
        let at = self
            .regions
            .partition_point(|r| r.range.start() < new.range.start());
        self.regions.insert(at, new);
        Ok(())
    }

    /// Adds a DMAR's RMRRs. `present`, when given, is the set of devices that exist
    /// (Xen ignores an RMRR none of whose devices is PCI-discoverable).
    ///
    /// # Errors
    /// [`RdmError::LimitBelowBase`], [`RdmError::Overlap`]. Nothing is added on error.
    pub fn add_dmar(
        &mut self,
        dmar: &Dmar,
        resolver: &dyn BridgeResolver,
        present: Option<&BTreeSet<Bdf>>,
    ) -> Result<(), RdmError> {
        let mut next = self.clone();
        for rmrr in &dmar.rmrrs {
            let raw =
                MemRange::new(rmrr.base, rmrr.limit).map_err(|_| RdmError::LimitBelowBase {
                    offset: rmrr.offset,
                    base: rmrr.base,
                    limit: rmrr.limit,
                })?;
            let mut range = raw;
            // Linux: !IS_ALIGNED(start) || !IS_ALIGNED(end + 1) || end <= start → FW_BUG.
            if !raw.is_page_aligned() || raw.start() == raw.end() {
                range = raw.page_round_out();
                next.warnings.push(Warning {
                    range,
                    message: format!(
                        "Your BIOS is broken; bad RMRR [{:#018x}-{:#018x}] at table offset {:#x}: used rounded out to whole pages",
                        rmrr.base, rmrr.limit, rmrr.offset
                    ),
                });
            }
            let devices: BTreeSet<Bdf> = rmrr
                .scopes
                .iter()
                .filter_map(|s| s.bdf(rmrr.segment, resolver))
                .filter(|b| present.is_none_or(|p| p.contains(b)))
                .collect();
            if devices.is_empty() {
                next.warnings.push(Warning {
                    range,
                    message: format!(
                        "RMRR {raw} at table offset {:#x} names no present PCI device: ignored",
                        rmrr.offset
                    ),
                });
                continue;
            }
            // Within one table, any overlap is an error, identical ranges included.
            next.insert(
                HostRegion {
                    range,
                    kind: RegionKind::Direct,
                    devices,
                    components: BTreeSet::new(),
                    source: format!("DMAR RMRR @{:#x}", rmrr.offset),
                },
                Some(&|s: &str| s.starts_with("DMAR")),
            )?;
        }
        *self = next;
        Ok(())
    }

    /// Adds the lines of one IOMMU group's `reserved_regions`, needed by `devices` (the
    /// group's members). Identical ranges merge; MSI windows are the same for every
    /// group and merge too.
    ///
    /// # Errors
    /// [`RdmError::Overlap`]. Nothing is added on error.
    pub fn add_reserved_regions(
        &mut self,
        regions: &[ResvRegion],
        devices: &BTreeSet<Bdf>,
        source: &str,
    ) -> Result<(), RdmError> {
        let mut next = self.clone();
        for r in regions {
            let mut range = r.range;
            if !range.is_page_aligned() {
                range = range.page_round_out();
                next.warnings.push(Warning {
                    range,
                    message: format!(
                        "{source}: region {} is not page aligned: used rounded out to whole pages",
                        r.range
                    ),
                });
            }
            next.insert(
                HostRegion {
                    range,
                    kind: r.kind,
                    devices: devices.clone(),
                    components: BTreeSet::new(),
                    source: source.to_string(),
                },
                None,
            )?;
        }
        *self = next;
        Ok(())
    }

    /// Checks direct regions against the host's own memory map, as Xen's
    /// `iommu_unity_region_ok`: reserved underneath is right, RAM underneath is an error,
    /// a gap (unknown type) is a warning (Xen adds it as reserved).
    ///
    /// # Errors
    /// [`RdmError::OverHostRam`] for the first direct region on RAM.
    pub fn check_host_e820(&mut self, host: &[E820Entry]) -> Result<(), RdmError> {
        for r in self.regions.iter().filter(|r| r.kind.is_direct()) {
            if let Some(ram) = host
                .iter()
                .find(|e| e.kind == E820Kind::Ram && e.range.overlaps(&r.range))
            {
                return Err(RdmError::OverHostRam {
                    range: r.range,
                    devices: device_list(&r.devices),
                    ram: ram.range,
                });
            }
            let covered = host
                .iter()
                .filter(|e| e.kind == E820Kind::Reserved && e.range.overlaps(&r.range))
                .map(|e| e.range)
                .collect::<Vec<_>>();
            if !covers(&covered, &r.range) {
                self.warnings.push(Warning {
                    range: r.range,
                    message: format!(
                        "reserved region {} of {} is not all E820 reserved on the host: treated as reserved",
                        r.range,
                        device_list(&r.devices)
                    ),
                });
            }
        }
        Ok(())
    }

    /// The direct regions of one device, or all, as page frames, into `buf`; returns how
    /// many were written (`XENMEM_reserved_device_memory_map`).
    ///
    /// # Errors
    /// [`RdmError::NoBufs`] with the count needed when `buf` is too short; the caller
    /// retries with a buffer that size.
    pub fn query(&self, filter: QueryFilter, buf: &mut [RdmEntry]) -> Result<usize, RdmError> {
        let matching: Vec<&HostRegion> = self
            .regions
            .iter()
            .filter(|r| r.kind.is_direct())
            .filter(|r| match filter {
                QueryFilter::All => true,
                QueryFilter::Device(b) => r.devices.contains(&b),
            })
            .collect();
        if matching.len() > buf.len() {
            return Err(RdmError::NoBufs {
                required: matching.len(),
                capacity: buf.len(),
            });
        }
        for (slot, r) in buf.iter_mut().zip(&matching) {
            *slot = RdmEntry {
                start_pfn: r.range.start() / crate::types::PAGE_SIZE,
                // Page-granular by construction; u128 → u64 fits as size / 4096 ≤ 2^52.
                nr_pages: (r.range.size() / u128::from(crate::types::PAGE_SIZE)) as u64,
            };
        }
        Ok(matching.len())
    }
}

/// The placeholder range of warnings about a whole entry rather than a range.
const ZERO_PAGE: MemRange = match MemRange::span(0, crate::types::PAGE_SIZE - 1) {
    Some(r) => r,
    None => panic!("constant range"),
};

/// The PCI function of a 16-bit device ID (`bus << 8 | device << 3 | function`).
fn device_id_bdf(segment: u16, id: u16) -> Bdf {
    let [bus, devfn] = id.to_be_bytes();
    Bdf {
        segment,
        bus,
        device: devfn >> 3,
        function: devfn & 7,
    }
}

/// Whether the (possibly unsorted, possibly overlapping) `pieces` cover all of `range`.
fn covers(pieces: &[MemRange], range: &MemRange) -> bool {
    let mut sorted = pieces.to_vec();
    sorted.sort();
    let mut next = range.start();
    for p in sorted {
        if p.start() > next {
            return false;
        }
        if p.end() >= range.end() {
            return true;
        }
        next = next.max(p.end() + 1);
    }
    false
}

/// `00:1d.0, 00:1a.0` for messages, in the order given; three or more consecutive
/// functions shrink to a span (`00:00.0-0f:1f.7`), so an IVMD covering a range of
/// peripherals stays one line.
pub fn device_list<'a>(devices: impl IntoIterator<Item = &'a Bdf>) -> String {
    let mut runs: Vec<(Bdf, Bdf, usize)> = Vec::new();
    for b in devices {
        if let Some((_, last, n)) = runs.last_mut() {
            let next = last.requester_id().checked_add(1);
            if b.segment == last.segment && next == Some(b.requester_id()) {
                *last = *b;
                *n += 1;
                continue;
            }
        }
        runs.push((*b, *b, 1));
    }
    runs.iter()
        .flat_map(|(first, last, n)| match n {
            1 => vec![first.to_string()],
            2 => vec![first.to_string(), last.to_string()],
            _ => vec![format!("{first}-{last}")],
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dmar::{self, build, NoBridges};

    pub(super) fn bdf(s: &str) -> Bdf {
        s.parse().expect("valid bdf")
    }

    fn db_of(structs: &[Vec<u8>]) -> Result<RdmDatabase, RdmError> {
        let d = dmar::parse(&build::table(structs)).expect("well-formed");
        let mut db = RdmDatabase::new();
        db.add_dmar(&d, &NoBridges, None)?;
        Ok(db)
    }

    fn usb() -> Vec<u8> {
        build::scope(1, 0, &[(0x14, 0)])
    }

    #[test]
    fn sanity_unaligned_base_is_tainted_and_rounded_out() {
        let db = db_of(&[build::rmrr(0x1000_0800, 0x1000_ffff, &[usb()])]).expect("still used");
        assert_eq!(
            db.regions()[0].range,
            MemRange::new(0x1000_0000, 0x1000_ffff).expect("ok")
        );
        assert!(db.warnings()[0]
            .message
            .contains("Your BIOS is broken; bad RMRR"));
    }

    #[test]
    fn sanity_unaligned_limit_plus_one_is_tainted_and_rounded_out() {
        let db = db_of(&[build::rmrr(0x1000_0000, 0x1000_0ffe, &[usb()])]).expect("still used");
        assert_eq!(db.regions()[0].range.end(), 0x1000_0fff);
        assert_eq!(db.warnings().len(), 1);
    }

    #[test]
    fn sanity_limit_below_base_is_rejected() {
        assert_eq!(
            db_of(&[build::rmrr(0x2000, 0x1fff, &[usb()])]),
            Err(RdmError::LimitBelowBase {
                offset: 48,
                base: 0x2000,
                limit: 0x1fff
            })
        );
    }

    #[test]
    fn sanity_limit_equal_base_is_tainted() {
        let db = db_of(&[build::rmrr(0x3000, 0x3000, &[usb()])]).expect("still used");
        assert_eq!(
            db.regions()[0].range,
            MemRange::new(0x3000, 0x3fff).expect("ok")
        );
        assert_eq!(db.warnings().len(), 1);
    }

    #[test]
    fn sanity_overlapping_rmrrs_are_rejected() {
        let e = db_of(&[
            build::rmrr(0x10_0000, 0x1f_ffff, &[usb()]),
            build::rmrr(0x18_0000, 0x27_ffff, &[build::scope(1, 0, &[(2, 0)])]),
        ]);
        assert!(matches!(e, Err(RdmError::Overlap { .. })), "{e:?}");
        // Identical duplicates inside one table overlap too (Xen -EEXIST).
        let e = db_of(&[
            build::rmrr(0x10_0000, 0x1f_ffff, &[usb()]),
            build::rmrr(0x10_0000, 0x1f_ffff, &[usb()]),
        ]);
        assert!(matches!(e, Err(RdmError::Overlap { .. })));
    }

    #[test]
    fn sanity_rmrr_whose_devices_are_absent_is_ignored() {
        let d = dmar::parse(&build::table(&[build::rmrr(
            0x10_0000,
            0x1f_ffff,
            &[usb()],
        )]))
        .expect("well-formed");
        let mut db = RdmDatabase::new();
        let present: BTreeSet<Bdf> = [bdf("00:02.0")].into();
        db.add_dmar(&d, &NoBridges, Some(&present))
            .expect("ignored, not an error");
        assert!(db.regions().is_empty());
        assert!(db.warnings()[0].message.contains("no present PCI device"));
    }

    #[test]
    fn sanity_rmrr_over_host_ram_is_rejected_and_over_a_gap_warned() {
        let mut db = db_of(&[build::rmrr(0x10_0000, 0x1f_ffff, &[usb()])]).expect("ok");
        let ram = [E820Entry {
            range: MemRange::new(0, 0x7fff_ffff).expect("ok"),
            kind: E820Kind::Ram,
        }];
        assert!(matches!(
            db.check_host_e820(&ram),
            Err(RdmError::OverHostRam { .. })
        ));
        let half = [E820Entry {
            range: MemRange::new(0x10_0000, 0x17_ffff).expect("ok"),
            kind: E820Kind::Reserved,
        }];
        db.check_host_e820(&half).expect("a gap is only a warning");
        assert!(db
            .warnings()
            .iter()
            .any(|w| w.message.contains("not all E820 reserved")));
        let full = [E820Entry {
            range: MemRange::new(0x10_0000, 0x1f_ffff).expect("ok"),
            kind: E820Kind::Reserved,
        }];
        let mut db2 = db_of(&[build::rmrr(0x10_0000, 0x1f_ffff, &[usb()])]).expect("ok");
        db2.check_host_e820(&full).expect("reserved underneath");
        assert!(db2.warnings().is_empty());
    }

    #[test]
    fn identical_regions_from_several_groups_merge_their_devices() {
        let mut db = RdmDatabase::new();
        let r = crate::reserved_regions::parse(
            "0x00000000da2f0000 0x00000000da306fff direct\n0x00000000fee00000 0x00000000feefffff msi\n",
        )
        .expect("ok");
        db.add_reserved_regions(&r, &[bdf("00:1d.0")].into(), "group 5")
            .expect("ok");
        db.add_reserved_regions(&r, &[bdf("00:1a.0")].into(), "group 6")
            .expect("ok");
        assert_eq!(db.regions().len(), 2);
        assert_eq!(db.regions()[0].devices.len(), 2);
        let partial =
            crate::reserved_regions::parse("0x00000000da300000 0x00000000da3fffff direct\n")
                .expect("ok");
        let before = db.clone();
        assert!(db
            .add_reserved_regions(&partial, &[bdf("00:14.0")].into(), "group 7")
            .is_err());
        assert_eq!(db, before, "a failed add leaves no trace");
    }

    #[test]
    fn device_list_shrinks_three_or_more_consecutive_functions_to_a_span() {
        let many: Vec<Bdf> = (0..=0xfffu16)
            .map(|id| Bdf::new(0, (id >> 8) as u8, ((id >> 3) & 0x1f) as u8, (id & 7) as u8))
            .collect::<Result<_, _>>()
            .expect("valid");
        assert_eq!(device_list(&many), "00:00.0-0f:1f.7");
        let few = [
            bdf("00:1d.0"),
            bdf("00:1a.0"),
            bdf("00:1a.1"),
            bdf("00:14.0"),
        ];
        assert_eq!(device_list(&few), "00:1d.0, 00:1a.0, 00:1a.1, 00:14.0");
    }

    #[test]
    fn query_per_device_vs_all() {
        let db = db_of(&[
            build::rmrr(
                0x10_0000,
                0x1f_ffff,
                &[usb(), build::scope(1, 0, &[(0x1a, 0)])],
            ),
            build::rmrr(0x80_0000, 0x80_0fff, &[build::scope(1, 0, &[(2, 0)])]),
        ])
        .expect("ok");
        let mut buf = [RdmEntry::default(); 4];
        assert_eq!(db.query(QueryFilter::All, &mut buf), Ok(2));
        assert_eq!(
            db.query(QueryFilter::Device(bdf("00:02.0")), &mut buf),
            Ok(1)
        );
        assert_eq!(
            buf[0],
            RdmEntry {
                start_pfn: 0x800,
                nr_pages: 1
            }
        );
        assert_eq!(
            db.query(QueryFilter::Device(bdf("00:03.0")), &mut buf),
            Ok(0)
        );
    }

    #[test]
    fn query_capacity_too_small_is_enobufs_with_required_count_then_succeeds() {
        let db = db_of(&[
            build::rmrr(0x10_0000, 0x1f_ffff, &[usb()]),
            build::rmrr(0x80_0000, 0x80_0fff, &[usb()]),
        ])
        .expect("ok");
        let mut none: [RdmEntry; 0] = [];
        let required = match db.query(QueryFilter::All, &mut none) {
            Err(RdmError::NoBufs {
                required,
                capacity: 0,
            }) => required,
            other => panic!("expected NoBufs, got {other:?}"),
        };
        assert_eq!(required, 2);
        let mut buf = vec![RdmEntry::default(); required];
        assert_eq!(db.query(QueryFilter::All, &mut buf), Ok(2));
        assert_eq!(
            buf[0],
            RdmEntry {
                start_pfn: 0x100,
                nr_pages: 0x100
            }
        );
    }
}
