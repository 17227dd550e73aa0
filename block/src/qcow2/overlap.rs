//! Metadata overlap checks (QEMU's `qcow2_check_metadata_overlap`, in its default "cached"
//! mode) and the end-of-file check of data reads.
//!
//! Before a data write reaches a host cluster (the lock-free in-place path, the fills of
//! copy-on-write and the extents handed to io_uring), its range is classified against every
//! metadata structure an open image tracks: the header (cluster 0), the active L1 table, the
//! refcount table, the refcount blocks, the active L2 tables, the snapshot table and the
//! snapshots' L1 tables. A hit means the metadata is inconsistent (an L2 entry aimed at
//! metadata, or a refcount of zero that let the allocator hand out a metadata cluster): the
//! image is marked corrupt (the header's corrupt bit on disk for v3, as QEMU does; in memory
//! for every version), every later write is refused, and the request fails without writing a
//! byte. The snapshots' L2 tables are not tracked: QEMU's default mode leaves them out too,
//! since finding them means reading every snapshot's L1 table.
//!
//! Cost: the index is a few sorted vectors searched in O(log n) under its own reader-writer
//! lock, taken shared by data writes (never the metadata lock) and exclusively only when
//! metadata moves (a new L2 table, refcount block or refcount table), which happens with the
//! metadata lock held: lock order is metadata, then index.
//!
//! A data cluster past the end of the file would read as zeroes from the host file; the file
//! length last seen is kept here, so a read checks its host range with one atomic load and
//! asks the file system only when the range lies beyond it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::header::INCOMPAT_CORRUPT;
use super::l2::OFFSET_MASK;
use super::meta::Meta;
use super::refcount::TablePlace;
use super::snapshot::SnapshotL1;
use super::validate::FormatError;
use super::Qcow2;
use crate::direct::Extent;
use crate::file::HostFile;
use crate::Error;

/// Offset of the incompatible feature bits in a v3 header (spec "Header", bytes 72-79).
const INCOMPATIBLE_AT: u64 = 72;

/// A metadata structure a data write must never touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// The header cluster.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// An L2 table of the active L1 table.
    ActiveL2,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
}

impl Structure {
    /// QEMU's name for it, as its overlap messages print it.
    pub fn name(self) -> &'static str {
        match self {
            Structure::Header => "qcow2 header",
            Structure::ActiveL1 => "active L1 table",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::ActiveL2 => "active L2 table",
            Structure::SnapshotTable => "snapshot table",
            Structure::InactiveL1 => "inactive L1 table",
        }
    }

    /// Its bit in a check mask.
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// Every structure tracked (QEMU's "cached" mode, its default).
pub const CHECK_CACHED: u32 = Structure::Header.bit()
    | Structure::ActiveL1.bit()
    | Structure::RefcountTable.bit()
    | Structure::RefcountBlock.bit()
    | Structure::ActiveL2.bit()
    | Structure::SnapshotTable.bit()
    | Structure::InactiveL1.bit();

/// Where the metadata lies.
#[derive(Debug, Default)]
struct Index {
    /// Cluster size in bytes.
    cs: u64,
    /// The single-extent structures as `[start, end)` byte ranges (a few: the header, the L1
    /// table, the snapshot table and the refcount tables).
    ranges: Vec<(u64, u64, Structure)>,
    /// Snapshot L1 tables, as sorted, merged `[start, end)` byte ranges.
    inactive_l1: Vec<(u64, u64)>,
    /// Refcount block offsets, sorted.
    rc_blocks: Vec<u64>,
    /// Active L2 table offsets, sorted; one per L1 entry, so a table two entries share (a
    /// corruption) stays listed until both have moved.
    l2: Vec<u64>,
}

/// Whether a sorted list of cluster offsets has one overlapping `[host, end)`.
fn clusters_hit(sorted: &[u64], cs: u64, host: u64, end: u64) -> bool {
    let i = sorted.partition_point(|&o| o.saturating_add(cs) <= host);
    sorted.get(i).is_some_and(|&o| o < end)
}

