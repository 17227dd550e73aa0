//! The power-cut recorder: a shared library preloaded (`LD_PRELOAD`) into `vmm-img`, `qemu-io`
//! or `qemu-img` that logs every write, barrier and size change reaching a file under one
//! directory, with the data, in the order they complete. The replay tests (`tests/`) rebuild
//! from that log every state a power cut could leave (dm-log-writes and CrashMonkey do the same
//! below a file system; this does it at the C library, so QEMU's tools are recorded alike and
//! serve as the control).
//!
//! Interposed (each calls the next definition, found with `dlsym(RTLD_NEXT)`): `pwrite`,
//! `pwrite64`, `pwritev`, `pwritev64`, `pwritev2`, `pwritev64v2`, `write` (regular files only),
//! `fdatasync`, `fsync`, `syncfs`, `sync`, `sync_file_range`, `ftruncate`, `ftruncate64`,
//! `fallocate`, `fallocate64`. Not seen: io_uring (the harness drives images through tools that
//! do not use it), `mmap` stores, and calls made inside the C library itself.
//!
//! Environment:
//! - `POWERCUT_LOG=FILE`: where records are appended; unset, the library only passes calls on.
//! - `POWERCUT_DIR=DIR`: only files whose path (from `/proc/self/fd`) lies under DIR are logged.
//! - `POWERCUT_FAIL_AT=N`: the Nth call (from 1) on a file under DIR whose kind is in
//!   `POWERCUT_FAIL_OPS` (comma-separated `write`, `sync`, `truncate`, `fallocate`; default
//!   `write`) fails with `POWERCUT_FAIL_ERRNO` (`EIO` or `ENOSPC`; default `EIO`) without being
//!   performed; with `POWERCUT_FAIL_PERSIST=1` every matching call from the Nth on fails.
//!
//! Log format: a sequence of records, each `u32 len` (bytes that follow) then `u8 op`,
//! `u32 mode`, `u64 a`, `u64 b`, `i64 ret` (a byte count or 0, or minus the errno), `u32 tid`
//! (the calling thread; 0 for markers), `u16` path length, the path, and the data (the bytes a
//! write actually wrote), all little-endian.
//!
//! | op | call | a | b | mode |
//! |---|---|---|---|---|
//! | 1 write | `pwrite*`, `write` | offset | length asked | 0 |
//! | 2 sync begin | `fdatasync`, `fsync`, `syncfs`, `sync` | sync id | - | 0 data, 1 file, 2 all files |
//! | 3 sync end | the same, once it returned | sync id | - | as begin |
//! | 4 truncate | `ftruncate*` | new length | - | 0 |
//! | 5 fallocate | `fallocate*` | offset | length | the `FALLOC_FL_*` mode |
//! | 6 sync range | `sync_file_range` (no barrier) | offset | length | flags |
//! | 7 marker | appended by the test driver, never by this library | - | - | 0 |
//!
//! Every record is appended with one `write` to a file opened `O_APPEND`, so records from many
//! threads (and the driver's markers) never interleave. A call is logged after it returns (a
//! sync also before it starts), so the log order is an order in which the calls completed: a
//! write logged before a sync's begin record completed before that sync started.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libc::{iovec, off64_t, off_t, size_t, ssize_t};

/// Record kinds (the `op` byte).
const OP_WRITE: u8 = 1;
const OP_SYNC_BEGIN: u8 = 2;
const OP_SYNC_END: u8 = 3;
const OP_TRUNCATE: u8 = 4;
const OP_FALLOCATE: u8 = 5;
const OP_SYNC_RANGE: u8 = 6;

/// Sync scopes (the `mode` of sync records).
const SYNC_DATA: u32 = 0;
const SYNC_FILE: u32 = 1;
const SYNC_ALL: u32 = 2;

/// Call kinds the fault injector can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Sync,
    Truncate,
    Fallocate,
}

/// An injected failure.
#[derive(Debug)]
struct Fault {
    at: u64,
    kinds: Vec<Kind>,
    errno: c_int,
    persist: bool,
}

