//! Reading the recorder's log (format in `tests/powercut/src/lib.rs`) and appending the driver's
//! markers to it.

use std::io::Write;
use std::path::Path;

/// What a record says happened.
#[derive(Debug, Clone)]
pub enum Op {
    /// Bytes written at an offset (only the bytes actually written) of the `len` asked.
    Write { off: u64, len: u64, data: Vec<u8> },
    /// A sync started: `id` pairs it with its end; `all` when it covers every file.
    SyncBegin { id: u64, all: bool },
    /// A sync returned.
    SyncEnd { id: u64, all: bool },
    /// The file's size was set.
    Truncate { len: u64 },
    /// `fallocate` with its mode.
    Fallocate { mode: u32, off: u64, len: u64 },
    /// `sync_file_range`: no barrier, kept for the record.
    SyncRange,
    /// A line from the test driver.
    Marker(String),
}

/// One record.
#[derive(Debug, Clone)]
pub struct Rec {
    pub op: Op,
    /// The file's path (empty for markers and syncs of every file).
    pub path: String,
    /// The call's result: a count or 0, or minus the errno.
    pub ret: i64,
    /// The thread that made the call (0 for markers).
    pub tid: u32,
}

impl Rec {
    /// Whether the call succeeded (a failed call changed nothing).
    pub fn ok(&self) -> bool {
        self.ret >= 0
    }
}

const MARKER: u8 = 7;

fn le(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// Parses a whole log.
pub fn read(path: &Path) -> Vec<Rec> {
    let buf = std::fs::read(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 4 <= buf.len() {
        let len = usize::try_from(le(&buf[pos..pos + 4])).unwrap();
        let r = &buf[pos + 4..pos + 4 + len];
        pos += 4 + len;
        let (op, mode) = (r[0], u32::try_from(le(&r[1..5])).unwrap());
        let (a, b) = (le(&r[5..13]), le(&r[13..21]));
        let ret = i64::from_le_bytes(r[21..29].try_into().unwrap());
        let tid = u32::try_from(le(&r[29..33])).unwrap();
        let plen = usize::try_from(le(&r[33..35])).unwrap();
        let path = String::from_utf8_lossy(&r[35..35 + plen]).into_owned();
        let data = &r[35 + plen..];
        let op = match op {
            1 => Op::Write {
                off: a,
                len: b,
                data: data.to_vec(),
            },
            2 => Op::SyncBegin {
                id: a,
                all: mode == 2,
            },
            3 => Op::SyncEnd {
                id: a,
                all: mode == 2,
            },
            4 => Op::Truncate { len: a },
            5 => Op::Fallocate {
                mode,
                off: a,
                len: b,
            },
            6 => Op::SyncRange,
            MARKER => Op::Marker(String::from_utf8_lossy(data).into_owned()),
            other => panic!("{path}: unknown record kind {other}"),
        };
        out.push(Rec { op, path, ret, tid });
    }
    assert_eq!(pos, buf.len(), "{}: truncated record", path.display());
    out
}

/// Appends a marker record, with one write, as the recorder appends its own.
pub fn mark(log: &Path, text: &str) {
    let len = 1 + 4 + 8 + 8 + 8 + 4 + 2 + text.len();
    let mut rec = Vec::with_capacity(4 + len);
    rec.extend_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
    rec.push(MARKER);
    rec.extend_from_slice(&[0u8; 4 + 8 + 8 + 8 + 4 + 2]);
    rec.extend_from_slice(text.as_bytes());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .unwrap();
    f.write_all(&rec).unwrap();
}
