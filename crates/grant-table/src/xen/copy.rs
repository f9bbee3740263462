//! `GNTTABOP_copy`: each side of a copy is a granted reference (pinned for the copy,
//! `gnttab_copy_claim_buf`) or the caller's own frame, and bytes move between them.

use super::args::{Caller, CopyPtr, GrantCopy};
use super::status::{reduce_status_for_pin, set_status, set_status_v2, St};
use super::{paged_frame, Active, Domain, Xen};
use crate::abi::{
    pin_overflow_mask, DOMID_SELF, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF, GNTPIN_DEVW_MASK,
    GNTPIN_HSTR_INC, GNTPIN_HSTW_INC, GNTPIN_HSTW_MASK, GTF_SUB_PAGE, GTF_TRANSITIVE,
    GTF_TYPE_MASK, PAGE_SIZE,
};
use crate::mem;
use dma_types::{lock, read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A grant acquired for one copy (`struct gnttab_copy_buf`).
struct CopyBuf {
    owner: Arc<Domain>,
    gpa: u64,
    off: u16,
    len: u16,
    /// Held grant to release: (granting domain, ref, readonly).
    grant: Option<(Arc<Domain>, u32, bool)>,
}

impl Xen {
    /// `GNTTABOP_copy`, one status per operation.
    pub fn copy(&self, caller: Caller, ops: &mut [GrantCopy]) {
        // As for a map: only a live domain makes hypercalls (found by the grant_entries
        // fuzz target: a destroyed domain's copy of a ref granted to it succeeded).
        if self.live(caller.domain.0).is_none() {
            for op in ops {
                op.status = St::BadDomain;
            }
            return;
        }
        for op in ops {
            op.status = match self.copy_one(caller.domain.0, op) {
                Ok(()) => St::Okay,
                Err(s) => s,
            };
        }
    }

    fn copy_one(&self, ldom: u16, op: &GrantCopy) -> Result<(), St> {
        let src_gref = op.flags & GNTCOPY_SOURCE_GREF != 0;
        let dst_gref = op.flags & GNTCOPY_DEST_GREF != 0;
        // gnttab_copy_lock_domain: "Only DOMID_SELF may reference via frame."
        let lock_dom = |p: &CopyPtr, is_gref: bool| -> Result<Arc<Domain>, St> {
            if p.domid.0 != DOMID_SELF && !is_gref {
                return Err(St::PermissionDenied);
            }
            self.by_any_id(p.domid.0, ldom).ok_or(St::BadDomain)
        };
        let sd = lock_dom(&op.source, src_gref)?;
        let dd = lock_dom(&op.dest, dst_gref)?;
        let src = self.claim(&sd, &op.source, src_gref, true, ldom)?;
        let dst = match self.claim(&dd, &op.dest, dst_gref, false, ldom) {
            Ok(d) => d,
            Err(s) => {
                self.release_buf(src);
                return Err(s);
            }
        };
        let r = Self::copy_buf(op, &src, &dst);
        self.release_buf(src);
        self.release_buf(dst);
        r
    }

    /// `gnttab_copy_buf`: the page bounds, then the (sub-page) grant window.
    fn copy_buf(op: &GrantCopy, src: &CopyBuf, dst: &CopyBuf) -> Result<(), St> {
        let len = u32::from(op.len);
        // "copy beyond page area"
        if u32::from(op.source.offset) + len > PAGE_SIZE as u32
            || u32::from(op.dest.offset) + len > PAGE_SIZE as u32
        {
            return Err(St::BadCopyArg);
        }
        // "copy source out of bounds" / "copy dest out of bounds"
        let inside = |p: &CopyPtr, b: &CopyBuf| {
            p.offset >= b.off && u32::from(p.offset) + len <= u32::from(b.off) + u32::from(b.len)
        };
        if !inside(&op.source, src) || !inside(&op.dest, dst) {
            return Err(St::GeneralError);
        }
        mem::copy(
            &src.owner.mem,
            src.gpa + u64::from(op.source.offset),
            &dst.owner.mem,
            dst.gpa + u64::from(op.dest.offset),
            op.len as usize,
        )
        .ok_or(St::GeneralError)
    }

    /// `gnttab_copy_claim_buf`.
    fn claim(
        &self,
        d: &Arc<Domain>,
        p: &CopyPtr,
        is_gref: bool,
        readonly: bool,
        ldom: u16,
    ) -> Result<CopyBuf, St> {
        if is_gref {
            let r = u32::try_from(p.u).map_err(|_| St::BadGntref)?;
            let allow = d.config.transitive;
            // Xen restarts the operation when a transitive grant changed while its
            // locks were dropped; a few tries, then GNTST_eagain.
            let mut tries = 0;
            loop {
                match self.acquire_for_copy(d, r, ldom, readonly, allow) {
                    Err(St::Eagain) if tries < 4 => tries += 1,
                    other => return other,
                }
            }
        } else {
            let gpa = paged_frame(d, p.u)?;
            Ok(CopyBuf {
                owner: d.clone(),
                gpa,
                off: 0,
                len: PAGE_SIZE as u16,
                grant: None,
            })
        }
    }

    /// `acquire_grant_for_copy`: pins `rd`'s entry `r` for a copy by `ldom` (host
    /// read or write pin), following a transitive grant one level at most.
    fn acquire_for_copy(
        &self,
        rd: &Arc<Domain>,
        r: u32,
        ldom: u16,
        ro: bool,
        allow_transitive: bool,
    ) -> Result<CopyBuf, St> {
        let incr = if ro { GNTPIN_HSTR_INC } else { GNTPIN_HSTW_INC };
        let writers = GNTPIN_HSTW_MASK | GNTPIN_DEVW_MASK;
        let t = read(&rd.table);
        if r >= t.nr_entries() {
            return Err(St::BadGntref); // "Bad grant reference"
        }
        let Some(slot) = t.active.get(r as usize) else {
            return Err(St::BadGntref);
        };
        let mut act = lock(slot);
        if act.pin != 0 && (act.domid != ldom || act.pin & pin_overflow_mask(incr) != 0) {
            return Err(St::GeneralError);
        }
        let old_pin = act.pin;
        let e = t.entry_gpa(r);
        let hdr_flags = mem::load16(&rd.mem, e, Ordering::Acquire).ok_or(St::GeneralError)?;
        let status_gpa = t.status_gpa(r);
        let clear_out = |act: &Active| reduce_status_for_pin(&rd.mem, status_gpa, act.pin, ro);
        if t.version == 2 && hdr_flags & GTF_TYPE_MASK == GTF_TRANSITIVE {
            if old_pin == 0 || (!ro && old_pin & writers == 0) {
                set_status_v2(&rd.mem, e, status_gpa, old_pin != 0, ro, false, ldom)?;
            }
            if !allow_transitive {
                clear_out(&act);
                return Err(St::GeneralError); // "transitive grant when transitivity not allowed"
            }
            let trans = mem::load16(&rd.mem, e + 4, Ordering::Acquire).zip(mem::load32(
                &rd.mem,
                e + 8,
                Ordering::Acquire,
            ));
            let Some((trans_domid, trans_gref)) = trans else {
                clear_out(&act);
                return Err(St::GeneralError);
            };
            if trans_domid == rd.id {
                clear_out(&act);
                return Err(St::GeneralError); // "transitive grants cannot be self-referential"
            }
            let Some(td) = self.live(trans_domid) else {
                clear_out(&act);
                return Err(St::GeneralError); // "transitive grant referenced bad domain"
            };
            // As Xen: drop our locks for the nested acquire (two transitive grants
            // pointing at each other must not deadlock), then check nothing changed.
            drop(act);
            drop(t);
            let inner = self.acquire_for_copy(&td, trans_gref, rd.id, ro, false);
            let t = read(&rd.table);
            let Some(slot) = t.active.get(r as usize) else {
                if let Ok(b) = inner {
                    self.release_buf(b);
                }
                return Err(St::Eagain);
            };
            let mut act = lock(slot);
            // The table may have changed while unlocked: its status word now.
            let clear_out =
                |act: &Active| reduce_status_for_pin(&rd.mem, t.status_gpa(r), act.pin, ro);
            let inner = match inner {
                Ok(b) => b,
                Err(s) => {
                    clear_out(&act);
                    return Err(s);
                }
            };
            let changed = t.version != 2
                || act.pin != old_pin
                || (old_pin != 0
                    && (act.domid != ldom
                        || act.frame != inner.gpa
                        || act.trans != Some((td.id, trans_gref))));
            if changed {
                drop(act);
                drop(t);
                self.release_buf(inner);
                return Err(St::Eagain);
            }
            if old_pin == 0 {
                *act = Active {
                    pin: 0,
                    domid: ldom,
                    frame: inner.gpa,
                    frame_owner: td.id,
                    start: inner.off,
                    length: inner.len,
                    // Always treated as sub-page: that blocks mapping a transitive grant.
                    is_sub_page: true,
                    trans: Some((td.id, trans_gref)),
                };
            }
            act.pin += incr;
            // The nested grant stays acquired; `release_for_copy` follows `trans`.
            return Ok(CopyBuf {
                owner: td.clone(),
                gpa: act.frame,
                off: act.start,
                len: act.length,
                grant: Some((rd.clone(), r, ro)),
            });
        }
        if old_pin == 0 || (!ro && old_pin & writers == 0) {
            set_status(rd, &t, r, old_pin != 0, ro, false, ldom)?;
            let (gfn, sub) = if t.version == 1 {
                (
                    mem::load32(&rd.mem, e + 4, Ordering::Acquire).map(u64::from),
                    None,
                )
            } else if hdr_flags & GTF_SUB_PAGE == 0 {
                (mem::load64(&rd.mem, e + 8, Ordering::Acquire), None)
            } else {
                let off = mem::load16(&rd.mem, e + 4, Ordering::Acquire);
                let len = mem::load16(&rd.mem, e + 6, Ordering::Acquire);
                (mem::load64(&rd.mem, e + 8, Ordering::Acquire), off.zip(len))
            };
            let frame = match gfn.ok_or(St::GeneralError).and_then(|g| paged_frame(rd, g)) {
                Ok(f) => f,
                Err(s) => {
                    clear_out(&act);
                    return Err(s);
                }
            };
            if act.pin == 0 {
                let (start, length) = sub.unwrap_or((0, PAGE_SIZE as u16));
                *act = Active {
                    pin: 0,
                    domid: ldom,
                    frame,
                    frame_owner: rd.id,
                    start,
                    length,
                    is_sub_page: sub.is_some(),
                    trans: None,
                };
            }
        }
        act.pin += incr;
        let owner = if act.frame_owner == rd.id {
            rd.clone()
        } else {
            self.any(act.frame_owner).ok_or(St::BadDomain)?
        };
        Ok(CopyBuf {
            owner,
            gpa: act.frame,
            off: act.start,
            len: act.length,
            grant: Some((rd.clone(), r, ro)),
        })
    }

    fn release_buf(&self, b: CopyBuf) {
        if let Some((rd, r, ro)) = b.grant {
            self.release_for_copy(&rd, r, ro);
        }
    }

    /// `release_grant_for_copy`, and the nested grant of a transitive one.
    fn release_for_copy(&self, rd: &Domain, r: u32, ro: bool) {
        let trans = {
            let t = read(&rd.table);
            let Some(slot) = t.active.get(r as usize) else {
                return;
            };
            let mut act = lock(slot);
            act.pin = act
                .pin
                .saturating_sub(if ro { GNTPIN_HSTR_INC } else { GNTPIN_HSTW_INC });
            reduce_status_for_pin(&rd.mem, t.status_gpa(r), act.pin, ro);
            if t.version == 2 {
                act.trans
            } else {
                None
            }
        };
        if let Some((td, tr)) = trans {
            if let Some(td) = self.any(td) {
                self.release_for_copy(&td, tr, ro);
            }
        }
    }
}
