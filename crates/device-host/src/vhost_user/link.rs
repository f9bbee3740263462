//! The main socket: one request and its reply at a time, bounded by the deadline;
//! the session start (features, protocol features, owner, back-end request channel).

use super::{wire, VhostUserError};
use dma_types::lock;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use vhost_iotlb::push_ring::Producer;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use wire::{req, Header};
use zerocopy::{FromBytes, IntoBytes};

/// One connection to a back-end: the main socket, used for one request and its reply
/// at a time.
pub(super) struct Link {
    pub(super) main: Mutex<UnixStream>,
    /// Protocol features both sides enabled.
    pub(super) protocol: u64,
    /// The back-end's virtio features.
    pub(super) features: u64,
    pub(super) timeout: Duration,
    /// A clone of our end of the back-end request channel, to shut it down.
    pub(super) backend_req: Option<UnixStream>,
    /// The back-end's push ring, handed over when the device first runs behind the
    /// IOMMU on this connection, if the back-end offered it (our own do). In the other
    /// modes it would be one more memory file the back-end holds, for nothing.
    pub(super) push_ring: OnceLock<Producer>,
}

/// Entries of a push ring: a 1 MiB read is ~260 pushes, and the back-end reads the
/// ring before it serves the request they are for.
const PUSH_RING_CAPACITY: u64 = 4096;

/// What a request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
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

/// The reply a request sent waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    /// A reply-ack: a u64 status, 0 for success.
    Ack,
    /// A payload of exactly this many bytes.
    Payload(usize),
}

pub(super) fn has(bits: u64, bit: u32) -> bool {
    bits & (1 << bit) != 0
}

