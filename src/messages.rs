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

use serde::{Deserialize, Serialize};

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

    fn bad(kind: Kind, reason: impl Into<String>) -> Self {
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

/// Strict deserialisers for the contract's types. serde's own impls are
/// lenient in ways the contract is not: `String` also takes a `bin` (and
/// rmp-serde hands it an invalid UTF-8 `str` as bytes), and `Option<T>` also
/// takes `nil`.
mod strict {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, Visitor};

    /// A `String` that only a MessagePack `str` (valid UTF-8) deserialises to.
    pub(super) struct Str(pub(super) String);

    struct StrVisitor;

    impl Visitor<'_> for StrVisitor {
        type Value = Str;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
            Ok(Str(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Str, E> {
            Ok(Str(v))
        }
    }

    impl<'de> Deserialize<'de> for Str {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Str, D::Error> {
            d.deserialize_str(StrVisitor)
        }
    }

    /// A required `str` key.
    pub(super) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Str::deserialize(d).map(|s| s.0)
    }

    /// An optional `str` key: `nil` is not a string.
    pub(super) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        string(d).map(Some)
    }

    /// A `[str]` key.
    pub(super) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let v = Vec::<Str>::deserialize(d)?;
        Ok(v.into_iter().map(|s| s.0).collect())
    }

    /// An optional key of another type: present means a value of that
    /// type, never `nil` (absent keys never reach this function).
    pub(super) fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }
}

fn default_true() -> bool {
    true
}
fn default_rows() -> u16 {
    24
}
fn default_cols() -> u16 {
    80
}
fn default_linger_ms() -> u32 {
    100
}
fn default_grace_ms() -> u32 {
    1000
}

/// READY: the agent's greeting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    /// `agentd/<version>`.
    #[serde(deserialize_with = "strict::string")]
    pub agent: String,
    pub pid: u32,
    pub pid1: bool,
    pub max_payload: u32,
    pub stdin_window: u32,
    pub max_sessions: u32,
    /// Milliseconds since the machine booted (an extension: the host can
    /// read boot-to-READY time from it). Absent from older agents.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub uptime_ms: Option<u64>,
}

/// SHUTDOWN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u32,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace_ms: default_grace_ms(),
        }
    }
}

/// ERROR. `kind` stays a string so a host can read kinds a newer agent adds;
/// [`ErrorMsg::error_kind`] parses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    #[serde(deserialize_with = "strict::string")]
    pub message: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub frame_kind: Option<u8>,
}

impl ErrorMsg {
    /// An ERROR whose `message` is capped at [`MAX_MESSAGE`] bytes.
    pub fn new(kind: ErrorKind, message: impl Into<String>, frame_kind: Option<u8>) -> Self {
        ErrorMsg {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
            frame_kind,
        }
    }

    pub fn error_kind(&self) -> Option<ErrorKind> {
        ErrorKind::parse(&self.kind)
    }
}

/// One `rlimits` entry of EXEC: a map with string keys, every key
/// required (`u64::MAX` is `RLIM_INFINITY`). Deserialised by hand so that,
/// like a payload map, it must be a map (not an array) and its keys strings
/// (not field indices); `resource`, `soft` and `hard` at most once each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

impl<'de> Deserialize<'de> for Rlimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rlimit, D::Error> {
        d.deserialize_map(RlimitVisitor)
    }
}

struct RlimitVisitor;

