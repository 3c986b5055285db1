//! The agent's one thread: a single `mio::Poll` over the transport, a
//! signalfd for SIGCHLD (and the shutdown signals), and every session's
//! PTY master or pipes.
//!
//! Each turn of the loop: wait for readiness (forever when nothing has a
//! deadline: an idle agent never wakes), note what became readable or
//! writable (mio is edge-triggered, so each fd keeps a "may have more"
//! flag until a read or write returns EAGAIN), then do the work: decode
//! and dispatch frames from the transport, reap children, read output into
//! the transport queue, write queued STDIN, handle expired deadlines, and
//! flush the transport queue. See docs/DESIGN.md for tokens, session states
//! and where backpressure applies.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::signal::{SigSet, Signal as NixSignal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use slab::Slab;

use crate::codec::{self, Decoder, Frame, HEADER_LEN, MAX_PAYLOAD};
use crate::messages::{
    self, ErrorKind, ErrorMsg, Exec, ExecFailed, ExecFailedKind, Exited, Kind, Message, Ready,
    PROTOCOL_VERSION,
};

use super::session::{self, ReadStop, Session, StdinError};
use super::spawn::{self, SpawnDefaults, SpawnError, StartReport};
use super::transport::{Flushed, OutQueue, Transport, TransportKind, STAGE_LIMIT};

const TRANSPORT_IN: Token = Token(0);
const TRANSPORT_OUT: Token = Token(1);
const SIGNALS: Token = Token(2);

/// Above this many queued output bytes the agent stops reading children's
/// output (they block in write()).
pub const HIGH_WATER: usize = 1 << 20;
/// Reading resumes once the queue is below this.
pub const LOW_WATER: usize = 256 << 10;
/// Above this the agent also stops reading the transport: the host is not
/// reading, and every frame it sends may add a reply.
pub const TRANSPORT_READ_CAP: usize = 2 << 20;

/// The grace SIGTERM, SIGINT and SIGPWR give sessions.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(1000);

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_sessions: usize,
    pub stdin_window: u32,
    pub pid1: bool,
    pub defaults: SpawnDefaults,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_sessions: 1024,
            stdin_window: 256 * 1024,
            pid1: false,
            defaults: SpawnDefaults::from_agent_env(),
        }
    }
}

/// Why [`EventLoop::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// End of file on a stdio or stream transport: sessions were killed.
    TransportClosed,
    /// SHUTDOWN (or a shutdown signal) completed: SHUTDOWN_DONE was sent.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("creating the poll instance: {0}")]
    Poll(io::Error),
    #[error("setting up the signalfd: {0}")]
    Signals(nix::Error),
    #[error("registering the transport: {0}")]
    Register(io::Error),
}

/// The signals the loop takes through its signalfd. They are blocked for
/// the agent; children get an empty mask (see spawn.rs). SIGTERM, SIGINT
/// and SIGPWR start a graceful shutdown; as PID 1 so do SIGUSR1 and
/// SIGUSR2, which busybox `halt` and `poweroff` send to init.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        NixSignal::SIGCHLD,
        NixSignal::SIGTERM,
        NixSignal::SIGINT,
        NixSignal::SIGPWR,
    ] {
        set.add(sig);
    }
    if std::process::id() == 1 {
        set.add(NixSignal::SIGUSR1);
        set.add(NixSignal::SIGUSR2);
    }
    set
}

struct ShutdownState {
    deadline: Instant,
    killed: bool,
}

pub struct EventLoop {
    poll: Poll,
    decoder: Decoder,
    /// A STDIN payload being moved from the transport to its session
    /// without passing through the decoder (see [`EventLoop::read_transport`]).
    stdin_stream: Option<StdinStream>,
    /// The last frame was a large STDIN (streamed or not): the next read
    /// takes just a header, so that the next large STDIN payload streams
    /// whole.
    expect_stdin: bool,
    /// The decoder may hold whole frames not yet dispatched (their
    /// dispatch stopped at the output queue's cap).
    frames_pending: bool,
    core: Core,
}

/// The rest of a STDIN payload still in the transport, for session `id`.
#[derive(Debug, Clone, Copy)]
struct StdinStream {
    id: u32,
    left: usize,
}

/// A STDIN payload streams (is spliced from the transport into the
/// session's stdin pipe) when at least this much of it is still unread.
const STREAM_STDIN_MIN: usize = 16 * 1024;

