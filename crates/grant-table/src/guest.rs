//! The guest kernel's grant-table code (Linux `drivers/xen/grant-table.c`):
//! [`GuestGrants`] owns the guest's table frames, hands out grant references (never the
//! 8 reserved ones; consecutive runs for DMA), writes entries in the publish order the
//! ABI requires, ends foreign access with the version's revoke protocol, and keeps the
//! pages of grants the backend still uses on a deferred list until they can be revoked
//! (the entry protocol of Xen's `grant_table.h` header comment; Linux
//! `gnttab_try_end_foreign_access`, `gnttab_end_foreign_access`, `gnttab_add_deferred`).
//!
//! A grant still in use cannot be revoked: [`GuestGrants::try_end_foreign_access`]
//! answers `false` and the entry stays valid. [`GuestGrants::end_foreign_access`] then
//! queues the ref and its page; [`GuestGrants::process_deferred`] (Linux's timer tick)
//! retries and returns each page exactly when its revoke succeeds, so a page is never
//! handed back while a backend maps it.

use crate::abi::*;
use crate::mem;
use crate::xen::SetupTable;
use crate::{DomId, Gfn, GrantRef, Mem, Xen};
use dma_types::{lock, read, write};
use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Linux `free_per_iteration` default: deferred entries retried per tick.
pub const FREE_PER_ITERATION: usize = 10;
/// Linux `warn_delay`: failed tries before "g.e. still pending" is reported.
pub const WARN_DELAY: u32 = 60;
/// Deferred entries tracked at most; beyond, an entry is leaked (Linux leaks when it
/// cannot allocate the tracking entry). The ref and page are then never reused.
pub const MAX_DEFERRED: usize = 65_536;

/// Why a guest-side grant call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// A `GNTTABOP_*` the guest issued failed.
    #[error("{op} failed: {status}")]
    Hypercall {
        /// Which operation.
        op: &'static str,
        /// Its status.
        status: GrantStatus,
    },
    /// The table setup is unusable.
    #[error("table setup: {0}")]
    Setup(&'static str),
    /// No run of free refs long enough, even after growing the table to its limit.
    #[error(
        "no {count} consecutive free grant references (table at its limit of {frames} frames)"
    )]
    NoFreeRefs {
        /// Refs asked for.
        count: u32,
        /// Frames the table has.
        frames: u32,
    },
    /// The operation needs a v2 table.
    #[error("{0} needs a version 2 grant table")]
    NeedsV2(&'static str),
    /// A v1 entry holds a 32-bit frame number.
    #[error("{0} does not fit the 32-bit frame field of a v1 grant entry")]
    FrameTooLarge(Gfn),
    /// A sub-page window outside its page.
    #[error("sub-page window at offset {off} of {len} bytes leaves the 4096-byte page")]
    BadSubPage {
        /// Offset.
        off: u16,
        /// Length.
        len: u16,
    },
    /// A ref outside the table or not allocated.
    #[error("{0} is not an allocated grant reference of this table")]
    BadRef(GrantRef),
}

/// Where a guest's table lives and how large it may grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSetup {
    /// 1 or 2.
    pub version: u32,
    /// Frames the table may occupy, in order; the table starts with
    /// `initial_frames` of them and grows into the rest on demand.
    pub frames: Vec<Gfn>,
    /// v2 status frames, enough for `frames.len()` grant frames; empty for v1.
    pub status_frames: Vec<Gfn>,
    /// Frames set up at once (Xen's `INITIAL_NR_GRANT_FRAMES` is 1).
    pub initial_frames: u32,
}

impl TableSetup {
    /// A v1 table that starts with one frame and may grow into `frames`.
    pub fn v1(frames: Vec<Gfn>) -> Self {
        Self {
            version: 1,
            frames,
            status_frames: Vec::new(),
            initial_frames: INITIAL_NR_GRANT_FRAMES,
        }
    }

