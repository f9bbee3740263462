//! The survey's out-of-process placement with the real backend, `aperture backend`
//! (this package's binary) in a child process: one short cell per mode that has one,
//! checked against what the backend itself reports — IOTLB misses behind the
//! virtio-iommu and an address space far below guest RAM, all of RAM without it, the
//! pool alone in pool mode — and the data checked as in process (the first blk read
//! against the image, rng bytes not all zero).
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::path::PathBuf;
use std::time::Duration;
use survey::modes::{POOL_SIZE, RAM_SIZE};
use survey::remote::{not_measured, run_one_remote, BackendCommand};
use survey::run::{prepare_disk, Pattern, SLICES};
use survey::{Budget, Mode};
use test_kit::TempDir;

const TINY: Budget = Budget {
    per_cell: Duration::ZERO,
    min_requests: 16,
    calibration_iters: 0,
};

fn backend() -> BackendCommand {
    BackendCommand::aperture(env!("CARGO_BIN_EXE_aperture"))
}

/// The disk image, in a directory removed when the test ends, whether it passed or not.
fn disk(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(&format!("aperture-oop-{tag}"));
    let p = dir.join("disk.img");
    prepare_disk(&p).unwrap();
    (dir, p)
}

#[test]
fn each_mode_out_of_process_serves_requests_and_the_backend_holds_what_the_mode_allows() {
    let (_dir, d) = disk("modes");
    let n = 16 * u64::from(SLICES);
    for (mode, pattern) in [
        (Mode::None, Pattern::Blk4kRandom),
        (Mode::ViommuStrict, Pattern::Blk64k),
        (Mode::ViommuLazy, Pattern::Blk4kRandom),
        (Mode::Pool, Pattern::Blk1mSeq),
        (Mode::ViommuStrict, Pattern::Rng64),
        (Mode::ViommuStrict, Pattern::Net1500),
        (Mode::Pool, Pattern::Net64),
        (Mode::InflightCopy, Pattern::Blk64k),
        (Mode::InflightMap, Pattern::Blk64k),
    ] {
        let what = format!("{} {}", mode.name(), pattern.name());
        assert_eq!(not_measured(mode, pattern), None, "{what}");
        // The map form's threshold at a page: the 8 KiB data pieces get windows.
        let threshold = if mode == Mode::InflightMap {
            4096
        } else {
            32 << 10
        };
        let m = run_one_remote(mode, pattern, &d, TINY, threshold, &backend())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.requests, n, "{what}");
        let b = m
            .backend
            .clone()
            .expect("an out-of-process cell has backend figures");
        // The backend's CPU is part of the cell's.
        assert!(
            b.cpu > Duration::ZERO && b.cpu < m.cpu,
            "{what}: {:?} of {:?}",
            b.cpu,
            m.cpu
        );
        assert_eq!(m.stats.exposure_peak, b.peak_mapped_bytes, "{what}");
        // The cell already checked the device's own counters (every request served,
        // none refused: `BackendFigures::check_served`); they are there to check.
        if pattern != Pattern::Rng64 {
            assert!(b.device.is_object(), "{what}: {}", b.device);
        }
        match mode {
            Mode::None => {
                // No IOMMU: the memory table is all of RAM, mapped whole.
                assert_eq!(b.mode, "plain", "{what}");
                assert_eq!(
                    (b.table_bytes, b.peak_mapped_bytes),
                    (RAM_SIZE, RAM_SIZE),
                    "{what}"
                );
                assert_eq!((b.misses, b.invalidates), (0, 0), "{what}");
            }
            Mode::ViommuStrict | Mode::ViommuLazy => {
                assert_eq!(b.mode, "iotlb", "{what}");
                assert_eq!(b.table_bytes, RAM_SIZE, "{what}: the table covers RAM");
                // Every request's buffers are fresh IOVAs: each reaches the back-end
                // as an UPDATE (pushed at MAP, or answering a miss when the push came
                // late), and every UNMAP is an acknowledged INVALIDATE (lazy: the
                // queued ones are flushed by the cell's end).
                let buffers = pattern.buffers();
                assert!(b.updates >= n * buffers, "{what}: {} updates", b.updates);
                assert!(b.updates >= b.misses, "{what}: every miss answered");
                assert_eq!(b.invalidates, n * buffers, "{what}");
                assert!(
                    b.peak_mapped_bytes < RAM_SIZE / 8,
                    "{what}: {} bytes mapped at peak",
                    b.peak_mapped_bytes
                );
                if mode == Mode::ViommuStrict {
                    // The ring, and one request's header, data and status pages.
                    let bound = 3 * 4096 + 4096 + pattern.bytes() as u64 + 4096;
                    assert!(
                        b.peak_mapped_bytes <= bound,
                        "{what}: {}",
                        b.peak_mapped_bytes
                    );
                }
            }
            Mode::Pool => {
                // The memory table is the pool's file alone.
                assert_eq!(b.mode, "plain", "{what}");
                assert_eq!(
                    (b.table_bytes, b.peak_mapped_bytes),
                    (POOL_SIZE, POOL_SIZE),
                    "{what}"
                );
            }
            Mode::InflightCopy => {
                // The memory table is the front-end's shadow alone (ring and bounce
                // arena), never guest RAM; the backend reads copies of the readable
                // bytes in flight: one request's 16-byte header at a time.
                assert_eq!(b.mode, "plain", "{what}");
                assert!(
                    b.table_bytes >= device_host::vhost_user::DEFAULT_ARENA_BYTES
                        && b.table_bytes < RAM_SIZE / 4,
                    "{what}: a table of {} bytes",
                    b.table_bytes
                );
                assert_eq!(b.peak_mapped_bytes, 16, "{what}");
                assert_eq!((b.misses, b.updates, b.invalidates), (0, 0, 0), "{what}");
            }
            Mode::InflightMap => {
                // The backend translates (IOTLB mode, guest RAM and the shadow in its
                // table); each 8 KiB data piece is one acknowledged UPDATE before the
                // request and one acknowledged INVALIDATE after it; it reaches the
                // header's copy and one request's pieces at a time.
                assert_eq!(b.mode, "iotlb", "{what}");
                assert!(b.table_bytes > RAM_SIZE, "{what}: RAM and the shadow");
                let pieces = pattern.buffers() - 2;
                assert_eq!(
                    (b.updates, b.invalidates),
                    (n * pieces, n * pieces),
                    "{what}"
                );
                assert_eq!(b.misses, 0, "{what}");
                assert_eq!(b.peak_mapped_bytes, 16 + pattern.bytes() as u64, "{what}");
            }
            _ => unreachable!(),
        }
    }
}

