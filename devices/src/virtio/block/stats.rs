//! Per-disk I/O statistics under QEMU's `query-blockstats` names (QEMU `qapi/block-core.json`,
//! `BlockDeviceStats`), counted with relaxed atomics: no allocation on the request path and no
//! lock but when an interval's window rolls over (once per window and interval), so that the
//! iothreads serving one disk's queues (`iothread-vq-mapping`) count into the same statistics, and
//! the monitor reads them from any thread without the device's context.
//!
//! As in QEMU, write-zeroes count as writes and discards as unmap; requests refused before they
//! reach the image (out of range, read-only, malformed) count as `invalid_*`, requests the image
//! failed as `failed_*`; neither enters latencies, histograms or the idle time (QEMU's
//! `account_invalid` and `account_failed` off). Latency histograms have boundaries set at run time with QEMU's
//! `block-latency-histogram-set` semantics: `n` boundaries make `n + 1` bins, bin `i` counting
//! latencies in `[boundaries[i-1], boundaries[i])` nanoseconds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The kinds of request counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads (`rd_*`).
    Read,
    /// Writes and write-zeroes (`wr_*`).
    Write,
    /// Flushes (`flush_*`).
    Flush,
    /// Discards (`unmap_*`).
    Unmap,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Read => 0,
            Kind::Write => 1,
            Kind::Flush => 2,
            Kind::Unmap => 3,
        }
    }
}

/// Most boundaries a histogram takes (QEMU sets no limit; 64 covers any sensible use).
pub const MAX_HISTOGRAM_BOUNDARIES: usize = 64;

/// The bin of `ns` among `boundaries` (strictly increasing): the number of boundaries at or below
/// it, so bin `i` holds `[boundaries[i-1], boundaries[i])`.
pub(super) fn bin_of(boundaries: &[AtomicU64], ns: u64) -> usize {
    boundaries.partition_point(|b| b.load(Ordering::Relaxed) <= ns)
}

/// Checks boundaries by QEMU's rule (each above the one before, the first above zero) and the
/// limit of [`MAX_HISTOGRAM_BOUNDARIES`].
pub(super) fn check_boundaries(boundaries: &[u64]) -> Result<(), HistogramError> {
    if boundaries.len() > MAX_HISTOGRAM_BOUNDARIES {
        return Err(HistogramError::TooMany(boundaries.len()));
    }
    if boundaries.first() == Some(&0) || boundaries.windows(2).any(|w| w[0] >= w[1]) {
        return Err(HistogramError::NotIncreasing);
    }
    Ok(())
}

