//! The signal thread's filter: reading the signalfd, and what it does with a signal: wake the
//! main loop (an eventfd write), or, before the main loop runs, restore the terminal
//! (`TCSETS` on stdin), remove the monitor's sockets and exit.

use super::rules::{arg, common, Rules};

/// The allow-list.
pub fn rules() -> Rules {
    let mut r = common();
    r.allow(&[libc::SYS_read, libc::SYS_unlink]).allow_args(
        libc::SYS_ioctl,
        &[(0, arg(libc::STDIN_FILENO)), (1, arg(libc::TCSETS))],
    );
    r
}
