//! Decoding of request bytes into a typed [`Request`] (pure and fuzzable; no state).
//!
//! The device-readable part of every request starts with a 4-byte head whose `type`
//! selects the layout (virtio v1.3 §5.13.6.3–§5.13.6.7). What a request says about
//! reserved fields and flags is carried through as decoded values; the *rules* about
//! them (which are `S_INVAL`, which are ignored) live in [`crate::state`], next to the
//! spec statements.

use crate::ids::{DomainId, EndpointId, Iova};
use crate::wire::{
    AttachBody, DetachBody, MapBody, ProbeBody, UnmapBody, HEAD_SIZE, VIRTIO_IOMMU_T_ATTACH,
    VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE, VIRTIO_IOMMU_T_UNMAP,
};
use zerocopy::FromBytes;

/// A decoded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ATTACH an endpoint to a domain.
    Attach {
        /// Domain to attach to (created if it does not exist).
        domain: DomainId,
        /// Endpoint to attach.
        endpoint: EndpointId,
        /// Raw `flags`.
        flags: u32,
        /// Whether the `reserved` bytes were non-zero.
        reserved_nonzero: bool,
    },
    /// DETACH an endpoint from a domain.
    Detach {
        /// Domain the driver believes the endpoint is in.
        domain: DomainId,
        /// Endpoint to detach.
        endpoint: EndpointId,
    },
    /// MAP an IOVA range.
    Map {
        /// Domain whose address space is changed.
        domain: DomainId,
        /// First IOVA.
        virt_start: Iova,
        /// Last IOVA (inclusive).
        virt_end: Iova,
        /// Guest-physical address of `virt_start`.
        phys_start: u64,
        /// Raw `flags`.
        flags: u32,
    },
    /// UNMAP an IOVA range.
    Unmap {
        /// Domain whose address space is changed.
        domain: DomainId,
        /// First IOVA.
        virt_start: Iova,
        /// Last IOVA (inclusive).
        virt_end: Iova,
        /// Whether the `reserved` bytes were non-zero.
        reserved_nonzero: bool,
    },
    /// PROBE an endpoint's properties.
    Probe {
        /// Endpoint probed.
        endpoint: EndpointId,
    },
}

/// Request type, used to index counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestType {
    /// ATTACH.
    Attach = 0,
    /// DETACH.
    Detach = 1,
    /// MAP.
    Map = 2,
    /// UNMAP.
    Unmap = 3,
    /// PROBE.
    Probe = 4,
}

impl RequestType {
    /// Every type, in counter order.
    pub const ALL: [RequestType; 5] = [
        RequestType::Attach,
        RequestType::Detach,
        RequestType::Map,
        RequestType::Unmap,
        RequestType::Probe,
    ];

    /// The type named by a request head's `type` byte, if the spec defines one.
    pub fn from_wire(type_: u8) -> Option<Self> {
        match type_ {
            VIRTIO_IOMMU_T_ATTACH => Some(Self::Attach),
            VIRTIO_IOMMU_T_DETACH => Some(Self::Detach),
            VIRTIO_IOMMU_T_MAP => Some(Self::Map),
            VIRTIO_IOMMU_T_UNMAP => Some(Self::Unmap),
            VIRTIO_IOMMU_T_PROBE => Some(Self::Probe),
            _ => None,
        }
    }

    /// Size of the device-readable part (head included) of this request type.
    pub fn readable_size(self) -> usize {
        HEAD_SIZE
            + match self {
                Self::Attach => size_of::<AttachBody>(),
                Self::Detach => size_of::<DetachBody>(),
                Self::Map => size_of::<MapBody>(),
                Self::Unmap => size_of::<UnmapBody>(),
                Self::Probe => size_of::<ProbeBody>(),
            }
    }
}

