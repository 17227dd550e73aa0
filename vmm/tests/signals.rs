//! SIGTERM, SIGINT and SIGHUP end `vmm` cleanly at any point of its life: exit status 0, the
//! terminal (a pseudo-terminal on stdin here) as it was, the monitor socket removed, and one
//! `SHUTDOWN` event for each connected client; and clients racing to `quit` see one `SHUTDOWN`.

mod common;

use std::ffi::CStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{bzimage, counter_guest, vmm, Scratch};
use serde_json::{json, Value};

/// A pseudo-terminal: the test keeps the master, `vmm` gets the slave as stdin.
struct Pty {
    _master: OwnedFd,
    slave: File,
}

impl Pty {
    fn open() -> Self {
        // SAFETY: posix_openpt returns a new descriptor or -1; the flags are valid.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor that nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a pty master descriptor.
        assert_eq!(unsafe { libc::grantpt(fd) }, 0, "grantpt");
        // SAFETY: a pty master descriptor.
        assert_eq!(unsafe { libc::unlockpt(fd) }, 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the buffer is valid for its length.
        let ret = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
        assert_eq!(ret, 0, "ptsname_r");
        // SAFETY: ptsname_r wrote a NUL-terminated string into the buffer.
        let path = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .expect("UTF-8 pty name")
            .to_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open the pty slave");
        Self {
            _master: master,
            slave,
        }
    }

    /// The slave's settings.
    fn settings(&self) -> libc::termios {
        // SAFETY: termios is plain data; tcgetattr overwrites it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: an open terminal descriptor and a valid pointer.
        let ret = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(ret, 0, "tcgetattr");
        t
    }

    /// Whether the slave is in raw mode (no line editing, no signals from keys).
    fn is_raw(&self) -> bool {
        self.settings().c_lflag & (libc::ICANON | libc::ISIG) == 0
    }

    fn stdin(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().expect("dup the pty slave"))
    }
}

/// The flags that raw mode changes are back as they were.
fn assert_same_settings(before: &libc::termios, after: &libc::termios) {
    assert_eq!(
        (
            before.c_iflag,
            before.c_oflag,
            before.c_cflag,
            before.c_lflag
        ),
        (after.c_iflag, after.c_oflag, after.c_cflag, after.c_lflag),
        "terminal settings restored"
    );
}

/// A running `vmm`, killed if a failing test leaves it behind.
struct Vmm(Child);

impl std::ops::Deref for Vmm {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn signal(child: &Child, signo: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, signo) }, 0, "kill");
}

/// Waits for `child` to exit (killing it after 20 s) and returns its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` exists.
fn wait_for_path(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "vmm exited early"
        );
        assert!(start.elapsed() < Duration::from_secs(20), "no {path:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A negotiated QMP client.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        assert!(qmp.recv().expect("greeting")["QMP"].is_object());
        qmp.send(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(qmp.recv(), Some(json!({"return": {}})));
        qmp
    }

    fn send(&mut self, request: &str) {
        self.writer.write_all(request.as_bytes()).expect("send");
    }

    /// The next message, or `None` at the end of the stream (a reset is its end too: the VMM
    /// closes connections whose last requests it did not run, and a unix socket closed with
    /// unread data reports that to its peer once the peer has read everything sent to it).
    fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("JSON message")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Every message up to the end of the stream.
    fn rest(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.recv()).collect()
    }
}

/// The `SHUTDOWN` events among `messages`, and what came after the first one.
fn shutdowns(messages: &[Value]) -> (Vec<&Value>, &[Value]) {
    let events: Vec<&Value> = messages
        .iter()
        .filter(|m| m["event"] == "SHUTDOWN")
        .collect();
    let after = messages
        .iter()
        .position(|m| m["event"] == "SHUTDOWN")
        .map_or(&[][..], |i| &messages[i + 1..]);
    (events, after)
}

