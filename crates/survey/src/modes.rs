//! The sharing modes, each as the guest's DMA layer does it for a device (what Linux's
//! `dma_map_*` ends up doing in that mode) together with the address space the device
//! backend gets:
//!
//! - [`Direct`] (`none`): no translation; the DMA address is the guest-physical one and
//!   the backend reaches all of RAM.
//! - [`Viommu`] (`viommu-strict`, `viommu-lazy`): every buffer is a MAP request to our
//!   virtio-iommu through its request queue (Linux's `viommu_map_pages` + sync) and an
//!   UNMAP after completion — strict waits for each UNMAP; lazy queues it and the
//!   device sees it with the next MAP (Linux's flush queue: the UNMAP is added to the
//!   queue at once, the sync that kicks it is deferred). The backend reaches what is
//!   mapped, through [`virtio_iommu::EndpointIommu`].
//! - [`Grant`] (`grant-map`, `grant-persistent`, `grant-copy`): Xen grant tables
//!   (`grant-table`): the guest grants each buffer's pages and the backend maps them
//!   per I/O, or the guest copies through a pool granted and mapped once, or the
//!   backend copies with `GNTTABOP_copy`. The backend reaches what is granted, through
//!   [`grant_table::GrantIommu`].
//! - [`Pool`] (`pool`): every buffer bounces through a restricted DMA pool
//!   ([`bounce_pool::GuestDma`], swiotlb's rules); the backend reaches the pool only.
//! - [`Pool::auto`] (`auto`): the device is behind the virtio-iommu, through which the
//!   guest maps the pool once, for good (the device reaches it through
//!   [`crate::windowed::WindowedMemory`]'s direct window); buffers shorter than a
//!   threshold bounce through the pool, longer ones are mapped strictly (Linux bounces
//!   sub-page buffers of untrusted devices the same way, with a fixed threshold and the
//!   bounce slot mapped per use).
//!
//! Each mode counts what the survey reports: mapping operations, bytes copied, and the
//! peak number of guest bytes the backend could reach.

use crate::windowed::WindowedMemory;
use bounce_pool::{DmaAddr, DmaDirection, Gpa, GuestDma, PoolIommu};
use std::sync::Arc;
use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::{
    DomainId, EndpointConfig, EndpointId, EndpointIommu, IommuConfig, Iova, Request, Status,
    VirtioIommu,
};
use vm_memory::{GuestMemory, GuestMemoryMmap, IommuMemory};

pub use crate::error::ModeError;

/// Guest RAM of the survey's guest.
pub const RAM_SIZE: u64 = 64 << 20;
/// Where every mode's ring lives unless the pool serves it.
pub const RING_GPA: u64 = 0x10_0000;
/// The restricted pool (8 MiB at 32 MiB).
pub const POOL_GPA: u64 = 0x200_0000;
/// Pool size: four 1 MiB requests in flight and the rings fit.
pub const POOL_SIZE: u64 = 8 << 20;
/// Endpoint ID of the device behind the virtio-iommu.
const EP: u32 = 8;
/// The domain it is attached to.
const DOMAIN: u32 = 1;
/// Dynamic IOVAs are handed out from here (above guest RAM, so they never alias the
/// identity-mapped ring and pool).
const IOVA_BASE: u64 = 1 << 32;
/// The dynamic IOVA window wraps at this size.
const IOVA_WINDOW: u64 = 1 << 36;
const PAGE: u64 = 4096;

/// The virtio-iommu MAP flags a buffer of direction `dir` needs.
fn map_flags(dir: DmaDirection) -> u32 {
    let mut flags = 0;
    if dir.to_device() {
        flags |= virtio_iommu::wire::VIRTIO_IOMMU_MAP_F_READ;
    }
    if dir.from_device() {
        flags |= virtio_iommu::wire::VIRTIO_IOMMU_MAP_F_WRITE;
    }
    flags
}