impl Request {
    /// The type of this request.
    pub fn request_type(&self) -> RequestType {
        match self {
            Request::Attach { .. } => RequestType::Attach,
            Request::Detach { .. } => RequestType::Detach,
            Request::Map { .. } => RequestType::Map,
            Request::Unmap { .. } => RequestType::Unmap,
            Request::Probe { .. } => RequestType::Probe,
        }
    }
}

/// Why a request's readable part could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than 4 bytes: there is no head, so not even the type is known.
    #[error("request has {0} readable bytes, too few for the 4-byte head")]
    NoHead(usize),
    /// The head names a type the spec does not define (DEV-OPS-2: no write, used length 0).
    #[error("request type {0} is not defined by the virtio-iommu spec")]
    UnknownType(u8),
    /// The type is known but its readable part is shorter than the layout.
    #[error("{kind:?} request needs {needed} readable bytes, the driver gave {got}")]
    Truncated {
        /// Type named by the head.
        kind: RequestType,
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes the driver provided.
        got: usize,
    },
}

/// Decodes the device-readable part of a request. Bytes beyond the layout are ignored
/// (the driver may pad; Linux sends exactly the layout, `viommu_get_write_desc_offset()`
/// in `drivers/iommu/virtio-iommu.c`).
///
/// # Errors
/// [`DecodeError`] when there is no head, the type is unknown, or the part is short.
pub fn decode(readable: &[u8]) -> Result<Request, DecodeError> {
    let type_ = *readable.first().ok_or(DecodeError::NoHead(0))?;
    if readable.len() < HEAD_SIZE {
        return Err(DecodeError::NoHead(readable.len()));
    }
    let kind = RequestType::from_wire(type_).ok_or(DecodeError::UnknownType(type_))?;
    let rest = &readable[HEAD_SIZE..];
    let truncated = DecodeError::Truncated {
        kind,
        needed: kind.readable_size(),
        got: readable.len(),
    };
    let req = match kind {
        RequestType::Attach => {
            let (b, _) = AttachBody::read_from_prefix(rest).map_err(|_| truncated)?;
            Request::Attach {
                domain: DomainId(b.domain.get()),
                endpoint: EndpointId(b.endpoint.get()),
                flags: b.flags.get(),
                reserved_nonzero: b.reserved != [0; 4],
            }
        }
        RequestType::Detach => {
            let (b, _) = DetachBody::read_from_prefix(rest).map_err(|_| truncated)?;
            Request::Detach {
                domain: DomainId(b.domain.get()),
                endpoint: EndpointId(b.endpoint.get()),
            }
        }
        RequestType::Map => {
            let (b, _) = MapBody::read_from_prefix(rest).map_err(|_| truncated)?;
            Request::Map {
                domain: DomainId(b.domain.get()),
                virt_start: Iova(b.virt_start.get()),
                virt_end: Iova(b.virt_end.get()),
                phys_start: b.phys_start.get(),
                flags: b.flags.get(),
            }
        }
        RequestType::Unmap => {
            let (b, _) = UnmapBody::read_from_prefix(rest).map_err(|_| truncated)?;
            Request::Unmap {
                domain: DomainId(b.domain.get()),
                virt_start: Iova(b.virt_start.get()),
                virt_end: Iova(b.virt_end.get()),
                reserved_nonzero: b.reserved != [0; 4],
            }
        }
        RequestType::Probe => {
            let (b, _) = ProbeBody::read_from_prefix(rest).map_err(|_| truncated)?;
            Request::Probe {
                endpoint: EndpointId(b.endpoint.get()),
            }
        }
    };
    Ok(req)
}

