//! What the monitor needs from the VM: the [`MonitorBackend`] trait and the plain data it returns,
//! shaped after QEMU's QAPI types (`qapi/run-state.json`, `qapi/misc.json`, `qapi/block-core.json`)
//! so that the monitor serializes them under QEMU's member names.
//!
//! Locking: every method is called on the main-loop thread from the monitor's event handler, so with
//! the global lock held (the main loop holds it around every handler); an implementation must not
//! take the global lock again. Block statistics and histogram boundaries are the device's
//! atomics, read and replaced from any thread, so those commands never hold up a disk on an
//! iothread; only a snapshot acquires a disk's context, after the global lock as docs/DESIGN.md orders
//! and never two at once, and drains it with the context released. Nothing here may
//! block for long: pausing waits only for vCPUs to leave `KVM_RUN`, on a condition variable tied
//! to the global mutex as docs/DESIGN.md describes.

use devices::context::{PollSetting, PollSettings};
use serde::Serialize;

pub use crate::disks::{CommitArgs, JobEnd, JobError, Layer, StreamArgs};

/// A failure inside the VM while carrying out a command; becomes a `GenericError` whose
/// description is the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// The VM's run state, with QEMU's `RunState` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Started with `-S`: vCPUs created but never run until `cont`.
    Prelaunch,
    /// vCPUs running.
    Running,
    /// Paused by `stop`.
    Paused,
    /// Paused because a disk's error policy (`werror=`/`rerror=`) stopped the VM.
    IoError,
    /// The guest shut down (or the VMM is exiting); `cont` cannot revive it.
    Shutdown,
}

/// One `-object iothread` (QEMU's `IOThreadInfo`): serialized as its `id`, `thread-id` and
/// each polling setting under its property name (`poll-max-ns`, `poll-grow`, `poll-shrink`,
/// `aio-max-batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoThreadInfo {
    /// The `id=` of the `-object iothread`.
    pub id: String,
    /// The host thread id (gettid) of its thread.
    pub thread_id: i64,
    /// Its polling settings, as they are now.
    pub poll: PollSettings,
}

impl Serialize for IoThreadInfo {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2 + PollSetting::ALL.len()))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("thread-id", &self.thread_id)?;
        for setting in PollSetting::ALL {
            map.serialize_entry(setting.name(), &self.poll.get(setting))?;
        }
        map.end()
    }
}

/// Host cache behaviour of a disk, as `-drive cache=` sets it (QEMU's `BlockdevCacheInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheMode {
    /// Guest writes complete before reaching stable storage (a volatile write cache).
    pub writeback: bool,
    /// The image is opened with O_DIRECT.
    pub direct: bool,
    /// Flushes are ignored (`cache=unsafe`).
    pub no_flush: bool,
}

/// One image of a disk's chain, the top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDescription {
    /// The image's file name as given (or as its overlay names it).
    pub filename: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Host bytes allocated to the file, when known.
    pub actual_size: Option<u64>,
    /// The host file's length (the virtual size of its protocol node), when known.
    pub file_length: Option<u64>,
    /// qcow2 cluster size in bytes.
    pub cluster_size: Option<u64>,
    /// qcow2 dirty bit (lazy refcounts in use and not yet cleaned); QEMU reports `false` for raw.
    pub dirty_flag: Option<bool>,
    /// The backing file's name as the image's header holds it (QEMU's `backing-filename`);
    /// `backing`'s filename is where the disk opened it (QEMU's `backing_file`).
    pub backing_name: Option<String>,
    /// The backing image, if any.
    pub backing: Option<Box<ImageDescription>>,
}

/// The nodes QEMU opens for one image: its format node (`raw`, `qcow2`) over its protocol node
/// (`file`), named for the VM's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNodes {
    /// The format node's name.
    pub format: String,
    /// The protocol node's name (always automatic).
    pub file: String,
    /// When the image was opened, counting the VM's images from 0: `query-named-block-nodes`
    /// lists the newest first, as QEMU does.
    pub opened: u64,
}

