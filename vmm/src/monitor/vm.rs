//! The monitor on this VMM's main loop: [`VmMonitor`] is the main-loop handler for
//! [`Tag::Qmp`], and [`VmBackend`] is the [`MonitorBackend`] it hands the monitor for each event,
//! borrowing the machine behind the global lock that the main loop holds.
//!
//! Run states: the vCPUs' request says running or paused; paused before the first `cont` of a
//! `-S` start is `prelaunch`, as in QEMU; paused by a disk's error policy is `io-error`
//! ([`crate::disks::IoErrorStop`] stops the VM); once an exit reason is recorded the VM is
//! `shutdown`. `stop` waits until every vCPU is paused ([`Held::pause_all`], which releases the
//! global lock while it waits, as QEMU's `pause_all_vcpus` does); `cont` resets every disk's I/O
//! status, retries the requests their error policies kept, and releases the vCPUs.
//!
//! The VM hands the monitor its iothreads and disks (each disk's description and its device, whose
//! statistics need no lock: see `disk_stats.rs`). `system_powerdown` presses the ACPI power
//! button: the Generic Event Device on the MMIO bus (`devices::legacy::Ged`) sets its event bit
//! and raises its interrupt; its `_EVT` method notifies the `PNP0C0C` button (see
//! `arch::x86_64::acpi`).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use devices::context::{IoThreadHandle, PollSetting};
use devices::legacy::Ged;
use devices::virtio::block::Block;
use event_manager::{EventOps, Events};

use super::{
    apply_histogram_change, apply_stage_histograms, block_device_stats, block_stages, BackendError,
    BlockDevice, BlockDeviceStats, BlockJobInfo, BlockStages, EventSender, HistogramChange,
    IoThreadInfo, JobCommand, Monitor, MonitorBackend, RunState, ShutdownCause, SnapshotMode,
};
use crate::arch::x86_64::layout::GED_START;
use crate::disks::{
    start_commit, start_stream, CommitArgs, Disks, IoErrors, JobError, Jobs, LiveImage, NodeNamer,
    StreamArgs,
};
use crate::global::{ExitReason, Held, VcpuRequest};
use crate::main_loop::{Handler, Tag};
use crate::vcpu::Kicker;

/// The `SHUTDOWN` cause of an exit reason, or `None` when the monitor already sent it (`quit`).
/// Ctrl-A x is `host-qmp-quit` because QEMU's console escape calls `quit` itself.
pub fn shutdown_cause(reason: &ExitReason) -> Option<ShutdownCause> {
    match reason {
        ExitReason::GuestPowerOff => Some(ShutdownCause::GuestShutdown),
        ExitReason::GuestReset => Some(ShutdownCause::GuestReset),
        ExitReason::Signal(_) => Some(ShutdownCause::HostSignal),
        ExitReason::ConsoleQuit => Some(ShutdownCause::HostQmpQuit),
        ExitReason::VcpuFailed { .. } | ExitReason::IoThreadFailed { .. } => {
            Some(ShutdownCause::HostError)
        }
        ExitReason::MonitorQuit => None,
    }
}

/// A disk: its `query-block` description, the device that serves it and counts its I/O, and the
/// image the device serves (shared with [`crate::disks::Disks`], changed by a snapshot).
#[derive(Debug, Clone)]
pub struct VmDisk {
    /// What `query-block` says of it (its image refreshed after a snapshot).
    pub info: BlockDevice,
    /// Its virtio-blk device.
    pub device: Arc<Block>,
    /// The image the device serves; only the main thread locks it, with the global lock held.
    pub live: Arc<Mutex<LiveImage>>,
}

/// The VM as one event's commands see it.
#[derive(Debug)]
pub struct VmBackend<'a, 'g> {
    held: &'a mut Held<'g>,
    kickers: &'a [Kicker],
    /// The vCPUs have run (false until the first `cont` under `-S`).
    started: &'a mut bool,
    iothreads: &'a [IoThreadHandle],
    disks: &'a mut [VmDisk],
    io_errors: &'a IoErrors,
    /// Names the nodes of the images a command opens.
    namer: &'a mut NodeNamer,
    /// `-name`'s guest name.
    guest_name: Option<&'a str>,
    jobs: &'a mut Jobs,
}

impl VmBackend<'_, '_> {
    /// The device of the disk with this drive id.
    fn disk(&self, drive_id: &str) -> Result<&Block, BackendError> {
        self.disks
            .iter()
            .find(|d| d.info.drive_id == drive_id)
            .map(|d| d.device.as_ref())
            .ok_or_else(|| BackendError(format!("No disk with drive id '{drive_id}'")))
    }
}

