//! Typed messages of protocol v1, one per frame kind.
//!
//! Map payloads are MessagePack maps with string keys, (de)serialised with
//! serde + rmp-serde: absent optional keys take their defaults, unknown keys
//! are ignored. Before serde sees a map payload, [`check_map`] verifies that
//! it is exactly one well-formed map whose keys are all strings (rmp-serde
//! alone would also accept an array, or integer keys as field indices, or
//! trailing bytes, none of which the contract allows), and that no key
//! appears twice. Values are read strictly as the contract's types: a `str`
//! field takes a MessagePack `str` only (not `bin`, not `nil`), an optional
//! key is present with a value of its type or absent (never `nil`), and an
//! `rlimits` entry is a map with string keys (not an array).
//!
//! Raw payloads (PING, PONG, STDIN, STDOUT, STDERR) borrow from the frame.
//!
//! Decoding failures are [`ProtocolError`], whose variants map one-to-one
//! onto the contract's framing ERROR kinds.

use serde::Serialize;

use crate::codec::{self, AppendError, Frame, FrameError, TooLarge, MAX_PING_PAYLOAD};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Which way a kind of frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HostToAgent,
    AgentToHost,
}

/// How a kind's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The payload bytes themselves.
    Raw,
    /// One MessagePack map with string keys (empty payload = empty map).
    Map,
    /// No payload. Received with one, it must be an empty payload or a map
    /// (whose keys are ignored); see docs/PROTOCOL.md.
    Empty,
}

macro_rules! kinds {
    ($($name:ident = $value:literal, $wire:literal, $dir:ident, $enc:ident;)*) => {
        /// Every frame kind of protocol v1.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Kind {
            $($name = $value,)*
        }

        impl Kind {
            /// Every kind, in wire order.
            pub const ALL: &'static [Kind] = &[$(Kind::$name,)*];

            /// The kind with this wire value, if protocol v1 has one.
            pub fn from_u8(value: u8) -> Option<Kind> {
                match value {
                    $($value => Some(Kind::$name),)*
                    _ => None,
                }
            }

            /// The contract's name for the kind (`"EXEC"`, `"STDOUT"`...).
            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$name => $wire,)*
                }
            }

            pub fn direction(self) -> Direction {
                match self {
                    $(Kind::$name => Direction::$dir,)*
                }
            }

            pub fn encoding(self) -> Encoding {
                match self {
                    $(Kind::$name => Encoding::$enc,)*
                }
            }
        }
    };
}

