//! SIGTERM, SIGINT and SIGHUP end the VMM cleanly at any point of its life, as QEMU's
//! `termsig_handler` does (SIGHUP included: closing an ssh session sends it).
//!
//! [`start`] runs in `main` as soon as the command line is read, before any other thread exists:
//! it blocks the three signals (every thread started later inherits the mask, so none of them is
//! ever interrupted by one) and starts the `signals` thread, which enters its sandbox and reads
//! them from a signalfd. What that thread does
//! depends on the phase:
//! - while the VM is being built (the monitor's socket bound, `wait=on` waiting for its first
//!   client, images and the kernel being opened, any of which may block indefinitely), it puts the
//!   terminal back ([`crate::console::restore_for_exit`]), removes the monitor sockets registered
//!   with [`remove_on_early_exit`], and exits with status 0. Nothing has run yet that exiting could
//!   leave half done: images are only opened, and an image must survive the VMM being killed at
//!   any point anyway;
//! - once the main loop watches the descriptor handed to [`deliver_to_main_loop`], it records the
//!   signal and wakes the loop, which ends the VM the ordinary way (the monitor's `SHUTDOWN` event
//!   with reason `host-signal`, the vCPUs stopped, the disks flushed, the terminal restored, the
//!   socket removed).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// The signals that end the VMM.
const ENDING: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Errors setting up signal handling.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// pthread_sigmask failed.
    #[error("Cannot block SIGTERM, SIGINT and SIGHUP")]
    Block(#[source] std::io::Error),
    /// signalfd failed.
    #[error("Cannot create a signalfd")]
    SignalFd(#[source] std::io::Error),
    /// The signal thread could not be started.
    #[error("Cannot start the signal thread")]
    Thread(#[source] std::io::Error),
}

/// Where a signal goes.
#[derive(Debug)]
enum Phase {
    /// Before the main loop: exit at once, after removing these sockets.
    Starting(Vec<PathBuf>),
    /// The main loop watches this eventfd.
    Running(EventFd),
}

/// The current phase; the signal thread holds the lock while it acts on a signal.
static PHASE: Mutex<Phase> = Mutex::new(Phase::Starting(Vec::new()));

/// The last signal delivered to the main loop.
static LAST: AtomicI32 = AtomicI32::new(0);

/// Locks the phase, whatever a panicking holder left.
fn phase() -> std::sync::MutexGuard<'static, Phase> {
    PHASE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Blocks the ending signals in this thread (and every thread it starts from now on) and starts
/// the thread that handles them, which runs `on_start` first. Call it before starting any other
/// thread.
pub fn start(on_start: fn()) -> Result<(), SignalError> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a sigset_t, and valid signal numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        for signo in ENDING {
            libc::sigaddset(&mut set, signo);
        }
    }
    // SAFETY: a valid set pointer; a null old-set pointer is allowed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(SignalError::Block(std::io::Error::from_raw_os_error(ret)));
    }
    // SAFETY: -1 asks for a new descriptor; a valid set pointer.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(SignalError::SignalFd(std::io::Error::last_os_error()));
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(block::THREAD_STACK)
        .spawn(move || {
            on_start();
            while let Some(signo) = read_signal(&fd) {
                handle(signo);
            }
        })
        .map_err(SignalError::Thread)?;
    Ok(())
}

/// Reads one signal from a blocking signalfd; `None` if the descriptor fails.
fn read_signal(fd: &OwnedFd) -> Option<i32> {
    loop {
        // SAFETY: signalfd_siginfo is plain data; all-zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into the struct we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(info).cast(), size) };
        if usize::try_from(n).is_ok_and(|n| n == size) {
            return i32::try_from(info.ssi_signo).ok();
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            log::error!("signals: cannot read the signalfd: {err}");
            return None;
        }
    }
}

/// Acts on one ending signal according to the phase.
fn handle(signo: i32) {
    let phase = phase();
    match &*phase {
        Phase::Starting(sockets) => {
            log::info!("signal {signo} before the VM ran: exiting");
            crate::console::restore_for_exit();
            for path in sockets {
                // Best effort, as the monitor's own removal: nobody listens there any more.
                let _ = std::fs::remove_file(path);
            }
            // The phase stays locked: nothing changes it while the process exits.
            std::process::exit(0);
        }
        Phase::Running(wake) => {
            LAST.store(signo, Ordering::Release);
            if let Err(e) = wake.write(1) {
                log::error!("signals: cannot wake the main loop: {e}");
            }
        }
    }
}

/// Has the socket at `path` removed if a signal ends the VMM before the main loop runs (once the
/// main loop runs, its owner removes it on the way out).
pub fn remove_on_early_exit(path: &Path) {
    if let Phase::Starting(sockets) = &mut *phase() {
        sockets.push(path.to_path_buf());
    }
}

/// Forgets a socket registered with [`remove_on_early_exit`] (its owner removed it).
pub fn forget_socket(path: &Path) {
    if let Phase::Starting(sockets) = &mut *phase() {
        sockets.retain(|p| p != path);
    }
}

/// From now on, signals are delivered by signalling `wake` (a clone of an eventfd the main loop
/// watches); [`last_signal`] says which one arrived.
pub fn deliver_to_main_loop(wake: EventFd) {
    *phase() = Phase::Running(wake);
}

/// The signal most recently delivered to the main loop.
pub fn last_signal() -> i32 {
    LAST.load(Ordering::Acquire)
}
