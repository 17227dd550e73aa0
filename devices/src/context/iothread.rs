//! IOThreads: a named thread running a context's loop until told to stop (QEMU's
//! `-object iothread`). The thread is named after the iothread's id, is marked as an iothread
//! (so taking the global lock from it is caught in debug builds), and reports its Linux thread id
//! for `query-iothreads`. Before it blocks, the loop polls for up to an adaptive window
//! (`poll.rs`); its settings are read and changed at run time through [`IoThread::poll_settings`]
//! and [`IoThread::set_poll_setting`].
//!
//! A loop that fails (its `epoll_wait` fails) ends the thread, and the devices it served stop
//! being served: the error is logged at once and, when the iothread was started with
//! [`IoThread::spawn_reporting`], handed to its failure hook on the iothread itself (the vmm's
//! wakes the main loop, which ends the VM), else kept for [`IoThread::stop`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::{self, JoinHandle};

use super::poll::{PollSetting, PollSettings, SharedSettings};
use super::{lock, Context, Error, PollState};
use crate::error_chain;

/// Called on an iothread whose loop failed, with the error it failed on; the thread then ends.
/// It runs on the iothread, so it must not take the global lock.
pub type OnFailure = Box<dyn FnOnce(Error) + Send>;

/// Run first thing on every iothread, before its loop runs (see [`set_iothread_start`]).
static IOTHREAD_START: OnceLock<fn()> = OnceLock::new();

/// Has every iothread started from now on run `hook` first thing, before its loop runs: the VMM
/// puts the thread in its sandbox there. Only the first hook set is kept.
pub fn set_iothread_start(hook: fn()) {
    let _ = IOTHREAD_START.set(hook);
}

/// A thread running a context; stopped and joined by [`IoThread::stop`] or when dropped.
#[derive(Debug)]
pub struct IoThread {
    id: String,
    ctx: Arc<Context>,
    stop: Arc<AtomicBool>,
    settings: Arc<SharedSettings>,
    thread_id: i32,
    handle: Option<JoinHandle<Result<(), Error>>>,
}

impl IoThread {
    /// Starts an iothread with a new context, its thread named `id`, polling with QEMU's default
    /// settings. A loop failure is returned by [`IoThread::stop`].
    pub fn spawn(id: &str) -> Result<Self, Error> {
        Self::start(id, PollSettings::default(), None)
    }

    /// As [`IoThread::spawn`], polling with `settings`, and a loop failure goes to `on_failure`
    /// as soon as it happens (and `stop` then reports nothing of it).
    pub fn spawn_reporting(
        id: &str,
        settings: PollSettings,
        on_failure: OnFailure,
    ) -> Result<Self, Error> {
        Self::start(id, settings, Some(on_failure))
    }

