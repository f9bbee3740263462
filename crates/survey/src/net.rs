//! A stand-in for a virtio-net transmit queue: Aperture has no virtio-net backend, so
//! the network patterns are served by this sink, which does what a TX backend does
//! with guest memory and nothing more — read the 12-byte `virtio_net_hdr_v1` and the
//! packet from the chain's readable buffers (into its own buffer, as a backend copies
//! a frame to a tap device) and return the chain with used length 0.

use virtio_contract::{
    DeviceError, DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};

/// The sink as a vhost-user device kind, for the front-end: a virtio-net transmit
/// queue alone (device type 1, PCI class network). Not a whole virtio-net device (no
/// receive queue), so no guest driver binds it.
pub const DEVICE_KIND: device_host::vhost_user::DeviceKind =
    device_host::vhost_user::DeviceKind::Other {
        device_type: 1,
        class_code: 0x02_00_00,
    };

/// `sizeof(struct virtio_net_hdr_v1)`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame the sink takes (a 1500-byte MTU frame and its Ethernet header).
pub const MAX_FRAME: usize = 1514;
const QUEUE: u16 = 256;

/// The transmit sink.
#[derive(Debug)]
pub struct NetTx {
    frame: Vec<u8>,
    /// Frames taken.
    pub frames: u64,
    /// Chains refused (unreadable, or larger than a frame).
    pub errors: u64,
}

impl Default for NetTx {
    fn default() -> Self {
        Self {
            frame: vec![0; NET_HDR_LEN + MAX_FRAME],
            frames: 0,
            errors: 0,
        }
    }
}

impl DeviceIdentity for NetTx {
    fn device_type(&self) -> u16 {
        1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE]
    }

    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM)
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn config_size(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

impl<M: GuestMemory> VirtioDevice<M> for NetTx {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        let mut any = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut at = 0usize;
            let mut ok = true;
            for d in chain {
                let len = d.len() as usize;
                if d.is_write_only() || at + len > self.frame.len() {
                    ok = false;
                    break;
                }
                if mem
                    .read_slice(&mut self.frame[at..at + len], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
                at += len;
            }
            if ok && at >= NET_HDR_LEN {
                self.frames += 1;
            } else {
                self.errors += 1;
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|source| DeviceError::Queue {
                    queue: index,
                    source,
                })?;
            any = true;
        }
        Ok(any)
    }

    fn reset(&mut self) {}
}
