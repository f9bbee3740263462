//! [`BouncePool`]: the slot allocator placed at a guest-physical range of the guest's
//! memory, with swiotlb's streaming map / sync / unmap copies and coherent allocations
//! (Linux `swiotlb_tbl_map_single`, `swiotlb_bounce`, `__swiotlb_sync_single_for_*`,
//! `__swiotlb_tbl_unmap_single`, `swiotlb_alloc`, all in `kernel/dma/swiotlb.c`).
//!
//! Guest memory is any `vm_memory::GuestMemory`: the pool is one range inside it, the
//! original buffers are elsewhere in it, and every copy goes through it. The pool does
//! not own that memory; each call is given it, so the same pool serves a fake guest
//! driver in tests and whatever guest-side model uses it. [`crate::dma::GuestDma`] is
//! the driver-facing wrapper.
//!
//! Every call fails at once rather than wait: a full pool is an error the caller must
//! handle like `dma_mapping_error()` ("The swiotlb map/unmap/sync APIs must operate
//! without blocking", core-api/swiotlb.rst).

use crate::slots::{nr_slots, Kind, Record, SlotAllocator, SlotError, SlotIndex};
use crate::{
    Attrs, DeviceDma, DmaAddr, DmaDirection, Gpa, PoolStats, IO_TLB_SIZE, MAX_MAPPING_SIZE,
    PAGE_SIZE, SEGMENT_BYTES,
};
use std::ops::Range;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Why a pool could not be built or a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The allocator refused (full, too large, bad masks or geometry).
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// The pool's base is not page-aligned.
    #[error("pool base {base:#x} is not aligned to {PAGE_SIZE:#x}")]
    Unaligned {
        /// The base asked for.
        base: u64,
    },
    /// The pool's size is not a whole number of 256 KiB segments.
    #[error("pool size {size:#x} is not a whole number of {SEGMENT_BYTES:#x}-byte segments")]
    NotSegments {
        /// The size asked for.
        size: u64,
    },
    /// The pool's range ends past 2^64.
    #[error("pool at {base:#x} of {size:#x} bytes wraps past 2^64")]
    Wraps {
        /// The base asked for.
        base: u64,
        /// The size asked for.
        size: u64,
    },
    /// The pool's range is not all guest memory.
    #[error("pool at {base:#x} of {size:#x} bytes is not all in guest memory")]
    PoolNotInMemory {
        /// The base asked for.
        base: u64,
        /// The size asked for.
        size: u64,
    },
    /// The original buffer is not guest memory (or wraps past 2^64).
    #[error("buffer at {orig} of {size} bytes is not in guest memory")]
    NotInMemory {
        /// The buffer.
        orig: Gpa,
        /// Its length.
        size: usize,
    },
    /// The original buffer overlaps the pool itself.
    #[error("buffer at {orig} of {size} bytes overlaps the bounce pool")]
    InPool {
        /// The buffer.
        orig: Gpa,
        /// Its length.
        size: usize,
    },
    /// No streaming mapping (or, for `free_coherent`, no coherent allocation) was
    /// handed out at this address.
    #[error("nothing is mapped at {addr}")]
    NotMapped {
        /// The address given.
        addr: DmaAddr,
    },
    /// A copy between the pool and the original buffer failed.
    #[error("bounce copy of {len} bytes from {from:#x} to {to:#x} failed: {reason}")]
    Copy {
        /// Source guest-physical address.
        from: u64,
        /// Destination guest-physical address.
        to: u64,
        /// Bytes to copy.
        len: usize,
        /// What vm-memory said.
        reason: String,
    },
}

/// Where a pool sits and how it is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Guest-physical base, page-aligned.
    pub base: Gpa,
    /// Bytes, a whole number of 256 KiB segments.
    pub size: u64,
    /// Areas, each with its own lock: a power of two dividing the segment count.
    /// (Linux uses one per CPU for the default pool, one for a restricted pool.)
    pub areas: usize,
}

/// A restricted DMA pool in guest memory.
#[derive(Debug)]
pub struct BouncePool {
    base: u64,
    size: u64,
    slots: SlotAllocator,
}

