//! The hypervisor's side of grant tables: [`Xen`] holds the domains, each with its
//! grant table (shared entries in frames of the domain's own RAM, plus Xen-private
//! active entries with the four pin counts) and its maptrack (the handles of the
//! mappings it holds of other domains' grants), and performs `GNTTABOP_*` operations
//! with Xen's checks, in Xen's order, answering each operation of a batch with its own
//! [`GrantStatus`] (xen/common/grant_table.c; operations as declared in
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

use crate::abi::*;
use crate::mem;
use crate::{DomId, Gfn, GrantHandle, GrantRef, Mem};
use dma_types::{lock, read, write};
use std::collections::BTreeMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Why a domain-level call (not a batched grant operation) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A domain with this id exists already.
    #[error("domain {0} exists already")]
    DomainExists(DomId),
    /// No live domain has this id.
    #[error("no live domain {0}")]
    NoDomain(DomId),
    /// The domain id is reserved (`DOMID_FIRST_RESERVED` 0x7ff0 and above).
    #[error("domain id {0} is reserved (0x7ff0 and above)")]
    ReservedDomainId(DomId),
    /// A configuration value is outside what Xen accepts.
    #[error("domain configuration: {0}")]
    BadConfig(&'static str),
    /// `set_version` with a version other than 1 or 2, or above the domain's maximum.
    #[error("grant table version {version} is not allowed (maximum {max})")]
    BadVersion {
        /// Requested.
        version: u32,
        /// The domain's `max_grant_version`.
        max: u32,
    },
    /// `set_version` while an entry of the table is pinned.
    #[error("grant table of {0} has entries in use; its version cannot change")]
    VersionInUse(DomId),
}

/// How a domain is built (`xl.cfg` `max_grant_frames`, `max_maptrack_frames`,
/// `max_grant_version`; Xen cmdline `gnttab=transitive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Most grant frames the domain's table may have (default 64).
    pub max_grant_frames: u32,
    /// Most maptrack frames the domain may use as a mapper (default 1024).
    pub max_maptrack_frames: u32,
    /// Highest grant table version the domain may select (default 2, as x86 HVM).
    pub max_grant_version: u32,
    /// vCPUs: one maptrack free list each (default 1).
    pub vcpus: u32,
    /// An auto-translated (HVM/PVH) domain: it may not ask for `GNTMAP_device_map`,
    /// `GNTMAP_application_map` or `GNTMAP_contains_pte` (default true).
    pub auto_translated: bool,
    /// Whether copies through this domain's transitive grants are allowed
    /// (`gnttab=transitive`, default true on x86).
    pub transitive: bool,
    /// A privileged domain may query other domains' tables.
    pub privileged: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            max_grant_frames: DEFAULT_MAX_GRANT_FRAMES,
            max_maptrack_frames: DEFAULT_MAX_MAPTRACK_FRAMES,
            max_grant_version: 2,
            vcpus: 1,
            auto_translated: true,
            transitive: true,
            privileged: false,
        }
    }
}

/// Who issues an operation: a domain, on one of its vCPUs (maptrack handles come from
/// per-vCPU free lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The calling domain.
    pub domain: DomId,
    /// The calling vCPU (taken modulo the domain's vCPU count).
    pub vcpu: u32,
}

impl Caller {
    /// `domain` on vCPU 0.
    pub fn new(domain: DomId) -> Self {
        Self { domain, vcpu: 0 }
    }

    /// The same domain on `vcpu`.
    pub fn on_vcpu(self, vcpu: u32) -> Self {
        Self { vcpu, ..self }
    }
}

/// `GNTTABOP_setup_table`, with the frames supplied by the guest (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupTable {
    /// IN: the domain (`DOMID_SELF` or the caller's id).
    pub dom: DomId,
    /// IN: GFNs of the grant frames, in order; its length is `nr_frames`. Frames the
    /// table already has must be repeated at their positions; the table only grows.
    pub frame_list: Vec<Gfn>,
    /// IN (v2 only): GFNs of the status frames, `status_frames_for(nr_frames)` of them,
    /// existing ones repeated likewise; empty for v1.
    pub status_frame_list: Vec<Gfn>,
    /// OUT.
    pub status: GrantStatus,
}

