//! `block-commit` of the active layer, as QEMU's active commit (a mirror job of type `commit`,
//! `block/mirror.c`): copies what the top and the images down to (not including) `base` hold
//! into `base` while the guest keeps writing to the top, tracking what the guest dirties;
//! once nothing is left to copy the job is ready (`BLOCK_JOB_READY`) and keeps copying what the
//! guest writes until `block-job-complete` switches the disk to `base`.
//!
//! Tracking: at the start the device's image is swapped (disk drained) for a [`Tracked`]
//! wrapper of the same top, which records the granules (the base's cluster size) every guest
//! write, write-zeroes or discard touched once it has completed, and sends no write the direct
//! way (a direct write would not be seen completing). The steps (job's thread) first mark
//! every granule some image above `base` allocates, then copy up to [`CHUNK`] bytes of dirty
//! granules each: the granules' bits are cleared before the top is read, so a guest write that
//! lands after the read sets them again and is copied again; none is lost.
//!
//! The end (main loop, disk drained in its context): `block-job-complete` copies what is still
//! dirty, flushes and closes the job's handle on `base`, reopens `base` read-write over the
//! chain below it, each image by the name the disk opened it with (never through the names in
//! headers), and hands it to the device's engine; the old chain is closed and the new one
//! takes its locks. Nothing's backing name changes (no image was above the top). Cancelled, or
//! `block-job-cancel` after ready (QEMU's completion without a switch), the device gets its
//! plain top back and the disk stays on it.

use std::sync::{Arc, Mutex, PoisonError};

use block::direct::{DirectPin, DirectTarget, Extent};
use block::{BlockStatus, DiskImage, Error, Image, OpenOptions, WithPolicy};

use super::stream::reopen_layers;
use super::{JobError, Jobs, NewJob, Step, StepError, Work};
use crate::monitor::VmDisk;

/// The most a step copies (QEMU's `MAX_IO_BYTES`).
const CHUNK: u64 = 1 << 20;

/// How much of the disk one step of the first scan looks at.
const SCAN: u64 = 64 << 20;

/// Which granules of the disk hold data the base may not have yet.
#[derive(Debug)]
pub(super) struct DirtyBitmap {
    granule: u64,
    bits: Mutex<Vec<bool>>,
}

impl DirtyBitmap {
    /// A clean bitmap of a `size`-byte disk, one bit per `granule` bytes.
    pub(super) fn new(size: u64, granule: u64) -> Self {
        let n = usize::try_from(size.div_ceil(granule)).unwrap_or(usize::MAX);
        Self {
            granule,
            bits: Mutex::new(vec![false; n]),
        }
    }

    fn bits(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        // Held only by the short, non-panicking code below.
        self.bits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks every granule `[offset, offset + len)` touches.
    pub(super) fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = usize::try_from(offset / self.granule).unwrap_or(usize::MAX);
        let last = usize::try_from((offset + len - 1) / self.granule).unwrap_or(usize::MAX);
        let mut bits = self.bits();
        let end = last.saturating_add(1).min(bits.len());
        for bit in bits.iter_mut().take(end).skip(first) {
            *bit = true;
        }
    }

    /// Clears and returns the first run of dirty granules at or after `from` (wrapping around
    /// to the start), at most `max` bytes: `(offset, len)`.
    pub(super) fn take_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut bits = self.bits();
        let start = usize::try_from(from / self.granule)
            .unwrap_or(0)
            .min(bits.len());
        let first = bits[start..]
            .iter()
            .position(|&b| b)
            .map(|i| i + start)
            .or_else(|| bits[..start].iter().position(|&b| b))?;
        let most = usize::try_from((max / self.granule).max(1)).unwrap_or(1);
        let mut n = 0;
        while n < most && bits.get(first + n) == Some(&true) {
            bits[first + n] = false;
            n += 1;
        }
        let to_u64 = |i: usize| u64::try_from(i).unwrap_or(u64::MAX);
        Some((to_u64(first) * self.granule, to_u64(n) * self.granule))
    }

    /// Bytes still dirty (whole granules).
    pub(super) fn dirty_bytes(&self) -> u64 {
        let n = self.bits().iter().filter(|&&b| b).count();
        u64::try_from(n).unwrap_or(u64::MAX) * self.granule
    }
}

