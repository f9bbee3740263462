//! The device contract: what a virtio device is to whatever carries it — our
//! virtio-pci transport (`virtio-pci`) in the device host, or a vhost-user back-end
//! session (`vhost-iotlb`) in its own process — and nothing about how it is carried.
//!
//! - [`DeviceIdentity`]: who the device is to the driver: its type, queues, feature
//!   bits and configuration space. Kept apart from queue handling.
//! - [`VirtioDevice`]: its queue handling over any `vm_memory::GuestMemory` (plain guest
//!   RAM, an IOMMU's view, a pool, a back-end's windows), with typed errors
//!   ([`DeviceError`]).
//! - [`serve_queue`] and [`Interrupt`]: how a notification (or a poller) serves a
//!   queue, the same for every carrier: event-index bookkeeping and interrupt
//!   suppression (virtio v1.3 §2.7.7, §2.7.10).
//! - [`PollWindow`] and [`adjust_poll_window`]: the adaptive window, and the loop, of a
//!   thread that polls queues; [`PollBudget`]: how many such threads may poll at once,
//!   across processes.
//!
//! # The batch
//! A device reaches guest memory only inside [`VirtioDevice::process_queue`]: one call is
//! one *batch*. The carrier opens it with [`Batch::begin`] right before the call and
//! closes it with [`Batch::end`] right after the call returns ([`process_batch`] does
//! both, and [`serve_queue`] serves a queue through it). A device keeps no reference
//! into guest memory (a `VolatileSlice`, a host pointer) past the end of its batch.
//! Within a batch a device may hold what it translated for a request while it moves that
//! request's data (virtio-blk translates every segment of a request, then reads the
//! image into them with one `preadv`).
//!
//! Every sharing mode that lets the guest take memory away gives the one guarantee:
//!
//! > From a device's first translation of a range in a batch until that batch ends,
//! > the range stays reachable as it was when translated. A revocation that overlaps
//! > it takes effect when the batch ends, and the guest learns it completed only then.
//! > A range the batch has not translated is revoked at once.
//!
//! A batch is bounded by one `process_queue` call, which serves at most what the driver
//! made available, so the guest never waits on a batch for longer than the device takes
//! to serve its own requests; nothing in a batch waits on the guest. How each mode
//! keeps the guarantee:
//!
//! - virtio-iommu in process (`virtio_iommu::EndpointIommu` under
//!   `vm_memory::IommuMemory`): the endpoint records what the batch translates. An UNMAP
//!   (DETACH, re-ATTACH, a `bypass` write) changes the tables at once, so translations
//!   of anything else are denied at once, but the endpoint's IOTLB keeps the overlapping
//!   translations until the batch ends, and the request is parked with a
//!   `virtio_iommu::Hold` that [`Batch::end`] drops: the guest reads its status then.
//! - virtio-iommu out of process (`vhost-iotlb`): the back-end keeps a window the
//!   batch translated mapped, as it was, until the batch ends, and acknowledges an
//!   INVALIDATE that overlaps it only then; the front-end, which completes the guest's
//!   UNMAP on that acknowledgement, waits with a deadline. Windows the batch did not
//!   use are unmapped at once.
//! - Grant tables (`grant_table::GrantIommu`): a page is pinned from its first
//!   translation in a batch; [`Batch::end`] unmaps it. Until then the guest's revoke
//!   answers "busy" (Xen's ABI: `GTF_reading`/`GTF_writing` make
//!   `gnttab_end_foreign_access` fail while a backend has the page mapped), and the
//!   guest's driver retries it, so it completes only after the batch.
//! - The restricted pool (`bounce_pool::PoolIommu`) and plain guest RAM: nothing is
//!   revocable; their carriers pass `()`, whose hooks do nothing.
//!
//! So the modes differ only in how the guest hears that its revocation waits (a request
//! not yet used, an acknowledgement not yet sent, "busy"), never in what a device can
//! reach during its batch or after it ends.

#![deny(missing_docs)]

mod budget;
mod poll;

pub use budget::{BudgetError, PollBudget, PollTurn, MAX_POLL_CPUS};
pub use poll::{adjust_poll_window, PollConfig, PollWindow, POLL_WINDOW_START};

