//! The monitor's sockets on the main loop: [`Monitor`] owns the listening socket, the event channel's
//! eventfd and every client connection, all non-blocking, and is driven by the main loop's event
//! manager: the loop's subscriber calls [`Monitor::init`] once and [`Monitor::process`] for each
//! event, passing the [`MonitorBackend`] to act on (so the backend may borrow the state behind the
//! global lock that the loop holds). Every descriptor is registered with the one tag the loop gives
//! the monitor, and told apart by its file descriptor.
//!
//! Clients: several at once (up to [`MAX_CLIENTS`]; QEMU serves one per monitor and leaves
//! the next waiting in the backlog, which is what happens here past the limit: the listener stops
//! being watched until a client leaves). Each client has its own framer, session and output buffer.
//!
//! Fairness, as QEMU's monitor does it: a client gets at most one command run per wake-up, and
//! its next command waits until the reply to the last one has left (its output buffer is empty);
//! meanwhile nothing more is read from it. Commands a client pipelined and that were already read
//! are run one per loop iteration: the client is watched for writability, which a socket with
//! room in its buffer reports at once, so the loop comes back to it after serving every other
//! ready descriptor (the disks on the main loop, the other clients). A flood of requests thus gets
//! one command's share of each iteration, and the global lock (which every handler runs under) is
//! let go between commands, so the vCPUs waiting for it get their turn.
//!
//! A client that does not read its replies gets no more requests processed (QEMU suspends the
//! monitor the same way), and is dropped if events alone push its output past
//! [`OUTPUT_HARD_LIMIT`]. Writes use `MSG_NOSIGNAL`, so a client that vanishes mid-command costs a
//! failed write and its own connection, nothing else.
//!
//! Locking: the main loop calls [`Monitor`]'s handlers with the global lock held, and commands run
//! right there, synchronously, on the [`MonitorBackend`]; the monitor takes no lock of its own.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use serde_json::Value;

use super::backend::{MonitorBackend, RunState};
use super::commands::{Outcome, Session};
use super::events::EventReceiver;
use super::framing::JsonStreamer;
use super::listener::{Listener, Stream};
use super::protocol;

/// Most clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Output waiting for a client above which it is disconnected.
pub const OUTPUT_HARD_LIMIT: usize = 4 << 20;
/// Bytes read from a client per wake-up.
const READ_CHUNK: usize = 16 << 10;

/// One connected client.
#[derive(Debug)]
struct Client {
    stream: Stream,
    framer: JsonStreamer,
    session: Session,
    output: Vec<u8>,
    /// The event set currently registered for it.
    registered: EventSet,
    /// The client shut down its sending side: serve what was read, then close.
    eof: bool,
    /// To be removed at the end of this wake-up.
    dead: bool,
}

impl Client {
    /// A new client, with the greeting queued.
    fn new(stream: Stream) -> Self {
        let mut output = Vec::new();
        protocol::encode_into(&protocol::greeting(), &mut output);
        Self {
            stream,
            framer: JsonStreamer::default(),
            session: Session::default(),
            output,
            registered: EventSet::empty(),
            eof: false,
            dead: false,
        }
    }

    /// Whether its next request may run: every reply so far has left.
    fn may_run(&self) -> bool {
        self.output.is_empty() && !self.dead
    }

    /// The events to watch: input once every request read so far has been answered and sent;
    /// output while some is queued, or while requests read earlier wait for their turn (a socket
    /// with room is writable at once, which brings the loop back for the next one). Once the VM
    /// is `closing`, only queued output.
    fn wanted(&self, closing: bool) -> EventSet {
        let mut set = EventSet::empty();
        let runnable = self.framer.has_pending() && !closing;
        if !self.eof && !self.framer.has_pending() && self.output.is_empty() && !closing {
            set |= EventSet::IN;
        }
        if !self.output.is_empty() || runnable {
            set |= EventSet::OUT;
        }
        set
    }

