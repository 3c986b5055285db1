//! Sessions: one process started by EXEC, its stdin, its output, its end.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;

use super::conn::{Conn, Routed, SessionShared};
use super::error::{Error, Result};
use super::status::ExitStatus;
use crate::messages::{Ack, Attached, Detached, ErrorMsg, Message, Resize, SessionsMsg, Signal};

/// What a finished session produced: see [`Client::output`](super::Client::output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (for a tty session: all its output).
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// One thing that happened in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes the process wrote to stdout (for a tty session: all of its
    /// terminal output).
    Stdout(Vec<u8>),
    /// Bytes the process wrote to stderr.
    Stderr(Vec<u8>),
    /// The agent answered a frame of this session with ERROR (for example
    /// `not_a_tty` after [`Session::resize`] on a pipe session). The
    /// session goes on.
    Error(ErrorMsg),
    /// The process ended. Always the last event.
    Exited(ExitStatus),
    /// The session was detached from this connection (DETACHED): another
    /// connection attached it (`reason` `attached_elsewhere`), or this one
    /// asked ([`Session::detach`]). It goes on elsewhere; this is the last
    /// event.
    Detached(Detached),
}

/// How [`Session::detach`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachOutcome {
    /// DETACHED: the session goes on without this connection; a host can
    /// [`attach`](super::Client::attach) it by number (or tag) later.
    Detached {
        /// The session's number.
        session: u64,
    },
    /// The process ended before the DETACH reached the agent: nothing is
    /// left to attach.
    Exited(ExitStatus),
}

/// A cloneable, thread-safe handle to a session's input side: stdin,
/// resize, signals. Get one with [`Session::handle`], for example to write
/// stdin from one thread while another reads output.
///
/// When the [`Session`] and every handle are gone and stdin is still open,
/// stdin is closed (STDIN_CLOSE), as dropping a `ChildStdin` closes it.
///
/// It implements [`io::Write`] (each `write` sends as much as the stdin
/// window allows, waiting for window if there is none).
pub struct SessionHandle {
    conn: Arc<Conn>,
    sess: Arc<SessionShared>,
}

impl SessionHandle {
    pub(crate) fn new(conn: Arc<Conn>, sess: Arc<SessionShared>) -> Self {
        SessionHandle { conn, sess }
    }

    /// The session id on the wire.
    pub fn id(&self) -> u32 {
        self.sess.id
    }

