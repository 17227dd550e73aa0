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
//! their release is durable.

use super::header::Header;
use std::collections::BTreeMap;

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
/// (steps in the module documentation); nothing when the width is already that.
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
    let cs = 1u64 << old.cluster_bits;
    let file_len = f.len()?;
    let (counts, past_end, old_clusters) = read_refcounts(f, &old, file_len)?;
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    };
    let too_high = counts
        .iter()
        .enumerate()
        .map(|(c, &v)| (c as u64, v))
        .chain(past_end.iter().map(|(&c, &v)| (c, v)))
        .find(|&(_, v)| v > max);
    if let Some((c, v)) = too_high {
        return Err(refuse(RefcountWidthError::TooNarrow {
            bits: 1 << order,
            offset: c * cs,
            refcount: v,
        }));
    }
    // The new table, then the new blocks, past the end of the file; they cover every cluster
    // up to their own end (a fixed point: more blocks may need a longer table).
    // (A cluster past the end of the file may have a reference: the new ones go after it.)
    let start = past_end
        .keys()
        .next_back()
        .map_or(0, |&c| c + 1)
        .max(file_len.div_ceil(cs));
    let per = (cs * 8) >> order;
    let (mut tc, mut nb) = (0u64, 0u64);
    loop {
        let nb2 = (start + tc + nb).div_ceil(per);
        let tc2 = (nb2 * 8).div_ceil(cs);
        if (tc2, nb2) == (tc, nb) {
            break;
        }
        (tc, nb) = (tc2, nb2);
    }
    if tc * cs > MAX_REFTABLE_BYTES {
        return Err(Error::TooLarge {
            path: f.path().to_string(),
            what: "refcount table",
            bytes: tc * cs,
        });
    }
    let block_len = usize::try_from(cs).unwrap_or(0);
    let first_block = start + tc;
    let mut blocks = vec![vec![0u8; block_len]; usize::try_from(nb).unwrap_or(0)];
    let count_of = |c: u64| {
        if (start..first_block + nb).contains(&c) {
            1
        } else {
            usize::try_from(c)
                .ok()
                .and_then(|i| counts.get(i))
                .or_else(|| past_end.get(&c))
                .copied()
                .unwrap_or(0)
        }
    };
    for (b, block) in blocks.iter_mut().enumerate() {
        let base = b as u64 * per;
        for i in 0..per {
            let v = count_of(base + i);
            if v != 0 {
                set_entry(block, order, i, v);
            }
        }
    }
    let mut table: Vec<u64> = (first_block..first_block + nb).map(|c| c * cs).collect();
    table.resize(usize::try_from(tc * cs / 8).unwrap_or(0), 0);
    f.write_at(&encode_words(&table), start * cs)?;
    for (b, block) in blocks.iter().enumerate() {
        f.write_at(block, (first_block + b as u64) * cs)?;
    }
    f.sync()?;
    let mut new = old.clone();
    new.refcount_order = order;
    new.refcount_table_offset = start * cs;
    new.refcount_table_clusters = u32::try_from(tc).map_err(|_| Error::TooLarge {
        path: f.path().to_string(),
        what: "refcount table",
        bytes: tc * cs,
    })?;
    let b = new.encode().map_err(|e| fmt_err(f, e))?;
    // Bytes 48-59 (table offset and clusters) and 96-99 (order): one write in the first sector.
    f.write_at(&b[48..100], 48)?;
    f.sync()?;
    // The old table and blocks are unreferenced now.
    let mut touched = Vec::new();
    for c in old_clusters {
        let b = usize::try_from(c / per).unwrap_or(usize::MAX);
        if let Some(block) = blocks.get_mut(b) {
            set_entry(block, order, c % per, 0);
            touched.push(b);
        }
    }
    touched.sort_unstable();
    touched.dedup();
    for b in touched {
        f.write_at(&blocks[b], (first_block + b as u64) * cs)?;
    }
    f.sync()
}

/// Refcounts read from the image: those of the clusters inside the file (index: cluster), the
/// nonzero ones past its end, and the clusters of the refcount table and blocks themselves.
type Refcounts = (Vec<u64>, BTreeMap<u64, u64>, Vec<u64>);

/// Every cluster's refcount (see [`Refcounts`]).
fn read_refcounts(f: &HostFile, h: &Header, file_len: u64) -> Result<Refcounts, Error> {
    let cs = 1u64 << h.cluster_bits;
    let per = (cs * 8) >> h.refcount_order;
    let table = read_table(
        f,
        file_len,
        "refcount table",
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs / 8,
    )?;
    let t0 = h.refcount_table_offset / cs;
    let mut own: Vec<u64> = (t0..t0 + u64::from(h.refcount_table_clusters)).collect();
    let clusters = usize::try_from(file_len.div_ceil(cs)).unwrap_or(usize::MAX);
    let mut counts = vec![0u64; clusters];
    let mut past_end = BTreeMap::new();
    let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
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
        f.read_at(&mut block, off)?;
        own.push(off / cs);
        let base = bi as u64 * per;
        for i in 0..per {
            let v = get_entry(&block, h.refcount_order, i);
            if v != 0 {
                let c = base + i;
                match usize::try_from(c).ok().and_then(|c| counts.get_mut(c)) {
                    Some(slot) => *slot = v,
                    None => {
                        past_end.insert(c, v);
                    }
                }
            }
        }
    }
    Ok((counts, past_end, own))
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
