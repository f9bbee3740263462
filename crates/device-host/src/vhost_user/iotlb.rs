//! The IOTLB side of the front-end: the shadow of the endpoint's translation and of
//! what the back-end holds, the subscriber that keeps it current, the IOTLB thread that
//! pushes UPDATEs and sends INVALIDATEs, and the back-end request channel's misses.

use super::link::{send_msg, try_send_msg, Expect, Link, Reply};
use super::RingInv;
use super::{bump, wire, Shared, VhostUserError, MAX_WINDOWS};
use dma_types::lock;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::time::Instant;
use vhost_iotlb::push_ring::Push;
use virtio_iommu::{EndpointId, MappingEvent, MappingSubscriber, Settle};
use vm_memory::{GuestAddress, Iommu, Permissions};
use wire::{req, Header};
use zerocopy::{FromBytes, IntoBytes};

/// One region of the memory table as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) gpa: u64,
    pub(super) size: u64,
    pub(super) uaddr: u64,
}

impl From<&wire::MemoryRegion> for Region {
    /// A memory-table entry as the front-end keeps it.
    fn from(r: &wire::MemoryRegion) -> Self {
        Self {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uaddr: r.userspace_addr,
        }
    }
}

impl Region {
    pub(super) fn last(&self) -> u64 {
        self.gpa + (self.size - 1)
    }
}

/// One mapping of the endpoint as its subscriber was told.
#[derive(Clone, Copy, Debug)]
pub(super) struct ShadowMap {
    pub(super) end: u64,
    pub(super) phys: u64,
    pub(super) perms: Permissions,
}

/// An UPDATE: `[iova, iova + size)` at front-end address `uaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) iova: u64,
    pub(super) size: u64,
    pub(super) uaddr: u64,
    pub(super) perm: u8,
}

impl Window {
    pub(super) fn push(&self) -> Push {
        Push {
            iova: self.iova,
            size: self.size,
            uaddr: self.uaddr,
            perm: self.perm,
        }
    }

    pub(super) fn update(&self) -> wire::IotlbMsg {
        wire::IotlbMsg {
            iova: self.iova,
            size: self.size,
            uaddr: self.uaddr,
            perm: self.perm,
            kind: wire::iotlb::UPDATE,
            padding: [0; 6],
        }
    }
}

/// What completes a guest's UNMAP once the back-end no longer holds the range: run
/// after its acknowledgement, or dropped (which completes it too) when cut off.
pub(super) type Done = Box<dyn FnOnce() + Send>;

/// IOTLB messages for the device's IOTLB thread, sent in the order they were queued.
pub(super) enum IotlbJob {
    /// An UPDATE the back-end did not ask for: the guest just mapped this.
    Push(Window),
    /// An INVALIDATE of `[lo, hi]`, acknowledged; `done` runs after the ack or the
    /// deadline, holding no lock.
    Invalidate { lo: u64, hi: u64, done: Done },
}

/// The front-end's copy of the endpoint's translation and of what the back-end holds.
#[derive(Debug, Default)]
pub(super) struct IotlbState {
    pub(super) identity: bool,
    pub(super) mappings: BTreeMap<u64, ShadowMap>,
    /// Windows sent in UPDATEs since the last invalidation covering them: first →
    /// last IOVA. May hold windows never sent (a retried miss); never misses one sent.
    pub(super) given: BTreeMap<u64, u64>,
    /// The memory table as sent.
    pub(super) regions: Vec<Region>,
    /// ACCESS_PLATFORM negotiated and the memory table sent: misses are answered.
    pub(super) active: bool,
}

pub(super) fn perm_bits(p: Permissions) -> u8 {
    match p {
        Permissions::No => 0,
        Permissions::Read => wire::iotlb::PERM_RO,
        Permissions::Write => wire::iotlb::PERM_WO,
        Permissions::ReadWrite => wire::iotlb::PERM_RW,
    }
}

