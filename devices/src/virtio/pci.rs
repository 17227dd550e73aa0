//! The virtio-pci transport, modern interface only (virtio 1.2, 4.1 "Virtio Over PCI Bus"): a PCI
//! function whose one 64-bit memory BAR (registers 0 and 1) holds the virtio structures its
//! vendor capabilities point at, and the MSI-X table that carries its interrupts, one vector per
//! queue and one for configuration changes.
//!
//! BAR 0 ([`BAR_SIZE`] bytes):
//!
//! | offset   | what                                                                 |
//! |----------|----------------------------------------------------------------------|
//! | 0x0000   | common configuration (4.1.4.3), 0x38 bytes                            |
//! | 0x1000   | ISR status (4.1.4.5), one byte, cleared by reading it                 |
//! | 0x2000   | device configuration (the device's `read_config`/`write_config`)      |
//! | 0x3000   | notifications (4.1.4.4): queue N at 0x3000 + 4 × N (multiplier 4)     |
//! | 0x4000   | the MSI-X table, 16 bytes a vector                                    |
//! | 0x6000   | the MSI-X pending bit array                                           |
//!
//! A fifth vendor capability, `VIRTIO_PCI_CAP_PCI_CFG` (4.1.4.9), is a window into BAR 0 through
//! configuration space: the driver writes a BAR (0), an offset and a length (1, 2 or 4), and its
//! reads and writes of the capability's data are done at that place in the BAR.
//!
//! Each queue's eventfd is an ioeventfd on its notification address
//! ([`VirtioPciTransport::notify_address`], any width, no datamatch), so a vCPU's notification
//! reaches the device's context with no lock at all. The ioeventfds follow BAR 0 as QEMU's memory
//! regions take theirs along: registered (through the vmm's [`Ioevents`]) once the guest turns
//! memory decoding on, moved when it writes the BAR a new address, taken away while decoding is
//! off or the notification region is outside the host bridge's windows (where no access reaches
//! the function). A notification that does reach the transport (an ioeventfd KVM refused)
//! signals the same eventfd.
//!
//! Interrupts: through MSI-X once the guest enables it; until then (a guest that never does:
//! Linux with `pci=nomsi`) through INTA# ([`Intx`], when the vmm gives the function a GSI):
//! each notification sets its bit of the ISR status (bit 0 a queue, bit 1 the configuration)
//! and asserts the level-triggered line; the guest's read of the ISR status clears it, and at
//! the guest's EOI the line is asserted again only if the status is not clear by then (KVM's
//! resample eventfd, watched in the device's first context, so an iothread's disk needs no
//! global lock for it either). The command register's INTx-disable bit gates the line.
//!
//! BAR 0 is 64-bit, as QEMU's modern virtio-pci BAR, but not prefetchable: its reads have side
//! effects (the ISR status clears on read) and it holds the MSI-X table. The vmm places it in the
//! host bridge's 64-bit window above 4 GiB (in the 32-bit one when the machine has none); the
//! guest may move it anywhere.
//!
//! Locking: the transport state (feature selection, queue set-up, status, activation, reset) is
//! the one every transport shares (`transport.rs`: its mutex, then the device's context).
//! Configuration space is behind its own mutex, and MSI-X behind another (order: configuration
//! space, then MSI-X; configuration space, then the ioeventfds' places, whose moves are made
//! with the configuration lock held so that concurrent writes move them in order); the device's
//! context signals vectors through [`Interrupt`] with the MSI-X lock only, and the queues' and
//! configuration's vector numbers are atomics, so neither waits for the transport state. Table
//! writes take the MSI-X lock, never a context.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{half, set_half, Core, State};
use super::{status, GuestMemoryMmap, Interrupt, InterruptVectors, TransportError, VirtioDevice};
use crate::context::Context;
use crate::pci::config::{Bar, ConfigSpace, PciIds};
use crate::pci::intx::{self, Intx};
use crate::pci::msix::{self, MsiRoutes, Msix};
use crate::pci::{Ioevents, PciDevice};

/// Bytes of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Where the notification addresses start in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// The vector number that means "none" (4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_SIZE: u64 = 0x1000;
const TABLE_OFFSET: u64 = 0x4000;
const PBA_OFFSET: u64 = 0x6000;
/// The PCI vendor id of virtio devices, and the first modern device id (0x1040 + type).
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// The vendor-specific capability id that virtio's structures use.
const VENDOR_CAPABILITY: u8 = 0x09;

/// `cfg_type` of the virtio capabilities (4.1.4).
mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// Offsets in the `VIRTIO_PCI_CAP_PCI_CFG` capability (4.1.4.9): the BAR, offset and length the
/// driver picks, then the data window.
mod window {
    pub const BAR: usize = 4;
    pub const OFFSET: usize = 8;
    pub const LENGTH: usize = 12;
    pub const DATA: usize = 16;
}

/// The fields of the common configuration structure (4.1.4.3), by offset.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// The end of the three ring addresses.
    pub const QUEUE_ADDRESS_END: u64 = QUEUE_DEVICE + 8;
}

/// Which vector each cause goes to, and the MSI-X state that sends it; the INTx line that
/// carries them all while MSI-X is off.
#[derive(Debug)]
struct Vectors {
    queues: Vec<AtomicU16>,
    config: AtomicU16,
    msix: Mutex<Msix>,
    intx: Option<Intx>,
}

impl Vectors {
    fn msix(&self) -> MutexGuard<'_, Msix> {
        // MSI-X updates are field stores and one ioctl: nothing panics half-way.
        self.msix.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Back to no vector for anything (device reset, 4.1.5.1.2).
    fn reset(&self) {
        for q in &self.queues {
            q.store(NO_VECTOR, Ordering::Release);
        }
        self.config.store(NO_VECTOR, Ordering::Release);
    }

    /// Sends `vector` through MSI-X when the guest enabled it, else asserts INTx (the cause is
    /// already in the ISR status). Without INTx, MSI-X holds it as pending.
    fn signal(&self, vector: u16) {
        let mut msix = self.msix();
        match &self.intx {
            Some(intx) if !msix.enabled() => {
                drop(msix);
                intx.assert();
            }
            _ => msix.signal(vector),
        }
    }

    /// KVM deasserted the INTx line at the guest's EOI: asserts it again if the ISR status
    /// (`status`) still holds a cause and MSI-X is off.
    fn resampled(&self, status: u32) {
        if let Some(intx) = &self.intx {
            let pending = status != 0 && !self.msix().enabled();
            intx.resampled(pending);
        }
    }
}

impl InterruptVectors for Vectors {
    fn queue(&self, queue: usize) {
        if let Some(v) = self.queues.get(queue) {
            self.signal(v.load(Ordering::Acquire));
        }
    }

    fn config(&self) {
        self.signal(self.config.load(Ordering::Acquire));
    }
}