impl MonitorBackend for VmBackend<'_, '_> {
    fn run_state(&self) -> RunState {
        if self.held.exit.is_some() {
            return RunState::Shutdown;
        }
        match self.held.request {
            VcpuRequest::Run => RunState::Running,
            VcpuRequest::Pause if self.held.io_error => RunState::IoError,
            VcpuRequest::Pause if *self.started => RunState::Paused,
            VcpuRequest::Pause => RunState::Prelaunch,
            VcpuRequest::Stop => RunState::Shutdown,
        }
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        self.held.pause_all(self.kickers);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        // As QEMU's `cont`: the I/O statuses reset and the kept requests retried (each in its
        // disk's context, a bottom half), a pending stop cancelled, then the vCPUs run.
        self.io_errors.take_stop_request();
        for disk in self.disks.iter() {
            disk.device.retry_failed();
        }
        self.held.io_error = false;
        *self.started = true;
        self.held.release_all(VcpuRequest::Run);
        Ok(())
    }

    fn stop_requested(&self) -> bool {
        self.io_errors.stop_requested()
    }

    fn guest_name(&self) -> Option<String> {
        self.guest_name.map(str::to_owned)
    }

    fn powerdown(&mut self) -> Result<(), BackendError> {
        let ged = self
            .held
            .mmio
            .device_mut::<Ged>(GED_START)
            .ok_or_else(|| BackendError("this VM has no ACPI power button".to_owned()))?;
        ged.press_power_button()
            .map_err(|e| BackendError(format!("cannot press the power button: {e}")))
    }

    fn request_quit(&mut self) {
        self.held.request_exit(ExitReason::MonitorQuit);
    }

    fn iothreads(&self) -> Vec<IoThreadInfo> {
        self.iothreads
            .iter()
            .map(|t| IoThreadInfo {
                id: t.id().to_owned(),
                thread_id: i64::from(t.thread_id()),
                poll: t.poll_settings(),
            })
            .collect()
    }

    fn set_iothread_poll(
        &mut self,
        id: &str,
        setting: PollSetting,
        value: u64,
    ) -> Result<(), BackendError> {
        let t = self
            .iothreads
            .iter()
            .find(|t| t.id() == id)
            .ok_or_else(|| BackendError(format!("No iothread '{id}'")))?;
        t.set_poll_setting(setting, value);
        Ok(())
    }

    fn block_devices(&self) -> Vec<BlockDevice> {
        self.disks
            .iter()
            .map(|d| BlockDevice {
                io_status: d.device.io_status().name(),
                ..d.info.clone()
            })
            .collect()
    }

    fn block_stats(&self, drive_id: &str) -> Result<BlockDeviceStats, BackendError> {
        Ok(block_device_stats(&self.disk(drive_id)?.stats().snapshot()))
    }

    fn set_latency_histograms(
        &mut self,
        drive_id: &str,
        change: &HistogramChange,
    ) -> Result<(), BackendError> {
        apply_histogram_change(self.disk(drive_id)?.stats(), change)
    }

    fn block_stages(&self, drive_id: &str) -> Result<BlockStages, BackendError> {
        Ok(block_stages(&self.disk(drive_id)?.stages().snapshot()))
    }

    fn set_stage_histograms(
        &mut self,
        drive_id: &str,
        boundaries: Option<&[u64]>,
    ) -> Result<(), BackendError> {
        apply_stage_histograms(self.disk(drive_id)?.stages(), boundaries)
    }

    fn snapshot_sync(
        &mut self,
        drive_id: &str,
        file: &str,
        mode: SnapshotMode,
        node_name: Option<String>,
    ) -> Result<(), BackendError> {
        self.jobs
            .check_idle(drive_id)
            .map_err(|e| BackendError(e.to_string()))?;
        let disk = self
            .disks
            .iter_mut()
            .find(|d| d.info.drive_id == drive_id)
            .ok_or_else(|| BackendError(format!("No disk with drive id '{drive_id}'")))?;
        // Only this thread locks it, and nothing panics while holding it.
        let mut live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
        let read_only = disk.info.read_only;
        crate::disks::snapshot(
            drive_id,
            read_only,
            &disk.device,
            &mut live,
            Path::new(file),
            mode,
        )
        .map_err(|e| BackendError(e.to_string()))?;
        disk.info.image = live.describe();
        let nodes = self.namer.image(node_name);
        disk.info.node_name = nodes.format.clone();
        disk.info.nodes.insert(0, nodes);
        Ok(())
    }

