//! `vmm-img convert -c` judged against qemu-img on the same files: the compressed image checks
//! clean, reads as its input (qemu-img compare, our engine), and qemu-img map shows compressed
//! clusters where the data compresses and plain ones where it does not.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Bytes that do not compress.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// qemu-img map's extents as (start, length, compressed) for the data ones.
fn data_extents(f: &Path) -> Vec<(u64, u64, bool)> {
    let out = qemu_img(&["map", "--output=json", f.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["compressed"] == true,
            )
        })
        .collect()
}

/// Whether `[off, off + len)` lies in extents that are all compressed (`true`) or all plain.
fn mapped_as(extents: &[(u64, u64, bool)], off: u64, len: u64, compressed: bool) -> bool {
    let mut pos = off;
    while pos < off + len {
        let Some(&(s, l, c)) = extents.iter().find(|&&(s, l, _)| s <= pos && pos < s + l) else {
            return false;
        };
        if c != compressed {
            return false;
        }
        pos = s + l;
    }
    true
}

#[test]
fn convert_c_writes_compressed_clusters_qemu_img_reads() {
    let dir = tempfile::tempdir().unwrap();
    let input = tmp(&dir, "in.qcow2");
    // Not a whole number of clusters: the last one is compressed zero padded.
    create_qcow2(&[input.to_str().unwrap(), "5000k"]);
    let noise_file = tmp(&dir, "noise");
    std::fs::write(&noise_file, noise(300 << 10)).unwrap();
    let write_noise = format!("write -s {} 1536k 300k", noise_file.display());
    qemu_io(
        &input,
        "qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 7 3M 200k",
            &write_noise,
            "write -P 9 4990k 10k",
        ],
    );
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=512",
        "extended_l2=on",
        "compat=0.10",
        "compression_type=zstd",
    ] {
        let out = tmp(&dir, "out.qcow2");
        let _ = std::fs::remove_file(&out);
        let o = vmm_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            input.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{opts}: {o:?}");
        assert_check_clean(&out);
        qemu_img(&["compare", input.to_str().unwrap(), out.to_str().unwrap()]);
        assert!(
            read_ours(&out, block::Format::Qcow2) == read_qemu(&input, "qcow2"),
            "{opts}"
        );
        let ext = data_extents(&out);
        assert!(mapped_as(&ext, 0, 1 << 20, true), "{opts}: {ext:?}");
        assert!(mapped_as(&ext, 3 << 20, 192 << 10, true), "{opts}: {ext:?}");
        assert!(
            mapped_as(&ext, 1600 << 10, 180 << 10, false),
            "{opts}: {ext:?}"
        );
        assert!(
            mapped_as(&ext, 4990 << 10, 10 << 10, true),
            "{opts}: {ext:?}"
        );
        // Far smaller than the plain copy: the patterns compress to almost nothing.
        let plain = tmp(&dir, "plain.qcow2");
        let _ = std::fs::remove_file(&plain);
        let o = vmm_img(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            opts,
            input.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]);
        assert!(o.status.success());
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(
            len(&out) < len(&plain) / 2,
            "{opts}: {} vs {}",
            len(&out),
            len(&plain)
        );
    }
}

#[test]
fn convert_c_to_raw_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = tmp(&dir, "in.qcow2");
    create_qcow2(&[input.to_str().unwrap(), "1M"]);
    let output = tmp(&dir, "out.raw");
    let args = [
        "convert",
        "-c",
        "-O",
        "raw",
        input.to_str().unwrap(),
        output.to_str().unwrap(),
    ];
    let o = vmm_img(&args);
    let q = Command::new("qemu-img").args(args).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(q.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.starts_with("vmm-img: Compression not supported for this file format"),
        "{e}"
    );
}
