//! The main loop: an event-manager loop whose every handler runs with the global lock held.
//!
//! Each handler implements [`Handler`] and is wrapped in [`Locked`], the one subscriber type the
//! event manager knows; `Locked` takes the global lock around the handler, so handlers see the
//! [`crate::global::Machine`] directly, through [`Held`], which can also wait for the vCPUs to
//! pause. Every descriptor is registered with a [`Tag`] and dispatched by `match`.
//!
//! Handlers now: the VM's exit events (the guest's reset or power-off, a vCPU's failure,
//! SIGTERM/SIGINT/SIGHUP, which [`crate::signals`] forwards through an eventfd), the console's
//! input, the QMP monitor ([`crate::monitor::VmMonitor`]), the main loop's context (main-loop
//! disks) and the stop a disk's error policy asks for ([`crate::disks::IoErrorStop`]).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::legacy::{GuestExit, GuestExitKind, Serial};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::COM1_PORT;
use crate::console::Escapes;
use crate::global::{ExitReason, GlobalLock, Held, IoThreadFailures, Machine};

/// What a registered descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Tag {
    /// The guest asked for a reset or power-off.
    GuestExit = 1,
    /// A vCPU failed and recorded why.
    VcpuFailed,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal,
    /// Console input.
    Stdin,
    /// The guest read the UART's receive FIFO empty.
    SerialDrained,
    /// Every descriptor of the QMP monitor (it tells them apart by fd).
    Qmp,
    /// The main loop's context (its epoll fd): the disks without an iothread.
    MainContext,
    /// A disk's error policy asked for the VM to stop.
    IoErrorStop,
}

impl Tag {
    const ALL: [Tag; 8] = [
        Tag::GuestExit,
        Tag::VcpuFailed,
        Tag::Signal,
        Tag::Stdin,
        Tag::SerialDrained,
        Tag::Qmp,
        Tag::MainContext,
        Tag::IoErrorStop,
    ];

    /// The tag registered as `data`.
    fn from_data(data: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == data)
    }
}

/// A main-loop handler: like an event-manager subscriber, but called with the global lock held.
pub trait Handler: Send {
    /// Registers the handler's descriptors.
    fn init(&mut self, ops: &mut EventOps);
    /// Handles one event on a descriptor registered with `tag`.
    fn process(&mut self, machine: &mut Held<'_>, tag: Tag, events: Events, ops: &mut EventOps);
}

/// A handler and the lock it runs under.
pub struct Locked {
    global: Arc<GlobalLock>,
    handler: Box<dyn Handler>,
}

impl std::fmt::Debug for Locked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locked").finish_non_exhaustive()
    }
}

impl Locked {
    /// `handler`, to run under `global`.
    pub fn new(global: Arc<GlobalLock>, handler: Box<dyn Handler>) -> Self {
        Self { global, handler }
    }
}

impl MutEventSubscriber for Locked {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let Some(tag) = Tag::from_data(events.data()) else {
            log::error!("main loop: event with unknown tag {}", events.data());
            return;
        };
        let mut held = Held::lock(&self.global);
        self.handler.process(&mut held, tag, events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.handler.init(ops);
    }
}

/// Registers `fd` for input under `tag`, logging a failure (the loop runs on without it).
fn add_input(ops: &mut EventOps, fd: &impl AsRawFd, tag: Tag) -> bool {
    match ops.add(Events::with_data(fd, tag as u32, EventSet::IN)) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("main loop: cannot watch {tag:?}: {e:?}");
            false
        }
    }
}

/// The events that end the VM.
#[derive(Debug)]
pub struct ExitEvents {
    /// The guest's reset or power-off request (from the devices or a vCPU).
    pub guest: GuestExit,
    /// Signalled by a vCPU after it recorded its failure in the machine, or by an iothread after
    /// it recorded its own in `iothread_failed`.
    pub vcpu_failed: EventFd,
    /// Failed iothreads (which must not take the global lock).
    pub iothread_failed: IoThreadFailures,
    /// Signalled by the signal thread for SIGTERM, SIGINT and SIGHUP.
    pub signals: EventFd,
}

