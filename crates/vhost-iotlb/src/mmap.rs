//! The one leaf that maps guest memory into this process: a [`Mapping`] is a shared
//! `mmap` of a page-aligned piece of a front-end file descriptor, unmapped on drop.
//!
//! [`Mapping::revoke`] replaces the guest pages in place by private anonymous pages, in
//! one `mmap(MAP_FIXED)`: from that instant this process holds none of the guest's memory
//! there, yet the address range stays valid, so a copy still running through a slice
//! taken before the revocation reads zeros or writes into scratch instead of faulting.
//! The range is unmapped when the last owner drops the mapping.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Host page size assumed for alignment (x86-64 and the 4 KiB-page arm64 configurations).
pub const PAGE_SIZE: u64 = 4096;

/// Why a piece of a file descriptor could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    /// Offset plus length overflows, or the length is 0.
    #[error(
        "cannot map {len:#x} bytes at file offset {offset:#x}: the range is empty or overflows"
    )]
    Range {
        /// File offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
    },
    /// The kernel refused the mapping.
    #[error("mmap of {len:#x} bytes at file offset {offset:#x} failed: {source}")]
    Map {
        /// Page-aligned file offset.
        offset: u64,
        /// Page-rounded length.
        len: u64,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The kernel refused to replace a window by anonymous pages.
    #[error("cannot revoke the {len:#x}-byte mapping: {source}")]
    Revoke {
        /// Length of the mapping.
        len: u64,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// A shared mapping of `[offset, offset + len)` of a file, widened to whole pages.
#[derive(Debug)]
pub struct Mapping {
    base: *mut u8,
    len: usize,
    /// Bytes from `base` to the first byte asked for (the offset's misalignment).
    lead: usize,
    revoked: AtomicBool,
}

// SAFETY: a `Mapping` is an owned address range; the raw pointer is only an address,
// every access through it is a volatile copy done by vm-memory, and the range stays
// mapped until drop, which needs exclusive ownership.
unsafe impl Send for Mapping {}
// SAFETY: as above; `revoke` only swaps the pages behind the range (one syscall) and
// the range itself never moves or shrinks while shared.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from `offset`, readable, and writable if `write`.
    ///
    /// # Errors
    /// [`MmapError::Range`] for an empty or overflowing range, [`MmapError::Map`] if the
    /// kernel refuses.
    pub fn new(file: &File, offset: u64, len: u64, write: bool) -> Result<Self, MmapError> {
        let range_err = || MmapError::Range { offset, len };
        if len == 0 {
            return Err(range_err());
        }
        let aligned = offset - offset % PAGE_SIZE;
        let lead = offset - aligned;
        let end = offset.checked_add(len).ok_or_else(range_err)?;
        let map_len = end
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or_else(range_err)?
            - aligned;
        let map_len_usize = usize::try_from(map_len).map_err(|_| range_err())?;
        let off = libc::off_t::try_from(aligned).map_err(|_| range_err())?;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping at an address the kernel picks; it aliases no
        // Rust object. `map_len_usize` and `off` were computed with checked arithmetic.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len_usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MmapError::Map {
                offset: aligned,
                len: map_len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: p.cast(),
            len: map_len_usize,
            lead: lead as usize, // < PAGE_SIZE
            revoked: AtomicBool::new(false),
        })
    }

    /// Address of the first byte asked for.
    pub fn ptr(&self) -> *mut u8 {
        // `lead` < PAGE_SIZE ≤ `len`: inside the mapping.
        self.base.wrapping_add(self.lead)
    }

    /// First address of the whole mapping (page-aligned).
    pub fn base(&self) -> usize {
        self.base as usize
    }

    /// Bytes mapped (whole pages): what this mapping exposes while it holds guest memory.
    pub fn mapped_len(&self) -> u64 {
        self.len as u64
    }

    /// Whether [`Self::revoke`] replaced the guest pages.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Replaces the guest pages by private anonymous zero pages in one atomic `mmap`.
    ///
    /// # Errors
    /// [`MmapError::Revoke`] if the kernel refuses; the guest pages then stay until drop.
    pub fn revoke(&self) -> Result<(), MmapError> {
        if self.revoked.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // SAFETY: `base..base+len` is our own mapping (made in `new`, not yet unmapped:
        // that needs `drop`, i.e. no other owner). MAP_FIXED replaces exactly that range,
        // so no other object's memory is touched, and the range stays mapped.
        let p = unsafe {
            libc::mmap(
                self.base.cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            self.revoked.store(false, Ordering::Release);
            return Err(MmapError::Revoke {
                len: self.len as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is the mapping made in `new`; `&mut self` means no
        // slice into it is alive (every slice borrows an owner of this mapping).
        let rc = unsafe { libc::munmap(self.base.cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of our own mapping failed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(bytes: &[u8]) -> File {
        let f = test_kit::mem::memfd("mmap-unit", bytes.len() as u64);
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    #[test]
    fn unaligned_offsets_map_whole_pages_and_point_at_the_byte_asked_for() {
        let mut data = vec![0u8; 3 * 4096];
        data[4096 + 100] = 0xab;
        let f = file_with(&data);
        let m = Mapping::new(&f, 4096 + 100, 10, false).unwrap();
        assert_eq!(m.mapped_len(), 4096);
        // SAFETY: the mapping is alive and at least 10 bytes long from ptr().
        assert_eq!(unsafe { m.ptr().read_volatile() }, 0xab);
        let span = Mapping::new(&f, 4000, 200, false).unwrap();
        assert_eq!(
            span.mapped_len(),
            8192,
            "a range crossing a page boundary maps both"
        );
    }

    #[test]
    fn empty_and_overflowing_ranges_are_refused() {
        let f = file_with(&[0; 4096]);
        assert!(matches!(
            Mapping::new(&f, 0, 0, false),
            Err(MmapError::Range { .. })
        ));
        assert!(matches!(
            Mapping::new(&f, u64::MAX - 10, 100, false),
            Err(MmapError::Range { .. })
        ));
    }

    #[test]
    fn revoke_replaces_guest_bytes_by_zeros_in_place() {
        let f = file_with(&[0x5a; 4096]);
        let m = Mapping::new(&f, 0, 4096, true).unwrap();
        // SAFETY: the mapping is alive and 4096 bytes long.
        assert_eq!(unsafe { m.ptr().read_volatile() }, 0x5a);
        m.revoke().unwrap();
        assert!(m.is_revoked());
        // SAFETY: revoke keeps the range mapped (anonymous now).
        unsafe {
            assert_eq!(m.ptr().read_volatile(), 0, "no guest byte left");
            m.ptr().write_volatile(1);
        }
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(
            b[0], 0x5a,
            "a write after revoke never reaches the guest's file"
        );
    }
}
