//! The ACPI IVRS table (AMD I/O Virtualization Reporting Structure): header and
//! checksum, the IVHD blocks far enough to know which devices each IOMMU covers, and
//! the IVMD blocks — AMD's reserved device memory, what Intel calls RMRRs.
//!
//! Layout as in the AMD IOMMU specification (document 48882, "IVRS"), ACPICA
//! `source/include/actbl2.h` and Linux `drivers/iommu/amd/init.c`: the standard 36-byte
//! ACPI header, `IVinfo` at 36, 8 reserved bytes, then blocks from offset 48, each
//! `u8 Type; u8 Flags; u16 Length`. IVHD types 0x10, 0x11 and 0x40 describe one IOMMU
//! and the device entries it translates; IVMD types 0x20 (every peripheral), 0x21 (one
//! peripheral) and 0x22 (a range of peripherals) describe memory. Any other block type
//! is kept as "other" and skipped by its length, as Linux does.
//!
//! This module only decodes; how an IVMD becomes a reserved region (Linux's
//! `init_unity_map_range` rules: page alignment, exclusion ranges treated as r/w unity
//! maps, entries without either flag ignored) is [`crate::rdm::RdmDatabase::add_ivrs`].

use crate::acpi::{u16_at, u32_at, u64_at, AcpiHeader, ACPI_HEADER_LEN};
use std::path::{Path, PathBuf};

/// Offset of the first IVHD/IVMD block (header + IVinfo + 8 reserved bytes).
pub const IVRS_BLOCKS_OFFSET: usize = 48;
/// Fixed part of an IVHD of type 0x10 (Linux `get_ivhd_header_size`).
const IVHD10_LEN: usize = 24;
/// Fixed part of an IVHD of type 0x11 or 0x40 (with the EFR image).
const IVHD11_LEN: usize = 40;
/// An IVMD block is exactly this long (AMD IOMMU spec "IVMD Block Format").
pub const IVMD_LEN: usize = 32;

/// IVMD flag bit 0: the range must be unity (identity) mapped.
pub const IVMD_FLAG_UNITY: u8 = 0x01;
/// IVMD flag bit 1: read permission for the unity map.
pub const IVMD_FLAG_READ: u8 = 0x02;
/// IVMD flag bit 2: write permission for the unity map.
pub const IVMD_FLAG_WRITE: u8 = 0x04;
/// IVMD flag bit 3: an exclusion range (the IOMMU does not translate it).
pub const IVMD_FLAG_EXCLUSION: u8 = 0x08;

/// Errors of this module: a table that is not a well-formed IVRS. Every message names
/// the table and the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum IvrsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The ACPI header is refused (length, signature, Length field, checksum).
    #[error(transparent)]
    Header(#[from] crate::acpi::HeaderError),
    /// A block whose Length is below 4 or runs past the table.
    #[error("IVRS: block type {kind:#04x} at offset {offset:#x} has length {len}, but {remaining} bytes remain")]
    BlockLength {
        /// Block type.
        kind: u8,
        /// Offset in the table.
        offset: usize,
        /// Its Length field.
        len: u16,
        /// Bytes left in the table from that offset.
        remaining: usize,
    },
    /// An IVHD or IVMD shorter than its fixed part.
    #[error("IVRS: {what} at offset {offset:#x} has length {len}, below its fixed {min} bytes")]
    BlockTooShort {
        /// "IVHD" or "IVMD".
        what: &'static str,
        /// Offset in the table.
        offset: usize,
        /// Its Length field.
        len: u16,
        /// The fixed part.
        min: usize,
    },
    /// An IVHD device entry that runs past its IVHD, or whose length cannot be known.
    #[error("IVRS: IVHD device entry type {kind:#04x} at offset {offset:#x} {why}")]
    DeviceEntry {
        /// Entry type.
        kind: u8,
        /// Offset in the table.
        offset: usize,
        /// What is wrong, as a sentence fragment.
        why: &'static str,
    },
}

/// A span of 16-bit device IDs (`bus << 8 | devfn`), both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceIdSpan {
    /// First device ID.
    pub first: u16,
    /// Last device ID.
    pub last: u16,
}

/// One IOMMU (IVHD block, type 0x10, 0x11 or 0x40).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivhd {
    /// Offset in the table.
    pub offset: usize,
    /// Block type.
    pub kind: u8,
    /// The IOMMU's own device ID.
    pub iommu_device_id: u16,
    /// PCI segment.
    pub segment: u16,
    /// The device IDs its entries name (select, ranges, aliases, ACPI HID devices).
    pub covered: Vec<DeviceIdSpan>,
}

impl Ivhd {
    /// The highest device ID this IOMMU names (Linux `find_last_devid_from_ivhd`).
    pub fn last_device_id(&self) -> Option<u16> {
        self.covered.iter().map(|s| s.last).max()
    }
}

