//! The qcow2 header (spec "Header", v2 and v3), its extensions ("Header extensions") and the
//! backing file name, parsed from and encoded to the first cluster.
//!
//! Parsing validates every field that sizes or places something (see `validate.rs`); fields that
//! only matter once tables are read (table offsets against the file length) are checked at open.
//! Encoding keeps every extension it parsed, in order, and writes the backing file name right
//! after the extensions' end marker (docs/DESIGN.md, block layer: the backing file name).

use super::validate::*;

/// Incompatible feature bit 0: the image may have stale refcounts (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt; open read-only only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: the data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries are extended (subcluster bitmaps).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this engine understands.
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: full disk encryption header pointer.
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// v2 header length (fields up to `snapshots_offset`).
pub const V2_HEADER_LEN: u32 = 72;
/// v3 header length with the compression type field, padded to 8 bytes.
pub const V3_HEADER_LEN: u32 = 112;
/// The fixed part every parse reads before knowing the cluster size.
pub const PROBE_LEN: usize = 112;

/// Compression type values (spec, header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (value 0).
    Zlib,
    /// zstd frames (value 1).
    Zstd,
}

/// A header extension kept as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (unpadded).
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (v3 field; 72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression: Compression,
    /// Header bytes past the fields we know, up to `header_length`, kept on rewrite.
    pub tail: Vec<u8>,
    /// Header extensions other than the backing format, in file order.
    pub extensions: Vec<Extension>,
    /// The backing file name, and its format from the backing format extension.
    pub backing: Option<(String, Option<String>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads the cluster size from the first bytes of an image after checking magic and version, so
/// the caller knows how much of the first cluster to read.
pub fn probe_cluster_bits(b: &[u8]) -> Result<u32, FormatError> {
    if b.len() < V2_HEADER_LEN as usize {
        return Err(FormatError::Truncated {
            len: b.len() as u64,
        });
    }
    let magic = be32(b, 0);
    if magic != MAGIC {
        return Err(FormatError::BadMagic(magic));
    }
    let version = be32(b, 4);
    if version != 2 && version != 3 {
        return Err(FormatError::BadVersion(version));
    }
    let cluster_bits = be32(b, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(FormatError::ClusterBits(cluster_bits));
    }
    Ok(cluster_bits)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses a header from the image's first cluster (`b` is the whole first cluster, or the
    /// whole file when it is shorter).
    pub fn parse(b: &[u8]) -> Result<Header, FormatError> {
        let cluster_bits = probe_cluster_bits(b)?;
        let cluster = 1u64 << cluster_bits;
        let version = be32(b, 4);
        let backing_offset = be64(b, 8);
        let backing_size = be32(b, 16);
        let size = be64(b, 24);
        let crypt = be32(b, 32);
        if crypt != 0 {
            return Err(FormatError::Encrypted(crypt));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size,
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Zlib,
            tail: Vec::new(),
            extensions: Vec::new(),
            backing: None,
        };
        if version == 3 {
            if b.len() < 104 {
                return Err(FormatError::Truncated {
                    len: b.len() as u64,
                });
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(FormatError::HeaderLength(h.header_length));
            }
        }
        let hlen = u64::from(h.header_length);
        if hlen > cluster || hlen > b.len() as u64 {
            return Err(FormatError::HeaderExceedsCluster { len: hlen, cluster });
        }
        let hlen_us = h.header_length as usize;
        if hlen_us > 104 {
            let ct = b[104];
            h.compression = match ct {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => return Err(FormatError::CompressionType(other)),
            };
            h.tail = b[105..hlen_us].to_vec();
        }
        if (h.compression == Compression::Zlib) != (h.incompatible & INCOMPAT_COMPRESSION == 0) {
            return Err(FormatError::CompressionType(h.compression as u8));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatible(unknown));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(FormatError::ExternalDataFile);
        }
        if h.refcount_order > 6 || (version == 2 && h.refcount_order != 4) {
            return Err(FormatError::RefcountOrder(h.refcount_order));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(FormatError::ExtendedL2ClusterSize(cluster_bits));
        }
        if size > MAX_VIRTUAL_SIZE {
            return Err(FormatError::VirtualSize(size));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(FormatError::L1TooLarge(h.l1_size));
        }
        if u64::from(h.l1_size) * h.l2_entries() * cluster < size {
            return Err(FormatError::L1TooSmall {
                l1_size: h.l1_size,
                size,
            });
        }
        if h.refcount_table_clusters == 0
            || u64::from(h.refcount_table_clusters) * cluster > MAX_REFTABLE_BYTES
        {
            return Err(FormatError::RefcountTableSize(h.refcount_table_clusters));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::TooManySnapshots(h.nb_snapshots));
        }
        for (table, offset, used) in [
            ("L1 table", h.l1_table_offset, h.l1_size > 0),
            ("refcount table", h.refcount_table_offset, true),
            ("snapshot table", h.snapshots_offset, h.nb_snapshots > 0),
        ] {
            if used && (offset % cluster != 0 || offset == 0) {
                return Err(FormatError::TableMisaligned { table, offset });
            }
        }
        h.parse_extensions(b, backing_offset, backing_size)?;
        Ok(h)
    }

    /// Parses the extensions and locates the backing file name by the first-cluster rule.
    fn parse_extensions(
        &mut self,
        b: &[u8],
        backing_offset: u64,
        backing_size: u32,
    ) -> Result<(), FormatError> {
        let cluster = self.cluster_size();
        let first = (b.len() as u64).min(cluster);
        let hlen = u64::from(self.header_length);
        if backing_offset != 0 {
            if backing_size > MAX_BACKING_NAME {
                return Err(FormatError::BackingNameTooLong(backing_size));
            }
            if backing_offset.saturating_add(u64::from(backing_size)) > cluster {
                return Err(FormatError::BackingNameOutsideCluster {
                    offset: backing_offset,
                    len: backing_size,
                });
            }
            if backing_offset < hlen {
                return Err(FormatError::BackingNameOverlapsHeader {
                    offset: backing_offset,
                    header_end: hlen,
                });
            }
        }
        // The extension area ends at the end marker, at the backing name, or at the cluster's end.
        let end = if backing_offset != 0 {
            backing_offset.min(first)
        } else {
            first
        };
        let mut off = hlen;
        let mut backing_format = None;
        while off < end {
            if off + 8 > end {
                return Err(FormatError::ExtensionOverrun { offset: off, end });
            }
            let at = usize::try_from(off)
                .map_err(|_| FormatError::ExtensionOverrun { offset: off, end })?;
            let kind = be32(b, at);
            let len = u64::from(be32(b, at + 4));
            if kind == EXT_END {
                break;
            }
            let data_end = off + 8 + len;
            if data_end > end {
                if backing_offset != 0 && data_end <= first {
                    return Err(FormatError::BackingNameOverlapsExtensions {
                        offset: backing_offset,
                    });
                }
                return Err(FormatError::ExtensionOverrun { offset: off, end });
            }
            // data_end <= end <= first cluster length, which fits in usize.
            let data_end_us = usize::try_from(data_end).unwrap_or(at + 8);
            let data = b[at + 8..data_end_us].to_vec();
            match kind {
                EXT_BACKING_FORMAT => {
                    let name =
                        String::from_utf8(data).map_err(|_| FormatError::BackingNameInvalid)?;
                    backing_format = Some(name);
                }
                EXT_CRYPTO => return Err(FormatError::Encrypted(0)),
                EXT_DATA_FILE => return Err(FormatError::ExternalDataFile),
                _ => self.extensions.push(Extension { kind, data }),
            }
            off = (data_end + 7) & !7;
        }
        if backing_offset != 0 {
            if backing_offset + u64::from(backing_size) > first {
                return Err(FormatError::BackingNameOutsideCluster {
                    offset: backing_offset,
                    len: backing_size,
                });
            }
            // Bounded by the first cluster, checked above.
            let s = usize::try_from(backing_offset).unwrap_or(0);
            let raw = &b[s..s + usize::try_from(backing_size).unwrap_or(0)];
            if raw.contains(&0) {
                return Err(FormatError::BackingNameInvalid);
            }
            let name =
                String::from_utf8(raw.to_vec()).map_err(|_| FormatError::BackingNameInvalid)?;
            self.backing = Some((name, backing_format));
        }
        Ok(())
    }

    /// Whether the dirty bit is set (refcounts may be stale: lazy refcounts were in use).
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Turns lazy refcounts on or off (on needs version 3; the caller checks).
    pub fn set_lazy_refcounts(&mut self, on: bool) {
        if on {
            self.compatible |= COMPAT_LAZY_REFCOUNTS;
        } else {
            self.compatible &= !COMPAT_LAZY_REFCOUNTS;
        }
    }

    /// Makes the header version 2 or 3 (`compat=0.10` or `1.1`), with that version's length.
    /// Going to 2 drops the feature bits, which version 2 lacks: the caller checks that none
    /// is in use and that the refcounts are 16 bits wide.
    pub fn set_version(&mut self, version: u32) {
        if version == self.version {
            return;
        }
        self.version = version;
        self.incompatible = 0;
        self.compatible = 0;
        self.autoclear = 0;
        self.compression = Compression::Zlib;
        if version == 2 {
            self.header_length = V2_HEADER_LEN;
            self.tail.clear();
        } else {
            self.header_length = V3_HEADER_LEN;
            self.tail = vec![0; usize::try_from(V3_HEADER_LEN).unwrap_or(105) - 105];
        }
    }

    /// Whether the corrupt bit is set (the image may be opened read-only only).
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// Whether L2 entries are extended (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Encodes the header, its extensions (the backing format first), the end marker and the
    /// backing file name right after it. Fails when it does not fit in the first cluster.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let len = usize::try_from(self.header_length)
            .map_err(|_| FormatError::HeaderLength(self.header_length))?;
        let mut b = vec![0u8; len];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression as u8;
                b[105..105 + self.tail.len()].copy_from_slice(&self.tail);
            }
        }
        let mut exts: Vec<(u32, &[u8])> = Vec::new();
        if let Some((_, Some(fmt))) = &self.backing {
            exts.push((EXT_BACKING_FORMAT, fmt.as_bytes()));
        }
        exts.extend(self.extensions.iter().map(|e| (e.kind, e.data.as_slice())));
        for (kind, data) in exts {
            let len = u32::try_from(data.len()).map_err(|_| FormatError::HeaderExceedsCluster {
                len: data.len() as u64,
                cluster: self.cluster_size(),
            })?;
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        // The end marker: type 0, length 0.
        b.extend_from_slice(&[0u8; 8]);
        if let Some((name, _)) = &self.backing {
            let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
            if len > MAX_BACKING_NAME {
                return Err(FormatError::BackingNameTooLong(len));
            }
            let at = b.len() as u64;
            put64(&mut b, 8, at);
            put32(&mut b, 16, len);
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(FormatError::HeaderExceedsCluster {
                len: b.len() as u64,
                cluster: self.cluster_size(),
            });
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A valid v3 header (64 KiB clusters, 1 GiB) with a backing file, as a whole first cluster.
    fn valid() -> Vec<u8> {
        let h = Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression: Compression::Zlib,
            tail: vec![0; 7],
            extensions: vec![Extension {
                kind: 0x6803_f857,
                data: vec![1, 2, 3],
            }],
            backing: Some(("base.img".into(), Some("raw".into()))),
        };
        let mut b = h.encode().unwrap();
        b.resize(65536, 0);
        b
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn parse_with(f: impl FnOnce(&mut Vec<u8>)) -> Result<Header, FormatError> {
        let mut b = valid();
        f(&mut b);
        Header::parse(&b)
    }

    #[test]
    fn valid_header_round_trips_with_extensions_and_backing() {
        let h = Header::parse(&valid()).unwrap();
        assert_eq!(h.backing, Some(("base.img".into(), Some("raw".into()))));
        assert_eq!(h.extensions.len(), 1);
        let mut again = h.encode().unwrap();
        again.resize(65536, 0);
        assert_eq!(again, valid());
        // The name sits right after the end marker: header 112, backing format ext 16, the
        // feature table ext 16, end marker 8.
        assert_eq!(
            u64::from_be_bytes(again[8..16].try_into().unwrap()),
            112 + 16 + 16 + 8
        );
    }

    #[test]
    fn malformed_headers_each_get_their_own_error() {
        use FormatError as E;
        assert!(matches!(
            parse_with(|b| b.truncate(50)),
            Err(E::Truncated { .. })
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 0, 0x1234)),
            Err(E::BadMagic(0x1234))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 4, 4)),
            Err(E::BadVersion(4))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 20, 8)),
            Err(E::ClusterBits(8))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 20, 22)),
            Err(E::ClusterBits(22))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 100, 100)),
            Err(E::HeaderLength(100))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 100, 1 << 20)),
            Err(E::HeaderExceedsCluster { .. })
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 96, 7)),
            Err(E::RefcountOrder(7))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 32, 1)),
            Err(E::Encrypted(1))
        ));
        assert!(matches!(
            parse_with(|b| put64(b, 72, 1 << 9)),
            Err(E::UnknownIncompatible(0x200))
        ));
        assert!(matches!(
            parse_with(|b| put64(b, 72, INCOMPAT_DATA_FILE)),
            Err(E::ExternalDataFile)
        ));
        assert!(matches!(
            parse_with(|b| b[104] = 1),
            Err(E::CompressionType(1))
        ));
        assert!(matches!(
            parse_with(|b| b[104] = 9),
            Err(E::CompressionType(9))
        ));
        assert!(matches!(
            parse_with(|b| put64(b, 24, 1 << 62)),
            Err(E::VirtualSize(_))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 36, 1 << 23)),
            Err(E::L1TooLarge(_))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 36, 1)),
            Err(E::L1TooSmall { .. })
        ));
        assert!(matches!(
            parse_with(|b| put64(b, 40, 3 << 16 | 8)),
            Err(E::TableMisaligned {
                table: "L1 table",
                ..
            })
        ));
        assert!(matches!(
            parse_with(|b| put64(b, 48, 0)),
            Err(E::TableMisaligned {
                table: "refcount table",
                ..
            })
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 56, 0)),
            Err(E::RefcountTableSize(0))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 56, 1000)),
            Err(E::RefcountTableSize(1000))
        ));
        assert!(matches!(
            parse_with(|b| put32(b, 60, 70000)),
            Err(E::TooManySnapshots(70000))
        ));
        assert!(matches!(
            parse_with(|b| {
                put32(b, 60, 1);
                put64(b, 64, 12);
            }),
            Err(E::TableMisaligned {
                table: "snapshot table",
                ..
            })
        ));
        assert!(matches!(
            parse_with(|b| {
                put32(b, 20, 13);
                put64(b, 72, INCOMPAT_EXTL2);
            }),
            Err(E::ExtendedL2ClusterSize(13))
        ));
        // An extension whose length runs past the cluster.
        assert!(matches!(
            parse_with(|b| {
                put64(b, 8, 0);
                put32(b, 116, 70000);
            }),
            Err(E::ExtensionOverrun { .. })
        ));
        assert!(matches!(
            parse_with(|b| {
                put32(b, 112, EXT_CRYPTO);
            }),
            Err(E::Encrypted(0))
        ));
        assert!(matches!(
            parse_with(|b| {
                put32(b, 112, EXT_DATA_FILE);
            }),
            Err(E::ExternalDataFile)
        ));
    }

    #[test]
    fn the_first_cluster_rule_for_backing_names() {
        use FormatError as E;
        // Too long.
        assert!(matches!(
            parse_with(|b| put32(b, 16, 1024)),
            Err(E::BackingNameTooLong(1024))
        ));
        // Outside the first cluster.
        assert!(matches!(
            parse_with(|b| put64(b, 8, 65530)),
            Err(E::BackingNameOutsideCluster { .. })
        ));
        // Overlapping the header.
        assert!(matches!(
            parse_with(|b| put64(b, 8, 80)),
            Err(E::BackingNameOverlapsHeader { .. })
        ));
        // Overlapping the extensions (the name starts inside the feature table extension).
        assert!(matches!(
            parse_with(|b| put64(b, 8, 136)),
            Err(E::BackingNameOverlapsExtensions { .. })
        ));
        // At the end of the cluster (older tools): accepted.
        let h = parse_with(|b| {
            let name = b"base.img";
            b[65536 - 8..].copy_from_slice(name);
            put64(b, 8, 65536 - 8);
        })
        .unwrap();
        assert_eq!(h.backing.unwrap().0, "base.img");
        // A v2 header with the name at byte 72 and no extensions: accepted.
        let mut b = vec![0u8; 65536];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 2);
        put64(&mut b, 8, 72);
        put32(&mut b, 16, 4);
        put32(&mut b, 20, 16);
        put64(&mut b, 24, 1 << 20);
        put32(&mut b, 36, 1);
        put64(&mut b, 40, 3 << 16);
        put64(&mut b, 48, 1 << 16);
        put32(&mut b, 56, 1);
        b[72..76].copy_from_slice(b"base");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.backing, Some(("base".into(), None)));
        // A file that ends before the name it points at.
        assert!(matches!(
            parse_with(|b| b.truncate(156)),
            Err(E::BackingNameOutsideCluster { .. })
        ));
        // ... or inside the extensions.
        assert!(matches!(
            parse_with(|b| b.truncate(150)),
            Err(E::ExtensionOverrun { .. })
        ));
        // A name with a NUL byte.
        assert!(matches!(
            parse_with(|b| {
                let at = usize::try_from(u64::from_be_bytes(b[8..16].try_into().unwrap())).unwrap();
                b[at] = 0;
            }),
            Err(E::BackingNameInvalid)
        ));
    }
}
