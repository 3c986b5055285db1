//! The contract checker: a host's view of docs/PROTOCOL.md, applied to
//! every frame the agent sends, by every host in [`super::host`].
//!
//! It is table-driven: [`RULES`] has one [`Rule`] per agent → host kind,
//! giving the kind's id, its payload (raw with a size limit, empty, or a
//! map with its required and optional keys and their types) and a
//! function for what the kind means to the session state. A kind that is
//! not in the table is a violation (a host → agent kind, or an unknown
//! one); an extension kind is checked once it has an entry, and an
//! extension key once it is listed with its type.
//!
//! Every frame, whatever its kind:
//! - is an agent → host kind of the table;
//! - comes after READY (the first frame of every connection) and before
//!   nothing but the end of the stream after SHUTDOWN_DONE;
//! - has the payload its kind gives: a raw payload within its limit, an
//!   empty one empty, a map that is one MessagePack map with string keys
//!   (read by [`super::msgpack`], independently of the crate) holding
//!   every required key and each key present with its type;
//! - decodes with the crate's own `Message::decode_from_agent` as well.
//!
//! And per kind: READY once per connection, with id 0, protocol 1,
//! max_payload 1 MiB (and the agent's pid where the host knows it);
//! STARTED and EXEC_FAILED only for an EXEC the host sent and that has no
//! answer yet, EXEC_FAILED for a running id only as `duplicate_id`;
//! STDOUT, STDERR (never empty, at most 64 KiB), STDIN_ACK and EXITED only
//! for a running session (after STARTED, before EXITED), STDIN_ACK never
//! acknowledging more than the host sent; EXITED with `code` or `signal`
//! (one of them), `core_dumped` (a bool, true only with a signal) and
//! `status` = code or 128 + signal; ERROR and EXEC_FAILED with a kind the
//! contract lists, an ERROR with id 0 or the id of a frame the host sent;
//! SHUTDOWN_DONE with id 0, only after a SHUTDOWN (or a shutdown signal,
//! [`Sent::note_shutdown`]) and only once every session has sent EXITED;
//! a file operation's frames only for an FS_REQUEST the host sent, FS_OPENED
//! only as its first frame, FS_DATA, FS_WRITE_ACK and FS_EVENTS only after
//! it, nothing after FS_DONE or FS_ERROR, and the payload of FS_DATA,
//! FS_ENTRIES and FS_EVENTS never more than the request's `window` beyond
//! the host's FS_DATA_ACKs.
//! A connection (net): NET_CONNECTED or NET_FAILED first (or NET_CLOSED
//! for a NET_CLOSE while connecting), then
//! NET_RECV, NET_SEND_ACK and at most one NET_EOF (no NET_RECV after it),
//! then one NET_CLOSED; NET_RECV never more unacknowledged than the
//! NET_CONNECT's `window` (counting every NET_RECV_ACK the host wrote),
//! NET_SEND_ACK never more than was sent; NET_FAILED `duplicate_id` on an
//! open connection's id ends nothing.
//! The stream ends only at a frame boundary.
//!
//! What the host sent comes from [`Sent`], which reads every byte the host
//! writes the way the agent's decoder cuts it into frames, so raw writes,
//! split frames and garbage are accounted for like typed messages.

use std::collections::{HashMap, HashSet, VecDeque};

use agentd::codec::{Frame, MAX_OUTPUT_PAYLOAD, MAX_PAYLOAD};
use agentd::messages::{ErrorKind, ExecFailedKind, Kind, Message};

use super::msgpack::{self, Value};

/// What the host sent, as the agent's decoder sees it: cut into frames by
/// their headers (a length below 5 skipped with its bytes, an oversized
/// frame's payload skipped), however the bytes were written.
#[derive(Default)]
pub struct Sent {
    /// EXECs sent per id and not yet answered (STARTED or EXEC_FAILED),
    /// oldest first: whether each asked to start detached (its STARTED is
    /// then the id's last frame).
    pending_exec: HashMap<u32, VecDeque<bool>>,
    /// The EXEC being written: its id, and its payload so far.
    exec_payload: Option<(u32, Vec<u8>)>,
    /// STDIN payload bytes sent per id, over the agent's lifetime.
    stdin_bytes: HashMap<u32, u64>,
    /// Every id of a frame header the host sent.
    ids: HashSet<u32>,
    /// Extension requests sent per id and not yet answered.
    pending: HashMap<u32, Vec<Stream>>,
    /// FS_WRITE and NET_SEND payload bytes sent per id.
    data_bytes: HashMap<u32, u64>,
    /// The NET_CONNECT or NET_RECV_ACK being written: its kind, id and
    /// payload so far.
    net_payload: Option<(u8, u32, Vec<u8>)>,
    /// The `window` of each NET_CONNECT sent per id and not yet answered.
    net_windows: HashMap<u32, VecDeque<u64>>,
    /// NET_RECV_ACK bytes sent per id, over the agent's lifetime.
    net_recv_acked: HashMap<u32, u64>,
    /// The FS_REQUEST or FS_DATA_ACK being written: kind, id, payload so far.
    fs_payload: Option<(u8, u32, Vec<u8>)>,
    /// The `window` of the latest FS_REQUEST per id (1 MiB when absent).
    fs_window: HashMap<u32, u64>,
    /// FS_DATA_ACK bytes sent per id, over the agent's lifetime.
    fs_data_acked: HashMap<u32, u64>,
    /// A SHUTDOWN went out (or a signal that shuts the agent down).
    shutdown: bool,
    /// Where the outgoing stream is: inside a header, or how many payload
    /// bytes of the current frame are still to come.
    header: Vec<u8>,
    skip: u64,
}

