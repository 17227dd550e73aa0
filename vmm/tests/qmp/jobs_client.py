#!/usr/bin/env python3
"""Block jobs on a running vmm beside QEMU 10, driven by QEMU's own client (qemu.qmp).

Usage: jobs_client.py SCENARIO VMM KERNEL SOCKET (SCENARIO: "jobs")

Each side gets copies of the same two chains (base <- mid <- top, pattern-filled with qemu-io):
d0 on an iothread, d1 on the main loop. The same QMP sequence goes to vmm (guest running) and to
QEMU microvm (-S): bad requests; a slow block-stream with a base, paused, refused verbs,
speed changed, resumed to its end; a full stream of the main-loop disk; a stream cancelled
halfway; an intermediate commit of a disk's middle image into its base; an active commit of a
whole chain into its base, ready, then completed (the disk switched to the base); an active
commit of the top into its middle image, cancelled once ready (the disk stays on its top). The
replies, the job events (timestamps stripped), query-block-jobs while paused and once ready, and
query-block's chains must match; after both quit, qemu-img compares the images side by side,
checks them, and reads the same chains.
SCENARIO "onerror": jobs whose writes fail, beside QEMU 10: each VMM's file size limit
(RLIMIT_FSIZE, set on the running process) pinned to the size of the image a job writes, so that
growing it fails with EFBIG under both: a commit of d0's middle image with on-error=stop
(BLOCK_JOB_ERROR, paused with io-status failed, a cancel without force refused, the limit
lifted, resumed to its end), then a stream of d1 with on-error=enospc (EFBIG is not ENOSPC: it
reports, and the job ends with an error), a commit of d1's middle image with on-error=ignore
(retried until the limit is lifted, then ends well), streams of d0 with on-error=ignore (each
chunk that cannot be written skipped, the job failing at its end) and on-error=auto (enospc's
behaviour: reports), then active commits of d2 with on-error=auto (reports: the job ends, the
disk stays on its top) and on-error=ignore (retried until the limit is lifted, then ready and
completed). The events, replies and query-block-jobs must match (the error texts, worded by
each, only present; a retried chunk's repeated errors collapsed, and so are the errors of QEMU's
mirror copies in flight at once, whose progress is not compared); qemu-img then compares and
checks the images.
Prints one line per check; exits non-zero on the first failure.
"""

import asyncio
import os
import resource
import subprocess
import sys

from qemu.qmp import EventListener

from checks import TIMEOUT, check
from guest_client import image_chain, quit_both, snapshot_side_chain, start, start_qemu

JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
              "BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING")


def make_chains(d):
    def run(*cmd):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    for n in ("", "2", "3", "4", "5"):
        base, mid, top = (f"{d}/base{n}.qcow2", f"{d}/mid{n}.qcow2", f"{d}/top{n}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 64k", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 2 512k 1M", "-c", "write -z 2M 128k", mid)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 64k", top)


async def wait_jobs_gone(qmp):
    for _ in range(TIMEOUT * 20):
        if not await qmp.execute("query-block-jobs"):
            return True
        await asyncio.sleep(0.05)
    return False


async def wait_status(qmp, job, status, moved=False):
    """The job's query-block-jobs entry once it has `status` (and, with `moved`, has made
    progress)."""
    for _ in range(TIMEOUT * 20):
        jobs = [j for j in await qmp.execute("query-block-jobs") if j["device"] == job]
        if jobs and jobs[0]["status"] == status and (jobs[0]["offset"] > 0 or not moved):
            return jobs[0]
        await asyncio.sleep(0.05)
    return None


def collapse_wakeups(events):
    """QEMU's paused job returns to its pause point each time something wakes it (a drain),
    raising `running` and `paused` again; such pairs are collapsed into the one pause."""
    out = []
    for e in events:
        if (len(out) >= 2 and e == out[-2] and e[0] == "JOB_STATUS_CHANGE"
                and e[1]["status"] == "paused" and out[-1][1].get("status") == "running"):
            out.pop()
            continue
        out.append(e)
    return out


