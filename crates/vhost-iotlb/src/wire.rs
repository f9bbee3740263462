//! The vhost-user wire format (QEMU docs/interop/vhost-user.rst, "Message
//! Specification"): the 12-byte header, the payload structs as plain-old-data types, and
//! [`decode`], which turns one received message into a validated [`Request`] or says
//! what is wrong with it. Pure: no I/O, no state; the session applies what this returns.
//!
//! Only the messages a block or entropy backend with a device IOTLB needs are decoded;
//! every other request code decodes to [`WireError::Unsupported`], which the session
//! answers as a failure.

use std::fs::File;
use std::os::unix::net::UnixStream;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the message header: request, flags, size (three `u32`).
pub const HEADER_SIZE: usize = 12;
/// Largest payload decoded. The largest request we accept is a memory table (8 + 8 × 32
/// bytes) or a configuration access (12 + 256); 4 KiB is the limit QEMU's and rust-vmm's
/// implementations use too. A longer payload is read and thrown away, then refused.
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors one message may carry: a memory table has at most 8 regions
/// (`VHOST_MEMORY_BASELINE_NREGIONS`), each with one fd.
pub const MAX_FDS: usize = 8;
/// Most regions in a `SET_MEM_TABLE` (the payload has room for exactly 8).
pub const MAX_REGIONS: usize = 8;
/// Largest device configuration access (`VHOST_USER_MAX_CONFIG_SIZE` in QEMU).
pub const MAX_CONFIG_SIZE: u32 = 256;

/// Header flag bits ("Header": version in bits 0–1, reply bit 2, need_reply bit 3).
pub mod flags {
    /// The protocol version, the only one defined.
    pub const VERSION: u32 = 0x1;
    /// Mask of the version bits.
    pub const VERSION_MASK: u32 = 0x3;
    /// Set on every reply.
    pub const REPLY: u32 = 1 << 2;
    /// The sender wants a reply-ack (`VHOST_USER_PROTOCOL_F_REPLY_ACK`).
    pub const NEED_REPLY: u32 = 1 << 3;
}

/// Front-end request codes ("Front-end message types").
pub mod req {
    /// `VHOST_USER_GET_FEATURES`.
    pub const GET_FEATURES: u32 = 1;
    /// `VHOST_USER_SET_FEATURES`.
    pub const SET_FEATURES: u32 = 2;
    /// `VHOST_USER_SET_OWNER`.
    pub const SET_OWNER: u32 = 3;
    /// `VHOST_USER_RESET_OWNER` (deprecated).
    pub const RESET_OWNER: u32 = 4;
    /// `VHOST_USER_SET_MEM_TABLE`.
    pub const SET_MEM_TABLE: u32 = 5;
    /// `VHOST_USER_SET_VRING_NUM`.
    pub const SET_VRING_NUM: u32 = 8;
    /// `VHOST_USER_SET_VRING_ADDR`.
    pub const SET_VRING_ADDR: u32 = 9;
    /// `VHOST_USER_SET_VRING_BASE`.
    pub const SET_VRING_BASE: u32 = 10;
    /// `VHOST_USER_GET_VRING_BASE`.
    pub const GET_VRING_BASE: u32 = 11;
    /// `VHOST_USER_SET_VRING_KICK`.
    pub const SET_VRING_KICK: u32 = 12;
    /// `VHOST_USER_SET_VRING_CALL`.
    pub const SET_VRING_CALL: u32 = 13;
    /// `VHOST_USER_SET_VRING_ERR`.
    pub const SET_VRING_ERR: u32 = 14;
    /// `VHOST_USER_GET_PROTOCOL_FEATURES`.
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    /// `VHOST_USER_SET_PROTOCOL_FEATURES`.
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    /// `VHOST_USER_GET_QUEUE_NUM`.
    pub const GET_QUEUE_NUM: u32 = 17;
    /// `VHOST_USER_SET_VRING_ENABLE`.
    pub const SET_VRING_ENABLE: u32 = 18;
    /// `VHOST_USER_SET_BACKEND_REQ_FD` (formerly `SET_SLAVE_REQ_FD`).
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    /// `VHOST_USER_IOTLB_MSG`.
    pub const IOTLB_MSG: u32 = 22;
    /// `VHOST_USER_GET_CONFIG`.
    pub const GET_CONFIG: u32 = 24;
    /// `VHOST_USER_SET_CONFIG`.
    pub const SET_CONFIG: u32 = 25;
    /// Aperture's own: the push ring ([`crate::push_ring`]); payload the capacity
    /// (`u64`), one file descriptor. Only after
    /// [`protocol::APERTURE_PUSH_RING`](super::protocol::APERTURE_PUSH_RING) was acked.
    /// Far above the spec's codes, so that it never collides with one.
    pub const APERTURE_SET_PUSH_RING: u32 = 0x4150_0001;
}

