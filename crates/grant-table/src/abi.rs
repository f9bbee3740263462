//! The Xen grant-table ABI as plain data: entry layouts, flag bits, map and copy flags,
//! the `GNTST_*` status codes and the sizing constants, with the values of Xen's
//! `xen/include/public/grant_table.h` (the sizing defaults: `xen/common/grant_table.c`).
//!
//! The entry structs are `#[repr(C)]` plain-old-data whose sizes and field offsets are
//! checked at compile time; the table code reads and writes guest frames at these
//! offsets, with atomics where guest and hypervisor race (the flags and the v2 status
//! words).

use std::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes in a grant frame and in a granted page (`XEN_PAGE_SIZE`).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`] (`XEN_PAGE_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;

/// `GTF_invalid`: the entry grants nothing.
pub const GTF_INVALID: u16 = 0;
/// `GTF_permit_access`: the named domain may map or copy the frame.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_accept_transfer`: the named domain may transfer a frame here (PV only).
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// `GTF_transitive` (v2): access to another domain's grant, copy only.
pub const GTF_TRANSITIVE: u16 = 3;
/// `GTF_type_mask`: the two type bits.
pub const GTF_TYPE_MASK: u16 = 3;
/// `GTF_readonly`: the grantee may only read (map read-only, copy from).
pub const GTF_READONLY: u16 = 1 << 2;
/// `GTF_reading`: written by Xen, the entry is pinned for reading.
pub const GTF_READING: u16 = 1 << 3;
/// `GTF_writing`: written by Xen, the entry is pinned for writing.
pub const GTF_WRITING: u16 = 1 << 4;
/// `GTF_PWT`: x86 cache attribute for mappings (recorded, not modelled).
pub const GTF_PWT: u16 = 1 << 5;
/// `GTF_PCD`: x86 cache attribute for mappings (recorded, not modelled).
pub const GTF_PCD: u16 = 1 << 6;
/// `GTF_PAT`: x86 cache attribute for mappings (recorded, not modelled).
pub const GTF_PAT: u16 = 1 << 7;
/// `GTF_sub_page` (v2): only `[page_off, page_off + length)` is reachable, by copy only.
pub const GTF_SUB_PAGE: u16 = 1 << 8;

/// `GNTMAP_device_map`: map for device (bus) access.
pub const GNTMAP_DEVICE_MAP: u32 = 1 << 0;
/// `GNTMAP_host_map`: map into the mapper's address space.
pub const GNTMAP_HOST_MAP: u32 = 1 << 1;
/// `GNTMAP_readonly`: read-only mapping.
pub const GNTMAP_READONLY: u32 = 1 << 2;
/// `GNTMAP_application_map`: PV user mapping (refused for auto-translated mappers).
pub const GNTMAP_APPLICATION_MAP: u32 = 1 << 3;
/// `GNTMAP_contains_pte`: PV PTE address (refused for auto-translated mappers).
pub const GNTMAP_CONTAINS_PTE: u32 = 1 << 4;

