"""The block-stream of a stream load (stream-full, stream-10M) as ci/bench-latency ran it beside
fio: what raw/TAG.stream says of one run, and of a configuration over its rounds. Standard
library only, so ci/unit can test it without the benchmark's venv.

raw/TAG.stream (inner.sh) holds, each line after the nested host's uptime in seconds, the bench's
marks `clock EPOCH` (this host's wall clock, seconds, beside that uptime), `start SPEED`
(block-stream sent) and `fio-stop` (fio's end seen on the guest's console, query-block-jobs then
sent) and every line the QMP connection got: the greeting, the replies to
qmp_capabilities, block-stream, query-blockstats (its idle_time_ns: how long ago the disk's last
request completed, which checks the guest's clock), query-block-jobs and block-job-cancel, and
the job's events. The
job walks the disk from offset 0 (`offset` and `len` are QEMU's progress: a range the top holds
already counts without being copied).

raw/TAG.lat holds fio's completion latency log (--write_lat_log, --log_avg_msec=0,
--log_unix_epoch=1): one line per completion of fio's measured window (its ramp is not logged),
"EPOCH_MS LAT_NS" on the guest's wall clock, which kvmclock keeps to the host's. The guest's cost
of a stream is taken from the completions of the stream's run only: from block-stream's reply to
BLOCK_JOB_COMPLETED (or to query-block-jobs' reply after fio's stop when the job still ran).
"""

import json
import math
import statistics

MIB = 1 << 20
# Fewer completions than this in a window leave its p99 without one beyond it: no figures.
MIN_WINDOW_IOS = 100
# The guest's clock (fio's log) may differ from the host's by this much at most: fio's last
# completion on the guest's clock against the disk's last one on the host's (query-blockstats'
# idle_time_ns after fio's stop; its reply read here up to some tenths of a second late on a
# loaded nested host, which makes the offset seem negative).
CLOCK_TOLERANCE_S = 0.5


def stream_record(path, window_s):
    """What a run's stream did, from its raw/TAG.stream, fio's measured window being the
    `window_s` seconds before the fio-stop mark: {"speed" (bytes/s, 0 unlimited), "error" (why
    there was no stream, or why it failed; None), "running_at_end" (query-block-jobs after fio's
    stop lists the job, or it completed after the mark), "ended_s" (seconds from its start to
    BLOCK_JOB_COMPLETED when that came before fio's stop, else None), "coverage" (the share of
    the window it ran), "progress" (offset over len when fio stopped, or when it ended),
    "mib_per_s" (the disk walked per second)}."""
    if not path.exists():
        return {"error": f"no {path.name}"}
    start = stop = completed = asked = replied = clock = last_io = None
    speed = error = jobs = None
    returns = 0
    done = (0, 0)
    for line in path.read_text(errors="replace").splitlines():
        stamp, _, rest = line.strip().partition(" ")
        try:
            t = float(stamp)
        except ValueError:
            continue
        if rest.startswith("clock "):
            clock = float(rest.split()[1]) - t
            continue
        if rest.startswith("start "):
            start, speed = t, int(rest.split()[1])
            continue
        if rest == "fio-stop":
            stop = t
            continue
        try:
            msg = json.loads(rest)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("return"), dict):
            # qmp_capabilities' reply, then block-stream's.
            returns += 1
            if returns == 2:
                replied = t
        if msg.get("event") == "BLOCK_JOB_COMPLETED":
            data = msg.get("data", {})
            completed, done = t, (data.get("offset", 0), data.get("len", 0))
            error = error or data.get("error")
        elif stop is None and "error" in msg:
            # Before fio's stop only block-stream can fail (the cancel after it may find the
            # job gone).
            error = error or msg["error"].get("desc", "an error")
        elif (stop is not None and last_io is None and msg.get("return")
              and isinstance(msg["return"], list) and "stats" in msg["return"][0]):
            idle = msg["return"][0]["stats"].get("idle_time_ns")
            last_io = None if idle is None else t - idle / 1e9
        elif stop is not None and jobs is None and isinstance(msg.get("return"), list):
            jobs, asked = msg["return"], t
    if start is None or stop is None:
        return {"speed": speed, "error": error or f"{path.name}: no start or no fio-stop mark"}
    if jobs is None and completed is None:
        return {"speed": speed, "error": error or "no query-block-jobs reply after fio's stop"}
    job = next((j for j in jobs or [] if j.get("device") == "stream0"
                and j.get("status") not in ("concluded", "null")), None)
    ended_early = completed is not None and completed < stop
    if job is not None:
        done, until = (job.get("offset", 0), job.get("len", 0)), asked
    else:
        until = completed if completed is not None else asked
    end = completed if ended_early else stop
    window = (stop - window_s, stop)
    ran = max(0.0, min(end, window[1]) - max(start, window[0]))
    # The job's run on this host's wall clock (None without a clock mark or a reply).
    epoch = (lambda t: None if clock is None or t is None else t + clock)  # noqa: E731
    running_until = completed if completed is not None else asked if job is not None else None
    return {
        "running_s": (epoch(replied), epoch(running_until)), "fio_stop_s": epoch(stop),
        "last_io_s": epoch(last_io),
        "speed": speed, "error": error,
        "running_at_end": job is not None or (completed is not None and not ended_early),
        "ended_s": completed - start if ended_early else None,
        "coverage": ran / window_s if window_s else None,
        "progress": done[0] / done[1] if done[1] else None,
        "mib_per_s": done[0] / MIB / (until - start) if until > start else None,
    }


