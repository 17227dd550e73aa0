//! What the guest may read after a cut: each 512-byte sector holds its value at the last flush
//! that completed before the cut, or a value that a command issued after that flush wrote to it.
//!
//! The driver sends the commands in batches, each ending with `flush`, and logs a marker before
//! sending batch `k` (`B k`) and once its flush returned (`F k`), while the tool waits for more
//! input: so the markers place every batch exactly in the log. Every write fills its sectors with
//! one byte, distinct per write (the workloads see to it), so a sector's content names the write
//! that left it. A discard may leave a sector as it was or read as zeroes.

use std::collections::HashMap;

use super::log::{Op, Rec};
use super::replay::SECTOR;

/// One guest command's effect on the sectors it covers.
#[derive(Debug, Clone, Copy)]
enum Effect {
    /// The sectors hold this byte.
    Set(u8),
    /// The sectors may also read as zeroes (a discard).
    MayZero,
}

fn number(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

/// The effect of a qemu-io command on a range of sectors (`None` for `flush` and `read`: a read,
/// one that copies up too, leaves what the disk reads as it was).
fn effect(cmd: &str) -> Option<(u64, u64, Effect)> {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    let (off, len) = match w.as_slice() {
        ["flush"] | ["read", ..] => return None,
        [.., o, l] => (number(o), number(l)),
        _ => panic!("unexpected command {cmd}"),
    };
    assert!(
        off % SECTOR == 0 && len % SECTOR == 0,
        "{cmd}: not sector-aligned"
    );
    let eff = match w[0] {
        "discard" => Effect::MayZero,
        "write" if w.contains(&"-z") => Effect::Set(0),
        "write" => {
            let p = w.iter().position(|x| *x == "-P").expect("write -P");
            Effect::Set(u8::try_from(number(w[p + 1])).unwrap())
        }
        _ => panic!("unexpected command {cmd}"),
    };
    Some((off / SECTOR, len / SECTOR, eff))
}

/// The guest's view of a workload.
#[derive(Debug)]
pub struct Oracle {
    /// Each sector's byte before the workload.
    initial: Vec<u8>,
    /// The values each sector may hold after batch k (sectors the batches touched).
    after: Vec<HashMap<u64, Vec<u8>>>,
    /// The values batch k may write to each sector.
    batch: Vec<HashMap<u64, Vec<u8>>>,
}

fn add(set: &mut Vec<u8>, v: u8) {
    if !set.contains(&v) {
        set.push(v);
    }
}

impl Oracle {
    /// From the disk's sectors before the workload (one byte each) and its batches.
    pub fn new(initial: Vec<u8>, batches: &[Vec<String>]) -> Oracle {
        let mut cur: HashMap<u64, Vec<u8>> = HashMap::new();
        let (mut after, mut batch) = (Vec::new(), Vec::new());
        for cmds in batches {
            let mut vals: HashMap<u64, Vec<u8>> = HashMap::new();
            for (start, n, eff) in cmds.iter().filter_map(|c| effect(c)) {
                for s in start..start + n {
                    let slot = cur
                        .entry(s)
                        .or_insert_with(|| vec![initial[usize::try_from(s).unwrap()]]);
                    match eff {
                        Effect::Set(v) => *slot = vec![v],
                        Effect::MayZero => add(slot, 0),
                    }
                    add(
                        vals.entry(s).or_default(),
                        if let Effect::Set(v) = eff { v } else { 0 },
                    );
                }
            }
            after.push(cur.clone());
            batch.push(vals);
        }
        Oracle {
            initial,
            after,
            batch,
        }
    }

    /// The number of sectors.
    pub fn sectors(&self) -> usize {
        self.initial.len()
    }

    /// The batches done (flush returned) and the batch in flight at a cut after record `cut`.
    pub fn position(recs: &[Rec], cut: usize) -> (Option<usize>, Option<usize>) {
        let (mut done, mut active) = (None, None);
        for r in &recs[..=cut.min(recs.len().saturating_sub(1))] {
            if let Op::Marker(m) = &r.op {
                let (kind, k) = m.split_once(' ').unwrap();
                let k: usize = k.parse().unwrap();
                match kind {
                    "B" => active = Some(k),
                    // The batch's flush was sent: the batch is still the one in flight.
                    "S" => {}
                    "F" => {
                        done = Some(k);
                        active = None;
                    }
                    _ => panic!("unknown marker {m}"),
                }
            }
        }
        (done, active)
    }

    /// Whether sector `s` may hold `v` given the position: the first disallowed sector found,
    /// described, or `None`.
    pub fn allows(&self, s: u64, v: u8, done: Option<usize>, active: Option<usize>) -> bool {
        let flushed = done.and_then(|k| self.after[k].get(&s));
        let at_flush = match flushed {
            Some(set) => set.contains(&v),
            None => self.initial[usize::try_from(s).unwrap()] == v,
        };
        at_flush
            || active.is_some_and(|j| self.batch[j].get(&s).is_some_and(|set| set.contains(&v)))
    }

    /// Checks a whole disk's contents; describes the first sector that is not allowed.
    pub fn verify(
        &self,
        disk: &[u8],
        done: Option<usize>,
        active: Option<usize>,
    ) -> Result<(), String> {
        for (i, sec) in disk.chunks(usize::try_from(SECTOR).unwrap()).enumerate() {
            let s = i as u64;
            let v = sec[0];
            if sec.iter().any(|&b| b != v) {
                return Err(format!(
                    "sector {s} (byte {}) holds mixed bytes",
                    s * SECTOR
                ));
            }
            if !self.allows(s, v, done, active) {
                let expected = match done.and_then(|k| self.after[k].get(&s)) {
                    Some(set) => format!("{set:02x?}"),
                    None => format!("[{:02x}]", self.initial[i]),
                };
                return Err(format!(
                    "sector {s} (byte {}) reads {v:#04x}, allowed {expected} or what batch {active:?} wrote (flushed batches: {done:?})",
                    s * SECTOR
                ));
            }
        }
        Ok(())
    }
}

/// Reads a disk's sectors before a workload: each must be filled with one byte.
pub fn sector_bytes(disk: &[u8]) -> Vec<u8> {
    disk.chunks(usize::try_from(SECTOR).unwrap())
        .enumerate()
        .map(|(i, sec)| {
            assert!(
                sec.iter().all(|&b| b == sec[0]),
                "sector {i} is not uniform before the workload"
            );
            sec[0]
        })
        .collect()
}
