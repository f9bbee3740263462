//! The device side of grant mode: [`GrantIommu`], a `vm_memory::Iommu` for one backend
//! domain serving one granting guest. It translates grant DMA addresses
//! (`1 << 63 | gref << 12 | offset`, consecutive refs for a multi-page buffer) by
//! asking [`Xen`] to map or copy the granted pages, so every access passes Xen's checks:
//! the entry is granted to this backend, is `GTF_permit_access`, and is read-only where
//! granted so. Anything else faults: an address without bit 63, an ungranted or
//! revoked ref, another domain's grant, a write to a read-only grant.
//!
//! A backend written against `vm_memory::GuestMemory` runs unchanged behind
//! `vm_memory::IommuMemory::new(iommu.device_memory()?, iommu, true, ())`.
//!
//! # Modes ([`IommuMode`])
//! - `PerIo`: each granted page is mapped (`GNTTABOP_map_grant_ref`, host map,
//!   read-only unless the access writes) on its first access in a request batch and
//!   unmapped at [`GrantIommu::complete`] in batches of 32 (Xen blkback without
//!   persistent grants).
//! - `Persistent { max }`: each page is mapped on first use and kept, up to `max`
//!   pages (Xen blkback's persistent grants; its default limit is 1056); beyond that,
//!   as `PerIo`. [`GrantIommu::release`] unmaps them.
//! - `Copy`: nothing is mapped; data moves by `GNTTABOP_copy` between the granted
//!   pages and scratch frames of the backend's own RAM (as QEMU's Xen disk backend
//!   does). Reads copy in at translation; writes are first checked with a zero-length
//!   copy, copied in too (so a partial device write cannot clobber the guest's bytes
//!   with stale scratch, the swiotlb rule) and copied out at `complete`.
//!
//! Rings are mapped once for the life of the device ([`GrantIommu::map_ring`]), in
//! every mode, as blkback and QEMU map the shared ring at connect.
//!
//! # Pinning and the invalidation contract
//! `vm_memory::Iommu` returns mappings the consumer may turn into `VolatileSlice`s that
//! outlive the returned guard: `virtio-devices` translates a whole request into slices
//! first and moves data afterwards. Pins released when the guard drops would therefore
//! be released *before* the data moves. So pins are held per batch instead
//! (`virtio_contract`'s "The batch"): from the first translation that needs a page
//! until the batch ends. The carrier calls the [`Batch`] hooks
//! around `process_queue` (`virtio_contract::process_batch`), and the end is
//! [`GrantIommu::complete`] (what blkback does: map the request's segments, do the
//! I/O, unmap them). While pinned, a page cannot be revoked
//! by the guest (its revoke answers "busy"), so no access of the batch can reach a
//! revoked page. `complete` takes the IOTLB's write lock, so it waits for any access
//! still holding a translation; after it returns, nothing of the batch is reachable
//! (one TLB flush per 32 unmaps, in Xen). The device path must call `complete` after
//! each batch; transient pages are bounded ([`MAX_TRANSIENT_PAGES`]) so a device path
//! that never does fails closed instead of pinning without bound.

use crate::abi::*;
use crate::xen::{Caller, CopyPtr, GrantCopy, MapGrantRef, UnmapGrantRef};
use crate::{DomId, Gfn, GrantDmaAddr, GrantHandle, GrantRef, Mem, Xen, GRANT_DMA_ADDR_OFF};
use dma_types::{lock, read, write};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use virtio_contract::Batch;
use vm_memory::iommu::{Error as IommuError, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, Iommu, Permissions,
};

/// Pages a batch may pin (or stage, in copy mode) before [`GrantIommu::complete`].
pub const MAX_TRANSIENT_PAGES: usize = 4096;
/// Linux xen-blkback's default `max_persistent_grants`.
pub const DEFAULT_MAX_PERSISTENT: usize = 1056;
/// In copy mode, where the backend's own RAM appears in the device's address space
/// (2^62: above any guest RAM, below the grant addresses at 2^63).
pub const SCRATCH_WINDOW: u64 = 1 << 62;