def collapse_retries(events, jobs):
    """A job that retries a failing chunk (on-error=ignore) raises BLOCK_JOB_ERROR at each try,
    as many as fit in the time the error lasts; QEMU's mirror has several copies in flight, each
    failing one raising its own: the repeats of `jobs` are collapsed into one."""
    return [e for i, e in enumerate(events)
            if not (i > 0 and e == events[i - 1] and e[0] == "BLOCK_JOB_ERROR"
                    and e[1]["device"] in jobs)]


async def side(qmp, d):
    """The job sequence on images in directory `d`; returns what to compare, `d` named DIR."""
    replies = []
    labels = {}  # node name -> what it names: automatic names differ between QEMU and vmm

    async def ex(cmd, args):
        try:
            r = await qmp.execute(cmd, args)
            replies.append((cmd, "return", r))
        except Exception as e:  # qemu.qmp's ExecuteError: the reply's class and desc.
            err = e.error.error
            desc = err.desc.replace(d, "DIR")
            for name in sorted(labels, key=len, reverse=True):
                desc = desc.replace(name, labels[name])
            replies.append((cmd, err.class_, desc))

    listener = EventListener()
    with qmp.listen(listener):
        for cmd, args in [
            ("block-stream", {"device": "nope"}),
            ("block-stream", {"device": "d0", "base": f"{d}/nope.qcow2"}),
            ("block-stream", {"device": "d0", "base": f"{d}/top.qcow2"}),
            ("block-stream", {"device": "d0", "speed": -1}),
            ("block-stream", {"device": "d0", "job-id": "1x"}),
            ("block-job-pause", {"device": "j0"}),
            ("block-job-cancel", {"device": "j0"}),
            ("block-job-set-speed", {"device": "j0", "speed": 5}),
            # 1 byte/s: after its first copy the job sleeps for days.
            ("block-stream", {"device": "d0", "job-id": "j0", "base": f"{d}/base.qcow2",
                              "speed": 1}),
            ("block-stream", {"device": "d0", "job-id": "j1"}),
            ("block-stream", {"device": "d1", "job-id": "j0"}),
            ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": f"{d}/s.qcow2"}),
            ("block-job-complete", {"device": "j0"}),
            ("block-job-resume", {"device": "j0"}),
            ("block-job-pause", {"device": "j0"}),
            ("block-job-pause", {"device": "j0"}),
        ]:
            await ex(cmd, args)
        paused = await wait_status(qmp, "j0", "paused")
        if paused:
            del paused["offset"]  # how far it got before pausing
        for cmd, args in [
            ("block-job-cancel", {"device": "j0"}),
            ("block-job-set-speed", {"device": "j0", "speed": -5}),
            ("block-job-set-speed", {"device": "j0", "speed": 0}),
            ("block-job-resume", {"device": "j0"}),
        ]:
            await ex(cmd, args)
        gone = [await wait_jobs_gone(qmp)]
        await ex("block-stream", {"device": "d1"})
        gone.append(await wait_jobs_gone(qmp))
        await ex("block-stream", {"device": "d0", "job-id": "j2", "speed": 1})
        # Halfway: after its first copy, sleeping for its speed limit.
        gone.append(await wait_status(qmp, "j2", "running", moved=True) is not None)
        await ex("block-job-cancel", {"device": "j2"})
        gone.append(await wait_jobs_gone(qmp))
        # An intermediate commit of d2's middle image into its base.
        for cmd, args in [
            ("block-commit", {"device": "nope", "top": f"{d}/mid3.qcow2"}),
            ("block-commit", {"device": "d2", "top": f"{d}/nope.qcow2"}),
            ("block-commit", {"device": "d2", "top": f"{d}/mid3.qcow2", "base": f"{d}/nope"}),
            ("block-commit", {"device": "d2", "top": f"{d}/mid3.qcow2", "base": f"{d}/mid3.qcow2"}),
            ("block-commit", {"device": "d2", "top": f"{d}/mid3.qcow2", "speed": -1}),
            ("block-commit", {"device": "d2", "job-id": "c0", "top": f"{d}/mid3.qcow2",
                              "base": f"{d}/base3.qcow2"}),
        ]:
            await ex(cmd, args)
        gone.append(await wait_jobs_gone(qmp))
        # Active commits: d3's whole chain into its base, completed once ready; d4's top into
        # its middle image, cancelled once ready.
        for cmd, args in [
            ("block-commit", {"device": "d3", "job-id": "a0", "backing-file": "x"}),
            ("block-commit", {"device": "d3", "job-id": "a0", "top": f"{d}/top4.qcow2",
                              "base": f"{d}/top4.qcow2"}),
            ("block-commit", {"device": "d3", "job-id": "a0"}),
            ("block-commit", {"device": "d3", "job-id": "a1"}),
            ("block-stream", {"device": "d3", "job-id": "a1"}),
        ]:
            await ex(cmd, args)
        ready = [await wait_status(qmp, "a0", "ready")]
        await ex("block-job-complete", {"device": "a0"})
        gone.append(await wait_jobs_gone(qmp))
        await ex("block-commit", {"device": "d4", "job-id": "a1", "top": f"{d}/top5.qcow2",
                                  "base": f"{d}/mid5.qcow2"})
        ready.append(await wait_status(qmp, "a1", "ready"))
        for cmd, args in [
            ("block-job-pause", {"device": "a1"}),
            ("block-job-cancel", {"device": "a1"}),
            ("block-job-resume", {"device": "a1"}),
            ("block-job-cancel", {"device": "a1"}),
        ]:
            await ex(cmd, args)
        gone.append(await wait_jobs_gone(qmp))
        # Node names for base and top: d4's chain (top5 <- mid5 <- base5), d0's base as a node
        # of another disk, a protocol node.
        nodes = {(n["file"].replace(d, "DIR"), n["drv"]): n["node-name"]
                 for n in await qmp.execute("query-named-block-nodes")}
        labels.update({name: f"<{drv} {f}>" for (f, drv), name in nodes.items()})
        top5, mid5, base5 = (nodes[(f"DIR/{f}.qcow2", "qcow2")] for f in ("top5", "mid5", "base5"))
        other, proto = nodes[("DIR/base.qcow2", "qcow2")], nodes[("DIR/mid5.qcow2", "file")]
        for cmd, args in [
            ("block-stream", {"device": "d4", "base-node": "nope"}),
            ("block-stream", {"device": "d4", "base-node": top5}),
            ("block-stream", {"device": "d4", "base-node": other}),
            ("block-stream", {"device": "d4", "base-node": proto}),
            ("block-commit", {"device": "d4", "top": f"{d}/mid5.qcow2", "top-node": mid5}),
            ("block-commit", {"device": "d4", "base": f"{d}/base5.qcow2", "base-node": base5}),
            ("block-commit", {"device": "d4", "top-node": "nope"}),
            ("block-commit", {"device": "d4", "base-node": "nope"}),
            ("block-commit", {"device": "d4", "top-node": other}),
            ("block-commit", {"device": "d4", "base-node": other}),
            ("block-commit", {"device": "d4", "top-node": mid5, "base-node": mid5}),
            ("block-commit", {"device": "d4", "top-node": base5, "base-node": mid5}),
            ("block-commit", {"device": "d4", "top-node": proto}),
            ("block-stream", {"device": "d0", "job-id": "s0", "base-node": other}),
        ]:
            await ex(cmd, args)
        gone.append(await wait_jobs_gone(qmp))
        await ex("block-commit", {"device": "d4", "job-id": "c5", "top-node": mid5,
                                  "base-node": base5})
        gone.append(await wait_jobs_gone(qmp))
        # Jobs that wait: for job-dismiss in `concluded`, for job-finalize in `pending`, and one
        # cancelled in `pending`.
        await ex("block-stream", {"device": "d1", "job-id": "w0", "auto-dismiss": False})
        waiting = [await wait_status(qmp, "w0", "concluded")]
        for cmd, args in [
            ("block-stream", {"device": "d1", "job-id": "w1"}),
            ("job-finalize", {"id": "w0"}),
            ("job-dismiss", {"id": "nope"}),
            ("block-job-dismiss", {"id": "nope"}),
            ("block-job-dismiss", {"id": "w0"}),
            ("block-stream", {"device": "d2", "job-id": "w2", "auto-finalize": False}),
        ]:
            await ex(cmd, args)
        waiting.append(await wait_status(qmp, "w2", "pending"))
        for cmd, args in [
            ("block-job-dismiss", {"id": "w2"}),
            ("block-job-finalize", {"id": "w2"}),
            ("block-stream", {"device": "d0", "job-id": "w3", "auto-finalize": False,
                              "auto-dismiss": False}),
        ]:
            await ex(cmd, args)
        waiting.append(await wait_status(qmp, "w3", "pending"))
        await ex("block-job-cancel", {"device": "w3"})
        waiting.append(await wait_status(qmp, "w3", "concluded"))
        await ex("job-dismiss", {"id": "w3"})
        gone.append(await wait_jobs_gone(qmp))
        await asyncio.sleep(0.3)
        events = []
        while not listener.empty():
            e = listener._queue.get_nowait()  # qemu.qmp's listener has no non-blocking get
            if e["event"] in JOB_EVENTS:
                events.append((e["event"], e.get("data")))
    _, chain = await snapshot_side_chain(qmp, d)
    return replies, paused, gone, collapse_wakeups(events), chain, ready, waiting


