//! `block-stream`: copies into the top of a disk's chain every range the top does not have and
//! some image above `base` does (all of them without a base), then makes `base` the top's
//! backing file, as QEMU's `block/stream.c` does.
//!
//! Steps (on the job's thread): at most [`CHUNK`] bytes each, the chain asked which layer
//! first allocates the range ([`block::Image::allocated_at`]); a range the top lacks and an image
//! above `base` holds is read through the top's backing image into the job's buffer (aligned for
//! `O_DIRECT`, kept for the job's run) and written into the top with [`block::Image::copy_up`]
//! (a run of clusters planned, written and published at once, as QEMU's copy-on-read writes its
//! bounce buffer), which skips what the top got meanwhile, so a guest write racing the copy is
//! never overwritten by the older data.
//!
//! The end (main loop, [`super::Work::finish`]): the disk is drained in its context
//! ([`Block::with_drained_io`](devices::virtio::block::Block::with_drained_io)); with nothing in
//! flight the top is flushed and its header rewritten to name `base` (its file name as the
//! chain opened it, or `backing-file`, and its format; no backing file without a base), the top
//! reopened read-write, without locks, over the base and its chain reopened read-only, each
//! image by the name the disk opened it with ([`reopen_layers`]), never through the names in
//! headers (a name as the chain opened it, such as `chain/base.qcow2` for a disk opened as
//! `chain/top.qcow2`, resolves against the top's directory: QEMU writes it too, and keeps the
//! base's node attached), and handed to the device's engine; then the old chain is closed (its
//! locks go with it) and the new one takes its locks. A failure before the header is rewritten
//! leaves the disk as it was.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use block::{DiskImage, FileId, Image, OpenOptions, WithPolicy};

use super::{JobEnd, JobError, JobKind, Jobs, Layer, NewJob, Step, StepError, Work};
use crate::disks::LiveImage;
use crate::monitor::VmDisk;

/// The most a step deals with (QEMU's `STREAM_CHUNK`).
const CHUNK: u64 = 512 << 10;

/// `block-stream`'s arguments, checked by the monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamArgs {
    /// `job-id`; the drive id when absent.
    pub job_id: Option<String>,
    /// `base` or `base-node`: an image of the chain below the top.
    pub base: Option<Layer>,
    /// `backing-file`: the name to write in the top's header instead of the base's.
    pub backing_file: Option<String>,
    /// `auto-finalize` and `auto-dismiss`.
    pub end: JobEnd,
    /// `speed`, bytes per second (0: unlimited); a negative one is refused once the job is
    /// created, as QEMU refuses it.
    pub speed: i64,
}

#[derive(Debug)]
struct Stream {
    /// The disk's top as the job started; released when the job ends.
    top: Option<Arc<WithPolicy<Image>>>,
    /// The depth of the base in the chain (0 = the top), or `None` for none.
    base_depth: Option<usize>,
    /// The backing file (name, format) the top names at the end.
    backing: Option<(String, String)>,
    /// A chunk's worth, aligned for `O_DIRECT`, kept for the job's run.
    buf: block::AlignedBuf,
}

impl Work for Stream {
    fn step(&mut self, offset: u64) -> Result<Step, StepError> {
        let top = self.top.as_ref().ok_or_else(StepError::ended)?.inner();
        let len = (top.size() - offset).min(CHUNK);
        let (depth, n) = top
            .allocated_at(offset, len)
            .map_err(|e| StepError::read(&e, len))?;
        let copy = depth.is_some_and(|d| d > 0 && self.base_depth.is_none_or(|b| d < b));
        let backing = top.chain().nth(1);
        let (true, Some(backing)) = (copy, backing) else {
            return Ok(Step {
                advanced: n,
                copied: 0,
                remaining: None,
            });
        };
        let size = usize::try_from(n).map_err(|e| StepError::Other(e.to_string()))?;
        let buf = &mut self.buf.as_mut_slice()[..size];
        backing
            .read_at(buf, offset)
            .map_err(|e| StepError::read(&e, n))?;
        // A copy-on-read, as QEMU's stream does it: its errors are reads' too.
        top.copy_up(buf, offset)
            .map_err(|e| StepError::read(&e, n))?;
        Ok(Step {
            advanced: n,
            copied: n,
            remaining: None,
        })
    }

