//! A scripted vhost-user back-end on a unix socket, for the front-end's tests: it
//! answers the session start, records every message and descriptor it receives, and
//! answers IOTLB INVALIDATEs as told.

#![allow(dead_code)] // each test file uses its own part

use device_host::dma::DmaMap;
use device_host::vhost_user::wire::{self, req};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_kit::ring::ready_queue;
use test_kit::{memfd, RingLayout, TempDir};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use zerocopy::{FromBytes, IntoBytes};

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_PROTOCOL: u64 = 1 << 30;
pub const P_ALL: u64 = (1 << 3) | (1 << 5) | (1 << 9);
pub const RAM: u64 = 1 << 20;

/// How the scripted back-end answers an IOTLB INVALIDATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    Now,
    After(Duration),
    Never,
}

pub struct Msg {
    pub request: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub files: Vec<File>,
}

pub fn recv_msg(s: &UnixStream) -> Option<Msg> {
    let mut hdr = [0u8; 12];
    let mut fds = [-1; 8];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec points at `hdr`, which is live and writable for its length.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    let files = fds[..nfds]
        .iter()
        // SAFETY: these descriptors were just received and are owned by nobody else.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return None;
    }
    let mut r = s;
    if n < hdr.len() {
        r.read_exact(&mut hdr[n..]).ok()?;
    }
    let h = wire::Header::read_from_bytes(&hdr).ok()?;
    let mut body = vec![0u8; h.size as usize];
    r.read_exact(&mut body).ok()?;
    Some(Msg {
        request: h.request,
        flags: h.flags,
        body,
        files,
    })
}

pub fn send_reply(mut s: &UnixStream, request: u32, body: &[u8]) {
    let h = wire::Header {
        request,
        flags: wire::flags::VERSION | wire::flags::REPLY,
        size: body.len() as u32,
    };
    let _ = s.write_all(h.as_bytes());
    let _ = s.write_all(body);
}

/// What the scripted back-end saw and holds.
#[derive(Default)]
pub struct Seen {
    /// Every request: code and payload.
    pub log: Vec<(u32, Vec<u8>)>,
    /// Descriptors received, by request code.
    pub files: Vec<(u32, Vec<File>)>,
    pub backend_req: Option<UnixStream>,
    pub main: Option<UnixStream>,
    /// For each INVALIDATE acknowledged, the bytes the front-end had already sent
    /// after it (waiting unread on the socket) when the ack went out.
    pub queued_at_ack: Vec<usize>,
}

/// Bytes waiting unread on `s`.
fn waiting(s: &UnixStream) -> usize {
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is a live buffer of its length; MSG_PEEK leaves the bytes queued.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(s),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).unwrap_or(0)
}

pub struct FakeBackend {
    pub path: PathBuf,
    pub seen: Arc<Mutex<Seen>>,
    /// Set just before an INVALIDATE is acknowledged.
    pub invalidate_acked: Arc<AtomicBool>,
    pub connections: Arc<AtomicU32>,
    pub _dir: TempDir,
}

pub fn tempdir(tag: &str) -> TempDir {
    TempDir::new(&format!("aperture-vhost-{tag}"))
}

