//! One polling thread for every queue the device host runs in process: [`Poller`].
//!
//! A queue notification reaches us as a vfio-user message, and the wake-up of the
//! thread that receives it costs far more than the work it brings (~65 µs against
//! ~20 ns here; docs/ARCHITECTURE.md, "A request, and what it costs"). Linux's
//! virtio-iommu driver kicks once per sync and spins until the request is back, so
//! that wake-up is paid on every MAP and UNMAP. The poller removes it while the guest
//! is busy: after a notification
//! (handled where it arrives, by the function's server thread), the poller turns
//! notifications off on every polled queue ([`VirtioPciTransport::set_polling`]) and
//! watches their avail indexes, so the driver publishes without kicking and the
//! request is served in the time a cache line takes to cross CPUs.
//!
//! The poll window adapts as QEMU's AioContext does (`adjust_polling_time`): it starts
//! at 4 µs, doubles while work keeps arriving within the maximum, and drops to zero
//! when the gap between two pieces of work exceeds the maximum; at zero the poller
//! does not poll at all until a notification comes within the maximum again. When the
//! window passes with nothing new it turns notifications back on, and
//! [`Pollable::set_polling`] re-checks the rings after a full fence: buffers published
//! in between are polled before it sleeps, so none waits for a notification that the
//! driver, seeing them off, never sent.
//!
//! One thread serves every registered queue, because on these machines the TCG vCPU
//! needs one of the two CPUs: a poller per queue would take the other from QEMU's
//! main loop, which delivers our interrupts. The loop yields the CPU between passes,
//! and runs a pass only with a turn of the poll budget it shares with the back-ends'
//! workers ([`virtio_contract::PollBudget`]).
//! Correctness never depends on the poller: a notification is always served by the
//! thread that receives it, and the transport's lock serialises the two consumers.
//!
//! Threads and locks: a function's server thread handles its socket (registers,
//! notifications, DMA maps) and takes that function's transport lock; the poller takes
//! each transport lock in turn (an endpoint's fault also takes the IOMMU's, the one
//! nesting: docs/ARCHITECTURE.md), and its `wake` mutex only when it holds none.
//! Nothing is held across IPC.

use dma_types::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;
use virtio_contract::{PollConfig, PollWindow, VirtioDevice};
use virtio_pci::{TransportCounters, VirtioPciTransport};
use vm_memory::GuestMemory;

/// Queues a [`Poller`] can serve: in practice a function's transport.
pub trait Pollable: Send + Sync {
    /// Serves every queue with new buffers; returns whether there were any.
    fn poll(&self) -> bool;
    /// Notifications off (`true`) or on; switching them on returns whether buffers
    /// arrived meanwhile (see [`VirtioPciTransport::set_polling`]).
    fn set_polling(&self, on: bool) -> bool;
    /// What crossed the transport so far.
    fn counters(&self) -> TransportCounters;
}

impl<D, M> Pollable for Mutex<VirtioPciTransport<D, M>>
where
    D: VirtioDevice<M> + Send,
    M: GuestMemory + Send,
{
    fn poll(&self) -> bool {
        lock(self).poll()
    }

    fn set_polling(&self, on: bool) -> bool {
        lock(self).set_polling(on)
    }

    fn counters(&self) -> TransportCounters {
        lock(self).counters()
    }
}

/// What the poller did, for benchmarks and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollCounters {
    /// Times a notification woke the poller from sleep.
    pub wakeups: u64,
    /// Passes over the queues that found work.
    pub busy_passes: u64,
    /// Times the poller went back to sleep.
    pub sleeps: u64,
    /// Time spent polling, in nanoseconds (an upper bound on its CPU time).
    pub polling_ns: u64,
    /// Times its window ended while it waited for a first turn of its budget (other
    /// pollers, of any process, held every turn): the notification that woke it was
    /// served, and the next one pays its wake-up.
    pub refused: u64,
}

#[derive(Default)]
struct Counters {
    wakeups: AtomicU64,
    busy_passes: AtomicU64,
    sleeps: AtomicU64,
    polling_ns: AtomicU64,
}

#[derive(Default)]
struct Wake {
    /// A notification came while the poller slept.
    kicked: bool,
}

