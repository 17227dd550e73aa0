//! Refcounts (spec "Cluster refcounts"): a refcount table of block offsets, each refcount block a
//! cluster of `2^refcount_order`-bit big-endian counters, one per host cluster. Reading,
//! changing, allocating (first free cluster from a hint), freeing, and growing the table.
//!
//! New refcount blocks cover themselves and are made in the cache: the write-back that writes
//! one syncs it before writing its table entry (`Meta::rc_entries_owed`), and that entry is
//! durable before any L2 table, since allocations owe their refcounts to L2 tables. A table that
//! must grow moves to the end of the file in one area with the blocks it needs, built in memory
//! under the lock (`Meta::rc_table_new`); the next write-back writes the blocks and the table,
//! syncs, points the header at it (one write) and syncs, before any L2 table, and
//! the old table is freed only once that switch is durable. A failed step leaves memory as the
//! disk has it (at worst leaking the clusters it claimed).
//!
//! A cluster whose refcount drops to zero goes to the [`Quarantine`] until every request that
//! could have looked it up before its release has ended (`direct::Epochs`): a late write by such
//! a request must never land in the cluster's next owner.

use std::collections::{HashSet, VecDeque};

use super::meta::Meta;
use super::validate::FormatError;
use crate::file::HostFile;
use crate::Error;

/// Refcount table entry bits 9..=63 are the block offset; 0..=8 are reserved (spec).
const RT_RESERVED: u64 = 0x1ff;

/// Where a refcount table lies, as the header names it (bytes 48-59: offset, then length in
/// clusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablePlace {
    pub offset: u64,
    pub clusters: u32,
}

impl TablePlace {
    /// Points the header at this table (one write inside the first sector), not synced.
    pub fn write_to_header(self, f: &HostFile) -> Result<(), Error> {
        let mut hdr = self.offset.to_be_bytes().to_vec();
        hdr.extend_from_slice(&self.clusters.to_be_bytes());
        f.write_at(&hdr, 48)
    }
}

/// Reads entry `i` of a refcount block of `2^order`-bit entries.
pub fn get_entry(b: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        // i < entries per block, so the index is within the cluster-sized block.
        let at = usize::try_from(i).unwrap_or(0) * bytes;
        b[at..at + bytes]
            .iter()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    } else {
        let bit = i * bits;
        let byte = b[usize::try_from(bit / 8).unwrap_or(0)];
        // Spec: sub-byte refcounts are packed from the least significant bit.
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Writes entry `i` of a refcount block; `v` must fit in the width.
pub fn set_entry(b: &mut [u8], order: u32, i: u64, v: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = usize::try_from(i).unwrap_or(0) * bytes;
        for (k, byte) in b[at..at + bytes].iter_mut().enumerate() {
            let shift = 8 * (bytes - 1 - k);
            *byte = u8::try_from((v >> shift) & 0xff).unwrap_or(0);
        }
    } else {
        let bit = i * bits;
        let at = usize::try_from(bit / 8).unwrap_or(0);
        let mask = u8::try_from(((1u64 << bits) - 1) << (bit % 8)).unwrap_or(0);
        let val = u8::try_from((v << (bit % 8)) & u64::from(mask)).unwrap_or(0);
        b[at] = (b[at] & !mask) | val;
    }
}

/// Freed clusters not yet reusable, each with the epoch it was unmapped in (when the last table
/// entry a request could look it up by changed).
#[derive(Debug, Default)]
pub struct Quarantine {
    /// (epoch, cluster index), epochs ascending.
    queue: VecDeque<(u64, u64)>,
    /// The same clusters, for the allocator's look-up.
    held: HashSet<u64>,
}

impl Quarantine {
    /// Holds cluster `c`, unmapped in epoch `unmapped`. A later epoch only holds it longer, so a
    /// cluster unmapped before the last one queued is counted from that one's.
    fn hold(&mut self, c: u64, unmapped: u64) {
        if self.held.insert(c) {
            let epoch = self
                .queue
                .back()
                .map_or(unmapped, |&(e, _)| e.max(unmapped));
            self.queue.push_back((epoch, c));
        }
    }

    /// Whether no cluster is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether cluster `c` is held.
    pub fn contains(&self, c: u64) -> bool {
        self.held.contains(&c)
    }

