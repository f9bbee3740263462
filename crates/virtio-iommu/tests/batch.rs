//! The batch (`virtio_contract`'s "The batch") in process: an UNMAP that the guest
//! sends while an endpoint's device is in a batch changes nothing the batch reaches
//! through what it translated, completes (the guest reads its status) only after the
//! batch ends, and leaves the range unreachable from then on.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::sync::{Arc, Mutex};
use virtio_contract::{process_batch, DeviceError, DeviceIdentity, VirtioDevice};
use virtio_iommu::fake_driver::{FakeGuest, FREE_RAM};
use virtio_iommu::wire::{CONFIG_BYPASS_OFFSET, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use virtio_iommu::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, IommuMemory, Permissions};

const EP: u32 = 1;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

type EndpointMemory = IommuMemory<GuestMemoryMmap, EndpointIommu>;

/// What the device saw after the revocation, in its batch.
#[derive(Debug, Default)]
struct Seen {
    /// Requests completed by the time the device went on.
    completed_mid_batch: usize,
    /// Read through the slice translated before the UNMAP.
    slice: [u8; 8],
    /// Read through a fresh translation of the same page.
    retranslated: Option<[u8; 8]>,
    /// A page the UNMAP covers that the batch had not translated.
    untouched: Option<u64>,
}

/// A device whose batch translates IOVA 0, lets `revoke` run (the guest's UNMAP of
/// both pages), then writes and reads again.
struct MidBatch<'a> {
    revoke: &'a mut dyn FnMut() -> usize,
    seen: Seen,
}

impl DeviceIdentity for MidBatch<'_> {
    fn device_type(&self) -> u16 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, _: u64) {}
    fn config_size(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, _: &mut [u8]) {}
    fn write_config(&mut self, _: u64, _: &[u8]) {}
}

impl VirtioDevice<EndpointMemory> for MidBatch<'_> {
    fn process_queue(
        &mut self,
        _: usize,
        _: &mut Queue,
        mem: &EndpointMemory,
    ) -> Result<bool, DeviceError> {
        let slices: Vec<_> = mem
            .get_slices(GuestAddress(0), 8, Permissions::ReadWrite)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        slices[0].copy_from(b"BEFORE!!");
        self.seen.completed_mid_batch = (self.revoke)();
        slices[0].copy_from(b"DURING!!");
        slices[0].copy_to(&mut self.seen.slice[..]);
        self.seen.retranslated = mem.read_obj::<[u8; 8]>(GuestAddress(0)).ok();
        self.seen.untouched = mem.read_obj::<u64>(GuestAddress(0x1000)).ok();
        Ok(false)
    }
    fn reset(&mut self) {}
}

#[test]
fn an_unmap_mid_batch_changes_nothing_the_batch_translated_and_completes_after_it() {
    let cfg = IommuConfig {
        endpoints: vec![EndpointConfig::new(EP)],
        ..IommuConfig::default()
    };
    let mut iommu = VirtioIommu::new(&cfg).unwrap();
    let mut g = FakeGuest::new(cfg.probe_size);
    g.negotiate(&mut iommu);
    iommu
        .write_config(CONFIG_BYPASS_OFFSET as u64, &[0])
        .unwrap();
    let attach = Request::Attach {
        domain: DomainId(1),
        endpoint: EndpointId(EP),
        flags: 0,
        reserved_nonzero: false,
    };
    let map = Request::Map {
        domain: DomainId(1),
        virt_start: Iova(0),
        virt_end: Iova(0x1fff),
        phys_start: FREE_RAM,
        flags: RW,
    };
    assert_eq!(g.send(&mut iommu, &attach), Status::Ok);
    assert_eq!(g.send(&mut iommu, &map), Status::Ok);
    let woken = Arc::new(Mutex::new(0));
    let w = Arc::clone(&woken);
    iommu.set_requestq_notifier(Arc::new(move || *w.lock().unwrap() += 1));
    let ep = iommu.endpoint_iommu(EndpointId(EP)).unwrap();
    let mem = IommuMemory::new(g.mem.clone(), ep.clone(), true, ());

    let unmap = Request::Unmap {
        domain: DomainId(1),
        virt_start: Iova(0),
        virt_end: Iova(0x1fff),
        reserved_nonzero: false,
    };
    let posted = g.prepare(&[unmap]);
    let mut revoke = || {
        g.post(&posted);
        iommu.process_requestq(&mut g.requestq, &g.mem).unwrap();
        g.reap()
    };
    let mut dev = MidBatch {
        revoke: &mut revoke,
        seen: Seen::default(),
    };
    let mut queue = Queue::new(16).unwrap();
    process_batch(&ep, &mut dev, 0, &mut queue, &mem).unwrap();
    let seen = dev.seen;

    assert_eq!(seen.completed_mid_batch, 0, "the UNMAP waits for the batch");
    assert_eq!(&seen.slice, b"DURING!!");
    assert_eq!(
        seen.retranslated.as_ref(),
        Some(b"DURING!!"),
        "what the batch translated stays reachable as it was"
    );
    assert_eq!(seen.untouched, None, "what it had not is revoked at once");
    let mut ram = [0u8; 8];
    g.mem.read_slice(&mut ram, GuestAddress(FREE_RAM)).unwrap();
    assert_eq!(&ram, b"DURING!!", "the batch's write reached guest memory");

    // The batch ended: the request queue was woken and the UNMAP completes.
    assert_eq!(*woken.lock().unwrap(), 1);
    iommu.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 1);
    assert_eq!(g.batch_statuses(&posted, &[unmap]), vec![Some(Status::Ok)]);
    assert_eq!(iommu.counters().deferred, 1);
    assert!(
        mem.read_obj::<u64>(GuestAddress(0)).is_err(),
        "after the batch the range is unreachable"
    );
}
