//! The small vocabulary the rest of the crate speaks: PCI device ids ([`Bdf`]),
//! inclusive physical address ranges ([`MemRange`]), what kind of reserved region a
//! range is ([`RegionKind`]) and the strict/relaxed [`Policy`].
//!
//! Reserved device memory is identity-mapped (guest physical == host physical), so one
//! range type serves both address spaces here; the layout ([`crate::layout`]) is the only
//! place that decides what sits at a guest-physical address.

use std::fmt;
use std::str::FromStr;

/// The x86 page size: RMRRs and `reserved_regions` are page-granular (VT-d spec
/// 8.4 "4KB aligned base address"; Linux `rmrr_sanity_check` checks `PAGE_SIZE`).
pub const PAGE_SIZE: u64 = 4096;

/// Errors of this module: malformed device ids, ranges and names on input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypesError {
    /// A malformed or out-of-range PCI device id.
    #[error(transparent)]
    Bdf(#[from] BdfError),
    /// A range whose inclusive end lies below its start.
    #[error("range end {end:#x} is below its start {start:#x}")]
    EndBelowStart {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// A range of length zero, or one that would run past the top of the address space.
    #[error("range at {start:#x} of length {len:#x} is empty or runs past 2^64")]
    BadLength {
        /// First byte.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A policy name other than `strict` or `relaxed`.
    #[error("{text:?} is not a policy (strict or relaxed)")]
    BadPolicy {
        /// The text given.
        text: String,
    },
    /// A strategy name other than `host` or `ignore`.
    #[error("{text:?} is not a strategy (host or ignore)")]
    BadStrategy {
        /// The text given.
        text: String,
    },
}

pub use dma_types::{Bdf, BdfError};

/// An inclusive range of physical addresses `[start, end]`, never empty.
///
/// Inclusive because every source is: the DMAR RMRR "Reserved Memory Region Limit" is
/// the last byte, `reserved_regions` prints `start + length - 1`, e820 output here is
/// inclusive too. A range ending at `u64::MAX` is legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemRange {
    start: u64,
    end: u64,
}

impl MemRange {
    /// `[start, end]`.
    ///
    /// # Errors
    /// [`TypesError::EndBelowStart`] if `end < start`.
    pub const fn new(start: u64, end: u64) -> Result<Self, TypesError> {
        if end < start {
            return Err(TypesError::EndBelowStart { start, end });
        }
        Ok(Self { start, end })
    }

    /// `[start, end]`, or `None` if `end < start` (usable in constants).
    pub const fn span(start: u64, end: u64) -> Option<Self> {
        if end < start {
            return None;
        }
        Some(Self { start, end })
    }

    /// `[start, start + len - 1]`.
    ///
    /// # Errors
    /// [`TypesError::BadLength`] if `len` is 0 or the range would pass `u64::MAX`.
    pub fn from_len(start: u64, len: u64) -> Result<Self, TypesError> {
        let end = len
            .checked_sub(1)
            .and_then(|l| start.checked_add(l))
            .ok_or(TypesError::BadLength { start, len })?;
        Ok(Self { start, end })
    }

    /// First byte.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Last byte (inclusive).
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// Size in bytes, as u128 because `[0, u64::MAX]` holds 2^64 bytes.
    pub fn size(&self) -> u128 {
        u128::from(self.end - self.start) + 1
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &MemRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// Whether this range shares a byte with the half-open span `[start, end_excl)`
    /// (libxl's `overlaps_rdm`; an empty span overlaps nothing).
    pub fn overlaps_span(&self, start: u64, end_excl: u64) -> bool {
        start < end_excl && self.start < end_excl && start <= self.end
    }

    /// Whether `other` lies wholly inside this range.
    pub fn contains_range(&self, other: &MemRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the start and `end + 1` are both page aligned (Linux `rmrr_sanity_check`).
    pub fn is_page_aligned(&self) -> bool {
        self.start.is_multiple_of(PAGE_SIZE) && self.end.wrapping_add(1).is_multiple_of(PAGE_SIZE)
    }

    /// The smallest page-aligned range covering this one.
    pub fn page_round_out(&self) -> MemRange {
        let start = self.start & !(PAGE_SIZE - 1);
        let end = self.end | (PAGE_SIZE - 1);
        MemRange { start, end }
    }
}

impl fmt::Display for MemRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}-{:#x}]", self.start, self.end)
    }
}

/// What a reserved region is, in Linux's terms (`enum iommu_resv_type`,
/// `iommu_group_resv_type_string[]` in `drivers/iommu/iommu.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RegionKind {
    /// `IOMMU_RESV_DIRECT`: must be identity-mapped for the device (RMRR, IVMD, IORT RMR).
    Direct,
    /// `IOMMU_RESV_DIRECT_RELAXABLE`: identity-mapped by default, but safe to drop on
    /// assignment (Linux ≥ 5.3 for RMRRs used only by USB or graphics).
    DirectRelaxable,
    /// `IOMMU_RESV_RESERVED`: unusable as an I/O address, no mapping wanted.
    Reserved,
    /// `IOMMU_RESV_MSI` / `IOMMU_RESV_SW_MSI`: the MSI doorbell window.
    Msi,
}

