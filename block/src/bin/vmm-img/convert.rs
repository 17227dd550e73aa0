//! `vmm-img convert [-p] [-q] [-c] [-f FMT] -O raw|qcow2 [-o opts] IN OUT`: copies the virtual
//! disk of IN (its whole chain, flattened) into a new image, skipping what reads as zeroes. With
//! `-c` (qcow2 only) each cluster that compresses below its size (zlib, or zstd with `-o
//! compression_type=zstd`) is stored compressed, as qemu-img stores it.
//!
//! `-S SIZE` (default 4 KiB, a multiple of 512 up to 16 MiB) is the shortest run of zeroes in
//! the input's data left unwritten (the new image reads it as zeroes); `-S 0` writes every byte,
//! the ranges that read as zeroes too (a fully allocated output). `-m N` (1 to 16) and `-W` are
//! checked and taken as qemu-img takes them but change nothing here (the copy runs in order, one
//! piece at a time): the output is the same.
//!
//! OUT is left untouched when it is IN or one of IN's backing files (by device and inode, so
//! through any symlink or hard link) and while another process holds it: its write lock is
//! taken before it is truncated. qemu-img refuses the same through its locks, except with `-U`,
//! where it empties IN.

use block::qcow2::create::CreateOptions;
use block::qcow2::{CompressedWriter, Qcow2};
use block::{CacheMode, DiskImage, Image, NewImage};

use crate::args::{self, Args};
use crate::chain::{open_image, status};
use crate::progress::Progress;
use crate::{CliError, CmdResult};

/// Largest piece copied at once.
const CHUNK: u64 = 2 << 20;
/// The unit of `-S`.
const SECTOR: u64 = 512;

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "O", "o", "S", "m"])?;
    a.only(&[
        "f",
        "O",
        "o",
        "p",
        "q",
        "c",
        "U",
        "force-share",
        "S",
        "m",
        "W",
    ])?;
    let min_sparse = a.value("S").map_or(Ok(4096), min_sparse)?;
    if let Some(m) = a.value("m") {
        let n: i64 = m.parse().map_err(|_| {
            CliError::Usage(format!("Invalid number of coroutines specified: '{m}'."))
        })?;
        if !(1..=16).contains(&n) {
            return Err(CliError::Usage(
                "Invalid number of coroutines specified. Must be between 1 and 16.".into(),
            ));
        }
    }
    let files = a.positional(2, "IN and OUT")?;
    let out_fmt = args::format(a.value("O").unwrap_or("raw"))?;
    if a.has("c") && out_fmt != block::Format::Qcow2 {
        return Err(CliError::Usage(
            "Compression not supported for this file format".into(),
        ));
    }
    let lock = !(a.has("U") || a.has("force-share"));
    let input = open_image(&files[0], a.value("f"), true, CacheMode::Writeback, lock)?;
    let mut o = CreateOptions {
        size: input.size(),
        ..Default::default()
    };
    crate::create::apply_options(&mut o, a.values("o"))?;
    let output = new_target(&input, &files[1], out_fmt, &o)?;
    let mut progress = Progress::new(a.has("p") && !a.has("q"));
    match &output {
        Image::Qcow2(q) if a.has("c") => copy_compressed(&input, q, &mut progress)?,
        _ => copy(&input, 0, &output, o.size, Some(min_sparse), &mut progress)?,
    }
    progress.finish();
    Ok(0)
}

/// The value of `-S`, checked as qemu-img checks it.
fn min_sparse(v: &str) -> Result<u64, CliError> {
    if v.starts_with('-') {
        return Err(CliError::Usage(format!(
            "Invalid buffer size for sparse output specified. Must be between 0 and {}.",
            i64::MAX
        )));
    }
    let n = args::size(v).map_err(|_| {
        CliError::Usage(format!(
            "Invalid buffer size for sparse output specified: '{v}'."
        ))
    })?;
    if n % SECTOR != 0 || n > 16 << 20 {
        return Err(CliError::Usage(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 \
             up to 16777216. Select 0 to disable sparse detection (fully allocates output)."
                .into(),
        ));
    }
    Ok(n)
}

