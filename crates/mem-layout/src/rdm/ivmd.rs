//! IVRS IVMDs (AMD) into the host region database: [`RdmDatabase::add_ivrs`] with
//! Linux's rules (listed in the parent module's docs), and the bound on how many
//! (region, device) pairs one table may name. The table itself is parsed by
//! [`crate::ivrs`]; the database, its merge and overlap rules live in [`crate::rdm`].

use super::{device_id_bdf, HostRegion, RdmDatabase, RdmError, Warning, ZERO_PAGE};
use crate::ivrs::{IvmdDevices, Ivrs};
use crate::types::{Bdf, MemRange, RegionKind};
use std::collections::BTreeSet;

/// Most (region, device) pairs one IVRS table may name: sixteen IVMDs naming every
/// device ID of a segment. An IVMD of type 0x20 or 0x22 names up to 65 536 devices and
/// each is kept, so without a bound a 64 KiB table of such IVMDs would ask for over a
/// hundred million; real tables name a few thousand (the MECHREVO fixture 20 480).
pub const MAX_IVRS_DEVICE_PAIRS: usize = 16 << 16;

/// `v` rounded up to a page; `None` past 2^64.
fn page_align_up(v: u64) -> Option<u64> {
    Some(v.checked_add(crate::types::PAGE_SIZE - 1)? & !(crate::types::PAGE_SIZE - 1))
}

