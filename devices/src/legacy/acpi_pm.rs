//! The sleep control and status registers of a hardware-reduced ACPI platform.
//!
//! Hardware-reduced ACPI (ACPI 6.5, section 4.1) has no PM1 blocks; the FADT points at a sleep
//! control register and a sleep status register instead (section 4.8.3.7). To power off, the
//! guest writes `SLP_TYPx << 2 | SLP_EN` to the control register, with `SLP_TYPx` taken from the
//! `\_S5_` package of the DSDT. This device owns both registers, one byte each (control at offset
//! 0, status at offset 1), and turns an S5 request into a request to end the VM.

use super::{ByteRegisters, GuestExit, GuestExitKind};

/// `SLP_EN`, bit 5 of the sleep control register (ACPI 6.5, table 4.20).
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// Mask of `SLP_TYPx`, bits 4:2 of the sleep control register (ACPI 6.5, table 4.20).
const SLEEP_TYPE_MASK: u8 = 0b1_1100;
/// The `SLP_TYPx` value our DSDT gives `\_S5_` (soft off).
pub const SLEEP_TYPE_S5: u8 = 5;
/// `WAK_STS`, bit 7 of the sleep status register (ACPI 6.5, table 4.21).
const WAKE_STATUS: u8 = 1 << 7;

/// The two sleep registers on the PIO bus.
#[derive(Debug)]
pub struct AcpiSleep {
    exit: GuestExit,
}

impl AcpiSleep {
    /// Registers that request a power-off through `exit` when the guest enters S5.
    pub fn new(exit: GuestExit) -> Self {
        Self { exit }
    }
}

impl ByteRegisters for AcpiSleep {
    fn read_byte(&mut self, offset: u8) -> u8 {
        // The status register reads as "woken", so a guest that polls it after a sleep request we
        // do not support (S1 to S4) does not spin.
        if offset == 1 {
            WAKE_STATUS
        } else {
            0
        }
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        if offset != 0 || value & SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (value & SLEEP_TYPE_MASK) >> 2;
        if sleep_type == SLEEP_TYPE_S5 {
            log::info!("ACPI: the guest entered S5 (soft off)");
            if let Err(e) = self.exit.request(GuestExitKind::PowerOff) {
                log::error!("ACPI: cannot signal the power-off request: {e}");
            }
        } else {
            log::warn!("ACPI: sleep type {sleep_type} requested, only S5 (off) is supported");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    #[test]
    fn only_s5_with_sleep_enable_ends_the_vm() {
        let exit = GuestExit::new().expect("eventfd");
        let mut dev = AcpiSleep::new(exit.clone());
        dev.write(0, &[SLEEP_TYPE_S5 << 2]);
        assert_eq!(exit.requested(), None, "SLP_EN clear");
        dev.write(0, &[(3 << 2) | SLEEP_ENABLE]);
        assert_eq!(exit.requested(), None, "S3 is not supported");
        dev.write(1, &[(SLEEP_TYPE_S5 << 2) | SLEEP_ENABLE]);
        assert_eq!(exit.requested(), None, "status register");
        dev.write(0, &[(SLEEP_TYPE_S5 << 2) | SLEEP_ENABLE]);
        assert_eq!(exit.requested(), Some(GuestExitKind::PowerOff));
        assert_eq!(exit.event().read().expect("exit signalled"), 1);
        let mut status = [0];
        dev.read(1, &mut status);
        assert_eq!(status, [WAKE_STATUS]);
    }
}