impl Handler for ExitEvents {
    fn init(&mut self, ops: &mut EventOps) {
        add_input(ops, self.guest.event(), Tag::GuestExit);
        add_input(ops, &self.vcpu_failed, Tag::VcpuFailed);
        if add_input(ops, &self.signals, Tag::Signal) {
            match self.signals.try_clone() {
                Ok(wake) => crate::signals::deliver_to_main_loop(wake),
                Err(e) => log::error!(
                    "main loop: cannot take signals, they will end the VMM at once: {e}"
                ),
            }
        }
    }

    fn process(&mut self, machine: &mut Held<'_>, tag: Tag, _: Events, _: &mut EventOps) {
        let reason = match tag {
            Tag::GuestExit => {
                let _ = self.guest.event().read();
                match self.guest.requested() {
                    Some(GuestExitKind::Reset) => ExitReason::GuestReset,
                    Some(GuestExitKind::PowerOff) => ExitReason::GuestPowerOff,
                    None => return,
                }
            }
            Tag::VcpuFailed => {
                // A vCPU recorded its failure in the machine already.
                let _ = self.vcpu_failed.read();
                match self.iothread_failed.take() {
                    Some(reason) => reason,
                    None => return,
                }
            }
            Tag::Signal => {
                let _ = self.signals.read();
                ExitReason::Signal(crate::signals::last_signal())
            }
            Tag::Stdin | Tag::SerialDrained | Tag::Qmp | Tag::MainContext | Tag::IoErrorStop => {
                return
            }
        };
        machine.request_exit(reason);
    }
}

/// Most console input kept for a guest that is not reading; beyond it, input is dropped.
const MAX_PENDING_INPUT: usize = 64 << 10;

/// Console input: stdin to the UART, minus the Ctrl-A escapes. The UART takes a FIFO's worth at a
/// time; the rest waits here until the guest has read the FIFO empty.
#[derive(Debug)]
pub struct ConsoleInput {
    escapes: Escapes,
    pending: VecDeque<u8>,
    /// Signalled by the UART when the guest has read its receive FIFO empty.
    drained: EventFd,
}

impl ConsoleInput {
    /// Console input for a UART that signals `drained`.
    pub fn new(drained: EventFd) -> Self {
        Self {
            escapes: Escapes::default(),
            pending: VecDeque::new(),
            drained,
        }
    }

    /// Hands the UART as much pending input as its FIFO takes.
    fn flush(&mut self, machine: &mut Machine) {
        if self.pending.is_empty() {
            return;
        }
        let Some(serial) = machine.pio.device_mut::<Serial>(COM1_PORT) else {
            return;
        };
        let taken = serial.enqueue(self.pending.make_contiguous());
        self.pending.drain(..taken);
    }

    /// Reads stdin into the pending input; true on Ctrl-A x.
    fn read_stdin(&mut self, events: Events, ops: &mut EventOps) -> bool {
        let mut buf = [0u8; 256];
        // SAFETY: reads into a buffer we own, of the length given.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            return false;
        };
        if n == 0 {
            // End of input: stop watching, or the loop would spin on it.
            let _ = ops.remove(events);
            return false;
        }
        let mut to_guest = Vec::with_capacity(n);
        let quit = self.escapes.feed(&buf[..n], &mut to_guest);
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        if to_guest.len() > room {
            log::warn!(
                "console: guest not reading, {} bytes dropped",
                to_guest.len() - room
            );
        }
        self.pending.extend(to_guest.into_iter().take(room));
        quit
    }
}

impl Handler for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Not every stdin can be watched (a regular file or /dev/null cannot): then the guest
        // simply gets no input.
        if !add_input(ops, &std::io::stdin(), Tag::Stdin) {
            log::info!("console: stdin cannot be watched, the guest gets no input");
        }
        add_input(ops, &self.drained, Tag::SerialDrained);
    }

    fn process(&mut self, machine: &mut Held<'_>, tag: Tag, events: Events, ops: &mut EventOps) {
        match tag {
            Tag::Stdin => {
                if self.read_stdin(events, ops) {
                    machine.request_exit(ExitReason::ConsoleQuit);
                    return;
                }
            }
            Tag::SerialDrained => {
                let _ = self.drained.read();
            }
            Tag::GuestExit
            | Tag::VcpuFailed
            | Tag::Signal
            | Tag::Qmp
            | Tag::MainContext
            | Tag::IoErrorStop => return,
        }
        self.flush(machine);
    }
}
