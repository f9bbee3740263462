//! Property tests of the pool against a simple reference model: a list of live
//! allocations with their slots, and shadow copies of every original and bounce
//! buffer. After every step: no slot belongs to two allocations, the used count is the
//! model's, every byte is where the model says, and a map refused as "full" really had
//! no room (checked by brute force over the free map with swiotlb's placement rules).
//! Plus a multi-threaded run (item 10 of the list in `rules.rs`): threads mapping and
//! unmapping at once never share a slot and leave the counters consistent.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use bounce_pool::*;
use proptest::prelude::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const POOL: u64 = 0x80_0000;
/// Two segments, two areas.
const POOL_SIZE: u64 = 2 * SEGMENT_BYTES;
/// Original buffers: one 512 KiB region per model buffer index.
const BUF: u64 = 0x100_0000;
const BUF_STRIDE: u64 = 0x8_0000;
const BUFS: u64 = 16;

fn ram() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap()
}

fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        size: usize,
        offset: u64,
        dir: u8,
        nvme: bool,
    },
    Unmap {
        pick: usize,
        skip: bool,
    },
    DeviceWrite {
        pick: usize,
        at: usize,
        len: usize,
        seed: u8,
    },
    CpuWrite {
        pick: usize,
        at: usize,
        len: usize,
        seed: u8,
    },
    SyncCpu {
        pick: usize,
        at: usize,
        len: usize,
    },
    SyncDevice {
        pick: usize,
        at: usize,
        len: usize,
    },
    Coherent {
        size: usize,
    },
    FreeCoherent {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        1usize..2048,
        2048usize..16384,
        16384usize..=MAX_MAPPING_SIZE
    ];
    prop_oneof![
        4 => (size, 0u64..0x1000, 0u8..3, any::<bool>())
            .prop_map(|(size, offset, dir, nvme)| Op::Map { size, offset, dir, nvme }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, skip)| Op::Unmap { pick, skip }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>(), any::<u8>())
            .prop_map(|(pick, at, len, seed)| Op::DeviceWrite { pick, at, len, seed }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>(), any::<u8>())
            .prop_map(|(pick, at, len, seed)| Op::CpuWrite { pick, at, len, seed }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(pick, at, len)| Op::SyncCpu { pick, at, len }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(pick, at, len)| Op::SyncDevice { pick, at, len }),
        1 => (1usize..=65536).prop_map(|size| Op::Coherent { size }),
        1 => any::<usize>().prop_map(|pick| Op::FreeCoherent { pick }),
    ]
}

struct Live {
    addr: DmaAddr,
    orig: u64,
    buf: u64,
    size: usize,
    dir: DmaDirection,
    slots: std::ops::Range<usize>,
    /// What the original buffer holds.
    orig_data: Vec<u8>,
    /// What the bounce buffer holds.
    bounce_data: Vec<u8>,
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed))
        .collect()
}

/// `[at, at + len)` inside `size`, not empty.
fn window(size: usize, at: usize, len: usize) -> (usize, usize) {
    let at = at % size;
    let len = 1 + len % (size - at);
    (at, len)
}

/// Whether a run of `nslots` free slots exists in one segment whose first slot obeys
/// swiotlb's placement for a buffer at `orig` of `size` bytes (brute force).
fn room_for(free: &[bool], orig: u64, size: usize, min_align_mask: u64) -> bool {
    let offset = orig & min_align_mask & (IO_TLB_SIZE - 1);
    let alloc = size as u64 + offset;
    let nslots = alloc.div_ceil(IO_TLB_SIZE) as usize;
    let page = min_align_mask == 0 && alloc >= PAGE_SIZE;
    let keep = min_align_mask & !(IO_TLB_SIZE - 1);
    (0..free.len()).any(|s| {
        let addr = POOL + (s as u64) * IO_TLB_SIZE;
        (!page || addr.is_multiple_of(PAGE_SIZE))
            && addr & keep == orig & keep
            && s / IO_TLB_SEGSIZE == (s + nslots - 1) / IO_TLB_SEGSIZE
            && s + nslots <= free.len()
            && free[s..s + nslots].iter().all(|&f| f)
    })
}

