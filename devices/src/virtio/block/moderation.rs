//! Interrupt moderation: a queue's interrupt waits while more of its requests are in flight
//! and the next of them is expected to complete soon, so that a deep queue's completions reach
//! the driver several to an interrupt instead of one each.
//!
//! Every interrupt costs the guest an exit, its handler and an EOI, and takes its vCPU from
//! whatever it ran; the completions it announces cost the guest the same handler whether there
//! are one or ten. So when a request completes and others of its queue are still in flight,
//! the device puts it in the used ring at once (the driver sees it on its next look) and holds
//! the interrupt for as long as the queue's completions keep coming at their usual pace:
//!
//! - the hold ends, and the interrupt goes, as soon as nothing of the queue is in flight: the
//!   driver has nothing more to wait for, so a request alone in its queue (queue depth 1) is
//!   never held;
//! - it also ends when the next completion is late: [`GAPS`] times the queue's smoothed gap
//!   between completions (measured only while requests stayed in flight, so idle time does not
//!   count) after the last one; on a device answering in microseconds that is microseconds;
//! - and whatever the pace, no completion waits more than [`MAX_HOLD`] for its interrupt.
//!
//! A queue with no gap measured yet is not held. The held interrupt is sent as any other: the
//! driver's event idx, its `VIRTQ_AVAIL_F_NO_INTERRUPT` flag, MSI-X or INTx decide as they
//! would have (`needs_notification` looks at every used entry added since the last interrupt).
//! The device's group arms a timer for the earliest deadline of its held queues
//! (`event_handler.rs`), so a held interrupt goes out when due even if nothing else happens.
//!
//! This is what a storage adapter's interrupt coalescing does (NVMe's aggregation threshold and
//! time, VMware's vIC scaling the coalescing with the commands in flight), without settings:
//! the commands in flight say whether to hold, the measured pace says for how long.

use std::time::{Duration, Instant};

/// Longest a completion waits for its interrupt.
pub(super) const MAX_HOLD: Duration = Duration::from_millis(4);

/// How many of the queue's usual gaps between completions the next one may take before the held
/// interrupt goes out without it.
pub(super) const GAPS: u32 = 2;

/// What to do with a queue's interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No completion waits for an interrupt.
    Nothing,
    /// Interrupt now (if the driver wants it).
    Signal,
    /// Hold the interrupt, at most until this time.
    Hold(Instant),
}

/// A queue's interrupt moderation (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct Moderation {
    /// When the oldest completion whose interrupt is held went to the used ring.
    held_since: Option<Instant>,
    /// The queue's last completion, when it left requests of the queue in flight.
    last: Option<Instant>,
    /// The queue's smoothed gap between completions while requests stay in flight, in
    /// nanoseconds (0: none measured yet).
    gap_ns: u64,
}

impl Moderation {
    /// `reaped` completions of the queue went to its used ring at `now` (none: the question is
    /// asked again, as when the timer fires), leaving `in_flight` requests of the queue in
    /// flight: whether to interrupt the driver now.
    pub(super) fn completed(&mut self, now: Instant, reaped: u64, in_flight: usize) -> Verdict {
        if reaped > 0 {
            let sample = self.last.and_then(|last| {
                u64::try_from(now.saturating_duration_since(last).as_nanos())
                    .unwrap_or(u64::MAX)
                    .checked_div(reaped)
            });
            if let Some(sample) = sample {
                // An exponentially weighted mean, 1/8 to the new sample (as TCP's srtt).
                self.gap_ns = if self.gap_ns == 0 {
                    sample.max(1)
                } else {
                    (self.gap_ns / 8)
                        .saturating_mul(7)
                        .saturating_add(sample / 8)
                        .max(1)
                };
            }
            self.last = (in_flight > 0).then_some(now);
            self.held_since.get_or_insert(now);
        }
        let Some(since) = self.held_since else {
            return Verdict::Nothing;
        };
        let Some(last) = self.last.filter(|_| in_flight > 0 && self.gap_ns > 0) else {
            return Verdict::Signal;
        };
        let late = last + Duration::from_nanos(self.gap_ns).saturating_mul(GAPS);
        let deadline = late.min(since + MAX_HOLD);
        if now >= deadline {
            Verdict::Signal
        } else {
            Verdict::Hold(deadline)
        }
    }