/// `GNTTABOP_query_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuerySize {
    /// IN: the domain (`DOMID_SELF`, the caller, or any for a privileged caller).
    pub dom: DomId,
    /// OUT: current grant frames.
    pub nr_frames: u32,
    /// OUT: the domain's limit.
    pub max_nr_frames: u32,
    /// OUT.
    pub status: GrantStatus,
}

/// `struct gnttab_map_grant_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapGrantRef {
    /// IN: where the mapper wants the page (recorded; must match on unmap).
    pub host_addr: u64,
    /// IN: `GNTMAP_*`.
    pub flags: u32,
    /// IN: the granter's reference.
    pub gref: GrantRef,
    /// IN: the granting domain.
    pub dom: DomId,
    /// OUT.
    pub status: GrantStatus,
    /// OUT: maptrack handle for the unmap.
    pub handle: GrantHandle,
    /// OUT: the frame's bus address (here the granter's guest-physical address).
    pub dev_bus_addr: u64,
}

impl MapGrantRef {
    /// A map request; outputs start as `GNTST_general_error`, handle 0, address 0.
    pub fn new(dom: DomId, gref: GrantRef, flags: u32, host_addr: u64) -> Self {
        Self {
            host_addr,
            flags,
            gref,
            dom,
            status: GrantStatus::GeneralError,
            handle: GrantHandle(0),
            dev_bus_addr: 0,
        }
    }
}

/// `struct gnttab_unmap_grant_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapGrantRef {
    /// IN: the host mapping to remove (0: leave it).
    pub host_addr: u64,
    /// IN: the device mapping to remove (0: leave it).
    pub dev_bus_addr: u64,
    /// IN: the handle the map returned.
    pub handle: GrantHandle,
    /// OUT.
    pub status: GrantStatus,
}

impl UnmapGrantRef {
    /// An unmap request.
    pub fn new(handle: GrantHandle, host_addr: u64, dev_bus_addr: u64) -> Self {
        Self {
            host_addr,
            dev_bus_addr,
            handle,
            status: GrantStatus::GeneralError,
        }
    }
}

/// `struct gnttab_copy_ptr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPtr {
    /// A grant reference (with the matching `GNTCOPY_*_gref` flag) or a GFN of the
    /// caller's own RAM.
    pub u: u64,
    /// The domain (`DOMID_SELF` for a local frame).
    pub domid: DomId,
    /// Byte offset in the page.
    pub offset: u16,
}

impl CopyPtr {
    /// Byte `offset` of the page granted by `domid`'s `gref`.
    pub fn gref(domid: DomId, gref: GrantRef, offset: u16) -> Self {
        Self {
            u: u64::from(gref.0),
            domid,
            offset,
        }
    }

    /// Byte `offset` of the caller's own frame `gfn`.
    pub fn local(gfn: Gfn, offset: u16) -> Self {
        Self {
            u: gfn.0,
            domid: DomId(DOMID_SELF),
            offset,
        }
    }
}

/// `struct gnttab_copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantCopy {
    /// IN.
    pub source: CopyPtr,
    /// IN.
    pub dest: CopyPtr,
    /// IN: bytes (a `u16`: one operation never exceeds a page).
    pub len: u16,
    /// IN: `GNTCOPY_*`.
    pub flags: u16,
    /// OUT.
    pub status: GrantStatus,
}

impl GrantCopy {
    /// A copy request; `flags` are derived from which side is a grant.
    pub fn new(
        source: CopyPtr,
        source_gref: bool,
        dest: CopyPtr,
        dest_gref: bool,
        len: u16,
    ) -> Self {
        let mut flags = 0;
        if source_gref {
            flags |= GNTCOPY_SOURCE_GREF;
        }
        if dest_gref {
            flags |= GNTCOPY_DEST_GREF;
        }
        Self {
            source,
            dest,
            len,
            flags,
            status: GrantStatus::GeneralError,
        }
    }
}

