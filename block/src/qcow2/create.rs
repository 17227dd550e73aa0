//! Creating empty qcow2 images, laid out as QEMU does: the header (with the backing format
//! extension and the backing file name right after the extensions' end marker), the refcount
//! table, its blocks, then the L1 table, every cluster of it refcounted. With preallocation
//! (`metadata`, `falloc`, `full`) every L2 table and data cluster follows, all mapped and
//! refcounted, the data clusters left as holes, reserved with `fallocate` or written with zeroes.

use super::header::{
    Compression, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
};
use super::l2::COPIED;
use super::meta::encode_words;
use super::refcount::set_entry;
use super::validate::{MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use crate::file::HostFile;
use crate::Error;

/// What a new qcow2 image looks like (qemu-img's `-o` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes (power of two, 512 B to 2 MiB).
    pub cluster_size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Refcount width in bits (power of two, 1 to 64).
    pub refcount_bits: u64,
    /// `lazy_refcounts=on` (v3 only).
    pub lazy_refcounts: bool,
    /// `extended_l2=on` (v3, clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// `compression_type=zlib|zstd` (zstd: v3 only).
    pub compression: Compression,
    /// Backing file name (as stored) and format.
    pub backing: Option<(String, String)>,
    /// `preallocation=off|metadata|falloc|full`.
    pub preallocation: Preallocation,
}

/// qemu-img's `preallocation=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing allocated.
    #[default]
    Off,
    /// Metadata (qcow2): every cluster mapped, the data left as holes in the file.
    Metadata,
    /// Metadata, and the data reserved with `fallocate`.
    Falloc,
    /// Metadata, and the data written with zeroes.
    Full,
}

impl Preallocation {
    /// The mode named `s`, as qemu-img names it.
    pub fn parse(s: &str) -> Option<Preallocation> {
        Some(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }

    /// Reserves (or writes) the byte range `[offset, offset + len)` of `file` as the mode asks
    /// of data (nothing for `off` and `metadata`).
    pub fn allocate(self, file: &HostFile, offset: u64, len: u64) -> Result<(), Error> {
        match self {
            Preallocation::Off | Preallocation::Metadata => Ok(()),
            Preallocation::Falloc => file.preallocate(offset, len, false),
            Preallocation::Full => file.preallocate(offset, len, true),
        }
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: Compression::Zlib,
            backing: None,
            preallocation: Preallocation::Off,
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidOption(msg)
}

/// Bytes to write at host offsets.
type Pieces = Vec<(u64, Vec<u8>)>;

/// Builds the header and metadata bytes of a new image: (offset, bytes) pieces, the file
/// length and the offset of the first preallocated data cluster (the file length without).
fn layout(o: &CreateOptions) -> Result<(Pieces, u64, u64), Error> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() {
        return Err(invalid(format!("cluster_size {cs} is not a power of two")));
    }
    let cluster_bits = cs.trailing_zeros();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(format!("cluster_size {cs} outside 512..2M")));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(invalid(format!(
            "refcount_bits {} is not 1..64 in powers of two",
            o.refcount_bits
        )));
    }
    let refcount_order = o.refcount_bits.trailing_zeros();
    if o.version == 2
        && (refcount_order != 4
            || o.lazy_refcounts
            || o.extended_l2
            || o.compression != Compression::Zlib)
    {
        return Err(invalid(
            "compat=0.10 needs refcount_bits=16, no lazy_refcounts, no extended_l2, zlib \
             compression"
                .into(),
        ));
    }
    if o.extended_l2 && cluster_bits < 14 {
        return Err(invalid(format!(
            "extended_l2 needs cluster_size of 16k or more, not {cs}"
        )));
    }
    let l2_entries = cs / if o.extended_l2 { 16 } else { 8 };
    let l1_size = o.size.div_ceil(l2_entries * cs);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "size {} too large for cluster_size {cs}",
            o.size
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // Preallocated: an L2 table per L1 entry, then a data cluster per guest cluster.
    let (n_l2, n_data) = if o.preallocation == Preallocation::Off {
        (0, 0)
    } else {
        (l1_size, o.size.div_ceil(cs))
    };
    let tail = l1_clusters + n_l2 + n_data;
    let per = cs * 8 / o.refcount_bits;
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + tail;
        let rb2 = total.div_ceil(per);
        let rt2 = (rb2 * 8).div_ceil(cs);
        if (rt2, rb2) == (rt, rb) {
            break;
        }
        (rt, rb) = (rt2, rb2);
    }
    let total = 1 + rt + rb + tail;
    let mut h = Header {
        version: o.version,
        cluster_bits,
        size: o.size,
        l1_size: u32::try_from(l1_size).map_err(|_| invalid("size too large".into()))?,
        l1_table_offset: (1 + rt + rb) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: u32::try_from(rt).map_err(|_| invalid("size too large".into()))?,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: if o.extended_l2 { INCOMPAT_EXTL2 } else { 0 }
            | if o.compression == Compression::Zlib {
                0
            } else {
                INCOMPAT_COMPRESSION
            },
        compatible: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order,
        header_length: if o.version == 3 {
            super::header::V3_HEADER_LEN
        } else {
            super::header::V2_HEADER_LEN
        },
        compression: o.compression,
        tail: if o.version == 3 {
            vec![0; 7]
        } else {
            Vec::new()
        },
        extensions: Vec::new(),
        backing: o
            .backing
            .as_ref()
            .map(|(n, f)| (n.clone(), Some(f.clone()))),
    };
    if o.version == 2 {
        h.tail.clear();
    }
    let hdr = h.encode().map_err(|e| invalid(e.to_string()))?;
    let mut table = vec![0u64; usize::try_from(rt * cs / 8).unwrap_or(0)];
    let mut pieces = vec![(0, hdr)];
    let per_us = usize::try_from(per).unwrap_or(1);
    let counts = vec![1u64; usize::try_from(total).unwrap_or(0)];
    for (bi, chunk) in counts.chunks(per_us).enumerate() {
        let mut b = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for i in 0..chunk.len() {
            set_entry(&mut b, refcount_order, i as u64, 1);
        }
        let off = (1 + rt + bi as u64) * cs;
        table[bi] = off;
        pieces.push((off, b));
    }
    pieces.push((cs, encode_words(&table)));
    let l2_start = 1 + rt + rb + l1_clusters;
    let data_start = l2_start + n_l2;
    if n_l2 > 0 {
        let l1: Vec<u64> = (0..n_l2).map(|j| ((l2_start + j) * cs) | COPIED).collect();
        pieces.push(((1 + rt + rb) * cs, encode_words(&l1)));
        let words_per_entry = if o.extended_l2 { 2 } else { 1 };
        for j in 0..n_l2 {
            let mut l2 = Vec::with_capacity(usize::try_from(cs / 8).unwrap_or(0));
            for k in 0..l2_entries {
                let i = j * l2_entries + k;
                if i < n_data {
                    l2.push(((data_start + i) * cs) | COPIED);
                    if words_per_entry == 2 {
                        // No subcluster allocated yet (the cluster reserved), as QEMU leaves
                        // them: the first write to each allocates it in place.
                        l2.push(0);
                    }
                }
            }
            pieces.push(((l2_start + j) * cs, encode_words(&l2)));
        }
    }
    Ok((pieces, total * cs, data_start * cs))
}

