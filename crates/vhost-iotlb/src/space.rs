//! The back-end's view of guest memory: an [`AddressSpace`] that holds only *windows*,
//! and [`GuestView`], the `vm_memory::GuestMemory` a device reads and writes through.
//!
//! With `VIRTIO_F_IOMMU_PLATFORM` negotiated ([`Mode::Iotlb`]) a window is one IOTLB
//! entry: `IOTLB_MSG` update maps exactly that piece of the front-end's memory file
//! (whole pages around it), invalidate unmaps it, and an address no window covers is a
//! miss, sent to the front-end on the back-end request channel; the thread that needs
//! the translation waits for the reply, while the thread reading the main socket
//! receives the update. The memory table's file descriptors are kept, never mapped
//! whole. Without it ([`Mode::Plain`]) the windows are the memory table's regions by
//! guest physical address, mapped whole, as any vhost-user back-end does.
//!
//! Invalidation is strict: when [`AddressSpace::invalidate`] returns, no guest page of
//! the range is mapped in this process any more. It waits for the device's batch
//! (`virtio_contract`'s "The batch"; the worker calls the space's
//! [`Batch`](virtio_contract::Batch) hooks around each `process_queue`): a window the open batch translated stays
//! mapped, as it was, until [`Batch::end`](virtio_contract::Batch::end), and only then does `invalidate` return (and
//! the session acknowledge the INVALIDATE). Meanwhile misses fail at once, since the
//! front-end answers none while it waits for that acknowledgement, and the wait is
//! bounded by [`Limits::miss_timeout`]. A window a [`GuestView`] still pins outside a
//! batch (or past that bound) is not unmapped under it: its guest pages are replaced in
//! place by anonymous pages ([`Mapping::revoke`]), so a late access lands in scratch and
//! the range is unmapped when the pin drops.
//!
//! Exposure ([`Exposure`]) counts the guest bytes mapped now and at the peak.

use crate::channel::{MissChannel, MissError};
use crate::mmap::{Mapping, MmapError};
use crate::push_ring::Consumer;
use crate::wire::{iotlb, MemoryRegion};
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use vm_memory::Permissions;

/// What the front-end may make this address space hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Windows held at once. An update past it evicts the oldest window (an IOTLB is a
    /// cache: a dropped entry only costs a later miss), so the front-end cannot make
    /// the back-end hold unbounded mappings (each one a kernel VMA; Linux allows 65530
    /// per process by default).
    pub max_windows: usize,
    /// How long a miss waits for the front-end's reply before the access fails, and the
    /// longest an invalidate waits for the batch using its window.
    pub miss_timeout: Duration,
    /// Misses one access may raise. QEMU answers a miss with one IOMMU page (4 KiB with
    /// its virtio-iommu), so a 1 MiB buffer costs 256; a chain's buffers are bounded by
    /// the device, this bounds a front-end that answers without covering the address.
    pub max_misses_per_access: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_windows: 16384,
            miss_timeout: Duration::from_secs(5),
            max_misses_per_access: 4096,
        }
    }
}

/// What the address space translates with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Features not negotiated yet: nothing is mapped, every access fails.
    Unset,
    /// No IOMMU: guest physical addresses, the memory table's regions mapped whole.
    Plain,
    /// `VIRTIO_F_IOMMU_PLATFORM`: IOVAs, only the windows of IOTLB updates.
    Iotlb,
}

/// Guest memory exposure of the back-end, and the IOTLB traffic behind it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// Guest bytes mapped in this process now (whole pages).
    pub mapped_bytes: u64,
    /// Most guest bytes mapped at one moment.
    pub peak_mapped_bytes: u64,
    /// Windows held now.
    pub windows: u64,
    /// Most windows held at one moment.
    pub peak_windows: u64,
    /// Guest RAM the memory table describes (the denominator of the exposure share).
    pub guest_ram_bytes: u64,
    /// IOTLB updates applied (from messages and from the push ring).
    pub updates: u64,
    /// Of those, the ones read from the push ring ([`crate::push_ring`]).
    pub ring_updates: u64,
    /// Push ring entries refused (invalid, or outside the memory table).
    pub ring_refused: u64,
    /// IOTLB invalidates applied (counted in `invalidates`) that came through the ring.
    pub ring_invalidates: u64,
    /// IOTLB invalidates applied.
    pub invalidates: u64,
    /// Windows dropped to stay within [`Limits::max_windows`].
    pub evictions: u64,
    /// Windows invalidated while a [`GuestView`] still pinned them (revoked in place).
    pub revoked_in_use: u64,
    /// Invalidates that overlapped a window of the open batch, so took effect (and were
    /// acknowledged) only when the batch ended.
    pub deferred_invalidates: u64,
    /// Misses sent to the front-end.
    pub misses: u64,
    /// Misses that did not produce a covering window (refused, timed out, cancelled).
    pub miss_failures: u64,
    /// Access failures reported to the front-end.
    pub access_fails: u64,
}

