//! Engine tests that watch, or fail, the calls reaching the host file (through its test hook):
//! the write orderings of `meta.rs`, and what a failed metadata write leaves behind.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use super::l2::OFFSET_MASK;
use super::Qcow2;
use crate::file::test_hook::{Hook, Op};
use crate::{DiskImage, Error, Format, Image, OpenOptions};

const CS: u64 = 65536;

/// Runs qemu-img (required: a missing tool fails the test).
pub(super) fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required (ci/setup installs it)")
}

pub(super) fn create(path: &Path, opts: &str, size: &str) {
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        path.to_str().unwrap(),
        size,
    ]);
    assert!(out.status.success(), "{out:?}");
}

pub(super) fn open_rw(path: &Path) -> Image {
    crate::open(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap()
}

pub(super) fn qcow2(img: &Image) -> &Qcow2 {
    match img {
        Image::Qcow2(q) => q,
        Image::Raw(_) => unreachable!("opened as qcow2"),
    }
}

/// `qemu-img check`: no corruption; leaked clusters only when `leaks_ok`.
pub(super) fn assert_consistent(path: &Path, leaks_ok: bool) {
    let out = qemu_img(&["check", "-U", path.to_str().unwrap()]);
    let code = out.status.code();
    let ok = code == Some(0) || (leaks_ok && code == Some(3));
    assert!(
        ok,
        "qemu-img check {}: {code:?}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Records every call on the file, and fails those `fail` picks.
pub(super) fn install(
    img: &Qcow2,
    fail: impl Fn(Op) -> bool + Send + Sync + 'static,
) -> Arc<Mutex<Vec<Op>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    img.file.set_hook(Some(Hook(Arc::new(move |op| {
        if fail(op) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        l.lock().unwrap().push(op);
        Ok(())
    }))));
    log
}

fn writes_at(op: Op, at: u64, len: u64) -> bool {
    matches!(op, Op::Write { offset, len: n } if offset < at + len && at < offset + n)
}

/// The metadata a first write to an empty image dirties, by kind: (name, offset, length).
fn owed_tables(img: &Qcow2) -> Vec<(&'static str, u64, u64)> {
    let m = img.lock_shared();
    vec![
        ("refcount block", m.rc_table[0], CS),
        ("L2 table", m.l1[0] & OFFSET_MASK, CS),
        ("L1 entry", m.header.l1_table_offset, 8),
    ]
}

/// Copies the image at `p` as it is on disk (the close path writing nothing more), checks the
/// copy is consistent, and opens it in place of `img`.
fn reopened_copy(dir: &Path, p: &Path, img: Image) -> Image {
    let copy = dir.join("copy.qcow2");
    std::fs::copy(p, &copy).unwrap();
    assert_consistent(&copy, false);
    drop(img);
    open_rw(&copy)
}

/// Asserts that `len` bytes at each offset of `expect` read back as its byte.
fn assert_reads(img: &Image, len: usize, expect: &[(u64, u8)]) {
    for &(at, byte) in expect {
        let mut back = vec![0u8; len];
        img.read_at(&mut back, at).unwrap();
        assert_eq!(back, vec![byte; len], "at {at}");
    }
}

#[test]
fn a_failed_table_write_stays_owed_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    for kind in 0..3 {
        let p = dir.path().join(format!("t{kind}.qcow2"));
        create(&p, "cluster_size=65536", "16M");
        let img = open_rw(&p);
        let q = qcow2(&img);
        q.write_at(&[7; 5000], 3 * CS + 100).unwrap();
        let (name, at, len) = owed_tables(q)[kind];
        install(q, move |op| writes_at(op, at, len));
        for attempt in 0..2 {
            assert!(
                matches!(q.flush(), Err(Error::Io { .. })),
                "{name}: flush {attempt} reported success while its write fails"
            );
        }
        q.file.set_hook(None);
        q.flush().unwrap();
        // The data must be reachable without the close path writing anything more.
        let img = reopened_copy(dir.path(), &p, img);
        let mut back = vec![0u8; 5000];
        img.read_at(&mut back, 3 * CS + 100).unwrap();
        assert!(back.iter().all(|&b| b == 7), "{name}: the write was lost");
    }
}

#[test]
fn an_l2_entry_is_written_only_after_its_data_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    // The L2 table goes out by a flush, then by an eviction (a one-table cache loading the
    // table of the second half of the disk).
    for evict in [false, true] {
        let p = dir.path().join(format!("o{evict}.qcow2"));
        create(&p, "cluster_size=65536", "1G");
        let img = open_rw(&p);
        let q = qcow2(&img);
        // Both L2 tables exist and are clean: only the new entry will dirty one.
        q.write_at(&[1; 512], CS).unwrap();
        q.write_at(&[1; 512], 600 << 20).unwrap();
        q.flush().unwrap();
        if evict {
            q.lock().l2 = super::cache::TableCache::new(1);
        }
        let l2 = owed_tables(q)[1].1;
        let log = data_written_during_a_flush(q);
        if evict {
            q.read_at(&mut [0; 512], 600 << 20).unwrap();
        } else {
            q.flush().unwrap();
        }
        q.file.set_hook(None);
        let log = log.lock().unwrap().clone();
        let Ok((super::Mapping::Data { host, .. }, _)) = q.lookup(0) else {
            panic!("cluster 0 is not allocated");
        };
        let data = log
            .iter()
            .position(|&op| writes_at(op, host, CS))
            .expect("the data write");
        let table = data
            + log[data..]
                .iter()
                .position(|&op| writes_at(op, l2, CS))
                .expect("the L2 table write");
        assert!(
            log[data..table].contains(&Op::Sync),
            "evict {evict}: L2 table written before its new data was synced: {log:?}"
        );
    }
}

