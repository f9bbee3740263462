//! The shadow's rules, each by name, with a scripted guest driver on one side and a
//! scripted (sometimes hostile) back-end on the other.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use inflight::{ChainError, CopyShadow, ShadowConfig, ShadowError};
use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const RAM: usize = 1 << 20;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// The guest: its RAM, its queue as the device side sees it, and the driver's state.
struct Guest {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail: u16,
}

impl Guest {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        Self {
            mem,
            queue,
            avail: 0,
        }
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .store(self.avail, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
    }

    /// A request at head `head`: `out` readable bytes at 0x10000 + 0x1000·head, then
    /// `inn` writable bytes at 0x40000 + 0x1000·head.
    fn request(&mut self, head: u16, out: &[u8], inn: u32) {
        let r = 0x10000 + 0x1000 * u64::from(head);
        let w = 0x40000 + 0x1000 * u64::from(head);
        self.mem.write_slice(out, GuestAddress(r)).unwrap();
        self.desc(DESC, head, r, out.len() as u32, NEXT, head + 1);
        self.desc(DESC, head + 1, w, inn, WRITE, 0);
        self.publish(head);
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % QSIZE);
                (
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }
}

/// A chain as the back-end reads it: (address, length, flags) per descriptor.
type Chain = Vec<(u64, u32, u16)>;

/// The back-end: it sees only the shadow's memory.
struct Backend {
    used: u16,
    seen: u16,
}

impl Backend {
    fn new() -> Self {
        Self { used: 0, seen: 0 }
    }

    /// The chains posted since last time: (head, [(addr, len, flags)]).
    fn take(&mut self, s: &CopyShadow) -> Vec<(u16, Chain)> {
        let m = s.memory().mem();
        let (desc, avail, _) = s.ring();
        let idx: u16 = m.read_obj(GuestAddress(avail + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen != idx {
            let head: u16 = m
                .read_obj(GuestAddress(
                    avail + 4 + 2 * u64::from(self.seen % s.queue_size()),
                ))
                .unwrap();
            self.seen = self.seen.wrapping_add(1);
            let mut chain = Vec::new();
            let mut i = head;
            loop {
                let at = desc + 16 * u64::from(i);
                let addr: u64 = m.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = m.read_obj(GuestAddress(at + 8)).unwrap();
                let flags: u16 = m.read_obj(GuestAddress(at + 12)).unwrap();
                let next: u16 = m.read_obj(GuestAddress(at + 14)).unwrap();
                chain.push((addr, len, flags));
                if flags & NEXT == 0 {
                    break;
                }
                i = next;
            }
            out.push((head, chain));
        }
        out
    }

    fn put_used(&mut self, s: &CopyShadow, id: u32, len: u32) {
        let m = s.memory().mem();
        let (_, _, used) = s.ring();
        let at = used + 4 + 8 * u64::from(self.used % s.queue_size());
        m.write_obj(id, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 4)).unwrap();
        self.used = self.used.wrapping_add(1);
        m.store(self.used, GuestAddress(used + 2), Ordering::Release)
            .unwrap();
    }
}

/// Where the back-end sees the shadow: away from 0, so an address the shadow forgot
/// to offset by it points nowhere.
const SHADOW_BASE: u64 = 0x7_0000_0000;
/// virtio-blk's `VIRTIO_BLK_S_IOERR`.
const IOERR: u8 = 1;

fn shadow(arena: u64) -> CopyShadow {
    CopyShadow::new(ShadowConfig {
        queue_size: QSIZE,
        arena_bytes: arena,
        base: SHADOW_BASE,
        fail_status: Some(IOERR),
    })
    .unwrap()
}

#[test]
fn readable_bytes_are_copied_in_and_written_bytes_copied_back_through_the_shadow() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    g.request(0, b"hello", 8);
    assert_eq!(s.pull(&mut g.queue, &g.mem).unwrap().posted, 1);
    assert!(s.needs_kick());
    let posted = b.take(&s);
    let (head, chain) = &posted[0];
    assert_eq!(chain.len(), 2, "the chain keeps its shape");
    let m = s.memory().mem();
    let mut got = [0u8; 5];
    m.read_slice(&mut got, GuestAddress(chain[0].0)).unwrap();
    assert_eq!(&got, b"hello");
    assert!(
        chain[0].0 >= s.ring().2,
        "buffers live in the arena, past the rings"
    );
    m.write_slice(b"answer!!", GuestAddress(chain[1].0))
        .unwrap();
    b.put_used(&s, u32::from(*head), 6);
    assert!(s.complete(&mut g.queue, &g.mem).unwrap());
    assert_eq!(g.used(), vec![(0, 6)]);
    let mut back = [0u8; 8];
    g.mem.read_slice(&mut back, GuestAddress(0x40000)).unwrap();
    assert_eq!(&back, b"answer\0\0", "only the used length is copied back");
    assert_eq!(s.stats().in_flight, 0);
    assert_eq!(s.stats().peak_exposed_bytes, 5);
}