    fn start(
        id: &str,
        settings: PollSettings,
        on_failure: Option<OnFailure>,
    ) -> Result<Self, Error> {
        let ctx = Context::new(id)?;
        let stop = Arc::new(AtomicBool::new(false));
        let settings = Arc::new(SharedSettings::new(settings));
        let thread_settings = Arc::clone(&settings);
        let (tid_tx, tid_rx) = mpsc::channel();
        let thread_ctx = Arc::clone(&ctx);
        let thread_stop = Arc::clone(&stop);
        let thread_name = id.to_owned();
        let handle = thread::Builder::new()
            .name(id.to_owned())
            .stack_size(block::THREAD_STACK)
            .spawn(move || {
                if let Some(hook) = IOTHREAD_START.get() {
                    hook();
                }
                lock::mark_iothread();
                // SAFETY: gettid takes no arguments and cannot fail.
                let tid = unsafe { libc::gettid() };
                // The receiver waits for this message in `spawn`.
                let _ = tid_tx.send(tid);
                let mut poll = PollState::default();
                while !thread_stop.load(Ordering::Acquire) {
                    if let Err(e) = thread_ctx.run_once_polling(&thread_settings, &mut poll) {
                        log::error!("iothread {thread_name} stopped: {}", error_chain(&e));
                        return match on_failure {
                            Some(report) => {
                                report(e);
                                Ok(())
                            }
                            None => Err(e),
                        };
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::Spawn(id.to_owned(), e))?;
        // The thread sends its id first thing; it can only fail to if it died, which `join`
        // reports.
        let thread_id = tid_rx.recv().unwrap_or(0);
        Ok(IoThread {
            id: id.to_owned(),
            ctx,
            stop,
            settings,
            thread_id,
            handle: Some(handle),
        })
    }

    /// The iothread's id (`-object iothread,id=`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The context it runs, for devices to register with.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The Linux thread id, as `query-iothreads` reports it.
    pub fn thread_id(&self) -> i32 {
        self.thread_id
    }

    /// A handle other threads can keep, to read the iothread's ids and read and change its
    /// polling settings while it runs.
    pub fn handle(&self) -> IoThreadHandle {
        IoThreadHandle {
            id: self.id.clone(),
            thread_id: self.thread_id,
            settings: Arc::clone(&self.settings),
            ctx: Arc::clone(&self.ctx),
        }
    }

    /// Stops the loop after the iteration in progress and joins the thread. Devices should have
    /// been drained and removed from the context first.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::Release);
        self.ctx.notify();
        match handle.join() {
            Ok(result) => result.map_err(|e| Error::IoThreadFailed(self.id.clone(), Box::new(e))),
            Err(_) => Err(Error::IoThreadPanicked(self.id.clone())),
        }
    }
}

/// What other threads keep of an iothread (see [`IoThread::handle`]). Takes no lock.
#[derive(Debug, Clone)]
pub struct IoThreadHandle {
    id: String,
    thread_id: i32,
    settings: Arc<SharedSettings>,
    ctx: Arc<Context>,
}

impl IoThreadHandle {
    /// The iothread's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its Linux thread id.
    pub fn thread_id(&self) -> i32 {
        self.thread_id
    }

    /// The polling settings in force.
    pub fn poll_settings(&self) -> PollSettings {
        self.settings.get()
    }

    /// Changes one polling setting; the loop picks it up at its next iteration, which this
    /// wakes it for, and restarts from no window (as QEMU's does).
    pub fn set_poll_setting(&self, setting: PollSetting, value: u64) {
        self.settings.set(setting, value);
        self.ctx.notify();
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;
    use std::time::Duration;
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn settings_changed_through_a_handle_are_the_iothread_s() {
        let off = PollSettings {
            max_ns: 0,
            ..PollSettings::default()
        };
        let io = IoThread::spawn_reporting("io-poll", off, Box::new(|_| {})).unwrap();
        let handle = io.handle();
        assert_eq!(
            (handle.id(), handle.thread_id()),
            ("io-poll", io.thread_id())
        );
        assert_eq!(handle.poll_settings(), off);
        handle.set_poll_setting(PollSetting::MaxNs, 50_000);
        handle.set_poll_setting(PollSetting::AioMaxBatch, 8);
        assert_eq!(
            io.handle().poll_settings(),
            PollSettings {
                max_ns: 50_000,
                aio_max_batch: 8,
                ..PollSettings::default()
            }
        );
        // The loop still serves work, now polling.
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            io.context().schedule(move |_| tx.send(i).unwrap());
        }
        let got: Vec<i32> = (0..100)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        // Its context carries the new aio-max-batch for the disks it serves, from the loop's
        // next iteration on.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while io.context().aio_max_batch() != 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "aio-max-batch not taken up"
            );
            io.context().notify();
            thread::sleep(Duration::from_millis(1));
        }
        io.stop().unwrap();
    }

