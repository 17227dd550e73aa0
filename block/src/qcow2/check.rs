//! Consistency check and repair (QEMU's `qemu-img check` for qcow2): every cluster's references
//! are counted by walking the header, the L1 tables (active and snapshots), the L2 tables, the
//! refcount structures and the snapshot table, then compared with the stored refcounts. A
//! refcount below its references is a corruption; above, a leak. Repair (and the rebuild a dirty
//! lazy-refcounts image needs before its first allocation) writes a fresh refcount table and
//! blocks after the end of the file and after every cluster still referenced (a reference past
//! the end of a truncated file included), then points the header at them. A dirty image whose
//! references are broken is refused instead of rebuilt.
//!
//! Bounds on hostile images: each distinct L1 and L2 table is read once however many snapshots
//! share it, the L1 tables read are capped in total, the clusters counted are capped, and a
//! report keeps its first messages and only counts the rest.

use std::collections::{BTreeMap, HashMap};

use super::l2::{Mapping, COMPRESSED, COPIED, OFFSET_MASK};
use super::meta::{decode_words, encode_words, Meta};
use super::refcount::set_entry;
use super::{snapshot, Qcow2};
use crate::file::HostFile;
use crate::{DiskImage, Error};

/// Most clusters of a file a check counts (1 GiB of counters); larger files are refused.
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;
/// How far past the end of the file references are still counted, in clusters, beyond the
/// file's own length (so the counters stay within twice the file, and 64 Ki clusters for a tiny
/// one); references further out are reported but not counted, and a repair is refused.
const MIN_PAST_END_CLUSTERS: u64 = 1 << 16;
/// Most snapshot L1 entries a check reads over all distinct tables (512 MiB of tables), so that
/// snapshots whose tables overlap one another cannot make it read without end.
const MAX_L1_WORDS: u64 = 1 << 26;
/// Most messages a report keeps; the rest are only counted.
pub const MAX_MESSAGES: usize = 1000;

/// What to repair, as `qemu-img check -r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and corruptions.
    All,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts below their references, and other metadata errors.
    pub corruptions: u64,
    /// Refcounts above their references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// One line per problem found, the first [`MAX_MESSAGES`] of them.
    pub messages: Vec<String>,
    /// Problems found beyond those in `messages`.
    pub messages_omitted: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Virtual clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Allocated clusters not following their predecessor on the host.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// L1 and L2 tables read from the file by the last count: each distinct table once, however
    /// many snapshots share it.
    pub tables_read: u64,
}

impl CheckReport {
    /// Keeps a message, or counts it once the list is full.
    fn message(&mut self, text: impl FnOnce() -> String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(text());
        } else {
            self.messages_omitted += 1;
        }
    }

    /// Counts a corruption and keeps its message.
    fn corruption(&mut self, text: impl FnOnce() -> String) {
        self.corruptions += 1;
        self.message(text);
    }
}

/// Counted references.
struct Refs {
    counts: Vec<u64>,
    report: CheckReport,
    /// Active-layer entries whose COPIED flag disagrees with their references: where they are
    /// and whether the flag should be set.
    bad_copied: Vec<(EntryAt, bool)>,
    /// Clusters of the file (references beyond are counted, and reported).
    file_clusters: u64,
    /// Clusters counted at most (references beyond are reported only).
    count_limit: u64,
    /// A reference beyond `count_limit` was seen.
    uncounted: bool,
}

/// Where an L1 or L2 entry lives.
#[derive(Debug, Clone, Copy)]
enum EntryAt {
    /// Active L1 table index.
    L1(usize),
    /// L2 table offset and word index of the entry.
    L2(u64, usize),
}

impl Refs {
    /// Adds `refs` references to every cluster of `[off, off + len)`. A reference past the end
    /// of the file is a corruption (its cluster is counted all the same, so that a rebuilt
    /// refcount structure is placed after it); one beyond what a check counts is not counted.
    fn add(&mut self, cs: u64, off: u64, len: u64, refs: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / cs;
        let Some(last) = off.checked_add(len - 1).map(|end| end / cs) else {
            self.report
                .corruption(|| format!("ERROR {what} at {off:#x} overflows"));
            return;
        };
        if last >= self.count_limit {
            self.uncounted = true;
            self.report
                .corruption(|| format!("ERROR {what} at {off:#x} is far past the end of the file"));
            return;
        }
        if last >= self.file_clusters {
            self.report
                .corruption(|| format!("ERROR {what} at {off:#x} is past the end of the file"));
        }
        // Below count_limit, at most 2^28, so it fits.
        let last = usize::try_from(last).unwrap_or(usize::MAX);
        if last >= self.counts.len() {
            self.counts.resize(last + 1, 0);
        }
        let first = usize::try_from(first).unwrap_or(usize::MAX);
        for v in &mut self.counts[first..=last] {
            *v = v.saturating_add(refs);
        }
    }

