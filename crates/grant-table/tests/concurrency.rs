//! Rules r3/r4 of `tests/rules.rs` under real concurrency: a backend mapping a grant
//! races the guest revoking it (end access), on two threads, thousands of times, for
//! both table versions. Whatever the interleaving, it never ends with a live mapping of
//! a revoked entry: either the map fails, or the revoke answers "busy" and the pin is
//! visible.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use grant_table::abi::{GNTMAP_HOST_MAP, GNTMAP_READONLY, GTF_READING};
use grant_table::xen::{MapGrantRef, UnmapGrantRef};
use grant_table::{Caller, GrantStatus};
use std::sync::Barrier;

#[test]
fn map_racing_revoke_never_ends_mapped_but_revoked() {
    for version in [1, 2] {
        let w = world(version);
        let c = Caller::new(BACKEND);
        let (mut mapped_won, mut revoke_won) = (0, 0);
        let barrier = Barrier::new(2);
        for i in 0..3000u64 {
            let readonly = i % 2 == 0;
            let r = w
                .grants
                .grant_foreign_access(BACKEND, page(i % 8), readonly)
                .unwrap();
            let flags = GNTMAP_HOST_MAP | if readonly { GNTMAP_READONLY } else { 0 };
            let (map, revoked) = std::thread::scope(|s| {
                let m = s.spawn(|| {
                    barrier.wait();
                    let mut op = [MapGrantRef::new(GUEST, r, flags, 1)];
                    w.xen.map_grant_ref(c, &mut op);
                    op[0]
                });
                barrier.wait();
                let revoked = w.grants.end_foreign_access_ref(r);
                (m.join().unwrap(), revoked)
            });
            match (map.status, revoked) {
                (GrantStatus::Okay, true) => {
                    panic!("v{version} iteration {i}: mapped but revoked")
                }
                (GrantStatus::Okay, false) => {
                    mapped_won += 1;
                    assert_ne!(w.grants.in_use_bits(r).unwrap() & GTF_READING, 0);
                    assert!(w.xen.mapped_frame(BACKEND, map.handle).is_some());
                    let mut un = [UnmapGrantRef::new(map.handle, 1, 0)];
                    w.xen.unmap_grant_ref(c, &mut un);
                    assert_eq!(un[0].status, GrantStatus::Okay);
                    assert!(w.grants.end_foreign_access_ref(r), "revocable after unmap");
                }
                (status, true) => {
                    revoke_won += 1;
                    assert_eq!(status, GrantStatus::GeneralError);
                    assert_eq!(w.xen.active_pin(GUEST, r), Some(0));
                    assert_eq!(w.grants.in_use_bits(r).unwrap(), 0, "no status left behind");
                }
                (status, false) => {
                    // v2 only: the failing map set the status bits, saw the flags
                    // cleared and is clearing them again (Xen "Unstable flags"); the
                    // revoke saw the transient bits. A retry revokes.
                    assert_eq!(version, 2, "v1 iteration {i}: map {status} yet busy");
                    assert_eq!(w.xen.active_pin(GUEST, r), Some(0));
                    assert!(w.grants.end_foreign_access_ref(r));
                    revoke_won += 1;
                }
            }
            w.grants.free_refs(r, 1);
        }
        assert_eq!(mapped_won + revoke_won, 3000);
        assert_eq!(w.xen.maptrack_in_use(BACKEND), 0);
    }
}
