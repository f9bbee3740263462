//! The BAR allocator of a planned [`Layout`]: [`MmioAllocator`] places BARs in the
//! layout's MMIO windows, naturally aligned, away from RAM, the fixed q35 windows and
//! every reserved region the plan considered.

use super::{align_up, E820Kind, Layout, LayoutError, Q35_MMCONFIG, X86_PLATFORM};
use crate::types::{MemRange, PAGE_SIZE};

impl Layout {
    /// A BAR allocator over this layout's MMIO windows that avoids RAM, the fixed
    /// windows and every region considered (kept or dropped).
    pub fn mmio_allocator(&self) -> MmioAllocator {
        let mut avoid: Vec<MemRange> = self.regions.iter().map(|r| r.range).collect();
        avoid.extend(
            self.e820
                .iter()
                .filter(|e| e.kind == E820Kind::Ram)
                .map(|e| e.range),
        );
        avoid.push(Q35_MMCONFIG);
        avoid.push(X86_PLATFORM);
        avoid.sort();
        MmioAllocator {
            mmio32: self.mmio32,
            mmio64: self.mmio64,
            avoid,
            allocated: Vec::new(),
        }
    }
}

/// Places BARs in the MMIO windows, naturally aligned, never on a reserved region
/// (hvmloader's `pci_setup`: on an RMRR, bump the base past it and re-align).
#[derive(Debug, Clone)]
pub struct MmioAllocator {
    mmio32: MemRange,
    mmio64: MemRange,
    avoid: Vec<MemRange>,
    allocated: Vec<MemRange>,
}

impl MmioAllocator {
    /// Allocates a BAR of `size` bytes: 32-bit BARs in the 32-bit window; 64-bit BARs
    /// in the 64-bit window first, then the 32-bit one.
    ///
    /// # Errors
    /// [`LayoutError::BadBarSize`], [`LayoutError::MmioExhausted`].
    pub fn allocate(&mut self, size: u64, bar64: bool) -> Result<MemRange, LayoutError> {
        if size < PAGE_SIZE || !size.is_power_of_two() {
            return Err(LayoutError::BadBarSize { size });
        }
        let windows: &[MemRange] = if bar64 {
            &[self.mmio64, self.mmio32]
        } else {
            &[self.mmio32]
        };
        for w in windows {
            if let Some(r) = self.first_fit(w, size) {
                self.allocated.push(r);
                return Ok(r);
            }
        }
        Err(LayoutError::MmioExhausted { size })
    }

    /// Everything allocated so far.
    pub fn allocated(&self) -> &[MemRange] {
        &self.allocated
    }

    fn first_fit(&self, window: &MemRange, size: u64) -> Option<MemRange> {
        let mut base = align_up(window.start(), size)?;
        loop {
            let candidate = MemRange::from_len(base, size).ok()?;
            if !window.contains_range(&candidate) {
                return None;
            }
            match self
                .avoid
                .iter()
                .chain(&self.allocated)
                .find(|r| r.overlaps(&candidate))
            {
                Some(r) => base = align_up(r.end().checked_add(1)?, size)?,
                None => return Some(candidate),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::{assigned, db, GIB, MIB};
    use crate::layout::{plan, LayoutConfig};
    use crate::types::RegionKind;

    #[test]
    fn layout_bar_allocator_never_overlaps_a_reserved_region() {
        // The IGD stolen-memory RMRR of the ThinkPad table sits in the 32-bit hole.
        let d = db(&[(0xC000_0000, 0xC0FF_FFFF, RegionKind::Direct, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(4 * GIB);
        assigned(&mut cfg, "00:02.0", None);
        let l = plan(&cfg, &d).expect("plan");
        let mut a = l.mmio_allocator();
        let bar = a.allocate(256 * MIB, false).expect("room");
        assert_eq!(
            bar.start(),
            0xD000_0000,
            "bumped past the region, re-aligned to its size"
        );
        let small = a.allocate(0x1000, false).expect("room");
        assert_eq!(small.start(), 0xC100_0000);
        let high = a.allocate(GIB, true).expect("room");
        assert!(high.start() >= l.high_ram_end);
        assert!(matches!(
            a.allocate(3000, false),
            Err(LayoutError::BadBarSize { size: 3000 })
        ));
        assert!(matches!(
            a.allocate(1 << 40, false),
            Err(LayoutError::MmioExhausted { .. })
        ));
    }
}
