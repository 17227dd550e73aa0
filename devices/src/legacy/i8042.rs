//! The i8042 keyboard controller, kept for its CPU reset line.
//!
//! Linux reboots an x86 machine by writing the "pulse reset line" command (0xFE) to the
//! controller's command port (`arch/x86/kernel/reboot.c`, `BOOT_KBD`); this device turns that
//! command into a request to end the VM, as QEMU does with `-no-reboot`. The controller itself
//! comes from vm-superio: a status register that always reads as idle (so the guest's wait for an
//! empty input buffer ends at once) and the reset command. It owns ports 0x60 to 0x64; the data
//! port is offset 0 and the command/status port offset 4.

use vm_superio::I8042Device;

use super::{ByteRegisters, EventFdTrigger};

/// The i8042 controller on the PIO bus.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `exit` when the guest asks for a CPU reset.
    pub fn new(exit: EventFdTrigger) -> Self {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals_exit() {
        let exit = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(EventFdTrigger(exit.try_clone().expect("clone")));
        // Status reads as idle: the guest's kb_wait() ends at once.
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        // Another command does nothing.
        dev.write(4, &[0xd1]);
        assert!(exit.read().is_err(), "no exit for a non-reset command");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.read().expect("exit signalled"), 1);
    }
}
