//! Bottom halves: work scheduled from any thread, with no lock, to run in a context's thread.
//!
//! Scheduling pushes onto a lock-free multi-producer stack (a Treiber stack whose only consumer
//! takes the whole list at once, so there is no ABA problem) and then writes the context's
//! eventfd; the context's loop takes the list, restores submission order and runs each item with
//! the context held. A reusable [`Bh`] (QEMU's `QEMUBH`) is queued at most once however many
//! times it is scheduled before it runs.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;

use super::Context;

/// A closure run once.
type OnceFn = Box<dyn FnOnce(&Context) + Send>;

/// The body of a reusable bottom half.
pub(crate) struct BhBody {
    /// Set while the bottom half is queued, so scheduling it twice queues it once.
    scheduled: AtomicBool,
    func: Box<dyn Fn(&Context) + Send + Sync>,
}

/// Queued work.
pub(crate) enum Work {
    /// A one-shot closure.
    Once(OnceFn),
    /// A reusable bottom half.
    Reusable(Arc<BhBody>),
}

impl Work {
    /// Runs the work in the context's thread.
    pub(crate) fn run(self, ctx: &Context) {
        match self {
            Work::Once(f) => f(ctx),
            Work::Reusable(body) => {
                // Cleared before running, so the body may schedule itself again.
                body.scheduled.store(false, Ordering::Release);
                (body.func)(ctx);
            }
        }
    }
}

/// One stack node.
struct Node {
    work: Work,
    next: *mut Node,
}

/// The lock-free stack of pending work.
#[derive(Debug)]
pub(crate) struct BhQueue {
    head: AtomicPtr<Node>,
}

impl BhQueue {
    pub(crate) fn new() -> Self {
        BhQueue {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Pushes work; safe from any thread.
    pub(crate) fn push(&self, work: Work) {
        let node = Box::into_raw(Box::new(Node {
            work,
            next: ptr::null_mut(),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` came from `Box::into_raw` above and is not shared until the
            // compare-exchange below publishes it.
            unsafe { (*node).next = head };
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Takes every pending item, oldest first.
    pub(crate) fn take_all(&self) -> Vec<Work> {
        let mut node = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        let mut items = Vec::new();
        while !node.is_null() {
            // SAFETY: every node in the list came from `Box::into_raw` in `push`, and the swap
            // above made this thread the list's only owner.
            let boxed = unsafe { Box::from_raw(node) };
            node = boxed.next;
            items.push(boxed.work);
        }
        items.reverse();
        items
    }
}

impl Drop for BhQueue {
    fn drop(&mut self) {
        drop(self.take_all());
    }
}

// SAFETY: the raw pointers are only dereferenced by the owner of a node: its creator before
// publication, or the thread whose swap took the list. The work items themselves are `Send`.
unsafe impl Send for BhQueue {}
// SAFETY: as above; shared access goes through the atomic head only.
unsafe impl Sync for BhQueue {}

/// A reusable bottom half bound to a context: create once, schedule from any thread.
pub struct Bh {
    ctx: Arc<Context>,
    body: Arc<BhBody>,
}

impl std::fmt::Debug for Bh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bh")
            .field("context", &self.ctx.name())
            .finish_non_exhaustive()
    }
}

impl Bh {
    /// A bottom half that runs `func` in `ctx`'s thread each time it is scheduled.
    pub fn new(ctx: Arc<Context>, func: impl Fn(&Context) + Send + Sync + 'static) -> Self {
        Bh {
            ctx,
            body: Arc::new(BhBody {
                scheduled: AtomicBool::new(false),
                func: Box::new(func),
            }),
        }
    }

    /// Schedules the bottom half; takes no lock. A no-op if it is already pending.
    pub fn schedule(&self) {
        if !self.body.scheduled.swap(true, Ordering::AcqRel) {
            self.ctx.push_work(Work::Reusable(Arc::clone(&self.body)));
        }
    }
}
