//! vhost-user with a device IOTLB, back-end side: a vhost-user back-end whose guest
//! memory holds only the windows the guest's IOMMU mapped for it.
//!
//! A vhost-user front-end (QEMU, or our device host) hands the back-end file
//! descriptors for all of guest RAM in `SET_MEM_TABLE`. With
//! `VIRTIO_F_IOMMU_PLATFORM` negotiated, ring and buffer addresses are IOVAs and the
//! front-end forwards the guest IOMMU's mappings as `VHOST_USER_IOTLB_MSG` updates and
//! invalidates (vhost-user spec, "IOMMU support"). No released Rust crate handles those
//! messages (rust-vmm's dispatcher rejects them), so this crate runs its own message
//! loop, and — unlike a back-end that trusts the IOTLB only for translation — never
//! maps the memory table: [`space::AddressSpace`] maps exactly the piece of the memory
//! file an update names, unmaps it on invalidate, and asks the front-end (a miss on the
//! back-end request channel) for anything else. Without an IOMMU it maps the regions
//! whole, as any back-end does.
//!
//! Layers:
//! - [`wire`]: the message format and a pure `decode` into validated requests;
//! - [`mmap`]: the one unsafe leaf that maps and revokes pieces of a memory file;
//! - [`space`]: the windows, the `vm_memory::GuestMemory` devices use ([`space::GuestView`]),
//!   misses, exposure accounting;
//! - [`channel`]: message I/O and the back-end request channel;
//! - [`push_ring`]: Aperture's private extension, updates pushed through shared memory;
//! - [`session`]: one connection — the main-socket loop and the device worker running
//!   any `virtio_contract::VirtioDevice` (the same devices as in-process).
//!
//! Not confinement against a malicious back-end: the memory table's fds still reach
//! the back-end process (vhost-user protocol, QEMU `docs/interop/vhost-user.rst`:
//! `VHOST_USER_SET_MEM_TABLE` passes an fd per region); what this gives is a
//! cooperating back-end whose address space never holds more than the guest mapped, so
//! a compromise of its device code reaches only those windows.

#![deny(missing_docs)]

pub mod channel;
pub mod mmap;
pub mod push_ring;
pub mod session;
pub mod space;
pub mod wire;

pub use session::{Report, Session, SessionConfig, SessionError, PROTOCOL_FEATURES};
pub use space::{AddressSpace, Exposure, Fault, GuestView, Limits, MapPolicy, Mode, SpaceError};

/// Whether `VHOST_IOTLB_TRACE` is set in the environment: every message and miss is
/// then logged on stderr.
pub(crate) fn trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VHOST_IOTLB_TRACE").is_some_and(|v| !v.is_empty()))
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace_on() {
            eprintln!("vhost-iotlb: {}", format_args!($($arg)*));
        }
    };
}
pub(crate) use trace;
