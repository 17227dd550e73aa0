//! Block jobs (QMP `block-stream`, `block-commit`, `query-block-jobs`, `block-job-*`), after QEMU's job layer
//! (`qapi/job.json`, `job.c`): one state table decides every transition and which command verbs
//! each state accepts; each transition raises `JOB_STATUS_CHANGE`, a mirror (the active commit,
//! `active.rs`) in sync raises `BLOCK_JOB_READY` and runs until `block-job-complete` (or
//! `block-job-cancel`) ends it, a step whose read or write fails raises `BLOCK_JOB_ERROR` and
//! then does what the job's `on-error` says ([`JobEnd`]), and the end of a job raises
//! `BLOCK_JOB_COMPLETED` or `BLOCK_JOB_CANCELLED` with QEMU's members. Jobs finalize and dismiss
//! themselves (QEMU's `auto-finalize` and `auto-dismiss` defaults).
//!
//! Where a job runs: its copying runs on a thread of its own (under the disk workers' sandbox
//! filter), one bounded step at a time: a step handles at most one chunk of the disk (a run of
//! clusters, [`Work::step`]) and then arms the thread's next step after the delay the speed
//! limit asks for (QEMU's rate limit, `ratelimit.rs`). The step's I/O goes straight to the
//! images, which are safe to share between threads, so the disk's context (its iothread, or the
//! main loop's context) never waits for a step: guest requests go on while the job copies. The
//! change to the chain when the copy is done (new backing names, the chain reopened) runs on the
//! main loop, with the global lock held, as QEMU's job finalization does: the copy's end is
//! announced with the job's next status event, whose wake-up reaches the monitor's handler,
//! which then finalizes the jobs waiting for it ([`Jobs::finalize_waiting`]) with the disk
//! drained in its context and the job's thread ended.
//!
//! Locks: a job's [`State`] mutex is held only to read or change the state, never across I/O;
//! it is taken by the main thread (commands, finalization) and by the job's thread (steps), which
//! waits on it for its next step. The work (`Work`) is locked by the step, on the job's thread,
//! and by the finalization, on the main thread once the steps have ended. A monitor command
//! acquires no context.

mod active;
mod commit;
mod ratelimit;
mod stream;
#[cfg(test)]
mod testing;

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::block::{errno_of, ErrorAction, ErrorPolicy, IoStatus};

use crate::monitor::{BlockJobInfo, EventSender, JobEvent, QmpEvent, VmDisk};
use ratelimit::RateLimit;

pub use commit::{start_commit, CommitArgs};
pub use stream::{start_stream, StreamArgs};

/// How a job ends: whether it finalizes and dismisses itself (`auto-finalize`, `auto-dismiss`),
/// or waits in `pending` for `job-finalize` and in `concluded` for `job-dismiss`; and what a
/// failed read or write of its images does (`on-error`, QEMU's `BlockdevOnError`): `Report`
/// ends the job, `Stop` pauses it (`io-status` failed or nospace) until `block-job-resume`
/// retries, `Enospc` stops on ENOSPC and reports anything else, `Ignore` goes on (a commit
/// retries the chunk; a stream skips it and fails at its end, as QEMU's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobEnd {
    /// `auto-finalize`.
    pub finalize: bool,
    /// `auto-dismiss`.
    pub dismiss: bool,
    /// `on-error`.
    pub on_error: ErrorPolicy,
}

impl Default for JobEnd {
    /// QEMU's defaults: both, and `report`.
    fn default() -> Self {
        Self {
            finalize: true,
            dismiss: true,
            on_error: ErrorPolicy::Report,
        }
    }
}

/// An image of a disk's chain as a job's arguments name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// By file name (`base`, `top`): as given, or resolved as a backing file name is.
    File(String),
    /// By node name (`base-node`, `top-node`), found by the monitor at `depth` of the disk's
    /// chain (0: its top).
    Node {
        /// The node name.
        name: String,
        /// Its image's depth.
        depth: usize,
    },
}

/// A job's status (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Not yet created (only the start of the table).
    Undefined,
    /// Created, not started.
    Created,
    /// Copying.
    Running,
    /// Paused by `block-job-pause`, at a step boundary.
    Paused,
    /// Ready to complete (a mirror's first pass done).
    Ready,
    /// Ready, and paused.
    Standby,
    /// Copy done, waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Ending in failure or cancelled.
    Aborting,
    /// Ended, until dismissed.
    Concluded,
    /// Gone.
    Null,
}

/// Every status, in QEMU's order (the table's indices).
const STATUSES: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

