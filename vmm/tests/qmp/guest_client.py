#!/usr/bin/env python3
"""Runs the vmm binary with a QMP monitor and drives it with QEMU's own client (qemu.qmp).

Usage: guest_client.py SCENARIO VMM KERNEL SOCKET

SCENARIO "lifecycle": KERNEL writes 'x' to COM1 over and over. Started with -S: nothing runs
until cont; stop freezes the output, cont resumes it; the queries answer for a VM without
disks or iothreads; quit ends vmm with status 0 after SHUTDOWN (host-qmp-quit).
SCENARIO "poweroff": KERNEL powers off through ACPI as soon as it runs: cont, then SHUTDOWN
(guest-shutdown) and status 0.
SCENARIO "signal": KERNEL as in lifecycle; SIGTERM to vmm gives SHUTDOWN (host-signal), status 0.
SCENARIO "wait": KERNEL as in lifecycle, with wait=on: nothing runs until the client connects.
SCENARIO "snapshot": KERNEL as in lifecycle, with a qcow2 disk on an iothread and a raw disk on
the main loop; the same blockdev-snapshot-sync requests go to vmm and to QEMU 10 (microvm, the
same -drive and -device flags, on copies of the same images): the replies, query-block's chain
and qemu-img's view of the images made must match.
SCENARIO "relative": KERNEL as in lifecycle, each engine started in its own directory with a
qcow2 chain opened by a relative name in a subdirectory (chain/top.qcow2 over base.qcow2); the
same blockdev-snapshot-sync requests with relative snapshot files go to vmm and QEMU 10: the
replies, query-block's chains, the files left in chain/ and qemu-img's view of each image made
(its backing name as written, which resolves against the overlay's directory) must match.
SCENARIO "relative-jobs": as "relative", then on each engine a snapshot (chain/snap-1.qcow2),
block-stream with base-node (the base, opened as chain/base.qcow2), two more snapshots, the
block-commit of snap-1 into the base with top-node and base-node (snap-2 renamed its backing
file) and the commit of the active layer into snap-2 (block-job-complete on BLOCK_JOB_READY):
the jobs complete in both, whose headers
name the base as opened (which no longer resolves from chain/); replies, events, query-block's
chains and qemu-img's view of each image must match.
SCENARIO "resize": KERNEL as in lifecycle, with a qcow2-over-raw disk (node-name=top0) on an
iothread, a raw disk on the main loop and a read-only qcow2 disk; query-named-block-nodes (flat
or not) and the same block_resize requests (grow qcow2 and raw, past the L1 table's cluster, and
the errors) go to vmm and to QEMU 10 on copies of the same images: replies and node lists must
match (generated node names compared as QEMU's iotests filter them), and qemu-img must find the
grown images identical and clean. Shrinking, which QEMU 10 does, is refused by vmm.
Prints one line per check; exits non-zero on the first failure.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys

from qemu.qmp import EventListener, QMPClient

from checks import TIMEOUT, check


class Vmm:
    """The vmm process, its console output counted as it arrives."""

    def __init__(self, proc):
        self.proc = proc
        self.output = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        while chunk := await self.proc.stdout.read(4096):
            self.output += len(chunk)

    async def wait_output_beyond(self, count):
        for _ in range(TIMEOUT * 100):
            if self.output > count:
                return
            await asyncio.sleep(0.01)
        check(False, f"guest output grows beyond {count} bytes")

    async def exit_code(self):
        code = await asyncio.wait_for(self.proc.wait(), TIMEOUT)
        stderr = await self.proc.stderr.read()
        if stderr:
            print(f"vmm stderr: {stderr.decode(errors='replace')}")
        return code


def ignore_sigxfsz():
    """In the child before exec: a write past RLIMIT_FSIZE fails with EFBIG instead of killing
    it (an ignored signal stays ignored across exec), as the job error tests need."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


async def start(vmm, kernel, sock, paused, wait=False, extra=(), cwd=None):
    args = [vmm, "-kernel", kernel, "-m", "16", "-smp", "2",
            "-qmp", f"unix:{sock},server=on,wait={'on' if wait else 'off'}", *extra]
    if paused:
        args.append("-S")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=ignore_sigxfsz, cwd=cwd)
    if wait:
        vmm_proc = Vmm(proc)
        await asyncio.sleep(0.5)
        check(vmm_proc.output == 0 and proc.returncode is None,
              "wait=on: vmm waits for a client, the guest has not started")
    qmp = QMPClient("vmm-guest-test")
    for _ in range(TIMEOUT * 10):
        try:
            await qmp.connect(sock)
            break
        except Exception:  # The socket is not there yet, or not listening yet.
            await asyncio.sleep(0.1)
    else:
        check(False, "connect to the monitor")
    return (vmm_proc if wait else Vmm(proc)), qmp


