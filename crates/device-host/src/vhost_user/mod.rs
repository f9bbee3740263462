//! A device whose queues run in another process: the front-end side of vhost-user
//! (QEMU's `docs/interop/vhost-user.rst`). [`VhostUserDevice`] is a
//! `virtio_contract::VirtioDevice` like our in-process devices, so the guest sees the same
//! virtio-pci function; features and configuration are the back-end's, guest RAM is
//! shared with it as the file descriptors the VMM gave us ([`crate::dma`]), queue
//! notifications become kick eventfd writes and the back-end's call eventfds become
//! the queues' MSI-X interrupts.
//!
//! Behind our virtio-iommu (`VIRTIO_F_ACCESS_PLATFORM` negotiated with the back-end)
//! the rings and buffers the back-end sees are IOVAs. When the guest maps memory for
//! the endpoint, the front-end pushes an IOTLB UPDATE for the mapping's window (clipped
//! to one memory-table region), so the back-end normally has it before it needs it.
//! A back-end that is faster than the push asks with an IOTLB MISS on its request
//! channel; the answer is the UPDATE for the window that holds the IOVA, or a refusal
//! and a fault event to the guest when the guest never mapped it. The front-end subscribes to the endpoint's mapping changes
//! ([`virtio_iommu::MappingSubscriber`]); when the guest unmaps or detaches a range
//! an UPDATE covered, it sends an IOTLB INVALIDATE with reply-ack, and the guest's
//! request completes only once the back-end acknowledged (strict semantics across the
//! process boundary) or the deadline passed, after which the device needs a reset.
//!
//! # When the back-end is gone
//! A back-end that dies, breaks the protocol or misses a deadline is cut off (both of
//! its sockets shut down) before the device is marked broken. From then on the
//! front-end itself completes what the back-end left: every chain between the used
//! and the available index of each started ring gets a used element, virtio-blk's
//! with `VIRTIO_BLK_S_IOERR` in its status byte, and the queue's interrupt is raised
//! ([`VhostUserDevice::fail_pending`]). It does so when the device is marked as
//! needing reset and again on every notification until the driver resets the device,
//! so a driver that ignores DEVICE_NEEDS_RESET (Linux does) sees its requests fail
//! instead of waiting for them forever. The walk assumes the back-end completed in
//! order (ours and every single-queue virtio-blk back-end we know do); a back-end that
//! completed out of order and died leaves chains this walk completes a second time.
//!
//! # What this does not do
//! The IOTLB tells a *cooperating* back-end what it may touch; it does not confine a
//! hostile one: `SET_MEM_TABLE` hands over the descriptors of all guest RAM, as every
//! vhost-user front-end does. Confinement needs the back-end to receive only shared
//! memory: with implicit grants, copy form ([`VhostUserDevice::inflight_copy`]), it
//! receives shadow rings and bounce buffers the device host made and nothing of the
//! guest's; in pool mode ([`VhostUserDevice::share_only`]) the restricted DMA pool's
//! own memory file and nothing else.
//!
//! # Threads and locks
//! The function's server thread drives the device (activation, kicks, reset). The
//! virtio-iommu's server thread calls the subscriber after it dropped the IOMMU's
//! tables; the subscriber updates the shadow and queues IOTLB messages, and never
//! waits for the back-end. One thread per device (the IOTLB thread) sends those
//! messages in order, waits for each INVALIDATE's ack, then drops the virtio-iommu
//! [`Hold`](virtio_iommu::Hold) that keeps the guest's UNMAP from completing. To our
//! own back-end, pushes and (while both sides poll) invalidations go through a shared
//! ring instead (`vhost_iotlb::push_ring`); the device host's poller then drops the
//! hold when the back-end's worker acknowledges in the ring. One thread
//! per connection reads the back-end request channel (so a MISS sent while the
//! front-end waits for an ack on the main socket is still answered), and one thread per
//! device turns call eventfds into interrupts and marks the device as needing reset
//! when the connection breaks. Lock order: the IOTLB shadow, then the main socket; the
//! main socket is held for one request and its reply, bounded by the deadline. Nothing
//! that holds the shadow or the socket takes the IOMMU's tables or the transport, or
//! drops a hold. A back-end that waits for a MISS answer before replying on the main
//! socket cannot be served (the UPDATE needs that socket); the deadline bounds it.
//!
//! # Modules
//! This file holds the public face (errors, device kinds, counters, the handle) and the
//! state the threads share; `link` the main socket and the session start; `iotlb` the
//! IOTLB shadow, the subscriber, the IOTLB thread and the back-end's misses; `memory`
//! the memory table; `device` the `VirtioDevice` glue and the call thread; `inflight`
//! implicit grants (shadow rings, bounce arenas, the map form's windows); `serve` the
//! vfio-user function around a device; `recovery` what the front-end completes when the
//! back-end is gone. The wire types are the back-end library's own ([`wire`]).

