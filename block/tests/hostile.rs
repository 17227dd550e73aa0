//! Hostile and flagged images at open: the corrupt bit, tables past the end of the file, bad
//! entries found while reading, and locks against QEMU's tools in both directions.
#![allow(clippy::unwrap_used)]

mod common;
use std::os::unix::fs::FileExt;

use block::qcow2::check::Repair;
use block::{open, DiskImage, Error, ErrorKind, Format, OpenOptions};
use common::*;

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        read_only,
        ..Default::default()
    }
}

fn poke(p: &std::path::Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn the_corrupt_bit_allows_read_only_opens_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "c.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    poke(&p, 72, &2u64.to_be_bytes());
    let e = open(&p, opts(false)).unwrap_err();
    assert!(matches!(
        e,
        Error::Format {
            source: block::qcow2::FormatError::CorruptBit,
            ..
        }
    ));
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    open(&p, opts(true)).unwrap();
}

#[test]
fn tables_past_the_end_and_bad_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "t.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    // L1 table at 64 MiB, far past the end of a 256 KiB file.
    poke(&p, 40, &(64u64 << 20).to_be_bytes());
    let e = open(&p, opts(true)).unwrap_err();
    assert!(matches!(
        e,
        Error::Format {
            source: block::qcow2::FormatError::TablePastEnd {
                table: "L1 table",
                ..
            },
            ..
        }
    ));
    assert_eq!(e.kind(), ErrorKind::Corrupt);

    let p = tmp(&dir, "e.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    // An L1 entry with reserved bits: reading fails with a corrupt-image error, no panic.
    poke(
        &p,
        3 * 65536,
        &(0x0100_0000_0000_0000u64 | 5 << 16).to_be_bytes(),
    );
    let img = open(&p, opts(true)).unwrap();
    let mut b = [0u8; 512];
    let e = img.read_at(&mut b, 0).unwrap_err();
    assert!(matches!(
        e,
        Error::Format {
            source: block::qcow2::FormatError::BadL1Entry { .. },
            ..
        }
    ));
    // An L1 entry pointing into the header.
    poke(&p, 3 * 65536, &(1u64 << 63 | 512).to_be_bytes());
    let img = open(&p, opts(true)).unwrap();
    assert!(img.read_at(&mut b, 0).is_err());
}

#[test]
fn requests_past_the_end_and_writes_to_read_only_images_fail() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "r.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    let img = open(&p, opts(true)).unwrap();
    let mut b = [0u8; 2];
    assert!(matches!(
        img.read_at(&mut b, (1 << 20) - 1),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(img.write_at(&b, 0), Err(Error::ReadOnly)));
    assert!(matches!(img.discard(0, 512), Err(Error::ReadOnly)));
}

#[test]
fn locks_exclude_qemu_io_writers_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "l.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    // We hold it for writing: qemu-io cannot open it for writing, nor qemu-img for reading.
    let img = open(&p, opts(false)).unwrap();
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "{out:?}"
    );
    drop(img);
    // qemu-io holds it for writing (it waits on a pipe): our writer and reader are refused.
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", p.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Give qemu-io time to open and lock the image before we try.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut refused = false;
    for _ in 0..100 {
        match open(&p, opts(false)) {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
                refused = true;
                break;
            }
            Ok(img) => drop(img),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(refused, "qemu-io's lock was never seen");
    assert!(matches!(open(&p, opts(true)), Err(Error::Locked { .. })));
    drop(child.stdin.take());
    child.wait().unwrap();
    open(&p, opts(false)).unwrap();
}

#[test]
fn read_write_opens_clear_autoclear_bits_and_keep_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "a.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    // Autoclear bits 0 (bitmaps) and 5 (unknown).
    poke(&p, 88, &0x21u64.to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    open(&p, opts(true)).unwrap();
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a read-only open changed the image"
    );
    drop(open(&p, opts(false)).unwrap());
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after[88..96], [0u8; 8]);
    // Everything else in the first cluster (the feature name table extension QEMU wrote, the
    // end marker) is as it was.
    assert_eq!(after[..88], before[..88]);
    assert_eq!(after[96..4096], before[96..4096]);
    assert_check_clean(&p);
}

