//! `vmm-img bench [-c COUNT] [-d DEPTH] [-f FMT] [-o OFFSET] [-s SIZE] [-S STEP]
//! [-t none|writeback] [-w] [--pattern=N] FILE`: qemu-img bench's flags and output. DEPTH
//! requests are in flight at once, each on a thread of its own issuing positional I/O through
//! the `DiskImage` trait, so the figure covers the engine's locking and metadata path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use block::{CacheMode, DiskImage};

use crate::args::{self, Args};
use crate::chain::open_image;
use crate::{CliError, CmdResult};

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["c", "d", "f", "o", "s", "S", "t", "pattern"])?;
    a.only(&[
        "c",
        "d",
        "f",
        "o",
        "s",
        "S",
        "t",
        "w",
        "q",
        "pattern",
        "U",
        "force-share",
    ])?;
    let file = &a.positional(1, "one image file")?[0];
    let num = |k: &str, d: u64| a.value(k).map_or(Ok(d), args::size);
    let count = num("c", 75000)?;
    let depth = num("d", 64)?.clamp(1, 1024);
    let start = num("o", 0)?;
    let bufsize = num("s", 4096)?;
    let step = num("S", bufsize)?;
    let pattern = u8::try_from(a.value("pattern").map_or(Ok(0), args::number)?)
        .map_err(|_| CliError::Usage("--pattern must be a byte".into()))?;
    let write = a.has("w");
    let t = a.value("t").unwrap_or("writeback");
    let cache = CacheMode::parse(t)
        .ok_or_else(|| CliError::Usage(format!("unsupported cache mode '{t}'")))?;
    let lock = !(a.has("U") || a.has("force-share"));
    let img = open_image(file, a.value("f"), !write, cache, lock)?;
    let size = img.size();
    if bufsize == 0 || bufsize > size {
        return Err(CliError::Usage(format!(
            "buffer size {bufsize} does not fit the image"
        )));
    }
    let bs = usize::try_from(bufsize).map_err(|_| CliError::Usage("buffer too large".into()))?;
    if !a.has("q") {
        println!(
            "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {start}, step size {step})",
            if write { "write" } else { "read" }
        );
    }
    let span = size - bufsize;
    let next = AtomicU64::new(0);
    let t0 = Instant::now();
    let results: Vec<Result<(), block::Error>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..depth)
            .map(|_| {
                let (img, next) = (&img, &next);
                s.spawn(move || {
                    // An aligned buffer, so cache=none needs no bounce copy.
                    let mut v = vec![pattern; bs + 4096];
                    let at = v.as_ptr().align_offset(4096);
                    let buf = &mut v[at..at + bs];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        let off = if span == 0 {
                            0
                        } else {
                            (start + i * step) % span
                        };
                        if write {
                            img.write_at(buf, off)?;
                        } else {
                            img.read_at(buf, off)?;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Ok(())))
            .collect()
    });
    for r in results {
        r?;
    }
    let secs = t0.elapsed().as_secs_f64();
    if !a.has("q") {
        println!("Run completed in {secs:.3} seconds.");
    }
    // As with qemu-img bench, the final flush (on close) is not part of the measured run.
    if write {
        img.flush()?;
    }
    Ok(0)
}
