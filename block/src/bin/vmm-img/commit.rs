//! `vmm-img commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE`: writes what FILE (and every image
//! between it and BASE) allocates into BASE (by default FILE's backing file), then empties FILE
//! so that it reads through to the updated backing file, as qemu-img does. `-d` keeps FILE as it
//! was; `-b` implies `-d` (the images in between no longer match what lies under them).
//!
//! A base smaller than FILE grows to FILE's size first (its shrinking is left to the user).
//!
//! FILE and BASE are held under their write locks throughout. FILE is read through a second,
//! unlocked, read-only open of its chain; only ranges allocated above BASE are read from it, so
//! its view of BASE (which changes underneath) is never used. BASE is written through the engine
//! and synced before FILE is emptied: a crash before that leaves both images reading as before.

use std::path::Path;

use block::{CacheMode, DiskImage, Exclusive, FileId, Image};

use crate::args::{self, Args};
use crate::chain::{open_image, status};
use crate::progress::Progress;
use crate::{CliError, CmdResult};

/// Largest piece copied at once.
const CHUNK: u64 = 2 << 20;

/// How deep `base` (a path) lies in `img`'s chain (1 = the backing file).
fn depth_of(img: &Image, base: Option<&str>, file: &str) -> Result<usize, CliError> {
    match base {
        None => {
            if img.chain().nth(1).is_none() {
                return Err(CliError::Usage("Image does not have a backing file".into()));
            }
            Ok(1)
        }
        Some(b) => {
            // As given (from the working directory), or as a backing file name is resolved.
            let ids = [
                FileId::of_path(Path::new(b)),
                FileId::of_path(&block::resolve_backing(Path::new(file), b)),
            ];
            img.chain()
                .position(|i| ids.contains(&Some(i.file().id())))
                .filter(|&d| d > 0)
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "Did not find '{b}' in the backing chain of '{file}'"
                    ))
                })
        }
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "b"])?;
    a.only(&["f", "b", "d", "p", "q"])?;
    let file = &a.positional(1, "one image file")?[0];
    let quiet = a.has("q");
    let lock = Exclusive::open(Path::new(file), a.value("f").map(args::format).transpose()?)?;
    let top = open_image(file, a.value("f"), true, CacheMode::Writeback, false)?;
    let depth = depth_of(&top, a.value("b"), file)?;
    let base_layer = top
        .chain()
        .nth(depth)
        .ok_or_else(|| CliError::Usage("Image does not have a backing file".into()))?;
    let base_path = base_layer.file().path().to_string();
    if base_layer.size() < top.size() {
        // As qemu-img: a smaller base grows to the top's size first.
        Exclusive::open(Path::new(&base_path), Some(base_layer.format()))?.resize(top.size())?;
    }
    let base = block::open(
        Path::new(&base_path),
        block::OpenOptions {
            format: Some(base_layer.format()),
            read_only: false,
            ..Default::default()
        },
    )?;
    let depth = u32::try_from(depth).unwrap_or(u32::MAX);
    let size = top.size();
    let mut progress = Progress::new(a.has("p") && !quiet);
    let mut buf = vec![0u8; 1 << 21];
    let mut off = 0;
    while off < size {
        let s = status(&top, off, (size - off).min(CHUNK))?;
        if s.present && s.depth < depth {
            if s.zero {
                base.write_zeroes(off, s.len, false)?;
            } else {
                let n = usize::try_from(s.len).unwrap_or(buf.len()).min(buf.len());
                top.read_at(&mut buf[..n], off)?;
                base.write_at(&buf[..n], off)?;
            }
        }
        off += s.len;
        progress.update(off, size);
    }
    base.flush()?;
    drop(base);
    drop(top);
    if !a.has("d") && a.value("b").is_none() {
        lock.make_empty()?;
    }
    progress.finish();
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}
