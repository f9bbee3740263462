//! The hypervisor's side of grant tables: [`Xen`] holds the domains, each with its
//! grant table (shared entries in frames of the domain's own RAM, plus Xen-private
//! active entries with the four pin counts) and its maptrack (the handles of the
//! mappings it holds of other domains' grants), and performs `GNTTABOP_*` operations
//! with Xen's checks, in Xen's order, answering each operation of a batch with its own
//! [`GrantStatus`](crate::abi::GrantStatus) (xen/common/grant_table.c; operations as declared in
//! xen/include/public/grant_table.h).
//!
//! # What is and is not modelled
//! - A "host mapping" of a granted frame is, in-process, the right to reach the frame's
//!   guest-physical address in the granting domain's RAM while the handle lives
//!   ([`Xen::mapped_frame`]); the backend's page tables are not modelled. `host_addr`
//!   is recorded and must match on unmap (Xen's `replace_grant_host_mapping` check).
//! - One TLB flush is counted per chunk of [`UNMAP_BATCH_SIZE`] unmaps, before the pins
//!   of that chunk drop, as Xen's `gnttab_unmap_grant_ref` does.
//! - No XSM policy (Xen's default dummy policy allows every grant operation), no grant
//!   transfer, no `GTF_PAT`/`PCD`/`PWT` cache attributes, no IOMMU mappings for PV
//!   backends.
//! - The guest supplies the frames of its table (Xen HVM guests place them with
//!   `XENMEM_add_to_physmap`), so [`SetupTable`] carries the frame lists `IN`.
//! - [`Xen::set_version`] succeeds only while no entry is pinned and then forgets the
//!   table's frames: the guest sets its table up again (Xen instead converts entries).
//! - All `max_maptrack_frames × 256` handles are usable (Xen keeps one entry per vCPU
//!   free list as a tail and so hands out slightly fewer).
//!
//! # Locking
//! `domains` (read) → a domain's `table` (read; write only to grow or change version)
//! → one active entry's mutex. A mapper's maptrack mutex is never held while a
//! granter's active entry is locked. Shared entries in guest frames are only touched
//! with atomics, because the guest races every access.

mod args;
mod copy;
mod status;

pub use args::*;
use status::{reduce_status_for_pin, set_status, St};

use crate::abi::{
    entries_per_frame, entry_size, pin_overflow_mask, status_frames_for, DOMID_SELF,
    GNTMAP_APPLICATION_MAP, GNTMAP_CONTAINS_PTE, GNTMAP_DEVICE_MAP, GNTMAP_HOST_MAP,
    GNTMAP_READONLY, GNTPIN_DEVR_INC, GNTPIN_DEVW_INC, GNTPIN_DEVW_MASK, GNTPIN_HSTR_INC,
    GNTPIN_HSTW_INC, GNTPIN_HSTW_MASK, MAPTRACK_PER_PAGE, PAGE_SIZE, STATUS_PER_FRAME,
    UNMAP_BATCH_SIZE,
};
use crate::mem;
use crate::{DomId, Gfn, GrantHandle, GrantRef, Mem};
use dma_types::{lock, read, write};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Xen's `struct active_grant_entry`.
#[derive(Clone, Copy, Debug, Default)]
struct Active {
    pin: u32,
    /// The domain holding the pins.
    domid: u16,
    /// Guest-physical address of the frame in its owner's RAM.
    frame: u64,
    /// Owner of `frame` (the granter, or for a transitive grant the original granter).
    frame_owner: u16,
    start: u16,
    length: u16,
    is_sub_page: bool,
    /// For a transitive grant: the grant it passes on.
    trans: Option<(u16, u32)>,
}

struct Table {
    version: u32,
    /// GPAs of the shared frames.
    frames: Vec<u64>,
    /// GPAs of the v2 status frames.
    status: Vec<u64>,
    active: Vec<Mutex<Active>>,
}

impl Table {
    fn nr_entries(&self) -> u32 {
        (self.frames.len() as u32) * entries_per_frame(self.version)
    }

