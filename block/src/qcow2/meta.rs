//! The metadata state of an open qcow2 image, behind the image's one metadata lock: the header,
//! the L1 table, the L2 table cache, the refcount table and block cache, and the clusters waiting
//! to be freed.
//!
//! Write ordering (crash consistency, docs/DESIGN.md), kept as data in [`Owed`] as QEMU's caches keep
//! theirs (`qcow2_cache_set_dependency`, `qcow2_cache_depends_on_flush`): whoever creates a need
//! records it (an allocation: refcounts before L2 tables; data published in an L2 entry: a file
//! sync before L2 tables; a new L2 table in L1: L2 tables before L1), and the functions that
//! write L2 tables and L1 entries under the lock ([`Meta::write_l2`], [`Meta::write_l1_entry`])
//! settle what is owed first. So an eviction, the close path or a check keep the same order,
//! whichever thread runs them. Reference drops go the other way: a cluster that loses a
//! reference is queued in `pending_frees` ([`Meta::drop_refs`]), and its refcount is lowered
//! only after the metadata that stopped pointing at it is written and synced; it is reused only
//! once no request in flight when that metadata changed can reach it either (`refcount.rs`). A
//! refcount block can therefore be written at any time; the refcount table entry of a new one
//! only once it is durable ([`Meta::rc_entries_owed`]: every write of the refcount blocks is
//! followed, when entries are owed, by a sync and the entries), and before any L2 table. A grown
//! refcount table ([`Meta::rc_table_new`]) likewise: written whole after the blocks, synced, then
//! named by the header (synced), before any L2 table; `header` keeps naming the table the disk
//! has until then.
//!
//! A flush keeps these orderings without holding the lock across its writes and syncs: it
//! copies what it owes under the lock ([`Meta::copy_dirty`]), writes the copies in order
//! without it ([`Copies::write`]), and under the lock again ([`Meta::settle`]) marks clean only
//! the tables unchanged since the copy and settles only the needs that arose before it. Tables
//! written under the lock in between are newer than the copies, which skip them ([`Written`]).
//!
//! A full cache makes room the same way: a clean least recently used table is dropped, but a
//! dirty one stays, the cache going over its size, and the request that loaded the new table
//! writes the dirty tables back after releasing the lock (`Qcow2::make_room`, an eviction
//! write-back: [`Copies`] of the refcount blocks and L2 tables only, in the same order, without
//! the final sync, the L1 entries or the reference drops, which wait for a flush), then drops
//! the tables now clean. A guest request that finds a cache at its overdraft (`cache.rs`,
//! `OVERDRAFT` tables over its size, all dirty) waits instead: it releases the lock, runs the
//! eviction write-back once the one in flight ended, and retries, or gets the write-back's error
//! (`Qcow2::lock_with_room`); so memory stays bounded and no guest request writes or syncs
//! under the lock. Only the paths holding the write-backs' mutex for their whole run (checks,
//! snapshot operations, resizing; opening and closing) make room at the overdraft by writing the
//! least recently used dirty table under the lock ([`Meta::room_by_writing`]).
//!
//! A table is clean only once its write succeeded (`TableCache::write_dirty`); a failed write
//! leaves it, and every need recorded for it, in place, so the next write-back retries it and no
//! flush reports success while something it owes is unwritten.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use super::cache::TableCache;
use super::header::Header;
use super::l2::{Geometry, L1_RESERVED, OFFSET_MASK};
use super::refcount::{Quarantine, TablePlace};
use super::validate::FormatError;
use crate::direct::Epochs;
use crate::file::HostFile;
use crate::Error;

/// What must be durable before the next L2 table or L1 entry write (see the module doc). Each
/// need is the [`Meta::stamp`] of when it last arose, 0 when nothing is owed: set where its
/// reason arises and cleared only once it is settled (by a flush only when it arose before the
/// flush copied the tables it wrote).
#[derive(Debug, Default)]
pub struct Owed {
    /// L2 entries point at data written into clusters since the last sync (the guest's bytes
    /// or copied-up ones): the file is synced before an L2 table is written.
    pub l2_after_data: u64,
    /// Clusters were allocated (refcounts raised in the cache) for L2 entries or tables: the
    /// refcount blocks are written and synced before an L2 table is written.
    pub l2_after_refcounts: u64,
    /// L1 entries point at new L2 tables: the L2 tables are written and synced before an L1
    /// entry is written.
    pub l1_after_l2: u64,
}

