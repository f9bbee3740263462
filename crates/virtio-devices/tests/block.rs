//! virtio-blk driven directly through `process_queue` with chains posted by the test
//! kit's split-ring driver, against temporary image files: the request types, every
//! refusal (and that a refused request leaves the file as it was), and chains no
//! driver should send.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use test_kit::ring::{desc, indirect, F_INDIRECT, F_NEXT as NEXT};
use virtio_bindings::virtio_blk::*;
use virtio_contract::{DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_devices::block::request::{MAX_DATA_BYTES, SEG_MAX};
use virtio_devices::block::{Block, BlockConfig, BlockError};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A 64-sector image of patterned bytes and a device on it.
fn disk(tag: &str, read_only: bool) -> (TempImage, Block) {
    let img = TempImage::new(tag, &pattern(64 * 512, 7));
    let dev = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only,
        access_platform: false,
        test_stray_sector: None,
    })
    .unwrap();
    (img, dev)
}

/// Posts `descs`, runs the device, returns (used length, status byte).
fn run(
    dev: &mut Block,
    drv: &mut Driver,
    q: &mut Queue,
    mem: &Mem,
    descs: &[RawDescriptor],
) -> (u32, u8) {
    drv.post(descs);
    assert!(dev.process_queue(0, q, mem).unwrap(), "interrupt wanted");
    (drv.one(), status(mem))
}

#[test]
fn blk_offers_version_1_event_idx_indirect_flush_seg_max_size_max_blk_size_and_ro_only_when_read_only(
) {
    let (_img, rw) = disk("feat-rw", false);
    let f = DeviceIdentity::device_features(&rw);
    for bit in [
        VIRTIO_F_VERSION_1,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_F_ACCESS_PLATFORM), 0);
    let (_img2, ro) = disk("feat-ro", true);
    assert_ne!(
        DeviceIdentity::device_features(&ro) & (1 << VIRTIO_BLK_F_RO),
        0
    );
    assert_eq!(DeviceIdentity::device_type(&rw), 2);
    assert_eq!(DeviceIdentity::queue_max_sizes(&rw), &[256]);
    assert!(DeviceIdentity::config_size(&rw) >= 24);
    assert_eq!(rw.capacity(), 64);
}

#[test]
fn blk_read_returns_the_file_bytes_and_counts_data_plus_status() {
    let (img, mut dev) = disk("read", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    prepare(&mem, VIRTIO_BLK_T_IN, 3);
    // Data split over two descriptors, status in its own.
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA + 0x1000, 1024),
            w(STATUS, 1),
        ],
    );
    assert_eq!((used, st), (1536 + 1, OK));
    let file = img.contents();
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, file[3 * 512..4 * 512]);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, file[4 * 512..6 * 512]);
}

#[test]
fn blk_write_then_read_round_trips_through_the_file() {
    let (img, mut dev) = disk("roundtrip", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    let data = pattern(3 * 512, 99);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 10);
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), r(DATA, 1024), r(DATA + 1024, 512), w(STATUS, 1)],
    );
    assert_eq!((used, st), (1, OK));
    let mut expect = pattern(64 * 512, 7);
    expect[10 * 512..13 * 512].copy_from_slice(&data);
    assert_eq!(
        img.contents(),
        expect,
        "exactly the written sectors changed"
    );

    prepare(&mem, VIRTIO_BLK_T_IN, 10);
    let back = DATA + 0x10_0000;
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(back, 1536), w(STATUS, 1)],
    );
    assert_eq!((used, st), (1537, OK));
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, data);
    assert_eq!(dev.counters().ok, 2);
}

#[test]
fn blk_large_request_moves_whole_and_header_may_span_descriptors() {
    // 1 MiB in one descriptor; header split 8 + 8; the status byte shares the last
    // writable descriptor with data.
    let img = TempImage::new("large", &vec![0u8; 4 << 20]);
    let mut dev = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: false,
        access_platform: false,
        test_stray_sector: None,
    })
    .unwrap();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    let data = pattern(1 << 20, 3);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 100);
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 8), r(HDR + 8, 8), r(DATA, 1 << 20), w(STATUS, 1)],
    );
    assert_eq!((used, st), (1, OK));
    assert_eq!(img.contents()[100 * 512..100 * 512 + (1 << 20)], data[..]);

    // Read it back into one descriptor holding data and status.
    let back = DATA + 0x20_0000;
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 100), GuestAddress(HDR))
        .unwrap();
    drv.post(&[r(HDR, 16), w(back, (1 << 20) + 1)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), (1 << 20) + 1);
    let mut got = vec![0u8; 1 << 20];
    mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, data);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(back + (1 << 20))).unwrap(),
        OK
    );
}