/// The top as the device serves it during the job: every modifying request marks the
/// granules it touched once it has completed.
#[derive(Debug)]
pub(super) struct Tracked {
    inner: Arc<WithPolicy<Image>>,
    dirty: Arc<DirtyBitmap>,
}

impl Tracked {
    fn marked(&self, result: Result<(), Error>, offset: u64, len: u64) -> Result<(), Error> {
        // Marked even when the request failed: it may have changed part of the range.
        self.dirty.mark(offset, len);
        result
    }
}

impl DiskImage for Tracked {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.marked(self.inner.write_at(buf, offset), offset, len)
    }

    fn flush(&self) -> Result<(), Error> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.marked(self.inner.discard(offset, len), offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Error> {
        self.marked(self.inner.write_zeroes(offset, len, may_unmap), offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.inner.block_status(offset, len)
    }

    fn direct_target(&self) -> Option<DirectTarget> {
        self.inner.direct_target()
    }

    /// Reads only: a write mapped in place completes where this wrapper does not see it.
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        if write {
            return None;
        }
        self.inner.map_direct(offset, len, write, extents)
    }
}

#[derive(Debug)]
struct ActiveCommit {
    /// The disk's top as the job started.
    top: Option<Arc<WithPolicy<Image>>>,
    /// What the guest dirtied (and, after the scan, what is left to copy).
    dirty: Arc<DirtyBitmap>,
    /// The device serves the tracking wrapper (until the end puts something else in).
    tracking: bool,
    /// Depth of `base` in the chain.
    base_depth: usize,
    /// `base`, read-write, without locks; closed at the end.
    base: Option<Image>,
    /// Where the first scan is; the disk's size once it is done.
    scanned: u64,
    /// Where the next copy starts looking.
    cursor: u64,
    /// A chunk's worth, aligned for `O_DIRECT`, kept for the job's run.
    buf: block::AlignedBuf,
}

fn chain_error(e: &Error) -> String {
    devices::error_chain(e)
}

impl ActiveCommit {
    fn ended() -> String {
        "The job has ended".to_owned()
    }

    /// Marks what the images above `base` allocate in up to [`SCAN`] bytes from `scanned`.
    fn scan(&mut self) -> Result<(), StepError> {
        let top = self.top.as_ref().ok_or_else(StepError::ended)?.inner();
        let end = (self.scanned + SCAN).min(top.size());
        while self.scanned < end {
            let (depth, n) = top
                .allocated_at(self.scanned, end - self.scanned)
                .map_err(|e| StepError::read(&e, end - self.scanned))?;
            if depth.is_some_and(|d| d < self.base_depth) {
                self.dirty.mark(self.scanned, n);
            }
            self.scanned += n;
        }
        Ok(())
    }

    /// Copies one run of dirty granules into `base`; returns its length (0: none dirty).
    fn copy_run(&mut self) -> Result<u64, StepError> {
        let top = self.top.as_ref().ok_or_else(StepError::ended)?.inner();
        let base = self.base.as_ref().ok_or_else(StepError::ended)?;
        let Some((offset, len)) = self.dirty.take_run(self.cursor, CHUNK) else {
            return Ok(0);
        };
        let len = len.min(top.size().saturating_sub(offset));
        let size = usize::try_from(len).map_err(|e| StepError::Other(e.to_string()))?;
        let buf = &mut self.buf.as_mut_slice()[..size];
        let copied = match top.read_at(buf, offset) {
            Ok(()) => base
                .write_at(buf, offset)
                .map_err(|e| StepError::write(&e, len)),
            Err(e) => Err(StepError::read(&e, len)),
        };
        if let Err(e) = copied {
            // Still to copy, should the job be resumed after an error one day.
            self.dirty.mark(offset, len);
            return Err(e);
        }
        self.cursor = offset + len;
        Ok(len)
    }

    /// Serves the plain top again, if the device still serves the wrapper.
    fn untrack(&mut self, disk: &VmDisk) {
        if self.tracking {
            self.tracking = !serve_plain_top(disk);
        }
    }
}

