//! qcow2 images (QEMU's `docs/interop/qcow2.txt`), v2 and v3, split by specification section:
//! `header` (header, extensions, backing name), `validate` (limits and errors), `l2` (cluster
//! mapping entries), `cache` (bounded table caches), `meta` (metadata state and write ordering),
//! `refcount` (refcounts and allocation), `compress`, `decompressed` (the last clusters
//! decompressed), `compressed_write` (compressed clusters of
//! `convert -c`), `write` (allocation and copy-on-write),
//! `snapshot` (the snapshot table), `snapshot_ops` (creating, applying and deleting internal
//! snapshots), `check` (consistency check and refcount rebuild), `overlap`
//! (no data write lands on metadata; no data read past the end of the file), `create`.
//!
//! Locking: one reader-writer lock guards the metadata (`Meta`). A lookup whose L2 table is
//! cached takes it shared, so lookups from many threads run in parallel; loading a table or
//! changing a mapping takes it exclusively. Data reads, and writes to clusters that are ours
//! alone, happen after it is released, so independent requests overlap on the host file. A
//! write that needs a new cluster plans under the lock, fills the cluster without it and
//! publishes the L2 entry under it again (`write.rs`), so nobody sees an entry before its data.
//! Requests doing I/O without the lock hold a [`DirectPin`], which keeps a cluster freed
//! meanwhile from being reused under them. A flush copies the dirty tables under the lock and
//! writes and syncs them without it (`meta.rs`; write-backs are serialized by their own mutex),
//! copy-up reads (the backing image's too) happen in the fill step, and a discard takes the lock
//! once per L2 table's worth of clusters. A full cache whose least recently used table is dirty
//! goes over its size, and the request that filled it writes the dirty tables back after
//! releasing the lock, as a flush does (`Qcow2::make_room`); so does a new refcount block, made in
//! the cache with its table entry owed, and a growing refcount table, built in memory and
//! switched to by the next write-back (`refcount.rs`). A request finding a cache at its overdraft
//! (`cache.rs`) releases the lock and waits for, or runs, an eviction write-back before going on
//! (`Qcow2::lock_with_room`). Still written and synced under the lock, only on paths that hold
//! the write-backs' mutex or the image alone: the close path, checks, internal snapshots and
//! resizing.

pub mod amend;
mod backing_name;
mod cache;
mod cache_size;
pub mod check;
mod compress;
mod compressed_write;
pub mod create;
mod decompressed;
mod header;
mod l2;
mod meta;
mod overlap;
mod refcount;
pub(crate) mod resize;
pub mod snapshot;
mod snapshot_ops;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
mod validate;
mod write;

use std::collections::BTreeSet;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) use backing_name::rewrite_header;
pub use cache_size::{CacheSizeError, CacheSizes, CacheTables};
pub use compressed_write::CompressedWriter;
pub use header::{Compression, Header};
pub use l2::Mapping;
pub use validate::FormatError;

/// The qcow2 magic number, for format probing.
pub fn validate_magic() -> u32 {
    validate::MAGIC
}

use crate::buffers::{BufPool, DIRECT_ALIGN};
use crate::direct::{push_extent, DirectPin, DirectTarget, Epochs, Extent, FlushPlan};
use crate::file::HostFile;
use crate::trace;
use crate::{Allocation, BlockStatus, DiskImage, Error};
use cache::TableCache;
use compress::{compressed_scratch_len, COMPRESSED_KEEP};
use header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use l2::Geometry;
use meta::{decode_words, Meta};