#[test]
fn blk_write_past_capacity_is_ioerr_and_file_untouched() {
    let (img, mut dev) = disk("past-cap", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    mem.write_slice(&[0xee; 1024], GuestAddress(DATA)).unwrap();
    for sector in [63, 64, 1 << 40, u64::MAX / 512, u64::MAX - 1, u64::MAX] {
        prepare(&mem, VIRTIO_BLK_T_OUT, sector);
        let (used, st) = run(
            &mut dev,
            &mut drv,
            &mut q,
            &mem,
            &[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)],
        );
        assert_eq!((used, st), (1, IOERR), "sector {sector}");
    }
    assert_eq!(img.contents(), before);
}

#[test]
fn blk_read_past_capacity_is_ioerr_and_writes_no_data() {
    let (_img, mut dev) = disk("read-past", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    for sector in [64, 63, u64::MAX] {
        mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
        prepare(&mem, VIRTIO_BLK_T_IN, sector);
        let (used, st) = run(
            &mut dev,
            &mut drv,
            &mut q,
            &mem,
            &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)],
        );
        assert_eq!((used, st), (1, IOERR), "sector {sector}");
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x5a; 1024]);
    }
    // The last sector itself is inside.
    prepare(&mem, VIRTIO_BLK_T_IN, 63);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
    );
    assert_eq!(st, OK);
}

#[test]
fn blk_write_on_read_only_disk_is_ioerr_and_file_untouched() {
    let (img, mut dev) = disk("ro", true);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
    );
    assert_eq!((used, st), (1, IOERR));
    assert_eq!(img.contents(), before);
    // Reads, flushes and GET_ID still work.
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID] {
        prepare(&mem, t, 0);
        let descs: &[_] = if t == VIRTIO_BLK_T_FLUSH {
            &[r(HDR, 16), w(STATUS, 1)]
        } else {
            &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]
        };
        let (_, st) = run(&mut dev, &mut drv, &mut q, &mem, descs);
        assert_eq!(st, OK, "type {t}");
    }
}

#[test]
fn blk_read_only_image_is_opened_read_only() {
    let img = TempImage::new("ro-perm", &[0u8; 1024]);
    let mut perm = std::fs::metadata(img.path()).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(img.path(), perm).unwrap();
    let ro = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: true,
        access_platform: false,
        test_stray_sector: None,
    });
    assert!(ro.is_ok(), "O_RDONLY needs no write permission");
    // Root may open anything read-write, so the converse is only checked where it holds.
    let rw = std::fs::OpenOptions::new().write(true).open(img.path());
    if rw.is_err() {
        assert!(matches!(
            Block::new(&BlockConfig {
                path: img.path().to_path_buf(),
                read_only: false,
                access_platform: false,
                test_stray_sector: None,
            }),
            Err(BlockError::Open { .. })
        ));
    }
}

#[test]
fn blk_flush_is_ok_with_and_without_negotiated_writeback() {
    let (_img, mut dev) = disk("flush", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    for acked in [0u64, 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_F_VERSION_1] {
        DeviceIdentity::set_acked_features(&mut dev, acked);
        prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let (used, st) = run(
            &mut dev,
            &mut drv,
            &mut q,
            &mem,
            &[r(HDR, 16), w(STATUS, 1)],
        );
        assert_eq!((used, st), (1, OK));
        // A write in either cache mode completes OK.
        prepare(&mem, VIRTIO_BLK_T_OUT, 1);
        let (_, st) = run(
            &mut dev,
            &mut drv,
            &mut q,
            &mem,
            &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
        );
        assert_eq!(st, OK);
    }
}

#[test]
fn blk_get_id_returns_the_file_name_zero_padded() {
    let (img, mut dev) = disk("id", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    prepare(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)],
    );
    assert_eq!((used, st), (21, OK));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let name = img.path().file_name().unwrap().to_str().unwrap().as_bytes();
    let n = name.len().min(20);
    assert_eq!(&id[..n], &name[..n]);
    assert!(id[n..].iter().all(|&b| b == 0), "zero padded");
    assert_eq!(&id, dev.id());

    // A short name is padded with zeros.
    let dir = std::env::temp_dir().join(format!("vdev-{}-id", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("s.img");
    std::fs::write(&short, [0u8; 512]).unwrap();
    let dev2 = Block::new(&BlockConfig {
        path: short,
        read_only: true,
        access_platform: false,
        test_stray_sector: None,
    });
    std::fs::remove_dir_all(&dir).unwrap();
    let dev2 = dev2.unwrap();
    assert_eq!(&dev2.id()[..5], b"s.img");
    assert_eq!(&dev2.id()[5..], &[0u8; 15]);
}

#[test]
fn blk_unsupported_types_are_unsupp_and_touch_nothing() {
    let (img, mut dev) = disk("unsupp", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    for t in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_SECURE_ERASE,
        VIRTIO_BLK_T_ZONE_RESET_ALL,
        0xdead_beef,
    ] {
        prepare(&mem, t, 0);
        let (used, st) = run(
            &mut dev,
            &mut drv,
            &mut q,
            &mem,
            &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
        );
        assert_eq!((used, st), (1, UNSUPP), "type {t:#x}");
    }
    assert_eq!(img.contents(), before);
    assert_eq!(dev.counters().unsupp, 6);
}

#[test]
fn blk_data_not_a_multiple_of_512_is_ioerr_and_file_untouched() {
    let (img, mut dev) = disk("unaligned", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), r(DATA, 511), w(STATUS, 1)],
    );
    assert_eq!(st, IOERR);
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(DATA, 513), w(STATUS, 1)],
    );
    assert_eq!(st, IOERR);
    assert_eq!(img.contents(), before);
}