/// Which table a write under the lock went to (see [`Written`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum TableAt {
    Refcounts(u64),
    L2(u64),
    /// The refcount table (an entry or the whole table).
    RefcountTable,
}

/// The table writes made under the metadata lock while a flush writes its copies outside it:
/// such a write holds the table's current content, at least as new as the flush's copy, so the
/// flush skips its copy of that table rather than put the older one back. One mutex orders the
/// two kinds of writes of a table; it is held for one table write at most, never for a sync.
#[derive(Debug, Default)]
pub struct Written(std::sync::Mutex<Option<HashSet<TableAt>>>);

impl Written {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<TableAt>>> {
        // A poisoned set only means a panic elsewhere; a missing entry only costs a rewrite.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A table write under the metadata lock, recorded while a flush is writing its copies
    /// once it succeeded: a failed one wrote nothing newer, and the table, clean by its version
    /// once the copy is written, must not be marked clean by a flush that skipped the copy.
    fn locked(&self, at: TableAt, write: impl FnOnce() -> Result<(), Error>) -> Result<(), Error> {
        let mut set = self.lock();
        write()?;
        if let Some(set) = set.as_mut() {
            set.insert(at);
        }
        Ok(())
    }

    /// A flush's write of its copy of a table, skipped when the table went out under the lock
    /// since the copy.
    fn copy(&self, at: TableAt, write: impl FnOnce() -> Result<(), Error>) -> Result<(), Error> {
        let set = self.lock();
        if set.as_ref().is_some_and(|s| s.contains(&at)) {
            return Ok(());
        }
        write()
    }
}

/// The dirty metadata a flush owes, copied under the metadata lock to be written outside it
/// ([`Meta::copy_dirty`], [`Copies::write`], [`Meta::settle`]).
#[derive(Debug)]
pub struct Copies {
    /// The stamp when copied: needs that arose up to it are settled once the copies are durable.
    stamp: u64,
    rc_blocks: Vec<(u64, Vec<u8>, u64)>,
    /// (index, entry) of the refcount table entries owed, and where the table lies.
    rc_entries: Vec<(usize, u64)>,
    rc_table_offset: u64,
    /// A grown refcount table the header does not name yet: where it goes and its bytes (which
    /// hold the owed entries too).
    rc_table: Option<(TablePlace, Vec<u8>)>,
    l2: Vec<(u64, Vec<u64>, u64)>,
    /// (index, entry) of the dirty L1 entries, and where the L1 table lies.
    l1: Vec<(usize, u64)>,
    l1_offset: u64,
    /// The file is synced before the L2 tables are written, and before the L1 entries.
    sync_before_l2: bool,
    sync_before_l1: bool,
    /// How many of `pending_frees` (the first ones) the copied tables dropped.
    frees: usize,
    /// A flush (everything, ending with a sync), or an eviction write-back (refcount blocks
    /// and L2 tables only, no final sync).
    flush: bool,
    written: Arc<Written>,
}

impl Copies {
    /// Writes the copies in the order the metadata owed when they were taken (refcount blocks;
    /// if the refcount table grew, the new table, a sync, the header naming it and a sync;
    /// else, if refcount table entries are owed, a sync and those entries; a sync if L2 tables
    /// owed one, L2 tables, a sync if L1 entries owed one, L1 entries), then, for a flush,
    /// syncs the file; without the metadata lock. A table written under the lock
    /// meanwhile is skipped: that write was newer, and the syncs that follow cover it.
    pub fn write(&self, f: &HostFile) -> Result<(), Error> {
        for (off, b, _) in &self.rc_blocks {
            self.written
                .copy(TableAt::Refcounts(*off), || f.write_at(b, *off))?;
        }
        if let Some((place, table)) = &self.rc_table {
            // The table and the new blocks it names are durable before the header names it
            // (nothing reaches them before); the switch is durable before any L2 table reaches
            // the clusters only the new table covers. A table moved under the lock meanwhile is
            // skipped, header too.
            self.written
                .copy(TableAt::RefcountTable, || f.write_at(table, place.offset))?;
            f.sync()?;
            self.written
                .copy(TableAt::RefcountTable, || place.write_to_header(f))?;
            f.sync()?;
        } else if !self.rc_entries.is_empty() {
            // The new blocks the entries name are durable before the entries can be.
            f.sync()?;
            for &(i, e) in &self.rc_entries {
                let at = self.rc_table_offset + (i as u64) * 8;
                self.written
                    .copy(TableAt::RefcountTable, || f.write_at(&e.to_be_bytes(), at))?;
            }
        }
        if self.sync_before_l2 {
            f.sync()?;
        }
        for (off, t, _) in &self.l2 {
            self.written
                .copy(TableAt::L2(*off), || f.write_at(&encode_words(t), *off))?;
        }
        if self.sync_before_l1 {
            f.sync()?;
        }
        for &(i, e) in &self.l1 {
            f.write_at(&e.to_be_bytes(), self.l1_offset + (i as u64) * 8)?;
        }
        if !self.flush {
            return Ok(());
        }
        // The final sync makes the guest's data durable too: it counts as data I/O.
        crate::trace::data(|| f.sync())
    }
}

/// The metadata of an open image.
#[derive(Debug)]
pub struct Meta {
    /// The header as parsed (updated in memory when rewritten).
    pub header: Header,
    /// Entry geometry.
    pub geo: Geometry,
    /// The active L1 table.
    pub l1: Vec<u64>,
    /// L1 indices changed in memory and not yet written.
    pub l1_dirty: BTreeSet<usize>,
    /// Cached L2 tables, as 64-bit words (two per entry with extended L2).
    pub l2: TableCache<Vec<u64>>,
    /// The refcount table.
    pub rc_table: Vec<u64>,
    /// Indices of refcount table entries naming new blocks, not yet written: each is written
    /// once its block is durable (see [`Meta::write_refcount_blocks`], [`Copies::write`]).
    pub rc_entries_owed: BTreeSet<usize>,
    /// Where `rc_table` lies when it grew and the header (`header`, as durable on disk) does
    /// not name it yet: the next write-back writes it whole and switches the header.
    pub rc_table_new: Option<TablePlace>,
    /// Grown tables given up for a larger one before the header named them: freed after the
    /// next durable switch, since a write-back may be switching to one of them meanwhile.
    pub rc_tables_unused: Vec<TablePlace>,
    /// Cached refcount blocks, raw bytes.
    pub rc_blocks: TableCache<Vec<u8>>,
    /// First cluster index the allocator looks at.
    pub free_hint: u64,
    /// Cluster index past the highest cluster in use or in the file.
    pub end: u64,
    /// Clusters whose refcount drops once the metadata that dropped them is durable, each with
    /// the epoch it was unmapped in (see [`Meta::drop_refs`]).
    pub pending_frees: Vec<(u64, u64)>,
    /// Orderings owed before the next table writes.
    pub owed: Owed,
    /// The last stamp handed out (see [`Owed`]).
    pub stamps: u64,
    /// Table writes under the lock during a flush's writes (shared with that flush).
    pub written: Arc<Written>,
    /// Metadata was written since the last sync.
    pub unsynced: bool,
    /// Set while a path holding the write-backs' mutex (a check, a snapshot operation, a
    /// resize, the close path) holds the lock (`Qcow2::lock_for_maintenance`): such a path may
    /// touch every table in one hold and no eviction write-back runs meanwhile, so a cache at
    /// its overdraft makes room by writing a dirty table under the lock. Guest requests never
    /// do: they wait for a write-back before taking the lock instead (`Qcow2::lock_with_room`).
    pub room_by_writing: bool,
    /// The epochs of requests doing I/O without the lock (shared with `Qcow2`), which may still
    /// use a cluster they looked up before it was freed.
    pub epochs: Arc<Epochs>,
    /// Freed clusters not reusable yet.
    pub quarantine: Quarantine,
    /// Where the metadata lies (shared with `Qcow2`), kept current as tables move.
    pub overlap: Arc<super::overlap::Overlap>,
}

/// Decodes a big-endian table of 64-bit words.
pub fn decode_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes 64-bit words big-endian.
pub fn encode_words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_be_bytes()).collect()
}

