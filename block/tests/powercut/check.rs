//! The checks every rebuilt state must pass, once a dirty one is repaired: no corruption by
//! `qemu-img check` (leaks are fine) nor by `vmm-img check`, our engine opens it read-write and writes and flushes, and its
//! guest-visible contents read through the backing chain are allowed by the oracle.

use std::path::Path;
use std::process::Command;

use block::{open, DiskImage, Format, OpenOptions};

/// `qemu-img check --output=json`: an error describing corruption or a failed check.
pub fn qemu_check(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img is required (ci/setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout).map_err(|_| {
        format!(
            "qemu-img check gave no report ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let count = |k: &str| json.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    if count("corruptions") > 0 || count("check-errors") > 0 {
        return Err(format!("qemu-img check: {json}"));
    }
    Ok(())
}

/// A v3 image whose header has the dirty bit (spec: refcounts may be inconsistent, to be
/// rebuilt before use) is opened read-write by our engine, which rebuilds them; others are
/// left as they are.
pub fn repair_if_dirty(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let be = |at: usize, n: usize| {
        bytes
            .get(at..at + n)
            .map_or(0, |b| b.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    if be(4, 4) < 3 || be(72, 8) & 1 == 0 {
        return Ok(());
    }
    open(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .map(drop)
    .map_err(|e| format!("repairing a dirty image: {e}"))
}

/// `vmm-img check`: exit 0 (clean) or 3 (leaks only).
pub fn our_check(path: &Path) -> Result<(), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0 | 3) => Ok(()),
        _ => Err(format!(
            "vmm-img check ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Reads the whole guest disk through our engine and the backing chain.
pub fn read_disk(path: &Path) -> Result<Vec<u8>, String> {
    let img = open(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .map_err(|e| format!("open read-only: {e}"))?;
    let mut buf = vec![0u8; usize::try_from(img.size()).unwrap()];
    for (i, chunk) in buf.chunks_mut(1 << 20).enumerate() {
        img.read_at(chunk, (i as u64) << 20)
            .map_err(|e| format!("read at {}: {e}", i << 20))?;
    }
    Ok(buf)
}

/// Opens read-write in our engine, writes a sector and flushes (then closes).
pub fn write_after(path: &Path) -> Result<(), String> {
    let img = open(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .map_err(|e| format!("open read-write: {e}"))?;
    img.write_at(&[0x5a; 512], 0)
        .and_then(|()| img.flush())
        .map_err(|e| format!("write after the cut: {e}"))
}
