//! Creating, applying and deleting internal snapshots (spec "Snapshots"), on an image open for
//! writing, each as one operation under the metadata lock and the flush mutex, which keeps
//! other write-backs out meanwhile (`vmm-img snapshot -c|-a|-d`); applying
//! a snapshot of another disk size resizes the disk first (`resize.rs`), as QEMU does.
//!
//! Refcounts follow QEMU's convention, which `check` counts: an L2 table has one reference per
//! L1 entry pointing at it, and a data cluster one per L2 walk reaching it, so a data cluster
//! behind an L2 table that the active L1 and a snapshot share counts 2. The COPIED flag (bit 63)
//! of an active L1 or L2 entry is set exactly when the refcount is 1; writes honour it
//! (`write.rs`: a shared L2 table is copied, a shared cluster is copied on write).
//!
//! Crash safety: nothing a durable structure points at loses a reference before the structure
//! stops pointing at it, and the switch from the old state to the new one is one write inside
//! the header's first sector (`l1_size` to `snapshots_offset`, and the incompatible feature bits
//! of v3, bytes 36-79), synced:
//! 1. a v3 image is marked dirty (spec: refcounts may be inconsistent; the next read-write open,
//!    ours or QEMU's, rebuilds them and the COPIED flags);
//! 2. every table the new state needs is written to new clusters, with the references it adds
//!    raised, and synced;
//! 3. the header switches (and create and apply clear the dirty bit in the same write);
//! 4. what the old state alone referenced is released, and synced.
//!
//! A cut before the switch leaves the old state with raised refcounts: leaks, and COPIED flags
//! still set on clusters whose refcount is now above 1 (harmless, the extra references being
//! leaks, but a mismatch `check` reports); a cut after it, the new state with leaks. A failure
//! before the switch drops the raised references again and clears the dirty bit.
//!
//! Create gives the active L1 table fresh copies of its L2 tables (COPIED cleared on the data
//! entries, now shared) and leaves the current L1 and L2 tables to the snapshot, so that no
//! active table changes in place (QEMU shares the L2 tables instead and clears their flags in
//! place). Apply points the active L1 at a copy of the snapshot's L1 table; everything it
//! reaches is then shared with the snapshot, so its flags are all clear. Delete must set the
//! COPIED flags of active entries whose refcount drops to 1, which can only follow the drop:
//! its image stays dirty until the flags are set. A v2 image has no dirty bit: `check -r all`
//! repairs the flags of a cut one.

use std::collections::{HashMap, HashSet};
use std::sync::MutexGuard;

use super::header::INCOMPAT_DIRTY;
use super::l2::{COMPRESSED, COPIED, L1_RESERVED, OFFSET_MASK};
use super::meta::{encode_words, Meta};
use super::snapshot::{self, NewEntry, RawEntry, Snapshot, SnapshotError, SnapshotL1};
use super::validate::{FormatError, MAX_SNAPSHOTS};
use super::{fmt_err, Qcow2};
use crate::Error;

/// Header bytes rewritten by the switch: `l1_size`, `l1_table_offset`, the refcount table
/// fields (unchanged), `nb_snapshots` and `snapshots_offset`, and in v3 the incompatible
/// feature bits; all in the first sector.
const SWITCH_AT: usize = 36;
/// Offset of the incompatible feature bits (v3 header, bytes 72-79).
const INCOMPATIBLE_AT: usize = 72;

/// Refcount changes still to make after the switch: host cluster offset, and how many
/// references it loses.
type Drops = HashMap<u64, u64>;