    /// Releases the clusters no request can reach any more, moving the epoch on as far as the
    /// requests in flight allow (two steps release everything when none is), and counts the
    /// release in the epochs' reuses; returns the lowest released.
    fn release(&mut self, epochs: &crate::direct::Epochs) -> Option<u64> {
        if self.queue.is_empty() {
            return None;
        }
        epochs.advance();
        epochs.advance();
        let mut lowest = None;
        while let Some(&(epoch, c)) = self.queue.front() {
            if !epochs.is_past(epoch) {
                break;
            }
            self.queue.pop_front();
            self.held.remove(&c);
            lowest = Some(lowest.map_or(c, |l: u64| l.min(c)));
        }
        if lowest.is_some() {
            epochs.note_reuse();
        }
        lowest
    }
}

impl Meta {
    /// Refcount entries per block.
    pub fn rc_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.header.refcount_order
    }

    /// Largest refcount value.
    pub fn rc_max(&self) -> u64 {
        let bits = 1u64 << self.header.refcount_order;
        if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        }
    }

    fn rc_err(f: &HostFile, source: FormatError) -> Error {
        Error::Format {
            path: f.path().to_string(),
            source,
        }
    }

    /// The offset of the refcount block covering cluster `c`, 0 when it has none.
    fn rc_block_offset(&self, f: &HostFile, c: u64) -> Result<u64, Error> {
        let bi = c / self.rc_per_block();
        let Some(&e) = usize::try_from(bi).ok().and_then(|i| self.rc_table.get(i)) else {
            return Ok(0);
        };
        if e & RT_RESERVED != 0 || e % self.cs() != 0 {
            return Err(Self::rc_err(
                f,
                FormatError::BadRefcountEntry {
                    index: bi,
                    entry: e,
                },
            ));
        }
        if e != 0 && e < self.cs() {
            return Err(Self::rc_err(f, FormatError::PointsAtHeader(e)));
        }
        Ok(e)
    }

    fn load_rc_block(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        if self.rc_blocks.get(off).is_some() {
            return Ok(());
        }
        self.make_room_rc(f)?;
        let mut b = vec![0u8; usize::try_from(self.cs()).unwrap_or(0)];
        f.read_at(&mut b, off)?;
        self.rc_blocks.insert(off, b);
        Ok(())
    }

    /// The refcount of host cluster index `c`.
    pub fn refcount(&mut self, f: &HostFile, c: u64) -> Result<u64, Error> {
        let off = self.rc_block_offset(f, c)?;
        if off == 0 {
            return Ok(0);
        }
        self.load_rc_block(f, off)?;
        let order = self.header.refcount_order;
        let i = c % self.rc_per_block();
        Ok(self
            .rc_blocks
            .get(off)
            .map_or(0, |b| get_entry(b, order, i)))
    }

    /// Sets the refcount of cluster `c`, whose block must exist.
    fn set_refcount_in_block(&mut self, f: &HostFile, c: u64, v: u64) -> Result<bool, Error> {
        let off = self.rc_block_offset(f, c)?;
        if off == 0 {
            return Ok(false);
        }
        self.load_rc_block(f, off)?;
        let order = self.header.refcount_order;
        let i = c % self.rc_per_block();
        if let Some(b) = self.rc_blocks.get(off) {
            set_entry(b, order, i, v);
        }
        self.rc_blocks.mark_dirty(off);
        Ok(true)
    }

    /// Adds one reference to cluster `c` (which must be covered by a block).
    pub fn incref(&mut self, f: &HostFile, c: u64) -> Result<(), Error> {
        let v = self.refcount(f, c)?;
        if v >= self.rc_max() {
            return Err(Self::rc_err(
                f,
                FormatError::RefcountOverflow(c * self.cs()),
            ));
        }
        self.set_refcount_in_block(f, c, v + 1)?;
        Ok(())
    }

    /// Drops one reference to the cluster at host offset `off`, now (the caller has made sure
    /// nothing durable points at it any more), which no table maps any more for lock-free
    /// requests from now on. Either the reference is dropped or, on an error, nothing changed. A
    /// cluster that becomes free is quarantined and punched out of the host file.
    pub fn free_cluster(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        let now = self.epochs.current();
        self.free_unmapped(f, off, now)
    }

    /// `free_cluster` for a cluster whose last mapping a lock-free request could use was
    /// dropped in epoch `unmapped` (see [`Meta::drop_refs`]): only requests that began by then
    /// hold its reuse back.
    pub fn free_unmapped(&mut self, f: &HostFile, off: u64, unmapped: u64) -> Result<(), Error> {
        if !self.may_free(f, off) {
            return Ok(());
        }
        self.drop_ref_unmapped(f, off, unmapped)
    }

    /// [`free_cluster`](Self::free_cluster) without the overlap check, for a reference that
    /// metadata still in use legitimately held (a snapshot's share of an active table).
    pub fn drop_ref(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        let now = self.epochs.current();
        self.drop_ref_unmapped(f, off, now)
    }

    /// Drops one reference to the cluster at `off`, unmapped in epoch `unmapped`; a cluster that
    /// becomes free is quarantined and punched out of the host file.
    fn drop_ref_unmapped(&mut self, f: &HostFile, off: u64, unmapped: u64) -> Result<(), Error> {
        let c = off / self.cs();
        let v = self.refcount(f, c)?;
        if v == 0 {
            return Err(Self::rc_err(f, FormatError::RefcountUnderflow(off)));
        }
        self.set_refcount_in_block(f, c, v - 1)?;
        if v == 1 {
            self.quarantine.hold(c, unmapped);
            self.note_waiting();
            // Only gives the space back: a cluster left unpunched is still free.
            if let Err(e) = f.punch_hole(off, self.cs()) {
                log::warn!("{e}");
            }
        }
        Ok(())
    }

    /// Allocates one cluster with refcount 1 and returns its host offset. The refcount change is
    /// in the cache, and L2 tables now owe it (`meta.rs`).
    pub fn alloc_cluster(&mut self, f: &HostFile) -> Result<u64, Error> {
        let per = self.rc_per_block();
        if let Some(c) = self.quarantine.release(&self.epochs) {
            self.free_hint = self.free_hint.min(c);
        }
        self.note_waiting();
        self.owed.l2_after_refcounts = self.stamp();
        let mut c = self.free_hint.max(1);
        loop {
            let bi = c / per;
            if bi >= self.rc_table.len() as u64 {
                self.grow_table(f, c)?;
                continue;
            }
            if self.rc_block_offset(f, c)? == 0 {
                // A range without a block: the block goes in its own first free cluster, `c`.
                self.new_block_at(f, c)?;
                c += 1;
                continue;
            }
            if self.refcount(f, c)? == 0 && !self.quarantine.contains(c) {
                self.set_refcount_in_block(f, c, 1)?;
                self.free_hint = c + 1;
                self.end = self.end.max(c + 1);
                return Ok(c * self.cs());
            }
            c += 1;
        }
    }

    /// Tells the epochs whether clusters wait for them to move on (held, or queued to be freed
    /// once a flush makes their release durable), so that ending pins move them on meanwhile.
    pub fn note_waiting(&self) {
        self.epochs
            .set_waiting(!self.quarantine.is_empty() || !self.pending_frees.is_empty());
    }

    /// Creates the refcount block for the range holding cluster `c`, stored at `c` itself, in
    /// the cache only: the next write-back writes it, and its refcount table entry once it is
    /// durable (`rc_entries_owed`), before any L2 table that points into its range (which owes
    /// its refcounts). Nothing is written or synced here, under the lock.
    fn new_block_at(&mut self, f: &HostFile, c: u64) -> Result<(), Error> {
        let cs = self.cs();
        let off = c * cs;
        let mut b = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        set_entry(
            &mut b,
            self.header.refcount_order,
            c % self.rc_per_block(),
            1,
        );
        // The caller made the table cover `c`.
        let idx = usize::try_from(c / self.rc_per_block()).unwrap_or(usize::MAX);
        self.rc_blocks.remove(off);
        self.make_room_rc(f)?;
        self.rc_blocks.insert(off, b);
        self.rc_blocks.mark_dirty(off);
        self.rc_table[idx] = off;
        self.rc_entries_owed.insert(idx);
        self.note_refcounts_moved();
        self.end = self.end.max(c + 1);
        Ok(())
    }

    /// Grows the refcount table so that cluster `c` is covered, in memory only: a larger table
    /// placed at the end of the file with new blocks for every range its area needs, the area's
    /// refcounts raised. The header keeps naming the old table until a write-back has made the
    /// new blocks and the new table durable and switched it (`Copies::write`,
    /// [`Meta::write_refcount_blocks`]); the old table is freed only once that switch is
    /// durable ([`Meta::rc_table_switched`]). Nothing is written or synced here, under the lock
    /// (unless a check, snapshot or resize fills the cache to its overdraft).
    fn grow_table(&mut self, f: &HostFile, c: u64) -> Result<(), Error> {
        let cs = self.cs();
        let per = self.rc_per_block();
        let start = self.end.max(c);
        let old_len = self.rc_table.len() as u64;
        // Fixed point: the table and the new blocks must cover the area they occupy.
        let mut entries = (old_len * 2).max(c / per + 1);
        let (table_clusters, new_blocks) = loop {
            let tc = (entries * 8).div_ceil(cs);
            let mut nb = 0;
            loop {
                let area_end = start + tc + nb;
                let need = (old_len..area_end.div_ceil(per)).count() as u64;
                if need == nb {
                    break;
                }
                nb = need;
            }
            let area_end = start + tc + nb;
            if area_end.div_ceil(per) <= entries {
                break (tc, nb);
            }
            entries = area_end.div_ceil(per) * 2;
        };
        let too_large = || Error::TooLarge {
            path: f.path().to_string(),
            what: "refcount table",
            bytes: table_clusters * cs,
        };
        if table_clusters * cs > super::validate::MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        let place = TablePlace {
            offset: start * cs,
            clusters: u32::try_from(table_clusters).map_err(|_| too_large())?,
        };
        let mut table = self.rc_table.clone();
        table.resize(usize::try_from(table_clusters * cs / 8).unwrap_or(0), 0);
        // New blocks for ranges old_len.. , placed after the table.
        let first_block = start + table_clusters;
        for k in 0..new_blocks {
            let idx = usize::try_from(old_len + k).unwrap_or(usize::MAX);
            table[idx] = (first_block + k) * cs;
        }
        let old_table = std::mem::replace(&mut self.rc_table, table);
        let superseded = self.rc_table_new.replace(place);
        let area = start..first_block + new_blocks;
        // Whatever happens next, nothing is allocated in the area.
        self.end = self.end.max(area.end);
        if let Err(e) = self.fill_new_area(f, area, first_block) {
            // The area's refcounts raised in old blocks leak; the new blocks are forgotten.
            for k in 0..new_blocks {
                self.rc_blocks.remove((first_block + k) * cs);
            }
            self.rc_table = old_table;
            self.rc_table_new = superseded;
            self.note_refcounts_moved();
            return Err(e);
        }
        // A table built earlier and not switched to yet: a write-back may be writing it and
        // switch the header to it, so it is freed only after a later switch.
        self.rc_tables_unused.extend(superseded);
        self.note_refcounts_moved();
        Ok(())
    }

    /// Puts the new blocks of a growing table's area (from `first_block`) in the cache, dirty
    /// and empty, and raises the refcount of every cluster of the area (the table and the
    /// blocks), in the cache only.
    fn fill_new_area(
        &mut self,
        f: &HostFile,
        area: std::ops::Range<u64>,
        first_block: u64,
    ) -> Result<(), Error> {
        let cs = self.cs();
        for off in (first_block..area.end).map(|b| b * cs) {
            self.rc_blocks.remove(off);
            self.make_room_rc(f)?;
            self.rc_blocks
                .insert(off, vec![0u8; usize::try_from(cs).unwrap_or(0)]);
            self.rc_blocks.mark_dirty(off);
        }
        for cl in area {
            self.incref(f, cl)?;
        }
        Ok(())
    }

    /// Records that the header now durably names the refcount table at `place` (a write-back
    /// wrote the table, synced, switched the header and synced again): the table the header
    /// named before and the tables built since and given up are queued to be freed (their
    /// refcounts drop with the next flush's; no write-back can still write them by then).
    pub fn rc_table_switched(&mut self, place: TablePlace) {
        let h = &mut self.header;
        let old = TablePlace {
            offset: h.refcount_table_offset,
            clusters: h.refcount_table_clusters,
        };
        h.refcount_table_offset = place.offset;
        h.refcount_table_clusters = place.clusters;
        if self.rc_table_new == Some(place) {
            self.rc_table_new = None;
        }
        let mut unused = std::mem::take(&mut self.rc_tables_unused);
        unused.push(old);
        let cs = self.cs();
        let freed: Vec<u64> = unused
            .into_iter()
            .filter(|&t| t != place)
            .flat_map(|t| (0..u64::from(t.clusters)).map(move |k| t.offset + k * cs))
            .collect();
        // Out of the overlap index before they are freed.
        self.note_refcounts_moved();
        self.drop_refs(freed);
    }

    /// Makes room for one more refcount block as `make_room_l2` does for L2 tables (writing a
    /// block is always allowed, see `meta.rs`).
    fn make_room_rc(&mut self, f: &HostFile) -> Result<(), Error> {
        if self.room_by_writing && self.rc_blocks.at_overdraft() {
            if let Some((victim, true)) = self.rc_blocks.victim() {
                self.write_rc_block(f, victim)?;
            }
        }
        self.rc_blocks.make_room();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let n = 512 * 8 / bits;
            for i in 0..n {
                set_entry(&mut b, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&b, order, i),
                    (i * 7 + 3) & max,
                    "order {order} i {i}"
                );
            }
        }
        // Sub-byte widths pack from the least significant bit.
        let mut b = vec![0u8; 1];
        set_entry(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
    }
}
