//! The guest memory a vfio-user client hands a device: `DMA_MAP` messages carry a file
//! descriptor (guest RAM as a shared memfd), a file offset, a bus address and a size;
//! `DMA_UNMAP` withdraws ranges. [`DmaMap`] keeps those ranges, maps each once, and
//! builds the `GuestMemoryMmap` the device's accesses go through.
//!
//! The client is trusted no more than the guest: ranges are bounded and checked before
//! anything changes, and a range the device could not write safely (mapped read-only,
//! or without a descriptor) is not made reachable at all, so a guest-directed write can
//! never fault the host process.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Most ranges one device keeps; QEMU sends tens (RAM split around firmware holes).
pub const MAX_RANGES: usize = 1024;

/// Why a `DMA_MAP` or `DMA_UNMAP` was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Size zero, or address + size past 2^64, or offset + size past 2^64.
    #[error("DMA range at {address:#x} size {size:#x} offset {offset:#x} is empty or wraps")]
    BadRange {
        /// Bus address.
        address: u64,
        /// Size.
        size: u64,
        /// File offset.
        offset: u64,
    },
    /// The range overlaps one already mapped.
    #[error("DMA range at {address:#x} size {size:#x} overlaps a mapped range")]
    Overlap {
        /// Bus address.
        address: u64,
        /// Size.
        size: u64,
    },
    /// Too many ranges.
    #[error("more than {MAX_RANGES} DMA ranges")]
    TooMany,
    /// The mmap of the descriptor failed.
    #[error("cannot map DMA range at {address:#x} size {size:#x}: {source}")]
    Mmap {
        /// Bus address.
        address: u64,
        /// Size.
        size: u64,
        /// What mmap said.
        source: vm_memory::mmap::MmapRegionError,
    },
}

#[derive(Clone, Debug)]
struct Range {
    size: u64,
    /// `None` for a range the device may not touch (no fd, or read-only).
    backing: Option<(Arc<File>, u64)>,
    /// The mapping, made once per range.
    region: Option<Arc<GuestRegionMmap>>,
}

/// The DMA ranges of one device.
#[derive(Debug, Default)]
pub struct DmaMap {
    ranges: BTreeMap<u64, Range>,
}