/// Groups of clusters sharing a claim condition variable (see `write.rs`).
const CLAIM_GROUPS: usize = 16;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    file: HostFile,
    read_only: bool,
    /// The virtual size; grows while the image is open (`resize.rs`).
    size: AtomicU64,
    geo: Geometry,
    compression: Compression,
    version: u32,
    backing: Option<Box<crate::Image>>,
    /// The metadata cache size options the image was opened with, which a reopen keeps.
    cache_sizes: CacheSizes,
    meta: RwLock<Meta>,
    /// Held by a flush from its copy of the dirty metadata to its end, and by the other
    /// write-backs: flushes run one at a time, without holding `meta` while they write and sync.
    flushing: Mutex<()>,
    /// Guest clusters a slow-path write is working on (see `write.rs`), and their waiters.
    busy: Mutex<HashSet<u64>>,
    /// Signalled when a claim ends, one per group of clusters so that a release wakes only the
    /// requests waiting on clusters of its group.
    busy_done: [Condvar; CLAIM_GROUPS],
    /// Requests doing I/O without the metadata lock, each counted by a [`DirectPin`] from before
    /// its lookup until its data I/O ends; the allocator reuses a freed cluster only once every
    /// request that began before its release has ended.
    epochs: Arc<Epochs>,
    /// Where the metadata lies, for the overlap checks of data writes (see `overlap.rs`).
    overlap: Arc<overlap::Overlap>,
    /// Buffers for reading and decompressing compressed clusters, lent per read.
    compressed_bufs: BufPool,
    /// The last few clusters decompressed, in buffers of `compressed_bufs`'s size.
    decompressed: decompressed::Decompressed,
}

/// The metadata lock of a path that may write tables under it to make room
/// ([`Qcow2::lock_for_maintenance`]); guest requests taking the lock afterwards never do.
struct Maintenance<'a>(RwLockWriteGuard<'a, Meta>);

impl std::ops::Deref for Maintenance<'_> {
    type Target = Meta;

    fn deref(&self) -> &Meta {
        &self.0
    }
}

impl std::ops::DerefMut for Maintenance<'_> {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.0
    }
}

impl Drop for Maintenance<'_> {
    fn drop(&mut self) {
        self.0.room_by_writing = false;
    }
}

/// What `Qcow2::open` needs besides the file.
#[derive(Debug)]
pub struct OpenParts {
    /// The opened (and locked) host file.
    pub file: HostFile,
    /// Read-only open.
    pub read_only: bool,
    /// The metadata cache sizes.
    pub cache_sizes: CacheSizes,
}

fn fmt_err(f: &HostFile, source: FormatError) -> Error {
    Error::Format {
        path: f.path().to_string(),
        source,
    }
}

/// Reads a table of `count` 64-bit words at `offset`, after checking it lies inside the file
/// (so the allocation is bounded by the file's real size).
fn read_table(
    f: &HostFile,
    file_len: u64,
    table: &'static str,
    offset: u64,
    count: u64,
) -> Result<Vec<u64>, Error> {
    let len = count * 8;
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(fmt_err(
            f,
            FormatError::TablePastEnd {
                table,
                offset,
                len,
                file_len,
            },
        ));
    }
    let mut b = vec![0u8; usize::try_from(len).unwrap_or(0)];
    f.read_at(&mut b, offset)?;
    Ok(decode_words(&b))
}

/// Reads and parses the header of an open qcow2 file.
pub fn read_header(f: &HostFile) -> Result<Header, Error> {
    let file_len = f.len()?;
    let mut probe = vec![0u8; header::PROBE_LEN];
    f.read_at(&mut probe, 0)?;
    let probe_len = usize::try_from(file_len)
        .unwrap_or(usize::MAX)
        .min(probe.len());
    let bits = header::probe_cluster_bits(&probe[..probe_len]).map_err(|e| fmt_err(f, e))?;
    let first = (1u64 << bits).min(file_len);
    let mut b = vec![0u8; usize::try_from(first).unwrap_or(0)];
    f.read_at(&mut b, 0)?;
    Header::parse(&b).map_err(|e| fmt_err(f, e))
}

