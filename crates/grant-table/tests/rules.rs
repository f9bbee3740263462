//! The grant-table acceptance tests, one or more per rule, named after it (r1…r12):
//! rules drawn from Xen (`xen/include/public/grant_table.h`, `xen/common/grant_table.c`
//! `map_grant_ref`, `gnttab_copy`, `gnttab_release_mappings`) and from Linux
//! (`drivers/xen/grant-table.c`, `drivers/xen/grant-dma-ops.c`), plus the table sizing
//! rules (Xen `opt_max_grant_frames`, `opt_max_maptrack_frames`).

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use grant_table::abi::*;
use grant_table::xen::{CopyPtr, GrantCopy, MapGrantRef, QuerySize, SetupTable, UnmapGrantRef};
use grant_table::{
    Caller, DmaDirection, DmaError, DomainConfig, EndAccess, Gfn, Gpa, GrantDma, GrantDmaAddr,
    GrantRef, GrantStatus as St,
};
use std::sync::atomic::Ordering;
use vm_memory::{Bytes, GuestAddress};

fn map1(w: &World, caller: Caller, gref: GrantRef, flags: u32) -> MapGrantRef {
    let mut op = [MapGrantRef::new(GUEST, gref, flags, 0x1000)];
    w.xen.map_grant_ref(caller, &mut op);
    op[0]
}

fn unmap1(w: &World, caller: Caller, h: grant_table::GrantHandle) -> St {
    let mut op = [UnmapGrantRef::new(h, 0x1000, 0)];
    w.xen.unmap_grant_ref(caller, &mut op);
    op[0].status
}

const HOST: u32 = GNTMAP_HOST_MAP;
const HOST_RO: u32 = GNTMAP_HOST_MAP | GNTMAP_READONLY;

#[test]
fn r1_publish_order_a_backend_seeing_valid_flags_sees_the_matching_domid_and_frame() {
    for version in [1, 2] {
        let w = world(version);
        let n = 400u32;
        let first = w.grants.alloc_refs(n).unwrap();
        std::thread::scope(|s| {
            let g = &w.grants;
            s.spawn(move || {
                for i in 0..n {
                    g.grant_foreign_access_ref(
                        GrantRef(first.0 + i),
                        BACKEND,
                        page(u64::from(i)),
                        true,
                    )
                    .unwrap();
                }
            });
            // The backend maps each entry as soon as its flags say so; Xen reads the
            // frame after the flags, so it must be the frame the guest wrote before them.
            let c = Caller::new(BACKEND);
            let mut i = 0;
            while i < n {
                let op = map1(&w, c, GrantRef(first.0 + i), HOST_RO);
                if op.status == St::Okay {
                    assert_eq!(
                        op.dev_bus_addr,
                        gpa(page(u64::from(i))),
                        "v{version} ref {i}"
                    );
                    assert_eq!(unmap1(&w, c, op.handle), St::Okay);
                    i += 1;
                } else {
                    assert_eq!(op.status, St::GeneralError, "not yet valid");
                }
            }
        });
    }
}

