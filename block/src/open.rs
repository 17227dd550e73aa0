//! Opening images by path: the format (given, or probed only where probing is safe), the
//! read-only flag, the cache mode, QEMU-compatible locks, and the backing chain, each backing
//! image opened read-only, its name resolved against the directory of the image that names it,
//! a chain that loops (the same file twice, by device and inode) refused.
//!
//! And creating them: [`NewImage`] opens the target without truncating it, and writes nothing
//! until it holds the target's write lock and has checked that the new image does not name
//! itself as its backing file, so a create never destroys an image another process uses.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::direct::{DirectPin, DirectTarget, Extent};
use crate::file::{CacheMode, FileId, HostFile};
use crate::probe::{sniff, Probed};
use crate::qcow2::{self, create::CreateOptions, CacheSizeError, CacheSizes, OpenParts, Qcow2};
use crate::{lock, BlockStatus, DiskImage, Error, Raw};

/// Deepest backing chain opened.
const MAX_CHAIN: usize = 256;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl Format {
    /// Parses qemu-img's format names.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }

    /// qemu-img's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// The format; `None` probes (only for images a user names, never for backing files).
    pub format: Option<Format>,
    /// Open read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// Take QEMU-compatible locks (`false` is qemu-img's `-U`, for reading only).
    pub lock: bool,
    /// qcow2 metadata cache sizes, for this image (its backing images get the defaults, as in
    /// QEMU, where each node has its own options); a size given for a raw image is refused.
    pub cache_sizes: CacheSizes,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: true,
            cache: CacheMode::Writeback,
            lock: true,
            cache_sizes: CacheSizes::default(),
        }
    }
}

/// An open image of either format.
#[derive(Debug)]
pub enum Image {
    /// A raw image.
    Raw(Raw),
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
}

impl Image {
    /// The format.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The host file of this image (not of its backing images).
    pub fn file(&self) -> &HostFile {
        match self {
            Image::Raw(r) => r.file(),
            Image::Qcow2(q) => q.file(),
        }
    }

    /// The qcow2 metadata cache size options this image (not its backing images) was opened
    /// with: none given for a raw image.
    pub fn cache_sizes(&self) -> CacheSizes {
        match self {
            Image::Raw(_) => CacheSizes::default(),
            Image::Qcow2(q) => q.cache_sizes(),
        }
    }

    /// This image and its backing images, top first.
    pub fn chain(&self) -> impl Iterator<Item = &Image> {
        std::iter::successors(Some(self), |i| match i {
            Image::Raw(_) => None,
            Image::Qcow2(q) => q.backing(),
        })
    }

    /// Drops (`false`) or takes back (`true`) the write permission's lock byte of this image,
    /// opened for writing, keeping its consistent-read lock and its refusal to share write: a
    /// live snapshot turns the old top into a backing file this way, which a read-only open of
    /// the same file (the new chain's) may then share. Nobody else can take write meanwhile (the
    /// refusal stays), so taking it back checks nothing.
    pub fn set_write_permission(&self, write: bool) -> Result<(), Error> {
        let file = self.file();
        lock::set_write_permission(file.file(), file.path(), write)
    }

    /// Grows the virtual disk of this image (not of its backing images) to `new_size` bytes,
    /// durably, while it may be in use: a raw file is extended, a qcow2 image grows as
    /// [`Qcow2::grow`] says. A smaller size or a read-only image is refused.
    pub fn grow(&self, new_size: u64) -> Result<(), Error> {
        match self {
            Image::Raw(r) => r.grow(new_size),
            Image::Qcow2(q) => q.grow(new_size),
        }
    }

    fn inner(&self) -> &dyn DiskImage {
        match self {
            Image::Raw(r) => r,
            Image::Qcow2(q) => q.as_ref(),
        }
    }
}