/// What a live map handle reaches ([`Xen::mapped_frame`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedFrame {
    /// The granting domain.
    pub granter: DomId,
    /// The granted frame's guest-physical address in the granter's RAM.
    pub gpa: u64,
    /// Whether the mapping is writable.
    pub writable: bool,
}

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

type St = GrantStatus;

/// `_set_status_v1`: a bounded compare-and-swap loop on `{flags, domid}` that checks
/// type and domid (when not yet pinned) and sets `GTF_reading` (and `GTF_writing`).
fn set_status_v1(
    m: &Mem,
    hdr: u64,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldom: u16,
) -> Result<(), St> {
    let mask = GTF_TYPE_MASK | if mapflag { GTF_SUB_PAGE } else { 0 };
    mem::with_atomic::<std::sync::atomic::AtomicU32, _>(m, hdr, |a| {
        let mut scombo = a.load(Ordering::SeqCst);
        let mut retries = 0;
        loop {
            let flags = scombo as u16;
            let domid = (scombo >> 16) as u16;
            // "If not already pinned, check the grant domid and type."
            if !pinned && ((flags & mask) != GTF_PERMIT_ACCESS || domid != ldom) {
                return Err(St::GeneralError);
            }
            let mut new = flags | GTF_READING;
            if !readonly {
                new |= GTF_WRITING;
                // "Attempt to write-pin a r/o grant entry"
                if flags & GTF_READONLY != 0 {
                    return Err(St::GeneralError);
                }
            }
            let newc = (scombo & 0xffff_0000) | u32::from(new);
            match a.compare_exchange(scombo, newc, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(()),
                Err(prev) => {
                    // "Shared grant entry is unstable": five attempts, then give up.
                    if retries == 4 {
                        return Err(St::GeneralError);
                    }
                    retries += 1;
                    scombo = prev;
                }
            }
        }
    })
    .unwrap_or(Err(St::GeneralError))
}

/// `_set_status_v2`: set the status bits, full fence, re-read the entry; if it changed
/// underneath, clear the bits again and fail ("Unstable flags").
#[allow(clippy::too_many_arguments)] // Xen's own signature
fn set_status_v2(
    m: &Mem,
    hdr: u64,
    status: u64,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldom: u16,
) -> Result<(), St> {
    let mask = GTF_TYPE_MASK | if mapflag { GTF_SUB_PAGE } else { 0 };
    let bad = |c: u32| {
        let (flags, domid) = (c as u16, (c >> 16) as u16);
        ((flags & mask) != GTF_PERMIT_ACCESS && (mapflag || (flags & mask) != GTF_TRANSITIVE))
            || domid != ldom
    };
    let c = mem::load32(m, hdr, Ordering::SeqCst).ok_or(St::GeneralError)?;
    if !pinned && bad(c) {
        return Err(St::GeneralError);
    }
    if readonly {
        mem::set16(m, status, GTF_READING).ok_or(St::GeneralError)?;
    } else {
        if c as u16 & GTF_READONLY != 0 {
            return Err(St::GeneralError);
        }
        mem::set16(m, status, GTF_READING | GTF_WRITING).ok_or(St::GeneralError)?;
    }
    // "Make sure guest sees status update before checking if flags are still valid"
    fence(Ordering::SeqCst);
    let c = mem::load32(m, hdr, Ordering::SeqCst).ok_or(St::GeneralError)?;
    if !pinned {
        if bad(c) || (!readonly && c as u16 & GTF_READONLY != 0) {
            let _ = mem::clear16(m, status, GTF_WRITING | GTF_READING);
            return Err(St::GeneralError);
        }
    } else if c as u16 & GTF_READONLY != 0 {
        let _ = mem::clear16(m, status, GTF_WRITING);
        return Err(St::GeneralError);
    }
    Ok(())
}

