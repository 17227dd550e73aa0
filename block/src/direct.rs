//! Direct data I/O: what an engine that submits host file I/O itself (`aio=io_uring`) needs to
//! know from an image, so that a request whose bytes sit at known host offsets bypasses the
//! image's own methods (and the worker pool) without the engine knowing any format.
//!
//! An image offers its host file once ([`DirectTarget`]) and, per request, the host extents of
//! a guest range ([`DiskImage::map_direct`](crate::DiskImage::map_direct)) together with a
//! [`DirectPin`]: while the pin lives, the image does not reuse a host cluster it frees (qcow2
//! quarantines it, as for its own lock-free data I/O), so a mapping handed out stays safe to use
//! until the engine's I/O on it ends. A mapping is only handed out when it is known without
//! blocking (no table read, no lock wait) and, for a write, when the bytes may be written in
//! place (qcow2: allocated, uncompressed, refcount exactly one). Everything else goes through
//! the image's methods on a worker.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Keeps the host clusters of a mapping from being reused until dropped (see the module
/// documentation); images without freeing (raw) hand out an empty pin.
#[derive(Debug)]
pub struct DirectPin(Option<Arc<AtomicU64>>);

impl DirectPin {
    /// A pin that holds nothing.
    pub fn none() -> DirectPin {
        DirectPin(None)
    }

    /// Counts one user of `count` until dropped.
    pub(crate) fn count(count: &Arc<AtomicU64>) -> DirectPin {
        count.fetch_add(1, Ordering::SeqCst);
        DirectPin(Some(Arc::clone(count)))
    }
}

impl Drop for DirectPin {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::SeqCst);
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
    fn a_pin_counts_while_it_lives() {
        let count = Arc::new(AtomicU64::new(0));
        let a = DirectPin::count(&count);
        let b = DirectPin::count(&count);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        drop(a);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        drop(b);
        drop(DirectPin::none());
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