/// Which peripherals an IVMD applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvmdDevices {
    /// Type 0x20: every peripheral of the segment.
    All,
    /// Type 0x21: one peripheral.
    One(u16),
    /// Type 0x22: device IDs from the first to the last (Auxiliary Data), inclusive.
    Range(u16, u16),
}

/// An IVMD block: memory some peripherals need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivmd {
    /// Offset in the table.
    pub offset: usize,
    /// Which peripherals.
    pub devices: IvmdDevices,
    /// Flags: [`IVMD_FLAG_UNITY`], [`IVMD_FLAG_READ`], [`IVMD_FLAG_WRITE`],
    /// [`IVMD_FLAG_EXCLUSION`].
    pub flags: u8,
    /// PCI segment (bytes 8..10; zero in tables before segments were described).
    pub segment: u16,
    /// Start address as given.
    pub start: u64,
    /// Length in bytes as given.
    pub length: u64,
}

impl Ivmd {
    /// Whether the range must be identity-mapped (unity flag).
    pub fn unity(&self) -> bool {
        self.flags & IVMD_FLAG_UNITY != 0
    }

    /// Whether it is an exclusion range.
    pub fn exclusion(&self) -> bool {
        self.flags & IVMD_FLAG_EXCLUSION != 0
    }
}

/// A decoded IVRS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivrs {
    /// The ACPI header.
    pub header: AcpiHeader,
    /// IVinfo (virtual address size, physical address size, EFR support…).
    pub iv_info: u32,
    /// IOMMUs, in table order.
    pub ivhds: Vec<Ivhd>,
    /// Memory definitions, in table order.
    pub ivmds: Vec<Ivmd>,
    /// Other blocks (types Linux does not read as IVHD or IVMD): (type, offset, length).
    pub others: Vec<(u8, usize, u16)>,
}

impl Ivrs {
    /// The highest device ID any IVHD of `segment` names: Linux's `last_bdf`, the end
    /// of an IVMD of type 0x20.
    pub fn last_device_id(&self, segment: u16) -> Option<u16> {
        self.ivhds
            .iter()
            .filter(|h| h.segment == segment)
            .filter_map(Ivhd::last_device_id)
            .max()
    }
}

/// Decodes the device entries of the IVHD in `table[start..end]` (AMD IOMMU spec
/// "IVHD Device Entries"; Linux `init_iommu_from_acpi`).
fn device_entries(table: &[u8], start: usize, end: usize) -> Result<Vec<DeviceIdSpan>, IvrsError> {
    let mut covered = Vec::new();
    // A "range start" entry waits for its "range end" (type 0x04).
    let mut range_start: Option<u16> = None;
    let mut at = start;
    while at < end {
        let kind = table[at];
        // Types below 0x80 are 4, 8, 16 or 32 bytes by their top two bits; 0xF0 (ACPI
        // HID) carries its UID length at byte 21; other variable types cannot be sized.
        let len = if kind < 0x80 {
            4usize << (kind >> 6)
        } else if kind == 0xf0 {
            match table.get(at + 21) {
                Some(uid) if at + 22 <= end => 22 + usize::from(*uid),
                _ => {
                    return Err(IvrsError::DeviceEntry {
                        kind,
                        offset: at,
                        why: "runs past its IVHD",
                    })
                }
            }
        } else {
            return Err(IvrsError::DeviceEntry {
                kind,
                offset: at,
                why: "has a type whose length is not known",
            });
        };
        if len > end - at {
            return Err(IvrsError::DeviceEntry {
                kind,
                offset: at,
                why: "runs past its IVHD",
            });
        }
        let device_id = u16_at(table, at + 1);
        match kind {
            // DEV_ALL: every device ID.
            0x01 => covered.push(DeviceIdSpan {
                first: 0,
                last: u16::MAX,
            }),
            // Select, alias select, extended select, ACPI HID device: one ID.
            0x02 | 0x42 | 0x46 | 0xf0 => covered.push(DeviceIdSpan {
                first: device_id,
                last: device_id,
            }),
            // Range starts (plain, alias, extended).
            0x03 | 0x43 | 0x47 => range_start = Some(device_id),
            // Range end.
            0x04 => {
                if let Some(first) = range_start.take() {
                    covered.push(DeviceIdSpan {
                        first: first.min(device_id),
                        last: first.max(device_id),
                    });
                }
            }
            // Padding, special devices (IOAPIC/HPET, not PCI functions), others.
            _ => {}
        }
        at += len;
    }
    Ok(covered)
}

