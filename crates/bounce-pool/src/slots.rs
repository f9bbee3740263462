//! The swiotlb slot allocator, with Linux's geometry and rules
//! (`kernel/dma/swiotlb.c`: `swiotlb_search_pool_area`, `swiotlb_release_slots`;
//! reference/grants-pools-reserved.md §2.1–§2.2). Pure bookkeeping over slot indices:
//! [`crate::pool`] places it at a guest-physical range and does the copies.
//!
//! The pool is cut into 2 KiB slots grouped in 128-slot segments, and into areas of
//! whole segments, each with its own lock and next-fit cursor; a thread starts in "its"
//! area and tries the others in turn, so several vCPUs allocate without one global lock.
//! Each slot records how many free slots run from it to the end of its segment
//! (`list`), so an allocation never crosses a segment and a release merges with its
//! free neighbours in one pass. Nothing here ever blocks for space: a search that finds
//! no room fails at once.

use crate::{IO_TLB_SEGSIZE, IO_TLB_SHIFT, IO_TLB_SIZE, MAX_MAPPING_SIZE, PAGE_SIZE};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Index of a slot in its pool (0 = the slot at the pool's base).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotIndex(pub usize);

/// Why the allocator could not be built or could not serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// No run of free slots fits the request (swiotlb's "buffer is full" warning).
    #[error(
        "bounce pool is full (size: {size} bytes), total {total} (slots), used {used} (slots)"
    )]
    Full {
        /// Bytes asked for, padding for alignment included.
        size: u64,
        /// Slots in the pool.
        total: usize,
        /// Slots in use when the request failed.
        used: usize,
    },
    /// The request needs more slots than one segment holds.
    #[error("a bounce buffer of {size} bytes is larger than the {max}-byte maximum mapping")]
    TooLarge {
        /// Bytes asked for, padding for alignment included.
        size: u64,
        /// The largest allocation there is (one segment).
        max: u64,
    },
    /// An empty request (Linux `BUG_ON(!nslots)`).
    #[error("a bounce buffer must be at least one byte long")]
    Empty,
    /// A mask that is not of the form 2^k - 1.
    #[error("{what} {mask:#x} is not a power of two minus one")]
    BadMask {
        /// Which mask.
        what: &'static str,
        /// Its value.
        mask: u64,
    },
    /// A `min_align_mask` that leaves no room for a mapping.
    #[error("min_align_mask {mask:#x} leaves no room for a mapping in a {max:#x}-byte segment")]
    MinAlignTooLarge {
        /// The mask.
        mask: u64,
        /// Segment size.
        max: u64,
    },
    /// The area count is not a power of two dividing the segment count.
    #[error("{areas} areas cannot split {segments} segments: need a power of two that divides it")]
    BadAreas {
        /// Areas asked for.
        areas: usize,
        /// Segments in the pool.
        segments: usize,
    },
    /// A pool with no segment, or one too large to index.
    #[error("a pool needs between 1 and {max} segments, not {segments}")]
    BadSize {
        /// Segments asked for.
        segments: usize,
        /// The most supported.
        max: usize,
    },
}

/// What a device tells the DMA layer about itself (`struct device_dma_parameters`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceDma {
    min_align_mask: u64,
    seg_boundary_mask: u64,
}

impl Default for DeviceDma {
    /// No `min_align_mask`, no segment boundary (Linux's defaults).
    fn default() -> Self {
        Self {
            min_align_mask: 0,
            seg_boundary_mask: u64::MAX,
        }
    }
}

fn is_mask(m: u64) -> bool {
    m & m.wrapping_add(1) == 0
}

impl DeviceDma {
    /// A device with `dma_set_min_align_mask(min_align_mask)` (e.g. 0xfff for NVMe) and
    /// `dma_set_seg_boundary(seg_boundary_mask)` (`u64::MAX`: none).
    ///
    /// # Errors
    /// [`SlotError::BadMask`] unless both are 2^k - 1 and the boundary is at least a
    /// slot; [`SlotError::MinAlignTooLarge`] for a `min_align_mask` of a segment or more.
    pub fn new(min_align_mask: u64, seg_boundary_mask: u64) -> Result<Self, SlotError> {
        if !is_mask(min_align_mask) {
            return Err(SlotError::BadMask {
                what: "min_align_mask",
                mask: min_align_mask,
            });
        }
        // swiotlb_max_mapping_size() must leave room for at least one slot.
        if (min_align_mask + 1).next_multiple_of(IO_TLB_SIZE) >= MAX_MAPPING_SIZE as u64 {
            return Err(SlotError::MinAlignTooLarge {
                mask: min_align_mask,
                max: MAX_MAPPING_SIZE as u64,
            });
        }
        // iommu_is_span_boundary() needs a power-of-two boundary of at least a slot.
        if !is_mask(seg_boundary_mask) || seg_boundary_mask < IO_TLB_SIZE - 1 {
            return Err(SlotError::BadMask {
                what: "segment boundary mask",
                mask: seg_boundary_mask,
            });
        }
        Ok(Self {
            min_align_mask,
            seg_boundary_mask,
        })
    }