use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform's IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// `VIRTIO_RING_F_INDIRECT_DESC`: descriptors may point at a table of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`: used/avail event suppression, handled by virtio-queue.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// "No vector" for `config_msix_vector` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// `VRING_AVAIL_F_NO_INTERRUPT` (§2.7.7): without EVENT_IDX, the driver's "do not
/// interrupt me" in `avail->flags`.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a device cannot go on without a reset. The carrier then sets
/// DEVICE_NEEDS_RESET (virtio-pci) or stops the ring (vhost-user); guest mistakes that
/// a device can answer (a malformed request) are never errors: they are answered with
/// the device's status code.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The ring cannot be read or written where the driver put it.
    #[error("queue {queue}: {source}")]
    Queue {
        /// The queue's index.
        queue: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// The driver broke the ring's rules in a way no status code can answer: a
    /// malformed chain that a device reading every chain whole before it acts (a
    /// shadow ring) must not pass on.
    #[error("queue {queue}: the driver broke the ring's rules: {source}")]
    Driver {
        /// The queue's index.
        queue: usize,
        /// What the driver did.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// What serves the device failed (an entropy source, a back-end process that is
    /// gone, the IOMMU's own queue).
    #[error("{device}: {source}")]
    Backend {
        /// The device, for the message (`"virtio-rng"`, `"vhost-user blk"`...).
        device: &'static str,
        /// The failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DeviceError {
    /// A failure of what serves `device`.
    pub fn backend(
        device: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Backend {
            device,
            source: source.into(),
        }
    }
}

/// Who a device is to the driver: its type, queues, features and configuration space
/// (virtio v1.3 §2.2, §2.5, §5).
pub trait DeviceIdentity {
    /// Virtio device type (virtio spec §5), e.g. 2 for block, 4 for entropy, 23 for IOMMU.
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered, transport bits (VERSION_1, ACCESS_PLATFORM) included.
    fn device_features(&self) -> u64;
    /// Features accepted by the driver (called at FEATURES_OK, a subset of the offer).
    fn set_acked_features(&mut self, features: u64);
    /// Size of the device-specific configuration.
    fn config_size(&self) -> u64;
    /// Reads device configuration (`offset + data.len() <= config_size()`).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration (`offset + data.len() <= config_size()`).
    fn write_config(&mut self, offset: u64, data: &[u8]);
}

/// A virtio device's queue handling, over guest memory `M`. See the crate docs for the
/// batch each [`process_queue`](Self::process_queue) call is.
pub trait VirtioDevice<M: GuestMemory>: DeviceIdentity {
    /// Processes queue `index` after the driver notified it (or a poller saw new
    /// buffers); returns whether the driver should be interrupted, as
    /// `QueueT::needs_notification` tells with EVENT_IDX (without it, the carrier
    /// honours `VRING_AVAIL_F_NO_INTERRUPT` itself).
    ///
    /// # Errors
    /// [`DeviceError`]: the device cannot go on without a reset.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError>;
    /// Device reset: forget all driver-visible state.
    fn reset(&mut self);
    /// Whether a poller may watch queue `index` for new buffers. A queue whose buffers
    /// wait for events of the device (the virtio-iommu's event queue) is not polled:
    /// its available buffers are not work. The default polls every queue.
    fn polled(&self, index: usize) -> bool {
        let _ = index;
        true
    }
    /// Called when the driver sets DRIVER_OK, after the carrier checked every ready
    /// queue (§3.1.1 step 8), with those queues and their MSI-X vectors. A device whose
    /// queues run elsewhere (an out-of-process backend) starts them here; the default
    /// does nothing. It moves no request data: it is not a batch.
    ///
    /// # Errors
    /// [`DeviceError`]: the device cannot start; the carrier refuses DRIVER_OK.
    fn activate(&mut self, queues: &[ActiveQueue<'_>], mem: &M) -> Result<(), DeviceError> {
        let _ = (queues, mem);
        Ok(())
    }
}

/// `VIRTIO_BLK_S_IOERR` (virtio v1.3 §5.2.6).
const VIRTIO_BLK_S_IOERR: u8 = 1;
/// virtio-blk's device type.
const VIRTIO_ID_BLOCK: u16 = 2;

/// What a carrier writes into the last device-writable byte of a request it completes
/// on the device's behalf, because what serves the device is gone (a back-end process
/// that died, one cut off for misbehaving): the device type's error status, so the
/// driver sees the request fail rather than succeed with stale bytes. virtio-blk's is
/// `VIRTIO_BLK_S_IOERR`; device types whose requests carry no status (entropy, a
/// network transmit queue) have none, and such requests complete with used length 0.
pub fn failed_request_status(device_type: u16) -> Option<u8> {
    (device_type == VIRTIO_ID_BLOCK).then_some(VIRTIO_BLK_S_IOERR)
}

/// A ready queue as [`VirtioDevice::activate`] sees it.
#[derive(Debug)]
pub struct ActiveQueue<'a> {
    /// Queue index.
    pub index: usize,
    /// The queue as the driver configured it (size, ring addresses, event index).
    pub queue: &'a Queue,
    /// Its MSI-X vector, or [`VIRTIO_MSI_NO_VECTOR`].
    pub vector: u16,
}

/// Whether the driver gets an interrupt for what [`serve_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Nothing the driver needs to hear about.
    None,
    /// The driver asked to be told: send it.
    Send,
    /// The device would have interrupted, but the driver asked for none
    /// (`VRING_AVAIL_F_NO_INTERRUPT` without EVENT_IDX).
    Suppressed,
}

/// The edges of a batch (see the crate docs), as the sharing mode behind a device's
/// memory needs them: the carrier calls [`Batch::begin`] right before
/// [`VirtioDevice::process_queue`] and [`Batch::end`] right after it returns, on the
/// same thread, with no lock of the mode held. [`process_batch`] does both.
pub trait Batch {
    /// A batch starts: the device is about to reach guest memory.
    fn begin(&self);
    /// The batch ended: the device returned and holds nothing of guest memory. What the
    /// guest revoked meanwhile from ranges the batch translated takes effect now, and
    /// the guest is told it completed.
    fn end(&self);
}

/// Memory with nothing revocable (plain guest RAM, the restricted pool): no hooks.
impl Batch for () {
    fn begin(&self) {}
    fn end(&self) {}
}

/// Ends the batch when dropped, so a device that panics does not leave a revocation
/// waiting for ever.
struct OpenBatch<'a, B: Batch + ?Sized>(&'a B);

