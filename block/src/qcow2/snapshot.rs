//! The internal snapshot table (spec "Snapshots"): where each snapshot's L1 table is and how much
//! room the table takes, so that `check` counts the clusters the snapshots keep alive, and what
//! `snapshot -l` lists (id, name, date, VM state size and clock); and the table's entries as bytes,
//! with the encoding of a new entry, for `snapshot_ops.rs`, which creates, applies and deletes
//! snapshots.

use super::header::Header;
use super::validate::{FormatError, MAX_L1_BYTES};
use crate::file::HostFile;
use crate::Error;

/// One snapshot's L1 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotL1 {
    /// Host offset of the L1 table.
    pub offset: u64,
    /// L1 entries.
    pub size: u32,
}

/// One snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its L1 table.
    pub l1: SnapshotL1,
    /// Unique id (a decimal number in images QEMU writes).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Creation time: seconds since the epoch, and nanoseconds.
    pub date: (u32, u32),
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state.
    pub vm_state_size: u64,
    /// Guest instruction count at creation, when recorded.
    pub icount: Option<u64>,
    /// Virtual disk size at creation (extra data; absent from old v2 entries).
    pub disk_size: Option<u64>,
}

/// Most extra data a snapshot entry may carry to be rewritten (QEMU refuses more:
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const MAX_EXTRA: u64 = 1024;

/// Extra data a new entry carries (spec "Snapshot table entry"): the VM state size as 64 bits,
/// the disk size, and the instruction count.
const NEW_EXTRA: u32 = 24;

/// What a snapshot operation refuses.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No snapshot has this name (or, for apply, this id).
    #[error("snapshot not found")]
    NotFound,
    /// A snapshot of another disk size (applying it would resize the disk).
    #[error("snapshot '{name}' has a disk size of {snapshot} bytes, the disk has {disk}")]
    DiskSize {
        /// The snapshot.
        name: String,
        /// Its disk size.
        snapshot: u64,
        /// The disk's.
        disk: u64,
    },
    /// The table holds QEMU's limit of snapshots already.
    #[error("the image has {0} snapshots, the most allowed")]
    TooMany(u32),
    /// A name or id longer than an entry can hold.
    #[error("snapshot name of {0} bytes is longer than 65535")]
    NameTooLong(usize),
    /// An entry with more extra data than QEMU allows, which is not rewritten.
    #[error("snapshot table entry {0} has {1} bytes of extra data, more than 1024")]
    ExtraData(u32, u64),
}

/// One entry of the table: what it lists and its bytes (padded to 8), kept as they are when
/// the table is rewritten.
#[derive(Debug, Clone)]
pub(super) struct RawEntry {
    /// The entry as listed.
    pub snap: Snapshot,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// A new entry's fields.
pub(super) struct NewEntry<'a> {
    /// Its L1 table.
    pub l1: SnapshotL1,
    /// Unique id.
    pub id: &'a str,
    /// Name.
    pub name: &'a str,
    /// Creation time: seconds and nanoseconds since the epoch.
    pub date: (u32, u32),
    /// Disk size.
    pub disk_size: u64,
}

