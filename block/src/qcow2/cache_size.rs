//! How many tables the metadata caches hold, from QEMU's qcow2 open options `l2-cache-size`,
//! `refcount-cache-size` and `cache-size` (bytes), read by QEMU's rules (its
//! `docs/qcow2-cache.txt`):
//!
//! - the L2 cache holds at most what the whole disk's L2 tables need (rounded up to whole
//!   tables), and by default that much up to 32 MiB; the refcount cache holds 4 blocks by default;
//! - `cache-size` alone goes to the L2 cache first (all it can use, if 4 refcount blocks are left
//!   over), the rest to the refcount cache; with one of the other two, that one is taken and
//!   the other gets the remainder; all three at once, or a part larger than the whole, is an error;
//! - at least 2 L2 tables and 4 refcount blocks are kept whatever the sizes say, and a cache of
//!   more than `i32::MAX` tables is refused.
//!
//! QEMU caches L2 tables in 4 KiB slices when the cache does not cover the disk; this engine
//! caches whole tables, so for clusters above 4 KiB the same byte budget holds fewer, larger
//! entries.

/// The L2 cache's default limit (QEMU's on Linux).
const DEFAULT_L2_MAX: u64 = 32 << 20;
/// The fewest L2 tables cached.
const MIN_L2_TABLES: u64 = 2;
/// The fewest (and default number of) refcount blocks cached.
const MIN_REFCOUNT_BLOCKS: u64 = 4;

/// Cache size options that contradict each other, or a cache larger than the engine allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheSizeError {
    /// `cache-size`, `l2-cache-size` and `refcount-cache-size` all given.
    #[error("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")]
    AllThree,
    /// `l2-cache-size` above `cache-size`.
    #[error("l2-cache-size ({l2}) may not exceed cache-size ({total})")]
    L2ExceedsTotal {
        /// `l2-cache-size`.
        l2: u64,
        /// `cache-size`.
        total: u64,
    },
    /// `refcount-cache-size` above `cache-size`.
    #[error("refcount-cache-size ({refcount}) may not exceed cache-size ({total})")]
    RefcountExceedsTotal {
        /// `refcount-cache-size`.
        refcount: u64,
        /// `cache-size`.
        total: u64,
    },
    /// More tables than a cache may hold.
    #[error("{cache} cache size too big: {tables} tables")]
    TooBig {
        /// `L2` or `refcount`.
        cache: &'static str,
        /// The tables asked for.
        tables: u64,
    },
    /// A cache size given for an image that is not qcow2.
    #[error("the raw format does not support the option '{0}'")]
    NotQcow2(&'static str),
}

/// The cache size options of a qcow2 image, in bytes; `None` where not given. Built only through
/// [`CacheSizes::new`], so the options never contradict each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSizes {
    l2: Option<u64>,
    refcount: Option<u64>,
    total: Option<u64>,
}

/// The number of tables each cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTables {
    /// L2 tables.
    pub l2: usize,
    /// Refcount blocks.
    pub refcount: usize,
}

impl CacheSizes {
    /// `l2-cache-size`, `refcount-cache-size` and `cache-size`, checked against each other.
    pub fn new(
        l2: Option<u64>,
        refcount: Option<u64>,
        total: Option<u64>,
    ) -> Result<CacheSizes, CacheSizeError> {
        if let Some(total) = total {
            match (l2, refcount) {
                (Some(_), Some(_)) => return Err(CacheSizeError::AllThree),
                (Some(l2), _) if l2 > total => {
                    return Err(CacheSizeError::L2ExceedsTotal { l2, total })
                }
                (_, Some(refcount)) if refcount > total => {
                    return Err(CacheSizeError::RefcountExceedsTotal { refcount, total })
                }
                _ => {}
            }
        }
        Ok(CacheSizes {
            l2,
            refcount,
            total,
        })
    }

