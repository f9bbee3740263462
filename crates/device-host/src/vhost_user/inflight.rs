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
//! The map form ([`InflightConfig::map_threshold`]) shows large buffers in place instead
//! of copying them: the back-end (one that negotiates `VIRTIO_F_ACCESS_PLATFORM`) gets
//! guest RAM in its memory table too, but reaches it only through IOTLB windows the
//! device host opens per request: an UPDATE, acknowledged, before the shadow kick; an
//! INVALIDATE, acknowledged, after the back-end returned the buffer and before the guest
//! sees it used. Writable buffers that do not cover whole pages, and buffers below the
//! threshold, are bounced as in the copy form. What it leaves reachable: the back-end
//! holds guest RAM's descriptor, as in IOTLB mode, so only a cooperating back-end is
//! confined to the windows (docs/THREAT-MODEL.md).
//!
//! Only devices whose requests carry no guest addresses in their payload can be
//! shadowed this way (the back-end would be handed addresses it cannot reach):
//! virtio-blk and virtio-rng.

use super::device::VhostUserDevice;
use super::iotlb::Region;
use super::link::{has, Reply};
use super::{wire, DeviceKind, Shared, VhostUserError, QUEUE_SIZES, UADDR_BASE};
use dma_types::lock;
use inflight::{
    Arena, CopyAll, CopyShadow, Desc, ShadowConfig, ShadowError, Stats, WindowError, Windows,
};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_contract::{failed_request_status, DeviceError};
use virtio_contract::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::Queue;
use vm_memory::GuestMemory;
use vm_memory::GuestMemoryMmap;
use zerocopy::IntoBytes;

/// Default bytes of bounce arena per queue: four of the largest request Linux's
/// virtio-blk sends by default (`max_sectors_kb` is capped at 1280 KiB), rounded.
pub const DEFAULT_ARENA_BYTES: u64 = 8 << 20;

/// Default time a back-end may keep one request before it is cut off. Longer than any
/// healthy disk request, well below the 30 s after which Linux's block layer starts
/// its own timeout handling.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Default size from which the map form shows a buffer in place: below it a copy costs
/// less than the two acknowledged IOTLB messages a window takes.
pub const DEFAULT_MAP_THRESHOLD: u64 = 64 << 10;

/// Where the first shadow lies in the back-end's memory table (and, in the map form,
/// its IOVA space); each next one follows on a 2 MiB boundary. Above any
/// guest-physical address we serve, so the front-end addresses of shadows and of guest
/// RAM (`UADDR_BASE` + address) never meet.
const SHADOW_BASE: u64 = 1 << 46;
/// The map form's windows: IOVAs from here, `WINDOW_SPACE` bytes of them.
const WINDOW_BASE: u64 = 1 << 47;
const WINDOW_SPACE: u64 = 1 << 46;
const PAGE: u64 = 4096;

/// How the copy form is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightConfig {
    /// Bounce arena per queue: what can be in flight at once. A request larger than
    /// this fails with the device's error status; smaller ones wait for space.
    pub arena_bytes: u64,
    /// Longest a back-end may keep a request.
    pub deadline: Duration,
    /// The map form: buffers of at least this many bytes are shown in place through
    /// IOTLB windows (`None`: the copy form, everything bounced).
    pub map_threshold: Option<u64>,
}

impl Default for InflightConfig {
    fn default() -> Self {
        Self {
            arena_bytes: DEFAULT_ARENA_BYTES,
            deadline: DEFAULT_DEADLINE,
            map_threshold: None,
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
    /// The map form's windows (`None` in the copy form).
    pub(super) map: Option<MapWindows>,
}

/// The map form's state: where guest RAM is in the back-end's memory table, and the
/// IOVA space windows are opened in.
pub(super) struct MapWindows {
    threshold: u64,
    /// Guest RAM as the memory table sent at activation gives it.
    pub(super) regions: Vec<Region>,
    iovas: Arena,
}

impl MapWindows {
    fn new(threshold: u64) -> Self {
        Self {
            threshold,
            regions: Vec::new(),
            iovas: Arena::new(WINDOW_SPACE),
        }
    }

    /// The whole pages around `d`, and the guest RAM region that holds them.
    fn pages(&self, d: &Desc) -> Option<(u64, u64, &Region)> {
        let first = d.addr & !(PAGE - 1);
        let end = d
            .addr
            .checked_add(u64::from(d.len))?
            .checked_next_multiple_of(PAGE)?;
        let r = self
            .regions
            .iter()
            .find(|r| r.gpa <= first && end - 1 <= r.last())?;
        Some((first, end - first, r))
    }
}

/// The map form's windows for one pass, over the current link.
struct LinkWindows<'a> {
    shared: &'a Shared,
    map: &'a mut MapWindows,
}

impl Windows for LinkWindows<'_> {
    fn wants(&self, d: &Desc) -> bool {
        // A writable window must cover whole pages: the back-end could write the rest.
        let whole = d.addr.is_multiple_of(PAGE) && u64::from(d.len).is_multiple_of(PAGE);
        u64::from(d.len) >= self.map.threshold && (whole || !d.write) && self.map.pages(d).is_some()
    }

