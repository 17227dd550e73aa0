//! `block-stream`: copies into the top of a disk's chain every range the top does not have and
//! some image above `base` does (all of them without a base), then makes `base` the top's
//! backing file, as QEMU's `block/stream.c` does.
//!
//! Steps (in the disk's context): at most [`CHUNK`] bytes each, the chain asked which layer
//! first allocates the range ([`block::Image::allocated_at`]); a range the top lacks and an image
//! above `base` holds is read through the top's backing image and written into the top cluster
//! by cluster with [`block::Image::copy_up`], which skips a cluster the top got meanwhile, so a
//! guest write racing the copy is never overwritten by the older data.
//!
//! The end (main loop, [`super::Work::finish`]): the disk is drained in its context
//! ([`Block::with_drained_io`](devices::virtio::block::Block::with_drained_io)); with nothing in
//! flight the top is flushed and its header rewritten to name `base` (its file name as the
//! chain opened it, or `backing-file`, and its format; no backing file without a base), the top
//! reopened read-write with the chain that header names, without locks, and handed to the
//! device's engine; then the old chain is closed (its locks go with it) and the new one takes
//! its locks. A failure before the header is rewritten leaves the disk as it was.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use block::{DiskImage, FileId, Image, OpenOptions, WithPolicy};

use super::{JobError, JobKind, Jobs, NewJob, Step, Work};
use crate::disks::LiveImage;
use crate::monitor::VmDisk;

/// The most a step deals with (QEMU's `STREAM_CHUNK`).
const CHUNK: u64 = 512 << 10;

/// `block-stream`'s arguments, checked by the monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamArgs {
    /// `job-id`; the drive id when absent.
    pub job_id: Option<String>,
    /// `base`: the file name of an image of the chain below the top.
    pub base: Option<String>,
    /// `backing-file`: the name to write in the top's header instead of the base's.
    pub backing_file: Option<String>,
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
    /// The top's cluster size: copy-ups go cluster by cluster.
    cluster: u64,
    buf: Vec<u8>,
}

impl Work for Stream {
    fn step(&mut self, offset: u64) -> Result<Step, String> {
        let top = self
            .top
            .as_ref()
            .ok_or_else(|| "The job has ended".to_owned())?
            .inner();
        let len = (top.size() - offset).min(CHUNK);
        let (depth, n) = top
            .allocated_at(offset, len)
            .map_err(|e| devices::error_chain(&e))?;
        let copy = depth.is_some_and(|d| d > 0 && self.base_depth.is_none_or(|b| d < b));
        let backing = top.chain().nth(1);
        let (true, Some(backing)) = (copy, backing) else {
            return Ok(Step {
                advanced: n,
                copied: 0,
            });
        };
        let size = usize::try_from(n).map_err(|e| e.to_string())?;
        self.buf.resize(size, 0);
        backing
            .read_at(&mut self.buf[..size], offset)
            .map_err(|e| devices::error_chain(&e))?;
        let mut pos = 0;
        while pos < n {
            let at = offset + pos;
            let piece = (self.cluster - at % self.cluster).min(n - pos);
            let range =
                usize::try_from(pos).unwrap_or(size)..usize::try_from(pos + piece).unwrap_or(size);
            top.copy_up(&self.buf[range], at)
                .map_err(|e| devices::error_chain(&e))?;
            pos += piece;
        }
        Ok(Step {
            advanced: n,
            copied: n,
        })
    }

    fn finish(&mut self, disk: &mut VmDisk) -> Result<(), String> {
        // Only this thread locks it, and nothing panics while holding it.
        let mut live = disk.live.lock().unwrap_or_else(PoisonError::into_inner);
        // The job's handle on the old chain goes first: its files close with the last one.
        self.top = None;
        reopen_with_backing(&disk.device, &mut live, Some(self.backing.clone()))?;
        // The layers between the top and the base are gone.
        disk.info.drop_layers(1, live.describe());
        Ok(())
    }

    fn release(&mut self) {
        self.top = None;
    }
}

