//! Benchmarks of the device's hot paths, with the figures the performance issue asks
//! for. Run with
//!
//! ```text
//! cargo bench -p virtio-iommu --bench device -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Criterion keeps every figure as JSON under `target/criterion/<group>/<bench>/`.
//!
//! How each figure is measured:
//!
//! - `requestq/map_unmap_4k`: MAP+UNMAP pairs per second through the real queue path.
//!   One endpoint attached to one domain that already holds 10,000 live 4 KiB mappings
//!   (installed through the queue in batches of 64). Each iteration posts a prepared
//!   batch of 32 MAP + 32 UNMAP requests (each MAP of a fresh 4 KiB IOVA outside the
//!   10,000 is followed by its UNMAP, so the domain is back at 10,000 mappings after
//!   every batch), runs `VirtioIommu::process_requestq` and reaps the used ring. The
//!   throughput is `Elements(32)`, so criterion reports pairs/s. Before measuring, one
//!   batch is checked to complete with S_OK everywhere (tails and the device's
//!   counters), and afterwards the counters must show no failed or unparseable request,
//!   so the benchmark cannot silently measure failures. `..._iotlb_warm` is the same
//!   after a backend touched all 10,000 mappings, so the endpoint's IOTLB is full (it
//!   holds at most `IOTLB_ENTRIES`, 256) and each UNMAP searches it.
//! - `translate/hit_*`: `vm_memory::Iommu::translate` of 8 bytes of a 4 KiB mapping
//!   already in the IOTLB, taking the first `MappedRange` and dropping the guard.
//!   `hit_1_cached`: only that page is cached; `hit_10k_cached`: the same page in a
//!   domain of 10,000 mappings after all were touched (the IOTLB then holds its
//!   capacity, 256 entries); `hit_10k_cached_rotating`: every iteration a different one
//!   of the 10,000 pages in a scrambled order: with a 256-entry IOTLB nearly all of
//!   these miss, so this shows the cost of a working set larger than the IOTLB.
//! - `translate/miss_fill`: the same translation on an IOTLB miss that fills the entry
//!   from the tables. Every timed translation is the first touch of a distinct page
//!   after the endpoint's IOTLB was emptied, so every one misses: `iter_custom` runs
//!   chunks of up to 10,000 translations (one per live mapping, scrambled order); before
//!   each chunk, untimed, the endpoint is DETACHed and re-ATTACHed through the queue
//!   (a second endpoint keeps the domain and its mappings alive), which invalidates its
//!   whole IOTLB. Only the translations are timed; the figure is time per translation.
//!   Physical addresses are chosen so that neighbouring mappings never coalesce into
//!   one IOTLB entry. `miss_fill_64_mapped` is the same in a domain of only 64
//!   mappings (small tables and IOTLB), to show how the miss cost scales.
//! - `backend/read_obj_u64_hit`: `IommuMemory::read_obj::<u64>` of an IOVA whose
//!   translation is cached: a full backend access (translation plus the guest memory
//!   read). `backend/read_obj_u64_no_iommu` is the same read on the bare
//!   `GuestMemoryMmap`, for comparison.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};
use virtio_iommu::fake_driver::{FakeGuest, FREE_RAM, MAX_BATCH, RAM_SIZE};
use virtio_iommu::{
    Counters, DomainId, EndpointConfig, EndpointId, EndpointIommu, IommuConfig, Iova, Request,
    RequestType, Status, VirtioIommu,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Iommu, IommuMemory, Permissions};

const PAGE: u64 = 0x1000;
const DOMAIN: DomainId = DomainId(1);
/// The endpoint under test.
const EP: u32 = 0x08;
/// A second endpoint in the same domain (miss benchmark only).
const EP2: u32 = 0x10;
/// Live mappings in the domain.
const LIVE: u64 = 10_000;
/// First IOVA of the live mappings.
const LIVE_IOVA: u64 = 0x1000_0000;
/// First IOVA of the fresh MAP+UNMAP pairs, above every live mapping.
const FRESH_IOVA: u64 = 0x8000_0000;
/// MAP+UNMAP pairs per measured batch.
const PAIRS: u64 = 32;
/// `VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE`.
const RW: u32 = 3;
/// Free guest pages the live mappings point into.
const FREE_PAGES: u64 = (RAM_SIZE as u64 - FREE_RAM) / PAGE;
/// Multiplier of the scrambled visiting order (a prime, coprime with every count used).
const STRIDE: u64 = 7_919;

/// IOVA of live mapping `i`.
fn live_iova(i: u64) -> u64 {
    LIVE_IOVA + i * PAGE
}

/// Guest-physical address of live mapping `i`: in free guest RAM (so it can be read),
/// two pages apart from its neighbour's so neighbouring mappings never coalesce in the
/// IOTLB (pages may alias; the IOMMU does not care).
fn live_phys(i: u64) -> u64 {
    FREE_RAM + (2 * i % FREE_PAGES) * PAGE
}

