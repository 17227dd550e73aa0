//! A guest running under an inner VMM (ours or QEMU), driven through its serial console.
//!
//! The VMM is a child process whose stdin and stdout are the guest's serial console. Two reader
//! threads (stdout, stderr) send what they read, with the time it arrived, over a channel; the
//! [`Guest`] owns everything else (no locks): it assembles complete lines, keeps the trailing
//! partial line (a shell prompt has no newline), and answers "wait until the console shows X". The
//! child is killed when the `Guest` is dropped, so a failing case never leaves a VMM behind.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often [`Guest::wait_exit`] polls the child.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Errors of a guest run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VMM process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program that failed to start.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console did not show the expected text in time.
    #[error("no {wanted:?} on the console within {timeout:?}")]
    Timeout {
        /// What was awaited.
        wanted: String,
        /// How long it was awaited.
        timeout: Duration,
    },
    /// The VMM closed its console (exited) before the expected text appeared.
    #[error("the VMM ended before {wanted:?} appeared on the console")]
    Ended {
        /// What was awaited.
        wanted: String,
    },
    /// Writing to the guest's console failed.
    #[error("cannot write to the guest console")]
    Send(#[source] std::io::Error),
    /// Waiting for the VMM process failed.
    #[error("cannot wait for the VMM process")]
    Wait(#[source] std::io::Error),
    /// The VMM did not exit in time.
    #[error("the VMM did not exit within {0:?}")]
    NoExit(Duration),
}

/// One complete console line and when it arrived, counted from the VMM's start.
#[derive(Debug, Clone)]
pub struct Line {
    /// Time since the VMM was started.
    pub at: Duration,
    /// The line, without its line ending.
    pub text: String,
}

/// What a reader thread sends.
enum Event {
    /// Bytes from stdout (`true`) or stderr (`false`), and when they arrived.
    Data(bool, Instant, Vec<u8>),
    /// One of the two streams ended.
    Closed,
}

/// A running VMM with a guest inside, and everything its console printed so far.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Event>,
    started: Instant,
    /// The same moment as Unix time, to read the VMM's own wall-clock log against.
    started_unix: Duration,
    lines: Vec<Line>,
    partial: Vec<u8>,
    stderr_partial: Vec<u8>,
    /// Lines before this index were already matched by a `wait_*` call.
    cursor: usize,
    open_streams: u8,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Data(out, _, bytes) => write!(f, "Data({out}, {} bytes)", bytes.len()),
            Event::Closed => write!(f, "Closed"),
        }
    }
}

fn reader(mut stream: impl Read, stdout: bool, tx: Sender<Event>) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let data = buf.get(..n).unwrap_or_default().to_vec();
                if tx.send(Event::Data(stdout, Instant::now(), data)).is_err() {
                    return;
                }
            }
        }
    }
    // The receiver may be gone already; nothing to do then.
    let _ = tx.send(Event::Closed);
}

impl Guest {
    /// Starts `command` with its stdin, stdout and stderr on pipes.
    pub fn spawn(mut command: Command) -> Result<Self, Error> {
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        // A clock before 1970 would be a broken host; then the VMM's log cannot be placed.
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut child = command
            .spawn()
            .map_err(|source| Error::Spawn { program, source })?;
        let (tx, events) = channel();
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            thread::spawn(move || reader(out, true, tx));
        }
        if let Some(err) = child.stderr.take() {
            thread::spawn(move || reader(err, false, tx));
        }
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            events,
            started,
            started_unix,
            lines: Vec::new(),
            partial: Vec::new(),
            stderr_partial: Vec::new(),
            cursor: 0,
            open_streams: 2,
            status: None,
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the VMM was started, as Unix time.
    pub fn started_unix(&self) -> Duration {
        self.started_unix
    }

    /// The complete console lines so far, in order.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// Takes in what the readers sent, waiting at most `timeout` for the first event.
    fn pump(&mut self, timeout: Duration) {
        match self.events.recv_timeout(timeout) {
            Ok(event) => self.take(event),
            Err(RecvTimeoutError::Timeout) => return,
            // Both readers are gone; their Closed events were taken already.
            Err(RecvTimeoutError::Disconnected) => {
                self.open_streams = 0;
                return;
            }
        }
        while let Ok(event) = self.events.try_recv() {
            self.take(event);
        }
    }

    /// Waits for more console output until `deadline`: Err once the time is up or the console
    /// closed for good.
    fn more(&mut self, wanted: &str, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        if self.open_streams == 0 {
            return Err(Error::Ended {
                wanted: wanted.to_owned(),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                wanted: wanted.to_owned(),
                timeout,
            });
        }
        self.pump(deadline - now);
        Ok(())
    }

