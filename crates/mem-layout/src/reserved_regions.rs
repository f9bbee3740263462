//! Linux's `/sys/kernel/iommu_groups/*/reserved_regions` format, both ways.
//!
//! One line per region, `"0x%016llx 0x%016llx %s\n"`: start, **inclusive** end, type
//! (`drivers/iommu/iommu.c` `iommu_group_show_resv_regions`;
//! `Documentation/ABI/testing/sysfs-kernel-iommu_groups`). The regions of every device
//! in the group are merged into one file, so the file says nothing about which device
//! needs which line: the caller tells
//! [`crate::rdm::RdmDatabase::add_reserved_regions`] which devices the group holds.
//! [`format()`] writes the exact bytes Linux writes, so tests can compare with a guest's
//! sysfs byte for byte.

use crate::types::{MemRange, RegionKind};

/// Errors of this module: a line that Linux would not have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReservedRegionsError {
    /// Not three fields.
    #[error("line {line}: {text:?} is not \"START END TYPE\"")]
    Fields {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A start or end that is not `0x`-prefixed hex.
    #[error("line {line}: {text:?} is not a 0x-prefixed hex address")]
    Address {
        /// 1-based line number.
        line: usize,
        /// The field.
        text: String,
    },
    /// End below start.
    #[error("line {line}: end {end:#x} is below start {start:#x}")]
    EndBelowStart {
        /// 1-based line number.
        line: usize,
        /// Start given.
        start: u64,
        /// End given.
        end: u64,
    },
    /// A type Linux does not print.
    #[error(
        "line {line}: {text:?} is not a region type (direct, direct-relaxable, reserved, msi)"
    )]
    Type {
        /// 1-based line number.
        line: usize,
        /// The field.
        text: String,
    },
}

/// One line of a `reserved_regions` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResvRegion {
    /// The addresses, end inclusive.
    pub range: MemRange,
    /// The type column.
    pub kind: RegionKind,
}

fn parse_hex(line: usize, text: &str) -> Result<u64, ReservedRegionsError> {
    text.strip_prefix("0x")
        .filter(|h| !h.is_empty())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| ReservedRegionsError::Address {
            line,
            text: text.to_string(),
        })
}

/// Parses a whole file. Blank lines are skipped; everything else must be a region.
///
/// # Errors
/// The first malformed line, with its number.
pub fn parse(text: &str) -> Result<Vec<ResvRegion>, ReservedRegionsError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = raw.split_whitespace().collect();
        let [start, end, kind] = fields.as_slice() else {
            return Err(ReservedRegionsError::Fields {
                line,
                text: raw.to_string(),
            });
        };
        let start = parse_hex(line, start)?;
        let end = parse_hex(line, end)?;
        let range = MemRange::new(start, end).map_err(|_| ReservedRegionsError::EndBelowStart {
            line,
            start,
            end,
        })?;
        let kind = match *kind {
            "direct" => RegionKind::Direct,
            "direct-relaxable" => RegionKind::DirectRelaxable,
            "reserved" => RegionKind::Reserved,
            "msi" => RegionKind::Msi,
            other => {
                return Err(ReservedRegionsError::Type {
                    line,
                    text: other.to_string(),
                })
            }
        };
        out.push(ResvRegion { range, kind });
    }
    Ok(out)
}

/// Writes regions exactly as Linux does: `0x%016llx 0x%016llx %s\n` per region.
pub fn format(regions: &[ResvRegion]) -> String {
    regions
        .iter()
        .map(|r| {
            format!(
                "0x{:016x} 0x{:016x} {}\n",
                r.range.start(),
                r.range.end(),
                r.kind.as_str()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line of each kind, as `reserved_regions` files quoted in Linux IOMMU
    /// mailing-list reports show them (Intel RMRR, ISA work-around, MSI window, AMD HT
    /// hole, Arm RMR, Arm SW-MSI).
    const SAMPLES: &str = "\
0x0000000000000000 0x0000000000ffffff direct
0x00000000bdf6e000 0x00000000bdf84fff direct
0x00000000fee00000 0x00000000feefffff msi
0x000000fd00000000 0x000000ffffffffff reserved
0x0000000001000000 0x0000000010ffffff direct-relaxable
0x0000000008000000 0x00000000080fffff msi
";

    #[test]
    fn export_reserved_regions_text_is_byte_exact() {
        let regions = parse(SAMPLES).expect("Linux's own lines parse");
        assert_eq!(regions.len(), 6);
        assert_eq!(regions[3].kind, RegionKind::Reserved);
        assert_eq!(regions[3].range.end(), 0xff_ffff_ffff);
        assert_eq!(format(&regions), SAMPLES);
    }

    #[test]
    fn export_sw_msi_prints_as_msi_and_relaxable_as_direct_relaxable() {
        let r = [
            ResvRegion {
                range: MemRange::new(0x800_0000, 0x80f_ffff).expect("valid"),
                kind: RegionKind::Msi,
            },
            ResvRegion {
                range: MemRange::new(0xda2f_0000, 0xda30_6fff).expect("valid"),
                kind: RegionKind::DirectRelaxable,
            },
        ];
        assert_eq!(
            format(&r),
            "0x0000000008000000 0x00000000080fffff msi\n0x00000000da2f0000 0x00000000da306fff direct-relaxable\n"
        );
    }

    #[test]
    fn malformed_lines_are_named_by_number() {
        assert_eq!(
            parse("\n0x0 0xfff sw-msi\n"),
            Err(ReservedRegionsError::Type {
                line: 2,
                text: "sw-msi".into()
            })
        );
        assert!(matches!(
            parse("0x2000 0x1fff direct"),
            Err(ReservedRegionsError::EndBelowStart { line: 1, .. })
        ));
        assert!(matches!(
            parse("1000 0x1fff direct"),
            Err(ReservedRegionsError::Address { line: 1, .. })
        ));
        assert!(matches!(
            parse("0x1000 0x1fff"),
            Err(ReservedRegionsError::Fields { line: 1, .. })
        ));
    }
}