def chain_sides(sock):
    """The directory of `sock` and its two sides (ours, QEMU's), each holding the chains."""
    d = os.path.dirname(sock)
    ours, theirs = os.path.join(d, "vmm"), os.path.join(d, "qemu")
    for s in (ours, theirs):
        os.makedirs(s, exist_ok=True)
        make_chains(s)
    return d, ours, theirs


def two_disks(s):
    """The flags of the iothread and of the first two chains' disks (the first on the iothread)."""
    return ["-object", "iothread,id=io0",
            "-drive", f"file={s}/top.qcow2,format=qcow2,if=none,id=d0",
            "-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0",
            "-drive", f"file={s}/top2.qcow2,format=qcow2,if=none,id=d1",
            "-device", "virtio-blk-device,drive=d1,id=vd1"]


def same_chains(ours, theirs, tops):
    """Checks that each of `tops` has the same backing chain and contents on both sides, and
    that each layer of ours checks clean."""
    for top in tops:
        a, b = image_chain(ours, top), image_chain(theirs, top)
        check(a == b, f"qemu-img info --backing-chain {top}: {a} (QEMU: {b})")
        same = subprocess.run(["qemu-img", "compare", f"{ours}/{top}", f"{theirs}/{top}"],
                              capture_output=True)
        check(same.returncode == 0, f"qemu-img compare {top}: {same.stdout.decode().strip()}")
        for layer in a:
            path = layer[0].replace("DIR", ours)
            check(subprocess.run(["qemu-img", "check", "-q", path]).returncode == 0,
                  f"{layer[0]} checks clean")


