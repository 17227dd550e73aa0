//! Power-cut consistency (see `powercut/mod.rs`): each workload runs under the recorder with our
//! `vmm-img io` and, as the control, QEMU's `qemu-io`; every rebuilt state must pass `qemu-img
//! check`, open read-write in our engine and read only allowed values. A replay that ignores the
//! barriers must fail the same checks (the checks bite).
#![allow(clippy::unwrap_used)]

mod common;
mod powercut;

use std::path::{Path, PathBuf};

use common::*;
use powercut::driver::Tool;
use powercut::Workload;

/// Disk size of most workloads.
const SIZE: u64 = 4 << 20;
const SECTOR: u64 = 512;

/// Makes command lists with a distinct pattern per write (1..=0x9f; backing data uses 0xa0..).
struct Gen {
    rng: fastrand::Rng,
    pat: u8,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen {
            rng: fastrand::Rng::with_seed(seed),
            pat: 0,
        }
    }

    fn pattern(&mut self) -> u8 {
        self.pat = self.pat % 0x9f + 1;
        self.pat
    }

    /// A sector-aligned range of 1..=max sectors inside the disk.
    fn range(&mut self, size: u64, max: u64) -> (u64, u64) {
        let len = self.rng.u64(1..=max) * SECTOR;
        let off = self.rng.u64(0..=(size - len) / SECTOR) * SECTOR;
        (off, len)
    }

    fn write(&mut self, off: u64, len: u64) -> String {
        format!("write -P {} {off} {len}", self.pattern())
    }

    /// Splits commands into batches of 1 to 4, each closed by a flush.
    fn batches(&mut self, cmds: Vec<String>) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut it = cmds.into_iter().peekable();
        while it.peek().is_some() {
            let n = self.rng.usize(1..=4);
            let mut b: Vec<String> = it.by_ref().take(n).collect();
            b.push("flush".into());
            out.push(b);
        }
        out
    }
}

/// A backing file `base.qcow2` of `size` bytes, each 64 KiB filled with its own byte (0xa0..).
fn base(dir: &Path, size: u64) {
    let b = dir.join("base.qcow2");
    create_qcow2(&[b.to_str().unwrap(), &size.to_string()]);
    let cmds: Vec<String> = (0..size >> 16)
        .map(|i| format!("write -P {} {} 65536", 0xa0 + i % 16, i << 16))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&b, "qcow2", &cmds);
}

/// `top.qcow2` over `base.qcow2` with `-o opts`.
fn overlay(dir: &Path, size: u64, opts: &str) -> PathBuf {
    base(dir, size);
    let t = dir.join("top.qcow2");
    create_qcow2(&[
        "-o",
        opts,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        t.to_str().unwrap(),
        &size.to_string(),
    ]);
    t
}

/// `top.qcow2` without a backing file.
fn plain(dir: &Path, size: u64, opts: &str) -> PathBuf {
    let t = dir.join("top.qcow2");
    create_qcow2(&["-o", opts, t.to_str().unwrap(), &size.to_string()]);
    t
}

fn copy_up(cs: u64, seed: u64) -> Workload {
    let mut g = Gen::new(seed);
    let cmds = (0..32)
        .map(|_| {
            let (o, l) = g.range(SIZE, 2 * cs / SECTOR);
            g.write(o, l)
        })
        .collect();
    Workload {
        name: format!("copy-up cluster_size={cs}"),
        create: Box::new(move |d| overlay(d, SIZE, &format!("cluster_size={cs}"))),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: false,
    }
}

