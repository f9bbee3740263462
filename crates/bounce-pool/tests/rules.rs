//! The restricted-pool acceptance list (items 1–9 below), one test per rule, on guest
//! RAM with the pool inside it and the original buffers elsewhere in it. (Item 10,
//! concurrency, is in `model.rs`; item 9 for a backend in its own process is in
//! `backend_process.rs`.) The items restate how Linux builds and uses a restricted DMA
//! pool (`kernel/dma/swiotlb.c`, `include/linux/swiotlb.h`, `drivers/of/device.c`, and
//! the binding `Documentation/devicetree/bindings/reserved-memory/shared-dma-pool.yaml`):
//!
//! 1. A pool comes from a `restricted-dma-pool` node, by `reg` or by `size` and
//!    `alignment`; a node that also says `no-map`, `reusable`, `linux,cma-default` or
//!    `linux,dma-default` is refused (`rmem_swiotlb_setup`); a device uses one such pool
//!    only, and none when it sits behind an IOMMU (`of_dma_set_restricted_buffer`).
//! 2. Geometry: 2 KiB slots in 128-slot segments, so a mapping is at most 256 KiB, less
//!    what `min_align_mask` takes (`swiotlb_max_mapping_size`).
//! 3. Alignment: the bounce address keeps the original's bits under `min_align_mask`;
//!    without masks a mapping of a page or more is page aligned; no mapping crosses a
//!    128-slot segment or the device's segment boundary (`swiotlb_search_pool_area`).
//! 4. A map for `FromDevice` still copies the original in, so no earlier user's bytes
//!    show through (`swiotlb_tbl_map_single`).
//! 5. Syncs copy by direction, only the window asked for, never past the allocation
//!    (`__swiotlb_sync_single_for_device`, `__swiotlb_sync_single_for_cpu`,
//!    `swiotlb_bounce`).
//! 6. Unmap copies back for `FromDevice` and `Bidirectional` unless the sync is skipped
//!    (`__swiotlb_tbl_unmap_single`).
//! 7. A full pool fails the map at once, never waits, and reports size, total and used
//!    slots; freed slots merge with free neighbours (`swiotlb_release_slots`).
//! 8. Coherent allocations come from the pool, aligned to their order, and count as
//!    used slots (`swiotlb_alloc`).
//! 9. The device reaches the pool and nothing else of the guest: the pool is the only
//!    memory shared with the host (pKVM's `ARM_SMCCC_KVM_FUNC_MEM_SHARE`, Linux
//!    `Documentation/virt/kvm/arm/hypercalls.rst`).
//! 10. CPUs mapping at once never get the same slot.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use bounce_pool::*;
use std::sync::Arc;
use test_kit::pattern;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

type Mem = GuestMemoryMmap<()>;

const RAM: usize = 16 << 20;
/// The pool: 1 MiB (4 segments) at 8 MiB.
const POOL: u64 = 0x80_0000;
const POOL_SIZE: u64 = 1 << 20;
/// Original buffers.
const BUF: u64 = 0x10_0000;

fn ram() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
}

fn pool_with(mem: &Mem, size: u64, areas: usize) -> BouncePool {
    BouncePool::new(
        mem,
        &PoolConfig {
            base: Gpa(POOL),
            size,
            areas,
        },
    )
    .unwrap()
}

fn setup() -> (Mem, BouncePool) {
    let mem = ram();
    let pool = pool_with(&mem, POOL_SIZE, 1);
    (mem, pool)
}

fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn write(mem: &Mem, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}

const TO: DmaDirection = DmaDirection::ToDevice;
const FROM: DmaDirection = DmaDirection::FromDevice;
const BIDI: DmaDirection = DmaDirection::Bidirectional;

fn nodev() -> DeviceDma {
    DeviceDma::default()
}

// Item 1: pools from the device tree.

const MIB: u64 = 1 << 20;

fn dt_ram() -> [std::ops::Range<u64>; 1] {
    #[allow(clippy::single_range_in_vec_init)] // one RAM range, not a list of numbers
    [0..RAM as u64]
}

fn restricted_node(phandle: u32) -> ReservedMemoryNode {
    ReservedMemoryNode::restricted(Gpa(POOL), POOL_SIZE, phandle)
}

