//! A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by host offset, with
//! least-recently-used eviction and dirty tracking. The owner decides what writing back a dirty
//! table needs first (see `meta.rs`); this file only keeps the tables, and a table turns clean
//! only through [`TableCache::write_dirty`], once its write succeeded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tables a full cache may hold beyond its size while its dirty ones wait for a write-back
/// outside the metadata lock (`meta.rs`); a request that finds a cache this far over waits for
/// a write-back before changing anything (`Qcow2::lock_with_room`), so memory stays bounded
/// whatever the requests in flight, and nothing is written under the lock to make room.
pub(super) const OVERDRAFT: usize = 16;

/// One cached table.
#[derive(Debug)]
struct Slot<T> {
    table: T,
    dirty: bool,
    /// Changes with every insertion and every `mark_dirty` (from `changes`): a copy taken at
    /// one version is the table as long as the version stays.
    version: u64,
    /// Last use, from `tick`: atomic so that lookups under a shared lock can record it.
    used: AtomicU64,
}

/// A bounded table cache.
#[derive(Debug)]
pub struct TableCache<T> {
    cap: usize,
    tick: AtomicU64,
    /// The last version handed out.
    changes: u64,
    slots: HashMap<u64, Slot<T>>,
}

impl<T> TableCache<T> {
    /// A cache holding at most `cap` tables (at least one).
    pub fn new(cap: usize) -> TableCache<T> {
        TableCache {
            cap: cap.max(1),
            tick: AtomicU64::new(0),
            changes: 0,
            slots: HashMap::new(),
        }
    }

