//! The block crate's public error: a small stable kind that callers match on (a virtio-blk device
//! maps it to a request status), with the operation's context and the cause.

use std::io;

/// What went wrong, in the few categories a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host file system or device failed (EIO, ENOSPC, ...).
    Io,
    /// The request itself is invalid: out of range, misaligned, or a write to a read-only image.
    InvalidRequest,
    /// The image's metadata is malformed or inconsistent.
    Corrupt,
    /// The image uses a feature this engine does not support (for this kind of open).
    Unsupported,
    /// Another process holds a conflicting lock on the image.
    Locked,
}

/// An error from the block layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host I/O call failed.
    #[error("{op} failed on {path} at offset {offset}")]
    Io {
        /// The operation that failed ("read", "write", "flush", ...).
        op: &'static str,
        /// The host file.
        path: String,
        /// The host file offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A request outside the virtual disk.
    #[error("request at offset {offset} length {len} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the virtual disk.
        size: u64,
    },
    /// A write, discard or write-zeroes on an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
}

impl Error {
    /// The stable category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::OutOfRange { .. } | Error::ReadOnly => ErrorKind::InvalidRequest,
        }
    }
}
