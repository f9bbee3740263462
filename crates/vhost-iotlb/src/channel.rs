//! Moving vhost-user messages over Unix sockets: [`recv_message`] and [`send_message`]
//! for the main socket (file descriptors travel as `SCM_RIGHTS`), and [`MissChannel`],
//! the back-end's side of the back-end request channel, which sends IOTLB misses and
//! access failures and waits for the front-end's reply-ack.

use crate::wire::{backend_req, flags, iotlb, Header, IotlbMsg, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::{FromBytes, IntoBytes};

/// One received message. `payload` is `Err(size)` when the announced size exceeded
/// [`MAX_PAYLOAD`]: the bytes were read and thrown away, so the stream stays in step.
#[derive(Debug)]
pub struct Incoming {
    /// The header as received.
    pub header: Header,
    /// The payload, or the refused size.
    pub payload: Result<Vec<u8>, u32>,
    /// Descriptors that came with the message.
    pub fds: Vec<File>,
}

/// Reads into `buf` with `recvmsg`, collecting descriptors. Returns bytes read.
fn recv_some(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<File>) -> io::Result<usize> {
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `iov` points at `buf`, which is exclusively borrowed for this call and
    // may receive any bytes.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw)? };
    for &fd in raw.iter().take(nfds) {
        if fd >= 0 && fds.len() < MAX_FDS {
            // SAFETY: the kernel just installed `fd` in this process for us; nothing
            // else owns it.
            fds.push(unsafe { File::from_raw_fd(fd) });
        } else if fd >= 0 {
            // SAFETY: as above; a descriptor beyond the limit is closed at once.
            drop(unsafe { File::from_raw_fd(fd) });
        }
    }
    Ok(n)
}

fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<File>) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match recv_some(sock, &mut buf[done..], fds) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Receives one message. `Ok(None)` at a clean end of stream (between messages).
///
/// # Errors
/// Socket errors, or a stream that ends inside a message.
pub fn recv_message(sock: &UnixStream) -> io::Result<Option<Incoming>> {
    let mut fds = Vec::new();
    let mut hbuf = [0u8; HEADER_SIZE];
    if !recv_exact(sock, &mut hbuf, &mut fds)? {
        return Ok(None);
    }
    let header = Header::read_from_bytes(&hbuf[..]).map_err(|_| io::ErrorKind::InvalidData)?;
    let size = header.size as usize;
    let payload = if size > MAX_PAYLOAD {
        // Read and discard, in bounded pieces, so the next header is found.
        let mut left = size;
        let mut sink = [0u8; 4096];
        while left > 0 {
            let n = left.min(sink.len());
            if !recv_exact(sock, &mut sink[..n], &mut fds)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        Err(header.size)
    } else {
        let mut p = vec![0u8; size];
        if size > 0 && !recv_exact(sock, &mut p, &mut fds)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(p)
    };
    Ok(Some(Incoming {
        header,
        payload,
        fds,
    }))
}

/// Sends one message with `fds` attached.
///
/// # Errors
/// Socket errors.
pub fn send_message(
    sock: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(HEADER_SIZE + payload.len());
    msg.extend_from_slice(header.as_bytes());
    msg.extend_from_slice(payload);
    let sent = if fds.is_empty() {
        0
    } else {
        sock.send_with_fds(&[&msg[..]], fds)?
    };
    let mut w = sock;
    w.write_all(&msg[sent..])
}

/// Sends a reply to `request` with `payload`.
///
/// # Errors
/// Socket errors.
pub fn send_reply(sock: &UnixStream, request: u32, payload: &[u8]) -> io::Result<()> {
    let header = Header {
        request,
        flags: flags::VERSION | flags::REPLY,
        size: payload.len() as u32, // ≤ MAX_PAYLOAD
    };
    send_message(sock, &header, payload, &[])
}

/// Why a miss did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MissError {
    /// The front-end replied with a failure: the guest has no mapping there.
    #[error("the front-end refused the miss (reply {0})")]
    Refused(u64),
    /// No reply within the time limit.
    #[error("no reply to the miss within {0:?}")]
    Timeout(Duration),
    /// The main-socket thread needs the device: the front-end waits for a reply of its
    /// own and will not answer misses until it gets it.
    #[error("the miss was cancelled: the front-end is waiting on a request")]
    Cancelled,
    /// Without reply-ack a miss cannot be waited for.
    #[error("reply-ack was not negotiated, so a miss cannot be waited for")]
    NoReplyAck,
    /// The reply was not a reply to our request.
    #[error("malformed reply on the back-end channel: {0}")]
    BadReply(String),
    /// The channel failed.
    #[error("back-end channel: {0}")]
    Io(#[from] io::Error),
}

/// The back-end request channel (`SET_BACKEND_REQ_FD`), from the back-end's side.
#[derive(Debug)]
pub struct MissChannel {
    sock: UnixStream,
    reply_ack: bool,
    /// Replies still owed to misses we stopped waiting for; they are skipped.
    owed: usize,
}

impl MissChannel {
    /// Wraps the channel; `reply_ack` says whether `REPLY_ACK` was negotiated.
    pub fn new(sock: UnixStream, reply_ack: bool) -> Self {
        Self {
            sock,
            reply_ack,
            owed: 0,
        }
    }

    fn send_iotlb(
        &mut self,
        kind: u8,
        iova: u64,
        size: u64,
        perm: u8,
        need_reply: bool,
    ) -> io::Result<()> {
        let msg = IotlbMsg {
            iova,
            size,
            uaddr: 0,
            perm,
            kind,
            padding: [0; 6],
        };
        let mut fl = flags::VERSION;
        if need_reply {
            fl |= flags::NEED_REPLY;
        }
        let header = Header {
            request: backend_req::IOTLB_MSG,
            flags: fl,
            size: std::mem::size_of::<IotlbMsg>() as u32,
        };
        send_message(&self.sock, &header, msg.as_bytes(), &[])
    }

    /// Waits until the channel is readable, the deadline passes or `cancel` is set.
    fn wait_readable(&self, deadline: Instant, cancel: &AtomicBool) -> Result<(), MissError> {
        loop {
            if cancel.load(Ordering::Acquire) {
                return Err(MissError::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MissError::Timeout(Duration::ZERO));
            }
            let slice = (deadline - now).min(Duration::from_millis(10));
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack, for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, slice.as_millis() as libc::c_int) };
            if rc > 0 {
                return Ok(());
            }
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
        }
    }

    fn read_reply(&mut self) -> Result<u64, MissError> {
        let mut buf = [0u8; HEADER_SIZE + 8];
        (&self.sock).read_exact(&mut buf)?;
        let header = Header::read_from_bytes(&buf[..HEADER_SIZE])
            .map_err(|_| MissError::BadReply("short header".into()))?;
        // A reply is version 1 with the reply bit and nothing else (vhost-user.rst,
        // "Header").
        if header.request != backend_req::IOTLB_MSG
            || header.flags != flags::VERSION | flags::REPLY
            || header.size != 8
        {
            return Err(MissError::BadReply(format!(
                "request {} flags {:#x} size {}",
                header.request, header.flags, header.size
            )));
        }
        let mut v = [0u8; 8];
        v.copy_from_slice(&buf[HEADER_SIZE..]);
        Ok(u64::from_ne_bytes(v))
    }

    /// Sends a miss for `iova` and waits for the front-end's reply; by then the front-end
    /// has sent (and had acknowledged) the update on the main socket, if it had one.
    ///
    /// # Errors
    /// A [`MissError`]; a reply that comes after a timeout or cancellation is skipped
    /// later.
    pub fn miss(
        &mut self,
        iova: u64,
        size: u64,
        perm: u8,
        cancel: &AtomicBool,
        timeout: Duration,
    ) -> Result<(), MissError> {
        if !self.reply_ack {
            return Err(MissError::NoReplyAck);
        }
        if cancel.load(Ordering::Acquire) {
            return Err(MissError::Cancelled);
        }
        self.send_iotlb(iotlb::MISS, iova, size, perm, true)?;
        // A read timeout keeps a front-end that stops mid-reply from hanging us.
        self.sock.set_read_timeout(Some(timeout))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.wait_readable(deadline, cancel) {
                Ok(()) => {}
                Err(e) => {
                    self.owed += 1;
                    return Err(match e {
                        MissError::Timeout(_) => MissError::Timeout(timeout),
                        e => e,
                    });
                }
            }
            let v = self.read_reply()?;
            if self.owed > 0 {
                self.owed -= 1;
                continue;
            }
            return if v == 0 {
                Ok(())
            } else {
                Err(MissError::Refused(v))
            };
        }
    }

    /// Reports an access failure (no reply asked for: it is a notification).
    ///
    /// # Errors
    /// Socket errors.
    pub fn access_fail(&mut self, iova: u64, size: u64, perm: u8) -> io::Result<()> {
        self.send_iotlb(iotlb::ACCESS_FAIL, iova, size, perm, false)
    }
}