    fn finish(&mut self, disk: &mut VmDisk) -> Result<(), String> {
        // Only this thread locks it, and nothing panics while holding it.
        let mut live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
        // The job's handle on the old chain goes first: its files close with the last one.
        self.top = None;
        reopen_with_backing(
            &disk.device,
            &mut live,
            Some(self.backing.clone()),
            1,
            self.base_depth,
        )?;
        // The layers between the top and the base are gone.
        disk.info.drop_layers(1, live.describe());
        Ok(())
    }

    fn release(&mut self, _disk: Option<&mut VmDisk>) {
        self.top = None;
    }
}

/// Rewrites the top's backing file to `backing` (with `Some`; `None` keeps it) and switches the
/// disk to its chain without the images between depth `keep` and `below` (steps in the module
/// documentation): the top `keep` images of the chain over the image at depth `below` of it,
/// none with `None`.
pub(super) fn reopen_with_backing(
    device: &devices::virtio::block::Block,
    live: &mut LiveImage,
    backing: Option<Option<(String, String)>>,
    keep: usize,
    below: Option<usize>,
) -> Result<(), String> {
    let old = Arc::clone(&live.top);
    let top = old.inner();
    let path = top.file().path().to_owned();
    let switched = device.with_drained_io(|aio| -> Result<_, String> {
        top.flush()
            .map_err(|e| format!("Could not flush '{path}': {}", devices::error_chain(&e)))?;
        if let Some(backing) = backing {
            top.set_backing_name(backing).map_err(|e| {
                format!(
                    "Could not update backing file link of '{path}': {}",
                    devices::error_chain(&e)
                )
            })?;
        }
        let options = OpenOptions {
            format: None,
            read_only: false,
            cache: live.cache,
            // The old chain holds the locks until it closes, below.
            lock: false,
            ..OpenOptions::default()
        };
        let layers: Vec<&Image> = top.chain().take(keep).collect();
        let below = below.and_then(|d| top.chain().nth(d));
        let image = reopen_layers(&layers, below, options)
            .map_err(|e| format!("Could not reopen '{path}': {}", devices::error_chain(&e)))?;
        let new = Arc::new(WithPolicy::new(image, live.policy, live.detect_zeroes));
        aio.replace_image(Arc::clone(&new) as Arc<dyn DiskImage>)
            .map_err(|e| {
                format!(
                    "Could not switch to the new chain: {}",
                    devices::error_chain(&e)
                )
            })?;
        Ok(new)
    })?;
    live.top = Arc::clone(&switched);
    drop(old);
    // The old chain is closed (the engine's handle went with the replacement, the job's before):
    // the new one takes the locks. Failing here leaves the files unlocked, not the disk broken.
    if let Err(e) = switched.inner().lock_chain() {
        log::error!("{path}: cannot lock the reopened chain: {e}");
    }
    Ok(())
}

/// `layers`, consecutive images of a disk's chain from the top down, opened again by the names
/// the disk opened them with: the first with `top`'s options, the others read-only and locked,
/// over `below` (an image of the same chain) and its chain reopened read-only. Never through
/// the backing names in headers, which need not resolve from where the disk was opened: QEMU
/// keeps the nodes of a chain it changes attached, never resolving names again.
pub(super) fn reopen_layers(
    layers: &[&Image],
    below: Option<&Image>,
    top: OpenOptions,
) -> Result<Image, block::Error> {
    let mut chain = below
        .map(|b| block::reopen_read_only(b, top.cache))
        .transpose()?;
    for (i, layer) in layers.iter().enumerate().rev() {
        let options = if i == 0 {
            top
        } else {
            OpenOptions {
                cache: top.cache,
                ..OpenOptions::default()
            }
        };
        chain = Some(block::reopen_over(layer, options, chain)?);
    }
    chain.ok_or(block::Error::InvalidOption("No image to reopen".to_owned()))
}

/// Which image of `top`'s chain `name` names (as given, or resolved as a backing file name is),
/// below the top.
pub(super) fn find_in_chain(top: &Image, name: &str) -> Option<usize> {
    let ids = [
        FileId::of_path(Path::new(name)),
        FileId::of_path(&block::resolve_backing(Path::new(top.file().path()), name)),
    ];
    top.chain()
        .position(|i| ids.contains(&Some(i.file().id())))
        .filter(|&d| d > 0)
}

