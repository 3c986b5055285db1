//! The `net` extension (kinds 0x50–0x5F): connections from the host to
//! guest sockets (TCP and Unix), bytes both ways with a window each way,
//! half-close each way. See docs/PROTOCOL.md, "Extension net".

use serde::{Deserialize, Serialize};

use super::{append_bytes, append_map, check_empty, decode_map, EncodeError, Kind, ProtocolError};

use super::strict;
use super::{cap_message, Ack};

string_enum! {
    /// Why a connection failed (NET_FAILED) or ended (NET_CLOSED's `error`).
    NetErrorKind {
        Refused = "refused",
        Unreachable = "unreachable",
        TimedOut = "timed_out",
        NotFound = "not_found",
        PermissionDenied = "permission_denied",
        Resource = "resource",
        InvalidRequest = "invalid_request",
        BadUser = "bad_user",
        DuplicateId = "duplicate_id",
        Reset = "reset",
        Other = "other",
    }
}

impl NetErrorKind {
    /// The kind an errno of connect(2), read(2) or write(2) maps to.
    pub fn from_errno(errno: i32) -> NetErrorKind {
        match errno {
            libc::ECONNREFUSED => NetErrorKind::Refused,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL | libc::ENETDOWN => {
                NetErrorKind::Unreachable
            }
            libc::ETIMEDOUT => NetErrorKind::TimedOut,
            libc::ENOENT | libc::ENOTDIR => NetErrorKind::NotFound,
            libc::EACCES | libc::EPERM => NetErrorKind::PermissionDenied,
            libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN => {
                NetErrorKind::Resource
            }
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => NetErrorKind::Reset,
            libc::EINVAL | libc::EAFNOSUPPORT | libc::ENAMETOOLONG => NetErrorKind::InvalidRequest,
            _ => NetErrorKind::Other,
        }
    }
}

/// NET_CONNECT: open a connection to a guest address: TCP (`host` and
/// `port`) or a Unix socket (`path`), exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConnect {
    /// An IPv4 or IPv6 literal, `localhost`, or a name the guest resolves.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub host: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub port: Option<u16>,
    /// A Unix socket path.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub path: Option<String>,
    /// Connect with this user's credentials (as EXEC's `user`), so the
    /// socket's file permissions apply.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub user: Option<String>,
    /// Give up after this long (default 10000 ms).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub timeout_ms: Option<u32>,
    /// Agent → host window (default 1 MiB).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub window: Option<u32>,
}

impl NetConnect {
    /// TCP to `host`:`port`.
    pub fn tcp(host: impl Into<String>, port: u16) -> NetConnect {
        NetConnect {
            host: Some(host.into()),
            port: Some(port),
            ..NetConnect::default()
        }
    }

    /// The Unix socket at `path`.
    pub fn unix(path: impl Into<String>) -> NetConnect {
        NetConnect {
            path: Some(path.into()),
            ..NetConnect::default()
        }
    }
}

/// NET_CONNECTED: the connection is up; bytes may flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConnected {
    /// The guest address connected to (`ADDR:PORT`, `[ADDR]:PORT`, or the
    /// socket path).
    #[serde(deserialize_with = "strict::string")]
    pub peer: String,
    /// The guest-side local address (empty for a Unix socket).
    #[serde(deserialize_with = "strict::string")]
    pub local: String,
}

/// NET_FAILED: the connection could not be made; the id is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetFailed {
    /// One of [`NetErrorKind`]'s names.
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    #[serde(deserialize_with = "strict::string")]
    pub message: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub errno: Option<i32>,
}

impl NetFailed {
    pub fn new(kind: NetErrorKind, message: impl Into<String>, errno: Option<i32>) -> NetFailed {
        NetFailed {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
            errno,
        }
    }

    pub fn error_kind(&self) -> Option<NetErrorKind> {
        NetErrorKind::parse(&self.kind)
    }
}