impl Sent {
    /// Accounts for bytes written to the agent, in the order written.
    pub fn note_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64);
                self.skip -= n;
                if let Some((_, payload)) = &mut self.exec_payload {
                    payload.extend_from_slice(&bytes[..n as usize]);
                }
                if let Some((_, _, payload)) = &mut self.net_payload {
                    payload.extend_from_slice(&bytes[..n as usize]);
                }
                if let Some((_, _, payload)) = &mut self.fs_payload {
                    payload.extend_from_slice(&bytes[..n as usize]);
                }
                bytes = &bytes[n as usize..];
                if self.skip == 0 {
                    self.end_of_exec();
                    self.end_of_net_payload();
                    self.end_of_fs();
                }
                continue;
            }
            // Collect the length field, then kind and id.
            let want = if self.header.len() < 4 { 4 } else { 9 };
            let n = (want - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 4 {
                let len = u32::from_be_bytes(self.header[..4].try_into().expect("4 bytes"));
                if len < 5 {
                    // No room for kind and id: the agent skips `len` bytes.
                    self.header.clear();
                    self.skip = u64::from(len);
                }
            } else if self.header.len() == 9 {
                let len = u32::from_be_bytes(self.header[..4].try_into().expect("4 bytes"));
                let kind = self.header[4];
                let id = u32::from_be_bytes(self.header[5..9].try_into().expect("4 bytes"));
                let payload = u64::from(len - 5);
                self.header.clear();
                self.skip = payload;
                self.ids.insert(id);
                let request = |s: &mut Sent, what| s.pending.entry(id).or_default().push(what);
                match Kind::from_u8(kind) {
                    Some(Kind::Exec) => {
                        self.exec_payload = Some((id, Vec::new()));
                        if payload == 0 {
                            self.end_of_exec();
                        }
                    }
                    Some(Kind::Stdin) => *self.stdin_bytes.entry(id).or_default() += payload,
                    Some(Kind::Shutdown) => self.shutdown = true,
                    Some(Kind::NetConnect) => {
                        request(self, Stream::Net);
                        self.net_payload = Some((kind, id, Vec::new()));
                        if payload == 0 {
                            self.end_of_net_payload();
                        }
                    }
                    Some(Kind::NetRecvAck) => {
                        self.net_payload = Some((kind, id, Vec::new()));
                        if payload == 0 {
                            self.end_of_net_payload();
                        }
                    }
                    Some(Kind::FsRequest) => {
                        request(self, Stream::Fs);
                        self.fs_payload = Some((kind, id, Vec::new()));
                        if payload == 0 {
                            self.end_of_fs();
                        }
                    }
                    Some(Kind::FsDataAck) => {
                        self.fs_payload = Some((kind, id, Vec::new()));
                        if payload == 0 {
                            self.end_of_fs();
                        }
                    }
                    Some(Kind::List) => request(self, Stream::List),
                    Some(Kind::Attach) => request(self, Stream::Attach),
                    Some(Kind::FsWrite | Kind::NetSend) => {
                        *self.data_bytes.entry(id).or_default() += payload
                    }
                    _ => {}
                }
            }
        }
    }

    /// An EXEC has been written whole: whether it starts detached.
    fn end_of_exec(&mut self) {
        let Some((id, payload)) = self.exec_payload.take() else {
            return;
        };
        let detach = super::msgpack::decode(&payload)
            .ok()
            .and_then(|m| m.get("detach").and_then(Value::as_bool))
            .unwrap_or(false);
        self.pending_exec.entry(id).or_default().push_back(detach);
    }

    /// A NET_CONNECT (its `window`, default 1 MiB) or a NET_RECV_ACK (its
    /// `bytes`) has been written whole.
    fn end_of_net_payload(&mut self) {
        let Some((kind, id, payload)) = self.net_payload.take() else {
            return;
        };
        let map = super::msgpack::decode(&payload).ok();
        let int = |key: &str| {
            map.as_ref()
                .and_then(|m| m.get(key).and_then(Value::as_int))
                .map(|i| i.max(0) as u64)
        };
        if kind == Kind::NetConnect as u8 {
            let window = int("window").unwrap_or(1 << 20);
            self.net_windows.entry(id).or_default().push_back(window);
        } else {
            *self.net_recv_acked.entry(id).or_default() += int("bytes").unwrap_or(0);
        }
    }

    /// An FS_REQUEST (its window) or an FS_DATA_ACK (its bytes) has been
    /// written whole.
    fn end_of_fs(&mut self) {
        let Some((kind, id, payload)) = self.fs_payload.take() else {
            return;
        };
        let m = super::msgpack::decode(&payload).ok();
        let int = |key: &str| m.as_ref().and_then(|m| m.get(key).and_then(Value::as_int));
        if kind == Kind::FsRequest as u8 {
            let window = int("window").map_or(1 << 20, |w| w.max(0) as u64);
            self.fs_window.insert(id, window);
        } else if let Some(bytes) = int("bytes") {
            *self.fs_data_acked.entry(id).or_default() += bytes.max(0) as u64;
        }
    }

    /// Records that a shutdown was asked for by other means (a signal to
    /// the agent), so SHUTDOWN_DONE is expected.
    pub fn note_shutdown(&mut self) {
        self.shutdown = true;
    }

    /// A new connection (a host reconnecting to a port): its stream starts
    /// at a frame boundary again. Sessions, and what was sent for them,
    /// carry over.
    pub fn reconnect(&mut self) {
        self.header.clear();
        self.skip = 0;
    }
}

/// What an extension request opened on an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// A file operation (FS_REQUEST).
    Fs,
    /// A connection (NET_CONNECT).
    Net,
    /// A LIST (its SESSIONS pages).
    List,
    /// An ATTACH, until ATTACHED makes it a session (or ATTACH_FAILED).
    Attach,
}

/// The type a map key must have.
#[derive(Clone, Copy, Debug)]
pub enum Ty {
    U8,
    U16,
    U32,
    I32,
    U64,
    I64,
    Bool,
    Str,
    Map,
    Array,
}

