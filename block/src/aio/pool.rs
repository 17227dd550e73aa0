//! The worker threads of an [`Aio`](super::Aio): how many run, and what each one does.
//!
//! The pool is elastic, as QEMU's thread pool is: `min` workers live as long as the pool; when a
//! request is queued and no idle worker is waiting to take it, one more starts, up to `max`; a
//! worker beyond `min` that has had nothing to do for `idle_exit` ends (and joins the one that
//! ended before it, see `Threads` in the parent module). A disk at queue depth 1
//! thus costs one thread, and one at depth 32 gets as many requests running in the host at once
//! as it has in flight (up to `max`), instead of waiting in line for a fixed few workers.
//!
//! The counts live in the queues' mutex ([`super::Queues`]), so whether to start a worker is
//! decided in the same critical section that queues the request; the thread itself is spawned
//! after the mutex is released.
//!
//! A worker never forms a Rust reference to a request's buffers (see `iov`). A read or write
//! whose range the image maps to host extents ([`crate::DiskImage::map_direct`]: raw images,
//! qcow2 clusters allocated and ours alone) is one `preadv`/`pwritev` per extent straight on the
//! buffers, unless `O_DIRECT` alignment does not hold for them; anything else (qcow2 allocation,
//! copy-on-write, compressed, zero and backing clusters, cache misses) goes through the image's
//! methods with a bounce buffer, copied from the buffers before a write and to them after a read.
//! Bounce buffers are lent per request by the pool's [`BufPool`], which keeps [`BOUNCE_KEEP`] of
//! them between requests: a worker holds none while idle, so the memory of a burst that started
//! many workers goes back to the host when the burst ends, not when the workers do.

