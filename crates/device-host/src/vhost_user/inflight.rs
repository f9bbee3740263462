//! Implicit grants, copy form (issue 16): the back-end is given no guest memory at all.
//! Each queue has a shadow ([`inflight::CopyShadow`]): its ring and a bounce arena live
//! in a memfd the device host made, and that memfd is all the back-end's memory table
//! holds. The guest's rings stay ours:
//!
//! guest notify, or the back-end's call → [`VhostUserDevice::process_queue`] under the
//! transport's lock: first what the back-end used is checked and copied back to the
//! guest ([`CopyShadow::complete`]), then what the guest made available is read once,
//! checked and copied in ([`CopyShadow::pull`]), and the back-end is kicked.
//!
//! The call eventfds therefore no longer become interrupts directly: the watch thread
//! hands each call to the transport ([`super::VhostUserHandle::set_on_call`]), which
//! completes to the guest and raises the interrupt the guest's ring asks for. The same
//! thread enforces the deadline: a back-end that keeps a request longer than
//! [`InflightConfig::deadline`] is cut off, and every request it held fails with the
//! device's error status (the usual broken-connection path, [`super::recovery`]).
//!
//! Only devices whose requests carry no guest addresses in their payload can be
//! shadowed this way (the back-end would be handed addresses it cannot reach):
//! virtio-blk and virtio-rng.

use super::device::VhostUserDevice;
use super::{DeviceKind, VhostUserError, QUEUE_SIZES, UADDR_BASE};
use inflight::{CopyShadow, ShadowConfig, ShadowError, Stats};
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_contract::{failed_request_status, DeviceError};
use virtio_queue::Queue;
use vm_memory::GuestMemory;

/// Default bytes of bounce arena per queue: four of the largest request Linux's
/// virtio-blk sends by default (`max_sectors_kb` is capped at 1280 KiB), rounded.
pub const DEFAULT_ARENA_BYTES: u64 = 8 << 20;

/// Default time a back-end may keep one request before it is cut off. Longer than any
/// healthy disk request, well below the 30 s after which Linux's block layer starts
/// its own timeout handling.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Where the first shadow lies in the back-end's memory table; each next one follows
/// on a 2 MiB boundary. Not 0, so no ring of ours sits at address 0.
const SHADOW_BASE: u64 = 1 << 30;

/// How the copy form is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightConfig {
    /// Bounce arena per queue: what can be in flight at once. A request larger than
    /// this fails with the device's error status; smaller ones wait for space.
    pub arena_bytes: u64,
    /// Longest a back-end may keep a request.
    pub deadline: Duration,
}

