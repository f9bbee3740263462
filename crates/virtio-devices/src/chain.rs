//! Descriptor chains as the devices here read them: walked once into readable and
//! writable [`Segment`]s (a [`Layout`]), then byte ranges of those segments translated
//! into host slices ([`Translated`]) before any data moves.
//!
//! This is the one module that reaches guest buffers. Every address goes through the
//! device's `vm_memory::GuestMemory`, so behind an IOMMU each range is translated with
//! the access it needs and a range the guest did not map fails here, as an error, with
//! the IOMMU recording the fault. Walking the chain once and deriving everything from
//! that one walk means a driver rewriting its descriptors mid-request cannot make the
//! lengths a device validated differ from the buffers it then uses.

use std::fs::File;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileMemoryError,
    VolatileSlice,
};

/// Why a chain or a range of it cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain has more descriptors than the device accepts.
    #[error("the chain has more than {max} descriptors")]
    TooLong {
        /// Most descriptors the device accepts in one chain.
        max: usize,
    },
    /// A device-readable descriptor follows a device-writable one, which virtio spec
    /// §2.7.4.2 forbids, so the request's layout is ambiguous.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A byte range reaches past the end of the segments it was taken from.
    #[error("bytes {start}..{start}+{len} lie beyond the {available} bytes of the segments")]
    OutOfChain {
        /// First byte of the range, counted from the first segment.
        start: u64,
        /// Length of the range.
        len: u64,
        /// Bytes the segments hold.
        available: u64,
    },
    /// A buffer address plus an offset into it overflows the 64-bit address space.
    #[error("buffer at {addr:#x} plus {offset:#x} overflows the address space")]
    AddressOverflow {
        /// Buffer address.
        addr: u64,
        /// Offset into the buffer.
        offset: u64,
    },
    /// Guest memory refused the range: not RAM, or not mapped with the needed access.
    #[error("guest memory refused the access: {0}")]
    Memory(#[from] GuestMemoryError),
    /// Copying to or from a translated slice failed.
    #[error("copying through a translated slice failed: {0}")]
    Copy(#[from] VolatileMemoryError),
}

/// One buffer of a chain: its guest address (an IOVA behind an IOMMU) and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A chain's buffers by direction, exactly as one walk of its descriptors found them:
/// every readable one before every writable one (§2.7.4.2), and no more than the
/// device's limit in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl Layout {
    /// Walks `chain` once. A descriptor that cannot be read ends the chain there
    /// (virtio-queue's iterator stops), so a truncated chain is a shorter one.
    ///
    /// # Errors
    /// [`ChainError::TooLong`] past `max` descriptors (nothing beyond `max` is stored),
    /// [`ChainError::ReadableAfterWritable`] for a misordered chain.
    pub fn walk<T>(chain: DescriptorChain<T>, max: usize) -> Result<Self, ChainError>
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let mut layout = Layout::default();
        for (index, desc) in chain.enumerate() {
            if index >= max {
                return Err(ChainError::TooLong { max });
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                layout.writable.push(seg);
            } else if !layout.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable { index });
            } else {
                layout.readable.push(seg);
            }
        }
        Ok(layout)
    }

    /// The device-readable segments, in chain order.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// The device-writable segments, in chain order.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Total bytes of the readable segments.
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    /// Total bytes of the writable segments.
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }

    /// Address of the last writable byte (where virtio-blk puts its status), if the
    /// chain has one and its address is representable.
    pub fn last_writable_byte(&self) -> Option<GuestAddress> {
        let seg = self.writable.iter().rev().find(|s| s.len > 0)?;
        seg.addr
            .0
            .checked_add(u64::from(seg.len) - 1)
            .map(GuestAddress)
    }
}

/// Total bytes of `segs` (saturating: a chain holds at most 2^16 descriptors of at most
/// 2^32 bytes each, far below `u64::MAX`).
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter()
        .fold(0u64, |acc, s| acc.saturating_add(u64::from(s.len)))
}

/// Host slices covering a range of guest buffers, every byte of it translated with the
/// access it was asked for. Holding one proves the whole range was reachable when it
/// was built; copies through it cannot fault.
pub struct Translated<'m, B> {
    slices: Vec<VolatileSlice<'m, B>>,
    len: usize,
}

impl<B> std::fmt::Debug for Translated<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translated")
            .field("slices", &self.slices.len())
            .field("len", &self.len)
            .finish()
    }
}

