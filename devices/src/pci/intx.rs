//! Legacy INTx: a function's one interrupt pin (INTA#), for a guest that does not enable MSI-X
//! (Linux with `pci=nomsi`). The pin is level-triggered (PCI Local Bus 3.0, 2.2.6): it stays
//! asserted while the function has an interrupt pending, and the guest's handler clears the cause
//! (virtio's ISR status, cleared by reading it) before it ends the interrupt.
//!
//! The line is an irqfd that the vmm registers with KVM with a resample eventfd
//! (`KVM_IRQFD_FLAG_RESAMPLE`): writing the irqfd asserts the GSI and keeps it asserted; at the
//! guest's end of interrupt (the IOAPIC's EOI) KVM deasserts it and signals the resample
//! eventfd, and the function, told so through [`Intx::resampled`], asserts it again if it still
//! has something pending (a cause raised after the guest read the status, before its EOI). So the
//! line is never asserted for nothing, and nothing pending is lost. Both are plain eventfd
//! writes, without any lock: a device raises the line from its own context (an iothread).
//!
//! The command register's INTx-disable bit is honoured: while it is set nothing asserts the line;
//! cleared with an interrupt pending, the line is asserted then. A line already asserted when the
//! guest sets the bit stays so until its EOI (an irqfd cannot be deasserted from outside KVM).

use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::PciError;

/// The interrupt pin register's value for INTA# (PCI Local Bus 3.0, 6.2.4).
pub const PIN_INTA: u8 = 1;

/// One function's INTx line: its GSI, irqfd and resample eventfd, and the INTx-disable bit.
#[derive(Debug)]
pub struct Intx {
    gsi: u32,
    irqfd: EventFd,
    resample: EventFd,
    disabled: AtomicBool,
}

impl Intx {
    /// A line on `gsi`, with a new irqfd and resample eventfd. INTx starts enabled, as the
    /// command register's INTx-disable bit starts clear.
    pub fn new(gsi: u32) -> Result<Self, PciError> {
        Ok(Intx {
            gsi,
            irqfd: EventFd::new(EFD_NONBLOCK).map_err(PciError::Irqfd)?,
            resample: EventFd::new(EFD_NONBLOCK).map_err(PciError::Irqfd)?,
            disabled: AtomicBool::new(false),
        })
    }

    /// The GSI the line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd to register with KVM as the irqfd of [`Self::gsi`].
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The eventfd KVM signals when it deasserts the line at the guest's EOI.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// The guest wrote the command register: its INTx-disable bit is `disabled`. Returns
    /// whether it went from set to clear, when the caller asserts the line if something is
    /// pending.
    pub fn set_disabled(&self, disabled: bool) -> bool {
        let was = self.disabled.swap(disabled, Ordering::AcqRel);
        was && !disabled
    }

    /// Asserts the line, unless INTx is disabled.
    pub fn assert(&self) {
        if self.disabled.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("intx: cannot assert GSI {}: {e}", self.gsi);
        }
    }

    /// KVM signalled the resample eventfd: it deasserted the line at the guest's EOI. Consumes
    /// the signal and asserts the line again if `pending`.
    pub fn resampled(&self, pending: bool) {
        // Nonblocking: a handler woken without a signal (none left) reads nothing.
        let _ = self.resample.read();
        if pending {
            self.assert();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// How many times the irqfd was written since the last look.
    fn asserted(intx: &Intx) -> u64 {
        intx.irqfd().read().unwrap_or(0)
    }

    #[test]
    fn the_line_is_asserted_unless_intx_is_disabled() {
        let intx = Intx::new(16).unwrap();
        assert_eq!(intx.gsi(), 16);
        intx.assert();
        assert_eq!(asserted(&intx), 1);
        assert!(!intx.set_disabled(true));
        intx.assert();
        assert_eq!(asserted(&intx), 0, "disabled");
        assert!(!intx.set_disabled(true), "still set");
        assert!(intx.set_disabled(false), "set to clear");
        intx.assert();
        assert_eq!(asserted(&intx), 1);
    }

    #[test]
    fn a_resample_asserts_again_only_what_is_still_pending() {
        let intx = Intx::new(17).unwrap();
        // KVM deasserted the line at the EOI; the guest had read the status: nothing pending.
        intx.resample_fd().write(1).unwrap();
        intx.resampled(false);
        assert_eq!(asserted(&intx), 0);
        assert_eq!(
            intx.resample_fd().read().ok(),
            None,
            "the signal is consumed"
        );
        // A cause raised after the guest read the status: asserted again.
        intx.resample_fd().write(1).unwrap();
        intx.resampled(true);
        assert_eq!(asserted(&intx), 1);
        // Not while INTx is disabled.
        intx.set_disabled(true);
        intx.resample_fd().write(1).unwrap();
        intx.resampled(true);
        assert_eq!(asserted(&intx), 0);
    }
}