impl RdmDatabase {
    /// Adds an IVRS table's IVMDs with Linux's rules ([`crate::rdm`] docs).
    ///
    /// # Errors
    /// [`RdmError::ZeroLength`], [`RdmError::PastTop`], [`RdmError::Overlap`]. Nothing
    /// is added on error.
    pub fn add_ivrs(&mut self, ivrs: &Ivrs) -> Result<(), RdmError> {
        let mut next = self.clone();
        let mut pairs = 0usize;
        for m in &ivrs.ivmds {
            let source = format!("IVRS IVMD @{:#x}", m.offset);
            if !m.unity() && !m.exclusion() {
                next.warnings.push(Warning {
                    range: MemRange::span(m.start, m.start).unwrap_or(ZERO_PAGE),
                    message: format!(
                        "{source}: flags {:#04x} ask for neither a unity map nor an exclusion range: ignored (Linux does too)",
                        m.flags
                    ),
                });
                continue;
            }
            let past = || RdmError::PastTop {
                entry: source.clone(),
                start: m.start,
                length: m.length,
            };
            // Linux: address_start = PAGE_ALIGN(start), end = start + PAGE_ALIGN(length).
            let start = page_align_up(m.start).ok_or_else(past)?;
            let len = page_align_up(m.length).ok_or_else(past)?;
            if len == 0 {
                return Err(RdmError::ZeroLength {
                    entry: source,
                    start: m.start,
                });
            }
            let range = MemRange::from_len(start, len).map_err(|_| past())?;
            if start != m.start || len != m.length {
                next.warnings.push(Warning {
                    range,
                    message: format!(
                        "{source}: start {:#x} or length {:#x} is not page aligned: used as {range}, as Linux rounds them up",
                        m.start, m.length
                    ),
                });
            }
            let (first, last) = match m.devices {
                IvmdDevices::One(id) => (id, id),
                IvmdDevices::Range(a, b) => (a, b),
                IvmdDevices::All => match ivrs.last_device_id(m.segment) {
                    Some(last) => (0, last),
                    None => (1, 0), // no IVHD names a device of the segment
                },
            };
            if first > last {
                next.warnings.push(Warning {
                    range,
                    message: format!(
                        "{source}: names no device (device IDs {first:#06x} to {last:#06x}): ignored"
                    ),
                });
                continue;
            }
            // Each device of each region is kept: bound the total before building it.
            pairs = pairs.saturating_add(usize::from(last - first) + 1);
            if pairs > MAX_IVRS_DEVICE_PAIRS {
                return Err(RdmError::TooManyDevices {
                    entry: source,
                    pairs,
                    max: MAX_IVRS_DEVICE_PAIRS,
                });
            }
            let devices: BTreeSet<Bdf> = (first..=last)
                .map(|id| device_id_bdf(m.segment, id))
                .collect();
            next.insert(
                HostRegion {
                    range,
                    kind: RegionKind::Direct,
                    devices,
                    components: BTreeSet::new(),
                    source,
                },
                None,
            )?;
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdm::device_list;
    use crate::rdm::tests::bdf;

    fn ivrs_db(blocks: &[Vec<u8>]) -> Result<RdmDatabase, RdmError> {
        let t = crate::ivrs::parse(&crate::ivrs::build::table(blocks)).expect("well-formed");
        let mut db = RdmDatabase::new();
        db.add_ivrs(&t)?;
        Ok(db)
    }

    fn ivhd() -> Vec<u8> {
        use crate::ivrs::build::entry;
        crate::ivrs::build::ivhd(&[entry(0x03, 0x0003), entry(0x04, 0x01ff)])
    }

    #[test]
    fn ivrs_unity_ivmd_for_one_device_is_rounded_up_as_linux_page_aligns() {
        let db = ivrs_db(&[
            ivhd(),
            crate::ivrs::build::ivmd(0x21, 0x07, 0x0300, 0, 0x7d90_0800, 0x1800),
        ])
        .expect("sane");
        let r = &db.regions()[0];
        // PAGE_ALIGN(start) = 0x7d901000, PAGE_ALIGN(len) = 0x2000.
        assert_eq!(
            r.range,
            MemRange::new(0x7d90_1000, 0x7d90_2fff).expect("ok")
        );
        assert_eq!(r.devices, [bdf("03:00.0")].into());
        assert_eq!(r.kind, RegionKind::Direct);
        assert_eq!(r.source, "IVRS IVMD @0x50");
        assert!(db.warnings()[0].message.contains("not page aligned"));
    }

    #[test]
    fn ivrs_exclusion_range_is_a_direct_region_and_no_flag_is_ignored() {
        let db = ivrs_db(&[
            crate::ivrs::build::ivmd(0x21, 0x08, 0x0300, 0, 0x7132_f000, 0x26000),
            crate::ivrs::build::ivmd(0x21, 0x06, 0x0400, 0, 0x8000_0000, 0x1000),
        ])
        .expect("sane");
        assert_eq!(db.regions().len(), 1);
        assert_eq!(db.regions()[0].kind, RegionKind::Direct);
        assert!(db.warnings()[0].message.contains("neither a unity map"));
    }

    #[test]
    fn ivrs_range_and_all_types_name_every_device_id_linux_does() {
        let db = ivrs_db(&[
            ivhd(),
            crate::ivrs::build::ivmd(0x22, 0x08, 0x0000, 0x0fff, 0x9618_e000, 1),
            crate::ivrs::build::ivmd(0x20, 0x01, 0, 0, 0xa000_0000, 0x1000),
        ])
        .expect("sane");
        assert_eq!(db.regions()[0].devices.len(), 0x1000);
        assert_eq!(device_list(&db.regions()[0].devices), "00:00.0-0f:1f.7");
        // Type 0x20 ends at the highest device ID the IVHDs name (01:1f.7).
        assert_eq!(db.regions()[1].devices.len(), 0x200);
    }

    #[test]
    fn ivrs_device_pairs_past_the_bound_are_an_error_not_a_huge_allocation() {
        let all = |i: u64| crate::ivrs::build::ivmd(0x22, 0x01, 0, 0xffff, i << 20, 0x1000);
        let blocks: Vec<Vec<u8>> = (0..17).map(all).collect();
        let e = ivrs_db(&blocks).expect_err("17 x 65536 pairs");
        assert!(
            matches!(
                e,
                RdmError::TooManyDevices {
                    pairs: 0x11_0000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(ivrs_db(&blocks[..16]).is_ok(), "16 x 65536 is the bound");
    }

    #[test]
    fn ivrs_zero_length_ivmd_is_an_error_naming_the_table_and_offset() {
        let e = ivrs_db(&[crate::ivrs::build::ivmd(0x21, 0x07, 0x10, 0, 0x1000, 0)])
            .expect_err("nothing to reserve");
        assert_eq!(
            e.to_string(),
            "IVRS IVMD @0x30: the range at 0x1000 has length zero"
        );
    }

    #[test]
    fn ivrs_overlapping_ivmds_are_an_error_and_identical_ones_merge() {
        let e = ivrs_db(&[
            crate::ivrs::build::ivmd(0x21, 0x07, 0x10, 0, 0x10_0000, 0x2000),
            crate::ivrs::build::ivmd(0x21, 0x07, 0x18, 0, 0x10_1000, 0x2000),
        ])
        .expect_err("partial overlap");
        let msg = e.to_string();
        assert!(
            msg.contains("IVRS IVMD @0x50") && msg.contains("IVRS IVMD @0x30"),
            "{msg}"
        );
        let db = ivrs_db(&[
            crate::ivrs::build::ivmd(0x21, 0x07, 0x10, 0, 0x10_0000, 0x2000),
            crate::ivrs::build::ivmd(0x21, 0x07, 0x18, 0, 0x10_0000, 0x2000),
        ])
        .expect("the same range for two devices");
        assert_eq!(
            db.regions()[0].devices,
            [bdf("00:02.0"), bdf("00:03.0")].into()
        );
    }
}