impl DiskImage for Image {
    fn size(&self) -> u64 {
        self.inner().size()
    }
    fn read_only(&self) -> bool {
        self.inner().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.inner().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.inner().write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), Error> {
        self.inner().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.inner().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Error> {
        self.inner().write_zeroes(offset, len, may_unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.inner().block_status(offset, len)
    }
    fn direct_target(&self) -> Option<DirectTarget> {
        self.inner().direct_target()
    }
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        self.inner().map_direct(offset, len, write, extents)
    }
}

/// The format of `file` by its magic; a format this engine does not read is refused by name.
fn probe_file(file: &HostFile) -> Result<Format, Error> {
    match sniff(file)? {
        Probed::Qcow2 => Ok(Format::Qcow2),
        Probed::Raw => Ok(Format::Raw),
        Probed::Foreign(format) => Err(Error::ForeignFormat {
            path: file.path().to_string(),
            format,
        }),
    }
}

/// Guesses the format of an image a user names: qcow2 when it carries the qcow2 magic, raw when
/// it carries no magic known; an image of another format QEMU reads (vmdk, vhdx, vpc, vdi, qed,
/// qcow, dmg, luks) is refused with the qemu-img command that converts it.
pub fn probe(path: &Path) -> Result<Format, Error> {
    probe_file(&HostFile::open(path, true, CacheMode::Writeback)?)
}

/// Opens an image and its backing chain.
pub fn open(path: &Path, opts: OpenOptions) -> Result<Image, Error> {
    let mut seen = HashSet::new();
    open_in_chain(path, opts, &mut seen, path)
}

/// Whether probing may settle on raw for an image opened for writing. The callers differ on
/// purpose: qemu-img guesses raw (QEMU warns), while a VMM that guesses raw lets a guest write a
/// qcow2 header into the first sector and make the next start open host files as its backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritableRaw {
    /// A writable image without a format opens as raw when it carries no magic (qemu-img's rule).
    Guess,
    /// A writable image without a format that probes as raw is refused
    /// ([`Error::UnsafeProbe`]); the probe runs before the image is opened, so a refused image
    /// is never opened for writing nor locked.
    Refuse,
}

/// Opens an image a user names and its backing chain: with `opts.format`, or probed under the
/// `writable_raw` rule.
pub fn open_named(
    path: &Path,
    opts: OpenOptions,
    writable_raw: WritableRaw,
) -> Result<Image, Error> {
    if opts.format.is_some() || writable_raw == WritableRaw::Guess {
        return open(path, opts);
    }
    let format = probe(path)?;
    if format == Format::Raw && !opts.read_only {
        return Err(Error::UnsafeProbe {
            path: path.display().to_string(),
        });
    }
    let opts = OpenOptions {
        format: Some(format),
        ..opts
    };
    open(path, opts)
}

fn open_in_chain(
    path: &Path,
    opts: OpenOptions,
    seen: &mut HashSet<FileId>,
    top: &Path,
) -> Result<Image, Error> {
    let file = HostFile::open(path, opts.read_only, opts.cache)?;
    if !seen.insert(file.id()) {
        return Err(Error::BackingLoop {
            path: path.display().to_string(),
        });
    }
    if seen.len() > MAX_CHAIN {
        return Err(Error::BackingTooDeep {
            path: top.display().to_string(),
            max: MAX_CHAIN,
        });
    }
    if opts.lock {
        lock::lock_image(file.file(), file.path(), !opts.read_only)?;
    }
    open_file(file, path, opts, seen, top)
}