/// Reads that copy what the backing file gives into the top (`io -C`, a `block-stream` step's
/// write: the whole clusters the top lacks in one batch per L2 table, parts of clusters and
/// zeroes piece by piece) among guest writes into the same clusters. The backing file has a
/// zeroed region, copied up as zero clusters. With 512-byte clusters an L2 table maps 32 KiB, so
/// a read of up to 64 KiB spans tables.
fn copy_on_read(cs: u64, seed: u64) -> Workload {
    let mut g = Gen::new(seed);
    let max = (64 << 10).max(4 * cs) / SECTOR;
    let cmds = (0..48)
        .map(|_| {
            let (o, l) = g.range(SIZE, max);
            if g.rng.u8(0..3) == 0 {
                g.write(o, l)
            } else {
                format!("read {o} {l}")
            }
        })
        .collect();
    Workload {
        name: format!("copy-on-read cluster_size={cs}"),
        create: Box::new(move |d| {
            let t = overlay(d, SIZE, &format!("cluster_size={cs}"));
            qemu_io(&d.join("base.qcow2"), "qcow2", &["write -z 1M 256k"]);
            t
        }),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: true,
    }
}

/// `copy_on_read`'s reads and writes with the smallest metadata caches (2 L2 tables, 4 refcount
/// blocks, as `small_cache`): a copy-up's batch spans more L2 tables than the cache holds, so
/// dirty tables holding copied-up entries are written back between flushes.
fn copy_on_read_small_cache(seed: u64) -> Workload {
    Workload {
        name: "copy-on-read, small metadata cache cluster_size=512".into(),
        image_opts: Some("l2-cache-size=1024,refcount-cache-size=1024".into()),
        ..copy_on_read(512, seed)
    }
}

fn whole_clusters(cs: u64, seed: u64) -> Workload {
    let mut g = Gen::new(seed);
    let cmds = (0..32)
        .map(|_| {
            let n = g.rng.u64(1..=4);
            let off = g.rng.u64(0..=SIZE / cs - n) * cs;
            g.write(off, n * cs)
        })
        .collect();
    Workload {
        name: format!("whole clusters cluster_size={cs}"),
        create: Box::new(move |d| plain(d, SIZE, &format!("cluster_size={cs}"))),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: false,
    }
}

fn zeroes_and_discards(cs: u64, seed: u64, discard: bool) -> Workload {
    let mut g = Gen::new(seed);
    let cmds = (0..40)
        .map(|_| {
            // Half on cluster boundaries, half anywhere.
            let (o, l) = if g.rng.bool() {
                let n = g.rng.u64(1..=3);
                (g.rng.u64(0..=SIZE / cs - n) * cs, n * cs)
            } else {
                g.range(SIZE, 2 * cs / SECTOR)
            };
            match (g.rng.u8(0..4), discard) {
                (0 | 1, _) => g.write(o, l),
                (2, false) => format!("write -z {o} {l}"),
                (_, false) => format!("write -z -u {o} {l}"),
                (_, true) => format!("discard {o} {l}"),
            }
        })
        .collect();
    let what = if discard { "discard" } else { "write-zeroes" };
    Workload {
        name: format!("{what} cluster_size={cs}"),
        create: Box::new(move |d| overlay(d, SIZE, &format!("cluster_size={cs}"))),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: false,
    }
}

/// Partial writes into clusters that `prepare` made (compressed, or shared with a snapshot).
fn cow(cs: u64, seed: u64, compressed: bool) -> Workload {
    let size: u64 = 2 << 20;
    let mut g = Gen::new(seed);
    let cmds = (0..32)
        .map(|_| {
            let (o, l) = g.range(size, cs / SECTOR);
            g.write(o, l)
        })
        .collect();
    let what = if compressed {
        "compressed-cluster"
    } else {
        "snapshot-shared"
    };
    Workload {
        name: format!("{what} copy-on-write cluster_size={cs}"),
        create: Box::new(move |d| {
            let t = plain(d, size, &format!("cluster_size={cs}"));
            let flag = if compressed { "-c " } else { "" };
            let cmds: Vec<String> = (0..size / cs)
                .map(|i| format!("write {flag}-P {} {} {cs}", 0xb0 + i % 16, i * cs))
                .collect();
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&t, "qcow2", &cmds);
            if !compressed {
                qemu_img(&["snapshot", "-c", "s1", t.to_str().unwrap()]);
            }
            t
        }),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: false,
    }
}

