//! The standard ACPI table header (ACPI 6.5 §5.2.6) that the DMAR ([`crate::dmar`]),
//! IVRS ([`crate::ivrs`]) and IORT ([`crate::iort`]) parsers share: its fields, and the
//! checks every table passes before its own structures are read (length, signature,
//! the Length field against the bytes given, the checksum).

/// Size of the standard ACPI table header.
pub const ACPI_HEADER_LEN: usize = 36;

/// The standard ACPI header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiHeader {
    /// Table length in bytes.
    pub length: u32,
    /// Revision.
    pub revision: u8,
    /// Checksum byte.
    pub checksum: u8,
    /// OEM id (6 bytes).
    pub oem_id: [u8; 6],
    /// OEM table id (8 bytes).
    pub oem_table_id: [u8; 8],
    /// OEM revision.
    pub oem_revision: u32,
}

/// Why a table's header is refused; `table` is the signature expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than the table's fixed header.
    #[error("{table}: {len} bytes is shorter than the {min}-byte header (offset 0)")]
    TooShort {
        /// The table.
        table: &'static str,
        /// Bytes given.
        len: usize,
        /// Its fixed header.
        min: usize,
    },
    /// Another signature.
    #[error("{table}: signature at offset 0 is {found:?}, not {table:?}")]
    Signature {
        /// The table.
        table: &'static str,
        /// The four signature bytes, lossily as text.
        found: String,
    },
    /// The header's Length field disagrees with the bytes given.
    #[error("{table}: the length at offset 4 says {header} bytes but {actual} were given")]
    Length {
        /// The table.
        table: &'static str,
        /// The Length field.
        header: u32,
        /// Bytes given.
        actual: usize,
    },
    /// The bytes do not sum to zero.
    #[error("{table}: checksum (offset 9) fails: the bytes sum to {sum:#04x}, not 0")]
    Checksum {
        /// The table.
        table: &'static str,
        /// Byte sum modulo 256.
        sum: u8,
    },
}

/// Checks that `bytes` are a whole `table` (its four-byte signature) of at least
/// `min` bytes with a right checksum, and reads its header.
///
/// # Errors
/// [`HeaderError`] for the first check that fails.
pub(crate) fn check(
    bytes: &[u8],
    table: &'static str,
    min: usize,
) -> Result<AcpiHeader, HeaderError> {
    let min = min.max(ACPI_HEADER_LEN);
    if bytes.len() < min {
        return Err(HeaderError::TooShort {
            table,
            len: bytes.len(),
            min,
        });
    }
    if &bytes[0..4] != table.as_bytes() {
        return Err(HeaderError::Signature {
            table,
            found: String::from_utf8_lossy(&bytes[0..4]).into_owned(),
        });
    }
    let length = u32_at(bytes, 4);
    if usize::try_from(length).ok() != Some(bytes.len()) {
        return Err(HeaderError::Length {
            table,
            header: length,
            actual: bytes.len(),
        });
    }
    let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    if sum != 0 {
        return Err(HeaderError::Checksum { table, sum });
    }
    let mut oem_id = [0u8; 6];
    oem_id.copy_from_slice(&bytes[10..16]);
    let mut oem_table_id = [0u8; 8];
    oem_table_id.copy_from_slice(&bytes[16..24]);
    Ok(AcpiHeader {
        length,
        revision: bytes[8],
        checksum: bytes[9],
        oem_id,
        oem_table_id,
        oem_revision: u32_at(bytes, 24),
    })
}

/// The little-endian `u16` at `at` (the caller checked the bounds).
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The little-endian `u32` at `at` (the caller checked the bounds).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The little-endian `u64` at `at` (the caller checked the bounds).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