/// Decodes an IVRS table from its bytes, checking signature, length and checksum.
///
/// # Errors
/// Any [`IvrsError`] but `Io`.
pub fn parse(table: &[u8]) -> Result<Ivrs, IvrsError> {
    let header = crate::acpi::check(table, "IVRS", IVRS_BLOCKS_OFFSET)?;
    let mut ivrs = Ivrs {
        header,
        iv_info: u32_at(table, ACPI_HEADER_LEN),
        ivhds: Vec::new(),
        ivmds: Vec::new(),
        others: Vec::new(),
    };
    let mut at = IVRS_BLOCKS_OFFSET;
    while at < table.len() {
        let remaining = table.len() - at;
        let kind = table[at];
        if remaining < 4 {
            return Err(IvrsError::BlockLength {
                kind,
                offset: at,
                len: 0,
                remaining,
            });
        }
        let len = u16_at(table, at + 2);
        let l = usize::from(len);
        // Below 4 would loop forever; past the end is a lie.
        if l < 4 || l > remaining {
            return Err(IvrsError::BlockLength {
                kind,
                offset: at,
                len,
                remaining,
            });
        }
        match kind {
            0x10 | 0x11 | 0x40 => {
                let min = if kind == 0x10 { IVHD10_LEN } else { IVHD11_LEN };
                if l < min {
                    return Err(IvrsError::BlockTooShort {
                        what: "IVHD",
                        offset: at,
                        len,
                        min,
                    });
                }
                ivrs.ivhds.push(Ivhd {
                    offset: at,
                    kind,
                    iommu_device_id: u16_at(table, at + 4),
                    segment: u16_at(table, at + 16),
                    covered: device_entries(table, at + min, at + l)?,
                });
            }
            0x20..=0x22 => {
                if l < IVMD_LEN {
                    return Err(IvrsError::BlockTooShort {
                        what: "IVMD",
                        offset: at,
                        len,
                        min: IVMD_LEN,
                    });
                }
                let device_id = u16_at(table, at + 4);
                let aux = u16_at(table, at + 6);
                ivrs.ivmds.push(Ivmd {
                    offset: at,
                    devices: match kind {
                        0x20 => IvmdDevices::All,
                        0x21 => IvmdDevices::One(device_id),
                        _ => IvmdDevices::Range(device_id, aux),
                    },
                    flags: table[at + 1],
                    segment: u16_at(table, at + 8),
                    start: u64_at(table, at + 16),
                    length: u64_at(table, at + 24),
                });
            }
            other => ivrs.others.push((other, at, len)),
        }
        at += l;
    }
    Ok(ivrs)
}

/// Reads and decodes an IVRS table from a file, e.g. `/sys/firmware/acpi/tables/IVRS`
/// (root only) or an `acpidump -b` output.
///
/// # Errors
/// [`IvrsError::Io`] if the file cannot be read, else as [`parse`].
pub fn read(path: &Path) -> Result<Ivrs, IvrsError> {
    let bytes = std::fs::read(path).map_err(|source| IvrsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes)
}

/// Test helper shared with the other modules: builds IVRS tables by hand.
#[cfg(test)]
pub(crate) mod build {
    /// An IVHD of type 0x10 for segment 0 with the given device entries.
    pub fn ivhd(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut b = vec![0x10, 0];
        b.extend(((24 + body.len()) as u16).to_le_bytes());
        b.extend(2u16.to_le_bytes()); // the IOMMU is 00:00.2
        b.extend([0u8; 18]);
        b.extend(body);
        b
    }

    /// A 4-byte device entry.
    pub fn entry(kind: u8, device_id: u16) -> Vec<u8> {
        let mut e = vec![kind];
        e.extend(device_id.to_le_bytes());
        e.push(0);
        e
    }

    /// An IVMD block.
    pub fn ivmd(kind: u8, flags: u8, device_id: u16, aux: u16, start: u64, len: u64) -> Vec<u8> {
        let mut b = vec![kind, flags, 32, 0];
        b.extend(device_id.to_le_bytes());
        b.extend(aux.to_le_bytes());
        b.extend([0u8; 8]);
        b.extend(start.to_le_bytes());
        b.extend(len.to_le_bytes());
        b
    }

