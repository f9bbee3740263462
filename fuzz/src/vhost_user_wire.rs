//! Fuzz target `vhost_user_wire`: the vhost-user wire format of the back-end library
//! (`vhost-iotlb`), both directions.
//!
//! The first byte picks a mode:
//!
//! - **decode** (front-end → back-end, pure): messages with every request code the
//!   back-end knows and some it does not, arbitrary header flags and sizes, payloads
//!   of the canonical size, off by one or arbitrary (up to past `MAX_PAYLOAD`), with
//!   fix-ups that get the fuzzer past region counts, config sizes and IOTLB types, and
//!   0 to 9 file descriptors, go to `vhost_iotlb::wire::decode`;
//! - **stream** (front-end → back-end, through the socket code): the same messages,
//!   with raw bytes between them that put the stream out of step, sent with
//!   `channel::send_message` (descriptors as `SCM_RIGHTS`) over a socket pair and read
//!   back with `channel::recv_message`, then decoded;
//! - **backend channel** (back-end → front-end and the replies back): misses and
//!   access failures sent by `channel::MissChannel`, with fuzzed front-end replies
//!   (well-formed, wrong in one field, truncated), reply-ack on or off, cancellation,
//!   and timeouts that leave replies owed.
//!
//! The front-end's side of the back-end channel (device-host's `handle_backend_req`,
//! and the reply reader of its main socket) is private to `device_host::vhost_user`
//! and needs a live connection, so it is not called here; instead every message the
//! back-end library sends is checked against the rules that function applies.
//!
//! Checked, besides "no panic":
//! - `decode` refuses exactly what its error says: bad flags iff the flag rule fails,
//!   `PayloadSize`/`FdCount` with the real payload length and descriptor count,
//!   `Unsupported` only for codes it does not implement;
//! - an accepted message has the payload size its request needs (fixed sizes exactly;
//!   a memory table with `nregions` slots or the full 8; a config access with its
//!   `size` bytes) and the descriptors it needs, and the decoded fields are the
//!   payload's bytes;
//! - a decoded request re-encoded with the library's wire structs decodes to the same
//!   request, byte for byte where the request keeps every payload byte;
//! - `recv_message` parses exactly what the byte stream holds (headers, payloads,
//!   over-long payloads skipped as `Err(size)`), never more than `MAX_FDS` descriptors;
//! - `MissChannel` sends well-formed `IOTLB_MSG`s (miss with need-reply, access-fail
//!   without), nothing when it may not, and interprets replies as a model predicts
//!   (skipping replies owed to misses it stopped waiting for).
//!
//! `decode` refuses a payload whose length is not `header.size` (this target found
//! that it used to accept one; see the README).

use crate::input::Input;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::Duration;
use vhost_iotlb::channel::{recv_message, send_message, MissChannel, MissError};
use vhost_iotlb::wire::{
    backend_req, decode, flags, iotlb, req, ConfigHeader, Header, IotlbMsg, MemoryHeader,
    MemoryRegion, Request, VringAddr, VringState, WireError, HEADER_SIZE, MAX_CONFIG_SIZE, MAX_FDS,
    MAX_PAYLOAD, MAX_REGIONS, VRING_NOFD,
};
use zerocopy::{FromBytes, IntoBytes};

/// Every request code `decode` implements (the first [`SUPPORTED`]), then codes it must
/// refuse.
const CODES: [u32; 28] = [
    req::GET_FEATURES,
    req::SET_FEATURES,
    req::SET_OWNER,
    req::RESET_OWNER,
    req::SET_MEM_TABLE,
    req::SET_VRING_NUM,
    req::SET_VRING_ADDR,
    req::SET_VRING_BASE,
    req::GET_VRING_BASE,
    req::SET_VRING_KICK,
    req::SET_VRING_CALL,
    req::SET_VRING_ERR,
    req::GET_PROTOCOL_FEATURES,
    req::SET_PROTOCOL_FEATURES,
    req::GET_QUEUE_NUM,
    req::SET_VRING_ENABLE,
    req::SET_BACKEND_REQ_FD,
    req::IOTLB_MSG,
    req::GET_CONFIG,
    req::SET_CONFIG,
    req::APERTURE_SET_PUSH_RING,
    0,
    6,
    7,
    19,
    23,
    26,
    41,
];
const SUPPORTED: usize = 21;
/// Messages per input.
const MAX_MSGS: usize = 24;
/// Bytes a stream input may put on the socket (well under its buffer, so the writer
/// never blocks).
const MAX_STREAM: usize = 64 << 10;
/// Size of `struct vhost_iotlb_msg` and of one reply on the back-end channel.
const IOTLB_SIZE: usize = size_of::<IotlbMsg>();
const REPLY_SIZE: usize = HEADER_SIZE + 8;