impl Meta {
    /// Cluster size in bytes.
    pub fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn fmt_err(f: &HostFile, source: FormatError) -> Error {
        Error::Format {
            path: f.path().to_string(),
            source,
        }
    }

    /// The L2 table offset for L1 index `i`, validated; 0 when unallocated. Also returns whether
    /// the table is ours alone (COPIED).
    pub fn l1_entry(&self, f: &HostFile, i: usize) -> Result<(u64, bool), Error> {
        let e = self.l1.get(i).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        if e & L1_RESERVED != 0 || !off.is_multiple_of(self.cs()) {
            return Err(Self::fmt_err(
                f,
                FormatError::BadL1Entry {
                    index: i as u64,
                    entry: e,
                },
            ));
        }
        if off != 0 && off < self.cs() {
            return Err(Self::fmt_err(f, FormatError::PointsAtHeader(off)));
        }
        Ok((off, e & super::l2::COPIED != 0))
    }

    /// Makes sure the L2 table at `off` is cached (reading it if needed).
    pub fn load_l2(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        if self.l2.get(off).is_some() {
            return Ok(());
        }
        self.make_room_l2(f)?;
        let mut b = vec![0u8; usize::try_from(self.cs()).unwrap_or(0)];
        f.read_at(&mut b, off)?;
        self.l2.insert(off, decode_words(&b));
        Ok(())
    }