#[test]
fn r2_map_checks_answer_xen_status_codes() {
    for version in [1, 2] {
        let w = world_with(
            version,
            DomainConfig {
                auto_translated: true,
                ..DomainConfig::default()
            },
        );
        let c = Caller::new(BACKEND);
        let g = &w.grants;
        let to_other = g.grant_foreign_access(OTHER, page(0), false).unwrap();
        assert_eq!(
            map1(&w, c, to_other, HOST).status,
            St::GeneralError,
            "wrong domid"
        );
        let ro = g.grant_foreign_access(BACKEND, page(1), true).unwrap();
        assert_eq!(
            map1(&w, c, ro, HOST).status,
            St::GeneralError,
            "RW map of r/o"
        );
        assert_eq!(map1(&w, c, ro, HOST_RO).status, St::Okay);
        assert_eq!(
            map1(&w, c, GrantRef(1 << 20), HOST_RO).status,
            St::BadGntref,
            "ref out of range"
        );
        assert_eq!(
            map1(&w, c, ro, GNTMAP_READONLY).status,
            St::BadGntref,
            "neither host nor device map"
        );
        assert_eq!(
            map1(&w, c, ro, GNTMAP_DEVICE_MAP | GNTMAP_READONLY).status,
            St::GeneralError,
            "no device mapping in an HVM domain"
        );
        let mut op = [MapGrantRef::new(grant_table::DomId(77), ro, HOST_RO, 1)];
        w.xen.map_grant_ref(c, &mut op);
        assert_eq!(op[0].status, St::BadDomain);
        // Pinned by BACKEND: OTHER may not map it even with a matching grant type.
        assert_eq!(
            map1(&w, Caller::new(OTHER), ro, HOST_RO).status,
            St::GeneralError
        );
        // accept_transfer type.
        let xfer = g.grant_foreign_access(BACKEND, page(2), false).unwrap();
        g.with_flags(xfer, |f| f.store(GTF_ACCEPT_TRANSFER, Ordering::SeqCst))
            .unwrap();
        assert_eq!(
            map1(&w, c, xfer, HOST).status,
            St::GeneralError,
            "accept_transfer"
        );
        // A frame that is not guest RAM.
        let bad = g
            .grant_foreign_access(BACKEND, Gfn(0xf_0000), false)
            .unwrap();
        assert_eq!(map1(&w, c, bad, HOST).status, St::BadPage);
        assert_eq!(w.xen.active_pin(GUEST, bad), Some(0));
        assert_eq!(g.in_use_bits(bad).unwrap(), 0, "status bits undone");
        if version == 2 {
            let sub = g.grant_sub_page(BACKEND, page(3), 0, 512, false).unwrap();
            assert_eq!(
                map1(&w, c, sub, HOST).status,
                St::GeneralError,
                "sub-page is copy only"
            );
            let trans = g
                .grant_transitive(BACKEND, OTHER, GrantRef(9), false)
                .unwrap();
            assert_eq!(
                map1(&w, c, trans, HOST).status,
                St::GeneralError,
                "transitive is copy only"
            );
        }
    }
    // A PV (not auto-translated) backend may ask for a device mapping.
    let w = world_with(
        1,
        DomainConfig {
            auto_translated: false,
            ..DomainConfig::default()
        },
    );
    let ro = w
        .grants
        .grant_foreign_access(BACKEND, page(1), true)
        .unwrap();
    let op = map1(
        &w,
        Caller::new(BACKEND),
        ro,
        GNTMAP_DEVICE_MAP | GNTMAP_READONLY,
    );
    assert_eq!(op.status, St::Okay);
    assert_eq!(w.xen.active_pin(GUEST, ro), Some(GNTPIN_DEVR_INC));
}

#[test]
fn r3_revoke_while_mapped_is_busy_the_entry_stays_valid_and_pinned_then_succeeds_after_unmap() {
    for version in [1, 2] {
        let w = world(version);
        let c = Caller::new(BACKEND);
        let r = w
            .grants
            .grant_foreign_access(BACKEND, page(0), false)
            .unwrap();
        let op = map1(&w, c, r, HOST);
        assert_eq!(op.status, St::Okay);
        assert_eq!(w.grants.in_use_bits(r).unwrap(), GTF_READING | GTF_WRITING);
        assert!(!w.grants.try_end_foreign_access(r), "v{version}: busy");
        assert_eq!(
            w.xen.active_pin(GUEST, r),
            Some(GNTPIN_HSTW_INC),
            "still pinned"
        );
        if version == 1 {
            let f = w
                .grants
                .with_flags(r, |f| f.load(Ordering::SeqCst))
                .unwrap();
            assert_eq!(f & GTF_TYPE_MASK, GTF_PERMIT_ACCESS, "v1 entry stays valid");
        }
        // The mapping still reaches the page.
        assert!(w.xen.mapped_frame(BACKEND, op.handle).is_some());
        assert_eq!(unmap1(&w, c, op.handle), St::Okay);
        assert_eq!(w.grants.in_use_bits(r).unwrap(), 0);
        assert!(
            w.grants.try_end_foreign_access(r),
            "v{version}: revoked after unmap"
        );
        assert_eq!(
            map1(&w, c, r, HOST).status,
            St::GeneralError,
            "revoked ref refused"
        );
    }
}

