//! Unit tests of the address space: windows, pins, revocation and exposure.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use super::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const RAM: u64 = 1 << 20;
const UBASE: u64 = 0x7f00_0000_0000;

fn ram() -> File {
    test_kit::mem::memfd("space-unit-ram", RAM)
}

fn space(mode: Mode) -> Arc<AddressSpace> {
    space_with(mode, MapPolicy::Windows)
}

fn space_with(mode: Mode, policy: MapPolicy) -> Arc<AddressSpace> {
    let limits = Limits {
        max_windows: 4,
        miss_timeout: Duration::from_millis(200),
        max_misses_per_access: 16,
    };
    let s = AddressSpace::with_policy(limits, policy);
    let region = MemoryRegion {
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: UBASE,
        mmap_offset: 0,
    };
    s.set_regions(vec![(region, ram())]).unwrap();
    s.set_mode(mode).unwrap();
    s
}

/// Gives `s` a push ring of 16 entries; returns the front-end's end.
fn with_ring(s: &AddressSpace) -> crate::push_ring::Producer {
    use crate::push_ring::{Consumer, Producer};
    let (prod, file) = Producer::create(16).unwrap();
    s.set_push_ring(Some(Consumer::open(&file, 16).unwrap()));
    prod
}

#[test]
fn iotlb_mode_maps_nothing_until_an_update_and_only_the_window_then() {
    let s = space(Mode::Iotlb);
    assert_eq!(
        s.exposure().mapped_bytes,
        0,
        "the memory table is never mapped"
    );
    assert_eq!(s.exposure().guest_ram_bytes, RAM);
    let v = s.view();
    assert!(v.read_obj::<u32>(GuestAddress(0x1000)).is_err());
    s.update(0x10_0000_0000, 4096, UBASE + 0x3000, iotlb::PERM_RW)
        .unwrap();
    assert_eq!(s.exposure().mapped_bytes, 4096);
    v.write_obj(0xdead_beef_u32, GuestAddress(0x10_0000_0010))
        .unwrap();
    assert_eq!(
        v.read_obj::<u32>(GuestAddress(0x10_0000_0010)).unwrap(),
        0xdead_beef
    );
    assert!(
        v.read_obj::<u32>(GuestAddress(0x10_0000_1000)).is_err(),
        "one byte past"
    );
}

#[test]
fn plain_mode_maps_the_regions_by_guest_physical_address() {
    let s = space(Mode::Plain);
    assert_eq!(s.exposure().mapped_bytes, RAM);
    let v = s.view();
    v.write_obj(7u8, GuestAddress(RAM - 1)).unwrap();
    assert!(v.read_obj::<u8>(GuestAddress(RAM)).is_err());
    assert_eq!(s.uaddr_to_gpa(UBASE + 0x1234), Some(0x1234));
    assert_eq!(s.uaddr_to_gpa(UBASE + RAM), None);
    assert!(matches!(
        s.update(0, 4096, UBASE, 3),
        Err(SpaceError::NotIotlb)
    ));
}

#[test]
fn permissions_of_the_update_are_enforced() {
    let s = space(Mode::Iotlb);
    s.update(0x2000, 4096, UBASE, iotlb::PERM_RO).unwrap();
    let v = s.view();
    assert!(v.read_obj::<u8>(GuestAddress(0x2000)).is_ok());
    assert!(v.write_obj(1u8, GuestAddress(0x2000)).is_err());
    // No channel: a denied access is counted as an access failure all the same.
    assert_eq!(s.exposure().access_fails, 1);
}