impl Qcow2 {
    /// Creates snapshot `name` of the disk as it is now, dated `date` (seconds and nanoseconds
    /// since the epoch), with the next free numeric id.
    pub fn snapshot_create(&self, name: &str, date: (u32, u32)) -> Result<(), Error> {
        let (_flushing, mut m) = self.settled()?;
        let h = m.header.clone();
        let entries = snapshot::raw_entries(&self.file, &h)?;
        if h.nb_snapshots >= MAX_SNAPSHOTS {
            return Err(self.refuse(SnapshotError::TooMany(h.nb_snapshots)));
        }
        let id = entries
            .iter()
            .filter_map(|e| e.snap.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let new = NewEntry {
            l1: SnapshotL1 {
                offset: h.l1_table_offset,
                size: h.l1_size,
            },
            id: &id.to_string(),
            name,
            date,
            disk_size: h.size,
        }
        .encode()
        .map_err(|e| self.refuse(e))?;
        self.mark_dirty(&mut m, true)?;
        let mut raised = Vec::new();
        let prepared = self.prepare_create(&mut m, &entries, &new, &mut raised);
        let (l1, table) = self.or_undo(&mut m, &raised, prepared)?;
        self.switch(&mut m, l1, table, entries.len() + 1, false)?;
        self.release(&mut m, &table_clusters(&h, &entries))
    }

    /// The new active L1 table (copies of the L2 tables, the data they map raised) and the new
    /// snapshot table, written and synced: (L1 offset and entries, table offset).
    fn prepare_create(
        &self,
        m: &mut Meta,
        entries: &[RawEntry],
        new: &[u8],
        raised: &mut Vec<u64>,
    ) -> Result<((u64, Vec<u64>), u64), Error> {
        let cs = m.cs();
        let words = m.geo.words();
        let mut l1 = vec![0u64; m.l1.len()];
        for (i, old) in self.l2_tables(m, &m.l1.clone())? {
            let mut t = self.read_l2(old)?;
            for w in t.iter_mut().step_by(words) {
                for c in self.entry_clusters(*w) {
                    m.incref(&self.file, c / cs)?;
                    raised.push(c);
                }
                *w &= !COPIED;
            }
            let copy = m.alloc_cluster(&self.file)?;
            raised.push(copy);
            self.file.write_at(&encode_words(&t), copy)?;
            l1[i] = copy | COPIED;
        }
        let l1_off = self.write_l1(m, &l1, raised)?;
        let mut table: Vec<u8> = entries.iter().flat_map(|e| e.bytes.clone()).collect();
        table.extend_from_slice(new);
        let table_off = self.write_run(m, &table, raised)?;
        m.write_refcount_blocks(&self.file)?;
        m.sync(&self.file)?;
        Ok(((l1_off, l1), table_off))
    }

    /// Makes the disk what snapshot `name` (an id, else a name) holds; the snapshot stays.
    /// A snapshot of another disk size first resizes the disk to its size, as QEMU does.
    pub fn snapshot_apply(&self, name: &str) -> Result<(), Error> {
        let disk_size = {
            let (_flushing, m) = self.settled()?;
            let entries = snapshot::raw_entries(&self.file, &m.header)?;
            find_by_id_or_name(&entries, name).map(|sn| sn.disk_size)
        };
        let Some(disk_size) = disk_size else {
            return Err(self.refuse(SnapshotError::NotFound));
        };
        if let Some(size) =
            disk_size.filter(|&s| s != self.size.load(std::sync::atomic::Ordering::Acquire))
        {
            self.resize(size)?;
        }
        let (_flushing, mut m) = self.settled()?;
        let h = m.header.clone();
        let entries = snapshot::raw_entries(&self.file, &h)?;
        let Some(sn) = find_by_id_or_name(&entries, name) else {
            return Err(self.refuse(SnapshotError::NotFound));
        };
        if let Some(size) = sn.disk_size.filter(|&s| s != h.size) {
            return Err(self.refuse(SnapshotError::DiskSize {
                name: sn.name,
                snapshot: size,
                disk: h.size,
            }));
        }
        let file_len = self.file.len()?;
        let sn_l1 = super::read_table(
            &self.file,
            file_len,
            "snapshot L1 table",
            sn.l1.offset,
            u64::from(sn.l1.size),
        )?;
        let len = sn_l1.len().max(m.l1.len());
        let mut drops = Drops::new();
        let old_l1 = m.l1.clone();
        self.count_drops(&mut m, &old_l1, &mut drops)?;
        for c in l1_clusters(m.cs(), h.l1_table_offset, h.l1_size) {
            *drops.entry(c).or_default() += 1;
        }
        self.mark_dirty(&mut m, true)?;
        let mut raised = Vec::new();
        let prepared = self.prepare_apply(&mut m, &sn_l1, len, &drops, &mut raised);
        let (l1, _) = self.or_undo(&mut m, &raised, prepared)?;
        self.switch(&mut m, l1, h.snapshots_offset, entries.len(), false)?;
        self.release(&mut m, &drops)
    }

    /// The new active L1 table (the snapshot's, its references raised and COPIED cleared in
    /// its L2 tables, now shared), written and synced: (L1 offset and entries, unused).
    fn prepare_apply(
        &self,
        m: &mut Meta,
        sn_l1: &[u64],
        len: usize,
        drops: &Drops,
        raised: &mut Vec<u64>,
    ) -> Result<((u64, Vec<u64>), u64), Error> {
        let cs = m.cs();
        let words = m.geo.words();
        let mut l1 = vec![0u64; len];
        for (i, l2) in self.l2_tables(m, sn_l1)? {
            let mut t = self.read_l2(l2)?;
            let mut flagged = false;
            for w in t.iter_mut().step_by(words) {
                for c in self.entry_clusters(*w) {
                    m.incref(&self.file, c / cs)?;
                    raised.push(c);
                }
                flagged |= *w & COPIED != 0;
                *w &= !COPIED;
            }
            if flagged {
                // The snapshot's own table (nothing active reads it yet).
                self.file.write_at(&encode_words(&t), l2)?;
            }
            m.incref(&self.file, l2 / cs)?;
            raised.push(l2);
            l1[i] = l2;
        }
        self.check_drops(m, drops)?;
        let l1_off = self.write_l1(m, &l1, raised)?;
        m.write_refcount_blocks(&self.file)?;
        m.sync(&self.file)?;
        Ok(((l1_off, l1), 0))
    }

    /// Deletes the first snapshot named `name`.
    pub fn snapshot_delete(&self, name: &str) -> Result<(), Error> {
        let (_flushing, mut m) = self.settled()?;
        let h = m.header.clone();
        let mut entries = snapshot::raw_entries(&self.file, &h)?;
        let mut drops = table_clusters(&h, &entries);
        let Some(at) = entries.iter().position(|e| e.snap.name == name) else {
            return Err(self.refuse(SnapshotError::NotFound));
        };
        let gone = entries.remove(at).snap;
        let file_len = self.file.len()?;
        let sn_l1 = super::read_table(
            &self.file,
            file_len,
            "snapshot L1 table",
            gone.l1.offset,
            u64::from(gone.l1.size),
        )?;
        let cs = m.cs();
        // Another snapshot may use the same L1 table (QEMU never writes that; a hostile image
        // can): it then keeps its clusters.
        if !entries.iter().any(|e| e.snap.l1 == gone.l1) {
            for c in l1_clusters(cs, gone.l1.offset, gone.l1.size) {
                *drops.entry(c).or_default() += 1;
            }
        }
        self.count_drops(&mut m, &sn_l1, &mut drops)?;
        let mut raised = Vec::new();
        let prepared = (|| {
            self.check_drops(&mut m, &drops)?;
            let table: Vec<u8> = entries.iter().flat_map(|e| e.bytes.clone()).collect();
            let off = if table.is_empty() {
                0
            } else {
                self.write_run(&mut m, &table, &mut raised)?
            };
            m.write_refcount_blocks(&self.file)?;
            m.sync(&self.file)?;
            Ok(((h.l1_table_offset, m.l1.clone()), off))
        })();
        let (l1, table) = self.or_undo(&mut m, &raised, prepared)?;
        // Refcounts and COPIED flags disagree until both are done: the image stays dirty.
        self.switch(&mut m, l1, table, entries.len(), true)?;
        self.release(&mut m, &drops)?;
        self.set_copied_flags(&mut m)?;
        self.mark_dirty(&mut m, false)
    }

    /// Sets or clears the dirty bit of a v3 image (spec: refcounts may be inconsistent, and are
    /// rebuilt by the next read-write open), synced; nothing for v2, which has none.
    fn mark_dirty(&self, m: &mut Meta, dirty: bool) -> Result<(), Error> {
        if m.header.version < 3 {
            return Ok(());
        }
        let mut h = m.header.clone();
        h.incompatible = if dirty {
            h.incompatible | INCOMPAT_DIRTY
        } else {
            h.incompatible & !INCOMPAT_DIRTY
        };
        self.file
            .write_at(&h.incompatible.to_be_bytes(), INCOMPATIBLE_AT as u64)?;
        m.sync(&self.file)?;
        m.header = h;
        Ok(())
    }

    /// Locks the metadata of an image open for writing, with every table written back and
    /// synced and no L2 table cached, so that the file holds the tables an operation reads.
    /// The flush mutex comes with it: no other write-back may run meanwhile, since one writes
    /// its copies of the tables outside the metadata lock, and an operation frees tables (and
    /// may reuse their clusters) without going through the pending frees that only write-backs
    /// holding the mutex apply.
    fn settled(&self) -> Result<(MutexGuard<'_, ()>, super::Maintenance<'_>), Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.refuse_if_corrupt()?;
        let flushing = self.flushing();
        let mut m = self.lock_for_maintenance();
        // The first pass may queue reference drops that the second writes.
        m.write_back(&self.file)?;
        m.write_back(&self.file)?;
        m.sync(&self.file)?;
        m.l2.clear();
        Ok((flushing, m))
    }

