//! virtio-blk (virtio 1.2, 5.2 "Block Device"): read, write, flush, get-id, discard and
//! write-zeroes on a [`block::DiskImage`], several queues, indirect descriptors and event idx.
//!
//! Files: `device.rs` (the device: features, configuration space, activation, reset and drain),
//! `request.rs` (descriptor chains to requests), `event_handler.rs` (the work done in the
//! device's context: queue notifications, submission to the worker pool, completions),
//! `stats.rs` (I/O statistics under QEMU's `query-blockstats` names).
//!
//! Threads and locks: the device is served in one context (the main loop's or an iothread's);
//! its state is behind a mutex that is only taken with that context held, so it is never
//! contended. Image I/O goes through `block::aio`, so the context never blocks on the disk.

mod device;
mod event_handler;
mod request;
pub mod stats;

pub use device::{Block, BlockConfig, Error};
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

#[cfg(test)]
mod test_util;
