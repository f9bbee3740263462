//! Property tests of the planner against the simplest possible model of its promises:
//! RAM never lands on a kept reserved region, BARs never land on any reserved region or
//! on RAM, and the e820 holds exactly the RAM asked for — or the plan fails with a
//! reason (a strict conflict naming its region, or a size the guest cannot address).

use mem_layout::layout::{Action, E820Kind, LayoutError};
use mem_layout::reserved_regions::ResvRegion;
use mem_layout::Strategy as RdmStrategy;
use mem_layout::{plan, Bdf, LayoutConfig, MemRange, Policy, RdmDatabase, RegionKind};
use proptest::prelude::*;
use std::collections::BTreeSet;

const PAGE: u64 = 4096;

/// Up to 6 page-aligned regions below 16 GiB, some shared, made non-overlapping by
/// skipping any that overlap an earlier one.
fn regions() -> impl Strategy<Value = Vec<(u64, u64, u8, u8)>> {
    proptest::collection::vec((0u64..(16 << 18), 1u64..4096, 0u8..4, 0u8..4), 0..6)
}

fn build(raw: &[(u64, u64, u8, u8)]) -> RdmDatabase {
    let mut db = RdmDatabase::new();
    for (i, (page, pages, kind, dev)) in raw.iter().enumerate() {
        let Ok(range) = MemRange::from_len(page * PAGE, pages * PAGE) else {
            continue;
        };
        let kind = match kind {
            0 => RegionKind::Direct,
            1 => RegionKind::DirectRelaxable,
            2 => RegionKind::Reserved,
            _ => RegionKind::Direct,
        };
        let devs: BTreeSet<Bdf> = [Bdf::new(0, 0, 0x10 + dev, 0).expect("valid")].into();
        // Overlapping inputs are rejected by the database; skip them.
        let _ = db.add_reserved_regions(&[ResvRegion { range, kind }], &devs, &format!("r{i}"));
    }
    db
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn layout_never_places_ram_or_mmio_on_a_reserved_region_and_never_loses_ram(
        ram_pages in 1u64..(24 << 18),
        raw in regions(),
        host in any::<bool>(),
        global in proptest::option::of(any::<bool>()),
        assign in proptest::collection::vec((0u8..4, proptest::option::of(any::<bool>())), 0..3),
        cap in proptest::option::of(1u64..(1 << 20)),
        bars in proptest::collection::vec((12u32..31, any::<bool>()), 0..12),
    ) {
        let db = build(&raw);
        let pol = |b: bool| if b { Policy::Strict } else { Policy::Relaxed };
        let mut cfg = LayoutConfig::new(ram_pages * PAGE);
        cfg.strategy = if host { RdmStrategy::Host } else { RdmStrategy::Ignore };
        cfg.policy = global.map(pol);
        cfg.max_ram_below_4g = cap.map(|p| p * PAGE);
        for (d, p) in &assign {
            cfg.assigned.push((Bdf::new(0, 0, 0x10 + d, 0).expect("valid"), p.map(pol)));
        }
        match plan(&cfg, &db) {
            Ok(l) => {
                // Never loses RAM.
                prop_assert_eq!(l.e820_ram(), u128::from(cfg.ram_size));
                let ram: Vec<MemRange> = l.e820.iter()
                    .filter(|e| e.kind == E820Kind::Ram).map(|e| e.range).collect();
                // e820 sorted and non-overlapping.
                for w in l.e820.windows(2) {
                    prop_assert!(w[0].range.end() < w[1].range.start());
                }
                // RAM never on a kept region.
                for r in l.regions.iter().filter(|r| r.action != Action::Dropped) {
                    prop_assert!(ram.iter().all(|m| !m.overlaps(&r.range)), "{} under RAM", r.range);
                }
                // Every dropped region has a relaxed conflict saying why.
                for r in l.regions.iter().filter(|r| r.action == Action::Dropped) {
                    prop_assert!(l.conflicts.iter().any(|c| c.range == r.range && c.policy == Policy::Relaxed));
                }
                // BARs never on any region (kept or dropped) or RAM, nor on each other.
                let mut a = l.mmio_allocator();
                for (order, bar64) in bars {
                    if let Ok(bar) = a.allocate(1u64 << order, bar64) {
                        prop_assert!(l.regions.iter().all(|r| !r.range.overlaps(&bar)), "BAR {} on a region", bar);
                        prop_assert!(ram.iter().all(|m| !m.overlaps(&bar)), "BAR {} on RAM", bar);
                    }
                }
                let all = a.allocated().to_vec();
                for (i, x) in all.iter().enumerate() {
                    for y in &all[i + 1..] {
                        prop_assert!(!x.overlaps(y));
                    }
                }
            }
            Err(LayoutError::StrictConflict(rej)) => {
                // Fails with a reason: a strict conflict that names its range.
                let strict: Vec<_> = rej.conflicts.iter().filter(|c| c.policy == Policy::Strict).collect();
                prop_assert!(!strict.is_empty());
                for c in strict {
                    prop_assert!(c.message.contains(&c.range.to_string()));
                }
            }
            Err(LayoutError::RamTooLarge { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
