//! The device glue: [`VhostUserDevice`] as a `virtio_contract::VirtioDevice` (activation,
//! kicks, reset, reconnection), the thread that turns call eventfds into interrupts,
//! and the factory that serves one behind a vfio-user function.

use super::iotlb::{iotlb_loop, spawn_backend_req, IotlbState, Region, Subscriber};
use super::link::{has, read_config, Link, Reply};
use super::memory::{mem_table, PhysicalMemory, SharedRange};
use super::{
    bump, wire, AtomicCounters, DeviceKind, Shared, VhostUserError, VhostUserHandle, QUEUE_SIZES,
    TRANSPORT_BITS,
};
use dma_types::lock;
use std::collections::VecDeque;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;
use virtio_contract::{
    ActiveQueue, DeviceError, DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};
use virtio_iommu::EndpointIommu;
use virtio_pci::InterruptSink;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use wire::req;
use zerocopy::{FromBytes, IntoBytes};

/// Turns call eventfds into MSI-X interrupts (with implicit grants: hands them to the
/// transport, which completes to the guest), marks the transport as needing reset when
/// the connection breaks, and cuts off a back-end that keeps a shadowed request past
/// its deadline. Ends when the device is dropped.
pub(super) fn watch_loop(
    shared: Weak<Shared>,
    stop: EventFd,
    broken: EventFd,
    calls: Vec<EventFd>,
    vectors: Arc<Mutex<Vec<u16>>>,
    irq: Arc<dyn InterruptSink>,
) {
    let mut fds: Vec<libc::pollfd> = [&stop, &broken]
        .into_iter()
        .chain(calls.iter())
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // With implicit grants, wake often enough to see a deadline pass.
        let timeout = shared.upgrade().map_or(-1, |s| {
            lock(&s.inflight).as_ref().map_or(-1, |i| {
                let ms = (i.cfg.deadline / 4).as_millis().clamp(10, 1000);
                i32::try_from(ms).unwrap_or(1000)
            })
        });
        // SAFETY: `fds` is a live, correctly sized array of pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if let Some(s) = shared.upgrade() {
            super::inflight::cut_off_if_overdue(&s);
        }
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let _ = broken.read();
            if let Some(s) = shared.upgrade() {
                if let Some(f) = lock(&s.on_broken).as_ref() {
                    f();
                }
            }
        }
        for (i, call) in calls.iter().enumerate() {
            if fds[i + 2].revents != 0 && call.read().is_ok() {
                if let Some(s) = shared.upgrade() {
                    if let Some(f) = lock(&s.on_call).as_ref() {
                        f(i);
                        continue;
                    }
                }
                let v = lock(&vectors)
                    .get(i)
                    .copied()
                    .unwrap_or(VIRTIO_MSI_NO_VECTOR);
                if v != VIRTIO_MSI_NO_VECTOR {
                    irq.signal(v);
                }
            }
        }
    }
}

/// Kick and call eventfds of one queue.
pub(super) struct QueueFds {
    pub(super) kick: EventFd,
    pub(super) call: EventFd,
}

/// A virtio device served by a vhost-user back-end.
pub struct VhostUserDevice {
    pub(super) kind: DeviceKind,
    pub(super) shared: Arc<Shared>,
    /// Features offered to the guest.
    pub(super) offered: u64,
    pub(super) acked: u64,
    pub(super) config: Vec<u8>,
    pub(super) queues: Vec<QueueFds>,
    pub(super) started: Vec<bool>,
    /// Each started ring as the driver configured it, for [`Self::fail_pending`].
    pub(super) rings: Vec<Option<QueueState>>,
    pub(super) vectors: Arc<Mutex<Vec<u16>>>,
    /// The queues' interrupts (the watch thread holds the same sink).
    pub(super) irq: Arc<dyn InterruptSink>,
    /// Our RAM descriptors as last sent (kept open while the back-end may map them).
    pub(super) sent_files: Vec<Arc<File>>,
    /// Pool mode: the only guest memory the back-end is given ([`Self::share_only`]).
    pub(super) share: Option<SharedRange>,
    /// Implicit grants ([`Self::inflight_copy`]): the back-end is given shadows only.
    pub(super) inflight: bool,
    pub(super) stop: EventFd,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("socket", &self.shared.socket)
            .field("offered", &self.offered)
            .finish_non_exhaustive()
    }
}

pub(super) fn efd() -> Result<EventFd, VhostUserError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Io { request: 0, source })
}