/// Back-end request codes, sent on the back-end request channel.
pub mod backend_req {
    /// `VHOST_USER_BACKEND_IOTLB_MSG`: a miss or an access failure.
    pub const IOTLB_MSG: u32 = 1;
}

/// Protocol feature bits ("Protocol features").
pub mod protocol {
    /// `VHOST_USER_PROTOCOL_F_MQ`.
    pub const MQ: u64 = 1 << 0;
    /// `VHOST_USER_PROTOCOL_F_REPLY_ACK`.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// `VHOST_USER_PROTOCOL_F_BACKEND_REQ`.
    pub const BACKEND_REQ: u64 = 1 << 5;
    /// `VHOST_USER_PROTOCOL_F_CONFIG`.
    pub const CONFIG: u64 = 1 << 9;
    /// Aperture's own: IOTLB pushes through a shared ring ([`crate::push_ring`]).
    /// The spec assigns bits from 0 upwards; a front-end acks only bits it knows
    /// (QEMU masks the back-end's offer with its own), so only ours acks this one.
    pub const APERTURE_PUSH_RING: u64 = 1 << 63;
}

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the reused virtio feature bit 30 that says the
/// back-end speaks protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_IOMMU_PLATFORM` (= `VIRTIO_F_ACCESS_PLATFORM`, bit 33): ring and buffer
/// addresses are IOVAs, translated through the device IOTLB.
pub const VIRTIO_F_IOMMU_PLATFORM: u64 = 1 << 33;
/// `VHOST_VRING_F_LOG` in `SET_VRING_ADDR` flags: log used-ring writes (migration).
pub const VHOST_VRING_F_LOG: u32 = 1;
/// Bit 8 of the `u64` of `SET_VRING_KICK/CALL/ERR`: no file descriptor (poll instead).
pub const VRING_NOFD: u64 = 1 << 8;

/// `struct vhost_iotlb_msg` types and permissions ("An IOTLB message").
pub mod iotlb {
    /// Back-end to front-end: the IOVA is not in the back-end's IOTLB.
    pub const MISS: u8 = 1;
    /// Front-end to back-end: a translation.
    pub const UPDATE: u8 = 2;
    /// Front-end to back-end: drop translations of a range.
    pub const INVALIDATE: u8 = 3;
    /// Back-end to front-end: an access the IOTLB does not allow.
    pub const ACCESS_FAIL: u8 = 4;
    /// No access.
    pub const PERM_NONE: u8 = 0;
    /// Read access.
    pub const PERM_RO: u8 = 1;
    /// Write access.
    pub const PERM_WO: u8 = 2;
    /// Read and write access.
    pub const PERM_RW: u8 = 3;

    /// Whether an UPDATE may carry `perm`: some access, and nothing but access bits.
    pub fn is_update_perm(perm: u8) -> bool {
        matches!(perm, PERM_RO | PERM_WO | PERM_RW)
    }
}

/// The message header.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// [`flags`].
    pub flags: u32,
    /// Payload size in bytes.
    pub size: u32,
}

/// "A vring state description".
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VringState {
    /// Vring index.
    pub index: u32,
    /// A number whose meaning depends on the request.
    pub num: u32,
}

