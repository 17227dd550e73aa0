//! The last clusters an image decompressed ([`KEPT`] of them), by the host offset of their
//! stream: a guest reading a compressed cluster in pieces (pages, or readahead windows that
//! split it) decompresses it once, not once per read.
//!
//! A stream's bytes change only when its host cluster is freed (its refcount dropped to zero:
//! a rewrite of its guest cluster copies it elsewhere, a discard, a snapshot's deletion) and
//! then reused. A freed cluster is reused only once every request that could have looked up a
//! mapping to it has ended (`direct::Epochs`), and those requests are the only ones that could
//! put its old contents here. So the kept clusters are dropped whenever freed clusters become
//! reusable ([`Epochs::reuses`]), before any of them can be handed out again: no later read can
//! find the old contents, and no request still running can bring them back.
//!
//! Locking: one mutex around the kept clusters, held to look one up and copy from it, or to
//! swap one in; nothing under it panics.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::buffers::{AlignedBuf, BufPool};
use crate::direct::Epochs;

/// How many decompressed clusters an image keeps: each is a cluster of resident memory (64 KiB
/// for the usual size), counted in the VMM's memory beyond guest RAM. In a Debian boot from a
/// compressed base (1413 reads of 692 compressed clusters), one kept saved 299 decompressions,
/// four 421, eight 491, for 192 and 448 KiB more: not worth it where the whole VMM, beyond
/// guest RAM, fits in 5 MiB.
pub const KEPT: usize = 1;

/// The kept clusters (see the module documentation).
#[derive(Debug, Default)]
pub struct Decompressed {
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    /// [`Epochs::reuses`] when the clusters kept were checked last.
    reuses: u64,
    /// (host offset of the stream, the cluster decompressed), the most recently used last.
    kept: Vec<(u64, AlignedBuf)>,
}

impl Decompressed {
    /// The kept clusters, all dropped (their buffers given to `pool`) if freed clusters became
    /// reusable since they were last checked.
    fn slots(&self, epochs: &Epochs, pool: &BufPool) -> MutexGuard<'_, Slots> {
        let mut s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let now = epochs.reuses();
        if s.reuses != now {
            s.reuses = now;
            for (_, buf) in s.kept.drain(..) {
                pool.give(buf);
            }
        }
        s
    }

    /// Copies `out.len()` bytes at `at` of the cluster decompressed from the stream at `host`
    /// into `out`, if it is kept; `cluster` is the cluster size.
    pub fn read(
        &self,
        epochs: &Epochs,
        pool: &BufPool,
        host: u64,
        cluster: usize,
        at: usize,
        out: &mut [u8],
    ) -> bool {
        let mut s = self.slots(epochs, pool);
        let Some(i) = s.kept.iter().position(|(h, _)| *h == host) else {
            return false;
        };
        let entry = s.kept.remove(i);
        out.copy_from_slice(&entry.1.as_slice()[..cluster][at..at + out.len()]);
        s.kept.push(entry);
        true
    }

    /// Keeps `buf`, the cluster just decompressed from the stream at `host` by a request still
    /// holding its pin, in place of the least recently used one (whose buffer goes to `pool`).
    pub fn keep(&self, epochs: &Epochs, pool: &BufPool, host: u64, buf: AlignedBuf) {
        let mut s = self.slots(epochs, pool);
        if s.kept.iter().any(|(h, _)| *h == host) {
            // Another request decompressed it meanwhile.
            drop(s);
            pool.give(buf);
            return;
        }
        let evicted = (s.kept.len() == KEPT).then(|| s.kept.remove(0));
        s.kept.push((host, buf));
        drop(s);
        if let Some((_, old)) = evicted {
            pool.give(old);
        }
    }
}
