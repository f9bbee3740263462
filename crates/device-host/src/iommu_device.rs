//! The virtio-iommu as a virtio-pci device: [`IommuPciDevice`] adapts
//! `virtio_iommu::VirtioIommu` to `virtio_contract::VirtioDevice`. The IOMMU itself reaches
//! guest memory by guest-physical address (its queues are never translated).

use virtio_contract::{DeviceError, DeviceIdentity, VirtioDevice};
use virtio_iommu::VirtioIommu;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Requestq and eventq sizes (QEMU uses 256 for both).
const QUEUE_SIZES: [u16; 2] = [256, 256];

/// A virtio-iommu on the virtio-pci transport.
#[derive(Debug)]
pub struct IommuPciDevice {
    /// The device model.
    pub iommu: VirtioIommu,
    /// Config-space writes the device refused (the driver broke DRV-CFG-1/2).
    pub refused_config_writes: u64,
}

impl IommuPciDevice {
    /// Wraps a device model.
    pub fn new(iommu: VirtioIommu) -> Self {
        Self {
            iommu,
            refused_config_writes: 0,
        }
    }
}

impl DeviceIdentity for IommuPciDevice {
    fn device_type(&self) -> u16 {
        virtio_iommu::wire::VIRTIO_ID_IOMMU as u16
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.iommu.device_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.iommu.set_acked_features(features);
    }

    fn config_size(&self) -> u64 {
        size_of::<virtio_iommu::wire::Config>() as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The transport only forwards accesses inside config_size().
        if self.iommu.read_config(offset, data).is_err() {
            data.fill(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.iommu.write_config(offset, data).is_err() {
            self.refused_config_writes += 1;
        }
    }
}

impl VirtioDevice<GuestMemoryMmap> for IommuPciDevice {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let r = match index {
            0 => self.iommu.process_requestq(queue, mem),
            1 => self.iommu.process_eventq(queue, mem),
            _ => return Ok(false),
        };
        r.map_err(|e| DeviceError::backend("virtio-iommu", e))
    }

    /// The request queue is polled; the event queue's buffers wait for faults.
    fn polled(&self, index: usize) -> bool {
        index == 0
    }

    fn reset(&mut self) {
        self.iommu.reset();
    }
}
