//! The COM1 16550A UART: the guest's console.
//!
//! The register model comes from vm-superio. Output goes to a writer (the VMM's stdout); input
//! arrives from the main loop through [`Serial::enqueue`], at most a FIFO's worth (64 bytes) at a
//! time: when the guest has read the FIFO empty, the UART signals an eventfd so that the main loop
//! sends what it kept back. The interrupt goes out through an eventfd that the VMM registers as an
//! irqfd for the UART's ISA line (IRQ 4), so raising it needs no ioctl and no lock. It owns ports
//! 0x3F8 to 0x3FF, one register per offset.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use super::{ByteRegisters, EventFdTrigger};

/// Where the UART's output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Signals an eventfd when the guest has read the last byte of the receive FIFO.
struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("serial: cannot signal that the input FIFO is empty: {e}");
        }
    }
}

/// The UART on the PIO bus.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, InputDrained, SerialOutput>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART that raises `interrupt`, writes what the guest sends to `out`, and signals
    /// `input_drained` each time the guest has read its receive FIFO empty.
    pub fn new(interrupt: EventFdTrigger, out: SerialOutput, input_drained: EventFd) -> Self {
        Self {
            inner: vm_superio::Serial::with_events(interrupt, InputDrained(input_drained), out),
        }
    }

    /// Queues bytes typed on the console for the guest; returns how many fit in the receive
    /// FIFO (the rest are the caller's to keep or drop).
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        if input.is_empty() || self.inner.fifo_capacity() == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::error!("serial: cannot queue input: {e}");
                0
            }
        }
    }
}

impl ByteRegisters for Serial {
    fn read_byte(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            log::error!("serial: write of {value:#x} at offset {offset}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A writer the test can look into after the UART took it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_with_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let drained = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let out = Captured::default();
        let mut uart = Serial::new(
            EventFdTrigger(irq.try_clone().expect("clone")),
            Box::new(out.clone()),
            drained.try_clone().expect("clone"),
        );
        uart.write(0, b"h");
        uart.write(0, b"i");
        assert_eq!(*out.0.lock().expect("not poisoned"), b"hi");
        // Enable the received-data interrupt (IER bit 0), then type a byte.
        uart.write(1, &[1]);
        assert_eq!(uart.enqueue(b"x"), 1);
        assert_eq!(irq.read().expect("interrupt raised"), 1);
        let mut lsr = [0];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0];
        uart.read(0, &mut rbr);
        assert_eq!(rbr, *b"x");
        assert_eq!(drained.read().expect("FIFO read empty"), 1);
        // A full FIFO takes no more.
        assert_eq!(uart.enqueue(&[b'y'; 100]), 64);
        assert_eq!(uart.enqueue(b"z"), 0);
    }
}
