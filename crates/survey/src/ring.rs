//! The guest side of one split virtqueue: what Linux's `virtio_ring` does for a driver
//! that posts one chain at a time and waits for it — descriptors, the available ring
//! and reading the used ring — over any DMA addresses the mode hands out.
//!
//! The ring lives at a guest-physical address the driver writes; the device is told a
//! possibly different *device* address for it (an IOVA, a pool address, a grant
//! address), which is what its `Queue` is programmed with.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Entries in the ring.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes the ring occupies: descriptor table, available ring, used ring, each in its
/// own 4 KiB page.
pub const RING_BYTES: usize = 3 * 4096;
const AVAIL: u64 = 4096;
/// Offset of the used ring in the ring's memory.
pub(crate) const USED: u64 = 8192;

/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const F_WRITE: u16 = 2;

/// Why the driver's side of the ring failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The ring's memory cannot be written or read at `addr` (guest-physical).
    #[error("ring at {addr:#x}: {source}")]
    Memory {
        /// The guest-physical address accessed.
        addr: u64,
        /// What guest memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// The device's queue refused its size.
    #[error("the device's queue: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// A chain of no buffers, or of more than the ring has entries.
    #[error("a chain of {len} buffers")]
    ChainLength {
        /// Buffers in the chain.
        len: usize,
    },
    /// The device returned more chains than were posted.
    #[error("used index {used} ran past the available index {avail}")]
    UsedPastAvail {
        /// The device's used index.
        used: u16,
        /// The driver's available index.
        avail: u16,
    },
}

/// [`RingError::Memory`] at `addr`.
fn at(addr: u64) -> impl FnOnce(GuestMemoryError) -> RingError {
    move |source| RingError::Memory { addr, source }
}

/// One buffer of a chain, as the device addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Device address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

/// A driver's view of a split ring.
#[derive(Debug)]
pub struct GuestRing {
    gpa: u64,
    avail_idx: u16,
    used_idx: u16,
}

impl GuestRing {
    /// A ring whose memory the driver reaches at `gpa` (zeroed here).
    ///
    /// # Errors
    /// The ring does not lie in `mem`.
    pub fn new(mem: &GuestMemoryMmap, gpa: u64) -> Result<Self, RingError> {
        mem.write_slice(&[0u8; RING_BYTES], GuestAddress(gpa))
            .map_err(at(gpa))?;
        Ok(Self {
            gpa,
            avail_idx: 0,
            used_idx: 0,
        })
    }

    /// The device's queue, programmed with the ring's device address `dev_addr`.
    ///
    /// # Errors
    /// The queue rejects the size (cannot happen for [`QUEUE_SIZE`]).
    pub fn device_queue(dev_addr: u64) -> Result<Queue, RingError> {
        let mut q = Queue::new(QUEUE_SIZE).map_err(RingError::Queue)?;
        q.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(dev_addr);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(dev_addr + AVAIL);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(dev_addr + USED);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        Ok(q)
    }

    /// Writes `bufs` as one chain starting at descriptor 0 and makes it available.
    ///
    /// # Errors
    /// More buffers than the ring has entries, or a write outside `mem`.
    pub fn post(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<(), RingError> {
        if bufs.is_empty() || bufs.len() > usize::from(QUEUE_SIZE) {
            return Err(RingError::ChainLength { len: bufs.len() });
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            let flags = if b.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            let next = if last { 0 } else { i as u16 + 1 };
            d[14..16].copy_from_slice(&next.to_le_bytes());
            let addr = self.gpa + 16 * i as u64;
            mem.write_slice(&d, GuestAddress(addr)).map_err(at(addr))?;
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        let entry = self.gpa + AVAIL + 4 + 2 * slot;
        mem.write_obj(0u16.to_le(), GuestAddress(entry))
            .map_err(at(entry))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = self.gpa + AVAIL + 2;
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(idx))
            .map_err(at(idx))
    }

    /// The used length of the chain the device returned, if it returned one.
    ///
    /// # Errors
    /// A read outside `mem`, or the device returning more chains than were posted.
    pub fn reap(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u32>, RingError> {
        let used = self.gpa + USED + 2;
        let idx = u16::from_le(mem.read_obj(GuestAddress(used)).map_err(at(used))?);
        if idx == self.used_idx {
            return Ok(None);
        }
        if idx.wrapping_sub(self.used_idx) > self.avail_idx.wrapping_sub(self.used_idx) {
            return Err(RingError::UsedPastAvail {
                used: idx,
                avail: self.avail_idx,
            });
        }
        let slot = u64::from(self.used_idx % QUEUE_SIZE);
        let elem = self.gpa + USED + 4 + 8 * slot + 4;
        let len: u32 = mem.read_obj(GuestAddress(elem)).map_err(at(elem))?;
        self.used_idx = self.used_idx.wrapping_add(1);
        Ok(Some(u32::from_le(len)))
    }
}
