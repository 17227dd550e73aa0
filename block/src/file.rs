//! A host file with positional I/O that reports errors with their context, and that honours
//! `O_DIRECT` (`cache=none`) by bouncing unaligned requests through an aligned buffer.
//!
//! Only regular files and block devices are images. Every open is non-blocking (`O_NONBLOCK`,
//! and `O_NOCTTY`), so a FIFO, a socket or a device whose open would wait or have side effects
//! is refused at once by its type, before any byte is read; the flag is cleared on the files that
//! are kept. Each file carries its identity (device and inode), which tells two names of one
//! file apart from two files whatever the symlinks and hard links between them.
//!
//! `HostFile` is shared by reference between threads: `pread`/`pwrite` need no lock. With
//! `O_DIRECT`, an unaligned write is a read-modify-write of the enclosing aligned blocks; callers
//! that write the same block from two threads at once must serialize themselves (the qcow2 engine
//! does so for everything but whole-cluster-aligned guest data).

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::Error;

pub(crate) use crate::buffers::{AlignedBuf, DIRECT_ALIGN};

/// How the host page cache is used, with QEMU's `cache=` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the host page cache; durability only on flush (`cache=writeback`).
    #[default]
    Writeback,
    /// Bypass the host page cache with `O_DIRECT` (`cache=none`).
    None,
}

impl CacheMode {
    /// Parses QEMU's names: `writeback`, `none` (and `directsync`-free subsets).
    pub fn parse(s: &str) -> Option<CacheMode> {
        match s {
            "writeback" => Some(CacheMode::Writeback),
            "none" => Some(CacheMode::None),
            _ => None,
        }
    }
}

/// The identity of a host file: its device and inode, the same through every name it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The identity of the file `path` names now (through symlinks), if it exists.
    pub fn of_path(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId::of(&m))
    }
}

/// The name of a file type that cannot hold an image; `None` for regular files and block
/// devices.
fn unusable_type(t: FileType) -> Option<&'static str> {
    if t.is_file() || t.is_block_device() {
        None
    } else if t.is_dir() {
        Some("directory")
    } else if t.is_fifo() {
        Some("FIFO")
    } else if t.is_socket() {
        Some("socket")
    } else if t.is_char_device() {
        Some("character device")
    } else {
        Some("special file")
    }
}

/// A host file opened for an image.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: String,
    direct: bool,
    id: FileId,
    /// A sync failed (see `sync`).
    sync_failed: std::sync::atomic::AtomicBool,
    /// Unit tests only: sees every write, sync and hole punch before it happens, and may fail it.
    #[cfg(test)]
    hook: std::sync::RwLock<Option<test_hook::Hook>>,
}

/// A test-only look at the file's modifying calls (unit tests observe orderings and inject
/// errors with it; it does not exist outside `cfg(test)`).
#[cfg(test)]
pub(crate) mod test_hook {
    /// A modifying call on the file.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        /// `pwrite` of `len` bytes at `offset`.
        Write { offset: u64, len: u64 },
        /// `fdatasync`.
        Sync,
        /// Hole punch of `len` bytes at `offset`.
        Punch { offset: u64, len: u64 },
    }

    /// Called before each call; an error is returned instead of doing it.
    pub type HookFn = dyn Fn(Op) -> std::io::Result<()> + Send + Sync;

    /// An installed hook.
    #[derive(Clone)]
    pub struct Hook(pub std::sync::Arc<HookFn>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }
}

fn is_aligned(v: u64) -> bool {
    v.is_multiple_of(DIRECT_ALIGN as u64)
}