#[test]
fn blk_request_beyond_seg_max_times_size_max_is_ioerr_before_touching_memory() {
    let (img, mut dev) = disk("too-large", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    // 8 MiB + 512 of data, most of it outside guest RAM: refused on length alone.
    let big = (MAX_DATA_BYTES + 512) as u32;
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), r(DATA, big), w(STATUS, 1)],
    );
    assert_eq!(st, IOERR);
    // More descriptors than seg_max + 2: returned unused.
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..SEG_MAX + 1).map(|i| r(DATA + 512 * u64::from(i), 512)));
    descs.push(w(STATUS, 1));
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    drv.post(&descs);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 0);
    assert_eq!(status(&mem), 0xff, "status untouched");
    assert_eq!(img.contents(), before);
}

#[test]
fn blk_chain_without_a_status_byte_is_returned_with_used_len_zero() {
    let (img, mut dev) = disk("no-status", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    for descs in [
        vec![r(HDR, 16), r(DATA, 512)],
        vec![r(HDR, 16), r(DATA, 512), w(STATUS, 0)],
    ] {
        drv.post(&descs);
        dev.process_queue(0, &mut q, &mem).unwrap();
        assert_eq!(drv.one(), 0, "{descs:?}");
    }
    assert_eq!(
        img.contents(),
        before,
        "a write without status is not carried out"
    );
    assert_eq!(dev.counters().dropped, 2);
}

#[test]
fn blk_header_shorter_than_16_bytes_is_ioerr() {
    let (_img, mut dev) = disk("short-hdr", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    for descs in [
        vec![r(HDR, 15), w(STATUS, 1)],
        vec![w(DATA, 512), w(STATUS, 1)],
        vec![w(STATUS, 1)],
    ] {
        prepare(&mem, VIRTIO_BLK_T_IN, 0);
        let (used, st) = run(&mut dev, &mut drv, &mut q, &mem, &descs);
        assert_eq!((used, st), (1, IOERR), "{descs:?}");
    }
}

#[test]
fn blk_readable_descriptor_after_a_writable_one_is_returned_unused() {
    let (img, mut dev) = disk("misordered", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    drv.post(&[r(HDR, 16), w(STATUS, 1), r(DATA, 512)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 0);
    assert_eq!(status(&mem), 0xff);
    assert_eq!(img.contents(), before);
}

#[test]
fn blk_buffers_outside_guest_ram_fail_the_request_not_the_device() {
    let (img, mut dev) = disk("outside", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    let end = RAM_SIZE as u64;
    // Data (partly) outside RAM: IOERR, file untouched.
    for data in [r(end, 512), r(end - 256, 512), r(u64::MAX - 255, 512)] {
        prepare(&mem, VIRTIO_BLK_T_OUT, 0);
        let (used, st) = run(
            &mut dev,
            &mut drv,
            &mut q,
            &mem,
            &[r(HDR, 16), data, w(STATUS, 1)],
        );
        assert_eq!((used, st), (1, IOERR));
    }
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(end - 256, 512), w(STATUS, 1)],
    );
    assert_eq!(st, IOERR);
    // Header outside RAM: IOERR.
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(end, 16), w(STATUS, 1)],
    );
    assert_eq!(st, IOERR);
    // Status outside RAM: nothing done, used length 0.
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    drv.post(&[r(HDR, 16), r(DATA, 512), w(end, 1)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 0);
    assert_eq!(img.contents(), before);
    // The device still works.
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
    );
    assert_eq!(st, OK);
}

#[test]
fn blk_open_rejects_images_that_are_not_whole_sectors_naming_the_file() {
    let img = TempImage::new("odd", &[0u8; 1000]);
    let err = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: false,
        access_platform: false,
        test_stray_sector: None,
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::UnalignedSize { len: 1000, .. }));
    assert!(
        err.to_string().contains(img.path().to_str().unwrap()),
        "{err}"
    );

    let missing = std::env::temp_dir().join("vdev-no-such-image.img");
    let err = Block::new(&BlockConfig {
        path: missing.clone(),
        read_only: true,
        access_platform: false,
        test_stray_sector: None,
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains("vdev-no-such-image.img"), "{err}");

    let err = Block::new(&BlockConfig {
        path: std::env::temp_dir(),
        read_only: true,
        access_platform: false,
        test_stray_sector: None,
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::NotAnImage { .. }), "{err}");
}