impl Ty {
    fn check(self, what: &str, key: &str, v: &Value) -> Result<(), String> {
        let ok = match self {
            Ty::U8 => v.as_int().is_some_and(|i| (0..=255).contains(&i)),
            Ty::U16 => v.as_int().is_some_and(|i| (0..=65535).contains(&i)),
            Ty::I64 => v
                .as_int()
                .is_some_and(|i| (i128::from(i64::MIN)..=i128::from(i64::MAX)).contains(&i)),
            Ty::Map => matches!(v, Value::Map(_)),
            Ty::Array => matches!(v, Value::Array(_)),
            Ty::U32 => v
                .as_int()
                .is_some_and(|i| (0..=i128::from(u32::MAX)).contains(&i)),
            Ty::I32 => v
                .as_int()
                .is_some_and(|i| (i128::from(i32::MIN)..=i128::from(i32::MAX)).contains(&i)),
            Ty::U64 => v
                .as_int()
                .is_some_and(|i| (0..=i128::from(u64::MAX)).contains(&i)),
            Ty::Bool => v.as_bool().is_some(),
            Ty::Str => v.as_str().is_some(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("{what} key {key:?} has the wrong type: {v:?}"))
        }
    }
}

/// Which ids a kind may carry.
#[derive(Clone, Copy, Debug)]
pub enum Ids {
    /// Connection-level: id 0.
    Zero,
    /// A session's id (or whatever id the frame it answers had); the
    /// kind's [`Rule::check`] says more.
    Any,
}

/// A kind's payload.
#[derive(Clone, Copy, Debug)]
pub enum Payload {
    /// Raw bytes: at most `max`, and not empty when `non_empty`.
    Raw { max: usize, non_empty: bool },
    /// Nothing.
    Empty,
    /// One map with string keys: these keys with these types required, and
    /// these when present (others are ignored, as the contract says).
    Map {
        required: &'static [(&'static str, Ty)],
        optional: &'static [(&'static str, Ty)],
    },
}