    fn open(&mut self, d: &Desc) -> Result<u64, WindowError> {
        let (first, size, r) = self.map.pages(d).ok_or("the buffer left guest RAM")?;
        let uaddr = r.uaddr + (first - r.gpa);
        let off = self
            .map
            .iovas
            .alloc(size)
            .ok_or("no IOVA space left for windows")?;
        let msg = wire::IotlbMsg {
            iova: WINDOW_BASE + off,
            size,
            uaddr,
            perm: if d.write {
                wire::iotlb::PERM_WO
            } else {
                wire::iotlb::PERM_RO
            },
            kind: wire::iotlb::UPDATE,
            padding: [0; 6],
        };
        let sent = self
            .shared
            .with_link(|l| l.request(wire::req::IOTLB_MSG, msg.as_bytes(), &[], Reply::Ack));
        if let Err(e) = sent {
            self.map.iovas.release(off, size);
            return Err(Box::new(e));
        }
        // A window is pushed before the back-end needs it, as a MAP's UPDATE is.
        super::bump(&self.shared.counters.pushed);
        Ok(WINDOW_BASE + off + (d.addr - first))
    }

    fn close(&mut self, windows: &[(u64, u32)]) {
        for &(at, len) in windows {
            let first = at & !(PAGE - 1);
            let size = (at + u64::from(len)).next_multiple_of(PAGE) - first;
            // Acknowledged, or the link breaks (the back-end is cut off): either way it
            // no longer reaches the window when this returns.
            self.shared.invalidate(first, first + size - 1);
            self.map.iovas.release(first - WINDOW_BASE, size);
        }
    }

    fn exposed(&self, d: &Desc) -> u64 {
        self.map.pages(d).map_or(0, |(_, size, _)| size)
    }
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
            map: cfg.map_threshold.map(MapWindows::new),
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
        self.map = fresh.map.take();
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

