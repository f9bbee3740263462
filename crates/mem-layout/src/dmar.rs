//! The ACPI DMAR table (Intel VT-d "DMA Remapping Reporting"): header and checksum,
//! DRHD units for context, and the RMRRs with their device scopes.
//!
//! Layout as in ACPICA `source/include/actbl1.h` and Xen `xen/include/acpi/actbl2.h`
//! (Intel VT-d specification, "DMA Remapping Reporting Structure"): the standard
//! 36-byte ACPI header, `Width` at 36, `Flags` at 37, remapping structures from offset
//! 48, each `u16 Type; u16 Length`. This module only decodes; the sanity rules of Linux
//! and Xen (alignment, limit below base, overlaps) are applied when the RMRRs enter the
//! host's region database ([`crate::rdm`]), so a test can look at a broken table.
//! Device scopes name a device by a start bus and a path of (device, function) hops
//! through bridges; [`DeviceScope::bdf`] walks it with a [`BridgeResolver`].

use crate::types::Bdf;
use std::path::{Path, PathBuf};

use crate::acpi::{u16_at, u64_at};
pub use crate::acpi::{AcpiHeader, ACPI_HEADER_LEN};
/// Offset of the first remapping structure (VT-d spec 8.1: header + Width, Flags, 10 reserved).
pub const DMAR_STRUCTS_OFFSET: usize = 48;
/// Fixed part of a DRHD (VT-d 8.3).
const DRHD_FIXED_LEN: usize = 16;
/// Fixed part of an RMRR (VT-d 8.4).
const RMRR_FIXED_LEN: usize = 24;
/// Fixed part of a device scope (VT-d 8.3.1), before the path.
const SCOPE_FIXED_LEN: usize = 6;

/// Errors of this module: a table that is not a well-formed DMAR.
#[derive(Debug, thiserror::Error)]
pub enum DmarError {
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
    /// A remapping structure whose Length is below 4 or runs past the table.
    #[error("structure at offset {offset:#x} has length {len}, but {remaining} bytes remain")]
    StructLength {
        /// Offset in the table.
        offset: usize,
        /// Its Length field.
        len: u16,
        /// Bytes left in the table from that offset.
        remaining: usize,
    },
    /// A DRHD or RMRR shorter than its fixed part.
    #[error("{what} at offset {offset:#x} has length {len}, below its fixed {min} bytes")]
    StructTooShort {
        /// "DRHD" or "RMRR".
        what: &'static str,
        /// Offset in the table.
        offset: usize,
        /// Its Length field.
        len: u16,
        /// The fixed part.
        min: usize,
    },
    /// A device scope whose Length is not 6 + 2·N or runs past its structure.
    #[error(
        "device scope at offset {offset:#x} has length {len}: not 6 + 2*N within its structure"
    )]
    ScopeLength {
        /// Offset in the table.
        offset: usize,
        /// Its Length field.
        len: u8,
    },
}

/// What a device scope names (VT-d 8.3.1 "Type").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    /// 1: a PCI endpoint.
    PciEndpoint,
    /// 2: a PCI bridge and everything below it.
    PciBridge,
    /// 3: an I/O APIC (Enumeration ID = its APIC id).
    IoApic,
    /// 4: an MSI-capable HPET (Enumeration ID = HPET number).
    Hpet,
    /// 5: an ACPI namespace device (Enumeration ID = ANDD number).
    AcpiNamespace,
    /// Any other value, kept for the record.
    Other(u8),
}

impl ScopeKind {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ScopeKind::PciEndpoint,
            2 => ScopeKind::PciBridge,
            3 => ScopeKind::IoApic,
            4 => ScopeKind::Hpet,
            5 => ScopeKind::AcpiNamespace,
            other => ScopeKind::Other(other),
        }
    }

    /// Whether the scope names a PCI device (endpoint or bridge).
    pub fn is_pci(&self) -> bool {
        matches!(self, ScopeKind::PciEndpoint | ScopeKind::PciBridge)
    }
}

/// Finds the bus behind a PCI bridge, to walk a multi-hop scope path.
pub trait BridgeResolver {
    /// The secondary bus number of `bridge` (config offset 0x19), if known.
    fn secondary_bus(&self, bridge: Bdf) -> Option<u8>;
}

