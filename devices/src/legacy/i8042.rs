//! The i8042 keyboard controller, kept for its CPU reset line.
//!
//! Linux reboots an x86 machine by writing the "pulse reset line" command (0xFE) to the
//! controller's command port (`arch/x86/kernel/reboot.c`, `BOOT_KBD`); this device turns that
//! command into a request to end the VM, as QEMU does with `-no-reboot`. The controller itself
//! comes from vm-superio: a status register that always reads as idle (so the guest's wait for an
//! empty input buffer ends at once) and the reset command. It owns ports 0x60 to 0x64; the data
//! port is offset 0 and the command/status port offset 4.

use vm_superio::I8042Device;

/// The "pulse output line 0" (CPU reset) command of the command port.
const CMD_RESET_CPU: u8 = 0xfe;

use super::{ByteRegisters, GuestExit};

/// The i8042 controller on the PIO bus.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<GuestExit>,
}

impl I8042 {
    /// A controller that requests a reset through `exit` when the guest pulses the reset line.
    pub fn new(exit: GuestExit) -> Self {
        Self {
            inner: I8042Device::new(exit),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_byte(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            log::error!("i8042: cannot signal the reset request: {e}");
        }
        if offset == 4 && value == CMD_RESET_CPU {
            log::info!("i8042: the guest pulsed the CPU reset line");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::legacy::GuestExitKind;

    #[test]
    fn reset_command_signals_exit() {
        let exit = GuestExit::new().expect("eventfd");
        let mut dev = I8042::new(exit.clone());
        // Status reads as idle: the guest's kb_wait() ends at once.
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        // Another command does nothing.
        dev.write(4, &[0xd1]);
        assert_eq!(exit.requested(), None, "no exit for a non-reset command");
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(exit.requested(), Some(GuestExitKind::Reset));
        assert_eq!(exit.event().read().expect("exit signalled"), 1);
    }
}
