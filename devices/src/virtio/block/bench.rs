//! Benchmarks of the request path (ignored by default; they assert nothing about speed and print
//! figures): a driver thread places 4 KiB random reads on a queue in guest memory and notifies
//! through the transport (as an ioeventfd would), the device on an iothread parses, submits to
//! the worker pool (`aio=threads`) or the io_uring ring (`aio=io_uring`) over the crate's raw
//! engine (page cache), completes and updates the used ring, which the driver polls. The same
//! with stage timing on and off (`BlockConfig::time_stages`), in interleaved rounds. And the wait
//! of an outside acquire of a busy iothread's context.
//!
//! `cargo nextest run -p devices --release --run-ignored only --no-capture bench::`

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::aio::Engine;
use block::DiskImage;

use super::request_type as t;
use super::test_util::*;
use crate::context::IoThread;

/// A small xorshift generator: random sectors without a dependency.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let last = sorted.len() - 1;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((last as f64) * p).round() as usize;
    sorted[i]
}

/// Runs `total` reads in batches of `depth` (at most 5: three descriptors each in a queue of 16);
/// returns each batch's latency.
fn run(rig: &Rig<block::Image>, depth: u16, total: u32, sectors: u64) -> Vec<Duration> {
    assert!(depth * 3 <= QSIZE);
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut lat = Vec::with_capacity(usize::try_from(total).unwrap());
    let mut used = rig.used_idx(0);
    let mut done = 0;
    while done < total {
        let start = Instant::now();
        for slot in 0..depth {
            let hdr = HDR + u64::from(slot) * 0x20;
            rig.header(hdr, t::IN, (next(&mut seed) % (sectors / 8)) * 8);
            let buf = BUF + u64::from(slot) * 0x1000;
            rig.submit(
                0,
                slot * 3,
                &[
                    (hdr, 16, 0),
                    (buf, 4096, F_WRITE),
                    (STATUS + u64::from(slot), 1, F_WRITE),
                ],
            );
        }
        let target = used.wrapping_add(depth);
        while rig.used_idx(0) != target {
            assert!(start.elapsed() < Duration::from_secs(10), "requests stuck");
            std::hint::spin_loop();
        }
        used = target;
        // At depth 1 this is the request's latency; deeper, the batch's.
        lat.push(start.elapsed());
        done += u32::from(depth);
    }
    lat
}

#[test]
#[ignore = "benchmark: run with --run-ignored only --release --no-capture"]
fn bench_random_reads_through_an_iothread() {
    let dir = tempfile::tempdir().unwrap();
    let (image, size) = filled_image(&dir);
    let io = IoThread::spawn("bench-io").unwrap();
    for engine in [Engine::Threads, Engine::IoUring] {
        let rig = Rig::with_engine(io.context().clone(), Arc::clone(&image), 1, false, engine);
        rig.start(!0);
        run(&rig, 1, 2000, size / 512); // warm-up
        for depth in [1u16, 4] {
            let total = 40_000;
            let begin = Instant::now();
            let mut lat = run(&rig, depth, total, size / 512);
            let secs = begin.elapsed().as_secs_f64();
            lat.sort_unstable();
            println!(
            "aio={}, 4 KiB random read, depth {depth}: {:.0} IOPS; per {}: p50 {:?} p99 {:?} p99.9 {:?}",
            engine.name(),
            f64::from(total) / secs,
            if depth == 1 { "request" } else { "batch" },
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
        );
        }
        rig.dev.shutdown().unwrap();
    }
    io.stop().unwrap();
}

/// A raw image of 256 MiB, every byte written (no hole to read), and its size.
fn filled_image(dir: &tempfile::TempDir) -> (Arc<block::Image>, u64) {
    let size = 256 << 20;
    let image = raw_image(dir, size);
    image
        .write_at(&vec![0x5a; usize::try_from(size).unwrap()], 0)
        .unwrap();
    (image, size)
}