#[test]
fn dt_pool_from_reg_is_built_at_reg_with_one_area() {
    let cfg = restricted_node(1).pool_config(&dt_ram()).unwrap();
    assert_eq!(
        cfg,
        PoolConfig {
            base: Gpa(POOL),
            size: POOL_SIZE,
            areas: 1
        }
    );
    let pool = BouncePool::new(&ram(), &cfg).unwrap();
    assert_eq!(pool.range(), POOL..POOL + POOL_SIZE);
    // A reg outside RAM, or not page-aligned, builds nothing.
    let mut n = restricted_node(1);
    n.reg = Some((RAM as u64 - MIB / 2, MIB));
    assert!(matches!(
        n.pool_config(&dt_ram()),
        Err(DtError::NotInRam { .. })
    ));
    n.reg = Some((POOL + 0x800, MIB));
    assert!(matches!(
        n.pool_config(&dt_ram()),
        Err(DtError::BadReg { .. })
    ));
}

#[test]
fn dt_pool_from_size_and_alignment_is_placed_top_down_aligned_in_alloc_ranges() {
    let node = |size, alignment, alloc_ranges| ReservedMemoryNode {
        name: "restricted-dma-pool".into(),
        compatible: vec!["restricted-dma-pool".into()],
        size: Some(size),
        alignment,
        alloc_ranges,
        ..Default::default()
    };
    // Anywhere in RAM: the top of it.
    let c = node(MIB, Some(0x1000), vec![])
        .pool_config(&dt_ram())
        .unwrap();
    assert_eq!((c.base, c.size, c.areas), (Gpa(RAM as u64 - MIB), MIB, 1));
    // Inside an alloc-range ending off alignment: the highest 4 MiB-aligned base.
    let c = node(MIB, Some(4 * MIB), vec![(MIB, 10 * MIB - 0x1000)])
        .pool_config(&dt_ram())
        .unwrap();
    assert_eq!(c.base, Gpa(8 * MIB));
    // Ranges are cut to RAM; a size off whole segments keeps whole segments.
    let c = node(MIB + 0x1000, None, vec![(12 * MIB, 64 * MIB)])
        .pool_config(&dt_ram())
        .unwrap();
    assert_eq!((c.base.0 % PAGE_SIZE, c.size), (0, MIB));
    assert!(c.base.0 + MIB + 0x1000 <= RAM as u64);
    // No room, bad alignment.
    assert!(matches!(
        node(2 * MIB, None, vec![(0, MIB)]).pool_config(&dt_ram()),
        Err(DtError::NoRoom { .. })
    ));
    assert!(matches!(
        node(MIB, Some(0x3000), vec![]).pool_config(&dt_ram()),
        Err(DtError::BadAlignment { .. })
    ));
}

#[test]
fn dt_node_with_no_map_reusable_cma_default_or_dma_default_is_rejected() {
    type Set = fn(&mut ReservedMemoryNode);
    let cases: [(&str, Set); 4] = [
        ("no-map", |n| n.no_map = true),
        ("reusable", |n| n.reusable = true),
        ("linux,cma-default", |n| n.linux_cma_default = true),
        ("linux,dma-default", |n| n.linux_dma_default = true),
    ];
    for (prop, set) in cases {
        let mut n = restricted_node(1);
        set(&mut n);
        let e = n.pool_config(&dt_ram()).unwrap_err();
        assert_eq!(
            e,
            DtError::Forbidden {
                node: n.name.clone(),
                property: prop
            }
        );
        assert!(e.to_string().contains(prop), "{e}");
    }
    let mut other = restricted_node(1);
    other.compatible = vec!["shared-dma-pool".into()];
    assert!(matches!(
        other.pool_config(&dt_ram()),
        Err(DtError::NotRestricted { .. })
    ));
}

