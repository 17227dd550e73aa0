//! The io_uring engine of [`super::Aio`] (`aio=io_uring`): reads, writes and data-sync flushes
//! whose host extents the image hands out ([`crate::DiskImage::map_direct`]) become readv,
//! writev and fsync submissions on one ring; everything else is declined and goes to the pool.
//!
//! One guest request may become several submissions (one per host extent). Each is tracked in
//! the request's slot, and the request completes when all of them have: with the first error
//! any of them met, or success. A short transfer is resubmitted for the rest; a read that meets
//! the end of the host file fills the rest with zeroes, as [`crate::file::HostFile`] does; a
//! write that makes no progress is an error.
//!
//! The ring is restricted before it is enabled (`IORING_REGISTER_RESTRICTIONS`, as Firecracker
//! restricts its own): its only file is the image's host file, registered (every submission
//! must name it by its index, `IOSQE_FIXED_FILE`), its only opcodes are readv, writev and fsync,
//! and the only later registrations it takes are the update of that file when a snapshot swaps
//! the disk's image and its removal when the ring goes. That removal is explicit: a registered
//! file keeps its open file description, and with it the image's lock, alive, and a ring that is
//! closed lets go of its files only later, in a kernel worker. Code that got hold of the ring could still only read and write that one file.
//!
//! The ring announces completions on the pool's eventfd (`IORING_REGISTER_EVENTFD`), so the
//! submitter watches one descriptor for both engines. At most as many submissions are in flight
//! as the completion queue holds, so no completion is ever dropped or left in the kernel's
//! overflow list. The caller serializes access (the ring lives in a mutex in `Aio`).

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};

use super::iov::{build_parts, Part};
use super::{AioError, Completion, Op, Request};
use crate::direct::{DirectPin, DirectTarget, Extent, FlushPlan, MAX_EXTENTS};
use crate::trace::IoTrace;
use crate::{DiskImage, Error};

/// Largest ring asked for.
const MAX_RING: u32 = 4096;

/// The image's host file: the only registered file, index 0.
const TARGET: types::Fixed = types::Fixed(0);

/// `IORING_UNREGISTER_FILES` and `IORING_REGISTER_FILES_UPDATE`
/// (`include/uapi/linux/io_uring.h`): the only registrations allowed once the ring runs.
const UNREGISTER_FILES: u8 = 3;
const REGISTER_FILES_UPDATE: u8 = 6;

/// What [`Ring::submit`] did with a request.
#[derive(Debug)]
pub(super) enum Submitted {
    /// On the ring; it completes through [`Ring::process`].
    Queued,
    /// Finished without any I/O (a flush that `cache=unsafe` drops).
    Done(Completion),
    /// Not for the ring: hand it to the pool.
    Declined(Request),
}

/// A request on the ring.
#[derive(Debug, Default)]
struct Slot {
    request: Option<Request>,
    /// Keeps the request's host clusters from being reused until it completes.
    pin: Option<DirectPin>,
    /// Its submissions, reused from request to request.
    parts: Vec<Part>,
    /// Submissions not yet completed.
    pending: usize,
    /// The first error a submission met.
    error: Option<Error>,
}

/// The ring and the requests on it.
pub(super) struct Ring {
    ring: IoUring,
    target: DirectTarget,
    /// Grown on demand up to `depth`, reused through `free`.
    slots: Vec<Slot>,
    free: Vec<usize>,
    depth: usize,
    /// Submissions in flight, at most `max_sqes`.
    sqes: usize,
    max_sqes: usize,
    /// Requests on the ring.
    outstanding: usize,
    /// Requests queued since the kernel was last told of the submission queue.
    batched: usize,
    /// The times the kernel was told of queued submissions (`io_uring_enter`), a drain's waits
    /// aside.
    submissions: u64,
    /// Scratch for mappings and reaped completions.
    extents: Vec<Extent>,
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("path", &self.target.path)
            .field("outstanding", &self.outstanding)
            .field("sqes", &self.sqes)
            .finish_non_exhaustive()
    }
}

impl Drop for Ring {
    /// Lets go of the image's file now, so its lock goes with the image (see the module doc).
    fn drop(&mut self) {
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::warn!("io_uring: cannot unregister {}: {e}", self.target.path);
        }
    }
}