    /// Sends `data` to the process's stdin, waiting for STDIN_ACKs whenever
    /// the window is used up (it never sends more than READY's
    /// `stdin_window` un-acknowledged). Returns once every byte is queued
    /// for the transport.
    pub fn write_stdin(&self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = self.write_some(data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Sends as much of `data` as the window allows now (at least one byte,
    /// waiting for window if there is none). Returns how much was sent.
    pub fn write_some(&self, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut st = self.sess.lock();
        loop {
            if st.ended {
                return Err(st.ended_error());
            }
            if st.stdin_closed {
                return Err(Error::StdinClosed);
            }
            if st.closed {
                return Err(self.closed());
            }
            if st.stdin_window == 0 {
                return Err(Error::AgentViolation(
                    "READY announced a stdin_window of 0".into(),
                ));
            }
            if st.stdin_credit > 0 {
                break;
            }
            st = self.sess.wait(st);
        }
        let n = data.len().min(st.stdin_credit as usize).min(st.stdin_chunk);
        // Sent under the session lock so no frame for this id is queued
        // after the reader has seen the session end. The payload is copied
        // once, from `data` into the outgoing buffer.
        self.conn
            .shared
            .send(self.sess.id, &Message::Stdin(&data[..n]))?;
        st.stdin_credit -= n as u32;
        Ok(n)
    }

    /// Closes the process's stdin once what was sent is written (STDIN_CLOSE;
    /// on a tty, the terminal's end-of-file character). Closing twice, or a
    /// session without stdin, or one that has ended, is not an error.
    pub fn close_stdin(&self) -> Result<()> {
        let mut st = self.sess.lock();
        if st.stdin_closed || st.ended {
            return Ok(());
        }
        if st.closed {
            return Err(self.closed());
        }
        self.conn.shared.send(self.sess.id, &Message::StdinClose)?;
        st.stdin_closed = true;
        self.sess.cond.notify_all();
        Ok(())
    }

    /// Sets the terminal size of a tty session. On a pipe session the agent
    /// answers ERROR `not_a_tty`, which arrives as [`Event::Error`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.send_control(Message::Resize(Resize { rows, cols }))
    }

    /// Sends signal `signal` (a Linux signal number, e.g. `libc::SIGTERM`)
    /// to the session's process group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.send_control(Message::Signal(Signal {
            signal,
            group: true,
            tree: false,
        }))
    }

    /// Sends signal `signal` to every process of the session's tree (its
    /// cgroup), including those that left its process group with `setsid`
    /// (extension `sessions`). An agent without per-session cgroups
    /// (READY's `cgroups` false) answers ERROR `unsupported`, which arrives
    /// as [`Event::Error`].
    pub fn signal_tree(&self, signal: i32) -> Result<()> {
        self.send_control(Message::Signal(Signal {
            signal,
            group: true,
            tree: true,
        }))
    }

    /// Asks the agent to detach the session from this connection (DETACH)
    /// and returns at once; the [`Session`]'s last event is then
    /// [`Event::Detached`] (or [`Event::Exited`], if it ended first). See
    /// [`Session::detach`], which also waits.
    pub fn detach(&self) -> Result<()> {
        self.send_control(Message::Sessions(SessionsMsg::Detach))
    }

    /// Sends signal `signal` to the session's process alone.
    pub fn signal_process(&self, signal: i32) -> Result<()> {
        self.send_control(Message::Signal(Signal {
            signal,
            group: false,
            tree: false,
        }))
    }

    fn send_control(&self, msg: Message<'_>) -> Result<()> {
        let st = self.sess.lock();
        if st.ended {
            return Err(st.ended_error());
        }
        if st.closed {
            return Err(self.closed());
        }
        self.conn.shared.send(self.sess.id, &msg)
    }

    fn closed(&self) -> Error {
        self.conn
            .shared
            .closed_error()
            .unwrap_or_else(Error::closed)
    }
}

impl Clone for SessionHandle {
    fn clone(&self) -> Self {
        self.sess.lock().handles += 1;
        SessionHandle {
            conn: self.conn.clone(),
            sess: self.sess.clone(),
        }
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        let mut st = self.sess.lock();
        st.handles -= 1;
        if st.handles == 0 && !st.stdin_closed && !st.ended && !st.closed {
            let _ = self.conn.shared.send(self.sess.id, &Message::StdinClose);
            st.stdin_closed = true;
        }
    }
}

impl io::Write for SessionHandle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(self.write_some(buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.sess.id)
            .finish()
    }
}

/// A running process on the agent, started by [`Client::exec`](super::Client::exec).
///
/// Read its output with [`Session::next_event`] or [`Session::events`];
/// with an `output_window`, output is acknowledged (OUTPUT_ACK) as it is
/// consumed. [`Session::wait`] and [`Session::wait_with_output`] close stdin
/// and run the session to its end.
///
/// Dropping a session that has not ended does not kill the process: its
/// output is discarded from then on (and acknowledged, so it never stalls),
/// and once no [`SessionHandle`] is left its stdin is closed.
pub struct Session {
    handle: SessionHandle,
    rx: mpsc::Receiver<Routed>,
    pid: u32,
    tty: bool,
    output_window: u32,
    /// Output consumed but not yet acknowledged.
    unacked: u32,
    exited: Option<ExitStatus>,
    /// The agent-wide number (STARTED's or ATTACHED's `session`).
    number: Option<u64>,
    /// ATTACHED, for a session this connection attached.
    attached: Option<Attached>,
    /// DETACHED, once received.
    detached: Option<Detached>,
}

impl Session {
    pub(crate) fn new(
        handle: SessionHandle,
        rx: mpsc::Receiver<Routed>,
        pid: u32,
        tty: bool,
        output_window: u32,
    ) -> Self {
        Session {
            handle,
            rx,
            pid,
            tty,
            output_window,
            unacked: 0,
            exited: None,
            number: None,
            attached: None,
            detached: None,
        }
    }