    /// Writes as much queued output as the socket takes.
    fn flush(&mut self) {
        while !self.output.is_empty() && !self.dead {
            match self.stream.send(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("monitor: client write failed: {e}");
                    self.dead = true;
                }
            }
        }
    }

    /// Queues one message, dropping a client that lets output pile up past the hard limit.
    fn queue(&mut self, bytes: &[u8]) {
        if self.output.len() + bytes.len() > OUTPUT_HARD_LIMIT {
            log::warn!("monitor: dropping a client that does not read its replies");
            self.dead = true;
            return;
        }
        self.output.extend_from_slice(bytes);
    }

    /// Reads one chunk, unless earlier input still waits to be handled.
    fn read_some(&mut self) {
        if self.framer.has_pending() || self.eof || self.dead {
            return;
        }
        let mut buf = [0u8; READ_CHUNK];
        match self.stream.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self.framer.feed(buf.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::debug!("monitor: client read failed: {e}");
                self.dead = true;
            }
        }
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

/// The QMP monitor's sockets and sessions.
#[derive(Debug)]
pub struct Monitor {
    listener: Listener,
    events: EventReceiver,
    /// Clients by file descriptor.
    clients: BTreeMap<RawFd, Client>,
    /// The tag every descriptor of the monitor is registered with.
    tag: u32,
    /// The listener is watched (false while [`MAX_CLIENTS`] are connected).
    listening: bool,
    /// The client accepted before `init` registered anything (the `wait=on` client).
    unregistered: Option<RawFd>,
    /// The VM is shutting down: no more requests are read or run.
    closing: bool,
}

impl Monitor {
    /// A monitor serving `listener` (and the client it waited for, if any), delivering the events
    /// raised through the sender paired with `events`; its descriptors are registered with `tag`.
    pub fn new(mut listener: Listener, events: EventReceiver, tag: u32) -> Self {
        let waiting = listener.take_waiting_client();
        let mut monitor = Self {
            listener,
            events,
            clients: BTreeMap::new(),
            tag,
            listening: false,
            unregistered: None,
            closing: false,
        };
        if let Some(stream) = waiting {
            monitor.unregistered = Some(monitor.add_client(stream));
        }
        monitor
    }

    /// Stores a new client and sends its greeting.
    fn add_client(&mut self, stream: Stream) -> RawFd {
        let mut client = Client::new(stream);
        client.flush();
        let fd = client.fd();
        self.clients.insert(fd, client);
        fd
    }

    /// Accepts every waiting connection, up to [`MAX_CLIENTS`].
    fn accept_clients(&mut self, ops: &mut EventOps) {
        while self.clients.len() < MAX_CLIENTS {
            match self.listener.accept() {
                Ok(stream) => {
                    let fd = self.add_client(stream);
                    self.register(fd, ops);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // EMFILE and the like: try again on the next wake-up.
                    log::warn!("monitor: cannot accept a client: {e}");
                    break;
                }
            }
        }
    }

    /// Registers a client's descriptor with the event loop.
    fn register(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        client.registered = client.wanted(self.closing);
        if let Err(e) = ops.add(Events::with_data_raw(fd, self.tag, client.registered)) {
            log::warn!("monitor: cannot watch a client: {e}");
            client.dead = true;
            client.registered = EventSet::empty();
        }
    }

    /// Encodes an event once and queues it for every client in command mode (and `current`, the
    /// client being served, which is out of the map meanwhile).
    fn broadcast(&mut self, event: &Value, current: Option<&mut Client>) {
        let mut bytes = Vec::new();
        protocol::encode_into(event, &mut bytes);
        let others = self.clients.values_mut();
        for client in others.chain(current) {
            if client.session.receives_events() && !client.dead {
                client.queue(&bytes);
                client.flush();
            }
        }
    }

    /// Sends what one request produced: its events, then those raised through the channel
    /// meanwhile (a job's first status changes), then its reply, in QEMU's order.
    fn deliver(&mut self, client: &mut Client, outcome: Outcome) {
        for event in &outcome.events {
            self.broadcast(event, Some(&mut *client));
        }
        for event in self.events.drain() {
            self.broadcast(&event, Some(&mut *client));
        }
        let mut bytes = Vec::new();
        protocol::encode_into(&outcome.reply, &mut bytes);
        client.queue(&bytes);
        client.flush();
    }