    /// The table at `offset`, if cached; marks it recently used.
    pub fn get(&mut self, offset: u64) -> Option<&mut T> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        self.slots.get_mut(&offset).map(|s| {
            *s.used.get_mut() = tick;
            &mut s.table
        })
    }

    /// The table at `offset`, if cached, for a reader holding the owner's lock shared; marks it
    /// recently used (relaxed: LRU order is a hint).
    pub fn peek(&self, offset: u64) -> Option<&T> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        self.slots.get(&offset).map(|s| {
            s.used.store(tick, Ordering::Relaxed);
            &s.table
        })
    }

    /// How many tables the cache holds.
    #[cfg(test)]
    pub fn tables(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cache is full (the caller must evict before inserting).
    pub fn full(&self) -> bool {
        self.slots.len() >= self.cap
    }

    /// Whether the cache holds more tables than its size (dirty ones waiting for a write-back).
    pub fn over_size(&self) -> bool {
        self.slots.len() > self.cap
    }

    /// Whether the cache holds its size and its whole overdraft: requests wait for a
    /// write-back before adding to it.
    pub fn at_overdraft(&self) -> bool {
        self.slots.len() >= self.cap + OVERDRAFT
    }

    /// The least recently used table's offset and whether it is dirty.
    pub fn victim(&self) -> Option<(u64, bool)> {
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
            .map(|(&o, s)| (o, s.dirty))
    }

    /// Makes room for one more table in a full cache by dropping the least recently used one
    /// if it is clean; if it is dirty, the cache goes over its size until a write-back
    /// (nothing is written here).
    pub fn make_room(&mut self) {
        if let Some((victim, false)) = self.victim().filter(|_| self.full()) {
            self.slots.remove(&victim);
        }
    }

    /// Drops least recently used clean tables until the cache is within its size; returns
    /// whether it is (false when the tables over its size are dirty).
    pub fn trim(&mut self) -> bool {
        while self.slots.len() > self.cap {
            let clean = self
                .slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                .map(|(&o, _)| o);
            match clean {
                Some(o) => {
                    self.slots.remove(&o);
                }
                None => return false,
            }
        }
        true
    }

    /// Removes a table.
    pub fn remove(&mut self, offset: u64) -> Option<T> {
        self.slots.remove(&offset).map(|s| s.table)
    }

    /// Inserts a table (clean).
    pub fn insert(&mut self, offset: u64, table: T) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        self.changes += 1;
        self.slots.insert(
            offset,
            Slot {
                table,
                dirty: false,
                version: self.changes,
                used: AtomicU64::new(tick),
            },
        );
    }

    /// Marks a cached table dirty.
    pub fn mark_dirty(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            self.changes += 1;
            s.dirty = true;
            s.version = self.changes;
        }
    }

    /// Whether the table at `offset` is cached and dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        self.slots.get(&offset).is_some_and(|s| s.dirty)
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// Offsets of the dirty tables, ascending.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Writes the table at `offset` with `write` if it is dirty, and marks it clean only when
    /// `write` succeeded: a failed write leaves it owed.
    pub fn write_dirty<E>(
        &mut self,
        offset: u64,
        write: impl FnOnce(&T) -> Result<(), E>,
    ) -> Result<(), E> {
        match self.slots.get_mut(&offset) {
            Some(s) if s.dirty => {
                write(&s.table)?;
                s.dirty = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Copies of the dirty tables, ascending by offset: (offset, table, version).
    pub fn copy_dirty(&self) -> Vec<(u64, T, u64)>
    where
        T: Clone,
    {
        let mut v: Vec<(u64, T, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, s)| (o, s.table.clone(), s.version))
            .collect();
        v.sort_unstable_by_key(|c| c.0);
        v
    }

    /// Marks the table at `offset` clean if it is still at `version`: a copy taken at that
    /// version was written (a table changed since stays dirty).
    pub fn mark_clean(&mut self, offset: u64, version: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            if s.version == version {
                s.dirty = false;
            }
        }
    }

    /// Drops every table (after their offsets changed meaning, e.g. a refcount rebuild).
    pub fn clear(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_tracks_dirt() {
        let mut c = TableCache::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        assert!(c.full());
        assert!(c.get(1).is_some());
        assert_eq!(c.victim(), Some((2, false)));
        c.mark_dirty(1);
        assert_eq!(c.dirty(), vec![1]);
        assert!(c.has_dirty());
        // A failed write leaves the table dirty; a successful one cleans it.
        assert_eq!(c.write_dirty(1, |_| Err("EIO")), Err("EIO"));
        assert_eq!(c.dirty(), vec![1]);
        let mut written = None;
        c.write_dirty(1, |t| {
            written = Some(*t);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(written, Some("a"));
        assert!(c.dirty().is_empty() && !c.has_dirty());
        // Clean tables are not written again.
        c.write_dirty(1, |_| Err("written twice")).unwrap();
        assert_eq!(c.remove(2), Some("b"));
        assert!(!c.full());
        // Room is made by dropping the least recently used table if clean, never a dirty one.
        c.insert(2, "b");
        assert!(c.get(1).is_some());
        c.make_room();
        assert!(c.get(1).is_some() && c.get(2).is_none());
        c.mark_dirty(1);
        c.insert(2, "b");
        c.make_room();
        assert!(c.get(1).is_some() && c.get(2).is_some());
    }

    #[test]
    fn a_copy_cleans_its_table_only_while_the_table_is_unchanged() {
        let mut c = TableCache::new(4);
        c.insert(1, 10);
        c.insert(2, 20);
        c.mark_dirty(1);
        c.mark_dirty(2);
        let copies = c.copy_dirty();
        assert_eq!(
            copies.iter().map(|&(o, t, _)| (o, t)).collect::<Vec<_>>(),
            vec![(1, 10), (2, 20)]
        );
        // Table 2 changes after the copy: writing the copy does not make it clean.
        *c.get(2).unwrap() = 21;
        c.mark_dirty(2);
        for &(o, _, v) in &copies {
            c.mark_clean(o, v);
        }
        assert_eq!(c.dirty(), vec![2]);
        // Removed and inserted again, a table starts at a new version.
        c.remove(1);
        c.insert(1, 11);
        c.mark_dirty(1);
        c.mark_clean(1, copies[0].2);
        assert_eq!(c.dirty(), vec![1, 2]);
    }

    #[test]
    fn trimming_drops_only_clean_tables() {
        let mut c = TableCache::new(1);
        c.insert(1, 10);
        c.mark_dirty(1);
        c.insert(2, 20);
        c.insert(3, 30);
        c.mark_dirty(3);
        assert!(c.over_size() && !c.at_overdraft());
        // Table 2 goes; the dirty ones stay, over the size, until written.
        assert!(!c.trim());
        assert_eq!(c.dirty(), vec![1, 3]);
        assert!(c.get(2).is_none());
        c.write_dirty(1, |_| Ok::<(), ()>(())).unwrap();
        assert!(c.trim());
        assert!(c.get(1).is_none() && c.get(3).is_some());
        for o in 10..10 + OVERDRAFT as u64 {
            c.insert(o, 0);
        }
        assert!(c.at_overdraft());
    }
}
