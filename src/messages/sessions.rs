//! The `sessions` extension (kinds 0x60–0x6F): sessions that outlive their
//! host: list, attach with replay, detach. Its EXEC, STARTED, SIGNAL and
//! EXITED keys are in the core payloads. See docs/PROTOCOL.md, "Extension
//! sessions".

use serde::{Deserialize, Serialize};

use super::{append_bytes, append_map, check_empty, decode_map, EncodeError, Kind, ProtocolError};

use super::strict;
use super::{cap_message, Exited};

/// LIST: the agent's sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct List {
    /// Also sessions that have ended and whose exit a host has seen
    /// (kept a while); by default only live ones and ended ones whose
    /// exit no host has seen.
    #[serde(default)]
    pub all: bool,
}

/// One session in SESSIONS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The agent-wide session number (never reused while the agent runs).
    pub session: u64,
    /// The host's tag from EXEC.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub tag: Option<String>,
    pub pid: u32,
    #[serde(deserialize_with = "strict::string")]
    pub cmd: String,
    #[serde(default, deserialize_with = "strict::strings")]
    pub args: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// `starting`, `running`, `lingering` or `exited`.
    #[serde(deserialize_with = "strict::string")]
    pub state: String,
    /// Whether a host connection has it (this one or another).
    #[serde(default)]
    pub attached: bool,
    /// Its id on the connection that asked, when it is attached there.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub id: Option<u32>,
    /// Wall-clock start time, milliseconds since the epoch.
    pub started_ms: u64,
    /// Bytes the process wrote to stdout and stderr so far (stream offsets).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// How it ended, once it has.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub exit: Option<Exited>,
}

/// SESSIONS: a page of the list; the last has `more: false` and frees the
/// id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    pub sessions: Vec<SessionInfo>,
    #[serde(default)]
    pub more: bool,
}

/// ATTACH: take over a session (by number or by tag) on this connection,
/// under the frame's id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub session: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub tag: Option<String>,
    /// Replay each stream from this byte offset (default: the oldest byte
    /// kept).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub stdout_from: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub stderr_from: Option<u64>,
    /// Replay at most the last this many bytes of each stream (with the
    /// offsets, the later start wins).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub tail: Option<u64>,
    /// As EXEC's: the output window for this host (default 0, unlimited).
    #[serde(default)]
    pub output_window: u32,
}

/// ATTACHED: the session is this connection's under the ATTACH's id;
/// replayed output, then live output, then EXITED follow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub session: u64,
    pub pid: u32,
    #[serde(default)]
    pub tty: bool,
    /// Where each stream's replay starts (its byte offset).
    pub stdout_from: u64,
    pub stderr_from: u64,
    /// Bytes asked for that are no longer kept (dropped from the ring).
    pub stdout_lost: u64,
    pub stderr_lost: u64,
    /// Whether stdin is still open (STDIN may be sent).
    #[serde(default)]
    pub stdin: bool,
}

string_enum! {
    /// The `kind` of an ATTACH_FAILED.
    AttachFailedKind {
        NotFound = "not_found",
        Ambiguous = "ambiguous",
        DuplicateId = "duplicate_id",
        InvalidRequest = "invalid_request",
    }
}

/// ATTACH_FAILED: nothing was attached; the id is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachFailed {
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    #[serde(deserialize_with = "strict::string")]
    pub message: String,
}

impl AttachFailed {
    pub fn new(kind: AttachFailedKind, message: impl Into<String>) -> AttachFailed {
        AttachFailed {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
        }
    }
}

/// DETACHED: the session is no longer this connection's (the last frame
/// for its id here); it goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub session: u64,
    /// `detach` (the host asked) or `attached_elsewhere`.
    #[serde(deserialize_with = "strict::string")]
    pub reason: String,
}

/// A decoded frame of the sessions extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionsMsg {
    List(List),
    Sessions(Sessions),
    Attach(Box<Attach>),
    Attached(Attached),
    AttachFailed(AttachFailed),
    Detach,
    Detached(Detached),
}

impl SessionsMsg {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            SessionsMsg::List(_) => Kind::List,
            SessionsMsg::Sessions(_) => Kind::Sessions,
            SessionsMsg::Attach(_) => Kind::Attach,
            SessionsMsg::Attached(_) => Kind::Attached,
            SessionsMsg::AttachFailed(_) => Kind::AttachFailed,
            SessionsMsg::Detach => Kind::Detach,
            SessionsMsg::Detached(_) => Kind::Detached,
        }
    }

    /// Decodes a payload of `kind` (one of this extension's kinds).
    pub(crate) fn decode(kind: Kind, p: &[u8]) -> Result<Self, ProtocolError> {
        Ok(match kind {
            Kind::List => SessionsMsg::List(decode_map(kind, p)?),
            Kind::Sessions => SessionsMsg::Sessions(decode_map(kind, p)?),
            Kind::Attach => SessionsMsg::Attach(Box::new(decode_map(kind, p)?)),
            Kind::Attached => SessionsMsg::Attached(decode_map(kind, p)?),
            Kind::AttachFailed => SessionsMsg::AttachFailed(decode_map(kind, p)?),
            Kind::Detach => {
                check_empty(kind, p)?;
                SessionsMsg::Detach
            }
            Kind::Detached => SessionsMsg::Detached(decode_map(kind, p)?),
            _ => return Err(ProtocolError::UnknownKind(kind as u8)),
        })
    }

    /// Appends this message as a frame with id `id`.
    pub(crate) fn encode(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let kind = self.kind() as u8;
        match self {
            SessionsMsg::List(m) => append_map(out, kind, id, m),
            SessionsMsg::Sessions(m) => append_map(out, kind, id, m),
            SessionsMsg::Attach(m) => append_map(out, kind, id, m.as_ref()),
            SessionsMsg::Attached(m) => append_map(out, kind, id, m),
            SessionsMsg::AttachFailed(m) => append_map(out, kind, id, m),
            SessionsMsg::Detach => append_bytes(out, self.kind(), id, &[]),
            SessionsMsg::Detached(m) => append_map(out, kind, id, m),
        }
    }
}