kinds! {
    Ready = 0x01, "READY", AgentToHost, Map;
    Ping = 0x02, "PING", HostToAgent, Raw;
    Pong = 0x03, "PONG", AgentToHost, Raw;
    Shutdown = 0x04, "SHUTDOWN", HostToAgent, Map;
    ShutdownDone = 0x05, "SHUTDOWN_DONE", AgentToHost, Empty;
    Error = 0x06, "ERROR", AgentToHost, Map;
    Exec = 0x10, "EXEC", HostToAgent, Map;
    Started = 0x11, "STARTED", AgentToHost, Map;
    ExecFailed = 0x12, "EXEC_FAILED", AgentToHost, Map;
    Stdin = 0x20, "STDIN", HostToAgent, Raw;
    StdinClose = 0x21, "STDIN_CLOSE", HostToAgent, Empty;
    StdinAck = 0x22, "STDIN_ACK", AgentToHost, Map;
    Resize = 0x23, "RESIZE", HostToAgent, Map;
    Signal = 0x24, "SIGNAL", HostToAgent, Map;
    OutputAck = 0x25, "OUTPUT_ACK", HostToAgent, Map;
    Stdout = 0x30, "STDOUT", AgentToHost, Raw;
    Stderr = 0x31, "STDERR", AgentToHost, Raw;
    Exited = 0x32, "EXITED", AgentToHost, Map;
    FsRequest = 0x40, "FS_REQUEST", HostToAgent, Map;
    FsOpened = 0x41, "FS_OPENED", AgentToHost, Map;
    FsData = 0x42, "FS_DATA", AgentToHost, Raw;
    FsDataAck = 0x43, "FS_DATA_ACK", HostToAgent, Map;
    FsWrite = 0x44, "FS_WRITE", HostToAgent, Raw;
    FsWriteAck = 0x45, "FS_WRITE_ACK", AgentToHost, Map;
    FsEnd = 0x46, "FS_END", HostToAgent, Empty;
    FsEntries = 0x47, "FS_ENTRIES", AgentToHost, Map;
    FsEvents = 0x48, "FS_EVENTS", AgentToHost, Map;
    FsDone = 0x49, "FS_DONE", AgentToHost, Map;
    FsError = 0x4a, "FS_ERROR", AgentToHost, Map;
    FsCancel = 0x4b, "FS_CANCEL", HostToAgent, Empty;
    NetConnect = 0x50, "NET_CONNECT", HostToAgent, Map;
    NetConnected = 0x51, "NET_CONNECTED", AgentToHost, Map;
    NetFailed = 0x52, "NET_FAILED", AgentToHost, Map;
    NetSend = 0x53, "NET_SEND", HostToAgent, Raw;
    NetSendAck = 0x54, "NET_SEND_ACK", AgentToHost, Map;
    NetRecv = 0x55, "NET_RECV", AgentToHost, Raw;
    NetRecvAck = 0x56, "NET_RECV_ACK", HostToAgent, Map;
    NetShutdown = 0x57, "NET_SHUTDOWN", HostToAgent, Empty;
    NetEof = 0x58, "NET_EOF", AgentToHost, Empty;
    NetClose = 0x59, "NET_CLOSE", HostToAgent, Map;
    NetClosed = 0x5a, "NET_CLOSED", AgentToHost, Map;
    List = 0x60, "LIST", HostToAgent, Map;
    Sessions = 0x61, "SESSIONS", AgentToHost, Map;
    Attach = 0x62, "ATTACH", HostToAgent, Map;
    Attached = 0x63, "ATTACHED", AgentToHost, Map;
    AttachFailed = 0x64, "ATTACH_FAILED", AgentToHost, Map;
    Detach = 0x65, "DETACH", HostToAgent, Empty;
    Detached = 0x66, "DETACHED", AgentToHost, Map;
    ClockGet = 0x70, "CLOCK_GET", HostToAgent, Empty;
    Clock = 0x71, "CLOCK", AgentToHost, Map;
    ClockSet = 0x72, "CLOCK_SET", HostToAgent, Map;
    ClockSetDone = 0x73, "CLOCK_SET_DONE", AgentToHost, Map;
    Entropy = 0x74, "ENTROPY", HostToAgent, Raw;
    EntropyDone = 0x75, "ENTROPY_DONE", AgentToHost, Map;
}

/// The extensions of version 1 (docs/PROTOCOL.md, "Extensions"), by the
/// name READY's `features` lists them under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    Fs,
    Net,
    Sessions,
    Clock,
}

impl Feature {
    pub const ALL: [Feature; 4] = [Feature::Fs, Feature::Net, Feature::Sessions, Feature::Clock];

    /// The name in READY's `features`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Fs => "fs",
            Feature::Net => "net",
            Feature::Sessions => "sessions",
            Feature::Clock => "clock",
        }
    }
}

impl Kind {
    /// The extension a kind belongs to (`None` for the contract's own).
    pub fn feature(self) -> Option<Feature> {
        match self as u8 {
            0x40..=0x4f => Some(Feature::Fs),
            0x50..=0x5f => Some(Feature::Net),
            0x60..=0x6f => Some(Feature::Sessions),
            0x70..=0x7f => Some(Feature::Clock),
            _ => None,
        }
    }
}