/// A latency histogram whose boundaries can change at run time.
#[derive(Debug)]
struct Histogram {
    /// Number of boundaries in use; 0 means no histogram.
    count: AtomicUsize,
    boundaries: [AtomicU64; MAX_HISTOGRAM_BOUNDARIES],
    bins: [AtomicU64; MAX_HISTOGRAM_BOUNDARIES + 1],
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            count: AtomicUsize::new(0),
            boundaries: std::array::from_fn(|_| AtomicU64::new(0)),
            bins: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn record(&self, ns: u64) {
        let count = self.count.load(Ordering::Acquire);
        if count == 0 {
            return;
        }
        self.bins[bin_of(&self.boundaries[..count], ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces the boundaries and clears the bins. A request completing meanwhile may land in
    /// the old layout's bin; QEMU's own switch is no more exact.
    fn set(&self, boundaries: &[u64]) {
        self.count.store(0, Ordering::Release);
        for (slot, b) in self.boundaries.iter().zip(boundaries) {
            slot.store(*b, Ordering::Relaxed);
        }
        for bin in &self.bins {
            bin.store(0, Ordering::Relaxed);
        }
        self.count.store(boundaries.len(), Ordering::Release);
    }

    fn snapshot(&self) -> Option<HistogramSnapshot> {
        let count = self.count.load(Ordering::Acquire);
        if count == 0 {
            return None;
        }
        Some(HistogramSnapshot {
            boundaries: self.boundaries[..count]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            bins: self.bins[..=count]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        })
    }
}

/// A histogram as `query-blockstats` reports it (`BlockLatencyHistogramInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Bin boundaries in nanoseconds, strictly increasing.
    pub boundaries: Vec<u64>,
    /// Counts, one more than the boundaries.
    pub bins: Vec<u64>,
}

/// Counters of one kind.
#[derive(Debug, Default)]
struct Counters {
    operations: AtomicU64,
    bytes: AtomicU64,
    total_time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// Errors of setting a histogram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    /// Boundaries must be strictly increasing and non-zero, as QEMU requires.
    #[error("histogram boundaries must be strictly increasing and non-zero")]
    NotIncreasing,
    /// More boundaries than [`MAX_HISTOGRAM_BOUNDARIES`].
    #[error("{0} histogram boundaries is more than {MAX_HISTOGRAM_BOUNDARIES}")]
    TooMany(usize),
}

/// Latency of one kind in one window; written by the threads completing the disk's requests
/// (one per queue group), read by any.
#[derive(Debug)]
struct Window {
    /// Start of the window (ns on the shifted clock, see `TimedStats::record`); 0 = never used.
    /// Only grows, under `roll`, stored after the counters' reset (release): a thread that reads
    /// the start it computed (acquire) counts after that reset.
    start: AtomicU64,
    /// Held to roll the window over (check its start, reset the counters, store the new start):
    /// two threads crossing the window's end at once reset it once, not the second after the
    /// first counted.
    roll: Mutex<()>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Window {
    fn new() -> Self {
        Window {
            start: AtomicU64::new(0),
            roll: Mutex::new(()),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
        }
    }
}

/// Latency per interval, after QEMU's `TimedAverage` (`util/timed-average.c`): two windows of the
/// interval's length, staggered by half of it, each restarted when it expires; a query reads the
/// one that has run longer, so it always covers between half and all of the interval.
#[derive(Debug)]
struct TimedStats {
    interval_ns: u64,
    /// `[kind][window]` for reads, writes and flushes.
    windows: [[Window; 2]; 3],
}

/// The kinds QEMU keeps timed statistics for, by index into `TimedStats::windows`.
fn timed_index(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Read => Some(0),
        Kind::Write => Some(1),
        Kind::Flush => Some(2),
        Kind::Unmap => None,
    }
}

impl TimedStats {
    fn new(interval_ns: u64) -> Self {
        TimedStats {
            interval_ns,
            windows: std::array::from_fn(|_| [Window::new(), Window::new()]),
        }
    }

    /// Where window `w` that is running at `t` started. Times are shifted by one interval, so
    /// both windows have started by the time of the first request.
    fn window_start(&self, w: usize, t: u64) -> u64 {
        let offset = if w == 0 { 0 } else { self.interval_ns / 2 };
        let t = t.saturating_add(self.interval_ns) - offset;
        t - t % self.interval_ns + offset
    }

    fn record(&self, kind: Kind, now_ns: u64, latency_ns: u64) {
        let Some(k) = timed_index(kind) else {
            return;
        };
        for (w, win) in self.windows[k].iter().enumerate() {
            let start = self.window_start(w, now_ns);
            // A completion timed before another thread rolled the window over (an older start)
            // counts in the window it finds rather than taking the window back.
            if win.start.load(Ordering::Acquire) < start {
                // The lock guards no data of its own: a poisoned one is as good.
                let _roll = win.roll.lock().unwrap_or_else(PoisonError::into_inner);
                if win.start.load(Ordering::Relaxed) < start {
                    win.count.store(0, Ordering::Relaxed);
                    win.sum_ns.store(0, Ordering::Relaxed);
                    win.min_ns.store(u64::MAX, Ordering::Relaxed);
                    win.max_ns.store(0, Ordering::Relaxed);
                    win.start.store(start, Ordering::Release);
                }
            }
            win.count.fetch_add(1, Ordering::Relaxed);
            win.sum_ns.fetch_add(latency_ns, Ordering::Relaxed);
            win.min_ns.fetch_min(latency_ns, Ordering::Relaxed);
            win.max_ns.fetch_max(latency_ns, Ordering::Relaxed);
        }
    }

    /// (min, max, avg latency, queue depth) of `k` at `now_ns`, from the longer-running window.
    fn query(&self, k: usize, now_ns: u64) -> (u64, u64, u64, f64) {
        let w = usize::from(self.window_start(1, now_ns) < self.window_start(0, now_ns));
        let win = &self.windows[k][w];
        let start = self.window_start(w, now_ns);
        if win.start.load(Ordering::Relaxed) != start {
            return (0, 0, 0, 0.0);
        }
        let count = win.count.load(Ordering::Relaxed);
        let sum = win.sum_ns.load(Ordering::Relaxed);
        if count == 0 {
            return (0, 0, 0, 0.0);
        }
        let elapsed = now_ns
            .saturating_add(self.interval_ns)
            .saturating_sub(start)
            .max(1);
        // Little's law, as QEMU's `block_account_queue_depth`: time spent in flight over time.
        #[allow(clippy::cast_precision_loss)]
        let depth = sum as f64 / elapsed as f64;
        (
            win.min_ns.load(Ordering::Relaxed),
            win.max_ns.load(Ordering::Relaxed),
            sum / count,
            depth,
        )
    }

    fn snapshot(&self, now_ns: u64) -> TimedSnapshot {
        let lat = |k| {
            let (min_ns, max_ns, avg_ns, _) = self.query(k, now_ns);
            Latency {
                min_ns,
                max_ns,
                avg_ns,
            }
        };
        TimedSnapshot {
            interval_length: self.interval_ns / 1_000_000_000,
            rd: lat(0),
            wr: lat(1),
            flush: lat(2),
            avg_rd_queue_depth: self.query(0, now_ns).3,
            avg_wr_queue_depth: self.query(1, now_ns).3,
        }
    }
}

/// Latency over an interval, in nanoseconds (`min_rd_latency_ns`, `max_rd_latency_ns`,
/// `avg_rd_latency_ns` and the same for `wr` and `flush`); zeroes when nothing completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// Shortest.
    pub min_ns: u64,
    /// Longest.
    pub max_ns: u64,
    /// Mean.
    pub avg_ns: u64,
}

/// One entry of `timed_stats` (QEMU's `BlockDeviceTimedStats`).
#[derive(Debug, Clone, PartialEq)]
pub struct TimedSnapshot {
    /// `interval_length`, in seconds.
    pub interval_length: u64,
    /// Read latency.
    pub rd: Latency,
    /// Write latency.
    pub wr: Latency,
    /// Flush latency.
    pub flush: Latency,
    /// `avg_rd_queue_depth`.
    pub avg_rd_queue_depth: f64,
    /// `avg_wr_queue_depth`.
    pub avg_wr_queue_depth: f64,
}

/// One disk's statistics.
#[derive(Debug)]
pub struct BlockStats {
    kinds: [Counters; 4],
    histograms: [Histogram; 4],
    /// One per `-drive stats-intervals=` entry.
    timed: Vec<TimedStats>,
    /// Since when times are measured.
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last completion, plus one; 0 before the first.
    last_completion: AtomicU64,
    /// The offset after the greatest byte written.
    wr_highest_offset: AtomicU64,
}

impl Default for BlockStats {
    fn default() -> Self {
        Self::new(&[])
    }
}

/// Saturating nanoseconds of a duration.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl BlockStats {
    /// Statistics with `timed_stats` over each of `intervals` (seconds, each at least 1;
    /// `-drive stats-intervals=`).
    pub fn new(intervals: &[u32]) -> Self {
        BlockStats {
            kinds: Default::default(),
            histograms: std::array::from_fn(|_| Histogram::new()),
            timed: intervals
                .iter()
                .map(|&s| TimedStats::new(u64::from(s.max(1)) * 1_000_000_000))
                .collect(),
            epoch: Instant::now(),
            last_completion: AtomicU64::new(0),
            wr_highest_offset: AtomicU64::new(0),
        }
    }

