//! Request buffers the way a guest may hand them over: two requests in flight whose buffers
//! overlap, a request whose segments overlap each other, unaligned buffers on `O_DIRECT` files,
//! and a buffer that another thread rewrites while it is being written out. Both engines, on raw
//! images (page cache and `O_DIRECT`), a preallocated qcow2 (in-place data) and a qcow2 overlay
//! (backing reads, copy-on-write). Nothing crashes, every request succeeds, every byte a read
//! left is the byte of one of the disk ranges read into it, and every byte written is a value
//! its buffer held.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::aio::{Aio, Engine, IoSeg, Op, Request, Workers};
use block::{open, CacheMode, DiskImage, Format, OpenOptions};
use common::*;

/// Bytes of the disk that hold the pattern.
const SPAN: usize = 256 << 10;

/// The byte the prepared disks hold at `offset`.
fn pattern(offset: usize) -> u8 {
    // A byte varying with the offset and the sector.
    ((offset / 512).wrapping_mul(31) ^ offset).to_le_bytes()[0]
}

/// Anonymous memory standing in for guest memory: page aligned, and only ever accessed through
/// raw pointers, like guest RAM that vCPUs write concurrently.
struct GuestMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory, owned by this value, accessed only through raw pointers.
unsafe impl Send for GuestMem {}
// SAFETY: as above; concurrent raw accesses are what the test is about.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    fn new(len: usize) -> GuestMem {
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestMem {
            ptr: ptr.cast(),
            len,
        }
    }

    /// A segment of `len` bytes at `at`.
    fn seg(&self, at: usize, len: usize) -> IoSeg {
        assert!(at + len <= self.len);
        // SAFETY: in bounds of the mapping, which outlives every request of the test (each test
        // reaps its requests before the memory is dropped).
        unsafe { IoSeg::new(self.ptr.add(at), len) }
    }

    /// Sets `len` bytes at `at` to `value`.
    fn fill(&self, at: usize, len: usize, value: u8) {
        assert!(at + len <= self.len);
        // SAFETY: in bounds of the mapping; a raw write, as a vCPU's.
        unsafe { std::ptr::write_bytes(self.ptr.add(at), value, len) }
    }

    /// A copy of `len` bytes at `at`.
    fn read(&self, at: usize, len: usize) -> Vec<u8> {
        assert!(at + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of the mapping; `out` is ours and does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), len) };
        out
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The images the tests run on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Raw,
    RawDirect,
    Qcow2Preallocated,
    Qcow2Overlay,
}

const KINDS: [Kind; 4] = [
    Kind::Raw,
    Kind::RawDirect,
    Kind::Qcow2Preallocated,
    Kind::Qcow2Overlay,
];

