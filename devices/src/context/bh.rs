//! Bottom halves: work scheduled from any thread, with no lock, to run in a context's thread.
//!
//! Scheduling pushes onto a lock-free multi-producer stack (a Treiber stack whose only consumer
//! takes the whole list at once, so there is no ABA problem) and then writes the context's
//! eventfd; the context's loop takes the list, restores submission order and runs each item with
//! the context held.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use super::Context;

/// Queued work: a closure run once in the context's thread.
pub(crate) type Work = Box<dyn FnOnce(&Context) + Send>;

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
