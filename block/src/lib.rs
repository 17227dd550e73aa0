//! Disk image formats behind one trait: raw and qcow2 (with backing chains), and the rules for
//! creating, checking and converting them. Knows nothing of KVM or virtio.

pub mod aio;
mod error;
pub mod file;
mod image;
mod lock;
mod open;
pub mod qcow2;
mod raw;

pub use error::{Error, ErrorKind};
pub use file::CacheMode;
pub use image::{Allocation, BlockStatus, DiskImage};
pub use open::{create, open, probe, Format, Image, OpenOptions};
pub use raw::Raw;

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}