/// What the environment asked for, read once.
#[derive(Debug)]
struct Config {
    log_fd: c_int,
    dir: String,
    fault: Option<Fault>,
}

static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
/// Matching calls seen so far (the fault injector's count).
static CALLS: AtomicU64 = AtomicU64::new(0);
/// Sync ids, pairing begin and end records.
static SYNC_IDS: AtomicU64 = AtomicU64::new(0);

fn config() -> Option<&'static Config> {
    CONFIG.get_or_init(load_config).as_ref()
}

fn load_config() -> Option<Config> {
    let log = std::env::var("POWERCUT_LOG").ok()?;
    let dir = std::env::var("POWERCUT_DIR").ok()?;
    let c_log = std::ffi::CString::new(log).ok()?;
    // SAFETY: a NUL-terminated path and plain flags; the descriptor is owned by this library for
    // the life of the process.
    let log_fd = unsafe {
        libc::open(
            c_log.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        )
    };
    if log_fd < 0 {
        return None;
    }
    let fault = std::env::var("POWERCUT_FAIL_AT")
        .ok()
        .and_then(|n| n.parse().ok())
        .map(|at| Fault {
            at,
            kinds: std::env::var("POWERCUT_FAIL_OPS")
                .unwrap_or_else(|_| "write".into())
                .split(',')
                .filter_map(|k| match k {
                    "write" => Some(Kind::Write),
                    "sync" => Some(Kind::Sync),
                    "truncate" => Some(Kind::Truncate),
                    "fallocate" => Some(Kind::Fallocate),
                    _ => None,
                })
                .collect(),
            errno: match std::env::var("POWERCUT_FAIL_ERRNO").as_deref() {
                Ok("ENOSPC") => libc::ENOSPC,
                _ => libc::EIO,
            },
            persist: std::env::var("POWERCUT_FAIL_PERSIST").is_ok_and(|v| v == "1"),
        });
    Some(Config {
        log_fd,
        dir: dir.trim_end_matches('/').to_string() + "/",
        fault,
    })
}

/// Looks up the next definition of a C library function once.
macro_rules! real {
    ($name:ident: $ty:ty) => {{
        static PTR: OnceLock<usize> = OnceLock::new();
        let p = *PTR.get_or_init(|| {
            let sym = concat!(stringify!($name), "\0");
            // SAFETY: a NUL-terminated symbol name; RTLD_NEXT is valid in a shared object.
            unsafe { libc::dlsym(libc::RTLD_NEXT, sym.as_ptr().cast::<c_char>()) as usize }
        });
        assert!(p != 0, concat!("powercut: no next ", stringify!($name)));
        // SAFETY: the symbol is the C library's function of this name, whose C type is $ty.
        unsafe { std::mem::transmute::<usize, $ty>(p) }
    }};
}

/// The path of a descriptor when it names a file under the watched directory.
fn watched(cfg: &Config, fd: c_int) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let path = link.to_str()?;
    path.starts_with(&cfg.dir).then(|| path.to_string())
}

