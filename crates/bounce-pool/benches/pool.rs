//! Benchmarks of the restricted pool, all side by side in one run:
//!
//! ```text
//! cargo bench -p bounce-pool --bench pool
//! ```
//!
//! Criterion keeps every figure as JSON under `target/criterion/<group>/<bench>/`.
//!
//! # Bounce throughput against `memcpy` (group `bounce`)
//! The question is what bouncing costs over copying the same bytes, so both sides copy
//! the same bytes between the same addresses:
//!
//! - `bounce/to_device/<size>`: [`BouncePool::map`] + [`BouncePool::unmap`] of a
//!   `ToDevice` buffer — exactly swiotlb's copies for that direction: one copy of
//!   `size` bytes from the original into the pool at map, none at unmap. Compare with
//!   `bounce/memcpy_1x/<size>`: one `memcpy` of `size` bytes from the original's host
//!   address to the host address of the bounce slot the pool hands out (asserted).
//! - `bounce/from_device/<size>`: the same for `FromDevice` (a disk read): swiotlb
//!   copies the original in at map (so no stale data leaks, Linux
//!   `swiotlb_tbl_map_single`) and the buffer back at unmap — two copies of `size`
//!   bytes. Compare with `bounce/memcpy_2x/<size>`: the same two `memcpy`s, original →
//!   slot → original.
//!
//! Both sides run in a loop on warm caches (the pool reuses the slot a release just
//! gave back, and the `memcpy` touches the same lines), so the difference is the
//! pool's fixed cost per map + unmap: argument checks, one area lock per map and per
//! unmap, the slot search, the guest-memory region lookups of the copies. Sizes are
//! 512 B, 4 KiB, 64 KiB and 256 KiB (the largest mapping). Throughput is in bytes of
//! buffer (not bytes copied), so criterion's GiB/s of a pair are comparable; the
//! ratio to report is `memcpy time / bounce time` of the same size and direction.
//!
//! # Allocator operations per second (group `alloc`)
//! - `alloc/map_unmap_64b`: map + unmap pairs of a 64-byte `ToDevice` buffer on one
//!   thread (the copy is negligible: allocator cost).
//! - `alloc/map_unmap_64b_2threads_{1,4}areas`: the same on two threads at once, each
//!   doing half the pairs, in a pool of one area (one lock, as Linux builds a
//!   restricted pool) or four; wall time per pair, so pairs/s is the pool's total.

use bounce_pool::{Attrs, BouncePool, DeviceDma, DmaDirection, Gpa, PoolConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// The pool: 4 MiB at 8 MiB of 16 MiB of guest RAM.
const POOL: u64 = 0x80_0000;
/// The original buffers (page-aligned, like a block layer's pages).
const BUF: u64 = 0x10_0000;

fn setup(areas: usize) -> (Mem, Arc<BouncePool>) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("16 MiB of RAM");
    let pool = BouncePool::new(
        &mem,
        &PoolConfig {
            base: Gpa(POOL),
            size: 4 << 20,
            areas,
        },
    )
    .expect("a valid pool");
    (mem, Arc::new(pool))
}

fn map_unmap(mem: &Mem, pool: &BouncePool, orig: u64, size: usize, dir: DmaDirection) {
    let d = DeviceDma::default();
    let a = pool
        .map(mem, &d, Gpa(orig), size, dir)
        .expect("the pool has room");
    pool.unmap(mem, black_box(a), size, dir, Attrs::NONE)
        .expect("just mapped");
}

fn bounce(c: &mut Criterion) {
    let (mem, pool) = setup(1);
    let mut g = c.benchmark_group("bounce");
    for size in [512usize, 4096, 65536, 262144] {
        g.throughput(Throughput::Bytes(size as u64));
        // The slot the bounce uses: an empty pool with the cursor pulled back hands
        // out its first slot every time.
        let slot = pool
            .map(
                &mem,
                &DeviceDma::default(),
                Gpa(BUF),
                size,
                DmaDirection::ToDevice,
            )
            .expect("room");
        pool.unmap(&mem, slot, size, DmaDirection::ToDevice, Attrs::NONE)
            .expect("mapped");
        assert_eq!(slot.0, POOL, "the bounce reuses the first slot");
        let orig = mem.get_slice(GuestAddress(BUF), size).expect("RAM");
        let bounce = mem.get_slice(GuestAddress(POOL), size).expect("pool");
        g.bench_with_input(BenchmarkId::new("memcpy_1x", size), &size, |b, _| {
            b.iter(|| black_box(&orig).copy_to_volatile_slice(black_box(bounce)))
        });
        g.bench_with_input(BenchmarkId::new("to_device", size), &size, |b, &s| {
            b.iter(|| map_unmap(&mem, &pool, BUF, s, DmaDirection::ToDevice))
        });
        g.bench_with_input(BenchmarkId::new("memcpy_2x", size), &size, |b, _| {
            b.iter(|| {
                black_box(&orig).copy_to_volatile_slice(black_box(bounce));
                black_box(&bounce).copy_to_volatile_slice(black_box(orig));
            })
        });
        g.bench_with_input(BenchmarkId::new("from_device", size), &size, |b, &s| {
            b.iter(|| map_unmap(&mem, &pool, BUF, s, DmaDirection::FromDevice))
        });
    }
    g.finish();
    assert_eq!(pool.stats().used_slots, 0);
    assert_eq!(pool.stats().failed_maps, 0, "no measured call failed");
}

/// `iters` map+unmap pairs split over `threads` threads; wall time.
fn threaded(mem: &Mem, pool: &Arc<BouncePool>, threads: u64, iters: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (mem, pool) = (mem.clone(), pool.clone());
            s.spawn(move || {
                for _ in 0..iters / threads {
                    map_unmap(&mem, &pool, BUF + t * 0x1000, 64, DmaDirection::ToDevice);
                }
            });
        }
    });
    start.elapsed()
}

fn alloc(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc");
    g.throughput(Throughput::Elements(1));
    let (mem, pool) = setup(1);
    g.bench_function("map_unmap_64b", |b| {
        b.iter(|| map_unmap(&mem, &pool, BUF, 64, DmaDirection::ToDevice))
    });
    for areas in [1usize, 4] {
        let (mem, pool) = setup(areas);
        g.bench_function(format!("map_unmap_64b_2threads_{areas}areas"), |b| {
            b.iter_custom(|iters| threaded(&mem, &pool, 2, iters.max(2)))
        });
        assert_eq!(pool.stats().used_slots, 0);
        assert_eq!(pool.stats().failed_maps, 0);
    }
    g.finish();
}

criterion_group!(benches, bounce, alloc);
criterion_main!(benches);
