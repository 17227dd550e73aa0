//! QMP events (QEMU's `qapi/run-state.json`: `STOP`, `RESUME`, `POWERDOWN`, `SHUTDOWN`;
//! `qapi/block-core.json`: `BLOCK_IO_ERROR`, `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`;
//! `qapi/job.json`: `JOB_STATUS_CHANGE`) and the channel through which any thread of the VMM
//! raises one.
//!
//! The monitor raises `STOP`, `RESUME` and `POWERDOWN` itself when its commands cause them, and
//! `SHUTDOWN` for `quit`. Everything else (the guest powering off or rebooting, a signal, a fatal
//! vCPU error, a disk's failed request and the stop it causes) is raised by the VM through an
//! [`EventSender`]: a clonable handle usable from any
//! thread without a lock of the VMM's, which queues the event with its timestamp taken at that
//! moment and wakes the main loop through an eventfd. The monitor delivers queued events to every
//! client that has left capabilities negotiation, and once more when it is dropped, so a `SHUTDOWN`
//! raised just before the VMM exits still reaches the clients.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol;
use super::MonitorError;

/// Why the VM shut down (QEMU's `ShutdownCause`, the values this VMM can have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// An error in the VMM (a KVM internal error or emulation failure).
    HostError,
    /// The `quit` command.
    HostQmpQuit,
    /// SIGTERM, SIGINT or SIGHUP.
    HostSignal,
    /// The guest powered off (ACPI sleep state S5).
    GuestShutdown,
    /// The guest rebooted; this VMM exits then, as QEMU does with `-no-reboot`.
    GuestReset,
}

impl ShutdownCause {
    /// QEMU's name for the cause.
    pub fn name(self) -> &'static str {
        match self {
            Self::HostError => "host-error",
            Self::HostQmpQuit => "host-qmp-quit",
            Self::HostSignal => "host-signal",
            Self::GuestShutdown => "guest-shutdown",
            Self::GuestReset => "guest-reset",
        }
    }

    /// Whether the guest asked for it (QEMU's `guest` member of `SHUTDOWN`).
    pub fn is_guest(self) -> bool {
        matches!(self, Self::GuestShutdown | Self::GuestReset)
    }
}

/// `BLOCK_IO_ERROR`'s members, as QEMU 10 sends them for a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIoError {
    /// The guest device's QOM path (`qom-path`, since QEMU 9.2).
    pub qom_path: String,
    /// The `-drive id=` (`device`).
    pub device: String,
    /// The image's node name (`node-name`).
    pub node_name: String,
    /// A read (`operation: read`), else a write, write-zeroes, discard or flush (`write`).
    pub is_read: bool,
    /// `stop`, `report` or `ignore` (`action`).
    pub action: &'static str,
    /// The host ran out of space (`nospace`; sent because virtio-blk keeps an I/O status).
    pub nospace: bool,
    /// `strerror` of the host error (`reason`).
    pub reason: String,
}

/// The members `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED` and `BLOCK_JOB_READY` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The job's type (`type`).
    pub kind: &'static str,
    /// The job's id (`device`).
    pub device: String,
    /// Its total work (`len`).
    pub len: u64,
    /// Its progress (`offset`).
    pub offset: u64,
    /// Its speed limit (`speed`).
    pub speed: u64,
}

impl JobEvent {
    fn to_data(&self) -> Value {
        json!({"type": self.kind, "device": self.device, "len": self.len,
               "offset": self.offset, "speed": self.speed})
    }
}

/// An event the monitor sends to its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// The vCPUs stopped.
    Stop,
    /// The vCPUs resumed.
    Resume,
    /// The power button was pressed.
    Powerdown,
    /// The VM is shutting down.
    Shutdown(ShutdownCause),
    /// A disk's request failed.
    BlockIoError(BlockIoError),
    /// A job changed status (`JOB_STATUS_CHANGE`).
    JobStatusChange {
        /// The job.
        id: String,
        /// QEMU's name of its new status.
        status: &'static str,
    },
    /// A block job ended, with the error that ended it if any (`BLOCK_JOB_COMPLETED`).
    BlockJobCompleted {
        /// The job.
        data: JobEvent,
        /// Why it failed.
        error: Option<String>,
    },
    /// A block job's I/O failed (`BLOCK_JOB_ERROR`).
    BlockJobError {
        /// The job.
        id: String,
        /// `read` or `write`.
        operation: &'static str,
        /// What the job does about it (its `on-error`): `report`, `stop` or `ignore`.
        action: &'static str,
    },
    /// A block job was cancelled (`BLOCK_JOB_CANCELLED`).
    BlockJobCancelled(JobEvent),
    /// A mirror is in sync: `block-job-complete` may switch the disk (`BLOCK_JOB_READY`).
    BlockJobReady(JobEvent),
    /// A job without `auto-finalize` waits for `job-finalize` (`BLOCK_JOB_PENDING`).
    BlockJobPending {
        /// The job's type.
        kind: &'static str,
        /// The job's id.
        id: String,
    },
}