/// Copies `len` bytes from `from` to `to` within `mem`, region by region.
fn copy_within<M: GuestMemory>(mem: &M, from: u64, to: u64, len: usize) -> Result<(), PoolError> {
    if len == 0 {
        return Ok(());
    }
    let err = |reason: String| PoolError::Copy {
        from,
        to,
        len,
        reason,
    };
    let mut src = mem
        .get_slices(GuestAddress(from), len, Permissions::Read)
        .map_err(|e| err(e.to_string()))?;
    let mut dst = mem
        .get_slices(GuestAddress(to), len, Permissions::Write)
        .map_err(|e| err(e.to_string()))?;
    let (mut s, mut d) = (None, None);
    let mut done = 0;
    while done < len {
        let sv = match s.take() {
            Some(v) => v,
            None => match src.next() {
                Some(r) => r.map_err(|e| err(e.to_string()))?,
                None => break,
            },
        };
        let dv = match d.take() {
            Some(v) => v,
            None => match dst.next() {
                Some(r) => r.map_err(|e| err(e.to_string()))?,
                None => break,
            },
        };
        let n = sv.len().min(dv.len());
        // Copies min(len) bytes with one memcpy; the ranges never overlap because
        // mapping refuses originals that overlap the pool.
        sv.copy_to_volatile_slice(dv.clone());
        done += n;
        s = (n < sv.len())
            .then(|| sv.offset(n))
            .transpose()
            .map_err(|e| err(e.to_string()))?;
        d = (n < dv.len())
            .then(|| dv.offset(n))
            .transpose()
            .map_err(|e| err(e.to_string()))?;
    }
    if done == len {
        Ok(())
    } else {
        Err(err(format!("only {done} bytes are guest memory")))
    }
}

impl BouncePool {
    /// A pool at `config.base` in `mem`.
    ///
    /// # Errors
    /// [`PoolError::Unaligned`], [`PoolError::NotSegments`], [`PoolError::Wraps`],
    /// [`PoolError::PoolNotInMemory`], or the allocator's [`SlotError`] for a bad area
    /// count.
    pub fn new<M: GuestMemory>(mem: &M, config: &PoolConfig) -> Result<Self, PoolError> {
        let (base, size) = (config.base.0, config.size);
        if !base.is_multiple_of(PAGE_SIZE) {
            return Err(PoolError::Unaligned { base });
        }
        if size == 0 || !size.is_multiple_of(SEGMENT_BYTES) {
            return Err(PoolError::NotSegments { size });
        }
        // The last byte must be addressable; a pool ending exactly at 2^64 is allowed.
        if base.checked_add(size - 1).is_none() {
            return Err(PoolError::Wraps { base, size });
        }
        let ok = usize::try_from(size)
            .is_ok_and(|len| mem.check_range(GuestAddress(base), len, Permissions::ReadWrite));
        if !ok {
            return Err(PoolError::PoolNotInMemory { base, size });
        }
        let segments = usize::try_from(size / SEGMENT_BYTES).unwrap_or(usize::MAX);
        Ok(Self {
            base,
            size,
            slots: SlotAllocator::new(base, segments, config.areas)?,
        })
    }

    /// The pool's guest-physical range.
    pub fn range(&self) -> Range<u64> {
        self.base..self.base + self.size
    }

    /// The pool's base.
    pub fn base(&self) -> Gpa {
        Gpa(self.base)
    }

    /// The pool's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The allocator (geometry, free map).
    pub fn slots(&self) -> &SlotAllocator {
        &self.slots
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        self.slots.stats()
    }

    /// Sets the high-water mark back to the slots in use now.
    pub fn reset_high_water(&self) {
        self.slots.reset_high_water();
    }

    /// The slots the allocation holding `addr` occupies, padding included.
    pub fn slots_of(&self, addr: DmaAddr) -> Option<Range<SlotIndex>> {
        let r = self.slots.lookup(addr.0)?;
        Some(r.first..SlotIndex(r.first.0 + r.nslots))
    }

    fn overlaps_pool(&self, start: u64, end: u64) -> bool {
        start < self.base + self.size && self.base < end
    }

    /// [`Self::map_aligned`] with no `alloc_align_mask`, as every streaming mapping
    /// (`dma_map_single`, `dma_map_sg`) asks.
    ///
    /// # Errors
    /// As [`Self::map_aligned`].
    pub fn map<M: GuestMemory>(
        &self,
        mem: &M,
        dev: &DeviceDma,
        orig: Gpa,
        size: usize,
        dir: DmaDirection,
    ) -> Result<DmaAddr, PoolError> {
        self.map_aligned(mem, dev, orig, size, dir, 0)
    }

