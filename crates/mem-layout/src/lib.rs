//! Guest physical memory layout around reserved device memory, for Aperture.
//!
//! Some devices need parts of physical memory identity-mapped forever (Intel RMRRs,
//! AMD IVMDs, Arm RMRs). This crate reads what the host says about them, plans a guest
//! layout that keeps those ranges free without losing RAM, and enforces the rules of
//! assigning such devices. It follows Xen's `rdm=` design and libxl's algorithm
//! (xl.cfg(5) `rdm=`, `docs/misc/vtd.txt`, `tools/libs/light/libxl_dm.c`):
//!
//! - [`dmar`]: the ACPI DMAR table — header, checksum, DRHDs, RMRRs, device scopes.
//! - [`ivrs`]: the AMD IVRS table — IVHDs (which devices each IOMMU covers), IVMDs.
//! - [`iort`]: the Arm IORT table — nodes, ID mappings, RMR nodes.
//! - [`reserved_regions`]: Linux's `/sys/kernel/iommu_groups/*/reserved_regions`.
//! - [`rdm`]: the host's regions with the devices that need them — from any of the
//!   three tables and the sysfs files, one database — after Linux's and Xen's checks;
//!   the `XENMEM_reserved_device_memory_map`-style query.
//! - [`layout`]: the q35 layout planner (libxl's two passes), e820, BAR allocator; one
//!   [`layout::Layout`] is the single source of truth.
//! - [`identity`]: identity maps on assignment and the shared-region rule.
//! - [`types`]: device ids, inclusive ranges, region kinds, policies.
//!
//! The `aperture layout` command is the front end; `aperture serve --reserved` applies
//! the same [`layout::Layout`] to QEMU (`max-ram-below-4g`) and to the virtio-iommu's
//! PROBE answers.

#![deny(missing_docs)]

pub mod acpi;
pub mod dmar;
pub mod identity;
pub mod iort;
pub mod ivrs;
pub mod layout;
pub mod rdm;
pub mod reserved_regions;
pub mod types;

pub use layout::{plan, Layout, LayoutConfig, LayoutError};
pub use rdm::RdmDatabase;
pub use types::{Bdf, MemRange, Policy, RegionKind, Strategy};