/// Opens the image in `file` (already checked against the chain and locked) and its backing
/// chain.
fn open_file(
    file: HostFile,
    path: &Path,
    opts: OpenOptions,
    seen: &mut HashSet<FileId>,
    top: &Path,
) -> Result<Image, Error> {
    let format = match opts.format {
        Some(f) => f,
        None => probe_file(&file)?,
    };
    if format == Format::Raw {
        if let Some(option) = opts.cache_sizes.first_given() {
            return Err(Error::CacheSize {
                path: path.display().to_string(),
                source: CacheSizeError::NotQcow2(option),
            });
        }
        return Ok(Image::Raw(Raw::new(file, opts.read_only)?));
    }
    let header = qcow2::read_header(&file)?;
    let backing = match &header.backing {
        None => None,
        Some((name, fmt)) => {
            let bpath = resolve_backing(path, name);
            let bformat = match fmt.as_deref() {
                Some(s) => Some(Format::parse(s).ok_or_else(|| Error::Format {
                    path: path.display().to_string(),
                    source: qcow2::FormatError::BackingFormat(s.to_string()),
                })?),
                None => Some(probe_backing(path, &bpath, name)?),
            };
            let bopts = OpenOptions {
                format: bformat,
                read_only: true,
                cache_sizes: CacheSizes::default(),
                ..opts
            };
            let img = open_in_chain(&bpath, bopts, seen, top).map_err(|e| match e {
                e @ (Error::BackingLoop { .. } | Error::BackingTooDeep { .. }) => e,
                e => Error::Backing {
                    path: path.display().to_string(),
                    backing: bpath.display().to_string(),
                    source: Box::new(e),
                },
            })?;
            Some(Box::new(img))
        }
    };
    let parts = OpenParts {
        file,
        read_only: opts.read_only,
        cache_sizes: opts.cache_sizes,
    };
    Ok(Image::Qcow2(Box::new(Qcow2::open(parts, header, backing)?)))
}

/// A backing file without a format: raw is safe (it names nothing); one that looks like qcow2 is
/// refused, since its header may have been written by a guest, and so is one of a format this
/// engine does not read.
fn probe_backing(path: &Path, bpath: &Path, name: &str) -> Result<Format, Error> {
    let f = HostFile::open(bpath, true, CacheMode::Writeback)?;
    let probed = probe_file(&f).map_err(|e| Error::Backing {
        path: path.display().to_string(),
        backing: bpath.display().to_string(),
        source: Box::new(e),
    })?;
    match probed {
        Format::Qcow2 => Err(Error::BackingProbe {
            path: path.display().to_string(),
            name: name.to_string(),
        }),
        Format::Raw => Ok(Format::Raw),
    }
}

/// Resolves a backing file name against the directory of the image that names it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let n = Path::new(name);
    if n.is_absolute() {
        return n.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(n),
        None => n.to_path_buf(),
    }
}

/// An image held open read-write under its write lock (so nobody else has it open for
/// writing), with neither its tables nor its chain opened: for the edits `rebase -u`, `commit`
/// and `resize` make to the image as a whole.
#[derive(Debug)]
pub struct Exclusive {
    file: HostFile,
    path: PathBuf,
    format: Format,
}