/// What the checker knows about one agent → host kind.
pub struct Rule {
    pub kind: u8,
    pub name: &'static str,
    pub ids: Ids,
    pub payload: Payload,
    /// The kind's meaning for the session state; gets the decoded map for
    /// map kinds (`Value::Nil` otherwise).
    pub check: fn(&mut Checker, &Frame<'_>, &Value, &mut Sent) -> Result<(), String>,
}

/// One entry per agent → host kind of protocol v1 and its extensions.
pub const RULES: &[Rule] = &[
    Rule {
        kind: Kind::Ready as u8,
        name: "READY",
        ids: Ids::Zero,
        payload: Payload::Map {
            required: &[
                ("protocol", Ty::U32),
                ("agent", Ty::Str),
                ("pid", Ty::U32),
                ("pid1", Ty::Bool),
                ("max_payload", Ty::U32),
                ("stdin_window", Ty::U32),
                ("max_sessions", Ty::U32),
            ],
            // Extensions.
            optional: &[
                ("uptime_ms", Ty::U64),
                ("features", Ty::Array),
                ("realtime_ns", Ty::I64),
                ("restores", Ty::U32),
                ("clock_set", Ty::Bool),
                ("replay_bytes", Ty::U32),
                ("cgroups", Ty::Bool),
            ],
        },
        check: Checker::ready,
    },
    Rule {
        kind: Kind::Pong as u8,
        name: "PONG",
        ids: Ids::Any,
        payload: Payload::Raw {
            max: MAX_PAYLOAD,
            non_empty: false,
        },
        check: |_, _, _, _| Ok(()),
    },
    Rule {
        kind: Kind::ShutdownDone as u8,
        name: "SHUTDOWN_DONE",
        ids: Ids::Zero,
        payload: Payload::Empty,
        check: Checker::shutdown_done,
    },
    Rule {
        kind: Kind::Error as u8,
        name: "ERROR",
        ids: Ids::Any,
        payload: Payload::Map {
            required: &[("kind", Ty::Str), ("message", Ty::Str)],
            optional: &[("frame_kind", Ty::U8)],
        },
        check: Checker::error,
    },
    Rule {
        kind: Kind::Started as u8,
        name: "STARTED",
        ids: Ids::Any,
        payload: Payload::Map {
            required: &[("pid", Ty::U32)],
            optional: &[("session", Ty::U64)],
        },
        check: Checker::started,
    },
    Rule {
        kind: Kind::ExecFailed as u8,
        name: "EXEC_FAILED",
        ids: Ids::Any,
        payload: Payload::Map {
            required: &[("kind", Ty::Str), ("message", Ty::Str)],
            optional: &[("errno", Ty::I32), ("stage", Ty::Str)],
        },
        check: Checker::exec_failed,
    },
    Rule {
        kind: Kind::StdinAck as u8,
        name: "STDIN_ACK",
        ids: Ids::Any,
        payload: Payload::Map {
            required: &[("bytes", Ty::U32)],
            optional: &[],
        },
        check: Checker::stdin_ack,
    },
    Rule {
        kind: Kind::Stdout as u8,
        name: "STDOUT",
        ids: Ids::Any,
        // docs/PROTOCOL.md: never an empty one.
        payload: Payload::Raw {
            max: MAX_OUTPUT_PAYLOAD,
            non_empty: true,
        },
        check: Checker::output,
    },
    Rule {
        kind: Kind::Stderr as u8,
        name: "STDERR",
        ids: Ids::Any,
        payload: Payload::Raw {
            max: MAX_OUTPUT_PAYLOAD,
            non_empty: true,
        },
        check: Checker::output,
    },
    Rule {
        kind: Kind::Exited as u8,
        name: "EXITED",
        ids: Ids::Any,
        payload: Payload::Map {
            required: &[("core_dumped", Ty::Bool), ("status", Ty::I32)],
            optional: &[
                ("code", Ty::I32),
                ("signal", Ty::I32),
                ("output_dropped", Ty::U64),
                ("timed_out", Ty::Bool),
                ("oom_killed", Ty::Bool),
            ],
        },
        check: Checker::exited,
    },
    // Extension fs.
    map_rule(
        Kind::FsOpened,
        "FS_OPENED",
        &[],
        &[("stat", Ty::Map)],
        |c, f, _, s| c.fs_frame(f, "FS_OPENED", false, s),
    ),
    raw_rule(Kind::FsData, "FS_DATA", |c, f, _, s| {
        c.fs_frame(f, "FS_DATA", false, s)
    }),
    map_rule(
        Kind::FsWriteAck,
        "FS_WRITE_ACK",
        &[("bytes", Ty::U32)],
        &[],
        |c, f, m, s| {
            c.fs_frame(f, "FS_WRITE_ACK", false, s)?;
            c.data_ack(f.id, m, s, "FS_WRITE_ACK")
        },
    ),
    map_rule(
        Kind::FsEntries,
        "FS_ENTRIES",
        &[("entries", Ty::Array)],
        &[],
        |c, f, _, s| c.fs_frame(f, "FS_ENTRIES", false, s),
    ),
    map_rule(
        Kind::FsEvents,
        "FS_EVENTS",
        &[("events", Ty::Array)],
        &[("overflow", Ty::Bool)],
        |c, f, _, s| c.fs_frame(f, "FS_EVENTS", false, s),
    ),
    map_rule(
        Kind::FsDone,
        "FS_DONE",
        &[],
        &[
            ("bytes", Ty::U64),
            ("entries", Ty::U64),
            ("stat", Ty::Map),
            ("path", Ty::Str),
        ],
        |c, f, _, s| c.fs_frame(f, "FS_DONE", true, s),
    ),
    map_rule(
        Kind::FsError,
        "FS_ERROR",
        &[("kind", Ty::Str), ("message", Ty::Str)],
        &[("errno", Ty::I32), ("path", Ty::Str)],
        |c, f, m, s| {
            let k = m.get("kind").and_then(Value::as_str).unwrap_or_default();
            if agentd::messages::FsErrorKind::parse(k).is_none() {
                return Err(format!("FS_ERROR kind {k:?} is not in docs/PROTOCOL.md"));
            }
            c.fs_frame(f, "FS_ERROR", true, s)
        },
    ),
    // Extension net.
    map_rule(
        Kind::NetConnected,
        "NET_CONNECTED",
        &[("peer", Ty::Str), ("local", Ty::Str)],
        &[],
        |c, f, _, s| {
            c.stream_frame(f.id, Stream::Net, "NET_CONNECTED", false, s)?;
            c.net_connected(f.id, s)
        },
    ),
    map_rule(
        Kind::NetFailed,
        "NET_FAILED",
        &[("kind", Ty::Str), ("message", Ty::Str)],
        &[("errno", Ty::I32)],
        |c, f, m, s| {
            let k = m.get("kind").and_then(Value::as_str).unwrap_or_default();
            if agentd::messages::NetErrorKind::parse(k).is_none() {
                return Err(format!("NET_FAILED kind {k:?} is not in docs/PROTOCOL.md"));
            }
            if k == "duplicate_id" && c.net.contains_key(&f.id) {
                // The answer to a second NET_CONNECT on an open
                // connection's id, which goes on.
                return c.duplicate_connect(f.id, s);
            }
            c.stream_frame(f.id, Stream::Net, "NET_FAILED", true, s)?;
            c.net_ended(f.id, s);
            Ok(())
        },
    ),
    map_rule(
        Kind::NetSendAck,
        "NET_SEND_ACK",
        &[("bytes", Ty::U32)],
        &[],
        |c, f, m, s| {
            c.stream_frame(f.id, Stream::Net, "NET_SEND_ACK", false, s)?;
            c.net_open(f.id, "NET_SEND_ACK")?;
            c.data_ack(f.id, m, s, "NET_SEND_ACK")
        },
    ),
    raw_rule(Kind::NetRecv, "NET_RECV", |c, f, _, s| {
        c.stream_frame(f.id, Stream::Net, "NET_RECV", false, s)?;
        c.net_recv(f.id, f.payload.len() as u64, s)
    }),
    Rule {
        kind: Kind::NetEof as u8,
        name: "NET_EOF",
        ids: Ids::Any,
        payload: Payload::Empty,
        check: |c, f, _, s| {
            c.stream_frame(f.id, Stream::Net, "NET_EOF", false, s)?;
            c.net_open(f.id, "NET_EOF")?;
            let st = c.net.get_mut(&f.id).expect("checked open");
            if std::mem::replace(&mut st.eof, true) {
                return Err(format!("a second NET_EOF on {}", f.id));
            }
            Ok(())
        },
    },
    map_rule(
        Kind::NetClosed,
        "NET_CLOSED",
        &[],
        &[("error", Ty::Str), ("message", Ty::Str), ("errno", Ty::I32)],
        |c, f, _, s| {
            c.stream_frame(f.id, Stream::Net, "NET_CLOSED", true, s)?;
            c.net_ended(f.id, s);
            Ok(())
        },
    ),
    // Extension sessions.
    map_rule(
        Kind::Sessions,
        "SESSIONS",
        &[("sessions", Ty::Array), ("more", Ty::Bool)],
        &[],
        |c, f, m, s| {
            let last = m.get("more").and_then(Value::as_bool) == Some(false);
            c.stream_frame(f.id, Stream::List, "SESSIONS", last, s)
        },
    ),
    map_rule(
        Kind::Attached,
        "ATTACHED",
        &[
            ("session", Ty::U64),
            ("pid", Ty::U32),
            ("stdout_from", Ty::U64),
            ("stderr_from", Ty::U64),
            ("stdout_lost", Ty::U64),
            ("stderr_lost", Ty::U64),
        ],
        &[("tty", Ty::Bool), ("stdin", Ty::Bool)],
        |c, f, m, s| {
            c.stream_frame(f.id, Stream::Attach, "ATTACHED", true, s)?;
            let pid = m.get("pid").and_then(Value::as_int).unwrap_or_default() as u32;
            if c.running.insert(f.id, pid).is_some() {
                return Err(format!(
                    "ATTACHED for id {}, which is a running session",
                    f.id
                ));
            }
            Ok(())
        },
    ),
    map_rule(
        Kind::AttachFailed,
        "ATTACH_FAILED",
        &[("kind", Ty::Str), ("message", Ty::Str)],
        &[],
        |c, f, _, s| c.stream_frame(f.id, Stream::Attach, "ATTACH_FAILED", true, s),
    ),
    map_rule(
        Kind::Detached,
        "DETACHED",
        &[("session", Ty::U64), ("reason", Ty::Str)],
        &[],
        |c, f, _, _| {
            c.session_frame(f.id, "DETACHED")?;
            c.running.remove(&f.id);
            Ok(())
        },
    ),
    // Extension clock: answers to requests of any id the host sent.
    map_rule(
        Kind::Clock,
        "CLOCK",
        &[
            ("realtime_ns", Ty::I64),
            ("boottime_ns", Ty::U64),
            ("restores", Ty::U32),
        ],
        &[],
        Checker::answer,
    ),
    map_rule(
        Kind::ClockSetDone,
        "CLOCK_SET_DONE",
        &[("old_ns", Ty::I64), ("new_ns", Ty::I64)],
        &[],
        Checker::answer,
    ),
    map_rule(
        Kind::EntropyDone,
        "ENTROPY_DONE",
        &[("bytes", Ty::U32)],
        &[],
        Checker::answer,
    ),
];

/// The checking function of a rule.
type Check = fn(&mut Checker, &Frame<'_>, &Value, &mut Sent) -> Result<(), String>;

/// A rule for a map kind with any id.
const fn map_rule(
    kind: Kind,
    name: &'static str,
    required: &'static [(&'static str, Ty)],
    optional: &'static [(&'static str, Ty)],
    check: Check,
) -> Rule {
    Rule {
        kind: kind as u8,
        name,
        ids: Ids::Any,
        payload: Payload::Map { required, optional },
        check,
    }
}