/// Writes a new cluster at guest 0 while another thread flushes between its allocation (its
/// refcount set) and its data write, then returns the log of the file's calls (still running).
fn data_written_during_a_flush(q: &Qcow2) -> Arc<Mutex<Vec<Op>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (about_tx, about_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (about_tx, go_rx) = (Mutex::new(Some(about_tx)), Mutex::new(go_rx));
    let l = Arc::clone(&log);
    q.file.set_hook(Some(Hook(Arc::new(move |op| {
        if matches!(op, Op::Write { len, .. } if len == CS) {
            let first = about_tx.lock().unwrap().take();
            if let Some(tx) = first {
                tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
        }
        l.lock().unwrap().push(op);
        Ok(())
    }))));
    std::thread::scope(|s| {
        let writer = s.spawn(|| q.write_at(&vec![2; usize::try_from(CS).unwrap()], 0));
        about_rx.recv().unwrap();
        q.flush().unwrap();
        go_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
    });
    log
}

/// Expected contents of a virtual disk, with the bytes a failed request may or may not have
/// changed.
struct Mirror {
    bytes: Vec<u8>,
    unknown: Vec<bool>,
}

impl Mirror {
    fn set(&mut self, r: std::ops::Range<usize>, ok: bool, byte: u8) {
        if ok {
            self.bytes[r.clone()].fill(byte);
        }
        self.unknown[r].fill(!ok);
    }

    fn assert_matches(&self, img: &dyn DiskImage, what: &str) {
        let mut back = vec![0u8; self.bytes.len()];
        img.read_at(&mut back, 0).unwrap();
        for (i, b) in back.iter().enumerate() {
            assert!(
                self.unknown[i] || *b == self.bytes[i],
                "{what}: byte {i} reads {b}, expected {}",
                self.bytes[i]
            );
        }
    }
}

#[test]
fn failed_writes_leave_a_consistent_image_and_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let size: usize = 4 << 20;
    let base = dir.path().join("base.qcow2");
    create(&base, "cluster_size=65536", "4M");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 0 4M",
            base.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-io is required (ci/setup installs it)");
    assert!(out.status.success(), "{out:?}");
    for (n, opts) in ["cluster_size=512", "cluster_size=16384,extended_l2=on"]
        .iter()
        .enumerate()
    {
        let p = dir.path().join(format!("f{n}.qcow2"));
        create(
            &p,
            &format!("{opts},backing_file=base.qcow2,backing_fmt=qcow2"),
            "4M",
        );
        let img = open_rw(&p);
        let q = qcow2(&img);
        let cs = usize::try_from(q.geo.cluster_size()).unwrap();
        {
            // Small caches: evictions write tables back in the middle of requests.
            let mut m = q.lock();
            m.l2 = super::cache::TableCache::new(2);
            m.rc_blocks = super::cache::TableCache::new(2);
        }
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(n as u64 + 7)));
        let r = Arc::clone(&rng);
        q.file.set_hook(Some(Hook(Arc::new(move |op| {
            let mut rng = r.lock().unwrap();
            if op != Op::Sync && rng.u8(0..12) == 0 {
                let errno = if rng.bool() { libc::EIO } else { libc::ENOSPC };
                return Err(std::io::Error::from_raw_os_error(errno));
            }
            Ok(())
        }))));
        let mut mirror = Mirror {
            bytes: vec![0x42; size],
            unknown: vec![false; size],
        };
        let mut failed = 0;
        for i in 0..400u32 {
            let (kind, off, len) = {
                let mut rng = rng.lock().unwrap();
                let off = rng.usize(0..size - 1);
                let len = rng.usize(1..=(3 * cs).min(size - off));
                (rng.u8(0..10), off, len)
            };
            let byte = (i % 250) as u8 + 1;
            let ok = match kind {
                0..=5 => {
                    let ok = q.write_at(&vec![byte; len], off as u64).is_ok();
                    mirror.set(off..off + len, ok, byte);
                    ok
                }
                6 | 7 => {
                    let ok = q.write_zeroes(off as u64, len as u64, kind == 6).is_ok();
                    mirror.set(off..off + len, ok, 0);
                    ok
                }
                8 => {
                    // Whole clusters only; they read as zeroes afterwards.
                    let ok = q.discard(off as u64, len as u64).is_ok();
                    let start = off.div_ceil(cs) * cs;
                    let end = ((off + len) / cs * cs).max(start);
                    mirror.set(start..end, ok, 0);
                    ok
                }
                _ => q.flush().is_ok(),
            };
            failed += usize::from(!ok);
        }
        assert!(failed > 20, "{opts}: only {failed} requests failed");
        q.file.set_hook(None);
        q.flush().unwrap();
        mirror.assert_matches(q, opts);
        drop(img);
        assert_consistent(&p, true);
        let img = open_rw(&p);
        mirror.assert_matches(&img, opts);
    }
}