/// Writes a new, empty qcow2 image over `file`, whatever it held: checks the options, then
/// truncates it and writes the metadata.
pub fn write(file: &HostFile, o: &CreateOptions) -> Result<(), Error> {
    let (pieces, len, data) = layout(o)?;
    file.set_len(0)?;
    file.set_len(len)?;
    for (off, b) in pieces {
        file.write_at(&b, off)?;
    }
    o.preallocation.allocate(file, data, len - data)?;
    file.sync()
}

/// Empties the qcow2 image in `file` (which `h`, its parsed header, describes) in place: qemu-img
/// commit's last step. The image keeps its size, cluster size, refcount width, version, lazy
/// refcounts, L2 format and backing file, and afterwards reads entirely from its backing file.
///
/// First the L1 table is zeroed and synced, which alone makes the image empty (every cluster it
/// held only leaks); then the fresh tables are written, the header last, and the file is cut to
/// their end. An image with internal snapshots is refused (emptying would drop them).
pub fn make_empty(file: &HostFile, h: &Header) -> Result<(), Error> {
    if h.nb_snapshots > 0 {
        return Err(invalid(format!(
            "the image has {} internal snapshots, which emptying it would drop",
            h.nb_snapshots
        )));
    }
    let backing = match &h.backing {
        None => None,
        Some((name, Some(fmt))) => Some((name.clone(), fmt.clone())),
        Some((name, None)) => {
            return Err(invalid(format!(
                "the backing file {name} has no recorded format"
            )))
        }
    };
    let o = CreateOptions {
        size: h.size,
        cluster_size: h.cluster_size(),
        version: h.version,
        refcount_bits: 1 << h.refcount_order,
        lazy_refcounts: h.compatible & COMPAT_LAZY_REFCOUNTS != 0,
        extended_l2: h.extended_l2(),
        compression: h.compression,
        backing,
        preallocation: Preallocation::Off,
    };
    let (pieces, len, _) = layout(&o)?;
    let l1_bytes = usize::try_from(u64::from(h.l1_size) * 8).unwrap_or(0);
    file.write_at(&vec![0u8; l1_bytes], h.l1_table_offset)?;
    file.sync()?;
    let (header, tables): (Vec<_>, Vec<_>) = pieces.into_iter().partition(|(off, _)| *off == 0);
    for (off, b) in tables.into_iter().chain(header) {
        if off == 0 {
            file.sync()?;
        }
        file.write_at(&b, off)?;
    }
    file.sync()?;
    file.set_len(len)?;
    file.sync()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bad_options_are_refused() {
        for o in [
            CreateOptions {
                cluster_size: 1000,
                ..Default::default()
            },
            CreateOptions {
                cluster_size: 256,
                ..Default::default()
            },
            CreateOptions {
                refcount_bits: 3,
                ..Default::default()
            },
            CreateOptions {
                version: 2,
                lazy_refcounts: true,
                ..Default::default()
            },
            CreateOptions {
                extended_l2: true,
                cluster_size: 4096,
                ..Default::default()
            },
            CreateOptions {
                size: 1 << 60,
                cluster_size: 512,
                ..Default::default()
            },
        ] {
            assert!(matches!(layout(&o), Err(Error::InvalidOption(_))), "{o:?}");
        }
    }

    #[test]
    fn layout_parses_back() {
        let o = CreateOptions {
            size: 1 << 30,
            backing: Some(("base.raw".into(), "raw".into())),
            ..Default::default()
        };
        let (pieces, len, _) = layout(&o).unwrap();
        assert_eq!(len, 4 * 65536);
        let h = Header::parse(&pieces[0].1).unwrap();
        assert_eq!(h.backing, Some(("base.raw".into(), Some("raw".into()))));
        assert_eq!(h.l1_table_offset, 3 * 65536);
    }
}