/// Everything but the poll and the decoder, so a decoded frame (which
/// borrows the decoder) can be dispatched against it.
struct Core {
    registry: Registry,
    transport: Transport,
    out: OutQueue,
    signals: SignalFd,
    sessions: Slab<Session>,
    by_id: HashMap<u32, usize>,
    by_pid: HashMap<libc::pid_t, usize>,
    /// Children killed before their session existed (their fds could not
    /// be registered), with the memory they ran on, freed once reaped.
    unwatched: HashMap<libc::pid_t, spawn::StartStatus>,
    /// Sessions that stopped reading at the high-water mark.
    stalled: VecDeque<usize>,
    /// Sessions reaped but not finished (they may have a deadline).
    lingering: usize,
    config: Config,
    shutdown: Option<ShutdownState>,
    transport_readable: bool,
    transport_writable: bool,
    /// A host is there to talk to (always, but for a device port between
    /// hosts).
    connected: bool,
    /// The decoder must be reset before the next read (new connection).
    reset_decoder: bool,
    /// A device port reported HUP: once what the departed host sent is read,
    /// the connection ends (see [`Core::end_departed_connection`]).
    hup_pending: bool,
    exit: Option<Exit>,
}

impl EventLoop {
    /// Sets up the poll, the signalfd (the handled signals must already be
    /// blocked) and the transport's registration.
    pub fn new(config: Config, transport: Transport) -> Result<EventLoop, LoopError> {
        let poll = Poll::new().map_err(LoopError::Poll)?;
        let registry = poll.registry().try_clone().map_err(LoopError::Poll)?;
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(LoopError::Signals)?;
        registry
            .register(
                &mut SourceFd(&signals.as_fd().as_raw_fd()),
                SIGNALS,
                Interest::READABLE,
            )
            .map_err(LoopError::Register)?;
        // epoll refuses regular files and /dev/null (EPERM). They never
        // block, so such an fd simply stays "ready": its flag is never
        // cleared by EAGAIN, and reading a file ends in end of file.
        let register =
            |fd, token, interest| match registry.register(&mut SourceFd(&fd), token, interest) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
                other => other,
            };
        if transport.split() {
            register(transport.read_fd(), TRANSPORT_IN, Interest::READABLE)
                .map_err(LoopError::Register)?;
            register(transport.write_fd(), TRANSPORT_OUT, Interest::WRITABLE)
                .map_err(LoopError::Register)?;
        } else {
            register(
                transport.read_fd(),
                TRANSPORT_IN,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(LoopError::Register)?;
        }
        Ok(EventLoop {
            poll,
            decoder: Decoder::new(),
            stdin_stream: None,
            expect_stdin: false,
            frames_pending: false,
            core: Core {
                registry,
                transport,
                out: OutQueue::default(),
                signals,
                sessions: Slab::new(),
                by_id: HashMap::new(),
                by_pid: HashMap::new(),
                unwatched: HashMap::new(),
                stalled: VecDeque::new(),
                lingering: 0,
                config,
                shutdown: None,
                transport_readable: true,
                transport_writable: true,
                connected: true,
                reset_decoder: false,
                hup_pending: false,
                exit: None,
            },
        })
    }

    /// Runs until the transport closes (stdio, socket) or a shutdown
    /// completes. Never returns early on a bad frame or a child's
    /// behaviour.
    pub fn run(&mut self) -> Exit {
        let ready = self.core.ready_frame();
        self.core.out.buf().extend_from_slice(&ready);
        let mut events = Events::with_capacity(256);
        loop {
            self.core.pump();
            if let Some(exit) = self.core.exit {
                self.core.finish_output(Duration::from_secs(5));
                return exit;
            }
            let timeout = if self.can_dispatch() {
                // Frames wait in the decoder and their replies fit now.
                Some(Duration::ZERO)
            } else {
                self.core.next_timeout(Instant::now())
            };
            self.core.out.release_spare();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                // EINTR: a signal not routed to the signalfd (none are
                // expected) or a stop/continue; just poll again. Anything
                // else is an epoll failure that retrying may not fix, so
                // log it and back off instead of spinning.
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for event in events.iter() {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                match event.token() {
                    TRANSPORT_IN => {
                        self.core.transport_readable = true;
                        if event.is_writable() {
                            self.core.transport_writable = true;
                        }
                        self.core
                            .on_transport_event(event.is_read_closed(), event.is_writable());
                    }
                    TRANSPORT_OUT => self.core.transport_writable = true,
                    SIGNALS => self.core.on_signals(),
                    token => self
                        .core
                        .on_session_event(token, readable, event.is_writable()),
                }
            }
            self.read_transport();
            if self.core.hup_pending {
                self.core.end_departed_connection();
            }
            self.core.on_deadlines(Instant::now());
        }
    }

