//! The `aio=io_uring` engine against real raw and qcow2 files: which requests the ring takes
//! (an image wrapper counts the ones that reach the image's own methods, which only the worker
//! pool calls), that data written through either engine reads back through the other and
//! through qemu-io, that `qemu-img check` stays clean, and the error and drain paths.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use block::aio::{Aio, Completion, Engine, IoSeg, Op, Request, Workers};
use block::direct::{DirectPin, DirectTarget, Extent};
use block::{open, BlockStatus, DiskImage, Error, Format, OpenOptions, WithPolicy, WritePolicy};
use common::*;

/// An image whose own methods count their calls (only the pool calls them).
#[derive(Debug)]
struct Counting<I> {
    inner: I,
    reads: AtomicUsize,
    writes: AtomicUsize,
    flushes: AtomicUsize,
}

impl<I: DiskImage> Counting<I> {
    fn new(inner: I) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        })
    }

    /// (reads, writes, flushes) the pool ran.
    fn pool(&self) -> (usize, usize, usize) {
        (
            self.reads.load(Ordering::SeqCst),
            self.writes.load(Ordering::SeqCst),
            self.flushes.load(Ordering::SeqCst),
        )
    }
}

impl<I: DiskImage> DiskImage for Counting<I> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.writes.fetch_add(1, Ordering::SeqCst);
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
        self.inner.direct_target()
    }
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        self.inner.map_direct(offset, len, write, extents)
    }
}