    /// Inserts a fresh (dirty) L2 table.
    pub fn insert_l2(&mut self, f: &HostFile, off: u64, table: Vec<u64>) -> Result<(), Error> {
        self.make_room_l2(f)?;
        self.l2.insert(off, table);
        self.l2.mark_dirty(off);
        Ok(())
    }

    /// Makes room for one more L2 table: drops the least recently used one if clean, else lets
    /// the cache go over its size, the dirty tables left to an eviction write-back after the
    /// lock is released (see the module doc). Only under [`Meta::room_by_writing`] does a
    /// cache at its overdraft write its least recently used dirty table here.
    fn make_room_l2(&mut self, f: &HostFile) -> Result<(), Error> {
        if self.room_by_writing && self.l2.at_overdraft() {
            if let Some((victim, true)) = self.l2.victim() {
                self.write_l2(f, victim)?;
            }
        }
        self.l2.make_room();
        Ok(())
    }

    /// Whether a cache holds its size and its whole overdraft of dirty tables: a guest request
    /// waits for a write-back before changing anything (`Qcow2::lock_with_room`).
    pub fn at_overdraft(&self) -> bool {
        self.l2.at_overdraft() || self.rc_blocks.at_overdraft()
    }

    /// Whether a cache holds more tables than its size (dirty ones, until an eviction
    /// write-back).
    pub fn over_size(&self) -> bool {
        self.l2.over_size() || self.rc_blocks.over_size()
    }

    /// Drops clean tables until both caches are within their sizes; returns whether they are.
    pub fn trim(&mut self) -> bool {
        let l2 = self.l2.trim();
        self.rc_blocks.trim() && l2
    }

    /// The entry words (entry, bitmap) of cluster `guest` in the L2 table at `l2`, if cached.
    pub fn l2_words_cached(&self, l2: u64, guest: u64) -> Option<(u64, u64)> {
        let idx = self.l2_index(guest);
        let words = self.geo.words();
        let t = self.l2.peek(l2)?;
        let entry = t.get(idx * words).copied().unwrap_or(0);
        let bitmap = if words == 2 {
            t.get(idx * 2 + 1).copied().unwrap_or(0)
        } else {
            0
        };
        Some((entry, bitmap))
    }

    /// The entry words of cluster `guest` in the L2 table at `l2`, which the caller loaded.
    pub fn l2_words(&self, l2: u64, guest: u64) -> (u64, u64) {
        self.l2_words_cached(l2, guest).unwrap_or((0, 0))
    }

