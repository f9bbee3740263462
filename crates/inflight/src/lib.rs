//! Implicit grants (issue 16): the device host sits between the guest's rings and a
//! vhost-user back-end, and the back-end reaches only the buffers in flight.
//!
//! [`CopyShadow`] is the copy form. For one queue it keeps a shadow split ring and a
//! bounce arena in memory the device host owns (a memfd, [`ShadowMemory`]); the
//! back-end is given that memory and nothing of the guest's:
//!
//! guest avail → [`CopyShadow::pull`] (read once, validate, copy readable bytes in,
//! zero the writable ones) → shadow avail → back-end → shadow used →
//! [`CopyShadow::complete`] (validate, copy back at most what was written) → guest used.
//!
//! The rules it keeps, each with a test named after it:
//! - every guest descriptor and indirect table is read once, into private memory; the
//!   guest's ring is never read again to complete a request;
//! - chains are validated as the virtio spec requires (v1.3 §2.7.5, §2.7.5.3): the
//!   avail index never jumps past the queue size, no head already in flight, `next`
//!   within the table, no loop, no nested indirect table, no indirect descriptor with
//!   NEXT, an indirect length that is a non-zero multiple of 16, no readable
//!   descriptor after a writable one, no address that wraps. A bad chain is an error
//!   (the carrier sets DEVICE_NEEDS_RESET) and nothing of it is granted;
//! - the back-end's used ring is hostile: an unknown or duplicate id, or an index that
//!   jumps past what is in flight, is an error; a length beyond the writable bytes is
//!   clamped; the guest's ring is not touched for what is refused;
//! - writable bounce bytes are zeroed before the back-end sees them, so nothing of an
//!   earlier request leaks, and only `min(used len, writable bytes)` is copied back;
//! - a request that cannot get arena space waits in the guest's ring (back-pressure),
//!   it is never dropped; one larger than the whole shadow fails with the device's
//!   error status.
//!
//!
//! The map form: a carrier's [`Windows`] may show a buffer in place instead
//! ([`CopyShadow::pull_with`], [`CopyShadow::complete_with`]): its window is open
//! before the back-end can see the request and closed before the guest sees it used.
//! With the back-end's EVENT_IDX ([`CopyShadow::set_event_idx`]) the shadow follows
//! `avail_event` for its kicks and keeps `used_event` at its last completion.
//!
//! The device host's vhost-user front-end carries it (`device_host::vhost_user`,
//! `aperture serve --inflight copy|map`), with the deadline for a back-end that never
//! returns; the cost survey models it (`survey::implicit`).

#![deny(missing_docs)]

mod chain;
mod copy;
mod memory;

pub use chain::{collect_chain, ChainError, Desc, MAX_CHAIN_DESCRIPTORS};
pub use copy::{
    Arena, CopyAll, CopyShadow, Pulled, ShadowConfig, ShadowError, Stats, WindowError, Windows,
};
pub use memory::ShadowMemory;
