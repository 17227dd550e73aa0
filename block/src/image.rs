//! The one trait every disk image format implements, and the answers it gives.
//!
//! Every method takes `&self`: an image is shared between the thread that serves a disk's requests
//! and the threads that read its state (the monitor, a converter). Implementations lock only their
//! metadata; independent data I/O never serializes on one lock.

use std::fmt;

use crate::direct::{DirectPin, DirectTarget, Extent};
use crate::Error;

/// What a range of the virtual disk holds, for `map`, `convert` and block status queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this image, at the given host offset of its file when it has one
    /// (`None` for compressed clusters, whose data has no single host offset).
    Data { host_offset: Option<u64> },
    /// Reads as zeroes, known without reading (a zero cluster, or unallocated with no backing image).
    Zero,
    /// Not allocated here: reads come from the backing image.
    Backing,
}

/// The status of a run of bytes starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// What the run holds.
    pub allocation: Allocation,
    /// Length in bytes of the run with that status (at least 1, at most the queried length).
    pub len: u64,
}

/// A disk image: positional reads and writes of the guest-visible (virtual) disk.
pub trait DiskImage: Send + Sync + fmt::Debug {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;

    /// Whether the image was opened read-only.
    fn read_only(&self) -> bool;

    /// Fills `buf` from the virtual disk at `offset`. The range must lie within `size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error>;

    /// Writes `buf` to the virtual disk at `offset`. The range must lie within `size()`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error>;

    /// Makes every completed write durable (metadata included).
    fn flush(&self) -> Result<(), Error>;

    /// Drops the data of a range: it reads back as zeroes or, for an overlay, from its backing
    /// image as QEMU does. Parts smaller than the image's granularity may be left as they are.
    fn discard(&self, offset: u64, len: u64) -> Result<(), Error>;

    /// Makes a range read back as zeroes; `may_unmap` allows freeing the space behind it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Error>;

    /// What the bytes at `offset` hold, and for how many bytes from there that stays true
    /// (at most `len`).
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error>;

    /// The host file an engine may address directly (the io_uring ring, the worker pool), or
    /// `None` when every request must go through the methods above.
    fn direct_target(&self) -> Option<DirectTarget> {
        None
    }

    /// The host extents of `[offset, offset + len)` in [`DiskImage::direct_target`]'s file, in
    /// disk order, appended to `extents`, when they are known without blocking and may be read
    /// (or, with `write`, written in place) there until the returned pin is dropped. `None`
    /// (with `extents` in any state) sends the request through the methods above, which also
    /// report its errors.
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        let _ = (offset, len, write, extents);
        None
    }
}
