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
Prints one line per check; exits non-zero on the first failure.
"""

import asyncio
import os
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


async def start(vmm, kernel, sock, paused, wait=False, extra=()):
    args = [vmm, "-kernel", kernel, "-m", "16", "-smp", "2",
            "-qmp", f"unix:{sock},server=on,wait={'on' if wait else 'off'}", *extra]
    if paused:
        args.append("-S")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
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


async def lifecycle(vmm_path, kernel, sock):
    vmm, qmp = await start(vmm_path, kernel, sock, paused=True)
    listener = EventListener()
    with qmp.listen(listener):
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
    """Two disks, a qcow2 overlay on a raw base on iothread io0 and a read-only raw disk on the
    main loop: what query-iothreads, query-block and query-blockstats say, and a clean quit that
    releases the images."""
    d = os.path.dirname(sock)
    base, top, ro = (os.path.join(d, n) for n in ("base.raw", "top.qcow2", "ro.raw"))
    for cmd in (["qemu-img", "create", "-q", "-f", "raw", base, "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top],
                ["qemu-img", "create", "-q", "-f", "raw", ro, "2M"]):
        subprocess.run(cmd, check=True)
    extra = ["-object", "iothread,id=io0",
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


async def close(qmp):
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # vmm is gone, as it should be.


SCENARIOS = {"lifecycle": lifecycle, "poweroff": poweroff, "signal": on_signal, "wait": wait_on,
             "disks": disks}

if __name__ == "__main__":
    scenario, vmm_path, kernel, sock = sys.argv[1:5]
    if os.path.exists(sock):
        os.unlink(sock)
    asyncio.run(SCENARIOS[scenario](vmm_path, kernel, sock))
