//! What a device sees of the [`AddressSpace`]: a [`GuestView`] (translated accesses,
//! windows pinned until the view drops) and the batch hooks that keep a batch's
//! windows as they were until it ends.

use super::{AddressSpace, Fault, Window};
use std::cell::RefCell;
use std::sync::Arc;
use virtio_contract::Batch;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::iommu::{Error as IommuError, IovaRange};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

/// The carrier's hooks (`virtio_contract`'s "The batch"): windows the batch translates
/// through a [`GuestView`] are kept, as they were, until it ends, and invalidates of
/// them wait for that.
impl Batch for AddressSpace {
    fn begin(&self) {
        let mut t = self.write();
        t.last_batch += 1;
        t.batch = Some(t.last_batch);
    }

    fn end(&self) {
        let ended = {
            let mut t = self.write();
            let Some(b) = t.batch.take() else {
                return;
            };
            t.retire_deferred();
            b
        };
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = ended;
        self.batch_ended.notify_all();
    }
}

/// The guest memory a device sees: every access is translated by the
/// [`AddressSpace`], and every window it touches stays mapped (or revoked in place,
/// never unmapped) until the view is dropped. Make one per batch of queue work.
#[derive(Debug)]
pub struct GuestView {
    space: Arc<AddressSpace>,
    pins: RefCell<Vec<Arc<Window>>>,
}

impl GuestView {
    pub(super) fn new(space: Arc<AddressSpace>) -> Self {
        space.enter();
        Self {
            space,
            pins: RefCell::new(Vec::new()),
        }
    }

    /// Windows pinned so far.
    pub fn pinned(&self) -> usize {
        self.pins.borrow().len()
    }

    fn fault(addr: GuestAddress, count: usize, f: Fault) -> GuestMemoryError {
        GuestMemoryError::IommuError(IommuError::CannotResolve {
            iova_range: IovaRange {
                base: addr,
                length: count,
            },
            reason: f.to_string(),
        })
    }
}

impl Drop for GuestView {
    fn drop(&mut self) {
        self.space.exit();
    }
}

/// The host pieces of one translated access.
#[derive(Debug)]
pub struct Slices<'a>(std::vec::IntoIter<VolatileSlice<'a>>);

impl<'a> Iterator for Slices<'a> {
    type Item = vm_memory::GuestMemoryResult<VolatileSlice<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(Ok)
    }
}

impl std::iter::FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {}

impl GuestMemory for GuestView {
    type PhysicalMemory = vm_memory::GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.space.translate(addr.0, count, access, None).is_ok()
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        let mut pins = self.pins.borrow_mut();
        let pieces = self
            .space
            .translate(addr.0, count, access, Some(&mut pins))
            .map_err(|f| Self::fault(addr, count, f))?;
        let slices: Vec<VolatileSlice<'a>> = pieces
            .into_iter()
            // SAFETY: each piece lies inside a window's mapping (`translate` bounds it by
            // the window's length, which the mapping covers: its own, or its region's
            // whole mapping, which `update` checked it lies in), and that window is now
            // in `self.pins`, which only drops with `self`, outliving `'a`. An
            // invalidate in between revokes its own pages in place (`Mapping::revoke`)
            // instead of unmapping, and a window into a region mapped whole keeps that
            // mapping alive, so the memory stays valid for volatile access throughout.
            .map(|(ptr, n)| unsafe { VolatileSlice::new(ptr, n) })
            .collect();
        Ok(Slices(slices.into_iter()))
    }
}