pub(super) fn access_of(perm: u8) -> Option<Permissions> {
    match perm {
        wire::iotlb::PERM_RO => Some(Permissions::Read),
        wire::iotlb::PERM_WO => Some(Permissions::Write),
        wire::iotlb::PERM_RW => Some(Permissions::ReadWrite),
        _ => None,
    }
}

impl IotlbState {
    pub(super) fn region_of(&self, gpa: u64) -> Option<Region> {
        self.regions
            .iter()
            .find(|r| r.gpa <= gpa && gpa <= r.last())
            .copied()
    }

    /// The window answering a miss at `iova` for `access`: the part of the guest's
    /// mapping holding `iova` that lies in one memory-table region. `None` when the
    /// guest did not map `iova` with that access, or it maps outside guest RAM.
    pub(super) fn window(&self, iova: u64, access: Permissions) -> Option<Window> {
        if !self.active {
            return None;
        }
        let (start, m) = if self.identity {
            let r = self.region_of(iova)?;
            (
                r.gpa,
                ShadowMap {
                    end: r.last(),
                    phys: r.gpa,
                    perms: Permissions::ReadWrite,
                },
            )
        } else {
            let (&s, m) = self.mappings.range(..=iova).next_back()?;
            (iova <= m.end).then_some((s, *m))?
        };
        if !m.perms.allow(access) {
            return None;
        }
        let gpa = m.phys.checked_add(iova - start)?;
        let r = self.region_of(gpa)?;
        let below = (iova - start).min(gpa - r.gpa);
        let above = (m.end - iova).min(r.last() - gpa);
        let first = iova - below;
        // `[first, iova + above]` has at most 2^64 bytes; keep it representable.
        let size = (below + above).saturating_add(1);
        Some(Window {
            iova: first,
            size,
            uaddr: r.uaddr + (gpa - below - r.gpa),
            perm: perm_bits(m.perms),
        })
    }

    /// Records `w` as given, unless that would exceed [`MAX_WINDOWS`].
    pub(super) fn give(&mut self, w: &Window) -> bool {
        if self.given.len() >= MAX_WINDOWS {
            return false;
        }
        let last = w.iova + (w.size - 1);
        let e = self.given.entry(w.iova).or_insert(last);
        *e = (*e).max(last);
        true
    }

    /// The windows to push for the guest's mapping `[start, end]` (one per
    /// memory-table region it spans), recorded as given. Stops early, leaving the rest
    /// to misses, when the windows cannot be remembered.
    pub(super) fn push_windows(&mut self, start: u64, end: u64, perms: Permissions) -> Vec<Window> {
        let mut out = Vec::new();
        let mut iova = start;
        while let Some(w) = self.window(iova, perms) {
            // Leave half of the windows to misses (see MAX_WINDOWS).
            if self.given.len() >= MAX_WINDOWS / 2 || !self.give(&w) {
                break;
            }
            out.push(w);
            match w.iova.checked_add(w.size) {
                Some(next) if next <= end && next > iova => iova = next,
                _ => break,
            }
        }
        out
    }

    /// Forgets the windows overlapping `[start, end]` and returns their hull (what
    /// the back-end must drop), or `None` if it holds none of that range.
    pub(super) fn take_given(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        let hit: Vec<(u64, u64)> = self
            .given
            .range(..=end)
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let lo = hit.iter().map(|w| w.0).min()?;
        let hi = hit.iter().map(|w| w.1).max()?;
        for (s, _) in hit {
            self.given.remove(&s);
        }
        Some((lo, hi))
    }
}