use std::fmt;
use std::sync::{OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::iov::{build_parts, gather, scatter, Part};
use super::{Completion, Op, Request, Shared};
use crate::buffers::BufPool;
use crate::direct::{DirectTarget, Extent};
use crate::trace::{self, IoTrace};
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

/// Run first thing on every worker thread, before it takes a request (see [`set_worker_start`]).
static WORKER_START: OnceLock<fn()> = OnceLock::new();

/// Has every worker thread started from now on run `hook` first thing, before it takes a
/// request: the VMM puts the thread in its sandbox there. Only the first hook set is kept.
pub fn set_worker_start(hook: fn()) {
    let _ = WORKER_START.set(hook);
}

/// A worker thread: takes pending requests until the pool stops, or, when it is one of the
/// extra workers, until it has had nothing to do for `idle_exit`.
pub(super) fn worker(shared: &Shared) {
    if let Some(hook) = WORKER_START.get() {
        hook();
    }
    let mut scratch = Scratch::default();
    loop {
        let request = {
            let mut queues = shared.queues();
            let mut timed_out = false;
            loop {
                if let Some(request) = queues.pending.pop_front() {
                    break request;
                }
                if queues.stopping {
                    queues.census.live -= 1;
                    return;
                }
                if timed_out && queues.census.live > shared.workers.min {
                    queues.census.live -= 1;
                    drop(queues);
                    if let Some(previous) = shared.hand_over() {
                        super::join_worker(previous);
                    }
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
        let started = Instant::now();
        trace::begin();
        let result = execute(shared, &request, &mut scratch);
        let (data_ns, depth) = trace::take();
        let trace = IoTrace {
            started: Some(started),
            done: Instant::now(),
            data_ns,
            depth,
        };
        let mut queues = shared.queues();
        let completion = Completion {
            request,
            result,
            trace,
        };
        let announce = shared.push_done(&mut queues, completion);
        queues.unfinished -= 1;
        if queues.unfinished == 0 {
            shared.idle.notify_all();
        }
        drop(queues);
        if announce {
            shared.announce();
        }
    }
}

/// Largest bounce buffer a request gets: a longer request is copied through it in pieces, so
/// a guest's huge requests cost no more memory than this each (a burst of them on many workers
/// holds one each at once, and the pool keeps [`BOUNCE_KEEP`] of them). Four clusters of the
/// usual 64 KiB: a piece still reads or writes whole clusters' runs in one call of the image.
const BOUNCE_MAX: usize = 256 << 10;

/// Bounce buffers are sized to their request rounded up to this, so that a kept one serves
/// the next requests of about the same size.
const BOUNCE_GRAIN: usize = 64 << 10;

/// How many bounce buffers a pool keeps between requests.
pub(super) const BOUNCE_KEEP: usize = 2;

/// What a worker reuses from request to request.
#[derive(Default)]
struct Scratch {
    extents: Vec<Extent>,
    parts: Vec<Part>,
}

/// Runs one request against the image.
fn execute(shared: &Shared, request: &Request, scratch: &mut Scratch) -> Result<(), Error> {
    let served = shared.served();
    let image = served.image.as_ref();
    let offset = request.offset;
    let write = match request.op {
        Op::Read => false,
        Op::Write => true,
        Op::Flush => return image.flush(),
        Op::Discard { len } => return image.discard(offset, len),
        Op::WriteZeroes { len, may_unmap } => return image.write_zeroes(offset, len, may_unmap),
    };
    let len = request
        .segs
        .iter()
        .try_fold(0usize, |sum, s| sum.checked_add(s.len))
        .ok_or(Error::OutOfRange {
            offset,
            len: u64::MAX,
            size: image.size(),
        })?;
    if len == 0 {
        return Ok(());
    }
    if let Some(target) = &served.target {
        if let Some(done) = direct(image, target, request, len, write, scratch) {
            return done;
        }
    }
    bounced(image, &shared.bounces, request, len, write)
}

/// Transfers a request straight between the host file and its segments (`preadv`/`pwritev`
/// per host extent) when the image maps its range and the buffers suit the file; `None` when
/// it must go through the image's methods.
fn direct(
    image: &dyn DiskImage,
    target: &DirectTarget,
    request: &Request,
    len: usize,
    write: bool,
    scratch: &mut Scratch,
) -> Option<Result<(), Error>> {
    let len64 = u64::try_from(len).ok()?;
    scratch.extents.clear();
    // Held until the transfer ends, so that the mapped host clusters are not reused meanwhile.
    let _pin = image.map_direct(request.offset, len64, write, &mut scratch.extents)?;
    let Scratch { extents, parts, .. } = scratch;
    if !build_parts(parts, &request.segs, extents, target.aligned) {
        return None;
    }
    let result = trace::data(|| {
        parts[..extents.len()]
            .iter_mut()
            .try_for_each(|part| part.transfer(target.fd, write, &target.path))
    });
    Some(result)
}

/// Runs a request through the image's own methods, copying between its segments and a bounce
/// buffer (aligned for `O_DIRECT`, so that the image need not bounce again) from `bounces`, at
/// most [`BOUNCE_MAX`] bytes at a time.
fn bounced(
    image: &dyn DiskImage,
    bounces: &BufPool,
    request: &Request,
    len: usize,
    write: bool,
) -> Result<(), Error> {
    let mut buf = bounces.take(len.min(BOUNCE_MAX).next_multiple_of(BOUNCE_GRAIN));
    let result = copy_through(image, request, len, write, buf.as_mut_slice());
    bounces.give(buf);
    result
}

/// [`bounced`]'s copying, through `bounce`.
fn copy_through(
    image: &dyn DiskImage,
    request: &Request,
    len: usize,
    write: bool,
    bounce: &mut [u8],
) -> Result<(), Error> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(bounce.len());
        let buf = &mut bounce[..n];
        let offset = next_offset(request.offset, done, image.size())?;
        if write {
            gather(&request.segs, done, buf);
            image.write_at(buf, offset)?;
        } else {
            image.read_at(buf, offset)?;
            scatter(buf, &request.segs, done);
        }
        done += n;
    }
    Ok(())
}

/// The disk offset `len` bytes after `offset`, refusing arithmetic overflow.
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

    use super::super::test_image::{reap_one, roundtrip, seg, RawFile};
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
    fn mapped_reads_go_straight_to_the_host_file_and_the_rest_through_the_image() {
        let image = RawFile::direct(1 << 16);
        let aio = Aio::new("t", image.clone(), Workers::fixed(1), 4).unwrap();
        let mut a = vec![0x11u8; 1000];
        let mut b = vec![0x22u8; 3096];
        let mut back = vec![0u8; 4096];
        for (op, segs) in [
            (Op::Write, vec![seg(&mut a), seg(&mut b)]),
            (Op::Read, vec![seg(&mut back)]),
        ] {
            aio.submit(Request {
                op,
                offset: 512,
                segs,
                token: 0,
            })
            .unwrap();
            reap_one(&aio).result.unwrap();
        }
        assert_eq!(back[..1000], a[..]);
        assert_eq!(back[1000..], b[..]);
        assert_eq!(image.reads_started.load(Ordering::SeqCst), 0);
        // Past the end nothing is mapped: the image's own method answers, with its error.
        aio.submit(Request {
            op: Op::Read,
            offset: 1 << 16,
            segs: vec![seg(&mut back)],
            token: 1,
        })
        .unwrap();
        assert!(matches!(
            reap_one(&aio).result,
            Err(Error::OutOfRange { offset: 65536, .. })
        ));
        assert_eq!(image.reads_started.load(Ordering::SeqCst), 1);
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

    /// The size in KiB of the mapping of `/proc/self/smaps` holding `addr`.
    fn mapping_kib(addr: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
                let hex = |s| u64::from_str_radix(s, 16).unwrap();
                inside = (hex(a)..hex(b)).contains(&addr);
            } else if inside && first == "Size:" {
                return words.next().unwrap().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn a_workers_stack_spans_no_huge_page() {
        let image = RawFile::new(1 << 16);
        let aio = Aio::new("t", image, Workers::fixed(1), 4).unwrap();
        // The idle worker waits in a futex: /proc gives its stack pointer then (the 9th word of
        // its `syscall` file).
        let sp = (0..1000)
            .find_map(|_| {
                for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                    let name = std::fs::read_to_string(task.path().join("comm")).unwrap();
                    if name.trim() != "t-io0" {
                        continue;
                    }
                    let call = std::fs::read_to_string(task.path().join("syscall")).unwrap();
                    let words: Vec<&str> = call.split_whitespace().collect();
                    if words.len() == 9 {
                        return u64::from_str_radix(words[7].trim_start_matches("0x"), 16).ok();
                    }
                }
                thread::sleep(Duration::from_millis(5));
                None
            })
            .expect("the worker waits");
        assert!(mapping_kib(sp) < 2048, "{} KiB", mapping_kib(sp));
        drop(aio);
    }

    #[test]
    fn workers_ending_for_lack_of_work_join_each_other() {
        let image = RawFile::new(1 << 16);
        image.set_gate(false);
        let workers = Workers {
            idle_exit: Duration::from_millis(20),
            ..Workers::elastic(1, 6)
        };
        let aio = Aio::new("t", image.clone(), workers, 6).unwrap();
        let mut bufs = vec![vec![0u8; 512]; 6];
        submit_reads(&aio, &mut bufs);
        while image.reads_started.load(Ordering::SeqCst) < 6 {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(aio.workers_alive(), 6);
        image.set_gate(true);
        aio.wait_idle();
        assert_eq!(aio.reap(|c| c.result.unwrap()), 6);
        // Of the five extra workers, each one ending joins the one that ended before it: only
        // the last is left unjoined, beside the minimum still running.
        let left = || {
            let t = aio.shared.threads();
            (t.running.len(), t.ended.is_some())
        };
        for _ in 0..1000 {
            if left() == (1, true) {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(left(), (1, true));
        assert_eq!(aio.workers_alive(), 1);
        // The pool still grows, and its drop joins whoever is left.
        image.set_gate(false);
        submit_reads(&aio, &mut bufs[..2]);
        while image.reads_started.load(Ordering::SeqCst) < 8 {
            thread::sleep(Duration::from_millis(1));
        }
        image.set_gate(true);
        aio.wait_idle();
        assert_eq!(aio.reap(|c| c.result.unwrap()), 2);
    }

    #[test]
    fn a_request_longer_than_the_bounce_buffer_passes_through_it_in_pieces() {
        // Not placed directly: the write and the read go through a bounce buffer, in pieces
        // that do not line up with the request's segments.
        let len = 2 * BOUNCE_MAX + 3 * 4096;
        let image = RawFile::new(4 << 20);
        let aio = Aio::new("t", image.clone(), Workers::fixed(1), 4).unwrap();
        let data: Vec<u8> = (0..251u8).cycle().take(len).collect();
        let (mut a, mut b) = (data[..5000].to_vec(), data[5000..].to_vec());
        let at = 1 << 20;
        roundtrip(&aio, Op::Write, at, vec![seg(&mut a), seg(&mut b)], 1)
            .result
            .unwrap();
        let (mut c, mut d) = (
            vec![0u8; BOUNCE_MAX + 100],
            vec![0u8; len - BOUNCE_MAX - 100],
        );
        roundtrip(&aio, Op::Read, at, vec![seg(&mut c), seg(&mut d)], 2)
            .result
            .unwrap();
        assert!(c.iter().chain(&d).eq(&data), "read back what was written");
        // The file holds it at the request's offset, and nothing before it.
        let mut file = vec![0u8; len + 4096];
        image.inner.read_at(&mut file, at - 4096).unwrap();
        assert!(file[..4096].iter().all(|&x| x == 0));
        assert_eq!(&file[4096..], &data[..]);
        // Three pieces: the reads the image saw.
        assert_eq!(image.reads_started.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_burst_of_bounced_requests_leaves_few_bounce_buffers() {
        // Not placed directly: every read goes through a bounce buffer.
        let image = RawFile::new(1 << 16);
        image.set_gate(false);
        let aio = Aio::new("t", image.clone(), Workers::fixed(6), 8).unwrap();
        let mut bufs = vec![vec![0u8; 512]; 6];
        submit_reads(&aio, &mut bufs);
        // Six reads inside the image at once, each with a buffer of its own.
        while image.reads_started.load(Ordering::SeqCst) < 6 {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(aio.shared.bounces.kept_count(), 0);
        image.set_gate(true);
        aio.wait_idle();
        assert_eq!(aio.reap(|c| c.result.unwrap()), 6);
        assert_eq!(aio.shared.bounces.kept_count(), BOUNCE_KEEP);
        // Requests one at a time reuse a kept buffer.
        submit_reads(&aio, &mut bufs[..1]);
        reap_one(&aio).result.unwrap();
        assert_eq!(aio.shared.bounces.kept_count(), BOUNCE_KEEP);
    }
}
