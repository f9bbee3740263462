//! Implicit grants (issue 16) at the front-end, against a scripted back-end: what the
//! back-end is given (shadow memory only), a request served through the shadow, and
//! what a hostile, absent or dead back-end can do to the guest: nothing but errors.
//! The test plays the back-end's side of the shadow ring through the memory table it
//! received, as a real back-end would.

#![allow(clippy::unwrap_used)]

mod fake_backend;

use device_host::vhost_user::wire::{self, req};
use device_host::vhost_user::{DeviceKind, InflightConfig, VhostUserDevice, UADDR_BASE};
use fake_backend::*;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use test_kit::pci::channel_sink as irqs;
use test_kit::ring::{desc, F_NEXT, F_WRITE};
use test_kit::{RingLayout, SplitRing};
use virtio_contract::{ActiveQueue, DeviceError, VirtioDevice};
use virtio_queue::Queue;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use zerocopy::FromBytes;

/// The guest's ring, on the pages from here.
const RING: u64 = 0x8_0000;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const F_INDIRECT: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
/// What the back-end writes into the data buffers it is given.
const BACKEND_BYTE: u8 = 0xb5;
/// What the guest's data buffers hold before a read.
const GUEST_FILL: u8 = 0x11;

struct Rig {
    be: FakeBackend,
    dev: VhostUserDevice,
    mem: GuestMemoryMmap,
    g: SplitRing<GuestMemoryMmap>,
    q: Queue,
    /// The back-end's view: the memory table it received, mapped.
    shadow: GuestMemoryMmap,
    /// The shadow ring's descriptor table, avail and used ring (memory-table addresses).
    ring: (u64, u64, u64),
    /// Shadow avail entries the back-end has taken, and used entries it has written.
    taken: u16,
    used: u16,
}

/// The copy form, each request given `deadline`.
fn rig(tag: &str, deadline: Duration) -> Rig {
    rig_with(
        tag,
        F_VERSION_1 | F_PROTOCOL,
        InflightConfig {
            arena_bytes: 1 << 16,
            deadline,
            map_threshold: None,
        },
    )
}

/// A blk device behind implicit grants as `cfg` says, its back-end offering
/// `features`, activated with the guest's ring at [`RING`].
fn rig_with(tag: &str, features: u64, cfg: InflightConfig) -> Rig {
    let be = FakeBackend::start(tag, features, P_ALL, AckMode::Now, None);
    let (irq, _vectors) = irqs();
    let mut dev =
        VhostUserDevice::connect(&be.path, DeviceKind::Block, Duration::from_secs(1), irq).unwrap();
    dev.inflight_copy(cfg).unwrap();
    let mem = guest_ram(tag);
    let g = SplitRing::new(mem.clone(), RingLayout::paged(RING), 256);
    let q = ready_queue_at(RING);
    let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut dev;
    d.set_acked_features(F_VERSION_1);
    d.activate(
        &[ActiveQueue {
            index: 0,
            queue: &q,
            vector: 1,
        }],
        &mem,
    )
    .unwrap();
    // The back-end's view: ring addresses are front-end addresses (copy form) or
    // IOVAs equal to the shadow's table address (map form); the shadow is the region
    // that holds them.
    let log = be.seen.lock().unwrap().log.clone();
    let a = &log.iter().find(|m| m.0 == req::SET_VRING_ADDR).unwrap().1;
    let a = wire::VringAddr::read_from_bytes(a).unwrap();
    let addr = |x: u64| x.checked_sub(UADDR_BASE).unwrap_or(x);
    let ring = (addr(a.desc), addr(a.avail), addr(a.used));
    let table = &log.iter().find(|m| m.0 == req::SET_MEM_TABLE).unwrap().1;
    let (head, mut rest) = wire::MemoryHeader::read_from_prefix(table).unwrap();
    let mut found = None;
    for i in 0..head.nregions as usize {
        let (r, tail) = wire::MemoryRegion::read_from_prefix(rest).unwrap();
        rest = tail;
        assert_eq!(r.userspace_addr, UADDR_BASE + r.guest_phys_addr);
        if (r.guest_phys_addr..r.guest_phys_addr + r.memory_size).contains(&ring.0) {
            found = Some((i, r));
        }
    }
    let (i, r) = found.expect("the shadow ring lies in a region of the table");
    let file = be
        .seen
        .lock()
        .unwrap()
        .files
        .iter()
        .find(|f| f.0 == req::SET_MEM_TABLE)
        .unwrap()
        .1[i]
        .try_clone()
        .unwrap();
    let shadow = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(r.guest_phys_addr),
        r.memory_size as usize,
        Some(FileOffset::new(file, r.mmap_offset)),
    )])
    .unwrap();
    Rig {
        be,
        dev,
        mem,
        g,
        q,
        shadow,
        ring,
        taken: 0,
        used: 0,
    }
}

