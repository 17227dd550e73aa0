//! The nestable acquire/release lock of a context, and the per-thread rules around it.
//!
//! After QEMU's `AioContext` lock: the thread that holds a context may acquire it again (each
//! acquire is matched by one release), any other thread blocks until every level is released.
//! The context's own loop takes the lock with [`NestLock::acquire_for_loop`], which also yields to
//! threads already waiting, so a vCPU or the main thread crossing over to an iothread's device gets
//! in after at most the iteration the loop is running, however busy the loop is.
//!
//! Per-thread rules (checked with `debug_assert!`, i.e. in debug builds and tests): a thread holds
//! several contexts only when it took them in the order they were created (a device served by
//! several iothreads, taken with `Context::acquire_all`; never a later one, then an earlier one),
//! iothread code never takes the global lock, and no thread takes the global lock while it holds
//! a context (the order is the global lock, then contexts by creation). The vmm
//! owns the global lock, so the hooks it needs are generic: its one locking function calls
//! [`debug_assert_may_take_global_lock`] just before locking and [`set_global_lock_held`] while
//! the lock is held, so every holder is recorded.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Source of per-thread tokens (0 means "no thread").
static NEXT_THREAD_TOKEN: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// A small unique number for the current thread, cheaper to compare than a `ThreadId`.
    static THREAD_TOKEN: u64 = NEXT_THREAD_TOKEN.fetch_add(1, Ordering::Relaxed);
    /// The ids of the contexts this thread holds, in the order it took them (increasing).
    static HELD_CONTEXTS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Whether this thread holds the vmm's global lock (set by the vmm).
    static GLOBAL_LOCK_HELD: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread is an iothread.
    static IN_IOTHREAD: Cell<bool> = const { Cell::new(false) };
}

/// The current thread's token.
pub(crate) fn thread_token() -> u64 {
    THREAD_TOKEN.with(|t| *t)
}

/// Records whether the current thread holds the global lock. The vmm's global-lock guard calls
/// this right after taking the lock (`true`) and right before releasing it (`false`).
pub fn set_global_lock_held(held: bool) {
    GLOBAL_LOCK_HELD.with(|g| g.set(held));
}

/// Whether the current thread recorded that it holds the global lock.
pub fn global_lock_held() -> bool {
    GLOBAL_LOCK_HELD.with(Cell::get)
}

/// Debug-asserts that the current thread may take the global lock: it is not an iothread, and it
/// holds no context (the order is the global lock first, then a context). The vmm calls this just
/// before locking the global mutex.
pub fn debug_assert_may_take_global_lock() {
    debug_assert!(
        !IN_IOTHREAD.with(Cell::get),
        "iothread code must never take the global lock"
    );
    debug_assert!(
        HELD_CONTEXTS.with(|h| h.borrow().is_empty()),
        "the global lock must be taken before a context, never while holding one"
    );
}

/// Marks the current thread as an iothread (for the global lock assertion).
pub(crate) fn mark_iothread() {
    IN_IOTHREAD.with(|i| i.set(true));
}

/// Whether the current thread is an iothread.
pub fn in_iothread() -> bool {
    IN_IOTHREAD.with(Cell::get)
}

/// Who holds the lock and who waits for it.
#[derive(Debug, Default)]
struct State {
    /// Token of the holding thread, 0 when free.
    owner: u64,
    /// Nesting depth of the holder.
    depth: u32,
    /// Threads other than the loop blocked in `acquire`.
    waiting: u32,
    /// Whether the loop thread is blocked in `acquire_for_loop`.
    loop_waiting: bool,
}

/// A recursive lock with hand-off to outside waiters; see the module documentation.
#[derive(Debug)]
pub(crate) struct NestLock {
    /// Identifies the context in the per-thread "held context" record.
    context_id: u64,
    state: Mutex<State>,
    cond: Condvar,
}

