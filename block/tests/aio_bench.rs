//! Benchmark of the I/O engines alone (ignored by default; it asserts nothing about speed and
//! prints figures): 4 KiB random reads at queue depth 1 and 32 through `aio=threads` and
//! `aio=io_uring`, on a raw file and on a fully allocated qcow2 (its L2 tables cached after the
//! warm-up), both in the host page cache, buffers in anonymous memory as guest RAM would be.
//!
//! `cargo nextest run -p block --release --run-ignored only --no-capture --test aio_bench`
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use block::aio::{Aio, Engine, IoSeg, Op, Request, Workers};
use block::{open, DiskImage, Format, OpenOptions};
use common::*;

const SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;

/// A small xorshift generator: random blocks without a dependency.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Runs `total` reads keeping `depth` in flight; returns the IOPS.
fn run(aio: &Aio, depth: usize, total: usize, bufs: &mut [u8]) -> f64 {
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut free: Vec<usize> = (0..depth).collect();
    let (mut submitted, mut done) = (0, 0);
    let begin = Instant::now();
    while done < total {
        while submitted < total {
            let Some(slot) = free.pop() else { break };
            let buf = &mut bufs[slot * BLOCK..(slot + 1) * BLOCK];
            // SAFETY: the slot's buffer is not touched again until its completion is reaped.
            let seg = unsafe { IoSeg::new(buf.as_mut_ptr(), BLOCK) };
            let offset = next(&mut seed) % (SIZE / BLOCK as u64) * BLOCK as u64;
            aio.submit(Request {
                op: Op::Read,
                offset,
                segs: vec![seg],
                token: slot as u64,
            })
            .unwrap();
            submitted += 1;
        }
        let mut pfd = libc::pollfd {
            fd: aio.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd array of length one for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert!(ready > 0, "reads stuck");
        done += aio.reap(|c| {
            c.result.unwrap();
            free.push(usize::try_from(c.request.token).unwrap());
        });
    }
    #[allow(clippy::cast_precision_loss)]
    let iops = total as f64 / begin.elapsed().as_secs_f64();
    iops
}

#[test]
#[ignore = "benchmark: run with --run-ignored only --release --no-capture"]
fn bench_random_reads_through_the_engines() {
    let dir = tempfile::tempdir().unwrap();
    let raw = tmp(&dir, "b.raw");
    let qcow2 = tmp(&dir, "b.qcow2");
    let size = SIZE.to_string();
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), &size]);
    create_qcow2(&["-o", "preallocation=full", qcow2.to_str().unwrap(), &size]);
    let mut bufs = vec![0u8; 32 * BLOCK];
    for (path, format) in [(raw, Format::Raw), (qcow2, Format::Qcow2)] {
        let opts = OpenOptions {
            format: Some(format),
            read_only: false,
            ..Default::default()
        };
        let image: Arc<dyn DiskImage> = Arc::new(open(&path, opts).unwrap());
        // Into the page cache (and the L2 tables into the qcow2 cache).
        let mut all = vec![0u8; usize::try_from(SIZE).unwrap()];
        image.read_at(&mut all, 0).unwrap();
        for engine in [Engine::Threads, Engine::IoUring] {
            let aio =
                Aio::with_engine("b", Arc::clone(&image), Workers::default(), 32, engine).unwrap();
            run(&aio, 32, 20_000, &mut bufs); // warm-up
            for depth in [1, 32] {
                let iops = run(&aio, depth, 100_000, &mut bufs);
                println!(
                    "{format:?} aio={}, 4 KiB random read, depth {depth}: {iops:.0} IOPS",
                    engine.name()
                );
            }
        }
    }
}
