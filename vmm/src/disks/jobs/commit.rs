//! `block-commit` of an intermediate image: copies what `top` and the images between it and
//! `base` hold into `base`, then drops them from the chain by naming `base` as the backing file
//! of the image above `top`, as QEMU's `block/commit.c` does. Committing the active layer is
//! a mirror that tracks guest writes (`active.rs`).
//!
//! Steps (on the job's thread): at most [`CHUNK`] bytes each, a run that some image from `top`
//! down to (not including) `base` allocates is read through `top` and written into `base`
//! through a second, read-write handle on it (over the chain below it, each image by the name
//! the disk opened it with), opened without locks (the disk's chain keeps
//! its read lock and its refusal to share write, so no other process writes it meanwhile).
//! The guest never reads what is written: its reads of those ranges stop at `top` or above, and
//! its writes go to the active layer.
//!
//! The end (main loop): `base` is flushed and its handle closed; the image above `top` gets
//! `base` as its backing file (the active layer under its metadata lock, an intermediate image
//! through a handle of its own, reopened as the disk has it), and the disk is switched to the
//! images above `top` over `base`, reopened by the names the disk opened them with, as the
//! stream's end does.

use std::sync::{Arc, PoisonError};

use block::{DiskImage, Image, OpenOptions, WithPolicy};

use super::active::start_active_commit;
use super::stream::{find_in_chain, reopen_layers, reopen_with_backing};
use super::{JobEnd, JobError, JobKind, Jobs, Layer, NewJob, Step, StepError, Work};
use crate::monitor::VmDisk;

/// The most a step deals with (QEMU's `COMMIT_BUFFER_SIZE`).
const CHUNK: u64 = 512 << 10;

/// `block-commit`'s arguments, checked by the monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitArgs {
    /// `job-id`; the drive id when absent.
    pub job_id: Option<String>,
    /// `top` or `top-node`: the image to commit; the active layer when absent.
    pub top: Option<Layer>,
    /// `base` or `base-node`: the image to commit into; the chain's last when absent.
    pub base: Option<Layer>,
    /// `backing-file`: the name to write in the header of the image above `top`.
    pub backing_file: Option<String>,
    /// `auto-finalize` and `auto-dismiss`.
    pub end: JobEnd,
    /// `speed`, bytes per second (0: unlimited), refused below 0 once the job is created.
    pub speed: i64,
}

#[derive(Debug)]
struct Commit {
    /// The disk's top as the job started; released when the job ends.
    top: Option<Arc<WithPolicy<Image>>>,
    /// Depths of `top` and `base` in the disk's chain.
    top_depth: usize,
    base_depth: usize,
    /// `base`, read-write, without locks; closed at the end.
    base: Option<Image>,
    /// The backing file (name, format) the image above `top` names at the end.
    backing: (String, String),
    /// A chunk's worth, aligned for `O_DIRECT`, kept for the job's run.
    buf: block::AlignedBuf,
}

fn chain_error(e: &block::Error) -> String {
    devices::error_chain(e)
}

impl Work for Commit {
    fn step(&mut self, offset: u64) -> Result<Step, StepError> {
        let active = self.top.as_ref().ok_or_else(StepError::ended)?.inner();
        let top = active
            .chain()
            .nth(self.top_depth)
            .ok_or_else(StepError::ended)?;
        let base = self.base.as_ref().ok_or_else(StepError::ended)?;
        let len = (top.size() - offset).min(CHUNK);
        let (depth, n) = top
            .allocated_at(offset, len)
            .map_err(|e| StepError::read(&e, len))?;
        if depth.is_none_or(|d| d >= self.base_depth - self.top_depth) {
            return Ok(Step {
                advanced: n,
                copied: 0,
                remaining: None,
            });
        }
        let size = usize::try_from(n).map_err(|e| StepError::Other(e.to_string()))?;
        let buf = &mut self.buf.as_mut_slice()[..size];
        top.read_at(buf, offset)
            .map_err(|e| StepError::read(&e, n))?;
        base.write_at(buf, offset)
            .map_err(|e| StepError::write(&e, n))?;
        Ok(Step {
            advanced: n,
            copied: n,
            remaining: None,
        })
    }

