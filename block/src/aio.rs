//! Asynchronous submission of disk image requests, so that the thread serving a disk never blocks
//! on it (docs/DESIGN.md, "A context never blocks on the disk").
//!
//! A pool of worker threads, growing and shrinking with the requests in flight as QEMU's does
//! ([`Workers`], `pool`), runs requests against a [`DiskImage`]: plain reads and writes
//! as well as the qcow2 metadata lookups and allocations behind them, which may miss a cache and
//! read or write the host file. The submitter (a device, in its context) hands over a
//! [`Request`] that owns its segment list and carries a caller-chosen token; completions come back
//! in a queue, announced through an eventfd that the submitter's event loop watches. The queue
//! is bounded: at most `depth` requests are in flight (submitted and not yet reaped), the
//! queues are allocated once, and segment lists travel back with their completion for reuse, so
//! steady-state submission allocates nothing.
//!
//! Neither engine forms a Rust reference to a request's buffers, which the guest may write,
//! or share between requests, while they run ([`IoSeg`]): reads and writes the image can place
//! ([`crate::DiskImage::map_direct`]) are `preadv`/`pwritev` (in the pool) or readv/writev (on
//! the ring) straight on the buffers, and the rest is copied through a bounce buffer lent for
//! the request (a few are kept between requests, so a burst leaves none behind).
//!
//! Two engines sit behind the same interface ([`Engine`], QEMU's `aio=`): with `threads` the pool
//! runs every request; with `io_uring` reads, writes and flushes whose data the image can place
//! without blocking ([`crate::DiskImage::map_direct`]) go to an io_uring ring instead (`uring`),
//! and the pool keeps everything else (qcow2 cache misses, allocation, copy-on-write, compressed,
//! zero and backing clusters, discard, write-zeroes). Both announce completions on the same
//! eventfd and hand them back through [`Aio::reap`], so the submitter does not know which engine
//! ran a request. Since a write completes only once its data reached the host file (whichever
//! engine wrote it), a later read or flush by either engine sees it.
//!
//! Locking: one mutex guards the pending and completed queues, held only to push or pop; workers
//! run requests without it. The ring has a mutex of its own, taken before the queues' mutex when
//! both are; the submitter only ever tries it (a busy ring sends the request to the pool, and a
//! reap leaves the ring's completions to the thread holding it). No lock here is ever held across
//! image I/O, except the ring's by [`Aio::wait_idle`]. Draining (reset, shutdown) waits with
//! [`Aio::wait_idle`] until every submitted request has completed, without needing the
//! submitter's thread to run: it reaps the ring itself and announces what it found.
//! [`Aio::replace_image`] swaps the image (a live snapshot) only while nothing is in flight.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};
use std::thread::{self, JoinHandle};
use std::{fmt, io};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::buffers::BufPool;
use crate::direct::DirectTarget;
use crate::trace::IoTrace;
use crate::{DiskImage, Error};

mod iov;
mod pool;
#[cfg(test)]
mod test_image;
mod uring;

pub use pool::{set_worker_start, Workers};

/// Which engine does a drive's image I/O (QEMU's `-drive aio=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// A worker pool runs every request (`aio=threads`, the default).
    #[default]
    Threads,
    /// io_uring for the data I/O the image can place directly, the pool for the rest
    /// (`aio=io_uring`).
    IoUring,
}

impl Engine {
    /// QEMU's name for the engine.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Threads => "threads",
            Engine::IoUring => "io_uring",
        }
    }
}

