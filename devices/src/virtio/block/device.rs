//! The virtio-blk device: what it offers (features, configuration space), how it starts
//! (activation registers its queue notifications and its completion eventfds with its contexts)
//! and how it stops (reset and shutdown drain in-flight requests as docs/DESIGN.md, "Draining", asks).
//!
//! Queue groups (`groups.rs`): the queues are served in one context or split over several,
//! each group with its own state and I/O engine; reset, drain, [`Block::with_drained_io`] and
//! the transport take every group's context, in lock order; block jobs, resizes and snapshots
//! run in the first group's context, the device's home ([`Block::context`]).
//!
//! Draining: the device is marked quiescing (no new request is taken from the queues), every
//! nesting level of its contexts is released, and the thread waits until each group's worker
//! pool (and, with `aio=io_uring`, ring) has run every submitted request
//! ([`block::aio::Aio::wait_idle`], which needs nothing from the context's thread). It then
//! acquires the contexts again and completes what is left itself; requests an error policy kept
//! for a retry are dropped unanswered, as QEMU's reset drops them. So a drain never depends on a
//! context's loop running (the main loop may be busy in a handler), and that loop (the main
//! loop's or an iothread's) keeps serving its other devices, and may complete this one's
//! requests, meanwhile. The transport holds none of its own locks during a reset's drain.
//! [`Block::with_drained_io`] drains the same way for a live change of the image (a snapshot,
//! a resize), then serves the queues again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use block::aio::{Aio, AioError, Engine, Workers};
use block::DiskImage;
use vmm_sys_util::epoll::EventSet;

use super::event_handler::QueueState;
use super::groups::{Engines, Group, Home};
use super::io_error::{ErrorPolicy, ErrorSink, IoStatus, IoStatusCell};
use super::request::Buf;
use super::stages::{StageStats, Times};
use super::stats::BlockStats;
use super::{features, DEVICE_ID, ID_BYTES, SECTOR_SHIFT};
use crate::context::{in_lock_order, Context, Handler, HandlerId, PollReady};
use crate::virtio::{
    features as common, ActivateError, Activation, GuestMemoryMmap, Interrupt, VirtioDevice,
};

/// Errors of creating a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Starting the worker pool or the io_uring ring failed.
    #[error("cannot start the I/O engine of drive {0}")]
    Aio(String, #[source] AioError),
    /// A queue size that is not a power of two between 2 and 32768 (virtio 1.2, 2.7).
    #[error("queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    /// Zero queues, or more than the 64 the device supports.
    #[error("{0} queues is not between 1 and 64")]
    NumQueues(u16),
    /// Queue groups that do not serve every queue exactly once.
    #[error("queue {queue} is served by {groups} queue groups, not one")]
    QueueGroups {
        /// The queue.
        queue: u16,
        /// How many groups list it.
        groups: usize,
    },
}

/// How a disk is presented.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// The drive's id (names the worker threads).
    pub id: String,
    /// GET_ID answer (`-device ...,serial=`); at most 20 bytes are used.
    pub serial: String,
    /// Number of request queues (`num-queues`).
    pub num_queues: u16,
    /// Maximum size of each queue (`queue-size`).
    pub queue_size: u16,
    /// Whether discard requests reach the image (`discard=unmap`) or are ignored (`ignore`).
    pub discard: bool,
    /// Worker threads for image I/O (with `aio=io_uring`, for what the ring does not take).
    pub io_workers: Workers,
    /// The engine doing the image's data I/O (`-drive aio=`).
    pub aio: Engine,
    /// Intervals in seconds for `timed_stats` (`-drive stats-intervals=`).
    pub stats_intervals: Vec<u32>,
    /// Whether each request's stages are timed (`stages.rs`; on by default).
    pub time_stages: bool,
    /// What a failed read does (`-drive rerror=`).
    pub on_read_error: ErrorPolicy,
    /// What a failed write, write-zeroes, discard or flush does (`-drive werror=`).
    pub on_write_error: ErrorPolicy,
    /// Hears of every failed request (the VMM's `BLOCK_IO_ERROR` and stop).
    pub error_sink: Option<ErrorSink>,
}

