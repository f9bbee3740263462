//! virtio-blk from `virtio-devices`, unchanged, serving a guest in pool mode: the
//! device's memory is an `IommuMemory` over [`PoolIommu`], so it reaches the pool and
//! nothing else; the guest's fake driver puts the ring in a coherent allocation from
//! the pool and bounces every header, data buffer and status byte through it with
//! [`GuestDma`], as Linux does for a device with a `restricted-dma-pool`. Reads and
//! writes round-trip; a descriptor that points at guest RAM outside the pool is denied
//! by the address space and fails only its own request.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use bounce_pool::*;
use test_kit::blk::{access_platform_block as blk, BlkLayout, BlkRequest};
use test_kit::{pattern, RingLayout, SplitRing, TempImage};
use virtio_bindings::virtio_blk::*;
use virtio_contract::VirtioDevice;
use virtio_devices::Block;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

type Mem = GuestMemoryMmap<()>;
type DevMem = IommuMemory<Mem, PoolIommu>;

const RAM: usize = 16 << 20;
/// The restricted pool: 2 MiB at 8 MiB.
const POOL: u64 = 0x80_0000;
const POOL_SIZE: u64 = 2 << 20;
/// The guest's own buffers, outside the pool: headers, status bytes, data.
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;
const SECTOR: u64 = 512;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// The guest: RAM, the pool, its DMA API, and a ring in coherent pool memory.
struct Guest {
    dma: GuestDma<Mem>,
    ring: DmaAddr,
}

impl Guest {
    fn new() -> Self {
        let mem = Mem::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let dma = GuestDma::with_own_pool(mem, Gpa(POOL), POOL_SIZE).unwrap();
        // vring_alloc_queue(): dma_alloc_coherent, which a restricted pool serves.
        let ring = dma.alloc_coherent(8192).unwrap();
        Self { dma, ring }
    }

    fn mem(&self) -> &Mem {
        self.dma.memory()
    }

    /// The driver's side of the queue: 256 entries packed in the coherent allocation.
    fn queue(&self) -> SplitRing<Mem> {
        SplitRing::new(
            self.mem().clone(),
            RingLayout::packed(self.ring.0, 256),
            256,
        )
    }

    /// What the device gets: the pool and nothing else.
    fn device_memory(&self) -> DevMem {
        let iommu = PoolIommu::for_pool(self.dma.pool()).unwrap();
        IommuMemory::new(self.mem().clone(), iommu, true, ())
    }
}

const AT: BlkLayout = BlkLayout {
    hdr: HDR,
    data: DATA,
    status: STATUS,
};

/// One request as virtio_blk does it ([`BlkRequest`]: header, data and status mapped
/// through the DMA API, data split at `max_mapping_size`), posted, served, used entry
/// read, all unmapped (status and read data copied back). Returns (used length, status
/// byte).
#[allow(clippy::too_many_arguments)] // one request, spelled out as the driver has it
fn request(
    g: &Guest,
    q: &mut SplitRing<Mem>,
    queue: &mut Queue,
    dev: &mut Block,
    dev_mem: &DevMem,
    request_type: u32,
    sector: u64,
    data_len: usize,
) -> (u32, u8) {
    let r = BlkRequest::map(&g.dma, AT, request_type, sector, data_len, None).unwrap();
    let used_before = q.used_idx();
    q.post(&r.descriptors());
    dev.process_queue(0, queue, dev_mem).unwrap();
    assert_eq!(q.used_idx(), used_before.wrapping_add(1));
    let used = q.used_elem(used_before).1;
    (used, r.complete(&g.dma).unwrap())
}