/// A resolver that knows no bridges: only one-hop paths resolve (offline parsing).
pub struct NoBridges;

impl BridgeResolver for NoBridges {
    fn secondary_bus(&self, _bridge: Bdf) -> Option<u8> {
        None
    }
}

/// Reads bridges' secondary bus numbers from the host's sysfs
/// (`/sys/bus/pci/devices/SSSS:BB:DD.F/config`, byte 0x19 of the type-1 header).
pub struct SysfsBridges {
    /// Normally `/sys/bus/pci/devices`.
    pub root: PathBuf,
}

impl BridgeResolver for SysfsBridges {
    fn secondary_bus(&self, b: Bdf) -> Option<u8> {
        let name = format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            b.segment, b.bus, b.device, b.function
        );
        let config = std::fs::read(self.root.join(name).join("config")).ok()?;
        config.get(0x19).copied()
    }
}

/// One device scope entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    /// Offset in the table, for messages.
    pub offset: usize,
    /// What it names.
    pub kind: ScopeKind,
    /// IOAPIC id / HPET number / ANDD number; 0 for PCI.
    pub enumeration_id: u8,
    /// The bus the path starts on.
    pub start_bus: u8,
    /// (device, function) hops from the start bus through bridges.
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// The device the path ends at, walking bridges with `resolver` (as Linux's
    /// `dmar_insert_dev_scope` walks the live PCI tree). `None` for non-PCI scopes, an
    /// empty path, device/function numbers out of range, or a bridge the resolver does
    /// not know.
    pub fn bdf(&self, segment: u16, resolver: &dyn BridgeResolver) -> Option<Bdf> {
        if !self.kind.is_pci() {
            return None;
        }
        let mut bus = self.start_bus;
        let mut hops = self.path.iter().peekable();
        while let Some(&(device, function)) = hops.next() {
            let here = Bdf::new(segment, bus, device, function).ok()?;
            if hops.peek().is_none() {
                return Some(here);
            }
            bus = resolver.secondary_bus(here)?;
        }
        None
    }
}

/// A DMA-remapping hardware unit (type 0), kept for context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drhd {
    /// Offset in the table.
    pub offset: usize,
    /// Flags; bit 0 `INCLUDE_PCI_ALL`.
    pub flags: u8,
    /// PCI segment.
    pub segment: u16,
    /// Register base address.
    pub register_base: u64,
    /// Devices under this unit.
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    /// Bit 0: the unit covers every PCI device of the segment not claimed by another.
    pub fn include_pci_all(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A Reserved Memory Region Reporting structure (type 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rmrr {
    /// Offset in the table.
    pub offset: usize,
    /// PCI segment of the scoped devices.
    pub segment: u16,
    /// Base address (should be 4 KiB aligned).
    pub base: u64,
    /// Limit: the last byte, inclusive (`limit + 1` should be 4 KiB aligned).
    pub limit: u64,
    /// The devices that need the region.
    pub scopes: Vec<DeviceScope>,
}

/// A decoded DMAR table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmar {
    /// The ACPI header.
    pub header: AcpiHeader,
    /// Host Address Width field N: the platform has N + 1 address bits.
    pub host_address_width: u8,
    /// Flags: bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA protection opt-in.
    pub flags: u8,
    /// DRHD units, in table order.
    pub drhds: Vec<Drhd>,
    /// RMRRs, in table order.
    pub rmrrs: Vec<Rmrr>,
    /// Other structures (ATSR, RHSA, ANDD, SATC, SIDP, …): (type, offset, length).
    pub others: Vec<(u16, usize, u16)>,
}

impl Dmar {
    /// Physical address bits the platform's DMA remapping supports.
    pub fn address_bits(&self) -> u16 {
        u16::from(self.host_address_width) + 1
    }
}

/// Decodes the scopes in `table[start..end]`.
fn scopes(table: &[u8], start: usize, end: usize) -> Result<Vec<DeviceScope>, DmarError> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        // A scope needs its 2-byte type/length before anything else can be read.
        if end - at < 2 {
            return Err(DmarError::ScopeLength { offset: at, len: 0 });
        }
        let len = table[at + 1];
        let l = usize::from(len);
        // VT-d 8.3.1: Length = 6 + 2·N, and the scope lies inside its structure.
        if l < SCOPE_FIXED_LEN || !(l - SCOPE_FIXED_LEN).is_multiple_of(2) || l > end - at {
            return Err(DmarError::ScopeLength { offset: at, len });
        }
        let path = table[at + SCOPE_FIXED_LEN..at + l]
            .chunks_exact(2)
            .map(|p| (p[0], p[1]))
            .collect();
        out.push(DeviceScope {
            offset: at,
            kind: ScopeKind::from_u8(table[at]),
            enumeration_id: table[at + 4],
            start_bus: table[at + 5],
            path,
        });
        at += l;
    }
    Ok(out)
}

