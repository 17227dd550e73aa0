//! The monitor's listening socket (unix or TCP) and its client streams.
//!
//! As QEMU does for `server=on`: an old unix socket left at the path is replaced (but, unlike QEMU,
//! anything that is not a socket is left alone and reported), the path is removed again when the
//! monitor goes away (or, if a signal ends the VMM before its main loop runs, by
//! [`crate::signals`]), and `wait=on` holds start-up until the first client connects. Clients are
//! non-blocking; writes use `send(MSG_NOSIGNAL)` so a vanished client yields `EPIPE`, not SIGPIPE.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use super::options::{QmpAddress, QmpOptions};
use super::MonitorError;

/// A connected client.
#[derive(Debug)]
pub enum Stream {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Sends without raising SIGPIPE if the client is gone.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid slice for its whole length and the descriptor is an open socket
        // owned by `self`; send() only reads from the buffer.
        let n = unsafe {
            libc::send(
                self.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Makes the stream non-blocking.
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_nonblocking(true),
            Self::Tcp(s) => {
                // Replies are small and latency matters more than packet count.
                s.set_nodelay(true)?;
                s.set_nonblocking(true)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tcp(s) => s.as_raw_fd(),
        }
    }
}

#[derive(Debug)]
enum Socket {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
}

/// The listening socket, bound and non-blocking.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// The client that `wait=on` waited for, until the monitor takes it.
    waiting: Option<Stream>,
}

/// Removes a stale unix socket at `path`; refuses to remove anything else.
fn remove_stale_socket(path: &PathBuf) -> Result<(), MonitorError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MonitorError::Inspect {
            path: path.clone(),
            source,
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| MonitorError::RemoveStale {
                path: path.clone(),
                source,
            })
        }
        Ok(_) => Err(MonitorError::NotASocket(path.clone())),
    }
}

/// The line `wait=on` prints before it waits, in QEMU's form with the program's name where QEMU
/// puts "QEMU" (the address as bound, as QEMU prints it), so that whatever watches for QEMU's
/// "waiting for connection on:" finds it here too.
fn waiting_line(socket: &Socket) -> String {
    let address = match socket {
        Socket::Unix { path, .. } => format!("unix:{}", path.display()),
        Socket::Tcp(listener) => match listener.local_addr() {
            Ok(addr) => format!("tcp:{addr}"),
            Err(_) => "tcp".to_owned(),
        },
    };
    format!(
        "vmm: -qmp {address},server=on: info: vmm waiting for connection on: \
         disconnected:{address},server=on"
    )
}

