//! The devices behind virtio-iommu: their memory is an `IommuMemory` whose accesses
//! the endpoint's `EndpointIommu` translates, with the guest's MAPs sent through the
//! IOMMU's real request queue by virtio-iommu's fake guest driver. The guest maps the
//! ring, headers and status bytes; whatever it did not map (or mapped without the
//! access needed) fails that one request with IOERR — or used length 0 when the status
//! byte itself is unreachable — the IOMMU counts the fault, and neither the image nor
//! guest RAM changes.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use virtio_bindings::virtio_blk::*;
use virtio_contract::{VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_devices::{block, Block, BlockConfig, Rng, RngConfig};
use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::wire::{CONFIG_BYPASS_OFFSET, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use virtio_iommu::{
    DomainId, EndpointConfig, EndpointId, EndpointIommu, IommuConfig, Iova, Request, Status,
    VirtioIommu,
};
use virtio_pci::{device_status, VirtioPciTransport};
use vm_memory::{Bytes, GuestAddress, IommuMemory};

type IoMem = IommuMemory<Mem, EndpointIommu>;

/// The endpoint ID of the device under test (its PCI requester ID).
const EP: u32 = 0x10;
const DOMAIN: u32 = 1;
const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
const W: u32 = VIRTIO_IOMMU_MAP_F_WRITE;
const RW: u32 = R | W;
const PAGE: u64 = 0x1000;
/// Where the guest maps data buffers in the device's address space, away from their
/// guest-physical addresses so a test sees translation happen.
const DATA_IOVA: u64 = 0x4000_0000;
const AP: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

/// A virtio-iommu whose guest turned bypass off and attached the endpoint to a domain
/// that maps the ring (identity, RW), the header page (identity, R) and the status page
/// (identity, W) — and nothing else.
fn iommu() -> (VirtioIommu, FakeGuest) {
    let cfg = IommuConfig {
        endpoints: vec![EndpointConfig::new(EP)],
        ..IommuConfig::default()
    };
    let mut dev = VirtioIommu::new(&cfg).unwrap();
    let mut g = FakeGuest::new(cfg.probe_size);
    g.negotiate(&mut dev);
    dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]).unwrap();
    let attach = Request::Attach {
        domain: DomainId(DOMAIN),
        endpoint: EndpointId(EP),
        flags: 0,
        reserved_nonzero: false,
    };
    assert_eq!(g.send(&mut dev, &attach), Status::Ok);
    map(&mut g, &mut dev, RING, RING_LEN, RING, RW);
    map(&mut g, &mut dev, HDR, PAGE, HDR, R);
    map(&mut g, &mut dev, STATUS, PAGE, STATUS, W);
    (dev, g)
}

/// MAPs `[iova, iova + len)` to `gpa` with `flags`, as the guest's driver would.
fn map(g: &mut FakeGuest, dev: &mut VirtioIommu, iova: u64, len: u64, gpa: u64, flags: u32) {
    let req = Request::Map {
        domain: DomainId(DOMAIN),
        virt_start: Iova(iova),
        virt_end: Iova(iova + len - 1),
        phys_start: gpa,
        flags,
    };
    assert_eq!(g.send(dev, &req), Status::Ok);
}

fn unmap(g: &mut FakeGuest, dev: &mut VirtioIommu, iova: u64, len: u64) {
    let req = Request::Unmap {
        domain: DomainId(DOMAIN),
        virt_start: Iova(iova),
        virt_end: Iova(iova + len - 1),
        reserved_nonzero: false,
    };
    assert_eq!(g.send(dev, &req), Status::Ok);
}

/// The endpoint's view of guest memory.
fn endpoint_memory(dev: &VirtioIommu, g: &FakeGuest) -> IoMem {
    IommuMemory::new(
        g.mem.clone(),
        dev.endpoint_iommu(EndpointId(EP)).unwrap(),
        true,
        (),
    )
}