fn open_rw_fmt(path: &Path, format: Format) -> block::Image {
    open(
        path,
        OpenOptions {
            format: Some(format),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A qcow2 image of `size` with `cluster` byte clusters, written to by qemu-io `cmds`.
fn qcow2(dir: &tempfile::TempDir, cluster: u64, size: &str, cmds: &[&str]) -> PathBuf {
    let p = tmp(dir, "q.qcow2");
    let opt = format!("cluster_size={cluster}");
    create_qcow2(&["-o", &opt, p.to_str().unwrap(), size]);
    qemu_io(&p, "qcow2", cmds);
    p
}

fn uring(image: Arc<dyn DiskImage>) -> Aio {
    uring_of_depth(image, 16)
}

fn uring_of_depth(image: Arc<dyn DiskImage>, depth: usize) -> Aio {
    Aio::with_engine("t", image, Workers::fixed(2), depth, Engine::IoUring).unwrap()
}

/// A fresh 1 MiB raw file `name` in `dir`, opened through a counting wrapper, and an io_uring
/// engine of `depth` requests on it.
fn raw_on_uring(
    dir: &tempfile::TempDir,
    name: &str,
    depth: usize,
) -> (PathBuf, Arc<Counting<block::Image>>, Aio) {
    let p = tmp(dir, name);
    qemu_img(&["create", "-q", "-f", "raw", p.to_str().unwrap(), "1M"]);
    let image = Counting::new(open_rw_fmt(&p, Format::Raw));
    let aio = uring_of_depth(image.clone(), depth);
    (p, image, aio)
}

fn seg(buf: &mut [u8]) -> IoSeg {
    // SAFETY: every test keeps `buf` alive and untouched until the completion is reaped.
    unsafe { IoSeg::new(buf.as_mut_ptr(), buf.len()) }
}

/// Waits (bounded) for the completion eventfd and reaps every completion there is.
fn reap_some(aio: &Aio) -> Vec<Completion> {
    let mut got = Vec::new();
    for _ in 0..100 {
        let mut pfd = libc::pollfd {
            fd: aio.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd array of length one for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        assert!(n >= 0);
        aio.reap(|c| got.push(c));
        if !got.is_empty() {
            return got;
        }
    }
    panic!("no completion within 10 s");
}

/// Submits one request and returns its result.
fn run(aio: &Aio, op: Op, offset: u64, segs: Vec<IoSeg>) -> Result<(), Error> {
    aio.submit(Request {
        op,
        offset,
        segs,
        token: 42,
    })
    .unwrap();
    let mut done = reap_some(aio);
    assert_eq!(done.len(), 1);
    let c = done.pop().unwrap();
    assert_eq!(c.request.token, 42);
    c.result
}

#[test]
fn raw_reads_writes_and_flushes_go_through_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (p, image, aio) = raw_on_uring(&dir, "r.raw", 16);
    assert_eq!(aio.engine(), Engine::IoUring);
    // Two segments of one request, at an unaligned offset.
    let mut a = vec![0xa5u8; 1000];
    let mut b = vec![0x5au8; 3000];
    run(&aio, Op::Write, 4097, vec![seg(&mut a), seg(&mut b)]).unwrap();
    let mut back = vec![0u8; 4000];
    run(&aio, Op::Read, 4097, vec![seg(&mut back)]).unwrap();
    assert_eq!(&back[..1000], &a[..]);
    assert_eq!(&back[1000..], &b[..]);
    run(&aio, Op::Flush, 0, Vec::new()).unwrap();
    assert_eq!(image.pool(), (0, 0, 0), "the pool ran nothing");
    assert_eq!(aio.requests_by_engine(), (3, 0));
    // Discard stays on a worker.
    run(&aio, Op::Discard { len: 4096 }, 65536, Vec::new()).unwrap();
    assert_eq!(aio.requests_by_engine(), (3, 1));
    drop(aio);
    drop(image);
    qemu_io(
        &p,
        "raw",
        &[
            "read -P 0xa5 4097 1000",
            "read -P 0x5a 5097 3000",
            "read -P 0 0 4097",
        ],
    );
}

#[test]
fn qcow2_requests_split_across_clusters_mix_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    // Cluster 1 allocated before cluster 0: their host clusters are in reverse order.
    let p = qcow2(
        &dir,
        65536,
        "4M",
        &["write -P 0x11 65536 65536", "write -P 0x22 0 65536"],
    );
    let image = Counting::new(open_rw_fmt(&p, Format::Qcow2));
    let aio = uring(image.clone());

    // The L2 table is not cached yet: the first read is the pool's, and caches it.
    let mut first = vec![0u8; 512];
    run(&aio, Op::Read, 0, vec![seg(&mut first)]).unwrap();
    assert!(first.iter().all(|&x| x == 0x22));
    assert_eq!(image.pool(), (1, 0, 0));

    // Across the two clusters: two submissions on the ring, with the segment boundary inside
    // neither cluster boundary.
    let mut x = vec![0u8; 4096];
    let mut y = vec![0u8; 8192];
    run(&aio, Op::Read, 65536 - 6144, vec![seg(&mut x), seg(&mut y)]).unwrap();
    assert!(x.iter().all(|&v| v == 0x22));
    assert!(y[..2048].iter().all(|&v| v == 0x22));
    assert!(y[2048..].iter().all(|&v| v == 0x11));
    // An in-place write across both, on the ring.
    let mut w = vec![0x33u8; 65536];
    run(&aio, Op::Write, 32768, vec![seg(&mut w)]).unwrap();
    assert_eq!(
        image.pool(),
        (1, 0, 0),
        "the ring took the reads and the write"
    );

    // A write that allocates (cluster 2) is the pool's; the read after it is the ring's.
    let mut alloc = vec![0x44u8; 4096];
    run(&aio, Op::Write, 2 * 65536 + 4096, vec![seg(&mut alloc)]).unwrap();
    assert_eq!(image.pool(), (1, 1, 0));
    let mut back = vec![0u8; 8192];
    run(&aio, Op::Read, 2 * 65536, vec![seg(&mut back)]).unwrap();
    assert!(back[..4096].iter().all(|&v| v == 0));
    assert!(back[4096..].iter().all(|&v| v == 0x44));
    assert_eq!(image.pool(), (1, 1, 0));
    // An unallocated cluster reads as zeroes through the pool.
    let mut hole = vec![0xffu8; 512];
    run(&aio, Op::Read, 3 << 20, vec![seg(&mut hole)]).unwrap();
    assert!(hole.iter().all(|&v| v == 0));
    assert_eq!(image.pool(), (2, 1, 0));
    // qcow2 flushes write back metadata: the pool's.
    run(&aio, Op::Flush, 0, Vec::new()).unwrap();
    assert_eq!(image.pool(), (2, 1, 1));
    drop(aio);
    drop(image);
    assert_check_clean(&p);
    qemu_io(
        &p,
        "qcow2",
        &[
            "read -P 0x22 0 32768",
            "read -P 0x33 32768 65536",
            "read -P 0x11 98304 32768",
            "read -P 0 131072 4096",
            "read -P 0x44 135168 4096",
        ],
    );
}

#[test]
fn writes_to_clusters_shared_with_a_snapshot_copy_on_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2(&dir, 65536, "1M", &["write -P 0x55 0 131072"]);
    let ps = p.to_str().unwrap();
    qemu_img(&["snapshot", "-c", "s1", ps]);
    let image = Counting::new(open_rw_fmt(&p, Format::Qcow2));
    let aio = uring(image.clone());
    // Reads of shared clusters may use the ring once the L2 table is cached.
    let mut r = vec![0u8; 4096];
    run(&aio, Op::Read, 0, vec![seg(&mut r)]).unwrap();
    run(&aio, Op::Read, 65536, vec![seg(&mut r)]).unwrap();
    assert_eq!(image.pool(), (1, 0, 0));
    assert!(r.iter().all(|&v| v == 0x55));
    // A write to a shared cluster must not go in place: the pool copies it.
    let mut w = vec![0x66u8; 4096];
    run(&aio, Op::Write, 65536 + 4096, vec![seg(&mut w)]).unwrap();
    assert_eq!(image.pool().1, 1);
    // Now ours alone: the next write to it goes in place on the ring.
    run(&aio, Op::Write, 65536 + 8192, vec![seg(&mut w)]).unwrap();
    assert_eq!(image.pool().1, 1);
    run(&aio, Op::Flush, 0, Vec::new()).unwrap();
    drop(aio);
    drop(image);
    assert_check_clean(&p);
    qemu_io(
        &p,
        "qcow2",
        &[
            "read -P 0x55 0 69632",
            "read -P 0x66 69632 8192",
            "read -P 0x55 77824 53248",
        ],
    );
    qemu_img(&["snapshot", "-a", "s1", ps]);
    qemu_io(&p, "qcow2", &["read -P 0x55 0 131072"]);
}

#[test]
fn a_read_past_the_end_fails_and_a_short_host_file_reads_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "r.raw");
    std::fs::write(&p, vec![0x77u8; 65536]).unwrap();
    let image = Counting::new(open_rw_fmt(&p, Format::Raw));
    let aio = uring(image.clone());
    let mut buf = vec![0u8; 512];
    let r = run(&aio, Op::Read, 65536, vec![seg(&mut buf)]);
    assert!(matches!(
        r,
        Err(Error::OutOfRange {
            offset: 65536,
            len: 512,
            size: 65536
        })
    ));
    // The file shrinks under the image: the ring's read comes back short, then at the end of
    // the file, and the rest reads as zeroes, as the pool's reads do.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut big = vec![0xffu8; 8192];
    run(&aio, Op::Read, 0, vec![seg(&mut big)]).unwrap();
    assert!(big[..4096].iter().all(|&v| v == 0x77));
    assert!(big[4096..].iter().all(|&v| v == 0));
    assert_eq!(
        image.pool(),
        (1, 0, 0),
        "only the out-of-range read hit the pool"
    );
}