async def event(listener, name):
    msg = await asyncio.wait_for(listener.get(), TIMEOUT)
    check(msg["event"] == name, f"event {name} ({msg['event']})")
    return msg


async def status(qmp, expected):
    got = await qmp.execute("query-status")
    check(got == expected, f"query-status {got}")


async def start_qemu(d, flags, client_name, cwd=None):
    """QEMU microvm under -S with `flags` (in directory `cwd`), its monitor at D/qemu.sock;
    returns the process and a connected client."""
    qemu_sock = os.path.join(d, "qemu.sock")
    qemu = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "microvm", "-nodefaults", "-display", "none", "-S",
        "-qmp", f"unix:{qemu_sock},server=on,wait=off", *flags,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, preexec_fn=ignore_sigxfsz, cwd=cwd)
    qqmp = QMPClient(client_name)
    for _ in range(TIMEOUT * 10):
        try:
            await qqmp.connect(qemu_sock)
            return qemu, qqmp
        except Exception:  # Not listening yet.
            await asyncio.sleep(0.1)
    check(False, "connect to QEMU's monitor")


async def lifecycle(vmm_path, kernel, sock):
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True, extra=["-name", "tiny,process=t"])
    listener = EventListener()
    with qmp.listen(listener):
        check(await qmp.execute("query-name") == {"name": "tiny"}, "query-name gives -name's")
        await status(qmp, {"running": False, "status": "prelaunch"})
        await asyncio.sleep(0.3)
        check(vmm.output == 0, "no guest output before cont under -S")
        await qmp.execute("cont")
        await event(listener, "RESUME")
        await status(qmp, {"running": True, "status": "running"})
        await vmm.wait_output_beyond(50)
        await qmp.execute("stop")
        await event(listener, "STOP")
        await status(qmp, {"running": False, "status": "paused"})
        await asyncio.sleep(0.2)  # output written before the stop may still be in the pipe
        frozen = vmm.output
        await asyncio.sleep(0.5)
        check(vmm.output == frozen, f"output frozen while paused ({frozen} -> {vmm.output})")
        await qmp.execute("cont")
        await event(listener, "RESUME")
        await vmm.wait_output_beyond(frozen + 50)
        check(await qmp.execute("query-iothreads") == [], "no iothreads")
        check(await qmp.execute("query-block") == [], "no disks")
        check(await qmp.execute("query-blockstats") == [], "no disk statistics")
        # The button is pressed (the GED's interrupt); this tiny guest has no ACPI to react.
        check(await qmp.execute("system_powerdown") == {}, "system_powerdown answered")
        await event(listener, "POWERDOWN")
        check(await qmp.execute("quit") == {}, "quit answered")
        msg = await event(listener, "SHUTDOWN")
        check(msg["data"] == {"guest": False, "reason": "host-qmp-quit"}, f"{msg['data']}")
    check(await vmm.exit_code() == 0, "vmm exits 0 after quit")
    await close(qmp)


async def poweroff(vmm_path, kernel, sock):
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True)
    listener = EventListener()
    with qmp.listen(listener):
        await status(qmp, {"running": False, "status": "prelaunch"})
        await qmp.execute("cont")
        await event(listener, "RESUME")
        msg = await event(listener, "SHUTDOWN")
        check(msg["data"] == {"guest": True, "reason": "guest-shutdown"}, f"{msg['data']}")
    check(await vmm.exit_code() == 0, "vmm exits 0 after the guest powers off")
    await close(qmp)


async def on_signal(vmm_path, kernel, sock):
    vmm, qmp = await start(vmm_path, kernel, sock, paused=False)
    listener = EventListener()
    with qmp.listen(listener):
        await vmm.wait_output_beyond(0)
        vmm.proc.send_signal(signal.SIGTERM)
        msg = await event(listener, "SHUTDOWN")
        check(msg["data"] == {"guest": False, "reason": "host-signal"}, f"{msg['data']}")
    check(await vmm.exit_code() == 0, "vmm exits 0 on SIGTERM")
    await close(qmp)


async def wait_on(vmm_path, kernel, sock):
    vmm, qmp = await start(vmm_path, kernel, sock, paused=False, wait=True)
    await status(qmp, {"running": True, "status": "running"})
    await vmm.wait_output_beyond(0)
    check(await qmp.execute("quit") == {}, "quit answered")
    check(await vmm.exit_code() == 0, "vmm exits 0 after quit")
    await close(qmp)