#[test]
fn r4_v2_revoke_clears_flags_fences_and_checks_status_so_a_later_map_fails() {
    let w = world(2);
    let c = Caller::new(BACKEND);
    let r = w
        .grants
        .grant_foreign_access(BACKEND, page(0), true)
        .unwrap();
    let op = map1(&w, c, r, HOST_RO);
    assert_eq!(op.status, St::Okay);
    // The map is visible in the status word before the revoke looks.
    assert!(!w.grants.end_foreign_access_ref(r));
    let flags = w
        .grants
        .with_flags(r, |f| f.load(Ordering::SeqCst))
        .unwrap();
    assert_eq!(flags, 0, "v2 revoke cleared the flags even though busy");
    // Xen checks type and domid only when an entry is first pinned: while the old
    // mapping lives, its domain may pin it again, no other domain may.
    assert_eq!(
        map1(&w, Caller::new(OTHER), r, HOST_RO).status,
        St::GeneralError
    );
    let again = map1(&w, c, r, HOST_RO);
    assert_eq!(again.status, St::Okay);
    assert_eq!(unmap1(&w, c, again.handle), St::Okay);
    assert_eq!(unmap1(&w, c, op.handle), St::Okay);
    // Once unpinned, the cleared entry cannot be mapped, and the revoke completes.
    assert_eq!(map1(&w, c, r, HOST_RO).status, St::GeneralError);
    assert!(w.grants.end_foreign_access_ref(r));
}

#[test]
fn r5_pin_counter_stops_at_128_per_category_and_never_wraps() {
    let w = world(1);
    let c = Caller::new(BACKEND);
    let r = w
        .grants
        .grant_foreign_access(BACKEND, page(0), false)
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..128 {
        let op = map1(&w, c, r, HOST_RO);
        assert_eq!(op.status, St::Okay, "map {i}");
        handles.push(op.handle);
    }
    // GNTPIN_incr2oflow_mask: the counter's top bit is set, the 129th is refused.
    assert_eq!(map1(&w, c, r, HOST_RO).status, St::GeneralError);
    assert_eq!(w.xen.active_pin(GUEST, r), Some(128 * GNTPIN_HSTR_INC));
    // Another category is counted separately.
    let rw = map1(&w, c, r, HOST);
    assert_eq!(rw.status, St::Okay);
    for h in handles {
        assert_eq!(unmap1(&w, c, h), St::Okay);
    }
    assert_eq!(unmap1(&w, c, rw.handle), St::Okay);
    assert_eq!(w.xen.active_pin(GUEST, r), Some(0));
}

#[test]
fn r6_maptrack_exhaustion_steals_other_vcpu_free_lists_then_answers_no_space() {
    let w = world_with(
        1,
        DomainConfig {
            max_maptrack_frames: 1,
            vcpus: 2,
            ..DomainConfig::default()
        },
    );
    let r = w.grants.alloc_refs(1).unwrap();
    w.grants
        .grant_foreign_access_ref(r, BACKEND, page(0), true)
        .unwrap();
    let v0 = Caller::new(BACKEND);
    let v1 = v0.on_vcpu(1);
    // vCPU 0 allocates the one maptrack frame: 256 handles, 255 left on its list.
    let mut hs = vec![map1(&w, v0, r, HOST_RO)];
    // vCPU 1's list is empty and the limit is reached: it steals vCPU 0's entries.
    // (Pins cap at 128 per category per ref, so spread over two refs.)
    let r2 = w
        .grants
        .grant_foreign_access(BACKEND, page(1), true)
        .unwrap();
    for i in 0..255 {
        let rr = if i < 127 { r } else { r2 };
        hs.push(map1(&w, v1, rr, HOST_RO));
    }
    assert!(hs.iter().all(|o| o.status == St::Okay));
    assert_eq!(
        w.xen.maptrack_in_use(BACKEND),
        256,
        "1 frame × MAPTRACK_PER_PAGE"
    );
    assert_eq!(map1(&w, v1, r2, HOST_RO).status, St::NoSpace);
    assert_eq!(map1(&w, v0, r2, HOST_RO).status, St::NoSpace);
    assert_eq!(unmap1(&w, v0, hs[5].handle), St::Okay);
    let r3 = w
        .grants
        .grant_foreign_access(BACKEND, page(2), true)
        .unwrap();
    assert_eq!(
        map1(&w, v0, r3, HOST_RO).status,
        St::Okay,
        "a freed handle is reused"
    );
    assert_eq!(map1(&w, v0, r3, HOST_RO).status, St::NoSpace);
}