#[test]
fn no_flush_succeeds_after_a_failed_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    create(&p, "cluster_size=65536", "16M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[3; 4096], 0).unwrap();
    install(q, |op| op == Op::Sync);
    assert!(matches!(q.flush(), Err(Error::Io { .. })));
    q.file.set_hook(None);
    // The page cache may have dropped what the failed sync could not write.
    for _ in 0..2 {
        assert!(matches!(q.flush(), Err(Error::Io { .. })));
    }
}

#[test]
fn a_failed_fill_gives_its_new_cluster_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fill.qcow2");
    create(&p, "cluster_size=65536", "16M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[1; 512], 0).unwrap();
    q.flush().unwrap();
    // The next new cluster's data write fails (ENOSPC, say).
    let first_free = std::fs::metadata(&p).unwrap().len();
    install(q, move |op| writes_at(op, first_free, CS));
    assert!(matches!(
        q.write_at(&[2; 4096], 5 * CS),
        Err(Error::Io { .. })
    ));
    q.file.set_hook(None);
    // (qemu-img check does not see it: it lies past the end of the file.)
    assert_eq!(q.lock().refcount(&q.file, first_free / CS).unwrap(), 0);
    q.write_at(&[2; 4096], 5 * CS).unwrap();
    q.flush().unwrap();
    drop(img);
    assert_consistent(&p, false);
}

/// Runs `during` on this thread while a flush on another thread is stopped in its first sync
/// (through the file's hook), then lets the flush finish and returns what it returned.
fn while_a_flush_syncs(q: &Qcow2, during: impl FnOnce()) -> Result<(), Error> {
    while_syncing(q, || q.flush(), during)
}

/// Runs `during` on this thread while `request` on another thread is stopped in its first sync
/// (through the file's hook), then lets the request finish and returns what it returned.
fn while_syncing<T: Send>(
    q: &Qcow2,
    request: impl FnOnce() -> T + Send,
    during: impl FnOnce(),
) -> T {
    while_stopped_at(q, |op| op == Op::Sync, request, during)
}

/// Runs `during` on this thread while `request` on another thread is stopped before the first
/// call on the file that `at` picks (through the file's hook), then lets the request finish
/// and returns what it returned.
fn while_stopped_at<T: Send>(
    q: &Qcow2,
    at: impl Fn(Op) -> bool + Send + Sync + 'static,
    request: impl FnOnce() -> T + Send,
    during: impl FnOnce(),
) -> T {
    let (in_tx, in_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (in_tx, go_rx) = (Mutex::new(Some(in_tx)), Mutex::new(go_rx));
    q.file.set_hook(Some(Hook(Arc::new(move |op| {
        if at(op) {
            let first = in_tx.lock().unwrap().take();
            if let Some(tx) = first {
                tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
        }
        Ok(())
    }))));
    std::thread::scope(|s| {
        let flush = s.spawn(|| {
            let r = request();
            // Dropping the hook tells a request that never synced (and leaves it for good).
            q.file.set_hook(None);
            r
        });
        in_rx
            .recv()
            .expect("the request ended without the call it was to stop at");
        // The flush goes on whatever `during` does: a failed assertion must not leave it stuck.
        let during = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        go_tx.send(()).unwrap();
        let flushed = flush.join().unwrap();
        q.file.set_hook(None);
        if let Err(panic) = during {
            std::panic::resume_unwind(panic);
        }
        flushed
    })
}

#[test]
fn lookups_and_allocating_writes_go_on_while_a_flush_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    create(&p, "cluster_size=65536", "1G");
    let img = open_rw(&p);
    let q = qcow2(&img);
    // A new cluster: its refcount block, L2 table and L1 entry are owed, and the L2 table must
    // wait for a sync (after the refcounts and the data).
    q.write_at(&[1; 4096], 0).unwrap();
    let l2 = owed_tables(q)[1].1;
    let flushed = while_a_flush_syncs(q, || {
        assert!(
            q.meta.try_write().is_ok(),
            "the metadata lock is held while the flush syncs"
        );
        assert!(matches!(q.lookup(0), Ok((super::Mapping::Data { .. }, _))));
        // The table the flush copied changes, and a new table and cluster are allocated.
        q.write_at(&[2; 4096], 3 * CS).unwrap();
        q.write_at(&[3; 4096], 700 << 20).unwrap();
        let mut back = [0u8; 4096];
        q.read_at(&mut back, 700 << 20).unwrap();
        assert_eq!(back, [3; 4096]);
    });
    flushed.unwrap();
    assert!(
        q.lock_shared().l2.is_dirty(l2),
        "an L2 table changed during the flush was marked clean"
    );
    q.flush().unwrap();
    // Everything is reachable without the close path writing anything more.
    let img = reopened_copy(dir.path(), &p, img);
    assert_reads(&img, 4096, &[(0, 1), (3 * CS, 2), (700 << 20, 3)]);
}

#[test]
fn a_snapshot_operation_waits_for_a_write_back_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    create(&p, "cluster_size=65536", "1M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[1; 4096], 0).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let mut snapshot = None;
        let flushed = while_a_flush_syncs(q, || {
            snapshot = Some(s.spawn(move || {
                let r = q.snapshot_create("s", (0, 0));
                done_tx.send(()).unwrap();
                r
            }));
            // It frees and allocates clusters that the flush's copies may still be written to.
            let ran = done_rx.recv_timeout(std::time::Duration::from_secs(2));
            assert!(
                ran.is_err(),
                "a snapshot was taken while a flush wrote back"
            );
        });
        flushed.unwrap();
        snapshot.unwrap().join().unwrap().unwrap();
    });
    q.write_at(&[2; 4096], 0).unwrap();
    drop(img);
    assert_consistent(&p, false);
}

