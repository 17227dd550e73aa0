//! Everything that can be wrong with a qcow2 image's metadata, each with its own variant, and the
//! limits that keep hostile header fields from sizing allocations (QEMU's `QCOW_MAX_*` values).

use crate::ErrorKind;

/// qcow2 magic, "QFI\xfb" (qcow2 spec, "Header").
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size: 512 bytes (`cluster_bits` >= 9, spec).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size: 2 MiB (`cluster_bits` <= 21, spec and QEMU).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table QEMU opens: 32 MiB (`QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens: 8 MiB (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots QEMU opens (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name (spec: "must not be longer than 1023 bytes").
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size QEMU creates: 2^61 bytes (`QCOW_MAX_VIRTUAL_SIZE` bound on offsets).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// A malformed or unsupported qcow2 image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The file is shorter than a qcow2 header.
    #[error("file too short for a qcow2 header ({len} bytes)")]
    Truncated {
        /// File length.
        len: u64,
    },
    /// The first four bytes are not the qcow2 magic.
    #[error("bad qcow2 magic {0:#x}")]
    BadMagic(u32),
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    BadVersion(u32),
    /// `cluster_bits` outside 9..=21.
    #[error("cluster_bits {0} outside 9..=21")]
    ClusterBits(u32),
    /// A v3 header length below 104 or not a multiple of 8.
    #[error("bad v3 header length {0}")]
    HeaderLength(u32),
    /// The header (with its extensions) does not fit in the first cluster.
    #[error("header of {len} bytes exceeds the first cluster ({cluster} bytes)")]
    HeaderExceedsCluster {
        /// Header length.
        len: u64,
        /// Cluster size.
        cluster: u64,
    },
    /// `refcount_order` above 6 (64-bit refcounts), or not 4 in a v2 image.
    #[error("bad refcount_order {0}")]
    RefcountOrder(u32),
    /// An encrypted image (`crypt_method` non-zero).
    #[error("encrypted images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// Incompatible feature bits this engine does not know.
    #[error("unknown incompatible features {0:#x}")]
    UnknownIncompatible(u64),
    /// The corrupt bit is set and the open asks for writing.
    #[error("image is marked corrupt; it can only be opened read-only")]
    CorruptBit,
    /// The image keeps its data in an external data file.
    #[error("external data files are not supported")]
    ExternalDataFile,
    /// The compression type byte is unknown or disagrees with its feature bit.
    #[error("bad compression type {0}")]
    CompressionType(u8),
    /// Extended L2 entries with clusters below 16 KiB (QEMU's minimum).
    #[error("extended L2 entries need clusters of at least 16 KiB (cluster_bits {0})")]
    ExtendedL2ClusterSize(u32),
    /// The virtual size is beyond what the format addresses.
    #[error("virtual size {0} too large")]
    VirtualSize(u64),
    /// The L1 table is larger than QEMU's limit.
    #[error("L1 table of {0} entries too large")]
    L1TooLarge(u32),
    /// The L1 table cannot map the whole virtual disk.
    #[error("L1 table of {l1_size} entries too small for {size} bytes")]
    L1TooSmall {
        /// L1 entries.
        l1_size: u32,
        /// Virtual size.
        size: u64,
    },
    /// A metadata table offset that is not cluster aligned.
    #[error("{table} offset {offset:#x} is not cluster aligned")]
    TableMisaligned {
        /// Which table.
        table: &'static str,
        /// The offset.
        offset: u64,
    },
    /// A metadata table that lies (partly) past the end of the file.
    #[error("{table} at {offset:#x} ({len} bytes) is past the end of the file ({file_len} bytes)")]
    TablePastEnd {
        /// Which table.
        table: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// File length.
        file_len: u64,
    },
    /// The refcount table is larger than QEMU's limit, or empty.
    #[error("refcount table of {0} clusters out of range")]
    RefcountTableSize(u32),
    /// More internal snapshots than QEMU's limit.
    #[error("too many snapshots ({0})")]
    TooManySnapshots(u32),
    /// A header extension runs past the end of its area.
    #[error("header extension at {offset:#x} runs past {end:#x}")]
    ExtensionOverrun {
        /// The extension's offset.
        offset: u64,
        /// End of the area it must fit in.
        end: u64,
    },
    /// The backing file name is longer than 1023 bytes.
    #[error("backing file name of {0} bytes is longer than 1023")]
    BackingNameTooLong(u32),
    /// The backing file name lies (partly) outside the first cluster.
    #[error("backing file name at {offset:#x} ({len} bytes) lies outside the first cluster")]
    BackingNameOutsideCluster {
        /// Name offset.
        offset: u64,
        /// Name length.
        len: u32,
    },
    /// The backing file name overlaps the header.
    #[error("backing file name at {offset:#x} overlaps the header (ends at {header_end:#x})")]
    BackingNameOverlapsHeader {
        /// Name offset.
        offset: u64,
        /// End of the header.
        header_end: u64,
    },
    /// The backing file name overlaps the header extensions.
    #[error("backing file name at {offset:#x} overlaps the header extensions")]
    BackingNameOverlapsExtensions {
        /// Name offset.
        offset: u64,
    },
    /// The backing file name is not UTF-8 (or contains a NUL).
    #[error("backing file name is not a valid path")]
    BackingNameInvalid,
    /// The backing format extension names a format this engine does not open.
    #[error("unsupported backing format {0:?}")]
    BackingFormat(String),
    /// An L1 entry with reserved bits set or a misaligned L2 table offset.
    #[error("bad L1 entry {entry:#x} at index {index}")]
    BadL1Entry {
        /// L1 index.
        index: u64,
        /// The raw entry.
        entry: u64,
    },
    /// An L2 entry with reserved bits set, a misaligned offset, or an impossible bitmap.
    #[error("bad L2 entry {entry:#x} for guest offset {guest:#x}")]
    BadL2Entry {
        /// Guest offset it maps.
        guest: u64,
        /// The raw entry.
        entry: u64,
    },
    /// A refcount table entry with reserved bits set or a misaligned block offset.
    #[error("bad refcount table entry {entry:#x} at index {index}")]
    BadRefcountEntry {
        /// Table index.
        index: u64,
        /// The raw entry.
        entry: u64,
    },
    /// Metadata or data that points at host offset 0 or past the file's addressable range.
    #[error("metadata points at host offset {0:#x}, which overlaps the header")]
    PointsAtHeader(u64),
    /// A compressed cluster that does not decompress to a whole cluster.
    #[error("compressed cluster at {host:#x} for guest offset {guest:#x} does not decompress")]
    Decompress {
        /// Guest offset.
        guest: u64,
        /// Host offset of the compressed data.
        host: u64,
    },
    /// A refcount would exceed the width of a refcount entry.
    #[error("refcount of cluster {0:#x} overflows")]
    RefcountOverflow(u64),
    /// A refcount would drop below zero.
    #[error("refcount of cluster {0:#x} is already zero")]
    RefcountUnderflow(u64),
    /// A data write would land on metadata (QEMU's overlap check): the image is now marked
    /// corrupt and nothing was written.
    #[error("write of {len} bytes at host offset {host:#x} would overwrite the {what}")]
    MetadataOverlap {
        /// Host offset of the write.
        host: u64,
        /// Its length.
        len: u64,
        /// The metadata structure it overlaps.
        what: &'static str,
    },
    /// The image was marked corrupt while open: every further write is refused.
    #[error("image was marked corrupt; writes are refused")]
    MarkedCorrupt,
    /// A data cluster lies (partly) past the end of the file.
    #[error("data at host offset {host:#x} ({len} bytes) for guest offset {guest:#x} is past the end of the file ({file_len} bytes)")]
    DataPastEnd {
        /// Guest offset read.
        guest: u64,
        /// Host offset of the data.
        host: u64,
        /// Length read.
        len: u64,
        /// File length.
        file_len: u64,
    },
    /// A dirty image (lazy refcounts) whose references are broken: its refcounts cannot be
    /// rebuilt safely, so it is not opened for writing (`check -r all` reports and repairs
    /// what it can).
    #[error("cannot rebuild the refcounts of a dirty image with {corruptions} corruptions (first: {first})")]
    DirtyImageCorrupt {
        /// Corruptions found.
        corruptions: u64,
        /// The first one's message.
        first: String,
    },
    /// A snapshot table entry that runs past the table or the file.
    #[error("snapshot table entry {0} is malformed")]
    BadSnapshot(u32),
}

impl FormatError {
    /// The stable category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Encrypted(_)
            | FormatError::UnknownIncompatible(_)
            | FormatError::ExternalDataFile
            | FormatError::BadVersion(_)
            | FormatError::BackingFormat(_) => ErrorKind::Unsupported,
            FormatError::CorruptBit => ErrorKind::Unsupported,
            _ => ErrorKind::Corrupt,
        }
    }
}