/// Decodes a DMAR table from its bytes, checking signature, length and checksum.
///
/// # Errors
/// Any [`DmarError`] but `Io`.
pub fn parse(table: &[u8]) -> Result<Dmar, DmarError> {
    let header = crate::acpi::check(table, "DMAR", DMAR_STRUCTS_OFFSET)?;
    let mut dmar = Dmar {
        header,
        host_address_width: table[36],
        flags: table[37],
        drhds: Vec::new(),
        rmrrs: Vec::new(),
        others: Vec::new(),
    };
    let mut at = DMAR_STRUCTS_OFFSET;
    while at < table.len() {
        let remaining = table.len() - at;
        if remaining < 4 {
            return Err(DmarError::StructLength {
                offset: at,
                len: 0,
                remaining,
            });
        }
        let kind = u16_at(table, at);
        let len = u16_at(table, at + 2);
        let l = usize::from(len);
        // A length below the 4-byte type/length would loop forever; past the end is a lie.
        if l < 4 || l > remaining {
            return Err(DmarError::StructLength {
                offset: at,
                len,
                remaining,
            });
        }
        match kind {
            0 => {
                if l < DRHD_FIXED_LEN {
                    return Err(DmarError::StructTooShort {
                        what: "DRHD",
                        offset: at,
                        len,
                        min: DRHD_FIXED_LEN,
                    });
                }
                dmar.drhds.push(Drhd {
                    offset: at,
                    flags: table[at + 4],
                    segment: u16_at(table, at + 6),
                    register_base: u64_at(table, at + 8),
                    scopes: scopes(table, at + DRHD_FIXED_LEN, at + l)?,
                });
            }
            1 => {
                if l < RMRR_FIXED_LEN {
                    return Err(DmarError::StructTooShort {
                        what: "RMRR",
                        offset: at,
                        len,
                        min: RMRR_FIXED_LEN,
                    });
                }
                dmar.rmrrs.push(Rmrr {
                    offset: at,
                    segment: u16_at(table, at + 6),
                    base: u64_at(table, at + 8),
                    limit: u64_at(table, at + 16),
                    scopes: scopes(table, at + RMRR_FIXED_LEN, at + l)?,
                });
            }
            other => dmar.others.push((other, at, len)),
        }
        at += l;
    }
    Ok(dmar)
}

/// Reads and decodes a DMAR table from a file, e.g. `/sys/firmware/acpi/tables/DMAR`
/// (root only) or an `acpidump -b` output.
///
/// # Errors
/// [`DmarError::Io`] if the file cannot be read, else as [`parse`].
pub fn read(path: &Path) -> Result<Dmar, DmarError> {
    let bytes = std::fs::read(path).map_err(|source| DmarError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes)
}

/// Test helper shared with the other modules: builds DMAR tables by hand.
#[cfg(test)]
pub(crate) mod build {
    /// A device scope: kind, start bus, path.
    pub fn scope(kind: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
        let mut s = vec![kind, (6 + 2 * path.len()) as u8, 0, 0, 0, bus];
        for (d, f) in path {
            s.extend([*d, *f]);
        }
        s
    }