/// The target's body: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let Some(mode) = inp.u8() else {
        return;
    };
    match mode % 4 {
        0 | 1 => direct(&mut inp),
        2 => stream(&mut inp),
        _ => backend_channel(&mut inp),
    }
}

/// `n` descriptors (duplicates of one `/dev/null`).
fn fds(n: usize) -> Vec<File> {
    (0..n)
        .map(|_| null().try_clone().expect("dup /dev/null"))
        .collect()
}

fn null() -> &'static File {
    static NULL: OnceLock<File> = OnceLock::new();
    NULL.get_or_init(|| File::open("/dev/null").expect("open /dev/null"))
}

struct Msg {
    header: Header,
    payload: Vec<u8>,
    nfds: usize,
}

/// The payload size request `code` takes; `n` picks the region count of a memory
/// table (0 or 9+: the full 8 slots) and the bytes of a config access.
fn canonical_len(code: u32, n: usize) -> usize {
    match code {
        req::GET_FEATURES
        | req::SET_OWNER
        | req::RESET_OWNER
        | req::GET_PROTOCOL_FEATURES
        | req::GET_QUEUE_NUM
        | req::SET_BACKEND_REQ_FD => 0,
        req::SET_FEATURES
        | req::SET_PROTOCOL_FEATURES
        | req::SET_VRING_KICK
        | req::SET_VRING_CALL
        | req::SET_VRING_ERR
        | req::APERTURE_SET_PUSH_RING => 8,
        req::SET_VRING_NUM | req::SET_VRING_BASE | req::GET_VRING_BASE | req::SET_VRING_ENABLE => {
            size_of::<VringState>()
        }
        req::SET_VRING_ADDR => size_of::<VringAddr>(),
        req::SET_MEM_TABLE => {
            let slots = if (1..=MAX_REGIONS).contains(&n) {
                n
            } else {
                MAX_REGIONS
            };
            size_of::<MemoryHeader>() + slots * size_of::<MemoryRegion>()
        }
        req::IOTLB_MSG => IOTLB_SIZE,
        req::GET_CONFIG | req::SET_CONFIG => size_of::<ConfigHeader>() + n * 17,
        _ => n,
    }
}

/// The descriptors a well-formed `payload` of `code` comes with.
fn right_fds(code: u32, payload: &[u8]) -> usize {
    match code {
        req::SET_MEM_TABLE => payload
            .get(..4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .min(MAX_FDS + 1),
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
            match u64::read_from_bytes(payload) {
                Ok(w) if w & VRING_NOFD != 0 => 0,
                _ => 1,
            }
        }
        req::SET_BACKEND_REQ_FD | req::APERTURE_SET_PUSH_RING => 1,
        _ => 0,
    }
}

fn put32(p: &mut [u8], at: usize, v: u32) {
    if let Some(s) = p.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_ne_bytes());
    }
}

