//! What the monitor says of each disk: QEMU's names for it (the guest device's QOM path, the
//! node names of each image of its chain, `-drive node-name=` or QEMU's automatic `#blockN`)
//! and its `query-block` entry (flags, cache mode, the image and its backing chain with their
//! sizes), from which `query-named-block-nodes` is built too.
//!
//! Built while the disks are built, from the flags and the open image, and again for the images
//! a snapshot or a resize changes; nothing here holds or takes a lock (the host sizes come from
//! `stat`).

use std::os::unix::fs::MetadataExt;

use block::{DetectZeroes, DiskImage, Format, Image, WritePolicy};
use devices::virtio::block::IoStatus;

use crate::drive::{CacheSetting, DiskSpec};
use crate::monitor::{BlockDevice, CacheMode, ImageDescription, ImageNodes};

/// Names nodes for the VM's life, in the order the images are opened: an automatic name is
/// QEMU's `#blockN`, N counting the automatic names given so far (QEMU appends two random
/// digits; its own tests filter the number out, as ours do). A protocol node is named before
/// its format node, as QEMU opens them.
#[derive(Debug, Default)]
pub struct NodeNamer {
    /// Automatic names given.
    names: u64,
    /// Images opened.
    images: u64,
}

impl NodeNamer {
    fn automatic(&mut self) -> String {
        self.names += 1;
        format!("#block{}", self.names - 1)
    }

    /// The nodes of an image opened now, its format node named `format` or automatically.
    pub fn image(&mut self, format: Option<String>) -> ImageNodes {
        let file = self.automatic();
        let format = format.unwrap_or_else(|| self.automatic());
        self.images += 1;
        ImageNodes {
            format,
            file,
            opened: self.images - 1,
        }
    }
}

/// QEMU's names for a disk, as its microvm shows a virtio-blk-device.
#[derive(Debug)]
pub(super) struct Names {
    /// The guest device's QOM path, in `BLOCK_IO_ERROR`.
    pub(super) qom_path: String,
    /// The nodes of each image of its chain, top first, named in the order QEMU opens them
    /// (each image's protocol node, then its format node, then its backing image's).
    pub(super) nodes: Vec<ImageNodes>,
}

impl Names {
    /// The names of disk `index`, whose flags are `spec` and whose chain `image` heads.
    pub(super) fn of(index: u8, spec: &DiskSpec, image: &Image, namer: &mut NodeNamer) -> Self {
        let qom_path = match &spec.device.id {
            Some(id) => format!("/machine/peripheral/{id}"),
            None => format!("/machine/peripheral-anon/device[{index}]"),
        };
        let depth = image.chain().count();
        let nodes = (0..depth)
            .map(|at| {
                namer.image(if at == 0 {
                    spec.drive.node_name.clone()
                } else {
                    None
                })
            })
            .collect();
        Self { qom_path, nodes }
    }

    /// The top image's format node.
    pub(super) fn node_name(&self) -> &str {
        self.nodes.first().map_or("", |n| n.format.as_str())
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
        node_name: names.node_name().to_owned(),
        nodes: names.nodes.clone(),
        io_status: IoStatus::Ok.name(),
        image: describe(image),
    }
}

/// Host bytes allocated to `path` and its length, when it can be stat'ed.
fn host_sizes(path: &str) -> (Option<u64>, Option<u64>) {
    std::fs::metadata(path).map_or((None, None), |m| (Some(m.blocks() * 512), Some(m.len())))
}

/// `query-block`'s description of `image` and its backing chain.
pub(super) fn describe(image: &Image) -> ImageDescription {
    match image {
        Image::Raw(raw) => {
            let (actual_size, file_length) = host_sizes(raw.path());
            ImageDescription {
                filename: raw.path().to_owned(),
                format: Format::Raw.name().to_owned(),
                virtual_size: raw.size(),
                actual_size,
                file_length,
                cluster_size: None,
                dirty_flag: None,
                backing_name: None,
                backing: None,
            }
        }
        Image::Qcow2(q) => {
            let header = q.header();
            let path = q.file().path();
            let (actual_size, file_length) = host_sizes(path);
            ImageDescription {
                filename: path.to_owned(),
                format: Format::Qcow2.name().to_owned(),
                virtual_size: q.size(),
                actual_size,
                file_length,
                cluster_size: 1u64.checked_shl(header.cluster_bits),
                // qcow2 spec, incompatible feature bit 0: the dirty bit.
                dirty_flag: Some(header.incompatible & 1 != 0),
                backing_name: header.backing.map(|(name, _)| name),
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