mod device;
mod inflight;
mod iotlb;
mod link;
mod memory;
mod recovery;
mod serve;
#[cfg(test)]
mod tests;

pub use device::VhostUserDevice;
pub use inflight::{InflightConfig, DEFAULT_ARENA_BYTES, DEFAULT_DEADLINE, DEFAULT_MAP_THRESHOLD};
pub use memory::PhysicalMemory;
pub use serve::{serve_vhost_user, serve_vhost_user_pool};
/// The wire format ("Message Specification" of vhost-user.rst), as the back-end
/// library decodes it.
pub use vhost_iotlb::wire;

use inflight::Inflight;
use iotlb::{IotlbJob, IotlbState};
use link::Link;

use dma_types::lock;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use virtio_contract::VIRTIO_F_VERSION_1;
use virtio_iommu::EndpointIommu;
use vmm_sys_util::eventfd::EventFd;

/// Default deadline for every back-end answer (and for an INVALIDATE's ack).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Front-end addresses are synthetic: `UADDR_BASE + guest-physical address`. The
/// back-end only uses them as keys (vhost-user.rst "Memory access"), and one linear
/// space lets adjacent pieces of one file be one region. Never zero.
pub const UADDR_BASE: u64 = 1 << 48;

/// Most UPDATE windows remembered per device (bounds what a back-end's misses and our
/// pushes make us keep); past it a miss is refused rather than lose track of a window.
/// Pushes stop at half of it, so a guest with many long-lived mappings leaves room
/// for the misses of what the back-end actually touches.
pub const MAX_WINDOWS: usize = 4096;

/// Why the vhost-user front-end failed; the device is unchanged unless it says the
/// connection broke.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be connected.
    #[error("cannot connect to the vhost-user back-end at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Sending or receiving failed (the back-end went away).
    #[error("vhost-user request {request}: {source}")]
    Io {
        /// Request code.
        request: u32,
        /// Why.
        source: std::io::Error,
    },
    /// No answer before the deadline.
    #[error("vhost-user back-end did not answer request {request} within {timeout:?}")]
    Timeout {
        /// Request code.
        request: u32,
        /// The deadline.
        timeout: Duration,
    },
    /// The answer was not a well-formed reply to the request.
    #[error("vhost-user back-end answered request {request} with a malformed reply: {why}")]
    BadReply {
        /// Request code.
        request: u32,
        /// What was wrong.
        why: String,
    },
    /// The back-end refused the request (reply-ack status non-zero).
    #[error("vhost-user back-end refused request {request} (status {status})")]
    Refused {
        /// Request code.
        request: u32,
        /// The status it sent.
        status: u64,
    },
    /// The back-end cannot drive this device as configured.
    #[error("vhost-user back-end at {path}: {why}")]
    Unsupported {
        /// Socket path.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// The guest configured something the back-end cannot be given.
    #[error("{0}")]
    Guest(String),
    /// Pool mode ([`VhostUserDevice::share_only`]) cannot be set up as asked: a bad
    /// range, a memory file that holds guest memory outside it, or a ring outside it.
    #[error("pool mode: {0}")]
    PoolMode(String),
    /// Implicit grants ([`VhostUserDevice::inflight_copy`]) cannot be set up as asked.
    #[error("implicit grants: {0}")]
    Inflight(String),
    /// The connection broke earlier; the device needs a reset (which reconnects).
    #[error("the vhost-user back-end connection is broken; the device needs a reset")]
    Broken,
}

