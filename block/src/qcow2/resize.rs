//! Growing a qcow2 image, open and possibly in use (QMP `block_resize`) or held alone
//! (`vmm-img resize`): the header's size and, when the disk needs more L1 entries, a longer L1
//! table. Growing a v2 image with internal snapshots is refused, as QEMU refuses it. Shrinking
//! is in `shrink.rs`.
//!
//! Under the metadata lock, so no lookup or allocation runs meanwhile; data I/O already past
//! its lookup continues (it stays inside the old size). The flush mutex is taken first, as
//! snapshot operations take it: a write-back writes its copies of the tables outside the
//! metadata lock, and must not write L1 entries into an old table whose clusters were freed. Power-cut order, as QEMU's
//! `qcow2_grow_l1_table` and `qcow2_co_truncate` keep it:
//!
//! - **L1 inside its clusters** (one 64 KiB cluster holds the L1 of a 4 TiB disk): the new
//!   entries are zeroed on disk and synced, then the header counting them and giving the new
//!   size is written and synced.
//! - **L1 outgrowing them**: every dirty table is written back first (so the copy carries only
//!   durable L1 entries); clusters are allocated for the new table, one contiguous run (clusters
//!   the allocator handed out that break the run are freed again; a table longer than the
//!   range of one refcount block, which only 512-byte to 4 KiB clusters reach below QEMU's
//!   32 MiB L1 limit, is refused), and their refcounts written
//!   and synced; the table (old entries, then zeroes) is written and synced; then the header
//!   naming it, with its length and the new size, in one synced write of the first sector; only
//!   then is the old table dropped from the overlap index and its clusters freed.
//!
//! A cut at any point leaves the old header (old table, old size: the new clusters leak at
//! most) or the new one over a durable table.

use std::sync::atomic::Ordering;

use super::header::Header;
use super::meta::{encode_words, Meta};
use super::validate::{FormatError, MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use super::Qcow2;
use crate::file::HostFile;
use crate::Error;

mod shrink;

impl Qcow2 {
    /// Grows the virtual disk to `new_size` bytes (steps in the module documentation). The
    /// caller keeps it a multiple of 512, as QEMU requires of qcow2.
    pub fn grow(&self, new_size: u64) -> Result<(), Error> {
        let path = || self.file.path().to_string();
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.refuse_if_corrupt()?;
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::Format {
                path: path(),
                source: FormatError::VirtualSize(new_size),
            });
        }
        // The flush mutex first (the order check and snapshots use): no write-back may write its
        // copies, which name the old L1 table, once that table's clusters are freed.
        let _flushing = self.flushing();
        let mut m = self.lock_for_maintenance();
        // A v2 snapshot takes the image's size as its own (v3 records it), as QEMU refuses.
        if m.header.version < 3 && m.header.nb_snapshots > 0 {
            return Err(Error::V2Snapshots { path: path() });
        }
        let size = m.header.size;
        if new_size < size {
            return Err(Error::Shrink {
                path: path(),
                size,
                new_size,
            });
        }
        let cs = m.cs();
        let new_l1 = new_size.div_ceil(m.geo.l2_entries() * cs);
        let l1_error = || Error::L1Growth {
            path: path(),
            size: new_size,
        };
        if new_l1 * 8 > MAX_L1_BYTES {
            return Err(l1_error());
        }
        let mut header = m.header.clone();
        header.size = new_size;
        let old_l1 = m.l1.len() as u64;
        let mut old_table = None;
        if new_l1 > old_l1 {
            header.l1_size = u32::try_from(new_l1).map_err(|_| l1_error())?;
            // Entries that fit in the clusters the table occupies (none when it has no entries:
            // then it may own no cluster at all).
            let room = (old_l1 * 8).div_ceil(cs) * cs / 8;
            if new_l1 <= room {
                let zeroes = usize::try_from((new_l1 - old_l1) * 8).map_err(|_| l1_error())?;
                self.file
                    .write_at(&vec![0u8; zeroes], header.l1_table_offset + old_l1 * 8)?;
                m.sync(&self.file)?;
            } else {
                header.l1_table_offset = self.write_new_l1(&mut m, new_l1)?;
                old_table = Some((m.header.l1_table_offset, (old_l1 * 8).div_ceil(cs)));
            }
        }
        write_header(&self.file, &m.header, &header)?;
        m.sync(&self.file)?;
        m.header = header;
        m.l1.resize(usize::try_from(new_l1).map_err(|_| l1_error())?, 0);
        self.overlap.build(&self.file, &m)?;
        self.size.store(new_size, Ordering::Release);
        // The header naming the new table is durable and the index no longer holds the old one.
        if let Some((offset, clusters)) = old_table {
            for k in 0..clusters {
                m.free_cluster(&self.file, offset + k * cs)?;
            }
        }
        Ok(())
    }

    /// Writes a copy of the L1 table, `entries` long, into newly allocated contiguous clusters,
    /// durable with their refcounts before this returns their offset.
    fn write_new_l1(&self, m: &mut Meta, entries: u64) -> Result<u64, Error> {
        let f = &self.file;
        let cs = m.cs();
        m.write_back(f)?;
        m.sync(f)?;
        let bytes = entries * 8;
        let too_large = || Error::TooLarge {
            path: f.path().to_string(),
            what: "L1 table",
            bytes,
        };
        // One allocation at a time: past the end of the file a refcount block is placed in the
        // first cluster of each range it covers, so runs of free clusters there are shorter
        // than a block's range, and a longer table is refused (QEMU places the table first and
        // the blocks after it).
        if bytes.div_ceil(cs) >= m.rc_per_block() {
            return Err(too_large());
        }
        let clusters = usize::try_from(bytes.div_ceil(cs)).map_err(|_| too_large())?;
        let mut run: Vec<u64> = Vec::with_capacity(clusters);
        let mut stray = Vec::new();
        while run.len() < clusters {
            let off = m.alloc_cluster(f)?;
            if run.last().is_some_and(|&last| off != last + cs) {
                stray.append(&mut run);
            }
            run.push(off);
        }
        // Nothing points at the strays: they go back at once.
        for off in stray {
            m.free_cluster(f, off)?;
        }
        m.write_refcount_blocks(f)?;
        m.sync(f)?;
        let mut table = m.l1.clone();
        table.resize(clusters * usize::try_from(cs / 8).unwrap_or(0), 0);
        let start = run[0];
        f.write_at(&encode_words(&table), start)?;
        m.sync(f)?;
        Ok(start)
    }
}

