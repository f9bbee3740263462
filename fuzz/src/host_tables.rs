//! Fuzz target `host_tables`: the host-table parsers of `mem-layout` and the planner behind them.
//! The first byte picks the input: a DMAR table (bytes) or a `reserved_regions` file
//! (text; a DMAR mostly gets its checksum fixed first). Whatever they are, nothing panics; what parses feeds the region database
//! and the q35 planner, whose plan must keep every RAM byte asked for and put no RAM
//! on a region it kept; a `reserved_regions` file that parses formats back to text
//! that parses to the same regions.
use mem_layout::dmar::{self, NoBridges};
use mem_layout::layout::{Action, E820Kind};
use mem_layout::reserved_regions;
use mem_layout::{plan, Bdf, LayoutConfig, RdmDatabase, Strategy};
use std::collections::BTreeSet;

/// The target's body: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut db = RdmDatabase::new();
    if selector & 1 == 0 {
        // Mostly with a correct checksum (byte 9), so the fuzzer gets past it.
        let mut bytes = rest.to_vec();
        if selector & 0x80 == 0 && bytes.len() > 9 {
            bytes[9] = 0;
            let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
            bytes[9] = sum.wrapping_neg();
        }
        let Ok(table) = dmar::parse(&bytes) else {
            return;
        };
        if db.add_dmar(&table, &NoBridges, None).is_err() {
            return;
        }
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let Ok(regions) = reserved_regions::parse(text) else {
            return;
        };
        let again = reserved_regions::parse(&reserved_regions::format(&regions));
        assert_eq!(
            again.as_ref().ok(),
            Some(&regions),
            "format does not round-trip"
        );
        let Ok(dev) = Bdf::new(0, 0, 0x14, 0) else {
            return;
        };
        if db
            .add_reserved_regions(&regions, &BTreeSet::from([dev]), "fuzz")
            .is_err()
        {
            return;
        }
    }
    // RAM sizes around q35's split points, from the selector.
    let ram = [512u64 << 20, 2560 << 20, 3 << 30, 8 << 30][usize::from(selector >> 1) & 3];
    let mut cfg = LayoutConfig::new(ram);
    cfg.strategy = Strategy::Host;
    let Ok(layout) = plan(&cfg, &db) else {
        return;
    };
    assert_eq!(layout.e820_ram(), u128::from(ram), "RAM lost");
    for r in layout
        .regions
        .iter()
        .filter(|r| r.action != Action::Dropped)
    {
        for e in layout.e820.iter().filter(|e| e.kind == E820Kind::Ram) {
            assert!(
                !e.range.overlaps(&r.range),
                "RAM {} on kept {}",
                e.range,
                r.range
            );
        }
    }
}