impl Shared {
    /// Answers a MISS: an UPDATE for the window holding `iova`, or a refusal (and a
    /// fault event) when the guest did not map it with `perm`. Returns whether an
    /// UPDATE was sent.
    ///
    /// The window is computed under the shadow's lock, recorded as given, and sent
    /// under the main socket's lock only if no translation was removed meanwhile
    /// (`generation` unchanged): an UNMAP either comes before (the miss is retried
    /// against the new state) or its INVALIDATE goes after the UPDATE on the socket.
    pub(super) fn answer_miss(&self, iova: u64, perm: u8) -> bool {
        bump(&self.counters.misses);
        let Some(access) = access_of(perm) else {
            bump(&self.counters.refused);
            return false;
        };
        for _ in 0..8 {
            let (window, generation) = {
                let mut st = lock(&self.iotlb);
                let g = self.generation.load(Ordering::Acquire);
                let w = st.window(iova, access);
                if let Some(w) = w {
                    if !st.give(&w) {
                        // Cannot remember more: refuse rather than lose track.
                        drop(st);
                        bump(&self.counters.refused);
                        return false;
                    }
                }
                (w, g)
            };
            let Some(w) = window else {
                break;
            };
            let msg = w.update();
            let sent = self.with_link(|link| {
                let mut sock = lock(&link.main);
                if self.generation.load(Ordering::Acquire) != generation {
                    return Ok(false);
                }
                // Acknowledged (IOTLB mode needs REPLY_ACK): applied when this returns.
                link.request_locked(&mut sock, req::IOTLB_MSG, msg.as_bytes(), &[], Reply::None)?;
                Ok(true)
            });
            match sent {
                Ok(true) => {
                    bump(&self.counters.updates);
                    return true;
                }
                Ok(false) => continue,
                Err(_) => return false,
            }
        }
        bump(&self.counters.refused);
        self.fault(iova, access);
        false
    }

    /// Raises the fault event the in-process path would: the access is checked
    /// against the IOMMU's own tables, which report it to the guest.
    pub(super) fn fault(&self, iova: u64, access: Permissions) {
        if let Some(ep) = lock(&self.iommu).clone() {
            let _ = ep.translate(GuestAddress(iova), 1, access);
        }
    }

