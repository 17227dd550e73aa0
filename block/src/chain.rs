//! What live block jobs ask of a whole backing chain: which layer first allocates a range (QEMU's
//! `bdrv_is_allocated_above`), a copy into the top that never overwrites newer data (copy-up),
//! the top's backing name rewritten in place, and the locks of a chain reopened beside the one it
//! replaces.

use crate::qcow2::Mapping;
use crate::{lock, DiskImage, Error, Image};

impl Image {
    /// The depth (0 = this image) of the first layer of the chain that allocates the bytes at
    /// `offset` (data or zeroes of its own), or `None` when none does (they read as zeroes from
    /// beyond the chain), and for how many bytes from `offset` (at most `len`) that holds: the
    /// whole run of clusters with that answer, as QEMU's block status merges them.
    pub fn allocated_at(&self, offset: u64, len: u64) -> Result<(Option<usize>, u64), Error> {
        let (depth, mut run) = self.allocated_run(offset, len)?;
        while run < len {
            let (next, more) = self.allocated_run(offset + run, len - run)?;
            if next != depth {
                break;
            }
            run += more;
        }
        Ok((depth, run))
    }

    /// [`Image::allocated_at`] for the run that each layer's mapping answers at once (at most
    /// a cluster where an L2 table exists).
    fn allocated_run(&self, offset: u64, len: u64) -> Result<(Option<usize>, u64), Error> {
        let mut len = len;
        for (depth, layer) in self.chain().enumerate() {
            let Image::Qcow2(q) = layer else {
                return Ok((Some(depth), len));
            };
            let (mapping, run) = q.lookup(offset)?;
            len = len.min(run);
            if mapping != Mapping::Unallocated {
                return Ok((Some(depth), len));
            }
            if offset >= q.backing().map_or(0, DiskImage::size) {
                // Past the end of a shorter backing image: zeroes, allocated nowhere below.
                return Ok((None, len));
            }
        }
        Ok((None, len))
    }

    /// Writes `data` at `offset` only where this image still reads that range from its backing
    /// image, so that a guest write which got there first stays and the rest is copied; returns
    /// whether it wrote anything. A raw image has no backing image and never takes a copy.
    pub fn copy_up(&self, data: &[u8], offset: u64) -> Result<bool, Error> {
        match self {
            Image::Raw(_) => Ok(false),
            Image::Qcow2(q) => q.copy_up(data, offset),
        }
    }

    /// Records `backing` (a file name and its format), or none, as this qcow2 image's backing
    /// file, in place while it is open read-write (see [`crate::qcow2::Qcow2::set_backing_name`]).
    pub fn set_backing_name(&self, backing: Option<(String, String)>) -> Result<(), Error> {
        match self {
            Image::Raw(_) => Err(Error::BackingOfRaw {
                path: self.file().path().to_owned(),
            }),
            Image::Qcow2(q) => q.set_backing_name(backing),
        }
    }

