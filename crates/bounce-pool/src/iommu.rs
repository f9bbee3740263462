//! The device side of pool mode: [`PoolIommu`], a `vm_memory::Iommu` that translates
//! exactly the pool's guest-physical range (identity, read and write) and denies every
//! other address, counting each denial. A backend written against `GuestMemory` runs
//! unchanged behind `vm_memory::IommuMemory<_, PoolIommu>` and can reach nothing of the
//! guest but the pool (the pool is the only memory shared with the host: Linux's
//! `restricted-dma-pool` binding, `shared-dma-pool.yaml`, and pKVM's
//! `ARM_SMCCC_KVM_FUNC_MEM_SHARE`).
//!
//! # Invalidation contract
//! There is none to keep: the one IOTLB entry is set when the `PoolIommu` is built and
//! never changes (the pool is fixed at VM creation), so the IOTLB needs no lock and a
//! translation holds a plain shared reference to it.

use crate::{BouncePool, Gpa};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::iommu::{Error as IommuError, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iommu, Permissions};

/// Why a [`PoolIommu`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolIommuError {
    /// An empty pool range.
    #[error("the pool range at {base} is empty")]
    Empty {
        /// Its base.
        base: Gpa,
    },
    /// A range that does not end at or below 2^64 - 1 (the IOTLB keeps half-open
    /// `u64` ranges), or does not fit in `usize`.
    #[error("the pool range at {base} of {size:#x} bytes does not fit below 2^64 - 1")]
    TooLarge {
        /// Its base.
        base: Gpa,
        /// Its size.
        size: u64,
    },
}

/// The pool-only address space of a device in pool mode.
#[derive(Debug)]
pub struct PoolIommu {
    range: Range<u64>,
    iotlb: Iotlb,
    faults: AtomicU64,
}

impl PoolIommu {
    /// Allows `[base, base + size)` for reads and writes, identity-mapped.
    ///
    /// # Errors
    /// [`PoolIommuError::Empty`] for size 0; [`PoolIommuError::TooLarge`] when the
    /// range ends past 2^64 - 1.
    pub fn new(base: Gpa, size: u64) -> Result<Self, PoolIommuError> {
        if size == 0 {
            return Err(PoolIommuError::Empty { base });
        }
        let end = base
            .0
            .checked_add(size)
            .ok_or(PoolIommuError::TooLarge { base, size })?;
        let len = usize::try_from(size).map_err(|_| PoolIommuError::TooLarge { base, size })?;
        let mut iotlb = Iotlb::new();
        // A non-empty range ending at or below u64::MAX: set_mapping never fails.
        let _ = iotlb.set_mapping(
            GuestAddress(base.0),
            GuestAddress(base.0),
            len,
            Permissions::ReadWrite,
        );
        Ok(Self {
            range: base.0..end,
            iotlb,
            faults: AtomicU64::new(0),
        })
    }

    /// The address space of `pool`'s devices.
    ///
    /// # Errors
    /// As [`Self::new`] (never, for a pool that [`BouncePool::new`] accepted and that
    /// ends below 2^64).
    pub fn for_pool(pool: &BouncePool) -> Result<Self, PoolIommuError> {
        Self::new(pool.base(), pool.size())
    }

    /// The one range the device may reach.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// Accesses denied so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }
}

impl Iommu for PoolIommu {
    type IotlbGuard<'a> = &'a Iotlb;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let inside = iova
            .0
            .checked_add(length as u64)
            .is_some_and(|end| iova.0 >= self.range.start && end <= self.range.end);
        if inside {
            if let Ok(hit) = Iotlb::lookup(&self.iotlb, iova, length, access) {
                return Ok(hit);
            }
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        Err(IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: format!(
                "outside the restricted DMA pool [{:#x}, {:#x})",
                self.range.start, self.range.end
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn translates_identity_inside_and_faults_outside_counting() {
        let m = PoolIommu::new(Gpa(0x10_0000), 0x4_0000).unwrap();
        let r: Vec<_> = m
            .translate(GuestAddress(0x10_0800), 0x1000, Permissions::Write)
            .unwrap()
            .collect();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].base, GuestAddress(0x10_0800));
        assert_eq!(r[0].length, 0x1000);
        for (a, l) in [
            (0x0f_ffff, 2),
            (0x13_ffff, 2),
            (0x14_0000, 1),
            (0, 1),
            (u64::MAX, 1),
        ] {
            assert!(m.translate(GuestAddress(a), l, Permissions::Read).is_err());
        }
        assert_eq!(m.faults(), 5);
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert_eq!(
            PoolIommu::new(Gpa(1), 0).unwrap_err(),
            PoolIommuError::Empty { base: Gpa(1) }
        );
        assert!(PoolIommu::new(Gpa(u64::MAX), 1).is_err());
    }
}