#[test]
fn writable_bounce_bytes_are_zeroed_so_nothing_of_an_earlier_request_leaks() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    g.request(0, b"secret-secret", 16);
    s.pull(&mut g.queue, &g.mem).unwrap();
    let (head, chain) = b.take(&s).remove(0);
    b.put_used(&s, u32::from(head), 0);
    s.complete(&mut g.queue, &g.mem).unwrap();
    // The next request reuses the arena: its writable part must read zeros.
    g.request(2, b"", 64);
    s.pull(&mut g.queue, &g.mem).unwrap();
    let (_, chain2) = b.take(&s).remove(0);
    let w = chain2.iter().find(|d| d.2 & WRITE != 0).unwrap();
    assert_eq!(w.0, chain[0].0, "the arena was reused");
    let mut buf = vec![0xffu8; 64];
    s.memory()
        .mem()
        .read_slice(&mut buf, GuestAddress(w.0))
        .unwrap();
    assert!(buf.iter().all(|&x| x == 0));
}

#[test]
fn a_descriptor_rewritten_after_the_kick_does_not_change_what_was_granted() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    g.request(0, b"first", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    // The guest now points the writable descriptor at another page, and rewrites
    // the readable bytes.
    g.desc(DESC, 1, 0x90000, 4, WRITE, 0);
    g.mem.write_slice(b"XXXXX", GuestAddress(0x10000)).unwrap();
    let (head, chain) = b.take(&s).remove(0);
    let mut got = [0u8; 5];
    s.memory()
        .mem()
        .read_slice(&mut got, GuestAddress(chain[0].0))
        .unwrap();
    assert_eq!(&got, b"first", "the copy was made at pull");
    s.memory()
        .mem()
        .write_slice(b"data", GuestAddress(chain[1].0))
        .unwrap();
    b.put_used(&s, u32::from(head), 4);
    s.complete(&mut g.queue, &g.mem).unwrap();
    let mut w = [0u8; 4];
    g.mem.read_slice(&mut w, GuestAddress(0x40000)).unwrap();
    assert_eq!(&w, b"data", "copied back where the chain said at pull");
    g.mem.read_slice(&mut w, GuestAddress(0x90000)).unwrap();
    assert_eq!(w, [0; 4], "not where the guest pointed afterwards");
}

/// Makes one malformed chain available at head 0 and checks it is refused with
/// nothing granted.
fn refused(build: impl Fn(&Guest), want: impl Fn(&ShadowError) -> bool) {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    build(&g);
    g.publish(0);
    let e = s.pull(&mut g.queue, &g.mem).unwrap_err();
    assert!(want(&e), "{e:?}");
    assert_eq!(s.stats().posted, 0);
    assert_eq!(
        Backend::new().take(&s).len(),
        0,
        "nothing reached the shadow ring"
    );
}

#[test]
fn chain_next_outside_the_table_is_refused() {
    refused(
        |g| g.desc(DESC, 0, 0x10000, 4, NEXT, QSIZE),
        |e| {
            matches!(
                e,
                ShadowError::Chain {
                    source: ChainError::Index { .. },
                    ..
                }
            )
        },
    );
}