/// One front-end message from the input.
fn message(inp: &mut Input<'_>) -> Option<Msg> {
    let c = inp.u8()?;
    let code = if c < 0xf0 {
        CODES[usize::from(c) % CODES.len()]
    } else {
        inp.u32()?
    };
    let f = inp.u8()?;
    let hflags = match f & 3 {
        0 => flags::VERSION,
        1 => flags::VERSION | flags::NEED_REPLY,
        2 => u32::from(f >> 2),
        _ => inp.u32()?,
    };
    let shape = inp.u8()?;
    let n = usize::from(shape >> 4);
    let canonical = canonical_len(code, n);
    let len = match shape & 3 {
        0 | 1 => canonical,
        2 => (canonical + n % 3).saturating_sub(1),
        _ => usize::from(inp.u16()?) % (MAX_PAYLOAD + 64),
    };
    let mut payload = inp.up_to(len).to_vec();
    payload.resize(len, 0);
    // Fix-ups for counts the fuzzer would rarely guess.
    if shape & 4 != 0 {
        match code {
            req::SET_MEM_TABLE => put32(&mut payload, 0, (n % 10) as u32),
            req::GET_CONFIG | req::SET_CONFIG => {
                put32(&mut payload, 4, len.saturating_sub(12) as u32);
                if shape & 8 != 0 {
                    put32(&mut payload, 0, 0);
                }
            }
            req::IOTLB_MSG if len >= 26 => {
                payload[24] = (n >> 2) as u8; // perm
                payload[25] = (n % 5) as u8; // type
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR if len >= 8 => {
                let nofd = if shape & 8 != 0 { VRING_NOFD } else { 0 };
                payload[..8].copy_from_slice(&(n as u64 | nofd).to_ne_bytes());
            }
            _ => {}
        }
    }
    let s = inp.u8()?;
    let size = match s & 7 {
        0..=4 => len as u32,
        5 => (len as u32).wrapping_add(1),
        6 => (len as u32).wrapping_sub(1),
        _ => inp.u32()?,
    };
    let nfds = match s >> 3 {
        0..=15 => right_fds(code, &payload),
        k => usize::from(k - 16) % (MAX_FDS + 2),
    };
    Some(Msg {
        header: Header {
            request: code,
            flags: hflags,
            size,
        },
        payload,
        nfds,
    })
}

/// Front-end messages straight into `decode`.
fn direct(inp: &mut Input<'_>) {
    for _ in 0..MAX_MSGS {
        let Some(m) = message(inp) else {
            return;
        };
        check_decode(&m.header, &m.payload, fds(m.nfds));
    }
}

/// Front-end messages through a socket pair, `send_message` to `recv_message`.
fn stream(inp: &mut Input<'_>) {
    let (tx, rx) = UnixStream::pair().expect("socketpair");
    let mut sent: Vec<u8> = Vec::new();
    // Where messages with more descriptors than a message may carry start.
    let mut crowded: Vec<usize> = Vec::new();
    let nullfd: RawFd = null().as_raw_fd();
    for _ in 0..MAX_MSGS {
        let Some(op) = inp.u8() else {
            break;
        };
        if op < 0x20 {
            // Raw bytes: a stream out of step.
            let raw = inp.up_to(usize::from(op));
            (&tx).write_all(raw).expect("write raw bytes");
            sent.extend_from_slice(raw);
            continue;
        }
        let Some(m) = message(inp) else {
            break;
        };
        if sent.len() + HEADER_SIZE + m.payload.len() > MAX_STREAM {
            break;
        }
        if m.nfds > MAX_FDS {
            crowded.push(sent.len());
        }
        let raw = vec![nullfd; m.nfds];
        send_message(&tx, &m.header, &m.payload, &raw).expect("send_message");
        sent.extend_from_slice(m.header.as_bytes());
        sent.extend_from_slice(&m.payload);
    }
    drop(tx);

    // What recv_message must find in `sent`, message by message.
    let mut pos = 0;
    loop {
        let got = recv_message(&rx);
        let left = sent.len() - pos;
        // More than MAX_FDS descriptors: the control message is truncated, and
        // vmm-sys-util's recvmsg closes them and fails with ENOBUFS (the bytes it read
        // are lost). recv_message passes the error on; the session then ends.
        if let Err(e) = &got {
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                let end = if left >= HEADER_SIZE {
                    let h =
                        Header::read_from_bytes(&sent[pos..pos + HEADER_SIZE]).expect("12 bytes");
                    (pos + HEADER_SIZE).saturating_add(h.size as usize)
                } else {
                    sent.len()
                };
                assert!(
                    crowded.iter().any(|&p| p >= pos && p < end),
                    "ENOBUFS reading [{pos}, {end}) without a message of {MAX_FDS}+ descriptors"
                );
                return;
            }
        }
        if left == 0 {
            assert!(matches!(got, Ok(None)), "message past the end: {got:?}");
            return;
        }
        if left < HEADER_SIZE {
            assert!(got.is_err(), "stream ending in a header: {got:?}");
            return;
        }
        let header = Header::read_from_bytes(&sent[pos..pos + HEADER_SIZE]).expect("12 bytes");
        let size = header.size as usize;
        if left - HEADER_SIZE < size {
            assert!(got.is_err(), "stream ending in a payload: {got:?}");
            return;
        }
        let inc = got
            .expect("a whole message is received")
            .expect("not at the end");
        assert_eq!(inc.header, header);
        assert!(
            inc.fds.len() <= MAX_FDS,
            "{} descriptors kept",
            inc.fds.len()
        );
        let body = &sent[pos + HEADER_SIZE..pos + HEADER_SIZE + size];
        pos += HEADER_SIZE + size;
        match inc.payload {
            Ok(p) => {
                assert!(size <= MAX_PAYLOAD, "{size}-byte payload returned");
                assert_eq!(p, body);
                check_decode(&inc.header, &p, inc.fds);
            }
            Err(s) => {
                assert!(size > MAX_PAYLOAD, "{size}-byte payload refused");
                assert_eq!(s, header.size);
            }
        }
    }
}

