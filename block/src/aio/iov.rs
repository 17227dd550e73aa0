//! A request's buffers as the engines use them: never as Rust references. The memory behind an
//! [`IoSeg`] is guest memory, which the guest writes concurrently and may hand to two requests
//! at once (or place a queue's rings inside), so a `&[u8]` or `&mut [u8]` over it would be
//! undefined behaviour whatever the bytes are. The engines therefore either hand the segments to
//! the kernel as iovecs ([`build_parts`], with `preadv`/`pwritev` in the pool or readv/writev on
//! the ring), or copy between them and an owned bounce buffer with raw pointer copies
//! ([`gather`], [`scatter`]), as vm-memory's volatile slices do.

use std::io;
use std::os::fd::RawFd;

use super::IoSeg;
use crate::direct::{DirectTarget, Extent};
use crate::Error;

/// Most iovecs one submission may carry (Linux's `UIO_MAXIOV`).
pub(super) const MAX_IOVECS: usize = 1024;

/// An iovec array for one host extent.
#[derive(Debug, Default)]
pub(super) struct Iovecs(pub(super) Vec<libc::iovec>);

// SAFETY: the iovecs describe `IoSeg` ranges, which their submitter promised stay valid until the
// request's completion is reaped, whichever thread uses them meanwhile (see `IoSeg::new`).
unsafe impl Send for Iovecs {}

/// One host extent of a request and the buffer pieces that fill or drain it.
#[derive(Debug, Default)]
pub(super) struct Part {
    /// Host offset of the first byte not yet transferred.
    pub(super) host: u64,
    /// The buffer pieces not yet transferred (the first one advanced past what was).
    pub(super) iov: Iovecs,
    /// Index of the first piece not yet transferred.
    pub(super) first: usize,
}

impl Part {
    /// The pieces not yet transferred.
    pub(super) fn pending(&self) -> &[libc::iovec] {
        &self.iov.0[self.first..]
    }

    /// Bytes left to transfer.
    pub(super) fn remaining(&self) -> u64 {
        self.pending().iter().map(|v| v.iov_len as u64).sum()
    }

    /// Moves past `n` transferred bytes.
    pub(super) fn advance(&mut self, mut n: usize) {
        self.host += n as u64;
        while n > 0 {
            let Some(v) = self.iov.0.get_mut(self.first) else {
                return;
            };
            let step = n.min(v.iov_len);
            // SAFETY: `step` is within the piece, so the pointer stays inside its range.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(step) }.cast();
            v.iov_len -= step;
            n -= step;
            if v.iov_len == 0 {
                self.first += 1;
            }
        }
    }

    /// Fills the bytes not yet transferred with zeroes (a read past the end of the host file).
    pub(super) fn zero_rest(&mut self) {
        for v in &mut self.iov.0[self.first..] {
            // SAFETY: the piece is a range of an `IoSeg`, valid for writes until the completion
            // is reaped, and no transfer of it is in flight any more. A raw write forms no
            // reference, so the guest touching the bytes meanwhile is no concern of Rust's.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            v.iov_len = 0;
        }
        self.first = self.iov.0.len();
    }

