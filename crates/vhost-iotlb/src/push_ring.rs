//! The push ring: IOTLB updates a front-end pushes without a message.
//!
//! A front-end that pushes an UPDATE for every mapping the guest makes sends one
//! message per guest MAP, and each one wakes the back-end thread that reads the main
//! socket: on a 2-CPU machine, one more thread to run beside the vCPU and the
//! front-end's poller for every 4 KiB the guest maps. Aperture's two ends share a ring
//! instead, a private extension of vhost-user (both sides offer it, a front-end that
//! does not know it never acks it):
//!
//! - protocol feature [`protocol::APERTURE_PUSH_RING`](crate::wire::protocol::APERTURE_PUSH_RING)
//!   (bit 63), then request [`req::APERTURE_SET_PUSH_RING`](crate::wire::req::APERTURE_SET_PUSH_RING)
//!   with the ring's capacity (`u64`) and one file descriptor: a sealed memfd of
//!   [`ring_bytes`] bytes;
//! - the front-end writes entries and then `head` (release); the back-end reads them
//!   and then writes `tail` (release). Nobody waits and nobody is woken: the back-end
//!   reads the ring when it needs a translation it does not hold, and before it applies
//!   any IOTLB message from the socket, so that an INVALIDATE (always a message: it
//!   needs its acknowledgement) never overtakes a push made before it.
//!
//! Invalidations can go the same way, to a back-end whose worker is polling: the
//! front-end writes them to a second ring, the worker applies them on its next pass
//! (outside any batch, so nothing waits) and acknowledges by moving that ring's tail,
//! which the front-end's poller watches. Each side says when it polls, so that
//! neither waits for a look the other will not take: the worker clears its flag, then
//! fences and looks once more ([`Consumer::set_polling`]); the front-end writes, fences
//! and sends the INVALIDATE as a message too if the worker no longer polls
//! ([`Producer::peer_polling`]).
//!
//! A back-end that maps guest RAM whole ([`MapPolicy::Whole`](crate::space::MapPolicy))
//! needs neither: it says so in the ring's page, and keeps there the count of its
//! views of guest memory alive ([`Consumer::set_views`]). Each view counts itself,
//! fences and applies the ring before it translates anything; the front-end writes the
//! invalidation, fences and reads the count ([`Producer::peer_views`]). With no view
//! alive the invalidation is complete at once: whatever view comes next applies it
//! first. With views alive, it is complete too if none of the windows they translated
//! through overlaps it: each view publishes those (`hazards`, [`Consumer::add_hazard`])
//! before it uses them, fences, and checks the invalidations once more; the front-end
//! writes, fences and reads them ([`Producer::peer_clear_of`]). Otherwise the
//! front-end sends the INVALIDATE as a message as well.
//!
//! Layout: `head` (u64) at 0, `tail` at 64, the invalidations' `head` at 128 and
//! `tail` at 192, the worker's polling flag at 256, the views alive at 320, the
//! whole-mapping flag at 384, the hazards' count at 448 (`u64::MAX`: any window) and
//! [`HAZARD_CAPACITY`] hazards from 512, each two words: first and last IOVA; then
//! the push entries, each four u64 words: IOVA, size, front-end user address,
//! `iotlb` permission; then [`INV_CAPACITY`] invalidations of three words: IOVA,
//! size, and the pushes written before it, so that the back-end applies each
//! invalidation after exactly the pushes that came before it, whichever ring it reads
//! first ([`Invalidation::after`]). Every word is read and written as an atomic,
//! so the other side writing at any moment is never undefined behaviour here, only a
//! wrong value, which each side checks: the back-end validates
//! an entry as it would the message (and the address space validates it again), the
//! front-end treats a `tail` that is not between `head - capacity` and `head` as a full
//! ring and falls back to messages.

use crate::mmap::{Mapping, MmapError};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

const HEAD: usize = 0;
const TAIL: usize = 64;
const INV_HEAD: usize = 128;
const INV_TAIL: usize = 192;
const POLLING: usize = 256;
const VIEWS: usize = 320;
const WHOLE: usize = 384;
const HAZARDS: usize = 448;
const HAZARD_ENTRIES: usize = 512;
/// Windows the back-end's views may be using that its ring page can name; past it the
/// page says "any".
pub const HAZARD_CAPACITY: u64 = 512;
const ENTRIES: usize = HAZARD_ENTRIES + HAZARD_CAPACITY as usize * 16;
const ENTRY_WORDS: usize = 4;
const INV_WORDS: usize = 3;

