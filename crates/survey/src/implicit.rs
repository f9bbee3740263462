//! `inflight-copy`: implicit grants, copy form (issue 16). The guest changes nothing
//! (no mapping, no bounce in its DMA layer: [`Sharing::map`] hands out guest-physical
//! addresses); the device host between the guest's ring and the device reads each
//! chain once and copies it into a shadow ring's bounce arena
//! ([`inflight::CopyShadow`]), the device runs on the shadow's memory alone, and what
//! it wrote is copied back before the guest sees the request used. The copies, both
//! ways, are the mode's cost; its exposure is the readable bytes in flight.

use crate::modes::{guest_ram, Mapping, ModeError, ModeStats, Sharing, RING_GPA};
use crate::ring::QUEUE_SIZE;
use dma_types::DmaDirection;
use inflight::{CopyShadow, ShadowConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Bounce arena of the shadow: the largest request of every pattern fits (1 MiB reads).
const ARENA_BYTES: u64 = 4 << 20;
/// Where the device sees the shadow (its own address space).
const SHADOW_BASE: u64 = 1 << 32;

/// The guest, the shadow between its ring and the device, and the device's queue on
/// the shadow ring.
pub struct InflightCopy {
    mem: GuestMemoryMmap,
    shadow: CopyShadow,
    /// The device's queue: the shadow ring, in the shadow's memory.
    device_queue: Queue,
}

impl std::fmt::Debug for InflightCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightCopy")
            .field("stats", &self.shadow.stats())
            .finish_non_exhaustive()
    }
}

impl InflightCopy {
    /// A guest with the survey's RAM and a shadow of the ring's size.
    ///
    /// # Errors
    /// RAM or the shadow's memory cannot be allocated.
    pub fn new() -> Result<Self, ModeError> {
        let shadow = CopyShadow::new(ShadowConfig {
            queue_size: QUEUE_SIZE,
            arena_bytes: ARENA_BYTES,
            base: SHADOW_BASE,
            fail_status: None,
        })
        .map_err(ModeError::ShadowMemory)?;
        let (desc, avail, used) = shadow.ring();
        let mut q = Queue::new(QUEUE_SIZE).map_err(ModeError::ShadowQueue)?;
        q.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        Ok(Self {
            mem: guest_ram()?,
            shadow,
            device_queue: q,
        })
    }
}

impl Sharing for InflightCopy {
    type Mem = GuestMemoryMmap;
    fn device_memory(&self) -> &GuestMemoryMmap {
        self.shadow.memory().mem()
    }
    fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn ring(&self) -> (u64, u64) {
        (RING_GPA, RING_GPA)
    }
    fn map(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError> {
        Ok(Mapping::direct(gpa, len, dir))
    }
    fn unmap(&mut self, _m: Mapping) -> Result<(), ModeError> {
        Ok(())
    }
    /// Pulls what the guest made available into the shadow, lets the device serve the
    /// shadow ring on the shadow's memory, then completes back to the guest.
    fn serve<E: From<ModeError>>(
        &mut self,
        guest_queue: &mut Queue,
        device: impl FnOnce(&mut Queue, &GuestMemoryMmap) -> Result<bool, E>,
    ) -> Result<bool, E> {
        self.shadow
            .pull(guest_queue, &self.mem)
            .map_err(|e| E::from(ModeError::Shadow(e)))?;
        device(&mut self.device_queue, self.shadow.memory().mem())?;
        self.shadow
            .complete(guest_queue, &self.mem)
            .map_err(|e| E::from(ModeError::Shadow(e)))
    }
    fn stats(&self) -> ModeStats {
        let s = self.shadow.stats();
        ModeStats {
            copy_bytes: s.copied_bytes,
            exposure_peak: s.peak_exposed_bytes,
            ..ModeStats::default()
        }
    }
}
