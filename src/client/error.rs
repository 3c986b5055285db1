//! The client's error type.

use std::io;

use crate::messages::{
    AttachFailed, AttachFailedKind, ErrorKind, ErrorMsg, ExecFailed, ExecFailedKind, FsError,
    FsErrorKind, NetErrorKind, NetFailed,
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

    /// A local file, directory or stream failed (a tree upload's source,
    /// a download's destination).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

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

    /// FS_ERROR: a file operation failed (its wire kind, errno and path;
    /// see [`Error::fs_error_kind`]). Also what the client reports itself
    /// where std would fail before a call (remove_file of a directory).
    #[error("{}", fs_error_text(.0))]
    Fs(FsError),

    /// NET_FAILED: a connection could not be made, or NET_CLOSED with an
    /// `error`: it broke (see [`Error::net_error_kind`]).
    #[error("{}", net_error_text(.0))]
    Net(NetFailed),

    /// The agent does not serve an extension (READY's `features` does not
    /// name it).
    #[error("the agent does not serve the {0:?} extension (READY's features do not list it)")]
    Unsupported(&'static str),

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

fn fs_error_text(e: &FsError) -> String {
    let mut s = String::new();
    if let Some(p) = e.path.as_ref().filter(|p| !e.message.contains(p.as_str())) {
        s.push_str(p);
        s.push_str(": ");
    }
    s.push_str(&e.message);
    s.push_str(&format!(" ({}", e.kind));
    if let Some(errno) = e.errno {
        s.push_str(&format!(", errno {errno}"));
    }
    s.push(')');
    s
}

fn net_error_text(e: &NetFailed) -> String {
    let mut s = format!("{} ({}", e.message, e.kind);
    if let Some(errno) = e.errno {
        s.push_str(&format!(", errno {errno}"));
    }
    s.push(')');
    s
}

impl Error {
    /// The FS_ERROR kind, for [`Error::Fs`].
    pub fn fs_error_kind(&self) -> Option<FsErrorKind> {
        match self {
            Error::Fs(e) => e.error_kind(),
            _ => None,
        }
    }

    /// The NET_FAILED (or NET_CLOSED `error`) kind, for [`Error::Net`].
    pub fn net_error_kind(&self) -> Option<NetErrorKind> {
        match self {
            Error::Net(e) => e.error_kind(),
            _ => None,
        }
    }

    /// The errno the agent reported (fs and net failures).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Fs(e) => e.errno,
            Error::Net(e) => e.errno,
            _ => None,
        }
    }

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
            Error::Connect { source, .. } | Error::Io { source, .. } => source.kind(),
            Error::Transport(ConnectError::SocketAbsent(_)) => io::ErrorKind::NotFound,
            Error::Transport(ConnectError::Refused(_)) => io::ErrorKind::ConnectionRefused,
            Error::Transport(ConnectError::HandshakeTimeout { .. }) => io::ErrorKind::TimedOut,
            Error::Detached { .. } => io::ErrorKind::BrokenPipe,
            Error::AttachFailed(f) if f.kind == "not_found" => io::ErrorKind::NotFound,
            Error::InvalidArgument(_) => io::ErrorKind::InvalidInput,
            Error::ReadyTimeout(_) => io::ErrorKind::TimedOut,
            Error::Fs(f) => fs_io_kind(f),
            Error::Net(n) => net_io_kind(n),
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// The io::ErrorKind of an FS_ERROR: the errno's where there is one (so
/// newer kinds such as `IsADirectory` come out as std gives them), else
/// the wire kind's.
fn fs_io_kind(f: &FsError) -> io::ErrorKind {
    if let Some(errno) = f.errno.filter(|&e| e > 0) {
        return io::Error::from_raw_os_error(errno).kind();
    }
    match f.error_kind() {
        Some(FsErrorKind::NotFound) => io::ErrorKind::NotFound,
        Some(FsErrorKind::PermissionDenied) => io::ErrorKind::PermissionDenied,
        Some(FsErrorKind::Exists) | Some(FsErrorKind::DuplicateId) => io::ErrorKind::AlreadyExists,
        Some(FsErrorKind::InvalidRequest) | Some(FsErrorKind::BadUser) => {
            io::ErrorKind::InvalidInput
        }
        Some(FsErrorKind::Cancelled) => io::ErrorKind::Interrupted,
        Some(FsErrorKind::Resource) => io::ErrorKind::OutOfMemory,
        Some(k) => io::Error::from_raw_os_error(fs_kind_errno(k)).kind(),
        None => io::ErrorKind::Other,
    }
}

fn fs_kind_errno(k: FsErrorKind) -> i32 {
    match k {
        FsErrorKind::NotADirectory => libc::ENOTDIR,
        FsErrorKind::IsADirectory => libc::EISDIR,
        FsErrorKind::NotEmpty => libc::ENOTEMPTY,
        FsErrorKind::NoSpace => libc::ENOSPC,
        FsErrorKind::ReadOnly => libc::EROFS,
        _ => libc::EIO,
    }
}

/// The io::ErrorKind of a NET_FAILED or NET_CLOSED error.
fn net_io_kind(n: &NetFailed) -> io::ErrorKind {
    match n.error_kind() {
        Some(NetErrorKind::Refused) => io::ErrorKind::ConnectionRefused,
        Some(NetErrorKind::TimedOut) => io::ErrorKind::TimedOut,
        Some(NetErrorKind::Reset) => io::ErrorKind::ConnectionReset,
        Some(NetErrorKind::NotFound) => io::ErrorKind::NotFound,
        Some(NetErrorKind::PermissionDenied) => io::ErrorKind::PermissionDenied,
        Some(NetErrorKind::InvalidRequest) | Some(NetErrorKind::BadUser) => {
            io::ErrorKind::InvalidInput
        }
        Some(NetErrorKind::DuplicateId) => io::ErrorKind::AlreadyExists,
        _ => match n.errno.filter(|&e| e > 0) {
            Some(errno) => io::Error::from_raw_os_error(errno).kind(),
            None => io::ErrorKind::Other,
        },
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
