//! Disk image formats behind one trait: raw and qcow2 (with backing chains), and the rules for
//! creating, checking and converting them. Knows nothing of KVM or virtio.

pub mod aio;
mod buffers;
mod chain;
pub mod direct;
mod error;
pub mod file;
mod image;
mod lock;
mod open;
mod policy;
mod probe;
pub mod qcow2;
mod raw;
pub mod trace;

/// The stack size of every thread the VMM starts (I/O workers, iothreads, vCPUs, job and signal
/// threads): just under a huge page (Rust's default is 2 MiB), where each uses tens of KiB. With
/// transparent huge pages on `always` (Debian 12's kernel; kernels since 6.7 keep stacks out of
/// them), a stack mapping that spans an aligned 2 MiB range is backed by a whole huge page as soon
/// as glibc writes the thread's descriptor at its top, before the thread runs; a 2 MiB stack
/// placed where an allocator arena was (64 MiB-aligned) always does. One smaller than 2 MiB spans
/// none.
pub const THREAD_STACK: usize = (2 << 20) - (64 << 10);

pub use buffers::AlignedBuf;
pub use error::{Error, ErrorKind};
pub use file::{CacheMode, FileId};
pub use image::{Allocation, BlockStatus, DiskImage};
pub use open::{
    create, open, open_named, open_over, probe, reopen_over, reopen_read_only, resolve_backing,
    Exclusive, Format, Image, NewImage, OpenOptions, WritableRaw,
};
pub use policy::{DetectZeroes, WithPolicy, WritePolicy};
pub use probe::Foreign;
pub use raw::Raw;

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes and, for a request
/// that modifies the disk (`write`), that the image is not read-only.
pub(crate) fn check_request(
    offset: u64,
    len: u64,
    size: u64,
    write: bool,
    read_only: bool,
) -> Result<(), Error> {
    if write && read_only {
        return Err(Error::ReadOnly);
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}
