//! `vmm-img amend [-f qcow2] [-p] [-q] -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N,
//! size=SIZE FILE`: changes a qcow2 image's version and lazy refcounts in its header, rewrites
//! its refcount structures at another width (`qcow2/amend.rs`) and resizes it (shrinking
//! without `--shrink`), in qemu-img's order, as qemu-img does. `backing_file` and `backing_fmt`
//! are accepted only unchanged (`rebase` changes them), and the options qemu-img takes only at
//! creation are refused by name, with its messages.
//!
//! Before lazy refcounts are turned off (or the image goes to version 2) a dirty image is
//! opened read-write once, which rebuilds its refcounts. Version 2 cannot express zero clusters,
//! extended L2 entries, refcounts other than 16 bits, zstd compression or other feature bits.
//! The active layer's zero clusters are expanded first, as qemu-img does: without a backing
//! file an unallocated zero cluster becomes unallocated (it reads as zeroes all the same);
//! the others (a backing file could show through, or a cluster is kept allocated behind the
//! zero flag) are written with zeroes through the engine, which allocates and orders the
//! writes as for a guest's. Only then does the header switch to version 2. An image using the
//! rest (or zero clusters in a snapshot's tables, which qemu-img rewrites and this does not)
//! is refused. Going to version 3 with snapshots needs their entries to record the disk size,
//! as QEMU has written them since 1.x.

use std::path::Path;

use block::qcow2::Mapping;
use block::{CacheMode, DiskImage, Exclusive, Format, Image};

use crate::args::{self, Args};
use crate::chain::open_image;
use crate::progress::Progress;
use crate::{CliError, CmdResult};

/// The options asked for.
#[derive(Debug, Default)]
struct Amend {
    version: Option<u32>,
    lazy_refcounts: Option<bool>,
    refcount_order: Option<u32>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
}

