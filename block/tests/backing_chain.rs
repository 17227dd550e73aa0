//! Backing chains: depth 8+ mixing raw and qcow2, relative and absolute names, backing images
//! shorter and longer than the overlay, loops refused, backing files never written.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)] // Test data: byte patterns from indices.

mod common;
use block::{open, DiskImage, Error, Format, OpenOptions};
use common::*;

#[test]
fn deep_mixed_chain_reads_like_qemu_and_writes_leave_backing_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = tmp(&dir, "base.raw");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "3M"]);
    qemu_io(&base, "raw", &["write -P 1 0 3M"]);
    let mut prev = (base.clone(), "raw".to_string());
    let mut sizes = ["4M", "2M", "5M", "5M", "3M", "6M", "4M", "4M", "5M"].iter();
    for i in 0..9 {
        // Alternate directories and absolute/relative names; sizes shorter and longer.
        let (path, name) = if i % 2 == 0 {
            let p = sub.join(format!("l{i}.qcow2"));
            let name = if prev.0.parent() == Some(sub.as_path()) {
                prev.0.file_name().unwrap().to_str().unwrap().to_string()
            } else {
                format!("../{}", prev.0.file_name().unwrap().to_str().unwrap())
            };
            (p, name)
        } else {
            let p = tmp(&dir, &format!("l{i}.qcow2"));
            (p, prev.0.to_str().unwrap().to_string())
        };
        let size = sizes.next().unwrap();
        let opts = if i == 3 {
            "cluster_size=4096".to_string()
        } else {
            "cluster_size=65536".to_string()
        };
        create_qcow2(&[
            "-o",
            &opts,
            "-b",
            &name,
            "-F",
            &prev.1,
            path.to_str().unwrap(),
            size,
        ]);
        let off = (i as u64) * 300_000 + 12345;
        qemu_io(
            &path,
            "qcow2",
            &[&format!("write -P {} {off} 200000", i + 10)],
        );
        prev = (path, "qcow2".into());
    }
    let top = prev.0.clone();
    assert_same_as_qemu(&top);

    // Writes to the top never change a backing file.
    let before = std::fs::read(&base).unwrap();
    let mid = read_qemu(&sub.join("l6.qcow2"), "qcow2");
    {
        let img = open_rw(&top);
        img.write_at(&[0x5a; 70000], 1_000_000).unwrap();
        img.discard(0, 1 << 20).unwrap();
        img.flush().unwrap();
    }
    assert_eq!(std::fs::read(&base).unwrap(), before);
    assert_eq!(read_qemu(&sub.join("l6.qcow2"), "qcow2"), mid);
    assert_check_clean(&top);
    assert_same_as_qemu(&top);
}

#[test]
fn a_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = tmp(&dir, "a.qcow2");
    let b = tmp(&dir, "b.qcow2");
    create_qcow2(&[a.to_str().unwrap(), "1M"]);
    create_qcow2(&["-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    let r = open(
        &b,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    );
    assert!(matches!(r, Err(Error::BackingLoop { .. })), "{r:?}");
}

#[test]
fn a_backing_file_without_format_is_probed_only_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let raw = tmp(&dir, "r.raw");
    std::fs::write(&raw, vec![3u8; 1 << 20]).unwrap();
    let q = tmp(&dir, "q.qcow2");
    create_qcow2(&[q.to_str().unwrap(), "1M"]);
    let top = tmp(&dir, "top.qcow2");
    create_qcow2(&["-b", "r.raw", "-F", "raw", top.to_str().unwrap(), "1M"]);
    drop_backing_format(&top);
    let img = open_ro(&top);
    let mut b = [0u8; 4];
    img.read_at(&mut b, 5).unwrap();
    assert_eq!(b, [3; 4]);
    drop(img);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "q.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    drop_backing_format(&top);
    let r = open(
        &top,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    );
    assert!(matches!(r, Err(Error::BackingProbe { .. })), "{r:?}");
    // A vmdk (or any format the engine does not read) is refused too, never read as raw.
    let vmdk = tmp(&dir, "v.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "v.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    drop_backing_format(&top);
    let r = open(
        &top,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    );
    let Err(Error::Backing { source, .. }) = r else {
        panic!("{r:?}")
    };
    assert!(
        matches!(
            *source,
            Error::ForeignFormat {
                format: block::Foreign::Vmdk,
                ..
            }
        ),
        "{source:?}"
    );
}

/// Renames the backing format extension to an unknown type, leaving a backing file without a
/// format (as images from older tools are).
fn drop_backing_format(p: &std::path::Path) {
    let mut b = std::fs::read(p).unwrap();
    let at = b[..65536]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    b[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(p, b).unwrap();
}
