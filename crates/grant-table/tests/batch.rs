//! The batch (`virtio_contract`'s "The batch") in grant mode: the guest's revoke of a
//! page the device's batch translated answers "busy" (Xen's ABI) and changes nothing
//! the batch reads or writes; retried after the batch ends, it succeeds, and the page
//! is unreachable from then on.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use grant_table::{GrantDmaAddr, GrantIommu, GrantRef, IommuMode, Mem};
use virtio_contract::{process_batch, DeviceError, DeviceIdentity, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, IommuMemory, Permissions};

type DevMem = IommuMemory<Mem, GrantIommu>;

/// What the device saw after the guest tried to revoke, in its batch.
#[derive(Debug, Default)]
struct Seen {
    /// The revoke's answer mid-batch (true: revoked).
    revoked_mid_batch: bool,
    slice: [u8; 8],
    retranslated: Option<[u8; 8]>,
}

/// A device whose batch translates the granted page, lets `revoke` run, then writes
/// and reads again.
struct MidBatch<'a> {
    page: GuestAddress,
    revoke: &'a dyn Fn() -> bool,
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

impl VirtioDevice<DevMem> for MidBatch<'_> {
    fn process_queue(
        &mut self,
        _: usize,
        _: &mut Queue,
        mem: &DevMem,
    ) -> Result<bool, DeviceError> {
        let slices: Vec<_> = mem
            .get_slices(self.page, 8, Permissions::ReadWrite)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        slices[0].copy_from(b"BEFORE!!");
        self.seen.revoked_mid_batch = (self.revoke)();
        slices[0].copy_from(b"DURING!!");
        slices[0].copy_to(&mut self.seen.slice[..]);
        self.seen.retranslated = mem.read_obj::<[u8; 8]>(self.page).ok();
        Ok(false)
    }
    fn reset(&mut self) {}
}

#[test]
fn a_revoke_mid_batch_is_busy_changes_nothing_the_batch_reaches_and_succeeds_after_it() {
    let w = world(1);
    let r: GrantRef = w
        .grants
        .grant_foreign_access(BACKEND, page(0), false)
        .unwrap();
    let iommu = GrantIommu::new(w.xen.clone(), BACKEND, GUEST, IommuMode::PerIo).unwrap();
    let dm = IommuMemory::new(iommu.device_memory().unwrap(), iommu, true, ());
    let addr = GuestAddress(GrantDmaAddr::new(r, 0).0);
    let revoke = || w.grants.end_foreign_access_ref(r);
    let mut dev = MidBatch {
        page: addr,
        revoke: &revoke,
        seen: Seen::default(),
    };
    let mut queue = Queue::new(16).unwrap();
    process_batch(&**dm.iommu(), &mut dev, 0, &mut queue, &dm).unwrap();
    let seen = dev.seen;

    assert!(!seen.revoked_mid_batch, "busy while the batch has the page");
    assert_eq!(&seen.slice, b"DURING!!");
    assert_eq!(
        seen.retranslated.as_ref(),
        Some(b"DURING!!"),
        "the page stays reachable as it was for the whole batch"
    );
    assert_eq!(read_guest(&w, gpa(page(0)), 8), b"DURING!!");

    // The batch ended: the guest's retry succeeds, and nothing reaches the page.
    assert!(
        w.grants.end_foreign_access_ref(r),
        "revoked after the batch"
    );
    assert!(
        dm.read_obj::<u64>(addr).is_err(),
        "unreachable after the batch"
    );
    assert_eq!(read_guest(&w, gpa(page(0)), 8), b"DURING!!");
}