fn flags_ok(f: u32) -> bool {
    f & flags::VERSION_MASK == flags::VERSION && f & !(flags::VERSION_MASK | flags::NEED_REPLY) == 0
}

/// Decodes one message and checks the answer against the message.
fn check_decode(h: &Header, payload: &[u8], fds: Vec<File>) {
    let nfds = fds.len();
    let result = decode(h, payload, fds);
    let supported = CODES[..SUPPORTED].contains(&h.request);
    let code = h.request;
    if let Err(WireError::BadFlags(f)) = result {
        assert!(!flags_ok(h.flags) && f == h.flags, "BadFlags({f:#x})");
        return;
    }
    assert!(flags_ok(h.flags), "flags {:#x} accepted", h.flags);
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            match e {
                WireError::BadFlags(_) => unreachable!(),
                WireError::Unsupported(c) => assert!(c == code && !supported, "{e}"),
                WireError::PayloadSize {
                    request,
                    expected,
                    got,
                } => {
                    assert_eq!(request, code);
                    assert_eq!(got, payload.len(), "{e}");
                    assert_ne!(expected, got, "{e}");
                }
                WireError::FdCount {
                    request,
                    expected,
                    got,
                } => {
                    assert_eq!(request, code);
                    assert_eq!(got, nfds, "{e}");
                    assert_ne!(expected, got, "{e}");
                }
                WireError::PayloadTooLong(_) => panic!("decode does not judge payload limits"),
                WireError::SizeMismatch { announced, got } => {
                    assert_eq!(announced, h.size, "{e}");
                    assert_eq!(got, payload.len(), "{e}");
                    assert_ne!(announced as usize, got, "{e}");
                }
                WireError::RegionCount(n) => {
                    assert_eq!(code, req::SET_MEM_TABLE);
                    assert!(n == 0 || n as usize > MAX_REGIONS, "{e}");
                }
                WireError::VringFdWord(w) => {
                    assert!(matches!(
                        code,
                        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR
                    ));
                    assert_ne!(w & !(0xff | VRING_NOFD), 0, "{e}");
                }
                WireError::IotlbType(k) => {
                    assert_eq!(code, req::IOTLB_MSG);
                    assert!(k != iotlb::UPDATE && k != iotlb::INVALIDATE, "{e}");
                }
                WireError::IotlbPerm(p) => {
                    assert_eq!(code, req::IOTLB_MSG);
                    assert!(!(1..=3).contains(&p), "{e}");
                }
                WireError::ConfigRange { offset, size } => {
                    assert!(code == req::GET_CONFIG || code == req::SET_CONFIG);
                    assert!(
                        u64::from(offset) + u64::from(size) > u64::from(MAX_CONFIG_SIZE),
                        "{e}"
                    );
                }
            }
            return;
        }
    };
    assert!(supported, "request {code} accepted");
    assert_eq!(
        h.size as usize,
        payload.len(),
        "request {code} accepted with header size {} and a {}-byte payload",
        h.size,
        payload.len()
    );
    check_accepted(code, payload, nfds, &r);
    round_trip(code, payload, &r);
}

fn word(payload: &[u8]) -> u64 {
    u64::read_from_bytes(payload).expect("an 8-byte payload")
}