    /// The references counted for host offset `off`.
    fn at(&self, cs: u64, off: u64) -> u64 {
        usize::try_from(off / cs)
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }
}

fn read_words(f: &HostFile, off: u64, count: u64) -> Result<Vec<u64>, Error> {
    let mut b = vec![0u8; usize::try_from(count * 8).unwrap_or(0)];
    f.read_at(&mut b, off)?;
    Ok(decode_words(&b))
}

/// Counts every reference; with `with_refcounts`, the refcount table and blocks too.
///
/// Each distinct L1 table (the active one, and the snapshots' by offset and size) is read once,
/// then each distinct L2 table once, its entries counted as many times as L1 entries point at
/// it: the work is bounded by the tables in the file, not by how many snapshots share them.
fn count_refs(f: &HostFile, m: &mut Meta, with_refcounts: bool) -> Result<Refs, Error> {
    let cs = m.cs();
    let file_len = f.len()?;
    let n = file_len.div_ceil(cs);
    if n > MAX_CHECK_CLUSTERS {
        return Err(Error::TooLarge {
            path: f.path().to_string(),
            what: "file to check",
            bytes: n * cs,
        });
    }
    let mut r = Refs {
        counts: vec![0; usize::try_from(n).unwrap_or(0)],
        report: CheckReport::default(),
        bad_copied: Vec::new(),
        file_clusters: n,
        count_limit: n + n.max(MIN_PAST_END_CLUSTERS),
        uncounted: false,
    };
    let h = m.header.clone();
    r.add(cs, 0, cs, 1, "header");
    if with_refcounts {
        r.add(
            cs,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            1,
            "refcount table",
        );
        for &e in &m.rc_table {
            if e != 0 {
                r.add(cs, e, cs, 1, "refcount block");
            }
        }
    }
    // Snapshot L1 tables by (offset, size), with how many snapshots use each.
    let mut snap_l1s: BTreeMap<(u64, u32), u64> = BTreeMap::new();
    if h.nb_snapshots > 0 {
        let (snaps, len) = snapshot::read_table(f, &h)?;
        r.add(cs, h.snapshots_offset, len, 1, "snapshot table");
        for s in snaps {
            *snap_l1s.entry((s.offset, s.size)).or_default() += 1;
        }
    }
    let words: u64 = snap_l1s.keys().map(|&(_, size)| u64::from(size)).sum();
    if words > MAX_L1_WORDS {
        return Err(Error::TooLarge {
            path: f.path().to_string(),
            what: "snapshot L1 tables to check",
            bytes: words * 8,
        });
    }
    // L1 entries pointing at each cluster of the file (so at most one counter per cluster,
    // however many tables there are), and the first active L1 index of each active L2 table.
    let mut l2_refs = vec![0u32; r.counts.len()];
    let mut active_l2: HashMap<u64, usize> = HashMap::new();
    let mut copied_checks = Vec::new();
    let active = std::iter::once((h.l1_table_offset, h.l1_size, 1, true));
    let snaps = snap_l1s.iter().map(|(&(o, s), &k)| (o, s, k, false));
    for (l1_off, l1_size, k, is_active) in active.chain(snaps) {
        r.add(cs, l1_off, u64::from(l1_size) * 8, k, "L1 table");
        let l1 = if is_active {
            m.l1.clone()
        } else {
            r.report.tables_read += 1;
            read_words(f, l1_off, u64::from(l1_size))?
        };
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if is_active {
                active_l2.entry(l2).or_insert(i);
                copied_checks.push((l2, e & COPIED != 0, EntryAt::L1(i)));
            }
            match usize::try_from(l2 / cs)
                .ok()
                .and_then(|c| l2_refs.get_mut(c))
            {
                Some(v) => *v = v.saturating_add(u32::try_from(k).unwrap_or(u32::MAX)),
                // Past the end of the file: counted (and reported), nothing to walk.
                None => r.add(cs, l2, cs, k, "L2 table"),
            }
        }
    }
    let words = m.geo.words();
    for (c, &k) in l2_refs.iter().enumerate() {
        if k == 0 {
            continue;
        }
        let (l2, k) = (c as u64 * cs, u64::from(k));
        r.add(cs, l2, cs, k, "L2 table");
        let active = active_l2.get(&l2).copied();
        r.report.tables_read += 1;
        let t = read_words(f, l2, cs / 8)?;
        let mut prev_end = 0;
        for (j, pair) in t.chunks_exact(words).enumerate() {
            let guest = (active.unwrap_or(0) as u64 * m.geo.l2_entries() + j as u64) * cs;
            let (entry, bitmap) = (pair[0], pair.get(1).copied().unwrap_or(0));
            match m.geo.decode(entry, bitmap, guest) {
                Err(e) => r.report.corruption(|| format!("ERROR {e}")),
                Ok((Mapping::Compressed { host, len }, _)) => {
                    r.add(cs, host, len, k, "compressed cluster");
                    if active.is_some() {
                        r.report.allocated_clusters += 1;
                        r.report.compressed_clusters += 1;
                    }
                }
                Ok(_) => {
                    let host = entry & OFFSET_MASK;
                    if host == 0 || entry & COMPRESSED != 0 {
                        continue;
                    }
                    r.add(cs, host, cs, k, "data cluster");
                    if active.is_some() {
                        r.report.allocated_clusters += 1;
                        if prev_end != 0 && host != prev_end {
                            r.report.fragmented_clusters += 1;
                        }
                        prev_end = host + cs;
                        copied_checks.push((host, entry & COPIED != 0, EntryAt::L2(l2, j * words)));
                    }
                }
            }
        }
    }
    for (host, copied, at) in copied_checks {
        let refs = r.at(cs, host);
        if copied != (refs == 1) {
            r.report.corruption(|| match at {
                EntryAt::L1(i) => {
                    format!("ERROR OFLAG_COPIED L2 table for L1 index {i}: references={refs}")
                }
                EntryAt::L2(l2, word) => format!(
                    "ERROR OFLAG_COPIED data cluster at {host:#x} (L2 table {l2:#x} entry {}): references={refs}",
                    word / words
                ),
            });
            r.bad_copied.push((at, refs == 1));
        }
    }
    Ok(r)
}