fn copy1(w: &World, c: Caller, op: GrantCopy) -> St {
    let mut ops = [op];
    w.xen.copy(c, &mut ops);
    ops[0].status
}

#[test]
fn r7_copy_bounds_subpage_window_and_one_level_non_self_transitive() {
    let w = world(2);
    let c = Caller::new(BACKEND);
    let g = &w.grants;
    let data = pattern(4096, 1);
    g.memory()
        .write_slice(&data, GuestAddress(gpa(page(0))))
        .unwrap();
    let r = g.grant_foreign_access(BACKEND, page(0), true).unwrap();
    let local = Gfn(0x10);
    let to_local = |off: u16, len: u16| {
        GrantCopy::new(
            CopyPtr::gref(GUEST, r, off),
            true,
            CopyPtr::local(local, off),
            false,
            len,
        )
    };
    assert_eq!(
        copy1(&w, c, to_local(0, 4096)),
        St::Okay,
        "offset + len = 4096"
    );
    assert_eq!(copy1(&w, c, to_local(1, 4096)), St::BadCopyArg, "4097");
    let mut got = vec![0u8; 4096];
    w.xen
        .domain_memory(BACKEND)
        .unwrap()
        .read_slice(&mut got, GuestAddress(0x10_000))
        .unwrap();
    assert!(got == data);
    // Copy into a read-only grant is refused and leaves the page alone.
    let into_ro = GrantCopy::new(
        CopyPtr::local(local, 0),
        false,
        CopyPtr::gref(GUEST, r, 0),
        true,
        8,
    );
    assert_eq!(copy1(&w, c, into_ro), St::GeneralError);
    assert_eq!(read_guest(&w, gpa(page(0)), 4096), data);
    // Sub-page window [512, 1024).
    let sub = g.grant_sub_page(BACKEND, page(1), 512, 512, false).unwrap();
    let sub_copy = |off: u16, len: u16| {
        GrantCopy::new(
            CopyPtr::gref(GUEST, sub, off),
            true,
            CopyPtr::local(local, 0),
            false,
            len,
        )
    };
    assert_eq!(copy1(&w, c, sub_copy(512, 512)), St::Okay);
    assert_eq!(
        copy1(&w, c, sub_copy(511, 2)),
        St::GeneralError,
        "before the window"
    );
    assert_eq!(
        copy1(&w, c, sub_copy(1000, 25)),
        St::GeneralError,
        "past the window"
    );
    // A local frame of another domain: only DOMID_SELF may be named by frame.
    let mut other_frame = CopyPtr::local(local, 0);
    other_frame.domid = OTHER;
    let op = GrantCopy::new(CopyPtr::gref(GUEST, r, 0), true, other_frame, false, 8);
    assert_eq!(copy1(&w, c, op), St::PermissionDenied);

    // Transitive: OTHER (v1 table is enough for the original grant? use GUEST's grant)
    // GUEST grants page(2) to OTHER; OTHER cannot pass it on with a v1 table, so the
    // chain here is GUEST's own: a transitive entry of GUEST naming OTHER's grant.
    // Build OTHER's table and grant: OTHER grants its frame 0x20 to GUEST.
    let other = grant_table::GuestGrants::new(
        w.xen.clone(),
        OTHER,
        w.xen.domain_memory(OTHER).unwrap(),
        grant_table::TableSetup::v2(vec![Gfn(0x10)], vec![Gfn(0x11)]),
    )
    .unwrap();
    let odata = pattern(4096, 77);
    other
        .memory()
        .write_slice(&odata, GuestAddress(0x20_000))
        .unwrap();
    let og = other.grant_foreign_access(GUEST, Gfn(0x20), true).unwrap();
    let t = g.grant_transitive(BACKEND, OTHER, og, true).unwrap();
    let tc = |gref: GrantRef| {
        GrantCopy::new(
            CopyPtr::gref(GUEST, gref, 0),
            true,
            CopyPtr::local(local, 0),
            false,
            4096,
        )
    };
    assert_eq!(copy1(&w, c, tc(t)), St::Okay, "one level of transitivity");
    let mut got = vec![0u8; 4096];
    w.xen
        .domain_memory(BACKEND)
        .unwrap()
        .read_slice(&mut got, GuestAddress(0x10_000))
        .unwrap();
    assert!(got == odata, "data came from the original granter");
    assert_eq!(w.xen.active_pin(OTHER, og), Some(0), "nested pin released");
    // Two levels: OTHER's entry is itself transitive (to GUEST's r) → refused.
    let og2 = other.grant_transitive(GUEST, GUEST, r, true).unwrap();
    let t2 = g.grant_transitive(BACKEND, OTHER, og2, true).unwrap();
    assert_eq!(copy1(&w, c, tc(t2)), St::GeneralError, "depth 1 only");
    // Self-referential.
    let t3 = g.grant_transitive(BACKEND, GUEST, r, true).unwrap();
    assert_eq!(copy1(&w, c, tc(t3)), St::GeneralError, "self-referential");
    for x in [t, t2, t3] {
        assert_eq!(w.xen.active_pin(GUEST, x), Some(0));
        assert_eq!(g.in_use_bits(x).unwrap(), 0);
    }
}