    /// Reads and dispatches frames until the transport would block, or the
    /// output queue is at its cap (then the host is not reading and its
    /// input waits in the kernel).
    ///
    /// The cap is checked before each frame, not only before each read:
    /// one read can hold thousands of small frames, each of which may add
    /// a reply (an ERROR for garbage), so frames already read wait in the
    /// decoder ([`EventLoop::frames_pending`]) until the queue is under the
    /// cap again, and nothing more is read until they are dispatched. The
    /// queue thus ends at most one reply over the cap, and the decoder
    /// holds at most one read.
    ///
    /// On a pipe transport a large STDIN payload streams: once its header
    /// is decoded, the rest is spliced from the transport straight into
    /// the session's stdin pipe (see [`Session::stream_stdin`]) instead of
    /// being read into the decoder and written out again. While a host
    /// sends STDIN frames back to back, each read takes just the next
    /// header, so whole payloads stream.
    fn read_transport(&mut self) {
        if self.core.reset_decoder {
            self.decoder = Decoder::new();
            self.stdin_stream = None;
            self.expect_stdin = false;
            self.frames_pending = false;
            self.core.reset_decoder = false;
        }
        while self.core.connected && self.core.exit.is_none() {
            if self.frames_pending && !self.dispatch_buffered() {
                return;
            }
            let core = &mut self.core;
            if !core.transport_readable || core.out.pending() >= TRANSPORT_READ_CAP {
                return;
            }
            if let Some(stream) = self.stdin_stream {
                match core.stream_stdin(stream.id, stream.left) {
                    Err(StreamError::NoSession) => {
                        self.decoder.skip(stream.left);
                        self.stdin_stream = None;
                        self.expect_stdin = false;
                    }
                    Err(StreamError::Io(e)) => {
                        if !core.after_transport_read(Err(e)) {
                            return;
                        }
                    }
                    Ok(n) => {
                        if !core.after_transport_read(Ok(n)) {
                            return;
                        }
                        let left = stream.left - n;
                        self.stdin_stream = (left > 0).then_some(StdinStream { left, ..stream });
                    }
                }
                continue;
            }
            let limit = if self.expect_stdin {
                HEADER_LEN
            } else {
                usize::MAX
            };
            let read = self.decoder.read_fd_upto(core.transport.read_fd(), limit);
            if !matches!(read, Ok(n) if n > 0) {
                if !core.after_transport_read(read) {
                    return;
                }
                continue;
            }
            self.expect_stdin = false;
            self.frames_pending = true;
            if !self.dispatch_buffered() {
                return;
            }
            let core = &mut self.core;
            if !core.transport.read_is_pipe {
                continue;
            }
            if let Some(p) = self.decoder.partial_frame() {
                if p.kind == Kind::Stdin as u8
                    && p.len - p.buffered >= STREAM_STDIN_MIN
                    && core.can_stream_stdin(p.id, p.len)
                {
                    let head = self.decoder.take_partial();
                    core.begin_stdin_stream(p.id, p.len, head);
                    self.stdin_stream = Some(StdinStream {
                        id: p.id,
                        left: p.len - p.buffered,
                    });
                    self.expect_stdin = true;
                }
            }
        }
    }

    /// Dispatches the whole frames (and framing errors) the decoder holds.
    /// True when none is left; false when it stopped early: the output
    /// queue reached its cap (the rest stay pending), or a frame reset the
    /// decoder or ended the agent.
    fn dispatch_buffered(&mut self) -> bool {
        let core = &mut self.core;
        loop {
            if core.out.pending() >= TRANSPORT_READ_CAP {
                return false;
            }
            let Some(item) = self.decoder.next_frame() else {
                self.frames_pending = false;
                return true;
            };
            match item {
                Ok(frame) => {
                    // A large STDIN read whole: the next one may stream
                    // (only a pipe can be spliced from).
                    self.expect_stdin = core.transport.read_is_pipe
                        && frame.kind == Kind::Stdin as u8
                        && frame.payload.len() >= STREAM_STDIN_MIN;
                    core.on_frame(frame)
                }
                Err(e) => {
                    let kind = messages::ProtocolError::from(e).kind();
                    core.send_error(e.id(), kind, e.to_string(), e.frame_kind());
                }
            }
            if core.reset_decoder || core.exit.is_some() {
                return false;
            }
        }
    }

    /// True when frames wait in the decoder and the output queue has room
    /// for their replies: the loop must dispatch them before it sleeps.
    fn can_dispatch(&self) -> bool {
        self.frames_pending
            && self.core.connected
            && self.core.exit.is_none()
            && self.core.out.pending() < TRANSPORT_READ_CAP
    }
}