/// `GNTCOPY_source_gref`: the copy's source is a grant reference, not a local frame.
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`: the copy's destination is a grant reference.
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `DOMID_SELF`: "the calling domain" in domain-id fields.
pub const DOMID_SELF: u16 = 0x7ff0;

/// `GNTTAB_NR_RESERVED_ENTRIES`: refs 0..8 are reserved (console, xenstore); Linux
/// never hands them out.
pub const NR_RESERVED_ENTRIES: u32 = 8;
/// `INITIAL_NR_GRANT_FRAMES`: frames a table starts with (x86, Arm).
pub const INITIAL_NR_GRANT_FRAMES: u32 = 1;
/// `opt_max_grant_frames`: default limit on grant frames per domain.
pub const DEFAULT_MAX_GRANT_FRAMES: u32 = 64;
/// `opt_max_maptrack_frames`: default limit on maptrack frames per mapping domain.
pub const DEFAULT_MAX_MAPTRACK_FRAMES: u32 = 1024;
/// `MAPTRACK_PER_PAGE`: 16-byte `struct grant_mapping` entries per 4 KiB frame.
pub const MAPTRACK_PER_PAGE: u32 = 256;
/// `GNTTAB_UNMAP_BATCH_SIZE`: unmaps per TLB flush.
pub const UNMAP_BATCH_SIZE: usize = 32;
/// v1 entries per grant frame (`SHGNT_PER_PAGE_V1`).
pub const ENTRIES_PER_FRAME_V1: u32 = 512;
/// v2 entries per grant frame (`SHGNT_PER_PAGE_V2`).
pub const ENTRIES_PER_FRAME_V2: u32 = 256;
/// v2 status words per status frame (`grant_status_t` is a `u16`).
pub const STATUS_PER_FRAME: u32 = 2048;

/// Width of one pin counter in `struct active_grant_entry.pin` (`GNTPIN_cntr_width`).
pub const GNTPIN_CNTR_WIDTH: u32 = 8;
/// `GNTPIN_hstw_inc`: one writable host mapping (bits 0–7).
pub const GNTPIN_HSTW_INC: u32 = 1;
/// `GNTPIN_hstr_inc`: one read-only host mapping (bits 8–15).
pub const GNTPIN_HSTR_INC: u32 = 1 << 8;
/// `GNTPIN_devw_inc`: one writable device mapping (bits 16–23).
pub const GNTPIN_DEVW_INC: u32 = 1 << 16;
/// `GNTPIN_devr_inc`: one read-only device mapping (bits 24–31).
pub const GNTPIN_DEVR_INC: u32 = 1 << 24;
/// `GNTPIN_hstw_mask`.
pub const GNTPIN_HSTW_MASK: u32 = 0xff;
/// `GNTPIN_devw_mask`.
pub const GNTPIN_DEVW_MASK: u32 = 0xff << 16;

/// `GNTPIN_incr2oflow_mask(x)`: the top bit of every counter `x` increments. Xen
/// refuses a pin when that bit is already set, so a counter never exceeds 128
/// (xen/common/grant_table.c, "gnttab: adjust pin count overflow checks", 2021).
pub const fn pin_overflow_mask(incr: u32) -> u32 {
    incr << (GNTPIN_CNTR_WIDTH - 1)
}

/// Entries per grant frame for table `version` (1 or 2).
pub const fn entries_per_frame(version: u32) -> u32 {
    if version == 2 {
        ENTRIES_PER_FRAME_V2
    } else {
        ENTRIES_PER_FRAME_V1
    }
}

/// Status frames that cover `grant_frames` v2 grant frames (`grant_to_status_frames`).
pub const fn status_frames_for(grant_frames: u32) -> u32 {
    (grant_frames * ENTRIES_PER_FRAME_V2).div_ceil(STATUS_PER_FRAME)
}

/// `struct grant_entry_v1` (8 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GrantEntryV1 {
    /// `GTF_*` type and sub-flags; `GTF_reading`/`GTF_writing` are Xen's.
    pub flags: u16,
    /// The domain being granted access.
    pub domid: u16,
    /// The granted frame (GFN).
    pub frame: u32,
}

/// `grant_entry_header_t`: the first four bytes of a v2 entry.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GrantEntryHeader {
    /// `GTF_*` type and sub-flags (never `GTF_reading`/`GTF_writing` in v2).
    pub flags: u16,
    /// The domain being granted access.
    pub domid: u16,
}

/// `union grant_entry_v2`, `full_page` variant (16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GrantEntryV2FullPage {
    /// Header.
    pub hdr: GrantEntryHeader,
    /// Padding.
    pub pad0: u32,
    /// The granted frame (GFN).
    pub frame: u64,
}

/// `union grant_entry_v2`, `sub_page` variant (16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GrantEntryV2SubPage {
    /// Header (`GTF_permit_access | GTF_sub_page`).
    pub hdr: GrantEntryHeader,
    /// First reachable byte of the page.
    pub page_off: u16,
    /// Reachable bytes.
    pub length: u16,
    /// The granted frame (GFN).
    pub frame: u64,
}

/// `union grant_entry_v2`, `transitive` variant (16 bytes with `__spacer`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct GrantEntryV2Transitive {
    /// Header (`GTF_transitive`).
    pub hdr: GrantEntryHeader,
    /// The domain whose grant this one passes on.
    pub trans_domid: u16,
    /// Padding.
    pub pad0: u16,
    /// That domain's grant reference.
    pub gref: u32,
    /// `__spacer` to 16 bytes.
    pub spacer: u32,
}

const _: () = {
    assert!(size_of::<GrantEntryV1>() == 8);
    assert!(size_of::<GrantEntryV2FullPage>() == 16);
    assert!(size_of::<GrantEntryV2SubPage>() == 16);
    assert!(size_of::<GrantEntryV2Transitive>() == 16);
    assert!(std::mem::offset_of!(GrantEntryV1, domid) == 2);
    assert!(std::mem::offset_of!(GrantEntryV1, frame) == 4);
    assert!(std::mem::offset_of!(GrantEntryV2FullPage, frame) == 8);
    assert!(std::mem::offset_of!(GrantEntryV2SubPage, page_off) == 4);
    assert!(std::mem::offset_of!(GrantEntryV2SubPage, length) == 6);
    assert!(std::mem::offset_of!(GrantEntryV2Transitive, trans_domid) == 4);
    assert!(std::mem::offset_of!(GrantEntryV2Transitive, gref) == 8);
};

/// Bytes of one entry in table `version`.
pub const fn entry_size(version: u32) -> u64 {
    if version == 2 {
        16
    } else {
        8
    }
}

/// `GNTST_*`: the per-operation status of every grant-table operation (Xen
/// `xen/include/public/grant_table.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum GrantStatus {
    /// `GNTST_okay` (0).
    Okay = 0,
    /// `GNTST_general_error` (-1): undefined error.
    GeneralError = -1,
    /// `GNTST_bad_domain` (-2): unrecognised domain id.
    BadDomain = -2,
    /// `GNTST_bad_gntref` (-3): invalid grant reference.
    BadGntref = -3,
    /// `GNTST_bad_handle` (-4): invalid mapping handle.
    BadHandle = -4,
    /// `GNTST_bad_virt_addr` (-5): invalid virtual address.
    BadVirtAddr = -5,
    /// `GNTST_bad_dev_addr` (-6): invalid device address.
    BadDevAddr = -6,
    /// `GNTST_no_device_space` (-7): no spare translation slot in the I/O MMU.
    NoDeviceSpace = -7,
    /// `GNTST_permission_denied` (-8).
    PermissionDenied = -8,
    /// `GNTST_bad_page` (-9).
    BadPage = -9,
    /// `GNTST_bad_copy_arg` (-10): copy arguments cross page boundary.
    BadCopyArg = -10,
    /// `GNTST_address_too_big` (-11): page address size too large.
    AddressTooBig = -11,
    /// `GNTST_eagain` (-12): operation not done; try again.
    Eagain = -12,
    /// `GNTST_no_space` (-13): out of space (handles etc.).
    NoSpace = -13,
}