    pub(crate) fn with_number(mut self, number: Option<u64>) -> Self {
        self.number = number;
        self
    }

    pub(crate) fn with_attached(mut self, attached: Attached) -> Self {
        self.number = Some(attached.session);
        self.attached = Some(attached);
        self
    }

    /// The agent-wide session number (extension `sessions`; `None` from an
    /// agent without it): what [`Client::attach`](super::Client::attach)
    /// and `agentctl attach` take.
    pub fn number(&self) -> Option<u64> {
        self.number
    }

    /// For a session this connection attached: ATTACHED, where each
    /// stream's replay starts and how many bytes asked for were no longer
    /// kept (`stdout_lost`, `stderr_lost`).
    pub fn attached(&self) -> Option<&Attached> {
        self.attached.as_ref()
    }

    /// DETACHED, once the session was detached from this connection.
    pub fn detached(&self) -> Option<&Detached> {
        self.detached.as_ref()
    }

    fn finished(&self) -> bool {
        self.exited.is_some() || self.detached.is_some()
    }

    /// Detaches the session from this connection (DETACH) and waits for
    /// DETACHED: the process goes on, its output goes to its replay ring,
    /// and any host can attach it later. Output that arrives meanwhile is
    /// discarded (it was sent, so it is not replayed). If the process ends
    /// first, its exit status is returned instead.
    pub fn detach(&mut self) -> Result<DetachOutcome> {
        if let Some(x) = self.exited {
            return Ok(DetachOutcome::Exited(x));
        }
        if let Some(d) = &self.detached {
            return Ok(DetachOutcome::Detached { session: d.session });
        }
        match self.handle.detach() {
            // Ended: its EXITED or DETACHED is already on its way.
            Ok(()) | Err(Error::SessionEnded | Error::Detached { .. }) => {}
            Err(e) => return Err(e),
        }
        while let Some(ev) = self.next_event()? {
            match ev {
                Event::Detached(d) => return Ok(DetachOutcome::Detached { session: d.session }),
                Event::Exited(x) => return Ok(DetachOutcome::Exited(x)),
                _ => {}
            }
        }
        Err(self.handle.closed())
    }

    /// The session id on the wire.
    pub fn id(&self) -> u32 {
        self.handle.id()
    }

