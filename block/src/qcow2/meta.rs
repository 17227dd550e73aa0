//! The metadata state of an open qcow2 image, behind the image's one metadata lock: the header,
//! the L1 table, the L2 table cache, the refcount table and block cache, and the clusters waiting
//! to be freed.
//!
//! Write ordering (crash consistency, DESIGN.md): new refcounts reach the disk before the L2
//! tables that rely on them, and L2 tables before the L1 entries that point at them, with a
//! `fdatasync` between each step (`write_back`). Reference drops go the other way: a cluster that
//! loses a reference is queued in `pending_frees` and its refcount is lowered only after the
//! metadata that stopped pointing at it is durable. A dirty refcount block can therefore be
//! written at any time; a dirty L2 table only after the refcounts (so evicting one writes back).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::cache::TableCache;
use super::header::Header;
use super::l2::{Geometry, L1_RESERVED, OFFSET_MASK};
use super::validate::FormatError;
use crate::file::HostFile;
use crate::Error;

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
    /// Cached refcount blocks, raw bytes.
    pub rc_blocks: TableCache<Vec<u8>>,
    /// First cluster index the allocator looks at.
    pub free_hint: u64,
    /// Cluster index past the highest cluster in use or in the file.
    pub end: u64,
    /// Clusters whose refcount drops after the next write-back.
    pub pending_frees: Vec<u64>,
    /// Requests doing I/O without the lock (shared with `Qcow2`), which may still be using a
    /// cluster they looked up before it was freed.
    pub inflight: Arc<AtomicU64>,
    /// Cluster indices freed while such requests may have been running: not reallocated until
    /// a moment with none in flight (so a late write can never land in a cluster's new owner).
    pub quarantine: HashSet<u64>,
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

    fn make_room_l2(&mut self, f: &HostFile) -> Result<(), Error> {
        if !self.l2.full() {
            return Ok(());
        }
        if let Some((victim, dirty)) = self.l2.victim() {
            if dirty {
                self.write_back(f)?;
            }
            self.l2.remove(victim);
        }
        Ok(())
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

    /// Sets the entry words of cluster `guest` in the cached L2 table at `l2` and marks it dirty.
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

    /// Writes every dirty table back in dependency order, with a sync after each step, then
    /// applies the queued reference drops.
    pub fn write_back(&mut self, f: &HostFile) -> Result<(), Error> {
        let any_rc = self.flush_refcount_blocks(f)?;
        let l2_dirty = self.l2.dirty();
        if any_rc && !(l2_dirty.is_empty() && self.l1_dirty.is_empty()) {
            f.sync()?;
        }
        for off in &l2_dirty {
            if let Some(t) = self.l2.take_dirty(*off) {
                let b = encode_words(t);
                f.write_at(&b, *off)?;
            }
        }
        if !l2_dirty.is_empty() && !self.l1_dirty.is_empty() {
            f.sync()?;
        }
        let l1_dirty = std::mem::take(&mut self.l1_dirty);
        for i in &l1_dirty {
            let at = self.header.l1_table_offset + (*i as u64) * 8;
            f.write_at(&self.l1[*i].to_be_bytes(), at)?;
        }
        if !self.pending_frees.is_empty() {
            if !l1_dirty.is_empty() || !l2_dirty.is_empty() {
                f.sync()?;
            }
            for c in std::mem::take(&mut self.pending_frees) {
                self.free_cluster(f, c)?;
            }
        }
        Ok(())
    }

    /// Writes the dirty refcount blocks; returns whether any were written.
    pub fn flush_refcount_blocks(&mut self, f: &HostFile) -> Result<bool, Error> {
        let dirty = self.rc_blocks.dirty();
        for off in &dirty {
            if let Some(b) = self.rc_blocks.take_dirty(*off) {
                f.write_at(b, *off)?;
            }
        }
        Ok(!dirty.is_empty())
    }

    /// Whether any metadata waits to be written.
    pub fn has_dirty(&self) -> bool {
        !self.l2.dirty().is_empty()
            || !self.rc_blocks.dirty().is_empty()
            || !self.l1_dirty.is_empty()
            || !self.pending_frees.is_empty()
    }
}
