//! A job's speed limit with QEMU's semantics (`include/qemu/ratelimit.h`, used by block jobs
//! with a 100 ms slice): each slice may dispatch `speed` × slice bytes; a step that passes the
//! quota pushes the end of the slice out by the excess and the job sleeps until then. Speed 0 is
//! unlimited. A step counts in the slice current when it started, as QEMU's job asks for its
//! delay before it copies: the time its I/O takes is part of the slice, not added to it, so the
//! job reaches its speed however long a step takes (within the slice). Unlike QEMU's, a slice
//! that follows a full one starts where that one ended, not when the next step starts: a thread
//! that wakes late for its next step (a busy host) catches up within the next slice instead of
//! losing the time; after a whole slice without a step the next one starts afresh, so no more
//! than one slice's quota is ever dispatched at once.

use std::time::{Duration, Instant};

/// QEMU's block job slice (`SLICE_TIME`).
const SLICE: Duration = Duration::from_millis(100);

/// Bytes dispatched in the current slice against its quota.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Bytes per slice; 0 = no limit.
    quota: u64,
    start: Instant,
    end: Instant,
    dispatched: u64,
}

impl RateLimit {
    /// No limit until [`RateLimit::set_speed`].
    pub fn new(now: Instant) -> Self {
        Self {
            quota: 0,
            start: now,
            end: now,
            dispatched: 0,
        }
    }

    /// Sets the limit in bytes per second (0: none). A positive speed gives at least one byte
    /// per slice, as QEMU rounds it.
    pub fn set_speed(&mut self, speed: u64) {
        self.quota = if speed == 0 {
            0
        } else {
            let per_slice = u128::from(speed) * SLICE.as_nanos() / 1_000_000_000;
            u64::try_from(per_slice).unwrap_or(u64::MAX).max(1)
        };
    }

    /// Accounts `bytes` dispatched by a step that started at `started`, at `now` (its end);
    /// returns how long to wait before the next step.
    pub fn delay(&mut self, bytes: u64, started: Instant, now: Instant) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        if self.end < started {
            // The previous (possibly extended) slice was over when the step started: the step
            // is the first of a new one, which follows on from it unless a whole slice passed.
            self.start = if started < self.end + SLICE {
                self.end
            } else {
                started
            };
            self.end = self.start + SLICE;
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(bytes);
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        // Over quota: the slice stretches in proportion to the excess.
        let slices = self.dispatched as f64 / self.quota as f64;
        self.end = self.start + SLICE.mul_f64(slices);
        self.end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_speed_never_waits() {
        let now = Instant::now();
        let mut limit = RateLimit::new(now);
        assert_eq!(limit.delay(u64::MAX, now, now), Duration::ZERO);
        limit.set_speed(0);
        assert_eq!(limit.delay(1 << 40, now, now), Duration::ZERO);
    }

    #[test]
    fn a_step_past_the_quota_waits_for_its_excess() {
        let now = Instant::now();
        let mut limit = RateLimit::new(now);
        // 1 MiB/s: 104857 bytes per 100 ms slice.
        limit.set_speed(1 << 20);
        assert_eq!(limit.delay(50_000, now, now), Duration::ZERO);
        // 512 KiB in one go: five slices' worth in all, counted from the slice's start.
        let wait = limit.delay(512 << 10, now, now);
        let expected = SLICE.mul_f64((50_000.0 + 524_288.0) / 104_857.0);
        assert!(
            wait.abs_diff(expected) < Duration::from_micros(10),
            "{wait:?}"
        );
        // Once that time has passed a new slice starts empty.
        let later = now + wait + Duration::from_millis(1);
        assert_eq!(limit.delay(1000, later, later), Duration::ZERO);
    }

    /// The rate a job whose steps copy `step` bytes each and take `io` each reaches at
    /// `speed` over `steps` steps (a clock of its own: each step starts `late` after the
    /// previous one's wait ends).
    fn rate(speed: u64, step: u64, io: Duration, late: Duration, steps: u32) -> f64 {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(t0);
        limit.set_speed(speed);
        let mut now = t0;
        for _ in 0..steps {
            let started = now;
            now += io;
            now += limit.delay(step, started, now) + late;
        }
        f64::from(steps) * step as f64 / (now - t0).as_secs_f64()
    }

    #[test]
    fn steps_that_take_time_still_reach_the_speed() {
        // 10 MiB/s: 512 KiB steps every 50 ms, whatever part of that their I/O takes.
        let speed = 10 << 20;
        let ms = Duration::from_millis;
        // Every step with its late wake-up within those 50 ms.
        for io in [0, 1, 20, 40, 45] {
            for late in [0, 1, 5, 20].into_iter().filter(|l| io + l <= 50) {
                let got = rate(speed, 512 << 10, ms(io), ms(late), 200);
                let ratio = got / speed as f64;
                assert!(
                    (0.99..=1.01).contains(&ratio),
                    "{io} ms a step, woken {late} ms late: {ratio}"
                );
            }
        }
        // Slower than the speed when the I/O itself is: no faster than the steps go.
        let got = rate(speed, 512 << 10, ms(100), Duration::ZERO, 50);
        assert!((got - 5_242_880.0).abs() < 1.0, "{got}");
    }

    #[test]
    fn a_job_idle_for_a_slice_does_not_burst_past_one_slice_s_quota() {
        let now = Instant::now();
        let mut limit = RateLimit::new(now);
        // 1 MiB/s: 104857 bytes per slice.
        limit.set_speed(1 << 20);
        assert_eq!(limit.delay(104_857, now, now), SLICE);
        // Two slices later the next slice starts afresh: 100000 bytes go at once, one more
        // slice's quota waits its slice out.
        let later = now + SLICE * 3;
        assert_eq!(limit.delay(100_000, later, later), Duration::ZERO);
        let wait = limit.delay(104_857, later, later);
        let expected = SLICE.mul_f64(204_857.0 / 104_857.0);
        assert!(
            wait.abs_diff(expected) < Duration::from_micros(10),
            "{wait:?}"
        );
    }

    #[test]
    fn a_tiny_speed_still_has_a_quota() {
        let now = Instant::now();
        let mut limit = RateLimit::new(now);
        limit.set_speed(1);
        let wait = limit.delay(2, now, now);
        assert_eq!(wait, SLICE * 2);
    }
}
