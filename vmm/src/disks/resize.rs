//! Growing a running disk (QMP `block_resize`): its image grows, its virtio-blk device shows the
//! new capacity, and the guest is told through a configuration-change interrupt, so a Linux
//! guest sees the new size without a reboot (`lsblk`, `/sys/block/vdX/size`).
//!
//! In order, as QEMU's `qmp_block_resize` and `bdrv_co_truncate` check and do it:
//!
//! 1. a read-only disk is refused; a qcow2 size not a multiple of 512 is refused; a smaller
//!    size is refused (QEMU 10 shrinks; here the guest's data past the new end stays);
//! 2. the device is drained ([`Block::with_drained_io`]: its context acquired, no new request
//!    taken, the context released while the requests in flight end, then acquired again), so
//!    no request is checked against one size and served against the other;
//! 3. the image grows, durably ([`block::Image::grow`]: a raw file is extended; a qcow2 image
//!    gets its new size and, when needed, a longer L1 table, in a power-cut-safe order);
//! 4. the device takes the new capacity ([`Block::update_capacity`]: configuration space,
//!    ConfigGeneration, the configuration-change interrupt) and serves requests again.
//!
//! A failure in 3 leaves the image at its old size (the engine's order guarantees it on disk)
//! and the device unchanged.
//!
//! Locks: runs on the main thread with the global lock held (a monitor command), and acquires the
//! disk's context after it, as docs/DESIGN.md orders; the drain waits with the context released.

use block::{DiskImage, Format};
use devices::virtio::block::Block;

use super::LiveImage;

