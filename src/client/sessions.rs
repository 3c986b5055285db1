//! The `sessions` extension from the host: sessions that outlive their
//! host. Start one detached, list the agent's sessions (from any
//! connection), attach one by number or tag with a replay of its output,
//! detach it again.
//!
//! Attaching gives the same [`Session`] as [`Client::exec`]: events
//! (replayed output first, then live output, then the exit), stdin,
//! resize, signals, wait. A session another connection attaches is taken
//! from this one: its last event is then [`Event::Detached`](super::Event::Detached).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::conn::{Routed, SessState, SessionShared};
use super::error::{Error, Result};
use super::status::ExitStatus;
use super::{Client, Session, SessionHandle, STDIN_CHUNK};
use crate::codec::MAX_PAYLOAD;
use crate::messages::{
    Attach, AttachFailedKind, Exec, ExecFailedKind, Kind, List, Message, SessionInfo, SessionsMsg,
};

/// Which session: by its agent-wide number or by the tag given at EXEC.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SessionRef {
    /// STARTED's `session`, as [`Session::number`] and `agentctl ps` show it.
    Number(u64),
    /// EXEC's `tag` ([`Command::tag`](super::Command::tag), `agentctl exec --name`).
    Tag(String),
}

impl SessionRef {
    /// A name as a user types it: all digits is a number, anything else a
    /// tag.
    pub fn parse(name: &str) -> SessionRef {
        match name.parse::<u64>() {
            Ok(n) if !name.starts_with('+') => SessionRef::Number(n),
            _ => SessionRef::Tag(name.to_owned()),
        }
    }
}

impl From<u64> for SessionRef {
    fn from(n: u64) -> Self {
        SessionRef::Number(n)
    }
}

impl From<&str> for SessionRef {
    /// As [`SessionRef::parse`].
    fn from(s: &str) -> Self {
        SessionRef::parse(s)
    }
}

impl From<String> for SessionRef {
    /// As [`SessionRef::parse`].
    fn from(s: String) -> Self {
        SessionRef::parse(&s)
    }
}

impl std::fmt::Display for SessionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionRef::Number(n) => write!(f, "{n}"),
            SessionRef::Tag(t) => f.write_str(t),
        }
    }
}

/// Where a session is in its life (SESSIONS' `state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// EXEC received, not started yet.
    Starting,
    /// Its process runs.
    Running,
    /// Its process was reaped; descendants still hold its output open.
    Lingering,
    /// It ended, with this status.
    Exited(ExitStatus),
    /// A state this client does not know (a newer agent).
    Other(String),
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionState::Starting => f.write_str("starting"),
            SessionState::Running => f.write_str("running"),
            SessionState::Lingering => f.write_str("lingering"),
            SessionState::Exited(_) => f.write_str("exited"),
            SessionState::Other(s) => f.write_str(s),
        }
    }
}

/// One of the agent's sessions, as [`Client::sessions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The agent-wide number (never reused while the agent runs).
    pub number: u64,
    /// EXEC's tag.
    pub tag: Option<String>,
    /// Its process id in the agent's namespace.
    pub pid: u32,
    /// The program, as EXEC gave it.
    pub cmd: String,
    /// Its arguments (the agent cuts them at 16 of 200 bytes each).
    pub args: Vec<String>,
    /// EXEC's user.
    pub user: Option<String>,
    /// Whether it runs on a pseudo-terminal.
    pub tty: bool,
    /// Where it is in its life.
    pub state: SessionState,
    /// Whether a host connection has it (this one or another).
    pub attached: bool,
    /// Its id on this connection, when this connection has it.
    pub id: Option<u32>,
    /// When it started (the agent's wall clock).
    pub started: SystemTime,
    /// Bytes it wrote to stdout so far (the stream's next offset).
    pub stdout_bytes: u64,
    /// Bytes it wrote to stderr so far.
    pub stderr_bytes: u64,
}

impl SessionRecord {
    /// The exit status, once it ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match &self.state {
            SessionState::Exited(x) => Some(*x),
            _ => None,
        }
    }

    /// Whether it has ended.
    pub fn has_ended(&self) -> bool {
        matches!(self.state, SessionState::Exited(_))
    }
}

impl From<SessionInfo> for SessionRecord {
    fn from(i: SessionInfo) -> Self {
        // A lingering session's `exit` is provisional (its deadline's
        // `timed_out` is only settled when it finishes): only `exited`
        // counts as ended.
        let state = match (i.state.as_str(), i.exit) {
            ("exited", Some(x)) => SessionState::Exited(ExitStatus::from(x)),
            ("starting", _) => SessionState::Starting,
            ("running", _) => SessionState::Running,
            ("lingering", _) => SessionState::Lingering,
            (other, _) => SessionState::Other(other.to_owned()),
        };
        SessionRecord {
            number: i.session,
            tag: i.tag,
            pid: i.pid,
            cmd: i.cmd,
            args: i.args,
            user: i.user,
            tty: i.tty,
            state,
            attached: i.attached,
            id: i.id,
            started: UNIX_EPOCH + Duration::from_millis(i.started_ms),
            stdout_bytes: i.stdout_bytes,
            stderr_bytes: i.stderr_bytes,
        }
    }
}

