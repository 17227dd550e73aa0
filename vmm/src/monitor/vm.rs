//! The monitor on this VMM's main loop: [`VmMonitor`] is the main-loop handler for
//! [`Tag::Qmp`], and [`VmBackend`] is the [`MonitorBackend`] it hands the monitor for each event,
//! borrowing the machine behind the global lock that the main loop holds.
//!
//! Run states: the vCPUs' request says running or paused; paused before the first `cont` of a
//! `-S` start is `prelaunch`, as in QEMU; once an exit reason is recorded the VM is `shutdown`.
//! `stop` waits until every vCPU is paused ([`Held::pause_all`], which releases the global lock
//! while it waits, as QEMU's `pause_all_vcpus` does); `cont` releases them.
//!
//! The VM hands the monitor its iothreads and disks (each disk's description and its device, whose
//! statistics need no lock: see `disk_stats.rs`). `system_powerdown` presses the ACPI power
//! button: the Generic Event Device on the MMIO bus (`devices::legacy::Ged`) sets its event bit
//! and raises its interrupt; its `_EVT` method notifies the `PNP0C0C` button (see
//! `arch::x86_64::acpi`).

use std::sync::Arc;

use devices::legacy::Ged;
use devices::virtio::block::Block;
use event_manager::{EventOps, Events};

use super::{
    apply_histogram_change, block_device_stats, BackendError, BlockDevice, BlockDeviceStats,
    HistogramChange, IoThreadInfo, Monitor, MonitorBackend, RunState, ShutdownCause,
};
use crate::arch::x86_64::layout::GED_START;
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

/// A disk: its `query-block` description and the device that counts its I/O.
pub type VmDisk = (BlockDevice, Arc<Block>);

/// The VM as one event's commands see it.
#[derive(Debug)]
pub struct VmBackend<'a, 'g> {
    held: &'a mut Held<'g>,
    kickers: &'a [Kicker],
    /// The vCPUs have run (false until the first `cont` under `-S`).
    started: &'a mut bool,
    iothreads: &'a [IoThreadInfo],
    disks: &'a [VmDisk],
}

impl VmBackend<'_, '_> {
    /// The device of the disk with this drive id.
    fn disk(&self, drive_id: &str) -> Result<&Block, BackendError> {
        self.disks
            .iter()
            .find(|(info, _)| info.drive_id == drive_id)
            .map(|(_, device)| device.as_ref())
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
        *self.started = true;
        self.held.release_all(VcpuRequest::Run);
        Ok(())
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
        self.iothreads.to_vec()
    }

    fn block_devices(&self) -> Vec<BlockDevice> {
        self.disks.iter().map(|(info, _)| info.clone()).collect()
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
}

/// The main-loop handler of the monitor's descriptors.
#[derive(Debug)]
pub struct VmMonitor {
    monitor: Monitor,
    kickers: Arc<Vec<Kicker>>,
    started: bool,
    iothreads: Vec<IoThreadInfo>,
    disks: Vec<VmDisk>,
}

impl VmMonitor {
    /// `monitor` (registered under [`Tag::Qmp`]) driving the vCPUs that `kickers` kick, with the
    /// VM's iothreads and disks; `started` is false for a `-S` start.
    pub fn new(
        monitor: Monitor,
        kickers: Arc<Vec<Kicker>>,
        started: bool,
        iothreads: Vec<IoThreadInfo>,
        disks: Vec<VmDisk>,
    ) -> Self {
        Self {
            monitor,
            kickers,
            started,
            iothreads,
            disks,
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
            disks: &self.disks,
        };
        self.monitor.process(&mut backend, events, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::global::{GlobalLock, Machine};
    use devices::bus::{Bus, SharedBus};

    #[test]
    fn run_states_follow_the_vcpus_request() {
        // No vCPUs: pausing completes at once, the states are what the request says.
        let global = GlobalLock::new(Machine::new(Bus::new(), Bus::new()), SharedBus::new());
        let mut held = Held::lock(&global);
        held.request = VcpuRequest::Pause;
        let mut started = false;
        let mut backend = VmBackend {
            held: &mut held,
            kickers: &[],
            started: &mut started,
            iothreads: &[],
            disks: &[],
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
