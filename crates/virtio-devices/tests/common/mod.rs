//! The test-side guest shared by the device tests: guest RAM and its layout, a driver
//! that posts chains through virtio-queue's `MockSplitQueue` and reads the used ring
//! back, temporary disk images, and the register accesses Linux's virtio_pci modern
//! driver makes to bring a device up through `VirtioPciTransport`.

#![allow(dead_code)] // each test binary uses its own part
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_contract::VirtioDevice;
use virtio_devices::block::request::RequestHeader;
use virtio_pci::{InterruptSink, VirtioPciTransport};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// Guest memory of the tests.
pub type Mem = GuestMemoryMmap<()>;

/// Guest RAM size (the same as virtio-iommu's fake guest, whose RAM the isolation
/// tests share).
pub const RAM_SIZE: usize = 16 << 20;
/// The device's queue: descriptor table, avail and used rings as `MockSplitQueue` lays
/// them out for 256 entries (about 6.2 KiB). Above virtio-iommu's fake-guest area.
pub const RING: u64 = 0x80_0000;
/// Bytes the ring occupies, rounded up to pages (for IOMMU mappings).
pub const RING_LEN: u64 = 0x2000;
/// Request headers.
pub const HDR: u64 = 0x90_0000;
/// Status bytes.
pub const STATUS: u64 = 0x91_0000;
/// Data buffers, up to the end of RAM (6 MiB).
pub const DATA: u64 = 0xa0_0000;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;

/// Fresh guest RAM.
pub fn ram() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap()
}

/// A device-readable descriptor.
pub fn r(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A device-writable descriptor.
pub fn w(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, F_WRITE, 0))
}

/// Deterministic non-trivial bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A virtio-blk request header.
pub fn header(request_type: u32, sector: u64) -> [u8; 16] {
    let h = RequestHeader {
        request_type: U32::new(request_type),
        reserved: U32::new(0),
        sector: U64::new(sector),
    };
    let mut b = [0u8; 16];
    b.copy_from_slice(h.as_bytes());
    b
}

/// Writes a header at [`HDR`] and a 0xff sentinel at [`STATUS`] into `mem`.
pub fn prepare<M: GuestMemory>(mem: &M, request_type: u32, sector: u64) {
    mem.write_slice(&header(request_type, sector), GuestAddress(HDR))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// The status byte at [`STATUS`].
pub fn status<M: GuestMemory>(mem: &M) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// The guest side of one queue.
pub struct Driver<'a, M: GuestMemory> {
    /// The rings, as virtio-queue's mock driver lays them out at [`RING`].
    pub mock: MockSplitQueue<'a, M>,
    seen: u16,
}

impl<'a, M: GuestMemory> Driver<'a, M> {
    /// A 256-entry queue at [`RING`] in `mem`.
    pub fn new(mem: &'a M) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(RING), 256),
            seen: 0,
        }
    }

    /// The device side of the queue, ready, for direct `process_queue` calls.
    pub fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Posts one chain (descriptors 0.., linked in order). The mock does not wrap its
    /// avail index, so a test posts fewer than 256 chains in all.
    pub fn post(&self, descs: &[RawDescriptor]) {
        self.mock.build_desc_chain(descs).unwrap();
    }

    /// Posts descriptors as given: each one without NEXT ends a chain.
    pub fn post_raw(&self, descs: &[RawDescriptor]) {
        self.mock.add_desc_chains(descs, 0).unwrap();
    }

    /// Used-ring entries (head, used length) the device added since the last call.
    pub fn completions(&mut self) -> Vec<(u32, u32)> {
        let idx = self.mock.used().idx().load();
        let mut out = Vec::new();
        while self.seen != idx {
            let e = self
                .mock
                .used()
                .ring()
                .ref_at(usize::from(self.seen % 256))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.seen = self.seen.wrapping_add(1);
        }
        out
    }

    /// The used length of the one chain the device completed since the last call.
    pub fn one(&mut self) -> u32 {
        let c = self.completions();
        assert_eq!(c.len(), 1, "exactly one chain completed: {c:?}");
        c[0].1
    }
}

/// A disk image in the temporary directory, removed when dropped.
pub struct TempImage {
    /// Its path.
    pub path: PathBuf,
}

impl TempImage {
    /// A new image named after `tag` holding `contents`.
    pub fn new(tag: &str, contents: &[u8]) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vdev-{}-{n}-{tag}.img", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self { path }
    }

    /// What the image holds now.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Records the MSI-X vectors signalled.
#[derive(Default)]
pub struct Irqs(pub Mutex<Vec<u16>>);

/// An interrupt sink feeding [`Irqs`].
pub struct Sink(pub Arc<Irqs>);

impl InterruptSink for Sink {
    fn signal(&self, vector: u16) {
        self.0 .0.lock().unwrap().push(vector);
    }
}

/// Reads BAR 0.
pub fn bar_read<D: VirtioDevice<M>, M: GuestMemory>(
    t: &mut VirtioPciTransport<D, M>,
    off: u64,
    len: usize,
) -> u64 {
    let mut b = [0u8; 8];
    t.read_bar(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// Writes BAR 0.
pub fn bar_write<D: VirtioDevice<M>, M: GuestMemory>(
    t: &mut VirtioPciTransport<D, M>,
    off: u64,
    v: u64,
    len: usize,
) {
    t.write_bar(off, &v.to_le_bytes()[..len]);
}

/// ACKNOWLEDGE, DRIVER, reads the offered features, writes `want`, sets FEATURES_OK;
/// returns the features offered and whether FEATURES_OK stuck.
pub fn negotiate<D: VirtioDevice<M>, M: GuestMemory>(
    t: &mut VirtioPciTransport<D, M>,
    want: u64,
) -> (u64, bool) {
    bar_write(t, 0x14, 1 | 2, 1);
    bar_write(t, 0x00, 0, 4);
    let lo = bar_read(t, 0x04, 4);
    bar_write(t, 0x00, 1, 4);
    let hi = bar_read(t, 0x04, 4);
    bar_write(t, 0x08, 0, 4);
    bar_write(t, 0x0c, want & 0xffff_ffff, 4);
    bar_write(t, 0x08, 1, 4);
    bar_write(t, 0x0c, want >> 32, 4);
    bar_write(t, 0x14, 1 | 2 | 8, 1);
    (lo | (hi << 32), bar_read(t, 0x14, 1) & 8 != 0)
}

/// Sets up queue 0 at the rings of `mock` (IOVAs behind an IOMMU) with MSI-X vector 1,
/// enables it, and sets DRIVER_OK.
pub fn start<D: VirtioDevice<M>, M: GuestMemory, N: GuestMemory>(
    t: &mut VirtioPciTransport<D, M>,
    mock: &MockSplitQueue<'_, N>,
) {
    bar_write(t, 0x10, 0, 2); // config vector 0
    bar_write(t, 0x16, 0, 2); // queue_select 0
    bar_write(t, 0x1a, 1, 2); // queue vector 1
    bar_write(t, 0x20, mock.desc_table_addr().0, 8);
    bar_write(t, 0x28, mock.avail_addr().0, 8);
    bar_write(t, 0x30, mock.used_addr().0, 8);
    bar_write(t, 0x1c, 1, 2);
    bar_write(t, 0x14, 1 | 2 | 8 | 4, 1);
}

/// Notifies queue 0 the way the driver does: a 2-byte write to its notify address.
pub fn kick<D: VirtioDevice<M>, M: GuestMemory>(t: &mut VirtioPciTransport<D, M>) {
    bar_write(t, 0x3000, 0, 2);
}
