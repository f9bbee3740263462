//! virtio-blk requests served under each way a grant-mode guest can share its buffers,
//! side by side in one run with the `none` baseline (plain guest memory, no
//! translation). Run with
//!
//! ```text
//! cargo bench -p grant-table --bench grants -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! One iteration is one complete request as the fake guest driver does it: header,
//! data and status mapped, descriptor chain posted, `Block::process_queue`, the device
//! path's end of batch (`GrantIommu::complete`), used entry read, everything unmapped.
//! The ring is granted and mapped once beforehand in every grant mode.
//!
//! - `none`: the device gets guest-physical addresses and plain guest memory.
//! - `per_io`: per-I/O grants (`GrantDma::new`; grant + revoke per buffer) and the
//!   backend maps and unmaps each page per request (`IommuMode::PerIo`): Xen blkback
//!   without persistent grants.
//! - `persistent`: the guest copies through a pool granted once
//!   (`GrantDma::persistent`) and the backend maps each pool page once
//!   (`IommuMode::Persistent`): blkfront/blkback persistent grants.
//! - `copy`: per-I/O grants; the backend moves data with `GNTTABOP_copy` through its
//!   own scratch frames (`IommuMode::Copy`): QEMU's Xen disk backend.
//!
//! Groups `blk_read` (device writes 4 KiB / 64 KiB into the guest) and `blk_write`
//! (device reads them; `Block` syncs the image after every write, so the image lives on
//! `/dev/shm` when there is one). At the end the bench prints each mode's time per request as a
//! ratio to `none` from criterion's own estimates (`target/criterion/.../new/estimates.json`).

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up fails by panicking

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grant_table::iommu::DEFAULT_MAX_PERSISTENT;
use grant_table::{Gfn, GrantIommu, IommuMode};
use std::path::PathBuf;
use virtio_bindings::virtio_blk::*;
use vm_memory::IommuMemory;

const SIZES: [usize; 2] = [4096, 65536];
const MODES: [&str; 4] = ["none", "per_io", "persistent", "copy"];

fn bench_mode(c: &mut Criterion, group: &str, t: u32) {
    let mut g = c.benchmark_group(group);
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        // Block syncs every write: keep the image on tmpfs so the sync does not drown
        // the sharing mode's cost.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let img = TempImage::new_in(
            &dir,
            &format!("bench-{group}-{size}"),
            &vec![0u8; 1024 * 512],
        );
        for mode in MODES {
            let w = world(1);
            let mem = w.grants.memory().clone();
            let sector = 16;
            let mut dev = blk(img.path());
            if mode == "none" {
                let mut ring = Ring::new(&mem, &Dma::None);
                let mut queue = ring.device_queue();
                g.bench_with_input(BenchmarkId::new(mode, size), &size, |b, &s| {
                    b.iter(|| {
                        let out = request(
                            &mem,
                            &Dma::None,
                            &mut ring,
                            &mut queue,
                            &mut dev,
                            &mem,
                            None,
                            t,
                            sector,
                            DATA,
                            s,
                        );
                        assert_eq!(out.1, OK);
                    })
                });
                continue;
            }
            let (dma, imode) = match mode {
                "per_io" => (guest_dma(&w, false), IommuMode::PerIo),
                "persistent" => (
                    guest_dma(&w, true),
                    IommuMode::Persistent {
                        max: DEFAULT_MAX_PERSISTENT,
                    },
                ),
                _ => (
                    guest_dma(&w, false),
                    IommuMode::Copy {
                        scratch: Gfn(SCRATCH_GFN),
                        frames: SCRATCH_FRAMES,
                    },
                ),
            };
            let iommu = GrantIommu::new(w.xen.clone(), BACKEND, GUEST, imode).unwrap();
            let dm = IommuMemory::new(iommu.device_memory().unwrap(), iommu, true, ());
            let mut dev = blk(img.path());
            let d = Dma::Grant(&dma);
            let mut ring = Ring::new(&mem, &d);
            dm.iommu()
                .map_ring(ring.ring_dma.unwrap(), RING_LEN as u64)
                .unwrap();
            let mut queue = ring.device_queue();
            g.bench_with_input(BenchmarkId::new(mode, size), &size, |b, &s| {
                b.iter(|| {
                    let out = request(
                        &mem,
                        &d,
                        &mut ring,
                        &mut queue,
                        &mut dev,
                        &dm,
                        Some(dm.iommu()),
                        t,
                        sector,
                        DATA,
                        s,
                    );
                    assert_eq!(out.1, OK);
                })
            });
            let st = dm.iommu().stats();
            assert_eq!(
                (st.faults, st.lost_copies),
                (0, 0),
                "{mode}: nothing refused"
            );
            assert!(!dma.is_broken());
        }
    }
    g.finish();
}

fn estimate_ns(group: &str, mode: &str, size: usize) -> Option<f64> {
    let mut roots = Vec::new();
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        roots.push(PathBuf::from(t));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    roots.push(PathBuf::from("target"));
    roots.into_iter().find_map(|r| {
        let p = r.join(format!(
            "criterion/{group}/{mode}/{size}/new/estimates.json"
        ));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        v["mean"]["point_estimate"].as_f64()
    })
}

fn blk_requests(c: &mut Criterion) {
    bench_mode(c, "blk_read", VIRTIO_BLK_T_IN);
    bench_mode(c, "blk_write", VIRTIO_BLK_T_OUT);
    println!("\nmean time per request, and ratio to `none` (same run):");
    for group in ["blk_read", "blk_write"] {
        for size in SIZES {
            let base = estimate_ns(group, "none", size);
            let mut line = format!("{group:>9} {:>5} KiB:", size / 1024);
            for mode in MODES {
                match (estimate_ns(group, mode, size), base) {
                    (Some(ns), Some(b)) => {
                        line += &format!("  {mode} {:.1} µs ({:.2}×)", ns / 1000.0, ns / b)
                    }
                    _ => line += &format!("  {mode} n/a"),
                }
            }
            println!("{line}");
        }
    }
}

criterion_group!(benches, blk_requests);
criterion_main!(benches);
