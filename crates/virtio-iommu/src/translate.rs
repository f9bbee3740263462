//! Per-endpoint translation: [`EndpointIommu`] implements `vm_memory::Iommu` over an
//! IOTLB that caches the device's tables, so a backend written against
//! `vm_memory::GuestMemory` reaches guest memory only through what the guest mapped,
//! by wrapping its memory in `vm_memory::IommuMemory`.
//!
//! # Invalidation contract
//! The tables and the IOTLBs share one lock order: tables, then an endpoint's IOTLB.
//! A request that removes or restricts a translation (UNMAP, DETACH, re-ATTACH, a
//! `bypass` write, reset) holds the tables' write lock while it invalidates every
//! affected IOTLB, and the status reaches the guest only after that. An IOTLB fill holds
//! the tables' read lock while it writes the entry, so it cannot re-insert a translation
//! an in-flight UNMAP is removing. A translation returned by [`EndpointIommu`] holds its
//! IOTLB's read lock; invalidation waits for it. So once the guest sees `S_OK` for an
//! UNMAP, no access that starts afterwards can use the old mapping (strict semantics).
//! Holders of a translation outside this process ([`MappingSubscriber`]s) are told
//! after the write lock is dropped, so no IPC happens under it; the request completes
//! only once each of them has settled ([`Settle`]).
//! What a backend keeps beyond one access (a `VolatileSlice` it saved) is outside any
//! IOMMU's reach, as with real DMA; backends must translate per access.
//!
//! # The batch
//! An endpoint is also a [`virtio_contract::Batch`]: its carrier opens a batch around
//! each `process_queue` of the endpoint's device. While one is open the endpoint
//! records the IOVA spans it translates. A change that removes or replaces a
//! translation (UNMAP, DETACH, re-ATTACH, a `bypass` write, reset) still changes the
//! tables at once, and the IOTLB drops at once whatever the batch has not translated;
//! what it has stays in the IOTLB, as it was, until [`Batch::end`], and the request
//! holds a [`Hold`] until then, so the guest sees its status only once
//! the batch is over. The IOTLB is not emptied to make room while it keeps such spans.

use crate::state::{Denied, EndpointRef, MappingEvent, Tables};
use crate::wire::{
    FaultEvent, VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE,
};
use crate::{EndpointId, Iova};
use dma_types::{lock, read, write};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use virtio_contract::Batch;
use vm_memory::iommu::{Error as IommuError, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iommu, Permissions};
use zerocopy::byteorder::little_endian::{U32, U64};

/// Most entries an endpoint's IOTLB holds before it is emptied and refilled on demand.
pub const IOTLB_ENTRIES: usize = 256;

/// Told, per endpoint, every change in what that endpoint can reach, after the tables
/// changed and before the guest sees the request complete, in the order the changes
/// were made. The device tells its subscribers with no lock of its tables held.
///
/// A subscriber that can only finish a change later (it waits for another process to
/// acknowledge an invalidation) takes [`Settle::hold`] and drops the [`Hold`] when the
/// change is in effect on its side: the guest's request completes then, while the
/// device goes on with other requests. `on_event` must not block, must not call back
/// into the device, and a `Hold` must be dropped while holding no lock `on_event`
/// takes (the last drop wakes the device's request queue).
pub trait MappingSubscriber: Send + Sync {
    /// One change for `endpoint`; `settle` belongs to the request that made it.
    fn on_event(&self, endpoint: EndpointId, event: &MappingEvent, settle: &Settle);
}

/// What a request's subscribers still owe before it may complete: a count of
/// [`Hold`]s, plus one for the device while it tells them.
pub struct Settle(Arc<SettleState>);

