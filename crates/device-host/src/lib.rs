//! Aperture's device host: serves virtio-pci devices — our virtio-iommu and the
//! endpoints behind it — to a VMM over vfio-user, one socket per PCI function.
//!
//! The VMM (QEMU ≥ 10.1 with `vfio-user-pci`) provides CPUs, RAM and the PCI platform.
//! It hands each function guest RAM as shared-memfd `DMA_MAP`s ([`dma`]) and forwards
//! config and BAR accesses ([`vfio`]) to the function's `virtio_pci` transport. The
//! endpoints' memory is an `IommuMemory` over the virtio-iommu's per-endpoint
//! translation, so they reach only what the guest mapped; all devices share this
//! process, which is how the IOMMU's translations reach them. A VIOT table ([`viot`]),
//! passed to QEMU with `-acpitable`, tells the guest which device translates for which.
//! A device may also run in another process: [`vhost_user`] is the vhost-user front-end,
//! with the IOTLB protocol when that device sits behind the virtio-iommu. One
//! [`poll`] thread serves every in-process queue while the guest is busy, so a busy
//! driver need not notify at all.

#![deny(missing_docs)]

pub mod dma;
pub mod endpoints;
pub mod host;
pub mod iommu_device;
pub mod poll;
pub mod vfio;
pub mod vhost_user;
pub mod viot;