/// Whether the fault injector fails this call; counts it when its kind is selected.
fn inject(cfg: &Config, kind: Kind) -> Option<c_int> {
    let f = cfg.fault.as_ref()?;
    if !f.kinds.contains(&kind) {
        return None;
    }
    let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    (n == f.at || (f.persist && n > f.at)).then_some(f.errno)
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

fn errno() -> c_int {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}

/// The `ret` field: the result, or minus the errno when the call failed.
fn outcome(r: i64) -> i64 {
    if r < 0 {
        -i64::from(errno())
    } else {
        r
    }
}

/// Appends one record with a single `write` of the whole record.
#[allow(clippy::too_many_arguments)]
fn append(cfg: &Config, op: u8, mode: u32, a: u64, b: u64, ret: i64, path: &str, data: &[&[u8]]) {
    let saved = errno();
    let path = &path.as_bytes()[..path.len().min(usize::from(u16::MAX))];
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    let len = 1 + 4 + 8 + 8 + 8 + 4 + 2 + path.len() + data_len;
    let mut rec = Vec::with_capacity(4 + len);
    // Records are bounded by one write call's length, which the kernel caps below 2 GiB.
    rec.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    rec.push(op);
    rec.extend_from_slice(&mode.to_le_bytes());
    rec.extend_from_slice(&a.to_le_bytes());
    rec.extend_from_slice(&b.to_le_bytes());
    rec.extend_from_slice(&ret.to_le_bytes());
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    rec.extend_from_slice(&u32::try_from(tid).unwrap_or(0).to_le_bytes());
    // The path was cut to u16::MAX bytes above.
    rec.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_le_bytes());
    rec.extend_from_slice(path);
    for d in data {
        rec.extend_from_slice(d);
    }
    let w = real!(write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t);
    let mut done = 0;
    while done < rec.len() {
        // SAFETY: the pointer and length describe the initialised tail of `rec`.
        let n = unsafe { w(cfg.log_fd, rec[done..].as_ptr().cast(), rec.len() - done) };
        let Ok(n) = usize::try_from(n) else {
            if errno() == libc::EINTR {
                continue;
            }
            // The log is the harness's evidence: losing a record must not pass silently.
            eprintln!("powercut: cannot append to the log (errno {})", errno());
            std::process::abort();
        };
        done += n;
    }
    set_errno(saved);
}

/// The bytes of the first `n` bytes of an iovec array.
///
/// # Safety
/// `iov` must point to `cnt` valid iovecs whose buffers are readable.
unsafe fn iov_slices<'a>(iov: *const iovec, cnt: c_int, mut n: usize) -> Vec<&'a [u8]> {
    let cnt = usize::try_from(cnt).unwrap_or(0);
    let mut out = Vec::with_capacity(cnt);
    for i in 0..cnt {
        if n == 0 {
            break;
        }
        // SAFETY: i < cnt, and the caller guarantees cnt valid iovecs.
        let v = unsafe { &*iov.add(i) };
        let take = v.iov_len.min(n);
        // SAFETY: the iovec's buffer is readable for iov_len >= take bytes.
        out.push(unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), take) });
        n -= take;
    }
    out
}

/// Logs a positional write of `ret` bytes (or its failure) from `data`.
fn log_write(cfg: &Config, path: &str, off: u64, asked: usize, ret: i64, data: &[&[u8]]) {
    let asked = u64::try_from(asked).unwrap_or(u64::MAX);
    append(cfg, OP_WRITE, 0, off, asked, outcome(ret), path, data);
}

/// A positional single-buffer write: shared by `pwrite` and `pwrite64`.
///
/// # Safety
/// `buf` must be readable for `n` bytes.
unsafe fn pwrite_common(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    off: off64_t,
    call: impl FnOnce() -> ssize_t,
) -> ssize_t {
    let Some((cfg, path)) = config().and_then(|c| Some((c, watched(c, fd)?))) else {
        return call();
    };
    if let Some(e) = inject(cfg, Kind::Write) {
        set_errno(e);
        log_write(cfg, &path, off.unsigned_abs(), n, -1, &[]);
        return -1;
    }
    let r = call();
    let wrote = usize::try_from(r).unwrap_or(0);
    // SAFETY: the caller's buffer is readable for n >= wrote bytes.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), wrote) };
    log_write(
        cfg,
        &path,
        off.unsigned_abs(),
        n,
        i64::try_from(r).unwrap_or(-1),
        &[data],
    );
    r
}

