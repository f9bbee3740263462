//! A hostile backend, through every door it has — `map_grant_ref`, `GNTTABOP_copy`
//! and the grant address space a device sees (in every [`IommuMode`]) — reaches for an
//! ungranted page, writes a read-only grant, uses a revoked ref, and uses another
//! domain's grant. It is refused every time with Xen's status, and the guest's data
//! never changes.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use grant_table::abi::{GNTMAP_HOST_MAP, GNTMAP_READONLY};
use grant_table::xen::{CopyPtr, GrantCopy, MapGrantRef};
use grant_table::{Caller, Gfn, GrantDmaAddr, GrantIommu, GrantRef, GrantStatus as St, IommuMode};
use vm_memory::{Bytes, GuestAddress, IommuMemory};

struct Targets {
    ungranted: GrantRef,
    readonly: GrantRef,
    revoked: GrantRef,
    others: GrantRef,
    beyond: GrantRef,
}

fn setup(w: &World) -> Targets {
    for i in 0..5 {
        w.grants
            .memory()
            .write_slice(&pattern(4096, i as u8), GuestAddress(gpa(page(i))))
            .unwrap();
    }
    let g = &w.grants;
    let ungranted = g.alloc_refs(1).unwrap(); // allocated, never written
    let readonly = g.grant_foreign_access(BACKEND, page(1), true).unwrap();
    let revoked = g.grant_foreign_access(BACKEND, page(2), false).unwrap();
    assert!(g.end_foreign_access_ref(revoked));
    let others = g.grant_foreign_access(OTHER, page(3), false).unwrap();
    Targets {
        ungranted,
        readonly,
        revoked,
        others,
        beyond: GrantRef(1 << 24),
    }
}

fn untouched(w: &World) {
    for i in 0..5 {
        assert!(
            read_guest(w, gpa(page(i)), 4096) == pattern(4096, i as u8),
            "guest page {i} changed"
        );
    }
}

#[test]
fn hostile_backend_maps_and_copies_are_refused_with_xen_status_and_guest_data_untouched() {
    for version in [1, 2] {
        let w = world(version);
        let t = setup(&w);
        let c = Caller::new(BACKEND);
        let rw = GNTMAP_HOST_MAP;
        let ro = GNTMAP_HOST_MAP | GNTMAP_READONLY;
        let cases = [
            (t.ungranted, rw, St::GeneralError),
            (t.ungranted, ro, St::GeneralError),
            (t.readonly, rw, St::GeneralError),
            (t.revoked, rw, St::GeneralError),
            (t.revoked, ro, St::GeneralError),
            (t.others, rw, St::GeneralError),
            (t.others, ro, St::GeneralError),
            (t.beyond, ro, St::BadGntref),
        ];
        for round in 0..3 {
            let mut ops: Vec<MapGrantRef> = cases
                .iter()
                .map(|&(r, f, _)| MapGrantRef::new(GUEST, r, f, 1))
                .collect();
            w.xen.map_grant_ref(c, &mut ops);
            for (op, &(r, f, want)) in ops.iter().zip(cases.iter()) {
                assert_eq!(
                    op.status, want,
                    "v{version} round {round}: map {r:?} flags {f:#x}"
                );
            }
            let local = CopyPtr::local(Gfn(0x10), 0);
            for (r, want) in [
                (t.ungranted, St::GeneralError),
                (t.readonly, St::GeneralError),
                (t.revoked, St::GeneralError),
                (t.others, St::GeneralError),
                (t.beyond, St::BadGntref),
            ] {
                let mut into = [GrantCopy::new(
                    local,
                    false,
                    CopyPtr::gref(GUEST, r, 0),
                    true,
                    4096,
                )];
                w.xen.copy(c, &mut into);
                assert_eq!(into[0].status, want, "v{version}: copy into {r:?}");
                if r != t.readonly {
                    let mut from = [GrantCopy::new(
                        CopyPtr::gref(GUEST, r, 0),
                        true,
                        local,
                        false,
                        64,
                    )];
                    w.xen.copy(c, &mut from);
                    assert_eq!(from[0].status, want, "v{version}: copy from {r:?}");
                }
            }
            // Copy between two of the guest's grants as a third party: same refusals.
            let mut third = [GrantCopy::new(
                CopyPtr::gref(GUEST, t.others, 0),
                true,
                CopyPtr::gref(GUEST, t.readonly, 0),
                true,
                16,
            )];
            w.xen.copy(c, &mut third);
            assert_eq!(third[0].status, St::GeneralError);
            untouched(&w);
        }
        assert_eq!(w.xen.maptrack_in_use(BACKEND), 0);
        for r in [t.ungranted, t.readonly, t.revoked, t.others] {
            assert_eq!(w.xen.active_pin(GUEST, r), Some(0), "nothing left pinned");
        }
    }
}

#[test]
fn hostile_backend_through_the_grant_address_space_faults_in_every_mode() {
    for mode in [
        IommuMode::PerIo,
        IommuMode::Persistent { max: 16 },
        IommuMode::Copy {
            scratch: Gfn(SCRATCH_GFN),
            frames: SCRATCH_FRAMES,
        },
    ] {
        let w = world(1);
        let t = setup(&w);
        let iommu = GrantIommu::new(w.xen.clone(), BACKEND, GUEST, mode).unwrap();
        let dm = IommuMemory::new(iommu.device_memory().unwrap(), iommu, true, ());
        let evil = vec![0x66u8; 4096];
        for round in 0..3 {
            for (what, r) in [
                ("ungranted", t.ungranted),
                ("read-only", t.readonly),
                ("revoked", t.revoked),
                ("other domain's", t.others),
                ("out-of-range", t.beyond),
            ] {
                let a = GuestAddress(GrantDmaAddr::new(r, 0).0);
                let faults = dm.iommu().stats().faults;
                assert!(
                    dm.write_slice(&evil, a).is_err(),
                    "{mode:?} {round}: write {what}"
                );
                assert!(dm.iommu().stats().faults > faults);
                dm.iommu().complete();
                if r != t.readonly {
                    let mut buf = vec![0u8; 64];
                    assert!(dm.read_slice(&mut buf, a).is_err(), "{mode:?}: read {what}");
                    assert_eq!(buf, vec![0u8; 64], "nothing leaked into the backend");
                }
            }
            // A guest-physical address (bit 63 clear) and a wrapping range.
            assert!(dm.write_slice(&evil, GuestAddress(gpa(page(0)))).is_err());
            assert!(dm.write_slice(&evil[..2], GuestAddress(u64::MAX)).is_err());
            assert_eq!(dm.iommu().last_fault().map(|f| f.1), Some(St::BadGntref));
            dm.iommu().complete();
            untouched(&w);
        }
        // The read-only grant is readable, and reads what the guest wrote.
        let mut buf = vec![0u8; 4096];
        dm.read_slice(&mut buf, GuestAddress(GrantDmaAddr::new(t.readonly, 0).0))
            .unwrap();
        assert!(buf == pattern(4096, 1), "{mode:?}");
        dm.iommu().complete();
        dm.iommu().release();
        assert_eq!(w.xen.maptrack_in_use(BACKEND), 0);
    }
}