#[test]
fn auto_out_of_process_keeps_the_pool_window_and_maps_only_what_it_does_not_bounce() {
    let (_dir, d) = disk("auto");
    let n = 16 * u64::from(SLICES);
    let pattern = Pattern::Blk64k;
    // blk 64 KiB: a 16-byte header, eight 8 KiB pieces, a status byte.
    let pieces = pattern.buffers() - 2;
    for (threshold, mapped_per_request) in [(32 << 10, 0), (4096, pieces)] {
        let what = format!("auto threshold {threshold}");
        let m = run_one_remote(Mode::Auto, pattern, &d, TINY, threshold, &backend())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.requests, n, "{what}");
        let b = m.backend.clone().expect("backend figures");
        assert_eq!(b.mode, "iotlb", "{what}");
        // Each piece auto maps is a fresh IOVA: pushed at MAP (or missed, when the
        // push comes late), and an acknowledged INVALIDATE at UNMAP. Bounced buffers
        // (the header and status always, the pieces below the threshold) hit the
        // pool's window, pushed when the pool was mapped (before the timed part).
        assert_eq!(b.invalidates, n * mapped_per_request, "{what}");
        assert!(b.updates >= n * mapped_per_request, "{what}");
        assert!(
            b.misses <= n * mapped_per_request,
            "{what}: {} misses",
            b.misses
        );
        assert_eq!(m.stats.map_ops, 2 * n * mapped_per_request, "{what}");
        // It held the pool and at most one request's mapped pieces.
        assert!(b.peak_mapped_bytes >= POOL_SIZE, "{what}");
        assert!(
            b.peak_mapped_bytes <= POOL_SIZE + pattern.bytes() as u64 + 3 * 4096,
            "{what}: {}",
            b.peak_mapped_bytes
        );
    }
}

#[test]
fn cells_without_an_out_of_process_backend_are_refused_not_faked() {
    let (_dir, d) = disk("gaps");
    for (mode, pattern) in [
        (Mode::GrantCopy, Pattern::Net64),
        (Mode::GrantMap, Pattern::Rng64),
    ] {
        let why = not_measured(mode, pattern).expect("a reason");
        let e = run_one_remote(mode, pattern, &d, TINY, 32 << 10, &backend())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not measured") && e.contains(why), "{e}");
    }
}

#[test]
fn a_backend_that_cannot_start_is_a_clear_error() {
    let (_dir, d) = disk("nostart");
    let missing = BackendCommand::aperture("/nonexistent/aperture");
    let e = run_one_remote(Mode::None, Pattern::Rng64, &d, TINY, 0, &missing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/aperture"), "{e}");
    // A program that exits at once instead of listening.
    let e = run_one_remote(
        Mode::None,
        Pattern::Rng64,
        &d,
        TINY,
        0,
        &BackendCommand::new("/bin/false", []),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("exited"), "{e}");
}
