//! The VM's disks: iothreads, images, virtio-blk devices on virtio-mmio or virtio-pci transports, their KVM
//! notifications, their ACPI description, and their orderly end. One file per concern:
//! `open.rs` opens the images (the format is never guessed where guessing is unsafe: a raw image
//! opened for writing) and words their failures; `iothreads.rs` owns the iothreads and the main
//! loop's context; `wiring.rs` puts one disk on the machine (device, transport, ioeventfds,
//! irqfds); `msi.rs` keeps KVM's routes of the virtio-pci disks' MSI-X vectors; `query.rs` says what `query-block` reports of it and names its nodes; `snapshot.rs`
//! and `resize.rs` change a running disk's image (`blockdev-snapshot-sync`, `block_resize`);
//! `io_errors.rs` takes the devices' failed requests to the monitor and stops the VM when their
//! policy asks.
//!
//! [`Disks::build`], before the guest is loaded: opens each image (its backing chain read-only,
//! QEMU-compatible locks taken), so a bad one fails before any thread starts; spawns one thread
//! per `-object iothread` (named after its id); builds each virtio-blk device in its iothread's
//! context, or in the main loop's context when it has none. A virtio-mmio disk (the n-th): its
//! transport goes on the shared MMIO bus (reached by the vCPUs without the global lock) at
//! [`VIRTIO_MMIO_START`] + n × [`VIRTIO_MMIO_SIZE`], with one ioeventfd per queue at its
//! QueueNotify register (datamatch: the queue index), its irqfd on GSI [`VIRTIO_IRQ_FIRST`] + n
//! and an `LNRO0005` DSDT entry, edge-triggered. A virtio-pci disk: its function goes on the PCI
//! root bus at the next device number d, its 64-bit BAR at the start of the host bridge's 64-bit
//! window above 4 GiB (or at [`PCI_MMIO_START`], when the machine has none) + d × 32 KiB, one
//! ioeventfd per queue at its notification address wherever the guest decodes the BAR (the
//! transport moves them through `KvmIoevents`), one irqfd per MSI-X vector (queues + 1)
//! on GSIs from [`PCI_MSI_GSI_FIRST`] on, and a resampling irqfd for its INTx line on the GSI
//! [`pci_intx_gsi`] gives its slot (none when the virtio-mmio disks take every pin); with any,
//! the ECAM and both BAR windows go on the shared MMIO bus and the host bridge in the DSDT, its
//! `_PRT` naming each slot's INTx GSI ([`Disks::pci_root`] gives the bus to the 0xCF8 ports and
//! says the MCFG is needed).
//!
//! Threads and locks: a disk on an iothread is served entirely in that thread's context (its
//! ioeventfds, the completions of its worker pool, the used ring and the irqfd), which never
//! takes the global lock (`GlobalLock::lock` debug-asserts it). The main loop's context is
//! dispatched by [`MainContext`], a main-loop handler, so main-loop disks run under the global
//! lock like every other main-loop handler. vCPUs reach a transport without the global lock (the
//! shared MMIO bus, see [`crate::global`]); the transport acquires the device's context only for
//! configuration-space writes, activation and reset. An iothread whose loop fails ends the VM
//! ([`IoThreadFailures`]). A device reports failed requests to [`IoErrors`] from its own context,
//! with no lock of the VM; the stop that a policy asks for runs on the main loop
//! ([`IoErrorStop`]).
//!
//! [`Disks::shutdown`], after the vCPUs stopped: drains and flushes every device (waiting without
//! holding its context), takes the transports off the shared bus, drops the devices (the images close
//! and their locks go), then stops the iothreads.

mod io_errors;
mod iothreads;
mod jobs;
mod msi;
mod open;
mod query;
mod resize;
mod snapshot;
mod wiring;

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use block::DiskImage;

use devices::bus::{BusError, SharedBus};
use devices::context::{self, IoThreadHandle};
use devices::pci::{Ioevents, MsiRoutes, PciBars, PciEcam, PciError, PciRoot, SLOTS};
use devices::virtio::PCI_BAR_SIZE;
use kvm_ioctls::VmFd;