/// A positional vectored write: shared by the `pwritev` family.
///
/// # Safety
/// `iov` must point to `cnt` valid, readable iovecs.
unsafe fn pwritev_common(
    fd: c_int,
    iov: *const iovec,
    cnt: c_int,
    off: off64_t,
    call: impl FnOnce() -> ssize_t,
) -> ssize_t {
    let Some((cfg, path)) = config().and_then(|c| Some((c, watched(c, fd)?))) else {
        return call();
    };
    // SAFETY: the caller guarantees cnt valid iovecs.
    let asked: usize = unsafe { iov_slices(iov, cnt, usize::MAX) }
        .iter()
        .map(|s| s.len())
        .sum();
    if let Some(e) = inject(cfg, Kind::Write) {
        set_errno(e);
        log_write(cfg, &path, off.unsigned_abs(), asked, -1, &[]);
        return -1;
    }
    let r = call();
    // SAFETY: as above; the first r bytes were written from these buffers.
    let data = unsafe { iov_slices(iov, cnt, usize::try_from(r).unwrap_or(0)) };
    log_write(
        cfg,
        &path,
        off.unsigned_abs(),
        asked,
        i64::try_from(r).unwrap_or(-1),
        &data,
    );
    r
}

/// # Safety
/// As the C library's `pwrite`.
#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    let f = real!(pwrite: unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t);
    // SAFETY: the caller's arguments are passed on unchanged.
    unsafe { pwrite_common(fd, buf, n, off, || f(fd, buf, n, off)) }
}

/// # Safety
/// As the C library's `pwrite64`.
#[no_mangle]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    off: off64_t,
) -> ssize_t {
    let f = real!(pwrite64: unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t);
    // SAFETY: the caller's arguments are passed on unchanged.
    unsafe { pwrite_common(fd, buf, n, off, || f(fd, buf, n, off)) }
}

/// # Safety
/// As the C library's `pwritev`.
#[no_mangle]
pub unsafe extern "C" fn pwritev(fd: c_int, iov: *const iovec, cnt: c_int, off: off_t) -> ssize_t {
    let f = real!(pwritev: unsafe extern "C" fn(c_int, *const iovec, c_int, off_t) -> ssize_t);
    // SAFETY: the caller's arguments are passed on unchanged.
    unsafe { pwritev_common(fd, iov, cnt, off, || f(fd, iov, cnt, off)) }
}

/// # Safety
/// As the C library's `pwritev64`.
#[no_mangle]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    iov: *const iovec,
    cnt: c_int,
    off: off64_t,
) -> ssize_t {
    let f = real!(pwritev64: unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t) -> ssize_t);
    // SAFETY: the caller's arguments are passed on unchanged.
    unsafe { pwritev_common(fd, iov, cnt, off, || f(fd, iov, cnt, off)) }
}

/// # Safety
/// As the C library's `pwritev2` (an offset of -1 writes at the file position: not logged
/// positionally, so refused by the harness's tools, which never use it).
#[no_mangle]
pub unsafe extern "C" fn pwritev2(
    fd: c_int,
    iov: *const iovec,
    cnt: c_int,
    off: off_t,
    flags: c_int,
) -> ssize_t {
    let f =
        real!(pwritev2: unsafe extern "C" fn(c_int, *const iovec, c_int, off_t, c_int) -> ssize_t);
    // SAFETY: the caller's arguments are passed on unchanged.
    unsafe { pwritev_common(fd, iov, cnt, off, || f(fd, iov, cnt, off, flags)) }
}

/// # Safety
/// As the C library's `pwritev64v2`.
#[no_mangle]
pub unsafe extern "C" fn pwritev64v2(
    fd: c_int,
    iov: *const iovec,
    cnt: c_int,
    off: off64_t,
    flags: c_int,
) -> ssize_t {
    let f = real!(pwritev64v2: unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t, c_int) -> ssize_t);
    // SAFETY: the caller's arguments are passed on unchanged.
    unsafe { pwritev_common(fd, iov, cnt, off, || f(fd, iov, cnt, off, flags)) }
}

