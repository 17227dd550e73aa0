//! virtio-blk (virtio 1.2, 5.2 "Block Device"): read, write, flush, get-id, discard and
//! write-zeroes on a [`block::DiskImage`], several queues, indirect descriptors and event idx.
//!
//! Files: `device.rs` (the device: features, configuration space, activation, reset and drain),
//! `request.rs` (descriptor chains to requests), `event_handler.rs` (the work done in the
//! device's context: queue notifications, submission to the worker pool, completions),
//! `io_error.rs` (what a failed request does: `werror=`/`rerror=`), `stats.rs` (I/O statistics
//! under QEMU's `query-blockstats` names), `stages.rs` (where each request's time goes, per queue
//! and stage), `groups.rs` (the queue groups, each served in its own context), `mapping.rs`
//! (which iothread serves which queue: QEMU's `iothread-vq-mapping`).
//!
//! Threads and locks: the device's queues are served in one context (the main loop's or an
//! iothread's), or split into groups, one per iothread (`iothread-vq-mapping`, rules in
//! `mapping.rs`); each group's state is behind a mutex that is only taken with the group's
//! context held, so it is never contended (`groups.rs` says what the groups share). Image I/O
//! goes through `block::aio`, an engine per group, so no context ever blocks on the disk.

mod device;
mod event_handler;
mod groups;
mod io_error;
pub mod mapping;
mod request;
pub mod stages;
pub mod stats;

pub use device::{Block, BlockConfig, Error};
pub use groups::Engines;
pub use io_error::{errno_of, ErrorAction, ErrorPolicy, ErrorSink, IoErrorEvent, IoStatus};
pub use request::ChainError;

/// virtio device id of a block device (virtio 1.2, 5 "Device Types").
pub const DEVICE_ID: u32 = 2;
/// Sectors are 512 bytes whatever the block size (5.2.6).
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of `virtio_blk_req`'s header: le32 type, le32 reserved, le64 sector (5.2.6).
pub const HEADER_LEN: u64 = 16;
/// Length of the device id string that GET_ID returns (5.2.6: `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
/// Size of one `virtio_blk_discard_write_zeroes` segment (5.2.6).
pub const DISCARD_SEGMENT_LEN: u64 = 16;

/// Feature bits (5.2.3).
pub mod features {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// `topology` is valid.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// `num_queues` is valid.
    pub const MQ: u64 = 1 << 12;
    /// Discard command support; the discard limits are valid.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command support; its limits are valid.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types (5.2.6).
pub mod request_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values (5.2.6).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}

/// The `flags` bit of a discard/write-zeroes segment that allows unmapping (5.2.6).
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Faults of the driver's rings that put the device in DEVICE_NEEDS_RESET (virtio 1.2, 2.1.2).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Suppressing notifications (used ring flags) failed.
    #[error("cannot disable notifications of queue {0}")]
    DisableNotification(usize, #[source] virtio_queue::Error),
    /// Reading the available index failed.
    #[error("cannot read the available index of queue {0}")]
    AvailIdx(usize, #[source] virtio_queue::Error),
    /// The driver made more entries available than the queue holds (2.7.6).
    #[error("available index {avail} of queue {queue} is more than a queue ahead of {next}")]
    AvailOutOfRange {
        /// Queue index.
        queue: usize,
        /// The driver's available index.
        avail: u16,
        /// The next entry the device would take.
        next: u16,
    },
    /// A descriptor chain the device cannot answer.
    #[error("malformed request on queue {0}")]
    Chain(usize, #[source] ChainError),
    /// Writing a request's status byte failed.
    #[error("cannot write the status of request {head} on queue {queue}")]
    WriteStatus {
        /// Queue index.
        queue: usize,
        /// Head descriptor index.
        head: u16,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Adding a used ring entry failed.
    #[error("cannot add request {head} to the used ring of queue {queue}")]
    AddUsed {
        /// Queue index.
        queue: usize,
        /// Head descriptor index.
        head: u16,
        /// The queue error.
        #[source]
        source: virtio_queue::Error,
    },
    /// Re-enabling notifications (used ring flags or `avail_event`) failed.
    #[error("cannot enable notifications of queue {0}")]
    EnableNotification(usize, #[source] virtio_queue::Error),
    /// Reading `used_event` or the available ring flags failed.
    #[error("cannot tell whether queue {0} needs an interrupt")]
    NeedsNotification(usize, #[source] virtio_queue::Error),
    /// The driver made a chain available again while the device still had it (2.7.13).
    #[error("request {head} on queue {queue} made available twice")]
    HeadInFlight {
        /// Queue index.
        queue: usize,
        /// Head descriptor index.
        head: u16,
    },
    /// A completion whose token names no request in flight.
    #[error("completion for unknown request {head} on queue {queue}")]
    UnknownCompletion {
        /// Queue index from the token.
        queue: usize,
        /// Head index from the token.
        head: usize,
    },
}

pub(crate) use crate::error_chain;

#[cfg(test)]
mod bench;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
