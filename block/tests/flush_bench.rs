//! Benchmark of a qcow2 reader's latency beside a flushing writer (ignored by default; it asserts
//! nothing about speed and prints figures): one thread reads random 4 KiB blocks of a fully
//! allocated image, whose L2 tables stay cached, at queue depth 1, while another rewrites random
//! 4 KiB blocks (allocating new clusters half of the time, after discards) and flushes after each
//! write, as a guest job with `fsync=1` does. The reader's percentiles show how long a lookup
//! waits for the metadata lock while a flush writes back and syncs.
//!
//! The eviction-heavy variant uses 4 KiB clusters (an L2 table maps 2 MiB) and a 4-table L2
//! cache: the reader's blocks span 24 tables and the writer's 8, so nearly every read loads a
//! table, and the writer flushes only every 16 writes, so the tables evicted are often dirty
//! (written back, with the sync they owe, to make room).
//!
//! The table-growth variant uses 512-byte clusters with 64-bit refcounts (a refcount table
//! cluster covers 2 MiB of file) on a 1 GiB disk: the reader reads the first MiB, the writer
//! fills the rest with 64 KiB writes, flushing every 16, so the refcount table doubles each time
//! the file doubles (9 times up to 1 GiB) while the reader runs.
//!
//! `cargo nextest run -p block --release --run-ignored only --no-capture --test flush_bench`
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use block::qcow2::CacheSizes;
use block::{DiskImage, Format, OpenOptions};
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

#[test]
#[ignore = "benchmark: run with --run-ignored only --release"]
fn reader_latency_beside_a_flushing_writer() {
    reader_latency(65536, None, 1);
}

#[test]
#[ignore = "benchmark: run with --run-ignored only --release"]
fn reader_latency_beside_a_writer_evicting_dirty_tables() {
    reader_latency(4096, Some(4 * 4096), 16);
}

#[test]
#[ignore = "benchmark: run with --run-ignored only --release"]
fn reader_latency_beside_a_writer_growing_the_refcount_table() {
    let (size, chunk, flush_every) = (1u64 << 30, 65536u64, 16);
    let (_dir, img) = image("cluster_size=512,refcount_bits=64", "1G", "1M", None);
    read_beside(&img, 1 << 20, |stop| {
        let (mut writes, mut at) = (0u64, 1u64 << 20);
        while !stop.load(Ordering::Relaxed) && at < size {
            img.write_at(&vec![9; usize::try_from(chunk).unwrap()], at)
                .unwrap();
            at += chunk;
            writes += 1;
            if writes.is_multiple_of(flush_every) {
                img.flush().unwrap();
            }
        }
        let block::Image::Qcow2(q) = &img else {
            unreachable!("created as qcow2")
        };
        let grown = q.header().refcount_table_clusters;
        println!("written {} MiB, refcount table {grown} clusters", at >> 20);
        writes / flush_every
    });
}

/// An image created with `-o opts` and `size` in a new folder, its first `filled` bytes written,
/// opened with an L2 cache of `l2_cache` bytes if given.
fn image(
    opts: &str,
    size: &str,
    filled: &str,
    l2_cache: Option<u64>,
) -> (tempfile::TempDir, block::Image) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = tmp(&dir, "b.qcow2");
    create_qcow2(&["-o", opts, p.to_str().unwrap(), size]);
    qemu_io(&p, "qcow2", &[&format!("write -P 7 0 {filled}")]);
    let img = block::open(
        &p,
        OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            cache_sizes: CacheSizes::new(l2_cache, None, None).unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    (dir, img)
}

/// Runs the benchmark on an image of `cluster`-byte clusters, with an L2 cache of `l2_cache`
/// bytes if given, the writer flushing after every `flush_every` writes.
fn reader_latency(cluster: u64, l2_cache: Option<u64>, flush_every: u64) {
    let opts = format!("cluster_size={cluster}");
    let (_dir, img) = image(&opts, "64M", "64M", l2_cache);
    // The writer's blocks lie in the last quarter; the reader reads the rest.
    read_beside(&img, SIZE / 4 * 3, |stop| {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let mut writes = 0u64;
        let base = SIZE / 4 * 3;
        while !stop.load(Ordering::Relaxed) {
            let at = base + next(&mut seed) % (SIZE / 4 / cluster) * cluster;
            if next(&mut seed).is_multiple_of(2) {
                img.discard(at, cluster).unwrap();
            }
            img.write_at(&[9; BLOCK], at).unwrap();
            writes += 1;
            if writes.is_multiple_of(flush_every) {
                img.flush().unwrap();
            }
        }
        writes / flush_every
    });
}

/// Reads random 4 KiB blocks below `end` at queue depth 1 for 20 s while `writer` runs on
/// another thread (until told to stop; it returns its flush count), then prints the reads'
/// latency percentiles.
fn read_beside(img: &block::Image, end: u64, writer: impl FnOnce(&AtomicBool) -> u64 + Send) {
    let stop = AtomicBool::new(false);
    let (lat, flushes) = std::thread::scope(|s| {
        let stop = &stop;
        let writer = s.spawn(move || writer(stop));
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; BLOCK];
        let mut lat = Vec::new();
        let begin = Instant::now();
        while begin.elapsed() < Duration::from_secs(20) {
            let at = next(&mut seed) % (end / BLOCK as u64) * BLOCK as u64;
            let t = Instant::now();
            img.read_at(&mut buf, at).unwrap();
            lat.push(t.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        (lat, writer.join().unwrap())
    });
    let mut lat = lat;
    lat.sort_unstable();
    // The latency below which `per_mille` thousandths of the reads completed, in microseconds.
    let pct = |per_mille: usize| {
        let i = (lat.len() * per_mille / 1000).min(lat.len() - 1);
        lat[i].as_secs_f64() * 1e6
    };
    println!(
        "reads {} flushes {flushes}: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        lat.len(),
        pct(500),
        pct(990),
        pct(999),
        pct(1000)
    );
}
