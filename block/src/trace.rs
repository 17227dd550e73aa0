//! Where a request's time goes inside the engine: a small record per request ([`IoTrace`]) that
//! the engine fills and hands back with the completion, so a device can split its backend time
//! into waiting for a worker, qcow2 metadata work and data I/O, and say which layer of a backing
//! chain served it.
//!
//! The images need no new arguments for it: while a worker runs a request, the image marks its
//! data transfers with `data` and its reads from a backing layer with `backing`, which add
//! to a record kept in the worker's thread (a thread-local cell: no lock, no allocation, two
//! monotonic clock reads per transfer). Whatever the image spends outside `data` is its
//! metadata work: lookups, table loads and write-back, allocation and refcounts, waiting for the
//! metadata lock. Copy-up reads and writes move data, so they count as data.

use std::cell::Cell;
use std::time::Instant;

/// What the engine tells the submitter about one request's run.
#[derive(Debug, Clone, Copy)]
pub struct IoTrace {
    /// When a worker took the request; `None` when the io_uring ring ran it (no worker, and
    /// its mapping was looked up at submission).
    pub started: Option<Instant>,
    /// When the host I/O completed: the worker finished, or the ring's completion was seen.
    pub done: Instant,
    /// Nanoseconds a worker spent moving data to or from the host file.
    pub data_ns: u64,
    /// The deepest layer of the backing chain that the request reached: 0 for the top image
    /// alone, 1 for its backing file, and so on.
    pub depth: u8,
}

impl IoTrace {
    /// A trace for a request that finished at `done` without a worker.
    pub fn unworked(done: Instant) -> Self {
        IoTrace {
            started: None,
            done,
            data_ns: 0,
            depth: 0,
        }
    }
}

/// What the current thread's request has recorded so far.
#[derive(Clone, Copy)]
struct Record {
    data_ns: u64,
    /// Backing layers entered right now, and the most at any time.
    depth: u8,
    max_depth: u8,
    /// Inside a [`data`] call (a nested one is not counted twice).
    in_data: bool,
}

const EMPTY: Record = Record {
    data_ns: 0,
    depth: 0,
    max_depth: 0,
    in_data: false,
};

thread_local! {
    static RECORD: Cell<Record> = const { Cell::new(EMPTY) };
}

/// Starts recording a request in this thread (a worker, before it runs one).
pub(crate) fn begin() {
    RECORD.with(|r| r.set(EMPTY));
}

/// What was recorded since [`begin`]: data nanoseconds and the deepest backing layer.
pub(crate) fn take() -> (u64, u8) {
    RECORD.with(|r| {
        let rec = r.replace(EMPTY);
        (rec.data_ns, rec.max_depth)
    })
}

/// Runs `f`, a transfer of data to or from the host file, and counts its time as data I/O.
pub(crate) fn data<T>(f: impl FnOnce() -> T) -> T {
    let outer = RECORD.with(|r| {
        let mut rec = r.get();
        let outer = rec.in_data;
        rec.in_data = true;
        r.set(rec);
        outer
    });
    if outer {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    RECORD.with(|r| {
        let mut rec = r.get();
        rec.in_data = false;
        rec.data_ns = rec.data_ns.saturating_add(ns);
        r.set(rec);
    });
    out
}

/// Runs `f`, a read from the backing layer one below the image doing it.
pub(crate) fn backing<T>(f: impl FnOnce() -> T) -> T {
    RECORD.with(|r| {
        let mut rec = r.get();
        rec.depth = rec.depth.saturating_add(1);
        rec.max_depth = rec.max_depth.max(rec.depth);
        r.set(rec);
    });
    let out = f();
    RECORD.with(|r| {
        let mut rec = r.get();
        rec.depth = rec.depth.saturating_sub(1);
        r.set(rec);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_time_is_counted_once_and_depth_is_the_deepest_layer() {
        begin();
        let wall = Instant::now();
        // A nested transfer is inside the outer one's time already.
        let v = data(|| {
            data(|| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                7
            })
        });
        let wall = u64::try_from(wall.elapsed().as_nanos()).unwrap_or(u64::MAX);
        assert_eq!(v, 7);
        backing(|| backing(|| ()));
        backing(|| ());
        let (ns, depth) = take();
        assert!((2_000_000..=wall).contains(&ns), "{ns} of {wall}");
        assert_eq!(depth, 2);
        // `take` leaves the record empty for the next request.
        assert_eq!(take(), (0, 0));
    }
}