/// Why the front-end's memory table or IOTLB message was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// A region that is empty or whose addresses or file range overflow.
    #[error("memory region {index} ({size:#x} bytes at user address {uaddr:#x}, file offset {offset:#x}) is empty or overflows")]
    RegionRange {
        /// Position in the table.
        index: usize,
        /// Its size.
        size: u64,
        /// Its user address.
        uaddr: u64,
        /// Its file offset.
        offset: u64,
    },
    /// Two regions overlap in user or guest physical addresses.
    #[error("memory regions {a} and {b} overlap")]
    RegionOverlap {
        /// One region.
        a: usize,
        /// The other.
        b: usize,
    },
    /// The region reaches past the end of its file (an access there would be SIGBUS).
    #[error("memory region {index} needs {needed:#x} bytes of its file, which has {len:#x}")]
    RegionFile {
        /// Position in the table.
        index: usize,
        /// File bytes the region needs.
        needed: u64,
        /// File size.
        len: u64,
    },
    /// The region's file cannot be examined.
    #[error("cannot examine the file of memory region {index}: {source}")]
    RegionStat {
        /// Position in the table.
        index: usize,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// An IOTLB message while `VIRTIO_F_IOMMU_PLATFORM` is not negotiated.
    #[error("IOTLB message while VIRTIO_F_IOMMU_PLATFORM is not negotiated")]
    NotIotlb,
    /// An IOTLB range that is empty or overflows.
    #[error("IOTLB range of {size:#x} bytes at {iova:#x} is empty or overflows")]
    IotlbRange {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// An update whose user range lies in no single memory region.
    #[error(
        "IOTLB update of {size:#x} bytes at user address {uaddr:#x} is outside the memory table"
    )]
    OutsideRegions {
        /// User address.
        uaddr: u64,
        /// Bytes.
        size: u64,
    },
    /// Mapping the window failed.
    #[error(transparent)]
    Mmap(#[from] MmapError),
}

/// Why an access could not be translated. The device sees it as a guest memory error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Fault {
    /// No window covers the address and no miss can be raised (plain mode, no request
    /// channel, or too many misses).
    #[error("no window covers {addr:#x}")]
    Unmapped {
        /// First uncovered address.
        addr: u64,
    },
    /// The front-end did not map the address after a miss.
    #[error("the front-end did not map {addr:#x} after a miss: {reason}")]
    Refused {
        /// First uncovered address.
        addr: u64,
        /// The miss's outcome.
        reason: String,
    },
    /// A window covers the address without the access asked for.
    #[error("the window at {addr:#x} does not allow {access:?}")]
    Denied {
        /// Address.
        addr: u64,
        /// Access asked for.
        access: Permissions,
    },
    /// The range wraps around the end of the address space.
    #[error("range of {len} bytes at {addr:#x} overflows")]
    Overflow {
        /// First address.
        addr: u64,
        /// Bytes.
        len: usize,
    },
}

/// Outcome of one lookup.
enum Lookup {
    /// Host address and bytes available from there.
    Hit(*mut u8, u64),
    /// A window covers the address without the access.
    Denied,
    /// No window covers the address.
    Miss,
}

/// One memory-table region: kept as its file, never mapped in [`Mode::Iotlb`].
#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
    /// Shared, so an UPDATE maps it outside the table's lock without a `dup`.
    file: Arc<File>,
}