/// An image that maps writes onto a descriptor opened read-only: the kernel fails them.
#[derive(Debug)]
struct ReadOnlyFd(std::fs::File, String);

impl DiskImage for ReadOnlyFd {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), Error> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        Err(Error::OutOfRange {
            offset,
            len,
            size: 0,
        })
    }
    fn direct_target(&self) -> Option<DirectTarget> {
        use std::os::fd::AsRawFd;
        Some(DirectTarget {
            fd: self.0.as_raw_fd(),
            aligned: false,
            path: self.1.clone(),
            flush: block::direct::FlushPlan::SyncData,
        })
    }
    fn map_direct(&self, offset: u64, len: u64, _: bool, e: &mut Vec<Extent>) -> Option<DirectPin> {
        // Two extents, so that both submissions fail and the request completes once.
        e.push(Extent {
            host: offset,
            len: len / 2,
        });
        e.push(Extent {
            host: offset + len,
            len: len - len / 2,
        });
        Some(DirectPin::none())
    }
}

#[test]
fn a_failed_submission_fails_its_request_with_the_host_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "ro");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let aio = uring(Arc::new(ReadOnlyFd(f, "ro".to_owned())));
    let mut buf = vec![1u8; 4096];
    let r = run(&aio, Op::Write, 8192, vec![seg(&mut buf)]);
    match r {
        Err(Error::Io {
            op: "write",
            offset,
            source,
            ..
        }) => {
            assert!(offset == 8192 || offset == 8192 + 4096, "{offset}");
            assert_eq!(source.raw_os_error(), Some(libc::EBADF));
        }
        other => panic!("expected a write error, got {other:?}"),
    }
    // The descriptor reads fine: reads on the ring succeed.
    run(&aio, Op::Read, 0, vec![seg(&mut buf)]).unwrap();
}

