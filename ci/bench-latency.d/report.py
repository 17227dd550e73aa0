"""The report of ci/bench-latency: reads a results folder (raw/TAG.json, fio's JSON per run, TAG being
VMM.PLACEMENT.IMAGE.RW.qdN.LOAD, VMM vmm, vmm-NAME (a variant: vmm with the arguments machine.txt
names as vmm_variant.vmm-NAME, or the vmm executable at PATH where they read `binary PATH`) or
qemu, PLACEMENT main-loop or iothread, then +pci for a virtio-blk-pci disk (else virtio-mmio),
+per-queue for one iothread per queue (iothread+pci only), +nopoll for iothreads with
poll-max-ns=0 and +aio-ENGINE for the drive's aio=ENGINE (threads, io_uring or native; without
it each VMM's best engine, machine.txt's aio_best.VMM), with .rN for round N when there are
several; raw/TAG.polls; raw/TAG.sched; raw/TAG.stages; raw/TAG.irq; raw/TAG.stream; raw/TAG.gt;
raw/host.PLACEMENT.IMAGE.RW.qdN.native.json, the host-native baseline; machine.txt, host.txt,
version-*.json) and writes summary.json (one object per configuration, the fields issue 6 names,
each figure the median over the rounds, plus `runs`, `completions` (the fewest of a round),
`transport`, `mapping`, `poll`, `aio`, `lat_us.max`, `cpu_us_per_io`, `irq_per_io`, vmm's
`stages_us`, with --guest-trace `guest_block_us`, and the baseline under `host_native`),
summary.md (the host, both VMMs' versions and drive options, the table, each VMM's percentiles
as host-native + overhead with the samples behind the tail ones and its CPU per I/O, where vmm's
requests spent their time by stage, the guest's interrupts per I/O by kind, with --guest-trace
where fio's latency went in the guest, each VMM's aio engines side by side, PCI over MMIO, one
iothread per queue over one and polling off over on per VMM, vmm over QEMU with an A/B verdict
per row on IOPS and p99 from the per-round figures (abtest.py), the rows listed by verdict, vmm
over each variant with the same verdicts (in summary.json the vmm row's `vs_qemu` and
`vs_vmm-NAME`), iothread over main loop under load, where the VMMs' threads spent
the disturbed runs, what a block-stream costs the guest: each VMM's figures under a stream load
over quiet's, side by side, the stream's progress, and an A/B verdict on vmm's ratios over
QEMU's (in summary.json each stream row's `stream`, `vs_quiet`, and the vmm row's
`stream_cost_vs_qemu`) and latency-cdf.png (the completion-latency percentile curves of vmm and QEMU
per configuration, each point the median over the rounds). Exits 1 when a configuration has no
usable fio result.

usage: report.py RESULTS_DIR
"""

import json
import math
import pathlib
import statistics
import sys

from abtest import ALPHA, MIN_CHANGE, verdict
from streamcost import (MIN_WINDOW_IOS, combine_streams, combine_windows, read_clat_log,
                        stream_cell, stream_record, stream_window, window_cell, window_figures)

# fio's default percentile list (fio(1), "percentile_list"): the points of the curves.
PCTS = ["1.000000", "5.000000", "10.000000", "20.000000", "30.000000", "40.000000",
        "50.000000", "60.000000", "70.000000", "80.000000", "90.000000", "95.000000",
        "99.000000", "99.500000", "99.900000", "99.950000", "99.990000"]
# The summary's percentiles: name -> fio key.
SUMMARY_PCTS = {"p50": "50.000000", "p90": "90.000000", "p99": "99.000000",
                "p99.9": "99.900000", "p99.99": "99.990000"}
# p99.99 is reported only from runs with at least this many completions (issue 6).
P9999_MIN_IOS = 100_000
ORDER = {
    "placement": ["main-loop", "iothread"],
    "image": ["raw", "qcow2", "chain3"], "rw": ["randread", "randwrite"],
    "load": ["quiet", "disturbed", "fsync-writer", "stream-full", "stream-10M"],
}
# A placement field's suffixes (in this order), each of a dimension: its value with the suffix,
# and without it. The aio engines are one dimension, at most one of them in a field; without one
# a VMM runs its best engine (machine.txt's aio_best.VMM).
AIOS = ("threads", "io_uring", "native")
SUFFIXES = {"pci": ("transport", "pci", "mmio"), "per-queue": ("mapping", "per-queue", "one"),
            "nopoll": ("poll", "off", "default"),
            **{f"aio-{a}": ("aio", a, "best") for a in AIOS}}


def split_placement(field):
    """(placement, {dimension: value}) of a run name's placement field (iothread+pci+nopoll:
    iothread, transport pci, poll off), or None when it is not one."""
    place, *suffixes = field.split("+")
    if place not in ORDER["placement"] or suffixes != [s for s in SUFFIXES if s in suffixes]:
        return None
    if "nopoll" in suffixes and place != "iothread":
        return None
    if "per-queue" in suffixes and (place != "iothread" or "pci" not in suffixes):
        return None
    if sum(s.startswith("aio-") for s in suffixes) > 1:
        return None
    dims = {dim: off for dim, _, off in SUFFIXES.values()}
    dims.update(SUFFIXES[s][:2] for s in suffixes)
    return place, dims


def with_placement(field, place=None, drop=None):
    """A placement field with its placement replaced by PLACE, and/or the suffix DROP removed."""
    base, *suffixes = field.split("+")
    return "+".join([place or base] + [s for s in suffixes if s != drop])


def fio_jobs(machine):
    """How the guest's fio ran its jobs (machine.txt's numjobs; before it, always one)."""
    n = machine.get("numjobs", "1")
    if n == "1":
        return "one job pinned to vCPU 0"
    return (f"{n} jobs (`--numjobs={n} --cpus_allowed_policy=split`, one per vCPU; the host "
            "baseline's unpinned), each at the QD given, their IOPS summed and latencies merged "
            "(`--group_reporting`)")


def read_kv(path):
    """KEY=VALUE lines of a text file, or {} when it is missing."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def fio_side(doc, rw):
    """The fio job's read or write statistics for an rw mode."""
    job = doc["jobs"][0]
    return job["read" if "read" in rw else "write"]