impl VhostUserDevice {
    /// Connects to the back-end at `socket`, runs the session start and reads the
    /// device configuration. `irq` delivers the queues' interrupts (the function's
    /// MSI-X vectors); every back-end answer is awaited at most `timeout`.
    ///
    /// # Errors
    /// [`VhostUserError`] naming the socket and what failed or is missing (VERSION_1;
    /// the CONFIG protocol feature for a block device).
    pub fn connect(
        socket: &Path,
        kind: DeviceKind,
        timeout: Duration,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<Self, VhostUserError> {
        let (link, backend_req) = Link::connect(socket, timeout)?;
        let unsupported = |why: String| VhostUserError::Unsupported {
            path: socket.to_path_buf(),
            why,
        };
        if !has(link.features, VIRTIO_F_VERSION_1) {
            return Err(unsupported(
                "it does not offer VIRTIO_F_VERSION_1 (a modern virtio-pci device needs it)".into(),
            ));
        }
        let size = kind.config_size();
        let config = if size == 0 {
            Vec::new()
        } else if link.protocol & wire::protocol::CONFIG != 0 {
            read_config(&link, size)?
        } else {
            return Err(unsupported(
                "it does not offer the CONFIG protocol feature, so the device configuration cannot be read".into(),
            ));
        };
        let offered = link.features & (kind.device_bits() | TRANSPORT_BITS);
        let mut queues = Vec::new();
        for _ in QUEUE_SIZES {
            queues.push(QueueFds {
                kick: efd()?,
                call: efd()?,
            });
        }
        let (jobs, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            socket: socket.to_path_buf(),
            timeout,
            link: Mutex::new(None),
            broken: AtomicBool::new(false),
            broken_evt: efd()?,
            closing: AtomicBool::new(false),
            iotlb: Mutex::new(IotlbState::default()),
            generation: AtomicU64::new(0),
            iommu: Mutex::new(None),
            counters: AtomicCounters::default(),
            on_broken: Mutex::new(None),
            inflight: Mutex::new(None),
            on_call: Mutex::new(None),
            jobs,
            queued: AtomicUsize::new(0),
            ring_invs: Mutex::new(VecDeque::new()),
            ring_pending: AtomicUsize::new(0),
            watched: AtomicBool::new(false),
            unconfirmed: AtomicBool::new(false),
        });
        std::thread::Builder::new()
            .name("aperture-vhost-iotlb".into())
            .spawn({
                let w = Arc::downgrade(&shared);
                move || iotlb_loop(w, rx)
            })
            .map(drop)
            .map_err(|source| VhostUserError::Io { request: 0, source })?;
        let link = Arc::new(link);
        *lock(&shared.link) = Some(Arc::clone(&link));
        if let Some(sock) = backend_req {
            spawn_backend_req(&shared, sock, &link)?;
        }
        let vectors = Arc::new(Mutex::new(vec![VIRTIO_MSI_NO_VECTOR; queues.len()]));
        let stop = efd()?;
        let clone = |e: &EventFd| {
            e.try_clone()
                .map_err(|source| VhostUserError::Io { request: 0, source })
        };
        let calls = queues
            .iter()
            .map(|q| clone(&q.call))
            .collect::<Result<Vec<_>, _>>()?;
        let (w_stop, w_broken) = (clone(&stop)?, clone(&shared.broken_evt)?);
        let (w_shared, w_vectors) = (Arc::downgrade(&shared), Arc::clone(&vectors));
        std::thread::Builder::new()
            .name("aperture-vhost-watch".into())
            .spawn({
                let irq = Arc::clone(&irq);
                move || watch_loop(w_shared, w_stop, w_broken, calls, w_vectors, irq)
            })
            .map(drop)
            .map_err(|source| VhostUserError::Io { request: 0, source })?;
        Ok(Self {
            kind,
            shared,
            offered,
            acked: 0,
            config,
            started: vec![false; queues.len()],
            rings: vec![None; queues.len()],
            queues,
            vectors,
            irq,
            sent_files: Vec::new(),
            share: None,
            inflight: false,
            stop,
        })
    }