#[test]
fn wait_idle_drains_both_engines_without_the_submitter() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2(&dir, 65536, "4M", &["write -P 0x11 0 1M"]);
    let image = Counting::new(open_rw_fmt(&p, Format::Qcow2));
    let aio = Arc::new(uring(image.clone()));
    // Cache the L2 table, then mix ring reads with pool writes (allocations past 1 MiB).
    let mut one = vec![0u8; 512];
    run(&aio, Op::Read, 0, vec![seg(&mut one)]).unwrap();
    let mut bufs = vec![vec![0u8; 65536]; 16];
    for (i, b) in bufs.iter_mut().enumerate() {
        let i = i as u64;
        let (op, offset) = if i.is_multiple_of(2) {
            (Op::Read, i * 65536 / 2)
        } else {
            b.fill(0x99);
            (Op::Write, (1 << 20) + i * 65536)
        };
        aio.submit(Request {
            op,
            offset,
            segs: vec![seg(b)],
            token: i,
        })
        .unwrap();
    }
    assert_eq!(aio.in_flight(), 16);
    let waiter = {
        let aio = Arc::clone(&aio);
        std::thread::spawn(move || aio.wait_idle())
    };
    waiter.join().unwrap();
    // Everything ran: the completions wait to be reaped, and the eventfd says so.
    let mut pfd = libc::pollfd {
        fd: aio.completion_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length one for the duration of the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
    let mut tokens = Vec::new();
    aio.reap(|c| {
        c.result.unwrap();
        tokens.push(c.request.token);
    });
    tokens.sort_unstable();
    assert_eq!(tokens, (0..16).collect::<Vec<_>>());
    assert_eq!(aio.in_flight(), 0);
    assert!(bufs.iter().step_by(2).all(|b| b.iter().all(|&v| v == 0x11)));
    drop(aio);
    drop(image);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", &["read -P 0x99 1114112 65536"]);
}

#[test]
fn cache_modes_decide_what_the_ring_takes() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "r.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    // cache=unsafe: flushes are dropped without I/O; writethrough: writes need a flush after
    // them, so the pool runs them; a raw image's own flush is a data sync, on the ring.
    for (policy, writes) in [
        (WritePolicy::IgnoreFlush, 0),
        (WritePolicy::WriteThrough, 1),
    ] {
        let inner = WithPolicy::new(
            open_rw_fmt(&p, Format::Raw),
            policy,
            block::DetectZeroes::Off,
        );
        let image = Counting::new(inner);
        let aio = uring(image.clone());
        let mut w = vec![3u8; 4096];
        run(&aio, Op::Write, 0, vec![seg(&mut w)]).unwrap();
        run(&aio, Op::Flush, 0, Vec::new()).unwrap();
        assert_eq!(image.pool(), (0, writes, 0), "{policy:?}");
    }
    // cache=none (O_DIRECT): aligned buffers go to the ring, unaligned ones to the pool.
    let direct = open(
        &p,
        OpenOptions {
            format: Some(Format::Raw),
            read_only: false,
            cache: block::CacheMode::None,
            ..Default::default()
        },
    )
    .unwrap();
    let image = Counting::new(direct);
    let aio = uring(image.clone());
    let layout = std::alloc::Layout::from_size_align(8192, 4096).unwrap();
    // SAFETY: a non-zero layout; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    // SAFETY: the allocation is 8192 bytes, untouched by anyone else until the completion.
    let aligned = unsafe { IoSeg::new(ptr, 4096) };
    run(&aio, Op::Read, 4096, vec![aligned]).unwrap();
    assert_eq!(image.pool().0, 0);
    // SAFETY: as above, 512 bytes in.
    let unaligned = unsafe { IoSeg::new(ptr.add(512), 4096) };
    run(&aio, Op::Read, 4096, vec![unaligned]).unwrap();
    assert_eq!(image.pool().0, 1);
    // SAFETY: allocated above with this layout, no request in flight.
    unsafe { std::alloc::dealloc(ptr, layout) };
}

