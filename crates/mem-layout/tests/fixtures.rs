//! The real host tables (`fixtures/*.hexdump`, each naming its public source in its
//! first line and in `fixtures/README.md`: DMAR from fwts and ACPICA, IVRS from four
//! laptops in linuxhw/ACPI, IORT from a Radxa Orion O6 and an Acer Spin 7) through the
//! whole crate: decoded from their hex dumps as `fixtures/decode-hexdump.py` does,
//! compared with the committed `.bin` files, parsed, and planned around.

use mem_layout::dmar::{self, NoBridges, ScopeKind};
use mem_layout::layout::{Action, E820Kind};
use mem_layout::{plan, Bdf, LayoutConfig, MemRange, Policy, RdmDatabase, Strategy};

const THINKPAD_DUMP: &str = include_str!("../fixtures/thinkpad-snb-dmar.hexdump");
const THINKPAD_BIN: &[u8] = include_bytes!("../fixtures/thinkpad-snb-dmar.bin");
const ACPICA_DUMP: &str = include_str!("../fixtures/acpica-template-dmar.hexdump");
const ACPICA_BIN: &[u8] = include_bytes!("../fixtures/acpica-template-dmar.bin");

/// Every other real table: (hex dump, committed bytes).
const TABLES: [(&str, &[u8]); 6] = [
    (
        include_str!("../fixtures/asus-zenbook-s16-ivrs.hexdump"),
        include_bytes!("../fixtures/asus-zenbook-s16-ivrs.bin"),
    ),
    (
        include_str!("../fixtures/mechrevo-wujie14-ivrs.hexdump"),
        include_bytes!("../fixtures/mechrevo-wujie14-ivrs.bin"),
    ),
    (
        include_str!("../fixtures/thinkpad-t14g3-ivrs.hexdump"),
        include_bytes!("../fixtures/thinkpad-t14g3-ivrs.bin"),
    ),
    (
        include_str!("../fixtures/hp-envy-x360-13-ivrs.hexdump"),
        include_bytes!("../fixtures/hp-envy-x360-13-ivrs.bin"),
    ),
    (
        include_str!("../fixtures/cix-sky1-orion-o6-iort.hexdump"),
        include_bytes!("../fixtures/cix-sky1-orion-o6-iort.bin"),
    ),
    (
        include_str!("../fixtures/acer-spin7-iort.hexdump"),
        include_bytes!("../fixtures/acer-spin7-iort.bin"),
    ),
];
const ASUS_IVRS: &[u8] = TABLES[0].1;
const MECHREVO_IVRS: &[u8] = TABLES[1].1;
const T14_IVRS: &[u8] = TABLES[2].1;
const HP_IVRS: &[u8] = TABLES[3].1;
const CIX_IORT: &[u8] = TABLES[4].1;
const ACER_IORT: &[u8] = TABLES[5].1;

/// The decoder of `decode-hexdump.py`, again: "  OFFS: hh hh …  ascii" lines.
fn decode(dump: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in dump.lines() {
        let Some((offset, rest)) = line.trim_start().split_once(": ") else {
            continue;
        };
        let Ok(offset) = usize::from_str_radix(offset, 16) else {
            continue;
        };
        assert_eq!(offset, out.len(), "offsets are contiguous");
        let hex = rest.split("  ").next().expect("split yields one piece");
        out.extend(
            hex.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex byte")),
        );
    }
    out
}

fn bdf(s: &str) -> Bdf {
    s.parse().expect("valid bdf")
}

#[test]
fn fixtures_decode_to_the_committed_bytes() {
    assert_eq!(decode(THINKPAD_DUMP), THINKPAD_BIN);
    assert_eq!(decode(ACPICA_DUMP), ACPICA_BIN);
    for (dump, bin) in TABLES {
        assert_eq!(decode(dump), bin, "{}", dump.lines().next().unwrap_or(""));
        let sum = bin.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        assert_eq!(sum, 0, "checksum of {}", dump.lines().next().unwrap_or(""));
    }
}