fn extended_l2(cs: u64, seed: u64) -> Workload {
    let mut g = Gen::new(seed);
    let cmds = (0..40)
        .map(|_| {
            let (o, l) = g.range(SIZE, cs / SECTOR);
            match g.rng.u8(0..5) {
                0 => format!("write -z {o} {l}"),
                1 => format!("discard {o} {l}"),
                _ => g.write(o, l),
            }
        })
        .collect();
    Workload {
        name: format!("extended_l2 cluster_size={cs}"),
        create: Box::new(move |d| overlay(d, SIZE, &format!("cluster_size={cs},extended_l2=on"))),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: false,
    }
}

/// Names of the workloads that grow the refcount table: the run must see the header switch.
const GROWS: &str = "refcount table growth";

/// 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB of file,
/// so 128 writes of 32 KiB on average (some 3 MiB of the 6 MiB disk written) grow the refcount
/// table, and every 32 KiB of guest data needs a new L2 table.
fn table_growth(seed: u64) -> Workload {
    let size: u64 = 6 << 20;
    let mut g = Gen::new(seed);
    let cmds = (0..128)
        .map(|_| {
            let (o, l) = g.range(size, 128);
            g.write(o, l)
        })
        .collect();
    Workload {
        name: format!("L2 and {GROWS} cluster_size=512"),
        create: Box::new(move |d| plain(d, size, "cluster_size=512,refcount_bits=64")),
        batches: g.batches(cmds),
        command: None,
        image_opts: None,
        copy_on_read: false,
    }
}

/// The smallest metadata caches: 2 L2 tables and 2 refcount blocks asked for (each engine keeps
/// its minimum, 2 L2 tables and 4 refcount blocks), given to both tools through `--image-opts`.
/// 512-byte clusters with 64-bit refcounts: an L2 table maps 32 KiB of the disk and a refcount
/// block 32 KiB of the file, so scattered writes over a backing file need a table load, and
/// evict a dirty table, at almost every write between flushes.
fn small_cache(seed: u64) -> Workload {
    let mut g = Gen::new(seed);
    let cmds = (0..96)
        .map(|_| {
            let (o, l) = g.range(SIZE, 4);
            if g.rng.u8(0..8) == 0 {
                format!("write -z {o} {l}")
            } else {
                g.write(o, l)
            }
        })
        .collect();
    Workload {
        name: "small metadata cache cluster_size=512".into(),
        create: Box::new(|d| overlay(d, SIZE, "cluster_size=512,refcount_bits=64")),
        batches: g.batches(cmds),
        command: None,
        image_opts: Some("l2-cache-size=1024,refcount-cache-size=1024".into()),
        copy_on_read: false,
    }
}

/// The smallest metadata caches while the refcount table grows: `table_growth`'s scattered
/// writes of up to 64 KiB (some 3 MiB in 512-byte clusters with 64-bit refcounts) with 2
/// L2 tables and 4 refcount blocks cached, so that nearly every write evicts dirty tables, new
/// refcount blocks come every 32 KiB of file and the refcount table grows past 2 MiB.
fn small_cache_growth(seed: u64) -> Workload {
    let Workload {
        create, batches, ..
    } = table_growth(seed);
    Workload {
        name: format!("small metadata cache and {GROWS} cluster_size=512"),
        create,
        batches,
        command: None,
        image_opts: Some("l2-cache-size=1024,refcount-cache-size=1024".into()),
        copy_on_read: false,
    }
}