#[test]
fn dt_second_restricted_pool_on_one_device_is_ignored() {
    let mut cma = restricted_node(1);
    cma.compatible = vec!["shared-dma-pool".into()];
    let mut off = restricted_node(2);
    off.status = Some("disabled".into());
    let first = restricted_node(3);
    let second = ReservedMemoryNode::restricted(Gpa(POOL + POOL_SIZE), POOL_SIZE, 4);
    let nodes = [cma, off, first.clone(), second];
    let dev = dt::DeviceNode {
        memory_region: vec![1, 2, 3, 4],
        behind_iommu: false,
    };
    // Not the shared pool, not the disabled one, the first restricted one; the
    // fourth is ignored.
    assert_eq!(dt::restricted_pool_for(&dev, None, &nodes), Some(&first));
    // With no memory-region of its own, the device takes its DMA parent's.
    let bare = dt::DeviceNode::default();
    let bridge = dt::DeviceNode {
        memory_region: vec![4],
        behind_iommu: false,
    };
    assert_eq!(
        dt::restricted_pool_for(&bare, Some(&bridge), &nodes).map(|n| n.phandle),
        Some(4)
    );
    assert_eq!(dt::restricted_pool_for(&bare, None, &nodes), None);
}

#[test]
fn dt_device_behind_an_iommu_ignores_the_pool() {
    let nodes = [restricted_node(7)];
    let dev = dt::DeviceNode {
        memory_region: vec![7],
        behind_iommu: true,
    };
    assert_eq!(dt::restricted_pool_for(&dev, None, &nodes), None);
}

#[test]
fn dt_emitted_node_is_the_binding_form_and_builds_the_same_pool() {
    let n = ReservedMemoryNode::restricted(Gpa(0x1_4000_0000), 64 * MIB, 0x8001);
    assert_eq!(
        dt::reserved_memory_dts(std::slice::from_ref(&n)),
        "reserved-memory {\n\
         \t#address-cells = <0x2>;\n\
         \t#size-cells = <0x2>;\n\
         \tranges;\n\
         \n\
         \trestricted_dma_reserved: restricted-dma-pool@140000000 {\n\
         \t\tcompatible = \"restricted-dma-pool\";\n\
         \t\treg = <0x1 0x40000000 0x0 0x4000000>;\n\
         \t\tphandle = <0x8001>;\n\
         \t};\n\
         };\n"
    );
    assert_eq!(
        dt::memory_region_property(dt::POOL_LABEL),
        "memory-region = <&restricted_dma_reserved>;"
    );
    // What we emit is what a guest accepts, at the same place.
    let ram = [0..0x2_0000_0000u64, 0x3_0000_0000..0x3_1000_0000];
    let cfg = n.pool_config(&ram).unwrap();
    assert_eq!((cfg.base, cfg.size), (Gpa(0x1_4000_0000), 64 * MIB));
}

// Item 2: geometry.

#[test]
fn geometry_is_2k_slots_128_slot_segments_and_256k_max_mapping() {
    assert_eq!((IO_TLB_SHIFT, IO_TLB_SIZE, IO_TLB_SEGSIZE), (11, 2048, 128));
    assert_eq!(MAX_MAPPING_SIZE, 256 << 10);
    let (mem, pool) = setup();
    assert_eq!(pool.stats().total_slots, 512);
    let a = pool
        .map(&mem, &nodev(), Gpa(BUF), MAX_MAPPING_SIZE, TO)
        .unwrap();
    assert_eq!(
        pool.slots_of(a).unwrap().end.0 - pool.slots_of(a).unwrap().start.0,
        128
    );
    assert_eq!(pool.stats().used_slots, 128);
}

#[test]
fn map_of_256k_plus_1_fails_as_too_large() {
    let (mem, pool) = setup();
    let e = pool
        .map(&mem, &nodev(), Gpa(BUF), MAX_MAPPING_SIZE + 1, TO)
        .unwrap_err();
    assert!(
        matches!(e, PoolError::Slots(SlotError::TooLarge { .. })),
        "{e}"
    );
    assert_eq!(pool.stats().used_slots, 0);
    assert_eq!(pool.stats().failed_maps, 1);
}

#[test]
fn min_align_mask_0xfff_makes_max_mapping_252k_which_maps_at_any_offset() {
    let dev = DeviceDma::new(0xfff, u64::MAX).unwrap();
    assert_eq!(dev.max_mapping_size(), 252 << 10);
    assert_eq!(nodev().max_mapping_size(), 256 << 10);
    let (mem, pool) = setup();
    for off in [0, 0x7ff, 0x800, 0xfff] {
        let a = pool
            .map(&mem, &dev, Gpa(BUF + off), dev.max_mapping_size(), BIDI)
            .unwrap();
        assert_eq!(a.0 & 0xfff, off);
        pool.unmap(&mem, a, dev.max_mapping_size(), BIDI, Attrs::NONE)
            .unwrap();
    }
}

