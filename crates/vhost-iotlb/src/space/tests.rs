//! Unit tests of the address space: windows, pins, revocation and exposure.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use super::*;
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 1 << 20;
const UBASE: u64 = 0x7f00_0000_0000;

fn ram() -> File {
    test_kit::mem::memfd("space-unit-ram", RAM)
}

fn space(mode: Mode) -> Arc<AddressSpace> {
    let s = AddressSpace::new(Limits {
        max_windows: 4,
        miss_timeout: Duration::from_millis(200),
        max_misses_per_access: 16,
    });
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