def parse_run(path):
    """(config, summary object, curve) from one fio JSON file, or None with a reason."""
    parts = path.stem.split(".")
    rnd = 1
    if len(parts) == 7 and parts[6].startswith("r"):
        rnd = int(parts[6][1:]) if parts[6][1:].isdigit() else None
        parts = parts[:6]
    if len(parts) != 6 or not parts[4].startswith("qd"):
        return None, f"{path.name}: not a run name"
    vmm, placement, image, rw, qd, load = parts
    split = split_placement(placement)
    # vmm has no aio=native (linux-aio).
    if (vmm == "host") != (load == "native") or split is None or (
            vmm == "host" and placement != split[0]) or (
            vmm.startswith("vmm") and split[1]["aio"] == "native"):
        return None, f"{path.name}: not a run name"
    text = path.read_text(errors="replace")
    start = text.find("{")
    try:
        doc = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as err:
        return None, f"{path.name}: fio's JSON does not parse ({err})"
    if doc is None:
        return None, f"{path.name}: no JSON"
    side = fio_side(doc, rw)
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    n = clat.get("N", side.get("total_ios", 0))
    if not n or not pct:
        return None, f"{path.name}: no completions"
    lat = {"mean": clat["mean"] / 1000, "stdev": clat["stddev"] / 1000}
    for name, key in SUMMARY_PCTS.items():
        lat[name] = pct[key] / 1000 if key in pct else None
    lat["max"] = clat["max"] / 1000 if "max" in clat else None
    # fio's whole latency (submission, in which the guest notifies the device, + completion).
    lat["lat_mean"] = side["lat_ns"]["mean"] / 1000 if "lat_ns" in side else None
    obj = {"vmm": vmm, "placement": placement, "image": image, "rw": rw,
           "iodepth": int(qd[2:]), "load": load, **split[1], "iops": side["iops"],
           "completions": n, "lat_us": lat, "round": rnd}
    if vmm == "host":
        # fio's own CPU (user and system, % of one CPU over the run) per I/O: the host's cost.
        job = doc["jobs"][0]
        cpu = job.get("usr_cpu", 0) + job.get("sys_cpu", 0)
        obj["cpu_us_per_io"] = {"total": cpu / 100 / side["iops"] * 1e6 if side["iops"] else None}
    else:
        obj["cpu_us_per_io"] = cpu_per_io(path.with_suffix(".sched"), side["iops"])
        obj["irq_per_io"] = irq_per_io(path.with_suffix(".irq"),
                                       side["iops"] * doc["jobs"][0].get("elapsed", 0))
        obj["stages_us"] = stage_means(path.with_suffix(".stages"))
        obj["reaps"] = reap_figures(path.with_suffix(".stages"))
        block = guest_block(path.with_suffix(".gt"))
        if block:
            obj["guest_block_us"] = block
    if load.startswith("stream-"):
        obj["stream"] = stream_record(path.with_suffix(".stream"), side.get("runtime", 0) / 1000)
    # A stream part's completion log: a stream's figures from its run's completions only, and
    # quiet's from all of fio's, so that both are taken alike.
    ios = read_clat_log(path.with_suffix(".lat"))
    if ios and load.startswith("stream-"):
        obj["window"] = stream_window(obj["stream"], ios)
    elif ios:
        obj["window"] = window_figures(ios)
    curve = [(float(k), pct[k] / 1000) for k in PCTS if k in pct]
    if n < P9999_MIN_IOS:
        curve = [(p, v) for p, v in curve if p < 99.99]
    return (obj, n, curve), None


def cpu_per_io(path, iops):
    """{"total", "vcpu", "waited"}: the VMM's CPU µs per completed I/O while fio ran (all its
    threads, and of them the vCPUs, which also run the guest's fio and kernel), and the µs its
    other threads (main loop, iothreads, workers) spent runnable but waiting for a CPU, from
    raw/TAG.sched: each thread's ms over the window's wall ms, over fio's IOPS. Empty without
    a profile."""
    if not path.exists() or not iops:
        return {}
    wall, threads = parse_sched(path)
    if not wall:
        return {}
    per_io = lambda ms: ms / wall / iops * 1e6  # noqa: E731 (CPU share over I/Os per second)
    vcpu = sum(c for name, c, _ in threads if is_vcpu(name))
    waited = sum(w for name, _, w in threads if not is_vcpu(name))
    return {"total": per_io(sum(c for _, c, _ in threads)), "vcpu": per_io(vcpu),
            "waited": per_io(waited)}


def irq_per_io(path, ios):
    """{"virtio", "timer", "ipi"}: the guest's interrupts per I/O over a fio run, from raw/TAG.irq
    (inner.sh: "NAME DELTA" per /proc/interrupts line, summed over the vCPUs): the virtio
    queues' (every virtio line but the configuration vector's), the local timer's (LOC) and the
    IPIs (RES and CAL), over `ios`, the I/Os of the same span (fio's IOPS times its elapsed time,
    ramp included, as the counts are). Empty without the file or I/Os."""
    if not path.exists() or not ios:
        return {}
    counts = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            counts[parts[0]] = int(parts[1])
    virtio = sum(n for name, n in counts.items()
                 if name.startswith("virtio") and not name.endswith("-config"))
    return {"virtio": virtio / ios, "timer": counts.get("LOC", 0) / ios,
            "ipi": (counts.get("RES", 0) + counts.get("CAL", 0)) / ios}


def guest_block(path):
    """{"ios", "before", "device", "p99", "max"}: the guest's block layer over a fio run, from
    raw/TAG.gt (inner.sh, --guest-trace: "IOS BEFORE DEVICE P99 MAX", the requests its trace saw
    complete, the mean µs from the bio queued to the request issued to the driver and from
    issued to completed, and the p99 and maximum of queued to completed). Empty without it."""
    if not path.exists():
        return {}
    parts = path.read_text(errors="replace").split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        return {}
    if len(values) != 5 or not values[0]:
        return {}
    return dict(zip(("ios", "before", "device", "p99", "max"), values))


def is_vcpu(thread):
    """A vCPU thread: vmm's vcpuN, QEMU's "CPU N/KVM" (debug-threads=on, spaces as _)."""
    return thread.startswith("vcpu") or thread.startswith("CPU_")


def stages_replies(path, fold, empty):
    """The two x-query-blockstats-stages replies of raw/TAG.stages (at fio's start and stop), each
    folded over every disk's queues: fold(acc, queue) from empty() per reply. None without two
    readable replies."""
    if not path.exists():
        return None
    sums = []
    for line in path.read_text(errors="replace").splitlines()[:2]:
        acc = empty()
        try:
            for disk in json.loads(line)["return"]:
                for queue in disk["queues"]:
                    fold(acc, queue)
        except (ValueError, KeyError, TypeError):
            return None
        sums.append(acc)
    return sums if len(sums) == 2 else None