/// Translates bytes `start..start + len` of the concatenation of `segs` for `access`.
///
/// # Errors
/// [`ChainError::OutOfChain`] if the segments are shorter than the range,
/// [`ChainError::AddressOverflow`] for an unrepresentable address, and
/// [`ChainError::Memory`] if guest memory (or the IOMMU in front of it) refuses any
/// byte of the range.
pub fn translate<'m, M: GuestMemory>(
    mem: &'m M,
    segs: &[Segment],
    start: u64,
    len: u64,
    access: Permissions,
) -> Result<Translated<'m, BS<'m, M::Bitmap>>, ChainError> {
    let available = total_len(segs);
    let out_of_chain = ChainError::OutOfChain {
        start,
        len,
        available,
    };
    let Some(end) = start.checked_add(len).filter(|&e| e <= available) else {
        return Err(out_of_chain);
    };
    let mut slices = Vec::new();
    let mut total = 0usize;
    let mut pos = 0u64; // offset of `seg` in the concatenation
    for seg in segs {
        if pos >= end {
            break;
        }
        // Saturating like `total_len`, so the walk agrees with `available`.
        let seg_end = pos.saturating_add(u64::from(seg.len));
        if seg_end > start {
            let from = start.max(pos);
            let offset = from - pos;
            // At most `seg.len`, a u32: fits usize on the 64-bit hosts vm-memory's
            // mmap backend supports.
            let count = (seg_end.min(end) - from) as usize;
            let addr = seg
                .addr
                .0
                .checked_add(offset)
                // The range's last byte must be addressable; it may be `u64::MAX`.
                .filter(|a| count == 0 || a.checked_add(count as u64 - 1).is_some())
                .ok_or(ChainError::AddressOverflow {
                    addr: seg.addr.0,
                    offset,
                })?;
            let mut got = 0usize;
            for slice in mem.get_slices(GuestAddress(addr), count, access)? {
                let slice = slice?;
                got += slice.len();
                slices.push(slice);
            }
            if got != count {
                return Err(GuestMemoryError::PartialBuffer {
                    expected: count,
                    completed: got,
                }
                .into());
            }
            total += count;
        }
        pos = seg_end;
    }
    Ok(Translated { slices, len: total })
}