impl FakeBackend {
    pub fn start(
        tag: &str,
        features: u64,
        protocol: u64,
        ack: AckMode,
        refuse: Option<u32>,
    ) -> Self {
        let dir = tempdir(tag);
        let path = dir.join("backend.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let invalidate_acked = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU32::new(0));
        let (s2, a2, c2) = (
            Arc::clone(&seen),
            Arc::clone(&invalidate_acked),
            Arc::clone(&connections),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                c2.fetch_add(1, Ordering::SeqCst);
                s2.lock().unwrap().main = conn.try_clone().ok();
                serve(&conn, &s2, &a2, features, protocol, ack, refuse);
            }
        });
        Self {
            path,
            seen,
            invalidate_acked,
            connections,
            _dir: dir,
        }
    }

    /// The IOTLB messages once at least `n` arrived (pushes are posted, not awaited).
    pub fn wait_iotlb(&self, n: usize) -> Vec<wire::IotlbMsg> {
        eventually(&format!("{n} IOTLB messages"), || self.iotlb().len() >= n);
        self.iotlb()
    }

    pub fn requests(&self) -> Vec<u32> {
        self.seen.lock().unwrap().log.iter().map(|m| m.0).collect()
    }

    pub fn iotlb(&self) -> Vec<wire::IotlbMsg> {
        self.seen
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|m| m.0 == req::IOTLB_MSG)
            .map(|m| wire::IotlbMsg::read_from_bytes(&m.1).unwrap())
            .collect()
    }

    pub fn file(&self, request: u32) -> File {
        let seen = self.seen.lock().unwrap();
        let (_, f) = seen
            .files
            .iter()
            .rev()
            .find(|(r, _)| *r == request)
            .unwrap();
        f[0].try_clone().unwrap()
    }

    /// Sends a back-end request with NEED_REPLY; returns the reply-ack status.
    pub fn backend_request(&self, request: u32, body: &[u8]) -> u64 {
        let s = self
            .seen
            .lock()
            .unwrap()
            .backend_req
            .as_ref()
            .unwrap()
            .try_clone()
            .unwrap();
        let h = wire::Header {
            request,
            flags: wire::flags::VERSION | wire::flags::NEED_REPLY,
            size: body.len() as u32,
        };
        let mut w = &s;
        w.write_all(h.as_bytes()).unwrap();
        w.write_all(body).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rh = wire::Header::default();
        (&s).read_exact(rh.as_mut_bytes()).unwrap();
        assert_eq!(rh.request, request);
        assert_eq!(rh.flags, wire::flags::VERSION | wire::flags::REPLY);
        let mut code = 0u64;
        (&s).read_exact(code.as_mut_bytes()).unwrap();
        code
    }

    pub fn miss(&self, iova: u64, perm: u8) -> u64 {
        let m = wire::IotlbMsg {
            iova,
            perm,
            kind: wire::iotlb::MISS,
            ..Default::default()
        };
        self.backend_request(wire::backend_req::IOTLB_MSG, m.as_bytes())
    }

    /// The back-end process dies: both of its sockets close.
    pub fn die(&self) {
        let mut seen = self.seen.lock().unwrap();
        for s in [seen.main.take(), seen.backend_req.take()]
            .into_iter()
            .flatten()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Waits up to 5 s for `cond`, which another thread makes true.
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn serve(
    conn: &UnixStream,
    seen: &Mutex<Seen>,
    acked: &AtomicBool,
    features: u64,
    protocol: u64,
    ack: AckMode,
    refuse: Option<u32>,
) {
    while let Some(m) = recv_msg(conn) {
        {
            let mut s = seen.lock().unwrap();
            s.log.push((m.request, m.body.clone()));
            if m.request == req::SET_BACKEND_REQ_FD {
                let f = m.files.into_iter().next().unwrap();
                s.backend_req = Some(UnixStream::from(std::os::fd::OwnedFd::from(f)));
            } else if !m.files.is_empty() {
                s.files.push((m.request, m.files));
            }
        }
        match m.request {
            req::GET_FEATURES => send_reply(conn, m.request, features.as_bytes()),
            req::GET_PROTOCOL_FEATURES => send_reply(conn, m.request, protocol.as_bytes()),
            req::GET_CONFIG => {
                let mut body = m.body.clone();
                for (i, b) in body.iter_mut().enumerate().skip(12) {
                    *b = i as u8;
                }
                send_reply(conn, m.request, &body);
            }
            req::GET_VRING_BASE => send_reply(conn, m.request, &m.body),
            _ if m.flags & wire::flags::NEED_REPLY != 0 => {
                let invalidate = m.request == req::IOTLB_MSG
                    && wire::IotlbMsg::read_from_bytes(&m.body).unwrap().kind
                        == wire::iotlb::INVALIDATE;
                if invalidate {
                    match ack {
                        AckMode::Now => {}
                        AckMode::After(d) => std::thread::sleep(d),
                        AckMode::Never => continue,
                    }
                    acked.store(true, Ordering::SeqCst);
                    seen.lock().unwrap().queued_at_ack.push(waiting(conn));
                }
                let status: u64 = u64::from(refuse == Some(m.request));
                send_reply(conn, m.request, status.as_bytes());
            }
            _ => {}
        }
    }
}

/// Guest RAM as the VMM hands it over: one memfd DMA range at 0.
pub fn guest_ram(tag: &str) -> GuestMemoryMmap {
    let f = memfd(&format!("aperture-vhost-ram-{tag}"), RAM);
    let mut dma = DmaMap::new();
    dma.map(0, RAM, 0, Some(f), true).unwrap();
    dma.memory()
}

/// A ready queue of 256 entries whose rings are on the pages from `desc`.
pub fn ready_queue_at(desc: u64) -> Queue {
    ready_queue(RingLayout::paged(desc), 256)
}

pub fn read_eventfd(f: &File) -> Option<u64> {
    let mut b = [0u8; 8];
    (&*f).read_exact(&mut b).ok().map(|_| u64::from_le_bytes(b))
}