fn parse(lists: &[String]) -> Result<Amend, CliError> {
    let mut am = Amend::default();
    for list in lists {
        for (k, v) in args::options(list)? {
            match k.as_str() {
                "compat" => {
                    am.version = Some(match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(CliError::Usage(format!("Invalid compat value '{v}'"))),
                    })
                }
                "lazy_refcounts" => am.lazy_refcounts = Some(crate::create::on_off(&k, &v)?),
                "refcount_bits" => {
                    let bits = v.parse::<u64>().unwrap_or(0);
                    am.refcount_order = Some(
                        block::qcow2::amend::refcount_order(bits)
                            .map_err(|e| CliError::Usage(e.to_string()))?,
                    );
                }
                "size" => am.size = Some(args::size(&v)?),
                "backing_file" => am.backing_file = Some(v),
                "backing_fmt" => am.backing_fmt = Some(v),
                "data_file" => {
                    return Err(CliError::Usage(
                        "data-file can only be set for images that use an external data file"
                            .into(),
                    ))
                }
                "data_file_raw" => {
                    return Err(CliError::Usage(
                        "data-file-raw cannot be set on existing images".into(),
                    ))
                }
                "cluster_size" | "extended_l2" | "preallocation" | "compression_type" => {
                    return Err(CliError::Usage(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                k if k == "encrypt" || k.starts_with("encrypt.") => {
                    return Err(CliError::Usage(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                _ => return Err(CliError::Usage(format!("Invalid parameter '{k}'"))),
            }
        }
    }
    Ok(am)
}

/// What version 2 cannot hold, if the image has any of it (its refcounts are checked apart).
fn v2_obstacle(img: &Image) -> Result<Option<String>, CliError> {
    let Image::Qcow2(q) = img else {
        return Ok(None);
    };
    let h = q.header();
    if h.extended_l2() {
        return Ok(Some("extended_l2=on".into()));
    }
    if h.compression != block::qcow2::Compression::Zlib {
        return Ok(Some("compression_type=zstd".into()));
    }
    for sn in block::qcow2::snapshot::list(q.file(), &h)? {
        if snapshot_has_zero_cluster(q.file(), &h, &sn)? {
            return Ok(Some(format!("a zero cluster in snapshot '{}'", sn.name)));
        }
    }
    Ok(None)
}

/// The zero clusters of the active layer of `img`: (guest offset, length) runs.
fn zero_runs(img: &Image) -> Result<Vec<(u64, u64)>, CliError> {
    let Image::Qcow2(q) = img else {
        return Ok(Vec::new());
    };
    let size = img.size();
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let (m, run) = q.lookup(off)?;
        let run = run.max(1).min(size - off);
        if let Mapping::Zero { .. } = m {
            runs.push((off, run));
        }
        off += run;
    }
    Ok(runs)
}

/// Expands the zero clusters of the active layer of the version 3 image `file` (see the
/// module documentation), leaving none.
fn expand_zero_clusters(file: &str, format: Option<Format>, backing: bool) -> Result<(), CliError> {
    if !backing {
        Exclusive::open(Path::new(file), format.or(Some(Format::Qcow2)))?
            .unallocate_zero_clusters()?;
    }
    let img = open_image(file, Some("qcow2"), false, CacheMode::Writeback, true)?;
    const CHUNK: usize = 1 << 20;
    let zeroes = vec![0u8; CHUNK];
    for (start, len) in zero_runs(&img)? {
        let mut off = start;
        while off < start + len {
            // At most CHUNK, the buffer's length.
            let n = usize::try_from(start + len - off).map_or(CHUNK, |r| r.min(CHUNK));
            img.write_at(&zeroes[..n], off)?;
            off += n as u64;
        }
    }
    img.flush()?;
    if let Some(&(off, _)) = zero_runs(&img)?.first() {
        return Err(CliError::Usage(format!(
            "a zero cluster at offset {off} could not be expanded"
        )));
    }
    Ok(())
}

/// Whether an L2 table that snapshot `sn` reaches has a zero cluster (standard entries: extended
/// L2 is refused before). Tables are read from the file, each checked to lie inside it.
fn snapshot_has_zero_cluster(
    f: &block::file::HostFile,
    h: &block::qcow2::Header,
    sn: &block::qcow2::snapshot::Snapshot,
) -> Result<bool, CliError> {
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    const COMPRESSED: u64 = 1 << 62;
    let words = |b: &[u8]| -> Vec<u64> {
        b.chunks_exact(8)
            .map(|w| u64::from_be_bytes(w.try_into().unwrap_or([0; 8])))
            .collect()
    };
    let cs = h.cluster_size();
    let file_len = f.len()?;
    // `list` checked that the L1 table lies inside the file.
    let mut l1 = vec![0u8; usize::try_from(sn.l1.size).unwrap_or(0) * 8];
    f.read_at(&mut l1, sn.l1.offset)?;
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    for e in words(&l1) {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) || off.saturating_add(cs) > file_len {
            return Err(CliError::Usage(format!(
                "snapshot '{}' has an L2 table at {off:#x}, outside the file",
                sn.name
            )));
        }
        f.read_at(&mut l2, off)?;
        if words(&l2)
            .iter()
            .any(|&w| w & COMPRESSED == 0 && w & 1 != 0)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "o"])?;
    a.only(&["f", "o", "p", "q"])?;
    if a.values("o").is_empty() {
        return Err(CliError::Usage("Must specify options (-o)".into()));
    }
    let am = parse(a.values("o"))?;
    let file = &a.positional(1, "one image file")?[0];
    let format = a.value("f").map(args::format).transpose()?;
    let mut progress = Progress::new(a.has("p") && !a.has("q"));
    let img = open_image(file, a.value("f"), true, CacheMode::Writeback, true)?;
    let Image::Qcow2(q) = &img else {
        return Err(CliError::Usage(
            "amend needs a qcow2 image (raw has no options to change)".into(),
        ));
    };
    let h = q.header();
    let version = am.version.unwrap_or(h.version);
    let lazy = am
        .lazy_refcounts
        .unwrap_or(h.lazy_refcounts() && version == 3);
    if lazy && version == 2 {
        return Err(CliError::Usage(
            "Lazy refcounts only supported with compatibility level 1.1 and above".into(),
        ));
    }
    if version == 2 && am.refcount_order.unwrap_or(h.refcount_order) != 4 {
        return Err(CliError::Usage(
            block::qcow2::amend::RefcountWidthError::Version.to_string(),
        ));
    }
    if am.backing_file.is_some() || am.backing_fmt.is_some() {
        let (name, fmt) = match &h.backing {
            Some((name, fmt)) => (Some(name.as_str()), fmt.as_deref()),
            None => (None, None),
        };
        if am.backing_file.as_deref() != name || am.backing_fmt.as_deref() != fmt {
            return Err(CliError::Usage(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
            ));
        }
    }
    if am.size.is_some_and(|s| s % 512 != 0) {
        return Err(CliError::Usage(
            "The new size must be a multiple of 512".into(),
        ));
    }
    if version == 2 && h.version == 3 {
        if let Some(what) = v2_obstacle(&img)? {
            return Err(CliError::Usage(format!(
                "compat=0.10 cannot hold {what}; qemu-img amend can convert it"
            )));
        }
        let unknown = h.incompatible & !1 | h.compatible & !1;
        if unknown != 0 {
            return Err(CliError::Usage(format!(
                "compat=0.10 cannot hold feature bits {unknown:#x}"
            )));
        }
    }
    if version == 3 && h.version == 2 && h.nb_snapshots > 0 {
        // A version 3 snapshot entry records the disk size, which old version 2 entries lack
        // (QEMU has written it into version 2 entries too since 1.x).
        let snaps = block::qcow2::snapshot::list(q.file(), &h)?;
        if snaps.iter().any(|s| s.disk_size.is_none()) {
            return Err(CliError::Usage(
                "compat=1.1 of an image with snapshots that record no disk size is not \
                 supported; qemu-img amend does it"
                    .into(),
            ));
        }
    }
    // A refcount rewrite copies the refcounts, which must be true.
    let rebuild = h.dirty() && (!lazy || am.refcount_order.is_some());
    drop(img);
    if rebuild {
        // A read-write open rebuilds the refcounts of a dirty image and clears its dirty bit.
        drop(open_image(
            file,
            Some("qcow2"),
            false,
            CacheMode::Writeback,
            true,
        )?);
    }
    // qemu-img's order: a version upgrade, the refcount width, the other header fields (and a
    // downgrade, which needs 16-bit refcounts), the size.
    let steps = 2 + u64::from(am.refcount_order.is_some()) + u64::from(am.size.is_some());
    let mut step = 1;
    progress.update(step, steps);
    if version == 2 && h.version == 3 {
        expand_zero_clusters(file, format, h.backing.is_some())?;
    }
    let ex = Exclusive::open(Path::new(file), format.or(Some(Format::Qcow2)))?;
    if let Some(order) = am.refcount_order {
        if h.version < 3 {
            ex.edit_header(|h| h.set_version(3))?;
        }
        ex.set_refcount_order(order)?;
        step += 1;
        progress.update(step, steps);
    }
    ex.edit_header(|h| {
        h.set_version(version);
        h.set_lazy_refcounts(lazy);
    })?;
    step += 1;
    progress.update(step, steps);
    if let Some(size) = am.size {
        ex.resize(size)?;
        progress.update(steps, steps);
    }
    progress.finish();
    Ok(0)
}