/// The `k`-th of `n` live mappings in a scrambled order that visits each exactly once
/// per `n` steps.
fn scrambled(k: u64, n: u64) -> u64 {
    k * STRIDE % n
}

fn map(iova: u64, phys: u64) -> Request {
    Request::Map {
        domain: DOMAIN,
        virt_start: Iova(iova),
        virt_end: Iova(iova + PAGE - 1),
        phys_start: phys,
        flags: RW,
    }
}

fn unmap(iova: u64) -> Request {
    Request::Unmap {
        domain: DOMAIN,
        virt_start: Iova(iova),
        virt_end: Iova(iova + PAGE - 1),
        reserved_nonzero: false,
    }
}

fn attach(endpoint: u32) -> Request {
    Request::Attach {
        domain: DOMAIN,
        endpoint: EndpointId(endpoint),
        flags: 0,
        reserved_nonzero: false,
    }
}

/// Requests answered with anything but S_OK, and requests returned unparsed.
fn failures(dev: &VirtioIommu) -> u64 {
    failures_of(&dev.counters())
}

fn failures_of(c: &Counters) -> u64 {
    let failed: u64 = RequestType::ALL
        .iter()
        .flat_map(|&t| Status::ALL[1..].iter().map(move |&s| (t, s)))
        .map(|(t, s)| c.count(t, s))
        .sum();
    failed + c.unparseable
}

/// Posts `reqs` as one batch, runs the device, and checks that every request completed
/// with S_OK (tails and counters: a zeroed tail alone would read as S_OK).
fn run_checked(dev: &mut VirtioIommu, g: &mut FakeGuest, reqs: &[Request]) {
    let before = dev.counters();
    let batch = g.prepare(reqs);
    g.post(&batch);
    dev.process_requestq(&mut g.requestq, &g.mem)
        .expect("the fake guest's used ring is valid");
    assert_eq!(g.reap(), reqs.len(), "device completed every request");
    assert!(
        g.batch_statuses(&batch, reqs)
            .iter()
            .all(|s| *s == Some(Status::Ok)),
        "every request of the batch is S_OK"
    );
    let after = dev.counters();
    for t in RequestType::ALL {
        let expected = reqs.iter().filter(|r| r.request_type() == t).count() as u64;
        assert_eq!(
            after.count(t, Status::Ok) - before.count(t, Status::Ok),
            expected,
            "{t:?} requests answered S_OK by the device"
        );
    }
    assert_eq!(failures(dev), failures_of(&before));
}

/// A device whose `endpoints` are attached to `DOMAIN`, which holds `live` 4 KiB
/// mappings, installed through the queue in batches of `MAX_BATCH`.
fn device_with_live(endpoints: &[u32], live: u64) -> (VirtioIommu, FakeGuest) {
    let cfg = IommuConfig {
        endpoints: endpoints.iter().map(|&e| EndpointConfig::new(e)).collect(),
        ..IommuConfig::default()
    };
    let mut dev = VirtioIommu::new(&cfg).expect("valid configuration");
    let mut g = FakeGuest::new(cfg.probe_size);
    g.negotiate(&mut dev);
    let attaches: Vec<Request> = endpoints.iter().map(|&e| attach(e)).collect();
    run_checked(&mut dev, &mut g, &attaches);
    let maps: Vec<Request> = (0..live).map(|i| map(live_iova(i), live_phys(i))).collect();
    for chunk in maps.chunks(MAX_BATCH) {
        run_checked(&mut dev, &mut g, chunk);
    }
    assert_eq!(dev.counters().mappings, live as usize);
    assert_eq!(failures(&dev), 0);
    (dev, g)
}

/// Translates 8 bytes at `iova` for reading; returns the guest-physical address.
fn translate(iommu: &EndpointIommu, iova: u64) -> GuestAddress {
    let mut it = iommu
        .translate(GuestAddress(iova), 8, Permissions::Read)
        .expect("mapped");
    it.next().expect("one range").base
}

/// Caches every live mapping in the endpoint's IOTLB.
fn warm_iotlb(iommu: &EndpointIommu) {
    for i in 0..LIVE {
        assert_eq!(translate(iommu, live_iova(i)), GuestAddress(live_phys(i)));
    }
}