/// A 64-sector image and a virtio-blk on a virtio-pci function whose DMA goes through
/// the IOMMU, brought up by the driver with ACCESS_PLATFORM.
fn blk_behind_iommu(
    img: &TempImage,
    dev: &VirtioIommu,
    g: &FakeGuest,
    drv: &Driver,
) -> VirtioPciTransport<Block, IoMem> {
    let blk = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: false,
        access_platform: true,
        test_stray_sector: None,
    })
    .unwrap();
    let irqs = Irqs::new();
    let mut t = VirtioPciTransport::new(
        blk,
        block::PCI_CLASS_CODE,
        endpoint_memory(dev, g),
        irqs.sink(),
        AP,
    )
    .unwrap();
    assert!(negotiate(&mut t, V1 | AP | 1 << VIRTIO_BLK_F_FLUSH).1);
    start(&mut t, drv);
    assert_eq!(
        t.status() & device_status::DEVICE_NEEDS_RESET,
        0,
        "ring reachable"
    );
    t
}

#[test]
fn blk_write_from_unmapped_data_buffer_is_ioerr_faults_and_file_untouched() {
    let (mut dev, mut g) = iommu();
    let img = TempImage::new("iommu-w", &pattern(64 * 512, 5));
    let before = img.contents();
    let mem = g.mem.clone();
    let mut drv = driver(&mem);
    let mut t = blk_behind_iommu(&img, &dev, &g, &drv);

    mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xee; 512], GuestAddress(DATA + PAGE))
        .unwrap();
    // Second buffer unmapped: the first one's 512 bytes must not reach the file either.
    map(&mut g, &mut dev, DATA_IOVA, PAGE, DATA, R);
    prepare(&mem, VIRTIO_BLK_T_OUT, 2);
    let faults = dev.counters().faults_raised;
    drv.post(&[
        r(HDR, 16),
        r(DATA_IOVA, 512),
        r(DATA_IOVA + PAGE, 512),
        w(STATUS, 1),
    ]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, IOERR));
    assert!(
        dev.counters().faults_raised > faults,
        "the IOMMU saw the fault"
    );
    assert_eq!(img.contents(), before, "file untouched");
    assert_eq!(t.status() & device_status::DEVICE_NEEDS_RESET, 0);

    // Once the guest maps it, the same request goes through, translated.
    map(&mut g, &mut dev, DATA_IOVA + PAGE, PAGE, DATA + PAGE, R);
    prepare(&mem, VIRTIO_BLK_T_OUT, 2);
    drv.post(&[
        r(HDR, 16),
        r(DATA_IOVA, 512),
        r(DATA_IOVA + PAGE, 512),
        w(STATUS, 1),
    ]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, OK));
    assert_eq!(img.contents()[2 * 512..4 * 512], [0xee; 1024]);
}

#[test]
fn blk_read_into_unmapped_or_read_only_mapped_buffer_is_ioerr_and_ram_untouched() {
    let (mut dev, mut g) = iommu();
    let img = TempImage::new("iommu-r", &pattern(64 * 512, 6));
    let mem = g.mem.clone();
    let mut drv = driver(&mem);
    let mut t = blk_behind_iommu(&img, &dev, &g, &drv);
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();

    // Not mapped at all.
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let faults = dev.counters().faults_raised;
    drv.post(&[r(HDR, 16), w(DATA_IOVA, 512), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, IOERR));
    assert!(dev.counters().faults_raised > faults);

    // Mapped, but only for the device to read: writing into it is denied.
    map(&mut g, &mut dev, DATA_IOVA, PAGE, DATA, R);
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let faults = dev.counters().faults_raised;
    drv.post(&[r(HDR, 16), w(DATA_IOVA, 512), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, IOERR));
    assert!(dev.counters().faults_raised > faults);
    let mut ram_now = [0u8; 512];
    mem.read_slice(&mut ram_now, GuestAddress(DATA)).unwrap();
    assert_eq!(ram_now, [0x5a; 512], "guest RAM untouched");

    // A header the device may not read: IOERR as well.
    unmap(&mut g, &mut dev, HDR, PAGE);
    prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
    drv.post(&[r(HDR, 16), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, IOERR));
}

