//! `vmm blk-top`: a live view of a running vmm's disks, one line per disk per interval, as
//! `iostat -x` gives for one VM: reads and writes per second, and the 50th and 99th percentiles
//! of each stage of a request (`x-stages` of `query-blockstats`, see
//! `devices::virtio::block::stages`) over the interval, from the difference of two samples of
//! the stage histograms, summed over the disk's queues.
//!
//! It is a QMP client of the vmm it watches (`-qmp` of that vmm): it reads one reply per command,
//! skipping the events in between. A percentile is placed inside its histogram bin by linear
//! interpolation; in the last bin, which has no upper edge, it is shown as `>` its lower edge.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::monitor::{parse_qmp_option, QmpAddress};

/// How `vmm blk-top` is used.
pub const USAGE: &str = "\
Usage: vmm blk-top [-i SECS] [-n COUNT] unix:PATH | tcp:HOST:PORT
  a line per disk every SECS seconds (default 1), COUNT times (default: until the VMM quits):
  reads and writes per second and p50/p99 of each request stage, in microseconds";

/// Stages shown, by their QMP names, with their column titles.
const SHOWN: [(&str, &str); 8] = [
    ("total", "total"),
    ("queue-wait", "wait"),
    ("submission", "submit"),
    ("backend", "backend"),
    ("backend-dispatch", "dispatch"),
    ("backend-metadata", "meta"),
    ("backend-data", "data"),
    ("completion", "complete"),
];

/// Errors of `vmm blk-top`.
#[derive(Debug, thiserror::Error)]
pub enum BlkTopError {
    /// A malformed command line.
    #[error("{0}\n{USAGE}")]
    Usage(String),
    /// The address could not be reached.
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    /// Reading from or writing to the monitor failed.
    #[error("lost the monitor connection")]
    Io(#[source] std::io::Error),
    /// The monitor closed the connection (the VMM quit).
    #[error("the monitor closed the connection")]
    Closed,
    /// A reply that is not JSON.
    #[error("the monitor sent something that is not JSON")]
    Json(#[source] serde_json::Error),
    /// The monitor answered a command with an error.
    #[error("{command} failed: {reply}")]
    Refused {
        /// The command.
        command: &'static str,
        /// The error reply.
        reply: String,
    },
}

/// A QMP connection, in command mode.
struct Client {
    reader: Box<dyn BufRead>,
    writer: Box<dyn Write>,
}

impl Client {
    fn connect(address: &str) -> Result<Self, BlkTopError> {
        // The address in `-qmp`'s syntax, which asks for the server side.
        let parsed = parse_qmp_option(&format!("{address},server=on"))
            .map_err(|e| BlkTopError::Usage(format!("bad address {address}: {e}")))?;
        let connect = |e| BlkTopError::Connect(address.to_owned(), e);
        let (reader, writer): (Box<dyn BufRead>, Box<dyn Write>) = match parsed.address {
            QmpAddress::Unix(path) => {
                let s = UnixStream::connect(path).map_err(connect)?;
                let r = s.try_clone().map_err(connect)?;
                (Box::new(BufReader::new(r)), Box::new(s))
            }
            QmpAddress::Tcp { host, port } => {
                let host = if host.is_empty() { "127.0.0.1" } else { &host };
                let s = TcpStream::connect((host, port)).map_err(connect)?;
                let r = s.try_clone().map_err(connect)?;
                (Box::new(BufReader::new(r)), Box::new(s))
            }
        };
        let mut client = Client { reader, writer };
        client.line()?; // The greeting.
        client.execute("qmp_capabilities", json!({}))?;
        Ok(client)
    }

    /// The next message.
    fn line(&mut self) -> Result<Value, BlkTopError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(BlkTopError::Io)? == 0 {
            return Err(BlkTopError::Closed);
        }
        serde_json::from_str(&line).map_err(BlkTopError::Json)
    }

    /// Runs `command` and returns its `return` member, skipping events.
    fn execute(&mut self, command: &'static str, arguments: Value) -> Result<Value, BlkTopError> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(BlkTopError::Io)?;
        loop {
            let mut reply = self.line()?;
            if reply.get("event").is_some() {
                continue;
            }
            return match reply.get_mut("return") {
                Some(ret) => Ok(ret.take()),
                None => Err(BlkTopError::Refused {
                    command,
                    reply: reply.to_string(),
                }),
            };
        }
    }
}

/// One disk's figures at one moment: read and write counts, and per stage the histogram
/// summed over its queues.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    reads: u64,
    writes: u64,
    /// Per shown stage: boundaries and bins.
    stages: Vec<(Vec<u64>, Vec<u64>)>,
}

