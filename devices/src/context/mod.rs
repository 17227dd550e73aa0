//! The context that the main loop and every iothread run, after QEMU's `AioContext`: an event
//! loop over epoll, a nestable acquire/release lock and bottom halves (one-shot scheduled work).
//!
//! One iteration of the loop ([`Context::run_once`]) waits in `epoll_wait` holding nothing, then
//! takes the context (inside the optional dispatch hook, which can take an outer lock first; the
//! vmm instead calls `run_once` for its main-loop context from a main-loop handler that already
//! holds the global lock), runs the handler of every ready file descriptor and every pending
//! bottom half, and lets go. So a context is held only while short, non-blocking work runs; a
//! thread that acquires it from outside (a vCPU writing a device's configuration, activating or
//! resetting it; the main thread shutting disks down) waits at most for the iteration in
//! progress: the loop hands the lock over to waiting threads before starting another (see
//! `lock.rs`). A device's drain on reset or shutdown releases the context while it waits
//! ([`Context::unlocked`]). The loop never holds its context while blocked in
//! `epoll_wait`, so an outside acquirer never has to wake it; a bottom half or [`Context::notify`]
//! does, through the context's eventfd. An iothread's loop polls its descriptors for a while
//! before it blocks (`poll.rs`), holding nothing either.
//!
//! Why epoll through vmm-sys-util rather than event-manager: event-manager's `run` waits and
//! dispatches in one call and owns its subscribers (`&mut self`), so the loop could not release
//! the context while waiting, and the devices it runs could not also be reached from vCPUs. Here a
//! handler is an `Arc`'d closure looked up under a short table lock; tokens carry a generation so
//! an event that raced with a removal is dropped, never delivered to a newcomer in the same slot.

mod bh;
mod iothread;
mod lock;
mod poll;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::{fmt, io};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use iothread::{set_iothread_start, IoThread, IoThreadHandle, OnFailure};
pub use lock::{
    debug_assert_may_take_global_lock, global_lock_held, in_iothread, set_global_lock_held,
};
pub use poll::{PollSetting, PollSettings};

use bh::BhQueue;
use lock::NestLock;
use poll::{PollWindow, SharedSettings};