impl VhostUserError {
    /// Whether the connection can still be used after this error (a clean refusal or
    /// a guest mistake) or is out of step with the back-end.
    fn breaks_connection(&self) -> bool {
        !matches!(self, Self::Refused { .. } | Self::Guest(_))
    }
}

/// The virtio device a back-end implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk (device type 2), one queue.
    Block,
    /// virtio-rng (device type 4), one queue.
    Rng,
    /// Any other one-queue device with no configuration, whose feature bits the
    /// back-end keeps to itself (the cost survey's network transmit sink is one).
    Other {
        /// Virtio device type.
        device_type: u16,
        /// PCI class code.
        class_code: u32,
    },
}

/// Queue size offered for each kind's single queue (QEMU's vhost-user-blk default).
const QUEUE_SIZES: [u16; 1] = [256];

impl DeviceKind {
    /// Virtio device type.
    pub fn device_type(self) -> u16 {
        match self {
            Self::Block => 2,
            Self::Rng => 4,
            Self::Other { device_type, .. } => device_type,
        }
    }

    /// PCI class code, as for our in-process devices.
    pub fn class_code(self) -> u32 {
        match self {
            Self::Block => 0x01_80_00,
            Self::Rng => 0xff_00_00,
            Self::Other { class_code, .. } => class_code,
        }
    }

    /// Bytes of device configuration forwarded: virtio-blk up to `blk_size` (virtio v1.3 §5.2.4:
    /// capacity, size_max, seg_max, geometry, blk_size), virtio-rng and the others
    /// have none.
    pub fn config_size(self) -> u32 {
        match self {
            Self::Block => 24,
            Self::Rng | Self::Other { .. } => 0,
        }
    }

    /// Device feature bits passed through: for virtio-blk those whose fields lie in
    /// the forwarded configuration (SIZE_MAX 1, SEG_MAX 2, GEOMETRY 4, RO 5,
    /// BLK_SIZE 6) and FLUSH 9; one queue, so never MQ.
    fn device_bits(self) -> u64 {
        match self {
            Self::Block => (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 9),
            Self::Rng | Self::Other { .. } => 0,
        }
    }
}

/// Transport bits passed through: INDIRECT_DESC (28), EVENT_IDX (29), VERSION_1; the
/// back-end runs the rings, so these are its business. ACCESS_PLATFORM is added behind
/// the IOMMU. Packed rings, NOTIFICATION_DATA and the rest our transport lacks are not.
const TRANSPORT_BITS: u64 = (1 << 28) | (1 << 29) | (1 << VIRTIO_F_VERSION_1);

/// Counters of one device's vhost-user traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostUserCounters {
    /// IOTLB misses received.
    pub misses: u64,
    /// IOTLB updates sent in answer to a miss.
    pub updates: u64,
    /// IOTLB updates pushed when the guest mapped memory, before any miss.
    pub pushed: u64,
    /// Of those, the ones written to the back-end's push ring instead of sent as
    /// messages (`vhost_iotlb::push_ring`).
    pub ring_pushed: u64,
    /// Invalidations written to the ring and acknowledged there, not as messages (also
    /// counted in `invalidates`).
    pub ring_invalidates: u64,
    /// Of those, the ones complete as soon as written: the back-end maps guest RAM
    /// whole and had no view of it alive, so nothing waited.
    pub quiet_invalidates: u64,
    /// Misses refused (the guest did not map the IOVA with that access).
    pub refused: u64,
    /// Access failures the back-end reported.
    pub access_fails: u64,
    /// Invalidates acknowledged.
    pub invalidates: u64,
    /// Time from sending those invalidates to their acks, summed (ns): the round trip
    /// a strict UNMAP waits for on top of the in-process path.
    pub invalidate_ns: u64,
    /// Invalidates not acknowledged in time (each one broke the connection).
    pub invalidate_failures: u64,
    /// Malformed or unknown messages from the back-end, answered with an error.
    pub bad_messages: u64,
    /// Successful reconnections after the connection broke.
    pub reconnects: u64,
    /// Requests the front-end completed with an error because the back-end was gone.
    pub failed_requests: u64,
    /// Implicit grants ([`VhostUserDevice::inflight_copy`]): what the shadows did and
    /// the guest bytes the back-end can read now (`exposed_bytes`) and at most
    /// (`peak_exposed_bytes`). All zero in the other modes.
    pub shadow: ::inflight::Stats,
    /// Back-ends cut off for keeping a request past the implicit grants' deadline.
    pub deadline_cutoffs: u64,
}

