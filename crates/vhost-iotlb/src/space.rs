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
use dma_types::lock;
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

/// How IOTLB windows reach guest memory in [`Mode::Iotlb`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MapPolicy {
    /// Each window is its own `mmap` of exactly its pages, unmapped when invalidated:
    /// this process never holds a page of guest RAM the guest did not map for the
    /// device. Every UPDATE costs an `mmap` and every INVALIDATE an `munmap`, whose
    /// TLB shootdown reaches every CPU the back-end's threads run on.
    #[default]
    Windows,
    /// Each region is mapped whole once and a window is only an entry of the table,
    /// checked on every access, as the device host checks its own accesses in process
    /// (and as rust-vmm's `IommuMemory` does). An invalidation removes the entry; it is
    /// complete once no [`GuestView`] that could have translated through it is left,
    /// which, between batches, is at once: a front-end with our push ring completes
    /// the guest's UNMAP without waiting for this process at all
    /// ([`crate::push_ring`]). A stray pointer in the back-end can then reach all of
    /// guest RAM, as one in the device host can.
    Whole,
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
    /// acknowledged) only when the batch ended; with [`MapPolicy::Whole`], INVALIDATE
    /// messages that waited for the views alive to drop.
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
    /// An invalidation's entries were removed, but a view that may use what it
    /// translated before was still alive when the wait ended ([`MapPolicy::Whole`]).
    #[error("a device batch outlived the invalidation's wait of {waited:?}")]
    Busy {
        /// How long it waited.
        waited: Duration,
    },
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

/// One memory-table region: kept as its file, never mapped in [`Mode::Iotlb`] unless
/// the policy is [`MapPolicy::Whole`].
#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
    /// Shared, so an UPDATE maps it outside the table's lock without a `dup`.
    file: Arc<File>,
    /// The whole region, mapped once ([`MapPolicy::Whole`] in [`Mode::Iotlb`]).
    whole: Option<Arc<Mapping>>,
}

/// What a window's addresses point into.
#[derive(Debug)]
enum Backing {
    /// Its own mapping of exactly its pages ([`MapPolicy::Windows`]).
    Own(Mapping),
    /// `offset` bytes into its region's whole mapping ([`MapPolicy::Whole`]), kept
    /// alive by this window (so by any view pinning it) even if the region goes.
    Within { whole: Arc<Mapping>, offset: u64 },
}

impl Backing {
    fn ptr(&self) -> *mut u8 {
        match self {
            Self::Own(m) => m.ptr(),
            // `update` checked `offset + len` against the region the mapping covers.
            Self::Within { whole, offset } => whole.ptr().wrapping_add(*offset as usize),
        }
    }

    /// Guest bytes mapped for this window alone.
    fn own_len(&self) -> u64 {
        match self {
            Self::Own(m) => m.mapped_len(),
            Self::Within { .. } => 0,
        }
    }

    fn is_revoked(&self) -> bool {
        matches!(self, Self::Own(m) if m.is_revoked())
    }
}