/// The header's incompatible feature bits (offset 72).
fn incompatible(p: &std::path::Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    u64::from_be_bytes(b[72..80].try_into().unwrap())
}

/// A 1 MiB image with guest cluster 0 written by qemu-io (64 KiB clusters: header, refcount
/// table at 0x10000, refcount block 0x20000, L1 0x30000, L2 0x40000, data 0x50000), whose L2
/// entry 0 is then aimed at `host` (with the COPIED flag, so it looks like ours alone).
fn aimed_at(dir: &tempfile::TempDir, name: &str, host: u64) -> std::path::PathBuf {
    let p = tmp(dir, name);
    create_qcow2(&[p.to_str().unwrap(), "1M"]);
    qemu_io(&p, "qcow2", &["write -P 0xab 0 64k"]);
    let b = std::fs::read(&p).unwrap();
    assert_eq!(b[0x30000..0x30008], (1u64 << 63 | 0x40000).to_be_bytes());
    assert_eq!(b[0x40000..0x40008], (1u64 << 63 | 0x50000).to_be_bytes());
    poke(&p, 0x40000, &(1u64 << 63 | host).to_be_bytes());
    p
}

#[test]
fn a_write_aimed_at_the_l1_table_marks_the_image_corrupt_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = aimed_at(&dir, "o.qcow2", 0x30000);
    let before = std::fs::read(&p).unwrap();
    let img = open(&p, opts(false)).unwrap();
    // Reading metadata through the entry is harmless (QEMU allows it too); the read caches
    // the L2 table, so the lock-free path would map the write: it refuses to.
    let mut b = vec![0u8; 512];
    img.read_at(&mut b, 0).unwrap();
    let mut extents = Vec::new();
    assert!(img.map_direct(0, 512, true, &mut extents).is_none());
    assert!(img.map_direct(0, 512, false, &mut extents).is_some());
    let e = img.write_at(&[0xcd; 512], 0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Format {
                source: block::qcow2::FormatError::MetadataOverlap { .. },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    // Further writes are refused, even where the metadata is sound.
    assert!(img.write_at(&[0xcd; 512], 128 << 10).is_err());
    drop(img);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        after[0x30000..0x40000],
        before[0x30000..0x40000],
        "L1 changed"
    );
    assert_eq!(incompatible(&p) & 2, 2, "corrupt bit not set");
    assert!(open(&p, opts(false)).is_err());

    // QEMU refuses the same write on the same image, and marks it corrupt the same way.
    let q = aimed_at(&dir, "q.qcow2", 0x30000);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xcd 0 512",
            q.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Input/output error"),
        "{out:?}"
    );
    assert_eq!(incompatible(&q) & 2, 2);
    assert_eq!(
        std::fs::read(&q).unwrap()[0x30000..0x40000],
        before[0x30000..0x40000]
    );
}

/// Checks an image with our engine (opened for writing when repairing).
fn check(p: &std::path::Path, repair: Repair) -> Result<block::qcow2::check::CheckReport, Error> {
    let img = open(p, opts(repair == Repair::None))?;
    let block::Image::Qcow2(q) = &img else {
        panic!("not qcow2");
    };
    q.check(repair)
}

