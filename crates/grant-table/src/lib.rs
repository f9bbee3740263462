//! Aperture's `grant` sharing mode: Xen grant tables, in-process. A guest hands a
//! backend domain individual pages by writing grant entries into its own frames; the
//! backend can map or copy only what was granted to it, read-only where granted so, and
//! a page still mapped cannot be taken back.
//!
//! The crate has both sides of the mode and the hypervisor between them:
//!
//! - [`abi`]: the ABI of `xen/include/public/grant_table.h` — v1 entries (8 bytes), v2
//!   entries (16 bytes) and status words, `GTF_*`, `GNTMAP_*`, `GNTCOPY_*`, `GNTST_*`,
//!   sizing constants.
//! - [`xen`]: [`Xen`], the hypervisor's grant-table model: domains, each with its grant
//!   table living in guest frames it set up (`setup_table`), Xen's private active entries
//!   (the four 8-bit pin counts) and maptrack handles; `map_grant_ref`,
//!   `unmap_grant_ref`, `copy`, `query_size`, `set_version`, `get_status_frames`, batched
//!   with a `GNTST_*` status per operation and exactly the checks of
//!   `xen/common/grant_table.c`; domain death.
//! - [`guest`]: [`GuestGrants`], the guest kernel's grant code (Linux
//!   `drivers/xen/grant-table.c`): grant (publish order domid and frame, barrier, then
//!   flags), end access by compare-and-swap (v1) or clear-fence-check (v2), sub-page and
//!   transitive grants, and deferred reclaim of pages the backend still holds.
//! - [`dma`]: [`GrantDma`], the guest's DMA API (Linux `drivers/xen/grant-dma-ops.c`):
//!   grant DMA addresses `1 << 63 | gref << 12 | offset` with consecutive refs, read-only
//!   grants for device-bound data, a "broken" device when a grant cannot be revoked, and
//!   a persistent-grants option (grant once, reuse, as Xen blkfront does).
//! - [`iommu`]: [`GrantIommu`], the device side: a `vm_memory::Iommu` for one backend
//!   domain that translates grant DMA addresses through [`Xen`]'s map or copy
//!   operations, so a backend written against `vm_memory::GuestMemory` runs unchanged
//!   behind `vm_memory::IommuMemory`.
//!
//! The facts followed are Xen's (`xen/include/public/grant_table.h`,
//! `xen/common/grant_table.c`, `docs/misc/grant-tables.txt`) and Linux's
//! (`drivers/xen/grant-table.c`, `drivers/xen/grant-dma-ops.c`).
//!
//! # Example
//!
//! A guest grants a page read-only to backend domain 1; the backend maps it read-only,
//! is refused a writable mapping, and the guest cannot revoke the grant until the
//! backend unmaps.
//!
//! ```
//! use grant_table::abi::{GrantStatus, GNTMAP_HOST_MAP, GNTMAP_READONLY};
//! use grant_table::xen::{Caller, DomainConfig, MapGrantRef, UnmapGrantRef};
//! use grant_table::{DomId, Gfn, GuestGrants, Mem, TableSetup, Xen};
//! use std::sync::Arc;
//! use vm_memory::GuestAddress;
//!
//! let xen = Arc::new(Xen::new());
//! let (guest, backend) = (DomId(5), DomId(1));
//! let ram = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! xen.create_domain(guest, ram.clone(), DomainConfig::default()).unwrap();
//! let backend_ram = Mem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
//! xen.create_domain(backend, backend_ram, DomainConfig::default()).unwrap();
//!
//! // The guest puts its grant table in frame 0x10 and grants frame 0x20 read-only.
//! let grants = GuestGrants::new(xen.clone(), guest, ram, TableSetup::v1(vec![Gfn(0x10)])).unwrap();
//! let gref = grants.grant_foreign_access(backend, Gfn(0x20), true).unwrap();
//!
//! let caller = Caller::new(backend);
//! let mut ops = [
//!     MapGrantRef::new(guest, gref, GNTMAP_HOST_MAP | GNTMAP_READONLY, 0x1000),
//!     MapGrantRef::new(guest, gref, GNTMAP_HOST_MAP, 0x2000),
//! ];
//! xen.map_grant_ref(caller, &mut ops);
//! assert_eq!(ops[0].status, GrantStatus::Okay);
//! assert_eq!(ops[1].status, GrantStatus::GeneralError); // write-pin of a r/o grant
//!
//! assert!(!grants.try_end_foreign_access(gref)); // still mapped: busy
//! let mut unmap = [UnmapGrantRef::new(ops[0].handle, 0x1000, 0)];
//! xen.unmap_grant_ref(caller, &mut unmap);
//! assert_eq!(unmap[0].status, GrantStatus::Okay);
//! assert!(grants.try_end_foreign_access(gref)); // now revoked
//! ```