/// Which status may follow which (QEMU's `JobSTT`), rows the current status in the order of
/// [`STATUSES`]: U C R P Y S W D X E N.
const TRANSITIONS: [[u8; 11]; 11] = [
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // undefined
    [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // created
    [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // running
    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // paused
    [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // ready
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // standby
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // waiting
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // pending
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // aborting
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // concluded
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // null
];

/// A command verb (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `block-job-cancel`.
    Cancel,
    /// `block-job-pause`.
    Pause,
    /// `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `block-job-complete`.
    Complete,
    /// `job-finalize`.
    Finalize,
    /// `job-dismiss`.
    Dismiss,
}

/// In which statuses each verb is accepted (QEMU's `JobVerbTable`), columns as [`TRANSITIONS`].
const VERBS: [(Verb, [u8; 11]); 7] = [
    (Verb::Cancel, [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    (Verb::Pause, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
    (Verb::Resume, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
    (Verb::SetSpeed, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
    (Verb::Complete, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
    (Verb::Finalize, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
    (Verb::Dismiss, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
];

impl JobStatus {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Undefined => "undefined",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Ready => "ready",
            Self::Standby => "standby",
            Self::Waiting => "waiting",
            Self::Pending => "pending",
            Self::Aborting => "aborting",
            Self::Concluded => "concluded",
            Self::Null => "null",
        }
    }

    fn index(self) -> usize {
        STATUSES.iter().position(|&s| s == self).unwrap_or(0)
    }

    /// Whether `next` may follow this status.
    pub fn may_become(self, next: JobStatus) -> bool {
        TRANSITIONS[self.index()][next.index()] == 1
    }

    /// Whether this status accepts `verb`.
    pub fn accepts(self, verb: Verb) -> bool {
        VERBS
            .iter()
            .any(|(v, row)| *v == verb && row[self.index()] == 1)
    }
}

impl Verb {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SetSpeed => "set-speed",
            Self::Complete => "complete",
            Self::Finalize => "finalize",
            Self::Dismiss => "dismiss",
        }
    }
}

/// A refused job command or a job that could not start; the messages are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// No job with that id (QEMU's class `DeviceNotActive`).
    #[error("Block job '{0}' not found")]
    NotFound(String),
    /// The job's status refuses the verb.
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    Verb {
        /// The job.
        id: String,
        /// Its status.
        status: &'static str,
        /// The verb.
        verb: &'static str,
    },
    /// `block-job-pause` on a job the user paused.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// `block-job-resume` on a job the user did not pause.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `block-job-cancel` without `force` on a job the user paused.
    #[error("The block job for device '{0}' is currently paused")]
    CancelPaused(String),
    /// A negative speed.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
    /// A job id that is not an identifier.
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// A job id in use.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// A second job on a disk.
    #[error("Node '{drive}' is busy: block device is in use by block job: {kind}")]
    Busy {
        /// The disk.
        drive: String,
        /// The running job's type.
        kind: &'static str,
    },
    /// Anything else the job cannot do, in QEMU's words.
    #[error("{0}")]
    Other(String),
}

/// Which kind of job (QEMU's `JobType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `block-stream`.
    Stream,
    /// `block-commit`.
    Commit,
}

impl JobKind {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Commit => "commit",
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the disk the step dealt with (the job's progress).
    pub advanced: u64,
    /// Bytes it copied (what the speed limit counts).
    pub copied: u64,
    /// For a mirror (active commit): the bytes left to copy, once known; the job is ready
    /// when none are.
    pub remaining: Option<u64>,
}

/// Why a step failed: its I/O (QEMU raises `BLOCK_JOB_ERROR` for these and applies the job's
/// `on-error`), or anything else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum StepError {
    /// Reading or writing the images failed.
    #[error("{message}")]
    Io {
        /// A read (else a write).
        read: bool,
        /// The host error number.
        errno: i32,
        /// The bytes of the disk the failed step covered (what a stream ignoring it skips).
        len: u64,
        /// What failed.
        message: String,
    },
    /// Not the I/O: the job's images gone, a length out of range.
    #[error("{0}")]
    Other(String),
}

impl StepError {
    /// A failed read of the `len` bytes the step covers.
    fn read(e: &block::Error, len: u64) -> Self {
        Self::io(e, true, len)
    }

    /// A failed write of the `len` bytes the step covers.
    fn write(e: &block::Error, len: u64) -> Self {
        Self::io(e, false, len)
    }

    fn io(e: &block::Error, read: bool, len: u64) -> Self {
        Self::Io {
            read,
            errno: errno_of(e),
            len,
            message: devices::error_chain(e),
        }
    }

    /// The job's images are gone (it ended meanwhile).
    fn ended() -> Self {
        Self::Other("The job has ended".to_owned())
    }
}

/// A job's buffer for chunks of `len` bytes, aligned for `O_DIRECT` so that its reads and
/// writes go straight to the images' files, kept for the job's run.
fn chunk_buffer(len: u64) -> block::AlignedBuf {
    // A chunk is at most a few MiB.
    block::AlignedBuf::zeroed(usize::try_from(len).unwrap_or(usize::MAX))
}

/// The copying part of a job: steps on the job's thread, then its end on the main loop.
trait Work: Send + std::fmt::Debug {
    /// Deals with the disk from `offset`, at most one chunk.
    fn step(&mut self, offset: u64) -> Result<Step, StepError>;

    /// Changes the chain once every step succeeded (main thread, global lock held).
    fn finish(&mut self, disk: &mut VmDisk) -> Result<(), String>;

    /// Lets go of the images it holds and of what it changed in the disk's device (the job
    /// ended either way; main thread, global lock held).
    fn release(&mut self, disk: Option<&mut VmDisk>);
}

/// How the steps ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// Every step succeeded.
    Done,
    /// Cancelled.
    Cancelled,
    /// A step failed.
    Failed(String),
}

/// A job's state, as commands and steps see it.
#[derive(Debug)]
struct State {
    status: JobStatus,
    len: u64,
    offset: u64,
    speed: u64,
    limit: RateLimit,
    user_paused: bool,
    cancelled: bool,
    busy: bool,
    /// A mirror: it ends when `block-job-complete` or `block-job-cancel` asks, once in sync.
    mirror: bool,
    /// A mirror's bytes left to copy, once its first scan is done.
    remaining: Option<u64>,
    /// Asked to end while ready: `Some(true)` switching the disk (`block-job-complete`),
    /// `Some(false)` leaving it as it is (`block-job-cancel`, QEMU's completion without pivot).
    completing: Option<bool>,
    /// Finalizes and dismisses itself, or not.
    end: JobEnd,
    /// Why it ended, once it failed or was cancelled (QEMU's job error).
    error: Option<String>,
    /// Set once by the last step; the job is then waiting for its finalization.
    ended: Option<Ended>,
    /// Why `on-error` paused it (`ok` once resumed).
    io_status: IoStatus,
    /// The first error a stream with `on-error` `ignore` went past: it fails at its end.
    ignored: Option<String>,
    /// When the job's thread runs the next step (`None`: when something arms it).
    next: Option<Instant>,
    /// The job's thread stops without ending the job (its jobs dropped).
    quit: bool,
}

/// One job.
#[derive(Debug)]
pub struct Job {
    id: String,
    kind: JobKind,
    drive: String,
    events: EventSender,
    state: Mutex<State>,
    work: Mutex<Box<dyn Work>>,
    /// Wakes the job's thread when [`State::next`] changes.
    wake: Condvar,
    /// The job's thread, until it is joined.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The jobs whose steps ended, for the main loop to finalize.
    ended: Arc<Mutex<Vec<Arc<Job>>>>,
    me: Weak<Job>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Held only by short, non-panicking code.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often a mirror with nothing to copy looks again (QEMU's mirror `SLICE_TIME`).
const IDLE: Duration = Duration::from_millis(100);

impl Job {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Moves to `next`, raising `JOB_STATUS_CHANGE`; a transition the table refuses is a bug
    /// and is logged, not made.
    fn transition(&self, state: &mut State, next: JobStatus) {
        if !state.status.may_become(next) {
            log::error!(
                "job {}: no transition from {} to {}",
                self.id,
                state.status.name(),
                next.name()
            );
            return;
        }
        state.status = next;
        self.events.send(QmpEvent::JobStatusChange {
            id: self.id.clone(),
            status: next.name(),
        });
    }

    fn event_data(&self, state: &State) -> JobEvent {
        JobEvent {
            kind: self.kind.name(),
            device: self.id.clone(),
            len: state.len,
            offset: state.offset,
            speed: state.speed,
        }
    }

    /// Has the job's thread run the next step after `after`. Verbs and steps arm it with the
    /// job's state locked, so a verb that changes the state and then arms (cancel, pause,
    /// set-speed, complete) either is seen by the step running meanwhile or arms after it:
    /// never overwritten by a sleep chosen before it, and never missed by the thread, which
    /// looks at [`State::next`] with the state locked before it waits.
    fn arm(&self, s: &mut State, after: Duration) {
        s.next = Some(Instant::now() + after);
        self.wake.notify_one();
    }

    /// The job's thread: each step when it is armed, until the steps end or the jobs are
    /// dropped.
    fn steps(&self) {
        loop {
            {
                let mut s = self.state();
                loop {
                    if s.quit || s.ended.is_some() {
                        return;
                    }
                    let now = Instant::now();
                    s = match s.next {
                        Some(at) if at <= now => break,
                        Some(at) => {
                            self.wake
                                .wait_timeout(s, at - now)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0
                        }
                        None => self.wake.wait(s).unwrap_or_else(PoisonError::into_inner),
                    };
                }
                s.next = None;
            }
            self.run_step();
        }
    }

    /// Pauses a job that was running or ready (`paused`, `standby`), at a step boundary.
    fn enter_pause(&self, s: &mut State) {
        match s.status {
            JobStatus::Running => self.transition(s, JobStatus::Paused),
            JobStatus::Ready => self.transition(s, JobStatus::Standby),
            _ => {}
        }
    }

    /// One step, on the job's thread.
    fn run_step(&self) {
        let offset = {
            let mut s = self.state();
            if s.ended.is_some() {
                return;
            }
            if s.cancelled {
                drop(s);
                self.end_steps(Ended::Cancelled);
                return;
            }
            if s.user_paused {
                self.enter_pause(&mut s);
                return;
            }
            let done = if s.mirror {
                s.completing.is_some() && s.remaining == Some(0)
            } else {
                s.offset >= s.len
            };
            if done {
                let how = match s.ignored.take() {
                    Some(e) => Ended::Failed(e),
                    None => Ended::Done,
                };
                drop(s);
                self.end_steps(how);
                return;
            }
            s.busy = true;
            s.offset
        };
        let started = Instant::now();
        let result = lock(&self.work).step(offset);
        let mut s = self.state();
        s.busy = false;
        match result {
            Ok(step) => {
                s.offset = if s.mirror {
                    s.offset + step.advanced
                } else {
                    (s.offset + step.advanced).min(s.len)
                };
                let mut delay = s.limit.delay(step.copied, started, Instant::now());
                if let Some(remaining) = step.remaining {
                    s.len = s.offset + remaining;
                    s.remaining = Some(remaining);
                    if remaining == 0 {
                        if s.status == JobStatus::Running {
                            self.transition(&mut s, JobStatus::Ready);
                            self.events
                                .send(QmpEvent::BlockJobReady(self.event_data(&s)));
                        }
                        delay = delay.max(IDLE);
                    }
                }
                // A pause, cancel or completion that came during the step armed the thread
                // before this re-arm replaces it: it is taken now, not after a sleep.
                if s.user_paused || s.cancelled || s.completing.is_some() {
                    delay = Duration::ZERO;
                }
                self.arm(&mut s, delay);
            }
            Err(e) => self.step_failed(s, e),
        }
    }

    /// A failed step: `BLOCK_JOB_ERROR` for a failed read or write, then what the job's
    /// `on-error` asks (QEMU's `block_job_error_action`).
    fn step_failed(&self, mut s: MutexGuard<'_, State>, e: StepError) {
        let StepError::Io {
            read, errno, len, ..
        } = e
        else {
            drop(s);
            self.end_steps(Ended::Failed(e.to_string()));
            return;
        };
        let action = s.end.on_error.action(errno);
        self.events.send(QmpEvent::BlockJobError {
            id: self.id.clone(),
            operation: if read { "read" } else { "write" },
            action: action.name(),
        });
        match action {
            ErrorAction::Report => {
                drop(s);
                self.end_steps(Ended::Failed(e.to_string()));
            }
            ErrorAction::Stop => {
                // Paused as by `block-job-pause`: `block-job-resume` retries the step.
                s.user_paused = true;
                if s.io_status == IoStatus::Ok {
                    s.io_status = if errno == libc::ENOSPC {
                        IoStatus::NoSpace
                    } else {
                        IoStatus::Failed
                    };
                }
                self.enter_pause(&mut s);
            }
            ErrorAction::Ignore => {
                if self.kind == JobKind::Stream {
                    // Past the chunk; the job fails at its end with the first such error.
                    s.offset = (s.offset + len).min(s.len);
                    s.ignored.get_or_insert_with(|| e.to_string());
                }
                // A commit retries the chunk (an active one finds it dirty again).
                let after = if self.kind == JobKind::Stream {
                    Duration::ZERO
                } else {
                    IDLE
                };
                self.arm(&mut s, after);
            }
        }
    }

    /// Records how the steps ended and hands the job to the main loop: its next status event
    /// wakes the monitor, which finalizes it.
    fn end_steps(&self, how: Ended) {
        let mut s = self.state();
        if s.ended.is_some() {
            return;
        }
        let next = match how {
            Ended::Done => JobStatus::Waiting,
            Ended::Cancelled | Ended::Failed(_) => JobStatus::Aborting,
        };
        s.ended = Some(how);
        if let Some(me) = self.me.upgrade() {
            lock(&self.ended).push(me);
        }
        self.transition(&mut s, next);
    }

    /// Finalizes a job whose steps ended (main thread, global lock held): the chain change on
    /// success, then the end events, as QEMU's `job_completed` and `job_finalize_single`. A
    /// job that succeeded without `auto-finalize` stops in `pending` (`BLOCK_JOB_PENDING`)
    /// until `job-finalize` calls this again. Returns whether the job is gone (`null`).
    fn finalize(&self, mut disk: Option<&mut VmDisk>) -> bool {
        let (how, switch) = {
            let s = self.state();
            (s.ended.clone(), s.completing != Some(false))
        };
        let mut outcome = how.unwrap_or(Ended::Failed("Job ended without a result".into()));
        if outcome == Ended::Done {
            let mut s = self.state();
            if s.status != JobStatus::Pending {
                self.transition(&mut s, JobStatus::Pending);
                if !s.end.finalize {
                    self.events.send(QmpEvent::BlockJobPending {
                        kind: self.kind.name(),
                        id: self.id.clone(),
                    });
                    return false;
                }
            }
            drop(s);
            let finished = match disk.as_deref_mut() {
                // A mirror cancelled while ready completes leaving the disk as it is.
                Some(_) if !switch => Ok(()),
                Some(disk) => lock(&self.work).finish(disk),
                None => Err(format!("Drive '{}' is gone", self.drive)),
            };
            if let Err(e) = finished {
                let mut s = self.state();
                self.transition(&mut s, JobStatus::Aborting);
                outcome = Ended::Failed(e);
            }
        }
        lock(&self.work).release(disk);
        self.join();
        let mut s = self.state();
        if outcome != Ended::Done && s.status != JobStatus::Aborting {
            // Cancelled while pending.
            self.transition(&mut s, JobStatus::Aborting);
        }
        let data = self.event_data(&s);
        s.error = match &outcome {
            Ended::Done => None,
            Ended::Failed(e) => Some(e.clone()),
            Ended::Cancelled => Some("Operation canceled".to_owned()),
        };
        self.events.send(match outcome {
            Ended::Done => QmpEvent::BlockJobCompleted { data, error: None },
            Ended::Failed(e) => QmpEvent::BlockJobCompleted {
                data,
                error: Some(e),
            },
            Ended::Cancelled => QmpEvent::BlockJobCancelled(data),
        });
        self.transition(&mut s, JobStatus::Concluded);
        if !s.end.dismiss {
            return false;
        }
        self.transition(&mut s, JobStatus::Null);
        true
    }

    /// Waits for the job's thread to end: at once once its steps ended; after the step it may be
    /// running when it was told to quit.
    fn join(&self) {
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                log::error!("job {}: its thread panicked", self.id);
            }
        }
    }

    /// What `query-block-jobs` says of it.
    fn info(&self) -> BlockJobInfo {
        let s = self.state();
        BlockJobInfo {
            kind: self.kind.name(),
            device: self.id.clone(),
            len: s.len,
            offset: s.offset,
            busy: s.busy,
            paused: s.user_paused,
            speed: s.speed,
            io_status: s.io_status.name(),
            ready: matches!(s.status, JobStatus::Ready | JobStatus::Standby),
            status: s.status.name(),
            auto_finalize: s.end.finalize,
            auto_dismiss: s.end.dismiss,
            error: s.error.clone(),
        }
    }

    fn check_verb(&self, s: &State, verb: Verb) -> Result<(), JobError> {
        if s.status.accepts(verb) {
            Ok(())
        } else {
            Err(JobError::Verb {
                id: self.id.clone(),
                status: s.status.name(),
                verb: verb.name(),
            })
        }
    }
}

/// What a job starts with.
#[derive(Debug)]
struct NewJob {
    /// Its id.
    id: String,
    kind: JobKind,
    /// The disk's drive id.
    drive: String,
    /// Its total work, bytes.
    len: u64,
    /// Its speed limit, bytes per second (0: none), as asked.
    speed: i64,
    /// A mirror (ends when asked to, once ready).
    mirror: bool,
    /// Finalizes and dismisses itself, or not.
    end: JobEnd,
}

/// The VM's jobs, kept by the monitor's handler on the main thread.
#[derive(Debug)]
pub struct Jobs {
    events: EventSender,
    jobs: Vec<Arc<Job>>,
    ended: Arc<Mutex<Vec<Arc<Job>>>>,
}

impl Drop for Jobs {
    /// The jobs' threads stop after the step they may be running (the VM is going).
    fn drop(&mut self) {
        for job in &self.jobs {
            let mut s = job.state();
            s.quit = true;
            job.wake.notify_one();
        }
        for job in &self.jobs {
            job.join();
        }
    }
}

/// QEMU's rule for ids (`id_wellformed`): a letter, then letters, digits, '-', '.' and '_'.
fn well_formed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Jobs {
    /// No jobs; their events go to `events`.
    pub fn new(events: EventSender) -> Self {
        Self {
            events,
            jobs: Vec::new(),
            ended: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn find(&self, id: &str) -> Result<&Arc<Job>, JobError> {
        self.jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or_else(|| JobError::NotFound(id.to_owned()))
    }

    /// Refuses a second job, or a snapshot, on a disk that has a job.
    pub fn check_idle(&self, drive: &str) -> Result<(), JobError> {
        match self.jobs.iter().find(|j| j.drive == drive) {
            Some(job) => Err(JobError::Busy {
                drive: drive.to_owned(),
                kind: job.kind.name(),
            }),
            None => Ok(()),
        }
    }

    /// Whether `drive` has an active commit (QEMU puts a filter node above its top meanwhile).
    pub fn mirrors(&self, drive: &str) -> bool {
        self.jobs
            .iter()
            .any(|j| j.drive == drive && j.state().mirror)
    }

    /// Creates and starts a job on `drive`, with a thread of its own (events `created` and
    /// `running`); its first
    /// step runs at once.
    fn start(&mut self, new: NewJob, work: Box<dyn Work>) -> Result<(), JobError> {
        let NewJob {
            id,
            kind,
            drive,
            len,
            speed,
            mirror,
            end,
        } = new;
        if !well_formed(&id) {
            return Err(JobError::InvalidId(id));
        }
        if self.jobs.iter().any(|j| j.id == id) {
            return Err(JobError::IdInUse(id));
        }
        self.check_idle(&drive)?;
        let mut limit = RateLimit::new(Instant::now());
        let speed_ok = u64::try_from(speed);
        let speed = speed_ok.unwrap_or(0);
        limit.set_speed(speed);
        let job = Arc::new_cyclic(|me| Job {
            id,
            kind,
            drive,
            events: self.events.clone(),
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                len,
                offset: 0,
                speed,
                limit,
                user_paused: false,
                cancelled: false,
                busy: false,
                mirror,
                remaining: None,
                completing: None,
                end,
                error: None,
                ended: None,
                io_status: IoStatus::Ok,
                ignored: None,
                next: None,
                quit: false,
            }),
            work: Mutex::new(work),
            wake: Condvar::new(),
            thread: Mutex::new(None),
            ended: Arc::clone(&self.ended),
            me: me.clone(),
        });
        if speed_ok.is_err() {
            // As QEMU: the job is created, then refused its speed, and goes.
            let mut s = job.state();
            job.transition(&mut s, JobStatus::Created);
            job.transition(&mut s, JobStatus::Null);
            return Err(JobError::NegativeSpeed);
        }
        let runner = Arc::clone(&job);
        let thread = std::thread::Builder::new()
            .name(format!("{}-job", job.drive))
            .stack_size(block::THREAD_STACK)
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::Kind::Worker);
                runner.steps();
            })
            .map_err(|e| JobError::Other(format!("Cannot start the job's thread: {e}")))?;
        *lock(&job.thread) = Some(thread);
        {
            let mut s = job.state();
            job.transition(&mut s, JobStatus::Created);
            job.transition(&mut s, JobStatus::Running);
            job.arm(&mut s, Duration::ZERO);
        }
        self.jobs.push(job);
        Ok(())
    }

    /// `query-block-jobs`.
    pub fn info(&self) -> Vec<BlockJobInfo> {
        self.jobs.iter().map(|j| j.info()).collect()
    }

    /// `block-job-cancel`: the job stops at its next step boundary; a ready mirror without
    /// `force` completes instead, once in sync, leaving the disk as it is (as QEMU's).
    pub fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        let job = self.find(id)?;
        let mut s = job.state();
        job.check_verb(&s, Verb::Cancel)?;
        if s.user_paused && !force {
            return Err(JobError::CancelPaused(id.to_owned()));
        }
        let ready = matches!(s.status, JobStatus::Ready | JobStatus::Standby);
        if s.status == JobStatus::Pending {
            // Waiting for `job-finalize`: it is aborted instead, on the main loop at once.
            s.ended = Some(Ended::Cancelled);
            drop(s);
            lock(&self.ended).push(Arc::clone(job));
            return Ok(());
        }
        if s.mirror && ready && !force {
            s.completing = Some(false);
        } else {
            s.cancelled = true;
        }
        s.user_paused = false;
        match s.status {
            // As QEMU: a paused job is resumed to be cancelled.
            JobStatus::Paused => job.transition(&mut s, JobStatus::Running),
            JobStatus::Standby => job.transition(&mut s, JobStatus::Ready),
            _ => {}
        }
        job.arm(&mut s, Duration::ZERO);
        Ok(())
    }

    /// `block-job-pause`: the job pauses at once between steps, else when its step ends.
    pub fn pause(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        let mut s = job.state();
        job.check_verb(&s, Verb::Pause)?;
        if s.user_paused {
            return Err(JobError::AlreadyPaused);
        }
        s.user_paused = true;
        if s.busy {
            // In a step: it pauses when the step ends.
            job.arm(&mut s, Duration::ZERO);
        } else {
            // Between steps (sleeping for its speed limit, or a mirror looking for dirty data):
            // it pauses now, as QEMU wakes it to pause.
            job.enter_pause(&mut s);
        }
        Ok(())
    }

    /// `block-job-resume`.
    pub fn resume(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        let mut s = job.state();
        job.check_verb(&s, Verb::Resume)?;
        if !s.user_paused {
            return Err(JobError::NotPaused);
        }
        s.user_paused = false;
        s.io_status = IoStatus::Ok;
        match s.status {
            JobStatus::Paused => job.transition(&mut s, JobStatus::Running),
            JobStatus::Standby => job.transition(&mut s, JobStatus::Ready),
            _ => {}
        }
        job.arm(&mut s, Duration::ZERO);
        Ok(())
    }

    /// `block-job-set-speed`: applies from the next step.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        let job = self.find(id)?;
        let mut s = job.state();
        job.check_verb(&s, Verb::SetSpeed)?;
        let speed = u64::try_from(speed).map_err(|_| JobError::NegativeSpeed)?;
        s.speed = speed;
        s.limit.set_speed(speed);
        if matches!(s.status, JobStatus::Running | JobStatus::Ready) && !s.user_paused {
            // A job sleeping under the old limit wakes to sleep under the new one.
            job.arm(&mut s, Duration::ZERO);
        }
        Ok(())
    }

    /// `block-job-complete`: only a ready job (a mirror) accepts it; it ends once in sync,
    /// switching the disk.
    pub fn complete(&self, id: &str) -> Result<(), JobError> {
        let job = self.find(id)?;
        let mut s = job.state();
        job.check_verb(&s, Verb::Complete)?;
        s.completing = Some(true);
        job.arm(&mut s, Duration::ZERO);
        Ok(())
    }

    /// Finalizes the jobs whose steps ended (main thread, global lock held) and forgets those
    /// that are gone.
    pub fn finalize_waiting(&mut self, disks: &mut [VmDisk]) {
        let ended: Vec<_> = std::mem::take(&mut *lock(&self.ended));
        for job in ended {
            self.finalize_one(&job, disks);
        }
    }

    fn finalize_one(&mut self, job: &Arc<Job>, disks: &mut [VmDisk]) {
        let disk = disks.iter_mut().find(|d| d.info.drive_id == job.drive);
        if job.finalize(disk) {
            self.jobs.retain(|j| !Arc::ptr_eq(j, job));
        }
    }

    /// `job-finalize`: a job waiting in `pending` changes the chain and ends (main thread,
    /// global lock held).
    pub fn finalize(&mut self, id: &str, disks: &mut [VmDisk]) -> Result<(), JobError> {
        let job = Arc::clone(self.find(id)?);
        job.check_verb(&job.state(), Verb::Finalize)?;
        self.finalize_one(&job, disks);
        Ok(())
    }

    /// `job-dismiss`: a `concluded` job goes.
    pub fn dismiss(&mut self, id: &str) -> Result<(), JobError> {
        let job = Arc::clone(self.find(id)?);
        let mut s = job.state();
        job.check_verb(&s, Verb::Dismiss)?;
        job.transition(&mut s, JobStatus::Null);
        drop(s);
        self.jobs.retain(|j| !Arc::ptr_eq(j, &job));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_table_is_qemus() {
        use JobStatus::*;
        // The paths a stream takes: to its end, cancelled, paused and resumed.
        for path in [
            &[
                Undefined, Created, Running, Waiting, Pending, Concluded, Null,
            ][..],
            &[Running, Aborting, Concluded, Null],
            &[Running, Paused, Running],
            &[Created, Null],
            &[Pending, Aborting],
        ] {
            for pair in path.windows(2) {
                assert!(pair[0].may_become(pair[1]), "{pair:?}");
            }
        }
        for (from, to) in [
            (Paused, Aborting),
            (Running, Pending),
            (Null, Created),
            (Concluded, Running),
            (Waiting, Running),
        ] {
            assert!(!from.may_become(to), "{from:?} -> {to:?}");
        }
        assert!(Ready.accepts(Verb::Complete) && !Running.accepts(Verb::Complete));
        assert!(Paused.accepts(Verb::Cancel) && !Aborting.accepts(Verb::Cancel));
        assert!(!Pending.accepts(Verb::SetSpeed) && Standby.accepts(Verb::Resume));
        assert!(Pending.accepts(Verb::Finalize) && !Concluded.accepts(Verb::Finalize));
        assert!(Concluded.accepts(Verb::Dismiss) && !Pending.accepts(Verb::Dismiss));
        assert!(Pending.accepts(Verb::Cancel) && Pending.may_become(Aborting));
        let names: Vec<_> = STATUSES.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ]
        );
    }

    #[test]
    fn job_ids_follow_qemus_rule() {
        for ok in ["j", "job-1", "a.b_c"] {
            assert!(well_formed(ok), "{ok}");
        }
        for bad in ["", "1x", "-a", "a b", "#block0"] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    /// A job's work whose first `fails` steps fail with `error`, and whose next step ends the
    /// copy: the job machinery's answer to failing steps, whatever the work.
    #[derive(Debug)]
    struct Failing {
        error: StepError,
        fails: usize,
    }

    impl Work for Failing {
        fn step(&mut self, _offset: u64) -> Result<Step, StepError> {
            if self.fails == 0 {
                return Ok(Step {
                    advanced: LEN,
                    copied: 0,
                    remaining: None,
                });
            }
            self.fails -= 1;
            Err(self.error.clone())
        }

        fn finish(&mut self, _disk: &mut VmDisk) -> Result<(), String> {
            Ok(())
        }

        fn release(&mut self, _disk: Option<&mut VmDisk>) {}
    }

    const LEN: u64 = 1 << 20;

    fn io_error(read: bool, errno: i32) -> StepError {
        StepError::Io {
            read,
            errno,
            len: 4096,
            message: format!("errno {errno}"),
        }
    }

    /// The events of a job `kind` with `on_error` on an iothread whose first `fails` steps
    /// fail with `error`, until the job is gone or, its copy done, waits for `job-finalize`
    /// (there is no disk to change); each a status (`JOB_STATUS_CHANGE`) or `[event, data]`;
    /// `on_event` is called on each with the jobs.
    #[allow(clippy::unwrap_used)] // A test: a failure to set up is the test's failure.
    fn failing_job(
        kind: JobKind,
        on_error: ErrorPolicy,
        error: StepError,
        fails: usize,
        mut on_event: impl FnMut(&Jobs, &serde_json::Value),
    ) -> Vec<serde_json::Value> {
        let (events, received) = crate::monitor::event_channel().unwrap();
        let mut jobs = Jobs::new(events);
        let new = NewJob {
            id: "j0".into(),
            kind,
            drive: "d0".into(),
            len: LEN,
            speed: 0,
            mirror: false,
            end: JobEnd {
                finalize: false,
                dismiss: true,
                on_error,
            },
        };
        jobs.start(new, Box::new(Failing { error, fails })).unwrap();
        let mut seen: Vec<serde_json::Value> = Vec::new();
        let until = Instant::now() + Duration::from_secs(10);
        let over = |e: &serde_json::Value| e == "null" || e[0] == "BLOCK_JOB_PENDING";
        while !seen.iter().any(over) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            for e in received.drain() {
                let e = match e["data"]["status"].as_str() {
                    Some(status) => serde_json::json!(status),
                    None => serde_json::json!([e["event"], e["data"]]),
                };
                on_event(&jobs, &e);
                seen.push(e);
            }
            jobs.finalize_waiting(&mut []);
        }
        seen
    }

    fn job_error(operation: &str, action: &str) -> serde_json::Value {
        serde_json::json!(["BLOCK_JOB_ERROR",
            {"device": "j0", "operation": operation, "action": action}])
    }

    /// The job's end after an error: `BLOCK_JOB_COMPLETED` with `error`, at `offset`.
    fn failed(kind: &str, offset: u64, error: &str) -> Vec<serde_json::Value> {
        let data = serde_json::json!({"type": kind, "device": "j0", "len": LEN,
            "offset": offset, "speed": 0, "error": error});
        let mut events = statuses(&["aborting"]);
        events.push(serde_json::json!(["BLOCK_JOB_COMPLETED", data]));
        events.extend(statuses(&["concluded", "null"]));
        events
    }

    /// A commit's copy done: it waits to be finalized.
    fn copied() -> Vec<serde_json::Value> {
        let mut events = statuses(&["waiting", "pending"]);
        events.push(serde_json::json!(["BLOCK_JOB_PENDING", {"type": "commit", "id": "j0"}]));
        events
    }

    fn statuses(names: &[&str]) -> Vec<serde_json::Value> {
        names.iter().map(|n| serde_json::json!(n)).collect()
    }

    /// A job's work whose step tells `entered` it has started, then holds until `release`
    /// says so (or 30 s have passed): a step's I/O that takes long.
    #[derive(Debug)]
    struct Held {
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Work for Held {
        fn step(&mut self, _offset: u64) -> Result<Step, StepError> {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(30));
            Ok(Step {
                advanced: LEN,
                copied: LEN,
                remaining: None,
            })
        }

        fn finish(&mut self, _disk: &mut VmDisk) -> Result<(), String> {
            Ok(())
        }

        fn release(&mut self, _disk: Option<&mut VmDisk>) {}
    }

    /// While a job's step is held in its I/O, a guest read of the job's disk (on an iothread)
    /// completes: the step does not run in the disk's context.
    #[test]
    #[allow(clippy::unwrap_used)] // A test: a failure to set up is the test's failure.
    fn a_guest_read_completes_while_a_step_of_a_job_on_its_disk_is_held() {
        use devices::virtio::block::test_util::{BUF, F_WRITE, HDR, STATUS};
        use devices::virtio::block::{request_type, status};
        use testing::{run, Guest, Scratch};
        use vm_memory::{Bytes, GuestAddress};

        let dir = Scratch::new("held-step");
        let top = dir.path("top.qcow2");
        let top_s = top.to_str().unwrap();
        run("qemu-img", &["create", "-q", "-f", "qcow2", top_s, "8M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 5 0 4k", top_s]);
        let mut guest = Guest::new(&top, 1);
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let new = NewJob {
            id: "j0".into(),
            kind: JobKind::Stream,
            drive: "d0".into(),
            len: LEN,
            speed: 0,
            mirror: false,
            end: JobEnd::default(),
        };
        let held = Held {
            entered: entered_tx,
            release: release_rx,
        };
        guest.jobs.start(new, Box::new(held)).unwrap();
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the step starts");
        guest
            .rig
            .mem
            .write_obj(0xffu8, GuestAddress(STATUS))
            .unwrap();
        guest.rig.header(HDR, request_type::IN, 0);
        guest.rig.submit(
            0,
            0,
            &[(HDR, 16, 0), (BUF, 4096, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        // Gives up (a panic) after 10 s: the step holds for 30.
        guest.rig.wait_used(0, 1);
        assert_eq!(guest.rig.byte(STATUS), status::OK);
        assert_eq!(guest.rig.byte(BUF + 4095), 5);
        release.send(()).unwrap();
        let seen = guest.run_job(|_, _| {});
        assert_eq!(
            testing::names(&seen),
            [
                "created",
                "running",
                "waiting",
                "pending",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null"
            ]
        );
        guest.stop(std::thread::spawn(|| {}));
    }

    #[test]
    fn on_error_report_raises_block_job_error_then_ends_the_job() {
        for (read, operation) in [(true, "read"), (false, "write")] {
            let events = failing_job(
                JobKind::Commit,
                ErrorPolicy::Report,
                io_error(read, libc::EIO),
                1,
                |_, _| {},
            );
            let mut want = statuses(&["created", "running"]);
            want.push(job_error(operation, "report"));
            want.extend(failed("commit", 0, "errno 5"));
            assert_eq!(events, want);
        }
    }

    #[test]
    fn a_step_failing_outside_its_io_ends_the_job_without_block_job_error() {
        let events = failing_job(
            JobKind::Commit,
            ErrorPolicy::Stop,
            StepError::ended(),
            1,
            |_, _| {},
        );
        let mut want = statuses(&["created", "running"]);
        want.extend(failed("commit", 0, "The job has ended"));
        assert_eq!(events, want);
    }

    /// A job stopped by `on-error`: paused with `io-status` `want`; resumed, it retries and
    /// completes.
    fn stops_until_resumed(on_error: ErrorPolicy, errno: i32, want: &str) {
        let mut seen_paused = None;
        let events = failing_job(
            JobKind::Commit,
            on_error,
            io_error(false, errno),
            1,
            |jobs, e| {
                if e == "paused" {
                    let info = &jobs.info()[0];
                    seen_paused = Some((info.paused, info.io_status, info.status));
                    jobs.resume("j0").expect("a stopped job resumes");
                    assert_eq!(jobs.info()[0].io_status, "ok");
                }
            },
        );
        assert_eq!(seen_paused, Some((true, want, "paused")));
        let mut want = statuses(&["created", "running"]);
        want.push(job_error("write", "stop"));
        want.extend(statuses(&["paused", "running"]));
        want.extend(copied());
        assert_eq!(events, want);
    }

    #[test]
    fn on_error_stop_pauses_the_job_with_its_io_status_until_resumed() {
        stops_until_resumed(ErrorPolicy::Stop, libc::EIO, "failed");
        stops_until_resumed(ErrorPolicy::Stop, libc::ENOSPC, "nospace");
    }

    #[test]
    fn on_error_enospc_stops_on_enospc_and_reports_the_rest() {
        stops_until_resumed(ErrorPolicy::Enospc, libc::ENOSPC, "nospace");
        let events = failing_job(
            JobKind::Commit,
            ErrorPolicy::Enospc,
            io_error(false, libc::EIO),
            1,
            |_, _| {},
        );
        assert_eq!(events[2], job_error("write", "report"));
        assert_eq!(events[3], "aborting");
    }

    #[test]
    fn on_error_ignore_retries_a_commit_s_chunk() {
        let events = failing_job(
            JobKind::Commit,
            ErrorPolicy::Ignore,
            io_error(true, libc::EIO),
            2,
            |_, _| {},
        );
        let mut want = statuses(&["created", "running"]);
        want.push(job_error("read", "ignore"));
        want.push(job_error("read", "ignore"));
        want.extend(copied());
        assert_eq!(events, want);
    }

    #[test]
    fn on_error_ignore_skips_a_stream_s_chunk_and_fails_at_its_end() {
        let events = failing_job(
            JobKind::Stream,
            ErrorPolicy::Ignore,
            io_error(true, libc::EIO),
            1,
            |_, _| {},
        );
        let mut want = statuses(&["created", "running"]);
        want.push(job_error("read", "ignore"));
        want.extend(failed("stream", LEN, "errno 5"));
        assert_eq!(events, want);
    }
}