impl Default for BlockConfig {
    /// QEMU's defaults for virtio-blk: one queue of 256, `discard=ignore`, `rerror=report`,
    /// `werror=enospc`.
    fn default() -> Self {
        BlockConfig {
            id: "drive".to_owned(),
            serial: String::new(),
            num_queues: 1,
            queue_size: 256,
            discard: false,
            io_workers: Workers::default(),
            aio: Engine::Threads,
            stats_intervals: Vec::new(),
            time_stages: true,
            on_read_error: ErrorPolicy::READ_DEFAULT,
            on_write_error: ErrorPolicy::WRITE_DEFAULT,
            error_sink: None,
        }
    }
}

/// Size of the configuration space we fill: `struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding (5.2.4).
const CONFIG_LEN: usize = 60;
/// Largest segment the driver may use (`size_max`): 1 MiB.
const SIZE_MAX: u32 = 1 << 20;
/// Discard and write-zeroes limits in sectors: QEMU's `BDRV_REQUEST_MAX_SECTORS`.
const MAX_DISCARD_SECTORS: u32 = (i32::MAX as u32) >> SECTOR_SHIFT;

/// A queue group's state while the driver has the device running.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    /// The group's queues, in the order of [`Group::queues`].
    pub queues: Vec<QueueState>,
    pub handlers: Vec<HandlerId>,
    /// Requests taken from the group's queues and not yet completed.
    pub in_flight: usize,
    /// Segment lists returned by completions, reused by later requests.
    pub seg_pool: Vec<Vec<block::aio::IoSeg>>,
    /// Reused buffer for walking a descriptor chain.
    pub scratch: Vec<Buf>,
    /// Failed requests kept for a retry (`werror=stop`...), in the order they failed; they
    /// still count in `in_flight` and hold their head in their queue's table.
    pub parked: VecDeque<block::aio::Request>,
    /// Requests completed by the reap under way, with their queue and clock reads: their
    /// stages are recorded once the interrupts are out (reused, so it allocates only to grow).
    pub finished: Vec<(usize, Times)>,
}

