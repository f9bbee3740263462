//! The back-end driven over real sockets by a test front-end: protocol round trips for
//! every message handled, malformed and hostile messages (refused, nothing changes), a
//! virtio-blk request served through IOTLB windows filled by misses, a front-end that
//! refuses a miss for memory the guest never mapped (the request fails, the secret
//! there never reaches the disk), and what /proc/self/maps shows after an invalidate.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use test_kit::blk::header;
use test_kit::proc::{maps_covering, maps_mention, thread_ticks};
use test_kit::ring::buf;
use test_kit::{memfd, r, w, FileRam, SplitRing, TempImage};
use vhost_iotlb::push_ring::{ring_bytes, Producer, Push};
use vhost_iotlb::wire::{
    flags, iotlb, protocol, req, ConfigHeader, Header, IotlbMsg, MemoryRegion, VringAddr,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_IOMMU_PLATFORM,
};
use vhost_iotlb::{AddressSpace, Limits, MapPolicy, Mode, PROTOCOL_FEATURES};
use virtio_devices::{Block, BlockConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, IntoBytes};

/// A disk image of `sectors` sectors whose byte `i` is `i % 251`.
fn disk(name: &str, sectors: u64) -> TempImage {
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
    TempImage::new(&format!("vhost-iotlb-it-{name}"), &data)
}

/// The driver's side of vring 0 in `ram` (written through the file: this process
/// never maps guest RAM itself).
fn ring(ram: &File) -> SplitRing<FileRam> {
    SplitRing::new(FileRam(ram.try_clone().unwrap()), RING, QSIZE)
}

impl Frontend<Block> {
    fn start(disk: &std::path::Path, require_iommu: bool) -> (Self, std::sync::Arc<AddressSpace>) {
        Self::start_polling(disk, require_iommu, Duration::ZERO)
    }

    fn start_polling(
        disk: &std::path::Path,
        require_iommu: bool,
        poll: impl Into<virtio_contract::PollConfig>,
    ) -> (Self, std::sync::Arc<AddressSpace>) {
        Self::start_as(disk, require_iommu, poll, MapPolicy::Windows)
    }

    fn start_as(
        disk: &std::path::Path,
        require_iommu: bool,
        poll: impl Into<virtio_contract::PollConfig>,
        map: MapPolicy,
    ) -> (Self, std::sync::Arc<AddressSpace>) {
        let dev = Block::new(&BlockConfig {
            path: disk.to_path_buf(),
            read_only: false,
            access_platform: true,
            test_stray_sector: None,
        })
        .unwrap();
        let limits = Limits {
            max_windows: 64,
            miss_timeout: Duration::from_secs(5),
            max_misses_per_access: 64,
        };
        Self::start_mapping(dev, limits, require_iommu, poll, map)
    }
}

/// Writes a virtio-blk request (type, sector 0) whose data segment is at `data`
/// (device-writable for IN), descriptors at bus addresses `bus(gpa)`, into the ring and
/// publishes it. Returns whether the back-end wants a kick (`VRING_USED_F_NO_NOTIFY`
/// clear, after a full barrier, as Linux's driver decides).
fn post_request(
    ring: &mut SplitRing<FileRam>,
    bus: impl Fn(u64) -> u64,
    kind: u32,
    data: u64,
) -> bool {
    let ram = &ring.memory().0;
    ram.write_all_at(&header(kind, 0), HDR).unwrap();
    ram.write_all_at(&[0xff], STATUS).unwrap();
    ring.add_chain(&[
        r(bus(HDR), 16),
        buf(bus(data), 4096, kind == 0),
        w(bus(STATUS), 1),
    ]);
    ring.publish()
}

