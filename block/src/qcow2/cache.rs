//! A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by host offset, with
//! least-recently-used eviction and dirty tracking. The owner decides what writing back a dirty
//! table needs first (see `meta.rs`); this file only keeps the tables, and a table turns clean
//! only through [`TableCache::write_dirty`], once its write succeeded.

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
    }
}
