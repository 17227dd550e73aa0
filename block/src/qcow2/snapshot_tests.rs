//! Snapshot operations with each of their file calls failing in turn (`snapshot_ops.rs`): the
//! image stays consistent (leaked clusters at most) and holds the old state or the new one.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::snapshot;
use super::tests::{assert_consistent, create, install, open_rw, qcow2};
use super::Qcow2;
use crate::file::test_hook::Op as FileOp;
use crate::DiskImage;

const SIZE: usize = 1 << 20;

/// The disk's bytes and the names of its snapshots.
fn state(p: &Path) -> (Vec<u8>, Vec<String>) {
    let img = open_rw(p);
    let q = qcow2(&img);
    let mut disk = vec![0u8; SIZE];
    q.read_at(&mut disk, 0).unwrap();
    let names = snapshot::list(q.file(), &q.header())
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    (disk, names)
}

/// An image of 4 KiB clusters (`opts` added): data, snapshot "a" made here, snapshot "b" made
/// by qemu-img, then other data over part of the disk.
fn base(p: &Path, opts: &str) {
    create(p, &format!("cluster_size=4096{opts}"), "1M");
    {
        let img = open_rw(p);
        img.write_at(&[1; 300_000], 5000).unwrap();
        qcow2(&img).snapshot_create("a", (1, 0)).unwrap();
    }
    let out = super::tests::qemu_img(&["snapshot", "-c", "b", p.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let img = open_rw(p);
    img.write_at(&[2; 100_000], 200_000).unwrap();
    img.write_at(&[3; 4096], 900_000).unwrap();
}

/// `qemu-img check` finds no corruption but COPIED flags out of step with refcounts (a v2
/// image cut mid-way, whose extra references are leaks), and `check -r all` of ours repairs
/// them.
fn only_copied_flags_wrong(p: &Path, what: &str) {
    let out = super::tests::qemu_img(&["check", p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    for line in text.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(line.contains("OFLAG_COPIED"), "{what}: {line}");
    }
    {
        let img = open_rw(p);
        qcow2(&img).check(super::check::Repair::All).unwrap();
    }
    assert_consistent(p, false);
}

/// Writes and syncs are failed in turn (a failed hole punch only keeps the space).
fn counted(op: FileOp) -> bool {
    !matches!(op, FileOp::Punch { .. })
}

type Op = fn(&Qcow2) -> Result<(), crate::Error>;

#[test]
fn every_failed_call_of_a_snapshot_operation_leaves_one_state_or_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let ops: [(&str, Op); 4] = [
        ("create", |q| q.snapshot_create("c", (2, 0))),
        ("apply", |q| q.snapshot_apply("a")),
        ("delete ours", |q| q.snapshot_delete("a")),
        ("delete qemu-img's", |q| q.snapshot_delete("b")),
    ];
    for opts in ["", ",compat=0.10"] {
        let b = dir.path().join("base.qcow2");
        base(&b, opts);
        let old = state(&b);
        for (name, op) in ops {
            let t = dir.path().join("t.qcow2");
            std::fs::copy(&b, &t).unwrap();
            let calls = {
                let img = open_rw(&t);
                let log = install(qcow2(&img), |_| false);
                op(qcow2(&img)).unwrap();
                let n = log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|&&op| counted(op))
                    .count();
                n
            };
            assert_consistent(&t, false);
            let new = state(&t);
            assert!(new != old, "{name}{opts}: changed nothing");
            for k in 0..calls {
                std::fs::copy(&b, &t).unwrap();
                let img = open_rw(&t);
                let q = qcow2(&img);
                let seen = Arc::new(AtomicUsize::new(0));
                let s = Arc::clone(&seen);
                install(q, move |op| {
                    counted(op) && s.fetch_add(1, Ordering::SeqCst) == k
                });
                let r = op(q);
                q.file.set_hook(None);
                drop(img);
                let dirty = super::read_header(
                    &crate::file::HostFile::open(&t, true, crate::CacheMode::Writeback).unwrap(),
                )
                .unwrap()
                .dirty();
                if dirty {
                    // A v3 image cut mid-way says so, and a read-write open repairs it.
                    assert!(opts.is_empty(), "{name}{opts}: a v2 image has no dirty bit");
                    drop(open_rw(&t));
                    assert_consistent(&t, true);
                } else if opts.is_empty() {
                    assert_consistent(&t, true);
                } else {
                    only_copied_flags_wrong(&t, &format!("{name}{opts}: call {k}"));
                }
                let now = state(&t);
                assert!(
                    now == old || now == new,
                    "{name}{opts}: call {k} failing left a third state ({r:?})"
                );
                if r.is_ok() {
                    assert!(
                        now == new,
                        "{name}{opts}: call {k} failed, the operation did not"
                    );
                }
            }
        }
    }
}
