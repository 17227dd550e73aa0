//! What happens on a call outside a filter: the kernel raises SIGSYS on the thread
//! (`SECCOMP_RET_TRAP`), and the handler writes one line to stderr,
//! `vmm: sandbox: thread NAME made system call NAME (NR, arguments A, B), which its filter
//! forbids` (A and B: the call's first two arguments, which say what an ioctl or `fcntl` asked
//! for), then ends the process with status [`EXIT_STATUS`]. The handler is async-signal-safe: the line is built
//! in a stack buffer from the thread's name (copied to a thread-local when its filter went on)
//! and the static table of call names, then one `write` and one `exit_group`, both allowed by
//! every filter.

use std::cell::Cell;
use std::io;

use super::syscalls;

/// The exit status after a violation: 128 + SIGSYS, what a shell reports for a death by SIGSYS.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Linux's thread names are at most 15 bytes and a NUL.
const NAME_LEN: usize = 16;

thread_local! {
    /// The thread's name, NUL-padded; const-initialised and without a destructor, so reading it
    /// in a signal handler allocates nothing.
    static THREAD_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Keeps the calling thread's name for the handler.
pub fn remember_thread_name() {
    let mut name = [0u8; NAME_LEN];
    let current = std::thread::current();
    let bytes = current.name().unwrap_or("unnamed").as_bytes();
    let len = bytes.len().min(NAME_LEN - 1);
    name[..len].copy_from_slice(&bytes[..len]);
    THREAD_NAME.with(|n| n.set(name));
}

/// Installs the SIGSYS handler for the whole process.
pub fn install_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid starting value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: a valid action whose handler has the SA_SIGINFO signature; no old action wanted.
    let ret = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A line built without allocating.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    fn push_hex(&mut self, value: u64) -> &mut Self {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut v = value;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[usize::try_from(v & 0xf).unwrap_or(0)];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x").push(&digits[i..])
    }

    fn push_number(&mut self, value: i64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let negative = value < 0;
        let mut v = value.unsigned_abs();
        loop {
            i -= 1;
            // A remainder below 10 fits in a byte.
            digits[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if negative {
            self.push(b"-");
        }
        self.push(&digits[i..])
    }

    /// Writes the line to stderr and ends the process.
    fn write_and_exit(&self) -> ! {
        // SAFETY: writes initialised bytes of our own buffer; _exit never returns.
        unsafe {
            libc::write(libc::STDERR_FILENO, self.buf.as_ptr().cast(), self.len);
            libc::_exit(EXIT_STATUS)
        }
    }
}

/// The line for a violation by thread `name` (NUL-padded) of call `nr` with its first two
/// arguments `args` (what an ioctl or `fcntl` asked for).
fn violation_line(name: &[u8; NAME_LEN], nr: i64, args: [u64; 2]) -> Line {
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let mut line = Line::new();
    line.push(b"vmm: sandbox: thread ")
        .push(&name[..name_len])
        .push(b" made system call ")
        .push(syscalls::name(nr).unwrap_or("unknown").as_bytes())
        .push(b" (")
        .push_number(nr)
        .push(b", arguments ")
        .push_hex(args[0])
        .push(b", ")
        .push_hex(args[1])
        .push(b"), which its filter forbids\n");
    line
}

/// The SIGSYS handler.
extern "C" fn on_sigsys(
    _signo: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // The call's number is `si_syscall` in siginfo's `_sigsys` member: after the three ints and
    // padding of the header (16 bytes) and the `_call_addr` pointer (8), so at byte 24
    // (`include/uapi/asm-generic/siginfo.h`).
    // SAFETY: the kernel hands a valid siginfo_t, which is 128 bytes long.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext_t, whose
    // registers hold the call's arguments (rdi, rsi: the first two of the x86_64 convention).
    let args = unsafe {
        let gregs = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        let reg = |r: libc::c_int| {
            usize::try_from(r)
                .ok()
                .and_then(|i| gregs.get(i))
                .map_or(0, |&v| v.cast_unsigned())
        };
        [reg(libc::REG_RDI), reg(libc::REG_RSI)]
    };
    let name = THREAD_NAME.with(Cell::get);
    violation_line(&name, i64::from(nr), args).write_and_exit();
}

/// Ends the process because a thread of `kind` could not be confined.
pub fn die_unconfined(kind: &str, error: &str) -> ! {
    let name = THREAD_NAME.with(Cell::get);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let mut line = Line::new();
    line.push(b"vmm: sandbox: cannot install the ")
        .push(kind.as_bytes())
        .push(b" filter on thread ")
        .push(&name[..name_len])
        .push(b": ")
        .push(error.as_bytes())
        .push(b"\n");
    line.write_and_exit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_thread_and_the_call() {
        let mut name = [0u8; NAME_LEN];
        name[..5].copy_from_slice(b"vcpu0");
        let line = violation_line(&name, libc::SYS_socket, [2, 1]);
        assert_eq!(
            &line.buf[..line.len],
            b"vmm: sandbox: thread vcpu0 made system call socket (41, arguments 0x2, 0x1), which its filter forbids\n"
        );
        let line = violation_line(&[b'x'; NAME_LEN], 100_000, [0, 0x406]);
        assert_eq!(
            &line.buf[..line.len],
            b"vmm: sandbox: thread xxxxxxxxxxxxxxxx made system call unknown (100000, arguments 0x0, 0x406), which its filter forbids\n"
        );
    }
}
