//! Legacy PC devices on the PIO bus: the COM1 UART, the i8042 (for its reset line), the CMOS
//! real-time clock, and the ACPI sleep registers of a hardware-reduced platform; and, on the MMIO
//! bus, the ACPI Generic Event Device with the power button.
//!
//! None of them needs a lock of its own: they are reached only through the bus, with the global
//! lock held (see [`crate::bus`]). They tell the rest of the VMM about events through an irqfd
//! (an interrupt) or a [`GuestExit`] (a reset or power-off), never by calling back into it.

mod acpi_pm;
mod exit;
mod ged;
mod i8042;
mod rtc;
mod serial;

pub use acpi_pm::{AcpiSleep, SLEEP_ENABLE, SLEEP_TYPE_S5};
pub use exit::{GuestExit, GuestExitKind};
pub use ged::{Ged, GED_EVENT_POWER_BUTTON, GED_MMIO_SIZE};
pub use i8042::I8042;
pub use rtc::Rtc;
pub use serial::Serial;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// A device made of one-byte registers at consecutive ports, as every legacy device here is.
/// On the bus, a wider access reads the register into the low byte (zeros above) and writes the
/// low byte.
pub trait ByteRegisters: Send + 'static {
    /// The register at `offset`.
    fn read_byte(&mut self, offset: u8) -> u8;
    /// Writes `value` to the register at `offset`.
    fn write_byte(&mut self, offset: u8, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = u8::try_from(offset).map_or(0xff, |o| self.read_byte(o));
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            self.write_byte(offset, value);
        }
    }
}

/// An eventfd that a vm-superio device signals for its interrupt line (an irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight byte registers.
    struct Regs([u8; 8]);

    impl ByteRegisters for Regs {
        fn read_byte(&mut self, offset: u8) -> u8 {
            self.0[usize::from(offset)]
        }
        fn write_byte(&mut self, offset: u8, value: u8) {
            self.0[usize::from(offset)] = value;
        }
    }

    #[test]
    fn wide_accesses_use_the_low_byte() {
        let mut regs = Regs([0; 8]);
        regs.write(3, &[0x12, 0x34]);
        assert_eq!(regs.0[3..5], [0x12, 0]);
        let mut data = [0xaa; 4];
        regs.read(3, &mut data);
        assert_eq!(data, [0x12, 0, 0, 0]);
        regs.write(2, &[]);
        assert_eq!(regs.0, [0, 0, 0, 0x12, 0, 0, 0, 0]);
    }
}
