//! One vhost-user connection, back-end side: the main-socket message loop (this
//! thread) and a device worker thread that processes the queues.
//!
//! The device is any [`virtio_contract::VirtioDevice`] over [`GuestView`], so the in-process
//! devices run here unchanged. Each request is decoded ([`crate::wire::decode`]), then
//! applied; a request that fails to decode or apply changes nothing and is answered
//! with a failure where the protocol has a way to say so (reply-ack non-zero, or an
//! empty reply to a request with an explicit reply, which front-ends reject as a bad
//! size; `GET_CONFIG` uses an empty payload for errors by specification).
//!
//! Threads. The worker holds the device lock while it processes a batch; a miss
//! inside the batch waits for the front-end's reply on the back-end channel, and the
//! update arrives on the main socket, which this thread keeps reading, so the miss
//! never waits on the thread that must serve it. The front-end, however, answers
//! nothing while it waits for a reply of its own, so before this thread takes the
//! device lock (ring set-up and stop, features) it makes pending and new misses fail
//! at once ([`AddressSpace::set_cancel_misses`]); the batch then ends quickly. IOTLB
//! updates and invalidates, call fds and the memory table never need the device lock.
//!
//! Polling. A kick is an eventfd write the worker must be woken for. While the driver
//! keeps it busy, the worker instead serves the rings with the driver's notifications
//! off (`VRING_USED_F_NO_NOTIFY`, or with EVENT_IDX `avail_event` left behind) and
//! watches their avail indexes, for a window that adapts as the device host's poller
//! does ([`virtio_contract::PollWindow`], up to [`SessionConfig::poll`]). When
//! the window passes with nothing new it turns notifications back on, which re-checks
//! the rings after a fence, serves what was published meanwhile, and sleeps. It takes
//! the device lock per pass, never across the window. At the start of every pass, and
//! once more after it stops polling, it applies what the front-end wrote to the push
//! ring ([`crate::push_ring`]): updates, and invalidations, which only it applies.