#[test]
fn lookups_go_on_while_an_eviction_writes_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.qcow2");
    create(&p, "cluster_size=65536", "2G");
    let img = open_rw(&p);
    let q = qcow2(&img);
    // Four L2 tables on disk (one per 512 MiB), clean; then a two-table cache.
    for at in [0, 600 << 20, 1100 << 20, 1700 << 20] {
        q.write_at(&[1; 512], at).unwrap();
    }
    q.flush().unwrap();
    q.lock().l2 = super::cache::TableCache::new(2);
    // A new cluster makes the first table dirty (owing refcounts and data first); the second,
    // loaded since, leaves it least recently used.
    q.write_at(&[2; 4096], 4 * CS).unwrap();
    q.read_at(&mut [0; 512], 600 << 20).unwrap();
    // A read loading the third table makes room: the first must be written back, after a sync.
    let read = while_syncing(
        q,
        || q.read_at(&mut [0; 512], 1100 << 20),
        || {
            assert!(
                q.meta.try_write().is_ok(),
                "the metadata lock is held while an eviction syncs"
            );
            assert!(matches!(
                q.lookup(600 << 20),
                Ok((super::Mapping::Data { .. }, _))
            ));
            // A table is loaded (its room left to the write-back under way) and another
            // allocates.
            let mut back = [0u8; 512];
            q.read_at(&mut back, 1700 << 20).unwrap();
            assert_eq!(back, [1; 512]);
            q.write_at(&[3; 4096], (600 << 20) + 5 * CS).unwrap();
        },
    );
    read.unwrap();
    assert!(
        !q.lock_shared().over_size(),
        "the caches stay over their size after the eviction"
    );
    q.flush().unwrap();
    let img = reopened_copy(dir.path(), &p, img);
    assert_reads(
        &img,
        512,
        &[(4 * CS, 2), ((600 << 20) + 5 * CS, 3), (1100 << 20, 1)],
    );
}

/// The byte written into the `k`th 512 MiB range (k below 255).
fn byte_of(k: u64) -> u8 {
    u8::try_from(k + 1).unwrap()
}

/// Fills a one-table L2 cache of `q` with `n` dirty tables (an allocating write into each of
/// the first `n` 512 MiB ranges) while the write-backs' mutex is held, so that no eviction
/// write-back cleans them.
fn dirty_l2_tables(q: &Qcow2, n: u64) {
    q.lock().l2 = super::cache::TableCache::new(1);
    let _flushing = q.flushing();
    for k in 0..n {
        q.write_at(&[byte_of(k); 512], k << 29).unwrap();
    }
}

#[test]
fn a_request_over_the_overdraft_writes_back_outside_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.qcow2");
    create(&p, "cluster_size=65536", "16G");
    let img = open_rw(&p);
    let q = qcow2(&img);
    let full = 1 + super::cache::OVERDRAFT as u64;
    dirty_l2_tables(q, full);
    assert!(q.lock_shared().at_overdraft());
    // One more table: the request must make room first, by a write-back that syncs (the L2
    // tables owe their refcounts and data).
    let wrote = while_syncing(
        q,
        || q.write_at(&[0xee; 512], full << 29),
        || {
            assert!(
                q.meta.try_write().is_ok(),
                "the metadata lock is held while a request over the overdraft syncs"
            );
            let mut back = [0u8; 512];
            q.read_at(&mut back, 3 << 29).unwrap();
            assert_eq!(back, [4; 512]);
        },
    );
    wrote.unwrap();
    assert!(q.lock_shared().l2.tables() <= 1 + super::cache::OVERDRAFT);
    q.flush().unwrap();
    let img = reopened_copy(dir.path(), &p, img);
    let mut expect: Vec<(u64, u8)> = (0..full).map(|k| (k << 29, byte_of(k))).collect();
    expect.push((full << 29, 0xee));
    assert_reads(&img, 512, &expect);
}

