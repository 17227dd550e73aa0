//! `vmm-img create -f qcow2|raw [-b BACKING -F FMT [-u]] [-o opts] [-q] FILE [SIZE]`.
//!
//! `-o` also takes qemu-img's `size=` (refused with a size given apart, as qemu-img refuses it),
//! `backing_file=` and `backing_fmt=` (`-b`/`-F` win, as in qemu-img) and
//! `preallocation=off|metadata|falloc|full` (raw: not `metadata`, as qemu-img). `-o help` (or
//! `-o ?`) lists the options this takes for the format, with qemu-img's descriptions, and
//! creates nothing.
//!
//! Like qemu-img, the backing chain is opened (to check it, and for the size when none is given)
//! unless `-u`. The target is never truncated while another process holds it (the write lock
//! comes first) nor when the new image would be its own backing file, by any name: qemu-img
//! compares names only, and overwrites `d/a.qcow2` given `-b a.qcow2`.

use std::path::Path;

use block::qcow2::create::{CreateOptions, Preallocation};
use block::{CacheMode, DiskImage, Image, NewImage};

use crate::args::{self, Args};
use crate::chain::open_image;
use crate::{CliError, CmdResult};

pub fn on_off(k: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(CliError::Usage(format!("{k} must be on or off, not '{v}'"))),
    }
}

/// Applies qemu-img's `-o` options for qcow2 (every `-o` given, in order).
pub fn apply_options(o: &mut CreateOptions, lists: &[String]) -> Result<(), CliError> {
    for list in lists {
        for (k, v) in args::options(list)? {
            match k.as_str() {
                "cluster_size" => o.cluster_size = args::size(&v)?,
                "refcount_bits" => o.refcount_bits = args::size(&v)?,
                "lazy_refcounts" => o.lazy_refcounts = on_off(&k, &v)?,
                "extended_l2" => o.extended_l2 = on_off(&k, &v)?,
                "compression_type" => {
                    o.compression = match v.as_str() {
                        "zlib" => block::qcow2::Compression::Zlib,
                        "zstd" => block::qcow2::Compression::Zstd,
                        _ => {
                            return Err(CliError::Usage(format!(
                                "Parameter 'compression_type' does not accept value '{v}'"
                            )))
                        }
                    }
                }
                "compat" => {
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(CliError::Usage(format!("unknown compat '{v}'"))),
                    }
                }
                _ => return Err(CliError::Usage(format!("unsupported option '{k}'"))),
            }
        }
    }
    Ok(())
}

/// The `-o` options `create` takes for qcow2, with qemu-img's help lines.
const QCOW2_OPTIONS: &[(&str, &str)] = &[
    ("backing_file=<str>", "File name of a base image"),
    ("backing_fmt=<str>", "Image format of the base image"),
    ("cluster_size=<size>", "qcow2 cluster size"),
    (
        "compat=<str>",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    (
        "compression_type=<str>",
        "Compression method used for image cluster compression",
    ),
    ("extended_l2=<bool (on/off)>", "Extended L2 tables"),
    (
        "lazy_refcounts=<bool (on/off)>",
        "Postpone refcount updates",
    ),
    (
        "preallocation=<str>",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    (
        "refcount_bits=<num>",
        "Width of a reference count entry in bits",
    ),
    ("size=<size>", "Virtual disk size"),
];

/// The `-o` options `create` takes for raw.
const RAW_OPTIONS: &[(&str, &str)] = &[
    (
        "preallocation=<str>",
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    ("size=<size>", "Virtual disk size"),
];

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "b", "F", "o"])?;
    a.only(&["f", "b", "F", "o", "q", "u"])?;
    let format = args::format(a.value("f").unwrap_or("raw"))?;
    let asks_help = a
        .values("o")
        .iter()
        .any(|l| l.split(',').any(|p| p == "help" || p == "?"));
    if asks_help {
        // As qemu-img: the format named when no file is.
        if a.positional.is_empty() {
            println!("Supported {} options:", format.name());
        } else {
            println!("Supported options:");
        }
        let list = match format {
            block::Format::Qcow2 => QCOW2_OPTIONS,
            block::Format::Raw => RAW_OPTIONS,
        };
        for (name, what) in list {
            println!("  {name:<22} - {what}");
        }
        return Ok(0);
    }
    let (file, size) = match a.positional.as_slice() {
        [f] => (f, None),
        [f, s] => (f, Some(args::size(s)?)),
        _ => return Err(CliError::Usage("expected FILE [SIZE]".into())),
    };
    let path = Path::new(file);
    let mut o = CreateOptions::default();
    let (mut o_size, mut o_backing, mut o_backing_fmt) = (None, None, None);
    for list in a.values("o") {
        for (k, v) in args::options(list)? {
            match k.as_str() {
                "size" => o_size = Some(args::size(&v)?),
                "backing_file" => o_backing = Some(v),
                "backing_fmt" => o_backing_fmt = Some(v),
                "preallocation" => {
                    o.preallocation = Preallocation::parse(&v).ok_or_else(|| {
                        CliError::Usage(format!(
                            "{file}: Parameter 'preallocation' does not accept value '{v}'"
                        ))
                    })?
                }
                _ => apply_options(&mut o, &[format!("{k}={v}")])?,
            }
        }
    }
    if size.is_some() && o_size.is_some() {
        return Err(CliError::Usage(format!(
            "{file}: The image size must be specified only once"
        )));
    }
    let size = size.or(o_size);
    // The backing chain, opened (as qemu-img does unless -u) to check it and take its size.
    let mut backing_chain = None;
    if let Some(b) = a.value("b").or(o_backing.as_deref()) {
        if format == block::Format::Raw {
            return Err(CliError::Usage("raw images have no backing file".into()));
        }
        let bfmt = a
            .value("F")
            .or(o_backing_fmt.as_deref())
            .ok_or_else(|| CliError::Usage("a backing file needs its format (-F)".into()))?;
        args::format(bfmt)?;
        o.backing = Some((b.to_string(), bfmt.to_string()));
        if !a.has("u") {
            let bpath = block::resolve_backing(path, b);
            let img = open_image(
                &bpath.display().to_string(),
                Some(bfmt),
                true,
                CacheMode::Writeback,
                false,
            )?;
            backing_chain = Some(img);
        }
    }
    o.size = match (size, &backing_chain) {
        (Some(s), _) => s,
        (None, Some(img)) => img.size(),
        (None, None) => return Err(CliError::Usage("expected a size".into())),
    };
    let target = NewImage::open(path)?;
    let in_chain = backing_chain
        .iter()
        .flat_map(Image::chain)
        .find(|i| i.file().id() == target.id());
    if let Some(member) = in_chain {
        return Err(block::Error::OwnBacking {
            path: file.clone(),
            backing: member.file().path().to_string(),
        }
        .into());
    }
    target.format(format, &o)?;
    if !a.has("q") {
        println!("Formatting '{file}', fmt={} size={}", format.name(), o.size);
    }
    Ok(0)
}
