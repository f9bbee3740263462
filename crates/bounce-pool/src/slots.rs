//! The swiotlb slot allocator, with Linux's geometry and rules
//! (`kernel/dma/swiotlb.c`: `swiotlb_search_pool_area`, `swiotlb_release_slots`;
//! constants from `include/linux/swiotlb.h`). Pure bookkeeping over slot indices:
//! [`crate::pool`] places it at a guest-physical range and does the copies.
//!
//! The pool is cut into 2 KiB slots grouped in 128-slot segments, and into areas of
//! whole segments, each with its own lock and next-fit cursor; a thread starts in "its"
//! area and tries the others in turn, so several vCPUs allocate without one global lock.
//! Each segment keeps one bit per free slot (Linux keeps `list`, the free slots from
//! each slot to the end of its run; the bitmap answers the same question with a few
//! word operations and merges a freed run with its neighbours for free), so an
//! allocation never crosses a segment. The fast path is one area lock per allocation
//! and one per release; looking up a mapping (syncs, unmap) takes none. Nothing here
//! ever blocks for space: a search that finds no room fails at once.

use crate::{IO_TLB_SEGSIZE, IO_TLB_SHIFT, IO_TLB_SIZE, MAX_MAPPING_SIZE, PAGE_SIZE};
use dma_types::lock;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// A segment's free map with every slot free.
const ALL_FREE: u128 = u128::MAX;

/// The lock-protected part of an area: which slots are free, and the cursor.
///
/// Linux keeps `slots[i].list` (free slots from `i` to the end of its segment) and
/// walks it to merge runs; here a segment is one `u128` with a bit per free slot, so
/// "`list[i] >= nslots`" is "bits `i..i + nslots` are all set" (one shift-and per
/// doubling of `nslots`), taking a run is clearing its bits, and freeing is setting
/// them — the merge with free neighbours is implicit. [`SlotAllocator::free_run`]
/// gives Linux's `list` value back for tests.
struct Area {
    /// `area->index`: where the next search starts (area-local slot).
    index: usize,
    /// `area->used`.
    used: usize,
    /// Bit `j` of `free[s]`: area-local slot `s * 128 + j` is free.
    free: Vec<u128>,
}

/// A value alone on its cache line(s) (128 bytes: two lines, for CPUs that fetch
/// lines in pairs), so that threads using different areas, or the shared counters,
/// do not slow each other down by writing to the same line.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A live allocation's record, readable without the area lock. Written only under
/// the lock of the area holding the slots, before the slots' owner entries are
/// published (`Release`); read after loading an owner entry (`Acquire`).
#[derive(Default)]
struct RecCell {
    start: AtomicU64,
    orig: AtomicU64,
    alloc_end: AtomicU64,
    /// `size << 1 | coherent`.
    size_kind: AtomicU64,
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

/// Bits `0, stride, 2 * stride, …` of a segment (`stride` a power of two ≤ 128).
fn every(stride: usize) -> u128 {
    /// `EVERY[k]`: every `2^k`-th bit.
    const EVERY: [u128; 8] = {
        let mut t = [0u128; 8];
        let mut k = 0;
        while k < 8 {
            let mut m = 1u128;
            let mut s = 1usize << k;
            while s < IO_TLB_SEGSIZE {
                m |= m << s;
                s *= 2;
            }
            t[k] = m;
            k += 1;
        }
        t
    };
    EVERY[(stride.clamp(1, IO_TLB_SEGSIZE).trailing_zeros() as usize).min(7)]
}

/// Bit `p` set iff bits `p .. p + n` of `free` are all set (`1 <= n <= 128`): the
/// run starts that fit `n` slots without leaving the segment.
fn run_starts(free: u128, n: usize) -> u128 {
    let mut r = free;
    let mut len = 1;
    while len < n {
        let s = len.min(n - len);
        r &= r >> s;
        len += s;
    }
    r
}

/// `n` bits from bit `at` (`at + n <= 128`).
fn bits(at: usize, n: usize) -> u128 {
    let ones = if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    };
    ones << at
}

