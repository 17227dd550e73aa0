#!/usr/bin/env python3
"""Sends the same QMP input to our monitor and to QEMU's and compares what comes back.

Usage: compare_with_qemu.py OUR_SOCKET QEMU_SOCKET

Both sides are in the prelaunch state (QEMU under -S) with one iothread io0 and a drive d0 behind
a virtio-blk device vd0. Compared: error classes always, error texts except for the deliberate
differences listed in TEXT_DIFFERENCES, the member names of every reply (ours must be QEMU's, minus
the optional members listed in OPTIONAL_MEMBERS_WE_OMIT), and the order of events and replies.
Raw sockets, so that malformed input can be sent. Exits non-zero on the first mismatch.
"""

import json
import socket
import sys

TIMEOUT = 20

# Requests whose error text differs on purpose (the class must still match).
TEXT_DIFFERENCES = {
    # serde_json's parse messages, not QEMU's lexer's.
    b'{"execute": }',
    b'}',
    b'{"execute": "x"\xff',
    # QEMU names a list element 'null' here; we name it.
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
}

# Optional members (QEMU's schema marks them so) that QEMU fills and we do not.
OPTIONAL_MEMBERS_WE_OMIT = {
    "io-status",  # no rerror/werror policies
    "node-name",  # no named block nodes
    "parent",  # no separate protocol-node statistics
    "backing",
    "format-specific",  # qcow2 header details
    "full-backing-filename",
    "idle_time_ns",  # absent until a first request, on both sides
}


def fail(what):
    print(f"FAIL: {what}", file=sys.stderr)
    sys.exit(1)


class Raw:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def recv(self):
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            fail(f"message not ended by CRLF: {line!r}")
        return json.loads(line)

    def request(self, raw):
        """Sends raw bytes; returns the messages up to and including the reply."""
        self.sock.sendall(raw)
        messages = []
        while True:
            msg = self.recv()
            messages.append(msg)
            if "return" in msg or "error" in msg:
                return messages


def keys_match(ours, theirs, where):
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            fail(f"{where}: ours is not an object: {ours!r}")
        extra = set(ours) - set(theirs)
        missing = set(theirs) - set(ours) - OPTIONAL_MEMBERS_WE_OMIT
        if extra or missing:
            fail(f"{where}: members differ: ours only {sorted(extra)}, QEMU only {sorted(missing)}")
        for key in set(ours) & set(theirs):
            keys_match(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list) and theirs and ours:
        keys_match(ours[0], theirs[0], f"{where}[0]")
    elif type(ours) is not type(theirs) and not (
        isinstance(ours, (int, float)) and isinstance(theirs, (int, float))
    ):
        fail(f"{where}: type {type(ours).__name__} vs QEMU's {type(theirs).__name__}")


def compare(ours, qemu, raw, exact_values=False):
    a, b = ours.request(raw), qemu.request(raw)
    kinds = lambda msgs: [m.get("event", "reply") for m in msgs]
    if kinds(a) != kinds(b):
        fail(f"{raw!r}: order {kinds(a)} vs QEMU's {kinds(b)}")
    for x, y in zip(a, b):
        if "event" in x:
            keys_match(x, y, f"{raw!r} event")
            if x.get("data") != y.get("data"):
                fail(f"{raw!r}: event data {x.get('data')} vs QEMU's {y.get('data')}")
        elif "error" in y:
            if "error" not in x:
                fail(f"{raw!r}: ours succeeded, QEMU's failed with {y['error']}")
            if x["error"]["class"] != y["error"]["class"]:
                fail(f"{raw!r}: class {x['error']['class']} vs QEMU's {y['error']['class']}")
            if raw not in TEXT_DIFFERENCES and x["error"]["desc"] != y["error"]["desc"]:
                fail(f"{raw!r}: {x['error']['desc']!r} vs QEMU's {y['error']['desc']!r}")
            if x.get("id") != y.get("id"):
                fail(f"{raw!r}: id {x.get('id')} vs QEMU's {y.get('id')}")
        else:
            if "return" not in x:
                fail(f"{raw!r}: ours failed with {x['error']}, QEMU's succeeded")
            keys_match(x, y, f"{raw!r}")
            if exact_values and x != y:
                fail(f"{raw!r}: {x} vs QEMU's {y}")
    print(f"ok: {raw.decode(errors='replace')}")


def main(our_path, qemu_path):
    ours, qemu = Raw(our_path), Raw(qemu_path)
    keys_match(ours.greeting, qemu.greeting, "greeting")
    before_negotiation = [
        b'{"execute": "query-status", "id": 1}',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
        b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}',
    ]
    for raw in before_negotiation:
        compare(ours, qemu, raw)
    compare(ours, qemu, b'{"execute": "qmp_capabilities", "id": "neg"}', exact_values=True)
    exact = [
        b'{"execute": "qmp_capabilities"}',
        b'{"execute": "query-status", "id": {"a": [1]}}',
        b'[1]',
        b'"str"',
        b'{"id": 1}',
        b'{"execute": 1}',
        b'{"execute": "stop", "arguments": []}',
        b'{"execute": "stop", "foo": 1, "id": 2}',
        b'{"execute": "exec-oob-please", "exec-oob": "stop"}',
        b'{"execute": "nope", "id": "x"}',
        b'{"execute": "stop", "arguments": {"x": 1}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {"id": 1}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {"id": "zz"}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries": [0]}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries": 5}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries": ["a"]}}',
        b'{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries-write": [3, 2]}}',
        b'{"execute": "query-blockstats", "arguments": {"query-nodes": 1}}',
        b'{"execute": }',
        b'}',
        b'{"execute": "x"\xff',
    ]
    for raw in exact:
        compare(ours, qemu, raw, exact_values=True)
    shapes = [
        b'{"execute": "query-iothreads"}',
        b'{"execute": "query-block"}',
        b'{"execute": "query-version"}',
    ]
    for raw in shapes:
        compare(ours, qemu, raw)
    # Histograms set on both, so both report them; our test backend reports a read histogram.
    compare(ours, qemu, b'{"execute": "block-latency-histogram-set", '
            b'"arguments": {"id": "vd0", "boundaries-read": [1000]}}', exact_values=True)
    compare(ours, qemu, b'{"execute": "query-blockstats"}')
    lifecycle = [
        b'{"execute": "stop"}',
        b'{"execute": "query-status"}',
        b'{"execute": "cont", "id": "c"}',
        b'{"execute": "query-status"}',
        b'{"execute": "cont"}',
        b'{"execute": "stop"}',
        b'{"execute": "query-status"}',
        b'{"execute": "system_powerdown"}',
        b'{"execute": "cont"}',
        b'{"execute": "quit"}',
    ]
    for raw in lifecycle:
        compare(ours, qemu, raw, exact_values=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