/// Writes a fresh refcount structure for the references counted (without refcount structures)
/// after the end of the file and after every cluster referenced, and points the header at it.
fn write_refcounts(f: &HostFile, m: &mut Meta, refs: Refs) -> Result<(), Error> {
    if refs.uncounted {
        return Err(Error::TooLarge {
            path: f.path().to_string(),
            what: "range of clusters referenced",
            bytes: refs.count_limit * m.cs(),
        });
    }
    let mut counts = refs.counts;
    let cs = m.cs();
    let per = m.rc_per_block();
    let start = counts.len() as u64;
    let (mut tc, mut nb) = (1u64, 1u64);
    loop {
        let total = start + tc + nb;
        let nb2 = total.div_ceil(per);
        let tc2 = (nb2 * 8).div_ceil(cs);
        if (nb2, tc2) == (nb, tc) {
            break;
        }
        (nb, tc) = (nb2, tc2);
    }
    if tc * cs > super::validate::MAX_REFTABLE_BYTES {
        return Err(Error::TooLarge {
            path: f.path().to_string(),
            what: "refcount table",
            bytes: tc * cs,
        });
    }
    counts.resize(usize::try_from(start + tc + nb).unwrap_or(0), 0);
    for c in &mut counts[usize::try_from(start).unwrap_or(0)..] {
        *c = 1;
    }
    let max = m.rc_max();
    if let Some(c) = counts.iter().position(|&c| c > max) {
        return Err(Error::Format {
            path: f.path().to_string(),
            source: super::FormatError::RefcountOverflow(c as u64 * cs),
        });
    }
    let order = m.header.refcount_order;
    let mut table = vec![0u64; usize::try_from(tc * cs / 8).unwrap_or(0)];
    let per_us = usize::try_from(per).unwrap_or(1);
    for (bi, chunk) in counts.chunks(per_us).enumerate() {
        let mut b = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for (i, &v) in chunk.iter().enumerate() {
            set_entry(&mut b, order, i as u64, v);
        }
        let off = (start + tc + bi as u64) * cs;
        f.write_at(&b, off)?;
        table[bi] = off;
    }
    f.write_at(&encode_words(&table), start * cs)?;
    f.sync()?;
    let clusters = u32::try_from(tc).unwrap_or(u32::MAX);
    let mut hdr = (start * cs).to_be_bytes().to_vec();
    hdr.extend_from_slice(&clusters.to_be_bytes());
    f.write_at(&hdr, 48)?;
    f.sync()?;
    m.header.refcount_table_offset = start * cs;
    m.header.refcount_table_clusters = clusters;
    m.rc_table = table;
    m.rc_blocks.clear();
    m.note_refcounts_moved();
    // Every cluster no reference counts is free from now on.
    m.epochs.note_reuse();
    m.free_hint = 1;
    m.end = start + tc + nb;
    Ok(())
}

