//! Reading qcow2 images made by qemu-img/qemu-io in every variant, compared byte for byte with
//! `qemu-img convert -O raw`.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)] // Test data: byte patterns from indices.

mod common;
use common::*;

fn make(dir: &tempfile::TempDir, name: &str, opts: &str, size: &str) -> std::path::PathBuf {
    let p = tmp(dir, name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p.to_str().unwrap());
    args.push(size);
    qemu_img(&args);
    p
}

fn fill(p: &std::path::Path, size: u64) {
    let mut cmds = pattern_cmds(size, 3 * 65536 + 4096, 70000);
    cmds.push("write -z 200000 300000".into());
    cmds.push("write -P 0xaa 1000 1".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(p, "qcow2", &refs);
}

#[test]
fn cluster_sizes_512_to_2m() {
    let dir = tempfile::tempdir().unwrap();
    for bits in 9..=21 {
        let cs = 1u64 << bits;
        let p = make(
            &dir,
            &format!("c{bits}.qcow2"),
            &format!("cluster_size={cs}"),
            "3M",
        );
        fill(&p, 3 << 20);
        assert_same_as_qemu(&p);
    }
}

#[test]
fn v2_and_refcount_widths() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(&dir, "v2.qcow2", "compat=0.10", "4M");
    fill(&p, 4 << 20);
    assert_same_as_qemu(&p);
    for rb in [1, 2, 4, 8, 16, 32, 64] {
        let p = make(
            &dir,
            &format!("rb{rb}.qcow2"),
            &format!("refcount_bits={rb},cluster_size=4096"),
            "2M",
        );
        fill(&p, 2 << 20);
        assert_same_as_qemu(&p);
    }
}

#[test]
fn preallocation_modes_and_lazy_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    for pre in ["off", "metadata", "falloc", "full"] {
        let p = make(
            &dir,
            &format!("{pre}.qcow2"),
            &format!("preallocation={pre}"),
            "4M",
        );
        fill(&p, 4 << 20);
        assert_same_as_qemu(&p);
    }
    let p = make(&dir, "lazy.qcow2", "lazy_refcounts=on", "4M");
    fill(&p, 4 << 20);
    assert_same_as_qemu(&p);
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let src = make(&dir, "src.qcow2", "", "5M");
    fill(&src, 5 << 20);
    for (ct, cs) in [
        ("zlib", 65536),
        ("zstd", 65536),
        ("zlib", 4096),
        ("zstd", 2 << 20),
        ("zlib", 512),
    ] {
        let out = tmp(&dir, &format!("c-{ct}-{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct},cluster_size={cs}"),
            src.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_same_as_qemu(&out);
    }
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [16384, 65536, 2 << 20] {
        let p = make(
            &dir,
            &format!("x{cs}.qcow2"),
            &format!("extended_l2=on,cluster_size={cs}"),
            "6M",
        );
        qemu_io(
            &p,
            "qcow2",
            &[
                "write -P 3 1024 5000",
                "write -z 9000 30000",
                "write -P 4 100000 512",
                "write -P 5 3000000 70000",
            ],
        );
        assert_same_as_qemu(&p);
    }
}

#[test]
fn internal_snapshots_read_the_active_layer() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(&dir, "snap.qcow2", "", "4M");
    fill(&p, 4 << 20);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    qemu_io(
        &p,
        "qcow2",
        &["write -P 0x77 0 100000", "write -z 1000000 65536"],
    );
    qemu_img(&["snapshot", "-c", "s2", p.to_str().unwrap()]);
    qemu_io(&p, "qcow2", &["write -P 0x78 50000 100000"]);
    assert_same_as_qemu(&p);
}