/// An accepted request: the right variant, the payload size it needs, the fields its
/// bytes hold, the descriptors it needs.
fn check_accepted(code: u32, payload: &[u8], nfds: usize, r: &Request) {
    let len = payload.len();
    let want_code = match r {
        Request::GetFeatures => req::GET_FEATURES,
        Request::SetOwner => req::SET_OWNER,
        Request::ResetOwner => req::RESET_OWNER,
        Request::GetProtocolFeatures => req::GET_PROTOCOL_FEATURES,
        Request::GetQueueNum => req::GET_QUEUE_NUM,
        Request::SetFeatures(_) => req::SET_FEATURES,
        Request::SetProtocolFeatures(_) => req::SET_PROTOCOL_FEATURES,
        Request::SetVringNum(_) => req::SET_VRING_NUM,
        Request::SetVringBase(_) => req::SET_VRING_BASE,
        Request::GetVringBase(_) => req::GET_VRING_BASE,
        Request::SetVringEnable(_) => req::SET_VRING_ENABLE,
        Request::SetVringAddr(_) => req::SET_VRING_ADDR,
        Request::SetVringKick(..) => req::SET_VRING_KICK,
        Request::SetVringCall(..) => req::SET_VRING_CALL,
        Request::SetVringErr(..) => req::SET_VRING_ERR,
        Request::SetMemTable(_) => req::SET_MEM_TABLE,
        Request::SetBackendReqFd(_) => req::SET_BACKEND_REQ_FD,
        Request::SetPushRing(..) => req::APERTURE_SET_PUSH_RING,
        Request::IotlbUpdate { .. } | Request::IotlbInvalidate { .. } => req::IOTLB_MSG,
        Request::GetConfig(_) => req::GET_CONFIG,
        Request::SetConfig(..) => req::SET_CONFIG,
    };
    assert_eq!(want_code, code, "request {code} decoded as {r:?}");
    match r {
        Request::GetFeatures
        | Request::SetOwner
        | Request::ResetOwner
        | Request::GetProtocolFeatures
        | Request::GetQueueNum => assert!(len == 0 && nfds == 0),
        Request::SetFeatures(v) | Request::SetProtocolFeatures(v) => {
            assert!(len == 8 && nfds == 0);
            assert_eq!(*v, word(payload));
        }
        Request::SetVringNum(s)
        | Request::SetVringBase(s)
        | Request::GetVringBase(s)
        | Request::SetVringEnable(s) => {
            assert!(len == size_of::<VringState>() && nfds == 0);
            assert_eq!(s.as_bytes(), payload);
        }
        Request::SetVringAddr(a) => {
            assert!(len == size_of::<VringAddr>() && nfds == 0);
            assert_eq!(a.as_bytes(), payload);
        }
        Request::SetVringKick(i, f) | Request::SetVringCall(i, f) | Request::SetVringErr(i, f) => {
            assert_eq!(len, 8);
            let w = word(payload);
            assert_eq!(w & !(0xff | VRING_NOFD), 0);
            assert_eq!(u64::from(*i), w & 0xff);
            assert_eq!(f.is_some(), w & VRING_NOFD == 0);
            assert_eq!(nfds, usize::from(f.is_some()));
        }
        Request::SetMemTable(regions) => {
            let n = regions.len();
            assert!((1..=MAX_REGIONS).contains(&n));
            let head = MemoryHeader::read_from_bytes(&payload[..8]).expect("8-byte header");
            assert_eq!(head.nregions as usize, n);
            let rs = size_of::<MemoryRegion>();
            assert!(
                len == 8 + n * rs || len == 8 + MAX_REGIONS * rs,
                "{len} bytes"
            );
            assert_eq!(nfds, n);
            for (i, (region, _)) in regions.iter().enumerate() {
                assert_eq!(region.as_bytes(), &payload[8 + i * rs..8 + (i + 1) * rs]);
            }
        }
        Request::SetBackendReqFd(_) => assert!(len == 0 && nfds == 1),
        Request::SetPushRing(capacity, _) => {
            assert!(len == 8 && nfds == 1);
            assert_eq!(*capacity, word(payload));
        }
        Request::IotlbUpdate {
            iova,
            size,
            uaddr,
            perm,
        } => {
            assert!(len == IOTLB_SIZE && nfds == 0);
            let m = IotlbMsg::read_from_bytes(payload).expect("32 bytes");
            assert_eq!(m.kind, iotlb::UPDATE);
            assert!(matches!(
                *perm,
                iotlb::PERM_RO | iotlb::PERM_WO | iotlb::PERM_RW
            ));
            assert_eq!(
                (m.iova, m.size, m.uaddr, m.perm),
                (*iova, *size, *uaddr, *perm)
            );
        }
        Request::IotlbInvalidate { iova, size } => {
            assert!(len == IOTLB_SIZE && nfds == 0);
            let m = IotlbMsg::read_from_bytes(payload).expect("32 bytes");
            assert_eq!(m.kind, iotlb::INVALIDATE);
            assert_eq!((m.iova, m.size), (*iova, *size));
        }
        Request::GetConfig(head) | Request::SetConfig(head, _) => {
            assert_eq!(nfds, 0);
            assert!(head.size <= MAX_CONFIG_SIZE);
            assert!(head.offset <= MAX_CONFIG_SIZE - head.size);
            assert_eq!(len, 12 + head.size as usize);
            assert_eq!(head.as_bytes(), &payload[..12]);
            if let Request::SetConfig(_, body) = r {
                assert_eq!(&body[..], &payload[12..]);
            }
        }
    }
}