#[test]
fn blk_serves_a_pool_mode_guest_writes_and_reads_round_trip_through_the_pool() {
    let g = Guest::new();
    let img = TempImage::new("rt", &vec![0u8; 2048 * 512]);
    let mut dev = blk(img.path());
    let dev_mem = g.device_memory();
    let mut q = g.queue();
    let mut queue = q.queue();

    // Write 300 KiB (two segments: 256 KiB + 44 KiB) at sector 8.
    let len = 300 << 10;
    let data = pattern(len, 7);
    g.mem().write_slice(&data, GuestAddress(DATA)).unwrap();
    let out = request(
        &g,
        &mut q,
        &mut queue,
        &mut dev,
        &dev_mem,
        VIRTIO_BLK_T_OUT,
        8,
        len,
    );
    assert_eq!(out, (1, OK));
    let at = 8 * SECTOR as usize;
    assert!(img.contents()[at..at + len] == data[..], "on disk");

    // Read it back into a cleared buffer.
    g.mem()
        .write_slice(&vec![0u8; len], GuestAddress(DATA))
        .unwrap();
    let back = request(
        &g,
        &mut q,
        &mut queue,
        &mut dev,
        &dev_mem,
        VIRTIO_BLK_T_IN,
        8,
        len,
    );
    assert_eq!(back, (1 + len as u32, OK));
    let mut got = vec![0u8; len];
    g.mem().read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got == data, "read back through the bounce buffers");

    // Flush, and nothing was ever denied; every streaming slot was given back.
    let flush = request(
        &g,
        &mut q,
        &mut queue,
        &mut dev,
        &dev_mem,
        VIRTIO_BLK_T_FLUSH,
        0,
        0,
    );
    assert_eq!(flush, (1, OK));
    assert_eq!(dev_mem.iommu().faults(), 0);
    assert_eq!(dev.counters().ok, 3);
    let ring_slots = 4; // the 8 KiB coherent ring
    assert_eq!(g.dma.pool().stats().used_slots, ring_slots);
}

#[test]
fn blk_descriptor_pointing_outside_the_pool_is_denied_and_fails_only_its_request() {
    let g = Guest::new();
    let img = TempImage::new("deny", &pattern(64 * 512, 3));
    let before = img.contents();
    let mut dev = blk(img.path());
    let dev_mem = g.device_memory();
    let mut q = g.queue();
    let mut queue = q.queue();

    // A write whose data descriptor is the guest-physical address of a RAM buffer
    // instead of a bounce buffer: the device may not read it.
    g.mem()
        .write_slice(&[0xee; 512], GuestAddress(DATA))
        .unwrap();
    let r = BlkRequest::map(&g.dma, AT, VIRTIO_BLK_T_OUT, 0, 512, Some(DATA)).unwrap();
    q.post(&r.descriptors());
    dev.process_queue(0, &mut queue, &dev_mem).unwrap();
    assert_eq!(r.complete(&g.dma).unwrap(), IOERR);
    assert!(
        dev_mem.iommu().faults() > 0,
        "the pool address space denied it"
    );
    assert_eq!(img.contents(), before, "file untouched");

    // A read aimed at guest RAM outside the pool: denied, RAM untouched.
    let faults = dev_mem.iommu().faults();
    let r = BlkRequest::map(&g.dma, AT, VIRTIO_BLK_T_IN, 0, 512, Some(DATA)).unwrap();
    q.post(&r.descriptors());
    dev.process_queue(0, &mut queue, &dev_mem).unwrap();
    assert_eq!(r.complete(&g.dma).unwrap(), IOERR);
    assert!(dev_mem.iommu().faults() > faults);
    let mut ram = [0u8; 512];
    g.mem().read_slice(&mut ram, GuestAddress(DATA)).unwrap();
    assert_eq!(ram, [0xee; 512], "guest RAM untouched");

    // The device still serves the next, well-formed request.
    let ok = request(
        &g,
        &mut q,
        &mut queue,
        &mut dev,
        &dev_mem,
        VIRTIO_BLK_T_OUT,
        4,
        512,
    );
    assert_eq!(ok, (1, OK));
    assert_eq!(img.contents()[4 * 512..5 * 512], [0xee; 512]);
}