    /// GPA of entry `r`'s header; `r` was bounds-checked.
    fn entry_gpa(&self, r: u32) -> u64 {
        let per = entries_per_frame(self.version);
        self.frames[(r / per) as usize] + u64::from(r % per) * entry_size(self.version)
    }

    /// GPA of the word holding `GTF_reading`/`GTF_writing` for entry `r`.
    fn status_gpa(&self, r: u32) -> u64 {
        if self.version == 2 {
            self.status[(r / STATUS_PER_FRAME) as usize] + u64::from(r % STATUS_PER_FRAME) * 2
        } else {
            self.entry_gpa(r)
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct MaptrackEntry {
    /// `GNTMAP_*` still held; 0 = free.
    flags: u32,
    domid: u16,
    gref: u32,
    host_addr: u64,
    dev_bus_addr: u64,
    /// The vCPU free list the entry returns to.
    vcpu: u32,
}

struct Maptrack {
    entries: Vec<MaptrackEntry>,
    free: Vec<Vec<u32>>,
    frames: u32,
    limit: u32,
}

impl Maptrack {
    /// Xen's `get_maptrack_handle`: this vCPU's free list, else a new maptrack frame
    /// if below the limit, else steal from another vCPU's list, else `None`.
    fn get(&mut self, vcpu: u32) -> Option<u32> {
        let n = self.free.len() as u32;
        let v = vcpu % n.max(1);
        if let Some(h) = self.free.get_mut(v as usize).and_then(Vec::pop) {
            return Some(h);
        }
        if self.frames < self.limit {
            let base = self.entries.len() as u32;
            self.frames += 1;
            self.entries
                .extend((0..MAPTRACK_PER_PAGE).map(|_| MaptrackEntry {
                    vcpu: v,
                    ..MaptrackEntry::default()
                }));
            let list = self.free.get_mut(v as usize)?;
            list.extend((base + 1..base + MAPTRACK_PER_PAGE).rev());
            return Some(base);
        }
        for k in 1..n {
            let other = ((v + k) % n) as usize;
            if let Some(h) = self.free[other].pop() {
                // A stolen entry now belongs to the stealing vCPU (Xen moves it).
                if let Some(e) = self.entries.get_mut(h as usize) {
                    e.vcpu = v;
                }
                return Some(h);
            }
        }
        None
    }

    fn put(&mut self, h: u32) {
        if let Some(e) = self.entries.get_mut(h as usize) {
            *e = MaptrackEntry {
                vcpu: e.vcpu,
                ..MaptrackEntry::default()
            };
            let v = e.vcpu as usize;
            if let Some(list) = self.free.get_mut(v) {
                list.push(h);
            }
        }
    }
}

/// One domain as Xen sees it.
struct Domain {
    id: u16,
    mem: Mem,
    config: DomainConfig,
    table: RwLock<Table>,
    maptrack: Mutex<Maptrack>,
    dying: AtomicBool,
    tlb_flushes: AtomicU64,
}

/// A frame number as a guest-physical address of a RAM page of `d`, or `GNTST_bad_page`
/// (Xen `get_paged_frame`).
fn paged_frame(d: &Domain, gfn: u64) -> Result<u64, St> {
    let gpa = gfn.checked_mul(PAGE_SIZE).ok_or(St::BadPage)?;
    if mem::is_ram_page(&d.mem, gpa) {
        Ok(gpa)
    } else {
        Err(St::BadPage)
    }
}

/// The grant-table hypervisor: every domain's table and maptrack.
pub struct Xen {
    domains: RwLock<BTreeMap<u16, Arc<Domain>>>,
    any_dying: AtomicBool,
}

impl std::fmt::Debug for Xen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u16> = read(&self.domains).keys().copied().collect();
        f.debug_struct("Xen").field("domains", &ids).finish()
    }
}

impl Default for Xen {
    fn default() -> Self {
        Self::new()
    }
}

impl Xen {
    /// No domains.
    pub fn new() -> Self {
        Self {
            domains: RwLock::new(BTreeMap::new()),
            any_dying: AtomicBool::new(false),
        }
    }

