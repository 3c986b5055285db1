//! The connection machinery: one reader thread that decodes frames and
//! routes them by session id, one writer thread that owns the write side of
//! the transport, and the state they share with the API handles.
//!
//! Nobody but the writer thread ever blocks on the transport's write side,
//! and the reader thread never writes directly (it only queues frames), so
//! a host that is slow to read cannot deadlock against an agent that is slow
//! to read: the reader always keeps draining the agent's output.
//!
//! The output path allocates nothing per frame. Whoever sends a frame
//! encodes it straight into the outbox's buffer (a STDIN payload is copied
//! once, from the caller's slice into that buffer); the writer thread swaps
//! that buffer with its own empty one and writes it out while the senders
//! go on filling the other. The two buffers trade places on every write and
//! keep their capacity, so once they have grown to the usual backlog no
//! frame costs an allocation or a second copy.
//!
//! Lock order, where two are held at once: `Shared::reg`, then a session's
//! `state`, then `Shared::out`. `Shared::state` is never held with any of
//! them, and nothing else is locked while `Shared::out` is held.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::clock::ClockReply;
use super::error::{Error, Result};
use super::status::ExitStatus;
use crate::codec::{Decoder, Frame};
use crate::messages::{
    Ack, EncodeError, ErrorMsg, ExecFailed, Kind, Message, Ready, SessionsMsg, PROTOCOL_VERSION,
};

/// Locks a mutex, recovering the data if another thread panicked with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a, T>(c: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    c.wait(g).unwrap_or_else(|e| e.into_inner())
}

fn wait_timeout<'a, T>(c: &Condvar, g: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match c.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

/// Frames waiting for the writer thread.
#[derive(Default)]
struct Outbox {
    /// Whole frames, encoded in place, in the order they were sent.
    buf: Vec<u8>,
    /// Write what is in `buf`, then close the write side; nothing more is
    /// accepted.
    close: bool,
    /// Why the connection closed, when it did ([`Shared::close`]): what a
    /// send after that fails with, known here without locking `reg`
    /// (senders may hold a session's `state`, which comes after `reg`).
    reason: Option<Option<String>>,
}

/// Above this capacity a buffer the writer has emptied is shrunk back, so
/// that one burst does not pin megabytes for the life of the connection.
const RETAIN_CAPACITY: usize = 1 << 20;

/// What the reader routes to a session's channel.
#[derive(Debug)]
pub(crate) enum Routed {
    /// STARTED: the pid, and the session number (extension `sessions`).
    Started(u32, Option<u64>),
    /// A frame of the `sessions` extension (SESSIONS, ATTACHED,
    /// ATTACH_FAILED, DETACHED).
    Sessions(SessionsMsg),
    /// A reply of the `clock` extension.
    Clock(ClockReply),
    ExecFailed(ExecFailed),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Error(ErrorMsg),
    Exited(ExitStatus),
}

/// Per-session state shared by the reader and the session's handles.
pub(crate) struct SessionShared {
    pub(crate) id: u32,
    pub(crate) state: Mutex<SessState>,
    pub(crate) cond: Condvar,
}

pub(crate) struct SessState {
    /// STDIN bytes we may still send before an ack.
    pub(crate) stdin_credit: u32,
    /// The window the agent announced (for sanity checks of acks).
    pub(crate) stdin_window: u32,
    /// The largest STDIN payload to put in one frame.
    pub(crate) stdin_chunk: usize,
    /// STDIN_CLOSE sent, or the session has no stdin.
    pub(crate) stdin_closed: bool,
    /// EXITED or EXEC_FAILED received: the id is no longer ours.
    pub(crate) ended: bool,
    /// The transport closed while the session was live.
    pub(crate) closed: bool,
    /// The [`super::Session`] was dropped: output is discarded (and
    /// acknowledged) by the reader.
    pub(crate) detached: bool,
    /// The session's `output_window` (0: unlimited, no acks).
    pub(crate) output_window: u32,
    /// Live [`super::SessionHandle`]s (the Session's own included).
    pub(crate) handles: usize,
    /// DETACHED received (with `ended`): the session's number and the
    /// reason, for the error that later calls return.
    pub(crate) lost: Option<(u64, String)>,
}

