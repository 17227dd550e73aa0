//! The work a virtio-blk device does in its context: taking requests from a queue when the
//! driver notifies it (ioeventfd), answering the ones that need no I/O at once, submitting the
//! others to the worker pool, and completing them when the pool's eventfd fires (status byte,
//! used ring, interrupt if the driver wants one, with event idx where negotiated).
//!
//! Every function here runs with the context of the queue group it works on held, never the
//! global lock (docs/DESIGN.md), and takes that group's state only.

use std::time::Instant;

use block::aio::{Completion, IoSeg, Op, Request};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Active, Block};
use super::groups::{Group, Home};
use super::io_error::{errno_of, ErrorAction, IoErrorEvent};
use super::request::{self, Parsed};
use super::stages::Times;
use super::stats::Kind;
use super::{
    error_chain, features, request_type, status, QueueError, DISCARD_SEGMENT_LEN, HEADER_LEN,
    SECTOR_SHIFT, WRITE_ZEROES_FLAG_UNMAP,
};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crate::virtio::GuestMemoryMmap;

/// A request handed to the worker pool.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    status: GuestAddress,
    /// Bytes the device writes into the chain on success (data and status).
    used_len: u32,
    kind: Kind,
    bytes: u64,
    /// The disk offset just past the request (for `wr_highest_offset`).
    end: u64,
    /// The handler woke for its queue (`stages.rs`).
    woke: Instant,
    /// It was taken from the ring: the start of its latency.
    start: Instant,
    /// It was handed to the engine.
    submitted: Instant,
}

/// One queue and its requests in flight, by head index.
#[derive(Debug)]
pub(super) struct QueueState {
    queue: Queue,
    event: EventFd,
    in_flight: Vec<Option<InFlight>>,
    /// The queue's next available index as the device last left it, for a polling loop to
    /// compare with the driver's (`taken_up_to`).
    taken: Arc<AtomicU16>,
}

impl QueueState {
    pub(super) fn new(queue: Queue, event: EventFd) -> Self {
        let in_flight = (0..queue.max_size()).map(|_| None).collect();
        let taken = Arc::new(AtomicU16::new(queue.next_avail()));
        QueueState {
            queue,
            event,
            in_flight,
            taken,
        }
    }

    /// Whether the driver set the queue up and enabled it.
    pub(super) fn ready(&self) -> bool {
        self.queue.ready()
    }

    /// The eventfd the driver's notifications of the queue signal.
    pub(super) fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Whether the driver has made requests available that the device has not taken, as an
    /// iothread's loop asks while it polls, without the group's state: reads the available
    /// index in `mem` and compares it with where the device left the queue.
    pub(super) fn poll_ready(&self, mem: GuestMemoryMmap) -> impl Fn() -> bool + Send + Sync {
        let taken = Arc::clone(&self.taken);
        // The available ring's `idx` follows its 16-bit `flags`.
        let idx = self.queue.avail_ring().checked_add(2).map(GuestAddress);
        move || {
            idx.and_then(|idx| mem.load::<u16>(idx, Ordering::Acquire).ok())
                .is_some_and(|avail| u16::from_le(avail) != taken.load(Ordering::Acquire))
        }
    }
}

/// How a request that did not go to the pool ends.
enum Immediate {
    /// Write this status; `used` bytes were written before it.
    Status(u8, u32),
    /// Submitted to the pool.
    Submitted,
}

/// The token of a request: queue index and head index.
fn token(queue: usize, head: u16) -> u64 {
    (u64::try_from(queue).unwrap_or(u64::MAX) << 16) | u64::from(head)
}

fn untoken(token: u64) -> (usize, usize) {
    let queue = usize::try_from(token >> 16).unwrap_or(usize::MAX);
    let head = usize::try_from(token & 0xffff).unwrap_or(usize::MAX);
    (queue, head)
}

impl Block {
    /// The driver notified queue `index`.
    pub(super) fn queue_notified(&self, index: usize) {
        let woke = Instant::now();
        let Some((group, slot)) = self.home_of(index) else {
            return;
        };
        let mut guard = group.active();
        let Some(active) = guard.as_mut() else {
            return;
        };
        if let Some(q) = active.queues.get(slot) {
            // Nothing to read just means a spurious wake-up.
            let _ = q.event.read();
        }
        if self.broken.load(Ordering::Acquire) || self.quiescing.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.process_queue(group, active, (index, slot), woke) {
            log::error!("virtio-blk {}: {}", self.config.id, error_chain(&e));
            self.set_broken(&active.interrupt);
        }
    }

    /// The group serving queue `index` and the queue's place in it.
    fn home_of(&self, index: usize) -> Option<(&Group, usize)> {
        let &Home { group, slot } = self.homes.get(index)?;
        Some((self.groups.get(group)?, slot))
    }

    /// The engine of group `group` has completions; `polling`: its context is in poll mode
    /// ([`Context::polling`](crate::context::Context::polling)), whose loop finds the next ones
    /// with [`Aio::has_completions`](block::aio::Aio::has_completions) and runs this once more
    /// out of poll mode before it blocks, so they need not signal the eventfd.
    pub(super) fn completions_ready(&self, group: usize, polling: bool) {
        let Some(group) = self.groups.get(group) else {
            return;
        };
        let mut guard = group.active();
        if let Some(active) = guard.as_mut() {
            self.complete_all(group, active, polling);
        }
    }