/// A virtio-blk device on a disk image, its queues served in one context or several.
pub struct Block {
    pub(super) me: Weak<Block>,
    pub(super) config: BlockConfig,
    pub(super) features: u64,
    pub(super) config_space: [u8; CONFIG_LEN],
    pub(super) queue_sizes: Vec<u16>,
    /// The disk's size in sectors: `config_space`'s first field, which [`Block::update_capacity`]
    /// changes while the device runs.
    capacity: AtomicU64,
    /// ConfigGeneration, bumped after each capacity change.
    generation: AtomicU32,
    pub(super) groups: Vec<Group>,
    /// Each queue's group, by queue index.
    pub(super) homes: Vec<Home>,
    /// The groups' contexts, in lock order.
    contexts: Vec<Arc<Context>>,
    /// The features the driver accepted (set on activation, with every context held).
    pub(super) acked_features: AtomicU64,
    /// Set once the device entered DEVICE_NEEDS_RESET: nothing more is processed.
    pub(super) broken: AtomicBool,
    /// Set while draining (every context held): no new request is taken from the queues.
    pub(super) quiescing: AtomicBool,
    pub(super) stats: BlockStats,
    pub(super) stages: StageStats,
    pub(super) io_status: IoStatusCell,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &self.config.id)
            .field(
                "contexts",
                &self.groups.iter().map(|g| g.ctx.name()).collect::<Vec<_>>(),
            )
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device presenting `image`, every queue served in `ctx`.
    pub fn new(
        config: BlockConfig,
        image: Arc<dyn DiskImage>,
        ctx: Arc<Context>,
    ) -> Result<Arc<Self>, Error> {
        let queues = (0..config.num_queues).collect();
        Self::with_groups(config, image, vec![(ctx, queues)])
    }

    /// A device presenting `image` whose queues are served by `groups`: a context and the
    /// queues it serves each (`iothread-vq-mapping`, see `mapping.rs`), every queue in exactly
    /// one; a group with no queue is left out. The first group left is the device's home.
    pub fn with_groups(
        config: BlockConfig,
        image: Arc<dyn DiskImage>,
        groups: Vec<(Arc<Context>, Vec<u16>)>,
    ) -> Result<Arc<Self>, Error> {
        let size = config.queue_size;
        if !size.is_power_of_two() || !(2..=32768).contains(&size) {
            return Err(Error::QueueSize(size));
        }
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(Error::NumQueues(config.num_queues));
        }
        let groups: Vec<_> = groups.into_iter().filter(|(_, q)| !q.is_empty()).collect();
        let mut listed = vec![0usize; usize::from(config.num_queues)];
        for &queue in groups.iter().flat_map(|(_, queues)| queues) {
            match listed.get_mut(usize::from(queue)) {
                Some(n) => *n += 1,
                None => return Err(Error::QueueGroups { queue, groups: 0 }),
            }
        }
        if let Some((queue, &groups)) = (0u16..).zip(&listed).find(|(_, &n)| n != 1) {
            return Err(Error::QueueGroups { queue, groups });
        }
        let capacity = image.size() >> SECTOR_SHIFT;
        let read_only = image.read_only();
        let groups = groups
            .into_iter()
            .map(|(ctx, queues)| {
                let mut queues: Vec<usize> = queues.into_iter().map(usize::from).collect();
                queues.sort_unstable();
                // Each queue has at most `size` requests in flight (one per head index), so the
                // pool never refuses one.
                let depth = queues.len() * usize::from(size);
                let aio = Aio::with_engine(
                    &config.id,
                    Arc::clone(&image),
                    config.io_workers,
                    depth,
                    config.aio,
                )
                .map_err(|e| Error::Aio(config.id.clone(), e))?;
                Ok(Group::new(ctx, aio, queues))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut homes = vec![Home { group: 0, slot: 0 }; listed.len()];
        for (group_index, group) in groups.iter().enumerate() {
            for (slot, &queue) in group.queues.iter().enumerate() {
                homes[queue] = Home {
                    group: group_index,
                    slot,
                };
            }
        }
        let contexts = in_lock_order(groups.iter().map(|g| Arc::clone(&g.ctx)));
        let mut features = common::VERSION_1
            | common::RING_INDIRECT_DESC
            | common::RING_EVENT_IDX
            | features::SIZE_MAX
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::TOPOLOGY
            | features::MQ
            | features::DISCARD
            | features::WRITE_ZEROES;
        if read_only {
            features |= features::RO;
        }
        let config_space = config_space(capacity, size, config.num_queues, config.discard);
        let stats = BlockStats::new(&config.stats_intervals);
        let stages = StageStats::new(usize::from(config.num_queues));
        Ok(Arc::new_cyclic(|me| Block {
            me: me.clone(),
            queue_sizes: vec![size; usize::from(config.num_queues)],
            config,
            features,
            config_space,
            capacity: AtomicU64::new(capacity),
            generation: AtomicU32::new(0),
            groups,
            homes,
            contexts,
            acked_features: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            quiescing: AtomicBool::new(false),
            stats,
            stages,
            io_status: IoStatusCell::default(),
        }))
    }

    /// The device's home context, its first group's (where a block job on its disk runs).
    pub fn context(&self) -> &Arc<Context> {
        &self.home().ctx
    }

    /// The first group: `with_groups` refuses a device whose queues no group serves, and a
    /// device has at least one queue.
    fn home(&self) -> &Group {
        &self.groups[0]
    }

    /// The name of the context serving each queue, by queue index.
    pub fn queue_contexts(&self) -> Vec<&str> {
        self.homes
            .iter()
            .map(|h| self.groups[h.group].ctx.name())
            .collect()
    }

    /// The engine doing the image's data I/O.
    pub fn engine(&self) -> Engine {
        self.home().aio.engine()
    }

    /// The disk's size in 512-byte sectors, as the driver reads it in configuration space.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Takes the image's size as the disk's capacity after it grew (QMP `block_resize`): the
    /// configuration space shows it, ConfigGeneration changes after it, and a started device
    /// signals a configuration change, as QEMU's `virtio_notify_config` does, so the guest's
    /// driver reads the new size without a reboot. Call it with nothing in flight (inside
    /// [`Block::with_drained_io`]), so no request was checked against the old capacity after
    /// the image grew. Acquires the home context (nested if the caller holds it).
    pub fn update_capacity(&self) {
        let home = self.home();
        let _guard = home.ctx.acquire();
        let sectors = home.aio.image().size() >> SECTOR_SHIFT;
        if self.capacity.swap(sectors, Ordering::AcqRel) == sectors {
            return;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(active) = home.active().as_ref() {
            active.interrupt.signal_config_change();
        }
    }

    /// The device's statistics (readable from any thread, no context needed).
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    /// Where the device's requests spend their time, per queue and stage (readable from any
    /// thread, no context needed).
    pub fn stages(&self) -> &StageStats {
        &self.stages
    }

    /// `query-block`'s `io-status` (readable from any thread, no context needed).
    pub fn io_status(&self) -> IoStatus {
        self.io_status.get()
    }

    /// Clears the I/O status and resubmits, in the order they failed, the requests kept by a
    /// stopping error policy (`cont`, as QEMU's restarts them when the VM runs again). Callable
    /// from any thread without the device's contexts: the work is a bottom half in each group's.
    pub fn retry_failed(&self) {
        self.io_status.reset();
        for (index, group) in self.groups.iter().enumerate() {
            let me = self.me.clone();
            group.ctx.schedule(move |_| {
                if let Some(dev) = me.upgrade() {
                    dev.resubmit_parked(index);
                }
            });
        }
    }

    /// The GET_ID answer: the serial, truncated or zero-padded to 20 bytes.
    pub(super) fn device_id(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let serial = self.config.serial.as_bytes();
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        id
    }

    /// Stops the device for good: drains it, flushes the image, and leaves its contexts.
    /// Acquires the contexts itself (nested where the caller holds them).
    pub fn shutdown(&self) -> Result<(), block::Error> {
        let _guards = Context::acquire_all(&self.contexts);
        self.drain_and_stop();
        let (ring, entered, pool) = self.groups.iter().fold((0, 0, 0), |(ring, e, pool), g| {
            let (r, p) = g.aio.requests_by_engine();
            (ring + r, e + g.aio.ring_submissions(), pool + p)
        });
        log::info!(
            "virtio-blk {}: aio={}, {ring} requests on io_uring in {entered} submissions, \
             {pool} on the worker pool",
            self.config.id,
            self.engine().name()
        );
        let image = self.home().aio.image();
        // Not on the contexts: the flush may take long.
        Context::unlocked_all(&self.contexts, || image.flush())
    }

    /// Runs `f` on the device's I/O engines with nothing in flight, while the device takes no
    /// new request (a live snapshot's switch of the image, [`Engines::replace_image`]): acquires
    /// the contexts (nested where the caller holds them), drains as a reset does (see the module
    /// documentation) but stays active, calls `f` with the contexts held, then serves the
    /// queues again, requests the driver added meanwhile first. Requests complete in the order
    /// the image finished them before `f` and are taken in the order the driver made them
    /// available after it, so none is lost or reordered across the switch. A device the driver
    /// has not started has nothing to drain.
    pub fn with_drained_io<R>(&self, f: impl FnOnce(&Engines<'_>) -> R) -> R {
        let _guards = Context::acquire_all(&self.contexts);
        let started = self.home().active().is_some();
        if started {
            self.quiescing.store(true, Ordering::Release);
            self.wait_idle();
            for group in &self.groups {
                if let Some(active) = group.active().as_mut() {
                    self.complete_all(group, active, false);
                }
            }
        }
        let result = f(&Engines(&self.groups));
        if !started {
            return result;
        }
        self.quiescing.store(false, Ordering::Release);
        for (index, group) in self.groups.iter().enumerate() {
            // A retry asked for (`cont`) while the device was quiescing found it so.
            let resume = group
                .active()
                .as_ref()
                .is_some_and(|a| !a.parked.is_empty())
                && self.io_status() == IoStatus::Ok;
            if resume {
                self.resubmit_parked(index);
            }
        }
        for index in 0..self.queue_sizes.len() {
            self.queue_notified(index);
        }
        result
    }

    /// Waits, with every context released, until each group's engine has run every request
    /// submitted to it.
    fn wait_idle(&self) {
        Context::unlocked_all(&self.contexts, || {
            for group in &self.groups {
                group.aio.wait_idle();
            }
        });
    }

    /// Drains in-flight requests (see the module documentation) and deactivates; the caller
    /// holds every context.
    fn drain_and_stop(&self) {
        if self.home().active().is_none() {
            return;
        }
        self.quiescing.store(true, Ordering::Release);
        self.wait_idle();
        for group in &self.groups {
            let mut guard = group.active();
            if let Some(active) = guard.as_mut() {
                self.complete_all(group, active, false);
                // Requests kept for a retry are dropped unanswered, as QEMU's reset drops them:
                // the driver is starting over (or the VM is ending) and never saw them complete.
                self.drop_parked(group, active);
                debug_assert_eq!(active.in_flight, 0, "requests in flight after draining");
                for id in active.handlers.drain(..) {
                    if let Err(e) = group.ctx.remove_fd(id) {
                        log::warn!("virtio-blk {}: {e}", self.config.id);
                    }
                }
            }
            *guard = None;
        }
    }

    /// Puts the device in DEVICE_NEEDS_RESET after a fault of the driver's rings, once.
    pub(super) fn set_broken(&self, interrupt: &Interrupt) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            interrupt.set_needs_reset();
        }
    }
}

