//! virtio-blk from `virtio-devices`, unchanged, serving a grant-mode guest: the
//! device's memory is an `IommuMemory` over [`GrantIommu`], so it reaches only what the
//! guest granted to its backend domain, through Xen's map or copy operations. The fake
//! guest driver grants the ring once (coherent) and each header, data buffer and status
//! byte per request (or copies through persistent grants), as Linux's grant DMA ops and
//! Xen blkfront do.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

mod common;

use common::*;
use grant_table::iommu::DEFAULT_MAX_PERSISTENT;
use grant_table::{DmaDirection, Gfn, Gpa, GrantDma, GrantIommu, IommuMode, Mem};
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_devices::Block;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, IommuMemory};

type DevMem = IommuMemory<Mem, GrantIommu>;

const SECTOR: usize = 512;

fn modes() -> Vec<(&'static str, IommuMode, bool)> {
    vec![
        ("per-io", IommuMode::PerIo, false),
        (
            "persistent",
            IommuMode::Persistent {
                max: DEFAULT_MAX_PERSISTENT,
            },
            true,
        ),
        (
            "copy",
            IommuMode::Copy {
                scratch: Gfn(SCRATCH_GFN),
                frames: SCRATCH_FRAMES,
            },
            false,
        ),
    ]
}

struct Rig {
    w: World,
    dma: GrantDma,
}

fn rig(version: u32, persistent: bool) -> Rig {
    let w = world(version);
    let dma = guest_dma(&w, persistent);
    Rig { w, dma }
}

fn device_memory(w: &World, mode: IommuMode) -> DevMem {
    let iommu = GrantIommu::new(w.xen.clone(), BACKEND, GUEST, mode).unwrap();
    let m = iommu.device_memory().unwrap();
    IommuMemory::new(m, iommu, true, ())
}

#[allow(clippy::too_many_arguments)]
fn go(
    rg: &Rig,
    ring: &mut Ring,
    queue: &mut Queue,
    dev: &mut Block,
    dm: &DevMem,
    t: u32,
    sector: u64,
    len: usize,
) -> (u32, u8) {
    request(
        rg.w.grants.memory(),
        &Dma::Grant(&rg.dma),
        ring,
        queue,
        dev,
        dm,
        Some(dm.iommu()),
        t,
        sector,
        DATA,
        len,
    )
}

#[test]
fn blk_serves_a_grant_mode_guest_round_trip_in_every_mode_and_both_versions() {
    for version in [1, 2] {
        for (name, mode, persistent) in modes() {
            let rg = rig(version, persistent);
            let mem = rg.w.grants.memory().clone();
            let img = TempImage::new(&format!("rt-{name}-{version}"), &vec![0u8; 1024 * SECTOR]);
            let mut dev = blk(img.path());
            let dm = device_memory(&rg.w, mode);
            let mut ring = Ring::new(&mem, &Dma::Grant(&rg.dma));
            dm.iommu()
                .map_ring(ring.ring_dma.unwrap(), RING_LEN as u64)
                .unwrap();
            let mut queue = ring.device_queue();

            // 64 KiB + 100 bytes at an unaligned offset: 18 pages, consecutive refs.
            let len = (64 << 10) + 512;
            let data = pattern(len, version as u8);
            mem.write_slice(&data, GuestAddress(DATA)).unwrap();
            let out = go(
                &rg,
                &mut ring,
                &mut queue,
                &mut dev,
                &dm,
                VIRTIO_BLK_T_OUT,
                8,
                len,
            );
            assert_eq!(out, (1, OK), "{name} v{version} write");
            assert!(
                img.contents()[8 * SECTOR..8 * SECTOR + len] == data[..],
                "{name} v{version}: on disk"
            );

            mem.write_slice(&vec![0u8; len], GuestAddress(DATA))
                .unwrap();
            let back = go(
                &rg,
                &mut ring,
                &mut queue,
                &mut dev,
                &dm,
                VIRTIO_BLK_T_IN,
                8,
                len,
            );
            assert_eq!(back, (1 + len as u32, OK), "{name} v{version} read");
            assert!(
                read_guest(&rg.w, DATA, len) == data,
                "{name} v{version}: read back"
            );

            let flush = go(
                &rg,
                &mut ring,
                &mut queue,
                &mut dev,
                &dm,
                VIRTIO_BLK_T_FLUSH,
                0,
                0,
            );
            assert_eq!(flush, (1, OK));
            let s = dm.iommu().stats();
            assert_eq!(s.faults, 0, "{name} v{version}: nothing denied");
            assert_eq!(s.lost_copies, 0);
            match mode {
                IommuMode::PerIo => {
                    assert_eq!(s.maps, s.unmaps + 2, "all but the 2 ring pages unmapped")
                }
                IommuMode::Copy { .. } => {
                    assert!(s.copies > 0);
                    assert_eq!(s.maps, 2, "only the ring is mapped");
                }
                IommuMode::Persistent { .. } => {
                    assert!(s.persistent_pages >= 2 + 17, "ring + pool pages kept");
                    assert_eq!(s.unmaps, 0);
                }
            }
            assert!(!rg.dma.is_broken(), "every per-request grant was revoked");
            assert_eq!(dev.counters().ok, 3);
            // Only the ring (and persistent pool) pages are still pinned.
            let in_use = rg.w.xen.maptrack_in_use(BACKEND);
            if persistent {
                assert!(in_use >= 19);
            } else {
                assert_eq!(in_use, 2, "{name} v{version}");
            }
        }
    }
}