    fn block_resize(&mut self, drive_id: &str, size: u64) -> Result<(), BackendError> {
        let disk = self
            .disks
            .iter_mut()
            .find(|d| d.info.drive_id == drive_id)
            .ok_or_else(|| BackendError(format!("No disk with drive id '{drive_id}'")))?;
        // Only this thread locks it, and nothing panics while holding it.
        let live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
        crate::disks::resize(disk.info.read_only, &disk.device, &live, size)
            .map_err(|e| BackendError(e.to_string()))?;
        disk.info.image = live.describe();
        Ok(())
    }

    fn block_jobs(&self) -> Vec<BlockJobInfo> {
        self.jobs.info()
    }

    fn block_stream(&mut self, drive_id: &str, args: StreamArgs) -> Result<(), JobError> {
        let disk = self
            .disks
            .iter()
            .find(|d| d.info.drive_id == drive_id)
            .ok_or_else(|| JobError::Other(format!("No disk with drive id '{drive_id}'")))?;
        start_stream(self.jobs, disk, args)
    }

    fn block_commit(&mut self, drive_id: &str, args: CommitArgs) -> Result<(), JobError> {
        let disk = self
            .disks
            .iter()
            .find(|d| d.info.drive_id == drive_id)
            .ok_or_else(|| JobError::Other(format!("No disk with drive id '{drive_id}'")))?;
        start_commit(self.jobs, disk, args)
    }

    fn block_job(&mut self, id: &str, command: JobCommand) -> Result<(), JobError> {
        match command {
            JobCommand::Cancel { force } => self.jobs.cancel(id, force),
            JobCommand::Pause => self.jobs.pause(id),
            JobCommand::Resume => self.jobs.resume(id),
            JobCommand::SetSpeed(speed) => self.jobs.set_speed(id, speed),
            JobCommand::Complete => self.jobs.complete(id),
            JobCommand::Finalize => self.jobs.finalize(id, self.disks),
            JobCommand::Dismiss => self.jobs.dismiss(id),
        }
    }
}

/// The main-loop handler of the monitor's descriptors.
#[derive(Debug)]
pub struct VmMonitor {
    monitor: Monitor,
    kickers: Arc<Vec<Kicker>>,
    started: bool,
    iothreads: Vec<IoThreadHandle>,
    disks: Vec<VmDisk>,
    io_errors: Arc<IoErrors>,
    namer: NodeNamer,
    guest_name: Option<String>,
    jobs: Jobs,
}

impl VmMonitor {
    /// `monitor` (registered under [`Tag::Qmp`]) driving the vCPUs that `kickers` kick, with the
    /// VM's iothreads and disks (and what names the nodes it opens after the disks') from
    /// `disks`, and where the disks report errors; `started` is false for a `-S` start;
    /// `guest_name` is `-name`'s. Block jobs raise their events through `events`.
    pub fn new(
        monitor: Monitor,
        kickers: Arc<Vec<Kicker>>,
        started: bool,
        disks: &mut Disks,
        io_errors: Arc<IoErrors>,
        guest_name: Option<String>,
        events: EventSender,
    ) -> Self {
        Self {
            monitor,
            kickers,
            started,
            iothreads: disks.iothread_handles(),
            disks: disks.disks(),
            guest_name,
            io_errors,
            namer: disks.node_namer(),
            jobs: Jobs::new(events),
        }
    }
}