/// A mapped window: addresses `[start, start + len)` (IOVAs or guest physical).
#[derive(Debug)]
pub struct Window {
    start: u64,
    len: u64,
    /// The front-end address the UPDATE named.
    uaddr: u64,
    perm: Permissions,
    map: Mapping,
    seq: u64,
    /// The last batch that translated through it (0: none).
    batch: AtomicU64,
}

impl Window {
    /// First address covered.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the window covers nothing (never true: empty windows are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Host address of the whole-page mapping behind it.
    pub fn host_base(&self) -> usize {
        self.map.base()
    }
    /// Bytes of the whole-page mapping behind it.
    pub fn mapped_len(&self) -> u64 {
        self.map.mapped_len()
    }
}

#[derive(Debug)]
struct Table {
    mode: Mode,
    regions: Vec<Region>,
    /// Windows by first address; never overlapping.
    windows: BTreeMap<u64, Arc<Window>>,
    /// Insertion order (sequence number → first address), for eviction.
    fifo: BTreeMap<u64, u64>,
    next_seq: u64,
    stats: Exposure,
    /// The batch the device is in, if any (numbered from 1).
    batch: Option<u64>,
    last_batch: u64,
    /// Windows invalidated during the open batch that it translated: left in place
    /// until it ends.
    deferred: Vec<Arc<Window>>,
}

/// The windows of guest memory this back-end holds. Shared by the thread reading the
/// main socket (updates, invalidates, memory table) and the device threads (lookups,
/// misses).
#[derive(Debug)]
pub struct AddressSpace {
    table: RwLock<Table>,
    /// The last batch that ended, and its signal (for invalidates waiting on it).
    ended: Mutex<u64>,
    batch_ended: Condvar,
    channel: Mutex<Option<MissChannel>>,
    /// The front-end's push ring, if it gave one. Read by whichever thread needs it
    /// (a miss, an IOTLB message), one at a time: the pushes it reads are applied under
    /// this lock, so a thread that then finds the ring empty knows they are in place.
    pushes: Mutex<Option<Consumer>>,
    cancel: AtomicBool,
    limits: Limits,
    misses: AtomicU64,
    miss_failures: AtomicU64,
    access_fails: AtomicU64,
}

fn perm_of(p: u8) -> Permissions {
    match p & iotlb::PERM_RW {
        iotlb::PERM_RO => Permissions::Read,
        iotlb::PERM_WO => Permissions::Write,
        iotlb::PERM_RW => Permissions::ReadWrite,
        _ => Permissions::No,
    }
}

fn wire_perm(p: Permissions) -> u8 {
    match p {
        Permissions::No => iotlb::PERM_NONE,
        Permissions::Read => iotlb::PERM_RO,
        Permissions::Write => iotlb::PERM_WO,
        Permissions::ReadWrite => iotlb::PERM_RW,
    }
}

/// Inclusive last address of `[start, start + len)`, `None` if empty or overflowing.
/// Ranges ending exactly at 2^64 are legal.
fn last(start: u64, len: u64) -> Option<u64> {
    len.checked_sub(1).and_then(|l| start.checked_add(l))
}

impl Table {
    fn find(&self, addr: u64) -> Option<&Arc<Window>> {
        let (_, w) = self.windows.range(..=addr).next_back()?;
        (addr - w.start < w.len).then_some(w)
    }

    /// Removes every window overlapping `[first, last]`.
    fn take_overlapping(&mut self, first: u64, last: u64) -> Vec<Arc<Window>> {
        let mut starts: Vec<u64> = Vec::new();
        if let Some((&s, w)) = self.windows.range(..first).next_back() {
            if s.saturating_add(w.len - 1) >= first {
                starts.push(s);
            }
        }
        starts.extend(
            self.windows
                .range((Bound::Included(first), Bound::Included(last)))
                .map(|(&s, _)| s),
        );
        starts
            .into_iter()
            .filter_map(|s| self.windows.remove(&s))
            .inspect(|w| {
                self.fifo.remove(&w.seq);
            })
            .collect()
    }