    /// Counts a completed request of `bytes` that started at `start`. Called by the threads that
    /// complete the disk's requests, several at once when its queues are spread over iothreads.
    pub fn done(&self, kind: Kind, bytes: u64, start: Instant, ok: bool) {
        let now = Instant::now();
        let since = nanos(now.saturating_duration_since(self.epoch));
        let c = &self.kinds[kind.index()];
        if ok {
            let ns = nanos(now.saturating_duration_since(start));
            c.operations.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
            c.total_time_ns.fetch_add(ns, Ordering::Relaxed);
            self.histograms[kind.index()].record(ns);
            for t in &self.timed {
                t.record(kind, since, ns);
            }
            self.last_completion
                .store(since.saturating_add(1), Ordering::Relaxed);
        } else {
            // Like QEMU with `account_failed` off: counted, but outside latency and idle time.
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a successful write (or write-zeroes) ending at disk offset `end`.
    pub fn wrote_up_to(&self, end: u64) {
        self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
    }

    /// Counts a request refused before it reached the image.
    pub fn invalid(&self, kind: Kind) {
        self.kinds[kind.index()]
            .invalid
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Sets (or with `None`, removes) the latency histogram of `kind`.
    pub fn set_histogram(
        &self,
        kind: Kind,
        boundaries: Option<&[u64]>,
    ) -> Result<(), HistogramError> {
        let boundaries = boundaries.unwrap_or(&[]);
        check_boundaries(boundaries)?;
        self.histograms[kind.index()].set(boundaries);
        Ok(())
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |kind: Kind| {
            let c = &self.kinds[kind.index()];
            KindSnapshot {
                operations: c.operations.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                total_time_ns: c.total_time_ns.load(Ordering::Relaxed),
                failed_operations: c.failed.load(Ordering::Relaxed),
                invalid_operations: c.invalid.load(Ordering::Relaxed),
                latency_histogram: self.histograms[kind.index()].snapshot(),
            }
        };
        let now = nanos(self.epoch.elapsed());
        let last = self.last_completion.load(Ordering::Relaxed);
        let idle_time_ns = (last > 0).then(|| now.saturating_sub(last - 1));
        StatsSnapshot {
            rd: get(Kind::Read),
            wr: get(Kind::Write),
            flush: get(Kind::Flush),
            unmap: get(Kind::Unmap),
            idle_time_ns,
            wr_highest_offset: self.wr_highest_offset.load(Ordering::Relaxed),
            timed_stats: self.timed.iter().map(|t| t.snapshot(now)).collect(),
        }
    }
}

/// One kind's counters; the QMP names are `<kind>_operations`, `<kind>_bytes` (not for flush),
/// `<kind>_total_time_ns`, `failed_<kind>_operations`, `invalid_<kind>_operations` and
/// `<kind>_latency_histogram`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Completed operations.
    pub operations: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Their total latency.
    pub total_time_ns: u64,
    /// Operations the image failed.
    pub failed_operations: u64,
    /// Operations refused before reaching the image.
    pub invalid_operations: u64,
    /// The latency histogram, if one is set.
    pub latency_histogram: Option<HistogramSnapshot>,
}

/// A disk's statistics at one moment, by QEMU's names.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    /// `rd_*`.
    pub rd: KindSnapshot,
    /// `wr_*` (writes and write-zeroes).
    pub wr: KindSnapshot,
    /// `flush_*`.
    pub flush: KindSnapshot,
    /// `unmap_*` (discards).
    pub unmap: KindSnapshot,
    /// `idle_time_ns`: time since the last completion; absent before the first, as in QEMU.
    pub idle_time_ns: Option<u64>,
    /// `wr_highest_offset`: the offset after the greatest byte written.
    pub wr_highest_offset: u64,
    /// `timed_stats`, one per interval.
    pub timed_stats: Vec<TimedSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_outcome() {
        let stats = BlockStats::default();
        assert_eq!(stats.snapshot().idle_time_ns, None);
        let start = Instant::now();
        // A failure is counted but is not an access for the idle time.
        stats.done(Kind::Flush, 0, start, false);
        assert_eq!(stats.snapshot().idle_time_ns, None);
        stats.done(Kind::Read, 4096, start, true);
        stats.done(Kind::Read, 4096, start, false);
        stats.done(Kind::Write, 512, start, true);
        stats.invalid(Kind::Unmap);
        stats.wrote_up_to(8192);
        stats.wrote_up_to(4096);
        let s = stats.snapshot();
        assert_eq!(s.wr_highest_offset, 8192);
        assert_eq!(
            (s.rd.operations, s.rd.bytes, s.rd.failed_operations),
            (1, 4096, 1)
        );
        assert_eq!((s.wr.operations, s.wr.bytes), (1, 512));
        assert_eq!(s.unmap.invalid_operations, 1);
        assert_eq!(s.flush.operations, 0);
        assert!(s.idle_time_ns.is_some());
        assert!(s.timed_stats.is_empty());
        let timed = BlockStats::new(&[60, 3600]);
        timed.done(Kind::Write, 512, start, true);
        let s = timed.snapshot();
        assert_eq!(s.timed_stats.len(), 2);
        assert_eq!(s.timed_stats[1].interval_length, 3600);
        assert!(s.timed_stats[0].wr.max_ns > 0);
        assert_eq!(s.timed_stats[0].rd.max_ns, 0);
    }

    #[test]
    fn histogram_bins_follow_the_boundaries() {
        let stats = BlockStats::default();
        let start = Instant::now();
        stats.done(Kind::Flush, 0, start, true);
        assert_eq!(stats.snapshot().flush.latency_histogram, None);
        // Every latency is below 1 hour and at least 0 ns: all land in the middle bin.
        stats
            .set_histogram(Kind::Flush, Some(&[1, 3_600_000_000_000]))
            .expect("valid boundaries");
        stats.done(Kind::Flush, 0, start - Duration::from_millis(1), true);
        let h = stats.snapshot().flush.latency_histogram.expect("set");
        assert_eq!(h.boundaries, vec![1, 3_600_000_000_000]);
        assert_eq!(h.bins, vec![0, 1, 0]);
        stats.set_histogram(Kind::Flush, None).expect("removal");
        assert_eq!(stats.snapshot().flush.latency_histogram, None);
    }

    #[test]
    fn timed_windows_keep_min_max_avg_and_expire() {
        let t = TimedStats::new(10);
        // Window starts: window 0 at multiples of 10, window 1 at 5 + multiples of 10 (shifted).
        assert_eq!(t.window_start(0, 3), 10);
        assert_eq!(t.window_start(1, 3), 5);
        assert_eq!(t.window_start(1, 7), 15);
        t.record(Kind::Read, 1, 100);
        t.record(Kind::Read, 2, 300);
        t.record(Kind::Unmap, 2, 7);
        // At 4 window 1 (started at 5) has run longer than window 0 (started at 10).
        assert_eq!(t.query(0, 4), (100, 300, 200, 400.0 / 9.0));
        assert_eq!(t.query(1, 4), (0, 0, 0, 0.0));
        // At 9, window 1 restarted at 15 and window 0 (10..20) holds the samples.
        assert_eq!(t.query(0, 9).0, 100);
        // Much later every window has expired.
        assert_eq!(t.query(0, 100), (0, 0, 0, 0.0));
        let s = t.snapshot(4);
        assert_eq!((s.interval_length, s.rd.max_ns, s.wr.max_ns), (0, 300, 0));
    }

    #[test]
    fn a_completion_timed_before_a_roll_over_does_not_undo_it() {
        // Two iothreads serving one disk: one times its completion at 19, the other at 20 and
        // records first, rolling window 0 over to the one that starts at 20 (shifted: 30).
        let t = TimedStats::new(10);
        t.record(Kind::Read, 20, 1);
        t.record(Kind::Read, 19, 2);
        t.record(Kind::Read, 21, 4);
        let win = &t.windows[0][0];
        assert_eq!(win.start.load(Ordering::Relaxed), 30);
        // The late one counts in the window it reached; none is lost.
        assert_eq!(win.count.load(Ordering::Relaxed), 3);
        assert_eq!(win.sum_ns.load(Ordering::Relaxed), 7);
        assert_eq!(t.query(0, 21).1, 4);
    }

    #[test]
    fn a_window_rolling_over_under_two_threads_loses_no_count() {
        // Two threads (two iothreads serving one disk's queues) record into the same windows in
        // lockstep: each round moves the clock one interval on, one thread opens it and both
        // race to roll the windows over (after a short spin of varying length, so that their
        // roll-overs meet) before counting. After every round both windows hold exactly the
        // round's samples. The race is a matter of timing: an unguarded roll-over loses it in
        // some rounds of a run of this length.
        const ROUNDS: u64 = 10_000;
        const PER_THREAD: u64 = 4;
        let t = TimedStats::new(10);
        // Rounds opened, and threads done with the current round.
        let opened = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let wait_until = |v: &AtomicU64, n: u64| {
            while v.load(Ordering::Acquire) < n {
                std::hint::spin_loop();
            }
        };
        let run = |opener: bool| {
            let mut lost_rounds = 0;
            for round in 1..=ROUNDS {
                if opener {
                    wait_until(&done, 2 * (round - 1));
                    // Both windows rolled over last round (the clock moved by their length).
                    let counted: Vec<_> = t.windows[0]
                        .iter()
                        .map(|w| {
                            (
                                w.count.load(Ordering::Relaxed),
                                w.sum_ns.load(Ordering::Relaxed),
                            )
                        })
                        .collect();
                    if round > 1 && counted != [(2 * PER_THREAD, 2 * PER_THREAD); 2] {
                        lost_rounds += 1;
                    }
                    opened.store(round, Ordering::Release);
                } else {
                    wait_until(&opened, round);
                }
                for _ in 0..(round * 7 + u64::from(opener) * 13) % 32 {
                    std::hint::spin_loop();
                }
                for _ in 0..PER_THREAD {
                    t.record(Kind::Read, round * 10, 1);
                }
                done.fetch_add(1, Ordering::AcqRel);
            }
            lost_rounds
        };
        let lost_rounds = std::thread::scope(|s| {
            let other = s.spawn(|| run(false));
            let lost = run(true);
            other.join().expect("the recording thread does not panic");
            lost
        });
        assert_eq!(lost_rounds, 0, "rounds with counts lost, of {ROUNDS}");
    }

    #[test]
    fn bad_boundaries_are_refused() {
        let stats = BlockStats::default();
        assert_eq!(
            stats.set_histogram(Kind::Read, Some(&[10, 10])),
            Err(HistogramError::NotIncreasing)
        );
        assert_eq!(
            stats.set_histogram(Kind::Read, Some(&[0, 10])),
            Err(HistogramError::NotIncreasing)
        );
        let many: Vec<u64> = (1..=65).collect();
        assert_eq!(
            stats.set_histogram(Kind::Read, Some(&many)),
            Err(HistogramError::TooMany(65))
        );
    }
}
