//! Shared by the tests and the benchmark: a small Xen world (a guest, its backend
//! domain, a third domain) and a fake virtio-blk guest driver that maps every buffer
//! through [`GrantDma`] (or, for the `none` baseline, hands the device guest-physical
//! addresses) and drives `virtio_devices::Block` through virtio-queue's
//! `MockSplitQueue`.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses part of it

use grant_table::abi::PAGE_SIZE;
use grant_table::{
    DmaDirection, DomId, DomainConfig, Gfn, Gpa, GrantDma, GrantDmaAddr, GrantIommu, GuestGrants,
    Mem, TableSetup, Xen,
};
use std::path::PathBuf;
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_contract::{VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_devices::{Block, BlockConfig};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

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

pub fn page(i: u64) -> Gfn {
    Gfn(PAGES_GFN + i)
}

pub fn gpa(g: Gfn) -> u64 {
    g.0 * PAGE_SIZE
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

pub fn read_guest(w: &World, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    w.grants
        .memory()
        .read_slice(&mut v, GuestAddress(at))
        .unwrap();
    v
}

pub struct TempImage(pub PathBuf);

impl TempImage {
    pub fn new(tag: &str, contents: &[u8]) -> Self {
        Self::new_in(&std::env::temp_dir(), tag, contents)
    }
    pub fn new_in(dir: &std::path::Path, tag: &str, contents: &[u8]) -> Self {
        let p = dir.join(format!("grant-{}-{tag}.img", std::process::id()));
        std::fs::write(&p, contents).unwrap();
        Self(p)
    }
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn blk(img: &TempImage) -> Block {
    let mut b = Block::new(&BlockConfig {
        path: img.0.clone(),
        read_only: false,
        access_platform: true,
        test_stray_sector: None,
    })
    .unwrap();
    <Block as virtio_contract::DeviceIdentity>::set_acked_features(
        &mut b,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM),
    );
    b
}

pub fn r(addr: u64, len: usize) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len as u32, 0, 0))
}

pub fn w(addr: u64, len: usize) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len as u32, 2, 0))
}

pub fn header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// How the fake driver hands buffers to the device.
pub enum Dma<'a> {
    /// Guest-physical addresses, no translation (`none` mode).
    None,
    /// Grant DMA addresses through the guest's DMA API.
    Grant(&'a GrantDma),
}

/// The guest's ring: the mock queue writes it at [`RING`]; the device is given its
/// grant address in grant mode.
pub struct Ring<'m> {
    pub mem: &'m Mem,
    pub q: MockSplitQueue<'m, Mem>,
    pub ring_dma: Option<GrantDmaAddr>,
}

pub const RING_LEN: usize = 8192;

impl<'m> Ring<'m> {
    pub fn new(mem: &'m Mem, dma: &Dma<'_>) -> Self {
        let q = MockSplitQueue::create(mem, GuestAddress(RING), 256);
        let ring_dma = match dma {
            Dma::None => None,
            Dma::Grant(d) => Some(d.map_coherent(Gpa(RING), RING_LEN).unwrap()),
        };
        Self { mem, q, ring_dma }
    }

    /// Posts one chain as a driver does: descriptors from table index 0 linked with
    /// `VRING_DESC_F_NEXT`, the head in the next avail slot (modulo the ring size),
    /// then the avail index (wrapping). virtio-queue's mock helpers do not wrap, and
    /// the benchmark posts millions of requests.
    pub fn post(&self, descs: &[RawDescriptor]) {
        let mem = self.q.desc_table_addr();
        let m = self.mem;
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let last = i + 1 == descs.len();
            let flags = if last { d.flags() & !1 } else { d.flags() | 1 };
            let next = if last { 0 } else { i as u16 + 1 };
            let raw = RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next));
            m.write_obj(raw, mem.unchecked_add(16 * i as u64)).unwrap();
        }
        let avail = self.q.avail_addr();
        let idx: u16 = m.read_obj(avail.unchecked_add(2)).unwrap();
        m.write_obj(0u16, avail.unchecked_add(4 + 2 * u64::from(idx % 256)))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        m.write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
    }

    /// The device's queue: ring addresses as the device sees them.
    pub fn device_queue(&self) -> Queue {
        let mut queue: Queue = self.q.create_queue().unwrap();
        if let Some(base) = self.ring_dma {
            let at = |a: GuestAddress| base.0 + (a.0 - RING);
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (l, h) = split(at(self.q.desc_table_addr()));
            queue.set_desc_table_address(l, h);
            let (l, h) = split(at(self.q.avail_addr()));
            queue.set_avail_ring_address(l, h);
            let (l, h) = split(at(self.q.used_addr()));
            queue.set_used_ring_address(l, h);
        }
        queue
    }
}

/// One virtio-blk request as the driver does it: header, data and status mapped,
/// posted, served, completed (`iommu.complete()` after `process_queue`, the device
/// path's end of batch), used entry read, all unmapped. Returns (used length, status).
#[allow(clippy::too_many_arguments)] // one request, spelled out
pub fn request<M: GuestMemory>(
    mem: &Mem,
    dma: &Dma<'_>,
    ring: &Ring<'_>,
    queue: &mut Queue,
    dev: &mut Block,
    dev_mem: &M,
    iommu: Option<&GrantIommu>,
    request_type: u32,
    sector: u64,
    data: u64,
    data_len: usize,
) -> (u32, u8) {
    mem.write_slice(&header(request_type, sector), GuestAddress(HDR))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let data_dir = if request_type == VIRTIO_BLK_T_IN {
        DmaDirection::FromDevice
    } else {
        DmaDirection::ToDevice
    };
    let map = |gpa: u64, len: usize, dir: DmaDirection| match dma {
        Dma::None => gpa,
        Dma::Grant(d) => d.map(Gpa(gpa), len, dir).unwrap().0,
    };
    let hdr = map(HDR, 16, DmaDirection::ToDevice);
    let d = (data_len > 0).then(|| map(data, data_len, data_dir));
    let st = map(STATUS, 1, DmaDirection::FromDevice);
    let mut descs = vec![r(hdr, 16)];
    if let Some(d) = d {
        descs.push(if data_dir == DmaDirection::FromDevice {
            w(d, data_len)
        } else {
            r(d, data_len)
        });
    }
    descs.push(w(st, 1));
    let used_before = ring.q.used().idx().load();
    ring.post(&descs);
    dev.process_queue(0, queue, dev_mem).unwrap();
    if let Some(i) = iommu {
        i.complete();
    }
    assert_eq!(ring.q.used().idx().load(), used_before.wrapping_add(1));
    let used = ring
        .q
        .used()
        .ring()
        .ref_at(usize::from(used_before % 256))
        .unwrap()
        .load()
        .len();
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
