//! What a failed request does, as `-drive werror=`/`rerror=` choose (QEMU's `BlockdevOnError`
//! and `BlockErrorAction`): complete with VIRTIO_BLK_S_IOERR (`report`), complete as if it had
//! succeeded (`ignore`), or keep the request and ask for the VM to stop (`stop`, and `enospc`
//! when the host said ENOSPC) until [`super::Block::retry_failed`] resubmits it.
//!
//! Reads follow the read policy; writes, write-zeroes, discards and flushes the write policy, as
//! in QEMU. Every error is reported to the device's [`ErrorSink`] (the VMM raises QMP's
//! `BLOCK_IO_ERROR` and, for `stop`, stops the VM); the sink runs in the device's context, so
//! on an iothread it must not take the global lock. The I/O status that `query-block` shows
//! (`ok`, `failed`, `nospace`) is an atomic, readable from any thread: the first error that
//! stops the VM sets it, and a retry clears it.

use std::ffi::CStr;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// `-drive werror=`/`rerror=`: what to do with a failed request (QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Fail the request (VIRTIO_BLK_S_IOERR).
    Report,
    /// Complete the request as if it had succeeded.
    Ignore,
    /// Keep the request and stop the VM.
    Stop,
    /// Stop on ENOSPC, report anything else (writes only).
    Enospc,
}

impl ErrorPolicy {
    /// QEMU's default for reads (`rerror=report`).
    pub const READ_DEFAULT: ErrorPolicy = ErrorPolicy::Report;
    /// QEMU's default for writes (`werror=enospc`).
    pub const WRITE_DEFAULT: ErrorPolicy = ErrorPolicy::Enospc;

    /// The action for a request that failed with `errno` (QEMU's `blk_get_error_action`).
    pub fn action(self, errno: i32) -> ErrorAction {
        match self {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc if errno == libc::ENOSPC => ErrorAction::Stop,
            ErrorPolicy::Enospc => ErrorAction::Report,
        }
    }
}

/// What was done with one failed request (QEMU's `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Failed with VIRTIO_BLK_S_IOERR.
    Report,
    /// Completed as a success.
    Ignore,
    /// Kept for a retry; the VM is to stop.
    Stop,
}

impl ErrorAction {
    /// QEMU's name for the action.
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// One failed request, as the sink hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoErrorEvent {
    /// The drive's id.
    pub drive: String,
    /// A read (else a write, write-zeroes, discard or flush).
    pub is_read: bool,
    /// What was done.
    pub action: ErrorAction,
    /// The host error number (EIO where the failure had none).
    pub errno: i32,
}

impl IoErrorEvent {
    /// The host ran out of space.
    pub fn nospace(&self) -> bool {
        self.errno == libc::ENOSPC
    }

    /// `strerror(errno)`, as QEMU puts in `BLOCK_IO_ERROR`'s `reason`.
    pub fn reason(&self) -> String {
        strerror(self.errno)
    }
}

/// Hears of every failed request; called in the device's context.
#[derive(Clone)]
pub struct ErrorSink(pub Arc<dyn Fn(IoErrorEvent) + Send + Sync>);

impl fmt::Debug for ErrorSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErrorSink")
    }
}

/// `query-block`'s `io-status` (QEMU's `BlockDeviceIoStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// No error stopped the VM since the last retry.
    Ok,
    /// An error other than ENOSPC stopped the VM.
    Failed,
    /// ENOSPC stopped the VM.
    NoSpace,
}

impl IoStatus {
    /// QEMU's name for the status.
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        }
    }
}

/// The I/O status as an atomic.
#[derive(Debug, Default)]
pub(super) struct IoStatusCell(AtomicU8);

impl IoStatusCell {
    pub(super) fn get(&self) -> IoStatus {
        match self.0.load(Ordering::Acquire) {
            0 => IoStatus::Ok,
            1 => IoStatus::Failed,
            _ => IoStatus::NoSpace,
        }
    }