impl Exclusive {
    /// Opens and locks the image at `path`, of `format` or probed. An image of a format this
    /// engine does not read is named; a corrupt qcow2 image is refused, as for any read-write
    /// open.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Exclusive, Error> {
        let file = HostFile::open(path, false, CacheMode::Writeback)?;
        lock::lock_image(file.file(), file.path(), true)?;
        let format = match format {
            Some(f) => f,
            None => probe_file(&file)?,
        };
        let ex = Exclusive {
            file,
            path: path.to_path_buf(),
            format,
        };
        if format == Format::Qcow2 && ex.header()?.corrupt() {
            return Err(ex.format_error(qcow2::FormatError::CorruptBit));
        }
        Ok(ex)
    }

    /// Whether the image is qcow2.
    pub fn is_qcow2(&self) -> bool {
        self.format == Format::Qcow2
    }

    /// The virtual size.
    pub fn size(&self) -> Result<u64, Error> {
        match self.format {
            Format::Raw => self.file.len(),
            Format::Qcow2 => Ok(self.header()?.size),
        }
    }

    /// Changes the virtual size: a raw file is cut or extended; a qcow2 image, opened on this
    /// file without its backing chain, grows or shrinks (see [`Qcow2::resize`]).
    pub fn resize(self, new_size: u64) -> Result<(), Error> {
        match self.format {
            Format::Raw => {
                self.file.set_len(new_size)?;
                self.file.sync()
            }
            Format::Qcow2 => {
                let header = self.header()?;
                let parts = OpenParts {
                    file: self.file,
                    read_only: false,
                    cache_sizes: CacheSizes::default(),
                };
                Qcow2::open(parts, header, None)?.resize(new_size)
            }
        }
    }

    fn format_error(&self, source: qcow2::FormatError) -> Error {
        Error::Format {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The qcow2 header as it is on disk (a raw image fails here, on the qcow2 magic).
    fn header(&self) -> Result<qcow2::Header, Error> {
        qcow2::read_header(&self.file)
    }

    /// Records a new backing file (name and format) in the header, or none: the name is stored
    /// right after the extensions' end marker. A name that resolves to the image itself is
    /// refused.
    pub fn set_backing(&self, backing: Option<(String, String)>) -> Result<(), Error> {
        if let Some((name, _)) = &backing {
            let bpath = resolve_backing(&self.path, name);
            if FileId::of_path(&bpath) == Some(self.file.id()) {
                return Err(Error::OwnBacking {
                    path: self.path.display().to_string(),
                    backing: bpath.display().to_string(),
                });
            }
        }
        self.edit_header(|h| h.backing = backing.map(|(name, fmt)| (name, Some(fmt))))
    }

    /// Rewrites the header after `edit`: only the first cluster changes, in one write, synced.
    /// The caller keeps the header true to the image (`amend` checks before it flips a bit).
    pub fn edit_header(&self, edit: impl FnOnce(&mut qcow2::Header)) -> Result<(), Error> {
        let old = self.header()?;
        let mut header = old.clone();
        edit(&mut header);
        qcow2::rewrite_header(&self.file, &old, &header)
    }

    /// Rewrites the refcount structures of this clean qcow2 image with `2^order`-bit entries
    /// (see [`qcow2::amend::set_refcount_order`]).
    pub fn set_refcount_order(&self, order: u32) -> Result<(), Error> {
        qcow2::amend::set_refcount_order(&self.file, order)
    }

    /// Turns the unallocated zero clusters of this qcow2 image without a backing file into
    /// unallocated entries (see [`qcow2::amend::unallocate_zero_clusters`]); returns how many.
    pub fn unallocate_zero_clusters(&self) -> Result<u64, Error> {
        qcow2::amend::unallocate_zero_clusters(&self.file)
    }

    /// Empties the image: afterwards it reads entirely from its backing file (see
    /// [`qcow2::create::make_empty`]).
    pub fn make_empty(&self) -> Result<(), Error> {
        qcow2::create::make_empty(&self.file, &self.header()?)
    }
}

/// A file about to receive a new image: opened (created when missing) but not truncated, and
/// checked to be a regular file or a block device. Nothing in it changes before
/// [`NewImage::format`] holds its write lock.
#[derive(Debug)]
pub struct NewImage {
    file: HostFile,
    path: PathBuf,
    created: bool,
}

impl NewImage {
    /// Opens `path` as the target of a new image.
    pub fn open(path: &Path) -> Result<NewImage, Error> {
        let (file, created) = HostFile::create(path)?;
        Ok(NewImage {
            file,
            path: path.to_path_buf(),
            created,
        })
    }

    /// The target's identity, to compare with the files a command reads.
    pub fn id(&self) -> FileId {
        self.file.id()
    }

    /// Writes an empty image of `format` over the target, after taking its write lock (QEMU's
    /// lock bytes: refused while anyone else has the file open without `force-share`) and
    /// checking that the backing file named in `o` is not the target itself. A file this
    /// `NewImage` created is removed again when that fails.
    pub fn format(&self, format: Format, o: &CreateOptions) -> Result<(), Error> {
        let r = self.lock_and_write(format, o);
        if r.is_err() && self.created {
            // Best effort: the error being reported matters more than a leftover empty file.
            let _ = std::fs::remove_file(&self.path);
        }
        r
    }

    fn lock_and_write(&self, format: Format, o: &CreateOptions) -> Result<(), Error> {
        lock::lock_image(self.file.file(), self.file.path(), true)?;
        if let Some((name, _)) = &o.backing {
            let backing = resolve_backing(&self.path, name);
            if FileId::of_path(&backing) == Some(self.id()) {
                return Err(Error::OwnBacking {
                    path: self.file.path().to_string(),
                    backing: backing.display().to_string(),
                });
            }
        }
        match format {
            Format::Qcow2 => qcow2::create::write(&self.file, o),
            Format::Raw => {
                if o.preallocation == qcow2::create::Preallocation::Metadata {
                    return Err(Error::InvalidOption(
                        "Unsupported preallocation mode: metadata".into(),
                    ));
                }
                self.file.set_len(0)?;
                self.file.set_len(o.size)?;
                o.preallocation.allocate(&self.file, 0, o.size)?;
                self.file.sync()
            }
        }
    }

    /// Opens the image [`NewImage::format`] wrote, read-write, keeping its lock, its backing
    /// chain with the same host cache mode.
    pub fn into_image(self, format: Format, cache: CacheMode) -> Result<Image, Error> {
        let opts = OpenOptions {
            format: Some(format),
            read_only: false,
            cache,
            ..Default::default()
        };
        let mut seen = HashSet::from([self.file.id()]);
        open_file(self.file, &self.path, opts, &mut seen, &self.path)
    }

    /// Opens the qcow2 image [`NewImage::format`] wrote, read-write, keeping its lock, over
    /// `backing` (see [`open_over`]).
    pub fn into_image_over(self, backing: Image) -> Result<Image, Error> {
        qcow2_over(self.file, backing)
    }
}

/// Opens the qcow2 image at `path` read-write under its write lock, over `backing`, an open
/// chain, instead of the chain its header names: an overlay put over a disk in use keeps the
/// disk's chain as that disk opened it, whatever the name in its header resolves to. `backing`
/// must not hold the file at `path`.
pub fn open_over(path: &Path, cache: CacheMode, backing: Image) -> Result<Image, Error> {
    let file = HostFile::open(path, false, cache)?;
    if backing
        .chain()
        .any(|member| member.file().id() == file.id())
    {
        return Err(Error::BackingLoop {
            path: path.display().to_string(),
        });
    }
    lock::lock_image(file.file(), file.path(), true)?;
    qcow2_over(file, backing)
}

/// The qcow2 image in `file` (opened read-write and locked) over `backing`.
fn qcow2_over(file: HostFile, backing: Image) -> Result<Image, Error> {
    let header = qcow2::read_header(&file)?;
    let parts = OpenParts {
        file,
        read_only: false,
        cache_sizes: CacheSizes::default(),
    };
    Ok(Image::Qcow2(Box::new(Qcow2::open(
        parts,
        header,
        Some(Box::new(backing)),
    )?)))
}

/// Opens `chain` again, read-only and locked, with `cache`: each image by the name it was
/// opened with and with its own cache sizes, over the image below it as `chain` has it, never
/// by the backing names the headers hold (which need not resolve from where the chain was
/// opened); each name must still be the file `chain` opened ([`Error::Replaced`] otherwise).
pub fn reopen_read_only(chain: &Image, cache: CacheMode) -> Result<Image, Error> {
    let below = match chain {
        Image::Raw(_) => None,
        Image::Qcow2(q) => q
            .backing()
            .map(|b| reopen_read_only(b, cache))
            .transpose()?,
    };
    let opts = OpenOptions {
        cache,
        ..OpenOptions::default()
    };
    reopen_over(chain, opts, below)
}

/// Opens the file of `image` (that image alone) again by the name it was opened with, in its
/// format and with its cache sizes (as QEMU keeps a node's options when it reopens the node),
/// with `opts`' access, cache and locking (`opts.format` and `opts.cache_sizes` are ignored),
/// over `backing` instead of the chain its header names (a raw image has none): a chain changed
/// under a running disk is rebuilt from images it has open, whatever the names in headers
/// resolve to. The name must still be `image`'s file ([`Error::Replaced`] otherwise).
pub fn reopen_over(
    image: &Image,
    opts: OpenOptions,
    backing: Option<Image>,
) -> Result<Image, Error> {
    let path = image.file().path();
    let file = HostFile::open(Path::new(path), opts.read_only, opts.cache)?;
    if file.id() != image.file().id() {
        return Err(Error::Replaced {
            path: path.to_owned(),
        });
    }
    if opts.lock {
        lock::lock_image(file.file(), file.path(), !opts.read_only)?;
    }
    match image.format() {
        Format::Raw => Ok(Image::Raw(Raw::new(file, opts.read_only)?)),
        Format::Qcow2 => {
            let header = qcow2::read_header(&file)?;
            let parts = OpenParts {
                file,
                read_only: opts.read_only,
                cache_sizes: image.cache_sizes(),
            };
            Ok(Image::Qcow2(Box::new(Qcow2::open(
                parts,
                header,
                backing.map(Box::new),
            )?)))
        }
    }
}

/// Creates an image at `path`: a raw file of `o.size` bytes, or an empty qcow2 image (see
/// [`NewImage`]).
pub fn create(path: &Path, format: Format, o: &CreateOptions) -> Result<(), Error> {
    NewImage::open(path)?.format(format, o)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn qcow2(size: u64, backing: Option<&str>) -> CreateOptions {
        CreateOptions {
            size,
            backing: backing.map(|b| (b.to_string(), "qcow2".to_string())),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_image_is_written_only_under_its_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [3u8; 4096]).unwrap();
        // Another user reading it (refusing to share writes, as QEMU's readers do).
        let reader = HostFile::open(&p, true, CacheMode::Writeback).unwrap();
        lock::lock_image(reader.file(), reader.path(), false).unwrap();
        let new = NewImage::open(&p).unwrap();
        for format in [Format::Raw, Format::Qcow2] {
            let r = new.format(format, &qcow2(1 << 20, None));
            assert!(matches!(r, Err(Error::Locked { .. })), "{r:?}");
            assert_eq!(std::fs::read(&p).unwrap(), [3u8; 4096]);
        }
        drop(reader);
        new.format(Format::Raw, &qcow2(1 << 20, None)).unwrap();
        let img = new.into_image(Format::Raw, CacheMode::Writeback).unwrap();
        assert_eq!(img.size(), 1 << 20);
    }

    /// An overlay whose backing name does not resolve (a relative name written against another
    /// directory) opens over its chain as opened; a chain whose file was replaced under its name
    /// does not reopen.
    #[test]
    fn an_overlay_opens_over_the_chain_as_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
        create(&base, Format::Qcow2, &qcow2(1 << 20, None)).unwrap();
        create(&top, Format::Qcow2, &qcow2(1 << 20, Some("base.qcow2"))).unwrap();
        let sizes = CacheSizes::new(Some(128 << 10), None, Some(1 << 20)).unwrap();
        let opts = OpenOptions {
            read_only: false,
            cache_sizes: sizes,
            ..OpenOptions::default()
        };
        let disk = open(&top, opts).unwrap();
        disk.write_at(&[7u8; 512], 0).unwrap();
        disk.flush().unwrap();
        disk.set_write_permission(false).unwrap();
        let chain = reopen_read_only(&disk, CacheMode::Writeback).unwrap();
        let ids = |i: &Image| i.chain().map(|m| m.file().id()).collect::<Vec<_>>();
        assert_eq!(ids(&chain), ids(&disk));
        assert!(chain.read_only());
        // Each image keeps the cache sizes it was opened with (its backing, the defaults).
        let sizes_of = |i: &Image| i.chain().map(Image::cache_sizes).collect::<Vec<_>>();
        assert_eq!(sizes_of(&chain), [sizes, CacheSizes::default()]);
        let overlay = dir.path().join("overlay.qcow2");
        create(
            &overlay,
            Format::Qcow2,
            &qcow2(1 << 20, Some("elsewhere/top.qcow2")),
        )
        .unwrap();
        let image = open_over(&overlay, CacheMode::Writeback, chain).unwrap();
        let mut buf = [0u8; 512];
        image.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7u8; 512]);
        image.write_at(&[9u8; 512], 512).unwrap();
        drop(image);
        // By its name, the overlay's chain does not open.
        assert!(open(&overlay, OpenOptions::default()).is_err());

        std::fs::rename(&base, dir.path().join("moved.qcow2")).unwrap();
        create(&base, Format::Qcow2, &qcow2(1 << 20, None)).unwrap();
        let r = reopen_read_only(&disk, CacheMode::Writeback);
        assert!(matches!(r, Err(Error::Replaced { .. })), "{r:?}");
    }

    #[test]
    fn a_new_image_never_backs_itself() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        // A new file: refused, and not left behind.
        let r = create(&p, Format::Qcow2, &qcow2(1 << 20, Some("a.qcow2")));
        assert!(matches!(r, Err(Error::OwnBacking { .. })), "{r:?}");
        assert!(!p.exists());
        // An existing image, named through a hard link: refused, and untouched.
        std::fs::write(&p, [4u8; 4096]).unwrap();
        std::fs::hard_link(&p, dir.path().join("b.qcow2")).unwrap();
        let r = create(&p, Format::Qcow2, &qcow2(1 << 20, Some("b.qcow2")));
        assert!(matches!(r, Err(Error::OwnBacking { .. })), "{r:?}");
        assert_eq!(std::fs::read(&p).unwrap(), [4u8; 4096]);
    }

    #[test]
    fn only_a_writable_image_probed_as_raw_is_refused_and_before_it_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, [0u8; 4096]).unwrap();
        let q = dir.path().join("a.qcow2");
        create(&q, Format::Qcow2, &qcow2(1 << 20, None)).unwrap();
        let opts = |format, read_only| OpenOptions {
            format,
            read_only,
            ..Default::default()
        };
        let opened = |path: &Path, o, rule| open_named(path, o, rule).map(|i| i.format());
        // qemu-img's rule: raw is guessed, for writing too.
        let r = opened(&raw, opts(None, false), WritableRaw::Guess);
        assert_eq!(r.unwrap(), Format::Raw);
        // Refused: a writable raw image without a format, even while another writer holds it
        // (the probe comes first: nothing is opened for writing or locked).
        let writer = open(&raw, opts(Some(Format::Raw), false)).unwrap();
        let r = opened(&raw, opts(None, false), WritableRaw::Refuse);
        assert!(matches!(r, Err(Error::UnsafeProbe { .. })), "{r:?}");
        drop(writer);
        // Allowed: a read-only raw image, a named raw format, a writable qcow2 image.
        let r = opened(&raw, opts(None, true), WritableRaw::Refuse);
        assert_eq!(r.unwrap(), Format::Raw);
        let r = opened(&raw, opts(Some(Format::Raw), false), WritableRaw::Refuse);
        assert_eq!(r.unwrap(), Format::Raw);
        let r = opened(&q, opts(None, false), WritableRaw::Refuse);
        assert_eq!(r.unwrap(), Format::Qcow2);
    }

    #[test]
    fn a_chain_that_reaches_its_top_by_a_hard_link_loops() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        create(&a, Format::Qcow2, &qcow2(1 << 20, Some("b.qcow2"))).unwrap();
        std::fs::hard_link(&a, dir.path().join("b.qcow2")).unwrap();
        for read_only in [true, false] {
            let opts = OpenOptions {
                format: Some(Format::Qcow2),
                read_only,
                ..Default::default()
            };
            let r = open(&a, opts);
            assert!(matches!(r, Err(Error::BackingLoop { .. })), "{r:?}");
        }
    }
}
