//! The internal snapshot table (spec "Snapshots"): only what the active layer's consistency
//! needs, namely where each snapshot's L1 table is and how much room the table takes, so that
//! `check` counts the clusters the snapshots keep alive. Snapshots are never applied or created.

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

/// Reads the snapshot table: each snapshot's L1 table and the table's byte length.
pub fn read_table(f: &HostFile, h: &Header) -> Result<(Vec<SnapshotL1>, u64), Error> {
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
        out.push(l1);
        off += len.next_multiple_of(8);
    }
    Ok((out, off - h.snapshots_offset))
}
