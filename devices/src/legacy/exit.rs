//! The guest's request to end the VM (power-off or reset), shared by the devices that make it,
//! the vCPUs and the main loop.
//!
//! A device (the i8042's reset line, the ACPI sleep registers) or a vCPU (a triple fault, KVM's
//! system event) records what the guest asked for and signals an eventfd that wakes the main
//! loop, which ends the VM. The vCPU that dispatched the request checks [`GuestExit::requested`]
//! right after the exit and stops running the guest at once, as a machine that lost power would:
//! a guest that ran on past its power-off write would go on to warn that power-off failed.
//! The first request wins; the record is an atomic, so none of this needs a lock.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GuestExitKind {
    /// Power-off (ACPI S5, or KVM's shutdown event).
    PowerOff = 1,
    /// Reset (the i8042's reset line, a triple fault, or KVM's reset event).
    Reset = 2,
}

/// The shared record of the guest's request to end the VM, and the eventfd that announces it.
#[derive(Clone, Debug)]
pub struct GuestExit {
    kind: Arc<AtomicU8>,
    event: Arc<EventFd>,
}

impl GuestExit {
    /// No request yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            kind: Arc::new(AtomicU8::new(0)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Records `kind` (unless a request came first) and wakes the main loop.
    pub fn request(&self, kind: GuestExitKind) -> std::io::Result<()> {
        // A lost race means an earlier request stands; either way the main loop is woken.
        let _ = self
            .kind
            .compare_exchange(0, kind as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.event.write(1)
    }

    /// The request, if the guest made one.
    pub fn requested(&self) -> Option<GuestExitKind> {
        match self.kind.load(Ordering::SeqCst) {
            1 => Some(GuestExitKind::PowerOff),
            2 => Some(GuestExitKind::Reset),
            _ => None,
        }
    }

    /// The eventfd the main loop watches; readable once a request was made.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl vm_superio::Trigger for GuestExit {
    type E = std::io::Error;

    /// A vm-superio device's reset line (the i8042's): a reset request.
    fn trigger(&self) -> std::io::Result<()> {
        self.request(GuestExitKind::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::Trigger;

    #[test]
    fn first_request_wins_and_wakes_the_loop() {
        let exit = GuestExit::new().expect("eventfd");
        assert_eq!(exit.requested(), None);
        let device_side = exit.clone();
        device_side
            .request(GuestExitKind::PowerOff)
            .expect("signalled");
        exit.trigger().expect("signalled");
        assert_eq!(exit.requested(), Some(GuestExitKind::PowerOff));
        assert_eq!(exit.event().read().expect("readable"), 2);
    }
}
