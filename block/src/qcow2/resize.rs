//! Growing a qcow2 image in place, without opening its tables: the header's size, and when the
//! disk needs more L1 entries, the L1 table lengthened inside the clusters it already occupies
//! (one 64 KiB cluster holds the L1 of a 4 TiB disk). The new entries are zeroed and synced
//! before the header that counts them is written, so a crash leaves the old size or the new one.

use super::header::Header;
use super::validate::{FormatError, MAX_VIRTUAL_SIZE};
use crate::file::HostFile;
use crate::Error;

/// Grows the image in `file` (whose header is `h`) to `new_size` bytes.
pub fn grow(file: &HostFile, h: &Header, new_size: u64) -> Result<(), Error> {
    let path = || file.path().to_string();
    if new_size > MAX_VIRTUAL_SIZE {
        return Err(Error::Format {
            path: path(),
            source: FormatError::VirtualSize(new_size),
        });
    }
    let cs = h.cluster_size();
    let old_l1 = u64::from(h.l1_size);
    let new_l1 = new_size.div_ceil(h.l2_entries() * cs);
    let mut nh = h.clone();
    nh.size = new_size;
    if new_l1 > old_l1 {
        // Entries that fit in the clusters the L1 table occupies (none when it has no entries:
        // then it may own no cluster at all).
        let room = (old_l1 * 8).div_ceil(cs) * cs / 8;
        if new_l1 > room {
            return Err(Error::L1Growth {
                path: path(),
                size: new_size,
            });
        }
        let zeroes = usize::try_from((new_l1 - old_l1) * 8).unwrap_or(0);
        file.write_at(&vec![0u8; zeroes], h.l1_table_offset + old_l1 * 8)?;
        file.sync()?;
        nh.l1_size = u32::try_from(new_l1).map_err(|_| Error::L1Growth {
            path: path(),
            size: new_size,
        })?;
    }
    let fmt = |source| Error::Format {
        path: path(),
        source,
    };
    let old_len = h.encode().map_err(fmt)?.len();
    let mut b = nh.encode().map_err(fmt)?;
    b.resize(b.len().max(old_len), 0);
    file.write_at(&b, 0)?;
    file.sync()
}