/// The allocator of one pool at guest-physical `base`.
///
/// # Locking
/// A search and a release each take exactly one area lock. Lookups (syncs, and the
/// check an unmap makes before it copies back) take none: they read the owner and
/// record tables, which only change under an area lock while the slots concerned are
/// allocated or being freed. A caller that holds a mapping therefore reads exactly
/// what its map stored; a driver racing an unmap against another unmap or sync of the
/// same mapping (a bug Linux does not catch either) can at worst have its own copy use
/// a stale record — every copy is still bounded by guest memory, and the release
/// itself re-checks under the lock, so a slot is never freed twice.
pub struct SlotAllocator {
    base: u64,
    nslots: usize,
    area_nslots: usize,
    areas: Box<[Padded<Mutex<Area>>]>,
    /// Per slot: the (pool-wide) first slot of the allocation holding it, or [`FREE`].
    owner: Box<[AtomicU32]>,
    /// Per first slot: the record of the allocation starting there.
    recs: Box<[RecCell]>,
    /// Written by every allocation and release of every area (Linux's `total_used`).
    used: Padded<AtomicUsize>,
    /// Read by every allocation, written only when the mark rises.
    high_water: Padded<AtomicUsize>,
    failed: AtomicU64,
    overflows: AtomicU64,
}

impl std::fmt::Debug for SlotAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotAllocator")
            .field("base", &format_args!("{:#x}", self.base))
            .field("nslots", &self.nslots)
            .field("areas", &self.areas.len())
            .field("used", &*self.used)
            .finish_non_exhaustive()
    }
}

/// The alignment constraints of one request, fixed before the search.
struct Placement {
    /// Candidate first slots in every segment (alignment and `min_align_mask`).
    accept: u128,
    /// `nr_slots(tbl_dma_addr)` of `iommu_is_span_boundary`.
    shift: u64,
    /// Slots per device boundary window (a power of two).
    max_slots: u64,
}