async def disks(vmm_path, kernel, sock):
    """Two disks, a qcow2 overlay on a raw base on iothread io0 (given in QEMU's JSON form) and a
    read-only raw disk on the main loop: what query-iothreads, query-block and query-blockstats
    say, the iothread's polling settings changed by qom-set while it runs, and a clean quit that
    releases the images."""
    d = os.path.dirname(sock)
    base, top, ro = (os.path.join(d, n) for n in ("base.raw", "top.qcow2", "ro.raw"))
    for cmd in (["qemu-img", "create", "-q", "-f", "raw", base, "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top],
                ["qemu-img", "create", "-q", "-f", "raw", ro, "2M"]):
        subprocess.run(cmd, check=True)
    extra = ["-object", '{"qom-type": "iothread", "id": "io0", "poll-grow": 4}',
             "-drive", f"file={top},format=qcow2,if=none,id=d0,cache=none,stats-intervals=60",
             "-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0",
             "-drive", f"file={ro},format=raw,if=none,id=d1,readonly=on",
             "-device", "virtio-blk-device,drive=d1"]
    vmm, qmp = await start(vmm_path, kernel, sock, paused=False, extra=extra)
    threads = await qmp.execute("query-iothreads")
    check([t["id"] for t in threads] == ["io0"], f"iothreads {threads}")
    tid = threads[0]["thread-id"]
    with open(f"/proc/{vmm.proc.pid}/task/{tid}/comm") as comm:
        check(comm.read().strip() == "io0", f"thread {tid} is named io0")
    poll = {k: threads[0][k] for k in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch")}
    check(poll == {"poll-max-ns": 32768, "poll-grow": 4, "poll-shrink": 0, "aio-max-batch": 0},
          f"polling settings {poll}")
    await qmp.execute("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 0})
    await qmp.execute("qom-set", {"path": "/objects/io0", "property": "poll-shrink", "value": 2})
    got = await qmp.execute("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"})
    check(got == 0, f"qom-get after qom-set: {got}")
    threads = await qmp.execute("query-iothreads")
    check((threads[0]["poll-max-ns"], threads[0]["poll-shrink"]) == (0, 2),
          f"query-iothreads after qom-set: {threads}")
    block = await qmp.execute("query-block")
    check([b["device"] for b in block] == ["d0", "d1"], f"devices {block}")
    d0, d1 = block
    check(d0["qdev"] == "vd0" and not d0["inserted"]["ro"], f"d0 {d0}")
    check(d0["inserted"]["image"]["format"] == "qcow2", "d0 is qcow2")
    check(d0["inserted"]["image"]["backing-image"]["format"] == "raw", "d0's backing is raw")
    check(d0["inserted"]["cache"]["direct"], "cache=none is O_DIRECT")
    check(d1["inserted"]["ro"], "d1 is read-only")
    stats = await qmp.execute("query-blockstats")
    check([s["device"] for s in stats] == ["d0", "d1"], "statistics of both disks")
    check(stats[0]["stats"]["timed_stats"][0]["interval_length"] == 60, "stats-intervals=60")
    await qmp.execute("block-latency-histogram-set", {"id": "vd0", "boundaries": [1000, 100000]})
    check(await qmp.execute("quit") == {}, "quit answered")
    check(await vmm.exit_code() == 0, "vmm exits 0 after quit")
    await close(qmp)
    # The images were closed and unlocked: qemu-img may open the overlay for writing.
    check(subprocess.run(["qemu-img", "check", "-q", top]).returncode == 0, "overlay checks clean")


async def snapshot_side(qmp, d):
    """The snapshot requests, on images in directory `d`; returns what to compare, `d` named
    DIR."""
    def file(name):
        return os.path.join(d, name)

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", file("exists.qcow2"), "1M"],
                   check=True)
    requests = [
        {"device": "nope", "snapshot-file": file("x.qcow2")},
        {"device": "d0", "snapshot-file": file("x.raw"), "format": "raw"},
        {"device": "d0", "snapshot-file": file("missing.qcow2"), "mode": "existing"},
        {"device": "d0", "snapshot-file": file("s1.qcow2")},
        # A file that exists is overwritten in absolute-paths mode.
        {"device": "d0", "snapshot-file": file("exists.qcow2")},
        {"node-name": "nonode", "snapshot-file": file("s3.qcow2")},
        {"snapshot-file": file("s3.qcow2")},
        {"device": "d0", "snapshot-file": file("s1.qcow2")},  # in the chain: locked
        {"device": "d1", "snapshot-file": file("r1.qcow2"), "snapshot-node-name": "r1"},
        {"device": "d0", "snapshot-file": file("s4.qcow2"), "mode": "bogus"},
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", file("exists.qcow2"), "-F", "qcow2",
         file("e1.qcow2"), "4M"],
        {"device": "d0", "snapshot-file": file("e1.qcow2"), "mode": "existing"},
    ]
    return await snapshot_requests(qmp, d, requests)