/// Writes `new` over `old` in the first cluster (clearing what the old one occupied past the new
/// end), not synced.
pub(super) fn write_header(f: &HostFile, old: &Header, new: &Header) -> Result<(), Error> {
    let fmt = |source| Error::Format {
        path: f.path().to_string(),
        source,
    };
    let old_len = old.encode().map_err(fmt)?.len();
    let mut b = new.encode().map_err(fmt)?;
    b.resize(b.len().max(old_len), 0);
    f.write_at(&b, 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use crate::file::test_hook::Hook;
    use crate::{DiskImage, Error, Format, Image, OpenOptions};

    fn tool(name: &str, args: &[&str]) -> std::process::Output {
        Command::new(name)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{name} is required (ci/setup installs it): {e}"))
    }

    /// A 1 MiB image of 512-byte clusters in `dir`, written by these qemu-io commands.
    fn seed(dir: &Path, writes: &[&str]) -> PathBuf {
        let seed = dir.join("seed.qcow2");
        let p = seed.to_str().unwrap();
        let out = tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                p,
                "1M",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let out = qemu_io(p, writes);
        assert!(out.status.success(), "{out:?}");
        seed
    }

    /// qemu-io running these commands on the qcow2 image at `p`.
    fn qemu_io(p: &str, commands: &[&str]) -> std::process::Output {
        let mut args = vec!["-f", "qcow2"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(p);
        tool("qemu-io", &args)
    }

    /// Asserts that the image at `path`, cut at call `from`, checks clean but for leaks and has
    /// the old size (1 MiB) or `new_size`.
    fn assert_old_or_new(path: &Path, from: usize, new_size: u64) {
        let check = tool("qemu-img", &["check", path.to_str().unwrap()]);
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "cut at call {from}: {check:?}"
        );
        let size = open_rw(path).size();
        assert!(
            size == 1 << 20 || size == new_size,
            "cut at call {from}: {size}"
        );
    }

    /// Asserts that these qemu-io reads of the image at `p`, cut at call `from`, verify.
    fn assert_reads(p: &str, reads: &[&str], from: usize) {
        let read = qemu_io(p, reads);
        let out = String::from_utf8_lossy(&read.stdout);
        assert!(
            read.status.success() && !out.contains("verification failed"),
            "cut at call {from}: {out}"
        );
    }

    fn open_rw(path: &Path) -> Image {
        let options = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..Default::default()
        };
        crate::open(path, options).unwrap()
    }

    /// Fails every call on the file from the `from`-th on (none with `usize::MAX`); counts them.
    fn cut_at(img: &Image, from: usize) -> Arc<AtomicUsize> {
        let Image::Qcow2(q) = img else {
            unreachable!("opened as qcow2")
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        q.file.set_hook(Some(Hook(Arc::new(move |_| {
            if c.fetch_add(1, Ordering::SeqCst) >= from {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }))));
        calls
    }

    /// A copy of `seed` named `name` beside it, opened and cut from call `from` on (see
    /// [`cut_at`]).
    fn cut_copy(seed: &Path, name: &str, from: usize) -> (PathBuf, Image, Arc<AtomicUsize>) {
        let path = seed.with_file_name(name);
        std::fs::copy(seed, &path).unwrap();
        let img = open_rw(&path);
        let calls = cut_at(&img, from);
        (path, img, calls)
    }

    /// A grow that moves the L1 table, stopped at each call on the file in turn (every later
    /// call failing, as after a power cut): the image checks clean but for leaks, has the old
    /// size or the new one, and reads its data back.
    #[test]
    fn a_grow_stopped_at_any_call_leaves_the_old_image_or_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        // 512-byte clusters: the L1 table of 1 MiB fits one cluster, that of 16 MiB does not.
        let seed = seed(dir.path(), &["write -P 5 0 4k", "write -P 6 1020k 4k"]);
        let new_size = 16 << 20;
        let calls = {
            let (_, img, calls) = cut_copy(&seed, "count.qcow2", usize::MAX);
            img.grow(new_size).unwrap();
            calls.load(Ordering::SeqCst)
        };
        assert!(calls > 6, "{calls} calls");
        for from in 0..calls {
            let (path, img, _) = cut_copy(&seed, &format!("cut{from}.qcow2"), from);
            // The last calls punch the old table's clusters out, which only logs a failure.
            let grown = img.grow(new_size);
            assert!(
                matches!(grown, Ok(()) | Err(Error::Io { .. })),
                "{from}: {grown:?}"
            );
            drop(img);
            assert_old_or_new(&path, from, new_size);
            let s = path.to_str().unwrap();
            assert_reads(s, &["read -P 5 0 4k", "read -P 6 1020k 4k"], from);
        }
    }

    /// A shrink of an image with an internal snapshot (every table shared), stopped at each call
    /// on the file in turn: the image checks clean but for leaks, has the old size or the new
    /// one, keeps the data before the new end, and its snapshot still holds everything.
    #[test]
    fn a_shrink_stopped_at_any_call_leaves_the_old_image_or_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        // 512-byte clusters: an L2 table maps 32 KiB, so the shrink drops many of them.
        let seed = seed(dir.path(), &["write -P 5 0 40k", "write -P 6 600k 200k"]);
        let p = seed.to_str().unwrap();
        let out = tool("qemu-img", &["snapshot", "-c", "s", p]);
        assert!(out.status.success(), "{out:?}");
        let out = qemu_io(p, &["write -P 7 700k 4k"]);
        assert!(out.status.success(), "{out:?}");
        // Inside an L2 table, past a written cluster.
        let new_size = 20 << 10;
        let calls = {
            let (_, img, calls) = cut_copy(&seed, "count.qcow2", usize::MAX);
            let Image::Qcow2(q) = &img else {
                unreachable!("opened as qcow2")
            };
            q.resize(new_size).unwrap();
            calls.load(Ordering::SeqCst)
        };
        assert!(calls > 6, "{calls} calls");
        for from in 0..calls {
            let (path, img, _) = cut_copy(&seed, &format!("cut{from}.qcow2"), from);
            let Image::Qcow2(q) = &img else {
                unreachable!("opened as qcow2")
            };
            let shrunk = q.resize(new_size);
            assert!(
                matches!(shrunk, Ok(()) | Err(Error::Io { .. })),
                "{from}: {shrunk:?}"
            );
            drop(img);
            assert_old_or_new(&path, from, new_size);
            let s = path.to_str().unwrap();
            assert_reads(s, &["read -P 5 0 20k"], from);
            let apply = tool("qemu-img", &["snapshot", "-a", "s", s]);
            assert!(apply.status.success(), "cut at call {from}: {apply:?}");
            assert_reads(s, &["read -P 5 0 40k", "read -P 6 600k 200k"], from);
        }
    }
}