impl Rig {
    /// A virtio-blk read of 512 bytes in guest descriptors `head..head + 3` (header,
    /// data, status), made available at ring position `pos`. Returns where the data
    /// and the status byte are.
    fn read(&self, pos: u16, head: u16, buf: u64) -> (GuestAddress, GuestAddress) {
        self.mem
            .write_slice(&test_kit::blk::header(0, 0), GuestAddress(buf))
            .unwrap();
        let (data, status) = (GuestAddress(buf + 0x100), GuestAddress(buf + 0x400));
        self.mem.write_slice(&[GUEST_FILL; 512], data).unwrap();
        self.mem.write_obj(0xffu8, status).unwrap();
        self.g.write_desc(head, desc(buf, 16, F_NEXT, head + 1));
        self.g
            .write_desc(head + 1, desc(data.0, 512, F_NEXT | F_WRITE, head + 2));
        self.g.write_desc(head + 2, desc(status.0, 1, F_WRITE, 0));
        self.g.set_avail_entry(pos, head);
        self.g.set_avail_idx(pos.wrapping_add(1));
        (data, status)
    }

    /// What the transport does on a guest notification or a back-end call.
    fn pass(&mut self) -> Result<bool, DeviceError> {
        let d: &mut dyn VirtioDevice<GuestMemoryMmap> = &mut self.dev;
        d.process_queue(0, &mut self.q, &self.mem)
    }

    /// The back-end takes the next posted chain: (shadow head, [(addr, len, flags)]).
    fn take(&mut self) -> (u16, Vec<(u64, u32, u16)>) {
        let (dt, avail, _) = self.ring;
        let idx: u16 = self.shadow.read_obj(GuestAddress(avail + 2)).unwrap();
        assert_ne!(idx, self.taken, "nothing was posted");
        let head: u16 = self
            .shadow
            .read_obj(GuestAddress(avail + 4 + 2 * u64::from(self.taken % 256)))
            .unwrap();
        self.taken = self.taken.wrapping_add(1);
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            let at = GuestAddress(dt + 16 * u64::from(i));
            let d: [u8; 16] = self.shadow.read_obj(at).unwrap();
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes([d[12], d[13]]);
            chain.push((addr, len, flags));
            if flags & F_NEXT == 0 {
                break;
            }
            i = u16::from_le_bytes([d[14], d[15]]);
        }
        (head, chain)
    }

    /// The back-end serves a taken read: its bytes into the data buffer, status OK.
    fn serve(&self, chain: &[(u64, u32, u16)]) {
        self.shadow
            .write_slice(&[BACKEND_BYTE; 512], GuestAddress(chain[1].0))
            .unwrap();
        self.shadow
            .write_obj(0u8, GuestAddress(chain[2].0))
            .unwrap();
    }

    /// The back-end writes a used element and publishes it.
    fn put_used(&mut self, id: u32, len: u32) {
        let (_, _, used) = self.ring;
        let at = used + 4 + 8 * u64::from(self.used % 256);
        self.shadow.write_obj(id, GuestAddress(at)).unwrap();
        self.shadow.write_obj(len, GuestAddress(at + 4)).unwrap();
        self.used = self.used.wrapping_add(1);
        self.shadow
            .write_obj(self.used, GuestAddress(used + 2))
            .unwrap();
    }

    fn guest_bytes(&self, at: GuestAddress) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        self.mem.read_slice(&mut b, at).unwrap();
        b
    }
}