    /// Drops a window taken out of the table: unmapped now if nobody uses it,
    /// revoked in place otherwise. Either way its guest pages leave this process now.
    fn retire(&mut self, w: Arc<Window>) {
        self.stats.mapped_bytes -= w.map.mapped_len();
        self.stats.windows -= 1;
        match Arc::try_unwrap(w) {
            Ok(w) => drop(w),
            Err(shared) => {
                self.stats.revoked_in_use += 1;
                if let Err(e) = shared.map.revoke() {
                    // The guest pages stay until the pinning batch ends; say so loudly.
                    eprintln!("vhost-iotlb: {e}; the window is unmapped when its batch ends");
                }
            }
        }
    }

    /// Whether the open batch translated through `w`.
    fn in_batch(&self, w: &Window) -> bool {
        self.batch
            .is_some_and(|b| w.batch.load(Ordering::Relaxed) == b)
    }

    /// Puts a window taken out by [`Table::take_overlapping`] back, unchanged.
    fn put_back(&mut self, w: Arc<Window>) {
        self.fifo.insert(w.seq, w.start);
        self.windows.insert(w.start, w);
    }

    /// Retires the windows whose invalidation waited for the batch that just ended.
    fn retire_deferred(&mut self) {
        for w in std::mem::take(&mut self.deferred) {
            if self
                .windows
                .get(&w.start)
                .is_some_and(|held| Arc::ptr_eq(held, &w))
            {
                self.windows.remove(&w.start);
                self.fifo.remove(&w.seq);
                self.retire(w);
            }
        }
    }

    fn insert(&mut self, start: u64, len: u64, uaddr: u64, perm: Permissions, map: Mapping) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.mapped_bytes += map.mapped_len();
        self.stats.peak_mapped_bytes = self.stats.peak_mapped_bytes.max(self.stats.mapped_bytes);
        self.stats.windows += 1;
        self.stats.peak_windows = self.stats.peak_windows.max(self.stats.windows);
        self.fifo.insert(seq, start);
        self.windows.insert(
            start,
            Arc::new(Window {
                start,
                len,
                uaddr,
                perm,
                map,
                seq,
                batch: AtomicU64::new(0),
            }),
        );
    }

    fn clear_windows(&mut self) {
        let all = std::mem::take(&mut self.windows);
        self.fifo.clear();
        for w in all.into_values() {
            self.retire(w);
        }
    }

    /// Maps every region whole by guest physical address ([`Mode::Plain`]).
    fn map_regions(&mut self) -> Result<(), MmapError> {
        let mut maps = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            maps.push((
                r.gpa,
                r.size,
                r.uaddr,
                Mapping::new(&r.file, r.offset, r.size, true)?,
            ));
        }
        for (gpa, size, uaddr, map) in maps {
            self.insert(gpa, size, uaddr, Permissions::ReadWrite, map);
        }
        Ok(())
    }
}