/// Sets or clears the COPIED flag of active-layer entries to match their references.
fn fix_copied(f: &HostFile, m: &mut Meta, bad: &[(EntryAt, bool)]) -> Result<(), Error> {
    let set = |e: u64, copied: bool| if copied { e | COPIED } else { e & !COPIED };
    for &(at, copied) in bad {
        match at {
            EntryAt::L1(i) => {
                if let Some(e) = m.l1.get_mut(i) {
                    *e = set(*e, copied);
                    m.l1_dirty.insert(i);
                }
            }
            EntryAt::L2(table, word) => {
                m.load_l2(f, table)?;
                if let Some(e) = m.l2.get(table).and_then(|t| t.get_mut(word)) {
                    *e = set(*e, copied);
                }
                m.l2.mark_dirty(table);
            }
        }
    }
    m.write_back(f)?;
    f.sync()
}

/// Rebuilds the refcounts of an image from its references (dirty lazy-refcounts image).
///
/// Corruptions other than COPIED flags (which it corrects, as a repair does) refuse the image
/// before anything is written: refcounts rebuilt from broken references would let the
/// allocator hand out clusters that are still in use.
pub fn rebuild_refcounts(f: &HostFile, m: &mut Meta) -> Result<(), Error> {
    let refs = count_refs(f, m, false)?;
    let others = refs.report.corruptions - refs.bad_copied.len() as u64;
    if others > 0 {
        return Err(Error::Format {
            path: f.path().to_string(),
            source: super::FormatError::DirtyImageCorrupt {
                corruptions: others,
                first: refs.report.messages.first().cloned().unwrap_or_default(),
            },
        });
    }
    let bad_copied = refs.bad_copied.clone();
    write_refcounts(f, m, refs)?;
    fix_copied(f, m, &bad_copied)
}

impl Qcow2 {
    /// Checks the image's consistency and repairs what `repair` allows (the image must then be
    /// open for writing).
    pub fn check(&self, repair: Repair) -> Result<CheckReport, Error> {
        if repair != Repair::None && self.read_only {
            return Err(Error::ReadOnly);
        }
        let _flushing = self.flushing();
        let mut m = self.lock_for_maintenance();
        if !self.read_only {
            m.write_back(&self.file)?;
            m.write_back(&self.file)?;
        }
        let cs = m.cs();
        let mut refs = count_refs(&self.file, &mut m, true)?;
        let mut rep = std::mem::take(&mut refs.report);
        // Refcount mismatches are what a rebuild repairs; other corruptions stay.
        let mut rc_corruptions = 0;
        for (c, &want) in refs.counts.iter().enumerate() {
            let have = m.refcount(&self.file, c as u64)?;
            if have < want {
                rc_corruptions += 1;
                rep.corruption(|| format!("ERROR cluster {c} refcount={have} reference={want}"));
            } else if have > want {
                rep.leaks += 1;
                rep.message(|| format!("Leaked cluster {c} refcount={have} reference={want}"));
            }
            if want > 0 || have > 0 {
                rep.image_end_offset = (c as u64 + 1) * cs;
            }
        }
        rep.total_clusters = self.size().div_ceil(cs);
        let fix = match repair {
            Repair::None => false,
            Repair::Leaks => rep.leaks > 0 && rep.corruptions == 0,
            Repair::All => rep.leaks > 0 || rep.corruptions > 0,
        };
        if fix {
            let base = count_refs(&self.file, &mut m, false)?;
            let bad_copied = base.bad_copied.clone();
            write_refcounts(&self.file, &mut m, base)?;
            rep.leaks_fixed = rep.leaks;
            if repair == Repair::All {
                fix_copied(&self.file, &mut m, &bad_copied)?;
            }
            let after = count_refs(&self.file, &mut m, true)?;
            if repair == Repair::All {
                // Refcounts are now right by construction; of the other corruptions, those
                // the new refcounts and flags made right (references past the end of the file
                // now lie before the new structure) are fixed too.
                let others = rep.corruptions - rc_corruptions;
                rep.corruptions_fixed =
                    rc_corruptions + others.saturating_sub(after.report.corruptions);
            }
            let mut end = 0;
            for (c, &want) in after.counts.iter().enumerate() {
                if want > 0 {
                    end = (c as u64 + 1) * cs;
                }
            }
            rep.image_end_offset = end;
        }
        Ok(rep)
    }
}