struct SettleState {
    outstanding: AtomicUsize,
    /// Run by the drop that settles a request the device had to park.
    wake: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// A subscriber's promise to finish one change: the request completes once every
/// hold is dropped.
pub struct Hold(Arc<SettleState>);

impl Settle {
    /// A fresh settlement; `wake` is run if the last hold outlives the device's telling.
    pub(crate) fn new(wake: Option<Arc<dyn Fn() + Send + Sync>>) -> Self {
        Self(Arc::new(SettleState {
            outstanding: AtomicUsize::new(1),
            wake,
        }))
    }

    /// Delays the request's completion until the returned hold is dropped.
    pub fn hold(&self) -> Hold {
        self.0.outstanding.fetch_add(1, Ordering::AcqRel);
        Hold(Arc::clone(&self.0))
    }

    /// The device is done telling: true if nothing is held (the request completes
    /// now); otherwise the last hold's drop runs `wake`.
    pub(crate) fn release(&self) -> bool {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Every hold was dropped (after [`Settle::release`]).
    pub(crate) fn settled(&self) -> bool {
        self.0.outstanding.load(Ordering::Acquire) == 0
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.0.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(wake) = &self.0.wake {
                wake();
            }
        }
    }
}

impl fmt::Debug for Settle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settle")
            .field("outstanding", &self.0.outstanding)
            .finish()
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hold")
    }
}

/// Separate IOVA spans a batch's record keeps; beyond, it widens to one span covering
/// them all (a revocation inside it then waits for the batch end even where the batch
/// translated nothing). Bounds the record, whatever the device translates.
const MAX_BATCH_SPANS: usize = 64;

/// One endpoint's batch (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct EndpointBatch {
    /// The open batch's number, if one is open (numbered from 1).
    open: Option<u64>,
    last: u64,
    /// Inclusive IOVA spans translated in the open batch, disjoint.
    touched: Vec<(u64, u64)>,
    /// Inclusive IOVA spans whose IOTLB entries wait for the batch end.
    deferred: Vec<(u64, u64)>,
    /// The requests that revoked them, completed when the holds drop.
    holds: Vec<Hold>,
}

impl EndpointBatch {
    /// Records `[first, last]` as translated in the open batch.
    fn touch(&mut self, first: u64, last: u64) {
        let (mut lo, mut hi) = (first, last);
        // Merge every span that overlaps or adjoins the new one.
        self.touched.retain(|&(a, b)| {
            let apart = b.checked_add(1).is_some_and(|n| n < lo)
                || hi.checked_add(1).is_some_and(|n| n < a);
            if !apart {
                lo = lo.min(a);
                hi = hi.max(b);
            }
            apart
        });
        self.touched.push((lo, hi));
        if self.touched.len() > MAX_BATCH_SPANS {
            let lo = self.touched.iter().map(|s| s.0).min().unwrap_or(lo);
            let hi = self.touched.iter().map(|s| s.1).max().unwrap_or(hi);
            self.touched = vec![(lo, hi)];
        }
    }

    /// The parts of `[start, end]` the open batch translated, in order.
    fn kept(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if self.open.is_none() {
            return Vec::new();
        }
        let mut kept: Vec<(u64, u64)> = self
            .touched
            .iter()
            .filter_map(|&(a, b)| {
                let (lo, hi) = (a.max(start), b.min(end));
                (lo <= hi).then_some((lo, hi))
            })
            .collect();
        kept.sort_unstable();
        kept
    }
}

/// `[start, end]` without the disjoint, sorted spans `kept`.
fn without(start: u64, end: u64, kept: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut from = Some(start);
    for &(a, b) in kept {
        if let Some(f) = from {
            if a > f {
                out.push((f, a - 1));
            }
        }
        from = b.checked_add(1);
    }
    if let Some(f) = from {
        if f <= end {
            out.push((f, end));
        }
    }
    out
}

/// Holds the revoking request until the batch it waited for ends (a subscriber of one
/// change, queued by [`Shared::on_event`]).
struct BatchWait {
    batch: Arc<Mutex<EndpointBatch>>,
    number: u64,
}

