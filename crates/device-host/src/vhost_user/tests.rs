#![allow(clippy::unwrap_used)]
use super::iotlb::{IotlbState, Region, ShadowMap};
use super::link::{Link, Reply};
use super::memory::{mem_table, SharedRange};
use super::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryMmap, Permissions};
use wire::{req, Header};
use zerocopy::IntoBytes;

#[test]
fn shared_range_clips_regions_to_its_bytes_and_nothing_more() {
    let s = SharedRange {
        first: 0x1000,
        last: 0x1fff,
    };
    assert_eq!(
        s.clip(0, 0x10_0000),
        Some((0x1000, 0x1000)),
        "region around it"
    );
    assert_eq!(
        s.clip(0x1800, 0x1000),
        Some((0x1800, 0x800)),
        "overlaps the end"
    );
    assert_eq!(
        s.clip(0x800, 0x1000),
        Some((0x1000, 0x800)),
        "overlaps the start"
    );
    assert_eq!(s.clip(0x2000, 0x1000), None, "just after");
    assert_eq!(s.clip(0, 0x1000), None, "just before");
    assert_eq!(s.clip(0x1000, 0), None, "empty region");
    assert_eq!(s.clip(u64::MAX, 2), None, "wraps");
    assert!(s.holds(0x1000, 0x1000) && s.holds(0x1fff, 1));
    assert!(!s.holds(0x1fff, 2) && !s.holds(0xfff, 1) && !s.holds(0x1000, 0));
    assert!(!s.holds(u64::MAX, 2));
}

/// Guest RAM of two memfds: [0, 1 MiB) and the "pool" [1 MiB, 1.25 MiB).
fn split_ram() -> GuestMemoryMmap {
    let file = |len: u64| test_kit::mem::memfd("aperture-test", len);
    let (ram, pool) = (file(1 << 20), file(256 << 10));
    GuestMemoryMmap::from_ranges_with_files(&[
        (
            GuestAddress(0),
            1 << 20,
            Some(vm_memory::FileOffset::new(ram, 0)),
        ),
        (
            GuestAddress(1 << 20),
            256 << 10,
            Some(vm_memory::FileOffset::new(pool, 0)),
        ),
    ])
    .unwrap()
}

#[test]
fn pool_mode_table_is_the_pool_file_alone_or_refused() {
    let mem = split_ram();
    let (all, files) = mem_table(&mem, None).unwrap();
    assert_eq!(
        (all.len(), files.len()),
        (2, 2),
        "both files without pool mode"
    );
    let pool = SharedRange {
        first: 1 << 20,
        last: (1 << 20) + (256 << 10) - 1,
    };
    let (t, files) = mem_table(&mem, Some(pool)).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(
        (t[0].guest_phys_addr, t[0].memory_size, t[0].mmap_offset),
        (1 << 20, 256 << 10, 0)
    );
    // Half the pool: the file would still hand over all of it.
    let half = SharedRange {
        first: 1 << 20,
        last: (1 << 20) + (128 << 10) - 1,
    };
    assert!(matches!(
        mem_table(&mem, Some(half)),
        Err(VhostUserError::PoolMode(_))
    ));
    // A range that reaches into RAM's file too.
    let wide = SharedRange {
        first: (1 << 20) - 4096,
        last: pool.last,
    };
    assert!(matches!(
        mem_table(&mem, Some(wide)),
        Err(VhostUserError::PoolMode(_))
    ));
    // Nothing file-backed in the range.
    let beyond = SharedRange {
        first: 4 << 20,
        last: (5 << 20) - 1,
    };
    assert!(matches!(
        mem_table(&mem, Some(beyond)),
        Err(VhostUserError::PoolMode(_))
    ));
}

/// A link whose back-end end answers GET_FEATURES with `reply` (raw bytes).
fn link_answering(reply: Vec<u8>, protocol: u64) -> Link {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut t = theirs;
        let mut h = Header::default();
        while t.read_exact(h.as_mut_bytes()).is_ok() {
            let mut body = vec![0u8; h.size as usize];
            if t.read_exact(&mut body).is_err() {
                return;
            }
            let _ = t.write_all(&reply);
        }
    });
    Link {
        main: Mutex::new(ours),
        protocol,
        features: 0,
        timeout: Duration::from_millis(200),
        backend_req: None,
        push_ring: std::sync::OnceLock::new(),
    }
}