impl Default for InflightConfig {
    fn default() -> Self {
        Self {
            arena_bytes: DEFAULT_ARENA_BYTES,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// The shadows of one device, shared by the device (under the transport's lock) and
/// the watch thread (deadline, counters).
pub(super) struct Inflight {
    pub(super) cfg: InflightConfig,
    pub(super) shadows: Vec<CopyShadow>,
    /// Counters of shadows already replaced (each reset makes new ones).
    retired: Stats,
    /// Back-ends cut off for missing the deadline.
    pub(super) cutoffs: u64,
}

impl Inflight {
    /// New shadows, one per queue, each in its own memfd.
    pub(super) fn new(kind: DeviceKind, cfg: InflightConfig) -> Result<Self, VhostUserError> {
        let mut shadows = Vec::new();
        let mut base = SHADOW_BASE;
        for &queue_size in &QUEUE_SIZES {
            let s = CopyShadow::new(ShadowConfig {
                queue_size,
                arena_bytes: cfg.arena_bytes,
                base,
                fail_status: failed_request_status(kind.device_type()),
            })
            .map_err(|e| VhostUserError::Inflight(format!("cannot make a shadow queue: {e}")))?;
            base = (base + s.memory().size()).next_multiple_of(2 << 20);
            shadows.push(s);
        }
        Ok(Self {
            cfg,
            shadows,
            retired: Stats::default(),
            cutoffs: 0,
        })
    }

    /// Replaces every shadow with a new one in a new memfd, the old memory zeroed
    /// first: a back-end that still maps the old memfd (a previous connection) sees
    /// nothing of what follows, nor of what was.
    pub(super) fn renew(&mut self, kind: DeviceKind) -> Result<(), VhostUserError> {
        let mut fresh = Self::new(kind, self.cfg)?;
        for s in &mut self.shadows {
            s.reset();
            let st = s.stats();
            add(&mut self.retired, &st);
        }
        self.shadows = std::mem::take(&mut fresh.shadows);
        Ok(())
    }

    /// The counters of every shadow, past and present; the exposure is today's.
    pub(super) fn stats(&self) -> Stats {
        let mut total = self.retired;
        total.exposed_bytes = 0;
        total.in_flight = 0;
        for s in &self.shadows {
            add(&mut total, &s.stats());
        }
        total
    }

    /// The memory table: one region per shadow, nothing of the guest's.
    pub(super) fn mem_table(
        &self,
    ) -> Result<(Vec<super::wire::MemoryRegion>, Vec<Arc<File>>), VhostUserError> {
        let mut table = Vec::new();
        let mut files = Vec::new();
        for s in &self.shadows {
            let m = s.memory();
            table.push(super::wire::MemoryRegion {
                guest_phys_addr: m.base(),
                memory_size: m.size(),
                userspace_addr: UADDR_BASE + m.base(),
                mmap_offset: 0,
            });
            let f = m.file().try_clone().map_err(|e| {
                VhostUserError::Inflight(format!("cannot share a shadow's memory: {e}"))
            })?;
            files.push(Arc::new(f));
        }
        Ok((table, files))
    }

    /// The ring addresses of queue `index`'s shadow, as front-end addresses.
    pub(super) fn ring_addr(&self, index: usize) -> Option<super::wire::VringAddr> {
        let s = self.shadows.get(index)?;
        let (desc, avail, used) = s.ring();
        Some(super::wire::VringAddr {
            index: index as u32,
            flags: 0,
            desc: UADDR_BASE + desc,
            used: UADDR_BASE + used,
            avail: UADDR_BASE + avail,
            log: 0,
        })
    }

    /// Whether some request has been with the back-end longer than the deadline.
    pub(super) fn overdue(&self, now: Instant) -> bool {
        self.shadows
            .iter()
            .filter_map(CopyShadow::oldest_posted)
            .any(|t| now.saturating_duration_since(t) > self.cfg.deadline)
    }
}

fn add(total: &mut Stats, s: &Stats) {
    total.in_flight += s.in_flight;
    total.exposed_bytes += s.exposed_bytes;
    total.peak_exposed_bytes = total.peak_exposed_bytes.max(s.peak_exposed_bytes);
    total.posted += s.posted;
    total.completed += s.completed;
    total.waits += s.waits;
    total.clamped += s.clamped;
    total.refused += s.refused;
}

/// A guest's fault, as the transport takes it (DEVICE_NEEDS_RESET): its ring could not
/// be read or written, or a chain broke the rules and nothing of it was granted.
fn driver_error(queue: usize, e: ShadowError) -> DeviceError {
    match e {
        ShadowError::GuestRing(source) => DeviceError::Queue { queue, source },
        e => DeviceError::Driver {
            queue,
            source: Box::new(e),
        },
    }
}

/// What a shadow's error says about who broke the rules.
fn is_backend_fault(e: &ShadowError) -> bool {
    matches!(
        e,
        ShadowError::UsedJump { .. } | ShadowError::UnknownId(_) | ShadowError::Shadow(_)
    )
}

impl VhostUserDevice {
    /// One pass over queue `index` in the copy form: completions first, then new
    /// requests, then the kick. Returns whether the guest wants an interrupt.
    pub(super) fn process_inflight<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        let mut guard = dma_types::lock(&self.shared.inflight);
        let Some(shadow) = guard.as_mut().and_then(|i| i.shadows.get_mut(index)) else {
            return Ok(false);
        };
        let completed = match shadow.complete(queue, mem) {
            Ok(w) => w,
            Err(e) if is_backend_fault(&e) => {
                // A hostile or broken back-end: cut it off, then fail what it held
                // (the guest's ring was not touched for the refused entry).
                drop(guard);
                super::bump(&self.shared.counters.bad_messages);
                self.shared.break_link();
                self.fail_pending(mem);
                return Err(DeviceError::backend("vhost-user (implicit grants)", e));
            }
            Err(e) => return Err(driver_error(index, e)),
        };
        let pulled = shadow
            .pull(queue, mem)
            .map_err(|e| driver_error(index, e))?;
        if pulled.posted > 0 && shadow.needs_kick() {
            if let Some(q) = self.queues.get(index) {
                // Fails only if the counter would overflow: a kick is pending anyway.
                let _ = q.kick.write(1);
            }
        }
        Ok(completed || pulled.interrupt)
    }
}