/// Errors of the context module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `epoll_create1` failed.
    #[error("cannot create the epoll instance of context {0}")]
    EpollCreate(String, #[source] io::Error),
    /// Creating the context's wake-up eventfd failed.
    #[error("cannot create the wake-up eventfd of context {0}")]
    WakeEventFd(String, #[source] io::Error),
    /// `EPOLL_CTL_ADD` failed.
    #[error("cannot add fd {fd} to context {name}")]
    AddFd {
        /// The context.
        name: String,
        /// The file descriptor.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `EPOLL_CTL_DEL` failed.
    #[error("cannot remove fd {fd} from context {name}")]
    RemoveFd {
        /// The context.
        name: String,
        /// The file descriptor.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The handler id is not (or no longer) registered.
    #[error("no handler {0:?} in context {1}")]
    UnknownHandler(HandlerId, String),
    /// `epoll_wait` failed.
    #[error("waiting for events in context {0} failed")]
    Wait(String, #[source] io::Error),
    /// Spawning an iothread failed.
    #[error("cannot spawn iothread {0}")]
    Spawn(String, #[source] io::Error),
    /// An iothread's loop stopped on an error.
    #[error("iothread {0} stopped on an error")]
    IoThreadFailed(String, #[source] Box<Error>),
    /// An iothread panicked.
    #[error("iothread {0} panicked")]
    IoThreadPanicked(String),
}

/// A handler for a ready file descriptor, run in the context's thread with the context held.
pub type Handler = Arc<dyn Fn(&Context, EventSet) + Send + Sync>;

/// Whether the source behind a registered descriptor has work without the descriptor being
/// signalled (a virtqueue with requests the driver made available without notifying): what a
/// polling loop asks, without holding the context ([`Context::add_polled_fd`]).
pub type PollReady = Arc<dyn Fn() -> bool + Send + Sync>;

/// Runs one dispatch (the closure) in whatever surroundings the owner of a loop needs: the vmm's
/// main loop takes the global lock around it.
pub type DispatchHook = Box<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

/// Identifies a registered file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerId(u64);

/// The epoll token of the context's own eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// Events taken from epoll per iteration.
const MAX_EVENTS: usize = 32;

/// Contexts get distinct non-zero ids.
static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where a polling loop stands: the window of the context's own wake-up (bottom halves; each
/// registered descriptor has its own, in its entry), and the settings' generation they were
/// adapted under; and the buffers its iterations reuse, so that polling allocates nothing per
/// iteration once they have grown.
#[derive(Default)]
pub(crate) struct PollState {
    window: PollWindow,
    generation: u64,
    /// The polled handlers' tokens and readiness checks, for one iteration (emptied after it).
    sources: Vec<(u64, PollReady)>,
    /// Room for as many events as epoll gives and one from every polled source.
    events: Vec<EpollEvent>,
}

impl std::fmt::Debug for PollState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollState")
            .field("window", &self.window)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A registered file descriptor.
struct Entry {
    generation: u32,
    fd: RawFd,
    handler: Handler,
    /// Whether its source has work unsignalled, for a polling loop.
    ready: Option<PollReady>,
    /// How long a polling loop polls for this descriptor's events (`poll.rs`).
    window: PollWindow,
}

/// Handlers by slot, with a generation per slot.
#[derive(Default)]
struct HandlerTable {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    next_generation: u32,
}

impl HandlerTable {
    fn token(slot: usize, generation: u32) -> u64 {
        (u64::from(generation) << 32) | u64::try_from(slot).unwrap_or(u64::MAX)
    }

    fn split(token: u64) -> (usize, u32) {
        let slot = usize::try_from(token & 0xffff_ffff).unwrap_or(usize::MAX);
        let generation = u32::try_from(token >> 32).unwrap_or(u32::MAX);
        (slot, generation)
    }

    /// The token and readiness check of every polled handler ([`Context::add_polled_fd`]).
    fn polled(&self) -> impl Iterator<Item = (u64, &PollReady)> {
        self.slots.iter().enumerate().filter_map(|(slot, entry)| {
            let entry = entry.as_ref()?;
            Some((Self::token(slot, entry.generation), entry.ready.as_ref()?))
        })
    }

    fn get(&self, token: u64) -> Option<&Entry> {
        let (slot, generation) = Self::split(token);
        self.slots
            .get(slot)?
            .as_ref()
            .filter(|e| e.generation == generation)
    }

    fn get_mut(&mut self, token: u64) -> Option<&mut Entry> {
        let (slot, generation) = Self::split(token);
        self.slots
            .get_mut(slot)?
            .as_mut()
            .filter(|e| e.generation == generation)
    }
}

/// A context: see the module documentation.
pub struct Context {
    id: u64,
    name: String,
    epoll: Epoll,
    wake: EventFd,
    lock: NestLock,
    handlers: Mutex<HandlerTable>,
    bottom_halves: BhQueue,
    hook: Option<DispatchHook>,
    /// Poll mode: set while an iothread's loop polls and stays in poll mode, cleared before it
    /// blocks (see [`Context::polling`]).
    poll_mode: AtomicBool,
    /// The iothread's `aio-max-batch` (0 on the main loop's), see [`Context::aio_max_batch`].
    aio_max_batch: AtomicU64,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One level of a held context; dropping it releases that level.
#[derive(Debug)]
#[must_use = "the context is released when the guard is dropped"]
pub struct ContextGuard<'a> {
    ctx: &'a Context,
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        self.ctx.lock.release();
    }
}

/// `contexts` in the one order a thread may hold several of them (creation order: the main
/// loop's, then the iothreads' as `-object` lists them), each once. Two devices whose iothreads
/// overlap take them in the same order, so neither waits for a context the other holds while it
/// waits for one of its own.
pub fn in_lock_order(contexts: impl IntoIterator<Item = Arc<Context>>) -> Vec<Arc<Context>> {
    let mut contexts: Vec<_> = contexts.into_iter().collect();
    contexts.sort_by_key(|c| c.id);
    contexts.dedup_by_key(|c| c.id);
    contexts
}

impl Context {
    /// A context named `name` (an iothread id, or "main-loop").
    pub fn new(name: &str) -> Result<Arc<Self>, Error> {
        Self::build(name, None)
    }

    /// A context whose every dispatch runs inside `hook` (the main loop's takes the global lock).
    pub fn with_dispatch_hook(name: &str, hook: DispatchHook) -> Result<Arc<Self>, Error> {
        Self::build(name, Some(hook))
    }

    fn build(name: &str, hook: Option<DispatchHook>) -> Result<Arc<Self>, Error> {
        let epoll = Epoll::new().map_err(|e| Error::EpollCreate(name.to_owned(), e))?;
        let wake =
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::WakeEventFd(name.to_owned(), e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE_TOKEN),
            )
            .map_err(|source| Error::AddFd {
                name: name.to_owned(),
                fd: wake.as_raw_fd(),
                source,
            })?;
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Context {
            id,
            name: name.to_owned(),
            epoll,
            wake,
            lock: NestLock::new(id),
            handlers: Mutex::new(HandlerTable::default()),
            bottom_halves: BhQueue::new(),
            hook,
            poll_mode: AtomicBool::new(false),
            aio_max_batch: AtomicU64::new(0),
        }))
    }

    /// The context's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn table(&self) -> MutexGuard<'_, HandlerTable> {
        // The table is only modified by short, non-panicking code.
        self.handlers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Acquires one level of the context: blocks while another thread holds it, nests when the
    /// current thread does. Must not be called while holding another context, except one
    /// created earlier ([`Context::acquire_all`]).
    pub fn acquire(&self) -> ContextGuard<'_> {
        self.lock.acquire();
        ContextGuard { ctx: self }
    }

    /// Whether the current thread holds the context.
    pub fn held_by_current_thread(&self) -> bool {
        self.lock.held_by_current_thread()
    }

    /// Runs `f` with every level of the context that the current thread holds released, and
    /// acquires them all again afterwards: how a reset or shutdown waits for in-flight requests
    /// without blocking the context's loop (docs/DESIGN.md, "Draining").
    pub fn unlocked<R>(&self, f: impl FnOnce() -> R) -> R {
        let depth = self.lock.release_all();
        let result = f();
        self.lock.reacquire(depth);
        result
    }

    /// Runs `f` with every level of each of `contexts` (in lock order, [`in_lock_order`]) that
    /// the current thread holds released, then acquires them again in that order: how a device
    /// served by several iothreads waits for its requests without blocking their loops.
    pub fn unlocked_all<R>(contexts: &[Arc<Context>], f: impl FnOnce() -> R) -> R {
        let depths: Vec<u32> = contexts.iter().map(|c| c.lock.release_all()).collect();
        let result = f();
        for (ctx, depth) in contexts.iter().zip(depths) {
            ctx.lock.reacquire(depth);
        }
        result
    }

    /// Acquires one level of each of `contexts`, which must be in lock order ([`in_lock_order`]):
    /// the transport of a device served by several iothreads, a drain or a resize of its disk.
    pub fn acquire_all(contexts: &[Arc<Context>]) -> Vec<ContextGuard<'_>> {
        debug_assert!(
            contexts.windows(2).all(|w| w[0].id < w[1].id),
            "contexts acquired out of lock order"
        );
        contexts.iter().map(|c| c.acquire()).collect()
    }

    /// Watches `fd` for `events`; `handler` runs in the context's thread, with the context held,
    /// each time they occur (level-triggered unless `events` says otherwise).
    pub fn add_fd(
        &self,
        fd: RawFd,
        events: EventSet,
        handler: Handler,
    ) -> Result<HandlerId, Error> {
        self.add_entry(fd, events, handler, None)
    }

    /// As [`Context::add_fd`], for a source an iothread's loop also polls, as QEMU's
    /// `io_poll`: while it polls, the loop runs `handler` whenever `ready` says the source has
    /// work, signalled or not. A handler may then leave its source's notifications off for as
    /// long as [`Context::polling`] says so: before it blocks, the loop leaves poll mode and runs
    /// every such handler once more, so that each turns its notifications back on and takes
    /// what came meanwhile.
    pub fn add_polled_fd(
        &self,
        fd: RawFd,
        events: EventSet,
        handler: Handler,
        ready: PollReady,
    ) -> Result<HandlerId, Error> {
        self.add_entry(fd, events, handler, Some(ready))
    }

    fn add_entry(
        &self,
        fd: RawFd,
        events: EventSet,
        handler: Handler,
        ready: Option<PollReady>,
    ) -> Result<HandlerId, Error> {
        let mut table = self.table();
        let generation = table.next_generation;
        table.next_generation = table.next_generation.wrapping_add(1);
        let slot = match table.free.pop() {
            Some(slot) => slot,
            None => {
                table.slots.push(None);
                table.slots.len() - 1
            }
        };
        let token = HandlerTable::token(slot, generation);
        if let Err(source) =
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        {
            table.free.push(slot);
            return Err(Error::AddFd {
                name: self.name.clone(),
                fd,
                source,
            });
        }
        table.slots[slot] = Some(Entry {
            generation,
            fd,
            handler,
            ready,
            window: PollWindow::default(),
        });
        Ok(HandlerId(token))
    }

    /// Stops watching a file descriptor. Once this returns (with the context held by the caller,
    /// or from a handler) the handler never runs again.
    pub fn remove_fd(&self, id: HandlerId) -> Result<(), Error> {
        let mut table = self.table();
        let fd = table
            .get(id.0)
            .map(|e| e.fd)
            .ok_or_else(|| Error::UnknownHandler(id, self.name.clone()))?;
        let (slot, _) = HandlerTable::split(id.0);
        table.slots[slot] = None;
        table.free.push(slot);
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .map_err(|source| Error::RemoveFd {
                name: self.name.clone(),
                fd,
                source,
            })
    }

    /// The context's epoll descriptor: readable whenever one of its handlers or bottom halves has
    /// work. An outer loop (the vmm's event-manager main loop) can watch it and call
    /// `run_once(Some(Duration::ZERO))` when it fires, instead of running this loop itself.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Wakes the loop's thread (for a stop request, say). Takes no lock.
    pub fn notify(&self) {
        // An eventfd write only fails when the counter would overflow, which still leaves it
        // readable: the loop wakes either way.
        let _ = self.wake.write(1);
    }

    /// Schedules `f` to run once in the context's thread with the context held. Takes no lock.
    pub fn schedule(&self, f: impl FnOnce(&Context) + Send + 'static) {
        self.bottom_halves.push(Box::new(f));
        self.notify();
    }

    /// Runs one iteration: waits up to `timeout` (forever with `None`) for events without holding
    /// the context, then dispatches the ready handlers and the pending bottom halves with the
    /// context held. Returns how many handlers and bottom halves ran.
    pub fn run_once(&self, timeout: Option<Duration>) -> Result<usize, Error> {
        let timeout_ms = match timeout {
            None => -1,
            Some(t) => i32::try_from(t.as_millis()).unwrap_or(i32::MAX),
        };
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let ready = self.wait(timeout_ms, &mut events)?;
        Ok(self.dispatch_in_hook(&events[..ready]))
    }

    /// As `run_once(None)`, but first polls the context's descriptors without blocking, and
    /// the sources of its polled handlers ([`Context::add_polled_fd`]), for up to the current
    /// window of `poll` (see `poll.rs`), then adapts the window to how long the event took.
    /// Polling puts the context in poll mode ([`Context::polling`]), which lasts across
    /// iterations for as long as polling finds work; before it blocks, the loop leaves poll mode
    /// and runs every polled handler once. Holds nothing while it polls or waits.
    pub(crate) fn run_once_polling(
        &self,
        settings: &SharedSettings,
        poll: &mut PollState,
    ) -> Result<usize, Error> {
        let generation = settings.generation();
        if generation != poll.generation {
            poll.window.reset();
            self.reset_windows();
            poll.generation = generation;
        }
        let current = settings.get();
        self.set_aio_max_batch(current.aio_max_batch);
        if current.max_ns == 0 {
            // Off: no window, no clock reads.
            poll.window.reset();
            let ran = self.leave_poll_mode();
            let mut events = [EpollEvent::default(); MAX_EVENTS];
            let ready = self.wait(-1, &mut events)?;
            return Ok(ran + self.dispatch_in_hook(&events[..ready]));
        }
        let window = Duration::from_nanos(self.longest_window(&current, poll.window));
        let start = Instant::now();
        let mut ready = 0;
        let PollState {
            sources, events, ..
        } = poll;
        if !window.is_zero() {
            self.polled_sources(sources);
        }
        events.resize(MAX_EVENTS + sources.len(), EpollEvent::default());
        if !window.is_zero() {
            self.poll_mode.store(true, Ordering::SeqCst);
            loop {
                // Every source is asked on every pass, whatever epoll found: a descriptor that
                // is ready pass after pass (a busy disk's completions) must not hide a queue
                // whose notifications are off, or its requests wait for as long as it stays so.
                ready = self.wait(0, &mut events[..MAX_EVENTS])?;
                ready = poll_sources(sources, events, ready);
                if ready > 0 || start.elapsed() >= window {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let mut ran = 0;
        if ready == 0 {
            ran = self.leave_poll_mode();
            ready = self.wait(-1, events)?;
        }
        // The readiness checks hold their handlers' state: not kept past the iteration.
        sources.clear();
        let block_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.adjust_windows(&events[..ready], &current, block_ns, &mut poll.window);
        Ok(ran + self.dispatch_in_hook(&events[..ready]))
    }

    /// How long to poll: the longest window of the wake-up's (`wake`) and every descriptor's,
    /// as QEMU polls for the longest of its handlers' (`try_poll_mode`).
    fn longest_window(&self, settings: &PollSettings, wake: PollWindow) -> u64 {
        let table = self.table();
        table
            .slots
            .iter()
            .flatten()
            .map(|e| e.window.ns(settings))
            .fold(wake.ns(settings), u64::max)
    }

    /// Adapts the window of each of `ready`'s sources (the wake-up's is `wake`) to an event that
    /// came `block_ns` after the loop began waiting, as QEMU adapts each ready handler's
    /// (`aio_dispatch_ready_handlers`): a source that was not ready keeps its window.
    fn adjust_windows(
        &self,
        ready: &[EpollEvent],
        settings: &PollSettings,
        block_ns: u64,
        wake: &mut PollWindow,
    ) {
        let mut table = self.table();
        for event in ready {
            if event.data() == WAKE_TOKEN {
                wake.adjust(settings, block_ns);
            } else if let Some(entry) = table.get_mut(event.data()) {
                entry.window.adjust(settings, block_ns);
            }
        }
    }

    /// Back to no window for every descriptor (the settings changed).
    fn reset_windows(&self) {
        for entry in self.table().slots.iter_mut().flatten() {
            entry.window.reset();
        }
    }

    /// Whether the context is in poll mode: its loop polls the sources of its polled handlers
    /// and runs each of them once more before it next blocks (QEMU's `poll_set_started`), so a
    /// polled handler may leave its source's notifications off meanwhile. Only an iothread's
    /// loop polls; the main loop's context is never in poll mode.
    pub fn polling(&self) -> bool {
        self.poll_mode.load(Ordering::SeqCst)
    }

    /// The most requests a disk served here should hand its engine in one submission
    /// (`aio-max-batch` of the iothread running the context, as its loop last read it; 0: the
    /// engine's choice, and always 0 on the main loop's), as QEMU's `AioContext` carries it.
    pub fn aio_max_batch(&self) -> u64 {
        self.aio_max_batch.load(Ordering::Relaxed)
    }

    /// Sets what [`Context::aio_max_batch`] gives (the iothread's loop, at every iteration).
    pub(crate) fn set_aio_max_batch(&self, max: u64) {
        self.aio_max_batch.store(max, Ordering::Relaxed);
    }

    /// One iteration of an iothread's loop whose polling window is `window` (tests).
    #[cfg(test)]
    pub(crate) fn run_once_polling_for(&self, window: Duration) -> Result<usize, Error> {
        let settings = SharedSettings::new(PollSettings {
            max_ns: u64::MAX,
            ..PollSettings::default()
        });
        let mut poll = PollState {
            window: PollWindow::of(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)),
            generation: settings.generation(),
            ..PollState::default()
        };
        self.run_once_polling(&settings, &mut poll)
    }

    /// Puts the tokens and readiness checks of the polled handlers into `sources`.
    fn polled_sources(&self, sources: &mut Vec<(u64, PollReady)>) {
        let table = self.table();
        sources.extend(
            table
                .polled()
                .map(|(token, ready)| (token, Arc::clone(ready))),
        );
    }

    /// Leaves poll mode, if the context was in it: runs every polled handler once, with the
    /// context held and out of poll mode, so that each turns its notifications back on and
    /// takes the work that came meanwhile. Returns how many handlers and bottom halves ran.
    fn leave_poll_mode(&self) -> usize {
        if !self.poll_mode.swap(false, Ordering::SeqCst) {
            return 0;
        }
        let events: Vec<EpollEvent> = self
            .table()
            .polled()
            .map(|(token, _)| EpollEvent::new(EventSet::IN, token))
            .collect();
        self.dispatch_in_hook(&events)
    }

    /// One `epoll_wait` of up to `timeout_ms` (-1: forever) into `events`; an interrupted wait
    /// found nothing.
    fn wait(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> Result<usize, Error> {
        match self.epoll.wait(timeout_ms, events) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(Error::Wait(self.name.clone(), e)),
        }
    }

    /// Dispatches `events` inside the dispatch hook, if there is one.
    fn dispatch_in_hook(&self, events: &[EpollEvent]) -> usize {
        let mut ran = 0;
        let mut dispatch = || ran = self.dispatch(events);
        match &self.hook {
            Some(hook) => hook(&mut dispatch),
            None => dispatch(),
        }
        ran
    }

    /// Runs the handlers of `events` and the pending bottom halves, holding the context.
    fn dispatch(&self, events: &[EpollEvent]) -> usize {
        self.lock.acquire_for_loop();
        let mut ran = 0;
        for event in events {
            if event.data() == WAKE_TOKEN {
                // Nothing to do but clear it; the bottom halves run below in any case.
                let _ = self.wake.read();
                continue;
            }
            // Looked up with the context held, so a handler removed since the wait never runs.
            let handler = self
                .table()
                .get(event.data())
                .map(|e| Arc::clone(&e.handler));
            if let Some(handler) = handler {
                handler(self, event.event_set());
                ran += 1;
                debug_assert!(
                    !(lock::in_iothread() && lock::global_lock_held()),
                    "an iothread handler took the global lock"
                );
            }
        }
        for work in self.bottom_halves.take_all() {
            work(self);
            ran += 1;
        }
        self.lock.release();
        ran
    }
}

/// Asks each of `sources` whether it has work and puts an event for each that has into
/// `events` after the `ready` there already, unless one of those is its descriptor's; returns
/// how many events there are now.
fn poll_sources(sources: &[(u64, PollReady)], events: &mut [EpollEvent], ready: usize) -> usize {
    let mut found = ready;
    for (token, has_work) in sources {
        if events[..ready].iter().any(|e| e.data() == *token) {
            continue;
        }
        let Some(slot) = events.get_mut(found) else {
            break;
        };
        if has_work() {
            *slot = EpollEvent::new(EventSet::IN, *token);
            found += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn handler_runs_when_its_fd_is_ready_and_not_after_removal() {
        let ctx = Context::new("t").unwrap();
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let reader = efd.try_clone().unwrap();
        let id = ctx
            .add_fd(
                efd.as_raw_fd(),
                EventSet::IN,
                Arc::new(move |ctx: &Context, _| {
                    assert!(ctx.held_by_current_thread());
                    reader.read().unwrap();
                    h.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        efd.write(1).unwrap();
        assert_eq!(ctx.run_once(Some(Duration::from_secs(5))).unwrap(), 1);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        ctx.remove_fd(id).unwrap();
        efd.write(1).unwrap();
        assert_eq!(ctx.run_once(Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(matches!(ctx.remove_fd(id), Err(Error::UnknownHandler(..))));
    }

    #[test]
    fn adding_a_bad_fd_is_an_error() {
        let ctx = Context::new("t").unwrap();
        let err = ctx.add_fd(-1, EventSet::IN, Arc::new(|_: &Context, _| {}));
        assert!(matches!(err, Err(Error::AddFd { fd: -1, .. })));
    }

    #[test]
    fn bottom_halves_run_in_order() {
        let ctx = Context::new("t").unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let log = Arc::clone(&log);
            ctx.schedule(move |_| log.lock().unwrap().push(i));
        }
        assert_eq!(ctx.run_once(Some(Duration::from_secs(5))).unwrap(), 3);
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn dispatch_hook_wraps_every_dispatch() {
        let wrapped = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(&wrapped);
        let ctx = Context::with_dispatch_hook(
            "main-loop",
            Box::new(move |dispatch: &mut dyn FnMut()| {
                set_global_lock_held(true);
                dispatch();
                set_global_lock_held(false);
                w.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        ctx.schedule(|_| assert!(global_lock_held()));
        ctx.run_once(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(wrapped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_outer_loop_sees_work_through_the_epoll_fd() {
        let ctx = Context::new("nested").unwrap();
        let outer = Epoll::new().unwrap();
        outer
            .ctl(
                ControlOperation::Add,
                ctx.epoll_fd(),
                EpollEvent::new(EventSet::IN, 7),
            )
            .unwrap();
        let mut events = [EpollEvent::default(); 4];
        assert_eq!(outer.wait(0, &mut events).unwrap(), 0);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        ctx.schedule(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(outer.wait(5000, &mut events).unwrap(), 1);
        assert_eq!(events[0].data(), 7);
        assert_eq!(ctx.run_once(Some(Duration::ZERO)).unwrap(), 1);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(outer.wait(0, &mut events).unwrap(), 0);
    }

    #[test]
    fn a_polling_iteration_dispatches_and_adapts_its_window() {
        let ctx = Context::new("t").unwrap();
        let settings = SharedSettings::new(PollSettings::default());
        let mut poll = PollState::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        ctx.schedule(move |ctx| {
            assert!(ctx.held_by_current_thread());
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ctx.run_once_polling(&settings, &mut poll).unwrap(), 1);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(!ctx.held_by_current_thread());
        // The event was already there: found at once (grown to the first window) or, on a very
        // slow machine, later than poll-max-ns (no window).
        let defaults = PollSettings::default();
        assert!([0, 4_000].contains(&poll.window.ns(&defaults)), "{poll:?}");

        // A change of settings restarts from no window; turning polling off keeps it at none.
        for _ in 0..4 {
            poll.window.adjust(&defaults, 30_000);
        }
        assert_eq!(poll.window.ns(&defaults), 32_000);
        settings.set(PollSetting::MaxNs, 0);
        ctx.schedule(|_| {});
        assert_eq!(ctx.run_once_polling(&settings, &mut poll).unwrap(), 1);
        assert_eq!(poll.window.ns(&defaults), 0);
        settings.set(PollSetting::MaxNs, 1_000_000);
        ctx.schedule(|_| {});
        ctx.run_once_polling(&settings, &mut poll).unwrap();
        assert!(poll.window.ns(&settings.get()) <= 4_000, "{poll:?}");
    }

    /// A polled handler runs when its source says it has work, its descriptor silent, with the
    /// context in poll mode; a loop whose polling is turned off leaves poll mode by running it
    /// once more, out of poll mode, before it blocks.
    #[test]
    fn a_polled_source_runs_its_handler_and_leaving_poll_mode_runs_it_again() {
        let ctx = Context::new("t").unwrap();
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let work = Arc::new(AtomicBool::new(true));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let (w, r) = (Arc::clone(&work), Arc::clone(&runs));
        ctx.add_polled_fd(
            efd.as_raw_fd(),
            EventSet::IN,
            Arc::new(move |ctx: &Context, _| {
                w.store(false, Ordering::SeqCst);
                r.lock().unwrap().push(ctx.polling());
            }),
            {
                let work = Arc::clone(&work);
                Arc::new(move || work.load(Ordering::SeqCst))
            },
        )
        .unwrap();
        assert_eq!(ctx.run_once_polling_for(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(*runs.lock().unwrap(), [true]);
        assert!(ctx.polling());

        let settings = SharedSettings::new(PollSettings {
            max_ns: 0,
            ..PollSettings::default()
        });
        ctx.notify();
        ctx.run_once_polling(&settings, &mut PollState::default())
            .unwrap();
        assert_eq!(*runs.lock().unwrap(), [true, false]);
        assert!(!ctx.polling());
    }

    /// A polled source is asked on every pass of the polling, not only when epoll finds
    /// nothing: a descriptor ready pass after pass (here one whose handler never clears it, as
    /// a completion eventfd signalled after its completions were reaped) must not hide a queue
    /// whose notifications are off, which would then wait for as long as that lasts.
    #[test]
    fn a_descriptor_ready_on_every_pass_does_not_hide_a_polled_source() {
        let ctx = Context::new("t").unwrap();
        let busy = EventFd::new(EFD_NONBLOCK).unwrap();
        busy.write(1).unwrap();
        ctx.add_fd(
            busy.as_raw_fd(),
            EventSet::IN,
            Arc::new(|_: &Context, _| {}),
        )
        .unwrap();
        let queue = EventFd::new(EFD_NONBLOCK).unwrap();
        let work = Arc::new(AtomicBool::new(true));
        let w = Arc::clone(&work);
        ctx.add_polled_fd(
            queue.as_raw_fd(),
            EventSet::IN,
            Arc::new(move |_: &Context, _| w.store(false, Ordering::SeqCst)),
            {
                let work = Arc::clone(&work);
                Arc::new(move || work.load(Ordering::SeqCst))
            },
        )
        .unwrap();
        for _ in 0..3 {
            ctx.run_once_polling_for(Duration::from_secs(5)).unwrap();
        }
        assert!(
            !work.load(Ordering::SeqCst),
            "the polled source's work was never taken"
        );
        assert!(ctx.polling());
    }

    /// Each descriptor has a window of its own, adapted to its own events only: one whose
    /// events come soon keeps the loop polling when another's come late, as QEMU's handlers
    /// each have theirs (`AioPolledEvent`), and the loop polls for the longest.
    #[test]
    fn each_descriptor_adapts_a_window_of_its_own() {
        let ctx = Context::new("t").unwrap();
        let (a, b) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        let add = |fd: &EventFd| {
            ctx.add_fd(fd.as_raw_fd(), EventSet::IN, Arc::new(|_: &Context, _| {}))
                .unwrap()
        };
        let (id_a, id_b) = (add(&a), add(&b));
        let event = |id: HandlerId| EpollEvent::new(EventSet::IN, id.0);
        let s = PollSettings::default();
        let mut wake = PollWindow::default();
        for _ in 0..3 {
            ctx.adjust_windows(&[event(id_a)], &s, 10_000, &mut wake);
        }
        assert_eq!(ctx.longest_window(&s, wake), 16_000);
        // B's event, long after: B's window stays at none, A's and the loop's stay.
        ctx.adjust_windows(&[event(id_b)], &s, 5_000_000, &mut wake);
        assert_eq!(ctx.longest_window(&s, wake), 16_000);
        // A's own late event shrinks A's.
        ctx.adjust_windows(&[event(id_a)], &s, 5_000_000, &mut wake);
        assert_eq!(ctx.longest_window(&s, wake), 0);
        // The wake-up's window counts too; a change of settings resets every descriptor's.
        ctx.adjust_windows(&[event(id_b)], &s, 10_000, &mut wake);
        ctx.adjust_windows(
            &[EpollEvent::new(EventSet::IN, WAKE_TOKEN)],
            &s,
            1,
            &mut wake,
        );
        assert_eq!(ctx.longest_window(&s, wake), 4_000);
        ctx.reset_windows();
        assert_eq!(ctx.longest_window(&s, PollWindow::default()), 0);
    }

    #[test]
    fn unlocked_releases_every_level_and_restores_them() {
        let ctx = Context::new("t").unwrap();
        let _a = ctx.acquire();
        let _b = ctx.acquire();
        let other = Arc::clone(&ctx);
        ctx.unlocked(|| {
            assert!(!other.held_by_current_thread());
            // Another thread can take it meanwhile.
            let c = Arc::clone(&other);
            std::thread::spawn(move || drop(c.acquire()))
                .join()
                .unwrap();
        });
        assert!(ctx.held_by_current_thread());
    }
}