impl SessState {
    /// The error for a call on a session that has `ended`.
    pub(crate) fn ended_error(&self) -> Error {
        match &self.lost {
            Some((session, reason)) => Error::Detached {
                session: *session,
                reason: reason.clone(),
            },
            None => Error::SessionEnded,
        }
    }
}

impl SessionShared {
    pub(crate) fn new(id: u32, st: SessState) -> Self {
        SessionShared {
            id,
            state: Mutex::new(st),
            cond: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SessState> {
        lock(&self.state)
    }

    pub(crate) fn wait<'a>(&self, g: MutexGuard<'a, SessState>) -> MutexGuard<'a, SessState> {
        wait(&self.cond, g)
    }
}

struct Route {
    tx: mpsc::Sender<Routed>,
    session: Arc<SessionShared>,
}

/// One frame of an extension stream, owned: its kind and payload.
pub(crate) type StreamFrame = (u8, Vec<u8>);

/// An id registered as an extension stream (an fs operation, a net
/// connection): every frame of that id goes, undecoded, to `tx`; the
/// stream's own state machine (src/client/fs.rs, net.rs) makes sense of
/// them. The route ends with the first frame whose kind is in `finals`.
struct StreamRoute {
    tx: mpsc::Sender<StreamFrame>,
    finals: &'static [u8],
}

/// Sessions and pings in flight, and whether the connection is gone.
struct Registry {
    routes: HashMap<u32, Route>,
    streams: HashMap<u32, StreamRoute>,
    pings: HashMap<u64, mpsc::Sender<Instant>>,
    next_id: u32,
    next_ping: u64,
    /// `Some(reason)` once the connection is closed.
    closed: Option<Option<String>>,
}

impl Registry {
    /// An id that is neither 0 nor live (as a session or a stream).
    fn fresh_id(&mut self) -> u32 {
        let mut id = self.next_id;
        while id == 0 || self.routes.contains_key(&id) || self.streams.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        id
    }
}

/// Connection-level state that API calls wait on.
#[derive(Default)]
struct ConnState {
    ready: Option<Ready>,
    /// How many READYs have arrived (a restored VM's agent sends it again).
    ready_gen: u64,
    unsupported: Option<u32>,
    closed: bool,
    shutdown_pending: bool,
    shutdown_done: bool,
    shutdown_error: Option<ErrorMsg>,
}

/// How many connection-level errors are kept for [`Shared::take_errors`].
const MAX_KEPT_ERRORS: usize = 64;

pub(crate) struct Shared {
    reg: Mutex<Registry>,
    state: Mutex<ConnState>,
    cond: Condvar,
    /// Frames for the writer thread, and the condition it waits on.
    out: Mutex<Outbox>,
    out_cond: Condvar,
    /// Write end of the pipe that wakes the reader's poll.
    wake: OwnedFd,
    stop: AtomicBool,
    errors: Mutex<VecDeque<ErrorMsg>>,
}

impl Shared {
    /// Queues `msg` as a frame of session `id` for the writer, encoding it
    /// straight into the outgoing buffer (no allocation of its own, and a
    /// raw payload such as STDIN's is copied once, into that buffer).
    pub(crate) fn send(&self, id: u32, msg: &Message<'_>) -> Result<()> {
        self.send_with(|buf| msg.encode(id, buf))
    }

    /// Queues whatever `encode` appends to the outgoing buffer: one or more
    /// whole frames. Fails once the write side is closing or closed.
    pub(crate) fn send_with(
        &self,
        encode: impl FnOnce(&mut Vec<u8>) -> std::result::Result<(), EncodeError>,
    ) -> Result<()> {
        let mut out = lock(&self.out);
        if out.close {
            return Err(out
                .reason
                .clone()
                .map_or_else(Error::closed, Error::TransportClosed));
        }
        let was_empty = out.buf.is_empty();
        // A frame over the limit is refused by the encoder (nothing is
        // appended) and never sent.
        encode(&mut out.buf).map_err(Error::Encode)?;
        // The writer only waits when the buffer is empty.
        if was_empty && !out.buf.is_empty() {
            self.out_cond.notify_one();
        }
        Ok(())
    }