// Item 3: alignment and boundaries.

#[test]
fn bounce_address_preserves_orig_bits_under_min_align_mask() {
    let (mem, pool) = setup();
    let dev = DeviceDma::new(0xfff, u64::MAX).unwrap();
    for (i, off) in [0x0u64, 0x1, 0x200, 0x7ff, 0x800, 0x801, 0xc00, 0xfff]
        .into_iter()
        .enumerate()
    {
        let orig = BUF + 0x10_0000 * (i as u64 % 3) + off;
        let a = pool.map(&mem, &dev, Gpa(orig), 3000, TO).unwrap();
        assert_eq!(
            a.0 & 0xfff,
            orig & 0xfff,
            "orig {orig:#x} bounce {:#x}",
            a.0
        );
    }
}

#[test]
fn mapping_of_a_page_or_more_without_masks_is_page_aligned() {
    let (mem, pool) = setup();
    // Knock the cursor off page alignment first.
    pool.map(&mem, &nodev(), Gpa(BUF), 100, TO).unwrap();
    for size in [4096, 4097, 12288, 65536] {
        let a = pool
            .map(&mem, &nodev(), Gpa(BUF + 0x123), size, TO)
            .unwrap();
        assert_eq!(a.0 % PAGE_SIZE, 0, "size {size}");
    }
}

#[test]
fn mapping_below_a_page_is_only_slot_aligned() {
    let (mem, pool) = setup();
    let a = pool.map(&mem, &nodev(), Gpa(BUF + 0x123), 100, TO).unwrap();
    let b = pool.map(&mem, &nodev(), Gpa(BUF + 0x123), 100, TO).unwrap();
    assert_eq!(a.0 % IO_TLB_SIZE, 0);
    assert_eq!(b.0, a.0 + IO_TLB_SIZE, "next slot, not next page");
}

#[test]
fn min_align_mask_replaces_page_alignment_with_offset_preservation() {
    // Linux: page alignment only when neither mask is set.
    let (mem, pool) = setup();
    let dev = DeviceDma::new(0x7ff, u64::MAX).unwrap();
    let a = pool.map(&mem, &dev, Gpa(BUF + 0x10), 4096, TO).unwrap();
    let b = pool.map(&mem, &dev, Gpa(BUF + 0x10), 4096, TO).unwrap();
    assert_eq!((a.0 & 0x7ff, b.0 & 0x7ff), (0x10, 0x10));
    assert_eq!(b.0 - a.0, 3 * IO_TLB_SIZE, "4096 + 0x10 bytes take 3 slots");
}

#[test]
fn alloc_align_mask_pads_with_slots_and_unmap_frees_the_padding() {
    let (mem, pool) = setup();
    let dev = DeviceDma::new(0x3fff, u64::MAX).unwrap();
    // dma-iommu style: alloc_align_mask = granule - 1 (16 KiB); offset 0x2a00 keeps
    // five padding slots before the data.
    let a = pool
        .map_aligned(&mem, &dev, Gpa(BUF + 0x2a00), 1000, TO, 0x3fff)
        .unwrap();
    assert_eq!(a.0 & 0x3fff, 0x2a00);
    let slots = pool.slots_of(a).unwrap();
    assert_eq!(pool.slots().slot_addr(slots.start) & 0x3fff, 0);
    assert_eq!(
        slots.end.0 - slots.start.0,
        8,
        "ALIGN(1000 + 0x2a00, 16 KiB)"
    );
    assert_eq!(pool.stats().used_slots, 8);
    pool.unmap(&mem, a, 1000, TO, Attrs::NONE).unwrap();
    assert_eq!(pool.stats().used_slots, 0);
    assert!(pool.slots().free_map().iter().all(|&f| f));
}

#[test]
fn no_mapping_crosses_a_128_slot_segment() {
    let (mem, pool) = setup();
    // 100 slots, then 60-slot requests cannot fit in the remaining 28 of segment 0.
    pool.map(&mem, &nodev(), Gpa(BUF), 100 * 2048, TO).unwrap();
    for _ in 0..5 {
        let Ok(a) = pool.map(&mem, &nodev(), Gpa(BUF), 60 * 2048, TO) else {
            break;
        };
        let s = pool.slots_of(a).unwrap();
        assert_eq!(s.start.0 / 128, (s.end.0 - 1) / 128, "{s:?}");
    }
}

