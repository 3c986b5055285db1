//! What the agent does with each frame a host sends: decode it (refusing
//! what the contract refuses, in the order docs/PROTOCOL.md gives), then
//! act on the connection or on the session the frame's id names on that
//! host's link. Every refusal is a typed ERROR or EXEC_FAILED, never the
//! end of anything else.

use std::io;
use std::time::Duration;

use crate::codec::{self, Frame};
use crate::messages::{self, ErrorKind, Exec, ExecFailedKind, Feature, Kind, Message};

use super::cgroups::{self, SessionCgroup};
use super::core::{Core, Owned};
use super::session::{Info, Owner, Session, SessionSpec, Target};
use super::spawn::{self, SpawnError};
use super::stream::InflowError;

/// The extensions this agent serves, as READY's `features` lists them.
pub(crate) const SERVED: &[Feature] =
    &[Feature::Fs, Feature::Net, Feature::Sessions, Feature::Clock];

/// What a session frame's handler refuses with: an ERROR kind and message.
type Refusal = (ErrorKind, String);

impl Core {
    /// One whole frame from link `lk`.
    pub(crate) fn on_frame(&mut self, lk: usize, frame: Frame<'_>) {
        let id = frame.id;
        // A kind of an extension the agent does not serve is unknown, as
        // it was before the extension existed (extension rule 1).
        if let Some(f) = Kind::from_u8(frame.kind).and_then(Kind::feature) {
            if !SERVED.contains(&f) {
                let e = messages::ProtocolError::UnknownKind(frame.kind);
                return self.send_error(lk, id, e.kind(), e.to_string(), Some(frame.kind));
            }
        }
        let msg = match Message::decode_from_host(frame) {
            Ok(msg) => msg,
            Err(e) => return self.send_error(lk, id, e.kind(), e.to_string(), Some(frame.kind)),
        };
        match msg {
            Message::Ping(payload) => {
                let link = &mut self.links[lk];
                if let Err(e) = codec::append_raw(link.frames(), Kind::Pong as u8, id, payload) {
                    // A PING's payload is at most 4 KiB (checked when decoded).
                    tracing::error!(error = %e, "PONG could not be encoded");
                }
            }
            Message::Shutdown(s) => {
                self.start_shutdown(Duration::from_millis(u64::from(s.grace_ms)))
            }
            Message::Exec(req) => self.exec(lk, id, &req),
            Message::Stdin(data) => self.with_session(lk, id, Kind::Stdin, |core, key| {
                if core.sessions[key].is_finished() {
                    let msg = "the session has exited";
                    return Err((ErrorKind::StdinClosed, msg.to_owned()));
                }
                let window = core.config.stdin_window;
                let frames = Some(core.links[lk].frames());
                core.sessions[key]
                    .push_stdin(data, window, frames, &core.registry)
                    .map_err(|e| stdin_refusal(e, data.len()))
            }),
            Message::StdinClose => self.with_session(lk, id, Kind::StdinClose, |core, key| {
                let frames = Some(core.links[lk].frames());
                core.sessions[key]
                    .close_stdin(frames, &core.registry)
                    .map_err(|_| {
                        let msg = "stdin of this session is already closed";
                        (ErrorKind::StdinClosed, msg.to_owned())
                    })
            }),
            Message::Resize(r) => self.with_session(lk, id, Kind::Resize, |core, key| {
                let Some(fd) = core.sessions[key].pty_fd() else {
                    let msg = "the session has no terminal (started without tty)";
                    return Err((ErrorKind::NotATty, msg.to_owned()));
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
            Message::Signal(sig) => self.with_session(lk, id, Kind::Signal, |core, key| {
                if !(0..=64).contains(&sig.signal) {
                    let msg = format!("{} is not a Linux signal number (0 to 64)", sig.signal);
                    return Err((ErrorKind::InvalidSignal, msg));
                }
                let s = &mut core.sessions[key];
                let target = match (sig.tree, sig.group) {
                    (true, _) if !s.has_cgroup() => {
                        let msg = "SIGNAL tree needs per-session cgroups (cgroup v2: PID 1 with cgroup2, or agentd --cgroup-root), which this agent does not have";
                        return Err((ErrorKind::Unsupported, msg.to_owned()));
                    }
                    (true, _) => Target::Tree,
                    (false, true) => Target::Group,
                    (false, false) => Target::Process,
                };
                s.signal(sig.signal, target);
                Ok(())
            }),
            Message::OutputAck(ack) => self.with_session(lk, id, Kind::OutputAck, |core, key| {
                core.sessions[key].ack_output(ack.bytes);
                core.service(key);
                Ok(())
            }),
            Message::Fs(m) => self.on_fs_frame(lk, id, m),
            Message::Net(m) => self.on_net_frame(lk, id, m),
            Message::Sessions(m) => self.on_sessions_frame(lk, id, m),
            Message::Clock(m) => self.on_clock_frame(lk, id, m),
            // decode_from_host lets only host → agent kinds through.
            other => self.send_error(
                lk,
                id,
                ErrorKind::WrongDirection,
                format!("{} is not sent by a host", other.kind().name()),
                Some(frame.kind),
            ),
        }
    }

    /// Runs `f` on the session that `id` names on link `lk`, answering
    /// ERROR for an unknown id or for what `f` refuses.
    fn with_session(
        &mut self,
        lk: usize,
        id: u32,
        kind: Kind,
        f: impl FnOnce(&mut Core, usize) -> Result<(), Refusal>,
    ) {
        let Some(&Owned::Session(key)) = self.ids.get(&(lk, id)) else {
            let msg = format!("no session with id {id}");
            return self.send_error(lk, id, ErrorKind::UnknownSession, msg, Some(kind as u8));
        };
        if let Err((err, message)) = f(self, key) {
            self.send_error(lk, id, err, message, Some(kind as u8));
        }
    }

    /// EXEC: checks the id and the agent's state, prepares and spawns the
    /// child, and makes its session (STARTED waits for the status pipe).
    fn exec(&mut self, lk: usize, id: u32, req: &Exec) {
        if let Err(e) = self.may_exec(lk, id) {
            return self.exec_failed(lk, id, e);
        }
        let seq = self.take_seq();
        let (child, cgroup) = match self.spawn_in_cgroup(seq, req) {
            Ok(started) => started,
            Err(e) => return self.exec_failed(lk, id, e),
        };
        let pid = child.pid;
        let spec = SessionSpec {
            owner: Owner { link: lk, id },
            seq,
            output_window: req.output_window,
            linger_ms: req.linger_ms,
            replay_bytes: req.replay_bytes.unwrap_or(self.config.replay_bytes),
            info: session_info(req),
            timeout: req
                .timeout_ms
                .filter(|&t| t > 0)
                .map(|t| (t, req.kill_grace_ms.unwrap_or(DEFAULT_KILL_GRACE_MS))),
            detach: req.detach,
        };
        let key = self.sessions.vacant_key();
        match Session::new(spec, child, key, &self.registry) {
            Ok(mut session) => {
                if let Some(cg) = cgroup {
                    session.set_cgroup(cg);
                }
                self.add_session(key, session)
            }
            Err((e, status)) => {
                self.unwatched(pid, status);
                if let Some(cg) = cgroup {
                    // The child runs on unwatched: its cgroup goes once empty.
                    cg.signal(libc::SIGKILL);
                    self.keep_until_empty(cg);
                }
                let err = SpawnError {
                    kind: ExecFailedKind::Resource,
                    message: format!("registering the session's fds: {e}"),
                    errno: e.raw_os_error(),
                    stage: Some("register"),
                };
                self.exec_failed(lk, id, err);
            }
        }
    }

    /// Prepares `req` and spawns its child, in a cgroup of its own (made
    /// with the limits `req` asks for) where the agent has a cgroup root.
    /// Limits the agent cannot enforce are refused, never ignored.
    fn spawn_in_cgroup(
        &mut self,
        seq: u64,
        req: &Exec,
    ) -> Result<(spawn::Child, Option<SessionCgroup>), SpawnError> {
        match &self.config.cgroups {
            Some(root) => root.check(req)?,
            None => cgroups::check_limits(None, req)?,
        }
        let mut prepared = spawn::prepare(req, &self.config.defaults)?;
        let mut cgroup = match &self.config.cgroups {
            Some(root) => Some(root.create(seq, req)?),
            None => None,
        };
        prepared.place_in_cgroup(cgroup.as_ref().and_then(SessionCgroup::procs_fd));
        match spawn::spawn(prepared) {
            Ok(child) => {
                if let Some(cg) = &mut cgroup {
                    cg.child_placed();
                }
                Ok((child, cgroup))
            }
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                Err(e)
            }
        }
    }

    /// Why an EXEC for `id` on link `lk` cannot start a session now.
    fn may_exec(&self, lk: usize, id: u32) -> Result<(), SpawnError> {
        let fail = |kind, message: String| SpawnError {
            kind,
            message,
            errno: None,
            stage: None,
        };
        if id == 0 {
            let msg = "session id 0 is reserved for the connection";
            return Err(fail(ExecFailedKind::InvalidRequest, msg.to_owned()));
        }
        if self.ids.contains_key(&(lk, id)) {
            let msg = "a session with this id is running";
            return Err(fail(ExecFailedKind::DuplicateId, msg.to_owned()));
        }
        if self.is_shutting_down() {
            let msg = "the agent is shutting down";
            return Err(fail(ExecFailedKind::Other, msg.to_owned()));
        }
        if self.live_sessions() >= self.config.max_sessions {
            let msg = format!(
                "{} sessions are running, the agent's maximum",
                self.live_sessions()
            );
            return Err(fail(ExecFailedKind::Resource, msg));
        }
        Ok(())
    }
}

/// Between a deadline's SIGTERM and its SIGKILL, unless EXEC says.
const DEFAULT_KILL_GRACE_MS: u32 = 1000;

/// How many arguments, and how many bytes of each, LIST shows.
const LISTED_ARGS: usize = 16;

/// What LIST will say of a session EXEC starts.
fn session_info(req: &Exec) -> Info {
    let clipped = |s: &String| messages::clip(s).into_owned();
    Info {
        tag: req.tag.clone(),
        cmd: clipped(&req.cmd),
        args: req.args.iter().take(LISTED_ARGS).map(clipped).collect(),
        user: req.user.as_ref().map(clipped),
        started_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// The ERROR for a STDIN the session's input refused.
fn stdin_refusal(e: InflowError, len: usize) -> Refusal {
    match e {
        InflowError::Closed => (
            ErrorKind::StdinClosed,
            "stdin of this session is closed".to_owned(),
        ),
        InflowError::WindowExceeded { in_use, window } => (
            ErrorKind::WindowExceeded,
            format!(
                "{len} bytes with {in_use} unacknowledged exceed the stdin window of {window}; frame dropped"
            ),
        ),
    }
}
