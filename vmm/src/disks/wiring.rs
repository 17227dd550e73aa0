//! One disk on the machine: its virtio-blk device, built in the context that serves it; its
//! virtio-mmio transport on the shared MMIO bus; and the KVM notifications that spare userspace
//! a round trip: one ioeventfd per queue at its QueueNotify register (datamatch: the queue index)
//! and one irqfd on its GSI.
//!
//! Locks: this runs while the VM is built, before any vCPU exists and before the shared bus goes
//! behind the global lock's read-write lock, so it takes none of the VM's locks. Afterwards the
//! ioeventfds are read and the irqfd written in the device's context, and a vCPU reaches the
//! transport through the shared bus without the global lock.

use std::sync::Arc;

use block::aio::Workers;
use block::{Image, WithPolicy};
use devices::bus::SharedBus;
use devices::context::Context;
use devices::virtio::block::{Block, BlockConfig, ErrorSink};
use devices::virtio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};

use super::snapshot::LiveImage;
use super::DiskError;
use crate::arch::x86_64::layout::VIRTIO_MMIO_SIZE;
use crate::arch::x86_64::memory::GuestMemory;
use crate::drive::DiskSpec;

/// One disk to add: its flags, its image, the context that serves it, where its error reports
/// go, its MMIO window and interrupt line.
pub(super) struct NewDisk<'a> {
    pub(super) spec: &'a DiskSpec,
    pub(super) image: Image,
    pub(super) ctx: Arc<Context>,
    pub(super) sink: ErrorSink,
    pub(super) base: u64,
    pub(super) gsi: u32,
}

/// Builds the device of one disk in its context, puts its transport on `shared_mmio` at its base
/// and registers its ioeventfds and its irqfd on its GSI. Returns the device and the image it
/// serves.
pub(super) fn add_disk(
    disk: NewDisk<'_>,
    vm_fd: &VmFd,
    memory: &GuestMemory,
    shared_mmio: &mut SharedBus,
) -> Result<(Arc<Block>, LiveImage), DiskError> {
    let spec = disk.spec;
    let id = || spec.drive.id.clone();
    let config = BlockConfig {
        id: spec.drive.id.clone(),
        serial: spec.device.serial.clone(),
        num_queues: spec.device.num_queues,
        queue_size: spec.device.queue_size,
        discard: spec.drive.discard,
        // Workers doing the image's I/O (with `aio=io_uring`, what the ring does not take).
        io_workers: Workers::default(),
        aio: spec.drive.aio,
        stats_intervals: spec.drive.stats_intervals.clone(),
        time_stages: true,
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
    let block = Block::new(config, image, disk.ctx)
        .map_err(|source| DiskError::Device { id: id(), source })?;
    let transport = MmioTransport::new(block.clone(), memory.clone())
        .map_err(|source| DiskError::Transport { id: id(), source })?;
    for (queue, fd) in (0u32..).zip(transport.queue_events()) {
        let addr = IoEventAddress::Mmio(disk.base + QUEUE_NOTIFY_OFFSET);
        vm_fd
            .register_ioevent(fd, &addr, queue)
            .map_err(|source| DiskError::Ioevent {
                id: id(),
                queue,
                source,
            })?;
    }
    vm_fd
        .register_irqfd(transport.irqfd(), disk.gsi)
        .map_err(|source| DiskError::Irqfd {
            id: id(),
            gsi: disk.gsi,
            source,
        })?;
    let name: &'static str = "virtio-mmio";
    shared_mmio
        .insert(name, disk.base, VIRTIO_MMIO_SIZE, Arc::new(transport))
        .map_err(|source| DiskError::Bus { id: id(), source })?;
    Ok((block, live))
}