    /// The memory table: one region per shadow; in the map form guest RAM too (which
    /// the back-end reaches only through windows), whose regions the windows use.
    pub(super) fn mem_table(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<(Vec<super::wire::MemoryRegion>, Vec<Arc<File>>), VhostUserError> {
        let (mut table, mut files) = match &mut self.map {
            Some(map) => {
                let (t, f) = super::memory::mem_table(mem, None)?;
                map.regions = t.iter().map(Region::from).collect();
                (t, f)
            }
            None => (Vec::new(), Vec::new()),
        };
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
        if table.len() > wire::MAX_REGIONS {
            return Err(VhostUserError::Inflight(format!(
                "guest RAM in {} pieces and {} shadows exceed the {} regions of SET_MEM_TABLE",
                table.len() - self.shadows.len(),
                self.shadows.len(),
                wire::MAX_REGIONS
            )));
        }
        Ok((table, files))
    }

    /// The features the back-end is given, from what the guest acked (`acked`) and what
    /// the back-end offers (`offered`): shadow rings with direct descriptors, the event
    /// index whenever the back-end offers it (the shadow ring is ours, whatever the
    /// guest chose for its own), and in the map form ACCESS_PLATFORM (the back-end then
    /// translates everything through the windows we open). Sets the shadows' event
    /// index to match.
    pub(super) fn backend_features(&mut self, acked: u64, offered: u64) -> u64 {
        let ours = (1 << VIRTIO_F_ACCESS_PLATFORM)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        let mut f = acked & offered & !ours;
        let event_idx = offered & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        if event_idx {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        for s in &mut self.shadows {
            s.set_event_idx(event_idx);
        }
        if self.map.is_some() {
            f |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    /// The ring addresses of queue `index`'s shadow: front-end addresses, or in the map
    /// form IOVAs (the shadows are mapped one to one, [`Self::shadow_updates`]).
    pub(super) fn ring_addr(&self, index: usize) -> Option<super::wire::VringAddr> {
        let s = self.shadows.get(index)?;
        let (desc, avail, used) = s.ring();
        let to = |a: u64| {
            if self.map.is_some() {
                a
            } else {
                UADDR_BASE + a
            }
        };
        Some(super::wire::VringAddr {
            index: index as u32,
            flags: 0,
            desc: to(desc),
            used: to(used),
            avail: to(avail),
            log: 0,
        })
    }

    /// The map form: the IOTLB UPDATEs that show each shadow to the back-end at the
    /// IOVA equal to its memory-table address, for the whole session.
    pub(super) fn shadow_updates(&self) -> Vec<wire::IotlbMsg> {
        self.shadows
            .iter()
            .map(|s| wire::IotlbMsg {
                iova: s.memory().base(),
                size: s.memory().size(),
                uaddr: UADDR_BASE + s.memory().base(),
                perm: wire::iotlb::PERM_RW,
                kind: wire::iotlb::UPDATE,
                padding: [0; 6],
            })
            .collect()
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
    total.copied_bytes += s.copied_bytes;
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

/// Whether a shadow's error is the back-end's doing (a hostile used ring, or a window
/// it could not be told of) rather than the guest's.
fn is_backend_fault(e: &ShadowError) -> bool {
    matches!(
        e,
        ShadowError::UsedJump { .. }
            | ShadowError::UnknownId(_)
            | ShadowError::Shadow(_)
            | ShadowError::Window(_)
    )
}

/// Implicit grants: a back-end that kept a request past the deadline is cut off; the
/// broken-connection path then fails what it held.
pub(super) fn cut_off_if_overdue(s: &Shared) {
    if s.broken.load(Ordering::Acquire) {
        return;
    }
    let overdue = lock(&s.inflight).as_mut().is_some_and(|i| {
        let late = i.overdue(std::time::Instant::now());
        i.cutoffs += u64::from(late);
        late
    });
    if overdue {
        s.break_link();
    }
}

impl VhostUserDevice {
    /// Implicit grants, copy form (issue 16): from the next activation on, the
    /// back-end's memory table holds only shadow rings and bounce arenas the device
    /// host made (module `inflight`), never a descriptor of guest memory. The guest
    /// is offered indirect descriptors and EVENT_IDX whatever the back-end supports
    /// (the shadow serves them); the back-end is given neither, nor
    /// ACCESS_PLATFORM. Behind the virtio-iommu ([`Self::attach_iommu`], called after
    /// this) the guest's addresses are IOVAs, translated as the shadow copies.
    ///
    /// # Errors
    /// [`VhostUserError::Inflight`] for a device whose requests may carry guest
    /// addresses (anything but virtio-blk and virtio-rng), a device already in pool
    /// mode or behind the virtio-iommu, an arena of zero bytes, or shadows that cannot
    /// be made.
    pub fn inflight_copy(&mut self, cfg: InflightConfig) -> Result<(), VhostUserError> {
        let refuse = |why: String| Err(VhostUserError::Inflight(why));
        if !matches!(self.kind, DeviceKind::Block | DeviceKind::Rng) {
            return refuse(format!(
                "device type {} may carry guest addresses in its requests, which a back-end \
                 that holds only copies cannot follow; only virtio-blk and virtio-rng can be shadowed",
                self.kind.device_type()
            ));
        }
        if let Some(share) = self.share {
            return refuse(format!(
                "the device already shares only {share} with its back-end (pool mode)"
            ));
        }
        if has(self.offered, VIRTIO_F_ACCESS_PLATFORM) {
            return refuse(
                "the device is already behind the virtio-iommu; set up implicit grants first"
                    .into(),
            );
        }
        if cfg.arena_bytes == 0 {
            return refuse("the bounce arena must not be empty".into());
        }
        if let Some(t) = cfg.map_threshold {
            let link = self.shared.current()?;
            if t == 0 {
                return refuse("the map form's threshold must be at least 1 byte".into());
            }
            if !has(link.features, VIRTIO_F_ACCESS_PLATFORM)
                || link.protocol & wire::protocol::REPLY_ACK == 0
            {
                return refuse(format!(
                    "the map form needs a back-end with VIRTIO_F_ACCESS_PLATFORM and the REPLY_ACK \
                     protocol feature (IOTLB windows); {} lacks them (use --inflight copy)",
                    self.shared.socket.display()
                ));
            }
        }
        *lock(&self.shared.inflight) = Some(Inflight::new(self.kind, cfg)?);
        self.inflight = true;
        self.offered |= (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
        Ok(())
    }

    /// One pass over queue `index`: completions first, then new requests (with their
    /// windows, in the map form), then the kick. Returns whether the guest wants an
    /// interrupt.
    pub(super) fn process_inflight<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        let shared = &*self.shared;
        let mut guard = dma_types::lock(&shared.inflight);
        let Some(Inflight { shadows, map, .. }) = guard.as_mut() else {
            return Ok(false);
        };
        let Some(shadow) = shadows.get_mut(index) else {
            return Ok(false);
        };
        let mut link_windows;
        let mut copy_all = CopyAll;
        let windows: &mut dyn Windows = match map {
            Some(map) => {
                link_windows = LinkWindows { shared, map };
                &mut link_windows
            }
            None => &mut copy_all,
        };
        let pass = shadow
            .complete_with(queue, mem, windows)
            .and_then(|done| Ok((done, shadow.pull_with(queue, mem, windows)?)));
        let (completed, pulled) = match pass {
            Ok(p) => p,
            Err(e) if is_backend_fault(&e) => {
                // A hostile or unreachable back-end: cut it off, then fail what it held
                // (the guest's ring was not touched for a refused entry).
                drop(guard);
                if !matches!(e, ShadowError::Window(_)) {
                    super::bump(&self.shared.counters.bad_messages);
                }
                self.shared.break_link();
                self.fail_pending(mem);
                return Err(DeviceError::backend("vhost-user (implicit grants)", e));
            }
            Err(e) => return Err(driver_error(index, e)),
        };
        if pulled.posted > 0 && shadow.needs_kick() {
            if let Some(q) = self.queues.get(index) {
                // Fails only if the counter would overflow: a kick is pending anyway.
                let _ = q.kick.write(1);
            }
        }
        Ok(completed || pulled.interrupt)
    }
}