#[test]
fn r8_a_batch_with_one_bad_op_completes_the_others_with_per_op_status() {
    let w = world(1);
    let c = Caller::new(BACKEND);
    let a = w
        .grants
        .grant_foreign_access(BACKEND, page(0), false)
        .unwrap();
    let b = w
        .grants
        .grant_foreign_access(BACKEND, page(1), true)
        .unwrap();
    let mut ops = [
        MapGrantRef::new(GUEST, a, HOST, 1),
        MapGrantRef::new(GUEST, GrantRef(9999), HOST, 2),
        MapGrantRef::new(GUEST, b, HOST, 3),
        MapGrantRef::new(GUEST, b, HOST_RO, 4),
    ];
    w.xen.map_grant_ref(c, &mut ops);
    let st: Vec<St> = ops.iter().map(|o| o.status).collect();
    assert_eq!(
        st,
        vec![St::Okay, St::BadGntref, St::GeneralError, St::Okay]
    );
    let mut un = [
        UnmapGrantRef::new(ops[0].handle, 1, 0),
        UnmapGrantRef::new(grant_table::GrantHandle(100_000), 1, 0),
        UnmapGrantRef::new(ops[3].handle, 999, 0),
        UnmapGrantRef::new(ops[3].handle, 4, 0),
    ];
    w.xen.unmap_grant_ref(c, &mut un);
    let st: Vec<St> = un.iter().map(|o| o.status).collect();
    assert_eq!(
        st,
        vec![St::Okay, St::BadHandle, St::GeneralError, St::Okay],
        "wrong host_addr refused"
    );
    let mut cp = [
        GrantCopy::new(
            CopyPtr::gref(GUEST, a, 0),
            true,
            CopyPtr::local(Gfn(0x10), 0),
            false,
            64,
        ),
        GrantCopy::new(
            CopyPtr::gref(GUEST, a, 4000),
            true,
            CopyPtr::local(Gfn(0x10), 0),
            false,
            200,
        ),
        GrantCopy::new(
            CopyPtr::gref(GUEST, b, 0),
            true,
            CopyPtr::local(Gfn(0x10), 0),
            false,
            64,
        ),
    ];
    w.xen.copy(c, &mut cp);
    let st: Vec<St> = cp.iter().map(|o| o.status).collect();
    assert_eq!(st, vec![St::Okay, St::BadCopyArg, St::Okay]);
}