    fn finish(&mut self, disk: &mut VmDisk) -> Result<(), String> {
        if let Some(base) = self.base.take() {
            base.flush().map_err(|e| chain_error(&e))?;
        }
        let Some(active) = self.top.take() else {
            return Err("The job has ended".to_owned());
        };
        let mut live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
        let backing = Some(self.backing.clone());
        if self.top_depth == 1 {
            drop(active);
            reopen_with_backing(
                &disk.device,
                &mut live,
                Some(backing),
                1,
                Some(self.base_depth),
            )?;
        } else {
            let chain = active.inner();
            let (Some(above), Some(base)) = (
                chain.chain().nth(self.top_depth - 1),
                chain.chain().nth(self.base_depth),
            ) else {
                return Err("The chain changed".to_owned());
            };
            let path = above.file().path().to_owned();
            let options = OpenOptions {
                format: None,
                read_only: false,
                cache: live.cache,
                lock: false,
                ..OpenOptions::default()
            };
            let writable = reopen_layers(&[above], Some(base), options)
                .map_err(|e| format!("Could not reopen '{path}': {}", chain_error(&e)))?;
            writable.set_backing_name(backing).map_err(|e| {
                format!(
                    "Could not update backing file link of '{path}': {}",
                    chain_error(&e)
                )
            })?;
            drop(writable);
            drop(active);
            reopen_with_backing(
                &disk.device,
                &mut live,
                None,
                self.top_depth,
                Some(self.base_depth),
            )?;
        }
        // `top` and the layers down to (not including) `base` are gone.
        disk.info.drop_layers(self.top_depth, live.describe());
        Ok(())
    }

    fn release(&mut self, _disk: Option<&mut VmDisk>) {
        self.base = None;
        self.top = None;
    }
}

/// Starts `block-commit` on `disk` (checks in QEMU's order, messages QEMU's).
pub fn start_commit(jobs: &mut Jobs, disk: &VmDisk, args: CommitArgs) -> Result<(), JobError> {
    let drive = disk.info.drive_id.clone();
    let live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
    let active = Arc::clone(&live.top);
    let cache = live.cache;
    drop(live);
    let image = active.inner();
    if jobs.mirrors(&drive) {
        // QEMU's commit finds the active commit's filter node where the disk's top was.
        return Err(JobError::Other("Need a root block node".to_owned()));
    }
    jobs.check_idle(&drive)?;
    let top_depth = match &args.top {
        Some(Layer::File(name)) => find_in_chain(image, name)
            .or_else(|| {
                // The active layer named by its own file.
                (image.file().path() == name).then_some(0)
            })
            .ok_or_else(|| JobError::Other(format!("Top image file {name} not found")))?,
        Some(Layer::Node { depth, .. }) => *depth,
        None => 0,
    };
    let top = image
        .chain()
        .nth(top_depth)
        .ok_or_else(|| JobError::Other("Top image file not found".to_owned()))?;
    let base_depth = match &args.base {
        Some(Layer::File(name)) => find_in_chain(top, name)
            .map(|d| d + top_depth)
            .ok_or_else(|| JobError::Other(format!("Can't find '{name}' in the backing chain")))?,
        Some(Layer::Node { name, depth }) if *depth < top_depth => {
            return Err(JobError::Other(format!(
                "'{name}' is not in this backing file chain"
            )))
        }
        Some(Layer::Node { depth, .. }) => *depth,
        None => image.chain().count() - 1,
    };
    if base_depth <= top_depth {
        return Err(JobError::Other(
            "cannot commit an image into itself".to_owned(),
        ));
    }
    if top_depth == 0 {
        if args.backing_file.is_some() {
            return Err(JobError::Other(
                "'backing-file' specified, but 'top' is the active layer".to_owned(),
            ));
        }
        let new = NewJob {
            id: args.job_id.unwrap_or_else(|| drive.clone()),
            kind: JobKind::Commit,
            drive,
            // Known once the job has looked at the chain, as QEMU's.
            len: 0,
            speed: args.speed,
            mirror: true,
            end: args.end,
        };
        return start_active_commit(jobs, disk, base_depth, new);
    }
    let base = image
        .chain()
        .nth(base_depth)
        .ok_or_else(|| JobError::Other("Base not found".to_owned()))?;
    let base_path = base.file().path().to_owned();
    let backing = (
        args.backing_file
            .clone()
            .unwrap_or_else(|| base_path.clone()),
        base.format().name().to_owned(),
    );
    let options = OpenOptions {
        format: None,
        read_only: false,
        cache,
        // The disk's chain holds its locks.
        lock: false,
        ..OpenOptions::default()
    };
    let writable =
        reopen_layers(&[base], image.chain().nth(base_depth + 1), options).map_err(|e| {
            JobError::Other(format!(
                "Could not reopen '{base_path}' read-write: {}",
                chain_error(&e)
            ))
        })?;
    let work = Commit {
        top: Some(Arc::clone(&active)),
        top_depth,
        base_depth,
        base: Some(writable),
        backing,
        buf: super::chunk_buffer(CHUNK),
    };
    let new = NewJob {
        id: args.job_id.unwrap_or_else(|| drive.clone()),
        kind: JobKind::Commit,
        drive,
        len: top.size(),
        speed: args.speed,
        mirror: false,
        end: args.end,
    };
    jobs.start(new, Box::new(work))
}