/// A rule for a raw data kind (never empty, at most 64 KiB) with any id.
const fn raw_rule(kind: Kind, name: &'static str, check: Check) -> Rule {
    Rule {
        kind: kind as u8,
        name,
        ids: Ids::Any,
        payload: Payload::Raw {
            max: MAX_OUTPUT_PAYLOAD,
            non_empty: true,
        },
        check,
    }
}

/// The name of a kind byte, for messages.
pub fn kind_name(kind: u8) -> String {
    RULES
        .iter()
        .find(|r| r.kind == kind)
        .map(|r| r.name.to_owned())
        .or_else(|| Kind::from_u8(kind).map(|k| k.name().to_owned()))
        .unwrap_or_else(|| format!("kind {kind:#04x}"))
}

/// The contract state of one agent as a host sees it.
#[derive(Default)]
pub struct Checker {
    /// Frames checked.
    pub frames: u64,
    ready_seen: bool,
    /// READY's `pid` must be this, where the host knows it.
    expected_pid: Option<u32>,
    /// Running sessions and their pids (as STARTED gave them).
    running: HashMap<u32, u32>,
    acked: HashMap<u32, u64>,
    shutdown_done: bool,
    /// Live extension streams by id.
    streams: HashMap<u32, Stream>,
    /// FS_WRITE_ACK and NET_SEND_ACK bytes per id.
    data_acked: HashMap<u32, u64>,
    /// Open connections (NET_CONNECTED, no final frame yet) by id.
    net: HashMap<u32, NetState>,
    /// Live file operations by id: their order and window.
    fs_ops: HashMap<u32, FsOpState>,
}

/// What the checker knows of an open connection.
#[derive(Debug, Default)]
struct NetState {
    /// The agent → host window NET_CONNECT gave.
    window: u64,
    /// NET_RECV payload bytes so far.
    recv: u64,
    /// The host's NET_RECV_ACK total for this id when it connected.
    ack_base: u64,
    eof: bool,
}

/// What the checker knows of one live file operation.
#[derive(Default)]
struct FsOpState {
    /// FS_OPENED has come.
    opened: bool,
    /// Frames of it so far.
    frames: u64,
    /// Payload bytes of FS_DATA, FS_ENTRIES and FS_EVENTS so far.
    sent: u64,
    /// The host's FS_DATA_ACK total for the id when it started.
    ack_base: u64,
    /// The request's window.
    window: u64,
}

impl Checker {
    /// A checker for an agent whose READY must carry `pid`, if given.
    pub fn new(expected_pid: Option<u32>) -> Checker {
        Checker {
            expected_pid,
            ..Checker::default()
        }
    }

    /// A new connection to the same agent (a port reopened): READY comes
    /// first again; the sessions carry over.
    pub fn reconnect(&mut self) {
        self.ready_seen = false;
    }

    /// The sessions that have STARTED and not EXITED, with their pids.
    pub fn running(&self) -> &HashMap<u32, u32> {
        &self.running
    }

