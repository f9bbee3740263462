//! Wire format of the virtio-iommu device (virtio v1.3 §5.13 "IOMMU Device": §5.13.3,
//! §5.13.4, §5.13.6 and its subsections): feature bits, the 40-byte configuration
//! layout, request types and status codes, request/response layouts, PROBE properties
//! and fault events.
//!
//! Every layout is a `#[repr(C)]` plain-old-data struct whose size zerocopy checks at
//! compile time; nothing here touches guest memory.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Virtio device ID of the IOMMU (spec §5.13.1).
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// `VIRTIO_F_VERSION_1` (virtio spec §6).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_RING_F_INDIRECT_DESC` (virtio spec §6); virtio-queue follows indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX` (virtio spec §6, §2.7.10); virtio-queue keeps `avail_event`
/// and reads `used_event`.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Feature bit: `input_range` in the configuration is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// Feature bit: `domain_range` in the configuration is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// Feature bit: MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Feature bit (legacy, never offered): unattached endpoints bypass the IOMMU.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// Feature bit: PROBE requests are available and `probe_size` is valid.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// Feature bit: `VIRTIO_IOMMU_MAP_F_MMIO` may be used.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// Feature bit: the `bypass` config byte and `ATTACH_F_BYPASS` are available.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// Request type ATTACH.
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// Request type DETACH.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// Request type MAP.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// Request type UNMAP.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// Request type PROBE.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// ATTACH flag: the domain is a bypass (identity) domain.
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;

/// MAP flag: endpoints may read the range.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: endpoints may write the range.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the range is device memory (MMIO), needs `VIRTIO_IOMMU_F_MMIO`.
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// PROBE property type: end of list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// PROBE property type: reserved memory region.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: never map, accesses fault.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: MSI doorbell, never map.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: unknown.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached to any domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: no mapping, or a mapping without the needed permission.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: the access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// Request status codes (virtio v1.3 §5.13.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_IOMMU_S_OK`.
    Ok = 0,
    /// `VIRTIO_IOMMU_S_IOERR`.
    IoErr = 1,
    /// `VIRTIO_IOMMU_S_UNSUPP`.
    Unsupp = 2,
    /// `VIRTIO_IOMMU_S_DEVERR`.
    DevErr = 3,
    /// `VIRTIO_IOMMU_S_INVAL`.
    Inval = 4,
    /// `VIRTIO_IOMMU_S_RANGE`.
    Range = 5,
    /// `VIRTIO_IOMMU_S_NOENT`.
    NoEnt = 6,
    /// `VIRTIO_IOMMU_S_FAULT`.
    Fault = 7,
    /// `VIRTIO_IOMMU_S_NOMEM`.
    NoMem = 8,
}

impl Status {
    /// Every status, in wire order (index == wire value).
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];
}

/// `struct virtio_iommu_config`: 40 bytes, little-endian (virtio v1.3 §5.13.4).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct Config {
    /// Supported page sizes; the least significant set bit is the granule.
    pub page_size_mask: U64,
    /// First valid IOVA.
    pub input_range_start: U64,
    /// Last valid IOVA (inclusive).
    pub input_range_end: U64,
    /// First valid domain ID.
    pub domain_range_start: U32,
    /// Last valid domain ID (inclusive).
    pub domain_range_end: U32,
    /// Size of the PROBE `properties` buffer.
    pub probe_size: U32,
    /// 1 if unattached endpoints bypass the IOMMU (only 0 or 1 is ever presented).
    pub bypass: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

/// Offset of the driver-writable `bypass` byte in [`Config`].
pub const CONFIG_BYPASS_OFFSET: usize = 36;

/// `struct virtio_iommu_req_head`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ReqHead {
    /// Request type.
    pub type_: u8,
    /// Reserved; the device ignores it (DEV-OPS-3).
    pub reserved: [u8; 3],
}

/// `struct virtio_iommu_req_tail`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ReqTail {
    /// Status code.
    pub status: u8,
    /// Reserved; the device zeroes it (DEV-OPS-3).
    pub reserved: [u8; 3],
}

/// Device-readable body of ATTACH (after the head).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct AttachBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// `VIRTIO_IOMMU_ATTACH_F_*`.
    pub flags: U32,
    /// Reserved; must be zero (DEV-ATT-1).
    pub reserved: [u8; 4],
}

