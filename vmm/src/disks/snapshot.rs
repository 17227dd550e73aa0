//! External snapshots of a running disk (QMP `blockdev-snapshot-sync`): a new qcow2 overlay on
//! top of the disk's chain, the disk switched to it while the guest may be doing I/O.
//!
//! In order, as QEMU's `external_snapshot_prepare`/`_commit` do:
//!
//! 1. `absolute-paths` mode (the default): the overlay file is created, or overwritten as QEMU
//!    overwrites it, under its write lock ([`block::NewImage`]: refused while anyone has it open,
//!    which includes every file of this disk's chain), its backing file named by the current
//!    top's file name as the disk opened it and its format, the size the disk's. A relative
//!    name is written as given, though a later open resolves it against the overlay's
//!    directory: QEMU writes the same. `existing` mode uses a file the user made.
//! 2. The device is drained ([`Block::with_drained_io`]: its context acquired, no new request
//!    taken, the context released while in-flight requests end, then acquired again), and with
//!    nothing in flight:
//! 3. the old top is flushed; its write permission's lock is dropped, keeping its read lock and
//!    its refusal to share write, as QEMU's permission update does;
//! 4. the disk's chain is opened again read-only as the disk has it, each image by the name it
//!    was opened with and keeping its qcow2 cache sizes, as QEMU's nodes keep their options
//!    ([`block::reopen_read_only`]), and the overlay read-write over it, never
//!    through the backing name in its header: QEMU attaches the overlay over the open chain, so
//!    a name that does not resolve from the overlay's directory does not stop the disk. In
//!    `existing` mode the overlay's backing name, resolved against its directory, must be the
//!    old top's file, by device and inode;
//! 5. the device's engine serves the overlay from then on; the old top's read-write handle is
//!    closed; the device takes requests again.
//!
//! Under the sandbox's Landlock rules the overlay must sit beneath the directory of an image of
//! the disk's chain (see [`crate::sandbox::landlock`]); elsewhere the open fails with EACCES.
//!
//! A failure in 3 to 5 takes the old top's write permission back and leaves the device on it,
//! writable as before; a file created in 1 stays, as QEMU leaves it.
//!
//! Locks: runs on the main thread with the global lock held (a monitor command), and acquires the
//! disk's context after it, as docs/DESIGN.md orders; the drain waits with the context released, so
//! the iothread (or the main loop's context) keeps serving other disks meanwhile.

use std::path::Path;
use std::sync::Arc;

use block::qcow2::create::CreateOptions;
use block::{
    CacheMode, DetectZeroes, DiskImage, FileId, Format, Image, NewImage, WithPolicy, WritePolicy,
};
use devices::virtio::block::Block;

use crate::drive::CacheSetting;
use crate::monitor::{ImageDescription, SnapshotMode};

/// The image a disk's device serves, as the VM keeps it to change it: typed, with what wraps it.
#[derive(Debug)]
pub struct LiveImage {
    /// The top of the chain, as the device's engine has it.
    pub(super) top: Arc<WithPolicy<Image>>,
    /// `-drive cache=`'s host part, for the files a snapshot opens.
    pub(super) cache: CacheMode,
    /// `-drive cache=`'s write policy.
    pub(super) policy: WritePolicy,
    /// `-drive detect-zeroes=`.
    pub(super) detect_zeroes: DetectZeroes,
}

impl LiveImage {
    /// `top` as a device serves it, wrapped with `cache`'s write policy and `detect_zeroes`.
    pub(super) fn new(
        top: Arc<WithPolicy<Image>>,
        cache: CacheSetting,
        detect_zeroes: DetectZeroes,
    ) -> Self {
        Self {
            top,
            cache: cache.host,
            policy: cache.policy,
            detect_zeroes,
        }
    }

    /// The top of the chain.
    pub(super) fn top(&self) -> &Image {
        self.top.inner()
    }

    /// `query-block`'s description of the image and its chain now.
    pub fn describe(&self) -> ImageDescription {
        super::query::describe(self.top.inner())
    }
}

