"""The block-stream of a stream load (stream-full, stream-10M) as ci/bench-latency ran it beside
fio: what raw/TAG.stream says of one run, and of a configuration over its rounds. Standard
library only, so ci/unit can test it without the benchmark's venv.

raw/TAG.stream (inner.sh) holds, each line after the nested host's uptime in seconds, the bench's
marks `start SPEED` (block-stream sent) and `fio-stop` (fio's end seen on the guest's console,
query-block-jobs then sent) and every line the QMP connection got: the greeting, the replies to
qmp_capabilities, block-stream, query-block-jobs and block-job-cancel, and the job's events. The
job walks the disk from offset 0 (`offset` and `len` are QEMU's progress: a range the top holds
already counts without being copied).
"""

import json
import statistics

MIB = 1 << 20


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
    start = stop = completed = asked = None
    speed = error = jobs = None
    done = (0, 0)
    for line in path.read_text(errors="replace").splitlines():
        stamp, _, rest = line.strip().partition(" ")
        try:
            t = float(stamp)
        except ValueError:
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
        if msg.get("event") == "BLOCK_JOB_COMPLETED":
            data = msg.get("data", {})
            completed, done = t, (data.get("offset", 0), data.get("len", 0))
            error = error or data.get("error")
        elif stop is None and "error" in msg:
            # Before fio's stop only block-stream can fail (the cancel after it may find the
            # job gone).
            error = error or msg["error"].get("desc", "an error")
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
    return {
        "speed": speed, "error": error,
        "running_at_end": job is not None or (completed is not None and not ended_early),
        "ended_s": completed - start if ended_early else None,
        "coverage": ran / window_s if window_s else None,
        "progress": done[0] / done[1] if done[1] else None,
        "mib_per_s": done[0] / MIB / (until - start) if until > start else None,
    }


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


def stream_cell(stream):
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
        if stream["coverage"] is not None:
            cell += f" (the least of fio's window covered: {stream['coverage']:.0%})"
    return cell