/// Plays the front-end's part of misses until the call eventfd fires: each miss is
/// answered by an update (if `allow(gpa)`) and a reply-ack. Returns (misses, access
/// failures) seen.
fn serve_misses(
    fe: &Frontend<Block>,
    chan: &UnixStream,
    call: &EventFd,
    allow: impl Fn(u64) -> bool,
) -> (u32, u32) {
    let (mut misses, mut fails) = (0, 0);
    let mut done = false;
    for _ in 0..1000 {
        if done {
            return (misses, fails);
        }
        // The completion comes after any message about the request: read those first.
        done = call.read().is_ok();
        let mut pfd = libc::pollfd {
            fd: chan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        if unsafe { libc::poll(&mut pfd, 1, 10) } <= 0 {
            continue;
        }
        let (h, p) = read_msg(chan);
        let m = IotlbMsg::read_from_bytes(&p[..]).unwrap();
        assert_eq!(h.request, 1, "BACKEND_IOTLB_MSG");
        match m.kind {
            iotlb::MISS => {
                misses += 1;
                assert_eq!(h.flags & flags::NEED_REPLY, flags::NEED_REPLY);
                let page = m.iova & !0xfff;
                let gpa = page - IOVA_OFF;
                let ok = page >= IOVA_OFF && gpa < RAM && allow(gpa);
                if ok {
                    let u = iotlb_msg(iotlb::UPDATE, page, 4096, UBASE + gpa, iotlb::PERM_RW);
                    assert_eq!(fe.ack(req::IOTLB_MSG, &u, &[]), 0);
                }
                let rh = Header {
                    request: 1,
                    flags: flags::VERSION | flags::REPLY,
                    size: 8,
                };
                let mut r = rh.as_bytes().to_vec();
                r.extend_from_slice(&u64::from(!ok).to_ne_bytes());
                (&*chan).write_all(&r).unwrap();
            }
            iotlb::ACCESS_FAIL => fails += 1,
            k => panic!("unexpected IOTLB message type {k}"),
        }
    }
    panic!("the request did not complete");
}

#[test]
fn negotiation_messages_get_the_spec_answers() {
    let img = disk("nego", 16);
    let (fe, _space) = Frontend::start(img.path(), false);
    let f = u64::from_ne_bytes(fe.get(req::GET_FEATURES, &[]).try_into().unwrap());
    assert_ne!(f & VHOST_USER_F_PROTOCOL_FEATURES, 0);
    assert_ne!(f & VIRTIO_F_IOMMU_PLATFORM, 0, "ACCESS_PLATFORM offered");
    let p = u64::from_ne_bytes(fe.get(req::GET_PROTOCOL_FEATURES, &[]).try_into().unwrap());
    assert_eq!(p, PROTOCOL_FEATURES);
    for needed in [
        protocol::REPLY_ACK,
        protocol::BACKEND_REQ,
        protocol::CONFIG,
        protocol::MQ,
    ] {
        assert_ne!(p & needed, 0);
    }
    fe.send(
        req::SET_PROTOCOL_FEATURES,
        flags::VERSION,
        &p.to_ne_bytes(),
        &[],
    );
    assert_eq!(
        u64::from_ne_bytes(fe.get(req::GET_QUEUE_NUM, &[]).try_into().unwrap()),
        1
    );
    let mut cfg = ConfigHeader {
        offset: 0,
        size: 24,
        flags: 0,
    }
    .as_bytes()
    .to_vec();
    cfg.extend_from_slice(&[0; 24]);
    let c = fe.get(req::GET_CONFIG, &cfg);
    assert_eq!(c.len(), 12 + 24);
    assert_eq!(
        u64::from_le_bytes(c[12..20].try_into().unwrap()),
        16,
        "capacity in sectors"
    );
    assert_ne!(
        fe.ack(req::SET_CONFIG, &cfg, &[]),
        0,
        "read-only configuration"
    );
    assert_eq!(fe.ack(req::SET_OWNER, &[], &[]), 0);
    let err = EventFd::new(0).unwrap();
    assert_eq!(
        fe.ack(req::SET_VRING_ERR, &0u64.to_ne_bytes(), &[err.as_raw_fd()]),
        0
    );
    // GET_VRING_BASE stops the ring and returns where it was.
    assert_eq!(fe.ack(req::SET_VRING_BASE, &state(0, 7), &[]), 0);
    assert_eq!(fe.get(req::GET_VRING_BASE, &state(0, 0)), state(0, 7));
    let r = fe.finish();
    assert_eq!(r.exposure.peak_mapped_bytes, 0, "nothing was ever mapped");
}

#[test]
fn malformed_and_out_of_bounds_requests_are_refused_without_state_change() {
    let img = disk("bad", 16);
    let (fe, space) = Frontend::start(img.path(), true);
    let ram = memfd("vhost-iotlb-it-bad", RAM);
    fe.send(
        req::SET_PROTOCOL_FEATURES,
        flags::VERSION,
        &PROTOCOL_FEATURES.to_ne_bytes(),
        &[],
    );
    let plain = VHOST_USER_F_PROTOCOL_FEATURES | (1 << 32);
    // --require-iommu: a front-end without IOMMU_PLATFORM is refused, nothing mapped.
    assert_ne!(fe.ack(req::SET_FEATURES, &plain.to_ne_bytes(), &[]), 0);
    assert_ne!(
        fe.ack(req::SET_FEATURES, &(1u64 << 60).to_ne_bytes(), &[]),
        0,
        "bit not offered"
    );
    assert_eq!(space.mode(), Mode::Unset);
    assert_eq!(
        fe.ack(
            req::SET_MEM_TABLE,
            &mem_table(ram_region()),
            &[ram.as_raw_fd()]
        ),
        0
    );
    assert_eq!(
        space.exposure().mapped_bytes,
        0,
        "undecided mode maps nothing"
    );
    // IOTLB before IOMMU_PLATFORM is negotiated.
    let upd = iotlb_msg(iotlb::UPDATE, IOVA_OFF, 4096, UBASE, iotlb::PERM_RW);
    assert_ne!(fe.ack(req::IOTLB_MSG, &upd, &[]), 0);
    let iommu = plain | VIRTIO_F_IOMMU_PLATFORM;
    assert_eq!(fe.ack(req::SET_FEATURES, &iommu.to_ne_bytes(), &[]), 0);
    assert_eq!(space.mode(), Mode::Iotlb);
    assert_eq!(
        space.exposure().mapped_bytes,
        0,
        "the memory table is not mapped"
    );

    let before = space.exposure();
    let bad_acks: Vec<(u32, Vec<u8>, Vec<RawFd>)> = vec![
        (req::SET_VRING_NUM, state(0, 3), vec![]),
        (req::SET_VRING_NUM, state(0, 512), vec![]),
        (req::SET_VRING_NUM, state(9, 16), vec![]),
        (req::SET_VRING_BASE, state(0, 70000), vec![]),
        (req::SET_VRING_ENABLE, state(0, 2), vec![]),
        (
            req::SET_VRING_KICK,
            (0x100u64).to_ne_bytes().to_vec(),
            vec![],
        ),
        (
            req::SET_VRING_ADDR,
            VringAddr {
                index: 0,
                flags: 0,
                desc: 8,
                used: 0,
                avail: 0,
                log: 0,
            }
            .as_bytes()
            .to_vec(),
            vec![],
        ),
        (
            req::SET_VRING_ADDR,
            VringAddr {
                index: 0,
                flags: 1,
                ..Default::default()
            }
            .as_bytes()
            .to_vec(),
            vec![],
        ),
        (req::SET_MEM_TABLE, mem_table(ram_region()), vec![]),
        (
            req::SET_MEM_TABLE,
            mem_table(MemoryRegion {
                memory_size: RAM * 4,
                ..ram_region()
            }),
            vec![ram.as_raw_fd()],
        ),
        (
            req::IOTLB_MSG,
            iotlb_msg(iotlb::UPDATE, IOVA_OFF, 4096, UBASE + RAM, iotlb::PERM_RW),
            vec![],
        ),
        (
            req::IOTLB_MSG,
            iotlb_msg(
                iotlb::UPDATE,
                IOVA_OFF,
                8192,
                UBASE + RAM - 4096,
                iotlb::PERM_RW,
            ),
            vec![],
        ),
        (
            req::IOTLB_MSG,
            iotlb_msg(iotlb::UPDATE, u64::MAX - 10, 4096, UBASE, iotlb::PERM_RW),
            vec![],
        ),
        (
            req::IOTLB_MSG,
            iotlb_msg(iotlb::UPDATE, IOVA_OFF, 4096, UBASE, 0),
            vec![],
        ),
        (
            req::IOTLB_MSG,
            iotlb_msg(iotlb::MISS, IOVA_OFF, 4096, UBASE, 1),
            vec![],
        ),
        (
            req::IOTLB_MSG,
            iotlb_msg(iotlb::INVALIDATE, IOVA_OFF, 0, 0, 0),
            vec![],
        ),
        (req::IOTLB_MSG, vec![0; 31], vec![]),
        (req::SET_OWNER, vec![], vec![ram.as_raw_fd()]),
        (33, vec![], vec![]),
    ];
    for (r, p, fds) in &bad_acks {
        assert_ne!(
            fe.ack(*r, p, fds),
            0,
            "request {r} with {} bytes must be refused",
            p.len()
        );
    }
    // An oversized payload is skipped and refused; the stream stays usable.
    assert_ne!(fe.ack(req::SET_FEATURES, &vec![0u8; 5000], &[]), 0);
    // Bad header flags (reply bit set) are refused too.
    fe.send(req::GET_QUEUE_NUM, flags::VERSION | flags::REPLY, &[], &[]);
    assert!(
        fe.reply().1.is_empty(),
        "an explicit-reply request answers an error with no body"
    );
    assert!(fe.get(req::GET_VRING_BASE, &state(4, 0)).is_empty());
    assert_eq!(
        u64::from_ne_bytes(fe.get(req::GET_QUEUE_NUM, &[]).try_into().unwrap()),
        1
    );
    assert_eq!(space.exposure(), before, "nothing changed");
    assert!(space.windows().is_empty());
    let r = fe.finish();
    assert_eq!(r.exposure.updates, 0);
}

#[test]
fn blk_request_is_served_through_windows_filled_by_misses_and_nothing_else() {
    let img = disk("read", 16);
    let (fe, space) = Frontend::start(img.path(), true);
    let ram = memfd("vhost-iotlb-it-read", RAM);
    let mut ring = ring(&ram);
    ram.write_all_at(b"the guest's secret", SECRET).unwrap();
    let chan = negotiate(&fe, &ram, true);
    let bus = |gpa| gpa + IOVA_OFF;
    let (kick, call) = setup_ring(&fe, bus);
    // The front-end may tell the used ring up front, as QEMU does.
    let u = iotlb_msg(
        iotlb::UPDATE,
        bus(RING.desc),
        4096,
        UBASE + RING.desc,
        iotlb::PERM_RW,
    );
    assert_eq!(fe.ack(req::IOTLB_MSG, &u, &[]), 0);

    // IN (read sector 0 into DATA).
    post_request(&mut ring, bus, 0, DATA);
    kick.write(1).unwrap();
    let (misses, fails) = serve_misses(&fe, &chan, &call, |_| true);
    assert!(
        misses >= 3,
        "header, data and status pages were missed: {misses}"
    );
    assert_eq!(fails, 0);
    let mut status = [0xffu8];
    ram.read_exact_at(&mut status, STATUS).unwrap();
    assert_eq!(status[0], 0, "VIRTIO_BLK_S_OK");
    let mut got = vec![0u8; 4096];
    ram.read_exact_at(&mut got, DATA).unwrap();
    let want: Vec<u8> = (0..4096u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        got, want,
        "the disk's sector reached guest memory through a window"
    );
    let e = space.exposure();
    assert!(
        e.peak_mapped_bytes <= 4 * 4096,
        "ring, header, data, status pages at most: {e:?}"
    );
    assert_eq!(e.guest_ram_bytes, RAM);
    // Every window is an IOTLB entry; none covers the secret.
    for (start, len, _, _) in space.windows() {
        assert!(!(start..start + len).contains(&bus(SECRET)));
    }

    // OUT from the secret page, which the guest never mapped: the front-end refuses the
    // miss, the back-end reports the access failure, the request fails, the disk keeps
    // its data.
    post_request(&mut ring, bus, 1, SECRET);
    kick.write(1).unwrap();
    let (_, fails) = serve_misses(&fe, &chan, &call, |gpa| gpa != SECRET);
    assert!(fails >= 1, "an access failure was reported");
    ram.read_exact_at(&mut status, STATUS).unwrap();
    assert_eq!(status[0], 1, "VIRTIO_BLK_S_IOERR");
    let on_disk = img.contents();
    assert_eq!(
        &on_disk[..4096],
        &want[..],
        "the secret never reached the disk"
    );

    // Invalidate everything: nothing of guest RAM stays mapped.
    let inv = iotlb_msg(iotlb::INVALIDATE, 0, u64::MAX, 0, 0);
    assert_eq!(fe.ack(req::IOTLB_MSG, &inv, &[]), 0);
    assert_eq!(space.exposure().mapped_bytes, 0);
    assert!(!maps_mention_self("vhost-iotlb-it-read"));
    let r = fe.finish();
    assert_eq!(r.mode, Mode::Iotlb);
    assert_eq!(r.device.counters().ok, 1);
    assert_eq!(r.device.counters().ioerr, 1);
    assert!(r.exposure.miss_failures >= 1);
}

#[test]
fn without_iommu_platform_the_regions_are_mapped_and_ring_addresses_are_user_addresses() {
    let img = disk("plain", 16);
    let (fe, space) = Frontend::start(img.path(), false);
    let ram = memfd("vhost-iotlb-it-plain", RAM);
    let mut ring = ring(&ram);
    let _chan = negotiate(&fe, &ram, false);
    assert_eq!(space.mode(), Mode::Plain);
    assert_eq!(space.exposure().mapped_bytes, RAM);
    let (kick, call) = setup_ring(&fe, |gpa| gpa + UBASE);
    post_request(&mut ring, |gpa| gpa, 0, DATA);
    kick.write(1).unwrap();
    for _ in 0..500 {
        if call.read().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut status = [0xffu8];
    ram.read_exact_at(&mut status, STATUS).unwrap();
    assert_eq!(status[0], 0);
    let r = fe.finish();
    assert_eq!((r.mode, r.exposure.misses), (Mode::Plain, 0));
    assert_eq!(
        r.exposure.peak_mapped_bytes, RAM,
        "the comparison point: all of RAM"
    );
}

/// Waits until the used index reaches `idx`; false after 2 s (a request never served).
fn served(ring: &SplitRing<FileRam>, idx: u16) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while ring.used_idx() != idx {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
    true
}

#[test]
fn a_polling_worker_serves_unkicked_buffers_loses_no_wakeup_and_sleeps_when_idle() {
    use test_kit::ring::NO_NOTIFY;
    let img = disk("poll", 16);
    let (fe, _space) = Frontend::start_polling(img.path(), false, Duration::from_micros(50));
    let ram = memfd("vhost-iotlb-it-poll", RAM);
    let mut ring = ring(&ram);
    let _chan = negotiate(&fe, &ram, false);
    let (kick, _call) = setup_ring(&fe, |gpa| gpa + UBASE);
    // A driver as Linux's: it kicks only when the device did not say it polls. Gaps
    // from 0 to 120 µs fall inside the window, across it and past it.
    let (n, mut kicked) = (1500u16, 0u32);
    for i in 0..n {
        if post_request(&mut ring, |gpa| gpa, 0, DATA) {
            kick.write(1).unwrap();
            kicked += 1;
        }
        assert!(
            served(&ring, i.wrapping_add(1)),
            "request {i} was never served (published unkicked while the worker went to sleep)"
        );
        let gap = std::time::Instant::now() + Duration::from_micros(u64::from(i % 121));
        while std::time::Instant::now() < gap {
            std::hint::spin_loop();
        }
    }
    assert!(
        kicked > 0 && kicked < u32::from(n),
        "{kicked} of {n} kicked"
    );
    // Idle: after its window the worker asks for kicks again and uses no CPU.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.used_flags() & NO_NOTIFY, 0, "kicks are on again");
    let before = thread_ticks("vhost-iotlb-dev").expect("the worker thread");
    std::thread::sleep(Duration::from_secs(1));
    let after = thread_ticks("vhost-iotlb-dev").unwrap();
    assert!(after - before <= 1, "{} ticks while idle", after - before);
    let r = fe.finish();
    assert_eq!(r.device.counters().ok, u64::from(n));
    // Every request published unkicked was found by polling (some kicked ones too:
    // the re-check before sleeping finds them before their kick arrives).
    assert!(
        r.polled >= u64::from(n) - u64::from(kicked),
        "{} polled, {kicked} of {n} kicked",
        r.polled
    );
}

#[test]
fn a_worker_without_a_turn_of_its_poll_budget_serves_every_kick_and_never_polls() {
    let img = disk("poll-budget", 16);
    let budget = virtio_contract::PollBudget::local(1).unwrap();
    // The only turn is another poller's (the device host's, say) throughout.
    let _held = budget.try_take().unwrap();
    let config = virtio_contract::PollConfig {
        max: Duration::from_millis(1),
        budget,
    };
    let (fe, _space) = Frontend::start_polling(img.path(), false, config);
    let ram = memfd("vhost-iotlb-it-poll-budget", RAM);
    let mut ring = ring(&ram);
    let _chan = negotiate(&fe, &ram, false);
    let (kick, _call) = setup_ring(&fe, |gpa| gpa + UBASE);
    // Requests 10 µs apart, well inside a 1 ms window: each still needs its kick.
    let n = 200u16;
    for i in 0..n {
        assert!(
            post_request(&mut ring, |gpa| gpa, 0, DATA),
            "request {i}: the worker turned kicks off without a turn"
        );
        kick.write(1).unwrap();
        assert!(
            served(&ring, i.wrapping_add(1)),
            "request {i} was never served"
        );
        std::thread::sleep(Duration::from_micros(10));
    }
    let r = fe.finish();
    assert_eq!(r.device.counters().ok, u64::from(n));
    assert_eq!(r.polled, 0);
    assert!(r.poll_refused > 0, "{} windows refused", r.poll_refused);
}

/// Whether this process maps anything named `name`.
fn maps_mention_self(name: &str) -> bool {
    maps_mention("self", name).unwrap()
}

/// The lines of /proc/self/maps covering `addr`.
fn maps_at(addr: usize) -> Vec<String> {
    maps_covering("self", addr as u64).unwrap()
}

#[test]
fn after_an_invalidate_the_window_is_gone_from_proc_maps_and_access_fails_cleanly() {
    let space = AddressSpace::new(Limits::default());
    let ram = memfd("vhost-iotlb-it-maps", RAM);
    ram.write_all_at(b"SECRET!!", 0x3000).unwrap();
    space
        .set_regions(vec![(ram_region(), ram.try_clone().unwrap())])
        .unwrap();
    space.set_mode(Mode::Iotlb).unwrap();
    assert!(
        !maps_mention_self("vhost-iotlb-it-maps"),
        "the memory table is not mapped"
    );

    // Unpinned window: unmapped outright.
    space
        .update(0x1000_0000, 4096, UBASE + 0x3000, iotlb::PERM_RW)
        .unwrap();
    let host = space.windows()[0].2;
    assert!(maps_at(host)
        .iter()
        .any(|l| l.contains("vhost-iotlb-it-maps")));
    space.invalidate(0x1000_0000, 4096).unwrap();
    assert!(!maps_mention_self("vhost-iotlb-it-maps"));
    let view = space.view();
    assert!(
        view.read_obj::<u64>(GuestAddress(0x1000_0000)).is_err(),
        "access fails, no crash"
    );

    // Window pinned by a device batch (a slice still held): revoked in place — the
    // memfd is gone from the maps at once, the stale slice reads zeros, not the secret.
    space
        .update(0x2000_0000, 4096, UBASE + 0x3000, iotlb::PERM_RW)
        .unwrap();
    let host = space.windows()[0].2;
    let view = space.view();
    let slice = view
        .get_slices(GuestAddress(0x2000_0000), 8, Permissions::Read)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let mut b = [0u8; 8];
    slice.copy_to(&mut b[..]);
    assert_eq!(&b, b"SECRET!!");
    space.invalidate(0x2000_0000, 4096).unwrap();
    assert!(
        !maps_mention_self("vhost-iotlb-it-maps"),
        "guest pages left the process"
    );
    assert_eq!(space.exposure().mapped_bytes, 0);
    assert_eq!(space.exposure().revoked_in_use, 1);
    slice.copy_to(&mut b[..]);
    assert_eq!(b, [0; 8], "a late access lands in scratch");
    assert!(view.read_obj::<u64>(GuestAddress(0x2000_0000)).is_err());
    drop(view);
    assert!(
        maps_at(host)
            .iter()
            .all(|l| !l.contains("vhost-iotlb-it-maps")),
        "unmapped once the batch let go"
    );
}

/// Offers the back-end the push ring in `f` of `capacity` entries; its reply-ack.
fn set_push_ring<D>(fe: &Frontend<D>, capacity: u64, f: &File) -> u64 {
    fe.ack(
        req::APERTURE_SET_PUSH_RING,
        &capacity.to_ne_bytes(),
        &[f.as_raw_fd()],
    )
}

/// Pushes the guest page at `gpa` (IOVA `gpa + IOVA_OFF`), read-write.
fn push_page(pushes: &Producer, gpa: u64) {
    assert!(pushes.push(&Push {
        iova: gpa + IOVA_OFF,
        size: 4096,
        uaddr: UBASE + gpa,
        perm: iotlb::PERM_RW,
    }));
}

/// Whether the back-end holds a window over the guest page at `gpa`.
fn holds(space: &AddressSpace, gpa: u64) -> bool {
    space
        .windows()
        .iter()
        .any(|&(start, len, _, _)| (start..start + len).contains(&(gpa + IOVA_OFF)))
}

#[test]
fn pushes_through_the_ring_serve_a_request_without_a_miss_and_never_outlive_a_later_invalidate() {
    let img = disk("ring", 16);
    let (fe, space) = Frontend::start(img.path(), true);
    let ram = memfd("vhost-iotlb-it-ring", RAM);
    let mut ring = ring(&ram);
    let chan = negotiate(&fe, &ram, true);
    let bus = |gpa| gpa + IOVA_OFF;

    // A ring the back-end cannot use safely is refused, and changes nothing.
    let unsealed = memfd("vhost-iotlb-it-ring-unsealed", ring_bytes(16));
    assert_ne!(
        set_push_ring(&fe, 16, &unsealed),
        0,
        "not sealed against shrinking"
    );
    let (pushes, file) = Producer::create(16).unwrap();
    assert_ne!(
        set_push_ring(&fe, 12, &file),
        0,
        "capacity not a power of two"
    );
    assert_ne!(
        set_push_ring(&fe, 32, &file),
        0,
        "file smaller than the ring"
    );
    assert_eq!(set_push_ring(&fe, 16, &file), 0);

    // The guest maps its ring, the request's three buffers and a page the device never
    // touches; the front-end pushes each through the ring: no message at all.
    for gpa in [RING.desc, HDR, DATA, STATUS, SECRET] {
        push_page(&pushes, gpa);
    }
    // An entry no update could be: skipped and counted, the rest still apply.
    assert!(pushes.push(&Push {
        iova: bus(0x30000),
        size: 4096,
        uaddr: UBASE + 0x30000,
        perm: 0,
    }));
    let (kick, call) = setup_ring(&fe, bus);
    post_request(&mut ring, bus, 0, DATA);
    kick.write(1).unwrap();
    assert_eq!(
        serve_misses(&fe, &chan, &call, |_| false),
        (0, 0),
        "no miss and no access failure: every window came from the ring"
    );
    let mut status = [0xffu8];
    ram.read_exact_at(&mut status, STATUS).unwrap();
    assert_eq!(status[0], 0, "VIRTIO_BLK_S_OK");
    let mut got = vec![0u8; 4096];
    ram.read_exact_at(&mut got, DATA).unwrap();
    let want: Vec<u8> = (0..4096u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(got, want);
    let e = space.exposure();
    assert_eq!((e.misses, e.ring_updates, e.ring_refused), (0, 5, 1));

    // Strict: an INVALIDATE sent after a push removes that window before its ack, even
    // when the back-end had not read the push yet.
    push_page(&pushes, 0x40000);
    let inv = iotlb_msg(iotlb::INVALIDATE, bus(0x40000), 4096, 0, 0);
    assert_eq!(fe.ack(req::IOTLB_MSG, &inv, &[]), 0);
    let e = space.exposure();
    assert_eq!(e.ring_updates, 6, "the push was applied first");
    assert!(!holds(&space, 0x40000), "then invalidated");
    assert!(holds(&space, SECRET), "other pushed windows stay");
    let inv = iotlb_msg(iotlb::INVALIDATE, 0, u64::MAX, 0, 0);
    assert_eq!(fe.ack(req::IOTLB_MSG, &inv, &[]), 0);
    assert_eq!(space.exposure().mapped_bytes, 0);
    let r = fe.finish();
    assert_eq!(r.device.counters().ok, 1);
}

#[test]
fn an_invalidation_written_while_the_worker_polls_is_applied_and_acknowledged_in_the_ring() {
    let img = disk("ring-inv", 16);
    let (fe, space) = Frontend::start_polling(img.path(), true, Duration::from_micros(200));
    let ram = memfd("vhost-iotlb-it-ring-inv", RAM);
    let mut ring = ring(&ram);
    let _chan = negotiate(&fe, &ram, true);
    let bus = |gpa| gpa + IOVA_OFF;
    let (pushes, file) = Producer::create(64).unwrap();
    assert_eq!(set_push_ring(&fe, 64, &file), 0);
    for gpa in [RING.desc, HDR, DATA, STATUS] {
        push_page(&pushes, gpa);
    }
    let (kick, _call) = setup_ring(&fe, bus);
    // A guest that maps and unmaps a page between reads, as a strict one does. The
    // front-end's rule: written while the worker polls (checked after the write), the
    // invalidation needs no message; otherwise it sends one too.
    let (mut by_ring, mut by_message) = (0u32, 0u32);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0u16;
    while (by_ring < 50 || i < 200) && std::time::Instant::now() < deadline {
        if post_request(&mut ring, bus, 0, DATA) {
            kick.write(1).unwrap();
        }
        i = i.wrapping_add(1);
        assert!(served(&ring, i), "request {i} was never served");
        push_page(&pushes, SECRET);
        let seq = pushes.invalidate(bus(SECRET), 4096).unwrap();
        if pushes.peer_polling() {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while pushes.invalidated() < seq {
                assert!(
                    std::time::Instant::now() < until,
                    "invalidation {seq}, written while the worker polled, never acknowledged"
                );
                std::thread::yield_now();
            }
            by_ring += 1;
        } else {
            let inv = iotlb_msg(iotlb::INVALIDATE, bus(SECRET), 4096, 0, 0);
            assert_eq!(fe.ack(req::IOTLB_MSG, &inv, &[]), 0);
            by_message += 1;
        }
        assert!(
            !holds(&space, SECRET),
            "the window outlived its acknowledgement"
        );
        let gap = std::time::Instant::now() + Duration::from_micros(u64::from(i % 60));
        while std::time::Instant::now() < gap {
            std::hint::spin_loop();
        }
    }
    assert!(
        by_ring >= 50,
        "{by_ring} through the ring, {by_message} as messages"
    );
    assert!(space.exposure().ring_invalidates >= u64::from(by_ring));
    let r = fe.finish();
    assert_eq!(r.device.counters().ok, u64::from(i));
}

#[test]
fn a_whole_mapping_back_end_translates_nothing_an_invalidation_complete_by_its_views_removed() {
    let img = disk("ring-whole", 16);
    let (fe, space) = Frontend::start_as(
        img.path(),
        true,
        Duration::from_micros(200),
        MapPolicy::Whole,
    );
    let ram = memfd("vhost-iotlb-it-ring-whole", RAM);
    let mut ring = ring(&ram);
    let _chan = negotiate(&fe, &ram, true);
    let bus = |gpa| gpa + IOVA_OFF;
    let (pushes, file) = Producer::create(64).unwrap();
    assert_eq!(set_push_ring(&fe, 64, &file), 0);
    assert!(pushes.peer_whole());
    assert_eq!(space.exposure().mapped_bytes, RAM, "guest RAM mapped whole");
    for gpa in [RING.desc, HDR, DATA, STATUS] {
        push_page(&pushes, gpa);
    }
    let (kick, _call) = setup_ring(&fe, bus);
    // A strict guest mapping and unmapping a page between reads, the front-end
    // completing each UNMAP at once when the back-end has no view of guest memory
    // alive after the write, and otherwise sending the INVALIDATE as well (as ours
    // does). Either way no view made after that translates the page: it applies the
    // invalidation first.
    let (mut at_once, mut by_message) = (0u32, 0u32);
    for i in 1..=200u16 {
        if post_request(&mut ring, bus, 0, DATA) {
            kick.write(1).unwrap();
        }
        assert!(served(&ring, i), "request {i} was never served");
        push_page(&pushes, SECRET);
        pushes.invalidate(bus(SECRET), 4096).unwrap();
        if pushes.peer_views() == 0 {
            at_once += 1;
        } else {
            let inv = iotlb_msg(iotlb::INVALIDATE, bus(SECRET), 4096, 0, 0);
            assert_eq!(fe.ack(req::IOTLB_MSG, &inv, &[]), 0);
            by_message += 1;
        }
        drop(space.view());
        assert!(
            !holds(&space, SECRET),
            "a view made after the UNMAP completed could translate the page"
        );
    }
    assert!(
        at_once > 0,
        "{at_once} complete at once, {by_message} by message"
    );
    assert_eq!(space.exposure().misses, 0);
    let r = fe.finish();
    assert_eq!(r.device.counters().ok, 200);
}
