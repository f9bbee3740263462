//! A device whose queues run in another process: the front-end side of vhost-user
//! (QEMU's `docs/interop/vhost-user.rst`). [`VhostUserDevice`] is a
//! `virtio_pci::VirtioDevice` like our in-process devices, so the guest sees the same
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
//! memory: in pool mode ([`VhostUserDevice::share_only`]) it receives the restricted
//! DMA pool's own memory file and nothing else.
//!
//! # Threads and locks
//! The function's server thread drives the device (activation, kicks, reset). The
//! virtio-iommu's server thread calls the subscriber after it dropped the IOMMU's
//! tables; the subscriber updates the shadow and queues IOTLB messages, and never
//! waits for the back-end. One thread per device (the IOTLB thread) sends those
//! messages in order, waits for each INVALIDATE's ack, then drops the virtio-iommu
//! [`Hold`](virtio_iommu::Hold) that keeps the guest's UNMAP from completing. One thread
//! per connection reads the back-end request channel (so a MISS sent while the
//! front-end waits for an ack on the main socket is still answered), and one thread per
//! device turns call eventfds into interrupts and marks the device as needing reset
//! when the connection breaks. Lock order: the IOTLB shadow, then the main socket; the
//! main socket is held for one request and its reply, bounded by the deadline. Nothing
//! that holds the shadow or the socket takes the IOMMU's tables or the transport, or
//! drops a hold. A back-end that waits for a MISS answer before replying on the main
//! socket cannot be served (the UPDATE needs that socket); the deadline bounds it.

use crate::host::{EndpointMemory, Function};
use crate::vfio::{EventFdSink, MemoryBuilder, MsixVectors, NotifyHook, PciFunction};
use dma_types::lock;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use virtio_iommu::{EndpointId, EndpointIommu, MappingEvent, MappingSubscriber, Settle};
use virtio_pci::{
    device_status, ActiveQueue, InterruptSink, VirtioDevice, VirtioPciTransport,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    Iommu, Permissions,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::{FromBytes, IntoBytes};

/// The wire format ("Message Specification" of vhost-user.rst): the structs and codes
/// of `vhost_iotlb::wire`, which the back-end library decodes with, under the names
/// this front-end uses.
pub mod wire {
    use vhost_iotlb::wire as w;

    pub use w::{backend_req, req, Header, IotlbMsg, MemoryRegion, VringAddr, VringState};
    pub use w::{ConfigHeader as ConfigHead, MemoryHeader as MemoryHead};

    /// Header flags: version 1 in bits 0–1.
    pub const VERSION: u32 = w::flags::VERSION;
    /// Header flags: the version field.
    pub const VERSION_MASK: u32 = w::flags::VERSION_MASK;
    /// Header flags: this is a reply.
    pub const FLAG_REPLY: u32 = w::flags::REPLY;
    /// Header flags: the sender wants a reply-ack.
    pub const FLAG_NEED_REPLY: u32 = w::flags::NEED_REPLY;

    /// `VHOST_USER_F_PROTOCOL_FEATURES`, a virtio feature bit reused by vhost-user.
    pub const F_PROTOCOL_FEATURES: u32 = w::VHOST_USER_F_PROTOCOL_FEATURES.trailing_zeros();
    /// `VHOST_USER_PROTOCOL_F_REPLY_ACK` (bit number).
    pub const PROTOCOL_F_REPLY_ACK: u32 = w::protocol::REPLY_ACK.trailing_zeros();
    /// `VHOST_USER_PROTOCOL_F_BACKEND_REQ` (bit number).
    pub const PROTOCOL_F_BACKEND_REQ: u32 = w::protocol::BACKEND_REQ.trailing_zeros();
    /// `VHOST_USER_PROTOCOL_F_CONFIG` (bit number).
    pub const PROTOCOL_F_CONFIG: u32 = w::protocol::CONFIG.trailing_zeros();

    /// IOTLB message type: back-end lacks a translation.
    pub const IOTLB_MISS: u8 = w::iotlb::MISS;
    /// IOTLB message type: a translation.
    pub const IOTLB_UPDATE: u8 = w::iotlb::UPDATE;
    /// IOTLB message type: drop translations of a range.
    pub const IOTLB_INVALIDATE: u8 = w::iotlb::INVALIDATE;
    /// IOTLB message type: an access the IOTLB does not allow.
    pub const IOTLB_ACCESS_FAIL: u8 = w::iotlb::ACCESS_FAIL;
    /// IOTLB permission: read.
    pub const ACCESS_RO: u8 = w::iotlb::PERM_RO;
    /// IOTLB permission: write.
    pub const ACCESS_WO: u8 = w::iotlb::PERM_WO;
    /// IOTLB permission: read and write.
    pub const ACCESS_RW: u8 = w::iotlb::PERM_RW;

    /// Most regions in one `SET_MEM_TABLE` (`VHOST_MEMORY_BASELINE_NREGIONS`).
    pub const MAX_MEM_REGIONS: usize = w::MAX_REGIONS;
    /// Most device configuration bytes one `GET_CONFIG` carries.
    pub const MAX_CONFIG: usize = w::MAX_CONFIG_SIZE as usize;
    /// Largest payload read from a back-end: more than any message we accept needs
    /// (`GET_CONFIG` with 256 bytes), bounded so a back-end cannot make us allocate.
    pub const MAX_PAYLOAD: u32 = w::MAX_PAYLOAD as u32;
}

use wire::{req, Header};

/// Default deadline for every back-end answer (and for an INVALIDATE's ack).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Front-end addresses are synthetic: `UADDR_BASE + guest-physical address`. The
/// back-end only uses them as keys (vhost-user.rst "Memory access"), and one linear
/// space lets adjacent pieces of one file be one region. Never zero.
pub const UADDR_BASE: u64 = 1 << 48;

/// Most UPDATE windows remembered per device; past it the next unmap invalidates
/// everything and starts over (bounds what a back-end's misses make us keep).
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
    /// A virtio-net transmit queue alone (device type 1): the cost survey's sink
    /// (`aperture backend net-tx`), which takes frames and drops them. Not a whole
    /// virtio-net device (it has no receive queue), so no guest driver binds it.
    NetTx,
}

/// Queue size offered for each kind's single queue (QEMU's vhost-user-blk default).
const QUEUE_SIZES: [u16; 1] = [256];

impl DeviceKind {
    /// Virtio device type.
    pub fn device_type(self) -> u16 {
        match self {
            Self::Block => 2,
            Self::Rng => 4,
            Self::NetTx => 1,
        }
    }

    /// PCI class code, as for our in-process devices.
    pub fn class_code(self) -> u32 {
        match self {
            Self::Block => 0x01_80_00,
            Self::Rng => 0xff_00_00,
            Self::NetTx => 0x02_00_00,
        }
    }

    /// Bytes of device configuration forwarded: virtio-blk up to `blk_size` (§5.2.4:
    /// capacity, size_max, seg_max, geometry, blk_size), virtio-rng and the transmit
    /// sink have none.
    pub fn config_size(self) -> u32 {
        match self {
            Self::Block => 24,
            Self::Rng | Self::NetTx => 0,
        }
    }