#[test]
fn a_snapshot_table_ending_at_the_end_of_the_file_is_read() {
    // QEMU writes the last snapshot entry without its padding to 8 bytes.
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "s.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "4M"]);
    qemu_io(&p, "qcow2", &["write 0 64k"]);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    assert_ne!(std::fs::metadata(&p).unwrap().len() % 8, 0);
    let r = check(&p, Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    open(&p, opts(false))
        .unwrap()
        .write_at(&[1; 512], 0)
        .unwrap();
    assert_check_clean(&p);
}

#[test]
fn a_metadata_cluster_with_a_zero_refcount_is_never_filled_with_data() {
    // The L2 table's refcount (cluster 4, a 16-bit entry in the block at 0x20000) is zero, so
    // the allocator hands the table's cluster out for the next data cluster.
    let dir = tempfile::tempdir().unwrap();
    for (name, ours) in [("o.qcow2", true), ("q.qcow2", false)] {
        let p = aimed_at(&dir, name, 0x50000);
        poke(&p, 0x20000 + 4 * 2, &[0, 0]);
        let before = std::fs::read(&p).unwrap();
        if ours {
            let img = open(&p, opts(false)).unwrap();
            let e = img.write_at(&[0xcd; 512], 1 << 16).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Format {
                        source: block::qcow2::FormatError::MetadataOverlap {
                            host: 0x40000,
                            what: "active L2 table",
                            ..
                        },
                        ..
                    }
                ),
                "{e:?}"
            );
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        } else {
            let out = std::process::Command::new("qemu-io")
                .args([
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0xcd 64k 512",
                    p.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("active L2 table"),
                "{out:?}"
            );
        }
        let after = std::fs::read(&p).unwrap();
        assert_eq!(
            after[0x40000..0x50000],
            before[0x40000..0x50000],
            "{name}: L2 changed"
        );
        assert_eq!(incompatible(&p) & 2, 2, "{name}");
    }
}

#[test]
fn a_data_cluster_past_the_end_of_the_file_fails_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = aimed_at(&dir, "t.qcow2", 0x50000);
    // The data cluster at 0x50000 is cut off.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0x50000)
        .unwrap();
    let img = open(&p, opts(true)).unwrap();
    let mut b = vec![0u8; 512];
    let e = img.read_at(&mut b, 512).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Format {
                source: block::qcow2::FormatError::DataPastEnd {
                    guest: 512,
                    host: 0x50200,
                    len: 512,
                    file_len: 0x50000,
                },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let mut extents = Vec::new();
    assert!(img.map_direct(0, 512, false, &mut extents).is_none());
    // Unallocated clusters still read as zeroes.
    img.read_at(&mut b, 1 << 16).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// Runs our `vmm-img` with arguments; returns its exit code.
fn vmm_img_status(args: &[&str]) -> i32 {
    vmm_img(args).status.code().unwrap()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn a_repair_places_its_refcounts_after_clusters_referenced_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "t.qcow2");
    create_qcow2(&[p.to_str().unwrap(), "4M"]);
    // Header, refcount table, refcount block, L1, L2, then data at clusters 5, 6 and 7.
    qemu_io(&p, "qcow2", &["write -P 1 0 192k"]);
    let b = std::fs::read(&p).unwrap();
    assert_eq!(be64(&b, 0x40010), 1 << 63 | 0x70000);
    // Clusters 6 and 7 are cut off, still referenced.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(0x60000).unwrap();
    drop(f);
    let ps = p.to_str().unwrap();
    assert_eq!(vmm_img_status(&["check", ps]), 2);
    assert_eq!(vmm_img_status(&["check", "-r", "all", ps]), 0);
    let b = std::fs::read(&p).unwrap();
    assert!(
        be64(&b, 48) >= 0x80000,
        "refcount table at {:#x}",
        be64(&b, 48)
    );
    assert_check_clean(&p);
    // A write to the cut-off clusters lands on them, not on the new refcount structure.
    qemu_io(&p, "qcow2", &["write -P 9 64k 128k"]);
    assert_check_clean(&p);
    let img = open(&p, opts(false)).unwrap();
    img.write_at(&[7; 4096], 128 << 10).unwrap();
    drop(img);
    assert_check_clean(&p);
    qemu_io(
        &p,
        "qcow2",
        &["read -P 1 0 64k", "read -P 9 64k 64k", "read -P 7 128k 4k"],
    );
}

