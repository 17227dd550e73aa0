//! The global lock: one mutex around everything vCPU exits and main-loop handlers touch, and the
//! condition variable that pauses and stops vCPUs.
//!
//! Like QEMU's big lock, it makes device code single-threaded: a vCPU takes it to dispatch a PIO
//! or MMIO exit to the bus, and the main loop takes it around every handler (see
//! [`crate::main_loop`]). [`GlobalLock::lock`] is the only place the mutex is locked: it
//! debug-asserts the lock order first, and its [`Guard`] sets the thread's "global lock held"
//! flag (`devices::context::set_global_lock_held`) until it is dropped, so the devices' checks
//! see every holder. vCPUs never hold it while in `KVM_RUN`.
//!
//! The exception is the shared MMIO bus beside the mutex ([`GlobalLock::shared_mmio`]): the
//! virtio-mmio transports, which guard their own state, so that a guest acknowledging a disk's
//! interrupt or notifying it never waits for a main-loop handler (a monitor command, a main-loop
//! disk) to let go of the lock. That is what keeps a disk on an iothread independent of the
//! main loop's load. The bus is filled before the vCPUs start and emptied after they stopped.
//!
//! Pausing (`pause_all`) follows QEMU's `pause_all_vcpus`: the caller holds the lock, and a vCPU
//! in an exit may be waiting for that very lock, so the caller waits on the condition variable
//! (which releases the mutex while it waits) until every vCPU has reported itself paused or
//! finished. Each vCPU is kicked out of `KVM_RUN` first (see [`crate::vcpu::Kicker`]).
//!
//! Lock order: the global lock, then a virtio transport's state, then a device's contexts (several
//! only in their creation order); iothreads never take the global lock.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use devices::bus::{Bus, SharedBus};
use devices::context::OnFailure;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::Kicker;

/// What the vCPUs are asked to do; they look at it whenever they are kicked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRequest {
    /// Run the guest.
    Run,
    /// Stop in a paused state until asked to run or stop.
    Pause,
    /// Leave the run loop for good.
    Stop,
}

/// Why the VM ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    GuestPowerOff,
    /// The guest reset the machine (i8042, triple fault, or KVM's reset event); like QEMU's
    /// `-no-reboot`, this ends the VM.
    GuestReset,
    /// SIGTERM, SIGINT or SIGHUP (the signal number).
    Signal(i32),
    /// Ctrl-A x on the console.
    ConsoleQuit,
    /// The monitor's `quit` command.
    MonitorQuit,
    /// A vCPU failed; the message says how.
    VcpuFailed {
        /// The vCPU.
        cpu: u8,
        /// What happened.
        message: String,
    },
    /// An iothread's event loop failed, so its disks were no longer served.
    IoThreadFailed {
        /// The iothread's id.
        id: String,
        /// What happened.
        message: String,
    },
}

/// Where iothreads report a loop that failed. They must not take the global lock, so the first
/// failure waits here, under a mutex of its own, and an eventfd wakes the main loop, whose exit
/// handler moves it into [`Machine::exit`] (`take`).
#[derive(Clone, Debug)]
pub struct IoThreadFailures {
    first: Arc<Mutex<Option<ExitReason>>>,
    wake: Arc<EventFd>,
}

impl IoThreadFailures {
    /// No failure yet; a report signals `wake`.
    pub fn new(wake: EventFd) -> Self {
        Self {
            first: Arc::new(Mutex::new(None)),
            wake: Arc::new(wake),
        }
    }

    /// The failure hook of iothread `id`.
    pub fn hook(&self, id: &str) -> OnFailure {
        let (failures, id) = (self.clone(), id.to_owned());
        Box::new(move |e| failures.report(id, &e))
    }