#[test]
fn r9_frontend_dma_uses_bit63_consecutive_refs_ro_for_to_device_and_a_busy_unmap_breaks_and_leaks()
{
    let w = world(1);
    let dma = GrantDma::new(w.grants.clone(), BACKEND);
    let at = gpa(page(0)) + 0x234;
    let a = dma.map(Gpa(at), 3 * 4096, DmaDirection::ToDevice).unwrap();
    let (first, off) = GrantDmaAddr::decode(a.0).unwrap();
    assert_eq!(a.0, (1 << 63) | (u64::from(first.0) << 12) | 0x234);
    assert_eq!(off, 0x234);
    let c = Caller::new(BACKEND);
    // 4 pages (offset 0x234 + 12 KiB), consecutive refs, each read-only, frames in order.
    for i in 0..4u32 {
        let r = GrantRef(first.0 + i);
        assert_eq!(
            map1(&w, c, r, HOST).status,
            St::GeneralError,
            "read-only grant"
        );
        let op = map1(&w, c, r, HOST_RO);
        assert_eq!(op.status, St::Okay);
        assert_eq!(op.dev_bus_addr, gpa(page(u64::from(i))));
        if i != 2 {
            assert_eq!(unmap1(&w, c, op.handle), St::Okay);
        }
    }
    assert_eq!(
        map1(&w, c, GrantRef(first.0 + 4), HOST_RO).status,
        St::GeneralError,
        "5th ref not granted"
    );
    let b = dma
        .map(Gpa(gpa(page(8))), 100, DmaDirection::FromDevice)
        .unwrap();
    let (rb, _) = GrantDmaAddr::decode(b.0).unwrap();
    let op = map1(&w, c, rb, HOST);
    assert_eq!(op.status, St::Okay, "FromDevice is writable");
    assert_eq!(unmap1(&w, c, op.handle), St::Okay);
    dma.unmap(b, 100, DmaDirection::FromDevice).unwrap();
    // Page 2 of the first buffer is still mapped by the backend.
    let err = dma.unmap(a, 3 * 4096, DmaDirection::ToDevice).unwrap_err();
    assert!(matches!(err, DmaError::StillInUse { count: 1, .. }));
    assert!(dma.is_broken());
    assert_eq!(
        dma.map(Gpa(at), 16, DmaDirection::ToDevice).unwrap_err(),
        DmaError::Broken(BACKEND),
        "disabled for further use"
    );
    // The busy page was never freed: it waits on the deferred list.
    assert_eq!(w.grants.reclaim_counters().deferred, 1);
    assert!(w.grants.process_deferred().is_empty());
}

#[test]
fn r10_deferred_reclaim_retries_each_tick_and_frees_exactly_when_the_backend_unmaps() {
    let w = world(1);
    let grants = std::sync::Arc::new(
        grant_table::GuestGrants::new(
            w.xen.clone(),
            grant_table::DomId(9),
            {
                let ram = grant_table::Mem::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
                w.xen
                    .create_domain(grant_table::DomId(9), ram.clone(), DomainConfig::default())
                    .unwrap();
                ram
            },
            grant_table::TableSetup::v1(vec![Gfn(0x10)]),
        )
        .unwrap()
        .with_free_per_iteration(2),
    );
    let c = Caller::new(BACKEND);
    let mut handles = Vec::new();
    let mut refs = Vec::new();
    for i in 0..3 {
        let r = grants
            .grant_foreign_access(BACKEND, Gfn(0x100 + i), false)
            .unwrap();
        let mut op = [MapGrantRef::new(grant_table::DomId(9), r, HOST, 1)];
        w.xen.map_grant_ref(c, &mut op);
        assert_eq!(op[0].status, St::Okay);
        handles.push(op[0].handle);
        refs.push(r);
        assert_eq!(
            grants.end_foreign_access(r, Some(Gfn(0x100 + i))),
            EndAccess::Deferred
        );
    }
    assert_eq!(grants.reclaim_counters().deferred, 3);
    assert!(grants.process_deferred().is_empty(), "all still mapped");
    // Unmap the middle one: it is released on a tick, the others are not.
    let mut un = [UnmapGrantRef::new(handles[1], 1, 0)];
    w.xen.unmap_grant_ref(c, &mut un);
    let mut freed = Vec::new();
    for _ in 0..3 {
        freed.extend(grants.process_deferred());
    }
    assert_eq!(freed, vec![Gfn(0x101)]);
    let k = grants.reclaim_counters();
    assert_eq!((k.deferred, k.reclaimed, k.leaked), (2, 1, 0));
    for _ in 0..60 {
        grants.process_deferred();
    }
    assert!(
        grants.reclaim_counters().warnings > 0,
        "still pending reported"
    );
    let mut un = [
        UnmapGrantRef::new(handles[0], 1, 0),
        UnmapGrantRef::new(handles[2], 1, 0),
    ];
    w.xen.unmap_grant_ref(c, &mut un);
    let freed = grants.process_deferred();
    assert_eq!(freed.len(), 2, "free_per_iteration = 2");
    assert_eq!(grants.reclaim_counters().deferred, 0);
}

