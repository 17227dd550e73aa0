//! A virtio-blk disk's statistics (`devices::virtio::block::stats`) as `query-blockstats` reports
//! them, and `block-latency-histogram-set` applied to them: what a VM backend calls for each disk.
//!
//! The devices count with relaxed atomics and need no lock or context to read, so these functions
//! may run on the main loop for a disk on an iothread without acquiring its context. Failed and
//! invalid requests stay out of the latency figures and the idle time, counted only in their own
//! counters: QEMU's `account_failed` and `account_invalid` off. The devices never merge requests
//! and no disk here has a zoned mode, so the merged and zone-append members read 0. QEMU has no
//! unmap histogram, so none is reported or set.

use devices::virtio::block::stages::{QueueSnapshot, StageStats};
use devices::virtio::block::stats::{
    BlockStats, HistogramSnapshot, Kind, KindSnapshot, StatsSnapshot, TimedSnapshot,
    MAX_HISTOGRAM_BOUNDARIES,
};

use super::backend::{
    BackendError, BlockDeviceStats, BlockStages, ChainLayerInfo, HistogramChange, LatencyHistogram,
    QueueStagesInfo, StageInfo, TimedStats,
};

fn histogram(h: &Option<HistogramSnapshot>) -> Option<LatencyHistogram> {
    h.as_ref().map(|h| LatencyHistogram {
        boundaries: h.boundaries.clone(),
        bins: h.bins.clone(),
    })
}

fn timed(t: &TimedSnapshot) -> TimedStats {
    TimedStats {
        interval_length: t.interval_length,
        min_rd_latency_ns: t.rd.min_ns,
        max_rd_latency_ns: t.rd.max_ns,
        avg_rd_latency_ns: t.rd.avg_ns,
        min_wr_latency_ns: t.wr.min_ns,
        max_wr_latency_ns: t.wr.max_ns,
        avg_wr_latency_ns: t.wr.avg_ns,
        min_flush_latency_ns: t.flush.min_ns,
        max_flush_latency_ns: t.flush.max_ns,
        avg_flush_latency_ns: t.flush.avg_ns,
        avg_rd_queue_depth: t.avg_rd_queue_depth,
        avg_wr_queue_depth: t.avg_wr_queue_depth,
        ..TimedStats::default()
    }
}

/// A disk's counters under QEMU's names.
pub fn block_device_stats(s: &StatsSnapshot) -> BlockDeviceStats {
    let (rd, wr, flush, unmap): (&KindSnapshot, _, _, _) = (&s.rd, &s.wr, &s.flush, &s.unmap);
    BlockDeviceStats {
        rd_bytes: rd.bytes,
        wr_bytes: wr.bytes,
        unmap_bytes: unmap.bytes,
        rd_operations: rd.operations,
        wr_operations: wr.operations,
        flush_operations: flush.operations,
        unmap_operations: unmap.operations,
        rd_total_time_ns: rd.total_time_ns,
        wr_total_time_ns: wr.total_time_ns,
        flush_total_time_ns: flush.total_time_ns,
        unmap_total_time_ns: unmap.total_time_ns,
        wr_highest_offset: s.wr_highest_offset,
        idle_time_ns: s.idle_time_ns,
        failed_rd_operations: rd.failed_operations,
        failed_wr_operations: wr.failed_operations,
        failed_flush_operations: flush.failed_operations,
        failed_unmap_operations: unmap.failed_operations,
        invalid_rd_operations: rd.invalid_operations,
        invalid_wr_operations: wr.invalid_operations,
        invalid_flush_operations: flush.invalid_operations,
        invalid_unmap_operations: unmap.invalid_operations,
        account_invalid: false,
        account_failed: false,
        timed_stats: s.timed_stats.iter().map(timed).collect(),
        rd_latency_histogram: histogram(&rd.latency_histogram),
        wr_latency_histogram: histogram(&wr.latency_histogram),
        flush_latency_histogram: histogram(&flush.latency_histogram),
        ..BlockDeviceStats::default()
    }
}

/// A disk's stage timing (`x-query-blockstats-stages`), means computed from the sums.
pub fn block_stages(queues: &[QueueSnapshot]) -> BlockStages {
    let mean = |sum: u64, count: u64| sum.checked_div(count).unwrap_or(0);
    BlockStages {
        queues: queues
            .iter()
            .enumerate()
            .map(|(queue, q)| QueueStagesInfo {
                queue,
                stages: q
                    .stages
                    .iter()
                    .map(|s| StageInfo {
                        stage: s.stage.name(),
                        count: s.count,
                        total_ns: s.sum_ns,
                        mean_ns: mean(s.sum_ns, s.count),
                        max_ns: s.max_ns,
                        histogram: LatencyHistogram {
                            boundaries: s.histogram.boundaries.clone(),
                            bins: s.histogram.bins.clone(),
                        },
                    })
                    .collect(),
                chain_depth: q
                    .depths
                    .iter()
                    .map(|d| ChainLayerInfo {
                        depth: d.depth,
                        count: d.count,
                        backend_mean_ns: mean(d.backend_ns, d.count),
                    })
                    .collect(),
                reaps: q.reaps,
                reaped: q.reaped,
                interrupts: q.interrupts,
            })
            .collect(),
    }
}