async def snapshot_requests(qmp, d, requests):
    """Sends each of `requests` as blockdev-snapshot-sync, or runs it where it is a command (a
    list: an image the user makes between two requests); returns the replies and query-block's
    chains after them, `d` named DIR."""
    replies = []
    for req in requests:
        if isinstance(req, list):
            subprocess.run(req, check=True)
            continue
        try:
            replies.append(("return", await qmp.execute("blockdev-snapshot-sync", req)))
        except Exception as e:  # qemu.qmp's ExecuteError: the reply's class and desc.
            err = e.error.error
            replies.append((err.class_, err.desc.replace(d, "DIR")))
    return replies, (await snapshot_side_chain(qmp, d))[1]


async def snapshot_side_chain(qmp, d):
    """query-block's chains, `d` named DIR."""
    chain = []
    for dev in await qmp.execute("query-block"):
        ins = dev["inserted"]
        images, image = [], ins["image"]
        while image:
            images.append((image["filename"].replace(d, "DIR"), image["format"],
                           image["virtual-size"], image.get("backing-filename", "").replace(d, "DIR")))
            image = image.get("backing-image")
        chain.append((dev["device"], ins["file"].replace(d, "DIR"),
                      ins.get("backing_file", "").replace(d, "DIR"), ins["backing_file_depth"],
                      ins["ro"], images))
    return None, chain


def image_chain(d, name):
    """qemu-img's view of the chain under `name`: each layer's name, format, size and backing."""
    out = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain",
                          os.path.join(d, name)], check=True, capture_output=True).stdout
    import json
    return [(i["filename"].replace(d, "DIR"), i["format"], i["virtual-size"],
             i.get("backing-filename", "").replace(d, "DIR"),
             i.get("backing-filename-format", "")) for i in json.loads(out)]


async def snapshot(vmm_path, kernel, sock):
    d = os.path.dirname(sock)
    ours, theirs = os.path.join(d, "vmm"), os.path.join(d, "qemu")
    for side in (ours, theirs):
        os.makedirs(side, exist_ok=True)
    def flags(side):
        return ["-object", "iothread,id=io0",
                "-drive", f"file={side}/base.qcow2,format=qcow2,if=none,id=d0",
                "-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0",
                "-drive", f"file={side}/base.raw,format=raw,if=none,id=d1",
                "-device", "virtio-blk-device,drive=d1,id=vd1"]
    # The images must exist before either starts: each side makes its own, then starts.
    results = {}
    for side in (ours, theirs):
        for cmd in (["qemu-img", "create", "-q", "-f", "qcow2", f"{side}/base.qcow2", "4M"],
                    ["qemu-img", "create", "-q", "-f", "raw", f"{side}/base.raw", "2M"]):
            subprocess.run(cmd, check=True)
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True, extra=flags(ours))
    qemu, qqmp = await start_qemu(d, flags(theirs), "qemu-snapshot-test")
    # The guest runs on vmm while its disks are switched; QEMU stays in prelaunch (no guest).
    await qmp.execute("cont")
    results[ours] = await snapshot_side(qmp, ours)
    results[theirs] = await snapshot_side(qqmp, theirs)
    (our_replies, our_chain), (qemu_replies, qemu_chain) = results[ours], results[theirs]
    for ours_r, qemu_r in zip(our_replies, qemu_replies):
        check(ours_r == qemu_r, f"reply {ours_r} (QEMU: {qemu_r})")
    check(len(our_replies) == len(qemu_replies), "as many replies")
    check(our_chain == qemu_chain, f"query-block's chains {our_chain} (QEMU: {qemu_chain})")
    # A deliberate difference: an existing overlay whose backing file is not the disk's top is
    # refused (QEMU takes it and runs a chain its header does not name), and the disk stays.
    for cmd in (["qemu-img", "create", "-q", "-f", "qcow2", f"{ours}/other.qcow2", "4M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{ours}/other.qcow2", "-F",
                 "qcow2", f"{ours}/wrong.qcow2"]):
        subprocess.run(cmd, check=True)
    try:
        await qmp.execute("blockdev-snapshot-sync", {"device": "d0", "mode": "existing",
                                                     "snapshot-file": f"{ours}/wrong.qcow2"})
        check(False, "an overlay of another image is refused")
    except Exception as e:
        check(e.error.error.class_ == "GenericError" and "not an overlay" in e.error.error.desc,
              f"an overlay of another image is refused: {e.error.error.desc}")
    _, chain = await snapshot_side_chain(qmp, ours)
    check(chain == our_chain, "the disk keeps its chain")
    await quit_both(vmm, qmp, qemu, qqmp)
    for top in ("e1.qcow2", "r1.qcow2"):
        mine, theirs_chain = image_chain(ours, top), image_chain(theirs, top)
        check(mine == theirs_chain, f"qemu-img info --backing-chain {top}: {mine} "
              f"(QEMU: {theirs_chain})")
        for layer in mine:
            if layer[1] == "qcow2":
                path = layer[0].replace("DIR", ours)
                check(subprocess.run(["qemu-img", "check", "-q", path]).returncode == 0,
                      f"{layer[0]} checks clean")


