#!/usr/bin/env python3
"""Seeds for the virtio_blk fuzz target, one file each in the directory given: a flags byte, then
guest RAM with queue 0's descriptor table at 0x0, available ring at 0x100 and request buffers
from 0x1000 (see fuzz_targets/virtio_blk.rs): a read, a write, a flush and a get-id, a discard,
and a read through an indirect table."""
import os
import struct
import sys

NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt):
    return struct.pack('<QIHH', addr, length, flags, nxt)


def header(req_type, sector):
    return struct.pack('<IIQ', req_type, 0, sector)


def seed(path, flags, descs, buffers, heads):
    ram = bytearray(0x4000)
    for i, d in enumerate(descs):
        ram[16 * i:16 * i + 16] = desc(*d)
    ram[0x100:0x104] = struct.pack('<HH', 0, len(heads))
    for i, h in enumerate(heads):
        ram[0x104 + 2 * i:0x106 + 2 * i] = struct.pack('<H', h)
    for addr, data in buffers:
        ram[addr:addr + len(data)] = data
    with open(path, 'wb') as f:
        f.write(bytes([flags]) + bytes(ram))


out = sys.argv[1]
seed(os.path.join(out, 'read'), 0,
     [(0x1000, 16, NEXT, 1), (0x2000, 512, WRITE | NEXT, 2), (0x3000, 1, WRITE, 0)],
     [(0x1000, header(0, 0))], [0])
seed(os.path.join(out, 'write'), 1,
     [(0x1000, 16, NEXT, 1), (0x2000, 1024, NEXT, 2), (0x3000, 1, WRITE, 0)],
     [(0x1000, header(1, 4))], [0])
seed(os.path.join(out, 'flush_get_id'), 12,
     [(0x1000, 16, NEXT, 1), (0x3000, 1, WRITE, 0),
      (0x1100, 16, NEXT, 3), (0x2000, 20, WRITE | NEXT, 4), (0x3001, 1, WRITE, 0)],
     [(0x1000, header(4, 0)), (0x1100, header(8, 0))], [0, 2])
seed(os.path.join(out, 'discard'), 5,
     [(0x1000, 16, NEXT, 1), (0x1010, 16, NEXT, 2), (0x3000, 1, WRITE, 0)],
     [(0x1000, header(11, 0) + struct.pack('<QII', 2, 4, 0))], [0])
seed(os.path.join(out, 'indirect'), 4,
     [(0x1800, 48, INDIRECT, 0)],
     [(0x1000, header(0, 3)),
      (0x1800, desc(0x1000, 16, NEXT, 1) + desc(0x2000, 512, WRITE | NEXT, 2)
       + desc(0x3000, 1, WRITE, 0))], [0])