#[test]
fn chain_loop_is_refused() {
    refused(
        |g| {
            g.desc(DESC, 0, 0x10000, 4, NEXT, 1);
            g.desc(DESC, 1, 0x10000, 4, NEXT, 0);
        },
        |e| {
            matches!(
                e,
                ShadowError::Chain {
                    source: ChainError::Loop(_),
                    ..
                }
            )
        },
    );
}

#[test]
fn nested_indirect_table_is_refused() {
    refused(
        |g| {
            g.desc(DESC, 0, 0x8000, 32, INDIRECT, 0);
            g.desc(0x8000, 0, 0x9000, 16, INDIRECT, 0);
        },
        |e| {
            matches!(
                e,
                ShadowError::Chain {
                    source: ChainError::NestedIndirect,
                    ..
                }
            )
        },
    );
}

#[test]
fn indirect_descriptor_with_next_is_refused() {
    refused(
        |g| g.desc(DESC, 0, 0x8000, 32, INDIRECT | NEXT, 1),
        |e| {
            matches!(
                e,
                ShadowError::Chain {
                    source: ChainError::IndirectWithNext,
                    ..
                }
            )
        },
    );
}

#[test]
fn indirect_length_zero_or_not_a_multiple_of_16_is_refused() {
    for len in [0, 24] {
        refused(
            |g| g.desc(DESC, 0, 0x8000, len, INDIRECT, 0),
            |e| {
                matches!(
                    e,
                    ShadowError::Chain {
                        source: ChainError::IndirectLength(_),
                        ..
                    }
                )
            },
        );
    }
}

#[test]
fn readable_after_writable_is_refused() {
    refused(
        |g| {
            g.desc(DESC, 0, 0x40000, 4, WRITE | NEXT, 1);
            g.desc(DESC, 1, 0x10000, 4, 0, 0);
        },
        |e| {
            matches!(
                e,
                ShadowError::Chain {
                    source: ChainError::ReadableAfterWritable,
                    ..
                }
            )
        },
    );
}

#[test]
fn an_address_that_wraps_is_refused() {
    refused(
        |g| g.desc(DESC, 0, u64::MAX - 1, 4, 0, 0),
        |e| {
            matches!(
                e,
                ShadowError::Chain {
                    source: ChainError::Overflow { .. },
                    ..
                }
            )
        },
    );
}

#[test]
fn an_avail_index_jump_beyond_the_queue_size_is_refused() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    g.mem
        .store(QSIZE + 1, GuestAddress(AVAIL + 2), Ordering::Release)
        .unwrap();
    assert!(matches!(
        s.pull(&mut g.queue, &g.mem),
        Err(ShadowError::AvailJump(17))
    ));
}

#[test]
fn a_head_already_in_flight_is_refused() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    g.request(0, b"a", 1);
    s.pull(&mut g.queue, &g.mem).unwrap();
    g.publish(0);
    assert!(matches!(
        s.pull(&mut g.queue, &g.mem),
        Err(ShadowError::HeadInFlight(0))
    ));
}

#[test]
fn a_request_without_arena_space_waits_in_the_guests_ring_and_is_never_dropped() {
    let mut g = Guest::new();
    let mut s = shadow(4096);
    let mut b = Backend::new();
    g.request(0, &[1; 3000], 8);
    g.request(2, &[2; 3000], 8);
    assert_eq!(
        s.pull(&mut g.queue, &g.mem).unwrap().posted,
        1,
        "the second waits"
    );
    assert_eq!(s.stats().waits, 1);
    assert_eq!(
        g.queue.next_avail(),
        1,
        "it stays available in the guest's ring"
    );
    let (head, _) = b.take(&s).remove(0);
    b.put_used(&s, u32::from(head), 0);
    s.complete(&mut g.queue, &g.mem).unwrap();
    assert_eq!(
        s.pull(&mut g.queue, &g.mem).unwrap().posted,
        1,
        "and goes once space frees"
    );
    let (_, chain) = b.take(&s).remove(0);
    let mut got = [0u8; 3];
    s.memory()
        .mem()
        .read_slice(&mut got, GuestAddress(chain[0].0))
        .unwrap();
    assert_eq!(got, [2; 3]);
}