    /// Creates domain `id` with `mem` as its RAM and an empty version-1 table.
    ///
    /// # Errors
    /// [`GrantError::ReservedDomainId`], [`GrantError::DomainExists`], or
    /// [`GrantError::BadConfig`] for zero vCPUs, a `max_grant_version` other than 1 or
    /// 2, or `max_grant_frames` beyond what a `grant_ref_t` indexes.
    pub fn create_domain(
        &self,
        id: DomId,
        mem: Mem,
        config: DomainConfig,
    ) -> Result<(), GrantError> {
        if id.0 >= DOMID_SELF {
            return Err(GrantError::ReservedDomainId(id));
        }
        if config.vcpus == 0 {
            return Err(GrantError::BadConfig("a domain needs at least one vCPU"));
        }
        if !(1..=2).contains(&config.max_grant_version) {
            return Err(GrantError::BadConfig("max_grant_version must be 1 or 2"));
        }
        // Bound so that frames × 512 entries and maptrack frames × 256 fit u32.
        if config.max_grant_frames > (1 << 20) || config.max_maptrack_frames > (1 << 20) {
            return Err(GrantError::BadConfig(
                "max_grant_frames and max_maptrack_frames must be at most 2^20",
            ));
        }
        let mut domains = write(&self.domains);
        if domains.contains_key(&id.0) {
            return Err(GrantError::DomainExists(id));
        }
        domains.insert(
            id.0,
            Arc::new(Domain {
                id: id.0,
                mem,
                config,
                table: RwLock::new(Table {
                    version: 1,
                    frames: Vec::new(),
                    status: Vec::new(),
                    active: Vec::new(),
                }),
                maptrack: Mutex::new(Maptrack {
                    entries: Vec::new(),
                    free: vec![Vec::new(); config.vcpus as usize],
                    frames: 0,
                    limit: config.max_maptrack_frames,
                }),
                dying: AtomicBool::new(false),
                tlb_flushes: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Domain death: every mapping `id` holds of other domains' grants is released
    /// (Xen `gnttab_release_mappings`), and the domain accepts no new operation. Its
    /// RAM stays allocated while another domain still maps one of its grants, and is
    /// dropped when the last such mapping goes.
    ///
    /// # Errors
    /// [`GrantError::NoDomain`] if `id` is not a live domain.
    pub fn destroy_domain(&self, id: DomId) -> Result<(), GrantError> {
        let d = self.live(id.0).ok_or(GrantError::NoDomain(id))?;
        d.dying.store(true, Ordering::SeqCst);
        self.any_dying.store(true, Ordering::SeqCst);
        let held: Vec<(u32, MaptrackEntry)> = {
            let mt = lock(&d.maptrack);
            mt.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.flags & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) != 0)
                .map(|(h, e)| (h as u32, *e))
                .collect()
        };
        for (h, e) in held {
            if let Some(rd) = self.any(e.domid) {
                self.unpin_mapping(&rd, e.gref, e.flags, d.id);
            }
            lock(&d.maptrack).put(h);
        }
        self.reap();
        Ok(())
    }

    /// Whether `id` is a live (not dying) domain.
    pub fn domain_is_live(&self, id: DomId) -> bool {
        self.live(id.0).is_some()
    }

    /// Whether Xen still holds `id` at all (live, or dying with its pages mapped).
    pub fn domain_exists(&self, id: DomId) -> bool {
        read(&self.domains).contains_key(&id.0)
    }

    /// The RAM of domain `id` (live or dying).
    pub fn domain_memory(&self, id: DomId) -> Option<Mem> {
        self.any(id.0).map(|d| d.mem.clone())
    }

    /// The version of `id`'s table (`GNTTABOP_get_version`).
    ///
    /// # Errors
    /// [`GrantError::NoDomain`].
    pub fn get_version(&self, id: DomId) -> Result<u32, GrantError> {
        let d = self.live(id.0).ok_or(GrantError::NoDomain(id))?;
        let v = read(&d.table).version;
        Ok(v)
    }

    /// TLB flushes `id` has done for unmap batches.
    pub fn tlb_flushes(&self, id: DomId) -> u64 {
        self.any(id.0)
            .map_or(0, |d| d.tlb_flushes.load(Ordering::Relaxed))
    }

    /// The pin word of `granter`'s entry `gref` (Xen-private; for tests and debugging,
    /// like `GNTTABOP_dump_table`).
    pub fn active_pin(&self, granter: DomId, gref: GrantRef) -> Option<u32> {
        let d = self.any(granter.0)?;
        let t = read(&d.table);
        let a = t.active.get(gref.0 as usize)?;
        let pin = lock(a).pin;
        Some(pin)
    }

    /// Maptrack handles `mapper` holds now.
    pub fn maptrack_in_use(&self, mapper: DomId) -> usize {
        self.any(mapper.0).map_or(0, |d| {
            lock(&d.maptrack)
                .entries
                .iter()
                .filter(|e| e.flags != 0)
                .count()
        })
    }

    /// What `caller`'s live map `handle` reaches, or `None` for a free or unknown
    /// handle: the in-process form of the mapping the map created.
    pub fn mapped_frame(&self, caller: DomId, handle: GrantHandle) -> Option<MappedFrame> {
        let ld = self.any(caller.0)?;
        let e = *lock(&ld.maptrack).entries.get(handle.0 as usize)?;
        if e.flags & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) == 0 {
            return None;
        }
        let rd = self.any(e.domid)?;
        let t = read(&rd.table);
        let a = *lock(t.active.get(e.gref as usize)?);
        Some(MappedFrame {
            granter: DomId(e.domid),
            gpa: a.frame,
            writable: e.flags & GNTMAP_READONLY == 0,
        })
    }

    fn live(&self, id: u16) -> Option<Arc<Domain>> {
        read(&self.domains)
            .get(&id)
            .filter(|d| !d.dying.load(Ordering::SeqCst))
            .cloned()
    }

    fn any(&self, id: u16) -> Option<Arc<Domain>> {
        read(&self.domains).get(&id).cloned()
    }

    /// `rcu_lock_domain_by_any_id`: `DOMID_SELF` is the caller.
    fn by_any_id(&self, id: u16, caller: u16) -> Option<Arc<Domain>> {
        self.live(if id == DOMID_SELF { caller } else { id })
    }

    /// Drops dying domains nobody maps any more.
    fn reap(&self) {
        if !self.any_dying.load(Ordering::SeqCst) {
            return;
        }
        let mut domains = write(&self.domains);
        domains.retain(|_, d| {
            if !d.dying.load(Ordering::SeqCst) {
                return true;
            }
            let t = read(&d.table);
            t.active.iter().any(|a| lock(a).pin != 0)
        });
        let still = domains.values().any(|d| d.dying.load(Ordering::SeqCst));
        self.any_dying.store(still, Ordering::SeqCst);
    }

    /// `GNTTABOP_setup_table`: grows `op.dom`'s table to `op.frame_list.len()` frames
    /// placed at the given GFNs (new frames are zeroed).
    ///
    /// Statuses: `GNTST_bad_domain` (no such domain), `GNTST_permission_denied` (another
    /// domain's table), `GNTST_general_error` (beyond `max_grant_frames`, a changed
    /// existing frame, a wrong number of status frames, a frame used twice),
    /// `GNTST_bad_page` (a frame not in the domain's RAM).
    pub fn setup_table(&self, caller: DomId, op: &mut SetupTable) {
        op.status = match self.setup_table_inner(caller, op) {
            Ok(()) => St::Okay,
            Err(s) => s,
        };
    }

    fn setup_table_inner(&self, caller: DomId, op: &SetupTable) -> Result<(), St> {
        let d = self.by_any_id(op.dom.0, caller.0).ok_or(St::BadDomain)?;
        if d.id != caller.0 {
            return Err(St::PermissionDenied);
        }
        let nr = op.frame_list.len() as u32;
        // "Xen only supports up to %d grant-table frames per domain"
        if op.frame_list.len() > d.config.max_grant_frames as usize {
            return Err(St::GeneralError);
        }
        let mut t = write(&d.table);
        if t.version == 1 && !op.status_frame_list.is_empty() {
            return Err(St::GeneralError);
        }
        if t.version == 2 && op.status_frame_list.len() != status_frames_for(nr) as usize {
            return Err(St::GeneralError);
        }
        let mut frames = Vec::with_capacity(op.frame_list.len());
        for g in &op.frame_list {
            frames.push(paged_frame(&d, g.0)?);
        }
        let mut status = Vec::with_capacity(op.status_frame_list.len());
        for g in &op.status_frame_list {
            status.push(paged_frame(&d, g.0)?);
        }
        if frames.len() < t.frames.len() {
            // The table never shrinks; a smaller request is answered with what is there.
            return Ok(());
        }
        if frames[..t.frames.len()] != t.frames[..]
            || status[..t.status.len().min(status.len())]
                != t.status[..t.status.len().min(status.len())]
        {
            return Err(St::GeneralError);
        }
        let mut all: Vec<u64> = frames.iter().chain(status.iter()).copied().collect();
        all.sort_unstable();
        if all.windows(2).any(|w| w[0] == w[1]) {
            return Err(St::GeneralError);
        }
        for &gpa in frames[t.frames.len()..]
            .iter()
            .chain(status[t.status.len()..].iter())
        {
            mem::zero_page(&d.mem, gpa).ok_or(St::BadPage)?;
        }
        t.frames = frames;
        t.status = status;
        let n = t.nr_entries() as usize;
        while t.active.len() < n {
            t.active.push(Mutex::new(Active::default()));
        }
        Ok(())
    }

    /// `GNTTABOP_query_size`.
    pub fn query_size(&self, caller: DomId, op: &mut QuerySize) {
        let Some(c) = self.live(caller.0) else {
            op.status = St::BadDomain;
            return;
        };
        let Some(d) = self.by_any_id(op.dom.0, caller.0) else {
            op.status = St::BadDomain;
            return;
        };
        if d.id != caller.0 && !c.config.privileged {
            op.status = St::PermissionDenied;
            return;
        }
        op.nr_frames = read(&d.table).frames.len() as u32;
        op.max_nr_frames = d.config.max_grant_frames;
        op.status = St::Okay;
    }

    /// `GNTTABOP_get_status_frames` (v2): the status frames of `caller`'s table.
    ///
    /// # Errors
    /// [`GrantError::NoDomain`]; an empty list for a v1 table.
    pub fn get_status_frames(&self, caller: DomId) -> Result<Vec<Gfn>, GrantError> {
        let d = self.live(caller.0).ok_or(GrantError::NoDomain(caller))?;
        let t = read(&d.table);
        Ok(t.status.iter().map(|g| Gfn(g / PAGE_SIZE)).collect())
    }

    /// `GNTTABOP_set_version` for `caller`'s own table (see the module docs).
    ///
    /// # Errors
    /// [`GrantError::BadVersion`], [`GrantError::VersionInUse`], [`GrantError::NoDomain`].
    pub fn set_version(&self, caller: DomId, version: u32) -> Result<(), GrantError> {
        let d = self.live(caller.0).ok_or(GrantError::NoDomain(caller))?;
        if !(1..=2).contains(&version) || version > d.config.max_grant_version {
            return Err(GrantError::BadVersion {
                version,
                max: d.config.max_grant_version,
            });
        }
        let mut t = write(&d.table);
        if t.version == version {
            return Ok(());
        }
        if t.active.iter().any(|a| lock(a).pin != 0) {
            return Err(GrantError::VersionInUse(caller));
        }
        t.version = version;
        t.frames.clear();
        t.status.clear();
        t.active.clear();
        Ok(())
    }

    /// `GNTTABOP_map_grant_ref`, one status per operation.
    pub fn map_grant_ref(&self, caller: Caller, ops: &mut [MapGrantRef]) {
        let Some(ld) = self.live(caller.domain.0) else {
            for op in ops {
                op.status = St::BadDomain;
            }
            return;
        };
        for op in ops {
            self.map_one(&ld, caller.vcpu, op);
        }
    }

    fn map_one(&self, ld: &Domain, vcpu: u32, op: &mut MapGrantRef) {
        op.handle = GrantHandle(0);
        op.dev_bus_addr = 0;
        let ro = op.flags & GNTMAP_READONLY != 0;
        let mut incr = 0;
        if op.flags & GNTMAP_DEVICE_MAP != 0 {
            incr += if ro { GNTPIN_DEVR_INC } else { GNTPIN_DEVW_INC };
        }
        if op.flags & GNTMAP_HOST_MAP != 0 {
            incr += if ro { GNTPIN_HSTR_INC } else { GNTPIN_HSTW_INC };
        }
        // map_grant_ref: "Bad flags in grant map op"
        if incr == 0 {
            op.status = St::BadGntref;
            return;
        }
        // map_grant_ref: "No device mapping in HVM domain"
        if ld.config.auto_translated
            && op.flags & (GNTMAP_DEVICE_MAP | GNTMAP_APPLICATION_MAP | GNTMAP_CONTAINS_PTE) != 0
        {
            op.status = St::GeneralError;
            return;
        }
        // map_grant_ref: "Could not find domain"
        let Some(rd) = self.live(op.dom.0) else {
            op.status = St::BadDomain;
            return;
        };
        // map_grant_ref: "Failed to obtain maptrack handle"
        let Some(handle) = lock(&ld.maptrack).get(vcpu) else {
            op.status = St::NoSpace;
            return;
        };
        match self.pin_for_map(ld, &rd, op.gref.0, incr, ro) {
            Ok(frame) => {
                let mut mt = lock(&ld.maptrack);
                if let Some(e) = mt.entries.get_mut(handle as usize) {
                    e.domid = rd.id;
                    e.gref = op.gref.0;
                    e.host_addr = op.host_addr;
                    e.dev_bus_addr = frame;
                    e.flags = op.flags;
                }
                op.dev_bus_addr = frame;
                op.handle = GrantHandle(handle);
                op.status = St::Okay;
            }
            Err(s) => {
                lock(&ld.maptrack).put(handle);
                op.status = s;
            }
        }
    }

    /// The granter half of `map_grant_ref`: checks and pins entry `r`; the frame's GPA.
    fn pin_for_map(
        &self,
        ld: &Domain,
        rd: &Domain,
        r: u32,
        incr: u32,
        ro: bool,
    ) -> Result<u64, St> {
        let t = read(&rd.table);
        // map_grant_ref: "Bad ref"
        if r >= t.nr_entries() {
            return Err(St::BadGntref);
        }
        let Some(slot) = t.active.get(r as usize) else {
            return Err(St::BadGntref);
        };
        let mut act = lock(slot);
        // map_grant_ref: "Bad domain, or risk of counter overflow, or subpage"
        if act.pin != 0
            && (act.domid != ld.id || act.pin & pin_overflow_mask(incr) != 0 || act.is_sub_page)
        {
            return Err(St::GeneralError);
        }
        let writers = GNTPIN_HSTW_MASK | GNTPIN_DEVW_MASK;
        if act.pin == 0 || (!ro && act.pin & writers == 0) {
            // _set_status_v1/_v2: type, domid, read-only, cmpxchg stability.
            set_status(rd, &t, r, act.pin != 0, ro, true, ld.id)?;
            if act.pin == 0 {
                let e = t.entry_gpa(r);
                let gfn = if t.version == 1 {
                    mem::load32(&rd.mem, e + 4, Ordering::Acquire).map(u64::from)
                } else {
                    mem::load64(&rd.mem, e + 8, Ordering::Acquire)
                };
                let frame = match gfn.ok_or(St::GeneralError).and_then(|g| paged_frame(rd, g)) {
                    Ok(f) => f,
                    Err(s) => {
                        reduce_status_for_pin(&rd.mem, t.status_gpa(r), act.pin, ro);
                        return Err(s);
                    }
                };
                *act = Active {
                    pin: 0,
                    domid: ld.id,
                    frame,
                    frame_owner: rd.id,
                    start: 0,
                    length: PAGE_SIZE as u16,
                    is_sub_page: false,
                    trans: None,
                };
            }
        }
        act.pin += incr;
        Ok(act.frame)
    }

    /// Drops the pins a mapping with `flags` holds on `rd`'s entry `r`, and the status
    /// bits they no longer justify (`unmap_common_complete`).
    fn unpin_mapping(&self, rd: &Domain, r: u32, flags: u32, _mapper: u16) {
        let t = read(&rd.table);
        let Some(slot) = t.active.get(r as usize) else {
            return;
        };
        let mut act = lock(slot);
        let ro = flags & GNTMAP_READONLY != 0;
        if flags & GNTMAP_DEVICE_MAP != 0 {
            act.pin = act
                .pin
                .saturating_sub(if ro { GNTPIN_DEVR_INC } else { GNTPIN_DEVW_INC });
        }
        if flags & GNTMAP_HOST_MAP != 0 {
            act.pin = act
                .pin
                .saturating_sub(if ro { GNTPIN_HSTR_INC } else { GNTPIN_HSTW_INC });
        }
        reduce_status_for_pin(&rd.mem, t.status_gpa(r), act.pin, ro);
    }

    /// `GNTTABOP_unmap_grant_ref`: in chunks of [`UNMAP_BATCH_SIZE`], each followed by
    /// one TLB flush before the chunk's pins drop, so no stale mapping outlives the
    /// batch.
    pub fn unmap_grant_ref(&self, caller: Caller, ops: &mut [UnmapGrantRef]) {
        let Some(ld) = self.any(caller.domain.0) else {
            for op in ops {
                op.status = St::BadDomain;
            }
            return;
        };
        for chunk in ops.chunks_mut(UNMAP_BATCH_SIZE) {
            let mut done: Vec<(Arc<Domain>, u32, u32)> = Vec::with_capacity(chunk.len());
            for op in chunk.iter_mut() {
                op.status = match self.unmap_one(&ld, op) {
                    Ok(Some(d)) => {
                        done.push(d);
                        St::Okay
                    }
                    Ok(None) => St::Okay,
                    Err(s) => s,
                };
            }
            ld.tlb_flushes.fetch_add(1, Ordering::Relaxed);
            for (rd, r, flags) in done {
                self.unpin_mapping(&rd, r, flags, ld.id);
            }
        }
        self.reap();
    }

    /// `unmap_common`: what to unpin (granter, ref, `GNTMAP_*` removed), if anything.
    fn unmap_one(
        &self,
        ld: &Domain,
        op: &UnmapGrantRef,
    ) -> Result<Option<(Arc<Domain>, u32, u32)>, St> {
        let mut mt = lock(&ld.maptrack);
        let Some(e) = mt.entries.get_mut(op.handle.0 as usize) else {
            return Err(St::BadHandle); // "Bad handle"
        };
        if e.flags == 0 {
            return Err(St::BadHandle); // "Zero flags for handle"
        }
        let rd = self.any(e.domid).ok_or(St::BadDomain)?;
        if op.dev_bus_addr != 0
            && e.flags & GNTMAP_DEVICE_MAP != 0
            && op.dev_bus_addr != e.dev_bus_addr
        {
            return Err(St::BadDevAddr); // "Bus address doesn't match gntref"
        }
        let mut removed = 0;
        if op.host_addr != 0 && e.flags & GNTMAP_HOST_MAP != 0 {
            // replace_grant_host_mapping finds no such mapping at host_addr.
            if op.host_addr != e.host_addr {
                return Err(St::GeneralError);
            }
            e.flags &= !GNTMAP_HOST_MAP;
            removed |= GNTMAP_HOST_MAP;
        }
        if op.dev_bus_addr != 0 && e.flags & GNTMAP_DEVICE_MAP != 0 {
            e.flags &= !GNTMAP_DEVICE_MAP;
            removed |= GNTMAP_DEVICE_MAP;
        }
        let gref = e.gref;
        removed |= e.flags & GNTMAP_READONLY;
        if e.flags & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) == 0 {
            mt.put(op.handle.0);
        }
        if removed & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) == 0 {
            return Ok(None);
        }
        Ok(Some((rd, gref, removed)))
    }
}