#[test]
fn parse_every_dmar_fixture_with_checksum_zero() {
    for table in [THINKPAD_BIN, ACPICA_BIN] {
        let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        assert_eq!(sum, 0);
        dmar::parse(table).expect("real tables parse");
    }
}

#[test]
fn thinkpad_rmrr_at_0x68_yields_three_endpoint_scopes_and_lengths_are_consistent() {
    let d = dmar::parse(THINKPAD_BIN).expect("parses");
    assert_eq!(d.header.length, 184);
    assert_eq!(&d.header.oem_table_id[..4], b"SNB ");
    assert_eq!(d.address_bits(), 36); // HAW 35
    assert_eq!(d.flags, 1);
    // Two DRHDs: IGD-only at 0x30, INCLUDE_PCI_ALL with IOAPIC and HPET at 0x48.
    assert_eq!(d.drhds.len(), 2);
    assert_eq!(
        (d.drhds[0].offset, d.drhds[0].register_base),
        (0x30, 0xfed9_0000)
    );
    assert!(!d.drhds[0].include_pci_all());
    assert_eq!(
        d.drhds[0].scopes[0].bdf(0, &NoBridges),
        Some(bdf("00:02.0"))
    );
    assert!(d.drhds[1].include_pci_all());
    assert_eq!(d.drhds[1].scopes[0].kind, ScopeKind::IoApic);
    assert_eq!(d.drhds[1].scopes[0].enumeration_id, 2);
    assert_eq!(d.drhds[1].scopes[0].start_bus, 0xf0);
    assert_eq!(d.drhds[1].scopes[1].kind, ScopeKind::Hpet);
    // RMRR @0x68: the USB region, shared by three controllers.
    let usb = &d.rmrrs[0];
    assert_eq!(
        (usb.offset, usb.base, usb.limit),
        (0x68, 0xda2f_0000, 0xda30_6fff)
    );
    let devs: Vec<_> = usb.scopes.iter().map(|s| s.bdf(0, &NoBridges)).collect();
    assert_eq!(
        devs,
        vec![
            Some(bdf("00:1d.0")),
            Some(bdf("00:1a.0")),
            Some(bdf("00:14.0"))
        ]
    );
    assert!(usb.scopes.iter().all(|s| s.kind == ScopeKind::PciEndpoint));
    // RMRR @0x98: the IGD's stolen memory.
    let igd = &d.rmrrs[1];
    assert_eq!(
        (igd.offset, igd.base, igd.limit),
        (0x98, 0xdb80_0000, 0xdf9f_ffff)
    );
    assert_eq!(igd.scopes[0].bdf(0, &NoBridges), Some(bdf("00:02.0")));
    // Structure lengths add up to the table: 48 + 24 + 32 + 48 + 32.
    assert_eq!(48 + 24 + 32 + 48 + 32, THINKPAD_BIN.len());
    assert!(d.others.is_empty());
}

#[test]
fn acpica_template_parses_with_its_rmrr_and_other_structures() {
    let d = dmar::parse(ACPICA_BIN).expect("parses");
    assert_eq!(d.drhds.len(), 1);
    assert_eq!(d.rmrrs.len(), 1);
    assert_eq!((d.rmrrs[0].base, d.rmrrs[0].limit), (0, 0xfff));
    assert_eq!(d.rmrrs[0].scopes[0].kind, ScopeKind::PciEndpoint);
    assert_eq!(
        d.rmrrs[0].scopes[0].bdf(0, &NoBridges),
        Some(bdf("00:00.2"))
    );
    // ATSR (2) and RHSA (3) are kept as "other".
    let kinds: Vec<u16> = d.others.iter().map(|o| o.0).collect();
    assert_eq!(kinds, vec![2, 3]);
}

fn thinkpad_db() -> RdmDatabase {
    let d = dmar::parse(THINKPAD_BIN).expect("parses");
    let mut db = RdmDatabase::new();
    db.add_dmar(&d, &NoBridges, None).expect("sane table");
    db
}