    /// Sets the entry of cluster `guest` to newly written data (a new cluster, or subclusters
    /// filled in place): the data must be durable before the table is written.
    pub fn publish_data(&mut self, l2: u64, guest: u64, entry: u64, bitmap: u64) {
        self.set_l2_words(l2, guest, entry, bitmap);
        self.owed.l2_after_data = self.stamp();
    }

    /// A new stamp, later than every one before (see [`Owed`]).
    pub fn stamp(&mut self) -> u64 {
        self.stamps += 1;
        self.stamps
    }

    /// Queues the release of one reference to each of `clusters` (host offsets), which the
    /// table entries just changed under the exclusive lock stopped pointing at: the refcounts
    /// drop once those tables are durable. A request that looks a mapping up from now on cannot
    /// reach them, so their reuse waits only for the requests in flight now (the current epoch,
    /// which ending pins move on meanwhile), however long the write-back takes.
    pub fn drop_refs(&mut self, clusters: impl IntoIterator<Item = u64>) {
        let now = self.epochs.current();
        self.pending_frees
            .extend(clusters.into_iter().map(|off| (off, now)));
        self.note_waiting();
    }

    /// Points L1 entry `i` at a new L2 table (whose writes it must follow).
    pub fn set_l1(&mut self, i: usize, entry: u64) {
        self.l1[i] = entry;
        self.l1_dirty.insert(i);
        self.owed.l1_after_l2 = self.stamp();
    }

    /// Sets the entry words of cluster `guest` in the cached L2 table at `l2` and marks it
    /// dirty; for entries that make no new data visible (see `publish_data`).
    pub fn set_l2_words(&mut self, l2: u64, guest: u64, entry: u64, bitmap: u64) {
        let idx = self.l2_index(guest);
        let words = self.geo.words();
        if let Some(t) = self.l2.get(l2) {
            t[idx * words] = entry;
            if words == 2 {
                t[idx * 2 + 1] = bitmap;
            }
        }
        self.l2.mark_dirty(l2);
    }