    /// Takes every available request from queue `index` (at `slot` in `group`), whose handler
    /// woke at `woke`.
    fn process_queue(
        &self,
        group: &Group,
        active: &mut Active,
        (index, slot): (usize, usize),
        woke: Instant,
    ) -> Result<(), QueueError> {
        let Active {
            mem,
            queues,
            scratch,
            seg_pool,
            in_flight,
            ..
        } = active;
        let acked_features = self.acked_features.load(Ordering::Acquire);
        let Some(qs) = queues.get_mut(slot) else {
            return Ok(());
        };
        if !qs.queue.ready() {
            return Ok(());
        }
        let mut notify = false;
        // While the iothread's loop polls, the driver's notifications stay off: the loop finds
        // new requests in the ring, and has the queue turn them back on before it blocks
        // (`Context::add_polled_fd`), as QEMU's virtqueues in an AioContext's poll mode.
        let polling = group.ctx.polling();
        // The pass's requests reach the kernel together when it ends (`aio-max-batch` at a
        // time, 0: 32), as QEMU plugs a virtqueue's pass (`blk_io_plug`).
        let batch = group.aio.batch(group.ctx.aio_max_batch());
        loop {
            qs.queue
                .disable_notification(&*mem)
                .map_err(|e| QueueError::DisableNotification(index, e))?;
            // A driver claiming more available entries than the queue holds is broken (2.7.6).
            let avail = qs
                .queue
                .avail_idx(&*mem, Ordering::Acquire)
                .map_err(|e| QueueError::AvailIdx(index, e))?;
            let next = qs.queue.next_avail();
            if (avail - Wrapping(next)).0 > qs.queue.size() {
                return Err(QueueError::AvailOutOfRange {
                    queue: index,
                    avail: avail.0,
                    next,
                });
            }
            // seg_max data segments plus header and status, whatever size the driver chose for
            // the queue: with indirect descriptors a chain may be longer than the queue.
            let max_descriptors = usize::from(self.config.queue_size);
            while let Some(chain) = qs.queue.pop_descriptor_chain(&*mem) {
                let taken = Instant::now();
                let parsed = request::parse(chain, mem, scratch, max_descriptors)
                    .map_err(|e| QueueError::Chain(index, e))?;
                let head = parsed.head;
                if qs
                    .in_flight
                    .get(usize::from(head))
                    .is_some_and(Option::is_some)
                {
                    return Err(QueueError::HeadInFlight { queue: index, head });
                }
                let outcome = self.start_request(
                    group,
                    mem,
                    scratch,
                    seg_pool,
                    acked_features,
                    (index, woke, taken),
                    &parsed,
                    &mut qs.in_flight,
                );
                match outcome {
                    Immediate::Submitted => *in_flight += 1,
                    Immediate::Status(st, used) => {
                        mem.write_obj(st, parsed.status).map_err(|source| {
                            QueueError::WriteStatus {
                                queue: index,
                                head,
                                source,
                            }
                        })?;
                        qs.queue
                            .add_used(&*mem, head, used.saturating_add(1))
                            .map_err(|source| QueueError::AddUsed {
                                queue: index,
                                head,
                                source,
                            })?;
                        notify = true;
                    }
                }
            }
            // Re-enable notifications; if the driver added more meanwhile, go round again.
            if polling
                || !qs
                    .queue
                    .enable_notification(&*mem)
                    .map_err(|e| QueueError::EnableNotification(index, e))?
            {
                break;
            }
        }
        drop(batch);
        qs.taken.store(qs.queue.next_avail(), Ordering::Release);
        if notify
            && qs
                .queue
                .needs_notification(&*mem)
                .map_err(|e| QueueError::NeedsNotification(index, e))?
        {
            active.interrupt.signal_used_queue(index);
            self.stages.interrupted(index);
        }
        Ok(())
    }

    /// Answers a request at once or submits it to the pool; `at` is its queue, when the
    /// queue's handler woke and when the request was taken from the ring.
    #[allow(clippy::too_many_arguments)]
    fn start_request(
        &self,
        group: &Group,
        mem: &crate::virtio::GuestMemoryMmap,
        bufs: &[request::Buf],
        seg_pool: &mut Vec<Vec<IoSeg>>,
        acked: u64,
        at: (usize, Instant, Instant),
        req: &Parsed,
        table: &mut [Option<InFlight>],
    ) -> Immediate {
        let read_only = self.features & features::RO != 0;
        let (readable, writable) = bufs.split_at(req.readable);
        let (kind, op, offset, bytes, used) = match req.req_type {
            request_type::IN | request_type::OUT => {
                let (kind, len) = if req.req_type == request_type::IN {
                    (Kind::Read, req.in_len)
                } else {
                    (Kind::Write, req.out_len)
                };
                let Some(offset) = req.disk_range(len, self.capacity()) else {
                    self.stats.invalid(kind);
                    return Immediate::Status(status::IOERR, 0);
                };
                if kind == Kind::Write && read_only {
                    self.stats.invalid(kind);
                    return Immediate::Status(status::IOERR, 0);
                }
                let used = if kind == Kind::Read { len } else { 0 };
                let Ok(used) = u32::try_from(used) else {
                    self.stats.invalid(kind);
                    return Immediate::Status(status::IOERR, 0);
                };
                let op = if kind == Kind::Read {
                    Op::Read
                } else {
                    Op::Write
                };
                (kind, op, offset, len, used)
            }
            request_type::FLUSH => (Kind::Flush, Op::Flush, 0, 0, 0),
            request_type::GET_ID => {
                let written = request::copy_to_guest(mem, writable, 0, &self.device_id()[..])
                    .ok()
                    .and_then(|n| u32::try_from(n).ok());
                return match written {
                    Some(n) => Immediate::Status(status::OK, n),
                    None => Immediate::Status(status::IOERR, 0),
                };
            }
            request_type::DISCARD | request_type::WRITE_ZEROES => {
                match self.discard_or_zeroes(mem, readable, acked, req, read_only) {
                    Ok((kind, op, offset, len)) => (kind, op, offset, len, 0),
                    Err(st) => return Immediate::Status(st, 0),
                }
            }
            _ => return Immediate::Status(status::UNSUPP, 0),
        };
        let (queue, woke, start) = at;
        if bytes == 0 && matches!(op, Op::Read | Op::Write) {
            self.stats.done(kind, 0, start, true);
            return Immediate::Status(status::OK, 0);
        }
        // With discard=ignore a discard succeeds without touching the image, as in QEMU.
        if matches!(op, Op::Discard { .. }) && !self.config.discard {
            self.stats.done(kind, bytes, start, true);
            return Immediate::Status(status::OK, 0);
        }
        let mut segs = seg_pool.pop().unwrap_or_default();
        segs.clear();
        let mapped = match op {
            Op::Read => request::host_pieces(mem, writable, 0, bytes, |p, n| {
                // SAFETY: the piece is guest memory, mapped as long as the device holds `mem`,
                // which it does until every request in flight has completed (drain on reset and
                // shutdown); the device holds no reference to it meanwhile (the guest and other
                // requests may touch it: the engines form no references either).
                segs.push(unsafe { IoSeg::new(p, n) })
            }),
            Op::Write => request::host_pieces(mem, readable, HEADER_LEN, bytes, |p, n| {
                // SAFETY: as above.
                segs.push(unsafe { IoSeg::new(p, n) })
            }),
            _ => Ok(()),
        };
        if mapped.is_err() {
            seg_pool.push(segs);
            self.stats.invalid(kind);
            return Immediate::Status(status::IOERR, 0);
        }
        let Some(slot) = table.get_mut(usize::from(req.head)) else {
            seg_pool.push(segs);
            return Immediate::Status(status::IOERR, 0);
        };
        let submitted = if self.config.time_stages {
            Instant::now()
        } else {
            start
        };
        match group.aio.submit(Request {
            op,
            offset,
            segs,
            token: token(queue, req.head),
        }) {
            Ok(()) => {
                *slot = Some(InFlight {
                    status: req.status,
                    used_len: used,
                    kind,
                    bytes,
                    end: offset.saturating_add(bytes),
                    woke,
                    start,
                    submitted,
                });
                Immediate::Submitted
            }
            Err(refused) => {
                // Cannot happen (the pool's depth covers every head of every queue), but a
                // refused request is failed rather than lost.
                seg_pool.push(refused.segs);
                self.stats.done(kind, bytes, start, false);
                Immediate::Status(status::IOERR, 0)
            }
        }
    }

