//! Fuzz targets `host_tables`, `host_tables_ivrs` and `host_tables_iort`: the host-table
//! parsers of `mem-layout` and the planner behind them.
//!
//! `host_tables` ([`run`]): the first byte picks the input: an ACPI table (bytes; DMAR,
//! or IVRS / IORT when the bytes carry that signature) or a `reserved_regions` file
//! (text). `host_tables_ivrs` ([`run_ivrs`]) and `host_tables_iort` ([`run_iort`]) feed
//! every input to one parser, so each gets its own time. A table mostly gets its
//! checksum fixed first (byte 9), so the fuzzer gets past it. Whatever they are,
//! nothing panics; what parses feeds the region database and the q35 planner, whose
//! plan must keep every RAM byte asked for and put no RAM on a region it kept; every
//! region the database takes from a table is page aligned; a `reserved_regions` file
//! that parses formats back to text that parses to the same regions.
use mem_layout::dmar::{self, NoBridges};
use mem_layout::layout::{Action, E820Kind};
use mem_layout::reserved_regions;
use mem_layout::{iort, ivrs};
use mem_layout::{plan, Bdf, LayoutConfig, RdmDatabase, Strategy};
use std::collections::BTreeSet;

/// Which parser a table goes to.
#[derive(Clone, Copy)]
enum Table {
    Dmar,
    Ivrs,
    Iort,
}

/// `rest` with its checksum (byte 9) made right unless the selector's top bit says
/// to leave it.
fn fixed(selector: u8, rest: &[u8]) -> Vec<u8> {
    let mut bytes = rest.to_vec();
    if selector & 0x80 == 0 && bytes.len() > 9 {
        bytes[9] = 0;
        let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        bytes[9] = sum.wrapping_neg();
    }
    bytes
}

/// Parses `bytes` as `table` into `db`; false when it does not parse or is refused.
fn add_table(db: &mut RdmDatabase, table: Table, bytes: &[u8]) -> bool {
    match table {
        Table::Dmar => dmar::parse(bytes)
            .ok()
            .is_some_and(|t| db.add_dmar(&t, &NoBridges, None).is_ok()),
        Table::Ivrs => ivrs::parse(bytes).ok().is_some_and(|t| {
            // Every IVMD lies inside the table.
            assert!(t
                .ivmds
                .iter()
                .all(|m| m.offset + ivrs::IVMD_LEN <= bytes.len()));
            db.add_ivrs(&t).is_ok()
        }),
        Table::Iort => iort::parse(bytes).ok().is_some_and(|t| {
            // Every node lies inside the table and every reference leads to one.
            assert!(t.nodes.iter().all(|n| n.offset < bytes.len()));
            assert!(t
                .nodes
                .iter()
                .flat_map(|n| &n.mappings)
                .all(|m| t.node_at(m.output_reference).is_some()));
            db.add_iort(&t).is_ok()
        }),
    }
}

/// The body of `host_tables`: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut db = RdmDatabase::new();
    if selector & 1 == 0 {
        let table = match rest.get(..4) {
            Some(b"IVRS") => Table::Ivrs,
            Some(b"IORT") => Table::Iort,
            _ => Table::Dmar,
        };
        if !add_table(&mut db, table, &fixed(selector, rest)) {
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
    check_plan(selector, &db);
}

/// The body of `host_tables_ivrs`: every input is an IVRS table after the selector.
pub fn run_ivrs(data: &[u8]) {
    run_one(Table::Ivrs, data);
}

/// The body of `host_tables_iort`: every input is an IORT table after the selector.
pub fn run_iort(data: &[u8]) {
    run_one(Table::Iort, data);
}

fn run_one(table: Table, data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut db = RdmDatabase::new();
    if !add_table(&mut db, table, &fixed(selector, rest)) {
        return;
    }
    for r in db.regions() {
        assert!(r.range.is_page_aligned(), "{} from {}", r.range, r.source);
    }
    check_plan(selector, &db);
}

/// Plans around `db` (host strategy, and the first device of the first region assigned
/// relaxed) and checks the plan's contracts.
fn check_plan(selector: u8, db: &RdmDatabase) {
    // RAM sizes around q35's split points, from the selector.
    let ram = [512u64 << 20, 2560 << 20, 3 << 30, 8 << 30][usize::from(selector >> 1) & 3];
    let mut cfg = LayoutConfig::new(ram);
    cfg.strategy = Strategy::Host;
    if selector & 0x40 != 0 {
        if let Some(d) = db.regions().iter().find_map(|r| r.devices.first()) {
            cfg.assigned.push((*d, Some(mem_layout::Policy::Relaxed)));
        }
    }
    let Ok(layout) = plan(&cfg, db) else {
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
