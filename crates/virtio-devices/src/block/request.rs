//! virtio-blk requests (virtio spec §5.2.6): the header's wire layout, the limits the
//! device advertises, and [`decode`], which turns a header plus the lengths of the
//! chain around it into a [`Request`] that is valid for the disk — or the status the
//! guest gets instead. Pure: no guest memory, no file.
//!
//! A request is `{le32 type, le32 reserved, le64 sector}` (device-readable), then data
//! (device-readable for OUT, device-writable for IN and GET_ID), then one status byte,
//! the last device-writable byte of the chain.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes per sector: `sector` and `capacity` count 512-byte units whatever the block
/// size (§5.2.4).
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request the device advertises in `seg_max` (§5.2.4). Linux sizes
/// its scatter lists from it and adds two descriptors for header and status.
pub const SEG_MAX: u32 = 128;
/// Bytes per data segment the device advertises in `size_max` (§5.2.4).
pub const SIZE_MAX: u32 = 64 << 10;
/// Data bytes one request may move: `seg_max × size_max` = 8 MiB, which a driver
/// honouring both never exceeds (Linux's default request cap is 1280 KiB). Bounds the
/// host work one request causes.
pub const MAX_DATA_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Length of the request header.
pub const HEADER_SIZE: usize = 16;
/// Length of the GET_ID answer (§5.2.6: 20 bytes, zero-padded).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The request header (`struct virtio_blk_outhdr`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RequestHeader {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: U32,
    /// Zero from a modern driver; a legacy one put the I/O priority here. Not checked:
    /// the spec gives the device no rule for it.
    pub reserved: U32,
    /// First 512-byte sector of the transfer.
    pub sector: U64,
}

const _: () = assert!(std::mem::size_of::<RequestHeader>() == HEADER_SIZE);

/// The status byte's values (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok = VIRTIO_BLK_S_OK as u8,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// The disk as requests are validated against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Whether the device offers `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
}

/// Lengths of the chain around the header, as the device walked it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Device-readable bytes, header included.
    pub readable: u64,
    /// Device-writable bytes before the status byte.
    pub writable_data: u64,
}

/// A request that is valid for the disk: ranges inside capacity, lengths within the
/// limits, writes only on a writable disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `VIRTIO_BLK_T_IN`: `len` bytes of the disk from byte `offset` into the writable
    /// data.
    Read {
        /// Byte offset in the disk, a multiple of 512.
        offset: u64,
        /// Bytes, a multiple of 512, at most [`MAX_DATA_BYTES`].
        len: u32,
    },
    /// `VIRTIO_BLK_T_OUT`: `len` readable data bytes after the header onto the disk at
    /// byte `offset`.
    Write {
        /// Byte offset in the disk, a multiple of 512.
        offset: u64,
        /// Bytes, a multiple of 512, at most [`MAX_DATA_BYTES`].
        len: u32,
    },
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the first `len` bytes of the 20-byte ID into the writable
    /// data.
    GetId {
        /// At most [`ID_BYTES`].
        len: u32,
    },
}

/// Why a request is refused, and so which status the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than 16 readable bytes: no header.
    #[error("the request has {0} readable bytes, fewer than the 16-byte header")]
    HeaderTooShort(u64),
    /// A request type the device does not implement.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// A write on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A data length that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// More data than the device's advertised limits allow.
    #[error("data length {len} exceeds the {max}-byte request limit")]
    TooLarge {
        /// Data bytes in the request.
        len: u64,
        /// [`MAX_DATA_BYTES`].
        max: u64,
    },
    /// A transfer that does not lie inside the disk.
    #[error("sectors {sector}..{sector}+{sectors} are not inside the {capacity}-sector disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors in the transfer.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
}