async def relative_side(qmp, d):
    """The requests of the relative scenario, the engine's working directory `d`; returns what to
    compare, `d` named DIR."""
    requests = [
        {"device": "d0", "snapshot-file": "chain/snap-1.qcow2", "format": "qcow2"},
        # Deeper down (vmm's sandbox takes overlays beneath the chain's directories only).
        {"device": "d0", "snapshot-file": "chain/more/snap-2.qcow2"},
        {"device": "d0", "snapshot-file": "chain/missing.qcow2", "mode": "existing"},
        # Made by the user, naming its backing file relative to its own directory.
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "snap-2.qcow2", "-F", "qcow2", "-u",
         os.path.join(d, "chain/more/snap-3.qcow2"), "4M"],
        {"device": "d0", "snapshot-file": "chain/more/snap-3.qcow2", "mode": "existing"},
    ]
    return await snapshot_requests(qmp, d, requests)


def image_info(d, name):
    """qemu-img's view of image `name` alone and of its chain, in directory `d` (named DIR): the
    backing name as written, and whether the chain opens (the message if not)."""
    alone = subprocess.run(["qemu-img", "info", "--output=json", "-U", name], cwd=d, check=True,
                           capture_output=True).stdout
    import json
    i = json.loads(alone)
    chain = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", name],
                           cwd=d, capture_output=True, text=True)
    if chain.returncode == 0:
        opened = [(c["filename"], c.get("backing-filename", "")) for c in json.loads(chain.stdout)]
    else:
        opened = chain.stderr.replace(d, "DIR").strip()
    return (i["filename"], i["virtual-size"], i.get("backing-filename", ""),
            i.get("backing-filename-format", ""), opened)


def plain_names(value):
    """`value` (nested tuples and lists of strings) with each json: pseudo-filename replaced by
    the file name it describes."""
    import json
    if isinstance(value, (list, tuple)):
        return type(value)(plain_names(v) for v in value)
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[len("json:"):])["file"]["filename"]
    return value


async def start_in_chain_dirs(vmm_path, kernel, sock, name, subdir, cmds):
    """Starts vmm and QEMU, each in a directory of its own (`vmm/` and `qemu/` beside `sock`)
    holding `subdir` and the images `cmds` made there, with chain/top.qcow2 as an iothread's
    disk; vmm runs. Returns (ours, theirs, vmm, its QMP, qemu, its QMP)."""
    d = os.path.dirname(sock)
    ours, theirs = os.path.join(d, "vmm"), os.path.join(d, "qemu")
    flags = ["-object", "iothread,id=io0",
             "-drive", "file=chain/top.qcow2,format=qcow2,if=none,id=d0",
             "-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0"]
    for side in (ours, theirs):
        os.makedirs(os.path.join(side, subdir), exist_ok=True)
        for cmd in cmds:
            subprocess.run(cmd, check=True, cwd=side, stdout=subprocess.DEVNULL)
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True, extra=flags, cwd=ours)
    qemu, qqmp = await start_qemu(d, flags, name, cwd=theirs)
    await qmp.execute("cont")
    return ours, theirs, vmm, qmp, qemu, qqmp


