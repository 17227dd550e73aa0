//! The power-cut harness: a workload runs under the recorder (`tests/powercut`, preloaded), then
//! states a power cut could leave are rebuilt from the log (`replay`) and each is checked
//! (`check`) against what the guest may read (`oracle`). `POWERCUT_SEED` picks the seed (printed),
//! `POWERCUT_STATES` the states checked per run, `POWERCUT_SECONDS` repeats each run with the
//! following seeds for that long (the long mode); `POWERCUT_KEEP` keeps the folder (images,
//! log, last state) of a run with failures.
#![allow(dead_code, clippy::unwrap_used)]

pub mod check;
pub mod driver;
pub mod log;
pub mod oracle;
pub mod replay;
pub mod vmm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use driver::{Recording, Tool};
use oracle::Oracle;
use replay::Pending;

/// A workload: images made before recording, then batches of qemu-io commands (each ending with
/// `flush`) recorded.
pub struct Workload {
    pub name: String,
    /// Makes the images in the given folder; returns the image the commands write.
    pub create: Box<dyn Fn(&Path) -> PathBuf>,
    pub batches: Vec<Vec<String>>,
    /// Instead of sending the batches, runs `ARGS IMAGE` (`vmm-img` or `qemu-img`: `bench ...`,
    /// `snapshot -c NAME`): the batches then hold one batch with the command's writes to the
    /// disk, which may land in any order until the tool exits (its flushes are not placed in
    /// the log).
    pub command: Option<Vec<String>>,
    /// Open options of the image (`l2-cache-size=...`), given to both tools through
    /// `--image-opts driver=qcow2,file.filename=IMAGE,...` in place of IMAGE (a command then
    /// names no format).
    pub image_opts: Option<String>,
    /// Whether the batches' reads copy up (`-C`, both tools).
    pub copy_on_read: bool,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("name", &self.name)
            .finish()
    }
}

/// What one run checked and found.
#[derive(Debug)]
pub struct Report {
    pub states: usize,
    pub failures: Vec<String>,
    /// Writes of L2 tables that a full cache made to make room: while a batch's commands ran
    /// (before its flush was sent), or, for a command, followed on the writing thread by a
    /// write that no flush makes after its L2 tables (see [`command_l2_writebacks`]).
    pub l2_writebacks: usize,
    /// Writes into the header's first sector (table moves, snapshots, resizes commit there).
    pub header_writes: usize,
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
    })
}

/// The seed: `POWERCUT_SEED`, or a fixed one so CI is reproducible.
pub fn seed() -> u64 {
    env_u64("POWERCUT_SEED").unwrap_or(0x9c0f_fee5)
}

/// States checked per run: `POWERCUT_STATES`, or `default`.
pub fn states(default: usize) -> usize {
    env_u64("POWERCUT_STATES").map_or(default, |n| usize::try_from(n).unwrap())
}

/// Runs `round(seed)` once, or for `POWERCUT_SECONDS` with successive seeds.
pub fn rounds(mut round: impl FnMut(u64)) {
    let first = seed();
    let budget = Duration::from_secs(env_u64("POWERCUT_SECONDS").unwrap_or(0));
    let t0 = Instant::now();
    let mut s = first;
    loop {
        round(s);
        s = s.wrapping_add(1);
        if t0.elapsed() >= budget {
            break;
        }
    }
}

