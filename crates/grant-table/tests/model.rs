//! Property test: random sequences of guest grants and revokes and backend maps,
//! unmaps, writes through mappings and grant copies, checked step by step against an
//! independent reference model of Xen's rules (a few lines per rule, no atomics, no
//! guest memory layout), and at the end against the pins, the status bits and every
//! byte of the guest's pages. Both table versions.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use grant_table::abi::*;
use grant_table::xen::{CopyPtr, GrantCopy, MapGrantRef, UnmapGrantRef};
use grant_table::{Caller, Gfn, GrantHandle, GrantRef, GrantStatus as St};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

const REFS: usize = 5;
const LOCAL: u64 = 0x10; // the backend's own frame used for copies

#[derive(Clone, Debug)]
enum Op {
    Grant {
        i: usize,
        ro: bool,
        to_other: bool,
    },
    Revoke {
        i: usize,
    },
    Map {
        i: usize,
        ro: bool,
    },
    Unmap {
        k: usize,
    },
    WriteMapped {
        k: usize,
        byte: u8,
    },
    CopyIn {
        i: usize,
        off: u16,
        len: u16,
        byte: u8,
    },
    CopyOut {
        i: usize,
        off: u16,
        len: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0..REFS;
    let off = prop_oneof![0u16..8, 4000u16..4097];
    let len = prop_oneof![0u16..100, 90u16..200];
    prop_oneof![
        (i.clone(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(i, ro, to_other)| Op::Grant { i, ro, to_other }),
        i.clone().prop_map(|i| Op::Revoke { i }),
        (i.clone(), any::<bool>()).prop_map(|(i, ro)| Op::Map { i, ro }),
        (0usize..16).prop_map(|k| Op::Unmap { k }),
        (0usize..16, any::<u8>()).prop_map(|(k, byte)| Op::WriteMapped { k, byte }),
        (i.clone(), off.clone(), len.clone(), any::<u8>())
            .prop_map(|(i, off, len, byte)| Op::CopyIn { i, off, len, byte }),
        (i, off, len).prop_map(|(i, off, len)| Op::CopyOut { i, off, len }),
    ]
}

/// The reference model of one entry.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// The flags' grant: (granted to the backend, read-only); `None` = `GTF_invalid`.
    flags: Option<(bool, bool)>,
    pins_r: u32,
    pins_w: u32,
}

impl Entry {
    fn pinned(&self) -> bool {
        self.pins_r + self.pins_w > 0
    }
    /// Xen's verdict on pinning this entry for the backend (`_set_status` and the
    /// pinned shortcut), as a rule: first pin needs a valid grant to us; a first
    /// writable pin needs a writable grant.
    fn pin_verdict(&self, write: bool) -> St {
        if self.pinned() {
            if write && self.pins_w == 0 && matches!(self.flags, Some((_, true))) {
                return St::GeneralError;
            }
            return St::Okay;
        }
        match self.flags {
            Some((true, ro)) if !(ro && write) => St::Okay,
            _ => St::GeneralError,
        }
    }
}

fn run(version: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let w = world(version);
    let c = Caller::new(BACKEND);
    let first = w.grants.alloc_refs(REFS as u32).unwrap();
    let gref = |i: usize| GrantRef(first.0 + i as u32);
    let mem = w.grants.memory().clone();
    let bmem = w.xen.domain_memory(BACKEND).unwrap();
    let mut pages: Vec<Vec<u8>> = (0..REFS).map(|i| pattern(4096, i as u8)).collect();
    for (i, p) in pages.iter().enumerate() {
        mem.write_slice(p, GuestAddress(gpa(page(i as u64))))
            .unwrap();
    }
    let mut local = vec![0u8; 4096];
    let mut e = [Entry::default(); REFS];
    // (entry, read-only, live, handle)
    let mut handles: Vec<(usize, bool, bool, GrantHandle)> = Vec::new();
    for op in ops {
        match op {
            Op::Grant { i, ro, to_other } => {
                if e[i].flags.is_none() && !e[i].pinned() {
                    let to = if to_other { OTHER } else { BACKEND };
                    w.grants
                        .grant_foreign_access_ref(gref(i), to, page(i as u64), ro)
                        .unwrap();
                    e[i].flags = Some((!to_other, ro));
                }
            }
            Op::Revoke { i } => {
                let got = w.grants.end_foreign_access_ref(gref(i));
                let want = !e[i].pinned();
                prop_assert_eq!(got, want, "revoke {}", i);
                if want || version == 2 {
                    e[i].flags = None; // v2 clears the flags even when busy
                }
            }
            Op::Map { i, ro } => {
                let mut m = [MapGrantRef::new(
                    GUEST,
                    gref(i),
                    GNTMAP_HOST_MAP | if ro { GNTMAP_READONLY } else { 0 },
                    1,
                )];
                w.xen.map_grant_ref(c, &mut m);
                let want = e[i].pin_verdict(!ro);
                prop_assert_eq!(m[0].status, want, "map {} ro {}", i, ro);
                if want == St::Okay {
                    prop_assert_eq!(m[0].dev_bus_addr, gpa(page(i as u64)));
                    if ro {
                        e[i].pins_r += 1
                    } else {
                        e[i].pins_w += 1
                    }
                    handles.push((i, ro, true, m[0].handle));
                }
            }
            Op::Unmap { k } => {
                if handles.is_empty() {
                    continue;
                }
                let k = k % handles.len();
                let (i, ro, live, h) = handles[k];
                let mut u = [UnmapGrantRef::new(h, 1, 0)];
                w.xen.unmap_grant_ref(c, &mut u);
                // A handle unmapped before may since have been reused by a later map.
                let reused = handles.iter().any(|x| x.3 == h && x.2);
                if live {
                    prop_assert_eq!(u[0].status, St::Okay);
                    if ro {
                        e[i].pins_r -= 1
                    } else {
                        e[i].pins_w -= 1
                    }
                    handles[k].2 = false;
                } else if !reused {
                    prop_assert_eq!(u[0].status, St::BadHandle, "stale handle");
                } else {
                    // The unmap hit the live reuse: bookkeep it on the live record.
                    let j = handles.iter().position(|x| x.3 == h && x.2).unwrap();
                    let (i2, ro2, _, _) = handles[j];
                    prop_assert_eq!(u[0].status, St::Okay);
                    if ro2 {
                        e[i2].pins_r -= 1
                    } else {
                        e[i2].pins_w -= 1
                    }
                    handles[j].2 = false;
                }
            }
            Op::WriteMapped { k, byte } => {
                if handles.is_empty() {
                    continue;
                }
                let (i, ro, live, h) = handles[k % handles.len()];
                let f = w.xen.mapped_frame(BACKEND, h);
                if !live {
                    if !handles.iter().any(|x| x.3 == h && x.2) {
                        prop_assert!(f.is_none(), "unmapped handle reaches nothing");
                    }
                    continue;
                }
                let f = f.unwrap();
                prop_assert_eq!(f.writable, !ro);
                prop_assert_eq!(f.gpa, gpa(page(i as u64)));
                if f.writable {
                    mem.write_obj(byte, GuestAddress(f.gpa)).unwrap();
                    pages[i][0] = byte;
                }
            }
            Op::CopyIn { i, off, len, byte } => {
                let end = (usize::from(off) + usize::from(len)).min(4096);
                local[usize::from(off).min(4096)..end].fill(byte);
                bmem.write_slice(&local, GuestAddress(LOCAL * 4096))
                    .unwrap();
                let mut cp = [GrantCopy::new(
                    CopyPtr::local(Gfn(LOCAL), off),
                    false,
                    CopyPtr::gref(GUEST, gref(i), off),
                    true,
                    len,
                )];
                w.xen.copy(c, &mut cp);
                let mut want = e[i].pin_verdict(true);
                if want == St::Okay && u32::from(off) + u32::from(len) > 4096 {
                    want = St::BadCopyArg;
                }
                prop_assert_eq!(cp[0].status, want, "copy into {} at {}+{}", i, off, len);
                if want == St::Okay {
                    pages[i][usize::from(off)..end].copy_from_slice(&local[usize::from(off)..end]);
                }
            }
            Op::CopyOut { i, off, len } => {
                let mut cp = [GrantCopy::new(
                    CopyPtr::gref(GUEST, gref(i), off),
                    true,
                    CopyPtr::local(Gfn(LOCAL), off),
                    false,
                    len,
                )];
                w.xen.copy(c, &mut cp);
                let mut want = e[i].pin_verdict(false);
                if want == St::Okay && u32::from(off) + u32::from(len) > 4096 {
                    want = St::BadCopyArg;
                }
                prop_assert_eq!(cp[0].status, want, "copy from {} at {}+{}", i, off, len);
                if want == St::Okay {
                    let end = usize::from(off) + usize::from(len);
                    local[usize::from(off)..end].copy_from_slice(&pages[i][usize::from(off)..end]);
                }
                let mut got = vec![0u8; 4096];
                bmem.read_slice(&mut got, GuestAddress(LOCAL * 4096))
                    .unwrap();
                prop_assert!(got == local, "backend frame");
            }
        }
        for (i, x) in e.iter().enumerate() {
            let pin = x.pins_r * GNTPIN_HSTR_INC + x.pins_w * GNTPIN_HSTW_INC;
            prop_assert_eq!(w.xen.active_pin(GUEST, gref(i)), Some(pin));
            let mut bits = 0;
            if x.pinned() {
                bits |= GTF_READING;
            }
            if x.pins_w > 0 {
                bits |= GTF_WRITING;
            }
            prop_assert_eq!(
                w.grants.in_use_bits(gref(i)).unwrap(),
                bits,
                "status of {}",
                i
            );
        }
    }
    for (i, p) in pages.iter().enumerate() {
        prop_assert!(
            read_guest(&w, gpa(page(i as u64)), 4096) == *p,
            "page {} bytes",
            i
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn grant_map_unmap_revoke_copy_sequences_match_the_reference_model_v1(ops in prop::collection::vec(op(), 1..60)) {
        run(1, ops)?;
    }

    #[test]
    fn grant_map_unmap_revoke_copy_sequences_match_the_reference_model_v2(ops in prop::collection::vec(op(), 1..60)) {
        run(2, ops)?;
    }
}