/// Device-readable body of DETACH (after the head).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct DetachBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved; ignored (DEV-DET-1).
    pub reserved: [u8; 8],
}

/// Device-readable body of MAP (after the head).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct MapBody {
    /// Domain ID.
    pub domain: U32,
    /// First IOVA of the range.
    pub virt_start: U64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: U64,
    /// Guest-physical address `virt_start` maps to.
    pub phys_start: U64,
    /// `VIRTIO_IOMMU_MAP_F_*`.
    pub flags: U32,
}

/// Device-readable body of UNMAP (after the head).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct UnmapBody {
    /// Domain ID.
    pub domain: U32,
    /// First IOVA of the range.
    pub virt_start: U64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: U64,
    /// Reserved; non-zero is answered with `S_INVAL` (DEV-UNM-1).
    pub reserved: [u8; 4],
}

/// Device-readable body of PROBE (after the head).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ProbeBody {
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved; ignored (DEV-PRB-1).
    pub reserved: [u8; 64],
}

impl Default for ProbeBody {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

/// Header of a PROBE property.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ProbePropHead {
    /// `type:12`, `reserved:4` (reserved bits zero, DEV-PRB-4).
    pub type_: U16,
    /// Length of the property after this header (DEV-PRB-5).
    pub length: U16,
}

/// `struct virtio_iommu_probe_resv_mem`, 24 bytes including its header.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ProbeResvMem {
    /// Property header: type RESV_MEM, length 20.
    pub head: ProbePropHead,
    /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
    pub subtype: u8,
    /// Reserved, zero (DEV-RESV-1).
    pub reserved: [u8; 3],
    /// First address of the region.
    pub start: U64,
    /// Last address of the region (inclusive).
    pub end: U64,
}

/// `struct virtio_iommu_fault`: 24 bytes, one per eventq buffer.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct FaultEvent {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// Reserved, zero (DEV-FLT-1).
    pub reserved: [u8; 3],
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: U32,
    /// Endpoint that faulted (DEV-FLT-2).
    pub endpoint: U32,
    /// Reserved, zero (DEV-FLT-1).
    pub reserved1: [u8; 4],
    /// Faulting address, valid with `FAULT_F_ADDRESS`.
    pub address: U64,
}

/// Size of a request head.
pub const HEAD_SIZE: usize = core::mem::size_of::<ReqHead>();
/// Size of a request tail.
pub const TAIL_SIZE: usize = core::mem::size_of::<ReqTail>();
/// Size of the longest device-readable request part (PROBE: 4 + 68).
pub const MAX_READABLE: usize = HEAD_SIZE + core::mem::size_of::<ProbeBody>();
/// Size of one RESV_MEM property.
pub const RESV_MEM_SIZE: usize = core::mem::size_of::<ProbeResvMem>();

const _: () = {
    assert!(core::mem::size_of::<Config>() == 40);
    assert!(HEAD_SIZE + core::mem::size_of::<AttachBody>() == 20);
    assert!(HEAD_SIZE + core::mem::size_of::<DetachBody>() == 20);
    assert!(HEAD_SIZE + core::mem::size_of::<MapBody>() == 36);
    assert!(HEAD_SIZE + core::mem::size_of::<UnmapBody>() == 28);
    assert!(MAX_READABLE == 72);
    assert!(RESV_MEM_SIZE == 24);
    assert!(core::mem::size_of::<FaultEvent>() == 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_offsets_match_the_spec_layout() {
        let mut c = Config::new_zeroed();
        c.input_range_start = U64::new(0x0807_0605_0403_0201);
        c.domain_range_end = U32::new(0xaabb_ccdd);
        c.probe_size = U32::new(0x200);
        c.bypass = 1;
        let b = c.as_bytes();
        assert_eq!(b[8], 0x01);
        assert_eq!(b[15], 0x08);
        assert_eq!(&b[28..32], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(&b[32..36], &[0x00, 0x02, 0x00, 0x00]);
        assert_eq!(b[CONFIG_BYPASS_OFFSET], 1);
    }

    #[test]
    fn status_table_index_is_wire_value() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }
}