fn check_invariants(
    pool: &BouncePool,
    mem: &Mem,
    live: &[Live],
    coherent: &[(DmaAddr, std::ops::Range<usize>)],
) {
    let mut owned = vec![false; pool.stats().total_slots];
    let mut used = 0;
    let ranges = live
        .iter()
        .map(|l| l.slots.clone())
        .chain(coherent.iter().map(|c| c.1.clone()));
    for r in ranges {
        used += r.len();
        for s in r {
            assert!(!owned[s], "slot {s} allocated twice");
            owned[s] = true;
        }
    }
    assert_eq!(pool.stats().used_slots, used);
    let free = pool.slots().free_map();
    for (s, (&f, &o)) in free.iter().zip(&owned).enumerate() {
        assert_eq!(f, !o, "slot {s}: pool says free={f}, model says owned={o}");
    }
    for l in live {
        assert!(
            read(mem, l.orig, l.size) == l.orig_data,
            "original of {:?}",
            l.addr
        );
        assert!(
            read(mem, l.addr.0, l.size) == l.bounce_data,
            "bounce of {:?}",
            l.addr
        );
    }
}

fn run(ops: Vec<Op>) {
    let mem = ram();
    let pool = BouncePool::new(
        &mem,
        &PoolConfig {
            base: Gpa(POOL),
            size: POOL_SIZE,
            areas: 2,
        },
    )
    .unwrap();
    let nvme = DeviceDma::new(0xfff, u64::MAX).unwrap();
    let plain = DeviceDma::default();
    let mut live: Vec<Live> = Vec::new();
    let mut coherent: Vec<(DmaAddr, std::ops::Range<usize>)> = Vec::new();
    let mut seed = 1u8;
    for op in ops {
        match op {
            Op::Map {
                size,
                offset,
                dir,
                nvme: n,
            } => {
                let dev = if n { nvme } else { plain };
                let size = size.min(dev.max_mapping_size());
                let Some(buf) = (0..BUFS).find(|b| live.iter().all(|l| l.buf != *b)) else {
                    continue;
                };
                let orig = BUF + buf * BUF_STRIDE + offset;
                seed = seed.wrapping_add(37);
                let data = fill(size, seed);
                mem.write_slice(&data, GuestAddress(orig)).unwrap();
                let dir = [
                    DmaDirection::ToDevice,
                    DmaDirection::FromDevice,
                    DmaDirection::Bidirectional,
                ][dir as usize];
                let free_before = pool.slots().free_map();
                match pool.map(&mem, &dev, Gpa(orig), size, dir) {
                    Ok(addr) => {
                        let r = pool.slots_of(addr).unwrap();
                        assert_eq!(addr.0 & dev.min_align_mask(), orig & dev.min_align_mask());
                        live.push(Live {
                            addr,
                            orig,
                            buf,
                            size,
                            dir,
                            slots: r.start.0..r.end.0,
                            orig_data: data.clone(),
                            bounce_data: data,
                        });
                    }
                    Err(PoolError::Slots(SlotError::Full { .. })) => {
                        assert!(
                            !room_for(&free_before, orig, size, dev.min_align_mask()),
                            "refused {size} bytes at {orig:#x} though a run fits"
                        );
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Unmap { pick, skip } if !live.is_empty() => {
                let l = live.swap_remove(pick % live.len());
                let attrs = if skip {
                    Attrs::SKIP_CPU_SYNC
                } else {
                    Attrs::NONE
                };
                pool.unmap(&mem, l.addr, l.size, l.dir, attrs).unwrap();
                let want = if l.dir.from_device() && !skip {
                    &l.bounce_data
                } else {
                    &l.orig_data
                };
                assert!(
                    read(&mem, l.orig, l.size) == *want,
                    "after unmap {:?} skip={skip}",
                    l.dir
                );
            }
            Op::DeviceWrite {
                pick,
                at,
                len,
                seed,
            } if !live.is_empty() => {
                let n = live.len();
                let l = &mut live[pick % n];
                let (at, len) = window(l.size, at, len);
                let d = fill(len, seed);
                mem.write_slice(&d, GuestAddress(l.addr.0 + at as u64))
                    .unwrap();
                l.bounce_data[at..at + len].copy_from_slice(&d);
            }
            Op::CpuWrite {
                pick,
                at,
                len,
                seed,
            } if !live.is_empty() => {
                let n = live.len();
                let l = &mut live[pick % n];
                let (at, len) = window(l.size, at, len);
                let d = fill(len, seed);
                mem.write_slice(&d, GuestAddress(l.orig + at as u64))
                    .unwrap();
                l.orig_data[at..at + len].copy_from_slice(&d);
            }
            Op::SyncCpu { pick, at, len } if !live.is_empty() => {
                let n = live.len();
                let l = &mut live[pick % n];
                let (at, len) = window(l.size, at, len);
                pool.sync_for_cpu(&mem, DmaAddr(l.addr.0 + at as u64), len, l.dir)
                    .unwrap();
                if l.dir.from_device() {
                    let w = l.bounce_data[at..at + len].to_vec();
                    l.orig_data[at..at + len].copy_from_slice(&w);
                }
            }
            Op::SyncDevice { pick, at, len } if !live.is_empty() => {
                let n = live.len();
                let l = &mut live[pick % n];
                let (at, len) = window(l.size, at, len);
                pool.sync_for_device(&mem, DmaAddr(l.addr.0 + at as u64), len, l.dir)
                    .unwrap();
                if l.dir.to_device() {
                    let w = l.orig_data[at..at + len].to_vec();
                    l.bounce_data[at..at + len].copy_from_slice(&w);
                }
            }
            Op::Coherent { size } => {
                if let Ok(a) = pool.alloc_coherent(&mem, size) {
                    let align = (size as u64)
                        .next_multiple_of(PAGE_SIZE)
                        .next_power_of_two();
                    assert_eq!(a.0 % align, 0);
                    let r = pool.slots_of(a).unwrap();
                    coherent.push((a, r.start.0..r.end.0));
                }
            }
            Op::FreeCoherent { pick } if !coherent.is_empty() => {
                let (a, _) = coherent.swap_remove(pick % coherent.len());
                pool.free_coherent(a).unwrap();
            }
            _ => {}
        }
        check_invariants(&pool, &mem, &live, &coherent);
    }
    for l in live.drain(..) {
        pool.unmap(&mem, l.addr, l.size, l.dir, Attrs::NONE)
            .unwrap();
    }
    for (a, _) in coherent.drain(..) {
        pool.free_coherent(a).unwrap();
    }
    assert_eq!(pool.stats().used_slots, 0);
    // Everything merged back: each segment serves a whole-segment mapping.
    for _ in 0..2 {
        pool.map(
            &mem,
            &plain,
            Gpa(BUF),
            MAX_MAPPING_SIZE,
            DmaDirection::ToDevice,
        )
        .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn pool_matches_model_no_slot_twice_data_intact_in_every_direction(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        run(ops);
    }

    #[test]
    fn fragmentation_then_a_large_allocation_fits_exactly_when_a_segment_is_free(
        sizes in proptest::collection::vec(1usize..8192, 1..200),
        keep in proptest::collection::vec(any::<bool>(), 200),
    ) {
        let mem = ram();
        let pool = BouncePool::new(&mem, &PoolConfig { base: Gpa(POOL), size: POOL_SIZE, areas: 1 }).unwrap();
        let d = DeviceDma::default();
        let mut live = Vec::new();
        for (i, s) in sizes.iter().enumerate() {
            if let Ok(a) = pool.map(&mem, &d, Gpa(BUF + i as u64 * 0x2000), *s, DmaDirection::ToDevice) {
                live.push((a, *s));
            }
        }
        let mut kept = Vec::new();
        for (i, (a, s)) in live.into_iter().enumerate() {
            if keep[i % keep.len()] {
                kept.push((a, s));
            } else {
                pool.unmap(&mem, a, s, DmaDirection::ToDevice, Attrs::NONE).unwrap();
            }
        }
        let free = pool.slots().free_map();
        let whole_free = free.chunks(IO_TLB_SEGSIZE).any(|seg| seg.iter().all(|&f| f));
        let big = pool.map(&mem, &d, Gpa(BUF), MAX_MAPPING_SIZE, DmaDirection::ToDevice);
        prop_assert_eq!(big.is_ok(), whole_free);
    }
}

#[test]
fn threads_mapping_at_once_never_share_a_slot_and_counters_stay_consistent() {
    const THREADS: u64 = 4;
    const ROUNDS: usize = 2000;
    let mem = ram();
    let pool = Arc::new(
        BouncePool::new(
            &mem,
            &PoolConfig {
                base: Gpa(POOL),
                size: 4 * SEGMENT_BYTES,
                areas: 4,
            },
        )
        .unwrap(),
    );
    let owned = Arc::new(Mutex::new(HashSet::<usize>::new()));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (mem, pool, owned) = (mem.clone(), pool.clone(), owned.clone());
            std::thread::spawn(move || {
                let d = DeviceDma::default();
                let mut mine: Vec<(DmaAddr, usize, u64)> = Vec::new();
                let mut full = 0u64;
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for round in 0..ROUNDS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let size = 1 + (x % 40000) as usize;
                    let orig = BUF + t * 0x40_0000 + (round as u64 % 8) * BUF_STRIDE;
                    let tag = (t as u8).wrapping_mul(50).wrapping_add(round as u8);
                    if mine.len() < 8 && x & 1 == 0 {
                        mem.write_slice(&vec![tag; size], GuestAddress(orig))
                            .unwrap();
                        match pool.map(&mem, &d, Gpa(orig), size, DmaDirection::Bidirectional) {
                            Ok(a) => {
                                let r = pool.slots_of(a).unwrap();
                                let mut o = owned.lock().unwrap();
                                for s in r.start.0..r.end.0 {
                                    assert!(o.insert(s), "slot {s} allocated twice");
                                }
                                drop(o);
                                // Device side: the bounce buffer holds our bytes only.
                                assert!(read(&mem, a.0, size).iter().all(|&b| b == tag));
                                mem.write_slice(&vec![!tag; size], GuestAddress(a.0))
                                    .unwrap();
                                mine.push((a, size, orig));
                            }
                            Err(PoolError::Slots(SlotError::Full { .. })) => full += 1,
                            Err(e) => panic!("{e}"),
                        }
                    } else if let Some((a, size, orig)) = mine.pop() {
                        let tag = read(&mem, a.0, 1)[0];
                        let r = pool.slots_of(a).unwrap();
                        {
                            let mut o = owned.lock().unwrap();
                            for s in r.start.0..r.end.0 {
                                assert!(o.remove(&s));
                            }
                        }
                        pool.unmap(&mem, a, size, DmaDirection::Bidirectional, Attrs::NONE)
                            .unwrap();
                        assert!(read(&mem, orig, size).iter().all(|&b| b == tag));
                    }
                }
                for (a, size, _) in mine {
                    let r = pool.slots_of(a).unwrap();
                    {
                        let mut o = owned.lock().unwrap();
                        for s in r.start.0..r.end.0 {
                            assert!(o.remove(&s));
                        }
                    }
                    pool.unmap(&mem, a, size, DmaDirection::Bidirectional, Attrs::NONE)
                        .unwrap();
                }
                full
            })
        })
        .collect();
    let full: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let s = pool.stats();
    assert_eq!(s.used_slots, 0);
    assert_eq!(s.failed_maps, full);
    assert!(s.high_water_slots > 0 && s.high_water_slots <= s.total_slots);
    assert!(pool.slots().free_map().iter().all(|&f| f));
}
