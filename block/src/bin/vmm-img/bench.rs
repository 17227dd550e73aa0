//! `vmm-img bench [-c COUNT] [-d DEPTH] [-f FMT | --image-opts] [-o OFFSET] [-s SIZE] [-S STEP]
//! [-t none|writeback] [-w [--pattern=N] [--flush-interval=N [--no-drain]]] FILE`: qemu-img
//! bench's flags and output. DEPTH requests are in flight at once, each on a thread of its own
//! issuing positional I/O through the `DiskImage` trait, so the figure covers the engine's
//! locking and metadata path.
//!
//! `--flush-interval=N` flushes whenever the number of requests not yet issued is a multiple of
//! N, as qemu-img bench does: by default the requests in flight drain first and no request is
//! issued until the flush returns; with `--no-drain` the flush runs beside the other requests.
//! As in qemu-img bench, the first DEPTH requests go out at once, unchecked, so a multiple
//! passed over by that first burst brings no flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use block::{CacheMode, DiskImage};

use crate::args::{self, Args};
use crate::image_opts::ImageSpec;
use crate::{CliError, CmdResult};

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(
        argv,
        &[
            "c",
            "d",
            "f",
            "o",
            "s",
            "S",
            "t",
            "pattern",
            "flush-interval",
        ],
    )?;
    a.only(&[
        "c",
        "d",
        "f",
        "o",
        "s",
        "S",
        "t",
        "w",
        "q",
        "pattern",
        "flush-interval",
        "no-drain",
        "U",
        "force-share",
        "image-opts",
    ])?;
    let file = &a.positional(1, "one image file")?[0];
    let num = |k: &str, d: u64| a.value(k).map_or(Ok(d), args::size);
    let count = num("c", 75000)?;
    let depth = num("d", 64)?.clamp(1, 1024);
    let start = num("o", 0)?;
    let bufsize = num("s", 4096)?;
    let step = num("S", bufsize)?;
    let pattern = u8::try_from(a.value("pattern").map_or(Ok(0), args::number)?)
        .map_err(|_| CliError::Usage("--pattern must be a byte".into()))?;
    let write = a.has("w");
    let interval = match a.value("flush-interval") {
        None => 0,
        Some(v) => args::number(v)
            .ok()
            .filter(|n| i32::try_from(*n).is_ok())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "invalid flush interval '{v}': must be between 0 and {}",
                    i32::MAX
                ))
            })?,
    };
    if interval > 0 && !write {
        return Err(CliError::Usage(
            "--flush-interval is only available in write tests".into(),
        ));
    }
    if interval > 0 && interval < depth {
        return Err(CliError::Usage(
            "flush interval can't be smaller than depth".into(),
        ));
    }
    let t = a.value("t").unwrap_or("writeback");
    let cache = CacheMode::parse(t)
        .ok_or_else(|| CliError::Usage(format!("unsupported cache mode '{t}'")))?;
    let lock = !(a.has("U") || a.has("force-share"));
    let img = ImageSpec::from_args(&a, file)?.open(!write, cache, lock)?;
    let size = img.size();
    if bufsize == 0 || bufsize > size {
        return Err(CliError::Usage(format!(
            "buffer size {bufsize} does not fit the image"
        )));
    }
    let bs = usize::try_from(bufsize).map_err(|_| CliError::Usage("buffer too large".into()))?;
    if !a.has("q") {
        println!(
            "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {start}, step size {step})",
            if write { "write" } else { "read" }
        );
        if interval > 0 {
            println!("Sending flush every {interval} requests");
        }
    }
    let span = size - bufsize;
    let sched = Schedule::new(count, depth, interval, !a.has("no-drain"));
    let t0 = Instant::now();
    let results: Vec<Result<(), block::Error>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..depth)
            .map(|_| {
                let (img, sched) = (&img, &sched);
                s.spawn(move || {
                    // An aligned buffer, so cache=none needs no bounce copy.
                    let mut v = vec![pattern; bs + 4096];
                    let at = v.as_ptr().align_offset(4096);
                    let buf = &mut v[at..at + bs];
                    while let Some(i) = sched.next(img)? {
                        let off = if span == 0 {
                            0
                        } else {
                            (start + i * step) % span
                        };
                        let r = if write {
                            img.write_at(buf, off)
                        } else {
                            img.read_at(buf, off)
                        };
                        sched.done(img)?;
                        r?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Ok(())))
            .collect()
    });
    for r in results {
        r?;
    }
    let secs = t0.elapsed().as_secs_f64();
    if !a.has("q") {
        println!("Run completed in {secs:.3} seconds.");
    }
    // As with qemu-img bench, the final flush (on close) is not part of the measured run.
    if write {
        img.flush()?;
    }
    Ok(0)
}

/// Hands out request numbers and issues the flushes of `--flush-interval`.
struct Schedule {
    count: u64,
    /// Requests issued before the first flush check (qemu-img bench's first burst).
    burst: u64,
    /// Flush interval; 0 for none (then only `next` is used).
    interval: u64,
    drain: bool,
    next: AtomicU64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    issued: u64,
    in_flight: u64,
    /// The `issued` count at which the last drained flush ran.
    flushed_at: Option<u64>,
    flushing: bool,
}

impl Schedule {
    fn new(count: u64, depth: u64, interval: u64, drain: bool) -> Schedule {
        Schedule {
            count,
            burst: depth.min(count),
            interval,
            drain,
            next: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next request to issue, after the drained flush due before it; `None` when all are
    /// issued.
    fn next(&self, img: &block::Image) -> Result<Option<u64>, block::Error> {
        if self.interval == 0 {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            return Ok((i < self.count).then_some(i));
        }
        let mut st = self.lock();
        loop {
            let unissued = self.count - st.issued;
            let due = self.drain
                && st.issued >= self.burst
                && unissued.is_multiple_of(self.interval)
                && st.flushed_at != Some(st.issued);
            if due {
                if st.in_flight == 0 && !st.flushing {
                    st.flushing = true;
                    drop(st);
                    let r = img.flush();
                    st = self.lock();
                    st.flushing = false;
                    st.flushed_at = Some(st.issued);
                    self.changed.notify_all();
                    r?;
                } else {
                    st = self
                        .changed
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                continue;
            }
            if unissued == 0 {
                return Ok(None);
            }
            st.issued += 1;
            st.in_flight += 1;
            return Ok(Some(st.issued - 1));
        }
    }

    /// A request finished: without draining, flushes when the requests not yet issued are a
    /// multiple of the interval.
    fn done(&self, img: &block::Image) -> Result<(), block::Error> {
        if self.interval == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        st.in_flight -= 1;
        let due = !self.drain
            && st.issued >= self.burst
            && (self.count - st.issued).is_multiple_of(self.interval);
        self.changed.notify_all();
        drop(st);
        if due {
            img.flush()?;
        }
        Ok(())
    }
}
