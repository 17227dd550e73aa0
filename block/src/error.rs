//! The block crate's public error: a small stable kind that callers match on (a virtio-blk device
//! maps it to a request status), with the operation's context and the cause.

use std::io;

use crate::qcow2::FormatError;

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
    /// Opening a host file failed.
    #[error("cannot open {path}")]
    Open {
        /// The host file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A host file that cannot hold an image: neither a regular file nor a block device.
    #[error("{path} is a {kind}, not a regular file or block device")]
    NotAnImage {
        /// The host file.
        path: String,
        /// Its type ("FIFO", "directory", "socket", ...).
        kind: &'static str,
    },
    /// A new image would name itself as its backing file, directly or through its chain.
    #[error("{path} would be its own backing file ({backing})")]
    OwnBacking {
        /// The new image.
        path: String,
        /// The backing file name that resolves to it.
        backing: String,
    },
    /// A raw image asked to name a backing file.
    #[error("{path} is raw: it cannot have a backing file")]
    BackingOfRaw {
        /// The image.
        path: String,
    },
    /// Reading the metadata of a host file (its size) failed.
    #[error("cannot stat {path}")]
    Stat {
        /// The host file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a host file failed.
    #[error("cannot create {path}")]
    Create {
        /// The host file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting or testing an OFD lock failed for a reason other than a conflict.
    #[error("cannot lock {path}")]
    Lock {
        /// The host file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds a lock that conflicts with this open (QEMU's lock byte ranges).
    #[error("{path} is locked: another process is using the image for {perm}")]
    Locked {
        /// The host file.
        path: String,
        /// The permission the other process holds or refuses to share (always "write": the only
        /// one these locks refuse).
        perm: &'static str,
    },
    /// The image's qcow2 metadata is malformed or uses something unsupported.
    #[error("{path}")]
    Format {
        /// The image file.
        path: String,
        /// What is wrong with it.
        #[source]
        source: FormatError,
    },
    /// A backing chain names an image that is already in the chain.
    #[error("backing chain loops: {path} appears twice")]
    BackingLoop {
        /// The image named a second time.
        path: String,
    },
    /// A backing chain deeper than the engine opens.
    #[error("backing chain of {path} is deeper than {max} images")]
    BackingTooDeep {
        /// The top image.
        path: String,
        /// The depth limit.
        max: usize,
    },
    /// Opening the backing image of an overlay failed.
    #[error("cannot open backing image {backing} of {path}")]
    Backing {
        /// The overlay.
        path: String,
        /// The backing image's resolved path.
        backing: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// An overlay names a backing image with no format, and the file could not be opened as raw
    /// safely (it carries a qcow2 header, which a guest could have written).
    #[error(
        "backing image {name} of {path} has no format and looks like qcow2: refusing to probe; \
         if it is a qcow2 image, record that with: vmm-img rebase -u -b {name} -F qcow2 {path}"
    )]
    BackingProbe {
        /// The overlay.
        path: String,
        /// The backing file name as the overlay stores it (resolved against its directory).
        name: String,
    },
    /// An image of a format QEMU reads and this engine does not.
    #[error(
        "{path} is a {} image, which this engine does not read; convert it to qcow2 with: {}",
        format.name(),
        format.convert_line(std::path::Path::new(path))
    )]
    ForeignFormat {
        /// The image file.
        path: String,
        /// Its format.
        format: crate::Foreign,
    },
    /// Growing a qcow2 image would need an L1 table larger than QEMU opens.
    #[error("growing {path} to {size} bytes needs an L1 table larger than QEMU opens (32 MiB)")]
    L1Growth {
        /// The image file.
        path: String,
        /// The size asked for.
        size: u64,
    },
    /// Growing a v2 qcow2 image with internal snapshots, whose snapshots record no disk size.
    #[error("{path} is a v2 image with snapshots, which cannot be resized")]
    V2Snapshots {
        /// The image file.
        path: String,
    },
    /// Growing an image to a size below its own.
    #[error("{path} is {size} bytes: growing it to {new_size} would shrink it")]
    Shrink {
        /// The image file.
        path: String,
        /// Its virtual size.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// A refcount width that cannot be set.
    #[error("cannot change the refcount width of {path}")]
    RefcountWidth {
        /// The image file.
        path: String,
        /// Why not.
        source: crate::qcow2::amend::RefcountWidthError,
    },
    /// A compressed write that cannot be made.
    #[error("compressed write at offset {offset} of {path}: {why}")]
    CompressedWrite {
        /// The image file.
        path: String,
        /// The guest offset.
        offset: u64,
        /// Why not.
        why: &'static str,
    },
    /// A snapshot operation refused.
    #[error("{path}")]
    Snapshot {
        /// The image file.
        path: String,
        /// Why.
        #[source]
        source: crate::qcow2::snapshot::SnapshotError,
    },
    /// An invalid option for creating an image.
    #[error("invalid image option: {0}")]
    InvalidOption(String),
    /// Image metadata needs more memory than the engine allows for one structure.
    #[error("{path}: {what} of {bytes} bytes exceeds the engine's limit")]
    TooLarge {
        /// The image file.
        path: String,
        /// The structure.
        what: &'static str,
        /// Its size.
        bytes: u64,
    },
    /// Metadata cache sizes that contradict each other, or that the image cannot take.
    #[error("{path}")]
    CacheSize {
        /// The image file.
        path: String,
        /// What is wrong.
        #[source]
        source: crate::qcow2::CacheSizeError,
    },
    /// A writable image without a format that probes as raw, where guessing raw is refused.
    #[error("{path} has no format and looks raw: refusing to probe a writable raw image")]
    UnsafeProbe {
        /// The image file.
        path: String,
    },
    /// Reopening an open image by its name found another file there.
    #[error("{path} is no longer the file that was opened by that name")]
    Replaced {
        /// The name.
        path: String,
    },
}

impl Error {
    /// The stable category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. }
            | Error::Open { .. }
            | Error::Stat { .. }
            | Error::Create { .. }
            | Error::Lock { .. }
            | Error::Replaced { .. } => ErrorKind::Io,
            Error::OutOfRange { .. }
            | Error::ReadOnly
            | Error::InvalidOption(_)
            | Error::Snapshot { .. }
            | Error::CompressedWrite { .. }
            | Error::CacheSize { .. }
            | Error::OwnBacking { .. }
            | Error::BackingOfRaw { .. } => ErrorKind::InvalidRequest,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::UnsafeProbe { .. } => ErrorKind::Unsupported,
            Error::Format { source, .. } => source.kind(),
            Error::BackingTooDeep { .. }
            | Error::BackingProbe { .. }
            | Error::ForeignFormat { .. }
            | Error::L1Growth { .. }
            | Error::Shrink { .. }
            | Error::V2Snapshots { .. }
            | Error::TooLarge { .. }
            | Error::RefcountWidth { .. }
            | Error::NotAnImage { .. } => ErrorKind::Unsupported,
            Error::BackingLoop { .. } => ErrorKind::Corrupt,
            Error::Backing { source, .. } => source.kind(),
        }
    }
}