#[test]
fn a_chain_larger_than_the_shadow_fails_with_the_device_status_and_the_next_one_is_served() {
    let mut g = Guest::new();
    let mut s = shadow(4096);
    let mut b = Backend::new();
    g.request(0, &[1; 8], 8192);
    g.request(2, &[2; 8], 8);
    let pulled = s.pull(&mut g.queue, &g.mem).unwrap();
    assert_eq!((pulled.posted, pulled.refused), (1, 1));
    assert!(pulled.interrupt, "the guest hears of the failed request");
    assert_eq!(
        g.used(),
        vec![(0, 1)],
        "completed at once, status byte only"
    );
    let status: u8 = g.mem.read_obj(GuestAddress(0x40000 + 8191)).unwrap();
    assert_eq!(status, IOERR);
    assert_eq!(s.stats().refused, 1);
    let posted = b.take(&s);
    assert_eq!(
        posted.len(),
        1,
        "only the request that fits reaches the back-end"
    );
    assert_eq!(posted[0].1[0].1, 8);
}

#[test]
fn backend_forged_and_duplicate_ids_are_refused_and_the_guest_ring_is_untouched() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    g.request(0, b"a", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    assert_eq!(b.take(&s).len(), 1);
    b.put_used(&s, 7, 4); // never posted
    assert!(matches!(
        s.complete(&mut g.queue, &g.mem),
        Err(ShadowError::UnknownId(7))
    ));
    assert!(g.used().is_empty());

    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    g.request(0, b"a", 4);
    g.request(2, b"b", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    let heads: Vec<u16> = b.take(&s).into_iter().map(|(h, _)| h).collect();
    b.put_used(&s, u32::from(heads[0]), 1);
    b.put_used(&s, u32::from(heads[0]), 1); // the same id again
    assert!(matches!(
        s.complete(&mut g.queue, &g.mem),
        Err(ShadowError::UnknownId(_))
    ));
    assert_eq!(
        g.used().len(),
        1,
        "the first completion stands, the duplicate does not"
    );
}

#[test]
fn backend_used_index_jump_is_refused() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    g.request(0, b"a", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    let (_, _, used) = s.ring();
    s.memory()
        .mem()
        .store(5u16, GuestAddress(used + 2), Ordering::Release)
        .unwrap();
    assert!(matches!(
        s.complete(&mut g.queue, &g.mem),
        Err(ShadowError::UsedJump {
            moved: 5,
            in_flight: 1
        })
    ));
    assert!(g.used().is_empty());
}

#[test]
fn backend_over_long_used_length_is_clamped_to_the_writable_bytes() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    // Guard bytes right after the guest's 4 writable bytes.
    g.mem
        .write_slice(&[0xee; 4], GuestAddress(0x40004))
        .unwrap();
    g.request(0, b"a", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    let (head, chain) = b.take(&s).remove(0);
    s.memory()
        .mem()
        .write_slice(&[7; 64], GuestAddress(chain[1].0))
        .unwrap();
    b.put_used(&s, u32::from(head), 1 << 20);
    s.complete(&mut g.queue, &g.mem).unwrap();
    assert_eq!(g.used(), vec![(0, 4)]);
    assert_eq!(s.stats().clamped, 1);
    let mut guard = [0u8; 4];
    g.mem.read_slice(&mut guard, GuestAddress(0x40004)).unwrap();
    assert_eq!(guard, [0xee; 4], "nothing written past the chain's buffers");
}

#[test]
fn a_cut_off_backend_leaves_the_guest_with_errors_and_its_later_writes_are_ignored() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    g.request(0, b"a", 4);
    g.request(2, b"b", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    let posted = b.take(&s);
    assert_eq!(s.fail_all(&mut g.queue, &g.mem).unwrap(), 2);
    let used = g.used();
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|&(_, len)| len == 1));
    let status: u8 = g.mem.read_obj(GuestAddress(0x40003)).unwrap();
    assert_eq!(status, 1, "the last writable byte holds the error status");
    // The back-end answers late, writing into what was its arena: nothing reaches
    // the guest, and the shadow, reset, refuses the stale ids.
    s.memory()
        .mem()
        .write_slice(&[9; 4], GuestAddress(posted[0].1[1].0))
        .unwrap();
    b.put_used(&s, u32::from(posted[0].0), 4);
    assert!(s.complete(&mut g.queue, &g.mem).is_err());
    assert_eq!(g.used().len(), 2);
    let mut w = [0u8; 3];
    g.mem.read_slice(&mut w, GuestAddress(0x40000)).unwrap();
    assert_eq!(w, [0; 3]);
}

