//! The iothreads' filter: the context's event loop (`epoll_wait` and its eventfds) and
//! the virtio-blk devices' handlers it runs (see [`super::rules::disk_handler`]).

use super::rules::{common, disk_handler, Rules};

/// The allow-list.
pub fn rules() -> Rules {
    let mut r = common();
    r.allow(&[libc::SYS_epoll_wait, libc::SYS_epoll_pwait]);
    disk_handler(&mut r);
    r
}