/// The median of `values`.
fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
#[ignore = "benchmark: run with --run-ignored only --release --no-capture"]
fn bench_stage_timing_on_over_off() {
    let dir = tempfile::tempdir().unwrap();
    let (image, size) = filled_image(&dir);
    let io = IoThread::spawn("bench-stages").unwrap();
    let rounds = 31;
    for engine in [Engine::Threads, Engine::IoUring] {
        let rig = |time_stages| {
            let config = super::BlockConfig {
                id: "d0".into(),
                queue_size: QSIZE,
                io_workers: block::aio::Workers::fixed(2),
                aio: engine,
                time_stages,
                ..super::BlockConfig::default()
            };
            let rig = Rig::with_config(io.context().clone(), Arc::clone(&image), config);
            rig.start(!0);
            run(&rig, 1, 2000, size / 512); // warm-up
            rig
        };
        let (on, off) = (rig(true), rig(false));
        for depth in [1u16, 4] {
            let total = 4000;
            let mut ratios = Vec::new();
            let (mut iops_on, mut iops_off) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                // Alternate which goes first, so drift favours neither.
                let order = if round % 2 == 0 {
                    [&on, &off]
                } else {
                    [&off, &on]
                };
                let mut iops = [0.0; 2];
                for (slot, rig) in order.iter().enumerate() {
                    let begin = Instant::now();
                    run(rig, depth, total, size / 512);
                    iops[slot] = f64::from(total) / begin.elapsed().as_secs_f64();
                }
                let (a, b) = if round % 2 == 0 {
                    (iops[0], iops[1])
                } else {
                    (iops[1], iops[0])
                };
                iops_on.push(a);
                iops_off.push(b);
                ratios.push(a / b);
            }
            println!(
                "aio={}, 4 KiB random read, depth {depth}, {rounds} interleaved rounds of {total}: \
                 stage timing on {:.0} IOPS, off {:.0} IOPS (medians); on/off per round: median \
                 {:.3}, min {:.3}, max {:.3}",
                engine.name(),
                median(&mut iops_on),
                median(&mut iops_off),
                median(&mut ratios),
                ratios[0],
                ratios[ratios.len() - 1],
            );
        }
        let q = &on.dev.stages().snapshot()[0];
        for cell in &q.stages {
            println!(
                "  {:<17} mean {:>7} ns, max {:>9} ns",
                cell.stage.name(),
                cell.sum_ns / cell.count.max(1),
                cell.max_ns
            );
        }
        // What timing adds to each request on the device's thread, apart from the load: its
        // clock reads and its record, the fastest of many repetitions (preemption only slows).
        let times = super::stages::Times {
            woke: Instant::now(),
            taken: Instant::now(),
            submitted: Instant::now(),
            trace: block::trace::IoTrace::unworked(Instant::now()),
            completed: Instant::now(),
        };
        let reps = 5000u32;
        let best = (0..400)
            .map(|_| {
                let begin = Instant::now();
                for _ in 0..reps {
                    let mut t = times;
                    t.woke = Instant::now();
                    t.submitted = Instant::now();
                    t.completed = Instant::now();
                    on.dev.stages().record(0, std::hint::black_box(&t));
                }
                begin.elapsed()
            })
            .min()
            .unwrap();
        let clock = (0..400)
            .map(|_| {
                let begin = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(Instant::now());
                }
                begin.elapsed()
            })
            .min()
            .unwrap();
        let ns = |d: Duration| d.as_secs_f64() * 1e9 / f64::from(reps);
        println!(
            "  added work per request (3 clock reads and the record): {:.0} ns, of which one \
             clock read {:.0} ns (fastest of 400 runs of {reps})",
            ns(best),
            ns(clock)
        );
        on.dev.shutdown().unwrap();
        off.dev.shutdown().unwrap();
    }
    io.stop().unwrap();
}

#[test]
#[ignore = "benchmark: run with --run-ignored only --release --no-capture"]
fn bench_acquire_while_the_iothread_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 << 20;
    let io = IoThread::spawn("bench-busy").unwrap();
    let rig = Arc::new(Rig::new(
        io.context().clone(),
        raw_image(&dir, size),
        1,
        false,
    ));
    rig.start(!0);
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (rig, stop) = (Arc::clone(&rig), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                run(&rig, 4, 64, size / 512);
            }
        })
    };
    let mut waits = Vec::new();
    for _ in 0..5000 {
        let start = Instant::now();
        let guard = io.context().acquire();
        waits.push(start.elapsed());
        drop(guard);
        std::thread::sleep(Duration::from_micros(100));
    }
    stop.store(true, Ordering::Relaxed);
    driver.join().unwrap();
    waits.sort_unstable();
    println!(
        "acquire of a busy iothread's context: p50 {:?} p99 {:?} max {:?}",
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
        waits[waits.len() - 1],
    );
    rig.dev.shutdown().unwrap();
}