    #[test]
    fn bottom_half_from_another_thread_runs_in_the_iothread() {
        let io = IoThread::spawn("io-bh").unwrap();
        assert!(io.thread_id() > 0);
        let (tx, rx) = mpsc::channel();
        let ctx = Arc::clone(io.context());
        thread::spawn(move || {
            ctx.schedule(move |ctx| {
                let name = thread::current().name().map(str::to_owned);
                tx.send((name, ctx.held_by_current_thread(), lock::in_iothread()))
                    .unwrap();
            });
        })
        .join()
        .unwrap();
        let (name, held, in_iothread) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("io-bh"));
        assert!(held);
        assert!(in_iothread);
        io.stop().unwrap();
    }

    /// Keeps the iothread's loop permanently busy: a level-triggered eventfd never cleared, whose
    /// handler works for a while and counts iterations.
    fn make_busy(io: &IoThread, iterations: &Arc<AtomicU64>) -> EventFd {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        efd.write(1).unwrap();
        let it = Arc::clone(iterations);
        io.context()
            .add_fd(
                efd.as_raw_fd(),
                EventSet::IN,
                Arc::new(move |_: &Context, _| {
                    it.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(500));
                }),
            )
            .unwrap();
        efd
    }

    #[test]
    fn acquire_from_outside_a_busy_iothread_waits_at_most_one_iteration() {
        let io = IoThread::spawn("io-busy").unwrap();
        let iterations = Arc::new(AtomicU64::new(0));
        let _busy = make_busy(&io, &iterations);
        while iterations.load(Ordering::SeqCst) < 3 {
            thread::yield_now();
        }
        for _ in 0..50 {
            let before = iterations.load(Ordering::SeqCst);
            let guard = io.context().acquire();
            let after = iterations.load(Ordering::SeqCst);
            // The loop hands over after the iteration in progress: at most that one plus one that
            // started between the load and the acquire.
            assert!(after - before <= 2, "waited {} iterations", after - before);
            // Nesting from the same thread never blocks.
            drop(io.context().acquire());
            drop(guard);
        }
        io.stop().unwrap();
    }

    #[test]
    fn stop_and_join_under_load() {
        let io = IoThread::spawn("io-stop").unwrap();
        let iterations = Arc::new(AtomicU64::new(0));
        let _busy = make_busy(&io, &iterations);
        let ctx = Arc::clone(io.context());
        let done = Arc::new(Mutex::new(0u32));
        let producers: Vec<_> = (0..4)
            .map(|_| {
                let ctx = Arc::clone(&ctx);
                let done = Arc::clone(&done);
                thread::spawn(move || {
                    for _ in 0..200 {
                        let done = Arc::clone(&done);
                        ctx.schedule(move |_| *done.lock().unwrap() += 1);
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        // Every bottom half runs although the loop never goes idle.
        for _ in 0..10_000 {
            if *done.lock().unwrap() == 800 {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*done.lock().unwrap(), 800);
        io.stop().unwrap();
    }

    /// Makes the iothread's loop fail for real: the context's epoll descriptor number is made to
    /// refer to an eventfd (`dup2`), so its next `epoll_wait` fails with EINVAL; the wake-up
    /// gets the loop there. The context still owns (and closes) that number.
    fn break_the_loop(io: &IoThread) {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: both descriptors are open; dup2 only changes what the epoll number refers to.
        let ret = unsafe { libc::dup2(efd.as_raw_fd(), io.context().epoll_fd()) };
        assert!(ret >= 0, "{}", std::io::Error::last_os_error());
        io.context().notify();
    }

    #[test]
    fn a_failed_loop_is_reported_at_once_to_the_failure_hook() {
        let (tx, rx) = mpsc::channel();
        let io = IoThread::spawn_reporting(
            "io-fail",
            PollSettings::default(),
            Box::new(move |e| {
                tx.send((thread::current().name().map(str::to_owned), e))
                    .unwrap()
            }),
        )
        .unwrap();
        break_the_loop(&io);
        let (name, e) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("io-fail"));
        assert!(
            matches!(&e, Error::Wait(ctx, source) if ctx == "io-fail"
                && source.raw_os_error() == Some(libc::EINVAL)),
            "{e:?}"
        );
        // Reported once: stopping the dead thread finds nothing more to say.
        io.stop().unwrap();
    }

    #[test]
    fn without_a_hook_stop_returns_the_loop_failure() {
        let io = IoThread::spawn("io-fail-quiet").unwrap();
        break_the_loop(&io);
        // Stopping first would end the loop before it fails.
        while !io.handle.as_ref().unwrap().is_finished() {
            thread::yield_now();
        }
        let e = io.stop().unwrap_err();
        assert!(
            matches!(&e, Error::IoThreadFailed(id, inner) if id == "io-fail-quiet"
                && matches!(**inner, Error::Wait(..))),
            "{e:?}"
        );
    }
}
