//! Opens arbitrary bytes as a qcow2 image whose backing file (named `b` in seeds made by
//! `ci/fuzz-smoke`) is also arbitrary bytes, then reads, queries block status and checks it.
//! Input: a big-endian u32 split point, the top image's bytes, the backing image's bytes.
//! Any outcome but a panic, an abort or a runaway allocation is fine.
#![no_main]

use block::{open, DiskImage, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

/// Most bytes of the virtual disk read per input.
const READ_LIMIT: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let split = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let split = usize::try_from(split)
        .unwrap_or(usize::MAX)
        .min(data.len() - 4);
    let (top, backing) = data[4..].split_at(split);
    let Ok(dir) = tempfile_dir() else { return };
    let tp = dir.join("t");
    if std::fs::write(&tp, top).is_err() || std::fs::write(dir.join("b"), backing).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: true,
        lock: false,
        ..Default::default()
    };
    if let Ok(img) = open(&tp, opts) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        let mut off = 0;
        while off < size.min(READ_LIMIT) {
            let n = (size - off).min(buf.len() as u64) as usize;
            if img.read_at(&mut buf[..n], off).is_err() {
                break;
            }
            let _ = img.block_status(off, n as u64);
            off += n as u64;
        }
        if size > 0 {
            let _ = img.read_at(&mut buf[..1], size - 1);
        }
        if let block::Image::Qcow2(q) = &img {
            let _ = q.check(block::qcow2::check::Repair::None);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
});

/// A fresh directory per input (the fuzzer runs inputs one at a time per process).
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("block-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
