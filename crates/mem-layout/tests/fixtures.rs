//! The real DMAR tables (`fixtures/*.hexdump`, each naming its public source: fwts
//! `fwts-test/wmi-0001/acpidump-0001.log`, ACPICA `source/compiler/dttemplate.h`)
//! through the whole crate: decoded from their hex dumps as `fixtures/decode-hexdump.py`
//! does, compared with the committed `.bin` files, parsed, and planned around.

use mem_layout::dmar::{self, NoBridges, ScopeKind};
use mem_layout::layout::{Action, E820Kind};
use mem_layout::{plan, Bdf, LayoutConfig, MemRange, Policy, RdmDatabase, Strategy};

const THINKPAD_DUMP: &str = include_str!("../fixtures/thinkpad-snb-dmar.hexdump");
const THINKPAD_BIN: &[u8] = include_bytes!("../fixtures/thinkpad-snb-dmar.bin");
const ACPICA_DUMP: &str = include_str!("../fixtures/acpica-template-dmar.hexdump");
const ACPICA_BIN: &[u8] = include_bytes!("../fixtures/acpica-template-dmar.bin");

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
