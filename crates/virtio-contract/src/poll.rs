//! The adaptive poll window a device thread uses between the guest's notifications,
//! shared by the device host's poller and the vhost-user back-end's worker.

use crate::PollBudget;
use std::time::{Duration, Instant};

/// Where the poll window starts when it grows from zero (QEMU's first step).
pub const POLL_WINDOW_START: Duration = Duration::from_micros(4);

/// QEMU's AioContext `adjust_polling_time`: the next poll window after work came
/// `gap` after the previous work (polling or asleep). It starts at
/// [`POLL_WINDOW_START`], doubles while work comes later than the window but within
/// `max`, stays while work comes within it, and drops to zero (no polling) when the
/// gap exceeds `max`. A `max` of zero never polls.
pub fn adjust_poll_window(window: Duration, gap: Duration, max: Duration) -> Duration {
    if gap <= window {
        window
    } else if gap > max {
        Duration::ZERO
    } else if window.is_zero() {
        POLL_WINDOW_START.min(max)
    } else {
        (window * 2).min(max)
    }
}

/// How a thread polls: the most its window grows to (zero never polls) and the
/// budget it shares with other pollers.
#[derive(Clone, Debug, Default)]
pub struct PollConfig {
    /// The window's maximum.
    pub max: Duration,
    /// Turns to poll, shared with the other pollers of this machine.
    pub budget: PollBudget,
}

impl From<Duration> for PollConfig {
    /// A window of at most `max`, with an unlimited budget.
    fn from(max: Duration) -> Self {
        Self {
            max,
            budget: PollBudget::unlimited(),
        }
    }
}

/// A polling thread's window and when work last came: the loop both pollers run.
#[derive(Clone, Debug)]
pub struct PollWindow {
    window: Duration,
    last_work: Instant,
    max: Duration,
    budget: PollBudget,
}

impl PollWindow {
    /// No window yet, growing to at most `config.max` (zero never polls), polling
    /// only with a turn of `config.budget`.
    pub fn new(config: PollConfig) -> Self {
        Self {
            window: Duration::ZERO,
            last_work: Instant::now(),
            max: config.max,
            budget: config.budget,
        }
    }

    /// Work came by notification, just served: adapts the window by the gap since the
    /// last work and says whether to poll now ([`PollWindow::poll`]).
    pub fn woken(&mut self) -> bool {
        let now = Instant::now();
        self.window = adjust_poll_window(self.window, now - self.last_work, self.max);
        self.last_work = now;
        !self.window.is_zero()
    }