/// Errors of asynchronous submission itself (the requests' own errors are [`Error`]s).
#[derive(Debug, thiserror::Error)]
pub enum AioError {
    /// Creating the completion eventfd failed.
    #[error("cannot create the completion eventfd")]
    EventFd(#[source] io::Error),
    /// Spawning a worker thread failed.
    #[error("cannot spawn I/O worker {index} of {name}")]
    Spawn {
        /// The pool's name.
        name: String,
        /// Which worker.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up an io_uring ring failed (no io_uring in the host kernel, or not allowed).
    #[error("unable to use io_uring")]
    IoUring(#[source] io::Error),
    /// Registering (or updating) the image's host file with the ring failed.
    #[error("cannot register the image's host file with io_uring")]
    RegisterFile(#[source] io::Error),
    /// Restricting the ring to its opcodes and its file, or enabling it, failed (Linux 5.10 or
    /// later has what it takes).
    #[error("cannot restrict the io_uring ring")]
    Restrict(#[source] io::Error),
    /// Registering the completion eventfd with the ring failed.
    #[error("cannot register the completion eventfd with io_uring")]
    RegisterEventFd(#[source] io::Error),
    /// The image has no host file that io_uring could address.
    #[error("unable to use io_uring: {name} has no host file to submit to")]
    NoHostFile {
        /// The pool's name.
        name: String,
    },
    /// The image was to be replaced while requests were in flight.
    #[error("cannot replace the image of {name}: {in_flight} requests in flight")]
    Busy {
        /// The pool's name.
        name: String,
        /// Requests submitted and not yet reaped.
        in_flight: usize,
    },
    /// A pool needs at least one worker, a maximum no smaller than its minimum, and one slot.
    #[error(
        "an I/O pool needs 1 <= min <= max workers and one slot (asked {workers:?}, {depth} slots)"
    )]
    BadSize {
        /// Workers asked for.
        workers: Workers,
        /// Depth asked for.
        depth: usize,
    },
}

/// One piece of a request's buffer: an address range the submitter guarantees stays mapped until
/// the request's completion is reaped (guest memory, for a virtio device).
///
/// The range is not ours alone: the guest may write it while the request runs, hand it to
/// another request at the same time, or place a queue's rings inside it. So nothing here ever
/// makes a `&[u8]` or `&mut [u8]` of it (which would be undefined behaviour under such
/// concurrent access, whatever the bytes): the engines pass segments to the kernel as iovecs or
/// copy through them with raw pointer copies, and a segment offers no way to read it in safe code.
#[derive(Debug, Clone, Copy)]
pub struct IoSeg {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an `IoSeg` is a plain address range; whoever built it promised (in `IoSeg::new`) that
// it stays valid until the completion is reaped, whichever thread uses it meanwhile.
unsafe impl Send for IoSeg {}

impl IoSeg {
    /// A segment of `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped, readable and writable, from the moment the request
    /// carrying it is submitted until its completion has been reaped. It may be accessed
    /// concurrently by others (the guest, other requests) as with DMA, but not through Rust
    /// references held by the caller meanwhile.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoSeg { ptr, len }
    }

    /// The segment's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Fill the segments from the disk at the offset.
    Read,
    /// Write the segments to the disk at the offset.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Drop the data of `len` bytes at the offset.
    Discard {
        /// Length in bytes.
        len: u64,
    },
    /// Make `len` bytes at the offset read as zeroes.
    WriteZeroes {
        /// Length in bytes.
        len: u64,
        /// Whether the space may be freed.
        may_unmap: bool,
    },
}

/// A request: an operation, a disk offset, buffers for reads and writes, and a token for the
/// submitter to recognise its completion.
#[derive(Debug)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Buffers, in disk order from `offset` (reads and writes only).
    pub segs: Vec<IoSeg>,
    /// The submitter's token, returned with the completion.
    pub token: u64,
}

/// A finished request, handed back with its result.
#[derive(Debug)]
pub struct Completion {
    /// The request, with its segment list for reuse.
    pub request: Request,
    /// What the image answered.
    pub result: Result<(), Error>,
    /// Where its time went (see [`crate::trace`]).
    pub trace: IoTrace,
}

/// State shared by the submitter and the workers.
struct Queues {
    pending: VecDeque<Request>,
    done: VecDeque<Completion>,
    /// Submitted and not yet reaped.
    in_flight: usize,
    /// Submitted and not yet completed by a worker.
    unfinished: usize,
    stopping: bool,
    /// Whether the completions in `done` need no eventfd write of their own: one was written
    /// since the last reap that left completions to the eventfd, or the reaper polls
    /// ([`Aio::reap_polling`]). A completion is announced only when this was false, so a batch
    /// finishing while the reaper is away or busy costs one write and one wake-up, not one each.
    announced: bool,
    /// How many workers there are and how many wait for work.
    census: pool::Census,
}

/// The image requests run against, and its host file.
struct Served {
    image: Arc<dyn DiskImage>,
    /// The image's host file, for the pool's direct transfers and the ring.
    target: Option<DirectTarget>,
}

struct Shared {
    /// Replaced only while nothing is in flight ([`Aio::replace_image`]); each request clones
    /// it once.
    served: RwLock<Arc<Served>>,
    depth: usize,
    workers: Workers,
    queues: Mutex<Queues>,
    /// Signalled when work is pending or the pool stops.
    work: Condvar,
    /// Signalled when `unfinished` drops to zero.
    idle: Condvar,
    completion_fd: EventFd,
    /// How many completions wait in `done`: what a polling reaper asks without the mutex.
    waiting: AtomicUsize,
    /// The bounce buffers of requests the image cannot place ([`pool::BOUNCE_KEEP`] kept).
    bounces: BufPool,
    /// The workers not yet joined.
    threads: Mutex<Threads>,
}

/// The pool's worker threads not yet joined. glibc gives a thread's stack back (to its cache of
/// stacks, which frees those beyond its size) only once the thread is joined; until then the
/// top pages of an ended thread's stack stay resident (about 20 KiB each), so the workers that
/// end after a burst join each other as they end instead of waiting for the pool to grow or stop.
#[derive(Default)]
struct Threads {
    /// Every worker started and not yet handed over ([`Shared::hand_over`]).
    running: Vec<JoinHandle<()>>,
    /// The last worker that ended for lack of work: the next one to end joins it.
    ended: Option<JoinHandle<()>>,
}

impl Shared {
    fn queues(&self) -> MutexGuard<'_, Queues> {
        // The queues are only touched by short push/pop sequences that do not panic.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn threads(&self) -> MutexGuard<'_, Threads> {
        // Held only to move handles in and out.
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by a worker ending for lack of work: leaves its own handle for the next worker to
    /// end, and returns the one the last ended worker left, for the caller to join. None when
    /// its handle is not there (the pool is stopping, or its starter has not stored it yet: then
    /// the next start or the pool's drop joins it).
    fn hand_over(&self) -> Option<JoinHandle<()>> {
        let me = thread::current().id();
        let mut threads = self.threads();
        let i = threads.running.iter().position(|h| h.thread().id() == me)?;
        let mine = threads.running.swap_remove(i);
        threads.ended.replace(mine)
    }

    /// Queues `completion` for the reaper, with `queues` held; true when the caller must
    /// announce it ([`Shared::announce`], once it has let go of the mutex): nothing announced
    /// the completions waiting before it, and the reaper does not poll for them.
    fn push_done(&self, queues: &mut Queues, completion: Completion) -> bool {
        queues.done.push_back(completion);
        self.waiting.store(queues.done.len(), Ordering::Release);
        !std::mem::replace(&mut queues.announced, true)
    }

    /// Makes the completion eventfd readable.
    fn announce(&self) {
        // Only fails when the counter would overflow, which still leaves it readable.
        let _ = self.completion_fd.write(1);
    }

    /// The image requests run against now, with its host file.
    fn served(&self) -> Arc<Served> {
        // Only a replacement writes it, with nothing that panics while it holds the lock.
        Arc::clone(&self.served.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A worker pool serving one disk image; see the module documentation.
pub struct Aio {
    name: String,
    shared: Arc<Shared>,
    /// The io_uring engine's ring (`aio=io_uring`).
    ring: Option<Mutex<uring::Ring>>,
    /// Requests the ring took, and requests the pool took.
    on_ring: AtomicU64,
    on_pool: AtomicU64,
    /// Whether a worker failed to start since the pool last grew (reported once per episode).
    growth_failed: AtomicBool,
    /// Batches open ([`Aio::batch`]), and the most requests the ring takes before telling the
    /// kernel while one is.
    batches: AtomicUsize,
    batch_max: AtomicUsize,
}

/// The most requests a batch hands the kernel in one submission when `aio-max-batch` is 0:
/// QEMU's Linux AIO default, chosen there as the trade between a queued request's wait and
/// the submission's system call. Without a cap, one queue's pass at queue depth 32 from two
/// guest jobs (64 requests) went to the kernel at its end in one submission, and the p99
/// latency over virtio-mmio rose past QEMU's (docs/DESIGN.md, "Measuring latency").
pub const DEFAULT_MAX_BATCH: usize = 32;

/// An open batch of submissions ([`Aio::batch`]); dropping it hands the ring's queued
/// submissions to the kernel.
#[derive(Debug)]
#[must_use = "the batch is submitted when the guard is dropped"]
pub struct Batch<'a> {
    aio: &'a Aio,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.aio.batches.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A busy ring is held by a drain's `wait_idle`, whose wait submits what is queued.
            if let Some(mut ring) = self.aio.try_ring() {
                ring.submit_queued();
            }
        }
    }
}

impl fmt::Debug for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aio")
            .field("name", &self.name)
            .field("depth", &self.shared.depth)
            .field("workers", &self.shared.workers)
            .field("engine", &self.engine().name())
            .finish()
    }
}

impl Aio {
    /// Starts the pool's minimum of workers, threads named `<name>-io<N>`, serving `image`, with
    /// room for `depth` requests in flight (`aio=threads`).
    pub fn new(
        name: &str,
        image: Arc<dyn DiskImage>,
        workers: Workers,
        depth: usize,
    ) -> Result<Self, AioError> {
        Self::with_engine(name, image, workers, depth, Engine::Threads)
    }