/// How data reaches the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuMode {
    /// Map on first access in a batch, unmap at [`GrantIommu::complete`].
    PerIo,
    /// Map once and keep, up to `max` pages.
    Persistent {
        /// Most pages kept mapped.
        max: usize,
    },
    /// `GNTTABOP_copy` through `frames` scratch frames of the backend's RAM from
    /// `scratch`.
    Copy {
        /// First scratch frame (backend RAM).
        scratch: Gfn,
        /// Scratch frames.
        frames: u32,
    },
}

/// Why a [`GrantIommu`] could not be built or could not map a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantIommuError {
    /// A domain is not live.
    #[error("domain {0} is not a live domain")]
    NoDomain(DomId),
    /// Copy-mode scratch frames are not all RAM of the backend.
    #[error("copy-mode scratch frames {first}+{frames} are not RAM of backend {backend}")]
    BadScratch {
        /// First frame.
        first: Gfn,
        /// Frames.
        frames: u32,
        /// The backend.
        backend: DomId,
    },
    /// Guest or backend RAM reaches the copy-mode scratch window.
    #[error("RAM at or above {SCRATCH_WINDOW:#x} leaves no room for the copy-mode scratch window")]
    WindowOverlap,
    /// An address that is not a grant DMA address, or a range that wraps.
    #[error("{addr:#x} + {len:#x} is not a range of grant DMA addresses")]
    NotGrantAddress {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Xen refused to map a ring page.
    #[error("mapping ring page {gref} failed: {status}")]
    Map {
        /// The ref.
        gref: GrantRef,
        /// Xen's status.
        status: GrantStatus,
    },
}

/// Counters of a [`GrantIommu`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Accesses refused.
    pub faults: u64,
    /// Successful `map_grant_ref` operations.
    pub maps: u64,
    /// `unmap_grant_ref` operations.
    pub unmaps: u64,
    /// Successful `GNTTABOP_copy` operations.
    pub copies: u64,
    /// Copy-outs at `complete` that Xen refused (data the device wrote that could
    /// not reach the guest: the grant changed after it was checked).
    pub lost_copies: u64,
    /// Pages mapped persistently now.
    pub persistent_pages: u64,
}

#[derive(Clone, Debug)]
struct PMap {
    gpa: u64,
    writable: bool,
    handles: Vec<(GrantHandle, u64)>,
}

struct CopyPage {
    iova: u64,
    scratch: u64,
    valid: [u64; 64],
    dirty: [u64; 64],
    write_checked: bool,
}

fn bit(b: &[u64; 64], i: u32) -> bool {
    b[(i / 64) as usize] & (1 << (i % 64)) != 0
}
/// Sets bits `[from, to)` (both at most 4096), a word at a time.
fn set_bits(b: &mut [u64; 64], from: u32, to: u32) {
    let mut i = from;
    while i < to {
        let w = (i / 64) as usize;
        let lo = i % 64;
        let hi = (to - (i - lo)).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        b[w] |= mask;
        i += hi - lo;
    }
}
/// Maximal runs `[s, e)` within `[from, to)` where the bit equals `want`, skipping
/// whole words that cannot start or end a run.
fn runs(b: &[u64; 64], from: u32, to: u32, want: bool) -> Vec<(u32, u32)> {
    let skip = if want { 0 } else { u64::MAX };
    let mut out = Vec::new();
    let mut i = from;
    let mut start: Option<u32> = None;
    while i < to {
        let w = b[(i / 64) as usize];
        if i.is_multiple_of(64) && i + 64 <= to && (w == skip || w == !skip) {
            if w == skip {
                if let Some(s) = start.take() {
                    out.push((s, i));
                }
            } else if start.is_none() {
                start = Some(i);
            }
            i += 64;
            continue;
        }
        if bit(b, i) == want {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            out.push((s, i));
        }
        i += 1;
    }
    if let Some(s) = start {
        out.push((s, to));
    }
    out
}