    /// `dma_get_min_align_mask()`.
    pub fn min_align_mask(&self) -> u64 {
        self.min_align_mask
    }

    /// `dma_get_seg_boundary()`.
    pub fn seg_boundary_mask(&self) -> u64 {
        self.seg_boundary_mask
    }

    /// `swiotlb_max_mapping_size()`: 256 KiB less `min_align_mask` rounded up to a slot,
    /// what upper layers must cap a segment at (e.g. virtio-blk's `size_max`).
    pub fn max_mapping_size(&self) -> usize {
        let min_align = if self.min_align_mask == 0 {
            0
        } else {
            (self.min_align_mask + 1).next_multiple_of(IO_TLB_SIZE)
        };
        MAX_MAPPING_SIZE - min_align as usize
    }

    /// `get_max_slots(boundary_mask)`: slots per boundary window.
    fn max_slots(&self) -> u64 {
        if self.seg_boundary_mask == u64::MAX {
            1 << (64 - IO_TLB_SHIFT)
        } else {
            nr_slots(self.seg_boundary_mask + 1)
        }
    }
}

/// `nr_slots()`: slots covering `bytes`.
pub(crate) fn nr_slots(bytes: u64) -> u64 {
    bytes.div_ceil(IO_TLB_SIZE)
}

/// Counters of a pool (Linux debugfs `io_tlb_nslabs`, `io_tlb_used`,
/// `io_tlb_used_hiwater`, plus what the warnings count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Slots in the pool.
    pub total_slots: usize,
    /// Slots allocated now (streaming and coherent, padding included).
    pub used_slots: usize,
    /// Most slots ever allocated at once since the pool was built or the mark reset.
    pub high_water_slots: usize,
    /// Allocations refused (pool full or request too large).
    pub failed_maps: u64,
    /// Syncs and unmaps cut short because they reached past their allocation
    /// (swiotlb's "Buffer overflow detected" warning).
    pub overflows: u64,
}

/// What an allocation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A streaming mapping: bounces between `orig` and the pool.
    Streaming,
    /// A coherent allocation: lives in the pool, never bounced.
    Coherent,
}

/// One live allocation, kept at its first slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) kind: Kind,
    /// The address handed out (for a streaming mapping, past the padding).
    pub(crate) start: u64,
    /// Original buffer address matching `start` (streaming only).
    pub(crate) orig: u64,
    /// Bytes asked for (the mapping size).
    pub(crate) size: usize,
    /// End of the allocation (exclusive): syncs are cut at it.
    pub(crate) alloc_end: u64,
    /// First slot, padding included.
    pub(crate) first: SlotIndex,
    /// Slots held, padding included.
    pub(crate) nslots: usize,
}

/// No owner.
const FREE: u32 = u32::MAX;

struct Area {
    /// `area->index`: where the next search starts (area-local).
    index: usize,
    /// `area->used`.
    used: usize,
    /// `slots[i].list`: free slots from i to the end of its segment, 0 if in use.
    list: Vec<u32>,
    /// Area-local first slot of the allocation holding each slot, or [`FREE`].
    owner: Vec<u32>,
    /// The record of the allocation starting at each slot (valid where it starts).
    records: Vec<Option<Record>>,
}

impl Area {
    fn new(nslots: usize) -> Self {
        Self {
            index: 0,
            used: 0,
            // Initialised 128, 127, … 1 in each segment.
            list: (0..nslots)
                .map(|i| (IO_TLB_SEGSIZE - i % IO_TLB_SEGSIZE) as u32)
                .collect(),
            owner: vec![FREE; nslots],
            records: vec![None; nslots],
        }
    }
}

