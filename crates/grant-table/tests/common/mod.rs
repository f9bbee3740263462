//! Shared by the tests and the benchmark: a small Xen world (a guest, its backend
//! domain, a third domain) and a fake virtio-blk guest driver that maps every buffer
//! through [`GrantDma`] (or, for the `none` baseline, hands the device guest-physical
//! addresses) and drives `virtio_devices::Block` through the test kit's split ring.

#![allow(dead_code, unused_imports, clippy::unwrap_used)] // each test file uses part of it

use grant_table::abi::PAGE_SIZE;
use grant_table::{
    DmaDirection, DomId, DomainConfig, Gfn, Gpa, GrantDma, GrantDmaAddr, GrantIommu, GuestGrants,
    Mem, PersistentConfig, TableSetup, Xen,
};
use std::sync::Arc;
pub use test_kit::blk::{access_platform_block as blk, header};
pub use test_kit::{pattern, r, w, TempImage};
use test_kit::{RingLayout, SplitRing};
use virtio_bindings::virtio_blk::*;
use virtio_contract::{process_batch, VirtioDevice};
use virtio_devices::Block;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub const GUEST: DomId = DomId(5);
pub const BACKEND: DomId = DomId(1);
pub const OTHER: DomId = DomId(2);
pub const GUEST_RAM: usize = 16 << 20;
pub const BACKEND_RAM: usize = 4 << 20;
/// The guest's grant frames (8 may be used) and v2 status frames.
pub const TABLE_GFN: u64 = 0x100;
pub const STATUS_GFN: u64 = 0x120;
/// Pages the tests grant.
pub const PAGES_GFN: u64 = 0x200;
/// The virtqueue ring (8 KiB).
pub const RING: u64 = 0x30_0000;
pub const HDR: u64 = 0x31_0000;
pub const STATUS: u64 = 0x31_1000;
pub const DATA: u64 = 0x40_0000;
/// The persistent-grant pool (256 pages).
pub const POOL_GFN: u64 = 0x800;
/// Copy-mode scratch frames in the backend's RAM.
pub const SCRATCH_GFN: u64 = 0x100;
pub const SCRATCH_FRAMES: u32 = 64;
pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

pub struct World {
    pub xen: Arc<Xen>,
    pub grants: Arc<GuestGrants>,
}

pub fn world_with(version: u32, backend: DomainConfig) -> World {
    let xen = Arc::new(Xen::new());
    let ram = Mem::from_ranges(&[(GuestAddress(0), GUEST_RAM)]).unwrap();
    xen.create_domain(GUEST, ram.clone(), DomainConfig::default())
        .unwrap();
    let bram = Mem::from_ranges(&[(GuestAddress(0), BACKEND_RAM)]).unwrap();
    xen.create_domain(BACKEND, bram, backend).unwrap();
    let oram = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    xen.create_domain(OTHER, oram, DomainConfig::default())
        .unwrap();
    let frames: Vec<Gfn> = (0..8).map(|i| Gfn(TABLE_GFN + i)).collect();
    let setup = if version == 2 {
        TableSetup::v2(frames, vec![Gfn(STATUS_GFN)])
    } else {
        TableSetup::v1(frames)
    };
    let grants = Arc::new(GuestGrants::new(xen.clone(), GUEST, ram, setup).unwrap());
    World { xen, grants }
}

pub fn world(version: u32) -> World {
    world_with(version, DomainConfig::default())
}

/// The guest's DMA API towards [`BACKEND`]: a grant per buffer per I/O, or (with
/// `persistent`) copies through a pool of 64 pages at [`POOL_GFN`] granted once.
pub fn guest_dma(w: &World, persistent: bool) -> GrantDma {
    if persistent {
        let pool = PersistentConfig {
            base: Gfn(POOL_GFN),
            pages: 64,
        };
        GrantDma::persistent(w.grants.clone(), BACKEND, &pool).unwrap()
    } else {
        GrantDma::new(w.grants.clone(), BACKEND)
    }
}

pub fn page(i: u64) -> Gfn {
    Gfn(PAGES_GFN + i)
}