#[test]
fn thinkpad_plan_keeps_both_rmrrs_reserved_and_all_ram() {
    let db = thinkpad_db();
    assert!(db.warnings().is_empty(), "{:?}", db.warnings());
    let mut cfg = LayoutConfig::new(8 << 30);
    cfg.assigned.push((bdf("00:02.0"), None));
    cfg.assigned.push((bdf("00:14.0"), Some(Policy::Relaxed)));
    let l = plan(&cfg, &db).expect("both RMRRs are in the 32-bit hole");
    assert_eq!(l.low_ram_end, 0x8000_0000);
    assert_eq!(l.e820_ram(), 8 << 30);
    assert!(l.regions.iter().all(|r| r.action == Action::Identity));
    let reserved: Vec<MemRange> = l
        .e820
        .iter()
        .filter(|e| e.kind == E820Kind::Reserved)
        .map(|e| e.range)
        .collect();
    assert_eq!(reserved.len(), 2);
    // BARs land in the hole but never on either RMRR.
    // 64 MiB BARs: 13 fit in the 32-bit hole around the two RMRRs (0xd8000000 and
    // 0xdc000000 are skipped), the 14th does not.
    let mut a = l.mmio_allocator();
    for _ in 0..13 {
        let bar = a.allocate(64 << 20, false).expect("room");
        assert!(reserved.iter().all(|r| !r.overlaps(&bar)), "{bar}");
    }
    assert!(a.allocate(64 << 20, false).is_err());
    assert!(
        a.allocate(64 << 20, true).is_ok(),
        "64-bit BARs go above RAM"
    );
}

#[test]
fn thinkpad_host_strategy_needs_no_move_because_q35_already_splits_at_2g() {
    // A 3.5 GiB guest asking for 3.5 GiB below 4 GiB would cover both RMRRs, but q35
    // caps low RAM at 2 GiB from 2.75 GiB of RAM on (max-ram-below-4g only lowers).
    let db = thinkpad_db();
    let mut cfg = LayoutConfig::new(0xE000_0000);
    cfg.max_ram_below_4g = Some(0xE000_0000);
    cfg.strategy = Strategy::Host;
    let l = plan(&cfg, &db).expect("relaxed host regions");
    // q35 caps low RAM at 2 GiB for a guest this size, so nothing had to move.
    assert_eq!(l.low_ram_end, 0x8000_0000);
    assert_eq!(l.e820_ram(), 0xE000_0000);
}

#[test]
fn thinkpad_shared_usb_rmrr_strict_single_assignment_is_refused_naming_every_sharer() {
    let db = thinkpad_db();
    let mut cfg = LayoutConfig::new(8 << 30);
    cfg.assigned.push((bdf("00:14.0"), Some(Policy::Strict)));
    match plan(&cfg, &db) {
        Err(mem_layout::LayoutError::StrictConflict(r)) => {
            let msg = &r.conflicts[0].message;
            for want in [
                "00:14.0",
                "00:1a.0",
                "00:1d.0",
                "[0xda2f0000-0xda306fff]",
                "DMAR RMRR @0x68",
            ] {
                assert!(msg.contains(want), "{msg} lacks {want}");
            }
        }
        other => panic!("expected a strict shared-region refusal, got {other:?}"),
    }
}

#[test]
fn thinkpad_shared_usb_rmrr_group_assignment_plans_and_relaxed_warns() {
    let db = thinkpad_db();
    let mut cfg = LayoutConfig::new(8 << 30);
    for d in ["00:14.0", "00:1a.0", "00:1d.0"] {
        cfg.assigned.push((bdf(d), Some(Policy::Strict)));
    }
    let l = plan(&cfg, &db).expect("the whole group together");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(l.regions[0].action, Action::Identity);
    assert_eq!(l.regions[0].source, "DMAR RMRR @0x68");
    let mut cfg = LayoutConfig::new(8 << 30);
    cfg.assigned.push((bdf("00:1a.0"), Some(Policy::Relaxed)));
    let l = plan(&cfg, &db).expect("relaxed assigns anyway");
    assert_eq!(l.warnings.len(), 1);
    assert!(l.warnings[0].contains("risky"), "{:?}", l.warnings);
    assert!(
        l.warnings[0].contains("00:14.0, 00:1d.0"),
        "{:?}",
        l.warnings
    );
}