impl MappingSubscriber for BatchWait {
    fn on_event(&self, _: EndpointId, _: &MappingEvent, settle: &Settle) {
        let mut b = lock(&self.batch);
        // Ended meanwhile: its end already dropped what the request revoked.
        if b.open == Some(self.number) {
            b.holds.push(settle.hold());
        }
    }
}

/// A change waiting to be told to one subscriber (see [`Shared::tell`]).
pub(crate) type Told = (Arc<dyn MappingSubscriber>, EndpointId, MappingEvent);

/// Faults waiting for an eventq buffer, bounded.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    pub(crate) pending: VecDeque<FaultEvent>,
}

/// State shared by the device shell and every endpoint handle.
pub(crate) struct Shared {
    pub(crate) tables: RwLock<Tables>,
    pub(crate) iotlbs: Box<[RwLock<Iotlb>]>,
    /// Entries filled into each IOTLB since it was last emptied (an upper bound on its
    /// size: merges and invalidations only shrink it). Changed under that IOTLB's
    /// write lock.
    pub(crate) iotlb_fills: Box<[AtomicUsize]>,
    /// Each endpoint's batch. Lock order: tables, then a batch, then its IOTLB.
    pub(crate) batches: Box<[Arc<Mutex<EndpointBatch>>]>,
    /// Whether an endpoint's IOTLB keeps spans for its batch (not to be emptied).
    pub(crate) retaining: Box<[AtomicBool]>,
    pub(crate) subscribers: RwLock<Vec<Vec<Arc<dyn MappingSubscriber>>>>,
    pub(crate) has_subscribers: AtomicBool,
    pub(crate) faults: Mutex<FaultQueue>,
    pub(crate) max_pending_faults: usize,
    pub(crate) fault_notifier: RwLock<Option<Arc<dyn Fn() + Send + Sync>>>,
    pub(crate) requestq_notifier: RwLock<Option<Arc<dyn Fn() + Send + Sync>>>,
    pub(crate) faults_raised: AtomicU64,
    pub(crate) faults_dropped: AtomicU64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("endpoints", &self.iotlbs.len())
            .field("faults_raised", &self.faults_raised)
            .finish_non_exhaustive()
    }
}

/// `[start, end]` as an IOTLB range, capped below 2^64 (vm-memory's `Iotlb` uses
/// half-open `u64` ranges). `None` when nothing of it is representable.
fn iotlb_span(start: Iova, end: Iova) -> Option<(GuestAddress, usize)> {
    let hi = end.0.min(u64::MAX - 1) + 1;
    let len = usize::try_from(hi.checked_sub(start.0)?).ok()?;
    (len > 0).then_some((GuestAddress(start.0), len))
}

impl Shared {
    /// Applies one event, with the tables' write lock held: invalidates the endpoint's
    /// IOTLB where a translation went away or changed kind, and queues the event in
    /// `told` for the endpoint's subscribers, to be told once the lock is dropped.
    pub(crate) fn on_event(&self, ep: EndpointRef, ev: MappingEvent, told: &mut Vec<Told>) {
        match ev {
            MappingEvent::Mapped { .. } => {}
            MappingEvent::Unmapped { start, end } => self.revoke(ep, start.0, end.0, ev, told),
            MappingEvent::Identity(_) => self.revoke(ep, 0, u64::MAX, ev, told),
        }
        if self.has_subscribers.load(Ordering::Acquire) {
            for s in &read(&self.subscribers)[ep.index] {
                told.push((Arc::clone(s), ep.id, ev));
            }
        }
    }