/// NET_CLOSE: the host ends the connection now (what is queued for the
/// guest is dropped); `reset` sends a TCP RST instead of a FIN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetClose {
    #[serde(default)]
    pub reset: bool,
}

/// NET_CLOSED: the last frame of a connection; the id is free. Without
/// `error` the connection ended cleanly (both sides' end of file, or the
/// host's NET_CLOSE).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetClosed {
    /// One of [`NetErrorKind`]'s names (`reset` above all).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub error: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub message: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub errno: Option<i32>,
}

/// A decoded frame of the net extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMsg<'a> {
    Connect(Box<NetConnect>),
    Connected(NetConnected),
    Failed(NetFailed),
    Send(&'a [u8]),
    SendAck(Ack),
    Recv(&'a [u8]),
    RecvAck(Ack),
    Shutdown,
    Eof,
    Close(NetClose),
    Closed(NetClosed),
}

impl<'a> NetMsg<'a> {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            NetMsg::Connect(_) => Kind::NetConnect,
            NetMsg::Connected(_) => Kind::NetConnected,
            NetMsg::Failed(_) => Kind::NetFailed,
            NetMsg::Send(_) => Kind::NetSend,
            NetMsg::SendAck(_) => Kind::NetSendAck,
            NetMsg::Recv(_) => Kind::NetRecv,
            NetMsg::RecvAck(_) => Kind::NetRecvAck,
            NetMsg::Shutdown => Kind::NetShutdown,
            NetMsg::Eof => Kind::NetEof,
            NetMsg::Close(_) => Kind::NetClose,
            NetMsg::Closed(_) => Kind::NetClosed,
        }
    }

    /// Decodes a payload of `kind` (one of this extension's kinds).
    pub(crate) fn decode(kind: Kind, p: &'a [u8]) -> Result<Self, ProtocolError> {
        Ok(match kind {
            Kind::NetConnect => NetMsg::Connect(Box::new(decode_map(kind, p)?)),
            Kind::NetConnected => NetMsg::Connected(decode_map(kind, p)?),
            Kind::NetFailed => NetMsg::Failed(decode_map(kind, p)?),
            Kind::NetSend => NetMsg::Send(p),
            Kind::NetSendAck => NetMsg::SendAck(decode_map(kind, p)?),
            Kind::NetRecv => NetMsg::Recv(p),
            Kind::NetRecvAck => NetMsg::RecvAck(decode_map(kind, p)?),
            Kind::NetShutdown => {
                check_empty(kind, p)?;
                NetMsg::Shutdown
            }
            Kind::NetEof => {
                check_empty(kind, p)?;
                NetMsg::Eof
            }
            Kind::NetClose => NetMsg::Close(decode_map(kind, p)?),
            Kind::NetClosed => NetMsg::Closed(decode_map(kind, p)?),
            _ => return Err(ProtocolError::UnknownKind(kind as u8)),
        })
    }

    /// Appends this message as a frame with id `id`.
    pub(crate) fn encode(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let kind = self.kind() as u8;
        match self {
            NetMsg::Connect(m) => append_map(out, kind, id, m.as_ref()),
            NetMsg::Connected(m) => append_map(out, kind, id, m),
            NetMsg::Failed(m) => append_map(out, kind, id, m),
            NetMsg::Send(p) => append_bytes(out, self.kind(), id, p),
            NetMsg::SendAck(m) => append_map(out, kind, id, m),
            NetMsg::Recv(p) => append_bytes(out, self.kind(), id, p),
            NetMsg::RecvAck(m) => append_map(out, kind, id, m),
            NetMsg::Shutdown => append_bytes(out, self.kind(), id, &[]),
            NetMsg::Eof => append_bytes(out, self.kind(), id, &[]),
            NetMsg::Close(m) => append_map(out, kind, id, m),
            NetMsg::Closed(m) => append_map(out, kind, id, m),
        }
    }
}
