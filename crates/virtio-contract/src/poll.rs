//! The adaptive poll window a device thread uses between the guest's notifications,
//! shared by the device host's poller and the vhost-user back-end's worker.

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

/// A polling thread's window and when work last came: the loop both pollers run.
#[derive(Clone, Copy, Debug)]
pub struct PollWindow {
    window: Duration,
    last_work: Instant,
    max: Duration,
}

impl PollWindow {
    /// No window yet, growing to at most `max` (zero never polls).
    pub fn new(max: Duration) -> Self {
        Self {
            window: Duration::ZERO,
            last_work: Instant::now(),
            max,
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
    pub fn poll(
        &mut self,
        stopping: impl Fn() -> bool,
        mut poll: impl FnMut() -> bool,
        mut set_polling: impl FnMut(bool) -> bool,
    ) {
        set_polling(true);
        loop {
            if stopping() {
                set_polling(false);
                return;
            }
            let now = Instant::now();
            if poll() {
                self.window = adjust_poll_window(self.window, now - self.last_work, self.max);
                self.last_work = now;
            } else if now - self.last_work >= self.window {
                if set_polling(false) && poll() {
                    self.last_work = Instant::now();
                    set_polling(true);
                    continue;
                }
                // The window adapts when the next work comes, by the whole gap.
                return;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
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
}
