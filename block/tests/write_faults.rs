//! Injected write errors (the recorder's fault hook, `tests/powercut`): for each write, sync or
//! hole punch a workload makes, a run where exactly that call fails with EIO (or ENOSPC) must end
//! in a clean error (exit 1, no panic) unless it came after the last flush, and leave an image
//! that `qemu-img check` finds uncorrupted, that opens read-write, and where everything a flush
//! reported durable reads back. Writes are grouped by the structure they hit, so each kind of
//! metadata write is named in a failure.
#![allow(clippy::unwrap_used)]

mod common;
mod powercut;

use std::path::Path;

use common::*;
use powercut::driver::{Recording, Tool};
use powercut::log::{Op, Rec};
use powercut::oracle::Oracle;
use powercut::{check, driver, log, oracle};

const SIZE: u64 = 2 << 20;
const CS: u64 = 4096;

/// Partial-cluster writes over a backing file (copy-up, L2 and refcount allocation), with
/// `discards` a whole-cluster write and discard (a freed cluster, a punched hole) per batch,
/// flushed between batches.
fn batches(seed: u64, discards: bool) -> Vec<Vec<String>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..6)
        .map(|b| {
            let mut v: Vec<String> = (0..3)
                .map(|i| {
                    let off = rng.u64(0..SIZE / 512 - 16) * 512;
                    format!("write -P {} {off} {}", 1 + b * 3 + i, rng.u64(1..=16) * 512)
                })
                .collect();
            if discards {
                v.push(format!("write -P {} {} {CS}", 100 + b, 8 * CS * b));
                v.push(format!("discard {} {CS}", 8 * CS * b));
            }
            v.push("flush".into());
            v
        })
        .collect()
}

/// A fresh base and overlay in `work`.
fn images(work: &Path) -> std::path::PathBuf {
    let b = work.join("base.qcow2");
    create_qcow2(&[b.to_str().unwrap(), &SIZE.to_string()]);
    qemu_io(&b, "qcow2", &["write -P 0xa1 0 2M"]);
    let t = work.join("top.qcow2");
    let cs = format!("cluster_size={CS}");
    create_qcow2(&[
        "-o",
        &cs,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        t.to_str().unwrap(),
    ]);
    t
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = usize::try_from(at).unwrap();
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// What a write at `off` of a qcow2 file hits, from the file's tables (qcow2 spec: header
/// fields at 40 (L1), 48 and 56 (refcount table and its clusters)).
fn target(img: &[u8], off: u64) -> &'static str {
    let cluster = off / CS * CS;
    let (l1, l1_len) = (
        be64(img, 40),
        u64::from(u32::from_be_bytes(img[36..40].try_into().unwrap())),
    );
    let (rt, rt_clusters) = (
        be64(img, 48),
        u64::from(u32::from_be_bytes(img[56..60].try_into().unwrap())),
    );
    let mask = 0x00ff_ffff_ffff_fe00;
    if cluster == 0 {
        "header"
    } else if (l1..l1 + l1_len * 8).contains(&off) {
        "L1 table"
    } else if (rt..rt + rt_clusters * CS).contains(&off) {
        "refcount table"
    } else if (0..rt_clusters * CS / 8)
        .any(|i| be64(img, rt + i * 8) & mask == cluster && cluster != 0)
    {
        "refcount block"
    } else if (0..l1_len).any(|i| be64(img, l1 + i * 8) & mask == cluster) {
        "L2 table"
    } else {
        "data"
    }
}

/// The kind of call the fault hook counts for `kind`, and the record of a failed one.
fn is_call(r: &Rec, kind: &str) -> bool {
    matches!(
        (&r.op, kind),
        (Op::Write { .. }, "write")
            | (Op::SyncBegin { .. }, "sync")
            | (Op::Fallocate { .. }, "fallocate")
    )
}

fn is_fault(r: &Rec, kind: &str) -> bool {
    !r.ok()
        && matches!(
            (&r.op, kind),
            (Op::Write { .. }, "write")
                | (Op::SyncEnd { .. }, "sync")
                | (Op::Fallocate { .. }, "fallocate")
        )
}

