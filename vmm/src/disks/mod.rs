//! The VM's disks: iothreads, images, virtio-blk devices on virtio-mmio transports, their KVM
//! notifications, their ACPI description, and their orderly end. One file per concern:
//! `open.rs` opens the images (the format is never guessed where guessing is unsafe: a raw image
//! opened for writing) and words their failures; `iothreads.rs` owns the iothreads and the main
//! loop's context; `wiring.rs` puts one disk on the machine (device, transport, ioeventfds,
//! irqfd); `query.rs` says what `query-block` reports of it and names its nodes; `snapshot.rs`
//! and `resize.rs` change a running disk's image (`blockdev-snapshot-sync`, `block_resize`);
//! `io_errors.rs` takes the devices' failed requests to the monitor and stops the VM when their
//! policy asks.
//!
//! [`Disks::build`], before the guest is loaded: opens each image (its backing chain read-only,
//! QEMU-compatible locks taken), so a bad one fails before any thread starts; spawns one thread
//! per `-object iothread` (named after its id); builds each virtio-blk device in its iothread's
//! context, or in the main loop's context when it has none; puts its transport on the shared
//! MMIO bus (reached by the vCPUs without the global lock) at
//! [`VIRTIO_MMIO_START`] + n × [`VIRTIO_MMIO_SIZE`]; registers one ioeventfd per queue at its
//! QueueNotify register (datamatch: the queue index) and its irqfd on GSI
//! [`VIRTIO_IRQ_FIRST`] + n; and returns the `LNRO0005` DSDT entries, edge-triggered.
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
mod open;
mod query;
mod resize;
mod snapshot;
mod wiring;

use std::sync::{Arc, Mutex, PoisonError};

use block::DiskImage;

use devices::bus::{BusError, SharedBus};
use devices::context::{self, IoThreadHandle};
use kvm_ioctls::VmFd;

use crate::arch::x86_64::acpi::{virtio_mmio_device, DsdtDevice};
use crate::arch::x86_64::layout::{
    VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::memory::GuestMemory;
use crate::drive::{DiskSpec, IoThreadSpec};
use crate::global::{GlobalLock, IoThreadFailures};
use crate::monitor::VmDisk;
use crate::sandbox::landlock::ImageFile;
use iothreads::IoThreads;
use open::open_image;
use query::{block_device, Names};
use wiring::{add_disk, NewDisk};

pub use io_errors::{IoErrorStop, IoErrors};
pub use iothreads::MainContext;
pub use jobs::{start_commit, start_stream, CommitArgs, JobError, Jobs, StreamArgs};
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
    /// More disks than there are interrupt lines for them.
    #[error("{count} disks, at most {max}")]
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
    /// The virtio-mmio transport could not be made.
    #[error("Drive '{id}': cannot create its virtio-mmio transport")]
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
}

impl Disks {
    /// Builds the iothreads and disks (steps in the module doc), putting the transports on
    /// `shared_mmio`; returns them with the DSDT entries of the transports.
    pub fn build(
        iothreads: &[IoThreadSpec],
        iothread_failed: &IoThreadFailures,
        specs: &[DiskSpec],
        vm_fd: &VmFd,
        memory: &GuestMemory,
        shared_mmio: &mut SharedBus,
        errors: &Arc<IoErrors>,
    ) -> Result<(Self, Vec<DsdtDevice>), DiskError> {
        let max = VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1;
        if u32::try_from(specs.len()).map_or(true, |n| n > max) {
            return Err(DiskError::TooMany {
                count: specs.len(),
                max,
            });
        }
        // Images first: a bad one fails before any thread starts.
        let images = specs
            .iter()
            .map(|s| open_image(&s.drive))
            .collect::<Result<Vec<_>, _>>()?;
        let iothreads = IoThreads::start(iothreads, iothread_failed)?;
        let mut disks = Vec::with_capacity(specs.len());
        let mut dsdt = Vec::with_capacity(specs.len());
        let mut namer = NodeNamer::default();
        for ((index, spec), image) in (0u8..).zip(specs).zip(images) {
            let ctx = iothreads.context(spec.device.iothread.as_deref());
            let base = VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_FIRST + u32::from(index);
            let names = Names::of(index, spec, &image, &mut namer);
            let info = block_device(spec, &names, &image);
            let sink = errors.sink(names.qom_path.clone(), names.node_name().to_owned());
            let disk = NewDisk {
                spec,
                image,
                ctx,
                sink,
                base,
                gsi,
            };
            let (device, live) = add_disk(disk, vm_fd, memory, shared_mmio)?;
            log::info!(
                "disk {}: {} at {base:#x}, GSI {gsi}, on {}",
                spec.drive.id,
                spec.drive.file.display(),
                spec.device.iothread.as_deref().unwrap_or("the main loop")
            );
            disks.push(VmDisk {
                info,
                device,
                live: Arc::new(Mutex::new(live)),
            });
            dsdt.push(virtio_mmio_device(index, base, gsi));
        }
        let namer = Some(namer);
        Ok((
            Self {
                iothreads,
                disks,
                namer,
            },
            dsdt,
        ))
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

/// Runs a host tool a test needs (qemu-img, qemu-io), failing loudly where it is missing.
#[cfg(test)]
fn run_tool(tool: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed for this test (ci/setup installs it): {e}"))
}