/// A frame that could be cut from the stream but not understood. Each
/// variant is one ERROR kind of the contract; [`ProtocolError::kind`] gives
/// the wire string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    #[error("frame too large: {0}")]
    FrameTooLarge(String),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{} is sent by the {}, not received by it", .0.name(), match .0.direction() { Direction::AgentToHost => "agent", Direction::HostToAgent => "host" })]
    WrongDirection(Kind),
    #[error("bad {} payload: {reason}", kind.name())]
    BadPayload { kind: Kind, reason: String },
}

impl ProtocolError {
    /// The contract's ERROR `kind` string for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::MalformedFrame(_) => ErrorKind::MalformedFrame,
            ProtocolError::FrameTooLarge(_) => ErrorKind::FrameTooLarge,
            ProtocolError::UnknownKind(_) => ErrorKind::UnknownKind,
            ProtocolError::WrongDirection(_) => ErrorKind::WrongDirection,
            ProtocolError::BadPayload { .. } => ErrorKind::BadPayload,
        }
    }

    pub(crate) fn bad(kind: Kind, reason: impl Into<String>) -> Self {
        ProtocolError::BadPayload {
            kind,
            reason: reason.into(),
        }
    }
}

impl From<FrameError> for ProtocolError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => ProtocolError::FrameTooLarge(e.to_string()),
            FrameError::Malformed { .. } => ProtocolError::MalformedFrame(e.to_string()),
        }
    }
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $wire:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The wire string.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)*
                }
            }

            /// Parses a wire string; `None` for a string this version does not know.
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($wire => Some($name::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

mod clock;
mod core;
mod fs;
mod map;
mod net;
mod sessions;
mod strict;

pub use self::core::*;
pub use clock::*;
pub use fs::*;
pub use map::{check_map, MAX_DEPTH};
pub use net::*;
pub use sessions::*;

string_enum! {
    /// The `kind` of an ERROR frame.
    ErrorKind {
        MalformedFrame = "malformed_frame",
        FrameTooLarge = "frame_too_large",
        UnknownKind = "unknown_kind",
        WrongDirection = "wrong_direction",
        BadPayload = "bad_payload",
        UnknownSession = "unknown_session",
        NotATty = "not_a_tty",
        InvalidSignal = "invalid_signal",
        WindowExceeded = "window_exceeded",
        StdinClosed = "stdin_closed",
        Unsupported = "unsupported",
        NotPermitted = "not_permitted",
        DuplicateId = "duplicate_id",
    }
}

string_enum! {
    /// The `kind` of an EXEC_FAILED frame.
    ExecFailedKind {
        NotFound = "not_found",
        PermissionDenied = "permission_denied",
        BadCwd = "bad_cwd",
        BadUser = "bad_user",
        InvalidRequest = "invalid_request",
        DuplicateId = "duplicate_id",
        Resource = "resource",
        Other = "other",
    }
}

string_enum! {
    /// The resource names an EXEC `rlimits` entry may carry.
    RlimitResource {
        Cpu = "cpu",
        Fsize = "fsize",
        Data = "data",
        Stack = "stack",
        Core = "core",
        Rss = "rss",
        Nproc = "nproc",
        Nofile = "nofile",
        Memlock = "memlock",
        As = "as",
        Locks = "locks",
        Sigpending = "sigpending",
        Msgqueue = "msgqueue",
        Nice = "nice",
        Rtprio = "rtprio",
        Rttime = "rttime",
    }
}

impl RlimitResource {
    /// The Linux `RLIMIT_*` number.
    pub fn linux_resource(self) -> u32 {
        use RlimitResource::*;
        // Values of <asm-generic/resource.h>, the same on every Linux
        // architecture this agent targets (x86_64, aarch64).
        match self {
            Cpu => 0,
            Fsize => 1,
            Data => 2,
            Stack => 3,
            Core => 4,
            Rss => 5,
            Nproc => 6,
            Nofile => 7,
            Memlock => 8,
            As => 9,
            Locks => 10,
            Sigpending => 11,
            Msgqueue => 12,
            Nice => 13,
            Rtprio => 14,
            Rttime => 15,
        }
    }
}

/// A decoded frame: the typed form of every kind of protocol v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Ready(Ready),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Shutdown(Shutdown),
    ShutdownDone,
    Error(ErrorMsg),
    Exec(Box<Exec>),
    Started(Started),
    ExecFailed(ExecFailed),
    Stdin(&'a [u8]),
    StdinClose,
    StdinAck(Ack),
    Resize(Resize),
    Signal(Signal),
    OutputAck(Ack),
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
    Exited(Exited),
    Fs(FsMsg<'a>),
    Net(NetMsg<'a>),
    Sessions(SessionsMsg),
    Clock(ClockMsg<'a>),
}

impl<'a> Message<'a> {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Ready(_) => Kind::Ready,
            Message::Ping(_) => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
            Message::Shutdown(_) => Kind::Shutdown,
            Message::ShutdownDone => Kind::ShutdownDone,
            Message::Error(_) => Kind::Error,
            Message::Exec(_) => Kind::Exec,
            Message::Started(_) => Kind::Started,
            Message::ExecFailed(_) => Kind::ExecFailed,
            Message::Stdin(_) => Kind::Stdin,
            Message::StdinClose => Kind::StdinClose,
            Message::StdinAck(_) => Kind::StdinAck,
            Message::Resize(_) => Kind::Resize,
            Message::Signal(_) => Kind::Signal,
            Message::OutputAck(_) => Kind::OutputAck,
            Message::Stdout(_) => Kind::Stdout,
            Message::Stderr(_) => Kind::Stderr,
            Message::Exited(_) => Kind::Exited,
            Message::Fs(m) => m.kind(),
            Message::Net(m) => m.kind(),
            Message::Sessions(m) => m.kind(),
            Message::Clock(m) => m.kind(),
        }
    }

    /// Decodes a frame of either direction.
    pub fn decode(frame: Frame<'a>) -> Result<Message<'a>, ProtocolError> {
        let kind = Kind::from_u8(frame.kind).ok_or(ProtocolError::UnknownKind(frame.kind))?;
        let p = frame.payload;
        Ok(match kind {
            Kind::Ready => Message::Ready(decode_map(kind, p)?),
            Kind::Ping => {
                if p.len() > MAX_PING_PAYLOAD {
                    return Err(ProtocolError::bad(
                        kind,
                        format!(
                            "{} bytes is over the {MAX_PING_PAYLOAD} byte PING limit",
                            p.len()
                        ),
                    ));
                }
                Message::Ping(p)
            }
            Kind::Pong => Message::Pong(p),
            Kind::Shutdown => Message::Shutdown(decode_map(kind, p)?),
            Kind::ShutdownDone => {
                check_empty(kind, p)?;
                Message::ShutdownDone
            }
            Kind::Error => Message::Error(decode_map(kind, p)?),
            Kind::Exec => Message::Exec(Box::new(decode_map(kind, p)?)),
            Kind::Started => Message::Started(decode_map(kind, p)?),
            Kind::ExecFailed => Message::ExecFailed(decode_map(kind, p)?),
            Kind::Stdin => Message::Stdin(p),
            Kind::StdinClose => {
                check_empty(kind, p)?;
                Message::StdinClose
            }
            Kind::StdinAck => Message::StdinAck(decode_map(kind, p)?),
            Kind::Resize => Message::Resize(decode_map(kind, p)?),
            Kind::Signal => Message::Signal(decode_map(kind, p)?),
            Kind::OutputAck => Message::OutputAck(decode_map(kind, p)?),
            Kind::Stdout => Message::Stdout(p),
            Kind::Stderr => Message::Stderr(p),
            Kind::Exited => Message::Exited(decode_map(kind, p)?),
            _ => match kind.feature() {
                Some(Feature::Fs) => Message::Fs(FsMsg::decode(kind, p)?),
                Some(Feature::Net) => Message::Net(NetMsg::decode(kind, p)?),
                Some(Feature::Sessions) => Message::Sessions(SessionsMsg::decode(kind, p)?),
                Some(Feature::Clock) => Message::Clock(ClockMsg::decode(kind, p)?),
                None => return Err(ProtocolError::UnknownKind(frame.kind)),
            },
        })
    }

    /// Decodes a frame the agent received: agent → host kinds are
    /// [`ProtocolError::WrongDirection`].
    pub fn decode_from_host(frame: Frame<'a>) -> Result<Message<'a>, ProtocolError> {
        Self::decode_directed(frame, Direction::HostToAgent)
    }

    /// Decodes a frame the host received: host → agent kinds are
    /// [`ProtocolError::WrongDirection`].
    pub fn decode_from_agent(frame: Frame<'a>) -> Result<Message<'a>, ProtocolError> {
        Self::decode_directed(frame, Direction::AgentToHost)
    }

    fn decode_directed(frame: Frame<'a>, dir: Direction) -> Result<Message<'a>, ProtocolError> {
        let kind = Kind::from_u8(frame.kind).ok_or(ProtocolError::UnknownKind(frame.kind))?;
        if kind.direction() != dir {
            return Err(ProtocolError::WrongDirection(kind));
        }
        Self::decode(frame)
    }

    /// Appends this message as a frame with session `id` to `out`, or
    /// nothing when it would be over the frame limit (a raw payload over
    /// [`codec::MAX_PAYLOAD`], or a map that serialises to more).
    pub fn encode(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let kind = self.kind() as u8;
        match self {
            Message::Ready(m) => append_map(out, kind, id, m),
            Message::Ping(p)
            | Message::Pong(p)
            | Message::Stdin(p)
            | Message::Stdout(p)
            | Message::Stderr(p) => Ok(codec::append_raw(out, kind, id, p)?),
            Message::Shutdown(m) => append_map(out, kind, id, m),
            Message::ShutdownDone | Message::StdinClose => {
                Ok(codec::append_raw(out, kind, id, &[])?)
            }
            Message::Error(m) => append_map(out, kind, id, m),
            Message::Exec(m) => append_map(out, kind, id, m.as_ref()),
            Message::Started(m) => append_map(out, kind, id, m),
            Message::ExecFailed(m) => append_map(out, kind, id, m),
            Message::StdinAck(m) | Message::OutputAck(m) => append_map(out, kind, id, m),
            Message::Resize(m) => append_map(out, kind, id, m),
            Message::Signal(m) => append_map(out, kind, id, m),
            Message::Exited(m) => append_map(out, kind, id, m),
            Message::Fs(m) => m.encode(id, out),
            Message::Net(m) => m.encode(id, out),
            Message::Sessions(m) => m.encode(id, out),
            Message::Clock(m) => m.encode(id, out),
        }
    }

    /// This message as a frame with session `id`, in a new buffer.
    ///
    /// # Panics
    /// When the message does not fit in a frame (see [`Message::encode`]):
    /// this is for tests and for messages known to fit; the agent and the
    /// client encode with [`Message::encode`] and handle the refusal.
    pub fn to_bytes(&self, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = self.encode(id, &mut out) {
            panic!("{} does not fit in a frame: {e}", self.kind().name());
        }
        out
    }
}

/// Why a message was not encoded. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The frame would be over the frame limit.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// MessagePack serialisation failed (cannot happen for this module's
    /// types, which hold only strings, integers, booleans and vectors).
    #[error("serialising the payload: {0}")]
    Serialize(String),
}

impl From<AppendError<rmp_serde::encode::Error>> for EncodeError {
    fn from(e: AppendError<rmp_serde::encode::Error>) -> Self {
        match e {
            AppendError::Payload(e) => EncodeError::Serialize(e.to_string()),
            AppendError::TooLarge(t) => EncodeError::TooLarge(t),
        }
    }
}

/// The most bytes of `message` an ERROR or EXEC_FAILED carries: it is for
/// people, and it must never make the frame that carries it too large, so
/// whatever a request quotes (a path, a user name, a command line) is cut.
pub const MAX_MESSAGE: usize = 1024;

/// How much of a string from a request a message quotes.
pub const MAX_QUOTE: usize = 200;

/// `message` cut to at most [`MAX_MESSAGE`] bytes, at a character
/// boundary, with an ellipsis when anything was cut.
pub fn cap_message(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut cut = MAX_MESSAGE - '…'.len_utf8();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut s = message;
    s.truncate(cut);
    s.push('…');
    s
}

/// A string from a request, for a message, as it is: at most
/// [`MAX_QUOTE`] bytes of it (cut at a character boundary, with an
/// ellipsis and the whole length when cut), so a message never quotes a
/// whole megabyte back.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_QUOTE {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut cut = MAX_QUOTE;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &s[..cut], s.len()))
}

/// Like [`clip`], `Debug`-quoted as `{:?}` would (the cut part quoted, the
/// ellipsis after it).
pub fn quote(s: &str) -> String {
    if s.len() <= MAX_QUOTE {
        return format!("{s:?}");
    }
    let mut cut = MAX_QUOTE;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..cut], s.len())
}

/// Appends a frame with a map payload serialised from `msg` (string keys),
/// or nothing when it would be over the frame limit.
///
/// Serialising the structs of this module cannot fail otherwise: they hold
/// only strings, integers, booleans and vectors of those, all of which
/// MessagePack encodes, and writing to a `Vec` cannot fail.
pub fn append_map<T: Serialize>(
    out: &mut Vec<u8>,
    kind: u8,
    id: u32,
    msg: &T,
) -> Result<(), EncodeError> {
    Ok(codec::append_with(out, kind, id, |buf| {
        rmp_serde::encode::write_named(buf, msg)
    })?)
}

/// Appends a frame with a raw payload, or nothing when it is over the limit.
pub(crate) fn append_bytes(
    out: &mut Vec<u8>,
    kind: Kind,
    id: u32,
    payload: &[u8],
) -> Result<(), EncodeError> {
    Ok(codec::append_raw(out, kind as u8, id, payload)?)
}

/// Decodes a map payload into `T`, after [`check_map`].
pub fn decode_map<T: serde::de::DeserializeOwned>(
    kind: Kind,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    // An empty payload means an empty map.
    let payload: &[u8] = if payload.is_empty() { &[0x80] } else { payload };
    check_map(payload).map_err(|reason| ProtocolError::bad(kind, reason))?;
    rmp_serde::from_slice(payload).map_err(|e| ProtocolError::bad(kind, e.to_string()))
}

/// A kind without payload accepts an empty payload or a map (ignored).
pub(crate) fn check_empty(kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.is_empty() {
        return Ok(());
    }
    check_map(payload).map_err(|reason| ProtocolError::bad(kind, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, payload: &[u8]) -> Frame<'_> {
        Frame {
            kind: kind as u8,
            id: 1,
            payload,
        }
    }

    #[test]
    fn exec_defaults() {
        // {"cmd": "true"}
        let p = [0x81, 0xa3, b'c', b'm', b'd', 0xa4, b't', b'r', b'u', b'e'];
        let Message::Exec(e) = Message::decode(frame(Kind::Exec, &p)).unwrap() else {
            panic!()
        };
        assert_eq!(*e, Exec::new("true"));
    }

    #[test]
    fn array_is_not_a_map() {
        // ["true"] would satisfy rmp-serde's struct-as-tuple form.
        let p = [0x91, 0xa4, b't', b'r', b'u', b'e'];
        let err = Message::decode(frame(Kind::Exec, &p)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadPayload);
    }

    #[test]
    fn integer_keys_are_refused() {
        // {0: "true"}: serde would take 0 as the index of `cmd`.
        let p = [0x81, 0x00, 0xa4, b't', b'r', b'u', b'e'];
        assert!(Message::decode(frame(Kind::Exec, &p)).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        assert!(Message::decode(frame(Kind::Shutdown, &[0x80, 0x80])).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut p = vec![0x81, 0xa1, b'x'];
        p.extend(std::iter::repeat_n(0x91, 100_000));
        p.push(0x00);
        assert!(check_map(&p).is_err());
    }
}
