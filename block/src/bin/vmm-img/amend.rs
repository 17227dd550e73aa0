//! `vmm-img amend [-f qcow2] [-p] [-q] -o compat=0.10|1.1,lazy_refcounts=on|off FILE`: changes
//! a qcow2 image's version and lazy refcounts in its header, as qemu-img does. Other options
//! qemu-img amends are refused by name.
//!
//! Before lazy refcounts are turned off (or the image goes to version 2) a dirty image is
//! opened read-write once, which rebuilds its refcounts. Version 2 cannot express zero clusters,
//! extended L2 entries, refcounts other than 16 bits, zstd compression or other feature bits:
//! an image using any of them is refused (qemu-img rewrites zero clusters; this does not).

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
                "cluster_size" | "extended_l2" | "preallocation" | "compression_type" => {
                    return Err(CliError::Usage(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                "refcount_bits" | "size" | "backing_file" | "backing_fmt" | "data_file"
                | "data_file_raw" | "encrypt" => {
                    return Err(CliError::Usage(format!(
                        "amending '{k}' is not supported; qemu-img amend does it"
                    )))
                }
                _ => return Err(CliError::Usage(format!("Invalid parameter '{k}'"))),
            }
        }
    }
    Ok(am)
}

/// What version 2 cannot hold, if the image has any of it.
fn v2_obstacle(img: &Image) -> Result<Option<String>, CliError> {
    let Image::Qcow2(q) = img else {
        return Ok(None);
    };
    let h = q.header();
    if h.refcount_order != 4 {
        return Ok(Some(format!("refcount_bits={}", 1u64 << h.refcount_order)));
    }
    if h.extended_l2() {
        return Ok(Some("extended_l2=on".into()));
    }
    if h.compression != block::qcow2::Compression::Zlib {
        return Ok(Some("compression_type=zstd".into()));
    }
    if h.nb_snapshots > 0 {
        return Ok(Some("internal snapshots".into()));
    }
    let size = img.size();
    let mut off = 0;
    while off < size {
        let (m, run) = q.lookup(off)?;
        if let Mapping::Zero { .. } = m {
            return Ok(Some(format!("a zero cluster at offset {off}")));
        }
        off += run.max(1);
    }
    Ok(None)
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
        // Version 3 snapshot entries carry fields version 2 ones may lack.
        return Err(CliError::Usage(
            "compat=1.1 of an image with internal snapshots is not supported; qemu-img amend \
             does it"
                .into(),
        ));
    }
    let rebuild = h.dirty() && !lazy;
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
    progress.update(1, 2);
    let ex = Exclusive::open(Path::new(file), format.or(Some(Format::Qcow2)))?;
    ex.edit_header(|h| {
        h.set_version(version);
        h.set_lazy_refcounts(lazy);
    })?;
    progress.update(2, 2);
    progress.finish();
    Ok(0)
}
