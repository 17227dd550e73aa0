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

pub fn human_size(v: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut f = v as f64;
    let mut u = 0;
    while f >= 1024.0 && u + 1 < units.len() {
        f /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else {
        // qemu-img prints three significant digits.
        let s = format!("{f:.3}");
        let s = &s[..4.min(s.len())];
        format!(
            "{} {}",
            s.trim_end_matches('.').trim_end_matches(".0"),
            units[u]
        )
    }
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