#[derive(Default)]
struct State {
    persistent: HashMap<u32, PMap>,
    persistent_budget_used: usize,
    transient: Vec<(GrantHandle, u64)>,
    transient_pages: HashMap<u32, (u64, bool)>,
    transient_iovas: Vec<u64>,
    copy_pages: HashMap<u32, CopyPage>,
    scratch_free: Vec<u64>,
}

fn perms(writable: bool) -> Permissions {
    if writable {
        Permissions::ReadWrite
    } else {
        Permissions::Read
    }
}

/// The grant address space of one backend domain for one granting guest.
pub struct GrantIommu {
    xen: Arc<Xen>,
    backend: DomId,
    granter: DomId,
    mode: IommuMode,
    iotlb: RwLock<Iotlb>,
    state: Mutex<State>,
    faults: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    copies: AtomicU64,
    lost_copies: AtomicU64,
    last_fault: Mutex<Option<(u64, GrantStatus)>>,
}

impl std::fmt::Debug for GrantIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantIommu")
            .field("backend", &self.backend)
            .field("granter", &self.granter)
            .field("mode", &self.mode)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl GrantIommu {
    /// The address space in which `backend` reaches `granter`'s grants.
    ///
    /// # Errors
    /// [`GrantIommuError::NoDomain`]; for copy mode [`GrantIommuError::BadScratch`] or
    /// [`GrantIommuError::WindowOverlap`].
    pub fn new(
        xen: Arc<Xen>,
        backend: DomId,
        granter: DomId,
        mode: IommuMode,
    ) -> Result<Self, GrantIommuError> {
        for d in [backend, granter] {
            if !xen.domain_is_live(d) {
                return Err(GrantIommuError::NoDomain(d));
            }
        }
        let mut st = State::default();
        if let IommuMode::Copy { scratch, frames } = mode {
            let bad = GrantIommuError::BadScratch {
                first: scratch,
                frames,
                backend,
            };
            let bmem = xen
                .domain_memory(backend)
                .ok_or(GrantIommuError::NoDomain(backend))?;
            for i in 0..frames {
                let gpa = scratch
                    .0
                    .checked_add(u64::from(i))
                    .and_then(|g| g.checked_mul(PAGE_SIZE))
                    .ok_or(bad.clone())?;
                if !crate::mem::is_ram_page(&bmem, gpa) {
                    return Err(bad);
                }
                if gpa >= SCRATCH_WINDOW - PAGE_SIZE {
                    return Err(GrantIommuError::WindowOverlap);
                }
                st.scratch_free.push(gpa);
            }
            st.scratch_free.reverse();
        }
        Ok(Self {
            xen,
            backend,
            granter,
            mode,
            iotlb: RwLock::new(Iotlb::new()),
            state: Mutex::new(st),
            faults: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            lost_copies: AtomicU64::new(0),
            last_fault: Mutex::new(None),
        })
    }

    /// The memory to put behind this IOMMU in `IommuMemory`: the granter's RAM (where
    /// mapped frames are), plus in copy mode the backend's RAM at [`SCRATCH_WINDOW`].
    ///
    /// # Errors
    /// [`GrantIommuError::NoDomain`], [`GrantIommuError::WindowOverlap`].
    pub fn device_memory(&self) -> Result<Mem, GrantIommuError> {
        let g = self
            .xen
            .domain_memory(self.granter)
            .ok_or(GrantIommuError::NoDomain(self.granter))?;
        if !matches!(self.mode, IommuMode::Copy { .. }) {
            return Ok(g);
        }
        let b = self
            .xen
            .domain_memory(self.backend)
            .ok_or(GrantIommuError::NoDomain(self.backend))?;
        let mut regions = Vec::new();
        for r in g.iter() {
            if r.last_addr().0 >= SCRATCH_WINDOW {
                return Err(GrantIommuError::WindowOverlap);
            }
            regions.push(Arc::new(
                GuestRegionMmap::with_arc(r.get_mmap(), r.start_addr())
                    .ok_or(GrantIommuError::WindowOverlap)?,
            ));
        }
        for r in b.iter() {
            if r.last_addr().0 >= SCRATCH_WINDOW {
                return Err(GrantIommuError::WindowOverlap);
            }
            let base = GuestAddress(SCRATCH_WINDOW + r.start_addr().0);
            regions.push(Arc::new(
                GuestRegionMmap::with_arc(r.get_mmap(), base)
                    .ok_or(GrantIommuError::WindowOverlap)?,
            ));
        }
        Mem::from_arc_regions(regions).map_err(|_| GrantIommuError::WindowOverlap)
    }

    /// The mode.
    pub fn mode(&self) -> IommuMode {
        self.mode
    }

    /// The backend domain.
    pub fn backend(&self) -> DomId {
        self.backend
    }

    /// Counters.
    pub fn stats(&self) -> IommuStats {
        IommuStats {
            faults: self.faults.load(Ordering::Relaxed),
            maps: self.maps.load(Ordering::Relaxed),
            unmaps: self.unmaps.load(Ordering::Relaxed),
            copies: self.copies.load(Ordering::Relaxed),
            lost_copies: self.lost_copies.load(Ordering::Relaxed),
            persistent_pages: lock(&self.state).persistent.len() as u64,
        }
    }

    /// The last refused access: its address and the status Xen gave (or
    /// `GNTST_bad_gntref` for an address that is not a grant address).
    pub fn last_fault(&self) -> Option<(u64, GrantStatus)> {
        *lock(&self.last_fault)
    }

    fn caller(&self) -> Caller {
        Caller::new(self.backend)
    }

    /// Maps `gref` (host map, read-only unless `writable`); its frame's GPA and the
    /// handle.
    fn map_page(
        &self,
        gref: u32,
        writable: bool,
        host_addr: u64,
    ) -> Result<(u64, GrantHandle), GrantStatus> {
        let flags = GNTMAP_HOST_MAP | if writable { 0 } else { GNTMAP_READONLY };
        let mut op = [MapGrantRef::new(
            self.granter,
            GrantRef(gref),
            flags,
            host_addr,
        )];
        self.xen.map_grant_ref(self.caller(), &mut op);
        if op[0].status != GrantStatus::Okay {
            return Err(op[0].status);
        }
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok((op[0].dev_bus_addr, op[0].handle))
    }

    fn unmap_handles(&self, handles: &[(GrantHandle, u64)]) {
        if handles.is_empty() {
            return;
        }
        let mut ops: Vec<UnmapGrantRef> = handles
            .iter()
            .map(|&(h, host)| UnmapGrantRef::new(h, host, 0))
            .collect();
        self.xen.unmap_grant_ref(self.caller(), &mut ops);
        self.unmaps.fetch_add(ops.len() as u64, Ordering::Relaxed);
    }

    /// Maps the ring at `addr` of `len` bytes read-write for the life of the device
    /// (until [`Self::release`]).
    ///
    /// # Errors
    /// [`GrantIommuError::NotGrantAddress`], [`GrantIommuError::Map`] (earlier pages
    /// of the ring stay mapped until `release`).
    pub fn map_ring(&self, addr: GrantDmaAddr, len: u64) -> Result<(), GrantIommuError> {
        let bad = GrantIommuError::NotGrantAddress { addr: addr.0, len };
        let pages = Self::pages(addr.0, len).ok_or(bad)?;
        let mut st = lock(&self.state);
        for (gref, page_iova) in pages {
            if st.persistent.get(&gref).is_some_and(|p| p.writable) {
                continue;
            }
            let (gpa, h) =
                self.map_page(gref, true, page_iova)
                    .map_err(|status| GrantIommuError::Map {
                        gref: GrantRef(gref),
                        status,
                    })?;
            let p = st.persistent.entry(gref).or_insert(PMap {
                gpa,
                writable: true,
                handles: Vec::new(),
            });
            p.writable = true;
            p.handles.push((h, page_iova));
            let _ = write(&self.iotlb).set_mapping(
                GuestAddress(page_iova),
                GuestAddress(gpa),
                PAGE_SIZE as usize,
                Permissions::ReadWrite,
            );
        }
        Ok(())
    }

    /// The pages of a grant range: (gref, IOVA of the page), or `None` when the range
    /// is empty-wrapping, lacks bit 63, or names a ref beyond `grant_ref_t`.
    fn pages(iova: u64, len: u64) -> Option<Vec<(u32, u64)>> {
        if len == 0 {
            return Some(Vec::new());
        }
        let last = iova.checked_add(len - 1)?;
        GrantDmaAddr::decode(iova)?;
        GrantDmaAddr::decode(last)?;
        let first_page = iova >> PAGE_SHIFT;
        let last_page = last >> PAGE_SHIFT;
        let n = last_page - first_page + 1;
        if n > MAX_TRANSIENT_PAGES as u64 {
            return None;
        }
        Some(
            (first_page..=last_page)
                .map(|p| {
                    let page_iova = p << PAGE_SHIFT;
                    (
                        ((page_iova & !GRANT_DMA_ADDR_OFF) >> PAGE_SHIFT) as u32,
                        page_iova,
                    )
                })
                .collect(),
        )
    }

    fn fault(
        &self,
        iova: GuestAddress,
        length: usize,
        status: GrantStatus,
        why: &str,
    ) -> IommuError {
        self.faults.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_fault) = Some((iova.0, status));
        IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: format!(
                "{} reaching {}'s grants: {why}: {status}",
                self.backend, self.granter
            ),
        }
    }

    /// Makes `[off, end)` of the page `gref` at `page_iova` reachable for `access`.
    fn ensure(
        &self,
        st: &mut State,
        gref: u32,
        page_iova: u64,
        off: u32,
        end: u32,
        access: Permissions,
    ) -> Result<(), GrantStatus> {
        let need_w = access.has_write();
        let map_whole = |gpa: u64, w: bool| {
            let _ = write(&self.iotlb).set_mapping(
                GuestAddress(page_iova),
                GuestAddress(gpa),
                PAGE_SIZE as usize,
                perms(w),
            );
        };
        if let Some(p) = st.persistent.get(&gref) {
            if p.writable || !need_w {
                map_whole(p.gpa, p.writable);
                return Ok(());
            }
        }
        if let Some(&(gpa, w)) = st.transient_pages.get(&gref) {
            if w || !need_w {
                map_whole(gpa, w);
                return Ok(());
            }
        }
        let persistent = match self.mode {
            IommuMode::Copy { .. } => {
                return self.ensure_copy(st, gref, page_iova, off, end, need_w)
            }
            IommuMode::Persistent { max } => {
                st.persistent_budget_used < max || st.persistent.contains_key(&gref)
            }
            IommuMode::PerIo => false,
        };
        if persistent {
            let (gpa, h) = self.map_page(gref, need_w, page_iova)?;
            if !st.persistent.contains_key(&gref) {
                st.persistent_budget_used += 1;
            }
            let p = st.persistent.entry(gref).or_insert_with(|| PMap {
                gpa,
                writable: false,
                handles: Vec::new(),
            });
            p.writable |= need_w;
            p.handles.push((h, page_iova));
            let w = p.writable;
            map_whole(gpa, w);
            return Ok(());
        }
        if st.transient.len() >= MAX_TRANSIENT_PAGES {
            return Err(GrantStatus::NoSpace);
        }
        let (gpa, h) = self.map_page(gref, need_w, page_iova)?;
        st.transient.push((h, page_iova));
        st.transient_iovas.push(page_iova);
        st.transient_pages.insert(gref, (gpa, need_w));
        map_whole(gpa, need_w);
        Ok(())
    }

    fn copy_ops(&self, ops: &mut [GrantCopy]) -> Result<(), GrantStatus> {
        if ops.is_empty() {
            return Ok(());
        }
        self.xen.copy(self.caller(), ops);
        let ok = ops.iter().filter(|o| o.status == GrantStatus::Okay).count();
        self.copies.fetch_add(ok as u64, Ordering::Relaxed);
        match ops.iter().find(|o| o.status != GrantStatus::Okay) {
            Some(o) => Err(o.status),
            None => Ok(()),
        }
    }

    fn ensure_copy(
        &self,
        st: &mut State,
        gref: u32,
        page_iova: u64,
        off: u32,
        end: u32,
        need_w: bool,
    ) -> Result<(), GrantStatus> {
        if !st.copy_pages.contains_key(&gref) {
            if st.copy_pages.len() >= MAX_TRANSIENT_PAGES {
                return Err(GrantStatus::NoSpace);
            }
            let scratch = st.scratch_free.pop().ok_or(GrantStatus::NoSpace)?;
            st.copy_pages.insert(
                gref,
                CopyPage {
                    iova: page_iova,
                    scratch,
                    valid: [0; 64],
                    dirty: [0; 64],
                    write_checked: false,
                },
            );
        }
        let granter = self.granter;
        let Some(cp) = st.copy_pages.get_mut(&gref) else {
            return Err(GrantStatus::GeneralError);
        };
        let scratch_gfn = Gfn(cp.scratch / PAGE_SIZE);
        if need_w && !cp.write_checked {
            // A zero-length copy into the grant runs all of Xen's checks for writing.
            let mut probe = [GrantCopy::new(
                CopyPtr::local(scratch_gfn, 0),
                false,
                CopyPtr::gref(granter, GrantRef(gref), off as u16),
                true,
                0,
            )];
            self.copy_ops(&mut probe)?;
            cp.write_checked = true;
        }
        let mut ins: Vec<GrantCopy> = runs(&cp.valid, off, end, false)
            .into_iter()
            .map(|(s, e)| {
                GrantCopy::new(
                    CopyPtr::gref(granter, GrantRef(gref), s as u16),
                    true,
                    CopyPtr::local(scratch_gfn, s as u16),
                    false,
                    (e - s) as u16,
                )
            })
            .collect();
        self.copy_ops(&mut ins)?;
        set_bits(&mut cp.valid, off, end);
        if need_w {
            set_bits(&mut cp.dirty, off, end);
        }
        let _ = write(&self.iotlb).set_mapping(
            GuestAddress(page_iova + u64::from(off)),
            GuestAddress(SCRATCH_WINDOW + cp.scratch + u64::from(off)),
            (end - off) as usize,
            perms(need_w),
        );
        Ok(())
    }

    /// Ends a request batch: unmaps the pages mapped for it (32 per TLB flush), copies
    /// out what the device wrote (copy mode) and forgets their translations. Call after
    /// every `process_queue`.
    pub fn complete(&self) {
        let mut st = lock(&self.state);
        if st.transient.is_empty() && st.copy_pages.is_empty() {
            return;
        }
        let mut tlb = write(&self.iotlb);
        let handles = std::mem::take(&mut st.transient);
        self.unmap_handles(&handles);
        for iova in std::mem::take(&mut st.transient_iovas) {
            tlb.invalidate_mapping(GuestAddress(iova), PAGE_SIZE as usize);
        }
        st.transient_pages.clear();
        let pages: Vec<(u32, CopyPage)> = st.copy_pages.drain().collect();
        let mut outs = Vec::new();
        for (gref, cp) in &pages {
            for (s, e) in runs(&cp.dirty, 0, PAGE_SIZE as u32, true) {
                outs.push(GrantCopy::new(
                    CopyPtr::local(Gfn(cp.scratch / PAGE_SIZE), s as u16),
                    false,
                    CopyPtr::gref(self.granter, GrantRef(*gref), s as u16),
                    true,
                    (e - s) as u16,
                ));
            }
        }
        if self.copy_ops(&mut outs).is_err() {
            let lost = outs
                .iter()
                .filter(|o| o.status != GrantStatus::Okay)
                .count();
            self.lost_copies.fetch_add(lost as u64, Ordering::Relaxed);
        }
        for (_, cp) in pages {
            tlb.invalidate_mapping(GuestAddress(cp.iova), PAGE_SIZE as usize);
            st.scratch_free.push(cp.scratch);
        }
    }

    /// Ends the batch and unmaps every persistent page and ring: the device is going
    /// away (or the frontend disconnects).
    pub fn release(&self) {
        self.complete();
        let mut st = lock(&self.state);
        let mut tlb = write(&self.iotlb);
        let all: Vec<PMap> = st.persistent.drain().map(|(_, p)| p).collect();
        st.persistent_budget_used = 0;
        let handles: Vec<(GrantHandle, u64)> = all.iter().flat_map(|p| p.handles.clone()).collect();
        self.unmap_handles(&handles);
        tlb.invalidate_all();
    }
}