fn u64_list(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// A disk's sample from its `query-blockstats` entry (with `x-stages`).
fn sample(entry: &Value) -> Sample {
    let stats = &entry["stats"];
    let queues = entry["x-stages"]["queues"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let stages = SHOWN
        .iter()
        .map(|(name, _)| {
            let mut boundaries = Vec::new();
            let mut bins: Vec<u64> = Vec::new();
            for q in &queues {
                let Some(stage) = q["stages"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| s["stage"] == *name))
                else {
                    continue;
                };
                let b = u64_list(&stage["histogram"]["boundaries"]);
                let n = u64_list(&stage["histogram"]["bins"]);
                if bins.is_empty() {
                    (boundaries, bins) = (b, n);
                } else if b == boundaries && n.len() == bins.len() {
                    bins.iter_mut().zip(n).for_each(|(s, x)| *s += x);
                }
            }
            (boundaries, bins)
        })
        .collect();
    Sample {
        reads: stats["rd_operations"].as_u64().unwrap_or(0),
        writes: stats["wr_operations"].as_u64().unwrap_or(0),
        stages,
    }
}

/// The `p` quantile (0..1) of a histogram, in nanoseconds, interpolated in its bin; `None`
/// when it is empty. The second member says it lies in the open last bin (at least the value).
fn quantile(boundaries: &[u64], bins: &[u64], p: f64) -> Option<(f64, bool)> {
    let total: u64 = bins.iter().sum();
    if total == 0 || bins.len() != boundaries.len() + 1 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    let target = p * total as f64;
    let mut below = 0u64;
    for (i, &n) in bins.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        if n > 0 && (below + n) as f64 >= target {
            let lo = if i == 0 { 0 } else { boundaries[i - 1] };
            let Some(&hi) = boundaries.get(i) else {
                #[allow(clippy::cast_precision_loss)]
                return Some((lo as f64, true));
            };
            #[allow(clippy::cast_precision_loss)]
            let within = ((target - below as f64) / n as f64).clamp(0.0, 1.0);
            #[allow(clippy::cast_precision_loss)]
            return Some((lo as f64 + within * (hi - lo) as f64, false));
        }
        below += n;
    }
    None
}

/// Microseconds, short.
fn us(q: Option<(f64, bool)>) -> String {
    match q {
        None => "-".to_owned(),
        Some((ns, open)) => {
            let v = ns / 1000.0;
            let text = if v < 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            };
            if open {
                format!(">{text}")
            } else {
                text
            }
        }
    }
}

/// One disk's line for the interval from `old` to `new`, `secs` long.
fn line(disk: &str, old: &Sample, new: &Sample, secs: f64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let mut out = format!(
        "{disk:<8} r/s {:>7.0} w/s {:>7.0} |",
        rate(old.reads, new.reads),
        rate(old.writes, new.writes)
    );
    for (i, (_, title)) in SHOWN.iter().enumerate() {
        let (b, now) = &new.stages[i];
        let (ob, then) = &old.stages[i];
        // After a change of boundaries the old bins do not subtract: the new ones alone.
        let bins: Vec<u64> = if ob == b && then.len() == now.len() {
            now.iter()
                .zip(then)
                .map(|(n, t)| n.saturating_sub(*t))
                .collect()
        } else {
            now.clone()
        };
        out.push_str(&format!(
            " {title} {}/{}",
            us(quantile(b, &bins, 0.5)),
            us(quantile(b, &bins, 0.99))
        ));
    }
    out
}