    /// Device feature bits passed through: for virtio-blk those whose fields lie in
    /// the forwarded configuration (SIZE_MAX 1, SEG_MAX 2, GEOMETRY 4, RO 5,
    /// BLK_SIZE 6) and FLUSH 9; one queue, so never MQ.
    fn device_bits(self) -> u64 {
        match self {
            Self::Block => (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 9),
            Self::Rng | Self::NetTx => 0,
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
}

#[derive(Default)]
struct AtomicCounters {
    misses: AtomicU64,
    updates: AtomicU64,
    pushed: AtomicU64,
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

/// One connection to a back-end: the main socket, used for one request and its reply
/// at a time.
struct Link {
    main: Mutex<UnixStream>,
    /// Protocol features both sides enabled.
    protocol: u64,
    /// The back-end's virtio features.
    features: u64,
    timeout: Duration,
    /// A clone of our end of the back-end request channel, to shut it down.
    backend_req: Option<UnixStream>,
}

/// What a request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// Nothing; a reply-ack when REPLY_ACK is enabled.
    None,
    /// Nothing, even with REPLY_ACK enabled (`need_reply` clear): an IOTLB UPDATE,
    /// which the back-end applies in order with everything else on the socket.
    Posted,
    /// A reply-ack, which must be enabled.
    Ack,
    /// A payload of exactly this many bytes.
    Payload(usize),
}

fn has(bits: u64, bit: u32) -> bool {
    bits & (1 << bit) != 0
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_by(
    sock: &mut UnixStream,
    buf: &mut [u8],
    deadline: Instant,
    request: u32,
    timeout: Duration,
) -> Result<(), VhostUserError> {
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VhostUserError::Timeout { request, timeout });
        }
        sock.set_read_timeout(Some(left))
            .map_err(|source| VhostUserError::Io { request, source })?;
        match sock.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(VhostUserError::Io {
                    request,
                    source: ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(n) => done += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(VhostUserError::Timeout { request, timeout })
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(source) => return Err(VhostUserError::Io { request, source }),
        }
    }
    Ok(())
}

/// Sends one message, all of it, with `fds` on its first byte.
fn send_msg(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), VhostUserError> {
    let io = |source| VhostUserError::Io { request, source };
    let size = u32::try_from(payload.len()).map_err(|_| {
        VhostUserError::Guest(format!(
            "request {request} payload of {} bytes is too large",
            payload.len()
        ))
    })?;
    let hdr = Header {
        request,
        flags,
        size,
    };
    let mut msg = Vec::with_capacity(size_of::<Header>() + payload.len());
    msg.extend_from_slice(hdr.as_bytes());
    msg.extend_from_slice(payload);
    let sent = sock
        .send_with_fds(&[msg.as_slice()], fds)
        .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
    // A stream socket may take a message in parts; the descriptors went with the first.
    let mut rest = msg.get(sent..).unwrap_or_default();
    let mut w = sock;
    while !rest.is_empty() {
        let n = w.write(rest).map_err(io)?;
        if n == 0 {
            return Err(io(ErrorKind::WriteZero.into()));
        }
        rest = &rest[n..];
    }
    Ok(())
}

impl Link {
    /// Sends `request` and waits for what `reply` says, under the main socket's lock.
    fn request(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        reply: Reply,
    ) -> Result<Vec<u8>, VhostUserError> {
        let mut sock = lock(&self.main);
        self.request_locked(&mut sock, request, payload, fds, reply)
    }

    fn request_locked(
        &self,
        sock: &mut UnixStream,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        reply: Reply,
    ) -> Result<Vec<u8>, VhostUserError> {
        let ack_on = has(self.protocol, wire::PROTOCOL_F_REPLY_ACK);
        let want_ack = match reply {
            Reply::None => ack_on,
            Reply::Posted => false,
            Reply::Ack if !ack_on => {
                return Err(VhostUserError::BadReply {
                    request,
                    why: "a reply-ack is needed but REPLY_ACK was not negotiated".into(),
                })
            }
            Reply::Ack => true,
            Reply::Payload(_) => false,
        };
        let flags = wire::VERSION | if want_ack { wire::FLAG_NEED_REPLY } else { 0 };
        send_msg(sock, request, flags, payload, fds)?;
        let expect = match reply {
            _ if want_ack => 8,
            Reply::Payload(n) => n,
            _ => return Ok(Vec::new()),
        };
        let deadline = Instant::now() + self.timeout;
        let mut h = Header::default();
        read_by(sock, h.as_mut_bytes(), deadline, request, self.timeout)?;
        let bad = |why: String| VhostUserError::BadReply { request, why };
        if h.size > wire::MAX_PAYLOAD {
            return Err(bad(format!("payload of {} bytes", h.size)));
        }
        let mut body = vec![0u8; h.size as usize];
        read_by(sock, &mut body, deadline, request, self.timeout)?;
        if h.request != request {
            return Err(bad(format!("it answers request {}", h.request)));
        }
        if h.flags & wire::VERSION_MASK != wire::VERSION || h.flags & wire::FLAG_REPLY == 0 {
            return Err(bad(format!(
                "header flags {:#x} (version 1 and reply expected)",
                h.flags
            )));
        }
        if body.len() != expect {
            return Err(bad(format!(
                "{} payload bytes, {expect} expected",
                body.len()
            )));
        }
        if want_ack {
            let status = u64::read_from_bytes(&body).unwrap_or(u64::MAX);
            if status != 0 {
                return Err(VhostUserError::Refused { request, status });
            }
        }
        Ok(body)
    }

    fn get_u64(&self, request: u32) -> Result<u64, VhostUserError> {
        let body = self.request(request, &[], &[], Reply::Payload(8))?;
        Ok(u64::read_from_bytes(&body).unwrap_or_default())
    }

    /// Connects and runs the session start: SET_OWNER, GET_FEATURES, protocol
    /// features, the back-end request channel. Returns the link and our end of the
    /// back-end request channel.
    fn connect(
        path: &Path,
        timeout: Duration,
    ) -> Result<(Self, Option<UnixStream>), VhostUserError> {
        let main = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut link = Self {
            main: Mutex::new(main),
            protocol: 0,
            features: 0,
            timeout,
            backend_req: None,
        };
        link.request(req::SET_OWNER, &[], &[], Reply::None)?;
        link.features = link.get_u64(req::GET_FEATURES)?;
        let mut ours = None;
        if has(link.features, wire::F_PROTOCOL_FEATURES) {
            let theirs = link.get_u64(req::GET_PROTOCOL_FEATURES)?;
            let wanted = (1 << wire::PROTOCOL_F_REPLY_ACK)
                | (1 << wire::PROTOCOL_F_BACKEND_REQ)
                | (1 << wire::PROTOCOL_F_CONFIG);
            let protocol = theirs & wanted;
            link.request(
                req::SET_PROTOCOL_FEATURES,
                protocol.as_bytes(),
                &[],
                Reply::None,
            )?;
            link.protocol = protocol;
            if has(protocol, wire::PROTOCOL_F_BACKEND_REQ) {
                let (mine, theirs) = UnixStream::pair().map_err(|source| VhostUserError::Io {
                    request: req::SET_BACKEND_REQ_FD,
                    source,
                })?;
                link.request(
                    req::SET_BACKEND_REQ_FD,
                    &[],
                    &[theirs.as_raw_fd()],
                    Reply::None,
                )?;
                link.backend_req = mine.try_clone().ok();
                ours = Some(mine);
            }
        }
        Ok((link, ours))
    }