def stage_means(path):
    """vmm's mean µs per request and stage while fio ran, all disks and queues, from the two
    x-query-blockstats-stages replies of raw/TAG.stages (at fio's start and stop): the growth of
    each stage's total over the growth of its count. Empty without two replies."""
    def fold(acc, queue):
        for st in queue["stages"]:
            count, total = acc.get(st["stage"], (0, 0))
            acc[st["stage"]] = (count + st["count"], total + st["total-ns"])

    sums = stages_replies(path, fold, dict)
    if sums is None:
        return {}
    out = {}
    for stage, (count, total) in sums[1].items():
        c0, t0 = sums[0].get(stage, (0, 0))
        if count > c0:
            out[stage] = (total - t0) / (count - c0) / 1000
    return out


def reap_figures(path):
    """vmm's completions per reap and interrupts per reap while fio ran, all disks and queues,
    from the reaps, reaped and interrupts counters of the two x-query-blockstats-stages replies
    of raw/TAG.stages. Empty without two replies or without a reap between them."""
    keys = ("reaps", "reaped", "interrupts")

    def fold(acc, queue):
        for i, key in enumerate(keys):
            acc[i] += queue[key]

    sums = stages_replies(path, fold, lambda: [0] * len(keys))
    if sums is None:
        return {}
    reaps, reaped, irqs = (b - a for a, b in zip(*sums))
    if reaps <= 0:
        return {}
    return {"per_reap": reaped / reaps, "irq_per_reap": irqs / reaps}


def run_name(obj):
    """A configuration's name in raw/ (without the round)."""
    return "{vmm}.{placement}.{image}.{rw}.qd{iodepth}.{load}".format(**obj)


def read_sched(out, obj):
    """(wall ms, [(thread, CPU ms, run-queue wait ms)]) of a configuration's first round whose
    raw/TAG[.rN].sched exists (inner.sh's per-thread profile of the VMM while fio ran)."""
    name = run_name(obj)
    for suffix in [""] + [f".r{n}" for n in range(1, obj.get("runs", 1) + 1)]:
        path = out / "raw" / f"{name}{suffix}.sched"
        if path.exists():
            return parse_sched(path)
    return None, []


def parse_sched(path):
    """(wall ms, [(thread, CPU ms, run-queue wait ms)]) of a raw/TAG.sched file."""
    wall, threads = None, []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            continue
        if parts[0] == "wall_ms":
            wall = int(parts[1])
        else:
            threads.append((parts[0], int(parts[1]), int(parts[2])))
    return wall, threads


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(rounds):
    """One run per configuration from its rounds: every figure (and curve point) the median."""
    by = {}
    for run in rounds:
        by.setdefault(tag(run[0]), []).append(run)
    out = []
    for runs in by.values():
        first = runs[0][0]
        lat = {k: median_or_none([r[0]["lat_us"][k] for r in runs]) for k in first["lat_us"]}
        medians = lambda key: {k: median_or_none([r[0][key].get(k) for r in runs])  # noqa: E731
                               for k in first[key]}
        obj = dict(first, iops=statistics.median(r[0]["iops"] for r in runs), lat_us=lat,
                   completions=min(r[0]["completions"] for r in runs),
                   cpu_us_per_io=medians("cpu_us_per_io"), runs=len(runs))
        del obj["round"]
        if "stream" in first:
            obj["stream"] = combine_streams([r[0]["stream"] for r in runs])
        if "window" in first:
            obj["window"] = combine_windows([r[0].get("window", {"ios": 0, "error": "no log"})
                                             for r in runs])
        if "stages_us" in first:
            obj["stages_us"] = medians("stages_us")
        if "reaps" in first:
            obj["reaps"] = medians("reaps")
        if "irq_per_io" in first:
            obj["irq_per_io"] = medians("irq_per_io")
        if "guest_block_us" in first:
            obj["guest_block_us"] = {
                k: median_or_none([r[0].get("guest_block_us", {}).get(k) for r in runs])
                for k in first["guest_block_us"]}
        points = [dict(r[2]) for r in runs]
        curve = [(p, statistics.median(pts[p] for pts in points))
                 for p, _ in runs[0][2] if all(p in pts for pts in points)]
        polls = "/".join(r[3] for r in runs if r[3])
        out.append((obj, min(r[1] for r in runs), curve, polls))
    return out


def vmm_rank(vmm):
    """The order of a configuration's rows: vmm, its variants (vmm-NAME) by name, then QEMU."""
    return (0, "") if vmm == "vmm" else (2, "") if vmm == "qemu" else (1, vmm)


def sort_key(obj):
    place, dims = split_placement(obj["placement"])
    return (ORDER["image"].index(obj["image"]), ORDER["rw"].index(obj["rw"]), obj["iodepth"],
            ORDER["load"].index(obj["load"]), ORDER["placement"].index(place),
            [dims[dim] == on for dim, on, _ in SUFFIXES.values() if dim != "aio"],
            (("best",) + AIOS).index(dims["aio"]), vmm_rank(obj["vmm"]))


def baseline_key(obj):
    """The key of a run's host-native baseline: its placement without its suffixes, its
    image, pattern and depth (the baseline is fio in the host, the same for every VMM and
    transport)."""
    return (obj["placement"].split("+")[0], obj["image"], obj["rw"], obj["iodepth"])