    /// Puts the device behind the virtio-iommu: offers ACCESS_PLATFORM, answers the
    /// back-end's misses from `iommu`'s mappings and invalidates on unmap.
    ///
    /// # Errors
    /// [`VhostUserError::Unsupported`] if the back-end does not offer
    /// VIRTIO_F_ACCESS_PLATFORM, or lacks the REPLY_ACK or BACKEND_REQ protocol
    /// features the IOTLB protocol needs.
    pub fn attach_iommu(&mut self, iommu: EndpointIommu) -> Result<(), VhostUserError> {
        if self.inflight {
            if lock(&self.shared.inflight)
                .as_ref()
                .is_some_and(|i| i.map.is_some())
            {
                return Err(VhostUserError::Inflight(
                    "the map form opens windows onto guest-physical memory and cannot sit behind \
                     the virtio-iommu yet (use --iommu off, or --inflight copy)"
                        .into(),
                ));
            }
            // The shadow copies through the transport's memory, which is the IOMMU's
            // view: the back-end never sees an IOVA, so it needs no IOTLB.
            self.offered |= 1 << VIRTIO_F_ACCESS_PLATFORM;
            return Ok(());
        }
        if let Some(share) = self.share {
            return Err(VhostUserError::PoolMode(format!(
                "the device shares only {share} with its back-end; it cannot also sit behind the virtio-iommu"
            )));
        }
        let link = self.shared.current()?;
        let unsupported = |why: &str| VhostUserError::Unsupported {
            path: self.shared.socket.clone(),
            why: why.to_string(),
        };
        if !has(link.features, VIRTIO_F_ACCESS_PLATFORM) {
            return Err(unsupported(
                "it does not offer VIRTIO_F_ACCESS_PLATFORM, so it cannot run behind the virtio-iommu (serve it with --iommu off)",
            ));
        }
        let needed = wire::protocol::REPLY_ACK | wire::protocol::BACKEND_REQ;
        if link.protocol & needed != needed {
            return Err(unsupported(
                "it lacks the REPLY_ACK and BACKEND_REQ protocol features the IOTLB protocol needs",
            ));
        }
        self.offered |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        *lock(&self.shared.iommu) = Some(iommu.clone());
        iommu.subscribe(Arc::new(Subscriber(Arc::clone(&self.shared))));
        Ok(())
    }

    /// Pool mode: from the next activation on, the back-end is given only the guest
    /// memory in `[start, start + size)` — the restricted DMA pool (issue 6) — instead
    /// of all guest RAM. The memory table then holds only the regions inside that
    /// range (clipped to it), and activation is refused unless
    /// - every memory file sent is wholly inside the range (a descriptor of a file
    ///   that also backs other guest memory would let a hostile back-end map that
    ///   memory too, whatever the table says), so the pool must be its own memory
    ///   file, as `bounce_pool::SplitRam` builds guest RAM; and
    /// - every ring lies inside the range (the guest's driver allocates them
    ///   coherently from the pool).
    ///
    /// The back-end is driven without the IOTLB: the guest gives the device
    /// guest-physical addresses inside the pool, and an address outside it is simply
    /// not in the back-end's memory. The guest is offered `VIRTIO_F_ACCESS_PLATFORM`
    /// (which tells Linux to use its DMA API, and so the pool); the back-end is not.
    ///
    /// `aperture serve --arch arm64 --pool` uses it for an arm64 guest, which learns
    /// of the pool from its device tree; an x86 guest has no device tree, and there
    /// the mode is exercised by a fake guest driver
    /// (`crates/aperture/tests/pool_backend.rs`).
    ///
    /// # Errors
    /// [`VhostUserError::PoolMode`] if `start` or `size` is not a non-zero multiple of
    /// 4096, the range passes the top of the address space, or the device is behind
    /// the virtio-iommu ([`Self::attach_iommu`]).
    pub fn share_only(&mut self, start: GuestAddress, size: u64) -> Result<(), VhostUserError> {
        let bad = |why: &str| {
            VhostUserError::PoolMode(format!(
                "shared range at {:#x} of {size:#x} bytes: {why}",
                start.0
            ))
        };
        // Page-granular, so the back-end's mappings of the files sent hold nothing else.
        if size == 0 || !start.0.is_multiple_of(4096) || !size.is_multiple_of(4096) {
            return Err(bad("start and size must be non-zero multiples of 4096"));
        }
        let last = start
            .0
            .checked_add(size - 1)
            .ok_or_else(|| bad("it passes the top of the address space"))?;
        if has(self.offered, VIRTIO_F_ACCESS_PLATFORM) && self.share.is_none() {
            return Err(bad(
                "the device is behind the virtio-iommu; pool mode and the IOTLB exclude each other",
            ));
        }
        self.share = Some(SharedRange {
            first: start.0,
            last,
        });
        // The guest must bounce through the pool: only its DMA API does, and virtio
        // uses that only with ACCESS_PLATFORM. `start` keeps it from the back-end.
        self.offered |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        Ok(())
    }