/// A session started with [`Client::exec_detached`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetachedSession {
    /// Its agent-wide number, to attach it by.
    pub number: u64,
    /// Its process id in the agent's namespace.
    pub pid: u32,
}

/// What to replay when attaching: see [`Client::attach`].
///
/// By default every byte the agent still keeps of each stream is replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    stdout_from: Option<u64>,
    stderr_from: Option<u64>,
    tail: Option<u64>,
    output_window: u32,
}

impl AttachOptions {
    /// Replays everything still kept.
    pub fn new() -> Self {
        AttachOptions::default()
    }

    /// Replays each stream from this byte offset (a stream's first byte is
    /// offset 0; [`SessionRecord::stdout_bytes`] is the next one). Bytes
    /// asked for that the ring dropped are reported in
    /// [`Session::attached`]'s `stdout_lost`/`stderr_lost`.
    pub fn since(&mut self, stdout: u64, stderr: u64) -> &mut Self {
        self.stdout_from = Some(stdout);
        self.stderr_from = Some(stderr);
        self
    }

    /// Replays at most the last `bytes` of each stream (with
    /// [`since`](Self::since), the later start wins).
    pub fn tail(&mut self, bytes: u64) -> &mut Self {
        self.tail = Some(bytes);
        self
    }

    /// No replay: live output only.
    pub fn no_replay(&mut self) -> &mut Self {
        self.tail(0)
    }

    /// As [`Command::output_window`](super::Command::output_window), for
    /// this connection.
    pub fn output_window(&mut self, bytes: u32) -> &mut Self {
        self.output_window = bytes;
        self
    }

    fn request(&self, target: &SessionRef) -> Attach {
        let (session, tag) = match target {
            SessionRef::Number(n) => (Some(*n), None),
            SessionRef::Tag(t) => (None, Some(t.clone())),
        };
        Attach {
            session,
            tag,
            stdout_from: self.stdout_from,
            stderr_from: self.stderr_from,
            tail: self.tail,
            output_window: self.output_window,
        }
    }
}

/// How many times an id the agent says is in use is replaced.
const ID_RETRIES: usize = 16;