def read_clat_log(path):
    """raw/TAG.lat: [(epoch ms, completion latency ns)] in time order; [] without it."""
    if not path.exists():
        return []
    ios = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.replace(",", " ").split()
        try:
            ios.append((int(parts[0]), int(parts[1])))
        except (ValueError, IndexError):
            continue
    return sorted(ios)


def nearest_rank(values, p):
    """The p-th percentile of sorted values, nearest rank (a completion's own latency)."""
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def window_figures(ios, start_s=None, end_s=None):
    """fio's completions from start_s to end_s (epoch seconds; None: fio's first or last
    completion), within fio's logged window: {"ios" (how many), "span_s", and with at least
    MIN_WINDOW_IOS "iops", "p50", "p99" (µs), else "error"}."""
    if not ios:
        return {"ios": 0, "span_s": 0.0, "error": "no completion logged"}
    lo, hi = ios[0][0], ios[-1][0]
    if start_s is not None:
        lo = max(lo, math.ceil(start_s * 1000))
    if end_s is not None:
        hi = min(hi, math.floor(end_s * 1000))
    lats = sorted(lat for t, lat in ios if lo <= t <= hi)
    out = {"ios": len(lats), "span_s": max(0, hi - lo) / 1000}
    if len(lats) < MIN_WINDOW_IOS or hi <= lo:
        out["error"] = f"{len(lats)} completions in the window (fewer than {MIN_WINDOW_IOS})"
        return out
    out.update(iops=len(lats) / out["span_s"], p50=nearest_rank(lats, 50) / 1000,
               p99=nearest_rank(lats, 99) / 1000)
    return out


def stream_window(record, ios):
    """window_figures of the completions while the stream ran (record: stream_record's), with
    "clock_gap_s": fio's stop seen here after its last completion (never negative on clocks
    alike), and "clock_offset_s": the guest's clock ahead of the host's, fio's last completion
    against the disk's (an "error" beyond CLOCK_TOLERANCE_S; None in a record without
    query-blockstats, whose clocks are unchecked), by which the stream's run is shrunk at both
    ends."""
    if record.get("error"):
        return {"ios": 0, "span_s": 0.0, "error": record["error"]}
    (start, end), stop = record.get("running_s", (None, None)), record.get("fio_stop_s")
    if not ios:
        return {"ios": 0, "span_s": 0.0, "error": "no completion logged"}
    if start is None or end is None or stop is None:
        return {"ios": 0, "span_s": 0.0, "error": "no clock mark, block-stream reply or job's "
                                                  "end in the stream's record"}
    gap = stop - ios[-1][0] / 1000
    offset = None if record.get("last_io_s") is None else ios[-1][0] / 1000 - record["last_io_s"]
    clocks = {"clock_gap_s": gap, "clock_offset_s": offset}
    if gap < 0 or (offset is not None and abs(offset) > CLOCK_TOLERANCE_S):
        return {"ios": 0, "span_s": 0.0, **clocks,
                "error": f"the guest's clock is not the host's (fio's stop seen {gap:+.2f} s "
                         "after its last completion"
                         + ("" if offset is None else f", its last completion {offset:+.2f} s "
                                                       "from the disk's") + ")"}
    # The stream's run shrunk by the clocks' measured offset at both ends: the completions
    # counted fall in it whichever clock was off. A job still running at query-block-jobs'
    # reply ran through fio's window.
    margin = abs(offset or 0.0)
    return {**window_figures(ios, start + margin, end - margin), **clocks}


