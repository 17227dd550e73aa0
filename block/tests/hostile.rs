//! Hostile and flagged images at open: the corrupt bit, tables past the end of the file, bad
//! entries found while reading, and locks against QEMU's tools in both directions.
#![allow(clippy::unwrap_used)]

mod common;
use std::os::unix::fs::FileExt;

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