impl GrantStatus {
    /// The ABI value.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// Xen's message for the status (`GNTTABOP_error_msgs`).
    pub fn message(self) -> &'static str {
        match self {
            Self::Okay => "okay",
            Self::GeneralError => "undefined error",
            Self::BadDomain => "unrecognised domain id",
            Self::BadGntref => "invalid grant reference",
            Self::BadHandle => "invalid mapping handle",
            Self::BadVirtAddr => "invalid virtual address",
            Self::BadDevAddr => "invalid device address",
            Self::NoDeviceSpace => "no spare translation slot in the I/O MMU",
            Self::PermissionDenied => "permission denied",
            Self::BadPage => "bad page",
            Self::BadCopyArg => "copy arguments cross page boundary",
            Self::AddressTooBig => "page address size too large",
            Self::Eagain => "operation not done; try again",
            Self::NoSpace => "out of space",
        }
    }
}

impl fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GNTST {} ({})", self.code(), self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_follows_the_header() {
        assert_eq!(ENTRIES_PER_FRAME_V1 as u64 * entry_size(1), PAGE_SIZE);
        assert_eq!(ENTRIES_PER_FRAME_V2 as u64 * entry_size(2), PAGE_SIZE);
        assert_eq!(DEFAULT_MAX_GRANT_FRAMES * ENTRIES_PER_FRAME_V1, 32_768);
        assert_eq!(DEFAULT_MAX_GRANT_FRAMES * ENTRIES_PER_FRAME_V2, 16_384);
        assert_eq!(
            DEFAULT_MAX_MAPTRACK_FRAMES * MAPTRACK_PER_PAGE,
            262_144,
            "simultaneous mappings per mapping domain"
        );
        assert_eq!(status_frames_for(1), 1);
        assert_eq!(status_frames_for(8), 1);
        assert_eq!(status_frames_for(9), 2);
        assert_eq!(pin_overflow_mask(GNTPIN_HSTR_INC), 0x8000);
    }

    #[test]
    fn status_codes_have_the_abi_values() {
        assert_eq!(GrantStatus::GeneralError.code(), -1);
        assert_eq!(GrantStatus::BadCopyArg.code(), -10);
        assert_eq!(GrantStatus::NoSpace.code(), -13);
        assert_eq!(
            GrantStatus::BadGntref.to_string(),
            "GNTST -3 (invalid grant reference)"
        );
    }
}