/// Why a resize was refused or failed; the disk is as it was. Messages are QEMU's where it has
/// one.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// A read-only disk.
    #[error("Image is read-only")]
    ReadOnly,
    /// A qcow2 size that is not a whole number of sectors.
    #[error("The new size must be a multiple of 512")]
    Unaligned,
    /// A smaller size.
    #[error("Shrinking is refused: the disk is {size} bytes, {new_size} were asked for")]
    Shrink {
        /// The disk's size.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// A v2 qcow2 image with internal snapshots.
    #[error("Can't resize a v2 image which has snapshots")]
    V2Snapshots,
    /// A qcow2 size whose L1 table would pass QEMU's limit (32 MiB).
    #[error("Failed to grow the L1 table: File too large")]
    L1TooLarge,
    /// The image could not grow.
    #[error("Could not resize '{path}': {reason}")]
    Grow {
        /// The top image's file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Grows a disk's image, `live`, served by `device`, to `size` bytes (steps in the module
/// documentation).
pub fn resize(
    read_only: bool,
    device: &Block,
    live: &LiveImage,
    size: u64,
) -> Result<(), ResizeError> {
    let top = live.top();
    if read_only {
        return Err(ResizeError::ReadOnly);
    }
    if top.format() == Format::Qcow2 && !size.is_multiple_of(512) {
        return Err(ResizeError::Unaligned);
    }
    if size < top.size() {
        return Err(ResizeError::Shrink {
            size: top.size(),
            new_size: size,
        });
    }
    device.with_drained_io(|_| {
        top.grow(size).map_err(|e| match e {
            block::Error::L1Growth { .. } => ResizeError::L1TooLarge,
            block::Error::V2Snapshots { .. } => ResizeError::V2Snapshots,
            e => ResizeError::Grow {
                path: top.file().path().to_owned(),
                reason: devices::error_chain(&e),
            },
        })?;
        device.update_capacity();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::drive::CacheSetting;
    use block::qcow2::create::CreateOptions;
    use block::{DetectZeroes, OpenOptions, WithPolicy, WritePolicy};
    use devices::context::IoThread;
    use devices::virtio::block::test_util::{Rig, BUF, F_WRITE, HDR, STATUS};
    use devices::virtio::block::{request_type, status};
    use std::path::Path;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    /// A fresh directory for test `name`'s files.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-resize-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A device on an iothread serving `path` (of `format`), started by its driver.
    fn disk(
        path: &Path,
        format: Format,
        io: &IoThread,
    ) -> (Rig<WithPolicy<block::Image>>, LiveImage) {
        let opts = OpenOptions {
            format: Some(format),
            read_only: false,
            ..OpenOptions::default()
        };
        let top = Arc::new(WithPolicy::new(
            block::open(path, opts).unwrap(),
            WritePolicy::WriteBack,
            DetectZeroes::Off,
        ));
        let live = LiveImage::new(Arc::clone(&top), CacheSetting::default(), DetectZeroes::Off);
        let rig = Rig::new(io.context().clone(), top, 1, false);
        rig.start(!0);
        (rig, live)
    }

    /// Writes 4 KiB of `byte` at `sector` through the device (request number `n`, from 1).
    fn write(rig: &Rig<WithPolicy<block::Image>>, n: u16, sector: u64, byte: u8) -> u8 {
        rig.mem
            .write_slice(&[byte; 4096], GuestAddress(BUF))
            .unwrap();
        rig.header(HDR, request_type::OUT, sector);
        rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 4096, 0), (STATUS, 1, F_WRITE)]);
        rig.wait_used(0, n);
        rig.byte(STATUS)
    }

    #[test]
    fn a_qcow2_disk_grows_past_its_l1_cluster_while_the_driver_runs() {
        let dir = scratch("qcow2");
        let path = dir.join("d.qcow2");
        // 512-byte clusters: one cluster of L1 entries maps 2 MiB.
        let options = CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..CreateOptions::default()
        };
        block::create(&path, Format::Qcow2, &options).unwrap();
        let io = IoThread::spawn("io-resize").unwrap();
        let (rig, live) = disk(&path, Format::Qcow2, &io);
        assert_eq!(write(&rig, 1, 0, 7), status::OK);
        assert_eq!(write(&rig, 2, 2040, 8), status::OK);
        // Past the end: refused until the disk grows.
        assert_eq!(write(&rig, 3, 4096, 9), status::IOERR);
        assert!(matches!(
            resize(false, &rig.dev, &live, (1 << 20) + 100),
            Err(ResizeError::Unaligned)
        ));
        assert!(matches!(
            resize(false, &rig.dev, &live, 512),
            Err(ResizeError::Shrink { size, new_size: 512 }) if size == 1 << 20
        ));
        assert!(matches!(
            resize(true, &rig.dev, &live, 8 << 20),
            Err(ResizeError::ReadOnly)
        ));
        resize(false, &rig.dev, &live, 16 << 20).unwrap();
        assert_eq!(rig.dev.capacity(), 16 << 11);
        assert_eq!(write(&rig, 4, (16 << 11) - 8, 9), status::OK);
        rig.dev.shutdown().unwrap();
        drop(rig);
        drop(live);
        io.stop().unwrap();
        let p = path.to_str().unwrap();
        let check = crate::disks::run_tool("qemu-img", &["check", p]);
        assert!(check.status.success(), "{check:?}");
        let read = crate::disks::run_tool(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 7 0 4k",
                "-c",
                "read -P 8 1020k 4k",
                "-c",
                "read -P 9 16380k 4k",
                "-c",
                "read -P 0 1M 15356k",
                p,
            ],
        );
        assert!(read.status.success(), "{read:?}");
        let out = String::from_utf8_lossy(&read.stdout);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        let info = crate::disks::run_tool("qemu-img", &["info", "--output=json", p]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 16 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_raw_disk_grows_while_the_driver_runs() {
        let dir = scratch("raw");
        let path = dir.join("d.raw");
        let options = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        block::create(&path, Format::Raw, &options).unwrap();
        let io = IoThread::spawn("io-resize-raw").unwrap();
        let (rig, live) = disk(&path, Format::Raw, &io);
        // Raw takes any size, as QEMU's does; the guest sees whole sectors.
        resize(false, &rig.dev, &live, (3 << 20) + 100).unwrap();
        assert_eq!(rig.dev.capacity(), 3 << 11);
        assert_eq!(write(&rig, 1, (3 << 11) - 8, 5), status::OK);
        rig.dev.shutdown().unwrap();
        drop(rig);
        drop(live);
        io.stop().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (3 << 20) + 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
