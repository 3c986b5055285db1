//! The client's error type.

use std::io;

use crate::messages::{
    AttachFailed, AttachFailedKind, ErrorKind, ErrorMsg, ExecFailed, ExecFailedKind,
};

use super::transport::ConnectError;

/// Everything that can go wrong talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection to the agent is gone (end of file or a failed read or
    /// write on the transport), or the client was closed. Every waiter wakes
    /// with this when it happens.
    #[error("transport closed{}", reason_suffix(.0))]
    TransportClosed(Option<String>),

    /// Opening the transport failed (spawning the agent, connecting to the
    /// socket, opening the device).
    #[error("{context}: {source}")]
    Connect {
        /// What was being done, naming the path or program.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Reaching an agent at a [`Target`](super::Target) failed: the
    /// address, the socket, AF_VSOCK, or the hybrid vsock handshake (each
    /// a variant of [`ConnectError`]).
    #[error(transparent)]
    Transport(#[from] ConnectError),

    /// No READY arrived within the configured time.
    #[error("no READY from the agent within {0:?}")]
    ReadyTimeout(std::time::Duration),

    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {0}; this client speaks version 1")]
    UnsupportedProtocol(u32),

    /// The agent answered a request with an ERROR frame.
    #[error("agent error {}: {}", .0.kind, .0.message)]
    Protocol(ErrorMsg),

    /// EXEC_FAILED: the program never ran.
    #[error("{}", exec_failed_text(.0))]
    ExecFailed(ExecFailed),

    /// ATTACH_FAILED: no session was attached (see
    /// [`Error::attach_failed_kind`]).
    #[error("attach failed ({}): {}", .0.kind, .0.message)]
    AttachFailed(AttachFailed),

    /// The session was detached from this connection (DETACHED: this host
    /// asked, or another connection attached it): it goes on, but not
    /// here.
    #[error("session {session} is detached from this connection ({reason})")]
    Detached {
        /// The session's number.
        session: u64,
        /// `detach` or `attached_elsewhere`.
        reason: String,
    },

    /// A request the client refuses before sending it (the message says
    /// which argument and why).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The session has ended (EXITED was received): there is no process to
    /// write to or signal any more.
    #[error("the session has ended")]
    SessionEnded,

    /// STDIN after the session's stdin was closed, or on a session started
    /// with `stdin: false`.
    #[error("the session's stdin is closed")]
    StdinClosed,

    /// A request that cannot be sent: it would be a frame over the frame
    /// limit (for example an EXEC whose strings add up to more than 1 MiB).
    #[error("cannot send the request: {0}")]
    Encode(crate::messages::EncodeError),

    /// The agent sent something the contract does not allow (a frame that
    /// does not decode, output before STARTED, a zero stdin window...).
    #[error("agent broke the protocol: {0}")]
    AgentViolation(String),
}

fn reason_suffix(reason: &Option<String>) -> String {
    match reason {
        Some(r) => format!(": {r}"),
        None => String::new(),
    }
}

fn exec_failed_text(f: &ExecFailed) -> String {
    let mut s = format!("exec failed ({}", f.kind);
    if let Some(stage) = &f.stage {
        s.push_str(", at ");
        s.push_str(stage);
    }
    if let Some(errno) = f.errno {
        s.push_str(&format!(", errno {errno}"));
    }
    s.push_str("): ");
    s.push_str(&f.message);
    s
}

impl Error {
    /// The EXEC_FAILED kind, for [`Error::ExecFailed`].
    pub fn exec_failed_kind(&self) -> Option<ExecFailedKind> {
        match self {
            Error::ExecFailed(f) => f.failed_kind(),
            _ => None,
        }
    }

    /// The ATTACH_FAILED kind, for [`Error::AttachFailed`].
    pub fn attach_failed_kind(&self) -> Option<AttachFailedKind> {
        match self {
            Error::AttachFailed(f) => AttachFailedKind::parse(&f.kind),
            _ => None,
        }
    }

    /// The ERROR kind, for [`Error::Protocol`].
    pub fn error_kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Protocol(e) => e.error_kind(),
            _ => None,
        }
    }

    pub(crate) fn closed() -> Error {
        Error::TransportClosed(None)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::TransportClosed(_) | Error::SessionEnded | Error::StdinClosed => {
                io::ErrorKind::BrokenPipe
            }
            Error::Connect { source, .. } => source.kind(),
            Error::Transport(ConnectError::SocketAbsent(_)) => io::ErrorKind::NotFound,
            Error::Transport(ConnectError::Refused(_)) => io::ErrorKind::ConnectionRefused,
            Error::Transport(ConnectError::HandshakeTimeout { .. }) => io::ErrorKind::TimedOut,
            Error::Detached { .. } => io::ErrorKind::BrokenPipe,
            Error::AttachFailed(f) if f.kind == "not_found" => io::ErrorKind::NotFound,
            Error::InvalidArgument(_) => io::ErrorKind::InvalidInput,
            Error::ReadyTimeout(_) => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