    /// Transfers the whole part with `preadv`/`pwritev` on `fd`, retrying short transfers; a
    /// read that meets the end of the file fills the rest with zeroes (as
    /// [`crate::file::HostFile`] does), a write that makes no progress is an error.
    pub(super) fn transfer(&mut self, fd: RawFd, write: bool, path: &str) -> Result<(), Error> {
        while self.first < self.iov.0.len() {
            let iov = self.pending();
            // At most MAX_IOVECS pieces (checked when the parts were built).
            let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
            let err = |source| Error::Io {
                op: if write { "write" } else { "read" },
                path: path.to_owned(),
                offset: self.host,
                source,
            };
            let offset = libc::off_t::try_from(self.host)
                .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
            // SAFETY: the iovecs describe `IoSeg` ranges, valid for reads and writes until the
            // request's completion is reaped; the kernel accesses them, no Rust reference is
            // formed. `fd` is the image's host file, which outlives its requests. One piece
            // (the common case) takes the cheaper single-buffer call.
            let n = unsafe {
                match (iov, write) {
                    ([one], true) => libc::pwrite(fd, one.iov_base, one.iov_len, offset),
                    ([one], false) => libc::pread(fd, one.iov_base, one.iov_len, offset),
                    (_, true) => libc::pwritev(fd, iov.as_ptr(), count, offset),
                    (_, false) => libc::preadv(fd, iov.as_ptr(), count, offset),
                }
            };
            match usize::try_from(n) {
                Ok(0) if write => return Err(err(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(0) => self.zero_rest(),
                Ok(n) => self.advance(n),
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(err(e));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Splits `segs` along `extents` into `parts` (one per extent, grown as needed); `false` when a
/// part would need more than [`MAX_IOVECS`] pieces, the segments are shorter than the
/// extents, or `O_DIRECT` alignment (`aligned`) does not hold for an offset, a length or an
/// address.
pub(super) fn build_parts(
    parts: &mut Vec<Part>,
    segs: &[IoSeg],
    extents: &[Extent],
    aligned: bool,
) -> bool {
    let align = DirectTarget::ALIGN;
    let misaligned = |v: u64| aligned && !v.is_multiple_of(align);
    if parts.len() < extents.len() {
        parts.resize_with(extents.len(), Part::default);
    }
    let mut segs = segs.iter();
    let mut seg = segs.next().map(|s| (s.ptr, s.len));
    for (extent, part) in extents.iter().zip(parts.iter_mut()) {
        if misaligned(extent.host) || misaligned(extent.len) {
            return false;
        }
        part.host = extent.host;
        part.first = 0;
        part.iov.0.clear();
        let mut want = extent.len;
        while want > 0 {
            let Some((ptr, len)) = seg.filter(|&(_, len)| len > 0) else {
                seg = segs.next().map(|s| (s.ptr, s.len));
                if seg.is_none() {
                    return false;
                }
                continue;
            };
            let take = usize::try_from(want).unwrap_or(usize::MAX).min(len);
            if misaligned(ptr as usize as u64)
                || misaligned(take as u64)
                || part.iov.0.len() == MAX_IOVECS
            {
                return false;
            }
            part.iov.0.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: take,
            });
            // SAFETY: `take` is within the segment, so the pointer stays inside its range.
            seg = Some((unsafe { ptr.add(take) }, len - take));
            want -= take as u64;
        }
    }
    true
}

/// Calls `f` with each piece of `segs` covering `len` bytes from `skip` bytes in, and the
/// position of the piece in that range.
fn pieces(segs: &[IoSeg], mut skip: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(len - done);
        // SAFETY: `skip` is within the segment, so the pointer stays inside its range.
        f(unsafe { s.ptr.add(skip) }, take, done);
        skip = 0;
        done += take;
    }
}

/// Copies `out.len()` bytes of `segs`, from `skip` bytes in, into `out` (bytes past the
/// segments are left as they are).
pub(super) fn gather(segs: &[IoSeg], skip: usize, out: &mut [u8]) {
    let len = out.len();
    pieces(segs, skip, len, |ptr, n, at| {
        // SAFETY: `ptr..ptr + n` lies in an `IoSeg`, valid for reads until the request's
        // completion is reaped; `out[at..at + n]` is in bounds (`pieces` covers at most `len`
        // bytes) and owned by the caller, so the two do not overlap. The copy reads through a
        // raw pointer: no reference to guest memory is formed.
        unsafe { std::ptr::copy_nonoverlapping(ptr.cast_const(), out.as_mut_ptr().add(at), n) }
    });
}

/// Copies `data` into `segs` from `skip` bytes in (as much as the segments hold).
pub(super) fn scatter(data: &[u8], segs: &[IoSeg], skip: usize) {
    pieces(segs, skip, data.len(), |ptr, n, at| {
        // SAFETY: as in `gather`, the other way round: `ptr..ptr + n` is valid for writes and
        // `data[at..at + n]` is in bounds, owned by the caller.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(at), ptr, n) }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_extents_and_advance_past_short_transfers() {
        let mut a = vec![0u8; 3000];
        let mut b = vec![0u8; 5000];
        // SAFETY: the buffers outlive the segments and are only read after them.
        let segs = unsafe {
            vec![
                IoSeg::new(a.as_mut_ptr(), a.len()),
                IoSeg::new(b.as_mut_ptr(), b.len()),
            ]
        };
        let extents = [
            Extent {
                host: 65536,
                len: 4096,
            },
            Extent { host: 0, len: 3904 },
        ];
        let mut parts = Vec::new();
        assert!(build_parts(&mut parts, &segs, &extents, false));
        let lens = |p: &Part| p.iov.0.iter().map(|v| v.iov_len).collect::<Vec<_>>();
        assert_eq!(lens(&parts[0]), vec![3000, 1096]);
        assert_eq!(lens(&parts[1]), vec![3904]);
        let p = &mut parts[0];
        p.advance(3100);
        assert_eq!((p.host, p.first, p.remaining()), (65536 + 3100, 1, 996));
        p.zero_rest();
        assert_eq!(p.remaining(), 0);
        // Not page aligned: refused for O_DIRECT.
        assert!(!build_parts(&mut parts, &segs, &extents, true));
        // Extents longer than the buffers: refused.
        let long = [Extent { host: 0, len: 9000 }];
        assert!(!build_parts(&mut parts, &segs, &long, false));
    }

    #[test]
    fn gather_and_scatter_cross_segments_from_an_offset() {
        let mut a = [1u8, 2, 3];
        let mut b = [4u8, 5, 6, 7];
        // SAFETY: the arrays outlive the segments and are only read after the last copy.
        let segs = unsafe {
            [
                IoSeg::new(a.as_mut_ptr(), a.len()),
                IoSeg::new(b.as_mut_ptr(), b.len()),
            ]
        };
        let mut out = [0u8; 4];
        gather(&segs, 2, &mut out);
        assert_eq!(out, [3, 4, 5, 6]);
        let mut short = [9u8; 4];
        gather(&segs, 5, &mut short);
        assert_eq!(short, [6, 7, 9, 9]);
        scatter(&[10, 11, 12, 13, 14, 15], &segs, 2);
        assert_eq!((a, b), ([1, 2, 10], [11, 12, 13, 14]));
    }
}
