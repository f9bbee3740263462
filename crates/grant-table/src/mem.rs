//! Access to words in guest frames shared between a guest and the hypervisor: atomic
//! loads, stores and read-modify-writes through vm-memory's `get_atomic_ref`, which
//! checks bounds and alignment, so no `unsafe` is needed here. Every helper returns
//! `None` when the address is not RAM, never panics.

use crate::Mem;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use vm_memory::{AtomicInteger, Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

/// Runs `f` on the atomic `T` at `gpa` of `mem`.
pub(crate) fn with_atomic<T: AtomicInteger, R>(
    mem: &Mem,
    gpa: u64,
    f: impl FnOnce(&T) -> R,
) -> Option<R> {
    let slice = mem.get_slice(GuestAddress(gpa), size_of::<T>()).ok()?;
    let a = slice.get_atomic_ref::<T>(0).ok()?;
    Some(f(a))
}

pub(crate) fn load16(mem: &Mem, gpa: u64, o: Ordering) -> Option<u16> {
    with_atomic::<AtomicU16, _>(mem, gpa, |a| a.load(o))
}

pub(crate) fn load32(mem: &Mem, gpa: u64, o: Ordering) -> Option<u32> {
    with_atomic::<AtomicU32, _>(mem, gpa, |a| a.load(o))
}

pub(crate) fn load64(mem: &Mem, gpa: u64, o: Ordering) -> Option<u64> {
    with_atomic::<AtomicU64, _>(mem, gpa, |a| a.load(o))
}

pub(crate) fn store16(mem: &Mem, gpa: u64, v: u16, o: Ordering) -> Option<()> {
    with_atomic::<AtomicU16, _>(mem, gpa, |a| a.store(v, o))
}

pub(crate) fn store32(mem: &Mem, gpa: u64, v: u32, o: Ordering) -> Option<()> {
    with_atomic::<AtomicU32, _>(mem, gpa, |a| a.store(v, o))
}

pub(crate) fn store64(mem: &Mem, gpa: u64, v: u64, o: Ordering) -> Option<()> {
    with_atomic::<AtomicU64, _>(mem, gpa, |a| a.store(v, o))
}

/// Clears `bits` of the `u16` at `gpa` (Xen `gnttab_clear_flags`).
pub(crate) fn clear16(mem: &Mem, gpa: u64, bits: u16) -> Option<()> {
    with_atomic::<AtomicU16, _>(mem, gpa, |a| {
        a.fetch_and(!bits, Ordering::SeqCst);
    })
}

/// Sets `bits` of the `u16` at `gpa`.
pub(crate) fn set16(mem: &Mem, gpa: u64, bits: u16) -> Option<()> {
    with_atomic::<AtomicU16, _>(mem, gpa, |a| {
        a.fetch_or(bits, Ordering::SeqCst);
    })
}

/// Whether `[gpa, gpa + 4096)` is one piece of RAM in `mem`.
pub(crate) fn is_ram_page(mem: &Mem, gpa: u64) -> bool {
    mem.get_slice(GuestAddress(gpa), crate::abi::PAGE_SIZE as usize)
        .is_ok()
}

/// Zeroes the page at `gpa`.
pub(crate) fn zero_page(mem: &Mem, gpa: u64) -> Option<()> {
    let s = mem
        .get_slice(GuestAddress(gpa), crate::abi::PAGE_SIZE as usize)
        .ok()?;
    s.write_slice(&[0u8; crate::abi::PAGE_SIZE as usize], 0)
        .ok()
}

/// Copies `len` bytes from `src` in `from` to `dst` in `to` (one RAM piece each).
pub(crate) fn copy(from: &Mem, src: u64, to: &Mem, dst: u64, len: usize) -> Option<()> {
    if len == 0 {
        return Some(());
    }
    let s = from.get_slice(GuestAddress(src), len).ok()?;
    let d = to.get_slice(GuestAddress(dst), len).ok()?;
    s.copy_to_volatile_slice(d);
    Some(())
}