async def quit_both(vmm, qmp, qemu, qqmp):
    """Quits ours (checking it exits 0) and QEMU, and closes both monitors."""
    for q in (qmp, qqmp):
        await q.execute("quit")
    check(await vmm.exit_code() == 0, "vmm exits 0 after quit")
    await asyncio.wait_for(qemu.wait(), TIMEOUT)
    for q in (qmp, qqmp):
        await close(q)


async def quit_both_and_compare_files(vmm, qmp, qemu, qqmp, ours, theirs):
    """Quits both engines (vmm exits 0) and checks each left the same files in chain/."""
    await quit_both(vmm, qmp, qemu, qqmp)
    files = [sorted(os.listdir(os.path.join(side, "chain"))) for side in (ours, theirs)]
    check(files[0] == files[1], f"files left in chain/: {files[0]} (QEMU: {files[1]})")


async def relative(vmm_path, kernel, sock):
    import json
    ours, theirs, vmm, qmp, qemu, qqmp = await start_in_chain_dirs(
        vmm_path, kernel, sock, "qemu-relative-test", "chain/more",
        (["qemu-img", "create", "-q", "-f", "qcow2", "chain/base.qcow2", "4M"],
         ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
          "chain/top.qcow2"]))
    our_replies, our_chain = await relative_side(qmp, ours)
    qemu_replies, qemu_chain = await relative_side(qqmp, theirs)
    for ours_r, qemu_r in zip(our_replies, qemu_replies):
        check(ours_r == qemu_r, f"reply {ours_r} (QEMU: {qemu_r})")
    check(len(our_replies) == len(qemu_replies), "as many replies")
    # A deliberate difference: QEMU names the overlay attached in existing mode by a json:
    # description of the options it opened it with; vmm by its file, as every other image.
    qemu_chain = plain_names(qemu_chain)
    check(our_chain == qemu_chain, f"query-block's chains {our_chain} (QEMU: {qemu_chain})")
    await quit_both_and_compare_files(vmm, qmp, qemu, qqmp, ours, theirs)
    for name in ("chain/snap-1.qcow2", "chain/more/snap-2.qcow2", "chain/more/snap-3.qcow2"):
        mine, qemu_info = image_info(ours, name), image_info(theirs, name)
        check(mine == qemu_info, f"qemu-img info {name}: {mine} (QEMU: {qemu_info})")
        # Checked without its backing chain, which no longer opens by the name written.
        alone = json.dumps({"driver": "qcow2", "backing": None,
                            "file": {"driver": "file", "filename": name}})
        check(subprocess.run(["qemu-img", "check", "-q", f"json:{alone}"],
                             cwd=ours).returncode == 0, f"{name} checks clean")


async def relative_jobs_side(qmp, d):
    """The requests of the relative-jobs scenario, the engine's working directory `d`; returns
    the replies and events (each job's, to its dismissal) and query-block's chains, `d` named
    DIR."""
    nodes = await qmp.execute("query-named-block-nodes")
    base = [n["node-name"] for n in nodes
            if n["file"] == "chain/base.qcow2" and n["drv"] == "qcow2"]
    check(len(base) == 1, f"one node for chain/base.qcow2 ({base})")
    replies, events = [], []
    listener = EventListener()
    with qmp.listen(listener):
        for cmd, args in [
            ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "chain/snap-1.qcow2",
                                        "snapshot-node-name": "snap1", "format": "qcow2"}),
            ("block-stream", {"device": "d0", "job-id": "s0", "base-node": base[0]}),
            ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "chain/snap-2.qcow2",
                                        "snapshot-node-name": "snap2", "format": "qcow2"}),
            ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "chain/snap-3.qcow2",
                                        "snapshot-node-name": "snap3", "format": "qcow2"}),
            # An intermediate image below an intermediate image (snap-2 gets the new name).
            ("block-commit", {"device": "d0", "job-id": "c0", "top-node": "snap1",
                              "base-node": base[0]}),
            # The active layer, into snap-2 (whose header names the base as opened).
            ("block-commit", {"device": "d0", "job-id": "a0", "base-node": "snap2"}),
        ]:
            try:
                replies.append((cmd, "return", await qmp.execute(cmd, args)))
            except Exception as e:  # qemu.qmp's ExecuteError: the reply's class and desc.
                err = e.error.error
                replies.append((cmd, err.class_, err.desc.replace(d, "DIR")))
                continue
            if cmd == "blockdev-snapshot-sync":
                continue
            # The job's events until it is dismissed (auto-dismiss).
            while True:
                msg = await asyncio.wait_for(listener.get(), TIMEOUT)
                data = {k: (v.replace(d, "DIR") if isinstance(v, str) else v)
                        for k, v in msg.get("data", {}).items()}
                events.append((msg["event"], data))
                if msg["event"] == "BLOCK_JOB_READY":
                    replies.append(("block-job-complete", "return",
                                    await qmp.execute("block-job-complete", {"device": "a0"})))
                if msg["event"] == "JOB_STATUS_CHANGE" and data["status"] == "null":
                    break
    return replies, events, (await snapshot_side_chain(qmp, d))[1]


