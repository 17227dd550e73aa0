//! Internal snapshots (`vmm-img snapshot -c|-a|-d`) judged against qemu-img on the same files:
//! snapshots made here are qemu-img's (its check, its list, its apply), snapshots made by
//! qemu-img apply and delete here, and writes after a snapshot leave it intact.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use block::DiskImage;
use common::*;

/// `vmm-img snapshot OP NAME FILE`, which must succeed.
fn ours(op: &str, name: &str, f: &Path) {
    let o = vmm_img(&["snapshot", op, name, f.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "vmm-img snapshot {op} {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img snapshot OP NAME FILE`.
fn theirs(op: &str, name: &str, f: &Path) {
    qemu_img(&["snapshot", op, name, f.to_str().unwrap()]);
}

/// Both tools list the same table.
fn same_list(f: &Path) {
    let o = vmm_img(&["snapshot", "-l", f.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        qemu_img(&["snapshot", "-l", f.to_str().unwrap()])
    );
}

/// Fills `f` with data of `seed`: plain clusters, a compressed one (qemu-io compresses only
/// into unallocated clusters: each seed has its own) and a zero one.
fn fill(f: &Path, seed: u8) {
    let cmds = [
        format!("write -P {seed} 0 200k"),
        format!("write -P {} 1M 64k", seed + 1),
        format!(
            "write -c -P {} {} 64k",
            seed + 2,
            (2 << 20) + u64::from(seed) * 65536
        ),
        "write -z 3M 64k".to_string(),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(f, "qcow2", &cmds);
}

const OPTIONS: [&str; 4] = [
    "cluster_size=65536",
    "cluster_size=512",
    "cluster_size=65536,extended_l2=on",
    "compat=0.10,cluster_size=4096",
];

#[test]
fn snapshots_created_here_are_qemu_img_snapshots() {
    for opts in OPTIONS {
        let dir = tempfile::tempdir().unwrap();
        let f = tmp(&dir, "s.qcow2");
        create_qcow2(&["-o", opts, f.to_str().unwrap(), "4M"]);
        fill(&f, 1);
        let before = read_qemu(&f, "qcow2");
        ours("-c", "first", &f);
        assert_check_clean(&f);
        same_list(&f);
        fill(&f, 10);
        qemu_io(&f, "qcow2", &["write -P 20 100k 1M", "discard 1M 64k"]);
        assert_check_clean(&f);
        let after = read_qemu(&f, "qcow2");
        assert_ne!(before, after, "{opts}");
        // A second snapshot of ours gets the next id.
        ours("-c", "second", &f);
        same_list(&f);
        theirs("-a", "first", &f);
        assert_check_clean(&f);
        assert!(
            read_qemu(&f, "qcow2") == before,
            "{opts}: apply by qemu-img"
        );
        theirs("-a", "second", &f);
        assert!(read_qemu(&f, "qcow2") == after, "{opts}: apply by qemu-img");
        assert_check_clean(&f);
    }
}

#[test]
fn qemu_img_snapshots_apply_and_delete_here() {
    for opts in OPTIONS {
        let dir = tempfile::tempdir().unwrap();
        let f = tmp(&dir, "s.qcow2");
        create_qcow2(&["-o", opts, f.to_str().unwrap(), "4M"]);
        fill(&f, 1);
        let one = read_qemu(&f, "qcow2");
        theirs("-c", "one", &f);
        fill(&f, 10);
        let two = read_qemu(&f, "qcow2");
        theirs("-c", "two", &f);
        qemu_io(&f, "qcow2", &["write -P 30 0 3M"]);
        ours("-a", "one", &f);
        assert_check_clean(&f);
        assert!(read_qemu(&f, "qcow2") == one, "{opts}: apply by name");
        // By id: "2" is the id of "two".
        ours("-a", "2", &f);
        assert_check_clean(&f);
        assert!(read_qemu(&f, "qcow2") == two, "{opts}: apply by id");
        ours("-d", "one", &f);
        assert_check_clean(&f);
        same_list(&f);
        assert!(
            read_qemu(&f, "qcow2") == two,
            "{opts}: delete keeps the disk"
        );
        // Writes after a delete reuse what only the deleted snapshot held, in place where the
        // disk holds the last reference.
        qemu_io(&f, "qcow2", &["write -P 31 0 64k"]);
        ours("-d", "two", &f);
        assert_check_clean(&f);
        same_list(&f);
        theirs("-c", "three", &f);
        ours("-a", "three", &f);
        ours("-d", "three", &f);
        assert_check_clean(&f);
    }
}

#[test]
fn engine_writes_after_a_snapshot_leave_it_intact() {
    for opts in OPTIONS {
        let dir = tempfile::tempdir().unwrap();
        let f = tmp(&dir, "s.qcow2");
        create_qcow2(&["-o", opts, f.to_str().unwrap(), "4M"]);
        fill(&f, 1);
        let before = read_qemu(&f, "qcow2");
        ours("-c", "s", &f);
        {
            // Partial clusters (copy-on-write of shared data and a shared L2 table), a
            // compressed cluster, zeroes and a discard, through our engine.
            let img = open_rw(&f);
            img.write_at(&[7u8; 1000], 4096 + 100).unwrap();
            img.write_at(&[8u8; 70_000], 1 << 20).unwrap();
            img.write_at(&[9u8; 512], (2 << 20) + 65536 + 512).unwrap();
            img.write_zeroes(0, 65536, true).unwrap();
            img.discard(3 << 20, 65536).unwrap();
            img.flush().unwrap();
        }
        assert_check_clean(&f);
        let written = read_qemu(&f, "qcow2");
        assert_ne!(written, before);
        assert_eq!(read_ours(&f, block::Format::Qcow2), written, "{opts}");
        ours("-a", "s", &f);
        assert_check_clean(&f);
        assert!(
            read_qemu(&f, "qcow2") == before,
            "{opts}: the snapshot kept"
        );
        // qemu-io reads the old bytes back.
        qemu_io(&f, "qcow2", &["read -P 1 4096 4096", "read -P 2 1M 64k"]);
    }
}

#[test]
fn refusals_are_qemu_img_s() {
    let dir = tempfile::tempdir().unwrap();
    let f = tmp(&dir, "s.qcow2");
    create_qcow2(&[f.to_str().unwrap(), "4M"]);
    theirs("-c", "4", &f);
    let raw = tmp(&dir, "r.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    let s = f.to_str().unwrap();
    for (args, message) in [
        (
            &["snapshot", "-a", "nope", s][..],
            "Could not apply snapshot 'nope'",
        ),
        (
            &["snapshot", "-d", "nope", s],
            "Could not delete snapshot 'nope'",
        ),
        // Delete goes by name only: there is no snapshot named "1".
        (&["snapshot", "-d", "1", s], "Could not delete snapshot '1'"),
        (
            &["snapshot", "-c", "x", "-a", "y", s],
            "Cannot mix '-l', '-a', '-c', '-d'",
        ),
        (
            &["snapshot", "-c", "x", "-f", "raw", raw.to_str().unwrap()],
            "Could not create snapshot 'x': Operation not supported",
        ),
    ] {
        let o = vmm_img(args);
        let q = Command::new("qemu-img").args(args).output().unwrap();
        assert_eq!(o.status.code(), q.status.code(), "{args:?}");
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.starts_with(&format!("vmm-img: {message}")),
            "{args:?}: {e}"
        );
    }
    // Nothing changed.
    same_list(&f);
    assert_check_clean(&f);
    // A snapshot of another disk size is applied after resizing the disk to it, as qemu-img
    // applies it.
    qemu_img(&["resize", s, "8M"]);
    let q = tmp(&dir, "q.qcow2");
    std::fs::copy(&f, &q).unwrap();
    let o = vmm_img(&["snapshot", "-a", "4", s]);
    assert!(o.status.success(), "{o:?}");
    qemu_img(&["snapshot", "-a", "4", q.to_str().unwrap()]);
    assert_check_clean(&f);
    assert_eq!(open_ro(&f).size(), 4 << 20);
    assert!(read_qemu(&f, "qcow2") == read_qemu(&q, "qcow2"));
}

#[test]
fn a_disk_of_size_zero_takes_snapshots_without_leaking() {
    // Its L1 table has no entries: nothing to copy, no cluster to take.
    let dir = tempfile::tempdir().unwrap();
    let f = tmp(&dir, "z.qcow2");
    create_qcow2(&[f.to_str().unwrap(), "0"]);
    ours("-c", "a", &f);
    assert_check_clean(&f);
    theirs("-a", "a", &f);
    ours("-a", "a", &f);
    ours("-d", "a", &f);
    assert_check_clean(&f);
    same_list(&f);
}