/// One disk as `query-block` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The `-drive id=` (QEMU's `device` member).
    pub drive_id: String,
    /// The guest device: its `-device id=`, or the QOM path QEMU would show for an anonymous
    /// device (QEMU's `qdev` member). `block-latency-histogram-set` accepts either id.
    pub qdev: String,
    /// Opened read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// `-drive detect-zeroes=` as QEMU names it: `off`, `on` or `unmap`.
    pub detect_zeroes: &'static str,
    /// The top image's (format) node name: `-drive node-name=`, `blockdev-snapshot-sync`'s
    /// `snapshot-node-name`, or QEMU's automatic `#blockN` form.
    pub node_name: String,
    /// The node names of every image of the chain, top first (the top's format node is
    /// `node_name`).
    pub nodes: Vec<ImageNodes>,
    /// `ok`, or `failed`/`nospace` after an error stopped the VM, until `cont`.
    pub io_status: &'static str,
    /// The image chain.
    pub image: ImageDescription,
}

impl BlockDevice {
    /// The chain is now `image`, the old one less a run of layers starting at depth `from` (a
    /// job's end): the nodes of the layers that stayed keep their names.
    pub fn drop_layers(&mut self, from: usize, image: ImageDescription) {
        let depth = std::iter::successors(Some(&image), |i| i.backing.as_deref()).count();
        let below = depth.saturating_sub(from);
        let kept_below = self.nodes.len().saturating_sub(below);
        let mut nodes: Vec<ImageNodes> = self.nodes.iter().take(from).cloned().collect();
        nodes.extend(self.nodes.iter().skip(kept_below.max(from)).cloned());
        self.nodes = nodes;
        self.image = image;
    }
}

/// One latency histogram (QEMU's `BlockLatencyHistogramInfo`): `bins` has one more element than
/// `boundaries`; bin `i` counts latencies in `[boundaries[i-1], boundaries[i])` nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LatencyHistogram {
    /// Bucket boundaries in nanoseconds, strictly increasing.
    pub boundaries: Vec<u64>,
    /// Request counts per bucket.
    pub bins: Vec<u64>,
}

/// Per-interval figures of `-drive stats-intervals=` (QEMU's `BlockDeviceTimedStats`); latencies in
/// nanoseconds, queue depths averaged over the interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimedStats {
    /// Interval length in seconds.
    pub interval_length: u64,
    pub min_rd_latency_ns: u64,
    pub max_rd_latency_ns: u64,
    pub avg_rd_latency_ns: u64,
    pub min_wr_latency_ns: u64,
    pub max_wr_latency_ns: u64,
    pub avg_wr_latency_ns: u64,
    pub min_zone_append_latency_ns: u64,
    pub max_zone_append_latency_ns: u64,
    pub avg_zone_append_latency_ns: u64,
    pub min_flush_latency_ns: u64,
    pub max_flush_latency_ns: u64,
    pub avg_flush_latency_ns: u64,
    pub avg_rd_queue_depth: f64,
    pub avg_wr_queue_depth: f64,
    pub avg_zone_append_queue_depth: f64,
}

/// A disk's I/O statistics under QEMU's `BlockDeviceStats` names, filled by the VM from the
/// device's counters. Write-zeroes count as writes and discards as unmap, as in QEMU; this
/// virtio-blk has no zoned mode, so the zone-append counters stay zero; requests are never merged.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub zone_append_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub zone_append_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub zone_append_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    /// The end of the highest write, in bytes.
    pub wr_highest_offset: u64,
    pub rd_merged: u64,
    pub wr_merged: u64,
    pub zone_append_merged: u64,
    pub unmap_merged: u64,
    /// Time since the last request completed; absent before the first one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_time_ns: Option<u64>,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_zone_append_operations: u64,
    pub failed_flush_operations: u64,
    pub failed_unmap_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub invalid_zone_append_operations: u64,
    pub invalid_flush_operations: u64,
    pub invalid_unmap_operations: u64,
    /// Whether invalid requests enter the latency figures (QEMU's `account-invalid`).
    pub account_invalid: bool,
    /// Whether failed requests enter the latency figures (QEMU's `account-failed`).
    pub account_failed: bool,
    /// One entry per `stats-intervals` interval.
    pub timed_stats: Vec<TimedStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rd_latency_histogram: Option<LatencyHistogram>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wr_latency_histogram: Option<LatencyHistogram>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone_append_latency_histogram: Option<LatencyHistogram>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_latency_histogram: Option<LatencyHistogram>,
}

