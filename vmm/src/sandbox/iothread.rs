//! The iothreads' filter: the context's event loop (`epoll_wait`, its eventfds and timers) and
//! the virtio-blk devices' handlers it runs (see [`super::rules::disk_handler`]).

use super::rules::{common, disk_handler, Rules};

/// The allow-list.
pub fn rules() -> Rules {
    let mut r = common();
    r.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_timerfd_settime,
    ]);
    disk_handler(&mut r);
    r
}