    fn shutdown(&self) {
        let _ = lock(&self.main).shutdown(std::net::Shutdown::Both);
        if let Some(s) = &self.backend_req {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One region of the memory table as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
}

impl Region {
    fn last(&self) -> u64 {
        self.gpa + (self.size - 1)
    }
}

/// One mapping of the endpoint as its subscriber was told.
#[derive(Clone, Copy, Debug)]
struct ShadowMap {
    end: u64,
    phys: u64,
    perms: Permissions,
}

/// An UPDATE: `[iova, iova + size)` at front-end address `uaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    iova: u64,
    size: u64,
    uaddr: u64,
    perm: u8,
}

impl Window {
    fn update(&self) -> wire::IotlbMsg {
        wire::IotlbMsg {
            iova: self.iova,
            size: self.size,
            uaddr: self.uaddr,
            perm: self.perm,
            kind: wire::IOTLB_UPDATE,
            padding: [0; 6],
        }
    }
}

/// IOTLB messages for the device's IOTLB thread, sent in the order they were queued.
enum IotlbJob {
    /// An UPDATE the back-end did not ask for: the guest just mapped this.
    Push(Window),
    /// An INVALIDATE of `[lo, hi]`, acknowledged; `done` runs after the ack or the
    /// deadline, holding no lock.
    Invalidate {
        lo: u64,
        hi: u64,
        done: Box<dyn FnOnce() + Send>,
    },
}

/// The front-end's copy of the endpoint's translation and of what the back-end holds.
#[derive(Debug, Default)]
struct IotlbState {
    identity: bool,
    mappings: BTreeMap<u64, ShadowMap>,
    /// Windows sent in UPDATEs since the last invalidation covering them: first →
    /// last IOVA. May hold windows never sent (a retried miss); never misses one sent.
    given: BTreeMap<u64, u64>,
    /// The memory table as sent.
    regions: Vec<Region>,
    /// ACCESS_PLATFORM negotiated and the memory table sent: misses are answered.
    active: bool,
}

fn perm_bits(p: Permissions) -> u8 {
    match p {
        Permissions::No => 0,
        Permissions::Read => wire::ACCESS_RO,
        Permissions::Write => wire::ACCESS_WO,
        Permissions::ReadWrite => wire::ACCESS_RW,
    }
}

fn access_of(perm: u8) -> Option<Permissions> {
    match perm {
        wire::ACCESS_RO => Some(Permissions::Read),
        wire::ACCESS_WO => Some(Permissions::Write),
        wire::ACCESS_RW => Some(Permissions::ReadWrite),
        _ => None,
    }
}

impl IotlbState {
    fn region_of(&self, gpa: u64) -> Option<Region> {
        self.regions
            .iter()
            .find(|r| r.gpa <= gpa && gpa <= r.last())
            .copied()
    }

    /// The window answering a miss at `iova` for `access`: the part of the guest's
    /// mapping holding `iova` that lies in one memory-table region. `None` when the
    /// guest did not map `iova` with that access, or it maps outside guest RAM.
    fn window(&self, iova: u64, access: Permissions) -> Option<Window> {
        if !self.active {
            return None;
        }
        let (start, m) = if self.identity {
            let r = self.region_of(iova)?;
            (
                r.gpa,
                ShadowMap {
                    end: r.last(),
                    phys: r.gpa,
                    perms: Permissions::ReadWrite,
                },
            )
        } else {
            let (&s, m) = self.mappings.range(..=iova).next_back()?;
            (iova <= m.end).then_some((s, *m))?
        };
        if !m.perms.allow(access) {
            return None;
        }
        let gpa = m.phys.checked_add(iova - start)?;
        let r = self.region_of(gpa)?;
        let below = (iova - start).min(gpa - r.gpa);
        let above = (m.end - iova).min(r.last() - gpa);
        let first = iova - below;
        // `[first, iova + above]` has at most 2^64 bytes; keep it representable.
        let size = (below + above).saturating_add(1);
        Some(Window {
            iova: first,
            size,
            uaddr: r.uaddr + (gpa - below - r.gpa),
            perm: perm_bits(m.perms),
        })
    }

    /// Records `w` as given, unless that would exceed [`MAX_WINDOWS`].
    fn give(&mut self, w: &Window) -> bool {
        if self.given.len() >= MAX_WINDOWS {
            return false;
        }
        let last = w.iova + (w.size - 1);
        let e = self.given.entry(w.iova).or_insert(last);
        *e = (*e).max(last);
        true
    }

    /// The windows to push for the guest's mapping `[start, end]` (one per
    /// memory-table region it spans), recorded as given. Stops early, leaving the rest
    /// to misses, when the windows cannot be remembered.
    fn push_windows(&mut self, start: u64, end: u64, perms: Permissions) -> Vec<Window> {
        let mut out = Vec::new();
        let mut iova = start;
        while let Some(w) = self.window(iova, perms) {
            if !self.give(&w) {
                break;
            }
            out.push(w);
            match w.iova.checked_add(w.size) {
                Some(next) if next <= end && next > iova => iova = next,
                _ => break,
            }
        }
        out
    }

    /// Forgets the windows overlapping `[start, end]` and returns their hull (what
    /// the back-end must drop), or `None` if it holds none of that range.
    fn take_given(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        let hit: Vec<(u64, u64)> = self
            .given
            .range(..=end)
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let lo = hit.iter().map(|w| w.0).min()?;
        let hi = hit.iter().map(|w| w.1).max()?;
        for (s, _) in hit {
            self.given.remove(&s);
        }
        Some((lo, hi))
    }
}

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
    /// To the IOTLB thread, which alone sends pushes and invalidations.
    jobs: mpsc::Sender<IotlbJob>,
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

    /// Answers a MISS: an UPDATE for the window holding `iova`, or a refusal (and a
    /// fault event) when the guest did not map it with `perm`. Returns whether an
    /// UPDATE was sent.
    ///
    /// The window is computed under the shadow's lock, recorded as given, and sent
    /// under the main socket's lock only if no translation was removed meanwhile
    /// (`generation` unchanged): an UNMAP either comes before (the miss is retried
    /// against the new state) or its INVALIDATE goes after the UPDATE on the socket.
    fn answer_miss(&self, iova: u64, perm: u8) -> bool {
        bump(&self.counters.misses);
        let Some(access) = access_of(perm) else {
            bump(&self.counters.refused);
            return false;
        };
        for _ in 0..8 {
            let (window, generation) = {
                let mut st = lock(&self.iotlb);
                let g = self.generation.load(Ordering::Acquire);
                let w = st.window(iova, access);
                if let Some(w) = w {
                    if !st.give(&w) {
                        // Cannot remember more: refuse rather than lose track.
                        drop(st);
                        bump(&self.counters.refused);
                        return false;
                    }
                }
                (w, g)
            };
            let Some(w) = window else {
                break;
            };
            let msg = w.update();
            let sent = self.with_link(|link| {
                let mut sock = lock(&link.main);
                if self.generation.load(Ordering::Acquire) != generation {
                    return Ok(false);
                }
                link.request_locked(&mut sock, req::IOTLB_MSG, msg.as_bytes(), &[], Reply::None)?;
                Ok(true)
            });
            match sent {
                Ok(true) => {
                    bump(&self.counters.updates);
                    return true;
                }
                Ok(false) => continue,
                Err(_) => return false,
            }
        }
        bump(&self.counters.refused);
        self.fault(iova, access);
        false
    }

    /// Raises the fault event the in-process path would: the access is checked
    /// against the IOMMU's own tables, which report it to the guest.
    fn fault(&self, iova: u64, access: Permissions) {
        if let Some(ep) = lock(&self.iommu).clone() {
            let _ = ep.translate(GuestAddress(iova), 1, access);
        }
    }

    /// Queues IOTLB messages for the IOTLB thread. Should it be gone (the device is
    /// being dropped), an invalidation's `done` runs at once, dropped with the job.
    fn queue(&self, job: IotlbJob) {
        if let Err(mpsc::SendError(IotlbJob::Invalidate { done, .. })) = self.jobs.send(job) {
            done();
        }
    }

