//! A disk image for the tests of the worker pool and its engines: the crate's raw engine on a
//! temporary file, with a gate that holds reads back (to keep requests in flight on purpose) and
//! counters of what reached it.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{Aio, Completion, IoSeg, Op, Request};
use crate::direct::{DirectPin, DirectTarget, Extent};
use crate::{BlockStatus, DiskImage, Error};

/// The crate's raw engine on a temporary file, with a gate that can hold reads back (to
/// keep requests in flight on purpose) and counters.
#[derive(Debug)]
pub(super) struct RawFile {
    pub inner: crate::Image,
    _dir: tempfile::TempDir,
    /// While closed, reads wait.
    pub gate: Mutex<bool>,
    gate_cond: Condvar,
    /// Reads that entered `read_at`.
    pub reads_started: AtomicUsize,
    pub flushes: AtomicUsize,
    /// Whether the host file is offered for direct I/O (the trait's default, none, otherwise).
    direct: bool,
}

impl RawFile {
    pub(super) fn new(size: u64) -> Arc<Self> {
        Self::build(size, false)
    }

    /// As `new`, offering the raw engine's host file and mappings for direct I/O.
    pub(super) fn direct(size: u64) -> Arc<Self> {
        Self::build(size, true)
    }

    fn build(size: u64, direct: bool) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let create = crate::qcow2::create::CreateOptions {
            size,
            ..Default::default()
        };
        crate::create(&path, crate::Format::Raw, &create).unwrap();
        let opts = crate::OpenOptions {
            format: Some(crate::Format::Raw),
            read_only: false,
            ..Default::default()
        };
        Arc::new(RawFile {
            inner: crate::open(&path, opts).unwrap(),
            _dir: dir,
            gate: Mutex::new(true),
            gate_cond: Condvar::new(),
            reads_started: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            direct,
        })
    }

    pub(super) fn set_gate(&self, open: bool) {
        *self.gate.lock().unwrap() = open;
        self.gate_cond.notify_all();
    }
}

impl DiskImage for RawFile {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.gate_cond.wait(open).unwrap();
        }
        drop(open);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), Error> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Error> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.inner.block_status(offset, len)
    }
    fn direct_target(&self) -> Option<DirectTarget> {
        self.inner.direct_target().filter(|_| self.direct)
    }
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        if !self.direct {
            return None;
        }
        self.inner.map_direct(offset, len, write, extents)
    }
}

pub(super) fn seg(buf: &mut [u8]) -> IoSeg {
    // SAFETY: every test keeps `buf` alive and untouched until the completion is reaped.
    unsafe { IoSeg::new(buf.as_mut_ptr(), buf.len()) }
}

/// Whether the completion eventfd becomes readable within `ms` milliseconds.
pub(super) fn signalled_within(aio: &Aio, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: aio.completion_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length one for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    assert!(n >= 0);
    n == 1
}

/// Waits (bounded) for the completion eventfd and reaps exactly one completion.
pub(super) fn reap_one(aio: &Aio) -> Completion {
    let mut got = None;
    for _ in 0..100 {
        signalled_within(aio, 100);
        aio.reap(|c| {
            assert!(got.is_none(), "one completion expected");
            got = Some(c);
        });
        if got.is_some() {
            break;
        }
    }
    got.expect("a completion within 10 s")
}

/// Submits one request and reaps its completion, checking the token came back.
pub(super) fn roundtrip(
    aio: &Aio,
    op: Op,
    offset: u64,
    segs: Vec<IoSeg>,
    token: u64,
) -> Completion {
    aio.submit(Request {
        op,
        offset,
        segs,
        token,
    })
    .unwrap();
    let done = reap_one(aio);
    assert_eq!(done.request.token, token);
    done
}