#[test]
fn blk_empty_image_has_capacity_zero_and_refuses_every_transfer() {
    let img = TempImage::new("empty", &[]);
    let mut dev = Block::new(&BlockConfig {
        path: img.path().to_path_buf(),
        read_only: false,
        access_platform: true,
        test_stray_sector: None,
    })
    .unwrap();
    assert_eq!(dev.capacity(), 0);
    assert_ne!(
        DeviceIdentity::device_features(&dev) & (1 << VIRTIO_F_ACCESS_PLATFORM),
        0
    );
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
    );
    assert_eq!(st, IOERR);
    assert!(img.contents().is_empty());
}

#[test]
fn blk_processes_every_posted_chain_in_one_call_and_other_queues_are_ignored() {
    let (_img, mut dev) = disk("batch", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    // Eight FLUSH chains of two descriptors each, one avail update.
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
        .unwrap();
    let mut descs = Vec::new();
    for i in 0..8u16 {
        descs.push(desc(HDR, 16, NEXT, 2 * i + 1));
        descs.push(desc(STATUS + u64::from(i), 1, F_WRITE, 0));
    }
    drv.post_raw(0, &descs);
    assert!(!dev.process_queue(1, &mut q, &mem).unwrap(), "no queue 1");
    assert!(dev.process_queue(0, &mut q, &mem).unwrap());
    let done = drv.take_used();
    assert_eq!(done.len(), 8);
    assert!(done.iter().all(|&(_, len)| len == 1));
    assert!(
        !dev.process_queue(0, &mut q, &mem).unwrap(),
        "nothing new: no interrupt"
    );
}

mod hostile {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(HDR),
            Just(STATUS),
            (0u64..0x4000).prop_map(|o| DATA + o),
            Just(RAM_SIZE as u64 - 8),
            Just(RAM_SIZE as u64),
            Just(u64::MAX - 7),
            any::<u64>(),
        ]
    }

    fn len() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(15),
            Just(16),
            Just(512),
            Just(513),
            Just(0x1000),
            Just(u32::MAX),
            any::<u32>(),
        ]
    }

    fn desc() -> impl Strategy<Value = RawDescriptor> {
        // WRITE and INDIRECT flags at random; NEXT is set by the kit's chain builder.
        (addr(), len(), 0u16..8)
            .prop_map(|(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f & !1, 0)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Whatever chain and header the guest posts, the device completes it without
        /// panicking or failing the queue, and a read-only image never changes.
        #[test]
        fn blk_hostile_chains_never_panic_and_never_write_a_read_only_disk(
            descs in proptest::collection::vec(desc(), 1..8),
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), any::<u32>()],
            sector in prop_oneof![0u64..70, any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let (img, mut dev) = disk("hostile", read_only);
            let before = img.contents();
            let mem = ram();
            let mut drv = driver(&mem);
            let mut q = drv.queue();
            prepare(&mem, t, sector);
            mem.write_slice(&pattern(0x4000, 1), GuestAddress(DATA)).unwrap();
            drv.post(&descs);
            prop_assert!(dev.process_queue(0, &mut q, &mem).is_ok());
            prop_assert_eq!(drv.take_used().len(), 1);
            if read_only {
                prop_assert_eq!(img.contents(), before);
            }
        }
    }
}