    /// Invalidates `[lo, hi]` through the IOTLB thread and waits until the back-end
    /// acknowledged or the deadline passed.
    fn invalidate_and_wait(&self, lo: u64, hi: u64) {
        let (tx, rx) = mpsc::channel();
        self.queue(IotlbJob::Invalidate {
            lo,
            hi,
            done: Box::new(move || {
                let _ = tx.send(());
            }),
        });
        let _ = rx.recv();
    }

    /// Sends INVALIDATE for `[start, end]` and waits for the ack, up to the deadline;
    /// a back-end that does not ack breaks the connection (the device needs reset).
    fn invalidate(&self, start: u64, end: u64) {
        let size = (end - start).saturating_add(1);
        let msg = wire::IotlbMsg {
            iova: start,
            size,
            kind: wire::IOTLB_INVALIDATE,
            ..wire::IotlbMsg::default()
        };
        let sent = Instant::now();
        let r =
            self.with_link(|link| link.request(req::IOTLB_MSG, msg.as_bytes(), &[], Reply::Ack));
        match r {
            Ok(_) => {
                bump(&self.counters.invalidates);
                let waited = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.counters
                    .invalidate_ns
                    .fetch_add(waited, Ordering::Relaxed);
            }
            Err(VhostUserError::Broken) => {}
            Err(e) => {
                bump(&self.counters.invalidate_failures);
                // A refusal leaves the back-end holding what the guest took away.
                if !e.breaks_connection() {
                    self.break_link();
                }
            }
        }
    }
}

/// The endpoint's mapping changes, as the virtio-iommu reports them (after its tables
/// changed, before the guest's request completes). Nothing here waits for the
/// back-end: the shadow is updated at once, pushes and invalidations go to the IOTLB
/// thread, and an UNMAP's request holds until its INVALIDATE was acknowledged.
struct Subscriber(Arc<Shared>);

impl MappingSubscriber for Subscriber {
    fn on_event(&self, _endpoint: EndpointId, event: &MappingEvent, settle: &Settle) {
        let s = &self.0;
        // Jobs are queued under the shadow's lock, so the IOTLB thread sends them in
        // the order the shadow changed, whoever changed it.
        let mut st = lock(&s.iotlb);
        let drop_range = match *event {
            MappingEvent::Mapped {
                start,
                end,
                phys,
                perms,
            } => {
                st.mappings.insert(
                    start.0,
                    ShadowMap {
                        end: end.0,
                        phys: phys.0,
                        perms,
                    },
                );
                for w in st.push_windows(start.0, end.0, perms) {
                    s.queue(IotlbJob::Push(w));
                }
                None
            }
            MappingEvent::Unmapped { start, end } => {
                let gone: Vec<u64> = st
                    .mappings
                    .range(start.0..=end.0)
                    .map(|(k, _)| *k)
                    .collect();
                for k in gone {
                    st.mappings.remove(&k);
                }
                s.generation.fetch_add(1, Ordering::AcqRel);
                st.take_given(start.0, end.0)
            }
            MappingEvent::Identity(on) => {
                st.identity = on;
                if on {
                    None
                } else {
                    s.generation.fetch_add(1, Ordering::AcqRel);
                    st.take_given(0, u64::MAX)
                }
            }
        };
        if let Some((lo, hi)) = drop_range {
            let hold = settle.hold();
            s.queue(IotlbJob::Invalidate {
                lo,
                hi,
                done: Box::new(move || drop(hold)),
            });
        }
    }
}

/// The IOTLB thread: sends what [`Subscriber`] queued, in order, so that a back-end
/// slow to acknowledge delays only its own invalidations, never the virtio-iommu.
fn iotlb_loop(shared: Weak<Shared>, jobs: mpsc::Receiver<IotlbJob>) {
    while let Ok(job) = jobs.recv() {
        let Some(s) = shared.upgrade() else {
            break;
        };
        match job {
            IotlbJob::Push(w) => {
                let msg = w.update();
                let sent = s.with_link(|link| {
                    link.request(req::IOTLB_MSG, msg.as_bytes(), &[], Reply::Posted)
                });
                if sent.is_ok() {
                    bump(&s.counters.pushed);
                }
            }
            IotlbJob::Invalidate { lo, hi, done } => {
                s.invalidate(lo, hi);
                done();
            }
        }
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
        VhostUserCounters {
            misses: l(&c.misses),
            updates: l(&c.updates),
            pushed: l(&c.pushed),
            refused: l(&c.refused),
            access_fails: l(&c.access_fails),
            invalidates: l(&c.invalidates),
            invalidate_ns: l(&c.invalidate_ns),
            invalidate_failures: l(&c.invalidate_failures),
            bad_messages: l(&c.bad_messages),
            reconnects: l(&c.reconnects),
            failed_requests: l(&c.failed_requests),
        }
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

/// Reads and answers back-end requests until the channel closes.
fn backend_req_loop(shared: Weak<Shared>, mut sock: UnixStream, link: Weak<Link>) {
    loop {
        let mut h = Header::default();
        if sock.read_exact(h.as_mut_bytes()).is_err() {
            break;
        }
        let Some(s) = shared.upgrade() else {
            return;
        };
        let need_reply = h.flags & wire::FLAG_NEED_REPLY != 0;
        // A message too large to be one we know cannot be skipped safely.
        if h.size > wire::MAX_PAYLOAD {
            bump(&s.counters.bad_messages);
            break;
        }
        let mut body = vec![0u8; h.size as usize];
        let _ = sock.set_read_timeout(Some(s.timeout));
        let got = sock.read_exact(&mut body);
        let _ = sock.set_read_timeout(None);
        if got.is_err() {
            break;
        }
        let status = handle_backend_req(&s, &h, &body);
        if need_reply {
            let code: u64 = if status { 0 } else { 1 };
            let flags = wire::VERSION | wire::FLAG_REPLY;
            if send_msg(&sock, h.request, flags, code.as_bytes(), &[]).is_err() {
                break;
            }
        }
    }
    // The back-end closed its channel: unless we are closing, or this is an old
    // connection, that is the back-end going away.
    if let Some(s) = shared.upgrade() {
        let current = lock(&s.link).as_ref().map(Arc::as_ptr);
        if !s.closing.load(Ordering::Acquire) && current == Some(link.as_ptr()) {
            s.break_link();
        }
    }
}

/// Handles one back-end request; `true` for success. Anything malformed or unknown
/// is refused and changes nothing.
fn handle_backend_req(s: &Shared, h: &Header, body: &[u8]) -> bool {
    let well_formed = h.flags & wire::VERSION_MASK == wire::VERSION
        && h.flags & wire::FLAG_REPLY == 0
        && h.request == wire::backend_req::IOTLB_MSG;
    let msg = wire::IotlbMsg::read_from_bytes(body)
        .ok()
        .filter(|_| well_formed);
    let Some(msg) = msg else {
        bump(&s.counters.bad_messages);
        return false;
    };
    match msg.kind {
        wire::IOTLB_MISS => s.answer_miss(msg.iova, msg.perm),
        wire::IOTLB_ACCESS_FAIL => {
            bump(&s.counters.access_fails);
            if let Some(a) = access_of(msg.perm) {
                s.fault(msg.iova, a);
            }
            true
        }
        _ => {
            bump(&s.counters.bad_messages);
            false
        }
    }
}

/// Turns call eventfds into MSI-X interrupts and marks the transport as needing
/// reset when the connection breaks. Ends when the device is dropped.
fn watch_loop(
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
        // SAFETY: `fds` is a live, correctly sized array of pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
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

/// Guest memory the front-end shares: the guest-physical map under either memory type
/// a function can have.
pub trait PhysicalMemory: GuestMemory {
    /// The guest-physical map (the VMM's DMA regions).
    fn physical(&self) -> &GuestMemoryMmap;
}

impl PhysicalMemory for GuestMemoryMmap {
    fn physical(&self) -> &GuestMemoryMmap {
        self
    }
}

impl PhysicalMemory for EndpointMemory {
    fn physical(&self) -> &GuestMemoryMmap {
        self.get_backend()
    }
}

/// Pool mode: the one guest-physical range given to the back-end, `[first, last]`
/// (page-granular, see [`VhostUserDevice::share_only`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SharedRange {
    first: u64,
    last: u64,
}

impl std::fmt::Display for SharedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest-physical {:#x}..={:#x}", self.first, self.last)
    }
}

impl SharedRange {
    /// The part of `[gpa, gpa + size)` inside the range, as (start, size).
    fn clip(&self, gpa: u64, size: u64) -> Option<(u64, u64)> {
        let last = gpa.checked_add(size.checked_sub(1)?)?;
        let (a, b) = (gpa.max(self.first), last.min(self.last));
        (a <= b).then(|| (a, b - a + 1))
    }

    /// Whether all of `[addr, addr + len)` (`len` > 0) is inside the range.
    fn holds(&self, addr: u64, len: u64) -> bool {
        addr >= self.first
            && len
                .checked_sub(1)
                .and_then(|l| addr.checked_add(l))
                .is_some_and(|e| e <= self.last)
    }

    /// Refuses rings outside the range: the back-end could not reach them, and the
    /// guest would be waiting on a device that never runs.
    fn check_rings(&self, queues: &[ActiveQueue<'_>]) -> Result<(), VhostUserError> {
        for q in queues {
            let n = u64::from(q.queue.size());
            // Virtio 1.2 §2.7: descriptor table 16·n, used ring 6 + 8·n, available
            // ring 6 + 2·n bytes.
            for (what, addr, len) in [
                ("descriptor table", q.queue.desc_table(), 16 * n),
                ("used ring", q.queue.used_ring(), 6 + 8 * n),
                ("available ring", q.queue.avail_ring(), 6 + 2 * n),
            ] {
                if !self.holds(addr, len) {
                    return Err(VhostUserError::PoolMode(format!(
                        "queue {}: the {what} at {addr:#x} ({len} bytes) lies outside {self}, \
                         the only memory the back-end is given (the driver must allocate its \
                         rings from the pool)",
                        q.index
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The memory table of `mem`: every region with a file, adjacent pieces of one file
/// merged (QEMU hands RAM over in pieces around holes), at most
/// [`wire::MAX_MEM_REGIONS`]. In pool mode (`share`) only the parts of regions inside
/// the shared range, and only if each file sent holds nothing but them.
fn mem_table(
    mem: &GuestMemoryMmap,
    share: Option<SharedRange>,
) -> Result<(Vec<wire::MemoryRegion>, Vec<Arc<File>>), VhostUserError> {
    let mut regions: Vec<(wire::MemoryRegion, Arc<File>, (u64, u64))> = Vec::new();
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let (gpa, size) = match share {
            None => (r.start_addr().0, r.len()),
            Some(s) => match s.clip(r.start_addr().0, r.len()) {
                Some(piece) => piece,
                None => continue,
            },
        };
        // The clipped piece starts `gpa - start` bytes into the region, and so into
        // its file (vm-memory checked that the region's file range does not overflow).
        let Some(offset) = fo.start().checked_add(gpa - r.start_addr().0) else {
            continue;
        };
        let file = Arc::clone(fo.arc());
        let id = file
            .metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| VhostUserError::Guest(format!("guest RAM file: {e}")))?;
        if let Some((last, _, last_id)) = regions.last_mut() {
            if *last_id == id
                && last.guest_phys_addr + last.memory_size == gpa
                && last.mmap_offset + last.memory_size == offset
            {
                last.memory_size += size;
                continue;
            }
        }
        regions.push((
            wire::MemoryRegion {
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: UADDR_BASE + gpa,
                mmap_offset: offset,
            },
            file,
            id,
        ));
    }
    if regions.is_empty() {
        return Err(match share {
            Some(s) => VhostUserError::PoolMode(format!(
                "no file-backed guest RAM lies in {s}, the only memory the back-end may be given"
            )),
            None => VhostUserError::Guest("no shareable guest RAM (the VMM mapped none)".into()),
        });
    }
    if let Some(s) = share {
        // A descriptor gives the back-end the whole file, whatever the table says: each
        // file sent must be exactly the bytes of one region inside the range.
        for (r, file, _) in &regions {
            let meta = file
                .metadata()
                .map_err(|e| VhostUserError::PoolMode(format!("guest RAM file: {e}")))?;
            let first = r.guest_phys_addr;
            let last = first + (r.memory_size - 1);
            if !meta.is_file() || r.mmap_offset != 0 || r.memory_size != meta.len() {
                return Err(VhostUserError::PoolMode(format!(
                    "{first:#x}..={last:#x} of {s} is bytes {:#x}..+{:#x} of a memory file of \
                     {:#x} bytes, so its descriptor would hand the back-end guest memory \
                     outside the shared range too; the shared range needs its own memory \
                     file (as bounce_pool::SplitRam builds guest RAM)",
                    r.mmap_offset,
                    r.memory_size,
                    meta.len()
                )));
            }
        }
    }
    if regions.len() > wire::MAX_MEM_REGIONS {
        return Err(VhostUserError::Guest(format!(
            "guest RAM is in {} pieces; SET_MEM_TABLE carries at most {}",
            regions.len(),
            wire::MAX_MEM_REGIONS
        )));
    }
    Ok(regions.into_iter().map(|(r, f, _)| (r, f)).unzip())
}

/// Kick and call eventfds of one queue.
struct QueueFds {
    kick: EventFd,
    call: EventFd,
}

/// A virtio device served by a vhost-user back-end.
pub struct VhostUserDevice {
    kind: DeviceKind,
    shared: Arc<Shared>,
    /// Features offered to the guest.
    offered: u64,
    acked: u64,
    config: Vec<u8>,
    queues: Vec<QueueFds>,
    started: Vec<bool>,
    /// Each started ring as the driver configured it, for [`Self::fail_pending`].
    rings: Vec<Option<QueueState>>,
    vectors: Arc<Mutex<Vec<u16>>>,
    /// The queues' interrupts (the watch thread holds the same sink).
    irq: Arc<dyn InterruptSink>,
    /// Our RAM descriptors as last sent (kept open while the back-end may map them).
    sent_files: Vec<Arc<File>>,
    /// Pool mode: the only guest memory the back-end is given ([`Self::share_only`]).
    share: Option<SharedRange>,
    stop: EventFd,
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

fn efd() -> Result<EventFd, VhostUserError> {
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
        } else if has(link.protocol, wire::PROTOCOL_F_CONFIG) {
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
            jobs,
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
        let needed = (1 << wire::PROTOCOL_F_REPLY_ACK) | (1 << wire::PROTOCOL_F_BACKEND_REQ);
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
    /// not in the back-end's memory. A guest's `VIRTIO_F_ACCESS_PLATFORM` (which tells
    /// Linux to use its DMA API, and so the pool) is not passed on.
    ///
    /// Not offered by `aperture serve`: an x86 Linux guest learns of a restricted pool
    /// only from a device tree (`restricted-dma-pool`), which it does not have; the
    /// mode is exercised by a fake guest driver (`crates/aperture/tests/pool_backend.rs`).
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
        if has(self.offered, VIRTIO_F_ACCESS_PLATFORM) {
            return Err(bad(
                "the device is behind the virtio-iommu; pool mode and the IOTLB exclude each other",
            ));
        }
        self.share = Some(SharedRange {
            first: start.0,
            last,
        });
        Ok(())
    }

    /// A handle for counters and state.
    pub fn handle(&self) -> VhostUserHandle {
        VhostUserHandle(Arc::clone(&self.shared))
    }

    fn iotlb_on(&self) -> bool {
        has(self.acked, VIRTIO_F_ACCESS_PLATFORM) && self.share.is_none()
    }

    /// Starts the back-end's rings: features, memory table, then each ready queue.
    fn start(
        &mut self,
        queues: &[ActiveQueue<'_>],
        mem: &GuestMemoryMmap,
    ) -> Result<(), VhostUserError> {
        let (table, files) = mem_table(mem, self.share)?;
        if let Some(share) = self.share {
            share.check_rings(queues)?;
        }
        let regions: Vec<Region> = table
            .iter()
            .map(|r| Region {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.userspace_addr,
            })
            .collect();
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
            addrs.push(self.ring_addr(q.index, q.queue, &regions)?);
        }
        let s = Arc::clone(&self.shared);
        let link = s.current()?;
        let mut features = self.acked & link.features;
        if self.share.is_some() {
            // Pool mode: a guest's ACCESS_PLATFORM only says it bounces through the pool
            // (its DMA API); the back-end gets guest-physical addresses, no IOTLB.
            features &= !(1 << VIRTIO_F_ACCESS_PLATFORM);
        }
        if has(link.features, wire::F_PROTOCOL_FEATURES) {
            features |= 1 << wire::F_PROTOCOL_FEATURES;
        }
        let protocol_on = has(link.features, wire::F_PROTOCOL_FEATURES);
        s.with_link(|l| l.request(req::SET_FEATURES, features.as_bytes(), &[], Reply::None))?;
        let mut payload = wire::MemoryHead {
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
                    s.queue(IotlbJob::Push(w));
                }
            }
        }
        for (q, addr) in queues.iter().zip(addrs) {
            let i = q.index as u32;
            let state = |num: u32| wire::VringState { index: i, num };
            let fd_arg = u64::from(i);
            let qf = &self.queues[q.index];
            s.with_link(|l| {
                l.request(
                    req::SET_VRING_NUM,
                    state(u32::from(q.queue.size())).as_bytes(),
                    &[],
                    Reply::None,
                )?;
                l.request(
                    req::SET_VRING_BASE,
                    state(u32::from(q.queue.next_avail())).as_bytes(),
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
            // Buffers the driver queued before DRIVER_OK were notified to nobody.
            let _ = qf.kick.write(1);
        }
        Ok(())
    }

    /// Once the connection is broken, completes every request the back-end was given
    /// and did not complete: on each started ring, each chain between the used index
    /// and the available index gets a used element (virtio-blk: `VIRTIO_BLK_S_IOERR`
    /// written to the chain's status byte, its last device-writable byte, length 1;
    /// virtio-rng: length 0), then the queue's interrupt is raised. Memory is reached
    /// through `mem`, the function's memory, so behind the IOMMU every ring and status
    /// address is an IOVA translated with the access it needs.
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
        for (index, state) in self.rings.iter().enumerate() {
            let Some(state) = state else { continue };
            let n = fail_ring(self.kind, *state, mem);
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

    fn ring_addr(
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
    fn stop_rings(&mut self) {
        let s = Arc::clone(&self.shared);
        let protocol_on = s
            .current()
            .is_ok_and(|l| has(l.features, wire::F_PROTOCOL_FEATURES));
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
        lock(&self.vectors).fill(VIRTIO_MSI_NO_VECTOR);
        if s.broken.load(Ordering::Acquire) {
            let _ = self.reconnect();
        }
    }

    /// Connects again after the connection broke (on device reset): the back-end must
    /// offer the same features.
    fn reconnect(&mut self) -> Result<(), VhostUserError> {
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

fn spawn_backend_req(
    shared: &Arc<Shared>,
    sock: UnixStream,
    link: &Arc<Link>,
) -> Result<(), VhostUserError> {
    let (w, l) = (Arc::downgrade(shared), Arc::downgrade(link));
    std::thread::Builder::new()
        .name("aperture-vhost-req".into())
        .spawn(move || backend_req_loop(w, sock, l))
        .map(drop)
        .map_err(|source| VhostUserError::Io { request: 0, source })
}

fn read_config(link: &Link, size: u32) -> Result<Vec<u8>, VhostUserError> {
    let head = wire::ConfigHead {
        offset: 0,
        size,
        flags: 0,
    };
    let mut payload = head.as_bytes().to_vec();
    payload.resize(payload.len() + size as usize, 0);
    let n = payload.len();
    let body = link.request(req::GET_CONFIG, &payload, &[], Reply::Payload(n))?;
    let (got, bytes) =
        wire::ConfigHead::read_from_prefix(&body).map_err(|_| VhostUserError::BadReply {
            request: req::GET_CONFIG,
            why: "short configuration reply".into(),
        })?;
    if got.offset != 0 || got.size != size {
        return Err(VhostUserError::BadReply {
            request: req::GET_CONFIG,
            why: format!("it answers offset {} size {}", got.offset, got.size),
        });
    }
    Ok(bytes.to_vec())
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

impl<M: PhysicalMemory> VirtioDevice<M> for VhostUserDevice {
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
            .is_ok_and(|l| has(l.protocol, wire::PROTOCOL_F_CONFIG));
        if !on {
            return;
        }
        let mut payload = wire::ConfigHead {
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

    /// The back-end runs the queues: nothing here to poll.
    fn polled(&self, _index: usize) -> bool {
        false
    }

    fn process_queue(&mut self, index: usize, _queue: &mut Queue, mem: &M) -> Result<bool, String> {
        if self.shared.broken.load(Ordering::Acquire) {
            self.fail_pending(mem);
            return Err(VhostUserError::Broken.to_string());
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

    fn activate(&mut self, queues: &[ActiveQueue<'_>], mem: &M) -> Result<(), String> {
        self.start(queues, mem.physical())
            .map_err(|e| e.to_string())
    }
}

/// Serves a vhost-user device as a PCI function, translated by `iommu` when given;
/// returns the server backend, its vector count and a handle on the device.
///
/// # Errors
/// Why the back-end cannot be reached or cannot drive the device, as text.
pub fn serve_vhost_user(
    socket: &Path,
    kind: DeviceKind,
    timeout: Duration,
    iommu: Option<EndpointIommu>,
) -> Result<(Function, VhostUserHandle), String> {
    let n = QUEUE_SIZES.len() as u16 + 1;
    let vectors = MsixVectors::new(n);
    let irq: Arc<dyn InterruptSink> = Arc::new(EventFdSink(Arc::clone(&vectors)));
    let mut dev = VhostUserDevice::connect(socket, kind, timeout, Arc::clone(&irq))
        .map_err(|e| e.to_string())?;
    let handle = dev.handle();
    let sink = Box::new(EventFdSink(Arc::clone(&vectors)));
    match iommu {
        Some(ep) => {
            dev.attach_iommu(ep.clone()).map_err(|e| e.to_string())?;
            let mem = vm_memory::IommuMemory::new(GuestMemoryMmap::default(), ep.clone(), true, ());
            let build: MemoryBuilder<EndpointMemory> =
                Box::new(move |phys| vm_memory::IommuMemory::new(phys, ep.clone(), true, ()));
            let t = VirtioPciTransport::new(
                dev,
                kind.class_code(),
                mem,
                sink,
                1 << VIRTIO_F_ACCESS_PLATFORM,
            )
            .map_err(|e| e.to_string())?;
            let t = Arc::new(Mutex::new(t));
            Ok((function(&handle, t, vectors, build), handle))
        }
        None => {
            let build: MemoryBuilder<GuestMemoryMmap> = Box::new(|phys| phys);
            let t = VirtioPciTransport::new(
                dev,
                kind.class_code(),
                GuestMemoryMmap::default(),
                sink,
                0,
            )
            .map_err(|e| e.to_string())?;
            let t = Arc::new(Mutex::new(t));
            Ok((function(&handle, t, vectors, build), handle))
        }
    }
}

fn on_broken<M: PhysicalMemory + Send + 'static>(
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

fn function<M: PhysicalMemory + Send + 'static>(
    handle: &VhostUserHandle,
    t: Arc<Mutex<VirtioPciTransport<VhostUserDevice, M>>>,
    vectors: Arc<MsixVectors>,
    build: MemoryBuilder<M>,
) -> Function {
    on_broken(handle, &t);
    // A queue notification while the connection is broken fails what the driver
    // queued ([`VhostUserDevice::fail_pending`]): the transport ignores notifications
    // once the device needs a reset, and a driver that ignores DEVICE_NEEDS_RESET would
    // otherwise wait on those requests forever.
    let shared = Arc::clone(&handle.0);
    let inner = Box::new(PciFunction::new(Arc::clone(&t), vectors, build));
    let vector_count = lock(&t).msix_vectors();
    let transport = Arc::clone(&t);
    Function {
        backend: Box::new(NotifyHook::new(inner, move || {
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

/// Completes with an error the chains the driver made available on the ring `state`
/// describes and nobody used: those from the used index (where the back-end stopped)
/// to the available index. Returns how many it completed. Ring contents are the
/// driver's (and a dead back-end's): indices claiming more than a ring's worth, a
/// descriptor index out of range or memory that cannot be reached end the walk; the
/// descriptor walk itself is bounded by virtio-queue (the queue size, per chain).
fn fail_ring<M: GuestMemory>(kind: DeviceKind, state: QueueState, mem: &M) -> usize {
    let Ok(mut q) = Queue::try_from(state) else {
        return 0;
    };
    let (Ok(used), Ok(avail)) = (
        q.used_idx(mem, Ordering::Acquire),
        q.avail_idx(mem, Ordering::Acquire),
    ) else {
        return 0;
    };
    // §2.7.6: the driver never has more than the ring's size outstanding.
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
        let len = match kind {
            DeviceKind::Block => write_ioerr(chain, mem),
            // Nothing written: a transmit chain is returned with length 0 anyway.
            DeviceKind::Rng | DeviceKind::NetTx => 0,
        };
        if q.add_used(mem, head, len).is_err() {
            break;
        }
        done += 1;
    }
    // The driver must notify its next request too, which is then failed the same way:
    // with EVENT_IDX, the dead back-end left avail_event wherever it was (§2.7.10).
    let _ = q.enable_notification(mem);
    done
}

/// Writes `VIRTIO_BLK_S_IOERR` into a virtio-blk request's status byte, the last byte
/// of its last device-writable descriptor (§5.2.6); returns the bytes written (1, or
/// 0 when the chain has no writable byte or the guest did not map it writable).
fn write_ioerr<M: GuestMemory>(chain: virtio_queue::DescriptorChain<&M>, mem: &M) -> u32 {
    let status = chain.filter(|d| d.is_write_only() && d.len() > 0).last();
    let Some(d) = status else {
        return 0;
    };
    let Some(addr) = d.addr().0.checked_add(u64::from(d.len() - 1)) else {
        return 0;
    };
    let ioerr = virtio_devices::block::request::Status::IoErr as u8;
    match mem.write_slice(&[ioerr], GuestAddress(addr)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shared_range_clips_regions_to_its_bytes_and_nothing_more() {
        let s = SharedRange {
            first: 0x1000,
            last: 0x1fff,
        };
        assert_eq!(
            s.clip(0, 0x10_0000),
            Some((0x1000, 0x1000)),
            "region around it"
        );
        assert_eq!(
            s.clip(0x1800, 0x1000),
            Some((0x1800, 0x800)),
            "overlaps the end"
        );
        assert_eq!(
            s.clip(0x800, 0x1000),
            Some((0x1000, 0x800)),
            "overlaps the start"
        );
        assert_eq!(s.clip(0x2000, 0x1000), None, "just after");
        assert_eq!(s.clip(0, 0x1000), None, "just before");
        assert_eq!(s.clip(0x1000, 0), None, "empty region");
        assert_eq!(s.clip(u64::MAX, 2), None, "wraps");
        assert!(s.holds(0x1000, 0x1000) && s.holds(0x1fff, 1));
        assert!(!s.holds(0x1fff, 2) && !s.holds(0xfff, 1) && !s.holds(0x1000, 0));
        assert!(!s.holds(u64::MAX, 2));
    }

    /// Guest RAM of two memfds: [0, 1 MiB) and the "pool" [1 MiB, 1.25 MiB).
    fn split_ram() -> GuestMemoryMmap {
        let file = |len: u64| {
            // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is
            // checked before it is owned by exactly one File.
            let fd = unsafe { libc::memfd_create(c"aperture-test".as_ptr(), 0) };
            assert!(fd >= 0);
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.set_len(len).unwrap();
            f
        };
        let (ram, pool) = (file(1 << 20), file(256 << 10));
        GuestMemoryMmap::from_ranges_with_files(&[
            (
                GuestAddress(0),
                1 << 20,
                Some(vm_memory::FileOffset::new(ram, 0)),
            ),
            (
                GuestAddress(1 << 20),
                256 << 10,
                Some(vm_memory::FileOffset::new(pool, 0)),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn pool_mode_table_is_the_pool_file_alone_or_refused() {
        let mem = split_ram();
        let (all, files) = mem_table(&mem, None).unwrap();
        assert_eq!(
            (all.len(), files.len()),
            (2, 2),
            "both files without pool mode"
        );
        let pool = SharedRange {
            first: 1 << 20,
            last: (1 << 20) + (256 << 10) - 1,
        };
        let (t, files) = mem_table(&mem, Some(pool)).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(
            (t[0].guest_phys_addr, t[0].memory_size, t[0].mmap_offset),
            (1 << 20, 256 << 10, 0)
        );
        // Half the pool: the file would still hand over all of it.
        let half = SharedRange {
            first: 1 << 20,
            last: (1 << 20) + (128 << 10) - 1,
        };
        assert!(matches!(
            mem_table(&mem, Some(half)),
            Err(VhostUserError::PoolMode(_))
        ));
        // A range that reaches into RAM's file too.
        let wide = SharedRange {
            first: (1 << 20) - 4096,
            last: pool.last,
        };
        assert!(matches!(
            mem_table(&mem, Some(wide)),
            Err(VhostUserError::PoolMode(_))
        ));
        // Nothing file-backed in the range.
        let beyond = SharedRange {
            first: 4 << 20,
            last: (5 << 20) - 1,
        };
        assert!(matches!(
            mem_table(&mem, Some(beyond)),
            Err(VhostUserError::PoolMode(_))
        ));
    }

    /// A link whose back-end end answers GET_FEATURES with `reply` (raw bytes).
    fn link_answering(reply: Vec<u8>, protocol: u64) -> Link {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut t = theirs;
            let mut h = Header::default();
            while t.read_exact(h.as_mut_bytes()).is_ok() {
                let mut body = vec![0u8; h.size as usize];
                if t.read_exact(&mut body).is_err() {
                    return;
                }
                let _ = t.write_all(&reply);
            }
        });
        Link {
            main: Mutex::new(ours),
            protocol,
            features: 0,
            timeout: Duration::from_millis(200),
            backend_req: None,
        }
    }

    fn reply(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Header {
            request,
            flags,
            size: body.len() as u32,
        }
        .as_bytes()
        .to_vec();
        v.extend_from_slice(body);
        v
    }

    const OK_FLAGS: u32 = wire::VERSION | wire::FLAG_REPLY;

    #[test]
    fn well_formed_reply_is_accepted() {
        let l = link_answering(reply(req::GET_FEATURES, OK_FLAGS, &7u64.to_ne_bytes()), 0);
        assert_eq!(l.get_u64(req::GET_FEATURES).unwrap(), 7);
    }

    #[test]
    fn reply_to_another_request_is_refused() {
        let l = link_answering(reply(req::GET_PROTOCOL_FEATURES, OK_FLAGS, &[0; 8]), 0);
        let e = l.get_u64(req::GET_FEATURES).unwrap_err();
        assert!(
            matches!(e, VhostUserError::BadReply { .. }) && e.breaks_connection(),
            "{e}"
        );
    }

    #[test]
    fn reply_without_reply_flag_or_version_1_is_refused() {
        for flags in [wire::VERSION, 2 | wire::FLAG_REPLY] {
            let l = link_answering(reply(req::GET_FEATURES, flags, &[0; 8]), 0);
            let e = l.get_u64(req::GET_FEATURES).unwrap_err();
            assert!(e.to_string().contains("header flags"), "{e}");
        }
    }

    #[test]
    fn short_and_oversized_replies_are_refused() {
        let l = link_answering(reply(req::GET_FEATURES, OK_FLAGS, &[0; 4]), 0);
        assert!(matches!(
            l.get_u64(req::GET_FEATURES),
            Err(VhostUserError::BadReply { .. })
        ));
        // A header announcing more than MAX_PAYLOAD: refused without reading it.
        let mut big = Header {
            request: req::GET_FEATURES,
            flags: OK_FLAGS,
            size: wire::MAX_PAYLOAD + 1,
        }
        .as_bytes()
        .to_vec();
        big.extend_from_slice(&[0; 8]);
        let l = link_answering(big, 0);
        let e = l.get_u64(req::GET_FEATURES).unwrap_err();
        assert!(e.to_string().contains("payload of 4097 bytes"), "{e}");
    }

    #[test]
    fn no_answer_is_a_timeout_and_a_closed_socket_an_io_error() {
        let l = link_answering(Vec::new(), 0);
        let t = Instant::now();
        assert!(matches!(
            l.get_u64(req::GET_FEATURES),
            Err(VhostUserError::Timeout { .. })
        ));
        assert!(t.elapsed() >= Duration::from_millis(200));
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let l = Link {
            main: Mutex::new(ours),
            protocol: 0,
            features: 0,
            timeout: Duration::from_millis(200),
            backend_req: None,
        };
        assert!(matches!(
            l.get_u64(req::GET_FEATURES),
            Err(VhostUserError::Io { .. })
        ));
    }

    #[test]
    fn nonzero_reply_ack_is_a_refusal_that_keeps_the_link() {
        let ack_on = 1 << wire::PROTOCOL_F_REPLY_ACK;
        let l = link_answering(
            reply(req::SET_FEATURES, OK_FLAGS, &5u64.to_ne_bytes()),
            ack_on,
        );
        let e = l
            .request(req::SET_FEATURES, &[0; 8], &[], Reply::None)
            .unwrap_err();
        assert!(matches!(e, VhostUserError::Refused { status: 5, .. }) && !e.breaks_connection());
        // Without REPLY_ACK a set request waits for nothing; an ack cannot be demanded.
        let l = link_answering(Vec::new(), 0);
        assert!(l
            .request(req::SET_FEATURES, &[0; 8], &[], Reply::None)
            .is_ok());
        assert!(l
            .request(req::IOTLB_MSG, &[0; 32], &[], Reply::Ack)
            .is_err());
    }

    #[test]
    fn iotlb_message_is_32_bytes_with_type_at_offset_25() {
        let m = wire::IotlbMsg {
            iova: 1,
            size: 2,
            uaddr: 3,
            perm: wire::ACCESS_RW,
            kind: wire::IOTLB_UPDATE,
            padding: [0; 6],
        };
        let b = m.as_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!((b[24], b[25]), (3, 2));
        assert_eq!(size_of::<wire::VringAddr>(), 40);
        assert_eq!(size_of::<wire::MemoryRegion>(), 32);
    }

    fn state(regions: &[(u64, u64)]) -> IotlbState {
        IotlbState {
            regions: regions
                .iter()
                .map(|&(gpa, size)| Region {
                    gpa,
                    size,
                    uaddr: UADDR_BASE + gpa,
                })
                .collect(),
            active: true,
            ..IotlbState::default()
        }
    }

    #[test]
    fn window_is_the_mapping_clipped_to_one_region() {
        let mut st = state(&[(0, 0x10000), (0x20000, 0x10000)]);
        st.mappings.insert(
            0x1000_0000,
            ShadowMap {
                end: 0x1002_ffff,
                phys: 0x8000,
                perms: Permissions::Read,
            },
        );
        let w = st.window(0x1000_4000, Permissions::Read).unwrap();
        assert_eq!(
            (w.iova, w.size, w.uaddr, w.perm),
            (0x1000_0000, 0x8000, UADDR_BASE + 0x8000, wire::ACCESS_RO)
        );
        assert_eq!(
            st.window(0x1000_4000, Permissions::Write),
            None,
            "read-only"
        );
        // 0x10010000.. maps to GPA 0x18000, a hole between the regions.
        assert_eq!(st.window(0x1001_0000, Permissions::Read), None);
        let w = st.window(0x1002_0000, Permissions::Read).unwrap();
        assert_eq!(
            (w.iova, w.size, w.uaddr),
            (0x1001_8000, 0x10000, UADDR_BASE + 0x20000)
        );
        st.identity = true;
        let w = st.window(0x2_1000, Permissions::Write).unwrap();
        assert_eq!(
            (w.iova, w.size, w.perm),
            (0x20000, 0x10000, wire::ACCESS_RW)
        );
        st.active = false;
        assert_eq!(st.window(0x2_1000, Permissions::Write), None, "not started");
    }

    #[test]
    fn mapping_to_the_top_of_the_address_space_does_not_overflow() {
        let mut st = state(&[(0, 0x10000)]);
        st.mappings.insert(
            0,
            ShadowMap {
                end: u64::MAX,
                phys: 0,
                perms: Permissions::ReadWrite,
            },
        );
        let w = st.window(0x100, Permissions::Read).unwrap();
        assert_eq!((w.iova, w.size), (0, 0x10000));
        st.given.insert(0, u64::MAX);
        assert_eq!(st.take_given(u64::MAX, u64::MAX), Some((0, u64::MAX)));
        assert!(st.given.is_empty());
    }

    #[test]
    fn take_given_returns_the_hull_of_overlapping_windows_only() {
        let mut st = state(&[]);
        st.given.insert(0x1000, 0x1fff);
        st.given.insert(0x3000, 0x3fff);
        st.given.insert(0x8000, 0x8fff);
        assert_eq!(st.take_given(0x1800, 0x37ff), Some((0x1000, 0x3fff)));
        assert_eq!(st.take_given(0x4000, 0x7fff), None);
        assert_eq!(st.given.len(), 1);
    }
}