impl Index {
    /// The first structure in `mask` that `[host, host + len)` overlaps.
    fn find(&self, host: u64, len: u64, mask: u32) -> Option<Structure> {
        let end = host.saturating_add(len);
        let wanted = |s: Structure| mask & s.bit() != 0;
        for &(s0, e0, what) in &self.ranges {
            if wanted(what) && host < e0 && s0 < end {
                return Some(what);
            }
        }
        if wanted(Structure::RefcountBlock) && clusters_hit(&self.rc_blocks, self.cs, host, end) {
            return Some(Structure::RefcountBlock);
        }
        if wanted(Structure::ActiveL2) && clusters_hit(&self.l2, self.cs, host, end) {
            return Some(Structure::ActiveL2);
        }
        if wanted(Structure::InactiveL1) {
            let i = self.inactive_l1.partition_point(|&(_, e)| e <= host);
            if self.inactive_l1.get(i).is_some_and(|&(s, _)| s < end) {
                return Some(Structure::InactiveL1);
            }
        }
        None
    }

    /// Takes the refcount table's place and blocks from the metadata: the table the header
    /// names, and a grown one not switched to yet with those given up before it.
    fn set_refcounts(&mut self, m: &Meta) {
        let h = &m.header;
        self.ranges.retain(|r| r.2 != Structure::RefcountTable);
        let named = TablePlace {
            offset: h.refcount_table_offset,
            clusters: h.refcount_table_clusters,
        };
        let tables = std::iter::once(named)
            .chain(m.rc_table_new)
            .chain(m.rc_tables_unused.iter().copied());
        for t in tables {
            let len = u64::from(t.clusters) * m.cs();
            self.ranges.push((
                t.offset,
                t.offset.saturating_add(len),
                Structure::RefcountTable,
            ));
        }
        self.rc_blocks = m
            .rc_table
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        self.rc_blocks.sort_unstable();
    }
}

/// The overlap index of an open image, its corrupt flag, and the file length last seen; shared
/// by the image and its metadata.
#[derive(Debug, Default)]
pub struct Overlap {
    index: RwLock<Index>,
    /// Set once a check found metadata in a write's way: every later write is refused.
    corrupt: AtomicBool,
    /// The host file's length as last seen, or as the data writes issued will make it (it only
    /// grows while the image is open).
    file_len: AtomicU64,
}