/// What the vmm gives a transport: where BAR 0 starts, its MSI-X vectors' GSIs and routes, its
/// INTx line's GSI, the VM's ioeventfds and the host bridge's memory windows.
#[derive(Debug)]
pub struct PciWiring {
    /// BAR 0's first address: a multiple of [`BAR_SIZE`] in a window.
    pub bar: u64,
    /// The GSI of vector 0; the others follow.
    pub first_gsi: u32,
    /// The GSI of INTA# (the host bridge's `_PRT` says which), if the function has the pin.
    pub intx_gsi: Option<u32>,
    /// Where the vectors' messages go.
    pub routes: Arc<dyn MsiRoutes>,
    /// Where the queues' ioeventfds are registered.
    pub ioevents: Arc<dyn Ioevents>,
    /// The memory ranges the host bridge forwards to the bus.
    pub windows: Vec<Range<u64>>,
}

/// The queues' ioeventfds and where each is registered now.
#[derive(Debug)]
struct Notifications {
    ioevents: Arc<dyn Ioevents>,
    windows: Vec<Range<u64>>,
    /// Queue N's registered notification address, if any.
    at: Mutex<Vec<Option<u64>>>,
}

impl Notifications {
    /// BAR 0 is now decoded at `bar` (None: nowhere): each queue's ioeventfd leaves its old
    /// address and goes to its notification address there, if the notification region is in a
    /// window. A failure is the guest's doing (two functions' regions on one address): logged,
    /// and that queue's notifications come by exit, or not at all.
    fn follow(&self, fds: &[EventFd], bar: Option<u64>) {
        let region = bar.and_then(|b| {
            let start = b.checked_add(NOTIFY_OFFSET)?;
            let end = start.checked_add(NOTIFY_SIZE)?;
            let inside = |w: &Range<u64>| w.start <= start && end <= w.end;
            self.windows.iter().any(inside).then_some(b)
        });
        let mut at = self.at.lock().unwrap_or_else(PoisonError::into_inner);
        for ((queue, fd), at) in (0u16..).zip(fds).zip(at.iter_mut()) {
            let want = region.map(|b| VirtioPciTransport::notify_address(b, queue));
            if *at == want {
                continue;
            }
            if let Some(old) = at.take() {
                if let Err(e) = self.ioevents.unregister(fd, old) {
                    log::warn!("virtio-pci: queue {queue}'s ioeventfd at {old:#x} stays: {e}");
                }
            }
            if let Some(new) = want {
                match self.ioevents.register(fd, new) {
                    Ok(()) => *at = Some(new),
                    Err(e) => {
                        log::warn!("virtio-pci: no ioeventfd for queue {queue} at {new:#x}: {e}")
                    }
                }
            }
        }
    }
}

/// A virtio-pci transport for one device: a PCI function for [`crate::pci::PciRoot`].
pub struct VirtioPciTransport {
    core: Core,
    config: Mutex<ConfigSpace>,
    notifications: Notifications,
    /// Where the MSI-X capability is in configuration space.
    msix_capability: usize,
    /// Where the `VIRTIO_PCI_CAP_PCI_CFG` capability is.
    window: usize,
    vectors: Arc<Vectors>,
}

impl std::fmt::Debug for VirtioPciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// A virtio capability's body (after its id and next pointer, 4.1.4): length, type, BAR 0, then
/// the structure's offset and length in the BAR, and `extra` (the notify multiplier).
fn virtio_capability(kind: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = u8::try_from(16 + extra.len()).unwrap_or(u8::MAX);
    let mut body = vec![len, kind, 0, 0, 0, 0];
    body.extend(u32::try_from(offset).unwrap_or(0).to_le_bytes());
    body.extend(u32::try_from(length).unwrap_or(0).to_le_bytes());
    body.extend(extra);
    body
}

