//! The operations' arguments and results, as `xen/include/public/grant_table.h`
//! declares them, and the errors of the model.

use crate::abi::{
    GrantStatus, DEFAULT_MAX_GRANT_FRAMES, DEFAULT_MAX_MAPTRACK_FRAMES, DOMID_SELF,
    GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
};
use crate::{DomId, Gfn, GrantHandle, GrantRef};

/// Why a domain-level call (not a batched grant operation) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A domain with this id exists already.
    #[error("domain {0} exists already")]
    DomainExists(DomId),
    /// No live domain has this id.
    #[error("no live domain {0}")]
    NoDomain(DomId),
    /// The domain id is reserved (`DOMID_FIRST_RESERVED` 0x7ff0 and above).
    #[error("domain id {0} is reserved (0x7ff0 and above)")]
    ReservedDomainId(DomId),
    /// A configuration value is outside what Xen accepts.
    #[error("domain configuration: {0}")]
    BadConfig(&'static str),
    /// `set_version` with a version other than 1 or 2, or above the domain's maximum.
    #[error("grant table version {version} is not allowed (maximum {max})")]
    BadVersion {
        /// Requested.
        version: u32,
        /// The domain's `max_grant_version`.
        max: u32,
    },
    /// `set_version` while an entry of the table is pinned.
    #[error("grant table of {0} has entries in use; its version cannot change")]
    VersionInUse(DomId),
}

/// How a domain is built (`xl.cfg` `max_grant_frames`, `max_maptrack_frames`,
/// `max_grant_version`; Xen cmdline `gnttab=transitive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Most grant frames the domain's table may have (default 64).
    pub max_grant_frames: u32,
    /// Most maptrack frames the domain may use as a mapper (default 1024).
    pub max_maptrack_frames: u32,
    /// Highest grant table version the domain may select (default 2, as x86 HVM).
    pub max_grant_version: u32,
    /// vCPUs: one maptrack free list each (default 1).
    pub vcpus: u32,
    /// An auto-translated (HVM/PVH) domain: it may not ask for `GNTMAP_device_map`,
    /// `GNTMAP_application_map` or `GNTMAP_contains_pte` (default true).
    pub auto_translated: bool,
    /// Whether copies through this domain's transitive grants are allowed
    /// (`gnttab=transitive`, default true on x86).
    pub transitive: bool,
    /// A privileged domain may query other domains' tables.
    pub privileged: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            max_grant_frames: DEFAULT_MAX_GRANT_FRAMES,
            max_maptrack_frames: DEFAULT_MAX_MAPTRACK_FRAMES,
            max_grant_version: 2,
            vcpus: 1,
            auto_translated: true,
            transitive: true,
            privileged: false,
        }
    }
}

/// Who issues an operation: a domain, on one of its vCPUs (maptrack handles come from
/// per-vCPU free lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The calling domain.
    pub domain: DomId,
    /// The calling vCPU (taken modulo the domain's vCPU count).
    pub vcpu: u32,
}

impl Caller {
    /// `domain` on vCPU 0.
    pub fn new(domain: DomId) -> Self {
        Self { domain, vcpu: 0 }
    }

    /// The same domain on `vcpu`.
    pub fn on_vcpu(self, vcpu: u32) -> Self {
        Self { vcpu, ..self }
    }
}

/// `GNTTABOP_setup_table`, with the frames supplied by the guest (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupTable {
    /// IN: the domain (`DOMID_SELF` or the caller's id).
    pub dom: DomId,
    /// IN: GFNs of the grant frames, in order; its length is `nr_frames`. Frames the
    /// table already has must be repeated at their positions; the table only grows.
    pub frame_list: Vec<Gfn>,
    /// IN (v2 only): GFNs of the status frames, `status_frames_for(nr_frames)` of them,
    /// existing ones repeated likewise; empty for v1.
    pub status_frame_list: Vec<Gfn>,
    /// OUT.
    pub status: GrantStatus,
}