impl AddressSpace {
    /// An empty address space in [`Mode::Unset`].
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            table: RwLock::new(Table {
                mode: Mode::Unset,
                regions: Vec::new(),
                windows: BTreeMap::new(),
                fifo: BTreeMap::new(),
                next_seq: 0,
                stats: Exposure::default(),
                batch: None,
                last_batch: 0,
                deferred: Vec::new(),
            }),
            ended: Mutex::new(0),
            batch_ended: Condvar::new(),
            channel: Mutex::new(None),
            pushes: Mutex::new(None),
            cancel: AtomicBool::new(false),
            limits,
            misses: AtomicU64::new(0),
            miss_failures: AtomicU64::new(0),
            access_fails: AtomicU64::new(0),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // A poisoned lock means a panic elsewhere while holding it; the table itself is
        // updated in small steps that keep it consistent, so keep using it.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.read().mode
    }

    /// Switches mode: every window is dropped; [`Mode::Plain`] then maps the regions.
    ///
    /// # Errors
    /// [`SpaceError::Mmap`] if a region cannot be mapped; the space is then left in
    /// [`Mode::Unset`] with nothing mapped.
    pub fn set_mode(&self, mode: Mode) -> Result<(), SpaceError> {
        if self.mode() != mode {
            self.discard_pushes();
        }
        let mut t = self.write();
        if t.mode == mode {
            return Ok(());
        }
        t.clear_windows();
        t.mode = mode;
        if mode == Mode::Plain {
            if let Err(e) = t.map_regions() {
                t.clear_windows();
                t.mode = Mode::Unset;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Replaces the memory table (`SET_MEM_TABLE`). Each region is checked: not empty, no
    /// overflow of its guest, user or file range, inside its file, no overlap with
    /// another region. Every window is dropped (the IOTLB refills through misses); in
    /// [`Mode::Plain`] the new regions are mapped.
    ///
    /// # Errors
    /// A [`SpaceError`] naming the region; the old table and windows then stay.
    pub fn set_regions(&self, table: Vec<(MemoryRegion, File)>) -> Result<(), SpaceError> {
        let mut regions = Vec::with_capacity(table.len());
        for (index, (r, file)) in table.into_iter().enumerate() {
            let range_err = || SpaceError::RegionRange {
                index,
                size: r.memory_size,
                uaddr: r.userspace_addr,
                offset: r.mmap_offset,
            };
            let ok = last(r.guest_phys_addr, r.memory_size).is_some()
                && last(r.userspace_addr, r.memory_size).is_some()
                && r.mmap_offset.checked_add(r.memory_size).is_some();
            if !ok {
                return Err(range_err());
            }
            let needed = r.mmap_offset + r.memory_size;
            let meta = file
                .metadata()
                .map_err(|source| SpaceError::RegionStat { index, source })?;
            // Regular files and memfds have a length to check; a mapping past it would
            // raise SIGBUS on access. (Device files report 0 and are not checked.)
            if meta.is_file() && meta.len() < needed {
                return Err(SpaceError::RegionFile {
                    index,
                    needed,
                    len: meta.len(),
                });
            }
            regions.push(Region {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.userspace_addr,
                offset: r.mmap_offset,
                file: Arc::new(file),
            });
        }
        for (a, ra) in regions.iter().enumerate() {
            for (b, rb) in regions.iter().enumerate().skip(a + 1) {
                let overlap = |s1: u64, s2: u64| {
                    // Both non-empty and non-overflowing (checked above).
                    s1 <= s2 + (rb.size - 1) && s2 <= s1 + (ra.size - 1)
                };
                if overlap(ra.uaddr, rb.uaddr) || overlap(ra.gpa, rb.gpa) {
                    return Err(SpaceError::RegionOverlap { a, b });
                }
            }
        }
        self.discard_pushes();
        let mut t = self.write();
        let old = std::mem::replace(&mut t.regions, regions);
        t.clear_windows();
        t.stats.guest_ram_bytes = t.regions.iter().map(|r| r.size).sum();
        if t.mode == Mode::Plain {
            if let Err(e) = t.map_regions() {
                t.clear_windows();
                t.regions = old;
                t.stats.guest_ram_bytes = t.regions.iter().map(|r| r.size).sum();
                let _ = t.map_regions();
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Converts a front-end user address to a guest physical address through the
    /// memory table (ring addresses without an IOMMU are user addresses).
    pub fn uaddr_to_gpa(&self, uaddr: u64) -> Option<u64> {
        let t = self.read();
        t.regions
            .iter()
            .find(|r| uaddr >= r.uaddr && uaddr - r.uaddr < r.size)
            .map(|r| r.gpa + (uaddr - r.uaddr))
    }

    /// Applies an IOTLB update: maps the window `[iova, iova + size)` → `[uaddr, ...)`
    /// with `perm`. An update repeating a window held (a front-end that pushes what the
    /// guest mapped and also answers a miss for it) changes nothing: a device batch
    /// may be using that window. Other windows it overlaps are dropped first
    /// (over-invalidating a cache is always safe); past [`Limits::max_windows`] the
    /// oldest window is evicted.
    ///
    /// # Errors
    /// [`SpaceError::NotIotlb`], [`SpaceError::IotlbRange`],
    /// [`SpaceError::OutsideRegions`] or [`SpaceError::Mmap`]; nothing changed.
    pub fn update(&self, iova: u64, size: u64, uaddr: u64, perm: u8) -> Result<(), SpaceError> {
        let range_err = SpaceError::IotlbRange { iova, size };
        let last_iova = last(iova, size).ok_or(range_err)?;
        let last_u = last(uaddr, size).ok_or(SpaceError::OutsideRegions { uaddr, size })?;
        let perm = perm_of(perm);
        // Map outside the lock: lookups go on meanwhile.
        let (file, offset) = {
            let t = self.read();
            if t.mode != Mode::Iotlb {
                return Err(SpaceError::NotIotlb);
            }
            let held = t.windows.get(&iova).is_some_and(|w| {
                (w.len, w.uaddr, w.perm) == (size, uaddr, perm) && !w.map.is_revoked()
            });
            if held {
                drop(t);
                self.write().stats.updates += 1;
                return Ok(());
            }
            // Vhost-user spec, "IOMMU support": addresses and size must be within the
            // memory regions; a window never spans two regions.
            let r = t
                .regions
                .iter()
                .find(|r| uaddr >= r.uaddr && last_u - r.uaddr < r.size)
                .ok_or(SpaceError::OutsideRegions { uaddr, size })?;
            (Arc::clone(&r.file), r.offset + (uaddr - r.uaddr))
        };
        let map = Mapping::new(&file, offset, size, perm.has_write())?;
        drop(file);
        let mut t = self.write();
        if t.mode != Mode::Iotlb {
            return Err(SpaceError::NotIotlb);
        }
        for w in t.take_overlapping(iova, last_iova) {
            t.retire(w);
        }
        // The open batch's windows are not evicted: they stay as they were until it ends.
        while t.windows.len() >= self.limits.max_windows.max(1) {
            let victim = t
                .fifo
                .iter()
                .map(|(&seq, &start)| (seq, start))
                .find(|(_, start)| t.windows.get(start).is_some_and(|w| !t.in_batch(w)));
            let Some((seq, start)) = victim else {
                break;
            };
            t.fifo.remove(&seq);
            if let Some(w) = t.windows.remove(&start) {
                t.stats.evictions += 1;
                t.retire(w);
            }
        }
        t.insert(iova, size, uaddr, perm, map);
        t.stats.updates += 1;
        Ok(())
    }

    /// Applies an IOTLB invalidate: every window overlapping `[iova, iova + size)` is
    /// gone from this process's memory when this returns (unmapped, or revoked in place
    /// if a [`GuestView`] still pins it). A window the open batch translated stays as it
    /// was until the batch ends: this then waits for [`Batch::end`](virtio_contract::Batch::end), with misses failing
    /// at once meanwhile (the front-end answers none before this is acknowledged), for
    /// at most [`Limits::miss_timeout`], after which the window is revoked in place.
    ///
    /// # Errors
    /// [`SpaceError::NotIotlb`] or [`SpaceError::IotlbRange`]; nothing changed.
    pub fn invalidate(&self, iova: u64, size: u64) -> Result<(), SpaceError> {
        let last_iova = last(iova, size).ok_or(SpaceError::IotlbRange { iova, size })?;
        let waiting_for = {
            let mut t = self.write();
            if t.mode != Mode::Iotlb {
                return Err(SpaceError::NotIotlb);
            }
            t.stats.invalidates += 1;
            let mut deferred = false;
            for w in t.take_overlapping(iova, last_iova) {
                if t.in_batch(&w) {
                    t.deferred.push(Arc::clone(&w));
                    t.put_back(w);
                    deferred = true;
                } else {
                    t.retire(w);
                }
            }
            if !deferred {
                return Ok(());
            }
            t.stats.deferred_invalidates += 1;
            t.batch
        };
        let Some(batch) = waiting_for else {
            return Ok(());
        };
        // The batch may be waiting on a miss the front-end will not answer now.
        self.set_cancel_misses(true);
        let deadline = Instant::now() + self.limits.miss_timeout;
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        while *ended < batch {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            ended = self
                .batch_ended
                .wait_timeout(ended, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let late = *ended < batch;
        drop(ended);
        self.set_cancel_misses(false);
        if late {
            eprintln!("vhost-iotlb: a batch outlived the invalidate's wait; its windows are revoked in place");
            self.write().retire_deferred();
        }
        Ok(())
    }

    /// Installs (or removes) the back-end request channel misses go to.
    pub fn set_channel(&self, channel: Option<MissChannel>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// While set, misses fail at once instead of waiting: the front-end is blocked on a
    /// request of its own and will not answer them (see the crate docs).
    pub fn set_cancel_misses(&self, cancel: bool) {
        self.cancel.store(cancel, Ordering::Release);
    }

    /// Installs (or removes) the front-end's push ring.
    pub fn set_push_ring(&self, ring: Option<Consumer>) {
        *self.pushes.lock().unwrap_or_else(|e| e.into_inner()) = ring;
    }

    /// Applies, oldest first, the updates the front-end pushed through the ring since
    /// the last call; returns how many took. Called before anything that must see
    /// every push made before it: a miss, and any IOTLB message (an INVALIDATE must
    /// not be overtaken by the push of what it removes). A push that is refused is
    /// counted and skipped: the ring is a cache filler, the miss stays the fallback.
    pub fn apply_pushes(&self) -> usize {
        let mut ring = self.pushes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pushes) = ring.as_mut().and_then(Consumer::take) else {
            return 0;
        };
        let total = pushes.len();
        let applied = pushes
            .into_iter()
            .filter(|p| {
                iotlb::is_update_perm(p.perm)
                    && self.update(p.iova, p.size, p.uaddr, p.perm).is_ok()
            })
            .count();
        if total > 0 {
            let mut t = self.write();
            t.stats.ring_updates += applied as u64;
            t.stats.ring_refused += (total - applied) as u64;
        }
        applied
    }

    /// Applies the pushes, then the invalidations the front-end wrote to the ring, and
    /// acknowledges those; returns how many invalidations it applied. Only for the
    /// device worker between batches: an invalidation of a window the open batch uses
    /// would wait for that batch to end.
    pub fn apply_ring(&self) -> usize {
        self.apply_pushes();
        let taken = {
            let ring = self.pushes.lock().unwrap_or_else(|e| e.into_inner());
            ring.as_ref().map(Consumer::take_invalidations)
        };
        let Some((invs, upto)) = taken else {
            return 0;
        };
        if invs.is_empty() {
            return 0;
        }
        let n = invs.len() as u64;
        for (iova, size) in invs {
            // One the space refuses (a bad range) has nothing to remove.
            let _ = self.invalidate(iova, size);
        }
        self.write().stats.ring_invalidates += n;
        if let Some(r) = self
            .pushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            r.finish_invalidations(upto);
        }
        n as usize
    }

    /// The device worker starts (`true`) or stops polling. Stopping, it then applies
    /// what the ring holds: an invalidation the front-end wrote while it still saw the
    /// worker polling is waiting for this look ([`crate::push_ring`]). Only between
    /// batches, as [`Self::apply_ring`].
    pub fn set_ring_polling(&self, on: bool) {
        let has_ring = {
            let ring = self.pushes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = ring.as_ref() {
                r.set_polling(on);
            }
            ring.is_some()
        };
        if has_ring && !on {
            self.apply_ring();
        }
    }

    /// Drops what the ring holds unread: pushes made for a memory table or a mode
    /// that is being replaced.
    fn discard_pushes(&self) {
        if let Some(r) = self
            .pushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            r.discard();
        }
    }

    /// Exposure and IOTLB counters now.
    pub fn exposure(&self) -> Exposure {
        let mut e = self.read().stats;
        e.misses = self.misses.load(Ordering::Relaxed);
        e.miss_failures = self.miss_failures.load(Ordering::Relaxed);
        e.access_fails = self.access_fails.load(Ordering::Relaxed);
        e
    }

    /// The windows held now: (first address, length, host base, mapped bytes).
    pub fn windows(&self) -> Vec<(u64, u64, usize, u64)> {
        self.read()
            .windows
            .values()
            .map(|w| (w.start, w.len, w.host_base(), w.mapped_len()))
            .collect()
    }

    /// Raises a miss for `addr` with `access` and waits for the answer.
    fn miss(&self, addr: u64, len: u64, access: Permissions) -> Result<(), Fault> {
        // The front-end may have pushed it already.
        if self.apply_pushes() > 0 && self.read().find(addr).is_some_and(|w| w.perm.allow(access)) {
            return Ok(());
        }
        let mut guard = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ch) = guard.as_mut() else {
            return Err(Fault::Unmapped { addr });
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        crate::trace!("miss {addr:#x}+{len:#x} {access:?}");
        let r = ch.miss(
            addr,
            len,
            wire_perm(access),
            &self.cancel,
            self.limits.miss_timeout,
        );
        crate::trace!("miss {addr:#x}: {r:?}");
        r.map_err(|e: MissError| {
            self.miss_failures.fetch_add(1, Ordering::Relaxed);
            Fault::Refused {
                addr,
                reason: e.to_string(),
            }
        })
    }

    /// Reports an access failure to the front-end (best effort: it is a notification).
    fn access_fail(&self, addr: u64, len: u64, access: Permissions) {
        self.access_fails.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = guard.as_mut() {
            if let Err(e) = ch.access_fail(addr, len, wire_perm(access)) {
                eprintln!("vhost-iotlb: cannot report an access failure at {addr:#x}: {e}");
            }
        }
    }

    /// Translates `[addr, addr + len)` for `access` into host pieces, raising misses
    /// as needed. Each window used is pushed to `pins` when given.
    ///
    /// # Errors
    /// A [`Fault`]; an access failure is then reported to the front-end.
    pub fn translate(
        &self,
        addr: u64,
        len: usize,
        access: Permissions,
        mut pins: Option<&mut Vec<Arc<Window>>>,
    ) -> Result<Vec<(*mut u8, usize)>, Fault> {
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        last(addr, len as u64).ok_or(Fault::Overflow { addr, len })?;
        let mut cur = addr;
        let mut left = len as u64;
        let mut misses = 0usize;
        let mut retried_perm = false;
        while left > 0 {
            let (lookup, mode) = {
                let t = self.read();
                let lookup = match t.find(cur) {
                    Some(w) if w.perm.allow(access) => {
                        let off = cur - w.start;
                        let n = (w.len - off).min(left);
                        if let Some(p) = pins.as_deref_mut() {
                            if !p.last().is_some_and(|l| Arc::ptr_eq(l, w)) {
                                p.push(Arc::clone(w));
                            }
                            if let Some(b) = t.batch {
                                w.batch.store(b, Ordering::Relaxed);
                            }
                        }
                        // `off` < w.len ≤ the mapping's length.
                        Lookup::Hit(w.map.ptr().wrapping_add(off as usize), n)
                    }
                    Some(_) => Lookup::Denied,
                    None => Lookup::Miss,
                };
                (lookup, t.mode)
            };
            match lookup {
                Lookup::Hit(ptr, n) => {
                    out.push((ptr, n as usize));
                    left -= n;
                    // Cannot overflow: `last` checked the whole range.
                    cur = cur.wrapping_add(n);
                }
                Lookup::Denied => {
                    if mode != Mode::Iotlb {
                        return Err(Fault::Denied { addr: cur, access });
                    }
                    // A narrower IOTLB entry: ask once whether the guest now allows more.
                    if !retried_perm {
                        retried_perm = true;
                        misses += 1;
                        if self.miss(cur, left, access).is_ok() {
                            continue;
                        }
                    }
                    self.access_fail(cur, left, access);
                    return Err(Fault::Denied { addr: cur, access });
                }
                Lookup::Miss => {
                    if mode != Mode::Iotlb || misses >= self.limits.max_misses_per_access {
                        return Err(Fault::Unmapped { addr: cur });
                    }
                    misses += 1;
                    if let Err(f) = self.miss(cur, left, access) {
                        self.access_fail(cur, left, access);
                        return Err(f);
                    }
                    // Vhost-user spec, "IOMMU support": a miss is complete when the
                    // front-end sent the update, or sent nothing because the miss was
                    // invalid. Nothing covering it now means the latter.
                    if self.read().find(cur).is_none() {
                        self.access_fail(cur, left, access);
                        return Err(Fault::Refused {
                            addr: cur,
                            reason: "the reply came without an update covering it".into(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// A device's view for one batch of work.
    pub fn view(self: &Arc<Self>) -> GuestView {
        GuestView::new(Arc::clone(self))
    }
}

mod view;

pub use view::{GuestView, Slices};

#[cfg(test)]
mod tests;
