//! The worker threads of an [`Aio`](super::Aio): how many run, and what each one does.
//!
//! The pool is elastic, as QEMU's thread pool is: `min` workers live as long as the pool; when a
//! request is queued and no idle worker is waiting to take it, one more starts, up to `max`; a
//! worker beyond `min` that has had nothing to do for `idle_exit` ends. A disk at queue depth 1
//! thus costs one thread, and one at depth 32 gets as many requests running in the host at once
//! as it has in flight (up to `max`), instead of waiting in line for a fixed few workers.
//!
//! The counts live in the queues' mutex ([`super::Queues`]), so whether to start a worker is
//! decided in the same critical section that queues the request; the thread itself is spawned
//! after the mutex is released.

use std::sync::PoisonError;
use std::time::Duration;
use std::{fmt, slice};

use super::{Completion, Op, Request, Shared};
use crate::{DiskImage, Error};

/// How long a worker beyond the minimum waits for work before it ends (QEMU's thread pool: 10 s).
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// How many worker threads a pool runs; see the module documentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    /// Workers that live as long as the pool (at least one).
    pub min: usize,
    /// Most workers at once (capped at the pool's depth).
    pub max: usize,
    /// How long a worker beyond `min` stays without work.
    pub idle_exit: Duration,
}

impl Workers {
    /// From `min` up to `max` workers, the extra ones ending after 10 s without work.
    pub const fn elastic(min: usize, max: usize) -> Self {
        Workers {
            min,
            max,
            idle_exit: IDLE_EXIT,
        }
    }

    /// Exactly `count` workers.
    pub const fn fixed(count: usize) -> Self {
        Self::elastic(count, count)
    }
}

impl Default for Workers {
    /// One worker always and up to 64 while requests wait (QEMU's thread pool: none to 64).
    fn default() -> Self {
        Self::elastic(1, 64)
    }
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={} workers", self.min, self.max)
    }
}

/// The workers' bookkeeping, kept in the queues' mutex.
#[derive(Debug, Default)]
pub(super) struct Census {
    /// Workers started and not yet ended (counted from the decision to start one).
    pub live: usize,
    /// Workers waiting for a request.
    pub idle: usize,
    /// Workers started so far, for naming the next one.
    pub started: usize,
}

/// A worker thread: takes pending requests until the pool stops, or, when it is one of the
/// extra workers, until it has had nothing to do for `idle_exit`.
pub(super) fn worker(shared: &Shared) {
    loop {
        let request = {
            let mut queues = shared.queues();
            let mut timed_out = false;
            loop {
                if let Some(request) = queues.pending.pop_front() {
                    break request;
                }
                if queues.stopping || (timed_out && queues.census.live > shared.workers.min) {
                    queues.census.live -= 1;
                    return;
                }
                queues.census.idle += 1;
                let (guard, wait) = shared
                    .work
                    .wait_timeout(queues, shared.workers.idle_exit)
                    .unwrap_or_else(PoisonError::into_inner);
                queues = guard;
                queues.census.idle -= 1;
                timed_out = wait.timed_out();
            }
        };
        let result = execute(shared.image.as_ref(), &request);
        let mut queues = shared.queues();
        queues.done.push_back(Completion { request, result });
        queues.unfinished -= 1;
        if queues.unfinished == 0 {
            shared.idle.notify_all();
        }
        drop(queues);
        // Only fails when the counter would overflow, which still leaves it readable.
        let _ = shared.completion_fd.write(1);
    }
}