/// The user data of a submission: its slot and its part.
fn user_data(slot: usize, part: usize) -> u64 {
    ((slot as u64) << 8) | part as u64
}

fn split_user_data(data: u64) -> (usize, usize) {
    // A slot index fits in usize: it came from one; the part is below 256.
    (
        usize::try_from(data >> 8).unwrap_or(usize::MAX),
        usize::from(u8::try_from(data & 0xff).unwrap_or(u8::MAX)),
    )
}

impl Ring {
    /// Submits to `target`'s file from now on; only while nothing is on the ring. On an error
    /// the ring still submits to the file it had.
    pub(super) fn retarget(&mut self, target: DirectTarget) -> Result<(), AioError> {
        debug_assert_eq!(self.outstanding, 0, "ring retargeted with requests on it");
        self.ring
            .submitter()
            .register_files_update(0, &[target.fd])
            .map_err(AioError::RegisterFile)?;
        self.target = target;
        Ok(())
    }

    /// A ring for `depth` requests on `target`'s file, announcing completions on `eventfd`.
    pub(super) fn new(
        target: DirectTarget,
        depth: usize,
        eventfd: RawFd,
    ) -> Result<Ring, AioError> {
        let entries = u32::try_from(depth)
            .unwrap_or(MAX_RING)
            .clamp(8, MAX_RING)
            .next_power_of_two();
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(entries)
            .map_err(AioError::IoUring)?;
        let submitter = ring.submitter();
        submitter
            .register_eventfd(eventfd)
            .map_err(AioError::RegisterEventFd)?;
        submitter
            .register_files(&[target.fd])
            .map_err(AioError::RegisterFile)?;
        submitter
            .register_restrictions(&mut [
                Restriction::sqe_op(opcode::Readv::CODE),
                Restriction::sqe_op(opcode::Writev::CODE),
                Restriction::sqe_op(opcode::Fsync::CODE),
                Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
                Restriction::register_op(UNREGISTER_FILES),
                Restriction::register_op(REGISTER_FILES_UPDATE),
            ])
            .map_err(AioError::Restrict)?;
        submitter
            .register_enable_rings()
            .map_err(AioError::Restrict)?;
        let params = ring.params();
        let max_sqes =
            usize::try_from(params.cq_entries().min(params.sq_entries())).unwrap_or(usize::MAX);
        Ok(Ring {
            ring,
            target,
            slots: Vec::new(),
            free: Vec::new(),
            depth,
            sqes: 0,
            max_sqes,
            outstanding: 0,
            batched: 0,
            submissions: 0,
            extents: Vec::with_capacity(MAX_EXTENTS),
            cqes: Vec::with_capacity(max_sqes),
        })
    }

    /// Puts `request` on the ring when its data can go there directly, else declines it. The
    /// kernel is told once `batch` requests are queued (1: at once); the rest wait for
    /// [`Ring::submit_queued`], or for the next reap or wait.
    pub(super) fn submit(
        &mut self,
        image: &dyn DiskImage,
        request: Request,
        batch: usize,
    ) -> Submitted {
        let write = match request.op {
            Op::Read => false,
            Op::Write => true,
            Op::Flush => match self.target.flush {
                FlushPlan::Skip => {
                    return Submitted::Done(Completion {
                        request,
                        result: Ok(()),
                        trace: IoTrace::unworked(Instant::now()),
                    })
                }
                FlushPlan::SyncData => return self.queue(request, None, false, batch),
                FlushPlan::Image => return Submitted::Declined(request),
            },
            Op::Discard { .. } | Op::WriteZeroes { .. } => return Submitted::Declined(request),
        };
        let len: u64 = request.segs.iter().map(|s| s.len() as u64).sum();
        if len == 0 {
            return Submitted::Declined(request);
        }
        self.extents.clear();
        let Some(pin) = image.map_direct(request.offset, len, write, &mut self.extents) else {
            return Submitted::Declined(request);
        };
        self.queue(request, Some(pin), write, batch)
    }