use crate::arch::x86_64::acpi::{pci_host_bridge, virtio_mmio_device, DsdtDevice};
use crate::arch::x86_64::layout::{
    pci_intx_gsi, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START, PCI_MSI_GSI_FIRST,
    VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::memory::GuestMemory;
use crate::drive::{DiskSpec, IoThreadSpec, Transport};
use crate::global::{GlobalLock, IoThreadFailures};
use crate::monitor::VmDisk;
use crate::sandbox::landlock::ImageFile;
use iothreads::IoThreads;
use msi::KvmMsiRoutes;
use open::open_image;
use query::{block_device, Names};
use wiring::{add_mmio, add_pci, device, KvmIoevents, NewDisk};

pub use io_errors::{IoErrorStop, IoErrors};
pub use iothreads::MainContext;
pub use jobs::{start_commit, start_stream, CommitArgs, JobEnd, JobError, Jobs, Layer, StreamArgs};
pub use query::NodeNamer;
pub use resize::resize;
pub use snapshot::{snapshot, LiveImage};

/// Errors from setting up or shutting down the disks, one line each.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An iothread's thread or context could not be made.
    #[error("Cannot start iothread '{id}'")]
    IoThread {
        /// The iothread's id.
        id: String,
        /// Why.
        #[source]
        source: context::Error,
    },
    /// The main loop's context could not be made.
    #[error("Cannot create the main loop's context")]
    MainContext(#[source] context::Error),
    /// The image file does not exist.
    #[error("Drive '{id}': no such file {path}")]
    FileMissing {
        /// The drive.
        id: String,
        /// The file.
        path: String,
    },
    /// No `format=`, and the file is raw by its contents: guessing would let a guest that writes
    /// a qcow2 header there make the next start read host files.
    #[error("Drive '{id}': {path} has no format= and looks raw; say format=raw (probing a writable raw image is unsafe)")]
    FormatNeeded {
        /// The drive.
        id: String,
        /// The file.
        path: String,
    },
    /// Another process holds a conflicting lock (a QEMU, a qemu-img, another vmm).
    #[error("Drive '{id}': {path} is locked by another process (is it in use?)")]
    Locked {
        /// The drive.
        id: String,
        /// The file.
        path: String,
    },
    /// One image given to two drives of this VM, at least one of them writable.
    #[error(
        "Drive '{id}': {path} is already the image of drive '{other}' (an image serves one drive)"
    )]
    SameImage {
        /// The drive.
        id: String,
        /// The file.
        path: String,
        /// The earlier drive with the same file.
        other: String,
    },
    /// A read-write disk on a file that cannot be opened for writing.
    #[error("Drive '{id}': {path} is read-only; add readonly=on")]
    ReadOnlyFile {
        /// The drive.
        id: String,
        /// The file.
        path: String,
    },
    /// Opening the image failed otherwise (corrupt, unsupported feature, bad backing file...).
    #[error("Drive '{id}': cannot open {path}")]
    Open {
        /// The drive.
        id: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: block::Error,
    },
    /// More virtio-mmio disks than there are interrupt lines for them.
    #[error("{count} virtio-mmio disks, at most {max}")]
    TooMany {
        /// Disks asked for.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// The virtio-blk device refused its configuration (queue size, queue count...).
    #[error("Drive '{id}': cannot create its virtio-blk device")]
    Device {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: devices::virtio::block::Error,
    },
    /// The virtio transport could not be made.
    #[error("Drive '{id}': cannot create its virtio transport")]
    Transport {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: devices::virtio::TransportError,
    },
    /// The transport's window clashed on the MMIO bus.
    #[error("Drive '{id}': cannot place its transport on the MMIO bus")]
    Bus {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: BusError,
    },
    /// The disk's PCI function does not fit on the bus.
    #[error("Drive '{id}': cannot put its virtio-pci function on the PCI bus")]
    Pci {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: PciError,
    },
    /// The PCI windows clashed on the MMIO bus.
    #[error("Cannot place the PCI windows on the MMIO bus")]
    PciBus(#[source] BusError),
    /// KVM_IOEVENTFD failed.
    #[error("Drive '{id}': cannot register the ioeventfd of queue {queue}")]
    Ioevent {
        /// The drive.
        id: String,
        /// The queue.
        queue: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("Drive '{id}': cannot register its irqfd on GSI {gsi}")]
    Irqfd {
        /// The drive.
        id: String,
        /// The interrupt line.
        gsi: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Draining or flushing a disk at shutdown failed.
    #[error("Drive '{id}': flush at shutdown failed")]
    Flush {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: block::Error,
    },
    /// An iothread could not be stopped.
    #[error("Cannot stop iothread '{id}'")]
    StopIoThread {
        /// The iothread.
        id: String,
        /// Why.
        #[source]
        source: context::Error,
    },
}

/// The VM's iothreads, the main loop's context and the disks.
#[derive(Debug)]
pub struct Disks {
    iothreads: IoThreads,
    disks: Vec<VmDisk>,
    /// Names the nodes of the images opened later (snapshots), after the disks' own.
    namer: Option<NodeNamer>,
    /// The PCI root bus, when a disk is on virtio-pci.
    pci: Option<Arc<PciRoot>>,
}

impl Disks {
    /// Builds the iothreads and disks (steps in the module doc), putting the transports on
    /// `shared_mmio` (or on the PCI bus, itself on `shared_mmio`); returns them with the DSDT
    /// entries of the transports and of the PCI host bridge. A virtio-pci disk without
    /// `num-queues` gets one queue per vCPU (`vcpus`). The virtio-pci functions' BARs go in
    /// `window64` (the host bridge's window above 4 GiB, see `layout::pci_mmio64_window`), or
    /// in the 32-bit window when there is none.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        iothreads: &[IoThreadSpec],
        iothread_failed: &IoThreadFailures,
        specs: &[DiskSpec],
        vcpus: u8,
        window64: Option<Range<u64>>,
        vm_fd: &Arc<VmFd>,
        memory: &GuestMemory,
        shared_mmio: &mut SharedBus,
        errors: &Arc<IoErrors>,
    ) -> Result<(Self, Vec<DsdtDevice>), DiskError> {
        let max = VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1;
        let mmio_count = specs
            .iter()
            .filter(|s| s.device.transport == Transport::Mmio)
            .count();
        if u32::try_from(mmio_count).map_or(true, |n| n > max) {
            return Err(DiskError::TooMany {
                count: mmio_count,
                max,
            });
        }
        // Images first: a bad one fails before any thread starts.
        let mut images = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            match open_image(&spec.drive) {
                Ok(image) => images.push(image),
                Err(DiskError::Locked { id, path }) => {
                    // Our own earlier drive holds the lock: say so rather than blame another process.
                    return Err(match same_file_as(&spec.drive.file, &specs[..i]) {
                        Some(other) => DiskError::SameImage { id, path, other },
                        None => DiskError::Locked { id, path },
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let iothreads = IoThreads::start(iothreads, iothread_failed)?;
        let mut disks = Vec::with_capacity(specs.len());
        let mut dsdt = Vec::with_capacity(specs.len());
        let mut namer = NodeNamer::default();
        let mut pci = PciRoot::new();
        let routes: Arc<dyn MsiRoutes> = Arc::new(KvmMsiRoutes::new(Arc::clone(vm_fd)));
        let ioevents: Arc<dyn Ioevents> = Arc::new(KvmIoevents(Arc::clone(vm_fd)));
        let mut mmio_index = 0u8;
        let mut next_gsi = PCI_MSI_GSI_FIRST;
        let mmio_lines = u32::try_from(mmio_count).unwrap_or(u32::MAX);
        let windows: Vec<Range<u64>> =
            std::iter::once(PCI_MMIO_START..PCI_MMIO_START + PCI_MMIO_SIZE)
                .chain(window64.clone())
                .collect();
        let bars_start = window64.as_ref().map_or(PCI_MMIO_START, |w| w.start);
        for ((index, spec), image) in (0u8..).zip(specs).zip(images) {
            let groups = spec
                .groups
                .iter()
                .map(|g| (iothreads.context(g.iothread.as_deref()), g.queues.clone()))
                .collect();
            let names = Names::of(index, spec, &image, &mut namer);
            let info = block_device(spec, &names, &image);
            let sink = errors.sink(names.qom_path.clone(), names.node_name().to_owned());
            let queues = spec.device.queues(vcpus);
            let disk = NewDisk {
                spec,
                image,
                groups,
                sink,
                queues,
            };
            let (device, live) = device(disk)?;
            let drive = (spec.drive.id.as_str(), &device);
            let place = match spec.device.transport {
                Transport::Mmio => {
                    let base = VIRTIO_MMIO_START + u64::from(mmio_index) * VIRTIO_MMIO_SIZE;
                    let gsi = VIRTIO_IRQ_FIRST + u32::from(mmio_index);
                    add_mmio(drive, (base, gsi), vm_fd, memory, shared_mmio)?;
                    dsdt.push(virtio_mmio_device(mmio_index, base, gsi));
                    mmio_index += 1;
                    format!("virtio-mmio at {base:#x}, GSI {gsi}")
                }
                Transport::Pci => {
                    let pci_err = |source| DiskError::Pci {
                        id: spec.drive.id.clone(),
                        source,
                    };
                    let slot = pci.next_slot().ok_or(PciError::BusFull).map_err(pci_err)?;
                    let bar = bars_start + u64::from(slot) * PCI_BAR_SIZE;
                    let first_gsi = next_gsi;
                    let intx_gsi = pci_intx_gsi(mmio_lines, slot);
                    let slot = add_pci(
                        drive,
                        (bar, first_gsi, intx_gsi, &windows),
                        vm_fd,
                        memory,
                        (&mut pci, Arc::clone(&routes), Arc::clone(&ioevents)),
                    )?;
                    // One vector per queue and one for configuration changes.
                    next_gsi += u32::from(queues) + 1;
                    let intx = intx_gsi.map_or("no INTx".to_owned(), |g| format!("INTx GSI {g}"));
                    format!(
                        "virtio-pci 00:{slot:02x}.0, BAR {bar:#x}, {} MSI-X vectors from GSI {first_gsi}, {intx}",
                        u32::from(queues) + 1
                    )
                }
            };
            log::info!(
                "disk {}: {} on {place}, {queues} queues, served by (queue by queue) {}",
                spec.drive.id,
                spec.drive.file.display(),
                device.queue_contexts().join(", ")
            );
            disks.push(VmDisk {
                info,
                device,
                live: Arc::new(Mutex::new(live)),
            });
        }
        let pci = if specs.iter().any(|s| s.device.transport == Transport::Pci) {
            let root = Arc::new(pci);
            shared_mmio
                .insert(
                    "pci-ecam",
                    PCI_ECAM_START,
                    PCI_ECAM_SIZE,
                    Arc::new(PciEcam(Arc::clone(&root))),
                )
                .map_err(DiskError::PciBus)?;
            for (name, window) in ["pci-bars", "pci-bars64"].into_iter().zip(&windows) {
                let bars = PciBars {
                    root: Arc::clone(&root),
                    base: window.start,
                };
                shared_mmio
                    .insert(
                        name,
                        window.start,
                        window.end - window.start,
                        Arc::new(bars),
                    )
                    .map_err(DiskError::PciBus)?;
            }
            let intx: Vec<(u8, u32)> = (1..)
                .take(SLOTS - 1)
                .filter_map(|slot| Some((slot, pci_intx_gsi(mmio_lines, slot)?)))
                .collect();
            dsdt.push(pci_host_bridge(window64.as_ref(), &intx));
            Some(root)
        } else {
            None
        };
        let namer = Some(namer);
        Ok((
            Self {
                iothreads,
                disks,
                namer,
                pci,
            },
            dsdt,
        ))
    }

    /// The PCI root bus, when a disk is on virtio-pci (for the configuration ports and the
    /// MCFG).
    pub fn pci_root(&self) -> Option<&Arc<PciRoot>> {
        self.pci.as_ref()
    }

    /// The handler that runs the main loop's context (the disks without an iothread).
    pub fn main_context(&self) -> MainContext {
        self.iothreads.main_context()
    }

    /// Handles on the iothreads (for `query-iothreads`, `qom-get` and `qom-set`).
    pub fn iothread_handles(&self) -> Vec<IoThreadHandle> {
        self.iothreads.handles()
    }

    /// The disks, for the monitor.
    pub fn disks(&self) -> Vec<VmDisk> {
        self.disks.clone()
    }

    /// Every file of every disk's chain, top first, for the sandbox's Landlock rules.
    pub fn image_files(&self) -> Vec<ImageFile> {
        let mut files = Vec::new();
        for disk in &self.disks {
            let live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
            files.extend(
                live.top()
                    .chain()
                    .enumerate()
                    .map(|(depth, image)| ImageFile {
                        path: image.file().path().into(),
                        writable: depth == 0 && !image.read_only(),
                    }),
            );
        }
        files
    }

    /// What names the nodes of the images the monitor opens later, once: the monitor is the
    /// only one to open images after the disks are built.
    pub fn node_namer(&mut self) -> NodeNamer {
        self.namer.take().unwrap_or_default()
    }

    /// Ends the disks once no vCPU runs and the main loop is gone (steps in the module doc).
    /// Every disk is shut down even when one fails; the first failure is returned.
    pub fn shutdown(self, global: &GlobalLock) -> Result<(), DiskError> {
        let mut first = None;
        for disk in &self.disks {
            if let Err(source) = disk.device.shutdown() {
                let id = disk.info.drive_id.clone();
                first = first.or(Some(DiskError::Flush { id, source }));
            }
        }
        // The transports hold the devices; the devices hold their images and contexts.
        global.clear_shared_mmio();
        drop(self.disks);
        if let Err(e) = self.iothreads.stop() {
            first = first.or(Some(e));
        }
        first.map_or(Ok(()), Err)
    }
}

/// The id of the drive in `earlier` whose image is the file `path` (same device and inode).
fn same_file_as(path: &std::path::Path, earlier: &[DiskSpec]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let this = id(path)?;
    earlier
        .iter()
        .find(|s| id(&s.drive.file) == Some(this))
        .map(|s| s.drive.id.clone())
}

/// Runs a host tool a test needs (qemu-img, qemu-io), failing loudly where it is missing.
#[cfg(test)]
fn run_tool(tool: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed for this test (ci/setup installs it): {e}"))
}
