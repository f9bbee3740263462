//! virtio-rng driven directly through `process_queue` with chains posted by the test
//! kit's split-ring driver: buffers are filled, requests and calls are bounded, and
//! chains it cannot use or a failing source never panic.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use virtio_contract::{
    DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use virtio_devices::rng::{MAX_BYTES_PER_CALL, MAX_REQUEST_BYTES};
use virtio_devices::{Rng, RngConfig, RngError};
use vm_memory::{Bytes, GuestAddress};

fn rng() -> Rng {
    Rng::new(&RngConfig::default()).unwrap()
}

/// Whether `len` bytes at `addr` differ from the `fill` byte they were set to (random
/// bytes all equal to it: probability 2^-8len).
fn changed(mem: &Mem, addr: u64, len: usize, fill: u8) -> bool {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b.iter().any(|&x| x != fill)
}

#[test]
fn rng_fills_every_writable_buffer_and_reports_the_bytes_written() {
    let mut dev = rng();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    mem.write_slice(&[0u8; 0x3000], GuestAddress(DATA)).unwrap();
    drv.post(&[w(DATA, 64), w(DATA + 0x1000, 32), w(DATA + 0x2000, 16)]);
    assert!(dev.process_queue(0, &mut q, &mem).unwrap());
    assert_eq!(drv.one(), 112);
    assert!(changed(&mem, DATA, 64, 0));
    assert!(changed(&mem, DATA + 0x1000, 32, 0));
    assert!(changed(&mem, DATA + 0x2000, 16, 0));
    // Two requests get different bytes.
    drv.post(&[w(DATA + 0x4000, 64)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 64);
    let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut b, GuestAddress(DATA + 0x4000)).unwrap();
    assert_ne!(a, b);
}

#[test]
fn rng_caps_one_request_at_max_request_bytes() {
    let mut dev = rng();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    let big = 4 * MAX_REQUEST_BYTES;
    mem.write_slice(&vec![0u8; big], GuestAddress(DATA))
        .unwrap();
    drv.post(&[w(DATA, big as u32)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one() as usize, MAX_REQUEST_BYTES);
    assert!(
        !changed(
            &mem,
            DATA + MAX_REQUEST_BYTES as u64,
            big - MAX_REQUEST_BYTES,
            0
        ),
        "nothing past the cap is written"
    );
}

#[test]
fn rng_budget_per_call_bounds_bytes_but_still_completes_every_chain() {
    let mut dev = rng();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    // 32 single-descriptor chains of 64 KiB: 2 MiB asked, twice the per-call budget.
    let n = 2 * MAX_BYTES_PER_CALL / MAX_REQUEST_BYTES;
    let descs: Vec<_> = (0..n as u64)
        .map(|i| {
            w(
                DATA + i * MAX_REQUEST_BYTES as u64,
                MAX_REQUEST_BYTES as u32,
            )
        })
        .collect();
    drv.post_raw(0, &descs);
    dev.process_queue(0, &mut q, &mem).unwrap();
    let done = drv.take_used();
    assert_eq!(done.len(), n, "every chain completed");
    let total: usize = done.iter().map(|&(_, len)| len as usize).sum();
    assert_eq!(
        total,
        MAX_BYTES_PER_CALL + n / 2,
        "budget, then one byte each"
    );
    assert!(done[n / 2..].iter().all(|&(_, len)| len == 1));
}

#[test]
fn rng_chains_it_cannot_use_get_used_len_zero() {
    let mut dev = rng();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    for descs in [
        vec![r(DATA, 64)],                         // nothing writable
        vec![w(DATA, 0)],                          // empty
        vec![w(RAM_SIZE as u64, 64)],              // outside RAM
        vec![w(DATA, 16), w(RAM_SIZE as u64, 16)], // partly outside RAM
        vec![w(DATA, 16), r(DATA + 0x100, 16)],    // misordered
        vec![w(u64::MAX - 3, 16)],                 // overflowing
    ] {
        drv.post(&descs);
        dev.process_queue(0, &mut q, &mem).unwrap();
        assert_eq!(drv.one(), 0, "{descs:?}");
    }
    // Readable descriptors before the writable ones are ignored.
    drv.post(&[r(DATA, 8), w(DATA + 0x100, 8)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 8);
}

#[test]
fn rng_offers_version_1_event_idx_and_access_platform_only_when_asked() {
    let plain = rng();
    let f = DeviceIdentity::device_features(&plain);
    assert_eq!(
        f,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    );
    let behind = Rng::new(&RngConfig {
        access_platform: true,
        ..RngConfig::default()
    })
    .unwrap();
    let f = DeviceIdentity::device_features(&behind);
    assert_eq!(
        f,
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_F_ACCESS_PLATFORM)
    );
    assert_eq!(DeviceIdentity::device_type(&plain), 4);
    assert_eq!(DeviceIdentity::queue_max_sizes(&plain), &[256]);
    assert_eq!(DeviceIdentity::config_size(&plain), 0);
}

#[test]
fn rng_source_that_cannot_be_opened_is_an_error_naming_it() {
    let path = std::env::temp_dir().join("vdev-no-such-entropy");
    let err = Rng::new(&RngConfig {
        source: path.clone(),
        access_platform: false,
    })
    .unwrap_err();
    assert!(matches!(err, RngError::Open { .. }));
    assert!(err.to_string().contains("vdev-no-such-entropy"), "{err}");
}

#[test]
fn rng_source_that_runs_dry_fails_the_call_after_returning_the_chain() {
    let img = TempImage::new("entropy", &[0x42; 100]);
    let mut dev = Rng::new(&RngConfig {
        source: img.path().to_path_buf(),
        access_platform: false,
    })
    .unwrap();
    let mem = ram();
    let mut drv = driver(&mem);
    let mut q = drv.queue();
    drv.post(&[w(DATA, 64)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(drv.one(), 64);
    drv.post(&[w(DATA, 64)]);
    let err = dev.process_queue(0, &mut q, &mem).unwrap_err().to_string();
    assert!(err.contains("entropy source"), "{err}");
    assert_eq!(drv.one(), 0, "the chain went back to the driver");
}
