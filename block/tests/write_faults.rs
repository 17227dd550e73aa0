//! Injected write errors (the recorder's fault hook, `tests/powercut`): for each write, sync or
//! size change a workload makes, a run where exactly that call fails with EIO (or ENOSPC) must
//! end in a clean error (exit 1, no panic) unless it came after the last flush, and leave an
//! image that `qemu-img check` finds uncorrupted, that opens read-write, and where everything a
//! flush reported durable reads back.
#![allow(clippy::unwrap_used)]

mod common;
mod powercut;

use std::collections::HashMap;

use common::*;
use powercut::driver::{Recording, Tool};
use powercut::log::{Op, Rec};
use powercut::oracle::Oracle;
use powercut::{check, driver, log, oracle};

const SIZE: u64 = 2 << 20;

/// Partial-cluster writes over a backing file (copy-up, L2 and refcount allocation) with
/// flushes between them, on 4 KiB clusters.
fn batches(seed: u64) -> Vec<Vec<String>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..6)
        .map(|b| {
            let mut v: Vec<String> = (0..3)
                .map(|i| {
                    let off = rng.u64(0..SIZE / 512 - 16) * 512;
                    format!("write -P {} {off} {}", 1 + b * 3 + i, rng.u64(1..=16) * 512)
                })
                .collect();
            v.push("flush".into());
            v
        })
        .collect()
}

/// A fresh base and overlay in `work`.
fn images(work: &std::path::Path) -> std::path::PathBuf {
    let b = work.join("base.qcow2");
    create_qcow2(&[b.to_str().unwrap(), &SIZE.to_string()]);
    qemu_io(&b, "qcow2", &["write -P 0xa1 0 2M"]);
    let t = work.join("top.qcow2");
    create_qcow2(&[
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        t.to_str().unwrap(),
    ]);
    t
}

fn matches(r: &Rec, kind: &str) -> bool {
    matches!(
        (&r.op, kind),
        (Op::Write { .. }, "write") | (Op::SyncBegin { .. }, "sync") | (Op::Truncate { .. }, "truncate") | (Op::Fallocate { .. }, "fallocate")
    )
}

/// Runs the workload once per call of `kind`, failing that call with `errno`.
fn each_call_fails(kind: &str, errno: &str) {
    let seed = powercut::seed();
    let batches = batches(seed);
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
    let clean = driver::run_batches(Tool::Ours, &rec, &top, &batches, &[]);
    assert!(clean.status.success(), "clean run: {}", clean.stderr);
    let calls = log::read(&rec.log).iter().filter(|r| matches(r, kind)).count();
    assert!(calls > 0, "the workload made no {kind} call");
    let n = powercut::states(calls).min(calls);
    let mut failures = Vec::new();
    for i in 0..n {
        // Spread the sample over the whole run when not every call is tried.
        let at = 1 + i * calls / n;
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
        let out = driver::run_batches(Tool::Ours, &rec, &top, &batches, &env);
        let recs = log::read(&rec.log);
        let fault = recs
            .iter()
            .position(|r| matches(r, kind) && !r.ok())
            .expect("the fault was injected");
        let after_last_flush = recs[..fault]
            .iter()
            .any(|r| matches!(&r.op, Op::Marker(m) if *m == format!("F {}", batches.len() - 1)));
        let (done, active) = Oracle::position(&recs, recs.len() - 1);
        let what = format!(
            "{errno} on {kind} call {at} of {calls} ({:?} at {:?}), seed {seed}",
            std::mem::discriminant(&recs[fault].op),
            match recs[fault].op {
                Op::Write { off, ref data } => format!("offset {off}, {} bytes", data.len()),
                _ => String::new(),
            }
        );
        let verdict = if out.stderr.contains("panicked") {
            Err(format!("panicked: {}", out.stderr))
        } else if !after_last_flush && out.status.code() != Some(1) {
            Err(format!(
                "exit {:?} (an error was not reported); {} batches flushed",
                out.status, out.flushed
            ))
        } else if after_last_flush && !matches!(out.status.code(), Some(0 | 1)) {
            Err(format!("exit {:?}", out.status))
        } else {
            check::qemu_check(&top)
                .and_then(|()| check::read_disk(&top))
                .and_then(|d| oracle.verify(&d, done, active))
                .and_then(|()| check::write_after(&top))
                .and_then(|()| check::qemu_check(&top))
        };
        if let Err(e) = verdict {
            failures.push(format!("{what}: {e}"));
        }
    }
    println!("{errno} on {kind}: {n} of {calls} calls tried, {} failed", failures.len());
    for f in failures.iter().take(5) {
        println!("  {f}");
    }
    assert!(failures.is_empty(), "{} failed; first: {:#?}", failures.len(), &failures[..failures.len().min(5)]);
    let _: HashMap<(), ()> = HashMap::new();
}

#[test]
fn eio_on_each_write() {
    each_call_fails("write", "EIO");
}

#[test]
fn enospc_on_each_write() {
    each_call_fails("write", "ENOSPC");
}

#[test]
fn eio_on_each_sync() {
    each_call_fails("sync", "EIO");
}

#[test]
fn eio_on_each_size_change() {
    each_call_fails("truncate", "EIO");
}