impl Placement {
    /// `iommu_is_span_boundary(slot, nslots, shift, max_slots)`.
    fn crosses(&self, slot: usize, nslots: usize) -> bool {
        let offset = self.shift.wrapping_add(slot as u64) & (self.max_slots - 1);
        offset + nslots as u64 > self.max_slots
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
                .map(|_| {
                    Padded(Mutex::new(Area {
                        index: 0,
                        used: 0,
                        free: vec![ALL_FREE; area_nslots / IO_TLB_SEGSIZE],
                    }))
                })
                .collect(),
            owner: (0..nslots).map(|_| AtomicU32::new(FREE)).collect(),
            recs: (0..nslots).map(|_| RecCell::default()).collect(),
            used: Padded(AtomicUsize::new(0)),
            high_water: Padded(AtomicUsize::new(0)),
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
    /// the allocation `make(first slot address, slots)` returns, under the area's
    /// lock. Starts in the calling thread's area and tries every other once.
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
        let place = self.placement(orig, alloc_size, alloc_align_mask, dev);
        let nareas = self.areas.len();
        let start = if nareas == 1 {
            0
        } else {
            thread_area_hint() & (nareas - 1)
        };
        let mut make = Some(make);
        for k in 0..nareas {
            let a = (start + k) & (nareas - 1);
            if let Some(rec) = self.search_area(a, nslots, &place, &mut make) {
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

    /// The alignment rules of `swiotlb_search_pool_area`, as a set of candidate first
    /// slots per segment.
    fn placement(
        &self,
        orig: Option<u64>,
        alloc_size: u64,
        mut alloc_align_mask: u64,
        dev: &DeviceDma,
    ) -> Placement {
        let tbl_dma_addr = self.base & dev.seg_boundary_mask;
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
        // Linux's stride: the acceptable first slots repeat every `stride` slots, one
        // per period (the rules fix the address bits below `stride * 2 KiB`). Masks
        // are below a segment (checked by the callers), so `stride` divides 128 and
        // every segment — which starts at a multiple of 256 KiB from the base — has
        // the same candidates.
        let stride = (nr_slots(alloc_align_mask.max(iotlb_align_mask).saturating_add(1)) as usize)
            .clamp(1, IO_TLB_SEGSIZE);
        let ok = |slot: usize| {
            let tlb_addr = tbl_dma_addr.wrapping_add((slot as u64) << IO_TLB_SHIFT);
            tlb_addr & alloc_align_mask == 0
                && orig.is_none_or(|o| tlb_addr & iotlb_align_mask == o & iotlb_align_mask)
        };
        // The slot address is `tbl_dma_addr + slot * 2 KiB`; the pool base may be only
        // page-aligned, so find the phase by trying one period.
        let accept = (0..stride)
            .find(|&p| ok(p))
            .map_or(0, |p| every(stride) << p);
        Placement {
            accept,
            shift: nr_slots(tbl_dma_addr),
            max_slots: dev.max_slots(),
        }
    }

    /// `swiotlb_search_pool_area`: the first candidate slot at or after the area's
    /// cursor, wrapping around once, whose `nslots` slots are free, in one segment
    /// and inside one device boundary window — Linux's visiting order, a segment's
    /// worth of candidates at a time.
    fn search_area<F: FnOnce(u64, usize) -> Record>(
        &self,
        area_index: usize,
        nslots: usize,
        place: &Placement,
        make: &mut Option<F>,
    ) -> Option<Record> {
        let n = self.area_nslots;
        let slot_base = area_index * n;
        let mut area = lock(&self.areas[area_index]);
        if nslots > n - area.used {
            return None;
        }
        let nsegs = area.free.len();
        let (seg0, off) = (area.index / IO_TLB_SEGSIZE, area.index % IO_TLB_SEGSIZE);
        let below_off = bits(0, off);
        // Segment seg0 from the cursor, the other segments in order, then seg0 below
        // the cursor.
        let visits = std::iter::once((seg0, !below_off))
            .chain((1..nsegs).map(|k| ((seg0 + k) % nsegs, ALL_FREE)))
            .chain((off > 0).then_some((seg0, below_off)));
        let mut found = None;
        'outer: for (seg, window) in visits {
            let mut cand = run_starts(area.free[seg], nslots) & place.accept & window;
            while cand != 0 {
                let p = cand.trailing_zeros() as usize;
                let local = seg * IO_TLB_SEGSIZE + p;
                if !place.crosses(slot_base + local, nslots) {
                    found = Some((seg, p));
                    break 'outer;
                }
                cand &= cand - 1;
            }
        }
        let (seg, p) = found?;
        let local = seg * IO_TLB_SEGSIZE + p;
        area.free[seg] &= !bits(p, nslots);
        let next = local + nslots;
        area.index = if next >= n { 0 } else { next };
        area.used += nslots;
        let used = self.used.fetch_add(nslots, Ordering::Relaxed) + nslots;
        if used > self.high_water.load(Ordering::Relaxed) {
            self.high_water.fetch_max(used, Ordering::Relaxed);
        }
        let make = make
            .take()
            .expect("called once: the search returns after it");
        let first = slot_base + local;
        let rec = make(self.slot_addr(SlotIndex(first)), nslots);
        let cell = &self.recs[first];
        cell.start.store(rec.start, Ordering::Relaxed);
        cell.orig.store(rec.orig, Ordering::Relaxed);
        cell.alloc_end.store(rec.alloc_end, Ordering::Relaxed);
        cell.size_kind.store(
            ((rec.size as u64) << 1) | u64::from(rec.kind == Kind::Coherent),
            Ordering::Relaxed,
        );
        // `first` < 2^31: checked in `new`.
        for o in &self.owner[first..first + nslots] {
            o.store(first as u32, Ordering::Release);
        }
        Some(rec)
    }

    /// The record at first slot `first`.
    fn record(&self, first: usize) -> Record {
        let cell = &self.recs[first];
        let start = cell.start.load(Ordering::Relaxed);
        let alloc_end = cell.alloc_end.load(Ordering::Relaxed);
        let size_kind = cell.size_kind.load(Ordering::Relaxed);
        let first_addr = self.slot_addr(SlotIndex(first));
        Record {
            kind: if size_kind & 1 == 1 {
                Kind::Coherent
            } else {
                Kind::Streaming
            },
            start,
            orig: cell.orig.load(Ordering::Relaxed),
            size: usize::try_from(size_kind >> 1).unwrap_or(usize::MAX),
            alloc_end,
            first: SlotIndex(first),
            // The allocation was nr_slots(alloc_end - first_addr) slots, at most a
            // segment (a stale record under a racing bug is clamped to one).
            nslots: (nr_slots(alloc_end.saturating_sub(first_addr)) as usize)
                .clamp(1, IO_TLB_SEGSIZE),
        }
    }

    /// The live allocation holding the slot at guest-physical `addr`, if any, read
    /// without a lock (see the type's "Locking").
    pub(crate) fn lookup(&self, addr: u64) -> Option<Record> {
        let slot = self.slot_of(addr)?;
        let first = self.owner[slot].load(Ordering::Acquire);
        if first == FREE {
            return None;
        }
        Some(self.record(first as usize))
    }

    /// The area of pool-wide slot `slot`, and the slot's index in it.
    fn area_of(&self, slot: usize) -> (usize, usize) {
        if self.areas.len() == 1 {
            (0, slot)
        } else {
            (slot / self.area_nslots, slot % self.area_nslots)
        }
    }

    /// The slot holding guest-physical `addr`, if it is in the pool.
    pub fn slot_of(&self, addr: u64) -> Option<usize> {
        let off = addr.checked_sub(self.base)?;
        let slot = usize::try_from(off >> IO_TLB_SHIFT).ok()?;
        (slot < self.nslots).then_some(slot)
    }

    /// `swiotlb_release_slots`: frees the allocation of `kind` handed out at `start`
    /// (re-checked under the area lock), which merges it with its free neighbours.
    /// Returns its record.
    ///
    /// Placement differs from Linux in one respect: Linux's cursor only moves
    /// forward, so a map after an unmap lands on slots no one touched lately; here a
    /// release before the cursor pulls the cursor back to it, so the next search
    /// starts at the lowest recently freed run and reuses slots that are still in
    /// the CPU's cache. Which free slots a mapping gets is not part of swiotlb's
    /// contract (it already depends on the CPU and on other mappings); every
    /// placement rule still holds.
    pub(crate) fn release(&self, start: u64, kind: Kind) -> Option<Record> {
        let slot = self.slot_of(start)?;
        let (a, local) = self.area_of(slot);
        let mut area = lock(&self.areas[a]);
        let first = self.owner[slot].load(Ordering::Relaxed);
        if first == FREE {
            return None;
        }
        let first = first as usize;
        let rec = self.record(first);
        if rec.start != start || rec.kind != kind {
            return None;
        }
        let nslots = rec.nslots;
        for o in &self.owner[first..first + nslots] {
            o.store(FREE, Ordering::Relaxed);
        }
        let local_first = local - (slot - first);
        let (seg, p) = (local_first / IO_TLB_SEGSIZE, local_first % IO_TLB_SEGSIZE);
        area.free[seg] |= bits(p, nslots);
        area.index = area.index.min(local_first);
        area.used -= nslots;
        self.used.fetch_sub(nslots, Ordering::Relaxed);
        Some(rec)
    }

    /// Which slots are free, in order (for tests and models; takes every area lock
    /// in turn).
    pub fn free_map(&self) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.nslots);
        for a in self.areas.iter() {
            for seg in &lock(a).free {
                out.extend((0..IO_TLB_SEGSIZE).map(|j| seg >> j & 1 == 1));
            }
        }
        out
    }