    /// A v2 table that starts with one frame.
    pub fn v2(frames: Vec<Gfn>, status_frames: Vec<Gfn>) -> Self {
        Self {
            version: 2,
            frames,
            status_frames,
            initial_frames: INITIAL_NR_GRANT_FRAMES,
        }
    }
}

/// What [`GuestGrants::end_foreign_access`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndAccess {
    /// Revoked; the ref is free and the page may be reused.
    Freed,
    /// The backend still uses the grant: ref and page wait on the deferred list.
    Deferred,
    /// Revoke failed and the deferred list was full: ref and page are leaked.
    Leaked,
}

/// Deferred-reclaim counters (Linux `deferred_count`, `leaked_count`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimCounters {
    /// Entries waiting now.
    pub deferred: usize,
    /// Entries given up on (never reused).
    pub leaked: u64,
    /// Entries revoked by a tick and released.
    pub reclaimed: u64,
    /// "g.e. still pending" reports (an entry failed `WARN_DELAY` tries in a row).
    pub warnings: u64,
}

struct Deferred {
    ref_: GrantRef,
    page: Option<Gfn>,
    warn_delay: u32,
}

struct Frames {
    /// GPAs of the grant frames in use.
    shared: Vec<u64>,
    /// GPAs of the status frames in use (v2).
    status: Vec<u64>,
}

struct Alloc {
    /// One bit per ref; set = free.
    free: Vec<u64>,
    nr_entries: u32,
    /// Where the next search starts.
    hint: u32,
}

impl Alloc {
    fn is_free(&self, r: u32) -> bool {
        self.free
            .get((r / 64) as usize)
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }
    fn set(&mut self, r: u32, free: bool) {
        if let Some(w) = self.free.get_mut((r / 64) as usize) {
            if free {
                *w |= 1 << (r % 64);
            } else {
                *w &= !(1 << (r % 64));
            }
        }
    }
    fn grow(&mut self, nr: u32) {
        let old = self.nr_entries;
        self.free.resize(nr.div_ceil(64) as usize, 0);
        self.nr_entries = nr;
        for r in old.max(NR_RESERVED_ENTRIES)..nr {
            self.set(r, true);
        }
    }
    /// First fit of `n` consecutive free refs, starting at the hint and wrapping.
    fn take(&mut self, n: u32) -> Option<u32> {
        let lo = NR_RESERVED_ENTRIES;
        if n == 0 || self.nr_entries < lo + n {
            return None;
        }
        let span = self.nr_entries - lo;
        let start = self.hint.clamp(lo, self.nr_entries - 1);
        let mut tried = 0;
        let mut r = start;
        while tried < span {
            if r + n > self.nr_entries {
                tried += self.nr_entries - r;
                r = lo;
                continue;
            }
            match (r..r + n).find(|&x| !self.is_free(x)) {
                None => {
                    for x in r..r + n {
                        self.set(x, false);
                    }
                    self.hint = r + n;
                    return Some(r);
                }
                Some(busy) => {
                    tried += busy + 1 - r;
                    r = busy + 1;
                    if r >= self.nr_entries {
                        r = lo;
                    }
                }
            }
        }
        None
    }
}

/// The guest's grant table and its kernel-side bookkeeping.
pub struct GuestGrants {
    xen: Arc<Xen>,
    domid: DomId,
    mem: Mem,
    version: u32,
    setup: TableSetup,
    frames: RwLock<Frames>,
    alloc: Mutex<Alloc>,
    deferred: Mutex<(VecDeque<Deferred>, ReclaimCounters)>,
    free_per_iteration: usize,
}