    /// Drops `[start, end]` from the endpoint's IOTLB, except what its open batch
    /// translated: that stays until the batch ends, and a [`BatchWait`] is queued so the
    /// request holds until then.
    fn revoke(
        &self,
        ep: EndpointRef,
        start: u64,
        end: u64,
        ev: MappingEvent,
        told: &mut Vec<Told>,
    ) {
        let batch = &self.batches[ep.index];
        let mut b = lock(batch);
        let kept = b.kept(start, end);
        let mut tlb = write(&self.iotlbs[ep.index]);
        if kept.is_empty() && (start, end) == (0, u64::MAX) {
            tlb.invalidate_all();
            self.iotlb_fills[ep.index].store(0, Ordering::Relaxed);
        } else {
            for (lo, hi) in without(start, end, &kept) {
                if let Some((base, len)) = iotlb_span(Iova(lo), Iova(hi)) {
                    tlb.invalidate_mapping(base, len);
                }
            }
        }
        drop(tlb);
        if let (false, Some(number)) = (kept.is_empty(), b.open) {
            b.deferred.extend(kept);
            self.retaining[ep.index].store(true, Ordering::Release);
            let wait = BatchWait {
                batch: Arc::clone(batch),
                number,
            };
            told.push((Arc::new(wait), ep.id, ev));
        }
    }

    /// Tells each subscriber its queued changes, in order; call with no lock of the
    /// tables held. Leaves `told` empty.
    pub(crate) fn tell(told: &mut Vec<Told>, settle: &Settle) {
        for (s, id, ev) in told.drain(..) {
            s.on_event(id, &ev, settle);
        }
    }

    /// Tells what a change outside any request queued (a config write, a reset):
    /// nothing waits for the subscribers to settle.
    pub(crate) fn tell_unsettled(told: &mut Vec<Told>) {
        let settle = Settle::new(None);
        Self::tell(told, &settle);
        settle.release();
    }

    fn raise_fault(&self, endpoint: EndpointId, denied: Denied, access: Permissions) {
        self.faults_raised.fetch_add(1, Ordering::Relaxed);
        let mut flags = VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if access.allow(Permissions::Read) {
            flags |= VIRTIO_IOMMU_FAULT_F_READ;
        }
        if access.allow(Permissions::Write) {
            flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
        }
        let ev = FaultEvent {
            reason: denied.reason,
            flags: U32::new(flags),
            endpoint: U32::new(endpoint.0),
            address: U64::new(denied.address),
            ..FaultEvent::default()
        };
        {
            let mut q = lock(&self.faults);
            if q.pending.len() >= self.max_pending_faults {
                self.faults_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q.pending.push_back(ev);
        }
        if let Some(n) = read(&self.fault_notifier).as_ref() {
            n();
        }
    }
}

/// The translation of one endpoint: a `vm_memory::Iommu` whose IOTLB is filled from
/// the device's tables on a miss. Cheap to clone; clones share the IOTLB.
#[derive(Clone, Debug)]
pub struct EndpointIommu {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
    pub(crate) id: EndpointId,
}

impl EndpointIommu {
    /// The endpoint this handle translates for.
    pub fn endpoint(&self) -> EndpointId {
        self.id
    }

    /// Adds a subscriber for this endpoint, as [`VirtioIommu::subscribe`] does: it is
    /// first told the endpoint's current state (identity, or each live mapping), then
    /// every change, before the request making it completes. For a holder of the
    /// endpoint's translation that lives outside this process (a vhost-user backend),
    /// whose frontend must see every change without owning the device.
    ///
    /// [`VirtioIommu::subscribe`]: crate::VirtioIommu::subscribe
    pub fn subscribe(&self, subscriber: Arc<dyn MappingSubscriber>) {
        // Hold the tables' write lock so no request runs between replay and registration.
        let tables = write(&self.shared.tables);
        let settle = Settle::new(None);
        if tables.is_identity(self.index) {
            subscriber.on_event(self.id, &MappingEvent::Identity(true), &settle);
        } else if let Some(d) = tables.endpoint_domain(self.index) {
            for (start, m) in tables.mappings(d) {
                subscriber.on_event(
                    self.id,
                    &MappingEvent::Mapped {
                        start,
                        end: Iova(m.end),
                        phys: crate::Gpa(m.phys),
                        perms: m.permissions(),
                    },
                    &settle,
                );
            }
        }
        settle.release();
        write(&self.shared.subscribers)[self.index].push(subscriber);
        self.shared.has_subscribers.store(true, Ordering::Release);
    }