/// Many threads allocating at once (`bench -d 8`) in an overlay, 4 KiB requests 8 KiB apart
/// (copy-up next to kept backing data), flushed every 8 requests, drained or not.
fn bench(cs: u64, drain: bool) -> Workload {
    let (count, step, len) = (256u64, 8192u64, 4096u64);
    let cmds: Vec<String> = (0..count)
        .map(|i| format!("write -P 66 {} {len}", i * step))
        .collect();
    let mut args: Vec<String> = [
        "bench", "-w", "-f", "qcow2", "-c", "256", "-d", "8", "-s", "4096", "-S", "8192",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--pattern=66".into(), "--flush-interval=8".into()]);
    if !drain {
        args.push("--no-drain".into());
    }
    Workload {
        name: format!(
            "bench -d 8 --flush-interval=8{} cluster_size={cs}",
            if drain { "" } else { " --no-drain" }
        ),
        create: Box::new(move |d| overlay(d, SIZE, &format!("cluster_size={cs}"))),
        batches: vec![cmds],
        command: Some(args),
        image_opts: None,
        copy_on_read: false,
    }
}

/// Evictions and refcount table growth racing concurrent allocations and flushes: `bench -d 8
/// --flush-interval=8 --no-drain` with the smallest metadata caches (`--image-opts`: 2 L2
/// tables, 4 refcount blocks) on 512-byte clusters with 64-bit refcounts. Each 8 KiB request
/// lies 40 KiB past the one before, in another L2 table (one maps 32 KiB), so nearly every
/// request loads a table and evicts a dirty one; 384 of them cross the 16 MiB disk once (no
/// wrap: qemu-img 10.0 wraps at the disk's size, ours at the size less a request, as later
/// qemu-img does) and write 3 MiB, new refcount blocks come every 32 KiB of file and the
/// refcount table grows past 2 MiB of file, while flushes run beside the requests.
fn bench_small_cache_growth() -> Workload {
    let (size, count, step, len) = (16u64 << 20, 384u64, 40960u64, 8192u64);
    assert!((count - 1) * step + len <= size, "the requests wrap");
    let cmds: Vec<String> = (0..count)
        .map(|i| format!("write -P 66 {} {len}", i * step))
        .collect();
    let mut args: Vec<String> = ["bench", "-w", "-d", "8", "--pattern=66"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "-c".into(),
        count.to_string(),
        "-s".into(),
        len.to_string(),
        "-S".into(),
        step.to_string(),
        "--flush-interval=8".into(),
        "--no-drain".into(),
    ]);
    Workload {
        name: format!(
            "bench -d 8 --flush-interval=8 --no-drain, small metadata cache and {GROWS} \
             cluster_size=512"
        ),
        create: Box::new(move |d| plain(d, size, "cluster_size=512,refcount_bits=64")),
        batches: vec![cmds],
        command: Some(args),
        image_opts: Some("l2-cache-size=1024,refcount-cache-size=1024".into()),
        copy_on_read: false,
    }
}