fn bench_map_unmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("requestq");
    group.throughput(Throughput::Elements(PAIRS));
    for warm in [false, true] {
        let (mut dev, mut g) = device_with_live(&[EP], LIVE);
        if warm {
            warm_iotlb(&dev.endpoint_iommu(EndpointId(EP)).expect("configured"));
        }
        let reqs: Vec<Request> = (0..PAIRS)
            .flat_map(|j| {
                let iova = FRESH_IOVA + j * PAGE;
                [map(iova, live_phys(j)), unmap(iova)]
            })
            .collect();
        // Check one round, then re-post the very same prepared batch.
        run_checked(&mut dev, &mut g, &reqs);
        let batch = g.prepare(&reqs);
        let name = if warm {
            "map_unmap_4k/10k_live_iotlb_warm"
        } else {
            "map_unmap_4k/10k_live"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                g.post(&batch);
                let notify = dev
                    .process_requestq(&mut g.requestq, &g.mem)
                    .expect("the fake guest's used ring is valid");
                black_box(notify);
                g.reap()
            })
        });
        // Nothing the loop did may have failed.
        assert_eq!(failures(&dev), 0, "{name}: a request failed while measured");
        assert_eq!(dev.counters().mappings, LIVE as usize);
    }
    group.finish();
}

fn bench_translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate");
    let (dev, g) = device_with_live(&[EP], LIVE);
    let iommu = dev.endpoint_iommu(EndpointId(EP)).expect("configured");
    let iova = live_iova(LIVE / 2) + 0x10;
    let expect = GuestAddress(live_phys(LIVE / 2) + 0x10);
    assert_eq!(translate(&iommu, iova), expect); // now cached, alone
    group.bench_function("hit_1_cached", |b| {
        b.iter(|| translate(&iommu, black_box(iova)))
    });
    warm_iotlb(&iommu);
    assert_eq!(translate(&iommu, iova), expect);
    group.bench_function("hit_10k_cached", |b| {
        b.iter(|| translate(&iommu, black_box(iova)))
    });
    let order: Vec<u64> = (0..LIVE)
        .map(|k| live_iova(scrambled(k, LIVE)) + 0x10)
        .collect();
    let mut k = 0;
    group.bench_function("hit_10k_cached_rotating", |b| {
        b.iter(|| {
            k = if k + 1 == order.len() { 0 } else { k + 1 };
            translate(&iommu, black_box(order[k]))
        })
    });
    drop((iommu, dev, g));

    bench_miss(&mut group, "miss_fill", LIVE);
    bench_miss(&mut group, "miss_fill_64_mapped", 64);
    group.finish();
}

/// Translations that each miss the IOTLB and fill it, in a domain of `live` mappings.
/// A second endpoint keeps the domain alive while the measured one is detached and
/// re-attached, which empties its IOTLB; then each of the `live` pages is translated
/// once, in a scrambled order, timed.
fn bench_miss(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, live: u64) {
    let (mut dev, mut g) = device_with_live(&[EP, EP2], live);
    let iommu = dev.endpoint_iommu(EndpointId(EP)).expect("configured");
    let detach = Request::Detach {
        domain: DOMAIN,
        endpoint: EndpointId(EP),
    };
    let order: Vec<(u64, GuestAddress)> = (0..live)
        .map(|k| {
            let i = scrambled(k, live);
            (live_iova(i) + 0x10, GuestAddress(live_phys(i) + 0x10))
        })
        .collect();
    let flush = |dev: &mut VirtioIommu, g: &mut FakeGuest| {
        assert_eq!(g.send(dev, &detach), Status::Ok);
        assert_eq!(g.send(dev, &attach(EP)), Status::Ok);
    };
    // Every page translates, once per flush.
    flush(&mut dev, &mut g);
    for &(iova, phys) in &order {
        assert_eq!(translate(&iommu, iova), phys);
    }
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                flush(&mut dev, &mut g);
                let n = left.min(live) as usize;
                let start = Instant::now();
                for &(iova, _) in &order[..n] {
                    black_box(translate(&iommu, black_box(iova)));
                }
                total += start.elapsed();
                left -= n as u64;
            }
            total
        })
    });
    assert_eq!(failures(&dev), 0);
}

fn bench_backend(c: &mut Criterion) {
    let mut group = c.benchmark_group("backend");
    let (dev, g) = device_with_live(&[EP], LIVE);
    let iommu = dev.endpoint_iommu(EndpointId(EP)).expect("configured");
    let mem: IommuMemory<GuestMemoryMmap<()>, EndpointIommu> =
        IommuMemory::new(g.mem.clone(), iommu, true, ());
    let i = LIVE / 2;
    let iova = GuestAddress(live_iova(i) + 0x18);
    let phys = GuestAddress(live_phys(i) + 0x18);
    g.mem
        .write_obj(0x0123_4567_89ab_cdef_u64, phys)
        .expect("in RAM");
    assert_eq!(
        mem.read_obj::<u64>(iova).expect("mapped"),
        0x0123_4567_89ab_cdef
    );
    group.bench_function("read_obj_u64_hit", |b| {
        b.iter(|| mem.read_obj::<u64>(black_box(iova)).expect("mapped"))
    });
    group.bench_function("read_obj_u64_no_iommu", |b| {
        b.iter(|| g.mem.read_obj::<u64>(black_box(phys)).expect("in RAM"))
    });
    group.finish();
}

criterion_group!(benches, bench_map_unmap, bench_translate, bench_backend);
criterion_main!(benches);
