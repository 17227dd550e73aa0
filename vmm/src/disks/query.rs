//! What the monitor says of each disk: QEMU's names for it (the guest device's QOM path, the
//! image's `#blockN` node name) and its `query-block` entry (flags, cache mode, the image and
//! its backing chain with their sizes).
//!
//! Built once, while the disks are built, from the flags and the open image; nothing here holds
//! or takes a lock (the host sizes come from `stat`).

use std::os::unix::fs::MetadataExt;

use block::{DetectZeroes, DiskImage, Format, Image, WritePolicy};
use devices::virtio::block::IoStatus;

use crate::drive::{CacheSetting, DiskSpec};
use crate::monitor::{BlockDevice, CacheMode, ImageDescription};

/// QEMU's names for a disk, as its microvm shows a virtio-blk-device.
#[derive(Debug)]
pub(super) struct Names {
    /// The guest device's QOM path, in `BLOCK_IO_ERROR`.
    pub(super) qom_path: String,
    /// The image's automatic node name.
    pub(super) node_name: String,
}

impl Names {
    /// The names of disk `index`, whose flags are `spec`.
    pub(super) fn of(index: u8, spec: &DiskSpec) -> Self {
        let qom_path = match &spec.device.id {
            Some(id) => format!("/machine/peripheral/{id}"),
            None => format!("/machine/peripheral-anon/device[{index}]"),
        };
        Self {
            qom_path,
            node_name: format!("#block{index}"),
        }
    }
}

/// The `query-block` entry of a disk: the device's id or, for an anonymous one, its QOM path as
/// `qdev`.
pub(super) fn block_device(spec: &DiskSpec, names: &Names, image: &Image) -> BlockDevice {
    BlockDevice {
        drive_id: spec.drive.id.clone(),
        qdev: spec
            .device
            .id
            .clone()
            .unwrap_or_else(|| names.qom_path.clone()),
        read_only: spec.drive.read_only,
        cache: cache_flags(spec.drive.cache),
        detect_zeroes: match spec.drive.detect_zeroes {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        },
        node_name: names.node_name.clone(),
        io_status: IoStatus::Ok.name(),
        image: describe(image),
    }
}

/// Host bytes allocated to `path`, when it can be stat'ed.
fn allocated_bytes(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// `query-block`'s description of `image` and its backing chain.
pub(super) fn describe(image: &Image) -> ImageDescription {
    match image {
        Image::Raw(raw) => ImageDescription {
            filename: raw.path().to_owned(),
            format: Format::Raw.name().to_owned(),
            virtual_size: raw.size(),
            actual_size: allocated_bytes(raw.path()),
            cluster_size: None,
            dirty_flag: None,
            backing: None,
        },
        Image::Qcow2(q) => {
            let header = q.header();
            let path = q.file().path();
            ImageDescription {
                filename: path.to_owned(),
                format: Format::Qcow2.name().to_owned(),
                virtual_size: q.size(),
                actual_size: allocated_bytes(path),
                cluster_size: 1u64.checked_shl(header.cluster_bits),
                // qcow2 spec, incompatible feature bit 0: the dirty bit.
                dirty_flag: Some(header.incompatible & 1 != 0),
                backing: q.backing().map(|b| Box::new(describe(b))),
            }
        }
    }
}

/// The cache flags `query-block` reports for a `-drive cache=` mode.
fn cache_flags(mode: CacheSetting) -> CacheMode {
    CacheMode {
        writeback: mode.policy != WritePolicy::WriteThrough,
        direct: mode.host == block::CacheMode::None,
        no_flush: mode.policy == WritePolicy::IgnoreFlush,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_block_cache_flags_follow_the_mode() {
        use crate::options::OptionValue;
        let flags = |mode: &str| {
            let f = cache_flags(CacheSetting::parse(mode).expect("a QEMU mode"));
            (f.writeback, f.direct, f.no_flush)
        };
        // QEMU's table for -drive cache= (qemu-options.hx: cache.writeback, .direct, .no-flush).
        assert_eq!(flags("writeback"), (true, false, false));
        assert_eq!(flags("none"), (true, true, false));
        assert_eq!(flags("writethrough"), (false, false, false));
        assert_eq!(flags("directsync"), (false, true, false));
        assert_eq!(flags("unsafe"), (true, false, true));
    }
}