    /// L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> usize {
        // The guest offset is below the virtual size, whose L1 index fits the (bounded) L1 table.
        usize::try_from(guest >> (self.geo.cluster_bits + self.l2_bits())).unwrap_or(usize::MAX)
    }

    fn l2_bits(&self) -> u32 {
        self.geo.l2_entries().trailing_zeros()
    }

    fn l2_index(&self, guest: u64) -> usize {
        let i = (guest >> self.geo.cluster_bits) & (self.geo.l2_entries() - 1);
        // Below l2_entries, at most 2^18.
        usize::try_from(i).unwrap_or(0)
    }

    /// Copies what a flush owes (the dirty refcount blocks, L2 tables and L1 entries, and the
    /// syncs their orderings need), or without `flush` what an eviction write-back owes (the
    /// same without the L1 entries), for [`Copies::write`] to write without the lock; from now
    /// until [`Meta::settle`], tables written under the lock are recorded so that the write-back
    /// skips its older copies of them. The caller serializes write-backs.
    pub fn copy_dirty(&mut self, flush: bool) -> Copies {
        *self.written.lock() = Some(HashSet::new());
        let l2 = self.l2.copy_dirty();
        let rc_entries: Vec<(usize, u64)> = self
            .rc_entries_owed
            .iter()
            .map(|&i| (i, self.rc_table.get(i).copied().unwrap_or(0)))
            .collect();
        let l1: Vec<(usize, u64)> = if flush {
            self.l1_dirty
                .iter()
                .map(|&i| (i, self.l1.get(i).copied().unwrap_or(0)))
                .collect()
        } else {
            Vec::new()
        };
        Copies {
            stamp: self.stamps,
            rc_blocks: self.rc_blocks.copy_dirty(),
            sync_before_l2: !l2.is_empty()
                && (self.owed.l2_after_refcounts != 0
                    || self.owed.l2_after_data != 0
                    || !rc_entries.is_empty()),
            rc_entries,
            rc_table_offset: self.header.refcount_table_offset,
            rc_table: self
                .rc_table_new
                .map(|place| (place, encode_words(&self.rc_table))),
            sync_before_l1: !l1.is_empty() && self.owed.l1_after_l2 != 0,
            l2,
            l1,
            l1_offset: self.header.l1_table_offset,
            frees: if flush { self.pending_frees.len() } else { 0 },
            flush,
            written: Arc::clone(&self.written),
        }
    }

    /// Ends a write-back of `c` (`result`, which stops the recording of writes under the
    /// lock). Once it succeeded: the copied tables and entries unchanged since are clean; after
    /// a flush, the needs that arose before the copy are settled (everything copied is durable)
    /// and the reference drops the copied tables made are applied; after an eviction
    /// write-back, only the needs of L2 tables, and only if it synced before writing them.
    pub fn settle(
        &mut self,
        f: &HostFile,
        c: &Copies,
        result: Result<(), Error>,
    ) -> Result<(), Error> {
        let locked = self.written.lock().take();
        result?;
        for &(off, _, version) in &c.rc_blocks {
            self.rc_blocks.mark_clean(off, version);
        }
        for &(off, _, version) in &c.l2 {
            self.l2.mark_clean(off, version);
        }
        for &(i, e) in &c.l1 {
            if self.l1.get(i) == Some(&e) {
                self.l1_dirty.remove(&i);
            }
        }
        // Copied entries (and a grown table) were skipped if the table was written under the
        // lock meanwhile: those writes took out of `rc_entries_owed` only the entries they
        // wrote (a table that moved holds them all), and switched the header themselves.
        if !locked.is_some_and(|set| set.contains(&TableAt::RefcountTable)) {
            for &(i, e) in &c.rc_entries {
                if self.rc_table.get(i) == Some(&e) {
                    self.rc_entries_owed.remove(&i);
                }
            }
            if let Some((place, _)) = c.rc_table {
                self.rc_table_switched(place);
            }
        }
        let owed = &mut self.owed;
        let settled = match (c.flush, c.sync_before_l2) {
            (true, _) => vec![
                &mut owed.l2_after_data,
                &mut owed.l2_after_refcounts,
                &mut owed.l1_after_l2,
            ],
            (false, true) => vec![&mut owed.l2_after_data, &mut owed.l2_after_refcounts],
            (false, false) => Vec::new(),
        };
        for need in settled {
            if *need <= c.stamp {
                *need = 0;
            }
        }
        if !c.flush {
            self.unsynced = true;
        }
        // The first `frees` are still those the copies dropped: only flushes take them out,
        // and they are serialized.
        let n = c.frees.min(self.pending_frees.len());
        for k in 0..n {
            let (off, unmapped) = self.pending_frees[k];
            if let Err(e) = self.free_unmapped(f, off, unmapped) {
                self.pending_frees.drain(..k);
                return Err(e);
            }
        }
        self.pending_frees.drain(..n);
        self.note_waiting();
        Ok(())
    }

    /// Writes every dirty table back under the lock (each obeying what it owes), then applies
    /// the queued reference drops once the writes that dropped them are durable: for the close
    /// path and checks (a flush writes copies outside the lock instead).
    pub fn write_back(&mut self, f: &HostFile) -> Result<(), Error> {
        self.write_refcount_blocks(f)?;
        for off in self.l2.dirty() {
            self.write_l2(f, off)?;
        }
        while let Some(&i) = self.l1_dirty.first() {
            self.write_l1_entry(f, i)?;
        }
        self.apply_frees(f)
    }

    /// Syncs the file: whatever was written before is durable.
    pub fn sync(&mut self, f: &HostFile) -> Result<(), Error> {
        f.sync()?;
        self.unsynced = false;
        self.owed.l2_after_data = 0;
        if !self.rc_blocks.has_dirty()
            && self.rc_entries_owed.is_empty()
            && self.rc_table_new.is_none()
        {
            self.owed.l2_after_refcounts = 0;
        }
        Ok(())
    }

    /// Writes the dirty refcount blocks (always allowed, see the module doc), then, if the
    /// refcount table grew, writes the new table, syncs and switches the header to it
    /// (synced), as a write-back does (`Copies::write`); else, if new blocks' refcount table
    /// entries are owed, syncs and writes those entries. Under the lock: for the close path,
    /// checks, snapshots and resizing (a cache at its overdraft during one of them too).
    pub fn write_refcount_blocks(&mut self, f: &HostFile) -> Result<(), Error> {
        for off in self.rc_blocks.dirty() {
            self.write_rc_block(f, off)?;
        }
        if let Some(place) = self.rc_table_new {
            self.write_rc_table(f, place.offset)?;
            self.sync(f)?;
            self.unsynced = true;
            self.written
                .locked(TableAt::RefcountTable, || place.write_to_header(f))?;
            self.sync(f)?;
            // The table holds every owed entry.
            self.rc_entries_owed.clear();
            self.rc_table_switched(place);
            return Ok(());
        }
        if self.rc_entries_owed.is_empty() {
            return Ok(());
        }
        self.sync(f)?;
        while let Some(&i) = self.rc_entries_owed.first() {
            let e = self.rc_table.get(i).copied().unwrap_or(0);
            let at = self.header.refcount_table_offset + (i as u64) * 8;
            self.unsynced = true;
            self.written
                .locked(TableAt::RefcountTable, || f.write_at(&e.to_be_bytes(), at))?;
            self.rc_entries_owed.remove(&i);
        }
        Ok(())
    }

    /// Writes the whole refcount table (`rc_table`) at `off`, under the lock: a write-back's
    /// copies of owed entries or of a grown table skip it.
    fn write_rc_table(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        self.unsynced = true;
        self.written.locked(TableAt::RefcountTable, || {
            f.write_at(&encode_words(&self.rc_table), off)
        })
    }

    /// Writes the refcount block at `off` if it is dirty.
    pub fn write_rc_block(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        self.unsynced = true;
        let (blocks, written) = (&mut self.rc_blocks, &self.written);
        written.locked(TableAt::Refcounts(off), || {
            blocks.write_dirty(off, |b| f.write_at(b, off))
        })
    }

    /// Writes the L2 table at `off` if it is dirty, after what L2 tables owe.
    pub fn write_l2(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        if !self.l2.is_dirty(off) {
            return Ok(());
        }
        if self.owed.l2_after_refcounts != 0 {
            self.write_refcount_blocks(f)?;
            self.sync(f)?;
        }
        if self.owed.l2_after_data != 0 {
            self.sync(f)?;
        }
        self.unsynced = true;
        let (l2, written) = (&mut self.l2, &self.written);
        written.locked(TableAt::L2(off), || {
            l2.write_dirty(off, |t| f.write_at(&encode_words(t), off))
        })
    }

    /// Writes L1 entry `i`, after what L1 entries owe.
    fn write_l1_entry(&mut self, f: &HostFile, i: usize) -> Result<(), Error> {
        if self.owed.l1_after_l2 != 0 {
            for off in self.l2.dirty() {
                self.write_l2(f, off)?;
            }
            self.sync(f)?;
            self.owed.l1_after_l2 = 0;
        }
        let at = self.header.l1_table_offset + (i as u64) * 8;
        self.unsynced = true;
        f.write_at(&self.l1[i].to_be_bytes(), at)?;
        self.l1_dirty.remove(&i);
        Ok(())
    }

    /// Lowers the refcounts queued in `pending_frees`; the caller has written every table that
    /// dropped them, and this makes those writes durable first.
    fn apply_frees(&mut self, f: &HostFile) -> Result<(), Error> {
        if self.pending_frees.is_empty() {
            return Ok(());
        }
        if self.unsynced {
            self.sync(f)?;
        }
        while let Some(&(off, unmapped)) = self.pending_frees.last() {
            self.free_unmapped(f, off, unmapped)?;
            self.pending_frees.pop();
        }
        self.note_waiting();
        Ok(())
    }

    /// Whether any metadata waits to be written.
    pub fn has_dirty(&self) -> bool {
        self.l2.has_dirty()
            || self.rc_blocks.has_dirty()
            || !self.l1_dirty.is_empty()
            || !self.pending_frees.is_empty()
            || self.rc_table_new.is_some()
    }
}