    fn take(&mut self, event: Event) {
        match event {
            Event::Closed => {
                self.open_streams = self.open_streams.saturating_sub(1);
                if self.open_streams == 0 {
                    let at = self.started.elapsed();
                    for (buf, prefix) in [
                        (&mut self.partial, ""),
                        (&mut self.stderr_partial, "[stderr] "),
                    ] {
                        if !buf.is_empty() {
                            let text = format!(
                                "{prefix}{}",
                                String::from_utf8_lossy(buf).trim_end_matches('\r')
                            );
                            self.lines.push(Line { at, text });
                            buf.clear();
                        }
                    }
                }
            }
            Event::Data(stdout, when, bytes) => {
                let at = when.duration_since(self.started);
                let (buf, prefix) = if stdout {
                    (&mut self.partial, "")
                } else {
                    (&mut self.stderr_partial, "[stderr] ")
                };
                for b in bytes {
                    if b == b'\n' {
                        let text = String::from_utf8_lossy(buf);
                        let text = format!("{prefix}{}", text.trim_end_matches('\r'));
                        self.lines.push(Line { at, text });
                        buf.clear();
                    } else {
                        buf.push(b);
                    }
                }
            }
        }
    }

    /// Waits until a console line not matched before satisfies `pred`, and returns it.
    pub fn wait_line(
        &mut self,
        wanted: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .lines
                .iter()
                .enumerate()
                .skip(self.cursor)
                .find(|(_, l)| pred(&l.text));
            if let Some((index, line)) = found {
                let line = line.clone();
                self.cursor = index + 1;
                return Ok(line);
            }
            self.more(wanted, deadline, timeout)?;
        }
    }

    /// Waits for a line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Line, Error> {
        self.wait_line(needle, timeout, |l| l.contains(needle))
    }

    /// Waits until the unfinished last line (a prompt, say) contains `needle`.
    pub fn wait_prompt(&mut self, needle: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if String::from_utf8_lossy(&self.partial).contains(needle) {
                return Ok(());
            }
            self.more(needle, deadline, timeout)?;
        }
    }

    /// Types `text` on the guest's serial console.
    pub fn send(&mut self, text: &str) -> Result<(), Error> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            Error::Send(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin closed",
            ))
        })?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(Error::Send)
    }

    /// Waits for the VMM to exit, collecting its console output meanwhile, and returns its status
    /// and when it exited (counted from its start).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(Error::Wait)? {
                let at = self.started.elapsed();
                self.status = Some(status);
                // Collect what is still in the pipes.
                let drained = Instant::now() + Duration::from_secs(2);
                while self.open_streams > 0 && Instant::now() < drained {
                    self.pump(Duration::from_millis(100));
                }
                return Ok((status, at));
            }
            if Instant::now() >= deadline {
                return Err(Error::NoExit(timeout));
            }
            if self.open_streams == 0 {
                thread::sleep(EXIT_POLL);
            } else {
                self.pump(EXIT_POLL);
            }
        }
    }

    /// Everything the console printed so far, one line each with its arrival time.
    pub fn transcript(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            out.push_str(&format!("{:>8.3} {}\n", l.at.as_secs_f64(), l.text));
        }
        if !self.partial.is_empty() {
            out.push_str(&format!(
                "         {}\n",
                String::from_utf8_lossy(&self.partial)
            ));
        }
        out
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.status.is_none() {
            // The VMM may have exited meanwhile; either way it is gone after this.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Guest {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        Guest::spawn(c).unwrap()
    }

    #[test]
    fn lines_prompts_and_input_round_trip() {
        let mut g =
            sh("echo one; printf 'PROMPT# '; read x; echo \"got $x\"; echo err >&2; exit 3");
        let l = g.wait_for("one", Duration::from_secs(5)).unwrap();
        assert_eq!(l.text, "one");
        g.wait_prompt("PROMPT#", Duration::from_secs(5)).unwrap();
        g.send("typed\n").unwrap();
        g.wait_line("got", Duration::from_secs(5), |l| l.ends_with("got typed"))
            .unwrap();
        let (status, _) = g.wait_exit(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(g.transcript().contains("[stderr] err"));
    }

    #[test]
    fn a_line_is_matched_once() {
        let mut g = sh("echo same; echo same; sleep 0.1");
        g.wait_for("same", Duration::from_secs(5)).unwrap();
        g.wait_for("same", Duration::from_secs(5)).unwrap();
        let err = g.wait_for("same", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, Error::Ended { .. }), "{err}");
    }

    #[test]
    fn timeout_and_no_exit_are_reported() {
        let mut g = sh("sleep 5");
        let err = g.wait_for("never", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let err = g.wait_exit(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, Error::NoExit(_)), "{err}");
    }

    #[test]
    fn spawn_failure_names_the_program() {
        let err = Guest::spawn(Command::new("/nonexistent/vmm")).unwrap_err();
        assert!(matches!(err, Error::Spawn { ref program, .. } if program == "/nonexistent/vmm"));
    }
}
