//! Serving a [`VhostUserDevice`] as a vfio-user PCI function: its MSI-X vectors, the
//! transport on the right view of guest memory (guest-physical, or the virtio-iommu's),
//! and the hooks the device's threads call into the transport (a broken connection,
//! a back-end's call under implicit grants).

use super::device::VhostUserDevice;
use super::inflight::InflightConfig;
use super::memory::PhysicalMemory;
use super::{DeviceKind, VhostUserHandle, QUEUE_SIZES};
use crate::host::{BuildError, EndpointMemory, Function};
use crate::poll::Pollable;
use crate::vfio::{EventFdSink, MemoryBuilder, MsixVectors, NotifyHook, PciFunction};
use dma_types::lock;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virtio_contract::VIRTIO_F_ACCESS_PLATFORM;
use virtio_iommu::EndpointIommu;
use virtio_pci::{device_status, InterruptSink, TransportCounters, VirtioPciTransport};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Serves a vhost-user device as a PCI function, translated by `iommu` when given,
/// with implicit grants when `inflight` is given ([`VhostUserDevice::inflight_copy`]);
/// returns the server backend, its vector count and a handle on the device.
///
/// # Errors
/// [`BuildError::VhostUser`]: the back-end cannot be reached or cannot drive the
/// device; [`BuildError::Transport`].
pub fn serve_vhost_user(
    socket: &Path,
    kind: DeviceKind,
    timeout: Duration,
    iommu: Option<EndpointIommu>,
    inflight: Option<InflightConfig>,
) -> Result<(Function, VhostUserHandle), BuildError> {
    let (mut dev, vectors) = connect_for_function(socket, kind, timeout)?;
    if let Some(cfg) = inflight {
        dev.inflight_copy(cfg)?;
    }
    match iommu {
        Some(ep) => {
            dev.attach_iommu(ep.clone())?;
            let handle = dev.handle();
            let sink = Box::new(EventFdSink(Arc::clone(&vectors)));
            let mem = vm_memory::IommuMemory::new(GuestMemoryMmap::default(), ep.clone(), true, ());
            let build: MemoryBuilder<EndpointMemory> =
                Box::new(move |phys| vm_memory::IommuMemory::new(phys, ep.clone(), true, ()));
            let t = VirtioPciTransport::new(
                dev,
                kind.class_code(),
                mem,
                sink,
                1 << VIRTIO_F_ACCESS_PLATFORM,
            )?;
            let t = Arc::new(Mutex::new(t));
            Ok((function(&handle, t, vectors, build), handle))
        }
        None => physical_function(dev, vectors, 0),
    }
}

/// Pool mode ([`VhostUserDevice::share_only`]): connects to the back-end at `socket`
/// and serves the device so that the back-end is given only `pool` of guest memory,
/// which must be its own memory file (the VMM's RAM split at the pool, as
/// [`crate::host::pool_memory_args`] asks QEMU for). The guest is offered and must
/// accept `VIRTIO_F_ACCESS_PLATFORM`.
///
/// # Errors
/// [`BuildError::VhostUser`] if the back-end cannot be reached or pool mode set up;
/// [`BuildError::Transport`].
pub fn serve_vhost_user_pool(
    socket: &Path,
    kind: DeviceKind,
    timeout: Duration,
    pool: crate::host::PoolWindow,
) -> Result<(Function, VhostUserHandle), BuildError> {
    let (mut dev, vectors) = connect_for_function(socket, kind, timeout)?;
    dev.share_only(GuestAddress(pool.base.0), pool.size)?;
    // The transport itself touches no guest buffer (the back-end runs the rings), so it
    // keeps the plain guest-physical map; what the back-end gets is the pool's file.
    physical_function(dev, vectors, 1 << VIRTIO_F_ACCESS_PLATFORM)
}

/// Connects to the back-end for a PCI function with one MSI-X vector per queue and one
/// for configuration changes, the queues' interrupts going to those vectors.
fn connect_for_function(
    socket: &Path,
    kind: DeviceKind,
    timeout: Duration,
) -> Result<(VhostUserDevice, Arc<MsixVectors>), BuildError> {
    let vectors = MsixVectors::new(QUEUE_SIZES.len() as u16 + 1);
    let irq: Arc<dyn InterruptSink> = Arc::new(EventFdSink(Arc::clone(&vectors)));
    let dev = VhostUserDevice::connect(socket, kind, timeout, irq)?;
    Ok((dev, vectors))
}