/// Why a snapshot failed; the disk is as it was. Messages are QEMU's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Another user has the overlay open (a file of this disk's chain, or another process's).
    #[error("Failed to get \"write\" lock")]
    Locked,
    /// The overlay could not be created.
    #[error("Could not create '{path}': {reason}")]
    Create {
        /// The overlay.
        path: String,
        /// Why, as QEMU words it.
        reason: String,
    },
    /// The overlay (or a file of its chain) could not be opened.
    #[error("Could not open '{path}': {reason}")]
    Open {
        /// The overlay.
        path: String,
        /// Why.
        reason: String,
    },
    /// An `existing` overlay whose backing file is not the disk's top.
    #[error("'{path}' is not an overlay of '{top}': its backing file is {backing}")]
    NotOverlay {
        /// The overlay.
        path: String,
        /// The disk's top.
        top: String,
        /// What the overlay names instead.
        backing: String,
    },
    /// An `existing` overlay of another size than the disk.
    #[error("'{path}' is {size} bytes, the disk {disk_size}")]
    Size {
        /// The overlay.
        path: String,
        /// Its virtual size.
        size: u64,
        /// The disk's.
        disk_size: u64,
    },
    /// A read-only disk: its overlay could never be written.
    #[error("Device '{0}' is read-only")]
    ReadOnly(String),
    /// Flushing the old top failed.
    #[error("Could not flush '{path}': {reason}")]
    Flush {
        /// The old top.
        path: String,
        /// Why.
        reason: String,
    },
    /// Dropping the old top's write lock failed.
    #[error("Could not change the locks of '{path}': {reason}")]
    Lock {
        /// The old top.
        path: String,
        /// Why.
        reason: String,
    },
    /// The device's engine could not take the overlay.
    #[error("Could not switch drive '{drive}' to the overlay: {reason}")]
    Switch {
        /// The drive.
        drive: String,
        /// Why.
        reason: String,
    },
}

/// What a failure says after QEMU's "Could not open 'FILE': ": the OS error alone, without
/// Rust's "(os error N)", or the engine's error chain.
fn reason(e: &block::Error) -> String {
    let io = match e {
        block::Error::Open { source, .. } => Some(source),
        block::Error::Backing { source, .. } => match source.as_ref() {
            block::Error::Open { source, .. } => Some(source),
            _ => None,
        },
        _ => None,
    };
    match io {
        Some(io) => {
            let text = io.to_string();
            match text.split_once(" (os error") {
                Some((head, _)) => head.to_owned(),
                None => text,
            }
        }
        None => devices::error_chain(e),
    }
}

/// Takes a snapshot of drive `drive`, served by `device` from `live`, into `file` (steps in the
/// module documentation); `live` then holds the overlay.
pub fn snapshot(
    drive: &str,
    read_only: bool,
    device: &Block,
    live: &mut LiveImage,
    file: &Path,
    mode: SnapshotMode,
) -> Result<(), SnapshotError> {
    if read_only {
        return Err(SnapshotError::ReadOnly(drive.to_owned()));
    }
    let path = file.display().to_string();
    let old = Arc::clone(&live.top);
    let top = old.inner();
    let top_name = top.file().path().to_owned();
    let created = match mode {
        SnapshotMode::AbsolutePaths => {
            let options = CreateOptions {
                size: top.size(),
                backing: Some((top_name.clone(), top.format().name().to_owned())),
                ..CreateOptions::default()
            };
            let create_failed = |e: block::Error| match e.kind() {
                block::ErrorKind::Locked => SnapshotError::Locked,
                _ => SnapshotError::Create {
                    path: path.clone(),
                    reason: reason(&e),
                },
            };
            let new = NewImage::open(file).map_err(create_failed)?;
            new.format(Format::Qcow2, &options).map_err(create_failed)?;
            Some(new)
        }
        SnapshotMode::Existing => None,
    };
    let switched = device.with_drained_io(|aio| {
        top.flush().map_err(|e| SnapshotError::Flush {
            path: top_name.clone(),
            reason: reason(&e),
        })?;
        top.set_write_permission(false)
            .map_err(|e| SnapshotError::Lock {
                path: top_name.clone(),
                reason: reason(&e),
            })?;
        let result = open_overlay(created, file, live, top).and_then(|image| {
            let new = Arc::new(WithPolicy::new(image, live.policy, live.detect_zeroes));
            aio.replace_image(Arc::clone(&new) as Arc<dyn DiskImage>)
                .map_err(|e| SnapshotError::Switch {
                    drive: drive.to_owned(),
                    reason: devices::error_chain(&e),
                })?;
            Ok(new)
        });
        if result.is_err() {
            if let Err(e) = top.set_write_permission(true) {
                log::error!("drive {drive}: cannot take back the write lock of {top_name}: {e}");
            }
        }
        result
    })?;
    live.top = switched;
    // The engine's handle went with the replacement; this was the last one: the old top's
    // read-write descriptor closes (its metadata was flushed above) and its locks with it.
    drop(old);
    Ok(())
}

