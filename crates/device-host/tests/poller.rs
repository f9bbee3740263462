//! The poller against a driver thread that publishes and notifies as Linux's
//! `virtqueue_kick_prepare` does: it notifies only when the device's ring says it
//! wants notifications (`VRING_USED_F_NO_NOTIFY` clear, or with EVENT_IDX
//! `vring_need_event` on `avail_event`). A notification is served where it arrives, as
//! a function's server thread serves it. The requests come one at a time, with gaps
//! that straddle the poll window, so the driver keeps racing the poller's switch
//! between polling and sleeping; a request the driver published without notifying
//! while the poller went to sleep would never be served.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use device_host::poll::{PollHandle, Pollable, Poller};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_kit::pci::{self, Irqs, QueueSetup};
use test_kit::proc::thread_ticks;
use test_kit::{w, RingLayout, SplitRing};
use virtio_contract::{PollBudget, PollConfig, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use virtio_devices::{Rng, RngConfig};
use virtio_pci::VirtioPciTransport;
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;
type Transport = Mutex<VirtioPciTransport<Rng, Mem>>;

const SIZE: u16 = 16;
/// Queue 0's rings: table, available and used ring on pages 1, 2 and 3.
const RING: u64 = 0x1000;
const DATA: u64 = 0x10000;

/// An rng on a transport whose driver negotiated `features` and set up queue 0; and
/// the driver's side of that queue.
fn live(features: u64) -> (Arc<Transport>, SplitRing<Mem>) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let ring = driver(&mem, features);
    let rng = Rng::new(&RngConfig::default()).unwrap();
    let mut t = VirtioPciTransport::new(rng, 0x00ff_0000, mem, Irqs::new().sink(), 0).unwrap();
    bring_up(&mut t, features);
    assert_eq!(t.status(), 1 | 2 | 8 | 4, "DRIVER_OK");
    (Arc::new(Mutex::new(t)), ring)
}

/// The driver's side of queue 0 in `mem`, with EVENT_IDX if `features` has it.
fn driver(mem: &Mem, features: u64) -> SplitRing<Mem> {
    SplitRing::new(mem.clone(), RingLayout::paged(RING), SIZE)
        .with_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0)
}

/// Linux's bring-up of queue 0 from reset: features, queue addresses, DRIVER_OK.
fn bring_up(t: &mut VirtioPciTransport<Rng, Mem>, features: u64) {
    let queue = QueueSetup {
        index: 0,
        size: Some(SIZE),
        vector: 1,
        layout: RingLayout::paged(RING),
    };
    pci::bring_up(
        t,
        Some(features | (1 << VIRTIO_F_VERSION_1)),
        None,
        &[queue],
    );
}

/// The driver's side of one request: a 64-byte device-writable buffer on the ring,
/// published, and a notification if the device's ring asks for one (the kit's
/// `publish` decides as `virtqueue_kick_prepare` does: a full barrier, then
/// `VRING_USED_F_NO_NOTIFY`, or with EVENT_IDX `vring_need_event` on `avail_event`).
/// Returns whether the driver notified.
fn submit(ring: &mut SplitRing<Mem>, t: &Transport, kick: &dyn Fn()) -> bool {
    let slot = ring.avail_idx() % SIZE;
    ring.add_chain(&[w(DATA + u64::from(slot) * 0x100, 64)]);
    let notify = ring.publish();
    if notify {
        t.lock().unwrap().notify(0);
        kick();
    }
    notify
}