impl QmpEvent {
    /// The event's wire form, stamped with the time it happened.
    pub fn to_message(&self, at: SystemTime) -> Value {
        match self {
            Self::Stop => protocol::event("STOP", None, at),
            Self::Resume => protocol::event("RESUME", None, at),
            Self::Powerdown => protocol::event("POWERDOWN", None, at),
            Self::Shutdown(cause) => protocol::event(
                "SHUTDOWN",
                Some(json!({"guest": cause.is_guest(), "reason": cause.name()})),
                at,
            ),
            Self::BlockIoError(e) => protocol::event(
                "BLOCK_IO_ERROR",
                Some(json!({
                    "qom-path": e.qom_path,
                    "device": e.device,
                    "node-name": e.node_name,
                    "operation": if e.is_read { "read" } else { "write" },
                    "action": e.action,
                    "nospace": e.nospace,
                    "reason": e.reason,
                })),
                at,
            ),
            Self::JobStatusChange { id, status } => protocol::event(
                "JOB_STATUS_CHANGE",
                Some(json!({"id": id, "status": status})),
                at,
            ),
            Self::BlockJobCompleted { data, error } => {
                let mut members = data.to_data();
                if let (Some(error), Some(map)) = (error, members.as_object_mut()) {
                    map.insert("error".into(), json!(error));
                }
                protocol::event("BLOCK_JOB_COMPLETED", Some(members), at)
            }
            Self::BlockJobError {
                id,
                operation,
                action,
            } => protocol::event(
                "BLOCK_JOB_ERROR",
                Some(json!({"device": id, "operation": operation, "action": action})),
                at,
            ),
            Self::BlockJobCancelled(data) => {
                protocol::event("BLOCK_JOB_CANCELLED", Some(data.to_data()), at)
            }
            Self::BlockJobReady(data) => {
                protocol::event("BLOCK_JOB_READY", Some(data.to_data()), at)
            }
            Self::BlockJobPending { kind, id } => protocol::event(
                "BLOCK_JOB_PENDING",
                Some(json!({"type": kind, "id": id})),
                at,
            ),
        }
    }
}

/// The sending end of the event channel, for the VM's threads.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: mpsc::Sender<Value>,
    wake: Arc<EventFd>,
}

impl EventSender {
    /// Queues an event, stamped now, and wakes the monitor. Never blocks; an event raised after the
    /// monitor is gone is dropped.
    pub fn send(&self, event: QmpEvent) {
        if self.tx.send(event.to_message(SystemTime::now())).is_err() {
            return;
        }
        if let Err(e) = self.wake.write(1) {
            log::warn!("monitor: cannot wake the main loop for an event: {e}");
        }
    }
}

/// The receiving end, owned by the monitor.
#[derive(Debug)]
pub struct EventReceiver {
    rx: mpsc::Receiver<Value>,
    wake: Arc<EventFd>,
}

impl EventReceiver {
    /// The eventfd the main loop watches.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Takes every queued event, in order, and clears the wake-up.
    pub fn drain(&self) -> Vec<Value> {
        // A failed read only means the counter was already zero (non-blocking eventfd).
        let _ = self.wake.read();
        self.rx.try_iter().collect()
    }
}

/// Creates the event channel: the sender goes to the VM, the receiver to [`super::Monitor::new`].
pub fn event_channel() -> Result<(EventSender, EventReceiver), MonitorError> {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(MonitorError::EventFd)?);
    let (tx, rx) = mpsc::channel();
    Ok((
        EventSender {
            tx,
            wake: Arc::clone(&wake),
        },
        EventReceiver { rx, wake },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn shutdown_event_carries_qemu_fields() {
        let at = UNIX_EPOCH + Duration::from_micros(1_500_000);
        let cases = [
            (ShutdownCause::HostError, false, "host-error"),
            (ShutdownCause::HostQmpQuit, false, "host-qmp-quit"),
            (ShutdownCause::HostSignal, false, "host-signal"),
            (ShutdownCause::GuestShutdown, true, "guest-shutdown"),
            (ShutdownCause::GuestReset, true, "guest-reset"),
        ];
        for (cause, guest, reason) in cases {
            assert_eq!(
                QmpEvent::Shutdown(cause).to_message(at),
                json!({"event": "SHUTDOWN", "data": {"guest": guest, "reason": reason},
                       "timestamp": {"seconds": 1, "microseconds": 500_000}})
            );
        }
        assert_eq!(QmpEvent::Stop.to_message(at)["event"], "STOP");
        assert_eq!(QmpEvent::Resume.to_message(at)["event"], "RESUME");
        assert_eq!(QmpEvent::Powerdown.to_message(at)["event"], "POWERDOWN");
        assert!(QmpEvent::Stop.to_message(at).get("data").is_none());
    }

    #[test]
    fn block_io_error_carries_qemu_fields_in_qemus_order() {
        let at = UNIX_EPOCH + Duration::from_secs(7);
        let e = QmpEvent::BlockIoError(BlockIoError {
            qom_path: "/machine/peripheral/vd0".into(),
            device: "d0".into(),
            node_name: "#block0".into(),
            is_read: false,
            action: "stop",
            nospace: true,
            reason: "No space left on device".into(),
        });
        let text = serde_json::to_string(&e.to_message(at)).expect("serializes");
        assert_eq!(
            text,
            r##"{"event":"BLOCK_IO_ERROR","data":{"qom-path":"/machine/peripheral/vd0","device":"d0","node-name":"#block0","operation":"write","action":"stop","nospace":true,"reason":"No space left on device"},"timestamp":{"seconds":7,"microseconds":0}}"##
        );
    }

    #[test]
    fn channel_wakes_and_keeps_order_across_threads() {
        let (tx, rx) = event_channel().expect("eventfd");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            tx2.send(QmpEvent::Stop);
            tx2.send(QmpEvent::Shutdown(ShutdownCause::GuestShutdown));
        })
        .join()
        .expect("sender thread");
        assert_eq!(rx.wake_fd().read().expect("woken"), 2);
        let got = rx.drain();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["event"], "STOP");
        assert_eq!(got[1]["data"]["reason"], "guest-shutdown");
        assert!(rx.drain().is_empty());
    }

    #[test]
    fn sending_after_the_monitor_is_gone_is_harmless() {
        let (tx, rx) = event_channel().expect("eventfd");
        drop(rx);
        tx.send(QmpEvent::Powerdown);
    }
}
