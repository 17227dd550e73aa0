//! Changing the refcount width of a qcow2 image held alone (`vmm-img amend -o refcount_bits=N`),
//! as QEMU's `qcow2_change_refcount_order` does: the refcounts are copied into a new refcount
//! table and new blocks of the new width, and the header switches to them.
//!
//! The image must be clean (the caller repairs a dirty one first). Power-cut order: the new
//! table and blocks are written past the end of the file, covering every cluster in use and
//! themselves (the old table and blocks still counted), and synced; the header's refcount
//! table offset, its length and the refcount order, all inside its first sector, are written
//! in one write and synced; only then are the old table and blocks given refcount 0 in the new
//! blocks, written and synced. A cut before the switch leaves the old image (the new clusters
//! past its end unreferenced: leaks); after it, the new one, the old structures leaked until
//! their release is durable. Their space is punched out of the file last.
//!
//! Before a version 3 image without a backing file goes to version 2, its unallocated zero
//! clusters become plain unallocated entries (`unallocate_zero_clusters`), which read as zeroes
//! all the same: every state a power cut can leave reads as the image did.

use super::header::Header;
use super::l2::{COMPRESSED, OFFSET_MASK, ZERO};
use super::meta::encode_words;
use super::refcount::{get_entry, set_entry};
use super::validate::MAX_REFTABLE_BYTES;
use super::{fmt_err, read_header, read_table, FormatError};
use crate::file::HostFile;
use crate::Error;

/// Why a refcount width cannot be set.
#[derive(Debug, thiserror::Error)]
pub enum RefcountWidthError {
    /// Not a power of two from 1 to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    Width,
    /// A v2 image, whose refcounts are 16 bits wide.
    #[error(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
    )]
    Version,
    /// A cluster whose refcount the new width cannot hold.
    #[error("Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} has a refcount of {refcount}")]
    TooNarrow {
        /// The width asked for.
        bits: u64,
        /// The cluster's offset in the file.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
}

/// The refcount order (log2 of the width) for `bits`, checked as QEMU checks it.
pub fn refcount_order(bits: u64) -> Result<u32, RefcountWidthError> {
    if bits == 0 || bits > 64 || !bits.is_power_of_two() {
        return Err(RefcountWidthError::Width);
    }
    Ok(bits.trailing_zeros())
}

/// Rewrites the refcount structures of the clean qcow2 image in `f` with `2^order`-bit entries
/// (steps in the module documentation); nothing when the width is already that. One block of
/// each width is in memory at a time.
pub fn set_refcount_order(f: &HostFile, order: u32) -> Result<(), Error> {
    let old = read_header(f)?;
    if old.refcount_order == order {
        return Ok(());
    }
    let refuse = |e: RefcountWidthError| Error::RefcountWidth {
        path: f.path().to_string(),
        source: e,
    };
    if old.version < 3 {
        return Err(refuse(RefcountWidthError::Version));
    }
    let cs = old.cluster_size();
    let file_len = f.len()?;
    let mut reader = OldRefcounts::open(f, &old, file_len)?;
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    };
    // Every refcount checked against the new width; the last cluster in use found (one past
    // the end of the file may have a reference: the new structures go after it).
    let mut end = file_len.div_ceil(cs);
    for c in reader.covered().into_iter().flatten() {
        let v = reader.get(c)?;
        if v > max {
            return Err(refuse(RefcountWidthError::TooNarrow {
                bits: 1 << order,
                offset: c * cs,
                refcount: v,
            }));
        }
        if v != 0 {
            end = end.max(c + 1);
        }
    }
    // The new table, then the new blocks, from `end` on; they cover every cluster up to their
    // own end (a fixed point: more blocks may need a longer table).
    let per = (cs * 8) >> order;
    let (mut tc, mut nb) = (0u64, 0u64);
    loop {
        let nb2 = (end + tc + nb).div_ceil(per);
        let tc2 = (nb2 * 8).div_ceil(cs);
        if (tc2, nb2) == (tc, nb) {
            break;
        }
        (tc, nb) = (tc2, nb2);
    }
    let too_large = || Error::TooLarge {
        path: f.path().to_string(),
        what: "refcount table",
        bytes: tc * cs,
    };
    if tc * cs > MAX_REFTABLE_BYTES {
        return Err(too_large());
    }
    let first_block = end + tc;
    let new = first_block - tc..first_block + nb;
    let mut table: Vec<u64> = (first_block..first_block + nb).map(|c| c * cs).collect();
    table.resize(usize::try_from(tc * cs / 8).map_err(|_| too_large())?, 0);
    f.write_at(&encode_words(&table), end * cs)?;
    for b in 0..nb {
        let block = reader.new_block(b, order, &new, None)?;
        f.write_at(&block, (first_block + b) * cs)?;
    }
    f.sync()?;
    let mut header = old.clone();
    header.refcount_order = order;
    header.refcount_table_offset = end * cs;
    header.refcount_table_clusters = u32::try_from(tc).map_err(|_| too_large())?;
    let bytes = header.encode().map_err(|e| fmt_err(f, e))?;
    // Bytes 48-59 (table offset and clusters) and 96-99 (order): one write in the first sector.
    f.write_at(&bytes[48..100], 48)?;
    f.sync()?;
    // The old table and blocks are unreferenced now: the new blocks covering them again,
    // without them.
    let mut freed = reader.own.clone();
    freed.sort_unstable();
    let mut touched: Vec<u64> = freed.iter().map(|c| c / per).collect();
    touched.sort_unstable();
    touched.dedup();
    for b in touched.into_iter().filter(|&b| b < nb) {
        let block = reader.new_block(b, order, &new, Some(&freed))?;
        f.write_at(&block, (first_block + b) * cs)?;
    }
    f.sync()?;
    for c in freed {
        // Only gives the space back: a cluster left unpunched is still free.
        if let Err(e) = f.punch_hole(c * cs, cs) {
            log::warn!("{e}");
        }
    }
    Ok(())
}