    /// Polls with notifications off while work keeps coming within the window:
    /// `set_polling(true)` turns them off, `poll()` serves what was published and says
    /// whether there was any. When the window passes with nothing new it turns them
    /// back on (`set_polling(false)`, which says whether buffers were published in
    /// between) and looks once more: what a driver published while they were off would
    /// otherwise wait for a notification that never comes. Returns with notifications
    /// on, when idle or when `stopping()`. Yields the CPU between passes.
    ///
    /// It runs a pass only with a turn of its budget ([`PollConfig::budget`]), and
    /// hands the turn over after a pass when another poller waits for one, then waits
    /// for one again ([`PollBudget::take_by`]). If the window ends while it waits for
    /// its first turn it returns `false`, leaving notifications on; otherwise `true`.
    pub fn poll(
        &mut self,
        stopping: impl Fn() -> bool,
        mut poll: impl FnMut() -> bool,
        mut set_polling: impl FnMut(bool) -> bool,
    ) -> bool {
        let Some(turn) = self.budget.take_by(self.last_work + self.window) else {
            return false;
        };
        let mut turn = Some(turn);
        set_polling(true);
        loop {
            if stopping() {
                set_polling(false);
                return true;
            }
            let now = Instant::now();
            if turn.is_some() && poll() {
                // The gap is the idle time before this pass, from the end of the last
                // work to the start of the pass that found more (as QEMU counts the
                // time it polled before an event), not the time the work took: a pass
                // that served a 1 MiB read for longer than the maximum must not end
                // the window while the guest keeps it busy.
                self.window = adjust_poll_window(self.window, now - self.last_work, self.max);
                self.last_work = Instant::now();
            } else if now - self.last_work >= self.window {
                // Also when the window passed while this poller waited for a turn: the
                // look below serves what came meanwhile, and only sleeping after a look
                // that found nothing leaves the driver notifying (with EVENT_IDX,
                // `avail_event` caught up).
                if set_polling(false) && poll() {
                    self.last_work = Instant::now();
                    set_polling(true);
                    continue;
                }
                // The window adapts when the next work comes, by the whole gap.
                return true;
            }
            if turn.as_ref().is_some_and(|t| !t.wanted()) {
                std::thread::yield_now();
                continue;
            }
            // Another poller waits: its pass, then ours, until this window ends. The
            // yield lets it run first if it was woken on this CPU.
            if turn.take().is_some() {
                std::thread::yield_now();
            }
            turn = self.budget.take_by(self.last_work + self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking
    use super::*;

    #[test]
    fn window_adapts_as_qemus_aio_polling_does() {
        let max = Duration::from_micros(32);
        let us = Duration::from_micros;
        let adjust = adjust_poll_window;
        // From zero, a gap within the maximum starts the window at 4 µs...
        assert_eq!(adjust(Duration::ZERO, us(10), max), us(4));
        // ...which doubles while work comes later than the window but within the max,
        assert_eq!(adjust(us(4), us(10), max), us(8));
        assert_eq!(adjust(us(16), us(20), max), us(32));
        assert_eq!(adjust(us(32), us(30), max), us(32));
        // stays when work comes within it,
        assert_eq!(adjust(us(8), us(3), max), us(8));
        // and drops to zero when the gap exceeds the maximum.
        assert_eq!(adjust(us(32), us(33), max), Duration::ZERO);
        // A maximum of zero never polls.
        assert_eq!(
            adjust(Duration::ZERO, Duration::ZERO, Duration::ZERO),
            Duration::ZERO
        );
    }

    /// A window of `window`, growing to at most 1 s, within `budget`.
    fn open_window(window: Duration, budget: &PollBudget) -> PollWindow {
        let mut w = PollWindow::new(PollConfig {
            max: Duration::from_secs(1),
            budget: budget.clone(),
        });
        w.window = window;
        w.last_work = Instant::now();
        w
    }

    #[test]
    fn work_that_takes_longer_than_the_maximum_does_not_end_the_window() {
        let budget = PollBudget::unlimited();
        let mut w = open_window(Duration::from_millis(1), &budget);
        w.max = Duration::from_millis(2);
        let mut pass = 0;
        assert!(w.poll(
            || false,
            || {
                pass += 1;
                match pass {
                    // Serving a long request.
                    1 => {
                        std::thread::sleep(Duration::from_millis(5));
                        true
                    }
                    // More work, published while it served.
                    2 => true,
                    _ => false,
                }
            },
            |_| false,
        ));
        assert_eq!(
            w.window,
            Duration::from_millis(1),
            "the window stayed: no idle gap exceeded the maximum"
        );
        assert!(
            pass > 3,
            "it went on polling after the long pass ({pass} passes)"
        );
    }

    #[test]
    fn without_a_turn_of_its_budget_a_poller_does_not_poll() {
        let budget = PollBudget::local(1).unwrap();
        let _held = budget.try_take().unwrap();
        let mut w = open_window(Duration::from_millis(20), &budget);
        let (mut polls, mut switches) = (0, 0);
        let polled = w.poll(
            || false,
            || {
                polls += 1;
                false
            },
            |_| {
                switches += 1;
                false
            },
        );
        assert!(!polled);
        assert_eq!((polls, switches), (0, 0), "notifications stay on");
        assert_eq!(budget.refused(), 1);
    }

    #[test]
    fn pollers_sharing_a_budget_of_one_take_turns_and_never_poll_at_once() {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let budget = PollBudget::local(1).unwrap();
        let in_pass = AtomicBool::new(false);
        let overlaps = AtomicU32::new(0);
        let pass = |n: &mut u32| {
            if in_pass.swap(true, Ordering::AcqRel) {
                overlaps.fetch_add(1, Ordering::Relaxed);
            }
            *n += 1;
            std::hint::spin_loop();
            in_pass.store(false, Ordering::Release);
            false
        };
        let passes = std::thread::scope(|s| {
            let run = || {
                let mut w = open_window(Duration::from_millis(100), &budget);
                let mut n = 0u32;
                let polled = w.poll(|| false, || pass(&mut n), |_| false);
                (polled, n)
            };
            let a = s.spawn(run);
            let b = s.spawn(run);
            [a.join().unwrap(), b.join().unwrap()]
        });
        assert_eq!(overlaps.load(Ordering::Relaxed), 0, "two passes at once");
        for (polled, n) in passes {
            assert!(polled && n > 10, "each poller had turns: {passes:?}");
        }
    }

    #[test]
    fn a_window_that_ends_while_waiting_for_a_turn_sleeps_only_after_a_look_that_found_nothing() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let budget = PollBudget::local(1).unwrap();
        // The driver's published count, and the "device" that polls it.
        let published = AtomicU32::new(0);
        let taken = std::cell::Cell::new(0);
        // Calls in order: ("off", published since) for set_polling(false), ("poll",
        // took) for a pass.
        let log = std::cell::RefCell::new(Vec::<(&str, bool)>::new());
        std::thread::scope(|s| {
            let other = s.spawn(|| {
                // Waits for the turn while the window below polls, gets it when that
                // poller hands it over, and holds it past the window's end, publishing a
                // buffer meanwhile (with notifications off: the driver does not notify).
                let t = budget.take_by(Instant::now() + Duration::from_secs(10));
                assert!(t.is_some(), "the poller handed its turn over");
                published.store(1, Ordering::Release);
                std::thread::sleep(Duration::from_millis(30));
            });
            let mut w = open_window(Duration::from_millis(5), &budget);
            let polled = w.poll(
                || false,
                || {
                    let p = published.load(Ordering::Acquire);
                    let took = p != taken.replace(p);
                    log.borrow_mut().push(("poll", took));
                    took
                },
                |polling| {
                    if polling {
                        return false;
                    }
                    let since = published.load(Ordering::Acquire) != taken.get();
                    log.borrow_mut().push(("off", since));
                    since
                },
            );
            assert!(polled);
            other.join().unwrap();
        });
        let (taken, log) = (taken.get(), log.into_inner());
        assert_eq!(taken, 1, "the buffer was served: {log:?}");
        // With EVENT_IDX, a pass after notifications went on leaves `avail_event`
        // behind, and the driver would never notify again: the last switch must be
        // followed by no pass that took work.
        let last_off = log.iter().rposition(|&(c, _)| c == "off").unwrap();
        assert!(
            !log[last_off..].iter().any(|&(c, took)| c == "poll" && took),
            "{log:?}"
        );
    }
}
