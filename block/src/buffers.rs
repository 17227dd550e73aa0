//! Buffers for I/O that needs memory of its own (bounces for `O_DIRECT`, compressed clusters),
//! kept so that a burst of requests leaves no memory behind.
//!
//! An [`AlignedBuf`] of [`MAP_MIN`] bytes or more is an anonymous mapping of its own rather than a
//! heap allocation: its pages cost nothing until written, and go back to the host when it is
//! dropped. A heap allocation of that size would be zeroed (touched) in full when made, and,
//! freed by one of many worker threads, would stay in that thread's allocator arena. A smaller
//! one (an unaligned sector, a metadata table) comes from the heap: a mapping's `munmap` would
//! cost a TLB shootdown across the process's threads, vCPUs included, for every small copy.
//!
//! A block job keeps one [`AlignedBuf`] for its whole run: its reads and writes through the
//! images go straight to the files, with no bounce (and no mapping made and unmapped) per step.
//!
//! A [`BufPool`] lends buffers to whoever needs one for a request and keeps a few of those given
//! back (`keep`), so that steady-state I/O reuses them and a burst of concurrent requests, each
//! with a buffer of its own, leaves at most `keep` behind. Locking: one mutex around the kept
//! buffers, held only to push or pop one.

use std::alloc::{handle_alloc_error, Layout};
use std::sync::{Mutex, PoisonError};

/// Alignment and granularity used for `O_DIRECT` I/O: 4 KiB covers every logical block size
/// Linux supports, at the cost of a little extra I/O on 512-byte devices.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// Buffers this large or larger are mappings of their own; smaller ones come from the heap.
const MAP_MIN: usize = 64 << 10;

/// A zero-filled buffer aligned for `O_DIRECT`, from the heap or mapped for itself alone (see
/// the module documentation).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its mapping exclusively; nothing else holds its address.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 4 KiB, the alignment `O_DIRECT` needs).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(DIRECT_ALIGN);
        if len < MAP_MIN {
            let layout = Self::heap_layout(len);
            // SAFETY: the layout has a non-zero size (at least DIRECT_ALIGN); the result is
            // checked below.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                handle_alloc_error(layout);
            }
            return AlignedBuf { ptr, len };
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
        // existing memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            // Out of address space or memory, as an allocation failure would be. The layout is
            // only what the message names; `len` is a request's, far below isize::MAX.
            handle_alloc_error(
                Layout::from_size_align(len, DIRECT_ALIGN).unwrap_or(Layout::new::<u8>()),
            );
        }
        // Mappings start on a page boundary, and pages are at least DIRECT_ALIGN bytes.
        AlignedBuf {
            ptr: ptr.cast(),
            len,
        }
    }

    /// The layout of a heap buffer of `len` bytes (`len` below [`MAP_MIN`]).
    fn heap_layout(len: usize) -> Layout {
        // A power-of-two alignment and a size far below isize::MAX: always a valid layout.
        Layout::from_size_align(len, DIRECT_ALIGN).expect("a small aligned layout")
    }

    /// The buffer's length in bytes.
    #[allow(clippy::len_without_is_empty)] // Never empty: at least DIRECT_ALIGN bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The whole buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to len initialised (zero-filled by the kernel) bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The whole buffer, to read.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len < MAP_MIN {
            // SAFETY: ptr was allocated in `zeroed` with this same layout (len decides both)
            // and is freed once; no slice of it outlives the buffer.
            unsafe { std::alloc::dealloc(self.ptr, Self::heap_layout(self.len)) };
            return;
        }
        // SAFETY: ptr..ptr+len is this buffer's own mapping, unmapped once; no slice of it
        // outlives the buffer. munmap only fails for an invalid range, which this is not.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Buffers lent to requests, a few kept between them; see the module documentation.
pub(crate) struct BufPool {
    /// How many given-back buffers are kept.
    keep: usize,
    /// The buffers kept.
    kept: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    /// A pool keeping at most `keep` buffers between requests.
    pub(crate) fn new(keep: usize) -> BufPool {
        BufPool {
            keep,
            kept: Mutex::new(Vec::with_capacity(keep)),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        // Only pushes and pops run under the lock, and neither panics.
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A buffer of at least `len` bytes: a kept one if one is large enough, else a new one.
    /// Its bytes are whatever its last user left there.
    pub(crate) fn take(&self, len: usize) -> AlignedBuf {
        let mut kept = self.kept();
        match kept.iter().position(|b| b.len() >= len) {
            Some(i) => kept.swap_remove(i),
            None => {
                drop(kept);
                AlignedBuf::zeroed(len)
            }
        }
    }

    /// Gives `buf` back: kept if fewer than `keep` are, else freed (its memory returns to the
    /// host).
    pub(crate) fn give(&self, buf: AlignedBuf) {
        let mut kept = self.kept();
        if kept.len() < self.keep {
            kept.push(buf);
        }
    }

    /// How many buffers are kept now.
    #[cfg(test)]
    pub(crate) fn kept_count(&self) -> usize {
        self.kept().len()
    }
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufPool(keep {})", self.keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_at_least_a_block() {
        // From the heap, at the bound, and mapped.
        for (asked, len) in [
            (100, DIRECT_ALIGN),
            (MAP_MIN - 1, MAP_MIN - 1),
            (MAP_MIN, MAP_MIN),
        ] {
            let mut b = AlignedBuf::zeroed(asked);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_mut_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
            assert!(b.as_mut_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(0xa5);
        }
    }

    #[test]
    fn a_pool_reuses_what_fits_and_keeps_no_more_than_asked() {
        let pool = BufPool::new(2);
        let mut a = pool.take(8192);
        let at = a.as_mut_slice().as_mut_ptr();
        pool.give(a);
        // A smaller request reuses the kept buffer; a larger one gets a new buffer.
        let small = pool.take(4096);
        assert_eq!(small.ptr, at);
        let big = pool.take(1 << 20);
        assert_eq!(big.len(), 1 << 20);
        assert_eq!(pool.kept_count(), 0);
        let burst: Vec<_> = (0..5).map(|_| pool.take(4096)).collect();
        for b in burst.into_iter().chain([small, big]) {
            pool.give(b);
        }
        assert_eq!(pool.kept_count(), 2);
    }
}