    /// Asks the writer to write what is queued and then close the write
    /// side; later sends fail.
    fn close_outbox(&self, reason: Option<Option<String>>) {
        let mut out = lock(&self.out);
        out.close = true;
        if out.reason.is_none() {
            out.reason = reason;
        }
        self.out_cond.notify_one();
    }

    /// The reason the connection closed, if it has.
    pub(crate) fn closed_error(&self) -> Option<Error> {
        lock(&self.reg).closed.clone().map(Error::TransportClosed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.reg).closed.is_some()
    }

    /// Closes the connection: every waiter wakes with `TransportClosed`,
    /// the writer closes the write side after what is queued, the reader
    /// stops. Idempotent; the first reason wins.
    pub(crate) fn close(&self, reason: Option<String>) {
        let routes = {
            let mut reg = lock(&self.reg);
            if reg.closed.is_some() {
                return;
            }
            reg.closed = Some(reason.clone());
            reg.pings.clear();
            // Dropping the senders disconnects every stream's receiver.
            reg.streams.clear();
            std::mem::take(&mut reg.routes)
        };
        for route in routes.into_values() {
            let mut st = route.session.lock();
            st.closed = true;
            route.session.cond.notify_all();
            drop(st);
            // Dropping `route.tx` disconnects the session's receiver.
        }
        {
            let mut st = lock(&self.state);
            st.closed = true;
            self.cond.notify_all();
        }
        self.close_outbox(Some(reason));
        self.stop.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&self.wake, &[1]);
    }

    /// Asks the writer to close the write side after what is queued,
    /// without closing the connection (the agent's answer to end of file
    /// can still be read).
    pub(crate) fn close_writer(&self) {
        self.close_outbox(None);
    }

    /// Waits for READY.
    pub(crate) fn wait_ready(&self, timeout: Option<Duration>) -> Result<Ready> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.state);
        loop {
            if let Some(v) = st.unsupported {
                return Err(Error::UnsupportedProtocol(v));
            }
            if let Some(r) = &st.ready {
                return Ok(r.clone());
            }
            if st.closed {
                drop(st);
                return Err(self.closed_error().unwrap_or_else(Error::closed));
            }
            st = match deadline {
                None => wait(&self.cond, st),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::ReadyTimeout(timeout.unwrap_or_default()));
                    }
                    wait_timeout(&self.cond, st, d - now)
                }
            };
        }
    }

    /// How many READYs have arrived so far.
    pub(crate) fn ready_gen(&self) -> u64 {
        lock(&self.state).ready_gen
    }

    /// Waits for a READY after the `gen`th; its count, or `None` once the
    /// connection has closed.
    pub(crate) fn wait_ready_after(&self, gen: u64) -> Option<u64> {
        let mut st = lock(&self.state);
        loop {
            if st.closed {
                return None;
            }
            if st.ready_gen > gen {
                return Some(st.ready_gen);
            }
            st = wait(&self.cond, st);
        }
    }

    /// The latest READY.
    pub(crate) fn ready(&self) -> Option<Ready> {
        lock(&self.state).ready.clone()
    }

    /// Registers a new session under a fresh id (never 0, never a live one).
    pub(crate) fn register(
        &self,
        make: impl FnOnce(u32) -> Arc<SessionShared>,
    ) -> Result<(u32, Arc<SessionShared>, mpsc::Receiver<Routed>)> {
        let mut reg = lock(&self.reg);
        if let Some(reason) = &reg.closed {
            return Err(Error::TransportClosed(reason.clone()));
        }
        let id = reg.fresh_id();
        let session = make(id);
        let (tx, rx) = mpsc::channel();
        reg.routes.insert(
            id,
            Route {
                tx,
                session: session.clone(),
            },
        );
        Ok((id, session, rx))
    }

    /// Registers an extension stream under a fresh id: every frame of that
    /// id is delivered to the receiver until one of kind in `finals`
    /// (delivered too) ends the route.
    pub(crate) fn register_stream(
        &self,
        finals: &'static [u8],
    ) -> Result<(u32, mpsc::Receiver<StreamFrame>)> {
        let mut reg = lock(&self.reg);
        if let Some(reason) = &reg.closed {
            return Err(Error::TransportClosed(reason.clone()));
        }
        let id = reg.fresh_id();
        let (tx, rx) = mpsc::channel();
        reg.streams.insert(id, StreamRoute { tx, finals });
        Ok((id, rx))
    }

    /// Forgets a stream (whose request could not be sent).
    pub(crate) fn unregister_stream(&self, id: u32) {
        lock(&self.reg).streams.remove(&id);
    }

    /// Delivers a frame of a registered stream; false if `id` is not one.
    fn deliver_stream(&self, frame: &Frame<'_>) -> bool {
        let mut reg = lock(&self.reg);
        let Some(route) = reg.streams.get(&frame.id) else {
            return false;
        };
        // A receiver that is gone (its handle dropped after cancelling)
        // just loses the frame; the route lives until the final one.
        let _ = route.tx.send((frame.kind, frame.payload.to_vec()));
        if route.finals.contains(&frame.kind) {
            reg.streams.remove(&frame.id);
        }
        true
    }

    /// Forgets a session whose start failed.
    pub(crate) fn unregister(&self, id: u32) {
        lock(&self.reg).routes.remove(&id);
    }

    /// Sends a PING and waits for its PONG.
    pub(crate) fn ping(&self) -> Result<Duration> {
        let (tx, rx) = mpsc::channel();
        let seq = {
            let mut reg = lock(&self.reg);
            if let Some(reason) = &reg.closed {
                return Err(Error::TransportClosed(reason.clone()));
            }
            let seq = reg.next_ping;
            reg.next_ping = reg.next_ping.wrapping_add(1);
            reg.pings.insert(seq, tx);
            seq
        };
        let start = Instant::now();
        let sent = self.send(0, &Message::Ping(&seq.to_be_bytes()));
        if let Err(e) = sent {
            lock(&self.reg).pings.remove(&seq);
            return Err(e);
        }
        match rx.recv() {
            Ok(at) => Ok(at.saturating_duration_since(start)),
            Err(_) => Err(self.closed_error().unwrap_or_else(Error::closed)),
        }
    }

    /// Sends SHUTDOWN and waits for SHUTDOWN_DONE (or an ERROR answering
    /// it, or the end of the connection).
    pub(crate) fn shutdown(&self, grace_ms: u32) -> Result<()> {
        {
            let mut st = lock(&self.state);
            st.shutdown_pending = true;
            st.shutdown_error = None;
        }
        let msg = Message::Shutdown(crate::messages::Shutdown { grace_ms });
        self.send(0, &msg)?;
        let mut st = lock(&self.state);
        loop {
            if st.shutdown_done {
                return Ok(());
            }
            if let Some(e) = st.shutdown_error.take() {
                st.shutdown_pending = false;
                return Err(Error::Protocol(e));
            }
            if st.closed {
                drop(st);
                return Err(self.closed_error().unwrap_or_else(Error::closed));
            }
            st = wait(&self.cond, st);
        }
    }

    /// Waits until the connection is closed, at most `timeout`. True if it is.
    pub(crate) fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while !st.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = wait_timeout(&self.cond, st, deadline - now);
        }
        true
    }

    /// Connection-level ERRORs received so far (and frames that could not
    /// be decoded), oldest first; the list is emptied.
    pub(crate) fn take_errors(&self) -> Vec<ErrorMsg> {
        lock(&self.errors).drain(..).collect()
    }

    fn push_error(&self, e: ErrorMsg) {
        let mut errors = lock(&self.errors);
        if errors.len() == MAX_KEPT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(e);
    }

    fn route(&self, id: u32) -> Option<(mpsc::Sender<Routed>, Arc<SessionShared>)> {
        lock(&self.reg)
            .routes
            .get(&id)
            .map(|r| (r.tx.clone(), r.session.clone()))
    }

    /// Handles one frame from the agent.
    fn handle(&self, frame: Frame<'_>) {
        // An extension stream's frames go to it undecoded (its state
        // machine decodes them, and turns one that does not decode into
        // its own error instead of leaving it waiting).
        if frame.id != 0 && frame.kind != Kind::Ready as u8 && self.deliver_stream(&frame) {
            return;
        }
        let msg = match Message::decode_from_agent(frame) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    kind = frame.kind,
                    id = frame.id,
                    "undecodable frame from agent: {e}"
                );
                self.push_error(ErrorMsg::new(
                    e.kind(),
                    format!("agentctl could not decode a frame from the agent: {e}"),
                    Some(frame.kind),
                ));
                return;
            }
        };
        let id = frame.id;
        if let Message::Ready(r) = msg {
            let mut st = lock(&self.state);
            if r.protocol != PROTOCOL_VERSION {
                st.unsupported = Some(r.protocol);
                self.cond.notify_all();
                drop(st);
                self.close(Some(format!(
                    "agent speaks protocol version {}",
                    r.protocol
                )));
                return;
            }
            if st.ready.is_some() {
                tracing::info!("READY again from the agent (host reconnected)");
            }
            st.ready = Some(r);
            st.ready_gen += 1;
            self.cond.notify_all();
            return;
        }
        if lock(&self.state).ready.is_none() {
            // Left over from before this host connected to a device port.
            tracing::debug!(kind = frame.kind, id, "frame before READY ignored");
            return;
        }
        match msg {
            Message::Ready(_) => {}
            Message::Pong(p) => {
                let Ok(seq) = <[u8; 8]>::try_from(p) else {
                    tracing::debug!("PONG with a payload this client did not send");
                    return;
                };
                let seq = u64::from_be_bytes(seq);
                if let Some(tx) = lock(&self.reg).pings.remove(&seq) {
                    let _ = tx.send(Instant::now());
                }
            }
            Message::ShutdownDone => {
                let mut st = lock(&self.state);
                st.shutdown_done = true;
                self.cond.notify_all();
            }
            Message::Error(e) if id == 0 => {
                let mut st = lock(&self.state);
                if st.shutdown_pending && e.frame_kind == Some(Kind::Shutdown as u8) {
                    st.shutdown_error = Some(e);
                    self.cond.notify_all();
                    return;
                }
                drop(st);
                tracing::warn!("agent error {}: {}", e.kind, e.message);
                self.push_error(e);
            }
            Message::Error(e) => {
                if let Some((tx, _)) = self.route(id) {
                    let _ = tx.send(Routed::Error(e));
                } else {
                    tracing::debug!(
                        id,
                        "agent error for a session that is gone: {} {}",
                        e.kind,
                        e.message
                    );
                }
            }
            Message::Started(s) => self.deliver(id, Routed::Started(s.pid, s.session)),
            Message::ExecFailed(f) => {
                if let Some((tx, sess)) = self.route(id) {
                    let mut st = sess.lock();
                    st.ended = true;
                    sess.cond.notify_all();
                    drop(st);
                    let _ = tx.send(Routed::ExecFailed(f));
                    self.unregister(id);
                }
            }
            Message::StdinAck(Ack { bytes }) => {
                if let Some((_, sess)) = self.route(id) {
                    let mut st = sess.lock();
                    let credit = st.stdin_credit.saturating_add(bytes);
                    if credit > st.stdin_window {
                        tracing::warn!(id, bytes, "STDIN_ACK for more than was sent");
                    }
                    st.stdin_credit = credit.min(st.stdin_window);
                    sess.cond.notify_all();
                }
            }
            Message::Stdout(d) => self.output(id, d, true),
            Message::Stderr(d) => self.output(id, d, false),
            Message::Exited(x) => {
                if let Some((tx, sess)) = self.route(id) {
                    let mut st = sess.lock();
                    st.ended = true;
                    sess.cond.notify_all();
                    drop(st);
                    let _ = tx.send(Routed::Exited(ExitStatus::from(x)));
                    self.unregister(id);
                } else {
                    tracing::debug!(id, "EXITED for an unknown session");
                }
            }
            // decode_from_agent refuses host → agent kinds.
            Message::Ping(_)
            | Message::Shutdown(_)
            | Message::Exec(_)
            | Message::Stdin(_)
            | Message::StdinClose
            | Message::Resize(_)
            | Message::Signal(_)
            | Message::OutputAck(_) => {}
            Message::Sessions(m) => self.sessions_frame(id, m),
            Message::Clock(m) => match ClockReply::from_msg(&m) {
                Some(reply) => self.deliver(id, Routed::Clock(reply)),
                None => tracing::debug!(id, "host-side clock frame from the agent"),
            },
            Message::Fs(_) | Message::Net(_) => {
                tracing::debug!(
                    kind = frame.kind,
                    id,
                    "extension frame this client does not use"
                );
            }
        }
    }

    /// A `sessions` frame: ATTACH_FAILED and DETACHED end the id here.
    fn sessions_frame(&self, id: u32, m: SessionsMsg) {
        let lost = match &m {
            SessionsMsg::Detached(d) => Some(Some((d.session, d.reason.clone()))),
            SessionsMsg::AttachFailed(_) => Some(None),
            _ => None,
        };
        let Some(lost) = lost else {
            return self.deliver(id, Routed::Sessions(m));
        };
        let Some((tx, sess)) = self.route(id) else {
            tracing::debug!(id, "{:?} for an unknown id", m.kind());
            return;
        };
        let mut st = sess.lock();
        st.ended = true;
        st.lost = lost;
        sess.cond.notify_all();
        drop(st);
        let _ = tx.send(Routed::Sessions(m));
        self.unregister(id);
    }

    fn deliver(&self, id: u32, msg: Routed) {
        match self.route(id) {
            Some((tx, _)) => {
                let _ = tx.send(msg);
            }
            None => tracing::debug!(id, "frame for an unknown session: {msg:?}"),
        }
    }

    fn output(&self, id: u32, data: &[u8], stdout: bool) {
        let Some((tx, sess)) = self.route(id) else {
            tracing::debug!(id, "output for an unknown session");
            return;
        };
        // The session lock orders this against the Session being dropped:
        // either the bytes reach its channel (and the drop acknowledges
        // them) or they are acknowledged here.
        let st = sess.lock();
        if st.detached {
            if st.output_window > 0 && !st.ended && !st.closed {
                let ack = Message::OutputAck(Ack {
                    bytes: data.len() as u32,
                });
                let _ = self.send(id, &ack);
            }
            return;
        }
        let data = data.to_vec();
        let _ = tx.send(if stdout {
            Routed::Stdout(data)
        } else {
            Routed::Stderr(data)
        });
    }
}