    /// As [`Aio::new`], with the given engine; `Engine::IoUring` fails with
    /// [`AioError::IoUring`] where the host has no usable io_uring.
    pub fn with_engine(
        name: &str,
        image: Arc<dyn DiskImage>,
        workers: Workers,
        depth: usize,
        engine: Engine,
    ) -> Result<Self, AioError> {
        if workers.min == 0 || workers.max < workers.min || depth == 0 {
            return Err(AioError::BadSize { workers, depth });
        }
        let target = image.direct_target();
        if engine == Engine::IoUring && target.is_none() {
            return Err(AioError::NoHostFile {
                name: name.to_owned(),
            });
        }
        // More workers than requests in flight would never all have work.
        let max = workers.max.min(depth).max(workers.min);
        let ring_target = match engine {
            Engine::IoUring => target.clone(),
            Engine::Threads => None,
        };
        let shared = Arc::new(Shared {
            served: RwLock::new(Arc::new(Served { image, target })),
            depth,
            workers: Workers { max, ..workers },
            queues: Mutex::new(Queues {
                pending: VecDeque::with_capacity(depth),
                done: VecDeque::with_capacity(depth),
                in_flight: 0,
                unfinished: 0,
                stopping: false,
                announced: false,
                census: pool::Census::default(),
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            completion_fd: EventFd::new(EFD_NONBLOCK).map_err(AioError::EventFd)?,
            waiting: AtomicUsize::new(0),
            bounces: BufPool::new(pool::BOUNCE_KEEP),
            threads: Mutex::new(Threads {
                running: Vec::with_capacity(max),
                ended: None,
            }),
        });
        let ring = match ring_target {
            Some(target) => Some(Mutex::new(uring::Ring::new(
                target,
                depth,
                shared.completion_fd.as_raw_fd(),
            )?)),
            None => None,
        };
        let pool = Aio {
            name: name.to_owned(),
            shared,
            ring,
            on_ring: AtomicU64::new(0),
            on_pool: AtomicU64::new(0),
            growth_failed: AtomicBool::new(false),
            batches: AtomicUsize::new(0),
            batch_max: AtomicUsize::new(1),
        };
        for _ in 0..workers.min {
            pool.shared.queues().census.live += 1;
            pool.start_worker()?;
        }
        Ok(pool)
    }

    /// Starts a worker already counted in the census (and uncounts it when that fails).
    fn start_worker(&self) -> Result<(), AioError> {
        let index = {
            let mut queues = self.shared.queues();
            queues.census.started += 1;
            queues.census.started - 1
        };
        let shared = Arc::clone(&self.shared);
        let spawned = thread::Builder::new()
            .name(format!("{}-io{index}", self.name))
            .stack_size(crate::THREAD_STACK)
            .spawn(move || pool::worker(&shared));
        let (spawned, ended) = {
            let mut threads = self.shared.threads();
            let spawned = spawned.map(|handle| threads.running.push(handle));
            // The workers that ended without handing themselves over.
            (spawned, extract_finished(&mut threads.running))
        };
        ended.into_iter().for_each(join_worker);
        match spawned {
            Ok(()) => Ok(()),
            Err(source) => {
                self.shared.queues().census.live -= 1;
                Err(AioError::Spawn {
                    name: self.name.clone(),
                    index,
                    source,
                })
            }
        }
    }

    /// Workers running now (busy or idle).
    pub fn workers_alive(&self) -> usize {
        self.shared.queues().census.live
    }

    /// The engine doing the data I/O.
    pub fn engine(&self) -> Engine {
        if self.ring.is_some() {
            Engine::IoUring
        } else {
            Engine::Threads
        }
    }

    /// How many requests the ring took, and how many the worker pool took, so far.
    pub fn requests_by_engine(&self) -> (u64, u64) {
        (
            self.on_ring.load(Ordering::Relaxed),
            self.on_pool.load(Ordering::Relaxed),
        )
    }

    /// How many times the io_uring engine told the kernel of queued submissions
    /// (`io_uring_enter`), a drain's waits aside; 0 for the pool alone.
    pub fn ring_submissions(&self) -> u64 {
        self.ring.as_ref().map_or(0, |r| {
            r.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .submissions()
        })
    }

    /// Opens a batch: until the returned guard is dropped, the requests the io_uring engine
    /// takes are queued on its ring and the kernel is told of them together, `max` requests at
    /// a time (0: [`DEFAULT_MAX_BATCH`]) and the rest when the batch ends, in one
    /// `io_uring_enter` rather than one each; after QEMU's `blk_io_plug` and `aio-max-batch`.
    /// Batches nest: the outermost's `max` counts. The worker pool's requests start at once, as
    /// before. Nothing orders requests in flight together on either engine, so holding some
    /// back changes no ordering a caller may rely on (a flush covers the writes completed before
    /// it was submitted).
    pub fn batch(&self, max: u64) -> Batch<'_> {
        if self.batches.fetch_add(1, Ordering::AcqRel) == 0 {
            let max = match usize::try_from(max) {
                Ok(0) => DEFAULT_MAX_BATCH,
                Ok(n) => n,
                Err(_) => usize::MAX,
            };
            self.batch_max.store(max, Ordering::Relaxed);
        }
        Batch { aio: self }
    }

    /// The ring, when it is free right now (never waits: a thread draining may hold it).
    fn try_ring(&self) -> Option<MutexGuard<'_, uring::Ring>> {
        match self.ring.as_ref()?.try_lock() {
            Ok(ring) => Some(ring),
            // A panic while holding the ring leaves its bookkeeping as it was: keep going.
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Queues a completion the ring produced (or a request that needed no I/O); true when the
    /// caller must announce it (see [`Shared::push_done`]).
    fn push_done(&self, completion: Completion) -> bool {
        self.shared.push_done(&mut self.shared.queues(), completion)
    }

    /// The image the pool serves.
    pub fn image(&self) -> Arc<dyn DiskImage> {
        Arc::clone(&self.shared.served().image)
    }

    /// Serves `image` from now on and returns the image served until now. Only while nothing is
    /// in flight (the submitter drained, [`Aio::wait_idle`] and reaped): otherwise, or when the
    /// ring cannot address the new image's host file, nothing changes.
    pub fn replace_image(&self, image: Arc<dyn DiskImage>) -> Result<Arc<dyn DiskImage>, AioError> {
        let target = image.direct_target();
        if self.ring.is_some() && target.is_none() {
            return Err(AioError::NoHostFile {
                name: self.name.clone(),
            });
        }
        // The ring's mutex before the queues' (the module's lock order).
        let mut ring = self
            .ring
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(PoisonError::into_inner));
        let queues = self.shared.queues();
        if queues.in_flight != 0 {
            return Err(AioError::Busy {
                name: self.name.clone(),
                in_flight: queues.in_flight,
            });
        }
        if let (Some(ring), Some(target)) = (ring.as_mut(), &target) {
            ring.retarget(target.clone())?;
        }
        let mut slot = self
            .shared
            .served
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // Held until the image is in place: no submission slips in between check and swap.
        drop(queues);
        let old = std::mem::replace(&mut *slot, Arc::new(Served { image, target }));
        // Nothing in flight holds a clone: the caller gets the last handle of the old image.
        Ok(Arc::clone(&old.image))
    }

    /// The eventfd that becomes readable when completions are ready to reap.
    pub fn completion_fd(&self) -> RawFd {
        self.shared.completion_fd.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.shared.queues().in_flight
    }

    /// Whether another request can be submitted now.
    pub fn has_room(&self) -> bool {
        self.shared.queues().in_flight < self.shared.depth
    }

    /// Queues a request for a worker. When `depth` requests are already in flight the request
    /// is handed back: reap completions, then try again.
    pub fn submit(&self, request: Request) -> Result<(), Request> {
        {
            let mut queues = self.shared.queues();
            if queues.in_flight >= self.shared.depth || queues.stopping {
                return Err(request);
            }
            queues.in_flight += 1;
        }
        let batch = if self.batches.load(Ordering::Acquire) > 0 {
            self.batch_max.load(Ordering::Relaxed)
        } else {
            1
        };
        let request = match self.try_ring() {
            Some(mut ring) => {
                match ring.submit(self.shared.served().image.as_ref(), request, batch) {
                    uring::Submitted::Queued => {
                        self.on_ring.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    uring::Submitted::Done(completion) => {
                        drop(ring);
                        self.on_ring.fetch_add(1, Ordering::Relaxed);
                        if self.push_done(completion) {
                            self.shared.announce();
                        }
                        return Ok(());
                    }
                    uring::Submitted::Declined(request) => request,
                }
            }
            None => request,
        };
        self.on_pool.fetch_add(1, Ordering::Relaxed);
        let mut queues = self.shared.queues();
        queues.unfinished += 1;
        queues.pending.push_back(request);
        let grow = queues.pending.len() > queues.census.idle
            && queues.census.live < self.shared.workers.max;
        if grow {
            queues.census.live += 1;
        }
        drop(queues);
        self.shared.work.notify_one();
        if grow {
            match self.start_worker() {
                Ok(()) => self.growth_failed.store(false, Ordering::Relaxed),
                // The workers already running still take the request; say so once, not on every
                // request while thread creation keeps failing.
                Err(e) if !self.growth_failed.swap(true, Ordering::Relaxed) => {
                    let cause = std::error::Error::source(&e).map(ToString::to_string);
                    log::warn!("{e}: {}", cause.unwrap_or_default());
                }
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Hands every ready completion to `f`, oldest first, and returns how many there were.
    /// Clears the eventfd first; the completions that come while it runs are taken too, without
    /// an eventfd write. Once it has found no more, the next completion makes the eventfd
    /// readable again.
    pub fn reap(&self, f: impl FnMut(Completion)) -> usize {
        self.take_done(false, f)
    }

    /// As [`Aio::reap`], for a reaper that polls [`Aio::has_completions`]: the completions
    /// that come after it leave the eventfd alone (as QEMU's `aio_notify` skips the write while
    /// its loop is not about to sleep). The caller must [`Aio::reap`] before it next waits for
    /// the eventfd, or those completions wait unseen.
    pub fn reap_polling(&self, f: impl FnMut(Completion)) -> usize {
        self.take_done(true, f)
    }

    /// Whether completions wait to be reaped (io_uring's are announced on the eventfd only).
    pub fn has_completions(&self) -> bool {
        self.shared.waiting.load(Ordering::Acquire) > 0
    }

    /// [`Aio::reap`] and [`Aio::reap_polling`]: `polling` says whether the next completions
    /// need no eventfd write.
    fn take_done(&self, polling: bool, mut f: impl FnMut(Completion)) -> usize {
        // EAGAIN just means nothing was signalled since the last reap.
        let _ = self.shared.completion_fd.read();
        if let Some(mut ring) = self.try_ring() {
            // Taken by this reap: nothing to announce.
            ring.process(|c| {
                self.push_done(c);
            });
        }
        let mut count = 0;
        loop {
            let completion = {
                let mut queues = self.shared.queues();
                let completion = queues.done.pop_front();
                self.shared
                    .waiting
                    .store(queues.done.len(), Ordering::Release);
                match completion {
                    Some(_) => queues.in_flight -= 1,
                    // Decided with the mutex held, as the workers decide whether to announce:
                    // a completion queued after this is announced unless the caller polls.
                    None => queues.announced = polling,
                }
                completion
            };
            match completion {
                Some(c) => {
                    f(c);
                    count += 1;
                }
                None => return count,
            }
        }
    }

    /// Blocks until every submitted request has been run by a worker or the ring (its
    /// completion may still wait to be reaped). Needs nothing from the submitter's thread, so a
    /// thread draining a device can wait here while the device's context runs, or is held by
    /// the waiter itself.
    pub fn wait_idle(&self) {
        let mut queues = self.shared.queues();
        while queues.unfinished > 0 {
            queues = self
                .shared
                .idle
                .wait(queues)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(queues);
        if let Some(ring) = &self.ring {
            let mut ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
            let mut announce = false;
            ring.wait(|c| announce |= self.push_done(c));
            drop(ring);
            if announce {
                // The submitter's reap may have found the ring busy.
                self.shared.announce();
            }
        }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        self.wait_idle();
        self.shared.queues().stopping = true;
        self.shared.work.notify_all();
        // A worker handing itself over meanwhile is in one of the two, and joins the one it
        // takes before it ends.
        let threads = std::mem::take(&mut *self.shared.threads());
        threads
            .running
            .into_iter()
            .chain(threads.ended)
            .for_each(join_worker);
    }
}

/// Waits for a worker thread to end, reporting a panic.
fn join_worker(handle: JoinHandle<()>) {
    let name = handle.thread().name().unwrap_or("an I/O worker").to_owned();
    if handle.join().is_err() {
        log::error!("{name} panicked");
    }
}

/// Takes the handles of the threads that have ended out of `threads`.
fn extract_finished(threads: &mut Vec<JoinHandle<()>>) -> Vec<JoinHandle<()>> {
    let (ended, running) = threads.drain(..).partition(JoinHandle::is_finished);
    *threads = running;
    ended
}

#[cfg(test)]
mod tests {
    // Tests of submission, completion and draining against a raw file image with a gate.
    #![allow(clippy::unwrap_used)]

    use super::test_image::{reap_one, roundtrip, seg, signalled_within, RawFile};
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[test]
    fn write_then_read_back_across_segments() {
        let image = RawFile::new(1 << 20);
        let aio = Aio::new("t", image.clone(), Workers::fixed(2), 8).unwrap();
        let mut a = vec![0xa5u8; 512];
        let mut b = vec![0x5au8; 1024];
        let done = roundtrip(&aio, Op::Write, 4096, vec![seg(&mut a), seg(&mut b)], 7);
        done.result.unwrap();

        let mut back = vec![0u8; 1536];
        let done = roundtrip(&aio, Op::Read, 4096, vec![seg(&mut back)], 8);
        done.result.unwrap();
        assert!(back[..512].iter().all(|&x| x == 0xa5));
        assert!(back[512..].iter().all(|&x| x == 0x5a));
        assert_eq!(aio.in_flight(), 0);
    }

    #[test]
    fn the_image_is_replaced_only_with_nothing_in_flight() {
        let (a, b) = (RawFile::new(1 << 16), RawFile::new(1 << 16));
        a.set_gate(false);
        let aio = Aio::new("t", a.clone(), Workers::fixed(1), 4).unwrap();
        let mut buf = vec![0u8; 512];
        aio.submit(Request {
            op: Op::Read,
            offset: 0,
            segs: vec![seg(&mut buf)],
            token: 1,
        })
        .unwrap();
        assert!(matches!(
            aio.replace_image(b.clone()),
            Err(AioError::Busy { in_flight: 1, .. })
        ));
        a.set_gate(true);
        reap_one(&aio).result.unwrap();
        let old = aio.replace_image(b.clone()).unwrap();
        assert!(Arc::ptr_eq(&old, &(a.clone() as Arc<dyn DiskImage>)));
        let mut data = vec![0x3cu8; 512];
        roundtrip(&aio, Op::Write, 0, vec![seg(&mut data)], 2)
            .result
            .unwrap();
        let (mut in_a, mut in_b) = (vec![0u8; 512], vec![0u8; 512]);
        a.inner.read_at(&mut in_a, 0).unwrap();
        b.inner.read_at(&mut in_b, 0).unwrap();
        assert!(in_a.iter().all(|&x| x == 0) && in_b.iter().all(|&x| x == 0x3c));
    }

    #[test]
    fn errors_come_back_in_the_completion() {
        let image = RawFile::new(4096);
        let aio = Aio::new("t", image, Workers::fixed(1), 4).unwrap();
        let mut buf = vec![0u8; 512];
        let done = roundtrip(&aio, Op::Read, 4096, vec![seg(&mut buf)], 1);
        assert!(matches!(
            done.result,
            Err(Error::OutOfRange {
                offset: 4096,
                len: 512,
                size: 4096
            })
        ));
    }

    #[test]
    fn flush_discard_and_write_zeroes_reach_the_image() {
        let image = RawFile::new(8192);
        image.inner.write_at(&[0xffu8; 8192], 0).unwrap();
        let aio = Aio::new("t", image.clone(), Workers::fixed(1), 4).unwrap();
        for (token, op) in [
            (1, Op::Flush),
            (2, Op::Discard { len: 512 }),
            (
                3,
                Op::WriteZeroes {
                    len: 512,
                    may_unmap: false,
                },
            ),
        ] {
            let offset = if token == 3 { 4096 } else { 0 };
            roundtrip(&aio, op, offset, Vec::new(), token)
                .result
                .unwrap();
        }
        assert_eq!(image.flushes.load(Ordering::SeqCst), 1);
        let mut back = [0u8; 8192];
        image.inner.read_at(&mut back, 0).unwrap();
        assert!(back[..512].iter().all(|&x| x == 0));
        assert!(back[512..4096].iter().all(|&x| x == 0xff));
        assert!(back[4096..4608].iter().all(|&x| x == 0));
    }

    #[test]
    fn the_queue_is_bounded_and_hands_back_what_does_not_fit() {
        let image = RawFile::new(1 << 16);
        image.set_gate(false);
        let aio = Aio::new("t", image.clone(), Workers::fixed(2), 3).unwrap();
        let mut bufs = vec![vec![0u8; 512]; 4];
        let mut segs: Vec<IoSeg> = bufs.iter_mut().map(|b| seg(b)).collect();
        for (token, s) in (0u64..).zip(&segs[..3]) {
            aio.submit(Request {
                op: Op::Read,
                offset: 0,
                segs: vec![*s],
                token,
            })
            .unwrap();
        }
        assert!(!aio.has_room());
        let refused = aio
            .submit(Request {
                op: Op::Read,
                offset: 0,
                segs: vec![segs.pop().unwrap()],
                token: 3,
            })
            .unwrap_err();
        assert_eq!(refused.token, 3);
        assert_eq!(aio.in_flight(), 3);
        // Two workers are stuck in reads; none completed.
        while image.reads_started.load(Ordering::SeqCst) < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(aio.reap(|_| panic!("nothing completed yet")), 0);
        image.set_gate(true);
        aio.wait_idle();
        let mut tokens = Vec::new();
        aio.reap(|c| {
            c.result.unwrap();
            tokens.push(c.request.token);
        });
        tokens.sort_unstable();
        assert_eq!(tokens, vec![0, 1, 2]);
        assert!(aio.has_room());
    }

    #[test]
    fn dropping_the_pool_waits_for_requests_in_flight() {
        let image = RawFile::new(1 << 16);
        image.set_gate(false);
        let aio = Aio::new("t", image.clone(), Workers::fixed(1), 2).unwrap();
        let mut buf = vec![0u8; 512];
        aio.submit(Request {
            op: Op::Read,
            offset: 0,
            segs: vec![seg(&mut buf)],
            token: 0,
        })
        .unwrap();
        let opener = {
            let image = image.clone();
            thread::spawn(move || {
                while image.reads_started.load(Ordering::SeqCst) == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
                image.set_gate(true);
            })
        };
        drop(aio);
        // The worker was stuck until the gate opened, so the drop cannot have returned earlier.
        assert!(*image.gate.lock().unwrap());
        opener.join().unwrap();
    }

    /// Submits a one-segment read of `seg` at offset 0 with `token`.
    fn submit_read(aio: &Aio, seg: IoSeg, token: u64) {
        aio.submit(Request {
            op: Op::Read,
            offset: 0,
            segs: vec![seg],
            token,
        })
        .unwrap();
    }

    /// Completions that finish before the reaper comes share one eventfd write; once a reap
    /// has found no more, the next one writes again; after a polling reap it does not, and
    /// the poll finds it.
    #[test]
    fn a_batch_of_completions_is_announced_once() {
        let image = RawFile::new(1 << 16);
        image.set_gate(false);
        let aio = Aio::new("t", image.clone(), Workers::fixed(4), 4).unwrap();
        let mut buf = vec![0u8; 512];
        for token in 0..4 {
            submit_read(&aio, seg(&mut buf), token);
        }
        while image.reads_started.load(Ordering::SeqCst) < 4 {
            thread::sleep(Duration::from_millis(1));
        }
        image.set_gate(true);
        aio.wait_idle();
        assert!(aio.has_completions());
        // A worker writes the eventfd just after it counts its request finished.
        assert!(signalled_within(&aio, 1000));
        thread::sleep(Duration::from_millis(20));
        // The eventfd's counter: how many writes announced the four.
        assert_eq!(aio.shared.completion_fd.read().unwrap(), 1);
        assert_eq!(aio.reap(|c| c.result.unwrap()), 4);
        assert!(!aio.has_completions());

        submit_read(&aio, seg(&mut buf), 4);
        aio.wait_idle();
        assert!(
            signalled_within(&aio, 1000),
            "a completion after a reap is not announced"
        );
        assert_eq!(aio.reap_polling(|c| c.result.unwrap()), 1);

        submit_read(&aio, seg(&mut buf), 5);
        aio.wait_idle();
        assert!(aio.has_completions());
        assert!(!signalled_within(&aio, 20), "announced to a polling reaper");
        assert_eq!(aio.reap(|c| c.result.unwrap()), 1);
        assert!(!signalled_within(&aio, 20));
    }

    /// Many workers completing at once while the submitter reaps, now as a loop that sleeps on
    /// the eventfd after each reap, now as one that polls a while first (`reap_polling`, then
    /// `reap` before it sleeps): a completion is never left waiting with the eventfd clear
    /// while the reaper sleeps.
    #[test]
    fn no_completion_waits_unannounced_while_the_reaper_sleeps() {
        const TOTAL: u64 = 20_000;
        let image = RawFile::new(1 << 16);
        let aio = Aio::new("t", image, Workers::fixed(8), 16).unwrap();
        let mut buf = vec![0u8; 512];
        let seg = seg(&mut buf);
        let (mut submitted, mut reaped) = (0, 0);
        let take = |c: Completion| c.result.unwrap();
        for round in 0.. {
            while submitted < TOTAL && aio.has_room() {
                submit_read(&aio, seg, submitted);
                submitted += 1;
            }
            if round % 2 == 1 {
                for _ in 0..(round % 7) * 50 {
                    if aio.has_completions() {
                        reaped += aio.reap_polling(take) as u64;
                    }
                    std::hint::spin_loop();
                }
            }
            reaped += aio.reap(take) as u64;
            if reaped == TOTAL {
                break;
            }
            if aio.in_flight() > 0 {
                assert!(
                    signalled_within(&aio, 5000),
                    "{} in flight, none announced",
                    aio.in_flight()
                );
            }
        }
        assert_eq!(aio.in_flight(), 0);
    }

    #[test]
    fn io_uring_needs_an_image_with_a_host_file() {
        // The test image keeps the trait's default: no host file to give the ring.
        let image = RawFile::new(4096);
        assert!(matches!(
            Aio::with_engine("t", image, Workers::fixed(1), 4, Engine::IoUring),
            Err(AioError::NoHostFile { name }) if name == "t"
        ));
        let aio = Aio::with_engine(
            "t",
            RawFile::new(4096),
            Workers::fixed(1),
            4,
            Engine::Threads,
        )
        .unwrap();
        assert_eq!(aio.engine(), Engine::Threads);
    }
}
