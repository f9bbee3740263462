//! Taking a pin on a shared entry: the compare-and-swap loops on its status
//! (`_set_status_v1`, `_set_status_v2`) and their undo.

use super::{Domain, Table};
use crate::abi::{
    GrantStatus, GNTPIN_DEVW_MASK, GNTPIN_HSTW_MASK, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY,
    GTF_SUB_PAGE, GTF_TRANSITIVE, GTF_TYPE_MASK, GTF_WRITING,
};
use crate::{mem, Mem};
use std::sync::atomic::{fence, Ordering};

pub(super) type St = GrantStatus;

/// `_set_status_v1`: a bounded compare-and-swap loop on `{flags, domid}` that checks
/// type and domid (when not yet pinned) and sets `GTF_reading` (and `GTF_writing`).
pub(super) fn set_status_v1(
    m: &Mem,
    hdr: u64,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldom: u16,
) -> Result<(), St> {
    let mask = GTF_TYPE_MASK | if mapflag { GTF_SUB_PAGE } else { 0 };
    mem::with_atomic::<std::sync::atomic::AtomicU32, _>(m, hdr, |a| {
        let mut scombo = a.load(Ordering::SeqCst);
        let mut retries = 0;
        loop {
            let flags = scombo as u16;
            let domid = (scombo >> 16) as u16;
            // "If not already pinned, check the grant domid and type."
            if !pinned && ((flags & mask) != GTF_PERMIT_ACCESS || domid != ldom) {
                return Err(St::GeneralError);
            }
            let mut new = flags | GTF_READING;
            if !readonly {
                new |= GTF_WRITING;
                // "Attempt to write-pin a r/o grant entry"
                if flags & GTF_READONLY != 0 {
                    return Err(St::GeneralError);
                }
            }
            let newc = (scombo & 0xffff_0000) | u32::from(new);
            match a.compare_exchange(scombo, newc, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(()),
                Err(prev) => {
                    // "Shared grant entry is unstable": five attempts, then give up.
                    if retries == 4 {
                        return Err(St::GeneralError);
                    }
                    retries += 1;
                    scombo = prev;
                }
            }
        }
    })
    .unwrap_or(Err(St::GeneralError))
}

/// `_set_status_v2`: set the status bits, full fence, re-read the entry; if it changed
/// underneath, clear the bits again and fail ("Unstable flags").
#[allow(clippy::too_many_arguments)] // Xen's own signature
pub(super) fn set_status_v2(
    m: &Mem,
    hdr: u64,
    status: u64,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldom: u16,
) -> Result<(), St> {
    let mask = GTF_TYPE_MASK | if mapflag { GTF_SUB_PAGE } else { 0 };
    let bad = |c: u32| {
        let (flags, domid) = (c as u16, (c >> 16) as u16);
        ((flags & mask) != GTF_PERMIT_ACCESS && (mapflag || (flags & mask) != GTF_TRANSITIVE))
            || domid != ldom
    };
    let c = mem::load32(m, hdr, Ordering::SeqCst).ok_or(St::GeneralError)?;
    if !pinned && bad(c) {
        return Err(St::GeneralError);
    }
    if readonly {
        mem::set16(m, status, GTF_READING).ok_or(St::GeneralError)?;
    } else {
        if c as u16 & GTF_READONLY != 0 {
            return Err(St::GeneralError);
        }
        mem::set16(m, status, GTF_READING | GTF_WRITING).ok_or(St::GeneralError)?;
    }
    // "Make sure guest sees status update before checking if flags are still valid"
    fence(Ordering::SeqCst);
    let c = mem::load32(m, hdr, Ordering::SeqCst).ok_or(St::GeneralError)?;
    if !pinned {
        if bad(c) || (!readonly && c as u16 & GTF_READONLY != 0) {
            let _ = mem::clear16(m, status, GTF_WRITING | GTF_READING);
            return Err(St::GeneralError);
        }
    } else if c as u16 & GTF_READONLY != 0 {
        let _ = mem::clear16(m, status, GTF_WRITING);
        return Err(St::GeneralError);
    }
    Ok(())
}

pub(super) fn set_status(
    d: &Domain,
    t: &Table,
    r: u32,
    pinned: bool,
    readonly: bool,
    mapflag: bool,
    ldom: u16,
) -> Result<(), St> {
    if t.version == 1 {
        set_status_v1(&d.mem, t.entry_gpa(r), pinned, readonly, mapflag, ldom)
    } else {
        set_status_v2(
            &d.mem,
            t.entry_gpa(r),
            t.status_gpa(r),
            pinned,
            readonly,
            mapflag,
            ldom,
        )
    }
}

/// `reduce_status_for_pin`: drop `GTF_reading` from the status word at `status_gpa`
/// when nothing is pinned any more (`pin` is the entry's pin count now) and
/// `GTF_writing` when no writable pin is left (for a writable use).
pub(super) fn reduce_status_for_pin(m: &Mem, status_gpa: u64, pin: u32, readonly: bool) {
    let mut clear = if pin == 0 { GTF_READING } else { 0 };
    if !readonly && pin & (GNTPIN_HSTW_MASK | GNTPIN_DEVW_MASK) == 0 {
        clear |= GTF_WRITING;
    }
    if clear != 0 {
        let _ = mem::clear16(m, status_gpa, clear);
    }
}