    /// Queues IOTLB messages for the IOTLB thread. Should it be gone (the device is
    /// being dropped), an invalidation's `done` runs at once, dropped with the job.
    pub(super) fn queue(&self, job: IotlbJob) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let IotlbJob::Invalidate { done, .. } = job {
                done();
            }
        }
    }

    /// Pushes the UPDATE for `w` from the caller's thread when that cannot wait and
    /// keeps the order the queue gives: nothing is queued ahead of it, nobody holds
    /// the link or the main socket, and the kernel takes the whole message at once.
    /// Otherwise queues it for the IOTLB thread. Called under the shadow's lock, as
    /// `queue`; it only tries locks, so a back-end slow to ack (the IOTLB thread holds
    /// the main socket meanwhile) never holds up the virtio-iommu here.
    ///
    /// Every push through the queue woke the IOTLB thread: one more thread to run per
    /// guest MAP, beside the vCPU and the poller, on machines with two CPUs. A back-end
    /// that gave a push ring (ours) is not even sent a message: the push is written to
    /// the ring, which it reads when it needs the window, or before the next IOTLB
    /// message (so the INVALIDATEs queued after this still come after it).
    pub(super) fn push(&self, w: Window) {
        match self.try_push(&w) {
            Some(ring) => {
                bump(&self.counters.pushed);
                if ring {
                    bump(&self.counters.ring_pushed);
                }
            }
            None => self.queue(IotlbJob::Push(w)),
        }
    }

    /// `Some(through the ring)` if pushed from here, `None` if it must be queued.
    fn try_push(&self, w: &Window) -> Option<bool> {
        if self.queued.load(Ordering::Acquire) != 0 || self.broken.load(Ordering::Acquire) {
            return None;
        }
        let link = self.link.try_lock().ok()?;
        let link = link.as_ref()?;
        if link.push_ring.get().is_some_and(|r| r.push(&w.push())) {
            return Some(true);
        }
        let sock = link.main.try_lock().ok()?;
        let msg = w.update();
        let sent = try_send_msg(&sock, req::IOTLB_MSG, wire::flags::VERSION, msg.as_bytes())
            .unwrap_or(false);
        if sent {
            self.unconfirmed.store(true, Ordering::Release);
        }
        sent.then_some(false)
    }

    /// Writes the invalidation of `[lo, hi]` to the back-end's ring, when that is sure
    /// to be acknowledged without a message: the back-end's worker polls (it applies
    /// the ring on its next pass, or in its look after it stops), our poller watches
    /// this device (it keeps polling until the ack or the deadline), and nothing is
    /// queued for the IOTLB thread (which would send it out of order). Otherwise, or if
    /// either side stopped polling in between, gives `done` back for a message. Nor
    /// while an UPDATE sent as a message may not have been applied yet (no acked
    /// INVALIDATE followed it): the back-end's worker applies the ring, its socket
    /// thread the messages, and the invalidation must not overtake that UPDATE. Under
    /// the shadow's lock, as `queue`.
    ///
    /// Every INVALIDATE message woke our IOTLB thread, the back-end's socket thread,
    /// then our IOTLB thread again for the ack: three threads to run per guest UNMAP on
    /// a CPU both pollers keep busy, each one ~14 µs away on average (`perf sched`).
    ///
    /// A back-end that maps guest RAM whole (ours with `--iotlb-map whole`) needs
    /// neither to poll nor to answer: with none of its views of guest memory alive after
    /// the write, the invalidation is complete at once, since the next view applies it
    /// before translating anything (`vhost_iotlb::push_ring`); with views alive, if none
    /// of the windows they published overlaps it. Otherwise a view may be in a batch
    /// that lasts (a 1 MiB read): the INVALIDATE goes as a message too, which the
    /// back-end answers once no view that could use the window is left.
    pub(super) fn ring_invalidate(&self, lo: u64, hi: u64, done: Done) -> Result<(), Done> {
        if self.queued.load(Ordering::Acquire) != 0
            || self.unconfirmed.load(Ordering::Acquire)
            || self.broken.load(Ordering::Acquire)
        {
            return Err(done);
        }
        let Ok(guard) = self.link.try_lock() else {
            return Err(done);
        };
        let Some(link) = guard.as_ref() else {
            return Err(done);
        };
        let Some(ring) = link.push_ring.get() else {
            return Err(done);
        };
        let whole = ring.peer_whole();
        // One at a time unless it is whole: a strict guest waits for each UNMAP anyway,
        // and a lazy one's flush of ~90 is better unmapped by the back-end's socket
        // thread than by its worker, which would hold the poll budget's turn that our
        // poller needs to serve the guest's next MAPs meanwhile.
        if !whole
            && (!self.watched.load(Ordering::SeqCst)
                || self.ring_pending.load(Ordering::SeqCst) != 0
                || !ring.peer_polling())
        {
            return Err(done);
        }
        let size = (hi - lo).saturating_add(1);
        let Some(seq) = ring.invalidate(lo, size) else {
            return Err(done);
        };
        if whole {
            if ring.peer_views() != 0 && !ring.peer_clear_of(lo, hi) {
                return Err(done);
            }
            let c = &self.counters;
            bump(&c.ring_invalidates);
            bump(&c.quiet_invalidates);
            bump(&c.invalidates);
            drop(guard);
            // Still inside the subscriber's event, under the shadow's lock: this drop
            // of the request's hold is never its last (the device keeps one while it
            // tells its subscribers), so it wakes nothing and takes no lock.
            done();
            return Ok(());
        }
        {
            let mut q = lock(&self.ring_invs);
            q.push_back(RingInv {
                seq,
                link: Arc::downgrade(link),
                sent: Instant::now(),
                done,
            });
            self.ring_pending.store(q.len(), Ordering::SeqCst);
        }
        // Both flags again, after the write and the registration (each side fences
        // between its flag and its last look): one of us sees the other.
        if ring.peer_polling() && self.watched.load(Ordering::SeqCst) {
            return Ok(());
        }
        drop(guard);
        let mut q = lock(&self.ring_invs);
        let taken = q
            .iter()
            .position(|r| r.seq == seq)
            .and_then(|i| q.remove(i));
        self.ring_pending.store(q.len(), Ordering::SeqCst);
        match taken {
            // Sent as a message too; the ring's copy is harmless.
            Some(r) => Err(r.done),
            // Already acknowledged.
            None => Ok(()),
        }
    }

    /// Completes the ring invalidations the back-end acknowledged; cuts the
    /// connection when the oldest is past the deadline (as an unacknowledged
    /// INVALIDATE message does). Returns whether any were outstanding, so that the
    /// poller keeps polling until they are all in. Runs the completions holding no
    /// lock.
    pub(super) fn poll_ring_acks(&self) -> bool {
        if self.ring_pending.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let link = lock(&self.link).clone();
        let acked = link
            .as_ref()
            .and_then(|l| l.push_ring.get())
            .map_or(0, |r| r.invalidated());
        let broken = self.broken.load(Ordering::Acquire);
        let now = Instant::now();
        let mut ready = Vec::new();
        let (mut acks, mut waited, mut late) = (0u64, 0u64, 0u64);
        {
            let mut q = lock(&self.ring_invs);
            while let Some(r) = q.front() {
                // Cut off, the back-end no longer reaches anything: done as well.
                let current = !broken
                    && link
                        .as_ref()
                        .is_some_and(|l| r.link.upgrade().is_some_and(|rl| Arc::ptr_eq(&rl, l)));
                if current && r.seq <= acked {
                    acks += 1;
                    waited += u64::try_from(r.sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                } else if current && now.duration_since(r.sent) <= self.timeout {
                    break;
                } else if current {
                    late = q.len() as u64;
                    ready.extend(q.drain(..).map(|r| r.done));
                    break;
                }
                ready.extend(q.pop_front().map(|r| r.done));
            }
            self.ring_pending.store(q.len(), Ordering::SeqCst);
            let c = &self.counters;
            c.ring_invalidates.fetch_add(acks, Ordering::Relaxed);
            c.invalidates.fetch_add(acks, Ordering::Relaxed);
            c.invalidate_ns.fetch_add(waited, Ordering::Relaxed);
            c.invalidate_failures.fetch_add(late, Ordering::Relaxed);
        }
        let late = late > 0;
        if late {
            eprintln!("vhost-user: the back-end did not acknowledge an invalidation in its ring in time; cutting it off");
            self.break_link();
        }
        for done in ready {
            done();
        }
        true
    }

    /// Invalidates `[lo, hi]` through the IOTLB thread and waits until the back-end
    /// acknowledged or the deadline passed.
    pub(super) fn invalidate_and_wait(&self, lo: u64, hi: u64) {
        let (tx, rx) = mpsc::channel();
        self.queue(IotlbJob::Invalidate {
            lo,
            hi,
            done: Box::new(move || {
                let _ = tx.send(());
            }),
        });
        let _ = rx.recv();
    }

    /// Sends INVALIDATE for `[start, end]` and waits for the ack, up to the deadline;
    /// a back-end that does not ack breaks the connection (the device needs reset).
    pub(super) fn invalidate(&self, start: u64, end: u64) {
        self.send_jobs(
            vec![IotlbJob::Invalidate {
                lo: start,
                hi: end,
                done: Box::new(|| ()),
            }],
            0,
        );
    }

    /// Sends `jobs` in order, back to back under the main socket's lock, then reads
    /// the acks of their INVALIDATEs in order by one deadline, and runs their `done`s.
    /// A run of UNMAPs (a lazy guest flushes a hundred at once) then costs about one
    /// round trip, not one each. Any failure breaks the connection: acks left unread
    /// would put the socket out of step, and a refusal leaves the back-end holding what
    /// the guest took away.
    ///
    /// `queued` of the jobs came through the queue: they stop counting as queued once
    /// sent and acknowledged, before the `done`s run (which let the guest go on, and
    /// its next UNMAP may then use the ring).
    fn send_jobs(&self, jobs: Vec<IotlbJob>, queued: usize) {
        let mut msgs = Vec::with_capacity(jobs.len());
        let mut dones = Vec::new();
        for job in jobs {
            match job {
                IotlbJob::Push(w) => msgs.push((w.update(), Reply::Posted)),
                IotlbJob::Invalidate { lo, hi, done } => {
                    let msg = wire::IotlbMsg {
                        iova: lo,
                        size: (hi - lo).saturating_add(1),
                        kind: wire::iotlb::INVALIDATE,
                        ..wire::IotlbMsg::default()
                    };
                    msgs.push((msg, Reply::Ack));
                    dones.push(done);
                }
            }
        }
        let (mut pushed, mut acked, mut waited) = (0, 0, 0u64);
        let r = self.with_link(|link| {
            let mut sock = lock(&link.main);
            let mut sent = Vec::with_capacity(dones.len());
            for (msg, reply) in &msgs {
                match link.send_locked(&sock, req::IOTLB_MSG, msg.as_bytes(), &[], *reply)? {
                    Some(_) => sent.push(Instant::now()),
                    None => {
                        pushed += 1;
                        self.unconfirmed.store(true, Ordering::Release);
                    }
                }
            }
            let deadline = Instant::now() + link.timeout;
            for at in sent {
                link.read_reply(&mut sock, req::IOTLB_MSG, Expect::Ack, deadline)?;
                acked += 1;
                waited += u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
            }
            // An ack comes after everything sent before it was applied.
            if msgs.last().is_some_and(|(_, r)| *r == Reply::Ack) {
                self.unconfirmed.store(false, Ordering::Release);
            }
            Ok(())
        });
        self.queued.fetch_sub(queued, Ordering::AcqRel);
        let c = &self.counters;
        c.pushed.fetch_add(pushed, Ordering::Relaxed);
        c.invalidates.fetch_add(acked, Ordering::Relaxed);
        c.invalidate_ns.fetch_add(waited, Ordering::Relaxed);
        match r {
            Ok(()) | Err(VhostUserError::Broken) => {}
            Err(e) => {
                let failed = dones.len() as u64 - acked;
                c.invalidate_failures.fetch_add(failed, Ordering::Relaxed);
                if !e.breaks_connection() {
                    self.break_link();
                }
            }
        }
        for done in dones {
            done();
        }
    }
}