impl Drop for Block {
    /// A device dropped while the driver still had it running (no `shutdown`) drains too, so no
    /// worker is left writing to guest memory and no handler stays registered.
    fn drop(&mut self) {
        let contexts = self.contexts.clone();
        let _guards = Context::acquire_all(&contexts);
        self.drain_and_stop();
    }
}

/// Builds `struct virtio_blk_config` (virtio 1.2, 5.2.4), little-endian.
fn config_space(
    capacity: u64,
    queue_size: u16,
    num_queues: u16,
    discard: bool,
) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    // seg_max: the queue less the header and status descriptors, as QEMU's seg-max-adjust.
    put(12, &u32::from(queue_size - 2).to_le_bytes());
    // geometry (16..20) is not offered.
    put(20, &512u32.to_le_bytes()); // blk_size
    put(24, &[0]); // topology.physical_block_exp: one logical block per physical block
    put(25, &[0]); // topology.alignment_offset
    put(26, &1u16.to_le_bytes()); // topology.min_io_size, in blocks
    put(28, &0u32.to_le_bytes()); // topology.opt_io_size: no preference
    put(32, &[0]); // writeback: CONFIG_WCE is not offered
    put(34, &num_queues.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[u8::from(discard)]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn contexts(&self) -> &[Arc<Context>] {
        &self.contexts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let mut space = self.config_space;
        space[..8].copy_from_slice(&self.capacity().to_le_bytes());
        if let Some(src) = space.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn config_generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        log::warn!(
            "virtio-blk {}: ignored {}-byte config write at {offset}",
            self.config.id,
            data.len()
        );
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        if self.home().active().is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (expected, given) = (self.homes.len(), activation.queues.len());
        if given != expected {
            return Err(ActivateError::QueueCount { expected, given });
        }
        let mut slots: Vec<Vec<Option<QueueState>>> = self
            .groups
            .iter()
            .map(|g| g.queues.iter().map(|_| None).collect())
            .collect();
        let mut handlers: Vec<Vec<HandlerId>> = self.groups.iter().map(|_| Vec::new()).collect();
        let register = |handlers: &mut Vec<Vec<HandlerId>>, group: usize, fd, handler, ready| {
            self.groups[group]
                .ctx
                .add_polled_fd(fd, EventSet::IN, handler, ready)
                .map(|id| handlers[group].push(id))
                .map_err(ActivateError::Register)
        };
        let result = (|| {
            for (index, (queue, event)) in activation
                .queues
                .into_iter()
                .zip(activation.queue_events)
                .enumerate()
            {
                // The transport hands over as many queues as `queue_max_sizes` has.
                let Some(&Home { group, slot }) = self.homes.get(index) else {
                    continue;
                };
                let state = QueueState::new(queue, event);
                if state.ready() {
                    let me = self.me.clone();
                    let handler: Handler = Arc::new(move |_: &Context, _| {
                        if let Some(dev) = me.upgrade() {
                            dev.queue_notified(index);
                        }
                    });
                    let me = self.me.clone();
                    let has_requests = state.poll_ready(activation.mem.clone());
                    // A device that cannot take requests has none to poll for.
                    let ready: PollReady = Arc::new(move || {
                        me.upgrade().is_some_and(|dev| {
                            !dev.broken.load(Ordering::Acquire)
                                && !dev.quiescing.load(Ordering::Acquire)
                        }) && has_requests()
                    });
                    register(&mut handlers, group, state.event_fd(), handler, ready)?;
                }
                slots[group][slot] = Some(state);
            }
            for (group, g) in self.groups.iter().enumerate() {
                let me = self.me.clone();
                let handler: Handler = Arc::new(move |ctx: &Context, _| {
                    if let Some(dev) = me.upgrade() {
                        dev.completions_ready(group, ctx.polling());
                    }
                });
                // Polled, so that completions coming while the loop polls need no eventfd
                // write and wake-up each (`Block::completions_ready`).
                let me = self.me.clone();
                let ready: PollReady = Arc::new(move || {
                    me.upgrade()
                        .and_then(|dev| dev.groups.get(group).map(|g| g.aio.has_completions()))
                        .unwrap_or(false)
                });
                register(&mut handlers, group, g.aio.completion_fd(), handler, ready)?;
            }
            Ok(())
        })();
        let queues = slots
            .into_iter()
            .map(|s| s.into_iter().collect::<Option<Vec<_>>>())
            .collect::<Option<Vec<_>>>();
        let queues = match (result, queues) {
            (Ok(()), Some(queues)) => queues,
            (result, _) => {
                for (group, ids) in self.groups.iter().zip(handlers) {
                    for id in ids {
                        // Just added; removal only fails if the fd was closed meanwhile.
                        let _ = group.ctx.remove_fd(id);
                    }
                }
                // Every slot is filled when every queue was given, as checked above.
                return Err(result
                    .err()
                    .unwrap_or(ActivateError::QueueCount { expected, given }));
            }
        };
        self.acked_features
            .store(activation.acked_features, Ordering::Release);
        self.broken.store(false, Ordering::Release);
        self.quiescing.store(false, Ordering::Release);
        for ((group, queues), handlers) in self.groups.iter().zip(queues).zip(handlers) {
            *group.active() = Some(Active {
                mem: activation.mem.clone(),
                interrupt: Arc::clone(&activation.interrupt),
                queues,
                handlers,
                in_flight: 0,
                seg_pool: Vec::new(),
                scratch: Vec::with_capacity(usize::from(self.config.queue_size)),
                parked: VecDeque::new(),
                finished: Vec::new(),
            });
        }
        // Requests the driver queued before DRIVER_OK (allowed, 3.1.1) are served now.
        for index in 0..self.queue_sizes.len() {
            self.queue_notified(index);
        }
        Ok(())
    }

    fn reset(&self) {
        self.drain_and_stop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::test_util::*;
    use super::super::{request_type as t, status as st, SECTOR_SIZE};
    use super::*;
    use crate::context::IoThread;
    use vm_memory::{Address, Bytes};

    /// A disk that grows while the driver runs: the new capacity in configuration space,
    /// ConfigGeneration bumped, InterruptStatus bit 1 (configuration change) and the interrupt
    /// raised, and sectors past the old end readable.
    #[test]
    fn a_grown_image_shows_its_capacity_with_a_config_change_interrupt() {
        // virtio-mmio: ConfigGeneration, InterruptStatus, configuration space.
        const GENERATION: u64 = 0x0fc;
        const INTERRUPT_STATUS: u64 = 0x060;
        const CONFIG: u64 = 0x100;
        let dir = tempfile::tempdir().unwrap();
        let io = IoThread::spawn("io-grow").unwrap();
        let image = raw_image(&dir, 1 << 16);
        let rig = Rig::new(io.context().clone(), Arc::clone(&image), 1, false);
        rig.start(!0);
        let capacity = |rig: &Rig<block::Image>| {
            u64::from(rig.reg(CONFIG)) | (u64::from(rig.reg(CONFIG + 4)) << 32)
        };
        assert_eq!((capacity(&rig), rig.reg(GENERATION)), (128, 0));
        // A read past the end fails before the disk grows.
        rig.header(HDR, t::IN, 128);
        rig.submit(
            0,
            0,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        rig.wait_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::IOERR);
        assert!(rig.irq_fired());
        rig.transport.interrupt().ack(!0);

        rig.dev.with_drained_io(|_| {
            image.grow(5 << 20).unwrap();
            rig.dev.update_capacity();
        });
        assert_eq!(capacity(&rig), 5 << 11);
        assert_eq!(rig.reg(GENERATION), 1);
        assert_eq!(rig.reg(INTERRUPT_STATUS), 2, "a configuration change only");
        assert!(rig.irq_fired());
        // The same size again changes nothing and raises nothing.
        rig.transport.interrupt().ack(!0);
        rig.dev.with_drained_io(|_| rig.dev.update_capacity());
        assert_eq!((rig.reg(GENERATION), rig.reg(INTERRUPT_STATUS)), (1, 0));
        assert!(!rig.irq_fired());

        rig.header(HDR, t::IN, (5 << 11) - 1);
        rig.submit(
            0,
            0,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        rig.wait_used(0, 2);
        assert_eq!(rig.byte(STATUS), st::OK);
        rig.dev.shutdown().unwrap();
        drop(rig);
        io.stop().unwrap();
    }

    #[test]
    fn config_space_and_features() {
        let rig = main_loop_rig(1 << 20, true);
        let f = rig.dev.features();
        assert_ne!(f & features::RO, 0);
        assert_ne!(f & common::RING_EVENT_IDX, 0);
        let mut cap = [0u8; 8];
        rig.transport.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (1 << 20) / SECTOR_SIZE);
        assert_eq!(rig.reg(0x100 + 12), u32::from(QSIZE - 2)); // seg_max
        assert_eq!(rig.reg(0x100 + 20), 512); // blk_size
        let mut nq = [0u8; 2];
        rig.transport.read(0x100 + 34, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), 1);
        // Past the end of configuration space reads as zero.
        assert_eq!(rig.reg(0x100 + 0x80), 0);
        assert_eq!(rig.reg(0), 0x7472_6976);
        assert_eq!(rig.reg(4), 2);
        assert_eq!(rig.reg(8), DEVICE_ID);
    }

    #[test]
    fn iothread_serves_requests_and_reset_drains_in_flight_ones() {
        let (io, rig) = iothread_rig("io-blk", 1 << 16);
        // The request gets stuck in a worker; the iothread stays responsive meanwhile.
        let opener = rig.hold_a_read();
        for _ in 0..10 {
            assert_eq!(rig.reg(0x100 + 20), 512);
        }
        // Reset waits for the read, with the context released, then completes it.
        rig.set_reg(0x70, 0);
        assert!(*rig.image.gate.lock().unwrap());
        assert_eq!(rig.used_idx(0), 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        opener.join().unwrap();
        rig.dev.shutdown().unwrap();
        io.stop().unwrap();
    }

    #[test]
    fn no_deadlock_mixing_register_accesses_and_iothread_io() {
        let io = IoThread::spawn("io-stress").unwrap();
        let rig = Arc::new(Rig::new(
            io.context().clone(),
            MemImage::new(1 << 20, false),
            1,
            false,
        ));
        rig.start(!0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let vcpus: Vec<_> = (0..2)
            .map(|_| {
                let rig = Arc::clone(&rig);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        assert_eq!(rig.reg(0x100 + 20), 512);
                        rig.set_reg(0x100 + 32, 1); // config write: ignored, takes the context
                        let pending = rig.reg(0x60);
                        rig.set_reg(0x64, pending);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for i in 0..200u16 {
            let head = (i % 4) * 3;
            rig.header(HDR + u64::from(head) * 0x20, t::OUT, u64::from(i % 64));
            rig.submit(
                0,
                head,
                &[
                    (HDR + u64::from(head) * 0x20, 16, 0),
                    (BUF, 4096, 0),
                    (STATUS + u64::from(head), 1, F_WRITE),
                ],
            );
            rig.wait_used(0, i + 1);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for v in vcpus {
            assert!(v.join().unwrap() > 0);
        }
        assert_eq!(rig.dev.stats().snapshot().wr.operations, 200);
        rig.dev.shutdown().unwrap();
        io.stop().unwrap();
    }

    /// Runs a QEMU tool, failing loudly when it is missing (ci/setup installs it).
    fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("{tool} is needed for this test (ci/setup installs it): {e}")
            })
    }

    #[test]
    fn qcow2_overlay_on_an_iothread_stays_consistent() {
        qcow2_overlay_stays_consistent(block::aio::Engine::Threads);
    }

    #[test]
    fn qcow2_overlay_on_an_iothread_with_io_uring_stays_consistent() {
        qcow2_overlay_stays_consistent(block::aio::Engine::IoUring);
    }

    /// A copy-on-write from the backing image (a worker's), reads around it (the ring's with
    /// io_uring, once the L2 table is cached), a flush; then qemu-img and qemu-io agree.
    fn qcow2_overlay_stays_consistent(engine: block::aio::Engine) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let (base_s, top_s) = (base.to_str().unwrap(), top.to_str().unwrap());
        assert!(
            qemu("qemu-img", &["create", "-q", "-f", "qcow2", base_s, "4M"])
                .status
                .success()
        );
        let fill = qemu(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 0 64k", base_s],
        );
        assert!(fill.status.success());
        let base_before = std::fs::read(&base).unwrap();
        let o = block::qcow2::create::CreateOptions {
            size: 4 << 20,
            cluster_size: 65536,
            backing: Some(("base.qcow2".into(), "qcow2".into())),
            ..Default::default()
        };
        block::create(&top, block::Format::Qcow2, &o).unwrap();
        let opts = block::OpenOptions {
            format: Some(block::Format::Qcow2),
            read_only: false,
            ..Default::default()
        };
        let image = Arc::new(block::open(&top, opts).unwrap());

        let io = IoThread::spawn("io-qcow2").unwrap();
        let rig = Rig::with_engine(io.context().clone(), image, 1, false, engine);
        assert_eq!(rig.dev.engine(), engine);
        rig.start(!0);
        // Write 4 KiB of 0x5a at byte 4096: a copy-on-write of the backing cluster.
        rig.mem
            .write_slice(&[0x5a; 4096], vm_memory::GuestAddress(BUF))
            .unwrap();
        rig.header(HDR, t::OUT, 8);
        rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 4096, 0), (STATUS, 1, F_WRITE)]);
        rig.wait_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        // Read the whole first cluster back: backing data around the new write.
        rig.header(HDR, t::IN, 0);
        rig.submit(
            0,
            3,
            &[
                (HDR, 16, 0),
                (BUF + 0x10000, 65536, F_WRITE),
                (STATUS + 1, 1, F_WRITE),
            ],
        );
        rig.wait_used(0, 2);
        assert_eq!(rig.byte(STATUS + 1), st::OK);
        let mut back = vec![0u8; 65536];
        rig.mem
            .read_slice(&mut back, vm_memory::GuestAddress(BUF + 0x10000))
            .unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0x11));
        assert!(back[4096..8192].iter().all(|&b| b == 0x5a));
        assert!(back[8192..].iter().all(|&b| b == 0x11));
        rig.header(HDR, t::FLUSH, 0);
        rig.submit(0, 6, &[(HDR, 16, 0), (STATUS + 2, 1, F_WRITE)]);
        rig.wait_used(0, 3);
        assert_eq!(rig.byte(STATUS + 2), st::OK);
        rig.dev.shutdown().unwrap();
        drop(rig);
        io.stop().unwrap();

        let check = qemu("qemu-img", &["check", top_s]);
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let verify = qemu(
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0x5a 4096 4096",
                "-c",
                "read -P 0x11 8192 4096",
                top_s,
            ],
        );
        let out = String::from_utf8_lossy(&verify.stdout);
        assert!(
            verify.status.success() && !out.contains("verification failed"),
            "{out}"
        );
        assert_eq!(std::fs::read(&base).unwrap(), base_before);
    }

    #[test]
    fn dropping_a_running_device_drains_it() {
        let (io, rig) = iothread_rig("io-drop", 1 << 16);
        let opener = rig.hold_a_read();
        let Rig {
            mem,
            image,
            dev,
            transport,
            ..
        } = rig;
        drop(transport);
        drop(dev);
        // The drop waited for the read and completed it.
        assert!(*image.gate.lock().unwrap());
        let used: u16 = mem.read_obj(used_addr(0).unchecked_add(2)).unwrap();
        assert_eq!(used, 1);
        opener.join().unwrap();
        io.stop().unwrap();
    }

    #[test]
    fn vcpu_holding_the_global_lock_resets_a_main_loop_disk_with_requests_in_flight() {
        use crate::context::{debug_assert_may_take_global_lock, set_global_lock_held};
        use std::sync::atomic::{AtomicBool, Ordering};
        let global = Arc::new(std::sync::Mutex::new(()));
        let hook_lock = Arc::clone(&global);
        let main_ctx = Context::with_dispatch_hook(
            "main-loop",
            Box::new(move |dispatch: &mut dyn FnMut()| {
                debug_assert_may_take_global_lock();
                let _big = hook_lock.lock().unwrap();
                set_global_lock_held(true);
                dispatch();
                set_global_lock_held(false);
            }),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let main_loop = {
            let (ctx, stop) = (Arc::clone(&main_ctx), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    ctx.run_once(Some(std::time::Duration::from_millis(5)))
                        .unwrap();
                }
            })
        };
        let rig = Rig::new(
            Arc::clone(&main_ctx),
            MemImage::new(1 << 16, false),
            1,
            false,
        );
        {
            // A vCPU exit: the global lock, then the transport.
            let _big = global.lock().unwrap();
            rig.start(!0);
        }
        let opener = rig.hold_a_read();
        {
            // The reset waits for the read with the global lock held: the main loop cannot run
            // meanwhile, and does not need to.
            let _big = global.lock().unwrap();
            set_global_lock_held(true);
            rig.set_reg(0x70, 0);
            set_global_lock_held(false);
        }
        assert_eq!(rig.used_idx(0), 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        opener.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        main_loop.join().unwrap();
    }
}