/// A command given open options: `bench -d 8` with 2 L2 tables cached (`--image-opts
/// l2-cache-size=8192`) on 4 KiB clusters, 7 requests of 4 KiB at once, each in another L2
/// table (one maps 2 MiB), so that loading them evicts dirty tables; the default cache holds
/// all 8 tables of the 16 MiB disk and evicts none.
fn bench_small_l2_cache() -> Workload {
    let (size, count, step, len) = (16u64 << 20, 7u64, (2u64 << 20) + 4096, 4096u64);
    let cmds: Vec<String> = (0..count)
        .map(|i| format!("write -P 66 {} {len}", i * step))
        .collect();
    let args: Vec<String> = [
        "bench",
        "-w",
        "-d",
        "8",
        "--pattern=66",
        "-c",
        &count.to_string(),
        "-s",
        &len.to_string(),
        "-S",
        &step.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Workload {
        name: "bench -d 8, 2 L2 tables cached, cluster_size=4096".into(),
        create: Box::new(move |d| plain(d, size, "cluster_size=4096")),
        batches: vec![cmds],
        command: Some(args),
        image_opts: Some("l2-cache-size=8192".into()),
        copy_on_read: false,
    }
}

/// A snapshot made (`snapshot -c`) or deleted (`snapshot -d`) in a v3 image (`opts` added)
/// that holds data in plain, compressed and zero clusters and a snapshot `s0` made by qemu-img
/// before the data changed. The disk's contents stay: the oracle allows only them.
fn snapshot(cs: u64, delete: bool) -> Workload {
    let size: u64 = 2 << 20;
    let op = if delete { "-d" } else { "-c" };
    Workload {
        name: format!("snapshot {op} cluster_size={cs}"),
        create: Box::new(move |d| {
            let t = plain(d, size, &format!("cluster_size={cs}"));
            let p = t.to_str().unwrap();
            qemu_io(&t, "qcow2", &["write -P 1 0 1M", "write -c -P 2 1M 64k"]);
            qemu_img(&["snapshot", "-c", "s0", p]);
            qemu_io(&t, "qcow2", &["write -P 3 100k 300k", "write -z 600k 64k"]);
            if delete {
                qemu_img(&["snapshot", "-c", "s1", p]);
            }
            t
        }),
        batches: vec![Vec::new()],
        command: Some(vec!["snapshot".into(), op.into(), "s0".into()]),
        image_opts: None,
        copy_on_read: false,
    }
}

/// A snapshot of a smaller disk applied (`snapshot -a`): the disk, grown from 2 MiB to 4 MiB
/// and rewritten since the snapshot, first shrinks to the snapshot's size (its clusters past
/// 2 MiB dropped, tables shared with the snapshot copied) and then takes the snapshot's tables.
/// A sector before 2 MiB holds its value now or the snapshot's; one past it (while the disk
/// still has the old size) its value now or zeroes.
fn snapshot_apply_smaller(cs: u64) -> Workload {
    Workload {
        name: format!("snapshot -a of a smaller disk, cluster_size={cs}"),
        create: Box::new(move |d| {
            let t = plain(d, 2 << 20, &format!("cluster_size={cs}"));
            let p = t.to_str().unwrap();
            qemu_io(&t, "qcow2", &["write -P 1 0 1M", "write -c -P 2 1M 64k"]);
            qemu_img(&["snapshot", "-c", "s0", p]);
            qemu_img(&["resize", "-q", p, "4M"]);
            qemu_io(
                &t,
                "qcow2",
                &[
                    "write -P 3 100k 300k",
                    "write -z 600k 64k",
                    "write -P 4 1984k 1M",
                    "write -P 5 3M 512k",
                ],
            );
            t
        }),
        batches: vec![[
            "write -P 1 102400 307200",
            "write -P 1 614400 65536",
            "write -P 0 2031616 65536",
            "discard 2097152 2097152",
        ]
        .map(String::from)
        .to_vec()],
        command: Some(vec!["snapshot".into(), "-a".into(), "s0".into()]),
        image_opts: None,
        copy_on_read: false,
    }
}

/// The refcount width changed (`amend -o refcount_bits=N`) of an image with an internal
/// snapshot (refcounts of 2) and data in plain, compressed and zero clusters, 512-byte clusters
/// (many refcount blocks): the disk's contents stay.
fn amend_refcount_bits(bits: u64) -> Workload {
    Workload {
        name: format!("amend -o refcount_bits={bits}"),
        create: Box::new(|d| {
            let t = plain(d, 2 << 20, "cluster_size=512");
            let p = t.to_str().unwrap();
            qemu_io(&t, "qcow2", &["write -P 1 0 1M", "write -c -P 2 1M 64k"]);
            qemu_img(&["snapshot", "-c", "s0", p]);
            qemu_io(&t, "qcow2", &["write -P 3 100k 300k", "write -z 600k 64k"]);
            t
        }),
        batches: vec![Vec::new()],
        command: Some(vec![
            "amend".into(),
            "-o".into(),
            format!("refcount_bits={bits}"),
        ]),
        image_opts: None,
        copy_on_read: false,
    }
}

/// The version lowered (`amend -o compat=0.10`) of an image with data, zero clusters kept
/// allocated inside it and unallocated zero clusters, over a backing file (the zero clusters
/// become zero-filled data) or alone (unallocated ones become unallocated): the disk's contents
/// stay.
fn amend_compat_0_10(backing: bool, seed: u64) -> Workload {
    let mut g = Gen::new(seed);
    let cs = 4096;
    let cmds: Vec<String> = (0..24)
        .map(|i| {
            let (o, l) = g.range(SIZE, 64);
            if i % 2 == 0 {
                g.write(o, l)
            } else {
                format!("write -z {} {}", o / cs * cs, l.div_ceil(cs) * cs)
            }
        })
        .collect();
    Workload {
        name: format!("amend -o compat=0.10 backing={backing}"),
        create: Box::new(move |d| {
            let t = if backing {
                overlay(d, SIZE, "cluster_size=4096")
            } else {
                plain(d, SIZE, "cluster_size=4096")
            };
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&t, "qcow2", &cmds);
            t
        }),
        batches: vec![Vec::new()],
        command: Some(vec!["amend".into(), "-o".into(), "compat=0.10".into()]),
        image_opts: None,
        copy_on_read: false,
    }
}