pub fn gpa(g: Gfn) -> u64 {
    g.0 * PAGE_SIZE
}

pub fn read_guest(w: &World, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    w.grants
        .memory()
        .read_slice(&mut v, GuestAddress(at))
        .unwrap();
    v
}

/// How the fake driver hands buffers to the device.
pub enum Dma<'a> {
    /// Guest-physical addresses, no translation (`none` mode).
    None,
    /// Grant DMA addresses through the guest's DMA API.
    Grant(&'a GrantDma),
}

/// The guest's ring: 256 entries packed at [`RING`] in guest RAM; the device is given
/// its grant address in grant mode.
pub struct Ring {
    pub q: SplitRing<Mem>,
    pub ring_dma: Option<GrantDmaAddr>,
}

pub const RING_LEN: usize = 8192;

impl Ring {
    pub fn new(mem: &Mem, dma: &Dma<'_>) -> Self {
        let q = SplitRing::new(mem.clone(), RingLayout::packed(RING, 256), 256);
        let ring_dma = match dma {
            Dma::None => None,
            Dma::Grant(d) => Some(d.map_coherent(Gpa(RING), RING_LEN).unwrap()),
        };
        Self { q, ring_dma }
    }

    /// Posts one chain as a driver does (the kit's ring wraps its indices: the
    /// benchmark posts millions of requests).
    pub fn post(&mut self, descs: &[virtio_queue::desc::RawDescriptor]) {
        self.q.post(descs);
    }

    /// The device's queue: ring addresses as the device sees them.
    pub fn device_queue(&self) -> Queue {
        match self.ring_dma {
            None => self.q.queue(),
            Some(base) => self.q.device_queue(|a| base.0 + (a - RING)),
        }
    }
}

/// One virtio-blk request as the driver does it: header, data and status mapped,
/// posted, served as one batch (`virtio_contract::process_batch`, whose end is
/// `iommu.complete()`), used entry read, all unmapped. Returns (used length, status).
#[allow(clippy::too_many_arguments)] // one request, spelled out
pub fn request<M: GuestMemory>(
    mem: &Mem,
    dma: &Dma<'_>,
    ring: &mut Ring,
    queue: &mut Queue,
    dev: &mut Block,
    dev_mem: &M,
    iommu: Option<&GrantIommu>,
    request_type: u32,
    sector: u64,
    data: u64,
    data_len: usize,
) -> (u32, u8) {
    test_kit::blk::prepare(mem, HDR, STATUS, request_type, sector);
    let data_dir = test_kit::blk::data_direction(request_type);
    let map = |gpa: u64, len: usize, dir: DmaDirection| match dma {
        Dma::None => gpa,
        Dma::Grant(d) => d.map(Gpa(gpa), len, dir).unwrap().0,
    };
    let hdr = map(HDR, 16, DmaDirection::ToDevice);
    let d = (data_len > 0).then(|| map(data, data_len, data_dir));
    let st = map(STATUS, 1, DmaDirection::FromDevice);
    let mut descs = vec![r(hdr, 16)];
    if let Some(d) = d {
        let writes = data_dir == DmaDirection::FromDevice;
        descs.push(test_kit::ring::buf(d, data_len as u32, writes));
    }
    descs.push(w(st, 1));
    let used_before = ring.q.used_idx();
    ring.post(&descs);
    // One batch: the grant hooks' end is `complete`.
    match iommu {
        Some(i) => process_batch(i, dev, 0, queue, dev_mem),
        None => process_batch(&(), dev, 0, queue, dev_mem),
    }
    .unwrap();
    assert_eq!(ring.q.used_idx(), used_before.wrapping_add(1));
    let used = ring.q.used_elem(used_before).1;
    if let Dma::Grant(g) = dma {
        g.unmap(GrantDmaAddr(hdr), 16, DmaDirection::ToDevice)
            .unwrap();
        if let Some(d) = d {
            g.unmap(GrantDmaAddr(d), data_len, data_dir).unwrap();
        }
        g.unmap(GrantDmaAddr(st), 1, DmaDirection::FromDevice)
            .unwrap();
    }
    (used, mem.read_obj(GuestAddress(STATUS)).unwrap())
}