    /// Checks one frame the agent sent against the contract, given what the
    /// host sent so far.
    pub fn check(&mut self, f: &Frame<'_>, sent: &mut Sent) -> Result<(), String> {
        self.frames += 1;
        let rule = RULES.iter().find(|r| r.kind == f.kind).ok_or_else(|| {
            let name = kind_name(f.kind);
            if Kind::from_u8(f.kind).is_some() {
                format!("agent sent {name}, a host → agent kind")
            } else {
                format!("agent sent unknown {name}")
            }
        })?;
        let name = rule.name;
        if self.shutdown_done {
            return Err(format!("agent sent {name} after SHUTDOWN_DONE"));
        }
        if !self.ready_seen && f.kind != Kind::Ready as u8 {
            return Err(format!("first frame is {name}, not READY"));
        }
        let map = match rule.payload {
            Payload::Raw { max, non_empty } => {
                if non_empty && f.payload.is_empty() {
                    return Err(format!("{name} with an empty payload"));
                }
                if f.payload.len() > max {
                    return Err(format!(
                        "{name} with {} bytes of payload (limit {} KiB)",
                        f.payload.len(),
                        max / 1024
                    ));
                }
                Value::Nil
            }
            Payload::Empty => {
                if !f.payload.is_empty() {
                    return Err(format!("{name} has a {}-byte payload", f.payload.len()));
                }
                Value::Nil
            }
            Payload::Map { required, optional } => {
                let m = payload_map(f.payload).map_err(|e| format!("{name} payload: {e}"))?;
                check_keys(name, &m, required, optional)?;
                m
            }
        };
        // The crate's own decoder must read it too.
        Message::decode_from_agent(*f)
            .map_err(|e| format!("{name} does not decode with agentd::messages: {e}"))?;
        if matches!(rule.ids, Ids::Zero) && f.id != 0 {
            return Err(format!("{name} with id {}", f.id));
        }
        (rule.check)(self, f, &map, sent)
    }

    /// The end of the agent's stream: it must fall between frames.
    pub fn check_eof(&self, at_boundary: bool) -> Result<(), String> {
        if at_boundary {
            Ok(())
        } else {
            Err("the agent's stream ended inside a frame".into())
        }
    }

    fn ready(&mut self, _f: &Frame<'_>, m: &Value, _sent: &mut Sent) -> Result<(), String> {
        if self.ready_seen {
            return Err("a second READY on one connection".into());
        }
        self.ready_seen = true;
        if m.get("protocol").and_then(Value::as_int) != Some(1) {
            return Err(format!("READY protocol is not 1: {m:?}"));
        }
        if m.get("max_payload").and_then(Value::as_int) != Some(1 << 20) {
            return Err(format!("READY max_payload is not 1 MiB: {m:?}"));
        }
        if let Some(pid) = self.expected_pid {
            if m.get("pid").and_then(Value::as_int) != Some(i128::from(pid)) {
                return Err(format!("READY pid is not the agent's, {pid}: {m:?}"));
            }
        }
        Ok(())
    }

    fn shutdown_done(&mut self, _f: &Frame<'_>, _m: &Value, sent: &mut Sent) -> Result<(), String> {
        if !sent.shutdown {
            return Err("SHUTDOWN_DONE without SHUTDOWN".into());
        }
        if !self.running.is_empty() {
            let mut ids: Vec<u32> = self.running.keys().copied().collect();
            ids.sort_unstable();
            return Err(format!("SHUTDOWN_DONE before EXITED of sessions {ids:?}"));
        }
        self.shutdown_done = true;
        Ok(())
    }

    fn error(&mut self, f: &Frame<'_>, m: &Value, sent: &mut Sent) -> Result<(), String> {
        let k = m.get("kind").and_then(Value::as_str).unwrap_or_default();
        if ErrorKind::parse(k).is_none() {
            return Err(format!("ERROR kind {k:?} is not in the contract"));
        }
        // The id is that of the frame it answers (or 0).
        if f.id != 0 && !sent.ids.contains(&f.id) {
            return Err(format!(
                "ERROR {k} for id {}, which no frame of the host had",
                f.id
            ));
        }
        Ok(())
    }

    fn started(&mut self, f: &Frame<'_>, m: &Value, sent: &mut Sent) -> Result<(), String> {
        let detach = self.take_pending(f.id, sent, "STARTED")?;
        let pid = m.get("pid").and_then(Value::as_int).unwrap_or_default() as u32;
        if self.running.contains_key(&f.id) {
            return Err(format!("STARTED for id {}, which is running", f.id));
        }
        // A detached start's STARTED is the id's last frame.
        if !detach {
            self.running.insert(f.id, pid);
        }
        Ok(())
    }

    fn exec_failed(&mut self, f: &Frame<'_>, m: &Value, sent: &mut Sent) -> Result<(), String> {
        let k = m.get("kind").and_then(Value::as_str).unwrap_or_default();
        let fk = ExecFailedKind::parse(k)
            .ok_or_else(|| format!("EXEC_FAILED kind {k:?} is not in the contract"))?;
        self.take_pending(f.id, sent, "EXEC_FAILED")?;
        if self.running.contains_key(&f.id) && fk != ExecFailedKind::DuplicateId {
            return Err(format!(
                "EXEC_FAILED {k} for id {}, which is running (expected duplicate_id)",
                f.id
            ));
        }
        Ok(())
    }

    fn stdin_ack(&mut self, f: &Frame<'_>, m: &Value, sent: &mut Sent) -> Result<(), String> {
        self.session_frame(f.id, "STDIN_ACK")?;
        let bytes = m.get("bytes").and_then(Value::as_int).unwrap_or_default() as u64;
        let acked = self.acked.entry(f.id).or_default();
        *acked += bytes;
        let sent_bytes = sent.stdin_bytes.get(&f.id).copied().unwrap_or(0);
        if *acked > sent_bytes {
            return Err(format!(
                "STDIN_ACK total {acked} for id {} exceeds the {sent_bytes} bytes sent",
                f.id
            ));
        }
        Ok(())
    }

    fn output(&mut self, f: &Frame<'_>, _m: &Value, _sent: &mut Sent) -> Result<(), String> {
        let name = if f.kind == Kind::Stdout as u8 {
            "STDOUT"
        } else {
            "STDERR"
        };
        self.session_frame(f.id, name)
    }

