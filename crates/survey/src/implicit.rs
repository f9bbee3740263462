//! Implicit grants (issue 16): `inflight-copy` and `inflight-map`. The guest changes
//! nothing (no mapping, no bounce in its DMA layer: [`Sharing::map`] hands out
//! guest-physical addresses); the device host between the guest's ring and the device
//! reads each chain once into a shadow ring ([`inflight::CopyShadow`]), the device
//! serves the shadow, and what it wrote reaches the guest before the request is used.
//!
//! - `inflight-copy`: every buffer is bounced through the shadow's arena; the device
//!   runs on the shadow's memory alone. The copies, both ways, are the cost; the
//!   exposure is the readable bytes in flight.
//! - `inflight-map`: buffers of at least the threshold (the calibrated copy/map
//!   crossover) are shown in place through a window opened before the request is
//!   posted and closed before the guest sees it used; the rest are bounced. In process
//!   a window is bookkeeping (the device's memory holds guest RAM as well as the
//!   shadow, at guest-physical addresses), so the cell shows the copies saved and
//!   counts each open and close as a mapping operation; out of process each is an
//!   acknowledged IOTLB message, and the cell pays for it.

use crate::modes::{guest_ram, Mapping, ModeError, ModeStats, Sharing, RING_GPA};
use crate::ring::QUEUE_SIZE;
use dma_types::DmaDirection;
use inflight::{CopyAll, CopyShadow, Desc, ShadowConfig, WindowError, Windows};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Bounce arena of the shadow: the largest request of every pattern fits (1 MiB reads).
const ARENA_BYTES: u64 = 4 << 20;
/// Where the device sees the shadow: above guest RAM.
const SHADOW_BASE: u64 = 1 << 32;
const PAGE: u64 = 4096;

/// The map form's windows in process: guest-physical addresses, counted.
#[derive(Debug)]
struct Counted {
    threshold: u64,
    /// Windows opened plus windows closed.
    ops: u64,
}

impl Windows for Counted {
    fn wants(&self, d: &Desc) -> bool {
        // As the device host decides: a writable window must cover whole pages.
        let whole = d.addr.is_multiple_of(PAGE) && u64::from(d.len).is_multiple_of(PAGE);
        u64::from(d.len) >= self.threshold && (whole || !d.write)
    }
    fn open(&mut self, d: &Desc) -> Result<u64, WindowError> {
        self.ops += 1;
        Ok(d.addr)
    }
    fn close(&mut self, windows: &[(u64, u32)]) {
        self.ops += windows.len() as u64;
    }
    fn exposed(&self, d: &Desc) -> u64 {
        let first = d.addr & !(PAGE - 1);
        (d.addr + u64::from(d.len)).next_multiple_of(PAGE) - first
    }
}

/// The guest, the shadow between its ring and the device, and the device's queue on
/// the shadow ring.
pub struct Implicit {
    mem: GuestMemoryMmap,
    shadow: CopyShadow,
    /// The device's queue: the shadow ring.
    device_queue: Queue,
    /// What the device reaches: the shadow (copy form), or guest RAM and the shadow
    /// (map form).
    device_mem: GuestMemoryMmap,
    /// The map form's windows.
    windows: Option<Counted>,
}

impl std::fmt::Debug for Implicit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Implicit")
            .field("stats", &self.shadow.stats())
            .field("map", &self.windows)
            .finish_non_exhaustive()
    }
}

impl Implicit {
    /// `inflight-copy`: a guest with the survey's RAM and a shadow of the ring's size.
    ///
    /// # Errors
    /// RAM or the shadow's memory cannot be allocated.
    pub fn copy() -> Result<Self, ModeError> {
        let (mem, shadow, device_queue) = Self::parts()?;
        let device_mem = shadow.memory().mem().clone();
        Ok(Self {
            mem,
            shadow,
            device_queue,
            device_mem,
            windows: None,
        })
    }

    /// `inflight-map`: as [`Self::copy`], buffers of `threshold` bytes or more shown in
    /// place.
    ///
    /// # Errors
    /// As [`Self::copy`], or the shadow cannot be mapped beside guest RAM.
    pub fn map(threshold: usize) -> Result<Self, ModeError> {
        let (mem, shadow, device_queue) = Self::parts()?;
        let m = shadow.memory();
        let file = m.file().try_clone().map_err(ModeError::ShadowMemory)?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(m.base()),
            m.size() as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(ModeError::GuestRam)?;
        let device_mem = mem
            .insert_region(Arc::new(region))
            .map_err(|e| ModeError::ShadowMemory(std::io::Error::other(e)))?;
        Ok(Self {
            mem,
            shadow,
            device_queue,
            device_mem,
            windows: Some(Counted {
                threshold: threshold as u64,
                ops: 0,
            }),
        })
    }

    fn parts() -> Result<(GuestMemoryMmap, CopyShadow, Queue), ModeError> {
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
        Ok((guest_ram()?, shadow, q))
    }
}

impl Sharing for Implicit {
    type Mem = GuestMemoryMmap;
    fn device_memory(&self) -> &GuestMemoryMmap {
        &self.device_mem
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
    /// shadow ring, then completes back to the guest.
    fn serve<E: From<ModeError>>(
        &mut self,
        guest_queue: &mut Queue,
        device: impl FnOnce(&mut Queue, &GuestMemoryMmap) -> Result<bool, E>,
    ) -> Result<bool, E> {
        let mut copy_all = CopyAll;
        let windows: &mut dyn Windows = match &mut self.windows {
            Some(w) => w,
            None => &mut copy_all,
        };
        self.shadow
            .pull_with(guest_queue, &self.mem, windows)
            .map_err(|e| E::from(ModeError::Shadow(e)))?;
        device(&mut self.device_queue, &self.device_mem)?;
        self.shadow
            .complete_with(guest_queue, &self.mem, windows)
            .map_err(|e| E::from(ModeError::Shadow(e)))
    }
    fn stats(&self) -> ModeStats {
        let s = self.shadow.stats();
        ModeStats {
            map_ops: self.windows.as_ref().map_or(0, |w| w.ops),
            copy_bytes: s.copied_bytes,
            exposure_peak: s.peak_exposed_bytes,
            ..ModeStats::default()
        }
    }
}
