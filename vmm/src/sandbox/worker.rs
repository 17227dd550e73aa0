//! The disk I/O workers' filter: data and metadata I/O on descriptors already open (positioned
//! reads and writes, flushes, `fallocate` for discards and zeroes, `ftruncate` for growth,
//! `lseek` for holes, `fstat` for sizes), and the completion eventfd's write. A worker opens
//! nothing.

use super::rules::{arg, common, Rules};

/// The allow-list.
pub fn rules() -> Rules {
    let mut r = common();
    io(&mut r);
    r
}

/// A worker's calls beyond the common ones; also allowed on every thread that grows a pool,
/// since a new thread starts under its creator's filter and the two stack.
pub fn io(r: &mut Rules) {
    r.allow(&[
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
    ])
    .allow_arg(libc::SYS_fcntl, 1, &[arg(libc::F_GETFL)]);
}