    fn exited(&mut self, f: &Frame<'_>, m: &Value, _sent: &mut Sent) -> Result<(), String> {
        parse_exited(m)?;
        self.session_frame(f.id, "EXITED")?;
        self.running.remove(&f.id);
        Ok(())
    }

    /// A frame of an extension stream on `id`: the first one answers a
    /// request of that stream's kind the host sent; `last` ends it.
    fn stream_frame(
        &mut self,
        id: u32,
        what: Stream,
        name: &str,
        last: bool,
        sent: &mut Sent,
    ) -> Result<(), String> {
        if self.streams.get(&id) != Some(&what) {
            let pending = sent.pending.get_mut(&id);
            let Some(pos) = pending
                .as_ref()
                .and_then(|p| p.iter().position(|&s| s == what))
            else {
                return Err(format!(
                    "{name} for id {id}, which has no {what:?} request or stream"
                ));
            };
            if let Some(p) = pending {
                p.remove(pos);
            }
            self.streams.insert(id, what);
        }
        if last {
            self.streams.remove(&id);
        }
        Ok(())
    }

    /// A frame of a file operation: in its stream (see
    /// [`Checker::stream_frame`]), FS_OPENED only as its first frame,
    /// FS_DATA, FS_WRITE_ACK and FS_EVENTS only after FS_OPENED, and the
    /// payload bytes of FS_DATA, FS_ENTRIES and FS_EVENTS never more than
    /// the request's window beyond what the host has acknowledged.
    fn fs_frame(
        &mut self,
        f: &Frame<'_>,
        name: &str,
        last: bool,
        sent: &mut Sent,
    ) -> Result<(), String> {
        let id = f.id;
        let fresh = self.streams.get(&id) != Some(&Stream::Fs);
        self.stream_frame(id, Stream::Fs, name, last, sent)?;
        let acked = sent.fs_data_acked.get(&id).copied().unwrap_or(0);
        if fresh {
            let window = sent.fs_window.get(&id).copied().unwrap_or(1 << 20);
            self.fs_ops.insert(
                id,
                FsOpState {
                    ack_base: acked,
                    window,
                    ..FsOpState::default()
                },
            );
        }
        let op = self.fs_ops.entry(id).or_default();
        op.frames += 1;
        let kind = Kind::from_u8(f.kind);
        match kind {
            Some(Kind::FsOpened) if op.frames != 1 => {
                return Err(format!("FS_OPENED for id {id} is not its first frame"));
            }
            Some(Kind::FsOpened) => op.opened = true,
            Some(Kind::FsData | Kind::FsWriteAck | Kind::FsEvents) if !op.opened => {
                return Err(format!("{name} for id {id} before its FS_OPENED"));
            }
            _ => {}
        }
        if matches!(kind, Some(Kind::FsData | Kind::FsEntries | Kind::FsEvents)) {
            op.sent += f.payload.len() as u64;
            let in_flight = op.sent.saturating_sub(acked - op.ack_base);
            if in_flight > op.window {
                return Err(format!(
                    "{name} for id {id}: {in_flight} bytes unacknowledged, above the window of {}",
                    op.window
                ));
            }
        }
        if last {
            self.fs_ops.remove(&id);
        }
        Ok(())
    }

    /// An ack of FS_WRITE or NET_SEND bytes: never more than were sent.
    fn data_ack(&mut self, id: u32, m: &Value, sent: &mut Sent, name: &str) -> Result<(), String> {
        let bytes = m.get("bytes").and_then(Value::as_int).unwrap_or_default() as u64;
        let acked = self.data_acked.entry(id).or_default();
        *acked += bytes;
        let sent_bytes = sent.data_bytes.get(&id).copied().unwrap_or(0);
        if *acked > sent_bytes {
            return Err(format!(
                "{name} total {acked} for id {id} exceeds the {sent_bytes} bytes sent"
            ));
        }
        Ok(())
    }

    /// NET_CONNECTED: the connection is open, under its NET_CONNECT's
    /// window.
    fn net_connected(&mut self, id: u32, sent: &mut Sent) -> Result<(), String> {
        let window = sent
            .net_windows
            .get_mut(&id)
            .and_then(VecDeque::pop_front)
            .unwrap_or(1 << 20);
        let ack_base = sent.net_recv_acked.get(&id).copied().unwrap_or(0);
        let state = NetState {
            window,
            ack_base,
            ..NetState::default()
        };
        if self.net.insert(id, state).is_some() {
            return Err(format!("a second NET_CONNECTED on {id}"));
        }
        Ok(())
    }

    /// NET_FAILED `duplicate_id` for a NET_CONNECT on an open connection's
    /// id: it answers that request and ends nothing.
    fn duplicate_connect(&mut self, id: u32, sent: &mut Sent) -> Result<(), String> {
        let pending = sent.pending.get_mut(&id);
        let pos = pending
            .as_ref()
            .and_then(|p| p.iter().position(|&s| s == Stream::Net))
            .ok_or_else(|| {
                format!("NET_FAILED duplicate_id for {id} without a second NET_CONNECT")
            })?;
        if let Some(p) = pending {
            p.remove(pos);
        }
        if let Some(w) = sent.net_windows.get_mut(&id) {
            w.pop_back();
        }
        Ok(())
    }

    /// A frame only an open connection sends.
    fn net_open(&self, id: u32, name: &str) -> Result<(), String> {
        if self.net.contains_key(&id) {
            Ok(())
        } else {
            Err(format!("{name} on {id} before NET_CONNECTED"))
        }
    }