    /// The name of an option given, for refusing it where it does not apply.
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("l2-cache-size", self.l2),
            ("refcount-cache-size", self.refcount),
            ("cache-size", self.total),
        ]
        .into_iter()
        .find_map(|(name, v)| v.map(|_| name))
    }

    /// The tables each cache holds for an image of `disk_size` bytes with `cluster_size`-byte
    /// tables of `l2_entry_bytes`-byte L2 entries (8, or 16 with extended L2).
    pub fn tables(
        &self,
        cluster_size: u64,
        disk_size: u64,
        l2_entry_bytes: u64,
    ) -> Result<CacheTables, CacheSizeError> {
        let l2_entries = disk_size.div_ceil(cluster_size);
        let l2_all = l2_entries
            .saturating_mul(l2_entry_bytes)
            .div_ceil(cluster_size)
            .saturating_mul(cluster_size);
        let mut l2 = l2_all.min(self.l2.unwrap_or(DEFAULT_L2_MAX));
        let mut refcount = self.refcount.unwrap_or(0);
        if let Some(total) = self.total {
            // `new` saw to it that the part given does not exceed the whole.
            match (self.l2, self.refcount) {
                (Some(_), _) => refcount = total.saturating_sub(l2),
                (_, Some(rc)) => l2 = total - rc,
                _ => {
                    let min_refcount = MIN_REFCOUNT_BLOCKS * cluster_size;
                    refcount = if total >= l2_all.saturating_add(min_refcount) {
                        total - l2_all
                    } else {
                        total.min(min_refcount)
                    };
                    l2 = total - refcount;
                }
            }
        }
        let count = |bytes: u64, min: u64, cache: &'static str| {
            let tables = (bytes / cluster_size).max(min);
            i32::try_from(tables)
                .ok()
                .and_then(|t| usize::try_from(t).ok())
                .ok_or(CacheSizeError::TooBig { cache, tables })
        };
        Ok(CacheTables {
            l2: count(l2, MIN_L2_TABLES, "L2")?,
            refcount: count(refcount, MIN_REFCOUNT_BLOCKS, "refcount")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = 1 << 20;

    fn sizes(l2: Option<u64>, rc: Option<u64>, total: Option<u64>) -> CacheSizes {
        CacheSizes::new(l2, rc, total).expect("consistent")
    }

    fn tables(s: CacheSizes, cs: u64, disk: u64) -> (usize, usize) {
        let t = s.tables(cs, disk, 8).expect("sizes");
        (t.l2, t.refcount)
    }

    #[test]
    fn defaults_cover_the_disk_up_to_32_mib() {
        // 1 GiB of 64 KiB clusters: 16 Ki entries, 128 KiB of L2 tables (2 tables).
        assert_eq!(tables(CacheSizes::default(), 64 * K, 1 << 30), (2, 4));
        // 1 TiB: 128 MiB of L2 tables, capped at 32 MiB (512 tables).
        assert_eq!(tables(CacheSizes::default(), 64 * K, 1 << 40), (512, 4));
        // 4 MiB of 512-byte clusters: 8 Ki entries, 64 KiB (128 tables).
        assert_eq!(tables(CacheSizes::default(), 512, 4 * M), (128, 4));
        // Extended L2 entries need twice the tables.
        let ext = CacheSizes::default().tables(512, 4 * M, 16).expect("sizes");
        assert_eq!(ext.l2, 256);
    }

    #[test]
    fn sizes_given_and_their_minimums() {
        assert_eq!(tables(sizes(Some(1024), None, None), 512, 4 * M), (2, 4));
        // Below the minimums: 2 L2 tables, 4 refcount blocks.
        assert_eq!(tables(sizes(Some(0), Some(512), None), 512, 4 * M), (2, 4));
        assert_eq!(
            tables(sizes(Some(4 * K), Some(8 * K), None), 512, 4 * M),
            (8, 16)
        );
        // An L2 size above what the disk needs holds the disk's tables.
        assert_eq!(tables(sizes(Some(M), None, None), 512, 4 * M), (128, 4));
    }

    #[test]
    fn cache_size_splits_as_qemu_splits_it() {
        // Enough for every L2 table and 4 refcount blocks: the L2 cache takes all it can use.
        assert_eq!(
            tables(sizes(None, None, Some(128 * K)), 512, 4 * M),
            (128, 128)
        );
        // Not enough: 4 refcount blocks first, the rest to L2.
        assert_eq!(tables(sizes(None, None, Some(8 * K)), 512, 4 * M), (12, 4));
        // Smaller than 4 blocks: all of it to refcounts, L2 at its minimum.
        assert_eq!(tables(sizes(None, None, Some(K)), 512, 4 * M), (2, 4));
        // With one part given, the other gets the rest.
        assert_eq!(
            tables(sizes(Some(4 * K), None, Some(8 * K)), 512, 4 * M),
            (8, 8)
        );
        assert_eq!(
            tables(sizes(None, Some(2 * K), Some(8 * K)), 512, 4 * M),
            (12, 4)
        );
    }

    #[test]
    fn errors_by_variant() {
        assert_eq!(
            CacheSizes::new(Some(1), Some(1), Some(2)),
            Err(CacheSizeError::AllThree)
        );
        assert_eq!(
            CacheSizes::new(Some(3), None, Some(2)),
            Err(CacheSizeError::L2ExceedsTotal { l2: 3, total: 2 })
        );
        assert_eq!(
            CacheSizes::new(None, Some(3), Some(2)),
            Err(CacheSizeError::RefcountExceedsTotal {
                refcount: 3,
                total: 2
            })
        );
        assert_eq!(
            sizes(None, Some(1 << 40), None).tables(512, 4 * M, 8),
            Err(CacheSizeError::TooBig {
                cache: "refcount",
                tables: 1 << 31
            })
        );
        assert_eq!(
            sizes(Some(1 << 50), None, None).tables(512, 1 << 50, 8),
            Err(CacheSizeError::TooBig {
                cache: "L2",
                tables: 1 << 35
            })
        );
        assert_eq!(CacheSizes::default().first_given(), None);
        assert_eq!(
            sizes(None, Some(1), Some(2)).first_given(),
            Some("refcount-cache-size")
        );
    }

    /// A 2-table L2 cache writes a dirty table back when a third is needed, before any flush;
    /// the default cache, holding every table of the disk, writes none.
    #[test]
    fn two_l2_tables_evict_between_flushes() {
        use std::sync::{Arc, Mutex};

        use crate::file::test_hook::{Hook, Op};
        use crate::qcow2::l2::OFFSET_MASK;
        use crate::{DiskImage, Format, Image, OpenOptions};

        let dir = tempfile::tempdir().expect("temp dir");
        for (i, (cache_sizes, evicts)) in [
            (CacheSizes::default(), false),
            (sizes(Some(1024), None, None), true),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("t{i}.qcow2"));
            let out = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
                .arg(&path)
                .arg("4M")
                .output()
                .expect("qemu-img is required (ci/setup installs it)");
            assert!(out.status.success(), "{out:?}");
            let opts = OpenOptions {
                format: Some(Format::Qcow2),
                read_only: false,
                cache_sizes,
                ..Default::default()
            };
            let img = crate::open(&path, opts).expect("opens");
            let Image::Qcow2(q) = &img else {
                unreachable!("opened as qcow2")
            };
            let writes = Arc::new(Mutex::new(Vec::new()));
            let log = Arc::clone(&writes);
            q.file.set_hook(Some(Hook(Arc::new(move |op| {
                log.lock().expect("not poisoned").push(op);
                Ok(())
            }))));
            // An L2 table of 512-byte clusters maps 32 KiB: three writes need three tables.
            for region in 0..3u64 {
                img.write_at(&[1; 512], region << 15).expect("writes");
            }
            let first = q.lock().l1[0] & OFFSET_MASK;
            let written = writes.lock().expect("not poisoned").contains(&Op::Write {
                offset: first,
                len: 512,
            });
            assert_eq!(written, evicts, "{cache_sizes:?}");
        }
    }
}
