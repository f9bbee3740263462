//! The batch (`virtio_contract`'s "The batch") in the back-end: a guest revocation (an
//! INVALIDATE) that overlaps a window the device's batch translated changes nothing
//! the batch reads or writes, is acknowledged only when the batch ends, and the window
//! is gone after it.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use test_kit::memfd;
use test_kit::proc::maps_covering;
use vhost_iotlb::wire::{iotlb, req};
use vhost_iotlb::{AddressSpace, GuestView, Limits};
use virtio_contract::{DeviceError, DeviceIdentity, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// The window the device uses: guest page `DATA` at IOVA `DATA + IOVA_OFF`.
const DATA: u64 = 0x30000;

/// What the device saw in its batch.
#[derive(Debug, Default)]
struct Seen {
    /// Read through the slice translated before the revocation, after it.
    slice: [u8; 8],
    /// Read through a fresh translation after the revocation.
    retranslated: Option<[u8; 8]>,
}

/// A device whose first batch translates the window, tells the test, waits until the
/// back-end holds an invalidate of it, then writes and reads it again.
struct MidBatch {
    /// The session's address space, set once the session exists.
    space: Arc<OnceLock<Arc<AddressSpace>>>,
    translated: mpsc::Sender<()>,
    seen: mpsc::Sender<Seen>,
    batch_over: Arc<AtomicBool>,
    /// Set by the test right before its kick.
    go: Arc<AtomicBool>,
    done: bool,
}

impl DeviceIdentity for MidBatch {
    fn device_type(&self) -> u16 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QSIZE]
    }
    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | vhost_iotlb::wire::VIRTIO_F_IOMMU_PLATFORM
    }
    fn set_acked_features(&mut self, _: u64) {}
    fn config_size(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, _: &mut [u8]) {}
    fn write_config(&mut self, _: u64, _: &[u8]) {}
}

impl VirtioDevice<GuestView> for MidBatch {
    fn process_queue(
        &mut self,
        _: usize,
        _: &mut Queue,
        mem: &GuestView,
    ) -> Result<bool, DeviceError> {
        // Set-up wakes the worker too: act on the test's kick only.
        if self.done || !self.go.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.done = true;
        let iova = GuestAddress(DATA + IOVA_OFF);
        let slice = mem
            .get_slices(iova, 8, Permissions::ReadWrite)
            .expect("the window is mapped")
            .next()
            .expect("one piece")
            .expect("the window is mapped");
        assert_eq!(slice.len(), 8, "one window holds it");
        slice.copy_from(b"BEFORE!!");
        self.translated.send(()).unwrap();
        // The revocation arrives now; give up after a while if it is never held.
        let until = Instant::now() + Duration::from_secs(2);
        let space = self.space.get().expect("set before the kick");
        while space.exposure().deferred_invalidates == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        slice.copy_from(b"DURING!!");
        let mut seen = Seen::default();
        slice.copy_to(&mut seen.slice[..]);
        seen.retranslated = mem.read_obj::<[u8; 8]>(iova).ok();
        self.seen.send(seen).unwrap();
        self.batch_over.store(true, Ordering::Release);
        Ok(false)
    }
    fn reset(&mut self) {}
}

#[test]
fn a_revocation_mid_batch_changes_nothing_the_batch_reaches_and_completes_after_it() {
    let (translated_tx, translated) = mpsc::channel();
    let (seen_tx, seen) = mpsc::channel();
    let batch_over = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let limits = Limits {
        max_windows: 64,
        miss_timeout: Duration::from_secs(5),
        max_misses_per_access: 64,
    };
    let space_slot = Arc::new(OnceLock::new());
    let dev = MidBatch {
        space: Arc::clone(&space_slot),
        translated: translated_tx,
        seen: seen_tx,
        batch_over: Arc::clone(&batch_over),
        go: Arc::clone(&go),
        done: false,
    };
    let (fe, space) = Frontend::start_device(dev, limits, true, Duration::ZERO);
    space_slot.set(Arc::clone(&space)).unwrap();
    let ram = memfd("vhost-iotlb-batch", RAM);
    let _chan = negotiate(&fe, &ram, true);
    let bus = |gpa| gpa + IOVA_OFF;
    let (kick, _call) = setup_ring(&fe, bus);
    let update = |gpa: u64| iotlb_msg(iotlb::UPDATE, bus(gpa), 4096, UBASE + gpa, iotlb::PERM_RW);
    assert_eq!(fe.ack(req::IOTLB_MSG, &update(RING.desc), &[]), 0);
    assert_eq!(fe.ack(req::IOTLB_MSG, &update(DATA), &[]), 0);
    let host = space
        .windows()
        .into_iter()
        .find(|w| w.0 == bus(DATA))
        .unwrap()
        .2;

    go.store(true, Ordering::Release);
    kick.write(1).unwrap();
    translated.recv_timeout(Duration::from_secs(5)).unwrap();
    // The guest unmaps the page while the batch uses it: the acknowledgement (which
    // completes the guest's UNMAP) comes only once the batch is over.
    let inv = iotlb_msg(iotlb::INVALIDATE, bus(DATA), 4096, 0, 0);
    assert_eq!(fe.ack(req::IOTLB_MSG, &inv, &[]), 0);
    assert!(
        batch_over.load(Ordering::Acquire),
        "acknowledged only after the batch ended"
    );
    let seen = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        &seen.slice, b"DURING!!",
        "the batch's slice still reaches the page"
    );
    assert_eq!(
        seen.retranslated.as_ref(),
        Some(b"DURING!!"),
        "and so does a fresh translation in the same batch"
    );
    let mut got = [0u8; 8];
    ram.read_exact_at(&mut got, DATA).unwrap();
    assert_eq!(&got, b"DURING!!", "the batch's write reached guest memory");
    assert_eq!(space.exposure().deferred_invalidates, 1);

    // After the batch: the window is gone, from the table and from the process.
    assert!(space.windows().iter().all(|w| w.0 != bus(DATA)));
    assert!(maps_covering("self", host as u64)
        .unwrap()
        .iter()
        .all(|l| !l.contains("vhost-iotlb-batch")));
    fe.finish();
}