/// One mapped buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The address the device uses.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
    /// Direction.
    pub dir: DmaDirection,
    /// Mode-private: what unmapping needs (an IOVA range start, or a bounce flag).
    token: u64,
}

impl Mapping {
    /// A buffer the device is given at its guest-physical address, as is.
    pub(crate) fn direct(gpa: u64, len: usize, dir: DmaDirection) -> Self {
        Self {
            addr: gpa,
            len,
            dir,
            token: 0,
        }
    }
}

/// What a mode counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeStats {
    /// Mapping operations the guest asked for (MAP and UNMAP requests).
    pub map_ops: u64,
    /// Notifications of the virtio-iommu's request queue (each a VM exit, or a
    /// vfio-user message to a device host, for a real guest): strict mode kicks for
    /// every MAP and UNMAP, lazy mode sends the queued UNMAPs with the next MAP's kick.
    pub iommu_kicks: u64,
    /// Bytes copied between the guest's buffers and shared memory.
    pub copy_bytes: u64,
    /// Most guest bytes the backend could reach at one moment.
    pub exposure_peak: u64,
}

/// A sharing mode: the guest's DMA API and the backend's address space.
pub trait Sharing {
    /// The memory the device backend is given.
    type Mem: GuestMemory;
    /// The backend's address space.
    fn device_memory(&self) -> &Self::Mem;
    /// The guest's RAM (what its CPU writes).
    fn guest_memory(&self) -> &GuestMemoryMmap;
    /// Guest-physical address of the ring, and the address the device is told.
    fn ring(&self) -> (u64, u64);
    /// Maps `len` bytes at guest-physical `gpa` for the device.
    ///
    /// # Errors
    /// The mode refused (pool full, IOMMU error).
    fn map(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError>;
    /// Unmaps what [`Sharing::map`] returned (copying back where the mode copies).
    ///
    /// # Errors
    /// The mode refused.
    fn unmap(&mut self, m: Mapping) -> Result<(), ModeError>;
    /// Has the device serve `queue` (the device's view of the guest's ring) through
    /// `device`: by default on [`Sharing::device_memory`]; a mode that puts a shadow
    /// ring between them (implicit grants) serves the shadow instead.
    ///
    /// # Errors
    /// The device's, or the mode's.
    fn serve<E: From<ModeError>>(
        &mut self,
        queue: &mut virtio_queue::Queue,
        device: impl FnOnce(&mut virtio_queue::Queue, &Self::Mem) -> Result<bool, E>,
    ) -> Result<bool, E> {
        device(queue, self.device_memory())
    }
    /// Called after the device processed the queue (the device path's end of batch).
    fn after_process(&mut self) {}
    /// Completes deferred work (lazy invalidation) before the counters are read.
    ///
    /// # Errors
    /// The mode refused.
    fn flush(&mut self) -> Result<(), ModeError> {
        Ok(())
    }
    /// The counters so far.
    fn stats(&self) -> ModeStats;
}

pub(crate) fn guest_ram() -> Result<GuestMemoryMmap, ModeError> {
    GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), RAM_SIZE as usize)])
        .map_err(ModeError::GuestRam)
}

/// `none`: the backend sees guest-physical memory.
#[derive(Debug)]
pub struct Direct {
    mem: GuestMemoryMmap,
}

impl Direct {
    /// A guest with [`RAM_SIZE`] of RAM.
    ///
    /// # Errors
    /// RAM cannot be allocated.
    pub fn new() -> Result<Self, ModeError> {
        Ok(Self::with_memory(guest_ram()?))
    }

    /// The same over the given guest RAM (file-backed RAM, for a backend in another
    /// process).
    pub fn with_memory(mem: GuestMemoryMmap) -> Self {
        Self { mem }
    }
}

