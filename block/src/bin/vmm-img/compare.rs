//! `vmm-img compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B`: whether two images (each through
//! its whole chain) read the same, with qemu-img's messages and exit codes: 0 identical, 1
//! different, 2 an image could not be opened, 3 a block status failed, 4 a read failed.
//!
//! Ranges both images read as zeroes are not read; a range allocated in one only must read as
//! zeroes there. A mismatch is reported at the start of the first differing 512-byte sector.
//! Images of different sizes compare their common part, then the larger one's tail against
//! zeroes (`-s` refuses them instead). `-s` also requires the same block status everywhere: data,
//! zero or unallocated, as `map --output=json` reports it, and (as qemu-img's flags say) whether
//! the run reaches the end of the image.

use block::{CacheMode, DiskImage, Image};

use crate::args::Args;
use crate::chain::{open_image, status, Seg};
use crate::progress::Progress;
use crate::{CliError, CmdResult};

/// Largest piece read at once.
const CHUNK: u64 = 2 << 20;

/// Sector granularity of a reported mismatch.
const SECTOR: u64 = 512;

/// The outcome of comparing one range.
enum Found {
    Same,
    Mismatch(u64),
}

fn with_code(code: u8) -> impl Fn(CliError) -> CliError {
    move |e| CliError::Exit {
        code,
        error: Box::new(e),
    }
}

fn read(img: &Image, buf: &mut [u8], off: u64) -> Result<(), CliError> {
    img.read_at(buf, off).map_err(|e| with_code(4)(e.into()))
}

fn stat(img: &Image, off: u64, len: u64) -> Result<Seg, CliError> {
    status(img, off, len).map_err(with_code(3))
}

/// The first sector of `buf` (read at `off`) that is not all zeroes.
fn first_nonzero(buf: &[u8], off: u64) -> Found {
    match buf.iter().position(|&b| b != 0) {
        Some(i) => Found::Mismatch(off + sector_floor(i)),
        None => Found::Same,
    }
}

fn sector_floor(i: usize) -> u64 {
    let i = u64::try_from(i).unwrap_or(u64::MAX);
    i - i % SECTOR
}

/// Compares `[off, off + len)` of two images whose status there is `s1` and `s2`.
fn compare_range(
    imgs: [&Image; 2],
    segs: [&Seg; 2],
    off: u64,
    len: u64,
    bufs: &mut [Vec<u8>; 2],
) -> Result<Found, CliError> {
    let n = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(bufs[0].len());
    let [b1, b2] = bufs;
    if segs[0].zero && segs[1].zero {
        return Ok(Found::Same);
    }
    if segs[0].present == segs[1].present {
        if !segs[0].present {
            return Ok(Found::Same);
        }
        read(imgs[0], &mut b1[..n], off)?;
        read(imgs[1], &mut b2[..n], off)?;
        return Ok(
            match b1[..n].iter().zip(&b2[..n]).position(|(a, b)| a != b) {
                Some(i) => Found::Mismatch(off + sector_floor(i)),
                None => Found::Same,
            },
        );
    }
    let img = if segs[0].present { imgs[0] } else { imgs[1] };
    read(img, &mut b1[..n], off)?;
    Ok(first_nonzero(&b1[..n], off))
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "F"])?;
    a.only(&["f", "F", "s", "p", "q", "U", "force-share"])?;
    let files = a.positional(2, "two image file names")?;
    let quiet = a.has("q");
    let strict = a.has("s");
    let lock = !(a.has("U") || a.has("force-share"));
    let open = |file: &str, fmt| {
        open_image(file, fmt, true, CacheMode::Writeback, lock).map_err(with_code(2))
    };
    let img1 = open(&files[0], a.value("f"))?;
    let img2 = open(&files[1], a.value("F"))?;
    let say = |msg: &str| {
        if !quiet {
            println!("{msg}");
        }
    };
    let (size1, size2) = (img1.size(), img2.size());
    let common = size1.min(size2);
    let total = size1.max(size2);
    let mut progress = Progress::new(a.has("p") && !quiet);
    let mut bufs = [vec![0u8; 1 << 21], vec![0u8; 1 << 21]];
    let result = (|| -> Result<Option<String>, CliError> {
        if strict && size1 != size2 {
            return Ok(Some("Strict mode: Image size mismatch!".into()));
        }
        let mut off = 0;
        while off < common {
            let s1 = stat(&img1, off, size1 - off)?;
            let s2 = stat(&img2, off, size2 - off)?;
            // qemu-img's status flags include whether the run reaches the end of the image.
            let key = |s: &Seg, size: u64| (s.present, s.zero, s.data, off + s.len == size);
            if strict && key(&s1, size1) != key(&s2, size2) {
                return Ok(Some(format!(
                    "Strict mode: Offset {off} block status mismatch!"
                )));
            }
            let len = s1.len.min(s2.len).min(common - off).min(CHUNK);
            if let Found::Mismatch(at) =
                compare_range([&img1, &img2], [&s1, &s2], off, len, &mut bufs)?
            {
                return Ok(Some(format!("Content mismatch at offset {at}!")));
            }
            off += len;
            progress.update(off, total);
        }
        if size1 != size2 {
            say("Warning: Image size mismatch!");
            let over = if size1 > size2 { &img1 } else { &img2 };
            while off < total {
                let s = stat(over, off, total - off)?;
                let len = s.len.min(CHUNK);
                if s.present && !s.zero {
                    let n = usize::try_from(len)
                        .unwrap_or(usize::MAX)
                        .min(bufs[0].len());
                    read(over, &mut bufs[0][..n], off)?;
                    if let Found::Mismatch(at) = first_nonzero(&bufs[0][..n], off) {
                        return Ok(Some(format!("Content mismatch at offset {at}!")));
                    }
                }
                off += len;
                progress.update(off, total);
            }
        }
        Ok(None)
    })();
    progress.finish();
    match result? {
        Some(mismatch) => {
            say(&mismatch);
            Ok(1)
        }
        None => {
            say("Images are identical.");
            Ok(0)
        }
    }
}