impl std::fmt::Debug for GuestGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestGrants")
            .field("domid", &self.domid)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl GuestGrants {
    /// Selects the version (`GNTTABOP_set_version`) and sets up the table's initial
    /// frames (`GNTTABOP_setup_table`) for domain `domid`, whose RAM is `mem`.
    ///
    /// # Errors
    /// [`GuestError::Setup`] for an empty frame list, too few status frames or an
    /// initial size beyond the list; [`GuestError::Hypercall`] when Xen refuses.
    pub fn new(
        xen: Arc<Xen>,
        domid: DomId,
        mem: Mem,
        setup: TableSetup,
    ) -> Result<Self, GuestError> {
        if setup.frames.is_empty() || setup.initial_frames == 0 {
            return Err(GuestError::Setup("the table needs at least one frame"));
        }
        if setup.initial_frames as usize > setup.frames.len() {
            return Err(GuestError::Setup("initial_frames exceeds the frames given"));
        }
        if setup.version == 2
            && setup.status_frames.len() < status_frames_for(setup.frames.len() as u32) as usize
        {
            return Err(GuestError::Setup(
                "too few status frames for the grant frames",
            ));
        }
        if setup.version != 1 && setup.version != 2 {
            return Err(GuestError::Setup("version must be 1 or 2"));
        }
        xen.set_version(domid, setup.version)
            .map_err(|_| GuestError::Hypercall {
                op: "set_version",
                status: GrantStatus::GeneralError,
            })?;
        let g = Self {
            xen,
            domid,
            mem,
            version: setup.version,
            frames: RwLock::new(Frames {
                shared: Vec::new(),
                status: Vec::new(),
            }),
            alloc: Mutex::new(Alloc {
                free: Vec::new(),
                nr_entries: 0,
                hint: NR_RESERVED_ENTRIES,
            }),
            deferred: Mutex::new((VecDeque::new(), ReclaimCounters::default())),
            free_per_iteration: FREE_PER_ITERATION,
            setup,
        };
        let n = g.setup.initial_frames;
        g.grow_to(&mut lock(&g.alloc), n)?;
        Ok(g)
    }

    /// Sets how many deferred entries one [`Self::process_deferred`] tick retries
    /// (0 = all; Linux's `free_per_iteration`).
    pub fn with_free_per_iteration(mut self, n: usize) -> Self {
        self.free_per_iteration = n;
        self
    }

    /// This guest's domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The table version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The guest's RAM.
    pub fn memory(&self) -> &Mem {
        &self.mem
    }

    /// The hypervisor.
    pub fn xen(&self) -> &Arc<Xen> {
        &self.xen
    }

    /// Grant frames in use.
    pub fn nr_frames(&self) -> u32 {
        read(&self.frames).shared.len() as u32
    }

    /// `gnttab_expand`: `GNTTABOP_setup_table` with `nr` frames.
    fn grow_to(&self, alloc: &mut Alloc, nr: u32) -> Result<(), GuestError> {
        let nr_us = nr as usize;
        let frame_list = self
            .setup
            .frames
            .get(..nr_us)
            .ok_or(GuestError::NoFreeRefs {
                count: 1,
                frames: alloc.nr_entries / entries_per_frame(self.version),
            })?;
        let status_list = if self.version == 2 {
            let n = status_frames_for(nr) as usize;
            self.setup
                .status_frames
                .get(..n)
                .ok_or(GuestError::Setup("too few status frames"))?
                .to_vec()
        } else {
            Vec::new()
        };
        let mut op = SetupTable {
            dom: DomId(DOMID_SELF),
            frame_list: frame_list.to_vec(),
            status_frame_list: status_list.clone(),
            status: GrantStatus::GeneralError,
        };
        self.xen.setup_table(self.domid, &mut op);
        if op.status != GrantStatus::Okay {
            return Err(GuestError::Hypercall {
                op: "setup_table",
                status: op.status,
            });
        }
        {
            let mut f = write(&self.frames);
            f.shared = frame_list.iter().map(|g| g.0 * PAGE_SIZE).collect();
            f.status = status_list.iter().map(|g| g.0 * PAGE_SIZE).collect();
        }
        alloc.grow(nr * entries_per_frame(self.version));
        Ok(())
    }

    /// `gnttab_alloc_grant_reference_seq`: `n` consecutive free refs, growing the
    /// table when needed.
    ///
    /// # Errors
    /// [`GuestError::NoFreeRefs`] when even the largest table has no such run.
    pub fn alloc_refs(&self, n: u32) -> Result<GrantRef, GuestError> {
        let mut a = lock(&self.alloc);
        loop {
            if let Some(r) = a.take(n) {
                return Ok(GrantRef(r));
            }
            let frames = a.nr_entries / entries_per_frame(self.version);
            if frames as usize >= self.setup.frames.len() {
                return Err(GuestError::NoFreeRefs { count: n, frames });
            }
            self.grow_to(&mut a, frames + 1)
                .map_err(|_| GuestError::NoFreeRefs { count: n, frames })?;
        }
    }

    /// Returns `n` refs from `first` to the free pool (the caller revoked them).
    pub fn free_refs(&self, first: GrantRef, n: u32) {
        let mut a = lock(&self.alloc);
        for r in first.0..first.0.saturating_add(n) {
            if r >= NR_RESERVED_ENTRIES && r < a.nr_entries {
                a.set(r, true);
            }
        }
    }

    fn entry_gpa(&self, r: GrantRef) -> Result<u64, GuestError> {
        let per = entries_per_frame(self.version);
        let f = read(&self.frames);
        let base = f
            .shared
            .get((r.0 / per) as usize)
            .ok_or(GuestError::BadRef(r))?;
        Ok(base + u64::from(r.0 % per) * entry_size(self.version))
    }

    fn status_gpa(&self, r: GrantRef) -> Result<u64, GuestError> {
        if self.version == 1 {
            return self.entry_gpa(r);
        }
        let f = read(&self.frames);
        let base = f
            .status
            .get((r.0 / STATUS_PER_FRAME) as usize)
            .ok_or(GuestError::BadRef(r))?;
        Ok(base + u64::from(r.0 % STATUS_PER_FRAME) * 2)
    }

    fn fault(&self) -> GuestError {
        GuestError::Setup("a table frame is not RAM")
    }

    /// Publishes an entry: the body first, a write barrier, then the flags (Xen
    /// `grant_table.h`; Linux `gnttab_update_entry_v1/v2`).
    fn publish(
        &self,
        r: GrantRef,
        domid: DomId,
        body: impl FnOnce(u64) -> Option<()>,
        flags: u16,
    ) -> Result<(), GuestError> {
        let e = self.entry_gpa(r)?;
        mem::store16(&self.mem, e + 2, domid.0, Ordering::Relaxed).ok_or_else(|| self.fault())?;
        body(e).ok_or_else(|| self.fault())?;
        fence(Ordering::Release); // wmb()
        mem::store16(&self.mem, e, flags, Ordering::Release).ok_or_else(|| self.fault())
    }

    /// `gnttab_grant_foreign_access_ref`: grants page `gfn` to `domid` under `r`.
    ///
    /// # Errors
    /// [`GuestError::BadRef`], or [`GuestError::FrameTooLarge`] for a v1 table.
    pub fn grant_foreign_access_ref(
        &self,
        r: GrantRef,
        domid: DomId,
        gfn: Gfn,
        readonly: bool,
    ) -> Result<(), GuestError> {
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        let m = &self.mem;
        if self.version == 1 {
            let f32 = u32::try_from(gfn.0).map_err(|_| GuestError::FrameTooLarge(gfn))?;
            self.publish(
                r,
                domid,
                |e| mem::store32(m, e + 4, f32, Ordering::Relaxed),
                flags,
            )
        } else {
            self.publish(
                r,
                domid,
                |e| mem::store64(m, e + 8, gfn.0, Ordering::Relaxed),
                flags,
            )
        }
    }

    /// `gnttab_grant_foreign_access`: allocates a ref and grants `gfn` under it.
    ///
    /// # Errors
    /// As [`Self::alloc_refs`] and [`Self::grant_foreign_access_ref`].
    pub fn grant_foreign_access(
        &self,
        domid: DomId,
        gfn: Gfn,
        readonly: bool,
    ) -> Result<GrantRef, GuestError> {
        let r = self.alloc_refs(1)?;
        if let Err(e) = self.grant_foreign_access_ref(r, domid, gfn, readonly) {
            self.free_refs(r, 1);
            return Err(e);
        }
        Ok(r)
    }

    /// v2 sub-page grant: only `[off, off + len)` of `gfn` is reachable, by copy only.
    ///
    /// # Errors
    /// [`GuestError::NeedsV2`], [`GuestError::BadSubPage`], or allocation errors.
    pub fn grant_sub_page(
        &self,
        domid: DomId,
        gfn: Gfn,
        off: u16,
        len: u16,
        readonly: bool,
    ) -> Result<GrantRef, GuestError> {
        if self.version != 2 {
            return Err(GuestError::NeedsV2("a sub-page grant"));
        }
        if u32::from(off) + u32::from(len) > PAGE_SIZE as u32 {
            return Err(GuestError::BadSubPage { off, len });
        }
        let r = self.alloc_refs(1)?;
        let m = &self.mem;
        let flags = GTF_PERMIT_ACCESS | GTF_SUB_PAGE | if readonly { GTF_READONLY } else { 0 };
        let body = |e: u64| {
            mem::store16(m, e + 4, off, Ordering::Relaxed)?;
            mem::store16(m, e + 6, len, Ordering::Relaxed)?;
            mem::store64(m, e + 8, gfn.0, Ordering::Relaxed)
        };
        if let Err(e) = self.publish(r, domid, body, flags) {
            self.free_refs(r, 1);
            return Err(e);
        }
        Ok(r)
    }

    /// v2 transitive grant: lets `domid` copy through `trans_domid`'s grant
    /// `trans_gref` (which that domain granted to us).
    ///
    /// # Errors
    /// [`GuestError::NeedsV2`], or allocation errors.
    pub fn grant_transitive(
        &self,
        domid: DomId,
        trans_domid: DomId,
        trans_gref: GrantRef,
        readonly: bool,
    ) -> Result<GrantRef, GuestError> {
        if self.version != 2 {
            return Err(GuestError::NeedsV2("a transitive grant"));
        }
        let r = self.alloc_refs(1)?;
        let m = &self.mem;
        let flags = GTF_TRANSITIVE | if readonly { GTF_READONLY } else { 0 };
        let body = |e: u64| {
            mem::store16(m, e + 4, trans_domid.0, Ordering::Relaxed)?;
            mem::store32(m, e + 8, trans_gref.0, Ordering::Relaxed)
        };
        if let Err(e) = self.publish(r, domid, body, flags) {
            self.free_refs(r, 1);
            return Err(e);
        }
        Ok(r)
    }

    /// Raw access to the flags word of entry `r`, for tests that play a hostile or
    /// racing guest.
    ///
    /// # Errors
    /// [`GuestError::BadRef`].
    pub fn with_flags<R>(
        &self,
        r: GrantRef,
        f: impl FnOnce(&AtomicU16) -> R,
    ) -> Result<R, GuestError> {
        let e = self.entry_gpa(r)?;
        mem::with_atomic::<AtomicU16, _>(&self.mem, e, f).ok_or_else(|| self.fault())
    }

    /// The Xen-written `GTF_reading | GTF_writing` bits of entry `r` (v1: in the
    /// flags; v2: in the status word).
    ///
    /// # Errors
    /// [`GuestError::BadRef`].
    pub fn in_use_bits(&self, r: GrantRef) -> Result<u16, GuestError> {
        let s = self.status_gpa(r)?;
        let v = mem::load16(&self.mem, s, Ordering::Acquire).ok_or_else(|| self.fault())?;
        Ok(v & (GTF_READING | GTF_WRITING))
    }

    /// `gnttab_end_foreign_access_ref`: revokes entry `r` if no backend uses it; the
    /// ref stays allocated. v1: compare-and-swap the flags to 0 unless `GTF_reading` or
    /// `GTF_writing` is set. v2: clear the flags, full fence, then check the status word.
    ///
    /// Returns whether the entry was revoked (`false`: still in use, as Linux's
    /// `gnttab_end_foreign_access_ref_v1/v2` answer 0).
    pub fn end_foreign_access_ref(&self, r: GrantRef) -> bool {
        if self.version == 1 {
            let Ok(e) = self.entry_gpa(r) else {
                return false;
            };
            mem::with_atomic::<AtomicU16, _>(&self.mem, e, |a| {
                let mut flags = a.load(Ordering::SeqCst);
                loop {
                    if flags & (GTF_READING | GTF_WRITING) != 0 {
                        return false;
                    }
                    match a.compare_exchange(flags, 0, Ordering::SeqCst, Ordering::SeqCst) {
                        Ok(_) => return true,
                        Err(now) => flags = now,
                    }
                }
            })
            .unwrap_or(false)
        } else {
            let (Ok(e), Ok(s)) = (self.entry_gpa(r), self.status_gpa(r)) else {
                return false;
            };
            if mem::store16(&self.mem, e, 0, Ordering::SeqCst).is_none() {
                return false;
            }
            fence(Ordering::SeqCst); // mb()
            let busy = mem::load16(&self.mem, s, Ordering::SeqCst)
                .is_none_or(|st| st & (GTF_READING | GTF_WRITING) != 0);
            if busy {
                return false;
            }
            fence(Ordering::Acquire);
            true
        }
    }

    /// `gnttab_try_end_foreign_access`: revoke and, on success, free the ref.
    pub fn try_end_foreign_access(&self, r: GrantRef) -> bool {
        let ok = self.end_foreign_access_ref(r);
        if ok {
            self.free_refs(r, 1);
        }
        ok
    }

    /// `gnttab_end_foreign_access`: revoke and free, or, while the backend still uses
    /// the grant, queue the ref and its page for deferred reclaim.
    pub fn end_foreign_access(&self, r: GrantRef, page: Option<Gfn>) -> EndAccess {
        if self.try_end_foreign_access(r) {
            return EndAccess::Freed;
        }
        let mut d = lock(&self.deferred);
        if d.0.len() >= MAX_DEFERRED {
            d.1.leaked += 1;
            return EndAccess::Leaked;
        }
        d.0.push_back(Deferred {
            ref_: r,
            page,
            warn_delay: WARN_DELAY,
        });
        d.1.deferred = d.0.len();
        EndAccess::Deferred
    }

    /// One tick of deferred reclaim (`gnttab_handle_deferred`): retries up to
    /// `free_per_iteration` queued entries; returns the pages whose grant is now revoked
    /// (the caller may free them). Entries still in use go to the back of the queue.
    pub fn process_deferred(&self) -> Vec<Gfn> {
        let mut d = lock(&self.deferred);
        let n = if self.free_per_iteration == 0 {
            d.0.len()
        } else {
            self.free_per_iteration.min(d.0.len())
        };
        let mut freed = Vec::new();
        for _ in 0..n {
            let Some(mut e) = d.0.pop_front() else {
                break;
            };
            if self.try_end_foreign_access(e.ref_) {
                d.1.reclaimed += 1;
                if let Some(p) = e.page {
                    freed.push(p);
                }
            } else {
                e.warn_delay = e.warn_delay.saturating_sub(1);
                if e.warn_delay == 0 {
                    d.1.warnings += 1; // "g.e. %#x still pending"
                    e.warn_delay = WARN_DELAY;
                }
                d.0.push_back(e);
            }
        }
        d.1.deferred = d.0.len();
        freed
    }

    /// Deferred-reclaim counters.
    pub fn reclaim_counters(&self) -> ReclaimCounters {
        lock(&self.deferred).1
    }
}