/// Allocating writes from 8 threads, 8 each, into the 512 MiB ranges from `first` on, each
/// checking afterwards that the L2 cache holds at most `bound` tables; returns the (offset,
/// byte) of the writes that succeeded. A write may fail only with an I/O error.
fn allocate_from_threads(q: &Qcow2, first: u64, bound: usize) -> Vec<(u64, u8)> {
    let results: Vec<Vec<(u64, bool)>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                s.spawn(move || {
                    (0..8u64)
                        .map(|i| {
                            let k = first + t * 8 + i;
                            let r = q.write_at(&[byte_of(k); 512], k << 29);
                            assert!(matches!(r, Ok(()) | Err(Error::Io { .. })), "{r:?}");
                            let tables = q.lock_shared().l2.tables();
                            assert!(tables <= bound, "{tables} L2 tables cached");
                            (k, r.is_ok())
                        })
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    results
        .into_iter()
        .flatten()
        .filter(|&(_, ok)| ok)
        .map(|(k, _)| (k << 29, byte_of(k)))
        .collect()
}

#[test]
fn the_caches_stay_within_their_overdraft_under_concurrent_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.qcow2");
    create(&p, "cluster_size=65536", "64G");
    let img = open_rw(&p);
    let q = qcow2(&img);
    let bound = 1 + super::cache::OVERDRAFT;
    q.lock().l2 = super::cache::TableCache::new(1);
    // Every write-back fails (at its first write, the refcount block's): the dirty tables pile
    // up to the overdraft, and the requests that find it full get the error instead of waiting
    // for ever.
    let rc_block = q.lock_shared().rc_table[0];
    install(q, move |op| writes_at(op, rc_block, CS));
    let mut done = allocate_from_threads(q, 0, bound);
    q.file.set_hook(None);
    assert!(
        !done.is_empty() && done.len() <= bound,
        "{} writes succeeded while write-backs failed",
        done.len()
    );
    // Write-backs succeed again: every request gets through, within the bound.
    let more = allocate_from_threads(q, 64, bound);
    assert_eq!(more.len(), 64);
    done.extend(more);
    q.flush().unwrap();
    let img = reopened_copy(dir.path(), &p, img);
    assert_reads(&img, 512, &done);
}

#[test]
fn a_flush_never_writes_its_copy_over_a_newer_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    create(&p, "cluster_size=65536", "1G");
    let img = open_rw(&p);
    let q = qcow2(&img);
    // Two L2 tables on disk, clean; then a one-table cache, so that loading one evicts the other.
    q.write_at(&[1; 512], 0).unwrap();
    q.write_at(&[1; 512], 600 << 20).unwrap();
    q.flush().unwrap();
    q.lock().l2 = super::cache::TableCache::new(1);
    q.write_at(&[2; 4096], 2 * CS).unwrap();
    let flushed = while_a_flush_syncs(q, || {
        // The table the flush copied changes, then goes out by an eviction, newer than the copy.
        q.write_at(&[3; 4096], 3 * CS).unwrap();
        q.read_at(&mut [0; 512], 600 << 20).unwrap();
    });
    flushed.unwrap();
    q.flush().unwrap();
    let img = reopened_copy(dir.path(), &p, img);
    assert_reads(&img, 4096, &[(2 * CS, 2), (3 * CS, 3)]);
}

#[test]
fn a_table_write_failing_under_the_lock_during_a_flush_stays_owed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    create(&p, "cluster_size=65536", "16M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[7; 5000], 3 * CS + 100).unwrap();
    let (_, l2, _) = owed_tables(q)[1];
    let flushed = while_a_flush_syncs(q, || {
        // The flush has copied the L2 table and waits to write it; meanwhile a write of the
        // same table under the lock fails (made directly: the paths writing under the lock hold the
        // flush mutex, so they never overlap a write-back; `Written` guards the case anyway).
        install(q, move |op| writes_at(op, l2, CS));
        assert!(matches!(
            q.lock().write_l2(&q.file, l2),
            Err(Error::Io { .. })
        ));
        q.file.set_hook(None);
    });
    flushed.unwrap();
    // The flush succeeded: the table is on disk, without the close path writing anything more.
    let img = reopened_copy(dir.path(), &p, img);
    let mut back = vec![0u8; 5000];
    img.read_at(&mut back, 3 * CS + 100).unwrap();
    assert!(
        back.iter().all(|&b| b == 7),
        "a flush reported success without the L2 table"
    );
}

#[test]
fn a_resize_waits_for_a_write_back_to_end() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters: the L1 table of 1 MiB fits one cluster, that of 16 MiB does not.
    for (what, new_size) in [("grow", 16 << 20), ("shrink", 512 << 10)] {
        let p = dir.path().join(format!("{what}.qcow2"));
        create(&p, "cluster_size=512", "1M");
        let img = open_rw(&p);
        let q = qcow2(&img);
        q.write_at(&[1; 4096], 0).unwrap();
        q.write_at(&[1; 4096], 1020 << 10).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let mut resized = None;
            let flushed = while_a_flush_syncs(q, || {
                resized = Some(s.spawn(move || {
                    let r = q.resize(new_size);
                    done_tx.send(()).unwrap();
                    r
                }));
                // It frees tables (the old L1 table, L2 tables past the end) that the flush's
                // copies may still be written to.
                let ran = done_rx.recv_timeout(std::time::Duration::from_secs(2));
                assert!(ran.is_err(), "{what}: resized while a flush wrote back");
            });
            flushed.unwrap();
            resized.unwrap().join().unwrap().unwrap();
        });
        q.write_at(&[2; 4096], 0).unwrap();
        q.flush().unwrap();
        drop(img);
        assert_consistent(&p, false);
        let img = open_rw(&p);
        assert_eq!(img.size(), new_size, "{what}");
        let mut back = [0u8; 4096];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [2; 4096], "{what}");
    }
}

#[test]
fn a_copy_up_from_the_backing_file_leaves_the_lock_free() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xab; 1 << 20]).unwrap();
    let p = dir.path().join("top.qcow2");
    create(
        &p,
        "cluster_size=65536,backing_file=base.raw,backing_fmt=raw",
        "1M",
    );
    let img = open_rw(&p);
    let q = qcow2(&img);
    // The cluster's bytes (read from the backing file around the new ones) reach the file
    // through the hook, which holds them there.
    let (in_tx, in_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (in_tx, go_rx) = (Mutex::new(Some(in_tx)), Mutex::new(go_rx));
    q.file.set_hook(Some(Hook(Arc::new(move |op| {
        if matches!(op, Op::Write { len, .. } if len == CS) {
            let first = in_tx.lock().unwrap().take();
            if let Some(tx) = first {
                tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
        }
        Ok(())
    }))));
    std::thread::scope(|s| {
        let writer = s.spawn(|| q.write_at(&[5; 512], 100));
        in_rx.recv().unwrap();
        let free = q.meta.try_write().is_ok();
        go_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        assert!(
            free,
            "the metadata lock is held while a cluster is copied up"
        );
    });
    q.file.set_hook(None);
    let mut back = vec![0u8; 4096];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0xab));
    assert!(back[100..612].iter().all(|&b| b == 5));
    assert!(back[612..].iter().all(|&b| b == 0xab));
}

