//! The monitor over real sockets: a [`Monitor`] on an event-manager loop in its own thread (as the
//! main loop runs it), driven by clients written here and by QEMU's Python client (`qemu.qmp`) and
//! `qmp-shell`. The backend is the call-recording test backend, not a VM.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde_json::{json, Value};

use super::events::EventSender;
use super::server::MAX_CLIENTS;
use super::test_backend::RecordingBackend;
use super::*;

/// The monitor and the test backend as one event-manager subscriber, as a main loop would hold them.
struct Subscriber {
    monitor: Monitor,
    backend: RecordingBackend,
}

impl MutEventSubscriber for Subscriber {
    fn init(&mut self, ops: &mut EventOps) {
        self.monitor.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.monitor.process(&mut self.backend, events, ops);
    }
}

/// A monitor on its own event loop.
struct Harness {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Signalled by the loop thread once it stopped polling (the monitor is still alive).
    stopped: mpsc::Receiver<()>,
    /// Tells the loop thread to drop the monitor.
    finish: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
    calls: Arc<Mutex<Vec<String>>>,
    events: EventSender,
    tcp_port: Option<u16>,
}

impl Harness {
    fn start(name: &str, state: RunState) -> Self {
        let path = std::env::temp_dir().join(format!("vmm-qmp-{}-{name}.sock", std::process::id()));
        Self::start_with(path.clone(), QmpAddress::Unix(path), state)
    }

    fn start_with(path: PathBuf, address: QmpAddress, state: RunState) -> Self {
        Self::start_backend(path, address, RecordingBackend::new(state))
    }