fn check_workload(make: impl Fn(u64) -> Workload, tool: Tool, default_states: usize) {
    let n = powercut::states(default_states);
    powercut::rounds(|seed| {
        let w = make(seed);
        let r = powercut::run(&w, tool, seed, n, false);
        powercut::assert_clean(&r);
        assert!(
            !w.name.contains(GROWS) || r.header_writes > 0,
            "{} under {}: the header was never written (the refcount table did not grow)",
            w.name,
            tool.name()
        );
        // Ours writes an L2 table between flushes only to make room in a full cache (QEMU also
        // writes every dirty one whenever it allocates a table, so its count proves nothing).
        if w.image_opts.is_some() && tool == Tool::Ours {
            assert!(
                r.l2_writebacks > 0,
                "{} under {}: no L2 table was written back between flushes",
                w.name,
                tool.name()
            );
        }
    });
}

/// One test per workload and tool, so a failure names both.
macro_rules! workload_tests {
    ($($(#[$attr:meta])* $name:ident: $make:expr;)*) => {
        mod ours {
            use super::*;
            $($(#[$attr])* #[test] fn $name() { check_workload($make, Tool::Ours, 12) })*
        }
        mod qemu {
            use super::*;
            $($(#[$attr])* #[test] fn $name() { check_workload($make, Tool::Qemu, 12) })*
        }
    };
}

/// Snapshot operations, ours only: QEMU's leave states whose refcounts and COPIED flags
/// disagree without marking the image dirty, which `qemu-img check` reports as corruption.
/// Ours mark a v3 image dirty for that window (`qcow2/snapshot_ops.rs`), and each state must
/// pass the checks once a read-write open has repaired a dirty one, as the spec asks.
mod snapshots {
    use super::*;

    #[test]
    fn create_4k() {
        check_workload(|_| snapshot(4096, false), Tool::Ours, 12);
    }

    #[test]
    fn create_64k() {
        check_workload(|_| snapshot(65536, false), Tool::Ours, 12);
    }

    #[test]
    fn delete_4k() {
        check_workload(|_| snapshot(4096, true), Tool::Ours, 12);
    }

    #[test]
    fn apply_smaller_4k() {
        check_workload(|_| snapshot_apply_smaller(4096), Tool::Ours, 12);
    }

    #[test]
    fn apply_smaller_512() {
        check_workload(|_| snapshot_apply_smaller(512), Tool::Ours, 12);
    }
}

/// Refcount width and version changes under both tools (QEMU's is the control).
mod amend {
    use super::*;

    #[test]
    fn refcount_bits_64_ours() {
        check_workload(|_| amend_refcount_bits(64), Tool::Ours, 12);
    }

    #[test]
    fn refcount_bits_8_ours() {
        check_workload(|_| amend_refcount_bits(8), Tool::Ours, 12);
    }

    #[test]
    fn compat_0_10_ours() {
        check_workload(|s| amend_compat_0_10(false, s), Tool::Ours, 12);
    }

    #[test]
    fn compat_0_10_backing_ours() {
        check_workload(|s| amend_compat_0_10(true, s), Tool::Ours, 12);
    }

    #[test]
    fn refcount_bits_64_qemu() {
        check_workload(|_| amend_refcount_bits(64), Tool::Qemu, 12);
    }
}

/// The seed the deeper runs below failed with.
const FOUND: u64 = 0x9c0f_fee5;

workload_tests! {
    copy_up_512: |s| copy_up(512, s);
    copy_up_4k: |s| copy_up(4096, s);
    copy_up_64k: |s| copy_up(65536, s);
    copy_on_read_512: |s| copy_on_read(512, s);
    copy_on_read_64k: |s| copy_on_read(65536, s);
    copy_on_read_small_cache_512: copy_on_read_small_cache;
    whole_clusters_4k: |s| whole_clusters(4096, s);
    whole_clusters_64k: |s| whole_clusters(65536, s);
    write_zeroes_4k: |s| zeroes_and_discards(4096, s, false);
    write_zeroes_64k: |s| zeroes_and_discards(65536, s, false);
    discard_4k: |s| zeroes_and_discards(4096, s, true);
    discard_64k: |s| zeroes_and_discards(65536, s, true);
    compressed_cow_64k: |s| cow(65536, s, true);
    snapshot_cow_4k: |s| cow(4096, s, false);
    snapshot_cow_64k: |s| cow(65536, s, false);
    extended_l2_64k: |s| extended_l2(65536, s);
    extended_l2_32k: |s| extended_l2(32768, s);
    table_growth_512: table_growth;
    small_cache_512: small_cache;
    small_cache_growth_512: small_cache_growth;
    bench_threads_4k: |_| bench(4096, true);
    bench_threads_64k: |_| bench(65536, true);
    bench_threads_no_drain_64k: |_| bench(65536, false);
    bench_small_cache_growth_512: |_| bench_small_cache_growth();
    bench_small_l2_cache_4k: |_| bench_small_l2_cache();
}

/// A replay that ignores barriers must fail the checks: the writes QEMU ordered with flushes,
/// persisted in any order, leave corrupt images or wrong data.
#[test]
fn ignoring_barriers_fails_the_checks() {
    let seed = powercut::seed();
    let mut failed = 0;
    for w in [
        copy_up(65536, seed),
        whole_clusters(4096, seed),
        table_growth(seed),
    ] {
        failed += powercut::run(&w, Tool::Qemu, seed, powercut::states(16), true)
            .failures
            .len();
    }
    assert!(
        failed > 0,
        "no state failed with the barriers ignored: the checks do not bite"
    );
}

/// A deeper run that found a failure before the L2 tables waited for their new data's sync
/// (300 states; state 279 read zeroes where backing data was).
#[test]
fn ours_extended_l2_64k_deep() {
    let r = powercut::run(&extended_l2(65536, FOUND), Tool::Ours, FOUND, 300, false);
    powercut::assert_clean(&r);
}

/// `bench --flush-interval` flushes after the same requests as qemu-img bench: on a raw image
/// every write is a request's, so the recorded writes between syncs show where flushes fell.
#[test]
fn bench_flushes_where_qemu_img_bench_does() {
    use powercut::driver::{self, Recording};
    use powercut::log::{self, Op};
    // -d 4 issues 4 requests at once, passing over the flush due after 2.
    for (depth, want) in [
        ("1", [2, 6, 10].as_slice()),
        ("2", &[2, 6, 10]),
        ("4", &[6, 10]),
    ] {
        let mut seen = Vec::new();
        for tool in [Tool::Ours, Tool::Qemu] {
            let dir = tempfile::tempdir().unwrap();
            let work = std::fs::canonicalize(dir.path()).unwrap().join("work");
            std::fs::create_dir(&work).unwrap();
            let img = work.join("disk.raw");
            qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"]);
            let rec = Recording {
                dir: work.clone(),
                log: dir.path().join("log"),
            };
            let program = match tool {
                Tool::Ours => env!("CARGO_BIN_EXE_vmm-img"),
                Tool::Qemu => "qemu-img",
            };
            let args = [
                "bench",
                "-w",
                "-f",
                "raw",
                "-c",
                "10",
                "-d",
                depth,
                "--flush-interval=4",
            ];
            let mut all = args.to_vec();
            all.push(img.to_str().unwrap());
            driver::run(&rec, program, &all);
            // Writes completed before each flush (a flush's several syncs count once).
            let mut writes = 0;
            let mut flushes: Vec<usize> = Vec::new();
            for r in log::read(&rec.log) {
                match r.op {
                    Op::Write { .. } => writes += 1,
                    Op::SyncEnd { .. } if flushes.last() != Some(&writes) => flushes.push(writes),
                    _ => {}
                }
            }
            seen.push(flushes);
        }
        assert_eq!(seen[1], want, "-d {depth}: qemu-img bench's flushes");
        assert_eq!(
            seen[0], seen[1],
            "-d {depth}: writes before each flush, ours then qemu-img's"
        );
    }
}

/// The control's own deviation, kept visible: QEMU hands a discarded cluster to the next
/// allocation before the L2 update that dropped it is durable, so a cut between the new data and
/// that update shows the other write's data in the discarded guest cluster.
#[test]
#[ignore = "QEMU behaviour: qemu-io reuses a freed cluster before the L2 update freeing it is durable (seed 2618293989, 1500 states: state 409, cut after record 119 of 215, sector 7040 reads another cluster's 0x0d)"]
fn qemu_discard_64k_deep() {
    let r = powercut::run(
        &zeroes_and_discards(65536, FOUND, true),
        Tool::Qemu,
        FOUND,
        1500,
        false,
    );
    powercut::assert_clean(&r);
}

/// The `vmm` check bites: a state `vmm` cannot open read-write (the corrupt bit set) fails it.
#[test]
fn vmm_check_fails_on_an_image_vmm_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    create_qcow2(&[img.to_str().unwrap(), "1M"]);
    powercut::vmm::open_read_write(&img, dir.path()).unwrap();
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[79] |= 2; // incompatible_features (bytes 72..80): the corrupt bit
    std::fs::write(&img, bytes).unwrap();
    let r = powercut::vmm::open_read_write(&img, dir.path());
    assert!(r.as_ref().is_err_and(|e| e.contains("corrupt")), "{r:?}");
}

/// The replay model itself: a completed sync covers what was logged before it began, a write
/// logged while it ran stays pending, a failed sync covers nothing, and pending writes tear at
/// sector boundaries.
#[test]
fn replay_keeps_exactly_what_completed_syncs_cover() {
    use std::collections::HashMap;

    use powercut::log::{Op, Rec};
    use powercut::replay::{state, Pending};
    let f = "/f".to_string();
    let w = |off: u64, b: u8, n: usize| Rec {
        op: Op::Write {
            off,
            len: n as u64,
            data: vec![b; n],
        },
        path: f.clone(),
        ret: i64::try_from(n).unwrap(),
        tid: 1,
    };
    let sync = |id: u64, end: bool, ret: i64| Rec {
        op: if end {
            Op::SyncEnd { id, all: false }
        } else {
            Op::SyncBegin { id, all: false }
        },
        path: f.clone(),
        ret,
        tid: 1,
    };
    let recs = vec![
        w(0, 1, 512),
        sync(0, false, 0),
        w(512, 2, 512),
        sync(0, true, 0),
        w(1024, 3, 1024),
        sync(1, false, 0),
        sync(1, true, -5),
    ];
    let before = HashMap::from([(f.clone(), Vec::new())]);
    let last = recs.len() - 1;
    let mut rng = fastrand::Rng::with_seed(1);
    let all = state(&before, &recs, last, Pending::All, false, &mut rng);
    assert_eq!(all[&f].len(), 2048);
    let none = state(&before, &recs, last, Pending::Random(0.0), false, &mut rng);
    assert_eq!(
        none[&f],
        vec![1; 512],
        "only the write before the sync's begin is durable"
    );
    let ignored = state(&before, &recs, last, Pending::Random(0.0), true, &mut rng);
    assert!(
        ignored[&f].is_empty(),
        "barriers ignored: nothing is durable"
    );
    // Over many subsets, the 2-sector write lands whole, not at all, or torn either way.
    let mut shapes = std::collections::HashSet::new();
    for seed in 0..200 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let s = state(&before, &recs, last, Pending::Random(0.5), false, &mut rng);
        let sector = |i: usize| s[&f].get(i * 512).copied().unwrap_or(0);
        shapes.insert((sector(2), sector(3)));
    }
    assert_eq!(shapes.len(), 4, "{shapes:?}");
}
