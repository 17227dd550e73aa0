//! A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by host offset, with
//! least-recently-used eviction and dirty tracking. The owner decides what writing back a dirty
//! table needs first (see `meta.rs`); this file only keeps the tables.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// One cached table.
#[derive(Debug)]
struct Slot<T> {
    table: T,
    dirty: bool,
    /// Last use, from `tick`: atomic so that lookups under a shared lock can record it.
    used: AtomicU64,
}

/// A bounded table cache.
#[derive(Debug)]
pub struct TableCache<T> {
    cap: usize,
    tick: AtomicU64,
    slots: HashMap<u64, Slot<T>>,
}

impl<T> TableCache<T> {
    /// A cache holding at most `cap` tables (at least one).
    pub fn new(cap: usize) -> TableCache<T> {
        TableCache {
            cap: cap.max(1),
            tick: AtomicU64::new(0),
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

    /// Whether the cache is full (the caller must evict before inserting).
    pub fn full(&self) -> bool {
        self.slots.len() >= self.cap
    }

    /// The least recently used table's offset and whether it is dirty.
    pub fn victim(&self) -> Option<(u64, bool)> {
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
            .map(|(&o, s)| (o, s.dirty))
    }

    /// Removes a table.
    pub fn remove(&mut self, offset: u64) -> Option<T> {
        self.slots.remove(&offset).map(|s| s.table)
    }

    /// Inserts a table (clean).
    pub fn insert(&mut self, offset: u64, table: T) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        self.slots.insert(
            offset,
            Slot {
                table,
                dirty: false,
                used: AtomicU64::new(tick),
            },
        );
    }

    /// Marks a cached table dirty.
    pub fn mark_dirty(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = true;
        }
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

    /// A dirty table's contents, and marks it clean (the caller writes it).
    pub fn take_dirty(&mut self, offset: u64) -> Option<&T> {
        self.slots.get_mut(&offset).map(|s| {
            s.dirty = false;
            &s.table
        })
    }

    /// Drops every table (after their offsets changed meaning, e.g. a refcount rebuild).
    pub fn clear(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(c.take_dirty(1).copied(), Some("a"));
        assert!(c.dirty().is_empty());
        assert_eq!(c.remove(2), Some("b"));
        assert!(!c.full());
    }
}
