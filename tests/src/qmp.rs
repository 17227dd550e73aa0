//! A minimal QMP client over TCP (QEMU's `docs/interop/qmp-spec.rst`): enough to negotiate
//! capabilities and run commands, for the power-button and block-resize cases. The VMM listens with
//! `-qmp tcp:127.0.0.1:PORT,server=on,wait=off`; the nested host brings loopback up for it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// How long to keep trying to connect while the VMM starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No free local port could be found.
    #[error("cannot find a free TCP port")]
    Port(#[source] std::io::Error),
    /// The monitor never accepted a connection.
    #[error("cannot connect to the QMP monitor on port {port}")]
    Connect {
        /// The port.
        port: u16,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("QMP connection failed")]
    Io(#[source] std::io::Error),
    /// The monitor closed the connection before replying.
    #[error("the QMP monitor closed the connection while {0}")]
    Closed(&'static str),
    /// A reply was not what QMP promises (greeting with "QMP", or a "return").
    #[error("unexpected QMP reply to {what}: {reply}")]
    Reply {
        /// What was expected.
        what: &'static str,
        /// The line received.
        reply: String,
    },
}

/// A free TCP port on 127.0.0.1 for the VMM's monitor.
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(Error::Port)?;
    Ok(listener.local_addr().map_err(Error::Port)?.port())
}

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Qmp {
    /// Connects to 127.0.0.1:`port`, retrying while the VMM starts, reads the greeting and
    /// negotiates capabilities.
    pub fn connect(port: u16) -> Result<Self, Error> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(Error::Connect { port, source })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(Error::Io)?;
        let writer = stream.try_clone().map_err(Error::Io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line("reading the greeting")?;
        if !greeting.contains("\"QMP\"") {
            return Err(Error::Reply {
                what: "the connection (a greeting)",
                reply: greeting,
            });
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn line(&mut self, doing: &'static str) -> Result<String, Error> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(Error::Io)? == 0 {
            return Err(Error::Closed(doing));
        }
        Ok(line.trim_end().to_owned())
    }

    /// Runs a command without arguments and waits for its `return`, skipping events.
    pub fn execute(&mut self, command: &'static str) -> Result<(), Error> {
        self.execute_with(command, "{}")
    }

    /// Runs a command with `arguments` (a JSON object) and waits for its `return`, skipping
    /// events.
    pub fn execute_with(&mut self, command: &'static str, arguments: &str) -> Result<(), Error> {
        writeln!(
            self.writer,
            "{{\"execute\": \"{command}\", \"arguments\": {arguments}}}"
        )
        .map_err(Error::Io)?;
        loop {
            let reply = self.line("waiting for a reply")?;
            if reply.contains("\"event\"") {
                continue;
            }
            if reply.contains("\"return\"") {
                return Ok(());
            }
            return Err(Error::Reply {
                what: command,
                reply,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A stand-in monitor that greets, answers each command with `reply`, and sends an event first.
    fn monitor(reply: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(
                w,
                "{{\"QMP\": {{\"version\": {{}}, \"capabilities\": []}}}}"
            )
            .unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let answer = if line.contains("qmp_capabilities") {
                    "{\"return\": {}}"
                } else {
                    reply
                };
                writeln!(w, "{{\"event\": \"RESUME\"}}\n{answer}").unwrap();
                line.clear();
            }
        });
        port
    }

    #[test]
    fn negotiates_and_runs_a_command() {
        let mut q = Qmp::connect(monitor("{\"return\": {}}")).unwrap();
        q.execute("system_powerdown").unwrap();
    }

    #[test]
    fn an_error_reply_is_reported() {
        let mut q = Qmp::connect(monitor("{\"error\": {\"class\": \"CommandNotFound\"}}")).unwrap();
        let err = q.execute("system_powerdown").unwrap_err();
        assert!(matches!(
            err,
            Error::Reply {
                what: "system_powerdown",
                ..
            }
        ));
    }

    #[test]
    fn free_ports_are_found() {
        assert!(free_port().unwrap() > 0);
    }
}