/// Hands the device the disk's plain top again (disk drained); whether it did.
fn serve_plain_top(disk: &VmDisk) -> bool {
    let live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
    let top = Arc::clone(&live.top) as Arc<dyn DiskImage>;
    drop(live);
    match disk.device.with_drained_io(|aio| aio.replace_image(top)) {
        Ok(_) => true,
        Err(e) => {
            // The wrapper keeps serving the same top correctly, only without direct writes.
            log::error!(
                "{}: cannot stop tracking writes: {}",
                disk.info.drive_id,
                devices::error_chain(&e)
            );
            false
        }
    }
}

impl Work for ActiveCommit {
    fn step(&mut self, _offset: u64) -> Result<Step, StepError> {
        let size = self.top.as_ref().ok_or_else(StepError::ended)?.size();
        if self.scanned < size {
            self.scan()?;
            return Ok(Step {
                advanced: 0,
                copied: 0,
                remaining: (self.scanned >= size).then(|| self.dirty.dirty_bytes()),
            });
        }
        let n = self.copy_run()?;
        Ok(Step {
            advanced: n,
            copied: n,
            remaining: Some(self.dirty.dirty_bytes()),
        })
    }

    fn finish(&mut self, disk: &mut VmDisk) -> Result<(), String> {
        let mut live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
        let base_path = self
            .base
            .as_ref()
            .ok_or_else(Self::ended)?
            .file()
            .path()
            .to_owned();
        let cache = live.cache;
        let (policy, detect_zeroes) = (live.policy, live.detect_zeroes);
        let switched = disk.device.with_drained_io(|aio| -> Result<_, String> {
            // Nothing in flight and nothing coming: what is dirty now is all that is left.
            while self.copy_run().map_err(|e| e.to_string())? > 0 {}
            let base = self.base.take().ok_or_else(Self::ended)?;
            base.flush()
                .map_err(|e| format!("Could not flush '{base_path}': {}", chain_error(&e)))?;
            drop(base);
            let options = OpenOptions {
                format: None,
                read_only: false,
                cache,
                // The old chain holds the locks until it closes, below.
                lock: false,
                ..OpenOptions::default()
            };
            let chain = self.top.as_ref().ok_or_else(Self::ended)?.inner().chain();
            let mut below = chain.skip(self.base_depth);
            let (Some(kept), below) = (below.next(), below.next()) else {
                return Err(Self::ended());
            };
            let image = reopen_layers(&[kept], below, options)
                .map_err(|e| format!("Could not reopen '{base_path}': {}", chain_error(&e)))?;
            let new = Arc::new(WithPolicy::new(image, policy, detect_zeroes));
            aio.replace_image(Arc::clone(&new) as Arc<dyn DiskImage>)
                .map_err(|e| {
                    format!(
                        "Could not switch to the new chain: {}",
                        devices::error_chain(&e)
                    )
                })?;
            Ok(new)
        })?;
        self.tracking = false;
        self.top = None;
        live.top = Arc::clone(&switched);
        // The old chain is closed: the new one takes the locks (failing leaves them untaken,
        // not the disk broken).
        if let Err(e) = switched.inner().lock_chain() {
            log::error!("{base_path}: cannot lock the reopened chain: {e}");
        }
        // The top and the layers down to (not including) `base` are gone.
        disk.info.drop_layers(0, live.describe());
        if let Some(nodes) = disk.info.nodes.first() {
            disk.info.node_name = nodes.format.clone();
        }
        Ok(())
    }

    fn release(&mut self, disk: Option<&mut VmDisk>) {
        if let Some(disk) = disk {
            self.untrack(disk);
        }
        self.base = None;
        self.top = None;
    }
}