/// Invalidations the ring holds at once.
pub const INV_CAPACITY: u64 = 256;

/// Largest capacity a back-end accepts (entries): 2 MiB of ring.
pub const MAX_CAPACITY: u64 = 1 << 16;

/// [`RingError::Capacity`] unless `capacity` is a power of two up to [`MAX_CAPACITY`].
fn check_capacity(capacity: u64) -> Result<(), RingError> {
    if capacity.is_power_of_two() && capacity <= MAX_CAPACITY {
        Ok(())
    } else {
        Err(RingError::Capacity(capacity))
    }
}

/// Bytes of a ring of `capacity` entries (and [`INV_CAPACITY`] invalidations).
pub fn ring_bytes(capacity: u64) -> u64 {
    ENTRIES as u64 + capacity * (ENTRY_WORDS as u64 * 8) + INV_CAPACITY * (INV_WORDS as u64 * 8)
}

/// One pushed window: `[iova, iova + size)` at front-end address `uaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Push {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// The front-end's user address of `iova`.
    pub uaddr: u64,
    /// [`iotlb`](crate::wire::iotlb) permission.
    pub perm: u8,
}

/// One invalidation from the ring: `[iova, iova + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// How many pushes the front-end had written when it wrote this one: apply those
    /// first and no later one (which may map the same IOVAs again).
    pub after: u64,
}

