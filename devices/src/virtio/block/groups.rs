//! Queue groups: the device's queues split into groups, each served in its own context (one
//! group with every queue on the main loop or one iothread; one group per iothread with
//! `iothread-vq-mapping`). A group owns what its queues' requests touch: the
//! queues and their notification eventfds, the in-flight table, the segment pool, the requests
//! kept for a retry, and an I/O engine ([`Aio`]: worker pool, io_uring ring, completion eventfd)
//! whose completions its context reaps, as QEMU gives each `AioContext` its own thread pool.
//!
//! Locking: a group's state is behind a mutex taken only with the group's context held, so it
//! is never contended, and a request takes exactly that one lock. What the groups share is read
//! or set without a lock: the negotiated features, `broken` and `quiescing` (atomics of the
//! device), statistics, stages and the I/O status (atomics of their own), and the image
//! (thread-safe: the block layer serves several threads at once). Whatever involves every group
//! (activation, reset, drain, [`super::Block::with_drained_io`]) holds every group's context,
//! taken in lock order ([`crate::context::in_lock_order`]).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use block::aio::{Aio, AioError};
use block::DiskImage;

use super::device::Active;
use crate::context::Context;

/// Queues served in one context, with the I/O engine their requests go to (see the module
/// documentation).
pub(super) struct Group {
    pub ctx: Arc<Context>,
    pub aio: Aio,
    /// The device's indices of the group's queues, ascending.
    pub queues: Vec<usize>,
    active: Mutex<Option<Active>>,
}

impl Group {
    /// A group of `queues` (the device's indices, ascending) served in `ctx` by `aio`.
    pub(super) fn new(ctx: Arc<Context>, aio: Aio, queues: Vec<usize>) -> Self {
        Group {
            ctx,
            aio,
            queues,
            active: Mutex::new(None),
        }
    }

    /// The place of the device's queue `queue` among the group's, if the group serves it.
    pub(super) fn slot_of(&self, queue: usize) -> Option<usize> {
        self.queues.binary_search(&queue).ok()
    }

    /// The group's state; the caller holds the group's context.
    pub(super) fn active(&self) -> MutexGuard<'_, Option<Active>> {
        debug_assert!(
            self.ctx.held_by_current_thread(),
            "virtio-blk state touched without its context"
        );
        // Only taken with the context held, by code that does not panic while holding it.
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a queue is served: its group and its place among the group's queues.
#[derive(Debug, Clone, Copy)]
pub(super) struct Home {
    pub group: usize,
    pub slot: usize,
}

/// The I/O engines of a drained device ([`super::Block::with_drained_io`]), one per queue group, all
/// on the same image.
pub struct Engines<'a>(pub(super) &'a [Group]);

impl std::fmt::Debug for Engines<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("groups", &self.0.len())
            .finish()
    }
}

impl Engines<'_> {
    /// Switches every engine to `image` and returns the one they ran before; if one refuses,
    /// those already switched go back, so all keep the same image.
    pub fn replace_image(&self, image: Arc<dyn DiskImage>) -> Result<Arc<dyn DiskImage>, AioError> {
        // A device has at least one group (`Block::with_groups` refuses none).
        let (first, rest) = self.0.split_at(1);
        let old = first[0].aio.replace_image(Arc::clone(&image))?;
        for (index, group) in rest.iter().enumerate() {
            if let Err(e) = group.aio.replace_image(Arc::clone(&image)) {
                for done in &self.0[..=index] {
                    if let Err(back) = done.aio.replace_image(Arc::clone(&old)) {
                        log::error!("cannot switch an I/O engine back to its image: {back}");
                    }
                }
                return Err(e);
            }
        }
        Ok(old)
    }
}