/// Copies the whole of `input` into the new qcow2 image `output` cluster by cluster, each
/// compressed when that makes it smaller; clusters reading as zeroes are left unallocated.
fn copy_compressed(input: &Image, output: &Qcow2, progress: &mut Progress) -> Result<(), CliError> {
    let len = input.size();
    let cs = output.header().cluster_size();
    let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let mut writer = CompressedWriter::new();
    let mut off = 0;
    while off < len {
        let n = cs.min(len - off);
        let s = status(input, off, n)?;
        if s.data || s.len < n {
            let (head, tail) = buf.split_at_mut(usize::try_from(n).unwrap_or(0));
            input.read_at(head, off)?;
            // Past the end of the disk: zeroes, compressed with the rest (as qemu-img pads).
            tail.fill(0);
            if buf.iter().any(|&b| b != 0) {
                writer.write(output, off, &buf)?;
            }
        }
        off += n;
        progress.update(off, len);
    }
    output.flush()?;
    Ok(())
}

/// Creates the image `path` (`o` says its size and options) that a copy of `input` writes,
/// refusing a target that is `input` or a file of its chain.
pub fn new_target(
    input: &Image,
    path: &str,
    format: block::Format,
    o: &CreateOptions,
) -> Result<Image, CliError> {
    let target = NewImage::open(std::path::Path::new(path))?;
    if let Some(read) = input.chain().find(|i| i.file().id() == target.id()) {
        return Err(CliError::ConvertOntoInput {
            target: path.to_string(),
            image: read.file().path().to_string(),
        });
    }
    target.format(format, o)?;
    Ok(target.into_image(format, block::CacheMode::Writeback)?)
}

/// Copies `len` bytes of `input` from offset `from` to `output` from offset 0, then flushes
/// `output`. What reads as zeroes is left unwritten (the new image reads it as zeroes): with
/// `min_sparse` None, each piece of data that is all zeroes; with `Some(n)`, each run of at
/// least `n` bytes (whole sectors) of zeroes in the data; with `Some(0)`, nothing (every byte
/// is written).
pub fn copy(
    input: &Image,
    from: u64,
    output: &Image,
    len: u64,
    min_sparse: Option<u64>,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 21)];
    let mut off = 0;
    while off < len {
        let s = status(input, from + off, (len - off).min(CHUNK))?;
        let n = usize::try_from(s.len).unwrap_or(buf.len()).min(buf.len());
        if s.data {
            input.read_at(&mut buf[..n], from + off)?;
        } else if min_sparse == Some(0) {
            buf[..n].fill(0);
        }
        if s.data || min_sparse == Some(0) {
            match min_sparse {
                None if buf[..n].iter().all(|&b| b == 0) => {}
                None | Some(0) => output.write_at(&buf[..n], off)?,
                Some(min) => write_sparse(output, &buf[..n], off, min)?,
            }
        }
        off += n as u64;
        progress.update(off, len);
    }
    output.flush()?;
    Ok(())
}

/// Writes `buf` to `output` at `off` but for its runs of whole zero sectors at least `min`
/// bytes long.
fn write_sparse(output: &Image, buf: &[u8], off: u64, min: u64) -> Result<(), CliError> {
    let sector = usize::try_from(SECTOR).unwrap_or(512);
    let min = usize::try_from(min).unwrap_or(usize::MAX);
    let zero = |i: usize| buf[i..(i + sector).min(buf.len())].iter().all(|&b| b == 0);
    // The start of the data not yet written, and of the current run of zero sectors.
    let (mut pending, mut run) = (0, None);
    let mut i = 0;
    while i < buf.len() {
        if zero(i) {
            run.get_or_insert(i);
        } else if let Some(r) = run.take() {
            if i - r >= min {
                if r > pending {
                    output.write_at(&buf[pending..r], off + pending as u64)?;
                }
                pending = i;
            }
        }
        i += sector;
    }
    let end = match run {
        Some(r) if buf.len() - r >= min => r,
        _ => buf.len(),
    };
    if end > pending {
        output.write_at(&buf[pending..end], off + pending as u64)?;
    }
    Ok(())
}