/// `write` on a regular file under the directory: logged at the offset it wrote to.
///
/// # Safety
/// As the C library's `write`.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    let f = real!(write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t);
    let Some((cfg, path)) = config().and_then(|c| Some((c, watched(c, fd)?))) else {
        // SAFETY: the caller's arguments are passed on unchanged.
        return unsafe { f(fd, buf, n) };
    };
    // SAFETY: lseek64 on the caller's descriptor only reads its position.
    let before = unsafe { libc::lseek64(fd, 0, libc::SEEK_CUR) };
    if let Some(e) = inject(cfg, Kind::Write) {
        set_errno(e);
        log_write(cfg, &path, before.unsigned_abs(), n, -1, &[]);
        return -1;
    }
    // SAFETY: the caller's arguments are passed on unchanged.
    let r = unsafe { f(fd, buf, n) };
    let wrote = usize::try_from(r).unwrap_or(0);
    // SAFETY: as above (O_APPEND writes land at the end: the position after, less the count).
    let after = unsafe { libc::lseek64(fd, 0, libc::SEEK_CUR) };
    let at = after.unsigned_abs().saturating_sub(wrote as u64);
    // SAFETY: the caller's buffer is readable for n >= wrote bytes.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), wrote) };
    log_write(cfg, &path, at, n, i64::try_from(r).unwrap_or(-1), &[data]);
    r
}

/// Runs a sync between a begin and an end record (`path` empty: every file).
fn logged_sync(cfg: &Config, path: &str, mode: u32, call: impl FnOnce() -> c_int) -> c_int {
    if let Some(e) = inject(cfg, Kind::Sync) {
        let id = SYNC_IDS.fetch_add(1, Ordering::SeqCst);
        append(cfg, OP_SYNC_BEGIN, mode, id, 0, 0, path, &[]);
        append(cfg, OP_SYNC_END, mode, id, 0, -i64::from(e), path, &[]);
        set_errno(e);
        return -1;
    }
    let id = SYNC_IDS.fetch_add(1, Ordering::SeqCst);
    append(cfg, OP_SYNC_BEGIN, mode, id, 0, 0, path, &[]);
    let r = call();
    append(
        cfg,
        OP_SYNC_END,
        mode,
        id,
        0,
        outcome(i64::from(r)),
        path,
        &[],
    );
    r
}

/// # Safety
/// As the C library's `fdatasync`.
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    let f = real!(fdatasync: unsafe extern "C" fn(c_int) -> c_int);
    match config().and_then(|c| Some((c, watched(c, fd)?))) {
        // SAFETY: the caller's argument is passed on unchanged.
        Some((cfg, path)) => logged_sync(cfg, &path, SYNC_DATA, || unsafe { f(fd) }),
        // SAFETY: as above.
        None => unsafe { f(fd) },
    }
}

/// # Safety
/// As the C library's `fsync`.
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    let f = real!(fsync: unsafe extern "C" fn(c_int) -> c_int);
    match config().and_then(|c| Some((c, watched(c, fd)?))) {
        // SAFETY: the caller's argument is passed on unchanged.
        Some((cfg, path)) => logged_sync(cfg, &path, SYNC_FILE, || unsafe { f(fd) }),
        // SAFETY: as above.
        None => unsafe { f(fd) },
    }
}

/// `syncfs` on a file under the directory: a barrier for every file (the harness keeps all of
/// its files on one file system).
///
/// # Safety
/// As the C library's `syncfs`.
#[no_mangle]
pub unsafe extern "C" fn syncfs(fd: c_int) -> c_int {
    let f = real!(syncfs: unsafe extern "C" fn(c_int) -> c_int);
    match config().filter(|c| watched(c, fd).is_some()) {
        // SAFETY: the caller's argument is passed on unchanged.
        Some(cfg) => logged_sync(cfg, "", SYNC_ALL, || unsafe { f(fd) }),
        // SAFETY: as above.
        None => unsafe { f(fd) },
    }
}

/// `sync`: a barrier for every file.
///
/// # Safety
/// As the C library's `sync`.
#[no_mangle]
pub unsafe extern "C" fn sync() {
    let f = real!(sync: unsafe extern "C" fn());
    match config() {
        Some(cfg) => {
            logged_sync(cfg, "", SYNC_ALL, || {
                // SAFETY: sync takes no arguments.
                unsafe { f() };
                0
            });
        }
        // SAFETY: as above.
        None => unsafe { f() },
    }
}

