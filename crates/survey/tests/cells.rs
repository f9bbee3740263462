//! Every mode serves every pattern correctly (the first request's data is checked
//! against the disk image, the rng's against zeros, the net sink's frame count) and
//! counts what the survey reports as the mode's rules say it must.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::time::Duration;
use survey::modes::{POOL_SIZE, RAM_SIZE};
use survey::run::{prepare_disk, Pattern, SLICES};
use survey::{calibrate, run_one, Budget, Mode};
use virtio_iommu::fake_driver::MAX_BATCH;

const TINY: Budget = Budget {
    per_cell: Duration::ZERO,
    min_requests: 16,
    calibration_iters: 16,
};

fn disk(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("aperture-survey-{tag}-{}.img", std::process::id()));
    prepare_disk(&p).unwrap();
    p
}

/// Bytes of a request's buffers besides its payload: blk header 16 and status 1, net
/// header 12.
fn overhead(p: Pattern) -> u64 {
    match p {
        Pattern::Net64 | Pattern::Net1500 => 12,
        Pattern::Rng64 => 0,
        _ => 17,
    }
}

#[test]
fn every_mode_serves_every_pattern_and_counts_by_its_rules() {
    let d = disk("all");
    for pattern in Pattern::ALL {
        for mode in Mode::ALL {
            let m = run_one(mode, pattern, &d, TINY, 2048).unwrap_or_else(|e| {
                panic!("{} {}: {e}", mode.name(), pattern.name());
            });
            let what = format!("{} {}", mode.name(), pattern.name());
            // 16 requests in each slice.
            let n = 16 * u64::from(SLICES);
            assert_eq!(m.requests, n, "{what}");
            assert_eq!(m.bytes, n * pattern.bytes() as u64, "{what}");
            assert_eq!(m.slice_cpu_ns_per_request.len(), SLICES as usize, "{what}");
            // blk: header, the data's pieces, status; net: header, payload; rng: one.
            let buffers = pattern.buffers();
            let pieces = match pattern {
                Pattern::Blk4kRandom => 1,
                Pattern::Blk64k => 8,
                Pattern::Blk1mSeq => 128,
                _ => 0,
            };
            if pieces > 0 {
                assert_eq!(buffers, pieces + 2, "{what}");
            }
            let s = m.stats;
            match mode {
                Mode::None => {
                    assert_eq!(
                        (s.map_ops, s.copy_bytes, s.iommu_kicks),
                        (0, 0, 0),
                        "{what}"
                    );
                    assert_eq!(s.exposure_peak, RAM_SIZE, "{what}");
                }
                Mode::ViommuStrict | Mode::ViommuLazy => {
                    // One MAP and one UNMAP per buffer, nothing copied, and the backend
                    // reaches far less than RAM.
                    assert_eq!(s.map_ops, n * 2 * buffers, "{what}");
                    // Strict: a kick for each. Lazy: the UNMAPs ride with the next
                    // MAP's kick, except that a queue of MAX_BATCH - 1 is flushed in a
                    // kick of its own, and the cell ends with one flush.
                    let kicks = if mode == Mode::ViommuStrict {
                        n * 2 * buffers
                    } else {
                        n * (buffers + buffers / (MAX_BATCH as u64 - 1)) + 1
                    };
                    assert_eq!(s.iommu_kicks, kicks, "{what}");
                    assert_eq!(s.copy_bytes, 0, "{what}");
                    assert!(
                        s.exposure_peak < RAM_SIZE / 8,
                        "{what}: {}",
                        s.exposure_peak
                    );
                }
                Mode::GrantMap | Mode::GrantCopy => {
                    // The backend maps (or copies) and unmaps every granted page of a
                    // request; exposure is what is granted at once, far below RAM.
                    assert!(s.map_ops >= n * buffers, "{what}: {}", s.map_ops);
                    assert!(
                        s.exposure_peak < RAM_SIZE / 8,
                        "{what}: {}",
                        s.exposure_peak
                    );
                    if mode == Mode::GrantCopy {
                        assert!(s.copy_bytes >= m.bytes, "{what}: every byte copied");
                    } else {
                        assert_eq!(s.copy_bytes, 0, "{what}");
                    }
                }
                Mode::GrantPersistent => {
                    // Mapped once: no grant operation per request, one copy per byte.
                    assert_eq!(s.map_ops, 0, "{what}");
                    assert_eq!(s.copy_bytes, m.bytes + n * overhead(pattern), "{what}");
                }
                Mode::Pool => {
                    assert_eq!(s.map_ops, 0, "{what}");
                    assert!(s.copy_bytes >= m.bytes, "{what}: every byte bounced");
                    assert_eq!(s.exposure_peak, POOL_SIZE, "{what}");
                }
                Mode::Auto => {
                    // 2048-byte threshold: headers, status bytes and small packets bounce,
                    // the blk data pieces (4 and 8 KiB) are mapped.
                    assert_eq!(s.map_ops, n * 2 * pieces, "{what}");
                    assert_eq!(s.iommu_kicks, s.map_ops, "{what}: strict");
                    assert!(s.exposure_peak >= POOL_SIZE, "{what}");
                    assert!(s.exposure_peak < POOL_SIZE + (4 << 20), "{what}");
                }
                Mode::InflightCopy => {
                    // No guest change: nothing mapped, no IOMMU. Every byte in flight is
                    // copied once (in, or back), and the device reaches only the
                    // readable bytes of the request in flight.
                    assert_eq!((s.map_ops, s.iommu_kicks), (0, 0), "{what}");
                    assert_eq!(s.copy_bytes, m.bytes + n * overhead(pattern), "{what}");
                    let readable = match pattern {
                        Pattern::Net64 | Pattern::Net1500 => 12 + pattern.bytes() as u64,
                        Pattern::Rng64 => 0,
                        _ => 16,
                    };
                    assert_eq!(s.exposure_peak, readable, "{what}");
                }
                Mode::InflightMap => {
                    // Threshold 2048: the blk data pieces (4 and 8 KiB, whole pages)
                    // are shown in place, one window opened and closed each; the
                    // header, the status and every net and rng buffer are bounced.
                    assert_eq!(s.map_ops, n * 2 * pieces, "{what}");
                    assert_eq!(s.iommu_kicks, 0, "{what}");
                    let (copied, exposed) = match pattern {
                        Pattern::Net64 | Pattern::Net1500 => {
                            (m.bytes + n * 12, 12 + pattern.bytes() as u64)
                        }
                        Pattern::Rng64 => (m.bytes, 0),
                        _ => (n * 17, 16 + pattern.bytes() as u64),
                    };
                    assert_eq!(s.copy_bytes, copied, "{what}");
                    assert_eq!(s.exposure_peak, exposed, "{what}");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&d);
}

#[test]
fn strict_unmap_leaves_nothing_reachable_but_the_ring() {
    // After the cell, strict mode has unmapped every buffer: what stays is the ring.
    let d = disk("strict");
    let m = run_one(Mode::ViommuStrict, Pattern::Blk64k, &d, TINY, 0).unwrap();
    // Peak: ring (3 pages) + header page + 64 KiB + status page at most.
    assert!(m.stats.exposure_peak <= 3 * 4096 + 4096 + (64 << 10) + 4096);
    let _ = std::fs::remove_file(&d);
}

#[test]
fn calibration_finds_where_mapping_beats_copying_and_auto_takes_that_threshold() {
    let c = calibrate(16, None).unwrap();
    let sizes: Vec<usize> = c.points.iter().map(|p| p.size).collect();
    assert_eq!(sizes, survey::CALIBRATION_SIZES);
    for p in &c.points {
        assert!(
            p.bounce_ns > 0.0 && p.map_ns > 0.0 && p.auto_ns > 0.0,
            "{p:?}"
        );
    }
    // Whatever the machine, if a crossover is reported, mapping is no dearer from it on,
    // and auto bounces below it.
    match c.crossover {
        Some(x) => {
            assert!(c
                .points
                .iter()
                .filter(|p| p.size >= x)
                .all(|p| p.map_ns <= p.bounce_ns));
            assert_eq!(c.auto_threshold, x);
        }
        None => assert_eq!(c.auto_threshold, 4096),
    }
    assert_eq!(calibrate(16, Some(1000)).unwrap().auto_threshold, 1000);
}

#[test]
fn out_of_process_cells_are_every_pattern_but_grants_and_the_shadowed_network_sink() {
    use survey::remote::not_measured;
    for pattern in Pattern::ALL {
        for mode in Mode::ALL {
            let grants = matches!(
                mode,
                Mode::GrantMap | Mode::GrantPersistent | Mode::GrantCopy
            );
            // The front-end shadows only virtio-blk and virtio-rng.
            let shadowed_net = matches!(mode, Mode::InflightCopy | Mode::InflightMap)
                && matches!(pattern, Pattern::Net64 | Pattern::Net1500);
            let why = not_measured(mode, pattern);
            assert_eq!(
                why.is_some(),
                grants || shadowed_net,
                "{} {}: {why:?}",
                mode.name(),
                pattern.name()
            );
            if grants {
                assert!(why.is_some_and(|w| w.contains("grant tables")));
            } else if shadowed_net {
                assert!(why.is_some_and(|w| w.contains("virtio-blk and virtio-rng")));
            }
        }
    }
}