/// Records `w` written by `tool` and checks `n` rebuilt states (a third at sync points, up to a
/// tenth right after header writes, the rest random cuts, plus the states before the first
/// write and after the tool exited). With `ignore_barriers`, every state
/// is a random subset of all the writes, syncs ignored.
pub fn run(w: &Workload, tool: Tool, seed: u64, n: usize, ignore_barriers: bool) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let work = std::fs::canonicalize(&work).unwrap();
    let top = (w.create)(&work);
    let initial = oracle::sector_bytes(&check::read_disk(&top).unwrap());
    let oracle = Oracle::new(initial, &w.batches);
    let key = top.to_str().unwrap().to_string();
    let before = HashMap::from([(key.clone(), std::fs::read(&top).unwrap())]);
    let rec = Recording {
        dir: work.clone(),
        log: dir.path().join("log"),
    };
    if let Some(args) = &w.command {
        let program = match tool {
            Tool::Ours => env!("CARGO_BIN_EXE_vmm-img"),
            Tool::Qemu => "qemu-img",
        };
        let mut all: Vec<String> = args.clone();
        match &w.image_opts {
            None => all.push(top.to_str().unwrap().to_string()),
            Some(opts) => all.extend([
                "--image-opts".to_string(),
                format!("driver=qcow2,file.filename={},{opts}", top.display()),
            ]),
        }
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        driver::run(&rec, program, &all);
    } else {
        let out = driver::run_batches(
            tool,
            &rec,
            &top,
            w.image_opts.as_deref(),
            w.copy_on_read,
            &w.batches,
            &[],
        );
        assert!(
            out.status.success() && !out.failed && out.flushed == w.batches.len(),
            "{} under {}: {:?}, {} of {} batches flushed: {}",
            w.name,
            tool.name(),
            out.status,
            out.flushed,
            w.batches.len(),
            out.stderr
        );
    }
    let recs = log::read(&rec.log);
    let last = recs.len() - 1;
    let image = std::fs::read(&top).unwrap();
    let l2_writebacks = if w.command.is_some() {
        command_l2_writebacks(&recs, &key, &image)
    } else {
        l2_writebacks(&recs, &key, &image)
    };
    let random = |i: usize| {
        let mut rng = state_rng(!seed, i);
        (rng.usize(0..=last), Pending::Random(rng.f64()))
    };
    let mut cuts: Vec<(usize, Pending)> = Vec::new();
    if ignore_barriers {
        cuts.extend((0..n).map(random));
    } else {
        // The files as the workload found them, and as the tool left them.
        cuts.push((0, Pending::Random(0.0)));
        cuts.push((last, Pending::All));
        let syncs = replay::sync_points(&recs);
        let k = (n / 3).min(syncs.len());
        cuts.extend((0..k).map(|i| (syncs[i * syncs.len() / k.max(1)], Pending::All)));
        // Right after each write to the header's first sector (where a table move, a snapshot
        // or a resize commits), with about half of the writes since the last sync, a tenth of
        // the states taking them in turn: a commit made before what it names was durable shows
        // there, where a random cut seldom lands.
        let commits = header_writes(&recs, &key);
        if !commits.is_empty() {
            let k = n / 10;
            cuts.extend((0..k).map(|i| (commits[i % commits.len()], Pending::Random(0.5))));
        }
        // Random cuts are numbered from 1000, so their cut and subset do not depend on how
        // many sync points the budget took.
        let mut j = 1000;
        while cuts.len() < n.max(3) {
            cuts.push(random(j));
            j += 1;
        }
    }
    // The state's folder holds the other files (backing images) as they were.
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    for e in std::fs::read_dir(&work).unwrap() {
        let e = e.unwrap();
        if e.path() != top {
            std::fs::hard_link(e.path(), state_dir.join(e.file_name())).unwrap();
        }
    }
    let state_top = state_dir.join(top.file_name().unwrap());
    let mut failures = Vec::new();
    for (i, &(cut, pending)) in cuts.iter().enumerate() {
        // Each state's subset from its own seed, so a state is found again whatever the budget.
        let mut rng = state_rng(seed, i);
        let files = replay::state(&before, &recs, cut, pending, ignore_barriers, &mut rng);
        std::fs::write(&state_top, &files[&key]).unwrap();
        let (done, active) = match (&w.command, cut == last) {
            (None, _) => Oracle::position(&recs, cut),
            (Some(_), false) => (None, Some(0)),
            (Some(_), true) => (Some(0), None),
        };
        let verdict = check::repair_if_dirty(&state_top)
            .and_then(|()| check::qemu_check(&state_top))
            .and_then(|()| check::our_check(&state_top))
            .and_then(|()| check::read_disk(&state_top))
            .and_then(|disk| oracle.verify(&disk, done, active))
            .and_then(|()| {
                if !ignore_barriers {
                    vmm::open_read_write(&state_top, &state_dir).and_then(|()| {
                        check::qemu_check(&state_top).map_err(|e| format!("after vmm: {e}"))
                    })
                } else {
                    Ok(())
                }
            })
            .and_then(|()| check::write_after(&state_top))
            .and_then(|()| {
                if i % 4 == 0 {
                    check::qemu_check(&state_top).map_err(|e| format!("after our write: {e}"))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = verdict {
            failures.push(format!(
                "{} under {}, seed {seed}, state {i} (cut after record {cut} of {}, {pending:?}): {e}",
                w.name,
                tool.name(),
                last + 1
            ));
        }
    }
    println!(
        "{} under {}{}: seed {seed}, {} records ({} syncs, {} header writes, {l2_writebacks} L2 write-backs between flushes), {} states checked, {} failed",
        w.name,
        tool.name(),
        if ignore_barriers {
            " (barriers ignored)"
        } else {
            ""
        },
        recs.len(),
        replay::sync_points(&recs).len(),
        header_writes(&recs, &key).len(),
        cuts.len(),
        failures.len()
    );
    for f in failures.iter().take(3) {
        println!("  {f}");
    }
    if !failures.is_empty() && std::env::var_os("POWERCUT_KEEP").is_some() {
        println!("  kept: {}", dir.keep().display());
    }
    Report {
        states: cuts.len(),
        failures,
        l2_writebacks,
        header_writes: header_writes(&recs, &key).len(),
    }
}

/// The records that wrote into the first sector (the header) of the file at `path`.
fn header_writes(recs: &[log::Rec], path: &str) -> Vec<usize> {
    recs.iter()
        .enumerate()
        .filter(|(_, r)| r.path == path && r.ok())
        .filter(|(_, r)| matches!(r.op, log::Op::Write { off, .. } if off < 512))
        .map(|(i, _)| i)
        .collect()
}

/// The L1 table of `image` (the file as the tool left it) as a byte range, and the L2 tables it
/// names (L2 tables of an image without snapshots never move).
fn l2_tables(image: &[u8]) -> (std::ops::Range<u64>, std::collections::HashSet<u64>) {
    let be = |at: usize, n: usize| {
        image[at..at + n]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    };
    let (l1_size, l1_offset) = (be(36, 4), be(40, 8));
    let tables = (0..l1_size)
        .map(|i| be(usize::try_from(l1_offset + i * 8).unwrap(), 8) & 0x00ff_ffff_ffff_fe00)
        .filter(|&t| t != 0)
        .collect();
    (l1_offset..l1_offset + l1_size * 8, tables)
}

/// The writes to `path` of one of the L2 tables of `image` made while a batch's commands ran,
/// between its `B k` and `S k` markers.
fn l2_writebacks(recs: &[log::Rec], path: &str, image: &[u8]) -> usize {
    let (_, tables) = l2_tables(image);
    let mut in_batch = false;
    let mut n = 0;
    for r in recs {
        match &r.op {
            log::Op::Marker(m) => in_batch = m.starts_with("B "),
            log::Op::Write { off, .. } if in_batch && r.path == path && tables.contains(off) => {
                n += 1;
            }
            _ => {}
        }
    }
    n
}

/// The writes to `path` of one of the L2 tables of `image` by a command (no markers: its
/// flushes run between its requests, or beside them) that a full cache made: those after which
/// the writing thread's next call on the file, past its other L2 table writes, is a write
/// outside the L1 table. A flush (ours: `qcow2/meta.rs`, `Copies::write`) follows its L2 tables
/// only with a sync or L1 entries, on its thread; an eviction write-back goes on with the
/// request's data, or the next request's. A run of L2 writes that a sync or a write of the L1
/// table follows is not counted, whoever made it.
fn command_l2_writebacks(recs: &[log::Rec], path: &str, image: &[u8]) -> usize {
    let (l1, tables) = l2_tables(image);
    let mut run: HashMap<u32, usize> = HashMap::new();
    let mut n = 0;
    for r in recs.iter().filter(|r| r.path == path && r.ok()) {
        match &r.op {
            log::Op::Write { off, .. } if tables.contains(off) => {
                *run.entry(r.tid).or_default() += 1;
            }
            log::Op::Write { off, .. } if !l1.contains(off) => {
                n += run.remove(&r.tid).unwrap_or(0);
            }
            _ => {
                run.remove(&r.tid);
            }
        }
    }
    n
}

/// The random source of state `i` of a run.
fn state_rng(seed: u64, i: usize) -> fastrand::Rng {
    fastrand::Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64)
}

/// Fails with the first failures when a run found any.
pub fn assert_clean(r: &Report) {
    assert!(
        r.failures.is_empty(),
        "{} of {} states failed; first: {:#?}",
        r.failures.len(),
        r.states,
        &r.failures[..r.failures.len().min(3)]
    );
}
