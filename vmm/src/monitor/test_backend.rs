//! A [`MonitorBackend`] for the monitor's own protocol tests: it keeps a run state, returns the
//! disks and iothreads it was built with, and records every call so tests can check what a
//! command did. It is not a VM and is compiled only for tests.

use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use block::trace::IoTrace;
use devices::context::{PollSetting, PollSettings};
use devices::virtio::block::stages::{StageStats, Times};

use super::backend::{
    BackendError, BlockDevice, BlockDeviceStats, BlockJobInfo, BlockStages, CacheMode, CommitArgs,
    HistogramChange, ImageDescription, ImageNodes, IoThreadInfo, JobCommand, JobError,
    LatencyHistogram, MonitorBackend, RunState, SnapshotMode, StreamArgs,
};
use super::disk_stats::block_stages;

/// Records calls into a log shared with the test.
#[derive(Debug)]
pub struct RecordingBackend {
    pub state: RunState,
    pub calls: Arc<Mutex<Vec<String>>>,
    /// When set, `pause` fails with this message.
    pub fail_pause: Option<String>,
    /// How long each `block_stats` call takes (a slow command, for the fairness tests).
    pub stats_delay: std::time::Duration,
    /// A disk asked for a stop not carried out yet (cleared by `resume`).
    pub stop_requested: bool,
    /// What `query-name` says.
    pub guest_name: Option<String>,
    /// The polling settings of its one iothread, io0 (QEMU's defaults at first).
    pub poll: PollSettings,
    /// Where `block_stream` raises its job's first events, as a job does from its own thread.
    pub job_events: Option<super::events::EventSender>,
}

impl RecordingBackend {
    pub fn new(state: RunState) -> Self {
        Self {
            state,
            calls: Arc::new(Mutex::new(Vec::new())),
            fail_pause: None,
            stats_delay: std::time::Duration::ZERO,
            stop_requested: false,
            guest_name: None,
            poll: PollSettings::default(),
            job_events: None,
        }
    }

    fn record(&self, call: String) {
        self.calls.lock().expect("test log lock").push(call);
    }
}

/// Nodes named `format` and `file`, opened `opened`-th.
fn nodes(format: &str, file: &str, opened: u64) -> ImageNodes {
    ImageNodes {
        format: format.into(),
        file: file.into(),
        opened,
    }
}

/// A qcow2 image over a raw base.
fn chain() -> ImageDescription {
    let base = ImageDescription {
        filename: "/img/base.raw".into(),
        format: "raw".into(),
        virtual_size: 1 << 30,
        actual_size: Some(4096),
        file_length: Some(1 << 30),
        cluster_size: None,
        dirty_flag: Some(false),
        backing_name: None,
        backing: None,
    };
    ImageDescription {
        filename: "/img/top.qcow2".into(),
        format: "qcow2".into(),
        virtual_size: 1 << 30,
        actual_size: Some(200_704),
        file_length: Some(196_616),
        cluster_size: Some(65536),
        dirty_flag: Some(false),
        backing_name: Some("/img/base.raw".into()),
        backing: Some(Box::new(base)),
    }
}

impl MonitorBackend for RecordingBackend {
    fn run_state(&self) -> RunState {
        self.state
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        self.record("pause".into());
        if let Some(msg) = &self.fail_pause {
            return Err(BackendError(msg.clone()));
        }
        self.state = RunState::Paused;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        self.record("resume".into());
        self.state = RunState::Running;
        self.stop_requested = false;
        Ok(())
    }

    fn stop_requested(&self) -> bool {
        self.stop_requested
    }

    fn guest_name(&self) -> Option<String> {
        self.guest_name.clone()
    }

    fn powerdown(&mut self) -> Result<(), BackendError> {
        self.record("powerdown".into());
        Ok(())
    }

    fn request_quit(&mut self) {
        self.record("quit".into());
        // As the VM's: once an exit is recorded, the run state is `shutdown`.
        self.state = RunState::Shutdown;
    }

    fn iothreads(&self) -> Vec<IoThreadInfo> {
        vec![IoThreadInfo {
            id: "io0".into(),
            thread_id: 4242,
            poll: self.poll,
        }]
    }

    fn set_iothread_poll(
        &mut self,
        id: &str,
        setting: PollSetting,
        value: u64,
    ) -> Result<(), BackendError> {
        self.record(format!("set-poll {id} {} {value}", setting.name()));
        self.poll.set(setting, value);
        Ok(())
    }