async def jobs(vmm_path, kernel, sock):
    d, ours, theirs = chain_sides(sock)

    def flags(s):
        return two_disks(s) + [
            "-drive", f"file={s}/top3.qcow2,format=qcow2,if=none,id=d2",
            "-device", "virtio-blk-device,drive=d2,id=vd2,iothread=io0",
            "-drive", f"file={s}/top4.qcow2,format=qcow2,if=none,id=d3",
            "-device", "virtio-blk-device,drive=d3,id=vd3,iothread=io0",
            "-drive", f"file={s}/top5.qcow2,format=qcow2,if=none,id=d4",
            "-device", "virtio-blk-device,drive=d4,id=vd4"]
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True, extra=flags(ours))
    qemu, qqmp = await start_qemu(d, flags(theirs), "qemu-jobs-test")
    await qmp.execute("cont")
    mine = await side(qmp, ours)
    qemus = await side(qqmp, theirs)
    for ours_r, qemu_r in zip(mine[0], qemus[0]):
        check(ours_r == qemu_r, f"reply {ours_r} (QEMU: {qemu_r})")
    check(len(mine[0]) == len(qemus[0]), "as many replies")
    check(mine[1] is not None and mine[1] == qemus[1],
          f"query-block-jobs while paused {mine[1]} (QEMU: {qemus[1]})")
    check(mine[5] == qemus[5] and None not in mine[5],
          f"query-block-jobs once ready {mine[5]} (QEMU: {qemus[5]})")
    check(mine[6] == qemus[6] and None not in mine[6],
          f"query-block-jobs of waiting jobs {mine[6]} (QEMU: {qemus[6]})")
    check(mine[2] == qemus[2] == [True] * 10, f"every job ended {mine[2]} (QEMU: {qemus[2]})")
    for i, (ours_e, qemu_e) in enumerate(zip(mine[3], qemus[3])):
        check(ours_e == qemu_e, f"event {i} {ours_e} (QEMU: {qemu_e})")
    check(len(mine[3]) == len(qemus[3]), f"as many job events ({len(mine[3])})")
    check(mine[4] == qemus[4], f"query-block's chains {mine[4]} (QEMU: {qemus[4]})")
    await quit_both(vmm, qmp, qemu, qqmp)
    same_chains(ours, theirs, ("top.qcow2", "top2.qcow2", "top3.qcow2", "top4.qcow2",
                               "base4.qcow2", "top5.qcow2", "mid5.qcow2"))