fn ivrs_db(table: &[u8]) -> RdmDatabase {
    let t = mem_layout::ivrs::parse(table).expect("real tables parse");
    let mut db = RdmDatabase::new();
    db.add_ivrs(&t).expect("sane table");
    db
}

fn iort_db(table: &[u8]) -> RdmDatabase {
    let t = mem_layout::iort::parse(table).expect("real tables parse");
    let mut db = RdmDatabase::new();
    db.add_iort(&t).expect("sane table");
    db
}

/// The plan keeps every direct region of the assigned devices reserved in the e820,
/// puts no RAM on one, and loses no RAM.
fn assert_honoured(l: &mem_layout::Layout, ram: u64, assigned: &[Bdf]) {
    assert_eq!(l.e820_ram(), u128::from(ram), "no RAM lost");
    let kept: Vec<MemRange> = l
        .e820
        .iter()
        .filter(|e| e.kind == E820Kind::Reserved)
        .map(|e| e.range)
        .collect();
    for d in assigned {
        let mine: Vec<_> = l.reserved_for(*d);
        assert!(!mine.is_empty(), "{d} has a region");
        for r in mine {
            assert!(kept.contains(&r.range), "{} reserved in the e820", r.range);
            for e in l.e820.iter().filter(|e| e.kind == E820Kind::Ram) {
                assert!(
                    !e.range.overlaps(&r.range),
                    "RAM {} on {}",
                    e.range,
                    r.range
                );
            }
        }
    }
}

#[test]
fn asus_zenbook_ivrs_has_a_unity_map_and_an_exclusion_range_for_one_device_each() {
    let t = mem_layout::ivrs::parse(ASUS_IVRS).expect("parses");
    assert_eq!(t.ivhds.len(), 3, "IVHD types 0x10, 0x11, 0x40");
    assert_eq!(t.ivmds.len(), 2);
    let db = ivrs_db(ASUS_IVRS);
    assert!(db.warnings().is_empty(), "{:?}", db.warnings());
    let r: Vec<_> = db
        .regions()
        .iter()
        .map(|r| {
            (
                r.range.start(),
                r.range.end(),
                r.devices.clone(),
                r.source.as_str(),
            )
        })
        .collect();
    assert_eq!(
        r,
        vec![
            (
                0x75e0_0000,
                0x75e1_ffff,
                [bdf("c4:00.7")].into(),
                "IVRS IVMD @0xe8"
            ),
            (
                0x7d90_0000,
                0x7d9f_ffff,
                [bdf("00:0c.0")].into(),
                "IVRS IVMD @0xc8"
            ),
        ]
    );
    // Both sit below 2 GiB: with the boundary at 1 GiB, low RAM ends below them.
    let mut cfg = LayoutConfig::new(8 << 30);
    cfg.rdm_mem_boundary = 1 << 30;
    cfg.assigned.push((bdf("c4:00.7"), None));
    cfg.assigned.push((bdf("00:0c.0"), None));
    let l = plan(&cfg, &db).expect("strict plans");
    assert_eq!(l.low_ram_end, 0x75e0_0000);
    assert_honoured(&l, 8 << 30, &[bdf("c4:00.7"), bdf("00:0c.0")]);
    // At the default 2 GiB boundary strict cannot keep them free: refused.
    cfg.rdm_mem_boundary = mem_layout::layout::RDM_MEM_BOUNDARY_DEFAULT;
    assert!(matches!(
        plan(&cfg, &db),
        Err(mem_layout::LayoutError::StrictConflict(_))
    ));
}

#[test]
fn mechrevo_ivrs_range_ivmds_cover_buses_0_to_f_and_page_align_one_byte_lengths() {
    let db = ivrs_db(MECHREVO_IVRS);
    assert_eq!(db.regions().len(), 5);
    for r in db.regions() {
        assert_eq!(r.range.size(), 4096, "length 1 rounds up to a page");
        assert_eq!(r.devices.len(), 0x1000, "device IDs 0x0000-0x0fff");
    }
    // 2.5 GiB stays below 4 GiB on q35, so the IVMDs above 2 GiB lower low RAM.
    // One of 4096 sharers alone is refused under strict, allowed relaxed with a warning.
    let mut cfg = LayoutConfig::new(2560 << 20);
    cfg.assigned.push((bdf("01:00.0"), None));
    assert!(plan(&cfg, &db).is_err());
    cfg.assigned[0].1 = Some(Policy::Relaxed);
    let l = plan(&cfg, &db).expect("relaxed");
    assert_eq!(l.warnings.len(), 5, "one risky warning per region");
    assert_eq!(
        l.low_ram_end, 0x9600_0000,
        "below the first IVMD, 2 MiB aligned"
    );
    assert_honoured(&l, 2560 << 20, &[bdf("01:00.0")]);
}

