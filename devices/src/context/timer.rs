//! Timers: a timerfd watched by a context, whose callback runs in the context's thread with the
//! context held (QEMU's `QEMUTimer` on an `AioContext`).

use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use std::{fmt, io};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{Context, Error, HandlerId};

/// A one-shot or periodic timer on a context; removed from it when dropped.
pub struct Timer {
    ctx: Arc<Context>,
    fd: Arc<Mutex<TimerFd>>,
    id: HandlerId,
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("context", &self.ctx.name())
            .field("id", &self.id)
            .finish()
    }
}

impl Timer {
    /// A disarmed timer that runs `func` in `ctx`'s thread each time it expires.
    pub fn new(
        ctx: Arc<Context>,
        func: impl Fn(&Context) + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(Error::TimerCreate(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new timerfd that nothing else owns.
        let fd = Arc::new(Mutex::new(unsafe { TimerFd::from_raw_fd(raw) }));
        let handler_fd = Arc::clone(&fd);
        let id = ctx.add_fd(
            raw,
            EventSet::IN,
            Arc::new(move |ctx: &Context, _| {
                // Non-blocking: a timer disarmed since the wake-up reads EAGAIN and is skipped.
                let expired = handler_fd
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .wait()
                    .unwrap_or(0);
                if expired > 0 {
                    func(ctx);
                }
            }),
        )?;
        Ok(Timer { ctx, fd, id })
    }

    fn timerfd(&self) -> std::sync::MutexGuard<'_, TimerFd> {
        self.fd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Arms the timer to expire after `after`, then every `period` if one is given.
    pub fn arm(&self, after: Duration, period: Option<Duration>) -> Result<(), Error> {
        self.timerfd().reset(after, period).map_err(Error::TimerSet)
    }

    /// Disarms the timer.
    pub fn disarm(&self) -> Result<(), Error> {
        self.timerfd().clear().map_err(Error::TimerSet)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Err(e) = self.ctx.remove_fd(self.id) {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn timer_fires_in_the_loop_and_not_when_disarmed() {
        let ctx = Context::new("t").unwrap();
        let fired = Arc::new(AtomicUsize::new(0));
        let f = Arc::clone(&fired);
        let timer = Timer::new(Arc::clone(&ctx), move |ctx| {
            assert!(ctx.held_by_current_thread());
            f.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        timer.arm(Duration::from_millis(1), None).unwrap();
        while fired.load(Ordering::SeqCst) == 0 {
            ctx.run_once(Some(Duration::from_secs(5))).unwrap();
        }
        timer.arm(Duration::from_secs(3600), None).unwrap();
        timer.disarm().unwrap();
        assert_eq!(ctx.run_once(Some(Duration::from_millis(20))).unwrap(), 0);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }
}