    fn report(&self, id: String, e: &devices::context::Error) {
        let message = devices::error_chain(e);
        // The record is one store: a panic cannot leave it torn.
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(ExitReason::IoThreadFailed { id, message });
        drop(first);
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the main loop: {e}");
        }
    }

    /// The first failure reported and not yet taken.
    pub fn take(&self) -> Option<ExitReason> {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Everything behind the global lock.
#[derive(Debug)]
pub struct Machine {
    /// The I/O-port bus.
    pub pio: Bus,
    /// The MMIO bus.
    pub mmio: Bus,
    /// What the vCPUs are asked to do.
    pub request: VcpuRequest,
    /// vCPUs currently paused.
    pub paused: usize,
    /// vCPUs whose thread has left its run loop.
    pub finished: usize,
    /// Why the VM ends, once something decided it does (the first reason wins).
    pub exit: Option<ExitReason>,
    /// The vCPUs are paused because a disk's error policy stopped the VM (QEMU's `io-error`
    /// run state); cleared when they resume.
    pub io_error: bool,
}

impl Machine {
    /// A running machine with these buses.
    pub fn new(pio: Bus, mmio: Bus) -> Self {
        Self {
            pio,
            mmio,
            request: VcpuRequest::Run,
            paused: 0,
            finished: 0,
            exit: None,
            io_error: false,
        }
    }

    /// Records why the VM ends, unless a reason was recorded first.
    pub fn request_exit(&mut self, reason: ExitReason) {
        if self.exit.is_none() {
            log::info!("VM exit requested: {reason:?}");
            self.exit = Some(reason);
        }
    }
}

/// The global mutex, its condition variable, and the MMIO bus reached without it.
#[derive(Debug)]
pub struct GlobalLock {
    machine: Mutex<Machine>,
    changed: Condvar,
    /// Written only before the vCPUs start and after they stopped: vCPUs read it concurrently.
    shared_mmio: RwLock<SharedBus>,
}

/// The global lock, held: the [`Machine`] (through `Deref`). While it exists the thread's
/// "global lock held" flag (`devices::context::set_global_lock_held`) is set, so the devices'
/// lock-order checks know about it; it is cleared before the mutex is released.
#[derive(Debug)]
pub struct Guard<'a> {
    // Dropped first: the flag is cleared while the mutex is still held.
    flag: HeldFlag,
    machine: MutexGuard<'a, Machine>,
}

/// Sets the current thread's "global lock held" flag while it lives.
#[derive(Debug)]
struct HeldFlag;

impl HeldFlag {
    fn set() -> Self {
        devices::context::set_global_lock_held(true);
        HeldFlag
    }
}

impl Drop for HeldFlag {
    fn drop(&mut self) {
        devices::context::set_global_lock_held(false);
    }
}

impl Deref for Guard<'_> {
    type Target = Machine;

    fn deref(&self) -> &Machine {
        &self.machine
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }
}

impl GlobalLock {
    /// The lock around `machine`, and `shared_mmio` beside it.
    pub fn new(machine: Machine, shared_mmio: SharedBus) -> Self {
        Self {
            machine: Mutex::new(machine),
            changed: Condvar::new(),
            shared_mmio: RwLock::new(shared_mmio),
        }
    }

    /// Reads MMIO from the shared bus, without the global lock; false when no device there owns
    /// the access.
    pub fn shared_mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.shared_mmio().read(addr, data)
    }

    /// Writes MMIO to the shared bus, without the global lock; false when no device there owns
    /// the access.
    pub fn shared_mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.shared_mmio().write(addr, data)
    }

    /// Empties the shared bus (its devices are dropped once nothing else holds them). Called
    /// once no vCPU runs.
    pub fn clear_shared_mmio(&self) {
        *self
            .shared_mmio
            .write()
            .unwrap_or_else(PoisonError::into_inner) = SharedBus::new();
    }

    /// The shared bus, for reading. Its writers (build and shutdown) cannot panic half-way.
    fn shared_mmio(&self) -> std::sync::RwLockReadGuard<'_, SharedBus> {
        self.shared_mmio
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the global lock: the one place the mutex is locked. In debug builds it first
    /// asserts the lock order (no iothread takes it, no thread holding a context does); the
    /// guard records the lock as held for the devices' checks until it is dropped. A thread that
    /// panicked while holding it has already aborted the process (release builds use
    /// `panic = "abort"`), so a poisoned lock is taken as is.
    pub fn lock(&self) -> Guard<'_> {
        devices::context::debug_assert_may_take_global_lock();
        let machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        Guard {
            flag: HeldFlag::set(),
            machine,
        }
    }

    /// Releases the lock, waits for a change of the vCPUs' state, and takes it again.
    pub fn wait<'a>(&self, guard: Guard<'a>) -> Guard<'a> {
        let Guard { flag, machine } = guard;
        drop(flag);
        let machine = self
            .changed
            .wait(machine)
            .unwrap_or_else(PoisonError::into_inner);
        Guard {
            flag: HeldFlag::set(),
            machine,
        }
    }

    /// Wakes every waiter (paused vCPUs and `pause_all`).
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Pauses every vCPU that has not finished: kicks each out of `KVM_RUN`, then waits (releasing
    /// the lock) until all report paused or finished.
    pub fn pause_all<'a>(&self, mut guard: Guard<'a>, kickers: &[Kicker]) -> Guard<'a> {
        guard.request = VcpuRequest::Pause;
        for k in kickers {
            k.kick();
        }
        while guard.paused + guard.finished < kickers.len() {
            guard = self.wait(guard);
        }
        guard
    }

    /// Sets `request` for every vCPU and wakes the paused ones.
    pub fn release_all(&self, guard: &mut Guard<'_>, request: VcpuRequest) {
        guard.request = request;
        self.notify();
    }
}

