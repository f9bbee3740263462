//! Virtio device backends for Aperture: an entropy device ([`Rng`], virtio spec §5.4)
//! and a block device on a raw image file ([`Block`], §5.2).
//!
//! Both implement [`virtio_contract::VirtioDevice`] for any `M: vm_memory::GuestMemory`, so
//! the same code runs on plain guest memory (`GuestMemoryMmap`) or on an
//! `IommuMemory` whose every access an IOMMU such as `virtio_iommu::VirtioIommu`
//! translates and may deny. A denied access fails the one request it belongs to
//! (`VIRTIO_BLK_S_IOERR`, or used length 0 when not even the status byte is reachable);
//! it never panics and never stops the queue.
//!
//! Layers, as elsewhere in Aperture:
//!
//! - [`chain`]: a descriptor chain walked once into readable and writable segments,
//!   and translation of a byte range of them into host slices — the only place guest
//!   buffers are reached;
//! - [`block::request`]: the virtio-blk header decoded and validated against the disk,
//!   pure;
//! - [`block`] and [`rng`]: the queue shells that move bytes between the file or the
//!   entropy source and the translated buffers.

#![deny(missing_docs)]

pub mod block;
pub mod chain;
pub mod rng;

pub use block::{Block, BlockConfig, BlockCounters, BlockError};
pub use rng::{Rng, RngConfig, RngError};
