//! Direct data I/O: what an engine that submits host file I/O itself (the io_uring ring, and the
//! worker pool's `preadv`/`pwritev`) needs to know from an image, so that a request whose bytes
//! sit at known host offsets bypasses the image's own methods without the engine knowing any
//! format.
//!
//! An image offers its host file once ([`DirectTarget`]) and, per request, the host extents of
//! a guest range ([`DiskImage::map_direct`](crate::DiskImage::map_direct)) together with a
//! [`DirectPin`]: while the pin lives, the image does not reuse a host cluster it frees (qcow2
//! quarantines it, as for its own lock-free data I/O), so a mapping handed out stays safe to use
//! until the engine's I/O on it ends. Pins count themselves in epochs ([`Epochs`]), so a freed
//! cluster becomes reusable as soon as the requests that began before its release have ended,
//! even while newer requests keep the disk busy. A mapping is only handed out when it is known without
//! blocking (no table read, no lock wait) and, for a write, when the bytes may be written in
//! place (qcow2: allocated, uncompressed, refcount exactly one). Everything else goes through
//! the image's methods on a worker.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Most host extents one request may map to; a request more fragmented than that goes through
/// the image's methods instead.
pub const MAX_EXTENTS: usize = 32;

/// How a flush reaches the disk when the engine does it itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPlan {
    /// Nothing to do (a read-only image, or `cache=unsafe`).
    Skip,
    /// A data sync (`fdatasync`) of the host file is the whole flush (raw images).
    SyncData,
    /// The image must flush itself (qcow2 writes back metadata first).
    Image,
}

/// The host file behind an image's data.
#[derive(Debug, Clone)]
pub struct DirectTarget {
    /// Its descriptor, valid as long as the image is.
    pub fd: RawFd,
    /// Opened with `O_DIRECT`: offsets, lengths and buffer addresses must be multiples of
    /// [`DirectTarget::ALIGN`].
    pub aligned: bool,
    /// Its path, for error messages.
    pub path: String,
    /// What a flush takes.
    pub flush: FlushPlan,
}

impl DirectTarget {
    /// The alignment `O_DIRECT` I/O keeps to (the one [`crate::file::HostFile`] uses).
    pub const ALIGN: u64 = crate::file::DIRECT_ALIGN as u64;
}

/// A contiguous run of host file bytes holding a contiguous run of a request's guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Host file offset.
    pub host: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Grace periods for the host clusters an image frees while requests may still use them, as
/// epoch-based reclamation does: each pin counts itself in the epoch current when it began, and
/// a cluster released in epoch `E` is reusable once the epoch reached `E + 2`
/// ([`Epochs::is_past`]).
///
/// The epoch moves from `E` to `E + 1` only when no pin of epoch `E - 1` is left, so reaching
/// `E + 2` means every pin of epoch `E` or older has ended. Pins of the current and the previous
/// epoch are all there can be, so two counters suffice, one per epoch parity. A pin counts
/// itself, then checks that the epoch did not move meanwhile (else it counts itself again in the
/// new one), so a counted pin's epoch was current after it was counted: any mapping it looks up
/// afterwards is one that a release in its epoch or later may have dropped, never an older one.
/// The epoch moves on when the owner asks ([`Epochs::advance`]) and, while the owner waits for
/// it ([`Epochs::set_waiting`]), whenever a pin count drops to zero; from any thread (a
/// compare-and-swap, so it never goes back).
#[derive(Debug, Default)]
pub struct Epochs {
    current: AtomicU64,
    pins: [AtomicU64; 2],
    /// Releases wait for the epoch to move: ending pins move it on.
    waiting: AtomicBool,
    /// How many times freed clusters became reusable (see [`Epochs::reuses`]).
    reuses: AtomicU64,
}

impl Epochs {
    /// The current epoch.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Moves to the next epoch if no pin of the previous one is left; returns the current epoch.
    pub fn advance(&self) -> u64 {
        let e = self.current.load(Ordering::SeqCst);
        if self.pins[Self::slot(e + 1)].load(Ordering::SeqCst) != 0 {
            return e;
        }
        match self
            .current
            .compare_exchange(e, e + 1, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => e + 1,
            Err(now) => now,
        }
    }

    /// Says whether releases wait for the epoch to move (so that pins ending move it on).
    pub fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    /// Whether every pin that could reach a cluster released in `epoch` has ended.
    pub fn is_past(&self, epoch: u64) -> bool {
        self.current() >= epoch.saturating_add(2)
    }

