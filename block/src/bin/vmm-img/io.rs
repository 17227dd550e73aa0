//! `vmm-img io [-f FMT | --image-opts] [-r] [-t CACHE] [-U] [-C] -c CMD... FILE`: qemu-io's command
//! syntax for `read [-P pattern]`, `write [-P pattern] [-z [-u]]`, `discard`, `flush`, with k/M/G
//! suffixes. `read -P` fails on a mismatch. `-C` (`--copy-on-read`, as qemu-io's) makes every read
//! copy what it found in the backing chain into the image, over the read's whole clusters, the
//! way a `block-stream` step does (`Image::copy_up`). Without `-c`, commands are read from standard input one line
//! at a time after a `vmm-img> ` prompt (as qemu-io's `qemu-io> `), each run and reported
//! before the next prompt, so a driver knows when a command (a flush too) has returned; the
//! first failing command ends the run.

use std::io::{BufRead, Write};
use std::time::Instant;

use block::{CacheMode, DiskImage, Image};

use crate::args::{self, Args};
use crate::image_opts::ImageSpec;
use crate::{CliError, CmdResult};

/// One parsed qemu-io command.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Read {
        pattern: Option<u8>,
        off: u64,
        len: u64,
    },
    Write {
        pattern: u8,
        zero: bool,
        unmap: bool,
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
}

fn parse(line: &str) -> Result<Cmd, CliError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Err(CliError::Usage("empty command".into()));
    };
    let mut pattern = None;
    let mut zero = false;
    let mut unmap = false;
    let mut pos = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-P" => {
                let p = it
                    .next()
                    .ok_or_else(|| CliError::Usage(format!("{name}: -P needs a pattern")))?;
                let v = args::number(p)?;
                pattern = Some(u8::try_from(v & 0xff).unwrap_or(0));
            }
            "-z" => zero = true,
            "-u" => unmap = true,
            "-q" | "-v" => {}
            w if w.starts_with('-') => {
                return Err(CliError::Usage(format!("{name}: unsupported option '{w}'")))
            }
            w => pos.push(args::size(w)?),
        }
    }
    let two = |pos: &[u64]| match pos {
        [o, l] => Ok((*o, *l)),
        _ => Err(CliError::Usage(format!("{name}: expected OFFSET LENGTH"))),
    };
    Ok(match name {
        "read" => {
            let (off, len) = two(&pos)?;
            Cmd::Read { pattern, off, len }
        }
        "write" => {
            let (off, len) = two(&pos)?;
            Cmd::Write {
                pattern: pattern.unwrap_or(0xcd),
                zero,
                unmap,
                off,
                len,
            }
        }
        "discard" => {
            let (off, len) = two(&pos)?;
            Cmd::Discard { off, len }
        }
        "flush" if pos.is_empty() => Cmd::Flush,
        _ => {
            return Err(CliError::Usage(format!(
                "unknown or malformed command '{line}'"
            )))
        }
    })
}

fn report(what: &str, off: u64, len: u64, t0: Instant) {
    let secs = t0.elapsed().as_secs_f64();
    println!("{what} {len}/{len} bytes at offset {off}");
    println!(
        "{len} bytes, 1 ops; {secs:.4} sec ({:.3} MiB/sec and {:.4} ops/sec)",
        len as f64 / (1 << 20) as f64 / secs.max(1e-9),
        1.0 / secs.max(1e-9)
    );
}

fn buf_len(len: u64) -> Result<usize, CliError> {
    usize::try_from(len).map_err(|_| CliError::Usage(format!("length {len} too large")))
}