def limit_writes(pid, path):
    """Files `pid` writes may not grow past `path`'s size (None: no limit)."""
    size = os.path.getsize(path) if path else resource.RLIM_INFINITY
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


async def onerror_side(qmp, pid, d):
    """The failing jobs on images in directory `d`; returns what to compare."""
    out = []

    async def ex(cmd, args):
        try:
            out.append((cmd, "return", await qmp.execute(cmd, args)))
        except Exception as e:  # qemu.qmp's ExecuteError: the reply's class and desc.
            out.append((cmd, e.error.error.class_, e.error.error.desc))

    listener = EventListener()
    with qmp.listen(listener):
        limit_writes(pid, f"{d}/base.qcow2")
        await ex("block-commit", {"device": "d0", "job-id": "c0", "top": f"{d}/mid.qcow2",
                                  "on-error": "stop"})
        paused = await wait_status(qmp, "c0", "paused")
        out.append(("paused", paused))
        await ex("block-job-cancel", {"device": "c0"})
        limit_writes(pid, None)
        await ex("block-job-resume", {"device": "c0"})
        out.append(("gone", await wait_jobs_gone(qmp)))
        limit_writes(pid, f"{d}/top2.qcow2")
        await ex("block-stream", {"device": "d1", "job-id": "s0", "on-error": "enospc"})
        out.append(("gone", await wait_jobs_gone(qmp)))
        # on-error=ignore: a commit retries its chunk (BLOCK_JOB_ERROR each time, as often as
        # each retries: repeats are collapsed) until the limit goes, then ends well.
        errors = EventListener(("BLOCK_JOB_ERROR",))
        with qmp.listen(errors):
            limit_writes(pid, f"{d}/base2.qcow2")
            await ex("block-commit", {"device": "d1", "job-id": "c1", "top": f"{d}/mid2.qcow2",
                                      "on-error": "ignore"})
            first = await asyncio.wait_for(errors.get(), TIMEOUT)
            out.append(("first error", first["data"]))
        limit_writes(pid, None)
        out.append(("gone", await wait_jobs_gone(qmp)))
        # A stream with on-error=ignore skips each chunk it cannot write and fails at its end;
        # on-error=auto is enospc for a job: EFBIG reports.
        limit_writes(pid, f"{d}/top.qcow2")
        for job, on_error in (("s1", "ignore"), ("s2", "auto")):
            await ex("block-stream", {"device": "d0", "job-id": job, "on-error": on_error})
            out.append(("gone", await wait_jobs_gone(qmp)))
        # An active commit (QEMU's mirror): on-error=auto reports EFBIG and ends (QEMU's copies
        # in flight beside the failing one may land, ours go one at a time: the progress
        # differs); with on-error=ignore it retries until the limit is lifted, then is ready and
        # completes.
        limit_writes(pid, f"{d}/base3.qcow2")
        await ex("block-commit", {"device": "d2", "job-id": "a0", "on-error": "auto"})
        out.append(("gone", await wait_jobs_gone(qmp)))
        errors = EventListener(("BLOCK_JOB_ERROR",))
        with qmp.listen(errors):
            await ex("block-commit", {"device": "d2", "job-id": "a1", "on-error": "ignore"})
            first = await asyncio.wait_for(errors.get(), TIMEOUT)
            out.append(("first error", first["data"]))
        limit_writes(pid, None)
        out.append(("ready", await wait_status(qmp, "a1", "ready") is not None))
        await ex("block-job-complete", {"device": "a1"})
        out.append(("gone", await wait_jobs_gone(qmp)))
        await asyncio.sleep(0.3)
        while not listener.empty():
            e = listener._queue.get_nowait()  # qemu.qmp's listener has no non-blocking get
            if e["event"] in JOB_EVENTS:
                data = dict(e.get("data"))
                if "error" in data:
                    data["error"] = "(text)"
                if data.get("device") == "a0" and "offset" in data:
                    # How far a0 got: what QEMU's copies in flight beside the failing one did.
                    data["offset"] = "(progress)"
                out.append((e["event"], data))
    _, chain = await snapshot_side_chain(qmp, d)
    out.append(("chain", chain))
    return collapse_retries(collapse_wakeups(out), ("c1", "a0", "a1"))