use crate::channel::{recv_message, send_reply, MissChannel};
use crate::push_ring::{Consumer, RingError};
use crate::space::{AddressSpace, Exposure, GuestView, Limits, MapPolicy, Mode, SpaceError};
use crate::wire::{
    decode, protocol, req, ConfigHeader, Request, VringAddr, VringState, WireError,
    VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG, VIRTIO_F_IOMMU_PLATFORM,
};
use dma_types::lock;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use virtio_contract::{PollConfig, PollWindow, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::IntoBytes;

/// Protocol features offered: multiqueue introspection, reply-ack, the back-end request
/// channel, device configuration and our push ring ([`crate::push_ring`]). The
/// vhost-user spec's "IOMMU support" needs `REPLY_ACK` and `BACKEND_REQ` (QEMU refuses
/// `iommu_platform=on` without them).
pub const PROTOCOL_FEATURES: u64 = protocol::MQ
    | protocol::REPLY_ACK
    | protocol::BACKEND_REQ
    | protocol::CONFIG
    | protocol::APERTURE_PUSH_RING;

/// How a [`Session`] behaves.
#[derive(Clone, Debug, Default)]
pub struct SessionConfig {
    /// What the front-end may make the address space hold.
    pub limits: Limits,
    /// How IOTLB windows reach guest memory.
    pub map: MapPolicy,
    /// Refuse `SET_FEATURES` without `VIRTIO_F_IOMMU_PLATFORM`: this back-end then
    /// never maps all of guest RAM.
    pub require_iommu: bool,
    /// The longest the worker polls the rings after work before it sleeps until a
    /// kick (see the module docs; zero never polls), and the budget it polls within.
    pub poll: PollConfig,
}

/// Why a request was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Malformed message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Memory table or IOTLB refused.
    #[error(transparent)]
    Space(#[from] SpaceError),
    /// A vring index beyond the device's queues.
    #[error("vring {index} does not exist (the device has {queues})")]
    VringIndex {
        /// Index asked for.
        index: u32,
        /// Queues of the device.
        queues: usize,
    },
    /// A queue size that is not a power of two in 1..=max.
    #[error("vring {index}: size {num} is not a power of two in 1..={max}")]
    VringSize {
        /// Vring.
        index: u32,
        /// Size asked for.
        num: u32,
        /// The device's maximum.
        max: u16,
    },
    /// A ring address that is misaligned (virtio spec §2.7: descriptor table 16,
    /// available ring 2, used ring 4 bytes) or not in the memory table.
    #[error("vring {index}: {what} address {addr:#x} is {why}")]
    VringAddr {
        /// Vring.
        index: u32,
        /// Which ring part.
        what: &'static str,
        /// The address.
        addr: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Logging (`VHOST_VRING_F_LOG`) asked for; `VHOST_F_LOG_ALL` is not offered.
    #[error("vring {0}: used-ring logging is not supported")]
    VringLog(u32),
    /// A vring base beyond a split ring's 16-bit index.
    #[error("vring {index}: base {num} exceeds 65535")]
    VringBase {
        /// Vring.
        index: u32,
        /// Base asked for.
        num: u32,
    },
    /// Polling instead of a kick eventfd is not supported.
    #[error("vring {0}: a kick without file descriptor (polling) is not supported")]
    KickPolling(u32),
    /// `SET_VRING_ENABLE` with a value other than 0 or 1.
    #[error("vring {index}: enable value {num} is not 0 or 1")]
    VringEnable {
        /// Vring.
        index: u32,
        /// Value.
        num: u32,
    },
    /// Features not offered.
    #[error("features {acked:#x} include bits not offered ({offered:#x})")]
    Features {
        /// Features asked for.
        acked: u64,
        /// Features offered.
        offered: u64,
    },
    /// `SET_FEATURES` without `VIRTIO_F_IOMMU_PLATFORM` on a back-end that requires it.
    #[error("this back-end requires VIRTIO_F_IOMMU_PLATFORM (iommu_platform=on)")]
    IommuRequired,
    /// A request only legal after a negotiation that did not happen.
    #[error("{0} was not negotiated")]
    NotNegotiated(&'static str),
    /// A request that needs features to be set first.
    #[error("ring addresses before SET_FEATURES")]
    FeaturesUnset,
    /// The configuration is read-only.
    #[error("the device configuration is read-only")]
    ConfigReadOnly,
    /// An eventfd could not be used.
    #[error("cannot use the eventfd: {0}")]
    EventFd(io::Error),
    /// The push ring handed over cannot be used.
    #[error(transparent)]
    PushRing(#[from] RingError),
}

struct Ring {
    queue: Queue,
    kick: Option<Arc<File>>,
    started: bool,
    enabled: bool,
    broken: bool,
}

impl Ring {
    fn runnable(&self) -> bool {
        self.started && self.enabled && !self.broken && self.kick.is_some()
    }
}

struct DevState<D> {
    device: D,
    rings: Vec<Ring>,
}

struct Shared<D> {
    dev: Mutex<DevState<D>>,
    space: Arc<AddressSpace>,
    calls: Vec<Mutex<Option<Arc<File>>>>,
    errs: Vec<Mutex<Option<Arc<File>>>>,
    wake: EventFd,
    stop: AtomicBool,
    poll: PollConfig,
    polled: AtomicU64,
    poll_refused: AtomicU64,
}

fn signal(fd: &Mutex<Option<Arc<File>>>) {
    if let Some(f) = lock(fd).as_ref() {
        // An eventfd counter; a failed write (full counter) still leaves it signalled.
        let _ = (&**f).write(&1u64.to_ne_bytes());
    }
}

/// What a request produced.
enum Outcome {
    /// An explicit reply body.
    Reply(Vec<u8>),
    /// Done; reply-ack 0 if asked.
    Done,
}

/// What a finished session leaves.
#[derive(Debug)]
pub struct Report<D> {
    /// The device, with whatever counters it keeps.
    pub device: D,
    /// Exposure and IOTLB figures of the whole session (nothing is mapped any more).
    pub exposure: Exposure,
    /// The translation mode the front-end negotiated last.
    pub mode: Mode,
    /// Passes over a ring that found buffers by polling, without a kick.
    pub polled: u64,
    /// Times the worker would have polled but no turn of its poll budget came before
    /// its window ended (other pollers held them all).
    pub poll_refused: u64,
}

/// A vhost-user back-end session for one device.
pub struct Session<D> {
    shared: Arc<Shared<D>>,
    config: SessionConfig,
    device_features: u64,
    device_config: Vec<u8>,
    max_sizes: Vec<u16>,
    acked_features: Option<u64>,
    acked_protocol: u64,
    owner: bool,
}

impl<D> std::fmt::Debug for Session<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("device_features", &self.device_features)
            .field("acked_features", &self.acked_features)
            .field("acked_protocol", &self.acked_protocol)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice<GuestView> + Send> Session<D> {
    /// A session for `device`. Its features, queue sizes and configuration are read
    /// once here (both of our devices have a read-only configuration).
    ///
    /// # Errors
    /// If the wake-up eventfd cannot be created.
    pub fn new(device: D, config: SessionConfig) -> io::Result<Self> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let mut device_config = vec![0u8; crate::wire::MAX_CONFIG_SIZE as usize];
        let csize = (device.config_size() as usize).min(device_config.len());
        device.read_config(0, &mut device_config[..csize]);
        let device_features = device.device_features();
        let rings = max_sizes
            .iter()
            .map(|&m| {
                Ok(Ring {
                    queue: Queue::new(m).map_err(|e| io::Error::other(format!("{e:?}")))?,
                    kick: None,
                    started: false,
                    enabled: false,
                    broken: false,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let n = max_sizes.len();
        Ok(Self {
            shared: Arc::new(Shared {
                dev: Mutex::new(DevState { device, rings }),
                space: AddressSpace::with_policy(config.limits, config.map),
                calls: (0..n).map(|_| Mutex::new(None)).collect(),
                errs: (0..n).map(|_| Mutex::new(None)).collect(),
                wake: EventFd::new(EFD_NONBLOCK)?,
                stop: AtomicBool::new(false),
                poll: config.poll.clone(),
                polled: AtomicU64::new(0),
                poll_refused: AtomicU64::new(0),
            }),
            config,
            device_features,
            device_config,
            max_sizes,
            acked_features: None,
            acked_protocol: 0,
            owner: false,
        })
    }

    /// The address space (for exposure figures while the session runs).
    pub fn space(&self) -> Arc<AddressSpace> {
        Arc::clone(&self.shared.space)
    }

    /// Serves the connection until the front-end closes it; returns the device and the
    /// final exposure figures (all windows are unmapped by then).
    ///
    /// # Errors
    /// Socket errors; the session is over either way.
    pub fn run(self, sock: UnixStream) -> io::Result<Report<D>> {
        let shared = Arc::clone(&self.shared);
        let mut this = self;
        let result = std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name("vhost-iotlb-dev".into())
                .spawn_scoped(s, || worker(&shared))?;
            let r = this.serve(&sock);
            shared.stop.store(true, Ordering::Release);
            shared.space.set_cancel_misses(true);
            let _ = shared.wake.write(1);
            if worker.join().is_err() {
                eprintln!("vhost-iotlb: the device worker panicked");
            }
            r
        });
        let space = Arc::clone(&this.shared.space);
        let mode = space.mode();
        space.set_channel(None);
        let _ = space.set_mode(Mode::Unset);
        let exposure = space.exposure();
        drop(this);
        let shared = Arc::try_unwrap(shared)
            .map_err(|_| io::Error::other("session state still shared after the worker ended"))?;
        let polled = shared.polled.load(Ordering::Relaxed);
        let poll_refused = shared.poll_refused.load(Ordering::Relaxed);
        let dev = shared.dev.into_inner().unwrap_or_else(|e| e.into_inner());
        result.map(|()| Report {
            polled,
            poll_refused,
            device: dev.device,
            exposure,
            mode,
        })
    }

    fn serve(&mut self, sock: &UnixStream) -> io::Result<()> {
        while let Some(inc) = recv_message(sock)? {
            let header = inc.header;
            crate::trace!(
                "<- request {} flags {:#x} size {} fds {}",
                header.request,
                header.flags,
                header.size,
                inc.fds.len()
            );
            let decoded = match inc.payload {
                Err(size) => Err(WireError::PayloadTooLong(size)),
                Ok(p) => decode(&header, &p, inc.fds),
            };
            let outcome = decoded.map_err(SessionError::from).and_then(|r| {
                crate::trace!("   {r:?}");
                self.apply(r)
            });
            let explicit = matches!(
                header.request,
                req::GET_FEATURES
                    | req::GET_PROTOCOL_FEATURES
                    | req::GET_VRING_BASE
                    | req::GET_QUEUE_NUM
                    | req::GET_CONFIG
            );
            // IOTLB_MSG is acknowledged whenever asked ("VHOST_USER_IOTLB_MSG"); other
            // requests only with REPLY_ACK negotiated.
            let ack = header.need_reply()
                && (header.request == req::IOTLB_MSG
                    || self.acked_protocol & protocol::REPLY_ACK != 0);
            match outcome {
                Ok(Outcome::Reply(body)) => send_reply(sock, header.request, &body)?,
                Ok(Outcome::Done) if ack => send_reply(sock, header.request, &0u64.to_ne_bytes())?,
                Ok(Outcome::Done) => {}
                Err(e) => {
                    eprintln!("vhost-iotlb: request {} refused: {e}", header.request);
                    if explicit {
                        send_reply(sock, header.request, &[])?;
                    } else if ack {
                        send_reply(sock, header.request, &1u64.to_ne_bytes())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs `f` on the device state with the worker out of its batch.
    fn with_device<R>(&self, f: impl FnOnce(&mut DevState<D>) -> R) -> R {
        let sh = &self.shared;
        sh.space.set_cancel_misses(true);
        let mut g = lock(&sh.dev);
        sh.space.set_cancel_misses(false);
        let r = f(&mut g);
        drop(g);
        let _ = sh.wake.write(1);
        r
    }

    fn ring_index(&self, index: u32) -> Result<usize, SessionError> {
        let i = index as usize;
        if i < self.max_sizes.len() {
            Ok(i)
        } else {
            Err(SessionError::VringIndex {
                index,
                queues: self.max_sizes.len(),
            })
        }
    }

    fn offered_features(&self) -> u64 {
        self.device_features | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked_features
            .is_some_and(|f| f & VHOST_USER_F_PROTOCOL_FEATURES != 0)
    }

    fn apply(&mut self, request: Request) -> Result<Outcome, SessionError> {
        match request {
            Request::GetFeatures => Ok(Outcome::Reply(
                self.offered_features().to_ne_bytes().to_vec(),
            )),
            Request::SetFeatures(acked) => self.set_features(acked),
            Request::SetOwner => {
                self.owner = true;
                Ok(Outcome::Done)
            }
            Request::ResetOwner => {
                // Deprecated; the spec recommends disabling all rings.
                self.with_device(|st| {
                    for r in &mut st.rings {
                        r.started = false;
                        r.queue.set_ready(false);
                    }
                });
                Ok(Outcome::Done)
            }
            Request::SetMemTable(table) => {
                self.shared.space.set_regions(table)?;
                Ok(Outcome::Done)
            }
            Request::SetVringNum(VringState { index, num }) => {
                let i = self.ring_index(index)?;
                let max = self.max_sizes[i];
                if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
                    return Err(SessionError::VringSize { index, num, max });
                }
                self.with_device(|st| st.rings[i].queue.set_size(num as u16));
                Ok(Outcome::Done)
            }
            Request::SetVringAddr(a) => self.set_vring_addr(a),
            Request::SetVringBase(VringState { index, num }) => {
                let i = self.ring_index(index)?;
                let base =
                    u16::try_from(num).map_err(|_| SessionError::VringBase { index, num })?;
                self.with_device(|st| {
                    st.rings[i].queue.set_next_avail(base);
                    st.rings[i].queue.set_next_used(base);
                });
                Ok(Outcome::Done)
            }
            Request::GetVringBase(VringState { index, .. }) => {
                let i = self.ring_index(index)?;
                // "Ring states": GET_VRING_BASE stops the ring.
                let num = self.with_device(|st| {
                    let r = &mut st.rings[i];
                    r.started = false;
                    r.kick = None;
                    r.broken = false;
                    r.queue.set_ready(false);
                    r.queue.next_avail()
                });
                let state = VringState {
                    index,
                    num: u32::from(num),
                };
                Ok(Outcome::Reply(state.as_bytes().to_vec()))
            }
            Request::SetVringKick(index, fd) => {
                let i = self.ring_index(index)?;
                let fd = fd.ok_or(SessionError::KickPolling(index))?;
                let protocol = self.protocol_negotiated();
                self.with_device(|st| {
                    let r = &mut st.rings[i];
                    r.kick = Some(Arc::new(fd));
                    // "Ring states": a ring starts with its kick; without protocol
                    // features it starts enabled.
                    r.started = true;
                    r.broken = false;
                    if !protocol {
                        r.enabled = true;
                    }
                    r.queue.set_ready(true);
                });
                Ok(Outcome::Done)
            }
            Request::SetVringCall(index, fd) => {
                let i = self.ring_index(index)?;
                *lock(&self.shared.calls[i]) = fd.map(Arc::new);
                Ok(Outcome::Done)
            }
            Request::SetVringErr(index, fd) => {
                let i = self.ring_index(index)?;
                *lock(&self.shared.errs[i]) = fd.map(Arc::new);
                Ok(Outcome::Done)
            }
            Request::GetProtocolFeatures => {
                Ok(Outcome::Reply(PROTOCOL_FEATURES.to_ne_bytes().to_vec()))
            }
            Request::SetProtocolFeatures(p) => {
                if p & !PROTOCOL_FEATURES != 0 {
                    return Err(SessionError::Features {
                        acked: p,
                        offered: PROTOCOL_FEATURES,
                    });
                }
                self.acked_protocol = p;
                Ok(Outcome::Done)
            }
            Request::GetQueueNum => Ok(Outcome::Reply(
                (self.max_sizes.len() as u64).to_ne_bytes().to_vec(),
            )),
            Request::SetVringEnable(VringState { index, num }) => {
                let i = self.ring_index(index)?;
                if !self.protocol_negotiated() {
                    return Err(SessionError::NotNegotiated(
                        "VHOST_USER_F_PROTOCOL_FEATURES",
                    ));
                }
                let enable = match num {
                    0 => false,
                    1 => true,
                    _ => return Err(SessionError::VringEnable { index, num }),
                };
                self.with_device(|st| st.rings[i].enabled = enable);
                Ok(Outcome::Done)
            }
            Request::SetBackendReqFd(sock) => {
                if self.acked_protocol & protocol::BACKEND_REQ == 0 {
                    return Err(SessionError::NotNegotiated(
                        "VHOST_USER_PROTOCOL_F_BACKEND_REQ",
                    ));
                }
                let reply_ack = self.acked_protocol & protocol::REPLY_ACK != 0;
                let space = &self.shared.space;
                // The worker may hold the channel while it waits on a miss.
                space.set_cancel_misses(true);
                space.set_channel(Some(MissChannel::new(sock, reply_ack)));
                space.set_cancel_misses(false);
                Ok(Outcome::Done)
            }
            Request::SetPushRing(capacity, file) => {
                if self.acked_protocol & protocol::APERTURE_PUSH_RING == 0 {
                    return Err(SessionError::NotNegotiated("APERTURE_PUSH_RING"));
                }
                let ring = Consumer::open(&file, capacity)?;
                self.shared.space.set_push_ring(Some(ring));
                Ok(Outcome::Done)
            }
            // Pushes made before the message come first (see `push_ring`).
            Request::IotlbUpdate {
                iova,
                size,
                uaddr,
                perm,
            } => {
                self.shared.space.apply_pushes();
                self.shared.space.update(iova, size, uaddr, perm)?;
                Ok(Outcome::Done)
            }
            Request::IotlbInvalidate { iova, size } => {
                self.shared.space.apply_pushes();
                self.shared.space.invalidate(iova, size)?;
                Ok(Outcome::Done)
            }
            Request::GetConfig(ConfigHeader {
                offset,
                size,
                flags,
            }) => {
                // Bounds were checked by decode: offset + size ≤ 256 = the cache's size.
                let body = &self.device_config[offset as usize..(offset + size) as usize];
                let mut reply = ConfigHeader {
                    offset,
                    size,
                    flags,
                }
                .as_bytes()
                .to_vec();
                reply.extend_from_slice(body);
                Ok(Outcome::Reply(reply))
            }
            Request::SetConfig(..) => Err(SessionError::ConfigReadOnly),
        }
    }

    fn set_features(&mut self, acked: u64) -> Result<Outcome, SessionError> {
        let offered = self.offered_features();
        if acked & !offered != 0 {
            return Err(SessionError::Features { acked, offered });
        }
        let iommu = acked & VIRTIO_F_IOMMU_PLATFORM != 0;
        if self.config.require_iommu && !iommu {
            return Err(SessionError::IommuRequired);
        }
        self.shared
            .space
            .set_mode(if iommu { Mode::Iotlb } else { Mode::Plain })?;
        let device_acked = acked & !VHOST_USER_F_PROTOCOL_FEATURES;
        self.with_device(|st| {
            st.device.set_acked_features(device_acked);
            for r in &mut st.rings {
                // Event index is not offered by our devices; keep virtio-queue in step.
                r.queue.set_event_idx(
                    device_acked & (1 << virtio_contract::VIRTIO_RING_F_EVENT_IDX) != 0,
                );
            }
        });
        self.acked_features = Some(acked);
        Ok(Outcome::Done)
    }

    fn set_vring_addr(&mut self, a: VringAddr) -> Result<Outcome, SessionError> {
        let i = self.ring_index(a.index)?;
        if a.flags & VHOST_VRING_F_LOG != 0 {
            return Err(SessionError::VringLog(a.index));
        }
        let mode = self.shared.space.mode();
        let err = |what, addr, why| SessionError::VringAddr {
            index: a.index,
            what,
            addr,
            why,
        };
        // Vhost-user spec, "A vring address description": IOVAs with
        // VIRTIO_F_IOMMU_PLATFORM, user addresses otherwise (translated to guest
        // physical addresses here, which is what plain-mode windows are keyed by).
        let to_bus = |what, addr: u64| match mode {
            Mode::Iotlb => Ok(addr),
            Mode::Plain => self
                .shared
                .space
                .uaddr_to_gpa(addr)
                .ok_or_else(|| err(what, addr, "not in the memory table")),
            Mode::Unset => Err(SessionError::FeaturesUnset),
        };
        let desc = to_bus("descriptor table", a.desc)?;
        let avail = to_bus("available ring", a.avail)?;
        let used = to_bus("used ring", a.used)?;
        // Virtio spec §2.7 (split virtqueue alignment).
        for (what, addr, align) in [
            ("descriptor table", desc, 16),
            ("available ring", avail, 2),
            ("used ring", used, 4),
        ] {
            if addr % align != 0 {
                return Err(err(what, addr, "misaligned"));
            }
        }
        let split = |v: u64| (Some(v as u32), Some((v >> 32) as u32));
        self.with_device(|st| {
            let q = &mut st.rings[i].queue;
            let (l, h) = split(desc);
            q.set_desc_table_address(l, h);
            let (l, h) = split(avail);
            q.set_avail_ring_address(l, h);
            let (l, h) = split(used);
            q.set_used_ring_address(l, h);
        });
        Ok(Outcome::Done)
    }
}

/// The device worker: waits for kicks (and wake-ups from the main thread), then
/// processes each ring that is started, enabled and was kicked.
fn worker<D: VirtioDevice<GuestView>>(sh: &Shared<D>) {
    let mut window = PollWindow::new(sh.poll.clone());
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let kicks: Vec<Option<Arc<File>>> =
            lock(&sh.dev).rings.iter().map(|r| r.kick.clone()).collect();
        let mut pfds = vec![libc::pollfd {
            fd: sh.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut which = Vec::new();
        for (i, k) in kicks.iter().enumerate() {
            if let Some(f) = k {
                pfds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        // SAFETY: `pfds` is a live array of pollfds; every fd in it is kept open by
        // `sh.wake` or by an `Arc<File>` in `kicks`, alive across the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("vhost-iotlb: the device worker cannot poll: {e}");
            return;
        }
        let woken = pfds[0].revents != 0;
        if woken {
            let _ = sh.wake.read();
        }
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let mut run = vec![woken; kicks.len()];
        for (p, &i) in pfds[1..].iter().zip(&which) {
            if p.revents != 0 {
                if let Some(f) = &kicks[i] {
                    let mut b = [0u8; 8];
                    let _ = (&**f).read(&mut b);
                }
                run[i] = true;
            }
        }
        for (i, go) in run.into_iter().enumerate() {
            if go {
                process(sh, i, false);
            }
        }
        // Kicks off while work keeps coming within the window.
        if window.woken()
            && !window.poll(
                || sh.stop.load(Ordering::Acquire),
                || poll_rings(sh),
                |polling| {
                    sh.space.set_ring_polling(polling);
                    set_notifications(sh, !polling)
                },
            )
        {
            sh.poll_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Turns the driver's notifications off or on for every runnable ring; on, returns
/// whether a ring received buffers meanwhile (virtio-queue's `enable_notification`
/// fences and re-reads `avail->idx`). A ring whose flags cannot be written keeps
/// notifying, which is always correct.
fn set_notifications<D>(sh: &Shared<D>, on: bool) -> bool {
    let view = sh.space.view();
    let mut st = lock(&sh.dev);
    let mut published = false;
    for ring in st.rings.iter_mut().filter(|r| r.runnable()) {
        if on {
            published |= ring.queue.enable_notification(&view).unwrap_or(false);
        } else {
            let _ = ring.queue.disable_notification(&view);
        }
    }
    published
}

/// Serves every runnable ring whose driver published buffers the device has not
/// taken; returns whether any were taken, or any invalidation came through the
/// front-end's ring. A ring that cannot be read is not work.
///
/// First it maps what the front-end pushed since the last pass, while the guest is
/// still mapping the rest of its request (left to the request's first miss, those
/// mappings would be made on the request's path), and applies the invalidations it
/// wrote, which the guest's UNMAPs wait for. Those are work: a guest unmapping its
/// last request keeps the worker polling, so that its invalidations keep going
/// through the ring and its next request is found without a kick. Pushes are not:
/// while the guest maps, the front-end's poller serves it and needs the turns.
fn poll_rings<D: VirtioDevice<GuestView>>(sh: &Shared<D>) -> bool {
    let ring_work = sh.space.apply_ring() > 0;
    let view = sh.space.view();
    let published: Vec<(usize, u16)> = lock(&sh.dev)
        .rings
        .iter()
        .enumerate()
        .filter(|(_, r)| r.runnable())
        .filter_map(|(i, r)| {
            let before = r.queue.next_avail();
            let idx = r.queue.avail_idx(&view, Ordering::Acquire).ok()?;
            (idx.0 != before).then_some((i, before))
        })
        .collect();
    drop(view);
    let mut took = ring_work;
    for (i, before) in published {
        process(sh, i, true);
        if lock(&sh.dev).rings[i].queue.next_avail() != before {
            sh.polled.fetch_add(1, Ordering::Relaxed);
            took = true;
        }
    }
    took
}

/// Serves ring `i` as a kick asks; `polling`: the worker polls it with notifications
/// off, so they are not turned back on.
fn process<D: VirtioDevice<GuestView>>(sh: &Shared<D>, i: usize, polling: bool) {
    let mut st = lock(&sh.dev);
    let DevState { device, rings } = &mut *st;
    let Some(ring) = rings.get_mut(i) else {
        return;
    };
    if !ring.runnable() {
        return;
    }
    let view = sh.space.view();
    if crate::trace_on() {
        use vm_memory::Bytes;
        let a = vm_memory::GuestAddress(ring.queue.avail_ring());
        let u = vm_memory::GuestAddress(ring.queue.used_ring());
        eprintln!(
            "vhost-iotlb: queue {i}: processing from avail {} (ring avail {:?} used {:?})",
            ring.queue.next_avail(),
            view.read_obj::<[u16; 2]>(a),
            view.read_obj::<[u16; 2]>(u)
        );
    }
    // As the transport serves a notification: with EVENT_IDX, avail_event follows,
    // and no call goes out that the driver did not ask for.
    // Each process_queue is one batch of the address space (see `AddressSpace`'s
    // `Batch` hooks): an INVALIDATE of a window it translated waits for its end.
    let result =
        virtio_contract::serve_queue(device, i, &mut ring.queue, &view, &*sh.space, polling);
    crate::trace!(
        "queue {i}: done at avail {}: {result:?}",
        ring.queue.next_avail()
    );
    // Unpins the windows of the view: revoked ones are unmapped now.
    drop(view);
    match result {
        Ok(virtio_contract::Interrupt::Send) => signal(&sh.calls[i]),
        Ok(_) => {}
        Err(e) => {
            eprintln!("vhost-iotlb: queue {i} failed and is stopped until restarted: {e}");
            ring.broken = true;
            signal(&sh.errs[i]);
        }
    }
}