/// Starts `block-stream` on `disk` (checks in QEMU's order, messages QEMU's).
pub fn start_stream(jobs: &mut Jobs, disk: &VmDisk, args: StreamArgs) -> Result<(), JobError> {
    let drive = disk.info.drive_id.clone();
    let live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
    let top = Arc::clone(&live.top);
    drop(live);
    let image = top.inner();
    let base_depth =
        match &args.base {
            Some(Layer::File(name)) => Some(find_in_chain(image, name).ok_or_else(|| {
                JobError::Other(format!("Can't find '{name}' in the backing chain"))
            })?),
            Some(Layer::Node { depth, .. }) => Some(*depth),
            None => None,
        };
    jobs.check_idle(&drive)?;
    if disk.info.read_only {
        return Err(JobError::Other(format!(
            "Block node is read-only: '{drive}'"
        )));
    }
    let backing = base_depth.and_then(|d| image.chain().nth(d)).map(|base| {
        let name = args
            .backing_file
            .clone()
            .unwrap_or_else(|| base.file().path().to_owned());
        (name, base.format().name().to_owned())
    });
    // As QEMU's: with the base right below the top, or no backing file, there is nothing to
    // stream, and no length.
    let nothing = base_depth == Some(1) || image.chain().nth(1).is_none();
    let len = if nothing { 0 } else { image.size() };
    let work = Stream {
        top: Some(Arc::clone(&top)),
        base_depth,
        backing,
        buf: super::chunk_buffer(CHUNK),
    };
    let new = NewJob {
        id: args.job_id.unwrap_or_else(|| drive.clone()),
        kind: JobKind::Stream,
        drive,
        len,
        speed: args.speed,
        mirror: false,
        end: args.end,
    };
    jobs.start(new, Box::new(work))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::disks::jobs::testing::{
        assert_reads, block_of, names, pattern, run, Guest, Scratch, BLOCKS, WRITES,
    };
    use crate::disks::jobs::JobStatus;

    /// A writer keeps guest writes in flight on an iothread disk while a stream without a base
    /// (speed-limited so that it spans the writes) pulls its backing file up: every write
    /// survives, every other block holds the backing file's data, the top ends with no backing
    /// file, and QEMU's tools agree.
    #[test]
    fn a_stream_under_guest_writes_loses_none_of_them() {
        let dir = Scratch::new("stream");
        let (base, top) = (dir.path("base.qcow2"), dir.path("top.qcow2"));
        let (base_s, top_s) = (base.to_str().unwrap(), top.to_str().unwrap());
        run("qemu-img", &["create", "-q", "-f", "qcow2", base_s, "8M"]);
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 17 0 8M", base_s],
        );
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", base_s, "-F", "qcow2", top_s,
            ],
        );
        let mut guest = Guest::new(&top, 2);
        let writer = guest.write();
        let args = StreamArgs {
            speed: 16 << 20,
            ..StreamArgs::default()
        };
        start_stream(&mut guest.jobs, &guest.disk, args).unwrap();
        let seen = guest.run_job(|_, _| {});
        let expected = [
            JobStatus::Created.name(),
            JobStatus::Running.name(),
            JobStatus::Waiting.name(),
            JobStatus::Pending.name(),
            "BLOCK_JOB_COMPLETED",
            JobStatus::Concluded.name(),
            JobStatus::Null.name(),
        ];
        assert_eq!(names(&seen), expected);
        assert!(seen[4]["data"].get("error").is_none(), "{}", seen[4]);
        assert!(guest.jobs.info().is_empty());
        assert!(guest.disk.info.image.backing.is_none());
        // The base's nodes went with it; the top's stay.
        assert_eq!(guest.disk.info.nodes.len(), 1);
        assert_eq!(guest.disk.info.nodes[0].format, "#block0");
        guest.stop(writer);

        let mut want = vec![17u8; BLOCKS];
        for i in 0..WRITES {
            want[block_of(i)] = pattern(i);
        }
        let image = block::open(&top, OpenOptions::default()).unwrap();
        assert_eq!(image.chain().count(), 1, "the top has no backing file");
        drop(image);
        assert_reads(&top, &want);
        run("qemu-img", &["check", "-q", top_s]);
        let info = run("qemu-img", &["info", "--output=json", top_s]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
}