fn reply(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Header {
        request,
        flags,
        size: body.len() as u32,
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(body);
    v
}

const OK_FLAGS: u32 = wire::flags::VERSION | wire::flags::REPLY;

#[test]
fn well_formed_reply_is_accepted() {
    let l = link_answering(reply(req::GET_FEATURES, OK_FLAGS, &7u64.to_ne_bytes()), 0);
    assert_eq!(l.get_u64(req::GET_FEATURES).unwrap(), 7);
}

#[test]
fn reply_to_another_request_is_refused() {
    let l = link_answering(reply(req::GET_PROTOCOL_FEATURES, OK_FLAGS, &[0; 8]), 0);
    let e = l.get_u64(req::GET_FEATURES).unwrap_err();
    assert!(
        matches!(e, VhostUserError::BadReply { .. }) && e.breaks_connection(),
        "{e}"
    );
}

#[test]
fn reply_without_reply_flag_or_version_1_is_refused() {
    for flags in [wire::flags::VERSION, 2 | wire::flags::REPLY] {
        let l = link_answering(reply(req::GET_FEATURES, flags, &[0; 8]), 0);
        let e = l.get_u64(req::GET_FEATURES).unwrap_err();
        assert!(e.to_string().contains("header flags"), "{e}");
    }
}

#[test]
fn short_and_oversized_replies_are_refused() {
    let l = link_answering(reply(req::GET_FEATURES, OK_FLAGS, &[0; 4]), 0);
    assert!(matches!(
        l.get_u64(req::GET_FEATURES),
        Err(VhostUserError::BadReply { .. })
    ));
    // A header announcing more than MAX_PAYLOAD: refused without reading it.
    let mut big = Header {
        request: req::GET_FEATURES,
        flags: OK_FLAGS,
        size: wire::MAX_PAYLOAD as u32 + 1,
    }
    .as_bytes()
    .to_vec();
    big.extend_from_slice(&[0; 8]);
    let l = link_answering(big, 0);
    let e = l.get_u64(req::GET_FEATURES).unwrap_err();
    assert!(e.to_string().contains("payload of 4097 bytes"), "{e}");
}

#[test]
fn no_answer_is_a_timeout_and_a_closed_socket_an_io_error() {
    let l = link_answering(Vec::new(), 0);
    let t = Instant::now();
    assert!(matches!(
        l.get_u64(req::GET_FEATURES),
        Err(VhostUserError::Timeout { .. })
    ));
    assert!(t.elapsed() >= Duration::from_millis(200));
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    let l = Link {
        main: Mutex::new(ours),
        protocol: 0,
        features: 0,
        timeout: Duration::from_millis(200),
        backend_req: None,
        push_ring: std::sync::OnceLock::new(),
    };
    assert!(matches!(
        l.get_u64(req::GET_FEATURES),
        Err(VhostUserError::Io { .. })
    ));
}

#[test]
fn nonzero_reply_ack_is_a_refusal_that_keeps_the_link() {
    let ack_on = wire::protocol::REPLY_ACK;
    let l = link_answering(
        reply(req::SET_FEATURES, OK_FLAGS, &5u64.to_ne_bytes()),
        ack_on,
    );
    let e = l
        .request(req::SET_FEATURES, &[0; 8], &[], Reply::None)
        .unwrap_err();
    assert!(matches!(e, VhostUserError::Refused { status: 5, .. }) && !e.breaks_connection());
    // Without REPLY_ACK a set request waits for nothing; an ack cannot be demanded.
    let l = link_answering(Vec::new(), 0);
    assert!(l
        .request(req::SET_FEATURES, &[0; 8], &[], Reply::None)
        .is_ok());
    assert!(l
        .request(req::IOTLB_MSG, &[0; 32], &[], Reply::Ack)
        .is_err());
}

#[test]
fn iotlb_message_is_32_bytes_with_type_at_offset_25() {
    let m = wire::IotlbMsg {
        iova: 1,
        size: 2,
        uaddr: 3,
        perm: wire::iotlb::PERM_RW,
        kind: wire::iotlb::UPDATE,
        padding: [0; 6],
    };
    let b = m.as_bytes();
    assert_eq!(b.len(), 32);
    assert_eq!((b[24], b[25]), (3, 2));
    assert_eq!(size_of::<wire::VringAddr>(), 40);
    assert_eq!(size_of::<wire::MemoryRegion>(), 32);
}

fn state(regions: &[(u64, u64)]) -> IotlbState {
    IotlbState {
        regions: regions
            .iter()
            .map(|&(gpa, size)| Region {
                gpa,
                size,
                uaddr: UADDR_BASE + gpa,
            })
            .collect(),
        active: true,
        ..IotlbState::default()
    }
}

#[test]
fn pushes_stop_at_half_the_windows_so_misses_always_find_room() {
    let mut st = state(&[(0, 1 << 30)]);
    let mut pushed = 0;
    for i in 0..MAX_WINDOWS as u64 {
        let (start, end) = (i * 0x1000, i * 0x1000 + 0xfff);
        st.mappings.insert(
            start,
            ShadowMap {
                end,
                phys: start,
                perms: Permissions::ReadWrite,
            },
        );
        pushed += st.push_windows(start, end, Permissions::ReadWrite).len();
    }
    assert_eq!(pushed, MAX_WINDOWS / 2);
    // A miss on a mapping that was not pushed still gets its window.
    let last = (MAX_WINDOWS as u64 - 1) * 0x1000;
    let w = st.window(last, Permissions::Write).unwrap();
    assert!(st.give(&w), "a miss found room");
}

#[test]
fn window_is_the_mapping_clipped_to_one_region() {
    let mut st = state(&[(0, 0x10000), (0x20000, 0x10000)]);
    st.mappings.insert(
        0x1000_0000,
        ShadowMap {
            end: 0x1002_ffff,
            phys: 0x8000,
            perms: Permissions::Read,
        },
    );
    let w = st.window(0x1000_4000, Permissions::Read).unwrap();
    assert_eq!(
        (w.iova, w.size, w.uaddr, w.perm),
        (
            0x1000_0000,
            0x8000,
            UADDR_BASE + 0x8000,
            wire::iotlb::PERM_RO
        )
    );
    assert_eq!(
        st.window(0x1000_4000, Permissions::Write),
        None,
        "read-only"
    );
    // 0x10010000.. maps to GPA 0x18000, a hole between the regions.
    assert_eq!(st.window(0x1001_0000, Permissions::Read), None);
    let w = st.window(0x1002_0000, Permissions::Read).unwrap();
    assert_eq!(
        (w.iova, w.size, w.uaddr),
        (0x1001_8000, 0x10000, UADDR_BASE + 0x20000)
    );
    st.identity = true;
    let w = st.window(0x2_1000, Permissions::Write).unwrap();
    assert_eq!(
        (w.iova, w.size, w.perm),
        (0x20000, 0x10000, wire::iotlb::PERM_RW)
    );
    st.active = false;
    assert_eq!(st.window(0x2_1000, Permissions::Write), None, "not started");
}

#[test]
fn mapping_to_the_top_of_the_address_space_does_not_overflow() {
    let mut st = state(&[(0, 0x10000)]);
    st.mappings.insert(
        0,
        ShadowMap {
            end: u64::MAX,
            phys: 0,
            perms: Permissions::ReadWrite,
        },
    );
    let w = st.window(0x100, Permissions::Read).unwrap();
    assert_eq!((w.iova, w.size), (0, 0x10000));
    st.given.insert(0, u64::MAX);
    assert_eq!(st.take_given(u64::MAX, u64::MAX), Some((0, u64::MAX)));
    assert!(st.given.is_empty());
}

#[test]
fn take_given_returns_the_hull_of_overlapping_windows_only() {
    let mut st = state(&[]);
    st.given.insert(0x1000, 0x1fff);
    st.given.insert(0x3000, 0x3fff);
    st.given.insert(0x8000, 0x8fff);
    assert_eq!(st.take_given(0x1800, 0x37ff), Some((0x1000, 0x3fff)));
    assert_eq!(st.take_given(0x4000, 0x7fff), None);
    assert_eq!(st.given.len(), 1);
}
