//! A modern virtio-pci transport (virtio spec §4.1), kept apart from the devices and
//! from how accesses arrive.
//!
//! [`VirtioPciTransport`] owns a PCI function's 256-byte configuration space (type-0
//! header, the virtio vendor capabilities and an MSI-X capability) and its BAR 0 (common
//! configuration, ISR, device configuration, notifications). A VMM — or a vfio-user
//! device host, which receives the same accesses as socket messages — forwards config
//! and BAR accesses to it; the transport negotiates features, sets up queues, runs the
//! device-status state machine, and calls the device's `virtio_contract::VirtioDevice` methods. A
//! device sees only its queues and a `vm_memory::GuestMemory`: for a device behind an
//! IOMMU that memory is an `IommuMemory`, and the transport then requires
//! `VIRTIO_F_ACCESS_PLATFORM` so the driver cannot make it bypass translation.
//!
//! Interrupts go through the one-method [`InterruptSink`] with an MSI-X vector number.
//! The MSI-X table, PBA and masking belong to the VMM, as in QEMU's vfio-pci core, which
//! emulates them for vfio-user devices; their space is reserved in BAR 0 and reads as
//! zero here. INTx is not offered.

#![deny(missing_docs)]

mod config_space;
mod transport;

pub use config_space::{Bar0Layout, PciIds, BAR0_SIZE};
pub use transport::{
    device_status, InterruptSink, TransportCounters, TransportError, VirtioPciTransport,
};
