//! Crash consistency: `vmm-img io` writes and flushes at random into an overlay and is killed
//! with SIGKILL at random moments, many times over the same image. After each kill
//! `qemu-img check` must find no corruption (leaked clusters are allowed), and every write that
//! a completed flush covered must read back.
#![allow(clippy::unwrap_used)]

mod common;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use block::DiskImage;
use common::*;

/// One slot per write, so later writes never overwrite what is being verified.
const SLOT: u64 = 40 * 1024;

#[test]
fn killed_writers_leave_consistent_images() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "base.qcow2");
    let size: u64 = 48 << 20;
    create_qcow2(&[base.to_str().unwrap(), &size.to_string()]);
    qemu_io(&base, "qcow2", &["write -P 0xee 0 48M"]);
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for opts in [
        "cluster_size=4096",
        "cluster_size=512,refcount_bits=64",
        "extended_l2=on,lazy_refcounts=on",
    ] {
        let top = tmp(&dir, "top.qcow2");
        let t = top.to_str().unwrap().to_string();
        create_qcow2(&["-o", opts, "-b", "base.qcow2", "-F", "qcow2", &t]);
        // (offset, length, expected byte) of every write known durable.
        let mut durable: Vec<(u64, u64, u8)> = Vec::new();
        let mut slot = 0u64;
        let mut interrupted = 0;
        for _round in 0..25 {
            let mut cmds = Vec::new();
            let mut planned = Vec::new();
            for _ in 0..40 {
                if (slot + 1) * SLOT > size {
                    break;
                }
                let off = slot * SLOT + rng.u64(0..8192);
                let len = rng.u64(1..SLOT - 8192);
                let (cmd, byte) = if rng.u8(0..4) == 0 {
                    (format!("write -z {off} {len}"), 0)
                } else {
                    let p = rng.u8(1..=250);
                    (format!("write -P {p} {off} {len}"), p)
                };
                cmds.push(cmd);
                cmds.push("flush".to_string());
                planned.push((off, len, byte));
                slot += 1;
            }
            assert!(!planned.is_empty(), "the image ran out of slots");
            let mut args = vec!["io".to_string(), "-f".into(), "qcow2".into()];
            for c in &cmds {
                args.push("-c".into());
                args.push(c.clone());
            }
            args.push(t.clone());
            let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            // Kill after a random number of completed writes plus a random delay, so the kill
            // lands anywhere: inside a write, an allocation, a metadata write-back or a flush.
            let kill_after = rng.usize(0..planned.len());
            let delay = Duration::from_micros(rng.u64(0..3000));
            let reader = std::thread::spawn(move || {
                let mut seen = 0usize;
                let mut lines = BufReader::new(stdout).lines();
                while seen < kill_after {
                    match lines.next() {
                        Some(Ok(l)) if l.starts_with("wrote") => seen += 1,
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
                std::thread::sleep(delay);
                let _ = child.kill();
                for l in lines.map_while(Result::ok) {
                    if l.starts_with("wrote") {
                        seen += 1;
                    }
                }
                child.wait().unwrap();
                seen
            });
            let seen = reader.join().unwrap();
            if seen < planned.len() {
                interrupted += 1;
            }
            // A "wrote" line for write k means the flush after write k-1 completed.
            durable.extend(planned.iter().take(seen.saturating_sub(1)).copied());
            let out = Command::new("qemu-img")
                .args(["check", &t])
                .output()
                .unwrap();
            let code = out.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "{opts}: qemu-img check after a kill: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let img = open_ro(&top);
            for &(off, len, byte) in &durable {
                let mut b = vec![0u8; usize::try_from(len).unwrap()];
                img.read_at(&mut b, off).unwrap();
                assert!(
                    b.iter().all(|&x| x == byte),
                    "{opts}: flushed write at {off}+{len} lost"
                );
            }
        }
        assert!(
            !durable.is_empty(),
            "{opts}: no write was ever flushed before a kill"
        );
        assert!(
            interrupted >= 3,
            "{opts}: only {interrupted} runs were killed mid-way"
        );
        eprintln!(
            "{opts}: {interrupted} of 25 runs killed mid-way, {} writes verified",
            durable.len()
        );
    }
}