/// The carrier's hooks (`virtio_contract`'s "The batch"): pages are pinned from their
/// first translation in a batch, and the guest's revoke answers "busy" until the end
/// ([`GrantIommu::complete`]) unmaps them (Xen's ABI: `GTF_reading`/`GTF_writing` make
/// `gnttab_end_foreign_access` fail while a backend has the page mapped; the guest's
/// driver retries, so the revocation completes after the batch).
impl Batch for GrantIommu {
    fn begin(&self) {}

    fn end(&self) {
        self.complete();
    }
}

impl Drop for GrantIommu {
    fn drop(&mut self) {
        self.release();
    }
}

impl Iommu for GrantIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let len = length as u64;
        if iova.0.checked_add(len).is_none() {
            return Err(self.fault(
                iova,
                length,
                GrantStatus::BadGntref,
                "range wraps past 2^64",
            ));
        }
        if let Ok(hit) = Iotlb::lookup(read(&self.iotlb), iova, length, access) {
            return Ok(hit);
        }
        let Some(pages) = Self::pages(iova.0, len) else {
            return Err(self.fault(
                iova,
                length,
                GrantStatus::BadGntref,
                "not a grant DMA address (bit 63 clear) or too long",
            ));
        };
        let mut st = lock(&self.state);
        let end = iova.0 + len;
        for (gref, page_iova) in pages {
            let off = iova.0.max(page_iova) - page_iova;
            let stop = end.min(page_iova + PAGE_SIZE) - page_iova;
            if let Err(status) =
                self.ensure(&mut st, gref, page_iova, off as u32, stop as u32, access)
            {
                return Err(self.fault(iova, length, status, &format!("gref {gref:#x} refused")));
            }
        }
        let guard = read(&self.iotlb);
        drop(st);
        Iotlb::lookup(guard, iova, length, access).map_err(|_| {
            self.fault(
                iova,
                length,
                GrantStatus::GeneralError,
                "translation did not cover the access",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_a_range_use_consecutive_refs_and_need_bit63() {
        let a = GrantDmaAddr::new(GrantRef(10), 0xff0).0;
        let p = GrantIommu::pages(a, 0x20).unwrap_or_default();
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![10, 11]);
        assert!(GrantIommu::pages(0x1000, 1).is_none());
        assert!(GrantIommu::pages(u64::MAX, 2).is_none());
        assert_eq!(runs(&[0; 64], 3, 7, false), vec![(3, 7)]);
        let mut b = [0u64; 64];
        set_bits(&mut b, 5, 200);
        set_bits(&mut b, 256, 4096);
        assert_eq!(runs(&b, 0, 4096, true), vec![(5, 200), (256, 4096)]);
        assert_eq!(runs(&b, 0, 4096, false), vec![(0, 5), (200, 256)]);
        assert_eq!(runs(&b, 100, 300, false), vec![(200, 256)]);
        set_bits(&mut b, 0, 4096);
        assert_eq!(b, [u64::MAX; 64]);
    }
}