impl<B: BitmapSlice> Translated<'_, B> {
    /// Bytes covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is covered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `buf.len()` bytes starting at `offset` of the range into `buf`.
    ///
    /// # Errors
    /// [`ChainError::OutOfChain`] if `offset + buf.len()` exceeds [`Self::len`].
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), ChainError> {
        self.check(offset, buf.len())?;
        let mut done = 0;
        self.walk(offset, buf.len(), |slice, at, n| {
            slice.read_slice(&mut buf[done..done + n], at)?;
            done += n;
            Ok(())
        })
    }

    /// Copies `buf` into the range starting at `offset`.
    ///
    /// # Errors
    /// [`ChainError::OutOfChain`] if `offset + buf.len()` exceeds [`Self::len`].
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<(), ChainError> {
        self.check(offset, buf.len())?;
        let mut done = 0;
        self.walk(offset, buf.len(), |slice, at, n| {
            slice.write_slice(&buf[done..done + n], at)?;
            done += n;
            Ok(())
        })
    }

    /// Reads the whole range from `file` at `offset`, straight into guest memory
    /// (`preadv` over the range's host slices: no copy through a buffer of ours).
    ///
    /// # Errors
    /// The file's error; reading past its end is `UnexpectedEof`. The range may then
    /// be partly written.
    pub fn read_from_file_at(&self, file: &File, offset: u64) -> std::io::Result<()> {
        self.file_io(file, offset, Direction::FromFile)?;
        for s in &self.slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        Ok(())
    }

    /// Writes the whole range to `file` at `offset`, straight from guest memory
    /// (`pwritev`).
    ///
    /// # Errors
    /// The file's error. The file may then be partly written.
    pub fn write_to_file_at(&self, file: &File, offset: u64) -> std::io::Result<()> {
        self.file_io(file, offset, Direction::ToFile)
    }

    fn file_io(&self, file: &File, offset: u64, dir: Direction) -> std::io::Result<()> {
        let mut iov: Vec<libc::iovec> = self
            .slices
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let mut first = 0;
        let mut at = offset;
        while first < iov.len() {
            let count = (iov.len() - first).min(IOV_MAX);
            let pos = libc::off_t::try_from(at)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            let batch = &iov[first..first + count];
            // SAFETY: every iovec is one of `self.slices`, a VolatileSlice of guest
            // memory that `translate` obtained for this access (checked there against
            // the memory map and the IOMMU); the slices borrow the memory for `'m`, so
            // the ranges stay mapped for the whole call, and `count <= batch.len()`.
            // The kernel only reads (pwritev) or writes (preadv) inside them.
            let n = unsafe {
                match dir {
                    Direction::FromFile => {
                        libc::preadv(file.as_raw_fd(), batch.as_ptr(), count as i32, pos)
                    }
                    Direction::ToFile => {
                        libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count as i32, pos)
                    }
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            // Advance past what was done: whole iovecs, then into a partial one.
            let mut n = n as usize;
            at += n as u64;
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n < iov_len`, so the new base stays inside the slice.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn check(&self, offset: usize, n: usize) -> Result<(), ChainError> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ChainError::OutOfChain {
                start: offset as u64,
                len: n as u64,
                available: self.len as u64,
            }),
        }
    }

    /// Calls `f(slice, offset_in_slice, count)` for each piece of `offset..offset + n`,
    /// in order. The caller checked the range.
    fn walk<F>(&self, offset: usize, n: usize, mut f: F) -> Result<(), ChainError>
    where
        F: FnMut(&VolatileSlice<'_, B>, usize, usize) -> Result<(), VolatileMemoryError>,
    {
        let mut skip = offset;
        let mut left = n;
        for slice in &self.slices {
            if left == 0 {
                break;
            }
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let count = (slice.len() - skip).min(left);
            f(slice, skip, count)?;
            left -= count;
            skip = 0;
        }
        Ok(())
    }
}

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

#[derive(Clone, Copy)]
enum Direction {
    FromFile,
    ToFile,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        // Two regions with a hole between them.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x2000), 0x1000)])
            .unwrap()
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn translate_spans_segments_and_copies_round_trip() {
        let m = mem();
        let segs = [seg(0xff0, 0x10), seg(0x2000, 0x20), seg(0x100, 0)];
        let t = translate(&m, &segs, 8, 0x18, Permissions::Write).unwrap();
        assert_eq!(t.len(), 0x18);
        let data: Vec<u8> = (0..0x18).collect();
        t.write_at(0, &data).unwrap();
        let mut back = [0u8; 8];
        m.read_slice(&mut back, GuestAddress(0xff8)).unwrap();
        assert_eq!(back, [0, 1, 2, 3, 4, 5, 6, 7]);
        let mut back = [0u8; 0x10];
        m.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(back[0], 8);
        let mut mid = [0u8; 4];
        t.read_at(6, &mut mid).unwrap();
        assert_eq!(mid, [6, 7, 8, 9]);
        assert!(t.read_at(0x16, &mut mid).is_err(), "past the range");
    }

    #[test]
    fn translate_refuses_holes_overflow_and_ranges_past_the_segments() {
        let m = mem();
        let hole = [seg(0xff0, 0x20)];
        assert!(matches!(
            translate(&m, &hole, 0, 0x20, Permissions::Read),
            Err(ChainError::Memory(_))
        ));
        let top = [seg(u64::MAX - 4, 16)];
        assert!(matches!(
            translate(&m, &top, 0, 16, Permissions::Read),
            Err(ChainError::AddressOverflow { .. })
        ));
        let short = [seg(0, 8)];
        assert!(matches!(
            translate(&m, &short, 4, 5, Permissions::Read),
            Err(ChainError::OutOfChain { .. })
        ));
        assert!(matches!(
            translate(&m, &short, u64::MAX, 2, Permissions::Read),
            Err(ChainError::OutOfChain { .. })
        ));
        assert!(translate(&m, &short, 8, 0, Permissions::Read)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn last_writable_byte_skips_empty_segments_and_overflow() {
        let mut l = Layout::default();
        assert_eq!(l.last_writable_byte(), None);
        l.writable = vec![seg(0x100, 4), seg(0x900, 0)];
        assert_eq!(l.last_writable_byte(), Some(GuestAddress(0x103)));
        l.writable = vec![seg(u64::MAX, 2)];
        assert_eq!(l.last_writable_byte(), None);
        assert_eq!(l.writable_len(), 2);
    }
}