impl Listener {
    /// Binds the socket the options name; with `wait=on`, also waits for the first client.
    pub fn bind(options: &QmpOptions) -> Result<Self, MonitorError> {
        let socket = match &options.address {
            QmpAddress::Unix(path) => {
                remove_stale_socket(path)?;
                // Registered before it exists, so that no signal finds it bound but unregistered.
                crate::signals::remove_on_early_exit(path);
                let listener = UnixListener::bind(path).map_err(|source| {
                    crate::signals::forget_socket(path);
                    MonitorError::BindUnix {
                        path: path.clone(),
                        source,
                    }
                })?;
                Socket::Unix {
                    listener,
                    path: path.clone(),
                }
            }
            QmpAddress::Tcp { host, port } => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                let addrs: Vec<_> = (host, *port)
                    .to_socket_addrs()
                    .map_err(|source| MonitorError::Resolve {
                        host: host.to_owned(),
                        source,
                    })?
                    .collect();
                let listener =
                    TcpListener::bind(&addrs[..]).map_err(|source| MonitorError::BindTcp {
                        address: format!("{host}:{port}"),
                        source,
                    })?;
                Socket::Tcp(listener)
            }
        };
        let mut listener = Self {
            socket,
            waiting: None,
        };
        if options.wait {
            let line = waiting_line(&listener.socket);
            eprintln!("{line}");
            log::info!("{line}");
            listener.waiting = Some(listener.accept().map_err(MonitorError::Wait)?);
        }
        match &listener.socket {
            Socket::Unix { listener, .. } => listener.set_nonblocking(true),
            Socket::Tcp(listener) => listener.set_nonblocking(true),
        }
        .map_err(MonitorError::NonBlocking)?;
        Ok(listener)
    }

    /// The TCP port actually bound (for a `tcp:HOST:0` listener).
    #[cfg(test)]
    pub fn tcp_port(&self) -> Option<u16> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Socket::Unix { .. } => None,
        }
    }

    /// Accepts one client and makes it non-blocking.
    pub fn accept(&self) -> io::Result<Stream> {
        let stream = match &self.socket {
            Socket::Unix { listener, .. } => Stream::Unix(listener.accept()?.0),
            Socket::Tcp(listener) => Stream::Tcp(listener.accept()?.0),
        };
        stream.set_nonblocking()?;
        Ok(stream)
    }

    /// The client `wait=on` waited for, once.
    pub fn take_waiting_client(&mut self) -> Option<Stream> {
        self.waiting.take()
    }

    /// The listening descriptor.
    pub fn fd(&self) -> RawFd {
        match &self.socket {
            Socket::Unix { listener, .. } => listener.as_raw_fd(),
            Socket::Tcp(listener) => listener.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix { path, .. } = &self.socket {
            // Best effort, as QEMU: the socket is useless once nobody listens on it.
            let _ = std::fs::remove_file(path);
            crate::signals::forget_socket(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn unix_options(path: &std::path::Path, wait: bool) -> QmpOptions {
        QmpOptions {
            address: QmpAddress::Unix(path.to_path_buf()),
            wait,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-qmp-{}-{name}", std::process::id()))
    }

    #[test]
    fn unix_socket_replaces_a_stale_socket_and_is_removed_on_drop() {
        let path = temp_path("stale.sock");
        let stale = UnixListener::bind(&path).expect("bind stale");
        drop(stale);
        assert!(
            path.exists(),
            "a dropped std listener leaves its socket file"
        );
        let listener = Listener::bind(&unix_options(&path, false)).expect("bind");
        let _client = UnixStream::connect(&path).expect("connect");
        let stream = listener.accept().expect("accept");
        assert!(matches!(stream, Stream::Unix(_)));
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let path = temp_path("regular");
        std::fs::write(&path, b"keep me").expect("write");
        let err = Listener::bind(&unix_options(&path, false)).expect_err("not a socket");
        assert!(matches!(err, MonitorError::NotASocket(p) if p == path));
        assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
        std::fs::remove_file(&path).expect("cleanup");
    }

    #[test]
    fn bind_errors_name_the_address() {
        let err = Listener::bind(&unix_options(
            std::path::Path::new("/nonexistent-dir/q.sock"),
            false,
        ))
        .expect_err("no such directory");
        assert!(matches!(err, MonitorError::BindUnix { .. }));
        assert_eq!(err.to_string(), "Cannot listen on /nonexistent-dir/q.sock");
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let opts = QmpOptions {
            address: QmpAddress::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            wait: false,
        };
        let err = Listener::bind(&opts).expect_err("port in use");
        assert!(
            matches!(err, MonitorError::BindTcp { ref address, .. } if *address == format!("127.0.0.1:{port}"))
        );
        let opts = QmpOptions {
            address: QmpAddress::Tcp {
                host: "no-such-host.invalid".into(),
                port: 1,
            },
            wait: false,
        };
        assert!(matches!(
            Listener::bind(&opts),
            Err(MonitorError::Resolve { .. })
        ));
    }

    #[test]
    fn wait_on_holds_until_a_client_connects() {
        let path = temp_path("wait.sock");
        let p2 = path.clone();
        let connector = std::thread::spawn(move || {
            // Retry until the listener exists.
            for _ in 0..500 {
                if let Ok(s) = UnixStream::connect(&p2) {
                    return s;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("listener never appeared");
        });
        let mut listener = Listener::bind(&unix_options(&path, true)).expect("bind and wait");
        let mut client = connector.join().expect("connector");
        let server_side = listener.take_waiting_client().expect("waited-for client");
        assert!(listener.take_waiting_client().is_none());
        assert_eq!(server_side.send(b"hi").expect("send"), 2);
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
        // The listener itself is non-blocking once waiting is over.
        let err = listener.accept().expect_err("nobody else connecting");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        client.write_all(b"x").expect("write");
    }

    #[test]
    fn send_to_a_vanished_client_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(b);
        let err = Stream::Unix(a).send(b"x").expect_err("peer gone");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