/// Encodes a request's device-readable part, as a driver would (used by the fake
/// driver, tests and benchmarks).
pub fn encode(req: &Request) -> Vec<u8> {
    use crate::wire::ReqHead;
    use zerocopy::byteorder::little_endian::{U32, U64};
    use zerocopy::IntoBytes;
    let mut out = Vec::with_capacity(req.request_type().readable_size());
    let head = |t: u8| ReqHead {
        type_: t,
        reserved: [0; 3],
    };
    match *req {
        Request::Attach {
            domain,
            endpoint,
            flags,
            reserved_nonzero,
        } => {
            out.extend_from_slice(head(VIRTIO_IOMMU_T_ATTACH).as_bytes());
            out.extend_from_slice(
                AttachBody {
                    domain: U32::new(domain.0),
                    endpoint: U32::new(endpoint.0),
                    flags: U32::new(flags),
                    reserved: [u8::from(reserved_nonzero), 0, 0, 0],
                }
                .as_bytes(),
            );
        }
        Request::Detach { domain, endpoint } => {
            out.extend_from_slice(head(VIRTIO_IOMMU_T_DETACH).as_bytes());
            out.extend_from_slice(
                DetachBody {
                    domain: U32::new(domain.0),
                    endpoint: U32::new(endpoint.0),
                    reserved: [0; 8],
                }
                .as_bytes(),
            );
        }
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => {
            out.extend_from_slice(head(VIRTIO_IOMMU_T_MAP).as_bytes());
            out.extend_from_slice(
                MapBody {
                    domain: U32::new(domain.0),
                    virt_start: U64::new(virt_start.0),
                    virt_end: U64::new(virt_end.0),
                    phys_start: U64::new(phys_start),
                    flags: U32::new(flags),
                }
                .as_bytes(),
            );
        }
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
            reserved_nonzero,
        } => {
            out.extend_from_slice(head(VIRTIO_IOMMU_T_UNMAP).as_bytes());
            out.extend_from_slice(
                UnmapBody {
                    domain: U32::new(domain.0),
                    virt_start: U64::new(virt_start.0),
                    virt_end: U64::new(virt_end.0),
                    reserved: [u8::from(reserved_nonzero), 0, 0, 0],
                }
                .as_bytes(),
            );
        }
        Request::Probe { endpoint } => {
            out.extend_from_slice(head(VIRTIO_IOMMU_T_PROBE).as_bytes());
            let b = ProbeBody {
                endpoint: U32::new(endpoint.0),
                ..ProbeBody::default()
            };
            out.extend_from_slice(b.as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_ops_2_unknown_type_is_not_decoded() {
        assert_eq!(decode(&[0, 0, 0, 0]), Err(DecodeError::UnknownType(0)));
        assert_eq!(decode(&[6; 80]), Err(DecodeError::UnknownType(6)));
    }

    #[test]
    fn short_head_and_short_body_are_distinguished() {
        assert_eq!(decode(&[]), Err(DecodeError::NoHead(0)));
        assert_eq!(decode(&[1, 0]), Err(DecodeError::NoHead(2)));
        assert_eq!(
            decode(&[3, 0, 0, 0, 1]),
            Err(DecodeError::Truncated {
                kind: RequestType::Map,
                needed: 36,
                got: 5
            })
        );
    }

    #[test]
    fn encode_then_decode_is_identity_and_padding_is_ignored() {
        let reqs = [
            Request::Attach {
                domain: DomainId(7),
                endpoint: EndpointId(0x100),
                flags: 1,
                reserved_nonzero: true,
            },
            Request::Detach {
                domain: DomainId(7),
                endpoint: EndpointId(0x100),
            },
            Request::Map {
                domain: DomainId(1),
                virt_start: Iova(0x1000),
                virt_end: Iova(u64::MAX),
                phys_start: 0x8000,
                flags: 3,
            },
            Request::Unmap {
                domain: DomainId(1),
                virt_start: Iova(0),
                virt_end: Iova(0xfff),
                reserved_nonzero: false,
            },
            Request::Probe {
                endpoint: EndpointId(9),
            },
        ];
        for r in reqs {
            let mut bytes = encode(&r);
            assert_eq!(bytes.len(), r.request_type().readable_size());
            assert_eq!(decode(&bytes), Ok(r));
            bytes.extend_from_slice(&[0xff; 8]);
            assert_eq!(decode(&bytes), Ok(r));
        }
    }
}