async def relative_jobs(vmm_path, kernel, sock):
    import json
    ours, theirs, vmm, qmp, qemu, qqmp = await start_in_chain_dirs(
        vmm_path, kernel, sock, "qemu-relative-jobs-test", "chain",
        (["qemu-img", "create", "-q", "-f", "qcow2", "chain/base.qcow2", "4M"],
         ["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", "chain/base.qcow2"],
         ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
          "chain/top.qcow2"],
         ["qemu-io", "-f", "qcow2", "-c", "write -P 8 1M 1M", "chain/top.qcow2"]))
    mine = await relative_jobs_side(qmp, ours)
    qemu_side = await relative_jobs_side(qqmp, theirs)
    for what, a, b in zip(("replies", "events", "query-block's chains"), mine, qemu_side):
        check(a == b, f"{what} {a} (QEMU: {b})")
    await quit_both_and_compare_files(vmm, qmp, qemu, qqmp, ours, theirs)
    for name in ("chain/base.qcow2", "chain/top.qcow2", "chain/snap-1.qcow2",
                 "chain/snap-2.qcow2", "chain/snap-3.qcow2"):
        a, b = image_info(ours, name), image_info(theirs, name)
        check(a == b, f"qemu-img info {name}: {a} (QEMU: {b})")
    # What each engine left, read as the disk had it (the headers' names no longer resolve
    # from chain/): snap-2 over the base, the same data.
    for side in (ours, theirs):
        over = json.dumps({"driver": "qcow2", "file": {"driver": "file",
                                                       "filename": "chain/snap-2.qcow2"},
                           "backing": {"driver": "qcow2", "file": {
                               "driver": "file", "filename": "chain/base.qcow2"}}})
        check(subprocess.run(["qemu-img", "compare", "-q", f"json:{over}", "chain/top.qcow2"],
                             cwd=side).returncode == 0,
              f"{side}: snap-2 over the base reads as the first top")


GENERATED = re.compile(r"#block[0-9]+")


def node_view(node, d):
    """A query-named-block-nodes entry as compared: every BlockDeviceInfo member, generated node
    names filtered, `d` named DIR; of `image` its chain's file names, formats and sizes (a
    protocol node's size is its file's length, which the two engines' layouts make differ)."""
    def image(i):
        if i is None:
            return None
        size = None if i["format"] == "file" else i["virtual-size"]
        return (i["filename"].replace(d, "DIR"), i["format"], size,
                image(i.get("backing-image")))
    view = {k: v for k, v in node.items() if k != "image"}
    view["node-name"] = GENERATED.sub("NODE", view["node-name"])
    for k in ("file", "backing_file"):
        if k in view:
            view[k] = view[k].replace(d, "DIR")
    view["image"] = image(node["image"])
    return view


async def resize_side(qmp, d):
    """The requests of the resize scenario on images in `d`: the node lists and each reply, `d`
    named DIR."""
    out = []
    for flat in (False, True):
        nodes = await qmp.execute("query-named-block-nodes", {"flat": flat})
        out.append([node_view(n, d) for n in nodes])
    def node(nodes, file, drv):
        return next(n["node-name"] for n in nodes if n["file"].endswith(file) and n["drv"] == drv)
    nodes = await qmp.execute("query-named-block-nodes")
    requests = [
        {"device": "d0", "size": 2 << 20},
        {"device": "d0", "size": 3000000},
        {"device": "d2", "size": 2 << 20},
        {"device": "nope", "size": 2 << 20},
        {"size": 2 << 20},
        {"node-name": "top0", "size": 4 << 20},
        {"device": "d0", "node-name": "top0", "size": 4 << 20},
        {"device": "d1", "size": 3000001},
        {"device": "d1", "size": -1},
        {"device": "d0", "size": 9223372036854775807},
        # A backing node, a qcow2 image's file node, a raw disk's file node (which grows).
        {"node-name": node(nodes, "base.raw", "raw"), "size": 4 << 20},
        {"node-name": node(nodes, "top.qcow2", "file"), "size": 4 << 20},
        {"node-name": node(nodes, "r.raw", "file"), "size": 4 << 20},
        # 6 TiB: the L1 table (12288 entries) outgrows its 64 KiB cluster and moves.
        {"device": "d0", "size": 6 << 40},
        {"device": "d1", "size": 8 << 20},
    ]
    for req in requests:
        try:
            out.append(("return", await qmp.execute("block_resize", req)))
        except Exception as e:  # qemu.qmp's ExecuteError: the reply's class and desc.
            err = e.error.error
            out.append((err.class_, GENERATED.sub("NODE", err.desc.replace(d, "DIR"))))
    out.append([(b["device"], b["inserted"]["image"]["virtual-size"])
                for b in await qmp.execute("query-block")])
    nodes = await qmp.execute("query-named-block-nodes")
    out.append([node_view(n, d) for n in nodes])
    return out