/// Why a ring handed over cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The capacity is 0, not a power of two, or above [`MAX_CAPACITY`].
    #[error("push ring capacity {0} is not a power of two in 1..={MAX_CAPACITY}")]
    Capacity(u64),
    /// The file is smaller than the ring.
    #[error("push ring file has {got} bytes, a ring of {capacity} entries needs {needed}")]
    Size {
        /// Entries.
        capacity: u64,
        /// Bytes needed.
        needed: u64,
        /// File size.
        got: u64,
    },
    /// The file can shrink under the mapping (an access would then raise SIGBUS).
    #[error("push ring file is not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    /// A system call failed.
    #[error("push ring: {0}")]
    Io(#[from] io::Error),
    /// The mapping failed.
    #[error("push ring: {0}")]
    Map(#[from] MmapError),
}

/// The mapped ring, as either side sees it.
#[derive(Debug)]
struct Shm {
    map: Mapping,
    capacity: u64,
}

impl Shm {
    fn word(&self, byte_offset: usize) -> &AtomicU64 {
        debug_assert!(
            byte_offset.is_multiple_of(8) && (byte_offset as u64) < ring_bytes(self.capacity)
        );
        // SAFETY: the mapping is `ring_bytes(capacity)` long at least (checked by both
        // constructors), page-aligned, and lives as long as `self`; every caller passes an
        // offset below that bound that is a multiple of 8, so the pointer is in bounds
        // and aligned for an AtomicU64. The memory is shared with another process, which
        // is exactly what atomics allow: no Rust reference to it exists other than these.
        unsafe { &*self.map.ptr().add(byte_offset).cast::<AtomicU64>() }
    }

    fn entry(&self, index: u64, word: usize) -> &AtomicU64 {
        let slot = (index & (self.capacity - 1)) as usize;
        self.word(ENTRIES + (slot * ENTRY_WORDS + word) * 8)
    }

    fn hazard_word(&self, index: u64, word: usize) -> &AtomicU64 {
        // `index` < HAZARD_CAPACITY (callers check): inside the hazard area.
        self.word(HAZARD_ENTRIES + (index as usize * 2 + word) * 8)
    }

    fn hazard(&self, index: u64, word: usize) -> u64 {
        self.hazard_word(index, word).load(Ordering::Relaxed)
    }

    fn inv_entry(&self, index: u64, word: usize) -> &AtomicU64 {
        let slot = (index & (INV_CAPACITY - 1)) as usize;
        let base = ENTRIES + self.capacity as usize * ENTRY_WORDS * 8;
        self.word(base + (slot * INV_WORDS + word) * 8)
    }
}

/// The front-end's end: writes pushes.
#[derive(Debug)]
pub struct Producer {
    shm: Shm,
    /// Our own count of entries written; the shared `head` only mirrors it.
    head: AtomicU64,
    /// The same for invalidations: the page is the back-end's to write as well.
    inv_head: AtomicU64,
}

impl Producer {
    /// A new ring of `capacity` entries in a sealed memfd; returns the file to send.
    ///
    /// # Errors
    /// [`RingError::Capacity`], or the memfd or its mapping failed.
    pub fn create(capacity: u64) -> Result<(Self, File), RingError> {
        check_capacity(capacity)?;
        let bytes = ring_bytes(capacity);
        // SAFETY: the name is a NUL-terminated literal; the call creates a new fd.
        let fd = unsafe {
            libc::memfd_create(
                c"aperture-iotlb-push".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let map = Mapping::new(&file, 0, bytes, true)?;
        Ok((
            Self {
                shm: Shm { map, capacity },
                head: AtomicU64::new(0),
                inv_head: AtomicU64::new(0),
            },
            file,
        ))
    }

    /// Entries the ring holds.
    pub fn capacity(&self) -> u64 {
        self.shm.capacity
    }

    /// Writes `p`; `false` when the ring is full (or the back-end's `tail` makes no
    /// sense), and nothing was written. Callers serialise pushes.
    pub fn push(&self, p: &Push) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.shm.word(TAIL).load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        if used >= self.shm.capacity {
            return false;
        }
        let words = [p.iova, p.size, p.uaddr, u64::from(p.perm)];
        for (i, w) in words.into_iter().enumerate() {
            self.shm.entry(head, i).store(w, Ordering::Relaxed);
        }
        let next = head.wrapping_add(1);
        self.head.store(next, Ordering::Relaxed);
        self.shm.word(HEAD).store(next, Ordering::Release);
        true
    }

    /// Writes an invalidation of `[iova, iova + size)`; returns its sequence number
    /// (done once [`Self::invalidated`] reaches it), or `None` when the invalidation
    /// ring is full. Callers serialise invalidations, and follow the protocol in
    /// [`Self::peer_polling`].
    pub fn invalidate(&self, iova: u64, size: u64) -> Option<u64> {
        let head = self.inv_head.load(Ordering::Relaxed);
        let tail = self.shm.word(INV_TAIL).load(Ordering::Acquire);
        if head.wrapping_sub(tail) >= INV_CAPACITY {
            return None;
        }
        self.shm.inv_entry(head, 0).store(iova, Ordering::Relaxed);
        self.shm.inv_entry(head, 1).store(size, Ordering::Relaxed);
        let pushed = self.head.load(Ordering::Relaxed);
        self.shm.inv_entry(head, 2).store(pushed, Ordering::Relaxed);
        let next = head.wrapping_add(1);
        self.inv_head.store(next, Ordering::Relaxed);
        self.shm.word(INV_HEAD).store(next, Ordering::Release);
        Some(next)
    }

    /// How many invalidations the back-end says it applied (a sequence number). Only
    /// `head` bounds it: a back-end can claim more than it did, as it can ack an
    /// INVALIDATE message it ignored (it holds the memory table's descriptors anyway).
    pub fn invalidated(&self) -> u64 {
        let head = self.inv_head.load(Ordering::Relaxed);
        let done = self.shm.word(INV_TAIL).load(Ordering::Acquire);
        if head.wrapping_sub(done) > INV_CAPACITY {
            head
        } else {
            done
        }
    }

    /// Whether the back-end's worker is polling, after a full fence. An invalidation
    /// written before this returned `true` will be applied by that worker, in a pass or
    /// in the look it takes after it stops polling ([`Consumer::set_polling`]); after
    /// `false` nothing says it will: send it as a message too.
    pub fn peer_polling(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.shm.word(POLLING).load(Ordering::Relaxed) != 0
    }

    /// Whether the back-end maps guest RAM whole, so that an invalidation is complete
    /// when no view of guest memory it had is left ([`Self::peer_views`]).
    pub fn peer_whole(&self) -> bool {
        self.shm.word(WHOLE).load(Ordering::Acquire) != 0
    }

    /// After a full fence: the views of guest memory the back-end has alive. An
    /// invalidation written before this said 0 is complete.
    pub fn peer_views(&self) -> u64 {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.shm.word(VIEWS).load(Ordering::Relaxed)
    }

    /// After [`Self::peer_views`] said views are alive: whether none of them may be
    /// using `[first, last]` (no window they published overlaps it). An invalidation
    /// of it written before is then complete as well.
    pub fn peer_clear_of(&self, first: u64, last: u64) -> bool {
        let n = self.shm.word(HAZARDS).load(Ordering::Acquire);
        if n > HAZARD_CAPACITY {
            return false;
        }
        (0..n).all(|i| {
            let (a, b) = (self.shm.hazard(i, 0), self.shm.hazard(i, 1));
            b < first || a > last
        })
    }
}

/// The back-end's end: reads pushes.
#[derive(Debug)]
pub struct Consumer {
    shm: Shm,
    tail: u64,
    /// The front-end moved `head` somewhere impossible: the ring is no longer read.
    broken: bool,
}

impl Consumer {
    /// Maps the ring the front-end sent.
    ///
    /// # Errors
    /// A bad capacity, a file too small or not sealed against shrinking, or a failed
    /// mapping.
    pub fn open(file: &File, capacity: u64) -> Result<Self, RingError> {
        check_capacity(capacity)?;
        let needed = ring_bytes(capacity);
        let got = file.metadata()?.len();
        if got < needed {
            return Err(RingError::Size {
                capacity,
                needed,
                got,
            });
        }
        // SAFETY: fcntl on a valid fd, no argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RingError::NotSealed);
        }
        let map = Mapping::new(file, 0, needed, true)?;
        let shm = Shm { map, capacity };
        let tail = shm.word(TAIL).load(Ordering::Acquire);
        Ok(Self {
            shm,
            tail,
            broken: false,
        })
    }

    /// Takes what was pushed since the last call, oldest first, at most a capacity's
    /// worth. Returns `None` once the front-end has moved `head` out of bounds: the
    /// ring is then read no more (its pushes become misses).
    pub fn take(&mut self) -> Option<Vec<Push>> {
        self.take_before(self.tail.wrapping_add(self.shm.capacity))
    }

    /// Entries the ring holds.
    pub fn capacity(&self) -> u64 {
        self.shm.capacity
    }

    /// Pushes taken so far: the number [`Invalidation::after`] counts in.
    pub fn taken(&self) -> u64 {
        self.tail
    }

    /// As [`Self::take`], but only pushes the front-end wrote before its `limit`-th
    /// (none if `limit` is behind what was taken already).
    pub fn take_before(&mut self, limit: u64) -> Option<Vec<Push>> {
        if self.broken {
            return None;
        }
        let head = self.shm.word(HEAD).load(Ordering::Acquire);
        let n = head.wrapping_sub(self.tail);
        if n > self.shm.capacity {
            self.broken = true;
            return None;
        }
        let until = limit.wrapping_sub(self.tail);
        let n = if until > self.shm.capacity {
            0
        } else {
            n.min(until)
        };
        let head = self.tail.wrapping_add(n);
        let mut out = Vec::with_capacity(n as usize);
        for k in 0..n {
            let at = self.tail.wrapping_add(k);
            let w = |i| self.shm.entry(at, i).load(Ordering::Relaxed);
            out.push(Push {
                iova: w(0),
                size: w(1),
                uaddr: w(2),
                // Out of range becomes 0, which no update accepts.
                perm: u8::try_from(w(3)).unwrap_or(0),
            });
        }
        if n > 0 {
            self.tail = head;
            self.shm.word(TAIL).store(head, Ordering::Release);
        }
        Some(out)
    }

    /// Drops whatever was pushed so far, unread.
    pub fn discard(&mut self) {
        let _ = self.take();
    }

    /// Says whether the worker polls. Turning it off fences: the caller must then look
    /// at the invalidations once more ([`Self::take_invalidations`]), since the
    /// front-end may have written one after its last look and seen it still polling.
    pub fn set_polling(&self, on: bool) {
        self.shm
            .word(POLLING)
            .store(u64::from(on), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The invalidations written since the last call, oldest first, and the sequence
    /// number to pass to [`Self::finish_invalidations`] once they are applied. Empty if
    /// the front-end moved its index out of bounds (its invalidations are then never
    /// acknowledged here, and its deadline cuts the connection).
    pub fn take_invalidations(&self) -> (Vec<Invalidation>, u64) {
        let tail = self.shm.word(INV_TAIL).load(Ordering::Relaxed);
        let head = self.shm.word(INV_HEAD).load(Ordering::Acquire);
        let n = head.wrapping_sub(tail);
        if n > INV_CAPACITY {
            return (Vec::new(), tail);
        }
        let out = (0..n)
            .map(|k| {
                let at = tail.wrapping_add(k);
                let w = |i| self.shm.inv_entry(at, i).load(Ordering::Relaxed);
                Invalidation {
                    iova: w(0),
                    size: w(1),
                    after: w(2),
                }
            })
            .collect();
        (out, head)
    }

    /// The [`Invalidation::after`] of the oldest invalidation not acknowledged yet:
    /// pushes from there on must wait for it.
    pub fn pending_after(&self) -> Option<u64> {
        let tail = self.shm.word(INV_TAIL).load(Ordering::Relaxed);
        let head = self.shm.word(INV_HEAD).load(Ordering::Acquire);
        let n = head.wrapping_sub(tail);
        (n > 0 && n <= INV_CAPACITY).then(|| self.shm.inv_entry(tail, 2).load(Ordering::Relaxed))
    }

    /// Acknowledges the invalidations up to `upto` (from [`Self::take_invalidations`]):
    /// call only once they are applied.
    pub fn finish_invalidations(&self, upto: u64) {
        self.shm.word(INV_TAIL).store(upto, Ordering::Release);
    }

    /// Says whether guest RAM is mapped whole here.
    pub fn set_whole(&self, whole: bool) {
        self.shm
            .word(WHOLE)
            .store(u64::from(whole), Ordering::Release);
    }

    /// Publishes the views alive; the caller serialises calls and fences before it
    /// next reads the ring.
    pub fn set_views(&self, active: u64) {
        self.shm.word(VIEWS).store(active, Ordering::SeqCst);
    }

    /// Publishes that a view may use `[first, last]` until no view is alive
    /// ([`Self::clear_hazards`]); past [`HAZARD_CAPACITY`] the page says "any". The
    /// caller serialises calls, and fences and looks at the invalidations
    /// ([`Self::pending_after`]) before it uses the window.
    pub fn add_hazard(&self, first: u64, last: u64) {
        let n = self.shm.word(HAZARDS).load(Ordering::Relaxed);
        if n >= HAZARD_CAPACITY {
            self.shm.word(HAZARDS).store(u64::MAX, Ordering::SeqCst);
            return;
        }
        self.shm.hazard_word(n, 0).store(first, Ordering::Relaxed);
        self.shm.hazard_word(n, 1).store(last, Ordering::Relaxed);
        self.shm.word(HAZARDS).store(n + 1, Ordering::SeqCst);
    }

    /// No view is alive: none uses anything.
    pub fn clear_hazards(&self) {
        self.shm.word(HAZARDS).store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;

    fn p(i: u64) -> Push {
        Push {
            iova: i << 12,
            size: 0x1000,
            uaddr: 0x7f00_0000_0000 + (i << 12),
            perm: 3,
        }
    }

    #[test]
    fn pushes_arrive_in_order_and_a_full_ring_refuses_without_writing() {
        let (prod, file) = Producer::create(4).unwrap();
        let mut cons = Consumer::open(&file, 4).unwrap();
        assert_eq!(cons.take().unwrap(), []);
        for i in 0..4 {
            assert!(prod.push(&p(i)));
        }
        assert!(!prod.push(&p(9)), "a fifth push does not fit");
        assert_eq!(cons.take().unwrap(), (0..4).map(p).collect::<Vec<_>>());
        // Read entries free their slots; the ring wraps.
        for i in 4..7 {
            assert!(prod.push(&p(i)));
        }
        assert_eq!(cons.take().unwrap(), (4..7).map(p).collect::<Vec<_>>());
        assert_eq!(cons.take().unwrap(), []);
    }

    #[test]
    fn a_back_end_writing_a_nonsense_tail_only_makes_the_ring_full() {
        let (prod, file) = Producer::create(4).unwrap();
        let cons = Consumer::open(&file, 4).unwrap();
        // The back-end claims to have read entries never written.
        cons.shm.word(TAIL).store(1000, Ordering::Release);
        assert!(!prod.push(&p(0)));
        cons.shm.word(TAIL).store(0, Ordering::Release);
        assert!(prod.push(&p(0)));
    }

    #[test]
    fn a_front_end_moving_head_out_of_bounds_stops_the_ring_being_read() {
        let (prod, file) = Producer::create(4).unwrap();
        let mut cons = Consumer::open(&file, 4).unwrap();
        prod.shm.word(HEAD).store(5, Ordering::Release);
        assert_eq!(cons.take(), None);
        prod.shm.word(HEAD).store(0, Ordering::Release);
        assert_eq!(cons.take(), None, "once broken, never read again");
    }

    #[test]
    fn invalidations_are_acknowledged_only_when_finished_and_a_full_ring_refuses() {
        let (prod, file) = Producer::create(4).unwrap();
        let cons = Consumer::open(&file, 4).unwrap();
        assert!(!prod.peer_polling());
        cons.set_polling(true);
        assert!(prod.peer_polling());
        let seq = prod.invalidate(0x1000, 0x2000).unwrap();
        let (invs, upto) = cons.take_invalidations();
        let inv = Invalidation {
            iova: 0x1000,
            size: 0x2000,
            after: 0,
        };
        assert_eq!((invs, upto), (vec![inv], seq));
        assert!(prod.invalidated() < seq, "taken is not applied");
        cons.finish_invalidations(upto);
        assert_eq!(prod.invalidated(), seq);
        for _ in 0..INV_CAPACITY {
            assert!(prod.invalidate(0, 1).is_some());
        }
        assert_eq!(prod.invalidate(0, 1), None, "full until finished");
        let (invs, upto) = cons.take_invalidations();
        assert_eq!(invs.len() as u64, INV_CAPACITY);
        cons.finish_invalidations(upto);
        assert!(prod.invalidate(0, 1).is_some());
        // A back-end claiming more than was written is held to what was written.
        cons.shm
            .word(INV_TAIL)
            .store(u64::MAX / 2, Ordering::Release);
        assert_eq!(prod.invalidated(), upto + 1);
        cons.set_polling(false);
        assert!(!prod.peer_polling());
        // Nor can it rewind the front-end's count by writing the shared head.
        cons.finish_invalidations(upto + 1);
        cons.shm.word(INV_HEAD).store(0, Ordering::Release);
        assert_eq!(prod.invalidate(0, 1), Some(upto + 2));
    }

    #[test]
    fn hazards_clear_only_what_no_published_window_overlaps_and_too_many_clear_nothing() {
        let (prod, file) = Producer::create(4).unwrap();
        let cons = Consumer::open(&file, 4).unwrap();
        assert!(prod.peer_clear_of(0, u64::MAX), "no view uses anything");
        cons.add_hazard(0x1000, 0x1fff);
        cons.add_hazard(0x5000, 0x5fff);
        assert!(prod.peer_clear_of(0x2000, 0x4fff));
        assert!(!prod.peer_clear_of(0x1fff, 0x1fff), "last byte of a hazard");
        assert!(!prod.peer_clear_of(0x4000, 0x5000), "first byte of another");
        cons.clear_hazards();
        assert!(prod.peer_clear_of(0x1000, 0x1fff));
        for i in 0..HAZARD_CAPACITY {
            cons.add_hazard(i << 12, (i << 12) + 0xfff);
        }
        assert!(prod.peer_clear_of(HAZARD_CAPACITY << 12, u64::MAX));
        cons.add_hazard(0x1_0000_0000, 0x1_0000_0fff);
        assert!(
            !prod.peer_clear_of(u64::MAX, u64::MAX),
            "past capacity: anything"
        );
        // A back-end writing a count past the capacity clears nothing either.
        cons.clear_hazards();
        cons.shm
            .word(HAZARDS)
            .store(HAZARD_CAPACITY + 1, Ordering::Release);
        assert!(!prod.peer_clear_of(u64::MAX, u64::MAX));
        assert_eq!(cons.pending_after(), None);
        prod.invalidate(0x1000, 0x1000).unwrap();
        assert_eq!(cons.pending_after(), Some(0));
    }

    #[test]
    fn a_ring_that_is_too_small_unsealed_or_of_bad_capacity_is_refused() {
        let (_prod, file) = Producer::create(4).unwrap();
        assert!(matches!(
            Consumer::open(&file, 8),
            Err(RingError::Size { .. })
        ));
        for bad in [0, 3, MAX_CAPACITY * 2] {
            assert!(matches!(
                Consumer::open(&file, bad),
                Err(RingError::Capacity(_))
            ));
            assert!(matches!(Producer::create(bad), Err(RingError::Capacity(_))));
        }
        let unsealed = test_kit::mem::memfd("push-ring-unsealed", ring_bytes(4));
        assert!(matches!(
            Consumer::open(&unsealed, 4),
            Err(RingError::NotSealed)
        ));
    }
}
