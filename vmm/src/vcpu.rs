//! A vCPU thread: a small state machine (running, paused, stopped by the guest, finished) around
//! `KVM_RUN`.
//!
//! The thread holds no lock while in `KVM_RUN`. An exit is decoded by [`handle_exit`], a free
//! function that takes the global lock only to dispatch a PIO or MMIO access to the bus (and not
//! for the shared MMIO bus, where the virtio-mmio transports are). After
//! each exit the vCPU checks, without a lock, whether the guest asked to end the VM
//! ([`GuestExit`]); if so it stops running the guest at once. It looks at the VMM's request
//! ([`crate::global::Machine::request`]: run, pause, stop) only after a kick, under the global
//! lock.
//!
//! Kicking ([`Kicker`]) follows QEMU's `kvm_cpu_kick`: set `immediate_exit` in the vCPU's
//! `kvm_run`, then signal its thread. A vCPU in `KVM_RUN` leaves it on the signal; a vCPU about to
//! enter it returns at once because of `immediate_exit`; either way it sees `EINTR`, clears the
//! flag, and reads the request under the lock. The requester sets the request under the lock
//! before kicking, so no kick is lost.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use devices::legacy::{GuestExit, GuestExitKind};
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::global::{ExitReason, GlobalLock, Guard, VcpuRequest};

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does nothing).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// What an exit leads to when it does not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Run the guest again.
    Continue,
    /// The guest asked to end the VM through KVM's system events.
    Stop(GuestExitKind),
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`): the VM ends as on a reset, and the
    /// registers go to the debug log, because a guest that did not mean to reset is worth a look.
    TripleFault,
}

/// Exits the VMM cannot handle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExitError {
    /// `KVM_EXIT_INTERNAL_ERROR`; the suberror is read from `kvm_run` by the caller.
    #[error("KVM internal error")]
    Internal,
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    #[error("KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// The guest crashed (KVM's system-event crash).
    #[error("Guest crashed (KVM system event {kind})")]
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*` type.
        kind: u32,
    },
    /// An exit the VMM does not expect.
    #[error("Unexpected vCPU exit {exit}")]
    Unexpected {
        /// The exit, as debug text.
        exit: String,
    },
}

/// Decodes one exit; PIO and MMIO accesses go to the buses under the global lock, except those
/// of the shared MMIO bus (the virtio-mmio transports), which need no lock.
pub fn handle_exit(exit: VcpuExit<'_>, global: &GlobalLock) -> Result<ExitOutcome, ExitError> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !global.lock().pio.read(u64::from(port), data) {
                log::debug!("unhandled in from port {port:#x}");
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !global.lock().pio.write(u64::from(port), data) {
                log::debug!("unhandled out to port {port:#x}: {data:x?}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !global.shared_mmio_read(addr, data) && !global.lock().mmio.read(addr, data) {
                log::debug!("unhandled MMIO read at {addr:#x}");
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !global.shared_mmio_write(addr, data) && !global.lock().mmio.write(addr, data) {
                log::debug!("unhandled MMIO write at {addr:#x}: {data:x?}");
            }
        }
        // With the in-kernel local APIC, HLT only exits when KVM gives it to us; run again.
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Ok(ExitOutcome::TripleFault),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            return Ok(ExitOutcome::Stop(GuestExitKind::PowerOff))
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
            return Ok(ExitOutcome::Stop(GuestExitKind::Reset))
        }
        VcpuExit::SystemEvent(kind, _) => return Err(ExitError::SystemEvent { kind }),
        VcpuExit::InternalError => return Err(ExitError::Internal),
        VcpuExit::FailEntry(reason, cpu) => return Err(ExitError::FailEntry { reason, cpu }),
        other => {
            return Err(ExitError::Unexpected {
                exit: format!("{other:?}"),
            })
        }
    }
    Ok(ExitOutcome::Continue)
}

/// The vCPU's place in its state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In the run loop.
    Running,
    /// Paused by the VMM, until asked to run or stop.
    Paused,
    /// The guest ended the VM: waiting, counted as paused, for the VMM to stop every vCPU.
    GuestStopped,
    /// Out of the run loop for good.
    Finished,
}