    /// Builds the request's submissions (the flush's, without a pin) and queues them, telling
    /// the kernel once `batch` requests are queued.
    fn queue(
        &mut self,
        request: Request,
        pin: Option<DirectPin>,
        write: bool,
        batch: usize,
    ) -> Submitted {
        let flush = pin.is_none();
        let count = if flush { 1 } else { self.extents.len() };
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if count > room || self.sqes + count > self.max_sqes {
            return Submitted::Declined(request);
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None if self.slots.len() < self.depth => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
            None => return Submitted::Declined(request),
        };
        let slot = &mut self.slots[index];
        if !flush
            && !build_parts(
                &mut slot.parts,
                &request.segs,
                &self.extents,
                self.target.aligned,
            )
        {
            self.free.push(index);
            return Submitted::Declined(request);
        }
        slot.pending = count;
        slot.error = None;
        slot.pin = pin;
        let op = request.op;
        slot.request = Some(request);
        for part in 0..count {
            self.push(index, part, op, write);
        }
        self.outstanding += 1;
        self.batched += 1;
        if self.batched >= batch {
            self.enter();
        }
        Submitted::Queued
    }

    /// Tells the kernel about the submissions queued and not yet submitted, if any.
    pub(super) fn submit_queued(&mut self) {
        if !self.ring.submission().is_empty() {
            self.enter();
        }
    }

    /// The times the kernel was told of queued submissions.
    pub(super) fn submissions(&self) -> u64 {
        self.submissions
    }

    /// Pushes the submission of part `part` of slot `index`. There is room: `sqes` counts the
    /// submissions queued and those in the kernel, and never exceeds the queue's capacity.
    fn push(&mut self, index: usize, part: usize, op: Op, write: bool) {
        let fd = TARGET;
        let entry = if op == Op::Flush {
            opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        } else {
            let p = &self.slots[index].parts[part];
            let iov = p.pending();
            // At most `iov::MAX_IOVECS` pieces (checked when the parts were built).
            let n = u32::try_from(iov.len()).unwrap_or(u32::MAX);
            if write {
                opcode::Writev::new(fd, iov.as_ptr(), n)
                    .offset(p.host)
                    .build()
            } else {
                opcode::Readv::new(fd, iov.as_ptr(), n)
                    .offset(p.host)
                    .build()
            }
        };
        let entry = entry.user_data(user_data(index, part));
        // SAFETY: the iovec array and the buffers it points at stay valid and untouched until the
        // submission completes: the array lives in the slot, which is not reused before then, and
        // the buffers are `IoSeg`s, valid until the request's completion is reaped. The file is
        // the registered one, which the ring holds.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok(), "submission queue room was checked");
        self.sqes += 1;
    }

    /// Tells the kernel about queued submissions. A failure leaves them queued for the next
    /// call (`process`, `wait`), so nothing is lost.
    fn enter(&mut self) {
        match self.ring.submit() {
            Ok(_) => {
                self.batched = 0;
                self.submissions += 1;
            }
            Err(e) => log::warn!("io_uring submission on {} deferred: {e}", self.target.path),
        }
    }

    /// Handles every completion the ring has, resubmitting short transfers, and hands each
    /// finished request to `done`.
    pub(super) fn process(&mut self, mut done: impl FnMut(Completion)) {
        loop {
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            if self.cqes.is_empty() {
                break;
            }
            let mut resubmit = false;
            // One clock read for the batch: when its completions were seen.
            let seen = Instant::now();
            for i in 0..self.cqes.len() {
                let (data, res) = self.cqes[i];
                self.sqes -= 1;
                resubmit |= self.complete_part(data, res, seen, &mut done);
            }
            if resubmit || !self.ring.submission().is_empty() {
                self.enter();
            }
        }
    }

