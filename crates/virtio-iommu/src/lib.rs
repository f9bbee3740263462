//! A virtio-iommu device model, VMM-agnostic, on rust-vmm's `vm-memory` and
//! `virtio-queue`.
//!
//! The device is how an unmodified guest tells the host which memory each of its
//! devices may reach. This crate owns the mapping state and the per-endpoint
//! translation; it does no I/O of its own. Layers, each usable alone:
//!
//! - [`wire`]: the spec's layouts and constants;
//! - [`request`]: `decode(bytes) -> Request`, pure;
//! - [`state`]: `Tables::apply(Request) -> Status`, pure, with the rules of the spec;
//! - [`device`]: the queue shell, [`VirtioIommu`];
//! - [`translate`]: [`EndpointIommu`], a `vm_memory::Iommu` per endpoint, with an IOTLB.
//!
//! # Embedding it in a VMM
//!
//! ```
//! use virtio_iommu::{EndpointConfig, EndpointId, IommuConfig, VirtioIommu};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
//!
//! let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let config = IommuConfig {
//!     endpoints: vec![EndpointConfig::new(0x08)], // e.g. the virtio-blk at 00:01.0
//!     ..IommuConfig::default()
//! };
//! let mut iommu = VirtioIommu::new(&config).unwrap();
//! // Transport: offer `iommu.device_features()`, then `set_acked_features(..)`;
//! // route config reads/writes to `read_config` / `write_config`; on a kick of queue 0
//! // call `iommu.process_requestq(&mut requestq, &ram)`, of queue 1 `process_eventq`,
//! // and interrupt the guest when they return true. `reset()` on device reset.
//!
//! // The endpoint's backend sees guest memory only through the guest's mappings:
//! let blk_iommu = iommu.endpoint_iommu(EndpointId(0x08)).unwrap();
//! let mut blk_mem = IommuMemory::new(ram.clone(), blk_iommu, true, ());
//! iommu.set_acked_features(iommu.device_features());
//! iommu.write_config(36, &[0]).unwrap(); // the guest turns bypass off
//! assert!(blk_mem.read_obj::<u64>(GuestAddress(0x1000)).is_err()); // not mapped: faults
//! # let _ = &mut blk_mem;
//! ```
//!
//! A backend written against `vm_memory::GuestMemory` and `virtio-queue` runs unchanged
//! on `IommuMemory`: queue rings and buffers are then IOVAs, translated per access.
//!
//! # Spec conformance
//!
//! Every device-normative statement of the virtio-iommu spec (IDs, virtio v1.3 sections
//! and tests listed in `docs/SPEC-STATEMENTS.md`) has a test named after it in
//! `tests/spec.rs`. Used lengths follow what Linux needs (`__viommu_sync_req()` in
//! `drivers/iommu/virtio-iommu.c` takes a status only when the used length is exactly
//! the writable size): every parsed request, failures included, writes its tail and
//! reports exactly 4 (or `probe_size + 4`) bytes; only a request without head, of
//! unknown type, or without room for the tail is returned unwritten with used length 0.
//!
//! Statements deliberately not followed, or followed with a choice the spec leaves open:
//!
//! - DEV-UNM-1 (non-zero UNMAP `reserved` MAY be `S_INVAL` and MAY still unmap): we
//!   answer `S_INVAL` and unmap nothing, so a failed request leaves no trace.
//! - DEV-RESV-4 leaves the status open: a MAP over a reserved region is `S_INVAL`.
//! - DRV-MAP-3 (`virt_end` strictly greater than `virt_start`) is a driver rule; the
//!   device refuses only `virt_end < virt_start` (`S_INVAL`), so with a byte granule a
//!   one-byte mapping (`virt_end == virt_start`) is accepted.
//! - DRV-OPS-3/DRV-OPS-4 are driver rules the device also enforces once the driver
//!   accepted INPUT_RANGE / DOMAIN_RANGE: a MAP outside `input_range` is `S_RANGE`, an
//!   ATTACH to a domain outside `domain_range` is `S_RANGE`. Without the feature the
//!   window is the whole 64-bit space (or every 32-bit domain ID), as the spec says.
//!   UNMAP is not range-checked: it can only remove mappings, which all lie inside.
//! - DEV-FLT-4 allows an older, smaller fault format; we never use one: a buffer
//!   smaller than 24 bytes is returned unused and the event dropped and counted.
//! - The last byte of the 64-bit IOVA space (`u64::MAX`) cannot be translated:
//!   vm-memory addresses accesses as half-open `u64` ranges. MAPs up to `u64::MAX`
//!   are accepted and every other byte of them translates. The default `input_range`
//!   (48 bits) keeps Linux away from it.
//! - Accesses to an endpoint's reserved regions fault even in bypass: they are not
//!   memory (an MSI doorbell write is not DMA to RAM).

#![deny(missing_docs)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("virtio-iommu translates 64-bit IOVAs into usize lengths: 64-bit hosts only");

pub mod config;
pub mod device;
#[cfg(feature = "fake-driver")]
pub mod fake_driver;
mod ids;
pub mod request;
pub mod state;
pub mod translate;
pub mod wire;

pub use config::{ConfigError, EndpointConfig, IommuConfig, Limits, ReservedRegion, ResvKind};
pub use device::{Counters, DeviceError, VirtioIommu, DEVICE_FEATURES};
pub use ids::{DomainId, EndpointId, Gpa, Iova};
pub use request::{decode, DecodeError, Request, RequestType};
pub use state::{Exposure, MappingEvent, Tables};
pub use translate::{EndpointIommu, Hold, MappingSubscriber, Settle};
pub use wire::Status;
