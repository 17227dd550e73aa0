//! Raw images: the virtual disk is the host file, byte for byte. No metadata, so no lock: every
//! request goes straight to `pread`/`pwrite` from the caller's thread, or, mapped one to one, to an
//! engine that does the I/O itself. Block status comes from the
//! host file's holes (`SEEK_DATA`/`SEEK_HOLE`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::direct::{DirectPin, DirectTarget, Extent, FlushPlan};
use crate::file::HostFile;
use crate::trace;
use crate::{Allocation, BlockStatus, DiskImage, Error};

/// A raw image file.
#[derive(Debug)]
pub struct Raw {
    file: HostFile,
    /// The virtual size: the file's length, kept as [`Raw::grow`] sets it.
    size: AtomicU64,
    read_only: bool,
}

impl Raw {
    /// Wraps an opened host file; the virtual size is the file's length at open.
    pub fn new(file: HostFile, read_only: bool) -> Result<Raw, Error> {
        let size = file.len()?;
        Ok(Raw {
            file,
            size: AtomicU64::new(size),
            read_only,
        })
    }

    /// The host file's path.
    pub fn path(&self) -> &str {
        self.file.path()
    }

    /// The host file.
    pub fn file(&self) -> &HostFile {
        &self.file
    }

    /// Grows the file, and the virtual disk with it, to `new_size` bytes (durable before it
    /// returns); a smaller size is refused.
    pub fn grow(&self, new_size: u64) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let size = self.size();
        if new_size < size {
            return Err(Error::Shrink {
                path: self.path().to_owned(),
                size,
                new_size,
            });
        }
        self.file.set_len(new_size)?;
        self.file.sync()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), Error> {
        crate::check_request(offset, len, self.size(), write, self.read_only)
    }
}

impl DiskImage for Raw {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check(offset, buf.len() as u64, false)?;
        trace::data(|| self.file.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.check(offset, buf.len() as u64, true)?;
        trace::data(|| self.file.write_at(buf, offset))
    }

    fn flush(&self) -> Result<(), Error> {
        if self.read_only {
            return Ok(());
        }
        trace::data(|| self.file.sync())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.check(offset, len, true)?;
        self.file.punch_hole(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), Error> {
        self.check(offset, len, true)?;
        self.file.punch_hole(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.check(offset, len, false)?;
        let (data, end) = self.file.extent(offset)?;
        let allocation = if data {
            Allocation::Data {
                host_offset: Some(offset),
            }
        } else {
            Allocation::Zero
        };
        Ok(BlockStatus {
            allocation,
            len: end.saturating_sub(offset).clamp(1, len.max(1)),
        })
    }

    fn direct_target(&self) -> Option<DirectTarget> {
        Some(self.file.direct_target(if self.read_only {
            FlushPlan::Skip
        } else {
            FlushPlan::SyncData
        }))
    }

    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        self.check(offset, len, write).ok()?;
        extents.push(Extent { host: offset, len });
        Some(DirectPin::none())
    }
}