    /// The process id in the agent's namespace (STARTED's `pid`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the session runs on a pseudo-terminal.
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// A handle for the input side, usable from other threads.
    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }

    /// See [`SessionHandle::write_stdin`].
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.handle.write_stdin(data)
    }

    /// See [`SessionHandle::close_stdin`].
    pub fn close_stdin(&self) -> Result<()> {
        self.handle.close_stdin()
    }

    /// See [`SessionHandle::resize`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.handle.resize(rows, cols)
    }

    /// See [`SessionHandle::signal`].
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.handle.signal(signal)
    }

    /// See [`SessionHandle::signal_process`].
    pub fn signal_process(&self, signal: i32) -> Result<()> {
        self.handle.signal_process(signal)
    }

    /// The exit status, once [`Event::Exited`] has been consumed.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// The next event, waiting for one. `Ok(None)` after [`Event::Exited`];
    /// `Err(TransportClosed)` if the connection ends before the session does.
    pub fn next_event(&mut self) -> Result<Option<Event>> {
        if self.finished() {
            return Ok(None);
        }
        let msg = match self.rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::TryRecvError::Empty) => {
                // About to wait: give back all the window consumed so far,
                // or the agent might be waiting for it too.
                self.flush_acks();
                match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return Err(self.handle.closed()),
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => return Err(self.handle.closed()),
        };
        Ok(Some(self.consume(msg)?))
    }

    /// The next event if one is already here (never waits).
    pub fn try_next_event(&mut self) -> Result<Option<Event>> {
        if self.finished() {
            return Ok(None);
        }
        match self.rx.try_recv() {
            Ok(m) => Ok(Some(self.consume(m)?)),
            Err(mpsc::TryRecvError::Empty) => {
                self.flush_acks();
                Ok(None)
            }
            Err(mpsc::TryRecvError::Disconnected) => Err(self.handle.closed()),
        }
    }

    /// The session's events as an iterator, ending after [`Event::Exited`]
    /// (or after an error).
    pub fn events(&mut self) -> Events<'_> {
        Events {
            session: self,
            failed: false,
        }
    }

    fn consume(&mut self, msg: Routed) -> Result<Event> {
        Ok(match msg {
            Routed::Stdout(d) => {
                self.consumed(d.len());
                Event::Stdout(d)
            }
            Routed::Stderr(d) => {
                self.consumed(d.len());
                Event::Stderr(d)
            }
            Routed::Error(e) => Event::Error(e),
            Routed::Exited(x) => {
                self.exited = Some(x);
                Event::Exited(x)
            }
            Routed::Sessions(SessionsMsg::Detached(d)) => {
                self.detached = Some(d.clone());
                Event::Detached(d)
            }
            other => {
                return Err(Error::AgentViolation(format!(
                    "{other:?} on live session {}",
                    self.id()
                )))
            }
        })
    }

    fn consumed(&mut self, n: usize) {
        if self.output_window == 0 {
            return;
        }
        self.unacked = self.unacked.saturating_add(n as u32);
        // Acknowledge in batches, never holding back more than half the
        // window (and everything before waiting: see next_event).
        if self.unacked >= (self.output_window / 2).max(1) {
            self.flush_acks();
        }
    }

    fn flush_acks(&mut self) {
        if self.unacked == 0 {
            return;
        }
        let st = self.handle.sess.lock();
        if !st.ended && !st.closed {
            let ack = Message::OutputAck(Ack {
                bytes: self.unacked,
            });
            let _ = self.handle.conn.shared.send(self.id(), &ack);
        }
        self.unacked = 0;
    }

    /// Closes stdin and waits for the process to end, discarding its output.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(x) = self.exited {
            return Ok(x);
        }
        if let Some(d) = &self.detached {
            return Err(Error::Detached {
                session: d.session,
                reason: d.reason.clone(),
            });
        }
        self.close_stdin()?;
        while let Some(ev) = self.next_event()? {
            match ev {
                Event::Exited(x) => return Ok(x),
                Event::Detached(d) => {
                    return Err(Error::Detached {
                        session: d.session,
                        reason: d.reason,
                    })
                }
                _ => {}
            }
        }
        self.exited.ok_or_else(Error::closed)
    }

    /// Closes stdin and runs the session to its end, collecting its output.
    /// ERROR frames for the session are logged (with `tracing`) and skipped.
    pub fn wait_with_output(mut self) -> Result<Output> {
        self.close_stdin()?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(ev) = self.next_event()? {
            match ev {
                Event::Stdout(d) => stdout.extend_from_slice(&d),
                Event::Stderr(d) => stderr.extend_from_slice(&d),
                Event::Error(e) => {
                    tracing::warn!(id = self.id(), "agent error {}: {}", e.kind, e.message)
                }
                Event::Exited(status) => {
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                    })
                }
                Event::Detached(d) => {
                    return Err(Error::Detached {
                        session: d.session,
                        reason: d.reason,
                    })
                }
            }
        }
        Err(Error::closed())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.finished() {
            return;
        }
        let mut st = self.handle.sess.lock();
        if st.ended || st.closed {
            return;
        }
        st.detached = true;
        // Output already routed to us counts against the window too.
        let mut pending = u64::from(self.unacked);
        while let Ok(msg) = self.rx.try_recv() {
            if let Routed::Stdout(d) | Routed::Stderr(d) = msg {
                pending += d.len() as u64;
            }
        }
        if self.output_window > 0 && pending > 0 {
            let ack = Message::OutputAck(Ack {
                bytes: pending.min(u64::from(u32::MAX)) as u32,
            });
            let _ = self.handle.conn.shared.send(self.id(), &ack);
        }
        self.unacked = 0;
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id())
            .field("pid", &self.pid)
            .field("tty", &self.tty)
            .field("number", &self.number)
            .field("exited", &self.exited)
            .field("detached", &self.detached)
            .finish()
    }
}

/// Iterator over a session's events: see [`Session::events`].
pub struct Events<'a> {
    session: &'a mut Session,
    failed: bool,
}

impl Iterator for Events<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.session.next_event() {
            Ok(Some(ev)) => Some(Ok(ev)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