/// Rewrites the top's backing file to `backing` (with `Some`; `None` keeps it) and switches the
/// disk to the chain the top's header names (steps in the module documentation).
pub(super) fn reopen_with_backing(
    device: &devices::virtio::block::Block,
    live: &mut LiveImage,
    backing: Option<Option<(String, String)>>,
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
            format: Some(top.format()),
            read_only: false,
            cache: live.cache,
            // The old chain holds the locks until it closes, below.
            lock: false,
            ..OpenOptions::default()
        };
        let image = block::open(Path::new(&path), options)
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
            Some(name) => Some(find_in_chain(image, name).ok_or_else(|| {
                JobError::Other(format!("Can't find '{name}' in the backing chain"))
            })?),
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
    let cluster = match image {
        Image::Qcow2(q) => q.header().cluster_size(),
        Image::Raw(_) => CHUNK,
    };
    let len = image.size();
    let work = Stream {
        top: Some(Arc::clone(&top)),
        base_depth,
        backing,
        cluster,
        buf: Vec::new(),
    };
    let new = NewJob {
        id: args.job_id.unwrap_or_else(|| drive.clone()),
        kind: JobKind::Stream,
        ctx: Arc::clone(disk.device.context()),
        drive,
        len,
        speed: args.speed,
    };
    jobs.start(new, Box::new(work))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::disks::jobs::JobStatus;
    use crate::drive::CacheSetting;
    use crate::monitor::{event_channel, BlockDevice, CacheMode, ImageNodes};
    use block::{DetectZeroes, Format};
    use devices::context::IoThread;
    use devices::virtio::block::test_util::{Rig, BUF, F_WRITE, HDR, STATUS};
    use devices::virtio::block::{request_type, status};
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    const BLOCKS: usize = 2048;
    const WRITES: usize = 400;
    const DEPTH: usize = 4;

    /// The 4 KiB block write `i` goes to (scattered over the disk).
    fn block_of(i: usize) -> usize {
        i * 37 % BLOCKS
    }

    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 200).unwrap() + 40
    }

    fn run(tool: &str, args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} is required (ci/setup installs it): {e}"));
        assert!(out.status.success(), "{tool} {args:?}: {out:?}");
        out
    }

    /// A writer keeps `DEPTH` guest writes in flight on an iothread disk while a stream without
    /// a base (speed-limited so that it spans the writes) pulls its backing file up: every
    /// write survives, every other block holds the backing file's data, the top ends with no
    /// backing file, and QEMU's tools agree.
    #[test]
    fn a_stream_under_guest_writes_loses_none_of_them() {
        let dir = std::env::temp_dir().join(format!("vmm-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
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
        let options = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..OpenOptions::default()
        };
        let cache = CacheSetting::default();
        let image = Arc::new(WithPolicy::new(
            block::open(&top, options).unwrap(),
            cache.policy,
            DetectZeroes::Off,
        ));
        let io = IoThread::spawn("io-stream").unwrap();
        let rig = Arc::new(Rig::new(io.context().clone(), Arc::clone(&image), 1, false));
        rig.start(!0);
        let live = LiveImage::new(image, cache, DetectZeroes::Off);
        let mut disk = VmDisk {
            info: BlockDevice {
                drive_id: "d0".into(),
                qdev: "vd0".into(),
                read_only: false,
                cache: CacheMode {
                    writeback: true,
                    direct: false,
                    no_flush: false,
                },
                detect_zeroes: "off",
                node_name: "#block0".into(),
                nodes: (0..2)
                    .map(|i| ImageNodes {
                        format: format!("#block{}", 2 * i),
                        file: format!("#block{}", 2 * i + 1),
                        opened: i,
                    })
                    .collect(),
                io_status: "ok",
                image: live.describe(),
            },
            device: Arc::clone(&rig.dev),
            live: Arc::new(Mutex::new(live)),
        };
        let (events, received) = event_channel().unwrap();
        let mut jobs = Jobs::new(events);

        let writer = {
            let rig = Arc::clone(&rig);
            std::thread::spawn(move || {
                for i in 0..WRITES {
                    let slot = u16::try_from(i % DEPTH).unwrap();
                    if slot == 0 {
                        rig.wait_used(0, u16::try_from(i).unwrap());
                    }
                    let buf = BUF + u64::from(slot) * 4096;
                    let hdr = HDR + u64::from(slot) * 0x20;
                    rig.mem
                        .write_slice(&[pattern(i); 4096], GuestAddress(buf))
                        .unwrap();
                    let sector = u64::try_from(block_of(i)).unwrap() * 8;
                    rig.header(hdr, request_type::OUT, sector);
                    let st = STATUS + u64::from(slot);
                    rig.submit(
                        0,
                        slot * 3,
                        &[(hdr, 16, 0), (buf, 4096, 0), (st, 1, F_WRITE)],
                    );
                }
                rig.wait_used(0, u16::try_from(WRITES).unwrap());
            })
        };
        let args = StreamArgs {
            speed: 16 << 20,
            ..StreamArgs::default()
        };
        start_stream(&mut jobs, &disk, args).unwrap();
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|e: &serde_json::Value| e["data"]["status"] == "null")
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
            seen.extend(received.drain());
            jobs.finalize_waiting(std::slice::from_mut(&mut disk));
        }
        writer.join().unwrap();
        for slot in 0..DEPTH {
            assert_eq!(rig.byte(STATUS + u64::try_from(slot).unwrap()), status::OK);
        }
        let names: Vec<_> = seen
            .iter()
            .map(|e| match e["data"]["status"].as_str() {
                Some(s) => s.to_owned(),
                None => e["event"].as_str().unwrap().to_owned(),
            })
            .collect();
        let expected = [
            JobStatus::Created.name(),
            JobStatus::Running.name(),
            JobStatus::Waiting.name(),
            JobStatus::Pending.name(),
            "BLOCK_JOB_COMPLETED",
            JobStatus::Concluded.name(),
            JobStatus::Null.name(),
        ];
        assert_eq!(names, expected);
        assert!(seen[4]["data"].get("error").is_none(), "{}", seen[4]);
        assert!(jobs.info().is_empty());
        assert!(disk.info.image.backing.is_none());
        // The base's nodes went with it; the top's stay.
        assert_eq!(disk.info.nodes.len(), 1);
        assert_eq!(disk.info.nodes[0].format, "#block0");

        let mut want = vec![17u8; BLOCKS];
        for i in 0..WRITES {
            want[block_of(i)] = pattern(i);
        }
        rig.dev.shutdown().unwrap();
        drop(rig);
        drop(disk);
        io.stop().unwrap();
        let image = block::open(&top, OpenOptions::default()).unwrap();
        assert_eq!(image.chain().count(), 1, "the top has no backing file");
        let mut buf = vec![0u8; 4096];
        for (b, &byte) in want.iter().enumerate() {
            image
                .read_at(&mut buf, u64::try_from(b).unwrap() * 4096)
                .unwrap();
            assert!(
                buf.iter().all(|&x| x == byte),
                "block {b}: {} for {byte}",
                buf[0]
            );
        }
        drop(image);
        run("qemu-img", &["check", "-q", top_s]);
        let info = run("qemu-img", &["info", "--output=json", top_s]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
