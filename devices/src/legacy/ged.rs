//! The ACPI Generic Event Device (ACPI 6.5, section 5.6.9, `ACPI0013`), carrying the power
//! button's events on a hardware-reduced platform, which has no fixed power button.
//!
//! One 32-bit register, the event selector, at offset 0 of a small MMIO window: each bit is a
//! pending event, and a read returns the pending events and clears them. Pressing the button sets
//! [`GED_EVENT_POWER_BUTTON`] and pulses the device's interrupt (an irqfd, declared edge-triggered
//! in the DSDT). The guest's `_EVT` method (in the DSDT the VMM builds) reads the selector and
//! notifies the `PNP0C0C` button device, which the guest's `button` driver turns into a
//! KEY_POWER event. The layout is QEMU's GED event selector (`hw/acpi/generic_event_device.c`).

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Event selector bit of the power button (QEMU's `ACPI_GED_PWR_DOWN_EVT`).
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 1;
/// Size of the event selector register, the whole MMIO window.
pub const GED_MMIO_SIZE: u64 = 4;

/// The Generic Event Device on the MMIO bus.
#[derive(Debug)]
pub struct Ged {
    /// Events not read by the guest yet.
    pending: u32,
    /// The device's interrupt (an irqfd).
    irq: EventFd,
}

impl Ged {
    /// A device that raises `irq` for its events.
    pub fn new(irq: EventFd) -> Self {
        Self { pending: 0, irq }
    }

    /// Presses the power button: the guest sees a power-button event (and, with a handler such
    /// as acpid, shuts down).
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.pending |= GED_EVENT_POWER_BUTTON;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        }
    }

    /// The event selector is read-only.
    fn write(&mut self, _: u64, _: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_press_raises_the_interrupt_and_a_read_clears_it() {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut ged = Ged::new(irq.try_clone().expect("clone"));
        let mut sel = [0xff; 4];
        ged.read(0, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 0);
        ged.press_power_button().expect("irq signalled");
        assert_eq!(irq.read().expect("irq raised"), 1);
        // A narrower read does not consume the event.
        let mut byte = [0xff];
        ged.read(0, &mut byte);
        assert_eq!(byte, [0]);
        ged.read(0, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), GED_EVENT_POWER_BUTTON);
        ged.read(0, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 0, "cleared by the read");
    }
}