async def onerror(vmm_path, kernel, sock):
    d, ours, theirs = chain_sides(sock)
    def flags(s):
        return two_disks(s) + ["-drive", f"file={s}/top3.qcow2,format=qcow2,if=none,id=d2",
                               "-device", "virtio-blk-device,drive=d2,id=vd2,iothread=io0"]
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True, extra=flags(ours))
    qemu, qqmp = await start_qemu(d, flags(theirs), "qemu-onerror-test")
    await qmp.execute("cont")
    mine = await onerror_side(qmp, vmm.proc.pid, ours)
    qemus = await onerror_side(qqmp, qemu.pid, theirs)
    for i, (a, b) in enumerate(zip(mine, qemus)):
        check(a == b, f"{i}: {a} (QEMU: {b})".replace(ours, "DIR").replace(theirs, "DIR"))
    check(len(mine) == len(qemus), f"as many replies and events ({len(mine)})")
    check(("BLOCK_JOB_ERROR", {"device": "c0", "operation": "write", "action": "stop"}) in mine,
          "on-error=stop raised BLOCK_JOB_ERROR")
    await quit_both(vmm, qmp, qemu, qqmp)
    same_chains(ours, theirs, ("top.qcow2", "top2.qcow2", "top3.qcow2", "base3.qcow2"))


if __name__ == "__main__":
    scenario, vmm_path, kernel, sock = sys.argv[1:5]
    if os.path.exists(sock):
        os.unlink(sock)
    asyncio.run({"jobs": jobs, "onerror": onerror}[scenario](vmm_path, kernel, sock))