/// The endpoint's mapping changes, as the virtio-iommu reports them (after its tables
/// changed, before the guest's request completes). Nothing here waits for the
/// back-end: the shadow is updated at once, pushes and invalidations go to the IOTLB
/// thread, and an UNMAP's request holds until its INVALIDATE was acknowledged.
pub(super) struct Subscriber(pub(super) Arc<Shared>);

impl MappingSubscriber for Subscriber {
    fn on_event(&self, _endpoint: EndpointId, event: &MappingEvent, settle: &Settle) {
        let s = &self.0;
        // Jobs are queued under the shadow's lock, so the IOTLB thread sends them in
        // the order the shadow changed, whoever changed it.
        let mut st = lock(&s.iotlb);
        let drop_range = match *event {
            MappingEvent::Mapped {
                start,
                end,
                phys,
                perms,
            } => {
                st.mappings.insert(
                    start.0,
                    ShadowMap {
                        end: end.0,
                        phys: phys.0,
                        perms,
                    },
                );
                for w in st.push_windows(start.0, end.0, perms) {
                    s.push(w);
                }
                None
            }
            MappingEvent::Unmapped { start, end } => {
                let gone: Vec<u64> = st
                    .mappings
                    .range(start.0..=end.0)
                    .map(|(k, _)| *k)
                    .collect();
                for k in gone {
                    st.mappings.remove(&k);
                }
                s.generation.fetch_add(1, Ordering::AcqRel);
                st.take_given(start.0, end.0)
            }
            MappingEvent::Identity(on) => {
                st.identity = on;
                if on {
                    None
                } else {
                    s.generation.fetch_add(1, Ordering::AcqRel);
                    st.take_given(0, u64::MAX)
                }
            }
        };
        if let Some((lo, hi)) = drop_range {
            let hold = settle.hold();
            let done: Done = Box::new(move || drop(hold));
            if let Err(done) = s.ring_invalidate(lo, hi, done) {
                s.queue(IotlbJob::Invalidate { lo, hi, done });
            }
        }
    }
}