impl DmaMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of ranges (reachable or not).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no range is mapped.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds a range. `writable` is the client's WRITE flag; only writable ranges with a
    /// descriptor become reachable memory.
    ///
    /// # Errors
    /// [`DmaError`]; the map is unchanged.
    pub fn map(
        &mut self,
        address: u64,
        size: u64,
        offset: u64,
        fd: Option<File>,
        writable: bool,
    ) -> Result<(), DmaError> {
        let bad = DmaError::BadRange {
            address,
            size,
            offset,
        };
        if size == 0
            || address.checked_add(size - 1).is_none()
            || offset.checked_add(size).is_none()
        {
            return Err(bad);
        }
        let last = address + (size - 1);
        if let Some((&s, r)) = self.ranges.range(..=last).next_back() {
            if s + (r.size - 1) >= address {
                return Err(DmaError::Overlap { address, size });
            }
        }
        if self.ranges.len() >= MAX_RANGES {
            return Err(DmaError::TooMany);
        }
        let backing = match fd {
            Some(f) if writable => Some((Arc::new(f), offset)),
            _ => None,
        };
        let region = match &backing {
            Some((file, off)) => Some(Arc::new(Self::mmap(address, size, file, *off)?)),
            None => None,
        };
        self.ranges.insert(
            address,
            Range {
                size,
                backing,
                region,
            },
        );
        Ok(())
    }

    fn mmap(
        address: u64,
        size: u64,
        file: &Arc<File>,
        offset: u64,
    ) -> Result<GuestRegionMmap, DmaError> {
        let len = usize::try_from(size).map_err(|_| DmaError::BadRange {
            address,
            size,
            offset,
        })?;
        let region = MmapRegion::from_file(FileOffset::from_arc(Arc::clone(file), offset), len)
            .map_err(|source| DmaError::Mmap {
                address,
                size,
                source,
            })?;
        GuestRegionMmap::new(region, GuestAddress(address)).ok_or(DmaError::BadRange {
            address,
            size,
            offset,
        })
    }

    /// Withdraws `[address, address + size)`: ranges inside go, ranges straddling an
    /// edge are cut (the part outside stays, re-mapped at its offset).
    ///
    /// # Errors
    /// [`DmaError`] if the range is malformed or a cut piece cannot be re-mapped; the
    /// map is then unchanged.
    pub fn unmap(&mut self, address: u64, size: u64) -> Result<(), DmaError> {
        if size == 0 || address.checked_add(size - 1).is_none() {
            return Err(DmaError::BadRange {
                address,
                size,
                offset: 0,
            });
        }
        let last = address + (size - 1);
        let hit: Vec<u64> = self
            .ranges
            .range(..=last)
            .rev()
            .take_while(|(s, r)| **s + (r.size - 1) >= address)
            .map(|(s, _)| *s)
            .collect();
        // Build the surviving pieces first, so a failed re-map changes nothing.
        let mut keep = Vec::new();
        for &s in &hit {
            let r = &self.ranges[&s];
            let end = s + (r.size - 1);
            if s < address {
                keep.push(self.piece(s, address - s, r, 0)?);
            }
            if end > last {
                keep.push(self.piece(last + 1, end - last, r, last + 1 - s)?);
            }
        }
        for s in hit {
            self.ranges.remove(&s);
        }
        for (s, r) in keep {
            self.ranges.insert(s, r);
        }
        Ok(())
    }

    fn piece(&self, start: u64, size: u64, r: &Range, skip: u64) -> Result<(u64, Range), DmaError> {
        let backing = r
            .backing
            .as_ref()
            .map(|(f, off)| (Arc::clone(f), off + skip));
        let region = match &backing {
            Some((f, off)) => Some(Arc::new(Self::mmap(start, size, f, *off)?)),
            None => None,
        };
        Ok((
            start,
            Range {
                size,
                backing,
                region,
            },
        ))
    }

    /// Withdraws everything (`DMA_UNMAP` with `UNMAP_ALL`, or a reset of the client).
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// The memory the device can reach now: every writable, fd-backed range.
    pub fn memory(&self) -> GuestMemoryMmap {
        let regions: Vec<Arc<GuestRegionMmap>> = self
            .ranges
            .values()
            .filter_map(|r| r.region.clone())
            .collect();
        // Ranges never overlap (checked in `map`), which is all `from_arc_regions`
        // requires besides a non-empty list.
        GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(len: usize) -> File {
        test_kit::mem::memfd("dma-unit", len as u64)
    }

    #[test]
    fn mapped_writable_ranges_are_memory_and_others_are_not() {
        let f = memfd(0x4000);
        let mut m = DmaMap::new();
        m.map(
            0x10_0000,
            0x2000,
            0x1000,
            Some(f.try_clone().expect("dup")),
            true,
        )
        .expect("map");
        m.map(
            0x20_0000,
            0x1000,
            0,
            Some(f.try_clone().expect("dup")),
            false,
        )
        .expect("read-only");
        m.map(0xffff_0000, 0x1000, 0, None, true).expect("no fd");
        let mem = m.memory();
        mem.write_obj(0xabu8, GuestAddress(0x10_0001))
            .expect("writable range");
        assert!(
            mem.read_obj::<u8>(GuestAddress(0x20_0000)).is_err(),
            "read-only: unreachable"
        );
        assert!(
            mem.read_obj::<u8>(GuestAddress(0xffff_0000)).is_err(),
            "no fd: unreachable"
        );
        // The byte landed at file offset 0x1001.
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&f, &mut b, 0x1001).expect("read");
        assert_eq!(b[0], 0xab);
    }

    #[test]
    fn overlaps_and_malformed_ranges_are_refused_unchanged() {
        let mut m = DmaMap::new();
        m.map(0x1000, 0x2000, 0, None, true).expect("map");
        assert!(matches!(
            m.map(0x2000, 0x1000, 0, None, true),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            m.map(0x5000, 0, 0, None, true),
            Err(DmaError::BadRange { .. })
        ));
        assert!(matches!(
            m.map(u64::MAX, 2, 0, None, true),
            Err(DmaError::BadRange { .. })
        ));
        assert!(matches!(m.unmap(0, 0), Err(DmaError::BadRange { .. })));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn unmap_cuts_straddling_ranges_and_keeps_offsets() {
        let f = memfd(0x10000);
        std::os::unix::fs::FileExt::write_at(&f, &[7], 0x3000).expect("write");
        let mut m = DmaMap::new();
        m.map(0x10000, 0x8000, 0, Some(f), true).expect("map");
        m.unmap(0x11000, 0x1000).expect("unmap middle");
        let mem = m.memory();
        assert!(mem.read_obj::<u8>(GuestAddress(0x11000)).is_err());
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x13000)).expect("kept"),
            7,
            "offset kept"
        );
        assert!(mem.read_obj::<u8>(GuestAddress(0x10fff)).is_ok());
        assert_eq!(m.len(), 2);
        m.unmap(0, u64::MAX).expect("unmap all");
        assert!(m.is_empty());
        assert_eq!(m.memory().num_regions(), 0);
    }
}