#[test]
fn a_dirty_image_with_broken_references_is_not_opened_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "d.qcow2");
    create_qcow2(&["-o", "lazy_refcounts=on", p.to_str().unwrap(), "1M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 64k"]);
    // Dirty, and L2 entry 1 points far past the end of the file.
    poke(&p, 72, &1u64.to_be_bytes());
    poke(&p, 0x40008, &(1u64 << 63 | 0x100_0000).to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let e = open(&p, opts(false)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Format {
                source: block::qcow2::FormatError::DirtyImageCorrupt { corruptions: 1, .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(std::fs::read(&p).unwrap(), before, "the refused open wrote");
    // Read-only opens (which rebuild nothing) still work.
    open(&p, opts(true)).unwrap();
    // A dirty image whose references are sound is rebuilt and opened.
    let q = tmp(&dir, "ok.qcow2");
    create_qcow2(&["-o", "lazy_refcounts=on", q.to_str().unwrap(), "1M"]);
    qemu_io(&q, "qcow2", &["write -P 1 0 64k"]);
    poke(&q, 72, &1u64.to_be_bytes());
    poke(&q, 0x20000 + 5 * 2, &[0, 0]);
    drop(open(&q, opts(false)).unwrap());
    assert_eq!(incompatible(&q), 0);
    assert_check_clean(&q);
}

/// Replaces the snapshot table of `p` (which has one snapshot) with `n` copies of its entry,
/// each given the L1 offset (and size, if any) `l1(file, i)` returns; `l1` may append to the
/// file. The table goes at the end of the file.
fn set_snapshots(
    p: &std::path::Path,
    n: usize,
    mut l1: impl FnMut(&mut Vec<u8>, usize) -> (u64, Option<u32>),
) {
    let mut b = std::fs::read(p).unwrap();
    let table = usize::try_from(be64(&b, 64)).unwrap();
    let id = usize::from(u16::from_be_bytes(
        b[table + 12..table + 14].try_into().unwrap(),
    ));
    let name = usize::from(u16::from_be_bytes(
        b[table + 14..table + 16].try_into().unwrap(),
    ));
    let extra = usize::try_from(u32::from_be_bytes(
        b[table + 36..table + 40].try_into().unwrap(),
    ))
    .unwrap();
    let len = 40 + extra + id + name;
    let mut entry = b[table..table + len].to_vec();
    entry.resize(len.next_multiple_of(8), 0);
    b.resize(b.len().next_multiple_of(512), 0);
    let mut snaps = Vec::new();
    for i in 0..n {
        let (at, size) = l1(&mut b, i);
        entry[..8].copy_from_slice(&at.to_be_bytes());
        if let Some(size) = size {
            entry[8..12].copy_from_slice(&size.to_be_bytes());
        }
        snaps.extend_from_slice(&entry);
    }
    b.resize(b.len().next_multiple_of(512), 0);
    let table_at = b.len() as u64;
    b.extend_from_slice(&snaps);
    b[60..64].copy_from_slice(&u32::try_from(n).unwrap().to_be_bytes());
    b[64..72].copy_from_slice(&table_at.to_be_bytes());
    std::fs::write(p, &b).unwrap();
}

#[test]
fn snapshots_sharing_l2_tables_are_counted_without_rereading_them() {
    const N: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "s.qcow2");
    create_qcow2(&["-o", "cluster_size=512", p.to_str().unwrap(), "1M"]);
    qemu_io(&p, "qcow2", &["write -P 1 0 512"]);
    qemu_img(&["snapshot", "-c", "s", p.to_str().unwrap()]);
    // N snapshots, each with its own L1 table (a copy of the first one's), all pointing at the
    // same L2 table; refcounts are left as they were, so most are now wrong.
    let b = std::fs::read(&p).unwrap();
    let table = usize::try_from(be64(&b, 64)).unwrap();
    let l1 = usize::try_from(be64(&b, table)).unwrap();
    let l1_bytes = b[l1..l1 + 512].to_vec();
    set_snapshots(&p, N, |b, _| {
        let at = b.len() as u64;
        b.extend_from_slice(&l1_bytes);
        (at, None)
    });
    let r = check(&p, Repair::None).unwrap();
    // Every snapshot L1 table once, and the one L2 table once.
    assert_eq!(r.tables_read, N as u64 + 1);
    assert!(r.corruptions >= N as u64, "{}", r.corruptions);
    assert_eq!(r.messages.len(), block::qcow2::check::MAX_MESSAGES);
    assert_eq!(
        r.messages.len() as u64 + r.messages_omitted,
        r.corruptions + r.leaks
    );
    // The repair counts each shared reference: QEMU agrees with every refcount it wrote.
    let r = check(&p, Repair::All).unwrap();
    assert!(r.corruptions_fixed > 0);
    assert_check_clean(&p);
    let r = check(&p, Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.messages_omitted), (0, 0, 0));
}

#[test]
fn snapshot_l1_tables_beyond_the_check_budget_are_refused() {
    // 17 snapshots with L1 tables of 4 Mi entries (32 MiB, QEMU's largest), each starting one
    // cluster after the previous one: 544 MiB of tables in a 32 MiB (sparse) file.
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "h.qcow2");
    create_qcow2(&["-o", "cluster_size=512", p.to_str().unwrap(), "1M"]);
    qemu_img(&["snapshot", "-c", "s", p.to_str().unwrap()]);
    set_snapshots(&p, 17, |b, i| {
        if i == 0 {
            b.resize(b.len() + (32 << 20) + 17 * 512, 0);
        }
        let at = b.len() as u64 - (32 << 20) - 17 * 512 + i as u64 * 512;
        (at, Some(4 << 20))
    });
    let e = check(&p, Repair::None).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "snapshot L1 tables to check",
                ..
            }
        ),
        "{e:?}"
    );
    // The same tables, shared by the 17 snapshots, are read once.
    set_snapshots(&p, 17, |b, _| {
        (b.len() as u64 - (32 << 20) - 17 * 512, Some(4 << 20))
    });
    let r = check(&p, Repair::None).unwrap();
    assert_eq!(r.tables_read, 1);
}