impl Qcow2 {
    /// Opens a qcow2 image on an already opened file; `backing` is its opened backing image
    /// (the caller resolves and opens it from `header.backing`).
    pub fn open(
        parts: OpenParts,
        header: Header,
        backing: Option<Box<crate::Image>>,
    ) -> Result<Qcow2, Error> {
        let OpenParts {
            file: f,
            read_only,
            cache_sizes,
        } = parts;
        if !read_only && header.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(fmt_err(&f, FormatError::CorruptBit));
        }
        let file_len = f.len()?;
        let cs = header.cluster_size();
        let l1 = read_table(
            &f,
            file_len,
            "L1 table",
            header.l1_table_offset,
            u64::from(header.l1_size),
        )?;
        let rc_table = read_table(
            &f,
            file_len,
            "refcount table",
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs / 8,
        )?;
        if header.nb_snapshots > 0 && header.snapshots_offset >= file_len {
            return Err(fmt_err(
                &f,
                FormatError::TablePastEnd {
                    table: "snapshot table",
                    offset: header.snapshots_offset,
                    len: 0,
                    file_len,
                },
            ));
        }
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            extended: header.extended_l2(),
        };
        let l2_entry_bytes = if geo.extended { 16 } else { 8 };
        let caps = cache_sizes
            .tables(cs, header.size, l2_entry_bytes)
            .map_err(|source| Error::CacheSize {
                path: f.path().to_string(),
                source,
            })?;
        let epochs = Arc::new(Epochs::default());
        let overlap = Arc::new(overlap::Overlap::new(file_len));
        let meta = Meta {
            geo,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(caps.l2),
            rc_table,
            rc_blocks: TableCache::new(caps.refcount),
            free_hint: 1,
            end: file_len.div_ceil(cs),
            pending_frees: Vec::new(),
            rc_entries_owed: BTreeSet::new(),
            rc_table_new: None,
            rc_tables_unused: Vec::new(),
            owed: meta::Owed::default(),
            stamps: 0,
            written: Arc::default(),
            unsynced: false,
            room_by_writing: false,
            epochs: Arc::clone(&epochs),
            quarantine: refcount::Quarantine::default(),
            overlap: Arc::clone(&overlap),
            header,
        };
        let img = Qcow2 {
            read_only,
            size: AtomicU64::new(meta.header.size),
            geo,
            compression: meta.header.compression,
            version: meta.header.version,
            backing,
            cache_sizes,
            meta: RwLock::new(meta),
            flushing: Mutex::new(()),
            busy: Mutex::new(HashSet::new()),
            busy_done: std::array::from_fn(|_| Condvar::new()),
            epochs,
            overlap,
            compressed_bufs: BufPool::new(COMPRESSED_KEEP),
            decompressed: decompressed::Decompressed::default(),
            file: f,
        };
        if !read_only {
            img.prepare_for_writing()?;
        }
        Ok(img)
    }

    /// On a read-write open: rebuilds the refcounts of a dirty image (lazy refcounts), and clears
    /// the dirty bit and every autoclear bit (we maintain none of the autoclear features).
    fn prepare_for_writing(&self) -> Result<(), Error> {
        let mut m = self.lock_for_maintenance();
        let dirty = m.header.incompatible & INCOMPAT_DIRTY != 0;
        if dirty {
            check::rebuild_refcounts(&self.file, &mut m)?;
        }
        self.overlap.build(&self.file, &m)?;
        if dirty || m.header.autoclear != 0 {
            let mut header = m.header.clone();
            header.incompatible &= !INCOMPAT_DIRTY;
            header.autoclear = 0;
            let b = header.encode().map_err(|e| fmt_err(&self.file, e))?;
            self.file.write_at(&b, 0)?;
            m.sync(&self.file)?;
            // Only now: a failed write leaves the header as the disk has it.
            m.header = header;
        }
        Ok(())
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Meta> {
        // A poisoned lock means a panic mid-update on another thread; the metadata in memory is
        // what that thread left, which is no worse than a crash, so keep going.
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Serializes flushes and the other write-backs of the metadata.
    fn flushing(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data: a panic elsewhere leaves nothing to repair.
        self.flushing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the dirty metadata back and syncs the file, with the metadata lock held only to
    /// copy the dirty tables and, afterwards, to mark clean those unchanged since and apply the
    /// reference drops they made durable (`meta.rs`): a flush, and a discard's write-back.
    fn write_back(&self) -> Result<(), Error> {
        let _flushing = self.flushing();
        // No copied table is freed before `settle`: tables are freed only through
        // `pending_frees`, which only write-backs holding `flushing` apply.
        let copies = self.lock().copy_dirty(true);
        let written = copies.write(&self.file);
        let mut m = self.lock();
        let settled = m.settle(&self.file, &copies, written);
        // Requests that found the caches over their size while this ran left them to it.
        m.trim();
        settled
    }

    /// Releases the metadata lock, then brings the caches back within their sizes if a table
    /// loaded under it left them over (see [`Qcow2::make_room`]).
    fn unlock(&self, m: RwLockWriteGuard<'_, Meta>) {
        let over = m.over_size();
        drop(m);
        if over {
            self.make_room();
        }
    }

    /// Brings caches over their size back within it: writes the dirty tables back without the
    /// metadata lock (an eviction write-back, `meta.rs`), then drops the least recently used
    /// clean tables (the new table that went over the size is the most recently used). Skipped
    /// while another write-back runs, which trims the caches when it ends. A failure is only
    /// logged: the tables stay dirty, and the next flush writes them or reports it.
    fn make_room(&self) {
        let flushing = match self.flushing.try_lock() {
            Ok(g) => g,
            // Guards no data: a panic elsewhere leaves nothing to repair.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if let Err(e) = self.evict(flushing) {
            log::warn!("{}: evicting metadata tables failed: {e}", self.file.path());
        }
    }

    /// An eviction write-back, the write-backs' mutex held (`flushing`): if a cache is over its
    /// size, writes the dirty tables without the metadata lock (`meta.rs`), then drops the
    /// least recently used clean tables.
    fn evict(&self, flushing: MutexGuard<'_, ()>) -> Result<(), Error> {
        let copies = {
            let mut m = self.lock();
            if !m.over_size() {
                return Ok(());
            }
            m.copy_dirty(false)
        };
        let written = copies.write(&self.file);
        let mut m = self.lock();
        let settled = m.settle(&self.file, &copies, written);
        m.trim();
        drop(flushing);
        settled
    }

    /// The metadata lock for a guest request, which may add tables to the caches: while a cache
    /// holds its whole overdraft of dirty tables (`cache.rs`), the request releases the lock,
    /// waits for the write-back in flight and runs one itself if still needed, then retries;
    /// so memory stays bounded and no sync happens under the lock. A failed write-back is the
    /// request's error (the tables stay dirty and owed). Never called holding the write-backs'
    /// mutex.
    fn lock_with_room(&self) -> Result<RwLockWriteGuard<'_, Meta>, Error> {
        loop {
            let m = self.lock();
            if !m.at_overdraft() {
                return Ok(m);
            }
            drop(m);
            self.evict(self.flushing())?;
        }
    }

    /// The metadata lock for a path holding the write-backs' mutex (a check, a snapshot
    /// operation, a resize) or alone with the image (opening, closing): a cache at its
    /// overdraft makes room by writing a dirty table under the lock ([`Meta::room_by_writing`]).
    fn lock_for_maintenance(&self) -> Maintenance<'_> {
        let mut m = self.lock();
        m.room_by_writing = true;
        Maintenance(m)
    }

    fn lock_shared(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The header as it stands (for `info`).
    pub fn header(&self) -> Header {
        self.lock_shared().header.clone()
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.lock_shared().header.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&crate::Image> {
        self.backing.as_deref()
    }

    /// The host file.
    pub fn file(&self) -> &HostFile {
        &self.file
    }

    /// The metadata cache size options the image was opened with.
    pub fn cache_sizes(&self) -> CacheSizes {
        self.cache_sizes
    }

    /// Looks up the mapping of `guest` with the metadata locked by the caller; returns it and
    /// the length of the run from `guest` that shares it (within one cluster, or the span of an
    /// unallocated L2 table).
    fn lookup_locked(&self, m: &mut Meta, guest: u64) -> Result<(Mapping, u64), Error> {
        if let Some(r) = self.lookup_cached(m, guest)? {
            return Ok(r);
        }
        let (l2, _) = m.l1_entry(&self.file, m.l1_index(guest))?;
        m.load_l2(&self.file, l2)?;
        let (entry, bitmap) = m.l2_words(l2, guest);
        self.decode(entry, bitmap, guest)
    }

    /// The lookup when it needs no table read: `None` when the L2 table is not cached.
    fn lookup_cached(&self, m: &Meta, guest: u64) -> Result<Option<(Mapping, u64)>, Error> {
        let (l2, _) = m.l1_entry(&self.file, m.l1_index(guest))?;
        if l2 == 0 {
            let span = self.geo.cluster_size() * self.geo.l2_entries();
            return Ok(Some((Mapping::Unallocated, span - guest % span)));
        }
        match m.l2_words_cached(l2, guest) {
            Some((entry, bitmap)) => self.decode(entry, bitmap, guest).map(Some),
            None => Ok(None),
        }
    }

    fn decode(&self, entry: u64, bitmap: u64, guest: u64) -> Result<(Mapping, u64), Error> {
        let r = self
            .geo
            .decode(entry, bitmap, guest)
            .map_err(|e| fmt_err(&self.file, e))?;
        if let Mapping::Data { host, .. } = r.0 {
            if host < self.geo.cluster_size() {
                return Err(fmt_err(&self.file, FormatError::PointsAtHeader(host)));
            }
        }
        Ok(r)
    }

    /// Looks up the mapping of `guest`: under the shared lock when its L2 table is cached (so
    /// lookups from many threads run in parallel), else under the exclusive lock to load it.
    pub fn lookup(&self, guest: u64) -> Result<(Mapping, u64), Error> {
        self.lookup_then(guest, || ())
            .map(|(map, run, ())| (map, run))
    }

    /// Looks up the mapping of `guest` for I/O done without the lock: the pin, taken while the
    /// lock that answered is still held, keeps the clusters it names from being reused until
    /// it is dropped (a pin taken before waiting for the lock would hold back reuse while
    /// waiting).
    fn lookup_pinned(&self, guest: u64) -> Result<(Mapping, u64, DirectPin), Error> {
        self.lookup_then(guest, || DirectPin::enter(&self.epochs))
    }

    /// `lookup`, calling `then` while the lock that answered is still held.
    fn lookup_then<T>(
        &self,
        guest: u64,
        then: impl FnOnce() -> T,
    ) -> Result<(Mapping, u64, T), Error> {
        {
            let m = self.lock_shared();
            if let Some((map, run)) = self.lookup_cached(&m, guest)? {
                return Ok((map, run, then()));
            }
        }
        let mut m = self.lock_with_room()?;
        let (map, run) = self.lookup_locked(&mut m, guest)?;
        let then = then();
        self.unlock(m);
        Ok((map, run, then))
    }

    /// Reads `buf` at `guest` given its mapping (no metadata lock needed).
    fn read_mapped(&self, m: Mapping, buf: &mut [u8], guest: u64) -> Result<(), Error> {
        match m {
            Mapping::Unallocated => self.read_backing(buf, guest),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                self.check_data_read(guest, host, buf.len() as u64)?;
                trace::data(|| self.file.read_at(buf, host))
            }
            Mapping::Compressed { host, len } => self.read_compressed(buf, guest, host, len),
        }
    }

    /// Reads `buf` at `guest` from the compressed cluster stored in `len` bytes at `host`: the
    /// aligned blocks holding the stream are read (so `O_DIRECT` needs no bounce of its own) into
    /// one buffer of `compressed_bufs` and decompressed into another, kept among the last few
    /// decompressed (`decompressed`) for the reads that follow.
    fn read_compressed(
        &self,
        buf: &mut [u8],
        guest: u64,
        host: u64,
        len: u64,
    ) -> Result<(), Error> {
        let cs = self.geo.cluster_size();
        let align = DIRECT_ALIGN as u64;
        let start = host / align * align;
        // The descriptor's sector count bounds `len` by twice the cluster size (l2.rs).
        let span = (host - start + len).next_multiple_of(align);
        let (Ok(span), Ok(cs_len), Ok(skip), Ok(at)) = (
            usize::try_from(span),
            usize::try_from(cs),
            usize::try_from(host - start),
            usize::try_from(guest % cs),
        ) else {
            return Err(fmt_err(&self.file, FormatError::Decompress { guest, host }));
        };
        let (epochs, pool) = (&*self.epochs, &self.compressed_bufs);
        if self.decompressed.read(epochs, pool, host, cs_len, at, buf) {
            return Ok(());
        }
        let scratch_len = compressed_scratch_len(cs_len);
        let mut input = self.compressed_bufs.take(scratch_len);
        let mut cluster = self.compressed_bufs.take(scratch_len);
        let result = (|| {
            let input = input
                .as_mut_slice()
                .get_mut(..span)
                .ok_or_else(|| fmt_err(&self.file, FormatError::Decompress { guest, host }))?;
            trace::data(|| self.file.read_at(input, start))?;
            let cluster = &mut cluster.as_mut_slice()[..cs_len];
            if !compress::decompress(self.compression, &input[skip..], cluster) {
                return Err(fmt_err(&self.file, FormatError::Decompress { guest, host }));
            }
            buf.copy_from_slice(&cluster[at..at + buf.len()]);
            Ok(())
        })();
        self.compressed_bufs.give(input);
        if result.is_ok() {
            self.decompressed.keep(epochs, pool, host, cluster);
        } else {
            self.compressed_bufs.give(cluster);
        }
        result
    }

    /// Reads from the backing image, or zeroes past its end or without one.
    fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<(), Error> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = usize::try_from(bsize.saturating_sub(guest))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (inside, past) = buf.split_at_mut(avail);
        if !inside.is_empty() {
            trace::backing(|| b.read_at(inside, guest))?;
        }
        past.fill(0);
        Ok(())
    }

    /// Reads the virtual disk (range already checked), taking the metadata lock per lookup.
    fn read_virtual(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let (mut map, run, _io) = self.lookup_pinned(guest)?;
            let mut n = usize::try_from(run)
                .unwrap_or(usize::MAX)
                .min(buf.len() - pos);
            // Merge following clusters that continue the same host run into one read.
            while let Mapping::Data { host, copied } = map {
                let next = guest + n as u64;
                if pos + n >= buf.len() {
                    break;
                }
                match self.lookup(next)? {
                    (Mapping::Data { host: h2, .. }, r2) if h2 == host + n as u64 => {
                        n = (n + usize::try_from(r2).unwrap_or(usize::MAX)).min(buf.len() - pos);
                        map = Mapping::Data { host, copied };
                    }
                    _ => break,
                }
            }
            self.read_mapped(map, &mut buf[pos..pos + n], guest)?;
            pos += n;
        }
        Ok(())
    }

    /// Checks a request's range and, for a modifying one, that the image is writable.
    fn check_request(&self, offset: u64, len: u64, write: bool) -> Result<(), Error> {
        crate::check_request(offset, len, self.size(), write, self.read_only)?;
        if write {
            self.refuse_if_corrupt()?;
        }
        Ok(())
    }
}

