//! L1 and L2 entries (spec "Cluster mapping"): decoding an entry into a `Mapping`, the answer a
//! metadata lookup gives so that data I/O can happen after the metadata lock is dropped.
//!
//! A standard L2 entry is 64 bits: bit 63 "copied" (refcount is exactly one), bit 62 compressed,
//! bits 9..=55 the host cluster offset, bit 0 "reads as zeroes". An extended L2 entry adds a
//! 64-bit bitmap: bit `n` = subcluster `n` allocated, bit `32 + n` = subcluster `n` reads as zeroes.

use super::validate::FormatError;

/// L1/L2 entry bit 63: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0: the cluster reads as zeroes (standard L2 only).
pub const ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry: 1..=8 and 56..=62.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;

/// What one cluster (or a run of subclusters in it) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: the backing image's data, or zeroes without one.
    Unallocated,
    /// Reads as zeroes; `host` is the cluster kept allocated behind it, if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<u64>,
    },
    /// Data at a host offset (already advanced to the queried byte).
    Data {
        /// Host offset of the queried byte.
        host: u64,
        /// Whether the cluster is ours alone (writable in place).
        copied: bool,
    },
    /// A compressed cluster: `len` bytes at `host` decompress to the whole cluster.
    Compressed {
        /// Host offset of the compressed stream.
        host: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// The geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries.
    pub extended: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Size of a subcluster (the cluster itself without extended L2).
    pub fn sub_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended { 16 } else { 8 }
    }

    /// 64-bit words per L2 entry.
    pub fn words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Decodes the entry (and bitmap) for the cluster holding `guest`, returning the mapping at
    /// `guest` and how many bytes from `guest` (within the cluster) share it.
    pub fn decode(
        &self,
        entry: u64,
        bitmap: u64,
        guest: u64,
    ) -> Result<(Mapping, u64), FormatError> {
        let cs = self.cluster_size();
        let in_cluster = guest & (cs - 1);
        let to_end = cs - in_cluster;
        let bad = || FormatError::BadL2Entry { guest, entry };
        if entry & COMPRESSED != 0 {
            if self.extended && bitmap != 0 {
                return Err(bad());
            }
            // Spec: x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 extra sectors.
            let x = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry & !COMPRESSED & !COPIED) >> x) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            if host == 0 || len == 0 {
                return Err(bad());
            }
            return Ok((Mapping::Compressed { host, len }, to_end));
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        // Reserved: bits 1..=8 (standard: 1..=8; extended also bit 0), 56..=61.
        let reserved = 0x3f00_0000_0000_01fe | if self.extended { ZERO } else { 0 };
        if entry & reserved != 0 || !host.is_multiple_of(cs) {
            return Err(bad());
        }
        if !self.extended {
            let m = if entry & ZERO != 0 {
                Mapping::Zero {
                    host: (host != 0).then_some(host),
                }
            } else if host == 0 {
                Mapping::Unallocated
            } else {
                Mapping::Data {
                    host: host + in_cluster,
                    copied,
                }
            };
            return Ok((m, to_end));
        }
        let alloc = bitmap & 0xffff_ffff;
        let zero = bitmap >> 32;
        if alloc & zero != 0 || (alloc != 0 && host == 0) {
            return Err(bad());
        }
        let sub = self.sub_size();
        let first = in_cluster / sub;
        let state = |i: u64| ((alloc >> i) & 1, (zero >> i) & 1);
        let s0 = state(first);
        let mut last = first + 1;
        while last < 32 && state(last) == s0 {
            last += 1;
        }
        let run = last * sub - in_cluster;
        let m = match s0 {
            (1, _) => Mapping::Data {
                host: host + in_cluster,
                copied,
            },
            (_, 1) => Mapping::Zero { host: None },
            _ => Mapping::Unallocated,
        };
        Ok((m, run))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STD: Geometry = Geometry {
        cluster_bits: 16,
        extended: false,
    };
    const EXT: Geometry = Geometry {
        cluster_bits: 16,
        extended: true,
    };

    #[test]
    fn standard_entries_decode() {
        assert_eq!(STD.decode(0, 0, 5).unwrap(), (Mapping::Unallocated, 65531));
        assert_eq!(
            STD.decode(COPIED | 0x30000, 0, 0x10010).unwrap(),
            (
                Mapping::Data {
                    host: 0x30010,
                    copied: true
                },
                65520
            )
        );
        assert_eq!(
            STD.decode(ZERO, 0, 0).unwrap().0,
            Mapping::Zero { host: None }
        );
        // 64 KiB clusters: x = 54; one extra sector.
        let e = COMPRESSED | (1 << 54) | 0x1234;
        assert_eq!(
            STD.decode(e, 0, 0).unwrap().0,
            Mapping::Compressed {
                host: 0x1234,
                len: 1024 - 0x34
            }
        );
    }

    #[test]
    fn hostile_entries_are_refused() {
        assert!(matches!(
            STD.decode(0x30100, 0, 0),
            Err(FormatError::BadL2Entry { .. })
        ));
        assert!(matches!(
            STD.decode(0x31000, 0, 0),
            Err(FormatError::BadL2Entry { .. })
        ));
        // Allocated and zero at once.
        assert!(matches!(
            EXT.decode(0x30000, 0x1_0000_0001, 0),
            Err(FormatError::BadL2Entry { .. })
        ));
        // Allocated subcluster without a host cluster.
        assert!(matches!(
            EXT.decode(0, 1, 0),
            Err(FormatError::BadL2Entry { .. })
        ));
        assert!(matches!(
            EXT.decode(COMPRESSED | 0x200, 1, 0),
            Err(FormatError::BadL2Entry { .. })
        ));
    }

    #[test]
    fn subcluster_runs() {
        // Subclusters of 2 KiB: 0-1 allocated, 2 zero, rest unallocated.
        let bm = 0b11 | (0b100 << 32);
        let (m, run) = EXT.decode(0x30000, bm, 100).unwrap();
        assert_eq!(
            m,
            Mapping::Data {
                host: 0x30064,
                copied: false
            }
        );
        assert_eq!(run, 4096 - 100);
        assert_eq!(
            EXT.decode(0x30000, bm, 4096).unwrap(),
            (Mapping::Zero { host: None }, 2048)
        );
        assert_eq!(
            EXT.decode(0x30000, bm, 6144).unwrap(),
            (Mapping::Unallocated, 65536 - 6144)
        );
    }
}