impl HostFile {
    /// Opens `path` for reading, and for writing unless `read_only`, with the given cache mode.
    /// Anything but a regular file or a block device is refused without blocking.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<HostFile, Error> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        Self::open_with(path, &mut opts, cache)
    }

    /// Opens `path` for reading and writing, creating it when missing but never truncating it,
    /// as the target of a new image; anything but a regular file or a block device is refused
    /// without blocking. Also says whether this call created the file.
    pub fn create(path: &Path) -> Result<(HostFile, bool), Error> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        let r = match Self::open_with(path, &mut opts, CacheMode::Writeback) {
            Ok(f) => Ok((f, true)),
            Err(Error::Open { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                opts.create_new(false).create(true);
                Self::open_with(path, &mut opts, CacheMode::Writeback).map(|f| (f, false))
            }
            Err(e) => Err(e),
        };
        r.map_err(|e| match e {
            Error::Open { path, source } => Error::Create { path, source },
            e => e,
        })
    }

    /// Opens `path` non-blocking, keeps it only if it is a regular file or a block device, and
    /// then clears `O_NONBLOCK`.
    fn open_with(path: &Path, opts: &mut OpenOptions, cache: CacheMode) -> Result<HostFile, Error> {
        use std::os::fd::AsRawFd;
        let name = path.display().to_string();
        let direct = if cache == CacheMode::None {
            libc::O_DIRECT
        } else {
            0
        };
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | direct);
        let unusable = |kind| Error::NotAnImage {
            path: name.clone(),
            kind,
        };
        let file = match opts.open(path) {
            Ok(file) => file,
            Err(source) => {
                // open() refuses some of these files itself (EISDIR to a writer, ENXIO for a
                // socket or a FIFO without a reader): name them by their type.
                let odd = std::fs::metadata(path)
                    .ok()
                    .and_then(|m| unusable_type(m.file_type()));
                return Err(match odd {
                    Some(kind) => unusable(kind),
                    None => Error::Open { path: name, source },
                });
            }
        };
        let meta = file.metadata().map_err(|source| Error::Stat {
            path: name.clone(),
            source,
        })?;
        if let Some(kind) = unusable_type(meta.file_type()) {
            return Err(unusable(kind));
        }
        let fd = file.as_raw_fd();
        // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own, with integer arguments.
        let cleared = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
        };
        if !cleared {
            return Err(Error::Open {
                path: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(HostFile {
            file,
            path: name,
            direct: cache == CacheMode::None,
            id: FileId::of(&meta),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            hook: std::sync::RwLock::new(None),
        })
    }

    /// Installs (or with `None` removes) the test hook.
    #[cfg(test)]
    pub(crate) fn set_hook(&self, hook: Option<test_hook::Hook>) {
        *self.hook.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Runs the test hook on a call about to be made; its error reads as the call's own.
    #[cfg(test)]
    fn hook(&self, op: test_hook::Op) -> Result<(), Error> {
        let hook = self.hook.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(h) = hook else {
            return Ok(());
        };
        (h.0)(op).map_err(|e| match op {
            test_hook::Op::Write { offset, .. } => self.io_err("write", offset, e),
            test_hook::Op::Sync => self.io_err("flush", 0, e),
            test_hook::Op::Punch { offset, .. } => self.io_err("discard", offset, e),
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The file's identity (device and inode) when it was opened.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// This file as the target of an engine doing its own I/O, with the given flush.
    pub fn direct_target(&self, flush: crate::direct::FlushPlan) -> crate::direct::DirectTarget {
        use std::os::fd::AsRawFd;
        crate::direct::DirectTarget {
            fd: self.file.as_raw_fd(),
            aligned: self.direct,
            path: self.path.clone(),
            flush,
        }
    }

    /// The underlying file (for locks).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn io_err(&self, op: &'static str, offset: u64, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: self.path.clone(),
            offset,
            source,
        }
    }

    /// Length of the host file in bytes: a regular file's size, a block device's capacity
    /// (whose `stat` says 0).
    #[allow(clippy::len_without_is_empty)] // A file length, not a collection.
    pub fn len(&self) -> Result<u64, Error> {
        let stat_err = |source| Error::Stat {
            path: self.path.clone(),
            source,
        };
        let meta = self.file.metadata().map_err(stat_err)?;
        if !meta.file_type().is_block_device() {
            return Ok(meta.len());
        }
        // A block device's end is its capacity; the offset moved is never used (all I/O is
        // positioned).
        (&self.file).seek(SeekFrom::End(0)).map_err(stat_err)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        if self.direct && !(is_aligned(offset) && is_aligned(buf.len() as u64)) {
            return self.bounce_read(buf, offset);
        }
        if self.direct && buf.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
            let mut b = AlignedBuf::zeroed(buf.len());
            let tmp = &mut b.as_mut_slice()[..buf.len()];
            self.read_raw(tmp, offset)?;
            buf.copy_from_slice(tmp);
            return Ok(());
        }
        self.read_raw(buf, offset)
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("read", pos, e)),
            }
        }
        Ok(())
    }

    fn aligned_span(offset: u64, len: usize) -> (u64, usize) {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        // The span exceeds the request by less than two alignment units.
        let span = usize::try_from(end - start).expect("span of a request fits in usize");
        (start, span)
    }

    fn bounce_read(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let (start, span) = Self::aligned_span(offset, buf.len());
        let mut b = AlignedBuf::zeroed(span);
        let tmp = &mut b.as_mut_slice()[..span];
        self.read_raw(tmp, start)?;
        let skip = usize::try_from(offset - start).expect("skip is below the alignment");
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes all of `buf` at `offset`, extending the file when needed.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        if self.direct && !(is_aligned(offset) && is_aligned(buf.len() as u64)) {
            let (start, span) = Self::aligned_span(offset, buf.len());
            let mut b = AlignedBuf::zeroed(span);
            let tmp = &mut b.as_mut_slice()[..span];
            self.read_raw(tmp, start)?;
            let skip = usize::try_from(offset - start).expect("skip is below the alignment");
            tmp[skip..skip + buf.len()].copy_from_slice(buf);
            return self.write_raw(tmp, start);
        }
        if self.direct && buf.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
            let mut b = AlignedBuf::zeroed(buf.len());
            let tmp = &mut b.as_mut_slice()[..buf.len()];
            tmp.copy_from_slice(buf);
            return self.write_raw(tmp, offset);
        }
        self.write_raw(buf, offset)
    }

    fn write_raw(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        #[cfg(test)]
        self.hook(test_hook::Op::Write {
            offset,
            len: buf.len() as u64,
        })?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("write", offset, e))
    }

    /// Makes written data durable. Once a sync failed on a file written through the page
    /// cache, every later one fails too: Linux may have dropped the dirty pages it could not
    /// write, so a later sync would succeed without them (QEMU's file driver does the same).
    pub fn sync(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if self.sync_failed.load(Ordering::Acquire) {
            let e = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(self.io_err("flush after a failed flush", 0, e));
        }
        #[cfg(test)]
        let r = self.hook(test_hook::Op::Sync);
        #[cfg(not(test))]
        let r = Ok(());
        let r = r.and_then(|()| {
            self.file
                .sync_data()
                .map_err(|e| self.io_err("flush", 0, e))
        });
        if r.is_err() && !self.direct {
            self.sync_failed.store(true, Ordering::Release);
        }
        r
    }

    /// Sets the file length.
    pub fn set_len(&self, len: u64) -> Result<(), Error> {
        self.file
            .set_len(len)
            .map_err(|e| self.io_err("truncate", len, e))
    }

    /// Whether `offset` lies in data or in a hole of the host file, and where that changes
    /// (`SEEK_DATA`/`SEEK_HOLE`); file systems without them report everything as data.
    pub fn extent(&self, offset: u64) -> Result<(bool, u64), Error> {
        use std::os::fd::AsRawFd;
        let Ok(off) = i64::try_from(offset) else {
            return Ok((true, u64::MAX));
        };
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a descriptor we own; we only use positional I/O, so moving the file
        // position affects nothing.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok((false, u64::MAX)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((true, u64::MAX)),
                _ => Err(self.io_err("seek", offset, e)),
            };
        }
        if data > off {
            return Ok((false, u64::try_from(data).unwrap_or(u64::MAX)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        Ok((true, u64::try_from(hole).unwrap_or(u64::MAX)))
    }

    /// Deallocates a byte range of the host file (it reads back as zeroes), where the file system
    /// supports it; elsewhere writes zeroes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(self.io_err(
                "discard",
                offset,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        #[cfg(test)]
        self.hook(test_hook::Op::Punch { offset, len })?;
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    /// Allocates a byte range of the host file that reads as zeroes: reserved with `fallocate`
    /// (`full` false; an error where the file system cannot), or written with zeroes (`full`).
    pub fn preallocate(&self, offset: u64, len: u64, full: bool) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        if full {
            return self.write_zero_bytes(offset, len);
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(self.io_err(
                "preallocate",
                offset,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, l) };
        if r == 0 {
            return Ok(());
        }
        Err(self.io_err("preallocate", offset, std::io::Error::last_os_error()))
    }

    /// Writes zeroes over a byte range, 1 MiB at a time.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), Error> {
        let chunk = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < offset + len {
            let n = usize::try_from((offset + len - pos).min(1 << 20)).expect("at most 1 MiB");
            self.write_at(&chunk[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_past_end_are_zero_and_unaligned_direct_io_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 10000]).unwrap();
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let f = HostFile::open(&p, false, cache).unwrap();
            f.write_at(&[1, 2, 3], 4097).unwrap();
            let mut b = [9u8; 8];
            f.read_at(&mut b, 4095).unwrap();
            assert_eq!(b, [7, 7, 1, 2, 3, 7, 7, 7]);
            let mut e = [9u8; 4];
            f.read_at(&mut e, 20000).unwrap();
            assert_eq!(e, [0; 4]);
        }
    }

    #[test]
    fn odd_files_are_refused_by_their_type_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (path, want) in [
            (fifo.as_path(), "FIFO"),
            (dir.path(), "directory"),
            (sock.as_path(), "socket"),
            (Path::new("/dev/null"), "character device"),
        ] {
            for read_only in [true, false] {
                let r = HostFile::open(path, read_only, CacheMode::Writeback);
                assert!(
                    matches!(&r, Err(Error::NotAnImage { kind, .. }) if *kind == want),
                    "{path:?} read_only={read_only}: {r:?}"
                );
            }
            let r = HostFile::create(path);
            assert!(
                matches!(&r, Err(Error::NotAnImage { kind, .. }) if *kind == want),
                "create {path:?}: {r:?}"
            );
        }
    }

    #[test]
    fn kept_files_are_blocking_and_create_never_truncates() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let (f, created) = HostFile::create(&p).unwrap();
        assert!(created);
        f.write_at(&[5; 100], 0).unwrap();
        let (again, created) = HostFile::create(&p).unwrap();
        assert!(!created);
        assert_eq!(again.len().unwrap(), 100);
        assert_eq!(again.id(), f.id());
        assert_eq!(FileId::of_path(&p), Some(f.id()));
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let f = HostFile::open(&p, false, cache).unwrap();
            // SAFETY: F_GETFL on a descriptor we own.
            let flags = unsafe { libc::fcntl(f.file().as_raw_fd(), libc::F_GETFL) };
            assert_eq!(flags & libc::O_NONBLOCK, 0);
            assert_eq!(flags & libc::O_DIRECT != 0, cache == CacheMode::None);
        }
    }

    #[test]
    fn missing_file_is_an_open_error() {
        let r = HostFile::open(Path::new("/nonexistent/x"), true, CacheMode::Writeback);
        assert!(matches!(r, Err(Error::Open { .. })));
    }
}
