#!/usr/bin/env python3
"""Sends the same QMP input to our monitor and to QEMU's and compares what comes back.

Usage: compare_with_qemu.py OUR_SOCKET QEMU_SOCKET

Both sides are in the prelaunch state (QEMU under -S) with one iothread io0 and a drive d0 behind
a virtio-blk device vd0. Compared: error classes always, error texts except for the deliberate
differences listed in TEXT_DIFFERENCES, the member names of every reply (ours must be QEMU's, minus
the optional members listed in OPTIONAL_MEMBERS_WE_OMIT), and the order of events and replies.
Raw sockets, so that malformed input can be sent. Malformed and hostile byte streams (bad bytes,
duplicate keys, deep nesting) are compared whole: every reply up to a synchronising request must
be the same, in number, class and text. Exits non-zero on the first mismatch.
"""

import json
import random
import socket
import sys

# Replies echo ids nested up to QEMU's depth limit.
sys.setrecursionlimit(10000)

TIMEOUT = 20

# Requests whose error text differs on purpose (the class must still match).
TEXT_DIFFERENCES = {
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


# Byte streams compared reply for reply. Each is followed by a newline, a 0xFF (which resets both
# parsers, and is answered with an error of its own) and a synchronising request.
STREAMS = [
    b'{"execute": "query-status", "execute": "quit"}',
    b'{"execute": "query-status", "id": {"a": 1, "a": 2}}',
    b'{"a": 1, "a": }',
    b'\x80\x81\x82 garbage {"execute": "query-status", "id": 1}',
    b'{"a\x01}{}',
    b'{"execute": query-status}',
    b'{"execute": \xff {"execute": "x"}',
    b'{"execute": "x"\xff}',
    b'{"execute": "stop", "argu\xff',
    b'abc\x80def{}',
    b'"abc\xfedef"',
    b'}', b']', b'{]', b'[}', b'{"a": 1]', b'{"a": 1}}',
    b'[1 2]', b'{"a" 1}', b'{1: 2}', b'{"a": 1 "b": 2}', b'[1,]', b'{,}', b'[:]',
    b'nul', b'TRUE', b'truex', b'1a', b'%d', b'\x00abc', b'"a" "b"',
    b'01', b'-01', b'-', b'1.', b'1.e5', b'1e+', b'-0', b'0.5e-3 1E5', b'0e5', b'0E}',
    b"'single'", b"{'execute': 'query-status', 'id': 'x\"y'}",
    b'"\\uD800"', b'"\\uD800\\u0041"', b'"\\uDBFF\\uDFFF"', b'"\\uFFFE"', b'"\\u12"',
    b'"\\uzzzz"', b'"\\q"', b'"\\\x80"', b'"\\\x01"', b'"\x80"', b'"\xc3"', b'"\xc0\x80"',
    b'"\xef\xbf\xbe"', b'"\xf4\x90\x80\x80"', b'"\x80\x01"', b'"a\tb"',
    b'{"execute": "query-status", "id": "\\u0000\\u00e9\\uD83D\\uDE00"}',
    b'{"execute": "query-status", "id": [18446744073709551615, -9223372036854775809, 1.5e300]}',
    b'{"execute": "query-status", "id": ' + b'[' * 1023 + b']' * 1023 + b'}',
    b'{"execute": "query-status", "id": ' + b'[' * 1024 + b']' * 1024 + b'}',
    b'[' * 1025 + b']' * 1025,
    b'[' * 100000,
    b'{' * 2050 + b'{"execute": "query-status", "id": "after"}',
]


# Fragments for random streams: structure, strings and escapes, numbers, keywords, and bytes that
# are invalid in some places and not in others. None of them names a command that acts.
FRAGMENTS = [
    b'{', b'}', b'[', b']', b':', b',', b'"', b"'", b'\\', b'\\u', b'D800', b'00e9', b'\\uDC00',
    b'"execute"', b'"id"', b'"arguments"', b'"query-status"', b'"x"', b'a', b'true', b'nul',
    b'1', b'0', b'-', b'.', b'e', b'+', b'12345678901234567890', b' ', b'\t', b'\n', b'\r',
    b'\x01', b'\x00', b'\x80', b'\xc3\xa9', b'\xef\xbf\xbe', b'\xfe', b'\xff', b'%', b'T',
]


def random_streams(count, seed=1):
    rng = random.Random(seed)
    for _ in range(count):
        yield b''.join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 24)))


def stream(side, raw):
    """Sends raw bytes and a synchronising request; returns every message before its reply."""
    side.sock.sendall(raw + b'\n\xff{"execute": "query-status", "id": "sync"}')
    messages = []
    while True:
        msg = side.recv()
        if msg.get("id") == "sync":
            return messages
        messages.append(msg)


def compare_stream(ours, qemu, raw):
    a, b = stream(ours, raw), stream(qemu, raw)
    if a != b:
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                fail(f"{raw[:80]!r}: reply {i} is {x}, QEMU's {y}")
        fail(f"{raw[:80]!r}: {len(a)} replies, QEMU's {len(b)}")
    print(f"ok: {len(a)} replies to {raw[:60]!r}")


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
        b'{"execute": "query-name"}',
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
        # The iothread's properties: defaults, errors, then a change read back.
        b'{"execute": "qom-get", "arguments": {"path": "/objects/io0", "property": "poll-max-ns"}}',
        b'{"execute": "qom-get", "arguments": {"path": "/objects/io0", "property": "type"}}',
        b'{"execute": "qom-get", "arguments": {"path": "/objects/nope", "property": "poll-max-ns"}}',
        b'{"execute": "qom-get", "arguments": {"path": "/objects/io0", "property": "nope"}}',
        b'{"execute": "qom-get", "arguments": {"path": "/objects/io0"}}',
        b'{"execute": "qom-set", "arguments": {"path": "/objects/io0", "property": "type", "value": "x"}}',
        b'{"execute": "qom-set", "arguments": {"path": "/objects/io0", "property": "poll-grow", "value": -1}}',
        b'{"execute": "qom-set", "arguments": {"path": "/objects/io0", "property": "poll-grow", "value": "2"}}',
        b'{"execute": "qom-set", "arguments": {"path": "/objects/io0", "property": "poll-grow", "value": 9223372036854775808}}',
        b'{"execute": "qom-set", "arguments": {"path": "/objects/io0", "property": "poll-grow"}}',
        b'{"execute": "qom-set", "arguments": {"path": "/objects/io0/", "property": "poll-grow", "value": 3}}',
        b'{"execute": "qom-get", "arguments": {"path": "/objects/io0", "property": "poll-grow"}}',
        b'{"execute": "qom-list", "arguments": {"path": "/objects/nope"}}',
        b'{"execute": }',
        b'}',
        b'{"execute": "x"\xff',
    ]
    for raw in exact:
        compare(ours, qemu, raw, exact_values=True)
    for raw in STREAMS:
        compare_stream(ours, qemu, raw)
    for raw in random_streams(400):
        compare_stream(ours, qemu, raw)
    shapes = [
        b'{"execute": "query-iothreads"}',
        b'{"execute": "qom-list", "arguments": {"path": "/objects/io0"}}',
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