    /// NET_RECV: after NET_CONNECTED, before NET_EOF, and never more
    /// unacknowledged than the window (counting every ack the host has
    /// written, which the agent may not have read yet: never stricter
    /// than the agent's view).
    fn net_recv(&mut self, id: u32, len: u64, sent: &mut Sent) -> Result<(), String> {
        self.net_open(id, "NET_RECV")?;
        let acked = sent.net_recv_acked.get(&id).copied().unwrap_or(0);
        let st = self.net.get_mut(&id).expect("checked open");
        if st.eof {
            return Err(format!("NET_RECV on {id} after NET_EOF"));
        }
        st.recv += len;
        let unacked = st.recv.saturating_sub(acked - st.ack_base);
        if unacked > st.window {
            return Err(format!(
                "NET_RECV on {id}: {unacked} bytes unacknowledged, over the window of {}",
                st.window
            ));
        }
        Ok(())
    }

    /// A connection's final frame (NET_FAILED or NET_CLOSED).
    fn net_ended(&mut self, id: u32, sent: &mut Sent) {
        if self.net.remove(&id).is_none() {
            // Never connected: its NET_CONNECT's window goes too.
            if let Some(w) = sent.net_windows.get_mut(&id) {
                w.pop_front();
            }
        }
    }

    /// An answer to a request of the host's (any id it sent).
    fn answer(&mut self, f: &Frame<'_>, _m: &Value, sent: &mut Sent) -> Result<(), String> {
        if f.id != 0 && !sent.ids.contains(&f.id) {
            return Err(format!(
                "an answer for id {}, which no frame of the host had",
                f.id
            ));
        }
        Ok(())
    }

    /// Takes the EXEC a STARTED or EXEC_FAILED answers: whether it asked
    /// to start detached.
    fn take_pending(&mut self, id: u32, sent: &mut Sent, what: &str) -> Result<bool, String> {
        sent.pending_exec
            .get_mut(&id)
            .and_then(VecDeque::pop_front)
            .ok_or_else(|| format!("{what} for id {id} without an EXEC waiting for it"))
    }

    fn session_frame(&self, id: u32, name: &str) -> Result<(), String> {
        if self.running.contains_key(&id) {
            Ok(())
        } else {
            Err(format!(
                "{name} for id {id}, which is not a running session (before STARTED or after EXITED)"
            ))
        }
    }
}

/// Checks that `map` has the required keys of the right types, optional
/// keys of the right types when present, and (by the contract's rule that
/// unknown keys are ignored) anything else.
fn check_keys(
    what: &str,
    map: &Value,
    required: &[(&str, Ty)],
    optional: &[(&str, Ty)],
) -> Result<(), String> {
    if !matches!(map, Value::Map(_)) {
        return Err(format!("{what} payload is not a map: {map:?}"));
    }
    if map.keys().iter().any(Option::is_none) {
        return Err(format!("{what} has a non-string key: {map:?}"));
    }
    for (key, ty) in required {
        let v = map
            .get(key)
            .ok_or_else(|| format!("{what} lacks required key {key:?}: {map:?}"))?;
        ty.check(what, key, v)?;
    }
    for (key, ty) in optional {
        if let Some(v) = map.get(key) {
            ty.check(what, key, v)?;
        }
    }
    Ok(())
}

/// Decodes a map payload (empty = empty map).
pub fn payload_map(payload: &[u8]) -> Result<Value, String> {
    if payload.is_empty() {
        return Ok(Value::Map(Vec::new()));
    }
    msgpack::decode(payload)
}

/// EXITED, read key by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub core_dumped: bool,
    pub status: i32,
}

impl ExitInfo {
    pub fn code(code: i32) -> ExitInfo {
        ExitInfo {
            code: Some(code),
            signal: None,
            core_dumped: false,
            status: code,
        }
    }
    pub fn signal(signal: i32) -> ExitInfo {
        ExitInfo {
            code: None,
            signal: Some(signal),
            core_dumped: false,
            status: 128 + signal,
        }
    }
}

/// Validates an EXITED map: `code` xor `signal`, `core_dumped` a bool
/// (present: the contract gives it no default), `status` = code or
/// 128 + signal.
pub fn parse_exited(m: &Value) -> Result<ExitInfo, String> {
    check_keys(
        "EXITED",
        m,
        &[("core_dumped", Ty::Bool), ("status", Ty::I32)],
        &[("code", Ty::I32), ("signal", Ty::I32)],
    )?;
    let code = m.get("code").and_then(Value::as_int).map(|i| i as i32);
    let signal = m.get("signal").and_then(Value::as_int).map(|i| i as i32);
    let core_dumped = m
        .get("core_dumped")
        .and_then(Value::as_bool)
        .ok_or("EXITED core_dumped is not a bool")?;
    let status = m
        .get("status")
        .and_then(Value::as_int)
        .ok_or("EXITED status is not an integer")? as i32;
    match (code, signal) {
        (Some(c), None) if status == c => {}
        (None, Some(s)) if status == 128 + s => {}
        _ => {
            return Err(format!(
                "EXITED must carry code or signal (one of them) and status = code or 128 + signal: {m:?}"
            ))
        }
    }
    if core_dumped && signal.is_none() {
        return Err(format!("EXITED core_dumped without a signal: {m:?}"));
    }
    Ok(ExitInfo {
        code,
        signal,
        core_dumped,
        status,
    })
}

/// A frame's payload for messages: a map as a map, raw bytes as text.
pub fn show_payload(kind: u8, payload: &[u8]) -> String {
    let is_map = RULES
        .iter()
        .find(|r| r.kind == kind)
        .is_some_and(|r| matches!(r.payload, Payload::Map { .. }));
    if is_map {
        match payload_map(payload) {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("<bad map: {e}>"),
        }
    } else {
        let s = String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned();
        format!("{} bytes {s:?}", payload.len())
    }
}

/// The panic message for a violation.
pub fn violation(e: &str, f: &Frame<'_>) -> String {
    format!(
        "protocol violation by the agent: {e}\n  frame: {} id {} payload {}",
        kind_name(f.kind),
        f.id,
        show_payload(f.kind, f.payload)
    )
}