/// `GNTTABOP_query_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuerySize {
    /// IN: the domain (`DOMID_SELF`, the caller, or any for a privileged caller).
    pub dom: DomId,
    /// OUT: current grant frames.
    pub nr_frames: u32,
    /// OUT: the domain's limit.
    pub max_nr_frames: u32,
    /// OUT.
    pub status: GrantStatus,
}

/// `struct gnttab_map_grant_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapGrantRef {
    /// IN: where the mapper wants the page (recorded; must match on unmap).
    pub host_addr: u64,
    /// IN: `GNTMAP_*`.
    pub flags: u32,
    /// IN: the granter's reference.
    pub gref: GrantRef,
    /// IN: the granting domain.
    pub dom: DomId,
    /// OUT.
    pub status: GrantStatus,
    /// OUT: maptrack handle for the unmap.
    pub handle: GrantHandle,
    /// OUT: the frame's bus address (here the granter's guest-physical address).
    pub dev_bus_addr: u64,
}

impl MapGrantRef {
    /// A map request; outputs start as `GNTST_general_error`, handle 0, address 0.
    pub fn new(dom: DomId, gref: GrantRef, flags: u32, host_addr: u64) -> Self {
        Self {
            host_addr,
            flags,
            gref,
            dom,
            status: GrantStatus::GeneralError,
            handle: GrantHandle(0),
            dev_bus_addr: 0,
        }
    }
}

/// `struct gnttab_unmap_grant_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapGrantRef {
    /// IN: the host mapping to remove (0: leave it).
    pub host_addr: u64,
    /// IN: the device mapping to remove (0: leave it).
    pub dev_bus_addr: u64,
    /// IN: the handle the map returned.
    pub handle: GrantHandle,
    /// OUT.
    pub status: GrantStatus,
}

impl UnmapGrantRef {
    /// An unmap request.
    pub fn new(handle: GrantHandle, host_addr: u64, dev_bus_addr: u64) -> Self {
        Self {
            host_addr,
            dev_bus_addr,
            handle,
            status: GrantStatus::GeneralError,
        }
    }
}

/// `struct gnttab_copy_ptr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPtr {
    /// A grant reference (with the matching `GNTCOPY_*_gref` flag) or a GFN of the
    /// caller's own RAM.
    pub u: u64,
    /// The domain (`DOMID_SELF` for a local frame).
    pub domid: DomId,
    /// Byte offset in the page.
    pub offset: u16,
}

impl CopyPtr {
    /// Byte `offset` of the page granted by `domid`'s `gref`.
    pub fn gref(domid: DomId, gref: GrantRef, offset: u16) -> Self {
        Self {
            u: u64::from(gref.0),
            domid,
            offset,
        }
    }

    /// Byte `offset` of the caller's own frame `gfn`.
    pub fn local(gfn: Gfn, offset: u16) -> Self {
        Self {
            u: gfn.0,
            domid: DomId(DOMID_SELF),
            offset,
        }
    }
}

/// `struct gnttab_copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantCopy {
    /// IN.
    pub source: CopyPtr,
    /// IN.
    pub dest: CopyPtr,
    /// IN: bytes (a `u16`: one operation never exceeds a page).
    pub len: u16,
    /// IN: `GNTCOPY_*`.
    pub flags: u16,
    /// OUT.
    pub status: GrantStatus,
}

impl GrantCopy {
    /// A copy request; `flags` are derived from which side is a grant.
    pub fn new(
        source: CopyPtr,
        source_gref: bool,
        dest: CopyPtr,
        dest_gref: bool,
        len: u16,
    ) -> Self {
        let mut flags = 0;
        if source_gref {
            flags |= GNTCOPY_SOURCE_GREF;
        }
        if dest_gref {
            flags |= GNTCOPY_DEST_GREF;
        }
        Self {
            source,
            dest,
            len,
            flags,
            status: GrantStatus::GeneralError,
        }
    }
}

/// What a live map handle reaches ([`Xen::mapped_frame`](super::Xen::mapped_frame)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedFrame {
    /// The granting domain.
    pub granter: DomId,
    /// The granted frame's guest-physical address in the granter's RAM.
    pub gpa: u64,
    /// Whether the mapping is writable.
    pub writable: bool,
}