    /// Records a stopping error, unless one is recorded already (the first one stays, as QEMU's
    /// `blk_iostatus_set_err` keeps it).
    pub(super) fn set_error(&self, errno: i32) {
        let value = if errno == libc::ENOSPC { 2 } else { 1 };
        // Already set: the first error stays.
        let _ = self
            .0
            .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(super) fn reset(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// The host error number behind a block-layer error: the first OS error in its causes, else EIO
/// (a corrupt image, a request the image refused).
pub fn errno_of(e: &block::Error) -> i32 {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(n) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return n;
        }
        cause = c.source();
    }
    libc::EIO
}

/// The C library's message for `errno`.
fn strerror(errno: i32) -> String {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: the buffer is valid for its length; libc's `strerror_r` is the XSI one, which
    // writes a NUL-terminated message into it (truncated if need be) and touches nothing else.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return format!("Unknown error {errno}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated string within its length.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::test_util::*;
    use super::super::{request_type, status, BlockConfig};
    use super::*;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn policies_choose_qemus_actions() {
        use ErrorAction as A;
        use ErrorPolicy as P;
        for (policy, enospc, eio) in [
            (P::Report, A::Report, A::Report),
            (P::Ignore, A::Ignore, A::Ignore),
            (P::Stop, A::Stop, A::Stop),
            (P::Enospc, A::Stop, A::Report),
        ] {
            assert_eq!(policy.action(libc::ENOSPC), enospc, "{policy:?}");
            assert_eq!(policy.action(libc::EIO), eio, "{policy:?}");
        }
        assert_eq!(
            (A::Report.name(), A::Ignore.name(), A::Stop.name()),
            ("report", "ignore", "stop")
        );
    }

    #[test]
    fn io_status_keeps_the_first_error_until_reset() {
        let s = IoStatusCell::default();
        assert_eq!(s.get(), IoStatus::Ok);
        s.set_error(libc::ENOSPC);
        s.set_error(libc::EIO);
        assert_eq!(s.get().name(), "nospace");
        s.reset();
        s.set_error(libc::EIO);
        assert_eq!(s.get(), IoStatus::Failed);
    }

    #[test]
    fn errno_and_reason_come_from_the_host_error() {
        let e = block::Error::Io {
            op: "write",
            path: "f".into(),
            offset: 0,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(errno_of(&e), libc::ENOSPC);
        assert_eq!(errno_of(&block::Error::ReadOnly), libc::EIO);
        let event = IoErrorEvent {
            drive: "d0".into(),
            is_read: false,
            action: ErrorAction::Stop,
            errno: libc::ENOSPC,
        };
        assert!(event.nospace());
        assert_eq!(event.reason(), "No space left on device");
        assert_eq!(strerror(libc::EIO), "Input/output error");
    }

    /// A 1 MiB tmpfs (mounting needs root, as CI runs the tests), a raw image with a hole on
    /// it, and a filler file that takes every free page: a write into the hole fails with a
    /// real ENOSPC until the filler goes. Unmounted when dropped.
    struct FullDisk {
        dir: tempfile::TempDir,
        image: std::path::PathBuf,
        filler: std::path::PathBuf,
    }

    impl FullDisk {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mount = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(
                mount.success(),
                "mounting a tmpfs needs root (CI runs as root)"
            );
            let image = dir.path().join("disk.raw");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
            let filler = dir.path().join("filler");
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = [0x33u8; 4096];
            loop {
                match std::io::Write::write_all(&mut f, &chunk) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
            FullDisk { dir, image, filler }
        }

        fn open(&self) -> Arc<block::Image> {
            let opts = block::OpenOptions {
                format: Some(block::Format::Raw),
                read_only: false,
                ..Default::default()
            };
            Arc::new(block::open(&self.image, opts).unwrap())
        }

        fn free_space(&self) {
            std::fs::remove_file(&self.filler).unwrap();
        }
    }

    impl Drop for FullDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    /// What a recording sink heard, each with whether it ran in an iothread.
    type Heard = Arc<std::sync::Mutex<Vec<(IoErrorEvent, bool)>>>;

    /// A sink that records what it hears and where it ran.
    fn recording_sink() -> (ErrorSink, Heard) {
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = Arc::clone(&heard);
        let sink = ErrorSink(Arc::new(move |e| {
            h.lock().unwrap().push((e, crate::context::in_iothread()));
        }));
        (sink, heard)
    }

    fn config(
        on_read_error: ErrorPolicy,
        on_write_error: ErrorPolicy,
        sink: ErrorSink,
    ) -> BlockConfig {
        BlockConfig {
            id: "d0".into(),
            queue_size: QSIZE,
            io_workers: block::aio::Workers::fixed(2),
            on_read_error,
            on_write_error,
            error_sink: Some(sink),
            ..BlockConfig::default()
        }
    }

    /// Makes a 4 KiB write of `byte` at sector 8 available at head `head`, status at `status`.
    fn write_4k<I: block::DiskImage + 'static>(rig: &Rig<I>, head: u16, byte: u8, status: u64) {
        let hdr = HDR + 0x20 * u64::from(head);
        let buf = BUF + 0x1000 * u64::from(head);
        rig.mem
            .write_slice(&[byte; 4096], GuestAddress(buf))
            .unwrap();
        rig.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        rig.header(hdr, request_type::OUT, 8);
        rig.submit(
            0,
            head,
            &[(hdr, 16, 0), (buf, 4096, 0), (status, 1, F_WRITE)],
        );
    }

    fn image_bytes(path: &std::path::Path) -> Vec<u8> {
        let data = std::fs::read(path).unwrap();
        data[4096..8192].to_vec()
    }

    #[test]
    fn enospc_keeps_the_write_until_a_retry_completes_it() {
        let disk = FullDisk::new();
        let (sink, heard) = recording_sink();
        let rig = Rig::with_config(
            crate::context::Context::new("main-loop").unwrap(),
            disk.open(),
            config(ErrorPolicy::READ_DEFAULT, ErrorPolicy::WRITE_DEFAULT, sink),
        );
        rig.start(!0);
        write_4k(&rig, 0, 0x5a, STATUS);
        for _ in 0..50 {
            rig.ctx.run_once(Some(Duration::from_millis(10))).unwrap();
            if !heard.lock().unwrap().is_empty() {
                break;
            }
        }
        let want = IoErrorEvent {
            drive: "d0".into(),
            is_read: false,
            action: ErrorAction::Stop,
            errno: libc::ENOSPC,
        };
        assert_eq!(*heard.lock().unwrap(), vec![(want, false)]);
        // Kept: not answered, not counted, the status says why.
        rig.ctx.run_once(Some(Duration::from_millis(50))).unwrap();
        assert_eq!(rig.used_idx(0), 0);
        assert_eq!(rig.byte(STATUS), 0xff);
        assert_eq!(rig.dev.io_status(), IoStatus::NoSpace);
        let s = rig.dev.stats().snapshot();
        assert_eq!((s.wr.operations, s.wr.failed_operations), (0, 0));
        // Other requests are still served meanwhile.
        rig.header(HDR + 0x200, request_type::FLUSH, 0);
        rig.submit(0, 5, &[(HDR + 0x200, 16, 0), (STATUS + 1, 1, F_WRITE)]);
        rig.run_until_used(0, 1);
        assert_eq!(rig.used(0, 0).0, 5);

        disk.free_space();
        rig.dev.retry_failed();
        assert_eq!(rig.dev.io_status(), IoStatus::Ok);
        rig.run_until_used(0, 2);
        assert_eq!(rig.used(0, 1), (0, 1));
        assert_eq!(rig.byte(STATUS), status::OK);
        assert_eq!(image_bytes(&disk.image), vec![0x5a; 4096]);
        let s = rig.dev.stats().snapshot();
        assert_eq!((s.wr.operations, s.wr.failed_operations), (1, 0));
        assert_eq!(heard.lock().unwrap().len(), 1);
    }

    #[test]
    fn report_fails_and_ignore_succeeds_without_writing() {
        for (policy, want_status, want_ops, want_failed) in [
            (ErrorPolicy::Report, status::IOERR, 0, 1),
            (ErrorPolicy::Ignore, status::OK, 1, 0),
            // enospc reports what is not ENOSPC, but this is ENOSPC: see the test above.
        ] {
            let disk = FullDisk::new();
            let (sink, heard) = recording_sink();
            let rig = Rig::with_config(
                crate::context::Context::new("main-loop").unwrap(),
                disk.open(),
                config(ErrorPolicy::Report, policy, sink),
            );
            rig.start(!0);
            write_4k(&rig, 0, 0x5a, STATUS);
            rig.run_until_used(0, 1);
            assert_eq!(rig.byte(STATUS), want_status, "{policy:?}");
            let s = rig.dev.stats().snapshot();
            assert_eq!(
                (s.wr.operations, s.wr.failed_operations),
                (want_ops, want_failed),
                "{policy:?}"
            );
            assert_eq!(rig.dev.io_status(), IoStatus::Ok, "{policy:?}");
            let heard = heard.lock().unwrap();
            assert_eq!(heard.len(), 1);
            assert_eq!(heard[0].0.action, policy.action(libc::ENOSPC));
            assert_eq!(image_bytes(&disk.image), vec![0; 4096], "{policy:?}");
        }
    }

    #[test]
    fn a_stopped_write_on_an_iothread_is_retried_from_another_thread() {
        let disk = FullDisk::new();
        let (sink, heard) = recording_sink();
        let io = crate::context::IoThread::spawn("io-werror").unwrap();
        let rig = Rig::with_config(
            io.context().clone(),
            disk.open(),
            config(ErrorPolicy::Report, ErrorPolicy::Stop, sink),
        );
        rig.start(!0);
        write_4k(&rig, 0, 0x77, STATUS);
        write_4k(&rig, 3, 0x78, STATUS + 1);
        for _ in 0..5000 {
            if heard.lock().unwrap().len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let heard = heard.lock().unwrap();
            assert_eq!(heard.len(), 2);
            // Heard in the iothread, never under the global lock.
            assert!(heard
                .iter()
                .all(|(e, in_io)| *in_io && e.action == ErrorAction::Stop));
        }
        assert_eq!(rig.used_idx(0), 0);
        assert_eq!(rig.dev.io_status(), IoStatus::NoSpace);
        disk.free_space();
        rig.dev.retry_failed();
        rig.wait_used(0, 2);
        assert_eq!(
            (rig.byte(STATUS), rig.byte(STATUS + 1)),
            (status::OK, status::OK)
        );
        // Both wrote sector 8; the later one may land last or first, as the guest allows for
        // two writes in flight at once.
        let b = image_bytes(&disk.image);
        assert!(b == vec![0x77; 4096] || b == vec![0x78; 4096]);
        assert_eq!(rig.dev.stats().snapshot().wr.operations, 2);
        rig.dev.shutdown().unwrap();
        drop(rig);
        io.stop().unwrap();
    }

    #[test]
    fn rerror_stop_keeps_a_failed_read_and_reset_drops_it() {
        let (sink, heard) = recording_sink();
        let image = MemImage::new(1 << 16, false);
        image.data.lock().unwrap()[..512].fill(0x42);
        let rig = Rig::with_config(
            crate::context::Context::new("main-loop").unwrap(),
            Arc::clone(&image),
            config(ErrorPolicy::Stop, ErrorPolicy::WRITE_DEFAULT, sink),
        );
        rig.start(!0);
        image
            .fail_reads
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let read = |head: u16| {
            rig.header(HDR, request_type::IN, 0);
            rig.submit(
                0,
                head,
                &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
            );
        };
        read(0);
        while heard.lock().unwrap().is_empty() {
            rig.ctx.run_once(Some(Duration::from_millis(10))).unwrap();
        }
        let (event, _) = heard.lock().unwrap()[0].clone();
        assert!(event.is_read && event.action == ErrorAction::Stop && event.errno == libc::EIO);
        assert_eq!(rig.dev.io_status(), IoStatus::Failed);
        image
            .fail_reads
            .store(false, std::sync::atomic::Ordering::SeqCst);
        rig.dev.retry_failed();
        rig.run_until_used(0, 1);
        assert_eq!((rig.byte(STATUS), rig.byte(BUF)), (status::OK, 0x42));

        // Kept again, then the driver resets the device: dropped unanswered, and the head is
        // free for the driver's next start.
        image
            .fail_reads
            .store(true, std::sync::atomic::Ordering::SeqCst);
        read(0);
        while heard.lock().unwrap().len() < 2 {
            rig.ctx.run_once(Some(Duration::from_millis(10))).unwrap();
        }
        rig.set_reg(0x70, 0);
        assert_eq!(rig.used_idx(0), 1);
    }
}