/// # Safety
/// As the C library's `sync_file_range`.
#[no_mangle]
pub unsafe extern "C" fn sync_file_range(
    fd: c_int,
    off: off64_t,
    n: off64_t,
    flags: c_uint,
) -> c_int {
    let f = real!(sync_file_range: unsafe extern "C" fn(c_int, off64_t, off64_t, c_uint) -> c_int);
    // SAFETY: the caller's arguments are passed on unchanged.
    let r = unsafe { f(fd, off, n, flags) };
    if let Some((cfg, path)) = config().and_then(|c| Some((c, watched(c, fd)?))) {
        let ret = outcome(i64::from(r));
        append(
            cfg,
            OP_SYNC_RANGE,
            flags,
            off.unsigned_abs(),
            n.unsigned_abs(),
            ret,
            &path,
            &[],
        );
    }
    r
}

/// A size change: shared by `ftruncate` and `ftruncate64`.
fn truncate_common(fd: c_int, len: off64_t, call: impl FnOnce() -> c_int) -> c_int {
    let Some((cfg, path)) = config().and_then(|c| Some((c, watched(c, fd)?))) else {
        return call();
    };
    if let Some(e) = inject(cfg, Kind::Truncate) {
        append(
            cfg,
            OP_TRUNCATE,
            0,
            len.unsigned_abs(),
            0,
            -i64::from(e),
            &path,
            &[],
        );
        set_errno(e);
        return -1;
    }
    let r = call();
    let ret = outcome(i64::from(r));
    append(cfg, OP_TRUNCATE, 0, len.unsigned_abs(), 0, ret, &path, &[]);
    r
}

/// # Safety
/// As the C library's `ftruncate`.
#[no_mangle]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    let f = real!(ftruncate: unsafe extern "C" fn(c_int, off_t) -> c_int);
    // SAFETY: the caller's arguments are passed on unchanged.
    truncate_common(fd, len, || unsafe { f(fd, len) })
}

/// # Safety
/// As the C library's `ftruncate64`.
#[no_mangle]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off64_t) -> c_int {
    let f = real!(ftruncate64: unsafe extern "C" fn(c_int, off64_t) -> c_int);
    // SAFETY: the caller's arguments are passed on unchanged.
    truncate_common(fd, len, || unsafe { f(fd, len) })
}

/// An allocation or hole punch: shared by `fallocate` and `fallocate64`.
fn fallocate_common(
    fd: c_int,
    mode: c_int,
    off: off64_t,
    len: off64_t,
    call: impl FnOnce() -> c_int,
) -> c_int {
    let Some((cfg, path)) = config().and_then(|c| Some((c, watched(c, fd)?))) else {
        return call();
    };
    let m = mode.unsigned_abs();
    let (o, l) = (off.unsigned_abs(), len.unsigned_abs());
    if let Some(e) = inject(cfg, Kind::Fallocate) {
        append(cfg, OP_FALLOCATE, m, o, l, -i64::from(e), &path, &[]);
        set_errno(e);
        return -1;
    }
    let r = call();
    append(
        cfg,
        OP_FALLOCATE,
        m,
        o,
        l,
        outcome(i64::from(r)),
        &path,
        &[],
    );
    r
}

/// # Safety
/// As the C library's `fallocate`.
#[no_mangle]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, off: off_t, len: off_t) -> c_int {
    let f = real!(fallocate: unsafe extern "C" fn(c_int, c_int, off_t, off_t) -> c_int);
    // SAFETY: the caller's arguments are passed on unchanged.
    fallocate_common(fd, mode, off, len, || unsafe { f(fd, mode, off, len) })
}

/// # Safety
/// As the C library's `fallocate64`.
#[no_mangle]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, off: off64_t, len: off64_t) -> c_int {
    let f = real!(fallocate64: unsafe extern "C" fn(c_int, c_int, off64_t, off64_t) -> c_int);
    // SAFETY: the caller's arguments are passed on unchanged.
    fallocate_common(fd, mode, off, len, || unsafe { f(fd, mode, off, len) })
}