/// Most jobs the IOTLB thread sends before it reads their acks.
const MAX_BATCH: usize = 64;

/// The IOTLB thread: sends what [`Subscriber`] queued, in order, so that a back-end
/// slow to acknowledge delays only its own invalidations, never the virtio-iommu.
/// What was queued meanwhile goes in one pass ([`Shared::send_jobs`]).
pub(super) fn iotlb_loop(shared: Weak<Shared>, jobs: mpsc::Receiver<IotlbJob>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter().take(MAX_BATCH - 1));
        let n = batch.len();
        let Some(s) = shared.upgrade() else {
            break;
        };
        s.send_jobs(batch, n);
    }
}

/// Reads and answers back-end requests until the channel closes.
pub(super) fn backend_req_loop(shared: Weak<Shared>, mut sock: UnixStream, link: Weak<Link>) {
    loop {
        let mut h = Header::default();
        if sock.read_exact(h.as_mut_bytes()).is_err() {
            break;
        }
        let Some(s) = shared.upgrade() else {
            return;
        };
        let need_reply = h.flags & wire::flags::NEED_REPLY != 0;
        // A message too large to be one we know cannot be skipped safely.
        if h.size as usize > wire::MAX_PAYLOAD {
            bump(&s.counters.bad_messages);
            break;
        }
        let mut body = vec![0u8; h.size as usize];
        let _ = sock.set_read_timeout(Some(s.timeout));
        let got = sock.read_exact(&mut body);
        let _ = sock.set_read_timeout(None);
        if got.is_err() {
            break;
        }
        let status = handle_backend_req(&s, &h, &body);
        if need_reply {
            let code: u64 = if status { 0 } else { 1 };
            let flags = wire::flags::VERSION | wire::flags::REPLY;
            if send_msg(&sock, h.request, flags, code.as_bytes(), &[]).is_err() {
                break;
            }
        }
    }
    // The back-end closed its channel: unless we are closing, or this is an old
    // connection, that is the back-end going away.
    if let Some(s) = shared.upgrade() {
        let current = lock(&s.link).as_ref().map(Arc::as_ptr);
        if !s.closing.load(Ordering::Acquire) && current == Some(link.as_ptr()) {
            s.break_link();
        }
    }
}

