//! virtio-rng, the entropy device (virtio spec §5.4): one queue of device-writable
//! buffers, each filled with bytes from the host's entropy source (`/dev/urandom`,
//! opened once when the device is built). No configuration space, no device features.
//!
//! The guest decides how many buffers and how large; the device bounds both the bytes
//! one request gets ([`MAX_REQUEST_BYTES`]) and the bytes one
//! [`process_queue`](VirtioDevice::process_queue) call hands out ([`MAX_BYTES_PER_CALL`]),
//! so a guest cannot keep the host reading entropy for it indefinitely.

use crate::chain::{self, Layout};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_contract::{
    DeviceError, DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, Permissions};

/// Virtio device type of the entropy device (§5.4.1).
pub const DEVICE_TYPE: u16 = VIRTIO_ID_RNG as u16;
/// Size of the one queue, `requestq` (§5.4.2).
pub const QUEUE_SIZE: u16 = 256;
/// PCI class code to put the device under: "other" (0xff), as QEMU's virtio-rng-pci.
pub const PCI_CLASS_CODE: u32 = 0xff_00_00;
/// Bytes one request gets at most. Linux's driver asks for 64 at a time; 64 KiB keeps
/// one request to one read of the source and one bounce buffer.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Bytes one `process_queue` call hands out in full. Once spent, each further chain
/// still gets the one byte §5.4.6.2 requires, so no chain is left waiting for a kick
/// that already came, and the call's work stays bounded: at most this plus one byte
/// per ring entry.
pub const MAX_BYTES_PER_CALL: usize = 1 << 20;
/// Descriptors one chain may have: as many as the ring has entries (an indirect table
/// could otherwise name 2^16).
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// The entropy source [`RngConfig::default`] names.
pub const DEFAULT_SOURCE: &str = "/dev/urandom";

/// Why the entropy device could not be built or could not read its source.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The entropy source cannot be opened.
    #[error("cannot open entropy source {}: {source}", path.display())]
    Open {
        /// The source's path.
        path: PathBuf,
        /// What the host said.
        source: std::io::Error,
    },
    /// Reading the entropy source failed.
    #[error("cannot read {len} bytes from entropy source {}: {source}", path.display())]
    Read {
        /// The source's path.
        path: PathBuf,
        /// Bytes asked for.
        len: usize,
        /// What the host said.
        source: std::io::Error,
    },
}

/// How to build an [`Rng`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngConfig {
    /// Where entropy comes from; [`DEFAULT_SOURCE`] unless the host keeps it elsewhere.
    pub source: PathBuf,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM`: the device sits behind an IOMMU and its
    /// memory is an `IommuMemory`.
    pub access_platform: bool,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            source: PathBuf::from(DEFAULT_SOURCE),
            access_platform: false,
        }
    }
}

/// The virtio entropy device.
pub struct Rng {
    source: File,
    path: PathBuf,
    access_platform: bool,
    acked: u64,
    bounce: Box<[u8]>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("source", &self.path)
            .field("access_platform", &self.access_platform)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl Rng {
    /// Opens the entropy source and builds the device.
    ///
    /// # Errors
    /// [`RngError::Open`] if the source cannot be opened for reading.
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        let source = File::open(&config.source).map_err(|source| RngError::Open {
            path: config.source.clone(),
            source,
        })?;
        Ok(Self {
            source,
            path: config.source.clone(),
            access_platform: config.access_platform,
            acked: 0,
            bounce: vec![0; MAX_REQUEST_BYTES].into_boxed_slice(),
        })
    }

    /// The entropy source's path.
    pub fn source(&self) -> &Path {
        &self.path
    }

    /// Features the driver accepted (0 before negotiation and after reset).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Fills one chain from the source; returns the used length. A chain the device
    /// cannot use (misshapen, no writable byte, a buffer the guest did not make
    /// reachable) is returned with used length 0.
    ///
    /// # Errors
    /// [`RngError::Read`] if the source fails; the chain was not written.
    fn fill<M: GuestMemory>(
        &mut self,
        chain: DescriptorChain<&M>,
        mem: &M,
        budget: &mut usize,
    ) -> Result<u32, RngError> {
        let Ok(layout) = Layout::walk(chain, MAX_DESCRIPTORS) else {
            return Ok(0);
        };
        // §5.4.6.2: one or more bytes, and the device MAY use less than the whole buffer.
        let len = layout
            .writable_len()
            .min(MAX_REQUEST_BYTES as u64)
            .min((*budget).max(1) as u64) as usize;
        if len == 0 {
            return Ok(0);
        }
        // Translate before reading: a denied buffer wastes no entropy.
        let Ok(dst) = chain::translate(mem, layout.writable(), 0, len as u64, Permissions::Write)
        else {
            return Ok(0);
        };
        let buf = &mut self.bounce[..len];
        self.source
            .read_exact(buf)
            .map_err(|source| RngError::Read {
                path: self.path.clone(),
                len,
                source,
            })?;
        if dst.write_at(0, buf).is_err() {
            return Ok(0);
        }
        *budget = budget.saturating_sub(len);
        // `len` ≤ MAX_REQUEST_BYTES.
        Ok(len as u32)
    }
}

impl DeviceIdentity for Rng {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        // EVENT_IDX: see the block device.
        let mut f = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.access_platform {
            f |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_size(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

impl<M: GuestMemory> VirtioDevice<M> for Rng {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Ok(false);
        }
        let mut budget = MAX_BYTES_PER_CALL;
        let mut used = false;
        // At most one ring's worth of chains per call: a driver has no more outstanding
        // at once, so any beyond were added during this call and came with their own
        // notification.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let filled = self.fill(chain, mem, &mut budget);
            let len = *filled.as_ref().unwrap_or(&0);
            queue
                .add_used(mem, head, len)
                .map_err(|source| DeviceError::Queue {
                    queue: index,
                    source,
                })?;
            used = true;
            // A source that fails will fail again: let the transport mark the device
            // as needing a reset rather than hand out zero-length buffers forever.
            filled.map_err(|e| DeviceError::backend("virtio-rng", e))?;
        }
        if !used {
            return Ok(false);
        }
        queue
            .needs_notification(mem)
            .map_err(|source| DeviceError::Queue {
                queue: index,
                source,
            })
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;

    #[test]
    fn default_config_reads_urandom_without_access_platform() {
        let c = RngConfig::default();
        assert_eq!(c.source, Path::new("/dev/urandom"));
        let rng = Rng::new(&c).unwrap();
        let f = <Rng as DeviceIdentity>::device_features(&rng);
        assert_eq!(
            f,
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
        );
    }
}
