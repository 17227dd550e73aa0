//! `vmm-img convert [-p] [-q] [-c] [-f FMT] -O raw|qcow2 [-o opts] IN OUT`: copies the virtual
//! disk of IN (its whole chain, flattened) into a new image, skipping what reads as zeroes. With
//! `-c` (qcow2 only) each cluster that compresses below its size (zlib, or zstd with `-o
//! compression_type=zstd`) is stored compressed, as qemu-img stores it.
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

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "O", "o"])?;
    a.only(&["f", "O", "o", "p", "q", "c", "U", "force-share"])?;
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
        _ => copy(&input, 0, &output, o.size, &mut progress)?,
    }
    progress.finish();
    Ok(0)
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

/// Copies `len` bytes of `input` from offset `from` to `output` from offset 0, skipping what
/// reads as zeroes (the new image reads it as zeroes), then flushes `output`.
pub fn copy(
    input: &Image,
    from: u64,
    output: &Image,
    len: u64,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 21)];
    let mut off = 0;
    while off < len {
        let s = status(input, from + off, (len - off).min(CHUNK))?;
        if s.data {
            let n = usize::try_from(s.len).unwrap_or(buf.len()).min(buf.len());
            input.read_at(&mut buf[..n], from + off)?;
            // A run of zeroes in data is left unwritten: the new image reads it as zeroes.
            if buf[..n].iter().any(|&b| b != 0) {
                output.write_at(&buf[..n], off)?;
            }
        }
        off += s.len;
        progress.update(off, len);
    }
    output.flush()?;
    Ok(())
}