    fn block_devices(&self) -> Vec<BlockDevice> {
        vec![
            BlockDevice {
                drive_id: "d0".into(),
                qdev: "vd0".into(),
                read_only: false,
                cache: CacheMode {
                    writeback: true,
                    direct: true,
                    no_flush: false,
                },
                detect_zeroes: "off",
                node_name: "#block0".into(),
                nodes: vec![
                    nodes("#block0", "#block2", 0),
                    nodes("#block4", "#block3", 1),
                ],
                io_status: "nospace",
                image: chain(),
            },
            BlockDevice {
                drive_id: "d1".into(),
                qdev: "/machine/peripheral-anon/device[1]".into(),
                read_only: true,
                cache: CacheMode {
                    writeback: true,
                    direct: false,
                    no_flush: false,
                },
                detect_zeroes: "unmap",
                node_name: "#block1".into(),
                nodes: vec![nodes("#block1", "#block5", 2)],
                io_status: "ok",
                image: ImageDescription {
                    backing_name: None,
                    backing: None,
                    ..chain()
                },
            },
        ]
    }

    fn block_stats(&self, drive_id: &str) -> Result<BlockDeviceStats, BackendError> {
        self.record(format!("stats {drive_id}"));
        std::thread::sleep(self.stats_delay);
        Ok(BlockDeviceStats {
            rd_operations: 3,
            rd_bytes: 12288,
            account_invalid: true,
            account_failed: true,
            rd_latency_histogram: Some(LatencyHistogram {
                boundaries: vec![1000],
                bins: vec![1, 2],
            }),
            ..BlockDeviceStats::default()
        })
    }

    fn set_latency_histograms(
        &mut self,
        drive_id: &str,
        change: &HistogramChange,
    ) -> Result<(), BackendError> {
        self.record(format!("histogram {drive_id} {change:?}"));
        Ok(())
    }

    /// Real stage statistics of two queues: one request on queue 1 whose stages took 200 ns
    /// (queue wait), 300 (submission), 52 000 (backend: 2000 dispatch, 10 000 metadata, 40 000
    /// data, at layer 1) and 500 (completion), in histograms with boundaries 1000 and 100 000;
    /// queue 1 also had two reaps completing three requests, and one interrupt.
    fn block_stages(&self, drive_id: &str) -> Result<BlockStages, BackendError> {
        self.record(format!("stages {drive_id}"));
        let stats = StageStats::new(2);
        stats
            .set_boundaries(Some(&[1000, 100_000]))
            .map_err(|e| BackendError(e.to_string()))?;
        let base = Instant::now();
        let at = |ns| base + Duration::from_nanos(ns);
        let times = Times {
            woke: at(0),
            taken: at(200),
            submitted: at(500),
            trace: IoTrace {
                started: Some(at(2500)),
                done: at(52_500),
                data_ns: 40_000,
                depth: 1,
            },
            completed: at(53_000),
        };
        stats.record(1, &times);
        stats.reaped(1, 2);
        stats.reaped(1, 1);
        stats.reaped(0, 0);
        stats.interrupted(1);
        Ok(block_stages(&stats.snapshot()))
    }

    fn set_stage_histograms(
        &mut self,
        drive_id: &str,
        boundaries: Option<&[u64]>,
    ) -> Result<(), BackendError> {
        self.record(format!("stage histograms {drive_id} {boundaries:?}"));
        Ok(())
    }

    fn snapshot_sync(
        &mut self,
        drive_id: &str,
        file: &str,
        mode: SnapshotMode,
        node_name: Option<String>,
    ) -> Result<(), BackendError> {
        self.record(format!("snapshot {drive_id} {file} {mode:?} {node_name:?}"));
        Ok(())
    }

    fn block_resize(&mut self, drive_id: &str, size: u64) -> Result<(), BackendError> {
        self.record(format!("resize {drive_id} {size}"));
        Ok(())
    }

    fn block_jobs(&self) -> Vec<BlockJobInfo> {
        self.record("block_jobs".into());
        Vec::new()
    }

    fn block_stream(&mut self, drive_id: &str, args: StreamArgs) -> Result<(), JobError> {
        self.record(format!("stream {drive_id} {args:?}"));
        if let Some(events) = &self.job_events {
            for status in ["created", "running"] {
                let id = args.job_id.clone().unwrap_or_else(|| drive_id.to_owned());
                events.send(super::QmpEvent::JobStatusChange { id, status });
            }
        }
        Ok(())
    }

    fn block_commit(&mut self, drive_id: &str, args: CommitArgs) -> Result<(), JobError> {
        self.record(format!("commit {drive_id} {args:?}"));
        Ok(())
    }

    /// Knows one job, `j0`.
    fn block_job(&mut self, id: &str, command: JobCommand) -> Result<(), JobError> {
        if id != "j0" {
            return Err(JobError::NotFound(id.to_owned()));
        }
        self.record(format!("job {id} {command:?}"));
        Ok(())
    }
}