    /// The driver was interrupted for the queue, or asked not to be: nothing is held any more.
    pub(super) fn released(&mut self) {
        self.held_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_completion_with_nothing_else_in_flight_is_never_held() {
        let mut m = Moderation::default();
        let t = Instant::now();
        for i in 0..10 {
            assert_eq!(m.completed(t + us(100 * i), 1, 0), Verdict::Signal);
            m.released();
        }
        assert_eq!(m.completed(t + us(2000), 0, 0), Verdict::Nothing);
    }

    #[test]
    fn the_first_completion_of_a_deep_queue_goes_out_until_a_pace_is_known() {
        let mut m = Moderation::default();
        let t = Instant::now();
        assert_eq!(m.completed(t, 1, 5), Verdict::Signal);
        m.released();
        // The second gives the first gap: 100 us, held for two of them.
        assert_eq!(m.completed(t + us(100), 1, 4), Verdict::Hold(t + us(300)));
    }

    #[test]
    fn completions_at_their_pace_stay_held_until_the_queue_is_empty() {
        let mut m = Moderation::default();
        let t = Instant::now();
        m.completed(t, 1, 8);
        m.released();
        let mut now = t;
        for left in (1..8).rev() {
            now += us(100);
            assert!(
                matches!(m.completed(now, 1, left), Verdict::Hold(d) if d > now),
                "{left} left"
            );
        }
        // The last one: nothing left to wait for.
        assert_eq!(m.completed(now + us(100), 1, 0), Verdict::Signal);
        m.released();
        assert_eq!(m.completed(now + us(150), 0, 0), Verdict::Nothing);
    }

    #[test]
    fn a_late_completion_lets_the_held_interrupt_go() {
        let mut m = Moderation::default();
        let t = Instant::now();
        m.completed(t, 1, 4);
        m.released();
        let Verdict::Hold(deadline) = m.completed(t + us(100), 1, 3) else {
            panic!("not held");
        };
        // Asked again (the timer) before the deadline: still held; at it: out.
        assert_eq!(m.completed(deadline - us(1), 0, 3), Verdict::Hold(deadline));
        assert_eq!(m.completed(deadline, 0, 3), Verdict::Signal);
    }

    #[test]
    fn no_completion_waits_longer_than_the_longest_hold() {
        let mut m = Moderation::default();
        let t = Instant::now();
        // A slow pace: 3 ms between completions, so each may wait 6 ms for the next...
        m.completed(t, 1, 30);
        m.released();
        let first = t + us(3000);
        assert_eq!(m.completed(first, 1, 29), Verdict::Hold(first + MAX_HOLD));
        // ...but the first held waits MAX_HOLD at most, however many come in time.
        let second = first + us(3000);
        assert_eq!(m.completed(second, 1, 28), Verdict::Hold(first + MAX_HOLD));
        assert_eq!(m.completed(first + MAX_HOLD, 0, 28), Verdict::Signal);
        m.released();
        // The next hold counts from its own first completion.
        let third = second + us(3000);
        assert!(matches!(m.completed(third, 1, 27), Verdict::Hold(d) if d == third + MAX_HOLD));
    }

    #[test]
    fn idle_time_between_bursts_does_not_count_as_a_gap() {
        let mut m = Moderation::default();
        let t = Instant::now();
        m.completed(t, 1, 1);
        m.released();
        assert_eq!(m.completed(t + us(100), 1, 0), Verdict::Signal);
        m.released();
        // A second later a new burst: its first completion's gap is not one second.
        let burst = t + Duration::from_secs(1);
        assert_eq!(m.completed(burst, 1, 3), Verdict::Hold(burst + us(200)));
    }

    #[test]
    fn a_reap_of_several_counts_each_of_their_gaps() {
        let mut m = Moderation::default();
        let t = Instant::now();
        m.completed(t, 1, 10);
        m.released();
        // Four in 400 us: a gap of 100 us each.
        assert_eq!(m.completed(t + us(400), 4, 6), Verdict::Hold(t + us(600)));
    }
}
