#!/usr/bin/env python3
"""The README's chain walk-through (ci/chain-ops) on a running vmm, so that it cannot rot.

Usage: chain_ops_client.py SCENARIO VMM KERNEL SOCKET (SCENARIO: "chain-ops")

A qcow2 chain base <- mid <- top (pattern-filled with qemu-io) on an iothread disk of a guest
that runs; ci/chain-ops, with the vmm-img built beside VMM, snapshots, streams, commits an
intermediate layer and commits the active layer into the base. It must exit 0 and print every
step; the disk must then run on the base alone, which must read as the original top did
(qemu-img compare against a raw copy taken first) and check clean; vmm exits 0 on quit.
Prints one line per check; exits non-zero on the first failure.
"""

import asyncio
import os
import subprocess
import sys

from checks import TIMEOUT, check
from guest_client import close, start


async def chain_ops(vmm_path, kernel, sock):
    d = os.path.dirname(sock)

    def run(*cmd):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    base, mid, top = (f"{d}/{n}.qcow2" for n in ("base", "mid", "top"))
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 64k", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 512k 1M", "-c", "write -z 2M 128k", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 64k", top)
    run("qemu-img", "convert", "-O", "raw", top, f"{d}/expected.raw")

    vmm, qmp = await start(vmm_path, kernel, sock, paused=False, extra=[
        "-object", "iothread,id=io0",
        "-drive", f"file={top},format=qcow2,if=none,id=d0",
        "-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0"])
    await vmm.wait_output_beyond(10)
    script = os.path.join(os.path.dirname(__file__), "../../../ci/chain-ops")
    img = os.path.join(os.path.dirname(vmm_path), "vmm-img")
    check(os.path.exists(img), f"{img} is built (cargo build -p block --bin vmm-img)")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, "--img", img, sock, "d0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    out = out.decode()
    print(out)
    check(proc.returncode == 0, f"ci/chain-ops exits 0: {err.decode()}")
    for step in ('"execute": "blockdev-snapshot-sync"', '"execute": "block-stream"',
                 '"execute": "block-commit"', '"event": "BLOCK_JOB_READY"',
                 '"execute": "block-job-complete"', "# d0: snap-1.qcow2 -> base.qcow2",
                 "# d0: snap-2.qcow2 -> base.qcow2", "# d0: base.qcow2\n"):
        check(step in out, f"ci/chain-ops printed {step!r}")
    check(out.count('"event": "BLOCK_JOB_COMPLETED"') == 3, "three jobs completed")
    check(out.count("$ vmm-img info -U --backing-chain") == 2, "the chain shown before and after")
    check(out.count("backing file: ") == 2, "before: two backing files, after: none")

    images = []
    image = (await qmp.execute("query-block"))[0]["inserted"]["image"]
    while image:
        images.append(image["filename"])
        image = image.get("backing-image")
    check(images == [base], f"the disk runs on its base alone: {images}")
    check(vmm.proc.returncode is None, "the guest still runs")
    await qmp.execute("quit")
    check(await vmm.exit_code() == 0, "vmm exits 0 after quit")
    await close(qmp)
    same = subprocess.run(["qemu-img", "compare", f"{d}/expected.raw", base], capture_output=True)
    check(same.returncode == 0, f"the base reads as the top did: {same.stdout.decode().strip()}")
    check(subprocess.run(["qemu-img", "check", "-q", base]).returncode == 0, "the base checks clean")


if __name__ == "__main__":
    scenario, vmm_path, kernel, sock = sys.argv[1:5]
    if os.path.exists(sock):
        os.unlink(sock)
    asyncio.run({"chain-ops": chain_ops}[scenario](vmm_path, kernel, sock))
