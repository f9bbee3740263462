//! The adaptive poll window a device thread uses between the guest's notifications,
//! shared by the device host's poller and the vhost-user back-end's worker.

use std::time::Duration;

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