    /// A whole table with a correct length and checksum.
    pub fn table(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut t = b"IVRS".to_vec();
        t.extend([0u8; 4]);
        t.extend([2, 0]);
        t.extend(*b"APERTR");
        t.extend(*b"HANDMADE");
        t.extend([0u8; 12]);
        t.extend(0x0020_3043u32.to_le_bytes());
        t.extend([0u8; 8]);
        for b in blocks {
            t.extend(b);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::HeaderError;

    fn usual_ivhd() -> Vec<u8> {
        // Select 00:00.3, range 00:00.3..ff:1f.6 as real AMD laptops write it.
        build::ivhd(&[
            build::entry(0x03, 0x0003),
            build::entry(0x04, 0xfffe),
            build::entry(0x02, 0x00a5),
        ])
    }

    #[test]
    fn ivrs_hand_built_table_round_trips_ivhd_coverage_and_ivmd_kinds() {
        let t = build::table(&[
            usual_ivhd(),
            build::ivmd(0x20, 0x07, 0, 0, 0x1000_0000, 0x1000),
            build::ivmd(0x21, 0x08, 0x0300, 0, 0x2000_0000, 0x2000),
            build::ivmd(0x22, 0x01, 0x0000, 0x0fff, 0x3000_0000, 0x1),
        ]);
        let d = parse(&t).expect("well-formed");
        assert_eq!(d.ivhds.len(), 1);
        assert_eq!(
            d.ivhds[0].covered,
            vec![
                DeviceIdSpan {
                    first: 3,
                    last: 0xfffe
                },
                DeviceIdSpan {
                    first: 0xa5,
                    last: 0xa5
                }
            ]
        );
        assert_eq!(d.last_device_id(0), Some(0xfffe));
        assert_eq!(d.ivmds[0].devices, IvmdDevices::All);
        assert!(d.ivmds[0].unity());
        assert_eq!(d.ivmds[1].devices, IvmdDevices::One(0x300));
        assert!(d.ivmds[1].exclusion() && !d.ivmds[1].unity());
        assert_eq!(d.ivmds[2].devices, IvmdDevices::Range(0, 0xfff));
    }

    #[test]
    fn ivrs_bad_checksum_is_an_error_naming_the_table_and_offset() {
        let mut t = build::table(&[usual_ivhd()]);
        t[9] = t[9].wrapping_add(1);
        let e = parse(&t).expect_err("checksum");
        assert!(matches!(
            e,
            IvrsError::Header(HeaderError::Checksum { sum: 1, .. })
        ));
        assert!(
            e.to_string().starts_with("IVRS: checksum (offset 9)"),
            "{e}"
        );
    }

    #[test]
    fn ivrs_block_length_past_the_table_is_an_error_with_its_offset() {
        let mut ivmd = build::ivmd(0x21, 0x07, 0x10, 0, 0x1000, 0x1000);
        ivmd[2] = 0x80; // says 128 bytes, 32 remain
        let e = parse(&build::table(&[ivmd])).expect_err("past the end");
        assert!(
            matches!(
                e,
                IvrsError::BlockLength {
                    offset: 48,
                    len: 128,
                    remaining: 32,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("offset 0x30"), "{e}");
    }

    #[test]
    fn ivrs_truncated_ivmd_and_zero_length_block_are_errors() {
        let mut short = build::ivmd(0x21, 0x07, 0x10, 0, 0x1000, 0x1000);
        short.truncate(16);
        short[2] = 16;
        let e = parse(&build::table(&[short])).expect_err("truncated");
        assert!(
            matches!(
                e,
                IvrsError::BlockTooShort {
                    what: "IVMD",
                    offset: 48,
                    ..
                }
            ),
            "{e:?}"
        );
        let zero = vec![0x21, 0, 0, 0];
        let e = parse(&build::table(&[zero])).expect_err("would loop forever");
        assert!(matches!(e, IvrsError::BlockLength { len: 0, .. }), "{e:?}");
    }

    #[test]
    fn ivrs_device_entry_past_its_ivhd_or_of_unknown_size_is_an_error() {
        let mut h = build::ivhd(&[build::entry(0x42, 0x10)]); // an 8-byte entry in 4
        let l = h.len() as u16;
        h[2..4].copy_from_slice(&l.to_le_bytes());
        let e = parse(&build::table(&[h])).expect_err("runs past");
        assert!(
            matches!(
                e,
                IvrsError::DeviceEntry {
                    kind: 0x42,
                    offset: 72,
                    ..
                }
            ),
            "{e:?}"
        );
        let h = build::ivhd(&[build::entry(0x85, 0x10)]);
        let e = parse(&build::table(&[h])).expect_err("unknown size");
        assert!(e.to_string().contains("not known"), "{e}");
    }

    #[test]
    fn ivrs_header_errors() {
        let good = build::table(&[usual_ivhd()]);
        assert!(matches!(
            parse(&good[..40]),
            Err(IvrsError::Header(HeaderError::TooShort { len: 40, .. }))
        ));
        let mut sig = good.clone();
        sig[0] = b'X';
        assert!(matches!(
            parse(&sig),
            Err(IvrsError::Header(HeaderError::Signature { .. }))
        ));
        let mut short = good.clone();
        short.pop();
        assert!(matches!(
            parse(&short),
            Err(IvrsError::Header(HeaderError::Length { .. }))
        ));
    }
}
