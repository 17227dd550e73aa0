//! PCI: a root complex with one bus that the guest reaches through ECAM (the memory-mapped
//! configuration space of PCIe), functions with a type 0 configuration space and memory BARs (32-
//! or 64-bit) the VMM places and the guest may move, and MSI-X.
//!
//! - [`config`]: one function's configuration space (header, capabilities, BAR sizing).
//! - [`msix`]: the MSI-X capability, table and pending bits, delivered through irqfds whose GSIs
//!   the vmm routes to the guest's messages.
//! - [`intx`]: the legacy INTx line, for a guest that leaves MSI-X off: a level-triggered irqfd
//!   with a resample eventfd.
//! - [`root`]: the bus: the host bridge at 00.0, the functions in the other slots, the ECAM window
//!   and the BAR window, both on the shared MMIO bus (vCPUs reach them without the global lock),
//!   and the configuration mechanism #1 ports (0xCF8), on the PIO bus.
//!
//! A function is a [`PciDevice`]: it keeps its configuration space behind its own lock, and the
//! root only finds which function an access is for.

use vmm_sys_util::eventfd::EventFd;

pub mod config;
pub mod intx;
pub mod msix;
pub mod root;

pub use config::{Bar, BarMove, ConfigSpace, PciIds, CONFIG_SPACE_SIZE};
pub use intx::Intx;
pub use msix::{MsiMessage, MsiRoutes, Msix};
pub use root::{PciBars, PciConfigIo, PciEcam, PciRoot, ECAM_BUS_SIZE, SLOTS};

/// Errors of building PCI functions and the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A BAR that is no power of two of at least 16 bytes, misaligned, past 4 GiB for a 32-bit
    /// BAR, or on registers already taken.
    #[error("cannot place BAR {index} of {size:#x} bytes at {address:#x}")]
    Bar {
        /// The BAR register.
        index: usize,
        /// Its size.
        size: u64,
        /// Where it was to go.
        address: u64,
    },
    /// The capabilities do not fit in the first 256 bytes.
    #[error("no room for capability {id:#x}")]
    CapabilitySpace {
        /// The capability id.
        id: u8,
    },
    /// An MSI-X table of no vector or more than 2048.
    #[error("invalid MSI-X vector count {0}")]
    VectorCount(u16),
    /// Creating a vector's or the INTx line's eventfd failed.
    #[error("cannot create an interrupt eventfd")]
    Irqfd(#[source] std::io::Error),
    /// Every slot of the bus is taken.
    #[error("no free PCI slot")]
    BusFull,
}

/// The VM's ioeventfds, as the vmm registers them with KVM: a guest write of any width and value
/// at `addr` signals `fd` in the kernel, with no exit. A function moves its own with the BAR
/// they are in.
pub trait Ioevents: Send + Sync + std::fmt::Debug {
    /// Signals `fd` on writes at `addr`.
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), std::io::Error>;
    /// Undoes [`register`](Self::register) of `fd` at `addr`.
    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), std::io::Error>;
}

/// A PCI function on the root bus. It guards its own state: vCPUs call it without the global lock,
/// several at once.
pub trait PciDevice: Send + Sync {
    /// A guest read of configuration space at `offset` (below [`CONFIG_SPACE_SIZE`]).
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// A guest write of configuration space at `offset`.
    fn write_config(&self, offset: usize, data: &[u8]);
    /// The BAR holding `[addr, addr + len)` now, if the function decodes memory: its index and
    /// the offset of `addr` in it.
    fn bar_at(&self, addr: u64, len: u64) -> Option<(usize, u64)>;
    /// A guest read of `data.len()` bytes at `offset` in BAR `bar`.
    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` in BAR `bar`.
    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]);
}