/// Why a STDIN payload could not stream on.
enum StreamError {
    /// Its session is gone: the rest of the payload is skipped.
    NoSession,
    /// Reading the transport failed (WouldBlock: it is empty for now).
    Io(io::Error),
}

/// How a wait status reads as EXITED.
fn exit_from_status(status: libc::c_int) -> Exited {
    if libc::WIFSIGNALED(status) {
        Exited::from_signal(libc::WTERMSIG(status), libc::WCOREDUMP(status))
    } else {
        Exited::from_code(libc::WEXITSTATUS(status))
    }
}

/// Signals a session's process group, and the process itself while it may
/// not have called setsid yet (still starting).
fn signal_group(s: &Session, signal: libc::c_int) {
    send_signal(-s.pid, signal);
    if s.starting.is_some() {
        send_signal(s.pid, signal);
    }
}

/// A host's SIGNAL for a running (or reaped) session.
fn deliver_signal(s: &Session, signal: libc::c_int, group: bool) {
    if group {
        // The group outlives its leader while descendants remain, so it is
        // signalled after reaping too.
        send_signal(-s.pid, signal);
    } else if s.exit.is_none() {
        // Once reaped the pid may belong to someone else.
        send_signal(s.pid, signal);
    }
}

/// Waits for one child that is known to be exiting.
fn wait_for(pid: libc::pid_t) {
    loop {
        // SAFETY: waiting for our own child; a null status is allowed.
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// kill(2), with "no such process" being fine (it is already gone).
fn send_signal(target: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(target, signal) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(target, signal, error = %e, "kill failed");
        }
    }
}

impl Core {
    fn ready_frame(&self) -> Vec<u8> {
        let ready = Ready {
            protocol: PROTOCOL_VERSION,
            agent: concat!("agentd/", env!("CARGO_PKG_VERSION")).to_owned(),
            pid: std::process::id(),
            pid1: self.config.pid1,
            max_payload: MAX_PAYLOAD as u32,
            stdin_window: self.config.stdin_window,
            max_sessions: self.config.max_sessions as u32,
            uptime_ms: uptime_ms(),
        };
        Message::Ready(ready).to_bytes(0)
    }

    fn send_error(&mut self, id: u32, kind: ErrorKind, message: String, frame_kind: Option<u8>) {
        tracing::debug!(id, %kind, %message, "ERROR");
        let msg = ErrorMsg::new(kind, message, frame_kind);
        messages::append_map(self.out.buf(), Kind::Error as u8, id, &msg);
    }

    fn exec_failed(&mut self, id: u32, err: SpawnError) {
        tracing::debug!(id, kind = %err.kind, message = %err.message, "EXEC_FAILED");
        let msg = ExecFailed {
            kind: err.kind.as_str().to_owned(),
            message: err.message,
            errno: err.errno,
            stage: err.stage.map(str::to_owned),
        };
        messages::append_map(self.out.buf(), Kind::ExecFailed as u8, id, &msg);
    }

