//! `vmm-img rebase [-f FMT] [-u] [-b BACKING [-F FMT]] [-p] [-q] [-U] FILE`: gives a qcow2
//! image another backing file (or none, with `-b ""`), as qemu-img does.
//!
//! Safe mode (without `-u`) keeps what the image reads: every cluster the image does not
//! allocate itself, whose content differs between the old backing chain and the new one, is
//! copied from the old chain into the image (as zeroes where it lay past the old chain's end),
//! and only those; then the header names the new file. A crash in between leaves the image
//! reading the same, with its old backing file. `-u` only rewrites the header (the old chain is
//! not opened: this is how a moved, renamed or unprobeable backing file is named again).

use std::path::Path;

use block::qcow2::Mapping;
use block::{CacheMode, DiskImage, Image};

use crate::args::{self, Args};
use crate::chain::open_image;
use crate::progress::Progress;
use crate::{CliError, CmdResult};

/// Largest piece compared at once.
const CHUNK: u64 = 2 << 20;

/// Reads `buf.len()` bytes at `off` of `img` (zeroes past its end, or everywhere without one).
fn read_or_zero(img: Option<&Image>, buf: &mut [u8], off: u64) -> Result<(), CliError> {
    buf.fill(0);
    if let Some(img) = img {
        let avail = img.size().saturating_sub(off);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        if n > 0 {
            img.read_at(&mut buf[..n], off)?;
        }
    }
    Ok(())
}

/// Copies into `img` the clusters it does not allocate whose content differs between its old
/// backing chain and `new`.
fn copy_differences(img: &Image, new: Option<&Image>, progress: &mut Progress) -> CmdResult {
    let Image::Qcow2(q) = img else {
        // A raw image has no backing file; the header edit refuses it.
        return Ok(0);
    };
    let old = q.backing();
    let h = q.header();
    let align = if h.extended_l2() {
        h.cluster_size() / 32
    } else {
        h.cluster_size()
    };
    let old_size = old.map_or(0, |o| o.size());
    let size = img.size();
    let mut bufs = [vec![0u8; 1 << 21], vec![0u8; 1 << 21]];
    let mut off = 0;
    while off < size {
        let (m, run) = q.lookup(off)?;
        let n = run.min(size - off).min(CHUNK);
        if m == Mapping::Unallocated {
            // Runs start and end on cluster boundaries (or at the end of the disk).
            let len = usize::try_from(n).unwrap_or(usize::MAX).min(bufs[0].len());
            let [b_old, b_new] = &mut bufs;
            read_or_zero(old, &mut b_old[..len], off)?;
            read_or_zero(new, &mut b_new[..len], off)?;
            let step = usize::try_from(align).unwrap_or(len).max(1);
            for start in (0..len).step_by(step) {
                let end = (start + step).min(len);
                if b_old[start..end] == b_new[start..end] {
                    continue;
                }
                let at = off + u64::try_from(start).unwrap_or(u64::MAX);
                if at >= old_size {
                    img.write_zeroes(at, u64::try_from(end - start).unwrap_or(0), false)?;
                } else {
                    img.write_at(&b_old[start..end], at)?;
                }
            }
        }
        off += n;
        progress.update(off, size);
    }
    img.flush()?;
    Ok(0)
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "b", "F"])?;
    a.only(&["f", "b", "F", "u", "p", "q", "U", "force-share"])?;
    let file = &a.positional(1, "one image file")?[0];
    let path = Path::new(file);
    let unsafe_mode = a.has("u");
    let new = match a.value("b") {
        None if !unsafe_mode => {
            return Err(CliError::Usage(
                "Must specify backing file (-b) or use unsafe mode (-u)".into(),
            ))
        }
        None | Some("") => None,
        Some(b) => {
            let fmt = a.value("F").ok_or_else(|| {
                CliError::Usage(format!(
                    "Could not change the backing file to '{b}': backing format must be specified"
                ))
            })?;
            args::format(fmt)?;
            Some((b.to_string(), fmt.to_string()))
        }
    };
    if !unsafe_mode {
        let lock = !(a.has("U") || a.has("force-share"));
        let img = open_image(file, a.value("f"), false, CacheMode::Writeback, true)?;
        let new_img = match &new {
            Some((name, fmt)) => Some(open_image(
                &block::resolve_backing(path, name).display().to_string(),
                Some(fmt),
                true,
                CacheMode::Writeback,
                lock,
            )?),
            None => None,
        };
        let mut progress = Progress::new(a.has("p") && !a.has("q"));
        copy_differences(&img, new_img.as_ref(), &mut progress)?;
        progress.finish();
    }
    block::Exclusive::open(path, Some(block::Format::Qcow2))?.set_backing(new)?;
    Ok(0)
}