#[test]
fn no_mapping_crosses_the_device_segment_boundary() {
    let (mem, pool) = setup();
    // A 64 KiB device boundary: 32-slot windows.
    let dev = DeviceDma::new(0, 0xffff).unwrap();
    // 20-slot mappings: one per window, 16 windows in the pool.
    for _ in 0..16 {
        let a = pool.map(&mem, &dev, Gpa(BUF), 20 * 2048, TO).unwrap();
        let end = a.0 + 20 * 2048 - 1;
        assert_eq!(a.0 & !0xffff, end & !0xffff, "{:#x}..{end:#x}", a.0);
    }
}

// Item 4: a map copies the original in.

#[test]
fn map_from_device_copies_the_original_in_so_no_stale_data_leaks() {
    let mem = ram();
    let pool = pool_with(&mem, SEGMENT_BYTES, 1);
    // A previous user's data passes through the pool.
    let secret = pattern(4096, 0x5e);
    write(&mem, BUF, &secret);
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 4096, TO).unwrap();
    assert_eq!(read(&mem, a.0, 4096), secret);
    pool.unmap(&mem, a, 4096, TO, Attrs::NONE).unwrap();
    // A FROM_DEVICE buffer as large as the pool must cover the same slots.
    let mine = pattern(MAX_MAPPING_SIZE, 0x11);
    write(&mem, BUF + 0x10_0000, &mine);
    let b = pool
        .map(&mem, &nodev(), Gpa(BUF + 0x10_0000), MAX_MAPPING_SIZE, FROM)
        .unwrap();
    assert_eq!(b.0, POOL);
    assert!(
        read(&mem, b.0, MAX_MAPPING_SIZE) == mine,
        "the device sees no stale bytes"
    );
    // A device writing only the first 100 bytes leaves the rest of the original intact.
    write(&mem, b.0, &[0xdd; 100]);
    pool.unmap(&mem, b, MAX_MAPPING_SIZE, FROM, Attrs::NONE)
        .unwrap();
    let back = read(&mem, BUF + 0x10_0000, MAX_MAPPING_SIZE);
    assert_eq!(&back[..100], &[0xdd; 100]);
    assert!(back[100..] == mine[100..], "unwritten bytes not clobbered");
}

// Item 5: syncs.

#[test]
fn sync_for_device_copies_only_for_to_device_and_bidirectional() {
    for (dir, copies) in [(TO, true), (BIDI, true), (FROM, false)] {
        let (mem, pool) = setup();
        write(&mem, BUF, &[1; 512]);
        let a = pool.map(&mem, &nodev(), Gpa(BUF), 512, dir).unwrap();
        write(&mem, BUF, &[2; 512]);
        pool.sync_for_device(&mem, a, 512, dir).unwrap();
        let want = if copies { [2; 512] } else { [1; 512] };
        assert_eq!(read(&mem, a.0, 512), want, "{dir:?}");
    }
}

#[test]
fn sync_for_cpu_copies_only_for_from_device_and_bidirectional() {
    for (dir, copies) in [(FROM, true), (BIDI, true), (TO, false)] {
        let (mem, pool) = setup();
        write(&mem, BUF, &[1; 512]);
        let a = pool.map(&mem, &nodev(), Gpa(BUF), 512, dir).unwrap();
        write(&mem, a.0, &[3; 512]);
        pool.sync_for_cpu(&mem, a, 512, dir).unwrap();
        let want = if copies { [3; 512] } else { [1; 512] };
        assert_eq!(read(&mem, BUF, 512), want, "{dir:?}");
    }
}