/// A paused `vmm` with a monitor socket and the pty as stdin.
fn paused_vmm(dir: &Scratch, pty: &Pty, wait: &str) -> (Vmm, std::path::PathBuf) {
    let kernel = dir.file("bzImage", &bzimage(&counter_guest()));
    let socket = dir.0.join("qmp.sock");
    let child = vmm()
        .arg("-kernel")
        .arg(&kernel)
        .arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait={wait}", socket.display()))
        .stdin(pty.stdin())
        .stdout(Stdio::null())
        .spawn()
        .expect("vmm starts");
    (Vmm(child), socket)
}

#[test]
fn sighup_ends_a_paused_vmm_cleanly() {
    let dir = Scratch::new("sighup");
    let pty = Pty::open();
    let before = pty.settings();
    let (mut child, socket) = paused_vmm(&dir, &pty, "off");
    wait_for_path(&socket, &mut child);
    let mut qmp = Qmp::connect(&socket);
    assert!(pty.is_raw(), "the VM runs with a raw terminal");
    signal(&child, libc::SIGHUP);
    let messages = qmp.rest();
    let (events, after) = shutdowns(&messages);
    assert_eq!(events.len(), 1, "{messages:?}");
    assert_eq!(
        events[0]["data"],
        json!({"guest": false, "reason": "host-signal"})
    );
    assert!(after.is_empty(), "{messages:?}");
    assert_eq!(exit_code(&mut child), Some(0));
    assert!(!socket.exists(), "socket removed");
    assert_same_settings(&before, &pty.settings());
}

#[test]
fn sigterm_while_wait_on_waits_for_a_client() {
    let dir = Scratch::new("sigterm-wait");
    let pty = Pty::open();
    let before = pty.settings();
    let (mut child, socket) = paused_vmm(&dir, &pty, "on");
    wait_for_path(&socket, &mut child);
    // Give it time to block in accept().
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGTERM);
    assert_eq!(exit_code(&mut child), Some(0));
    assert!(!socket.exists(), "socket removed");
    assert_same_settings(&before, &pty.settings());
}

#[test]
fn sigint_while_blocked_opening_the_kernel() {
    let dir = Scratch::new("sigint-open");
    let pty = Pty::open();
    let before = pty.settings();
    // A FIFO nobody writes to: opening it for reading blocks (a kernel from process
    // substitution, `-kernel <(zcat vmlinuz.gz)`, is a FIFO too).
    let fifo = dir.0.join("kernel.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("UTF-8 path")).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let socket = dir.0.join("qmp.sock");
    let mut child = Vmm(vmm()
        .arg("-kernel")
        .arg(&fifo)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(pty.stdin())
        .stdout(Stdio::null())
        .spawn()
        .expect("vmm starts"));
    // The socket is bound first; then the build goes on to the kernel and blocks there.
    wait_for_path(&socket, &mut child);
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, libc::SIGINT);
    assert_eq!(exit_code(&mut child), Some(0));
    assert!(!socket.exists(), "socket removed");
    assert_same_settings(&before, &pty.settings());
}

#[test]
fn racing_quits_from_several_clients_raise_one_shutdown() {
    let dir = Scratch::new("quit-race");
    let pty = Pty::open();
    let (mut child, socket) = paused_vmm(&dir, &pty, "off");
    wait_for_path(&socket, &mut child);
    let clients: Vec<Qmp> = (0..8).map(|_| Qmp::connect(&socket)).collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients.len()));
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut qmp| {
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                // A client that comes too late finds the VMM gone; it still got its SHUTDOWN.
                let _ = qmp
                    .writer
                    .write_all(br#"{"execute": "quit"}{"execute": "query-status"}"#);
                qmp.rest()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let messages = t.join().expect("client thread");
        let (events, after) = shutdowns(&messages);
        assert_eq!(events.len(), 1, "client {i}: {messages:?}");
        assert_eq!(
            events[0]["data"],
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
        // At most the reply to the quit that raised it.
        assert!(
            after.is_empty() || after == [json!({"return": {}})],
            "client {i}: {messages:?}"
        );
    }
    assert_eq!(exit_code(&mut child), Some(0));
    assert!(!socket.exists(), "socket removed");
}