/// One stage of one queue in `x-query-blockstats-stages` (see `devices::virtio::block::stages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StageInfo {
    /// `queue-wait`, `submission`, `backend`, `backend-dispatch`, `backend-metadata`,
    /// `backend-data`, `completion` or `total`.
    pub stage: &'static str,
    /// Requests timed.
    pub count: u64,
    /// Their nanoseconds in this stage.
    pub total_ns: u64,
    /// The mean (0 before the first request).
    pub mean_ns: u64,
    /// The longest.
    pub max_ns: u64,
    /// Since the boundaries were last set.
    pub histogram: LatencyHistogram,
}

/// Requests served by one layer of a disk's backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainLayerInfo {
    /// 0 for the top image, 1 for its backing file, ...
    pub depth: usize,
    /// Requests that reached this layer and no deeper one.
    pub count: u64,
    /// Their mean backend time.
    pub backend_mean_ns: u64,
}

/// One queue of a disk in `x-query-blockstats-stages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueueStagesInfo {
    /// The queue's index.
    pub queue: usize,
    /// Every stage, in the order a request passes them.
    pub stages: Vec<StageInfo>,
    /// Layers that served requests, the top first.
    pub chain_depth: Vec<ChainLayerInfo>,
    /// Reaps of the disk's engine that completed requests of the queue.
    pub reaps: u64,
    /// The requests those reaps completed (timed or not).
    pub reaped: u64,
    /// Interrupts the device injected for the queue.
    pub interrupts: u64,
}

/// A disk's per-stage timing, per queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockStages {
    /// One entry per queue.
    pub queues: Vec<QueueStagesInfo>,
}

/// New histogram boundaries per request kind: `Some` replaces that kind's histogram with an empty
/// one at these boundaries (already checked: non-empty values strictly increasing from above 0),
/// `None` leaves it as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramBoundaries {
    /// Reads.
    pub read: Option<Vec<u64>>,
    /// Writes (and write-zeroes).
    pub write: Option<Vec<u64>>,
    /// Flushes.
    pub flush: Option<Vec<u64>>,
}

/// A `block-latency-histogram-set` request for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistogramChange {
    /// Remove every latency histogram of the disk (the command with only `id`).
    ClearAll,
    /// Replace some histograms.
    Set(HistogramBoundaries),
}

/// How `blockdev-snapshot-sync` finds its overlay (QEMU's `NewImageMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Create it (overwriting a file there), its backing file named by the disk's top's name
    /// (`absolute-paths`, the default).
    AbsolutePaths,
    /// The user made it; its backing file is the disk's top (`existing`).
    Existing,
}

/// One block job as `query-block-jobs` describes it (QEMU's `BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job's type (`stream`).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The job's id (QEMU's `device` member).
    pub device: String,
    /// Its total work in bytes.
    pub len: u64,
    /// Its progress in bytes.
    pub offset: u64,
    /// Doing a step right now.
    pub busy: bool,
    /// Paused by the user.
    pub paused: bool,
    /// Its speed limit in bytes per second (0: none).
    pub speed: u64,
    /// `ok`: a job's failing step ends it.
    pub io_status: &'static str,
    /// Ready to complete.
    pub ready: bool,
    /// QEMU's name of its status.
    pub status: &'static str,
    /// Finalizes itself.
    pub auto_finalize: bool,
    /// Dismisses itself.
    pub auto_dismiss: bool,
    /// Why it ended, once concluded after a failure or a cancel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A command on a job (`block-job-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobCommand {
    /// `block-job-cancel`, with `force`.
    Cancel {
        /// Cancel a paused job too.
        force: bool,
    },
    /// `block-job-pause`.
    Pause,
    /// `block-job-resume`.
    Resume,
    /// `block-job-set-speed`, as given (a negative speed is refused once the job is found).
    SetSpeed(i64),
    /// `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
}

/// The VM as the monitor drives it. See the module documentation for the locking rules; each
/// method says when the monitor calls it.
pub trait MonitorBackend {
    /// The current run state (`query-status`, and the checks of `stop` and `cont`).
    fn run_state(&self) -> RunState;

    /// Pauses every vCPU and returns once none is in `KVM_RUN`; the run state becomes `Paused`.
    /// Called only in the `Running` state. The monitor sends `STOP` afterwards.
    fn pause(&mut self) -> Result<(), BackendError>;