/// "A vring address description".
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VringAddr {
    /// Vring index.
    pub index: u32,
    /// [`VHOST_VRING_F_LOG`] or 0.
    pub flags: u32,
    /// Descriptor table address.
    pub desc: u64,
    /// Used ring address.
    pub used: u64,
    /// Available ring address.
    pub avail: u64,
    /// Guest address for used-ring logging.
    pub log: u64,
}

/// Header of "Memory regions description".
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MemoryHeader {
    /// Number of regions that follow.
    pub nregions: u32,
    /// Padding.
    pub padding: u32,
}

/// One region of a memory table.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MemoryRegion {
    /// Guest physical address of the region.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// The front-end's user (virtual) address of the region.
    pub userspace_addr: u64,
    /// Offset of the region in its file descriptor.
    pub mmap_offset: u64,
}

/// `struct vhost_iotlb_msg`: 26 bytes of fields, padded to 32 by C alignment.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// The front-end's user address the IOVA translates to (updates only).
    pub uaddr: u64,
    /// [`iotlb`] permission.
    pub perm: u8,
    /// [`iotlb`] type.
    pub kind: u8,
    /// C padding.
    pub padding: [u8; 6],
}

/// Header of "Virtio device config space"; `size` bytes of payload follow.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ConfigHeader {
    /// Offset in the device configuration.
    pub offset: u32,
    /// Bytes accessed.
    pub size: u32,
    /// 0: a front-end access for writable fields; 1: live migration.
    pub flags: u32,
}

/// Why a message cannot be decoded. Each is answered as a failure; none changes state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The header's version bits are not 1, or it carries the reply flag or unknown bits.
    #[error("header flags {0:#x}: version must be 1 and only need_reply may be set")]
    BadFlags(u32),
    /// The payload is longer than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u32),
    /// The header's size field disagrees with the payload that came with it.
    #[error("header announces a {announced}-byte payload, {got} bytes came")]
    SizeMismatch {
        /// `header.size`.
        announced: u32,
        /// Bytes given.
        got: usize,
    },
    /// The payload's size does not fit the request.
    #[error("request {request} needs a {expected}-byte payload, got {got}")]
    PayloadSize {
        /// Request code.
        request: u32,
        /// Bytes the request needs.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The message carries a different number of file descriptors than the request needs.
    #[error("request {request} needs {expected} file descriptors, got {got}")]
    FdCount {
        /// Request code.
        request: u32,
        /// Descriptors the request needs.
        expected: usize,
        /// Descriptors received.
        got: usize,
    },
    /// A memory table with 0 or more than [`MAX_REGIONS`] regions.
    #[error("memory table with {0} regions (1 to {MAX_REGIONS} allowed)")]
    RegionCount(u32),
    /// A vring kick/call/err `u64` with bits other than the index and the no-fd flag.
    #[error("vring file descriptor word {0:#x} has unknown bits")]
    VringFdWord(u64),
    /// An IOTLB message type the front-end may not send (miss, access-fail, unknown).
    #[error("IOTLB message type {0} is not an update or an invalidate")]
    IotlbType(u8),
    /// An IOTLB update with no access or unknown permission bits.
    #[error("IOTLB permission {0} is not read, write or read-write")]
    IotlbPerm(u8),
    /// A configuration access longer than [`MAX_CONFIG_SIZE`] or reaching past it.
    #[error(
        "configuration access of {size} bytes at offset {offset} exceeds {MAX_CONFIG_SIZE} bytes"
    )]
    ConfigRange {
        /// Offset asked for.
        offset: u32,
        /// Size asked for.
        size: u32,
    },
    /// A request code this back-end does not implement.
    #[error("request {0} is not supported")]
    Unsupported(u32),
}