/// Reads exactly `buf.len()` bytes before `deadline`.
pub(super) fn read_by(
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
pub(super) fn send_msg(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), VhostUserError> {
    let msg = frame(request, flags, payload)?;
    let sent = sock
        .send_with_fds(&[msg.as_slice()], fds)
        .map_err(|e| VhostUserError::Io {
            request,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    // A stream socket may take a message in parts; the descriptors went with the first.
    write_rest(sock, request, &msg, sent)
}

/// One message: its header, then `payload`.
fn frame(request: u32, flags: u32, payload: &[u8]) -> Result<Vec<u8>, VhostUserError> {
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
    Ok(msg)
}

/// Writes what is left of `msg` after its first `sent` bytes, waiting as needed.
fn write_rest(
    mut sock: &UnixStream,
    request: u32,
    msg: &[u8],
    sent: usize,
) -> Result<(), VhostUserError> {
    let io = |source| VhostUserError::Io { request, source };
    let mut rest = msg.get(sent..).unwrap_or_default();
    while !rest.is_empty() {
        let n = sock.write(rest).map_err(io)?;
        if n == 0 {
            return Err(io(ErrorKind::WriteZero.into()));
        }
        rest = &rest[n..];
    }
    Ok(())
}

/// Sends one message without descriptors unless that would wait: `Ok(false)` when the
/// socket's buffer is full and nothing was sent. The kernel takes a message this small
/// whole or not at all on a stream socket; should it take a part, the rest is written
/// waiting, so that the stream stays framed.
pub(super) fn try_send_msg(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
) -> Result<bool, VhostUserError> {
    let msg = frame(request, flags, payload)?;
    // SAFETY: `msg` is a live buffer of `msg.len()` bytes for the call; the kernel only
    // reads it.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    let Ok(sent) = usize::try_from(n) else {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            ErrorKind::WouldBlock => Ok(false),
            _ => Err(VhostUserError::Io { request, source: e }),
        };
    };
    write_rest(sock, request, &msg, sent).map(|()| true)
}

impl Link {
    /// Sends `request` and waits for what `reply` says, under the main socket's lock.
    pub(super) fn request(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        reply: Reply,
    ) -> Result<Vec<u8>, VhostUserError> {
        let mut sock = lock(&self.main);
        self.request_locked(&mut sock, request, payload, fds, reply)
    }

    pub(super) fn request_locked(
        &self,
        sock: &mut UnixStream,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        reply: Reply,
    ) -> Result<Vec<u8>, VhostUserError> {
        match self.send_locked(sock, request, payload, fds, reply)? {
            Some(expect) => {
                let deadline = Instant::now() + self.timeout;
                self.read_reply(sock, request, expect, deadline)
            }
            None => Ok(Vec::new()),
        }
    }

    /// Sends `request` and returns what its reply must be, without reading it: `None`
    /// when none comes.
    pub(super) fn send_locked(
        &self,
        sock: &UnixStream,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
        reply: Reply,
    ) -> Result<Option<Expect>, VhostUserError> {
        let ack_on = self.protocol & wire::protocol::REPLY_ACK != 0;
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
        let flags = wire::flags::VERSION | if want_ack { wire::flags::NEED_REPLY } else { 0 };
        send_msg(sock, request, flags, payload, fds)?;
        Ok(match reply {
            _ if want_ack => Some(Expect::Ack),
            Reply::Payload(n) => Some(Expect::Payload(n)),
            _ => None,
        })
    }

    /// Reads the reply to `request`, which must be what `expect` says, by `deadline`;
    /// a reply-ack with a non-zero status is the back-end's refusal.
    pub(super) fn read_reply(
        &self,
        sock: &mut UnixStream,
        request: u32,
        expect: Expect,
        deadline: Instant,
    ) -> Result<Vec<u8>, VhostUserError> {
        let mut h = Header::default();
        read_by(sock, h.as_mut_bytes(), deadline, request, self.timeout)?;
        let bad = |why: String| VhostUserError::BadReply { request, why };
        if h.size as usize > wire::MAX_PAYLOAD {
            return Err(bad(format!("payload of {} bytes", h.size)));
        }
        let mut body = vec![0u8; h.size as usize];
        read_by(sock, &mut body, deadline, request, self.timeout)?;
        if h.request != request {
            return Err(bad(format!("it answers request {}", h.request)));
        }
        if h.flags & wire::flags::VERSION_MASK != wire::flags::VERSION
            || h.flags & wire::flags::REPLY == 0
        {
            return Err(bad(format!(
                "header flags {:#x} (version 1 and reply expected)",
                h.flags
            )));
        }
        let len = match expect {
            Expect::Ack => 8,
            Expect::Payload(n) => n,
        };
        if body.len() != len {
            return Err(bad(format!("{} payload bytes, {len} expected", body.len())));
        }
        if expect == Expect::Ack {
            let status = u64::read_from_bytes(&body).unwrap_or(u64::MAX);
            if status != 0 {
                return Err(VhostUserError::Refused { request, status });
            }
        }
        Ok(body)
    }

    pub(super) fn get_u64(&self, request: u32) -> Result<u64, VhostUserError> {
        let body = self.request(request, &[], &[], Reply::Payload(8))?;
        Ok(u64::read_from_bytes(&body).unwrap_or_default())
    }

    /// Connects and runs the session start: SET_OWNER, GET_FEATURES, protocol
    /// features, the back-end request channel. Returns the link and our end of the
    /// back-end request channel.
    pub(super) fn connect(
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
            push_ring: OnceLock::new(),
        };
        link.request(req::SET_OWNER, &[], &[], Reply::None)?;
        link.features = link.get_u64(req::GET_FEATURES)?;
        let mut ours = None;
        if link.features & wire::VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let theirs = link.get_u64(req::GET_PROTOCOL_FEATURES)?;
            let wanted = wire::protocol::REPLY_ACK
                | wire::protocol::BACKEND_REQ
                | wire::protocol::CONFIG
                | wire::protocol::APERTURE_PUSH_RING;
            let protocol = theirs & wanted;
            link.request(
                req::SET_PROTOCOL_FEATURES,
                protocol.as_bytes(),
                &[],
                Reply::None,
            )?;
            link.protocol = protocol;
            if protocol & wire::protocol::BACKEND_REQ != 0 {
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

    /// Hands the back-end its push ring, once per connection, if it offered one. A
    /// ring that cannot be made is not sent: pushes then go as messages.
    pub(super) fn give_push_ring(&self) -> Result<(), VhostUserError> {
        if self.protocol & wire::protocol::APERTURE_PUSH_RING == 0 || self.push_ring.get().is_some()
        {
            return Ok(());
        }
        let (ring, file) = match Producer::create(PUSH_RING_CAPACITY) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("vhost-user: no push ring, pushes go as messages: {e}");
                return Ok(());
            }
        };
        self.request(
            req::APERTURE_SET_PUSH_RING,
            ring.capacity().as_bytes(),
            &[file.as_raw_fd()],
            Reply::None,
        )?;
        // Only the device's server thread activates it: nobody set it meanwhile.
        let _ = self.push_ring.set(ring);
        Ok(())
    }

    pub(super) fn shutdown(&self) {
        let _ = lock(&self.main).shutdown(std::net::Shutdown::Both);
        if let Some(s) = &self.backend_req {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub(super) fn read_config(link: &Link, size: u32) -> Result<Vec<u8>, VhostUserError> {
    let head = wire::ConfigHeader {
        offset: 0,
        size,
        flags: 0,
    };
    let mut payload = head.as_bytes().to_vec();
    payload.resize(payload.len() + size as usize, 0);
    let n = payload.len();
    let body = link.request(req::GET_CONFIG, &payload, &[], Reply::Payload(n))?;
    let (got, bytes) =
        wire::ConfigHeader::read_from_prefix(&body).map_err(|_| VhostUserError::BadReply {
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