#[test]
fn updates_outside_the_memory_table_or_overflowing_change_nothing() {
    let s = space(Mode::Iotlb);
    let before = s.exposure();
    assert!(matches!(
        s.update(0, 4096, UBASE + RAM - 100, 3),
        Err(SpaceError::OutsideRegions { .. })
    ));
    assert!(matches!(
        s.update(0, 4096, 0x1000, 3),
        Err(SpaceError::OutsideRegions { .. })
    ));
    assert!(matches!(
        s.update(u64::MAX, 2, UBASE, 3),
        Err(SpaceError::IotlbRange { .. })
    ));
    assert!(matches!(
        s.update(0, 0, UBASE, 3),
        Err(SpaceError::IotlbRange { .. })
    ));
    assert!(matches!(
        s.invalidate(5, 0),
        Err(SpaceError::IotlbRange { .. })
    ));
    assert_eq!(s.exposure(), before);
    assert!(s.windows().is_empty());
}

#[test]
fn a_window_ending_at_the_top_of_the_address_space_is_legal() {
    let s = space(Mode::Iotlb);
    s.update(u64::MAX - 4095, 4096, UBASE, 3).unwrap();
    let v = s.view();
    v.write_obj(9u8, GuestAddress(u64::MAX)).unwrap();
    assert!(v.read_obj::<u16>(GuestAddress(u64::MAX)).is_err());
    s.invalidate(u64::MAX - 4095, 4096).unwrap();
    assert!(s.windows().is_empty());
}

#[test]
fn window_count_is_bounded_by_evicting_the_oldest() {
    let s = space(Mode::Iotlb);
    for i in 0..6u64 {
        s.update(i * 4096, 4096, UBASE + i * 4096, 3).unwrap();
    }
    let e = s.exposure();
    assert_eq!(e.windows, 4);
    assert_eq!(e.evictions, 2);
    assert_eq!(e.peak_windows, 4);
    let starts: Vec<u64> = s.windows().iter().map(|w| w.0).collect();
    assert_eq!(starts, vec![0x2000, 0x3000, 0x4000, 0x5000]);
}

#[test]
fn an_update_repeating_a_held_window_keeps_it_for_the_batch_using_it() {
    let s = space(Mode::Iotlb);
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    let mut pins = Vec::new();
    let pieces = s
        .translate(0x1000, 4096, Permissions::Write, Some(&mut pins))
        .unwrap();
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    assert_eq!(s.exposure().revoked_in_use, 0);
    assert!(!pins[0].map.is_revoked(), "the batch's window stays mapped");
    // SAFETY: the piece is the 4096 bytes of the window `pins` keeps mapped.
    unsafe { pieces[0].0.write(0x5a) };
    assert_eq!(s.view().read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x5a);
    assert_eq!(s.exposure().updates, 2);
    // A different translation at the same IOVA still replaces it.
    s.update(0x1000, 4096, UBASE + 0x2000, iotlb::PERM_RW)
        .unwrap();
    assert_eq!(s.exposure().revoked_in_use, 1);
}

#[test]
fn an_update_over_existing_windows_replaces_them() {
    let s = space(Mode::Iotlb);
    s.update(0x1000, 4096, UBASE, 3).unwrap();
    s.update(0x2000, 4096, UBASE + 0x1000, 3).unwrap();
    s.update(0x1800, 4096, UBASE + 0x5000, 1).unwrap();
    let w = s.windows();
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].0, w[0].1), (0x1800, 4096));
}

#[test]
fn exposure_counts_pages_now_and_at_the_peak() {
    let s = space(Mode::Iotlb);
    s.update(0, 8192, UBASE, 3).unwrap();
    s.update(0x10000, 100, UBASE + 0x8010, 3).unwrap();
    let e = s.exposure();
    assert_eq!(
        e.mapped_bytes,
        8192 + 4096,
        "a 100-byte window costs its page"
    );
    s.invalidate(0, 8192).unwrap();
    let e = s.exposure();
    assert_eq!(e.mapped_bytes, 4096);
    assert_eq!(e.peak_mapped_bytes, 12288);
    assert_eq!((e.updates, e.invalidates), (2, 1));
    s.set_mode(Mode::Unset).unwrap();
    assert_eq!(s.exposure().mapped_bytes, 0);
}

