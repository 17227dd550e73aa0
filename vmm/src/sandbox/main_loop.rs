//! The main thread's filter, on from just before the guest runs: the main loop and the disks it
//! serves (see [`super::rules::disk_handler`]), the QMP monitor (accepting, reading and writing
//! its clients on the socket bound before; opening, creating, locking and writing snapshot
//! overlays with `blockdev-snapshot-sync`), pausing the vCPUs (a signal to each thread), the
//! console's input, and the shutdown (flushing and unlocking the images, restoring the
//! terminal, removing the socket and the pidfile).

use super::rules::{arg, common, disk_handler, Rules};

/// `IORING_UNREGISTER_FILES` (`include/uapi/linux/io_uring.h`).
const IORING_UNREGISTER_FILES: u64 = 3;
/// `IORING_REGISTER_FILES_UPDATE`.
const IORING_REGISTER_FILES_UPDATE: u64 = 6;

/// The allow-list.
pub fn rules() -> Rules {
    let mut r = common();
    r.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_tgkill,
        libc::SYS_getpid,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_poll,
        libc::SYS_openat,
        libc::SYS_unlink,
        libc::SYS_readlink,
        libc::SYS_getcwd,
    ])
    .allow_arg(
        libc::SYS_fcntl,
        1,
        &[
            arg(libc::F_GETFL),
            arg(libc::F_SETFL),
            arg(libc::F_SETFD),
            arg(libc::F_DUPFD_CLOEXEC),
            arg(libc::F_OFD_GETLK),
            arg(libc::F_OFD_SETLK),
        ],
    )
    // A snapshot swaps the file registered with a disk's io_uring ring; a ring that goes lets
    // go of its file.
    .allow_arg(
        libc::SYS_io_uring_register,
        1,
        &[IORING_UNREGISTER_FILES, IORING_REGISTER_FILES_UPDATE],
    )
    // TCP_NODELAY on a TCP monitor's clients.
    .allow_args(
        libc::SYS_setsockopt,
        &[(1, arg(libc::IPPROTO_TCP)), (2, arg(libc::TCP_NODELAY))],
    )
    // The terminal (stdin) and non-blocking sockets.
    .allow_arg(
        libc::SYS_ioctl,
        1,
        &[arg(libc::TCGETS), arg(libc::TCSETS), arg(libc::FIONBIO)],
    );
    // The images' I/O (positioned reads and writes, syncs, fallocate, ftruncate, stat) comes
    // with the disk handler's rules, which include a pool worker's.
    disk_handler(&mut r);
    r
}
