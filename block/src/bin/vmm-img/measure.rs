//! `vmm-img measure [--size SIZE | [-f FMT] FILE] [-O raw|qcow2] [-o OPTIONS]
//! [--output=human|json]`: how large a file a conversion to FMT needs, with qemu-img's figures:
//! `required` (metadata for the whole disk plus the clusters holding data) and
//! `fully-allocated` (every cluster), and for a qcow2 image measured into qcow2 version 3,
//! `bitmaps` (persistent dirty bitmaps: this engine keeps none, so 0).

use block::{CacheMode, DiskImage, Format, Image};

use crate::args::{self, Args, Output};
use crate::chain::{open_image, status};
use crate::{CliError, CmdResult};

/// Bytes of refcount table and blocks that count `clusters` clusters and themselves.
fn refcount_metadata(clusters: u64, cs: u64, refcount_bits: u64) -> u64 {
    let per_block = cs * 8 / refcount_bits;
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let b = (clusters + table + blocks).div_ceil(per_block);
        let t = b.div_ceil(per_table_cluster);
        if (b, t) == (blocks, table) {
            return (blocks + table) * cs;
        }
        (blocks, table) = (b, t);
    }
}

/// Size of a qcow2 image with every cluster of a `virtual_size` disk allocated (`virtual_size`
/// a multiple of the cluster size): header, L2 and L1 tables (each rounded up to whole tables),
/// refcounts, data.
fn fully_allocated(virtual_size: u64, cs: u64, refcount_bits: u64, extended_l2: bool) -> u64 {
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let l2_entries = (virtual_size / cs).next_multiple_of(cs / l2_entry);
    let l1_entries = (l2_entries * l2_entry / cs).next_multiple_of(cs / 8);
    let meta = cs + l2_entries * l2_entry + l1_entries * 8;
    meta + refcount_metadata((meta + virtual_size) / cs, cs, refcount_bits) + virtual_size
}

/// Bytes of `img` in clusters of `cs` that hold data (zero runs skipped), as a conversion
/// without a backing file writes them.
fn data_bytes(img: &Image, cs: u64) -> Result<u64, CliError> {
    let size = img.size();
    let (mut off, mut required) = (0u64, 0u64);
    while off < size {
        let s = status(img, off, size - off)?;
        if s.present && s.data && !s.zero {
            let run = (off + s.len).next_multiple_of(cs) - off;
            required += off % cs + run;
            off += run;
        } else {
            off += s.len;
        }
    }
    Ok(required)
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "O", "o", "size", "output"])?;
    a.only(&["f", "O", "o", "size", "output", "U", "force-share"])?;
    let json_out = a.output()? == Output::Json;
    let out_fmt = args::format(a.value("O").unwrap_or("raw"))?;
    let mut o = block::qcow2::create::CreateOptions::default();
    let mut preallocated = false;
    for list in a.values("o") {
        for (k, v) in args::options(list)? {
            match k.as_str() {
                "preallocation" => {
                    preallocated = match v.as_str() {
                        "off" | "metadata" => false,
                        "falloc" | "full" => true,
                        _ => return Err(CliError::Usage(format!("invalid preallocation '{v}'"))),
                    }
                }
                _ => crate::create::apply_options(&mut o, &[format!("{k}={v}")])?,
            }
        }
    }
    let input = match (a.value("size"), a.positional.as_slice()) {
        (Some(_), [_, ..]) => {
            return Err(CliError::Usage(
                "--size N cannot be used together with a filename.".into(),
            ))
        }
        (Some(s), []) => Err(args::size(s)?),
        (None, [file]) => {
            let lock = !(a.has("U") || a.has("force-share"));
            Ok(open_image(
                file,
                a.value("f"),
                true,
                CacheMode::Writeback,
                lock,
            )?)
        }
        (None, _) => {
            return Err(CliError::Usage(
                "Either --size N or one filename must be specified.".into(),
            ))
        }
    };
    let size = match &input {
        Ok(img) => img.size().next_multiple_of(512),
        Err(s) => *s,
    };
    let (required, full, bitmaps) = match out_fmt {
        Format::Raw => {
            let n = size.next_multiple_of(512);
            (n, n, None)
        }
        Format::Qcow2 => {
            let cs = o.cluster_size;
            if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                return Err(CliError::Usage(format!("invalid cluster_size {cs}")));
            }
            let virtual_size = size.next_multiple_of(cs);
            let full = fully_allocated(virtual_size, cs, o.refcount_bits, o.extended_l2);
            let data = match (&input, preallocated) {
                (_, true) => virtual_size,
                (Ok(img), false) => data_bytes(img, cs)?,
                (Err(_), false) => 0,
            };
            let bitmaps = match &input {
                Ok(Image::Qcow2(_)) if o.version == 3 => Some(0u64),
                _ => None,
            };
            (full - virtual_size + data, full, bitmaps)
        }
    };
    if json_out {
        // qemu-img's field order and four-space indentation.
        let mut fields = Vec::new();
        if let Some(b) = bitmaps {
            fields.push(format!("    \"bitmaps\": {b}"));
        }
        fields.push(format!("    \"required\": {required}"));
        fields.push(format!("    \"fully-allocated\": {full}"));
        println!("{{\n{}\n}}", fields.join(",\n"));
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {full}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_qemu_img_gives() {
        // qemu-img measure --size 1G -O qcow2: 393216 / 1074135040.
        let full = fully_allocated(1 << 30, 65536, 16, false);
        assert_eq!(full, 1_074_135_040);
        assert_eq!(full - (1 << 30), 393_216);
    }
}