    /// Lets the vCPUs run (from `Paused`, `IoError`, or `Prelaunch` under `-S`); the state becomes
    /// `Running`. Resets every disk's I/O status and retries the requests an error policy kept,
    /// and cancels a stop that a disk asked for and that was not carried out yet. Called in those
    /// three states, and in `Running` when [`Self::stop_requested`]. The monitor sends `RESUME`
    /// afterwards.
    fn resume(&mut self) -> Result<(), BackendError>;

    /// A disk's error policy asked for the VM to stop and the main loop has not stopped it yet.
    fn stop_requested(&self) -> bool;

    /// `-name`'s guest name (`query-name`).
    fn guest_name(&self) -> Option<String>;

    /// Presses the ACPI power button (the Generic Event Device notifies the `PNP0C0C` button); the
    /// guest decides what to do. The monitor sends `POWERDOWN` afterwards.
    fn powerdown(&mut self) -> Result<(), BackendError>;

    /// Asks the VMM to exit (`quit`): only requests it, without waiting, so that the `SHUTDOWN`
    /// event and the reply leave first; the main loop ends after this handler returns.
    fn request_quit(&mut self);

    /// Every iothread, in creation order, with its polling settings as they are now.
    fn iothreads(&self) -> Vec<IoThreadInfo>;

    /// Changes one polling setting of the iothread `id` (one of [`Self::iothreads`]; the value
    /// already checked to be at most 2^63-1); the iothread applies it from its next iteration.
    /// Takes no lock: the settings are atomics the iothread reads.
    fn set_iothread_poll(
        &mut self,
        id: &str,
        setting: PollSetting,
        value: u64,
    ) -> Result<(), BackendError>;

    /// Every disk, in creation order.
    fn block_devices(&self) -> Vec<BlockDevice>;

    /// The statistics of the disk with this `-drive id=` (one of [`Self::block_devices`]).
    fn block_stats(&self, drive_id: &str) -> Result<BlockDeviceStats, BackendError>;

    /// Changes the latency histograms of the disk with this `-drive id=`.
    fn set_latency_histograms(
        &mut self,
        drive_id: &str,
        change: &HistogramChange,
    ) -> Result<(), BackendError>;

    /// Where the requests of the disk with this `-drive id=` spend their time, per queue and
    /// stage (`x-query-blockstats-stages`; like the statistics, read without its context).
    fn block_stages(&self, drive_id: &str) -> Result<BlockStages, BackendError>;

    /// Sets the boundaries of every stage histogram of the disk with this `-drive id=`
    /// (already checked: strictly increasing from above 0), or its default ones for `None`.
    fn set_stage_histograms(
        &mut self,
        drive_id: &str,
        boundaries: Option<&[u64]>,
    ) -> Result<(), BackendError>;

    /// Puts a new qcow2 overlay, `file`, on top of the chain of the disk with this `-drive id=`
    /// and switches the running disk to it (`blockdev-snapshot-sync`); its node is named
    /// `node_name`, or gets an automatic name. On failure the disk is as it was. Acquires the disk's context after the
    /// global lock and waits, with that context released, for its requests in flight.
    fn snapshot_sync(
        &mut self,
        drive_id: &str,
        file: &str,
        mode: SnapshotMode,
        node_name: Option<String>,
    ) -> Result<(), BackendError>;

    /// Grows the disk with this `-drive id=` to `size` bytes while it runs (`block_resize`,
    /// the size already checked to be at most QEMU's limit): the image grows, the device's
    /// capacity follows and the guest is told by a configuration-change interrupt. Refuses a
    /// read-only disk, a smaller size and, for qcow2, a size not a multiple of 512, with QEMU's
    /// words. Acquires the disk's context after the global lock and waits, with that context
    /// released, for its requests in flight.
    fn block_resize(&mut self, drive_id: &str, size: u64) -> Result<(), BackendError>;
    /// Every block job, in creation order (`query-block-jobs`).
    fn block_jobs(&self) -> Vec<BlockJobInfo>;

    /// Starts `block-stream` on the disk with this `-drive id=`; the job runs in the disk's
    /// context, its end on the main loop.
    fn block_stream(&mut self, drive_id: &str, args: StreamArgs) -> Result<(), JobError>;

    /// Starts `block-commit` of an intermediate image of the disk with this `-drive id=`.
    fn block_commit(&mut self, drive_id: &str, args: CommitArgs) -> Result<(), JobError>;

    /// Applies a `block-job-*` command to the job with this id.
    fn block_job(&mut self, id: &str, command: JobCommand) -> Result<(), JobError>;
}