    fn start_backend(path: PathBuf, address: QmpAddress, mut backend: RecordingBackend) -> Self {
        let listener = Listener::bind(&QmpOptions {
            address,
            wait: false,
        })
        .expect("bind");
        let tcp_port = listener.tcp_port();
        let (events, receiver) = event_channel().expect("event channel");
        backend.job_events = Some(events.clone());
        let calls = Arc::clone(&backend.calls);
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped_tx, stopped) = mpsc::channel();
        let (finish, finish_rx) = mpsc::channel::<()>();
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut manager = EventManager::<Subscriber>::new().expect("epoll");
            manager.add_subscriber(Subscriber {
                monitor: Monitor::new(listener, receiver, 7),
                backend,
            });
            while !stop2.load(Ordering::Acquire) {
                manager.run_with_timeout(20).expect("event loop");
            }
            // The receiving side may be gone already; the drop below is what matters.
            let _ = stopped_tx.send(());
            let _ = finish_rx.recv();
            drop(manager);
        });
        Self {
            path,
            stop,
            stopped,
            finish,
            thread: Some(thread),
            calls,
            events,
            tcp_port,
        }
    }

    fn connect(&self) -> Client {
        Client::new(UnixStream::connect(&self.path).expect("connect"))
    }

    /// Connects and negotiates.
    fn session(&self) -> Client {
        let mut c = self.connect();
        c.greeting();
        assert_eq!(
            c.cmd(r#"{"execute": "qmp_capabilities"}"#),
            json!({"return": {}})
        );
        c
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("log").clone()
    }

    /// Stops the loop, then drops the monitor once `before_drop` has run.
    fn shut_down(mut self, before_drop: impl FnOnce(&EventSender)) {
        self.stop.store(true, Ordering::Release);
        self.stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("loop stopped");
        before_drop(&self.events);
        self.finish.send(()).expect("loop thread waiting");
        if let Some(t) = self.thread.take() {
            t.join().expect("loop thread");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The thread may be gone already (shut_down); nothing to report then.
        let _ = self.finish.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A blocking test client reading one message per line.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        Self {
            reader: BufReader::new(stream),
            writer,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read");
        assert!(line.ends_with("\r\n"), "message ends with CRLF: {line:?}");
        line
    }

    fn recv(&mut self) -> Value {
        serde_json::from_str(&self.line()).expect("JSON message")
    }

    /// The next message that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let message = self.recv();
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    fn cmd(&mut self, request: &str) -> Value {
        self.send(request.as_bytes());
        self.recv()
    }

    fn greeting(&mut self) -> Value {
        let g = self.recv();
        assert!(g["QMP"]["version"]["qemu"].is_object(), "{g}");
        g
    }

    /// Nothing arrives within `ms`.
    fn assert_silent(&mut self, ms: u64) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        let err = self
            .reader
            .read(&mut byte)
            .expect_err("no message expected");
        assert!(matches!(
            err.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
    }
}

#[test]
fn greeting_negotiation_and_wire_format() {
    let h = Harness::start("wire", RunState::Running);
    let mut c = h.connect();
    let greeting = c.line();
    assert!(greeting.starts_with("{\"QMP\": {"), "{greeting}");
    assert!(greeting.contains("\"capabilities\": []"), "{greeting}");
    let reply = c.cmd(r#"{"execute": "query-status", "id": "early"}"#);
    assert_eq!(reply["error"]["class"], "CommandNotFound");
    assert_eq!(reply["id"], "early");
    c.send(br#"{"execute":"qmp_capabilities","id":1}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 1}\r\n");
    let status = c.cmd(r#"{"execute": "query-status"}"#);
    assert_eq!(
        status,
        json!({"return": {"running": true, "status": "running"}})
    );
}

#[test]
fn framing_over_the_socket() {
    let h = Harness::start("framing", RunState::Running);
    let mut c = h.session();
    // Split across writes, with no newline.
    c.send(br#"{"execute": "query-"#);
    std::thread::sleep(Duration::from_millis(50));
    c.send(br#"version", "id": 2}"#);
    assert_eq!(c.recv()["id"], 2);
    // Several requests in one write are answered in order.
    c.send(br#"{"execute": "query-status", "id": "a"}{"execute": "query-status", "id": "b"}"#);
    assert_eq!(c.recv()["id"], "a");
    assert_eq!(c.recv()["id"], "b");
}

#[test]
fn malformed_input_keeps_the_connection_usable() {
    let h = Harness::start("malformed", RunState::Running);
    let mut c = h.session();
    // As from QEMU: the lexical error, then the stray closing brace after it.
    let reply = c.cmd("{\"execute\": query-status}");
    assert_eq!(reply["error"]["class"], "GenericError");
    assert_eq!(reply["error"]["desc"], "JSON parse error, stray '-s'");
    assert!(reply.get("id").is_none());
    assert_eq!(
        c.recv()["error"]["desc"],
        "JSON parse error, expecting value"
    );
    // A half-sent request abandoned with 0xFF, as the QMP spec suggests, then a good one.
    c.send(b"{\"execute\": \"stop\", \"argu\xff");
    assert_eq!(
        c.recv()["error"]["desc"],
        "JSON parse error, stray '\"argu\u{fffd}'"
    );
    assert_eq!(c.cmd(r#"{"execute": "query-status", "id": 3}"#)["id"], 3);
    assert_eq!(
        c.cmd("}")["error"]["desc"],
        "JSON parse error, expecting value"
    );
    assert_eq!(
        c.cmd(r#"{"execute": "nope"}"#)["error"]["class"],
        "CommandNotFound"
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-block", "arguments": {"x": 1}}"#)["error"]["desc"],
        "Parameter 'x' is unexpected"
    );
    // An oversized request is skipped, not buffered, and answered with one error.
    let mut big = b"{\"execute\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', framing::MAX_REQUEST_BYTES + 1));
    big.extend_from_slice(b"\"}");
    c.send(&big);
    let desc = c.recv()["error"]["desc"].as_str().expect("desc").to_owned();
    assert_eq!(desc, "JSON token size limit exceeded");
    assert_eq!(c.cmd(r#"{"execute": "query-status", "id": 4}"#)["id"], 4);
    assert!(h.calls().is_empty());
}

#[test]
fn events_reach_every_negotiated_client() {
    let h = Harness::start("events", RunState::Running);
    let mut a = h.session();
    let mut b = h.session();
    let mut unnegotiated = h.connect();
    unnegotiated.greeting();
    // Events raised by a command precede its reply, as in QEMU.
    a.send(br#"{"execute": "stop", "id": "s"}"#);
    let first = a.recv();
    assert_eq!(first["event"], "STOP");
    assert!(first["timestamp"]["microseconds"].is_u64());
    assert_eq!(a.recv(), json!({"return": {}, "id": "s"}));
    assert_eq!(b.recv()["event"], "STOP");
    a.send(br#"{"execute": "system_powerdown"}"#);
    assert_eq!(a.recv()["event"], "POWERDOWN");
    assert_eq!(a.recv(), json!({"return": {}}));
    assert_eq!(b.recv()["event"], "POWERDOWN");
    // An event raised by the VM from another thread.
    let sender = h.events.clone();
    std::thread::spawn(move || sender.send(QmpEvent::Shutdown(ShutdownCause::GuestShutdown)))
        .join()
        .expect("sender");
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "SHUTDOWN");
        assert_eq!(
            e["data"],
            json!({"guest": true, "reason": "guest-shutdown"})
        );
    }
    // Clients still negotiating get no events.
    unnegotiated.assert_silent(100);
    assert_eq!(h.calls(), ["pause", "powerdown"]);
}

/// A job raises its first events (`created`, `running`) from the channel while its command
/// runs: they precede the command's reply, as QEMU's do.
#[test]
fn a_job_s_first_events_precede_its_command_s_reply() {
    let h = Harness::start("job-events", RunState::Running);
    let mut a = h.session();
    a.send(br#"{"execute": "block-stream", "arguments": {"device": "d0", "job-id": "j"}}"#);
    for status in ["created", "running"] {
        let e = a.recv();
        assert_eq!(e["event"], "JOB_STATUS_CHANGE", "{e}");
        assert_eq!(e["data"], json!({"id": "j", "status": status}));
    }
    assert_eq!(a.recv(), json!({"return": {}}));
}

#[test]
fn a_vanished_client_harms_nothing() {
    let h = Harness::start("vanish", RunState::Running);
    let mut survivor = h.session();
    for request in [
        &br#"{"execute": "qmp_capabilities"}{"execute": "query-blockstats"}"#[..],
        br#"{"execute": "qmp_capabilities"}{"execute": "stop"}"#,
        br#"{"execute": "query-sta"#,
    ] {
        let mut gone = h.connect();
        gone.send(request);
        drop(gone);
    }
    // Hang up before even reading the greeting.
    drop(UnixStream::connect(&h.path).expect("connect"));
    // Whether the commands of a client that left ran depends on when its hang-up was seen (a
    // reply that cannot be written ends its session); either way the survivor is served, and sees
    // one STOP for each pause, in order with its replies.
    survivor.send(br#"{"execute": "query-status", "id": 1}"#);
    let mut stops = 0;
    let reply = loop {
        let msg = survivor.recv();
        if msg["event"] == "STOP" {
            stops += 1;
        } else {
            break msg;
        }
    };
    assert_eq!(reply["id"], 1);
    // The status is that of the moment of the query: paused exactly when a STOP came first.
    assert_eq!(reply["return"]["running"], stops == 0);
    // A pause that ran after the reply (and before this look) is followed by its STOP.
    let calls = h.calls();
    let pauses = calls.iter().filter(|c| *c == "pause").count();
    if pauses > stops {
        assert_eq!(survivor.recv()["event"], "STOP");
        stops += 1;
    }
    assert_eq!(pauses, stops);
    assert!(stops <= 1);
    assert!(
        calls
            .iter()
            .all(|c| c == "pause" || c.starts_with("stats ")),
        "{calls:?}"
    );
}

#[test]
fn a_client_that_does_not_read_is_throttled_not_lost() {
    let h = Harness::start("backpressure", RunState::Running);
    let mut c = h.session();
    const N: usize = 3000;
    let mut writer = c.writer.try_clone().expect("clone");
    // Far more reply bytes than the soft limit and the socket buffers hold, written without
    // reading: the monitor stops reading until the client catches up.
    let t = std::thread::spawn(move || {
        for i in 0..N {
            let req = format!(r#"{{"execute": "query-block", "id": {i}}}"#);
            writer.write_all(req.as_bytes()).expect("write");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..N {
        let reply = c.recv();
        assert_eq!(reply["id"], i, "replies in order");
        assert_eq!(reply["return"][0]["device"], "d0");
    }
    t.join().expect("writer");
    assert_eq!(
        c.cmd(r#"{"execute": "query-status", "id": "end"}"#)["id"],
        "end"
    );
}

#[test]
fn a_pipelined_flood_gets_one_command_per_wake_up() {
    // Each query-blockstats takes 2 ms (two disks); 300 of them, pipelined in one write, are
    // read in one go. A second client arriving meanwhile must not wait for all of them: it is
    // served between two of the flood's commands, as each of its own round trips is.
    let path = std::env::temp_dir().join(format!("vmm-qmp-{}-fair.sock", std::process::id()));
    let mut backend = RecordingBackend::new(RunState::Running);
    backend.stats_delay = Duration::from_millis(1);
    let h = Harness::start_backend(path.clone(), QmpAddress::Unix(path), backend);
    const N: usize = 300;
    let mut flood = h.session();
    let burst: String = (0..N)
        .map(|i| format!(r#"{{"execute":"query-blockstats","id":{i}}}"#))
        .collect();
    flood.send(burst.as_bytes());
    // Read as they come, so no backpressure stops the flood.
    let reader = std::thread::spawn(move || {
        for i in 0..N {
            assert_eq!(
                flood.reply()["id"],
                i,
                "the flood's replies, all and in order"
            );
        }
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut other = h.session();
    other.send(br#"{"execute": "system_powerdown"}"#);
    assert_eq!(other.reply(), json!({"return": {}}));
    let calls = h.calls();
    let before = calls.iter().position(|c| c == "powerdown").expect("ran");
    // Two stats calls per flood command; three round trips of the second client behind one
    // flood command each, plus the flood's head start, stay far below the whole burst.
    assert!(before < N, "{} flood commands ran first", before / 2);
    reader.join().expect("flood reader");
}

#[test]
fn clients_past_the_limit_wait_in_the_backlog() {
    let h = Harness::start("limit", RunState::Running);
    let mut clients: Vec<Client> = (0..MAX_CLIENTS)
        .map(|_| {
            let mut c = h.connect();
            c.greeting();
            c
        })
        .collect();
    let mut late = h.connect();
    late.assert_silent(200);
    clients.pop();
    late.greeting();
    assert_eq!(
        late.cmd(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
}

#[test]
fn tcp_listener_serves_qmp() {
    let h = Harness::start_with(
        PathBuf::new(),
        QmpAddress::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        },
        RunState::Paused,
    );
    let port = h.tcp_port.expect("tcp port");
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut w = stream.try_clone().expect("clone");
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    assert!(line.starts_with("{\"QMP\""));
    w.write_all(br#"{"execute": "qmp_capabilities"}{"execute": "cont"}"#)
        .expect("write");
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        r.read_line(&mut l).expect("reply");
        lines.push(serde_json::from_str::<Value>(&l).expect("json"));
    }
    assert_eq!(lines[0], json!({"return": {}}));
    assert_eq!(lines[1]["event"], "RESUME");
    assert_eq!(lines[2], json!({"return": {}}));
}

#[test]
fn racing_quits_raise_one_shutdown_and_nothing_after_it() {
    let h = Harness::start("quit-race", RunState::Running);
    let mut clients: Vec<Client> = (0..4).map(|_| h.session()).collect();
    for c in &mut clients {
        c.send(br#"{"execute": "quit"}{"execute": "query-status"}"#);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut shutdowns = 0;
        let mut after = Vec::new();
        c.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut line = String::new();
        while c.reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            let message: Value = serde_json::from_str(&line).expect("JSON message");
            line.clear();
            if message["event"] == "SHUTDOWN" {
                shutdowns += 1;
            } else if shutdowns > 0 {
                after.push(message);
            }
        }
        assert_eq!(shutdowns, 1, "client {i}");
        // At most the reply to the quit that raised it.
        assert!(
            after.is_empty() || after == [json!({"return": {}})],
            "client {i}: {after:?}"
        );
    }
    assert_eq!(h.calls(), ["quit"]);
}

#[test]
fn events_raised_while_the_loop_winds_down_are_still_delivered() {
    let h = Harness::start("final", RunState::Running);
    let mut c = h.session();
    let path = h.path.clone();
    h.shut_down(|events| events.send(QmpEvent::Shutdown(ShutdownCause::HostSignal)));
    let e = c.recv();
    assert_eq!(e["data"], json!({"guest": false, "reason": "host-signal"}));
    // Then the connection closes and the socket file is gone.
    let mut rest = String::new();
    assert_eq!(c.reader.read_line(&mut rest).expect("eof"), 0);
    assert!(!Path::new(&path).exists());
}

/// Runs `vmm/tests/qmp/SCRIPT ARGS` with the Python of the venv that ci/qmp-venv makes (ci/setup
/// runs it), which has `qemu.qmp`; fails with the script's output unless it succeeds.
fn run_python(script: &str, args: &[&Path]) -> String {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = manifest.join("../.venv/qmp/bin/python3");
    assert!(
        python.exists(),
        "{} is missing: run ci/qmp-venv (ci/setup runs it)",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(manifest.join("tests/qmp").join(script))
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    println!("{stdout}");
    stdout
}

#[test]
fn qemu_qmp_client_and_qmp_shell_work_unchanged() {
    let h = Harness::start("qemu-qmp", RunState::Running);
    let stdout = run_python("qemu_client.py", &[&h.path]);
    let calls = h.calls();
    let expected = [
        "histogram d0 Set(HistogramBoundaries { read: Some([10000, 50000]), write: Some([10000, 50000]), flush: Some([10000, 50000]) })",
        "pause",
        "resume",
        "powerdown",
        "histogram d1 Set(HistogramBoundaries { read: None, write: Some([1000, 2000]), flush: None })",
        "quit",
    ];
    let acting: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| !c.starts_with("stats "))
        .collect();
    assert_eq!(acting, expected, "{stdout}");
}

/// A QEMU 10 under `-S` with the same iothread, drive and device ids as the test backend.
struct Qemu {
    child: std::process::Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Qemu {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-qmp-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // A qcow2 over a raw base, like the test backend's chain.
        let base = dir.join("base.raw");
        let image = dir.join("top.qcow2");
        for args in [
            vec!["create", "-q", "-f", "raw", path_str(&base), "64M"],
            vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                path_str(&base),
                path_str(&image),
            ],
        ] {
            let status = std::process::Command::new("qemu-img")
                .args(&args)
                .status()
                .expect("qemu-img is missing: run ci/setup");
            assert!(status.success(), "qemu-img {args:?} failed");
        }
        let socket = dir.join("qemu.sock");
        let child = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "microvm",
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-S", "-object", "iothread,id=io0", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=d0",
                image.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0,id=vd0,iothread=io0"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is missing: run ci/setup");
        for _ in 0..500 {
            if UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket, dir }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // QEMU normally exited on the script's `quit`; these only clean up after a failure.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn replies_match_qemu_10() {
    let qemu = Qemu::start("compare");
    let h = Harness::start("compare", RunState::Prelaunch);
    run_python("compare_with_qemu.py", &[&h.path, &qemu.socket]);
}

/// Random bytes and mutated requests through the framer and the session: no panic, one reply per
/// frame, and a well-formed request still answered afterwards.
#[test]
fn hostile_input_never_panics() {
    // xorshift64: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds: [&[u8]; 4] = [
        br#"{"execute": "qmp_capabilities"}"#,
        br#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries": [1, 2]}, "id": [1]}"#,
        br#"{"execute": "query-blockstats", "arguments": {"query-nodes": false}}"#,
        b"[{\"\\u00e9\": \"\\\"}\"}, 1e999, -0, null]",
    ];
    let mut backend = RecordingBackend::new(RunState::Running);
    for round in 0..2000 {
        let seed = seeds[usize::try_from(next() % 4).expect("small")];
        let mut input = seed.to_vec();
        for _ in 0..(next() % 6) {
            let pos = usize::try_from(next() % (input.len() as u64 + 1)).expect("small");
            let byte = u8::try_from(next() & 0xff).expect("masked");
            match next() % 3 {
                0 => input.insert(pos, byte),
                1 if pos < input.len() => input[pos] = byte,
                _ => input.truncate(pos),
            }
        }
        let mut session = commands::Session::default();
        let mut framer = framing::JsonStreamer::default();
        framer.feed(&input);
        framer.feed(b" \xff {\"execute\": \"qmp_capabilities\"} {\"execute\": \"query-status\", \"id\": \"last\"}");
        let mut last = None;
        while let Some(frame) = framer.next_frame() {
            let outcome = session.handle(frame, &mut backend);
            assert!(outcome.reply.is_object(), "round {round}");
            last = Some(outcome.reply);
        }
        let last = last.expect("the trailing request is framed");
        assert_eq!(last["id"], "last", "round {round}: {input:?}");
        assert!(
            last["return"]["status"].is_string(),
            "round {round}: {last}"
        );
    }
}

#[test]
fn a_client_buried_in_events_is_dropped_and_others_carry_on() {
    let h = Harness::start("flood", RunState::Running);
    let mut idle = h.session();
    let mut busy = h.session();
    // About 100 bytes each: far past the hard limit for a client that never reads.
    let n = server::OUTPUT_HARD_LIMIT / 50;
    let sender = h.events.clone();
    let reader = std::thread::spawn(move || {
        // The busy client reads everything; it must see every event.
        let mut seen = 0;
        while seen < n {
            assert_eq!(busy.recv()["event"], "POWERDOWN");
            seen += 1;
        }
        busy
    });
    for _ in 0..n {
        sender.send(QmpEvent::Powerdown);
    }
    let mut busy = reader.join().expect("busy reader");
    // The idle client was cut off: what it was sent before that, then end of stream.
    let mut received = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        match idle.reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => received += 1,
            Err(e) => panic!("idle client: {e}"),
        }
    }
    assert!(received < n, "dropped before all {n} events ({received})");
    assert_eq!(busy.cmd(r#"{"execute": "query-status", "id": 9}"#)["id"], 9);
}