#[test]
fn partial_sync_at_an_interior_address_copies_only_that_window() {
    let (mem, pool) = setup();
    let dev = DeviceDma::new(0xfff, u64::MAX).unwrap();
    let orig = BUF + 0x345;
    write(&mem, orig, &pattern(20000, 1));
    let a = pool.map(&mem, &dev, Gpa(orig), 20000, BIDI).unwrap();
    // The device fills the whole bounce buffer; the CPU syncs 3000 bytes at +5000
    // (crossing a slot boundary, in the third slot).
    write(&mem, a.0, &[0xaa; 20000]);
    pool.sync_for_cpu(&mem, DmaAddr(a.0 + 5000), 3000, BIDI)
        .unwrap();
    let back = read(&mem, orig, 20000);
    let p = pattern(20000, 1);
    assert_eq!(&back[..5000], &p[..5000]);
    assert_eq!(&back[5000..8000], &[0xaa; 3000][..]);
    assert_eq!(&back[8000..], &p[8000..]);
    // And towards the device: only the window is refreshed.
    write(&mem, orig, &[0x77; 20000]);
    pool.sync_for_device(&mem, DmaAddr(a.0 + 10000), 10, BIDI)
        .unwrap();
    let dev_view = read(&mem, a.0, 20000);
    assert_eq!(&dev_view[10000..10010], &[0x77; 10]);
    assert_eq!(dev_view[9999], 0xaa);
    assert_eq!(dev_view[10010], 0xaa);
}

#[test]
fn sync_beyond_the_allocation_is_truncated_and_counted() {
    let (mem, pool) = setup();
    write(&mem, BUF, &[5; 4096]);
    write(&mem, BUF + 4096, &[6; 4096]);
    // 3000 bytes with no masks: an allocation of ALIGN(3000, 1) = 3000 bytes (in two
    // slots); Linux cuts syncs at the allocation, not at the slot end.
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 3000, BIDI).unwrap();
    write(&mem, a.0, &[9; 4096]);
    pool.sync_for_cpu(&mem, DmaAddr(a.0 + 1000), 8000, BIDI)
        .unwrap();
    assert_eq!(pool.stats().overflows, 1);
    let back = read(&mem, BUF, 8192);
    assert!(back[..1000].iter().all(|&b| b == 5));
    assert!(
        back[1000..3000].iter().all(|&b| b == 9),
        "the window, cut at the end"
    );
    assert!(back[3000..4096].iter().all(|&b| b == 5), "nothing past it");
    assert!(back[4096..].iter().all(|&b| b == 6));
}

#[test]
fn sync_or_unmap_of_an_address_nothing_maps_is_refused() {
    let (mem, pool) = setup();
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 3000, BIDI).unwrap();
    let free = DmaAddr(POOL + 0x8_0000);
    assert!(matches!(
        pool.sync_for_cpu(&mem, free, 10, BIDI),
        Err(PoolError::NotMapped { .. })
    ));
    assert!(matches!(
        pool.unmap(&mem, DmaAddr(a.0 + 1), 3000, BIDI, Attrs::NONE),
        Err(PoolError::NotMapped { .. })
    ));
    pool.unmap(&mem, a, 3000, BIDI, Attrs::NONE).unwrap();
    assert!(
        matches!(
            pool.unmap(&mem, a, 3000, BIDI, Attrs::NONE),
            Err(PoolError::NotMapped { .. })
        ),
        "no double unmap"
    );
    assert_eq!(pool.stats().used_slots, 0);
}

// Item 6: unmap.

#[test]
fn unmap_copies_back_for_from_device_and_bidirectional_only() {
    for (dir, copies) in [(FROM, true), (BIDI, true), (TO, false)] {
        let (mem, pool) = setup();
        write(&mem, BUF, &[1; 700]);
        let a = pool.map(&mem, &nodev(), Gpa(BUF), 700, dir).unwrap();
        write(&mem, a.0, &[4; 700]);
        pool.unmap(&mem, a, 700, dir, Attrs::NONE).unwrap();
        let want = if copies { [4; 700] } else { [1; 700] };
        assert_eq!(read(&mem, BUF, 700), want, "{dir:?}");
    }
}

#[test]
fn unmap_with_skip_cpu_sync_does_not_copy_back() {
    let (mem, pool) = setup();
    write(&mem, BUF, &[1; 700]);
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 700, FROM).unwrap();
    write(&mem, a.0, &[4; 700]);
    pool.unmap(&mem, a, 700, FROM, Attrs::SKIP_CPU_SYNC)
        .unwrap();
    assert_eq!(read(&mem, BUF, 700), [1; 700]);
    assert_eq!(pool.stats().used_slots, 0);
}

// Item 7: exhaustion, merging.