fn set_status(
    d: &Domain,
    t: &Table,
    r: u32,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldom: u16,
) -> Result<(), St> {
    if t.version == 1 {
        set_status_v1(&d.mem, t.entry_gpa(r), pinned, readonly, mapflag, ldom)
    } else {
        set_status_v2(
            &d.mem,
            t.entry_gpa(r),
            t.status_gpa(r),
            pinned,
            readonly,
            mapflag,
            ldom,
        )
    }
}

/// `reduce_status_for_pin`: drop `GTF_reading` from the status word at `status_gpa`
/// when nothing is pinned any more (`pin` is the entry's pin count now) and
/// `GTF_writing` when no writable pin is left (for a writable use).
fn reduce_status_for_pin(m: &Mem, status_gpa: u64, pin: u32, readonly: bool) {
    let mut clear = if pin == 0 { GTF_READING } else { 0 };
    if !readonly && pin & (GNTPIN_HSTW_MASK | GNTPIN_DEVW_MASK) == 0 {
        clear |= GTF_WRITING;
    }
    if clear != 0 {
        let _ = mem::clear16(m, status_gpa, clear);
    }
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

/// A grant acquired for one copy (`struct gnttab_copy_buf`).
struct CopyBuf {
    owner: Arc<Domain>,
    gpa: u64,
    off: u16,
    len: u16,
    /// Held grant to release: (granting domain, ref, readonly).
    grant: Option<(Arc<Domain>, u32, bool)>,
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

    /// `GNTTABOP_copy`, one status per operation.
    pub fn copy(&self, caller: Caller, ops: &mut [GrantCopy]) {
        for op in ops {
            op.status = match self.copy_one(caller.domain.0, op) {
                Ok(()) => St::Okay,
                Err(s) => s,
            };
        }
    }

    fn copy_one(&self, ldom: u16, op: &GrantCopy) -> Result<(), St> {
        let src_gref = op.flags & GNTCOPY_SOURCE_GREF != 0;
        let dst_gref = op.flags & GNTCOPY_DEST_GREF != 0;
        // gnttab_copy_lock_domain: "Only DOMID_SELF may reference via frame."
        let lock_dom = |p: &CopyPtr, is_gref: bool| -> Result<Arc<Domain>, St> {
            if p.domid.0 != DOMID_SELF && !is_gref {
                return Err(St::PermissionDenied);
            }
            self.by_any_id(p.domid.0, ldom).ok_or(St::BadDomain)
        };
        let sd = lock_dom(&op.source, src_gref)?;
        let dd = lock_dom(&op.dest, dst_gref)?;
        let src = self.claim(&sd, &op.source, src_gref, true, ldom)?;
        let dst = match self.claim(&dd, &op.dest, dst_gref, false, ldom) {
            Ok(d) => d,
            Err(s) => {
                self.release_buf(src);
                return Err(s);
            }
        };
        let r = Self::copy_buf(op, &src, &dst);
        self.release_buf(src);
        self.release_buf(dst);
        r
    }

    /// `gnttab_copy_buf`: the page bounds, then the (sub-page) grant window.
    fn copy_buf(op: &GrantCopy, src: &CopyBuf, dst: &CopyBuf) -> Result<(), St> {
        let len = u32::from(op.len);
        // "copy beyond page area"
        if u32::from(op.source.offset) + len > PAGE_SIZE as u32
            || u32::from(op.dest.offset) + len > PAGE_SIZE as u32
        {
            return Err(St::BadCopyArg);
        }
        // "copy source out of bounds" / "copy dest out of bounds"
        let inside = |p: &CopyPtr, b: &CopyBuf| {
            p.offset >= b.off && u32::from(p.offset) + len <= u32::from(b.off) + u32::from(b.len)
        };
        if !inside(&op.source, src) || !inside(&op.dest, dst) {
            return Err(St::GeneralError);
        }
        mem::copy(
            &src.owner.mem,
            src.gpa + u64::from(op.source.offset),
            &dst.owner.mem,
            dst.gpa + u64::from(op.dest.offset),
            op.len as usize,
        )
        .ok_or(St::GeneralError)
    }

    /// `gnttab_copy_claim_buf`.
    fn claim(
        &self,
        d: &Arc<Domain>,
        p: &CopyPtr,
        is_gref: bool,
        readonly: bool,
        ldom: u16,
    ) -> Result<CopyBuf, St> {
        if is_gref {
            let r = u32::try_from(p.u).map_err(|_| St::BadGntref)?;
            let allow = d.config.transitive;
            // Xen restarts the operation when a transitive grant changed while its
            // locks were dropped; a few tries, then GNTST_eagain.
            let mut tries = 0;
            loop {
                match self.acquire_for_copy(d, r, ldom, readonly, allow) {
                    Err(St::Eagain) if tries < 4 => tries += 1,
                    other => return other,
                }
            }
        } else {
            let gpa = paged_frame(d, p.u)?;
            Ok(CopyBuf {
                owner: d.clone(),
                gpa,
                off: 0,
                len: PAGE_SIZE as u16,
                grant: None,
            })
        }
    }

    /// `acquire_grant_for_copy`: pins `rd`'s entry `r` for a copy by `ldom` (host
    /// read or write pin), following a transitive grant one level at most.
    fn acquire_for_copy(
        &self,
        rd: &Arc<Domain>,
        r: u32,
        ldom: u16,
        ro: bool,
        allow_transitive: bool,
    ) -> Result<CopyBuf, St> {
        let incr = if ro { GNTPIN_HSTR_INC } else { GNTPIN_HSTW_INC };
        let writers = GNTPIN_HSTW_MASK | GNTPIN_DEVW_MASK;
        let t = read(&rd.table);
        if r >= t.nr_entries() {
            return Err(St::BadGntref); // "Bad grant reference"
        }
        let Some(slot) = t.active.get(r as usize) else {
            return Err(St::BadGntref);
        };
        let mut act = lock(slot);
        if act.pin != 0 && (act.domid != ldom || act.pin & pin_overflow_mask(incr) != 0) {
            return Err(St::GeneralError);
        }
        let old_pin = act.pin;
        let e = t.entry_gpa(r);
        let hdr_flags = mem::load16(&rd.mem, e, Ordering::Acquire).ok_or(St::GeneralError)?;
        let status_gpa = t.status_gpa(r);
        let clear_out = |act: &Active| reduce_status_for_pin(&rd.mem, status_gpa, act.pin, ro);
        if t.version == 2 && hdr_flags & GTF_TYPE_MASK == GTF_TRANSITIVE {
            if old_pin == 0 || (!ro && old_pin & writers == 0) {
                set_status_v2(&rd.mem, e, status_gpa, old_pin != 0, ro, false, ldom)?;
            }
            if !allow_transitive {
                clear_out(&act);
                return Err(St::GeneralError); // "transitive grant when transitivity not allowed"
            }
            let trans = mem::load16(&rd.mem, e + 4, Ordering::Acquire).zip(mem::load32(
                &rd.mem,
                e + 8,
                Ordering::Acquire,
            ));
            let Some((trans_domid, trans_gref)) = trans else {
                clear_out(&act);
                return Err(St::GeneralError);
            };
            if trans_domid == rd.id {
                clear_out(&act);
                return Err(St::GeneralError); // "transitive grants cannot be self-referential"
            }
            let Some(td) = self.live(trans_domid) else {
                clear_out(&act);
                return Err(St::GeneralError); // "transitive grant referenced bad domain"
            };
            // As Xen: drop our locks for the nested acquire (two transitive grants
            // pointing at each other must not deadlock), then check nothing changed.
            drop(act);
            drop(t);
            let inner = self.acquire_for_copy(&td, trans_gref, rd.id, ro, false);
            let t = read(&rd.table);
            let Some(slot) = t.active.get(r as usize) else {
                if let Ok(b) = inner {
                    self.release_buf(b);
                }
                return Err(St::Eagain);
            };
            let mut act = lock(slot);
            // The table may have changed while unlocked: its status word now.
            let clear_out =
                |act: &Active| reduce_status_for_pin(&rd.mem, t.status_gpa(r), act.pin, ro);
            let inner = match inner {
                Ok(b) => b,
                Err(s) => {
                    clear_out(&act);
                    return Err(s);
                }
            };
            let changed = t.version != 2
                || act.pin != old_pin
                || (old_pin != 0
                    && (act.domid != ldom
                        || act.frame != inner.gpa
                        || act.trans != Some((td.id, trans_gref))));
            if changed {
                drop(act);
                drop(t);
                self.release_buf(inner);
                return Err(St::Eagain);
            }
            if old_pin == 0 {
                *act = Active {
                    pin: 0,
                    domid: ldom,
                    frame: inner.gpa,
                    frame_owner: td.id,
                    start: inner.off,
                    length: inner.len,
                    // Always treated as sub-page: that blocks mapping a transitive grant.
                    is_sub_page: true,
                    trans: Some((td.id, trans_gref)),
                };
            }
            act.pin += incr;
            // The nested grant stays acquired; `release_for_copy` follows `trans`.
            return Ok(CopyBuf {
                owner: td.clone(),
                gpa: act.frame,
                off: act.start,
                len: act.length,
                grant: Some((rd.clone(), r, ro)),
            });
        }
        if old_pin == 0 || (!ro && old_pin & writers == 0) {
            set_status(rd, &t, r, old_pin != 0, ro, false, ldom)?;
            let (gfn, sub) = if t.version == 1 {
                (
                    mem::load32(&rd.mem, e + 4, Ordering::Acquire).map(u64::from),
                    None,
                )
            } else if hdr_flags & GTF_SUB_PAGE == 0 {
                (mem::load64(&rd.mem, e + 8, Ordering::Acquire), None)
            } else {
                let off = mem::load16(&rd.mem, e + 4, Ordering::Acquire);
                let len = mem::load16(&rd.mem, e + 6, Ordering::Acquire);
                (mem::load64(&rd.mem, e + 8, Ordering::Acquire), off.zip(len))
            };
            let frame = match gfn.ok_or(St::GeneralError).and_then(|g| paged_frame(rd, g)) {
                Ok(f) => f,
                Err(s) => {
                    clear_out(&act);
                    return Err(s);
                }
            };
            if act.pin == 0 {
                let (start, length) = sub.unwrap_or((0, PAGE_SIZE as u16));
                *act = Active {
                    pin: 0,
                    domid: ldom,
                    frame,
                    frame_owner: rd.id,
                    start,
                    length,
                    is_sub_page: sub.is_some(),
                    trans: None,
                };
            }
        }
        act.pin += incr;
        let owner = if act.frame_owner == rd.id {
            rd.clone()
        } else {
            self.any(act.frame_owner).ok_or(St::BadDomain)?
        };
        Ok(CopyBuf {
            owner,
            gpa: act.frame,
            off: act.start,
            len: act.length,
            grant: Some((rd.clone(), r, ro)),
        })
    }

    fn release_buf(&self, b: CopyBuf) {
        if let Some((rd, r, ro)) = b.grant {
            self.release_for_copy(&rd, r, ro);
        }
    }

    /// `release_grant_for_copy`, and the nested grant of a transitive one.
    fn release_for_copy(&self, rd: &Domain, r: u32, ro: bool) {
        let trans = {
            let t = read(&rd.table);
            let Some(slot) = t.active.get(r as usize) else {
                return;
            };
            let mut act = lock(slot);
            act.pin = act
                .pin
                .saturating_sub(if ro { GNTPIN_HSTR_INC } else { GNTPIN_HSTW_INC });
            reduce_status_for_pin(&rd.mem, t.status_gpa(r), act.pin, ro);
            if t.version == 2 {
                act.trans
            } else {
                None
            }
        };
        if let Some((td, tr)) = trans {
            if let Some(td) = self.any(td) {
                self.release_for_copy(&td, tr, ro);
            }
        }
    }
}