/// Runs `vmm blk-top` with `args` (after `blk-top`).
pub fn run(args: impl IntoIterator<Item = String>) -> Result<(), BlkTopError> {
    let mut interval = 1.0f64;
    let mut count = None;
    let mut address = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| BlkTopError::Usage(format!("{flag} needs a value")))
        };
        match arg.as_str() {
            "-i" => {
                interval = value("-i")?
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.1)
                    .ok_or_else(|| BlkTopError::Usage("-i takes seconds, at least 0.1".into()))?;
            }
            "-n" => {
                count = Some(
                    value("-n")?
                        .parse::<u64>()
                        .map_err(|_| BlkTopError::Usage("-n takes a number of lines".into()))?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            a if address.is_none() && !a.starts_with('-') => address = Some(arg),
            _ => return Err(BlkTopError::Usage(format!("unexpected argument {arg}"))),
        }
    }
    let address = address.ok_or_else(|| BlkTopError::Usage("no address".into()))?;
    let mut client = Client::connect(&address)?;
    let query = |c: &mut Client| -> Result<Vec<(String, Sample)>, BlkTopError> {
        let disks = c.execute("query-blockstats", json!({"x-stages": true}))?;
        Ok(disks
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| (d["device"].as_str().unwrap_or("?").to_owned(), sample(d)))
                    .collect()
            })
            .unwrap_or_default())
    };
    println!("per disk: operations per second; per stage: p50/p99 in microseconds");
    let mut last = query(&mut client)?;
    let mut lines = 0;
    while count.is_none_or(|n| lines < n) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let now = query(&mut client)?;
        for (disk, new) in &now {
            let old = last
                .iter()
                .find(|(d, _)| d == disk)
                .map_or_else(Sample::default, |(_, s)| s.clone());
            let old = if old.stages.len() == new.stages.len() {
                old
            } else {
                Sample {
                    stages: vec![(Vec::new(), Vec::new()); new.stages.len()],
                    ..old
                }
            };
            println!("{}", line(disk, &old, new, interval));
        }
        last = now;
        lines += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_in_their_bin() {
        let b = [100, 200, 400];
        // 10 below 100, 10 in [100, 200), none in [200, 400), 5 at or above 400.
        let bins = [10, 10, 0, 5];
        assert_eq!(quantile(&b, &bins, 0.2), Some((50.0, false)));
        assert_eq!(quantile(&b, &bins, 0.6), Some((150.0, false)));
        assert_eq!(quantile(&b, &bins, 0.99), Some((400.0, true)));
        assert_eq!(quantile(&b, &[0, 0, 0, 0], 0.5), None);
        assert_eq!(quantile(&b, &[1, 2], 0.5), None);
        assert_eq!(us(Some((1500.0, false))), "1.5");
        assert_eq!(us(Some((400_000.0, true))), ">400");
    }

    #[test]
    fn a_line_shows_the_interval_not_the_totals() {
        let entry = |reads: u64, bins: [u64; 3]| {
            let stage = |name: &str| json!({"stage": name, "histogram": {"boundaries": [1000, 2000], "bins": bins}});
            let stages: Vec<Value> = SHOWN.iter().map(|(n, _)| stage(n)).collect();
            json!({"device": "d0", "stats": {"rd_operations": reads, "wr_operations": 0},
                   "x-stages": {"queues": [{"queue": 0, "stages": stages.clone()},
                                           {"queue": 1, "stages": stages}]}})
        };
        // Before: 100 requests all below 1 µs (50 per queue); after, 100 more, all in
        // [1 µs, 2 µs): the interval's percentiles lie in that bin alone.
        let old = sample(&entry(100, [50, 0, 0]));
        let new = sample(&entry(200, [50, 50, 0]));
        assert_eq!(new.stages[0].1, vec![100, 100, 0]);
        let text = line("d0", &old, &new, 2.0);
        assert!(
            text.starts_with("d0       r/s      50 w/s       0 |"),
            "{text}"
        );
        assert!(text.contains(" total 1.5/2.0 "), "{text}");
    }

    #[test]
    fn samples_read_what_the_monitor_serializes() {
        use block::trace::IoTrace;
        use devices::virtio::block::stages::{StageStats, Times};
        use std::time::Instant;

        let stats = StageStats::new(2);
        stats
            .set_boundaries(Some(&[1000, 2000]))
            .expect("valid boundaries");
        let base = Instant::now();
        let at = |ns| base + Duration::from_nanos(ns);
        for queue in 0..2 {
            let times = Times {
                woke: at(0),
                taken: at(100),
                submitted: at(200),
                trace: IoTrace::unworked(at(1200)),
                completed: at(1500),
            };
            stats.record(queue, &times);
        }
        let stages = crate::monitor::block_stages(&stats.snapshot());
        let entry = json!({"device": "d0", "stats": {"rd_operations": 2, "wr_operations": 1},
                           "x-stages": serde_json::to_value(&stages).expect("serializes")});
        let s = sample(&entry);
        assert_eq!((s.reads, s.writes), (2, 1));
        // SHOWN's order: total (1500 ns), queue wait (100), ..., backend (1000), ...
        assert_eq!(s.stages[0], (vec![1000, 2000], vec![0, 2, 0]));
        assert_eq!(s.stages[1], (vec![1000, 2000], vec![2, 0, 0]));
        assert_eq!(s.stages[3], (vec![1000, 2000], vec![0, 2, 0]));
    }
}
