//! What the jobs' tests share: a virtio-blk disk on an iothread over a qcow2 chain, a guest
//! that keeps writes in flight on it, and the main loop's part of a job.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use block::{DetectZeroes, DiskImage, Format, OpenOptions, WithPolicy};
use devices::context::IoThread;
use devices::virtio::block::test_util::{Rig, BUF, F_WRITE, HDR, STATUS};
use devices::virtio::block::{request_type, status};
use vm_memory::{Bytes, GuestAddress};

use super::Jobs;
use crate::disks::LiveImage;
use crate::drive::CacheSetting;
use crate::monitor::{event_channel, BlockDevice, CacheMode, ImageNodes, VmDisk};

/// The disk's size in 4 KiB blocks.
pub const BLOCKS: usize = 2048;
/// How many writes the guest makes.
pub const WRITES: usize = 400;
const DEPTH: usize = 4;

/// The 4 KiB block write `i` goes to (scattered over the disk).
pub fn block_of(i: usize) -> usize {
    i * 37 % BLOCKS
}

/// The byte write `i` fills its block with.
pub fn pattern(i: usize) -> u8 {
    u8::try_from(i % 200).unwrap() + 40
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The path of `file` in it.
    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a QEMU tool, which must succeed.
pub fn run(tool: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (ci/setup installs it): {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    out
}

/// A running guest's disk over the chain whose top is `top` (`layers` images), and its jobs.
pub struct Guest {
    pub rig: Arc<Rig<WithPolicy<block::Image>>>,
    pub disk: VmDisk,
    pub jobs: Jobs,
    events: crate::monitor::EventReceiver,
    io: IoThread,
}

impl Guest {
    pub fn new(top: &Path, layers: usize) -> Self {
        Self::with_cache(top, layers, CacheSetting::default())
    }

    /// As [`Guest::new`], the disk opened with `-drive cache=` as `cache`.
    pub fn with_cache(top: &Path, layers: usize, cache: CacheSetting) -> Self {
        let options = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            cache: cache.host,
            ..OpenOptions::default()
        };
        let image = Arc::new(WithPolicy::new(
            block::open(top, options).unwrap(),
            cache.policy,
            DetectZeroes::Off,
        ));
        let io = IoThread::spawn("io-job").unwrap();
        let rig = Arc::new(Rig::new(io.context().clone(), Arc::clone(&image), 1, false));
        rig.start(!0);
        let live = LiveImage::new(image, cache, DetectZeroes::Off);
        let disk = VmDisk {
            info: BlockDevice {
                drive_id: "d0".into(),
                qdev: "vd0".into(),
                read_only: false,
                cache: CacheMode {
                    writeback: true,
                    direct: cache.host == block::CacheMode::None,
                    no_flush: false,
                },
                detect_zeroes: "off",
                node_name: "#block0".into(),
                nodes: (0..layers)
                    .map(|i| ImageNodes {
                        format: format!("#block{}", 2 * i),
                        file: format!("#block{}", 2 * i + 1),
                        opened: u64::try_from(i).unwrap(),
                    })
                    .collect(),
                io_status: "ok",
                image: live.describe(),
            },
            device: Arc::clone(&rig.dev),
            live: Arc::new(Mutex::new(live)),
        };
        let (events, received) = event_channel().unwrap();
        Self {
            rig,
            disk,
            jobs: Jobs::new(events),
            events: received,
            io,
        }
    }

    /// Starts the guest's [`WRITES`] writes, `DEPTH` in flight.
    pub fn write(&self) -> JoinHandle<()> {
        let rig = Arc::clone(&self.rig);
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
    }

    /// The main loop until the job's `null`: its events, with `on_event` called on each new
    /// one (with the jobs, to send commands).
    pub fn run_job(
        &mut self,
        mut on_event: impl FnMut(&mut Jobs, &serde_json::Value),
    ) -> Vec<serde_json::Value> {
        let mut seen: Vec<serde_json::Value> = Vec::new();
        while !seen.iter().any(|e| e["data"]["status"] == "null") {
            std::thread::sleep(std::time::Duration::from_millis(5));
            for e in self.events.drain() {
                on_event(&mut self.jobs, &e);
                seen.push(e);
            }
            self.jobs
                .finalize_waiting(std::slice::from_mut(&mut self.disk));
        }
        seen
    }

    /// Every write the guest made succeeded; the guest is stopped and its disk closed.
    pub fn stop(self, writer: JoinHandle<()>) {
        writer.join().unwrap();
        for slot in 0..DEPTH {
            assert_eq!(
                self.rig.byte(STATUS + u64::try_from(slot).unwrap()),
                status::OK
            );
        }
        self.rig.dev.shutdown().unwrap();
        drop(self.rig);
        drop(self.disk);
        self.io.stop().unwrap();
    }
}

/// Each event's status (`JOB_STATUS_CHANGE`) or name (the others).
pub fn names(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["data"]["status"].as_str() {
            Some(s) => s.to_owned(),
            None => e["event"].as_str().unwrap().to_owned(),
        })
        .collect()
}

/// `path` (its chain) reads `want[b]` in every 4 KiB block `b`.
pub fn assert_reads(path: &Path, want: &[u8]) {
    let image = block::open(path, OpenOptions::default()).unwrap();
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
}