def combine_windows(windows):
    """A configuration's windows over its rounds: the medians of "iops", "p50" and "p99" over
    the rounds that have them, "ios" (the count of each round) and "errors"."""
    ok = [w for w in windows if not w.get("error")]
    out = {k: statistics.median(w[k] for w in ok) if ok else None for k in ("iops", "p50", "p99")}
    offsets = [w.get("clock_offset_s") for w in windows if "clock_gap_s" in w]
    return {**out, "ios": [w["ios"] for w in windows], "clock_offsets_s": offsets,
            "errors": [w["error"] for w in windows if w.get("error")]}


def window_cell(window):
    """The completions counted in a configuration's windows: '412/380/395 I/Os', with why a
    round has no figures."""
    if window is None:
        return "—"
    cell = "/".join(str(n) for n in window["ios"]) + " I/Os"
    offsets = [o for o in window.get("clock_offsets_s", []) if o is not None]
    if offsets:
        cell += (f", clocks within {max(abs(o) for o in offsets) * 1000:.0f} ms in "
                 f"{len(offsets)}/{len(window['clock_offsets_s'])}")
    elif window.get("clock_offsets_s"):
        cell += ", clocks unchecked"
    if window["errors"]:
        cell += f"; no figures in {len(window['errors'])}: {window['errors'][0]}"
    return cell


def combine_streams(records):
    """A configuration's stream over its rounds: {"rounds", "running_at_end" (in how many),
    "ended_s" (the durations of those that ended before fio's stop), "coverage" (the least),
    "progress" and "mib_per_s" (medians), "speed", "errors" (one per round that had no stream)}."""
    ok = [r for r in records if not r.get("error")]

    def median(key):
        values = [r[key] for r in ok if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "rounds": len(records),
        "speed": next((r["speed"] for r in records if r.get("speed") is not None), None),
        "running_at_end": sum(1 for r in ok if r["running_at_end"]),
        "ended_s": [r["ended_s"] for r in ok if r["ended_s"] is not None],
        "coverage": min((r["coverage"] for r in ok if r["coverage"] is not None), default=None),
        "progress": median("progress"),
        "mib_per_s": median("mib_per_s"),
        "errors": [r["error"] for r in records if r.get("error")],
    }


def stream_cell(stream, logged=False):
    """A stream's summary in a table cell: 'running at fio's end 5/5, 48% walked, 20 MiB/s', or
    where some ended early, their durations and the least share of fio's window covered."""
    if stream is None:
        return "—"
    if stream["errors"]:
        return f"no stream in {len(stream['errors'])}/{stream['rounds']}: {stream['errors'][0]}"
    cell = f"running at fio's end {stream['running_at_end']}/{stream['rounds']}"
    if stream["progress"] is not None:
        cell += f", {stream['progress']:.0%} walked"
    if stream["mib_per_s"] is not None:
        cell += f", {stream['mib_per_s']:.0f} MiB/s"
    if stream["ended_s"]:
        cell += "; ended after " + ", ".join(f"{s:.1f}" for s in stream["ended_s"]) + " s"
        # The share of fio's window covered, from fio's stop as seen here (seconds late on a
        # loaded nested host): only where no completion log says it.
        if stream["coverage"] is not None and not logged:
            cell += f" (the least of fio's window covered: {stream['coverage']:.0%})"
    return cell