#[derive(Default)]
struct AtomicCounters {
    misses: AtomicU64,
    updates: AtomicU64,
    pushed: AtomicU64,
    ring_pushed: AtomicU64,
    ring_invalidates: AtomicU64,
    quiet_invalidates: AtomicU64,
    refused: AtomicU64,
    access_fails: AtomicU64,
    invalidates: AtomicU64,
    invalidate_ns: AtomicU64,
    invalidate_failures: AtomicU64,
    bad_messages: AtomicU64,
    reconnects: AtomicU64,
    failed_requests: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Implicit grants: what the watch thread runs for a call of queue `index`.
type OnCall = Box<dyn Fn(usize) + Send>;

/// State shared by the device, its subscriber and its threads.
struct Shared {
    socket: PathBuf,
    timeout: Duration,
    link: Mutex<Option<Arc<Link>>>,
    broken: AtomicBool,
    /// Written when `broken` becomes true: wakes the watch thread.
    broken_evt: EventFd,
    /// Set when the device is dropped: its threads end.
    closing: AtomicBool,
    iotlb: Mutex<IotlbState>,
    /// Bumped by every change that removes a translation (see [`Shared::answer_miss`]).
    generation: AtomicU64,
    iommu: Mutex<Option<EndpointIommu>>,
    counters: AtomicCounters,
    /// Marks the transport as needing reset (set once the transport exists).
    on_broken: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Implicit grants: the shadow of each queue (`None` in the other modes).
    inflight: Mutex<Option<Inflight>>,
    /// Implicit grants: hands the back-end's call of a queue to the transport, which
    /// completes to the guest (set once the transport exists).
    on_call: Mutex<Option<OnCall>>,
    /// To the IOTLB thread, which sends invalidations, and pushes that cannot go at
    /// once ([`Shared::push`]).
    jobs: mpsc::Sender<IotlbJob>,
    /// Jobs queued and not yet finished by the IOTLB thread.
    queued: AtomicUsize,
    /// Invalidations written to the back-end's ring, oldest first, waiting for its
    /// acknowledgement there ([`Shared::poll_ring_acks`]).
    ring_invs: Mutex<VecDeque<RingInv>>,
    /// How many `ring_invs` holds: read on every pass of the poller without the lock.
    ring_pending: AtomicUsize,
    /// Set while the device host's poller polls this device: it then watches the
    /// ring's acknowledgements, and keeps polling while any is outstanding.
    watched: AtomicBool,
    /// An UPDATE went as a message and no acknowledged INVALIDATE followed it, so the
    /// back-end may not have applied it yet. Written under the main socket's lock.
    unconfirmed: AtomicBool,
}

/// An invalidation sent through the back-end's ring.
struct RingInv {
    /// Done when the ring's acknowledged count reaches it.
    seq: u64,
    /// The connection whose ring it went to: another one (or none) means it was cut
    /// off, and no longer reaches the window either.
    link: std::sync::Weak<Link>,
    sent: std::time::Instant,
    /// Completes the guest's UNMAP.
    done: iotlb::Done,
}

impl Shared {
    fn current(&self) -> Result<Arc<Link>, VhostUserError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(VhostUserError::Broken);
        }
        lock(&self.link).clone().ok_or(VhostUserError::Broken)
    }

    /// The connection is unusable: close it, then mark it and wake the watch thread.
    /// Closed first, so whoever sees `broken` ([`VhostUserDevice::fail_pending`]) can
    /// take over the rings from a back-end that no longer hears from us.
    fn break_link(&self) {
        if let Some(l) = lock(&self.link).as_ref() {
            l.shutdown();
        }
        if !self.broken.swap(true, Ordering::AcqRel) {
            let _ = self.broken_evt.write(1);
        }
    }

    /// Runs `f` on the current link; an error that leaves the link out of step with
    /// the back-end breaks it.
    fn with_link<T>(
        &self,
        f: impl FnOnce(&Link) -> Result<T, VhostUserError>,
    ) -> Result<T, VhostUserError> {
        let link = self.current()?;
        let r = f(&link);
        if let Err(e) = &r {
            if e.breaks_connection() {
                self.break_link();
            }
        }
        r
    }
}

