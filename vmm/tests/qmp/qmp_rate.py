#!/usr/bin/env python3
"""Measures a QMP monitor: request round trips per second and their latency, and stop/cont times.

Usage: qmp_rate.py SOCKET_PATH|HOST:PORT [SECONDS] [COMMAND]

Connects with a raw socket (no client library in the way), negotiates, then for SECONDS (default
3) sends COMMAND (default query-status) and waits for each reply before the next: the tight
polling loop a monitoring tool runs, and the main-loop disturbance the latency benchmark uses.
Then times 20 stop/cont pairs (each reply waited for; the VM must be running). Prints one JSON
object. Works against this VMM and QEMU alike, so the two can be compared on the same host.
"""

import json
import socket
import statistics
import sys
import time


def connect(address):
    if ":" in address and not address.startswith("/"):
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
    return sock, sock.makefile("rb")


def reply(reader):
    """The next reply, skipping events."""
    while True:
        msg = json.loads(reader.readline())
        if "event" not in msg:
            return msg


def timed(sock, reader, request):
    start = time.perf_counter_ns()
    sock.sendall(request)
    msg = reply(reader)
    if "error" in msg:
        sys.exit(f"{request!r}: {msg['error']}")
    return time.perf_counter_ns() - start


def main():
    address = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    command = sys.argv[3] if len(sys.argv) > 3 else "query-status"
    sock, reader = connect(address)
    greeting = json.loads(reader.readline())
    timed(sock, reader, b'{"execute": "qmp_capabilities"}')
    request = json.dumps({"execute": command}).encode()
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        latencies.append(timed(sock, reader, request))
    latencies.sort()
    pauses = []
    for _ in range(20):
        pauses.append(timed(sock, reader, b'{"execute": "stop"}'))
        timed(sock, reader, b'{"execute": "cont"}')
    pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000
    print(json.dumps({
        "monitor": greeting["QMP"]["version"],
        "command": command,
        "requests_per_s": round(len(latencies) / seconds),
        "latency_us": {"p50": pct(50), "p99": pct(99), "max": latencies[-1] / 1000},
        "stop_us": {"median": statistics.median(pauses) / 1000, "max": max(pauses) / 1000},
    }))


if __name__ == "__main__":
    main()