/// Random batches of non-overlapping requests in flight at once (as a guest may issue them),
/// on a qcow2 image with small clusters so that requests split into several extents and mix
/// allocation (pool) with in-place I/O (ring); every read is checked against a mirror, and at
/// the end qemu-img reads the mirror back and finds the image clean.
#[test]
fn random_mixed_batches_match_a_mirror_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let cs: u64 = 4096;
    // Half the disk allocated up front, so the ring has work from the start.
    let p = qcow2(&dir, cs, "4M", &["write -P 0x3c 0 2M"]);
    let mut mirror = vec![0u8; 4 << 20];
    mirror[..2 << 20].fill(0x3c);
    let image = Counting::new(open_rw_fmt(&p, Format::Qcow2));
    let aio = uring(image.clone());
    fastrand::seed(0x5eed);
    let mut next = 1u8;
    let (mut reads, mut writes) = (0, 0);
    for _round in 0..300 {
        // Up to 12 disjoint ranges: each round's ranges sit in distinct 256 KiB slots.
        let mut slots: Vec<u64> = (0..16).collect();
        fastrand::shuffle(&mut slots);
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut plan = Vec::new();
        for (token, slot) in (0u64..).zip(slots.iter().take(fastrand::usize(1..=12))) {
            let base = slot * (256 << 10);
            let off = base + fastrand::u64(0..(128 << 10) / 512) * 512;
            let len = fastrand::u64(1..=64) * 512;
            let op = match fastrand::u8(0..10) {
                0..=3 => Op::Read,
                4..=7 => Op::Write,
                8 => Op::WriteZeroes {
                    len,
                    may_unmap: fastrand::bool(),
                },
                _ => Op::Flush,
            };
            let mut buf = vec![0u8; usize::try_from(len).unwrap()];
            reads += usize::from(op == Op::Read);
            writes += usize::from(op == Op::Write);
            if op == Op::Write {
                buf.fill(next);
                next = next.wrapping_add(1).max(1);
            }
            bufs.push(buf);
            plan.push((token, op, off, len));
        }
        for ((token, op, off, _), buf) in plan.iter().zip(bufs.iter_mut()) {
            // Split the buffer in two segments at a random sector.
            let segs = match op {
                Op::Read | Op::Write => {
                    let cut = fastrand::usize(0..=buf.len() / 512) * 512;
                    let (a, b) = buf.split_at_mut(cut);
                    vec![seg(a), seg(b)]
                }
                _ => Vec::new(),
            };
            aio.submit(Request {
                op: *op,
                offset: *off,
                segs,
                token: *token,
            })
            .unwrap();
        }
        let mut done = 0;
        while done < plan.len() {
            for c in reap_some(&aio) {
                c.result.unwrap();
                done += 1;
            }
        }
        for ((_, op, off, len), buf) in plan.iter().zip(&bufs) {
            let r = usize::try_from(*off).unwrap()..usize::try_from(off + len).unwrap();
            match op {
                Op::Read => assert_eq!(&buf[..], &mirror[r.clone()], "read at {off}"),
                Op::Write => mirror[r].copy_from_slice(buf),
                Op::WriteZeroes { .. } => mirror[r].fill(0),
                _ => {}
            }
        }
    }
    // Both engines did a share of the reads and of the writes (the pool makes two calls for
    // each, one per segment).
    let (pool_reads, pool_writes, _) = image.pool();
    let (pool_reads, pool_writes) = (pool_reads / 2, pool_writes / 2);
    assert!(
        0 < pool_reads && pool_reads < reads,
        "{pool_reads} of {reads}"
    );
    assert!(
        0 < pool_writes && pool_writes < writes,
        "{pool_writes} of {writes}"
    );
    drop(aio);
    drop(image);
    assert_check_clean(&p);
    let theirs = read_qemu(&p, "qcow2");
    assert_eq!(theirs.len() as u64, size);
    if let Some(i) = theirs.iter().zip(&mirror).position(|(a, b)| a != b) {
        panic!(
            "qemu-img reads byte {i} differently (cluster {})",
            i as u64 / cs
        );
    }
}

/// Submits `n` 4 KiB requests of `op` on `bufs` (one each), tokens from 0.
fn submit_each(aio: &Aio, op: Op, bufs: &mut [Vec<u8>]) {
    for (i, b) in bufs.iter_mut().enumerate() {
        aio.submit(Request {
            op,
            offset: i as u64 * 4096,
            segs: vec![seg(b)],
            token: i as u64,
        })
        .unwrap();
    }
}

