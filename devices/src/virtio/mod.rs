//! Virtio devices: the transports (virtio-mmio on the shared MMIO bus, virtio-pci on the PCI
//! bus, both over the state of `transport.rs`), the interface a device behind them implements,
//! and the interrupt state both sides share (one line, or a vector per queue on virtio-pci).
//!
//! Threads and locks (docs/DESIGN.md, "Threads and locks"): a device lives in a context (the main
//! loop's or an iothread's), or in several (its queues spread over iothreads), where its queue
//! notifications and completions are handled. vCPUs reach it through the transport:
//! configuration-space writes, activation and reset acquire the device's contexts first (in
//! lock order); configuration-space reads do not (the device serves them from state
//! any thread may read), and interrupt status and acknowledge are the atomics of [`Interrupt`],
//! read and cleared without it.

pub mod block;
mod mmio;
mod pci;
mod transport;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::context::Context;

pub use mmio::{MmioTransport, MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
pub use pci::{PciWiring, VirtioPciTransport, BAR_SIZE as PCI_BAR_SIZE, NO_VECTOR};

/// The one guest memory type of the VMM (no dirty-page tracking).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Device status bits (virtio 1.2, 2.1 "Device Status Field").
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive it.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error the driver must reset it to recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Feature bits common to every device (virtio 1.2, 6 "Reserved Feature Bits").
pub mod features {
    /// Indirect descriptor tables (2.7.5.3).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression (2.7.7, 2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Compliance with virtio 1.x (the only mode offered: no legacy interface).
    pub const VERSION_1: u64 = 1 << 32;
}

/// InterruptStatus bits (virtio 1.2, 4.2.2 "MMIO Device Register Layout").
pub mod interrupt_status {
    /// A used buffer notification.
    pub const VRING: u32 = 1;
    /// A configuration change notification.
    pub const CONFIG: u32 = 2;
}

/// Errors of creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Creating a queue's notification eventfd failed.
    #[error("cannot create the notification eventfd of queue {0}")]
    QueueEventFd(usize, #[source] io::Error),
    /// Creating the interrupt's eventfd failed.
    #[error("cannot create the interrupt eventfd")]
    Irqfd(#[source] io::Error),
    /// The PCI function could not be built (its BAR, capabilities or MSI-X vectors).
    #[error("cannot build the PCI function")]
    Pci(#[source] crate::pci::PciError),
    /// The INTx line's resample eventfd could not be watched in the device's context.
    #[error("cannot watch the INTx resample eventfd")]
    Context(#[source] crate::context::Error),
}

/// Errors of activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Cloning a queue's notification eventfd failed.
    #[error("cannot clone the notification eventfd of queue {0}")]
    CloneEventFd(usize, #[source] io::Error),
    /// Registering a file descriptor with the device's context failed.
    #[error("cannot register with context")]
    Register(#[source] crate::context::Error),
    /// The device's maximum queue size is not a power of two up to 32768.
    #[error("invalid maximum queue size {0}")]
    QueueSize(u16),
    /// The transport gave another number of queues than the device has.
    #[error("the device has {expected} queues, not {given}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport gave.
        given: usize,
    },
    /// The device is already active.
    #[error("device already active")]
    AlreadyActive,
}

/// Where an [`Interrupt`] with vectors sends its notifications: the transport maps the cause (a
/// queue, or a configuration change) to one of its vectors (MSI-X on PCI) and signals it.
/// Called in the device's context, from any thread; it must not block.
pub trait InterruptVectors: Send + Sync + std::fmt::Debug {
    /// A used buffer notification of queue `queue`.
    fn queue(&self, queue: usize);
    /// A configuration change notification.
    fn config(&self);
}

/// How an [`Interrupt`] reaches the guest.
#[derive(Debug)]
enum Line {
    /// One line for every cause: an eventfd the vmm registers with KVM as an irqfd.
    Pin(EventFd),
    /// A vector per cause, chosen by the transport.
    Vectors(Arc<dyn InterruptVectors>),
}

/// A device's interrupts and status, shared by the device (which raises them from its context)
/// and the transport (which vCPUs read and acknowledge the status through, without the context).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Line,
}

impl Interrupt {
    /// A new interrupt with one line, an eventfd (the vmm registers it with KVM as an irqfd).
    pub fn new() -> Result<Self, io::Error> {
        Ok(Self::with_line(Line::Pin(EventFd::new(EFD_NONBLOCK)?)))
    }

    /// A new interrupt whose notifications go to `vectors`.
    pub fn with_vectors(vectors: Arc<dyn InterruptVectors>) -> Self {
        Self::with_line(Line::Vectors(vectors))
    }

    fn with_line(line: Line) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    /// The eventfd to register with KVM as this device's irqfd, for an interrupt with one line.
    pub fn irqfd(&self) -> Option<&EventFd> {
        match &self.line {
            Line::Pin(fd) => Some(fd),
            Line::Vectors(_) => None,
        }
    }

    /// Sets `bits` in the status and signals the line or the vector of `queue` (None: the
    /// configuration vector).
    fn raise(&self, bits: u32, queue: Option<usize>) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        match (&self.line, queue) {
            (Line::Pin(fd), _) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("cannot signal a virtio interrupt: {e}");
                }
            }
            (Line::Vectors(v), Some(queue)) => v.queue(queue),
            (Line::Vectors(v), None) => v.config(),
        }
    }

    /// Signals a used buffer notification of queue `queue`.
    pub fn signal_used_queue(&self, queue: usize) {
        self.raise(interrupt_status::VRING, Some(queue));
    }

    /// Signals a configuration change (virtio 1.2, 4.2.2: InterruptStatus bit 1): the device's
    /// configuration space changed (a disk grew).
    pub fn signal_config_change(&self) {
        self.raise(interrupt_status::CONFIG, None);
    }

    /// Puts the device in DEVICE_NEEDS_RESET and signals a configuration change, as virtio 1.2,
    /// 2.1.2 asks of a device that hit an error.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.raise(interrupt_status::CONFIG, None);
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// InterruptStatus, as a vCPU reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Reads and clears the status at once (the virtio-pci ISR, 4.1.4.5).
    pub fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::AcqRel)
    }

    /// Clears everything (device reset).
    fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// What a device receives when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them (ready or not), in index order.
    pub queues: Vec<Queue>,
    /// Each queue's notification eventfd (the ioeventfd the vmm registered, or the one the
    /// transport writes on a QueueNotify exit).
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport. The transport calls `write_config`, `activate` and `reset`
/// with every one of the device's contexts held by the calling thread, and `read_config` without
/// them.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device id (virtio 1.2, 5 "Device Types").
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The contexts the device is served in, in lock order
    /// ([`crate::context::in_lock_order`]): one, or one per iothread serving some of its queues.
    fn contexts(&self) -> &[Arc<Context>];
    /// Reads device configuration space at `offset`; bytes past its end read as zero. Called
    /// without the context, from any vCPU: configuration space must be readable without it.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`.
    fn write_config(&self, offset: u64, data: &[u8]);
    /// ConfigGeneration (virtio 1.2, 2.5.1): changes whenever configuration space does, after
    /// the new values are readable, so a driver that reads it before and after a configuration
    /// read knows whether it read one consistent version. Read without the context. A device
    /// whose configuration space never changes keeps the default, 0.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts the device with the driver's queues.
    fn activate(&self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and drains its in-flight requests, back to the state before activation.
    fn reset(&self);
}
