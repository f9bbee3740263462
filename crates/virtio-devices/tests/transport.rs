//! Both devices on a modern virtio-pci function, driven as Linux's virtio_pci driver
//! drives one (crates/virtio-pci/tests/transport.rs): negotiate features including
//! ACCESS_PLATFORM, read the device configuration through BAR 0, set up the queue,
//! DRIVER_OK, kick, take the interrupt, reset.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_contract::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use virtio_devices::{block, rng, Block, BlockConfig, Rng, RngConfig};
use virtio_pci::{device_status, VirtioPciTransport};
use vm_memory::{Bytes, GuestAddress};

const AP: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const EI: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const LIVE: u64 = (device_status::ACKNOWLEDGE
    | device_status::DRIVER
    | device_status::FEATURES_OK
    | device_status::DRIVER_OK) as u64;

fn blk_transport(img: &TempImage, mem: Mem) -> (VirtioPciTransport<Block, Mem>, Arc<Irqs>) {
    let dev = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: false,
        access_platform: true,
        test_stray_sector: None,
    })
    .unwrap();
    let irqs = Irqs::new();
    let t = VirtioPciTransport::new(dev, block::PCI_CLASS_CODE, mem, irqs.sink(), AP).unwrap();
    (t, irqs)
}

fn rng_transport(config: RngConfig, mem: Mem) -> (VirtioPciTransport<Rng, Mem>, Arc<Irqs>) {
    let irqs = Irqs::new();
    let t = VirtioPciTransport::new(
        Rng::new(&config).unwrap(),
        rng::PCI_CLASS_CODE,
        mem,
        irqs.sink(),
        AP,
    )
    .unwrap();
    (t, irqs)
}

#[test]
fn blk_through_virtio_pci_negotiates_reads_config_and_round_trips_data() {
    let img = TempImage::new("pci-blk", &pattern(128 * 512, 1));
    let mem = ram();
    let (mut t, irqs) = blk_transport(&img, mem.clone());
    let mut c = [0u8; 4];
    t.read_config_space(0x02, &mut c[..2]);
    assert_eq!(u16::from_le_bytes([c[0], c[1]]), 0x1040 + 2, "virtio-blk");

    let want = V1
        | AP
        | EI
        | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE;
    let (offered, ok) = negotiate(&mut t, want);
    assert!(ok, "FEATURES_OK accepted");
    assert_eq!(
        offered, want,
        "exactly these are offered for a writable disk"
    );
    assert_eq!(t.device().acked_features(), want);
    // virtio_cread64 of capacity as two 32-bit reads, then the limits.
    let cap = bar_read(&mut t, 0x2000, 4) | bar_read(&mut t, 0x2004, 4) << 32;
    assert_eq!(cap, 128);
    assert_eq!(bar_read(&mut t, 0x2008, 4), 64 << 10, "size_max");
    assert_eq!(bar_read(&mut t, 0x200c, 4), 128, "seg_max");
    assert_eq!(bar_read(&mut t, 0x2014, 4), 512, "blk_size");

    let mut drv = driver(&mem);
    start(&mut t, &drv);
    assert_eq!(t.status() as u64, LIVE);

    let data = pattern(4096, 77);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 40);
    drv.post(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!(drv.one(), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    assert_eq!(irqs.vectors(), vec![1], "queue vector");
    assert_eq!(bar_read(&mut t, 0x1000, 1), 1, "ISR queue bit");
    assert_eq!(img.contents()[40 * 512..48 * 512], data[..]);

    prepare(&mem, VIRTIO_BLK_T_IN, 40);
    drv.post(&[r(HDR, 16), w(DATA + 0x10_0000, 4096), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!(drv.one(), 4097);
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x10_0000))
        .unwrap();
    assert_eq!(back, data);

    prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
    drv.post(&[r(HDR, 16), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!((drv.one(), status(&mem)), (1, VIRTIO_BLK_S_OK as u8));

    // A hostile request changes nothing about the function's state.
    prepare(&mem, VIRTIO_BLK_T_OUT, u64::MAX);
    drv.post(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    kick(&mut t);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(t.status() as u64, LIVE, "no DEVICE_NEEDS_RESET");

    bar_write(&mut t, 0x14, 0, 1);
    assert_eq!(t.status(), 0);
    assert_eq!(t.device().acked_features(), 0, "reset forgets features");
}

#[test]
fn blk_read_only_disk_offers_ro_through_virtio_pci() {
    let img = TempImage::new("pci-ro", &[0u8; 4096]);
    let dev = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: true,
        access_platform: true,
        test_stray_sector: None,
    })
    .unwrap();
    let irqs = Irqs::new();
    let mut t =
        VirtioPciTransport::new(dev, block::PCI_CLASS_CODE, ram(), irqs.sink(), AP).unwrap();
    let (offered, ok) = negotiate(&mut t, V1 | AP | 1 << VIRTIO_BLK_F_RO);
    assert!(ok);
    assert_ne!(offered & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn rng_through_virtio_pci_fills_the_buffer_and_interrupts() {
    let mem = ram();
    let (mut t, irqs) = rng_transport(
        RngConfig {
            access_platform: true,
            ..RngConfig::default()
        },
        mem.clone(),
    );
    let (offered, ok) = negotiate(&mut t, V1 | AP);
    assert!(ok);
    assert_eq!(offered, V1 | AP | EI);
    let mut drv = driver(&mem);
    start(&mut t, &drv);
    mem.write_slice(&[0u8; 64], GuestAddress(DATA)).unwrap();
    drv.post(&[w(DATA, 64)]);
    kick(&mut t);
    assert_eq!(drv.one(), 64);
    let mut b = [0u8; 64];
    mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b.iter().any(|&x| x != 0));
    assert_eq!(irqs.vectors(), vec![1]);
}

#[test]
fn rng_without_access_platform_cannot_reach_features_ok_on_a_transport_that_requires_it() {
    for want in [V1, V1 | AP] {
        let (mut t, _) = rng_transport(RngConfig::default(), ram());
        let (offered, ok) = negotiate(&mut t, want);
        assert_eq!(offered, V1 | EI);
        assert!(!ok, "{want:#x}: FEATURES_OK refused");
    }
}

#[test]
fn rng_whose_source_fails_is_marked_needs_reset_not_hung() {
    let img = TempImage::new("pci-dry", &[1u8; 8]);
    let mem = ram();
    let (mut t, irqs) = rng_transport(
        RngConfig {
            source: img.path().to_path_buf(),
            access_platform: true,
        },
        mem.clone(),
    );
    assert!(negotiate(&mut t, V1 | AP).1);
    let mut drv = driver(&mem);
    start(&mut t, &drv);
    drv.post(&[w(DATA, 64)]);
    kick(&mut t);
    assert_eq!(drv.one(), 0, "chain returned");
    assert_ne!(t.status() & device_status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(irqs.vectors(), vec![0], "config vector: status changed");
}