/// Turns the unallocated zero clusters of the active L2 tables of the qcow2 image in `f`, which
/// must have no backing file, into unallocated entries (no refcount changes: no cluster is
/// referenced or released), and syncs; returns how many. Each table is rewritten in place,
/// whatever its refcount: the snapshots sharing it read zeroes there either way.
pub fn unallocate_zero_clusters(f: &HostFile) -> Result<u64, Error> {
    let h = read_header(f)?;
    let cs = h.cluster_size();
    let file_len = f.len()?;
    let l1 = read_table(
        f,
        file_len,
        "L1 table",
        h.l1_table_offset,
        u64::from(h.l1_size),
    )?;
    let mut changed = 0;
    for (index, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            return Err(fmt_err(
                f,
                FormatError::BadL1Entry {
                    index: index as u64,
                    entry: e,
                },
            ));
        }
        let mut l2 = read_table(f, file_len, "L2 table", off, cs / 8)?;
        let mut dirty = false;
        for w in l2.iter_mut() {
            if *w & COMPRESSED == 0 && *w & OFFSET_MASK == 0 && *w & ZERO != 0 {
                *w = 0;
                dirty = true;
                changed += 1;
            }
        }
        if dirty {
            f.write_at(&encode_words(&l2), off)?;
        }
    }
    f.sync()?;
    Ok(changed)
}

/// The refcounts of the image as its header has them, read one block at a time.
struct OldRefcounts<'a> {
    f: &'a HostFile,
    order: u32,
    cs: u64,
    table: Vec<u64>,
    /// The clusters of the refcount table and blocks themselves.
    own: Vec<u64>,
    /// The block last read: (table index, contents).
    cached: Option<(usize, Vec<u8>)>,
}

impl<'a> OldRefcounts<'a> {
    /// Reads the refcount table of `h` and checks its entries lie inside the file.
    fn open(f: &'a HostFile, h: &Header, file_len: u64) -> Result<OldRefcounts<'a>, Error> {
        let cs = h.cluster_size();
        let table = read_table(
            f,
            file_len,
            "refcount table",
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs / 8,
        )?;
        let t0 = h.refcount_table_offset / cs;
        let mut own: Vec<u64> = (t0..t0 + u64::from(h.refcount_table_clusters)).collect();
        for (bi, &e) in table.iter().enumerate() {
            let off = e & !0x1ff;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|end| end > file_len) {
                return Err(fmt_err(
                    f,
                    FormatError::BadRefcountEntry {
                        index: bi as u64,
                        entry: e,
                    },
                ));
            }
            own.push(off / cs);
        }
        Ok(OldRefcounts {
            f,
            order: h.refcount_order,
            cs,
            table,
            own,
            cached: None,
        })
    }

    /// The clusters that blocks cover (the ranges of the table's empty entries skipped).
    fn covered(&self) -> Vec<std::ops::Range<u64>> {
        let per = self.per();
        self.table
            .iter()
            .enumerate()
            .filter(|&(_, &e)| e & !0x1ff != 0)
            .map(|(bi, _)| bi as u64 * per..(bi as u64 + 1) * per)
            .collect()
    }

    fn per(&self) -> u64 {
        (self.cs * 8) >> self.order
    }

    /// The refcount of cluster `c`.
    fn get(&mut self, c: u64) -> Result<u64, Error> {
        let Ok(bi) = usize::try_from(c / self.per()) else {
            return Ok(0);
        };
        let Some(&e) = self.table.get(bi) else {
            return Ok(0);
        };
        let off = e & !0x1ff;
        if off == 0 {
            return Ok(0);
        }
        if self.cached.as_ref().is_none_or(|(i, _)| *i != bi) {
            let mut b = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
            self.f.read_at(&mut b, off)?;
            self.cached = Some((bi, b));
        }
        Ok(self
            .cached
            .as_ref()
            .map_or(0, |(_, b)| get_entry(b, self.order, c % self.per())))
    }

    /// New block `b` of `2^order`-bit entries: each cluster's refcount, 1 for the clusters of
    /// the new structures (`new`), 0 for those in `freed` (sorted).
    fn new_block(
        &mut self,
        b: u64,
        order: u32,
        new: &std::ops::Range<u64>,
        freed: Option<&[u64]>,
    ) -> Result<Vec<u8>, Error> {
        let per = (self.cs * 8) >> order;
        let mut block = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
        for i in 0..per {
            let c = b * per + i;
            let v = if new.contains(&c) {
                1
            } else if freed.is_some_and(|fr| fr.binary_search(&c).is_ok()) {
                0
            } else {
                self.get(c)?
            };
            if v != 0 {
                set_entry(&mut block, order, i, v);
            }
        }
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn widths_as_qemu_takes_them() {
        assert_eq!(refcount_order(1).unwrap(), 0);
        assert_eq!(refcount_order(64).unwrap(), 6);
        for bad in [0, 3, 128] {
            assert!(refcount_order(bad).is_err(), "{bad}");
        }
    }
}