/// The connection as owned by the API handles. Dropping the last one
/// closes the transport (for a spawned agent: closes its stdin, which ends
/// it and every session), reaps a spawned agent and joins the reader.
pub(crate) struct Conn {
    pub(crate) shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    child: Mutex<Option<Child>>,
}

/// How long a dropped client waits for a spawned agent to exit after its
/// stdin closed before killing it.
const CHILD_EXIT_WAIT: Duration = Duration::from_secs(3);

impl Conn {
    /// Starts the reader and writer threads on a transport.
    pub(crate) fn start(read: OwnedFd, write: OwnedFd, child: Option<Child>) -> io::Result<Conn> {
        let (wake_r, wake_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // Ids start at a varying point so that a host reconnecting to a
        // device port is unlikely to collide with sessions a previous host
        // left running.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        let shared = Arc::new(Shared {
            reg: Mutex::new(Registry {
                routes: HashMap::new(),
                streams: HashMap::new(),
                pings: HashMap::new(),
                next_id: (seed ^ std::process::id()) % 0x1000_0000 + 1,
                next_ping: 1,
                closed: None,
            }),
            state: Mutex::new(ConnState::default()),
            cond: Condvar::new(),
            out: Mutex::new(Outbox::default()),
            out_cond: Condvar::new(),
            wake: wake_w,
            stop: AtomicBool::new(false),
            errors: Mutex::new(VecDeque::new()),
        });
        let w_shared = shared.clone();
        let write = File::from(write);
        std::thread::Builder::new()
            .name("agentd-client-writer".into())
            .spawn(move || writer_loop(&w_shared, write))?;
        let r_shared = shared.clone();
        let read = File::from(read);
        let reader = std::thread::Builder::new()
            .name("agentd-client-reader".into())
            .spawn(move || reader_loop(&r_shared, read, wake_r));
        let reader = match reader {
            Ok(h) => h,
            Err(e) => {
                shared.close(Some("could not start the reader thread".into()));
                return Err(e);
            }
        };
        Ok(Conn {
            shared,
            reader: Mutex::new(Some(reader)),
            child: Mutex::new(child),
        })
    }

    pub(crate) fn has_child(&self) -> bool {
        lock(&self.child).is_some()
    }

    /// Waits (at most `timeout`) for a spawned agent to exit, and reaps it.
    pub(crate) fn wait_child(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = lock(&self.child);
        let c = child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        }
    }
}

