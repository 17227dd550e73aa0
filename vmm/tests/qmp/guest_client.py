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
import sys

from qemu.qmp import EventListener, QMPClient

TIMEOUT = 30


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


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


async def start(vmm, kernel, sock, paused, wait=False):
    args = [vmm, "-kernel", kernel, "-m", "16", "-smp", "2",
            "-qmp", f"unix:{sock},server=on,wait={'on' if wait else 'off'}"]
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


async def close(qmp):
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # vmm is gone, as it should be.


SCENARIOS = {"lifecycle": lifecycle, "poweroff": poweroff, "signal": on_signal, "wait": wait_on}

if __name__ == "__main__":
    scenario, vmm_path, kernel, sock = sys.argv[1:5]
    if os.path.exists(sock):
        os.unlink(sock)
    asyncio.run(SCENARIOS[scenario](vmm_path, kernel, sock))
