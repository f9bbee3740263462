//! What the back-end is given of guest memory: the memory table, all of guest RAM or
//! (pool mode) only the restricted DMA pool.

use super::{wire, VhostUserError, UADDR_BASE};
use crate::host::EndpointMemory;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use virtio_contract::ActiveQueue;
use virtio_queue::QueueT;
use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory the front-end shares: the guest-physical map under either memory type
/// a function can have.
pub trait PhysicalMemory: GuestMemory {
    /// The guest-physical map (the VMM's DMA regions).
    fn physical(&self) -> &GuestMemoryMmap;
}

impl PhysicalMemory for GuestMemoryMmap {
    fn physical(&self) -> &GuestMemoryMmap {
        self
    }
}

impl PhysicalMemory for EndpointMemory {
    fn physical(&self) -> &GuestMemoryMmap {
        self.get_backend()
    }
}

/// Pool mode: the one guest-physical range given to the back-end, `[first, last]`
/// (page-granular, see [`VhostUserDevice::share_only`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SharedRange {
    pub(super) first: u64,
    pub(super) last: u64,
}

impl std::fmt::Display for SharedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest-physical {:#x}..={:#x}", self.first, self.last)
    }
}

impl SharedRange {
    /// The part of `[gpa, gpa + size)` inside the range, as (start, size).
    pub(super) fn clip(&self, gpa: u64, size: u64) -> Option<(u64, u64)> {
        let last = gpa.checked_add(size.checked_sub(1)?)?;
        let (a, b) = (gpa.max(self.first), last.min(self.last));
        (a <= b).then(|| (a, b - a + 1))
    }

    /// Whether all of `[addr, addr + len)` (`len` > 0) is inside the range.
    pub(super) fn holds(&self, addr: u64, len: u64) -> bool {
        addr >= self.first
            && len
                .checked_sub(1)
                .and_then(|l| addr.checked_add(l))
                .is_some_and(|e| e <= self.last)
    }

    /// Refuses rings outside the range: the back-end could not reach them, and the
    /// guest would be waiting on a device that never runs.
    pub(super) fn check_rings(&self, queues: &[ActiveQueue<'_>]) -> Result<(), VhostUserError> {
        for q in queues {
            let n = u64::from(q.queue.size());
            // Virtio 1.2 §2.7: descriptor table 16·n, used ring 6 + 8·n, available
            // ring 6 + 2·n bytes.
            for (what, addr, len) in [
                ("descriptor table", q.queue.desc_table(), 16 * n),
                ("used ring", q.queue.used_ring(), 6 + 8 * n),
                ("available ring", q.queue.avail_ring(), 6 + 2 * n),
            ] {
                if !self.holds(addr, len) {
                    return Err(VhostUserError::PoolMode(format!(
                        "queue {}: the {what} at {addr:#x} ({len} bytes) lies outside {self}, \
                         the only memory the back-end is given (the driver must allocate its \
                         rings from the pool)",
                        q.index
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The memory table of `mem`: every region with a file, adjacent pieces of one file
/// merged (QEMU hands RAM over in pieces around holes), at most
/// [`wire::MAX_REGIONS`]. In pool mode (`share`) only the parts of regions inside
/// the shared range, and only if each file sent holds nothing but them.
pub(super) fn mem_table(
    mem: &GuestMemoryMmap,
    share: Option<SharedRange>,
) -> Result<(Vec<wire::MemoryRegion>, Vec<Arc<File>>), VhostUserError> {
    let mut regions: Vec<(wire::MemoryRegion, Arc<File>, (u64, u64))> = Vec::new();
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let (gpa, size) = match share {
            None => (r.start_addr().0, r.len()),
            Some(s) => match s.clip(r.start_addr().0, r.len()) {
                Some(piece) => piece,
                None => continue,
            },
        };
        // The clipped piece starts `gpa - start` bytes into the region, and so into
        // its file (vm-memory checked that the region's file range does not overflow).
        let Some(offset) = fo.start().checked_add(gpa - r.start_addr().0) else {
            continue;
        };
        let file = Arc::clone(fo.arc());
        let id = file
            .metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| VhostUserError::Guest(format!("guest RAM file: {e}")))?;
        if let Some((last, _, last_id)) = regions.last_mut() {
            if *last_id == id
                && last.guest_phys_addr + last.memory_size == gpa
                && last.mmap_offset + last.memory_size == offset
            {
                last.memory_size += size;
                continue;
            }
        }
        regions.push((
            wire::MemoryRegion {
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: UADDR_BASE + gpa,
                mmap_offset: offset,
            },
            file,
            id,
        ));
    }
    if regions.is_empty() {
        return Err(match share {
            Some(s) => VhostUserError::PoolMode(format!(
                "no file-backed guest RAM lies in {s}, the only memory the back-end may be given"
            )),
            None => VhostUserError::Guest("no shareable guest RAM (the VMM mapped none)".into()),
        });
    }
    if let Some(s) = share {
        // A descriptor gives the back-end the whole file, whatever the table says: each
        // file sent must be exactly the bytes of one region inside the range.
        for (r, file, _) in &regions {
            let meta = file
                .metadata()
                .map_err(|e| VhostUserError::PoolMode(format!("guest RAM file: {e}")))?;
            let first = r.guest_phys_addr;
            let last = first + (r.memory_size - 1);
            if !meta.is_file() || r.mmap_offset != 0 || r.memory_size != meta.len() {
                return Err(VhostUserError::PoolMode(format!(
                    "{first:#x}..={last:#x} of {s} is bytes {:#x}..+{:#x} of a memory file of \
                     {:#x} bytes, so its descriptor would hand the back-end guest memory \
                     outside the shared range too; the shared range needs its own memory \
                     file (as bounce_pool::SplitRam builds guest RAM)",
                    r.mmap_offset,
                    r.memory_size,
                    meta.len()
                )));
            }
        }
    }
    if regions.len() > wire::MAX_REGIONS {
        return Err(VhostUserError::Guest(format!(
            "guest RAM is in {} pieces; SET_MEM_TABLE carries at most {}",
            regions.len(),
            wire::MAX_REGIONS
        )));
    }
    Ok(regions.into_iter().map(|(r, f, _)| (r, f)).unzip())
}
