//! One disk on the machine: its virtio-blk device, built with the contexts that serve it; its
//! transport; and the KVM notifications that spare userspace a round trip. On virtio-mmio: the
//! transport on the shared MMIO bus, one ioeventfd per queue at its QueueNotify register
//! (datamatch: the queue index) and one irqfd on its GSI. On virtio-pci: the transport on the
//! PCI root bus with its BAR where the VMM placed it, [`KvmIoevents`] through which it keeps one
//! ioeventfd per queue at its own notification address wherever the guest has the BAR, and one
//! irqfd per MSI-X vector, each on a GSI of its own that KVM routes to the guest's message once
//! the guest programs it.
//!
//! Locks: this runs while the VM is built, before any vCPU exists and before the shared bus goes
//! behind the global lock's read-write lock, so it takes none of the VM's locks. Afterwards the
//! ioeventfds are read and the irqfds written in the contexts serving their queues, and a vCPU
//! reaches the transport through the shared bus without the global lock.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use block::aio::Workers;
use block::{Image, WithPolicy};
use devices::bus::SharedBus;
use devices::context::Context;
use devices::pci::{Ioevents, MsiRoutes, PciRoot};
use devices::virtio::block::{Block, BlockConfig, ErrorSink};
use devices::virtio::{MmioTransport, PciWiring, VirtioPciTransport, QUEUE_NOTIFY_OFFSET};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::snapshot::LiveImage;
use super::DiskError;
use crate::arch::x86_64::layout::VIRTIO_MMIO_SIZE;
use crate::arch::x86_64::memory::GuestMemory;
use crate::drive::DiskSpec;

/// One disk to add: its flags, its image, the contexts that serve its queues (and which queues
/// each), where its error reports go and its number of queues.
pub(super) struct NewDisk<'a> {
    pub(super) spec: &'a DiskSpec,
    pub(super) image: Image,
    pub(super) groups: Vec<(Arc<Context>, Vec<u16>)>,
    pub(super) sink: ErrorSink,
    pub(super) queues: u16,
}

/// Builds the device of one disk in its context. Returns the device and the image it serves.
pub(super) fn device(disk: NewDisk<'_>) -> Result<(Arc<Block>, LiveImage), DiskError> {
    let spec = disk.spec;
    let config = BlockConfig {
        id: spec.drive.id.clone(),
        serial: spec.device.serial.clone(),
        num_queues: disk.queues,
        queue_size: spec.device.queue_size,
        discard: spec.drive.discard,
        // Workers doing the image's I/O (with `aio=io_uring`, what the ring does not take).
        io_workers: Workers::default(),
        aio: spec.drive.aio,
        stats_intervals: spec.drive.stats_intervals.clone(),
        time_stages: spec.device.stage_timing,
        on_read_error: spec.drive.on_read_error,
        on_write_error: spec.drive.on_write_error,
        error_sink: Some(disk.sink),
    };
    let image = Arc::new(WithPolicy::new(
        disk.image,
        spec.drive.cache.policy,
        spec.drive.detect_zeroes,
    ));
    let live = LiveImage::new(
        Arc::clone(&image),
        spec.drive.cache,
        spec.drive.detect_zeroes,
    );
    let block =
        Block::with_groups(config, image, disk.groups).map_err(|source| DiskError::Device {
            id: spec.drive.id.clone(),
            source,
        })?;
    Ok((block, live))
}

/// Puts the virtio-mmio transport of `block` (of drive `drive`) on `shared_mmio` at `base` and registers its ioeventfds
/// and its irqfd on `gsi`.
pub(super) fn add_mmio(
    (drive, block): (&str, &Arc<Block>),
    (base, gsi): (u64, u32),
    vm_fd: &VmFd,
    memory: &GuestMemory,
    shared_mmio: &mut SharedBus,
) -> Result<(), DiskError> {
    let id = || drive.to_owned();
    let transport = MmioTransport::new(block.clone(), memory.clone())
        .map_err(|source| DiskError::Transport { id: id(), source })?;
    for (queue, fd) in (0u32..).zip(transport.queue_events()) {
        let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        vm_fd
            .register_ioevent(fd, &addr, queue)
            .map_err(|source| DiskError::Ioevent {
                id: id(),
                queue,
                source,
            })?;
    }
    vm_fd
        .register_irqfd(transport.irqfd(), gsi)
        .map_err(|source| DiskError::Irqfd {
            id: id(),
            gsi,
            source,
        })?;
    let name: &'static str = "virtio-mmio";
    shared_mmio
        .insert(name, base, VIRTIO_MMIO_SIZE, Arc::new(transport))
        .map_err(|source| DiskError::Bus { id: id(), source })?;
    Ok(())
}

/// The VM's ioeventfds for the virtio-pci transports: `KVM_IOEVENTFD` on MMIO addresses, any
/// width, no datamatch. A vCPU moving a BAR calls it; KVM takes its own locks.
#[derive(Debug)]
pub(super) struct KvmIoevents(pub(super) Arc<VmFd>);

impl Ioevents for KvmIoevents {
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), io::Error> {
        self.0
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), io::Error> {
        self.0
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Puts the virtio-pci transport of `block` (of drive `drive`) on `pci` with its BAR at `bar`
/// (in one of the host bridge's `windows`), its MSI-X vectors on GSIs `first_gsi` on and its INTx
/// line on `intx_gsi` if any, registering one irqfd per vector and a resampling irqfd
/// (`KVM_IRQFD_FLAG_RESAMPLE`) for the line; its queues' ioeventfds go through `ioevents` once
/// the guest decodes the BAR. Returns its device number on the bus.
pub(super) fn add_pci(
    (drive, block): (&str, &Arc<Block>),
    (bar, first_gsi, intx_gsi, windows): (u64, u32, Option<u32>, &[Range<u64>]),
    vm_fd: &VmFd,
    memory: &GuestMemory,
    (pci, routes, ioevents): (&mut PciRoot, Arc<dyn MsiRoutes>, Arc<dyn Ioevents>),
) -> Result<u8, DiskError> {
    let id = || drive.to_owned();
    let wiring = PciWiring {
        bar,
        first_gsi,
        intx_gsi,
        routes,
        ioevents,
        windows: windows.to_vec(),
    };
    let transport = VirtioPciTransport::new(block.clone(), memory.clone(), wiring)
        .map_err(|source| DiskError::Transport { id: id(), source })?;
    let irqfds = transport
        .vector_irqfds()
        .map_err(|source| DiskError::Transport {
            id: id(),
            source: devices::virtio::TransportError::Irqfd(source),
        })?;
    for (gsi, fd) in &irqfds {
        vm_fd
            .register_irqfd(fd, *gsi)
            .map_err(|source| DiskError::Irqfd {
                id: id(),
                gsi: *gsi,
                source,
            })?;
    }
    if let Some(fds) = transport.intx_irqfd() {
        let (gsi, irqfd, resample) = fds.map_err(|source| DiskError::Transport {
            id: id(),
            source: devices::virtio::TransportError::Irqfd(source),
        })?;
        vm_fd
            .register_irqfd_with_resample(&irqfd, &resample, gsi)
            .map_err(|source| DiskError::Irqfd {
                id: id(),
                gsi,
                source,
            })?;
    }
    pci.add(Arc::new(transport))
        .map_err(|source| DiskError::Pci { id: id(), source })
}
