#!/usr/bin/env python3
"""Drives a QMP monitor with QEMU's own client library (qemu.qmp) and qmp-shell, unchanged.

Usage: qemu_client.py SOCKET

The monitor under test runs the call-recording test backend (running, one iothread io0, disks d0
(device vd0) and d1). Exits non-zero on the first mismatch, printing what differed; prints one
line per check passed.
"""

import asyncio
import os
import subprocess
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

from checks import TIMEOUT, check, next_event


async def expect_error(qmp, cmd, args, error_class, desc_start):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as err:
        check(err.error_class == error_class, f"{cmd} fails with {error_class} ({err.error_class})")
        desc = err.error.error.desc
        check(desc.startswith(desc_start), f"{cmd}: {desc!r} starts with {desc_start!r}")
        return
    check(False, f"{cmd} {args} should fail")


async def protocol_checks(qmp):
    status = await qmp.execute("query-status")
    check(status == {"running": True, "status": "running"}, f"query-status {status}")
    commands = {c["name"] for c in await qmp.execute("query-commands")}
    check({"stop", "cont", "quit", "block-latency-histogram-set"} <= commands, "query-commands")
    version = await qmp.execute("query-version")
    check(version == qmp.greeting.QMP.version, "query-version matches the greeting")
    iothreads = await qmp.execute("query-iothreads")
    check(iothreads[0]["id"] == "io0" and "thread-id" in iothreads[0], f"query-iothreads {iothreads}")
    block = await qmp.execute("query-block")
    check([b["device"] for b in block] == ["d0", "d1"], "query-block lists the drives")
    stats = await qmp.execute("query-blockstats")
    check("rd_total_time_ns" in stats[0]["stats"], "query-blockstats has QEMU's field names")
    await qmp.execute("block-latency-histogram-set", {"id": "vd0", "boundaries": [10000, 50000]})
    check(True, "block-latency-histogram-set by device id")
    await expect_error(qmp, "block-latency-histogram-set", {"id": "vd7"}, "DeviceNotFound",
                       "Device 'vd7' not found")
    await expect_error(qmp, "block-latency-histogram-set", {"id": "vd0", "boundaries": [5, 1]},
                       "GenericError", "Device 'vd0' set read boundaries fail")
    await expect_error(qmp, "no-such-command", None, "CommandNotFound", "The command no-such-command")
    await expect_error(qmp, "query-status", {"verbose": True}, "GenericError",
                       "Parameter 'verbose' is unexpected")

    listener = EventListener()
    with qmp.listen(listener):
        await qmp.execute("stop")
        await next_event(listener, "STOP")
        check((await qmp.execute("query-status"))["status"] == "paused", "paused after stop")
        await qmp.execute("cont")
        await next_event(listener, "RESUME")
        await qmp.execute("system_powerdown")
        await next_event(listener, "POWERDOWN")


def qmp_shell(sock):
    """qmp-shell, fed commands on stdin as a person would type them."""
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    script = "query-status\nblock-latency-histogram-set id=d1 boundaries-write=[1000,2000]\nbogus\n"
    out = subprocess.run([shell, sock], input=script, capture_output=True, text=True,
                         timeout=TIMEOUT, check=True).stdout
    check("Welcome to the QMP low-level shell!" in out, "qmp-shell connects")
    check('"status": "running"' in out, "qmp-shell query-status")
    check('{"return": {}}' in out, "qmp-shell block-latency-histogram-set")
    check('"class": "CommandNotFound"' in out, "qmp-shell unknown command")


async def main(sock):
    qmp = QMPClient("vmm-test")
    await asyncio.wait_for(qmp.connect(sock), TIMEOUT)
    greeting = qmp.greeting
    check(greeting is not None and "qemu" in greeting.QMP.version, "greeting understood")
    await protocol_checks(qmp)
    await qmp.disconnect()
    qmp_shell(sock)
    # Last, since the backend records it: quit answers, and SHUTDOWN comes with it.
    qmp = QMPClient("vmm-test-quit")
    await asyncio.wait_for(qmp.connect(sock), TIMEOUT)
    listener = EventListener()
    with qmp.listen(listener):
        check(await qmp.execute("quit") == {}, "quit answered")
        event = await next_event(listener, "SHUTDOWN")
        check(event["data"] == {"guest": False, "reason": "host-qmp-quit"}, "quit reason")
    await qmp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