    /// Takes the locks of every file of a chain opened without them (`OpenOptions::lock` false),
    /// once the chain it replaces, which held them, is closed: write on a writable image, read on
    /// the others.
    pub fn lock_chain(&self) -> Result<(), Error> {
        for layer in self.chain() {
            let file = layer.file();
            lock::lock_image(file.file(), file.path(), !layer.read_only())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::{Format, OpenOptions};

    const K: u64 = 1024;

    fn run(tool: &str, args: &[&str]) -> std::process::Output {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} is required (ci/setup installs it): {e}"));
        assert!(out.status.success(), "{tool} {args:?}: {out:?}");
        out
    }

    /// base (1 in [0, 192K), 4 in [1M, 1M+64K)) <- mid (2 in [128K, 320K), zeroes in
    /// [512K, 576K)) <- top (3 in [256K, 320K)), each 2 MiB, `opts` for the top.
    fn chain(dir: &Path, opts: &str) -> std::path::PathBuf {
        let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
        let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
        run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "2M"]);
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 192k",
                "-c",
                "write -P 4 1M 64k",
                &base,
            ],
        );
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid,
            ],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 2 128k 192k",
                "-c",
                "write -z 512k 64k",
                &mid,
            ],
        );
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(&top);
        run("qemu-img", &args);
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 3 256k 64k", &top],
        );
        dir.join("top.qcow2")
    }

    fn open_rw(path: &Path) -> Image {
        crate::open(
            path,
            OpenOptions {
                format: Some(Format::Qcow2),
                read_only: false,
                ..OpenOptions::default()
            },
        )
        .unwrap()
    }

    fn byte_at(img: &Image, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        img.read_at(&mut b, offset).unwrap();
        b[0]
    }

    #[test]
    fn allocated_at_names_the_first_layer_and_merges_runs() {
        let dir = tempfile::tempdir().unwrap();
        let top = open_rw(&chain(dir.path(), ""));
        let cases = [
            (0, 2048 * K, Some(2), 128 * K),
            (128 * K, 2048 * K, Some(1), 128 * K),
            (256 * K, 2048 * K, Some(0), 64 * K),
            (320 * K, 2048 * K, None, 192 * K),
            (512 * K, 2048 * K, Some(1), 64 * K),
            (1024 * K, 32 * K, Some(2), 32 * K),
            (1088 * K, 2048 * K - 1088 * K, None, 2048 * K - 1088 * K),
        ];
        for (offset, len, depth, run) in cases {
            assert_eq!(
                top.allocated_at(offset, len).unwrap(),
                (depth, run),
                "at {offset}"
            );
        }
    }

    #[test]
    fn copy_up_writes_only_where_the_top_reads_from_its_backing() {
        for opts in ["", "extended_l2=on"] {
            let dir = tempfile::tempdir().unwrap();
            let path = chain(dir.path(), opts);
            let top = open_rw(&path);
            // A guest write of one 4 KiB block into a cluster the top does not have.
            top.write_at(&[9u8; 4096], 64 * K).unwrap();
            assert!(top.copy_up(&[1u8; 64 * 1024], 0).unwrap(), "{opts}");
            // The cluster the guest wrote to is the top's now (whole, or those subclusters):
            // with subclusters, the rest of it is still copied.
            let sub = top.copy_up(&[7u8; 64 * 1024], 64 * K).unwrap();
            assert_eq!(
                sub,
                opts == "extended_l2=on",
                "{opts}: subclusters still unallocated"
            );
            assert!(!top.copy_up(&[8u8; 4096], 96 * K).unwrap(), "{opts}");
            assert!(!top.copy_up(&[7u8; 64 * 1024], 256 * K).unwrap(), "{opts}");
            assert_eq!(byte_at(&top, 64 * K), 9);
            assert_eq!(byte_at(&top, 96 * K), if sub { 7 } else { 1 });
            assert_eq!(byte_at(&top, 127 * K), if sub { 7 } else { 1 });
            assert_eq!(byte_at(&top, 256 * K), 3);
            assert!(matches!(
                top.copy_up(&[0u8; 4096], 2048 * K - 2 * K),
                Err(Error::OutOfRange { .. })
            ));
            drop(top);
            run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
        }
    }

    /// A copy-up over several clusters writes every part the top still reads from its backing
    /// image, in one go or piece by piece: whole clusters it lacks, the parts of clusters
    /// around, the subclusters a guest write left unallocated in a cluster (extended L2), and
    /// zeroes; the guest's data stays.
    #[test]
    fn a_copy_up_over_several_clusters_fills_every_part_the_top_lacks() {
        for opts in ["", "extended_l2=on"] {
            let dir = tempfile::tempdir().unwrap();
            let path = chain(dir.path(), opts);
            let top = open_rw(&path);
            // The guest writes 4 KiB at the start of the second cluster of the range.
            top.write_at(&[9u8; 4096], 128 * K).unwrap();
            let len = top.file().len().unwrap();
            // [32K, 600K): part of a cluster, a cluster partly the guest's, whole clusters
            // (the top's own at 256K among them), zeroes at [512K, 576K), part of a cluster.
            let mut data = vec![7u8; 568 * 1024];
            data[480 * 1024..544 * 1024].fill(0);
            assert!(top.copy_up(&data, 32 * K).unwrap(), "{opts}");
            let mut got = vec![0u8; 2048 * 1024];
            top.read_at(&mut got, 0).unwrap();
            for (i, &b) in got.iter().enumerate() {
                let at = i as u64;
                let want = match at {
                    _ if at < 32 * K => 1,
                    _ if (128 * K..132 * K).contains(&at) => 9,
                    // The cluster the guest's write copied from the backing image whole (no
                    // subclusters).
                    _ if opts.is_empty() && (132 * K..192 * K).contains(&at) => 2,
                    _ if (256 * K..320 * K).contains(&at) => 3,
                    _ if (512 * K..576 * K).contains(&at) => 0,
                    _ if at < 600 * K => 7,
                    _ if (1024 * K..1088 * K).contains(&at) => 4,
                    _ => 0,
                };
                assert_eq!(b, want, "{opts}: byte {at}");
            }
            // The zero cluster took no room: 8 data clusters at most, and a refcount or L2
            // table's growth.
            assert!(top.file().len().unwrap() <= len + 9 * 64 * K, "{opts}");
            drop(top);
            run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
        }
    }

    /// Whole clusters the top lacks are copied up as QEMU's copy-on-read writes them: one
    /// write for the run (new clusters next to each other in the file), none per cluster.
    #[test]
    fn a_copy_up_of_clusters_the_top_lacks_is_one_write() {
        use crate::file::test_hook::{Hook, Op};
        let dir = tempfile::tempdir().unwrap();
        let path = chain(dir.path(), "");
        let top = open_rw(&path);
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&writes);
        top.file()
            .set_hook(Some(Hook(std::sync::Arc::new(move |op| {
                if let Op::Write { len, .. } = op {
                    seen.lock().unwrap().push(len);
                }
                Ok(())
            }))));
        let mut data = crate::AlignedBuf::zeroed(512 * 1024);
        data.as_mut_slice().fill(7);
        assert!(top.copy_up(data.as_slice(), 640 * K).unwrap());
        assert_eq!(*writes.lock().unwrap(), [512 * K]);
        top.file().set_hook(None);
        assert_eq!(byte_at(&top, 640 * K), 7);
        assert_eq!(byte_at(&top, 1151 * K), 7);
        drop(top);
        run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
    }

    /// Zeroes copied up are a zero cluster, as QEMU's copy-on-read makes them: the file does not
    /// grow; part of a cluster is written as data.
    #[test]
    fn a_cluster_of_zeroes_copies_up_as_a_zero_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = chain(dir.path(), "");
        let top = open_rw(&path);
        let len = top.file().len().unwrap();
        assert!(top.copy_up(&[0u8; 64 * 1024], 320 * K).unwrap());
        assert_eq!(top.file().len().unwrap(), len);
        let status = top.block_status(320 * K, 64 * K).unwrap();
        assert_eq!(status.allocation, crate::Allocation::Zero);
        assert!(top.copy_up(&[0u8; 4096], 384 * K).unwrap());
        let status = top.block_status(384 * K, 4 * K).unwrap();
        assert!(matches!(status.allocation, crate::Allocation::Data { .. }));
        assert_eq!(byte_at(&top, 320 * K), 0);
        drop(top);
        run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
    }

    /// A copier pulls every cluster of the backing data up, one or eight clusters a copy-up,
    /// while a writer overwrites part of every cluster: whatever the interleaving, the writer's
    /// data is what stays, and every other byte reads as the backing data.
    #[test]
    fn a_guest_write_racing_a_copy_up_is_never_overwritten() {
        for (opts, clusters_a_copy) in [("", 1), ("", 8), ("extended_l2=on", 8)] {
            let dir = tempfile::tempdir().unwrap();
            let path = chain(dir.path(), opts);
            let top = std::sync::Arc::new(open_rw(&path));
            let clusters = 32u64;
            let mut want = vec![0u8; 2048 * 1024];
            top.read_at(&mut want, 0).unwrap();
            let copier = {
                let top = std::sync::Arc::clone(&top);
                std::thread::spawn(move || {
                    let step = clusters_a_copy * 64 * K;
                    let mut buf = crate::AlignedBuf::zeroed(usize::try_from(step).unwrap());
                    for at in (0..clusters * 64 * K).step_by(usize::try_from(step).unwrap()) {
                        // Read first, as a job does: the data may be stale when it is copied
                        // up.
                        let buf = buf.as_mut_slice();
                        top.chain().nth(1).unwrap().read_at(buf, at).unwrap();
                        std::thread::yield_now();
                        top.copy_up(buf, at).unwrap();
                    }
                })
            };
            for c in 0..clusters {
                let at = c * 64 * K + 8 * K;
                top.write_at(&[0xEE; 4096], at).unwrap();
                let at = usize::try_from(at).unwrap();
                want[at..at + 4096].fill(0xEE);
            }
            copier.join().unwrap();
            let mut got = vec![0u8; 2048 * 1024];
            top.read_at(&mut got, 0).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{opts}, {clusters_a_copy} a copy: byte {i}");
            }
            drop(top);
            run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
        }
    }

    #[test]
    fn the_backing_name_is_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = chain(dir.path(), "");
        let top = open_rw(&path);
        let base = dir.path().join("base.qcow2").to_str().unwrap().to_owned();
        top.set_backing_name(Some((base.clone(), "qcow2".into())))
            .unwrap();
        // The open chain is unchanged until reopened; the image keeps taking writes.
        top.write_at(&[5u8; 512], 0).unwrap();
        drop(top);
        let info = run(
            "qemu-img",
            &["info", "--output=json", path.to_str().unwrap()],
        );
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["backing-filename"], base.as_str());
        assert_eq!(info["backing-filename-format"], "qcow2");
        let top = open_rw(&path);
        assert_eq!(top.chain().count(), 2);
        top.set_backing_name(None).unwrap();
        drop(top);
        let info = run(
            "qemu-img",
            &["info", "--output=json", path.to_str().unwrap()],
        );
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
        run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
    }
}