/// State shared by the poller thread and whoever kicks it.
struct Shared {
    /// Weak: the poller must not keep a function's transport (and with it, say, a
    /// vhost-user connection) alive after its server is gone.
    queues: Mutex<Vec<Weak<dyn Pollable>>>,
    /// Set while the poller polls: a notification then needs no wake-up.
    polling: AtomicBool,
    /// The poller is being dropped: checked on every pass, and before it sleeps (under
    /// `wake`, which `Drop` takes to signal).
    stopping: AtomicBool,
    wake: Mutex<Wake>,
    cv: Condvar,
    config: PollConfig,
    counters: Counters,
}

/// The polling thread of one device host (see the module documentation).
pub struct Poller {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A cheap handle on a [`Poller`]: tells it a notification was just served, and
/// reads its counters.
#[derive(Clone)]
pub struct PollHandle(Arc<Shared>);

impl PollHandle {
    /// A queue notification was served: start polling unless the poller already does
    /// (then this costs one atomic load).
    pub fn kick(&self) {
        let s = &self.0;
        if s.config.max.is_zero() || s.polling.load(Ordering::Acquire) {
            return;
        }
        let mut w = lock(&s.wake);
        if !w.kicked {
            w.kicked = true;
            s.cv.notify_one();
        }
    }

    /// What the poller did so far.
    pub fn counters(&self) -> PollCounters {
        let c = &self.0.counters;
        PollCounters {
            wakeups: c.wakeups.load(Ordering::Relaxed),
            busy_passes: c.busy_passes.load(Ordering::Relaxed),
            sleeps: c.sleeps.load(Ordering::Relaxed),
            polling_ns: c.polling_ns.load(Ordering::Relaxed),
            refused: self.0.config.budget.refused(),
        }
    }
}

impl Poller {
    /// A poller whose window grows to at most `config.max`; `Duration::ZERO` never
    /// polls (every request then waits for its notification). It polls only with a
    /// turn of `config.budget`. The thread starts at once and sleeps until the first
    /// kick.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start(config: impl Into<PollConfig>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Vec::new()),
            polling: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            wake: Mutex::new(Wake::default()),
            cv: Condvar::new(),
            config: config.into(),
            counters: Counters::default(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("aperture-poll".into())
            .spawn(move || run(&s))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Adds queues to serve, for as long as someone else keeps them.
    pub fn add(&self, queues: &Arc<dyn Pollable>) {
        lock(&self.shared.queues).push(Arc::downgrade(queues));
    }

    /// The handle a function's server thread calls after each notification.
    pub fn handle(&self) -> PollHandle {
        PollHandle(Arc::clone(&self.shared))
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Taken so that the store cannot fall between the poller's check and its wait.
        drop(lock(&self.shared.wake));
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_polling(queues: &[Arc<dyn Pollable>], on: bool) -> bool {
    queues
        .iter()
        .fold(false, |published, q| q.set_polling(on) | published)
}

fn run(s: &Shared) {
    let mut window = PollWindow::new(s.config.clone());
    loop {
        {
            let mut w = lock(&s.wake);
            while !w.kicked && !s.stopping.load(Ordering::Acquire) {
                w =
                    s.cv.wait(w)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if s.stopping.load(Ordering::Acquire) {
                return;
            }
            w.kicked = false;
        }
        s.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        // The notification that kicked us was served just now by its server thread.
        if !window.woken() {
            continue;
        }
        // Held for this polling period only.
        let queues: Vec<Arc<dyn Pollable>> =
            lock(&s.queues).iter().filter_map(Weak::upgrade).collect();
        let started = Instant::now();
        s.polling.store(true, Ordering::Release);
        // What the devices cannot take (a bogus ring) is not work, and after the window
        // waits for a notification.
        let polled = window.poll(
            || s.stopping.load(Ordering::Acquire),
            || {
                let took = queues.iter().fold(false, |w, q| q.poll() | w);
                if took {
                    s.counters.busy_passes.fetch_add(1, Ordering::Relaxed);
                }
                took
            },
            |on| set_polling(&queues, on),
        );
        s.polling.store(false, Ordering::Release);
        if !polled {
            continue;
        }
        s.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        s.counters.polling_ns.fetch_add(spent, Ordering::Relaxed);
    }
}