#[test]
fn r11_domain_death_releases_the_dying_backends_mappings_and_keeps_mapped_granter_pages() {
    let w = world(1);
    let c = Caller::new(BACKEND);
    let r = w
        .grants
        .grant_foreign_access(BACKEND, page(0), false)
        .unwrap();
    assert_eq!(map1(&w, c, r, HOST).status, St::Okay);
    assert_eq!(map1(&w, c, r, HOST_RO).status, St::Okay);
    w.xen.destroy_domain(BACKEND).unwrap();
    assert_eq!(
        w.xen.active_pin(GUEST, r),
        Some(0),
        "all of the backend's pins dropped"
    );
    assert!(w.grants.try_end_foreign_access(r));
    assert!(!w.xen.domain_exists(BACKEND));

    // A dead domain makes no hypercalls: its copy of a ref granted to it is refused,
    // as its map is (found by the grant_entries fuzz target).
    let w = world(1);
    let from = w
        .grants
        .grant_foreign_access(BACKEND, page(1), true)
        .unwrap();
    let to = w
        .grants
        .grant_foreign_access(BACKEND, page(2), false)
        .unwrap();
    let op = || {
        GrantCopy::new(
            CopyPtr::gref(GUEST, from, 0),
            true,
            CopyPtr::gref(GUEST, to, 0),
            true,
            8,
        )
    };
    assert_eq!(copy1(&w, Caller::new(BACKEND), op()), St::Okay);
    w.xen.destroy_domain(BACKEND).unwrap();
    assert_eq!(copy1(&w, Caller::new(BACKEND), op()), St::BadDomain);

    // The granter dies while a live backend maps its page: the page stays.
    let w = world(1);
    let r = w
        .grants
        .grant_foreign_access(BACKEND, page(0), false)
        .unwrap();
    w.grants
        .memory()
        .write_slice(b"still here", GuestAddress(gpa(page(0))))
        .unwrap();
    let op = map1(&w, c, r, HOST);
    w.xen.destroy_domain(GUEST).unwrap();
    assert!(!w.xen.domain_is_live(GUEST) && w.xen.domain_exists(GUEST));
    let f = w.xen.mapped_frame(BACKEND, op.handle).unwrap();
    let mut got = [0u8; 10];
    w.xen
        .domain_memory(GUEST)
        .unwrap()
        .read_slice(&mut got, GuestAddress(f.gpa))
        .unwrap();
    assert_eq!(&got, b"still here");
    assert_eq!(
        map1(&w, c, r, HOST).status,
        St::BadDomain,
        "no new maps of a dying domain"
    );
    assert_eq!(unmap1(&w, c, op.handle), St::Okay);
    assert!(!w.xen.domain_exists(GUEST), "dropped with its last mapping");
}