/// What a request means, without its descriptors' numbers.
fn norm(r: &Request) -> String {
    match r {
        Request::SetVringKick(i, f) => format!("kick {i} {}", f.is_some()),
        Request::SetVringCall(i, f) => format!("call {i} {}", f.is_some()),
        Request::SetVringErr(i, f) => format!("err {i} {}", f.is_some()),
        Request::SetMemTable(v) => {
            let regions: Vec<_> = v.iter().map(|(r, _)| r).collect();
            format!("mem table {regions:?}")
        }
        Request::SetBackendReqFd(_) => "backend req fd".to_string(),
        Request::SetPushRing(capacity, _) => format!("push ring {capacity}"),
        other => format!("{other:?}"),
    }
}

/// Encodes a request with the library's wire structs: code, payload, descriptors,
/// and whether the payload must equal the one it was decoded from (requests that
/// drop padding or ignored fields do not keep every byte).
fn encode(r: &Request) -> (u32, Vec<u8>, usize, bool) {
    let kick = |code, i: &u32, f: &Option<File>| {
        let nofd = if f.is_some() { 0 } else { VRING_NOFD };
        (
            code,
            (u64::from(*i) | nofd).to_ne_bytes().to_vec(),
            usize::from(f.is_some()),
            true,
        )
    };
    let iotlb_msg = |iova, size, uaddr, perm, kind| IotlbMsg {
        iova,
        size,
        uaddr,
        perm,
        kind,
        padding: [0; 6],
    };
    match r {
        Request::GetFeatures => (req::GET_FEATURES, vec![], 0, true),
        Request::SetOwner => (req::SET_OWNER, vec![], 0, true),
        Request::ResetOwner => (req::RESET_OWNER, vec![], 0, true),
        Request::GetProtocolFeatures => (req::GET_PROTOCOL_FEATURES, vec![], 0, true),
        Request::GetQueueNum => (req::GET_QUEUE_NUM, vec![], 0, true),
        Request::SetFeatures(v) => (req::SET_FEATURES, v.to_ne_bytes().to_vec(), 0, true),
        Request::SetProtocolFeatures(v) => (
            req::SET_PROTOCOL_FEATURES,
            v.to_ne_bytes().to_vec(),
            0,
            true,
        ),
        Request::SetVringNum(s) => (req::SET_VRING_NUM, s.as_bytes().to_vec(), 0, true),
        Request::SetVringBase(s) => (req::SET_VRING_BASE, s.as_bytes().to_vec(), 0, true),
        Request::GetVringBase(s) => (req::GET_VRING_BASE, s.as_bytes().to_vec(), 0, true),
        Request::SetVringEnable(s) => (req::SET_VRING_ENABLE, s.as_bytes().to_vec(), 0, true),
        Request::SetVringAddr(a) => (req::SET_VRING_ADDR, a.as_bytes().to_vec(), 0, true),
        Request::SetVringKick(i, f) => kick(req::SET_VRING_KICK, i, f),
        Request::SetVringCall(i, f) => kick(req::SET_VRING_CALL, i, f),
        Request::SetVringErr(i, f) => kick(req::SET_VRING_ERR, i, f),
        Request::SetMemTable(v) => {
            let mut p = MemoryHeader {
                nregions: v.len() as u32,
                padding: 0,
            }
            .as_bytes()
            .to_vec();
            for (region, _) in v {
                p.extend_from_slice(region.as_bytes());
            }
            (req::SET_MEM_TABLE, p, v.len(), false)
        }
        Request::SetBackendReqFd(_) => (req::SET_BACKEND_REQ_FD, vec![], 1, true),
        Request::SetPushRing(capacity, _) => (
            req::APERTURE_SET_PUSH_RING,
            capacity.to_ne_bytes().to_vec(),
            1,
            true,
        ),
        Request::IotlbUpdate {
            iova,
            size,
            uaddr,
            perm,
        } => {
            let m = iotlb_msg(*iova, *size, *uaddr, *perm, iotlb::UPDATE);
            (req::IOTLB_MSG, m.as_bytes().to_vec(), 0, false)
        }
        Request::IotlbInvalidate { iova, size } => {
            let m = iotlb_msg(*iova, *size, 0, 0, iotlb::INVALIDATE);
            (req::IOTLB_MSG, m.as_bytes().to_vec(), 0, false)
        }
        Request::GetConfig(head) => {
            let mut p = head.as_bytes().to_vec();
            p.resize(12 + head.size as usize, 0);
            (req::GET_CONFIG, p, 0, false)
        }
        Request::SetConfig(head, body) => {
            let mut p = head.as_bytes().to_vec();
            p.extend_from_slice(body);
            (req::SET_CONFIG, p, 0, true)
        }
    }
}