/// A mapped window: addresses `[start, start + len)` (IOVAs or guest physical).
#[derive(Debug)]
pub struct Window {
    start: u64,
    len: u64,
    /// The front-end address the UPDATE named.
    uaddr: u64,
    perm: Permissions,
    map: Backing,
    seq: u64,
    /// The last batch that translated through it (0: none).
    batch: AtomicU64,
    /// [`MapPolicy::Whole`]: 1 + the count of quiet times when it was last published
    /// as a hazard in the ring's page (see [`AddressSpace::publish_hazards`]).
    hazard: AtomicU64,
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
    /// Host address of its own whole-page mapping, or of its first byte within its
    /// region's ([`MapPolicy::Whole`]).
    pub fn host_base(&self) -> usize {
        match &self.map {
            Backing::Own(m) => m.base(),
            Backing::Within { .. } => self.map.ptr() as usize,
        }
    }
    /// Guest bytes mapped for this window alone (whole pages; 0 for a window into a
    /// region mapped whole).
    pub fn mapped_len(&self) -> u64 {
        self.map.own_len()
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
    policy: MapPolicy,
    /// [`MapPolicy::Whole`]: the views alive, and how often none was; its signal.
    views: Mutex<Views>,
    quiet: Condvar,
    /// [`MapPolicy::Whole`]: an entry a view pinned was removed since no view was
    /// alive (by whichever thread applied the ring), so an INVALIDATE must wait for
    /// the views even if the entries it names are gone already. Set under the
    /// table's lock, cleared when the last view drops.
    pinned_removed: AtomicBool,
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

/// The [`GuestView`]s alive ([`MapPolicy::Whole`]): an entry removed from the table is
/// out of reach once every view alive at its removal has dropped, i.e. once `active`
/// was 0 or `quiet` moved on.
#[derive(Debug, Default)]
struct Views {
    active: u64,
    /// Times `active` fell to 0.
    quiet: u64,
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
    /// revoked in place otherwise. Either way its guest pages leave this process now
    /// (with [`MapPolicy::Whole`] only the entry goes: see [`AddressSpace::invalidate`]).
    fn retire(&mut self, w: Arc<Window>) {
        self.stats.mapped_bytes -= w.map.own_len();
        self.stats.windows -= 1;
        if matches!(w.map, Backing::Within { .. }) {
            return;
        }
        match Arc::try_unwrap(w) {
            Ok(w) => drop(w),
            Err(shared) => {
                self.stats.revoked_in_use += 1;
                let Backing::Own(map) = &shared.map else {
                    return;
                };
                if let Err(e) = map.revoke() {
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

    fn insert(&mut self, start: u64, len: u64, uaddr: u64, perm: Permissions, map: Backing) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.mapped_bytes += map.own_len();
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
                hazard: AtomicU64::new(0),
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
            self.insert(gpa, size, uaddr, Permissions::ReadWrite, Backing::Own(map));
        }
        Ok(())
    }

    /// Maps every region whole once ([`MapPolicy::Whole`] in [`Mode::Iotlb`]); all or
    /// nothing.
    fn map_whole(&mut self) -> Result<(), MmapError> {
        let mut maps = Vec::with_capacity(self.regions.len());
        for r in self.regions.iter().filter(|r| r.whole.is_none()) {
            maps.push(Arc::new(Mapping::new(&r.file, r.offset, r.size, true)?));
        }
        let mut maps = maps.into_iter();
        for r in self.regions.iter_mut().filter(|r| r.whole.is_none()) {
            let m = maps.next();
            self.stats.mapped_bytes += m.as_ref().map_or(0, |m| m.mapped_len());
            r.whole = m;
        }
        self.stats.peak_mapped_bytes = self.stats.peak_mapped_bytes.max(self.stats.mapped_bytes);
        Ok(())
    }

    /// Drops the regions' whole mappings (a window still pinned keeps its own alive).
    fn unmap_whole(&mut self) {
        for r in &mut self.regions {
            if let Some(m) = r.whole.take() {
                self.stats.mapped_bytes -= m.mapped_len();
            }
        }
    }
}

impl AddressSpace {
    /// An empty address space in [`Mode::Unset`], windows mapped one by one.
    pub fn new(limits: Limits) -> Arc<Self> {
        Self::with_policy(limits, MapPolicy::Windows)
    }

    /// An empty address space in [`Mode::Unset`] that maps IOTLB windows as `policy`
    /// says.
    pub fn with_policy(limits: Limits, policy: MapPolicy) -> Arc<Self> {
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
            policy,
            views: Mutex::new(Views::default()),
            quiet: Condvar::new(),
            pinned_removed: AtomicBool::new(false),
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
        t.unmap_whole();
        t.mode = mode;
        if let Err(e) = self.map_for_mode(&mut t) {
            t.clear_windows();
            t.unmap_whole();
            t.mode = Mode::Unset;
            return Err(e.into());
        }
        Ok(())
    }

    /// Maps what the mode and policy map of the regions: all of them whole in
    /// [`Mode::Plain`] (as windows) or with [`MapPolicy::Whole`].
    fn map_for_mode(&self, t: &mut Table) -> Result<(), MmapError> {
        match t.mode {
            Mode::Plain => t.map_regions(),
            Mode::Iotlb if self.policy == MapPolicy::Whole => t.map_whole(),
            _ => Ok(()),
        }
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
                whole: None,
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
        t.clear_windows();
        t.unmap_whole();
        let old = std::mem::replace(&mut t.regions, regions);
        t.stats.guest_ram_bytes = t.regions.iter().map(|r| r.size).sum();
        if let Err(e) = self.map_for_mode(&mut t) {
            t.clear_windows();
            t.unmap_whole();
            t.regions = old;
            t.stats.guest_ram_bytes = t.regions.iter().map(|r| r.size).sum();
            let _ = self.map_for_mode(&mut t);
            return Err(e.into());
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
        let (file, offset, whole) = {
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
            let within = r.whole.as_ref().map(|m| (Arc::clone(m), uaddr - r.uaddr));
            (Arc::clone(&r.file), r.offset + (uaddr - r.uaddr), within)
        };
        let map = match whole {
            // `[uaddr - r.uaddr, + size)` lies in the region (checked above), which
            // the mapping covers whole.
            Some((whole, offset)) => Backing::Within { whole, offset },
            None => Backing::Own(Mapping::new(&file, offset, size, perm.has_write())?),
        };
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
    /// With [`MapPolicy::Whole`] the entries go at once; if a [`GuestView`] pinned one
    /// (it translated through it and may be using it), or one removed through the ring
    /// since no view was alive, this then waits until every view alive now has dropped
    /// (misses failing at once meanwhile, as above), for at most
    /// [`Limits::miss_timeout`].
    ///
    /// # Errors
    /// [`SpaceError::NotIotlb`] or [`SpaceError::IotlbRange`]; nothing changed.
    /// [`SpaceError::Busy`] when a view outlived the wait ([`MapPolicy::Whole`]): the
    /// entries are gone, but what a view translated before may still be in use.
    pub fn invalidate(&self, iova: u64, size: u64) -> Result<(), SpaceError> {
        if self.policy == MapPolicy::Whole {
            self.remove(iova, size)?;
            if self.pinned_removed.load(Ordering::SeqCst) {
                return self.wait_quiet();
            }
            return Ok(());
        }
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
        let ended = self.wait_cancelling_misses(&self.ended, &self.batch_ended, |e| *e >= batch);
        if !ended {
            eprintln!("vhost-iotlb: a batch outlived the invalidate's wait; its windows are revoked in place");
            self.write().retire_deferred();
        }
        Ok(())
    }

    /// Removes every entry overlapping `[iova, iova + size)` from the table
    /// ([`MapPolicy::Whole`]: nothing is unmapped, and nothing waits), noting whether
    /// a view pins one of them.
    fn remove(&self, iova: u64, size: u64) -> Result<(), SpaceError> {
        let last_iova = last(iova, size).ok_or(SpaceError::IotlbRange { iova, size })?;
        let mut t = self.write();
        if t.mode != Mode::Iotlb {
            return Err(SpaceError::NotIotlb);
        }
        t.stats.invalidates += 1;
        for w in t.take_overlapping(iova, last_iova) {
            // `w` is the table's reference; any other is a view's pin.
            if Arc::strong_count(&w) > 1 {
                self.pinned_removed.store(true, Ordering::SeqCst);
            }
            t.retire(w);
        }
        Ok(())
    }

    /// Waits on `signal` until `done` holds for what `m` guards, for at most
    /// [`Limits::miss_timeout`], with misses failing at once meanwhile: the device may
    /// be waiting for one that the front-end, waiting for our answer, will not answer.
    /// Returns whether `done` holds.
    fn wait_cancelling_misses<T>(
        &self,
        m: &Mutex<T>,
        signal: &Condvar,
        done: impl Fn(&T) -> bool,
    ) -> bool {
        self.set_cancel_misses(true);
        let deadline = Instant::now() + self.limits.miss_timeout;
        let mut g = lock(m);
        while !done(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = signal
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let held = done(&g);
        drop(g);
        self.set_cancel_misses(false);
        held
    }

    /// Waits until every view alive now has dropped (see
    /// [`Self::wait_cancelling_misses`]).
    fn wait_quiet(&self) -> Result<(), SpaceError> {
        let since = {
            let v = lock(&self.views);
            if v.active == 0 {
                return Ok(());
            }
            v.quiet
        };
        self.write().stats.deferred_invalidates += 1;
        let quiet = |v: &Views| v.active == 0 || v.quiet != since;
        if !self.wait_cancelling_misses(&self.views, &self.quiet, quiet) {
            return Err(SpaceError::Busy {
                waited: self.limits.miss_timeout,
            });
        }
        Ok(())
    }

    /// A view begins ([`MapPolicy::Whole`]): counted, so that no invalidation is
    /// complete while it may use what it translated, then the ring is applied, so that
    /// it translates nothing an invalidation the front-end wrote before already
    /// removed (the front-end writes, fences and reads the count; this counts, fences
    /// and reads the ring: one of the two sees the other).
    fn enter(&self) {
        if self.policy != MapPolicy::Whole {
            return;
        }
        {
            let mut v = lock(&self.views);
            v.active += 1;
            self.publish_views(&v);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.apply_ring();
    }

    /// A view ends ([`MapPolicy::Whole`]).
    fn exit(&self) {
        if self.policy != MapPolicy::Whole {
            return;
        }
        let mut v = lock(&self.views);
        v.active = v.active.saturating_sub(1);
        if v.active == 0 {
            v.quiet = v.quiet.wrapping_add(1);
            self.pinned_removed.store(false, Ordering::SeqCst);
            self.quiet.notify_all();
        }
        self.publish_views(&v);
    }

    /// Copies the view count into the ring for the front-end; under the views lock,
    /// so copies are written in order. With none alive, none uses any window.
    fn publish_views(&self, v: &Views) {
        if let Some(r) = lock(&self.pushes).as_ref() {
            if v.active == 0 {
                r.clear_hazards();
            }
            r.set_views(v.active);
        }
    }

    /// [`MapPolicy::Whole`]: tells the front-end, through the ring's page, that a view
    /// may now use the windows in `new` (so that it completes an UNMAP of any other
    /// window without waiting for the views), then fences and looks for invalidations
    /// it wrote meanwhile: if one removed a window of `new`, returns `false` and the
    /// access must be translated again. Without a ring nothing completes that way.
    fn publish_hazards(&self, new: &[Arc<Window>]) -> bool {
        if new.is_empty() {
            return true;
        }
        {
            let v = lock(&self.views);
            let ring = lock(&self.pushes);
            let Some(r) = ring.as_ref() else {
                return true;
            };
            let mark = v.quiet.wrapping_add(1);
            for w in new {
                if w.hazard.swap(mark, Ordering::Relaxed) != mark {
                    // `len` > 0: empty windows are refused.
                    r.add_hazard(w.start, w.start.wrapping_add(w.len - 1));
                }
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let pending = lock(&self.pushes)
            .as_ref()
            .is_some_and(|r| r.pending_after().is_some());
        if !pending {
            return true;
        }
        self.apply_ring();
        let t = self.read();
        new.iter().all(|w| {
            t.windows
                .get(&w.start)
                .is_some_and(|held| Arc::ptr_eq(held, w))
        })
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

    /// Installs (or removes) the front-end's push ring, telling it the policy and the
    /// views alive.
    pub fn set_push_ring(&self, ring: Option<Consumer>) {
        let v = lock(&self.views);
        if let Some(r) = &ring {
            r.set_whole(self.policy == MapPolicy::Whole);
            r.set_views(v.active);
        }
        *lock(&self.pushes) = ring;
    }

    /// Applies, oldest first, the updates the front-end pushed through the ring since
    /// the last call; returns how many took. Called before anything that must see
    /// every push made before it: a miss, and any IOTLB message (an INVALIDATE must
    /// not be overtaken by the push of what it removes). A push that is refused is
    /// counted and skipped: the ring is a cache filler, the miss stays the fallback.
    ///
    /// Pushes written after an invalidation still in the ring wait for it (they may
    /// map its IOVAs again), so with [`MapPolicy::Windows`] this stops there; with
    /// [`MapPolicy::Whole`], where removing an entry never waits, it applies the
    /// invalidations as well ([`Self::apply_ring`]).
    pub fn apply_pushes(&self) -> usize {
        self.apply(self.policy == MapPolicy::Whole).0
    }

    /// Applies the ring: each invalidation the front-end wrote after exactly the
    /// pushes it wrote before it, then the rest of the pushes, and acknowledges the
    /// invalidations; returns how many it applied. With [`MapPolicy::Windows`] only for
    /// the device worker between batches: an invalidation of a window the open batch
    /// uses would wait for that batch to end.
    pub fn apply_ring(&self) -> usize {
        self.apply(true).1
    }

    /// Applies pushes and, if `invalidations`, invalidations from the ring, in the
    /// order the front-end wrote them; returns (pushes applied, invalidations applied).
    /// Under the ring's lock throughout, so that a thread that finds it empty knows
    /// all it held is in place.
    fn apply(&self, invalidations: bool) -> (usize, usize) {
        let mut ring = lock(&self.pushes);
        let Some(c) = ring.as_mut() else {
            return (0, 0);
        };
        // The invalidations first: every push they come after is in the ring by then.
        let (invs, upto) = if invalidations {
            c.take_invalidations()
        } else {
            (Vec::new(), 0)
        };
        let (mut applied, mut refused) = (0u64, 0u64);
        let mut push_until = |c: &mut Consumer, limit: u64| {
            for p in c.take_before(limit).unwrap_or_default() {
                let ok = iotlb::is_update_perm(p.perm)
                    && self.update(p.iova, p.size, p.uaddr, p.perm).is_ok();
                if ok {
                    applied += 1;
                } else {
                    refused += 1;
                }
            }
        };
        for inv in &invs {
            push_until(c, inv.after);
            // One the space refuses (a bad range) has nothing to remove. With the
            // whole of guest RAM mapped, the front-end itself sees when no view is left.
            let _ = match self.policy {
                MapPolicy::Whole => self.remove(inv.iova, inv.size),
                MapPolicy::Windows => self.invalidate(inv.iova, inv.size),
            };
        }
        let rest = match c.pending_after() {
            Some(after) if !invalidations => after,
            _ => c.taken().wrapping_add(c.capacity()),
        };
        push_until(c, rest);
        if !invs.is_empty() {
            c.finish_invalidations(upto);
        }
        if applied + refused > 0 || !invs.is_empty() {
            let mut t = self.write();
            t.stats.ring_updates += applied;
            t.stats.ring_refused += refused;
            t.stats.ring_invalidates += invs.len() as u64;
        }
        (applied as usize, invs.len())
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
        let Some(p) = pins
            .as_deref_mut()
            .filter(|_| self.policy == MapPolicy::Whole)
        else {
            return self.translate_once(addr, len, access, pins);
        };
        // An access the device will use: its windows are published before they are,
        // and translated again if an invalidation removed one meanwhile (the next try
        // misses, and the front-end answers from what the guest maps now).
        for _ in 0..4 {
            let first = p.len();
            let out = self.translate_once(addr, len, access, Some(&mut *p))?;
            if self.publish_hazards(&p[first..]) {
                return Ok(out);
            }
        }
        Err(Fault::Refused {
            addr,
            reason: "invalidated each time it was translated".into(),
        })
    }

    fn translate_once(
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