/// Runs one request against the image.
fn execute(image: &dyn DiskImage, request: &Request) -> Result<(), Error> {
    let mut offset = request.offset;
    match request.op {
        Op::Read => {
            for seg in &request.segs {
                // SAFETY: `IoSeg::new`'s contract: the range is valid for writes and nobody else
                // in this process touches it until the completion is reaped.
                let buf = unsafe { slice::from_raw_parts_mut(seg.ptr, seg.len) };
                image.read_at(buf, offset)?;
                offset = next_offset(offset, seg.len, image.size())?;
            }
            Ok(())
        }
        Op::Write => {
            for seg in &request.segs {
                // SAFETY: `IoSeg::new`'s contract: the range is valid for reads until the
                // completion is reaped.
                let buf = unsafe { slice::from_raw_parts(seg.ptr.cast_const(), seg.len) };
                image.write_at(buf, offset)?;
                offset = next_offset(offset, seg.len, image.size())?;
            }
            Ok(())
        }
        Op::Flush => image.flush(),
        Op::Discard { len } => image.discard(offset, len),
        Op::WriteZeroes { len, may_unmap } => image.write_zeroes(offset, len, may_unmap),
    }
}

/// The disk offset after a segment, refusing arithmetic overflow.
fn next_offset(offset: u64, len: usize, size: u64) -> Result<u64, Error> {
    let len64 = u64::try_from(len).unwrap_or(u64::MAX);
    offset.checked_add(len64).ok_or(Error::OutOfRange {
        offset,
        len: len64,
        size,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::test_image::{seg, RawFile};
    use super::super::{Aio, AioError, Request};
    use super::*;
    use std::sync::atomic::Ordering;
    use std::thread;

    #[test]
    fn a_pool_needs_workers_and_depth() {
        let image = RawFile::new(4096);
        for (workers, depth) in [
            (Workers::fixed(0), 4),
            (Workers::elastic(2, 1), 4),
            (Workers::fixed(1), 0),
        ] {
            assert!(matches!(
                Aio::new("t", image.clone(), workers, depth),
                Err(AioError::BadSize { workers: w, depth: d }) if w == workers && d == depth
            ));
        }
    }

    /// Submits `count` one-segment reads of `bufs`, tokens from 0.
    fn submit_reads(aio: &Aio, bufs: &mut [Vec<u8>]) {
        for (token, buf) in (0u64..).zip(bufs) {
            aio.submit(Request {
                op: Op::Read,
                offset: 0,
                segs: vec![seg(buf)],
                token,
            })
            .unwrap();
        }
    }

    #[test]
    fn the_pool_grows_to_run_what_is_in_flight_and_no_further() {
        let image = RawFile::new(1 << 16);
        image.set_gate(false);
        let aio = Aio::new("t", image.clone(), Workers::elastic(1, 3), 8).unwrap();
        assert_eq!(aio.workers_alive(), 1);
        let mut bufs = vec![vec![0u8; 512]; 5];
        submit_reads(&aio, &mut bufs);
        // With a fixed single worker only one read could be inside the image at a time.
        while image.reads_started.load(Ordering::SeqCst) < 3 {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(aio.workers_alive(), 3);
        image.set_gate(true);
        aio.wait_idle();
        assert_eq!(aio.reap(|c| c.result.unwrap()), 5);
        assert_eq!(image.reads_started.load(Ordering::SeqCst), 5);
        assert_eq!(aio.workers_alive(), 3);
    }

    #[test]
    fn extra_workers_end_when_idle_and_come_back_when_needed() {
        let image = RawFile::new(1 << 16);
        let workers = Workers {
            idle_exit: Duration::from_millis(20),
            ..Workers::elastic(1, 4)
        };
        let aio = Aio::new("t", image.clone(), workers, 4).unwrap();
        for round in 0..2 {
            image.set_gate(false);
            let mut bufs = vec![vec![0u8; 512]; 4];
            submit_reads(&aio, &mut bufs);
            while image.reads_started.load(Ordering::SeqCst) < 4 * (round + 1) {
                thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(aio.workers_alive(), 4);
            image.set_gate(true);
            aio.wait_idle();
            assert_eq!(aio.reap(|c| c.result.unwrap()), 4);
            // The three extra workers end; the minimum stays.
            for _ in 0..1000 {
                if aio.workers_alive() == 1 {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(aio.workers_alive(), 1);
        }
    }
}