impl Client {
    /// Lists the agent's live sessions and the ended ones whose exit no
    /// host has seen (LIST, every page), from any connection.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), agentd::client::Error> {
    /// let client = agentd::client::Client::connect("unix:/run/agentd.sock")?;
    /// for s in client.sessions()? {
    ///     println!("{} {:?} {} {}", s.number, s.tag, s.pid, s.state);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn sessions(&self) -> Result<Vec<SessionRecord>> {
        self.list(false)
    }

    /// As [`sessions`](Self::sessions), with the ended sessions the agent
    /// keeps after a host saw their exit (`agentctl ps -a`).
    pub fn sessions_all(&self) -> Result<Vec<SessionRecord>> {
        self.list(true)
    }

    fn list(&self, all: bool) -> Result<Vec<SessionRecord>> {
        'ids: for _ in 0..ID_RETRIES {
            let (id, rx) = self.request_id()?;
            let shared = &self.conn.shared;
            let msg = Message::Sessions(SessionsMsg::List(List { all }));
            if let Err(e) = shared.send(id, &msg) {
                shared.unregister(id);
                return Err(e);
            }
            let mut out = Vec::new();
            loop {
                let reply = rx.recv();
                match reply {
                    Ok(Routed::Sessions(SessionsMsg::Sessions(page))) => {
                        out.extend(page.sessions.into_iter().map(SessionRecord::from));
                        if !page.more {
                            shared.unregister(id);
                            return Ok(out);
                        }
                    }
                    Ok(Routed::Error(e)) => {
                        shared.unregister(id);
                        if out.is_empty()
                            && e.error_kind() == Some(crate::messages::ErrorKind::DuplicateId)
                        {
                            continue 'ids;
                        }
                        return Err(Error::Protocol(e));
                    }
                    Ok(other) => {
                        shared.unregister(id);
                        return Err(Error::AgentViolation(format!(
                            "{other:?} in answer to LIST"
                        )));
                    }
                    Err(_) => return Err(shared.closed_error().unwrap_or_else(Error::closed)),
                }
            }
        }
        Err(Error::AgentViolation(
            "ERROR duplicate_id to LIST for every id tried".into(),
        ))
    }

    /// Starts a process detached (EXEC with `detach`): it belongs to no
    /// connection, its output goes to its replay ring, and any host can
    /// [`attach`](Self::attach) it. Returns its number once it runs.
    pub fn exec_detached(&self, request: impl Into<Exec>) -> Result<DetachedSession> {
        let mut request: Exec = request.into();
        request.detach = true;
        let shared = &self.conn.shared;
        for _ in 0..ID_RETRIES {
            let (id, rx) = self.request_id()?;
            let sent = shared
                .send_with(|buf| crate::messages::append_map(buf, Kind::Exec as u8, id, &request));
            if let Err(e) = sent {
                shared.unregister(id);
                return Err(e);
            }
            let reply = rx.recv();
            // STARTED is a detached EXEC's last frame on its id.
            shared.unregister(id);
            match reply {
                Ok(Routed::Started(pid, Some(number))) => {
                    return Ok(DetachedSession { number, pid })
                }
                Ok(Routed::Started(_, None)) => {
                    return Err(Error::AgentViolation(
                        "STARTED without a session number for a detached EXEC (does the agent serve `sessions`?)".into(),
                    ))
                }
                Ok(Routed::ExecFailed(f)) => {
                    if f.failed_kind() == Some(ExecFailedKind::DuplicateId) {
                        continue;
                    }
                    return Err(Error::ExecFailed(f));
                }
                Ok(Routed::Error(e)) => return Err(Error::Protocol(e)),
                Ok(other) => {
                    return Err(Error::AgentViolation(format!(
                        "{other:?} in answer to a detached EXEC"
                    )))
                }
                Err(_) => return Err(shared.closed_error().unwrap_or_else(Error::closed)),
            }
        }
        Err(Error::AgentViolation(
            "EXEC_FAILED duplicate_id for every id tried".into(),
        ))
    }

    /// Attaches a session (ATTACH) by number or tag, from any connection:
    /// the returned [`Session`] first gets the replayed output (see
    /// [`AttachOptions`]; what was asked for but is no longer kept is in
    /// [`Session::attached`]), then live output and the exit; stdin,
    /// resize and signals go to it. A session that has already ended
    /// replays and exits at once. A connection that had it gets
    /// [`Event::Detached`](super::Event::Detached).
    ///
    /// Fails with [`Error::AttachFailed`] (`not_found`, `ambiguous`: the
    /// tag names several live sessions).
    ///
    /// ```no_run
    /// use agentd::client::{AttachOptions, Client, Command, Event};
    ///
    /// # fn main() -> Result<(), agentd::client::Error> {
    /// let client = Client::connect("unix:/run/agentd.sock")?;
    /// client.exec_detached(Command::new("make").tag("build"))?;
    /// // ... later, from any host:
    /// let mut build = client.attach("build", &AttachOptions::new())?;
    /// if let Some(a) = build.attached() {
    ///     eprintln!("{} bytes of output lost", a.stdout_lost + a.stderr_lost);
    /// }
    /// for event in build.events() {
    ///     if let Event::Stdout(b) = event? {
    ///         print!("{}", String::from_utf8_lossy(&b));
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn attach(
        &self,
        target: impl Into<SessionRef>,
        options: &AttachOptions,
    ) -> Result<Session> {
        let target = target.into();
        let request = options.request(&target);
        let ready = self.ready();
        let chunk = STDIN_CHUNK
            .min(ready.max_payload as usize)
            .clamp(1, MAX_PAYLOAD);
        let shared = &self.conn.shared;
        for _ in 0..ID_RETRIES {
            let (id, sess, rx) = shared.register(|id| {
                Arc::new(SessionShared::new(
                    id,
                    SessState {
                        stdin_credit: ready.stdin_window,
                        stdin_window: ready.stdin_window,
                        stdin_chunk: chunk,
                        stdin_closed: false,
                        ended: false,
                        closed: false,
                        detached: false,
                        output_window: options.output_window,
                        handles: 1,
                        lost: None,
                    },
                ))
            })?;
            let msg = Message::Sessions(SessionsMsg::Attach(Box::new(request.clone())));
            if let Err(e) = shared.send(id, &msg) {
                shared.unregister(id);
                return Err(e);
            }
            match rx.recv() {
                Ok(Routed::Sessions(SessionsMsg::Attached(a))) => {
                    {
                        let mut st = sess.lock();
                        st.stdin_closed = !a.stdin;
                    }
                    let handle = SessionHandle::new(self.conn.clone(), sess);
                    let (pid, tty) = (a.pid, a.tty);
                    return Ok(
                        Session::new(handle, rx, pid, tty, options.output_window).with_attached(a)
                    );
                }
                Ok(Routed::Sessions(SessionsMsg::AttachFailed(f))) => {
                    if AttachFailedKind::parse(&f.kind) == Some(AttachFailedKind::DuplicateId) {
                        continue;
                    }
                    return Err(Error::AttachFailed(f));
                }
                Ok(Routed::Error(e)) => {
                    shared.unregister(id);
                    return Err(Error::Protocol(e));
                }
                Ok(other) => {
                    shared.unregister(id);
                    return Err(Error::AgentViolation(format!(
                        "{other:?} for ATTACH {id} before ATTACHED"
                    )));
                }
                Err(_) => return Err(shared.closed_error().unwrap_or_else(Error::closed)),
            }
        }
        Err(Error::AgentViolation(
            "ATTACH_FAILED duplicate_id for every id tried".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(SessionRef::parse("12"), SessionRef::Number(12));
        assert_eq!(SessionRef::parse("web"), SessionRef::Tag("web".into()));
        assert_eq!(SessionRef::parse("+1"), SessionRef::Tag("+1".into()));
        assert_eq!(SessionRef::parse("-1"), SessionRef::Tag("-1".into()));
        assert_eq!(SessionRef::from(7u64).to_string(), "7");
    }
}
