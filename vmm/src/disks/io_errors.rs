//! Where the disks' failed requests go: each device reports them to [`IoErrors`] from its own
//! context, which queues QMP's `BLOCK_IO_ERROR` for the monitor and, for a stopping policy
//! (`werror=stop`, `enospc` on ENOSPC...), asks the main loop to stop the VM; [`IoErrorStop`], a
//! main-loop handler, pauses every vCPU as `stop` does and enters the `io-error` run state;
//! `cont` retries the kept requests (`crate::monitor::VmMonitor`).
//!
//! Threads and locks: a report may come from an iothread, so [`IoErrors`] takes no lock of the
//! VM (an event queue, an atomic and an eventfd); the stop itself runs on the main loop with the
//! global lock held, as every main-loop handler does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use devices::virtio::block::{ErrorAction, ErrorSink, IoErrorEvent};
use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::global::{Held, VcpuRequest};
use crate::main_loop::{Handler, Tag};
use crate::monitor::{BlockIoError, EventSender, QmpEvent};
use crate::vcpu::Kicker;

/// Where the disks report failed requests, from their contexts (an iothread's too: nothing here
/// takes the global lock). Each report becomes QMP's `BLOCK_IO_ERROR` once the monitor exists;
/// one whose action is `stop` also asks the main loop to stop the VM ([`IoErrorStop`]), after
/// the event, so `STOP` follows `BLOCK_IO_ERROR` as in QEMU.
#[derive(Debug)]
pub struct IoErrors {
    events: OnceLock<EventSender>,
    /// Wakes [`IoErrorStop`].
    wake: EventFd,
    /// A stop was asked for and not yet carried out (or cancelled by `cont`).
    stop_requested: AtomicBool,
}

impl IoErrors {
    /// The reports' destination, with no monitor yet.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            events: OnceLock::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop_requested: AtomicBool::new(false),
        }))
    }

    /// From now on reports become events for the monitor's clients (set once, before the
    /// vCPUs start).
    pub fn send_events_to(&self, events: EventSender) {
        if self.events.set(events).is_err() {
            log::warn!("disks: I/O error events already go to a monitor");
        }
    }

    /// The sink of a disk whose guest device has this QOM path and whose image this node name.
    pub fn sink(self: &Arc<Self>, qom_path: String, node_name: String) -> ErrorSink {
        let me = Arc::clone(self);
        ErrorSink(Arc::new(move |e: IoErrorEvent| {
            if let Some(events) = me.events.get() {
                events.send(QmpEvent::BlockIoError(BlockIoError {
                    qom_path: qom_path.clone(),
                    device: e.drive.clone(),
                    node_name: node_name.clone(),
                    is_read: e.is_read,
                    action: e.action.name(),
                    nospace: e.nospace(),
                    reason: e.reason(),
                }));
            }
            if e.action == ErrorAction::Stop {
                me.stop_requested.store(true, Ordering::SeqCst);
                if let Err(err) = me.wake.write(1) {
                    log::error!("disks: cannot ask the main loop to stop the VM: {err}");
                }
            }
        }))
    }

    /// Whether a stop was asked for and not yet carried out.
    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Takes the stop request: true when there was one.
    pub fn take_stop_request(&self) -> bool {
        self.stop_requested.swap(false, Ordering::SeqCst)
    }

    /// Sends `event` to the monitor's clients, if there is a monitor.
    pub fn send(&self, event: QmpEvent) {
        if let Some(events) = self.events.get() {
            events.send(event);
        }
    }
}

/// The main-loop handler that stops the VM when a disk's error policy asks for it: as QEMU's
/// `vm_stop(RUN_STATE_IO_ERROR)`, only a running VM stops (every vCPU paused, as `stop` does),
/// enters the `io-error` state and raises `STOP`; `cont` resumes it and retries the requests.
#[derive(Debug)]
pub struct IoErrorStop {
    errors: Arc<IoErrors>,
    kickers: Arc<Vec<Kicker>>,
}

impl IoErrorStop {
    /// Stops the vCPUs `kickers` kick when `errors` asks.
    pub fn new(errors: Arc<IoErrors>, kickers: Arc<Vec<Kicker>>) -> Self {
        Self { errors, kickers }
    }

    /// Stops a running VM if a disk asked for it since the last time.
    pub fn stop_if_asked(&self, machine: &mut Held<'_>) {
        if !self.errors.take_stop_request() {
            return;
        }
        if machine.exit.is_some() || machine.request != VcpuRequest::Run {
            return;
        }
        machine.pause_all(&self.kickers);
        machine.io_error = true;
        log::warn!("VM stopped by a disk's I/O error; `cont` retries the failed requests");
        self.errors.send(QmpEvent::Stop);
    }
}

impl Handler for IoErrorStop {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.errors.wake,
            Tag::IoErrorStop as u32,
            EventSet::IN,
        )) {
            log::error!("main loop: cannot watch the disks' stop requests: {e:?}");
        }
    }

    fn process(&mut self, machine: &mut Held<'_>, _: Tag, _: Events, _: &mut EventOps) {
        // A failed read only means the counter was already zero (non-blocking eventfd).
        let _ = self.errors.wake.read();
        self.stop_if_asked(machine);
    }
}