/// Opens the overlay read-write over the disk's chain: the old top `top` reopened read-only by
/// the name the disk opened it with, and its backing chain as the disk has it, never by the
/// name the overlay's header holds (QEMU attaches the overlay over the open chain, so a relative
/// name it wrote, which resolves against the overlay's directory, does not matter while the
/// disk runs). The overlay is the one `created` wrote, or the user's file, which must name the
/// disk's top as its backing file and have its size.
fn open_overlay(
    created: Option<NewImage>,
    file: &Path,
    live: &LiveImage,
    top: &Image,
) -> Result<Image, SnapshotError> {
    let path = file.display().to_string();
    let open_failed = |path: &str, e: block::Error| match e.kind() {
        block::ErrorKind::Locked => SnapshotError::Locked,
        _ => SnapshotError::Open {
            path: path.to_owned(),
            reason: reason(&e),
        },
    };
    let top_name = top.file().path();
    let backing = block::reopen_read_only(top, live.cache).map_err(|e| open_failed(top_name, e))?;
    if let Some(new) = created {
        return new
            .into_image_over(backing)
            .map_err(|e| open_failed(&path, e));
    }
    let image = block::open_over(file, live.cache, backing).map_err(|e| open_failed(&path, e))?;
    let named = match &image {
        Image::Qcow2(q) => q.header().backing.map(|(name, _)| name),
        Image::Raw(_) => None,
    };
    let names_top = named.as_deref().is_some_and(|name| {
        FileId::of_path(&block::resolve_backing(file, name)) == Some(top.file().id())
    });
    if !names_top {
        return Err(SnapshotError::NotOverlay {
            path,
            top: top_name.to_owned(),
            backing: named.unwrap_or_else(|| "none".to_owned()),
        });
    }
    if image.size() != top.size() {
        return Err(SnapshotError::Size {
            path,
            size: image.size(),
            disk_size: top.size(),
        });
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use block::aio::Engine;
    use block::OpenOptions;
    use devices::context::{Context, IoThread};
    use devices::virtio::block::test_util::{Rig, BUF, F_WRITE, HDR, STATUS};
    use devices::virtio::block::{request_type, status};
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    /// Writes the test issues; write `i` puts `pattern(i)` in 4 KiB block `i % BLOCKS`.
    const WRITES: usize = 160;
    const BLOCKS: usize = 64;
    /// Requests the writer puts in flight at once.
    const DEPTH: usize = 4;
    const SIZE: u64 = 4 << 20;

    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 251).unwrap() + 1
    }

    /// What the disk holds once the first `n` writes are done: each block's byte, 0 if unwritten.
    fn after(n: usize) -> Vec<u8> {
        let mut blocks = vec![0u8; BLOCKS];
        for i in 0..n {
            blocks[i % BLOCKS] = pattern(i);
        }
        blocks
    }

    /// Each block's byte as `path`'s chain reads it (checking the whole block holds it).
    fn contents(path: &Path) -> Vec<u8> {
        let image = block::open(path, OpenOptions::default()).unwrap();
        (0..BLOCKS)
            .map(|b| {
                let mut buf = vec![0u8; 4096];
                image
                    .read_at(&mut buf, u64::try_from(b).unwrap() * 4096)
                    .unwrap();
                assert!(buf.iter().all(|&x| x == buf[0]), "block {b} torn");
                buf[0]
            })
            .collect()
    }

    /// A writer thread keeps `DEPTH` writes in flight on a device served by `ctx` while the main
    /// thread snapshots the disk; then every write is in the new chain, the old top holds
    /// exactly the writes taken before the switch, and QEMU's tools agree on the chain.
    fn snapshot_under_load(ctx: Arc<Context>, engine: Engine, policy: WritePolicy) {
        let dir = std::env::temp_dir().join(format!(
            "vmm-snapshot-{}-{}",
            std::process::id(),
            ctx.name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.qcow2");
        let overlay = dir.join("overlay.qcow2");
        let options = CreateOptions {
            size: SIZE,
            ..CreateOptions::default()
        };
        block::create(&base, Format::Qcow2, &options).unwrap();
        // `-drive l2-cache-size=128K,refcount-cache-size=256K`.
        let sizes = block::qcow2::CacheSizes::new(Some(128 << 10), Some(256 << 10), None).unwrap();
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            cache_sizes: sizes,
            ..OpenOptions::default()
        };
        let cache = CacheSetting {
            policy,
            ..CacheSetting::default()
        };
        let top = Arc::new(WithPolicy::new(
            block::open(&base, opts).unwrap(),
            cache.policy,
            DetectZeroes::Off,
        ));
        let mut live = LiveImage::new(Arc::clone(&top), cache, DetectZeroes::Off);
        let rig = Arc::new(Rig::with_engine(ctx, top, 1, false, engine));
        rig.start(!0);

        let writer = {
            let rig = Arc::clone(&rig);
            std::thread::spawn(move || {
                for i in 0..WRITES {
                    let slot = u16::try_from(i % DEPTH).unwrap();
                    // Completions may come out of order: a slot is reused once its whole batch
                    // is done.
                    if slot == 0 {
                        rig.wait_used(0, u16::try_from(i).unwrap());
                    }
                    let buf = BUF + u64::from(slot) * 4096;
                    let hdr = HDR + u64::from(slot) * 0x20;
                    rig.mem
                        .write_slice(&[pattern(i); 4096], GuestAddress(buf))
                        .unwrap();
                    rig.header(
                        hdr,
                        request_type::OUT,
                        u64::try_from(i % BLOCKS).unwrap() * 8,
                    );
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
        rig.wait_used(0, 8);
        let before = usize::from(rig.used_idx(0));
        snapshot(
            "d0",
            false,
            &rig.dev,
            &mut live,
            &overlay,
            SnapshotMode::AbsolutePaths,
        )
        .unwrap();
        let taken = usize::from(rig.avail_idx(0));
        writer.join().unwrap();
        for slot in 0..DEPTH {
            assert_eq!(rig.byte(STATUS + u64::try_from(slot).unwrap()), status::OK);
        }
        assert_eq!(live.describe().filename, overlay.display().to_string());
        // As QEMU's nodes: the old top keeps its options, the overlay is a new node.
        let chain: Vec<_> = live.top().chain().map(Image::cache_sizes).collect();
        assert_eq!(chain, [block::qcow2::CacheSizes::default(), sizes]);

        // While the disk runs: the old top may be read by others and not written; the overlay
        // is ours alone.
        let (base_s, overlay_s) = (base.to_str().unwrap(), overlay.to_str().unwrap());
        let read =
            crate::disks::run_tool("qemu-io", &["-r", "-f", "qcow2", "-c", "read 0 4k", base_s]);
        assert!(read.status.success(), "{read:?}");
        let write = crate::disks::run_tool("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", base_s]);
        assert!(
            !write.status.success(),
            "a writer got the old top: {write:?}"
        );
        let other = crate::disks::run_tool(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read 0 4k", overlay_s],
        );
        assert!(
            !other.status.success(),
            "the overlay is not locked: {other:?}"
        );

        rig.dev.shutdown().unwrap();
        drop(rig);
        drop(live);

        // The old top holds exactly a prefix of the writes, ending between what had completed
        // before the switch and what the driver had made available by its end.
        let in_base = contents(&base);
        let prefix = (before..=taken).find(|&n| after(n) == in_base);
        assert!(prefix.is_some(), "the old top is no prefix of the writes");
        assert_eq!(contents(&overlay), after(WRITES));
        for image in [base_s, overlay_s] {
            let check = crate::disks::run_tool("qemu-img", &["check", image]);
            assert!(check.status.success(), "{check:?}");
        }
        let info = crate::disks::run_tool(
            "qemu-img",
            &["info", "--output=json", "--backing-chain", overlay_s],
        );
        let chain: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(chain[0]["filename"], overlay_s);
        assert_eq!(chain[0]["backing-filename"], base_s);
        assert_eq!(chain[0]["backing-filename-format"], "qcow2");
        assert_eq!(chain[0]["virtual-size"], SIZE);
        assert_eq!(chain[1]["filename"], base_s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_snapshot_leaves_the_disk_writable_on_its_image() {
        let dir = std::env::temp_dir().join(format!("vmm-snapshot-{}-failed", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, other, wrong) = (
            dir.join("base.qcow2"),
            dir.join("other.qcow2"),
            dir.join("wrong.qcow2"),
        );
        let options = CreateOptions {
            size: SIZE,
            ..CreateOptions::default()
        };
        block::create(&base, Format::Qcow2, &options).unwrap();
        block::create(&other, Format::Qcow2, &options).unwrap();
        let wrong_options = CreateOptions {
            backing: Some((other.display().to_string(), "qcow2".into())),
            ..options
        };
        block::create(&wrong, Format::Qcow2, &wrong_options).unwrap();
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            ..OpenOptions::default()
        };
        let top = Arc::new(WithPolicy::new(
            block::open(&base, opts).unwrap(),
            WritePolicy::WriteBack,
            DetectZeroes::Off,
        ));
        let mut live = LiveImage::new(Arc::clone(&top), CacheSetting::default(), DetectZeroes::Off);
        let io = IoThread::spawn("io-snap-fail").unwrap();
        let rig = Rig::new(io.context().clone(), top, 1, false);
        rig.start(!0);
        let failed = snapshot(
            "d0",
            false,
            &rig.dev,
            &mut live,
            &wrong,
            SnapshotMode::Existing,
        );
        assert!(
            matches!(failed, Err(SnapshotError::NotOverlay { .. })),
            "{failed:?}"
        );
        // The old top kept its write lock: nobody else may read it consistently...
        let base_s = base.to_str().unwrap();
        let read =
            crate::disks::run_tool("qemu-io", &["-r", "-f", "qcow2", "-c", "read 0 4k", base_s]);
        assert!(!read.status.success(), "the old top lost its write lock");
        // ...and the device still writes to it.
        rig.mem
            .write_slice(&[0x77; 4096], GuestAddress(BUF))
            .unwrap();
        rig.header(HDR, request_type::OUT, 0);
        rig.submit(0, 0, &[(HDR, 16, 0), (BUF, 4096, 0), (STATUS, 1, F_WRITE)]);
        rig.wait_used(0, 1);
        assert_eq!(rig.byte(STATUS), status::OK);
        rig.dev.shutdown().unwrap();
        drop(rig);
        drop(live);
        io.stop().unwrap();
        assert_eq!(contents(&base)[0], 0x77);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // Write-through: each write syncs, so writes are still running when the switch comes.
    #[test]
    fn snapshot_of_an_iothread_disk_under_load() {
        let io = IoThread::spawn("io-snap").unwrap();
        snapshot_under_load(
            io.context().clone(),
            Engine::Threads,
            WritePolicy::WriteThrough,
        );
        io.stop().unwrap();
    }

    /// Write-back, so that writes to allocated clusters go through the ring: after the switch
    /// they must reach the overlay's file.
    #[test]
    fn snapshot_of_an_io_uring_disk_under_load() {
        let io = IoThread::spawn("io-snap-uring").unwrap();
        snapshot_under_load(
            io.context().clone(),
            Engine::IoUring,
            WritePolicy::WriteBack,
        );
        io.stop().unwrap();
    }

    #[test]
    fn snapshot_of_a_main_loop_disk_under_load() {
        let ctx = Context::new("main-loop").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let runner = {
            let (ctx, stop) = (Arc::clone(&ctx), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    ctx.run_once(Some(std::time::Duration::from_millis(5)))
                        .unwrap();
                }
            })
        };
        snapshot_under_load(ctx, Engine::Threads, WritePolicy::WriteThrough);
        stop.store(true, Ordering::SeqCst);
        runner.join().unwrap();
    }
}