    /// A handle for counters and state.
    pub fn handle(&self) -> VhostUserHandle {
        VhostUserHandle(Arc::clone(&self.shared))
    }

    pub(super) fn iotlb_on(&self) -> bool {
        has(self.acked, VIRTIO_F_ACCESS_PLATFORM) && self.share.is_none() && !self.inflight
    }

    /// Starts the back-end's rings: features, memory table, then each ready queue.
    pub(super) fn start(
        &mut self,
        queues: &[ActiveQueue<'_>],
        mem: &GuestMemoryMmap,
    ) -> Result<(), VhostUserError> {
        let s = Arc::clone(&self.shared);
        let (table, files) = if self.inflight {
            lock(&s.inflight)
                .as_mut()
                .ok_or(VhostUserError::Broken)?
                .mem_table(mem)?
        } else {
            mem_table(mem, self.share)?
        };
        if let Some(share) = self.share {
            share.check_rings(queues)?;
        }
        let regions: Vec<Region> = table.iter().map(Region::from).collect();
        // Ring addresses: IOVAs behind the IOMMU, else front-end addresses (vhost-user
        // "Memory access"); each ring must lie in one region.
        let mut addrs = Vec::new();
        for q in queues {
            let Some(&QueueFds { .. }) = self.queues.get(q.index) else {
                return Err(VhostUserError::Guest(format!(
                    "queue {} does not exist",
                    q.index
                )));
            };
            let addr = if self.inflight {
                lock(&s.inflight)
                    .as_ref()
                    .and_then(|i| i.ring_addr(q.index))
                    .ok_or(VhostUserError::Broken)?
            } else {
                self.ring_addr(q.index, q.queue, &regions)?
            };
            addrs.push(addr);
        }
        let link = s.current()?;
        let mut features = self.acked & link.features;
        if self.share.is_some() {
            // Pool mode: a guest's ACCESS_PLATFORM only says it bounces through the pool
            // (its DMA API); the back-end gets guest-physical addresses, no IOTLB.
            features &= !(1 << VIRTIO_F_ACCESS_PLATFORM);
        }
        let mut shadow_updates = Vec::new();
        if let Some(i) = lock(&s.inflight).as_mut() {
            features = i.backend_features(self.acked, link.features);
            if i.map.is_some() {
                shadow_updates = i.shadow_updates();
            }
        }
        if link.features & wire::VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            features |= wire::VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let protocol_on = link.features & wire::VHOST_USER_F_PROTOCOL_FEATURES != 0;
        s.with_link(|l| l.request(req::SET_FEATURES, features.as_bytes(), &[], Reply::None))?;
        let mut payload = wire::MemoryHeader {
            nregions: table.len() as u32,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        for r in &table {
            payload.extend_from_slice(r.as_bytes());
        }
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        s.with_link(|l| l.request(req::SET_MEM_TABLE, &payload, &fds, Reply::None))?;
        self.sent_files = files;
        if self.iotlb_on() {
            s.with_link(Link::give_push_ring)?;
        }
        // The map form: the shadows at IOVAs equal to their addresses, for the session.
        for u in &shadow_updates {
            s.with_link(|l| l.request(req::IOTLB_MSG, u.as_bytes(), &[], Reply::Ack))?;
        }
        {
            let mut st = lock(&s.iotlb);
            st.regions = regions;
            st.active = self.iotlb_on();
            // What the guest mapped before DRIVER_OK (its rings) is pushed now.
            let maps: Vec<_> = st
                .mappings
                .iter()
                .map(|(&a, m)| (a, m.end, m.perms))
                .collect();
            for (start, end, perms) in maps {
                for w in st.push_windows(start, end, perms) {
                    s.push(w);
                }
            }
        }
        for (q, addr) in queues.iter().zip(addrs) {
            let i = q.index as u32;
            let state = |num: u32| wire::VringState { index: i, num };
            let fd_arg = u64::from(i);
            let qf = &self.queues[q.index];
            // The back-end's ring: the guest's, or a fresh shadow of the largest size.
            let (num, base) = if self.inflight {
                (QUEUE_SIZES[q.index], 0)
            } else {
                (q.queue.size(), q.queue.next_avail())
            };
            s.with_link(|l| {
                l.request(
                    req::SET_VRING_NUM,
                    state(u32::from(num)).as_bytes(),
                    &[],
                    Reply::None,
                )?;
                l.request(
                    req::SET_VRING_BASE,
                    state(u32::from(base)).as_bytes(),
                    &[],
                    Reply::None,
                )?;
                l.request(req::SET_VRING_ADDR, addr.as_bytes(), &[], Reply::None)?;
                l.request(
                    req::SET_VRING_CALL,
                    fd_arg.as_bytes(),
                    &[qf.call.as_raw_fd()],
                    Reply::None,
                )?;
                l.request(
                    req::SET_VRING_KICK,
                    fd_arg.as_bytes(),
                    &[qf.kick.as_raw_fd()],
                    Reply::None,
                )?;
                if protocol_on {
                    l.request(req::SET_VRING_ENABLE, state(1).as_bytes(), &[], Reply::None)?;
                }
                Ok(())
            })?;
            lock(&self.vectors)[q.index] = q.vector;
            self.started[q.index] = true;
            self.rings[q.index] = Some(q.queue.state());
        }
        // Without REPLY_ACK nothing above was answered, and a back-end may still be
        // applying SET_VRING_ENABLE when the first kick arrives; vhost-user-backend
        // (vhost-device-rng) consumes a kick of a ring it has not enabled yet and the
        // request then waits forever. A request with a reply, answered in order, is the
        // barrier.
        if link.protocol & wire::protocol::REPLY_ACK == 0 {
            s.with_link(|l| l.request(req::GET_FEATURES, &[], &[], Reply::Payload(8)))?;
        }
        for q in queues {
            // Buffers the driver queued before DRIVER_OK were notified to nobody: the
            // back-end looks at the guest's ring, or (implicit grants) the watch
            // thread has the transport pull them into the shadow.
            let qf = &self.queues[q.index];
            let _ = if self.inflight { &qf.call } else { &qf.kick }.write(1);
        }
        Ok(())
    }

    pub(super) fn ring_addr(
        &self,
        index: usize,
        q: &Queue,
        regions: &[Region],
    ) -> Result<wire::VringAddr, VhostUserError> {
        let n = u64::from(q.size());
        let rings = [
            (q.desc_table(), 16 * n),
            (q.used_ring(), 6 + 8 * n),
            (q.avail_ring(), 6 + 2 * n),
        ];
        let mut out = [0u64; 3];
        for (o, (addr, len)) in out.iter_mut().zip(rings) {
            *o = if self.iotlb_on() {
                addr
            } else {
                let r = regions
                    .iter()
                    .find(|r| r.gpa <= addr && addr.checked_add(len - 1).is_some_and(|e| e <= r.last()))
                    .ok_or_else(|| {
                        VhostUserError::Guest(format!(
                            "queue {index}: ring at {addr:#x} ({len} bytes) is not inside one guest RAM region"
                        ))
                    })?;
                r.uaddr + (addr - r.gpa)
            };
        }
        Ok(wire::VringAddr {
            index: index as u32,
            flags: 0,
            desc: out[0],
            used: out[1],
            avail: out[2],
            log: 0,
        })
    }

    /// Stops every started ring (GET_VRING_BASE), drops what the back-end's IOTLB
    /// holds, and reconnects if the connection had broken.
    pub(super) fn stop_rings(&mut self) {
        let s = Arc::clone(&self.shared);
        let protocol_on = s
            .current()
            .is_ok_and(|l| l.features & wire::VHOST_USER_F_PROTOCOL_FEATURES != 0);
        let session = self.started.iter().any(|&s| s);
        self.rings.fill(None);
        for (i, started) in self.started.iter_mut().enumerate() {
            if !std::mem::take(started) {
                continue;
            }
            let state = wire::VringState {
                index: i as u32,
                num: 0,
            };
            let _ = s.with_link(|l| {
                if protocol_on {
                    l.request(req::SET_VRING_ENABLE, state.as_bytes(), &[], Reply::None)?;
                }
                let body = l.request(
                    req::GET_VRING_BASE,
                    state.as_bytes(),
                    &[],
                    Reply::Payload(size_of::<wire::VringState>()),
                )?;
                match wire::VringState::read_from_bytes(&body) {
                    Ok(v) if v.index == i as u32 => Ok(()),
                    _ => Err(VhostUserError::BadReply {
                        request: req::GET_VRING_BASE,
                        why: "the state is for another vring".into(),
                    }),
                }
            });
        }
        let held = {
            let mut st = lock(&s.iotlb);
            st.active = false;
            st.regions.clear();
            s.generation.fetch_add(1, Ordering::AcqRel);
            st.take_given(0, u64::MAX)
        };
        if let Some((lo, hi)) = held {
            s.invalidate_and_wait(lo, hi);
        }
        self.sent_files.clear();
        if let Some(i) = lock(&s.inflight).as_mut() {
            if session && i.map.is_some() && !s.broken.load(Ordering::Acquire) {
                // The map form: no window outlives the session (a reset before any
                // activation has none, and its back-end has no IOTLB yet).
                s.invalidate(0, u64::MAX);
            }
            // New shadows for the next activation; the old ones are zeroed, so a
            // back-end that still maps them (one cut off) holds nothing.
            let _ = i.renew(self.kind);
        }
        lock(&self.vectors).fill(VIRTIO_MSI_NO_VECTOR);
        if s.broken.load(Ordering::Acquire) {
            let _ = self.reconnect();
        }
    }

    /// Connects again after the connection broke (on device reset): the back-end must
    /// offer the same features.
    pub(super) fn reconnect(&mut self) -> Result<(), VhostUserError> {
        let s = Arc::clone(&self.shared);
        let (link, backend_req) = Link::connect(&s.socket, s.timeout)?;
        let old = lock(&s.link).clone();
        if let Some(old) = &old {
            if old.features != link.features || old.protocol != link.protocol {
                return Err(VhostUserError::Unsupported {
                    path: s.socket.clone(),
                    why: "after reconnecting it offers other features".into(),
                });
            }
        }
        let link = Arc::new(link);
        *lock(&s.link) = Some(Arc::clone(&link));
        if let Some(sock) = backend_req {
            spawn_backend_req(&s, sock, &link)?;
        }
        {
            let mut st = lock(&s.iotlb);
            st.given.clear();
        }
        s.broken.store(false, Ordering::Release);
        bump(&s.counters.reconnects);
        Ok(())
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Some(l) = lock(&self.shared.link).as_ref() {
            l.shutdown();
        }
        // The watch thread ends on its own; it may be the thread dropping us (it held
        // the last reference to the transport), so it is not joined.
        let _ = self.stop.write(1);
    }
}

impl DeviceIdentity for VhostUserDevice {
    fn device_type(&self) -> u16 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_size(&self) -> u64 {
        u64::from(self.kind.config_size())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only fields our forwarded features make writable exist (none today); pass
        // the write on when the back-end takes configuration writes.
        let (Ok(off), Ok(size)) = (u32::try_from(offset), u32::try_from(data.len())) else {
            return;
        };
        let s = Arc::clone(&self.shared);
        let on = s
            .current()
            .is_ok_and(|l| l.protocol & wire::protocol::CONFIG != 0);
        if !on {
            return;
        }
        let mut payload = wire::ConfigHeader {
            offset: off,
            size,
            flags: 0,
        }
        .as_bytes()
        .to_vec();
        payload.extend_from_slice(data);
        if s.with_link(|l| l.request(req::SET_CONFIG, &payload, &[], Reply::None))
            .is_ok()
        {
            let start = off as usize;
            if let Some(dst) = self.config.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
    }
}

impl<M: PhysicalMemory> VirtioDevice<M> for VhostUserDevice {
    /// The back-end runs the guest's queues: nothing here to poll. With implicit grants
    /// the device host takes the guest's requests itself, so the poller may watch the
    /// guest's ring as it does for our in-process devices (the back-end's completions
    /// still arrive as calls).
    fn polled(&self, _index: usize) -> bool {
        self.inflight
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        if self.shared.broken.load(Ordering::Acquire) {
            self.fail_pending(mem);
            return Err(DeviceError::backend("vhost-user", VhostUserError::Broken));
        }
        if self.inflight {
            return self.process_inflight(index, queue, mem);
        }
        if let (Some(q), Some(true)) = (self.queues.get(index), self.started.get(index)) {
            // An eventfd write fails only if the counter would overflow: a kick is
            // already pending.
            let _ = q.kick.write(1);
        }
        Ok(false)
    }

    fn reset(&mut self) {
        self.stop_rings();
        self.acked = 0;
    }

    fn activate(&mut self, queues: &[ActiveQueue<'_>], mem: &M) -> Result<(), DeviceError> {
        self.start(queues, mem.physical())
            .map_err(|e| DeviceError::backend("vhost-user", e))
    }
}
