//! How much memory the I/O path keeps after a burst of reads: opens an image chain as `vmm`
//! opens a drive (`cache=none`, the default worker pool, a queue of 256), reads it with many
//! requests in flight through that pool, and prints the process's resident memory (less the
//! requests' own buffers) before the burst, when it ends, and once the extra workers have ended.
//!
//! `cargo run --release -p block --example read_memory -- IMAGE [COUNT [IN_FLIGHT [SPAN_MIB]]]`
//! (defaults 4000 requests, 64 in flight, offsets within the first 600 MiB): each request reads
//! 4, 16, 64, 128 or 256 KiB at a pseudo-random 4 KiB-aligned offset, as a booting guest's
//! readahead does. A Debian base image's overlay is the case it was written for.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use block::aio::{Aio, IoSeg, Op, Request, Workers};
use block::{open, CacheMode, DiskImage, OpenOptions};

/// The largest request, and the room each request slot has.
const SLOT: usize = 256 << 10;

/// Sizes the requests take in turn.
const SIZES: [usize; 5] = [4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10];

/// The `Rss:` total of `/proc/self/smaps`, and that of the mapping holding address `own` (KiB).
fn resident(own: usize) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut total, mut mine, mut in_own) = (0, 0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let hex = |s| usize::from_str_radix(s, 16).unwrap_or(0);
            in_own = (hex(start)..hex(end)).contains(&own);
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            total += kib;
            if in_own {
                mine += kib;
            }
        }
    }
    (total, mine)
}

fn report(when: &str, aio: &Aio, own: usize) {
    let (total, mine) = resident(own);
    println!(
        "{when}: {} workers, {total} KiB resident, {} KiB of it not the requests' buffers",
        aio.workers_alive(),
        total - mine
    );
}

/// The `n`th argument as a number, or `default`.
fn arg(n: usize, default: u64) -> Result<u64, String> {
    std::env::args().nth(n).map_or(Ok(default), |s| {
        s.parse().map_err(|e| format!("argument {n}: {e}"))
    })
}

fn main() -> Result<(), String> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: read_memory IMAGE [COUNT [IN_FLIGHT [SPAN_MIB]]]")?;
    let count = arg(2, 4000)?;
    let in_flight = usize::try_from(arg(3, 64)?.clamp(1, 256)).map_err(|e| e.to_string())?;
    let span = arg(4, 600)? << 20;
    let opts = OpenOptions {
        read_only: false,
        cache: CacheMode::None,
        ..OpenOptions::default()
    };
    let image: Arc<dyn DiskImage> =
        Arc::new(open(Path::new(&path), opts).map_err(|e| e.to_string())?);
    let span = span.min(image.size()).max(SLOT as u64);
    let aio = Aio::new("d0", image, Workers::default(), 256).map_err(|e| e.to_string())?;
    // The requests' buffers, one mapping, so that their pages can be told apart.
    let mut slots = vec![0u8; in_flight * SLOT];
    let own = slots.as_ptr() as usize;
    report("opened", &aio, own);
    let mut free: Vec<usize> = (0..in_flight).collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let (mut issued, mut done) = (0, 0);
    while done < count {
        while issued < count {
            let Some(slot) = free.pop() else { break };
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = SIZES[usize::try_from(rng % 5).unwrap_or(0)];
            let offset = (rng >> 8) % (span - SLOT as u64) / 4096 * 4096;
            let buf = &mut slots[slot * SLOT..slot * SLOT + len];
            // SAFETY: the slot is handed to one request at a time and `slots` outlives the
            // pool's use of it (every request is reaped before it is dropped).
            let seg = unsafe { IoSeg::new(buf.as_mut_ptr(), len) };
            let request = Request {
                op: Op::Read,
                offset,
                segs: vec![seg],
                token: slot as u64,
            };
            aio.submit(request)
                .map_err(|_| "the queue refused a request")?;
            issued += 1;
        }
        let mut pfd = libc::pollfd {
            fd: aio.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let mut failed = None;
        done += aio.reap(|c| {
            if let Err(e) = c.result {
                failed = Some(e.to_string());
            }
            free.push(usize::try_from(c.request.token).unwrap_or(0));
        }) as u64;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    report("burst done", &aio, own);
    // The extra workers end after 10 s without work.
    std::thread::sleep(Duration::from_secs(11));
    report("workers idle", &aio, own);
    Ok(())
}
