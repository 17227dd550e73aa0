//! Where each request's time goes, per queue and stage (`x-query-blockstats-stages`): the
//! stages of `stats.rs`'s end-to-end latency, each with a count, a sum, a maximum and a
//! histogram whose boundaries change at run time with `block-latency-histogram-set`'s rules.
//!
//! A request's stages, from the monotonic clock reads it already passes ([`Times`]):
//! - queue wait: from the device's handler waking for the queue's notification (its ioeventfd
//!   readable) to the request being taken from the available ring; requests the driver added
//!   while earlier ones were being taken wait for those;
//! - submission: parsing the chain, mapping its buffers and checking it, up to the hand-off;
//! - backend: from the hand-off to the host I/O completing, split into dispatch (the engine
//!   taking it: waking a worker), metadata (what a worker spent outside data transfers: qcow2
//!   lookups, table loads, allocation, refcounts, the metadata lock) and data (transfers to and
//!   from the host file), from the engine's [`block::trace::IoTrace`]; on the io_uring ring the
//!   whole backend is data I/O (its mapping was looked up at submission);
//! - completion: from the host I/O completing to the status and used entry written and the
//!   interrupt injected (or found unwanted by event idx).
//!
//! `total` is their sum (`queue-wait + submission + backend + completion`, and
//! `backend = dispatch + metadata + data`), exactly, since each boundary is one clock read. Each
//! queue also counts its requests by the backing-chain layer that served them (0 = the top image).
//! Only requests that reached the image and succeeded are timed, as the end-to-end latencies.
//! Each queue also counts how its completions reach the driver, whatever the timing: the reaps of
//! its group's engine that completed requests of the queue, those requests, and the interrupts
//! the device injected for the queue (for completions, and for requests answered at once), so
//! that completions per reap and interrupts per reap show how completions are batched.
//!
//! Cost and locking: the counters of a queue are written only by the context serving the queue,
//! with its queue group's state mutex held, so an increment is a plain load and store of a relaxed atomic (no
//! locked instruction); atomics only because the monitor reads them from another thread. A
//! boundary change is asked by the monitor (a mutex the fast path never takes) and applied by the
//! context at the queue's next request, which then clears that queue's bins; the fast path only
//! compares a generation number. A query racing with a request or a change may see part of
//! either, as QEMU's own statistics may.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use block::trace::IoTrace;

use super::stats::MAX_HISTOGRAM_BOUNDARIES;
use super::stats::{bin_of, check_boundaries, HistogramError, HistogramSnapshot};

/// The stages, in the order a request passes them (sub-stages after the stage they split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Notification to the request taken from the ring.
    QueueWait,
    /// Taken to handed to the engine.
    Submission,
    /// Handed to the engine to the host I/O completed.
    Backend,
    /// Of the backend: handed over to a worker taking it.
    Dispatch,
    /// Of the backend: a worker's time outside data transfers.
    Metadata,
    /// Of the backend: data transfers.
    Data,
    /// Host I/O completed to used entry and interrupt.
    Completion,
    /// Notification to interrupt: the sum of the four stages.
    Total,
}

/// Every stage, in reporting order.
pub const STAGES: [Stage; 8] = [
    Stage::QueueWait,
    Stage::Submission,
    Stage::Backend,
    Stage::Dispatch,
    Stage::Metadata,
    Stage::Data,
    Stage::Completion,
    Stage::Total,
];

impl Stage {
    /// The stage's name in QMP replies.
    pub fn name(self) -> &'static str {
        match self {
            Stage::QueueWait => "queue-wait",
            Stage::Submission => "submission",
            Stage::Backend => "backend",
            Stage::Dispatch => "backend-dispatch",
            Stage::Metadata => "backend-metadata",
            Stage::Data => "backend-data",
            Stage::Completion => "completion",
            Stage::Total => "total",
        }
    }
}

/// Backing-chain layers counted apart; deeper ones count in the last.
pub const DEPTHS: usize = 8;