    fn on_frame(&mut self, frame: Frame<'_>) {
        let id = frame.id;
        let msg = match Message::decode_from_host(frame) {
            Ok(msg) => msg,
            Err(e) => {
                return self.send_error(id, e.kind(), e.to_string(), Some(frame.kind));
            }
        };
        match msg {
            Message::Ping(payload) => codec::append_raw(self.out.buf(), Kind::Pong as u8, id, payload),
            Message::Shutdown(s) => self.start_shutdown(Duration::from_millis(u64::from(s.grace_ms))),
            Message::Exec(req) => self.exec(id, &req),
            Message::Stdin(data) => self.with_session(id, Kind::Stdin, |core, key| {
                let window = core.config.stdin_window;
                let s = &mut core.sessions[key];
                match s.push_stdin(data, window, core.out.buf(), &core.registry) {
                    Ok(()) => Ok(()),
                    Err(StdinError::Closed) => Err((
                        ErrorKind::StdinClosed,
                        "stdin of this session is closed".to_owned(),
                    )),
                    Err(StdinError::WindowExceeded { in_use, window }) => Err((
                        ErrorKind::WindowExceeded,
                        format!(
                            "{} bytes with {in_use} unacknowledged exceed the stdin window of {window}; frame dropped",
                            data.len()
                        ),
                    )),
                }
            }),
            Message::StdinClose => self.with_session(id, Kind::StdinClose, |core, key| {
                let s = &mut core.sessions[key];
                s.close_stdin(core.out.buf(), &core.registry).map_err(|_| {
                    (ErrorKind::StdinClosed, "stdin of this session is already closed".to_owned())
                })
            }),
            Message::Resize(r) => self.with_session(id, Kind::Resize, |core, key| {
                let Some(fd) = core.sessions[key].pty_fd() else {
                    return Err((ErrorKind::NotATty, "the session has no terminal (started without tty)".to_owned()));
                };
                let size = libc::winsize {
                    ws_row: r.rows,
                    ws_col: r.cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
                if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) } < 0 {
                    tracing::warn!(id, error = %io::Error::last_os_error(), "TIOCSWINSZ failed");
                }
                Ok(())
            }),
            Message::Signal(sig) => self.with_session(id, Kind::Signal, |core, key| {
                if !(0..=64).contains(&sig.signal) {
                    return Err((
                        ErrorKind::InvalidSignal,
                        format!("{} is not a Linux signal number (0 to 64)", sig.signal),
                    ));
                }
                let s = &mut core.sessions[key];
                if s.starting.is_some() {
                    s.hold_signal(sig.signal, sig.group);
                } else {
                    deliver_signal(s, sig.signal, sig.group);
                }
                Ok(())
            }),
            Message::OutputAck(ack) => self.with_session(id, Kind::OutputAck, |core, key| {
                core.sessions[key].ack_output(ack.bytes);
                core.service(key);
                Ok(())
            }),
            // decode_from_host lets only host → agent kinds through.
            other => self.send_error(
                id,
                ErrorKind::WrongDirection,
                format!("{} is not sent by a host", other.kind().name()),
                Some(frame.kind),
            ),
        }
    }

    /// Runs `f` on the session `id`, answering ERROR for an unknown id or
    /// for what `f` reports.
    fn with_session(
        &mut self,
        id: u32,
        kind: Kind,
        f: impl FnOnce(&mut Core, usize) -> Result<(), (ErrorKind, String)>,
    ) {
        let Some(&key) = self.by_id.get(&id) else {
            return self.send_error(
                id,
                ErrorKind::UnknownSession,
                format!("no session with id {id}"),
                Some(kind as u8),
            );
        };
        if let Err((err, message)) = f(self, key) {
            self.send_error(id, err, message, Some(kind as u8));
        }
    }

    /// Handles what a read of the transport returned: end of file and
    /// errors end the connection, EAGAIN waits for the next edge, EINTR
    /// reads again. Returns whether to go on reading.
    fn after_transport_read(&mut self, read: io::Result<usize>) -> bool {
        match read {
            Ok(0) => {
                self.transport_readable = false;
                self.on_transport_eof();
                false
            }
            Ok(_) => true,
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => true,
                io::ErrorKind::WouldBlock => {
                    self.transport_readable = false;
                    false
                }
                _ => {
                    tracing::warn!(error = %e, "reading the transport failed");
                    self.transport_readable = false;
                    self.on_transport_eof();
                    false
                }
            },
        }
    }

    /// See [`Session::can_stream_stdin`]; false for an unknown session.
    fn can_stream_stdin(&self, id: u32, len: usize) -> bool {
        self.by_id
            .get(&id)
            .is_some_and(|&key| self.sessions[key].can_stream_stdin(len, self.config.stdin_window))
    }

    /// The start of a streamed STDIN frame (`can_stream_stdin` said yes).
    fn begin_stdin_stream(&mut self, id: u32, len: usize, head: &[u8]) {
        if let Some(&key) = self.by_id.get(&id) {
            self.sessions[key].begin_stdin_stream(len, head, self.out.buf(), &self.registry);
        }
    }

    /// Moves more of a streamed STDIN payload; see [`Session::stream_stdin`].
    fn stream_stdin(&mut self, id: u32, left: usize) -> Result<usize, StreamError> {
        let Some(&key) = self.by_id.get(&id) else {
            return Err(StreamError::NoSession);
        };
        let src = self.transport.read_fd();
        let n = self.sessions[key]
            .stream_stdin(src, left, self.out.buf(), &self.registry)
            .map_err(StreamError::Io)?;
        self.service(key);
        Ok(n)
    }

    fn exec(&mut self, id: u32, req: &Exec) {
        let fail = |kind, message: &str| SpawnError {
            kind,
            message: message.to_owned(),
            errno: None,
            stage: None,
        };
        if id == 0 {
            return self.exec_failed(
                0,
                fail(
                    ExecFailedKind::InvalidRequest,
                    "session id 0 is reserved for the connection",
                ),
            );
        }
        if self.by_id.contains_key(&id) {
            return self.exec_failed(
                id,
                fail(
                    ExecFailedKind::DuplicateId,
                    "a session with this id is running",
                ),
            );
        }
        if self.shutdown.is_some() {
            return self.exec_failed(
                id,
                fail(ExecFailedKind::Other, "the agent is shutting down"),
            );
        }
        if self.sessions.len() >= self.config.max_sessions {
            let msg = format!(
                "{} sessions are running, the agent's maximum",
                self.sessions.len()
            );
            return self.exec_failed(id, fail(ExecFailedKind::Resource, &msg));
        }
        let child = match spawn::prepare(req, &self.config.defaults).and_then(spawn::spawn) {
            Ok(child) => child,
            Err(e) => return self.exec_failed(id, e),
        };
        let pid = child.pid;
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        match Session::new(
            id,
            child,
            req.output_window,
            req.linger_ms,
            key,
            &self.registry,
        ) {
            Ok(session) => {
                // In by_pid before the loop next reaps, so the exit cannot
                // be missed. STARTED waits for the status pipe.
                entry.insert(session);
                self.by_id.insert(id, key);
                self.by_pid.insert(pid, key);
            }
            Err((e, status)) => {
                // The child runs but the agent cannot watch it: stop it,
                // without waiting (a child stuck before exec, in a hung
                // filesystem, dies only when its system call returns). The
                // memory it runs on is kept until the loop reaps it.
                send_signal(pid, libc::SIGKILL);
                self.unwatched.insert(pid, status);
                self.exec_failed(
                    id,
                    SpawnError {
                        kind: ExecFailedKind::Resource,
                        message: format!("registering the session's fds: {e}"),
                        errno: e.raw_os_error(),
                        stage: Some("register"),
                    },
                );
            }
        }
    }

    /// Reads a starting session's status pipe: on exec, STARTED; on a
    /// failure before exec, EXEC_FAILED and the session is gone. `reaped`
    /// says the child has been waited for already. Returns whether the
    /// session still exists.
    fn resolve_start(&mut self, key: usize, reaped: bool) -> bool {
        let Some(s) = self.sessions.get_mut(key) else {
            return false;
        };
        let Some(status) = &s.starting else {
            return true;
        };
        if reaped {
            // Whatever the pipe says, the child no longer runs on the
            // memory spawn lent it.
            status.child_reaped();
        }
        match status.poll() {
            // A child that was reaped has closed its end: Pending cannot
            // happen then; treat it like success to keep the exit.
            StartReport::Pending if !reaped => return true,
            StartReport::Pending | StartReport::Running => {}
            StartReport::Failed(err) => {
                let (id, pid) = (s.id, s.pid);
                if !reaped {
                    // It is on its way out with status 127.
                    wait_for(pid);
                    status.child_reaped();
                    self.by_pid.remove(&pid);
                }
                let mut s = self.sessions.remove(key);
                s.close(&self.registry);
                self.by_id.remove(&id);
                self.exec_failed(id, err);
                return false;
            }
        }
        s.started(&self.registry);
        tracing::debug!(id = s.id, pid = s.pid, "STARTED");
        let started = messages::Started { pid: s.pid as u32 };
        messages::append_map(self.out.buf(), Kind::Started as u8, s.id, &started);
        for (signal, group) in s.take_held_signals() {
            deliver_signal(s, signal, group);
        }
        self.service(key);
        true
    }

    /// Does whatever a session can do now: write queued STDIN, read
    /// output, and finish it when it is done.
    fn service(&mut self, key: usize) {
        let splice = self.transport.write_is_pipe;
        // Straight into the transport only while it takes bytes.
        let direct = (splice && self.connected && self.transport_writable)
            .then(|| self.transport.write_fd());
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.starting.is_some() {
            return;
        }
        s.flush_stdin(self.out.buf(), &self.registry);
        if s.wants_read()
            && s.read_output(&mut self.out, splice, direct, HIGH_WATER, &self.registry)
                == ReadStop::Backpressure
            && !s.stalled
        {
            s.stalled = true;
            self.stalled.push_back(key);
        }
        if s.finished() {
            self.finish(key);
        }
    }

    /// Sends EXITED and frees the session and its id.
    fn finish(&mut self, key: usize) {
        let mut s = self.sessions.remove(key);
        s.close(&self.registry);
        self.by_id.remove(&s.id);
        self.lingering -= 1;
        if let Some(exit) = s.exit {
            tracing::debug!(id = s.id, status = exit.status, "EXITED");
            messages::append_map(self.out.buf(), Kind::Exited as u8, s.id, &exit);
        }
        if self.shutdown.is_some() && self.sessions.is_empty() {
            self.complete_shutdown();
        }
    }

    fn on_session_event(&mut self, token: Token, readable: bool, writable: bool) {
        let Some((key, stream)) = session::untoken(token) else {
            return;
        };
        // A stale event for a session removed earlier in this batch is
        // dropped; for a key reused since, it is only a spurious "try".
        if stream == session::Stream::Start {
            self.resolve_start(key, false);
        } else if let Some(s) = self.sessions.get_mut(key) {
            s.on_event(stream, readable, writable);
            self.service(key);
        }
    }

    fn on_signals(&mut self) {
        let mut reap = false;
        let mut shutdown = false;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match info.ssi_signo as libc::c_int {
                    libc::SIGCHLD => reap = true,
                    sig => {
                        tracing::info!(signal = sig, "shutdown signal");
                        shutdown = true;
                    }
                },
                Ok(None) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the signalfd failed");
                    // Reap anyway: a lost SIGCHLD must not leave zombies.
                    reap = true;
                    break;
                }
            }
        }
        // One SIGCHLD may stand for many exits: reap until none is left.
        if reap {
            self.reap();
        }
        if shutdown {
            self.start_shutdown(DEFAULT_GRACE);
        }
    }

    fn reap(&mut self) {
        let now = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == 0 {
                break;
            }
            if pid < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // ECHILD: no children at all.
                    _ => break,
                }
            }
            let Some(key) = self.by_pid.remove(&pid) else {
                if let Some(status) = self.unwatched.remove(&pid) {
                    // Its memory can go now.
                    status.child_reaped();
                    tracing::debug!(pid, "reaped a child that had no session");
                } else {
                    tracing::debug!(pid, "reaped an adopted process");
                }
                continue;
            };
            if !self.resolve_start(key, true) {
                continue;
            }
            let exit = exit_from_status(status);
            let s = &mut self.sessions[key];
            s.reaped(exit, now);
            if self.shutdown.as_ref().is_some_and(|sd| sd.killed) {
                // Past the grace nothing waits for descendants' pipes.
                s.deadline = Some(now);
            }
            self.lingering += 1;
            self.service(key);
        }
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let immediate =
            (self.connected && self.transport_readable && self.out.pending() < TRANSPORT_READ_CAP)
                || self.may_resume_stalled();
        if immediate {
            return Some(Duration::ZERO);
        }
        let mut next: Option<Instant> = self
            .shutdown
            .as_ref()
            .filter(|s| !s.killed)
            .map(|s| s.deadline);
        if self.lingering > 0 {
            for (_, s) in &self.sessions {
                if let Some(d) = s.deadline {
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
            }
        }
        // Round up so the deadline has passed when poll returns.
        next.map(|d| d.saturating_duration_since(now) + Duration::from_micros(999))
    }

    fn on_deadlines(&mut self, now: Instant) {
        if let Some(sd) = &mut self.shutdown {
            if !sd.killed && sd.deadline <= now {
                sd.killed = true;
                for (_, s) in &mut self.sessions {
                    signal_group(s, libc::SIGKILL);
                    if s.exit.is_some() {
                        // Descendants were told to go; stop waiting for
                        // their pipes now.
                        s.deadline = Some(now);
                    }
                }
            }
        }
        if self.lingering == 0 {
            return;
        }
        let expired: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            self.sessions[key].linger_expired();
            self.service(key);
        }
    }

    /// Flushes the transport queue and, while it is below the low-water
    /// mark, lets stalled sessions read again.
    fn pump(&mut self) {
        for _ in 0..16 {
            self.flush_transport();
            if !self.may_resume_stalled() {
                return;
            }
            let rounds = self.stalled.len();
            for _ in 0..rounds {
                let Some(key) = self.stalled.pop_front() else {
                    break;
                };
                if let Some(s) = self.sessions.get_mut(key) {
                    if s.stalled {
                        s.stalled = false;
                        self.service(key);
                    }
                }
            }
        }
    }

    /// Whether sessions stalled by backpressure may read again. Over a
    /// pipe transport their output is staged by splice, which needs nothing
    /// queued in memory and room in the staging pipe (else they would only
    /// stall again; the transport's writability edge wakes the loop once
    /// it drains). Over anything else, once the queue is under the
    /// low-water mark.
    fn may_resume_stalled(&self) -> bool {
        if self.stalled.is_empty() || !self.connected {
            return false;
        }
        if self.transport.write_is_pipe {
            self.out.in_memory() == 0 && self.out.staged() < STAGE_LIMIT
        } else {
            self.out.pending() < LOW_WATER
        }
    }

    fn flush_transport(&mut self) {
        if !self.connected || !self.transport_writable || self.out.pending() == 0 {
            return;
        }
        match self.out.flush(self.transport.write_fd()) {
            Ok(Flushed::All) => {}
            Ok(Flushed::Partial) => self.transport_writable = false,
            Err(e) => {
                tracing::warn!(error = %e, "writing the transport failed");
                self.transport_writable = false;
                self.on_transport_eof();
            }
        }
    }

    fn on_transport_event(&mut self, hup: bool, writable: bool) {
        if self.transport.kind != TransportKind::Device {
            return;
        }
        if hup && self.connected {
            // Read (and serve) what the departed host sent before it left,
            // then end the connection: see end_departed_connection.
            self.hup_pending = true;
        } else if !hup && writable && !self.connected {
            tracing::info!("host connected");
            self.connected = true;
            self.reset_decoder = true;
            let ready = self.ready_frame();
            self.out.restart_with(&ready);
        }
    }

    /// After a HUP on a device port and the read that followed it: drops
    /// whatever the departed host's bytes still hold (the rest of a partial
    /// frame, or input left unread above the read cap) and ends the
    /// connection. The virtio port keeps bytes a host sent until they are
    /// read, even after that host is gone, so without this the next host's
    /// stream would start with the old host's leftovers.
    fn end_departed_connection(&mut self) {
        self.hup_pending = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is a valid writable buffer of the given length.
            let n =
                unsafe { libc::read(self.transport.read_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            // 0: no host and nothing buffered; < 0: EAGAIN (a new host is
            // already there) or an error: stop either way.
            if n <= 0 {
                break;
            }
            tracing::debug!(bytes = n, "dropped input of a departed host");
        }
        if self.connected {
            self.disconnected();
        }
    }

    fn disconnected(&mut self) {
        tracing::info!("host went away; sessions keep running");
        self.connected = false;
        self.reset_decoder = true;
    }

    /// End of file (or a broken pipe) on the transport.
    fn on_transport_eof(&mut self) {
        if self.transport.kind == TransportKind::Device {
            return self.disconnected();
        }
        if self.exit.is_some() {
            return;
        }
        tracing::info!("transport closed: killing every session");
        for (_, s) in &self.sessions {
            signal_group(s, libc::SIGKILL);
        }
        kill_and_reap_all(Duration::from_secs(2));
        self.exit = Some(Exit::TransportClosed);
    }

    fn start_shutdown(&mut self, grace: Duration) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!(?grace, sessions = self.sessions.len(), "shutting down");
        for (_, s) in &mut self.sessions {
            if s.starting.is_some() {
                // As for a host's SIGNAL: after STARTED, or not at all.
                s.hold_signal(libc::SIGTERM, true);
            } else {
                signal_group(s, libc::SIGTERM);
            }
        }
        self.shutdown = Some(ShutdownState {
            deadline: Instant::now() + grace,
            killed: false,
        });
        if self.sessions.is_empty() {
            self.complete_shutdown();
        }
    }

    fn complete_shutdown(&mut self) {
        codec::append_raw(self.out.buf(), Kind::ShutdownDone as u8, 0, &[]);
        self.exit = Some(Exit::Shutdown);
    }

    /// Before returning from the loop: writes what is queued, waiting at
    /// most `limit` for a slow host.
    fn finish_output(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.out.pending() > 0 && self.connected {
            match self.out.flush(self.transport.write_fd()) {
                Ok(Flushed::All) => return,
                Ok(Flushed::Partial) => {}
                Err(_) => return,
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfd = libc::pollfd {
                fd: self.transport.write_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as libc::c_int) };
        }
    }
}

/// Milliseconds since boot (CLOCK_BOOTTIME), for READY.
fn uptime_ms() -> Option<u64> {
    // SAFETY: a zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000)
}

/// The agent's children as the kernel lists them (sessions and adopted
/// orphans alike).
fn children() -> Vec<libc::pid_t> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<libc::pid_t>().ok()),
            );
        }
    }
    pids
}

/// SIGKILLs every child (and its process group) and reaps until none is
/// left or `limit` passes. Used only on the way out: it sleeps.
pub fn kill_and_reap_all(limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        for pid in children() {
            send_signal(-pid, libc::SIGKILL);
            send_signal(pid, libc::SIGKILL);
        }
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                continue;
            }
            if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                return;
            }
            break;
        }
        if Instant::now() >= end {
            tracing::warn!("children still running after SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