impl<B: Batch + ?Sized> Drop for OpenBatch<'_, B> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// One batch: [`Batch::begin`], `device.process_queue(index, queue, mem)`, then
/// [`Batch::end`], whatever the call returns.
///
/// # Errors
/// The device's error: it cannot go on without a reset.
pub fn process_batch<M, D, B>(
    batch: &B,
    device: &mut D,
    index: usize,
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, DeviceError>
where
    M: GuestMemory,
    D: VirtioDevice<M> + ?Sized,
    B: Batch + ?Sized,
{
    batch.begin();
    let _open = OpenBatch(batch);
    device.process_queue(index, queue, mem)
}

/// Serves queue `index` of `device` as a notification of it asks, for the transport and
/// for a vhost-user back-end alike. It processes the queue; then, unless `polling` (a
/// poller serves the queue with notifications off), it asks the driver for the next
/// notification, which with EVENT_IDX moves `avail_event` to where the device stopped
/// (§2.7.10): without that the driver would never notify again. Buffers published in
/// between are served at once. A queue whose buffers the device leaves waiting (an
/// event queue) is served once. Each call of the device is one batch of `batch`
/// ([`process_batch`]).
///
/// # Errors
/// The device's error: it cannot go on without a reset.
pub fn serve_queue<M, D, B>(
    device: &mut D,
    index: usize,
    queue: &mut Queue,
    mem: &M,
    batch: &B,
    polling: bool,
) -> Result<Interrupt, DeviceError>
where
    M: GuestMemory,
    D: VirtioDevice<M> + ?Sized,
    B: Batch + ?Sized,
{
    let mut wanted = false;
    loop {
        let before = queue.next_avail();
        wanted |= process_batch(batch, device, index, queue, mem)?;
        if polling
            || queue.next_avail() == before
            || !queue.enable_notification(mem).unwrap_or(false)
        {
            break;
        }
    }
    Ok(if !wanted {
        Interrupt::None
    } else if driver_wants_interrupt(queue, mem) {
        Interrupt::Send
    } else {
        Interrupt::Suppressed
    })
}

/// Without EVENT_IDX the driver's `avail->flags` says whether it wants interrupts
/// (§2.7.7.2: the device SHOULD NOT send one when `VRING_AVAIL_F_NO_INTERRUPT` is set;
/// virtio-queue ignores the flag). With EVENT_IDX the device already asked
/// `needs_notification`, which compared `used_event`. An unreadable ring is the
/// device's error to find: the interrupt goes out.
fn driver_wants_interrupt<M: GuestMemory>(q: &Queue, mem: &M) -> bool {
    if q.event_idx_enabled() {
        return true;
    }
    mem.load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire)
        .map_or(true, |flags| {
            u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_failed_on_the_devices_behalf_carries_its_types_error_status() {
        assert_eq!(failed_request_status(2), Some(1), "virtio-blk: IOERR");
        assert_eq!(failed_request_status(4), None, "virtio-rng has no status");
        assert_eq!(failed_request_status(1), None, "a transmit queue has none");
    }
}
