//! Aperture's `pool` sharing mode: a restricted DMA pool (device-tree
//! `restricted-dma-pool`, Linux swiotlb) — one static guest-physical region that is the
//! only memory a device backend may reach, with the guest bouncing every buffer through
//! it.
//!
//! The crate has both sides of the mode:
//!
//! - [`slots`]: swiotlb's slot allocator with Linux's exact geometry and rules (2 KiB
//!   slots, 128-slot segments, 256 KiB largest mapping, `min_align_mask`, page
//!   alignment, segment boundaries, several areas each under its own lock). Pure: it
//!   hands out slot indices and never touches memory.
//! - [`pool`]: [`BouncePool`], the allocator placed at a guest-physical range of a
//!   `vm_memory::GuestMemory`, with swiotlb's map / sync / unmap copies and coherent
//!   allocations, used by the guest side.
//! - [`dma`]: [`GuestDma`], the DMA API a fake guest driver calls (map, unmap, syncs,
//!   coherent allocations), checking its own calls as Linux's `CONFIG_DMA_API_DEBUG`.
//! - [`iommu`]: [`PoolIommu`], the device side: a `vm_memory::Iommu` that translates
//!   exactly the pool's range (identity) and faults everything else, so a backend
//!   written against `GuestMemory` runs unchanged through `vm_memory::IommuMemory`.
//! - [`ram`]: [`SplitRam`], guest RAM whose pool is its own memfd, so a backend in
//!   another process can be handed the pool's file and nothing else, and
//!   [`map_pool_file`], that backend's pool-only guest memory.
//! - [`dt`]: the `restricted-dma-pool` reserved-memory node for a DT guest, and the
//!   rules Linux applies when it builds a pool from one and attaches devices.
//!
//! The facts followed are Linux's: `kernel/dma/swiotlb.c`, `include/linux/swiotlb.h`,
//! `Documentation/core-api/swiotlb.rst`, and for the device tree `drivers/of/device.c`
//! and `Documentation/devicetree/bindings/reserved-memory/shared-dma-pool.yaml`.

#![deny(missing_docs)]

pub mod dma;
pub mod dt;
pub mod iommu;
pub mod pool;
pub mod ram;
pub mod slots;

pub use dma::{DmaError, GuestDma};
pub use dt::{DeviceNode, DtError, ReservedMemoryNode};
pub use iommu::{PoolIommu, PoolIommuError};
pub use pool::{BouncePool, PoolConfig, PoolError};
pub use ram::{map_pool_file, RamError, SplitRam};
pub use slots::{DeviceDma, PoolStats, SlotError, SlotIndex};

/// `IO_TLB_SHIFT`: log2 of the slot size.
pub const IO_TLB_SHIFT: u32 = 11;
/// `IO_TLB_SIZE`: bytes per slot (2 KiB).
pub const IO_TLB_SIZE: u64 = 1 << IO_TLB_SHIFT;
/// `IO_TLB_SEGSIZE`: slots per segment ("slot set"); no allocation crosses one.
pub const IO_TLB_SEGSIZE: usize = 128;
/// Bytes per segment (256 KiB): a pool is a whole number of them.
pub const SEGMENT_BYTES: u64 = IO_TLB_SIZE * IO_TLB_SEGSIZE as u64;
/// The largest mapping without a `min_align_mask` (256 KiB, one whole segment).
pub const MAX_MAPPING_SIZE: usize = SEGMENT_BYTES as usize;
/// The guest page size swiotlb aligns to (x86 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;

pub use dma_types::{DmaAddr, DmaDirection, Gpa};

/// Attributes of an unmap (`DMA_ATTR_*` that swiotlb looks at).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    /// `DMA_ATTR_SKIP_CPU_SYNC`: release the slots without copying back.
    pub skip_cpu_sync: bool,
}

impl Attrs {
    /// No attributes.
    pub const NONE: Self = Self {
        skip_cpu_sync: false,
    };
    /// `DMA_ATTR_SKIP_CPU_SYNC`.
    pub const SKIP_CPU_SYNC: Self = Self {
        skip_cpu_sync: true,
    };
}