/// Re-encodes an accepted request and decodes it again: the same request.
fn round_trip(code: u32, payload: &[u8], r: &Request) {
    let (code2, p2, n2, exact) = encode(r);
    assert_eq!(code2, code);
    if exact {
        assert_eq!(p2, payload, "request {code} re-encodes differently");
    }
    let h2 = Header {
        request: code2,
        flags: flags::VERSION,
        size: p2.len() as u32,
    };
    let again = decode(&h2, &p2, fds(n2))
        .unwrap_or_else(|e| panic!("re-encoded request {code} refused: {e} ({r:?})"));
    assert_eq!(norm(&again), norm(r), "request {code} does not round-trip");
}

/// What the front-end's back-end request handler (device-host) accepts: version 1,
/// not a reply, `IOTLB_MSG`, a 32-byte body of type miss or access-fail.
fn frontend_accepts(h: &Header, body: &[u8]) -> Option<IotlbMsg> {
    let well_formed = h.flags & flags::VERSION_MASK == flags::VERSION
        && h.flags & flags::REPLY == 0
        && h.request == backend_req::IOTLB_MSG;
    let m = IotlbMsg::read_from_bytes(body)
        .ok()
        .filter(|_| well_formed)?;
    matches!(m.kind, iotlb::MISS | iotlb::ACCESS_FAIL).then_some(m)
}

/// What a miss should return, as the model predicts it.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Ok,
    Refused(u64),
    NoReplyAck,
    Cancelled,
    BadReply,
    Io,
}

fn outcome(r: &Result<(), MissError>) -> Option<Expect> {
    Some(match r {
        Ok(()) => Expect::Ok,
        Err(MissError::Refused(v)) => Expect::Refused(*v),
        Err(MissError::NoReplyAck) => Expect::NoReplyAck,
        Err(MissError::Cancelled) => Expect::Cancelled,
        Err(MissError::BadReply(_)) => Expect::BadReply,
        Err(MissError::Io(_)) => Expect::Io,
        Err(MissError::Timeout(_)) => return None,
    })
}