#[test]
fn full_pool_fails_at_once_with_size_total_and_used_slots() {
    let mem = ram();
    let pool = pool_with(&mem, SEGMENT_BYTES, 1);
    let mut v = Vec::new();
    for i in 0..127u64 {
        v.push(pool.map(&mem, &nodev(), Gpa(BUF + i), 2048, TO).unwrap());
    }
    let e = pool.map(&mem, &nodev(), Gpa(BUF), 4096, TO).unwrap_err();
    assert_eq!(
        e.to_string(),
        "bounce pool is full (size: 4096 bytes), total 128 (slots), used 127 (slots)"
    );
    let s = pool.stats();
    assert_eq!(
        (s.used_slots, s.failed_maps, s.high_water_slots),
        (127, 1, 127)
    );
    // The last slot still serves a small mapping.
    pool.map(&mem, &nodev(), Gpa(BUF), 2048, TO).unwrap();
}

#[test]
fn freed_slots_merge_so_a_large_map_fits_after_fragmentation() {
    let mem = ram();
    let pool = pool_with(&mem, SEGMENT_BYTES, 1);
    let v: Vec<_> = (0..128)
        .map(|_| pool.map(&mem, &nodev(), Gpa(BUF), 2048, TO).unwrap())
        .collect();
    // Free every other slot: 64 free slots, none adjacent.
    for a in v.iter().step_by(2) {
        pool.unmap(&mem, *a, 2048, TO, Attrs::NONE).unwrap();
    }
    assert!(pool.map(&mem, &nodev(), Gpa(BUF), 4096, TO).is_err());
    // Free the rest in a scattered order: everything merges back into one run.
    for a in v.iter().skip(1).step_by(2).rev() {
        pool.unmap(&mem, *a, 2048, TO, Attrs::NONE).unwrap();
    }
    let big = pool
        .map(&mem, &nodev(), Gpa(BUF), MAX_MAPPING_SIZE, TO)
        .unwrap();
    assert_eq!(big.0, POOL);
}

// Item 8: coherent allocations.

#[test]
fn coherent_alloc_is_order_aligned_zeroed_and_counted_in_used_slots() {
    let (mem, pool) = setup();
    // Dirty the pool and leave the cursor off alignment.
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 100, TO).unwrap();
    write(&mem, POOL, &[0xcc; POOL_SIZE as usize]);
    for (size, align) in [(100, 4096), (4096, 4096), (5000, 8192), (40000, 65536)] {
        let c = pool.alloc_coherent(&mem, size).unwrap();
        assert_eq!(c.0 % align, 0, "size {size}");
        assert_eq!(read(&mem, c.0, size), vec![0; size]);
    }
    // 100 B = 1 slot, 4096 = 2, 5000 = 3, 40000 = 20, plus the streaming slot.
    assert_eq!(pool.stats().used_slots, 1 + 1 + 2 + 3 + 20);
    let c = pool.alloc_coherent(&mem, 4096).unwrap();
    assert!(
        pool.unmap(&mem, c, 4096, TO, Attrs::NONE).is_err(),
        "not streaming"
    );
    assert!(pool.free_coherent(a).is_err(), "not coherent");
    pool.free_coherent(c).unwrap();
    assert_eq!(pool.stats().used_slots, 27);
    assert!(pool.alloc_coherent(&mem, MAX_MAPPING_SIZE + 1).is_err());
}

// Item 9: the device reaches only the pool.

#[test]
fn device_reaches_the_pool_and_is_denied_everything_else() {
    let (mem, pool) = setup();
    let iommu = PoolIommu::for_pool(&pool).unwrap();
    let dev_mem = IommuMemory::new(mem.clone(), iommu, true, ());
    write(&mem, BUF, &pattern(512, 3));
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 512, BIDI).unwrap();
    // The device reads the bounce buffer and writes into it.
    let mut seen = [0u8; 512];
    dev_mem.read_slice(&mut seen, GuestAddress(a.0)).unwrap();
    assert_eq!(seen[..], pattern(512, 3)[..]);
    dev_mem.write_slice(&[8; 512], GuestAddress(a.0)).unwrap();
    // But not the original buffer, nor anything across the pool's edges.
    assert!(dev_mem.read_slice(&mut seen, GuestAddress(BUF)).is_err());
    assert!(dev_mem.write_slice(&[0; 512], GuestAddress(BUF)).is_err());
    assert!(dev_mem
        .read_slice(&mut seen, GuestAddress(POOL - 256))
        .is_err());
    assert!(dev_mem
        .read_slice(&mut seen, GuestAddress(POOL + POOL_SIZE - 256))
        .is_err());
    assert_eq!(dev_mem.iommu().faults(), 4);
    assert_eq!(read(&mem, BUF, 512), pattern(512, 3), "original untouched");
    pool.unmap(&mem, a, 512, BIDI, Attrs::NONE).unwrap();
    assert_eq!(read(&mem, BUF, 512), [8; 512]);
}