impl DiskImage for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check_request(offset, buf.len() as u64, false)?;
        self.read_virtual(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.check_request(offset, buf.len() as u64, true)?;
        self.write_inner(buf, offset)
    }

    fn flush(&self) -> Result<(), Error> {
        if self.read_only {
            return Ok(());
        }
        self.write_back()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.check_request(offset, len, true)?;
        self.discard_inner(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Error> {
        self.check_request(offset, len, true)?;
        self.write_zeroes_inner(offset, len, may_unmap)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.check_request(offset, len, false)?;
        let (m, run) = self.lookup(offset)?;
        let allocation = match m {
            Mapping::Unallocated if self.backing.is_some() => Allocation::Backing,
            Mapping::Unallocated | Mapping::Zero { .. } => Allocation::Zero,
            Mapping::Data { host, .. } => Allocation::Data {
                host_offset: Some(host),
            },
            Mapping::Compressed { .. } => Allocation::Data { host_offset: None },
        };
        Ok(BlockStatus {
            allocation,
            len: run.min(len),
        })
    }

    fn direct_target(&self) -> Option<DirectTarget> {
        Some(self.file.direct_target(if self.read_only {
            FlushPlan::Skip
        } else {
            FlushPlan::Image
        }))
    }

    /// Maps only data clusters of this image whose L2 tables are cached, with the metadata lock
    /// free right now; for a write, only clusters that are ours alone (the fast path of
    /// `write_inner`). Zero, unallocated (backing) and compressed clusters, and anything needing
    /// allocation or copy-on-write, stay with the image's own methods.
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        self.check_request(offset, len, write).ok()?;
        let m = self.meta.try_read().ok()?;
        // Under the lock, so that a cluster freed after the lookup is not reused under our I/O.
        let pin = DirectPin::enter(&self.epochs);
        let mut pos = 0;
        while pos < len {
            let guest = offset + pos;
            let (map, run) = self.lookup_cached(&m, guest).ok()??;
            let n = run.min(len - pos);
            match map {
                Mapping::Data { host, copied } if copied || !write => {
                    if !push_extent(extents, host, n) {
                        return None;
                    }
                }
                _ => return None,
            }
            pos += n;
        }
        self.extents_pass(extents, write).then_some(pin)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let mut m = self.lock_for_maintenance();
        // The first pass may queue refcount drops that the second writes.
        for _ in 0..2 {
            if !m.has_dirty() {
                break;
            }
            if let Err(e) = m.write_back(&self.file).and_then(|()| self.file.sync()) {
                log::error!(
                    "{}: writing back metadata on close failed: {e}",
                    self.file.path()
                );
                break;
            }
        }
    }
}