    /// `swiotlb_tbl_map_single`: bounces `size` bytes at `orig` into the pool and
    /// returns the address the device must use. The bounce address keeps
    /// `orig & min_align_mask` (bits above 2 KiB by slot choice, below by a padding
    /// offset); with no masks, a buffer of a page or more is page-aligned. The
    /// original's contents are always copied in, whatever `dir` — also for
    /// `FromDevice`, so a device that writes only part of the buffer cannot make the
    /// unmap clobber the rest with a previous user's data. Padding is not initialised.
    ///
    /// # Errors
    /// [`PoolError::NotInMemory`] or [`PoolError::InPool`] for a bad original;
    /// [`SlotError::Empty`] for size 0; [`SlotError::BadMask`] for an
    /// `alloc_align_mask` not 2^k - 1; [`SlotError::TooLarge`] past one segment;
    /// [`SlotError::Full`] (size, total and used slots) when no run fits. Nothing
    /// changes on an error.
    pub fn map_aligned<M: GuestMemory>(
        &self,
        mem: &M,
        dev: &DeviceDma,
        orig: Gpa,
        size: usize,
        _dir: DmaDirection,
        alloc_align_mask: u64,
    ) -> Result<DmaAddr, PoolError> {
        if size == 0 {
            return Err(SlotError::Empty.into());
        }
        if alloc_align_mask & alloc_align_mask.wrapping_add(1) != 0
            || alloc_align_mask >= SEGMENT_BYTES
        {
            return Err(SlotError::BadMask {
                what: "alloc_align_mask",
                mask: alloc_align_mask,
            }
            .into());
        }
        let end = orig
            .0
            .checked_add(size as u64)
            .ok_or(PoolError::NotInMemory { orig, size })?;
        if self.overlaps_pool(orig.0, end) {
            return Err(PoolError::InPool { orig, size });
        }
        if !mem.check_range(GuestAddress(orig.0), size, Permissions::Read) {
            return Err(PoolError::NotInMemory { orig, size });
        }
        // swiotlb_align_offset(dev, alloc_align_mask, orig)
        let offset = orig.0 & dev.min_align_mask() & (alloc_align_mask | (IO_TLB_SIZE - 1));
        // ALIGN(mapping_size + offset, alloc_align_mask + 1); size < 2^63 on 64-bit.
        let alloc_size = (size as u64 + offset).next_multiple_of(alloc_align_mask + 1);
        let pad_slots = offset / IO_TLB_SIZE;
        let in_slot = offset % IO_TLB_SIZE;
        let rec = self.slots.alloc(
            Some(orig.0),
            alloc_size,
            alloc_align_mask,
            dev,
            |first_addr, nslots| {
                let start = first_addr + pad_slots * IO_TLB_SIZE + in_slot;
                Record {
                    kind: Kind::Streaming,
                    start,
                    orig: orig.0,
                    size,
                    alloc_end: first_addr + alloc_size,
                    first: SlotIndex(
                        ((first_addr - self.base) / IO_TLB_SIZE)
                            .try_into()
                            .unwrap_or(usize::MAX),
                    ),
                    nslots,
                }
            },
        )?;
        debug_assert_eq!(nr_slots(alloc_size) as usize, rec.nslots);
        if let Err(e) = copy_within(mem, orig.0, rec.start, size) {
            self.slots.release(rec.start, Kind::Streaming);
            return Err(e);
        }
        Ok(DmaAddr(rec.start))
    }

    /// `swiotlb_bounce`: copies `size` bytes between the bounce buffer at `addr` (any
    /// address inside a mapping: partial syncs) and the matching original bytes, cut
    /// at the end of the allocation ("Buffer overflow detected", counted in
    /// [`PoolStats::overflows`]).
    fn bounce<M: GuestMemory>(
        &self,
        mem: &M,
        addr: DmaAddr,
        size: usize,
        to_device: bool,
    ) -> Result<(), PoolError> {
        let rec = self
            .slots
            .lookup(addr.0)
            .filter(|r| r.kind == Kind::Streaming && addr.0 >= r.start)
            .ok_or(PoolError::NotMapped { addr })?;
        self.bounce_in(mem, &rec, addr, size, to_device)
    }

    /// The copy of [`Self::bounce`] within the streaming mapping `rec`, which holds
    /// `addr` at or after its start.
    fn bounce_in<M: GuestMemory>(
        &self,
        mem: &M,
        rec: &Record,
        addr: DmaAddr,
        size: usize,
        to_device: bool,
    ) -> Result<(), PoolError> {
        let orig = rec.orig + (addr.0 - rec.start);
        let room = usize::try_from(rec.alloc_end.saturating_sub(addr.0)).unwrap_or(usize::MAX);
        let len = if size > room {
            self.slots.note_overflow();
            room
        } else {
            size
        };
        if to_device {
            copy_within(mem, orig, addr.0, len)
        } else {
            copy_within(mem, addr.0, orig, len)
        }
    }

    /// `__swiotlb_sync_single_for_device`: for `ToDevice` and `Bidirectional`, copies
    /// the original's `size` bytes matching `addr` into the pool; for `FromDevice`,
    /// nothing.
    ///
    /// # Errors
    /// [`PoolError::NotMapped`] if `addr` is in no streaming mapping;
    /// [`PoolError::Copy`] if the original is no longer guest memory.
    pub fn sync_for_device<M: GuestMemory>(
        &self,
        mem: &M,
        addr: DmaAddr,
        size: usize,
        dir: DmaDirection,
    ) -> Result<(), PoolError> {
        if dir.to_device() {
            self.bounce(mem, addr, size, true)
        } else {
            Ok(())
        }
    }