impl RegionKind {
    /// The string Linux prints in `reserved_regions` (`msi` for both MSI kinds).
    pub fn as_str(&self) -> &'static str {
        match self {
            RegionKind::Direct => "direct",
            RegionKind::DirectRelaxable => "direct-relaxable",
            RegionKind::Reserved => "reserved",
            RegionKind::Msi => "msi",
        }
    }

    /// Whether the device needs the range identity-mapped (Linux installs identity maps
    /// for `direct` and `direct-relaxable`, `iommu_create_device_direct_mappings`).
    pub fn is_direct(&self) -> bool {
        matches!(self, RegionKind::Direct | RegionKind::DirectRelaxable)
    }
}

/// What to do when a reserved region cannot be honoured (Xen `rdm_reserve_policy`;
/// xl.cfg(5) `rdm=`, xl-pci-configuration(5) `rdm_policy=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Policy {
    /// An unresolved conflict makes the plan (or the assignment) fail.
    Strict,
    /// An unresolved conflict is a warning; the region is dropped.
    Relaxed,
}

impl Policy {
    /// `strict` or `relaxed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Relaxed => "relaxed",
        }
    }
}

impl FromStr for Policy {
    type Err = TypesError;

    fn from_str(text: &str) -> Result<Self, TypesError> {
        match text {
            "strict" => Ok(Policy::Strict),
            "relaxed" => Ok(Policy::Relaxed),
            _ => Err(TypesError::BadPolicy {
                text: text.to_string(),
            }),
        }
    }
}

/// Which reserved regions the layout keeps free (Xen `rdm=strategy=`, xl.cfg(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the regions of the devices assigned at creation (Xen's default).
    #[default]
    Ignore,
    /// Every region the host reports, so devices can be hot-plugged later.
    Host,
}

impl FromStr for Strategy {
    type Err = TypesError;

    fn from_str(text: &str) -> Result<Self, TypesError> {
        match text {
            "host" => Ok(Strategy::Host),
            "ignore" => Ok(Strategy::Ignore),
            _ => Err(TypesError::BadStrategy {
                text: text.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_overlap_and_alignment_are_inclusive_and_do_not_overflow() {
        let top = MemRange::new(u64::MAX - 0xfff, u64::MAX).expect("valid");
        assert!(top.is_page_aligned());
        assert_eq!(top.size(), 0x1000);
        assert!(MemRange::from_len(u64::MAX, 2).is_err());
        assert!(MemRange::from_len(5, 0).is_err());
        let a = MemRange::new(0x1000, 0x1fff).expect("valid");
        assert!(a.overlaps(&MemRange::new(0x1fff, 0x2000).expect("valid")));
        assert!(!a.overlaps(&MemRange::new(0x2000, 0x2fff).expect("valid")));
        assert!(a.overlaps_span(0, 0x1001));
        assert!(!a.overlaps_span(0, 0x1000));
        assert!(!a.overlaps_span(0x1500, 0x1500));
        let odd = MemRange::new(0x1001, 0x1ffe).expect("valid");
        assert!(!odd.is_page_aligned());
        assert_eq!(odd.page_round_out(), a);
    }
}