fn inode_of(f: &std::fs::File) -> u64 {
    f.metadata().unwrap().ino()
}

#[test]
fn inflight_the_backend_is_given_shadow_memory_only_never_a_guest_ram_descriptor() {
    let r = rig("shadow-only", Duration::from_secs(10));
    let guest_ino = {
        let region = r.mem.iter().next().unwrap();
        inode_of(region.file_offset().unwrap().file())
    };
    let seen = r.be.seen.lock().unwrap();
    let sent: Vec<u64> = seen
        .files
        .iter()
        .filter(|(code, _)| *code == req::SET_MEM_TABLE)
        .flat_map(|(_, fs)| fs.iter().map(inode_of))
        .collect();
    assert!(!sent.is_empty());
    assert!(
        !sent.contains(&guest_ino),
        "a descriptor of guest RAM reached the back-end"
    );
    // The back-end's ring is the shadow's, inside the memory it was given.
    let region = r.shadow.iter().next().unwrap();
    let (base, size) = (region.start_addr().0, region.len());
    for a in [r.ring.0, r.ring.1, r.ring.2] {
        assert!(a >= base && a < base + size, "ring at {a:#x}");
    }
    // Features: the guest may use indirect tables and EVENT_IDX (the shadow serves
    // them); the back-end is given neither, nor ACCESS_PLATFORM.
    let d: &dyn VirtioDevice<GuestMemoryMmap> = &r.dev;
    assert_eq!(
        d.device_features() & (F_INDIRECT | F_EVENT_IDX),
        F_INDIRECT | F_EVENT_IDX
    );
    let set = &seen
        .log
        .iter()
        .find(|m| m.0 == req::SET_FEATURES)
        .unwrap()
        .1;
    let sent = u64::read_from_bytes(set).unwrap();
    assert_eq!(sent & (F_INDIRECT | F_EVENT_IDX | F_ACCESS_PLATFORM), 0);
}

#[test]
fn inflight_a_read_is_served_through_the_shadow_and_only_written_bytes_come_back() {
    let mut r = rig("read", Duration::from_secs(10));
    let (data, status) = r.read(0, 0, 0x9_0000);
    assert!(matches!(r.pass(), Ok(false)));
    let kick = r.be.file(req::SET_VRING_KICK);
    assert!(read_eventfd(&kick).is_some(), "the back-end was kicked");
    let (head, chain) = r.take();
    assert_eq!(
        chain.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        [(16, F_NEXT), (512, F_NEXT | F_WRITE), (1, F_WRITE)],
        "the chain's shape, in the shadow"
    );
    let mut hdr = [0u8; 16];
    r.shadow
        .read_slice(&mut hdr, GuestAddress(chain[0].0))
        .unwrap();
    assert_eq!(hdr, test_kit::blk::header(0, 0), "readable bytes copied in");
    let mut dbuf = [0xaau8; 512];
    r.shadow
        .read_slice(&mut dbuf, GuestAddress(chain[1].0))
        .unwrap();
    assert_eq!(dbuf, [0; 512], "writable bytes zeroed, not the guest's");
    r.serve(&chain);
    r.put_used(u32::from(head), 513);
    assert!(
        matches!(r.pass(), Ok(true)),
        "the guest wants its interrupt"
    );
    assert_eq!(r.guest_bytes(data), vec![BACKEND_BYTE; 512]);
    assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), 0);
    assert_eq!((r.g.used_idx(), r.g.used_elem(0)), (1, (0, 513)));
    let c = r.dev.handle().counters().shadow;
    assert_eq!((c.posted, c.completed, c.exposed_bytes), (1, 1, 0));
    assert_eq!(c.peak_exposed_bytes, 16, "only the header was readable");
}