    /// `__swiotlb_sync_single_for_cpu`: for `FromDevice` and `Bidirectional`, copies
    /// `size` bytes at `addr` back to the original; for `ToDevice`, nothing.
    ///
    /// # Errors
    /// As [`Self::sync_for_device`].
    pub fn sync_for_cpu<M: GuestMemory>(
        &self,
        mem: &M,
        addr: DmaAddr,
        size: usize,
        dir: DmaDirection,
    ) -> Result<(), PoolError> {
        if dir.from_device() {
            self.bounce(mem, addr, size, false)
        } else {
            Ok(())
        }
    }

    /// `__swiotlb_tbl_unmap_single`: unless `attrs.skip_cpu_sync`, copies a
    /// `FromDevice` or `Bidirectional` buffer back to the original; then frees the
    /// slots, merging them with free neighbours.
    ///
    /// # Errors
    /// [`PoolError::NotMapped`] unless `addr` is exactly what a live `map` returned
    /// (nothing is freed then); [`PoolError::Copy`] if the copy back failed (the
    /// slots are freed all the same).
    pub fn unmap<M: GuestMemory>(
        &self,
        mem: &M,
        addr: DmaAddr,
        size: usize,
        dir: DmaDirection,
        attrs: Attrs,
    ) -> Result<(), PoolError> {
        // One lookup (no lock) finds the record for the copy back; the release takes
        // the area lock once and re-checks the record, so a racing double unmap frees
        // nothing twice.
        let rec = self
            .slots
            .lookup(addr.0)
            .filter(|r| r.kind == Kind::Streaming && r.start == addr.0)
            .ok_or(PoolError::NotMapped { addr })?;
        let copied = if !attrs.skip_cpu_sync && dir.from_device() {
            self.bounce_in(mem, &rec, addr, size, false)
        } else {
            Ok(())
        };
        self.slots
            .release(addr.0, Kind::Streaming)
            .ok_or(PoolError::NotMapped { addr })?;
        copied
    }

    /// `swiotlb_alloc`: a coherent buffer of `size` bytes from the pool (a restricted
    /// pool serves `dma_alloc_coherent`), aligned to its power-of-two page order,
    /// zeroed (as `dma_alloc_coherent` returns it), counted in the used slots.
    ///
    /// # Errors
    /// [`SlotError::Empty`], [`SlotError::TooLarge`] past 256 KiB,
    /// [`SlotError::Full`]; [`PoolError::Copy`] if zeroing failed.
    pub fn alloc_coherent<M: GuestMemory>(
        &self,
        mem: &M,
        size: usize,
    ) -> Result<DmaAddr, PoolError> {
        if size == 0 {
            return Err(SlotError::Empty.into());
        }
        if size > MAX_MAPPING_SIZE {
            self.slots.note_failure();
            return Err(SlotError::TooLarge {
                size: size as u64,
                max: MAX_MAPPING_SIZE as u64,
            }
            .into());
        }
        // (1 << (get_order(size) + PAGE_SHIFT)) - 1
        let align = (size as u64)
            .next_multiple_of(PAGE_SIZE)
            .next_power_of_two()
            - 1;
        let dev = DeviceDma::default();
        let rec = self
            .slots
            .alloc(None, size as u64, align, &dev, |first_addr, nslots| {
                Record {
                    kind: Kind::Coherent,
                    start: first_addr,
                    orig: 0,
                    size,
                    alloc_end: first_addr + size as u64,
                    first: SlotIndex(
                        ((first_addr - self.base) / IO_TLB_SIZE)
                            .try_into()
                            .unwrap_or(usize::MAX),
                    ),
                    nslots,
                }
            })?;
        // The search returned slots with `(addr & align) == 0`, and `align` covers a
        // page: the buffer is page-aligned (Linux re-checks because its pool base may
        // not be; ours is, by construction).
        if let Err(e) = mem.write_slice(&vec![0u8; size], GuestAddress(rec.start)) {
            self.slots.release(rec.start, Kind::Coherent);
            return Err(PoolError::Copy {
                from: 0,
                to: rec.start,
                len: size,
                reason: e.to_string(),
            });
        }
        Ok(DmaAddr(rec.start))
    }

    /// `swiotlb_free`: gives back a coherent buffer.
    ///
    /// # Errors
    /// [`PoolError::NotMapped`] unless `addr` is a live coherent allocation.
    pub fn free_coherent(&self, addr: DmaAddr) -> Result<(), PoolError> {
        self.slots
            .release(addr.0, Kind::Coherent)
            .map(|_| ())
            .ok_or(PoolError::NotMapped { addr })
    }
}
