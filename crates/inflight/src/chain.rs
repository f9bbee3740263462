//! Reading a guest's descriptor chain once, into private memory, with every check the
//! virtio spec puts on a driver (v1.3 §2.7.5 "The Virtqueue Descriptor Table",
//! §2.7.5.3 "Indirect Descriptors"). virtio-queue's `DescriptorChain` re-reads the
//! table as it iterates and ends a malformed chain silently; a shadow must neither.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VIRTQ_DESC_F_NEXT`.
pub(crate) const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub(crate) const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub(crate) const F_INDIRECT: u16 = 4;
/// Bytes per descriptor.
pub(crate) const DESC_SIZE: u64 = 16;

/// Most descriptors one chain may have, indirect tables included (Linux never builds
/// more than a queue's size; QEMU's `VIRTQUEUE_MAX_SIZE` is 1024).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// One buffer of a chain, as read once from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Why a chain is refused. Nothing of it is granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index outside the descriptor table.
    #[error("descriptor index {index} is outside a table of {size}")]
    Index {
        /// The index.
        index: u64,
        /// The table's size.
        size: u64,
    },
    /// The chain visits more descriptors than its table has: a loop.
    #[error("the chain loops (more than {0} descriptors)")]
    Loop(u64),
    /// An indirect descriptor inside an indirect table (§2.7.5.3.1: MUST NOT).
    #[error("nested indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has NEXT set (§2.7.5.3.1: MUST NOT).
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    /// An indirect table whose length is zero or not a multiple of 16.
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    IndirectLength(u32),
    /// A device-readable descriptor after a device-writable one (§2.7.4.2).
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// A buffer, or an indirect table, whose end wraps the address space.
    #[error("buffer at {addr:#x} of {len} bytes wraps the address space")]
    Overflow {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// More descriptors, or more bytes, than a request may have.
    #[error("the chain is longer than {MAX_CHAIN_DESCRIPTORS} descriptors or 2^32 bytes")]
    TooLong,
    /// The table could not be read.
    #[error("descriptor at {0:#x} is outside guest memory")]
    Unreadable(u64),
}

fn read_desc<M: GuestMemory>(mem: &M, at: u64) -> Result<(u64, u32, u16, u16), ChainError> {
    let mut raw = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut raw, GuestAddress(at))
        .map_err(|_| ChainError::Unreadable(at))?;
    let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap_or([0; 4]));
    let u16_at = |o: usize| u16::from_le_bytes(raw[o..o + 2].try_into().unwrap_or([0; 2]));
    Ok((u64_at(0), u32_at(8), u16_at(12), u16_at(14)))
}

/// Reads the chain at `head` of the descriptor table at `table` (`size` entries), once,
/// and checks it. An empty chain (every buffer of length 0) is allowed.
///
/// # Errors
/// [`ChainError`]: the chain is malformed.
pub fn collect_chain<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Desc>, ChainError> {
    let mut out: Vec<Desc> = Vec::new();
    let mut total: u64 = 0;
    let mut push = |out: &mut Vec<Desc>, addr: u64, len: u32, flags: u16| {
        if len > 0 && addr.checked_add(u64::from(len) - 1).is_none() {
            return Err(ChainError::Overflow { addr, len });
        }
        let write = flags & F_WRITE != 0;
        if !write && out.last().is_some_and(|d| d.write) {
            return Err(ChainError::ReadableAfterWritable);
        }
        total += u64::from(len);
        if out.len() >= MAX_CHAIN_DESCRIPTORS || total > u64::from(u32::MAX) {
            return Err(ChainError::TooLong);
        }
        out.push(Desc { addr, len, write });
        Ok(())
    };
    let size64 = u64::from(size);
    let mut index = u64::from(head);
    let mut visited = 0u64;
    loop {
        if index >= size64 {
            return Err(ChainError::Index {
                index,
                size: size64,
            });
        }
        visited += 1;
        if visited > size64 {
            return Err(ChainError::Loop(size64));
        }
        let (addr, len, flags, next) = read_desc(mem, table.0 + index * DESC_SIZE)?;
        if flags & F_INDIRECT != 0 {
            if flags & F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            if len == 0 || u64::from(len) % DESC_SIZE != 0 {
                return Err(ChainError::IndirectLength(len));
            }
            if addr.checked_add(u64::from(len) - 1).is_none() {
                return Err(ChainError::Overflow { addr, len });
            }
            let n = u64::from(len) / DESC_SIZE;
            if n > MAX_CHAIN_DESCRIPTORS as u64 {
                return Err(ChainError::TooLong);
            }
            let mut i = 0u64;
            let mut seen = 0u64;
            loop {
                seen += 1;
                if seen > n {
                    return Err(ChainError::Loop(n));
                }
                let (a, l, f, nx) = read_desc(mem, addr + i * DESC_SIZE)?;
                if f & F_INDIRECT != 0 {
                    return Err(ChainError::NestedIndirect);
                }
                push(&mut out, a, l, f)?;
                if f & F_NEXT == 0 {
                    break;
                }
                i = u64::from(nx);
                if i >= n {
                    return Err(ChainError::Index { index: i, size: n });
                }
            }
            // §2.7.5.3.1: the indirect descriptor is the chain's only one.
            return Ok(out);
        }
        push(&mut out, addr, len, flags)?;
        if flags & F_NEXT == 0 {
            return Ok(out);
        }
        index = u64::from(next);
    }
}