/// A handle on a vhost-user device, for its counters and state while it serves.
#[derive(Clone)]
pub struct VhostUserHandle(Arc<Shared>);

impl VhostUserHandle {
    /// The counters now.
    pub fn counters(&self) -> VhostUserCounters {
        let c = &self.0.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (shadow, deadline_cutoffs) = lock(&self.0.inflight)
            .as_ref()
            .map_or_else(Default::default, |i| (i.stats(), i.cutoffs));
        VhostUserCounters {
            misses: l(&c.misses),
            updates: l(&c.updates),
            pushed: l(&c.pushed),
            ring_pushed: l(&c.ring_pushed),
            ring_invalidates: l(&c.ring_invalidates),
            quiet_invalidates: l(&c.quiet_invalidates),
            refused: l(&c.refused),
            access_fails: l(&c.access_fails),
            invalidates: l(&c.invalidates),
            invalidate_ns: l(&c.invalidate_ns),
            invalidate_failures: l(&c.invalidate_failures),
            bad_messages: l(&c.bad_messages),
            reconnects: l(&c.reconnects),
            failed_requests: l(&c.failed_requests),
            shadow,
            deadline_cutoffs,
        }
    }

    /// The device host's poller starts (`true`) or stops watching this device, whose
    /// UNMAPs may then wait for acknowledgements in the back-end's ring
    /// ([`vhost_iotlb::push_ring`]). Stopping, it looks at them once more and returns
    /// whether any was outstanding: the poller must then poll on.
    pub fn set_watched(&self, on: bool) -> bool {
        // Cleared before that last look, as the back-end's worker does its flag.
        self.0.watched.store(on, Ordering::SeqCst);
        !on && self.0.poll_ring_acks()
    }

    /// One pass of the poller: completes the UNMAPs whose invalidations the back-end
    /// acknowledged in its ring (or that passed the deadline, which cuts the
    /// connection); returns whether any was outstanding.
    pub fn poll_ring_acks(&self) -> bool {
        self.0.poll_ring_acks()
    }

    /// Implicit grants: sets what runs when the back-end calls queue `index` (the
    /// host hands it to the transport, which completes to the guest); runs on the
    /// device's watch thread, holding nothing.
    pub fn set_on_call(&self, f: OnCall) {
        *lock(&self.0.on_call) = Some(f);
    }

    /// Whether the connection broke (the device needs a reset).
    pub fn is_broken(&self) -> bool {
        self.0.broken.load(Ordering::Acquire)
    }

    /// Sets what runs when the connection breaks (the host marks the transport as
    /// needing reset); runs on the device's watch thread, holding nothing.
    pub fn set_on_broken(&self, f: Box<dyn Fn() + Send>) {
        *lock(&self.0.on_broken) = Some(f);
        if self.is_broken() {
            let _ = self.0.broken_evt.write(1);
        }
    }
}