impl VirtioPciTransport {
    /// A transport for `device` with BAR 0 at `wiring.bar` and one MSI-X vector per queue plus
    /// one for configuration changes, on GSIs `wiring.first_gsi` on. The queues' ioeventfds are
    /// registered once the guest turns memory decoding on.
    pub fn new(
        device: Arc<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        wiring: PciWiring,
    ) -> Result<Self, TransportError> {
        let PciWiring {
            bar: bar_address,
            first_gsi,
            intx_gsi,
            routes,
            ioevents,
            windows,
        } = wiring;
        let queues = device.queue_max_sizes().len();
        let count = u16::try_from(queues + 1)
            .map_err(|_| TransportError::Pci(crate::pci::PciError::VectorCount(u16::MAX)))?;
        let msix = Msix::new(count, first_gsi, routes).map_err(TransportError::Pci)?;
        let device_type = device.device_type();
        // virtio-blk is mass storage (QEMU says SCSI storage); anything else "unclassified".
        let class = if device_type == 2 {
            [0x01, 0x00, 0x00]
        } else {
            [0xff, 0x00, 0x00]
        };
        let ids = PciIds {
            vendor: VIRTIO_VENDOR,
            device: u16::try_from(device_type)
                .ok()
                .and_then(|t| MODERN_DEVICE_BASE.checked_add(t))
                .unwrap_or(MODERN_DEVICE_BASE),
            // Modern-only devices have revision 1 or more (4.1.2.1).
            revision: 1,
            class,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x1100,
        };
        let mut config = ConfigSpace::new(ids);
        let bar = Bar {
            size: BAR_SIZE,
            mem64: true,
        };
        config
            .add_bar(0, bar, bar_address)
            .map_err(TransportError::Pci)?;
        let caps = [
            virtio_capability(cfg_type::COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            virtio_capability(cfg_type::ISR, ISR_OFFSET, 1, &[]),
            virtio_capability(cfg_type::DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]),
            virtio_capability(
                cfg_type::NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for cap in &caps {
            config
                .add_capability(VENDOR_CAPABILITY, cap)
                .map_err(TransportError::Pci)?;
        }
        // The configuration access window: BAR, offset, length and data are the driver's.
        let window = config
            .add_capability(
                VENDOR_CAPABILITY,
                &virtio_capability(cfg_type::PCI_CFG, 0, 0, &[0; 4]),
            )
            .map_err(TransportError::Pci)?;
        config.set_writable(window + window::BAR, &[0xff]);
        config.set_writable(window + window::OFFSET, &[0xff; 12]);
        let table = u32::try_from(TABLE_OFFSET).unwrap_or(0);
        let pba = u32::try_from(PBA_OFFSET).unwrap_or(0);
        let msix_capability = config
            .add_capability(msix::CAPABILITY_ID, &msix.capability(0, table, pba))
            .map_err(TransportError::Pci)?;
        config.set_writable(msix_capability + 2, &Msix::CONTROL_WRITABLE.to_le_bytes());
        let intx = intx_gsi
            .map(Intx::new)
            .transpose()
            .map_err(TransportError::Pci)?;
        if intx.is_some() {
            config.set_interrupt_pin(intx::PIN_INTA);
        }
        let vectors = Arc::new(Vectors {
            queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config: AtomicU16::new(NO_VECTOR),
            msix: Mutex::new(msix),
            intx,
        });
        let interrupt = Interrupt::with_vectors(Arc::clone(&vectors) as Arc<dyn InterruptVectors>);
        let core = Core::new("virtio-pci", device, mem, interrupt)?;
        Self::watch_resample(&core, &vectors)?;
        Ok(VirtioPciTransport {
            core,
            config: Mutex::new(config),
            notifications: Notifications {
                ioevents,
                windows,
                at: Mutex::new(vec![None; queues]),
            },
            msix_capability,
            window,
            vectors,
        })
    }

    /// Watches the INTx line's resample eventfd, if any, in the device's first context: at each
    /// EOI of the line, it is asserted again while the ISR status holds a cause. The handler
    /// stays for the context's life; it holds the status and the vectors, not the device.
    fn watch_resample(core: &Core, vectors: &Arc<Vectors>) -> Result<(), TransportError> {
        let (Some(intx), Some(ctx)) = (&vectors.intx, core.device.contexts().first()) else {
            return Ok(());
        };
        let (interrupt, handler_vectors) = (Arc::clone(&core.interrupt), Arc::clone(vectors));
        let _held = ctx.acquire();
        ctx.add_fd(
            intx.resample_fd().as_raw_fd(),
            EventSet::IN,
            Arc::new(move |_: &Context, _| handler_vectors.resampled(interrupt.status())),
        )
        .map(drop)
        .map_err(TransportError::Context)
    }

    /// The BAR 0 access the configuration window selects (4.1.4.9): its offset and length, when
    /// the driver chose BAR 0, a length of 1, 2 or 4 and an offset aligned to it.
    fn window_access(&self, config: &ConfigSpace) -> Option<(u64, usize)> {
        let mut b = [0u8; 4];
        config.read(self.window + window::BAR, &mut b[..1]);
        let bar = b[0];
        config.read(self.window + window::OFFSET, &mut b);
        let offset = u32::from_le_bytes(b);
        config.read(self.window + window::LENGTH, &mut b);
        let len = u32::from_le_bytes(b);
        let ok = bar == 0 && matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len);
        Some((u64::from(offset), usize::try_from(len).ok()?)).filter(|_| ok)
    }

    /// Whether `[offset, offset + len)` of configuration space touches the window's data.
    fn touches_window_data(&self, offset: usize, len: usize) -> bool {
        let data = self.window + window::DATA;
        offset < data + 4 && offset.saturating_add(len) > data
    }

    /// Queue `queue`'s notification address when BAR 0 is at `bar_address`.
    pub fn notify_address(bar_address: u64, queue: u16) -> u64 {
        bar_address + NOTIFY_OFFSET + u64::from(queue) * u64::from(NOTIFY_MULTIPLIER)
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.core.interrupt
    }

    /// The INTx line's GSI, and copies of its irqfd and resample eventfd, to register with KVM
    /// as a resampling irqfd; None for a function without INTx.
    pub fn intx_irqfd(&self) -> Option<Result<(u32, EventFd, EventFd), std::io::Error>> {
        let intx = self.vectors.intx.as_ref()?;
        let fds = intx.irqfd().try_clone().and_then(|irqfd| {
            let resample = intx.resample_fd().try_clone()?;
            Ok((intx.gsi(), irqfd, resample))
        });
        Some(fds)
    }

    /// Each MSI-X vector's GSI and a copy of its eventfd, to register with KVM as its irqfd.
    pub fn vector_irqfds(&self) -> Result<Vec<(u32, EventFd)>, std::io::Error> {
        self.vectors
            .msix()
            .irqfds()
            .map(|(gsi, fd)| Ok((gsi, fd.try_clone()?)))
            .collect()
    }

    fn config_space(&self) -> MutexGuard<'_, ConfigSpace> {
        // Configuration space updates are byte stores: nothing panics half-way.
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vector_count(&self) -> u16 {
        u16::try_from(self.vectors.queues.len() + 1).unwrap_or(u16::MAX)
    }

    /// A vector number the driver wrote: itself if the function has it, NO_VECTOR otherwise
    /// (the driver reads it back to learn that the assignment failed, 4.1.5.1.2).
    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.vector_count() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        let state = self.core.state();
        let sel = usize::try_from(state.queue_sel).unwrap_or(usize::MAX);
        let selected = state
            .queues
            .get(sel)
            .copied()
            .zip(self.core.device.queue_max_sizes().get(sel).copied());
        let value: u64 = match (offset, len) {
            (common::DEVICE_FEATURE_SELECT, 4) => u64::from(state.device_features_sel),
            (common::DEVICE_FEATURE, 4) => match state.device_features_sel {
                0 => u64::from(half(self.core.device.features(), false)),
                1 => u64::from(half(self.core.device.features(), true)),
                _ => 0,
            },
            (common::DRIVER_FEATURE_SELECT, 4) => u64::from(state.driver_features_sel),
            (common::DRIVER_FEATURE, 4) => match state.driver_features_sel {
                0 => u64::from(half(state.driver_features, false)),
                1 => u64::from(half(state.driver_features, true)),
                _ => 0,
            },
            (common::CONFIG_MSIX_VECTOR, 2) => {
                u64::from(self.vectors.config.load(Ordering::Acquire))
            }
            (common::NUM_QUEUES, 2) => u64::try_from(state.queues.len()).unwrap_or(0),
            (common::DEVICE_STATUS, 1) => u64::from(self.core.status(&state) & 0xff),
            (common::CONFIG_GENERATION, 1) => {
                u64::from(self.core.device.config_generation() & 0xff)
            }
            (common::QUEUE_SELECT, 2) => u64::from(state.queue_sel & 0xffff),
            (common::QUEUE_SIZE, 2) => selected.map_or(0, |(q, max)| {
                u64::from(if q.size == 0 { max } else { q.size })
            }),
            (common::QUEUE_MSIX_VECTOR, 2) => self
                .vectors
                .queues
                .get(sel)
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::Acquire))
                }),
            (common::QUEUE_ENABLE, 2) => selected.map_or(0, |(q, _)| u64::from(q.ready)),
            // Queue N's notification address is N × the multiplier into the region.
            (common::QUEUE_NOTIFY_OFF, 2) => selected.map_or(0, |_| u64::from(state.queue_sel)),
            (common::QUEUE_DESC..common::QUEUE_ADDRESS_END, 4 | 8) => {
                return Self::read_queue_address(&state, sel, offset, data)
            }
            _ => {
                log::warn!("virtio-pci: ignored {len}-byte read at {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..len]);
    }

    /// Reads one of the selected queue's ring addresses, whole or a 32-bit half.
    fn read_queue_address(state: &State, sel: usize, offset: u64, data: &mut [u8]) {
        let Some(q) = state.queues.get(sel) else {
            return;
        };
        let value = match offset - offset % 8 {
            common::QUEUE_DESC => q.desc,
            common::QUEUE_DRIVER => q.driver,
            _ => q.device,
        };
        let high = offset % 8 == 4;
        match data.len() {
            8 if !high => data.copy_from_slice(&value.to_le_bytes()),
            4 => data.copy_from_slice(&half(value, high).to_le_bytes()),
            _ => {}
        }
    }

    fn write_common(&self, offset: u64, data: &[u8]) {
        let len = data.len();
        let mut bytes = [0u8; 8];
        let Some(dst) = bytes.get_mut(..len) else {
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        if (offset, len) == (common::DEVICE_STATUS, 1) {
            let status = u32::try_from(value).unwrap_or(0);
            self.core.write_status(status);
            if status == 0 {
                self.vectors.reset();
            }
            return;
        }
        let mut state = self.core.state();
        if state.resetting {
            log::warn!("virtio-pci: write {value:#x} at {offset:#x} ignored during a reset");
            return;
        }
        let setting_up = state.status & status::DRIVER_OK == 0;
        let sel = usize::try_from(state.queue_sel).unwrap_or(usize::MAX);
        let value32 = u32::try_from(value & 0xffff_ffff).unwrap_or(0);
        let value16 = u16::try_from(value & 0xffff).unwrap_or(0);
        match (offset, len) {
            (common::DEVICE_FEATURE_SELECT, 4) => state.device_features_sel = value32,
            (common::DRIVER_FEATURE_SELECT, 4) => state.driver_features_sel = value32,
            (common::DRIVER_FEATURE, 4)
                if setting_up && state.status & status::FEATURES_OK == 0 =>
            {
                match state.driver_features_sel {
                    0 => set_half(&mut state.driver_features, value32, false),
                    1 => set_half(&mut state.driver_features, value32, true),
                    _ => {}
                }
            }
            (common::CONFIG_MSIX_VECTOR, 2) => self
                .vectors
                .config
                .store(self.valid_vector(value16), Ordering::Release),
            (common::QUEUE_SELECT, 2) => state.queue_sel = u32::from(value16),
            (common::QUEUE_MSIX_VECTOR, 2) => {
                if let Some(v) = self.vectors.queues.get(sel) {
                    v.store(self.valid_vector(value16), Ordering::Release);
                }
            }
            (common::QUEUE_SIZE, 2) if setting_up => {
                if let Some(q) = state.queues.get_mut(sel) {
                    q.size = value16;
                }
            }
            (common::QUEUE_ENABLE, 2) if setting_up && value16 == 1 => {
                let max = self.core.device.queue_max_sizes().get(sel).copied();
                if let Some((q, max)) = state.queues.get_mut(sel).zip(max) {
                    q.ready = true;
                    if q.size == 0 {
                        q.size = max;
                    }
                }
            }
            (common::QUEUE_DESC..common::QUEUE_ADDRESS_END, 4 | 8) if setting_up => {
                if let Some(q) = state.queues.get_mut(sel) {
                    let field = match offset - offset % 8 {
                        common::QUEUE_DESC => &mut q.desc,
                        common::QUEUE_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    let high = offset % 8 == 4;
                    match len {
                        8 if !high => *field = value,
                        4 => set_half(field, value32, high),
                        _ => {}
                    }
                }
            }
            _ => log::warn!("virtio-pci: ignored {len}-byte write {value:#x} at {offset:#x}"),
        }
    }
}

impl PciDevice for VirtioPciTransport {
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let access = {
            let config = self.config_space();
            config.read(offset, data);
            self.window_access(&config)
        };
        // A read of the window's data reads BAR 0 there (without the configuration lock: the
        // BAR's structures take their own).
        if let Some((bar_offset, len)) =
            access.filter(|_| self.touches_window_data(offset, data.len()))
        {
            let mut bytes = [0u8; 4];
            self.read_bar(0, bar_offset, &mut bytes[..len]);
            let data_start = self.window + window::DATA;
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(k) = (offset + i).checked_sub(data_start).filter(|&k| k < 4) {
                    *b = bytes[k];
                }
            }
        }
    }

    fn write_config(&self, offset: usize, data: &[u8]) {
        let window_write = {
            let mut config = self.config_space();
            for moved in config.write(offset, data) {
                if moved.index == 0 {
                    self.notifications.follow(&self.core.queue_events, moved.to);
                }
            }
            // Message control of MSI-X: the enable and function-mask bits.
            let control = self.msix_capability + 2;
            let end = offset.saturating_add(data.len());
            let mut intx_now = false;
            if offset < control + 2 && end > control {
                let mut b = [0u8; 2];
                config.read(control, &mut b);
                let mut msix = self.vectors.msix();
                let was = msix.enabled();
                msix.set_control(u16::from_le_bytes(b));
                // MSI-X off again: what is pending goes by INTx.
                intx_now = was && !msix.enabled();
            }
            // The command register's INTx-disable bit; cleared, what is pending goes now.
            if let Some(intx) = &self.vectors.intx {
                intx_now |= intx.set_disabled(config.intx_disabled());
                if intx_now && self.core.interrupt.status() != 0 && !self.vectors.msix().enabled() {
                    intx.assert();
                }
            }
            let mut bytes = [0u8; 4];
            config.read(self.window + window::DATA, &mut bytes);
            self.window_access(&config)
                .filter(|_| self.touches_window_data(offset, data.len()))
                .map(|access| (access, bytes))
        };
        // A write of the window's data writes its first `length` bytes to BAR 0.
        if let Some(((bar_offset, len), bytes)) = window_write {
            self.write_bar(0, bar_offset, &bytes[..len]);
        }
    }

    fn bar_at(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        self.config_space().bar_at(addr, len)
    }

    fn read_bar(&self, _bar: usize, offset: u64, data: &mut [u8]) {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let within =
            |start: u64, size: u64| offset >= start && offset.saturating_add(len) <= start + size;
        if within(COMMON_OFFSET, COMMON_SIZE) {
            self.read_common(offset - COMMON_OFFSET, data);
        } else if offset == ISR_OFFSET && data.len() == 1 {
            // No lock: reading clears the status (4.1.4.5.1).
            data[0] = u8::try_from(self.core.interrupt.take_status() & 0xff).unwrap_or(0);
        } else if within(DEVICE_OFFSET, DEVICE_SIZE) {
            self.core.device.read_config(offset - DEVICE_OFFSET, data);
        } else if within(TABLE_OFFSET, PBA_OFFSET - TABLE_OFFSET) {
            self.vectors.msix().read_table(offset - TABLE_OFFSET, data);
        } else if within(PBA_OFFSET, BAR_SIZE - PBA_OFFSET) {
            self.vectors.msix().read_pba(offset - PBA_OFFSET, data);
        } else {
            data.fill(0);
        }
    }

    fn write_bar(&self, _bar: usize, offset: u64, data: &[u8]) {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let within =
            |start: u64, size: u64| offset >= start && offset.saturating_add(len) <= start + size;
        if within(COMMON_OFFSET, COMMON_SIZE) {
            self.write_common(offset - COMMON_OFFSET, data);
        } else if within(DEVICE_OFFSET, DEVICE_SIZE) {
            self.core.write_config(offset - DEVICE_OFFSET, data);
        } else if within(NOTIFY_OFFSET, NOTIFY_SIZE) {
            self.core
                .notify((offset - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER));
        } else if within(TABLE_OFFSET, PBA_OFFSET - TABLE_OFFSET) {
            self.vectors.msix().write_table(offset - TABLE_OFFSET, data);
        } else {
            log::warn!("virtio-pci: ignored {len}-byte write at BAR offset {offset:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::context::Context;
    use crate::pci::config::{command, reg};
    use crate::pci::msix::tests::Routes;
    use crate::pci::PciBars;
    use crate::virtio::block::test_util::*;
    use std::os::fd::AsRawFd;

    const BAR: u64 = 0xc000_8000;

    /// The window the tests' host bridge forwards below 4 GiB: BAR's 256 MiB.
    const WINDOW: Range<u64> = 0xc000_0000..0xd000_0000;
    /// The one it forwards above 4 GiB.
    const WINDOW64: Range<u64> = 0x8_0000_0000..0x10_0000_0000;

    /// KVM's ioeventfds as the tests see them: (address, the registered fd's number, a copy of
    /// it). A guest write at a registered address signals it, with no exit, as KVM does.
    #[derive(Debug, Default)]
    struct Kvm(Mutex<Vec<(u64, i32, EventFd)>>);

    impl Ioevents for Kvm {
        fn register(&self, fd: &EventFd, addr: u64) -> Result<(), std::io::Error> {
            let mut all = self.0.lock().unwrap();
            if all.iter().any(|e| e.0 == addr) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            all.push((addr, fd.as_raw_fd(), fd.try_clone()?));
            Ok(())
        }

        fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), std::io::Error> {
            let mut all = self.0.lock().unwrap();
            let i = all
                .iter()
                .position(|e| (e.0, e.1) == (addr, fd.as_raw_fd()))
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
            all.remove(i);
            Ok(())
        }
    }

    impl Kvm {
        /// The registered addresses, in order.
        fn addresses(&self) -> Vec<u64> {
            let mut v: Vec<u64> = self.0.lock().unwrap().iter().map(|e| e.0).collect();
            v.sort_unstable();
            v
        }

        /// A guest's 2-byte write of `value` at `addr`: an ioeventfd there takes it, else the
        /// exit reaches the 32-bit BAR window (when `addr` is in it).
        fn guest_write(&self, bars: &PciBars, addr: u64, value: u16) {
            let fd = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|e| e.0 == addr)
                .map(|e| e.2.try_clone().unwrap());
            match fd {
                Some(fd) => fd.write(1).unwrap(),
                None if WINDOW.contains(&addr) => {
                    crate::bus::SharedBusDevice::write(bars, addr - bars.base, &value.to_le_bytes())
                }
                None => {}
            }
        }
    }

    /// A device with `queues` queues on a 64 KiB image in memory, served by a context of its own
    /// named `name` that the test runs.
    fn mem_rig(name: &str, queues: u16) -> Rig {
        Rig::new(
            Context::new(name).unwrap(),
            MemImage::new(1 << 16, false),
            queues,
            false,
        )
    }

    fn transport(
        rig: &Rig<impl block::DiskImage + 'static>,
    ) -> (VirtioPciTransport, Arc<Routes>, Arc<Kvm>) {
        let routes = Arc::new(Routes::default());
        let kvm = Arc::new(Kvm::default());
        let wiring = PciWiring {
            bar: BAR,
            first_gsi: 40,
            intx_gsi: None,
            routes: routes.clone(),
            ioevents: kvm.clone(),
            windows: vec![WINDOW, WINDOW64],
        };
        let t = VirtioPciTransport::new(rig.dev.clone(), rig.mem.clone(), wiring).unwrap();
        (t, routes, kvm)
    }

    fn read(t: &VirtioPciTransport, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write(t: &VirtioPciTransport, offset: u64, len: usize, value: u64) {
        t.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn config8(t: &VirtioPciTransport, offset: usize) -> u8 {
        let mut b = [0u8];
        t.read_config(offset, &mut b);
        b[0]
    }

    fn config32(t: &VirtioPciTransport, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        t.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The capability list: (id, offset) of each.
    fn capabilities(t: &VirtioPciTransport) -> Vec<(u8, usize)> {
        let mut caps = Vec::new();
        let mut p = usize::from(config8(t, reg::CAPABILITIES));
        while p != 0 {
            caps.push((config8(t, p), p));
            p = usize::from(config8(t, p + 1));
        }
        caps
    }

    #[test]
    fn the_function_describes_its_structures_in_vendor_capabilities() {
        let rig = mem_rig("pci-caps", 3);
        let (t, _, _) = transport(&rig);
        assert_eq!(config32(&t, 0), 0x1042_1af4, "virtio, modern block device");
        assert_eq!(config8(&t, 8), 1, "revision 1: modern only");
        // BAR 0: the VMM's address, 64-bit, and its size to a probe of both halves.
        assert_eq!((config32(&t, 0x10), config32(&t, 0x14)), (0xc000_8004, 0));
        t.write_config(0x10, &[0xff; 4]);
        t.write_config(0x14, &[0xff; 4]);
        assert_eq!((config32(&t, 0x10), config32(&t, 0x14)), (0xffff_8004, !0));
        t.write_config(0x10, &0xc000_8000u32.to_le_bytes());
        t.write_config(0x14, &[0; 4]);
        let mut structures = Vec::new();
        let mut msix = None;
        for (id, at) in capabilities(&t) {
            match id {
                0x09 => structures.push((
                    config8(&t, at + 3),
                    config8(&t, at + 4),
                    config32(&t, at + 8),
                    config32(&t, at + 12),
                    config8(&t, at + 2),
                )),
                0x11 => msix = Some(at),
                other => panic!("capability {other:#x}"),
            }
        }
        // (type, BAR, offset, length, cap_len)
        assert_eq!(
            structures,
            [
                (1, 0, 0x0000, 0x38, 16),
                (3, 0, 0x1000, 1, 16),
                (4, 0, 0x2000, 0x1000, 16),
                (2, 0, 0x3000, 0x1000, 20),
                (5, 0, 0, 0, 20),
            ]
        );
        let notify = capabilities(&t)
            .iter()
            .find(|c| c.0 == 9 && config8(&t, c.1 + 3) == 2)
            .unwrap()
            .1;
        assert_eq!(config32(&t, notify + 16), NOTIFY_MULTIPLIER);
        let msix = msix.unwrap();
        // Three queues and the configuration: four vectors; table and PBA in BAR 0.
        assert_eq!(config32(&t, msix) >> 16, 3);
        assert_eq!(config32(&t, msix + 4), 0x4000);
        assert_eq!(config32(&t, msix + 8), 0x6000);
        assert_eq!(
            t.vector_irqfds()
                .unwrap()
                .iter()
                .map(|v| v.0)
                .collect::<Vec<_>>(),
            [40, 41, 42, 43]
        );
        assert_eq!(VirtioPciTransport::notify_address(BAR, 2), BAR + 0x3008);
    }

    #[test]
    fn the_configuration_window_reaches_bar_0() {
        let rig = mem_rig("pci-window", 3);
        let (t, _, _) = transport(&rig);
        let window = capabilities(&t)
            .into_iter()
            .find(|&(id, at)| id == 0x09 && config8(&t, at + 3) == 5)
            .unwrap()
            .1;
        let select = |offset: u32, len: u32| {
            t.write_config(window + 8, &offset.to_le_bytes());
            t.write_config(window + 12, &len.to_le_bytes());
        };
        // num_queues, 2 bytes: read through the window.
        select(0x12, 2);
        assert_eq!(config32(&t, window + 16) & 0xffff, 3);
        // queue_select, written through the window, then read in the BAR.
        select(0x16, 2);
        t.write_config(window + 16, &[2, 0, 0, 0]);
        assert_eq!(read(&t, common::QUEUE_SELECT, 2), 2);
        // A BAR it does not have, an odd length or a misaligned offset: no access.
        select(0x16, 3);
        t.write_config(window + 16, &[1, 0, 0, 0]);
        select(0x17, 2);
        t.write_config(window + 16, &[1, 0, 0, 0]);
        t.write_config(window + 4, &[1]);
        select(0x16, 2);
        t.write_config(window + 16, &[1, 0, 0, 0]);
        assert_eq!(read(&t, common::QUEUE_SELECT, 2), 2);
        t.write_config(window + 4, &[0]);
        // The header around it is untouched by a wide read.
        assert_eq!(config32(&t, window) & 0xff, 0x09);
    }

    /// Sets up the driver side: features, every queue at the test rings with vector
    /// `first_vector + i`, the configuration on vector 0, MSI-X enabled with every vector
    /// unmasked and programmed, then DRIVER_OK.
    fn start(t: &VirtioPciTransport, queues: u16) {
        start_with(t, queues, true);
    }

    /// Where the MSI-X capability is.
    fn msix_capability(t: &VirtioPciTransport) -> usize {
        capabilities(t).iter().find(|c| c.0 == 0x11).unwrap().1
    }

    /// Sets the device up as a driver does, with MSI-X enabled or left off (`msix`).
    fn start_with(t: &VirtioPciTransport, queues: u16, msix: bool) {
        t.write_config(
            reg::COMMAND,
            &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
        );
        if msix {
            t.write_config(msix_capability(t) + 3, &[0x80]);
        }
        for v in 0..=u64::from(queues) {
            write(t, TABLE_OFFSET + 16 * v, 8, 0xfee0_0000);
            write(t, TABLE_OFFSET + 16 * v + 8, 4, 0x30 + v);
            write(t, TABLE_OFFSET + 16 * v + 12, 4, 0);
        }
        write(
            t,
            common::DEVICE_STATUS,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        // VERSION_1 (feature bit 32) only.
        write(t, common::DRIVER_FEATURE_SELECT, 4, 1);
        write(t, common::DRIVER_FEATURE, 4, 1);
        write(
            t,
            common::DEVICE_STATUS,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        assert_eq!(
            read(t, common::DEVICE_STATUS, 1) & u64::from(status::FEATURES_OK),
            u64::from(status::FEATURES_OK)
        );
        write(t, common::CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(read(t, common::CONFIG_MSIX_VECTOR, 2), 0);
        assert_eq!(read(t, common::NUM_QUEUES, 2), u64::from(queues));
        for q in 0..queues {
            write(t, common::QUEUE_SELECT, 2, u64::from(q));
            assert_eq!(read(t, common::QUEUE_SIZE, 2), u64::from(QSIZE));
            assert_eq!(read(t, common::QUEUE_NOTIFY_OFF, 2), u64::from(q));
            write(t, common::QUEUE_MSIX_VECTOR, 2, u64::from(q) + 1);
            assert_eq!(read(t, common::QUEUE_MSIX_VECTOR, 2), u64::from(q) + 1);
            // 64-bit and split writes, as drivers do either.
            write(t, common::QUEUE_DESC, 8, desc_addr(q).0);
            write(t, common::QUEUE_DRIVER, 4, avail_addr(q).0 & 0xffff_ffff);
            write(t, common::QUEUE_DRIVER + 4, 4, avail_addr(q).0 >> 32);
            write(t, common::QUEUE_DEVICE, 8, used_addr(q).0);
            assert_eq!(read(t, common::QUEUE_DRIVER, 8), avail_addr(q).0);
            write(t, common::QUEUE_ENABLE, 2, 1);
        }
        // No such vector: NO_VECTOR reads back.
        write(t, common::QUEUE_SELECT, 2, 0);
        write(t, common::QUEUE_MSIX_VECTOR, 2, 99);
        assert_eq!(read(t, common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        write(t, common::QUEUE_MSIX_VECTOR, 2, 1);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(t, common::DEVICE_STATUS, 1, u64::from(ok));
        assert_eq!(read(t, common::DEVICE_STATUS, 1), u64::from(ok));
    }

    /// The guest moves BAR 0 as Linux does (memory decoding off, a probe of both halves, a new
    /// address, decoding on): the queues' ioeventfds go with it, so a notification at the new
    /// address reaches its queue with no exit and one at the old address reaches nothing. With
    /// decoding off nothing answers, nor with the BAR moved past the windows.
    #[test]
    fn notifications_follow_bar_0_and_memory_decoding() {
        let rig = mem_rig("pci-move", 2);
        let (t, _, kvm) = transport(&rig);
        let t = Arc::new(t);
        let mut root = crate::pci::PciRoot::new();
        root.add(t.clone()).unwrap();
        let bars = PciBars {
            root: Arc::new(root),
            base: WINDOW.start,
        };
        let notify = VirtioPciTransport::notify_address;
        let command = |c: u16| t.write_config(reg::COMMAND, &c.to_le_bytes());
        let request = |q: u16, first: u16| {
            rig.header(HDR, crate::virtio::block::request_type::IN, 0);
            rig.submit(
                q,
                first,
                &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
            );
        };
        // Whether queue `q`'s used index is still `n` after the context ran a while.
        let still = |q: u16, n: u16| {
            for _ in 0..5 {
                rig.ctx
                    .run_once(Some(std::time::Duration::from_millis(20)))
                    .unwrap();
            }
            rig.used_idx(q) == n
        };
        let num_queues = |base: u64| {
            let mut b = [0u8; 2];
            crate::bus::SharedBusDevice::read(
                &bars,
                base + common::NUM_QUEUES - WINDOW.start,
                &mut b,
            );
            u16::from_le_bytes(b)
        };
        assert_eq!(
            kvm.addresses(),
            [0u64; 0],
            "nothing before the guest decodes the BAR"
        );
        start(&t, 2);
        assert_eq!(kvm.addresses(), [notify(BAR, 0), notify(BAR, 1)]);
        request(0, 0);
        kvm.guest_write(&bars, notify(BAR, 0), 0);
        rig.run_until_used(0, 1);

        // Linux's __pci_read_base, then the new place.
        const NEW: u64 = 0xc010_0000;
        command(command::BUS_MASTER);
        assert_eq!(kvm.addresses(), [0u64; 0], "decoding off");
        t.write_config(0x10, &[0xff; 4]);
        assert_eq!(config32(&t, 0x10), 0xffff_8004);
        t.write_config(0x14, &[0xff; 4]);
        assert_eq!(config32(&t, 0x14), 0xffff_ffff);
        t.write_config(0x10, &0xc010_0000u32.to_le_bytes());
        t.write_config(0x14, &[0; 4]);
        assert_eq!(kvm.addresses(), [0u64; 0]);
        command(command::MEMORY | command::BUS_MASTER);
        assert_eq!(kvm.addresses(), [notify(NEW, 0), notify(NEW, 1)]);
        assert_eq!((num_queues(NEW), num_queues(BAR)), (2, 0xffff));
        request(1, 0);
        kvm.guest_write(&bars, notify(BAR, 1), 1);
        assert!(still(1, 0), "the old address reaches nothing");
        kvm.guest_write(&bars, notify(NEW, 1), 1);
        rig.run_until_used(1, 1);

        // Decoding off: no ioeventfd and no exit reach the queue; on again, they do.
        command(command::BUS_MASTER);
        assert_eq!(kvm.addresses(), [0u64; 0]);
        assert_eq!(num_queues(NEW), 0xffff);
        request(0, 3);
        kvm.guest_write(&bars, notify(NEW, 0), 0);
        assert!(still(0, 1), "decoding off");
        command(command::MEMORY | command::BUS_MASTER);
        kvm.guest_write(&bars, notify(NEW, 0), 0);
        rig.run_until_used(0, 2);

        // The high half moves it past the windows (above 4 GiB): no ioeventfd there; into the
        // 64-bit window, they follow; back again.
        t.write_config(0x14, &1u32.to_le_bytes());
        assert_eq!(kvm.addresses(), [0u64; 0]);
        t.write_config(0x14, &8u32.to_le_bytes());
        let high = 0x8_c010_0000;
        assert!(WINDOW64.contains(&high));
        assert_eq!(kvm.addresses(), [notify(high, 0), notify(high, 1)]);
        t.write_config(0x14, &[0; 4]);
        assert_eq!(kvm.addresses(), [notify(NEW, 0), notify(NEW, 1)]);
        rig.dev.shutdown().unwrap();
    }

    /// The guest puts a second function's BAR on the first's: KVM refuses the second's
    /// ioeventfds (logged, no panic), the first keeps its own; moved away, the second gets its
    /// ioeventfds at the new place.
    #[test]
    fn a_bar_moved_onto_another_keeps_the_first_ones_ioeventfds() {
        let (a, b) = (mem_rig("pci-a", 1), mem_rig("pci-b", 1));
        let (ta, _, kvm) = transport(&a);
        // b on the same KVM, in the next 32 KiB.
        let wiring = PciWiring {
            bar: BAR + BAR_SIZE,
            first_gsi: 50,
            intx_gsi: None,
            routes: Arc::new(Routes::default()),
            ioevents: kvm.clone(),
            windows: vec![WINDOW, WINDOW64],
        };
        let tb = VirtioPciTransport::new(b.dev.clone(), b.mem.clone(), wiring).unwrap();
        let on = (command::MEMORY | command::BUS_MASTER).to_le_bytes();
        ta.write_config(reg::COMMAND, &on);
        tb.write_config(reg::COMMAND, &on);
        let notify = VirtioPciTransport::notify_address;
        assert_eq!(kvm.addresses(), [notify(BAR, 0), notify(BAR + BAR_SIZE, 0)]);
        let a_fd = kvm.0.lock().unwrap()[0].1;
        tb.write_config(0x10, &0xc000_8000u32.to_le_bytes());
        assert_eq!(kvm.addresses(), [notify(BAR, 0)]);
        assert_eq!(kvm.0.lock().unwrap()[0].1, a_fd, "still a's");
        tb.write_config(0x10, &0xc020_0000u32.to_le_bytes());
        assert_eq!(kvm.addresses(), [notify(BAR, 0), notify(0xc020_0000, 0)]);
    }

    /// Whether `fd` is readable now, without reading it.
    fn readable(fd: &EventFd) -> bool {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    /// Without MSI-X (a guest booted with `pci=nomsi`), interrupts go through INTA#: the pin
    /// register says INTA#; a completion sets ISR bit 0 and asserts the line; the guest's ISR
    /// read clears the status; at its EOI (KVM's resample) the line is asserted again only while
    /// the status holds a cause; the INTx-disable bit holds the line back and clearing it sends
    /// what is pending; with MSI-X on, the vector fires and the line stays quiet. The device is
    /// served by an iothread, which raises the line and handles the resample on its own.
    #[test]
    fn without_msix_completions_assert_intx_and_a_resample_only_what_is_pending() {
        let io = crate::context::IoThread::spawn("io-intx").unwrap();
        let rig = Rig::new(
            io.context().clone(),
            MemImage::new(1 << 16, false),
            1,
            false,
        );
        let wiring = PciWiring {
            bar: BAR,
            first_gsi: 40,
            intx_gsi: Some(17),
            routes: Arc::new(Routes::default()),
            ioevents: Arc::new(Kvm::default()),
            windows: vec![WINDOW],
        };
        let t = VirtioPciTransport::new(rig.dev.clone(), rig.mem.clone(), wiring).unwrap();
        assert_eq!(config8(&t, reg::INTERRUPT_PIN), 1);
        let (gsi, line, resample) = t.intx_irqfd().unwrap().unwrap();
        assert_eq!(gsi, 17);
        let vectors = t.vector_irqfds().unwrap();
        start_with(&t, 1, false);
        let mut used = 0;
        let mut complete_one = || {
            rig.header(HDR, crate::virtio::block::request_type::IN, 0);
            rig.submit(
                0,
                used * 3,
                &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
            );
            write(&t, NOTIFY_OFFSET, 2, 0);
            used += 1;
            rig.wait_used(0, used);
            assert!(poll(|| t.interrupt().status() != 0));
        };
        let asserted = || poll(|| line.read().is_ok());
        // The EOI: KVM signals the resample eventfd, and the iothread takes it.
        let eoi = || {
            resample.write(1).unwrap();
            assert!(poll(|| !readable(&resample)), "the resample was handled");
        };

        complete_one();
        assert!(asserted(), "INTx asserted");
        assert_eq!(read(&t, ISR_OFFSET, 1), 1, "queue bit");
        assert_eq!(read(&t, ISR_OFFSET, 1), 0, "cleared by the read");
        eoi();
        assert!(line.read().is_err(), "nothing pending: not asserted again");

        // A completion after the guest's ISR read, before its EOI: asserted again at the EOI.
        complete_one();
        assert!(asserted());
        eoi();
        assert!(asserted(), "still pending at the EOI");
        assert_eq!(read(&t, ISR_OFFSET, 1), 1);

        // INTx disabled: the status is set, the line left alone; cleared, the line goes up.
        let on = command::MEMORY | command::BUS_MASTER;
        t.write_config(reg::COMMAND, &(on | command::INTX_DISABLE).to_le_bytes());
        complete_one();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(line.read().is_err(), "disabled");
        eoi();
        assert!(line.read().is_err(), "disabled, even at an EOI");
        t.write_config(reg::COMMAND, &on.to_le_bytes());
        assert!(line.read().is_ok(), "asserted as the bit clears");
        assert_eq!(read(&t, ISR_OFFSET, 1), 1);

        // MSI-X on: queue 0's vector (1) fires, not the line.
        t.write_config(msix_capability(&t) + 3, &[0x80]);
        complete_one();
        assert!(poll(|| vectors[1].1.read().is_ok()), "the vector fired");
        assert!(line.read().is_err(), "not INTx");
        eoi();
        assert!(line.read().is_err(), "nor at an EOI");
        rig.dev.shutdown().unwrap();
        drop((t, rig));
        io.stop().unwrap();
    }

    fn fired(irqfds: &[(u32, EventFd)]) -> Vec<u32> {
        irqfds
            .iter()
            .filter(|(_, fd)| fd.read().is_ok())
            .map(|(gsi, _)| *gsi)
            .collect()
    }

    /// Whether `cond` held within 10 s.
    fn poll(mut cond: impl FnMut() -> bool) -> bool {
        (0..10_000).any(|_| {
            let held = cond();
            if !held {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            held
        })
    }

    /// How many times each vector fired since the last look (its irqfd's counter), by GSI.
    fn fired_counts(irqfds: &[(u32, EventFd)]) -> Vec<(u32, u64)> {
        irqfds
            .iter()
            .map(|(gsi, fd)| (*gsi, fd.read().unwrap_or(0)))
            .collect()
    }

    /// Three reads on each of two queues served by one context, finished by the engine before
    /// the context reaps them: one reap completes all six and fires each queue's vector once,
    /// never the other queue's nor the configuration vector, whatever the number of requests.
    #[test]
    fn one_reap_over_two_queues_fires_each_queue_vector_once() {
        let rig = mem_rig("pci-batch", 2);
        let (t, _, _) = transport(&rig);
        let irqfds = t.vector_irqfds().unwrap();
        start(&t, 2);
        rig.image.set_gate(false);
        for q in 0..2u16 {
            for i in 0..3u16 {
                let at = u64::from(q * 3 + i);
                rig.header(HDR + 0x20 * at, crate::virtio::block::request_type::IN, at);
                rig.submit(
                    q,
                    i * 3,
                    &[
                        (HDR + 0x20 * at, 16, 0),
                        (BUF + 0x1000 * at, 512, F_WRITE),
                        (STATUS + at, 1, F_WRITE),
                    ],
                );
            }
            write(&t, NOTIFY_OFFSET + 4 * u64::from(q), 2, u64::from(q));
        }
        // The context takes the six requests; the engine runs them once the gate opens.
        while rig.ctx.run_once(Some(std::time::Duration::ZERO)).unwrap() > 0 {}
        rig.image.set_gate(true);
        assert!(poll(|| rig.image.reads_started.load(Ordering::SeqCst) == 6));
        // The last read has finished well before this.
        std::thread::sleep(std::time::Duration::from_millis(100));
        rig.run_until_used(0, 3);
        rig.run_until_used(1, 3);
        assert_eq!(fired_counts(&irqfds), [(40, 0), (41, 1), (42, 1)]);
        rig.dev.shutdown().unwrap();
    }

    #[test]
    fn each_queue_completes_on_its_own_vector_and_a_resize_on_the_config_vector() {
        let dir = tempfile::tempdir().unwrap();
        let io = crate::context::IoThread::spawn("io-pci").unwrap();
        let image = raw_image(&dir, 1 << 16);
        let rig = Rig::new(io.context().clone(), Arc::clone(&image), 2, false);
        let (t, routes, _) = transport(&rig);
        let irqfds = t.vector_irqfds().unwrap();
        start(&t, 2);
        // Every vector routed to what the guest wrote.
        let routed: Vec<(u32, u32)> = routes
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(g, m)| (*g, m.data))
            .collect();
        assert_eq!(routed, [(40, 0x30), (41, 0x31), (42, 0x32)]);
        // A read on queue 1, notified through its notification address.
        rig.header(HDR, crate::virtio::block::request_type::IN, 0);
        rig.submit(
            1,
            0,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        write(&t, NOTIFY_OFFSET + 4, 2, 1);
        rig.wait_used(1, 1);
        assert_eq!(rig.byte(STATUS), crate::virtio::block::status::OK);
        // The interrupt follows the used ring update: wait for it.
        let waited = poll(|| irqfds[2].1.read().is_ok());
        assert!(waited, "queue 1's vector fired");
        assert_eq!(fired(&irqfds), Vec::<u32>::new(), "no other vector");
        // With its vector masked, the completion is held back and fires on unmask.
        write(&t, TABLE_OFFSET + 16 * 2 + 12, 4, 1);
        rig.submit(
            1,
            3,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        write(&t, NOTIFY_OFFSET + 4, 2, 1);
        rig.wait_used(1, 2);
        assert!(poll(|| read(&t, PBA_OFFSET, 8) == 0b100), "pending");
        assert_eq!(fired(&irqfds), Vec::<u32>::new());
        write(&t, TABLE_OFFSET + 16 * 2 + 12, 4, 0);
        assert_eq!(fired(&irqfds), [42]);
        assert_eq!(read(&t, PBA_OFFSET, 8), 0);
        // The disk grows: configuration change on vector 0, ISR bit 1 (cleared by the read).
        read(&t, ISR_OFFSET, 1);
        rig.dev.with_drained_io(|_| {
            image.grow(1 << 20).unwrap();
            rig.dev.update_capacity();
        });
        assert_eq!(fired(&irqfds), [40]);
        assert_eq!(read(&t, ISR_OFFSET, 1), 2);
        assert_eq!(read(&t, ISR_OFFSET, 1), 0);
        assert_eq!(read(&t, DEVICE_OFFSET, 8), 2048, "capacity in sectors");
        assert_eq!(read(&t, common::CONFIG_GENERATION, 1), 1);
        // Reset: the device stops, vectors go back to none.
        write(&t, common::DEVICE_STATUS, 1, 0);
        assert_eq!(read(&t, common::DEVICE_STATUS, 1), 0);
        assert_eq!(
            read(&t, common::CONFIG_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
        write(&t, common::QUEUE_SELECT, 2, 1);
        assert_eq!(read(&t, common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(read(&t, common::QUEUE_ENABLE, 2), 0);
        rig.dev.shutdown().unwrap();
        drop((t, rig));
        io.stop().unwrap();
    }
}