#[test]
fn blk_round_trip_behind_iommu_goes_through_the_guests_mappings() {
    let (mut dev, mut g) = iommu();
    let img = TempImage::new("iommu-rt", &vec![0u8; 64 * 512]);
    let mem = g.mem.clone();
    let mut drv = driver(&mem);
    let mut t = blk_behind_iommu(&img, &dev, &g, &drv);
    // Two IOVA pages backed by two distant guest pages.
    map(&mut g, &mut dev, DATA_IOVA, PAGE, DATA + 0x5000, RW);
    map(&mut g, &mut dev, DATA_IOVA + PAGE, PAGE, DATA + 0x1000, RW);
    let data = pattern(2 * PAGE as usize, 9);
    mem.write_slice(&data[..PAGE as usize], GuestAddress(DATA + 0x5000))
        .unwrap();
    mem.write_slice(&data[PAGE as usize..], GuestAddress(DATA + 0x1000))
        .unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 8);
    drv.post(&[r(HDR, 16), r(DATA_IOVA, 2 * PAGE as u32), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, OK));
    assert_eq!(
        img.contents()[8 * 512..8 * 512 + 2 * PAGE as usize],
        data[..]
    );

    // Read it back into a third mapping.
    map(
        &mut g,
        &mut dev,
        DATA_IOVA + 0x10_0000,
        2 * PAGE,
        DATA + 0x20_0000,
        W,
    );
    prepare(&mem, VIRTIO_BLK_T_IN, 8);
    drv.post(&[
        r(HDR, 16),
        w(DATA_IOVA + 0x10_0000, 2 * PAGE as u32),
        w(STATUS, 1),
    ]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1 + 2 * PAGE as u32, OK));
    let mut back = vec![0u8; 2 * PAGE as usize];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x20_0000))
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(t.device().counters().ok, 2);
}

#[test]
fn blk_unmapped_status_byte_gets_used_len_zero_and_no_io() {
    let (mut dev, mut g) = iommu();
    let img = TempImage::new("iommu-st", &pattern(64 * 512, 4));
    let before = img.contents();
    let mem = g.mem.clone();
    let mut drv = driver(&mem);
    let mut t = blk_behind_iommu(&img, &dev, &g, &drv);
    map(&mut g, &mut dev, DATA_IOVA, PAGE, DATA, R);
    mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let faults = dev.counters().faults_raised;
    // The status byte at an IOVA nobody mapped.
    drv.post(&[r(HDR, 16), r(DATA_IOVA, 512), w(DATA_IOVA + 0x10_0000, 1)]);
    kick(&mut t);
    assert_eq!(drv.one(), 0);
    assert!(dev.counters().faults_raised > faults);
    assert_eq!(img.contents(), before, "not carried out");
    assert_eq!(t.device().counters().dropped, 1);
}

#[test]
fn blk_ring_unmapped_after_driver_ok_makes_kicks_do_nothing_without_panic() {
    let (mut dev, mut g) = iommu();
    let img = TempImage::new("iommu-ring", &[0u8; 4096]);
    let mem = g.mem.clone();
    let mut drv = driver(&mem);
    let mut t = blk_behind_iommu(&img, &dev, &g, &drv);
    unmap(&mut g, &mut dev, RING, RING_LEN);
    prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
    drv.post(&[r(HDR, 16), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!(status(&mem), 0xff, "the device could not see the request");
    assert_eq!(drv.used_idx(), 0);
}

#[test]
fn rng_unmapped_buffer_gets_used_len_zero_faults_and_mapped_one_is_filled() {
    let (mut dev, mut g) = iommu();
    let mem = g.mem.clone();
    let iomem = endpoint_memory(&dev, &g);
    let mut rng = Rng::new(&RngConfig {
        access_platform: true,
        ..RngConfig::default()
    })
    .unwrap();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    mem.write_slice(&[0u8; 64], GuestAddress(DATA)).unwrap();

    let faults = dev.counters().faults_raised;
    drv.post(&[w(DATA_IOVA, 64)]);
    rng.process_queue(0, &mut q, &iomem).unwrap();
    assert_eq!(drv.one(), 0);
    assert!(dev.counters().faults_raised > faults);
    let mut b = [0u8; 64];
    mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b, [0; 64], "guest RAM untouched");

    map(&mut g, &mut dev, DATA_IOVA, PAGE, DATA, W);
    drv.post(&[w(DATA_IOVA, 64)]);
    rng.process_queue(0, &mut q, &iomem).unwrap();
    assert_eq!(drv.one(), 64);
    mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b.iter().any(|&x| x != 0), "filled through the mapping");
}