#[test]
fn r12_unmap_batches_flush_once_per_32_and_leave_no_stale_mapping() {
    let w = world(1);
    let c = Caller::new(BACKEND);
    let r = w
        .grants
        .grant_foreign_access(BACKEND, page(0), true)
        .unwrap();
    let r2 = w
        .grants
        .grant_foreign_access(BACKEND, page(1), true)
        .unwrap();
    let mut maps: Vec<MapGrantRef> = (0..70)
        .map(|i| MapGrantRef::new(GUEST, if i < 35 { r } else { r2 }, HOST_RO, 1))
        .collect();
    w.xen.map_grant_ref(c, &mut maps);
    assert!(maps.iter().all(|m| m.status == St::Okay));
    let before = w.xen.tlb_flushes(BACKEND);
    let mut un: Vec<UnmapGrantRef> = maps
        .iter()
        .map(|m| UnmapGrantRef::new(m.handle, 1, 0))
        .collect();
    w.xen.unmap_grant_ref(c, &mut un);
    assert!(un.iter().all(|u| u.status == St::Okay));
    assert_eq!(
        w.xen.tlb_flushes(BACKEND) - before,
        3,
        "70 unmaps = 32 + 32 + 6"
    );
    assert!(maps
        .iter()
        .all(|m| w.xen.mapped_frame(BACKEND, m.handle).is_none()));
    assert_eq!(w.xen.active_pin(GUEST, r), Some(0));
}

#[test]
fn table_is_sized_and_limited_like_xen_and_grows_on_demand() {
    let w = world_with(1, DomainConfig::default());
    let mut q = QuerySize {
        dom: grant_table::DomId(DOMID_SELF),
        nr_frames: 0,
        max_nr_frames: 0,
        status: St::GeneralError,
    };
    w.xen.query_size(GUEST, &mut q);
    assert_eq!((q.status, q.nr_frames, q.max_nr_frames), (St::Okay, 1, 64));
    q.dom = GUEST;
    w.xen.query_size(BACKEND, &mut q);
    assert_eq!(q.status, St::PermissionDenied, "another domain's table");
    // 512 entries per v1 frame, 8 reserved: the 505th grant grows the table.
    for i in 0..504 {
        w.grants
            .grant_foreign_access(BACKEND, page(i % 4), true)
            .unwrap();
    }
    assert_eq!(w.grants.nr_frames(), 1);
    w.grants
        .grant_foreign_access(BACKEND, page(0), true)
        .unwrap();
    assert_eq!(w.grants.nr_frames(), 2);
    // Beyond max_grant_frames.
    let mut op = SetupTable {
        dom: GUEST,
        frame_list: (0..65).map(|i| Gfn(0x1000 + i)).collect(),
        status_frame_list: Vec::new(),
        status: St::Okay,
    };
    w.xen.setup_table(GUEST, &mut op);
    assert_eq!(op.status, St::GeneralError);
    op.frame_list = vec![Gfn(TABLE_GFN), Gfn(TABLE_GFN + 1), Gfn(0xf_0000)];
    w.xen.setup_table(GUEST, &mut op);
    assert_eq!(op.status, St::BadPage, "a frame outside RAM");
    op.frame_list = vec![Gfn(TABLE_GFN), Gfn(TABLE_GFN + 1), Gfn(TABLE_GFN)];
    w.xen.setup_table(GUEST, &mut op);
    assert_eq!(op.status, St::GeneralError, "a frame used twice");
    w.xen.setup_table(
        BACKEND,
        &mut SetupTable {
            dom: GUEST,
            ..op.clone()
        },
    );
    // Version change with pins is refused.
    let r = w
        .grants
        .grant_foreign_access(BACKEND, page(0), true)
        .unwrap();
    let m = map1(&w, Caller::new(BACKEND), r, HOST_RO);
    assert!(w.xen.set_version(GUEST, 2).is_err());
    assert!(w.xen.set_version(GUEST, 3).is_err());
    assert_eq!(unmap1(&w, Caller::new(BACKEND), m.handle), St::Okay);
    assert_eq!(w.xen.get_version(GUEST), Ok(1));
}
