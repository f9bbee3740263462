//! The copy form of implicit grants: [`CopyShadow`].

use crate::chain::{collect_chain, ChainError, Desc, DESC_SIZE, F_NEXT, F_WRITE};
use crate::memory::ShadowMemory;
use std::collections::{BTreeMap, HashSet};
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VRING_USED_F_NO_NOTIFY`: the back-end does not want kicks.
const USED_F_NO_NOTIFY: u16 = 1;
/// Allocation granule of the arena.
const ARENA_ALIGN: u64 = 64;

/// How big a shadow is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowConfig {
    /// Entries of the shadow ring: a power of two up to 32768, at least the guest's
    /// queue size (every guest chain in flight needs one shadow head).
    pub queue_size: u16,
    /// Bytes of the bounce arena: what can be in flight at once.
    pub arena_bytes: u64,
    /// Where the back-end sees the shadow's memory (its memory-table address): every
    /// ring and buffer address the shadow hands out lies in `[base, base + size)`.
    pub base: u64,
    /// The device's error status (virtio-blk's `VIRTIO_BLK_S_IOERR`), written into the
    /// last writable byte of a request the shadow completes without the back-end: one
    /// larger than the whole shadow, and every request in flight when the back-end is
    /// cut off. `None` for a device without a status byte (virtio-rng).
    pub fail_status: Option<u8>,
}

/// What one [`CopyShadow::pull`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pulled {
    /// Requests posted to the back-end.
    pub posted: usize,
    /// Requests completed at once with the failure status: each larger than the whole
    /// shadow, so it could never be posted.
    pub refused: usize,
    /// Whether the guest asked for an interrupt for those completions.
    pub interrupt: bool,
}

/// What the shadow has done, and what the back-end can reach now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests in flight at the back-end.
    pub in_flight: usize,
    /// Guest bytes the back-end can reach now: copies of the in-flight readable buffers,
    /// and (map form) the whole pages of the windows open onto guest memory.
    pub exposed_bytes: u64,
    /// The most it could read at once.
    pub peak_exposed_bytes: u64,
    /// Requests posted to the back-end.
    pub posted: u64,
    /// Requests completed to the guest.
    pub completed: u64,
    /// Times a request waited in the guest's ring for arena space or descriptors.
    pub waits: u64,
    /// Used lengths the back-end reported beyond the writable bytes (clamped).
    pub clamped: u64,
    /// Requests larger than the whole shadow, completed with the failure status.
    pub refused: u64,
    /// Bytes copied between the guest's buffers and the arena, both ways.
    pub copied_bytes: u64,
}

/// Why the shadow stopped. The carrier then sets DEVICE_NEEDS_RESET (a guest error)
/// or cuts the back-end off (a back-end error).
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The guest's avail index ran more than a queue's size ahead.
    #[error("the guest's avail index moved {0} entries, more than the queue holds")]
    AvailJump(u16),
    /// The guest made a head available that is already in flight.
    #[error("the guest made head {0} available while it is in flight")]
    HeadInFlight(u16),
    /// A malformed guest chain.
    #[error("guest chain at head {head}: {source}")]
    Chain {
        /// Its head.
        head: u16,
        /// What is wrong.
        #[source]
        source: ChainError,
    },
    /// A guest buffer the device host cannot read.
    #[error("guest buffer at {0:#x} cannot be read")]
    GuestMemory(u64),
    /// The guest's ring cannot be read or written.
    #[error("guest ring: {0}")]
    GuestRing(#[from] virtio_queue::Error),
    /// The back-end's used index ran past what is in flight.
    #[error("the back-end's used index moved {moved} entries with {in_flight} in flight")]
    UsedJump {
        /// Entries it claims.
        moved: u16,
        /// Entries in flight.
        in_flight: usize,
    },
    /// The back-end returned an id that is not in flight (forged, or a duplicate).
    #[error("the back-end returned id {0}, which is not in flight")]
    UnknownId(u32),
    /// The shadow's own memory failed (never on a healthy host).
    #[error("shadow memory at {0:#x}")]
    Shadow(u64),
    /// A window onto guest memory could not be opened (map form).
    #[error("cannot open a window for the back-end: {0}")]
    Window(WindowError),
}

/// The map form's windows: a guest buffer the back-end is shown in place, through an
/// address the carrier maps for it (a vhost-user IOTLB UPDATE), instead of a bounce
/// copy. The shadow asks for every buffer of a chain it posts and closes a request's
/// windows before the guest sees that request used.
pub trait Windows {
    /// Whether `d` is shown in place; otherwise it is bounced. A writable buffer that
    /// does not cover whole pages must be bounced: the back-end could write the rest of
    /// its pages.
    fn wants(&self, d: &Desc) -> bool;
    /// Opens a window onto `d` and returns the back-end's address of `d.addr`. When
    /// this returns, the back-end can reach it.
    ///
    /// # Errors
    /// The back-end could not be told; the shadow then closes what it opened for the
    /// chain and fails.
    fn open(&mut self, d: &Desc) -> Result<u64, WindowError>;
    /// Closes the windows `(back-end address, length)` of one request; when this
    /// returns the back-end can no longer reach them (or has been cut off).
    fn close(&mut self, windows: &[(u64, u32)]);
    /// Guest bytes a window onto `d` exposes (whole pages).
    fn exposed(&self, d: &Desc) -> u64;
}

/// Why a window could not be opened.
pub type WindowError = Box<dyn std::error::Error + Send + Sync>;

/// The copy form: every buffer is bounced.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyAll;

impl Windows for CopyAll {
    fn wants(&self, _d: &Desc) -> bool {
        false
    }
    fn open(&mut self, _d: &Desc) -> Result<u64, WindowError> {
        Err("the copy form opens no windows".into())
    }
    fn close(&mut self, _windows: &[(u64, u32)]) {}
    fn exposed(&self, _d: &Desc) -> u64 {
        0
    }
}

/// A request in flight at the back-end.
#[derive(Debug)]
struct Slot {
    guest_head: u16,
    /// The guest's chain, as read once.
    descs: Vec<Desc>,
    /// Per descriptor: the back-end address of its window, or `None`: bounced.
    windows: Vec<Option<u64>>,
    /// Its shadow descriptor indices, head first.
    shadow: Vec<u16>,
    arena_off: u64,
    /// Arena bytes it holds: its bounced readable bytes, then its bounced writable ones.
    arena_len: u64,
    bounced_readable: u64,
    /// All its writable bytes, bounced or shown: what a used length may claim.
    writable: u64,
    /// Guest bytes the back-end can reach through it (bounced readable bytes and
    /// whole-page windows).
    exposed: u64,
    /// When it was posted, for the carrier's deadline.
    posted_at: Instant,
}

impl Slot {
    fn open_windows(&self) -> Vec<(u64, u32)> {
        self.descs
            .iter()
            .zip(&self.windows)
            .filter_map(|(d, w)| w.map(|a| (a, d.len)))
            .collect()
    }
}

/// A first-fit allocator of offsets in `[0, size)`, in 64-byte granules: the bounce
/// arena's, and the map form's IOVA space (whose lengths, whole pages, keep every
/// offset page-aligned).
#[derive(Debug)]
pub struct Arena {
    free: BTreeMap<u64, u64>,
}

impl Arena {
    /// All of `[0, size)` free.
    pub fn new(size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Self { free }
    }

    /// The lowest free offset with `len` bytes (rounded up to the granule) after it.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let (&off, &have) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&off);
        if have > len {
            self.free.insert(off + len, have - len);
        }
        Some(off)
    }

    /// Frees what [`Self::alloc`] gave for `len` at `off`.
    pub fn release(&mut self, off: u64, len: u64) {
        let mut off = off;
        let mut len = len.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        if let Some((&next, &nlen)) = self.free.range(off..).next() {
            if off + len == next {
                self.free.remove(&next);
                len += nlen;
            }
        }
        if let Some((&prev, &plen)) = self.free.range(..off).next_back() {
            if prev + plen == off {
                self.free.remove(&prev);
                off = prev;
                len += plen;
            }
        }
        self.free.insert(off, len);
    }
}

/// One queue's shadow, copy form (see the crate docs).
#[derive(Debug)]
pub struct CopyShadow {
    cfg: ShadowConfig,
    mem: ShadowMemory,
    desc_at: u64,
    avail_at: u64,
    used_at: u64,
    arena_at: u64,
    arena: Arena,
    free_descs: Vec<u16>,
    /// By shadow head.
    slots: Vec<Option<Slot>>,
    guest_in_flight: HashSet<u16>,
    next_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    /// The back-end negotiated `VIRTIO_RING_F_EVENT_IDX` (v1.3 §2.7.10): it says in
    /// `avail_event` when it wants a kick, and reads `used_event` for its calls.
    event_idx: bool,
    /// The avail index when the kick was last decided.
    kick_checked: Wrapping<u16>,
    stats: Stats,
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl CopyShadow {
    /// A shadow with its rings and arena in a new memfd.
    ///
    /// # Errors
    /// The kernel's, if the memfd cannot be made; `InvalidInput` for a queue size that
    /// is not a power of two in 1..=32768.
    pub fn new(cfg: ShadowConfig) -> std::io::Result<Self> {
        let q = u64::from(cfg.queue_size);
        if !cfg.queue_size.is_power_of_two() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("shadow queue size {} is not a power of two", cfg.queue_size),
            ));
        }
        // Rings first (virtio v1.3 §2.7: 16·n, 6 + 2·n and 6 + 8·n bytes), then the
        // arena on a page of its own; relative to `base` until mapped.
        let avail_off = q * DESC_SIZE;
        let used_off = align(avail_off + 6 + 2 * q, 4);
        let arena_off = align(used_off + 6 + 8 * q, 4096);
        let mem = ShadowMemory::new(
            "aperture-inflight",
            cfg.base,
            align(arena_off + cfg.arena_bytes, 4096),
        )?;
        let base = cfg.base;
        let (desc_at, avail_at, used_at, arena_at) =
            (base, base + avail_off, base + used_off, base + arena_off);
        Ok(Self {
            cfg,
            mem,
            desc_at,
            avail_at,
            used_at,
            arena_at,
            arena: Arena::new(cfg.arena_bytes),
            free_descs: (0..cfg.queue_size).rev().collect(),
            slots: (0..cfg.queue_size).map(|_| None).collect(),
            guest_in_flight: HashSet::new(),
            next_avail: Wrapping(0),
            last_used: Wrapping(0),
            event_idx: false,
            kick_checked: Wrapping(0),
            stats: Stats::default(),
        })
    }

    /// The memory the back-end is given: rings and arena, nothing of the guest's.
    pub fn memory(&self) -> &ShadowMemory {
        &self.mem
    }

    /// Addresses of the shadow ring in [`Self::memory`]: descriptor table, avail ring,
    /// used ring.
    pub fn ring(&self) -> (u64, u64, u64) {
        (self.desc_at, self.avail_at, self.used_at)
    }

    /// The shadow ring's size.
    pub fn queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    /// The counters and the exposure now.
    pub fn stats(&self) -> Stats {
        Stats {
            in_flight: self.guest_in_flight.len(),
            ..self.stats
        }
    }

    /// When the oldest request in flight was posted to the back-end (`None` when
    /// nothing is in flight): the carrier cuts off a back-end that keeps one too long.
    pub fn oldest_posted(&self) -> Option<Instant> {
        self.slots.iter().flatten().map(|s| s.posted_at).min()
    }

    /// Sets whether the back-end negotiated `VIRTIO_RING_F_EVENT_IDX` (before it is
    /// activated). With it, [`Self::needs_kick`] follows the back-end's `avail_event`
    /// and the shadow keeps `used_event` at the last completion it took, so every new
    /// completion is called.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Whether the back-end wants a kick for what was posted since the last time this
    /// was asked: without EVENT_IDX unless it set `VRING_USED_F_NO_NOTIFY`; with it, if
    /// the avail index passed its `avail_event` (virtio v1.3 §2.7.10,
    /// `vring_need_event`).
    pub fn needs_kick(&mut self) -> bool {
        // The avail index just published must be visible before the back-end's field
        // is read: a back-end that stops polling writes it, then re-reads the index;
        // without a full fence both sides can miss each other (the store-to-load
        // reordering Linux's `virtio_mb` prevents) and the request waits forever.
        fence(Ordering::SeqCst);
        let (new, old) = (self.next_avail, self.kick_checked);
        self.kick_checked = new;
        let m = self.mem.mem();
        if self.event_idx {
            let at = self.used_at + 4 + 8 * u64::from(self.cfg.queue_size);
            return m
                .load::<u16>(GuestAddress(at), Ordering::Acquire)
                .map_or(true, |e| {
                    (new - Wrapping(u16::from_le(e)) - Wrapping(1)) < (new - old)
                });
        }
        m.load::<u16>(GuestAddress(self.used_at), Ordering::Acquire)
            .map_or(true, |f| u16::from_le(f) & USED_F_NO_NOTIFY == 0)
    }

    /// Takes what the guest made available on `guest`: each chain is read once and
    /// checked, its readable bytes copied into the arena, its writable ones zeroed
    /// there, and a chain of the same shape posted on the shadow ring. Stops, leaving
    /// the rest in the guest's ring, when the arena or the shadow ring is full. A chain
    /// larger than the whole shadow could never be posted: it is completed at once
    /// with [`ShadowConfig::fail_status`], and the device goes on.
    ///
    /// # Errors
    /// [`ShadowError`] for a malformed guest ring or chain; nothing of that chain is
    /// granted, and what came before it stays posted.
    pub fn pull<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
    ) -> Result<Pulled, ShadowError> {
        self.pull_with(guest, mem, &mut CopyAll)
    }

    /// [`Self::pull`], showing the buffers `windows` wants in place (the map form):
    /// their windows are open before the back-end can see the request.
    ///
    /// # Errors
    /// As [`Self::pull`]; [`ShadowError::Window`] when a window cannot be opened (the
    /// chain's other windows are closed again and nothing of it is posted).
    pub fn pull_with<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
        windows: &mut dyn Windows,
    ) -> Result<Pulled, ShadowError> {
        let avail_idx = guest.avail_idx(mem, Ordering::Acquire)?;
        let mut next = Wrapping(guest.next_avail());
        let pending = (avail_idx - next).0;
        if pending > guest.size() {
            return Err(ShadowError::AvailJump(pending));
        }
        let mut done = Pulled::default();
        while next != avail_idx {
            let slot_at = guest.avail_ring() + 4 + 2 * u64::from(next.0 % guest.size());
            let head = mem
                .load::<u16>(GuestAddress(slot_at), Ordering::Acquire)
                .map(u16::from_le)
                .map_err(|_| ShadowError::GuestMemory(slot_at))?;
            if self.guest_in_flight.contains(&head) {
                return Err(ShadowError::HeadInFlight(head));
            }
            let descs = collect_chain(mem, GuestAddress(guest.desc_table()), guest.size(), head)
                .map_err(|source| ShadowError::Chain { head, source })?;
            let bounced = |w: bool| -> u64 {
                descs
                    .iter()
                    .filter(|d| d.write == w && !windows.wants(d))
                    .map(|d| u64::from(d.len))
                    .sum()
            };
            let (readable, writable) = (bounced(false), bounced(true));
            let n = descs.len().max(1);
            let bytes = readable + writable;
            if n > usize::from(self.cfg.queue_size) || bytes > self.cfg.arena_bytes {
                let len = self.fail_chain(&descs, mem);
                next += Wrapping(1);
                guest.set_next_avail(next.0);
                guest.add_used(mem, head, len)?;
                self.stats.refused += 1;
                done.refused += 1;
                continue;
            }
            if n > self.free_descs.len() {
                self.stats.waits += 1;
                break;
            }
            let Some(off) = self.arena.alloc(bytes) else {
                self.stats.waits += 1;
                break;
            };
            if let Err(e) = self.post(head, descs, off, readable, mem, windows) {
                self.arena.release(off, bytes);
                return Err(e);
            }
            next += Wrapping(1);
            guest.set_next_avail(next.0);
            done.posted += 1;
        }
        if done.refused > 0 {
            done.interrupt = guest.needs_notification(mem)?;
        }
        if done.posted > 0 {
            // Descriptors and ring entries before the index the back-end reads.
            fence(Ordering::Release);
            self.mem
                .mem()
                .store(
                    self.next_avail.0.to_le(),
                    GuestAddress(self.avail_at + 2),
                    Ordering::Release,
                )
                .map_err(|_| ShadowError::Shadow(self.avail_at + 2))?;
        }
        Ok(done)
    }

    /// Writes the failure status into a chain's last writable byte (virtio-blk's status
    /// byte, v1.3 §5.2.6); returns the bytes written for its used element (1, or 0 when
    /// there is no status, no writable byte, or the guest's memory refuses it).
    fn fail_chain<M: GuestMemory>(&self, descs: &[Desc], mem: &M) -> u32 {
        let Some(status) = self.cfg.fail_status else {
            return 0;
        };
        let Some(last) = descs.iter().rev().find(|d| d.write && d.len > 0) else {
            return 0;
        };
        // collect_chain checked that no buffer wraps the address space.
        let at = last.addr + u64::from(last.len) - 1;
        u32::from(mem.write_obj(status, GuestAddress(at)).is_ok())
    }

    /// Opens the chain's windows, copies its bounced buffers into the arena at `off`
    /// (readable ones first, `readable` bytes, then writable ones) and writes its shadow
    /// chain.
    fn post<M: GuestMemory>(
        &mut self,
        head: u16,
        descs: Vec<Desc>,
        off: u64,
        readable: u64,
        mem: &M,
        windows: &mut dyn Windows,
    ) -> Result<(), ShadowError> {
        let smem = self.mem.mem();
        // Copy in first: a guest buffer that cannot be read fails the chain before any
        // shadow state changes. Each descriptor's address for the back-end: its window
        // or its place in the arena.
        let (mut r_at, mut w_at) = (self.arena_at + off, self.arena_at + off + readable);
        let mut addrs = Vec::with_capacity(descs.len());
        let mut shown: Vec<Option<u64>> = Vec::with_capacity(descs.len());
        let mut exposed = 0;
        for d in &descs {
            let len = usize::try_from(d.len).unwrap_or(usize::MAX);
            if windows.wants(d) {
                addrs.push(0);
                shown.push(Some(0));
                exposed += windows.exposed(d);
            } else if d.write {
                zero(smem, w_at, len)?;
                addrs.push(w_at);
                shown.push(None);
                w_at += u64::from(d.len);
            } else {
                if len > 0 {
                    let mut buf = vec![0u8; len];
                    mem.read_slice(&mut buf, GuestAddress(d.addr))
                        .map_err(|_| ShadowError::GuestMemory(d.addr))?;
                    smem.write_slice(&buf, GuestAddress(r_at))
                        .map_err(|_| ShadowError::Shadow(r_at))?;
                }
                addrs.push(r_at);
                shown.push(None);
                r_at += u64::from(d.len);
                exposed += u64::from(d.len);
                self.stats.copied_bytes += u64::from(d.len);
            }
        }
        // Then the windows, each open before the back-end can see the request.
        let mut opened = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            if shown[i].is_none() {
                continue;
            }
            match windows.open(d) {
                Ok(a) => {
                    addrs[i] = a;
                    shown[i] = Some(a);
                    opened.push((a, d.len));
                }
                Err(e) => {
                    windows.close(&opened);
                    return Err(ShadowError::Window(e));
                }
            }
        }
        let n = descs.len().max(1);
        let shadow: Vec<u16> = (0..n).filter_map(|_| self.free_descs.pop()).collect();
        for (i, &idx) in shadow.iter().enumerate() {
            let (len, write) = descs.get(i).map_or((0, false), |d| (d.len, d.write));
            let at = addrs.get(i).copied().unwrap_or(self.arena_at + off);
            let mut flags = if write { F_WRITE } else { 0 };
            let next = shadow.get(i + 1).copied();
            if next.is_some() {
                flags |= F_NEXT;
            }
            let mut raw = [0u8; DESC_SIZE as usize];
            raw[0..8].copy_from_slice(&at.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            let d_at = self.desc_at + u64::from(idx) * DESC_SIZE;
            smem.write_slice(&raw, GuestAddress(d_at))
                .map_err(|_| ShadowError::Shadow(d_at))?;
        }
        let first = shadow[0];
        let ring_at = self.avail_at + 4 + 2 * u64::from(self.next_avail.0 % self.cfg.queue_size);
        smem.write_obj(first.to_le(), GuestAddress(ring_at))
            .map_err(|_| ShadowError::Shadow(ring_at))?;
        self.next_avail += Wrapping(1);
        self.guest_in_flight.insert(head);
        let writable = descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum();
        self.slots[usize::from(first)] = Some(Slot {
            guest_head: head,
            descs,
            windows: shown,
            shadow,
            arena_off: off,
            arena_len: w_at - (self.arena_at + off),
            bounced_readable: readable,
            writable,
            exposed,
            posted_at: Instant::now(),
        });
        self.stats.posted += 1;
        self.stats.exposed_bytes += exposed;
        self.stats.peak_exposed_bytes = self.stats.peak_exposed_bytes.max(self.stats.exposed_bytes);
        Ok(())
    }

    /// Takes what the back-end returned: each id is checked against what is in flight,
    /// at most `min(used len, writable bytes)` is copied back to the guest's writable
    /// buffers, and the guest's chain goes to its used ring. Returns whether the guest
    /// asked for an interrupt.
    ///
    /// # Errors
    /// [`ShadowError::UsedJump`] or [`ShadowError::UnknownId`] for a hostile back-end
    /// (what it returned before stays completed; the guest's ring is not touched for
    /// the refused entry), [`ShadowError::GuestRing`] if the guest's used ring cannot
    /// be written.
    pub fn complete<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
    ) -> Result<bool, ShadowError> {
        self.complete_with(guest, mem, &mut CopyAll)
    }

    /// [`Self::complete`], closing each request's windows (map form) before the guest
    /// sees it used.
    ///
    /// # Errors
    /// As [`Self::complete`].
    pub fn complete_with<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
        windows: &mut dyn Windows,
    ) -> Result<bool, ShadowError> {
        let mut any = false;
        loop {
            let used_idx = self.used_idx()?;
            let moved = (Wrapping(used_idx) - self.last_used).0;
            let in_flight = self.guest_in_flight.len();
            if usize::from(moved) > in_flight {
                return Err(ShadowError::UsedJump { moved, in_flight });
            }
            for _ in 0..moved {
                self.complete_one(guest, mem, windows)?;
                any = true;
            }
            if !self.event_idx {
                break;
            }
            // Call us for the next completion (used_event, after the avail ring), then
            // look again: a completion published before the back-end could see the new
            // used_event was not called (v1.3 §2.7.10; Linux's virtqueue_enable_cb).
            let at = self.avail_at + 4 + 2 * u64::from(self.cfg.queue_size);
            self.mem
                .mem()
                .store(
                    self.last_used.0.to_le(),
                    GuestAddress(at),
                    Ordering::Release,
                )
                .map_err(|_| ShadowError::Shadow(at))?;
            fence(Ordering::SeqCst);
            if self.used_idx()? == self.last_used.0 {
                break;
            }
        }
        if !any {
            return Ok(false);
        }
        Ok(guest.needs_notification(mem)?)
    }

    /// The back-end's used index.
    fn used_idx(&self) -> Result<u16, ShadowError> {
        self.mem
            .mem()
            .load::<u16>(GuestAddress(self.used_at + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| ShadowError::Shadow(self.used_at + 2))
    }

    /// Takes the back-end's next used element: checked, its windows closed, what it
    /// wrote copied back, and its chain used in the guest's ring.
    fn complete_one<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
        windows: &mut dyn Windows,
    ) -> Result<(), ShadowError> {
        let e_at = self.used_at + 4 + 8 * u64::from(self.last_used.0 % self.cfg.queue_size);
        let mut raw = [0u8; 8];
        self.mem
            .mem()
            .read_slice(&mut raw, GuestAddress(e_at))
            .map_err(|_| ShadowError::Shadow(e_at))?;
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .and_then(Option::take)
            .ok_or(ShadowError::UnknownId(id))?;
        self.last_used += Wrapping(1);
        let written = if u64::from(len) > slot.writable {
            self.stats.clamped += 1;
            slot.writable
        } else {
            u64::from(len)
        };
        // Revoke before return: the windows close before the guest sees it used.
        windows.close(&slot.open_windows());
        self.copy_back(&slot, written, mem);
        let r = guest.add_used(mem, slot.guest_head, written as u32);
        self.retire(slot);
        r?;
        Ok(())
    }

    /// Copies the first `written` bytes the back-end wrote back to the guest's writable
    /// buffers, in order: a bounced buffer from the arena; a buffer shown in place
    /// already holds its bytes.
    fn copy_back<M: GuestMemory>(&mut self, slot: &Slot, written: u64, mem: &M) {
        let mut left = written;
        let mut at = self.arena_at + slot.arena_off + slot.bounced_readable;
        for (d, w) in slot
            .descs
            .iter()
            .zip(&slot.windows)
            .filter(|(d, _)| d.write)
        {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(d.len));
            left -= n;
            if w.is_some() {
                continue;
            }
            let mut buf = vec![0u8; n as usize];
            if self
                .mem
                .mem()
                .read_slice(&mut buf, GuestAddress(at))
                .is_ok()
            {
                // A guest buffer that vanished (memory hot-unplug) loses its bytes; the
                // request still completes.
                let _ = mem.write_slice(&buf, GuestAddress(d.addr));
                self.stats.copied_bytes += n;
            }
            at += u64::from(d.len);
        }
    }

    fn retire(&mut self, slot: Slot) {
        self.arena.release(slot.arena_off, slot.arena_len);
        self.free_descs.extend(slot.shadow.iter().rev());
        self.guest_in_flight.remove(&slot.guest_head);
        self.stats.exposed_bytes -= slot.exposed;
        self.stats.completed += 1;
    }

    /// Cuts the back-end off: every request in flight completes to the guest with no
    /// bytes copied back, except [`ShadowConfig::fail_status`] written into the last
    /// writable byte of each chain that has one. The shadow is then empty; the
    /// back-end's later writes to its used ring are never read.
    ///
    /// # Errors
    /// [`ShadowError::GuestRing`] if the guest's used ring cannot be written.
    pub fn fail_all<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
    ) -> Result<usize, ShadowError> {
        self.fail_all_with(guest, mem, &mut CopyAll)
    }

    /// [`Self::fail_all`], closing each request's windows first (map form).
    ///
    /// # Errors
    /// As [`Self::fail_all`].
    pub fn fail_all_with<M: GuestMemory>(
        &mut self,
        guest: &mut Queue,
        mem: &M,
        windows: &mut dyn Windows,
    ) -> Result<usize, ShadowError> {
        let mut n = 0;
        for i in 0..self.slots.len() {
            let Some(slot) = self.slots[i].take() else {
                continue;
            };
            windows.close(&slot.open_windows());
            let len = self.fail_chain(&slot.descs, mem);
            let r = guest.add_used(mem, slot.guest_head, len);
            self.retire(slot);
            r?;
            n += 1;
        }
        self.reset();
        Ok(n)
    }

    /// Forgets everything (device reset): no request in flight, the shadow ring at its
    /// start, its memory zeroed.
    pub fn reset(&mut self) {
        for s in &mut self.slots {
            *s = None;
        }
        self.arena = Arena::new(self.cfg.arena_bytes);
        self.free_descs = (0..self.cfg.queue_size).rev().collect();
        self.guest_in_flight.clear();
        self.next_avail = Wrapping(0);
        self.last_used = Wrapping(0);
        self.kick_checked = Wrapping(0);
        self.stats.exposed_bytes = 0;
        let _ = zero(
            self.mem.mem(),
            self.mem.base(),
            usize::try_from(self.mem.size()).unwrap_or(usize::MAX),
        );
    }
}

fn zero<M: GuestMemory>(mem: &M, at: u64, len: usize) -> Result<(), ShadowError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len());
        mem.write_slice(&ZEROS[..n], GuestAddress(at + done as u64))
            .map_err(|_| ShadowError::Shadow(at + done as u64))?;
        done += n;
    }
    Ok(())
}