#[test]
fn bad_memory_tables_are_refused_and_keep_the_old_one() {
    let s = space(Mode::Plain);
    let r = |gpa, size, uaddr, off| MemoryRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
        mmap_offset: off,
    };
    let cases = vec![
        vec![(r(0, 0, UBASE, 0), ram())],
        vec![(r(u64::MAX, 2, UBASE, 0), ram())],
        vec![(r(0, RAM * 2, UBASE, 0), ram())],
        vec![
            (r(0, 4096, UBASE, 0), ram()),
            (r(4096, 4096, UBASE + 10, 0), ram()),
        ],
        vec![
            (r(0, 4096, UBASE, 0), ram()),
            (r(100, 4096, UBASE + RAM, 0), ram()),
        ],
    ];
    for table in cases {
        assert!(s.set_regions(table).is_err());
        assert_eq!(s.exposure().mapped_bytes, RAM);
        assert_eq!(s.uaddr_to_gpa(UBASE), Some(0));
    }
}

#[test]
fn whole_policy_maps_the_regions_once_and_checks_every_access_against_the_windows() {
    let s = space_with(Mode::Iotlb, MapPolicy::Whole);
    assert_eq!(s.exposure().mapped_bytes, RAM, "guest RAM is mapped whole");
    let v = s.view();
    assert!(
        v.read_obj::<u32>(GuestAddress(0x1000)).is_err(),
        "no window yet"
    );
    s.update(0x10_0000_0000, 4096, UBASE + 0x3000, iotlb::PERM_RO)
        .unwrap();
    assert_eq!(s.exposure().mapped_bytes, RAM, "a window maps nothing more");
    assert_eq!(s.exposure().windows, 1);
    assert!(
        v.write_obj(1u32, GuestAddress(0x10_0000_0010)).is_err(),
        "the window's permission holds though the mapping is writable"
    );
    s.update(0x20_0000_0000, 4096, UBASE + 0x3000, iotlb::PERM_RW)
        .unwrap();
    v.write_obj(0xdead_beef_u32, GuestAddress(0x20_0000_0010))
        .unwrap();
    assert_eq!(
        v.read_obj::<u32>(GuestAddress(0x10_0000_0010)).unwrap(),
        0xdead_beef,
        "both windows reach the same guest page"
    );
    assert!(v.read_obj::<u32>(GuestAddress(0x20_0000_1000)).is_err());
    drop(v);
    s.invalidate(0x10_0000_0000, 4096).unwrap();
    assert!(s
        .view()
        .read_obj::<u32>(GuestAddress(0x10_0000_0010))
        .is_err());
    // Leaving IOTLB mode unmaps the whole of it.
    s.set_mode(Mode::Unset).unwrap();
    assert_eq!(s.exposure().mapped_bytes, 0);
}

#[test]
fn whole_policy_invalidation_completes_only_once_the_views_alive_have_dropped() {
    let s = space_with(Mode::Iotlb, MapPolicy::Whole);
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    let view = s.view();
    let slice = view
        .get_slices(GuestAddress(0x1000), 8, Permissions::Read)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = Arc::clone(&s);
    let t = std::thread::spawn(move || {
        let r = s2.invalidate(0x1000, 4096);
        tx.send(()).unwrap();
        r
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "not complete while a view that translated the window is alive"
    );
    assert!(
        s.view().read_obj::<u64>(GuestAddress(0x1000)).is_err(),
        "yet a new view no longer reaches it"
    );
    // The old slice still reads valid memory (the region stays mapped).
    let _ = slice.load::<u64>(0, Ordering::Relaxed);
    drop(view);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    t.join().unwrap().unwrap();
    // With no view alive, an invalidation does not wait at all.
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    s.invalidate(0x1000, 4096).unwrap();
}

#[test]
fn whole_policy_invalidation_fails_busy_when_a_view_outlives_its_wait() {
    let s = space_with(Mode::Iotlb, MapPolicy::Whole);
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    // A view that has not translated through the window does not hold it up.
    let idle = s.view();
    s.invalidate(0x1000, 4096).unwrap();
    drop(idle);
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    let view = s.view();
    let _ = view
        .get_slices(GuestAddress(0x1000), 8, Permissions::Read)
        .unwrap();
    let started = Instant::now();
    assert!(matches!(
        s.invalidate(0x1000, 4096),
        Err(SpaceError::Busy { .. })
    ));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "waited the limit"
    );
    assert!(
        view.read_obj::<u64>(GuestAddress(0x1000)).is_err(),
        "the entry is gone"
    );
}