impl NewEntry<'_> {
    /// The entry as bytes, padded to 8, with no VM state, a guest clock of 0 and an
    /// instruction count of 0, as `qemu-img snapshot -c` writes them.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let len16 =
            |s: &str| u16::try_from(s.len()).map_err(|_| SnapshotError::NameTooLong(s.len()));
        let mut b = Vec::with_capacity(64 + self.id.len() + self.name.len() + 7);
        b.extend_from_slice(&self.l1.offset.to_be_bytes());
        b.extend_from_slice(&self.l1.size.to_be_bytes());
        b.extend_from_slice(&len16(self.id)?.to_be_bytes());
        b.extend_from_slice(&len16(self.name)?.to_be_bytes());
        b.extend_from_slice(&self.date.0.to_be_bytes());
        b.extend_from_slice(&self.date.1.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // vm_clock_nsec
        b.extend_from_slice(&0u32.to_be_bytes()); // vm_state_size
        b.extend_from_slice(&NEW_EXTRA.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // vm_state_size_large
        b.extend_from_slice(&self.disk_size.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // icount
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
        Ok(b)
    }
}

/// Lists the snapshots of the image in `f`, whose header is `h`.
pub fn list(f: &HostFile, h: &Header) -> Result<Vec<Snapshot>, Error> {
    entries(f, h).map(|(v, _)| v.into_iter().map(|e| e.snap).collect())
}

/// Reads the snapshot table: each snapshot's L1 table and the table's byte length.
pub fn read_table(f: &HostFile, h: &Header) -> Result<(Vec<SnapshotL1>, u64), Error> {
    let (v, len) = entries(f, h)?;
    Ok((v.into_iter().map(|e| e.snap.l1).collect(), len))
}

/// Reads every entry of the table with its bytes.
pub(super) fn raw_entries(f: &HostFile, h: &Header) -> Result<Vec<RawEntry>, Error> {
    let (v, _) = entries(f, h)?;
    let mut out = Vec::with_capacity(v.len());
    for (i, e) in (0u32..).zip(v) {
        if e.extra > MAX_EXTRA {
            return Err(Error::Snapshot {
                path: f.path().to_string(),
                source: SnapshotError::ExtraData(i, e.extra),
            });
        }
        // Bounded: 40 bytes, 1 KiB of extra data and two names under 64 KiB each.
        let mut bytes = vec![0u8; usize::try_from(e.len).unwrap_or(0)];
        f.read_at(&mut bytes, e.offset)?;
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        out.push(RawEntry {
            snap: e.snap,
            bytes,
        });
    }
    Ok(out)
}

/// An entry as read, with where it lies.
struct Located {
    snap: Snapshot,
    /// Host offset of the entry.
    offset: u64,
    /// Its length without padding.
    len: u64,
    /// Bytes of extra data.
    extra: u64,
}

/// The entries and the table's byte length.
fn entries(f: &HostFile, h: &Header) -> Result<(Vec<Located>, u64), Error> {
    let file_len = f.len()?;
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    let bad = |i: u32| Error::Format {
        path: f.path().to_string(),
        source: FormatError::BadSnapshot(i),
    };
    for i in 0..h.nb_snapshots {
        if off.saturating_add(40) > file_len {
            return Err(bad(i));
        }
        let mut fixed = [0u8; 40];
        f.read_at(&mut fixed, off)?;
        let u64_at = |a: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&fixed[a..a + 8]);
            u64::from_be_bytes(b)
        };
        let u32_at = |a: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&fixed[a..a + 4]);
            u32::from_be_bytes(b)
        };
        let l1 = SnapshotL1 {
            offset: u64_at(0),
            size: u32_at(8),
        };
        let l1_end = l1.offset.saturating_add(u64::from(l1.size) * 8);
        if u64::from(l1.size) * 8 > MAX_L1_BYTES
            || !l1.offset.is_multiple_of(h.cluster_size())
            || l1_end > file_len
        {
            return Err(bad(i));
        }
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = u64::from(u32_at(36));
        let len = 40 + extra + id_len + name_len;
        // Entries are padded to 8 bytes; the last one's padding may lie past the end of the file.
        if off.saturating_add(len) > file_len {
            return Err(bad(i));
        }
        // The fields listed: the first 24 bytes of extra data at most, then id and name (each
        // under 64 KiB), all inside the file (checked above).
        let mut extra_data = vec![0u8; usize::try_from(extra.min(24)).unwrap_or(0)];
        f.read_at(&mut extra_data, off + 40)?;
        let mut names = vec![0u8; usize::try_from(id_len + name_len).unwrap_or(0)];
        f.read_at(&mut names, off + 40 + extra)?;
        let (id, name) = names.split_at(usize::try_from(id_len).unwrap_or(0));
        let extra_u64 = |a: usize| {
            extra_data.get(a..a + 8).map(|b| {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                u64::from_be_bytes(w)
            })
        };
        let snap = Snapshot {
            l1,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date: (u32_at(16), u32_at(20)),
            vm_clock_nsec: u64_at(24),
            vm_state_size: extra_u64(0).unwrap_or(u64::from(u32_at(32))),
            icount: extra_u64(16).filter(|&n| n != u64::MAX),
            disk_size: extra_u64(8),
        };
        out.push(Located {
            snap,
            offset: off,
            len,
            extra,
        });
        off += len.next_multiple_of(8);
    }
    Ok((out, off - h.snapshots_offset))
}