/// Waits until the used index reaches `idx`; false after 2 s (a request never served).
fn served(ring: &SplitRing<Mem>, idx: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while ring.used_idx() != idx {
        if Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
    true
}

/// The tests here spin on two CPUs each (driver and poller): one at a time, or the
/// machine's two CPUs are oversubscribed and the timing they check is the scheduler's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A poller whose window grows to `max_us`, serving `t`.
fn poller_for(t: &Arc<Transport>, max_us: u64) -> Poller {
    let poller = Poller::start(Duration::from_micros(max_us)).unwrap();
    poller.add(&(Arc::clone(t) as Arc<dyn Pollable>));
    poller
}

fn spin(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

#[test]
fn no_lost_wakeup_when_the_driver_races_the_switch_between_polling_and_sleeping() {
    let _one = one_at_a_time();
    for features in [0, 1 << VIRTIO_RING_F_EVENT_IDX] {
        let (t, mut ring) = live(features);
        let poller = poller_for(&t, 20);
        let handle = poller.handle();
        let kick = move || handle.kick();
        let mut notified = 0u32;
        // At least 3000 requests, and until both paths ran and the poller switched to
        // sleep many times (on a loaded machine its thread may run late).
        let raced = || {
            let (c, p) = (t.lock().unwrap().counters(), poller.handle().counters());
            c.polled > 0 && c.notifications > 0 && p.sleeps > 10
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut i = 0u16;
        while i < 3000 || (!raced() && Instant::now() < deadline) {
            if submit(&mut ring, &t, &kick) {
                notified += 1;
            }
            assert!(
                served(&ring, i.wrapping_add(1)),
                "features {features:#x}: request {i} was never served \
                 (published without a notification while the poller went to sleep)"
            );
            // Gaps from 0 to 60 µs: inside the 20 µs window, across it, and past it.
            spin(Duration::from_micros(u64::from(i % 61)));
            i = i.wrapping_add(1);
        }
        let c = t.lock().unwrap().counters();
        let p = poller.handle().counters();
        // Both paths ran, and the poller switched to sleep many times: the race was run.
        assert!(
            c.polled > 0 && notified > 0,
            "{features:#x}: {c:?}, {notified} notified"
        );
        assert!(p.sleeps > 10, "{features:#x}: {p:?}");
        assert_eq!(c.notifications, u64::from(notified), "{features:#x}");
    }
}

/// After 50 ms to let its window pass, the poller does nothing over `over`: no counter
/// moves, and its thread takes at most one 10 ms clock tick (under 1% of a CPU over a
/// second).
fn assert_poller_sleeps(handle: &PollHandle, over: Duration) {
    std::thread::sleep(Duration::from_millis(50));
    let (before, ticks) = (handle.counters(), thread_ticks("aperture-poll").unwrap());
    std::thread::sleep(over);
    let (after, ticks_after) = (handle.counters(), thread_ticks("aperture-poll").unwrap());
    assert_eq!(before, after, "the poller did something over {over:?}");
    assert!(
        ticks_after - ticks <= 1,
        "{} ticks over {over:?}",
        ticks_after - ticks
    );
}

#[test]
fn an_idle_device_host_uses_no_cpu_after_its_poll_window() {
    let _one = one_at_a_time();
    let (t, mut ring) = live(1 << VIRTIO_RING_F_EVENT_IDX);
    let poller = poller_for(&t, 200);
    let handle = poller.handle();
    let kick = move || handle.kick();
    // Work, requests a few µs apart, until the poller has polled (at once on an idle
    // machine; a loaded one may take longer to schedule it)...
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0u16;
    while poller.handle().counters().busy_passes == 0 && Instant::now() < deadline {
        submit(&mut ring, &t, &kick);
        assert!(
            served(&ring, i.wrapping_add(1)),
            "request {i} was never served"
        );
        spin(Duration::from_micros(5));
        i = i.wrapping_add(1);
    }
    assert!(
        poller.handle().counters().busy_passes > 0,
        "the poller polled"
    );
    // ...then nothing: after its window it must sleep, not spin.
    assert_poller_sleeps(&poller.handle(), Duration::from_secs(1));
}

#[test]
fn no_lost_wakeup_when_two_pollers_sharing_one_turn_hand_it_over_as_drivers_race_them() {
    let _one = one_at_a_time();
    for features in [0, 1 << VIRTIO_RING_F_EVENT_IDX] {
        // Two device hosts (or a device host and a back-end) polling within one turn:
        // each hands it over after a pass while the other waits, and a window may end
        // while its poller waits, with notifications off.
        let budget = PollBudget::local(1).unwrap();
        let (sides, rings): (Vec<_>, Vec<_>) = (0..2)
            .map(|_| {
                let (t, ring) = live(features);
                let poller = Poller::start(PollConfig {
                    max: Duration::from_micros(20),
                    budget: budget.clone(),
                })
                .unwrap();
                poller.add(&(Arc::clone(&t) as Arc<dyn Pollable>));
                ((t, poller), ring)
            })
            .unzip();
        let notified: Vec<u32> = std::thread::scope(|s| {
            let drivers: Vec<_> = sides
                .iter()
                .zip(rings)
                .enumerate()
                .map(|(side, ((t, poller), mut ring))| {
                    let handle = poller.handle();
                    s.spawn(move || {
                        let kick = move || handle.kick();
                        let mut notified = 0u32;
                        // At least 1500 requests, and until both paths ran here.
                        let deadline = Instant::now() + Duration::from_secs(20);
                        let raced =
                            |notified: u32| notified > 0 && t.lock().unwrap().counters().polled > 0;
                        let mut i = 0u16;
                        while i < 1500 || (!raced(notified) && Instant::now() < deadline) {
                            notified += u32::from(submit(&mut ring, t, &kick));
                            assert!(
                                served(&ring, i.wrapping_add(1)),
                                "features {features:#x}, side {side}: request {i} was never \
                                 served (published without a notification while its poller \
                                 waited for the turn or went to sleep)"
                            );
                            // Gaps from 0 to 60 µs: inside the window, across it, past it.
                            spin(Duration::from_micros(u64::from(i % 61)));
                            i = i.wrapping_add(1);
                        }
                        notified
                    })
                })
                .collect();
            drivers.into_iter().map(|d| d.join().unwrap()).collect()
        });
        for ((t, poller), notified) in sides.iter().zip(notified) {
            let c = t.lock().unwrap().counters();
            let p = poller.handle().counters();
            assert!(c.polled > 0 && notified > 0, "{features:#x}: {c:?}, {p:?}");
            assert_eq!(c.notifications, u64::from(notified), "{features:#x}");
        }
    }
}

#[test]
fn a_poller_without_a_turn_of_its_budget_serves_by_notification_and_never_polls() {
    let _one = one_at_a_time();
    let (t, mut ring) = live(1 << VIRTIO_RING_F_EVENT_IDX);
    let budget = PollBudget::local(1).unwrap();
    // Another poller (of this process or any other sharing the file) polls.
    let held = budget.try_take().unwrap();
    let poller = Poller::start(PollConfig {
        max: Duration::from_micros(200),
        budget: budget.clone(),
    })
    .unwrap();
    poller.add(&(Arc::clone(&t) as Arc<dyn Pollable>));
    let handle = poller.handle();
    let kick = move || handle.kick();
    let mut i = 0u16;
    let mut run = |n: u16, ring: &mut SplitRing<Mem>| {
        let mut notified = 0;
        for _ in 0..n {
            notified += u16::from(submit(ring, &t, &kick));
            i = i.wrapping_add(1);
            assert!(served(ring, i), "request {i} was never served");
            spin(Duration::from_micros(5));
        }
        notified
    };
    // Requests 5 µs apart, well inside the window: each still needs its doorbell,
    // for at least 200 requests and until the poller has woken and been refused (on a
    // loaded machine its thread may first run only after many of them).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    while (sent < 200 || poller.handle().counters().refused == 0) && Instant::now() < deadline {
        assert_eq!(run(10, &mut ring), 10, "every request notified");
        sent += 10;
    }
    let p = poller.handle().counters();
    assert_eq!(p.busy_passes, 0, "{p:?}");
    assert!(p.refused > 0, "{p:?}");
    assert_eq!(t.lock().unwrap().counters().polled, 0);
    // Once the turn is free the poller takes it, and requests come without doorbells.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut unnotified = false;
    while !unnotified && Instant::now() < deadline {
        unnotified = run(10, &mut ring) < 10;
    }
    assert!(poller.handle().counters().busy_passes > 0, "it polled");
    assert!(unnotified, "some requests came without a doorbell");
    // Between windows the turn is free again.
    assert_poller_sleeps(&poller.handle(), Duration::from_millis(100));
    assert!(budget.try_take().is_some(), "the turn was given back");
}

/// Register and configuration accesses, random but repeatable (xorshift64).
struct Fuzz(u64);
impl Fuzz {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn register_traffic_fuzzed_while_queues_run_causes_no_deadlock_and_no_panic() {
    let _one = one_at_a_time();
    let (t, ring) = live(1 << VIRTIO_RING_F_EVENT_IDX);
    let poller = poller_for(&t, 50);
    let handle = poller.handle();
    let run_for = Duration::from_secs(1);
    let (done_tx, done_rx) = std::sync::mpsc::channel();

    // The driver: keeps submitting, waiting at most a millisecond for each (a reset by
    // the fuzzer may have stopped the queue: the driver then just carries on).
    let (dt, mut dring, dh, tx) = (Arc::clone(&t), ring, handle.clone(), done_tx.clone());
    let driver = std::thread::spawn(move || {
        let end = Instant::now() + run_for;
        let kick = move || dh.kick();
        let mut i = 0u16;
        while Instant::now() < end {
            submit(&mut dring, &dt, &kick);
            let deadline = Instant::now() + Duration::from_millis(1);
            while dring.used_idx() != i.wrapping_add(1) && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            i = i.wrapping_add(1);
        }
        let _ = tx.send("driver");
    });
    // The fuzzer: random BAR 0 and config-space accesses, now and then the driver's
    // bring-up sequence again, so queues keep coming back to life.
    let (ft, tx) = (Arc::clone(&t), done_tx);
    let fuzzer = std::thread::spawn(move || {
        let end = Instant::now() + run_for;
        let mut f = Fuzz(0x9e37_79b9_7f4a_7c15);
        let mut n = 0u64;
        while Instant::now() < end {
            let r = f.next();
            let len = [1usize, 2, 4, 8][(r & 3) as usize];
            let value = f.next().to_le_bytes();
            let mut t = ft.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match (r >> 2) % 8 {
                0..=3 => t.write_bar((r >> 8) % 0x4000, &value[..len]),
                4 | 5 => {
                    let mut b = [0u8; 8];
                    t.read_bar((r >> 8) % 0x4000, &mut b[..len]);
                }
                6 => t.write_config_space((r >> 8) % 256, &value[..len]),
                _ => {
                    let mut b = [0u8; 8];
                    t.read_config_space((r >> 8) % 256, &mut b[..len]);
                }
            }
            drop(t);
            n += 1;
            if n.is_multiple_of(500) {
                bring_up(&mut ft.lock().unwrap(), 1 << VIRTIO_RING_F_EVENT_IDX);
            }
        }
        let _ = tx.send("fuzzer");
    });
    // Both must finish: a deadlock would keep them (or the poller) stuck.
    for _ in 0..2 {
        let who = done_rx.recv_timeout(run_for + Duration::from_secs(10));
        assert!(who.is_ok(), "a thread is stuck: deadlock");
    }
    assert!(driver.join().is_ok(), "the driver panicked");
    assert!(fuzzer.join().is_ok(), "the fuzzer panicked");
    let stopped = Instant::now();
    drop(poller);
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "the poller did not stop"
    );
    assert!(handle.counters().wakeups > 0, "the poller ran");
}

#[test]
fn a_ring_the_device_cannot_take_from_does_not_keep_the_poller_spinning() {
    // A hostile driver publishes an avail index a thousand entries ahead (§2.7.6: more
    // than the ring holds). The device takes nothing, so that is no work: after its
    // window the poller must sleep, not spin on it for ever.
    let _one = one_at_a_time();
    let (t, mut ring) = live(1 << VIRTIO_RING_F_EVENT_IDX);
    let poller = poller_for(&t, 200);
    let handle = poller.handle();
    // One good request first, so the poller's window is open...
    let kick = {
        let h = handle.clone();
        move || h.kick()
    };
    for i in 0..20u16 {
        submit(&mut ring, &t, &kick);
        assert!(served(&ring, i + 1));
    }
    // ...then the bogus index, and a notification of it.
    ring.set_avail_idx(1000);
    t.lock().unwrap().notify(0);
    handle.kick();
    assert_poller_sleeps(&handle, Duration::from_millis(500));
}
