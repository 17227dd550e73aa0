//! Legacy PC devices on the PIO bus: the COM1 UART, the i8042 (for its reset line), the CMOS
//! real-time clock, and the ACPI sleep registers of a hardware-reduced platform.
//!
//! None of them needs a lock of its own: they are reached only through the bus, with the global
//! lock held (see [`crate::bus`]). They tell the rest of the VMM about events through eventfds
//! (an irqfd for an interrupt, the VM's exit eventfd for a reset or power-off), never by calling
//! back into it.

mod acpi_pm;
mod i8042;
mod rtc;
mod serial;

pub use acpi_pm::{AcpiSleep, SLEEP_ENABLE, SLEEP_TYPE_S5};
pub use i8042::I8042;
pub use rtc::Rtc;
pub use serial::Serial;

use vmm_sys_util::eventfd::EventFd;

/// An eventfd that vm-superio devices signal (an interrupt line or the VM's exit request).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