/// The function of a device whose transport works on guest-physical memory (no
/// virtio-iommu), with `required` feature bits the driver must accept.
fn physical_function(
    dev: VhostUserDevice,
    vectors: Arc<MsixVectors>,
    required: u64,
) -> Result<(Function, VhostUserHandle), BuildError> {
    let handle = dev.handle();
    let kind = dev.kind;
    let sink = Box::new(EventFdSink(Arc::clone(&vectors)));
    let build: MemoryBuilder<GuestMemoryMmap> = Box::new(|phys| phys);
    let t = VirtioPciTransport::new(
        dev,
        kind.class_code(),
        GuestMemoryMmap::default(),
        sink,
        required,
    )?;
    let t = Arc::new(Mutex::new(t));
    Ok((function(&handle, t, vectors, build), handle))
}

pub(super) fn on_broken<M: PhysicalMemory + Send + 'static>(
    handle: &VhostUserHandle,
    t: &Arc<Mutex<VirtioPciTransport<VhostUserDevice, M>>>,
) {
    let weak = Arc::downgrade(t);
    handle.set_on_broken(Box::new(move || {
        if let Some(t) = weak.upgrade() {
            let mut t = lock(&t);
            t.set_needs_reset();
            let t = &*t;
            t.device().fail_pending(t.memory());
        }
    }));
}

/// Implicit grants: the back-end's calls go to the transport, which completes to the
/// guest ([`super::inflight`]).
pub(super) fn on_call<M: PhysicalMemory + Send + 'static>(
    handle: &VhostUserHandle,
    t: &Arc<Mutex<VirtioPciTransport<VhostUserDevice, M>>>,
) {
    if lock(&handle.0.inflight).is_none() {
        return;
    }
    let weak = Arc::downgrade(t);
    handle.set_on_call(Box::new(move |index| {
        if let Some(t) = weak.upgrade() {
            lock(&t).serve(index);
        }
    }));
}

pub(super) fn function<M: PhysicalMemory + Send + 'static>(
    handle: &VhostUserHandle,
    t: Arc<Mutex<VirtioPciTransport<VhostUserDevice, M>>>,
    vectors: Arc<MsixVectors>,
    build: MemoryBuilder<M>,
) -> Function {
    on_broken(handle, &t);
    on_call(handle, &t);
    // A queue notification while the connection is broken fails what the driver
    // queued ([`VhostUserDevice::fail_pending`]): the transport ignores notifications
    // once the device needs a reset, and a driver that ignores DEVICE_NEEDS_RESET would
    // otherwise wait on those requests forever.
    let shared = Arc::clone(&handle.0);
    let inner = Box::new(PciFunction::new(Arc::clone(&t), vectors, build));
    let vector_count = lock(&t).msix_vectors();
    let transport: Arc<dyn Pollable> = Arc::new(Watched {
        handle: handle.clone(),
        transport: Arc::clone(&t),
    });
    // The poller holds it weakly: the server's hook keeps it for the function's life.
    let keep = Arc::clone(&transport);
    Function {
        backend: Box::new(NotifyHook::new(inner, move || {
            let _ = &keep;
            if shared.broken.load(Ordering::Acquire) {
                let t = lock(&t);
                if t.status() & device_status::DRIVER_OK != 0 {
                    t.device().fail_pending(t.memory());
                }
            }
        })),
        vectors: vector_count,
        transport,
    }
}

/// What the poller serves for a vhost-user function: its transport (which polls no
/// ring: the back-end runs them) and the invalidations waiting in the back-end's ring
/// ([`super::Shared::ring_invalidate`]). While the poller polls, the device is
/// `watched`; while an invalidation is outstanding the poller does not stop.
struct Watched<M: PhysicalMemory> {
    handle: VhostUserHandle,
    transport: Arc<Mutex<VirtioPciTransport<VhostUserDevice, M>>>,
}

impl<M: PhysicalMemory + Send + 'static> Pollable for Watched<M> {
    fn poll(&self) -> bool {
        let acks = self.handle.poll_ring_acks();
        self.transport.poll() | acks
    }

    fn set_polling(&self, on: bool) -> bool {
        let pending = self.handle.set_watched(on);
        self.transport.set_polling(on) | pending
    }

    fn counters(&self) -> TransportCounters {
        self.transport.counters()
    }
}
