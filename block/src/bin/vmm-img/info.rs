//! `vmm-img info [-f FMT] [--backing-chain] [--output=human|json] [-U] FILE`, with qemu-img's
//! field names.

use std::os::unix::fs::MetadataExt;

use block::{CacheMode, DiskImage, Image};
use serde_json::{json, Value};

use crate::args::{Args, Output};
use crate::chain::open_image;
use crate::CmdResult;

/// Bytes the file occupies on the host (`actual-size`).
fn actual_size(path: &str) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A size as qemu-img prints it: in the largest binary unit that keeps the figure under 1000,
/// to three significant digits (C's `%0.3g`), e.g. `8 MiB`, `1.5 MiB`, `0.977 GiB`, `512 B`.
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut unit = 0;
    let mut div = 1.0_f64;
    // Sizes are far below 2^53 bytes' precision concerns for three digits.
    let bytes = v as f64;
    while unit + 1 < UNITS.len() && bytes >= 1000.0 * div {
        unit += 1;
        div *= 1024.0;
    }
    format!("{} {}B", three_significant_digits(bytes / div), UNITS[unit])
}

/// C's `printf("%0.3g", x)` for a non-negative `x`.
fn three_significant_digits(x: f64) -> String {
    // Rounded to three digits first, as %g decides its style on the rounded exponent.
    let sci = format!("{x:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", trim(mantissa), exp.abs());
    }
    let decimals = usize::try_from(2 - exp).unwrap_or(0);
    trim(&format!("{x:.decimals$}"))
}

/// One layer's description as qemu-img's JSON object.
fn describe(img: &Image) -> Value {
    let (path, fmt) = match img {
        Image::Raw(r) => (r.path().to_string(), "raw"),
        Image::Qcow2(q) => (q.file().path().to_string(), "qcow2"),
    };
    let mut v = json!({
        "virtual-size": img.size(),
        "filename": path,
        "format": fmt,
        "actual-size": actual_size(&path),
        "dirty-flag": false,
        "children": [{"name": "file", "info": {
            "children": [], "virtual-size": file_len(&path), "filename": path,
            "format": "file", "actual-size": actual_size(&path),
            "format-specific": {"type": "file", "data": {}}, "dirty-flag": false}}],
    });
    if let Image::Qcow2(q) = img {
        let h = q.header();
        v["cluster-size"] = json!(h.cluster_size());
        v["format-specific"] = json!({"type": "qcow2", "data": {
            "compat": if h.version == 2 { "0.10" } else { "1.1" },
            "compression-type": match h.compression {
                block::qcow2::Compression::Zlib => "zlib",
                block::qcow2::Compression::Zstd => "zstd",
            },
            "lazy-refcounts": q.lazy_refcounts(),
            "refcount-bits": 1u64 << h.refcount_order,
            "corrupt": h.incompatible & 2 != 0,
            "extended-l2": h.extended_l2(),
        }});
        if h.version == 2 {
            let data = &mut v["format-specific"]["data"];
            if let Some(m) = data.as_object_mut() {
                m.retain(|k, _| k == "compat" || k == "compression-type" || k == "refcount-bits");
            }
        }
        if let Some((name, bfmt)) = &h.backing {
            v["backing-filename"] = json!(name);
            let full = block::resolve_backing(std::path::Path::new(&path), name);
            v["full-backing-filename"] = json!(full.display().to_string());
            if let Some(f) = bfmt {
                v["backing-filename-format"] = json!(f);
            }
        }
    }
    v
}

fn print_human(v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    println!("image: {}", s("filename"));
    println!("file format: {}", s("format"));
    println!(
        "virtual size: {} ({} bytes)",
        human_size(n("virtual-size")),
        n("virtual-size")
    );
    println!("disk size: {}", human_size(n("actual-size")));
    if v.get("cluster-size").is_some() {
        println!("cluster_size: {}", n("cluster-size"));
    }
    if v.get("backing-filename").is_some() {
        println!("backing file: {}", s("backing-filename"));
        if v.get("backing-filename-format").is_some() {
            println!("backing file format: {}", s("backing-filename-format"));
        }
    }
    if let Some(d) = v["format-specific"]["data"].as_object() {
        if !d.is_empty() {
            println!("Format specific information:");
            for (k, val) in d {
                let shown = match val {
                    Value::String(x) => x.clone(),
                    other => other.to_string(),
                };
                println!("    {}: {}", k.replace('-', " "), shown);
            }
        }
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "output"])?;
    a.only(&["f", "output", "backing-chain", "U", "force-share"])?;
    let json = a.output()? == Output::Json;
    let file = &a.positional(1, "one image file")?[0];
    let lock = !(a.has("U") || a.has("force-share"));
    let img = open_image(file, a.value("f"), true, CacheMode::Writeback, lock)?;
    let mut layers = vec![describe(&img)];
    if a.has("backing-chain") {
        let mut cur = &img;
        while let Image::Qcow2(q) = cur {
            match q.backing() {
                Some(b) => {
                    layers.push(describe(b));
                    cur = b;
                }
                None => break,
            }
        }
    }
    if json {
        let out = if a.has("backing-chain") {
            Value::Array(layers)
        } else {
            layers.remove(0)
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        for (i, l) in layers.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_human(l);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_read_as_qemu_img_prints_them() {
        // Each figure is qemu-img 10's for that many bytes.
        for (bytes, shown) in [
            (0, "0 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1024, "1 KiB"),
            (1_572_864, "1.5 MiB"),
            (8 << 20, "8 MiB"),
            (1000 << 20, "0.977 GiB"),
            (1023 << 20, "0.999 GiB"),
            (123_456_789, "118 MiB"),
            (20 << 30, "20 GiB"),
            ((1 << 20) - 1, "1 MiB"),
            (10_240_000, "9.77 MiB"),
        ] {
            assert_eq!(human_size(bytes), shown, "{bytes} bytes");
        }
    }
}