impl NestLock {
    /// A free lock for the context `context_id` (non-zero).
    pub(crate) fn new(context_id: u64) -> Self {
        NestLock {
            context_id,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few integers updated in place: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks the lock order before blocking on this lock: every context the thread holds was
    /// created before this one.
    fn check_order(&self) {
        debug_assert!(
            HELD_CONTEXTS.with(|h| h.borrow().iter().all(|&held| held < self.context_id)),
            "a thread must never hold two contexts at once, unless taken in creation order"
        );
    }

    /// Records that the current thread took this lock.
    fn record_held(&self) {
        HELD_CONTEXTS.with(|h| h.borrow_mut().push(self.context_id));
    }

    /// Records that the current thread let go of this lock.
    fn record_released(&self) {
        HELD_CONTEXTS.with(|h| h.borrow_mut().retain(|&id| id != self.context_id));
    }

    /// Whether the current thread holds this lock.
    pub(crate) fn held_by_current_thread(&self) -> bool {
        self.state().owner == thread_token()
    }

    /// Acquires one level for a thread other than the loop (or the loop, nested).
    pub(crate) fn acquire(&self) {
        let me = thread_token();
        let mut state = self.state();
        if state.owner == me {
            state.depth += 1;
            return;
        }
        self.check_order();
        state.waiting += 1;
        while state.owner != 0 {
            state = self.wait(state);
        }
        state.waiting -= 1;
        state.owner = me;
        state.depth = 1;
        self.record_held();
    }

    /// Acquires the lock for one loop iteration: like `acquire`, but first lets every thread that
    /// is already waiting take its turn.
    pub(crate) fn acquire_for_loop(&self) {
        let me = thread_token();
        let mut state = self.state();
        debug_assert!(
            state.owner != me,
            "the loop must not hold its context while waiting"
        );
        self.check_order();
        while state.owner != 0 || state.waiting > 0 {
            state.loop_waiting = true;
            state = self.wait(state);
        }
        state.loop_waiting = false;
        state.owner = me;
        state.depth = 1;
        self.record_held();
    }

    /// Releases one level; the last one frees the lock and wakes the waiters.
    pub(crate) fn release(&self) {
        let mut state = self.state();
        debug_assert!(
            state.owner == thread_token() && state.depth > 0,
            "a context released by a thread that does not hold it"
        );
        if state.owner != thread_token() || state.depth == 0 {
            return;
        }
        state.depth -= 1;
        if state.depth == 0 {
            state.owner = 0;
            self.record_released();
            if state.waiting > 0 || state.loop_waiting {
                self.cond.notify_all();
            }
        }
    }

    /// Releases every level the current thread holds and returns how many there were (0 when it
    /// held none).
    pub(crate) fn release_all(&self) -> u32 {
        let mut state = self.state();
        if state.owner != thread_token() {
            return 0;
        }
        let depth = state.depth;
        state.depth = 0;
        state.owner = 0;
        self.record_released();
        if state.waiting > 0 || state.loop_waiting {
            self.cond.notify_all();
        }
        depth
    }

    /// Acquires `depth` levels again after `release_all` (nothing when `depth` is 0).
    pub(crate) fn reacquire(&self, depth: u32) {
        if depth == 0 {
            return;
        }
        self.acquire();
        self.state().depth = depth;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_counts_levels() {
        let lock = NestLock::new(1000);
        lock.acquire();
        lock.acquire();
        assert!(lock.held_by_current_thread());
        lock.release();
        assert!(lock.held_by_current_thread());
        lock.release();
        assert!(!lock.held_by_current_thread());
    }

    #[test]
    fn release_all_and_reacquire_restore_the_depth() {
        let lock = NestLock::new(1001);
        lock.acquire();
        lock.acquire();
        lock.acquire();
        assert_eq!(lock.release_all(), 3);
        assert!(!lock.held_by_current_thread());
        lock.reacquire(3);
        for _ in 0..3 {
            assert!(lock.held_by_current_thread());
            lock.release();
        }
        assert!(!lock.held_by_current_thread());
        assert_eq!(lock.release_all(), 0);
    }

    #[test]
    fn global_lock_flag_is_per_thread() {
        set_global_lock_held(true);
        assert!(global_lock_held());
        std::thread::spawn(|| assert!(!global_lock_held()))
            .join()
            .expect("the checking thread does not panic");
        set_global_lock_held(false);
        assert!(!global_lock_held());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "two contexts")]
    fn holding_two_contexts_out_of_order_is_caught() {
        let a = NestLock::new(1002);
        let b = NestLock::new(1003);
        b.acquire();
        a.acquire();
    }

    #[test]
    fn contexts_taken_in_creation_order_nest_and_release_in_any_order() {
        let a = NestLock::new(1004);
        let b = NestLock::new(1005);
        a.acquire();
        b.acquire();
        a.release();
        // Only `b` is held now: taking `a` again would be out of order, a later one is fine.
        let c = NestLock::new(1006);
        c.acquire();
        c.release();
        b.release();
        a.acquire();
        a.release();
        assert!(HELD_CONTEXTS.with(|h| h.borrow().is_empty()));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "iothread code must never take the global lock")]
    fn iothread_taking_the_global_lock_is_caught() {
        mark_iothread();
        debug_assert_may_take_global_lock();
    }
}