impl Conn {
    /// Ends the connection: closes the write side (for an agent in stdio or
    /// socket mode, end of file: it kills every session and exits), reaps a
    /// spawned agent (killing it if it does not exit in time), then stops
    /// the reader. Idempotent.
    pub(crate) fn close(&self) {
        self.shared.close_writer();
        if let Some(mut child) = lock(&self.child).take() {
            let deadline = Instant::now() + CHILD_EXIT_WAIT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        tracing::warn!("agent did not exit after its stdin closed; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.shared.close(Some("client closed".into()));
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.close();
    }
}

/// Writes what the senders queue, whole frames at a time and everything
/// queued so far in one write, until asked to close or a write fails.
fn writer_loop(shared: &Shared, mut out: File) {
    // The buffer being written; it trades places with the outbox's buffer
    // on every round, and both keep their capacity.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let close = {
            let mut q = lock(&shared.out);
            while q.buf.is_empty() && !q.close {
                q = wait(&shared.out_cond, q);
            }
            std::mem::swap(&mut q.buf, &mut buf);
            // Sends fail once `close` is set, so `buf` holds everything
            // that was queued before it.
            q.close
        };
        if !buf.is_empty() {
            if let Err(e) = out.write_all(&buf) {
                shared.close(Some(format!("write to the agent failed: {e}")));
                break;
            }
            buf.clear();
            if buf.capacity() > RETAIN_CAPACITY {
                buf.shrink_to(RETAIN_CAPACITY);
            }
        }
        if close {
            break;
        }
    }
    // A socket's read side is another descriptor of the same socket, so
    // closing this one alone would not tell the agent: shut it down.
    // SAFETY: shutdown(2) on a descriptor we own; on anything but a socket
    // it fails with ENOTSOCK and does nothing.
    unsafe {
        libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&out), libc::SHUT_WR);
    }
}

fn reader_loop(shared: &Shared, mut input: File, wake: OwnedFd) {
    let mut dec = Decoder::new();
    let reason = loop {
        if shared.stop.load(Ordering::SeqCst) {
            break None;
        }
        let mut fds = [
            PollFd::new(input.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Some(format!("poll failed: {e}")),
        }
        let wake_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        let input_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if wake_ready && shared.stop.load(Ordering::SeqCst) {
            break None;
        }
        if !input_ready {
            continue;
        }
        match dec.read_from(&mut input) {
            Ok(0) => {
                break Some(if dec.is_at_boundary() {
                    "end of file from the agent".to_owned()
                } else {
                    "end of file from the agent inside a frame".to_owned()
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => break Some(format!("read from the agent failed: {e}")),
        }
        while let Some(item) = dec.next_frame() {
            match item {
                Ok(frame) => shared.handle(frame),
                Err(e) => {
                    tracing::warn!("bad frame from agent: {e}");
                    shared.push_error(ErrorMsg::new(
                        crate::messages::ProtocolError::from(e).kind(),
                        format!("agentctl could not read a frame from the agent: {e}"),
                        e.frame_kind(),
                    ));
                }
            }
        }
    };
    shared.close(reason);
}