/// A decoded, validated front-end request. File descriptors arrive as owned values;
/// any the request does not use were closed by [`decode`].
#[derive(Debug)]
pub enum Request {
    /// `GET_FEATURES`.
    GetFeatures,
    /// `SET_FEATURES`.
    SetFeatures(u64),
    /// `SET_OWNER`.
    SetOwner,
    /// `RESET_OWNER`.
    ResetOwner,
    /// `SET_MEM_TABLE`: regions with their file descriptors, in order.
    SetMemTable(Vec<(MemoryRegion, File)>),
    /// `SET_VRING_NUM`.
    SetVringNum(VringState),
    /// `SET_VRING_ADDR`.
    SetVringAddr(VringAddr),
    /// `SET_VRING_BASE`.
    SetVringBase(VringState),
    /// `GET_VRING_BASE`.
    GetVringBase(VringState),
    /// `SET_VRING_KICK`: the vring and its eventfd (`None`: poll, no fd).
    SetVringKick(u32, Option<File>),
    /// `SET_VRING_CALL`.
    SetVringCall(u32, Option<File>),
    /// `SET_VRING_ERR`.
    SetVringErr(u32, Option<File>),
    /// `GET_PROTOCOL_FEATURES`.
    GetProtocolFeatures,
    /// `SET_PROTOCOL_FEATURES`.
    SetProtocolFeatures(u64),
    /// `GET_QUEUE_NUM`.
    GetQueueNum,
    /// `SET_VRING_ENABLE`.
    SetVringEnable(VringState),
    /// `SET_BACKEND_REQ_FD`.
    SetBackendReqFd(UnixStream),
    /// [`req::APERTURE_SET_PUSH_RING`]: the ring's capacity and its memfd.
    SetPushRing(u64, File),
    /// `IOTLB_MSG` of type update.
    IotlbUpdate {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Front-end user address of `iova`.
        uaddr: u64,
        /// [`iotlb::PERM_RO`], [`iotlb::PERM_WO`] or [`iotlb::PERM_RW`].
        perm: u8,
    },
    /// `IOTLB_MSG` of type invalidate.
    IotlbInvalidate {
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    /// `GET_CONFIG`.
    GetConfig(ConfigHeader),
    /// `SET_CONFIG` with its bytes.
    SetConfig(ConfigHeader, Vec<u8>),
}

impl Header {
    /// Checks the flags of a front-end request: version 1, no reply bit, nothing unknown.
    ///
    /// # Errors
    /// [`WireError::BadFlags`].
    pub fn check_request(&self) -> Result<(), WireError> {
        let known = flags::VERSION_MASK | flags::NEED_REPLY;
        if self.flags & flags::VERSION_MASK != flags::VERSION || self.flags & !known != 0 {
            return Err(WireError::BadFlags(self.flags));
        }
        Ok(())
    }

    /// Whether the sender asked for a reply-ack.
    pub fn need_reply(&self) -> bool {
        self.flags & flags::NEED_REPLY != 0
    }
}

fn exact<T: FromBytes>(request: u32, payload: &[u8]) -> Result<T, WireError> {
    T::read_from_bytes(payload).map_err(|_| WireError::PayloadSize {
        request,
        expected: std::mem::size_of::<T>(),
        got: payload.len(),
    })
}

fn no_payload(request: u32, payload: &[u8]) -> Result<(), WireError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(WireError::PayloadSize {
            request,
            expected: 0,
            got: payload.len(),
        })
    }
}

fn fd_count(request: u32, fds: &[File], expected: usize) -> Result<(), WireError> {
    if fds.len() == expected {
        Ok(())
    } else {
        Err(WireError::FdCount {
            request,
            expected,
            got: fds.len(),
        })
    }
}

/// Decodes a vring fd word: index in bits 0–7, [`VRING_NOFD`] in bit 8, nothing else.
fn vring_fd(
    request: u32,
    payload: &[u8],
    mut fds: Vec<File>,
) -> Result<(u32, Option<File>), WireError> {
    let word: u64 = exact(request, payload)?;
    if word & !(0xff | VRING_NOFD) != 0 {
        return Err(WireError::VringFdWord(word));
    }
    let index = (word & 0xff) as u32;
    if word & VRING_NOFD != 0 {
        fd_count(request, &fds, 0)?;
        Ok((index, None))
    } else {
        fd_count(request, &fds, 1)?;
        Ok((index, fds.pop()))
    }
}