    fn refuse(&self, source: SnapshotError) -> Error {
        Error::Snapshot {
            path: self.file.path().to_string(),
            source,
        }
    }

    /// The L2 tables an L1 table points at: (L1 index, offset), each entry checked.
    fn l2_tables(&self, m: &Meta, l1: &[u64]) -> Result<Vec<(usize, u64)>, Error> {
        let cs = m.cs();
        let mut out = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if e & L1_RESERVED != 0 || !off.is_multiple_of(cs) || (off != 0 && off < cs) {
                return Err(fmt_err(
                    &self.file,
                    FormatError::BadL1Entry {
                        index: i as u64,
                        entry: e,
                    },
                ));
            }
            if off != 0 {
                out.push((i, off));
            }
        }
        Ok(out)
    }

    /// Reads the L2 table at `off` from the file (no L2 table is cached, see `settled`).
    fn read_l2(&self, off: u64) -> Result<Vec<u64>, Error> {
        let cs = self.geo.cluster_size();
        let file_len = self.file.len()?;
        super::read_table(&self.file, file_len, "L2 table", off, cs / 8)
    }

    /// Counts the references an L1 table holds (its L2 tables and what they map) into `drops`.
    fn count_drops(&self, m: &mut Meta, l1: &[u64], drops: &mut Drops) -> Result<(), Error> {
        let words = m.geo.words();
        for (_, l2) in self.l2_tables(m, l1)? {
            *drops.entry(l2).or_default() += 1;
            for &w in self.read_l2(l2)?.iter().step_by(words) {
                for c in self.entry_clusters(w) {
                    *drops.entry(c).or_default() += 1;
                }
            }
        }
        Ok(())
    }

    /// Refuses, before anything changes, drops that would take a refcount below zero (the
    /// references counted exceed the refcount: a corrupt image).
    fn check_drops(&self, m: &mut Meta, drops: &Drops) -> Result<(), Error> {
        let cs = m.cs();
        for (&c, &n) in drops {
            if m.refcount(&self.file, c / cs)? < n {
                return Err(fmt_err(&self.file, FormatError::RefcountUnderflow(c)));
            }
        }
        Ok(())
    }

    /// Writes an active L1 table to new clusters and returns its offset; an empty one (a disk of
    /// size 0) takes none and keeps the current offset, as it references nothing.
    fn write_l1(&self, m: &mut Meta, l1: &[u64], raised: &mut Vec<u64>) -> Result<u64, Error> {
        if l1.is_empty() {
            return Ok(m.header.l1_table_offset);
        }
        self.write_run(m, &encode_words(l1), raised)
    }

    /// Allocates consecutive clusters for `bytes` (at least one cluster), writes them zero
    /// padded, and returns the first one's offset; the clusters join `raised`.
    fn write_run(&self, m: &mut Meta, bytes: &[u8], raised: &mut Vec<u64>) -> Result<u64, Error> {
        let cs = m.cs();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let mut run: Vec<u64> = Vec::new();
        let mut spare = Vec::new();
        let got = (|| {
            while (run.len() as u64) < n {
                let c = m.alloc_cluster(&self.file)?;
                if run.last().is_some_and(|&last| last + cs != c) {
                    spare.append(&mut run);
                }
                run.push(c);
            }
            Ok::<(), Error>(())
        })();
        // Clusters that broke a run were allocated only to be skipped.
        for &c in &spare {
            m.drop_ref(&self.file, c)?;
        }
        if let Err(e) = got {
            raised.extend(run);
            return Err(e);
        }
        raised.extend(&run);
        let mut b = bytes.to_vec();
        b.resize(usize::try_from(n * cs).unwrap_or(0), 0);
        self.file.write_at(&b, run[0])?;
        Ok(run[0])
    }

    /// Passes on a preparation's result; on failure first drops the references it raised
    /// (nothing durable points at them: the header has not switched).
    fn or_undo<T>(&self, m: &mut Meta, raised: &[u64], r: Result<T, Error>) -> Result<T, Error> {
        if r.is_err() {
            let undone = raised
                .iter()
                .rev()
                .try_for_each(|&c| m.drop_ref(&self.file, c))
                .and_then(|()| m.write_refcount_blocks(&self.file));
            match undone.and_then(|()| self.mark_dirty(m, false)) {
                Ok(()) => {}
                // The rest only leaks, and the image stays dirty.
                Err(e) => log::warn!("{e}"),
            }
        }
        r
    }

    /// Points the header at the active L1 table `l1` (offset, entries) and at a snapshot table
    /// of `count` entries at `table`, and sets (`dirty`) or clears the dirty bit of a v3 image,
    /// in one write inside its first sector, synced; then makes the metadata in memory match.
    fn switch(
        &self,
        m: &mut Meta,
        l1: (u64, Vec<u64>),
        table: u64,
        count: usize,
        dirty: bool,
    ) -> Result<(), Error> {
        let mut h = m.header.clone();
        h.l1_table_offset = l1.0;
        h.l1_size = u32::try_from(l1.1.len()).unwrap_or(u32::MAX);
        // At most MAX_SNAPSHOTS (checked before creating one).
        h.nb_snapshots = u32::try_from(count).unwrap_or(u32::MAX);
        h.snapshots_offset = table;
        let mut end = INCOMPATIBLE_AT;
        if h.version >= 3 {
            h.incompatible = if dirty {
                h.incompatible | INCOMPAT_DIRTY
            } else {
                h.incompatible & !INCOMPAT_DIRTY
            };
            end += 8;
        }
        let b = h.encode().map_err(|e| fmt_err(&self.file, e))?;
        self.file.write_at(&b[SWITCH_AT..end], SWITCH_AT as u64)?;
        m.sync(&self.file)?;
        m.header = h;
        m.l1 = l1.1;
        m.l1_dirty.clear();
        self.overlap.build(&self.file, m)
    }

    /// Drops the references the old state held, now that the header no longer reaches them,
    /// and syncs. An L2 table of the active L1 table may legitimately lose one (the old state's,
    /// or a deleted snapshot's, share of it); any other cluster still indexed as metadata is
    /// refused (`free_cluster`).
    fn release(&self, m: &mut Meta, drops: &Drops) -> Result<(), Error> {
        let active: HashSet<u64> = m.l1.iter().map(|e| e & OFFSET_MASK).collect();
        for (&c, &n) in drops {
            for _ in 0..n {
                if active.contains(&c) {
                    m.drop_ref(&self.file, c)?;
                } else {
                    m.free_cluster(&self.file, c)?;
                }
            }
        }
        m.write_refcount_blocks(&self.file)?;
        m.sync(&self.file)
    }

    /// Sets the COPIED flag of every active L1 and L2 entry whose cluster has a refcount of 1,
    /// and clears it elsewhere; writes the tables back (L2 tables before L1 entries).
    fn set_copied_flags(&self, m: &mut Meta) -> Result<(), Error> {
        let cs = m.cs();
        let words = m.geo.words();
        for (i, l2) in self.l2_tables(m, &m.l1.clone())? {
            let own = m.refcount(&self.file, l2 / cs)? == 1;
            if (m.l1[i] & COPIED != 0) != own {
                m.l1[i] = l2 | if own { COPIED } else { 0 };
                m.l1_dirty.insert(i);
            }
            m.load_l2(&self.file, l2)?;
            let t = m.l2.peek(l2).cloned().unwrap_or_default();
            let mut changed = false;
            let mut new = t.clone();
            for (j, &w) in t.iter().enumerate().step_by(words) {
                let host = w & OFFSET_MASK;
                if w & COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let flag = if m.refcount(&self.file, host / cs)? == 1 {
                    COPIED
                } else {
                    0
                };
                if w & COPIED != flag {
                    new[j] = (w & !COPIED) | flag;
                    changed = true;
                }
            }
            if changed {
                if let Some(slot) = m.l2.get(l2) {
                    *slot = new;
                }
                m.l2.mark_dirty(l2);
            }
        }
        m.write_back(&self.file)?;
        m.sync(&self.file)
    }
}

/// The clusters of an L1 table of `size` entries at `offset`, each losing one reference.
/// The snapshot whose id, else whose name, is `name`.
fn find_by_id_or_name(entries: &[RawEntry], name: &str) -> Option<Snapshot> {
    entries
        .iter()
        .find(|e| e.snap.id == name)
        .or_else(|| entries.iter().find(|e| e.snap.name == name))
        .map(|e| e.snap.clone())
}

fn l1_clusters(cs: u64, offset: u64, size: u32) -> Vec<u64> {
    let bytes = u64::from(size) * 8;
    (offset / cs..(offset + bytes).div_ceil(cs))
        .map(|c| c * cs)
        .collect()
}

/// The clusters of the snapshot table of `h`, whose entries are `entries`, each losing one
/// reference.
fn table_clusters(h: &super::header::Header, entries: &[RawEntry]) -> Drops {
    if h.nb_snapshots == 0 {
        return Drops::new();
    }
    let len: u64 = entries.iter().map(|e| e.bytes.len() as u64).sum();
    let cs = h.cluster_size();
    (h.snapshots_offset / cs..(h.snapshots_offset + len).div_ceil(cs))
        .map(|c| (c * cs, 1))
        .collect()
}
