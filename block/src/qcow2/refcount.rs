//! Refcounts (spec "Cluster refcounts"): a refcount table of block offsets, each refcount block a
//! cluster of `2^refcount_order`-bit big-endian counters, one per host cluster. Reading,
//! changing, allocating (first free cluster from a hint), freeing, and growing the table.
//!
//! New refcount blocks cover themselves; a table that must grow moves to the end of the file in
//! one area with the blocks it needs, written and synced before the header points at it.

use std::sync::atomic::Ordering;

use super::meta::{encode_words, Meta};
use super::validate::FormatError;
use crate::file::HostFile;
use crate::Error;

/// Refcount table entry bits 9..=63 are the block offset; 0..=8 are reserved (spec).
const RT_RESERVED: u64 = 0x1ff;

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
        if self.rc_blocks.full() {
            if let Some((victim, dirty)) = self.rc_blocks.victim() {
                if dirty {
                    // Always safe to write early (see meta.rs).
                    if let Some(b) = self.rc_blocks.take_dirty(victim) {
                        f.write_at(b, victim)?;
                    }
                }
                self.rc_blocks.remove(victim);
            }
        }
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
    /// nothing durable points at it any more). A cluster that becomes free is punched out of the
    /// host file.
    pub fn free_cluster(&mut self, f: &HostFile, off: u64) -> Result<(), Error> {
        if !self.may_free(f, off) {
            return Ok(());
        }
        let c = off / self.cs();
        let v = self.refcount(f, c)?;
        if v == 0 {
            return Err(Self::rc_err(f, FormatError::RefcountUnderflow(off)));
        }
        self.set_refcount_in_block(f, c, v - 1)?;
        if v == 1 {
            self.quarantine.insert(c);
            f.punch_hole(off, self.cs())?;
        }
        Ok(())
    }

    /// Allocates one cluster with refcount 1 and returns its host offset. The refcount change is
    /// in the cache; `write_back` writes it before anything that points at the cluster.
    pub fn alloc_cluster(&mut self, f: &HostFile) -> Result<u64, Error> {
        let per = self.rc_per_block();
        // No lock-free request in flight: none can still use a freed cluster.
        if !self.quarantine.is_empty() && self.inflight.load(Ordering::SeqCst) == 0 {
            for c in self.quarantine.drain() {
                self.free_hint = self.free_hint.min(c);
            }
        }
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
            if self.refcount(f, c)? == 0 && !self.quarantine.contains(&c) {
                self.set_refcount_in_block(f, c, 1)?;
                self.free_hint = c + 1;
                self.end = self.end.max(c + 1);
                return Ok(c * self.cs());
            }
            c += 1;
        }
    }

    /// Creates the refcount block for the range holding cluster `c`, stored at `c` itself.
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
        f.write_at(&b, off)?;
        f.sync()?;
        let bi = c / self.rc_per_block();
        let idx = usize::try_from(bi).unwrap_or(usize::MAX);
        self.rc_table[idx] = off;
        self.note_refcounts_moved();
        f.write_at(
            &off.to_be_bytes(),
            self.header.refcount_table_offset + bi * 8,
        )?;
        self.end = self.end.max(c + 1);
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the file, with new blocks for every
    /// range the new area needs, so that cluster `c` is covered.
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
        if table_clusters * cs > super::validate::MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge {
                path: f.path().to_string(),
                what: "refcount table",
                bytes: table_clusters * cs,
            });
        }
        let mut table = self.rc_table.clone();
        table.resize(usize::try_from(table_clusters * cs / 8).unwrap_or(0), 0);
        // New blocks for ranges old_len.. , placed after the table.
        let first_block = start + table_clusters;
        for k in 0..new_blocks {
            let idx = usize::try_from(old_len + k).unwrap_or(usize::MAX);
            table[idx] = (first_block + k) * cs;
        }
        // Write out what the cache holds, then swap the table in memory so set_refcount sees it.
        self.flush_refcount_blocks(f)?;
        let old_table = std::mem::replace(&mut self.rc_table, table);
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        for k in 0..new_blocks {
            let off = (first_block + k) * cs;
            self.rc_blocks.remove(off);
            self.make_room_rc()?;
            self.rc_blocks
                .insert(off, vec![0u8; usize::try_from(cs).unwrap_or(0)]);
            self.rc_blocks.mark_dirty(off);
        }
        for cl in start..first_block + new_blocks {
            let v = self.refcount(f, cl)?;
            self.set_refcount_in_block(f, cl, v + 1)?;
        }
        self.flush_refcount_blocks(f)?;
        f.write_at(&encode_words(&self.rc_table), start * cs)?;
        f.sync()?;
        let clusters = u32::try_from(table_clusters).unwrap_or(u32::MAX);
        let mut hdr = (start * cs).to_be_bytes().to_vec();
        hdr.extend_from_slice(&clusters.to_be_bytes());
        if let Err(e) = f.write_at(&hdr, 48).and_then(|()| f.sync()) {
            self.rc_table = old_table;
            return Err(e);
        }
        self.header.refcount_table_offset = start * cs;
        self.header.refcount_table_clusters = clusters;
        self.note_refcounts_moved();
        self.end = self.end.max(first_block + new_blocks);
        for k in 0..old_clusters {
            self.free_cluster(f, old_offset + k * cs)?;
        }
        Ok(())
    }

    fn make_room_rc(&mut self) -> Result<(), Error> {
        // Callers have just flushed every dirty block, so the victim is clean.
        if self.rc_blocks.full() {
            if let Some((victim, _)) = self.rc_blocks.victim() {
                self.rc_blocks.remove(victim);
            }
        }
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