/// The map form's windows, scripted: buffers of a page or more that cover whole pages
/// are shown at `WINDOW_BASE + guest address`; every open and close is logged with the
/// guest's used index at that moment.
struct PageWindows {
    guest: GuestMemoryMmap,
    log: Vec<(&'static str, u64, u16)>,
}

const WINDOW_BASE: u64 = 1 << 40;

impl inflight::Windows for PageWindows {
    fn wants(&self, d: &inflight::Desc) -> bool {
        d.len >= 4096 && d.addr.is_multiple_of(4096) && d.len.is_multiple_of(4096)
    }
    fn open(&mut self, d: &inflight::Desc) -> Result<u64, inflight::WindowError> {
        let used: u16 = self.guest.read_obj(GuestAddress(USED + 2)).unwrap();
        self.log.push(("open", d.addr, used));
        Ok(WINDOW_BASE + d.addr)
    }
    fn close(&mut self, windows: &[(u64, u32)]) {
        let used: u16 = self.guest.read_obj(GuestAddress(USED + 2)).unwrap();
        for &(a, _) in windows {
            self.log.push(("close", a - WINDOW_BASE, used));
        }
    }
    fn exposed(&self, d: &inflight::Desc) -> u64 {
        u64::from(d.len)
    }
}

#[test]
fn map_form_shows_whole_page_buffers_in_place_and_closes_them_before_the_guest_sees_used() {
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    let mut b = Backend::new();
    let mut w = PageWindows {
        guest: g.mem.clone(),
        log: Vec::new(),
    };
    // A read: 16-byte header, 8 KiB of page-aligned data, 1-byte status.
    g.mem.write_slice(&[7; 16], GuestAddress(0x10000)).unwrap();
    g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
    g.desc(DESC, 1, 0x60000, 8192, NEXT | WRITE, 2);
    g.desc(DESC, 2, 0x50000, 1, WRITE, 0);
    g.publish(0);
    assert_eq!(s.pull_with(&mut g.queue, &g.mem, &mut w).unwrap().posted, 1);
    assert_eq!(w.log, vec![("open", 0x60000, 0)]);
    let (head, chain) = b.take(&s).remove(0);
    assert_eq!(
        chain[1].0,
        WINDOW_BASE + 0x60000,
        "the data is shown in place"
    );
    let base = s.ring().0;
    for (addr, _, _) in [chain[0], chain[2]] {
        assert!(
            addr >= base && addr < base + (1 << 20),
            "bounced: {addr:#x}"
        );
    }
    assert_eq!(
        s.stats().exposed_bytes,
        16 + 8192,
        "the header's copy and the window"
    );
    // The back-end writes through the window (guest memory) and the status (arena).
    g.mem
        .write_slice(&[9; 8192], GuestAddress(0x60000))
        .unwrap();
    s.memory()
        .mem()
        .write_obj(0u8, GuestAddress(chain[2].0))
        .unwrap();
    b.put_used(&s, u32::from(head), 8193);
    s.complete_with(&mut g.queue, &g.mem, &mut w).unwrap();
    assert_eq!(
        w.log[1],
        ("close", 0x60000, 0),
        "closed while the guest's used index had not moved"
    );
    assert_eq!(g.used(), vec![(0, 8193)]);
    let status: u8 = g.mem.read_obj(GuestAddress(0x50000)).unwrap();
    assert_eq!(status, 0, "the bounced status was copied back");
    assert_eq!(s.stats().exposed_bytes, 0);
}

#[test]
fn with_event_idx_kicks_follow_avail_event_and_used_event_follows_completions() {
    // virtio v1.3 §2.7.10 on the shadow ring: the back-end's avail_event (after its
    // used ring) says when it wants a kick; the shadow's used_event (after its avail
    // ring) asks for a call at the next completion.
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    s.set_event_idx(true);
    let mut b = Backend::new();
    let (_, avail, used) = s.ring();
    let avail_event = GuestAddress(used + 4 + 8 * u64::from(QSIZE));
    let used_event = GuestAddress(avail + 4 + 2 * u64::from(QSIZE));
    // avail_event 0: the first request (index 0 → 1) passes it: kick.
    g.request(0, b"a", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    assert!(s.needs_kick());
    // The back-end, polling, moves avail_event ahead to 5: the next post needs no kick.
    s.memory().mem().write_obj(5u16, avail_event).unwrap();
    g.request(2, b"b", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    assert!(!s.needs_kick(), "avail_event 5 not passed by index 2");
    // It stops polling with avail_event at the index it saw (2): the next one kicks.
    s.memory().mem().write_obj(2u16, avail_event).unwrap();
    g.request(4, b"c", 4);
    s.pull(&mut g.queue, &g.mem).unwrap();
    assert!(s.needs_kick());
    // used_event follows what the shadow took back.
    for (head, _) in b.take(&s).into_iter().take(2) {
        b.put_used(&s, u32::from(head), 0);
    }
    s.complete(&mut g.queue, &g.mem).unwrap();
    let ue: u16 = s.memory().mem().read_obj(used_event).unwrap();
    assert_eq!(ue, 2, "a call at the next completion");
}

/// Windows whose first close publishes one more used element on the shadow ring, as
/// a back-end racing with the shadow's completion pass would.
struct RacingWindows {
    shadow: GuestMemoryMmap,
    used: u64,
    late: Option<(u16, u32)>,
}

impl inflight::Windows for RacingWindows {
    fn wants(&self, d: &inflight::Desc) -> bool {
        d.len >= 4096 && d.addr.is_multiple_of(4096) && d.len.is_multiple_of(4096)
    }
    fn open(&mut self, d: &inflight::Desc) -> Result<u64, inflight::WindowError> {
        Ok(WINDOW_BASE + d.addr)
    }
    fn close(&mut self, _windows: &[(u64, u32)]) {
        if let Some((idx, id)) = self.late.take() {
            let at = self.used + 4 + 8 * u64::from(idx % QSIZE);
            self.shadow.write_obj(id, GuestAddress(at)).unwrap();
            self.shadow.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            self.shadow
                .store(idx + 1, GuestAddress(self.used + 2), Ordering::Release)
                .unwrap();
        }
    }
    fn exposed(&self, d: &inflight::Desc) -> u64 {
        u64::from(d.len)
    }
}

#[test]
fn with_event_idx_a_completion_published_while_used_event_moves_is_not_lost() {
    // The back-end publishes a completion after the shadow read its used index but
    // before it moved used_event: the back-end saw the old used_event and did not call.
    // The shadow looks again after moving it (Linux's virtqueue_enable_cb does the same).
    let mut g = Guest::new();
    let mut s = shadow(1 << 16);
    s.set_event_idx(true);
    let mut b = Backend::new();
    for (head, page) in [(0u16, 0x60000u64), (2, 0x62000)] {
        g.desc(DESC, head, page, 4096, NEXT | WRITE, head + 1);
        g.desc(DESC, head + 1, 0x50000 + u64::from(head), 1, WRITE, 0);
        g.publish(head);
    }
    let (_, _, used) = s.ring();
    let mut w = RacingWindows {
        shadow: s.memory().mem().clone(),
        used,
        late: None,
    };
    assert_eq!(s.pull_with(&mut g.queue, &g.mem, &mut w).unwrap().posted, 2);
    let posted = b.take(&s);
    b.put_used(&s, u32::from(posted[0].0), 0);
    w.late = Some((1, u32::from(posted[1].0)));
    s.complete_with(&mut g.queue, &g.mem, &mut w).unwrap();
    assert_eq!(
        g.used().len(),
        2,
        "the late completion was taken in the same pass"
    );
}