    /// Blocks until every request on the ring has completed, handing each to `done`.
    pub(super) fn wait(&mut self, mut done: impl FnMut(Completion)) {
        loop {
            self.process(&mut done);
            if self.outstanding == 0 {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.batched = 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("waiting for io_uring on {}: {e}", self.target.path);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Accounts one completed submission; returns whether it was resubmitted.
    fn complete_part(
        &mut self,
        data: u64,
        res: i32,
        seen: Instant,
        done: &mut impl FnMut(Completion),
    ) -> bool {
        let (index, part) = split_user_data(data);
        let Some(op) = self
            .slots
            .get(index)
            .and_then(|s| s.request.as_ref())
            .map(|r| r.op)
        else {
            log::error!("io_uring completion for idle or unknown slot {index}");
            return false;
        };
        let write = op == Op::Write;
        if self.part_needs_more(index, part, op, res) {
            self.push(index, part, op, write);
            return true;
        }
        let slot = &mut self.slots[index];
        slot.pending -= 1;
        if slot.pending == 0 {
            slot.pin = None;
            let result = slot.error.take().map_or(Ok(()), Err);
            if let Some(request) = slot.request.take() {
                done(Completion {
                    request,
                    result,
                    trace: IoTrace::unworked(seen),
                });
            }
            self.free.push(index);
            self.outstanding -= 1;
        }
        false
    }

    /// Applies a submission's result `res` to its part: whether the part must be submitted again
    /// (interrupted, or a short transfer), else it is finished (an error recorded in its slot).
    fn part_needs_more(&mut self, index: usize, part: usize, op: Op, res: i32) -> bool {
        let path = &self.target.path;
        let slot = &mut self.slots[index];
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return true;
        }
        let (name, offset) = match (op, slot.parts.get_mut(part)) {
            (Op::Flush, _) if res >= 0 => return false,
            (Op::Flush, _) => ("flush", 0),
            (_, None) => return false,
            (_, Some(p)) if res > 0 => {
                p.advance(usize::try_from(res).unwrap_or(0));
                return p.remaining() > 0;
            }
            (Op::Read, Some(p)) if res == 0 => {
                p.zero_rest();
                return false;
            }
            (Op::Write, Some(p)) => ("write", p.host),
            (_, Some(p)) => ("read", p.host),
        };
        let source = if res == 0 {
            io::Error::from(io::ErrorKind::WriteZero)
        } else {
            io::Error::from_raw_os_error(-res)
        };
        slot.error.get_or_insert(Error::Io {
            op: name,
            path: path.clone(),
            offset,
            source,
        });
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::AsRawFd;

    use crate::direct::FlushPlan;

    /// A restricted ring on `file`.
    fn ring_on(file: &std::fs::File, eventfd: &vmm_sys_util::eventfd::EventFd) -> Ring {
        let target = DirectTarget {
            fd: file.as_raw_fd(),
            aligned: false,
            path: "test".into(),
            flush: FlushPlan::SyncData,
        };
        Ring::new(target, 8, eventfd.as_raw_fd()).expect("a restricted ring")
    }

    /// Submits `entry` and returns its completion's result.
    fn run(ring: &mut Ring, entry: &squeue::Entry) -> i32 {
        // SAFETY: the entries used here point at no memory (nop, fsync), or at buffers that
        // outlive the wait below.
        unsafe { ring.ring.submission().push(entry) }.expect("room");
        ring.ring.submit_and_wait(1).expect("submits");
        ring.ring
            .completion()
            .next()
            .expect("a completion")
            .result()
    }

    #[test]
    fn the_ring_takes_only_its_opcodes_on_its_registered_file() {
        let dir = std::env::temp_dir().join(format!("uring-restrict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("image"))
            .expect("creates");
        let other = std::fs::File::create(dir.join("other")).expect("creates");
        let eventfd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        let mut ring = ring_on(&file, &eventfd);
        // Its own file, by index: allowed.
        assert_eq!(run(&mut ring, &opcode::Fsync::new(TARGET).build()), 0);
        // Another descriptor, not registered: refused.
        let fd = types::Fd(other.as_raw_fd());
        assert_eq!(
            run(&mut ring, &opcode::Fsync::new(fd).build()),
            -libc::EACCES
        );
        // An opcode the engine never submits: refused.
        assert_eq!(run(&mut ring, &opcode::Nop::new().build()), -libc::EACCES);
        // Retargeted: index 0 is the new file, and a registration other than that update fails.
        let target = DirectTarget {
            fd: other.as_raw_fd(),
            aligned: false,
            path: "other".into(),
            flush: FlushPlan::SyncData,
        };
        ring.retarget(target).expect("updates the registered file");
        assert_eq!(run(&mut ring, &opcode::Fsync::new(TARGET).build()), 0);
        assert!(ring.ring.submitter().register_files(&[fd.0]).is_err());
        drop(ring);
        std::fs::remove_dir_all(&dir).expect("removes");
    }

    #[test]
    fn user_data_round_trips() {
        assert_eq!(split_user_data(user_data(1234, 31)), (1234, 31));
        assert_eq!(split_user_data(user_data(0, 0)), (0, 0));
    }
}