/// The histogram boundaries a disk starts with: 1, 1.5, 2, 3, 5 and 7 times each power of ten
/// from 100 ns to 100 ms, and 1 s (43 boundaries, so a percentile falls in a bin at most 5/3
/// as wide as its lower edge up to 1 s).
pub fn default_boundaries() -> Vec<u64> {
    let mut b = Vec::with_capacity(43);
    let mut decade = 100u64;
    while decade < 1_000_000_000 {
        b.extend([10, 15, 20, 30, 50, 70].map(|m| decade * m / 10));
        decade *= 10;
    }
    b.push(1_000_000_000);
    b
}

/// The clock reads of one request (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Times {
    /// The handler woke for the queue.
    pub woke: Instant,
    /// The request was taken from the ring.
    pub taken: Instant,
    /// The request was handed to the engine.
    pub submitted: Instant,
    /// What the engine recorded (host completion, worker start, data time, layer).
    pub trace: IoTrace,
    /// The used entry was written and the interrupt injected.
    pub completed: Instant,
}

/// Saturating nanoseconds from `a` to `b`.
fn between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_nanos()).unwrap_or(u64::MAX)
}

impl Times {
    /// Each stage's nanoseconds, in [`STAGES`] order, and the layer that served the request.
    pub fn split(&self) -> ([u64; 8], usize) {
        let queue_wait = between(self.woke, self.taken);
        let submission = between(self.taken, self.submitted);
        let backend = between(self.submitted, self.trace.done);
        let dispatch = self
            .trace
            .started
            .map_or(0, |s| between(self.submitted, s))
            .min(backend);
        let worked = backend - dispatch;
        let data = if self.trace.started.is_some() {
            self.trace.data_ns.min(worked)
        } else {
            worked
        };
        let completion = between(self.trace.done, self.completed);
        let total = queue_wait
            .saturating_add(submission)
            .saturating_add(backend)
            .saturating_add(completion);
        (
            [
                queue_wait,
                submission,
                backend,
                dispatch,
                worked - data,
                data,
                completion,
                total,
            ],
            usize::from(self.trace.depth).min(DEPTHS - 1),
        )
    }
}

/// Adds `by` to a counter that only one thread at a time writes (see the module documentation).
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// One stage of one queue.
#[derive(Debug)]
struct StageCell {
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
    bins: [AtomicU64; MAX_HISTOGRAM_BOUNDARIES + 1],
}