impl Overlap {
    /// An empty index (nothing is checked until [`Overlap::build`]) for a file of `file_len`.
    pub fn new(file_len: u64) -> Overlap {
        Overlap {
            file_len: AtomicU64::new(file_len),
            ..Default::default()
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        // A poisoned index only means a panic elsewhere mid-update; its vectors stay valid.
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes the metadata of `m` (with the snapshot table read from `f`), for a read-write
    /// open.
    pub fn build(&self, f: &HostFile, m: &Meta) -> Result<(), Error> {
        let h = &m.header;
        let cs = m.cs();
        let mut ix = Index {
            cs,
            ranges: vec![
                (0, cs, Structure::Header),
                (
                    h.l1_table_offset,
                    h.l1_table_offset.saturating_add(u64::from(h.l1_size) * 8),
                    Structure::ActiveL1,
                ),
            ],
            ..Default::default()
        };
        if h.nb_snapshots > 0 {
            let (snaps, len) = super::snapshot::read_table(f, h)?;
            ix.ranges.push((
                h.snapshots_offset,
                h.snapshots_offset.saturating_add(len),
                Structure::SnapshotTable,
            ));
            ix.inactive_l1 = merged_l1_ranges(&snaps);
        }
        ix.set_refcounts(m);
        ix.l2 =
            m.l1.iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .collect();
        ix.l2.sort_unstable();
        *self.write() = ix;
        Ok(())
    }

    /// The first structure in `mask` that `[host, host + len)` overlaps.
    pub fn find(&self, host: u64, len: u64, mask: u32) -> Option<Structure> {
        self.read().find(host, len, mask)
    }

    /// Sets the corrupt flag in memory and, for v3, the corrupt bit in the header on disk (read
    /// from the disk, so that no metadata lock is needed); failures to write it are logged, the
    /// flag in memory refuses writes either way. `op` is what was prevented ("write on").
    fn mark_corrupt(&self, f: &HostFile, version: u32, op: &str, what: Structure) {
        if self.corrupt.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!(
            "{}: marking image as corrupt: preventing invalid {op} metadata (overlaps with {})",
            f.path(),
            what.name()
        );
        if version < 3 {
            return;
        }
        let mut b = [0u8; 8];
        let r = f.read_at(&mut b, INCOMPATIBLE_AT).and_then(|()| {
            let bits = u64::from_be_bytes(b) | INCOMPAT_CORRUPT;
            f.write_at(&bits.to_be_bytes(), INCOMPATIBLE_AT)?;
            f.sync()
        });
        if let Err(e) = r {
            log::error!("{}: setting the corrupt bit failed: {e}", f.path());
        }
    }
}

/// The snapshots' L1 tables as sorted, merged byte ranges.
fn merged_l1_ranges(snaps: &[SnapshotL1]) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = snaps
        .iter()
        .filter(|s| s.size > 0)
        .map(|s| (s.offset, s.offset.saturating_add(u64::from(s.size) * 8)))
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

impl Meta {
    /// Records that an L1 entry now points at the L2 table at `new` instead of `old` (0: none).
    pub fn note_l2_moved(&mut self, old: u64, new: u64) {
        let mut ix = self.overlap.write();
        if old != 0 {
            if let Ok(i) = ix.l2.binary_search(&old) {
                ix.l2.remove(i);
            }
        }
        let i = ix.l2.partition_point(|&o| o < new);
        ix.l2.insert(i, new);
    }

    /// Records that the refcount table or its blocks moved or grew.
    pub fn note_refcounts_moved(&mut self) {
        self.overlap.write().set_refcounts(self);
    }

    /// Whether the cluster at `off` may lose a reference. Metadata moves out of the index before
    /// it is freed, so a cluster still indexed is losing a reference that an L2 entry wrongly
    /// held (copy-on-write or discard of an entry aimed at metadata): its refcount then only
    /// counts the metadata itself, so it must neither drop nor be punched out. The image is
    /// marked corrupt.
    pub fn may_free(&self, f: &HostFile, off: u64) -> bool {
        let Some(what) = self.overlap.find(off, self.cs(), CHECK_CACHED) else {
            return true;
        };
        self.overlap
            .mark_corrupt(f, self.header.version, "free of", what);
        false
    }
}

impl Qcow2 {
    /// Refuses a write once the image was marked corrupt.
    pub(super) fn refuse_if_corrupt(&self) -> Result<(), Error> {
        if self.overlap.corrupt.load(Ordering::Acquire) {
            return Err(super::fmt_err(&self.file, FormatError::MarkedCorrupt));
        }
        Ok(())
    }

    /// Checks a data write of `len` bytes at `host` against the metadata, before it is issued;
    /// on a hit, marks the image corrupt and fails.
    pub(super) fn check_data_write(&self, host: u64, len: u64) -> Result<(), Error> {
        self.refuse_if_corrupt()?;
        let Some(what) = self.overlap.find(host, len, CHECK_CACHED) else {
            // The file will reach this far. Were the write to fail, nothing would map a new
            // cluster (copy-on-write publishes only after its fill), so the length is only
            // overstated for a range no read reaches.
            // A load first: the common write, inside the file, then writes no shared line.
            let end = host.saturating_add(len);
            if end > self.overlap.file_len.load(Ordering::Relaxed) {
                self.overlap.file_len.fetch_max(end, Ordering::Relaxed);
            }
            return Ok(());
        };
        self.overlap
            .mark_corrupt(&self.file, self.version, "write on", what);
        Err(super::fmt_err(
            &self.file,
            FormatError::MetadataOverlap {
                host,
                len,
                what: what.name(),
            },
        ))
    }

    /// Checks that a read of `len` bytes of data at `host` (for `guest`) lies within the file.
    pub(super) fn check_data_read(&self, guest: u64, host: u64, len: u64) -> Result<(), Error> {
        let end = host.saturating_add(len);
        if end <= self.overlap.file_len.load(Ordering::Relaxed) {
            return Ok(());
        }
        let file_len = self.file.len()?;
        self.overlap.file_len.fetch_max(file_len, Ordering::Relaxed);
        if end <= file_len {
            return Ok(());
        }
        Err(super::fmt_err(
            &self.file,
            FormatError::DataPastEnd {
                guest,
                host,
                len,
                file_len,
            },
        ))
    }

    /// Whether the extents mapped for a lock-free request may go to the host file as they are:
    /// a write overlapping no metadata, a read within the file as last seen. Anything else goes
    /// through the image's methods, which fail it with the reason.
    pub(super) fn extents_pass(&self, extents: &[Extent], write: bool) -> bool {
        if write {
            let ix = self.overlap.read();
            extents
                .iter()
                .all(|x| ix.find(x.host, x.len, CHECK_CACHED).is_none())
        } else {
            let known = self.overlap.file_len.load(Ordering::Relaxed);
            extents
                .iter()
                .all(|x| x.host.checked_add(x.len).is_some_and(|e| e <= known))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Index {
        Index {
            cs: 0x1000,
            ranges: vec![
                (0, 0x1000, Structure::Header),
                (0x3000, 0x3010, Structure::ActiveL1),
                (0x1000, 0x2000, Structure::RefcountTable),
            ],
            inactive_l1: merged_l1_ranges(&[
                SnapshotL1 {
                    offset: 0x9000,
                    size: 2,
                },
                SnapshotL1 {
                    offset: 0x9000,
                    size: 0x400,
                },
                SnapshotL1 {
                    offset: 0xc000,
                    size: 1,
                },
            ]),
            rc_blocks: vec![0x2000],
            l2: vec![0x4000, 0x6000, 0x6000],
        }
    }

    #[test]
    fn every_structure_is_found_and_its_neighbours_are_not() {
        let ix = index();
        let at = |host, len| ix.find(host, len, CHECK_CACHED);
        assert_eq!(at(0x200, 512), Some(Structure::Header));
        assert_eq!(at(0x3000, 0x1000), Some(Structure::ActiveL1));
        // The L1 table takes 16 bytes; the rest of its cluster is not metadata.
        assert_eq!(at(0x3010, 0xff0), None);
        assert_eq!(at(0x1fff, 1), Some(Structure::RefcountTable));
        assert_eq!(at(0x2000, 0x1000), Some(Structure::RefcountBlock));
        assert_eq!(at(0x4fff, 1), Some(Structure::ActiveL2));
        assert_eq!(at(0x5000, 0x1000), None);
        assert_eq!(at(0x5000, 0x1001), Some(Structure::ActiveL2));
        assert_eq!(at(0x7000, 0x2000), None);
        assert_eq!(at(0xb000, 0x1000), None);
        assert_eq!(at(0xa000, 0x1000), Some(Structure::InactiveL1));
        assert_eq!(at(0xc000, 8), Some(Structure::InactiveL1));
        assert_eq!(at(0xc008, 8), None);
        // A mask without a structure does not see it.
        assert_eq!(
            ix.find(0x4000, 0x1000, CHECK_CACHED & !Structure::ActiveL2.bit()),
            None
        );
        assert_eq!(at(u64::MAX - 1, 2), None);
    }

    #[test]
    fn snapshot_l1_ranges_merge() {
        assert_eq!(
            index().inactive_l1,
            vec![(0x9000, 0xb000), (0xc000, 0xc008)]
        );
    }
}
