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