    /// An RMRR structure.
    pub fn rmrr(base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = scopes.concat();
        let mut s = vec![1, 0];
        s.extend(((24 + body.len()) as u16).to_le_bytes());
        s.extend([0, 0, 0, 0]);
        s.extend(base.to_le_bytes());
        s.extend(limit.to_le_bytes());
        s.extend(body);
        s
    }

    /// A whole table with a correct length and checksum.
    pub fn table(structs: &[Vec<u8>]) -> Vec<u8> {
        let mut t = b"DMAR".to_vec();
        t.extend([0u8; 4]);
        t.extend([1, 0]);
        t.extend(*b"APERTR");
        t.extend(*b"HANDMADE");
        t.extend([0u8; 12]);
        t.extend([38, 1]); // 39 address bits, INTR_REMAP
        t.extend([0u8; 10]);
        for s in structs {
            t.extend(s);
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

    #[test]
    fn scope_path_walks_bridges_through_the_resolver() {
        struct OneBridge;
        impl BridgeResolver for OneBridge {
            fn secondary_bus(&self, b: Bdf) -> Option<u8> {
                (b == Bdf::new(0, 0, 0x1c, 0).ok()?).then_some(3)
            }
        }
        let s = DeviceScope {
            offset: 0,
            kind: ScopeKind::PciEndpoint,
            enumeration_id: 0,
            start_bus: 0,
            path: vec![(0x1c, 0), (0, 0)],
        };
        assert_eq!(s.bdf(0, &NoBridges), None);
        assert_eq!(s.bdf(0, &OneBridge), Bdf::new(0, 3, 0, 0).ok());
        let ioapic = DeviceScope {
            kind: ScopeKind::IoApic,
            path: vec![(0x1f, 0)],
            ..s
        };
        assert_eq!(ioapic.bdf(0, &OneBridge), None);
    }

    #[test]
    fn hand_built_table_round_trips() {
        let t = build::table(&[build::rmrr(
            0x1000,
            0x1fff,
            &[build::scope(1, 0, &[(0x14, 0)])],
        )]);
        let d = parse(&t).expect("well-formed");
        assert_eq!(d.address_bits(), 39);
        assert_eq!(d.rmrrs.len(), 1);
        assert_eq!(
            d.rmrrs[0].scopes[0].bdf(0, &NoBridges),
            Bdf::new(0, 0, 0x14, 0).ok()
        );
    }

    #[test]
    fn structural_errors_are_reported_with_offsets() {
        let good = build::table(&[build::rmrr(0x1000, 0x1fff, &[])]);
        let mut bad = good.clone();
        bad[9] = bad[9].wrapping_add(1);
        assert!(matches!(
            parse(&bad),
            Err(DmarError::Header(HeaderError::Checksum { sum: 1, .. }))
        ));
        assert!(matches!(
            parse(&good[..40]),
            Err(DmarError::Header(HeaderError::TooShort { len: 40, .. }))
        ));
        let mut sig = good.clone();
        sig[0] = b'X';
        assert!(matches!(
            parse(&sig),
            Err(DmarError::Header(HeaderError::Signature { .. }))
        ));
        let mut short = good.clone();
        short.pop();
        assert!(matches!(
            parse(&short),
            Err(DmarError::Header(HeaderError::Length { .. }))
        ));
        // A zero-length structure must not loop forever.
        let zero = build::table(&[vec![1, 0, 0, 0]]);
        assert!(matches!(
            parse(&zero),
            Err(DmarError::StructLength {
                offset: 48,
                len: 0,
                ..
            })
        ));
        // An RMRR shorter than its fixed 24 bytes.
        let tiny = build::table(&[vec![1, 0, 8, 0, 0, 0, 0, 0]]);
        assert!(matches!(
            parse(&tiny),
            Err(DmarError::StructTooShort { what: "RMRR", .. })
        ));
        // A scope of odd length.
        let mut odd_scope = build::scope(1, 0, &[(1, 0)]);
        odd_scope[1] = 7;
        odd_scope.push(0);
        let t = build::table(&[build::rmrr(0x1000, 0x1fff, &[odd_scope])]);
        assert!(matches!(
            parse(&t),
            Err(DmarError::ScopeLength { len: 7, .. })
        ));
    }
}
