//! `vmm-img map [-f FMT] [--output=human|json] [-U] FILE`: where each run of the virtual disk
//! lives, with qemu-img map's output formats.

use block::CacheMode;

use crate::args::{Args, Output};
use crate::chain::{open_image, segments};
use crate::CmdResult;

/// C's `%#x`: `0` stays `0`.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "output"])?;
    a.only(&["f", "output", "U", "force-share"])?;
    let json = a.output()? == Output::Json;
    let file = &a.positional(1, "one image file")?[0];
    let lock = !(a.has("U") || a.has("force-share"));
    let img = open_image(file, a.value("f"), true, CacheMode::Writeback, lock)?;
    let segs = segments(&img)?;
    if json {
        let rows: Vec<String> = segs
            .iter()
            .map(|s| {
                let mut r = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    s.start, s.len, s.depth, s.present, s.zero, s.data, s.compressed
                );
                if let Some(o) = s.offset {
                    r.push_str(&format!(", \"offset\": {o}"));
                }
                r.push('}');
                r
            })
            .collect();
        println!("[{}]", rows.join(",\n"));
        return Ok(0);
    }
    println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    for s in segs.iter().filter(|s| s.data) {
        if let Some(o) = s.offset {
            println!(
                "{:<16}{:<16}{:<16}{}",
                hex(s.start),
                hex(s.len),
                hex(o),
                layer_name(&img, s.depth)
            );
        }
    }
    Ok(0)
}

/// The file name of the layer at `depth`.
fn layer_name(img: &block::Image, depth: u32) -> String {
    let mut cur = img;
    for _ in 0..depth {
        match cur {
            block::Image::Qcow2(q) => match q.backing() {
                Some(b) => cur = b,
                None => break,
            },
            block::Image::Raw(_) => break,
        }
    }
    match cur {
        block::Image::Qcow2(q) => q.file().path().to_string(),
        block::Image::Raw(r) => r.path().to_string(),
    }
}
