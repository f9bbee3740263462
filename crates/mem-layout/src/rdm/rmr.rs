//! IORT RMR nodes (Arm) into the host region database: [`RdmDatabase::add_iort`] with
//! Linux's rules (listed in the parent module's docs), following each node's ID
//! mappings to the root complexes' requester IDs and the named components behind its
//! stream IDs. The table itself is parsed by [`crate::iort`]; the database, its merge
//! and overlap rules live in [`crate::rdm`].

use super::{device_id_bdf, HostRegion, RdmDatabase, RdmError, Warning, ZERO_PAGE};
use crate::iort::{Iort, Node, NodeKind, RMR_REMAP_PERMITTED};
use crate::types::{Bdf, MemRange, RegionKind};
use std::collections::BTreeSet;

/// RMR descriptors should be 64 KiB aligned (DEN 0049E.d; Linux `iort_rmr_alloc`).
const RMR_ALIGN: u64 = 64 << 10;

impl RdmDatabase {
    /// Adds an IORT table's RMR nodes with Linux's rules ([`crate::rdm`] docs).
    ///
    /// # Errors
    /// [`RdmError::ZeroLength`], [`RdmError::PastTop`], [`RdmError::Overlap`]. Nothing
    /// is added on error.
    pub fn add_iort(&mut self, iort: &Iort) -> Result<(), RdmError> {
        let mut next = self.clone();
        for node in &iort.nodes {
            let NodeKind::Rmr { flags, descriptors } = &node.kind else {
                continue;
            };
            let source = format!("IORT RMR @{:#x}", node.offset);
            let warn = |next: &mut RdmDatabase, message: String| {
                next.warnings.push(Warning {
                    range: ZERO_PAGE,
                    message,
                })
            };
            // Linux iort_find_rmrs: "Only supports ARM DEN 0049E.d onwards".
            if iort.header.revision < 5 {
                warn(
                    &mut next,
                    format!(
                        "{source}: table revision {} is older than 5 (DEN 0049E.d): RMR ignored, as Linux does",
                        iort.header.revision
                    ),
                );
                continue;
            }
            if node.mappings.is_empty() {
                warn(
                    &mut next,
                    format!(
                        "{source}: no ID mappings: RMR node skipped (Linux: Invalid ID mapping)"
                    ),
                );
                continue;
            }
            // Stream IDs per SMMU, from the RMR's own mappings.
            let mut sids: Vec<(u32, u32, u32)> = Vec::new();
            for m in &node.mappings {
                if !iort.node_at(m.output_reference).is_some_and(Node::is_smmu) {
                    warn(
                        &mut next,
                        format!(
                            "{source}: ID mapping at {:#x} does not lead to an SMMU: ignored",
                            m.offset
                        ),
                    );
                    continue;
                }
                let (lo, hi) = m.outputs();
                sids.push((m.output_reference, lo, hi));
            }
            let (devices, components) = rmr_devices(iort, &sids);
            if devices.is_empty() && components.is_empty() {
                warn(
                    &mut next,
                    format!(
                        "{source}: its stream IDs belong to no root complex or named component"
                    ),
                );
            }
            let kind = if flags & RMR_REMAP_PERMITTED != 0 {
                RegionKind::DirectRelaxable
            } else {
                RegionKind::Direct
            };
            for d in descriptors {
                let dsource = format!("{source} descriptor @{:#x}", d.offset);
                if d.length == 0 {
                    return Err(RdmError::ZeroLength {
                        entry: dsource,
                        start: d.base,
                    });
                }
                let past = || RdmError::PastTop {
                    entry: dsource.clone(),
                    start: d.base,
                    length: d.length,
                };
                let raw = MemRange::from_len(d.base, d.length).map_err(|_| past())?;
                let mut range = raw;
                if !d.base.is_multiple_of(RMR_ALIGN) || !d.length.is_multiple_of(RMR_ALIGN) {
                    // Linux: base &= PAGE_MASK; size = PAGE_ALIGN(size + offset_in_page).
                    range = raw.page_round_out();
                    next.warnings.push(Warning {
                        range,
                        message: format!(
                            "{dsource}: {raw} is not aligned to 64K: continued with {range}"
                        ),
                    });
                }
                let node_offset = node.offset;
                next.insert(
                    HostRegion {
                        range,
                        kind,
                        devices: devices.clone(),
                        components: components.clone(),
                        source: source.clone(),
                    },
                    Some(&move |s: &str| s == format!("IORT RMR @{node_offset:#x}")),
                )?;
            }
        }
        *self = next;
        Ok(())
    }
}