impl<'de> serde::de::Visitor<'de> for RlimitVisitor {
    type Value = Rlimit;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an rlimits entry (a map of resource, soft, hard)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Rlimit, A::Error> {
        use serde::de::Error;
        let mut resource = None;
        let mut soft = None;
        let mut hard = None;
        while let Some(strict::Str(key)) = map.next_key()? {
            match key.as_str() {
                "resource" if resource.is_none() => {
                    resource = Some(map.next_value::<strict::Str>()?.0);
                }
                "soft" if soft.is_none() => soft = Some(map.next_value::<u64>()?),
                "hard" if hard.is_none() => hard = Some(map.next_value::<u64>()?),
                "resource" | "soft" | "hard" => {
                    return Err(A::Error::custom(format!("duplicate key `{key}`")));
                }
                // Unknown keys are ignored, however often they appear
                // (remembering them would cost memory a hostile host chooses).
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Rlimit {
            resource: resource.ok_or_else(|| A::Error::missing_field("resource"))?,
            soft: soft.ok_or_else(|| A::Error::missing_field("soft"))?,
            hard: hard.ok_or_else(|| A::Error::missing_field("hard"))?,
        })
    }
}

/// EXEC: start a process as a new session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    #[serde(deserialize_with = "strict::string")]
    pub cmd: String,
    #[serde(default, deserialize_with = "strict::strings")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "strict::strings")]
    pub env: Vec<String>,
    #[serde(default)]
    pub clear_env: bool,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub cwd: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default = "default_rows")]
    pub rows: u16,
    #[serde(default = "default_cols")]
    pub cols: u16,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default = "default_true")]
    pub stdin: bool,
    #[serde(default)]
    pub output_window: u32,
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u32,
    /// Extension: set `PR_SET_NO_NEW_PRIVS` in the child before execve.
    #[serde(default)]
    pub no_new_privs: bool,
}

impl Exec {
    /// An EXEC of `cmd` with every other key at its default.
    pub fn new(cmd: impl Into<String>) -> Self {
        Exec {
            cmd: cmd.into(),
            args: Vec::new(),
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            user: None,
            tty: false,
            rows: default_rows(),
            cols: default_cols(),
            rlimits: Vec::new(),
            stdin: true,
            output_window: 0,
            linger_ms: default_linger_ms(),
            no_new_privs: false,
        }
    }
}

/// STARTED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
}

/// EXEC_FAILED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFailed {
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub stage: Option<String>,
}

impl ExecFailed {
    /// An EXEC_FAILED whose `message` is capped at [`MAX_MESSAGE`] bytes.
    pub fn new(
        kind: ExecFailedKind,
        message: impl Into<String>,
        errno: Option<i32>,
        stage: Option<&str>,
    ) -> Self {
        ExecFailed {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
            errno,
            stage: stage.map(str::to_owned),
        }
    }

    pub fn failed_kind(&self) -> Option<ExecFailedKind> {
        ExecFailedKind::parse(&self.kind)
    }
}

/// STDIN_ACK and OUTPUT_ACK: window returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub bytes: u32,
}

/// RESIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

/// SIGNAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: i32,
    #[serde(default = "default_true")]
    pub group: bool,
}

/// EXITED: how the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub code: Option<i32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub signal: Option<i32>,
    #[serde(default)]
    pub core_dumped: bool,
    pub status: i32,
    /// Extension: output bytes the agent read from the session and dropped
    /// instead of sending (a shutdown past its grace, while the output
    /// window was used up or the host did not read). Absent when none was.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub output_dropped: Option<u64>,
}

impl Exited {
    pub fn from_code(code: i32) -> Self {
        Exited {
            code: Some(code),
            signal: None,
            core_dumped: false,
            status: code,
            output_dropped: None,
        }
    }