fn open_rw(path: &Path, format: Format, cache: CacheMode) -> block::Image {
    open(
        path,
        OpenOptions {
            format: Some(format),
            read_only: false,
            cache,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Writes the pattern over the first `SPAN` bytes of an image.
fn write_pattern(image: &dyn DiskImage) {
    let data: Vec<u8> = (0..SPAN).map(pattern).collect();
    image.write_at(&data, 0).unwrap();
}

/// A 1 MiB image of `kind` holding the pattern, its path and format.
fn prepare(dir: &tempfile::TempDir, kind: Kind) -> (Arc<block::Image>, PathBuf, Format) {
    let raw = tmp(dir, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "1M"]);
    let (path, format, cache) = match kind {
        Kind::Raw => (raw, Format::Raw, CacheMode::Writeback),
        Kind::RawDirect => (raw, Format::Raw, CacheMode::None),
        Kind::Qcow2Preallocated => {
            let q = tmp(dir, "disk.qcow2");
            create_qcow2(&["-o", "preallocation=metadata", q.to_str().unwrap(), "1M"]);
            (q, Format::Qcow2, CacheMode::Writeback)
        }
        Kind::Qcow2Overlay => {
            // The pattern lives in the backing file: reads go through the image's methods and
            // writes copy on write.
            write_pattern(&open_rw(&raw, Format::Raw, CacheMode::Writeback));
            let q = tmp(dir, "top.qcow2");
            create_qcow2(&["-b", "disk.raw", "-F", "raw", q.to_str().unwrap(), "1M"]);
            (q, Format::Qcow2, CacheMode::Writeback)
        }
    };
    let image = open_rw(&path, format, cache);
    if !matches!(kind, Kind::Qcow2Overlay) {
        write_pattern(&image);
    }
    (Arc::new(image), path, format)
}

/// Every image kind with every engine.
fn each_setup(mut f: impl FnMut(&str, &Aio)) {
    for kind in KINDS {
        for engine in [Engine::Threads, Engine::IoUring] {
            let dir = tempfile::tempdir().unwrap();
            let (image, path, format) = prepare(&dir, kind);
            let aio = Aio::with_engine("t", image, Workers::fixed(4), 16, engine).unwrap();
            f(&format!("{kind:?} with {}", engine.name()), &aio);
            drop(aio);
            if format == Format::Qcow2 {
                assert_check_clean(&path);
            }
        }
    }
}

/// A request: the disk offset and the (memory offset, length) of each segment.
struct Planned {
    disk: usize,
    segs: Vec<(usize, usize)>,
}

/// Submits every planned request at once and reaps them all; each must succeed.
fn run_all(aio: &Aio, mem: &GuestMem, op: Op, plan: &[Planned], what: &str) {
    for (token, p) in (0u64..).zip(plan) {
        aio.submit(Request {
            op,
            offset: p.disk as u64,
            segs: p.segs.iter().map(|&(at, len)| mem.seg(at, len)).collect(),
            token,
        })
        .unwrap();
    }
    let mut left = plan.len();
    while left > 0 {
        let mut pfd = libc::pollfd {
            fd: aio.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd array of length one for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert!(n > 0, "{what}: no completion within 10 s");
        left -= aio.reap(|c| {
            c.result
                .unwrap_or_else(|e| panic!("{what}: request {}: {e}", c.request.token))
        });
    }
}

#[test]
fn reads_into_overlapping_buffers_leave_bytes_of_the_ranges_read() {
    const ROUNDS: usize = 20;
    let plan = [
        // Three segments, page aligned.
        Planned {
            disk: 0,
            segs: vec![(0, 4096), (4096, 32768), (36864, 28672)],
        },
        // Overlaps the upper half of the first.
        Planned {
            disk: 128 << 10,
            segs: vec![(32768, 65536)],
        },
        // Two segments over the same page, inside both requests above.
        Planned {
            disk: 64 << 10,
            segs: vec![(61440, 4096), (61440, 4096)],
        },
        // Unaligned memory (bounced on O_DIRECT), over the end of the second request.
        Planned {
            disk: (192 << 10) + 512,
            segs: vec![(95 * 1024 + 100, 5000)],
        },
    ];
    // Which bytes each memory position may end up with.
    let mut allowed: Vec<Vec<u8>> = vec![Vec::new(); 128 << 10];
    for p in &plan {
        let mut disk = p.disk;
        for &(at, len) in &p.segs {
            for i in 0..len {
                allowed[at + i].push(pattern(disk + i));
            }
            disk += len;
        }
    }
    each_setup(|what, aio| {
        let mem = GuestMem::new(128 << 10);
        for round in 0..ROUNDS {
            // A sentinel that changes from round to round.
            mem.fill(0, 128 << 10, 0xe0 ^ round.to_le_bytes()[0]);
            run_all(aio, &mem, Op::Read, &plan, what);
            let got = mem.read(0, 128 << 10);
            for (pos, (byte, ok)) in got.iter().zip(&allowed).enumerate() {
                assert!(
                    ok.is_empty() || ok.contains(byte),
                    "{what}, round {round}: byte {pos} is {byte:#x}, not one of {ok:x?}"
                );
            }
        }
    });
}

#[test]
fn writes_from_buffers_being_rewritten_store_values_the_buffers_held() {
    const ROUNDS: usize = 20;
    const VALUES: [u8; 2] = [0xaa, 0x55];
    let plan = [
        Planned {
            disk: 0,
            segs: vec![(0, 65536)],
        },
        // The same memory and the same disk range in part.
        Planned {
            disk: 32 << 10,
            segs: vec![(16384, 65536)],
        },
        // One page twice.
        Planned {
            disk: 128 << 10,
            segs: vec![(0, 4096), (0, 4096)],
        },
        // Unaligned memory.
        Planned {
            disk: 140 << 10,
            segs: vec![(100, 4096)],
        },
    ];
    let written = [
        (0, 96 << 10),
        (128 << 10, 136 << 10),
        (140 << 10, 144 << 10),
    ];
    each_setup(|what, aio| {
        let mem = Arc::new(GuestMem::new(96 << 10));
        mem.fill(0, 96 << 10, VALUES[0]);
        let stop = Arc::new(AtomicBool::new(false));
        // A vCPU rewriting the buffers while they are written out.
        let vcpu = {
            let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
            std::thread::spawn(move || {
                for value in VALUES.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    mem.fill(0, 96 << 10, *value);
                }
            })
        };
        for _ in 0..ROUNDS {
            run_all(aio, &mem, Op::Write, &plan, what);
        }
        stop.store(true, Ordering::Relaxed);
        vcpu.join().unwrap();
        // Read back through the image itself (a qcow2 may hold dirty tables in its cache).
        let mut back = vec![0u8; SPAN];
        aio.image().read_at(&mut back, 0).unwrap();
        for (pos, byte) in back.iter().enumerate() {
            if written.iter().any(|&(a, b)| (a..b).contains(&pos)) {
                assert!(
                    VALUES.contains(byte),
                    "{what}: byte {pos} is {byte:#x}, never in its buffer"
                );
            } else {
                assert_eq!(*byte, pattern(pos), "{what}: byte {pos} was not written");
            }
        }
    });
}