/// Sets a disk's stage histogram boundaries (`x-block-stages-histogram-set`).
pub fn apply_stage_histograms(
    stages: &StageStats,
    boundaries: Option<&[u64]>,
) -> Result<(), BackendError> {
    stages
        .set_boundaries(boundaries)
        .map_err(|e| BackendError(e.to_string()))
}

/// Applies a `block-latency-histogram-set` to a disk. Every list is checked against the devices'
/// limit before anything changes, so a refused request leaves the histograms as they were.
pub fn apply_histogram_change(
    stats: &BlockStats,
    change: &HistogramChange,
) -> Result<(), BackendError> {
    let lists = match change {
        HistogramChange::ClearAll => [(Kind::Read, None), (Kind::Write, None), (Kind::Flush, None)],
        HistogramChange::Set(b) => [
            (Kind::Read, b.read.as_deref()),
            (Kind::Write, b.write.as_deref()),
            (Kind::Flush, b.flush.as_deref()),
        ],
    };
    if let Some(too_long) = lists
        .iter()
        .filter_map(|(_, b)| *b)
        .find(|b| b.len() > MAX_HISTOGRAM_BOUNDARIES)
    {
        return Err(BackendError(format!(
            "{} histogram boundaries is more than the {MAX_HISTOGRAM_BOUNDARIES} supported",
            too_long.len()
        )));
    }
    for (kind, boundaries) in lists {
        // ClearAll removes; Set leaves a kind without a list alone.
        if boundaries.is_some() || matches!(change, HistogramChange::ClearAll) {
            stats
                .set_histogram(kind, boundaries)
                .map_err(|e| BackendError(e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::backend::HistogramBoundaries;
    use std::time::{Duration, Instant};

    /// Counts a request of `kind` that took about `ms` milliseconds.
    fn complete(stats: &BlockStats, kind: Kind, bytes: u64, ms: u64, ok: bool) {
        let start = Instant::now()
            .checked_sub(Duration::from_millis(ms))
            .expect("the clock is past the machine's boot");
        stats.done(kind, bytes, start, ok);
    }

    #[test]
    fn counters_map_to_qemu_names() {
        let stats = BlockStats::new(&[60]);
        assert_eq!(block_device_stats(&stats.snapshot()).idle_time_ns, None);
        complete(&stats, Kind::Read, 4096, 2, true);
        complete(&stats, Kind::Read, 512, 1, true);
        complete(&stats, Kind::Write, 8192, 3, true);
        complete(&stats, Kind::Write, 8192, 3, false);
        complete(&stats, Kind::Flush, 0, 1, true);
        complete(&stats, Kind::Unmap, 1 << 20, 1, true);
        stats.wrote_up_to(12288);
        stats.wrote_up_to(4096);
        stats.invalid(Kind::Read);
        let s = block_device_stats(&stats.snapshot());
        assert_eq!(s.wr_highest_offset, 12288);
        assert_eq!((s.rd_operations, s.rd_bytes), (2, 4608));
        assert_eq!(
            (s.wr_operations, s.wr_bytes, s.failed_wr_operations),
            (1, 8192, 1)
        );
        assert_eq!(
            (s.flush_operations, s.unmap_operations, s.unmap_bytes),
            (1, 1, 1 << 20)
        );
        assert_eq!(s.invalid_rd_operations, 1);
        assert!(s.rd_total_time_ns >= 3_000_000, "{}", s.rd_total_time_ns);
        assert!(s.idle_time_ns.is_some());
        assert_eq!(s.timed_stats.len(), 1);
        assert_eq!(s.timed_stats[0].interval_length, 60);
        assert!(s.timed_stats[0].max_wr_latency_ns >= 3_000_000);
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(json["wr_highest_offset"], 12288);
        assert_eq!(json["rd_merged"], 0);
        assert_eq!(json["account_failed"], false);
        assert!(json.get("rd_latency_histogram").is_none());
    }

    #[test]
    fn histograms_follow_qemu_semantics() {
        let stats = BlockStats::default();
        let set = |read: Option<Vec<u64>>, write: Option<Vec<u64>>, flush: Option<Vec<u64>>| {
            HistogramChange::Set(HistogramBoundaries { read, write, flush })
        };
        apply_histogram_change(&stats, &set(Some(vec![1_000_000]), None, Some(vec![10])))
            .expect("set");
        complete(&stats, Kind::Read, 512, 5, true);
        let s = block_device_stats(&stats.snapshot());
        let rd = s.rd_latency_histogram.expect("read histogram set");
        assert_eq!((rd.boundaries, rd.bins), (vec![1_000_000], vec![0, 1]));
        assert!(s.wr_latency_histogram.is_none());
        assert!(s.flush_latency_histogram.is_some());

        // A refused change (too many boundaries) leaves everything as it was.
        let long: Vec<u64> =
            (1..=u64::try_from(MAX_HISTOGRAM_BOUNDARIES + 1).expect("small")).collect();
        let err = apply_histogram_change(&stats, &set(Some(vec![5]), Some(long), None));
        assert!(matches!(err, Err(BackendError(_))));
        let s = block_device_stats(&stats.snapshot());
        assert_eq!(s.rd_latency_histogram.expect("kept").bins, vec![0, 1]);

        apply_histogram_change(&stats, &HistogramChange::ClearAll).expect("clear");
        let s = block_device_stats(&stats.snapshot());
        assert!(s.rd_latency_histogram.is_none() && s.flush_latency_histogram.is_none());
    }
}
