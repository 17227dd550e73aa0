//! Opening the image a command names, and the block status of a whole chain at an offset (what
//! `map` prints and what `convert` skips): which layer holds the data, and whether it reads as
//! zeroes, in qemu-img map's terms.

use block::{CacheMode, DiskImage, Image};

use crate::image_opts::ImageSpec;
use crate::CliError;

/// Opens an image with an optional format name (probed when absent: the user named the file;
/// a writable image with no magic is guessed raw, as qemu-img does).
pub fn open_image(
    path: &str,
    fmt: Option<&str>,
    read_only: bool,
    cache: CacheMode,
    lock: bool,
) -> Result<Image, CliError> {
    ImageSpec::file(path, fmt)?.open(read_only, cache, lock)
}

/// A run of the virtual disk with one status through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Chain depth of the layer that answered (0 = the top).
    pub depth: u32,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed data.
    pub compressed: bool,
    /// Host offset of the data in the answering layer's file.
    pub offset: Option<u64>,
}

/// The status at `off` of up to `len` bytes, walking down the chain.
pub fn status(img: &Image, off: u64, len: u64) -> Result<Seg, CliError> {
    let mut cur = img;
    let mut depth = 0;
    let mut len = len;
    loop {
        let mut seg = Seg {
            start: off,
            len,
            depth,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(off),
        };
        let q = match cur {
            Image::Raw(r) => {
                let bs = r.block_status(off, len)?;
                seg.len = bs.len;
                if bs.allocation == block::Allocation::Zero {
                    (seg.zero, seg.data) = (true, false);
                }
                return Ok(seg);
            }
            Image::Qcow2(q) => q,
        };
        let (m, run) = q.lookup(off)?;
        seg.len = run.min(len);
        match m {
            block::qcow2::Mapping::Data { host, .. } => seg.offset = Some(host),
            block::qcow2::Mapping::Compressed { .. } => {
                seg.compressed = true;
                seg.offset = None;
            }
            block::qcow2::Mapping::Zero { .. } => {
                (seg.zero, seg.data, seg.offset) = (true, false, None);
            }
            block::qcow2::Mapping::Unallocated => match q.backing() {
                Some(b) if off < b.size() => {
                    len = seg.len.min(b.size() - off);
                    cur = b;
                    depth += 1;
                    continue;
                }
                _ => {
                    seg.depth = depth + u32::from(q.backing().is_some());
                    (seg.present, seg.zero, seg.data, seg.offset) = (false, true, false, None);
                }
            },
        }
        return Ok(seg);
    }
}

/// The whole disk as merged runs, as qemu-img map merges them.
pub fn segments(img: &Image) -> Result<Vec<Seg>, CliError> {
    let size = img.size();
    let mut out: Vec<Seg> = Vec::new();
    let mut off = 0;
    while off < size {
        let s = status(img, off, size - off)?;
        off += s.len;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, s.offset) {
                (Some(a), Some(b)) => a + last.len == b,
                (None, None) => true,
                _ => false,
            };
            if contiguous
                && (
                    last.depth,
                    last.present,
                    last.zero,
                    last.data,
                    last.compressed,
                ) == (s.depth, s.present, s.zero, s.data, s.compressed)
            {
                last.len += s.len;
                continue;
            }
        }
        out.push(s);
    }
    Ok(out)
}