#[test]
fn a_cluster_unmapped_before_a_request_began_is_reused_while_that_request_runs() {
    const C: usize = 65536;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.qcow2");
    create(&p, "cluster_size=65536", "1M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[1; C], 0).unwrap();
    q.write_at(&[2; C], CS).unwrap();
    img.flush().unwrap();
    let Ok((super::Mapping::Data { host: freed, .. }, _)) = q.lookup(0) else {
        panic!("cluster 0 is allocated");
    };
    img.discard(0, CS).unwrap();
    // Requests come and go after the discard, and one stays in flight, as a guest's would, while
    // the flush makes the release durable.
    for _ in 0..2 {
        let _ = q.lookup_pinned(CS).unwrap();
    }
    let (_, _, in_flight) = q.lookup_pinned(CS).unwrap();
    img.flush().unwrap();
    // That request began after the discard: it cannot be using the freed cluster.
    img.write_at(&[3; C], 2 * CS).unwrap();
    let Ok((super::Mapping::Data { host, .. }, _)) = q.lookup(2 * CS) else {
        panic!("cluster 2 is allocated");
    };
    assert_eq!(host, freed, "the freed cluster was not reused");
    drop(in_flight);
    img.flush().unwrap();
    drop(img);
    assert_consistent(&p, false);
}

#[test]
fn freed_clusters_are_reused_while_requests_stay_in_flight() {
    discard_and_rewrite_while_busy(true);
}

/// A guest that discards and rewrites without ever flushing must not grow the image either.
#[test]
fn freed_clusters_are_reused_without_flushes() {
    discard_and_rewrite_while_busy(false);
}

/// Four regions are discarded and rewritten chunk by chunk (with a flush after each discard when
/// `flush`), in turn, while requests are always in flight: two pinned reads overlap, the older
/// ending after the next began, at every step. The file must stay within 10% of the live data.
/// One thread drives the interleaving, so that no request is held up by the scheduler.
fn discard_and_rewrite_while_busy(flush: bool) {
    const REGIONS: u64 = 4;
    const REGION: u64 = 64 * CS;
    const CHUNK: u64 = 4 * CS;
    const ROUNDS: u64 = 64;
    // The sizes are small constants.
    let len = |n: u64| usize::try_from(n).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("busy.qcow2");
    create(&p, "cluster_size=65536", "64M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    let busy = 63 << 20;
    img.write_at(&vec![9; len(CS)], busy).unwrap();
    let mut readers = std::collections::VecDeque::new();
    // A read begins, and the oldest of the two in flight ends.
    let mut step = || {
        let (map, _, pin) = q.lookup_pinned(busy).unwrap();
        assert!(matches!(map, super::Mapping::Data { .. }));
        readers.push_back(pin);
        if readers.len() > 2 {
            readers.pop_front();
        }
    };
    let peak_live = REGIONS * REGION + CS;
    for t in 0..REGIONS {
        img.write_at(&vec![0xee; len(REGION)], t * REGION).unwrap();
    }
    for round in 0..ROUNDS {
        for t in 0..REGIONS {
            let at = t * REGION + round % (REGION / CHUNK) * CHUNK;
            let byte = (t * ROUNDS + round).to_le_bytes()[0] | 1;
            step();
            img.discard(at, CHUNK).unwrap();
            step();
            if flush {
                img.flush().unwrap();
                step();
            }
            img.write_at(&vec![byte; len(CHUNK)], at).unwrap();
        }
    }
    drop(readers);
    img.flush().unwrap();
    let file_len = std::fs::metadata(&p).unwrap().len();
    eprintln!("file {file_len} bytes, peak live data {peak_live} bytes");
    // Besides 10%: header, L1, refcount table and block, L2 table; without flushes also the 8
    // freed clusters a discard may leave waiting (1/256 of this disk's clusters, at least 8).
    let backlog = if flush { 0 } else { 8 * CS };
    let bound = peak_live + peak_live / 10 + 8 * CS + backlog;
    assert!(
        file_len <= bound,
        "the file grew to {file_len} bytes for {peak_live} bytes of live data (bound {bound})"
    );
    for t in 0..REGIONS {
        for chunk in 0..REGION / CHUNK {
            let round = (0..ROUNDS).rev().find(|r| r % (REGION / CHUNK) == chunk);
            let byte = round.map_or(0xee, |r| (t * ROUNDS + r).to_le_bytes()[0] | 1);
            let mut back = vec![0u8; len(CHUNK)];
            img.read_at(&mut back, t * REGION + chunk * CHUNK).unwrap();
            assert!(back.iter().all(|&b| b == byte), "region {t} chunk {chunk}");
        }
    }
    drop(img);
    assert_consistent(&p, false);
}

/// With 512-byte clusters and 16-bit refcounts, one refcount block covers 256 clusters.
const BLOCK_RANGE: u64 = 256;

#[test]
fn a_new_refcount_block_is_made_durable_by_the_write_back_outside_the_lock() {
    const C: u64 = 512;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.qcow2");
    create(&p, "cluster_size=512", "1M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[1; 512], 0).unwrap();
    img.flush().unwrap();
    // Allocations running into the second block's range make that block, without a sync.
    let log = install(q, |_| false);
    for k in 1..BLOCK_RANGE + 8 {
        q.write_at(&[2; 512], k * C).unwrap();
    }
    let block = q.lock_shared().rc_table[1];
    assert_ne!(block, 0, "the allocations made no second block");
    assert!(
        !log.lock().unwrap().contains(&Op::Sync),
        "a new refcount block was synced while the allocation held the metadata lock"
    );
    log.lock().unwrap().clear();
    // The flush syncs the block before its table entry: while it does, lookups and allocations
    // (here into a third block's range) go on.
    let flushed = while_a_flush_syncs(q, || {
        assert!(
            q.meta.try_write().is_ok(),
            "the metadata lock is held while a new refcount block is synced"
        );
        assert!(matches!(q.lookup(0), Ok((super::Mapping::Data { .. }, _))));
        for k in BLOCK_RANGE + 8..2 * BLOCK_RANGE + 8 {
            q.write_at(&[3; 512], k * C).unwrap();
        }
    });
    flushed.unwrap();
    q.file.set_hook(None);
    img.flush().unwrap();
    drop(img);
    assert_consistent(&p, false);
    let img = open_rw(&p);
    for (k, byte) in [(0, 1), (BLOCK_RANGE, 2), (2 * BLOCK_RANGE, 3)] {
        let mut back = [0u8; 512];
        img.read_at(&mut back, k * C).unwrap();
        assert_eq!(back, [byte; 512], "cluster {k}");
    }
}

#[test]
fn a_new_refcount_block_is_durable_before_its_table_entry_and_the_l2_tables() {
    const C: u64 = 512;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.qcow2");
    create(&p, "cluster_size=512", "1M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    q.write_at(&[1; 512], 0).unwrap();
    img.flush().unwrap();
    for k in 1..BLOCK_RANGE + 8 {
        q.write_at(&[2; 512], k * C).unwrap();
    }
    let (entry_at, block, l2) = {
        let m = q.lock_shared();
        (
            m.header.refcount_table_offset + 8,
            m.rc_table[1],
            m.l1[0] & OFFSET_MASK,
        )
    };
    let log = install(q, |_| false);
    img.flush().unwrap();
    let ops = log.lock().unwrap().clone();
    let at = |f: &dyn Fn(Op) -> bool| ops.iter().position(|&op| f(op)).unwrap();
    let block_written = at(&|op| writes_at(op, block, C));
    let entry_written = at(&|op| writes_at(op, entry_at, 8));
    let l2_written = at(&|op| writes_at(op, l2, C));
    let synced_between = |a: usize, b: usize| ops[a..b].contains(&Op::Sync);
    assert!(
        block_written < entry_written && synced_between(block_written, entry_written),
        "the table entry was written before its block was durable: {ops:?}"
    );
    assert!(
        entry_written < l2_written && synced_between(entry_written, l2_written),
        "an L2 table was written before the table entry was durable: {ops:?}"
    );
}

/// 512-byte clusters with 64-bit refcounts: a refcount table cluster names 64 blocks of 64
/// clusters, so the first table covers 2 MiB of file.
const GROWTH_OPTS: &str = "cluster_size=512,refcount_bits=64";

/// An image of 8 MiB in `dir` whose first 1.75 MiB of disk are written (`[1; ..]`) and
/// flushed, its file just short of the 2 MiB the refcount table covers, with a refcount cache
/// that needs no eviction; returns it with the place (offset, bytes) of that table.
fn nearly_full_refcount_table(dir: &Path) -> (std::path::PathBuf, Image, (u64, u64)) {
    let p = dir.join("g.qcow2");
    create(&p, GROWTH_OPTS, "8M");
    let img = open_rw(&p);
    let q = qcow2(&img);
    for k in 0..28 {
        q.write_at(&[1; 65536], k * 65536).unwrap();
    }
    img.flush().unwrap();
    let old = {
        let mut m = q.lock();
        // Refcount blocks enough for no eviction: only flushes write back.
        m.rc_blocks = super::cache::TableCache::new(64);
        assert_eq!(m.header.refcount_table_clusters, 1);
        (m.header.refcount_table_offset, 512)
    };
    (p, img, old)
}

/// The header's refcount table as the file has it: (offset, clusters).
fn table_on_disk(p: &Path) -> (u64, u32) {
    let b = std::fs::read(p).unwrap();
    (
        u64::from_be_bytes(b[48..56].try_into().unwrap()),
        u32::from_be_bytes(b[56..60].try_into().unwrap()),
    )
}

fn is_header_switch(op: Op) -> bool {
    op == Op::Write {
        offset: 48,
        len: 12,
    }
}

#[test]
fn lookups_and_allocations_go_on_while_a_grown_refcount_table_is_switched_to() {
    let dir = tempfile::tempdir().unwrap();
    let (p, img, _) = nearly_full_refcount_table(dir.path());
    let q = qcow2(&img);
    // 512 KiB more passes 2 MiB of file: the refcount table grows, and the write-back that
    // follows switches the header to it.
    let grown = while_stopped_at(
        q,
        is_header_switch,
        || {
            q.write_at(&[2; 512 << 10], 2 << 20)?;
            q.flush()
        },
        || {
            assert!(
                q.meta.try_write().is_ok(),
                "the metadata lock is held while the header switches to a grown refcount table"
            );
            assert!(matches!(q.lookup(0), Ok((super::Mapping::Data { .. }, _))));
            let mut back = [0u8; 512];
            q.read_at(&mut back, 65536).unwrap();
            assert_eq!(back, [1; 512]);
            // New clusters, in the range only the new table covers.
            q.write_at(&[3; 65536], 3 << 20).unwrap();
            q.read_at(&mut back, 3 << 20).unwrap();
            assert_eq!(back, [3; 512]);
        },
    );
    grown.unwrap();
    // The next flush drops the old table's references, the one after writes those drops.
    img.flush().unwrap();
    img.flush().unwrap();
    assert_ne!(table_on_disk(&p).1, 1, "the header names the old table");
    let img = reopened_copy(dir.path(), &p, img);
    assert_reads(&img, 512, &[(0, 1), (2 << 20, 2), ((3 << 20) + 512, 3)]);
}

#[test]
fn a_grown_refcount_table_is_durable_before_the_header_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let (p, img, (old, old_len)) = nearly_full_refcount_table(dir.path());
    let q = qcow2(&img);
    let log = install(q, |_| false);
    q.write_at(&[2; 512 << 10], 2 << 20).unwrap();
    let (new_blocks, l2_tables) = {
        let m = q.lock_shared();
        let blocks: Vec<u64> = m.rc_table[64..]
            .iter()
            .copied()
            .filter(|&b| b != 0)
            .collect();
        let l2: Vec<u64> = m.l1.iter().map(|e| e & OFFSET_MASK).collect();
        (blocks, l2)
    };
    assert!(!new_blocks.is_empty(), "the table did not grow");
    img.flush().unwrap();
    let (table, clusters) = table_on_disk(&p);
    assert_ne!(table, old, "the flush did not switch the header");
    let ops = log.lock().unwrap().clone();
    let first = |f: &dyn Fn(Op) -> bool| ops.iter().position(|&op| f(op));
    let switched = first(&|op| is_header_switch(op)).expect("no header switch");
    let last = |f: &dyn Fn(Op) -> bool| ops[..switched].iter().rposition(|&op| f(op));
    let table_written = last(&|op| writes_at(op, table, u64::from(clusters) * 512)).unwrap();
    let synced_between = |a: usize, b: usize| ops[a..b].contains(&Op::Sync);
    assert!(
        table_written < switched && synced_between(table_written, switched),
        "the header named the new table before it was durable: {ops:?}"
    );
    for &b in &new_blocks {
        let written = last(&|op| writes_at(op, b, 512)).unwrap();
        assert!(
            written < switched && synced_between(written, switched),
            "a new refcount block was not durable before the header named its table: {ops:?}"
        );
    }
    // No L2 table reaches the clusters only the new table covers before the switch is durable.
    let l2_written = ops[switched..]
        .iter()
        .position(|&op| l2_tables.iter().any(|&t| t != 0 && writes_at(op, t, 512)))
        .map(|i| switched + i)
        .expect("no L2 table written after the switch");
    assert!(
        !ops[..switched]
            .iter()
            .any(|&op| l2_tables.iter().any(|&t| t != 0 && writes_at(op, t, 512))),
        "an L2 table was written before the switch: {ops:?}"
    );
    assert!(
        synced_between(switched, l2_written),
        "an L2 table was written before the switch was durable: {ops:?}"
    );
    // The old table's clusters take nothing new before the switch is durable.
    assert!(
        !ops[..=switched]
            .iter()
            .any(|&op| writes_at(op, old, old_len)),
        "the old table was written over before the switch: {ops:?}"
    );
}

#[test]
fn a_failed_refcount_table_switch_keeps_the_old_table_until_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (p, img, (old, old_len)) = nearly_full_refcount_table(dir.path());
    let q = qcow2(&img);
    let log = install(q, is_header_switch);
    q.write_at(&[2; 512 << 10], 2 << 20).unwrap();
    assert!(img.flush().is_err(), "the header switch did not fail");
    assert_eq!(table_on_disk(&p).0, old);
    // Allocations go on, and none lands in the old table, which the header still names.
    for k in 0..8 {
        q.write_at(&[3; 65536], (3 << 20) + k * 65536).unwrap();
    }
    assert!(img.flush().is_err(), "the header switch did not fail again");
    assert!(
        !log.lock()
            .unwrap()
            .iter()
            .any(|&op| writes_at(op, old, old_len)),
        "the old refcount table was written while the header named it"
    );
    assert_eq!(q.lock().refcount(&q.file, old / 512).unwrap(), 1);
    q.file.set_hook(None);
    img.flush().unwrap();
    assert_ne!(
        table_on_disk(&p).0,
        old,
        "the retry did not switch the header"
    );
    img.flush().unwrap();
    assert_eq!(
        q.lock().refcount(&q.file, old / 512).unwrap(),
        0,
        "the old table was not freed once the switch was durable"
    );
    img.flush().unwrap();
    let img = reopened_copy(dir.path(), &p, img);
    assert_reads(
        &img,
        512,
        &[(0, 1), (2 << 20, 2), ((3 << 20) + 7 * 65536, 3)],
    );
}