/// Starts the commit of `disk`'s active layer into the image at `base_depth` of its chain,
/// `new` saying what the job is (the other checks are the caller's).
pub(super) fn start_active_commit(
    jobs: &mut Jobs,
    disk: &VmDisk,
    base_depth: usize,
    new: NewJob,
) -> Result<(), JobError> {
    let live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
    let active = Arc::clone(&live.top);
    let cache = live.cache;
    drop(live);
    let top = active.inner();
    let base = top
        .chain()
        .nth(base_depth)
        .ok_or_else(|| JobError::Other("Base not found".to_owned()))?;
    let base_path = base.file().path().to_owned();
    let options = OpenOptions {
        format: None,
        read_only: false,
        cache,
        // The disk's chain holds its locks.
        lock: false,
        ..OpenOptions::default()
    };
    let writable =
        reopen_layers(&[base], top.chain().nth(base_depth + 1), options).map_err(|e| {
            JobError::Other(format!(
                "Could not reopen '{base_path}' read-write: {}",
                chain_error(&e)
            ))
        })?;
    if writable.size() < top.size() {
        // As QEMU, the base grows to the top's size.
        writable.grow(top.size()).map_err(|e| {
            JobError::Other(format!(
                "Could not resize '{base_path}': {}",
                chain_error(&e)
            ))
        })?;
    }
    let granule = match &writable {
        Image::Qcow2(q) => q.header().cluster_size(),
        Image::Raw(_) => 64 << 10,
    };
    let dirty = Arc::new(DirtyBitmap::new(top.size(), granule));
    let tracked = Arc::new(Tracked {
        inner: Arc::clone(&active),
        dirty: Arc::clone(&dirty),
    });
    disk.device
        .with_drained_io(|aio| aio.replace_image(tracked as Arc<dyn DiskImage>))
        .map_err(|e| {
            JobError::Other(format!(
                "Cannot track the guest's writes: {}",
                devices::error_chain(&e)
            ))
        })?;
    let work = ActiveCommit {
        top: Some(active),
        dirty,
        tracking: true,
        base_depth,
        base: Some(writable),
        scanned: 0,
        cursor: 0,
        buf: super::chunk_buffer(CHUNK),
    };
    jobs.start(new, Box::new(work)).inspect_err(|_| {
        // The job never ran: the device gets its plain top back.
        serve_plain_top(disk);
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::disks::jobs::start_commit;
    use crate::disks::jobs::testing::{
        assert_reads, block_of, names, pattern, run, Guest, Scratch, BLOCKS, WRITES,
    };
    use crate::disks::jobs::{CommitArgs, JobStatus};
    use std::path::Path;

    #[test]
    fn the_bitmap_hands_out_runs_and_takes_marks_back() {
        let dirty = DirtyBitmap::new(10 << 16, 1 << 16);
        dirty.mark(0, 1);
        dirty.mark((3 << 16) - 1, 2);
        dirty.mark(9 << 16, 100 << 16);
        assert_eq!(dirty.dirty_bytes(), 4 << 16);
        assert_eq!(dirty.take_run(1 << 16, 8 << 16), Some((2 << 16, 2 << 16)));
        assert_eq!(dirty.take_run(5 << 16, 1), Some((9 << 16, 1 << 16)));
        // Wraps around.
        assert_eq!(dirty.take_run(9 << 16, 1 << 20), Some((0, 1 << 16)));
        assert_eq!(dirty.take_run(0, 1 << 20), None);
        assert_eq!(dirty.dirty_bytes(), 0);
    }

    /// base (17 everywhere) <- mid (5 in [1M, 2M)) <- top (6 in [3M, 3M+256K)), 8 MiB each.
    fn chain(dir: &Scratch) -> (String, String, String) {
        let p = |n: &str| dir.path(n).to_str().unwrap().to_owned();
        let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
        run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "8M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 17 0 8M", &base]);
        for (image, below, write) in [
            (&mid, &base, "write -P 5 1M 1M"),
            (&top, &mid, "write -P 6 3M 256k"),
        ] {
            run(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", image,
                ],
            );
            run("qemu-io", &["-f", "qcow2", "-c", write, image]);
        }
        (base, mid, top)
    }

    fn want() -> Vec<u8> {
        let mut want = vec![17u8; BLOCKS];
        want[256..512].fill(5);
        want[768..832].fill(6);
        for i in 0..WRITES {
            want[block_of(i)] = pattern(i);
        }
        want
    }

    /// A writer keeps guest writes in flight while the active layer and the image below it are
    /// committed into the base (speed-limited so that the copy spans the writes), the job
    /// becomes ready and is completed while the writes go on: every write survives in the
    /// base the disk now runs on, the events are QEMU's, and QEMU's tools find the base clean.
    #[test]
    fn an_active_commit_under_guest_writes_loses_none_of_them() {
        let dir = Scratch::new("active-commit");
        let (base, _, top) = chain(&dir);
        let mut guest = Guest::new(Path::new(&top), 3);
        let writer = guest.write();
        let args = CommitArgs {
            speed: 4 << 20,
            ..CommitArgs::default()
        };
        start_commit(&mut guest.jobs, &guest.disk, args).unwrap();
        let seen = guest.run_job(|jobs, e| {
            if e["event"] == "BLOCK_JOB_READY" {
                jobs.complete("d0").unwrap();
            }
        });
        let expected = [
            JobStatus::Created.name(),
            JobStatus::Running.name(),
            JobStatus::Ready.name(),
            "BLOCK_JOB_READY",
            JobStatus::Waiting.name(),
            JobStatus::Pending.name(),
            "BLOCK_JOB_COMPLETED",
            JobStatus::Concluded.name(),
            JobStatus::Null.name(),
        ];
        assert_eq!(names(&seen), expected);
        let completed = &seen[6]["data"];
        assert!(completed.get("error").is_none(), "{completed}");
        assert_eq!(completed["type"], "commit");
        assert_eq!(completed["len"], completed["offset"]);
        // The disk runs on the base: its nodes are the base's.
        assert_eq!(guest.disk.info.image.filename, base);
        assert!(guest.disk.info.image.backing.is_none());
        assert_eq!(guest.disk.info.nodes.len(), 1);
        assert_eq!(guest.disk.info.node_name, "#block4");
        guest.stop(writer);
        assert_reads(Path::new(&base), &want());
        run("qemu-img", &["check", "-q", &base]);
    }

    /// The files a job of a disk opened with `cache=none` opens read-write for `path`: whether
    /// each is opened with O_DIRECT, from this process's descriptors.
    fn writable_opens_of(path: &str) -> Vec<bool> {
        let mut direct = Vec::new();
        for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() != Some(Path::new(path)) {
                continue;
            }
            let info = Path::new("/proc/self/fdinfo").join(fd.file_name());
            let info = std::fs::read_to_string(info).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            if flags & libc::O_ACCMODE == libc::O_RDWR {
                direct.push(flags & libc::O_DIRECT != 0);
            }
        }
        direct
    }

    /// A commit of an intermediate image opens its base read-write as the disk has its files:
    /// with O_DIRECT for `cache=none`, as the active commit does.
    #[test]
    fn an_intermediate_commit_opens_its_base_with_the_disk_s_cache_mode() {
        let dir = Scratch::new("commit-cache");
        let (base, mid, top) = chain(&dir);
        let none = crate::drive::CacheSetting {
            host: block::CacheMode::None,
            ..crate::drive::CacheSetting::default()
        };
        let mut guest = Guest::with_cache(Path::new(&top), 3, none);
        let writer = guest.write();
        let args = CommitArgs {
            top: Some(super::super::Layer::File(mid)),
            // Slow enough that the job is still running when the files are looked at.
            speed: 64 << 10,
            ..CommitArgs::default()
        };
        start_commit(&mut guest.jobs, &guest.disk, args).unwrap();
        assert_eq!(writable_opens_of(&base), [true]);
        guest.jobs.cancel("d0", false).unwrap();
        guest.run_job(|_, _| {});
        guest.stop(writer);
    }

    /// Cancelled once ready (without `force`), the job completes as QEMU's does and the disk
    /// stays on its top, which kept every write.
    #[test]
    fn an_active_commit_cancelled_when_ready_leaves_the_disk_on_its_top() {
        let dir = Scratch::new("active-cancel");
        let (base, mid, top) = chain(&dir);
        let mut guest = Guest::new(Path::new(&top), 3);
        let writer = guest.write();
        start_commit(&mut guest.jobs, &guest.disk, CommitArgs::default()).unwrap();
        let seen = guest.run_job(|jobs, e| {
            if e["event"] == "BLOCK_JOB_READY" {
                jobs.cancel("d0", false).unwrap();
            }
        });
        let got = names(&seen);
        assert_eq!(got[2..4], ["ready", "BLOCK_JOB_READY"]);
        assert_eq!(got[6], "BLOCK_JOB_COMPLETED");
        assert_eq!(guest.disk.info.image.filename, top);
        assert_eq!(guest.disk.info.nodes.len(), 3);
        guest.stop(writer);
        assert_reads(Path::new(&top), &want());
        for image in [&base, &mid, &top] {
            run("qemu-img", &["check", "-q", image]);
        }
    }
}