    /// Checks a discard or write-zeroes request (5.2.6.2) and returns what to submit, or the
    /// status to answer with.
    fn discard_or_zeroes(
        &self,
        mem: &crate::virtio::GuestMemoryMmap,
        readable: &[request::Buf],
        acked: u64,
        req: &Parsed,
        read_only: bool,
    ) -> Result<(Kind, Op, u64, u64), u8> {
        let discard = req.req_type == request_type::DISCARD;
        let (kind, feature) = if discard {
            (Kind::Unmap, features::DISCARD)
        } else {
            (Kind::Write, features::WRITE_ZEROES)
        };
        if acked & feature == 0 {
            return Err(status::UNSUPP);
        }
        // One segment only (max_discard_seg = max_write_zeroes_seg = 1), as in QEMU.
        if req.out_len != DISCARD_SEGMENT_LEN {
            self.stats.invalid(kind);
            return Err(status::UNSUPP);
        }
        let mut seg = [0u8; 16];
        request::copy_from_guest(mem, readable, HEADER_LEN, &mut seg)
            .map_err(|()| status::IOERR)?;
        let (sector, rest) = seg.split_at(8);
        let (num, flags) = rest.split_at(4);
        let sector = u64::from_le_bytes(sector.try_into().map_err(|_| status::IOERR)?);
        let num = u32::from_le_bytes(num.try_into().map_err(|_| status::IOERR)?);
        let flags = u32::from_le_bytes(flags.try_into().map_err(|_| status::IOERR)?);
        // Unknown flags, or unmap on a discard: UNSUPP (5.2.6.2).
        if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
            self.stats.invalid(kind);
            return Err(status::UNSUPP);
        }
        let range = Parsed { sector, ..*req };
        let len = u64::from(num) << SECTOR_SHIFT;
        let Some(offset) = range.disk_range(len, self.capacity()) else {
            self.stats.invalid(kind);
            return Err(status::IOERR);
        };
        if read_only {
            self.stats.invalid(kind);
            return Err(status::IOERR);
        }
        let op = if discard {
            Op::Discard { len }
        } else {
            Op::WriteZeroes {
                len,
                may_unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0 && self.config.discard,
            }
        };
        Ok((kind, op, offset, len))
    }

    /// Completes every request `group`'s engine has finished, and interrupts the driver where
    /// needed. Reaps even with nothing in flight: that clears the completion eventfd, which a
    /// reap leaves signalled when it took a completion announced after it cleared it, and
    /// which the loop would otherwise find ready on every pass. With `polling`, the completions
    /// that come next leave the eventfd alone ([`block::aio::Aio::reap_polling`]): the caller
    /// polls for them and calls this again without `polling` before it sleeps.
    pub(super) fn complete_all(&self, group: &Group, active: &mut Active, polling: bool) {
        // Requests completed, by their queue's place in the group (at most 64).
        let mut reaped = [0u64; 64];
        let mut fault = None;
        let each = |done| match self.complete(group, active, done) {
            Ok(Some(slot)) => {
                if let Some(n) = reaped.get_mut(slot) {
                    *n += 1;
                }
            }
            Ok(None) => {}
            Err(e) => fault = Some(e),
        };
        if polling {
            group.aio.reap_polling(each);
        } else {
            group.aio.reap(each);
        }
        for ((&index, &n), qs) in group.queues.iter().zip(&reaped).zip(&mut active.queues) {
            self.stages.reaped(index, n);
            if n > 0 {
                match qs.queue.needs_notification(&active.mem) {
                    Ok(true) => {
                        active.interrupt.signal_used_queue(index);
                        self.stages.interrupted(index);
                    }
                    Ok(false) => {}
                    Err(e) => fault = Some(QueueError::NeedsNotification(index, e)),
                }
            }
        }
        // One clock read for the reap: the guest has its used entries and interrupts.
        if !active.finished.is_empty() {
            let completed = Instant::now();
            for (queue, mut times) in active.finished.drain(..) {
                times.completed = completed;
                self.stages.record(queue, &times);
            }
        }
        if let Some(e) = fault {
            log::error!("virtio-blk {}: {}", self.config.id, error_chain(&e));
            self.set_broken(&active.interrupt);
        }
    }

    /// Completes one request of `group`; returns its queue's place in the group, or `None` when
    /// its failure keeps it for a retry (see `io_error.rs`).
    fn complete(
        &self,
        group: &Group,
        active: &mut Active,
        done: Completion,
    ) -> Result<Option<usize>, QueueError> {
        let Completion {
            request,
            result,
            trace,
        } = done;
        let (queue, head) = untoken(request.token);
        let unknown = QueueError::UnknownCompletion { queue, head };
        let place = group.slot_of(queue);
        let slot = place
            .and_then(|place| active.queues.get_mut(place))
            .and_then(|qs| qs.in_flight.get_mut(head));
        let (Some(place), Some(slot), Ok(head)) = (place, slot, u16::try_from(head)) else {
            active.seg_pool.push(request.segs);
            return Err(unknown);
        };
        let Some(info) = *slot else {
            active.seg_pool.push(request.segs);
            return Err(unknown);
        };
        let ok = match &result {
            Ok(()) => true,
            Err(e) => match self.failed(&info, e) {
                ErrorAction::Stop => {
                    active.parked.push_back(request);
                    return Ok(None);
                }
                ErrorAction::Report => false,
                ErrorAction::Ignore => true,
            },
        };
        *slot = None;
        active.in_flight -= 1;
        active.seg_pool.push(request.segs);
        // An ignored error counts as done, as QEMU counts it.
        self.stats.done(info.kind, info.bytes, info.start, ok);
        if ok && self.config.time_stages {
            active.finished.push((
                queue,
                Times {
                    woke: info.woke,
                    taken: info.start,
                    submitted: info.submitted,
                    trace,
                    // Set once the reap's interrupts are out.
                    completed: trace.done,
                },
            ));
        }
        if result.is_ok() && info.kind == Kind::Write {
            self.stats.wrote_up_to(info.end);
        }
        let (st, used) = if ok {
            (status::OK, info.used_len)
        } else {
            (status::IOERR, 0)
        };
        let Some(qs) = active.queues.get_mut(place) else {
            return Err(unknown);
        };
        active
            .mem
            .write_obj(st, info.status)
            .map_err(|source| QueueError::WriteStatus {
                queue,
                head,
                source,
            })?;
        qs.queue
            .add_used(&active.mem, head, used.saturating_add(1))
            .map_err(|source| QueueError::AddUsed {
                queue,
                head,
                source,
            })?;
        Ok(Some(place))
    }

    /// Decides what the failure `e` of a request does (the error policy of its kind), records a
    /// stopping error in the I/O status and tells the sink.
    fn failed(&self, info: &InFlight, e: &block::Error) -> ErrorAction {
        let is_read = info.kind == Kind::Read;
        let errno = errno_of(e);
        let policy = if is_read {
            self.config.on_read_error
        } else {
            self.config.on_write_error
        };
        let action = policy.action(errno);
        log::warn!(
            "virtio-blk {}: {} (action: {})",
            self.config.id,
            error_chain(e),
            action.name()
        );
        if action == ErrorAction::Stop {
            // Before the sink hears of it, so `query-block` agrees with the event.
            self.io_status.set_error(errno);
        }
        if let Some(sink) = &self.config.error_sink {
            (sink.0)(IoErrorEvent {
                drive: self.config.id.clone(),
                is_read,
                action,
                errno,
            });
        }
        action
    }

    /// Resubmits the requests of group `group` kept for a retry, in the order they failed (a
    /// bottom half that [`Block::retry_failed`] schedules in the group's context).
    pub(super) fn resubmit_parked(&self, group: usize) {
        let Some(group) = self.groups.get(group) else {
            return;
        };
        let mut guard = group.active();
        let Some(active) = guard.as_mut() else {
            return;
        };
        if self.broken.load(Ordering::Acquire) || self.quiescing.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let _batch = group.aio.batch(group.ctx.aio_max_batch());
        while let Some(request) = active.parked.pop_front() {
            let (queue, head) = untoken(request.token);
            if let Some(Some(info)) = group
                .slot_of(queue)
                .and_then(|place| active.queues.get_mut(place))
                .and_then(|qs| qs.in_flight.get_mut(head))
            {
                // The latency counted is the retry's, as QEMU starts its accounting again.
                info.woke = now;
                info.start = now;
                info.submitted = now;
            }
            if let Err(refused) = group.aio.submit(request) {
                // Cannot happen (the pool's depth covers every head of every queue); kept for
                // the next retry rather than lost.
                log::error!("virtio-blk {}: retry refused by the pool", self.config.id);
                active.parked.push_front(refused);
                break;
            }
        }
    }

    /// Drops the requests of `group` kept for a retry, unanswered (reset and shutdown).
    pub(super) fn drop_parked(&self, group: &Group, active: &mut Active) {
        while let Some(request) = active.parked.pop_front() {
            let (queue, head) = untoken(request.token);
            if let Some(slot) = group
                .slot_of(queue)
                .and_then(|place| active.queues.get_mut(place))
                .and_then(|qs| qs.in_flight.get_mut(head))
            {
                *slot = None;
            }
            active.in_flight -= 1;
            active.seg_pool.push(request.segs);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::test_util::*;
    use super::super::{request_type as t, status as st};
    use crate::context::Context;
    use crate::virtio::status as dev_status;
    use block::DiskImage;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn write_then_read_back_split_across_descriptors() {
        let rig = main_loop_rig(1 << 20, false);
        rig.start(!0);
        let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        rig.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        rig.header(HDR, t::OUT, 3);
        rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 1024, 0), (STATUS, 1, F_WRITE)]);
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        assert_eq!(rig.used(0, 0), (0, 1));
        assert_eq!(
            &rig.image.data.lock().unwrap()[3 * 512..3 * 512 + 1024],
            &data[..]
        );
        assert!(rig.irq_fired());
        assert_eq!(rig.reg(0x60) & 1, 1);
        rig.set_reg(0x64, 1);
        assert_eq!(rig.reg(0x60), 0);

        // Read it back into two buffers, the header and status sharing no descriptor.
        rig.header(HDR, t::IN, 3);
        rig.submit(
            0,
            4,
            &[
                (HDR, 16, 0),
                (BUF + 0x2000, 512, F_WRITE),
                (BUF + 0x3000, 512, F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
        );
        rig.run_until_used(0, 2);
        assert_eq!(rig.byte(STATUS), st::OK);
        assert_eq!(rig.used(0, 1), (4, 1025));
        let mut back = vec![0u8; 1024];
        rig.mem
            .read_slice(&mut back[..512], GuestAddress(BUF + 0x2000))
            .unwrap();
        rig.mem
            .read_slice(&mut back[512..], GuestAddress(BUF + 0x3000))
            .unwrap();
        assert_eq!(back, data);
        let s = rig.dev.stats().snapshot();
        assert_eq!(
            (s.rd.operations, s.rd.bytes, s.wr.operations, s.wr.bytes),
            (1, 1024, 1, 1024)
        );
        // The write covered sectors 3 and 4.
        assert_eq!(s.wr_highest_offset, 5 * 512);
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let rig = main_loop_rig(1 << 20, false);
        rig.start(!0);
        rig.header(HDR, t::FLUSH, 0);
        rig.submit(0, 0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::OK);

        rig.header(HDR, t::GET_ID, 0);
        rig.submit(
            0,
            2,
            &[(HDR, 16, 0), (BUF, 20, F_WRITE), (STATUS + 1, 1, F_WRITE)],
        );
        rig.run_until_used(0, 2);
        assert_eq!(rig.byte(STATUS + 1), st::OK);
        assert_eq!(rig.used(0, 1), (2, 21));
        let mut id = [0u8; 20];
        rig.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id, b"serial-0123456789abc");

        rig.header(HDR, 99, 0);
        rig.submit(0, 5, &[(HDR, 16, 0), (STATUS + 2, 1, F_WRITE)]);
        rig.run_until_used(0, 3);
        assert_eq!(rig.byte(STATUS + 2), st::UNSUPP);
        assert_eq!(rig.dev.stats().snapshot().flush.operations, 1);
    }

    #[test]
    fn out_of_range_overflowing_and_unaligned_requests_fail_with_ioerr() {
        let rig = main_loop_rig(8 * 512, false);
        rig.start(!0);
        let cases: [(u64, u32); 4] = [
            (8, 512),        // starts at the end
            (7, 1024),       // runs past the end
            (u64::MAX, 512), // sector arithmetic overflows
            (0, 100),        // not whole sectors
        ];
        for (i, (sector, len)) in cases.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let status = STATUS + u64::from(i);
            rig.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            rig.header(HDR + 0x20 * u64::from(i), t::IN, *sector);
            rig.submit(
                0,
                i * 3,
                &[
                    (HDR + 0x20 * u64::from(i), 16, 0),
                    (BUF, *len, F_WRITE),
                    (status, 1, F_WRITE),
                ],
            );
            rig.run_until_used(0, i + 1);
            assert_eq!(rig.byte(status), st::IOERR, "case {i}");
        }
        assert_eq!(rig.dev.stats().snapshot().rd.invalid_operations, 4);
        assert_eq!(rig.reg(0x70) & dev_status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn read_only_disk_refuses_writes_and_keeps_the_image() {
        let rig = main_loop_rig(1 << 16, true);
        rig.start(!0);
        rig.mem
            .write_slice(&[0xaa; 512], GuestAddress(BUF))
            .unwrap();
        rig.header(HDR, t::OUT, 0);
        rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, F_WRITE)]);
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::IOERR);
        assert!(rig.image.data.lock().unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn a_failing_image_gives_ioerr_and_counts_as_failed() {
        let rig = main_loop_rig(1 << 16, false);
        rig.start(!0);
        rig.image
            .fail_reads
            .store(true, std::sync::atomic::Ordering::SeqCst);
        rig.header(HDR, t::IN, 0);
        rig.submit(
            0,
            0,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::IOERR);
        assert_eq!(rig.used(0, 0), (0, 1));
        assert_eq!(rig.dev.stats().snapshot().rd.failed_operations, 1);
    }

    /// Writes a discard/write-zeroes segment at `addr`.
    fn dwz(rig: &Rig, addr: u64, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        rig.mem.write_slice(&s, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let rig = main_loop_rig(1 << 16, false);
        rig.image.data.lock().unwrap().fill(0x55);
        rig.start(!0);
        // Write zeroes over sectors 2..4, with unmap allowed.
        rig.header(HDR, t::WRITE_ZEROES, 0);
        dwz(&rig, BUF, 2, 2, super::super::WRITE_ZEROES_FLAG_UNMAP);
        rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, F_WRITE)]);
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        {
            let d = rig.image.data.lock().unwrap();
            assert!(d[1024..2048].iter().all(|&b| b == 0));
            assert_eq!(d[1023], 0x55);
            assert_eq!(d[2048], 0x55);
        }
        // Discard sector 0 (discard=unmap reaches the image).
        rig.header(HDR, t::DISCARD, 0);
        dwz(&rig, BUF, 0, 1, 0);
        rig.submit(
            0,
            3,
            &[(HDR, 16, 0), (BUF, 16, 0), (STATUS + 1, 1, F_WRITE)],
        );
        rig.run_until_used(0, 2);
        assert_eq!(rig.byte(STATUS + 1), st::OK);
        assert!(rig.image.data.lock().unwrap()[..512]
            .iter()
            .all(|&b| b == 0));
        // Unmap flag on a discard, unknown flags, two segments: UNSUPP; past the end: IOERR.
        let bad: [(u32, u64, u32, u32, u8); 4] = [
            (t::DISCARD, 0, 1, 1, st::UNSUPP),
            (t::WRITE_ZEROES, 0, 1, 2, st::UNSUPP),
            (t::WRITE_ZEROES, 0, 1, 0, st::UNSUPP), // sent with 32 bytes below
            (t::WRITE_ZEROES, 127, 2, 0, st::IOERR),
        ];
        for (i, (ty, sector, num, flags, want)) in bad.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let status = STATUS + 2 + u64::from(i);
            rig.header(HDR, *ty, 0);
            dwz(&rig, BUF, *sector, *num, *flags);
            let len = if i == 2 { 32 } else { 16 };
            rig.submit(0, 0, &[(HDR, 16, 0), (BUF, len, 0), (status, 1, F_WRITE)]);
            rig.run_until_used(0, 3 + i);
            assert_eq!(rig.byte(status), *want, "case {i}");
        }
        let s = rig.dev.stats().snapshot();
        assert_eq!((s.wr.operations, s.unmap.operations), (1, 1));
    }

    #[test]
    fn indirect_descriptors() {
        let rig = main_loop_rig(1 << 16, false);
        rig.image.data.lock().unwrap()[512..1024].fill(0x77);
        rig.start(!0);
        rig.header(HDR, t::IN, 1);
        let table = DATA + 0x8000;
        let descs = [
            Descriptor::new(HDR, 16, F_NEXT, 1),
            Descriptor::new(BUF, 512, F_WRITE | F_NEXT, 2),
            Descriptor::new(STATUS, 1, F_WRITE, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            rig.mem
                .write_obj(*d, GuestAddress(table + 16 * u64::try_from(i).unwrap()))
                .unwrap();
        }
        rig.store_desc(0, 0, Descriptor::new(table, 48, F_INDIRECT, 0));
        rig.publish(0, 0);
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        assert_eq!(rig.used(0, 0), (0, 513));
        assert_eq!(rig.byte(BUF + 511), 0x77);
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
        let rig = main_loop_rig(1 << 16, false);
        rig.start(!0);
        // used_event = 1: the driver wants an interrupt only once the used index passes 1.
        rig.set_used_event(0, 1);
        for i in 0..2u16 {
            rig.header(HDR, t::FLUSH, 0);
            rig.submit(0, i * 2, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
            rig.run_until_used(0, i + 1);
            assert_eq!(rig.irq_fired(), i == 1, "request {i}");
        }
        // The device asks to be notified at the next available index (avail_event).
        assert_eq!(rig.avail_event(0), 2);
    }

    /// While an iothread's loop polls, the device leaves the driver's notifications off (with
    /// event idx: `avail_event` where it was) and takes the requests the driver makes available
    /// without notifying, which the loop finds in the ring; once the loop runs out of work, the
    /// queue turns them back on (`avail_event` at the next request) before the loop blocks.
    #[test]
    fn a_polling_loop_keeps_notifications_off_and_finds_requests_in_the_ring() {
        let rig = polled_rig();
        let window = std::time::Duration::from_millis(200);
        // Wakes the loop once it has blocked, as the next event would.
        let wake_later = || {
            let ctx = std::sync::Arc::clone(&rig.ctx);
            std::thread::spawn(move || {
                std::thread::sleep(2 * window);
                ctx.notify();
            })
        };
        assert_eq!(rig.avail_event(0), 0);

        // A notified request, served while polling: notifications stay off.
        enter_poll_mode(&rig, window);
        assert_eq!(rig.byte(STATUS), st::OK);
        assert_eq!(
            rig.avail_event(0),
            0,
            "notifications turned back on while polling"
        );

        // One made available without a notification: found in the ring.
        store_get_id(&rig, 3, STATUS + 1);
        rig.make_available(0, 3);
        let waker = wake_later();
        rig.ctx.run_once_polling_for(window).unwrap();
        assert_eq!(
            rig.used_idx(0),
            2,
            "a request left in the ring while polling"
        );
        assert_eq!(rig.byte(STATUS + 1), st::OK);
        waker.join().unwrap();
        rig.ctx.run_once(Some(std::time::Duration::ZERO)).unwrap();

        // Nothing more: the loop leaves poll mode, the queue turns notifications back on, and
        // the loop blocks (until woken).
        let waker = wake_later();
        rig.ctx.run_once_polling_for(window).unwrap();
        waker.join().unwrap();
        assert!(!rig.ctx.polling());
        assert_eq!(rig.avail_event(0), 2);
        assert_eq!(rig.used_idx(0), 2);
    }

    /// A device on a context the test thread runs as an iothread's loop, started with every
    /// feature it offers (event idx among them).
    fn polled_rig() -> Rig {
        let rig = Rig::new(
            Context::new("io-polled").unwrap(),
            MemImage::new(1 << 16, false),
            1,
            false,
        );
        rig.start(!0);
        rig
    }

    /// Places a GET_ID request at head `head` of queue 0, its status byte at `status`.
    fn store_get_id(rig: &Rig, head: u16, status: u64) {
        rig.header(HDR, t::GET_ID, 0);
        let chain = [(HDR, 16, 0), (BUF, 20, F_WRITE), (status, 1, F_WRITE)];
        rig.store_chain(0, head, &chain);
    }

    /// Puts the context in poll mode, the queue's notifications off: a notified request (head
    /// 0, status at `STATUS`), served by a loop polling for `window`.
    fn enter_poll_mode(rig: &Rig, window: std::time::Duration) {
        store_get_id(rig, 0, STATUS);
        rig.publish(0, 0);
        rig.ctx.run_once_polling_for(window).unwrap();
        assert_eq!(rig.used_idx(0), 1);
        assert!(rig.ctx.polling());
    }

    /// Makes a 512-byte read of sector 0 available at head `head` of queue 0 (status at
    /// `status`) and notifies; the image's gate holds it in a worker until `release` opens it.
    fn read_held(rig: &Rig, head: u16, status: u64) {
        rig.image.set_gate(false);
        rig.header(HDR, t::IN, 0);
        rig.submit(
            0,
            head,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (status, 1, F_WRITE)],
        );
    }

    /// Opens the image's gate after 20 ms, from another thread.
    fn release(rig: &Rig) -> std::thread::JoinHandle<()> {
        let image = std::sync::Arc::clone(&rig.image);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            image.set_gate(true);
        })
    }

    /// Completions reaped while the loop polls leave the eventfd alone (the poll finds the next
    /// ones); before the loop blocks it reaps once more out of poll mode, after which a
    /// completion signals the eventfd again and wakes the sleeping loop.
    #[test]
    fn completions_found_by_polling_still_wake_the_loop_once_it_blocks() {
        use std::sync::mpsc::{self, RecvTimeoutError};
        let rig = polled_rig();
        let window = std::time::Duration::from_secs(1);
        enter_poll_mode(&rig, window);
        for (head, used) in [(4u16, 2u16), (8, 3)] {
            read_held(&rig, head, STATUS + u64::from(head));
            let opener = release(&rig);
            // Passes end on the read's notification, its completion, or a wake-up that a lost
            // completion would leave the loop waiting for.
            let ctx = std::sync::Arc::clone(&rig.ctx);
            let (done, finished) = mpsc::channel::<()>();
            let waker = std::thread::spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(2 * window) {
                    ctx.notify();
                }
            });
            for _ in 0..3 {
                if rig.used_idx(0) == used {
                    break;
                }
                rig.ctx.run_once_polling_for(window).unwrap();
            }
            drop(done);
            waker.join().unwrap();
            assert_eq!(rig.used_idx(0), used, "a completion lost while polling");
            opener.join().unwrap();
            assert_eq!(rig.byte(STATUS + u64::from(head)), st::OK);
        }
        assert!(rig.ctx.polling());
        // Nothing more to poll for: the loop leaves poll mode and blocks until woken.
        let ctx = std::sync::Arc::clone(&rig.ctx);
        let waker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ctx.notify();
        });
        // (A pass may first take a signal a completion left after the poll reaped it.)
        for _ in 0..3 {
            if !rig.ctx.polling() {
                break;
            }
            rig.ctx
                .run_once_polling_for(std::time::Duration::from_millis(10))
                .unwrap();
        }
        waker.join().unwrap();
        assert!(!rig.ctx.polling());
        // A loop that only sleeps on its descriptors still hears of the next completion.
        read_held(&rig, 12, STATUS + 12);
        let opener = release(&rig);
        rig.run_until_used(0, 4);
        opener.join().unwrap();
        assert_eq!(rig.byte(STATUS + 12), st::OK);
    }

    /// Signals group 0's completion eventfd with no completion queued: what a reap leaves when
    /// it cleared the eventfd, then took a completion a worker announced meanwhile.
    fn signal_completions_with_none(rig: &Rig) {
        let signal = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the group's completion eventfd.
        let wrote = unsafe {
            libc::write(
                rig.dev.groups[0].aio.completion_fd(),
                signal.as_ptr().cast(),
                signal.len(),
            )
        };
        assert_eq!(wrote, 8);
    }

    /// A wake-up lost while polling: with the completion eventfd signalled and nothing to reap,
    /// a polling loop finds it ready on every pass; the queue's notifications are off (with
    /// event idx, `avail_event` left behind) and the driver does not notify, so a request it
    /// makes available now must still be found in the ring, not wait there for ever while the
    /// loop spins.
    #[test]
    fn a_stale_completion_signal_does_not_hide_requests_while_polling() {
        let rig = polled_rig();
        let window = std::time::Duration::from_secs(5);
        enter_poll_mode(&rig, window);
        signal_completions_with_none(&rig);
        store_get_id(&rig, 3, STATUS + 1);
        rig.make_available(0, 3);
        // Each pass returns at once while the eventfd stays signalled.
        for _ in 0..3 {
            if rig.used_idx(0) == 2 {
                break;
            }
            rig.ctx.run_once_polling_for(window).unwrap();
        }
        assert_eq!(
            rig.used_idx(0),
            2,
            "a request left in the ring while polling"
        );
        assert_eq!(rig.byte(STATUS + 1), st::OK);
    }

    /// A completion eventfd signalled with nothing left to reap (a reap took the completion
    /// announced after it cleared the eventfd) is cleared when its handler runs, so the loop
    /// goes back to sleep instead of finding it ready again and again.
    #[test]
    fn a_completion_signal_with_nothing_to_reap_is_cleared() {
        let rig = main_loop_rig(1 << 16, false);
        rig.start(!0);
        signal_completions_with_none(&rig);
        let now = Some(std::time::Duration::ZERO);
        assert_eq!(rig.ctx.run_once(now).unwrap(), 1);
        assert_eq!(
            rig.ctx.run_once(now).unwrap(),
            0,
            "the signal is still there"
        );
    }

    #[test]
    fn several_queues_complete_on_their_own_ring() {
        let rig = Rig::new(
            Context::new("main-loop").unwrap(),
            MemImage::new(1 << 16, false),
            2,
            false,
        );
        rig.start(!0);
        rig.header(HDR, t::FLUSH, 0);
        rig.submit(1, 0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
        rig.run_until_used(1, 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        assert_eq!(rig.used_idx(0), 0);
    }

    #[test]
    fn hostile_chains_put_the_device_in_needs_reset_and_reset_recovers() {
        let loop_chain = |rig: &Rig| {
            rig.store_desc(0, 0, Descriptor::new(HDR, 16, F_NEXT, 1));
            rig.store_desc(0, 1, Descriptor::new(STATUS, 1, F_WRITE | F_NEXT, 0));
            rig.publish(0, 0);
        };
        let outside = |rig: &Rig| {
            rig.submit(
                0,
                0,
                &[
                    (HDR, 16, 0),
                    (MEM_SIZE - 8, 512, F_WRITE),
                    (STATUS, 1, F_WRITE),
                ],
            )
        };
        let no_status = |rig: &Rig| rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 512, 0)]);
        let short_header = |rig: &Rig| rig.submit(0, 0, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]);
        let wrong_order =
            |rig: &Rig| rig.submit(0, 0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE), (BUF, 512, 0)]);
        let bad_next = |rig: &Rig| {
            rig.store_desc(0, 0, Descriptor::new(HDR, 16, F_NEXT, 999));
            rig.publish(0, 0);
        };
        let bad_avail = |rig: &Rig| {
            rig.set_avail_idx(0, QSIZE + 5);
            rig.set_reg(0x50, 0);
        };
        let cases: [&dyn Fn(&Rig); 7] = [
            &loop_chain,
            &outside,
            &no_status,
            &short_header,
            &wrong_order,
            &bad_next,
            &bad_avail,
        ];
        let rig = main_loop_rig(1 << 16, false);
        for (i, case) in cases.iter().enumerate() {
            rig.start(!0);
            rig.header(HDR, t::FLUSH, 0);
            case(&rig);
            rig.ctx
                .run_once(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            assert_ne!(
                rig.reg(0x70) & dev_status::DEVICE_NEEDS_RESET,
                0,
                "case {i}"
            );
            assert_ne!(rig.reg(0x60) & 2, 0, "case {i}: configuration interrupt");
            // Reset, wipe the rings, and the device works again.
            rig.set_reg(0x70, 0);
            assert_eq!(rig.reg(0x70), 0);
            rig.mem.write_slice(&[0u8; 0x1000], queue_addr(0)).unwrap();
            rig.start(!0);
            rig.header(HDR, t::FLUSH, 0);
            rig.submit(0, 0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
            rig.run_until_used(0, 1);
            assert_eq!(rig.byte(STATUS), st::OK, "case {i}");
            rig.set_reg(0x70, 0);
            rig.mem.write_slice(&[0u8; 0x1000], queue_addr(0)).unwrap();
        }
    }

    #[test]
    fn indirect_chains_may_be_longer_than_a_small_queue() {
        let rig = main_loop_rig(1 << 16, false);
        rig.image.data.lock().unwrap()[..5120].fill(0x42);
        rig.start_sized(!0, 4);
        rig.header(HDR, t::IN, 0);
        // Header, ten 512-byte segments and the status: 12 descriptors in a queue of 4.
        let table = DATA + 0x8000;
        let mut descs = vec![Descriptor::new(HDR, 16, F_NEXT, 1)];
        for i in 0..10u16 {
            descs.push(Descriptor::new(
                BUF + u64::from(i) * 512,
                512,
                F_WRITE | F_NEXT,
                i + 2,
            ));
        }
        descs.push(Descriptor::new(STATUS, 1, F_WRITE, 0));
        for (i, d) in (0u64..).zip(&descs) {
            rig.mem.write_obj(*d, GuestAddress(table + 16 * i)).unwrap();
        }
        rig.store_desc(0, 0, Descriptor::new(table, 16 * 12, F_INDIRECT, 0));
        rig.publish(0, 0);
        rig.run_until_used(0, 1);
        assert_eq!(rig.byte(STATUS), st::OK);
        assert_eq!(rig.used(0, 0), (0, 5121));
        assert_eq!(rig.byte(BUF + 5119), 0x42);
    }

    #[test]
    fn a_chain_made_available_twice_while_in_flight_needs_a_reset() {
        let (io, rig) = iothread_rig("io-twice", 1 << 16);
        let opener = rig.hold_a_read();
        rig.publish(0, 0);
        for _ in 0..10_000 {
            if rig.reg(0x70) & dev_status::DEVICE_NEEDS_RESET != 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_ne!(rig.reg(0x70) & dev_status::DEVICE_NEEDS_RESET, 0);
        // The reset drains the first one, which completes once.
        rig.set_reg(0x70, 0);
        assert_eq!(rig.used_idx(0), 1);
        assert_eq!(rig.dev.stats().snapshot().rd.operations, 1);
        opener.join().unwrap();
        drop(rig);
        io.stop().unwrap();
    }

    #[test]
    fn aio_max_batch_batches_a_queue_pass_on_io_uring() {
        // Five reads (as many as a 16-entry queue holds) made available before one
        // notification: by default the pass that takes them tells the kernel of all five in one
        // io_uring_enter; with aio-max-batch N, N at a time (1: one each).
        for (max_batch, submissions) in [(0, 1), (1, 5), (2, 3)] {
            let ctx = Context::new("main-loop").unwrap();
            ctx.set_aio_max_batch(max_batch);
            assert_eq!(
                five_reads_in_one_pass(ctx),
                submissions,
                "aio-max-batch {max_batch}"
            );
        }
    }

    /// Submits five reads in one pass of queue 0 of a device on a raw file with io_uring in
    /// `ctx`, and returns the ring's submissions.
    fn five_reads_in_one_pass(ctx: std::sync::Arc<Context>) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let image = raw_image(&dir, 1 << 16);
        let engine = block::aio::Engine::IoUring;
        let rig = Rig::with_engine(ctx, image, 1, false, engine);
        rig.start(!0);
        for i in 0..5u16 {
            let hdr = HDR + u64::from(i) * 0x20;
            rig.header(hdr, t::IN, u64::from(i) * 8);
            rig.store_chain(
                0,
                3 * i,
                &[
                    (hdr, 16, 0),
                    (DATA + 0x1000 * (1 + u64::from(i)), 4096, F_WRITE),
                    (STATUS + u64::from(i), 1, F_WRITE),
                ],
            );
            if i < 4 {
                rig.make_available(0, 3 * i);
            } else {
                rig.publish(0, 3 * i);
            }
        }
        rig.run_until_used(0, 5);
        assert!((0..5).all(|i| rig.byte(STATUS + i) == st::OK));
        assert_eq!(rig.dev.groups[0].aio.requests_by_engine(), (5, 0));
        let submissions = rig.dev.groups[0].aio.ring_submissions();
        rig.dev.shutdown().unwrap();
        submissions
    }

    #[test]
    fn reads_over_the_queue_rings_and_over_each_other_complete() {
        // Request A's buffer covers the page of the queue's rings (0x1000..0x2000); request B's
        // buffer overlaps A's upper half. The disk holds, under A, the page as it is once both
        // are available (so the device finds its rings as they were) with a pattern past the
        // rings, and under B another pattern. Both engines, on a raw file.
        let ring_page = desc_addr(0).0;
        let pattern = |o: u64| (o.wrapping_mul(7) ^ (o >> 9)).to_le_bytes()[0];
        for engine in [block::aio::Engine::Threads, block::aio::Engine::IoUring] {
            let dir = tempfile::tempdir().unwrap();
            let image = raw_image(&dir, 1 << 16);
            let rig = Rig::with_engine(Context::new("main-loop").unwrap(), image, 1, false, engine);
            rig.start(!0);
            let (hdr_b, hdr_a) = (HDR, HDR + 0x20);
            rig.header(hdr_b, t::IN, 8);
            rig.submit(
                0,
                0,
                &[
                    (hdr_b, 16, 0),
                    (ring_page + 0x800, 4096, F_WRITE),
                    (STATUS, 1, F_WRITE),
                ],
            );
            rig.header(hdr_a, t::IN, 0);
            rig.submit(
                0,
                3,
                &[
                    (hdr_a, 16, 0),
                    (ring_page, 4096, F_WRITE),
                    (STATUS + 1, 1, F_WRITE),
                ],
            );
            let mut disk = vec![0u8; 8192];
            rig.mem
                .read_slice(&mut disk[..4096], GuestAddress(ring_page))
                .unwrap();
            for (o, b) in (0u64..).zip(disk.iter_mut()).skip(0x400) {
                *b = pattern(o);
            }
            rig.image.write_at(&disk, 0).unwrap();
            rig.run_until_used(0, 2);
            assert_eq!((rig.byte(STATUS), rig.byte(STATUS + 1)), (st::OK, st::OK));
            let mut got = vec![0u8; 0x1400];
            rig.mem
                .read_slice(&mut got, GuestAddress(ring_page + 0x400))
                .unwrap();
            for (i, byte) in got.iter().enumerate() {
                let pos = 0x400 + i; // From the start of A's buffer.
                let from_a = disk.get(pos).filter(|_| pos < 4096);
                let from_b = pos.checked_sub(0x800).and_then(|p| disk.get(4096 + p));
                assert!(
                    from_a == Some(byte) || from_b == Some(byte),
                    "{}: byte {pos:#x} is {byte:#x}, from neither read",
                    engine.name()
                );
            }
            rig.dev.shutdown().unwrap();
        }
    }
}
