//! Opening images by path: the format (given, or probed only where probing is safe), the
//! read-only flag, the cache mode, QEMU-compatible locks, and the backing chain, each backing
//! image opened read-only, its name resolved against the directory of the image that names it,
//! a chain that loops refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::direct::{DirectPin, DirectTarget, Extent};
use crate::file::{CacheMode, HostFile};
use crate::qcow2::{self, create::CreateOptions, OpenParts, Qcow2};
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
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: true,
            cache: CacheMode::Writeback,
            lock: true,
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

fn starts_with_qcow2_magic(f: &HostFile) -> Result<bool, Error> {
    let mut m = [0u8; 4];
    f.read_at(&mut m, 0)?;
    Ok(u32::from_be_bytes(m) == qcow2::validate_magic())
}

/// Guesses the format of an image a user names: qcow2 when it carries the qcow2 magic, raw
/// otherwise.
pub fn probe(path: &Path) -> Result<Format, Error> {
    let f = HostFile::open(path, true, CacheMode::Writeback)?;
    Ok(if starts_with_qcow2_magic(&f)? {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Opens an image and its backing chain.
pub fn open(path: &Path, opts: OpenOptions) -> Result<Image, Error> {
    let mut seen = HashSet::new();
    open_in_chain(path, opts, &mut seen, path)
}

fn open_in_chain(
    path: &Path,
    opts: OpenOptions,
    seen: &mut HashSet<PathBuf>,
    top: &Path,
) -> Result<Image, Error> {
    let canon = std::fs::canonicalize(path).map_err(|source| Error::Open {
        path: path.display().to_string(),
        source,
    })?;
    if !seen.insert(canon) {
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
    let file = HostFile::open(path, opts.read_only, opts.cache)?;
    if opts.lock {
        lock::lock_image(file.file(), file.path(), !opts.read_only)?;
    }
    let format = match opts.format {
        Some(f) => f,
        None if starts_with_qcow2_magic(&file)? => Format::Qcow2,
        None => Format::Raw,
    };
    if format == Format::Raw {
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
                None => Some(probe_backing(path, &bpath)?),
            };
            let bopts = OpenOptions {
                format: bformat,
                read_only: true,
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
    };
    Ok(Image::Qcow2(Box::new(Qcow2::open(parts, header, backing)?)))
}

/// A backing file without a format: raw is safe (it names nothing); one that looks like qcow2 is
/// refused, since its header may have been written by a guest.
fn probe_backing(path: &Path, bpath: &Path) -> Result<Format, Error> {
    let f = HostFile::open(bpath, true, CacheMode::Writeback)?;
    if starts_with_qcow2_magic(&f)? {
        return Err(Error::BackingProbe {
            path: path.display().to_string(),
            backing: bpath.display().to_string(),
        });
    }
    Ok(Format::Raw)
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

/// Creates an image: a raw file of `o.size` bytes, or an empty qcow2 image.
pub fn create(path: &Path, format: Format, o: &CreateOptions) -> Result<(), Error> {
    match format {
        Format::Qcow2 => qcow2::create::create(path, o),
        Format::Raw => {
            let io = |source| Error::Create {
                path: path.display().to_string(),
                source,
            };
            let f = std::fs::File::create(path).map_err(io)?;
            f.set_len(o.size).map_err(io)
        }
    }
}