/// The back-end request channel: `MissChannel` against fuzzed front-end replies.
fn backend_channel(inp: &mut Input<'_>) {
    let Some(setup) = inp.u8() else {
        return;
    };
    let reply_ack = setup & 1 != 0;
    // The front-end's replies, all written before the back-end asks: it reads them in
    // order, 20 bytes at a time.
    let mut replies = Vec::new();
    for _ in 0..(setup >> 1) % 8 {
        let Some(k) = inp.u8() else {
            return;
        };
        match k % 4 {
            0 | 1 => {
                let h = Header {
                    request: backend_req::IOTLB_MSG,
                    flags: flags::VERSION | flags::REPLY,
                    size: 8,
                };
                let v: u64 = match k >> 2 {
                    0..=31 => 0,
                    32..=47 => 1,
                    _ => inp.u64().unwrap_or(7),
                };
                replies.extend_from_slice(h.as_bytes());
                replies.extend_from_slice(&v.to_ne_bytes());
            }
            2 => {
                // A reply wrong in one field, or right by chance.
                let Some(b) = inp.bytes(4) else {
                    return;
                };
                let h = Header {
                    request: u32::from(b[0] % 4),
                    flags: u32::from(b[1] % 16),
                    size: u32::from(b[2] % 12),
                };
                replies.extend_from_slice(h.as_bytes());
                replies.extend_from_slice(&u64::from(b[3] % 2).to_ne_bytes());
            }
            _ => replies.extend_from_slice(inp.up_to(usize::from(k >> 2) % 24)),
        }
    }
    let (back, front) = UnixStream::pair().expect("socketpair");
    (&front).write_all(&replies).expect("write replies");
    front.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut ch = MissChannel::new(back, reply_ack);
    let (mut pos, mut owed) = (0usize, 0usize);
    // The messages the back-end must have sent: (type, iova, size, perm).
    let mut sent: Vec<(u8, u64, u64, u8)> = Vec::new();
    let long = Duration::from_secs(10);
    let short = Duration::from_nanos(1);
    for _ in 0..8 {
        let (Some(op), Some(iova), Some(size), Some(perm)) =
            (inp.u8(), inp.u64(), inp.u64(), inp.u8())
        else {
            break;
        };
        if op % 4 == 3 {
            ch.access_fail(iova, size, perm)
                .expect("access_fail on an open channel");
            sent.push((iotlb::ACCESS_FAIL, iova, size, perm));
            continue;
        }
        let cancel = AtomicBool::new(op & 4 != 0);
        // A 1 ns timeout gives up at once (or, rarely, finds the reply first): only
        // with nothing owed, so that either way the model knows what was read.
        let timeout = if op & 8 != 0 && owed == 0 {
            short
        } else {
            long
        };
        let r = ch.miss(iova, size, perm, &cancel, timeout);
        let expect = if !reply_ack {
            Expect::NoReplyAck
        } else if op & 4 != 0 {
            Expect::Cancelled
        } else {
            sent.push((iotlb::MISS, iova, size, perm));
            if let Err(MissError::Timeout(t)) = &r {
                assert_eq!(timeout, short, "timed out with a reply or EOF waiting");
                assert_eq!(*t, timeout);
                owed += 1;
                continue;
            }
            loop {
                if replies.len() - pos < REPLY_SIZE {
                    pos = replies.len();
                    break Expect::Io;
                }
                let h =
                    Header::read_from_bytes(&replies[pos..pos + HEADER_SIZE]).expect("12 bytes");
                let v = word(&replies[pos + HEADER_SIZE..pos + REPLY_SIZE]);
                pos += REPLY_SIZE;
                if h.request != backend_req::IOTLB_MSG
                    || h.flags != flags::VERSION | flags::REPLY
                    || h.size != 8
                {
                    break Expect::BadReply;
                }
                if owed > 0 {
                    owed -= 1;
                    continue;
                }
                break if v == 0 {
                    Expect::Ok
                } else {
                    Expect::Refused(v)
                };
            }
        };
        assert_eq!(outcome(&r), Some(expect), "miss returned {r:?}");
    }
    // What went to the front-end: exactly the messages above, each one it accepts.
    // Every send has completed, so all of it is queued: read until none is left
    // (not to the end: the back-end's close may reset the socket, as unread replies
    // are left behind).
    let mut got = Vec::new();
    front.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 4096];
    loop {
        match (&front).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("read back-end messages: {e}"),
        }
    }
    drop(ch);
    let msg_len = HEADER_SIZE + IOTLB_SIZE;
    assert_eq!(got.len(), sent.len() * msg_len, "bytes sent");
    for (chunk, &(kind, iova, size, perm)) in got.chunks(msg_len).zip(&sent) {
        let h = Header::read_from_bytes(&chunk[..HEADER_SIZE]).expect("12 bytes");
        let m = frontend_accepts(&h, &chunk[HEADER_SIZE..])
            .unwrap_or_else(|| panic!("the front-end refuses {h:?}"));
        assert_eq!(h.size as usize, IOTLB_SIZE);
        assert_eq!(h.flags & flags::NEED_REPLY != 0, kind == iotlb::MISS);
        assert_eq!((m.kind, m.iova, m.size, m.perm), (kind, iova, size, perm));
        assert_eq!((m.uaddr, m.padding), (0, [0; 6]));
    }
}