def fmt(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def tag(obj, without=()):
    keys = ["vmm", "placement", "image", "rw", "iodepth", "load"]
    return tuple(obj[k] for k in keys if k not in without)


def ab_verdicts(runs, per_round, other="qemu"):
    """vmm against another VMM column (QEMU, or a variant vmm-NAME) per configuration:
    {tag: {"iops": verdict, "p99": verdict}} from the per-round figures; also stored in the vmm
    row of summary.json as `vs_OTHER`."""
    out = {}
    for obj in (r[0] for r in runs if r[0]["vmm"] == "vmm"):
        mine = per_round.get(tag(obj))
        theirs = per_round.get((other,) + tag(obj)[1:])
        if not mine or not theirs:
            continue
        v = {}
        for figure, higher_is_better in (("iops", True), ("p99", False)):
            a = [x for x in mine[figure] if x is not None]
            b = [x for x in theirs[figure] if x is not None]
            if a and b:
                v[figure] = verdict(a, b, higher_is_better)
        if "iops" in v:
            out[tag(obj)] = v
            obj["vs_" + other] = v
    return out


def per_round_figures(runs):
    """{tag: {"round": [...], "iops": [...], "p50": [...], "p99": [...]}}: each configuration's
    figures per round (the rounds in the same order in every list), for the A/B verdicts."""
    per_round = {}
    for run in runs:
        fig = per_round.setdefault(tag(run[0]), {"round": [], "iops": [], "p50": [], "p99": []})
        fig["round"].append(run[0]["round"])
        fig["iops"].append(run[0]["iops"])
        for p in ("p50", "p99"):
            fig[p].append(run[0]["lat_us"][p])
        if "window" in run[0]:
            for f in ("iops", "p50", "p99"):
                fig.setdefault("window_" + f, []).append(run[0]["window"].get(f))
    return per_round


# A stream's cost: the figures compared with quiet's, and whether higher is better.
COST_FIGURES = (("iops", True), ("p50", False), ("p99", False))
# A verdict on vmm's ratios over QEMU's, in words.
COST_WORDS = {"faster": "vmm's guest pays less", "slower": "vmm's guest pays more"}


def figure(obj, name):
    """IOPS or a percentile of a configuration: from its completion log's window where it has
    one (stream parts), else fio's own."""
    if "window" in obj:
        return obj["window"][name]
    return obj["iops"] if name == "iops" else obj["lat_us"][name]


def round_ratios(per_round, t, name):
    """A stream row's figure over its quiet row's, round by round (rounds both have)."""
    load, idle = per_round.get(t), per_round.get(t[:5] + ("quiet",))
    if not load or not idle:
        return []
    # The completion logs' windows where both have them.
    if "window_" + name in load and "window_" + name in idle:
        name = "window_" + name
    quiet = dict(zip(idle["round"], idle[name]))
    return [v / quiet[r] for r, v in zip(load["round"], load[name])
            if v is not None and quiet.get(r)]


# Streams whose rates differ by more than this factor did not load the guest alike.
RATE_SPREAD = 1.25


def unequal_work(mine, theirs):
    """' The streams differed: ...' when vmm's and QEMU's streams walked the disk at rates more
    than RATE_SPREAD apart (so the costs are not of the same load), else ''."""
    a, b = mine.get("mib_per_s"), theirs.get("mib_per_s")
    if not a or not b or 1 / RATE_SPREAD <= a / b <= RATE_SPREAD:
        return ""
    return (f" The streams differed: vmm's walked {a:.0f} MiB/s, QEMU's {b:.0f} MiB/s, so the "
            "guests did not bear the same load.")


def stream_cost(runs, per_round, rounds):
    """The section on what a block-stream costs the guest: per stream-load configuration, vmm's
    and QEMU's IOPS, p50 and p99 over their quiet runs' (medians of the rounds) side by side with
    their streams, then a verdict line per configuration on vmm's per-round ratios over QEMU's.
    Stores `vs_quiet` in each stream row and `stream_cost_vs_qemu` in vmm's. Empty without
    stream loads."""
    by = {tag(r[0]): r[0] for r in runs}
    keys = []
    for obj in (r[0] for r in runs if "stream" in r[0]):
        if tag(obj)[1:] not in keys:
            keys.append(tag(obj)[1:])
    if not keys:
        return []
    rows, lines = [], []
    for key in keys:
        sides = {who: by.get((who,) + key) for who in ("vmm", "qemu")}
        cells = {}
        for who, obj in sides.items():
            idle = by.get((who,) + key[:4] + ("quiet",))
            cells[who] = {f: ratio(figure(obj, f), figure(idle, f))
                          for f, _ in COST_FIGURES} if obj and idle else {}
            if cells[who]:
                obj["vs_quiet"] = cells[who]
        place, image, rw, qd, load = key
        rows.append(f"| {place} | {image} | {rw} | {qd} | {load} | " + " | ".join(
            fmt(cells[who].get(f), 2) for f, _ in COST_FIGURES for who in ("vmm", "qemu"))
            + " | " + " | ".join(stream_cell((sides[who] or {}).get("stream"),
                                             "window" in (sides[who] or {}))
                                 for who in ("vmm", "qemu"))
            + " | " + " | ".join(window_cell((sides[who] or {}).get("window"))
                                 for who in ("vmm", "qemu")) + " |")
        said = []
        short = [who for who in ("vmm", "qemu")
                 if ((sides[who] or {}).get("window") or {}).get("errors")]
        for f, higher_is_better in COST_FIGURES:
            a, b = (round_ratios(per_round, (who,) + key, f) for who in ("vmm", "qemu"))
            if not a or not b or short:
                continue
            v = verdict(a, b, higher_is_better)
            sides["vmm"]["stream_cost_vs_qemu"] = {
                **sides["vmm"].get("stream_cost_vs_qemu", {}), f: v}
            said.append(f"{'IOPS' if f == 'iops' else f} ×{fmt(cells['vmm'].get(f), 2)} under vmm, "
                        f"×{fmt(cells['qemu'].get(f), 2)} under QEMU: "
                        f"{COST_WORDS.get(v['verdict'], v['verdict'])} "
                        f"({v['change']:+.0%}, p={v['p']:.3g})")
        if short:
            lines.append(f"- {place} {image} {rw} QD{qd} {load}: no verdict: "
                         + ", ".join(f"{who}'s stream has no figures in a round "
                                     f"({sides[who]['window']['errors'][0]})" for who in short)
                         + ".")
        if said:
            lines.append(f"- {place} {image} {rw} QD{qd} {load}: " + "; ".join(said) + "."
                         + unequal_work(*((sides[who] or {}).get("stream", {})
                                          for who in ("vmm", "qemu"))))
    return ["", "## What a block-stream costs the guest (under the stream over quiet)", "",
            "Each VMM's IOPS, p50 and p99 under the load over its own quiet run's (medians of "
            "the rounds; IOPS below 1, latencies above 1: the guest slowed), vmm beside QEMU, and "
            "each one's stream: in how many rounds it still ran when fio stopped "
            "(query-block-jobs after fio's end), how much of the disk it had walked by then and "
            "how fast (QEMU's `offset`: the range the top holds already is walked without a "
            "copy), and a stream that ended before fio, its duration and the least share of "
            "fio's window it covered. Where the runs logged each completion (fio's clat log on "
            "the guest's wall clock, kvmclock's, checked against the host's by the disk's last "
            "completion, query-blockstats' idle_time_ns after fio's stop), the figures under a "
            "stream are those of the completions while the stream ran (from block-stream's reply "
            "to its BLOCK_JOB_COMPLETED, or to fio's stop, shrunk at both ends by the clocks' "
            "offset), quiet's those of "
            "all of fio's, both nearest-rank percentiles; the I/Os columns count them per round, "
            f"and a round with fewer than {MIN_WINDOW_IOS} has no figures (nor the configuration a "
            "verdict). Verdicts: vmm's per-round ratios over QEMU's, with the "
            f"A/B rule above (a change of at least {MIN_CHANGE:.0%} with p < {ALPHA})"
            + ("" if rounds >= 5 else f"; with {rounds} round(s) none can be called") + ".", "",
            "| placement | image | rw | QD | load | IOPS vmm | IOPS QEMU | p50 vmm | p50 QEMU | "
            "p99 vmm | p99 QEMU | vmm's stream | QEMU's stream | I/Os vmm | I/Os QEMU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows + [""] + (
            lines or ["- No verdict: a VMM has no quiet run to compare with."])


def vmm_over(runs, other, title, verdicts, rounds):
    """The table of vmm over another VMM column (QEMU or a variant) per configuration: the ratios
    of IOPS and percentiles and the A/B verdicts on IOPS and p99."""
    by = {tag(r[0]): r[0] for r in runs}
    md = ["", f"## vmm over {title} (IOPS above 1, latencies below 1: vmm faster)", "",
          f"Verdicts: a permutation test on the {rounds} per-round figures of each side, called "
          f"only at a change of at least {MIN_CHANGE:.0%} with p < {ALPHA} (Firecracker's A/B "
          "rule); otherwise no difference at this noise."
          + ("" if rounds >= 5 else f" With {rounds} round(s) no p-value can fall below 0.01: "
             "run `--rounds 5` or more for a verdict."), "",
          "| placement | image | rw | QD | load | IOPS | p50 | p99 | p99.9 | IOPS verdict | "
          "p99 verdict |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for obj in (r[0] for r in runs if r[0]["vmm"] == "vmm"):
        q = by.get((other,) + tag(obj)[1:])
        if not q:
            continue
        cells = [ratio(obj["iops"], q["iops"])] + [
            ratio(obj["lat_us"][p], q["lat_us"][p]) for p in ("p50", "p99", "p99.9")]
        v = verdicts.get(tag(obj), {})
        md.append(f"| {obj['placement']} | {obj['image']} | {obj['rw']} | {obj['iodepth']} | "
                  f"{obj['load']} | " + " | ".join(fmt(c, 2) for c in cells) + " | "
                  f"{say(v.get('iops'))} | {say(v.get('p99'))} |")
    return md


def suffix_over(runs, suffix, title):
    """The table of each run with a placement suffix (+pci, +per-queue, +nopoll) over the same VMM's run
    without it: the ratios of IOPS and percentiles. Empty when no run has the suffix."""
    by = {tag(r[0]): r[0] for r in runs}
    rows = []
    for obj in (r[0] for r in runs if suffix in r[0]["placement"].split("+")):
        t = tag(obj)
        o = by.get((t[0], with_placement(t[1], drop=suffix)) + t[2:])
        if not o:
            continue
        cells = [ratio(obj["iops"], o["iops"])] + [
            ratio(obj["lat_us"][p], o["lat_us"][p]) for p in ("p50", "p99", "p99.9")]
        rows.append(f"| {obj['vmm']} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                    f"{obj['iodepth']} | {obj['load']} | " + " | ".join(fmt(c, 2) for c in cells)
                    + " |")
    if not rows:
        return []
    return ["", f"## {title} (IOPS above 1, latencies below 1: the first faster)", "",
            "| VMM | placement | image | rw | QD | load | IOPS | p50 | p99 | p99.9 |",
            "|---|---|---|---|---|---|---|---|---|---|"] + rows


def aio_engines(runs, best):
    """The table of each VMM's aio engines side by side: per VMM and configuration (its placement
    without the aio suffix) with runs of two engines or more, each engine's IOPS, p50 and p99, and
    its IOPS and p99 over those of the fastest engine there (the most IOPS). BEST: {"vmm": engine,
    "qemu": engine}, what the runs without a suffix ran (machine.txt's aio_best; vmm's variants
    run vmm's). Empty without such a configuration."""
    bare = lambda o: dict(o, placement=with_placement(o["placement"],  # noqa: E731
                                                      drop="aio-" + o["aio"]))
    groups = {}
    # In the order of the other tables, each VMM's engines in a row: best, then as in AIOS.
    for obj in sorted((r[0] for r in runs), key=lambda o: (sort_key(bare(o)), sort_key(o))):
        groups.setdefault(tag(bare(obj)), []).append(obj)
    rows = []
    for (vmm, place, *rest), objs in groups.items():
        if len(objs) < 2:
            continue
        fastest = max(objs, key=lambda o: o["iops"])
        for obj in objs:
            engine = obj["aio"]
            if engine == "best":
                engine = f"best ({best.get('qemu' if vmm == 'qemu' else 'vmm', '?')})"
            cells = [obj["iops"], obj["lat_us"]["p50"], obj["lat_us"]["p99"]]
            over = [ratio(obj["iops"], fastest["iops"]),
                    ratio(obj["lat_us"]["p99"], fastest["lat_us"]["p99"])]
            rows.append(f"| {vmm} | {place} | " + " | ".join(str(x) for x in rest)
                        + f" | {engine} | " + " | ".join(fmt(c) for c in cells) + " | "
                        + " | ".join(fmt(c, 2) for c in over) + " |")
    if not rows:
        return []
    return ["", "## Each VMM's aio engines (`-drive aio=`) side by side", "",
            "Per VMM and configuration, each engine's figures and its IOPS and p99 over those of "
            "the engine with the most IOPS there (1.00: the fastest).", "",
            "| VMM | placement | image | rw | QD | load | aio | IOPS | p50 µs | p99 µs | "
            "IOPS over fastest | p99 over fastest's |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows


def say(v):
    """A verdict in a table cell: 'faster (+12%, p=0.008)'."""
    if not v:
        return "—"
    return f"{v['verdict']} ({v['change']:+.0%}, p={v['p']:.3g})"


# The percentiles given as host-native + overhead, and the tail ones with their samples.
OVER_HOST_PCTS = [("p50", 50), ("p99", 99), ("p99.9", 99.9), ("p99.99", 99.99), ("max", None)]


def beyond(n, pct):
    """'[k]': the completions beyond a percentile in a run of n (n × (1 − pct)), '[<1]' when fewer
    than one: then fio's figure is the run's slowest completion, not a percentile."""
    k = round(n * (100 - pct) / 100, 6)  # round: 100 - 99.9 is not 0.1 in binary
    return "[<1]" if k < 1 else f"[{math.floor(k):,}]"


def plus(value, base):
    """'host + overhead' in µs (overhead = value − base), or the value alone without a base."""
    if value is None:
        return "—"
    if base is None:
        return fmt(value)
    over = value - base
    return f"{fmt(base)} {'+' if over >= 0 else '−'} {fmt(abs(over))}"


def cpu_cell(cpu):
    """'total (vCPUs v)' CPU µs per I/O."""
    if cpu.get("total") is None:
        return "—"
    if cpu.get("vcpu") is None:
        return fmt(cpu["total"], 1)
    return f"{fmt(cpu['total'], 1)} (vCPUs {fmt(cpu['vcpu'], 1)})"


def over_host(runs, baselines):
    """The 'Over the host' section: each host-native baseline, then each VMM row's percentiles
    as baseline + overhead and its CPU per I/O."""
    if not baselines:
        return ["", "No host-native baseline in this run (raw/host.*.json)."]
    md = ["", "## Over the host: fio in the host on the raw image", "",
          "Each baseline is fio in the host that ran the guests (before they booted), on a copy "
          "of the raw image file, with the guest's options (4 KiB, the same pattern and depth, "
          "`--direct=1 --ioengine=libaio`, the same runtime); for qcow2 and chain3 it is the "
          "same bytes without the format, so their overhead includes the format's. VMM cells: "
          "host µs + overhead µs. [k]: the completions beyond that percentile in the run with "
          "fewest (n × (1 − p)); [<1]: under one, so the figure is the slowest completion, not a "
          "percentile; max is always one completion. These are fio's completion latencies "
          "(clat, from io_submit's return): in a guest io_submit also carries the notification's "
          "exit, so a clat may fall below the host's; the stage table below compares fio's whole "
          "latency (lat). CPU µs per I/O: the VMM's threads (of them "
          "its vCPUs, which also run the guest's fio) while fio ran, over the I/Os completed; "
          "the host's: fio's own user + system CPU. Waited µs/IO: the time the VMM's other "
          "threads (main loop, iothreads, workers) were runnable but had no CPU, per I/O.", "",
          "| who | placement | image | rw | QD | load | completions | "
          + " | ".join(f"{name} µs" for name, _ in OVER_HOST_PCTS)
          + " | CPU µs/IO | waited µs/IO |",
          "|---|---|---|---|---|---|---|" + "---|" * len(OVER_HOST_PCTS) + "---|---|"]

    def row(who, obj, base):
        n = obj["completions"]
        cells = []
        for name, pct in OVER_HOST_PCTS:
            value = obj["lat_us"].get(name)
            cell = plus(value, base["lat_us"].get(name) if base else None)
            if pct is not None and pct >= 99 and value is not None:
                cell += " " + beyond(n, pct)
            cells.append(cell)
        return (f"| {who} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                f"{obj['iodepth']} | {obj['load']} | {n:,} | " + " | ".join(cells)
                + f" | {cpu_cell(obj['cpu_us_per_io'])} | "
                f"{fmt(obj['cpu_us_per_io'].get('waited'), 1)} |")

    shown = set()
    for obj in (r[0] for r in runs):
        key = baseline_key(obj)
        base = baselines.get(key)
        if base and key not in shown:
            shown.add(key)
            md.append(row("host fio", dict(base, load="—"), None))
        md.append(row(obj["vmm"], obj, base))
    return md


def stage_table(runs):
    """Where vmm's requests spent their time (x-query-blockstats-stages over each fio run),
    beside fio's mean completion latency in the guest."""
    rows = []
    for obj in (r[0] for r in runs if r[0].get("stages_us")):
        st = obj["stages_us"]
        total = st.get("total")
        guest = obj["lat_us"]["lat_mean"]
        outside = guest - total if None not in (guest, total) else None
        cells = [guest, total, outside] + [
            st.get(k) for k in ("queue-wait", "submission", "backend", "backend-dispatch",
                                "backend-metadata", "backend-data", "completion")]
        reaps = obj.get("reaps", {})
        rows.append(f"| {obj['vmm']} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                    f"{obj['iodepth']} | {obj['load']} | "
                    + " | ".join(fmt(c, 1) for c in cells) + " | "
                    + " | ".join(fmt(reaps.get(k), 2) for k in ("per_reap", "irq_per_reap"))
                    + " |")
    if not rows:
        return []
    return ["", "## Where vmm's requests spend their time (mean µs per request)", "",
            "From `x-query-blockstats-stages` at fio's start and stop (the growth of each "
            "stage's total over that of its count). guest: fio's mean latency (`lat`: from "
            "submission, in which the guest notifies the device, to completion); "
            "vmm: the stages' sum, from the handler waking for the queue's notification to the "
            "interrupt injected; outside: the rest (the guest's notification reaching the "
            "handler, the interrupt reaching fio, the guest's own path). backend = dispatch + "
            "metadata + data. per reap: the requests each reap of the disk's engine completed, "
            "and the interrupts the device injected per reap (its reaps, reaped and interrupts "
            "counters; a reap is counted once per queue it completed requests of).", "",
            "| VMM | placement | image | rw | QD | load | guest | vmm | outside | queue wait | "
            "submission | backend | dispatch | metadata | data | completion | per reap | "
            "irq per reap |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows


def irq_table(runs):
    """The guest's interrupts per I/O while fio ran, by kind, for every VMM row that has them."""
    rows = [f"| {o['vmm']} | {o['placement']} | {o['image']} | {o['rw']} | {o['iodepth']} | "
            f"{o['load']} | " + " | ".join(fmt(o["irq_per_io"].get(k), 2)
                                         for k in ("virtio", "timer", "ipi")) + " |"
            for o in (r[0] for r in runs if r[0].get("irq_per_io"))]
    if not rows:
        return []
    return ["", "## The guest's interrupts per I/O", "",
            "From the guest's /proc/interrupts just before and after each fio run (all vCPUs), "
            "over the I/Os of that span (IOPS times fio's elapsed time, ramp included). virtio: "
            "the disk's queue vectors (not the configuration vector); timer: local timer ticks "
            "(LOC), which come with time, not I/O, so a VMM doing fewer I/Os shows more; IPIs: "
            "rescheduling and function-call interrupts (RES, CAL). KVM's injection counters "
            "(raw/TAG.kvm) count all three together.", "",
            "| VMM | placement | image | rw | QD | load | virtio | timer | IPIs |",
            "|---|---|---|---|---|---|---|---|---|"] + rows


def guest_block_table(runs):
    """Where fio's latency went in the guest (--guest-trace), for every VMM row traced."""
    rows = []
    for obj in (r[0] for r in runs if r[0].get("guest_block_us")):
        block = obj["guest_block_us"]
        fio = obj["lat_us"]["lat_mean"]
        inside = (block["before"] + block["device"]
                  if None not in (block.get("before"), block.get("device")) else None)
        rest = fio - inside if None not in (fio, inside) else None
        cells = [fio, block.get("before"), block.get("device"), rest, block.get("p99"),
                 block.get("max"), obj["lat_us"]["p99"]]
        rows.append(f"| {obj['vmm']} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                    f"{obj['iodepth']} | {obj['load']} | " + " | ".join(fmt(c) for c in cells)
                    + f" | {fmt(block.get('ios'))} |")
    if not rows:
        return []
    return ["", "## Where fio's latency went in the guest (µs)", "",
            "From the guest's block-layer tracepoints over each fio run, ramp included "
            "(`--guest-trace`: block_bio_queue, block_rq_issue, block_rq_complete). fio: its "
            "mean latency (`lat`); before the driver: the bio queued to the request issued to "
            "virtio-blk (the guest's block layer); device: issued to completed (the "
            "notification, the VMM or QEMU, the host's I/O and the interrupt, up to the guest "
            "completing the request); rest: fio's mean less those two (the completion reaching "
            "fio, and fio's own path); then the block layer's p99 and maximum of queued to "
            "completed beside fio's p99 (clat): a fio tail well beyond the block layer's is "
            "the guest's, not the device's. Tracing costs the guest CPU: compare rows of one "
            "run.", "",
            "| VMM | placement | image | rw | QD | load | fio | before the driver | device | "
            "rest | block p99 | block max | fio p99 | requests traced |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows


def plot(runs, path):
    """One panel per configuration, vmm's and QEMU's percentile curves on a 'nines' axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = {}
    for obj, _, curve in runs:
        pairs.setdefault(tag(obj, ("vmm",)), {})[obj["vmm"]] = curve
    keys = sorted(pairs, key=lambda k: sort_key({"vmm": "vmm", "placement": k[0], "image": k[1],
                                                  "rw": k[2], "iodepth": k[3], "load": k[4]}))
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    nines = lambda p: -math.log10(1 - p / 100)  # noqa: E731 (50 -> 0.3, 99 -> 2, 99.9 -> 3)
    ticks = [50, 90, 99, 99.9, 99.99]
    for ax, key in zip(axes.flat, keys):
        for vmm in sorted(pairs[key], key=vmm_rank):
            style = {"vmm": "-o", "qemu": "--s"}.get(vmm, ":^")
            curve = pairs[key][vmm]
            if curve:
                ax.plot([v for _, v in curve], [nines(p) for p, _ in curve], style, ms=3,
                        label=vmm)
        ax.set_xscale("log")
        ax.set_yticks([nines(t) for t in ticks], [str(t) for t in ticks])
        ax.set_title("{} {} {} QD{} {}".format(*key), fontsize=9)
        ax.set_xlabel("completion latency (µs)", fontsize=8)
        ax.set_ylabel("percentile", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("fio 4 KiB completion latency: vmm (and its variants) vs QEMU microvm "
                 "(same host, same run)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    out = pathlib.Path(sys.argv[1])
    machine = read_kv(out / "machine.txt")
    host = read_kv(out / "host.txt")
    runs, problems = [], []
    for path in sorted((out / "raw").glob("*.json")):
        run, why = parse_run(path)
        if run:
            polls = out / "raw" / (path.stem + ".polls")
            run = (*run, polls.read_text().strip() if polls.exists() else "")
            runs.append(run)
        else:
            problems.append(why)
    rounds = int(machine.get("rounds", "1") or 1)
    per_round = per_round_figures(runs)
    runs = combine(runs)
    # The host-native baselines (vmm "host"), keyed as the VMM rows they are the floor of.
    baselines = {baseline_key(r[0]): r[0] for r in runs if r[0]["vmm"] == "host"}
    runs = [r for r in runs if r[0]["vmm"] != "host"]
    for obj, *_ in runs:
        base = baselines.get(baseline_key(obj))
        if base:
            obj["host_native"] = {k: base[k] for k in ("iops", "completions", "lat_us",
                                                       "cpu_us_per_io", "runs")}
    verdicts = ab_verdicts(runs, per_round)
    # The variants machine.txt names (vmm_variant.vmm-NAME=ARGS), and any other with runs.
    variants = {k.removeprefix("vmm_variant."): v for k, v in machine.items()
                if k.startswith("vmm_variant.")}
    for obj in (r[0] for r in runs):
        if obj["vmm"] not in ("vmm", "qemu"):
            variants.setdefault(obj["vmm"], "?")
    runs.sort(key=lambda r: sort_key(r[0]))
    expected = int(machine.get("configurations", "0") or 0)
    if len(runs) < expected:
        problems.append(f"{len(runs)} of {expected} configurations have a result")
    for obj, *_ in runs:
        if obj["runs"] < rounds:
            problems.append(f"{run_name(obj)}: {obj['runs']} of {rounds} rounds")
        errors = obj.get("stream", {}).get("errors")
        if errors:
            problems.append(f"{run_name(obj)}: no stream in {len(errors)} of {obj['runs']} "
                            f"rounds ({errors[0]})")
    cost = stream_cost(runs, per_round, rounds)
    (out / "summary.json").write_text(json.dumps([r[0] for r in runs], indent=2) + "\n")

    versions = {}
    for vmm in ("vmm", "qemu"):
        vpath = out / f"version-{vmm}.json"
        try:
            lines = [ln for ln in vpath.read_text().splitlines() if '"return"' in ln]
            ret = json.loads(lines[0])["return"]
            q = ret["qemu"]
            versions[vmm] = f"{q['major']}.{q['minor']}.{q['micro']} {ret.get('package', '')}".strip()
        except (OSError, IndexError, KeyError, ValueError):
            versions[vmm] = "unknown (no query-version reply)"
    level0 = machine.get("level0", "?")
    # Each VMM's engine in the runs without +aio-ENGINE (before the option: no aio=, threads).
    best = {vmm: machine.get(f"aio_best.{vmm}", "threads") for vmm in ("vmm", "qemu")}
    md = ["# Block latency: vmm beside QEMU microvm", ""]
    if level0 == "nested":
        where = (f"the **nested KVM host**: this machine ({machine.get('machine_cpus')} CPUs, "
                 f"{machine.get('machine_cpu')}, no VMX/SVM, load {machine.get('machine_load')} "
                 f"at the start) runs {machine.get('outer_qemu')} TCG with "
                 f"{host.get('host_vcpus')} vCPUs (kernel {host.get('host_kernel')}), in which "
                 "each VMM runs a 2-vCPU 1 GiB guest")
    else:
        where = (f"direct KVM: {host.get('host_vcpus')} CPUs ({machine.get('machine_cpu')}), "
                 "each VMM runs a 2-vCPU 1 GiB guest")
    md += [f"- Host: {where}.",
           f"- vmm: query-version {versions['vmm']}, package {machine.get('vmm_package')}, "
           f"commit {machine.get('vmm_commit')}.",
           *[f"- {name}: " + (f"the vmm executable {args.removeprefix('binary ')}"
                              if args.startswith("binary ") else
                              f"vmm with `{args}` appended to its command line")
             + ", booted in the same parts as vmm and QEMU." for name, args in variants.items()],
           f"- QEMU: query-version {versions['qemu']} ({host.get('qemu')}), "
           f"`{machine.get('qemu_baseline', '').strip()}` (ci/qemu-baseline.args)"
           + (f"; on PCI (`+pci`) `{machine['qemu_baseline_pci'].strip()}`"
              if machine.get("qemu_baseline_pci") else "") + ".",
           f"- Guest: Debian kernel {machine.get('guest_kernel')}, initrd-fio.img; one virtio-blk "
           "disk (virtio-mmio, `-device virtio-blk-device`; placement `+pci`: "
           "`-device virtio-blk-pci` with a queue per vCPU; `+per-queue`: an iothread per "
           "queue, `-object iothread` io0 to ioN-1 and the JSON `-device` with `num-queues` N and "
           "`iothread-vq-mapping` over them; `+nopoll`: the iothreads' "
           f"`poll-max-ns=0`; {machine.get('image_mib')} MiB, every cluster allocated, "
           f"`cache=none`; `aio=` each VMM's best here, QEMU `{best['qemu']}` and vmm "
           f"`{best['vmm']}` (ci/aio-best), or with `+aio-ENGINE` "
           "ENGINE for both, `native` (linux-aio) QEMU's only), fresh "
           "copy per boot; fio 4 KiB `--direct=1 --ioengine=libaio`, " + fio_jobs(machine)
           + f", {machine.get('runtime_s')} s after 1 s of ramp, `--output-format=json`.",
           "- disturbed: on the guest's vCPU 1 a shell spins and another writes a line to the "
           "serial console every 10 ms; while fio runs, a QMP client "
           "in the host polls `query-blockstats` over `-qmp tcp:` on one connection, "
           + ("requests pipelined back to back (a flood)"
              if machine.get("poll_interval_s") in ("0", None) else
              f"one request, its reply, then {machine.get('poll_interval_s')} s")
           + " (replies it got: the polls column).",
           f"- Run: {machine.get('mode')}; {rounds} round(s)"
           + (", each figure the median of the rounds" if rounds > 1 else "")
           + "; fio JSON of each run in `raw/`. Nested figures "
           "compare VMMs within one run; they are not hardware latencies.", ""]
    if problems:
        md += ["**Missing or unusable runs:** " + "; ".join(problems), ""]
    md += ["| VMM | placement | image | rw | QD | load | IOPS | mean µs | stdev µs | p50 µs | "
           "p90 µs | p99 µs | p99.9 µs | p99.99 µs | polls |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for obj, n, _, polls in runs:
        lat = obj["lat_us"]
        p9999 = lat["p99.99"] if n >= P9999_MIN_IOS else None
        md.append(f"| {obj['vmm']} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                  f"{obj['iodepth']} | {obj['load']} | {fmt(obj['iops'])} | {fmt(lat['mean'])} | "
                  f"{fmt(lat['stdev'])} | {fmt(lat['p50'])} | {fmt(lat['p90'])} | "
                  f"{fmt(lat['p99'])} | {fmt(lat['p99.9'])} | {fmt(p9999)} | "
                  f"{polls or '—'} |")
    md += ["", f"p99.99 only from runs of at least {P9999_MIN_IOS:,} completions; "
           "the next table gives it, and the maximum, with the samples behind them."]
    md += over_host(runs, baselines)
    md += stage_table(runs)
    md += irq_table(runs)
    md += guest_block_table(runs)
    md += aio_engines(runs, best)
    by = {tag(r[0]): r[0] for r in runs}
    md += suffix_over(runs, "pci", "PCI over MMIO")
    md += suffix_over(runs, "per-queue", "One iothread per queue over one iothread")
    md += suffix_over(runs, "nopoll", "Polling off over polling on")
    md += vmm_over(runs, "qemu", "QEMU", verdicts, rounds)
    if verdicts:
        md += ["", "## Rows by verdict (IOPS)", ""]
        for called in ("faster", "slower", "no difference at this noise"):
            rows = ["{} {} {} qd{} {} ({:+.0%}, p={:.3g})".format(
                        *t[1:], v["iops"]["change"], v["iops"]["p"])
                    for t, v in verdicts.items() if v["iops"]["verdict"] == called]
            md.append(f"- vmm {called}: " + ("; ".join(rows) if rows else "none"))
    md += cost
    for name, args in variants.items():
        md += vmm_over(runs, name, f"{name} (`{args}`)",
                       ab_verdicts(runs, per_round, name), rounds)
    md += ["", "## iothread over main loop, disturbed (goal: p99.9 at most 0.5)", "",
           "| VMM | placement | image | rw | QD | p50 | p99 | p99.9 |",
           "|---|---|---|---|---|---|---|---|"]
    for obj in (r[0] for r in runs
                if r[0]["placement"].split("+")[0] == "iothread" and r[0]["load"] == "disturbed"):
        t = tag(obj)
        m = by.get((t[0], with_placement(t[1], place="main-loop")) + t[2:])
        if not m:
            continue
        cells = [ratio(obj["lat_us"][p], m["lat_us"][p]) for p in ("p50", "p99", "p99.9")]
        md.append(f"| {obj['vmm']} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                  f"{obj['iodepth']} | " + " | ".join(fmt(c, 2) for c in cells) + " |")
    rows = []
    for obj in (r[0] for r in runs if r[0]["load"] == "disturbed"):
        wall, threads = read_sched(out, obj)
        if wall is not None:
            cells = " · ".join(f"{n} {fmt(c)}/{fmt(w)}" for n, c, w in threads[:6])
            rows.append(f"| {obj['vmm']} | {obj['placement']} | {obj['image']} | {obj['rw']} | "
                        f"{obj['iodepth']} | {fmt(wall)} | {cells} |")
    if rows:
        md += ["", "## Where the VMMs' threads spent the disturbed runs (first round)", "",
               "Each thread busy while fio ran: CPU ms / ms runnable but waiting for a CPU "
               "(`/proc/PID/task/*/schedstat`), busiest first, over the run's wall time.", "",
               "| VMM | placement | image | rw | QD | wall ms | threads: CPU ms / wait ms |",
               "|---|---|---|---|---|---|---|"] + rows
    if runs:
        plot([(r[0], r[1], r[2]) for r in runs], out / "latency-cdf.png")
        md += ["", "Latency percentile curves: `latency-cdf.png`."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    if problems or not runs:
        sys.exit(1)


if __name__ == "__main__":
    main()