/// The global lock as a main-loop handler holds it: the [`Machine`] (through `Deref`), and the
/// waits that release the lock meanwhile, which need the guard itself.
#[derive(Debug)]
pub struct Held<'a> {
    global: &'a GlobalLock,
    /// Always `Some`, except inside [`Held::pause_all`] while the guard is handed to the wait.
    guard: Option<Guard<'a>>,
}

impl<'a> Held<'a> {
    /// Takes the global lock.
    pub fn lock(global: &'a GlobalLock) -> Self {
        Self {
            global,
            guard: Some(global.lock()),
        }
    }

    /// [`GlobalLock::pause_all`], from a handler.
    pub fn pause_all(&mut self, kickers: &[Kicker]) {
        if let Some(guard) = self.guard.take() {
            self.guard = Some(self.global.pause_all(guard, kickers));
        }
    }

    /// [`GlobalLock::release_all`], from a handler.
    pub fn release_all(&mut self, request: VcpuRequest) {
        if let Some(guard) = self.guard.as_mut() {
            self.global.release_all(guard, request);
        }
    }
}

impl Deref for Held<'_> {
    type Target = Machine;

    fn deref(&self) -> &Machine {
        // The guard is only ever out inside `pause_all`, which holds `&mut self`.
        self.guard.as_deref().expect("global lock held")
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Machine {
        // As in `deref`.
        self.guard.as_deref_mut().expect("global lock held")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::context::{global_lock_held, IoThread};
    use std::sync::mpsc;

    fn global() -> Arc<GlobalLock> {
        Arc::new(GlobalLock::new(
            Machine::new(Bus::new(), Bus::new()),
            SharedBus::new(),
        ))
    }

    #[test]
    fn the_guard_records_the_global_lock_for_the_devices_checks() {
        let global = global();
        assert!(!global_lock_held());
        let guard = global.lock();
        assert!(global_lock_held());
        // A waiter lets go meanwhile: another thread takes the lock and is recorded as holder.
        let other = {
            let global = Arc::clone(&global);
            std::thread::spawn(move || {
                let mut guard = global.lock();
                let held = global_lock_held();
                guard.paused = 1;
                global.notify();
                held
            })
        };
        let mut guard = guard;
        while guard.paused == 0 {
            guard = global.wait(guard);
            assert!(global_lock_held());
        }
        assert!(other.join().expect("the other thread does not panic"));
        drop(guard);
        assert!(!global_lock_held());
        drop(Held::lock(&global));
        assert!(!global_lock_held());
    }

    /// Runs `f` on an iothread, catching its panic; returns the panic message, if any.
    fn panic_on_an_iothread(f: impl FnOnce() + Send + 'static) -> Option<String> {
        let io = IoThread::spawn("io-global").expect("spawns");
        let (tx, rx) = mpsc::channel();
        io.context().schedule(move |_| {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let message = caught.err().map(|p| match p.downcast_ref::<&str>() {
                Some(s) => (*s).to_owned(),
                None => p.downcast_ref::<String>().cloned().unwrap_or_default(),
            });
            tx.send(message).expect("the test waits for it");
        });
        let message = rx.recv().expect("the bottom half runs");
        io.stop().expect("the iothread stops");
        message
    }

    #[test]
    #[cfg(debug_assertions)]
    fn an_iothread_taking_the_global_lock_is_caught() {
        let global = global();
        let message = panic_on_an_iothread(move || drop(global.lock()));
        assert_eq!(
            message.as_deref(),
            Some("iothread code must never take the global lock")
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "the global lock must be taken before a context")]
    fn taking_the_global_lock_while_holding_a_context_is_caught() {
        let global = global();
        let ctx = devices::context::Context::new("held").expect("context");
        let _held = ctx.acquire();
        drop(global.lock());
    }
}