    /// Runs the client's next buffered request, if its earlier replies have all left and the VM
    /// is not shutting down: once an exit is recorded (a `quit`, a signal, the guest powering
    /// off), requests still buffered are not run, so that clients racing to `quit` see one
    /// `SHUTDOWN` and nothing after it.
    fn run_one_request(&mut self, client: &mut Client, backend: &mut dyn MonitorBackend) {
        if backend.run_state() == RunState::Shutdown {
            self.closing = true;
        }
        if !client.may_run() || self.closing {
            return;
        }
        let Some(frame) = client.framer.next_frame() else {
            return;
        };
        let outcome = client.session.handle(frame, backend);
        self.deliver(client, outcome);
    }

    /// Serves one client's readiness: sends what is queued, reads when it may, and runs at most
    /// one request.
    fn serve(&mut self, fd: RawFd, set: EventSet, backend: &mut dyn MonitorBackend) {
        let Some(mut client) = self.clients.remove(&fd) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            client.flush();
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) && client.may_run() {
            client.read_some();
        }
        self.run_one_request(&mut client, backend);
        client.flush();
        // Gone for good: both directions shut, or half-closed, once everything read was run or
        // the VM is closing (a hang-up keeps being reported, so the loop comes back for each
        // remaining request).
        let hung_up = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if (hung_up && (!client.framer.has_pending() || self.closing))
            || (client.eof && !client.framer.has_pending() && client.output.is_empty())
        {
            client.dead = true;
        }
        self.clients.insert(fd, client);
    }

    /// Removes dead clients, updates what each remaining one is watched for, and watches the
    /// listener again once there is room.
    fn tidy(&mut self, ops: &mut EventOps) {
        let dead: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.dead)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in dead {
            if let Some(client) = self.clients.remove(&fd) {
                if let Err(e) = ops.remove(Events::with_data_raw(fd, self.tag, client.registered)) {
                    log::warn!("monitor: cannot unwatch a client: {e}");
                }
            }
        }
        for (fd, client) in &mut self.clients {
            let wanted = client.wanted(self.closing);
            if wanted != client.registered {
                match ops.modify(Events::with_data_raw(*fd, self.tag, wanted)) {
                    Ok(()) => client.registered = wanted,
                    Err(e) => log::warn!("monitor: cannot update a client's events: {e}"),
                }
            }
        }
        let want_listen = self.clients.len() < MAX_CLIENTS;
        if want_listen != self.listening {
            let set = if want_listen {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            match ops.modify(Events::with_data_raw(self.listener.fd(), self.tag, set)) {
                Ok(()) => self.listening = want_listen,
                Err(e) => log::warn!("monitor: cannot update the listener's events: {e}"),
            }
        }
    }
}

impl Monitor {
    /// Registers the listener, the event channel and the `wait=on` client with the event loop.
    pub fn init(&mut self, ops: &mut EventOps) {
        let listener = Events::with_data_raw(self.listener.fd(), self.tag, EventSet::IN);
        if let Err(e) = ops.add(listener) {
            log::error!("monitor: cannot watch the listening socket: {e}");
        } else {
            self.listening = true;
        }
        let wake = self.events.wake_fd().as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(wake, self.tag, EventSet::IN)) {
            log::error!("monitor: cannot watch the event channel: {e}");
        }
        if let Some(fd) = self.unregistered.take() {
            self.register(fd, ops);
        }
        self.tidy(ops);
    }

    /// Handles one event on one of the monitor's descriptors; commands act on `backend`.
    pub fn process(
        &mut self,
        backend: &mut dyn MonitorBackend,
        events: Events,
        ops: &mut EventOps,
    ) {
        let fd = events.fd();
        if fd == self.listener.fd() {
            self.accept_clients(ops);
        } else if fd == self.events.wake_fd().as_raw_fd() {
            for event in self.events.drain() {
                self.broadcast(&event, None);
            }
        } else {
            self.serve(fd, events.event_set(), backend);
        }
        self.tidy(ops);
    }
}

impl Drop for Monitor {
    /// Delivers events raised while the main loop was winding down (the guest's `SHUTDOWN`) and
    /// gives every client one last non-blocking write.
    fn drop(&mut self) {
        let mut bytes = Vec::new();
        for event in self.events.drain() {
            protocol::encode_into(&event, &mut bytes);
        }
        for client in self.clients.values_mut() {
            if client.session.receives_events() {
                client.output.extend_from_slice(&bytes);
            }
            client.flush();
        }
    }
}
