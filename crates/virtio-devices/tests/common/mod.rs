//! The test-side guest shared by the device tests: guest RAM and its layout, the
//! test kit's split-ring driver at [`RING`], the kit's temporary images and data
//! pattern, and the register accesses Linux's virtio_pci modern driver makes to bring
//! a device up through `VirtioPciTransport` (the kit's `pci` module).

#![allow(dead_code, unused_imports)] // each test binary uses its own part
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

pub use test_kit::blk::header;
use test_kit::pci::{self, Bar0, QueueSetup};
pub use test_kit::pci::{bar_read, bar_write, Irqs};
pub use test_kit::ring::F_WRITE;
pub use test_kit::{pattern, r, w, TempImage};
use test_kit::{RingLayout, SplitRing};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Guest memory of the tests.
pub type Mem = GuestMemoryMmap<()>;

/// Guest RAM size (the same as virtio-iommu's fake guest, whose RAM the isolation
/// tests share).
pub const RAM_SIZE: usize = 16 << 20;
/// The device's queue: descriptor table, avail and used rings packed for 256 entries
/// (about 6.2 KiB). Above virtio-iommu's fake-guest area.
pub const RING: u64 = 0x80_0000;
/// Bytes the ring occupies, rounded up to pages (for IOMMU mappings).
pub const RING_LEN: u64 = 0x2000;
/// Request headers.
pub const HDR: u64 = 0x90_0000;
/// Status bytes.
pub const STATUS: u64 = 0x91_0000;
/// Data buffers, up to the end of RAM (6 MiB).
pub const DATA: u64 = 0xa0_0000;

/// Fresh guest RAM.
pub fn ram() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap()
}

/// The guest side of one queue.
pub type Driver = SplitRing<Mem>;

/// A 256-entry queue at [`RING`] in `mem`.
pub fn driver(mem: &Mem) -> Driver {
    let d = SplitRing::new(mem.clone(), RingLayout::packed(RING, 256), 256);
    assert!(d.layout().bytes(256) <= RING_LEN);
    d
}

/// Writes a header at [`HDR`] and a 0xff sentinel at [`STATUS`] into `mem`.
pub fn prepare<M: GuestMemory>(mem: &M, request_type: u32, sector: u64) {
    test_kit::blk::prepare(mem, HDR, STATUS, request_type, sector);
}

/// The status byte at [`STATUS`].
pub fn status<M: GuestMemory>(mem: &M) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// ACKNOWLEDGE, DRIVER, reads the offered features, writes `want`, sets FEATURES_OK;
/// returns the features offered and whether FEATURES_OK stuck.
pub fn negotiate<B: Bar0>(t: &mut B, want: u64) -> (u64, bool) {
    let n = pci::negotiate(t, Some(want));
    (n.offered, n.features_ok)
}

/// Sets up queue 0 at the rings of `drv` (IOVAs behind an IOMMU, mapped one to one)
/// with MSI-X vector 1, configuration vector 0, enables it, and sets DRIVER_OK.
pub fn start<B: Bar0>(t: &mut B, drv: &Driver) {
    bar_write(t, pci::reg::CONFIG_MSIX_VECTOR, 0, 2);
    pci::setup_queue(
        t,
        &QueueSetup {
            index: 0,
            size: None,
            vector: 1,
            layout: drv.layout(),
        },
    );
    pci::driver_ok(t);
}

/// Notifies queue 0 the way the driver does: a 2-byte write to its notify address.
pub fn kick<B: Bar0>(t: &mut B) {
    pci::notify(t, 0);
}