    fn deny(&self, iova: GuestAddress, length: usize, reason: &str) -> IommuError {
        IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: format!("{}: {reason}", self.id),
        }
    }
}

/// The endpoint's batch hooks (see the module docs): its carrier calls them around each
/// `process_queue` of the endpoint's device.
impl Batch for EndpointIommu {
    fn begin(&self) {
        let mut b = lock(&self.shared.batches[self.index]);
        b.last += 1;
        b.open = Some(b.last);
        b.touched.clear();
    }

    fn end(&self) {
        let (deferred, holds) = {
            let mut b = lock(&self.shared.batches[self.index]);
            if b.open.take().is_none() {
                return;
            }
            b.touched.clear();
            let deferred = std::mem::take(&mut b.deferred);
            if !deferred.is_empty() {
                let mut tlb = write(&self.shared.iotlbs[self.index]);
                for (lo, hi) in deferred.iter().copied() {
                    if let Some((base, len)) = iotlb_span(Iova(lo), Iova(hi)) {
                        tlb.invalidate_mapping(base, len);
                    }
                }
                self.shared.retaining[self.index].store(false, Ordering::Release);
            }
            (deferred, std::mem::take(&mut b.holds))
        };
        drop(deferred);
        // With no lock held: the last drop completes the request (the device's
        // request-queue notifier runs).
        drop(holds);
    }
}

impl Iommu for EndpointIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let iotlb = &self.shared.iotlbs[self.index];
        // The access must end at or below 2^64 - 1 to be a half-open u64 range.
        let Some(end) = iova.0.checked_add(length as u64) else {
            let denied = Denied {
                reason: crate::wire::VIRTIO_IOMMU_FAULT_R_MAPPING,
                address: iova.0,
            };
            self.shared.raise_fault(self.id, denied, access);
            return Err(self.deny(iova, length, "range wraps past 2^64"));
        };
        if length > 0 {
            // Recorded before the lookup: a revocation after this keeps what it finds.
            let mut b = lock(&self.shared.batches[self.index]);
            if b.open.is_some() {
                b.touch(iova.0, end - 1);
            }
        }
        if let Ok(hit) = Iotlb::lookup(read(iotlb), iova, length, access) {
            return Ok(hit);
        }
        // Miss: fill from the tables while holding their read lock (see the module
        // docs), then look up again under that same lock.
        let tables = read(&self.shared.tables);
        let filled = {
            let mut tlb = write(iotlb);
            // A bounded IOTLB, as in hardware: when full, start over. Keeps lookups
            // and fills fast and the cache's memory bounded whatever the guest maps.
            // Not while it keeps spans for a batch: they are bounded by the batch.
            let fills = &self.shared.iotlb_fills[self.index];
            if fills.load(Ordering::Relaxed) >= IOTLB_ENTRIES
                && !self.shared.retaining[self.index].load(Ordering::Acquire)
            {
                tlb.invalidate_all();
                fills.store(0, Ordering::Relaxed);
            }
            tables.resolve(self.index, iova.0, end, access, |from, to, len, perms| {
                fills.fetch_add(1, Ordering::Relaxed);
                // `resolve` only yields non-empty spans ending at or below u64::MAX,
                // which is what `set_mapping` needs; it never fails.
                let _ = tlb.set_mapping(GuestAddress(from), GuestAddress(to), len as usize, perms);
            })
        };
        match filled {
            Ok(()) => Iotlb::lookup(read(iotlb), iova, length, access)
                .map_err(|_| self.deny(iova, length, "IOTLB fill did not cover the access")),
            Err(denied) => {
                drop(tables);
                self.shared.raise_fault(self.id, denied, access);
                Err(self.deny(iova, length, "access denied by the IOMMU"))
            }
        }
    }
}