#[test]
fn pushes_after_an_invalidation_in_the_ring_are_applied_after_it() {
    use crate::push_ring::Push;
    for policy in [MapPolicy::Windows, MapPolicy::Whole] {
        let s = space_with(Mode::Iotlb, policy);
        let prod = with_ring(&s);
        let push = |uaddr| {
            assert!(prod.push(&Push {
                iova: 0x1000,
                size: 4096,
                uaddr,
                perm: iotlb::PERM_RW,
            }));
        };
        // The guest maps an IOVA, unmaps it, and maps it again elsewhere, all before
        // the back-end looks at the ring.
        push(UBASE);
        prod.invalidate(0x1000, 4096).unwrap();
        push(UBASE + 0x5000);
        if policy == MapPolicy::Windows {
            // Pushes alone stop at the invalidation they must not overtake.
            assert_eq!(s.apply_pushes(), 1);
            assert_eq!(s.windows().len(), 1);
        }
        assert_eq!(s.apply_ring(), 1);
        assert_eq!(s.windows().len(), 1, "{policy:?}");
        assert_eq!(
            s.read().find(0x1000).map(|w| w.uaddr),
            Some(UBASE + 0x5000),
            "{policy:?}: the second mapping stands, the first is gone"
        );
        assert_eq!(s.exposure().ring_invalidates, 1);
    }
}

#[test]
fn whole_policy_invalidate_waits_for_a_pinning_view_even_when_the_ring_removed_the_window_first() {
    let s = space_with(Mode::Iotlb, MapPolicy::Whole);
    let prod = with_ring(&s);
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    let view = s.view();
    let _ = view
        .get_slices(GuestAddress(0x1000), 8, Permissions::Read)
        .unwrap();
    // The front-end saw the view alive, so it sends the INVALIDATE as well; the
    // socket thread applies the ring before the message, which removes the window.
    prod.invalidate(0x1000, 4096).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = Arc::clone(&s);
    let t = std::thread::spawn(move || {
        s2.apply_pushes();
        let r = s2.invalidate(0x1000, 4096);
        tx.send(()).unwrap();
        r
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "acknowledged while the view that pinned the window was alive"
    );
    drop(view);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(s.exposure().ring_invalidates, 1);
}

#[test]
fn whole_policy_views_publish_what_they_use_and_retranslate_what_was_invalidated_meanwhile() {
    let s = space_with(Mode::Iotlb, MapPolicy::Whole);
    let prod = with_ring(&s);
    s.update(0x1000, 4096, UBASE, iotlb::PERM_RW).unwrap();
    s.update(0x2000, 4096, UBASE + 0x1000, iotlb::PERM_RW)
        .unwrap();
    let view = s.view();
    view.read_obj::<u64>(GuestAddress(0x1000)).unwrap();
    assert_eq!(prod.peer_views(), 1);
    assert!(!prod.peer_clear_of(0x1000, 0x1fff), "in use");
    assert!(
        prod.peer_clear_of(0x2000, 0x2fff),
        "not touched by the view"
    );
    // The front-end saw 0x2000 clear and completed its UNMAP: the view, touching it
    // afterwards, finds the invalidation first and misses (no channel: it fails).
    prod.invalidate(0x2000, 4096).unwrap();
    assert!(view.read_obj::<u64>(GuestAddress(0x2000)).is_err());
    assert!(s.read().find(0x2000).is_none());
    drop(view);
    assert_eq!(prod.peer_views(), 0);
    assert!(
        prod.peer_clear_of(0, u64::MAX),
        "nothing in use once no view is alive"
    );
}