/// Handles one back-end request; `true` for success. Anything malformed or unknown
/// is refused and changes nothing.
pub(super) fn handle_backend_req(s: &Shared, h: &Header, body: &[u8]) -> bool {
    let well_formed = h.flags & wire::flags::VERSION_MASK == wire::flags::VERSION
        && h.flags & wire::flags::REPLY == 0
        && h.request == wire::backend_req::IOTLB_MSG;
    let msg = wire::IotlbMsg::read_from_bytes(body)
        .ok()
        .filter(|_| well_formed);
    let Some(msg) = msg else {
        bump(&s.counters.bad_messages);
        return false;
    };
    match msg.kind {
        wire::iotlb::MISS => s.answer_miss(msg.iova, msg.perm),
        wire::iotlb::ACCESS_FAIL => {
            bump(&s.counters.access_fails);
            if let Some(a) = access_of(msg.perm) {
                s.fault(msg.iova, a);
            }
            true
        }
        _ => {
            bump(&s.counters.bad_messages);
            false
        }
    }
}

pub(super) fn spawn_backend_req(
    shared: &Arc<Shared>,
    sock: UnixStream,
    link: &Arc<Link>,
) -> Result<(), VhostUserError> {
    let (w, l) = (Arc::downgrade(shared), Arc::downgrade(link));
    std::thread::Builder::new()
        .name("aperture-vhost-req".into())
        .spawn(move || backend_req_loop(w, sock, l))
        .map(drop)
        .map_err(|source| VhostUserError::Io { request: 0, source })
}
