//! Disk image formats behind one trait: raw and qcow2 (with backing chains), and the rules for
//! creating, checking and converting them. Knows nothing of KVM or virtio.

pub mod aio;
mod error;
mod image;

pub use error::{Error, ErrorKind};
pub use image::{Allocation, BlockStatus, DiskImage};
