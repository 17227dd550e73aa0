//! Rebuilding files as a power cut would leave them. A cut after record `c` keeps every
//! operation that a completed sync covered (those logged before the sync's begin record, on its
//! file) and any subset of the later ones, each write torn at 512-byte sector granularity, size
//! changes kept or lost. `ignore_barriers` treats nothing as covered: the control that proves the
//! checks can fail.

use std::collections::HashMap;

use super::log::{Op, Rec};

/// The device's atomic unit.
pub const SECTOR: u64 = 512;

const PUNCH_HOLE: u32 = 0x02;
const ZERO_RANGE: u32 = 0x10;
const KEEP_SIZE: u32 = 0x01;

/// How the operations not covered by a sync are chosen.
#[derive(Debug, Clone, Copy)]
pub enum Pending {
    /// Every one of them persisted.
    All,
    /// Each kept with this probability; a kept write is torn (a random subset of its sectors)
    /// with probability 1/4.
    Random(f64),
}

/// Index, per file, of the first operation no completed sync covers, after record `cut`.
fn durable_prefix(recs: &[Rec], cut: usize, ignore_barriers: bool) -> HashMap<&str, usize> {
    let mut prefix: HashMap<&str, usize> = HashMap::new();
    if ignore_barriers {
        return prefix;
    }
    let mut begins: HashMap<u64, usize> = HashMap::new();
    for (i, r) in recs.iter().enumerate().take(cut + 1) {
        match r.op {
            Op::SyncBegin { id, .. } => {
                begins.insert(id, i);
            }
            Op::SyncEnd { id, all } if r.ok() => {
                let b = begins[&id];
                if all {
                    for q in recs[..b].iter().filter(|q| !q.path.is_empty()) {
                        let p = prefix.entry(&q.path).or_default();
                        *p = (*p).max(b);
                    }
                } else {
                    let p = prefix.entry(&r.path).or_default();
                    *p = (*p).max(b);
                }
            }
            _ => {}
        }
    }
    prefix
}

fn write(file: &mut Vec<u8>, off: u64, data: &[u8], keep: &mut dyn FnMut() -> bool) {
    // Split at absolute sector boundaries: each piece lands or not.
    let mut pos = 0usize;
    while pos < data.len() {
        let at = off + pos as u64;
        let piece = usize::try_from((SECTOR - at % SECTOR).min((data.len() - pos) as u64)).unwrap();
        if keep() {
            let start = usize::try_from(at).unwrap();
            if file.len() < start + piece {
                file.resize(start + piece, 0);
            }
            file[start..start + piece].copy_from_slice(&data[pos..pos + piece]);
        }
        pos += piece;
    }
}

fn apply(file: &mut Vec<u8>, op: &Op, keep: &mut dyn FnMut() -> bool) {
    match *op {
        Op::Write { off, ref data, .. } => write(file, off, data, keep),
        Op::Truncate { len } => file.resize(usize::try_from(len).unwrap(), 0),
        Op::Fallocate { mode, off, len } => {
            let end = usize::try_from(off + len).unwrap();
            if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
                let end = if mode & KEEP_SIZE != 0 {
                    end.min(file.len())
                } else {
                    end
                };
                let start = usize::try_from(off).unwrap().min(end);
                write(file, off, &vec![0; end - start], keep);
            } else if mode & KEEP_SIZE == 0 && file.len() < end {
                file.resize(end, 0);
            }
        }
        _ => {}
    }
}

/// The files after a power cut following record `cut`, from their contents `before` the log.
pub fn state(
    before: &HashMap<String, Vec<u8>>,
    recs: &[Rec],
    cut: usize,
    pending: Pending,
    ignore_barriers: bool,
    rng: &mut fastrand::Rng,
) -> HashMap<String, Vec<u8>> {
    let prefix = durable_prefix(recs, cut, ignore_barriers);
    let mut files = before.clone();
    for (i, r) in recs.iter().enumerate().take(cut + 1) {
        if !r.ok()
            || r.path.is_empty()
            || !matches!(
                r.op,
                Op::Write { .. } | Op::Truncate { .. } | Op::Fallocate { .. }
            )
        {
            continue;
        }
        let file = files.entry(r.path.clone()).or_default();
        let durable = i < prefix.get(r.path.as_str()).copied().unwrap_or(0);
        match (durable, pending) {
            (true, _) | (false, Pending::All) => apply(file, &r.op, &mut || true),
            (false, Pending::Random(p)) => {
                if rng.f64() < p {
                    if rng.u8(0..4) == 0 {
                        let mut tear = || rng.bool();
                        apply(file, &r.op, &mut tear);
                    } else {
                        apply(file, &r.op, &mut || true);
                    }
                }
            }
        }
    }
    files
}

/// The cuts right after every successful sync's end: the states a power cut leaves at a sync.
pub fn sync_points(recs: &[Rec]) -> Vec<usize> {
    recs.iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.op, Op::SyncEnd { .. }) && r.ok())
        .map(|(i, _)| i)
        .collect()
}