/// `kvm_run.immediate_exit` of one vCPU, shared with the threads that kick it.
#[derive(Clone, Copy, Debug)]
struct ImmediateExit(*mut u8);

// SAFETY: the pointer is into the vCPU's `kvm_run` mapping, which lives as long as the `VcpuFd`.
// The VMM keeps every `Vcpu` (returned by its thread) alive until after the last kick (see
// `Vm::shutdown`), and only touches the byte atomically.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, value: u8) {
        // SAFETY: the mapping outlives every user of this pointer (see the `Send` impl), and the
        // byte is only accessed atomically, by the kernel included (it reads it with READ_ONCE).
        unsafe { AtomicU8::from_ptr(self.0) }.store(value, Ordering::SeqCst);
    }
}

/// A vCPU's `immediate_exit`, waiting for the vCPU's thread to exist.
#[derive(Debug)]
pub struct KickHandle(ImmediateExit);

impl KickHandle {
    /// The kicker of the vCPU now running on `thread`.
    pub fn on_thread(self, thread: libc::pthread_t) -> Kicker {
        Kicker {
            immediate_exit: self.0,
            thread,
        }
    }
}

/// Kicks one vCPU thread out of `KVM_RUN`.
#[derive(Debug)]
pub struct Kicker {
    immediate_exit: ImmediateExit,
    thread: libc::pthread_t,
}

impl Kicker {
    /// Makes the vCPU leave `KVM_RUN` now, or right away if it is about to enter it.
    pub fn kick(&self) {
        self.immediate_exit.set(1);
        // SAFETY: `thread` is a vCPU thread that the VMM joins only after its last kick, so the
        // id is valid; the kick signal has a handler installed (`install_kick_handler`).
        let ret = unsafe { libc::pthread_kill(self.thread, kick_signal()) };
        if ret != 0 {
            log::error!("cannot signal a vCPU thread: error {ret}");
        }
    }
}

/// Installs the (empty) handler of the kick signal; its only job is to interrupt `KVM_RUN`.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// One vCPU and what its thread needs.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    global: Arc<GlobalLock>,
    /// The guest's request to end the VM, checked after every exit.
    guest_exit: GuestExit,
    /// Wakes the main loop after this vCPU recorded its failure.
    failed: EventFd,
    immediate_exit: ImmediateExit,
}