async def resize(vmm_path, kernel, sock):
    d = os.path.dirname(sock)
    ours, theirs = os.path.join(d, "vmm"), os.path.join(d, "qemu")
    def flags(side):
        return ["-object", "iothread,id=io0",
                "-drive", f"file={side}/top.qcow2,format=qcow2,if=none,id=d0,node-name=top0",
                "-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0",
                "-drive", f"file={side}/r.raw,format=raw,if=none,id=d1,cache=none",
                "-device", "virtio-blk-device,drive=d1,id=vd1",
                "-drive", f"file={side}/ro.qcow2,format=qcow2,if=none,id=d2,readonly=on",
                "-device", "virtio-blk-device,drive=d2"]
    for side in (ours, theirs):
        os.makedirs(side, exist_ok=True)
        for cmd in (["qemu-img", "create", "-q", "-f", "raw", f"{side}/base.raw", "1M"],
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{side}/base.raw",
                     "-F", "raw", f"{side}/top.qcow2"],
                    ["qemu-io", "-f", "qcow2", "-c", "write -P 7 960k 64k",
                     f"{side}/top.qcow2"],
                    ["qemu-img", "create", "-q", "-f", "raw", f"{side}/r.raw", "2M"],
                    ["qemu-img", "create", "-q", "-f", "qcow2", f"{side}/ro.qcow2", "1M"]):
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True, extra=flags(ours))
    qemu, qqmp = await start_qemu(d, flags(theirs), "qemu-resize-test")
    # The guest runs on vmm while its disks grow; QEMU stays in prelaunch (no guest).
    await qmp.execute("cont")
    mine, qemus = await resize_side(qmp, ours), await resize_side(qqmp, theirs)
    check(len(mine) == len(qemus), "as many answers")
    for m, q in zip(mine, qemus):
        check(m == q, f"{m} (QEMU: {q})")
    # A deliberate difference: QEMU 10 shrinks a running disk; vmm refuses and keeps its size.
    try:
        await qmp.execute("block_resize", {"device": "d0", "size": 1 << 20})
        check(False, "shrinking is refused")
    except Exception as e:
        check(e.error.error.class_ == "GenericError"
              and e.error.error.desc.startswith("Shrinking is refused"),
              f"shrinking is refused: {e.error.error.desc}")
    block = await qmp.execute("query-block")
    check(block[0]["inserted"]["image"]["virtual-size"] == 6 << 40, "d0 kept its size")
    await quit_both(vmm, qmp, qemu, qqmp)
    for name in ("top.qcow2", "r.raw"):
        fmt = "qcow2" if name.endswith("qcow2") else "raw"
        cmp = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt,
                              f"{theirs}/{name}", f"{ours}/{name}"], capture_output=True)
        check(cmp.returncode == 0, f"qemu-img compare {name}: {cmp.stdout} {cmp.stderr}")
        sizes = [os.path.getsize(f"{side}/{name}") for side in (ours, theirs)]
        check(fmt == "qcow2" or sizes[0] == sizes[1], f"{name} lengths {sizes}")
    check(subprocess.run(["qemu-img", "check", "-q", f"{ours}/top.qcow2"]).returncode == 0,
          "the grown qcow2 image checks clean")


async def close(qmp):
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # vmm is gone, as it should be.


SCENARIOS = {"lifecycle": lifecycle, "poweroff": poweroff, "signal": on_signal, "wait": wait_on,
             "disks": disks, "snapshot": snapshot, "relative": relative,
             "relative-jobs": relative_jobs, "resize": resize}

if __name__ == "__main__":
    scenario, vmm_path, kernel, sock = sys.argv[1:5]
    if os.path.exists(sock):
        os.unlink(sock)
    asyncio.run(SCENARIOS[scenario](vmm_path, kernel, sock))