/// Decodes one front-end message. `fds` are the descriptors that came with it; they
/// are closed unless the request keeps them.
///
/// # Errors
/// A [`WireError`] naming what is malformed. Nothing is changed by a failed decode.
pub fn decode(header: &Header, payload: &[u8], mut fds: Vec<File>) -> Result<Request, WireError> {
    header.check_request()?;
    if usize::try_from(header.size).ok() != Some(payload.len()) {
        return Err(WireError::SizeMismatch {
            announced: header.size,
            got: payload.len(),
        });
    }
    let r = header.request;
    let payload_fdless = |fds: &[File]| fd_count(r, fds, 0);
    let request = match r {
        req::GET_FEATURES => {
            no_payload(r, payload)?;
            payload_fdless(&fds)?;
            Request::GetFeatures
        }
        req::SET_FEATURES => {
            payload_fdless(&fds)?;
            Request::SetFeatures(exact(r, payload)?)
        }
        req::SET_OWNER => {
            no_payload(r, payload)?;
            payload_fdless(&fds)?;
            Request::SetOwner
        }
        req::RESET_OWNER => {
            no_payload(r, payload)?;
            payload_fdless(&fds)?;
            Request::ResetOwner
        }
        req::SET_MEM_TABLE => {
            let hsize = std::mem::size_of::<MemoryHeader>();
            let (head, rest) = payload
                .split_at_checked(hsize)
                .ok_or(WireError::PayloadSize {
                    request: r,
                    expected: hsize,
                    got: payload.len(),
                })?;
            let head = MemoryHeader::read_from_bytes(head).map_err(|_| WireError::PayloadSize {
                request: r,
                expected: hsize,
                got: payload.len(),
            })?;
            let n = head.nregions as usize;
            if n == 0 || n > MAX_REGIONS {
                return Err(WireError::RegionCount(head.nregions));
            }
            // QEMU sends the fixed 8-slot array; a sender that sends only the used
            // slots is accepted too.
            let rsize = std::mem::size_of::<MemoryRegion>();
            if rest.len() != n * rsize && rest.len() != MAX_REGIONS * rsize {
                return Err(WireError::PayloadSize {
                    request: r,
                    expected: hsize + n * rsize,
                    got: payload.len(),
                });
            }
            fd_count(r, &fds, n)?;
            let mut out = Vec::with_capacity(n);
            for (i, fd) in fds.drain(..).enumerate() {
                let region = MemoryRegion::read_from_bytes(&rest[i * rsize..(i + 1) * rsize])
                    .map_err(|_| WireError::PayloadSize {
                        request: r,
                        expected: hsize + n * rsize,
                        got: payload.len(),
                    })?;
                out.push((region, fd));
            }
            Request::SetMemTable(out)
        }
        req::SET_VRING_NUM => {
            payload_fdless(&fds)?;
            Request::SetVringNum(exact(r, payload)?)
        }
        req::SET_VRING_ADDR => {
            payload_fdless(&fds)?;
            Request::SetVringAddr(exact(r, payload)?)
        }
        req::SET_VRING_BASE => {
            payload_fdless(&fds)?;
            Request::SetVringBase(exact(r, payload)?)
        }
        req::GET_VRING_BASE => {
            payload_fdless(&fds)?;
            Request::GetVringBase(exact(r, payload)?)
        }
        req::SET_VRING_KICK => {
            let (i, f) = vring_fd(r, payload, fds)?;
            Request::SetVringKick(i, f)
        }
        req::SET_VRING_CALL => {
            let (i, f) = vring_fd(r, payload, fds)?;
            Request::SetVringCall(i, f)
        }
        req::SET_VRING_ERR => {
            let (i, f) = vring_fd(r, payload, fds)?;
            Request::SetVringErr(i, f)
        }
        req::GET_PROTOCOL_FEATURES => {
            no_payload(r, payload)?;
            payload_fdless(&fds)?;
            Request::GetProtocolFeatures
        }
        req::SET_PROTOCOL_FEATURES => {
            payload_fdless(&fds)?;
            Request::SetProtocolFeatures(exact(r, payload)?)
        }
        req::GET_QUEUE_NUM => {
            no_payload(r, payload)?;
            payload_fdless(&fds)?;
            Request::GetQueueNum
        }
        req::SET_VRING_ENABLE => {
            payload_fdless(&fds)?;
            Request::SetVringEnable(exact(r, payload)?)
        }
        req::SET_BACKEND_REQ_FD => {
            no_payload(r, payload)?;
            fd_count(r, &fds, 1)?;
            let fd = fds.pop().ok_or(WireError::FdCount {
                request: r,
                expected: 1,
                got: 0,
            })?;
            Request::SetBackendReqFd(UnixStream::from(std::os::fd::OwnedFd::from(fd)))
        }
        req::APERTURE_SET_PUSH_RING => {
            fd_count(r, &fds, 1)?;
            let capacity: u64 = exact(r, payload)?;
            let fd = fds.pop().ok_or(WireError::FdCount {
                request: r,
                expected: 1,
                got: 0,
            })?;
            Request::SetPushRing(capacity, fd)
        }
        req::IOTLB_MSG => {
            payload_fdless(&fds)?;
            let m: IotlbMsg = exact(r, payload)?;
            match m.kind {
                iotlb::UPDATE => {
                    if !iotlb::is_update_perm(m.perm) {
                        return Err(WireError::IotlbPerm(m.perm));
                    }
                    Request::IotlbUpdate {
                        iova: m.iova,
                        size: m.size,
                        uaddr: m.uaddr,
                        perm: m.perm,
                    }
                }
                iotlb::INVALIDATE => Request::IotlbInvalidate {
                    iova: m.iova,
                    size: m.size,
                },
                other => return Err(WireError::IotlbType(other)),
            }
        }
        req::GET_CONFIG | req::SET_CONFIG => {
            payload_fdless(&fds)?;
            let hsize = std::mem::size_of::<ConfigHeader>();
            let head = payload
                .get(..hsize)
                .and_then(|h| ConfigHeader::read_from_bytes(h).ok())
                .ok_or(WireError::PayloadSize {
                    request: r,
                    expected: hsize,
                    got: payload.len(),
                })?;
            if head.size > MAX_CONFIG_SIZE || head.offset > MAX_CONFIG_SIZE - head.size {
                return Err(WireError::ConfigRange {
                    offset: head.offset,
                    size: head.size,
                });
            }
            // The payload carries `size` bytes after the header, for GET as for SET.
            let body = &payload[hsize..];
            if body.len() != head.size as usize {
                return Err(WireError::PayloadSize {
                    request: r,
                    expected: hsize + head.size as usize,
                    got: payload.len(),
                });
            }
            if r == req::GET_CONFIG {
                Request::GetConfig(head)
            } else {
                Request::SetConfig(head, body.to_vec())
            }
        }
        other => return Err(WireError::Unsupported(other)),
    };
    Ok(request)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;

    fn hdr(request: u32, size: usize) -> Header {
        Header {
            request,
            flags: flags::VERSION,
            size: size as u32,
        }
    }

    fn memfd() -> File {
        test_kit::mem::memfd("wire-unit", 4096)
    }

    #[test]
    fn structs_have_the_spec_sizes() {
        assert_eq!(std::mem::size_of::<Header>(), HEADER_SIZE);
        assert_eq!(std::mem::size_of::<VringState>(), 8);
        assert_eq!(std::mem::size_of::<VringAddr>(), 40);
        assert_eq!(std::mem::size_of::<MemoryRegion>(), 32);
        assert_eq!(std::mem::size_of::<IotlbMsg>(), 32);
        assert_eq!(std::mem::size_of::<ConfigHeader>(), 12);
    }

    #[test]
    fn header_flags_must_be_version_1_without_reply_or_unknown_bits() {
        for bad in [0, 2, flags::VERSION | flags::REPLY, flags::VERSION | 0x100] {
            let h = Header {
                request: req::GET_FEATURES,
                flags: bad,
                size: 0,
            };
            assert_eq!(
                decode(&h, &[], vec![]).unwrap_err(),
                WireError::BadFlags(bad)
            );
        }
        let h = Header {
            request: req::GET_FEATURES,
            flags: flags::VERSION | flags::NEED_REPLY,
            size: 0,
        };
        assert!(matches!(decode(&h, &[], vec![]), Ok(Request::GetFeatures)));
        assert!(h.need_reply());
    }

    #[test]
    fn a_header_size_that_disagrees_with_the_payload_is_refused() {
        // Found by the vhost_user_wire fuzz target: GET_FEATURES announcing 1 byte
        // with none given was accepted.
        let e = decode(&hdr(req::GET_FEATURES, 1), &[], vec![]).unwrap_err();
        assert!(matches!(
            e,
            WireError::SizeMismatch {
                announced: 1,
                got: 0
            }
        ));
        let e = decode(&hdr(req::SET_FEATURES, 4), &[0; 8], vec![]).unwrap_err();
        assert!(matches!(e, WireError::SizeMismatch { .. }));
    }

    #[test]
    fn fixed_size_payloads_must_be_exact() {
        let e = decode(&hdr(req::SET_FEATURES, 4), &[0; 4], vec![]).unwrap_err();
        assert_eq!(
            e,
            WireError::PayloadSize {
                request: req::SET_FEATURES,
                expected: 8,
                got: 4
            }
        );
        let e = decode(&hdr(req::GET_FEATURES, 8), &[0; 8], vec![]).unwrap_err();
        assert!(matches!(e, WireError::PayloadSize { expected: 0, .. }));
        let e = decode(&hdr(req::SET_VRING_ADDR, 39), &[0; 39], vec![]).unwrap_err();
        assert!(matches!(e, WireError::PayloadSize { expected: 40, .. }));
    }

    #[test]
    fn unexpected_fds_are_refused() {
        let e = decode(&hdr(req::SET_OWNER, 0), &[], vec![memfd()]).unwrap_err();
        assert_eq!(
            e,
            WireError::FdCount {
                request: req::SET_OWNER,
                expected: 0,
                got: 1
            }
        );
    }

    #[test]
    fn mem_table_region_count_and_fds_are_checked() {
        let mut p = MemoryHeader {
            nregions: 9,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        p.extend_from_slice(&[0; 8 * 32]);
        let e = decode(&hdr(req::SET_MEM_TABLE, p.len()), &p, vec![]).unwrap_err();
        assert_eq!(e, WireError::RegionCount(9));
        p[0] = 0;
        let e = decode(&hdr(req::SET_MEM_TABLE, p.len()), &p, vec![]).unwrap_err();
        assert_eq!(e, WireError::RegionCount(0));
        p[0] = 2;
        let e = decode(&hdr(req::SET_MEM_TABLE, p.len()), &p, vec![memfd()]).unwrap_err();
        assert!(matches!(
            e,
            WireError::FdCount {
                expected: 2,
                got: 1,
                ..
            }
        ));
        let ok = decode(
            &hdr(req::SET_MEM_TABLE, p.len()),
            &p,
            vec![memfd(), memfd()],
        )
        .unwrap();
        assert!(matches!(ok, Request::SetMemTable(v) if v.len() == 2));
        // Only the used slots: accepted; a truncated slot: refused.
        let short = &p[..8 + 2 * 32];
        assert!(decode(
            &hdr(req::SET_MEM_TABLE, short.len()),
            short,
            vec![memfd(), memfd()]
        )
        .is_ok());
        let cut = &p[..8 + 2 * 32 - 1];
        assert!(matches!(
            decode(
                &hdr(req::SET_MEM_TABLE, cut.len()),
                cut,
                vec![memfd(), memfd()]
            ),
            Err(WireError::PayloadSize { .. })
        ));
    }

    #[test]
    fn vring_fd_word_allows_only_index_and_nofd_bit() {
        let word = |w: u64| w.to_ne_bytes();
        assert!(matches!(
            decode(&hdr(req::SET_VRING_KICK, 8), &word(3), vec![memfd()]),
            Ok(Request::SetVringKick(3, Some(_)))
        ));
        assert!(matches!(
            decode(&hdr(req::SET_VRING_CALL, 8), &word(VRING_NOFD | 1), vec![]),
            Ok(Request::SetVringCall(1, None))
        ));
        assert_eq!(
            decode(&hdr(req::SET_VRING_KICK, 8), &word(0x200), vec![memfd()]).unwrap_err(),
            WireError::VringFdWord(0x200)
        );
        assert!(matches!(
            decode(&hdr(req::SET_VRING_KICK, 8), &word(0), vec![]).unwrap_err(),
            WireError::FdCount {
                expected: 1,
                got: 0,
                ..
            }
        ));
        assert!(matches!(
            decode(
                &hdr(req::SET_VRING_ERR, 8),
                &word(VRING_NOFD),
                vec![memfd()]
            )
            .unwrap_err(),
            WireError::FdCount {
                expected: 0,
                got: 1,
                ..
            }
        ));
    }

    #[test]
    fn iotlb_frontend_may_send_only_update_and_invalidate_with_valid_perm() {
        let msg = |kind, perm| {
            IotlbMsg {
                iova: 0x1000,
                size: 0x1000,
                uaddr: 0x7000_0000,
                perm,
                kind,
                padding: [0; 6],
            }
            .as_bytes()
            .to_vec()
        };
        let h = hdr(req::IOTLB_MSG, 32);
        assert!(matches!(
            decode(&h, &msg(iotlb::UPDATE, iotlb::PERM_RW), vec![]),
            Ok(Request::IotlbUpdate { perm: 3, .. })
        ));
        assert!(matches!(
            decode(&h, &msg(iotlb::INVALIDATE, 0), vec![]),
            Ok(Request::IotlbInvalidate {
                iova: 0x1000,
                size: 0x1000
            })
        ));
        assert_eq!(
            decode(&h, &msg(iotlb::UPDATE, iotlb::PERM_NONE), vec![]).unwrap_err(),
            WireError::IotlbPerm(0)
        );
        assert_eq!(
            decode(&h, &msg(iotlb::UPDATE, 7), vec![]).unwrap_err(),
            WireError::IotlbPerm(7)
        );
        for kind in [iotlb::MISS, iotlb::ACCESS_FAIL, 5, 6, 0] {
            assert_eq!(
                decode(&h, &msg(kind, 1), vec![]).unwrap_err(),
                WireError::IotlbType(kind)
            );
        }
    }

    #[test]
    fn config_access_is_bounded_to_256_bytes() {
        let mut p = ConfigHeader {
            offset: 250,
            size: 8,
            flags: 0,
        }
        .as_bytes()
        .to_vec();
        p.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode(&hdr(req::GET_CONFIG, p.len()), &p, vec![]).unwrap_err(),
            WireError::ConfigRange {
                offset: 250,
                size: 8
            }
        );
        p[0] = 0;
        assert!(matches!(
            decode(&hdr(req::GET_CONFIG, p.len()), &p, vec![]),
            Ok(Request::GetConfig(ConfigHeader {
                offset: 0,
                size: 8,
                ..
            }))
        ));
        let e = decode(
            &hdr(req::GET_CONFIG, p.len() - 1),
            &p[..p.len() - 1],
            vec![],
        )
        .unwrap_err();
        assert!(matches!(e, WireError::PayloadSize { .. }));
        p[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            decode(&hdr(req::SET_CONFIG, p.len()), &p, vec![]).unwrap_err(),
            WireError::ConfigRange { .. }
        ));
    }

    #[test]
    fn unknown_requests_are_unsupported() {
        for r in [0, 6, 7, 23, 26, 36, 39, 1000] {
            assert_eq!(
                decode(&hdr(r, 0), &[], vec![]).unwrap_err(),
                WireError::Unsupported(r)
            );
        }
    }
}