#[test]
fn blk_direct_io_moves_only_the_translated_segments() {
    // The image goes straight to guest memory (preadv over the segments) and back
    // (pwritev): bytes next to each segment, in memory and in the file, stay as they were.
    let (img, mut dev) = disk("direct", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    let canary = vec![0xaau8; 0x4000];
    mem.write_slice(&canary, GuestAddress(DATA)).unwrap();
    // Three segments of 1, 2 and 1 sectors with gaps between them.
    let segs = [
        (DATA + 0x200, 512u32),
        (DATA + 0x1000, 1024),
        (DATA + 0x3000, 512),
    ];
    prepare(&mem, VIRTIO_BLK_T_IN, 4);
    let mut descs = vec![r(HDR, 16)];
    descs.extend(segs.iter().map(|&(a, l)| w(a, l)));
    descs.push(w(STATUS, 1));
    let (used, st) = run(&mut dev, &mut drv, &mut q, &mem, &descs);
    assert_eq!((used, st), (2048 + 1, OK));
    let image = img.contents();
    let mut got = vec![0u8; 0x4000];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let mut at = 4 * 512;
    let mut expected = canary.clone();
    for &(a, l) in &segs {
        let o = (a - DATA) as usize;
        expected[o..o + l as usize].copy_from_slice(&image[at..at + l as usize]);
        at += l as usize;
    }
    assert_eq!(
        got, expected,
        "the segments hold sectors 4-7, every other byte its canary"
    );

    // And back out to sectors 20-23 from the same scattered segments.
    let fresh = pattern(2048, 9);
    let mut from = 0;
    for &(a, l) in &segs {
        mem.write_slice(&fresh[from..from + l as usize], GuestAddress(a))
            .unwrap();
        from += l as usize;
    }
    prepare(&mem, VIRTIO_BLK_T_OUT, 20);
    let mut descs = vec![r(HDR, 16)];
    descs.extend(segs.iter().map(|&(a, l)| r(a, l)));
    descs.push(w(STATUS, 1));
    let (used, st) = run(&mut dev, &mut drv, &mut q, &mem, &descs);
    assert_eq!((used, st), (1, OK));
    let after = img.contents();
    let mut want = image.clone();
    want[20 * 512..24 * 512].copy_from_slice(&fresh);
    assert_eq!(after, want, "sectors 20-23 written, nothing else");
}

const TABLE: u64 = DATA + 0x10_0000;

#[test]
fn blk_indirect_chains_are_served() {
    let (img, mut dev) = disk("indirect", false);
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    prepare(&mem, VIRTIO_BLK_T_IN, 3);
    // The table: header, data, status linked 0 -> 1 -> 2; one descriptor points at it.
    drv.add_indirect(TABLE, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    drv.publish();
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 513);
    assert_eq!(status(&mem), OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, img.contents()[3 * 512..4 * 512]);
}

#[test]
fn blk_hostile_indirect_tables_are_refused_without_a_panic() {
    let (img, mut dev) = disk("indirect-hostile", false);
    let before = img.contents();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    mem.write_slice(&pattern(512, 5), GuestAddress(DATA))
        .unwrap();
    let hostile: [(&str, Vec<RawDescriptor>, u32); 4] = [
        // A table inside a table (§2.7.5.3.1: the driver MUST NOT nest them).
        (
            "nested",
            vec![
                desc(HDR, 16, NEXT, 1),
                desc(TABLE + 0x100, 48, F_INDIRECT, 0),
            ],
            32,
        ),
        // A length that is not a whole number of descriptors.
        ("bad length", vec![desc(HDR, 16, NEXT, 1)], 20),
        // A loop: 0 -> 1 -> 0 -> ...
        (
            "loop",
            vec![desc(HDR, 16, NEXT, 1), desc(DATA, 512, NEXT, 0)],
            32,
        ),
        // No status byte anywhere in a table of nothing but readable descriptors.
        (
            "no status",
            vec![desc(HDR, 16, NEXT, 1), desc(DATA, 512, 0, 0)],
            32,
        ),
    ];
    for (what, descs, len) in hostile {
        prepare(&mem, VIRTIO_BLK_T_OUT, 0);
        drv.write_table(TABLE, &descs);
        drv.post_raw(0, &[indirect(TABLE, len)]);
        dev.process_queue(0, &mut q, &mem).unwrap();
        assert_eq!(drv.one(), 0, "{what}: returned unused");
        assert_eq!(img.contents(), before, "{what}: the file is untouched");
    }
    // A table past the end of guest RAM.
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    drv.post_raw(0, &[indirect(RAM_SIZE as u64 + 0x1000, 48)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 0, "past RAM: returned unused");
    assert_eq!(img.contents(), before);
    // The device still serves a good request.
    prepare(&mem, VIRTIO_BLK_T_IN, 1);
    let (used, st) = run(
        &mut dev,
        &mut drv,
        &mut q,
        &mem,
        &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
    );
    assert_eq!((used, st), (513, OK));
}
