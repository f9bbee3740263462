//! The rigs the workspace's tests and benches share, in one place (a dev-dependency
//! only; never published):
//!
//! - [`mem`]: guest RAM backed by memfds ([`MemfdRam`], whose `File`s go into
//!   vhost-user memory tables), plain memfds ([`memfd`]), and [`FileRam`], guest RAM a
//!   driver reaches through a file without mapping it into the test process.
//! - [`ring`]: [`SplitRing`], the driver side of one split virtqueue over guest memory:
//!   rings laid out at chosen addresses, chains of readable and writable buffers,
//!   indirect tables, publication with the barriers and notification check Linux's
//!   `virtqueue_kick_prepare` makes (EVENT_IDX or `VRING_USED_F_NO_NOTIFY`), the used
//!   ring read back, the `virtio_queue::Queue` the device side needs — and raw writes
//!   for tests that build hostile rings on purpose.
//! - [`pci`]: Linux's virtio-pci modern bring-up through BAR 0 register accesses
//!   ([`pci::Bar0`]), on a `VirtioPciTransport` or over vfio-user.
//! - [`blk`]: virtio-blk request headers and requests bounced through a restricted DMA
//!   pool ([`blk::BlkRequest`]).
//! - [`files`]: temporary disk images and directories removed on drop, and the data
//!   pattern tests fill buffers and images with.
//! - [`proc`]: what a process maps and holds, read from `/proc`, and a thread's CPU
//!   time.
//!
//! Everything here panics when it cannot do its job: a test that cannot set up fails.

pub mod blk;
pub mod files;
pub mod mem;
pub mod pci;
pub mod proc;
pub mod ring;

pub use files::{pattern, TempDir, TempImage};
pub use mem::{memfd, FileRam, Mem, MemfdRam};
pub use ring::{r, w, RingLayout, SplitRing};