impl StageCell {
    fn new() -> Self {
        StageCell {
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            bins: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One queue's stages, written by the context serving the queue.
#[derive(Debug)]
struct QueueStages {
    /// The boundary generation this queue's bins follow.
    applied: AtomicU64,
    /// Requests timed (every stage times each one).
    requests: AtomicU64,
    count: AtomicUsize,
    boundaries: [AtomicU64; MAX_HISTOGRAM_BOUNDARIES],
    cells: [StageCell; 8],
    /// Requests and their backend nanoseconds, by backing layer.
    depth_count: [AtomicU64; DEPTHS],
    depth_backend_ns: [AtomicU64; DEPTHS],
    /// Reaps that completed requests of this queue, those requests, and interrupts injected.
    reaps: AtomicU64,
    reaped: AtomicU64,
    interrupts: AtomicU64,
}

impl QueueStages {
    fn new() -> Self {
        QueueStages {
            applied: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            count: AtomicUsize::new(0),
            boundaries: std::array::from_fn(|_| AtomicU64::new(0)),
            cells: std::array::from_fn(|_| StageCell::new()),
            depth_count: std::array::from_fn(|_| AtomicU64::new(0)),
            depth_backend_ns: std::array::from_fn(|_| AtomicU64::new(0)),
            reaps: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
        }
    }

    /// Takes `boundaries` (generation `generation`) and empties the bins.
    fn apply(&self, generation: u64, boundaries: &[u64]) {
        for (slot, b) in self.boundaries.iter().zip(boundaries) {
            slot.store(*b, Ordering::Relaxed);
        }
        self.count.store(boundaries.len(), Ordering::Relaxed);
        for cell in &self.cells {
            for bin in &cell.bins {
                bin.store(0, Ordering::Relaxed);
            }
        }
        self.applied.store(generation, Ordering::Release);
    }
}

/// The stage statistics of one disk, queue by queue.
#[derive(Debug)]
pub struct StageStats {
    queues: Box<[QueueStages]>,
    /// Boundaries the monitor asked for, and their generation (also in `generation`).
    asked: Mutex<(u64, Vec<u64>)>,
    generation: AtomicU64,
}

impl StageStats {
    /// Statistics for `queues` queues, with [`default_boundaries`].
    pub fn new(queues: usize) -> Self {
        let defaults = default_boundaries();
        let queues: Box<[QueueStages]> = (0..queues).map(|_| QueueStages::new()).collect();
        for q in queues.iter() {
            q.apply(0, &defaults);
        }
        StageStats {
            queues,
            asked: Mutex::new((0, defaults)),
            generation: AtomicU64::new(0),
        }
    }

    /// Sets the boundaries of every stage histogram of every queue (QEMU's rules; `None`: the
    /// defaults again). Each queue's bins empty when its context next records a request, or
    /// read as empty until then.
    pub fn set_boundaries(&self, boundaries: Option<&[u64]>) -> Result<(), HistogramError> {
        let boundaries = boundaries.map_or_else(default_boundaries, <[u64]>::to_vec);
        check_boundaries(&boundaries)?;
        // Nothing panics while it is held.
        let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
        asked.0 += 1;
        asked.1 = boundaries;
        self.generation.store(asked.0, Ordering::Release);
        Ok(())
    }

    /// Records a request completed on `queue`. Called only with the device's state mutex held.
    pub fn record(&self, queue: usize, times: &Times) {
        let Some(q) = self.queues.get(queue) else {
            return;
        };
        let generation = self.generation.load(Ordering::Acquire);
        if generation != q.applied.load(Ordering::Relaxed) {
            let asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
            q.apply(asked.0, &asked.1);
        }
        let (ns, depth) = times.split();
        let count = q.count.load(Ordering::Relaxed);
        let boundaries = &q.boundaries[..count];
        bump(&q.requests, 1);
        for (cell, &ns) in q.cells.iter().zip(&ns) {
            bump(&cell.sum_ns, ns);
            if ns > cell.max_ns.load(Ordering::Relaxed) {
                cell.max_ns.store(ns, Ordering::Relaxed);
            }
            bump(&cell.bins[bin_of(boundaries, ns)], 1);
        }
        bump(&q.depth_count[depth], 1);
        bump(&q.depth_backend_ns[depth], ns[2]);
    }

    /// Counts a reap that completed `requests` requests of `queue` (none: nothing counted).
    /// Called only with the device's state mutex held, as [`StageStats::record`].
    pub fn reaped(&self, queue: usize, requests: u64) {
        if let Some(q) = self.queues.get(queue).filter(|_| requests > 0) {
            bump(&q.reaps, 1);
            bump(&q.reaped, requests);
        }
    }

    /// Counts an interrupt injected for `queue`; with the device's state mutex held.
    pub fn interrupted(&self, queue: usize) {
        if let Some(q) = self.queues.get(queue) {
            bump(&q.interrupts, 1);
        }
    }

    /// Every queue's figures now.
    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        let pending = {
            let asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
            asked.clone()
        };
        self.queues
            .iter()
            .map(|q| {
                // A change not applied yet reads as its boundaries with empty bins.
                let fresh = q.applied.load(Ordering::Acquire) != pending.0;
                let boundaries: Vec<u64> = if fresh {
                    pending.1.clone()
                } else {
                    q.boundaries[..q.count.load(Ordering::Relaxed)]
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect()
                };
                let requests = q.requests.load(Ordering::Relaxed);
                let stages = STAGES
                    .iter()
                    .zip(&q.cells)
                    .map(|(&stage, cell)| StageSnapshot {
                        stage,
                        count: requests,
                        sum_ns: cell.sum_ns.load(Ordering::Relaxed),
                        max_ns: cell.max_ns.load(Ordering::Relaxed),
                        histogram: HistogramSnapshot {
                            boundaries: boundaries.clone(),
                            bins: cell.bins[..=boundaries.len()]
                                .iter()
                                .map(|b| if fresh { 0 } else { b.load(Ordering::Relaxed) })
                                .collect(),
                        },
                    })
                    .collect();
                let depths = (0..DEPTHS)
                    .map(|d| DepthSnapshot {
                        depth: d,
                        count: q.depth_count[d].load(Ordering::Relaxed),
                        backend_ns: q.depth_backend_ns[d].load(Ordering::Relaxed),
                    })
                    .filter(|d| d.count > 0)
                    .collect();
                QueueSnapshot {
                    stages,
                    depths,
                    reaps: q.reaps.load(Ordering::Relaxed),
                    reaped: q.reaped.load(Ordering::Relaxed),
                    interrupts: q.interrupts.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// One stage of one queue at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSnapshot {
    /// Which stage.
    pub stage: Stage,
    /// Requests timed.
    pub count: u64,
    /// Their nanoseconds in this stage.
    pub sum_ns: u64,
    /// The longest.
    pub max_ns: u64,
    /// Their histogram (bins since the boundaries were last set).
    pub histogram: HistogramSnapshot,
}

/// Requests served by one layer of the backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepthSnapshot {
    /// 0 for the top image, 1 for its backing file, ...; the last counts every deeper one.
    pub depth: usize,
    /// Requests.
    pub count: u64,
    /// Their backend nanoseconds.
    pub backend_ns: u64,
}

/// One queue at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// In [`STAGES`] order.
    pub stages: Vec<StageSnapshot>,
    /// Layers that served requests, shallowest first.
    pub depths: Vec<DepthSnapshot>,
    /// Reaps that completed requests of the queue.
    pub reaps: u64,
    /// The requests those reaps completed.
    pub reaped: u64,
    /// Interrupts the device injected for the queue.
    pub interrupts: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    /// Times `offsets` nanoseconds after one instant: woke, taken, submitted, worker start,
    /// done, completed; with `data` ns of data I/O at `depth`.
    fn times(offsets: [u64; 6], data: u64, depth: u8, worker: bool) -> Times {
        let base = Instant::now();
        let at = |i: usize| base + Duration::from_nanos(offsets[i]);
        Times {
            woke: at(0),
            taken: at(1),
            submitted: at(2),
            trace: IoTrace {
                started: worker.then(|| at(3)),
                done: at(4),
                data_ns: data,
                depth,
            },
            completed: at(5),
        }
    }

    #[test]
    fn stages_split_the_request_and_sum_to_the_total() {
        let t = times([0, 100, 400, 1400, 11_400, 12_000], 7000, 1, true);
        let (ns, depth) = t.split();
        // queue-wait, submission, backend, dispatch, metadata, data, completion, total.
        assert_eq!(ns, [100, 300, 11_000, 1000, 3000, 7000, 600, 12_000]);
        assert_eq!(depth, 1);
        // On the ring there is no worker: the backend is data I/O.
        let (ns, _) = times([0, 0, 10, 0, 510, 600], 0, 0, false).split();
        assert_eq!(&ns[2..6], &[500, 0, 0, 500]);
        // A data time the clock could not fit (never negative metadata).
        let (ns, depth) = times([0, 0, 0, 0, 100, 100], 5000, 200, true).split();
        assert_eq!(&ns[3..6], &[0, 0, 100]);
        assert_eq!(depth, DEPTHS - 1);
    }

    #[test]
    fn default_boundaries_are_valid_and_cover_100ns_to_1s() {
        let b = default_boundaries();
        assert_eq!(check_boundaries(&b), Ok(()));
        assert_eq!((b.len(), b[0], b[42]), (43, 100, 1_000_000_000));
        assert_eq!(&b[..7], &[100, 150, 200, 300, 500, 700, 1000]);
    }

    #[test]
    fn histogram_bins_hold_boundary_values_in_the_upper_bin() {
        let s = StageStats::new(2);
        s.set_boundaries(Some(&[100, 1000])).unwrap();
        // Totals 99, 100, 999, 1000, 5000: bins [0, 100) [100, 1000) [1000, ...).
        for total in [99, 100, 999, 1000, 5000] {
            s.record(1, &times([0, 0, 0, 0, 0, total], 0, 0, true));
        }
        let snap = s.snapshot();
        let total = &snap[1].stages[7];
        assert_eq!(total.stage, Stage::Total);
        assert_eq!(total.histogram.boundaries, vec![100, 1000]);
        assert_eq!(total.histogram.bins, vec![1, 2, 2]);
        assert_eq!((total.count, total.sum_ns, total.max_ns), (5, 7198, 5000));
        // Completion equals the total here; queue wait is always 0 (the first bin).
        assert_eq!(snap[1].stages[6].histogram.bins, vec![1, 2, 2]);
        assert_eq!(snap[1].stages[0].histogram.bins, vec![5, 0, 0]);
        assert_eq!(
            snap[1].depths,
            vec![DepthSnapshot {
                depth: 0,
                count: 5,
                backend_ns: 0
            }]
        );
        // The other queue saw nothing.
        assert!(snap[0].stages.iter().all(|c| c.count == 0));
        assert!(snap[0].depths.is_empty());
    }

    #[test]
    fn a_boundary_change_empties_the_bins_and_keeps_the_means() {
        let s = StageStats::new(1);
        s.record(0, &times([0, 0, 0, 0, 0, 250], 0, 0, true));
        let before = s.snapshot();
        assert_eq!(
            before[0].stages[7].histogram.boundaries,
            default_boundaries()
        );
        // 250 ns is in [200, 300): the fourth bin.
        assert_eq!(before[0].stages[7].histogram.bins[3], 1);
        assert_eq!(
            s.set_boundaries(Some(&[5, 5])),
            Err(HistogramError::NotIncreasing)
        );
        s.set_boundaries(Some(&[10])).unwrap();
        // Not applied yet: the new boundaries, no counts.
        let pending = s.snapshot();
        assert_eq!(pending[0].stages[7].histogram.boundaries, vec![10]);
        assert_eq!(pending[0].stages[7].histogram.bins, vec![0, 0]);
        assert_eq!(pending[0].stages[7].count, 1);
        s.record(0, &times([0, 0, 0, 0, 0, 5], 0, 0, true));
        let after = s.snapshot();
        assert_eq!(after[0].stages[7].histogram.bins, vec![1, 0]);
        assert_eq!(
            (after[0].stages[7].count, after[0].stages[7].sum_ns),
            (2, 255)
        );
        s.set_boundaries(None).unwrap();
        assert_eq!(s.snapshot()[0].stages[0].histogram.boundaries.len(), 43);
    }

    /// A qcow2 image at `dir/top.qcow2` over a raw backing file whose first 64 KiB hold 0x5a.
    fn chain(dir: &tempfile::TempDir) -> std::sync::Arc<block::Image> {
        use block::qcow2::create::CreateOptions;
        let base = dir.path().join("base.raw");
        let top = dir.path().join("top.qcow2");
        let size = 1 << 20;
        block::create(
            &base,
            block::Format::Raw,
            &CreateOptions {
                size,
                ..Default::default()
            },
        )
        .unwrap();
        std::fs::write(&base, vec![0x5a; 65536]).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .unwrap()
            .set_len(size)
            .unwrap();
        let o = CreateOptions {
            size,
            backing: Some((base.display().to_string(), "raw".to_owned())),
            ..Default::default()
        };
        block::create(&top, block::Format::Qcow2, &o).unwrap();
        let opts = block::OpenOptions {
            format: Some(block::Format::Qcow2),
            read_only: false,
            ..Default::default()
        };
        std::sync::Arc::new(block::open(&top, opts).unwrap())
    }

    #[test]
    fn a_device_times_every_stage_of_its_requests_in_order() {
        use super::super::request_type as t;
        use super::super::status as st;
        use super::super::test_util::*;
        use crate::context::Context;
        use vm_memory::Bytes;

        for engine in [block::aio::Engine::Threads, block::aio::Engine::IoUring] {
            let dir = tempfile::tempdir().unwrap();
            let rig = Rig::with_engine(
                Context::new("main-loop").unwrap(),
                chain(&dir),
                1,
                false,
                engine,
            );
            rig.start(!0);
            // A read of unallocated clusters goes to the backing file (layer 1); a write
            // allocates a cluster in the top, copying the rest of it up from the backing file
            // (layer 1); a read of it stays in the top (layer 0).
            let requests: [(u32, u16, u8); 3] =
                [(t::IN, F_WRITE, 1), (t::OUT, 0, 1), (t::IN, F_WRITE, 0)];
            for (i, (ty, flags, depth)) in (0u16..).zip(requests) {
                rig.header(HDR, ty, 0);
                rig.submit(
                    0,
                    0,
                    &[(HDR, 16, 0), (BUF, 4096, flags), (STATUS, 1, F_WRITE)],
                );
                rig.run_until_used(0, i + 1);
                assert_eq!(rig.byte(STATUS), st::OK);
                let q = &rig.dev.stages().snapshot()[0];
                let by = |stage: Stage| q.stages.iter().find(|c| c.stage == stage).unwrap();
                for cell in &q.stages {
                    assert_eq!(
                        cell.count,
                        u64::from(i) + 1,
                        "{}: {:?}",
                        engine.name(),
                        cell.stage
                    );
                    assert_eq!(cell.histogram.bins.iter().sum::<u64>(), cell.count);
                }
                let sum = |stages: &[Stage]| stages.iter().map(|&s| by(s).sum_ns).sum::<u64>();
                assert_eq!(
                    by(Stage::Total).sum_ns,
                    sum(&[
                        Stage::QueueWait,
                        Stage::Submission,
                        Stage::Backend,
                        Stage::Completion
                    ])
                );
                assert_eq!(
                    by(Stage::Backend).sum_ns,
                    sum(&[Stage::Dispatch, Stage::Metadata, Stage::Data])
                );
                // Real work takes time: the backend and the total are never 0.
                assert!(by(Stage::Backend).max_ns > 0 && by(Stage::Total).max_ns > 0);
                let layer = q
                    .depths
                    .iter()
                    .find(|d| d.depth == usize::from(depth))
                    .unwrap_or_else(|| panic!("{}: {i} {q:?}", engine.name()));
                assert!(
                    layer.count >= 1,
                    "{}: request {i} at layer {depth}",
                    engine.name()
                );
            }
            let q = &rig.dev.stages().snapshot()[0];
            assert_eq!(
                q.depths
                    .iter()
                    .map(|d| (d.depth, d.count))
                    .collect::<Vec<_>>(),
                vec![(0, 1), (1, 2)]
            );
            // Each request had a reap of its own; event idx (the driver's used event left at 0)
            // wanted the first interrupt only.
            assert_eq!((q.reaps, q.reaped, q.interrupts), (3, 3, 1));
            // The backing read went through a worker (no direct mapping of a backing cluster),
            // which moved data.
            assert!(q.stages[5].sum_ns > 0);
            // The data made the round trip: backing file, guest, top image, guest.
            let mut back = [0u8; 4096];
            rig.mem
                .read_slice(&mut back, vm_memory::GuestAddress(BUF))
                .unwrap();
            assert!(back.iter().all(|&b| b == 0x5a));
            rig.dev.shutdown().unwrap();
        }
    }
}