impl Sharing for Direct {
    type Mem = GuestMemoryMmap;
    fn device_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn ring(&self) -> (u64, u64) {
        (RING_GPA, RING_GPA)
    }
    fn map(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError> {
        Ok(Mapping {
            addr: gpa,
            len,
            dir,
            token: 0,
        })
    }
    fn unmap(&mut self, _m: Mapping) -> Result<(), ModeError> {
        Ok(())
    }
    fn stats(&self) -> ModeStats {
        ModeStats {
            exposure_peak: RAM_SIZE,
            ..ModeStats::default()
        }
    }
}

/// Our virtio-iommu driven as Linux drives it, and the guest's side of one domain.
pub struct Viommu {
    mem: GuestMemoryMmap,
    dev: VirtioIommu,
    driver: FakeGuest,
    dev_mem: IommuMemory<GuestMemoryMmap, EndpointIommu>,
    lazy: bool,
    /// UNMAPs queued but not yet kicked (lazy).
    pending: Vec<Request>,
    next_iova: u64,
    map_ops: u64,
    kicks: u64,
    live: u64,
    peak: u64,
}

impl std::fmt::Debug for Viommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viommu")
            .field("lazy", &self.lazy)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl Viommu {
    /// The device, the endpoint attached to a DMA domain, the ring mapped once (as
    /// `dma_alloc_coherent` maps it), UNMAPs waited for (`lazy == false`) or deferred.
    ///
    /// # Errors
    /// The device refuses the setup.
    pub fn new(lazy: bool) -> Result<Self, ModeError> {
        Self::with_memory(lazy, guest_ram()?)
    }

    /// The same over the given guest RAM (file-backed RAM, for a backend in another
    /// process).
    ///
    /// # Errors
    /// The device refuses the setup.
    pub fn with_memory(lazy: bool, mem: GuestMemoryMmap) -> Result<Self, ModeError> {
        let cfg = IommuConfig {
            endpoints: vec![EndpointConfig::new(EP)],
            ..IommuConfig::default()
        };
        let mut dev = VirtioIommu::new(&cfg).map_err(ModeError::IommuDevice)?;
        let mut driver = FakeGuest::new(cfg.probe_size);
        driver.negotiate(&mut dev);
        let attach = Request::Attach {
            domain: DomainId(DOMAIN),
            endpoint: EndpointId(EP),
            flags: 0,
            reserved_nonzero: false,
        };
        expect_ok(driver.send(&mut dev, &attach), &attach, "ATTACH")?;
        let ep = dev
            .endpoint_iommu(EndpointId(EP))
            .map_err(|source| ModeError::Endpoint {
                endpoint: EP,
                source,
            })?;
        let dev_mem = IommuMemory::new(mem.clone(), ep, true, ());
        let mut v = Self {
            mem,
            dev,
            driver,
            dev_mem,
            lazy,
            pending: Vec::new(),
            next_iova: 0,
            map_ops: 0,
            kicks: 0,
            live: 0,
            peak: 0,
        };
        v.identity_map(RING_GPA, crate::ring::RING_BYTES as u64)?;
        Ok(v)
    }

    /// The endpoint's translation: what a vhost-user front-end answers the
    /// backend's misses from and subscribes to for invalidations.
    pub fn endpoint(&self) -> EndpointIommu {
        EndpointIommu::clone(self.dev_mem.iommu())
    }

    /// Maps `[gpa, gpa + len)` at the same IOVA, read and write, for good.
    fn identity_map(&mut self, gpa: u64, len: u64) -> Result<(), ModeError> {
        let map = Request::Map {
            domain: DomainId(DOMAIN),
            virt_start: Iova(gpa),
            virt_end: Iova(gpa + len - 1),
            phys_start: gpa,
            flags: map_flags(DmaDirection::Bidirectional),
        };
        self.send_one(&map, "MAP (identity)")?;
        self.add_live(len);
        Ok(())
    }

    fn add_live(&mut self, bytes: u64) {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
    }

    /// Sends `req` (if any) after the UNMAPs still queued, in one kick, and waits for
    /// all; what they unmapped is no longer reachable.
    fn sync_with(&mut self, req: Option<Request>) -> Result<(), ModeError> {
        if self.pending.is_empty() {
            return match req {
                Some(r) => self.send_one(&r, "MAP"),
                None => Ok(()),
            };
        }
        let mut reqs = std::mem::take(&mut self.pending);
        let unmapped: u64 = reqs
            .iter()
            .map(|r| match r {
                Request::Unmap {
                    virt_start,
                    virt_end,
                    ..
                } => virt_end.0 - virt_start.0 + 1,
                _ => 0,
            })
            .sum();
        reqs.extend(req);
        self.send_batch(&reqs)?;
        self.live -= unmapped;
        Ok(())
    }

    /// Sends one request in its own kick and waits for it.
    fn send_one(&mut self, req: &Request, what: &'static str) -> Result<(), ModeError> {
        self.kicks += 1;
        expect_ok(self.driver.send(&mut self.dev, req), req, what)
    }

    fn send_batch(&mut self, reqs: &[Request]) -> Result<(), ModeError> {
        self.kicks += 1;
        let batch = self.driver.prepare(reqs);
        self.driver.post(&batch);
        self.driver
            .run_until(&mut self.dev, reqs.len())
            .map_err(|source| ModeError::RequestQueue {
                requests: reqs.len(),
                source,
            })?;
        let done = self.driver.reap();
        if done != reqs.len() {
            return Err(ModeError::Incomplete {
                done,
                sent: reqs.len(),
            });
        }
        for (st, r) in self.driver.batch_statuses(&batch, reqs).iter().zip(reqs) {
            if *st != Some(Status::Ok) {
                return Err(ModeError::BatchRefused {
                    request: *r,
                    status: *st,
                });
            }
        }
        Ok(())
    }

    /// Hands out a page-aligned IOVA range for `pages` pages.
    fn alloc_iova(&mut self, bytes: u64) -> u64 {
        if self.next_iova + bytes > IOVA_WINDOW {
            self.next_iova = 0;
        }
        let iova = IOVA_BASE + self.next_iova;
        self.next_iova += bytes;
        iova
    }

    fn map_pages(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError> {
        let first = gpa & !(PAGE - 1);
        let bytes = (gpa + len as u64).next_multiple_of(PAGE) - first;
        let iova = self.alloc_iova(bytes);
        let map = Request::Map {
            domain: DomainId(DOMAIN),
            virt_start: Iova(iova),
            virt_end: Iova(iova + bytes - 1),
            phys_start: first,
            flags: map_flags(dir),
        };
        self.sync_with(Some(map))?;
        self.map_ops += 1;
        self.add_live(bytes);
        Ok(Mapping {
            addr: iova + (gpa - first),
            len,
            dir,
            token: iova,
        })
    }

    fn unmap_pages(&mut self, m: Mapping) -> Result<(), ModeError> {
        let iova = m.token;
        let bytes = (m.addr + m.len as u64).next_multiple_of(PAGE) - iova;
        let unmap = Request::Unmap {
            domain: DomainId(DOMAIN),
            virt_start: Iova(iova),
            virt_end: Iova(iova + bytes - 1),
            reserved_nonzero: false,
        };
        self.map_ops += 1;
        if self.lazy {
            // Queued now, seen by the device with the next sync; still reachable until then.
            self.pending.push(unmap);
            if self.pending.len() + 1 >= virtio_iommu::fake_driver::MAX_BATCH {
                self.flush()?;
            }
            Ok(())
        } else {
            self.send_one(&unmap, "UNMAP")?;
            self.live -= bytes;
            Ok(())
        }
    }
}

fn expect_ok(st: Status, req: &Request, what: &'static str) -> Result<(), ModeError> {
    if st == Status::Ok {
        Ok(())
    } else {
        Err(ModeError::Refused {
            what,
            request: *req,
            status: st,
        })
    }
}

impl Sharing for Viommu {
    type Mem = IommuMemory<GuestMemoryMmap, EndpointIommu>;
    fn device_memory(&self) -> &Self::Mem {
        &self.dev_mem
    }
    fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn ring(&self) -> (u64, u64) {
        (RING_GPA, RING_GPA)
    }
    fn map(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError> {
        self.map_pages(gpa, len, dir)
    }
    fn unmap(&mut self, m: Mapping) -> Result<(), ModeError> {
        self.unmap_pages(m)
    }
    fn flush(&mut self) -> Result<(), ModeError> {
        self.sync_with(None)
    }
    fn stats(&self) -> ModeStats {
        ModeStats {
            map_ops: self.map_ops,
            iommu_kicks: self.kicks,
            copy_bytes: 0,
            exposure_peak: self.peak,
        }
    }
}

/// Bytes swiotlb copies for one buffer over its life: in at map (every direction, so
/// no stale pool data reaches the device), back at unmap for device-written buffers.
fn bounce_copies(len: usize, dir: DmaDirection) -> u64 {
    if dir.from_device() {
        2 * len as u64
    } else {
        len as u64
    }
}

/// The guest's side of the restricted pool, shared by `pool` and `auto`: the DMA API
/// over a pool at [`POOL_GPA`], the ring as a coherent allocation from it, and the
/// bytes bounced.
#[derive(Debug)]
struct Bouncer {
    dma: GuestDma<GuestMemoryMmap>,
    ring: u64,
    copies: u64,
}

impl Bouncer {
    fn new(mem: &GuestMemoryMmap) -> Result<Self, ModeError> {
        let dma = GuestDma::with_own_pool(mem.clone(), Gpa(POOL_GPA), POOL_SIZE)
            .map_err(ModeError::Pool)?;
        let ring = dma
            .alloc_coherent(crate::ring::RING_BYTES)
            .map_err(ModeError::PoolRing)?;
        Ok(Self {
            dma,
            ring: ring.0,
            copies: 0,
        })
    }

    /// Bounces a buffer; `token` goes into the mapping for the caller.
    fn map(
        &mut self,
        gpa: u64,
        len: usize,
        dir: DmaDirection,
        token: u64,
    ) -> Result<Mapping, ModeError> {
        let a = self
            .dma
            .map(Gpa(gpa), len, dir)
            .map_err(|source| ModeError::Bounce { gpa, len, source })?;
        self.copies += bounce_copies(len, dir);
        Ok(Mapping {
            addr: a.0,
            len,
            dir,
            token,
        })
    }

    fn unmap(&mut self, m: Mapping) -> Result<(), ModeError> {
        self.dma
            .unmap(DmaAddr(m.addr), m.len, m.dir)
            .map_err(|source| ModeError::Unbounce {
                addr: m.addr,
                len: m.len,
                source,
            })
    }
}

/// `pool` and `auto`: buffers bounced through the restricted pool, and in `auto` those
/// of at least a threshold mapped strictly through the virtio-iommu instead.
///
/// One type for both, so that when every buffer bounces the two modes run the same
/// machine code and differ only by the one comparison `auto` adds per buffer (the
/// per-buffer check Linux's DMA layer makes too: `dma_direct_map_page` asks
/// `is_swiotlb_force_bounce` every time). Two types would be two monomorphizations of
/// the whole request path, laid out apart in the binary, and their difference in code
/// placement alone moved one against the other by a few percent.
pub struct Pool {
    bouncer: Bouncer,
    /// `auto`'s mapper for buffers of at least `threshold` bytes; `None` in `pool`.
    iommu: Option<Viommu>,
    threshold: usize,
    /// The pool as a window; in `auto` the rest through the endpoint's translation,
    /// in `pool` nothing else (the addresses `bounce_pool::PoolIommu` allows).
    dev_mem: WindowedMemory,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("auto", &self.iommu.is_some())
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

/// `Mapping::token` of a bounced buffer (IOVAs never take this value).
const BOUNCED: u64 = u64::MAX;

impl Pool {
    /// `pool`: the pool at [`POOL_GPA`], the ring a coherent allocation from it, the
    /// device reaching the pool and nothing else.
    ///
    /// # Errors
    /// The pool cannot be built.
    pub fn new() -> Result<Self, ModeError> {
        Self::with_memory(guest_ram()?)
    }

    /// The same over the given guest RAM (RAM whose pool is its own memory file, for
    /// a backend in another process that is handed the pool alone).
    ///
    /// # Errors
    /// The pool cannot be built in `mem`.
    pub fn with_memory(mem: GuestMemoryMmap) -> Result<Self, ModeError> {
        Self::build(mem, None, usize::MAX)
    }

    /// `auto`: buffers shorter than `threshold` bytes bounce through the pool, longer
    /// ones get their own strict mapping. The guest maps the pool (and with it the
    /// ring, a coherent allocation from it) through the virtio-iommu once, at its own
    /// addresses, as it would tell an IOMMU about a buffer it shares for good; the
    /// device reaches the pool through [`WindowedMemory`]'s direct window, the
    /// translation of that one mapping cached, as an out-of-process backend keeps the
    /// pool's IOTLB window.
    ///
    /// # Errors
    /// The device or the pool refuses the setup.
    pub fn auto(threshold: usize) -> Result<Self, ModeError> {
        Self::auto_with_memory(threshold, guest_ram()?)
    }

    /// [`Pool::auto`] over the given guest RAM (file-backed RAM, for a backend in
    /// another process).
    ///
    /// # Errors
    /// The device or the pool refuses the setup.
    pub fn auto_with_memory(threshold: usize, mem: GuestMemoryMmap) -> Result<Self, ModeError> {
        let mut iommu = Viommu::with_memory(false, mem.clone())?;
        iommu.identity_map(POOL_GPA, POOL_SIZE)?;
        Self::build(mem, Some(iommu), threshold)
    }

    /// `auto`'s endpoint on the virtio-iommu; `None` in `pool`.
    pub fn endpoint(&self) -> Option<EndpointIommu> {
        self.iommu.as_ref().map(Viommu::endpoint)
    }

    fn build(
        mem: GuestMemoryMmap,
        iommu: Option<Viommu>,
        threshold: usize,
    ) -> Result<Self, ModeError> {
        let bouncer = Bouncer::new(&mem)?;
        let pool = PoolIommu::for_pool(bouncer.dma.pool()).map_err(ModeError::PoolWindow)?;
        let endpoint = iommu.as_ref().map(Viommu::endpoint);
        Ok(Self {
            dev_mem: WindowedMemory::new(mem, pool.range(), endpoint),
            bouncer,
            iommu,
            threshold,
        })
    }
}

impl Sharing for Pool {
    type Mem = WindowedMemory;
    fn device_memory(&self) -> &Self::Mem {
        &self.dev_mem
    }
    fn guest_memory(&self) -> &GuestMemoryMmap {
        self.bouncer.dma.memory()
    }
    fn ring(&self) -> (u64, u64) {
        (self.bouncer.ring, self.bouncer.ring)
    }
    fn map(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError> {
        match &mut self.iommu {
            Some(iommu) if len >= self.threshold => iommu.map_pages(gpa, len, dir),
            _ => self.bouncer.map(gpa, len, dir, BOUNCED),
        }
    }
    fn unmap(&mut self, m: Mapping) -> Result<(), ModeError> {
        match &mut self.iommu {
            Some(iommu) if m.token != BOUNCED => iommu.unmap_pages(m),
            _ => self.bouncer.unmap(m),
        }
    }
    fn stats(&self) -> ModeStats {
        ModeStats {
            map_ops: self.iommu.as_ref().map_or(0, |i| i.map_ops),
            iommu_kicks: self.iommu.as_ref().map_or(0, |i| i.kicks),
            copy_bytes: self.bouncer.copies,
            // `pool`: the pool. `auto`: what the IOMMU maps — the pool, the pages
            // `Viommu` maps for a ring outside it, and the live mappings.
            exposure_peak: self.iommu.as_ref().map_or(POOL_SIZE, |i| i.peak),
        }
    }
}

/// How the `grant` modes share (the three ways Xen block backends do: per-I/O grant
/// maps, persistent grants as `feature-persistent` in `xen/include/public/io/blkif.h`,
/// and `GNTTABOP_copy` from `xen/include/public/grant_table.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantKind {
    /// Per-I/O grants: the guest grants each buffer's pages and revokes them after
    /// the request; the backend maps and unmaps each page (Xen blkback without
    /// persistent grants).
    PerIo,
    /// Persistent grants: the guest grants a pool once and copies every buffer
    /// through it; the backend keeps the pool mapped (blkfront/blkback's feature).
    Persistent,
    /// Grant copy: per-I/O grants, and the backend copies through its own scratch
    /// frames with `GNTTABOP_copy` instead of mapping (QEMU's Xen disk backend).
    Copy,
}

/// Xen domain of the survey's guest and of its backend.
const GUEST_DOM: grant_table::DomId = grant_table::DomId(5);
const BACKEND_DOM: grant_table::DomId = grant_table::DomId(1);
/// The guest's grant table frames (8 v1 frames: 4096 refs) at 3 MiB.
const GRANT_TABLE_GFN: u64 = 0x300;
/// The persistent pool: 264 pages (a 1 MiB request, its header and status, and slack)
/// at 48 MiB.
const PERSISTENT_GFN: u64 = 0x3000;
const PERSISTENT_PAGES: u32 = 264;
/// The backend's own RAM (copy mode's scratch frames live there).
const BACKEND_RAM: usize = 4 << 20;
const SCRATCH_GFN: u64 = 0x100;
const SCRATCH_FRAMES: u32 = 300;

/// `grant-map`, `grant-persistent`, `grant-copy`: Xen grant tables, in-process.
pub struct Grant {
    mem: GuestMemoryMmap,
    dma: grant_table::GrantDma,
    dev_mem: IommuMemory<GuestMemoryMmap, grant_table::GrantIommu>,
    kind: GrantKind,
    ring_dev: u64,
    copies: u64,
    live_pages: u64,
    peak_pages: u64,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn pages(gpa: u64, len: usize) -> u64 {
    (gpa + len as u64).div_ceil(PAGE) - gpa / PAGE
}

impl Grant {
    /// A guest domain with a v1 grant table, its backend domain, the guest's grant DMA
    /// API for the backend and the backend's `GrantIommu`, the ring granted and mapped
    /// once.
    ///
    /// # Errors
    /// The grant world refuses the setup.
    pub fn new(kind: GrantKind) -> Result<Self, ModeError> {
        use grant_table::{
            DomainConfig, Gfn, GrantDma, GrantIommu, GuestGrants, IommuMode, PersistentConfig,
            TableSetup, Xen,
        };
        let domain = |dom| move |source| ModeError::Domain { dom, source };
        let grant_iommu = |what| move |source| ModeError::GrantIommu { what, source };
        let mem = guest_ram()?;
        let xen = Arc::new(Xen::new());
        xen.create_domain(GUEST_DOM, mem.clone(), DomainConfig::default())
            .map_err(domain(GUEST_DOM))?;
        let bram = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), BACKEND_RAM)])
            .map_err(ModeError::BackendRam)?;
        xen.create_domain(BACKEND_DOM, bram, DomainConfig::default())
            .map_err(domain(BACKEND_DOM))?;
        let frames = (0..8).map(|i| Gfn(GRANT_TABLE_GFN + i)).collect();
        let grants = Arc::new(
            GuestGrants::new(xen.clone(), GUEST_DOM, mem.clone(), TableSetup::v1(frames))
                .map_err(ModeError::GrantTable)?,
        );
        let (dma, mode) = match kind {
            GrantKind::PerIo => (GrantDma::new(grants, BACKEND_DOM), IommuMode::PerIo),
            GrantKind::Persistent => (
                GrantDma::persistent(
                    grants,
                    BACKEND_DOM,
                    &PersistentConfig {
                        base: Gfn(PERSISTENT_GFN),
                        pages: PERSISTENT_PAGES,
                    },
                )
                .map_err(ModeError::PersistentPool)?,
                IommuMode::Persistent {
                    max: PERSISTENT_PAGES as usize,
                },
            ),
            GrantKind::Copy => (
                GrantDma::new(grants, BACKEND_DOM),
                IommuMode::Copy {
                    scratch: Gfn(SCRATCH_GFN),
                    frames: SCRATCH_FRAMES,
                },
            ),
        };
        let iommu =
            GrantIommu::new(xen, BACKEND_DOM, GUEST_DOM, mode).map_err(grant_iommu("setup"))?;
        let ring_len = crate::ring::RING_BYTES;
        let ring = dma
            .map_coherent(grant_table::Gpa(RING_GPA), ring_len)
            .map_err(ModeError::GrantRing)?;
        iommu
            .map_ring(ring, ring_len as u64)
            .map_err(grant_iommu("the ring"))?;
        let backend_mem = iommu
            .device_memory()
            .map_err(grant_iommu("the backend's memory"))?;
        let dev_mem = IommuMemory::new(backend_mem, iommu, true, ());
        let ring_pages = pages(RING_GPA, ring_len);
        let granted = match kind {
            GrantKind::Persistent => ring_pages + u64::from(PERSISTENT_PAGES),
            _ => ring_pages,
        };
        Ok(Self {
            mem,
            dma,
            dev_mem,
            kind,
            ring_dev: ring.0,
            copies: 0,
            live_pages: granted,
            peak_pages: granted,
        })
    }
}

impl Sharing for Grant {
    type Mem = IommuMemory<GuestMemoryMmap, grant_table::GrantIommu>;
    fn device_memory(&self) -> &Self::Mem {
        &self.dev_mem
    }
    fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn ring(&self) -> (u64, u64) {
        (RING_GPA, self.ring_dev)
    }
    fn map(&mut self, gpa: u64, len: usize, dir: DmaDirection) -> Result<Mapping, ModeError> {
        let a = self
            .dma
            .map(grant_table::Gpa(gpa), len, dir)
            .map_err(|source| ModeError::Grant { gpa, len, source })?;
        match self.kind {
            // The driver copies the buffer into the pool (device-bound data now, the
            // device's data back at unmap): once per buffer either way.
            GrantKind::Persistent => self.copies += len as u64,
            // GNTTABOP_copy in for every buffer (a read's scratch page too, so a short
            // device write cannot expose stale scratch bytes), out for device-written.
            GrantKind::Copy => self.copies += bounce_copies(len, dir),
            GrantKind::PerIo => {}
        }
        if self.kind != GrantKind::Persistent {
            self.live_pages += pages(gpa, len);
            self.peak_pages = self.peak_pages.max(self.live_pages);
        }
        Ok(Mapping {
            addr: a.0,
            len,
            dir,
            token: gpa,
        })
    }
    fn unmap(&mut self, m: Mapping) -> Result<(), ModeError> {
        self.dma
            .unmap(grant_table::GrantDmaAddr(m.addr), m.len, m.dir)
            .map_err(|source| ModeError::Ungrant {
                addr: m.addr,
                len: m.len,
                source,
            })?;
        if self.kind != GrantKind::Persistent {
            self.live_pages -= pages(m.token, m.len);
        }
        Ok(())
    }
    fn after_process(&mut self) {
        // The end of the device's batch (the grant hooks' end is `complete`): per-I/O
        // unmaps, copy-mode copies out.
        virtio_contract::Batch::end(&**self.dev_mem.iommu());
    }
    fn stats(&self) -> ModeStats {
        let s = self.dev_mem.iommu().stats();
        ModeStats {
            // The backend's grant operations (GNTTABOP_map/unmap/copy).
            map_ops: s.maps + s.unmaps + s.copies,
            iommu_kicks: 0,
            copy_bytes: self.copies,
            exposure_peak: self.peak_pages * PAGE,
        }
    }
}