#[test]
fn inflight_an_over_long_used_length_is_clamped_to_the_writable_bytes() {
    let mut r = rig("clamp", Duration::from_secs(10));
    r.read(0, 0, 0x9_0000);
    r.pass().unwrap();
    let (head, chain) = r.take();
    r.serve(&chain);
    r.put_used(u32::from(head), 1 << 20);
    r.pass().unwrap();
    assert_eq!(r.g.used_elem(0), (0, 513));
    assert_eq!(r.dev.handle().counters().shadow.clamped, 1);
}

/// After a forged or duplicate completion the back-end is cut off: the guest sees
/// IOERR for what it held, and none of the back-end's bytes.
fn assert_cut_off_with_ioerr(r: &Rig, data: GuestAddress, status: GuestAddress) {
    assert!(r.dev.handle().is_broken());
    assert_eq!(r.mem.read_obj::<u8>(status).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(r.guest_bytes(data), vec![GUEST_FILL; 512]);
}

#[test]
fn inflight_a_forged_completion_cuts_the_backend_off_and_the_guest_sees_ioerr() {
    let mut r = rig("forged", Duration::from_secs(10));
    let (data, status) = r.read(0, 0, 0x9_0000);
    r.pass().unwrap();
    let (head, chain) = r.take();
    r.serve(&chain);
    r.put_used(u32::from(head) + 7, 513);
    assert!(matches!(r.pass(), Err(DeviceError::Backend { .. })));
    assert_cut_off_with_ioerr(&r, data, status);
    assert_eq!((r.g.used_idx(), r.g.used_elem(0)), (1, (0, 1)));
}

#[test]
fn inflight_a_duplicate_completion_cuts_the_backend_off_and_the_rest_fail_with_ioerr() {
    let mut r = rig("dup", Duration::from_secs(10));
    let (d0, s0) = r.read(0, 0, 0x9_0000);
    let (d1, s1) = r.read(1, 3, 0x9_1000);
    r.pass().unwrap();
    let (h0, c0) = r.take();
    let (_, c1) = r.take();
    r.serve(&c0);
    r.serve(&c1);
    r.put_used(u32::from(h0), 513);
    r.put_used(u32::from(h0), 513);
    assert!(r.pass().is_err());
    // The first completion was genuine and stands; the second request failed.
    assert_eq!(r.guest_bytes(d0), vec![BACKEND_BYTE; 512]);
    assert_eq!(r.mem.read_obj::<u8>(s0).unwrap(), 0);
    assert_cut_off_with_ioerr(&r, d1, s1);
    assert_eq!(r.g.used_idx(), 2);
    assert_eq!((r.g.used_elem(0), r.g.used_elem(1)), ((0, 513), (3, 1)));
}

#[test]
fn inflight_a_backend_that_never_returns_is_cut_off_at_the_deadline() {
    let mut r = rig("deadline", Duration::from_millis(200));
    let (data, status) = r.read(0, 0, 0x9_0000);
    r.pass().unwrap();
    let (head, chain) = r.take();
    eventually("the deadline's cut-off", || r.dev.handle().is_broken());
    assert_eq!(r.dev.handle().counters().deadline_cutoffs, 1);
    // What the transport's on-broken hook runs.
    assert_eq!(r.dev.fail_pending(&r.mem), 1);
    // The back-end answers late: nothing of it reaches the guest.
    r.serve(&chain);
    r.put_used(u32::from(head), 513);
    assert!(r.pass().is_err());
    assert_cut_off_with_ioerr(&r, data, status);
    assert_eq!(r.g.used_idx(), 1);
}

#[test]
fn inflight_a_backend_that_dies_mid_request_leaves_the_guest_with_ioerr() {
    let mut r = rig("dies", Duration::from_secs(10));
    let (data, status) = r.read(0, 0, 0x9_0000);
    r.pass().unwrap();
    let (_, chain) = r.take();
    r.serve(&chain);
    r.be.die();
    eventually("the broken connection", || r.dev.handle().is_broken());
    assert_eq!(r.dev.fail_pending(&r.mem), 1);
    assert_cut_off_with_ioerr(&r, data, status);
    assert_eq!((r.g.used_idx(), r.g.used_elem(0)), (1, (0, 1)));
}

#[test]
fn inflight_a_malformed_guest_chain_needs_reset_and_grants_nothing() {
    let mut r = rig("malformed", Duration::from_secs(10));
    // A readable descriptor after a writable one (virtio v1.3 §2.7.4.2).
    r.g.write_desc(0, desc(0x9_0000, 16, F_NEXT | F_WRITE, 1));
    r.g.write_desc(1, desc(0x9_0100, 16, 0, 0));
    r.g.set_avail_entry(0, 0);
    r.g.set_avail_idx(1);
    assert!(matches!(r.pass(), Err(DeviceError::Driver { .. })));
    let idx: u16 = r.shadow.read_obj(GuestAddress(r.ring.1 + 2)).unwrap();
    assert_eq!(idx, 0, "nothing was posted to the back-end");
    assert_eq!(r.dev.handle().counters().shadow.exposed_bytes, 0);
}

#[test]
fn inflight_map_form_opens_a_window_before_the_kick_and_closes_it_before_the_guest_sees_used() {
    let mut r = rig_with(
        "map",
        F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM,
        InflightConfig {
            arena_bytes: 1 << 16,
            deadline: Duration::from_secs(10),
            map_threshold: Some(8192),
        },
    );
    let log = r.be.seen.lock().unwrap().log.clone();
    let set = &log.iter().find(|m| m.0 == req::SET_FEATURES).unwrap().1;
    assert_ne!(
        u64::read_from_bytes(set).unwrap() & F_ACCESS_PLATFORM,
        0,
        "the back-end translates through windows"
    );
    let table = &log.iter().find(|m| m.0 == req::SET_MEM_TABLE).unwrap().1;
    let (head, _) = wire::MemoryHeader::read_from_prefix(table).unwrap();
    assert_eq!(head.nregions, 2, "guest RAM and one shadow");
    // A read of 16 KiB, page-aligned: shown in place; header and status bounced.
    let buf = 0x9_0000;
    r.mem
        .write_slice(&test_kit::blk::header(0, 0), GuestAddress(buf))
        .unwrap();
    r.g.write_desc(0, desc(buf, 16, F_NEXT, 1));
    r.g.write_desc(1, desc(0xa_0000, 16384, F_NEXT | F_WRITE, 2));
    r.g.write_desc(2, desc(buf + 0x400, 1, F_WRITE, 0));
    r.g.set_avail_entry(0, 0);
    r.g.set_avail_idx(1);
    r.pass().unwrap();
    let window =
        r.be.iotlb()
            .into_iter()
            .find(|m| m.kind == wire::iotlb::UPDATE && m.size == 16384)
            .expect("an UPDATE for the data buffer's pages");
    assert_eq!(window.perm, wire::iotlb::PERM_WO);
    assert_eq!(
        window.uaddr,
        UADDR_BASE + 0xa_0000,
        "guest RAM at its pages"
    );
    let kick = r.be.file(req::SET_VRING_KICK);
    assert!(
        read_eventfd(&kick).is_some(),
        "kicked after the window opened"
    );
    let invalidates = |r: &Rig| {
        r.be.iotlb()
            .into_iter()
            .filter(|m| m.kind == wire::iotlb::INVALIDATE)
            .collect::<Vec<_>>()
    };
    assert!(invalidates(&r).is_empty());
    let (head, chain) = r.take();
    assert_eq!(
        chain[1].0, window.iova,
        "the shadow descriptor points at the window"
    );
    r.mem
        .write_slice(&[BACKEND_BYTE; 16384], GuestAddress(0xa_0000))
        .unwrap();
    r.shadow.write_obj(0u8, GuestAddress(chain[2].0)).unwrap();
    r.put_used(u32::from(head), 16385);
    assert!(r.pass().unwrap());
    let inv = invalidates(&r);
    assert_eq!(inv.len(), 1, "the window is invalidated");
    assert_eq!((inv[0].iova, inv[0].size), (window.iova, 16384));
    assert_eq!(r.g.used_elem(0), (0, 16385));
    let c = r.dev.handle().counters().shadow;
    assert_eq!(
        c.peak_exposed_bytes,
        16 + 16384,
        "the header's copy and the window"
    );
}