/// Reaps until `n` completions came back, each successful; returns their tokens, sorted.
fn reap_all(aio: &Aio, n: usize) -> Vec<u64> {
    let mut tokens = Vec::new();
    while tokens.len() < n {
        for c in reap_some(aio) {
            c.result.unwrap();
            tokens.push(c.request.token);
        }
    }
    tokens.sort_unstable();
    tokens
}

#[test]
fn a_batch_reaches_the_kernel_in_one_submission() {
    let dir = tempfile::tempdir().unwrap();
    let (p, image, aio) = raw_on_uring(&dir, "b.raw", 16);
    // Unbatched: one submission per request.
    let mut bufs = vec![vec![0x33u8; 4096]; 8];
    submit_each(&aio, Op::Write, &mut bufs);
    assert_eq!(aio.ring_submissions(), 8);
    assert_eq!(reap_all(&aio, 8), (0..8).collect::<Vec<_>>());
    // Writes and a flush in one batch: nothing reaches the kernel until the batch ends, then
    // all of it at once.
    let mut bufs = vec![vec![0x44u8; 4096]; 8];
    let batch = aio.batch(0);
    submit_each(&aio, Op::Write, &mut bufs);
    aio.submit(Request {
        op: Op::Flush,
        offset: 0,
        segs: Vec::new(),
        token: 8,
    })
    .unwrap();
    assert_eq!(aio.ring_submissions(), 8, "held while the batch is open");
    let mut none = 0;
    aio.reap(|_| none += 1);
    assert_eq!(none, 0, "nothing ran before the batch ended");
    drop(batch);
    assert_eq!(aio.ring_submissions(), 9);
    assert_eq!(reap_all(&aio, 9), (0..9).collect::<Vec<_>>());
    // aio-max-batch 3: the kernel is told every third request, and of the rest at the end.
    let mut bufs = vec![vec![0u8; 4096]; 8];
    {
        let _outer = aio.batch(3);
        // A nested batch neither submits nor changes the outer one's size when it ends.
        drop(aio.batch(100));
        submit_each(&aio, Op::Read, &mut bufs);
        assert_eq!(aio.ring_submissions(), 9 + 2);
    }
    assert_eq!(aio.ring_submissions(), 9 + 3);
    assert_eq!(reap_all(&aio, 8), (0..8).collect::<Vec<_>>());
    assert!(bufs.iter().all(|b| b.iter().all(|&v| v == 0x44)));
    assert_eq!(image.pool(), (0, 0, 0), "the pool ran nothing");
    drop(aio);
    drop(image);
    qemu_io(&p, "raw", &["read -P 0x44 0 32K"]);
}

#[test]
fn a_drain_submits_what_an_open_batch_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _image, aio) = raw_on_uring(&dir, "d.raw", 16);
    let aio = Arc::new(aio);
    let mut bufs = vec![vec![0u8; 4096]; 4];
    let batch = aio.batch(0);
    submit_each(&aio, Op::Read, &mut bufs);
    // The batch is still open: the drain must not wait for it to end.
    let waiter = {
        let aio = Arc::clone(&aio);
        std::thread::spawn(move || aio.wait_idle())
    };
    waiter.join().unwrap();
    drop(batch);
    assert_eq!(reap_all(&aio, 4), (0..4).collect::<Vec<_>>());
    assert_eq!(aio.in_flight(), 0);
}

#[test]
fn a_batch_of_aio_max_batch_0_goes_to_the_kernel_32_requests_at_a_time() {
    // aio-max-batch 0 is QEMU's Linux AIO default, 32 a submission: 40 reads in one batch reach
    // the kernel in two submissions, 32 as the 32nd is queued and 8 when the batch ends.
    let dir = tempfile::tempdir().unwrap();
    let (_, image, aio) = raw_on_uring(&dir, "c.raw", 64);
    let mut bufs = vec![vec![0u8; 4096]; 40];
    {
        let _batch = aio.batch(0);
        submit_each(&aio, Op::Read, &mut bufs);
        assert_eq!(aio.ring_submissions(), 1);
    }
    assert_eq!(aio.ring_submissions(), 2);
    assert_eq!(reap_all(&aio, 40), (0..40).collect::<Vec<_>>());
    assert_eq!(image.pool(), (0, 0, 0), "the pool ran nothing");
}