#[test]
fn blk_refuses_ungranted_plain_readonly_and_foreign_buffers_and_guest_data_is_untouched() {
    for (name, mode, _) in modes() {
        let rg = rig(1, false);
        let mem = rg.w.grants.memory().clone();
        let img = TempImage::new(&format!("deny-{name}"), &pattern(64 * SECTOR, 3));
        let disk_before = img.contents();
        let mut dev = blk(img.path());
        let dm = device_memory(&rg.w, mode);
        let mut ring = Ring::new(&mem, &Dma::Grant(&rg.dma));
        dm.iommu()
            .map_ring(ring.ring_dma.unwrap(), RING_LEN as u64)
            .unwrap();
        let mut queue = ring.device_queue();
        mem.write_slice(&[0xee; SECTOR], GuestAddress(DATA))
            .unwrap();
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .unwrap();
        let hdr = rg.dma.map(Gpa(HDR), 16, DmaDirection::ToDevice).unwrap();
        let st = rg
            .dma
            .map(Gpa(STATUS), 1, DmaDirection::FromDevice)
            .unwrap();
        // A buffer the guest granted read-only, to another domain, or not at all.
        let ro = rg
            .dma
            .map(Gpa(DATA), SECTOR, DmaDirection::ToDevice)
            .unwrap();
        let foreign =
            rg.w.grants
                .grant_foreign_access(OTHER, Gfn(DATA / 4096), false)
                .unwrap();
        let foreign = grant_table::GrantDmaAddr::new(foreign, 0);
        let ungranted = grant_table::GrantDmaAddr::new(grant_table::GrantRef(4000), 0);
        for (what, target) in [
            ("read-only grant", ro.0),
            ("other domain's grant", foreign.0),
            ("ungranted ref", ungranted.0),
            ("guest-physical address", DATA),
        ] {
            let faults = dm.iommu().stats().faults;
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            ring.post(&[r(hdr.0, 16), w(target, SECTOR as u32), w(st.0, 1)]);
            virtio_contract::process_batch(&**dm.iommu(), &mut dev, 0, &mut queue, &dm).unwrap();
            let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
            assert_eq!(status, IOERR, "{name}: device read into {what}");
            assert!(dm.iommu().stats().faults > faults, "{name}: {what} faulted");
            assert_eq!(
                read_guest(&rg.w, DATA, SECTOR),
                vec![0xee; SECTOR],
                "{name}: guest data untouched by a refused {what}"
            );
        }
        assert_eq!(img.contents(), disk_before);
        // Every grant of the refused requests can be revoked: nothing stayed pinned.
        if matches!(mode, IommuMode::Persistent { .. }) {
            // A persistently mapping backend keeps what it touched until it releases.
            assert!(rg.dma.unmap(hdr, 16, DmaDirection::ToDevice).is_err());
            assert!(rg.dma.is_broken(), "unrevocable grant: device disabled");
            continue;
        }
        rg.dma.unmap(ro, SECTOR, DmaDirection::ToDevice).unwrap();
        rg.dma.unmap(hdr, 16, DmaDirection::ToDevice).unwrap();
        rg.dma.unmap(st, 1, DmaDirection::FromDevice).unwrap();
        assert!(!rg.dma.is_broken());
    }
}

#[test]
fn persistent_pool_stays_mapped_until_the_backend_releases_then_is_reclaimed() {
    let rg = rig(1, true);
    let mem = rg.w.grants.memory().clone();
    let img = TempImage::new("pers", &vec![0u8; 256 * SECTOR]);
    let mut dev = blk(img.path());
    let dm = device_memory(&rg.w, IommuMode::Persistent { max: 8 });
    let mut ring = Ring::new(&mem, &Dma::Grant(&rg.dma));
    dm.iommu()
        .map_ring(ring.ring_dma.unwrap(), RING_LEN as u64)
        .unwrap();
    let mut queue = ring.device_queue();
    // 16 pages of data: 8 kept persistently (the limit), the rest per I/O.
    let len = 16 * 4096;
    mem.write_slice(&pattern(len, 9), GuestAddress(DATA))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            go(
                &rg,
                &mut ring,
                &mut queue,
                &mut dev,
                &dm,
                VIRTIO_BLK_T_OUT,
                0,
                len
            ),
            (1, OK)
        );
    }
    let s = dm.iommu().stats();
    assert_eq!(s.persistent_pages, 2 + 8, "ring + the persistent limit");
    assert!(s.unmaps > 0, "pages past the limit were mapped per I/O");
    // Device teardown on the guest side while the backend still maps the pool.
    let deferred = rg.dma.teardown();
    assert_eq!(
        deferred, 8,
        "the 8 pool pages the backend maps are deferred"
    );
    assert!(rg.w.grants.process_deferred().is_empty());
    dm.iommu().release();
    let freed = rg.w.grants.process_deferred();
    assert_eq!(freed.len(), 8, "released exactly when the backend unmapped");
    assert_eq!(rg.w.xen.maptrack_in_use(BACKEND), 0);
    let _ = Arc::clone(rg.w.grants.xen());
}