impl Handler for VmMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        self.monitor.init(ops);
    }

    fn process(&mut self, machine: &mut Held<'_>, _: Tag, events: Events, ops: &mut EventOps) {
        let mut backend = VmBackend {
            held: machine,
            kickers: &self.kickers,
            started: &mut self.started,
            iothreads: &self.iothreads,
            disks: &mut self.disks,
            io_errors: &self.io_errors,
            namer: &mut self.namer,
            guest_name: self.guest_name.as_deref(),
            jobs: &mut self.jobs,
        };
        self.monitor.process(&mut backend, events, ops);
        // A job whose copy ended raised an event, whose wake-up brought us here: its end runs
        // on the main loop (see `crate::disks::jobs`).
        self.jobs.finalize_waiting(&mut self.disks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::global::{GlobalLock, Machine};
    use devices::bus::{Bus, SharedBus};
    use std::sync::Arc;

    #[test]
    fn run_states_follow_the_vcpus_request() {
        // No vCPUs: pausing completes at once, the states are what the request says.
        let global = GlobalLock::new(Machine::new(Bus::new(), Bus::new()), SharedBus::new());
        let mut held = Held::lock(&global);
        held.request = VcpuRequest::Pause;
        let mut started = false;
        let errors = IoErrors::new().expect("eventfd");
        let mut backend = VmBackend {
            held: &mut held,
            kickers: &[],
            started: &mut started,
            iothreads: &[],
            disks: &mut [],
            io_errors: &errors,
            namer: &mut NodeNamer::default(),
            guest_name: None,
            jobs: &mut Jobs::new(crate::monitor::event_channel().expect("eventfd").0),
        };
        assert_eq!(backend.run_state(), RunState::Prelaunch);
        backend.resume().expect("resumes");
        assert_eq!(backend.run_state(), RunState::Running);
        backend.pause().expect("pauses");
        assert_eq!(backend.run_state(), RunState::Paused);
        assert!(matches!(backend.powerdown(), Err(BackendError(_))));
        assert!(backend.iothreads().is_empty() && backend.block_devices().is_empty());
        assert!(matches!(backend.block_stats("d0"), Err(BackendError(m)) if m.contains("'d0'")));
        backend.request_quit();
        assert_eq!(backend.run_state(), RunState::Shutdown);
        assert_eq!(held.exit, Some(ExitReason::MonitorQuit));
        assert!(started);
    }

    #[test]
    fn a_disks_stop_request_pauses_in_io_error_until_cont() {
        use crate::disks::IoErrorStop;
        use devices::virtio::block::{ErrorAction, IoErrorEvent};
        let global = GlobalLock::new(Machine::new(Bus::new(), Bus::new()), SharedBus::new());
        let errors = IoErrors::new().expect("eventfd");
        let (tx, rx) = crate::monitor::event_channel().expect("eventfd");
        errors.send_events_to(tx);
        let sink = errors.sink("/machine/peripheral/vd0".into(), "#block0".into());
        // From another thread, as an iothread reports (holding no lock of the VM).
        std::thread::spawn(move || {
            (sink.0)(IoErrorEvent {
                drive: "d0".into(),
                is_read: false,
                action: ErrorAction::Stop,
                errno: libc::ENOSPC,
            })
        })
        .join()
        .expect("reporter");
        assert!(errors.stop_requested());
        let stopper = IoErrorStop::new(Arc::clone(&errors), Arc::new(Vec::new()));
        {
            let mut held = Held::lock(&global);
            stopper.stop_if_asked(&mut held);
            assert!(held.io_error && held.request == VcpuRequest::Pause);
            let mut started = true;
            let mut backend = VmBackend {
                held: &mut held,
                kickers: &[],
                started: &mut started,
                iothreads: &[],
                disks: &mut [],
                io_errors: &errors,
                namer: &mut NodeNamer::default(),
                guest_name: None,
                jobs: &mut Jobs::new(crate::monitor::event_channel().expect("eventfd").0),
            };
            assert_eq!(backend.run_state(), RunState::IoError);
            assert!(!backend.stop_requested());
            backend.resume().expect("resumes");
            assert_eq!(backend.run_state(), RunState::Running);
        }
        let events = rx.drain();
        let names: Vec<_> = events.iter().map(|e| e["event"].clone()).collect();
        assert_eq!(names, ["BLOCK_IO_ERROR", "STOP"]);
        assert_eq!(
            events[0]["data"],
            serde_json::json!({"qom-path": "/machine/peripheral/vd0",
                "device": "d0", "node-name": "#block0", "operation": "write",
                "action": "stop", "nospace": true, "reason": "No space left on device"})
        );
        // A second request while stopped by `stop` does not turn paused into io-error.
        let mut held = Held::lock(&global);
        held.request = VcpuRequest::Pause;
        errors.sink(String::new(), String::new()).0(IoErrorEvent {
            drive: "d0".into(),
            is_read: true,
            action: ErrorAction::Stop,
            errno: libc::EIO,
        });
        stopper.stop_if_asked(&mut held);
        assert!(!held.io_error);
        assert!(!errors.stop_requested());
    }

    #[test]
    fn every_exit_reason_has_qemus_shutdown_cause() {
        let cases = [
            (
                ExitReason::GuestPowerOff,
                Some(ShutdownCause::GuestShutdown),
            ),
            (ExitReason::GuestReset, Some(ShutdownCause::GuestReset)),
            (ExitReason::Signal(15), Some(ShutdownCause::HostSignal)),
            (ExitReason::ConsoleQuit, Some(ShutdownCause::HostQmpQuit)),
            (
                ExitReason::VcpuFailed {
                    cpu: 0,
                    message: String::new(),
                },
                Some(ShutdownCause::HostError),
            ),
            (
                ExitReason::IoThreadFailed {
                    id: "io0".into(),
                    message: String::new(),
                },
                Some(ShutdownCause::HostError),
            ),
            (ExitReason::MonitorQuit, None),
        ];
        for (reason, cause) in cases {
            assert_eq!(shutdown_cause(&reason), cause, "{reason:?}");
        }
    }
}
