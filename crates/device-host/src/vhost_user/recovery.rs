//! When the back-end is gone: the front-end completes what it left (see the module
//! docs of [`super`]).

use super::device::VhostUserDevice;
use super::DeviceKind;
use dma_types::lock;
use std::sync::atomic::Ordering;
use virtio_contract::failed_request_status;
use virtio_contract::VIRTIO_MSI_NO_VECTOR;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

impl VhostUserDevice {
    /// Once the connection is broken, completes every request the back-end was given
    /// and did not complete: on each started ring, each chain between the used index
    /// and the available index gets a used element (virtio-blk: `VIRTIO_BLK_S_IOERR`
    /// written to the chain's status byte, its last device-writable byte, length 1;
    /// virtio-rng: length 0), then the queue's interrupt is raised. Memory is reached
    /// through `mem`, the function's memory, so behind the IOMMU every ring and status
    /// address is an IOVA translated with the access it needs.
    ///
    /// With implicit grants the chains the back-end held are the shadow's: they fail
    /// first ([`inflight::CopyShadow::fail_all`]: no byte of the back-end's is copied
    /// back), then the walk fails the rest, which the shadow never took.
    ///
    /// Does nothing while the connection is up: only a back-end already cut off
    /// (`Shared::break_link` closes its sockets before marking the device broken)
    /// leaves the rings to us. At most one ring's worth of chains per queue; a ring
    /// whose indices say more are pending than it holds, or that cannot be read, is
    /// left alone. Callers serialize through the transport's lock. Returns the number
    /// of requests completed.
    pub fn fail_pending<M: GuestMemory>(&self, mem: &M) -> usize {
        if !self.shared.broken.load(Ordering::Acquire) {
            return 0;
        }
        let mut total = 0;
        let mut inflight = lock(&self.shared.inflight);
        for (index, state) in self.rings.iter().enumerate() {
            let Some(state) = state else { continue };
            let shadow = inflight.as_mut().and_then(|i| i.shadows.get_mut(index));
            let n = shadow.map_or(0, |s| fail_shadow(s, *state, mem))
                + fail_ring(self.kind, *state, mem);
            if n == 0 {
                continue;
            }
            total += n;
            self.shared
                .counters
                .failed_requests
                .fetch_add(n as u64, Ordering::Relaxed);
            let v = lock(&self.vectors)
                .get(index)
                .copied()
                .unwrap_or(VIRTIO_MSI_NO_VECTOR);
            if v != VIRTIO_MSI_NO_VECTOR {
                self.irq.signal(v);
            }
        }
        total
    }
}

/// Completes with an error the chains the driver made available on the ring `state`
/// describes and nobody used: those from the used index (where the back-end stopped)
/// to the available index. Returns how many it completed. Ring contents are the
/// driver's (and a dead back-end's): indices claiming more than a ring's worth, a
/// descriptor index out of range or memory that cannot be reached end the walk; the
/// descriptor walk itself is bounded by virtio-queue (the queue size, per chain).
pub(super) fn fail_ring<M: GuestMemory>(kind: DeviceKind, state: QueueState, mem: &M) -> usize {
    let Ok(mut q) = Queue::try_from(state) else {
        return 0;
    };
    let (Ok(used), Ok(avail)) = (
        q.used_idx(mem, Ordering::Acquire),
        q.avail_idx(mem, Ordering::Acquire),
    ) else {
        return 0;
    };
    // virtio v1.3 §2.7.6: the driver never has more than the ring's size outstanding.
    let pending = (avail - used).0;
    if pending > q.size() {
        return 0;
    }
    q.set_next_avail(used.0);
    q.set_next_used(used.0);
    let mut done = 0;
    for _ in 0..pending {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = match failed_request_status(kind.device_type()) {
            Some(status) => write_status(chain, mem, status),
            None => 0,
        };
        if q.add_used(mem, head, len).is_err() {
            break;
        }
        done += 1;
    }
    // The driver must notify its next request too, which is then failed the same way:
    // with EVENT_IDX, the dead back-end left avail_event wherever it was (virtio v1.3 §2.7.10).
    let _ = q.enable_notification(mem);
    done
}

/// Fails every request a shadow holds, through the guest's ring `state` describes
/// (its used index read back from the guest, where the transport left it).
fn fail_shadow<M: GuestMemory>(
    shadow: &mut inflight::CopyShadow,
    state: QueueState,
    mem: &M,
) -> usize {
    let Ok(mut q) = Queue::try_from(state) else {
        return 0;
    };
    let Ok(used) = q.used_idx(mem, Ordering::Acquire) else {
        return 0;
    };
    q.set_next_used(used.0);
    shadow.fail_all(&mut q, mem).unwrap_or(0)
}

/// Writes `status` into a request's status byte, the last byte of its last
/// device-writable descriptor (virtio-blk's, virtio v1.3 §5.2.6); returns the bytes
/// written (1, or 0 when the chain has no writable byte or the guest did not map it
/// writable).
pub(super) fn write_status<M: GuestMemory>(
    chain: virtio_queue::DescriptorChain<&M>,
    mem: &M,
    status: u8,
) -> u32 {
    let last = chain.filter(|d| d.is_write_only() && d.len() > 0).last();
    let Some(d) = last else {
        return 0;
    };
    let Some(addr) = d.addr().0.checked_add(u64::from(d.len() - 1)) else {
        return 0;
    };
    match mem.write_slice(&[status], GuestAddress(addr)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}