#[test]
fn thinkpad_t14_ivrs_skips_its_unknown_type_0x51_block() {
    let t = mem_layout::ivrs::parse(T14_IVRS).expect("parses");
    assert_eq!(t.ivmds.len(), 1);
    assert_eq!(t.others.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0x51]);
    let db = ivrs_db(T14_IVRS);
    assert_eq!(db.regions()[0].devices, [bdf("03:00.0")].into());
    assert_eq!(db.regions()[0].range.size(), 0x26000);
}

#[test]
fn hp_envy_ivrs_without_ivmd_gives_no_region() {
    let t = mem_layout::ivrs::parse(HP_IVRS).expect("parses");
    assert!(t.ivmds.is_empty());
    assert!(!t.ivhds.is_empty());
    assert!(ivrs_db(HP_IVRS).regions().is_empty());
}

#[test]
fn cix_sky1_iort_rmr_is_the_display_framebuffer_of_five_named_components() {
    let t = mem_layout::iort::parse(CIX_IORT).expect("parses");
    assert_eq!(t.header.revision, 5);
    assert_eq!(t.nodes.len(), 19);
    let db = iort_db(CIX_IORT);
    assert!(db.warnings().is_empty(), "{:?}", db.warnings());
    let r = &db.regions()[0];
    assert_eq!(
        r.range,
        MemRange::new(0x8480_0000, 0x84ff_ffff).expect("ok")
    );
    assert_eq!(
        r.kind,
        mem_layout::RegionKind::DirectRelaxable,
        "remapping permitted"
    );
    assert!(r.devices.is_empty());
    let names: Vec<&str> = r.components.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        vec![
            "\\_SB_.DPU0",
            "\\_SB_.DPU1",
            "\\_SB_.DPU2",
            "\\_SB_.DPU3",
            "\\_SB_.DPU4"
        ]
    );
    assert_eq!(r.source, "IORT RMR @0x9e0");
    // Kept free of RAM with the host strategy.
    let mut cfg = LayoutConfig::new(4 << 30);
    cfg.strategy = Strategy::Host;
    let l = plan(&cfg, &db).expect("plans");
    assert_eq!(l.regions[0].action, Action::Reserved);
    assert!(l
        .e820
        .iter()
        .any(|e| e.kind == E820Kind::Reserved && e.range == r.range));
    assert_eq!(l.e820_ram(), 4 << 30);
}

#[test]
fn acer_spin7_iort_of_revision_0_without_rmr_gives_no_region() {
    let t = mem_layout::iort::parse(ACER_IORT).expect("parses");
    assert_eq!(t.header.revision, 0);
    assert!(t
        .nodes
        .iter()
        .all(|n| !matches!(n.kind, mem_layout::iort::NodeKind::Rmr { .. })));
    let db = iort_db(ACER_IORT);
    assert!(db.regions().is_empty());
    assert!(db.warnings().is_empty());
}

#[test]
fn one_database_holds_dmar_ivrs_and_iort_regions_each_naming_its_table() {
    let mut db = thinkpad_db();
    db.add_ivrs(&mem_layout::ivrs::parse(MECHREVO_IVRS).expect("parses"))
        .expect("no overlap");
    db.add_iort(&mem_layout::iort::parse(CIX_IORT).expect("parses"))
        .expect("no overlap");
    let tables: std::collections::BTreeSet<&str> =
        db.regions().iter().map(|r| &r.source[..4]).collect();
    assert_eq!(tables, ["DMAR", "IORT", "IVRS"].into());
}