    /// Counts freed clusters becoming reusable, before any of them is handed out again.
    pub fn note_reuse(&self) {
        self.reuses.fetch_add(1, Ordering::SeqCst);
    }

    /// How many times freed clusters became reusable: a compressed stream (never written in
    /// place) read while this stays the same is still what its host offset holds.
    pub fn reuses(&self) -> u64 {
        self.reuses.load(Ordering::SeqCst)
    }

    fn slot(epoch: u64) -> usize {
        usize::from(epoch % 2 == 1)
    }
}

/// Keeps the host clusters of a mapping from being reused until dropped (see the module
/// documentation); images without freeing (raw) hand out an empty pin.
#[derive(Debug)]
pub struct DirectPin(Option<(Arc<Epochs>, usize)>);

impl DirectPin {
    /// A pin that holds nothing.
    pub fn none() -> DirectPin {
        DirectPin(None)
    }

    /// Counts one user in the current epoch of `epochs` until dropped; take it before looking
    /// up the mapping it protects.
    pub(crate) fn enter(epochs: &Arc<Epochs>) -> DirectPin {
        loop {
            let e = epochs.current();
            let slot = Epochs::slot(e);
            epochs.pins[slot].fetch_add(1, Ordering::SeqCst);
            if epochs.current() == e {
                return DirectPin(Some((Arc::clone(epochs), slot)));
            }
            epochs.pins[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for DirectPin {
    fn drop(&mut self) {
        if let Some((epochs, slot)) = &self.0 {
            if epochs.pins[*slot].fetch_sub(1, Ordering::SeqCst) == 1
                && epochs.waiting.load(Ordering::Relaxed)
            {
                epochs.advance();
            }
        }
    }
}

/// Appends `len` bytes at `host` to `extents`, merging with the last one when contiguous;
/// `false` when that would exceed [`MAX_EXTENTS`].
pub(crate) fn push_extent(extents: &mut Vec<Extent>, host: u64, len: u64) -> bool {
    let full = extents.len() >= MAX_EXTENTS;
    match extents.last_mut() {
        Some(last) if last.host.checked_add(last.len) == Some(host) => {
            last.len += len;
            true
        }
        _ if full => false,
        _ => {
            extents.push(Extent { host, len });
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_when_contiguous_and_stop_at_the_limit() {
        let mut e = Vec::new();
        assert!(push_extent(&mut e, 4096, 512));
        assert!(push_extent(&mut e, 4608, 512));
        assert_eq!(
            e,
            vec![Extent {
                host: 4096,
                len: 1024
            }]
        );
        for i in 1..MAX_EXTENTS as u64 {
            assert!(push_extent(&mut e, i * 65536, 512));
        }
        assert_eq!(e.len(), MAX_EXTENTS);
        assert!(!push_extent(&mut e, 1 << 30, 512));
        // Contiguous with the last one still merges at the limit.
        let last = *e.last().expect("extents were pushed");
        assert!(push_extent(&mut e, last.host + last.len, 512));
    }

    #[test]
    fn a_release_waits_for_older_pins_only() {
        let epochs = Arc::new(Epochs::default());
        epochs.set_waiting(true);
        let old = DirectPin::enter(&epochs);
        assert_eq!(epochs.advance(), 1);
        // A cluster released now could still be in use by `old`.
        let released = epochs.current();
        let newer = DirectPin::enter(&epochs);
        // `old` (epoch 0) holds the epoch at 1.
        assert_eq!(epochs.advance(), 1);
        assert!(!epochs.is_past(released));
        // The last pin of epoch 0 moves the epoch on as it ends.
        drop(old);
        assert_eq!(epochs.current(), 2);
        // `newer` began in epoch 1, when the cluster may already have been unmapped but not
        // yet released: it holds the release back too.
        assert_eq!(epochs.advance(), 2);
        assert!(!epochs.is_past(released));
        let newest = DirectPin::enter(&epochs);
        drop(newer);
        // Pins that began after the release do not hold it.
        assert_eq!(epochs.current(), 3);
        assert!(epochs.is_past(released));
        drop(newest);
        drop(DirectPin::none());
        assert_eq!(
            epochs.pins.each_ref().map(|p| p.load(Ordering::SeqCst)),
            [0, 0]
        );
    }
}