#[test]
fn dropping_an_entry_aimed_at_metadata_never_frees_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    for (name, discard) in [("d.qcow2", true), ("w.qcow2", false)] {
        let p = aimed_at(&dir, name, 0x30000);
        if !discard {
            // Not ours alone: a write copies the cluster and drops the old reference.
            poke(&p, 0x40000, &0x30000u64.to_be_bytes());
        }
        let before = std::fs::read(&p).unwrap();
        let img = open(&p, opts(false)).unwrap();
        if discard {
            img.discard(0, 1 << 16).unwrap();
        } else {
            img.write_at(&[5; 512], 0).unwrap();
        }
        img.flush().unwrap();
        drop(img);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(
            after[0x30000..0x30008],
            before[0x30000..0x30008],
            "{name}: L1 changed"
        );
        assert_eq!(incompatible(&p) & 2, 2, "{name}");
        let img = open(&p, opts(true)).unwrap();
        let mut b = vec![0u8; 512];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, if discard { vec![0; 512] } else { vec![5; 512] });
    }
}

#[test]
fn a_reference_far_past_the_end_is_reported_and_not_repaired() {
    // An L2 entry aimed 1 TiB out: counting up to it would take gigabytes of counters.
    let dir = tempfile::tempdir().unwrap();
    let p = aimed_at(&dir, "f.qcow2", 1 << 40);
    let r = check(&p, Repair::None).unwrap();
    assert_eq!(r.corruptions, 2, "{:?}", r.messages); // And its COPIED flag.
    assert!(
        r.messages[0].contains("far past the end"),
        "{:?}",
        r.messages
    );
    let before = std::fs::read(&p).unwrap();
    let e = check(&p, Repair::All).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "range of clusters referenced",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
}