/// Runs the workload once per call of `kind` whose target `only` accepts, failing that call
/// with `errno`; returns the number of calls tried. A failed hole punch needs no report (the
/// cluster is free either way, as QEMU ignores failed discards of freed clusters).
fn each_call_fails(kind: &str, errno: &str, only: &[&str]) -> usize {
    let seed = powercut::seed();
    let batches = batches(seed, kind == "fallocate");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let work = std::fs::canonicalize(&work).unwrap();
    let top = images(&work);
    let pristine = std::fs::read(&top).unwrap();
    let initial = oracle::sector_bytes(&check::read_disk(&top).unwrap());
    let oracle = Oracle::new(initial, &batches);
    let rec = Recording {
        dir: work.clone(),
        log: dir.path().join("clean.log"),
    };
    let clean = driver::run_batches(Tool::Ours, &rec, &top, None, false, &batches, &[]);
    assert!(clean.status.success(), "clean run: {}", clean.stderr);
    let end = std::fs::read(&top).unwrap();
    // vmm-img io issues its calls from one thread, so the Nth call of a faulted run is the Nth
    // of the clean run up to the fault.
    let calls: Vec<(usize, &'static str)> = log::read(&rec.log)
        .iter()
        .filter(|r| is_call(r, kind))
        .enumerate()
        .map(|(i, r)| match r.op {
            Op::Write { off, .. } => (i + 1, target(&end, off)),
            _ => (i + 1, kind_name(kind)),
        })
        .filter(|(_, t)| only.contains(t))
        .collect();
    let n = powercut::states(calls.len()).min(calls.len());
    let mut failures = Vec::new();
    for i in 0..n {
        // Spread the sample over the whole run when not every call is tried.
        let (at, what) = calls[i * calls.len() / n];
        std::fs::write(&top, &pristine).unwrap();
        let rec = Recording {
            dir: work.clone(),
            log: dir.path().join(format!("fault-{at}.log")),
        };
        let env = [
            ("POWERCUT_FAIL_AT", at.to_string()),
            ("POWERCUT_FAIL_OPS", kind.to_string()),
            ("POWERCUT_FAIL_ERRNO", errno.to_string()),
        ];
        let out = driver::run_batches(Tool::Ours, &rec, &top, None, false, &batches, &env);
        let recs = log::read(&rec.log);
        let Some(fault) = recs.iter().position(|r| is_fault(r, kind)) else {
            panic!(
                "call {at} was not reached: the run made {} {kind} calls ({:?}): {}",
                recs.iter().filter(|r| is_call(r, kind)).count(),
                out.status,
                out.stderr
            );
        };
        let last_flush = format!("F {}", batches.len() - 1);
        let after_last_flush = recs[..fault]
            .iter()
            .any(|r| matches!(&r.op, Op::Marker(m) if *m == last_flush));
        let (done, active) = Oracle::position(&recs, recs.len() - 1);
        let desc = format!(
            "{errno} on {kind} call {at} ({what}, {:?}), seed {seed}",
            recs[fault].op_summary()
        );
        let verdict = if out.stderr.contains("panicked") {
            Err(format!("panicked: {}", out.stderr))
        } else if !after_last_flush && kind != "fallocate" && out.status.code() != Some(1) {
            Err(format!(
                "exit {:?}: the error was not reported ({} of {} batches flushed)",
                out.status,
                out.flushed,
                batches.len()
            ))
        } else if !matches!(out.status.code(), Some(0 | 1)) {
            Err(format!("exit {:?}", out.status))
        } else {
            check::qemu_check(&top)
                .and_then(|()| check::read_disk(&top))
                .and_then(|d| oracle.verify(&d, done, active))
                .and_then(|()| check::write_after(&top))
                .and_then(|()| check::qemu_check(&top))
        };
        if let Err(e) = verdict {
            failures.push(format!("{desc}: {e}"));
        }
    }
    println!(
        "{errno} on {kind} to {only:?}: {n} of {} calls tried, {} failed",
        calls.len(),
        failures.len()
    );
    for f in failures.iter().take(5) {
        println!("  {f}");
    }
    assert!(
        failures.is_empty(),
        "{} failed; first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    n
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "sync" => "sync",
        _ => "hole punch",
    }
}

trait Summary {
    fn op_summary(&self) -> String;
}

impl Summary for Rec {
    fn op_summary(&self) -> String {
        match self.op {
            Op::Write { off, len, .. } => format!("write of {len} bytes at {off}"),
            Op::Fallocate { mode, off, len } => {
                format!("fallocate mode {mode:#x} of {len} bytes at {off}")
            }
            ref op => format!("{op:?}"),
        }
    }
}

#[test]
fn eio_on_each_data_l2_and_l1_write() {
    assert!(
        each_call_fails(
            "write",
            "EIO",
            &["data", "L2 table", "L1 table", "header", "refcount table"]
        ) > 0
    );
}

#[test]
fn enospc_on_each_data_l2_and_l1_write() {
    assert!(
        each_call_fails(
            "write",
            "ENOSPC",
            &["data", "L2 table", "L1 table", "header", "refcount table"]
        ) > 0
    );
}

#[test]
fn eio_on_each_refcount_block_write() {
    assert!(each_call_fails("write", "EIO", &["refcount block"]) > 0);
}

#[test]
fn eio_on_each_sync() {
    assert!(each_call_fails("sync", "EIO", &["sync"]) > 0);
}

#[test]
fn eio_on_each_hole_punch() {
    assert!(each_call_fails("fallocate", "EIO", &["hole punch"]) > 0);
}