impl RequestError {
    /// The status the guest gets for this refusal.
    pub fn status(&self) -> Status {
        match self {
            // §5.2.6: S_UNSUPP is the status of "a request unsupported by device".
            RequestError::Unsupported(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// Decodes the header (`header` is the first up-to-16 readable bytes) of a request
/// shaped `shape`, and validates it against `disk`.
///
/// # Errors
/// A [`RequestError`]; its [`status`](RequestError::status) is what the guest gets.
pub fn decode(header: &[u8], shape: Shape, disk: Disk) -> Result<Request, RequestError> {
    let Ok((hdr, _)) = RequestHeader::read_from_prefix(header) else {
        return Err(RequestError::HeaderTooShort(header.len() as u64));
    };
    let sector = hdr.sector.get();
    match hdr.request_type.get() {
        VIRTIO_BLK_T_IN => {
            let len = data_len(shape.writable_data)?;
            let offset = range(sector, len, disk)?;
            Ok(Request::Read { offset, len })
        }
        VIRTIO_BLK_T_OUT => {
            // §5.2.6.2: a write to a read-only device fails with S_IOERR and writes
            // nothing; checked before any other property of the write.
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            // The caller read a 16-byte header, so `readable` ≥ 16.
            let len = data_len(shape.readable.saturating_sub(HEADER_SIZE as u64))?;
            let offset = range(sector, len, disk)?;
            Ok(Request::Write { offset, len })
        }
        // §5.2.6.1 has the driver set `sector` to 0 for FLUSH; the device has no use
        // for it and does not check it.
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Request::GetId {
            // Linux offers exactly 20 bytes; a shorter buffer gets what fits.
            len: shape.writable_data.min(ID_BYTES as u64) as u32,
        }),
        // DISCARD, WRITE_ZEROES, SECURE_ERASE and the zoned commands belong to features
        // the device does not offer; they, and any unknown type, are requests the
        // device does not support: S_UNSUPP (§5.2.6).
        other => Err(RequestError::Unsupported(other)),
    }
}

/// A data length that is whole sectors (§5.2.6.1: IN and OUT data is a multiple of
/// 512 bytes) and within [`MAX_DATA_BYTES`].
fn data_len(len: u64) -> Result<u32, RequestError> {
    if len > MAX_DATA_BYTES {
        return Err(RequestError::TooLarge {
            len,
            max: MAX_DATA_BYTES,
        });
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    // ≤ MAX_DATA_BYTES (8 MiB), so it fits.
    Ok(len as u32)
}

/// The byte offset of `len` bytes at `sector`, if they lie inside the disk (§5.2.6.1:
/// the driver must not reach beyond `capacity`; the device answers S_IOERR if it does).
fn range(sector: u64, len: u32, disk: Disk) -> Result<u64, RequestError> {
    let sectors = u64::from(len) / SECTOR_SIZE;
    let inside = sector
        .checked_add(sectors)
        .is_some_and(|end| end <= disk.capacity);
    if !inside {
        return Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity: disk.capacity,
        });
    }
    // For a disk opened from a file, capacity ≤ u64::MAX / 512 and neither byte
    // address can overflow; `Disk` is public, so both are checked all the same.
    let out = RequestError::OutOfRange {
        sector,
        sectors,
        capacity: disk.capacity,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(out)?;
    offset.checked_add(u64::from(len)).ok_or(out)?;
    Ok(offset)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;
    use proptest::prelude::*;

    fn hdr(t: u32, sector: u64) -> Vec<u8> {
        let h = RequestHeader {
            request_type: U32::new(t),
            reserved: U32::new(0),
            sector: U64::new(sector),
        };
        h.as_bytes().to_vec()
    }

    const DISK: Disk = Disk {
        capacity: 8,
        read_only: false,
    };

    fn shape(readable: u64, writable_data: u64) -> Shape {
        Shape {
            readable,
            writable_data,
        }
    }

    #[test]
    fn read_and_write_inside_the_disk_decode_to_byte_ranges() {
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_IN, 6), shape(16, 1024), DISK),
            Ok(Request::Read {
                offset: 3072,
                len: 1024
            })
        );
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_OUT, 0), shape(16 + 4096, 0), DISK),
            Ok(Request::Write {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_IN, 8), shape(16, 0), DISK),
            Ok(Request::Read {
                offset: 4096,
                len: 0
            }),
            "an empty transfer at the end is inside"
        );
    }

    #[test]
    fn byte_ranges_that_would_wrap_are_ioerr_even_on_an_absurd_disk() {
        let disk = Disk {
            capacity: u64::MAX,
            read_only: false,
        };
        let sector = (u64::MAX / SECTOR_SIZE) - 1;
        let shape = Shape {
            readable: 16,
            writable_data: 4096,
        };
        let r = decode(&hdr(VIRTIO_BLK_T_IN, sector), shape, disk);
        assert!(matches!(r, Err(RequestError::OutOfRange { .. })), "{r:?}");
    }

    #[test]
    fn ranges_past_capacity_or_overflowing_are_ioerr() {
        for (sector, len) in [(7, 1024), (8, 512), (u64::MAX, 512), (u64::MAX / 512, 0)] {
            let e = decode(&hdr(VIRTIO_BLK_T_IN, sector), shape(16, len), DISK).unwrap_err();
            assert!(matches!(e, RequestError::OutOfRange { .. }), "{sector}");
            assert_eq!(e.status(), Status::IoErr);
        }
    }

    #[test]
    fn read_only_unaligned_too_large_and_short_header_are_ioerr() {
        let ro = Disk {
            read_only: true,
            ..DISK
        };
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_OUT, 0), shape(16 + 512, 0), ro),
            Err(RequestError::ReadOnly)
        );
        assert!(decode(&hdr(VIRTIO_BLK_T_IN, 0), shape(16, 512), ro).is_ok());
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_IN, 0), shape(16, 513), DISK),
            Err(RequestError::Unaligned(513))
        );
        assert!(matches!(
            decode(
                &hdr(VIRTIO_BLK_T_IN, 0),
                shape(16, MAX_DATA_BYTES + 512),
                DISK
            ),
            Err(RequestError::TooLarge { .. })
        ));
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_IN, 0)[..15], shape(15, 512), DISK),
            Err(RequestError::HeaderTooShort(15))
        );
    }

    #[test]
    fn unknown_types_are_unsupp_and_flush_get_id_need_no_range() {
        for t in [2, 11, 13, 14, 0xdead_beef] {
            let e = decode(&hdr(t, 0), shape(16, 0), DISK).unwrap_err();
            assert_eq!(e.status(), Status::Unsupp, "{t}");
        }
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_FLUSH, u64::MAX), shape(16, 0), DISK),
            Ok(Request::Flush)
        );
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_GET_ID, 0), shape(16, 64), DISK),
            Ok(Request::GetId { len: 20 })
        );
        assert_eq!(
            decode(&hdr(VIRTIO_BLK_T_GET_ID, 0), shape(16, 3), DISK),
            Ok(Request::GetId { len: 3 })
        );
    }

    proptest! {
        /// Whatever the guest sends, a decoded transfer lies inside the disk and within
        /// the limits, and a write never decodes on a read-only disk.
        #[test]
        fn decoded_transfers_always_lie_inside_the_disk(
            header in proptest::collection::vec(any::<u8>(), 0..24),
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), any::<u32>()],
            sector in prop_oneof![0u64..64, any::<u64>()],
            readable in any::<u64>(),
            writable_data in prop_oneof![0u64..70_000, any::<u64>()],
            capacity in prop_oneof![0u64..64, any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let mut header = header;
            if header.len() >= 16 {
                header[..4].copy_from_slice(&t.to_le_bytes());
                header[8..16].copy_from_slice(&sector.to_le_bytes());
            }
            let disk = Disk { capacity, read_only };
            if let Ok(r) = decode(&header, shape(readable, writable_data), disk) {
                match r {
                    Request::Read { offset, len } | Request::Write { offset, len } => {
                        prop_assert!(u64::from(len) <= MAX_DATA_BYTES);
                        prop_assert_eq!(offset % SECTOR_SIZE, 0);
                        prop_assert_eq!(u64::from(len) % SECTOR_SIZE, 0);
                        let end = offset.checked_add(u64::from(len));
                        prop_assert!(end.is_some_and(|e| e / SECTOR_SIZE <= capacity));
                        if matches!(r, Request::Write { .. }) {
                            prop_assert!(!read_only);
                        }
                    }
                    Request::GetId { len } => prop_assert!(len as usize <= ID_BYTES),
                    Request::Flush => {}
                }
            }
        }
    }
}