// Inputs.

#[test]
fn original_overlapping_the_pool_or_outside_ram_is_refused() {
    let (mem, pool) = setup();
    for (orig, len) in [
        (POOL, 16),
        (POOL - 8, 16),
        (POOL + POOL_SIZE - 1, 2),
        (RAM as u64 - 8, 16),
        (u64::MAX - 4, 16),
    ] {
        assert!(
            pool.map(&mem, &nodev(), Gpa(orig), len, TO).is_err(),
            "{orig:#x}+{len}"
        );
    }
    assert!(pool.map(&mem, &nodev(), Gpa(BUF), 0, TO).is_err());
    assert!(pool
        .map_aligned(&mem, &nodev(), Gpa(BUF), 16, TO, 0x1000)
        .is_err());
    assert_eq!(pool.stats().used_slots, 0);
}

#[test]
fn pool_config_is_validated() {
    let mem = ram();
    let mk = |base, size, areas| {
        BouncePool::new(
            &mem,
            &PoolConfig {
                base: Gpa(base),
                size,
                areas,
            },
        )
    };
    assert!(matches!(
        mk(POOL + 1, POOL_SIZE, 1),
        Err(PoolError::Unaligned { .. })
    ));
    assert!(matches!(
        mk(POOL, 4096, 1),
        Err(PoolError::NotSegments { .. })
    ));
    assert!(matches!(mk(POOL, 0, 1), Err(PoolError::NotSegments { .. })));
    assert!(matches!(
        mk(RAM as u64 - 0x1000, SEGMENT_BYTES, 1),
        Err(PoolError::PoolNotInMemory { .. })
    ));
    assert!(matches!(
        mk(POOL, POOL_SIZE, 3),
        Err(PoolError::Slots(SlotError::BadAreas { .. }))
    ));
    assert_eq!(mk(POOL, POOL_SIZE, 4).unwrap().slots().areas(), 4);
}

#[test]
fn high_water_mark_survives_frees_and_resets_to_current_use() {
    let (mem, pool) = setup();
    let a = pool.map(&mem, &nodev(), Gpa(BUF), 8192, TO).unwrap();
    let b = pool.map(&mem, &nodev(), Gpa(BUF), 2048, TO).unwrap();
    pool.unmap(&mem, a, 8192, TO, Attrs::NONE).unwrap();
    assert_eq!(
        (pool.stats().used_slots, pool.stats().high_water_slots),
        (1, 5)
    );
    pool.reset_high_water();
    assert_eq!(pool.stats().high_water_slots, 1);
    pool.unmap(&mem, b, 2048, TO, Attrs::NONE).unwrap();
}

#[test]
fn guest_dma_catches_driver_unmap_bugs() {
    let mem = ram();
    let pool = Arc::new(pool_with(&mem, POOL_SIZE, 1));
    let dma = GuestDma::new(mem.clone(), pool.clone(), nodev());
    let a = dma.map(Gpa(BUF), 100, FROM).unwrap();
    assert!(matches!(
        dma.unmap(a, 200, FROM),
        Err(DmaError::Mismatch { .. })
    ));
    assert!(matches!(
        dma.unmap(a, 100, TO),
        Err(DmaError::Mismatch { .. })
    ));
    assert!(matches!(
        dma.unmap(DmaAddr(a.0 + 2048), 100, FROM),
        Err(DmaError::NotMapped { .. })
    ));
    dma.unmap(a, 100, FROM).unwrap();
    assert!(matches!(
        dma.unmap(a, 100, FROM),
        Err(DmaError::NotMapped { .. })
    ));
    assert_eq!(pool.stats().used_slots, 0);
}