#![deny(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("grant entries are little-endian and Xen reads {flags, domid} as one u32");

pub mod abi;
pub mod dma;
pub mod guest;
pub mod iommu;
mod mem;
pub mod xen;

pub use abi::GrantStatus;
pub use dma::{DmaDirection, DmaError, GrantDma, PersistentConfig};
pub use guest::{EndAccess, GuestError, GuestGrants, ReclaimCounters, TableSetup};
pub use iommu::{GrantIommu, GrantIommuError, IommuMode, IommuStats};
pub use xen::{Caller, DomainConfig, GrantError, Xen};

use std::fmt;

/// The guest memory type every domain's RAM is (vm-memory's mmap backend).
pub type Mem = vm_memory::GuestMemoryMmap<()>;

pub use dma_types::{DomId, Gpa};

/// A grant reference (`grant_ref_t`): an index into a granting domain's table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantRef(pub u32);

/// A maptrack handle (`grant_handle_t`) returned by a map, used to unmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantHandle(pub u32);

/// A guest frame number: a guest-physical address shifted right by 12.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gfn(pub u64);

/// A grant DMA address as a grant-aware guest hands it to a device:
/// `1 << 63 | gref << 12 | offset` (Linux `grant_to_dma` in `drivers/xen/grant-dma-ops.c`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantDmaAddr(pub u64);

/// `XEN_GRANT_DMA_ADDR_OFF`: bit 63 marks a grant DMA address.
pub const GRANT_DMA_ADDR_OFF: u64 = 1 << 63;

impl GrantDmaAddr {
    /// The address of byte `offset` (below 4096) of the page granted by `gref`.
    pub fn new(gref: GrantRef, offset: u16) -> Self {
        Self(
            GRANT_DMA_ADDR_OFF | (u64::from(gref.0) << abi::PAGE_SHIFT) | u64::from(offset & 0xfff),
        )
    }

    /// Splits an address into (grant ref, offset in page), or `None` when bit 63 is
    /// clear or the ref does not fit a `grant_ref_t` (Linux `dma_to_grant`).
    pub fn decode(addr: u64) -> Option<(GrantRef, u16)> {
        if addr & GRANT_DMA_ADDR_OFF == 0 {
            return None;
        }
        let gref = u32::try_from((addr & !GRANT_DMA_ADDR_OFF) >> abi::PAGE_SHIFT).ok()?;
        Some((GrantRef(gref), (addr & (abi::PAGE_SIZE - 1)) as u16))
    }
}

impl Gfn {
    /// The guest-physical address of the frame, or `None` past 2^64.
    pub fn gpa(self) -> Option<Gpa> {
        self.0.checked_mul(abi::PAGE_SIZE).map(Gpa)
    }
}

impl fmt::Display for GrantRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gref {:#x}", self.0)
    }
}

impl fmt::Display for GrantHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handle {:#x}", self.0)
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GFN {:#x}", self.0)
    }
}

impl fmt::Display for GrantDmaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grant DMA address {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_dma_address_is_bit63_gref_shift12_offset() {
        let a = GrantDmaAddr::new(GrantRef(0x1234), 0x56);
        assert_eq!(a.0, 0x8000_0000_0123_4056);
        assert_eq!(GrantDmaAddr::decode(a.0), Some((GrantRef(0x1234), 0x56)));
        assert_eq!(GrantDmaAddr::decode(0x1234_5000), None, "bit 63 clear");
        assert_eq!(
            GrantDmaAddr::decode(GRANT_DMA_ADDR_OFF | (1 << 50)),
            None,
            "ref beyond grant_ref_t"
        );
    }
}
