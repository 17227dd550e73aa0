//! The console on the VMM's terminal: raw mode while the VM runs, and QEMU's Ctrl-A escapes.
//!
//! When stdin is a terminal it is put in raw mode (every key, Ctrl-C included, goes to the
//! guest) and restored on every way out: the [`RawTerminal`] guard on a normal return, a panic
//! hook on a panic (release builds abort right after the hook), SIGTERM/SIGINT/SIGHUP while the
//! main loop runs, which it turns into a normal return, and the same signals earlier, which
//! [`crate::signals`] handles by calling [`restore_for_exit`] and exiting. Ctrl-A x quits;
//! Ctrl-A Ctrl-A sends one Ctrl-A.

use std::sync::Mutex;

/// Ctrl-A, the escape key.
const CTRL_A: u8 = 0x01;

/// The terminal settings to restore, shared with the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Errors from setting up the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// tcgetattr failed on a terminal.
    #[error("Cannot read the terminal settings")]
    GetAttr(#[source] std::io::Error),
    /// tcsetattr failed.
    #[error("Cannot put the terminal in raw mode")]
    SetAttr(#[source] std::io::Error),
}

/// Puts the saved settings back, if any, and forgets them.
fn put_back(saved: &mut Option<libc::termios>) {
    if let Some(termios) = saved.take() {
        // SAFETY: fd 0 and a termios read from it by tcgetattr; no memory is handed over.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios) };
    }
}

/// Puts the saved settings back, if any; safe to call more than once.
fn restore_terminal() {
    put_back(
        &mut SAVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
}

/// Puts the saved settings back for an exit from another thread, and keeps them locked so that
/// nothing puts the terminal in raw mode again before the process is gone.
pub fn restore_for_exit() {
    let mut saved = SAVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    put_back(&mut saved);
    std::mem::forget(saved);
}

/// Raw mode on stdin for as long as it lives.
#[derive(Debug)]
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal (does nothing otherwise), and makes sure a
    /// panic restores it.
    pub fn enter() -> Result<Self, ConsoleError> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(Self(()));
        }
        // SAFETY: termios is plain data; all-zero is a valid value for tcgetattr to overwrite.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut termios) } != 0 {
            return Err(ConsoleError::GetAttr(std::io::Error::last_os_error()));
        }
        // Raw mode is set with the lock held, so that an exit on a signal (which restores the
        // terminal under the same lock) sees either no change yet or the whole of it.
        let mut saved = SAVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *saved = Some(termios);
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous_hook(info);
        }));
        let mut raw = termios;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd 0 and a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            let err = std::io::Error::last_os_error();
            // Nothing changed: forget the saved settings.
            *saved = None;
            return Err(ConsoleError::SetAttr(err));
        }
        Ok(Self(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Turns console input into bytes for the guest, watching for Ctrl-A escapes.
#[derive(Debug, Default)]
pub struct Escapes {
    /// The last byte was a Ctrl-A.
    after_ctrl_a: bool,
}

impl Escapes {
    /// Appends the guest's share of `input` to `to_guest`; returns true on Ctrl-A x.
    pub fn feed(&mut self, input: &[u8], to_guest: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return true,
                    CTRL_A => to_guest.push(CTRL_A),
                    // An unknown escape is passed on whole, so nothing typed is lost.
                    _ => to_guest.extend_from_slice(&[CTRL_A, b]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                to_guest.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut e = Escapes::default();
        let mut out = Vec::new();
        assert!(!e.feed(b"ls\r\x01\x01a\x01b", &mut out));
        assert_eq!(out, b"ls\r\x01a\x01b");
        out.clear();
        // The escape may straddle two reads.
        assert!(!e.feed(b"q\x01", &mut out));
        assert!(e.feed(b"x", &mut out));
        assert_eq!(out, b"q");
    }
}
