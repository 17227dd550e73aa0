//! Helpers shared by the integration tests: running qemu-img and qemu-io (which must be
//! installed: a missing tool fails the test loudly), and comparing our reads with qemu-img's.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use block::{open, DiskImage, Format, OpenOptions};

/// Runs this build's `vmm-img` and returns what it did.
pub fn vmm_img(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs a tool and panics with its output when it fails or is missing.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (ci/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-img.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-img create -q -f qcow2 ARGS...`.
pub fn create_qcow2(args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    qemu_img(&all);
}

/// Opens a qcow2 image read-only.
pub fn open_ro(path: &Path) -> block::Image {
    open(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Opens a qcow2 image read-write.
pub fn open_rw(path: &Path) -> block::Image {
    open(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Runs qemu-io on a qcow2 image with commands.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let p = path.to_str().unwrap();
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p);
    run("qemu-io", &args);
}

/// A path inside a temporary directory.
pub fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Reads a whole image through our engine.
pub fn read_ours(path: &Path, fmt: Format) -> Vec<u8> {
    let img = open(
        path,
        OpenOptions {
            format: Some(fmt),
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; usize::try_from(img.size()).unwrap()];
    // Read in odd-sized pieces to cross cluster boundaries at unaligned offsets.
    let mut pos = 0;
    let step = 100_003;
    while pos < buf.len() {
        let n = step.min(buf.len() - pos);
        img.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    buf
}

/// What qemu-img reads: `convert -O raw`.
pub fn read_qemu(path: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        fmt,
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// Asserts our reads of a qcow2 image equal qemu-img's, byte for byte.
pub fn assert_same_as_qemu(path: &Path) {
    let ours = read_ours(path, Format::Qcow2);
    let theirs = read_qemu(path, "qcow2");
    assert_eq!(ours.len(), theirs.len(), "size of {}", path.display());
    if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i}", path.display());
    }
}

/// qemu-img check must find no corruption and no leak.
pub fn assert_check_clean(path: &Path) {
    qemu_img(&["check", "-U", path.to_str().unwrap()]);
}

/// Fills a region with a recognisable pattern through qemu-io.
pub fn pattern_cmds(size: u64, step: u64, len: u64) -> Vec<String> {
    let mut v = Vec::new();
    let mut off = 0;
    let mut p = 1;
    while off + len <= size {
        v.push(format!("write -P {p} {off} {len}"));
        off += step;
        p = p % 250 + 1;
    }
    v
}