    pub fn from_signal(signal: i32, core_dumped: bool) -> Self {
        Exited {
            code: None,
            signal: Some(signal),
            core_dumped,
            status: 128 + signal,
            output_dropped: None,
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
fn check_empty(kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.is_empty() {
        return Ok(());
    }
    check_map(payload).map_err(|reason| ProtocolError::bad(kind, reason))
}

/// Checks that `payload` is exactly one well-formed MessagePack map whose
/// keys are all strings (valid UTF-8), each key once, with nothing after it,
/// nested at most [`MAX_DEPTH`] deep.
pub fn check_map(payload: &[u8]) -> Result<(), String> {
    let mut scan = Scanner {
        buf: payload,
        pos: 0,
    };
    let entries = match scan.byte()? {
        b @ 0x80..=0x8f => u64::from(b & 0x0f),
        0xde => u64::from(scan.be16()?),
        0xdf => u64::from(scan.be32()?),
        b => {
            return Err(format!(
                "payload is not a MessagePack map (first byte {b:#04x})"
            ))
        }
    };
    // The keys seen, as (offset, length) in the payload, to refuse
    // duplicates: sorted once at the end, so a hostile map of many keys
    // costs n log n, not n squared, and 8 bytes per key actually present
    // (not per key announced).
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for _ in 0..entries {
        let len = match scan.byte() {
            Ok(b @ 0xa0..=0xbf) => usize::from(b & 0x1f),
            Ok(0xd9) => usize::from(scan.byte()?),
            Ok(0xda) => usize::from(scan.be16()?),
            Ok(0xdb) => scan.be32()? as usize,
            Ok(_) => return Err("a map key is not a string".to_owned()),
            Err(_) => return Err("payload ends inside the map".to_owned()),
        };
        let at = scan.pos;
        let key = scan.take(len)?;
        if std::str::from_utf8(key).is_err() {
            return Err("a map key is not valid UTF-8".to_owned());
        }
        let (Ok(at), Ok(len)) = (u32::try_from(at), u32::try_from(len)) else {
            return Err("payload too large".to_owned());
        };
        keys.push((at, len));
        scan.skip_value(1)?;
    }
    if scan.pos != payload.len() {
        return Err(format!("{} bytes after the map", payload.len() - scan.pos));
    }
    let key = |&(at, len): &(u32, u32)| &payload[at as usize..at as usize + len as usize];
    keys.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    if let Some(w) = keys.windows(2).find(|w| key(&w[0]) == key(&w[1])) {
        return Err(format!(
            "duplicate key `{}`",
            String::from_utf8_lossy(key(&w[0]))
        ));
    }
    Ok(())
}

/// A MessagePack walker that checks structure without building values.
struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The deepest a map payload may nest containers (maps and arrays), the
/// payload map itself counting as the first level. Deeper is refused, so
/// a hostile payload cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

impl<'a> Scanner<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| "payload ends inside a value".to_owned())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn be16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn be32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.take(n).map(|_| ())
    }
    /// Skips the `n` items of a container found inside `depth` containers.
    fn skip_items(&mut self, n: u64, depth: usize) -> Result<(), String> {
        if depth + 1 > MAX_DEPTH {
            return Err(format!("containers nested more than {MAX_DEPTH} deep"));
        }
        for _ in 0..n {
            self.skip_value(depth + 1)?;
        }
        Ok(())
    }

    /// Skips one value found inside `depth` containers (the payload map
    /// counts as one).
    fn skip_value(&mut self, depth: usize) -> Result<(), String> {
        let b = self.byte()?;
        match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Ok(()),
            0x80..=0x8f => self.skip_items(2 * u64::from(b & 0x0f), depth),
            0x90..=0x9f => self.skip_items(u64::from(b & 0x0f), depth),
            0xa0..=0xbf => self.skip(usize::from(b & 0x1f)),
            0xc1 => Err("reserved MessagePack byte 0xc1".to_owned()),
            0xc4 | 0xd9 => {
                let n = self.byte()?;
                self.skip(usize::from(n))
            }
            0xc5 | 0xda => {
                let n = self.be16()?;
                self.skip(usize::from(n))
            }
            0xc6 | 0xdb => {
                let n = self.be32()?;
                self.skip(n as usize)
            }
            0xc7 => {
                let n = self.byte()?;
                self.skip(1 + usize::from(n))
            }
            0xc8 => {
                let n = self.be16()?;
                self.skip(1 + usize::from(n))
            }
            0xc9 => {
                let n = self.be32()?;
                self.skip(1)?;
                self.skip(n as usize)
            }
            0xca => self.skip(4),
            0xcb => self.skip(8),
            0xcc | 0xd0 => self.skip(1),
            0xcd | 0xd1 => self.skip(2),
            0xce | 0xd2 => self.skip(4),
            0xcf | 0xd3 => self.skip(8),
            0xd4 => self.skip(2),
            0xd5 => self.skip(3),
            0xd6 => self.skip(5),
            0xd7 => self.skip(9),
            0xd8 => self.skip(17),
            0xdc => {
                let n = self.be16()?;
                self.skip_items(u64::from(n), depth)
            }
            0xdd => {
                let n = self.be32()?;
                self.skip_items(u64::from(n), depth)
            }
            0xde => {
                let n = self.be16()?;
                self.skip_items(2 * u64::from(n), depth)
            }
            0xdf => {
                let n = self.be32()?;
                self.skip_items(2 * u64::from(n), depth)
            }
        }
    }
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
