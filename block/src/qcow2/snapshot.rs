//! The internal snapshot table (spec "Snapshots"): where each snapshot's L1 table is and how much
//! room the table takes, so that `check` counts the clusters the snapshots keep alive, and what
//! `snapshot -l` lists (id, name, date, VM state size and clock). Snapshots are never applied or
//! created.

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
}

/// Lists the snapshots of the image in `f`, whose header is `h`.
pub fn list(f: &HostFile, h: &Header) -> Result<Vec<Snapshot>, Error> {
    entries(f, h).map(|(v, _)| v)
}

/// Reads the snapshot table: each snapshot's L1 table and the table's byte length.
pub fn read_table(f: &HostFile, h: &Header) -> Result<(Vec<SnapshotL1>, u64), Error> {
    let (v, len) = entries(f, h)?;
    Ok((v.into_iter().map(|s| s.l1).collect(), len))
}

fn entries(f: &HostFile, h: &Header) -> Result<(Vec<Snapshot>, u64), Error> {
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
        out.push(Snapshot {
            l1,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date: (u32_at(16), u32_at(20)),
            vm_clock_nsec: u64_at(24),
            vm_state_size: extra_u64(0).unwrap_or(u64::from(u32_at(32))),
            icount: extra_u64(16).filter(|&n| n != u64::MAX),
        });
        off += len.next_multiple_of(8);
    }
    Ok((out, off - h.snapshots_offset))
}