fn lock(a: &Mutex<Area>) -> MutexGuard<'_, Area> {
    // Areas are mutated only after every check, in steps that leave them consistent.
    a.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Source of per-thread start areas (Linux: `raw_smp_processor_id()`).
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static THREAD_AREA: Cell<Option<usize>> = const { Cell::new(None) };
}

fn thread_area_hint() -> usize {
    THREAD_AREA.with(|c| match c.get() {
        Some(h) => h,
        None => {
            let h = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            c.set(Some(h));
            h
        }
    })
}

/// The allocator of one pool at guest-physical `base`.
pub struct SlotAllocator {
    base: u64,
    nslots: usize,
    area_nslots: usize,
    areas: Box<[Mutex<Area>]>,
    used: AtomicUsize,
    high_water: AtomicUsize,
    failed: AtomicU64,
    overflows: AtomicU64,
}

impl std::fmt::Debug for SlotAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotAllocator")
            .field("base", &format_args!("{:#x}", self.base))
            .field("nslots", &self.nslots)
            .field("areas", &self.areas.len())
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl SlotAllocator {
    /// An allocator of `segments` 128-slot segments at `base`, in `areas` areas.
    ///
    /// # Errors
    /// [`SlotError::BadSize`] for no segment or more than 2^24 (4 TiB);
    /// [`SlotError::BadAreas`] unless `areas` is a power of two dividing `segments`
    /// (Linux: a power of two, each area at least one segment).
    pub fn new(base: u64, segments: usize, areas: usize) -> Result<Self, SlotError> {
        // Slot indices are kept in u32 per slot; 2^24 segments are 2^31 slots.
        const MAX_SEGMENTS: usize = 1 << 24;
        if segments == 0 || segments > MAX_SEGMENTS {
            return Err(SlotError::BadSize {
                segments,
                max: MAX_SEGMENTS,
            });
        }
        if !areas.is_power_of_two() || !segments.is_multiple_of(areas) {
            return Err(SlotError::BadAreas { areas, segments });
        }
        let nslots = segments * IO_TLB_SEGSIZE;
        let area_nslots = nslots / areas;
        Ok(Self {
            base,
            nslots,
            area_nslots,
            areas: (0..areas)
                .map(|_| Mutex::new(Area::new(area_nslots)))
                .collect(),
            used: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            failed: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        })
    }

    /// Slots in the pool.
    pub fn total_slots(&self) -> usize {
        self.nslots
    }

    /// Areas, each with its own lock.
    pub fn areas(&self) -> usize {
        self.areas.len()
    }

    /// Guest-physical address of slot `i`.
    pub fn slot_addr(&self, i: SlotIndex) -> u64 {
        self.base + ((i.0 as u64) << IO_TLB_SHIFT)
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total_slots: self.nslots,
            used_slots: self.used.load(Ordering::Relaxed),
            high_water_slots: self.high_water.load(Ordering::Relaxed),
            failed_maps: self.failed.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
        }
    }

    /// Sets the high-water mark back to the slots in use now (debugfs: write 0).
    pub fn reset_high_water(&self) {
        self.high_water
            .store(self.used.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(crate) fn note_overflow(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// `swiotlb_find_slots`: finds `nr_slots(alloc_size)` free slots for a buffer at
    /// `orig` (`None` for a coherent allocation, which has no original) and records
    /// the allocation `make(first slot address)` returns, under the area's lock.
    /// Starts in the calling thread's area and tries every other once.
    pub(crate) fn alloc(
        &self,
        orig: Option<u64>,
        alloc_size: u64,
        alloc_align_mask: u64,
        dev: &DeviceDma,
        make: impl FnOnce(u64, usize) -> Record,
    ) -> Result<Record, SlotError> {
        let nslots = nr_slots(alloc_size);
        if nslots == 0 {
            return Err(SlotError::Empty);
        }
        if nslots > IO_TLB_SEGSIZE as u64 {
            self.note_failure();
            return Err(SlotError::TooLarge {
                size: alloc_size,
                max: MAX_MAPPING_SIZE as u64,
            });
        }
        let nslots = nslots as usize;
        let nareas = self.areas.len();
        let start = thread_area_hint() & (nareas - 1);
        let mut make = Some(make);
        for k in 0..nareas {
            let a = (start + k) & (nareas - 1);
            if let Some(rec) = self.search_area(
                a,
                orig,
                alloc_size,
                nslots,
                alloc_align_mask,
                dev,
                &mut make,
            ) {
                return Ok(rec);
            }
        }
        self.note_failure();
        Err(SlotError::Full {
            size: alloc_size,
            total: self.nslots,
            used: self.used.load(Ordering::Relaxed),
        })
    }

    /// `swiotlb_search_pool_area`, step for step.
    #[allow(clippy::too_many_arguments)]
    fn search_area<F: FnOnce(u64, usize) -> Record>(
        &self,
        area_index: usize,
        orig: Option<u64>,
        alloc_size: u64,
        nslots: usize,
        mut alloc_align_mask: u64,
        dev: &DeviceDma,
        make: &mut Option<F>,
    ) -> Option<Record> {
        let boundary_mask = dev.seg_boundary_mask;
        let tbl_dma_addr = self.base & boundary_mask;
        let max_slots = dev.max_slots();
        let mut iotlb_align_mask = dev.min_align_mask;
        // "Historically, swiotlb allocations >= PAGE_SIZE were guaranteed to be
        // page-aligned in the absence of any other alignment requirements."
        if alloc_align_mask == 0 && iotlb_align_mask == 0 && alloc_size >= PAGE_SIZE {
            alloc_align_mask = PAGE_SIZE - 1;
        }
        // At least slot-aligned; the min_align bits below the allocation alignment are
        // kept by the pre-padding offset instead of by slot choice.
        alloc_align_mask |= IO_TLB_SIZE - 1;
        iotlb_align_mask &= !alloc_align_mask;
        let stride = (nr_slots(alloc_align_mask.max(iotlb_align_mask).saturating_add(1)) as usize)
            .clamp(1, self.area_nslots);
        let n = self.area_nslots;
        let wrap = |i: usize| if i >= n { 0 } else { i };

        let mut area = lock(&self.areas[area_index]);
        if nslots > n - area.used {
            return None;
        }
        let slot_base = area_index * n;
        let mut index = area.index;
        let mut checked = 0;
        let found = loop {
            if checked >= n {
                return None;
            }
            let slot_index = slot_base + index;
            let tlb_addr = tbl_dma_addr.wrapping_add((slot_index as u64) << IO_TLB_SHIFT);
            let misaligned = tlb_addr & alloc_align_mask != 0
                || orig.is_some_and(|o| tlb_addr & iotlb_align_mask != o & iotlb_align_mask);
            if misaligned {
                index = wrap(index + 1);
                checked += 1;
                continue;
            }
            // iommu_is_span_boundary(slot_index, nslots, nr_slots(tbl_dma_addr), max_slots)
            let shift = nr_slots(tbl_dma_addr);
            let offset = shift.wrapping_add(slot_index as u64) & (max_slots - 1);
            let crosses = offset + nslots as u64 > max_slots;
            if !crosses && area.list[index] as usize >= nslots {
                break index;
            }
            index = wrap(index + stride);
            checked += stride;
        };

        // Take the run, and shorten the free run counts of the free slots before it in
        // the same segment.
        for i in found..found + nslots {
            area.list[i] = 0;
            area.owner[i] = found as u32;
        }
        let mut count = 0;
        let mut i = found;
        while !i.is_multiple_of(IO_TLB_SEGSIZE) && area.list[i - 1] != 0 {
            i -= 1;
            count += 1;
            area.list[i] = count;
        }
        area.index = wrap(found + nslots);
        area.used += nslots;
        let used = self.used.fetch_add(nslots, Ordering::Relaxed) + nslots;
        self.high_water.fetch_max(used, Ordering::Relaxed);
        let make = make
            .take()
            .expect("called once: the search returns after it");
        let rec = make(self.slot_addr(SlotIndex(slot_base + found)), nslots);
        area.records[found] = Some(rec);
        Some(rec)
    }

    /// The live allocation holding the slot at guest-physical `addr`, if any.
    pub(crate) fn lookup(&self, addr: u64) -> Option<Record> {
        let slot = self.slot_of(addr)?;
        let (a, local) = (slot / self.area_nslots, slot % self.area_nslots);
        let area = lock(&self.areas[a]);
        let owner = area.owner[local];
        if owner == FREE {
            return None;
        }
        area.records[owner as usize]
    }

    /// The slot holding guest-physical `addr`, if it is in the pool.
    pub fn slot_of(&self, addr: u64) -> Option<usize> {
        let off = addr.checked_sub(self.base)?;
        let slot = usize::try_from(off >> IO_TLB_SHIFT).ok()?;
        (slot < self.nslots).then_some(slot)
    }

    /// `swiotlb_release_slots`: frees the allocation of `kind` handed out at `start`,
    /// merging the run with its free neighbours in the segment. Returns its record.
    pub(crate) fn release(&self, start: u64, kind: Kind) -> Option<Record> {
        let slot = self.slot_of(start)?;
        let (a, local) = (slot / self.area_nslots, slot % self.area_nslots);
        let mut area = lock(&self.areas[a]);
        let owner = area.owner[local];
        if owner == FREE {
            return None;
        }
        let first = owner as usize;
        let rec = area.records[first]?;
        if rec.start != start || rec.kind != kind {
            return None;
        }
        let nslots = rec.nslots;
        // Step 1: free the run, merging with the free run after it in the segment.
        let end = first + nslots;
        let mut count = if end < (first + 1).next_multiple_of(IO_TLB_SEGSIZE) {
            area.list[end]
        } else {
            0
        };
        for i in (first..end).rev() {
            count += 1;
            area.list[i] = count;
            area.owner[i] = FREE;
        }
        area.records[first] = None;
        // Step 2: merge with the free slots before it in the segment.
        let mut i = first;
        while !i.is_multiple_of(IO_TLB_SEGSIZE) && area.list[i - 1] != 0 {
            i -= 1;
            count += 1;
            area.list[i] = count;
        }
        area.used -= nslots;
        self.used.fetch_sub(nslots, Ordering::Relaxed);
        Some(rec)
    }

    /// Which slots are free, in order (for tests and models; takes every area lock
    /// in turn).
    pub fn free_map(&self) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.nslots);
        for a in self.areas.iter() {
            out.extend(lock(a).owner.iter().map(|&o| o == FREE));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(kind: Kind) -> impl FnOnce(u64, usize) -> Record {
        move |addr, nslots| Record {
            kind,
            start: addr,
            orig: 0,
            size: 1,
            alloc_end: addr + (nslots as u64) * IO_TLB_SIZE,
            first: SlotIndex(0),
            nslots,
        }
    }

    #[test]
    fn list_counts_start_at_128_down_to_1_per_segment() {
        let s = SlotAllocator::new(0x10_0000, 2, 1).unwrap();
        let a = lock(&s.areas[0]);
        assert_eq!(a.list[0], 128);
        assert_eq!(a.list[127], 1);
        assert_eq!(a.list[128], 128);
    }

    #[test]
    fn release_merges_runs_back_to_a_whole_segment() {
        let s = SlotAllocator::new(0x10_0000, 1, 1).unwrap();
        let d = DeviceDma::default();
        let x = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        let y = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        let z = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        s.release(y.start, Kind::Streaming).unwrap();
        s.release(x.start, Kind::Streaming).unwrap();
        s.release(z.start, Kind::Streaming).unwrap();
        let a = lock(&s.areas[0]);
        let expect: Vec<u32> = (1..=128).rev().collect();
        assert_eq!(a.list, expect);
        assert_eq!(a.used, 0);
    }

    #[test]
    fn release_of_wrong_kind_or_address_is_refused() {
        let s = SlotAllocator::new(0x10_0000, 1, 1).unwrap();
        let d = DeviceDma::default();
        let x = s.alloc(None, 4096, 0, &d, rec(Kind::Coherent)).unwrap();
        assert_eq!(s.release(x.start, Kind::Streaming), None);
        assert_eq!(s.release(x.start + 2048, Kind::Coherent), None);
        assert!(s.release(x.start, Kind::Coherent).is_some());
        assert_eq!(s.release(x.start, Kind::Coherent), None, "no double free");
    }

    #[test]
    fn config_is_validated() {
        assert!(matches!(
            SlotAllocator::new(0, 0, 1),
            Err(SlotError::BadSize { .. })
        ));
        assert!(matches!(
            SlotAllocator::new(0, 4, 3),
            Err(SlotError::BadAreas { .. })
        ));
        assert!(matches!(
            SlotAllocator::new(0, 2, 4),
            Err(SlotError::BadAreas { .. })
        ));
        assert!(DeviceDma::new(0xffe, u64::MAX).is_err());
        assert!(DeviceDma::new(0, 0xff).is_err());
        assert!(DeviceDma::new(0x3_ffff, u64::MAX).is_err());
        assert_eq!(
            DeviceDma::new(0xfff, 0xffff_ffff).unwrap().max_slots(),
            1 << 21
        );
    }
}