/// Reads `len` bytes at `off`; with `copy_on_read`, reads the clusters around them whole (QEMU
/// widens a copy-on-read to clusters too) and copies up what the backing chain gave.
fn read(img: &Image, off: u64, len: u64, copy_on_read: bool) -> Result<Vec<u8>, CliError> {
    let end = off.checked_add(len).filter(|&e| e <= img.size());
    let (Image::Qcow2(q), true, Some(end)) = (img, copy_on_read, end) else {
        // A raw image has no backing file to copy from; a request past the end fails as is.
        let mut buf = vec![0u8; buf_len(len)?];
        img.read_at(&mut buf, off)?;
        return Ok(buf);
    };
    let cs = q.header().cluster_size();
    let start = off - off % cs;
    let mut buf = vec![0u8; buf_len(end.next_multiple_of(cs).min(img.size()) - start)?];
    img.read_at(&mut buf, start)?;
    img.copy_up(&buf, start)?;
    buf.drain(..buf_len(off - start)?);
    buf.truncate(buf_len(len)?);
    Ok(buf)
}

fn exec(img: &Image, cmd: &Cmd, copy_on_read: bool) -> Result<(), CliError> {
    let t0 = Instant::now();
    match *cmd {
        Cmd::Read { pattern, off, len } => {
            let buf = read(img, off, len, copy_on_read)?;
            if let Some(p) = pattern {
                if buf.iter().any(|&b| b != p) {
                    return Err(CliError::Pattern { offset: off, len });
                }
            }
            report("read", off, len, t0);
        }
        Cmd::Write {
            pattern,
            zero,
            unmap,
            off,
            len,
        } => {
            if zero {
                img.write_zeroes(off, len, unmap)?;
            } else {
                img.write_at(&vec![pattern; buf_len(len)?], off)?;
            }
            report("wrote", off, len, t0);
        }
        Cmd::Discard { off, len } => {
            img.discard(off, len)?;
            report("discard", off, len, t0);
        }
        Cmd::Flush => img.flush()?,
    }
    Ok(())
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "c", "t"])?;
    a.only(&[
        "f",
        "c",
        "t",
        "r",
        "U",
        "force-share",
        "image-opts",
        "C",
        "copy-on-read",
    ])?;
    let file = &a.positional(1, "one image file")?[0];
    let cmds = a
        .values("c")
        .iter()
        .map(|c| parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let cache = match a.value("t") {
        None => CacheMode::Writeback,
        Some(t) => CacheMode::parse(t)
            .ok_or_else(|| CliError::Usage(format!("unsupported cache mode '{t}'")))?,
    };
    let read_only = a.has("r");
    let lock = !(a.has("U") || a.has("force-share")) || !read_only;
    let copy_on_read = a.has("C") || a.has("copy-on-read");
    if copy_on_read && read_only {
        return Err(CliError::Usage(
            "copy-on-read writes into the image: not with -r".into(),
        ));
    }
    let img = ImageSpec::from_args(&a, file)?.open(read_only, cache, lock)?;
    for c in &cmds {
        exec(&img, c, copy_on_read)?;
    }
    if a.values("c").is_empty() {
        let mut lines = std::io::stdin().lock().lines();
        loop {
            print!("vmm-img> ");
            // A closed standard output only loses the prompt; the commands still run.
            let _ = std::io::stdout().flush();
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|e| CliError::Usage(format!("reading commands: {e}")))?;
            if !line.trim().is_empty() {
                exec(&img, &parse(&line)?, copy_on_read)?;
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn commands_parse_like_qemu_io() {
        assert_eq!(
            parse("write -P 0xab 4k 1M").unwrap(),
            Cmd::Write {
                pattern: 0xab,
                zero: false,
                unmap: false,
                off: 4096,
                len: 1 << 20
            }
        );
        assert_eq!(
            parse("read -P 7 0 512").unwrap(),
            Cmd::Read {
                pattern: Some(7),
                off: 0,
                len: 512
            }
        );
        assert_eq!(
            parse("discard 1G 64k").unwrap(),
            Cmd::Discard {
                off: 1 << 30,
                len: 65536
            }
        );
        assert_eq!(parse("flush").unwrap(), Cmd::Flush);
        assert!(matches!(parse("read 0"), Err(CliError::Usage(_))));
        assert!(matches!(parse("write -x 0 1"), Err(CliError::Usage(_))));
        assert!(matches!(parse("frob 0 1"), Err(CliError::Usage(_))));
    }
}