    /// Linux's `slots[i].list` for slot `i`: free slots from `i` up to the first used
    /// one or the end of its segment (0 if `i` is used).
    pub fn free_run(&self, i: SlotIndex) -> usize {
        let (a, local) = (i.0 / self.area_nslots, i.0 % self.area_nslots);
        let Some(area) = self.areas.get(a) else {
            return 0;
        };
        let seg = lock(area).free[local / IO_TLB_SEGSIZE];
        (!(seg >> (local % IO_TLB_SEGSIZE))).trailing_zeros() as usize
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

    fn lists(s: &SlotAllocator) -> Vec<usize> {
        (0..s.total_slots())
            .map(|i| s.free_run(SlotIndex(i)))
            .collect()
    }

    #[test]
    fn list_counts_start_at_128_down_to_1_per_segment() {
        let s = SlotAllocator::new(0x10_0000, 2, 1).unwrap();
        let l = lists(&s);
        assert_eq!((l[0], l[127], l[128], l[255]), (128, 1, 128, 1));
    }

    #[test]
    fn list_counts_stop_at_a_used_slot() {
        let s = SlotAllocator::new(0x10_0000, 1, 1).unwrap();
        let d = DeviceDma::default();
        let x = s.alloc(Some(0), 3 * 2048, 0, &d, rec(Kind::Streaming));
        let x = x.unwrap();
        assert_eq!(x.start, 0x10_0000, "page-aligned at slot 0");
        let l = lists(&s);
        assert_eq!(&l[..5], &[0, 0, 0, 125, 124]);
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
        let expect: Vec<usize> = (1..=128).rev().collect();
        assert_eq!(lists(&s), expect);
        assert_eq!(s.stats().used_slots, 0);
    }

    #[test]
    fn release_pulls_the_cursor_back_so_freed_slots_are_reused_first() {
        let s = SlotAllocator::new(0x10_0000, 1, 1).unwrap();
        let d = DeviceDma::default();
        let x = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        let y = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        s.release(x.start, Kind::Streaming).unwrap();
        let z = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        assert_eq!(
            z.start, x.start,
            "the freed slot, not the next untouched one"
        );
        let w = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        assert_eq!(w.start, y.start + 2048, "then on past the live ones");
    }

    #[test]
    fn search_wraps_from_the_cursor_and_visits_the_segment_below_it_last() {
        let s = SlotAllocator::new(0x10_0000, 2, 1).unwrap();
        let d = DeviceDma::default();
        let a = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        // Fill the rest of segment 0 and all of segment 1 in one-segment pieces.
        let b = s
            .alloc(Some(0), 127 * 2048, 0x7ff, &d, rec(Kind::Streaming))
            .unwrap();
        let c = s
            .alloc(Some(0), 128 * 2048, 0x7ff, &d, rec(Kind::Streaming))
            .unwrap();
        assert_eq!((b.start, c.start), (0x10_0800, 0x14_0000));
        s.release(a.start, Kind::Streaming).unwrap();
        let e = s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)).unwrap();
        assert_eq!(e.start, a.start);
        assert!(matches!(
            s.alloc(Some(0), 2048, 0, &d, rec(Kind::Streaming)),
            Err(SlotError::Full {
                total: 256,
                used: 256,
                ..
            })
        ));
    }

    #[test]
    fn run_starts_and_every_are_exact() {
        assert_eq!(run_starts(0b1110111, 3), 0b0010001);
        assert_eq!(run_starts(u128::MAX, 128), 1);
        assert_eq!(run_starts(u128::MAX, 127), 0b11);
        assert_eq!(every(1), u128::MAX);
        assert_eq!(every(2) & 0xff, 0x55);
        assert_eq!(every(64), 1 | (1 << 64));
        assert_eq!(every(128), 1);
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
