//! Benchmarks of the restricted pool, side by side in one run. Run with
//!
//! ```text
//! cargo bench -p bounce-pool --bench pool -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Criterion keeps every figure as JSON under `target/criterion/<group>/<bench>/`.
//!
//! - `bounce/memcpy/<size>`: `copy_from_slice` of `size` bytes between two host
//!   buffers — the floor a bounce buffer is compared with.
//! - `bounce/to_device/<size>`: `BouncePool::map` + `unmap` of a `ToDevice` buffer of
//!   `size` bytes in 16 MiB of guest RAM (one copy in, none back): slot search,
//!   bookkeeping and one copy, directly comparable with `memcpy` (same bytes moved).
//! - `bounce/bidirectional/<size>`: the same for `Bidirectional` (copy in at map, copy
//!   back at unmap: twice the bytes), next to `bounce/memcpy_twice/<size>`, two
//!   `copy_from_slice` of `size` bytes.
//! - `alloc/map_unmap_64b`: map + unmap pairs per second of a 64-byte `ToDevice`
//!   buffer on one thread (allocator cost; the copy is negligible).
//! - `alloc/map_unmap_64b_2threads_{1,4}areas`: the same on two threads at once, each
//!   doing half the pairs, in a pool of one area (one lock) or four; wall time per pair.
//!
//! Sizes are 512 B, 4 KiB, 64 KiB and 256 KiB (the largest mapping). Throughput is in
//! bytes (bounce) or elements (alloc), so criterion reports GiB/s and pairs/s.

use bounce_pool::{Attrs, BouncePool, DeviceDma, DmaDirection, Gpa, PoolConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const POOL: u64 = 0x80_0000;
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
        let src = vec![0x5au8; size];
        let mut dst = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });
        g.bench_with_input(BenchmarkId::new("to_device", size), &size, |b, &s| {
            b.iter(|| map_unmap(&mem, &pool, BUF, s, DmaDirection::ToDevice))
        });
        let mut back = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("memcpy_twice", size), &size, |b, _| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
                back.copy_from_slice(black_box(&dst));
                black_box(&mut back);
            })
        });
        g.bench_with_input(BenchmarkId::new("bidirectional", size), &size, |b, &s| {
            b.iter(|| map_unmap(&mem, &pool, BUF, s, DmaDirection::Bidirectional))
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
