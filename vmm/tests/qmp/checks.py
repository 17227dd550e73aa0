"""What the monitor's Python tests share: the check that prints and stops, and event waits.

Imported by the scripts beside it (Python puts a script's folder on its path).
"""

import asyncio
import sys

TIMEOUT = 30


def check(cond, what):
    """Prints `ok: what`, or `FAIL: what` on stderr and exits 1."""
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def next_event(listener, name):
    """The next event from a qemu.qmp EventListener, which must be `name` with QEMU's timestamp."""
    event = await asyncio.wait_for(listener.get(), TIMEOUT)
    check(event["event"] == name, f"event {name} received ({event['event']})")
    ts = event["timestamp"]
    check(isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 10**6,
          f"{name} timestamp has QEMU's shape")
    return event