impl Vcpu {
    /// A vCPU that dispatches exits under `global`, stops when `guest_exit` holds a request, and
    /// signals `failed` when it fails.
    pub fn new(
        mut fd: VcpuFd,
        index: u8,
        global: Arc<GlobalLock>,
        guest_exit: GuestExit,
        failed: EventFd,
    ) -> Self {
        let immediate_exit = ImmediateExit(std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit));
        Self {
            fd,
            index,
            global,
            guest_exit,
            failed,
            immediate_exit,
        }
    }

    /// What a kicker needs from this vCPU, taken before the vCPU moves to its thread.
    pub fn kick_handle(&self) -> KickHandle {
        KickHandle(self.immediate_exit)
    }

    /// Runs the state machine until the vCPU finishes, then hands the vCPU back (so its
    /// `kvm_run` mapping outlives every kick).
    pub fn run(mut self) -> Self {
        // Under -S the vCPUs start paused, before their first KVM_RUN.
        let mut state = match self.global.lock().request {
            VcpuRequest::Pause => State::Paused,
            VcpuRequest::Run | VcpuRequest::Stop => State::Running,
        };
        let mut first_run = true;
        while state != State::Finished {
            if first_run && state == State::Running {
                log::info!("startup: vCPU {} first KVM_RUN", self.index);
                first_run = false;
            }
            state = match state {
                State::Running => self.running(),
                State::Paused => self.paused(),
                State::GuestStopped => self.guest_stopped(),
                State::Finished => State::Finished,
            };
        }
        let mut guard = self.global.lock();
        guard.finished += 1;
        self.global.notify();
        drop(guard);
        self
    }

    /// One `KVM_RUN` and its exit.
    fn running(&mut self) -> State {
        let result = match self.fd.run() {
            Ok(exit) => handle_exit(exit, &self.global),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.immediate_exit.set(0);
                return self.after_kick(self.global.lock());
            }
            Err(e) => {
                let message = format!("KVM_RUN failed: {e}");
                return self.fail(message);
            }
        };
        match result {
            // A device the exit reached may have ended the VM (the guest's power-off or reset
            // write): then the guest runs no further.
            Ok(ExitOutcome::Continue) if self.guest_exit.requested().is_some() => {
                State::GuestStopped
            }
            Ok(ExitOutcome::Continue) => State::Running,
            Ok(ExitOutcome::Stop(kind)) => {
                log::info!("vCPU {}: the guest asked for {kind:?}", self.index);
                self.guest_stopped_with(kind)
            }
            Ok(ExitOutcome::TripleFault) => {
                self.log_registers(
                    log::Level::Warn,
                    "triple fault; the VM ends as on a reset".to_owned(),
                );
                self.guest_stopped_with(GuestExitKind::Reset)
            }
            Err(ExitError::Internal) => {
                // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // union member KVM filled in.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = if suberror == KVM_INTERNAL_ERROR_EMULATION {
                    "emulation failure"
                } else {
                    "internal error"
                };
                self.fail(format!("KVM {what} (suberror {suberror})"))
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    /// Records that the guest ended the VM with `kind`, for the main loop to act on.
    fn guest_stopped_with(&self, kind: GuestExitKind) -> State {
        if let Err(e) = self.guest_exit.request(kind) {
            log::error!("vCPU {}: cannot wake the main loop: {e}", self.index);
        }
        // Running on could loop on the same exit.
        State::GuestStopped
    }

    /// Reads the request after a kick; `guard` is the global lock.
    fn after_kick(&self, guard: Guard<'_>) -> State {
        match guard.request {
            VcpuRequest::Run => State::Running,
            VcpuRequest::Pause => State::Paused,
            VcpuRequest::Stop => State::Finished,
        }
    }

    /// Waits, paused, until asked to run or stop.
    fn paused(&self) -> State {
        let mut guard = self.global.lock();
        guard.paused += 1;
        self.global.notify();
        while guard.request == VcpuRequest::Pause {
            guard = self.global.wait(guard);
        }
        guard.paused -= 1;
        self.after_kick(guard)
    }

    /// Waits, counted as paused, until the VMM stops every vCPU.
    fn guest_stopped(&self) -> State {
        let mut guard = self.global.lock();
        guard.paused += 1;
        self.global.notify();
        while guard.request != VcpuRequest::Stop {
            guard = self.global.wait(guard);
        }
        guard.paused -= 1;
        State::Finished
    }

    /// Logs `message` with the instruction pointer appended, then the registers, at `level`;
    /// returns the message as logged.
    fn log_registers(&self, level: log::Level, mut message: String) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                message.push_str(&format!(" at rip {:#x}", regs.rip));
                log::log!(level, "vCPU {}: {message}", self.index);
                log::log!(level, "vCPU {} registers: {regs:#x?}", self.index);
                log::log!(level, "vCPU {} special registers: {sregs:#x?}", self.index);
            }
            (Err(e), _) | (_, Err(e)) => {
                log::log!(level, "vCPU {}: {message}", self.index);
                log::log!(level, "vCPU {}: cannot read its registers: {e}", self.index);
            }
        }
        message
    }

    /// Logs the registers, ends the VM with `message` (and the instruction pointer), and
    /// finishes this vCPU.
    fn fail(&self, message: String) -> State {
        let message = self.log_registers(log::Level::Error, message);
        self.global.lock().request_exit(ExitReason::VcpuFailed {
            cpu: self.index,
            message,
        });
        if let Err(e) = self.failed.write(1) {
            log::error!("vCPU {}: cannot wake the main loop: {e}", self.index);
        }
        State::Finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::global::Machine;
    use devices::bus::{Bus, BusDevice, SharedBus};

    /// A one-byte register that remembers the last write.
    struct Latch(u8);

    impl BusDevice for Latch {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn global() -> GlobalLock {
        let mut pio = Bus::new();
        pio.insert("latch", 0x80, 1, Box::new(Latch(0)))
            .expect("free range");
        let mut mmio = Bus::new();
        mmio.insert("latch", 0xd000_0000, 4, Box::new(Latch(0)))
            .expect("free range");
        GlobalLock::new(Machine::new(pio, mmio), SharedBus::new())
    }

    #[test]
    fn pio_exits_reach_the_bus() {
        let g = global();
        let out = handle_exit(VcpuExit::IoOut(0x80, &[0x5a]), &g);
        assert_eq!(out, Ok(ExitOutcome::Continue));
        let mut data = [0u8];
        handle_exit(VcpuExit::IoIn(0x80, &mut data), &g).expect("handled");
        assert_eq!(data, [0x5a]);
        // A port nobody owns reads as ones and still continues.
        let mut data = [0u8; 2];
        let out = handle_exit(VcpuExit::IoIn(0x81, &mut data), &g);
        assert_eq!((out, data), (Ok(ExitOutcome::Continue), [0xff, 0xff]));
    }

    #[test]
    fn mmio_exits_reach_the_bus() {
        let g = global();
        handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[7]), &g).expect("handled");
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &g).expect("handled");
        assert_eq!(data, [7; 4]);
    }

    /// A shared-bus byte behind its own lock.
    struct SharedLatch(std::sync::Mutex<u8>);

    impl devices::bus::SharedBusDevice for SharedLatch {
        fn read(&self, _: u64, data: &mut [u8]) {
            data.fill(*self.0.lock().expect("test lock"));
        }
        fn write(&self, _: u64, data: &[u8]) {
            *self.0.lock().expect("test lock") = data[0];
        }
    }

    #[test]
    fn shared_mmio_exits_need_no_global_lock() {
        let mut shared = SharedBus::new();
        shared
            .insert(
                "shared",
                0xd000_1000,
                4,
                Arc::new(SharedLatch(std::sync::Mutex::new(0))),
            )
            .expect("free range");
        let g = Arc::new(GlobalLock::new(
            Machine::new(Bus::new(), Bus::new()),
            shared,
        ));
        // The global lock is held here (a long main-loop handler) while a vCPU thread exits.
        let held = g.lock();
        let vcpu_g = Arc::clone(&g);
        let (tx, rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            handle_exit(VcpuExit::MmioWrite(0xd000_1000, &[9]), &vcpu_g).expect("handled");
            let mut data = [0u8; 4];
            handle_exit(VcpuExit::MmioRead(0xd000_1000, &mut data), &vcpu_g).expect("handled");
            tx.send(data).expect("test waiting");
        });
        let data = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        assert_eq!(data, Ok([9; 4]), "the vCPU waited for the global lock");
        vcpu.join().expect("vCPU thread");
        // Past the shared bus, accesses go to the locked one; after clearing, nothing is shared.
        g.clear_shared_mmio();
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_1000, &mut data), &g).expect("handled");
        assert_eq!(data, [0xff; 4], "nobody owns it any more");
    }

    #[test]
    fn guest_stops_and_failures_are_decoded() {
        let g = global();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &g),
            Ok(ExitOutcome::TripleFault)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]), &g),
            Ok(ExitOutcome::Stop(GuestExitKind::PowerOff))
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &g),
            Ok(ExitOutcome::Stop(GuestExitKind::Reset))
        );
        assert!(matches!(
            handle_exit(VcpuExit::SystemEvent(3, &[]), &g),
            Err(ExitError::SystemEvent { kind: 3 })
        ));
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &g),
            Err(ExitError::Internal)
        ));
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x80000021, 1), &g),
            Err(ExitError::FailEntry {
                reason: 0x80000021,
                cpu: 1
            })
        ));
        assert!(matches!(
            handle_exit(VcpuExit::Watchdog, &g),
            Err(ExitError::Unexpected { .. })
        ));
        assert_eq!(handle_exit(VcpuExit::Hlt, &g), Ok(ExitOutcome::Continue));
    }
}