/// The PCI functions and named components whose stream IDs fall in `sids`
/// ((SMMU offset, first, last) triples): root complexes map requester IDs to stream
/// IDs, named components their own IDs.
fn rmr_devices(iort: &Iort, sids: &[(u32, u32, u32)]) -> (BTreeSet<Bdf>, BTreeSet<String>) {
    let mut devices = BTreeSet::new();
    let mut components = BTreeSet::new();
    for node in &iort.nodes {
        for m in &node.mappings {
            let (out_lo, out_hi) = m.outputs();
            for &(smmu, lo, hi) in sids {
                if m.output_reference != smmu || out_hi < lo || hi < out_lo {
                    continue;
                }
                match &node.kind {
                    NodeKind::NamedComponent { name } => {
                        components.insert(name.clone());
                    }
                    NodeKind::RootComplex { segment } if !m.single => {
                        let Ok(segment) = u16::try_from(*segment) else {
                            continue;
                        };
                        // The stream IDs both ranges share, back to requester IDs.
                        let (a, b) = (lo.max(out_lo), hi.min(out_hi));
                        let first = u64::from(m.input_base) + u64::from(a - out_lo);
                        let last = u64::from(m.input_base) + u64::from(b - out_lo);
                        for rid in first..=last.min(u64::from(u16::MAX)) {
                            if let Ok(rid) = u16::try_from(rid) {
                                devices.insert(device_id_bdf(segment, rid));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    (devices, components)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdm::tests::bdf;

    fn iort_db(revision: u8, rmrs: &[Vec<u8>]) -> Result<RdmDatabase, RdmError> {
        use crate::iort::build;
        let mut nodes = vec![
            build::smmu_v3(),
            build::root_complex(0, build::SMMU_AT),
            build::named("\\_SB_.DPU0", 0x1_0000, build::SMMU_AT),
        ];
        nodes.extend(rmrs.iter().cloned());
        let t = crate::iort::parse(&build::table(revision, &nodes)).expect("well-formed");
        let mut db = RdmDatabase::new();
        db.add_iort(&t)?;
        Ok(db)
    }

    fn rmr(flags: u32, descs: &[(u64, u64)], sids: &[u32]) -> Vec<u8> {
        use crate::iort::build;
        let maps: Vec<Vec<u8>> = sids
            .iter()
            .map(|s| build::mapping(0, 0, *s, build::SMMU_AT, true))
            .collect();
        build::rmr(flags, descs, &maps)
    }

    #[test]
    fn iort_rmr_reaches_root_complex_requester_ids_and_named_components() {
        let db = iort_db(
            5,
            &[rmr(0, &[(0x8480_0000, 0x80_0000)], &[0x0300, 0x1_0000])],
        )
        .expect("sane");
        let r = &db.regions()[0];
        assert_eq!(
            r.range,
            MemRange::new(0x8480_0000, 0x84ff_ffff).expect("ok")
        );
        assert_eq!(r.devices, [bdf("03:00.0")].into());
        assert_eq!(r.components, ["\\_SB_.DPU0".to_string()].into());
        assert_eq!(r.kind, RegionKind::Direct);
        assert!(r.source.starts_with("IORT RMR @0x"));
    }

    #[test]
    fn iort_remapping_permitted_makes_the_region_direct_relaxable() {
        let db = iort_db(5, &[rmr(1, &[(0x8000_0000, 0x1_0000)], &[0x0300])]).expect("sane");
        assert_eq!(db.regions()[0].kind, RegionKind::DirectRelaxable);
    }

    #[test]
    fn iort_revision_older_than_e_d_ignores_rmr_nodes_as_linux_does() {
        let db = iort_db(4, &[rmr(0, &[(0x8000_0000, 0x1_0000)], &[0x0300])]).expect("sane");
        assert!(db.regions().is_empty());
        assert!(
            db.warnings()[0].message.contains("older than 5"),
            "{:?}",
            db.warnings()
        );
    }

    #[test]
    fn iort_descriptor_not_64k_aligned_is_rounded_out_to_pages_with_a_warning() {
        let db = iort_db(5, &[rmr(0, &[(0x8000_1800, 0x1000)], &[0x0300])]).expect("sane");
        assert_eq!(
            db.regions()[0].range,
            MemRange::new(0x8000_1000, 0x8000_2fff).expect("ok")
        );
        assert!(db.warnings()[0].message.contains("not aligned to 64K"));
    }

    #[test]
    fn iort_zero_length_and_overlapping_descriptors_are_errors_naming_their_offsets() {
        let e = iort_db(5, &[rmr(0, &[(0x8000_0000, 0)], &[0x0300])]).expect_err("zero");
        assert!(matches!(e, RdmError::ZeroLength { .. }), "{e:?}");
        assert!(e.to_string().contains("descriptor @0x"), "{e}");
        let e = iort_db(
            5,
            &[rmr(
                0,
                &[(0x8000_0000, 0x2_0000), (0x8001_0000, 0x2_0000)],
                &[0x0300],
            )],
        )
        .expect_err("overlap");
        assert!(matches!(e, RdmError::Overlap { .. }), "{e:?}");
        // The identical range in two RMR nodes (two devices) merges.
        let db = iort_db(
            5,
            &[
                rmr(0, &[(0x8000_0000, 0x1_0000)], &[0x0300]),
                rmr(0, &[(0x8000_0000, 0x1_0000)], &[0x0400]),
            ],
        )
        .expect("merge");
        assert_eq!(
            db.regions()[0].devices,
            [bdf("03:00.0"), bdf("04:00.0")].into()
        );
    }
}
